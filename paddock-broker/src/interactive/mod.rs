//! Interactive runs: people drive a running agent through the broker.
//!
//! The agent's side is an *adapter*: a small HTTP/1.1 server on the loopback of the run's
//! sandbox (a pod, or the command of `paddock-proxy run`). The broker speaks to it with
//!
//! - `POST /prompts` body `{"text", "seq", "submitter"}` (the broker repacks the caller's
//!   prompt and numbers it),
//! - `POST /interrupt` and `POST /end` (no body),
//! - `GET /output`: a streamed body of the agent's output, which the broker fans out to every
//!   client attached to the run's WebSocket stream.
//!
//! The adapter's address always comes from the run (an [`AdapterConnector`] installed by
//! whoever knows where the run lives), never from a caller. Per (namespace, run) the
//! [`InteractiveRouter`] keeps the attached-client count (never negative), a prompt lock
//! (concurrent prompts of one run are serialized), the turn sequence (persisted in the store
//! where the backend allows, so it keeps increasing across broker restarts) and the output
//! fan-out; all of it is forgotten when the run reaches a terminal phase.

mod adapter;
mod shell;
mod tunnel;
mod walker;

#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::sync::broadcast;

pub use self::{
    adapter::{
        AdapterConnector, AdapterError, AdapterFuture, AdapterIo, AdapterStream, TcpAdapters,
        adapter_post,
    },
    shell::{ShellError, ShellFuture, ShellOpener, ShellSession, TermSize},
    tunnel::{NodeTunnels, Open, Opened, TunnelError, TunnelRoute},
    walker::{LeaseRenewer, RenewalWalker, WalkOutcome},
};
use crate::{
    store::{StoreBackend, StoreError},
    wire::RunInfo,
};

/// Identifies one run's interactive state.
pub type RunKey = (String, String);

fn key(namespace: &str, run: &str) -> RunKey {
    (namespace.to_owned(), run.to_owned())
}

/// What attached clients receive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A chunk of the adapter's output, as the adapter sent it.
    Data(Bytes),
    /// The adapter's output stream ended; the reason is for the clients.
    End(String),
}

/// Messages queued per attached client before a slow one is dropped.
const FANOUT_CAPACITY: usize = 256;

/// Knobs of interactive runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InteractiveConfig {
    /// Leases expiring within this window are renewed on each prompt and each walk tick.
    pub renew_window: Duration,
    /// How often the timer walks the leases of interactive runs (and checks idleness).
    pub walk_interval: Duration,
    /// End a run with no attached client and no prompt for this long (`None`: never).
    pub idle_timeout: Option<Duration>,
}

impl Default for InteractiveConfig {
    fn default() -> Self {
        Self {
            renew_window: Duration::from_mins(5),
            walk_interval: Duration::from_mins(1),
            idle_timeout: None,
        }
    }
}

/// One run's interactive state.
#[derive(Debug)]
struct RunState {
    attached: Mutex<u32>,
    /// Held for the whole of a prompt: numbering, renewal and delivery, so one run's prompts
    /// reach its adapter one at a time and in sequence order.
    prompt: Arc<tokio::sync::Mutex<()>>,
    /// The sequence when the store keeps none (the last number handed out).
    seq: Mutex<u64>,
    output: broadcast::Sender<Output>,
    /// Serializes starting the output pump, so concurrent attaches share one.
    pump_start: tokio::sync::Mutex<()>,
    pump: Mutex<Option<tokio::task::JoinHandle<()>>>,
    last_activity: Mutex<Instant>,
    /// Shells open in the run (each one counts as activity while it lasts).
    shells: Mutex<u32>,
}

/// Shells open at once in one run, at most.
pub const MAX_SHELLS_PER_RUN: u32 = 8;

/// One open shell of a run: counted until dropped.
#[derive(Debug)]
pub struct ShellSlot {
    state: Arc<RunState>,
}

impl Drop for ShellSlot {
    fn drop(&mut self) {
        let mut n = lock(&self.state.shells);
        *n = n.saturating_sub(1);
        drop(n);
        self.state.touch();
    }
}

impl RunState {
    fn new() -> Self {
        Self {
            attached: Mutex::new(0),
            prompt: Arc::new(tokio::sync::Mutex::new(())),
            seq: Mutex::new(0),
            output: broadcast::channel(FANOUT_CAPACITY).0,
            pump_start: tokio::sync::Mutex::new(()),
            pump: Mutex::new(None),
            last_activity: Mutex::new(Instant::now()),
            shells: Mutex::new(0),
        }
    }

