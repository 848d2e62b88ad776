//! Loopback fixtures for the request-loop tests: a plain-TCP upstream connector, local
//! hyper upstream servers that record what reached them, and agent-side clients over
//! in-memory pipes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client_h1, http2 as client_h2};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::DuplexStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{
    ALPN_H2, BoxFuture, ConnectError, HttpError, HttpLimits, RequestAudit, RequestContext,
    Substituter, UpstreamConnector, UpstreamPool, UpstreamStream, UpstreamTarget, serve_connection,
};
use crate::audit::MemorySink;
use crate::metrics::ProxyMetrics;
use crate::policy::Mode;

pub(crate) type TestError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type TestBody = UnsyncBoxBody<Bytes, TestError>;

/// Bound on every wait in these tests, so a broken proxy fails instead of hanging.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

pub(crate) fn empty() -> TestBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub(crate) fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) async fn within<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|elapsed| panic!("waiting for {what}: {elapsed}"))
}

/// A request head as the upstream saw it.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

pub(crate) type Handler =
    Arc<dyn Fn(Request<Incoming>) -> BoxFuture<'static, Response<TestBody>> + Send + Sync>;

/// A local upstream server on 127.0.0.1:0 speaking HTTP/1.1 (with upgrades) or HTTP/2
/// (prior knowledge), recording each request head before handing it to `handler`.
pub(crate) struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub h2: bool,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub(crate) async fn start(h2: bool, handler: Handler) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_in = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let handler = Arc::clone(&handler);
                let seen = Arc::clone(&seen_in);
                let service = service_fn(move |req: Request<Incoming>| {
                    seen.lock().expect("seen lock").push(Seen {
                        method: req.method().clone(),
                        uri: req.uri().clone(),
                        version: req.version(),
                        headers: req.headers().clone(),
                    });
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let io = TokioIo::new(tcp);
                tokio::spawn(async move {
                    let _ = if h2 {
                        http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await
                    } else {
                        http1::Builder::new()
                            .serve_connection(io, service)
                            .with_upgrades()
                            .await
                    };
                });
            }
        });
        Self {
            addr,
            seen,
            h2,
            task,
        }
    }

    /// An upstream answering every request with `200 ok`.
    pub(crate) async fn ok(h2: bool) -> Self {
        Self::start(
            h2,
            Arc::new(|_req| Box::pin(async { Response::new(full("ok")) })),
        )
        .await
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }

    /// A connector that reaches this server whatever name it is asked for, claiming h2 in
    /// ALPN when the server speaks it.
    pub(crate) fn connector(&self) -> Arc<TestConnector> {
        Arc::new(TestConnector {
            addr: self.addr,
            h2: self.h2,
            fail: None,
            dials: AtomicUsize::new(0),
            targets: Mutex::new(Vec::new()),
        })
    }
}

/// How a [`TestConnector`] fails instead of dialling.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fail {
    Refused,
    Denied,
    Hang,
}

#[derive(Debug)]
pub(crate) struct TestConnector {
    pub addr: SocketAddr,
    pub h2: bool,
    pub fail: Option<Fail>,
    pub dials: AtomicUsize,
    pub targets: Mutex<Vec<UpstreamTarget>>,
}

impl TestConnector {
    pub(crate) fn failing(fail: Fail) -> Arc<Self> {
        Arc::new(Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 9)),
            h2: false,
            fail: Some(fail),
            dials: AtomicUsize::new(0),
            targets: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn dials(&self) -> usize {
        self.dials.load(Ordering::SeqCst)
    }
}

impl UpstreamConnector for TestConnector {
    fn connect<'a>(
        &'a self,
        target: &'a UpstreamTarget,
    ) -> BoxFuture<'a, Result<UpstreamStream, ConnectError>> {
        Box::pin(async move {
            self.dials.fetch_add(1, Ordering::SeqCst);
            self.targets
                .lock()
                .expect("targets lock")
                .push(target.clone());
            match self.fail {
                Some(Fail::Refused) => {
                    return Err(ConnectError::Io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        "refused",
                    )));
                }
                Some(Fail::Denied) => return Err(ConnectError::Denied("denied cidr".into())),
                Some(Fail::Hang) => std::future::pending::<()>().await,
                None => {}
            }
            let tcp = TcpStream::connect(self.addr).await?;
            let h2 = self.h2 && target.allow_h2;
            Ok(UpstreamStream {
                io: Box::new(tcp),
                alpn: Some(if h2 {
                    ALPN_H2.to_vec()
                } else {
                    b"http/1.1".to_vec()
                }),
            })
        })
    }
}

/// How [`raw_upstream`] ends each connection after its reply.
#[derive(Clone, Copy, Debug)]
pub(crate) enum End {
    /// A reset (linger 0): the reply may be cut short.
    Reset,
    /// A plain close, unannounced: what a server does when its keep-alive timeout runs out.
    Close,
}

/// A raw HTTP/1.1 upstream on loopback: for each connection it reads one request head, writes
/// `reply` (maybe nothing, maybe half an answer) and ends the connection as `end` says.
/// Returns its connector, the number of request heads it read, and its task.
pub(crate) async fn raw_upstream(
    reply: &'static [u8],
    end: End,
) -> (Arc<TestConnector>, Arc<AtomicUsize>, JoinHandle<()>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let heads = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&heads);
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = tcp.write_all(reply).await;
                let _ = tcp.flush().await;
                match end {
                    // Linger 0, then close: a reset, not a FIN.
                    End::Reset => {
                        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                    }
                    End::Close => {
                        let _ = tcp.shutdown().await;
                    }
                }
                drop(tcp);
            });
        }
    });
    let connector = Arc::new(TestConnector {
        addr,
        h2: false,
        fail: None,
        dials: AtomicUsize::new(0),
        targets: Mutex::new(Vec::new()),
    });
    (connector, heads, task)
}

