//! Where real secrets come from: a file (e.g. a mounted Kubernetes Secret, re-read on every
//! use so rotation takes effect without a restart) or an environment variable.

use std::{fmt, path::PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// A secret value. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    #[must_use]
    pub fn new(value: String) -> Self {
        Self(value)
    }

    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret file {path} unreadable: {kind}")]
    File {
        path: PathBuf,
        kind: std::io::ErrorKind,
    },
    #[error("environment variable {0} unset or not UTF-8")]
    Env(String),
    #[error("secret from {0} is empty")]
    Empty(String),
    #[error("secret from {0} contains control characters")]
    Invalid(String),
}

impl SecretSource {
    fn describe(&self) -> String {
        match self {
            SecretSource::File(p) => p.display().to_string(),
            SecretSource::Env(v) => format!("${v}"),
        }
    }

    /// Reads a multi-line secret (a PEM key) now; only NUL and other non-whitespace control
    /// characters are refused. Never put the result into a header.
    pub fn read_multiline(&self) -> Result<Secret, SecretError> {
        let raw = self.read_raw()?;
        let value = raw.trim().to_owned();
        if value.is_empty() {
            return Err(SecretError::Empty(self.describe()));
        }
        if value
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            return Err(SecretError::Invalid(self.describe()));
        }
        Ok(Secret(value))
    }

    fn read_raw(&self) -> Result<String, SecretError> {
        match self {
            SecretSource::File(path) => {
                std::fs::read_to_string(path).map_err(|e| SecretError::File {
                    path: path.clone(),
                    kind: e.kind(),
                })
            }
            SecretSource::Env(var) => std::env::var(var).map_err(|_| SecretError::Env(var.clone())),
        }
    }

    /// Reads the secret now. Trailing newlines (common in mounted files) are removed; other
    /// control characters are refused because they would allow header injection.
    pub fn read(&self) -> Result<Secret, SecretError> {
        let raw = self.read_raw()?;
        let value = raw.trim_end_matches(['\r', '\n']).to_owned();
        if value.is_empty() {
            return Err(SecretError::Empty(self.describe()));
        }
        if value.chars().any(char::is_control) {
            return Err(SecretError::Invalid(self.describe()));
        }
        Ok(Secret(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_file_trims_newline_and_rereads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        std::fs::write(&path, "abc\n").expect("write");
        let src = SecretSource::File(path.clone());
        assert_eq!(src.read().expect("read").expose(), "abc");
        std::fs::write(&path, "def").expect("write");
        assert_eq!(src.read().expect("read").expose(), "def");
        std::fs::write(&path, "a\r\nInjected: x").expect("write");
        assert!(matches!(src.read(), Err(SecretError::Invalid(_))));
        assert_eq!(format!("{:?}", src.read().ok()), "None");
        assert!(!format!("{:?}", Secret::new("topsecret".into())).contains("topsecret"));
        assert!(
            SecretSource::Env("PADDOCK_SURELY_UNSET_VAR_X".into())
                .read()
                .is_err()
        );
    }
}
