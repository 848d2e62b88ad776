//! Root tier: an interactive run. `paddock-proxy run --adapter-port` runs an adapter as the
//! intercepted command; prompts sent to the embedded broker's interactive socket reach the
//! adapter inside the command's network namespace, and its answers stream back to two
//! attached clients. A caller without the scope gets 403 and an audit record; once the adapter
//! is gone a prompt gets 502 with the reason.

use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use paddock_broker::auth::{
    Scope,
    static_keys::{format_line, hash_key},
};
use paddock_tests::{
    interactive::{ADAPTER_PY, InteractClient, read_until, wait_for_file},
    process::{Reaped, target_bin},
    require_root,
};

const POLICY: &str = r"
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: interactive}
spec:
  appliesTo: {namespaces: [local]}
  egress: []
";

const PORT: &str = "8765";
const RUN: &str = "ia-run";
/// A caller that may watch but not prompt.
const WATCHER_KEY: &str = "watcher-key-0123456789abcdef0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one run's life: attach, prompts, refusals, the adapter's end, the audit trail"
)]
async fn prompts_reach_the_adapter_in_the_run_and_answers_stream_to_every_client() {
    if !require_root("prompts_reach_the_adapter_in_the_run_and_answers_stream_to_every_client") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("policy.yaml"), POLICY).expect("policy");
    let watcher: BTreeSet<Scope> = [Scope::Attach].into_iter().collect();
    std::fs::write(
        d.join("keys"),
        format_line("watcher", &hash_key(WATCHER_KEY), "local", &watcher),
    )
    .expect("keys");
    let state = d.join("state");
    let path = |p: &std::path::Path| p.to_str().expect("utf-8").to_owned();
    let child = Command::new(target_bin("paddock-proxy"))
        .args(["run", "--policy", &path(&d.join("policy.yaml"))])
        .args([
            "--adapter-port",
            PORT,
            "--interact-keys",
            &path(&d.join("keys")),
        ])
        .args(["--state-dir", &path(&state), "--run-id", RUN])
        // Inline: the command's /tmp (where the test's files are) is private.
        .args(["--", "python3", "-c", ADAPTER_PY, PORT])
        .env("ADAPTER_LINGER", "3")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start paddock-proxy run");
    let mut guard = Reaped(child);

    let run_state = state.join(RUN);
    wait_for_file(&run_state.join("interact.sock"), Duration::from_secs(30));
    let key = std::fs::read_to_string(run_state.join("interact.key")).expect("operator key");
    let operator = InteractClient {
        socket: run_state.join("interact.sock"),
        bearer: key.trim().to_owned(),
        namespace: "local".into(),
        run: RUN.into(),
    };
    let watcher = InteractClient {
        bearer: WATCHER_KEY.into(),
        ..operator.clone()
    };

    // Two clients attach (the watcher may: it has broker:attach).
    let mut first = operator.attach_when_up(Duration::from_secs(20)).await;
    let mut second = watcher.attach().await.expect("the watcher attaches");

    // A prompt travels broker -> adapter (inside the command) and both clients see the answer.
    let (status, answer) = operator
        .post("prompts", Some(r#"{"text":"hello adapter"}"#))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["seq"], 1);
    let want = "answer 1 from run-operator: HELLO ADAPTER";
    for ws in [&mut first, &mut second] {
        let got = read_until(ws, want, Duration::from_secs(10)).await;
        assert!(got.contains(want), "{got}");
    }
    let (status, answer) = operator.post("prompts", Some(r#"{"text":"again"}"#)).await;
    assert_eq!((status, answer["seq"].as_u64()), (200, Some(2)), "{answer}");
    let (status, _) = operator.post("interrupt", None).await;
    assert_eq!(status, 200);
    for ws in [&mut first, &mut second] {
        let got = read_until(ws, "interrupted", Duration::from_secs(10)).await;
        assert!(got.contains("answer 2 from run-operator: AGAIN"), "{got}");
    }

    // The watcher lacks broker:interact: 403, and the refusal is audited.
    let (status, body) = watcher.post("prompts", Some(r#"{"text":"sneaky"}"#)).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("broker:interact")),
        "{body}"
    );
    // Another run of the namespace is not the caller's to drive.
    let elsewhere = InteractClient {
        run: "no-such-run".into(),
        ..operator.clone()
    };
    assert_eq!(elsewhere.post("interrupt", None).await.0, 403);

    // End: the adapter closes its output (the clients' streams close) and stops listening;
    // while the command lingers, a prompt finds no adapter: 502 with the reason.
    let (status, _) = operator.post("end", None).await;
    assert_eq!(status, 200);
    for ws in [&mut first, &mut second] {
        let got = read_until(ws, "[closed:", Duration::from_secs(10)).await;
        assert!(got.contains("adapter output ended"), "{got}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let (status, body) = loop {
        let (status, body) = operator
            .post("prompts", Some(r#"{"text":"anyone?"}"#))
            .await;
        if status != 200 || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "AdapterUnavailable", "{body}");
    // Refused, or (racing the adapter's shutdown) accepted by its closing socket and dropped.
    assert!(
        body["message"].as_str().is_some_and(
            |m| m.contains("adapter unreachable") || m.contains("adapter connection failed")
        ),
        "{body}"
    );

    // The command exits by itself; `run` returns its status and removes the socket and key.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = guard.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the run did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = std::io::read_to_string(guard.0.stdout.take().expect("stdout")).unwrap_or_default();
    let err = std::io::read_to_string(guard.0.stderr.take().expect("stderr")).unwrap_or_default();
    assert!(status.success(), "{status}\n{out}\n{err}");
    assert!(
        out.contains(
            r#"adapter got {"seq": 1, "submitter": "run-operator", "text": "hello adapter"}"#
        ),
        "the adapter got the repacked prompt: {out}\n{err}"
    );
    assert!(
        !out.contains("sneaky"),
        "a refused prompt reached the adapter: {out}"
    );
    assert!(!run_state.join("interact.sock").exists());
    assert!(!run_state.join("interact.key").exists());

    // The audit trail names who did what to which run.
    let trail =
        std::fs::read_to_string(run_state.join("broker-audit.jsonl")).expect("broker audit");
    let records: Vec<serde_json::Value> = trail
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let has = |event: &str, caller: &str| {
        records
            .iter()
            .any(|r| r["event"] == event && r["caller"] == caller && r["run"] == RUN)
    };
    assert!(has("run-prompted", "run-operator"), "{trail}");
    assert!(has("run-attached", "watcher"), "{trail}");
    assert!(has("run-ended", "run-operator"), "{trail}");
    assert!(has("interact-denied", "watcher"), "{trail}");
    assert!(
        records.iter().any(|r| r["event"] == "interact-denied"
            && r["reason"]
                .as_str()
                .is_some_and(|m| m.contains("broker:interact"))),
        "{trail}"
    );
}
