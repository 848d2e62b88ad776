//! The broker client's transport to a broker in the same process (`paddock-proxy run`): an
//! in-memory pipe per connection from [`LocalLink`], served by the broker's own HTTP server,
//! routes and authentication. No TCP and no TLS: inside one process they only cost CPU.

use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use paddock_broker::server::LocalLink;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

/// One in-process connection.
#[derive(Debug)]
pub(crate) struct LocalStream(DuplexStream);

impl AsyncRead for LocalStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for LocalStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connection for LocalStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// Opens in-process connections for the client's pool.
#[derive(Debug, Clone)]
pub(crate) struct LocalConnector(pub LocalLink);

impl tower_service::Service<Uri> for LocalConnector {
    type Response = TokioIo<LocalStream>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        std::future::ready(self.0.connect().map(|s| TokioIo::new(LocalStream(s))))
    }
}
