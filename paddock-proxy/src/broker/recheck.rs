//! Egress re-checks for requests on connections that are already open.
//!
//! `validate-egress` is asked once per agent connection, so without more a policy change
//! would only reach connections opened after it, and an agent could keep a kept-alive (or
//! HTTP/2) connection to a withdrawn host for as long as it likes. Requests with a placeholder
//! are covered by `substitute-auth`, which checks the policy itself; for the others (and for
//! open WebSocket tunnels) the proxy asks `validate-egress` again when the destination's last
//! answer is older than the interval. With the broker's 0.25 s policy poll and the 0.25 s
//! default here, a policy change reaches every request, on old connections as on new ones,
//! within half a second; a broker that stopped answering fails the next stale re-check (502).
//!
//! One call per destination at a time: concurrent requests for a stale destination wait for
//! the one call in flight and share its answer. Every answer is kept for the interval,
//! refusals and failures too, so a hostile agent cannot turn its requests into a flood of
//! broker calls (and broker audit lines), and a silent broker costs one timeout per interval,
//! not one per waiting request. An answer's age counts from when its call was sent, so an
//! allow decided before a policy change never outlives the interval after it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paddock_wire::api::ValidateEgressRequest;

use super::BrokerClient;
use crate::http::{RequestContext, SubstituteError};

/// Default longest time a destination's last `validate-egress` answer covers new requests.
pub const DEFAULT_EGRESS_RECHECK: Duration = Duration::from_millis(250);
/// Destinations remembered at once; past it the memory starts over (costs one call each).
const MAX_ENTRIES: usize = 4096;

type Key = (String, String, u16);

/// The last answer for one destination: when its call was sent, and the verdict.
#[derive(Debug, Default)]
struct Slot {
    answer: Option<(Instant, Result<(), Verdict>)>,
}

/// A refusal or a failure, kept to answer the requests of the interval.
#[derive(Debug, Clone)]
enum Verdict {
    Denied(String),
    Unavailable(String),
}

impl Verdict {
    fn to_error(&self) -> SubstituteError {
        match self {
            Verdict::Denied(reason) => SubstituteError::Denied {
                reason: reason.clone(),
            },
            Verdict::Unavailable(reason) => SubstituteError::Unavailable {
                reason: reason.clone(),
            },
        }
    }
}

/// The broker's last egress answer per (run, host, port).
#[derive(Debug)]
pub(crate) struct EgressRecheck {
    interval: Duration,
    slots: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<Slot>>>>,
}

impl EgressRecheck {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            slots: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    fn slot(&self, ctx: &RequestContext) -> Arc<tokio::sync::Mutex<Slot>> {
        let key = (ctx.run.clone(), ctx.host.clone(), ctx.port);
        // A poisoned map only means a panic elsewhere mid-insert; the map itself is intact.
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slots.len() >= MAX_ENTRIES && !slots.contains_key(&key) {
            slots.clear();
        }
        Arc::clone(slots.entry(key).or_default())
    }

    /// `Ok` if the destination's answer from within the interval allowed it, else asks the
    /// broker (one call per destination at a time): a refusal is [`SubstituteError::Denied`]
    /// (403), a failed call [`SubstituteError::Unavailable`] (502).
    pub(crate) async fn check(
        &self,
        client: &BrokerClient,
        ctx: &RequestContext,
    ) -> Result<(), SubstituteError> {
        let slot = self.slot(ctx);
        let mut slot = slot.lock().await;
        if let Some((sent, verdict)) = &slot.answer
            && sent.elapsed() < self.interval
        {
            return verdict.clone().map_err(|v| v.to_error());
        }
        let sent = Instant::now();
        let verdict =
            match client
                .validate_egress(&ValidateEgressRequest {
                    run: ctx.run.clone(),
                    host: ctx.host.clone(),
                    port: Some(ctx.port),
                })
                .await
            {
                Ok(answer) if answer.allowed => Ok(()),
                Ok(answer) => Err(Verdict::Denied(format!(
                    "egress to {}:{} is no longer allowed: {}",
                    ctx.host, ctx.port, answer.reason
                ))),
                Err(e) => Err(match super::substitute::call_error(&e) {
                    SubstituteError::Denied { reason }
                    | SubstituteError::TlsRequired { reason } => Verdict::Denied(reason),
                    SubstituteError::Unavailable { reason }
                    | SubstituteError::Invalid { reason } => Verdict::Unavailable(reason),
                }),
            };
        slot.answer = Some((sent, verdict.clone()));
        verdict.map_err(|v| v.to_error())
    }
}
