//! Audit trail. Every event is written before the caller gets an answer; when the sink fails
//! the broker answers 503 `AuditUnavailable` instead of acting unaudited.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum AuditKind {
    CredentialIssued,
    CredentialDenied,
    CredentialRenewed,
    CredentialRevoked,
    RenewalFailed,
    SubstitutionDenied,
    EgressDenied,
    EgressDiscovery,
    RunUpdated,
    /// A node agent was refused a run (its pod is elsewhere, unknown, or not placeable).
    NodeAgentDenied,
    /// Interactive runs: a prompt, interrupt, end, attach or detach by a caller.
    RunPrompted,
    RunInterrupted,
    RunEnded,
    RunAttached,
    RunDetached,
    /// The idle watchdog ended a run nobody attached to or prompted for too long.
    RunIdleEnded,
    /// An interactive action was refused (missing scope, other namespace, inactive run).
    InteractDenied,
    /// A shell was opened in a run's sandbox (who, when), and closed (`reason` gives how long
    /// it lasted).
    ShellOpened,
    ShellClosed,
    /// A node agent was issued an intermediate CA for its node (`node`, `serial`,
    /// `expires_at`; never a key).
    NodeCaIssued,
    /// A node agent's certificate signing request was refused (`reason`).
    NodeCaDenied,
}

impl AuditKind {
    /// The wire name (as serialized).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::CredentialIssued => "credential-issued",
            AuditKind::CredentialDenied => "credential-denied",
            AuditKind::CredentialRenewed => "credential-renewed",
            AuditKind::CredentialRevoked => "credential-revoked",
            AuditKind::RenewalFailed => "renewal-failed",
            AuditKind::SubstitutionDenied => "substitution-denied",
            AuditKind::EgressDenied => "egress-denied",
            AuditKind::EgressDiscovery => "egress-discovery",
            AuditKind::RunUpdated => "run-updated",
            AuditKind::NodeAgentDenied => "node-agent-denied",
            AuditKind::RunPrompted => "run-prompted",
            AuditKind::RunInterrupted => "run-interrupted",
            AuditKind::RunEnded => "run-ended",
            AuditKind::RunAttached => "run-attached",
            AuditKind::RunDetached => "run-detached",
            AuditKind::RunIdleEnded => "run-idle-ended",
            AuditKind::InteractDenied => "interact-denied",
            AuditKind::ShellOpened => "shell-opened",
            AuditKind::ShellClosed => "shell-closed",
            AuditKind::NodeCaIssued => "node-ca-issued",
            AuditKind::NodeCaDenied => "node-ca-denied",
        }
    }
}

impl AuditKind {
    /// The kind's name as records spell it (`credential-issued`), for labels and metrics.
    #[must_use]
    pub fn name(self) -> &'static str {
        self.as_str()
    }
}

/// One audit record. Holds identifiers only: never a secret or a bearer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditEvent {
    pub ts: String,
    pub event: AuditKind,
    pub caller: String,
    pub namespace: String,
    pub run: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The node an intermediate CA was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The serial of an issued certificate (hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

impl AuditEvent {
    #[must_use]
    pub fn new(event: AuditKind, caller: &str, namespace: &str, run: &str) -> Self {
        let ts = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        Self {
            ts,
            event,
            caller: caller.to_owned(),
            namespace: namespace.to_owned(),
            run: run.to_owned(),
            credential: None,
            provider: None,
            lease_id: None,
            policy: None,
            host: None,
            port: None,
            expires_at: None,
            reason: None,
            node: None,
            serial: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit sink I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("audit record could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("audit sink unavailable: {0}")]
    Unavailable(String),
}

pub trait AuditSink: Send + Sync + std::fmt::Debug {
    /// Durably records the event before returning.
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError>;
}

/// Size-rotated JSON-lines file: `audit.jsonl`, then `audit.jsonl.1` .. `audit.jsonl.<keep>`.
#[derive(Debug)]
pub struct JsonlSink {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    fsync: bool,
    state: Mutex<Option<(File, u64)>>,
}

impl JsonlSink {
    /// Opens (creating, mode 0600) the log at `path`.
    pub fn open(path: &Path, max_bytes: u64, keep: u32, fsync: bool) -> Result<Self, AuditError> {
        let (file, size) = Self::open_file(path)?;
        Ok(Self {
            path: path.to_owned(),
            max_bytes: max_bytes.max(1),
            keep,
            fsync,
            state: Mutex::new(Some((file, size))),
        })
    }

    fn open_file(path: &Path) -> Result<(File, u64), AuditError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok((file, size))
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&self) -> Result<(), AuditError> {
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
            return Ok(());
        }
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        Ok(())
    }
}

impl AuditSink for JsonlSink {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(event)?;
        line.push(b'\n');
        let mut guard = self
            .state
            .lock()
            .map_err(|_| AuditError::Unavailable("lock poisoned".into()))?;
        // A failed write drops the handle so the next event retries from a fresh open.
        let (mut file, mut size) = match guard.take() {
            Some(state) => state,
            None => Self::open_file(&self.path)?,
        };
        let len = u64::try_from(line.len()).unwrap_or(u64::MAX);
        if size > 0 && size.saturating_add(len) > self.max_bytes {
            drop(file);
            self.rotate()?;
            (file, size) = Self::open_file(&self.path)?;
        }
        file.write_all(&line)?;
        if self.fsync {
            file.sync_data()?;
        }
        *guard = Some((file, size + len));
        Ok(())
    }
}

/// Two sinks, written in order: an event is recorded once both hold it. The first failing
/// sink fails the event (and the caller's operation); the second is not tried then.
///
/// With the JSONL file first and the cluster sink second, every operation the broker performs
/// is in both; an operation refused because the second sink failed is still in the first (the
/// file may hold records of operations answered 503, never the other way round).
#[derive(Debug)]
pub struct TeeSink {
    first: std::sync::Arc<dyn AuditSink>,
    second: std::sync::Arc<dyn AuditSink>,
}

impl TeeSink {
    #[must_use]
    pub fn new(
        first: std::sync::Arc<dyn AuditSink>,
        second: std::sync::Arc<dyn AuditSink>,
    ) -> Self {
        Self { first, second }
    }
}

impl AuditSink for TeeSink {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        self.first.record(event)?;
        self.second.record(event).inspect_err(|e| {
            tracing::error!(
                error = %e,
                event = event.event.name(),
                run = %event.run,
                "audit record written to the first sink only; the operation is refused"
            );
        })
    }
}

