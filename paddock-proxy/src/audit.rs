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

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use http::{Method, StatusCode, Uri, Version};
use percent_encoding::percent_decode_str;
use serde::{Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use paddock_wire::placeholder;

use crate::metrics::ProxyMetrics;
use crate::policy::Mode;

pub use crate::labels::{AuditKind, RequestOutcome};

/// The fail-closed rule of each kind.
impl AuditKind {
    /// Whether a failed write of this kind always drops the connection (see the module docs).
    /// For [`AuditKind::Request`] it depends on the outcome: see [`AuditEvent::fails_closed`].
    #[must_use]
    pub fn fails_closed(self) -> bool {
        matches!(
            self,
            AuditKind::Deny | AuditKind::ConnectReason | AuditKind::DnsDeny
        )
    }
}

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

/// One audit record. Serialised as one JSON object per line; absent fields are `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEvent {
    #[serde(serialize_with = "serialize_rfc3339")]
    pub ts: OffsetDateTime,
    pub run: String,
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

    /// How many secrets a response had replaced.
    #[must_use]
    pub fn with_scrubbed(mut self, count: u64) -> Self {
        self.scrubbed = Some(count);
        self
    }

    /// Whether a failed write of this event must stop what it records (see the module docs):
    /// denials, `CONNECT` reasons and requests the proxy answered itself. A request record
    /// without an outcome counts as answered by the proxy.
    #[must_use]
    pub fn fails_closed(&self) -> bool {
        match self.kind {
            // Only answers the proxy gives itself can be withheld; there is nothing to
            // withhold from a forwarded or abandoned request.
            AuditKind::Request => !matches!(
                self.outcome,
                Some(RequestOutcome::Forwarded | RequestOutcome::Abandoned)
            ),
            kind => kind.fails_closed(),
        }
    }

    /// The JSONL line for this event, newline included.
    pub fn to_line(&self) -> Result<Vec<u8>, AuditError> {
        let mut line = serde_json::to_vec(self).map_err(|e| AuditError::Encode(e.to_string()))?;
        line.push(b'\n');
        Ok(line)
    }
}

/// What a redacted placeholder is written as.
const REDACTED: &str = placeholder::REDACTED;

/// `text` with every placeholder (and whatever is glued to it) written as `[redacted]`
/// ([`paddock_wire::placeholder::redact`]).
pub(crate) fn redact_placeholders(text: String) -> String {
    match placeholder::redact(&text) {
        std::borrow::Cow::Borrowed(_) => text,
        std::borrow::Cow::Owned(redacted) => redacted,
    }
}

