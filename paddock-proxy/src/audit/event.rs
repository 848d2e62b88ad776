//! The audit record: one JSON object per line.

use std::fmt;
use std::net::SocketAddr;

use http::{Method, StatusCode, Uri, Version};
use serde::{Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::redact::{redact_placeholders, redacted_path};
use super::{AuditError, AuditKind, RequestOutcome};
use crate::policy::Mode;

/// How the recorded traffic reached the proxy: a connection's [`Mode`], or a query to its DNS
/// server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditMode {
    Transparent,
    Connect,
    PlainHttp,
    Dns,
}

impl AuditMode {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            AuditMode::Transparent => "transparent",
            AuditMode::Connect => "connect",
            AuditMode::PlainHttp => "plain_http",
            AuditMode::Dns => "dns",
        }
    }
}

impl From<Mode> for AuditMode {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Transparent => AuditMode::Transparent,
            Mode::Connect => AuditMode::Connect,
            Mode::PlainHttp => AuditMode::PlainHttp,
        }
    }
}

impl PartialEq<Mode> for AuditMode {
    fn eq(&self, other: &Mode) -> bool {
        *self == AuditMode::from(*other)
    }
}

impl fmt::Display for AuditMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The protocol label of a request record: `HTTP/1.1`, `HTTP/2`, ...
#[must_use]
pub fn protocol_label(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

/// The id of one agent connection: the `conn` field of every audit record of the connection
/// and of its log lines (its tracing span), so both can be joined. Unique within a process
/// (a counter) and unlikely to repeat across restarts (it starts at a random value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(u64);

impl ConnId {
    /// A new id, never handed out before by this process.
    #[must_use]
    pub fn next() -> Self {
        use std::hash::{BuildHasher as _, Hasher as _};
        use std::sync::OnceLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        static BASE: OnceLock<u64> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // The standard library's per-process random hash keys: random enough to tell two
        // runs' ids apart, without a dependency.
        let base = *BASE.get_or_init(|| {
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        });
        Self(base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)))
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Serialize for ConnId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One audit record. Serialised as one JSON object per line; absent fields are `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEvent {
    #[serde(serialize_with = "serialize_rfc3339")]
    pub ts: OffsetDateTime,
    pub run: String,
    /// The agent connection the record belongs to (none for DNS records).
    pub conn: Option<ConnId>,
    pub kind: AuditKind,
    /// The destination address (the original destination in transparent mode, the dialled
    /// address otherwise), when known.
    pub dst: Option<SocketAddr>,
    /// The destination port (known even when no address is).
    pub port: u16,
    /// The destination name: SNI, `CONNECT` host or `Host` header.
    pub sni: Option<String>,
    /// The policy rule that allowed the connection.
    pub rule: Option<String>,
    /// Why it was denied, or the `CONNECT` reason; for a request, why the proxy refused or
    /// failed it.
    pub reason: Option<String>,
    /// How the traffic arrived: a connection mode, or `dns` for the proxy's DNS server.
    pub mode: AuditMode,
    /// Request records: the method.
    pub method: Option<String>,
    /// Request records: the path, never the query string.
    pub path: Option<String>,
    /// Request records: the status the agent was answered with (the upstream's, or the
    /// proxy's own).
    pub status: Option<u16>,
    /// Request records: what the agent spoke (`HTTP/1.1`, `HTTP/2`).
    pub protocol: Option<&'static str>,
    /// Request records: the name of the credential substituted into the request.
    pub credential: Option<String>,
    /// Request records: the broker lease the substituted credential came from.
    pub lease_id: Option<String>,
    /// Request records: forwarded, denied or failed.
    pub outcome: Option<RequestOutcome>,
    /// Scrubbed records: how many secrets were replaced (where: in `reason`).
    pub scrubbed: Option<u64>,
}

impl AuditEvent {
    /// A new event stamped with the current time.
    #[must_use]
    pub fn new(
        kind: AuditKind,
        run: impl Into<String>,
        mode: impl Into<AuditMode>,
        port: u16,
    ) -> Self {
        Self {
            ts: OffsetDateTime::now_utc(),
            run: run.into(),
            conn: None,
            kind,
            dst: None,
            port,
            sni: None,
            rule: None,
            reason: None,
            mode: mode.into(),
            method: None,
            path: None,
            status: None,
            protocol: None,
            credential: None,
            lease_id: None,
            outcome: None,
            scrubbed: None,
        }
    }

    #[must_use]
    pub fn with_dst(mut self, dst: SocketAddr) -> Self {
        self.dst = Some(dst);
        self
    }

    /// The destination name; a placeholder in it is redacted.
    #[must_use]
    pub fn with_sni(mut self, sni: impl Into<String>) -> Self {
        self.sni = Some(redact_placeholders(sni.into()));
        self
    }

    #[must_use]
    pub fn with_rule(mut self, rule: impl Into<String>) -> Self {
        self.rule = Some(rule.into());
        self
    }

    /// The reason; a placeholder in it is redacted.
    #[must_use]
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(redact_placeholders(reason.into()));
        self
    }

    /// Sets method, path and protocol from the agent's request. Only the URI's path is kept
    /// (the query may carry a placeholder or a substituted secret), and a path segment holding
    /// a placeholder is redacted.
    #[must_use]
    pub fn with_request(mut self, method: &Method, uri: &Uri, version: Version) -> Self {
        // Methods are arbitrary tokens the agent picks, so a placeholder can hide there too.
        self.method = Some(redact_placeholders(method.as_str().to_owned()));
        self.path = Some(redacted_path(uri.path()));
        self.protocol = Some(protocol_label(version));
        self
    }

    #[must_use]
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status.as_u16());
        self
    }

    #[must_use]
    pub fn with_outcome(mut self, outcome: RequestOutcome) -> Self {
        self.outcome = Some(outcome);
        self
    }

    /// The substituted credential's name and lease id (names only, never values).
    #[must_use]
    pub fn with_credential(mut self, credential: Option<String>, lease_id: Option<String>) -> Self {
        self.credential = credential;
        self.lease_id = lease_id;
        self
    }

    /// The agent connection this record belongs to.
    #[must_use]
    pub fn with_conn(mut self, conn: ConnId) -> Self {
        self.conn = Some(conn);
        self
    }

    /// How many secrets a response had replaced.
    #[must_use]
    pub fn with_scrubbed(mut self, count: u64) -> Self {
        self.scrubbed = Some(count);
        self
    }

    /// The JSONL line for this event, newline included.
    pub fn to_line(&self) -> Result<Vec<u8>, AuditError> {
        let mut line = serde_json::to_vec(self).map_err(|e| AuditError::Encode(e.to_string()))?;
        line.push(b'\n');
        Ok(line)
    }
}

fn serialize_rfc3339<S: Serializer>(ts: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    let text = ts.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
    s.serialize_str(&text)
}
