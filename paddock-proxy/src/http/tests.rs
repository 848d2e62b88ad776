//! End-to-end tests of the request loop: an agent client over an in-memory pipe, the proxy,
//! and a local hyper upstream on loopback.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::header::{AUTHORIZATION, HOST};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::{mpsc, oneshot};

use super::substitute::tests::{CREDENTIAL, LEASE, PLACEHOLDER, PlaceholderSubstituter, SECRET};
use super::test_support::{
    Agent, DST, End, Fail, TestBody, TestConnector, TestError, Upstream, audit_into, body_string,
    ctx, empty, full, proxy, proxy_audited, proxy_with_pool, proxy_with_recheck, raw_upstream,
    unobserved_audit, within,
};
use super::{
    BoxFuture, DENIED_HEADER, HttpLimits, NoopSubstituter, RequestAudit, RequestContext,
    RequestHead, SubstituteError, Substituted, Substituter, UpstreamPool, serve_denial,
};
use crate::audit::{AuditKind, MemorySink};
use crate::metrics::ProxyMetrics;

fn noop() -> Arc<dyn Substituter> {
    Arc::new(NoopSubstituter)
}

fn get(uri: &str) -> Request<TestBody> {
    Request::get(uri).body(empty()).expect("request")
}

/// A capturing audit for one test proxy: where its records go, the metrics counting failed
/// writes, and the `RequestAudit` to hand to the proxy.
fn capture(sink: MemorySink) -> (Arc<MemorySink>, Arc<ProxyMetrics>, RequestAudit) {
    let sink = Arc::new(sink);
    let metrics = Arc::new(ProxyMetrics::new());
    let audit = audit_into(&sink, &metrics);
    (sink, metrics, audit)
}

/// A body the test feeds frame by frame.
fn channel_body() -> (mpsc::Sender<Result<Frame<Bytes>, TestError>>, TestBody) {
    let (tx, rx) = mpsc::channel(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (tx, StreamBody::new(stream).boxed_unsync())
}

#[tokio::test]
async fn get_across_protocol_combinations() {
    for (agent_h2, upstream_h2) in [(false, false), (true, true), (false, true), (true, false)] {
        let upstream = Upstream::ok(upstream_h2).await;
        let connector = upstream.connector();
        let (io, _proxy) = proxy(agent_h2, connector.clone(), noop(), HttpLimits::default());
        let (mut agent, _conn) = Agent::connect(io, agent_h2).await;
        let response = within(
            "response",
            agent.send(get("https://api.test/v1/models?limit=2")),
        )
        .await
        .expect("response");
        let combo = format!("agent h2={agent_h2} upstream h2={upstream_h2}");
        assert_eq!(response.status(), StatusCode::OK, "{combo}");
        assert_eq!(body_string(response).await, "ok", "{combo}");

        let seen = upstream.seen();
        assert_eq!(seen.len(), 1, "{combo}");
        let req = &seen[0];
        assert_eq!(req.uri.path(), "/v1/models", "{combo}");
        assert_eq!(req.uri.query(), Some("limit=2"), "{combo}");
        if upstream_h2 {
            assert_eq!(req.version, Version::HTTP_2, "{combo}");
            assert_eq!(
                req.uri.authority().map(http::uri::Authority::as_str),
                Some("api.test"),
                "{combo}"
            );
            assert!(
                !req.headers.contains_key(HOST),
                "{combo}: h2 carries :authority only"
            );
        } else {
            assert_eq!(req.version, Version::HTTP_11, "{combo}");
            assert_eq!(req.headers[HOST], "api.test", "{combo}");
        }
        let target = connector.targets.lock().expect("targets")[0].clone();
        assert_eq!(
            (target.host.as_str(), target.port, target.tls),
            ("api.test", 443, true)
        );
    }
}

#[tokio::test]
async fn pooled_connections_are_reused() {
    // HTTP/1.1 keep-alive: sequential requests share one upstream connection.
    let upstream = Upstream::ok(false).await;
    let connector = upstream.connector();
    let (io, _proxy) = proxy(false, connector.clone(), noop(), HttpLimits::default());
    let (mut agent, _conn) = Agent::connect(io, false).await;
    for _ in 0..3 {
        let response = within("response", agent.send(get("https://api.test/")))
            .await
            .expect("response");
        assert_eq!(body_string(response).await, "ok");
    }
    assert_eq!(connector.dials(), 1);

    // HTTP/2: once a connection is up, concurrent requests from two agent connections
    // multiplex on it. (Before that, hyper-util dials speculatively per waiting request.)
    let upstream = Upstream::ok(true).await;
    let connector = upstream.connector();
    let limits = HttpLimits::default();
    let pool = UpstreamPool::new("run-1", connector.clone(), &limits);
    let (io, _proxy) = proxy_with_pool(
        true,
        ctx(),
        pool.clone(),
        noop(),
        unobserved_audit(),
        limits.clone(),
    );
    let (mut agent, _conn) = Agent::connect(io, true).await;
    let response = within("response", agent.send(get("https://api.test/")))
        .await
        .expect("response");
    assert_eq!(body_string(response).await, "ok");
    let mut requests = Vec::new();
    for _ in 0..2 {
        let (io, _proxy) = proxy_with_pool(
            true,
            ctx(),
            pool.clone(),
            noop(),
            unobserved_audit(),
            limits.clone(),
        );
        let (agent, _conn) = Agent::connect(io, true).await;
        let Agent::H2(sender) = agent else {
            panic!("h2 agent")
        };
        for _ in 0..4 {
            let mut sender = sender.clone();
            requests.push(tokio::spawn(async move {
                sender.send_request(get("https://api.test/")).await
            }));
        }
    }
    for r in requests {
        let response = within("response", r)
            .await
            .expect("task")
            .expect("response");
        assert_eq!(body_string(response).await, "ok");
    }
    assert_eq!(upstream.seen().len(), 9);
    assert_eq!(connector.dials(), 1, "one multiplexed h2 connection");
}

#[tokio::test]
async fn pool_of_another_run_is_refused() {
    let upstream = Upstream::ok(false).await;
    let limits = HttpLimits::default();
    let pool = UpstreamPool::new("run-2", upstream.connector(), &limits);
    let (_io, task) = proxy_with_pool(false, ctx(), pool, noop(), unobserved_audit(), limits);
    let err = within("refusal", task)
        .await
        .expect("task")
        .expect_err("mismatch");
    assert_eq!(err.reason(), "pool_run_mismatch");
}

#[tokio::test]
async fn placeholders_are_substituted_in_all_four_positions() {
    for agent_h2 in [false, true] {
        let upstream = Upstream::ok(agent_h2).await;
        let sub = Arc::new(PlaceholderSubstituter { deny_host: None });
        let (io, _proxy) = proxy(agent_h2, upstream.connector(), sub, HttpLimits::default());
        let (mut agent, _conn) = Agent::connect(io, agent_h2).await;
        let basic = |p: &str| {
            use base64::Engine as _;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("git:{p}"))
            )
        };
        let requests = [
            Request::get("https://api.test/a")
                .header(AUTHORIZATION, format!("Bearer {PLACEHOLDER}"))
                .header("x-api-key", PLACEHOLDER),
            Request::get(format!("https://api.test/b?key={PLACEHOLDER}&x=1")),
            Request::get("https://api.test/repo.git/info/refs")
                .header(AUTHORIZATION, basic(PLACEHOLDER)),
        ];
        for req in requests {
            let response = within("response", agent.send(req.body(empty()).expect("request")))
                .await
                .expect("response");
            assert_eq!(response.status(), StatusCode::OK);
        }
        let seen = upstream.seen();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].headers[AUTHORIZATION], format!("Bearer {SECRET}"));
        assert_eq!(seen[0].headers["x-api-key"], SECRET);
        assert_eq!(
            seen[1].uri.query(),
            Some("key=sk-real%2Fsecret%2Bvalue%3D1&x=1")
        );
        assert_eq!(seen[2].headers[AUTHORIZATION], basic(SECRET));
        for s in &seen {
            let all = format!("{:?} {:?}", s.uri, s.headers);
            assert!(
                !all.contains(PLACEHOLDER),
                "placeholder leaked upstream: {all}"
            );
        }
    }
}

