//! The proxy pipeline: listeners, per-connection decisions and the hand-off to the request
//! loop.
//!
//! Every agent connection, whichever listener it arrived on, goes through the same steps:
//!
//! 1. **Admission**: a connection over the cap is reset (`cap_exceeded`).
//! 2. **Destination**: transparent listeners recover the original destination
//!    ([`OriginalDst`]); none recorded (not redirected, or evicted from the eBPF maps by newer
//!    connections), or the proxy's own listener, is reset (`no_original_dst`), never guessed.
//!    Its port says whether the connection carries TLS or plain HTTP (`plain_http_ports`). The
//!    name comes from the `ClientHello` SNI (peeked, not consumed), the `Host` header, or the
//!    `CONNECT` authority. No SNI -> `no_sni`; bytes that are not TLS on a TLS port ->
//!    `handshake_failed`. Both are reset.
//! 3. **Policy** ([`EgressPolicy`]): a denied host is audited, then, for TLS, the agent's
//!    handshake is completed with a forged leaf and every request gets the 403 page naming the
//!    host and reason ([`crate::http::serve_denial`]), so agents stop retrying.
//! 4. **Network vetting** ([`Vetter`]): the proxy resolves the name itself; every address goes
//!    through the denied-CIDR set, and in transparent mode the original destination must be one
//!    of the addresses the name resolves to (`dns_rebinding_mismatch`). Failures are reset.
//! 5. **Audit** of the decision ([`audit_decision`]): a failed write on the deny path resets the
//!    connection; on the allow path it is counted and logged.
//! 6. **Upstream first**: the vetted addresses are dialled (with the bypass `SO_MARK`) and the
//!    upstream TLS handshake offers what the agent offered; then the agent's handshake is
//!    completed offering exactly what upstream chose, and the upstream connection is handed to
//!    the run's pool for the agent's first request. Once upstream's choice for an offer is
//!    known, later connections skip this probe and the pool's connections serve them.
//! 7. **Request loop** ([`crate::http::serve_connection_until`]) until the agent closes, a leg
//!    is idle for the idle timeout, or the proxy drains. Each request is audited once its status
//!    is decided ([`RequestAudit`]); a refusal that cannot be recorded is not answered.
//!
//! Steps 3 to 5 are one function for all three listeners (`admission`); the listeners differ
//! only in how the addresses are vetted and how a denial is answered. Steps 2 to 6 are
//! bounded by the handshake timeout. One tracing span per connection carries the connection id
//! (`conn`, also in every audit record of the connection), the run, original destination, SNI
//! and decision.

mod admission;
pub(crate) mod connect;
mod connector;
pub mod head;
pub mod io;
mod listener;
mod passthrough;
pub(crate) mod plain;
mod transparent;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};

use crate::audit::{AuditEvent, AuditOutcome, AuditSink, ConnId, audit_decision};
use crate::http::{
    HttpError, HttpLimits, RequestAudit, RequestContext, Substituter, UpstreamPool,
    serve_connection_until,
};
use crate::labels::{AuditKind, DecisionLabel, Rejection};
use crate::metrics::ProxyMetrics;
use crate::net::Vetter;
use crate::origdst::OriginalDst;
use crate::policy::{Decision, EgressPolicy, EgressRecheck, EgressRequest, Mode, RecheckError};
use crate::tls::{MitmServer, UpstreamTls};

pub use connector::Connector;
pub use listener::{Drain, ListenerKind, run_listener};

/// Bounds of the pipeline (the request loop has its own in [`HttpLimits`]).
#[derive(Debug, Clone)]
pub struct PipelineLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_client_hello_bytes: usize,
    pub max_header_bytes: usize,
}

impl Default for PipelineLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_mins(1),
            max_client_hello_bytes: 16 * 1024,
            max_header_bytes: 64 * 1024,
        }
    }
}

/// Everything a pipeline needs; see [`Pipeline::new`].
#[derive(Debug)]
pub struct PipelineParts {
    pub run: String,
    pub policy: Arc<dyn EgressPolicy>,
    pub vetter: Vetter,
    pub mitm: Arc<MitmServer>,
    pub upstream_tls: Arc<UpstreamTls>,
    pub connector: Arc<Connector>,
    pub substituter: Arc<dyn Substituter>,
    pub audit: Arc<dyn AuditSink>,
    pub metrics: Arc<ProxyMetrics>,
    pub origdst: Arc<dyn OriginalDst>,
    pub http_limits: HttpLimits,
    pub limits: PipelineLimits,
    /// Original destination ports that carry plain HTTP.
    pub plain_http_ports: Vec<u16>,
    /// Answer denied TLS hosts with a 403 page (else reset).
    pub deny_page: bool,
    /// How long one policy answer covers requests and tunnels of open connections (see
    /// [`EgressRecheck`]); `None`: the connection's first decision stands for its lifetime.
    pub egress_recheck: Option<Duration>,
}

