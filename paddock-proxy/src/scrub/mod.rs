//! Response scrubbing: a secret the proxy put into a request never comes back to the agent.
//!
//! An allowed credential host may reflect what it was sent: a debug echo endpoint, an error
//! message quoting the key, a redirect carrying it. Once a secret has been substituted into a
//! request to a host, every later response from that host to the same run ([`ScrubRegistry`])
//! has the secret replaced by the agent's placeholder in every form a server is likely to write
//! it ([`forms`]: raw, JSON-escaped, percent-encoded, hex, base64 and base64url at any
//! alignment): in headers and trailers, in bodies as they stream ([`ScrubBody`], matches across
//! chunk and frame boundaries, bounded memory, HTTP/1.1, HTTP/2, SSE), and in WebSocket
//! messages ([`websocket`]). Requests to such a host are prepared so the answer stays readable
//! ([`prepare_request`]): no compression negotiated, no byte ranges (a range could cut a secret
//! into pieces no pattern matches), no WebSocket extensions.
//!
//! What it does not cover, by construction: a secret the upstream transforms in other ways
//! (encrypted, hashed, split, reversed), and fragments of a secret shorter than the whole
//! (a stream cut inside a secret is handled, see [`matcher`]). Bodies in a binary framing
//! (gRPC, protobuf) are scrubbed as bytes: a replacement there changes a length the framing
//! declares, which breaks that message rather than leaking the secret.

pub mod body;
pub mod forms;
pub mod matcher;
pub mod registry;
pub mod websocket;

use http::{HeaderMap, HeaderValue, header};

pub use body::{BodyError, Encoding, ScrubBody, UnreadableEncoding, scrub_headers};
pub use matcher::{BuildError, ScrubStream, Scrubber, SecretPair, UNKNOWN_PLACEHOLDER};
pub use registry::ScrubRegistry;

/// Rewrites a request to a host that holds secrets so that its response can be scrubbed:
/// `Accept-Encoding: identity`, no `Range`/`If-Range`, no gRPC message compression and no
/// WebSocket extensions.
pub fn prepare_request(headers: &mut HeaderMap) {
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    headers.remove(header::RANGE);
    headers.remove(header::IF_RANGE);
    headers.remove("grpc-accept-encoding");
    headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
}

/// Whether a response declares a gRPC message encoding other than identity (the scrubber
/// cannot read compressed messages).
#[must_use]
pub fn grpc_compressed(headers: &HeaderMap) -> Option<String> {
    headers
        .get("grpc-encoding")
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|v| !v.is_empty() && v != "identity")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_requests_ask_for_readable_whole_answers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, br"),
        );
        h.insert(header::RANGE, HeaderValue::from_static("bytes=0-9"));
        h.insert(header::IF_RANGE, HeaderValue::from_static("\"etag\""));
        h.insert("grpc-accept-encoding", HeaderValue::from_static("gzip"));
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate"),
        );
        h.insert("x-other", HeaderValue::from_static("kept"));
        prepare_request(&mut h);
        assert_eq!(h[header::ACCEPT_ENCODING], "identity");
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-other"], "kept");
    }

    #[test]
    fn compressed_grpc_messages_are_detected() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_compressed(&h), None);
        h.insert("grpc-encoding", HeaderValue::from_static("identity"));
        assert_eq!(grpc_compressed(&h), None);
        h.insert("grpc-encoding", HeaderValue::from_static("gzip"));
        assert_eq!(grpc_compressed(&h).as_deref(), Some("gzip"));
    }
}
