//! Parking idle HTTP/1.1 connections: a keep-alive connection that has been quiet for a
//! while gives hyper's server back (its read and write buffers, dispatcher and header map,
//! about 20 KiB) and waits for its next bytes as it waited for its first, holding only its
//! TLS state. Its next request builds a fresh server with those bytes replayed.
//!
//! hyper cannot release its buffers from outside, so the connection is ended the only
//! way hyper allows while keeping the socket: `graceful_shutdown` on an idle connection
//! closes it at once without writing anything, and the socket's `poll_shutdown` is turned
//! into a flush ([`ParkableIo`]) so neither the TLS `close_notify` nor the TCP FIN is sent.
//! hyper then returns the socket and the bytes it had read but not parsed.
//!
//! That is only sound when hyper really was idle: between two messages, with the last
//! request body read to its end and nothing left to write. A parked connection whose
//! request body was still unread would hand the rest of that body to the next server as a
//! request. So a connection is parked only when [`Activity`] shows all of: no request in
//! flight (from the service call until hyper drops the response body), every request body
//! read to its end, nothing read since the last answer, no write waiting on the socket,
//! only keep-alive requests so far, and no activity for [`HttpLimits::park_after`]. If
//! hyper is busy after all (it did not finish in the poll right after `graceful_shutdown`),
//! keep-alive is off by then: the connection finishes its message and closes normally, a
//! close HTTP/1.1 allows at any time.
//!
//! [`HttpLimits::park_after`]: super::HttpLimits::park_after

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::body::ProxyBody;
use super::quiet::Quiet;
use crate::net::prefixed::{PrefixedIo, next_bytes};

/// What the parking decision knows about one HTTP/1.1 connection.
///
/// Updated from the connection's task (requests, socket reads and writes) and from the
/// upstream connection's task (request bodies), hence atomics.
#[derive(Debug)]
pub(crate) struct Activity {
    base: Instant,
    in_flight: AtomicU32,
    unfinished_bodies: AtomicU32,
    /// When the last answer was done, in milliseconds since `base`.
    last_done_ms: AtomicU64,
    read_since_done: AtomicBool,
    write_pending: AtomicBool,
    /// A request asked for the connection to close (HTTP/1.0, `Connection: close`): hyper
    /// closes it after the answer, and that close must not be taken for a park.
    closing: AtomicBool,
    /// Set while a park is tried: the socket's shutdown is then only a flush.
    parking: AtomicBool,
}

/// What the park timer should do next.
#[derive(Debug, PartialEq, Eq)]
enum Check {
    Park,
    RecheckAt(Instant),
    Never,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            in_flight: AtomicU32::new(0),
            unfinished_bodies: AtomicU32::new(0),
            last_done_ms: AtomicU64::new(0),
            // Built when the first bytes arrived.
            read_since_done: AtomicBool::new(true),
            write_pending: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            parking: AtomicBool::new(false),
        })
    }

    fn since_base(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX)
    }

    fn last_done(&self) -> Instant {
        self.base + Duration::from_millis(self.last_done_ms.load(Ordering::Acquire))
    }

    /// Notes a request that will not keep the connection alive.
    pub(crate) fn request_closes(&self) {
        self.closing.store(true, Ordering::Release);
    }

    fn check(&self, now: Instant, after: Duration) -> Check {
        if self.closing.load(Ordering::Acquire) {
            return Check::Never;
        }
        let busy = self.in_flight.load(Ordering::Acquire) != 0
            || self.unfinished_bodies.load(Ordering::Acquire) != 0
            || self.write_pending.load(Ordering::Acquire)
            || self.read_since_done.load(Ordering::Acquire);
        if busy {
            return Check::RecheckAt(now + after);
        }
        let due = self.last_done() + after;
        if now >= due {
            Check::Park
        } else {
            Check::RecheckAt(due)
        }
    }
}

/// One request from its service call until hyper drops its response body.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

impl InFlight {
    pub(crate) fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.last_done_ms
            .store(a.since_base(Instant::now()), Ordering::Release);
        a.read_since_done.store(false, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The agent-facing response body: the proxy's body plus, on HTTP/1.1, the request's
/// in-flight mark, dropped with it.
pub struct Tracked {
    body: ProxyBody,
    in_flight: Option<InFlight>,
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked")
            .field("in_flight", &self.in_flight.is_some())
            .finish_non_exhaustive()
    }
}

impl Tracked {
    pub(crate) fn new(body: ProxyBody, in_flight: Option<InFlight>) -> Self {
        Self { body, in_flight }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = crate::scrub::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The agent's request body on its way upstream; on HTTP/1.1 it tells the park decision once it
/// has been read to its end. One dropped before that keeps its connection from parking
/// (hyper closes such a connection anyway).
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    unfinished: Option<Arc<Activity>>,
}

impl UpstreamBody {
    pub(crate) fn new(inner: Incoming, activity: Option<&Arc<Activity>>) -> Self {
        let unfinished = activity.filter(|_| !inner.is_end_stream()).map(|a| {
            a.unfinished_bodies.fetch_add(1, Ordering::AcqRel);
            Arc::clone(a)
        });
        Self { inner, unfinished }
    }

