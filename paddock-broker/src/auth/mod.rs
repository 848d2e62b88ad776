//! Authentication of broker callers: the shared surface every backend implements.
//!
//! Backends: `jwt` (OIDC discovery + JWKS), `tokenreview` (Kubernetes `TokenReview`),
//! `rsa_session` (RSA-OAEP run tokens), `introspection` (RFC 7662 opaque tokens). Every backend fails closed: an error is a denial.

use std::{collections::BTreeSet, future::Future, pin::Pin, sync::Arc};

pub mod chain;
mod config_serde;
mod fetch;
pub mod introspection;
pub mod jwt;
pub mod names;
pub mod pods;
pub mod rsa_session;
pub mod static_keys;
mod token_file;
pub mod tokenreview;

pub use chain::AuthChain;
pub use static_keys::StaticKeys;

/// What a caller may do. Wire names: "broker:issue", "broker:renew", "broker:revoke",
/// "broker:validate-egress", "broker:substitute-auth", "broker:leases:read",
/// "broker:controller" (act on runs in any namespace), "broker:node-agent" (act only for runs
/// whose pod runs on the node the caller's token is bound to, see [`pods`]), and for
/// interactive runs "broker:interact" (prompt and interrupt), "broker:attach" (watch a run's
/// output stream), "broker:end" (end a run through its adapter) and "broker:shell" (a terminal
/// in the run's sandbox through `GET .../shell`).
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
    NodeAgent,
    Interact,
    Attach,
    End,
    Shell,
}

impl Scope {
    /// Every scope, in declaration order.
    const ALL: [Scope; 12] = [
        Scope::Issue,
        Scope::Renew,
        Scope::Revoke,
        Scope::ValidateEgress,
        Scope::SubstituteAuth,
        Scope::LeasesRead,
        Scope::Controller,
        Scope::NodeAgent,
        Scope::Interact,
        Scope::Attach,
        Scope::End,
        Scope::Shell,
    ];

    /// The wire name of this scope.
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
            Scope::NodeAgent => "broker:node-agent",
            Scope::Interact => "broker:interact",
            Scope::Attach => "broker:attach",
            Scope::End => "broker:end",
            Scope::Shell => "broker:shell",
        }
    }

    /// Parses a wire name; anything else is `None`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }
}

/// Who is calling, after authentication. Never contains the bearer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Key id, JWT sub, `system:serviceaccount:<ns>:<sa>`, `run:<id>`.
    pub subject: String,
    /// The namespace the caller may act in.
    pub namespace: String,
    pub service_account: Option<String>,
    pub scopes: BTreeSet<Scope>,
    /// "static-keys", "jwt", "tokenreview", "rsa-session", "introspection".
    pub backend: &'static str,
    /// Set when the credential itself names one run (RSA session).
    pub run: Option<String>,
    /// The node the caller's token is bound to, as the API server reported it in the
    /// `TokenReview` answer (`authentication.kubernetes.io/node-name`); never the caller's word.
    pub node: Option<String>,
    /// For a node agent, per request: where the API server says the pod of the run named in
    /// the request runs. Filled in by the server before the broker decides; never by a caller.
    pub placement: Option<Arc<pods::RunPlacement>>,
}

impl Identity {
    /// Whether the caller holds `s`.
    #[must_use]
    pub fn has(&self, s: Scope) -> bool {
        self.scopes.contains(&s)
    }

    /// Whether the caller is a node agent: it acts only for runs whose pod is on its node
    /// (checked per run by the broker), never by namespace.
    #[must_use]
    pub fn is_node_agent(&self) -> bool {
        self.has(Scope::NodeAgent)
    }

    /// Whether the caller may act on runs in `namespace`: its own, or any with the controller
    /// scope. Never for a node agent, whose authority is per run and per node, not per
    /// namespace.
    #[must_use]
    pub fn may_act_in(&self, namespace: &str) -> bool {
        !self.is_node_agent() && (self.has(Scope::Controller) || self.namespace == namespace)
    }
}

/// Why authentication failed. The HTTP layer maps every Unauthenticated to the SAME generic
/// 401 body (no oracle); the reason is for logs only (never includes the bearer).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// E.g. an RSA token for an unknown run -> 403.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// -> 503, fail closed.
    #[error("authentication backend unavailable: {0}")]
    Unavailable(String),
}

pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Identity, AuthError>> + Send + 'a>>;

pub trait Authenticator: Send + Sync + std::fmt::Debug + 'static {
    fn name(&self) -> &'static str;
    /// `bearer` is the raw token from `Authorization: Bearer <token>`.
    fn authenticate<'a>(&'a self, bearer: &'a str) -> AuthFuture<'a>;
    /// Whether the backend's remote dependencies answer (the broker's `/readyz`): one entry
    /// per backend. Backends without one are ready as long as they exist.
    fn readiness(&self) -> ReadinessFuture<'_> {
        let name = self.name();
        Box::pin(async move {
            vec![BackendReadiness {
                name,
                outcome: Ok("no remote dependency".to_owned()),
            }]
        })
    }
}

/// One authentication backend's readiness: `Ok` describes it, `Err` says why it is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendReadiness {
    pub name: &'static str,
    pub outcome: Result<String, String>,
}

pub type ReadinessFuture<'a> = Pin<Box<dyn Future<Output = Vec<BackendReadiness>> + Send + 'a>>;

/// Lets the RSA backend map a decrypted run id to its namespace (None = unknown run -> Forbidden).
pub trait RunDirectory: Send + Sync + std::fmt::Debug + 'static {
    fn run_namespace(&self, run_id: &str) -> Option<String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_wire_names_round_trip() {
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
        }
        assert_eq!(Scope::parse("broker:Issue"), None);
        assert_eq!(Scope::parse("issue"), None);
        assert_eq!(Scope::parse(""), None);
    }

    #[test]
    fn namespace_scoping_needs_controller_for_other_namespaces() {
        let mut id = Identity {
            subject: "s".into(),
            namespace: "team-a".into(),
            service_account: None,
            scopes: BTreeSet::from([Scope::Issue]),
            backend: "jwt",
            run: None,
            node: None,
            placement: None,
        };
        assert!(id.may_act_in("team-a"));
        assert!(!id.may_act_in("team-b"));
        assert!(id.has(Scope::Issue));
        assert!(!id.has(Scope::Renew));
        id.scopes.insert(Scope::Controller);
        assert!(id.may_act_in("team-b"));
        // A node agent acts by node, never by namespace, not even its own.
        id.scopes.insert(Scope::NodeAgent);
        assert!(!id.may_act_in("team-a"));
        assert!(!id.may_act_in("team-b"));
    }
}
