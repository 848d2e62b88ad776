//! Stream wrappers for both legs: an idle timeout that also counts bytes, and reading an
//! HTTP/1 request head.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::labels::Direction;
use crate::metrics::ProxyMetrics;

/// Fails reads and writes with `TimedOut` once no byte has moved either way for `timeout`.
///
/// Both directions share one deadline: a long upload with a silent response is not idle. The
/// request loop above sees the error and closes the connection, which is what the idle timeout
/// is for. Bytes are counted into the metrics as they move.
///
/// Activity only records the time: the timer is moved when it fires early (at most once per
/// `timeout`), not on every read and write, which would touch the runtime's timer wheel (a
/// lock) twice per request. The byte counters are looked up once, not per operation.
pub struct IdleIo<T> {
    inner: T,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    last_activity: Instant,
    /// The waker `deadline` was last polled with. Polling a timer registers the waker again
    /// (atomics and the coop budget), once per pending read or write: several times per
    /// request. While that waker is still the one asking and the timer has not fired, the
    /// registration stands.
    registered: Option<Waker>,
    counter: Option<(Counter, Counter)>,
}

impl<T> std::fmt::Debug for IdleIo<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleIo")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<T> IdleIo<T> {
    /// Wraps `inner`. With `counter = (metrics, read_dir, write_dir)`, bytes read are counted as
    /// `read_dir` and bytes written as `write_dir`.
    pub fn new(
        inner: T,
        timeout: Duration,
        counter: Option<(Arc<ProxyMetrics>, Direction, Direction)>,
    ) -> Self {
        Self {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            last_activity: Instant::now(),
            registered: None,
            counter: counter.map(|(m, r, w)| (m.byte_counter(r), m.byte_counter(w))),
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn touch(&mut self) {
        self.last_activity = Instant::now();
    }

    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if !self.deadline.is_elapsed()
            && self
                .registered
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        loop {
            match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let due = self.last_activity + self.timeout;
                    if due > Instant::now() {
                        // Something moved since the timer was set: wait for the rest.
                        self.deadline.as_mut().reset(due);
                        continue;
                    }
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("idle for {:?}", self.timeout),
                    ));
                }
                Poll::Pending => {
                    self.registered = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
    }

    /// Accounts for a write's outcome; a write that waits may find the stream idle.
    fn wrote(
        &mut self,
        polled: Poll<io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.touch();
                    self.count(false, n);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.check_idle(cx).map(Err),
        }
    }

    fn count(&self, read: bool, n: usize) {
        if let Some((r, w)) = &self.counter {
            if read { r } else { w }.inc_by(n as u64);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    this.touch();
                    this.count(true, n);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.check_idle(cx).map(Err),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(polled, cx)
    }

    /// Passed through: rustls hands its queued records to one `writev`; the default
    /// would write only the first record per system call.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Reads an HTTP/1 request head (through the blank line) from `io`, at most `max` bytes.
///
/// Returns the head and whatever arrived after it in the same reads.
pub async fn read_head<T: AsyncRead + Unpin>(
    io: &mut T,
    max: usize,
) -> io::Result<(Vec<u8>, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a complete request head",
            ));
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = find_blank_line(&buf[scan_from..]) {
            let end = scan_from + pos + 4;
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        if buf.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request head larger than {max} bytes"),
            ));
        }
    }
}

fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n")
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use bytes::Bytes;

    use crate::net::prefixed::PrefixedIo;

    #[tokio::test]
    async fn head_is_split_from_the_body_and_replayed() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(b"GET / HTTP/1.1\r\nHost: Example.com:80\r\n\r\nbody")
            .await
            .expect("write");
        let (head, rest) = read_head(&mut b, 1024).await.expect("head");
        let parsed = super::super::head::parse_head(&head, 8).expect("parsed");
        assert_eq!(parsed.host, Some("Example.com:80"));
        assert_eq!((parsed.method, parsed.target), ("GET", "/"));
        assert_eq!(rest, b"body");
        let mut replay = PrefixedIo::new(Bytes::from(head.clone()), b);
        let mut out = vec![0u8; head.len()];
        replay.read_exact(&mut out).await.expect("replay");
        assert_eq!(out, head);
    }

    #[tokio::test]
    async fn oversized_or_truncated_heads_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(8192);
        a.write_all(&[b'a'; 3000]).await.expect("write");
        let err = read_head(&mut b, 1024).await.expect_err("too large");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let (mut a, mut b) = tokio::io::duplex(8192);
        a.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        drop(a);
        let err = read_head(&mut b, 1024).await.expect_err("eof");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_stream_times_out_and_activity_defers_it() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut idle = IdleIo::new(b, Duration::from_secs(10), None);
        let mut buf = [0u8; 8];
        tokio::time::sleep(Duration::from_secs(6)).await;
        a.write_all(b"x").await.expect("write");
        assert_eq!(idle.read(&mut buf).await.expect("read"), 1);
        // Activity at t=6 moves the deadline to t=16.
        let start = Instant::now();
        let err = idle.read(&mut buf).await.expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    /// The timer's registration is kept while the same task asks; a read polled by another
    /// waker must register that one, or the idle timeout would never wake it.
    #[tokio::test(start_paused = true)]
    async fn the_idle_timer_wakes_whoever_polled_last() {
        let (_a, b) = tokio::io::duplex(64);
        let mut idle = IdleIo::new(b, Duration::from_secs(10), None);
        let mut buf = [0u8; 8];
        let mut cx = Context::from_waker(Waker::noop());
        let mut read = ReadBuf::new(&mut buf);
        assert!(
            Pin::new(&mut idle)
                .poll_read(&mut cx, &mut read)
                .is_pending()
        );
        assert!(
            Pin::new(&mut idle)
                .poll_read(&mut cx, &mut read)
                .is_pending()
        );
        let start = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(20), idle.read(&mut buf))
            .await
            .expect("woken by the idle timer")
            .expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    /// A stream that takes whole `writev`s and records how many buffers each carried.
    #[derive(Default)]
    struct Vectored {
        calls: Vec<usize>,
        written: Vec<u8>,
    }

    impl AsyncWrite for Vectored {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.calls.push(bufs.len());
            let before = this.written.len();
            for b in bufs {
                this.written.extend_from_slice(b);
            }
            Poll::Ready(Ok(this.written.len() - before))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn queued_records_leave_in_one_vectored_write_and_are_counted() {
        let metrics = Arc::new(ProxyMetrics::new());
        let mut io = IdleIo::new(
            PrefixedIo::new(Bytes::new(), Vectored::default()),
            Duration::from_secs(10),
            Some((
                Arc::clone(&metrics),
                Direction::AgentToUpstream,
                Direction::UpstreamToAgent,
            )),
        );
        assert!(io.is_write_vectored());
        let bufs = [
            io::IoSlice::new(b"first record"),
            io::IoSlice::new(b", second"),
        ];
        let n = io.write_vectored(&bufs).await.expect("write");
        assert_eq!(n, 20);
        let inner = io.get_ref().get_ref();
        assert_eq!(inner.calls, [2], "one system call for both records");
        assert_eq!(inner.written, b"first record, second");
        assert_eq!(metrics.byte_counter(Direction::UpstreamToAgent).get(), 20);
    }
}
