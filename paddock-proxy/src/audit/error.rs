//! Why an audit record could not be written.

use std::io;
use std::path::PathBuf;

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
