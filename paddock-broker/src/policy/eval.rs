//! Evaluation: which grants apply to a run, and whether it may reach a destination.

use time::OffsetDateTime;

use super::{AppliesTo, CredentialGrant, EgressGrant, LoadedPolicy, Policy, hosts};
use crate::wire::RunInfo;

impl AppliesTo {
    #[must_use]
    pub fn matches(&self, run: &RunInfo) -> bool {
        self.namespaces.contains(&run.namespace)
            && (self.templates.is_empty() || self.templates.contains(&run.template))
            && (self.runs.is_empty() || self.runs.contains(&run.run))
    }
}

impl EgressGrant {
    /// Whether the grant covers `host` on `port`; `None` asks about the name on any port (a
    /// DNS query: could the run reach this name at all?).
    #[must_use]
    pub fn matches(&self, host: &str, port: Option<u16>) -> bool {
        port.is_none_or(|p| self.ports.contains(&p))
            && self.hosts.iter().any(|p| hosts::matches(p, host))
    }
}

/// Outcome of an egress check. Each variant carries only what holds for it: a denial names
/// no policy, and only a listed grant can allow credential substitution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EgressDecision {
    /// An egress grant of `policy` lists the destination.
    Granted {
        policy: String,
        /// The grant lets the broker substitute credentials towards it (`substituteAuth`).
        substitute_auth: bool,
        /// Every grant listing it says `passthrough`: relay its TLS untouched.
        passthrough: bool,
    },
    /// No grant lists it, but the discovery window of `policy` is open: allowed and audited.
    Discovery { policy: String },
    /// Nothing allows it; `reason` names the destination and the run.
    Denied { reason: String },
}

impl EgressDecision {
    #[must_use]
    pub fn allowed(&self) -> bool {
        !matches!(self, Self::Denied { .. })
    }

    #[must_use]
    pub fn substitute_auth(&self) -> bool {
        matches!(
            self,
            Self::Granted {
                substitute_auth: true,
                ..
            }
        )
    }

    /// Allowed for relaying TLS without terminating it.
    #[must_use]
    pub fn passthrough(&self) -> bool {
        matches!(
            self,
            Self::Granted {
                passthrough: true,
                ..
            }
        )
    }

    /// Allowed by a discovery window only.
    #[must_use]
    pub fn discovery(&self) -> bool {
        matches!(self, Self::Discovery { .. })
    }

    /// The policy that allowed the destination.
    #[must_use]
    pub fn policy(&self) -> Option<&str> {
        match self {
            Self::Granted { policy, .. } | Self::Discovery { policy } => Some(policy),
            Self::Denied { .. } => None,
        }
    }

    /// Why, in words for audit records and the proxy's log.
    #[must_use]
    pub fn reason(&self) -> String {
        match self {
            Self::Granted { policy, .. } => format!("allowed by policy {policy}"),
            Self::Discovery { policy } => {
                format!("allowed by the discovery window of policy {policy} (audited)")
            }
            Self::Denied { reason } => reason.clone(),
        }
    }
}

impl Policy {
    /// The idle timeout the policies applying to `run` set: the shortest, if any does.
    #[must_use]
    pub fn idle_timeout(&self, run: &RunInfo) -> Option<std::time::Duration> {
        self.documents()
            .iter()
            .filter(|d| d.doc().spec.applies_to.matches(run))
            .filter_map(|d| d.doc().spec.interactive.as_ref()?.idle_timeout_secs)
            .min()
            .map(|s| std::time::Duration::from_secs(s.get()))
    }

    /// The shortest idle timeout any policy sets (the watchdog looks up only runs quiet for
    /// at least this long, or the broker's own timeout).
    #[must_use]
    pub fn shortest_idle_timeout(&self) -> Option<std::time::Duration> {
        self.documents()
            .iter()
            .filter_map(|d| d.doc().spec.interactive.as_ref()?.idle_timeout_secs)
            .min()
            .map(|s| std::time::Duration::from_secs(s.get()))
    }

    /// Every credential grant, with its policy.
    pub fn credentials(&self) -> impl Iterator<Item = (&LoadedPolicy, &CredentialGrant)> {
        self.documents()
            .iter()
            .flat_map(|d| d.doc().spec.credentials.iter().map(move |c| (d, c)))
    }

    /// The grant named `name`, if a policy applying to `run` grants it.
    #[must_use]
    pub fn credential_for(
        &self,
        run: &RunInfo,
        name: &str,
    ) -> Option<(&LoadedPolicy, &CredentialGrant)> {
        self.credentials()
            .find(|(d, c)| c.name == name && d.doc().spec.applies_to.matches(run))
    }

    /// Decides whether `run` may reach `host:port`.
    #[must_use]
    pub fn egress(
        &self,
        run: &RunInfo,
        host: &str,
        port: u16,
        now: OffsetDateTime,
    ) -> EgressDecision {
        self.egress_on(run, host, Some(port), now)
    }

    /// Decides whether `run` may reach `host` on `port`, or with `None` on any port: the
    /// question the proxy's DNS server asks before it answers a name. A grant for the host
    /// on any port allows the name, and so does an active discovery window (which would allow
    /// the connection too). `substitute_auth` is meaningless without a port.
    #[must_use]
    pub fn egress_on(
        &self,
        run: &RunInfo,
        host: &str,
        port: Option<u16>,
        now: OffsetDateTime,
    ) -> EgressDecision {
        let applicable: Vec<&LoadedPolicy> = self
            .documents()
            .iter()
            .filter(|d| d.doc().spec.applies_to.matches(run))
            .collect();
        let mut allowed_by: Option<&LoadedPolicy> = None;
        // Interception (with its per-request audit) wins over pass-through when grants
        // disagree: only a destination every matching grant passes through is relayed.
        let mut intercepted = false;
        for d in &applicable {
            for grant in &d.doc().spec.egress {
                if grant.matches(host, port) {
                    // A grant that allows substitution wins over one that only allows egress.
                    if grant.substitute_auth {
                        return EgressDecision::Granted {
                            policy: d.name().to_owned(),
                            substitute_auth: true,
                            passthrough: false,
                        };
                    }
                    intercepted |= !grant.passthrough;
                    allowed_by.get_or_insert(d);
                }
            }
        }
        if let Some(d) = allowed_by {
            return EgressDecision::Granted {
                policy: d.name().to_owned(),
                substitute_auth: false,
                passthrough: !intercepted,
            };
        }
        if let Some(d) = applicable.iter().find(|d| d.discovery_active(now)) {
            return EgressDecision::Discovery {
                policy: d.name().to_owned(),
            };
        }
        EgressDecision::Denied {
            reason: match port {
                Some(port) => format!(
                    "egress to {}:{port} is not granted to run {} by any BrokerPolicy",
                    hosts::normalize(host),
                    run.run
                ),
                None => format!(
                    "egress to {} (any port) is not granted to run {} by any BrokerPolicy",
                    hosts::normalize(host),
                    run.run
                ),
            },
        }
    }
}