/// A substituter whose broker is down.
#[derive(Debug)]
struct Unavailable;

impl Substituter for Unavailable {
    fn substitute<'a>(
        &'a self,
        _head: &'a mut RequestHead<'_>,
        _ctx: &'a RequestContext,
    ) -> BoxFuture<'a, Result<Substituted, SubstituteError>> {
        Box::pin(async {
            Err(SubstituteError::Unavailable {
                reason: "broker unreachable".into(),
            })
        })
    }
}

#[tokio::test]
async fn failed_substitution_is_never_forwarded() {
    let cases: [(Arc<dyn Substituter>, StatusCode, Option<&str>); 2] = [
        (
            Arc::new(PlaceholderSubstituter {
                deny_host: Some("api.test".into()),
            }),
            StatusCode::FORBIDDEN,
            Some("substitution_denied"),
        ),
        (Arc::new(Unavailable), StatusCode::BAD_GATEWAY, None),
    ];
    for (sub, status, denied) in cases {
        for agent_h2 in [false, true] {
            let upstream = Upstream::ok(false).await;
            let connector = upstream.connector();
            let (io, _proxy) = proxy(
                agent_h2,
                connector.clone(),
                sub.clone(),
                HttpLimits::default(),
            );
            let (mut agent, _conn) = Agent::connect(io, agent_h2).await;
            let req = Request::post("https://api.test/v1/messages")
                .header(AUTHORIZATION, format!("Bearer {PLACEHOLDER}"))
                .body(full("{}"))
                .expect("request");
            let response = within("response", agent.send(req)).await.expect("response");
            assert_eq!(response.status(), status);
            assert_eq!(
                response
                    .headers()
                    .get(DENIED_HEADER)
                    .map(|v| v.to_str().expect("ascii")),
                denied
            );
            assert!(upstream.seen().is_empty(), "request reached upstream");
            assert_eq!(connector.dials(), 0, "upstream was even dialled");
        }
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let upstream = Upstream::start(
        false,
        Arc::new(|_req| {
            Box::pin(async {
                Response::builder()
                    .header("connection", "x-resp-hop")
                    .header("x-resp-hop", "1")
                    .header("keep-alive", "timeout=5")
                    .header("x-resp-end", "1")
                    .body(full("ok"))
                    .expect("response")
            })
        }),
    )
    .await;
    let (io, _proxy) = proxy(false, upstream.connector(), noop(), HttpLimits::default());
    let (mut agent, _conn) = Agent::connect(io, false).await;
    let req = Request::get("https://api.test/")
        .header("connection", "x-hop, keep-alive")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic cHJveHk6c2VjcmV0")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers, gzip")
        .header("x-end", "1")
        .body(empty())
        .expect("request");
    let response = within("response", agent.send(req)).await.expect("response");
    assert_eq!(response.headers()["x-resp-end"], "1");
    for name in ["x-resp-hop", "keep-alive"] {
        assert!(
            !response.headers().contains_key(name),
            "{name} reached the agent"
        );
    }
    let seen = upstream.seen();
    let h = &seen[0].headers;
    assert_eq!(h["x-end"], "1");
    assert_eq!(h["te"], "trailers");
    for name in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(!h.contains_key(name), "{name} reached upstream");
    }
}

#[tokio::test]
async fn requests_for_other_authorities_are_refused() {
    let upstream = Upstream::ok(false).await;
    let connector = upstream.connector();
    let (io, _proxy) = proxy(false, connector.clone(), noop(), HttpLimits::default());
    let (mut agent, _conn) = Agent::connect(io, false).await;
    let req = Request::get("/")
        .header(HOST, "evil.test")
        .body(empty())
        .expect("request");
    let response = within("response", agent.send(req)).await.expect("response");
    assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(response.headers()[DENIED_HEADER], "misdirected_request");

    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("evil.test:443")
        .header(HOST, "evil.test:443")
        .body(empty())
        .expect("request");
    let Agent::H1(sender) = &mut agent else {
        panic!("h1 agent")
    };
    let response = within("response", sender.send_request(req))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(upstream.seen().is_empty());
    assert_eq!(connector.dials(), 0);
}

/// The connection remembers the last `Host` that passed: a different one later on the same
/// connection is still checked, and so is an absolute URI beside a remembered `Host`.
#[tokio::test]
async fn a_remembered_host_lets_only_the_same_bytes_through() {
    let upstream = Upstream::ok(false).await;
    let (io, _proxy) = proxy(false, upstream.connector(), noop(), HttpLimits::default());
    let (mut agent, _conn) = Agent::connect(io, false).await;
    let cases = [
        ("/", "api.test", StatusCode::OK),
        ("/", "evil.test", StatusCode::MISDIRECTED_REQUEST),
        ("/", "api.test", StatusCode::OK),
        ("/", "api.test:444", StatusCode::MISDIRECTED_REQUEST),
        ("/", "API.test:443", StatusCode::OK),
        ("/", "api.test", StatusCode::OK),
        (
            "https://evil.test/",
            "api.test",
            StatusCode::MISDIRECTED_REQUEST,
        ),
        ("/", "api.test@evil.test", StatusCode::BAD_REQUEST),
        ("/", "api.test", StatusCode::OK),
    ];
    for (uri, host, status) in cases {
        let req = Request::get(uri)
            .header(HOST, host)
            .body(empty())
            .expect("request");
        // The helper turns URIs into origin form; an absolute one goes out as it is.
        let sent = match &mut agent {
            Agent::H1(sender) if uri.starts_with("https:") => {
                futures_util::future::Either::Left(sender.send_request(req))
            }
            agent => futures_util::future::Either::Right(agent.send(req)),
        };
        let response = within("response", sent).await.expect("response");
        assert_eq!(response.status(), status, "{uri} with Host {host}");
    }
    assert_eq!(
        upstream.seen().len(),
        5,
        "only the allowed requests went upstream"
    );
}

#[tokio::test]
async fn upstream_failures_map_to_gateway_errors() {
    let limits = HttpLimits {
        upstream_connect_timeout: Duration::from_millis(200),
        ..HttpLimits::default()
    };
    let cases = [
        (Fail::Refused, StatusCode::BAD_GATEWAY),
        (Fail::Denied, StatusCode::FORBIDDEN),
        (Fail::Hang, StatusCode::GATEWAY_TIMEOUT),
    ];
    for (fail, status) in cases {
        let connector = TestConnector::failing(fail);
        let (io, _proxy) = proxy(false, connector.clone(), noop(), limits.clone());
        let (mut agent, _conn) = Agent::connect(io, false).await;
        let response = within("response", agent.send(get("https://api.test/")))
            .await
            .expect("response");
        assert_eq!(response.status(), status, "{fail:?}");
        assert!(body_string(response).await.starts_with("paddock: "));
        assert_eq!(connector.dials(), 1, "{fail:?}: one dial, no retry");
    }

    // An upstream that accepts but never answers: 504 once the response deadline passes.
    let upstream = Upstream::start(
        false,
        Arc::new(|_req| {
            Box::pin(async {
                std::future::pending::<()>().await;
                Response::new(empty())
            })
        }),
    )
    .await;
    let limits = HttpLimits {
        upstream_response_timeout: Duration::from_millis(300),
        ..HttpLimits::default()
    };
    let connector = upstream.connector();
    let (io, _proxy) = proxy(false, connector.clone(), noop(), limits);
    let (mut agent, _conn) = Agent::connect(io, false).await;
    let response = within("response", agent.send(get("https://api.test/")))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    // Sent once: the slow upstream is not asked again, nor is another connection opened.
    assert_eq!(upstream.seen().len(), 1);
    assert_eq!(connector.dials(), 1);
}

