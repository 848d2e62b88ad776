//! The interactive routes through a whole (embedded) broker, with an adapter on loopback TCP:
//! prompts repacked and numbered, output fanned out to every attached client, the scope of
//! each route enforced and audited, 502 when the adapter is gone, state forgotten at the end.

use std::{
    collections::{BTreeSet, HashMap},
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest},
};

use super::*;
use crate::{
    auth::static_keys::{format_line, hash_key},
    interactive::TcpAdapters,
};

/// What the test adapter received, and its output stream.
#[derive(Clone)]
struct Adapter {
    prompts: Arc<Mutex<Vec<Value>>>,
    output: broadcast::Sender<Bytes>,
}

type AdapterBody = BoxBody<Bytes, Infallible>;

async fn adapter_service(
    a: Adapter,
    req: http::Request<Incoming>,
) -> Result<http::Response<AdapterBody>, Infallible> {
    let full = |s: &'static str| Full::new(Bytes::from_static(s.as_bytes())).boxed();
    let path = req.uri().path().to_owned();
    match (req.method().as_str(), path.as_str()) {
        ("GET", "/output") => {
            let rx = a.output.subscribe();
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                match rx.recv().await {
                    Ok(b) => Some((Ok::<_, Infallible>(Frame::data(b)), rx)),
                    Err(_) => None,
                }
            });
            Ok(http::Response::new(http_body_util::BodyExt::boxed(
                StreamBody::new(stream),
            )))
        }
        ("POST", "/prompts") => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(http_body_util::Collected::to_bytes)
                .unwrap_or_default();
            let p: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let line = format!(
                "answer {} from {}: {}\n",
                p["seq"],
                p["submitter"].as_str().unwrap_or("?"),
                p["text"].as_str().unwrap_or("").to_uppercase()
            );
            a.prompts.lock().expect("lock").push(p);
            let _ = a.output.send(Bytes::from(line));
            Ok(http::Response::new(full("{}")))
        }
        ("POST", "/interrupt" | "/end") => Ok(http::Response::new(full("{}"))),
        _ => {
            let mut r = http::Response::new(full(""));
            *r.status_mut() = http::StatusCode::NOT_FOUND;
            Ok(r)
        }
    }
}

/// Starts the adapter on loopback; abort the handle to take it down.
async fn start_adapter() -> (Adapter, SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let adapter = Adapter {
        prompts: Arc::default(),
        output: broadcast::channel(64).0,
    };
    let a = adapter.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let a = a.clone();
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req| adapter_service(a.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (adapter, addr, task)
}

async fn call(link: &LocalLink, bearer: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let io = link.connect().expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = http::Request::post(path)
        .header(http::header::HOST, "broker")
        .header(http::header::AUTHORIZATION, format!("Bearer {bearer}"));
    if body.is_some() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(
            body.map(Value::to_string).unwrap_or_default(),
        )))
        .expect("request");
    let resp = send.send_request(req).await.expect("answer");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn attach(
    link: &LocalLink,
    bearer: &str,
    run: &str,
) -> Result<WebSocketStream<tokio::io::DuplexStream>, u16> {
    let io = link.connect().expect("connect");
    let mut req = format!("ws://broker/v1/runs/team-a/{run}/attach")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        http::header::AUTHORIZATION,
        format!("Bearer {bearer}").parse().expect("header"),
    );
    match tokio_tungstenite::client_async(req, io).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("attach: {e}"),
    }
}

/// Next text from the stream; a close frame reads as `[closed: REASON]`.
async fn next_text(ws: &mut WebSocketStream<tokio::io::DuplexStream>) -> String {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message in time");
        match msg {
            Some(Ok(Message::Binary(b))) => return String::from_utf8_lossy(&b).into_owned(),
            Some(Ok(Message::Close(f))) => {
                return format!(
                    "[closed: {}]",
                    f.map(|f| f.reason.to_string()).unwrap_or_default()
                );
            }
            Some(Ok(_)) => {}
            other => return format!("[ended: {other:?}]"),
        }
    }
}

