//! Response scrubbing through the request loop: upstreams that reflect the substituted secret
//! in headers, bodies (streamed, compressed, HTTP/1.1 and HTTP/2), later responses and
//! WebSocket messages; the agent must only ever see its placeholder.

use std::io::Write as _;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;

use super::substitute::tests::{PLACEHOLDER, PlaceholderSubstituter, SECRET};
use super::test_support::{
    Agent, TestBody, TestError, Upstream, audit_into, body_string, ctx, empty, full,
    proxy_with_pool, within,
};
use super::{HttpLimits, UpstreamPool};
use crate::audit::MemorySink;
use crate::metrics::{ProxyMetrics, ScrubLocation};

/// What an echo endpoint (httpbin's `/anything`) answers: every request header and the query,
/// as JSON, plus the Authorization header reflected in a response header.
fn echo(req: &Request<hyper::body::Incoming>) -> Response<TestBody> {
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    let body = serde_json::json!({"headers": headers, "query": req.uri().query()});
    let mut r = Response::new(full(body.to_string()));
    if let Some(a) = req.headers().get(AUTHORIZATION) {
        r.headers_mut().insert("x-echo-authorization", a.clone());
    }
    r
}

fn substituter() -> Arc<PlaceholderSubstituter> {
    Arc::new(PlaceholderSubstituter { deny_host: None })
}

struct Rig {
    agent: Agent,
    sink: Arc<MemorySink>,
    metrics: Arc<ProxyMetrics>,
    pool: UpstreamPool,
}

async fn rig(upstream: &Upstream, agent_h2: bool) -> Rig {
    let sink = Arc::new(MemorySink::default());
    let metrics = Arc::new(ProxyMetrics::new());
    let limits = HttpLimits::default();
    let pool = UpstreamPool::new(&ctx().run, upstream.connector(), &limits);
    let (io, _task) = proxy_with_pool(
        agent_h2,
        ctx(),
        pool.clone(),
        substituter(),
        audit_into(&sink, &metrics),
        limits,
    );
    let (agent, _conn) = Agent::connect(io, agent_h2).await;
    Rig {
        agent,
        sink,
        metrics,
        pool,
    }
}

/// A second agent connection of the same run (same pool).
async fn another_connection(r: &Rig, agent_h2: bool) -> Agent {
    let (io, _task) = proxy_with_pool(
        agent_h2,
        ctx(),
        r.pool.clone(),
        substituter(),
        audit_into(&r.sink, &r.metrics),
        HttpLimits::default(),
    );
    Agent::connect(io, agent_h2).await.0
}

fn with_placeholder(uri: &str) -> Request<TestBody> {
    Request::get(uri)
        .header(AUTHORIZATION, format!("Bearer {PLACEHOLDER}"))
        .header("x-api-key", PLACEHOLDER)
        .body(empty())
        .expect("request")
}

fn scrubbed_records(sink: &MemorySink) -> Vec<serde_json::Value> {
    sink.text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "scrubbed")
        .collect()
}

#[tokio::test]
async fn an_echoed_secret_reaches_the_agent_as_its_placeholder() {
    for (agent_h2, upstream_h2) in [(false, false), (true, true), (true, false)] {
        let upstream = Upstream::start(
            upstream_h2,
            Arc::new(|req| Box::pin(async move { echo(&req) })),
        )
        .await;
        let mut r = rig(&upstream, agent_h2).await;
        let response = within(
            "echo",
            r.agent.send(with_placeholder(&format!(
                "https://api.test/anything?key={PLACEHOLDER}"
            ))),
        )
        .await
        .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["x-echo-authorization"],
            format!("Bearer {PLACEHOLDER}")
        );
        assert!(
            !response.headers().contains_key(CONTENT_LENGTH),
            "length changed"
        );
        let body = body_string(response).await;
        assert!(!body.contains(SECRET), "{body}");
        // JSON escapes the secret's `/`: that form is replaced too.
        assert!(!body.contains(&SECRET.replace('/', "\\/")), "{body}");
        assert!(!body.contains("sk-real%2Fsecret"), "{body}");
        assert!(body.contains(PLACEHOLDER), "{body}");
        // The upstream did get the secret, and was asked for an uncompressed answer.
        let seen = upstream.seen();
        assert_eq!(seen[0].headers[AUTHORIZATION], format!("Bearer {SECRET}"));
        assert_eq!(seen[0].headers["accept-encoding"], "identity");
        let records = scrubbed_records(&r.sink);
        let located: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    r["reason"].as_str().unwrap_or_default().to_owned(),
                    r["scrubbed"].clone(),
                )
            })
            .collect();
        assert_eq!(records.len(), 2, "headers and body: {located:?}");
        assert!(records.iter().all(|r| r["path"] == "/anything"));
        assert!(
            !r.sink.text().contains(SECRET),
            "no secret in the audit trail"
        );
        assert_eq!(r.metrics.scrubbed_count(ScrubLocation::Headers), 1);
        assert!(
            r.metrics.scrubbed_count(ScrubLocation::Body) >= 3,
            "{located:?}"
        );
    }
}

