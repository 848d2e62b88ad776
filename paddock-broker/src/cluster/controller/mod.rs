//! The `HarnessRun` controller (`paddock-broker controller`): for each run it registers the run
//! with the broker, issues its placeholders into a Secret, creates its agent pod (run label,
//! placeholders as environment variables, trust bundle mounted), reflects the run in its
//! status and as Events, and on completion or deletion (a finalizer) revokes its leases and
//! deletes the Secret. See [`reconcile`] for the steps and [`lease`] for the leader election
//! that keeps two replicas from acting at once.

pub mod admin;
pub mod broker_api;
pub mod config;
pub mod lease;
pub mod reconcile;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt as _,
    runtime::{Controller, controller::Action, watcher},
};

use crate::cluster::crd::HarnessRun;
pub use reconcile::{Context, ReconcileError, Settings};

/// Per-run failure counts, for exponential backoff.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

/// The first retry after a failure; doubled per failure up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_mins(5);

impl Backoff {
    /// The delay before the next attempt at `key` after one more failure.
    pub fn failed(&self, key: &str) -> Duration {
        let mut f = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = f.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        let exp = (*n - 1).min(16);
        MIN_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF)
    }

    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }
}

struct State {
    ctx: Arc<Context>,
    backoff: Backoff,
}

fn key(run: &HarnessRun) -> String {
    format!("{}/{}", run.namespace().unwrap_or_default(), run.name_any())
}

/// Runs the controller over every namespace until `stop` completes. Only call it while
/// leading (see [`lease::lead`]).
pub async fn run(ctx: Arc<Context>, stop: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let label = watcher::Config::default().labels(&ctx.settings.run_label);
    let state = Arc::new(State {
        ctx,
        backoff: Backoff::default(),
    });
    // Pods are watched (their phase drives the run's); Secrets are not: the controller may
    // not list Secrets (deploy/controller/10-rbac.yaml), and a deleted Secret is noticed at
    // the next resync.
    Controller::new(
        Api::<HarnessRun>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Pod>::all(client), label)
    .graceful_shutdown_on(stop)
    .run(
        |run, state: Arc<State>| async move {
            let k = key(&run);
            let out = reconcile::reconcile(run, Arc::clone(&state.ctx)).await;
            if out.is_ok() {
                state.backoff.succeeded(&k);
            }
            out
        },
        |run, error, state: Arc<State>| {
            let delay = state.backoff.failed(&key(&run));
            tracing::warn!(run = %key(&run), error = %error, retry_in = ?delay, "reconcile failed");
            Action::requeue(delay)
        },
        state,
    )
    .for_each(|result| async move {
        if let Err(e) = result {
            tracing::debug!(error = %e, "controller");
        }
    })
    .await;
}