/// In-memory sink for embedded use and tests; can be switched to failing.
#[derive(Debug, Default)]
pub struct MemorySink {
    events: Mutex<Vec<AuditEvent>>,
    failing: AtomicBool,
}

impl MemorySink {
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    #[must_use]
    pub fn events(&self) -> Vec<AuditEvent> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl AuditSink for MemorySink {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(AuditError::Unavailable("memory sink set to fail".into()));
        }
        self.events
            .lock()
            .map_err(|_| AuditError::Unavailable("lock poisoned".into()))?
            .push(event.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let sink = JsonlSink::open(&path, 300, 2, false).expect("open");
        let event = AuditEvent::new(AuditKind::CredentialIssued, "k1", "ns", "run-1");
        for _ in 0..12 {
            sink.record(&event).expect("record");
        }
        let main = std::fs::read_to_string(&path).expect("main");
        assert!(main.len() <= 300);
        for line in main.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("json line");
            assert_eq!(v["event"], "credential-issued");
        }
        assert!(dir.path().join("audit.jsonl.1").exists());
        assert!(dir.path().join("audit.jsonl.2").exists());
        assert!(!dir.path().join("audit.jsonl.3").exists());
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn kind_names_are_the_serialized_names() {
        for kind in [
            AuditKind::CredentialIssued,
            AuditKind::CredentialDenied,
            AuditKind::CredentialRenewed,
            AuditKind::CredentialRevoked,
            AuditKind::RenewalFailed,
            AuditKind::SubstitutionDenied,
            AuditKind::EgressDenied,
            AuditKind::EgressDiscovery,
            AuditKind::RunUpdated,
            AuditKind::NodeAgentDenied,
            AuditKind::RunPrompted,
            AuditKind::RunInterrupted,
            AuditKind::RunEnded,
            AuditKind::RunAttached,
            AuditKind::RunDetached,
            AuditKind::RunIdleEnded,
            AuditKind::InteractDenied,
            AuditKind::ShellOpened,
            AuditKind::ShellClosed,
        ] {
            assert_eq!(serde_json::to_value(kind).expect("json"), kind.name());
        }
    }

    #[test]
    fn tee_writes_both_and_fails_when_either_fails() {
        let first = std::sync::Arc::new(MemorySink::default());
        let second = std::sync::Arc::new(MemorySink::default());
        let tee = TeeSink::new(first.clone(), second.clone());
        let event = AuditEvent::new(AuditKind::RunUpdated, "c", "n", "r");
        tee.record(&event).expect("both up");
        assert_eq!(first.events().len(), 1);
        assert_eq!(second.events().len(), 1);
        // Second down: refused, but the first already holds it (file first, then cluster).
        second.set_failing(true);
        assert!(tee.record(&event).is_err());
        assert_eq!(first.events().len(), 2);
        assert_eq!(second.events().len(), 1);
        // First down: refused, and the second is not written.
        second.set_failing(false);
        first.set_failing(true);
        assert!(tee.record(&event).is_err());
        assert_eq!(second.events().len(), 1);
    }

    #[test]
    fn failing_sink_reports_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gone").join("audit.jsonl");
        assert!(JsonlSink::open(&path, 100, 1, false).is_err());
        let mem = MemorySink::default();
        mem.set_failing(true);
        assert!(
            mem.record(&AuditEvent::new(AuditKind::RunUpdated, "c", "n", "r"))
                .is_err()
        );
        assert!(mem.events().is_empty());
    }
}
