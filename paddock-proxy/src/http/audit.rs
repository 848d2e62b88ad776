//! The audit record of each request the loop serves.
//!
//! The record itself, and the rule for a failed write, are [`crate::audit`]'s: one
//! [`AuditKind::Request`] event per request, written once the status is decided; a request
//! the proxy answered itself is not answered when its record cannot be written.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, StatusCode, Uri, Version};

use super::error::sanitize_reason;
use super::{HttpError, RequestContext, Substituted};
use crate::audit::{
    AuditEvent, AuditKind, AuditOutcome, AuditSink, ConnId, RequestOutcome, audit_decision,
};
use crate::labels::ScrubLocation;
use crate::metrics::ProxyMetrics;
use crate::policy::Mode;

/// Where a connection's request records go, plus what they say about the connection beyond
/// the [`RequestContext`]: how it arrived ([`Mode`]) and its destination address.
#[derive(Clone, Debug)]
pub struct RequestAudit {
    sink: Arc<dyn AuditSink>,
    metrics: Arc<ProxyMetrics>,
    mode: Mode,
    dst: Option<SocketAddr>,
    conn: Option<ConnId>,
}

impl RequestAudit {
    /// Records go to `sink`; failed writes are counted in `metrics`.
    #[must_use]
    pub fn new(sink: Arc<dyn AuditSink>, metrics: Arc<ProxyMetrics>, mode: Mode) -> Self {
        Self {
            sink,
            metrics,
            mode,
            dst: None,
            conn: None,
        }
    }

    /// Where the connection's counters go.
    pub(crate) fn metrics(&self) -> &Arc<ProxyMetrics> {
        &self.metrics
    }

    /// The connection the requests arrive on: its id goes into every record.
    #[must_use]
    pub fn with_conn(mut self, conn: ConnId) -> Self {
        self.conn = Some(conn);
        self
    }

    /// The connection's destination address (the original destination in transparent and
    /// plain-HTTP mode), when known.
    #[must_use]
    pub fn with_dst(mut self, dst: Option<SocketAddr>) -> Self {
        self.dst = dst;
        self
    }

    /// Records what became of one request and says whether its answer may be sent (see the
    /// caller's rule in [`crate::audit`]).
    pub(crate) fn record(
        &self,
        ctx: &RequestContext,
        request: &RequestLine,
        substituted: Substituted,
        answer: Answer<'_>,
    ) -> AuditOutcome {
        if self.sink.is_disabled() {
            return AuditOutcome::Proceed;
        }
        let mut ev = AuditEvent::new(AuditKind::Request, ctx.run.clone(), self.mode, ctx.port)
            .with_sni(ctx.host.clone())
            .with_request(&request.method, &request.uri, request.version)
            .with_credential(substituted.credential, substituted.lease_id);
        if let Some(dst) = self.dst {
            ev = ev.with_dst(dst);
        }
        if let Some(conn) = self.conn {
            ev = ev.with_conn(conn);
        }
        ev = match answer {
            Answer::Forwarded(status) => ev
                .with_status(status)
                .with_outcome(RequestOutcome::Forwarded),
            Answer::Abandoned => ev
                .with_outcome(RequestOutcome::Abandoned)
                .with_reason("the agent closed the request before it was answered"),
            Answer::Refused(e) => {
                let outcome = if e.is_denial() {
                    RequestOutcome::Denied
                } else {
                    RequestOutcome::Failed
                };
                ev.with_status(e.status())
                    .with_outcome(outcome)
                    .with_reason(format!(
                        "{}: {}",
                        e.reason(),
                        sanitize_reason(&e.to_string())
                    ))
            }
        };
        audit_decision(self.sink.as_ref(), &self.metrics, &ev)
    }
}

impl RequestAudit {
    /// Records that `count` secrets were replaced in the response to `request`, and counts
    /// them. The response is scrubbed whatever becomes of the record.
    pub(crate) fn scrubbed(
        &self,
        ctx: &RequestContext,
        request: &RequestLine,
        credential: Option<String>,
        location: ScrubLocation,
        count: u64,
    ) {
        if count == 0 {
            return;
        }
        self.metrics.scrubbed(location, count);
        tracing::warn!(
            run = %ctx.run, host = %ctx.host, location = location.as_str(), count,
            "secret reflected by the upstream; replaced by its placeholder"
        );
        if self.sink.is_disabled() {
            return;
        }
        let mut ev = AuditEvent::new(AuditKind::Scrubbed, ctx.run.clone(), self.mode, ctx.port)
            .with_sni(ctx.host.clone())
            .with_request(&request.method, &request.uri, request.version)
            .with_credential(credential, None)
            .with_reason(format!(
                "secret replaced in the response {}",
                location.as_str()
            ))
            .with_scrubbed(count);
        if let Some(dst) = self.dst {
            ev = ev.with_dst(dst);
        }
        if let Some(conn) = self.conn {
            ev = ev.with_conn(conn);
        }
        let _ = audit_decision(self.sink.as_ref(), &self.metrics, &ev);
    }
}

/// The agent's request line, kept before the request is consumed. The audit record takes
/// only the URI's path.
#[derive(Debug, Clone)]
pub(crate) struct RequestLine {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
}

/// How a request was answered.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Answer<'a> {
    /// With the upstream's response (head) and this status.
    Forwarded(StatusCode),
    /// By the proxy, because of this error.
    Refused(&'a HttpError),
    /// Not at all: the agent went away first.
    Abandoned,
}