/// `path` with every segment that holds a placeholder, as is or percent-encoded, replaced by
/// `[redacted]`.
pub(crate) fn redacted_path(path: &str) -> String {
    if !path.contains(placeholder::MARKER) && !path.contains('%') {
        return path.to_owned();
    }
    let holds_placeholder = |segment: &str| {
        let decoded = percent_decode_str(segment).decode_utf8_lossy().into_owned();
        redact_placeholders(decoded.clone()) != decoded
    };
    path.split('/')
        .map(|segment| {
            if holds_placeholder(segment) {
                REDACTED
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn serialize_rfc3339<S: Serializer>(ts: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    let text = ts.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
    s.serialize_str(&text)
}

/// An audit record could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot write audit record to {target}: {source}")]
    Write { target: String, source: io::Error },
    #[error("cannot encode audit record: {0}")]
    Encode(String),
    #[error("audit sink is unusable after a panic in another writer")]
    Poisoned,
    #[error(
        "invalid --audit value {0:?}: use \"none\", \"stdout\", \"file:PATH\" or an absolute path"
    )]
    BadTarget(String),
}

/// Where audit records go.
pub trait AuditSink: Send + Sync + fmt::Debug {
    /// Writes one record durably enough that a crash right after loses nothing already
    /// returned `Ok` (flushed to the kernel).
    fn record(&self, ev: &AuditEvent) -> Result<(), AuditError>;

    /// Whether this sink discards everything ([`NoAudit`]).
    fn is_disabled(&self) -> bool {
        false
    }

    /// Reopens the sink's file after it was rotated away (`SIGHUP` from logrotate); sinks
    /// without a file have nothing to do.
    fn reopen(&self) -> Result<(), AuditError> {
        Ok(())
    }
}

/// Appends JSON lines to a file opened `0600`, `O_APPEND`, never through a symlink.
///
/// A record is appended whole or not at all: a write that fails part way (the disk filled up
/// mid-line) has its bytes cut off the end of the file again, so the trail never holds a torn
/// record, and the first record written once there is space again is not glued onto one (which
/// would make it unreadable while the proxy counts it as written).
#[derive(Debug)]
pub struct JsonlFileSink {
    path: PathBuf,
    file: Mutex<Appender<File>>,
}

/// What [`Appender`] needs of its file: appending, and cutting bytes off its end again.
trait AppendTarget: Write {
    fn cut_end(&mut self, bytes: u64) -> io::Result<()>;
}

impl AppendTarget for File {
    fn cut_end(&mut self, bytes: u64) -> io::Result<()> {
        // The sink is the file's only writer (under its mutex), so the last `bytes` are ours.
        let len = self.metadata()?.len();
        self.set_len(len.saturating_sub(bytes))
    }
}

/// Appends whole lines to a file (see [`JsonlFileSink`]).
#[derive(Debug)]
struct Appender<F> {
    file: F,
    /// A failed write left a torn line that could not be cut off: the next record starts on a
    /// new line.
    torn: bool,
}

impl<F: AppendTarget> Appender<F> {
    fn new(file: F) -> Self {
        Self { file, torn: false }
    }

    fn append(&mut self, line: &[u8]) -> io::Result<()> {
        if self.torn {
            self.write_or_cut(b"\n")?;
            self.torn = false;
        }
        self.write_or_cut(line)
    }

    /// Writes all of `bytes`, or on failure removes what was written of them (or, when that
    /// fails too, remembers the file ends in a torn line).
    fn write_or_cut(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut written = 0;
        let failure = loop {
            if written == bytes.len() {
                return self.file.flush();
            }
            match self.file.write(&bytes[written..]) {
                Ok(0) => break io::Error::from(io::ErrorKind::WriteZero),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break e,
            }
        };
        if written > 0 {
            let cut = u64::try_from(written).unwrap_or(u64::MAX);
            if let Err(e) = self.file.cut_end(cut) {
                tracing::error!(error = %e, "cannot remove a torn audit record; the next starts on a new line");
                self.torn = true;
            }
        }
        Err(failure)
    }
}

impl JsonlFileSink {
    /// Opens (creating if needed) the audit log. An existing regular file readable by group or
    /// others is tightened to `0600`.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(Appender::new(Self::open_file(path)?)),
        })
    }

    fn open_file(path: &Path) -> Result<File, AuditError> {
        let open_err = |source| AuditError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(open_err)?;
        }
        Ok(file)
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AuditSink for JsonlFileSink {
    fn record(&self, ev: &AuditEvent) -> Result<(), AuditError> {
        let line = ev.to_line()?;
        let mut file = self.file.lock().map_err(|_| AuditError::Poisoned)?;
        file.append(&line).map_err(|source| AuditError::Write {
            target: self.path.display().to_string(),
            source,
        })
    }

    /// Opens the path anew and swaps it in; records keep going to the old file until the new
    /// one is open, and if it cannot be opened the old one stays (nothing is lost either way).
    fn reopen(&self) -> Result<(), AuditError> {
        let fresh = Self::open_file(&self.path)?;
        let mut file = self.file.lock().map_err(|_| AuditError::Poisoned)?;
        *file = Appender::new(fresh);
        Ok(())
    }
}

/// Writes JSON lines to standard output (for container log collection).
#[derive(Debug, Default)]
pub struct StdoutSink;

impl AuditSink for StdoutSink {
    fn record(&self, ev: &AuditEvent) -> Result<(), AuditError> {
        let line = ev.to_line()?;
        let mut out = io::stdout().lock();
        out.write_all(&line)
            .and_then(|()| out.flush())
            .map_err(|source| AuditError::Write {
                target: "stdout".to_owned(),
                source,
            })
    }
}

/// Auditing explicitly switched off (`--audit none`). Has no `Default`: it must be asked for.
#[derive(Debug)]
pub struct NoAudit {
    _explicit: (),
}

impl NoAudit {
    /// The only constructor; call it only when the operator asked for no audit trail.
    #[must_use]
    pub fn explicitly_disabled() -> Self {
        Self { _explicit: () }
    }
}

