//! Egress re-checks for requests on connections that are already open.
//!
//! `validate-egress` is asked once per agent connection, so without more a policy change
//! would only reach connections opened after it, and an agent could keep a kept-alive (or
//! HTTP/2) connection to a withdrawn host for as long as it likes. Requests with a placeholder
//! are covered by `substitute-auth`, which checks the policy itself; for the others the proxy
//! asks `validate-egress` again when the destination's last answer is older than the interval.
//! With the broker's 0.25 s policy poll and the 0.25 s default here, a policy change reaches
//! every request, on old connections as on new ones, within half a second (a second with
//! margin); a broker that stopped
//! answering fails the next stale re-check (502).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use paddock_broker::wire::ValidateEgressRequest;

use super::BrokerClient;
use crate::http::{RequestContext, SubstituteError};

/// Default longest time a destination's last `validate-egress` answer covers new requests.
pub const DEFAULT_EGRESS_RECHECK: Duration = Duration::from_millis(250);
/// Destinations remembered at once; past it the memory starts over (costs one call each).
const MAX_ENTRIES: usize = 4096;

/// When each (run, host, port) was last allowed by the broker.
#[derive(Debug)]
pub(crate) struct EgressRecheck {
    interval: Duration,
    allowed_at: Mutex<HashMap<(String, String, u16), Instant>>,
}

impl EgressRecheck {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            allowed_at: Mutex::new(HashMap::new()),
        }
    }

    fn key(ctx: &RequestContext) -> (String, String, u16) {
        (ctx.run.clone(), ctx.host.clone(), ctx.port)
    }

    fn is_fresh(&self, key: &(String, String, u16)) -> bool {
        self.allowed_at
            .lock()
            .ok()
            .and_then(|m| m.get(key).copied())
            .is_some_and(|at| at.elapsed() < self.interval)
    }

    /// Records that the broker allowed `ctx`'s destination just now (also after a successful
    /// substitution, which checked the policy too).
    pub(crate) fn allowed(&self, ctx: &RequestContext) {
        if let Ok(mut m) = self.allowed_at.lock() {
            if m.len() >= MAX_ENTRIES {
                m.clear();
            }
            m.insert(Self::key(ctx), Instant::now());
        }
    }

    fn forget(&self, key: &(String, String, u16)) {
        if let Ok(mut m) = self.allowed_at.lock() {
            m.remove(key);
        }
    }

    /// `Ok` if the destination was allowed within the interval, else asks the broker again:
    /// a refusal is [`SubstituteError::Denied`] (403), a failed call
    /// [`SubstituteError::Unavailable`] (502).
    pub(crate) async fn check(
        &self,
        client: &BrokerClient,
        ctx: &RequestContext,
    ) -> Result<(), SubstituteError> {
        let key = Self::key(ctx);
        if self.is_fresh(&key) {
            return Ok(());
        }
        let answer = client
            .validate_egress(&ValidateEgressRequest {
                run: ctx.run.clone(),
                host: ctx.host.clone(),
                port: ctx.port,
            })
            .await
            .map_err(|e| {
                self.forget(&key);
                super::substitute::call_error(&e)
            })?;
        if !answer.allowed {
            self.forget(&key);
            let why = answer.reason;
            return Err(SubstituteError::Denied {
                reason: format!(
                    "egress to {}:{} is no longer allowed: {why}",
                    ctx.host, ctx.port
                ),
            });
        }
        self.allowed(ctx);
        Ok(())
    }
}
