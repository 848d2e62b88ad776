//! Pass-through: an admitted TLS connection relayed without terminating it.
//!
//! Reached only after the same steps as an intercepted connection (SNI read, policy decided,
//! destination vetted, admission audited as `passthrough`); then the proxy dials the vetted
//! addresses and splices bytes in the kernel ([`crate::net::splice`]). The `ClientHello` the
//! proxy peeked is still in the agent's socket and goes upstream first. While the relay runs,
//! the destination is re-checked at the connection re-check interval, and a withdrawn
//! destination, the proxy draining or the idle timeout end it.

use std::net::IpAddr;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{ConnInfo, Pipeline, reset};
use crate::labels::Direction;
use crate::net::dial;
use crate::net::splice::{RelayEnd, relay};
use crate::policy::EgressRequest;

pub(super) async fn serve(
    p: &Pipeline,
    stream: TcpStream,
    host: &str,
    port: u16,
    addrs: &[IpAddr],
    deadline: Instant,
    info: &ConnInfo<'_>,
) {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let upstream =
        match tokio::time::timeout(remaining, dial(addrs, port, p.connector.dial_settings())).await
        {
            Ok(Ok(d)) => d.stream,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "upstream dial failed");
                reset(&stream);
                return;
            }
            Err(_) => {
                tracing::warn!("upstream dial timed out");
                reset(&stream);
                return;
            }
        };
    let _ = upstream.set_nodelay(true);
    let withdrawn = withdrawn(p, host, port, info);
    let drained = p.drained();
    let stop = async {
        tokio::select! {
            () = withdrawn => {}
            () = drained => {}
        }
    };
    match relay(&stream, &upstream, p.limits.idle_timeout, stop).await {
        Ok(done) => {
            p.metrics.add_bytes(Direction::AgentToUpstream, done.up);
            p.metrics.add_bytes(Direction::UpstreamToAgent, done.down);
            tracing::debug!(up = done.up, down = done.down, end = ?done.end, "pass-through ended");
            if done.end != RelayEnd::Closed {
                reset(&stream);
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "pass-through ended with an error");
            reset(&stream);
        }
    }
}

/// Resolves once a re-check refuses the destination (never without a re-check).
async fn withdrawn(p: &Pipeline, host: &str, port: u16, info: &ConnInfo<'_>) {
    let Some(recheck) = p.recheck.as_ref() else {
        return std::future::pending().await;
    };
    let Ok(req) = EgressRequest::new(p.run.clone(), host, port, info.mode) else {
        return;
    };
    let conn = recheck.for_connection(req);
    let mut every =
        tokio::time::interval(recheck.interval().max(std::time::Duration::from_millis(50)));
    every.tick().await;
    loop {
        every.tick().await;
        if let Err(e) = conn.check().await {
            tracing::info!(error = %e, "pass-through closed: destination no longer allowed");
            return;
        }
    }
}
