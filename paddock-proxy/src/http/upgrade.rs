//! Forwarding HTTP/1.1 upgrades (WebSocket and others) and splicing the two tunnels.

use std::sync::{Arc, Mutex};

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::task::JoinSet;
use tracing::Instrument as _;

use super::park::UpstreamBody;
use super::upstream::{UpstreamPool, host_header, host_port, origin_form};
use super::{HttpError, hop};

/// The upgraded tunnels of one agent connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tunnels(Arc<Mutex<JoinSet<()>>>);

impl Tunnels {
    fn spawn(&self, tunnel: impl Future<Output = ()> + Send + 'static) {
        // A poisoned lock only means another tunnel's spawn panicked; the set is intact.
        let mut set = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        set.spawn(tunnel.instrument(tracing::Span::current()));
    }

    /// Waits until every tunnel spawned so far has closed.
    pub(crate) async fn wait(&self) {
        let mut set = {
            let mut guard = self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::take(&mut *guard)
        };
        while set.join_next().await.is_some() {}
    }
}

/// Sends an upgrade request (already substituted) on a dedicated upstream connection.
///
/// On 101 the agent and upstream tunnels are spliced once both sides have switched, and the
/// protocol that was agreed is returned so its `Upgrade` header survives hop-by-hop
/// stripping. Any other answer is forwarded as an ordinary response.
pub(crate) async fn forward(
    pool: &UpstreamPool,
    mut req: Request<UpstreamBody>,
    agent: OnUpgrade,
    tunnels: &Tunnels,
    watch: TunnelWatch,
) -> Result<(Response<Incoming>, Option<HeaderValue>), HttpError> {
    let (host, port) = host_port(req.uri());
    let offered = req
        .headers()
        .get(header::UPGRADE)
        .cloned()
        .ok_or(HttpError::BadRequest("upgrade request without Upgrade"))?;
    let mut sender = pool.connect_for_upgrade(req.uri()).await?;

    let host_header = host_header(req.uri())?;
    req.headers_mut().insert(header::HOST, host_header);
    *req.uri_mut() = origin_form(req.uri());

    let mut response =
        match tokio::time::timeout(pool.response_timeout(), sender.send_request(req)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                return Err(HttpError::UpstreamRequest {
                    host,
                    port,
                    source: Box::new(e),
                });
            }
            Err(_) => {
                return Err(HttpError::UpstreamTimeout {
                    host,
                    port,
                    stage: "upgrade response",
                });
            }
        };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok((response, None));
    }
    let Some(protocol) = response
        .headers()
        .get(header::UPGRADE)
        .filter(|chosen| hop::upgrade_accepted(&offered, chosen))
        .cloned()
    else {
        return Err(HttpError::UpstreamRequest {
            host,
            port,
            source: "101 Switching Protocols to a protocol that was not offered".into(),
        });
    };
    if watch.scrub.is_some()
        && response
            .headers()
            .contains_key(header::SEC_WEBSOCKET_EXTENSIONS)
    {
        // None was offered; a server that negotiates one anyway sends frames the scrubber
        // cannot read.
        return Err(HttpError::Unscrubbable {
            host,
            port,
            reason: "the server negotiated a WebSocket extension that was not offered".into(),
        });
    }
    let upstream = hyper::upgrade::on(&mut response);
    tunnels.spawn(splice(agent, upstream, host, port, watch));
    Ok((response, Some(protocol)))
}

/// Told how many secrets a scrubbed tunnel replaced, as it happens.
pub(crate) type OnScrub = Box<dyn FnMut(u64) + Send + Sync>;

/// What keeps re-checking an open tunnel (the connection's egress re-check, if any) and,
/// when the host holds secrets, scrubs what the server sends.
pub(crate) struct TunnelWatch {
    pub recheck: Option<crate::policy::ConnectionRecheck>,
    pub scrub: Option<(Arc<crate::scrub::Scrubber>, OnScrub)>,
}

async fn splice(
    agent: OnUpgrade,
    upstream: OnUpgrade,
    host: String,
    port: u16,
    mut watch: TunnelWatch,
) {
    let (agent, upstream) = match tokio::try_join!(agent, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(%host, port, error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut agent = TokioIo::new(agent);
    let mut upstream = TokioIo::new(upstream);
    let scrub = watch.scrub.take();
    let copy = async {
        match scrub {
            None => tokio::io::copy_bidirectional(&mut agent, &mut upstream)
                .await
                .map_err(|e| e.to_string()),
            Some((scrubber, tell)) => {
                scrubbed_copy(&mut agent, &mut upstream, scrubber, tell).await
            }
        }
    };
    tokio::select! {
        copied = copy => match copied {
            Ok((sent, received)) => {
                tracing::debug!(%host, port, sent, received, "upgraded tunnel closed");
            }
            Err(e) => tracing::debug!(%host, port, error = %e, "upgraded tunnel failed"),
        },
        e = watchdog(&watch) => {
            // Dropping both sides closes the tunnel.
            tracing::info!(%host, port, reason = e.reason(), error = %e, "upgraded tunnel closed: no longer allowed");
        }
    }
}

/// Agent to server as bytes; server to agent through the WebSocket scrubber. Ends when either
/// direction ends (a WebSocket closes both ways together).
async fn scrubbed_copy<A, U>(
    agent: &mut A,
    upstream: &mut U,
    scrubber: Arc<crate::scrub::Scrubber>,
    tell: OnScrub,
) -> Result<(u64, u64), String>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut agent_rd, mut agent_wr) = tokio::io::split(agent);
    let (upstream_rd, mut upstream_wr) = tokio::io::split(upstream);
    let up = tokio::io::copy(&mut agent_rd, &mut upstream_wr);
    let down = crate::scrub::websocket::relay(upstream_rd, &mut agent_wr, scrubber, tell);
    tokio::select! {
        sent = up => sent.map(|n| (n, 0)).map_err(|e| e.to_string()),
        replaced = down => replaced.map(|_| (0, 0)).map_err(|e| e.to_string()),
    }
}

/// Completes (with the reason) once the tunnel is no longer allowed; never without a check
/// interval.
async fn watchdog(watch: &TunnelWatch) -> crate::policy::RecheckError {
    let Some(recheck) = &watch.recheck else {
        return std::future::pending().await;
    };
    let every = recheck.interval().max(std::time::Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = recheck.check().await {
            return e;
        }
    }
}
