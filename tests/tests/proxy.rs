//! Root tier: the proxy end to end through the eBPF path. Real clients (curl, Python) in an
//! intercepted cgroup trust the run CA; nginx with a test-CA certificate plays the internet in
//! its own namespace; the proxy resolves test names through a DNS responder the test runs.

use std::{
    path::Path,
    process::{Command, Output},
    time::Instant,
};

use paddock_tests::{
    process::run,
    proxied::{ADMIN, Lab},
    require_root,
};

struct Fixture {
    lab: Lab,
}

impl std::ops::Deref for Fixture {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.lab
    }
}

impl Fixture {
    /// `limits` is extra TOML for the proxy's `[limits]` table.
    fn new(limits: &str) -> Self {
        Self {
            lab: Lab::new(limits, None),
        }
    }

    fn run_agent(&self, cmd: &mut Command) -> Output {
        tokio::task::block_in_place(|| run(cmd, &self.agent()))
    }

    /// curl in the agent cgroup, `name` pinned to the test host (or to `addr`).
    fn curl(&self, name: &str, addr: &str, extra: &[&str], url_path: &str) -> Output {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "20", "--cacert", &self.ca()])
            .args(["--resolve", &format!("{name}:443:{addr}")])
            .args(extra)
            .arg(format!("https://{name}{url_path}"));
        self.run_agent(&mut cmd)
    }

    fn python(&self, script: &str) -> Output {
        let mut cmd = Command::new("python3");
        cmd.arg("-c").arg(script).env("PDK_CA", self.ca());
        self.run_agent(&mut cmd)
    }

    /// The admin endpoint's body for `path`, fetched from the agent namespace outside the
    /// intercepted cgroup (the admin listener is not on the data plane).
    fn admin(&self, path: &str) -> String {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "5"])
            .arg(format!("http://{ADMIN}{path}"));
        let out = tokio::task::block_in_place(|| run(&mut cmd, &self.beside_agent()));
        assert!(out.status.success(), "admin {path}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn rejections(&self, reason: &str) -> u64 {
        metric(
            &self.admin("/metrics"),
            &format!("paddock_proxy_rejections_total{{reason=\"{reason}\"}}"),
        )
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).map(str::trim))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed: {}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_over_http1_and_h2_through_the_ebpf_path() {
    if !require_root("get_over_http1_and_h2_through_the_ebpf_path") {
        return;
    }
    let f = Fixture::new("");
    let o = f.curl(
        "app.test",
        "10.77.0.1",
        &["--http1.1", "-w", "\n%{http_version}"],
        "/hello.txt",
    );
    assert_ok(&o, "curl --http1.1");
    assert_eq!(stdout(&o), "hello from the test host\n\n1.1");
    let o = f.curl(
        "app.test",
        "10.77.0.1",
        &["--http2", "-w", "\n%{http_version}"],
        "/hello.txt",
    );
    assert_ok(&o, "curl --http2");
    assert_eq!(
        stdout(&o),
        "hello from the test host\n\n2",
        "h2 must be negotiated end to end"
    );

    // The agent saw the run CA's forged leaf, not the upstream certificate.
    let o = f.curl(
        "app.test",
        "10.77.0.1",
        &["-v", "-o", "/dev/null"],
        "/hello.txt",
    );
    let verbose = String::from_utf8_lossy(&o.stderr);
    assert!(!verbose.contains("paddock upstream test CA"), "{verbose}");

    let audit = f.audit_lines();
    assert!(
        audit
            .iter()
            .any(|e| e["kind"] == "allow" && e["sni"] == "app.test" && e["rule"] == "test-hosts"),
        "{audit:?}"
    );
    let metrics = f.admin("/metrics");
    assert!(
        metric(
            &metrics,
            "paddock_proxy_connections_total{decision=\"allow\"}"
        ) >= 3,
        "{metrics}"
    );
    assert_eq!(f.admin("/healthz"), "ok\n");
    let ready = f.admin("/readyz");
    assert!(ready.starts_with(r#"{"ready":true,"#), "{ready}");
    for check in ["listeners", "audit", "ca"] {
        assert!(
            ready.contains(&format!(r#"{{"name":"{check}","ok":true"#)),
            "{check}: {ready}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_urllib_trusting_the_run_ca() {
    if !require_root("python_urllib_trusting_the_run_ca") {
        return;
    }
    let f = Fixture::new("");
    let o = f.python(
        r#"
import os, socket, ssl, urllib.request
real = socket.getaddrinfo
socket.getaddrinfo = lambda h, *a, **k: real("10.77.0.1" if h.endswith(".test") else h, *a, **k)
ctx = ssl.create_default_context(cafile=os.environ["PDK_CA"])
with urllib.request.urlopen("https://app.test/hello.txt", context=ctx, timeout=20) as r:
    print(r.status, r.read().decode().strip())
"#,
    );
    assert_ok(&o, "python urllib");
    assert_eq!(stdout(&o).trim(), "200 hello from the test host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn denied_host_gets_a_403_naming_host_and_reason() {
    if !require_root("denied_host_gets_a_403_naming_host_and_reason") {
        return;
    }
    let f = Fixture::new("");
    let o = f.curl("denied.test", "10.77.0.1", &["-w", "\n%{http_code}"], "/");
    assert_ok(&o, "curl denied.test");
    let body = stdout(&o);
    assert!(body.ends_with("\n403"), "{body}");
    assert!(body.contains("denied.test"), "{body}");
    assert!(
        body.contains("no egress rule allows denied.test:443"),
        "{body}"
    );
    assert_eq!(f.rejections("policy_denied"), 1);
    let audit = f.audit_lines();
    assert!(
        audit
            .iter()
            .any(|e| e["kind"] == "deny" && e["sni"] == "denied.test"),
        "{audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_sni_rebinding_and_denied_cidr_are_dropped() {
    if !require_root("no_sni_rebinding_and_denied_cidr_are_dropped") {
        return;
    }
    let f = Fixture::new("");
    // An IP-literal URL: curl sends no SNI.
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "-k",
        "https://10.77.0.1/hello.txt",
    ]);
    let o = f.run_agent(&mut cmd);
    assert!(
        !o.status.success(),
        "no SNI must be dropped: {}",
        stdout(&o)
    );
    assert_eq!(f.rejections("no_sni"), 1);

    let o = f.curl("rebind.test", "10.77.0.1", &[], "/hello.txt");
    assert!(
        !o.status.success(),
        "rebinding must be dropped: {}",
        stdout(&o)
    );
    assert_eq!(f.rejections("dns_rebinding_mismatch"), 1);

    let o = f.curl("cidr.test", "10.77.1.1", &[], "/hello.txt");
    assert!(
        !o.status.success(),
        "denied CIDR must be dropped: {}",
        stdout(&o)
    );
    assert_eq!(f.rejections("denied_cidr"), 1);

    // Plain bytes on a TLS port.
    let o = f.python(
        r#"
import socket
s = socket.create_connection(("10.77.0.1", 443), timeout=10)
s.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
try:
    print(repr(s.recv(100)))
except ConnectionResetError:
    print("reset")
"#,
    );
    assert_ok(&o, "python plain on 443");
    assert_eq!(stdout(&o).trim(), "reset");
    assert_eq!(f.rejections("handshake_failed"), 1);

    // The harness's readiness probe dials the listener itself; that connection has no
    // original destination and is refused (and audited) as `no_original_dst`: not one of ours.
    let denies: Vec<_> = f
        .audit_lines()
        .into_iter()
        .filter(|e| {
            e["kind"] == "deny"
                && !e["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("no_original_dst"))
        })
        .collect();
    assert_eq!(
        denies.len(),
        4,
        "every refusal is audited once: {denies:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_streams_and_websocket_echoes() {
    if !require_root("sse_streams_and_websocket_echoes") {
        return;
    }
    let f = Fixture::new("");
    // SSE: events must arrive as nginx flushes them (300 ms apart), not all at the end.
    let o = f.python(
        r#"
import os, socket, ssl, time
ctx = ssl.create_default_context(cafile=os.environ["PDK_CA"])
s = ctx.wrap_socket(socket.create_connection(("10.77.0.1", 443), timeout=20), server_hostname="app.test")
s.sendall(b"GET /sse HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
start = time.monotonic(); seen = []; buf = b""
while True:
    chunk = s.recv(4096)
    if not chunk: break
    buf += chunk
    while b"data: " in buf:
        i = buf.index(b"data: ")
        seen.append(round(time.monotonic() - start, 2)); buf = buf[i + 6:]
print(len(seen), seen[-1] - seen[0])
"#,
    );
    assert_ok(&o, "python SSE");
    let text = stdout(&o);
    let mut parts = text.split_whitespace();
    assert_eq!(parts.next(), Some("5"), "{text}");
    let spread: f64 = parts.next().and_then(|s| s.parse().ok()).expect("spread");
    assert!(spread >= 0.8, "events arrived together (buffered): {text}");

    // WebSocket: upgrade through the proxy and nginx to the echo backend.
    let o = f.python(
        r#"
import base64, os, socket, ssl
ctx = ssl.create_default_context(cafile=os.environ["PDK_CA"])
ctx.set_alpn_protocols(["http/1.1"])
s = ctx.wrap_socket(socket.create_connection(("10.77.0.1", 443), timeout=20), server_hostname="app.test")
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /ws HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key).encode())
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
status = head.split(b"\r\n")[0].decode()
msg = b"paddock ws echo"
mask = os.urandom(4)
s.sendall(bytes([0x81, 0x80 | len(msg)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
hdr = s.recv(2)
payload = b""
while len(payload) < (hdr[1] & 0x7f):
    payload += s.recv(100)
print(status, "|", payload.decode())
"#,
    );
    assert_ok(&o, "python WebSocket");
    assert_eq!(
        stdout(&o).trim(),
        "HTTP/1.1 101 Switching Protocols | paddock ws echo"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_of_100_mb_streams_through() {
    if !require_root("upload_of_100_mb_streams_through") {
        return;
    }
    let f = Fixture::new("");
    let src = f.dir.path().join("blob.bin");
    let out = Command::new("head")
        .args(["-c", "104857600", "/dev/urandom"])
        .output()
        .expect("head");
    std::fs::write(&src, &out.stdout).expect("write blob");
    let started = Instant::now();
    let o = f.curl(
        "app.test",
        "10.77.0.1",
        &[
            "--http1.1",
            "-T",
            &src.display().to_string(),
            "-w",
            "%{http_code}",
            "-o",
            "/dev/null",
        ],
        "/upload/blob.bin",
    );
    assert_ok(&o, "curl upload");
    assert_eq!(stdout(&o), "201", "created by WebDAV PUT");
    let stored = f.dir.path().join("www/upload/blob.bin");
    assert_eq!(
        file_digest(&stored),
        file_digest(&src),
        "100 MB arrive intact"
    );
    eprintln!("100 MB upload through the proxy: {:?}", started.elapsed());
}

fn file_digest(p: &Path) -> String {
    let o = Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    stdout(&o)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_cap_is_reset_and_idle_connections_close() {
    if !require_root("over_cap_is_reset_and_idle_connections_close") {
        return;
    }
    let f = Fixture::new("max_connections = 2\nidle_timeout_secs = 2\nhandshake_timeout_secs = 10");
    let o = f.python(
        r#"
import os, socket, ssl, time
ctx = ssl.create_default_context(cafile=os.environ["PDK_CA"])
# Two held connections fill the cap (they wait in the ClientHello peek).
held = [socket.create_connection(("10.77.0.1", 443), timeout=10) for _ in range(2)]
time.sleep(0.3)
try:
    # On loopback the reset can beat connect() back to userspace.
    third = socket.create_connection(("10.77.0.1", 443), timeout=10)
    data = third.recv(10)
    print("cap:", "eof" if data == b"" else repr(data))
except ConnectionResetError:
    print("cap: reset")
for s in held: s.close()
time.sleep(0.3)
# Idle: a completed handshake with no request is closed after the idle timeout.
s = ctx.wrap_socket(socket.create_connection(("10.77.0.1", 443), timeout=20), server_hostname="app.test")
start = time.monotonic()
try:
    s.recv(10)
except (ConnectionResetError, ssl.SSLError):
    pass
print("idle: %.1f" % (time.monotonic() - start))
"#,
    );
    assert_ok(&o, "python cap + idle");
    let text = stdout(&o);
    assert!(text.contains("cap: reset"), "{text}");
    let idle: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("idle: "))
        .and_then(|v| v.parse().ok())
        .expect("idle line");
    assert!((1.5..8.0).contains(&idle), "idle close after {idle}s");
    assert!(f.rejections("cap_exceeded") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plain_http_on_port_80_is_policy_checked_by_host() {
    if !require_root("plain_http_on_port_80_is_policy_checked_by_host") {
        return;
    }
    let f = Fixture::new("");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(["--resolve", "app.test:80:10.77.0.1"])
        .arg("http://app.test/hello.txt");
    let o = f.run_agent(&mut cmd);
    assert_ok(&o, "curl plain app.test");
    assert_eq!(stdout(&o), "hello from the test host\n\n200");

    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(["--resolve", "denied.test:80:10.77.0.1"])
        .arg("http://denied.test/");
    let o = f.run_agent(&mut cmd);
    assert_ok(&o, "curl plain denied.test");
    let body = stdout(&o);
    assert!(
        body.ends_with("\n403") && body.contains("denied.test"),
        "{body}"
    );
    let audit = f.audit_lines();
    assert!(
        audit
            .iter()
            .any(|e| e["kind"] == "allow" && e["mode"] == "plain_http" && e["sni"] == "app.test"),
        "{audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cooperative_connect_is_audited_and_intercepted() {
    if !require_root("cooperative_connect_is_audited_and_intercepted") {
        return;
    }
    let f = Fixture::new("");
    let proxy = format!("http://{}", paddock_tests::proxied::CONNECT);
    let curl = |name: &str| {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            &f.ca(),
            "-w",
            "\n%{http_code}",
        ])
        .args(["-x", &proxy])
        .arg(format!("https://{name}/hello.txt"));
        tokio::task::block_in_place(|| run(&mut cmd, &f.beside_agent()))
    };
    let o = curl("app.test");
    assert_ok(&o, "curl via CONNECT");
    assert_eq!(stdout(&o), "hello from the test host\n\n200");
    let o = curl("denied.test");
    assert!(!o.status.success(), "denied CONNECT: {}", stdout(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let audit = f.audit_lines();
    assert!(
        audit.iter().any(|e| e["kind"] == "connect_reason"
            && e["reason"] == "root-tier test of cooperative mode"),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|e| e["kind"] == "allow" && e["mode"] == "connect" && e["sni"] == "app.test"),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|e| e["kind"] == "deny" && e["mode"] == "connect" && e["sni"] == "denied.test"),
        "{audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ipv6_destination_is_intercepted_and_vetted() {
    if !require_root("ipv6_destination_is_intercepted_and_vetted") {
        return;
    }
    let f = Fixture::new("");
    let o = f.curl(
        "app6.test",
        "[fd00:77::1]",
        &["--http2", "-w", "\n%{http_version}"],
        "/hello.txt",
    );
    assert_ok(&o, "curl over IPv6");
    assert_eq!(stdout(&o), "hello from the test host\n\n2");
    let audit = f.audit_lines();
    assert!(
        audit.iter().any(|e| e["kind"] == "allow"
            && e["sni"] == "app6.test"
            && e["dst"] == "[fd00:77::1]:443"),
        "{audit:?}"
    );
}

/// A `passthrough` rule through the real eBPF path: the agent's TLS reaches nginx untouched
/// (it verifies against the upstream's own CA and not against the run CA), the bytes are
/// spliced, and the connection is audited once as `passthrough`, without request records.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_passthrough_host_keeps_its_own_tls() {
    if !require_root("a_passthrough_host_keeps_its_own_tls") {
        return;
    }
    let f = Fixture::new("");
    let upstream_ca = f.dir.path().join("test-ca.crt");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "--cacert"])
        .arg(&upstream_ca)
        .args(["--resolve", "pass.test:443:10.77.0.1"])
        .arg("https://pass.test/hello.txt");
    let o = f.run_agent(&mut cmd);
    assert_ok(&o, "curl trusting the upstream CA");
    assert_eq!(stdout(&o), "hello from the test host\n");
    let o = f.curl("pass.test", "10.77.0.1", &[], "/hello.txt");
    assert!(
        !o.status.success(),
        "the run CA verifies nothing on a pass-through host: {o:?}"
    );
    let audit = f.audit_lines();
    assert!(
        audit.iter().any(|e| e["kind"] == "passthrough"
            && e["sni"] == "pass.test"
            && e["rule"] == "pass-through"),
        "{audit:?}"
    );
    assert!(
        !audit
            .iter()
            .any(|e| e["kind"] == "request" && e["sni"] == "pass.test"),
        "no request records on a pass-through host: {audit:?}"
    );
    assert!(
        metric(
            &f.admin("/metrics"),
            "paddock_proxy_connections_total{decision=\"passthrough\"}"
        ) >= 2,
    );
}
