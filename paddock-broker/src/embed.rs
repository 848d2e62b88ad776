//! The broker inside another program (`paddock-proxy run`): built from a typed
//! [`EmbedConfig`], served in-process only.
//!
//! [`EmbeddedBroker::start`] assembles the same pieces as `paddock-broker serve` (policy
//! store, lease store, audit log, rate limits, authentication, the API's routes) without a
//! config file, a keys file, a TLS certificate or a listener: the only way in is the
//! [`LocalLink`] of [`EmbeddedBroker::client`], authenticated by a one-time caller key that
//! exists only in this process's memory. Every call still goes through the HTTP server,
//! routes, authentication, limits and audit, so the embedded broker answers exactly what a
//! served one would.

use std::{collections::BTreeSet, fmt, path::PathBuf, sync::Arc, time::Duration};

use crate::{
    audit::{AuditSink, JsonlSink},
    auth::{
        AuthChain, Scope, StaticKeys,
        static_keys::{StaticKeyDefaults, format_line, hash_key},
    },
    broker::Broker,
    config::AuditConfig,
    metrics::Metrics,
    policy::{Policy, PolicyStore},
    ratelimit::{RateLimitConfig, RateLimits},
    secrets::Secret,
    server::{self, LocalLink, LocalOptions, LocalServer},
    store::Store,
};

/// Where the embedded broker's policy comes from.
#[derive(Debug)]
pub enum PolicySource {
    /// A policy already parsed and checked (for example with [`Policy::load_with`]); it never
    /// changes.
    Fixed(Policy),
    /// A policy file or directory, loaded now and re-read when it changes, as
    /// `paddock-broker serve` does with `policy` and `policyPollSeconds`.
    Files {
        path: PathBuf,
        /// Base directory of relative secret files (`secret: {file: ...}`).
        secrets_dir: Option<PathBuf>,
        /// How often the files are checked for changes; `None`: never.
        poll: Option<Duration>,
    },
}

/// The one caller of an embedded broker: what its in-process client may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerConfig {
    /// The caller's key id, as audit records name it.
    pub id: String,
    /// The namespace the caller acts in (runs it registers must be in it).
    pub namespace: String,
    pub scopes: BTreeSet<Scope>,
}

impl CallerConfig {
    /// A caller allowed to do everything a single-machine run needs: register the run, issue
    /// and revoke its placeholders, and answer the proxy's egress and substitution questions.
    #[must_use]
    pub fn run_controller(id: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            namespace: namespace.into(),
            scopes: [
                Scope::Controller,
                Scope::Issue,
                Scope::Revoke,
                Scope::ValidateEgress,
                Scope::SubstituteAuth,
                Scope::LeasesRead,
            ]
            .into_iter()
            .collect(),
        }
    }
}

/// Everything an embedded broker is built from.
#[derive(Debug)]
pub struct EmbedConfig {
    pub policy: PolicySource,
    /// The broker's audit log (rotated JSON lines).
    pub audit: AuditConfig,
    pub rate_limits: RateLimitConfig,
    pub caller: CallerConfig,
    /// The lease database; `None` keeps it in memory (it lives as long as the broker).
    pub database: Option<PathBuf>,
    /// More callers (a static keys file), e.g. people driving an interactive run.
    pub extra_keys: Option<PathBuf>,
}

impl EmbedConfig {
    /// A config with the defaults of `paddock-broker serve` (audit rotation, rate limits) and
    /// an in-memory lease database.
    #[must_use]
    pub fn new(policy: PolicySource, audit_path: impl Into<PathBuf>, caller: CallerConfig) -> Self {
        Self {
            policy,
            audit: AuditConfig {
                path: audit_path.into(),
                max_bytes: 64 * 1024 * 1024,
                keep: 5,
                fsync: true,
                kubernetes: None,
            },
            rate_limits: RateLimitConfig::default(),
            caller,
            database: None,
            extra_keys: None,
        }
    }
}

