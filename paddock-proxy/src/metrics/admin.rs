//! The admin listener: `/metrics`, `/healthz`, `/readyz`, on its own socket, off the data path.
//!
//! * `GET /metrics`: [`ProxyMetrics::encode`] as `OpenMetrics` text.
//! * `GET /healthz`: 200 while the process serves at all (liveness).
//! * `GET /readyz`: 200 when the listeners serve ([`Readiness::set_ready`]) and every
//!   dependency check added to the [`Readiness`] passes, else 503; either way a JSON body lists
//!   each check (`{"ready":..,"checks":[{"name":..,"ok":..,"detail":..}]}`).
//!
//! Only `GET` and `HEAD` are answered. Connections are capped and header reads time out, so a
//! misbehaving scraper cannot pile up sockets.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::ProxyMetrics;
use super::ready::Readiness;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
/// How long one readiness check may take (kubelet's default probe timeout is 1 s; the checks
/// run at once, so this bounds the whole probe).
const CHECK_TIMEOUT: Duration = Duration::from_millis(900);

/// The admin HTTP server.
#[derive(Debug, Clone)]
pub struct AdminServer {
    metrics: Arc<ProxyMetrics>,
    ready: Readiness,
    max_connections: usize,
    header_timeout: Duration,
}

impl AdminServer {
    #[must_use]
    pub fn new(metrics: Arc<ProxyMetrics>, ready: Readiness) -> Self {
        Self {
            metrics,
            ready,
            max_connections: 32,
            header_timeout: Duration::from_secs(5),
        }
    }

    /// Caps concurrent admin connections (extra ones are closed at once).
    #[must_use]
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Serves `listener` until `shutdown` completes. Accept errors (e.g. out of descriptors) are
    /// logged and retried after a short pause rather than ending the admin endpoint.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let permits = Arc::new(Semaphore::new(self.max_connections));
        let app = Arc::new(self);
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => return,
                r = listener.accept() => r,
            };
            let stream = match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::debug!("admin connection cap reached; closing");
                continue;
            };
            let app = app.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let svc_app = app.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let app = svc_app.clone();
                    async move { Ok::<_, Infallible>(app.route(&req).await) }
                });
                let mut builder = http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(app.header_timeout)
                    .max_buf_size(16 * 1024);
                if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
            });
        }
    }

    async fn route<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut resp = respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n");
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
        match req.uri().path() {
            "/metrics" => respond(StatusCode::OK, OPENMETRICS, self.metrics.encode()),
            "/healthz" => respond(StatusCode::OK, TEXT, "ok\n"),
            "/readyz" => {
                let report = self.ready.report(CHECK_TIMEOUT).await;
                let status = if report.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let mut body = serde_json::to_vec(&report).unwrap_or_default();
                body.push(b'\n');
                respond(status, JSON, body)
            }
            _ => respond(StatusCode::NOT_FOUND, TEXT, "not found\n"),
        }
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::metrics::Rejection;

    async fn get(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .expect("response in time")
            .expect("read");
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        (status, out)
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let metrics = Arc::new(ProxyMetrics::new());
        metrics.rejected(Rejection::NoSni);
        let ready = Readiness::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(AdminServer::new(metrics, ready.clone()).serve(
            listener,
            async {
                let _ = stop_rx.await;
            },
        ));

        let (status, body) = get(addr, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("content-type: application/openmetrics-text"),
            "{body}"
        );
        assert!(
            body.contains("paddock_proxy_rejections_total{reason=\"no_sni\"} 1"),
            "{body}"
        );
        assert!(body.contains("# TYPE paddock_proxy_active_connections gauge"));

        assert_eq!(get(addr, "GET", "/healthz").await.0, 200);
        let (status, body) = get(addr, "GET", "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("content-type: application/json"), "{body}");
        assert!(body.contains(r#""name":"listeners","ok":false"#), "{body}");
        ready.set_ready(true);
        let (status, body) = get(addr, "GET", "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(r#"{"ready":true,"#), "{body}");
        // A dependency failing makes the probe fail, and the body says which.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let sink: Arc<dyn crate::audit::AuditSink> =
            Arc::new(crate::audit::JsonlFileSink::open(&path).expect("open"));
        ready.add_check(Arc::new(crate::health::AuditCheck(sink)));
        assert_eq!(get(addr, "GET", "/readyz").await.0, 200);
        std::fs::remove_file(&path).expect("rm");
        let (status, body) = get(addr, "GET", "/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains(r#""name":"audit","ok":false"#), "{body}");
        // Liveness does not depend on the checks.
        assert_eq!(get(addr, "GET", "/healthz").await.0, 200);
        let (status, head) = get(addr, "HEAD", "/metrics").await;
        assert_eq!(status, 200);
        assert!(!head.contains("# EOF"), "HEAD carries no body: {head}");
        assert_eq!(get(addr, "GET", "/nope").await.0, 404);
        let (status, resp) = get(addr, "POST", "/metrics").await;
        assert_eq!(status, 405);
        assert!(resp.contains("allow: GET, HEAD"), "{resp}");

        stop_tx.send(()).expect("stop");
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("server stops")
            .expect("join");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "listener closed after shutdown"
        );
    }
}