/// The response timer is the agent connection's, moved to each request's deadline: a timer
/// that fired for one request does not fire early for the next, and a request after a
/// quick one still gets its whole timeout and no more.
#[tokio::test]
async fn each_request_on_a_connection_gets_its_own_response_deadline() {
    let upstream = Upstream::start(
        false,
        Arc::new(|req| {
            let slow = req.uri().path() == "/slow";
            Box::pin(async move {
                if slow {
                    std::future::pending::<()>().await;
                }
                Response::new(full("ok"))
            })
        }),
    )
    .await;
    let timeout = Duration::from_millis(300);
    let limits = HttpLimits {
        upstream_response_timeout: timeout,
        ..HttpLimits::default()
    };
    let (io, _proxy) = proxy(false, upstream.connector(), noop(), limits);
    let (mut agent, _conn) = Agent::connect(io, false).await;
    for path in ["/fast", "/slow", "/fast", "/fast", "/slow", "/fast"] {
        let started = tokio::time::Instant::now();
        let response = within(
            "response",
            agent.send(get(&format!("https://api.test{path}"))),
        )
        .await
        .expect("response");
        let took = started.elapsed();
        if path == "/slow" {
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
            assert!(took >= timeout, "{path}: timed out after {took:?}");
            assert!(took < timeout * 5, "{path}: timed out only after {took:?}");
        } else {
            assert_eq!(response.status(), StatusCode::OK, "{path} after {took:?}");
        }
    }
}

#[tokio::test]
async fn an_upstream_reset_before_the_answer_is_a_502_and_is_not_retried() {
    use std::sync::atomic::Ordering;
    for agent_h2 in [false, true] {
        let (connector, heads, task) = raw_upstream(b"", End::Reset).await;
        let (sink, _metrics, audit) = capture(MemorySink::default());
        let (io, _proxy) = proxy_audited(
            agent_h2,
            connector.clone(),
            noop(),
            HttpLimits::default(),
            audit,
        );
        let (mut agent, _conn) = Agent::connect(io, agent_h2).await;
        // Not idempotent: sending it twice would charge twice.
        let req = Request::post("https://api.test/charge")
            .body(full("amount=1"))
            .expect("request");
        let response = within("response", agent.send(req))
            .await
            .expect("an answer");
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "h2={agent_h2}");
        assert!(body_string(response).await.starts_with("paddock: "));
        assert_eq!(heads.load(Ordering::SeqCst), 1, "h2={agent_h2}: sent once");
        assert_eq!(connector.dials(), 1, "h2={agent_h2}: one dial, no retry");
        let r = &sink.records()[0];
        assert_eq!(
            (r["status"].as_u64(), r["outcome"].as_str()),
            (Some(502), Some("failed")),
            "{r}"
        );
        task.abort();
    }
}

#[tokio::test]
async fn an_upstream_reset_mid_response_never_looks_complete() {
    use std::sync::atomic::Ordering;
    for agent_h2 in [false, true] {
        let (connector, heads, task) = raw_upstream(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\ncontent-type: text/plain\r\n\r\npartial answer",
            End::Reset,
        )
        .await;
        let (io, _proxy) = proxy(agent_h2, connector.clone(), noop(), HttpLimits::default());
        let (mut agent, _conn) = Agent::connect(io, agent_h2).await;
        let response = within("response", agent.send(get("https://api.test/report")))
            .await
            .expect("the head was relayed");
        assert_eq!(response.status(), StatusCode::OK);
        // The agent must see the break: a truncated body that ends cleanly would look whole.
        let body = within("body", response.into_body().collect()).await;
        assert!(body.is_err(), "h2={agent_h2}: the body ended cleanly");
        assert_eq!(heads.load(Ordering::SeqCst), 1, "h2={agent_h2}: sent once");
        assert_eq!(connector.dials(), 1, "h2={agent_h2}: one dial, no retry");
        task.abort();
    }
}

#[tokio::test]
async fn large_upload_streams_through() {
    const CHUNK: usize = 1024 * 1024;
    const CHUNKS: usize = 100;
    let (first_tx, first_rx) = oneshot::channel::<()>();
    let first_tx = Arc::new(std::sync::Mutex::new(Some(first_tx)));
    let upstream = Upstream::start(
        false,
        Arc::new(move |req| {
            let first_tx = Arc::clone(&first_tx);
            Box::pin(async move {
                let mut body = req.into_body();
                let mut total = 0usize;
                let mut sum = 0u64;
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { break };
                    if let Some(data) = frame.data_ref() {
                        if total == 0 && !data.is_empty() {
                            // The agent has sent one chunk of a hundred and is waiting for
                            // this signal: a proxy buffering the body never gets here.
                            if let Some(tx) = first_tx.lock().expect("lock").take() {
                                let _ = tx.send(());
                            }
                        }
                        total += data.len();
                        sum += data.iter().map(|b| u64::from(*b)).sum::<u64>();
                    }
                }
                Response::new(full(format!("{total} {sum}")))
            })
        }),
    )
    .await;
    let (io, _proxy) = proxy(false, upstream.connector(), noop(), HttpLimits::default());
    let (mut agent, _conn) = Agent::connect(io, false).await;
    let (tx, body) = channel_body();
    let sender = tokio::spawn(async move {
        let mut expected_sum = 0u64;
        let mut first_rx = Some(first_rx);
        for i in 0..CHUNKS {
            let byte = u8::try_from(i % 251).expect("fits");
            let chunk = Bytes::from(vec![byte; CHUNK]);
            expected_sum += u64::from(byte) * CHUNK as u64;
            tx.send(Ok(Frame::data(chunk))).await.expect("send chunk");
            if let Some(rx) = first_rx.take() {
                within("upstream to see the first chunk", rx)
                    .await
                    .expect("first-chunk signal");
            }
        }
        expected_sum
    });
    let req = Request::post("https://api.test/upload")
        .body(body)
        .expect("request");
    let response = within("upload response", agent.send(req))
        .await
        .expect("response");
    let expected_sum = within("sender", sender).await.expect("sender task");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        body_string(response).await,
        format!("{} {expected_sum}", CHUNK * CHUNKS)
    );
    let seen = upstream.seen();
    assert_eq!(seen[0].method, Method::POST);
    assert_eq!(seen[0].headers["transfer-encoding"], "chunked");
}

#[tokio::test]
async fn server_sent_events_stream_before_upstream_finishes() {
    for h2 in [false, true] {
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(Some(release_rx)));
        let upstream = Upstream::start(
            h2,
            Arc::new(move |_req| {
                let release_rx = release_rx.lock().expect("lock").take();
                Box::pin(async move {
                    let (tx, body) = channel_body();
                    tokio::spawn(async move {
                        let _ = tx.send(Ok(Frame::data(Bytes::from("data: one\n\n")))).await;
                        // Hold the stream open until the agent has seen the first event.
                        if let Some(rx) = release_rx {
                            let _ = rx.await;
                        }
                        let _ = tx.send(Ok(Frame::data(Bytes::from("data: two\n\n")))).await;
                    });
                    Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(body)
                        .expect("response")
                })
            }),
        )
        .await;
        let (sink, _metrics, audit) = capture(MemorySink::default());
        let (io, _proxy) = proxy_audited(
            h2,
            upstream.connector(),
            noop(),
            HttpLimits::default(),
            audit,
        );
        let (mut agent, _conn) = Agent::connect(io, h2).await;
        let response = within("response", agent.send(get("https://api.test/events")))
            .await
            .expect("response");
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        // On record as soon as the head is out, while the stream is still open.
        let records = sink.records();
        assert_eq!(records.len(), 1, "h2={h2}");
        assert_eq!(records[0]["status"], 200);
        assert_eq!(records[0]["path"], "/events");
        let mut body = response.into_body();
        let first = within("first event", body.frame())
            .await
            .expect("a frame")
            .expect("frame ok")
            .into_data()
            .expect("data");
        assert_eq!(first, "data: one\n\n");
        release_tx.send(()).expect("release");
        let rest = within("rest", body.collect())
            .await
            .expect("rest")
            .to_bytes();
        assert_eq!(rest, "data: two\n\n");
    }
}

