//! TLS interception: reading the agent's `ClientHello`, the per-run CA, forged leaves, the
//! agent-facing rustls server and the upstream rustls client.
//!
//! # How a connection uses this module
//!
//! 1. [`peek_client_hello`] reads the hello without consuming it; no SNI means deny.
//! 2. Policy and DNS checks run on the SNI (elsewhere).
//! 3. The upstream leg goes first: [`UpstreamTls::connect`] offers upstream the protocols the
//!    agent offered ([`UpstreamAlpn::from_agent_offer`]) and reports what upstream chose.
//! 4. The agent leg is accepted with [`MitmServer::server_config_for_alpn`] (or
//!    [`MitmServer::accept`]) given [`agent_alpn_for`] of the upstream choice, so the agent is
//!    offered exactly what upstream accepted ("offer the agent what upstream accepts"). The
//!    leaf for the SNI comes from the shared [`LeafCache`] inside the certificate resolver.
//!
//! Every failure is an error: there is no fallback to plain relaying or to an unverified
//! upstream.

mod ca;
mod client_hello;
mod forge;
mod leaf_cache;
pub mod node_ca;
mod server;
mod upstream;

#[cfg(test)]
mod test_support;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use ca::{CA_CERT_FILE, CA_KEY_FILE, GeneratedCa, RunCa};
pub use client_hello::{
    ClientHello, EchKind, HelloError, is_grease, parse_client_hello, peek_client_hello,
};
pub use forge::{
    Clock, ForgeBench, ForgedLeaf, LeafForger, LeafName, LeafValidity, SystemClock, bench_forge,
};
pub use leaf_cache::{DEFAULT_LEAF_CACHE_CAPACITY, LeafCache, LeafCacheConfig, LeafCacheStats};
pub use server::{ALPN_H2, ALPN_HTTP11, MitmServer, agent_alpn_for, agent_facing_provider};
pub use upstream::{UpstreamAlpn, UpstreamConnection, UpstreamTls, connect_upstream};

/// Which side of the proxy a TLS handshake failed on (for metrics and audit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// The agent connecting to the proxy.
    Agent,
    /// The proxy connecting to the real destination.
    Upstream,
}

impl std::fmt::Display for Leg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Leg::Agent => "agent",
            Leg::Upstream => "upstream",
        })
    }
}

/// Errors of the TLS layer. Each one means the connection (or start-up) is refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {what} {}: {source}", path.display())]
    WriteFile {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A PEM file had no usable content of the expected kind.
    #[error("invalid PEM in {what}: {reason}")]
    InvalidPem { what: String, reason: String },
    /// The CA certificate cannot sign leaves.
    #[error("unusable CA certificate: {0}")]
    InvalidCa(String),
    /// The CA private key cannot be used or does not belong to the certificate.
    #[error("unusable CA private key: {0}")]
    InvalidCaKey(String),
    /// The CA is outside its validity period, so every forged leaf would be rejected.
    #[error("the run CA is not valid at this time (valid {not_before} .. {not_after})")]
    CaNotValidNow {
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    },
    /// The forging CA was revoked by its issuer and no replacement could be had yet.
    #[error("the forging CA was revoked and not yet replaced")]
    CaWithdrawn,
    /// The name cannot go into a certificate (not a DNS name or IP address).
    #[error("invalid name for a forged certificate: {0:?}")]
    InvalidLeafName(String),
    /// rcgen failed to build or sign a certificate.
    #[error("certificate generation for {name}: {source}")]
    Forge { name: String, source: rcgen::Error },
    /// Another connection was forging the same leaf and did not finish in time.
    #[error("timed out after {waited:?} waiting for the leaf for {name}")]
    ForgeWaitTimeout { name: String, waited: Duration },
    /// rustls refused a configuration or key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The bytes on the socket are not a usable `ClientHello`.
    #[error(transparent)]
    Hello(#[from] HelloError),
    /// The `ClientHello` is larger than the configured buffer.
    #[error("ClientHello larger than {limit} bytes")]
    HelloTooLarge { limit: usize },
    /// The client did not send a complete `ClientHello` in time.
    #[error("no complete ClientHello within {0:?}")]
    HelloTimeout(Duration),
    /// The client closed before sending a complete `ClientHello`.
    #[error("peer closed after {received} bytes, before a complete ClientHello")]
    HelloEof { received: usize },
    /// The upstream name is neither a DNS name nor an IP address.
    #[error("invalid upstream server name {0:?}")]
    InvalidServerName(String),
    /// A TLS handshake failed (certificate rejected, protocol mismatch, I/O).
    #[error("TLS handshake with {leg} failed: {source}")]
    Handshake { leg: Leg, source: io::Error },
    /// Socket I/O failed.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

impl TlsError {
    /// The leg whose handshake failed, for "handshake failures by leg" metrics.
    #[must_use]
    pub fn handshake_leg(&self) -> Option<Leg> {
        match self {
            TlsError::Handshake { leg, .. } => Some(*leg),
            _ => None,
        }
    }
}
