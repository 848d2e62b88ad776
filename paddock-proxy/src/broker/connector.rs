//! How the broker client reaches the broker: any [`BrokerConnector`], one trait for every
//! transport. The client owns everything above the connection (HTTP/1.1 pool, deadline,
//! bearer, answer decoding), so an HTTPS broker and one in the same process
//! (`paddock-proxy run`, whose app layer implements the trait over the broker's in-memory
//! link) are called through the same code.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};

/// An error opening a connection (its whole source chain is reported).
pub type BrokerConnectError = Box<dyn std::error::Error + Send + Sync>;

/// A byte stream to the broker's HTTP/1.1 API.
pub trait BrokerIo: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static {}

impl<T: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static> BrokerIo for T {}

/// An open connection to the broker.
pub type BrokerStream = Box<dyn BrokerIo>;

/// A connection being opened.
pub type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<BrokerStream, BrokerConnectError>> + Send>>;

/// Opens connections to one broker.
pub trait BrokerConnector: fmt::Debug + Send + Sync + 'static {
    /// Where requests are addressed: scheme and authority only. The client sends its
    /// authority as `Host` and keys its keep-alive pool by it.
    fn base(&self) -> Uri;

    /// A new connection for a request to `uri` (the base with a path).
    fn connect(&self, uri: Uri) -> ConnectFuture;
}

/// HTTPS over TCP: TLS 1.3 with the configured roots only (see [`super::BrokerClient::new`]).
pub(crate) struct HttpsBrokerConnector {
    pub(crate) base: Uri,
    pub(crate) inner: HttpsConnector<HttpConnector>,
}

impl fmt::Debug for HttpsBrokerConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpsBrokerConnector")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl BrokerConnector for HttpsBrokerConnector {
    fn base(&self) -> Uri {
        self.base.clone()
    }

    fn connect(&self, uri: Uri) -> ConnectFuture {
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let stream = tower_service::Service::call(&mut inner, uri).await?;
            Ok(Box::new(stream) as BrokerStream)
        })
    }
}

/// Any [`BrokerConnector`] as the connector of hyper-util's pooled client.
#[derive(Clone)]
pub(crate) struct DynConnector(pub(crate) Arc<dyn BrokerConnector>);

impl tower_service::Service<Uri> for DynConnector {
    type Response = DynStream;
    type Error = BrokerConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<DynStream, BrokerConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.connect(uri);
        Box::pin(async move { connecting.await.map(DynStream) })
    }
}

/// A [`BrokerStream`] as hyper-util's client wants it.
pub(crate) struct DynStream(BrokerStream);

impl Connection for DynStream {
    fn connected(&self) -> Connected {
        // HTTP/1.1 without a proxy and without ALPN: nothing to report.
        Connected::new()
    }
}

impl hyper::rt::Read for DynStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for DynStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write_vectored(cx, bufs)
    }
}
