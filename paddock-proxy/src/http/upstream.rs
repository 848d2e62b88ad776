//! Upstream connections: the connector seam and the per-run connection pool.
//!
//! Two paths share the run's connections, both keyed by the vetted destination (one pool per
//! run makes the key (run, host, port)):
//! - HTTP/1.1 agent connections keep their own upstream connection ([`super::affinity`]),
//!   dialled here ([`UpstreamPool::dial_h1`]) and kept between agent connections in the
//!   run's [`IdleH1`] store.
//! - HTTP/2 agent connections, and destinations that chose h2, go through hyper-util's legacy
//!   `Client` with a connector that wraps [`UpstreamConnector`]: one multiplexed connection
//!   per destination (including the race where several requests dial at once), idle
//!   eviction, and retrying a request that a reused connection closed before it was sent.
//!   Its key is scheme plus authority, and the authority is always the connection's vetted
//!   destination.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use std::time::Instant;

use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::error::ConnectError;
use super::park::UpstreamBody;
use super::{ALPN_H2, BoxFuture, HttpError, HttpLimits};

/// A byte stream to an upstream, already through TLS when the target asked for it.
pub trait UpstreamIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> UpstreamIo for T {}

/// Where to connect.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamTarget {
    /// Destination name (lower case, no brackets for IPv6 literals).
    pub host: String,
    pub port: u16,
    /// Whether to run TLS (SNI = `host`) over the connection.
    pub tls: bool,
    /// Whether `h2` may be offered in ALPN. False for connections that will carry an
    /// HTTP/1.1 upgrade.
    pub allow_h2: bool,
}

/// A connected upstream stream and the ALPN protocol it negotiated.
pub struct UpstreamStream {
    pub io: Box<dyn UpstreamIo>,
    /// `Some(b"h2")` makes the pool speak HTTP/2 on it; anything else is HTTP/1.1.
    pub alpn: Option<Vec<u8>>,
}

impl fmt::Debug for UpstreamStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamStream")
            .field("alpn", &self.alpn.as_deref().map(String::from_utf8_lossy))
            .finish_non_exhaustive()
    }
}

/// Dials (and handshakes) upstream destinations. The production implementation resolves
/// through the proxy's resolver, dials only vetted addresses and runs TLS; tests use
/// plain loopback TCP.
pub trait UpstreamConnector: Send + Sync + fmt::Debug {
    fn connect<'a>(
        &'a self,
        target: &'a UpstreamTarget,
    ) -> BoxFuture<'a, Result<UpstreamStream, ConnectError>>;
}

/// What the pool's connector reports to hyper-util; found again in its error chain.
#[derive(Debug, thiserror::Error)]
enum ConnectFailure {
    #[error("connect timed out")]
    Timeout,
    #[error(transparent)]
    Connect(ConnectError),
    #[error("request URI has no host")]
    NoHost,
}

#[derive(Clone, Debug)]
struct PoolConnector {
    inner: Arc<dyn UpstreamConnector>,
    timeout: Duration,
}

impl tower_service::Service<Uri> for PoolConnector {
    type Response = PooledIo;
    type Error = ConnectFailure;
    type Future = BoxFuture<'static, Result<PooledIo, ConnectFailure>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let target = target_of(&uri, true).ok_or(ConnectFailure::NoHost)?;
            let stream = dial(this.inner.as_ref(), &target, this.timeout).await?;
            let h2 = stream.alpn.as_deref() == Some(ALPN_H2);
            Ok(PooledIo {
                io: TokioIo::new(stream.io),
                h2,
            })
        })
    }
}

pub(crate) fn target_of(uri: &Uri, allow_h2: bool) -> Option<UpstreamTarget> {
    let host = uri.host()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_ascii_lowercase();
    let tls = uri.scheme() == Some(&Scheme::HTTPS);
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Some(UpstreamTarget {
        host,
        port,
        tls,
        allow_h2,
    })
}

async fn dial(
    connector: &dyn UpstreamConnector,
    target: &UpstreamTarget,
    timeout: Duration,
) -> Result<UpstreamStream, ConnectFailure> {
    match tokio::time::timeout(timeout, connector.connect(target)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(ConnectFailure::Connect(e)),
        Err(_) => Err(ConnectFailure::Timeout),
    }
}

/// The pooled stream: hyper I/O plus the ALPN result the pool needs to pick h1 or h2.
struct PooledIo {
    io: TokioIo<Box<dyn UpstreamIo>>,
    h2: bool,
}