impl AuditSink for NoAudit {
    fn record(&self, _ev: &AuditEvent) -> Result<(), AuditError> {
        Ok(())
    }

    fn is_disabled(&self) -> bool {
        true
    }
}

/// The parsed `--audit` option. There is no default: the proxy refuses to start without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    None,
    Stdout,
    File(PathBuf),
}

impl FromStr for AuditTarget {
    type Err = AuditError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(AuditTarget::None),
            "stdout" | "-" => Ok(AuditTarget::Stdout),
            _ => {
                let path = s.strip_prefix("file:").unwrap_or(s);
                if path.starts_with('/') && path.len() > 1 {
                    Ok(AuditTarget::File(PathBuf::from(path)))
                } else {
                    Err(AuditError::BadTarget(s.to_owned()))
                }
            }
        }
    }
}

impl AuditTarget {
    /// Opens the sink this target names.
    pub fn open(&self) -> Result<Arc<dyn AuditSink>, AuditError> {
        Ok(match self {
            AuditTarget::None => Arc::new(NoAudit::explicitly_disabled()),
            AuditTarget::Stdout => Arc::new(StdoutSink),
            AuditTarget::File(path) => Arc::new(JsonlFileSink::open(path)?),
        })
    }
}

/// What the caller must do after auditing a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum AuditOutcome {
    /// Recorded, or failed on a path that proceeds anyway (counted and logged).
    Proceed,
    /// The record failed on a fail-closed path: drop (reset) the connection, or for a request
    /// the proxy answered itself, reset its stream instead of answering.
    DropConnection,
}

/// Records `ev` and applies the caller's rule from the module docs ([`AuditEvent::fails_closed`]).
pub fn audit_decision(
    sink: &dyn AuditSink,
    metrics: &ProxyMetrics,
    ev: &AuditEvent,
) -> AuditOutcome {
    match sink.record(ev) {
        Ok(()) => AuditOutcome::Proceed,
        Err(e) => {
            metrics.audit_write_failed(ev.kind);
            if ev.fails_closed() {
                tracing::error!(error = %e, run = %ev.run, kind = %ev.kind, "audit write failed; failing closed");
                AuditOutcome::DropConnection
            } else {
                tracing::warn!(error = %e, run = %ev.run, kind = %ev.kind, "audit write failed; proceeding");
                AuditOutcome::Proceed
            }
        }
    }
}

/// An in-memory sink for tests: keeps each record's JSON line, or fails every write.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct MemorySink {
    lines: Mutex<Vec<String>>,
    fail: std::sync::atomic::AtomicBool,
}

#[cfg(test)]
impl MemorySink {
    /// A sink whose every write fails (as a full disk would).
    pub(crate) fn failing() -> Self {
        let sink = Self::default();
        sink.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        sink
    }

    /// Every line recorded so far, exactly as a file sink would have written it.
    pub(crate) fn text(&self) -> String {
        self.lines.lock().expect("lines lock").concat()
    }

    /// The records so far, parsed.
    pub(crate) fn records(&self) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .expect("lines lock")
            .iter()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }
}

