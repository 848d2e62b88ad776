//! The HTTP request loop that runs inside an intercepted (or plain) agent connection.
//!
//! Everything here works on generic byte streams: the TLS layer hands over an already
//! decrypted stream plus the ALPN it negotiated with the agent, and the upstream side is
//! reached through an [`UpstreamConnector`] that dials and handshakes. That keeps this
//! module testable with loopback TCP and in-memory pipes, without root or certificates.
//!
//! Per request: hop-by-hop headers are dropped ([`hop`]), the request's authority must
//! name the connection's destination (else 421), the [`Substituter`] hook may swap
//! placeholders for real credentials, then the request is forwarded over a pooled
//! upstream connection ([`UpstreamPool`]) and the response streamed back, scrubbed of every
//! secret this run has sent to the destination ([`crate::scrub`]). Any failure
//! answers the agent with one deliberate status ([`HttpError::status`]); nothing is ever
//! forwarded when a step before forwarding failed. Every request that reaches the loop is
//! audited once its status is decided ([`RequestAudit`]).

mod affinity;
mod audit;
pub(crate) mod authority;
mod body;
mod deny;
mod error;
mod forward;
mod graceful;
pub mod hop;
mod limits;
mod park;
pub(crate) mod quiet;
mod substitute;
mod timer;
mod upgrade;
mod upstream;

#[cfg(test)]
mod affinity_tests;
#[cfg(test)]
mod park_tests;
#[cfg(test)]
mod scrub_tests;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;

pub use audit::RequestAudit;
pub use body::ProxyBody;
pub use deny::{denial_response, serve_denial};
pub use error::{ConnectError, DENIED_HEADER, HttpError};
pub use forward::{serve_connection, serve_connection_until};
pub use limits::HttpLimits;
pub use park::{Tracked, UpstreamBody};
pub use substitute::{
    Hold, NoopSubstituter, RequestHead, SubstituteError, Substituted, Substituter,
};
pub use upstream::{UpstreamConnector, UpstreamIo, UpstreamPool, UpstreamStream, UpstreamTarget};

/// A boxed, sendable future; the async trait methods of this module return it so the traits
/// stay object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// ALPN protocol id for HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// What the request loop knows about the connection a request arrived on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestContext {
    /// The run (workload) the agent connection belongs to.
    pub run: String,
    /// The destination host the connection was allowed for (the SNI, or the `Host` of a
    /// plain-HTTP connection). Requests naming another authority are refused.
    pub host: String,
    /// The destination port.
    pub port: u16,
    /// The SNI the agent sent; `None` means the agent connection is plain HTTP, so the
    /// upstream is dialled without TLS as well.
    pub sni: Option<String>,
}

impl RequestContext {
    /// Whether the upstream leg uses TLS: it mirrors the agent leg.
    #[must_use]
    pub fn upstream_tls(&self) -> bool {
        self.sni.is_some()
    }
}
