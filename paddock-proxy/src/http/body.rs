//! The response body type the agent-facing server returns.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

/// Either a streamed upstream body or a short body the proxy generated itself.
///
/// Unsync because hyper's `Incoming` is only `Send`; the server never shares a body across
/// threads.
pub type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// A body from a fixed byte string (error pages, denial pages).
pub(crate) fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A streamed body forwarded as-is, frame by frame (data and trailers).
pub(crate) fn stream(body: hyper::body::Incoming) -> ProxyBody {
    body.boxed_unsync()
}
