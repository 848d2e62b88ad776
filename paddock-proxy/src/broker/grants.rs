//! Reused substitution answers ("grants") and the invalidation stream that takes them back.
//!
//! The broker's side and the guarantee are described in `paddock_broker::grants` and in
//! ARCHITECTURE.md. Here: a [`GrantCache`] keeps answers the broker granted for reuse, keyed
//! by everything the broker's answer depends on ([`grant_key`]), and one task keeps a long
//! poll open to the broker (`POST /v1/grants/poll`). For every invalidation it drops the
//! covered grants, waits until the requests that used them have been answered by their
//! upstream, and only then acknowledges (polls again with `acked`).
//!
//! Fail closed: grants are used only while the subscription is live (within the broker's
//! lease of the last successful poll's *sending*); a poll that fails, a subscription the
//! broker no longer knows, or requests that do not drain in time drop every grant at once,
//! and substitutions go back to one broker call per request until a new subscription is up.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use paddock_wire::api::{
    GrantPollRequest, GrantPollResponse, GrantTerms, InvalidationScope, SubstituteAuthResponse,
};
use paddock_wire::{codec, placeholder};
use tokio::sync::Notify;

use super::BrokerClient;
use crate::http::{RequestContext, RequestHead};

/// How long applied invalidations are remembered to refuse answers computed before them.
/// Far longer than any broker call may take (5 s by default).
const TOMBSTONE_AGE: Duration = Duration::from_mins(1);
/// Most invalidations remembered; answers older than the oldest forgotten one are refused.
const MAX_TOMBSTONES: usize = 4096;
/// Most grants kept; at the limit the cache is emptied (a fresh broker call re-grants).
const MAX_GRANTS: usize = 65_536;
/// How long an invalidation waits for the requests that used its grants before this proxy
/// gives up its subscription (the broker then waits out the lease instead).
const DRAIN_TIMEOUT: Duration = Duration::from_millis(900);
/// Retry pacing of a failing stream.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Subscription {
    id: Arc<str>,
    /// Grants are usable until then: the lease from the last successful poll's sending.
    live_until: Instant,
    /// Answers numbered below this cannot be checked against invalidations: refused.
    floor: u64,
}

#[derive(Debug)]
struct Grant {
    answer: Arc<SubstituteAuthResponse>,
    run: Arc<str>,
    lease: Arc<str>,
    subscription: Arc<str>,
    expires: Instant,
    uses_left: u32,
}

#[derive(Debug, Default)]
struct State {
    subscription: Option<Subscription>,
    grants: HashMap<Box<[u8]>, Grant>,
    tombstones: VecDeque<(u64, InvalidationScope, Instant)>,
    /// Requests on their way upstream per (run, lease).
    flights: HashMap<(Arc<str>, Arc<str>), usize>,
}

impl State {
    fn covered(&self, scopes: &[InvalidationScope]) -> bool {
        self.flights
            .keys()
            .any(|(run, lease)| scopes.iter().any(|s| s.covers(run, lease)))
    }

    fn take_off(&mut self, shared: Weak<Shared>, run: &Arc<str>, lease: &Arc<str>) -> Flight {
        *self
            .flights
            .entry((Arc::clone(run), Arc::clone(lease)))
            .or_insert(0) += 1;
        Flight {
            shared,
            key: (Arc::clone(run), Arc::clone(lease)),
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    drained: Notify,
    /// Requests substituted from a kept grant, without a broker call.
    hits: std::sync::atomic::AtomicU64,
    /// Bumped by every policy or run invalidation and every change of subscription: egress
    /// answers taken under one number stay valid while it holds (see
    /// [`GrantCache::generation`]).
    generation: std::sync::atomic::AtomicU64,
    /// The stream task, stopped when the last handle goes.
    task: Mutex<Option<tokio::task::AbortHandle>>,
    /// Set to the number of grants kept whenever the state lock is released (unregistered
    /// unless the cache was started with a metrics gauge).
    held: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

impl Shared {
    fn lock(&self) -> StateGuard<'_> {
        StateGuard {
            state: self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            held: &self.held,
        }
    }
}

/// The locked state; releasing it publishes the number of grants kept, so every change to
/// them (use, insert, invalidation, reset) reaches the gauge without each site saying so.
struct StateGuard<'a> {
    state: MutexGuard<'a, State>,
    held: &'a prometheus_client::metrics::gauge::Gauge,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = State;

    fn deref(&self) -> &State {
        &self.state
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        self.held
            .set(i64::try_from(self.state.grants.len()).unwrap_or(i64::MAX));
    }
}

/// One request on its way upstream under a grant; dropping it lands it.
#[derive(Debug)]
pub struct Flight {
    shared: Weak<Shared>,
    key: (Arc<str>, Arc<str>),
}

impl Drop for Flight {
    fn drop(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut state = shared.lock();
        if let Some(n) = state.flights.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                state.flights.remove(&self.key);
                drop(state);
                shared.drained.notify_waiters();
            }
        }
    }
}

