//! Shells in a run's sandbox: the seam between the broker's `/shell` route and whoever can
//! start a process inside the run (`paddock-proxy run` for its command; the node agent of the
//! pod's node in node mode).

use std::{fmt, future::Future, pin::Pin};

use tokio::sync::watch;

use super::AdapterIo;
use crate::wire::RunInfo;

/// A terminal's size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TermSize {
    pub rows: u16,
    pub cols: u16,
}

impl Default for TermSize {
    fn default() -> Self {
        Self { rows: 24, cols: 80 }
    }
}

impl TermSize {
    /// A size a terminal can have (1 to 1000 cells each way); anything else is refused, so a
    /// caller cannot make the pty allocate absurd buffers.
    #[must_use]
    pub fn checked(rows: u16, cols: u16) -> Option<Self> {
        ((1..=1000).contains(&rows) && (1..=1000).contains(&cols)).then_some(Self { rows, cols })
    }
}

/// An open shell: the terminal's byte stream (dropping it ends the shell and everything it
/// started in the session) and, where the opener supports it, a way to resize the terminal.
pub struct ShellSession {
    pub io: AdapterIo,
    /// The latest size wins: a client sending sizes faster than they are applied queues
    /// nothing.
    pub resize: Option<watch::Sender<TermSize>>,
    /// The user the shell runs as (for the audit record), such as `uid 61234`.
    pub user: String,
}

impl fmt::Debug for ShellSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShellSession")
            .field("user", &self.user)
            .field("resizable", &self.resize.is_some())
            .finish_non_exhaustive()
    }
}

/// Why no shell could be opened. Every variant is a 502 `ShellUnavailable`.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error("no way to open a shell in run {0} is known to this broker")]
    NotConfigured(String),
    #[error("the shell could not start: {0}")]
    Failed(String),
    #[error("refused: {0}")]
    Refused(String),
}

pub type ShellFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ShellSession, ShellError>> + Send + 'a>>;

/// Starts an interactive shell on a pseudo-terminal inside a run's sandbox: the run's
/// namespaces and cgroup (so its traffic is intercepted like the agent's), its user (never
/// root), `no_new_privs` and the sandbox's seccomp filter.
pub trait ShellOpener: Send + Sync + fmt::Debug {
    fn open<'a>(&'a self, run: &'a RunInfo, size: TermSize) -> ShellFuture<'a>;
}
