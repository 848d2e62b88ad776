//! `paddock-proxy serve` (the binary, unprivileged, no eBPF) facing a fault at start: an audit
//! trail it cannot write, a policy file it cannot use. It must refuse to start with one line
//! naming the cause, and leave no listener behind (RELIABILITY.md, fault matrix).

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

const POLICY: &str = "[[rule]]\nname = \"api\"\nhosts = [\"api.paddock.test\"]\nports = [443]\n";

/// Writes `proxy.toml` (a CONNECT listener when `connect` is set) and returns the listener
/// addresses: (transparent, CONNECT).
fn config(dir: &Path, audit: &Path, policy: &Path, connect: bool) -> (SocketAddr, SocketAddr) {
    let transparent = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let connect_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let connect_lines = if connect {
        format!("connect = \"{connect_addr}\"\nconnect_reason = \"serve_faults test\"\n")
    } else {
        String::new()
    };
    std::fs::write(
        dir.join("proxy.toml"),
        format!(
            "run_id = \"faults\"\n\
             [listen]\ntransparent = [\"{transparent}\"]\n{connect_lines}\
             [tls]\nca_dir = \"{ca}\"\ngenerate_ca = true\n\
             [policy]\nfile = \"{policy}\"\n\
             [audit]\ntarget = \"{audit}\"\n",
            ca = dir.join("ca").display(),
            policy = policy.display(),
            audit = audit.display(),
        ),
    )
    .expect("config");
    (transparent, connect_addr)
}

/// Runs `serve` to its end (bounded: a proxy that starts is killed and reported).
fn serve(dir: &Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_paddock-proxy"))
        .arg("serve")
        .arg("--config")
        .arg(dir.join("proxy.toml"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start paddock-proxy serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "serve started (or hung) instead of refusing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// `serve` exited 1 with one `paddock-proxy: ...` line holding every piece of `want`, and
/// nothing listens on the addresses it was given.
fn assert_refused(out: &Output, want: &[&str], listeners: &[SocketAddr]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("paddock-proxy: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    // The line, and what a multi-line cause (a TOML excerpt) adds below it.
    let from_line = &stderr[stderr.find(line).unwrap_or(0)..];
    for w in want {
        assert!(from_line.contains(w), "{w:?} not in {from_line:?}");
    }
    for addr in listeners {
        assert!(
            TcpStream::connect_timeout(addr, Duration::from_millis(500)).is_err(),
            "{addr} still accepts"
        );
    }
}

#[test]
fn an_audit_trail_that_cannot_be_opened_stops_serve_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let policy = d.join("policy.toml");
    std::fs::write(&policy, POLICY).expect("policy");
    let dir_target = d.join("a-directory");
    std::fs::create_dir(&dir_target).expect("dir");
    let missing = d.join("no-such-dir/audit.jsonl");
    let link = d.join("audit-link.jsonl");
    std::os::unix::fs::symlink(d.join("elsewhere.jsonl"), &link).expect("symlink");
    for (target, cause) in [
        (&dir_target, "Is a directory"),
        (&missing, "No such file or directory"),
        // Never written through a symlink (O_NOFOLLOW): someone else's file stays untouched.
        (&link, "symbolic links"),
    ] {
        let listeners = config(d, target, &policy, true);
        let out = serve(d);
        let path = target.display().to_string();
        assert_refused(
            &out,
            &["cannot open audit log", &path, cause],
            &[listeners.0, listeners.1],
        );
    }
    assert!(
        !d.join("elsewhere.jsonl").exists(),
        "written through the link"
    );
}

#[test]
fn a_full_audit_disk_at_start_stops_a_connect_listener_from_opening() {
    // /dev/full: every write fails with ENOSPC, as on a full disk. The CONNECT listener's
    // reason must be on record before it accepts anything, so it does not start.
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let policy = d.join("policy.toml");
    std::fs::write(&policy, POLICY).expect("policy");
    let (transparent, connect) = config(d, Path::new("/dev/full"), &policy, true);
    let out = serve(d);
    assert_refused(
        &out,
        &["cannot record the CONNECT listener's reason"],
        &[transparent, connect],
    );
}

#[test]
fn an_invalid_policy_file_stops_serve_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let audit = d.join("audit.jsonl");
    let policy = d.join("policy.toml");
    for (text, want) in [
        // A half-written file, as an editor or a failed copy leaves it.
        (
            "[[rule]]\nname = \"api\"\nhosts = [\"api.paddock.",
            "not valid TOML",
        ),
        // A misspelt key must not widen or narrow the policy silently.
        (
            "[[rule]]\nname = \"api\"\nhosts = [\"api.paddock.test\"]\nports = [443]\nportz = \"any\"\n",
            "portz",
        ),
        // A rule that would allow every host.
        (
            "[[rule]]\nname = \"all\"\nhosts = [\"*\"]\nports = \"any\"\n",
            "rule[0]",
        ),
    ] {
        std::fs::write(&policy, text).expect("policy");
        let listeners = config(d, &audit, &policy, true);
        let out = serve(d);
        let path = policy.display().to_string();
        assert_refused(
            &out,
            &["egress policy", &path, want],
            &[listeners.0, listeners.1],
        );
    }
    // Nothing was served, so nothing was recorded.
    assert!(
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .all(|l| !l.contains("\"allow\"")),
        "a connection was allowed"
    );
}
