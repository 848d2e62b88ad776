//! A sink that shows each record to an observer as it is written (`run`'s per-denial lines and
//! its exit summary), without changing what is written or how failures are answered.

use std::fmt;
use std::sync::Arc;

use super::{AuditError, AuditEvent, AuditSink};

/// Sees every record the proxy writes (whether or not the write succeeded). Must be cheap and
/// must not block: it runs on the data path, under no lock of the sink.
pub trait AuditObserver: Send + Sync + fmt::Debug {
    fn observe(&self, ev: &AuditEvent);
}

/// `inner`, with every record shown to `observer` after it was written.
pub struct ObservedSink {
    inner: Arc<dyn AuditSink>,
    observer: Arc<dyn AuditObserver>,
}

impl ObservedSink {
    #[must_use]
    pub fn new(inner: Arc<dyn AuditSink>, observer: Arc<dyn AuditObserver>) -> Self {
        Self { inner, observer }
    }
}

impl fmt::Debug for ObservedSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservedSink")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl AuditSink for ObservedSink {
    fn record(&self, ev: &AuditEvent) -> Result<(), AuditError> {
        let written = self.inner.record(ev);
        self.observer.observe(ev);
        written
    }

    fn is_disabled(&self) -> bool {
        self.inner.is_disabled()
    }

    fn reopen(&self) -> Result<(), AuditError> {
        self.inner.reopen()
    }

    fn health(&self) -> Result<String, String> {
        self.inner.health()
    }
}