/// A granted answer to apply, and the flight to keep until the request is answered.
#[derive(Debug)]
pub struct Use {
    pub answer: Arc<SubstituteAuthResponse>,
    pub flight: Flight,
}

/// Why a granted answer may not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Stale {
    #[error("an invalidation applied since the broker answered covers it")]
    Invalidated,
    #[error("the subscription it was granted under is gone")]
    Subscription,
}

/// Reused substitution answers of one broker client (one subscription per process).
#[derive(Debug, Clone, Default)]
pub struct GrantCache {
    shared: Arc<Shared>,
}

impl GrantCache {
    /// A cache kept current by a stream task on the current runtime, polling through
    /// `client`. The task ends when the last clone of the cache is dropped.
    #[must_use]
    pub fn start(client: BrokerClient) -> Self {
        Self::start_with_gauge(client, prometheus_client::metrics::gauge::Gauge::default())
    }

    /// [`Self::start`], keeping `held` set to the number of grants kept
    /// (`paddock_proxy_grants_held`, [`crate::metrics::ProxyMetrics::grants_held`]).
    #[must_use]
    pub fn start_with_gauge(
        client: BrokerClient,
        held: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        let cache = Self::with_gauge(held);
        let weak = Arc::downgrade(&cache.shared);
        let task = tokio::spawn(stream(weak, client));
        if let Ok(mut slot) = cache.shared.task.lock() {
            *slot = Some(task.abort_handle());
        }
        cache
    }