/// The shared state of every listener of one proxy.
#[derive(Debug)]
pub struct Pipeline {
    run: String,
    policy: Arc<dyn EgressPolicy>,
    vetter: Vetter,
    mitm: Arc<MitmServer>,
    upstream_tls: Arc<UpstreamTls>,
    connector: Arc<Connector>,
    pool: UpstreamPool,
    substituter: Arc<dyn Substituter>,
    recheck: Option<Arc<EgressRecheck>>,
    audit: Arc<dyn AuditSink>,
    metrics: Arc<ProxyMetrics>,
    origdst: Arc<dyn OriginalDst>,
    http_limits: HttpLimits,
    limits: PipelineLimits,
    plain_http_ports: Vec<u16>,
    deny_page: bool,
    connections: Arc<Semaphore>,
    alpn_cache: transparent::AlpnCache,
    shutdown: watch::Receiver<bool>,
    /// Turned `true` by [`Pipeline::abort_connections`]: every connection task stops at once.
    abort: watch::Sender<bool>,
}

impl Pipeline {
    /// Builds the pipeline; `shutdown` turning `true` starts the drain.
    #[must_use]
    pub fn new(parts: PipelineParts, shutdown: watch::Receiver<bool>) -> Self {
        let connector: Arc<dyn crate::http::UpstreamConnector> = parts.connector.clone();
        let pool = UpstreamPool::new(&parts.run, connector, &parts.http_limits);
        let max = parts
            .limits
            .max_connections
            .clamp(1, Semaphore::MAX_PERMITS);
        let recheck = parts
            .egress_recheck
            .map(|every| Arc::new(EgressRecheck::new(Arc::clone(&parts.policy), every)));
        Self {
            run: parts.run,
            recheck,
            policy: parts.policy,
            vetter: parts.vetter,
            mitm: parts.mitm,
            upstream_tls: parts.upstream_tls,
            connector: parts.connector,
            pool,
            substituter: parts.substituter,
            audit: parts.audit,
            metrics: parts.metrics,
            origdst: parts.origdst,
            http_limits: parts.http_limits,
            limits: PipelineLimits {
                max_connections: max,
                ..parts.limits
            },
            plain_http_ports: parts.plain_http_ports,
            deny_page: parts.deny_page,
            connections: Arc::new(Semaphore::new(max)),
            alpn_cache: transparent::AlpnCache::new(4096),
            shutdown,
            abort: watch::Sender::new(false),
        }
    }

    /// The run this pipeline serves.
    #[must_use]
    pub fn run(&self) -> &str {
        &self.run
    }

    /// The metrics registry.
    #[must_use]
    pub fn metrics(&self) -> &Arc<ProxyMetrics> {
        &self.metrics
    }

    /// The audit sink.
    #[must_use]
    pub fn audit_sink(&self) -> &Arc<dyn AuditSink> {
        &self.audit
    }

    /// Connections currently admitted.
    #[must_use]
    pub fn active_connections(&self) -> usize {
        self.limits.max_connections - self.connections.available_permits()
    }

    /// Closes every connection of this pipeline now, mid-request or mid-tunnel, and the ones
    /// admitted after this call as soon as they start (the node agent, when a pod goes: its
    /// connections must not outlive it). Listeners are stopped by the drain, not by this.
    pub fn abort_connections(&self) {
        self.abort.send_replace(true);
    }

    /// A future that completes once [`Pipeline::abort_connections`] was called.
    fn aborted(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.abort.subscribe();
        async move {
            let _ = rx.wait_for(|abort| *abort).await;
        }
    }

    /// A future that completes when the drain starts.
    fn drained(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.clone();
        async move {
            // A dropped sender also means "stop".
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Asks the policy, treating errors and a slow backend as a deny (fail closed).
    async fn decide(&self, host: &str, port: u16, mode: Mode) -> (Option<String>, Decision) {
        let req = match EgressRequest::new(self.run.clone(), host, port, mode) {
            Ok(req) => req,
            Err(e) => {
                return (
                    None,
                    Decision::Deny {
                        reason: format!("invalid host name: {e}"),
                    },
                );
            }
        };
        let decision = match tokio::time::timeout(
            self.limits.handshake_timeout,
            self.policy.check(&req),
        )
        .await
        {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "egress policy failed; denying");
                Decision::Deny {
                    reason: "egress policy unavailable".to_owned(),
                }
            }
            Err(_) => Decision::Deny {
                reason: "egress policy timed out".to_owned(),
            },
        };
        (Some(req.host), decision)
    }

