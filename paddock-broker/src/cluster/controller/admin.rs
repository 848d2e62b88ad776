//! The controller's admin listener (`adminListen`, plain HTTP, for the kubelet's probes and
//! Prometheus): `/healthz` (the process serves), `/readyz` (same: a standby replica is ready
//! to take over, so both replicas stay in the Service), `/metrics`
//! (`paddock_controller_build_info`, `paddock_controller_leading`).

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::text::encode,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::TcpListener;

type Labels = Vec<(String, String)>;

/// The controller's metrics.
#[derive(Debug)]
pub struct ControllerMetrics {
    registry: Registry,
    leading: Gauge,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControllerMetrics {
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("paddock_controller");
        let build_info = Family::<Labels, Gauge>::default();
        build_info
            .get_or_create(&vec![
                ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
                ("component".to_owned(), "controller".to_owned()),
            ])
            .set(1);
        registry.register(
            "build_info",
            "Always 1; labels name the version and component of this binary",
            build_info,
        );
        let leading = Gauge::default();
        registry.register(
            "leading",
            "1 while this replica holds the Lease and reconciles runs, 0 while it stands by",
            leading.clone(),
        );
        Self { registry, leading }
    }

    /// Marks this replica as leading until the guard drops (stepping down drops the work that
    /// holds it).
    #[must_use]
    pub fn lead(&self) -> LeadingGuard {
        self.leading.set(1);
        LeadingGuard(self.leading.clone())
    }

    /// `OpenMetrics` text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Sets the leading gauge back to 0 when dropped.
#[derive(Debug)]
pub struct LeadingGuard(Gauge);

impl Drop for LeadingGuard {
    fn drop(&mut self) {
        self.0.set(0);
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn route(metrics: &ControllerMetrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" | "/readyz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Most admin connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;

/// Serves `listener` until `stop` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<ControllerMetrics>,
    stop: impl Future<Output = ()>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            () = &mut stop => return,
            r = listener.accept() => r,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req: Request<Incoming>| {
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, Infallible>(route(&metrics, &req)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .expect("in time")
            .expect("read");
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, out)
    }

    #[tokio::test]
    async fn probes_and_metrics_follow_leadership() {
        let metrics = Arc::new(ControllerMetrics::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::clone(&metrics), async {
            let _ = stop_rx.await;
        }));
        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(
            get(addr, "/readyz").await.0,
            200,
            "a standby replica is ready"
        );
        assert_eq!(get(addr, "/nope").await.0, 404);
        let (_, body) = get(addr, "/metrics").await;
        assert!(
            body.contains(&format!(
                "paddock_controller_build_info{{version=\"{}\",component=\"controller\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{body}"
        );
        assert!(body.contains("paddock_controller_leading 0"), "{body}");
        let guard = metrics.lead();
        assert!(
            get(addr, "/metrics")
                .await
                .1
                .contains("paddock_controller_leading 1")
        );
        drop(guard);
        assert!(
            get(addr, "/metrics")
                .await
                .1
                .contains("paddock_controller_leading 0")
        );
        stop_tx.send(()).expect("stop");
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("stops")
            .expect("join");
    }
}