    fn finished(&mut self) {
        if let Some(a) = self.unfinished.take() {
            a.unfinished_bodies.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finished(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finished(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket under hyper's server: notes reads and waiting writes, and shuts down for real
/// only when no park is being tried.
#[derive(Debug)]
pub(crate) struct ParkableIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> ParkableIo<T> {
    fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }

    fn note_write<R>(&self, polled: &Poll<R>) {
        self.activity
            .write_pending
            .store(polled.is_pending(), Ordering::Release);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ParkableIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read_since_done.store(true, Ordering::Release);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ParkableIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.note_write(&polled);
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.note_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.note_write(&polled);
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.parking.load(Ordering::Acquire) {
            Pin::new(&mut this.inner).poll_flush(cx)
        } else {
            Pin::new(&mut this.inner).poll_shutdown(cx)
        }
    }
}

/// About what a parked connection's HTTP server held: hyper's read and write buffers, its
/// connection state and the server's future.
const SERVER_BYTES: u64 = 20 * 1024;

type Conn<I, Svc> = http1::UpgradeableConnection<TokioIo<ParkableIo<PrefixedIo<I>>>, Svc>;

/// When a connection parks and how long a parked one waits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// Quiet time before a park.
    pub after: Duration,
    /// A parked connection waits for its next bytes until this long after its last answer
    /// (hyper's header read timeout also starts at the end of the last answer).
    pub idle_for: Duration,
}

/// What a park does besides giving hyper's server back.
pub(crate) struct OnPark<'a> {
    /// Counts the parked connections.
    pub metrics: Arc<crate::metrics::ProxyMetrics>,
    /// Gives back what else the connection holds only while it serves: its upstream
    /// connection.
    pub release: &'a (dyn Fn() + Sync),
}

/// Serves HTTP/1.1 on `io` (whose first bytes have arrived) until the agent closes, the
/// connection upgrades or `shutdown` drains it (parked or not), parking it whenever it is
/// quiet for [`Timing::after`].
pub(crate) async fn serve<I, Svc, S>(
    mut io: PrefixedIo<I>,
    builder: &http1::Builder,
    service: Svc,
    activity: Arc<Activity>,
    timing: Timing,
    on_park: &OnPark<'_>,
    shutdown: S,
) -> hyper::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = Tracked> + Clone,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    Svc::Future: Unpin,
    S: Future<Output = ()> + Clone + Unpin,
{
    loop {
        // Boxed: the server lives only until the next park, and the parked connection's own
        // future must not keep room for it.
        let served = Box::pin(run(
            io,
            builder,
            service.clone(),
            &activity,
            timing.after,
            shutdown.clone(),
        ));
        let Some(parts) = served.await? else {
            return Ok(());
        };
        let (prefix, mut inner) = parts.io.into_inner().inner.into_parts();
        drop(parts.service);
        // Read by hyper and not parsed, then not yet read by hyper: a pipelined request.
        let unparsed = join(parts.read_buf, prefix);
        if !unparsed.is_empty() {
            activity.read_since_done.store(true, Ordering::Release);
            io = PrefixedIo::new(unparsed, inner);
            continue;
        }
        // Even empty, it holds hyper's whole read buffer.
        drop(unparsed);
        (on_park.release)();
        let _parked = on_park.metrics.track_parked();
        crate::heap::freed(SERVER_BYTES);
        let deadline = activity.last_done() + timing.idle_for;
        let next = next_bytes(
            &mut inner,
            deadline,
            shutdown.clone(),
            "a request after a park",
        );
        let Some(first) = next.await else {
            return Ok(());
        };
        activity.read_since_done.store(true, Ordering::Release);
        io = PrefixedIo::new(first, inner);
    }
}

fn join(read_buf: Bytes, rest: Bytes) -> Bytes {
    match (read_buf.is_empty(), rest.is_empty()) {
        (_, true) => read_buf,
        (true, false) => rest,
        (false, false) => {
            let mut joined = BytesMut::with_capacity(read_buf.len() + rest.len());
            joined.extend_from_slice(&read_buf);
            joined.extend_from_slice(&rest);
            joined.freeze()
        }
    }
}

/// Runs one server on `io` until it ends (`None`: closed, drained or upgraded) or parks
/// (its parts).
async fn run<I, Svc, S>(
    io: PrefixedIo<I>,
    builder: &http1::Builder,
    service: Svc,
    activity: &Arc<Activity>,
    after: Duration,
    mut shutdown: S,
) -> hyper::Result<Option<http1::Parts<TokioIo<ParkableIo<PrefixedIo<I>>>, Svc>>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = Tracked>,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    Svc::Future: Unpin,
    S: Future<Output = ()> + Unpin,
{
    // Polled by reference throughout, so the server is held once in this future.
    let mut conn: Conn<I, Svc> = builder
        .serve_connection(
            TokioIo::new(ParkableIo::new(io, Arc::clone(activity))),
            service,
        )
        .with_upgrades();
    // Both polled on every wake-up of the task, and ready about never (see `quiet`).
    let mut timer = Quiet::new(Box::pin(tokio::time::sleep(after)));
    let mut shutdown = Quiet::new(&mut shutdown);
    let mut rechecking = true;
    loop {
        tokio::select! {
            // In order: no random draw per wake-up, and the server, the one that is ever
            // ready, first.
            biased;
            out = &mut conn => {
                out?;
                return Ok(None);
            }
            () = &mut shutdown => {
                Pin::new(&mut conn).graceful_shutdown();
                (&mut conn).await?;
                return Ok(None);
            }
            () = &mut timer, if rechecking => match activity.check(Instant::now(), after) {
                Check::Never => rechecking = false,
                Check::RecheckAt(at) => timer.inner_mut().as_mut().reset(at),
                Check::Park => {
                    activity.parking.store(true, Ordering::Release);
                    Pin::new(&mut conn).graceful_shutdown();
                    let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut conn).poll(cx))).await;
                    let Poll::Ready(out) = polled else {
                        // Busy after all: keep-alive is off now, so the connection ends
                        // after its message, with a real shutdown.
                        activity.parking.store(false, Ordering::Release);
                        (&mut conn).await?;
                        return Ok(None);
                    };
                    let parts = conn.into_parts();
                    if parts.is_none() {
                        // Upgraded in that poll: the tunnel owns the socket and shuts it.
                        activity.parking.store(false, Ordering::Release);
                    }
                    out?;
                    return Ok(parts);
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type MakeBusy = fn(&Activity);

    fn activity_idle_since(ms: u64) -> Arc<Activity> {
        let a = Activity::new();
        a.read_since_done.store(false, Ordering::Release);
        a.last_done_ms.store(ms, Ordering::Release);
        a
    }

    #[tokio::test(start_paused = true)]
    async fn parks_only_a_quiet_connection_with_nothing_unfinished() {
        let after = Duration::from_secs(1);
        let a = activity_idle_since(0);
        let t0 = a.base;
        assert_eq!(a.check(t0 + after, after), Check::Park);
        assert_eq!(
            a.check(t0 + after / 2, after),
            Check::RecheckAt(t0 + after),
            "not quiet for long enough"
        );

        let busy: [(&str, MakeBusy); 4] = [
            ("in flight", |a| {
                a.in_flight.store(1, Ordering::Release);
            }),
            ("request body unread", |a| {
                a.unfinished_bodies.store(1, Ordering::Release);
            }),
            ("write waiting", |a| {
                a.write_pending.store(true, Ordering::Release);
            }),
            ("bytes read since", |a| {
                a.read_since_done.store(true, Ordering::Release);
            }),
        ];
        for (why, make_busy) in busy {
            let a = activity_idle_since(0);
            make_busy(&a);
            let now = t0 + 10 * after;
            assert_eq!(a.check(now, after), Check::RecheckAt(now + after), "{why}");
        }

        let a = activity_idle_since(0);
        a.request_closes();
        assert_eq!(a.check(t0 + 10 * after, after), Check::Never);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_resets_the_quiet_time() {
        let a = Activity::new();
        let guard = InFlight::new(&a);
        a.read_since_done.store(true, Ordering::Release);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(matches!(
            a.check(Instant::now(), Duration::from_secs(1)),
            Check::RecheckAt(_)
        ));
        drop(guard);
        assert!(!a.read_since_done.load(Ordering::Acquire));
        assert_eq!(
            a.check(Instant::now(), Duration::from_secs(1)),
            Check::RecheckAt(Instant::now() + Duration::from_secs(1))
        );
    }

    #[test]
    fn unparsed_bytes_keep_their_order() {
        let b = |s: &'static [u8]| Bytes::from_static(s);
        assert_eq!(join(b(b"GET /a"), b(b" HTTP/1.1")), b(b"GET /a HTTP/1.1"));
        assert_eq!(join(b(b""), b(b"x")), b(b"x"));
        assert_eq!(join(b(b"x"), b(b"")), b(b"x"));
        assert!(join(Bytes::new(), Bytes::new()).is_empty());
    }
}
