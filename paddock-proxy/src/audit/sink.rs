//! Where audit records go: a JSONL file, standard output, nowhere (explicitly), or memory in
//! tests.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{AuditError, AuditEvent};

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

    /// Whether the next record can be expected to land (the readiness check): `Err` says why
    /// not. Cheap and non-blocking beyond a `stat`; it writes nothing.
    fn health(&self) -> Result<String, String> {
        Ok("writable".to_owned())
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
    /// The last write failed (cleared by the next one that succeeds): readiness reports it.
    last_failed: std::sync::atomic::AtomicBool,
}

/// What [`Appender`] needs of its file: appending, and cutting bytes off its end again.
pub(super) trait AppendTarget: Write {
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
pub(super) struct Appender<F> {
    pub(super) file: F,
    /// A failed write left a torn line that could not be cut off: the next record starts on a
    /// new line.
    torn: bool,
}

impl<F: AppendTarget> Appender<F> {
    pub(super) fn new(file: F) -> Self {
        Self { file, torn: false }
    }

    pub(super) fn append(&mut self, line: &[u8]) -> io::Result<()> {
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
            last_failed: std::sync::atomic::AtomicBool::new(false),
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
        let written = file.append(&line);
        self.last_failed
            .store(written.is_err(), std::sync::atomic::Ordering::Relaxed);
        written.map_err(|source| AuditError::Write {
            target: self.path.display().to_string(),
            source,
        })
    }

    /// Not ready when the last write failed, the open file was deleted or its file system has
    /// no space left. A file renamed away (rotation without `SIGHUP`) still takes records, so
    /// that is reported but ready.
    fn health(&self) -> Result<String, String> {
        use std::os::unix::fs::MetadataExt;
        if self.last_failed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(format!("the last write to {} failed", self.path.display()));
        }
        let file = self
            .file
            .lock()
            .map_err(|_| "audit sink lock poisoned".to_owned())?;
        let open = file
            .file
            .metadata()
            .map_err(|e| format!("stat of the open audit file: {e}"))?;
        if open.nlink() == 0 {
            return Err(format!(
                "the open audit file {} was deleted",
                self.path.display()
            ));
        }
        let fs = nix::sys::statvfs::fstatvfs(&file.file)
            .map_err(|e| format!("statvfs of the audit file system: {e}"))?;
        if fs.blocks_available() == 0 {
            return Err(format!(
                "no space left on the file system of {}",
                self.path.display()
            ));
        }
        match std::fs::metadata(&self.path) {
            Ok(named) if named.ino() == open.ino() && named.dev() == open.dev() => {
                Ok(format!("appending to {}", self.path.display()))
            }
            _ => Ok(format!(
                "appending to a file renamed away from {} (send SIGHUP to reopen)",
                self.path.display()
            )),
        }
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
