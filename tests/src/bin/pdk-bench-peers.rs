//! `cargo xtask bench peers`: the same HTTPS workload direct, through squid's ssl-bump and
//! through Paddock (cooperative `CONNECT` and eBPF-transparent), in one run, interleaved,
//! with the CPU each process spends per request. Prints a markdown section for
//! BENCHMARKS.md on stdout.
//!
//! The lab: nginx in a test-host namespace (`Topology::upstream`, 10.77.0.1) with a
//! certificate from a test CA; squid and `paddock-proxy serve` as separate processes in the
//! agent namespace, each in its own cgroup (killed with it on drop, also on panic); an agent
//! cgroup the proxy intercepts. The load generator is this binary again
//! (`pdk-bench-peers loadgen SPEC`, see `paddock_tests::loadgen`), one process per
//! measurement, driven over its stdin/stdout so that the CPU counters are read exactly around
//! the measured requests: it prints `ready`, runs on `go`, prints `done`, and prints its
//! result (percentiles computed only then) on `report`.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use anyhow::{Context, Result, bail};
use paddock_tests::{
    CgroupGuard, Topology,
    loadgen::{self, LoadResult, LoadSpec},
    peers::{self, PaddockServe, Squid},
    process::{Placement, place, target_bin},
    proxied::{Nginx, make_upstream_certs},
    relay::{Floor, Relay, RelaySpec},
    topology::UPSTREAM_V4,
    wrk::{cpus, kernel},
};

const HOST: &str = "app.test";
/// nginx's 25-byte static file.
const PATH: &str = "/hello.txt";
const CONNECTIONS: usize = 8;
const SECONDS: u64 = 5;
const WARM_MS: u64 = 1000;
const ROUNDS: usize = 5;
/// `workers` starts a lab per worker count and round: fewer rounds keep it near ten minutes.
const WORKER_ROUNDS: usize = 3;
const SQUID: &str = "127.0.0.1:3129";
const PADDOCK_CONNECT: &str = "127.0.0.1:3128";
const RELAY: &str = "127.0.0.1:3130";
const HYPER_RELAY: &str = "127.0.0.1:3131";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Squid,
    PaddockConnect,
    PaddockTransparent,
    /// The floor: TLS on both legs and nothing else (`paddock_tests::relay`).
    Relay,
    /// The next floor: TLS on both legs and hyper forwarding each request untouched.
    HyperRelay,
}

impl Mode {
    const ALL: [Self; 6] = [
        Self::Direct,
        Self::Squid,
        Self::PaddockConnect,
        Self::PaddockTransparent,
        Self::Relay,
        Self::HyperRelay,
    ];
    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Squid => "squid ssl-bump (CONNECT)",
            Self::PaddockConnect => "Paddock cooperative (CONNECT)",
            Self::PaddockTransparent => "Paddock transparent (eBPF)",
            Self::Relay => "floor: TLS relay, bytes (CONNECT)",
            Self::HyperRelay => "floor: TLS relay, hyper HTTP/1.1 (CONNECT)",
        }
    }

    /// The relays open one upstream connection per client connection, so a new connection
    /// per request would measure upstream handshakes Paddock's pool spares: keep-alive only.
    fn runs(self, w: Workload) -> bool {
        self.relay_addr().is_none() || w == Workload::KeepAlive
    }

    /// Where a floor's relay listens.
    fn relay_addr(self) -> Option<&'static str> {
        match self {
            Self::Relay => Some(RELAY),
            Self::HyperRelay => Some(HYPER_RELAY),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    KeepAlive,
    NewConnection,
}

impl Workload {
    const ALL: [Self; 2] = [Self::KeepAlive, Self::NewConnection];
    fn label(self) -> &'static str {
        match self {
            Self::KeepAlive => "keep-alive",
            Self::NewConnection => "new connection per request",
        }
    }
}

/// One measured run: the generator's result and the CPU ticks each process tree spent.
#[derive(Debug, Clone)]
struct Measurement {
    result: LoadResult,
    proxy_ticks: Option<u64>,
    nginx_ticks: u64,
    loadgen_ticks: u64,
}

impl Measurement {
    fn per_request(&self, ticks: u64) -> f64 {
        peers::micros_per_request(ticks, peers::ticks_per_second(), self.result.requests)
    }
}

