//! Audit records of connection decisions and of every HTTP request.
//!
//! Every connection decision (allow, deny, discovery), every cooperative-mode `CONNECT`
//! reason, every HTTP request served inside an allowed connection, every DNS query the proxy's
//! DNS server refused on policy grounds (`dns_deny`) and a once-a-second summary of the queries
//! its rate limit refused (`dns_rate_limited`, see [`crate::dns`]) is written as one
//! [`AuditEvent`] to an [`AuditSink`]: a JSONL file ([`JsonlFileSink`], appended, one line per
//! event written and flushed before `record` returns, created `0600`), standard output
//! ([`StdoutSink`]), or nothing at all ([`NoAudit`]), which must be chosen explicitly
//! (`--audit none`): there is no default sink.
//!
//! # Request records
//!
//! A [`AuditKind::Request`] record is written once per request, as soon as the status the
//! agent gets is decided (the upstream's response head arrived, or the proxy answered
//! itself), not when the body ends: streams, server-sent events and upgraded tunnels may
//! never end. A WebSocket upgrade is recorded with status 101. It carries the method, the
//! path (never the query string, which may hold a placeholder or a substituted secret:
//! [`AuditEvent::with_request`] takes the URI and keeps only its path), the status, the
//! protocol the agent spoke, the [`RequestOutcome`], a reason when the proxy refused or
//! failed, and the name and lease id of the credential substituted, if any. Header values,
//! the query and bodies are never recorded.
//!
//! Requests that HTTP parsing rejects before they are requests (oversized or malformed
//! heads, answered 431/400 by hyper, or an HTTP/2 connection error) reach no request loop
//! and get no request record.
//!
//! The agent may still put a placeholder where nothing is substituted (the path, an SNI, a
//! `Host` that ends up in a reason): a well-formed placeholder is written as `[redacted]`
//! wherever it appears in the path (a whole path segment, also when percent-encoded), the
//! destination name or the reason.
//!
//! # Scrubbed records
//!
//! A [`AuditKind::Scrubbed`] record says a response from a host that was sent a secret had
//! that secret (in some encoding) replaced by the agent's placeholder: once for the headers
//! and once when the body or the WebSocket message ends, with the number replaced in
//! `scrubbed`, where in `reason`, and the request's method, path and credential. The data is
//! scrubbed whether or not the record can be written, so a failed write is only counted.
//!
//! # The caller's rule
//!
//! Use [`audit_decision`] rather than calling [`AuditSink::record`] directly. When a write fails:
//!
//! * on the **deny** path (and for a `CONNECT` reason, which has to be on record before the
//!   tunnel opens) the connection is dropped (reset, no 403 page): an unrecorded denial must not
//!   look like a clean answer; a `dns_deny` that cannot be written leaves the query unanswered;
//! * for a **request the proxy answered itself** (outcome `denied` or `failed`: substitution
//!   refused, broker unavailable, misdirected request, upstream unreachable, ...) the answer is
//!   not sent: the HTTP/2 stream is reset (`INTERNAL_ERROR`) or the HTTP/1.1 connection is
//!   closed without a response, for the same reason;
//! * on the **allow** and **discovery** paths, and for a **forwarded** request (the upstream's
//!   response is relayed), the failure is counted
//!   (`paddock_proxy_audit_write_failures_total{kind}`) and logged, and the connection or
//!   request proceeds, so a full disk degrades auditing rather than taking the workload down.
//!
//! Sinks write synchronously: a JSONL line is a few hundred bytes and one `write(2)` on an
//! `O_APPEND` file, cheaper than handing it to another task.

mod error;
mod event;
mod observed;
mod redact;
mod rule;
mod sink;
mod target;

#[cfg(test)]
mod tests;

pub use crate::labels::{AuditKind, RequestOutcome};
pub use error::AuditError;
pub use event::{AuditEvent, AuditMode, ConnId, protocol_label};
pub use observed::{AuditObserver, ObservedSink};
pub(crate) use redact::{redact_placeholders, redacted_path};
pub use rule::{AuditOutcome, audit_decision};
#[cfg(test)]
pub(crate) use sink::MemorySink;
#[cfg(test)]
use sink::{AppendTarget, Appender};
pub use sink::{AuditSink, JsonlFileSink, NoAudit, StdoutSink};
pub use target::AuditTarget;
