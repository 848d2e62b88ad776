//! `cargo xtask bench e2e`: HTTPS requests through the whole of `paddock-proxy run` (eBPF
//! redirect, TLS interception, embedded broker) vs the same requests made directly, in one
//! run. Prints a markdown section for BENCHMARKS.md on stdout.
//!
//! The lab is the end-to-end test's (`tests/tests/run_e2e.rs`): a test-host namespace linked
//! to the root namespace ([`HostLink`]) running nginx with a certificate from a test CA, and
//! [`DnsResponder`] answering the proxy's lookups. Three modes, interleaved over rounds:
//!
//! * direct: `wrk` in the root namespace, outside any agent cgroup, sending the real bearer;
//! * MITM only: `wrk` as the command of `paddock-proxy run`, no placeholder in the request
//!   (the proxy finds none, so the broker is asked once per connection, never per request);
//! * MITM + substitution: the same, with `Authorization: Bearer $API_BEARER` (the run's
//!   placeholder), so the broker substitutes the real bearer on every request.
//!
//! nginx answers 401 to any `Authorization` other than the real bearer (absent is fine), and
//! any non-2xx response fails the benchmark: a substitution that did not happen cannot be
//! measured as a fast one.
//!
//! Why `wrk`: one load generator for every mode (C, cheap on the two shared CPUs), already
//! used by `bench proxy`. It resolves names with getaddrinfo, so every `wrk` (and, for the
//! through modes, the whole `paddock-proxy run`) runs in a private mount namespace with a
//! hosts file naming the test host bind-mounted on `/etc/hosts`; the proxy itself resolves
//! through the DNS responder (`--nameserver`), as in the end-to-end test.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use paddock_tests::{
    HostLink,
    process::{Placement, run, target_bin},
    proxied::{DnsResponder, Nginx, make_upstream_certs},
    wrk::{self, Sample, cpus, kernel},
};

const HOST: &str = "api.paddock.test";
const SECRET: &str = "real-bench-bearer-4c1d9e07aa";
const SECONDS: u32 = 5;
const CONNECTIONS: u32 = 8;
const ROUNDS: usize = 5;
/// The broker's per-run substitution limit (default 50/s, burst 100) is a policy knob, not a
/// cost of the path: raised far above what the path can carry, so it never answers 403 here.
const SUBSTITUTE_RATE: &str = "1000000";
/// The body nginx returns (25 bytes, like `bench proxy`'s static file).
const BODY: &str = "hello from the test host\n";

const POLICY: &str = r#"
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: bench-e2e}
spec:
  appliesTo: {namespaces: [local]}
  credentials:
    - name: bearer
      provider: {kind: user-secret, inject: {header: {name: Authorization, prefix: "Bearer "}}}
      secret: {file: bearer.txt}
      hosts: [api.paddock.test]
      env: API_BEARER
  egress:
    - {hosts: [api.paddock.test], ports: [443], substituteAuth: true}
"#;

fn url() -> String {
    format!("https://{HOST}/api")
}

/// `wrk` arguments for one measured run (`auth`: the `Authorization` value, if any).
fn wrk_args(seconds: u32, auth: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "-t1".to_owned(),
        format!("-c{CONNECTIONS}"),
        format!("-d{seconds}s"),
        "--latency".to_owned(),
    ];
    if let Some(a) = auth {
        args.extend(["-H".to_owned(), format!("Authorization: {a}")]);
    }
    args.push(url());
    args
}

/// The command-side `wrk` line; with `placeholder`, the command's shell expands the run's
/// placeholder into the header (only the command ever sees it).
fn agent_wrk(seconds: u32, placeholder: bool) -> String {
    let quoted = wrk_args(seconds, None)
        .into_iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let auth = if placeholder {
        " -H \"Authorization: Bearer $API_BEARER\""
    } else {
        ""
    };
    format!("wrk{auth} {quoted}")
}