/// Two documents: run `r1` ends after 1 s without activity; every run of `team-a` applies.
const IDLE_POLICY: &str = "apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: quick}
spec:
  appliesTo: {namespaces: [team-a], runs: [r1]}
  interactive: {idleTimeoutSecs: 1}
---
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: everyone}
spec:
  appliesTo: {namespaces: [team-a]}
  egress: []
";

const POLICY: &str = "\
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: interactive}
spec:
  appliesTo: {namespaces: [team-a]}
  egress: []
";

/// A static key of the tests' broker: (id, key, namespace, scopes).
type Key<'a> = (&'a str, &'a str, &'a str, &'a [Scope]);

/// An embedded broker with `policy` and the static `keys` (its own caller is the controller
/// of `team-a`); its audit file.
fn start_broker(dir: &Path, policy: &str, keys: &[Key<'_>]) -> (EmbeddedBroker, PathBuf) {
    let policy_path = dir.join("policy.yaml");
    std::fs::write(&policy_path, policy).expect("policy");
    let keys_path = dir.join("keys");
    let lines: String = keys
        .iter()
        .map(|(id, key, ns, scopes)| {
            let scopes: BTreeSet<Scope> = scopes.iter().copied().collect();
            format_line(id, &hash_key(key), ns, &scopes) + "\n"
        })
        .collect();
    std::fs::write(&keys_path, lines).expect("keys");
    let audit = dir.join("audit.jsonl");
    let mut config = EmbedConfig::new(
        PolicySource::Files {
            path: policy_path,
            secrets_dir: None,
            poll: None,
        },
        &audit,
        CallerConfig::run_controller("controller", "team-a"),
    );
    config.extra_keys = Some(keys_path);
    (EmbeddedBroker::start(config).expect("start"), audit)
}

fn audit_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one run's interactive life, step by step"
)]
async fn prompts_fan_out_scopes_are_enforced_and_the_end_forgets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, audit) = start_broker(
        dir.path(),
        POLICY,
        &[
            (
                "operator",
                "operator-key",
                "team-a",
                &[Scope::Interact, Scope::Attach, Scope::End],
            ),
            ("watcher", "watcher-key", "team-a", &[Scope::Attach]),
            ("outsider", "outsider-key", "team-b", &[Scope::Interact]),
        ],
    );
    let client = broker.client();
    let (link, controller) = (client.link(), client.bearer().expose());
    for run in ["r1", "r2", "r3"] {
        let (status, v) = call(
            link,
            controller,
            "/v1/runs",
            Some(&json!({"run": run, "namespace": "team-a", "template": "t", "phase": "Running"})),
        )
        .await;
        assert_eq!(status, 200, "{v}");
    }

    // Before any connector: the adapter cannot be reached, and the caller is told why.
    let (status, v) = call(
        link,
        "operator-key",
        "/v1/runs/team-a/r1/prompts",
        Some(&json!({"text": "x"})),
    )
    .await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["code"], "AdapterUnavailable");

    let (adapter, addr, adapter_task) = start_adapter().await;
    let router = broker.broker().interactive().clone();
    router.set_connector(Arc::new(TcpAdapters::new(HashMap::from([
        ("r1".to_owned(), addr),
        ("r2".to_owned(), addr),
    ]))));

    let mut one = attach(link, "operator-key", "r1")
        .await
        .expect("operator attaches");
    let mut two = attach(link, "watcher-key", "r1")
        .await
        .expect("watcher attaches");
    assert_eq!(router.attached_count("team-a", "r1"), 2);

    let (status, v) = call(
        link,
        "operator-key",
        "/v1/runs/team-a/r1/prompts",
        Some(&json!({"text": "hello"})),
    )
    .await;
    assert_eq!(
        (status, v["seq"].as_u64()),
        (200, Some(2)),
        "the failed attempt used seq 1: {v}"
    );
    for ws in [&mut one, &mut two] {
        assert_eq!(next_text(ws).await, "answer 2 from operator: HELLO\n");
    }
    assert_eq!(
        adapter.prompts.lock().expect("lock").clone(),
        vec![json!({"text": "hello", "seq": 2, "submitter": "operator"})],
        "repacked as {{text, seq, submitter}}"
    );

    // Concurrent prompts of one run: each gets its own number, all strictly increasing.
    let mut tasks = Vec::new();
    for i in 0..5 {
        let link = link.clone();
        tasks.push(tokio::spawn(async move {
            call(
                &link,
                "operator-key",
                "/v1/runs/team-a/r1/prompts",
                Some(&json!({"text": format!("p{i}")})),
            )
            .await
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        let (status, v) = t.await.expect("task");
        assert_eq!(status, 200, "{v}");
        seqs.push(v["seq"].as_u64().expect("seq"));
    }
    seqs.sort_unstable();
    assert_eq!(seqs, vec![3, 4, 5, 6, 7]);
    let delivered: Vec<u64> = adapter
        .prompts
        .lock()
        .expect("lock")
        .iter()
        .map(|p| p["seq"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(
        delivered,
        vec![2, 3, 4, 5, 6, 7],
        "delivered one at a time, in order"
    );
    let mut streamed = String::new();
    for _ in 0..5 {
        streamed.push_str(&next_text(&mut one).await);
    }
    let order: Vec<&str> = streamed
        .lines()
        .map(|l| l.split(' ').nth(1).unwrap_or("?"))
        .collect();
    assert_eq!(order, ["3", "4", "5", "6", "7"], "{streamed}");

    // Scopes: the watcher may not prompt or end; another namespace's caller may not touch r1.
    for (key, path, want) in [
        ("watcher-key", "/v1/runs/team-a/r1/prompts", 403),
        ("watcher-key", "/v1/runs/team-a/r1/end", 403),
        ("operator-key", "/v1/runs/team-a/r1/shells", 404),
        ("outsider-key", "/v1/runs/team-a/r1/interrupt", 403),
        ("operator-key", "/v1/runs/team-a/nope/interrupt", 403),
    ] {
        let body = path.ends_with("prompts").then(|| json!({"text": "x"}));
        let (status, v) = call(link, key, path, body.as_ref()).await;
        assert_eq!(status, want, "{key} {path}: {v}");
    }
    assert_eq!(attach(link, "outsider-key", "r1").await.err(), Some(403));
    let events = audit_events(&audit);
    let denied: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "interact-denied")
        .collect();
    assert!(
        denied.iter().any(|e| e["caller"] == "watcher"
            && e["run"] == "r1"
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("broker:interact"))),
        "{denied:?}"
    );
    assert!(
        denied.iter().any(|e| e["caller"] == "outsider"),
        "{denied:?}"
    );
    assert!(events.iter().any(|e| e["event"] == "run-prompted"
        && e["caller"] == "operator"
        && e["reason"] == "seq 2"));
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event"] == "run-attached")
            .count(),
        2
    );

    // A client leaving is counted off (and recorded).
    drop(two);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while router.attached_count("team-a", "r1") != 1 {
        assert!(tokio::time::Instant::now() < deadline, "detach not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The run ends: its state is forgotten and the attached client's stream closes.
    let (status, _) = call(
        link,
        controller,
        "/v1/runs",
        Some(&json!({"run": "r1", "namespace": "team-a", "template": "t", "phase": "Succeeded"})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(next_text(&mut one).await, "[closed: the run ended]");
    assert!(
        !router
            .known_runs()
            .contains(&("team-a".to_owned(), "r1".to_owned()))
    );
    let (status, _) = call(
        link,
        "operator-key",
        "/v1/runs/team-a/r1/prompts",
        Some(&json!({"text": "late"})),
    )
    .await;
    assert_eq!(status, 403, "a finished run takes no prompts");

    // The adapter going away: 502 with the reason, not a hang or a 500.
    adapter_task.abort();
    let _ = adapter_task.await;
    let (status, v) = call(link, "operator-key", "/v1/runs/team-a/r2/interrupt", None).await;
    assert_eq!(status, 502, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("unreachable")),
        "{v}"
    );
    // r3 has no adapter address at all.
    assert_eq!(attach(link, "operator-key", "r3").await.err(), Some(502));
    broker.shutdown().await;
}

/// A shell opener whose "shell" upper-cases what it reads and records resizes.
#[derive(Debug, Default)]
struct EchoShell {
    sizes: Arc<Mutex<Vec<crate::interactive::TermSize>>>,
    opened: Arc<Mutex<Vec<crate::interactive::TermSize>>>,
}

impl crate::interactive::ShellOpener for EchoShell {
    fn open<'a>(
        &'a self,
        run: &'a crate::wire::RunInfo,
        size: crate::interactive::TermSize,
    ) -> crate::interactive::ShellFuture<'a> {
        Box::pin(async move {
            if run.run != "r1" {
                return Err(crate::interactive::ShellError::Failed(
                    "no sandbox for this run".into(),
                ));
            }
            self.opened.lock().expect("lock").push(size);
            let (ours, theirs) = tokio::io::duplex(1024);
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let (mut r, mut w) = tokio::io::split(theirs);
                let mut buf = [0u8; 256];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) if buf[..n].contains(&b'\x04') => return,
                        Ok(n) => {
                            let up = buf[..n].to_ascii_uppercase();
                            if w.write_all(&up).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            let (tx, mut rx) = tokio::sync::watch::channel(size);
            let sizes = self.sizes.clone();
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let s = *rx.borrow_and_update();
                    sizes.lock().expect("lock").push(s);
                }
            });
            Ok(crate::interactive::ShellSession {
                io: Box::new(ours),
                resize: Some(tx),
                user: "agent (uid 4242)".into(),
            })
        })
    }
}