#[cfg(test)]
impl AuditSink for MemorySink {
    fn record(&self, ev: &AuditEvent) -> Result<(), AuditError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(AuditError::Write {
                target: "memory".into(),
                source: io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        let line =
            String::from_utf8(ev.to_line()?).map_err(|e| AuditError::Encode(e.to_string()))?;
        self.lines
            .lock()
            .map_err(|_| AuditError::Poisoned)?
            .push(line);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: AuditKind) -> AuditEvent {
        AuditEvent::new(kind, "run-7", Mode::Transparent, 443)
            .with_dst("127.0.0.1:443".parse().expect("addr"))
            .with_sni("api.example.com")
    }

    #[test]
    fn jsonl_file_reopen_follows_a_rotation_and_keeps_the_old_file_when_it_cannot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let rotated = dir.path().join("audit.jsonl.1");
        let sink = JsonlFileSink::open(&path).expect("open");
        sink.record(&event(AuditKind::Allow)).expect("record");
        std::fs::rename(&path, &rotated).expect("rotate");
        // Until told, records follow the open file (logrotate's window before its SIGHUP).
        sink.record(&event(AuditKind::Deny)).expect("record");
        sink.reopen().expect("reopen");
        sink.record(&event(AuditKind::Allow).with_rule("after"))
            .expect("record");
        let old = std::fs::read_to_string(&rotated).expect("read rotated");
        let new = std::fs::read_to_string(&path).expect("read new");
        assert_eq!(old.lines().count(), 2, "{old}");
        assert_eq!(new.lines().count(), 1, "{new}");
        assert!(new.contains("\"after\""), "{new}");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // A path that now names a symlink is refused; the sink keeps writing where it was.
        let second = dir.path().join("audit.jsonl.2");
        std::fs::rename(&path, &second).expect("rotate again");
        std::os::unix::fs::symlink(&rotated, &path).expect("symlink");
        let err = sink.reopen().expect_err("symlink refused");
        assert!(matches!(err, AuditError::Open { .. }), "{err}");
        sink.record(&event(AuditKind::Deny))
            .expect("record after failed reopen");
        let kept = std::fs::read_to_string(&second).expect("read");
        assert_eq!(kept.lines().count(), 2, "{kept}");
        let through_link = std::fs::read_to_string(&rotated).expect("read rotated");
        assert_eq!(
            through_link.lines().count(),
            2,
            "nothing written via the link"
        );
    }

    /// A disk of `room` bytes: writes fill it and then fail with ENOSPC part way; the end
    /// can be cut off again (unless `stuck`).
    #[derive(Debug, Default)]
    struct SmallDisk {
        bytes: Vec<u8>,
        room: usize,
        stuck: bool,
    }