/// Why an embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("audit log {path}: {source}")]
    Audit {
        path: PathBuf,
        source: crate::audit::AuditError,
    },
    #[error("rate limits: {0}")]
    RateLimit(#[from] crate::ratelimit::RateLimitError),
    #[error("caller: {0}")]
    Caller(String),
    #[error(transparent)]
    Server(#[from] server::ServerError),
}

/// How often idle rate-limit buckets are dropped and old leases purged (as `serve` does).
const SWEEP: Duration = Duration::from_mins(1);

/// A broker running in this process, reachable only through [`EmbeddedBroker::client`].
#[derive(Debug)]
pub struct EmbeddedBroker {
    server: LocalServer,
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    client: EmbeddedClient,
}

impl EmbeddedBroker {
    /// Builds the broker from `config` and starts serving it in-process on the current tokio
    /// runtime. Writes nothing but the audit log (and the database, when one is named).
    pub fn start(config: EmbedConfig) -> Result<Self, EmbedError> {
        let (policy, poll) = match config.policy {
            PolicySource::Fixed(policy) => (PolicyStore::fixed(policy), None),
            PolicySource::Files {
                path,
                secrets_dir,
                poll,
            } => (PolicyStore::load_with(&path, secrets_dir.as_deref())?, poll),
        };
        let store = match &config.database {
            Some(path) => Store::open(path)?,
            None => Store::open_in_memory()?,
        };
        if config.audit.kubernetes.is_some() {
            // The embedded broker has no API server to write to (local mode and `run`).
            return Err(EmbedError::Audit {
                path: config.audit.path.clone(),
                source: crate::audit::AuditError::Unavailable(
                    "audit.kubernetes is for `paddock-broker serve` in a cluster".into(),
                ),
            });
        }
        let audit: Arc<dyn AuditSink> = Arc::new(
            JsonlSink::open(
                &config.audit.path,
                config.audit.max_bytes,
                config.audit.keep,
                config.audit.fsync,
            )
            .map_err(|source| EmbedError::Audit {
                path: config.audit.path.clone(),
                source,
            })?,
        );
        let limits = RateLimits::new(&config.rate_limits)?;
        let broker = Arc::new(Broker::new(store, Arc::new(policy), audit, limits));

        // A fresh 256-bit caller key; only its hash is in the key table, and the key itself
        // never leaves this process's memory.
        let mut key = [0_u8; 32];
        rand::fill(&mut key[..]);
        let bearer = Secret::new(hex::encode(key));
        let caller = &config.caller;
        let keys = StaticKeys::from_text(
            &format_line(
                &caller.id,
                &hash_key(bearer.expose()),
                &caller.namespace,
                &caller.scopes,
            ),
            StaticKeyDefaults::default(),
        )
        .map_err(|e| EmbedError::Caller(e.to_string()))?;
        let mut backends: Vec<Arc<dyn crate::auth::Authenticator>> = vec![Arc::new(keys)];
        if let Some(path) = &config.extra_keys {
            backends.push(Arc::new(
                StaticKeys::load(path, StaticKeyDefaults::default())
                    .map_err(|e| EmbedError::Caller(format!("{}: {e}", path.display())))?,
            ));
        }
        let metrics = Arc::new(Metrics::new());
        let server = server::spawn_local(LocalOptions {
            broker: broker.clone(),
            auth: Arc::new(AuthChain::new(backends)),
            metrics: metrics.clone(),
            policy_poll: poll,
            rate_limit_sweep: SWEEP,
        })?;
        let client = EmbeddedClient {
            link: server.local_link(),
            bearer,
        };
        Ok(Self {
            server,
            broker,
            metrics,
            client,
        })
    }

    /// The in-process way to call this broker's API, with the caller's credential.
    #[must_use]
    pub fn client(&self) -> EmbeddedClient {
        self.client.clone()
    }

    /// The broker itself (policy, leases, rate limits), for inspection.
    #[must_use]
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// The broker's metrics (what `/metrics` would show on a served broker).
    #[must_use]
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Refuses new calls, lets calls in flight finish (bounded) and stops the maintenance.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

/// An in-process client handle: the link to the API and the bearer to present on it.
#[derive(Clone)]
pub struct EmbeddedClient {
    link: LocalLink,
    bearer: Secret,
}

impl EmbeddedClient {
    /// Opens in-process connections to the API (HTTP/1.1, no TLS).
    #[must_use]
    pub fn link(&self) -> &LocalLink {
        &self.link
    }

    /// The caller key to send as `Authorization: Bearer <key>`. Never log it.
    #[must_use]
    pub fn bearer(&self) -> &Secret {
        &self.bearer
    }
}

impl fmt::Debug for EmbeddedClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedClient")
            .field("link", &self.link)
            .field("bearer", &self.bearer)
            .finish()
    }
}

#[cfg(test)]
mod interactive_tests;
#[cfg(test)]
mod tests;
