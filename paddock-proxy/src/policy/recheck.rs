//! Egress re-checks for requests and tunnels on connections that are already open.
//!
//! The [`EgressPolicy`] is asked once per agent connection, so without more a policy change
//! would only reach connections opened after it, and an agent could keep a kept-alive (or
//! HTTP/2) connection, or an upgraded WebSocket tunnel, to a withdrawn host for as long as it
//! likes. [`EgressRecheck`] asks the same policy again, whatever it is (the static file, which
//! may be reloaded, or the broker's `validate-egress`), when the destination's last answer is
//! older than the interval: the request loop before forwarding a request, and the tunnel
//! watchdog of an open tunnel every interval. With the broker's 0.25 s policy poll and the
//! 0.25 s default here, a policy change reaches every request, on old connections as on new
//! ones, within half a second; a backend that stopped answering fails the next stale re-check
//! (502).
//!
//! A policy that can say when its answers change ([`EgressPolicy::generation`]: a reloaded
//! policy file, the broker through its invalidation stream) has an allow kept past the
//! interval until that number changes (at most a minute): the change is pushed instead of
//! polled, and an unchanged destination costs no call. Denials, failures and discovery
//! windows are kept for the interval only.
//!
//! One check per destination at a time: concurrent requests for a stale destination wait for
//! the one check in flight and share its answer. Every answer is kept for the interval,
//! refusals and failures too, so a hostile agent cannot turn its requests into a flood of
//! broker calls (and broker audit lines), and a silent broker costs one timeout per interval,
//! not one per waiting request. An answer's age counts from when its check started, so an
//! allow decided before a policy change never outlives the interval after it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;

use super::{Decision, EgressPolicy, EgressRequest, PolicyError};

/// Default longest time a destination's last answer covers new requests.
pub const DEFAULT_EGRESS_RECHECK: Duration = Duration::from_millis(250);
/// Destinations remembered at once; past it the memory starts over (costs one check each).
const MAX_ENTRIES: usize = 4096;

/// Why an open connection may no longer reach its destination. Reasons carry no credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecheckError {
    /// The policy (or the broker) now refuses the destination: 403.
    #[error("egress denied: {reason}")]
    Denied { reason: String },
    /// The policy could not answer (broker unreachable, timed out): 502.
    #[error("egress policy unavailable: {reason}")]
    Unavailable { reason: String },
}

impl RecheckError {
    /// Denials are the agent's problem (403: stop retrying); a policy that cannot answer is
    /// the proxy's side failing (502).
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Denied { .. } => StatusCode::FORBIDDEN,
            Self::Unavailable { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// A short machine-readable reason.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Denied { .. } => "egress_denied",
            Self::Unavailable { .. } => "egress_unavailable",
        }
    }

    /// Whether the destination was refused (rather than the policy failing).
    #[must_use]
    pub fn is_denial(&self) -> bool {
        matches!(self, Self::Denied { .. })
    }
}

/// The last answer for one destination.
#[derive(Debug, Default)]
struct Slot {
    answer: Option<Answer>,
}

#[derive(Debug)]
struct Answer {
    /// When its check started.
    sent: Instant,
    verdict: Result<(), RecheckError>,
    /// The policy's generation read before asking ([`EgressPolicy::generation`]).
    generation: Option<u64>,
    /// Allowed by a time-boxed discovery window: never kept past the interval.
    discovery: bool,
}

/// Longest an allow is kept on an unchanged generation: a safety net, not the mechanism.
const MAX_PUSHED_AGE: Duration = Duration::from_mins(1);

impl Answer {
    /// Whether this answer still covers requests.
    fn fresh(&self, interval: Duration, generation: Option<u64>) -> bool {
        let age = self.sent.elapsed();
        if age < interval {
            return true;
        }
        self.verdict.is_ok()
            && !self.discovery
            && generation.is_some()
            && generation == self.generation
            && age < MAX_PUSHED_AGE
    }
}

/// The policy's last answer per (run, host, port, mode), shared by every connection.
#[derive(Debug)]
pub struct EgressRecheck {
    policy: Arc<dyn EgressPolicy>,
    interval: Duration,
    slots: Mutex<HashMap<EgressRequest, Arc<tokio::sync::Mutex<Slot>>>>,
}