    fn touch(&self) {
        *lock(&self.last_activity) = Instant::now();
    }

    fn stop_pump(&self) {
        if let Some(pump) = lock(&self.pump).take() {
            pump.abort();
        }
    }
}

/// A poisoned lock only means another thread panicked while holding it; the counters it
/// guards stay meaningful, so carry on with them.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Per-(namespace, run) interactive state and the way to each run's adapter.
pub struct InteractiveRouter {
    runs: Mutex<HashMap<RunKey, Arc<RunState>>>,
    connector: RwLock<Option<Arc<dyn AdapterConnector>>>,
    shell: RwLock<Option<Arc<dyn ShellOpener>>>,
    tunnels: Arc<NodeTunnels>,
    config: RwLock<InteractiveConfig>,
    walker: RenewalWalker,
}

impl fmt::Debug for InteractiveRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InteractiveRouter")
            .field("runs", &lock(&self.runs).len())
            .field("connector", &self.connector().is_some())
            .field("shell", &self.shell_opener().is_some())
            .finish_non_exhaustive()
    }
}

impl Default for InteractiveRouter {
    fn default() -> Self {
        Self::new(InteractiveConfig::default())
    }
}

impl InteractiveRouter {
    #[must_use]
    pub fn new(config: InteractiveConfig) -> Self {
        Self {
            runs: Mutex::new(HashMap::new()),
            connector: RwLock::new(None),
            shell: RwLock::new(None),
            tunnels: Arc::default(),
            config: RwLock::new(config),
            walker: RenewalWalker::new(),
        }
    }

    /// Installs how adapters are reached (run mode: the command's loopback; tests: TCP).
    pub fn set_connector(&self, connector: Arc<dyn AdapterConnector>) {
        *self
            .connector
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(connector);
    }

