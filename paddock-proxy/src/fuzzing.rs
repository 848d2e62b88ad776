//! Entry points for the `cargo fuzz` targets in `fuzz/` (not an API; hidden from docs).
//!
//! The parsers that read an agent's bytes are private to their modules. These thin wrappers
//! call the very same functions, so the fuzz targets exercise what the data path runs and
//! survive refactors of the modules' internals.

use http::request::Parts;
use paddock_wire::api::{SubstituteAuthRequest, SubstituteAuthResponse};

use crate::http::{RequestContext, RequestHead};

/// `host:port` of a `CONNECT` target, as the cooperative listener reads it.
#[must_use]
pub fn connect_authority(target: &str) -> Option<(&str, u16)> {
    crate::proxy::connect::parse_authority(target)
}

/// The host of a plain-HTTP `Host` header value, as the plain listener reads it.
#[must_use]
pub fn host_of(value: &str) -> Option<&str> {
    crate::proxy::head::host_of(value)
}

/// What the forwarding path does with a request's authority: the authority the agent named
/// (`Err` is the HTTP status of the refusal), whether it matches `ctx` (421 otherwise) and the
/// upstream URI the request would be sent to.
pub fn authority(parts: &Parts, ctx: &RequestContext) -> Result<http::Uri, u16> {
    let status = |e: crate::http::HttpError| e.status().as_u16();
    let authority = crate::http::authority::request_authority(parts).map_err(status)?;
    crate::http::authority::check(&authority, ctx).map_err(status)?;
    crate::http::authority::upstream_uri(ctx, parts).map_err(status)
}

/// Whether the proxy would ask the broker to substitute this request.
pub fn carries_placeholder(parts: &mut Parts) -> bool {
    crate::broker::substitute::carries_placeholder(&RequestHead::new(parts))
}

/// Whether the proxy's last check would refuse to forward this request (a well-formed
/// placeholder is still in it).
pub fn still_holds_placeholder(parts: &mut Parts) -> bool {
    crate::broker::substitute::ensure_no_placeholder(&RequestHead::new(parts)).is_err()
}

/// The key a reused grant would be filed under, if the request may reuse one.
pub fn grant_key(parts: &mut Parts, ctx: &RequestContext) -> Option<Box<[u8]>> {
    crate::broker::grants::grant_key(&RequestHead::new(parts), ctx, None)
}

/// The substitute-auth request the proxy would send the broker for this request.
pub fn wire_request(parts: &mut Parts, ctx: &RequestContext) -> SubstituteAuthRequest {
    crate::broker::substitute::wire_request(&RequestHead::new(parts), ctx)
}

/// Applies a broker answer to the request as the proxy does (all or nothing).
pub fn apply_answer(parts: &mut Parts, answer: &SubstituteAuthResponse) -> Result<(), String> {
    crate::broker::substitute::apply(&mut RequestHead::new(parts), answer)
        .map_err(|e| e.to_string())
}

/// The decoded `user:password` of a `Basic` credential, as the proxy's scanner decodes it.
#[must_use]
pub fn basic_credentials(value: &[u8]) -> Option<Vec<u8>> {
    crate::broker::substitute::basic_credentials(value)
}

/// The audit log's placeholder redaction of free text.
#[must_use]
pub fn redact_placeholders(text: String) -> String {
    crate::audit::redact_placeholders(text)
}

/// The audit log's placeholder redaction of a request path.
#[must_use]
pub fn redacted_path(path: &str) -> String {
    crate::audit::redacted_path(path)
}