#[tokio::test]
async fn grpc_trailers_reach_the_agent() {
    let upstream = Upstream::start(
        true,
        Arc::new(|_req| {
            Box::pin(async {
                let (tx, body) = channel_body();
                tokio::spawn(async move {
                    let _ = tx
                        .send(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))))
                        .await;
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    trailers.insert("grpc-message", HeaderValue::from_static("done"));
                    let _ = tx.send(Ok(Frame::trailers(trailers))).await;
                });
                Response::builder()
                    .header("content-type", "application/grpc")
                    .body(body)
                    .expect("response")
            })
        }),
    )
    .await;
    let (io, _proxy) = proxy(true, upstream.connector(), noop(), HttpLimits::default());
    let (mut agent, _conn) = Agent::connect(io, true).await;
    let req = Request::post("https://api.test/pkg.Service/Method")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(Bytes::from_static(b"\0\0\0\0\x00")))
        .expect("request");
    let response = within("response", agent.send(req)).await.expect("response");
    assert_eq!(response.headers()["content-type"], "application/grpc");
    let collected = within("body", response.into_body().collect())
        .await
        .expect("body");
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers reached the agent");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "done");
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"\0\0\0\0\x02hi"));
    let seen = upstream.seen();
    assert_eq!(seen[0].headers["te"], "trailers");
    assert_eq!(seen[0].version, Version::HTTP_2);
}

