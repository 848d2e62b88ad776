//! Admission: the one sequence every listener runs once it knows the destination name.
//!
//! decide (the [`crate::policy::EgressPolicy`], fail closed) -> on a deny, audit it and reset,
//! or let the listener answer it -> vet the addresses ([`crate::net::Vetter`]) -> on a refusal,
//! audit it and reset -> audit the admission. Transparent TLS, CONNECT and plain HTTP differ
//! only in how the addresses are vetted and how a denial is answered.

use std::net::IpAddr;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{ConnInfo, Pipeline, reset};
use crate::audit::AuditOutcome;
use crate::labels::Rejection;
use crate::policy::Decision;

/// How a connection's addresses are vetted.
#[derive(Debug, Clone, Copy)]
pub(super) enum Vet {
    /// The agent chose this address (transparent modes): it must be one the name resolves to.
    OriginalDst(IpAddr),
    /// Only a name is known (CONNECT): the proxy resolves it and dials what it vetted.
    Name,
}

/// What admission decided.
#[derive(Debug)]
pub(super) enum Admission {
    /// Allowed (or discovery) and vetted, and audited as such.
    Admitted {
        /// The normalised host name the connection was allowed for.
        host: String,
        /// The vetted addresses to dial (for transparent modes the original destination
        /// first).
        addrs: Vec<IpAddr>,
        /// Relay the connection's TLS as it is (a passthrough rule) instead of terminating it.
        passthrough: bool,
    },
    /// Denied by the policy and audited; the connection is still open for the listener to
    /// answer (a 403 page or status line).
    Denied { reason: String },
    /// Refused, audited and reset: nothing is left to do.
    Refused,
}

impl Pipeline {
    /// Runs admission for a connection to `name` (`info` says how it arrived). `stream` is
    /// the agent's socket, reset on a refusal. With `answer_denials` a policy denial whose
    /// record was written is handed back ([`Admission::Denied`]) for the listener to answer;
    /// without, or when it could not be recorded, the connection is reset.
    pub(super) async fn admission(
        &self,
        stream: &TcpStream,
        info: &ConnInfo<'_>,
        name: &str,
        vet: Vet,
        answer_denials: bool,
        deadline: Instant,
    ) -> Admission {
        let (host, decision) = self.decide(name, info.port, info.mode).await;
        let host = match (host, &decision) {
            (
                Some(host),
                Decision::Allow { .. } | Decision::Discovery { .. } | Decision::Passthrough { .. },
            ) => host,
            (_, d) => {
                let reason = match d {
                    Decision::Deny { reason } => reason.clone(),
                    _ => "invalid host name".to_owned(),
                };
                if self.refuse(info, Rejection::PolicyDenied, &reason)
                    == AuditOutcome::DropConnection
                    || !answer_denials
                {
                    reset(stream);
                    return Admission::Refused;
                }
                return Admission::Denied { reason };
            }
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let vetting = async {
            match vet {
                Vet::OriginalDst(ip) => self.vetter.vet_transparent(&host, ip).await,
                Vet::Name => self.vetter.vet_name(&host).await,
            }
        };
        let vetted = match tokio::time::timeout(remaining, vetting).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let _ = self.refuse(info, e.rejection(), &e.to_string());
                reset(stream);
                return Admission::Refused;
            }
            Err(_) => {
                let _ = self.refuse(info, Rejection::DnsFailed, "name resolution timed out");
                reset(stream);
                return Admission::Refused;
            }
        };
        for filtered in &vetted.filtered {
            tracing::debug!(%filtered, "resolved address removed by the denied-CIDR set");
        }
        self.admit(info, &decision);
        Admission::Admitted {
            host,
            addrs: vetted.addrs,
            passthrough: matches!(decision, Decision::Passthrough { .. }),
        }
    }
}
