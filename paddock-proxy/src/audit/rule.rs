//! The fail-closed rule: which failed writes stop what they record (see the module docs).

use super::{AuditEvent, AuditKind, AuditSink, RequestOutcome};
use crate::metrics::ProxyMetrics;

/// The fail-closed rule of each kind.
impl AuditKind {
    /// Whether a failed write of this kind always drops the connection (see the module docs).
    /// For [`AuditKind::Request`] it depends on the outcome: see [`AuditEvent::fails_closed`].
    #[must_use]
    pub fn fails_closed(self) -> bool {
        matches!(
            self,
            AuditKind::Deny | AuditKind::ConnectReason | AuditKind::DnsDeny
        )
    }
}

/// The fail-closed rule of each event.
impl AuditEvent {
    /// Whether a failed write of this event must stop what it records (see the module docs):
    /// denials, `CONNECT` reasons and requests the proxy answered itself. A request record
    /// without an outcome counts as answered by the proxy.
    #[must_use]
    pub fn fails_closed(&self) -> bool {
        match self.kind {
            // Only answers the proxy gives itself can be withheld; there is nothing to
            // withhold from a forwarded or abandoned request.
            AuditKind::Request => !matches!(
                self.outcome,
                Some(RequestOutcome::Forwarded | RequestOutcome::Abandoned)
            ),
            kind => kind.fails_closed(),
        }
    }
}

/// What the caller must do after auditing a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum AuditOutcome {
    /// Recorded, or failed on a path that proceeds anyway (counted and logged).
    Proceed,
    /// The record failed on a fail-closed path: drop (reset) the connection, or for a request
    /// the proxy answered itself, reset its stream instead of answering.
    DropConnection,
}

/// Records `ev` and applies the caller's rule from the module docs ([`AuditEvent::fails_closed`]).
pub fn audit_decision(
    sink: &dyn AuditSink,
    metrics: &ProxyMetrics,
    ev: &AuditEvent,
) -> AuditOutcome {
    match sink.record(ev) {
        Ok(()) => AuditOutcome::Proceed,
        Err(e) => {
            metrics.audit_write_failed(ev.kind);
            if ev.fails_closed() {
                tracing::error!(error = %e, run = %ev.run, kind = %ev.kind, "audit write failed; failing closed");
                AuditOutcome::DropConnection
            } else {
                tracing::warn!(error = %e, run = %ev.run, kind = %ev.kind, "audit write failed; proceeding");
                AuditOutcome::Proceed
            }
        }
    }
}
