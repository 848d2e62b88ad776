//! The proxy's client of the credential broker (`paddock-broker`).
//!
//! * [`BrokerClient`]: HTTPS (TLS 1.3, only the configured CA trusted) to the broker API over
//!   a small keep-alive pool, authenticated by a bearer read from a file (re-read when the file
//!   changes) and/or a TLS client certificate. Every call has a deadline (5 s by default).
//! * [`BrokerPolicy`]: the [`crate::policy::EgressPolicy`] answered by
//!   `POST /v1/validate-egress`. The caller asks once per agent connection.
//! * [`BrokerSubstituter`]: the [`crate::http::Substituter`] answered by
//!   `POST /v1/substitute-auth`, per request that carries a placeholder.
//!
//! Everything fails closed: a broker error or timeout denies the connection (policy) or
//! answers the request without forwarding it (substitution). Nothing the broker says is
//! cached, so a revoked lease or a policy change applies to the next request that presents a
//! placeholder and to the next connection.
//!
//! Secrets (the proxy's bearer, substituted credentials) never appear in `Debug` output,
//! errors or logs; substituted header values are marked sensitive.

mod client;
mod credentials;
mod local;
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
pub use credentials::{ClientCertFiles, CredentialError};
pub use policy::BrokerPolicy;
pub use substitute::BrokerSubstituter;