impl Connection for PooledIo {
    fn connected(&self) -> Connected {
        let connected = Connected::new();
        if self.h2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl hyper::rt::Read for PooledIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PooledIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// Pooled upstream connections for one run.
#[derive(Clone)]
pub struct UpstreamPool {
    run: Arc<str>,
    /// The secrets this run has sent to each host, scrubbed from later responses. Here
    /// because it is, like the connections, what one run sent upstream: never shared.
    scrub: Arc<crate::scrub::ScrubRegistry>,
    client: Client<PoolConnector, UpstreamBody>,
    connector: Arc<dyn UpstreamConnector>,
    connect_timeout: Duration,
    response_timeout: Duration,
    h1_buf_size: usize,
    h1_max_headers: Option<usize>,
    /// HTTP/1.1 connections between two agent connections ([`super::affinity`]).
    idle_h1: Arc<IdleH1>,
}

/// A freshly dialled destination, for an HTTP/1.1 agent connection.
pub(crate) enum Dialed {
    H1(http1::SendRequest<UpstreamBody>),
    /// The destination chose h2; the stream was closed.
    H2,
}

impl fmt::Debug for UpstreamPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamPool")
            .field("run", &self.run)
            .field("connector", &self.connector)
            .finish_non_exhaustive()
    }
}

impl UpstreamPool {
    /// A pool for `run`'s connections. Keep one per run and share it across that run's
    /// agent connections; connections are never shared between runs.
    #[must_use]
    pub fn new(run: &str, connector: Arc<dyn UpstreamConnector>, limits: &HttpLimits) -> Self {
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(limits.pool_idle_timeout)
            .pool_max_idle_per_host(limits.pool_max_idle_per_host)
            .http1_max_buf_size(limits.h1_buf_size())
            .http2_max_header_list_size(limits.h2_header_list_size());
        if let Some(max) = limits.h1_max_headers() {
            builder.http1_max_headers(max);
        }
        let client = builder.build(PoolConnector {
            inner: Arc::clone(&connector),
            timeout: limits.upstream_connect_timeout,
        });
        Self {
            run: run.into(),
            scrub: Arc::default(),
            client,
            connector,
            connect_timeout: limits.upstream_connect_timeout,
            response_timeout: limits.upstream_response_timeout,
            h1_buf_size: limits.h1_buf_size(),
            h1_max_headers: limits.h1_max_headers(),
            idle_h1: IdleH1::new(limits.pool_max_idle_per_host, limits.pool_idle_timeout),
        }
    }

    /// The run this pool belongs to.
    #[must_use]
    pub fn run(&self) -> &str {
        &self.run
    }

    /// The secrets this run has sent to each host (see [`crate::scrub`]).
    #[must_use]
    pub fn scrub_registry(&self) -> &Arc<crate::scrub::ScrubRegistry> {
        &self.scrub
    }

    /// Sends `req` (absolute URI naming the destination) over a pooled connection and
    /// returns the response head with its body still streaming.
    pub(crate) async fn send(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, HttpError> {
        // The URI's parts are shared buffers: keeping it costs no copy of the host, which is
        // only needed to describe a failure.
        let uri = req.uri().clone();
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => {
                let (host, port) = host_port(&uri);
                Err(map_client_error(e, host, port))
            }
            Err(_) => {
                let (host, port) = host_port(&uri);
                Err(HttpError::UpstreamTimeout {
                    host,
                    port,
                    stage: "response head",
                })
            }
        }
    }

    /// A dedicated HTTP/1.1 connection for an upgrade request: it becomes a tunnel, so it
    /// is never pooled, and h2 is not offered.
    pub(crate) async fn connect_for_upgrade(
        &self,
        uri: &Uri,
    ) -> Result<http1::SendRequest<UpstreamBody>, HttpError> {
        let target = target_of(uri, false).ok_or(HttpError::BadRequest("no upstream host"))?;
        match self.dial_h1(uri, &target).await? {
            Dialed::H1(sender) => Ok(sender),
            Dialed::H2 => {
                let (host, port) = host_port(uri);
                Err(HttpError::UpgradeNotHttp1 { host, port })
            }
        }
    }

