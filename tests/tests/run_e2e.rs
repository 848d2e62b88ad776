//! Root tier, end to end: `paddock-proxy run` around real clients (curl, Python) with an
//! embedded broker, the transparent proxy and eBPF interception, against an HTTPS API in a
//! test-host namespace. Upstream must receive the real secrets in every placeholder position;
//! nothing the agent can read may contain one.

use std::{net::SocketAddr, path::Path, process::Command};

use paddock_tests::{
    HostLink,
    echo_api::EchoApi,
    files::{audit_records, write_secrets},
    process::{Placement, run, target_bin},
    proxied::{DnsResponder, make_upstream_certs},
    require_root,
};

const SECRETS: [(&str, &str); 4] = [
    ("bearer.txt", "real-bearer-7f3a9c01d2"),
    ("apikey.txt", "sk-ant-real-5b8e44aa19"),
    ("qkey.txt", "real-query-key-c0ffee42"),
    ("basic.txt", "real-basic-pass-99d1e7"),
];

const POLICY: &str = r#"
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: e2e}
spec:
  appliesTo: {namespaces: [local]}
  credentials:
    - name: bearer
      provider: {kind: user-secret, inject: {header: {name: Authorization, prefix: "Bearer "}}}
      secret: {file: bearer.txt}
      hosts: [api.paddock.test]
      env: API_BEARER
    - name: apikey
      provider: {kind: anthropic-api-key}
      secret: {file: apikey.txt}
      hosts: [api.paddock.test]
      env: ANTHROPIC_API_KEY
    - name: qkey
      provider: {kind: user-secret, inject: {query: {param: key}}, allowedQuery: [q, key]}
      secret: {file: qkey.txt}
      hosts: [api.paddock.test]
      env: MAPS_KEY
    - name: git
      provider: {kind: user-secret, inject: {basic: {username: git}}}
      secret: {file: basic.txt}
      hosts: [api.paddock.test]
      env: GIT_PASSWORD
  egress:
    - {hosts: [api.paddock.test], ports: [443], substituteAuth: true}
"#;

