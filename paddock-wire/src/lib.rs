//! What Paddock's proxy and broker say to each other, defined once.
//!
//! * [`api`]: the broker's HTTP/JSON API types (requests, answers, error codes, paths).
//! * [`placeholder`]: the `pdk-<kind>-<48 hex>` format the agent holds instead of a
//!   credential: generating, recognising, finding and redacting it.
//! * [`codec`]: the encodings a placeholder hides in (Basic credentials, query strings,
//!   percent-encoding), decoded the same way on both sides.
//!
//! Depends on serde and a few small codecs, nothing of either side's runtime, so the proxy's
//! data plane can use it without linking the broker.

#![forbid(unsafe_code)]

pub mod api;
pub mod codec;
pub mod placeholder;
