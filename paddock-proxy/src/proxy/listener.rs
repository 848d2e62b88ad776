//! Accept loops: admission against the connection cap, one span per connection (with its
//! [`ConnId`], also in every audit record of the connection), and the drain.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::Instrument;

use super::{Pipeline, connect, reset, transparent};
use crate::audit::ConnId;
use crate::http::quiet::Quiet;
use crate::labels::Rejection;

/// Which pipeline entry a listener feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Kernel-redirected connections (original destination recovered from the socket).
    Transparent,
    /// Cooperative HTTP/1.1 `CONNECT`.
    Connect,
}

impl ListenerKind {
    fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Transparent => "transparent",
            ListenerKind::Connect => "connect",
        }
    }
}

/// Accepts on `listener` until the drain starts. Connections over the cap are reset and
/// counted (`cap_exceeded`); accept errors (descriptor exhaustion) back off briefly.
pub async fn run_listener(p: Arc<Pipeline>, listener: TcpListener, kind: ListenerKind) {
    let drained = p.drained();
    tokio::pin!(drained);
    loop {
        let accepted = tokio::select! {
            () = &mut drained => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, listener = kind.as_str(), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&p.connections).try_acquire_owned() else {
            p.metrics.rejected(Rejection::CapExceeded);
            tracing::warn!(%peer, "connection cap reached; resetting");
            reset(&stream);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let conn = ConnId::next();
        let span = tracing::info_span!(
            "conn",
            %conn,
            run = %p.run,
            listener = kind.as_str(),
            %peer,
            dst = tracing::field::Empty,
            sni = tracing::field::Empty,
            decision = tracing::field::Empty,
        );
        let p = Arc::clone(&p);
        let aborted = p.aborted();
        tokio::spawn(
            async move {
                let _permit = permit;
                let _active = p.metrics.track_connection();
                // Boxed: a task is as large as the largest state of its future, and each
                // mode's future is tens of KiB; the task then holds only what is live.
                let served: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = match kind {
                    ListenerKind::Transparent => Box::pin(transparent::serve(p, stream, conn)),
                    ListenerKind::Connect => Box::pin(connect::serve(p, stream, conn)),
                };
                // Dropping the connection's future closes its sockets (both legs). The
                // abort signal is polled only when it fired (`Quiet`), not on each of the
                // task's several wake-ups per request.
                let mut aborted = std::pin::pin!(aborted);
                let aborted = Quiet::new(aborted.as_mut());
                tokio::select! {
                    biased;
                    () = served => {}
                    () = aborted => tracing::debug!("connection aborted"),
                }
            }
            .instrument(span),
        );
    }
}

/// Waits for admitted connections to finish after the drain started, at most `grace`.
#[derive(Debug)]
pub struct Drain;

impl Drain {
    /// Returns the number of connections still open when the grace period ended.
    pub async fn wait(p: &Pipeline, grace: Duration) -> usize {
        let all = u32::try_from(p.limits.max_connections).unwrap_or(u32::MAX);
        match tokio::time::timeout(grace, p.connections.acquire_many(all)).await {
            Ok(_) => 0,
            Err(_) => p.active_connections(),
        }
    }
}