    #[must_use]
    pub fn connector(&self) -> Option<Arc<dyn AdapterConnector>> {
        self.connector
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Installs how shells are opened in runs' sandboxes (run mode: next to the command;
    /// node mode: through the pod's node agent).
    pub fn set_shell_opener(&self, opener: Arc<dyn ShellOpener>) {
        *self
            .shell
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(opener);
    }

    #[must_use]
    pub fn shell_opener(&self) -> Option<Arc<dyn ShellOpener>> {
        self.shell
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The node agents' tunnels connected to this broker.
    #[must_use]
    pub fn tunnels(&self) -> &Arc<NodeTunnels> {
        &self.tunnels
    }

    pub fn set_config(&self, config: InteractiveConfig) {
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
    }

    #[must_use]
    pub fn config(&self) -> InteractiveConfig {
        *self
            .config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The renewal walker (at most one walk per run at a time).
    #[must_use]
    pub fn walker(&self) -> &RenewalWalker {
        &self.walker
    }

    fn state(&self, namespace: &str, run: &str) -> Arc<RunState> {
        lock(&self.runs)
            .entry(key(namespace, run))
            .or_insert_with(|| Arc::new(RunState::new()))
            .clone()
    }

    fn existing(&self, namespace: &str, run: &str) -> Option<Arc<RunState>> {
        lock(&self.runs).get(&key(namespace, run)).cloned()
    }

    /// Runs with interactive state, for the timer.
    #[must_use]
    pub fn known_runs(&self) -> Vec<RunKey> {
        lock(&self.runs).keys().cloned().collect()
    }

    /// Counts one more attached client; returns the new count.
    pub fn on_attach(&self, namespace: &str, run: &str) -> u32 {
        let state = self.state(namespace, run);
        state.touch();
        let mut n = lock(&state.attached);
        *n = n.saturating_add(1);
        *n
    }

    /// Counts one client less, never below zero (an unpaired detach, such as a cleanup on a
    /// path where the attach never happened, must not make the run look attached-less by
    /// more than it is). The last detach stops the output pump. Returns the new count.
    pub fn on_detach(&self, namespace: &str, run: &str) -> u32 {
        let Some(state) = self.existing(namespace, run) else {
            return 0;
        };
        state.touch();
        let mut n = lock(&state.attached);
        *n = n.saturating_sub(1);
        if *n == 0 {
            state.stop_pump();
        }
        *n
    }

    #[must_use]
    pub fn attached_count(&self, namespace: &str, run: &str) -> u32 {
        self.existing(namespace, run)
            .map_or(0, |s| *lock(&s.attached))
    }

    /// Drops everything known about a run (terminal transitions): attached clients get an
    /// end message and their streams close.
    pub fn forget(&self, namespace: &str, run: &str) {
        let removed = lock(&self.runs).remove(&key(namespace, run));
        if let Some(state) = removed {
            state.stop_pump();
            let _ = state.output.send(Output::End("the run ended".into()));
        }
    }

    /// The lock that serializes one run's prompts; hold it from numbering to delivery.
    #[must_use]
    pub fn prompt_lock(&self, namespace: &str, run: &str) -> Arc<tokio::sync::Mutex<()>> {
        let state = self.state(namespace, run);
        state.touch();
        state.prompt.clone()
    }

    /// The next turn number of a run, starting at 1 and strictly increasing. Persisted by
    /// the store when it can (so a restarted broker continues where it stopped); otherwise
    /// kept in memory. Blocks on the store: call it on the blocking pool.
    pub fn next_seq(
        &self,
        store: &dyn StoreBackend,
        namespace: &str,
        run: &str,
    ) -> Result<u64, StoreError> {
        let state = self.state(namespace, run);
        let mut mem = lock(&state.seq);
        let next = match store.next_turn_seq(namespace, run)? {
            Some(n) => n,
            None => mem.saturating_add(1),
        };
        *mem = next;
        Ok(next)
    }

    /// Subscribes to a run's output, starting the single pump from the adapter's `GET
    /// /output` if none runs. Fails (and subscribes nothing) when the adapter cannot be
    /// reached, so an attach to a run whose adapter is gone gets a clear error.
    pub async fn subscribe_output(
        &self,
        run: &RunInfo,
        timeout: Duration,
    ) -> Result<broadcast::Receiver<Output>, AdapterError> {
        let state = self.state(&run.namespace, &run.run);
        let _starting = state.pump_start.lock().await;
        let running = lock(&state.pump).as_ref().is_some_and(|p| !p.is_finished());
        let receiver = state.output.subscribe();
        if running {
            return Ok(receiver);
        }
        let connector = self
            .connector()
            .ok_or_else(|| AdapterError::NotConfigured(run.run.clone()))?;
        let body = tokio::time::timeout(timeout, adapter::open_output(&*connector, run))
            .await
            .map_err(|_| AdapterError::Timeout)??;
        let sender = state.output.clone();
        let pump = tokio::spawn(adapter::pump(body, sender));
        *lock(&state.pump) = Some(pump);
        Ok(receiver)
    }

    /// A place for one more shell in the run; `None` when [`MAX_SHELLS_PER_RUN`] are open.
    #[must_use]
    pub fn shell_slot(&self, namespace: &str, run: &str) -> Option<ShellSlot> {
        let state = self.state(namespace, run);
        state.touch();
        let mut n = lock(&state.shells);
        if *n >= MAX_SHELLS_PER_RUN {
            return None;
        }
        *n += 1;
        drop(n);
        Some(ShellSlot { state })
    }

    /// Runs with no attached client and no open shell, and for how long nothing happened in
    /// each (the idle watchdog compares it with the run's timeout).
    #[must_use]
    pub fn quiet_runs(&self, now: Instant) -> Vec<(RunKey, Duration)> {
        lock(&self.runs)
            .iter()
            .filter(|(_, s)| *lock(&s.attached) == 0 && *lock(&s.shells) == 0)
            .map(|(k, s)| {
                (
                    k.clone(),
                    now.saturating_duration_since(*lock(&s.last_activity)),
                )
            })
            .collect()
    }

    /// Runs idle for longer than the configured timeout: no attached client and no prompt.
    #[must_use]
    pub fn idle_runs(&self, now: Instant) -> Vec<RunKey> {
        let Some(limit) = self.config().idle_timeout else {
            return Vec::new();
        };
        lock(&self.runs)
            .iter()
            .filter(|(_, s)| {
                *lock(&s.attached) == 0
                    && now.saturating_duration_since(*lock(&s.last_activity)) >= limit
            })
            .map(|(k, _)| k.clone())
            .collect()
    }
}
