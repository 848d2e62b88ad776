//! `BrokerPolicy` documents: which credentials and which egress each run gets.
//!
//! Loaded from one YAML file (several documents separated by `---`) or a directory of
//! `*.yaml`/`*.yml` files. Validation errors name the file, the line and the field. A
//! [`PolicyStore`] reloads on change and keeps the previous policy if the new one is broken.
//!
//! One job per module: `document` is the serde schema, `parse` turns YAML text into documents,
//! `check` turns a document into a [`LoadedPolicy`] (the only way to get one, so every policy
//! in use was checked), `eval` answers credential and egress questions with an
//! [`EgressDecision`], and `store` reads the files and reloads them.

mod check;
mod document;
mod eval;
pub mod explain;
pub mod hosts;
mod locate;
mod parse;
mod store;
pub mod suggest;

use std::{fmt, path::PathBuf};

pub use check::{LoadedPolicy, Policy};
#[cfg(feature = "kube")]
pub use document::BrokerPolicy;
pub use document::{
    AppliesTo, CredentialGrant, Delivery, Discovery, EgressGrant, Injection, Metadata,
    PolicyDocument, PolicySpec, ProviderSpec,
};
pub use eval::EgressDecision;
pub use store::PolicyStore;

pub const API_VERSION: &str = "paddock.dev/v1";
pub const KIND: &str = "BrokerPolicy";
/// Longest allowed discovery window.
pub const MAX_DISCOVERY: time::Duration = time::Duration::days(7);
/// Default lease lifetime when a grant sets none.
pub const DEFAULT_TTL_SECONDS: u64 = 3600;
/// Longest lease lifetime a grant may set.
pub const MAX_TTL_SECONDS: u64 = 7 * 24 * 3600;

/// A validation or load error, naming the file, the line (when known) and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

#[cfg(test)]
mod tests;
