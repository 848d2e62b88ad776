//! Parking idle HTTP/1.1 agent connections, seen from a raw agent: a parked connection
//! answers its next request on the same socket, and nothing that is not between two whole
//! messages is ever parked.

use std::sync::Arc;
use std::time::Duration;

use http::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::test_support::{Upstream, WAIT, audit_into, ctx, full, within};
use super::{HttpError, HttpLimits, NoopSubstituter, UpstreamPool, serve_connection_until};
use crate::audit::MemorySink;
use crate::metrics::ProxyMetrics;

const GET: &[u8] = b"GET /a HTTP/1.1\r\nHost: api.test\r\n\r\n";

struct Lab {
    agent: DuplexStream,
    metrics: Arc<ProxyMetrics>,
    upstream: Upstream,
    drain: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), HttpError>>,
}

impl Lab {
    fn start(upstream: Upstream, limits: HttpLimits) -> Self {
        let metrics = Arc::new(ProxyMetrics::new());
        let audit = audit_into(&Arc::new(MemorySink::default()), &metrics);
        let ctx = ctx();
        let pool = UpstreamPool::new(&ctx.run, upstream.connector(), &limits);
        let (agent, proxy_side) = tokio::io::duplex(256 * 1024);
        let (drain, drained) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_connection_until(
            proxy_side,
            Some(b"http/1.1"),
            ctx,
            pool,
            Arc::new(NoopSubstituter),
            audit,
            limits,
            None,
            async move {
                let _ = drained.await;
            },
        ));
        Self {
            agent,
            metrics,
            upstream,
            drain: Some(drain),
            task,
        }
    }

    async fn ok(park_after: Duration) -> Self {
        Self::start(Upstream::ok(false).await, limits(park_after))
    }

    async fn send(&mut self, bytes: &[u8]) {
        within("write", self.agent.write_all(bytes))
            .await
            .expect("write");
    }

    /// One whole response (`Content-Length` framed): its status and body, `None` at the end
    /// of the stream.
    async fn response(&mut self) -> Option<(u16, String)> {
        within("response", read_response(&mut self.agent)).await
    }

    async fn until_parked(&self, parked: i64) {
        within("parked gauge", async {
            while self.metrics.parked() != parked {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    fn paths_seen(&self) -> Vec<String> {
        self.upstream
            .seen()
            .iter()
            .map(|s| s.uri.path().to_owned())
            .collect()
    }
}

fn limits(park_after: Duration) -> HttpLimits {
    HttpLimits {
        park_after: Some(park_after),
        ..HttpLimits::default()
    }
}

async fn read_response(io: &mut DuplexStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = vec![httparse::EMPTY_HEADER; 128];
        let mut parsed = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = parsed.parse(&buf).expect("response head") {
            let status = parsed.code.expect("status");
            let len: usize = parsed
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map_or(0, |h| {
                    std::str::from_utf8(h.value)
                        .expect("length")
                        .parse()
                        .expect("length")
                });
            while buf.len() < head + len {
                let n = io.read(&mut chunk).await.expect("read body");
                assert!(n > 0, "end of stream inside a body");
                buf.extend_from_slice(&chunk[..n]);
            }
            assert_eq!(buf.len(), head + len, "nothing after the answer");
            let body = String::from_utf8(buf[head..].to_vec()).expect("utf-8");
            return Some((status, body));
        }
        let n = io.read(&mut chunk).await.expect("read");
        if n == 0 {
            assert!(buf.is_empty(), "end of stream inside a head");
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn a_quiet_connection_parks_and_answers_its_next_requests_on_the_same_socket() {
    let mut lab = Lab::ok(Duration::from_millis(50)).await;
    lab.send(GET).await;
    assert_eq!(lab.response().await, Some((200, "ok".into())));
    lab.until_parked(1).await;

    // Parking sent nothing (no TLS close_notify, no FIN): the same socket goes on.
    lab.send(GET).await;
    assert_eq!(lab.response().await, Some((200, "ok".into())));
    assert_eq!(lab.metrics.parked(), 0);
    lab.until_parked(1).await;

    // Two requests in one write wake a parked connection: both answered, in order.
    let mut two = GET.to_vec();
    two.extend_from_slice(b"GET /b HTTP/1.1\r\nHost: api.test\r\n\r\n");
    lab.send(&two).await;
    assert_eq!(lab.response().await, Some((200, "ok".into())));
    assert_eq!(lab.response().await, Some((200, "ok".into())));
    assert_eq!(lab.paths_seen(), ["/a", "/a", "/a", "/b"]);

    // The agent's close ends a parked connection.
    lab.until_parked(1).await;
    drop(lab.agent);
    within("proxy task", lab.task)
        .await
        .expect("join")
        .expect("served");
    assert_eq!(lab.metrics.parked(), 0);
}

#[tokio::test]
async fn a_head_trickled_in_is_not_parked_and_still_meets_the_header_read_timeout() {
    let mut lab = Lab::start(
        Upstream::ok(false).await,
        HttpLimits {
            header_read_timeout: Duration::from_millis(400),
            ..limits(Duration::from_millis(20))
        },
    );
    lab.send(GET).await;
    assert_eq!(lab.response().await, Some((200, "ok".into())));
    // A byte of a head at a time, each well past the park delay: were a park to start a
    // fresh server (and a fresh header read timeout) each time, this would go on for ever.
    let closed = async {
        lab.agent.write_all(b"GET /slow HTTP/1.1\r\n").await?;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            lab.agent.write_all(b"X-A: b\r\n").await?;
        }
        std::io::Result::Ok(())
    };
    let trickled = tokio::time::timeout(WAIT, closed).await.expect("bounded");
    assert!(
        trickled.is_err(),
        "the proxy closed the connection before the trickle ended"
    );
    assert_eq!(lab.paths_seen(), ["/a"]);
}

#[tokio::test]
async fn a_request_body_left_unread_never_turns_into_a_request() {
    // The upstream answers at once without reading the body.
    let upstream = Upstream::start(
        false,
        Arc::new(|_req| Box::pin(async { Response::new(full("early")) })),
    )
    .await;
    let mut lab = Lab::start(upstream, limits(Duration::from_millis(20)));
    let smuggled = b"GET /smuggled HTTP/1.1\r\nHost: api.test\r\n\r\n";
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\n\r\n",
        10 + smuggled.len()
    );
    lab.send(head.as_bytes()).await;
    lab.send(b"0123456789").await;
    assert_eq!(lab.response().await, Some((200, "early".into())));
    // Well past the park delay, then the rest of the body, which reads as a request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(lab.metrics.parked(), 0, "an unread body is never parked");
    let _ = lab.agent.write_all(smuggled).await;
    let _ = within("rest", read_response(&mut lab.agent)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !lab.paths_seen().iter().any(|p| p == "/smuggled"),
        "{:?}",
        lab.paths_seen()
    );
}

#[tokio::test]
async fn connection_close_and_http_1_0_are_closed_not_parked() {
    for request in [
        &b"GET /a HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"[..],
        &b"GET /a HTTP/1.0\r\nHost: api.test\r\n\r\n"[..],
    ] {
        let mut lab = Lab::ok(Duration::from_millis(20)).await;
        lab.send(request).await;
        assert_eq!(lab.response().await, Some((200, "ok".into())));
        assert_eq!(lab.response().await, None, "closed after the answer");
        within("proxy task", lab.task)
            .await
            .expect("join")
            .expect("served");
        assert_eq!(lab.metrics.parked(), 0);
    }
}

#[tokio::test]
async fn a_parked_connection_ends_at_the_drain_and_at_the_header_read_timeout() {
    let mut lab = Lab::ok(Duration::from_millis(20)).await;
    lab.send(GET).await;
    assert_eq!(lab.response().await, Some((200, "ok".into())));
    lab.until_parked(1).await;
    lab.drain.take().expect("drain").send(()).expect("drain");
    assert_eq!(lab.response().await, None, "closed at the drain");
    within("proxy task", lab.task)
        .await
        .expect("join")
        .expect("served");
    assert_eq!(lab.metrics.parked(), 0);

    let mut lab = Lab::start(
        Upstream::ok(false).await,
        HttpLimits {
            header_read_timeout: Duration::from_millis(300),
            ..limits(Duration::from_millis(20))
        },
    );
    lab.send(GET).await;
    assert_eq!(lab.response().await, Some((200, "ok".into())));
    lab.until_parked(1).await;
    assert_eq!(
        lab.response().await,
        None,
        "closed at the header read timeout"
    );
    assert_eq!(lab.metrics.parked(), 0);
}

#[tokio::test]
async fn without_park_after_the_server_stays() {
    let mut lab = Lab::start(
        Upstream::ok(false).await,
        HttpLimits {
            park_after: None,
            ..HttpLimits::default()
        },
    );
    lab.send(GET).await;
    assert_eq!(lab.response().await, Some((200, "ok".into())));
    // Past the default delay, so a `None` taken for the default would show.
    tokio::time::sleep(
        HttpLimits::default().park_after.expect("default") + Duration::from_millis(200),
    )
    .await;
    assert_eq!(lab.metrics.parked(), 0);
    lab.send(GET).await;
    assert_eq!(lab.response().await, Some((200, "ok".into())));
}

/// A request head with `Host` and `extra` more header lines.
fn head_with_headers(extra: usize) -> Vec<u8> {
    let mut head = b"GET /h HTTP/1.1\r\nHost: api.test\r\n".to_vec();
    for i in 0..extra {
        head.extend_from_slice(format!("x-h-{i}: v\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// An upstream whose answers carry `extra` header lines besides `content-length` and `date`.
async fn upstream_with_headers(extra: usize) -> Upstream {
    Upstream::start(
        false,
        Arc::new(move |_req| {
            Box::pin(async move {
                let mut response = Response::new(full("ok"));
                for i in 0..extra {
                    response.headers_mut().insert(
                        http::HeaderName::try_from(format!("x-r-{i}")).expect("name"),
                        http::HeaderValue::from_static("v"),
                    );
                }
                response
            })
        }),
    )
    .await
}

/// The header count limit is left to hyper's own fixed-size parse at its default (100) and
/// handed to hyper when set: either way it holds on both legs. (The raw agent here can send
/// the heads a client library would not.)
#[tokio::test]
async fn the_header_count_limit_holds_on_both_legs_at_its_default_and_when_set() {
    for max in [HttpLimits::default().max_headers, 10] {
        let limits = HttpLimits {
            max_headers: max,
            ..HttpLimits::default()
        };
        // Agent leg: `max` headers in all are served, one more is refused.
        let mut lab = Lab::start(Upstream::ok(false).await, limits.clone());
        lab.send(&head_with_headers(max - 1)).await;
        assert_eq!(lab.response().await, Some((200, "ok".into())), "{max}");
        let mut lab = Lab::start(Upstream::ok(false).await, limits.clone());
        lab.send(&head_with_headers(max)).await;
        let (status, _) = lab.response().await.expect("an answer");
        assert_eq!(status, 431, "{max} + 1 request headers");
        assert!(lab.paths_seen().is_empty(), "nothing forwarded");
        // Upstream leg: an answer with `max` headers passes, one with more is a 502.
        let mut lab = Lab::start(upstream_with_headers(max - 2).await, limits.clone());
        lab.send(GET).await;
        assert_eq!(lab.response().await, Some((200, "ok".into())), "{max}");
        let mut lab = Lab::start(upstream_with_headers(max - 1).await, limits);
        lab.send(GET).await;
        let (status, _) = lab.response().await.expect("an answer");
        assert_eq!(status, 502, "{max} + 1 response headers");
    }
}