    /// Runs the request loop on an admitted agent connection until it ends or the proxy
    /// drains; each request is audited with the connection's id, mode and destination.
    async fn serve_requests<I>(
        &self,
        agent: I,
        agent_alpn: Option<&[u8]>,
        ctx: RequestContext,
        info: &ConnInfo<'_>,
    ) -> Result<(), HttpError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mode = info.mode;
        let audit = RequestAudit::new(Arc::clone(&self.audit), Arc::clone(&self.metrics), mode)
            .with_dst(info.dst)
            .with_conn(info.conn);
        let recheck = match &self.recheck {
            None => None,
            // The host was normalised when the connection was decided, so this cannot fail;
            // if it did, no request of the connection would be covered: refuse them all.
            Some(r) => Some(r.for_connection(
                EgressRequest::new(self.run.clone(), &ctx.host, ctx.port, mode).map_err(|e| {
                    HttpError::Egress(RecheckError::Denied {
                        reason: e.to_string(),
                    })
                })?,
            )),
        };
        serve_connection_until(
            agent,
            agent_alpn,
            ctx,
            self.pool.clone(),
            Arc::clone(&self.substituter),
            audit,
            self.http_limits.clone(),
            recheck,
            self.drained(),
        )
        .await
    }

    /// Counts, logs and audits a refused connection. Returns the audit outcome: the caller
    /// resets on [`AuditOutcome::DropConnection`], and may otherwise answer with a page.
    fn refuse(&self, info: &ConnInfo<'_>, rejection: Rejection, reason: &str) -> AuditOutcome {
        self.metrics.rejected(rejection);
        self.metrics.connection_decided(DecisionLabel::Deny);
        tracing::Span::current().record("decision", "deny");
        tracing::info!(rejection = %rejection, reason, "connection denied");
        let mut ev = AuditEvent::new(AuditKind::Deny, self.run.clone(), info.mode, info.port())
            .with_conn(info.conn)
            .with_reason(format!("{rejection}: {reason}"));
        if let Some(dst) = info.dst {
            ev = ev.with_dst(dst);
        }
        if let Some(sni) = info.sni {
            ev = ev.with_sni(sni);
        }
        audit_decision(self.audit.as_ref(), &self.metrics, &ev)
    }

    /// Counts, logs and audits an allowed (or discovery) connection; never blocks it.
    fn admit(&self, info: &ConnInfo<'_>, decision: &Decision) {
        let (kind, label, rule) = match decision {
            Decision::Allow { rule, .. } => (AuditKind::Allow, DecisionLabel::Allow, rule),
            Decision::Discovery { rule } => (AuditKind::Discovery, DecisionLabel::Discovery, rule),
            Decision::Passthrough { rule } => {
                (AuditKind::Passthrough, DecisionLabel::Passthrough, rule)
            }
            Decision::Deny { .. } => return,
        };
        self.metrics.connection_decided(label);
        tracing::Span::current().record("decision", label.as_str());
        tracing::info!(rule = %rule, "connection allowed");
        let mut ev = AuditEvent::new(kind, self.run.clone(), info.mode, info.port())
            .with_conn(info.conn)
            .with_rule(rule.clone());
        if let Some(dst) = info.dst {
            ev = ev.with_dst(dst);
        }
        if let Some(sni) = info.sni {
            ev = ev.with_sni(sni);
        }
        // The allow path proceeds whatever the sink says (the failure is counted and logged).
        let _ = audit_decision(self.audit.as_ref(), &self.metrics, &ev);
    }
}

/// What is known about a connection when it is decided.
#[derive(Debug, Clone, Copy)]
struct ConnInfo<'a> {
    /// Joins the connection's audit records and log lines.
    conn: ConnId,
    mode: Mode,
    dst: Option<SocketAddr>,
    /// The claimed name (SNI, Host or CONNECT authority).
    sni: Option<&'a str>,
    port: u16,
}

impl ConnInfo<'_> {
    fn port(&self) -> u16 {
        self.port
    }
}

/// Closes `stream` with a TCP reset rather than a FIN, so the agent sees a hard failure.
fn reset(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "cannot set SO_LINGER for a reset");
    }
}

/// The original destination of an accepted transparent connection, IPv4-mapped forms
/// unwrapped, or why there is none (the connection is then refused as `no_original_dst`).
///
/// Two cases have none: nothing was recorded for the connection (it was not redirected, or
/// its entry was evicted from the eBPF maps by newer connections), and a "destination" that is
/// this listener itself. The latter is what netfilter's own `SO_ORIGINAL_DST` answers for a
/// connection dialled straight at the proxy in a namespace with connection tracking; taking it
/// as a destination would make the proxy dial itself.
fn original_dst(origdst: &dyn OriginalDst, stream: &TcpStream) -> Result<SocketAddr, String> {
    let dst = origdst
        .original_dst(stream.as_fd())
        .map_err(|e| e.to_string())?;
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    let local = stream
        .local_addr()
        .map_err(|e| format!("cannot read the listener address: {e}"))?;
    if SocketAddr::new(local.ip().to_canonical(), local.port()) == dst {
        return Err(format!(
            "the recovered destination {dst} is the proxy's own listener"
        ));
    }
    Ok(dst)
}
