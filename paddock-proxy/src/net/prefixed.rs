//! Streams whose first bytes were already read: a request head read to decide a plain-HTTP
//! connection, or the first bytes of a connection read before its HTTP server was built.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream whose first bytes were already read: they are replayed first.
#[derive(Debug)]
pub struct PrefixedIo<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> PrefixedIo<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The bytes not replayed yet and the wrapped stream.
    pub fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.inner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PrefixedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                // An emptied slice still holds its whole buffer (hyper's 8 KiB read buffer,
                // after a park) for as long as the stream lives.
                this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
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

/// The most one first read takes; the rest stays in the stream.
const FIRST_READ: usize = 8 * 1024;

/// Waits for the stream's first bytes and returns them (`None` at end of stream).
///
/// The read buffer lives on the stack only while a read is tried, so a connection that
/// waits here holds no buffer at all: what makes an idle connection cheap.
pub async fn first_bytes<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Option<Bytes>> {
    std::future::poll_fn(|cx| {
        let mut chunk = [0u8; FIRST_READ];
        let mut buf = ReadBuf::new(&mut chunk);
        ready!(Pin::new(&mut *io).poll_read(cx, &mut buf))?;
        let filled = buf.filled();
        Poll::Ready(Ok(
            (!filled.is_empty()).then(|| Bytes::copy_from_slice(filled))
        ))
    })
    .await
}

/// Waits for a quiet connection's next bytes until `deadline`, unless `stop` completes
/// first. `None` when the peer closed, the read failed, the deadline passed or `stop` came
/// first (each logged at debug with `waiting`, which says what the connection waited for):
/// in every case the connection is over.
pub async fn next_bytes<T: AsyncRead + Unpin>(
    io: &mut T,
    deadline: tokio::time::Instant,
    stop: impl Future<Output = ()>,
    waiting: &'static str,
) -> Option<Bytes> {
    let next = tokio::select! {
        biased;
        () = stop => return None,
        next = tokio::time::timeout_at(deadline, first_bytes(io)) => next,
    };
    match next {
        Ok(Ok(Some(bytes))) => Some(bytes),
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, waiting, "agent connection failed while quiet");
            None
        }
        Err(_) => {
            tracing::debug!(waiting, "no request within the header read timeout");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn first_bytes_are_returned_and_replayed_before_the_rest() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        a.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        let first = first_bytes(&mut b).await.expect("read").expect("bytes");
        assert_eq!(&first[..], b"GET / HTTP/1.1\r\n");
        a.write_all(b"Host: x\r\n\r\n").await.expect("write");
        drop(a);
        let mut replay = PrefixedIo::new(first, b);
        let mut out = Vec::new();
        replay.read_to_end(&mut out).await.expect("replay");
        assert_eq!(out, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[tokio::test]
    async fn a_large_first_burst_is_read_in_part_and_nothing_is_lost() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let sent: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        a.write_all(&sent).await.expect("write");
        drop(a);
        let first = first_bytes(&mut b).await.expect("read").expect("bytes");
        assert!(first.len() <= FIRST_READ, "{} bytes", first.len());
        let mut replay = PrefixedIo::new(first, b);
        let mut out = Vec::new();
        replay.read_to_end(&mut out).await.expect("replay");
        assert_eq!(out, sent);
    }

    #[tokio::test]
    async fn end_of_stream_before_any_byte_is_none() {
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert!(first_bytes(&mut b).await.expect("read").is_none());
    }
}