/// A host that stored what it was sent hands it back later, to a request without a
/// placeholder, on any connection of the run.
#[tokio::test]
async fn later_responses_from_a_host_that_was_sent_a_secret_are_scrubbed() {
    let stored: Arc<Mutex<String>> = Arc::default();
    let s = Arc::clone(&stored);
    let upstream = Upstream::start(
        false,
        Arc::new(move |req| {
            let s = Arc::clone(&s);
            Box::pin(async move {
                if let Some(a) = req.headers().get(AUTHORIZATION) {
                    *s.lock().expect("lock") = String::from_utf8_lossy(a.as_bytes()).into();
                }
                let last = s.lock().expect("lock").clone();
                Response::new(full(format!("last request carried: {last}")))
            })
        }),
    )
    .await;
    let mut r = rig(&upstream, false).await;
    // Before any secret went to this host, responses pass untouched.
    let first = within(
        "first",
        r.agent.send(
            Request::get("https://api.test/")
                .body(empty())
                .expect("req"),
        ),
    )
    .await
    .expect("response");
    assert!(
        first.headers().contains_key(CONTENT_LENGTH),
        "not scrubbed: length kept"
    );
    let _ = body_string(first).await;
    let sent = within(
        "sent",
        r.agent.send(with_placeholder("https://api.test/store")),
    )
    .await
    .expect("response");
    let _ = body_string(sent).await;
    assert_eq!(*stored.lock().expect("lock"), format!("Bearer {SECRET}"));
    let mut other = another_connection(&r, false).await;
    for agent in [&mut r.agent, &mut other] {
        let later = within(
            "later",
            agent.send(
                Request::get("https://api.test/requests")
                    .body(empty())
                    .expect("req"),
            ),
        )
        .await
        .expect("response");
        assert_eq!(
            body_string(later).await,
            format!("last request carried: Bearer {PLACEHOLDER}")
        );
    }
}

/// A streamed answer (server-sent events): events flow as they come, and a secret split
/// across two chunks is still replaced.
#[tokio::test]
async fn streamed_answers_keep_flowing_and_split_secrets_are_found() {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let upstream = Upstream::start(
        false,
        Arc::new(move |_req| {
            let rx = Arc::clone(&rx);
            Box::pin(async move {
                let rx = rx.lock().await.take().expect("one stream");
                let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv()
                        .await
                        .map(|b| (Ok::<_, TestError>(Frame::data(b)), rx))
                });
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(StreamBody::new(stream).boxed_unsync())
                    .expect("response")
            })
        }),
    )
    .await;
    let mut r = rig(&upstream, false).await;
    let response = within(
        "head",
        r.agent.send(with_placeholder("https://api.test/events")),
    )
    .await
    .expect("response");
    let mut body = response.into_body();
    tx.send(Bytes::from_static(b"data: hello\n\n"))
        .await
        .expect("send");
    let frame = within("first event", body.frame())
        .await
        .expect("frame")
        .expect("ok");
    assert_eq!(frame.into_data().expect("data"), "data: hello\n\n");
    let (a, b) = SECRET.split_at(7);
    tx.send(Bytes::from(format!("data: {a}")))
        .await
        .expect("send");
    tx.send(Bytes::from(format!("{b}\n\n")))
        .await
        .expect("send");
    drop(tx);
    let rest = within("rest", body.collect())
        .await
        .expect("rest")
        .to_bytes();
    assert_eq!(rest, format!("data: {PLACEHOLDER}\n\n"));
}

fn gzip(text: &str) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).expect("gzip");
    gz.finish().expect("gzip")
}

/// An upstream that compresses although asked not to: gzip is decoded and scrubbed, an
/// encoding the proxy cannot read is refused (502), never passed on. Ranges are not asked for.
#[tokio::test]
async fn compressed_answers_are_decoded_or_refused() {
    let upstream = Upstream::start(
        true,
        Arc::new(|req| {
            Box::pin(async move {
                let echoed = echo(&req);
                let text = body_string_of(echoed).await;
                let coding = if req.uri().path() == "/br" {
                    "br"
                } else {
                    "gzip"
                };
                Response::builder()
                    .header(CONTENT_ENCODING, coding)
                    .body(full(gzip(&text)))
                    .expect("response")
            })
        }),
    )
    .await;
    let mut r = rig(&upstream, true).await;
    let mut req = with_placeholder("https://api.test/gz");
    req.headers_mut()
        .insert("range", HeaderValue::from_static("bytes=0-15"));
    let response = within("gz", r.agent.send(req)).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        !response.headers().contains_key(CONTENT_ENCODING),
        "passed on decoded"
    );
    let body = body_string(response).await;
    assert!(
        body.contains(PLACEHOLDER) && !body.contains(SECRET),
        "{body}"
    );
    assert!(
        !upstream.seen()[0].headers.contains_key("range"),
        "no partial answers"
    );
    let refused = within("br", r.agent.send(with_placeholder("https://api.test/br")))
        .await
        .expect("response");
    assert_eq!(refused.status(), StatusCode::BAD_GATEWAY);
    let text = body_string(refused).await;
    assert!(text.contains("cannot be scrubbed"), "{text}");
    assert!(!text.contains(SECRET));
}