/// An upstream accepting WebSocket upgrades and echoing text and binary messages.
async fn websocket_echo_upstream() -> Upstream {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;

    Upstream::start(
        false,
        Arc::new(|mut req| {
            Box::pin(async move {
                let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                    return Response::builder()
                        .status(StatusCode::BAD_REQUEST)
                        .body(empty())
                        .expect("response");
                };
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
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_text() || msg.is_binary() {
                            if ws.send(msg).await.is_err() {
                                break;
                            }
                        } else if msg.is_close() {
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
async fn websocket_echo_through_the_proxy() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    let upstream = websocket_echo_upstream().await;
    let sub = Arc::new(PlaceholderSubstituter { deny_host: None });
    let (sink, _metrics, audit) = capture(MemorySink::default());
    let (io, proxy) = proxy_audited(
        false,
        upstream.connector(),
        sub,
        HttpLimits::default(),
        audit,
    );
    let mut request = format!("ws://api.test/socket?token={PLACEHOLDER}")
        .into_client_request()
        .expect("ws request");
    request.headers_mut().insert(
        AUTHORIZATION,
        HeaderValue::try_from(format!("Bearer {PLACEHOLDER}")).expect("header"),
    );
    let (mut ws, response) = within("ws handshake", tokio_tungstenite::client_async(request, io))
        .await
        .expect("ws handshake through the proxy");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    // Recorded with 101 when the switch is answered, not when the tunnel closes.
    let text = sink.text();
    let r: serde_json::Value = serde_json::from_str(&text).expect("one record");
    let shape = (&r["status"], &r["outcome"], &r["path"], &r["credential"]);
    assert_eq!(
        shape,
        (
            &101.into(),
            &"forwarded".into(),
            &"/socket".into(),
            &CREDENTIAL.into()
        )
    );
    assert!(
        !text.contains(PLACEHOLDER) && !text.contains("token="),
        "{text}"
    );
    for text in ["hello", "again"] {
        within("ws send", ws.send(Message::text(text)))
            .await
            .expect("send");
        let echo = within("ws echo", ws.next())
            .await
            .expect("a message")
            .expect("ok");
        assert_eq!(echo.into_text().expect("text").as_str(), text);
    }
    // The tunnel holds its connection: the connection's future (its slot under the cap,
    // its span, the drain) lasts until the tunnel closes.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        !proxy.is_finished(),
        "an open WebSocket tunnel must keep its agent connection accounted"
    );
    within("ws close", ws.close(None)).await.expect("close");
    drop(ws);
    within("connection ends with its tunnel", proxy)
        .await
        .expect("join")
        .expect("connection ok");

    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(h["upgrade"], "websocket");
    assert_eq!(h["connection"], "upgrade");
    assert_eq!(
        h[AUTHORIZATION],
        format!("Bearer {SECRET}"),
        "upgrade went through the hook"
    );
    assert_eq!(
        seen[0].uri.query(),
        Some("token=sk-real%2Fsecret%2Bvalue%3D1")
    );
}

#[tokio::test]
async fn upgrade_refused_by_upstream_is_forwarded_as_a_response() {
    let upstream = Upstream::start(
        false,
        Arc::new(|_req| {
            Box::pin(async {
                Response::builder()
                    .status(StatusCode::UPGRADE_REQUIRED)
                    .body(full("no"))
                    .expect("response")
            })
        }),
    )
    .await;
    let (io, _proxy) = proxy(false, upstream.connector(), noop(), HttpLimits::default());
    let (mut agent, _conn) = Agent::connect(io, false).await;
    let req = Request::get("https://api.test/ws")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(empty())
        .expect("request");
    let response = within("response", agent.send(req)).await.expect("response");
    assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(body_string(response).await, "no");
}

#[tokio::test]
async fn oversized_headers_get_431_and_are_not_forwarded() {
    let limits = HttpLimits {
        max_header_bytes: 16 * 1024,
        ..HttpLimits::default()
    };
    for agent_h2 in [false, true] {
        let upstream = Upstream::ok(false).await;
        let connector = upstream.connector();
        let (io, _proxy) = proxy(agent_h2, connector.clone(), noop(), limits.clone());
        let (mut agent, _conn) = Agent::connect(io, agent_h2).await;
        let req = Request::get("https://api.test/")
            // Over the cap but under h2's abuse threshold (4x), which is a GOAWAY instead.
            .header("x-big", "a".repeat(24 * 1024))
            .body(empty())
            .expect("request");
        let response = within("response", agent.send(req)).await.expect("response");
        assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "agent h2={agent_h2}"
        );
        assert!(upstream.seen().is_empty());
        assert_eq!(connector.dials(), 0);
    }

    // Past h2's abuse threshold (4x the cap) the whole connection is refused (GOAWAY).
    let upstream = Upstream::ok(false).await;
    let (io, _proxy) = proxy(true, upstream.connector(), noop(), limits);
    let (mut agent, _conn) = Agent::connect(io, true).await;
    let req = Request::get("https://api.test/")
        .header("x-big", "a".repeat(80 * 1024))
        .body(empty())
        .expect("request");
    assert!(within("refusal", agent.send(req)).await.is_err());
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn denial_page_over_http1_and_http2() {
    for h2 in [false, true] {
        let (io, proxy_side) = tokio::io::duplex(64 * 1024);
        let alpn: Option<&'static [u8]> = if h2 { Some(b"h2") } else { None };
        let denial = tokio::spawn(async move {
            serve_denial(proxy_side, alpn, "evil.test", "policy_denied").await
        });
        let (mut agent, conn) = Agent::connect(io, h2).await;
        let req = Request::post("https://evil.test/upload")
            .body(full("payload"))
            .expect("request");
        let response = within("denial", agent.send(req)).await.expect("response");
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "h2={h2}");
        assert_eq!(response.headers()[DENIED_HEADER], "policy_denied");
        let body = body_string(response).await;
        assert!(
            body.contains("evil.test") && body.contains("policy_denied"),
            "{body}"
        );
        within("denial connection to close", denial)
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("h2={h2}: {e:?}"));
        within("agent connection to close", conn)
            .await
            .expect("agent conn");
        assert!(
            agent.send(get("https://evil.test/")).await.is_err(),
            "connection still open after the denial"
        );
    }
}

#[tokio::test]
async fn h2c_upgrade_is_forwarded_as_a_plain_request() {
    let upstream = Upstream::ok(false).await;
    let (io, _proxy) = proxy(false, upstream.connector(), noop(), HttpLimits::default());
    let (mut agent, _conn) = Agent::connect(io, false).await;
    let req = Request::get("https://api.test/")
        .header("connection", "Upgrade, HTTP2-Settings")
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAAQAAP__")
        .body(empty())
        .expect("request");
    let response = within("response", agent.send(req)).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let seen = upstream.seen();
    for name in ["upgrade", "connection", "http2-settings"] {
        assert!(
            !seen[0].headers.contains_key(name),
            "{name} reached upstream"
        );
    }
}

#[tokio::test]
async fn switch_to_an_unoffered_protocol_is_refused() {
    let upstream = Upstream::start(
        false,
        Arc::new(|_req| {
            Box::pin(async {
                Response::builder()
                    .status(StatusCode::SWITCHING_PROTOCOLS)
                    .header("upgrade", "something-else")
                    .header("connection", "upgrade")
                    .body(empty())
                    .expect("response")
            })
        }),
    )
    .await;
    let (io, _proxy) = proxy(false, upstream.connector(), noop(), HttpLimits::default());
    let (mut agent, _conn) = Agent::connect(io, false).await;
    let req = Request::get("https://api.test/ws")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(empty())
        .expect("request");
    let response = within("response", agent.send(req)).await.expect("response");
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn via_is_added_only_when_configured() {
    for via in [None, Some(HeaderValue::from_static("1.1 paddock"))] {
        let upstream = Upstream::ok(false).await;
        let limits = HttpLimits {
            via: via.clone(),
            ..HttpLimits::default()
        };
        let (io, _proxy) = proxy(false, upstream.connector(), noop(), limits);
        let (mut agent, _conn) = Agent::connect(io, false).await;
        let response = within("response", agent.send(get("https://api.test/")))
            .await
            .expect("response");
        assert_eq!(response.headers().get("via"), via.as_ref());
        assert_eq!(upstream.seen()[0].headers.get("via"), via.as_ref());
    }
}

#[tokio::test]
async fn drain_finishes_in_flight_requests_then_closes() {
    for h2 in [false, true] {
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(Some(release_rx)));
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let started_tx = Arc::new(std::sync::Mutex::new(Some(started_tx)));
        let upstream = Upstream::start(
            false,
            Arc::new(move |_req| {
                let release_rx = release_rx.lock().expect("lock").take();
                let started_tx = started_tx.lock().expect("lock").take();
                Box::pin(async move {
                    if let Some(tx) = started_tx {
                        let _ = tx.send(());
                    }
                    if let Some(rx) = release_rx {
                        let _ = rx.await;
                    }
                    Response::new(full("finished"))
                })
            }),
        )
        .await;
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let (io, served) = serve_raw(&upstream, h2, HttpLimits::default(), async move {
            let _ = shutdown_rx.await;
        });
        let (mut agent, _conn) = Agent::connect(io, h2).await;
        let in_flight = tokio::spawn(async move {
            let response = agent.send(get("https://api.test/slow")).await;
            (agent, response)
        });
        within("request to reach upstream", started_rx)
            .await
            .expect("started");
        shutdown_tx.send(()).expect("shutdown");
        release_tx.send(()).expect("release");
        let (mut agent, response) = within("in-flight request", in_flight).await.expect("task");
        let response = response.expect("in-flight request completes during the drain");
        assert_eq!(body_string(response).await, "finished", "h2={h2}");
        within("connection to drain", served)
            .await
            .expect("task")
            .expect("drained cleanly");
        assert!(
            agent.send(get("https://api.test/")).await.is_err(),
            "h2={h2}: new request accepted after the drain"
        );
        assert_eq!(upstream.seen().len(), 1);
    }
}

#[tokio::test]
async fn every_request_on_a_keep_alive_connection_is_audited_once() {
    let upstream = Upstream::start(
        false,
        Arc::new(|req| {
            let status = match (req.method(), req.uri().path()) {
                (_, "/missing") => StatusCode::NOT_FOUND,
                (&Method::POST, _) => StatusCode::CREATED,
                _ => StatusCode::OK,
            };
            Box::pin(async move {
                Response::builder()
                    .status(status)
                    .body(full("x"))
                    .expect("response")
            })
        }),
    )
    .await;
    let connector = upstream.connector();
    let (sink, metrics, audit) = capture(MemorySink::default());
    let (io, _proxy) = proxy_audited(
        false,
        connector.clone(),
        noop(),
        HttpLimits::default(),
        audit,
    );
    let (mut agent, _conn) = Agent::connect(io, false).await;
    let requests = [
        (
            Method::GET,
            "/v1/models",
            "?limit=2&key=pdk-query-value",
            200,
        ),
        (Method::POST, "/v1/messages", "?beta=true", 201),
        (Method::DELETE, "/missing", "", 404),
        (Method::GET, "/", "", 200),
    ];
    for (i, (method, path, query, status)) in requests.iter().enumerate() {
        let req = Request::builder()
            .method(method.clone())
            .uri(format!("https://api.test{path}{query}"))
            .body(empty())
            .expect("request");
        let response = within("response", agent.send(req)).await.expect("response");
        assert_eq!(response.status().as_u16(), *status);
        // On record by the time the agent has the head.
        assert_eq!(sink.records().len(), i + 1);
        body_string(response).await;
    }
    assert_eq!(connector.dials(), 1, "one keep-alive upstream connection");

    let records = sink.records();
    assert_eq!(
        records.len(),
        requests.len(),
        "exactly one record per request"
    );
    for (r, (method, path, _, status)) in records.iter().zip(&requests) {
        assert_eq!(r["kind"], "request", "{r}");
        assert_eq!(r["method"], method.as_str(), "{r}");
        assert_eq!(r["path"], *path, "{r}");
        assert_eq!(r["status"], *status, "{r}");
        assert_eq!(r["protocol"], "HTTP/1.1", "{r}");
        assert_eq!(r["outcome"], "forwarded", "{r}");
        assert_eq!(r["run"], "run-1", "{r}");
        assert_eq!(r["sni"], "api.test", "{r}");
        assert_eq!(r["port"], 443, "{r}");
        assert_eq!(r["dst"], DST.to_string(), "{r}");
        assert_eq!(r["mode"], "transparent", "{r}");
        for absent in ["credential", "lease_id", "reason", "rule"] {
            assert_eq!(
                r.get(absent),
                Some(&serde_json::Value::Null),
                "{absent}: {r}"
            );
        }
    }
    let text = sink.text();
    for query in [
        '?'.to_string(),
        "limit=".into(),
        "pdk-query-value".into(),
        "beta".into(),
    ] {
        assert!(!text.contains(&query), "query in the audit: {text}");
    }
    assert_eq!(metrics.audit_write_failures(AuditKind::Request), 0);
}

#[tokio::test]
async fn h2_requests_record_protocol_http2() {
    // The protocol is the agent's, whatever the upstream speaks.
    for (agent_h2, upstream_h2, protocol) in [
        (true, false, "HTTP/2"),
        (true, true, "HTTP/2"),
        (false, true, "HTTP/1.1"),
    ] {
        let upstream = Upstream::ok(upstream_h2).await;
        let (sink, _metrics, audit) = capture(MemorySink::default());
        let (io, _proxy) = proxy_audited(
            agent_h2,
            upstream.connector(),
            noop(),
            HttpLimits::default(),
            audit,
        );
        let (mut agent, _conn) = Agent::connect(io, agent_h2).await;
        for path in ["/one", "/two"] {
            let response = within(
                "response",
                agent.send(get(&format!("https://api.test{path}"))),
            )
            .await
            .expect("response");
            assert_eq!(response.status(), StatusCode::OK);
        }
        let records = sink.records();
        let combo = format!("agent h2={agent_h2} upstream h2={upstream_h2}");
        assert_eq!(records.len(), 2, "{combo}");
        for (r, path) in records.iter().zip(["/one", "/two"]) {
            assert_eq!(r["protocol"], protocol, "{combo}");
            assert_eq!(r["path"], path, "{combo}");
            assert_eq!(r["status"], 200, "{combo}");
        }
    }
}

#[tokio::test]
async fn substituted_requests_record_the_credential_never_the_secret_or_placeholder() {
    use base64::Engine as _;
    let basic = |p: &str| base64::engine::general_purpose::STANDARD.encode(format!("git:{p}"));
    for agent_h2 in [false, true] {
        let upstream = Upstream::ok(agent_h2).await;
        let sub = Arc::new(PlaceholderSubstituter { deny_host: None });
        let (sink, _metrics, audit) = capture(MemorySink::default());
        let (io, _proxy) = proxy_audited(
            agent_h2,
            upstream.connector(),
            sub,
            HttpLimits::default(),
            audit,
        );
        let (mut agent, _conn) = Agent::connect(io, agent_h2).await;
        let requests = [
            Request::get("https://api.test/a")
                .header(AUTHORIZATION, format!("Bearer {PLACEHOLDER}"))
                .header("x-api-key", PLACEHOLDER),
            Request::get(format!("https://api.test/b?key={PLACEHOLDER}&x=1")),
            Request::get("https://api.test/repo.git/info/refs")
                .header(AUTHORIZATION, format!("Basic {}", basic(PLACEHOLDER))),
            Request::get("https://api.test/plain"),
        ];
        for req in requests {
            let response = within("response", agent.send(req.body(empty()).expect("request")))
                .await
                .expect("response");
            assert_eq!(response.status(), StatusCode::OK);
        }
        let records = sink.records();
        assert_eq!(records.len(), 4);
        for r in &records[..3] {
            assert_eq!(r["credential"], CREDENTIAL, "{r}");
            assert_eq!(r["lease_id"], LEASE, "{r}");
            assert_eq!(r["outcome"], "forwarded", "{r}");
        }
        assert_eq!(records[3]["credential"], serde_json::Value::Null);
        assert_eq!(records[3]["lease_id"], serde_json::Value::Null);
        let text = sink.text();
        for hidden in [
            PLACEHOLDER.to_owned(),
            SECRET.to_owned(),
            "sk-real%2Fsecret".to_owned(),
            basic(PLACEHOLDER),
            basic(SECRET),
            "key=".to_owned(),
        ] {
            assert!(!text.contains(&hidden), "{hidden:?} in the audit: {text}");
        }
    }
}

#[tokio::test]
async fn refused_and_failed_substitutions_are_audited_with_outcome_and_reason() {
    let cases: [(Arc<dyn Substituter>, u16, &str, &str); 2] = [
        (
            Arc::new(PlaceholderSubstituter {
                deny_host: Some("api.test".into()),
            }),
            403,
            "denied",
            "substitution_denied: ",
        ),
        (
            Arc::new(Unavailable),
            502,
            "failed",
            "substitution_unavailable: ",
        ),
    ];
    for (sub, status, outcome, reason) in cases {
        for agent_h2 in [false, true] {
            let upstream = Upstream::ok(false).await;
            let (sink, metrics, audit) = capture(MemorySink::default());
            let (io, _proxy) = proxy_audited(
                agent_h2,
                upstream.connector(),
                sub.clone(),
                HttpLimits::default(),
                audit,
            );
            let (mut agent, _conn) = Agent::connect(io, agent_h2).await;
            let req = Request::post(format!("https://api.test/v1/messages?k={PLACEHOLDER}"))
                .header(AUTHORIZATION, format!("Bearer {PLACEHOLDER}"))
                .body(full("{}"))
                .expect("request");
            let response = within("response", agent.send(req)).await.expect("response");
            assert_eq!(response.status().as_u16(), status);
            let records = sink.records();
            assert_eq!(records.len(), 1);
            let r = &records[0];
            assert_eq!(r["method"], "POST", "{r}");
            assert_eq!(r["path"], "/v1/messages", "{r}");
            assert_eq!(r["status"], status, "{r}");
            assert_eq!(r["outcome"], outcome, "{r}");
            assert!(
                r["reason"].as_str().is_some_and(|t| t.starts_with(reason)),
                "{r}"
            );
            assert_eq!(r["credential"], serde_json::Value::Null, "{r}");
            assert!(!sink.text().contains(PLACEHOLDER));
            assert!(upstream.seen().is_empty());
            assert_eq!(metrics.audit_write_failures(AuditKind::Request), 0);
        }
    }
}

#[tokio::test]
async fn other_proxy_answers_are_audited_with_outcome_and_reason() {
    // Another authority (denied), an upstream address the network policy refuses (denied),
    // an unreachable upstream (failed).
    let upstream = Upstream::ok(false).await;
    let (sink, _metrics, audit) = capture(MemorySink::default());
    let (io, _proxy) = proxy_audited(
        false,
        upstream.connector(),
        noop(),
        HttpLimits::default(),
        audit,
    );
    let (mut agent, _conn) = Agent::connect(io, false).await;
    let req = Request::get("/")
        .header(HOST, "evil.test")
        .body(empty())
        .expect("request");
    let response = within("response", agent.send(req)).await.expect("response");
    assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
    let r = &sink.records()[0];
    assert_eq!(
        (r["status"].as_u64(), r["outcome"].as_str()),
        (Some(421), Some("denied"))
    );
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|t| t.starts_with("misdirected_request: "))
    );
    for (fail, status, outcome, reason) in [
        (Fail::Denied, 403, "denied", "upstream_address_denied: "),
        (Fail::Refused, 502, "failed", "upstream_connect_failed: "),
    ] {
        let (sink, _metrics, audit) = capture(MemorySink::default());
        let (io, _proxy) = proxy_audited(
            false,
            TestConnector::failing(fail),
            noop(),
            HttpLimits::default(),
            audit,
        );
        let (mut agent, _conn) = Agent::connect(io, false).await;
        let response = within("response", agent.send(get("https://api.test/x")))
            .await
            .expect("response");
        assert_eq!(response.status().as_u16(), status);
        let r = &sink.records()[0];
        assert_eq!(r["status"], status, "{fail:?}");
        assert_eq!(r["outcome"], outcome, "{fail:?}");
        assert!(
            r["reason"].as_str().is_some_and(|t| t.starts_with(reason)),
            "{r}"
        );
    }
}