    /// A cache without a stream task whose grant count goes to `held`.
    fn with_gauge(held: prometheus_client::metrics::gauge::Gauge) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::default(),
                drained: Notify::new(),
                hits: std::sync::atomic::AtomicU64::new(0),
                generation: std::sync::atomic::AtomicU64::new(0),
                task: Mutex::new(None),
                held,
            }),
        }
    }

    /// The subscription to name in a `substitute-auth` call, while one is live.
    #[must_use]
    pub fn subscription(&self) -> Option<Arc<str>> {
        let state = self.shared.lock();
        state
            .subscription
            .as_ref()
            .filter(|s| Instant::now() < s.live_until)
            .map(|s| Arc::clone(&s.id))
    }

    /// A grant for `key`, if one is live and has uses left.
    #[must_use]
    pub fn lookup(&self, key: &[u8]) -> Option<Use> {
        let now = Instant::now();
        let mut state = self.shared.lock();
        let live = state
            .subscription
            .as_ref()
            .filter(|s| now < s.live_until)
            .map(|s| Arc::clone(&s.id))?;
        let grant = state.grants.get_mut(key)?;
        if grant.subscription != live || now >= grant.expires || grant.uses_left == 0 {
            state.grants.remove(key);
            return None;
        }
        grant.uses_left -= 1;
        self.shared
            .hits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (answer, run, lease) = (
            Arc::clone(&grant.answer),
            Arc::clone(&grant.run),
            Arc::clone(&grant.lease),
        );
        let flight = state.take_off(Arc::downgrade(&self.shared), &run, &lease);
        Some(Use { answer, flight })
    }

    /// Takes in an answer the broker granted under `subscription` for a request of `run`
    /// sent at `sent`: refused when an invalidation already applied covers it; otherwise its
    /// flight starts, and with a `key` and uses left it is kept for the next requests.
    pub fn admit(
        &self,
        key: Option<Box<[u8]>>,
        run: &str,
        subscription: &Arc<str>,
        sent: Instant,
        answer: SubstituteAuthResponse,
        terms: GrantTerms,
    ) -> Result<Use, Stale> {
        let Some(lease) = answer.lease_id.as_deref().map(Arc::<str>::from) else {
            return Err(Stale::Invalidated);
        };
        let run = Arc::<str>::from(run);
        let mut state = self.shared.lock();
        let Some(sub) = state
            .subscription
            .as_ref()
            .filter(|s| s.id == *subscription)
        else {
            return Err(Stale::Subscription);
        };
        if terms.seq < sub.floor {
            return Err(Stale::Invalidated);
        }
        if state
            .tombstones
            .iter()
            .any(|(seq, scope, _)| *seq > terms.seq && scope.covers(&run, &lease))
        {
            return Err(Stale::Invalidated);
        }
        let answer = Arc::new(answer);
        if let Some(key) = key
            && terms.uses > 1
        {
            if state.grants.len() >= MAX_GRANTS {
                state.grants.clear();
            }
            state.grants.insert(
                key,
                Grant {
                    answer: Arc::clone(&answer),
                    run: Arc::clone(&run),
                    lease: Arc::clone(&lease),
                    subscription: Arc::clone(subscription),
                    expires: sent + Duration::from_millis(terms.ttl_ms),
                    uses_left: terms.uses - 1,
                },
            );
        }
        let flight = state.take_off(Arc::downgrade(&self.shared), &run, &lease);
        Ok(Use { answer, flight })
    }

    /// Drops every grant and the subscription (the stream broke or was refused).
    pub fn reset(&self, why: &str) {
        let mut state = self.shared.lock();
        if state.subscription.is_some() || !state.grants.is_empty() {
            tracing::warn!(
                reason = why,
                grants = state.grants.len(),
                "grant cache dropped; substituting per request until the stream is back"
            );
        }
        state.subscription = None;
        state.grants.clear();
        state.tombstones.clear();
        drop(state);
        self.bump_generation();
    }

    /// The number egress re-checks key their answers on ([`crate::policy::EgressPolicy::generation`]),
    /// while the subscription is live: it changes with every policy change or run end the
    /// broker publishes (applied before they are acknowledged, so before the broker reports
    /// them done) and with every new or lost subscription. `None` without a live one.
    #[must_use]
    pub fn generation(&self) -> Option<u64> {
        let state = self.shared.lock();
        state
            .subscription
            .as_ref()
            .filter(|s| Instant::now() < s.live_until)
            .map(|_| {
                self.shared
                    .generation
                    .load(std::sync::atomic::Ordering::SeqCst)
            })
    }

    fn bump_generation(&self) {
        self.shared
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Requests substituted from a kept grant so far.
    #[must_use]
    pub fn hits(&self) -> u64 {
        self.shared.hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Live grants (for tests and metrics).
    #[must_use]
    pub fn len(&self) -> usize {
        self.shared.lock().grants.len()
    }

    /// Whether no grant is kept.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A new subscription from the broker's answer to a subscribing poll sent at `sent`.
    fn subscribed(&self, answer: &GrantPollResponse, sent: Instant) {
        let mut state = self.shared.lock();
        state.grants.clear();
        state.tombstones.clear();
        state.subscription = Some(Subscription {
            id: Arc::from(answer.subscription.as_str()),
            live_until: sent + Duration::from_millis(answer.lease_ms),
            floor: answer.seq,
        });
        drop(state);
        self.bump_generation();
        tracing::info!("grant stream subscribed");
    }

    /// Applies a poll's events: remembers them, drops the grants they cover and renews the
    /// subscription. Returns the scopes whose requests in flight must land before the
    /// acknowledgement, or `None` when the answer is for another subscription.
    fn apply(&self, answer: &GrantPollResponse, sent: Instant) -> Option<Vec<InvalidationScope>> {
        let now = Instant::now();
        let mut state = self.shared.lock();
        let sub = state
            .subscription
            .as_mut()
            .filter(|s| *s.id == *answer.subscription)?;
        sub.live_until = sent + Duration::from_millis(answer.lease_ms);
        let mut scopes = Vec::new();
        if answer
            .events
            .iter()
            .any(|e| !matches!(e.scope, InvalidationScope::Lease { .. }))
        {
            // A policy change or a run's end: egress answers under the old number are stale.
            self.bump_generation();
        }
        for event in &answer.events {
            state
                .tombstones
                .push_back((event.seq, event.scope.clone(), now));
            state
                .grants
                .retain(|_, g| !event.scope.covers(&g.run, &g.lease));
            scopes.push(event.scope.clone());
        }
        while let Some((seq, _, at)) = state.tombstones.front() {
            if state.tombstones.len() <= MAX_TOMBSTONES && now.duration_since(*at) < TOMBSTONE_AGE {
                break;
            }
            let seq = *seq;
            state.tombstones.pop_front();
            if let Some(sub) = state.subscription.as_mut() {
                sub.floor = sub.floor.max(seq);
            }
        }
        Some(scopes)
    }

    /// Waits until no request under `scopes` is on its way upstream; false at the deadline.
    async fn drain(&self, scopes: &[InvalidationScope], deadline: Instant) -> bool {
        loop {
            let notified = self.shared.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.shared.lock().covered(scopes) {
                return true;
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return !self.shared.lock().covered(scopes);
            }
        }
    }
}

/// The stream task: subscribe, then poll (acknowledging) until the cache is gone.
async fn stream(cache: Weak<Shared>, client: BrokerClient) {
    let mut backoff = BACKOFF_MIN;
    let mut acked = 0_u64;
    loop {
        let Some(shared) = cache.upgrade() else {
            return;
        };
        let handle = GrantCache { shared };
        let subscription = handle
            .shared
            .lock()
            .subscription
            .as_ref()
            .map(|s| s.id.to_string());
        // No strong handle across the wait: dropping the last cache ends the task.
        drop(handle);
        let sent = Instant::now();
        let answer = client
            .poll_grants(&GrantPollRequest {
                subscription: subscription.clone(),
                acked,
            })
            .await;
        let Some(shared) = cache.upgrade() else {
            return;
        };
        let handle = GrantCache { shared };
        match answer {
            Ok(answer) if subscription.is_none() => {
                handle.subscribed(&answer, sent);
                acked = answer.seq;
                backoff = BACKOFF_MIN;
            }
            Ok(answer) => {
                let Some(scopes) = handle.apply(&answer, sent) else {
                    handle.reset("poll answered for another subscription");
                    continue;
                };
                backoff = BACKOFF_MIN;
                if scopes.is_empty() {
                    continue;
                }
                if handle.drain(&scopes, Instant::now() + DRAIN_TIMEOUT).await {
                    acked = answer.events.iter().map(|e| e.seq).max().unwrap_or(acked);
                } else {
                    // Not acknowledging: the broker cuts this subscription off and waits out
                    // its lease; grants are gone here already.
                    handle.reset("requests under an invalidated grant did not land in time");
                }
            }
            Err(e) => {
                handle.reset(&format!("grant stream: {e}"));
                drop(handle);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Everything the broker's answer to this request depends on, or `None` when the request
/// does not hold exactly one distinct well-formed placeholder (the broker is asked then).
///
/// The broker's answer is a function of the run, pod, destination, transport, the lease
/// behind the placeholder, the request's header names in order, which of them hold the
/// placeholder (and the Basic user name when it sits in Basic credentials), and the query
/// parameter names with which of them hold it. Values other than the placeholder do not
/// change it, so they are not part of the key.
#[must_use]
pub fn grant_key(
    head: &RequestHead<'_>,
    ctx: &RequestContext,
    pod: Option<&str>,
) -> Option<Box<[u8]>> {
    let mut key = Vec::with_capacity(256);
    let mut token: Option<Vec<u8>> = None;
    let mut note = |found: &[u8]| -> bool {
        if let Some(t) = &token {
            return t.as_slice() == found;
        }
        token = Some(found.to_vec());
        true
    };
    key.extend_from_slice(ctx.run.as_bytes());
    key.push(0);
    key.extend_from_slice(pod.unwrap_or_default().as_bytes());
    key.push(0);
    key.extend_from_slice(ctx.host.to_ascii_lowercase().as_bytes());
    key.push(0);
    key.extend_from_slice(&ctx.port.to_be_bytes());
    key.push(if ctx.upstream_tls() { b'T' } else { b'C' });
    for (name, value) in head.headers() {
        key.extend_from_slice(name.as_str().as_bytes());
        key.push(0);
        let value = value.as_bytes();
        if name == http::header::AUTHORIZATION
            && let Some((user, pass)) = codec::basic::decode(value)
        {
            let hits: Vec<&[u8]> = placeholder::find(user.as_bytes())
                .map(|r| &user.as_bytes()[r])
                .chain(placeholder::find(pass.as_bytes()).map(|r| &pass.as_bytes()[r]))
                .collect();
            if !hits.is_empty() {
                for hit in hits {
                    if !note(hit) {
                        return None;
                    }
                }
                key.push(b'B');
                key.extend_from_slice(user.as_bytes());
                key.push(0);
                continue;
            }
        }
        let mut hit = false;
        for r in placeholder::find(value) {
            if !note(&value[r]) {
                return None;
            }
            hit = true;
        }
        key.push(if hit { b'H' } else { b'-' });
    }
    key.push(b'?');
    if let Some(query) = head.query() {
        for (k, v) in codec::query::pairs(query) {
            let (k, v) = (codec::query::decode(k), codec::query::decode(v));
            key.extend_from_slice(k.as_bytes());
            key.push(0);
            let mut hit = false;
            for r in placeholder::find(v.as_bytes()) {
                if !note(&v.as_bytes()[r]) {
                    return None;
                }
                hit = true;
            }
            key.push(if hit { b'Q' } else { b'-' });
        }
    }
    let token = token?;
    key.push(0);
    key.extend_from_slice(&token);
    Some(key.into_boxed_slice())
}

/// The placeholder a [`grant_key`] names (its last field; placeholders hold no NUL).
#[must_use]
pub fn key_placeholder(key: &[u8]) -> Option<String> {
    let start = key.iter().rposition(|b| *b == 0)? + 1;
    std::str::from_utf8(&key[start..]).ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use paddock_wire::api::GrantEvent;

    use super::*;

    fn answer(lease: &str) -> SubstituteAuthResponse {
        SubstituteAuthResponse {
            matched: true,
            lease_id: Some(lease.into()),
            credential: Some("gh".into()),
            ..SubstituteAuthResponse::default()
        }
    }

    fn terms(seq: u64, uses: u32) -> GrantTerms {
        GrantTerms {
            seq,
            uses,
            ttl_ms: 60_000,
        }
    }

    fn subscribed(cache: &GrantCache, seq: u64) -> Arc<str> {
        cache.subscribed(
            &GrantPollResponse {
                subscription: "sub-1".into(),
                seq,
                events: Vec::new(),
                lease_ms: 60_000,
            },
            Instant::now(),
        );
        cache.subscription().expect("live")
    }

    fn events(seqs: &[(u64, InvalidationScope)]) -> GrantPollResponse {
        GrantPollResponse {
            subscription: "sub-1".into(),
            seq: seqs.last().map_or(0, |e| e.0),
            events: seqs
                .iter()
                .map(|(seq, scope)| GrantEvent {
                    seq: *seq,
                    scope: scope.clone(),
                })
                .collect(),
            lease_ms: 60_000,
        }
    }

    fn lease(l: &str) -> InvalidationScope {
        InvalidationScope::Lease {
            lease_id: l.into(),
            run: "run-1".into(),
        }
    }

    #[test]
    fn answers_older_than_an_applied_invalidation_are_refused() {
        let cache = GrantCache::default();
        let sub = subscribed(&cache, 3);
        let now = Instant::now();
        let key = || Some(Box::<[u8]>::from(&b"k"[..]));
        assert!(
            matches!(
                cache.admit(key(), "run-1", &sub, now, answer("l1"), terms(2, 5)),
                Err(Stale::Invalidated)
            ),
            "older than the subscription: unknowable"
        );
        cache
            .apply(&events(&[(4, lease("l1"))]), now)
            .expect("ours");
        assert!(
            matches!(
                cache.admit(key(), "run-1", &sub, now, answer("l1"), terms(3, 5)),
                Err(Stale::Invalidated)
            ),
            "computed before the revoke it missed"
        );
        assert!(
            cache
                .admit(key(), "run-1", &sub, now, answer("l2"), terms(3, 5))
                .is_ok(),
            "another lease is unaffected"
        );
        assert!(
            cache
                .admit(key(), "run-1", &sub, now, answer("l1"), terms(4, 5))
                .is_ok(),
            "computed after it"
        );
        cache.apply(
            &events(&[(
                5,
                InvalidationScope::Run {
                    run: "run-1".into(),
                },
            )]),
            now,
        );
        assert!(cache.is_empty());
        assert!(matches!(
            cache.admit(key(), "run-1", &sub, now, answer("l9"), terms(4, 5)),
            Err(Stale::Invalidated)
        ));
        assert!(
            cache
                .admit(key(), "run-2", &sub, now, answer("l9"), terms(4, 5))
                .is_ok(),
            "another run is unaffected"
        );
        let other: Arc<str> = Arc::from("sub-0");
        assert!(matches!(
            cache.admit(key(), "run-2", &other, now, answer("l9"), terms(9, 5)),
            Err(Stale::Subscription)
        ));
    }

    #[test]
    fn grants_are_used_up_expire_and_die_with_the_subscription() {
        let held = prometheus_client::metrics::gauge::Gauge::default();
        let cache = GrantCache::with_gauge(held.clone());
        let sub = subscribed(&cache, 0);
        let now = Instant::now();
        let used = cache
            .admit(
                Some(Box::from(&b"k"[..])),
                "run-1",
                &sub,
                now,
                answer("l1"),
                terms(0, 3),
            )
            .expect("admitted");
        drop(used);
        assert_eq!(held.get(), 1, "the gauge follows the grants kept");
        assert!(cache.lookup(b"k").is_some());
        assert!(cache.lookup(b"k").is_some());
        assert!(cache.lookup(b"k").is_none(), "three uses in all");
        assert_eq!(held.get(), 0, "a used-up grant leaves the gauge");
        let expired = GrantTerms {
            ttl_ms: 0,
            ..terms(0, 3)
        };
        drop(cache.admit(
            Some(Box::from(&b"e"[..])),
            "run-1",
            &sub,
            now,
            answer("l1"),
            expired,
        ));
        assert!(cache.lookup(b"e").is_none(), "expired");
        drop(cache.admit(
            Some(Box::from(&b"k"[..])),
            "run-1",
            &sub,
            now,
            answer("l1"),
            terms(0, 3),
        ));
        cache.reset("test");
        assert!(cache.lookup(b"k").is_none());
        assert!(cache.subscription().is_none());
    }

    #[tokio::test]
    async fn draining_waits_for_the_flights_of_the_scope_only() {
        let cache = GrantCache::default();
        let sub = subscribed(&cache, 0);
        let now = Instant::now();
        let a = cache
            .admit(None, "run-1", &sub, now, answer("l1"), terms(0, 1))
            .expect("a");
        let b = cache
            .admit(None, "run-1", &sub, now, answer("l2"), terms(0, 1))
            .expect("b");
        let soon = || Instant::now() + Duration::from_millis(50);
        assert!(
            !cache.drain(&[lease("l1")], soon()).await,
            "l1 is in flight"
        );
        drop(a);
        assert!(
            cache.drain(&[lease("l1")], soon()).await,
            "b is another lease"
        );
        assert!(!cache.drain(&[InvalidationScope::All], soon()).await);
        let waiter = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .drain(
                        &[InvalidationScope::All],
                        Instant::now() + Duration::from_secs(5),
                    )
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(b);
        assert!(
            waiter.await.expect("join"),
            "woken when the last flight landed"
        );
    }
}
