//! Reusable substitution answers ("grants") and the invalidation stream that takes them back.
//!
//! A proxy subscribes with `POST /v1/grants/poll` and keeps one long poll open. A
//! `substitute-auth` call naming its subscription comes back with [`GrantTerms`](crate::wire::GrantTerms): the proxy
//! may apply the same answer to `uses` requests of the same shape within `ttl_ms`. Revoking a
//! lease, ending a run or changing the policy publishes an invalidation, and the call that
//! did so returns only once every proxy that holds grants of that run has acknowledged it (by
//! polling again with `acked` at or past it, after it dropped the grants and let the requests
//! that used them reach their upstream) or has been cut off and its liveness lease has run
//! out, so it can no longer use any grant.
//!
//! # The guarantee, and why it holds
//!
//! Once `revoke` (or a run's end, or a policy reload) returns, no request is handed to an
//! upstream with a grant covered by it by a proxy that holds a subscription:
//!
//! * Sequence numbers order checks and invalidations. A substitution marks its run in the
//!   subscription and reads the sequence number *before* it reads the run, the lease or the
//!   policy; an invalidation is published (sequence number incremented) *after* the change
//!   is stored. So an answer that saw the old state carries a number below the
//!   invalidation's, and the subscription it went to is among those the invalidation waits
//!   for.
//! * The proxy drops an answer whose number is below that of an invalidation it has already
//!   applied to the answer's lease or run (it keeps those "tombstones" for a while and
//!   refuses answers older than what it kept). An answer that arrives before the
//!   invalidation is registered first, and the acknowledgement waits for it.
//! * Liveness is a lease anchored at the proxy: it uses grants only until `lease` after it
//!   *sent* its last successful poll. The broker renews on *receiving* a poll, which is
//!   later, so after cutting a subscription off it waits `lease` (plus a margin for clock
//!   rate) past the last poll it received.
//!
//! A proxy without a subscription (the stream is down) gets no grants and asks per request,
//! as before grants existed.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::wire::{GrantEvent, GrantPollResponse, InvalidationScope};

/// Tuning of grants and the invalidation stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantConfig {
    /// How long a poll is held open without events.
    pub hold: Duration,
    /// How long after sending a poll a proxy may keep using grants.
    pub lease: Duration,
    /// How long an invalidation waits for acknowledgements before it cuts the laggards off.
    pub ack_timeout: Duration,
    /// Longest life of one grant (bounds how late a rotated secret file is picked up).
    pub ttl: Duration,
    /// Most uses one grant covers.
    pub max_uses: u32,
    /// Most subscriptions at once (node agents and proxies; each costs a few hundred bytes).
    pub max_subscriptions: usize,
}

impl Default for GrantConfig {
    fn default() -> Self {
        Self {
            hold: Duration::from_millis(500),
            lease: Duration::from_secs(2),
            ack_timeout: Duration::from_secs(1),
            ttl: Duration::from_secs(10),
            max_uses: 1024,
            max_subscriptions: 4096,
        }
    }
}

/// Events kept for subscriptions that have not acknowledged them; one that falls further
/// behind is cut off.
const MAX_EVENTS: usize = 4096;
/// Runs one subscription may hold grants of before it is cut off (and starts afresh).
const MAX_RUNS_PER_SUBSCRIPTION: usize = 65_536;

/// Why a subscription call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// Unknown, someone else's, cut off or no longer live: subscribe again.
    #[error("invalidation-stream subscription is unknown or no longer live")]
    Gone,
    #[error("acknowledged sequence number {acked} is ahead of the broker's {seq}")]
    AheadOfBroker { acked: u64, seq: u64 },
    #[error("too many invalidation-stream subscriptions")]
    Full,
}

#[derive(Debug)]
struct Subscription {
    owner: String,
    acked: u64,
    last_seen: Instant,
    runs: HashSet<String>,
}

impl Subscription {
    fn live(&self, now: Instant, lease: Duration) -> bool {
        now.duration_since(self.last_seen) < lease
    }

    /// Whether an invalidation of `scope` must wait for this subscription: a revoked lease
    /// only for those holding grants of its run; a run's end or a policy change for every
    /// one, because proxies also key their egress re-checks on those
    /// (`EgressPolicy::generation`), grants or not.
    fn must_ack(&self, scope: &InvalidationScope) -> bool {
        match scope {
            InvalidationScope::Lease { run, .. } => self.runs.contains(run),
            InvalidationScope::Run { .. } | InvalidationScope::All => true,
        }
    }
}

#[derive(Debug, Default)]
struct HubState {
    seq: u64,
    events: VecDeque<GrantEvent>,
    subs: HashMap<String, Subscription>,
}