/// Everything the modes share; removed on drop in field order (proxies first, namespaces and
/// files last).
struct Lab {
    relay: RelayProcess,
    hyper_relay: RelayProcess,
    paddock: PaddockServe,
    squid: Squid,
    nginx: Nginx,
    agents: CgroupGuard,
    topo: Topology,
    dir: tempfile::TempDir,
}

impl Lab {
    /// A lab whose Paddock runs `workers` runtime worker threads (else its default).
    fn new(workers: Option<usize>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pdk-bench-peers-")
            .tempdir()?;
        let d = dir.path();
        // squid drops to Debian's `proxy` user: it must reach its own directory below this.
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))?;
        make_upstream_certs(d, &[HOST]);
        let topo = Topology::new();
        // Only in the bench's own namespace: tens of thousands of short connections to one
        // address must not run out of ports.
        for ns in [&topo.agent, &topo.upstream] {
            let out = Command::new("ip")
                .args(["netns", "exec", ns.name(), "sysctl", "-qw"])
                .args([
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.ipv4.ip_local_port_range=1024 65000",
                ])
                .output()?;
            if !out.status.success() {
                bail!("sysctl: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let nginx = Nginx::start(&topo.upstream, d, SocketAddr::from(([127, 0, 0, 1], 9)));
        let agents = CgroupGuard::new("pa");
        let upstream_ca = d.join("test-ca.crt");
        let host_ip = IpAddr::V4(UPSTREAM_V4);
        let squid = Squid::start(&topo.agent, d, SQUID.parse()?, HOST, host_ip, &upstream_ca)?;
        let paddock = PaddockServe::start(
            &target_bin("paddock-proxy"),
            &topo.agent,
            d,
            &agents,
            PADDOCK_CONNECT.parse()?,
            HOST,
            host_ip,
            "10.77.0.0/24",
            &upstream_ca,
            workers,
        )?;
        let relay_spec = |floor, listen: &str| -> Result<RelaySpec> {
            Ok(RelaySpec {
                floor,
                listen: listen.parse()?,
                upstream: SocketAddr::from((UPSTREAM_V4, 443)),
                server_name: HOST.to_owned(),
                cert: d.join("server.crt"),
                key: d.join("server.key"),
                upstream_ca: upstream_ca.clone(),
            })
        };
        let relay = RelayProcess::start(&topo.agent, &relay_spec(Floor::Bytes, RELAY)?, workers)?;
        let hyper_relay = RelayProcess::start(
            &topo.agent,
            &relay_spec(Floor::Hyper, HYPER_RELAY)?,
            workers,
        )?;
        Ok(Self {
            relay,
            hyper_relay,
            paddock,
            squid,
            nginx,
            agents,
            topo,
            dir,
        })
    }

    fn spec(&self, mode: Mode, workload: Workload, duration_ms: u64) -> LoadSpec {
        let host = SocketAddr::from((UPSTREAM_V4, 443));
        let tunnel = Some(format!("{HOST}:443"));
        let (target, tunnel_to, ca) = match mode {
            Mode::Direct => (host, None, self.dir.path().join("test-ca.crt")),
            Mode::Squid => (
                SQUID.parse().expect("address"),
                tunnel,
                self.squid.ca.clone(),
            ),
            Mode::PaddockConnect => (
                PADDOCK_CONNECT.parse().expect("address"),
                tunnel,
                self.paddock.ca.clone(),
            ),
            Mode::PaddockTransparent => (host, None, self.paddock.ca.clone()),
            // They present nginx's own certificate.
            Mode::Relay | Mode::HyperRelay => (
                mode.relay_addr().unwrap_or(RELAY).parse().expect("address"),
                tunnel,
                self.dir.path().join("test-ca.crt"),
            ),
        };
        LoadSpec {
            target,
            tunnel_to,
            host: HOST.to_owned(),
            path: PATH.to_owned(),
            ca,
            connections: CONNECTIONS,
            duration_ms,
            new_connection: workload == Workload::NewConnection,
        }
    }

    fn proxy_pid(&self, mode: Mode) -> Option<i32> {
        match mode {
            Mode::Direct => None,
            Mode::Squid => Some(self.squid.pid()),
            Mode::PaddockConnect | Mode::PaddockTransparent => Some(self.paddock.pid()),
            Mode::Relay => Some(self.relay.pid()),
            Mode::HyperRelay => Some(self.hyper_relay.pid()),
        }
    }

    fn measure(&self, mode: Mode, workload: Workload, duration_ms: u64) -> Result<Measurement> {
        let spec = self.spec(mode, workload, duration_ms);
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("loadgen")
            .arg(serde_json::to_string(&spec)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let cgroup = (mode == Mode::PaddockTransparent).then_some(&self.agents);
        place(
            &mut cmd,
            &Placement {
                netns: Some(&self.topo.agent),
                cgroup,
                user: None,
            },
        );
        let mut load = Generator::spawn(&mut cmd)?;
        load.expect("ready")?;
        let load_pid = load.pid();
        let tree = |procs: &[peers::ProcStat]| {
            (
                self.proxy_pid(mode).map(|p| peers::tree_ticks(procs, p)),
                peers::tree_ticks(procs, self.nginx_pid()),
                peers::tree_ticks(procs, load_pid),
            )
        };
        let before = tree(&peers::snapshot());
        load.say("go")?;
        load.expect("done")?;
        let after = tree(&peers::snapshot());
        load.say("report")?;
        let result: LoadResult =
            serde_json::from_str(&load.line()?).context("load generator's report")?;
        load.finish()?;
        result
            .check()
            .with_context(|| format!("{} {}", mode.label(), workload.label()))?;
        Ok(Measurement {
            result,
            proxy_ticks: after.0.zip(before.0).map(|(a, b)| a.saturating_sub(b)),
            nginx_ticks: after.1.saturating_sub(before.1),
            loadgen_ticks: after.2.saturating_sub(before.2),
        })
    }

    fn nginx_pid(&self) -> i32 {
        i32::try_from(self.nginx.pid()).unwrap_or(-1)
    }
}

/// A load generator process, killed on drop unless it finished.
struct Generator {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Generator {
    fn spawn(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd.spawn().context("spawn the load generator")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("generator stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(-1)
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        // Bounded: the generator's own loops end by its deadline and step timeouts, and it
        // exits (closing its stdout) on any error.
        self.stdout.read_line(&mut line)?;
        if line.is_empty() {
            bail!("the load generator exited early");
        }
        Ok(line.trim_end().to_owned())
    }

    fn expect(&mut self, word: &str) -> Result<()> {
        let line = self.line()?;
        if line != word {
            bail!("load generator said {line:?}, expected {word:?}");
        }
        Ok(())
    }

    fn say(&mut self, word: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("generator stdin closed")?;
        writeln!(stdin, "{word}")?;
        stdin.flush()?;
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            bail!("load generator failed: {status}");
        }
        Ok(())
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The generator process: `loadgen SPEC-JSON`, driven by its parent over stdin/stdout.
fn loadgen_main(spec: &str) -> Result<()> {
    let spec: LoadSpec = serde_json::from_str(spec).context("load spec")?;
    let ca = std::fs::read(&spec.ca).with_context(|| format!("read {}", spec.ca.display()))?;
    let tls = loadgen::client_config(&ca)?;
    // One thread, like `wrk -t1`: the generator's CPU stays one process's one core.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stdin = std::io::stdin();
    let wait_for = |word: &str| -> Result<()> {
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        if line.trim_end() != word {
            bail!("expected {word:?} from the bench, got {line:?}");
        }
        Ok(())
    };
    println!("ready");
    wait_for("go")?;
    let (mut result, latencies) = rt.block_on(loadgen::run(spec, tls));
    println!("done");
    wait_for("report")?;
    loadgen::summarise(&mut result, latencies);
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// The relay process: `relay SPEC-JSON [WORKERS]`; prints `ready` once listening, then
/// serves until killed.
fn relay_main(spec: &str, workers: Option<&String>) -> Result<()> {
    let spec: RelaySpec = serde_json::from_str(spec).context("relay spec")?;
    let relay = Relay::new(&spec)?;
    let workers = match workers {
        Some(n) => n.parse().context("relay worker count")?,
        None => paddock_workers().get(),
    };
    // The same runtime flavour and size as the Paddock under test.
    let rt = paddock_app::runtime::build(
        std::num::NonZeroUsize::new(workers).context("relay worker count is zero")?,
    )?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(spec.listen).await?;
        println!("ready");
        relay.serve(listener).await;
        Ok(())
    })
}

/// The relay as its own process in the agent namespace, killed on drop.
struct RelayProcess {
    child: Child,
}

impl RelayProcess {
    fn start(ns: &paddock_tests::Netns, spec: &RelaySpec, workers: Option<usize>) -> Result<Self> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("relay")
            .arg(serde_json::to_string(spec)?)
            .args(workers.map(|n| n.to_string()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        place(&mut cmd, &Placement::netns(ns));
        let mut child = cmd.spawn().context("spawn the relay")?;
        let stdout = child.stdout.take().context("relay stdout")?;
        let me = Self { child };
        // Bounded: the relay prints `ready` or exits (closing its stdout) on any error.
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim_end() != "ready" {
            bail!("the relay did not start: {line:?}");
        }
        Ok(me)
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(-1)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pdk-bench-peers workers` (`cargo xtask bench workers`): Paddock with one and with two
/// runtime worker threads, each in a fresh lab (a new proxy process), three rounds with
/// the order alternating; direct and both Paddock modes, both workloads. Prints a markdown
/// section for BENCHMARKS.md.
fn workers_main() -> Result<()> {
    const COUNTS: [usize; 2] = [1, 2];
    const MODES: [Mode; 3] = [Mode::Direct, Mode::PaddockConnect, Mode::PaddockTransparent];
    let mut runs: Vec<((usize, Mode, Workload), Vec<Measurement>)> = Vec::new();
    for round in 0..WORKER_ROUNDS {
        for i in 0..COUNTS.len() {
            let n = COUNTS[(i + round) % COUNTS.len()];
            let lab = Lab::new(Some(n))?;
            for mode in MODES {
                for w in Workload::ALL {
                    lab.measure(mode, w, WARM_MS)?;
                }
            }
            for mode in MODES {
                for w in Workload::ALL {
                    let m = lab.measure(mode, w, SECONDS * 1000)?;
                    eprintln!(
                        "bench workers: round {}/{WORKER_ROUNDS}: {n} worker(s): {} {}: {:.0}/s",
                        round + 1,
                        mode.label(),
                        w.label(),
                        m.result.per_sec()
                    );
                    let key = (n, mode, w);
                    match runs.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, v)) => v.push(m),
                        None => runs.push((key, vec![m])),
                    }
                }
            }
        }
    }
    let results = medians(runs);
    let get = |key| pick(&results, key);
    println!("## Runtime workers: Paddock with 1 and 2 (`cargo xtask bench workers`)\n");
    println!(
        "The lab of `cargo xtask bench peers` (same load generator, nginx, {CONNECTIONS} \
         connections, {SECONDS} s per measurement, CPU from `/proc`), with `paddock-proxy \
         serve --worker-threads N` for N = 1 and 2. Each N gets a fresh lab (a new proxy \
         process) per round, {WORKER_ROUNDS} rounds, the order of N alternating; the table shows \
         the round with the median rate. Rates against direct are within the same lab. \
         {paddock}, kernel {kernel}, {cpus} CPUs shared by the client, the proxy and nginx.\n",
        paddock = paddock_version(),
        kernel = kernel(),
        cpus = cpus(),
    );
    println!(
        "| workload | mode | workers | requests/s | rate vs direct | proxy CPU (us/req) | nginx \
         CPU (us/req) | proxy / nginx CPU |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for w in Workload::ALL {
        for mode in [Mode::PaddockConnect, Mode::PaddockTransparent] {
            for n in COUNTS {
                let m = get((n, mode, w))?;
                let direct = get((n, Mode::Direct, w))?;
                let proxy = m.per_request(m.proxy_ticks.unwrap_or(0));
                let nginx = m.per_request(m.nginx_ticks);
                println!(
                    "| {} | {} | {n} | {:.0} | {:.2} | {proxy:.1} | {nginx:.1} | {:.2} |",
                    w.label(),
                    mode.label(),
                    m.result.per_sec(),
                    m.result.per_sec() / direct.result.per_sec(),
                    proxy / nginx,
                );
            }
        }
    }
    Ok(())
}

/// Each key's round with the median rate.
fn medians<K>(runs: Vec<(K, Vec<Measurement>)>) -> Vec<(K, Measurement)> {
    runs.into_iter().map(|(k, v)| (k, median(v))).collect()
}

/// The measurement of `key`.
fn pick<K: PartialEq + Copy>(results: &[(K, Measurement)], key: K) -> Result<Measurement> {
    results
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, m)| m.clone())
        .context("missing measurement")
}

/// "Paddock VERSION at COMMIT", for the sections' prose.
fn paddock_version() -> String {
    git_commit().map_or_else(
        || format!("Paddock {}", env!("CARGO_PKG_VERSION")),
        |c| format!("Paddock {} at {c}", env!("CARGO_PKG_VERSION")),
    )
}

/// The round with the median rate.
fn median(mut xs: Vec<Measurement>) -> Measurement {
    xs.sort_by(|a, b| a.result.per_sec().total_cmp(&b.result.per_sec()));
    xs.swap_remove(xs.len() / 2)
}

fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `pdk-bench-peers profile [FILE] [new|relay|hyper-relay]`: `perf record` (call graphs by DWARF
/// unwinding) of the Paddock process in `CONNECT` mode during 10 s of keep-alive load, or of
/// a new connection per request with `new`, or of a relay floor's process under keep-alive
/// with `relay` or `hyper-relay`; written to FILE for `perf report`. With `PDK_PERF_EVENTS=LIST`
/// it runs `perf stat -e LIST` instead (system calls, context switches per request: divide
/// by the request count it prints). Nothing is recorded in BENCHMARKS.md.
fn profile(lab: &Lab, out: &str, mode: Mode, workload: Workload) -> Result<()> {
    lab.measure(mode, workload, WARM_MS)?;
    let pid = lab.proxy_pid(mode).context("no proxy process")?;
    let events = std::env::var("PDK_PERF_EVENTS").ok();
    let mut perf = Command::new("perf");
    match &events {
        Some(e) => perf.args(["stat", "-e", e, "-o", out, "-p"]),
        None => perf.args([
            "record",
            "-F",
            "499",
            "--call-graph",
            "dwarf,16384",
            "-o",
            out,
            "-p",
        ]),
    };
    let mut perf = perf
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .spawn()
        .context("perf record (Debian's linux-perf)")?;
    let measured = lab.measure(mode, workload, 10_000);
    // perf writes its file on SIGINT.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(perf.id()).unwrap_or(0)),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = perf.wait();
    let m = measured?;
    eprintln!(
        "bench peers profile: {:.0} {} requests/s ({} requests) through {}; perf data in {out}",
        m.result.per_sec(),
        workload.label(),
        m.result.requests,
        mode.label()
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("loadgen") {
        return loadgen_main(args.get(2).map_or("", String::as_str));
    }
    if args.get(1).map(String::as_str) == Some("relay") {
        return relay_main(args.get(2).map_or("", String::as_str), args.get(3));
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("bench peers needs root (namespaces, cgroups, eBPF, squid)");
    }
    peers::ensure_squid()?;
    if args.get(1).map(String::as_str) == Some("workers") {
        return workers_main();
    }
    let lab = Lab::new(None)?;
    if args.get(1).map(String::as_str) == Some("profile") {
        let (mode, workload) = match args.get(3).map(String::as_str) {
            Some("new") => (Mode::PaddockConnect, Workload::NewConnection),
            Some("relay") => (Mode::Relay, Workload::KeepAlive),
            Some("hyper-relay") => (Mode::HyperRelay, Workload::KeepAlive),
            _ => (Mode::PaddockConnect, Workload::KeepAlive),
        };
        return profile(
            &lab,
            args.get(2).map_or("perf.data", String::as_str),
            mode,
            workload,
        );
    }

    // Warm every path: leaves forged (both proxies), upstream connections, page cache.
    for mode in Mode::ALL {
        for w in Workload::ALL.into_iter().filter(|w| mode.runs(*w)) {
            lab.measure(mode, w, WARM_MS)?;
        }
    }
    let mut runs: Vec<((Mode, Workload), Vec<Measurement>)> = Mode::ALL
        .iter()
        .flat_map(|m| {
            Workload::ALL
                .iter()
                .filter(|w| m.runs(**w))
                .map(move |w| ((*m, *w), Vec::new()))
        })
        .collect();
    for round in 0..ROUNDS {
        // Rotate the order, so no mode always follows the same one.
        for i in 0..Mode::ALL.len() {
            let mode = Mode::ALL[(i + round) % Mode::ALL.len()];
            for w in Workload::ALL.into_iter().filter(|w| mode.runs(*w)) {
                let m = lab.measure(mode, w, SECONDS * 1000)?;
                eprintln!(
                    "bench peers: round {}/{ROUNDS}: {} {}: {:.0}/s",
                    round + 1,
                    mode.label(),
                    w.label(),
                    m.result.per_sec()
                );
                if let Some((_, v)) = runs.iter_mut().find(|(k, _)| *k == (mode, w)) {
                    v.push(m);
                }
            }
        }
    }
    drop(lab);
    let rounds = by_round(&runs)?;
    let results = medians(runs);
    print_section(&|mode, w| pick(&results, (mode, w)))?;
    println!("\n{rounds}");
    Ok(())
}

/// The targets' figures round by round (each pair measured minutes apart in the same lab),
/// so the spread behind each median is on record.
fn by_round(runs: &[((Mode, Workload), Vec<Measurement>)]) -> Result<String> {
    let of = |mode, w| {
        runs.iter()
            .find(|(k, _)| *k == (mode, w))
            .map(|(_, v)| v.as_slice())
            .context("missing measurements")
    };
    let list = |xs: Vec<f64>| {
        xs.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cpu = |mode| -> Result<String> {
        Ok(list(
            of(mode, Workload::KeepAlive)?
                .iter()
                .map(|m| m.per_request(m.proxy_ticks.unwrap_or(0)) / m.per_request(m.nginx_ticks))
                .collect(),
        ))
    };
    let rate = |mode, w| -> Result<String> {
        let base = of(
            if w == Workload::KeepAlive {
                Mode::Squid
            } else {
                Mode::Direct
            },
            w,
        )?;
        Ok(list(
            of(mode, w)?
                .iter()
                .zip(base)
                .map(|(m, b)| m.result.per_sec() / b.result.per_sec())
                .collect(),
        ))
    };
    Ok(format!(
        "Round by round (cooperative; transparent): proxy CPU per keep-alive request against \
         nginx's {}; {}. Keep-alive rate against squid's in the same round {}; {}. New \
         connection per request, rate against direct in the same round {}; {}.",
        cpu(Mode::PaddockConnect)?,
        cpu(Mode::PaddockTransparent)?,
        rate(Mode::PaddockConnect, Workload::KeepAlive)?,
        rate(Mode::PaddockTransparent, Workload::KeepAlive)?,
        rate(Mode::PaddockConnect, Workload::NewConnection)?,
        rate(Mode::PaddockTransparent, Workload::NewConnection)?,
    ))
}

#[expect(
    clippy::too_many_lines,
    reason = "the section's prose and table, printed in order"
)]
fn print_section(get: &dyn Fn(Mode, Workload) -> Result<Measurement>) -> Result<()> {
    let paddock = paddock_version();
    println!("## Peers: squid ssl-bump vs Paddock (`cargo xtask bench peers`)\n");
    println!(
        "One run, one lab: nginx (`{nginx}`, one worker) serves a 25-byte static file over TLS \
         (test CA) in a test-host network namespace; the proxies and the load generator share \
         an agent namespace linked to it by a veth pair. Every mode uses the same load \
         generator, the bench's own (Rust: tokio + hyper 1 client + rustls, one thread, \
         `http/1.1` only, no TLS session resumption; `wrk` cannot send `CONNECT`): {CONNECTIONS} \
         connections for {SECONDS} s, either keep-alive (requests back to back on each \
         connection; latency from sending to the last body byte) or a new connection per \
         request (`Connection: close`: a TCP connect and a full TLS handshake per request, on \
         both legs through a proxy; latency from the connect). Modes: **direct** (to nginx, \
         trusting the test CA); **squid** (`{squid}`, Debian's `squid-openssl`: the client \
         sends `CONNECT {HOST}:443` to `http_port ... ssl-bump`, bumped at step 1 (a leaf for \
         the `CONNECT` name from `security_file_certgen`, signed by its own CA and cached; \
         peeking at the ClientHello first made squid mint one per connection, a third of the \
         new-connection rate, so it runs its faster set-up), upstream trusting the test \
         CA, `cache deny all`, no access log, one process (`-N`), names from a hosts file, \
         started as root and running as `proxy`); **Paddock cooperative** (`paddock-proxy \
         serve`, {paddock}, release build, its default {workers} async worker thread(s) for \
         {cpus} CPUs: the same `CONNECT` to its `listen.connect` \
         listener; static allow-list policy, `--audit none`, names from a hosts file); \
         **Paddock transparent** (the same process: the load generator runs in an agent \
         cgroup whose connects the eBPF programs redirect to its transparent listener, and \
         connects to the test host as in direct). Through a proxy the client trusts only that \
         proxy's CA. {ROUNDS} interleaved rounds (each runs every mode and workload, the order \
         of modes rotated), after a 1 s warm-up of each; the table shows the round with the \
         median rate. Any non-2xx answer or failed connection fails the run. CPU per request: \
         utime+stime from `/proc/PID/stat` (the whole thread group, plus its live child \
         processes) read just before and after the measured requests, divided by the \
         requests answered; proxy = squid with its certificate helpers, or the paddock-proxy \
         process (all threads); nginx = master and worker; load generator = its process. \
         Kernel {kernel}, {cpus} CPUs shared by all of them.\n",
        nginx = peers::nginx_version(),
        squid = peers::squid_version(),
        kernel = kernel(),
        cpus = cpus(),
        workers = paddock_workers(),
    );
    println!(
        "| workload | mode | requests/s | p50 (ms) | p99 (ms) | rate vs direct | proxy CPU \
         (us/req) | nginx CPU (us/req) | load generator CPU (us/req) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for w in Workload::ALL {
        let direct = get(Mode::Direct, w)?;
        for mode in Mode::ALL.into_iter().filter(|m| m.runs(w)) {
            let m = get(mode, w)?;
            let r = &m.result;
            let proxy = m
                .proxy_ticks
                .map_or_else(|| "-".to_owned(), |t| format!("{:.1}", m.per_request(t)));
            println!(
                "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {proxy} | {:.1} | {:.1} |",
                w.label(),
                mode.label(),
                r.per_sec(),
                f64::from(r.p50_us) / 1000.0,
                f64::from(r.p99_us) / 1000.0,
                r.per_sec() / direct.result.per_sec(),
                m.per_request(m.nginx_ticks),
                m.per_request(m.loadgen_ticks),
            );
        }
    }
    let rate = |mode, w| get(mode, w).map(|m| m.result.per_sec());
    let vs_squid = |mode, w| -> Result<f64> { Ok(rate(mode, w)? / rate(Mode::Squid, w)?) };
    let cpu_vs_nginx = |mode| -> Result<f64> {
        let m = get(mode, Workload::KeepAlive)?;
        Ok(m.per_request(m.proxy_ticks.unwrap_or(0)) / m.per_request(m.nginx_ticks))
    };
    let (ka_c, ka_t) = (
        vs_squid(Mode::PaddockConnect, Workload::KeepAlive)?,
        vs_squid(Mode::PaddockTransparent, Workload::KeepAlive)?,
    );
    let (nc_c, nc_t) = (
        vs_squid(Mode::PaddockConnect, Workload::NewConnection)?,
        vs_squid(Mode::PaddockTransparent, Workload::NewConnection)?,
    );
    let (cpu_c, cpu_t, cpu_s) = (
        cpu_vs_nginx(Mode::PaddockConnect)?,
        cpu_vs_nginx(Mode::PaddockTransparent)?,
        cpu_vs_nginx(Mode::Squid)?,
    );
    println!(
        "\nPaddock vs squid, keep-alive: {ka_c:.2}x squid's rate cooperative, {ka_t:.2}x \
         transparent; new connection per request: {nc_c:.2}x cooperative, {nc_t:.2}x \
         transparent. Proxy CPU per keep-alive request vs nginx's own for the same request: \
         Paddock {cpu_c:.2}x cooperative, {cpu_t:.2}x transparent; squid {cpu_s:.2}x. Issue \
         13's targets are at least 3x squid's keep-alive rate ({}) and at most 1.5x nginx's \
         CPU per keep-alive request ({}).",
        met(ka_c.min(ka_t) >= 3.0),
        met(cpu_c.max(cpu_t) <= 1.5),
    );
    let proxy_ka = |mode| {
        get(mode, Workload::KeepAlive).map(|m| {
            let proxy = m.per_request(m.proxy_ticks.unwrap_or(0));
            (proxy, proxy / m.per_request(m.nginx_ticks))
        })
    };
    let (bytes, bytes_x) = proxy_ka(Mode::Relay)?;
    let (hyper, hyper_x) = proxy_ka(Mode::HyperRelay)?;
    let (coop, _) = proxy_ka(Mode::PaddockConnect)?;
    let (transparent, _) = proxy_ka(Mode::PaddockTransparent)?;
    println!(
        "\nThe two floors (`paddock_tests::relay`, keep-alive only: each opens one upstream \
         connection per client connection) run on the same runtime with the same worker \
         count and rustls with Paddock's own providers and suite order; each answers the \
         `CONNECT`, presents nginx's certificate and completes both handshakes. The byte \
         relay then copies decrypted bytes both ways (no HTTP parsed, nothing checked, \
         rewritten or audited): {bytes:.1} us per keep-alive request, {bytes_x:.2}x nginx's \
         own, the cost of two TLS legs and four socket calls. The hyper relay forwards each \
         request untouched with hyper's HTTP/1.1 server and client connection (its own task, \
         as hyper-util's pool runs it): {hyper:.1} us, {hyper_x:.2}x nginx's. Per request, \
         hyper's HTTP/1.1 machinery costs {:.1} us over the byte relay and Paddock's own work \
         (policy, rewriting, pool, wrappers) {:.1} us (cooperative) and {:.1} us \
         (transparent) over the hyper relay. Keep-alive rate against squid's: the byte relay \
         {:.2}x, the hyper relay {:.2}x; the load generator and nginx share the same {} CPUs, \
         so a proxy that did nothing at all would serve little more.",
        hyper - bytes,
        coop - hyper,
        transparent - hyper,
        vs_squid(Mode::Relay, Workload::KeepAlive)?,
        vs_squid(Mode::HyperRelay, Workload::KeepAlive)?,
        cpus(),
    );
    let nginx_nc = |mode| get(mode, Workload::NewConnection).map(|m| m.per_request(m.nginx_ticks));
    println!(
        "\nWith a new connection per request, nginx spends {:.0} us per request direct, \
         {:.0} us behind squid and {:.0} us behind Paddock (cooperative): a proxy that keeps its upstream \
         connections beyond the client's spares nginx most handshakes, so the \
         proxy's own CPU is the cost to compare.",
        nginx_nc(Mode::Direct)?,
        nginx_nc(Mode::Squid)?,
        nginx_nc(Mode::PaddockConnect)?,
    );
    println!(
        "\nsquid runs one process (its design: one event loop; SMP workers are separate \
         processes with their own caches) and so uses at most one CPU; Paddock ran {} async \
         worker thread(s) (its default: half the CPUs, see `paddock_app::runtime`). With {} \
         CPUs shared by the client, the proxy and nginx, the rates measure CPU per request \
         more than latency. Compare ratios within one run, not absolute rates across runs.",
        paddock_workers(),
        cpus()
    );
    Ok(())
}

/// The worker threads the `paddock-proxy serve` under test starts (it inherits this
/// process's environment).
fn paddock_workers() -> std::num::NonZeroUsize {
    use paddock_app::runtime::{TOKIO_WORKER_THREADS_ENV, WORKER_THREADS_ENV, resolve};
    let ours = std::env::var(WORKER_THREADS_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    resolve(ours, std::env::var_os(TOKIO_WORKER_THREADS_ENV).as_deref())
        .unwrap_or_else(|_| paddock_app::runtime::default_here())
}

fn met(yes: bool) -> &'static str {
    if yes { "met" } else { "not met" }
}