async fn body_string_of(r: Response<TestBody>) -> String {
    let bytes = r.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A WebSocket server that greets with the Authorization it received, base64-encoded and
/// raw in two fragments, then echoes.
async fn reflecting_websocket_upstream() -> Upstream {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame as WsFrame, FrameHeader};

    Upstream::start(
        false,
        Arc::new(|mut req| {
            Box::pin(async move {
                let key = req
                    .headers()
                    .get("sec-websocket-key")
                    .cloned()
                    .expect("key");
                let auth = req
                    .headers()
                    .get(AUTHORIZATION)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .unwrap_or_default();
                let on_upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    let Ok(upgraded) = on_upgrade.await else {
                        return;
                    };
                    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                        hyper_util::rt::TokioIo::new(upgraded),
                        Role::Server,
                        None,
                    )
                    .await;
                    let _ = ws.send(Message::text(STANDARD.encode(&auth))).await;
                    let (a, b) = auth.split_at(auth.len() / 2);
                    let frag = |fin: bool, op: OpCode, s: &str| {
                        Message::Frame(WsFrame::from_payload(
                            FrameHeader {
                                is_final: fin,
                                opcode: op,
                                ..FrameHeader::default()
                            },
                            Bytes::copy_from_slice(s.as_bytes()),
                        ))
                    };
                    let _ = ws.send(frag(false, OpCode::Data(Data::Text), a)).await;
                    let _ = ws.send(frag(true, OpCode::Data(Data::Continue), b)).await;
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_close() || ws.send(msg).await.is_err() {
                            break;
                        }
                    }
                });
                Response::builder()
                    .status(StatusCode::SWITCHING_PROTOCOLS)
                    .header("upgrade", "websocket")
                    .header("connection", "Upgrade")
                    .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
                    .body(empty())
                    .expect("response")
            })
        }),
    )
    .await
}

#[tokio::test]
async fn websocket_messages_reflecting_the_secret_are_scrubbed() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    let upstream = reflecting_websocket_upstream().await;
    let sink = Arc::new(MemorySink::default());
    let metrics = Arc::new(ProxyMetrics::new());
    let limits = HttpLimits::default();
    let pool = UpstreamPool::new(&ctx().run, upstream.connector(), &limits);
    let (io, _task) = proxy_with_pool(
        false,
        ctx(),
        pool,
        substituter(),
        audit_into(&sink, &metrics),
        limits,
    );
    let mut request = "ws://api.test/socket"
        .into_client_request()
        .expect("ws request");
    request.headers_mut().insert(
        AUTHORIZATION,
        HeaderValue::try_from(format!("Bearer {PLACEHOLDER}")).expect("header"),
    );
    request.headers_mut().insert(
        "sec-websocket-extensions",
        HeaderValue::from_static("permessage-deflate; client_max_window_bits"),
    );
    let (mut ws, _) = within("ws handshake", tokio_tungstenite::client_async(request, io))
        .await
        .expect("ws handshake through the proxy");
    let greeting = within("greeting", ws.next())
        .await
        .expect("msg")
        .expect("ok");
    let greeting = STANDARD
        .decode(greeting.into_text().expect("text").as_str())
        .expect("base64");
    assert!(
        String::from_utf8_lossy(&greeting).contains(PLACEHOLDER),
        "base64 greeting decodes to the placeholder"
    );
    let fragmented = within("fragments", ws.next())
        .await
        .expect("msg")
        .expect("ok");
    assert_eq!(
        fragmented.into_text().expect("text").as_str(),
        format!("Bearer {PLACEHOLDER}")
    );
    within("send", ws.send(Message::text("still works")))
        .await
        .expect("send");
    let echo = within("echo", ws.next()).await.expect("msg").expect("ok");
    assert_eq!(echo.into_text().expect("text").as_str(), "still works");
    let seen = upstream.seen();
    assert!(
        !seen[0].headers.contains_key("sec-websocket-extensions"),
        "no compression negotiated with the server"
    );
    assert_eq!(metrics.scrubbed_count(ScrubLocation::WebSocket), 2);
    assert!(scrubbed_records(&sink).iter().any(|r| {
        r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("websocket"))
    }));
}

/// Another protocol's tunnel cannot be scrubbed: to a host that holds secrets it is refused
/// before anything is sent.
#[tokio::test]
async fn other_upgrades_to_a_secret_holding_host_are_refused() {
    let upstream = Upstream::ok(false).await;
    let mut r = rig(&upstream, false).await;
    let req = Request::get("https://api.test/tunnel")
        .header(AUTHORIZATION, format!("Bearer {PLACEHOLDER}"))
        .header("connection", "upgrade")
        .header("upgrade", "my-raw-protocol")
        .body(empty())
        .expect("request");
    let response = within("upgrade", r.agent.send(req))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(upstream.seen().is_empty(), "nothing reached the upstream");
}
