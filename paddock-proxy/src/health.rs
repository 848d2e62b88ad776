//! The dependency checks of `/readyz` (see [`crate::metrics::ready`]): the broker, the eBPF
//! pins, the audit sink and the forging CA's validity. Kept apart from the metrics module,
//! which the components checked here report into.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::audit::AuditSink;
use crate::broker::BrokerClient;
use crate::metrics::ready::{CheckFuture, ReadyCheck};

/// The broker authenticates this process and its store answers (`GET /v1/ping`).
#[derive(Debug, Clone)]
pub struct BrokerCheck(pub BrokerClient);

impl ReadyCheck for BrokerCheck {
    fn name(&self) -> &'static str {
        "broker"
    }

    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async move {
            self.0
                .ping()
                .await
                .map(|p| format!("answering (store {})", p.store))
                .map_err(|e| e.to_string())
        })
    }
}

/// Which agent cgroups must be intercepted right now (asked at each probe: a node agent's pods
/// come and go).
pub type ExpectedCgroups =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Vec<u64>> + Send>> + Send + Sync>;

/// The shared maps and every expected agent cgroup's links are pinned
/// ([`crate::ebpf::check_pins`]).
#[derive(Clone)]
pub struct EbpfCheck {
    pub pin_dir: PathBuf,
    pub expected: ExpectedCgroups,
}

impl std::fmt::Debug for EbpfCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfCheck")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl ReadyCheck for EbpfCheck {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn check(&self) -> CheckFuture<'_> {
        let ids = (self.expected)();
        Box::pin(async move { crate::ebpf::check_pins(&self.pin_dir, &ids.await) })
    }
}

/// The audit sink can take the next record ([`AuditSink::health`]).
#[derive(Debug, Clone)]
pub struct AuditCheck(pub Arc<dyn AuditSink>);

impl ReadyCheck for AuditCheck {
    fn name(&self) -> &'static str {
        "audit"
    }

    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async move {
            if self.0.is_disabled() {
                return Ok("disabled (--audit none)".to_owned());
            }
            self.0.health()
        })
    }
}

/// The end of the current forging CA's validity.
pub type CaExpiry = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// The forging CA stays valid for more than `min_valid`: leaves signed now would otherwise
/// expire with it, and a CA about to lapse needs an operator (or its renewal) before it does.
#[derive(Clone)]
pub struct CaCheck {
    pub not_after: CaExpiry,
    pub min_valid: Duration,
}

impl std::fmt::Debug for CaCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaCheck")
            .field("min_valid", &self.min_valid)
            .finish_non_exhaustive()
    }
}

impl ReadyCheck for CaCheck {
    fn name(&self) -> &'static str {
        "ca"
    }

    fn check(&self) -> CheckFuture<'_> {
        let left = (self.not_after)() - OffsetDateTime::now_utc();
        let min = self.min_valid;
        Box::pin(async move {
            let span = |secs: u64| format!("{}h{:02}m", secs / 3600, secs % 3600 / 60);
            if left <= time::Duration::ZERO {
                Err("the forging CA has expired or was revoked".to_owned())
            } else if left.unsigned_abs() <= min {
                Err(format!(
                    "the forging CA expires in {}, within the {} required",
                    span(left.unsigned_abs().as_secs()),
                    span(min.as_secs())
                ))
            } else {
                Ok(format!(
                    "valid for {} more",
                    span(left.unsigned_abs().as_secs())
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_ca_check_wants_more_validity_left_than_the_minimum() {
        let at = |d: time::Duration| -> CaExpiry {
            let t = OffsetDateTime::now_utc() + d;
            Arc::new(move || t)
        };
        let check = |d, min_h: u64| CaCheck {
            not_after: at(d),
            min_valid: Duration::from_secs(min_h * 3600),
        };
        let ok = check(time::Duration::hours(30), 24).check().await;
        assert!(ok.as_ref().is_ok_and(|d| d.contains("valid for")), "{ok:?}");
        let soon = check(time::Duration::hours(20), 24).check().await;
        assert!(
            soon.as_ref()
                .is_err_and(|d| d.contains("within the 24h00m")),
            "{soon:?}"
        );
        let gone = check(time::Duration::hours(-1), 1).check().await;
        assert!(
            gone.as_ref().is_err_and(|d| d.contains("expired")),
            "{gone:?}"
        );
    }

    #[tokio::test]
    async fn the_audit_check_follows_the_sink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.jsonl");
        let sink: Arc<dyn AuditSink> =
            Arc::new(crate::audit::JsonlFileSink::open(&path).expect("open"));
        let check = AuditCheck(Arc::clone(&sink));
        assert!(check.check().await.is_ok());
        std::fs::remove_file(&path).expect("rm");
        assert!(check.check().await.is_err());
        let none: Arc<dyn AuditSink> = Arc::new(crate::audit::NoAudit::explicitly_disabled());
        let d = AuditCheck(none)
            .check()
            .await
            .expect("disabled is not a failure");
        assert!(d.contains("disabled"), "{d}");
    }
}
