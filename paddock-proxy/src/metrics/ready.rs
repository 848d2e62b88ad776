//! Readiness: what `/readyz` reports, one check per dependency.
//!
//! The listeners flag ([`Readiness::set_ready`]) is always the first check; the process adds
//! one [`ReadyCheck`] per dependency it has (the broker, the eBPF pins, the audit sink, the
//! forging CA). A probe runs every check at once, each bounded by a timeout, and is ready only
//! when every check passes; the JSON body lists each with what it found, so an operator sees
//! which dependency failed without reading logs. `/healthz` stays a liveness check and runs
//! none of this.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use crate::audit::AuditSink;
use crate::broker::BrokerClient;

/// What one check found: `Ok` describes the healthy state, `Err` why it is not ready.
pub type CheckOutcome = Result<String, String>;

/// A check's future.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = CheckOutcome> + Send + 'a>>;

/// One dependency the process needs to serve.
pub trait ReadyCheck: Send + Sync + 'static {
    /// A stable name (the JSON `name` field).
    fn name(&self) -> &'static str;
    /// Checks the dependency now. Bounded by the caller's timeout; must not block the runtime.
    fn check(&self) -> CheckFuture<'_>;
}

/// Shared readiness state (clones share it).
#[derive(Clone, Default)]
pub struct Readiness(Arc<Inner>);

#[derive(Default)]
struct Inner {
    listening: AtomicBool,
    checks: RwLock<Vec<Arc<dyn ReadyCheck>>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("listening", &self.is_ready())
            .finish_non_exhaustive()
    }
}

/// The `/readyz` body.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Report {
    pub ready: bool,
    pub checks: Vec<CheckReport>,
}

/// One check in the `/readyz` body.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckReport {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl Readiness {
    /// Not ready, no checks.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Listeners bound and serving (`true`), or not yet / draining (`false`).
    pub fn set_ready(&self, ready: bool) {
        self.0.listening.store(ready, Ordering::Release);
    }

    /// The listeners flag alone.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.0.listening.load(Ordering::Acquire)
    }

    /// Adds a dependency check (checks keep the order they were added in).
    pub fn add_check(&self, check: Arc<dyn ReadyCheck>) {
        if let Ok(mut checks) = self.0.checks.write() {
            checks.push(check);
        }
    }

    /// Runs every check at once, each within `timeout`.
    pub async fn report(&self, timeout: Duration) -> Report {
        let checks: Vec<Arc<dyn ReadyCheck>> =
            self.0.checks.read().map(|c| c.clone()).unwrap_or_default();
        let listening = self.is_ready();
        let mut reports = vec![CheckReport {
            name: "listeners",
            ok: listening,
            detail: if listening {
                "serving".to_owned()
            } else {
                "not serving: starting or draining".to_owned()
            },
        }];
        let outcomes = futures_util::future::join_all(checks.iter().map(|c| async move {
            match tokio::time::timeout(timeout, c.check()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
            }
        }))
        .await;
        for (check, outcome) in checks.iter().zip(outcomes) {
            let (ok, detail) = match outcome {
                Ok(d) => (true, d),
                Err(d) => (false, d),
            };
            reports.push(CheckReport {
                name: check.name(),
                ok,
                detail,
            });
        }
        Report {
            ready: reports.iter().all(|r| r.ok),
            checks: reports,
        }
    }
}

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
                Err("the forging CA has expired".to_owned())
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

    struct Fixed(&'static str, CheckOutcome, Duration);

    impl ReadyCheck for Fixed {
        fn name(&self) -> &'static str {
            self.0
        }

        fn check(&self) -> CheckFuture<'_> {
            Box::pin(async move {
                tokio::time::sleep(self.2).await;
                self.1.clone()
            })
        }
    }

    fn fixed(name: &'static str, outcome: CheckOutcome) -> Arc<dyn ReadyCheck> {
        Arc::new(Fixed(name, outcome, Duration::ZERO))
    }

    #[tokio::test]
    async fn ready_only_when_listening_and_every_check_passes() {
        let r = Readiness::new();
        r.add_check(fixed("a", Ok("fine".into())));
        let report = r.report(Duration::from_secs(1)).await;
        assert!(!report.ready, "not listening yet");
        assert_eq!(report.checks[0].name, "listeners");
        assert!(!report.checks[0].ok);
        r.set_ready(true);
        let report = r.report(Duration::from_secs(1)).await;
        assert!(report.ready, "{report:?}");
        assert_eq!(
            report.checks[1],
            CheckReport {
                name: "a",
                ok: true,
                detail: "fine".into()
            }
        );
        r.add_check(fixed("b", Err("broken".into())));
        let report = r.report(Duration::from_secs(1)).await;
        assert!(!report.ready);
        assert_eq!(
            report
                .checks
                .iter()
                .map(|c| (c.name, c.ok))
                .collect::<Vec<_>>(),
            [("listeners", true), ("a", true), ("b", false)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_that_hangs_fails_at_the_timeout_and_the_rest_still_report() {
        let r = Readiness::new();
        r.set_ready(true);
        r.add_check(Arc::new(Fixed(
            "slow",
            Ok("late".into()),
            Duration::from_mins(1),
        )));
        r.add_check(fixed("quick", Ok("fine".into())));
        let report = r.report(Duration::from_secs(2)).await;
        assert!(!report.ready);
        assert!(!report.checks[1].ok);
        assert!(report.checks[1].detail.contains("2000 ms"), "{report:?}");
        assert!(report.checks[2].ok);
    }

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
