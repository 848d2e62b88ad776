//! The broker's configuration file (YAML) and how it becomes a running server.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    audit::{AuditSink, JsonlSink},
    auth::{AuthChain, Authenticator, Scope, StaticKeys, static_keys::StaticKeyDefaults},
    broker::Broker,
    metrics::Metrics,
    policy::PolicyStore,
    ratelimit::{RateLimitConfig, RateLimits},
    server::{ServerOptions, tls},
    store::Store,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    pub tls: TlsConfig,
    pub database: PathBuf,
    pub policy: PathBuf,
    #[serde(default = "default_poll")]
    pub policy_poll_seconds: u64,
    pub audit: AuditConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub rate_limits: RateLimitConfig,
}

fn default_poll() -> u64 {
    5
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate issued by this CA.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditConfig {
    pub path: PathBuf,
    #[serde(default = "default_audit_bytes")]
    pub max_bytes: u64,
    #[serde(default = "default_audit_keep")]
    pub keep: u32,
    #[serde(default = "default_true")]
    pub fsync: bool,
}

fn default_audit_bytes() -> u64 {
    64 * 1024 * 1024
}

fn default_audit_keep() -> u32 {
    5
}

fn default_true() -> bool {
    true
}

/// Authentication backends, tried in the order listed in `order` (default: static keys).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub static_keys: Option<StaticKeysConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticKeysConfig {
    pub file: PathBuf,
    #[serde(default)]
    pub default_namespace: String,
    #[serde(default)]
    pub default_scopes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config {0}: {1}")]
    Parse(PathBuf, String),
    #[error("config: {0}")]
    Invalid(String),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error(transparent)]
    StaticKeys(#[from] crate::auth::static_keys::StaticKeysError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("rate limits: {0}")]
    RateLimit(#[from] crate::ratelimit::RateLimitError),
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        serde_yaml_ng::from_str(&text)
            .map_err(|e| ConfigError::Parse(path.to_owned(), e.to_string()))
    }
}

/// The pieces built from a config; `static_keys` is kept for SIGHUP reloads.
#[derive(Debug)]
pub struct Built {
    pub options: ServerOptions,
    pub static_keys: Option<Arc<StaticKeys>>,
}

/// Opens the store, loads policy and keys, and assembles server options.
pub fn build(config: &Config) -> Result<Built, ConfigError> {
    let tls = tls::from_files(
        &config.tls.cert,
        &config.tls.key,
        config.tls.client_ca.as_deref(),
    )?;
    let policy = Arc::new(PolicyStore::load(&config.policy)?);
    let store = Store::open(&config.database)?;
    let audit: Arc<dyn AuditSink> = Arc::new(JsonlSink::open(
        &config.audit.path,
        config.audit.max_bytes,
        config.audit.keep,
        config.audit.fsync,
    )?);
    let limits = RateLimits::new(&config.rate_limits)?;
    let broker = Arc::new(Broker::new(store, policy, audit, limits));
    let mut backends: Vec<Arc<dyn Authenticator>> = Vec::new();
    let mut static_keys = None;
    if let Some(sk) = &config.auth.static_keys {
        let scopes = sk
            .default_scopes
            .iter()
            .map(|s| {
                Scope::parse(s).ok_or_else(|| ConfigError::Invalid(format!("unknown scope {s:?}")))
            })
            .collect::<Result<BTreeSet<_>, _>>()?;
        let keys = Arc::new(StaticKeys::load(
            &sk.file,
            StaticKeyDefaults {
                namespace: sk.default_namespace.clone(),
                scopes,
            },
        )?);
        backends.push(keys.clone());
        static_keys = Some(keys);
    }
    if backends.is_empty() {
        return Err(ConfigError::Invalid(
            "no authentication backend configured".into(),
        ));
    }
    let options = ServerOptions {
        listen: config.listen,
        admin_listen: config.admin_listen,
        tls,
        broker,
        auth: Arc::new(AuthChain::new(backends)),
        metrics: Arc::new(Metrics::new()),
        policy_poll: (config.policy_poll_seconds > 0)
            .then(|| Duration::from_secs(config.policy_poll_seconds)),
        rate_limit_sweep: Duration::from_mins(1),
    };
    Ok(Built {
        options,
        static_keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readme_block(n: usize) -> String {
        let readme = include_str!("../README.md");
        readme
            .split("```yaml")
            .nth(n)
            .and_then(|b| b.split("```").next())
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn readme_examples_parse() {
        let config: Config =
            serde_yaml_ng::from_str(&readme_block(1)).expect("README config parses");
        assert_eq!(config.rate_limits, RateLimitConfig::default());
        assert!(config.tls.client_ca.is_some() && config.admin_listen.is_some());
        let docs = crate::policy::Policy::parse_text(
            Path::new("README.md"),
            &readme_block(2),
            time::OffsetDateTime::now_utc(),
        );
        // The discovery date in the example is absolute; only a too-far window may fail.
        if let Err(e) = docs {
            assert_eq!(e.field, "spec.discovery.until", "{e}");
        }
    }

    #[test]
    fn unknown_config_fields_are_rejected() {
        let text = readme_block(1).replace("policyPollSeconds", "policyPolSeconds");
        assert!(serde_yaml_ng::from_str::<Config>(&text).is_err());
    }
}