async fn open_shell(
    link: &LocalLink,
    bearer: &str,
    path: &str,
) -> Result<WebSocketStream<tokio::io::DuplexStream>, (u16, Value)> {
    let io = link.connect().expect("connect");
    let mut req = format!("ws://broker{path}")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        http::header::AUTHORIZATION,
        format!("Bearer {bearer}").parse().expect("header"),
    );
    match tokio_tungstenite::client_async(req, io).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            Err((
                resp.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            ))
        }
        Err(e) => panic!("shell: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one shell's life: refusals, the terminal, the audit records"
)]
async fn the_shell_route_is_scoped_audited_and_relays_the_terminal() {
    use futures_util::SinkExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, audit) = start_broker(
        dir.path(),
        POLICY,
        &[
            ("admin", "admin-key", "team-a", &[Scope::Shell]),
            (
                "operator",
                "operator-key",
                "team-a",
                &[Scope::Interact, Scope::Attach, Scope::End],
            ),
        ],
    );
    let client = broker.client();
    let (link, controller) = (client.link(), client.bearer().expose());
    for run in ["r1", "r2"] {
        let (status, v) = call(
            link,
            controller,
            "/v1/runs",
            Some(&json!({"run": run, "namespace": "team-a", "template": "t", "phase": "Running"})),
        )
        .await;
        assert_eq!(status, 200, "{v}");
    }
    let path = "/v1/runs/team-a/r1/shell";

    // No opener installed: 502 with the reason, never a terminal.
    let (status, v) = open_shell(link, "admin-key", path)
        .await
        .expect_err("no opener");
    assert_eq!(
        (status, v["code"].as_str()),
        (502, Some("ShellUnavailable")),
        "{v}"
    );

    let shell = Arc::new(EchoShell::default());
    broker
        .broker()
        .interactive()
        .set_shell_opener(shell.clone());

    // A caller without broker:shell: 403, audited.
    let (status, v) = open_shell(link, "operator-key", path)
        .await
        .expect_err("no scope");
    assert_eq!(status, 403, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("broker:shell")),
        "{v}"
    );
    // A bad size: 400 before anything starts.
    let (status, _) = open_shell(link, "admin-key", &format!("{path}?rows=0&cols=80"))
        .await
        .expect_err("bad size");
    assert_eq!(status, 400);
    // A run whose sandbox cannot start one: 502 with the opener's reason.
    let (status, v) = open_shell(link, "admin-key", "/v1/runs/team-a/r2/shell")
        .await
        .expect_err("no sandbox");
    assert_eq!(status, 502);
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("no sandbox")),
        "{v}"
    );

    // The terminal: the size from the query, bytes both ways, a resize, the end.
    let mut ws = open_shell(link, "admin-key", &format!("{path}?rows=40&cols=120"))
        .await
        .expect("shell");
    assert_eq!(
        shell.opened.lock().expect("lock").as_slice(),
        &[crate::interactive::TermSize {
            rows: 40,
            cols: 120
        }]
    );
    ws.send(Message::Binary(Bytes::from_static(b"id\n")))
        .await
        .expect("send");
    assert_eq!(next_text(&mut ws).await, "ID\n");
    ws.send(Message::Text(r#"{"rows":50,"cols":132}"#.into()))
        .await
        .expect("resize");
    ws.send(Message::Binary(Bytes::from_static(b"\x04")))
        .await
        .expect("eof");
    assert_eq!(next_text(&mut ws).await, "[closed: the shell exited]");
    // The resize reaches the opener's task on its own schedule.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while shell.sizes.lock().expect("lock").is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        shell.sizes.lock().expect("lock").as_slice(),
        &[crate::interactive::TermSize {
            rows: 50,
            cols: 132
        }]
    );

    let events = |kind: &str| -> Vec<Value> {
        audit_events(&audit)
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while events("shell-closed").is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let opened = events("shell-opened");
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(opened[0]["caller"], "admin");
    assert_eq!(opened[0]["reason"], "as agent (uid 4242)");
    let closed = events("shell-closed");
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert!(
        closed[0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("after ") && r.contains("the shell exited")),
        "{closed:?}"
    );
    assert!(
        events("interact-denied")
            .iter()
            .any(|e| e["caller"] == "operator"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("broker:shell"))),
        "the refused shell is audited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_tunnel_is_for_node_bound_node_agents_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A node agent's scope, but a static key names no node.
    let (broker, _audit) = start_broker(
        dir.path(),
        POLICY,
        &[
            ("agent", "agent-key", "team-a", &[Scope::NodeAgent]),
            (
                "operator",
                "operator-key",
                "team-a",
                &[Scope::Interact, Scope::Attach, Scope::Shell],
            ),
        ],
    );
    let link = broker.client().link().clone();
    for (key, want, says) in [
        ("operator-key", 403, "broker:node-agent"),
        ("agent-key", 403, "bound to a node"),
    ] {
        let io = link.connect().expect("connect");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = http::Request::get(crate::wire::paths::NODE_TUNNEL)
            .header(http::header::HOST, "broker")
            .header(http::header::AUTHORIZATION, format!("Bearer {key}"))
            .header(http::header::UPGRADE, crate::wire::tunnel::PROTOCOL)
            .header(http::header::CONNECTION, "upgrade")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = send.send_request(req).await.expect("answer");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, want, "{key}: {text}");
        assert!(text.contains(says), "{key}: {text}");
    }
    assert!(broker.broker().interactive().tunnels().nodes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policys_idle_timeout_ends_only_the_runs_it_applies_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, audit) = start_broker(
        dir.path(),
        IDLE_POLICY,
        &[("operator", "operator-key", "team-a", &[Scope::Interact])],
    );
    let client = broker.client();
    let (link, controller) = (client.link(), client.bearer().expose());
    let (_adapter, addr, _task) = start_adapter().await;
    broker
        .broker()
        .interactive()
        .set_connector(Arc::new(TcpAdapters::new(HashMap::from([
            ("r1".to_owned(), addr),
            ("r2".to_owned(), addr),
        ]))));
    for run in ["r1", "r2"] {
        let (status, v) = call(
            link,
            controller,
            "/v1/runs",
            Some(&json!({"run": run, "namespace": "team-a", "template": "t", "phase": "Running"})),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let path = format!("/v1/runs/team-a/{run}/prompts");
        let (status, v) = call(link, "operator-key", &path, Some(&json!({"text": "hi"}))).await;
        assert_eq!(status, 200, "{v}");
    }
    let ended = |run: &str| {
        audit_events(&audit)
            .iter()
            .any(|e| e["event"] == "run-idle-ended" && e["run"] == run)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ended("r1") {
        assert!(
            std::time::Instant::now() < deadline,
            "r1 was not ended within 10 s of its 1 s idle timeout"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // r2 was exactly as quiet, but no policy applying to it sets a timeout (nor the broker).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!ended("r2"), "r2 must be left alone");
}
