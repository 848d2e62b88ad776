//! Reaching a run's adapter: the connector seam and the few HTTP/1.1 calls the broker makes.

use std::{collections::HashMap, fmt, future::Future, net::SocketAddr, pin::Pin, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::broadcast,
};

use super::Output;
use crate::wire::RunInfo;

/// A byte stream to an adapter.
pub trait AdapterStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AdapterStream for T {}
pub type AdapterIo = Box<dyn AdapterStream>;
pub type AdapterFuture<'a> =
    Pin<Box<dyn Future<Output = Result<AdapterIo, AdapterError>> + Send + 'a>>;

/// How the broker opens a stream to a run's adapter. The address is the connector's
/// business (it comes from the run), never a caller's.
pub trait AdapterConnector: Send + Sync + fmt::Debug {
    fn connect<'a>(&'a self, run: &'a RunInfo) -> AdapterFuture<'a>;
}

/// Why the adapter could not be used. Every variant but `NotConfigured` is a 502.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("no adapter is known for run {0}")]
    NotConfigured(String),
    #[error("adapter unreachable: {0}")]
    Unreachable(String),
    #[error("adapter answered HTTP {0}")]
    Status(u16),
    #[error("adapter did not answer in time")]
    Timeout,
    #[error("adapter connection failed: {0}")]
    Protocol(String),
}

/// Adapters at fixed TCP addresses, per run id (tests; a served broker's static routes).
#[derive(Debug, Default, Clone)]
pub struct TcpAdapters {
    by_run: HashMap<String, SocketAddr>,
}

impl TcpAdapters {
    #[must_use]
    pub fn new(by_run: HashMap<String, SocketAddr>) -> Self {
        Self { by_run }
    }
}

impl AdapterConnector for TcpAdapters {
    fn connect<'a>(&'a self, run: &'a RunInfo) -> AdapterFuture<'a> {
        Box::pin(async move {
            let addr = self
                .by_run
                .get(&run.run)
                .ok_or_else(|| AdapterError::NotConfigured(run.run.clone()))?;
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| AdapterError::Unreachable(e.to_string()))?;
            Ok(Box::new(tcp) as AdapterIo)
        })
    }
}

/// The most of an adapter's answer to a POST the broker reads (and hands back).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

async fn send(
    connector: &dyn AdapterConnector,
    run: &RunInfo,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<http::Response<Incoming>, AdapterError> {
    let io = connector.connect(run).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| AdapterError::Protocol(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "adapter connection ended with an error");
        }
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "adapter")
        .body(Full::new(body.clone()))
        .map_err(|e| AdapterError::Protocol(e.to_string()))?;
    if !body.is_empty() {
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    sender
        .send_request(req)
        .await
        .map_err(|e| AdapterError::Protocol(e.to_string()))
}

/// POSTs `body` to the adapter's `path`; returns the adapter's answer (at most 64 KiB) when
/// it is a 2xx.
pub async fn adapter_post(
    connector: &dyn AdapterConnector,
    run: &RunInfo,
    path: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<Bytes, AdapterError> {
    tokio::time::timeout(timeout, async {
        let resp = send(connector, run, Method::POST, path, body).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(AdapterError::Status(status.as_u16()));
        }
        Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map(http_body_util::Collected::to_bytes)
            .map_err(|e| AdapterError::Protocol(e.to_string()))
    })
    .await
    .map_err(|_| AdapterError::Timeout)?
}

/// Opens the adapter's output stream (`GET /output`); returns once its head arrived.
pub(super) async fn open_output(
    connector: &dyn AdapterConnector,
    run: &RunInfo,
) -> Result<Incoming, AdapterError> {
    let resp = send(connector, run, Method::GET, "/output", Bytes::new()).await?;
    if resp.status() != StatusCode::OK {
        return Err(AdapterError::Status(resp.status().as_u16()));
    }
    Ok(resp.into_body())
}

/// Copies the adapter's output to every subscriber until it ends.
pub(super) async fn pump(mut body: Incoming, out: broadcast::Sender<Output>) {
    let why = loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    // No subscriber left is fine: the last detach stops this pump.
                    let _ = out.send(Output::Data(data));
                }
            }
            Some(Err(e)) => break format!("adapter gone: {e}"),
            None => break "adapter output ended".to_owned(),
        }
    };
    tracing::debug!(%why, "adapter output pump stopped");
    let _ = out.send(Output::End(why));
}
