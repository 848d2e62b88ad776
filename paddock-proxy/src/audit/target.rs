//! The `--audit` option: which sink to open.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use super::{AuditError, AuditSink, JsonlFileSink, NoAudit, StdoutSink};

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
