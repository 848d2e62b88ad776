//! The production [`UpstreamConnector`]: dials only vetted addresses (with the bypass mark)
//! and runs upstream TLS; also hands over connections the transparent path already opened.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::http::{BoxFuture, ConnectError, UpstreamConnector, UpstreamStream, UpstreamTarget};
use crate::labels::Leg;
use crate::metrics::ProxyMetrics;
use crate::net::{DialSettings, Vetter, dial};
use crate::tls::{ALPN_H2, UpstreamAlpn, UpstreamTls};

use super::io::IdleIo;

/// How long a handed-over connection waits for the pool before it is closed.
const STASH_TTL: Duration = Duration::from_secs(10);
/// Most handed-over connections kept at once.
const STASH_CAP: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct StashKey {
    host: String,
    port: u16,
    tls: bool,
}

/// Dials and handshakes upstream connections for the request loop's pool.
pub struct Connector {
    vetter: Vetter,
    tls: Arc<UpstreamTls>,
    dial: DialSettings,
    idle: Duration,
    metrics: Arc<ProxyMetrics>,
    stash: Mutex<HashMap<StashKey, Vec<(Instant, UpstreamStream)>>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("dial", &self.dial)
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

impl Connector {
    #[must_use]
    pub fn new(
        vetter: Vetter,
        tls: Arc<UpstreamTls>,
        dial: DialSettings,
        idle: Duration,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        Self {
            vetter,
            tls,
            dial,
            idle,
            metrics,
            stash: Mutex::new(HashMap::new()),
        }
    }

    /// Dial settings (the transparent path dials with the same mark and timeouts).
    #[must_use]
    pub fn dial_settings(&self) -> &DialSettings {
        &self.dial
    }

    /// Wraps an upstream socket in the idle timeout. Bytes are counted on the agent leg only,
    /// so each byte is counted once.
    pub fn wrap<T>(&self, io: T) -> IdleIo<T> {
        IdleIo::new(io, self.idle, None)
    }

    /// Keeps a connection the transparent path opened (to learn upstream's ALPN) for the
    /// pool's next dial of the same destination, so the agent's first request reuses it.
    pub fn hand_over(&self, host: &str, port: u16, stream: UpstreamStream) {
        let key = StashKey {
            host: host.to_owned(),
            port,
            tls: true,
        };
        let now = Instant::now();
        let Ok(mut stash) = self.stash.lock() else {
            return;
        };
        stash.retain(|_, v| {
            v.retain(|(t, _)| now.duration_since(*t) < STASH_TTL);
            !v.is_empty()
        });
        if stash.values().map(Vec::len).sum::<usize>() >= STASH_CAP {
            return;
        }
        stash.entry(key).or_default().push((now, stream));
    }

    fn take(&self, target: &UpstreamTarget) -> Option<UpstreamStream> {
        let key = StashKey {
            host: target.host.clone(),
            port: target.port,
            tls: target.tls,
        };
        let now = Instant::now();
        let mut stash = self.stash.lock().ok()?;
        let list = stash.get_mut(&key)?;
        let mut found = None;
        while let Some((t, stream)) = list.pop() {
            if now.duration_since(t) >= STASH_TTL {
                continue;
            }
            if !target.allow_h2 && stream.alpn.as_deref() == Some(ALPN_H2) {
                // An upgrade needs HTTP/1.1; leave the h2 connection for a normal request.
                list.push((t, stream));
                break;
            }
            found = Some(stream);
            break;
        }
        if list.is_empty() {
            stash.remove(&key);
        }
        found
    }

    async fn dial_new(&self, target: &UpstreamTarget) -> Result<UpstreamStream, ConnectError> {
        let vetted = self
            .vetter
            .vet_name(&target.host)
            .await
            .map_err(|e| ConnectError::Denied(e.to_string()))?;
        let started = Instant::now();
        let dialed = dial(&vetted.addrs, target.port, &self.dial)
            .await
            .map_err(|e| ConnectError::Io(std::io::Error::other(e.to_string())))?;
        let io = self.wrap(dialed.stream);
        if !target.tls {
            self.metrics.observe_upstream_latency(started.elapsed());
            return Ok(UpstreamStream {
                io: Box::new(io),
                alpn: None,
            });
        }
        let alpn = if target.allow_h2 {
            UpstreamAlpn::H2AndHttp11
        } else {
            UpstreamAlpn::Http11
        };
        match self.tls.connect(io, &target.host, alpn).await {
            Ok(conn) => {
                self.metrics.observe_upstream_latency(started.elapsed());
                Ok(UpstreamStream {
                    io: Box::new(conn.stream),
                    alpn: conn.alpn,
                })
            }
            Err(e) => {
                self.metrics.handshake_failed(Leg::Upstream);
                Err(ConnectError::Handshake(e.to_string()))
            }
        }
    }
}

impl UpstreamConnector for Connector {
    fn connect<'a>(
        &'a self,
        target: &'a UpstreamTarget,
    ) -> BoxFuture<'a, Result<UpstreamStream, ConnectError>> {
        Box::pin(async move {
            if let Some(stream) = self.take(target) {
                return Ok(stream);
            }
            self.dial_new(target).await
        })
    }
}