/// What one invalidation came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Invalidated {
    pub seq: u64,
    /// Subscriptions that held grants of the scope and acknowledged in time.
    pub acknowledged: usize,
    /// Subscriptions cut off (the call waited out their liveness lease).
    pub cut_off: usize,
}

/// A poll that found nothing new yet.
#[derive(Debug)]
pub enum PollStep {
    Ready(GrantPollResponse),
    /// Wait for [`GrantHub::changes`] up to the hold time, then [`GrantHub::collect`].
    Wait,
}

/// The broker's side of grants: subscriptions, sequence numbers and acknowledgements.
#[derive(Debug)]
pub struct GrantHub {
    config: GrantConfig,
    state: Mutex<HubState>,
    acked: Condvar,
    changes: tokio::sync::watch::Sender<u64>,
    /// Subscriptions cut off so far (for metrics).
    cut_offs: std::sync::atomic::AtomicU64,
}

impl Default for GrantHub {
    fn default() -> Self {
        Self::new(GrantConfig::default())
    }
}

impl GrantHub {
    #[must_use]
    pub fn new(config: GrantConfig) -> Self {
        Self {
            config,
            state: Mutex::new(HubState::default()),
            acked: Condvar::new(),
            changes: tokio::sync::watch::channel(0).0,
            cut_offs: std::sync::atomic::AtomicU64::new(0),
        }
    }