const AGENT: &str = r#"
exec 2>&1
R="--resolve api.paddock.test:443:$E2E_IP --resolve other.paddock.test:443:$E2E_IP"
echo "== env"; env
echo "== bearer"; curl -sS --http1.1 $R https://api.paddock.test/bearer -H "Authorization: Bearer $API_BEARER"; echo
echo "== apikey"; curl -sS --http2 $R https://api.paddock.test/apikey -H "x-api-key: $ANTHROPIC_API_KEY"; echo
echo "== query"; python3 -c '
import os, socket, urllib.request
real = socket.getaddrinfo
socket.getaddrinfo = lambda h, *a, **k: real(os.environ["E2E_IP"] if h.endswith("paddock.test") else h, *a, **k)
print(urllib.request.urlopen("https://api.paddock.test/query?q=1&key=" + os.environ["MAPS_KEY"], timeout=10).read().decode())'
echo "== basic"; curl -sS $R -u "git:$GIT_PASSWORD" https://api.paddock.test/basic; echo
echo "== denied"; curl -sS $R https://other.paddock.test/x; echo
echo "== read secrets"; cat "$E2E_SECRETS"/*.txt 2>&1; ls -R "$E2E_STATE" 2>&1
exit 3
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_injects_real_credentials_the_agent_never_sees() {
    if !require_root("run_injects_real_credentials_the_agent_never_sees") {
        return;
    }
    let link = HostLink::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    make_upstream_certs(d, &["api.paddock.test", "other.paddock.test"]);
    let zone = vec![
        ("api.paddock.test".to_owned(), link.host_ip.into()),
        ("other.paddock.test".to_owned(), link.host_ip.into()),
    ];
    let _dns = DnsResponder::start(&link.upstream, SocketAddr::from((link.host_ip, 53)), zone);
    let api = EchoApi::start(&link.upstream, d, SocketAddr::from((link.host_ip, 443)));
    let secrets = d.join("secrets");
    write_secrets(&secrets, &SECRETS);
    std::fs::write(d.join("policy.yaml"), POLICY).expect("policy");
    let state = d.join("state");
    let audit = d.join("proxy-audit.jsonl");
    let subnet = format!("{}/24", link.host_ip);
    let path = |p: &Path| p.to_str().expect("utf-8").to_owned();

    let mut cmd = Command::new(target_bin("paddock-proxy"));
    cmd.args([
        "run",
        "--policy",
        &path(&d.join("policy.yaml")),
        "--secrets",
        &path(&secrets),
    ])
    .args([
        "--allow-cidr",
        &subnet,
        "--nameserver",
        &format!("{}:53", link.host_ip),
    ])
    .args([
        "--upstream-ca",
        &path(&d.join("test-ca.crt")),
        "--audit",
        &path(&audit),
    ])
    .args([
        "--state-dir",
        &path(&state),
        "--run-id",
        "e2e-run",
        "--",
        "sh",
        "-c",
        AGENT,
    ])
    .env("E2E_IP", link.host_ip.to_string())
    .env("E2E_SECRETS", &secrets)
    .env("E2E_STATE", &state)
    .env("RUST_LOG", "warn");
    let out = tokio::task::block_in_place(|| run(&mut cmd, &Placement::default()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "the command's exit code comes back\n{stdout}\n{stderr}"
    );

    let reqs = api.requests();
    check_upstream(&reqs, &stdout, &stderr);
    assert_eq!(
        reqs.iter()
            .filter(|r| r["host"].as_str().unwrap_or("").starts_with("other"))
            .count(),
        0,
        "the denied host must never be reached"
    );
    check_agent_view(&stdout);

    check_terminal(&stderr);

    // The audit trail has the allowed and the denied connection.
    let trail = std::fs::read_to_string(&audit).expect("audit log");
    assert!(
        trail
            .lines()
            .any(|l| l.contains("\"allow\"") && l.contains("api.paddock.test")),
        "{trail}"
    );
    assert!(
        trail
            .lines()
            .any(|l| l.contains("\"deny\"") && l.contains("other.paddock.test")),
        "{trail}"
    );
    check_request_audit(&trail);
    // Secrets and keys are gone after the run; the audit logs stay.
    assert!(!state.join("e2e-run/ca").exists() && !state.join("e2e-run/broker").exists());
    assert!(state.join("e2e-run/broker-audit.jsonl").exists());
}

/// The operator saw the denial as it happened, and a summary at the end.
fn check_terminal(stderr: &str) {
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("paddock: denied connection other.paddock.test:443")),
        "{stderr}"
    );
    let summary = stderr
        .lines()
        .find(|l| l.contains(" requests; ") && l.contains("bytes in"))
        .unwrap_or_else(|| panic!("no summary: {stderr}"));
    assert!(
        summary.contains("denied: other.paddock.test:443 x1"),
        "{summary}"
    );
    for credential in ["bearer", "apikey", "qkey", "git"] {
        assert!(summary.contains(&format!("{credential} x")), "{summary}");
    }
    assert!(
        !summary.contains("real-"),
        "a secret in the summary: {summary}"
    );
}

/// Upstream got the real secret in every position, and never a placeholder or the denied host.
fn check_upstream(reqs: &[serde_json::Value], stdout: &str, stderr: &str) {
    // Upstream got the real secret in every position.
    let by_path = |p: &str| {
        reqs.iter()
            .find(|r| r["path"] == p)
            .unwrap_or_else(|| panic!("no request to {p}: {reqs:?}\n{stdout}\n{stderr}"))
            .clone()
    };
    assert_eq!(
        by_path("/bearer")["authorization"],
        format!("Bearer {}", SECRETS[0].1)
    );
    assert_eq!(by_path("/apikey")["x-api-key"], SECRETS[1].1);
    assert_eq!(by_path("/query")["query"]["key"], SECRETS[2].1);
    assert_eq!(
        by_path("/query")["query"]["q"],
        "1",
        "other parameters are kept"
    );
    assert_eq!(by_path("/basic")["basic"], format!("git:{}", SECRETS[3].1));
    assert!(
        reqs.iter().all(|r| !r.to_string().contains("pdk-")),
        "a placeholder reached upstream: {reqs:?}"
    );
}

/// The agent saw placeholders only: not in its environment, not in any response, and it could
/// not read the secret files or Paddock's state.
fn check_agent_view(stdout: &str) {
    assert!(stdout.contains("API_BEARER=pdk-"), "{stdout}");
    for (name, secret) in SECRETS {
        assert!(
            !stdout.contains(secret),
            "the agent saw the real {name}:\n{stdout}"
        );
    }
    // The test's directories live under /tmp, which the command's private /tmp hides
    // altogether; elsewhere the 0600 files answer "Permission denied".
    let read = stdout.split("== read secrets").nth(1).unwrap_or("");
    assert!(
        read.contains("Permission denied") || read.contains("No such file or directory"),
        "secrets must be unreadable: {stdout}"
    );
    let denied = stdout.split("== denied").nth(1).unwrap_or("");
    assert!(
        denied.contains("other.paddock.test"),
        "403 page names the host: {stdout}"
    );
}

/// Every request upstream received has one request record naming the credential put in, with
/// the path only; nothing in the trail is a secret, a placeholder or a query string.
fn check_request_audit(trail: &str) {
    let records: Vec<serde_json::Value> = audit_records(trail)
        .into_iter()
        .filter(|r| r["kind"] == "request")
        .collect();
    for (path, credential) in [
        ("/bearer", "bearer"),
        ("/apikey", "apikey"),
        ("/query", "qkey"),
        ("/basic", "git"),
    ] {
        let matching: Vec<_> = records.iter().filter(|r| r["path"] == path).collect();
        assert_eq!(matching.len(), 1, "one record for {path}: {trail}");
        let r = matching[0];
        assert_eq!(r["outcome"], "forwarded", "{r}");
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["credential"], credential, "{r}");
        assert_eq!(r["sni"], "api.paddock.test", "{r}");
        assert!(r["lease_id"].is_string(), "{r}");
    }
    // This API speaks HTTP/1.1 only, so the proxy offers the agent no h2 (run_h2 covers h2).
    assert!(
        records.iter().all(|r| r["protocol"] == "HTTP/1.1"),
        "{trail}"
    );
    for (name, secret) in SECRETS {
        assert!(
            !trail.contains(secret),
            "the audit trail holds the real {name}"
        );
    }
    assert!(
        !trail.contains("pdk-"),
        "the audit trail holds a placeholder"
    );
    assert!(
        !trail.contains("q=1"),
        "the audit trail holds a query string"
    );
}

/// Sockets of `pid` listening on TCP in its network namespace (`/proc/PID/net/tcp*`).
fn listening_sockets(pid: u32) -> Vec<String> {
    let owned: std::collections::BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect();
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).expect("tcp table");
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address st ... inode: columns 1, 3 and 9; 0A is LISTEN.
            if cols.len() > 9 && cols[3] == "0A" && owned.contains(cols[9]) {
                out.push(format!("{table} {}", cols[1]));
            }
        }
    }
    out
}

/// While a command runs: the embedded broker left nothing on disk but its audit log (no
/// config, keys, certificate, caller token or database) and `paddock-proxy run` listens on no
/// TCP port of the host (the broker is reached in-process; the proxy's listeners are inside
/// the command's namespace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_keeps_the_broker_in_memory_and_binds_no_host_listener() {
    use std::io::BufRead as _;
    if !require_root("run_keeps_the_broker_in_memory_and_binds_no_host_listener") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let secrets = d.join("secrets");
    write_secrets(&secrets, &SECRETS);
    std::fs::write(d.join("policy.yaml"), POLICY).expect("policy");
    let state = d.join("state");
    let path = |p: &Path| p.to_str().expect("utf-8").to_owned();
    let mut child = Command::new(target_bin("paddock-proxy"))
        .args(["run", "--quiet", "--policy", &path(&d.join("policy.yaml"))])
        .args(["--secrets", &path(&secrets), "--state-dir", &path(&state)])
        .args([
            "--run-id",
            "mem-run",
            "--",
            "sh",
            "-c",
            // A denied connection, which --quiet keeps off the terminal.
            "echo ready; curl -sS --max-time 5 https://denied.paddock.test/ 2>/dev/null; sleep 5",
        ])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::task::block_in_place(|| lines.next());
    let up = matches!(&first, Some(Ok(l)) if l == "ready");
    let (files, listening) = if up {
        let mut files: Vec<String> = std::fs::read_dir(state.join("mem-run"))
            .expect("state")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        (files, listening_sockets(child.id()))
    } else {
        (Vec::new(), Vec::new())
    };
    let out = tokio::task::block_in_place(|| child.wait_with_output()).expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(up, "the command did not start: {first:?}\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        !stderr.contains("paddock: denied") && !stderr.contains(" requests; "),
        "--quiet prints no denial and no summary: {stderr}"
    );
    let trail = std::fs::read_to_string(state.join("mem-run/proxy-audit.jsonl")).expect("audit");
    assert!(
        trail.contains("denied.paddock.test"),
        "--quiet changes nothing in the audit trail: {trail}"
    );
    assert_eq!(
        files,
        ["broker-audit.jsonl", "ca", "proxy-audit.jsonl"],
        "only the run CA (removed at the end) and the audit logs"
    );
    assert!(
        listening.is_empty(),
        "paddock-proxy run listens on the host: {listening:?}"
    );
}