impl EgressRecheck {
    /// Re-checks with `policy` once the last answer for a destination is older than
    /// `interval` (zero: on every request; tunnels are then checked every 10 ms).
    #[must_use]
    pub fn new(policy: Arc<dyn EgressPolicy>, interval: Duration) -> Self {
        Self {
            policy,
            interval,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// How long an answer covers requests, and how often open tunnels are re-checked.
    #[must_use]
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The re-check of one connection, to `req`'s destination.
    #[must_use]
    pub fn for_connection(self: &Arc<Self>, req: EgressRequest) -> ConnectionRecheck {
        // Looked up once: the connection's requests then share the destination's answer
        // without hashing the destination each time.
        let slot = self.slot(&req);
        ConnectionRecheck {
            recheck: Arc::clone(self),
            req,
            slot,
        }
    }

    fn slot(&self, req: &EgressRequest) -> Arc<tokio::sync::Mutex<Slot>> {
        // A poisoned map only means a panic elsewhere mid-insert; the map itself is intact.
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slots.len() >= MAX_ENTRIES && !slots.contains_key(req) {
            slots.clear();
        }
        Arc::clone(slots.entry(req.clone()).or_default())
    }

    /// `Ok` if the destination's answer from within the interval allowed it, else asks the
    /// policy (one check per destination at a time): a refusal is [`RecheckError::Denied`],
    /// a failed check [`RecheckError::Unavailable`].
    pub async fn check(&self, req: &EgressRequest) -> Result<(), RecheckError> {
        self.check_in(&self.slot(req), req).await
    }

    /// [`Self::check`] with `req`'s slot already found. A slot dropped from the map (full)
    /// stays valid for whoever holds it: it only stops being shared with newcomers.
    async fn check_in(
        &self,
        slot: &tokio::sync::Mutex<Slot>,
        req: &EgressRequest,
    ) -> Result<(), RecheckError> {
        // The common case, a fresh answer and no check in flight, takes the lock without
        // the waiting machinery of an async lock.
        if let Ok(slot) = slot.try_lock()
            && let Some(answer) = &slot.answer
            && answer.fresh(self.interval, self.policy.generation())
        {
            return answer.verdict.clone();
        }
        let mut slot = slot.lock().await;
        // Read before asking: a change after this makes the answer stale, never the reverse.
        let generation = self.policy.generation();
        if let Some(answer) = &slot.answer
            && answer.fresh(self.interval, generation)
        {
            return answer.verdict.clone();
        }
        let sent = Instant::now();
        let decided = self.policy.check(req).await;
        let discovery = matches!(decided, Ok(Decision::Discovery { .. }));
        let verdict = match decided {
            Ok(
                Decision::Allow { .. } | Decision::Discovery { .. } | Decision::Passthrough { .. },
            ) => Ok(()),
            Ok(Decision::Deny { reason }) => Err(RecheckError::Denied {
                reason: format!(
                    "egress to {}:{} is no longer allowed: {reason}",
                    req.host, req.port
                ),
            }),
            Err(PolicyError::Refused(reason)) => Err(RecheckError::Denied { reason }),
            Err(e @ PolicyError::InvalidHost(_)) => Err(RecheckError::Denied {
                reason: e.to_string(),
            }),
            Err(PolicyError::Unavailable(reason)) => Err(RecheckError::Unavailable { reason }),
        };
        slot.answer = Some(Answer {
            sent,
            verdict: verdict.clone(),
            generation,
            discovery,
        });
        verdict
    }
}

/// The re-check of one open connection: its destination and the shared [`EgressRecheck`].
#[derive(Debug, Clone)]
pub struct ConnectionRecheck {
    recheck: Arc<EgressRecheck>,
    req: EgressRequest,
    /// `req`'s slot in `recheck`, shared with every connection to the same destination.
    slot: Arc<tokio::sync::Mutex<Slot>>,
}

impl ConnectionRecheck {
    /// Whether the connection's destination is still allowed (see [`EgressRecheck::check`]).
    pub async fn check(&self) -> Result<(), RecheckError> {
        self.recheck.check_in(&self.slot, &self.req).await
    }

    /// How often an open tunnel of this connection is re-checked.
    #[must_use]
    pub fn interval(&self) -> Duration {
        self.recheck.interval()
    }

    /// The destination this connection was allowed for.
    #[must_use]
    pub fn request(&self) -> &EgressRequest {
        &self.req
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{CheckFuture, Mode, StaticPolicy};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers from a switchable static list and counts the questions.
    #[derive(Debug)]
    struct Counting {
        policy: Mutex<StaticPolicy>,
        calls: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
        /// `None`: no generation; else the number reported.
        generation: Mutex<Option<u64>>,
    }

    impl EgressPolicy for Counting {
        fn generation(&self) -> Option<u64> {
            *self.generation.lock().expect("generation")
        }

        fn check<'a>(&'a self, req: &'a EgressRequest) -> CheckFuture<'a> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let answer = if self.fail.load(Ordering::SeqCst) {
                Err(PolicyError::Unavailable("backend gone".into()))
            } else {
                self.policy.lock().expect("policy").decide(req)
            };
            Box::pin(std::future::ready(answer))
        }
    }

    const ALLOW: &str = "[[rule]]\nhosts = [\"api.test\"]\nports = [443]\n";

    fn counting(text: &str) -> Arc<Counting> {
        Arc::new(Counting {
            policy: Mutex::new(StaticPolicy::from_toml_str(text).expect("policy")),
            calls: AtomicUsize::new(0),
            fail: std::sync::atomic::AtomicBool::new(false),
            generation: Mutex::new(None),
        })
    }

    fn req() -> EgressRequest {
        EgressRequest::new("run-1", "api.test", 443, Mode::Transparent).expect("request")
    }

    /// A recheck over `policy` answering for `interval`, and a connection to [`req`] on it.
    fn rechecked(
        policy: &Arc<Counting>,
        interval: Duration,
    ) -> (Arc<EgressRecheck>, ConnectionRecheck) {
        let recheck = Arc::new(EgressRecheck::new(policy.clone(), interval));
        let conn = recheck.for_connection(req());
        (recheck, conn)
    }

    #[tokio::test]
    async fn answers_cover_their_interval_then_see_changes() {
        let policy = counting(ALLOW);
        let (_, conn) = rechecked(&policy, Duration::from_millis(200));
        conn.check().await.expect("allowed");
        conn.check().await.expect("still covered");
        assert_eq!(policy.calls.load(Ordering::SeqCst), 1);

        *policy.policy.lock().expect("policy") = StaticPolicy::from_toml_str("").expect("empty");
        conn.check()
            .await
            .expect("the old answer covers its interval");
        tokio::time::sleep(Duration::from_millis(210)).await;
        let err = conn.check().await.expect_err("withdrawn");
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
        assert!(err.to_string().contains("no longer allowed"), "{err}");
        assert_eq!(policy.calls.load(Ordering::SeqCst), 2);
        // The refusal is kept for the interval too.
        conn.check().await.expect_err("still refused");
        assert_eq!(policy.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failing_policy_fails_closed_and_is_asked_once_per_interval() {
        let policy = counting(ALLOW);
        policy.fail.store(true, Ordering::SeqCst);
        let recheck = Arc::new(EgressRecheck::new(policy.clone(), Duration::from_secs(30)));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let conn = recheck.for_connection(req());
            tasks.spawn(async move { conn.check().await });
        }
        while let Some(r) = tasks.join_next().await {
            let err = r.expect("join").expect_err("unavailable");
            assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
            assert_eq!(err.reason(), "egress_unavailable");
        }
        assert_eq!(policy.calls.load(Ordering::SeqCst), 1);
    }

    /// A connection keeps the slot it was given when the map is emptied for being full:
    /// its answer still covers it, and a policy change still reaches it.
    #[tokio::test]
    async fn a_connection_keeps_its_answer_when_the_map_is_emptied() {
        let policy = counting(ALLOW);
        *policy.generation.lock().expect("gen") = Some(1);
        let (recheck, conn) = rechecked(&policy, Duration::from_millis(20));
        conn.check().await.expect("allowed");
        let fill = u16::try_from(MAX_ENTRIES).expect("fits") + 1;
        for port in 1..=fill {
            let other = EgressRequest::new("run-1", "other.test", port, Mode::Transparent)
                .expect("request");
            drop(recheck.for_connection(other));
        }
        assert!(
            !lock_slots(&recheck).contains_key(&req()),
            "the map was emptied"
        );
        // Past the interval, on an unchanged generation: kept, not asked again.
        tokio::time::sleep(Duration::from_millis(40)).await;
        conn.check().await.expect("still covered");
        assert_eq!(policy.calls.load(Ordering::SeqCst), 1);
        *policy.policy.lock().expect("policy") = StaticPolicy::from_toml_str("").expect("empty");
        *policy.generation.lock().expect("gen") = Some(2);
        conn.check().await.expect_err("the change reaches it");
    }

    fn lock_slots(
        recheck: &EgressRecheck,
    ) -> std::sync::MutexGuard<'_, HashMap<EgressRequest, Arc<tokio::sync::Mutex<Slot>>>> {
        recheck.slots.lock().expect("slots")
    }

    #[tokio::test]
    async fn destinations_and_modes_are_kept_apart() {
        let policy = counting(
            "[[rule]]\nhosts = [\"api.test\"]\nports = [443]\nmodes = [\"transparent\"]\n",
        );
        let recheck = Arc::new(EgressRecheck::new(policy.clone(), Duration::from_secs(30)));
        recheck.check(&req()).await.expect("transparent allowed");
        let connect = EgressRequest::new("run-1", "api.test", 443, Mode::Connect).expect("request");
        recheck.check(&connect).await.expect_err("not in CONNECT");
        let other =
            EgressRequest::new("run-1", "api.test", 8443, Mode::Transparent).expect("request");
        recheck.check(&other).await.expect_err("other port");
    }

    /// With a generation, an allow outlives the interval until the number changes; a
    /// change is seen at once; denials, failures and discovery keep the interval.
    #[tokio::test]
    async fn a_generation_keeps_allows_until_it_changes() {
        let policy = counting(ALLOW);
        *policy.generation.lock().expect("gen") = Some(7);
        let (_, conn) = rechecked(&policy, Duration::from_millis(20));
        conn.check().await.expect("allowed");
        tokio::time::sleep(Duration::from_millis(40)).await;
        conn.check().await.expect("still allowed");
        assert_eq!(policy.calls.load(Ordering::SeqCst), 1, "not asked again");

        *policy.policy.lock().expect("policy") = StaticPolicy::from_toml_str("").expect("empty");
        *policy.generation.lock().expect("gen") = Some(8);
        conn.check().await.expect_err("the change is seen at once");
        assert_eq!(policy.calls.load(Ordering::SeqCst), 2);
        tokio::time::sleep(Duration::from_millis(40)).await;
        conn.check()
            .await
            .expect_err("a denial is asked again after the interval");
        assert_eq!(policy.calls.load(Ordering::SeqCst), 3);

        // Without a generation (the stream is down): the interval again.
        *policy.policy.lock().expect("policy") = StaticPolicy::from_toml_str(ALLOW).expect("allow");
        *policy.generation.lock().expect("gen") = None;
        tokio::time::sleep(Duration::from_millis(40)).await;
        conn.check().await.expect("allowed again");
        tokio::time::sleep(Duration::from_millis(40)).await;
        conn.check().await.expect("allowed");
        assert_eq!(policy.calls.load(Ordering::SeqCst), 5);

        // A discovery window is time-boxed: never kept past the interval.
        *policy.policy.lock().expect("policy") = StaticPolicy::from_toml_str(
            "[[rule]]\nhosts = [\"api.test\"]\nports = [443]\naction = \"discovery\"\n",
        )
        .expect("discovery");
        *policy.generation.lock().expect("gen") = Some(9);
        tokio::time::sleep(Duration::from_millis(40)).await;
        conn.check().await.expect("discovery");
        tokio::time::sleep(Duration::from_millis(40)).await;
        conn.check().await.expect("discovery");
        assert_eq!(policy.calls.load(Ordering::SeqCst), 7);
    }
}