    /// Dials `target` (named by `uri` in errors) and starts an HTTP/1.1 client connection on
    /// it, in a task of its own (with upgrades, for the tunnels), unless the destination
    /// chose h2.
    pub(crate) async fn dial_h1(
        &self,
        uri: &Uri,
        target: &UpstreamTarget,
    ) -> Result<Dialed, HttpError> {
        let stream = dial(self.connector.as_ref(), target, self.connect_timeout)
            .await
            .map_err(|f| {
                let (host, port) = host_port(uri);
                connect_failure(&f, host, port)
            })?;
        if stream.alpn.as_deref() == Some(ALPN_H2) {
            return Ok(Dialed::H2);
        }
        let mut builder = http1::Builder::new();
        builder.max_buf_size(self.h1_buf_size);
        if let Some(max) = self.h1_max_headers {
            builder.max_headers(max);
        }
        let (sender, conn) = builder
            .handshake(TokioIo::new(stream.io))
            .await
            .map_err(|e| {
                let (host, port) = host_port(uri);
                HttpError::UpstreamRequest {
                    host,
                    port,
                    source: Box::new(e),
                }
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Dialed::H1(sender))
    }

    /// The run's idle HTTP/1.1 connections.
    pub(crate) fn idle_h1(&self) -> &Arc<IdleH1> {
        &self.idle_h1
    }

    pub(crate) fn response_timeout(&self) -> Duration {
        self.response_timeout
    }
}

/// The `Host` header for a request to `uri`'s destination over a connection of its own:
/// hyper's client connection writes the URI as given and adds no `Host` (hyper-util's pool
/// wrote the same: the authority, which names the port only when it is not the default).
pub(crate) fn host_header(uri: &Uri) -> Result<HeaderValue, HttpError> {
    let authority = uri
        .authority()
        .ok_or(HttpError::BadRequest("no upstream authority"))?;
    HeaderValue::try_from(authority.as_str())
        .map_err(|_| HttpError::BadRequest("upstream authority is not a valid Host"))
}

/// `uri` in origin form (path and query), as HTTP/1.1 sends it to an origin server.
pub(crate) fn origin_form(uri: &Uri) -> Uri {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
        .into()
}

pub(crate) fn host_port(uri: &Uri) -> (String, u16) {
    let tls = uri.scheme() == Some(&Scheme::HTTPS);
    (
        uri.host().unwrap_or_default().to_owned(),
        uri.port_u16().unwrap_or(if tls { 443 } else { 80 }),
    )
}

fn connect_failure(failure: &ConnectFailure, host: String, port: u16) -> HttpError {
    match failure {
        ConnectFailure::Timeout => HttpError::UpstreamTimeout {
            host,
            port,
            stage: "connect",
        },
        ConnectFailure::Connect(e) => HttpError::UpstreamConnect {
            host,
            port,
            source: e.duplicate(),
        },
        ConnectFailure::NoHost => HttpError::BadRequest("no upstream host"),
    }
}

fn map_client_error(e: hyper_util::client::legacy::Error, host: String, port: u16) -> HttpError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(failure) = err.downcast_ref::<ConnectFailure>() {
            return connect_failure(failure, host, port);
        }
        source = err.source();
    }
    HttpError::UpstreamRequest {
        host,
        port,
        source: Box::new(e),
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its value whole; a panic elsewhere must not stop traffic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An upstream connection between two agent connections.
struct Idle {
    sender: http1::SendRequest<UpstreamBody>,
    since: Instant,
}

/// The idle HTTP/1.1 upstream connections of one run, by destination, and the destinations
/// that answered with h2 (those go to the shared pool).
pub(crate) struct IdleH1 {
    by_target: Mutex<HashMap<UpstreamTarget, Vec<Idle>>>,
    h2: Mutex<HashSet<UpstreamTarget>>,
    max_per_target: usize,
    idle_timeout: Duration,
    sweeping: AtomicBool,
}

impl std::fmt::Debug for IdleH1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleH1")
            .field("targets", &lock(&self.by_target).len())
            .field("max_per_target", &self.max_per_target)
            .finish_non_exhaustive()
    }
}

impl IdleH1 {
    pub(crate) fn new(max_per_target: usize, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            by_target: Mutex::default(),
            h2: Mutex::default(),
            max_per_target,
            idle_timeout,
            sweeping: AtomicBool::new(false),
        })
    }

    pub(crate) fn is_h2(&self, target: &UpstreamTarget) -> bool {
        lock(&self.h2).contains(target)
    }

    pub(crate) fn mark_h2(&self, target: &UpstreamTarget) {
        lock(&self.h2).insert(target.clone());
    }

    fn live(&self, idle: &Idle, now: Instant) -> bool {
        now.duration_since(idle.since) < self.idle_timeout && !idle.sender.is_closed()
    }

    /// The most recently idled live connection to `target`, if any.
    pub(crate) fn take(&self, target: &UpstreamTarget) -> Option<http1::SendRequest<UpstreamBody>> {
        let now = Instant::now();
        let mut map = lock(&self.by_target);
        let idle = map.get_mut(target)?;
        while let Some(conn) = idle.pop() {
            if self.live(&conn, now) {
                return Some(conn.sender);
            }
        }
        None
    }

    /// Keeps a connection that is ready for its next request; anything else is closed
    /// (dropping the last handle ends the connection's task).
    pub(crate) fn put(
        self: &Arc<Self>,
        target: UpstreamTarget,
        sender: http1::SendRequest<UpstreamBody>,
    ) {
        if self.max_per_target == 0 || !sender.is_ready() {
            return;
        }
        let now = Instant::now();
        {
            let mut map = lock(&self.by_target);
            let idle = map.entry(target).or_default();
            idle.retain(|c| self.live(c, now));
            if idle.len() >= self.max_per_target {
                idle.remove(0);
            }
            idle.push(Idle { sender, since: now });
        }
        self.sweep_later();
    }

    /// Closes connections idle for longer than the timeout, also those to destinations no
    /// agent connection comes back to. One task per run's store, ending with the store.
    fn sweep_later(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.sweeping.store(false, Ordering::Release);
            return;
        };
        let weak: Weak<Self> = Arc::downgrade(self);
        let every = self.idle_timeout.max(Duration::from_secs(1));
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(this) = weak.upgrade() else { return };
                let now = Instant::now();
                lock(&this.by_target).retain(|_, idle| {
                    idle.retain(|c| this.live(c, now));
                    !idle.is_empty()
                });
            }
        });
    }

    #[cfg(test)]
    pub(crate) fn idle_count(&self) -> usize {
        lock(&self.by_target).values().map(Vec::len).sum()
    }
}
