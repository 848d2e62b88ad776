//! Admin listener (plain HTTP, bind it to a private address): `/healthz`, `/readyz`, `/metrics`.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;

use super::State;

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// How long the auth backends' checks may take in all (kubelet's default probe timeout is
/// 1 s; the store is checked at the same time).
const AUTH_CHECK_TIMEOUT: Duration = Duration::from_millis(900);

/// The `/readyz` body: ready when every check passes.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub ready: bool,
    pub checks: Vec<Check>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    fn of(name: impl Into<String>, outcome: Result<String, String>) -> Self {
        let (ok, detail) = match outcome {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        Self {
            name: name.into(),
            ok,
            detail,
        }
    }
}

/// The store answers; the policy reflects its source (a broken newer policy file leaves the
/// previous one active: still ready, and the detail says so); every auth backend's remote
/// dependency answers.
pub(crate) async fn readiness(state: &Arc<State>) -> Report {
    let broker = state.broker.clone();
    let kind = broker.store().kind();
    let store = tokio::task::spawn_blocking(move || broker.store().ping());
    let auth = tokio::time::timeout(AUTH_CHECK_TIMEOUT, state.auth.readiness());
    let (store, auth) = tokio::join!(store, auth);
    let mut checks = vec![Check::of(
        "store",
        match store {
            Ok(Ok(())) => Ok(format!("{kind} answering")),
            Ok(Err(e)) => Err(format!("{kind}: {e}")),
            Err(e) => Err(format!("store check failed: {e}")),
        },
    )];
    let policy = state.broker.policy();
    checks.push(Check::of(
        "policy",
        if !policy.is_synced() {
            Err("waiting for the first list of BrokerPolicy objects".to_owned())
        } else if let Some(e) = policy.last_error() {
            Ok(format!(
                "policy reload failing, previous policy active: {e}"
            ))
        } else {
            Ok(format!(
                "{} document(s) active",
                policy.current().documents().len()
            ))
        },
    ));
    match auth {
        Ok(backends) => checks.extend(
            backends
                .into_iter()
                .map(|b| Check::of(format!("auth:{}", b.name), b.outcome)),
        ),
        Err(_) => checks.push(Check::of(
            "auth",
            Err(format!(
                "no answer within {} ms",
                AUTH_CHECK_TIMEOUT.as_millis()
            )),
        )),
    }
    Report {
        ready: checks.iter().all(|c| c.ok),
        checks,
    }
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
            let report = readiness(&state).await;
            let status = if report.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut body = serde_json::to_string(&report).unwrap_or_default();
            body.push('\n');
            text(status, "application/json", body)
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
