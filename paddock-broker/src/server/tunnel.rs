//! `GET /v1/node/tunnel`: a node agent's outbound tunnel (see [`crate::wire::tunnel`]).
//!
//! Only a node agent whose identity names its node (a node-bound token) may open one; the
//! tunnel is registered under that node, never under a name the caller chose. After the 101
//! the broker runs the HTTP/2 client side on the connection, with keep-alive pings so a dead
//! node agent's tunnel is dropped within a minute; a newer tunnel of the same node replaces
//! an older one.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::{
    State,
    respond::{Resp, error_response},
};
use crate::{
    auth::Identity,
    wire::{ErrorCode, tunnel},
};

const PING_INTERVAL: Duration = Duration::from_secs(20);
const PING_TIMEOUT: Duration = Duration::from_secs(20);

fn asks_for_tunnel(req: &Request<Incoming>) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(header::UPGRADE, tunnel::PROTOCOL) && has(header::CONNECTION, "upgrade")
}

pub(super) fn accept(state: &Arc<State>, identity: &Identity, mut req: Request<Incoming>) -> Resp {
    let Some(node) = identity.node.clone() else {
        return error_response(
            ErrorCode::Forbidden,
            "a node tunnel needs a token bound to a node",
        );
    };
    if !asks_for_tunnel(&req) {
        return error_response(
            ErrorCode::BadRequest,
            format!("send Upgrade: {} and Connection: upgrade", tunnel::PROTOCOL),
        );
    }
    let tunnels = state.broker.interactive().tunnels().clone();
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::info!(%node, error = %e, "node tunnel upgrade failed");
                return;
            }
        };
        let handshake = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(upgraded)
            .await;
        let (sender, conn) = match handshake {
            Ok(pair) => pair,
            Err(e) => {
                tracing::info!(%node, error = %e, "node tunnel handshake failed");
                return;
            }
        };
        let id = tunnels.register(&node, sender);
        tracing::info!(%node, "node agent tunnel connected");
        let ended = conn.await;
        tunnels.remove(&node, id);
        match ended {
            Ok(()) => tracing::info!(%node, "node agent tunnel closed"),
            Err(e) => tracing::info!(%node, error = %e, "node agent tunnel broke"),
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static(tunnel::PROTOCOL));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    resp
}