pub(crate) fn ctx() -> RequestContext {
    RequestContext {
        run: "run-1".into(),
        host: "api.test".into(),
        port: 443,
        sni: Some("api.test".into()),
    }
}

/// The destination address the test connections' request records carry.
pub(crate) const DST: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 10)),
    443,
);

/// Request records of a test connection go to `sink`; failed writes are counted in `metrics`.
pub(crate) fn audit_into(sink: &Arc<MemorySink>, metrics: &Arc<ProxyMetrics>) -> RequestAudit {
    RequestAudit::new(
        Arc::clone(sink) as Arc<dyn crate::audit::AuditSink>,
        Arc::clone(metrics),
        Mode::Transparent,
    )
    .with_dst(Some(DST))
}

/// Request records nobody looks at.
pub(crate) fn unobserved_audit() -> RequestAudit {
    audit_into(
        &Arc::new(MemorySink::default()),
        &Arc::new(ProxyMetrics::new()),
    )
}

/// A proxy serving one agent connection over an in-memory pipe; returns the agent's end
/// and the task serving the proxy's end.
pub(crate) fn proxy(
    agent_h2: bool,
    connector: Arc<dyn UpstreamConnector>,
    substituter: Arc<dyn Substituter>,
    limits: HttpLimits,
) -> (DuplexStream, JoinHandle<Result<(), HttpError>>) {
    proxy_audited(agent_h2, connector, substituter, limits, unobserved_audit())
}

/// [`proxy`] with its request records going where `audit` says.
pub(crate) fn proxy_audited(
    agent_h2: bool,
    connector: Arc<dyn UpstreamConnector>,
    substituter: Arc<dyn Substituter>,
    limits: HttpLimits,
    audit: RequestAudit,
) -> (DuplexStream, JoinHandle<Result<(), HttpError>>) {
    let ctx = ctx();
    let pool = UpstreamPool::new(&ctx.run, connector, &limits);
    proxy_with_pool(agent_h2, ctx, pool, substituter, audit, limits)
}

pub(crate) fn proxy_with_pool(
    agent_h2: bool,
    ctx: RequestContext,
    pool: UpstreamPool,
    substituter: Arc<dyn Substituter>,
    audit: RequestAudit,
    limits: HttpLimits,
) -> (DuplexStream, JoinHandle<Result<(), HttpError>>) {
    proxy_with_recheck(agent_h2, ctx, pool, substituter, audit, limits, None)
}

/// [`proxy_with_pool`] re-checking egress with `recheck`.
pub(crate) fn proxy_with_recheck(
    agent_h2: bool,
    ctx: RequestContext,
    pool: UpstreamPool,
    substituter: Arc<dyn Substituter>,
    audit: RequestAudit,
    limits: HttpLimits,
    recheck: Option<crate::policy::ConnectionRecheck>,
) -> (DuplexStream, JoinHandle<Result<(), HttpError>>) {
    let (agent, proxy_side) = tokio::io::duplex(256 * 1024);
    let alpn: Option<&'static [u8]> = if agent_h2 {
        Some(ALPN_H2)
    } else {
        Some(b"http/1.1")
    };
    let task = tokio::spawn(serve_connection(
        proxy_side,
        alpn,
        ctx,
        pool,
        substituter,
        audit,
        limits,
        recheck,
    ));
    (agent, task)
}

/// An agent-side client over `io`, HTTP/2 or HTTP/1.1.
pub(crate) enum Agent {
    H1(client_h1::SendRequest<TestBody>),
    H2(client_h2::SendRequest<TestBody>),
}

impl Agent {
    pub(crate) async fn connect(io: DuplexStream, h2: bool) -> (Self, JoinHandle<()>) {
        let io = TokioIo::new(io);
        if h2 {
            let (sender, conn) = client_h2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .expect("agent h2 handshake");
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            (Self::H2(sender), task)
        } else {
            let (sender, conn) = client_h1::Builder::new()
                .handshake(io)
                .await
                .expect("agent h1 handshake");
            let task = tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            (Self::H1(sender), task)
        }
    }

    /// Sends `req`; an HTTP/2 agent gets the absolute URI, an HTTP/1 agent origin form plus
    /// a Host header, as real clients do.
    pub(crate) async fn send(
        &mut self,
        mut req: Request<TestBody>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        match self {
            Self::H1(s) => {
                if !req.headers().contains_key(http::header::HOST)
                    && let Some(a) = req.uri().authority().cloned()
                {
                    req.headers_mut()
                        .insert(http::header::HOST, a.as_str().parse().expect("host header"));
                }
                if let Some(pq) = req.uri().path_and_query().cloned() {
                    *req.uri_mut() = pq.into();
                }
                s.ready().await?;
                s.send_request(req).await
            }
            Self::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }
}

pub(crate) async fn body_string(response: Response<Incoming>) -> String {
    let bytes = within("response body", response.into_body().collect())
        .await
        .expect("response body")
        .to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8 body")
}
