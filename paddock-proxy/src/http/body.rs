//! The response body type the agent-facing server returns.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

/// Either a streamed upstream body (scrubbed or as-is) or a short body the proxy generated
/// itself.
///
/// Unsync because hyper's `Incoming` is only `Send`; the server never shares a body across
/// threads. The error is boxed: a scrubbed body can fail on its own (an undecodable
/// compressed stream), and any error resets the agent's stream.
pub type ProxyBody = UnsyncBoxBody<Bytes, crate::scrub::BodyError>;

/// A body from a fixed byte string (error pages, denial pages).
pub(crate) fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A streamed body forwarded as-is, frame by frame (data and trailers).
pub(crate) fn stream(body: hyper::body::Incoming) -> ProxyBody {
    body.map_err(crate::scrub::BodyError::Upstream)
        .boxed_unsync()
}
