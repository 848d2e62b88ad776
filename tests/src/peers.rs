//! Pieces of `cargo xtask bench peers`: CPU time of process trees from `/proc`, squid's
//! ssl-bump and `paddock-proxy serve` as separate processes (so each one's CPU is its own),
//! each in its own cgroup and killed with it on drop (also on panic).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    CgroupGuard, Netns, PinDir,
    process::{Placement, place},
};

/// One line of `/proc/PID/stat`: the parent and the CPU time (user + system, clock ticks) of
/// the whole thread group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub ppid: i32,
    pub ticks: u64,
}

/// Parses `/proc/PID/stat` text. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so the fields are counted from its last `)`.
#[must_use]
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find(" (")?;
    let pid = text[..open].trim().parse().ok()?;
    let close = text.rfind(')')?;
    // After the name: state(3) ppid(4) ... utime(14) stime(15).
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3).copied();
    let parent = field(4)?.parse().ok()?;
    let utime: u64 = field(14)?.parse().ok()?;
    let stime: u64 = field(15)?.parse().ok()?;
    Some(ProcStat {
        pid,
        ppid: parent,
        ticks: utime + stime,
    })
}

/// CPU ticks of `root` and every live descendant in `procs`.
#[must_use]
pub fn tree_ticks(procs: &[ProcStat], root: i32) -> u64 {
    let mut children: HashMap<i32, Vec<&ProcStat>> = HashMap::new();
    let mut by_pid = HashMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(p);
        by_pid.insert(p.pid, p);
    }
    let mut total = 0;
    let mut stack = vec![root];
    // Bounded: each pid is visited once (a pid cannot be its own ancestor).
    let mut seen = std::collections::HashSet::new();
    while let Some(pid) = stack.pop() {
        if !seen.insert(pid) {
            continue;
        }
        if let Some(p) = by_pid.get(&pid) {
            total += p.ticks;
        }
        if let Some(kids) = children.get(&pid) {
            stack.extend(kids.iter().map(|k| k.pid));
        }
    }
    total
}

/// Every process's `/proc/PID/stat` now (processes that vanish meanwhile are skipped).
#[must_use]
pub fn snapshot() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|t| parse_stat(&t))
        .collect()
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 where it cannot be read).
#[must_use]
pub fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// Microseconds of CPU per request for `ticks` spent on `requests`.
#[must_use]
pub fn micros_per_request(ticks: u64, per_second: u64, requests: u64) -> f64 {
    if requests == 0 || per_second == 0 {
        return 0.0;
    }
    #[expect(
        clippy::cast_precision_loss,
        reason = "tick and request counts stay far below 2^52"
    )]
    let (t, s, r) = (ticks as f64, per_second as f64, requests as f64);
    t * 1e6 / s / r
}

/// Waits (at most `within`) until `probe` accepts in `ns`, failing early when `child` exits.
fn wait_listening(
    child: &mut Child,
    ns: &Netns,
    probe: SocketAddr,
    within: Duration,
    log: &Path,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if ns
            .run(move || std::net::TcpStream::connect(probe).is_ok())
            .unwrap_or(false)
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "not listening on {probe} after {within:?}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, then SIGKILL after `grace`; always reaps.
fn stop(child: &mut Child, grace: Duration) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `apt-get install -y squid-openssl`, only when no `squid` is installed. A `squid` built
/// without OpenSSL (Debian's plain `squid`) cannot bump TLS: that is an error, not a reason
/// to replace someone's package.
pub fn ensure_squid() -> Result<()> {
    let installed = Command::new("squid")
        .arg("-v")
        .output()
        .ok()
        .filter(|o| o.status.success());
    let out = if let Some(o) = installed {
        o
    } else {
        eprintln!("bench peers: squid is missing; apt-get install -y squid-openssl");
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .context("run apt-get")
        };
        let install = ["install", "-y", "squid-openssl"];
        // A machine whose package lists were never fetched knows no squid-openssl yet.
        if !apt(&install)?.success() {
            apt(&["update"])?;
            let status = apt(&install)?;
            if !status.success() {
                bail!("apt-get install -y squid-openssl failed: {status}");
            }
        }
        Command::new("squid").arg("-v").output()?
    };
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains("--with-openssl") || !Path::new(CERTGEN).exists() {
        bail!(
            "this squid cannot bump TLS (no --with-openssl or no {CERTGEN}): install Debian's \
             squid-openssl instead of squid"
        );
    }
    Ok(())
}

