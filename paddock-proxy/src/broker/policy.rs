//! [`EgressPolicy`] backed by the broker's `POST /v1/validate-egress`.

use paddock_wire::api::{ValidateEgressRequest, ValidateEgressResponse};

use super::{BrokerCallError, BrokerClient};
use crate::policy::{CheckFuture, Decision, EgressPolicy, EgressRequest, PolicyError};

/// Rule name reported when the broker allowed without naming a policy.
const UNNAMED_RULE: &str = "broker";

/// Asks the broker whether a run may reach a destination.
///
/// Call [`EgressPolicy::check`] once per agent connection, when the destination name is known
/// and before anything is resolved or dialled. Requests on that connection are then covered by
/// that answer: a request with a placeholder is re-checked by the broker during substitution,
/// one without is re-checked with `validate-egress` once the answer is older than the
/// re-check interval ([`crate::policy::EgressRecheck`]).
///
/// Nothing is cached: every check is a broker call, so a policy change or a run leaving its
/// active phase applies to the very next connection. Any failure (broker unreachable, timeout,
/// refusal such as an unknown run, undecodable answer) is a [`PolicyError`], which callers
/// treat as a deny. The connection [`crate::policy::Mode`] is not sent: the broker's egress
/// grants do not depend on it.
#[derive(Debug, Clone)]
pub struct BrokerPolicy {
    client: BrokerClient,
    /// Sent with every call: the pod this policy decides for (node agent mode).
    pod: Option<String>,
    /// The invalidation stream's generation, for re-checks (see [`Self::with_generation`]).
    grants: Option<super::GrantCache>,
}

impl BrokerPolicy {
    #[must_use]
    pub fn new(client: BrokerClient) -> Self {
        Self {
            client,
            pod: None,
            grants: None,
        }
    }

    /// Reports `grants`' generation ([`super::GrantCache::generation`]) as this policy's, so
    /// re-checks keep an allow until the broker publishes a policy change or a run's end,
    /// instead of asking again every interval.
    #[must_use]
    pub fn with_generation(mut self, grants: super::GrantCache) -> Self {
        self.grants = Some(grants);
        self
    }

    /// Every call names `pod` (its UID), so the broker can check that a node agent asks for a
    /// run from the run's own pod.
    #[must_use]
    pub fn for_pod(mut self, pod: impl Into<String>) -> Self {
        self.pod = Some(pod.into());
        self
    }
}

impl EgressPolicy for BrokerPolicy {
    fn generation(&self) -> Option<u64> {
        self.grants.as_ref().and_then(super::GrantCache::generation)
    }

    fn check<'a>(&'a self, req: &'a EgressRequest) -> CheckFuture<'a> {
        Box::pin(async move {
            let answer = self
                .client
                .validate_egress(&ValidateEgressRequest {
                    run: req.run.clone(),
                    pod: self.pod.clone(),
                    host: req.host.clone(),
                    port: Some(req.port),
                })
                .await
                .map_err(|e| policy_error(&e))?;
            let decision = decision(answer);
            tracing::debug!(
                run = %req.run, host = %req.host, port = req.port,
                allowed = decision.is_allowed(), "broker egress decision"
            );
            Ok(decision)
        })
    }

    /// `validate-egress` without a port: the broker allows the name when a grant lists it on
    /// any port, or a discovery window is open. Uncached here; the DNS server keeps answers
    /// briefly per name so a burst of queries is not a burst of broker calls.
    fn name_allowed<'a>(&'a self, run: &'a str, host: &'a str) -> CheckFuture<'a> {
        Box::pin(async move {
            let answer = self
                .client
                .validate_egress(&ValidateEgressRequest {
                    run: run.to_owned(),
                    pod: self.pod.clone(),
                    host: host.to_owned(),
                    port: None,
                })
                .await
                .map_err(|e| policy_error(&e))?;
            let decision = decision(answer);
            tracing::debug!(
                run = %run, host = %host, allowed = decision.is_allowed(),
                "broker name decision"
            );
            Ok(decision)
        })
    }
}

/// A refusal (an unknown run, a forbidden caller, ...) is [`PolicyError::Refused`]; anything
/// else (unreachable, timed out, rate limited, an undecodable answer) is
/// [`PolicyError::Unavailable`]. Both deny.
fn policy_error(e: &BrokerCallError) -> PolicyError {
    if e.is_refusal() {
        PolicyError::Refused(match e {
            BrokerCallError::Rejected { message, .. } => message.clone(),
            other => other.to_string(),
        })
    } else {
        PolicyError::Unavailable(e.to_string())
    }
}

/// Maps the broker's answer; discovery never substitutes, whatever the flag says.
fn decision(answer: ValidateEgressResponse) -> Decision {
    if !answer.allowed {
        return Decision::Deny {
            reason: answer.reason,
        };
    }
    let rule = answer.policy.unwrap_or_else(|| UNNAMED_RULE.to_owned());
    if answer.discovery {
        Decision::Discovery { rule }
    } else if answer.passthrough && !answer.substitute_auth {
        Decision::Passthrough { rule }
    } else {
        Decision::Allow {
            rule,
            substitute_auth: answer.substitute_auth,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(allowed: bool, substitute_auth: bool, discovery: bool) -> ValidateEgressResponse {
        ValidateEgressResponse {
            allowed,
            substitute_auth,
            discovery,
            passthrough: false,
            policy: Some("team-a".into()),
            reason: "because".into(),
        }
    }

    #[test]
    fn maps_every_answer_shape() {
        assert_eq!(
            decision(answer(false, true, false)),
            Decision::Deny {
                reason: "because".into()
            }
        );
        assert_eq!(
            decision(answer(true, true, false)),
            Decision::Allow {
                rule: "team-a".into(),
                substitute_auth: true
            }
        );
        assert_eq!(
            decision(answer(true, true, true)),
            Decision::Discovery {
                rule: "team-a".into()
            }
        );
        let passthrough = ValidateEgressResponse {
            passthrough: true,
            ..answer(true, false, false)
        };
        assert_eq!(
            decision(passthrough.clone()),
            Decision::Passthrough {
                rule: "team-a".into()
            }
        );
        let substituting = ValidateEgressResponse {
            substitute_auth: true,
            ..passthrough
        };
        assert!(
            matches!(decision(substituting), Decision::Allow { .. }),
            "a substituting destination is always intercepted"
        );
        let mut unnamed = answer(true, false, false);
        unnamed.policy = None;
        assert_eq!(
            decision(unnamed),
            Decision::Allow {
                rule: UNNAMED_RULE.into(),
                substitute_auth: false
            }
        );
    }
}
