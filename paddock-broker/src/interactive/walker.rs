//! The renewal walker: renews a run's leases that are close to expiry.
//!
//! It runs on each prompt and on a timer. A failed renewal keeps the lease as it is (it may
//! still serve until it expires) and is audited by the renewer; at most one walk per run runs
//! at a time, so two triggers never renew the same lease twice upstream.

use std::{
    collections::HashSet,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use crate::wire::{LeaseInfo, RunInfo};

/// What the walker needs of the broker (a trait so the walker is tested alone).
pub trait LeaseRenewer {
    /// The run's live leases expiring within `window` from now.
    fn due_leases(&self, run: &RunInfo, window: Duration) -> Result<Vec<LeaseInfo>, String>;
    /// Renews one lease; on failure the lease must be left as it was and the failure
    /// audited. Returns the new expiry.
    fn renew_lease(&self, run: &RunInfo, lease: &LeaseInfo) -> Result<u64, String>;
}

/// What one walk did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WalkOutcome {
    /// Another walk of the same run was in progress; this one did nothing.
    pub skipped: bool,
    pub renewed: Vec<String>,
    pub failed: Vec<(String, String)>,
}

/// Walks runs' leases, at most one walk per run at a time.
#[derive(Debug, Default)]
pub struct RenewalWalker {
    walking: Mutex<HashSet<(String, String)>>,
}

/// Removes the run from the walking set when the walk ends, even by panic.
struct Walking<'a> {
    set: &'a Mutex<HashSet<(String, String)>>,
    key: (String, String),
}

impl Drop for Walking<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

impl RenewalWalker {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Renews `run`'s leases due within `window`. Blocking (store and provider calls): run it
    /// on the blocking pool.
    pub fn walk(&self, renewer: &dyn LeaseRenewer, run: &RunInfo, window: Duration) -> WalkOutcome {
        let key = (run.namespace.clone(), run.run.clone());
        if !self
            .walking
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone())
        {
            return WalkOutcome {
                skipped: true,
                ..WalkOutcome::default()
            };
        }
        let _walking = Walking {
            set: &self.walking,
            key,
        };
        let mut outcome = WalkOutcome::default();
        let due = match renewer.due_leases(run, window) {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(run = %run.run, error = %e, "listing leases to renew failed");
                return outcome;
            }
        };
        for lease in due {
            match renewer.renew_lease(run, &lease) {
                Ok(_) => outcome.renewed.push(lease.lease_id),
                Err(e) => {
                    tracing::info!(run = %run.run, lease = %lease.lease_id, error = %e, "renewal failed; lease kept");
                    outcome.failed.push((lease.lease_id, e));
                }
            }
        }
        outcome
    }
}