/// Refuses requests by path: `/refuse` is denied, `/broker-down` finds the broker down,
/// anything else passes unchanged.
#[derive(Debug)]
struct ByPath;

impl Substituter for ByPath {
    fn substitute<'a>(
        &'a self,
        head: &'a mut RequestHead<'_>,
        _ctx: &'a RequestContext,
    ) -> BoxFuture<'a, Result<Substituted, SubstituteError>> {
        let path = head.path().to_owned();
        Box::pin(async move {
            match path.as_str() {
                "/refuse" => Err(SubstituteError::Denied {
                    reason: "no grant".into(),
                }),
                "/broker-down" => Err(SubstituteError::Unavailable {
                    reason: "broker unreachable".into(),
                }),
                _ => Ok(Substituted::none()),
            }
        })
    }
}

#[tokio::test]
async fn unrecorded_refusals_are_reset_and_unrecorded_forwards_proceed() {
    for agent_h2 in [false, true] {
        let upstream = Upstream::ok(false).await;
        let connector = upstream.connector();
        let (sink, metrics, audit) = capture(MemorySink::failing());
        let failures = || metrics.audit_write_failures(AuditKind::Request);
        let start = |agent_h2| {
            proxy_audited(
                agent_h2,
                connector.clone(),
                Arc::new(ByPath),
                HttpLimits::default(),
                audit.clone(),
            )
        };

        // Forwarded: the upstream's answer is relayed, the failed write counted.
        let (io, _proxy) = start(agent_h2);
        let (mut agent, _conn) = Agent::connect(io, agent_h2).await;
        let response = within("response", agent.send(get("https://api.test/ok")))
            .await
            .expect("a forwarded request proceeds without its record");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_string(response).await, "ok");
        assert_eq!(failures(), 1);

        // Refused (403) and failed (502): no clean answer without a record.
        for (n, path) in ["/refuse", "/broker-down"].into_iter().enumerate() {
            let err = within(
                "refusal",
                agent.send(get(&format!("https://api.test{path}"))),
            )
            .await
            .expect_err("an unrecorded refusal must not be answered");
            if agent_h2 {
                let shown = format!("{err:?}");
                assert!(shown.contains("INTERNAL_ERROR"), "stream reset: {shown}");
            }
            assert_eq!(failures(), 2 + u64::try_from(n).expect("small"));
            if !agent_h2 {
                // HTTP/1.1: the connection is closed; the next request needs a new one.
                let (io, _proxy) = start(false);
                agent = Agent::connect(io, false).await.0;
            }
        }

        // HTTP/2: only the streams were reset; the connection still serves requests.
        let response = within("response", agent.send(get("https://api.test/ok")))
            .await
            .expect("connection survives the resets");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(failures(), 4);

        let seen: Vec<String> = upstream
            .seen()
            .iter()
            .map(|s| s.uri.path().to_owned())
            .collect();
        assert_eq!(seen, ["/ok", "/ok"], "agent h2={agent_h2}");
        assert!(sink.records().is_empty());
    }
}

