//! Root tier: interactive runs in node mode, on a simulated node (see
//! `paddock_tests::node_lab`). The node agent keeps its outbound tunnel to the real broker
//! process (authenticated by a token bound to its node); the broker finds the run's pod
//! through the API server's stand-in and reaches the adapter *inside the pod's network
//! namespace* through that tunnel: a prompt travels broker -> node agent -> adapter and the
//! answer streams back to two attached clients (`paddock-broker attach` over HTTPS). A shell
//! in the pod runs as the pod's user and its `curl` is intercepted (the upstream gets the
//! real secret for the pod's placeholder). The node agent keeps a tunnel to each of two
//! broker replicas, so a prompt sent to either arrives. Once the adapter is gone a prompt gets
//! 502 with the reason.

use std::{
    io::{Read, Write},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use paddock_tests::{
    interactive::ADAPTER_PY,
    node_lab::{ADAPTER_PORT, BROKER, BROKER_REPLICA, HOST_A, NodeLab, SECRET_A, UPSTREAM_V4},
    process::{Reaped, place},
    require_root,
};

/// `paddock-broker attach` for pod 0's run, its stdout collected on a thread.
struct Attached {
    child: Reaped,
    out: Arc<Mutex<String>>,
}

fn attach(lab: &NodeLab) -> Attached {
    let mut child = lab
        .broker_cli("attach", 0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("paddock-broker attach");
    let mut stdout = child.stdout.take().expect("stdout");
    let out = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&out);
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                return;
            }
            sink.lock()
                .expect("lock")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    Attached {
        child: Reaped(child),
        out,
    }
}

/// `paddock-broker ARGS` to completion: (success, stdout + stderr).
fn cli(lab: &NodeLab, action: &str, extra: &[&str], input: Option<&str>) -> (bool, String) {
    cli_at(lab, BROKER, action, extra, input)
}

/// [`cli`] against the broker at `addr`.
fn cli_at(
    lab: &NodeLab,
    addr: &str,
    action: &str,
    extra: &[&str],
    input: Option<&str>,
) -> (bool, String) {
    let mut cmd = lab.broker_cli_at(addr, action, 0);
    cmd.args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("paddock-broker");
    let mut stdin = child.stdin.take().expect("stdin");
    if let Some(input) = input {
        stdin.write_all(input.as_bytes()).expect("stdin");
    }
    drop(stdin);
    let mut guard = Reaped(child);
    let deadline = Instant::now() + Duration::from_mins(1);
    while matches!(guard.0.try_wait(), Ok(None)) {
        assert!(Instant::now() < deadline, "paddock-broker {action} hung");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut text = String::new();
    if let Some(mut o) = guard.0.stdout.take() {
        let _ = o.read_to_string(&mut text);
    }
    if let Some(mut e) = guard.0.stderr.take() {
        let _ = e.read_to_string(&mut text);
    }
    let ok = guard.0.wait().is_ok_and(|s| s.success());
    (ok, text)
}

fn wait_for(what: &str, lab: &NodeLab, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_and_shells_reach_the_pod_through_the_node_agents_tunnel() {
    if !require_root("prompts_and_shells_reach_the_pod_through_the_node_agents_tunnel") {
        return;
    }
    tokio::task::block_in_place(|| {
        let lab = NodeLab::with_node_ca(1);

        // The adapter, as the pod's container process: in its network namespace and
        // container cgroup, as nobody, on the pod's loopback only.
        let mut cmd = std::process::Command::new("python3");
        cmd.args(["-c", ADAPTER_PY, &ADAPTER_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        place(&mut cmd, &lab.in_pod(0));
        let adapter = Reaped(cmd.spawn().expect("adapter"));

        // Two clients attach, once the tunnel is up and the adapter listens (502 before).
        let mut first = None;
        wait_for("the first attach", &lab, Duration::from_secs(30), || {
            let a = attach(&lab);
            std::thread::sleep(Duration::from_millis(700));
            let mut a = a;
            if matches!(a.child.0.try_wait(), Ok(None)) {
                first = Some(a);
                true
            } else {
                false
            }
        });
        let first = first.expect("attached");
        let second = attach(&lab);
        std::thread::sleep(Duration::from_millis(500));

        // A prompt travels broker -> node agent -> adapter in the pod; both clients see the
        // answer.
        let (ok, text) = cli(&lab, "prompt", &["-t", "hello node"], None);
        assert!(ok && text.contains("prompt 1 delivered"), "{text}");
        let want = "answer 1 from operator: HELLO NODE";
        wait_for(
            "the answer on both streams",
            &lab,
            Duration::from_secs(10),
            || {
                first.out.lock().expect("lock").contains(want)
                    && second.out.lock().expect("lock").contains(want)
            },
        );

        // The other broker replica holds this node's tunnel too: a prompt sent there reaches
        // the same adapter, numbered after the first (the sequence is in the shared store).
        let (ok, text) = cli_at(&lab, BROKER_REPLICA, "prompt", &["-t", "via replica"], None);
        assert!(ok && text.contains("prompt 2 delivered"), "{text}");
        let want = "answer 2 from operator: VIA REPLICA";
        wait_for(
            "the replica's answer",
            &lab,
            Duration::from_secs(10),
            || first.out.lock().expect("lock").contains(want),
        );

        // A shell in the pod: the pod's user, the pod's network, intercepted.
        let script = format!(
            "echo UID=$(id -u); curl -sS -o /dev/null -w 'CODE=%{{http_code}}\\n' \
             --cacert {ca} --resolve {HOST_A}:443:{UPSTREAM_V4} https://{HOST_A}/from-shell \
             -H 'Authorization: Bearer {bearer}'; exit\n",
            ca = lab.public.path().join("ca.crt").display(),
            bearer = lab.pods[0].placeholder,
        );
        let (ok, out) = cli(&lab, "shell", &[], Some(&script));
        assert!(ok, "{out}");
        assert!(
            out.contains("UID=65534"),
            "the shell runs as the pod's user: {out}"
        );
        assert!(out.contains("CODE=200"), "{out}");
        let reqs = lab.upstream("/from-shell");
        assert_eq!(reqs.len(), 1, "{reqs:?}\n{out}");
        assert_eq!(reqs[0]["authorization"], format!("Bearer {SECRET_A}"));
        let audit = lab.broker_audit();
        assert!(
            audit.iter().any(|e| e["event"] == "shell-opened"
                && e["caller"] == "operator"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("uid 65534"))),
            "{audit:?}"
        );

        // The adapter goes away: the clients' streams close, and a prompt is a 502 with the
        // reason.
        drop(adapter);
        let (ok, text) = cli(&lab, "prompt", &["-t", "anyone?"], None);
        assert!(!ok, "{text}");
        assert!(
            text.contains("adapter") && text.contains("gone") && text.contains("127.0.0.1:8765"),
            "{text}"
        );
        drop(first);
        drop(second);
    });
}
