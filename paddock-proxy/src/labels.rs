//! Decision and outcome labels: the words the proxy's metrics, audit records and logs use.
//!
//! A leaf module (it imports nothing from the crate), so everything that counts, records or
//! reports a decision (metrics, audit, net, tls, the listeners) can depend on it without
//! depending on each other.

use std::fmt::{self, Write as _};

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use serde::Serialize;

macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident {
        $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, for pre-registration.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label value.
            #[must_use]
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    };
}

label_enum!(
    /// Why a connection was refused before reaching the request loop.
    Rejection {
        CapExceeded => "cap_exceeded",
        DeniedCidr => "denied_cidr",
        DnsRebindingMismatch => "dns_rebinding_mismatch",
        DnsFailed => "dns_failed",
        HandshakeFailed => "handshake_failed",
        /// A transparent connection whose original destination could not be recovered (not
        /// redirected, or its entry evicted from the eBPF maps): reset, never guessed.
        NoOriginalDst => "no_original_dst",
        NoSni => "no_sni",
        PolicyDenied => "policy_denied",
    }
);

label_enum!(
    /// What the proxy's DNS server did with one datagram (see [`crate::dns`]).
    DnsOutcome {
        /// NOERROR with addresses.
        Answered => "answered",
        /// NOERROR without answers: another query type, or no usable address of the type.
        NoData => "nodata",
        /// NXDOMAIN because the run may not reach the name (or it is too long or malformed).
        Denied => "denied",
        /// NXDOMAIN from upstream for an allowed name.
        NxDomain => "nxdomain",
        /// SERVFAIL: the allowed name could not be resolved.
        ServFail => "servfail",
        /// SERVFAIL: the egress policy could not answer (fail closed).
        PolicyUnavailable => "policy_unavailable",
        /// REFUSED by the rate limit.
        RateLimited => "rate_limited",
        /// FORMERR: unparsable, or not exactly one question.
        FormErr => "formerr",
        /// NOTIMP: not a standard query, or not class IN.
        NotImp => "notimp",
        /// Not answered: too short to answer, a response, too many in flight, or its denial
        /// could not be audited.
        Dropped => "dropped",
    }
);

label_enum!(
    /// The policy outcome of a connection.
    DecisionLabel {
        Allow => "allow",
        Deny => "deny",
        Discovery => "discovery",
        Passthrough => "passthrough",
    }
);

label_enum!(
    /// Which TLS handshake failed.
    Leg {
        Agent => "agent",
        Upstream => "upstream",
    }
);

label_enum!(
    /// Which way bytes flowed.
    Direction {
        AgentToUpstream => "agent_to_upstream",
        UpstreamToAgent => "upstream_to_agent",
    }
);

label_enum!(
    /// Where in a response a secret was found and replaced.
    ScrubLocation {
        Headers => "headers",
        Body => "body",
        WebSocket => "websocket",
    }
);

/// What an audit event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    Allow,
    Deny,
    Discovery,
    /// An allowed connection relayed without terminating its TLS (a `passthrough` rule).
    Passthrough,
    /// The reason a cooperative-mode client gave for its `CONNECT`, logged at tunnel start.
    ConnectReason,
    /// One HTTP request inside an allowed connection, recorded once its status is decided.
    Request,
    /// A response (headers, body or WebSocket messages) had substituted secrets replaced by
    /// their placeholder before the agent saw it.
    Scrubbed,
    /// A DNS query the proxy's DNS server did not answer with addresses because of policy: a
    /// name the run may not reach (NXDOMAIN), a name too long or malformed, or a policy that
    /// could not answer (SERVFAIL). `sni` holds the queried name.
    DnsDeny,
    /// Summary of the DNS queries refused by the rate limit since the last summary (at most
    /// one per second, so a flood cannot flood the audit trail); `reason` says how many.
    DnsRateLimited,
}

impl AuditKind {
    /// Every kind, for metric pre-registration.
    pub const ALL: &'static [AuditKind] = &[
        AuditKind::Allow,
        AuditKind::Deny,
        AuditKind::Discovery,
        AuditKind::Passthrough,
        AuditKind::ConnectReason,
        AuditKind::Request,
        AuditKind::Scrubbed,
        AuditKind::DnsDeny,
        AuditKind::DnsRateLimited,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Allow => "allow",
            AuditKind::Deny => "deny",
            AuditKind::Discovery => "discovery",
            AuditKind::Passthrough => "passthrough",
            AuditKind::ConnectReason => "connect_reason",
            AuditKind::Request => "request",
            AuditKind::Scrubbed => "scrubbed",
            AuditKind::DnsDeny => "dns_deny",
            AuditKind::DnsRateLimited => "dns_rate_limited",
        }
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for AuditKind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

/// What became of a request ([`AuditKind::Request`] records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestOutcome {
    /// Sent upstream; the agent got the upstream's response (or a 101 and a tunnel).
    Forwarded,
    /// Refused by the proxy because of what it asked for (substitution refused, another
    /// authority, `CONNECT`, a denied upstream address): not forwarded.
    Denied,
    /// The proxy could not serve it (broker unavailable, a substitution that cannot be
    /// applied, upstream unreachable, timed out or broken); answered by the proxy.
    Failed,
    /// The agent went away (stream reset, connection closed) before an answer was decided.
    /// The request may already have reached upstream, with any credential substituted into
    /// it: the record says which, so cancelling a request does not hide that it was made.
    Abandoned,
}

impl RequestOutcome {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Forwarded => "forwarded",
            RequestOutcome::Denied => "denied",
            RequestOutcome::Failed => "failed",
            RequestOutcome::Abandoned => "abandoned",
        }
    }
}

impl fmt::Display for RequestOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