/// `squid -v`'s first line.
#[must_use]
pub fn squid_version() -> String {
    Command::new("squid")
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default()
}

/// `nginx -v` (it prints on stderr).
#[must_use]
pub fn nginx_version() -> String {
    Command::new("nginx")
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default()
}

const CERTGEN: &str = "/usr/lib/squid/security_file_certgen";

/// squid with ssl-bump on a cooperative `http_port`, in its own private directory, cgroup and
/// shared-memory names; stopped (and everything in its cgroup killed) on drop.
#[derive(Debug)]
pub struct Squid {
    child: Child,
    service: String,
    /// The CA clients must trust (squid signs its forged leaves with it).
    pub ca: PathBuf,
    // Dropped after the process: kills its helpers too.
    _cgroup: CgroupGuard,
}

impl Squid {
    /// Starts squid in `ns` listening on `listen`, bumping `CONNECT`s to `host:443` (found at
    /// `host_ip` through a hosts file) and trusting `upstream_ca` for the upstream leg. Its
    /// files live in `dir/squid` (`dir` must be traversable by Debian's `proxy` user: squid
    /// refuses to run as root and drops to it).
    pub fn start(
        ns: &Netns,
        dir: &Path,
        listen: SocketAddr,
        host: &str,
        host_ip: std::net::IpAddr,
        upstream_ca: &Path,
    ) -> Result<Self> {
        let d = dir.join("squid");
        std::fs::create_dir(&d)?;
        crate::proxied::make_ca(&d, "ca", "squid bench CA");
        let pem = std::fs::read_to_string(d.join("ca.crt"))?
            + &std::fs::read_to_string(d.join("ca.key"))?;
        std::fs::write(d.join("ca.pem"), pem)?;
        std::fs::copy(upstream_ca, d.join("upstream-ca.crt"))?;
        std::fs::write(d.join("hosts"), format!("{host_ip} {host}\n"))?;
        let db = d.join("ssl_db");
        let out = Command::new(CERTGEN)
            .arg("-c")
            .arg("-s")
            .arg(&db)
            .args(["-M", "4MB"])
            .output()
            .context("security_file_certgen")?;
        if !out.status.success() {
            bail!(
                "security_file_certgen -c: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let p = |n: &str| d.join(n).display().to_string();
        // One process (`-N`: no daemon, no SMP kids), no disk or memory cache, no access log,
        // no ICMP pinger; names only from the hosts file, and any DNS query goes to loopback.
        // Bumped at step 1, with a leaf for the CONNECT name that squid caches: peeking at the
        // ClientHello first ("peek step1, bump all") made it mint a certificate through its
        // helper on every connection, a third of this rate for new connections, so the bench
        // gives squid its faster set-up, the one that does what Paddock's CONNECT mode does.
        let conf = format!(
            "http_port {listen} ssl-bump tls-cert={ca_pem} generate-host-certificates=on \
             dynamic_cert_mem_cache_size=4MB\n\
             sslcrtd_program {CERTGEN} -s {db} -M 4MB\n\
             sslcrtd_children 2 startup=1 idle=1\n\
             ssl_bump bump all\n\
             tls_outgoing_options cafile={upstream}\n\
             acl SSL_ports port 443\n\
             acl bench_host dstdomain {host}\n\
             http_access deny CONNECT !SSL_ports\n\
             http_access allow localhost bench_host\n\
             http_access deny all\n\
             cache deny all\n\
             cache_mem 0 MB\n\
             access_log none\n\
             cache_store_log none\n\
             cache_log {log}\n\
             pid_filename {pid}\n\
             coredump_dir {dir}\n\
             hosts_file {hosts}\n\
             dns_nameservers 127.0.0.1\n\
             pinger_enable off\n\
             netdb_filename none\n\
             icp_port 0\n\
             htcp_port 0\n\
             shutdown_lifetime 0 seconds\n\
             cache_effective_user proxy\n",
            ca_pem = p("ca.pem"),
            db = db.display(),
            upstream = p("upstream-ca.crt"),
            log = p("cache.log"),
            pid = p("squid.pid"),
            dir = d.display(),
            hosts = p("hosts"),
        );
        std::fs::write(d.join("squid.conf"), conf)?;
        let status = Command::new("chown")
            .args(["-R", "proxy:proxy"])
            .arg(&d)
            .status()?;
        if !status.success() {
            bail!("chown -R proxy:proxy {}: {status}", d.display());
        }
        // Shared-memory segments are named after the service: unique, so two runs (or a
        // system squid) never share them.
        let service = format!("pdkpeers{}", std::process::id());
        let cgroup = CgroupGuard::new("sq");
        let log = d.join("cache.log");
        let mut cmd = Command::new("squid");
        cmd.args(["-n", &service, "-N", "-f"])
            .arg(d.join("squid.conf"))
            .current_dir(&d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        place(
            &mut cmd,
            &Placement {
                netns: Some(ns),
                cgroup: Some(&cgroup),
                user: None,
            },
        );
        let child = cmd.spawn().context("spawn squid")?;
        let mut me = Self {
            child,
            service,
            ca: d.join("ca.crt"),
            _cgroup: cgroup,
        };
        wait_listening(&mut me.child, ns, listen, Duration::from_secs(20), &log)
            .context("squid did not start")?;
        Ok(me)
    }

    /// The squid process (its certificate helpers are its children).
    #[must_use]
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(-1)
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        stop(&mut self.child, Duration::from_secs(5));
        if let Ok(dir) = std::fs::read_dir("/dev/shm") {
            let prefix = format!("{}-", self.service);
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// `paddock-proxy serve` as its own process in its own cgroup, with a transparent listener
/// (the eBPF programs redirect `agents` to it) and a cooperative `CONNECT` listener; names
/// from a hosts file bind-mounted on `/etc/hosts` in a private mount namespace. Stopped on
/// drop.
#[derive(Debug)]
pub struct PaddockServe {
    child: Child,
    /// The run CA clients must trust.
    pub ca: PathBuf,
    // Dropped after the process: its cgroup (kills leftovers), then the pins.
    _cgroup: CgroupGuard,
    _pins: PinDir,
}

/// Where `paddock-proxy serve` listens for redirected connections (inside the namespace).
pub const PADDOCK_TRANSPARENT: &str = "127.0.0.1:15001";

impl PaddockServe {
    /// Starts `binary serve` in `ns`, allowing `host` on 443 (at `host_ip`, inside
    /// `allow_cidr`), trusting `upstream_ca` upstream, with its `CONNECT` listener on
    /// `connect`, audit off, with `worker_threads` (else its default). Files in
    /// `dir/paddock`.
    #[expect(
        clippy::too_many_arguments,
        reason = "each is a distinct piece of the lab the proxy is wired into"
    )]
    pub fn start(
        binary: &Path,
        ns: &Netns,
        dir: &Path,
        agents: &CgroupGuard,
        connect: SocketAddr,
        host: &str,
        host_ip: std::net::IpAddr,
        allow_cidr: &str,
        upstream_ca: &Path,
        worker_threads: Option<usize>,
    ) -> Result<Self> {
        let d = dir.join("paddock");
        std::fs::create_dir(&d)?;
        let p = |n: &str| d.join(n).display().to_string();
        std::fs::write(
            d.join("policy.toml"),
            format!("[[rule]]\nname = \"bench\"\nhosts = [\"{host}\"]\nports = [443]\n"),
        )?;
        let base = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        std::fs::write(d.join("hosts"), format!("{base}\n{host_ip} {host}\n"))?;
        let pins = PinDir::new();
        let config = format!(
            r#"run_id = "bench-peers"
[listen]
transparent = ["{PADDOCK_TRANSPARENT}"]
connect = "{connect}"
connect_reason = "bench peers: cooperative mode, compared with squid's"
[tls]
ca_dir = "{ca}"
generate_ca = true
upstream_ca_bundle = "{upstream}"
[policy]
file = "{policy}"
[network]
allow_cidrs = ["{allow_cidr}"]
use_hosts_file = true
nameservers = ["127.0.0.1:53"]
[limits]
drain_timeout_secs = 1
[ebpf]
pin_dir = "{pins}"
agent_cgroups = ["{agents}"]
"#,
            ca = p("ca"),
            upstream = upstream_ca.display(),
            policy = p("policy.toml"),
            pins = pins.path().display(),
            agents = agents.cgroup().path().display(),
        );
        std::fs::write(d.join("serve.toml"), config)?;
        let log = d.join("serve.log");
        let cgroup = CgroupGuard::new("pp");
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
            .arg(d.join("hosts"))
            .arg(binary)
            .args(
                worker_threads
                    .map(|n| vec!["--worker-threads".to_owned(), n.to_string()])
                    .unwrap_or_default(),
            )
            .args(["serve", "--audit", "none", "--config"])
            .arg(d.join("serve.toml"))
            .env("RUST_LOG", "warn,paddock_app::serve=info")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        place(
            &mut cmd,
            &Placement {
                netns: Some(ns),
                cgroup: Some(&cgroup),
                user: None,
            },
        );
        let child = cmd.spawn().context("spawn paddock-proxy serve")?;
        let mut me = Self {
            child,
            ca: d.join("ca/tls.crt"),
            _cgroup: cgroup,
            _pins: pins,
        };
        // "proxy ready" comes after the listeners are bound and the agents attached.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("proxy ready") {
                break;
            }
            if let Some(status) = me.child.try_wait()? {
                bail!("paddock-proxy serve exited ({status}): {text}");
            }
            if Instant::now() >= deadline {
                bail!("paddock-proxy serve not ready after 20 s: {text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        wait_listening(&mut me.child, ns, connect, Duration::from_secs(5), &log)?;
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", me.child.id()))?;
        if comm.trim() != "paddock-proxy" {
            bail!("expected paddock-proxy at the spawned pid, found {comm:?}");
        }
        Ok(me)
    }

    #[must_use]
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(-1)
    }
}

impl Drop for PaddockServe {
    fn drop(&mut self) {
        stop(&mut self.child, Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_names() {
        let line = "4242 (squid) x) (y) S 4200 4242 4242 0 -1 4194560 1000 0 0 0 \
                    123 45 6 7 20 0 1 0 100 1000000 500 18446744073709551615";
        let s = parse_stat(line).expect("parse");
        assert_eq!(
            s,
            ProcStat {
                pid: 4242,
                ppid: 4200,
                ticks: 168
            }
        );
        let plain = "7 (nginx) S 1 7 7 0 -1 0 0 0 0 0 10 20 0 0 20 0 1 0 5 0 0 0\n";
        assert_eq!(parse_stat(plain).map(|s| (s.ppid, s.ticks)), Some((1, 30)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (short) S 0 1"), None);
        assert_eq!(parse_stat("x (a) S 1 1 1 0 -1 0 0 0 0 0 1 2"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = i32::try_from(std::process::id()).expect("pid");
        let text = std::fs::read_to_string("/proc/self/stat").expect("stat");
        let s = parse_stat(&text).expect("parse own stat");
        assert_eq!(s.pid, me);
        assert_eq!(s.ppid, nix::unistd::getppid().as_raw());
        assert!(snapshot().iter().any(|p| p.pid == me));
        assert!(ticks_per_second() >= 1);
    }

    #[test]
    fn sums_a_tree_and_nothing_else() {
        let p = |pid, ppid, ticks| ProcStat { pid, ppid, ticks };
        let procs = [
            p(1, 0, 1000),
            p(10, 1, 5),
            p(11, 10, 7),
            p(12, 10, 11),
            p(13, 12, 13),
            p(20, 1, 17),
        ];
        assert_eq!(tree_ticks(&procs, 10), 5 + 7 + 11 + 13);
        assert_eq!(tree_ticks(&procs, 12), 24);
        assert_eq!(tree_ticks(&procs, 20), 17);
        assert_eq!(tree_ticks(&procs, 99), 0);
        // A cycle (pid reuse seen mid-scan) still ends.
        let cyclic = [p(2, 3, 1), p(3, 2, 1)];
        assert_eq!(tree_ticks(&cyclic, 2), 2);
    }

    #[test]
    fn cpu_per_request() {
        assert!((micros_per_request(250, 100, 100_000) - 25.0).abs() < 1e-9);
        assert!(micros_per_request(5, 100, 0).abs() < f64::EPSILON);
    }
}
