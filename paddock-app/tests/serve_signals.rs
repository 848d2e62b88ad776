//! `paddock-proxy serve` as an operator runs it (the binary, unprivileged, no eBPF): SIGHUP
//! reopens a rotated audit file (logrotate's `postrotate`), SIGTERM drains and exits 0.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Kills the proxy if the test panics before it stopped it.
struct Proxy(Child);

impl Proxy {
    fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.0.id()).expect("pid fits"));
        kill(pid, sig).expect("signal the proxy");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nothing listens on right now (the proxy binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Polls `cond` every 20 ms for at most `limit`.
fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

/// Asks the CONNECT listener for a host the policy does not list; returns the status line.
fn connect_denied(addr: SocketAddr, host: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n").expect("send CONNECT");
    let mut status = String::new();
    BufReader::new(s)
        .read_line(&mut status)
        .expect("read status");
    status
}

/// Writes a policy allowing one host and a `serve` config with `listen` (the `[listen]`
/// table's lines) and `audit` as the audit target; returns the config's path.
fn serve_config(dir: &Path, listen: &str, audit: &str) -> std::path::PathBuf {
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"api\"\nhosts = [\"api.paddock.test\"]\nports = [443]\n",
    )
    .expect("policy");
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "run_id = \"serve-test\"\n[listen]\n{listen}\n\
             [tls]\nca_dir = \"{ca}\"\ngenerate_ca = true\n\
             [policy]\nfile = \"{policy}\"\n\
             [audit]\ntarget = \"{audit}\"\n",
            ca = dir.join("ca").display(),
            policy = policy.display(),
        ),
    )
    .expect("config");
    config
}

/// Runs `cmd serve --config CONFIG` (global flags and environment already on `cmd`) until
/// its `CONNECT` listener at `connect` answers.
fn start_serve(mut cmd: Command, config: &Path, connect: SocketAddr) -> Proxy {
    let proxy = Proxy(
        cmd.args(["serve", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start paddock-proxy serve"),
    );
    wait_for(Duration::from_secs(20), "the CONNECT listener", || {
        TcpStream::connect(connect).is_ok()
    });
    proxy
}

#[test]
fn sighup_reopens_a_rotated_audit_file_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    let connect = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let transparent = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let config = serve_config(
        dir.path(),
        &format!(
            "transparent = [\"{transparent}\"]\nconnect = \"{connect}\"\n\
             connect_reason = \"serve_signals test\""
        ),
        &audit.display().to_string(),
    );

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_paddock-proxy"));
    cmd.env("RUST_LOG", "info");
    let proxy = start_serve(cmd, &config, connect);
    // The CONNECT listener's reason is on record before it accepts anything.
    let first = lines(&audit);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["kind"], "connect_reason");

    std::fs::rename(&audit, &rotated).expect("rotate");
    proxy.signal(Signal::SIGHUP);
    wait_for(Duration::from_secs(10), "the reopened audit file", || {
        audit.exists()
    });
    let status = connect_denied(connect, "other.paddock.test");
    assert!(status.starts_with("HTTP/1.1 403"), "{status:?}");

    let after = lines(&audit);
    assert_eq!(
        after.len(),
        1,
        "the denial lands in the new file: {after:?}"
    );
    assert_eq!(after[0]["kind"], "deny");
    assert_eq!(after[0]["sni"], "other.paddock.test");
    assert_eq!(lines(&rotated).len(), 1, "the rotated file is left alone");

    proxy.signal(Signal::SIGTERM);
    let mut proxy = proxy;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = proxy.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "serve did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "serve exited with {status}");
}

/// The runtime's worker threads (tokio names them), read from `/proc`.
fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task list")
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "tokio-rt-worker")
        })
        .count()
}

#[test]
fn serve_starts_the_worker_threads_it_is_given_and_refuses_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let connect = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let config = serve_config(
        dir.path(),
        &format!("connect = \"{connect}\"\nconnect_reason = \"worker threads test\""),
        "stdout",
    );

    let refused = Command::new(env!("CARGO_BIN_EXE_paddock-proxy"))
        .args(["--worker-threads", "0", "serve", "--config"])
        .arg(&config)
        .output()
        .expect("run paddock-proxy");
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--worker-threads"),
        "{refused:?}"
    );
    assert!(
        TcpStream::connect(connect).is_err(),
        "a refused start listens"
    );

    let refused = Command::new(env!("CARGO_BIN_EXE_paddock-proxy"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("TOKIO_WORKER_THREADS", "many")
        .output()
        .expect("run paddock-proxy");
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("TOKIO_WORKER_THREADS=many"),
        "{refused:?}"
    );

    for (how, expect) in [("flag", 3), ("env", 2), ("tokio env", 4)] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_paddock-proxy"));
        match how {
            // The flag wins over both variables, ours over tokio's.
            "flag" => cmd
                .args(["--worker-threads", "3"])
                .env("PADDOCK_WORKER_THREADS", "5")
                .env("TOKIO_WORKER_THREADS", "6"),
            "env" => cmd
                .env("PADDOCK_WORKER_THREADS", "2")
                .env("TOKIO_WORKER_THREADS", "6"),
            _ => cmd.env("TOKIO_WORKER_THREADS", "4"),
        };
        let proxy = start_serve(cmd, &config, connect);
        assert_eq!(worker_threads(proxy.0.id()), expect, "{how}");
        drop(proxy);
    }
}
