//! Readiness: what `/readyz` reports, one check per dependency.
//!
//! The listeners flag ([`Readiness::set_ready`]) is always the first check; the process adds
//! one [`ReadyCheck`] per dependency it has (the broker, the eBPF pins, the audit sink, the
//! forging CA). A probe runs every check at once, each bounded by a timeout, and is ready only
//! when every check passes; the JSON body lists each with what it found, so an operator sees
//! which dependency failed without reading logs. `/healthz` stays a liveness check and runs
//! none of this.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;

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
}
