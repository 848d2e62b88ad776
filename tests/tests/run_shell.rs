//! Root tier: `paddock-proxy run --shell`. A shell opened through the run's interactive
//! socket (`paddock-broker shell`) runs inside the command's sandbox: as the run user (never
//! root), in its PID namespace, and its `curl` is intercepted like the command's (the upstream
//! gets the real secret for the shell's placeholder, the proxy audits the connection). A key
//! without `broker:shell` gets 403 and an audit record; the broker records the shell's
//! opening and closing with its duration.

use std::{
    collections::BTreeSet,
    io::Write,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use paddock_broker::auth::{
    Scope,
    static_keys::{format_line, hash_key},
};
use paddock_tests::{
    HostLink,
    echo_api::EchoApi,
    files::{audit_records, write_secrets},
    interactive::wait_for_file,
    process::{Reaped, target_bin},
    proxied::{DnsResponder, make_upstream_certs},
    require_root,
};

const POLICY: &str = r#"
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: shell}
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

const SECRET: &str = "real-shell-bearer-41c7e2";
const RUN: &str = "shell-run";
/// A caller that may attach but not open shells.
const WATCHER_KEY: &str = "watcher-key-fedcba9876543210fedcba98";

/// Runs `paddock-broker shell` with `input` on its stdin; (exit success, stdout, stderr).
fn shell(socket: &Path, key: &Path, input: &str) -> (bool, String, String) {
    let mut child = Command::new(target_bin("paddock-broker"))
        .args(["shell", "--socket"])
        .arg(socket)
        .arg("--token-file")
        .arg(key)
        .args(["-n", "local", RUN])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("paddock-broker shell");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write the shell's input");
    let mut guard = Reaped(child);
    let deadline = Instant::now() + Duration::from_mins(1);
    while matches!(guard.0.try_wait(), Ok(None)) {
        assert!(Instant::now() < deadline, "the shell did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    let child = std::mem::replace(
        &mut guard.0,
        Command::new("true").spawn().expect("placeholder child"),
    );
    let out = child.wait_with_output().expect("shell output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Opens a shell over the socket's WebSocket at 30x100, resizes it to 50x132, and returns
/// what `stty size` printed before and after.
async fn terminal_sizes(socket: &Path, key: &Path) -> Vec<String> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let bearer = std::fs::read_to_string(key).expect("key");
    let io = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let mut req = format!("ws://broker/v1/runs/local/{RUN}/shell?rows=30&cols=100")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", bearer.trim()).parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, io)
        .await
        .expect("shell");
    let mut seen = String::new();
    let mut read_until = async |ws: &mut tokio_tungstenite::WebSocketStream<_>, n: usize| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            // `SIZE R C` lines, wherever the shell's prompt put them (the echoed command line
            // has `SIZE %s`, which is not two numbers).
            let sizes: Vec<String> = seen
                .lines()
                .filter_map(|l| l.split_once("SIZE ").map(|(_, v)| v.trim()))
                .filter(|v| {
                    let parts: Vec<&str> = v.split(' ').collect();
                    parts.len() == 2 && parts.iter().all(|p| p.parse::<u16>().is_ok())
                })
                .map(str::to_owned)
                .collect();
            if sizes.len() >= n {
                return sizes;
            }
            match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => seen.push_str(&String::from_utf8_lossy(&b)),
                Ok(Some(Ok(_))) => {}
                other => panic!("no size ({other:?}): {seen}"),
            }
        }
    };
    // `printf` keeps the echoed command line from matching.
    let ask = Message::Binary("printf 'SIZE %s\\n' \"$(stty size)\"\n".into());
    ws.send(ask.clone()).await.expect("send");
    let mut sizes = read_until(&mut ws, 1).await;
    ws.send(Message::Text(r#"{"rows":50,"cols":132}"#.into()))
        .await
        .expect("resize");
    // The resize is applied beside the byte stream, not in it: ask until it shows (bounded).
    for n in 2..=20 {
        ws.send(ask.clone()).await.expect("send");
        sizes = read_until(&mut ws, n).await;
        if sizes.last().is_some_and(|s| s == "50 132") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = ws.send(Message::Binary("exit\n".into())).await;
    vec![sizes[0].clone(), sizes[sizes.len() - 1].clone()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one run's life: a refused shell, a shell's commands, the audit trails"
)]
async fn a_shell_runs_in_the_sandbox_as_the_run_user_and_is_intercepted() {
    if !require_root("a_shell_runs_in_the_sandbox_as_the_run_user_and_is_intercepted") {
        return;
    }
    let link = HostLink::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    make_upstream_certs(d, &["api.paddock.test"]);
    let zone = vec![("api.paddock.test".to_owned(), link.host_ip.into())];
    let _dns = DnsResponder::start(&link.upstream, SocketAddr::from((link.host_ip, 53)), zone);
    let api = EchoApi::start(&link.upstream, d, SocketAddr::from((link.host_ip, 443)));
    let secrets = d.join("secrets");
    write_secrets(&secrets, &[("bearer.txt", SECRET)]);
    std::fs::write(d.join("policy.yaml"), POLICY).expect("policy");
    let watcher: BTreeSet<Scope> = [Scope::Attach].into_iter().collect();
    std::fs::write(
        d.join("keys"),
        format_line("watcher", &hash_key(WATCHER_KEY), "local", &watcher),
    )
    .expect("keys");
    std::fs::write(d.join("watcher.key"), WATCHER_KEY).expect("watcher key");
    let state = d.join("state");
    let audit = d.join("proxy-audit.jsonl");
    let path = |p: &Path| p.to_str().expect("utf-8").to_owned();
    let child = Command::new(target_bin("paddock-proxy"))
        .args(["run", "--shell", "--policy", &path(&d.join("policy.yaml"))])
        .args(["--secrets", &path(&secrets)])
        .args(["--interact-keys", &path(&d.join("keys"))])
        .args(["--allow-cidr", &format!("{}/24", link.host_ip)])
        .args(["--nameserver", &format!("{}:53", link.host_ip)])
        .args(["--upstream-ca", &path(&d.join("test-ca.crt"))])
        .args(["--audit", &path(&audit)])
        .args(["--state-dir", &path(&state), "--run-id", RUN])
        .args(["--", "sleep", "120"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start paddock-proxy run");
    let mut run = Reaped(child);
    let run_state = state.join(RUN);
    let socket = run_state.join("interact.sock");
    wait_for_file(&socket, Duration::from_secs(30));
    let key = run_state.join("interact.key");

    // Without broker:shell: refused, with the reason, and audited.
    let (ok, _, err) = shell(&socket, &d.join("watcher.key"), "id\n");
    assert!(!ok, "a caller without broker:shell got a shell");
    assert!(
        err.contains("not allowed") && err.contains("broker:shell"),
        "{err}"
    );

    // The operator's shell: who it is, what it sees, and a request through the proxy. The
    // sandbox starts right after the socket appears: retry while it is not running yet.
    let script = format!(
        "echo UID=$(id -u); echo PID1=$(tr '\\0' ' ' < /proc/1/cmdline); echo PROCS=$(ls /proc | grep -c '^[0-9]'); \
         curl -sS --resolve api.paddock.test:443:{ip} https://api.paddock.test/from-shell \
         -H \"Authorization: Bearer $API_BEARER\"; echo; echo BEARER=$API_BEARER; \
         setsid nohup sleep 4242 </dev/null >/dev/null 2>&1 & exit 7\n",
        ip = link.host_ip
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let (out, err) = loop {
        let (ok, out, err) = shell(&socket, &key, &script);
        if ok && out.contains("UID=") {
            break (out, err);
        }
        assert!(Instant::now() < deadline, "no shell: {err}\n{out}");
        std::thread::sleep(Duration::from_millis(200));
    };
    // The last occurrence: the echoed command line holds each name too, and an output line
    // may follow the shell's prompt.
    let field = |name: &str| {
        out.lines()
            .rev()
            .find_map(|l| l.split_once(name).map(|(_, v)| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no {name} in the shell's output: {out}\n{err}"))
    };
    let uid: u32 = field("UID=").trim().parse().expect("uid");
    assert_ne!(uid, 0, "the shell must never run as root");
    // PID 1 of its PID namespace is the sandbox's init, and only the sandbox's few processes
    // are visible (init, the command, the shell and its children).
    assert!(field("PID1=").contains("__sandbox"), "{out}");
    let procs: usize = field("PROCS=").trim().parse().expect("process count");
    assert!(procs < 10, "the shell sees {procs} processes: {out}");
    let bearer = field("BEARER=");
    assert!(
        bearer.starts_with("pdk-"),
        "the shell sees a placeholder: {out}"
    );
    assert!(
        !out.contains(SECRET),
        "a real secret reached the shell: {out}"
    );

    // The shell's request went through the proxy: the upstream got the real secret.
    let reqs = api.requests();
    let from_shell: Vec<_> = reqs.iter().filter(|r| r["path"] == "/from-shell").collect();
    assert_eq!(from_shell.len(), 1, "{reqs:?}\n{out}\n{err}");
    assert_eq!(from_shell[0]["authorization"], format!("Bearer {SECRET}"));
    let trail = std::fs::read_to_string(&audit).expect("proxy audit");
    assert!(
        trail
            .lines()
            .any(|l| l.contains("api.paddock.test") && l.contains("from-shell")),
        "the proxy did not record the shell's request: {trail}"
    );

    // The run's broker recorded the refusal, the shell's opening (as the run user) and its
    // closing.
    let broker_trail =
        std::fs::read_to_string(run_state.join("broker-audit.jsonl")).expect("broker audit");
    let records = audit_records(&broker_trail);
    assert!(
        records.iter().any(|r| r["event"] == "interact-denied"
            && r["caller"] == "watcher"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("broker:shell"))),
        "{broker_trail}"
    );
    let opened = records
        .iter()
        .find(|r| r["event"] == "shell-opened" && r["caller"] == "run-operator")
        .unwrap_or_else(|| panic!("no shell-opened: {broker_trail}"));
    assert!(
        opened["reason"]
            .as_str()
            .is_some_and(|s| s.contains(&format!("uid {uid}"))),
        "{opened}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let trail =
            std::fs::read_to_string(run_state.join("broker-audit.jsonl")).expect("broker audit");
        if audit_records(&trail)
            .iter()
            .any(|r| r["event"] == "shell-closed" && r["caller"] == "run-operator")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no shell-closed: {trail}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // What the shell left running (a `setsid nohup` job) ended with its session.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Command::new("pgrep")
        .args(["-f", "^sleep 4242$"])
        .output()
        .expect("pgrep")
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "a job started in the shell outlived its session"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The terminal's size: the one asked for at open, then a resize message.
    let sizes = terminal_sizes(&socket, &key).await;
    assert_eq!(sizes, ["30 100", "50 132"], "stty size in the shell");

    // The command was never disturbed: it is still running until the run is stopped.
    assert!(matches!(run.0.try_wait(), Ok(None)), "the run ended early");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(run.0.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    );
    drop(run);
}