#[tokio::test]
async fn requests_the_agent_abandons_are_still_audited() {
    for agent_h2 in [false, true] {
        // Takes the request, then answers only much later.
        let upstream = Upstream::start(
            agent_h2,
            Arc::new(|_req| {
                Box::pin(async {
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    Response::new(full("late"))
                })
            }),
        )
        .await;
        let sub = Arc::new(PlaceholderSubstituter { deny_host: None });
        let (sink, _metrics, audit) = capture(MemorySink::default());
        let (io, _proxy) = proxy_audited(
            agent_h2,
            upstream.connector(),
            sub,
            HttpLimits::default(),
            audit,
        );
        let (mut agent, conn) = Agent::connect(io, agent_h2).await;
        let req = Request::post("https://api.test/transfer")
            .header(AUTHORIZATION, format!("Bearer {PLACEHOLDER}"))
            .body(empty())
            .expect("request");
        // Send, wait until upstream has it (with the real secret), then give up on it.
        let pending = agent.send(req);
        let waited = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            tokio::pin!(pending);
            loop {
                tokio::select! {
                    _ = &mut pending => panic!("upstream answered early"),
                    () = tokio::time::sleep(std::time::Duration::from_millis(10)) => {
                        if !upstream.seen().is_empty() {
                            break;
                        }
                    }
                }
            }
        })
        .await;
        waited.expect("upstream got the request");
        // h2: the dropped response future resets the stream; h1: close the connection.
        if !agent_h2 {
            drop(agent);
            conn.abort();
        }
        let records = within("abandoned record", async {
            loop {
                let records = sink.records();
                if !records.is_empty() {
                    return records;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(records.len(), 1, "h2={agent_h2}: {records:?}");
        let r = &records[0];
        assert_eq!(r["outcome"], "abandoned", "{r}");
        assert_eq!(
            r["credential"], CREDENTIAL,
            "the substitution is on record: {r}"
        );
        assert_eq!(r["path"], "/transfer");
        assert_eq!(r["status"], serde_json::Value::Null);
        assert_eq!(
            upstream.seen()[0].headers[AUTHORIZATION],
            format!("Bearer {SECRET}"),
            "the request did reach upstream"
        );
    }
}

/// Allows everything until `revoked` is set, counting the questions.
#[derive(Debug, Default)]
struct RevocablePolicy {
    revoked: std::sync::atomic::AtomicBool,
    checks: std::sync::atomic::AtomicUsize,
}

impl crate::policy::EgressPolicy for RevocablePolicy {
    fn check<'a>(
        &'a self,
        _req: &'a crate::policy::EgressRequest,
    ) -> crate::policy::CheckFuture<'a> {
        use std::sync::atomic::Ordering;
        self.checks.fetch_add(1, Ordering::SeqCst);
        let revoked = self.revoked.load(Ordering::SeqCst);
        Box::pin(std::future::ready(Ok(if revoked {
            crate::policy::Decision::Deny {
                reason: "egress withdrawn".into(),
            }
        } else {
            crate::policy::Decision::Allow {
                rule: "test".into(),
                substitute_auth: false,
            }
        })))
    }
}

/// The re-check of the test connection (`ctx()`) with `policy`, every `every`.
fn recheck_of(
    policy: Arc<dyn crate::policy::EgressPolicy>,
    every: Duration,
) -> crate::policy::ConnectionRecheck {
    let ctx = ctx();
    Arc::new(crate::policy::EgressRecheck::new(policy, every)).for_connection(
        crate::policy::EgressRequest::new(
            ctx.run,
            &ctx.host,
            ctx.port,
            crate::policy::Mode::Transparent,
        )
        .expect("request"),
    )
}

/// A static policy file changed and reloaded while a connection is open: its next request
/// is refused (and audited as denied) on the same kept-alive connection, without reaching
/// upstream, and a request after the file allows the host again goes through.
#[tokio::test]
async fn a_reloaded_static_policy_reaches_open_connections() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("policy.toml");
    let allow = "[[rule]]\nname = \"api\"\nhosts = [\"api.test\"]\nports = [443]\n";
    std::fs::write(&path, allow).expect("policy");
    let file = Arc::new(crate::policy::PolicyFile::open(&path).expect("policy file"));
    for agent_h2 in [false, true] {
        file.reload().expect("allowing policy");
        let upstream = Upstream::ok(false).await;
        let (sink, _metrics, audit) = capture(MemorySink::default());
        let ctx = ctx();
        let limits = HttpLimits::default();
        let pool = UpstreamPool::new(&ctx.run, upstream.connector(), &limits);
        let (io, _proxy) = proxy_with_recheck(
            agent_h2,
            ctx,
            pool,
            noop(),
            audit,
            limits,
            // Zero: every request asks the policy (an answer covers no later request).
            Some(recheck_of(file.clone(), Duration::ZERO)),
        );
        let (mut agent, _conn) = Agent::connect(io, agent_h2).await;
        let response = within("first", agent.send(get("https://api.test/before")))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);

        std::fs::write(&path, "[[rule]]\nhosts = [\"other.test\"]\nports = [443]\n")
            .expect("withdraw");
        file.reload().expect("withdrawing policy");
        let response = within("after", agent.send(get("https://api.test/after")))
            .await
            .expect("response on the same connection");
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            response
                .headers()
                .get(DENIED_HEADER)
                .map(HeaderValue::as_bytes),
            Some(&b"egress_denied"[..])
        );
        let paths: Vec<String> = upstream
            .seen()
            .iter()
            .map(|s| s.uri.path().to_owned())
            .collect();
        assert_eq!(paths, ["/before"], "{agent_h2}");
        let records = sink.records();
        let after = records
            .iter()
            .find(|r| r["path"] == "/after")
            .expect("the refusal is audited");
        assert_eq!(after["outcome"], "denied", "{after}");
        assert_eq!(after["status"], 403, "{after}");
        assert!(
            after["reason"].as_str().is_some_and(
                |r| r.starts_with("egress_denied: ") && r.contains("no longer allowed")
            ),
            "{after}"
        );

        std::fs::write(&path, allow).expect("restore");
        file.reload().expect("restored policy");
        let response = within("restored", agent.send(get("https://api.test/again")))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
    }
}

/// Says it checked egress itself, as the broker's `substitute-auth` does.
#[derive(Debug)]
struct CheckedBySubstitution;

impl Substituter for CheckedBySubstitution {
    fn substitute<'a>(
        &'a self,
        _head: &'a mut RequestHead<'_>,
        _ctx: &'a RequestContext,
    ) -> BoxFuture<'a, Result<Substituted, SubstituteError>> {
        Box::pin(async {
            Ok(Substituted {
                egress_checked: true,
                ..Substituted::none()
            })
        })
    }
}

/// A request the substitution backend already checked is not checked twice; every other one
/// is.
#[tokio::test]
async fn requests_checked_by_the_substituter_are_not_rechecked() {
    use std::sync::atomic::Ordering;
    let policy = Arc::new(RevocablePolicy::default());
    policy.revoked.store(true, Ordering::SeqCst);
    for (sub, status, checks) in [
        (
            Arc::new(CheckedBySubstitution) as Arc<dyn Substituter>,
            StatusCode::OK,
            0,
        ),
        (noop(), StatusCode::FORBIDDEN, 1),
    ] {
        policy.checks.store(0, Ordering::SeqCst);
        let upstream = Upstream::ok(false).await;
        let ctx = ctx();
        let limits = HttpLimits::default();
        let pool = UpstreamPool::new(&ctx.run, upstream.connector(), &limits);
        let (io, _proxy) = proxy_with_recheck(
            false,
            ctx,
            pool,
            sub,
            unobserved_audit(),
            limits,
            Some(recheck_of(policy.clone(), Duration::ZERO)),
        );
        let (mut agent, _conn) = Agent::connect(io, false).await;
        let response = within("response", agent.send(get("https://api.test/x")))
            .await
            .expect("response");
        assert_eq!(response.status(), status);
        assert_eq!(policy.checks.load(Ordering::SeqCst), checks);
    }
}

