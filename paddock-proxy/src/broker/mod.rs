//! The proxy's client of the credential broker (`paddock-broker`).
//!
//! * [`BrokerClient`]: the broker API over a small keep-alive pool, through any
//!   [`BrokerConnector`]: HTTPS (TLS 1.3, only the configured CA trusted) or a broker embedded
//!   in the same process. Authenticated by a bearer read from a file (re-read when the file
//!   changes) or held in memory, and/or a TLS client certificate. Every call has a deadline
//!   (5 s by default).
//! * [`BrokerPolicy`]: the [`crate::policy::EgressPolicy`] answered by
//!   `POST /v1/validate-egress`. The caller asks once per agent connection; the DNS server
//!   asks it (without a port) per name.
//! * [`BrokerSubstituter`]: the [`crate::http::Substituter`] answered by
//!   `POST /v1/substitute-auth` for requests that carry a placeholder (the broker checks
//!   egress on that call), or by a [`GrantCache`]: answers the broker granted for reuse,
//!   taken back over its invalidation stream before a revoke, a run's end or a policy change
//!   returns (see [`grants`]). Requests without one and open tunnels are re-checked by
//!   [`crate::policy::EgressRecheck`] over the [`BrokerPolicy`] once the destination's last
//!   answer is older than the interval.
//!
//! Everything fails closed: a broker error or timeout denies the connection (policy) or
//! answers the request without forwarding it (substitution). Connection decisions are never
//! cached, so a policy change applies to the next connection; reused substitutions are
//! dropped before the change is reported done; the re-check keeps each destination's answer
//! for its interval (250 ms by default) and the DNS server each name's for its
//! `policy_cache` (250 ms by default), so those lag a policy change by at most that.
//!
//! Secrets (the proxy's bearer, substituted credentials) never appear in `Debug` output,
//! errors or logs; substituted header values are marked sensitive.

mod client;
mod connector;
mod credentials;
pub mod grants;
mod policy;
pub(crate) mod substitute;

#[cfg(test)]
mod tests;

/// Kept here for callers that configure the broker; the re-check itself is the policy's
/// ([`crate::policy::EgressRecheck`]).
pub use crate::policy::DEFAULT_EGRESS_RECHECK;
pub use client::{
    BrokerCallError, BrokerClient, BrokerClientConfig, BrokerConfigError, DEFAULT_BEARER_MAX_AGE,
    DEFAULT_MAX_IDLE, DEFAULT_TIMEOUT,
};
pub use connector::{BrokerConnectError, BrokerConnector, BrokerIo, BrokerStream, ConnectFuture};
pub use credentials::{BrokerBearer, ClientCertFiles, CredentialError, jwt_expiry};
pub use grants::GrantCache;
pub use policy::BrokerPolicy;
pub use substitute::BrokerSubstituter;