    #[must_use]
    pub fn config(&self) -> &GrantConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Subscriptions cut off since start (for metrics).
    #[must_use]
    pub fn cut_offs(&self) -> u64 {
        self.cut_offs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Subscriptions at the moment (for metrics and tests).
    #[must_use]
    pub fn subscriptions(&self) -> usize {
        self.lock().subs.len()
    }

    /// Fires whenever an event is published.
    #[must_use]
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX)
    }

    /// A new subscription for `owner` (the caller's subject), starting at the current
    /// sequence number.
    pub fn subscribe(&self, owner: &str) -> Result<GrantPollResponse, GrantError> {
        let now = Instant::now();
        let mut state = self.lock();
        let lease = self.config.lease;
        state.subs.retain(|_, s| s.live(now, lease));
        if state.subs.len() >= self.config.max_subscriptions {
            return Err(GrantError::Full);
        }
        let mut bytes = [0_u8; 16];
        rand::fill(&mut bytes[..]);
        let id = format!("sub-{}", hex::encode(bytes));
        let seq = state.seq;
        state.subs.insert(
            id.clone(),
            Subscription {
                owner: owner.to_owned(),
                acked: seq,
                last_seen: now,
                runs: HashSet::new(),
            },
        );
        Ok(GrantPollResponse {
            subscription: id,
            seq,
            events: Vec::new(),
            lease_ms: self.lease_ms(),
        })
    }

    /// Records `acked` and renews the subscription; answers at once when there are newer
    /// events.
    pub fn poll(&self, owner: &str, id: &str, acked: u64) -> Result<PollStep, GrantError> {
        let now = Instant::now();
        let mut state = self.lock();
        let seq = state.seq;
        if acked > seq {
            return Err(GrantError::AheadOfBroker { acked, seq });
        }
        let lease = self.config.lease;
        let sub = state
            .subs
            .get_mut(id)
            .filter(|s| s.owner == owner && s.live(now, lease))
            .ok_or(GrantError::Gone)?;
        sub.acked = sub.acked.max(acked);
        sub.last_seen = now;
        let pending = sub.acked < seq;
        drop(state);
        self.acked.notify_all();
        if pending {
            self.collect(owner, id).map(PollStep::Ready)
        } else {
            Ok(PollStep::Wait)
        }
    }

    /// The events a subscription has not acknowledged (possibly none).
    pub fn collect(&self, owner: &str, id: &str) -> Result<GrantPollResponse, GrantError> {
        let state = self.lock();
        let sub = state
            .subs
            .get(id)
            .filter(|s| s.owner == owner)
            .ok_or(GrantError::Gone)?;
        let events = state
            .events
            .iter()
            .filter(|e| e.seq > sub.acked)
            .cloned()
            .collect();
        Ok(GrantPollResponse {
            subscription: id.to_owned(),
            seq: state.seq,
            events,
            lease_ms: self.lease_ms(),
        })
    }

    /// Before a substitution reads anything: notes that subscription `id` may get a grant of
    /// `run` and returns the sequence number the answer will carry.
    pub fn begin(&self, owner: &str, id: &str, run: &str) -> Result<u64, GrantError> {
        let now = Instant::now();
        let mut state = self.lock();
        let lease = self.config.lease;
        let seq = state.seq;
        let sub = state
            .subs
            .get_mut(id)
            .filter(|s| s.owner == owner && s.live(now, lease))
            .ok_or(GrantError::Gone)?;
        if !sub.runs.contains(run) {
            if sub.runs.len() >= MAX_RUNS_PER_SUBSCRIPTION {
                state.subs.remove(id);
                return Err(GrantError::Gone);
            }
            sub.runs.insert(run.to_owned());
        }
        Ok(seq)
    }

    /// Publishes an invalidation (after the change it stands for is stored) and waits until
    /// every live subscription it concerns (a lease: those holding grants of its run; a run
    /// or the policy: all) acknowledged it, or was cut off and its liveness lease ran out.
    /// Blocks: call it off the async runtime.
    pub fn invalidate(&self, scope: &InvalidationScope) -> Invalidated {
        let (seq, waiting) = self.publish(scope);
        let deadline = Instant::now() + self.config.ack_timeout;
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            let pending: Vec<String> = waiting
                .iter()
                .filter(|id| state.subs.get(*id).is_some_and(|s| s.acked < seq))
                .cloned()
                .collect();
            if pending.is_empty() {
                return Invalidated {
                    seq,
                    acknowledged: waiting.len(),
                    cut_off: 0,
                };
            }
            if now >= deadline {
                let last_seen = pending
                    .iter()
                    .filter_map(|id| state.subs.remove(id))
                    .map(|s| s.last_seen)
                    .max();
                drop(state);
                let cut_off = pending.len();
                self.cut_offs
                    .fetch_add(cut_off as u64, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    seq,
                    cut_off,
                    "invalidation not acknowledged in time; subscriptions cut off, waiting out \
                     their liveness lease"
                );
                if let Some(last_seen) = last_seen {
                    // Lease plus 10% and 50 ms for clock rate differences between hosts.
                    let safe = last_seen
                        + self.config.lease
                        + self.config.lease / 10
                        + Duration::from_millis(50);
                    std::thread::sleep(safe.saturating_duration_since(Instant::now()));
                }
                return Invalidated {
                    seq,
                    acknowledged: waiting.len() - cut_off,
                    cut_off,
                };
            }
            state = self
                .acked
                .wait_timeout(state, deadline - now)
                .map_or_else(|e| e.into_inner().0, |(s, _)| s);
        }
    }

    /// Appends the event and returns its number and the subscriptions to wait for.
    fn publish(&self, scope: &InvalidationScope) -> (u64, Vec<String>) {
        let now = Instant::now();
        let lease = self.config.lease;
        let mut state = self.lock();
        state.seq += 1;
        let seq = state.seq;
        state.events.push_back(GrantEvent {
            seq,
            scope: scope.clone(),
        });
        // A subscription past its lease can use no grant: nothing to wait for.
        state.subs.retain(|_, s| s.live(now, lease));
        let oldest_needed = state.subs.values().map(|s| s.acked).min().unwrap_or(seq);
        while state.events.front().is_some_and(|e| e.seq <= oldest_needed) {
            state.events.pop_front();
        }
        if state.events.len() > MAX_EVENTS {
            let keep_from = seq - MAX_EVENTS as u64;
            while state.events.front().is_some_and(|e| e.seq <= keep_from) {
                state.events.pop_front();
            }
            // Laggards could miss events they hold grants for: they start afresh.
            state.subs.retain(|_, s| s.acked >= keep_from);
        }
        let waiting = state
            .subs
            .iter()
            .filter(|(_, s)| s.must_ack(scope))
            .map(|(id, _)| id.clone())
            .collect();
        if let InvalidationScope::Run { run } = scope {
            // The run ended; its grants are gone once this is acknowledged.
            for s in state.subs.values_mut() {
                s.runs.remove(run);
            }
        }
        drop(state);
        self.changes.send_replace(seq);
        (seq, waiting)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn hub(ack_ms: u64, lease_ms: u64) -> Arc<GrantHub> {
        Arc::new(GrantHub::new(GrantConfig {
            ack_timeout: Duration::from_millis(ack_ms),
            lease: Duration::from_millis(lease_ms),
            ..GrantConfig::default()
        }))
    }

    fn lease_scope(lease: &str, run: &str) -> InvalidationScope {
        InvalidationScope::Lease {
            lease_id: lease.into(),
            run: run.into(),
        }
    }

    #[test]
    fn an_invalidation_waits_for_the_subscriptions_holding_the_run() {
        let hub = hub(5_000, 60_000);
        let a = hub.subscribe("proxy-a").expect("sub").subscription;
        let b = hub.subscribe("proxy-b").expect("sub").subscription;
        let seq = hub.begin("proxy-a", &a, "run-1").expect("begin");
        assert_eq!(seq, 0);
        // b holds nothing of run-1: only a is waited for.
        hub.begin("proxy-b", &b, "run-2").expect("begin");
        let acker = {
            let hub = hub.clone();
            let a = a.clone();
            std::thread::spawn(move || {
                loop {
                    let PollStep::Ready(r) = hub.poll("proxy-a", &a, 0).expect("poll") else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    assert_eq!(r.events.len(), 1);
                    std::thread::sleep(Duration::from_millis(50));
                    // Taken before acknowledging: the invalidation may return the moment
                    // the poll records it, before this thread runs again.
                    let acking = Instant::now();
                    hub.poll("proxy-a", &a, r.events[0].seq).expect("ack");
                    return acking;
                }
            })
        };
        let out = hub.invalidate(&lease_scope("lse-1", "run-1"));
        let returned = Instant::now();
        let acked_at = acker.join().expect("acker");
        assert!(returned >= acked_at, "returned before the acknowledgement");
        assert_eq!(
            out,
            Invalidated {
                seq: 1,
                acknowledged: 1,
                cut_off: 0
            }
        );
        // The next substitution's answer carries the new number.
        assert_eq!(hub.begin("proxy-a", &a, "run-1"), Ok(1));
    }

    #[test]
    fn a_silent_subscription_is_cut_off_and_its_lease_waited_out() {
        let hub = hub(100, 400);
        let a = hub.subscribe("proxy-a").expect("sub").subscription;
        hub.begin("proxy-a", &a, "run-1").expect("begin");
        let last_poll = Instant::now();
        hub.poll("proxy-a", &a, 0).expect("renew");
        let out = hub.invalidate(&InvalidationScope::All);
        assert_eq!(out.cut_off, 1);
        assert_eq!(hub.cut_offs(), 1, "counted for the metrics");
        assert!(
            last_poll.elapsed() >= Duration::from_millis(400),
            "returned {:?} after the last poll, inside the lease",
            last_poll.elapsed()
        );
        assert_eq!(hub.poll("proxy-a", &a, 1).err(), Some(GrantError::Gone));
        assert_eq!(hub.begin("proxy-a", &a, "run-1"), Err(GrantError::Gone));
    }

    #[test]
    fn subscriptions_belong_to_their_owner_and_expire() {
        let hub = hub(100, 50);
        let a = hub.subscribe("proxy-a").expect("sub").subscription;
        assert_eq!(hub.poll("proxy-b", &a, 0).err(), Some(GrantError::Gone));
        assert_eq!(hub.begin("proxy-b", &a, "r"), Err(GrantError::Gone));
        assert_eq!(
            hub.poll("proxy-a", &a, 7).err(),
            Some(GrantError::AheadOfBroker { acked: 7, seq: 0 })
        );
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(hub.begin("proxy-a", &a, "r"), Err(GrantError::Gone));
        // Nobody holds anything: an invalidation returns at once.
        let started = Instant::now();
        assert_eq!(hub.invalidate(&InvalidationScope::All).cut_off, 0);
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn polls_return_unacknowledged_events_and_trim_what_all_have_seen() {
        let hub = hub(10, 60_000);
        let a = hub.subscribe("p").expect("sub").subscription;
        assert!(matches!(hub.poll("p", &a, 0), Ok(PollStep::Wait)));
        // Nobody holds run-x or run-y: published without waiting.
        hub.invalidate(&lease_scope("l0", "run-x"));
        hub.invalidate(&lease_scope("l", "run-y"));
        let PollStep::Ready(r) = hub.poll("p", &a, 0).expect("poll") else {
            panic!("events pending")
        };
        assert_eq!(r.seq, 2);
        assert_eq!(
            r.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
        let PollStep::Ready(r) = hub.poll("p", &a, 1).expect("poll") else {
            panic!("one left")
        };
        assert_eq!(r.events.len(), 1);
        assert!(matches!(hub.poll("p", &a, 2), Ok(PollStep::Wait)));
        hub.invalidate(&lease_scope("l2", "run-z"));
        assert_eq!(
            hub.lock().events.len(),
            1,
            "acknowledged events are trimmed"
        );
    }

    #[test]
    fn a_policy_change_or_a_run_end_waits_for_every_subscription() {
        let hub = hub(50, 300);
        let a = hub.subscribe("proxy-a").expect("sub").subscription;
        // a holds no grant, but keys its egress re-checks on these events.
        let out = hub.invalidate(&InvalidationScope::All);
        assert_eq!(out.cut_off, 1, "waited for a, which did not acknowledge");
        let b = hub.subscribe("proxy-b").expect("sub").subscription;
        let acker = {
            let hub = hub.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    if let Ok(PollStep::Ready(r)) = hub.poll("proxy-b", &b, 1) {
                        let seq = r.events.last().expect("event").seq;
                        hub.poll("proxy-b", &b, seq).expect("ack");
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let out = hub.invalidate(&InvalidationScope::Run { run: "r".into() });
        acker.join().expect("acker");
        assert_eq!((out.acknowledged, out.cut_off), (1, 0));
        assert_eq!(hub.poll("proxy-a", &a, 0).err(), Some(GrantError::Gone));
    }
}