#[tokio::test]
async fn open_tunnels_close_when_no_longer_allowed() {
    use std::sync::atomic::Ordering;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    let upstream = websocket_echo_upstream().await;
    let policy = Arc::new(RevocablePolicy::default());
    let (_sink, _metrics, audit) = capture(MemorySink::default());
    let ctx = ctx();
    let limits = HttpLimits::default();
    let pool = UpstreamPool::new(&ctx.run, upstream.connector(), &limits);
    let (io, proxy) = proxy_with_recheck(
        false,
        ctx,
        pool,
        noop(),
        audit,
        limits,
        Some(recheck_of(policy.clone(), Duration::from_millis(20))),
    );
    let request = "ws://api.test/socket"
        .into_client_request()
        .expect("ws request");
    let (mut ws, _) = within("ws handshake", tokio_tungstenite::client_async(request, io))
        .await
        .expect("handshake");
    within("ws send", ws.send(Message::text("one")))
        .await
        .expect("send");
    let echo = within("echo", ws.next())
        .await
        .expect("message")
        .expect("ok");
    assert_eq!(echo.into_text().expect("text").as_str(), "one");
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(
        policy.checks.load(Ordering::SeqCst) >= 2,
        "the upgrade request and then the open tunnel are re-checked"
    );

    policy.revoked.store(true, Ordering::SeqCst);
    // The proxy drops both sides: the agent sees its stream end, and the connection ends.
    let ended = within("tunnel closed by the proxy", async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    let () = ended;
    within("connection ends with its tunnel", proxy)
        .await
        .expect("join")
        .expect("connection ok");
}

#[tokio::test]
async fn the_drain_closes_open_tunnels() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    let upstream = websocket_echo_upstream().await;
    let ctx = ctx();
    let limits = HttpLimits::default();
    let pool = UpstreamPool::new(&ctx.run, upstream.connector(), &limits);
    let (agent, proxy_side) = tokio::io::duplex(64 * 1024);
    let (drain_tx, drain_rx) = oneshot::channel::<()>();
    let conn = tokio::spawn(super::serve_connection_until(
        proxy_side,
        Some(b"http/1.1"),
        ctx,
        pool,
        Arc::new(NoopSubstituter),
        unobserved_audit(),
        limits,
        None,
        async move {
            let _ = drain_rx.await;
        },
    ));
    let request = "ws://api.test/socket"
        .into_client_request()
        .expect("ws request");
    let (mut ws, _) = within(
        "ws handshake",
        tokio_tungstenite::client_async(request, agent),
    )
    .await
    .expect("handshake");
    within("ws send", ws.send(Message::text("one")))
        .await
        .expect("send");
    let echo = within("echo", ws.next())
        .await
        .expect("message")
        .expect("ok");
    assert_eq!(echo.into_text().expect("text").as_str(), "one");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!conn.is_finished(), "the tunnel holds its connection");

    drain_tx.send(()).expect("drain");
    within("connection ends at the drain", conn)
        .await
        .expect("join")
        .expect("connection ok");
    within("agent sees the tunnel close", async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
}

/// An agent connection (HTTP/2 when `h2`, as if ALPN chose it) served until `shutdown`: the
/// agent's end of it as raw bytes, and the proxy's task.
fn serve_raw(
    upstream: &Upstream,
    h2: bool,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<Result<(), super::HttpError>>,
) {
    let pool = UpstreamPool::new("run-1", upstream.connector(), &limits);
    let (agent, proxy_side) = tokio::io::duplex(64 * 1024);
    let alpn: Option<&[u8]> = if h2 { Some(b"h2") } else { None };
    let served = tokio::spawn(super::serve_connection_until(
        proxy_side,
        alpn,
        ctx(),
        pool,
        noop(),
        unobserved_audit(),
        limits,
        None,
        shutdown,
    ));
    (agent, served)
}

/// hyper's header read timer is the connection's one runtime timer, moved to each head's
/// deadline (`timer.rs`): every head gets the whole timeout from when its wait starts,
/// whatever the heads before it did, served with parking and without.
#[tokio::test]
async fn each_request_head_gets_the_whole_header_read_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let upstream = Upstream::ok(false).await;
    let timeout = Duration::from_millis(400);
    for park_after in [None, Some(Duration::from_secs(10))] {
        let limits = HttpLimits {
            header_read_timeout: timeout,
            park_after,
            ..HttpLimits::default()
        };
        let (mut agent, served) = serve_raw(&upstream, false, limits, std::future::pending());
        // The third request comes 500 ms after the first answer: past a deadline that stayed
        // where the first wait put it.
        for gap in [0, 250, 250] {
            tokio::time::sleep(Duration::from_millis(gap)).await;
            agent
                .write_all(b"GET /k HTTP/1.1\r\nHost: api.test\r\n\r\n")
                .await
                .expect("write");
            let mut answer = Vec::new();
            while !answer.ends_with(b"ok") {
                let mut buf = [0u8; 1024];
                let n = within("answer", agent.read(&mut buf)).await.expect("read");
                assert!(n > 0, "{park_after:?}: closed after {gap} ms");
                answer.extend_from_slice(&buf[..n]);
            }
            assert!(answer.starts_with(b"HTTP/1.1 200"), "{park_after:?}");
        }
        // A head that trickles in is cut off at the timeout, counted from its wait's start.
        let started = tokio::time::Instant::now();
        agent
            .write_all(b"GET /slow HTTP/1.1\r\n")
            .await
            .expect("write");
        while started.elapsed() < timeout * 5 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if agent.write_all(b"x-more: 1\r\n").await.is_err() {
                break;
            }
        }
        let mut rest = Vec::new();
        within("closed", agent.read_to_end(&mut rest))
            .await
            .expect("read");
        let took = started.elapsed();
        assert!(
            took >= timeout && took < timeout * 4,
            "{park_after:?}: a trickled head ended after {took:?}"
        );
        let _ = within("served", served).await.expect("task");
    }
}

/// Nothing of the HTTP server is built before the agent's first bytes (what keeps an idle
/// connection cheap), so the wait for them must end as hyper's own wait would: at the drain,
/// at the header read timeout, and with a request served whole when it comes in pieces.
#[tokio::test]
async fn a_connection_waiting_for_its_first_request_ends_at_the_drain_or_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let upstream = Upstream::ok(false).await;
    let serve = |limits: HttpLimits, shutdown: oneshot::Receiver<()>| {
        serve_raw(&upstream, false, limits, async move {
            let _ = shutdown.await;
        })
    };

    // The drain closes a connection that never sent a byte.
    let (tx, rx) = oneshot::channel();
    let (mut agent, served) = serve(HttpLimits::default(), rx);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!served.is_finished(), "ended before the drain");
    tx.send(()).expect("drain");
    within("drained", served)
        .await
        .expect("task")
        .expect("clean end");
    let mut buf = [0u8; 16];
    assert_eq!(agent.read(&mut buf).await.expect("eof"), 0);

    // So does the header read timeout.
    let limits = HttpLimits {
        header_read_timeout: Duration::from_millis(200),
        ..HttpLimits::default()
    };
    let (_tx, rx) = oneshot::channel();
    let (mut agent, served) = serve(limits.clone(), rx);
    within("timed out", served)
        .await
        .expect("task")
        .expect("clean end");
    assert_eq!(agent.read(&mut buf).await.expect("eof"), 0);

    // A request whose first byte comes alone is served whole.
    let (_tx, rx) = oneshot::channel();
    let (mut agent, served) = serve(limits, rx);
    agent.write_all(b"G").await.expect("write");
    tokio::time::sleep(Duration::from_millis(50)).await;
    agent
        .write_all(b"ET /piece HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    within("answer", agent.read_to_end(&mut answer))
        .await
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
    within("served", served)
        .await
        .expect("task")
        .expect("clean end");
    assert_eq!(upstream.seen()[0].uri.path(), "/piece");
}