    impl Write for SmallDisk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.room - self.bytes.len());
            if n == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.bytes.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl AppendTarget for SmallDisk {
        fn cut_end(&mut self, bytes: u64) -> io::Result<()> {
            if self.stuck {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let keep = self.bytes.len() - usize::try_from(bytes).expect("small");
            self.bytes.truncate(keep);
            Ok(())
        }
    }

    fn lines_of(disk: &SmallDisk) -> Vec<String> {
        String::from_utf8(disk.bytes.clone())
            .expect("utf-8")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_record_that_does_not_fit_is_cut_off_whole_and_the_next_one_starts_clean() {
        let line = |rule: &str| {
            event(AuditKind::Allow)
                .with_rule(rule)
                .to_line()
                .expect("line")
        };
        let first = line("first");
        let mut out = Appender::new(SmallDisk {
            room: first.len() + 40,
            ..SmallDisk::default()
        });
        out.append(&first).expect("fits");
        let err = out.append(&line("second")).expect_err("the disk is full");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(
            String::from_utf8_lossy(&out.file.bytes),
            String::from_utf8_lossy(&first),
            "the torn record was cut off"
        );
        // Space again: the next record is whole, on its own line.
        out.file.room = 4096;
        out.append(&line("third")).expect("fits");
        let lines = lines_of(&out.file);
        assert_eq!(lines.len(), 2, "{lines:?}");
        for l in &lines {
            serde_json::from_str::<serde_json::Value>(l).expect("a whole record");
        }
        assert!(lines[1].contains("\"third\""));

        // When the torn part cannot be cut off, the next record still starts a line of its own.
        let mut out = Appender::new(SmallDisk {
            room: first.len() + 40,
            stuck: true,
            ..SmallDisk::default()
        });
        out.append(&first).expect("fits");
        out.append(&line("second")).expect_err("the disk is full");
        out.file.room = 4096;
        out.file.stuck = false;
        out.append(&line("third")).expect("fits");
        let lines = lines_of(&out.file);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(serde_json::from_str::<serde_json::Value>(&lines[0]).is_ok());
        assert!(
            serde_json::from_str::<serde_json::Value>(&lines[1]).is_err(),
            "the torn one"
        );
        let third: serde_json::Value = serde_json::from_str(&lines[2]).expect("whole");
        assert_eq!(third["rule"], "third");
    }

    #[test]
    fn jsonl_file_appends_flushed_lines_with_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let sink = JsonlFileSink::open(&path).expect("open");
        sink.record(&event(AuditKind::Allow).with_rule("github"))
            .expect("record");
        // Visible to a reader before the sink is dropped: written through, not buffered.
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 1);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // Reopening appends.
        drop(sink);
        let sink = JsonlFileSink::open(&path).expect("reopen");
        sink.record(
            &event(AuditKind::Deny).with_reason("no egress rule allows api.example.com:443"),
        )
        .expect("record");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["kind"], "allow");
        assert_eq!(lines[0]["rule"], "github");
        assert_eq!(lines[0]["reason"], serde_json::Value::Null);
        assert_eq!(lines[1]["kind"], "deny");
        assert_eq!(lines[1]["run"], "run-7");
        assert_eq!(lines[1]["dst"], "127.0.0.1:443");
        assert_eq!(lines[1]["port"], 443);
        assert_eq!(lines[1]["sni"], "api.example.com");
        assert_eq!(lines[1]["mode"], "transparent");
        assert_eq!(
            lines[1]["reason"],
            "no egress rule allows api.example.com:443"
        );
        let ts = lines[1]["ts"].as_str().expect("ts string");
        assert!(OffsetDateTime::parse(ts, &Rfc3339).is_ok(), "ts {ts}");
    }

    #[test]
    fn request_record_shape_keeps_the_path_only() {
        let uri: Uri = "https://api.example.com/v1/messages?key=pdk-user-secret-0123&x=1"
            .parse()
            .expect("uri");
        let ev = event(AuditKind::Request)
            .with_request(&Method::POST, &uri, Version::HTTP_2)
            .with_status(StatusCode::OK)
            .with_outcome(RequestOutcome::Forwarded)
            .with_credential(Some("anthropic".into()), Some("lease-1".into()));
        let line = String::from_utf8(ev.to_line().expect("line")).expect("utf-8");
        assert!(!line.contains("pdk-") && !line.contains("key="), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["kind"], "request");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/v1/messages");
        assert_eq!(v["status"], 200);
        assert_eq!(v["protocol"], "HTTP/2");
        assert_eq!(v["outcome"], "forwarded");
        assert_eq!(v["credential"], "anthropic");
        assert_eq!(v["lease_id"], "lease-1");
        assert_eq!(v["reason"], serde_json::Value::Null);
        assert_eq!(v["sni"], "api.example.com");

        // Connection records keep their shape; the request fields are null.
        let v: serde_json::Value = serde_json::from_slice(
            &event(AuditKind::Allow)
                .with_rule("r")
                .to_line()
                .expect("line"),
        )
        .expect("json");
        for field in [
            "method",
            "path",
            "status",
            "protocol",
            "credential",
            "lease_id",
            "outcome",
        ] {
            assert_eq!(v.get(field), Some(&serde_json::Value::Null), "{field}");
        }
    }

    #[test]
    fn placeholders_are_redacted_wherever_the_agent_put_them() {
        const BEARER: &str = "pdk-user-secret-0123456789abcdef0123456789abcdef0123456789abcdef";
        let encoded = BEARER.replace('p', "%70").replace('-', "%2D");
        for (path, want) in [
            (format!("/bot{BEARER}/send"), "/[redacted]/send".to_owned()),
            (format!("/a/{encoded}"), "/a/[redacted]".to_owned()),
            (format!("/x/{BEARER}"), "/x/[redacted]".to_owned()),
            (format!("/x/{BEARER}ff.json"), "/x/[redacted]".to_owned()),
            // Not well-formed placeholders: kept.
            ("/docs/pdk-guide".into(), "/docs/pdk-guide".into()),
            ("/a%20b/".into(), "/a%20b/".into()),
            ("/".into(), "/".into()),
        ] {
            let uri: Uri = format!("https://h{path}?k={BEARER}").parse().expect("uri");
            let ev = event(AuditKind::Request).with_request(&Method::GET, &uri, Version::HTTP_11);
            assert_eq!(ev.path.as_deref(), Some(want.as_str()), "{path}");
        }
        let method = Method::from_bytes(BEARER.as_bytes()).expect("a token is a method");
        let uri: Uri = "https://h/".parse().expect("uri");
        let ev = event(AuditKind::Request).with_request(&method, &uri, Version::HTTP_11);
        assert_eq!(ev.method.as_deref(), Some("[redacted]"), "method");
        let ev = event(AuditKind::Request)
            .with_sni(BEARER)
            .with_reason(format!(
                "misdirected_request: request for x{BEARER}:443 on ..."
            ));
        let line = String::from_utf8(ev.to_line().expect("line")).expect("utf-8");
        assert!(!line.contains(BEARER), "{line}");
        assert_eq!(ev.sni.as_deref(), Some("[redacted]"));
        assert_eq!(
            ev.reason.as_deref(),
            Some("misdirected_request: request for x[redacted]:443 on ...")
        );
    }

    #[test]
    fn existing_loose_file_is_tightened_and_symlinks_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, b"").expect("create");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        JsonlFileSink::open(&path).expect("open");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let link = dir.path().join("link.jsonl");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        assert!(matches!(
            JsonlFileSink::open(&link),
            Err(AuditError::Open { .. })
        ));
    }

    #[test]
    fn caller_rule_drops_on_deny_and_counts_on_allow() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        let sink = JsonlFileSink::open(Path::new("/dev/full")).expect("open /dev/full");
        let metrics = ProxyMetrics::new();
        assert!(matches!(
            sink.record(&event(AuditKind::Allow)),
            Err(AuditError::Write { .. })
        ));
        let table = [
            (AuditKind::Allow, AuditOutcome::Proceed),
            (AuditKind::Discovery, AuditOutcome::Proceed),
            (AuditKind::Deny, AuditOutcome::DropConnection),
            (AuditKind::ConnectReason, AuditOutcome::DropConnection),
        ];
        for (kind, want) in table {
            assert_eq!(
                audit_decision(&sink, &metrics, &event(kind)),
                want,
                "{kind}"
            );
            assert_eq!(metrics.audit_write_failures(kind), 1, "{kind}");
        }
        // Requests: a forwarded one proceeds; one the proxy answered itself (or one without
        // an outcome) does not.
        let request = |outcome: Option<RequestOutcome>| {
            let ev = event(AuditKind::Request);
            match outcome {
                Some(o) => ev.with_outcome(o),
                None => ev,
            }
        };
        let table = [
            (Some(RequestOutcome::Forwarded), AuditOutcome::Proceed),
            (Some(RequestOutcome::Abandoned), AuditOutcome::Proceed),
            (Some(RequestOutcome::Denied), AuditOutcome::DropConnection),
            (Some(RequestOutcome::Failed), AuditOutcome::DropConnection),
            (None, AuditOutcome::DropConnection),
        ];
        for (i, (outcome, want)) in table.into_iter().enumerate() {
            assert_eq!(
                audit_decision(&sink, &metrics, &request(outcome)),
                want,
                "{outcome:?}"
            );
            assert_eq!(
                metrics.audit_write_failures(AuditKind::Request),
                u64::try_from(i + 1).expect("small"),
                "{outcome:?}"
            );
        }
        // A working sink proceeds on every path and counts nothing.
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = JsonlFileSink::open(&dir.path().join("a.jsonl")).expect("open");
        let fresh = ProxyMetrics::new();
        for kind in AuditKind::ALL {
            assert_eq!(
                audit_decision(&ok, &fresh, &event(*kind)),
                AuditOutcome::Proceed
            );
            assert_eq!(fresh.audit_write_failures(*kind), 0);
        }
    }

    #[test]
    fn audit_target_parsing() {
        let ok = [
            ("none", AuditTarget::None),
            ("stdout", AuditTarget::Stdout),
            ("-", AuditTarget::Stdout),
            (
                "/var/log/paddock/audit.jsonl",
                AuditTarget::File("/var/log/paddock/audit.jsonl".into()),
            ),
            (
                "file:/tmp/a.jsonl",
                AuditTarget::File("/tmp/a.jsonl".into()),
            ),
        ];
        for (input, want) in ok {
            assert_eq!(input.parse::<AuditTarget>().ok(), Some(want), "{input}");
        }
        for bad in [
            "",
            "None",
            "nnone",
            "audit.jsonl",
            "file:",
            "file:rel.jsonl",
            "/",
        ] {
            assert!(
                matches!(bad.parse::<AuditTarget>(), Err(AuditError::BadTarget(_))),
                "{bad:?} accepted"
            );
        }
        let none = AuditTarget::None.open().expect("none");
        assert!(none.is_disabled());
        assert!(none.record(&event(AuditKind::Deny)).is_ok());
        assert!(!AuditTarget::Stdout.open().expect("stdout").is_disabled());
    }
}