/// Everything both paths share; removed on drop.
struct Lab {
    _nginx: Nginx,
    _dns: DnsResponder,
    link: HostLink,
    hosts: PathBuf,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pdk-bench-e2e-")
            .tempdir()?;
        let d = dir.path();
        let link = HostLink::new();
        make_upstream_certs(d, &[HOST]);
        let dns = DnsResponder::start(
            &link.upstream,
            SocketAddr::from((link.host_ip, 53)),
            vec![(HOST.to_owned(), link.host_ip.into())],
        );
        let api = format!(
            r#"location = /api {{
            if ($http_authorization !~ "^(|Bearer {SECRET})$") {{ return 401; }}
            default_type text/plain;
            return 200 "{}";
        }}"#,
            BODY.escape_default()
        );
        let nginx = Nginx::start_with(
            &link.upstream,
            d,
            SocketAddr::from(([127, 0, 0, 1], 9)),
            SocketAddr::from((link.host_ip, 443)),
            &api,
        );
        let secrets = d.join("secrets");
        std::fs::create_dir(&secrets)?;
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700))?;
        std::fs::write(secrets.join("bearer.txt"), SECRET)?;
        std::fs::set_permissions(
            secrets.join("bearer.txt"),
            std::fs::Permissions::from_mode(0o600),
        )?;
        std::fs::write(d.join("policy.yaml"), POLICY)?;
        // Read by the command's unprivileged user through the bind mount.
        let hosts = d.join("hosts");
        let base = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        std::fs::write(&hosts, format!("{base}\n{} {HOST}\n", link.host_ip))?;
        std::fs::set_permissions(&hosts, std::fs::Permissions::from_mode(0o644))?;
        Ok(Self {
            _nginx: nginx,
            _dns: dns,
            link,
            hosts,
            dir,
        })
    }

    /// `unshare` running `program args` with the lab's hosts file on `/etc/hosts`.
    fn with_hosts(&self, program: &Path) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
            .arg(&self.hosts)
            .arg(program)
            .current_dir("/")
            .env("RUST_LOG", "warn");
        cmd
    }

    fn direct(&self) -> Result<Sample> {
        let mut cmd = self.with_hosts(Path::new("wrk"));
        cmd.args(wrk_args(SECONDS, Some(&format!("Bearer {SECRET}"))));
        let out = run(&mut cmd, &Placement::default());
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "direct wrk failed: {}\n{text}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        wrk::parse(&text)
    }

    /// `paddock-proxy run` with the lab's policy, secrets and test host, running `agent`.
    fn run_command(&self, run_id: &str, audit: &Path, agent: &str) -> Command {
        let d = self.dir.path();
        let s = |p: &Path| p.display().to_string();
        let mut cmd = self.with_hosts(&target_bin("paddock-proxy"));
        cmd.args(["run", "--policy", &s(&d.join("policy.yaml"))])
            .args(["--secrets", &s(&d.join("secrets"))])
            .args(["--allow-cidr", &format!("{}/24", self.link.host_ip)])
            .args(["--nameserver", &format!("{}:53", self.link.host_ip)])
            .args(["--upstream-ca", &s(&d.join("test-ca.crt"))])
            .args(["--audit", &s(audit)])
            .args(["--state-dir", &s(&d.join("state"))])
            .args(["--run-id", run_id])
            .args(["--substitute-rate", SUBSTITUTE_RATE])
            .args(["--", "sh", "-c", agent]);
        cmd
    }

    /// One `paddock-proxy run` whose command warms the path up, then measures MITM only and
    /// MITM + substitution (in the order `subst_first` says, alternated across rounds).
    fn through(&self, round: usize, subst_first: bool) -> Result<(Sample, Sample)> {
        let d = self.dir.path();
        let mitm = format!("echo '== mitm'; {}", agent_wrk(SECONDS, false));
        let subst = format!("echo '== subst'; {}", agent_wrk(SECONDS, true));
        let (first, second) = if subst_first {
            (subst, mitm)
        } else {
            (mitm, subst)
        };
        // Warm-up: forged leaf, egress decision, upstream pool, broker connection.
        let agent = format!(
            "set -e; {} >/dev/null; {first}; {second}",
            agent_wrk(1, true)
        );
        let audit = d.join(format!("audit-{round}.jsonl"));
        let mut cmd = self.run_command(&format!("bench-e2e-{round}"), &audit, &agent);
        let out = run(&mut cmd, &Placement::default());
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "paddock-proxy run failed: {}\n{text}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if text.contains(SECRET) {
            bail!("the command saw the real bearer");
        }
        // The requests crossed the proxy: its audit trail has them.
        let trail = std::fs::read_to_string(&audit)
            .with_context(|| format!("no audit log at {}", audit.display()))?;
        if !trail
            .lines()
            .any(|l| l.contains("\"allow\"") && l.contains(HOST))
        {
            bail!("the proxy audited no allowed request to {HOST}:\n{trail}");
        }
        let section = |name: &str| -> Result<Sample> {
            let part = text
                .split(&format!("== {name}"))
                .nth(1)
                .with_context(|| format!("no {name} output:\n{text}"))?;
            wrk::parse(part.split("== ").next().unwrap_or(part)).with_context(|| {
                format!(
                    "{name} through paddock-proxy run; its log:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        };
        Ok((section("mitm")?, section("subst")?))
    }
}

/// The soak sends at least this many requests: `wrk` runs in segments of
/// `SOAK_SEGMENT_SECONDS` until the total is reached (at most `SOAK_MAX_SEGMENTS`).
const SOAK_REQUESTS: u64 = 1_000_000;
const SOAK_SEGMENT_SECONDS: u32 = 10;
const SOAK_MAX_SEGMENTS: u32 = 60;
/// Sampling period of the soak.
const SOAK_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Resident memory (KiB) and open descriptors of process `pid`, or `None` once it is gone.
fn footprint(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

/// `--soak`: one long run with a substitution on every request, the `paddock-proxy run`
/// process's memory and descriptors sampled every 10 s.
#[expect(
    clippy::too_many_lines,
    reason = "one sequence: start, sample, check the count, print the section"
)]
fn soak(lab: &Lab) -> Result<()> {
    let d = lab.dir.path();
    let audit = d.join("audit-soak.jsonl");
    // The command counts: wrk segments until a million requests went through.
    let agent = format!(
        "total=0; n=0; \
         while [ \"$total\" -lt {SOAK_REQUESTS} ] && [ \"$n\" -lt {SOAK_MAX_SEGMENTS} ]; do \
           out=$({} 2>&1) || {{ echo \"$out\"; exit 1; }}; \
           echo \"$out\"; \
           got=$(printf '%s\\n' \"$out\" | awk '/ requests in /{{print $1}}'); \
           total=$((total + got)); n=$((n + 1)); \
         done; echo \"== total $total in $n\"",
        agent_wrk(SOAK_SEGMENT_SECONDS, true)
    );
    let mut cmd = lab.run_command("bench-soak", &audit, &agent);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("spawning paddock-proxy run")?;
    // `unshare` and `sh` exec into paddock-proxy: the child's pid is the proxy's.
    let pid = child.id();
    let started = std::time::Instant::now();
    let mut samples = Vec::new();
    let deadline = started
        + std::time::Duration::from_secs(u64::from(SOAK_SEGMENT_SECONDS * SOAK_MAX_SEGMENTS) + 120);
    loop {
        std::thread::sleep(SOAK_EVERY);
        if child.try_wait()?.is_some() || std::time::Instant::now() >= deadline {
            break;
        }
        if let Some(f) = footprint(pid) {
            samples.push((started.elapsed().as_secs(), f));
        }
    }
    if child.try_wait()?.is_none() {
        let _ = child.kill();
        bail!("the soak did not finish within its bound");
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "soak run failed: {}\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (total, segments) = text
        .lines()
        .find_map(|l| l.strip_prefix("== total "))
        .and_then(|rest| {
            let (t, n) = rest.split_once(" in ")?;
            Some((t.trim().parse::<u64>().ok()?, n.trim().parse::<u32>().ok()?))
        })
        .context("no total from the soak command")?;
    if total < SOAK_REQUESTS {
        bail!("only {total} requests in {segments} segments");
    }
    // Each segment's own figures; the table reports their medians.
    let parts: Vec<Sample> = text
        .split("Running ")
        .skip(1)
        .map(wrk::parse)
        .collect::<Result<_>>()?;
    let sample = wrk::median(parts);
    // The first sample is start-up; steady state from the second on.
    let steady: Vec<&(u64, (u64, usize))> = samples.iter().skip(1).collect();
    let (Some(first), Some(last)) = (steady.first(), steady.last()) else {
        bail!("too few samples: {samples:?}");
    };
    let max_rss = steady.iter().map(|s| s.1.0).max().unwrap_or(0);
    let max_fds = steady.iter().map(|s| s.1.1).max().unwrap_or(0);
    println!("## Soak through `paddock-proxy run` (`cargo xtask bench soak`)\n");
    println!(
        "`wrk -t1 -c{CONNECTIONS} -d{SOAK_SEGMENT_SECONDS}s` keep-alive HTTPS GETs with a \
         placeholder substituted on every request, repeated by the command until {SOAK_REQUESTS} \
         requests went through (the lab of `bench e2e`: eBPF redirect, TLS interception, \
         embedded broker, reused grants, a JSONL audit line per request): {total} requests in \
         {segments} segments, median segment {:.0} requests/s (p50 {:.2} ms, p99 {:.2} ms); the \
         `paddock-proxy run` process's resident memory (`VmRSS`) and open descriptors sampled \
         every {} s; kernel {}, {} CPUs.\n",
        sample.per_sec,
        sample.p50_ms,
        sample.p99_ms,
        SOAK_EVERY.as_secs(),
        kernel(),
        cpus()
    );
    println!("| seconds | RSS (MiB) | descriptors |");
    println!("|---:|---:|---:|");
    for (t, (rss, fds)) in &samples {
        #[expect(clippy::cast_precision_loss, reason = "KiB of one process")]
        let mib = *rss as f64 / 1024.0;
        println!("| {t} | {mib:.1} | {fds} |");
    }
    #[expect(clippy::cast_precision_loss, reason = "KiB of one process")]
    let growth = (last.1.0 as f64 - first.1.0 as f64) / 1024.0;
    println!(
        "\nFrom the first steady sample ({} s) to the last ({} s): RSS {:+.1} MiB (peak {:.1} MiB), \
         descriptors {} -> {} (peak {max_fds}).",
        first.0,
        last.0,
        growth,
        {
            #[expect(clippy::cast_precision_loss, reason = "KiB of one process")]
            let peak = max_rss as f64 / 1024.0;
            peak
        },
        first.1.1,
        last.1.1
    );
    Ok(())
}

/// `--profile PREFIX`: `perf record` (DWARF call graphs) of one `paddock-proxy run` per
/// phase, MITM only to `PREFIX-mitm.data` and MITM + substitution to `PREFIX-subst.data`,
/// each running its phase's `wrk` for 10 s after a 1 s warm-up; perf follows the run's
/// children too (report with `--comm paddock-proxy`). Prints each phase's rate, so samples
/// per request compare the phases' CPU. Nothing is recorded in BENCHMARKS.md.
fn profile(lab: &Lab, prefix: &str) -> Result<()> {
    for (name, placeholder) in [("mitm", false), ("subst", true)] {
        let d = lab.dir.path();
        let agent = format!(
            "set -e; {} >/dev/null; echo '== {name}'; {}",
            agent_wrk(1, placeholder),
            agent_wrk(10, placeholder)
        );
        let audit = d.join(format!("audit-profile-{name}.jsonl"));
        let proxy = lab.run_command(&format!("bench-e2e-profile-{name}"), &audit, &agent);
        let out_file = format!("{prefix}-{name}.data");
        let mut cmd = Command::new("perf");
        cmd.args(["record", "-F", "499", "--call-graph", "dwarf,16384", "-o"])
            .arg(&out_file)
            .arg("--")
            .arg(proxy.get_program())
            .args(proxy.get_args())
            .envs(proxy.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
            .current_dir("/");
        let out = run(&mut cmd, &Placement::default());
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("profile {name}: {}\n{text}", out.status);
        }
        let sample = wrk::parse(text.split(&format!("== {name}")).nth(1).unwrap_or(&text))?;
        eprintln!(
            "bench e2e profile: {name}: {:.0} requests/s for 10 s; perf data in {out_file}",
            sample.per_sec
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench e2e needs root (paddock-proxy run: eBPF, cgroups; namespaces)");
    }
    let soak_only = std::env::args().any(|a| a == "--soak");
    let profile_to = std::env::args().skip_while(|a| a != "--profile").nth(1);
    // The DNS responder runs on this runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    let lab = Lab::new()?;
    if soak_only {
        return soak(&lab);
    }
    if let Some(prefix) = profile_to {
        return profile(&lab, &prefix);
    }

    // Warm the direct path (nginx, page cache) too.
    lab.direct()?;
    let (mut direct, mut mitm, mut subst) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        direct.push(lab.direct()?);
        let (m, s) = lab.through(round, round % 2 == 1)?;
        mitm.push(m);
        subst.push(s);
        eprintln!(
            "bench e2e: round {}/{ROUNDS}: direct {:.0}/s, mitm {:.0}/s, subst {:.0}/s",
            round + 1,
            direct[round].per_sec,
            m.per_sec,
            s.per_sec
        );
    }
    drop(lab);
    // Each round runs both phases in one `run`: their ratio within a round is the fairest.
    let mut ratios: Vec<f64> = mitm
        .iter()
        .zip(&subst)
        .map(|(m, s)| s.per_sec / m.per_sec)
        .collect();
    let by_round = ratios
        .iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    ratios.sort_by(f64::total_cmp);
    let paired = ratios[ratios.len() / 2];
    let (direct, mitm, subst) = (wrk::median(direct), wrk::median(mitm), wrk::median(subst));

    println!("## End to end (`cargo xtask bench e2e`)\n");
    println!(
        "`wrk -t1 -c{CONNECTIONS} -d{SECONDS}s --latency` keep-alive HTTPS GETs of `https://{HOST}/api` \
         (nginx in a test-host netns, TLS with a test CA, 25-byte body; 401 unless the \
         `Authorization` is absent or the real bearer, and any non-2xx fails the run). \"direct\": \
         wrk outside any agent cgroup sending the real bearer. Through: wrk as the command of \
         `paddock-proxy run` (eBPF connect redirect, TLS interception with a forged leaf, \
         embedded broker, a JSONL audit line per connection and per request), after a 1 s \
         warm-up; \"MITM only\" sends no placeholder (one `validate-egress` per connection and \
         an egress re-check at most every 250 ms, no substitution), \"MITM + \
         substitution\" sends `Bearer $API_BEARER` so the real bearer is swapped in on every \
         request: the first request of a shape asks the embedded broker (`substitute-auth` over \
         its in-process link: same server, routes and authentication, no TCP or TLS), whose \
         answer comes back as a grant the proxy reuses (up to 1,024 requests or 10 s, taken \
         back over the invalidation stream on revoke); each request is still audited with its \
         credential and lease and its response scrubbed. The run's broker limit on \
         substitutions (default 50/s, burst 100, per run; beyond it requests get 403) is \
         raised with `--substitute-rate {SUBSTITUTE_RATE}`, so this measures the path, not the \
         limit. Median of {ROUNDS} interleaved rounds; release build; kernel {}, {} CPUs shared by wrk, nginx, the proxy and the \
         broker.\n",
        kernel(),
        cpus()
    );
    println!("| mode | requests/s | p50 (ms) | p99 (ms) | rate vs direct | p50 vs direct |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, s) in [
        ("direct", direct),
        ("through `run`, MITM only", mitm),
        ("through `run`, MITM + substitution", subst),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2}x |",
            s.per_sec,
            s.p50_ms,
            s.p99_ms,
            s.per_sec / direct.per_sec,
            s.p50_ms / direct.p50_ms
        );
    }
    println!(
        "\nPer request, substitution adds {:.2} ms at p50 over MITM only \
         ({:.2} -> {:.2} ms) and runs at {:.2}x its rate (ratio of the medians above). \
         Round by round, each pair in the same `run`: {by_round}; their median, the paired \
         figure that leaves out the spread between rounds, is {paired:.2}x. The whole path adds \
         {:.2} ms over direct.",
        subst.p50_ms - mitm.p50_ms,
        mitm.p50_ms,
        subst.p50_ms,
        subst.per_sec / mitm.per_sec,
        subst.p50_ms - direct.p50_ms
    );
    Ok(())
}
