//! Admin listener (plain HTTP, bind it to a private address): `/healthz`, `/readyz`, `/metrics`.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use super::State;

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

pub(crate) async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != http::Method::GET {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        ));
    }
    let resp = match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let broker = state.broker.clone();
            let ready = tokio::task::spawn_blocking(move || broker.store().ping()).await;
            match ready {
                Ok(Ok(())) => {
                    // A broken newer policy leaves the previous one active: still ready, but say so.
                    let note = match state.broker.policy().last_error() {
                        Some(e) => {
                            format!("ready (policy reload failing, previous policy active: {e})\n")
                        }
                        None => "ready\n".to_owned(),
                    };
                    text(StatusCode::OK, "text/plain", note)
                }
                _ => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "store unavailable\n".into(),
                ),
            }
        }
        "/metrics" => {
            state
                .metrics
                .set_rate_limit_buckets(state.broker.rate_limits().buckets());
            text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.metrics.render(),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    Ok(resp)
}
