//! Caller authentication: the contract shared by every backend.

use std::{collections::BTreeSet, future::Future, pin::Pin};

pub mod chain;
pub mod static_keys;

pub use chain::AuthChain;
pub use static_keys::StaticKeys;

/// What a caller may do. Wire names: "broker:issue", "broker:renew", "broker:revoke",
/// "broker:validate-egress", "broker:substitute-auth", "broker:leases:read",
/// "broker:controller" (act on runs in any namespace).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Scope {
    Issue,
    Renew,
    Revoke,
    ValidateEgress,
    SubstituteAuth,
    LeasesRead,
    Controller,
}

impl Scope {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Issue => "broker:issue",
            Scope::Renew => "broker:renew",
            Scope::Revoke => "broker:revoke",
            Scope::ValidateEgress => "broker:validate-egress",
            Scope::SubstituteAuth => "broker:substitute-auth",
            Scope::LeasesRead => "broker:leases:read",
            Scope::Controller => "broker:controller",
        }
    }

    #[must_use]
    pub fn parse(s: &str) -> Option<Scope> {
        ALL_SCOPES.into_iter().find(|scope| scope.as_str() == s)
    }
}

const ALL_SCOPES: [Scope; 7] = [
    Scope::Issue,
    Scope::Renew,
    Scope::Revoke,
    Scope::ValidateEgress,
    Scope::SubstituteAuth,
    Scope::LeasesRead,
    Scope::Controller,
];

/// Who is calling, after authentication. Never contains the bearer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    pub namespace: String,
    pub service_account: Option<String>,
    pub scopes: BTreeSet<Scope>,
    pub backend: &'static str,
    pub run: Option<String>,
}

impl Identity {
    #[must_use]
    pub fn has(&self, s: Scope) -> bool {
        self.scopes.contains(&s)
    }

    /// Own namespace, or any namespace with the controller scope.
    #[must_use]
    pub fn may_act_in(&self, namespace: &str) -> bool {
        self.has(Scope::Controller) || self.namespace == namespace
    }
}

/// Why authentication failed. The HTTP layer maps every Unauthenticated to the SAME generic
/// 401 body (no oracle); the reason is for logs only (never includes the bearer).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("authentication backend unavailable: {0}")]
    Unavailable(String),
}

pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Identity, AuthError>> + Send + 'a>>;

pub trait Authenticator: Send + Sync + std::fmt::Debug + 'static {
    fn name(&self) -> &'static str;
    /// `bearer` is the raw token from `Authorization: Bearer <token>`.
    fn authenticate<'a>(&'a self, bearer: &'a str) -> AuthFuture<'a>;
}

/// Lets the RSA backend map a decrypted run id to its namespace (None = unknown run -> Forbidden).
pub trait RunDirectory: Send + Sync + std::fmt::Debug + 'static {
    fn run_namespace(&self, run_id: &str) -> Option<String>;
}
