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
    auth::{
        AuthChain, Authenticator, RunDirectory, Scope, StaticKeys,
        introspection::{
            IntrospectionAuthenticator, IntrospectionConfig, IntrospectionConfigError,
        },
        jwt::{JwtAuthenticator, JwtConfig, JwtConfigError},
        rsa_session::{RsaSessionAuthenticator, RsaSessionConfig, RsaSessionError},
        static_keys::StaticKeyDefaults,
        tokenreview::{TokenReviewAuthenticator, TokenReviewConfig, TokenReviewConfigError},
    },
    broker::Broker,
    metrics::Metrics,
    policy::PolicyStore,
    ratelimit::{RateLimitConfig, RateLimits},
    server::{ServerOptions, tls},
    store::{SqliteConfig, Store, StoreConfig},
};

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    pub tls: TlsConfig,
    /// The `SQLite` database file: shorthand for `store: {sqlite: {path}}`.
    #[serde(default)]
    pub database: Option<PathBuf>,
    /// Where the broker keeps its state (`sqlite` or `postgres`); exactly one of `store` and
    /// `database` is given.
    #[serde(default)]
    pub store: Option<StoreConfig>,
    /// The policy file or directory (file mode). Exactly one of `policy` and
    /// `policyKubernetes` is set.
    #[serde(default)]
    pub policy: Option<PathBuf>,
    /// Cluster mode: policies are `BrokerPolicy` objects read from the API server.
    #[serde(default)]
    pub policy_kubernetes: Option<PolicyKubernetesConfig>,
    /// Base directory of relative secret files in the policy (default: the working directory).
    #[serde(default)]
    pub secrets_dir: Option<PathBuf>,
    /// How often the policy files are checked for changes (mtime and length; a `stat` per
    /// file), seconds, fractions allowed; 0 turns polling off (SIGHUP still reloads).
    #[serde(default = "default_poll")]
    pub policy_poll_seconds: f64,
    pub audit: AuditConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub rate_limits: RateLimitConfig,
    /// The cluster root CA that signs node agents' short-lived intermediates
    /// (`POST /v1/node-ca`); unset: the route answers 404.
    #[serde(default)]
    pub node_ca: Option<crate::node_ca::NodeCaConfig>,
    /// Interactive runs: lease renewal and the idle watchdog.
    #[serde(default)]
    pub interactive: InteractiveSettings,
}

/// `interactive:` in the broker's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InteractiveSettings {
    /// End runs nobody attached to or prompted for this long, unless a policy applying to the
    /// run sets its own (`spec.interactive.idleTimeoutSecs`). Unset: only policies end runs.
    #[serde(default)]
    pub idle_timeout_secs: Option<std::num::NonZeroU64>,
    /// Leases expiring within this window are renewed on each prompt and walk (default 300).
    #[serde(default)]
    pub renew_window_secs: Option<std::num::NonZeroU64>,
    /// How often the leases of interactive runs are walked (default 60).
    #[serde(default)]
    pub walk_interval_secs: Option<std::num::NonZeroU64>,
}

impl InteractiveSettings {
    /// The router's configuration these settings make.
    #[must_use]
    pub fn router_config(&self) -> crate::interactive::InteractiveConfig {
        let defaults = crate::interactive::InteractiveConfig::default();
        let secs = |s: std::num::NonZeroU64| Duration::from_secs(s.get());
        crate::interactive::InteractiveConfig {
            renew_window: self.renew_window_secs.map_or(defaults.renew_window, secs),
            walk_interval: self.walk_interval_secs.map_or(defaults.walk_interval, secs),
            idle_timeout: self.idle_timeout_secs.map(secs),
        }
    }
}

/// Where `BrokerPolicy` objects are trusted like policy files, and where their secrets live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyKubernetesConfig {
    /// The namespace whose policies may apply to any namespace and read any secret source
    /// (the broker's own). Policies elsewhere apply only to their own namespace and read
    /// secrets only under `<secretsDir>/<namespace>/`.
    pub admin_namespace: String,
}

/// A quarter second: with the proxy's 0.25 s egress re-check, a policy change applies to
/// every request within half a second of the write, for a few `stat` calls per second.
fn default_poll() -> f64 {
    0.25
}

/// The longest policy poll interval accepted (an hour).
const MAX_POLL_SECONDS: f64 = 3600.0;

impl Config {
    /// Exactly one policy source: files (`policy`) or `BrokerPolicy` objects
    /// (`policyKubernetes`, which needs `secretsDir`).
    pub fn check_policy_source(&self) -> Result<(), ConfigError> {
        match (&self.policy, &self.policy_kubernetes) {
            (Some(_), None) => Ok(()),
            (None, Some(_)) if self.secrets_dir.is_some() => Ok(()),
            (None, Some(_)) => Err(ConfigError::Invalid(
                "policyKubernetes needs secretsDir (namespaced policies read secrets under \
                 <secretsDir>/<namespace>/)"
                    .into(),
            )),
            _ => Err(ConfigError::Invalid(
                "set exactly one of `policy` (files) and `policyKubernetes` (BrokerPolicy objects)"
                    .into(),
            )),
        }
    }

    /// The policy poll interval, `None` when polling is off.
    pub fn policy_poll(&self) -> Result<Option<Duration>, ConfigError> {
        let s = self.policy_poll_seconds;
        if !s.is_finite() || !(0.0..=MAX_POLL_SECONDS).contains(&s) {
            return Err(ConfigError::Invalid(format!(
                "policyPollSeconds must be between 0 (off) and {MAX_POLL_SECONDS}, got {s}"
            )));
        }
        // Below 10 ms is a busy loop, not a poll.
        Ok((s > 0.0).then(|| Duration::from_secs_f64(s.max(0.01))))
    }
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
    /// Cluster mode: also write every record as an `AuditEvent` object (after the file; an
    /// operation whose record either sink cannot take is refused with 503).
    #[serde(default)]
    pub kubernetes: Option<AuditKubernetesConfig>,
}

/// `audit.kubernetes`: the cluster audit sink ([`crate::cluster::audit`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditKubernetesConfig {
    /// Where records go whose run namespace is not a valid namespace name (the broker's own).
    pub default_namespace: String,
    /// Records waiting for the writer; a record that finds the queue full is refused at once.
    #[serde(default = "default_audit_queue")]
    pub queue: usize,
    /// `AuditEvent` creates in flight at once.
    #[serde(default = "default_audit_concurrency")]
    pub max_concurrent: usize,
    /// How long an operation waits for its record (queue wait and create), seconds; also the
    /// bound on one create call.
    #[serde(default = "default_audit_timeout")]
    pub timeout_seconds: f64,
    /// Give each record an `ownerReference` to its `HarnessRun`, so records are deleted with
    /// the run (the JSONL file keeps them). Off: records stay until deleted by label.
    #[serde(default = "default_true")]
    pub owned_by_run: bool,
}

impl Eq for AuditKubernetesConfig {}

fn default_audit_queue() -> usize {
    1024
}

fn default_audit_concurrency() -> usize {
    8
}

fn default_audit_timeout() -> f64 {
    5.0
}

impl AuditKubernetesConfig {
    /// The caller's wait (and one create's bound), after checking every setting's range.
    pub fn checked_timeout(&self) -> Result<Duration, ConfigError> {
        if !(1..=65_536).contains(&self.queue) {
            return Err(ConfigError::Invalid(format!(
                "audit.kubernetes.queue must be 1-65536, got {}",
                self.queue
            )));
        }
        if !(1..=256).contains(&self.max_concurrent) {
            return Err(ConfigError::Invalid(format!(
                "audit.kubernetes.maxConcurrent must be 1-256, got {}",
                self.max_concurrent
            )));
        }
        let s = self.timeout_seconds;
        if !s.is_finite() || !(0.01..=60.0).contains(&s) {
            return Err(ConfigError::Invalid(format!(
                "audit.kubernetes.timeoutSeconds must be between 0.01 and 60, got {s}"
            )));
        }
        if !crate::auth::names::is_namespace(&self.default_namespace) {
            return Err(ConfigError::Invalid(format!(
                "audit.kubernetes.defaultNamespace {:?} is not a namespace name",
                self.default_namespace
            )));
        }
        Ok(Duration::from_secs_f64(s))
    }
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

/// Authentication backends. Each configured one is tried in `order` (default:
/// `[staticKeys, jwt, tokenReview, rsaSession, introspection]`, skipping those not configured);
/// the first that recognises the bearer decides. Introspection comes last by default: it sends
/// the bearer to a remote endpoint, so credentials of the local backends never leave the broker.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub order: Option<Vec<AuthBackend>>,
    #[serde(default)]
    pub static_keys: Option<StaticKeysConfig>,
    /// One entry per trusted OIDC issuer, tried in list order.
    #[serde(default)]
    pub jwt: Vec<JwtConfig>,
    #[serde(default)]
    pub token_review: Option<TokenReviewConfig>,
    #[serde(default)]
    pub rsa_session: Option<RsaSessionConfig>,
    /// OAuth 2.0 token introspection (RFC 7662) of opaque bearers.
    #[serde(default)]
    pub introspection: Option<IntrospectionConfig>,
}

/// A kind of authentication backend, as named in `auth.order`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthBackend {
    StaticKeys,
    Jwt,
    TokenReview,
    RsaSession,
    Introspection,
}

impl AuthBackend {
    const DEFAULT_ORDER: [AuthBackend; 5] = [
        AuthBackend::StaticKeys,
        AuthBackend::Jwt,
        AuthBackend::TokenReview,
        AuthBackend::RsaSession,
        AuthBackend::Introspection,
    ];

    /// The config key of this backend.
    #[must_use]
    pub fn key(self) -> &'static str {
        match self {
            AuthBackend::StaticKeys => "staticKeys",
            AuthBackend::Jwt => "jwt",
            AuthBackend::TokenReview => "tokenReview",
            AuthBackend::RsaSession => "rsaSession",
            AuthBackend::Introspection => "introspection",
        }
    }
}

impl AuthConfig {
    fn is_configured(&self, backend: AuthBackend) -> bool {
        match backend {
            AuthBackend::StaticKeys => self.static_keys.is_some(),
            AuthBackend::Jwt => !self.jwt.is_empty(),
            AuthBackend::TokenReview => self.token_review.is_some(),
            AuthBackend::RsaSession => self.rsa_session.is_some(),
            AuthBackend::Introspection => self.introspection.is_some(),
        }
    }

    /// The order backends are tried in. An explicit order must name every configured backend
    /// exactly once and nothing else, so no backend is silently on or off.
    pub fn resolved_order(&self) -> Result<Vec<AuthBackend>, ConfigError> {
        let Some(order) = &self.order else {
            let order: Vec<_> = AuthBackend::DEFAULT_ORDER
                .into_iter()
                .filter(|b| self.is_configured(*b))
                .collect();
            if order.is_empty() {
                return Err(ConfigError::Invalid(
                    "no authentication backend configured (auth needs at least one of \
                     staticKeys, jwt, tokenReview, rsaSession, introspection)"
                        .into(),
                ));
            }
            return Ok(order);
        };
        if order.is_empty() {
            return Err(ConfigError::Invalid("auth.order is empty".into()));
        }
        for (i, backend) in order.iter().enumerate() {
            if order[..i].contains(backend) {
                return Err(ConfigError::Invalid(format!(
                    "auth.order names {} twice",
                    backend.key()
                )));
            }
            if !self.is_configured(*backend) {
                return Err(ConfigError::Invalid(format!(
                    "auth.order names {0} but auth.{0} is not configured",
                    backend.key()
                )));
            }
        }
        if let Some(missing) = AuthBackend::DEFAULT_ORDER
            .into_iter()
            .find(|b| self.is_configured(*b) && !order.contains(b))
        {
            return Err(ConfigError::Invalid(format!(
                "auth.{0} is configured but auth.order does not name {0}",
                missing.key()
            )));
        }
        Ok(order.clone())
    }
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
    #[error("auth.jwt[{index}] ({issuer}): {source}")]
    Jwt {
        index: usize,
        issuer: String,
        source: JwtConfigError,
    },
    #[error("auth.tokenReview: {0}")]
    TokenReview(#[from] TokenReviewConfigError),
    #[error("auth.rsaSession: {0}")]
    RsaSession(#[from] RsaSessionError),
    #[error("auth.introspection: {0}")]
    Introspection(#[from] IntrospectionConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("rate limits: {0}")]
    RateLimit(#[from] crate::ratelimit::RateLimitError),
    #[error(transparent)]
    NodeCa(#[from] crate::node_ca::NodeCaError),
}

impl Config {
    /// The store to open: `store`, or `database` as the `SQLite` shorthand.
    pub fn store_config(&self) -> Result<StoreConfig, ConfigError> {
        match (&self.store, &self.database) {
            (Some(store), None) => Ok(store.clone()),
            (None, Some(path)) => Ok(StoreConfig::Sqlite(SqliteConfig { path: path.clone() })),
            (Some(_), Some(_)) => Err(ConfigError::Invalid(
                "give either store or database (the SQLite shorthand), not both".into(),
            )),
            (None, None) => Err(ConfigError::Invalid(
                "no store configured: give store: {sqlite: {path}} or store: {postgres: \
                 {urlFile}} (or database: PATH)"
                    .into(),
            )),
        }
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        Self::parse(path, &text)
    }

    /// Parses config text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        crate::yaml::from_str(text).map_err(|e| ConfigError::Parse(path.to_owned(), e.to_string()))
    }
}

/// The pieces built from a config; `static_keys` is kept for SIGHUP reloads and
/// `rsa_session` to hand its public key to runs.
#[derive(Debug)]
pub struct Built {
    pub options: ServerOptions,
    pub static_keys: Option<Arc<StaticKeys>>,
    pub rsa_session: Option<Arc<RsaSessionAuthenticator>>,
    /// The cluster audit sink's writer (`audit.kubernetes`): spawn it on the server's runtime
    /// before serving, or every audited operation is refused (503) after its timeout.
    pub audit_writer: Option<AuditWriter>,
}

/// Opens the store, loads policy and keys, and assembles server options.
pub fn build(config: &Config) -> Result<Built, ConfigError> {
    config.check_policy_source()?;
    let tls = tls::from_files(
        &config.tls.cert,
        &config.tls.key,
        config.tls.client_ca.as_deref(),
    )?;
    let policy = Arc::new(match &config.policy {
        Some(path) => PolicyStore::load_with(path, config.secrets_dir.as_deref())?,
        // Cluster mode: nothing is granted until the first list of BrokerPolicy objects
        // arrives (the reflector, started by `serve`).
        None => PolicyStore::awaiting_sync(),
    });
    let store = Store::open_config(&config.store_config()?)?;
    tracing::info!(
        store = store.kind(),
        schema = store.schema_version()?,
        grants = !store.is_shared(),
        "store open"
    );
    let metrics = Arc::new(Metrics::new());
    let file: Arc<dyn AuditSink> = Arc::new(JsonlSink::open(
        &config.audit.path,
        config.audit.max_bytes,
        config.audit.keep,
        config.audit.fsync,
    )?);
    let (audit, audit_writer) =
        with_cluster_audit(file, config.audit.kubernetes.as_ref(), &metrics)?;
    let limits = RateLimits::new(&config.rate_limits)?;
    let broker = Arc::new(Broker::new(store, policy, audit, limits));
    broker
        .interactive()
        .set_config(config.interactive.router_config());
    if let Some(node_ca) = &config.node_ca {
        let ca = crate::node_ca::NodeCa::load(node_ca)?;
        tracing::info!(cert = %node_ca.cert_file.display(), lifetime_secs = node_ca.lifetime_secs, "node CA root loaded");
        broker.set_node_ca(Arc::new(ca));
    }
    let auth = build_auth(&config.auth, &broker)?;
    let options = ServerOptions {
        listen: config.listen,
        admin_listen: config.admin_listen,
        tls,
        broker,
        auth: Arc::new(auth.chain),
        metrics,
        policy_poll: config.policy_poll()?,
        rate_limit_sweep: Duration::from_mins(1),
    };
    Ok(Built {
        options,
        static_keys: auth.static_keys,
        rsa_session: auth.rsa_session,
        audit_writer,
    })
}

/// Checks everything `serve` would read at start without starting anything: the TLS files,
/// the policy, the store settings (the database is not opened), the audit directory, the rate
/// limits and every auth backend (an RSA session key that does not exist yet is reported,
/// not created). Returns one line per part checked.
pub fn check(config: &Config) -> Result<Vec<String>, ConfigError> {
    let mut report = Vec::new();
    config.check_policy_source()?;
    tls::from_files(
        &config.tls.cert,
        &config.tls.key,
        config.tls.client_ca.as_deref(),
    )?;
    report.push(format!(
        "tls: {} and its key load{}",
        config.tls.cert.display(),
        if config.tls.client_ca.is_some() {
            ", client certificates required"
        } else {
            ""
        }
    ));
    let policy = Arc::new(if let Some(path) = &config.policy {
        let store = PolicyStore::load_with(path, config.secrets_dir.as_deref())?;
        report.push(format!(
            "policy: {} valid ({} documents)",
            path.display(),
            store.current().documents().len()
        ));
        store
    } else {
        report.push("policy: from BrokerPolicy objects (policyKubernetes)".to_owned());
        PolicyStore::awaiting_sync()
    });
    report.push(match config.store_config()? {
        StoreConfig::Sqlite(s) => format!("store: SQLite at {} (not opened)", s.path.display()),
        StoreConfig::Postgres(_) => "store: PostgreSQL (not contacted; `paddock-broker store \
                                     check` reaches it)"
            .to_owned(),
    });
    let audit_dir = config
        .audit
        .path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !audit_dir.is_dir() {
        return Err(ConfigError::Invalid(format!(
            "audit.path: directory {} does not exist",
            audit_dir.display()
        )));
    }
    report.push(format!("audit: {}", config.audit.path.display()));
    if let Some(k) = &config.audit.kubernetes {
        k.checked_timeout()?;
        report.push(format!(
            "audit: also as AuditEvent objects (default namespace {})",
            k.default_namespace
        ));
    }
    let limits = RateLimits::new(&config.rate_limits)?;
    config.policy_poll()?;
    // The backends need a broker to resolve runs: one on an in-memory store, thrown away.
    let scratch = Arc::new(Broker::new(
        Store::open_in_memory()?,
        policy,
        Arc::new(crate::audit::MemorySink::default()),
        limits,
    ));
    let mut auth = config.auth.clone();
    if let Some(rsa) = &auth.rsa_session
        && !rsa.key_file.exists()
    {
        report.push(format!(
            "auth: rsaSession key {} does not exist yet (serve creates it)",
            rsa.key_file.display()
        ));
        auth.rsa_session = None;
    }
    let built = build_auth(&auth, &scratch)?;
    report.push(format!("auth: {}", built.chain.backend_names().join(", ")));
    Ok(report)
}

/// The writer of the cluster audit sink, when `audit.kubernetes` is set.
#[cfg(feature = "kube")]
pub type AuditWriter = crate::cluster::audit::KubeAuditWriter;
/// Without the `kube` feature there is no cluster audit sink (and `audit.kubernetes` is
/// refused).
#[cfg(not(feature = "kube"))]
pub type AuditWriter = std::convert::Infallible;

/// The file sink alone, or the file then the cluster sink (`audit.kubernetes`).
fn with_cluster_audit(
    file: Arc<dyn AuditSink>,
    kubernetes: Option<&AuditKubernetesConfig>,
    metrics: &Metrics,
) -> Result<(Arc<dyn AuditSink>, Option<AuditWriter>), ConfigError> {
    let Some(k) = kubernetes else {
        return Ok((file, None));
    };
    #[cfg(feature = "kube")]
    {
        let settings = crate::cluster::audit::Settings {
            timeout: k.checked_timeout()?,
            default_namespace: k.default_namespace.clone(),
            queue: k.queue,
            max_concurrent: k.max_concurrent,
            owned_by_run: k.owned_by_run,
        };
        let (sink, writer) = crate::cluster::audit::channel(settings, metrics.audit_kubernetes());
        let tee: Arc<dyn AuditSink> = Arc::new(crate::audit::TeeSink::new(file, Arc::new(sink)));
        Ok((tee, Some(writer)))
    }
    #[cfg(not(feature = "kube"))]
    {
        let _ = (k, metrics);
        Err(ConfigError::Invalid(
            "audit.kubernetes needs a broker built with the `kube` feature".into(),
        ))
    }
}

/// The authentication chain built from `auth`, plus handles on the backends that need one.
#[derive(Debug)]
pub struct BuiltAuth {
    pub chain: AuthChain,
    pub static_keys: Option<Arc<StaticKeys>>,
    pub rsa_session: Option<Arc<RsaSessionAuthenticator>>,
}

/// Builds every configured backend, in the configured order. `runs` resolves RSA session
/// tokens to namespaces (the broker itself) and gets the `TokenReview` backend's pod locator
/// for node agents. Generating a new RSA key blocks for seconds:
/// call this at startup, outside async workers.
pub fn build_auth(auth: &AuthConfig, runs: &Arc<Broker>) -> Result<BuiltAuth, ConfigError> {
    let order = auth.resolved_order()?;
    let mut backends: Vec<Arc<dyn Authenticator>> = Vec::new();
    let mut static_keys = None;
    let mut rsa_session = None;
    for backend in order {
        match backend {
            AuthBackend::StaticKeys => {
                if let Some(sk) = &auth.static_keys {
                    let keys = Arc::new(load_static_keys(sk)?);
                    backends.push(keys.clone());
                    static_keys = Some(keys);
                }
            }
            AuthBackend::Jwt => {
                for (index, jwt) in auth.jwt.iter().enumerate() {
                    let authenticator =
                        JwtAuthenticator::new(jwt.clone()).map_err(|source| ConfigError::Jwt {
                            index,
                            issuer: jwt.issuer.clone(),
                            source,
                        })?;
                    backends.push(Arc::new(authenticator));
                }
            }
            AuthBackend::TokenReview => {
                if let Some(tr) = &auth.token_review {
                    let authenticator = TokenReviewAuthenticator::new(tr.clone())?;
                    // Node agents' runs are placed with the same API server and credentials.
                    let locator = Arc::new(authenticator.pod_locator());
                    runs.set_pod_locator(locator.clone());
                    // Interactive runs' adapters and shells are reached through the tunnel of
                    // the node the API server places the run's pod on.
                    let route = Arc::new(crate::interactive::TunnelRoute {
                        locator,
                        tunnels: runs.interactive().tunnels().clone(),
                    });
                    runs.interactive().set_connector(route.clone());
                    runs.interactive().set_shell_opener(route);
                    backends.push(Arc::new(authenticator));
                }
            }
            AuthBackend::RsaSession => {
                if let Some(rsa) = &auth.rsa_session {
                    let runs: Arc<dyn RunDirectory> = runs.clone();
                    let authenticator =
                        Arc::new(RsaSessionAuthenticator::load_or_create(rsa, runs)?);
                    backends.push(authenticator.clone());
                    rsa_session = Some(authenticator);
                }
            }
            AuthBackend::Introspection => {
                if let Some(introspection) = &auth.introspection {
                    backends.push(Arc::new(IntrospectionAuthenticator::new(
                        introspection.clone(),
                    )?));
                }
            }
        }
    }
    Ok(BuiltAuth {
        chain: AuthChain::new(backends),
        static_keys,
        rsa_session,
    })
}

fn load_static_keys(sk: &StaticKeysConfig) -> Result<StaticKeys, ConfigError> {
    let scopes = sk
        .default_scopes
        .iter()
        .map(|s| {
            Scope::parse(s).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "auth.staticKeys.defaultScopes: unknown scope {s:?}"
                ))
            })
        })
        .collect::<Result<BTreeSet<_>, _>>()?;
    Ok(StaticKeys::load(
        &sk.file,
        StaticKeyDefaults {
            namespace: sk.default_namespace.clone(),
            scopes,
        },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_kubernetes_defaults_and_ranges() {
        let parse = |extra: &str| -> AuditKubernetesConfig {
            crate::yaml::from_str(&format!("defaultNamespace: paddock-system\n{extra}"))
                .expect("audit.kubernetes")
        };
        let k = parse("");
        assert_eq!((k.queue, k.max_concurrent, k.owned_by_run), (1024, 8, true));
        assert_eq!(k.checked_timeout().expect("valid"), Duration::from_secs(5));
        for bad in [
            "queue: 0",
            "maxConcurrent: 0",
            "maxConcurrent: 1000",
            "timeoutSeconds: 0",
            "timeoutSeconds: .nan",
            "timeoutSeconds: 3600",
        ] {
            assert!(parse(bad).checked_timeout().is_err(), "{bad}");
        }
        let mut k = parse("");
        k.default_namespace = "Not/A-Namespace".into();
        assert!(k.checked_timeout().is_err());
        assert!(
            crate::yaml::from_str::<AuditKubernetesConfig>("defaultNamespace: x\nqueu: 3").is_err(),
            "unknown keys are refused"
        );
    }

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
        let config: Config = crate::yaml::from_str(&readme_block(1)).expect("README config parses");
        // The commented PostgreSQL alternative parses too.
        let pg_line = readme_block(1)
            .lines()
            .find_map(|l| l.strip_prefix("# store: {postgres"))
            .map(|rest| format!("store: {{postgres{rest}"))
            .expect("the README shows a postgres store");
        let pg: std::collections::BTreeMap<String, StoreConfig> =
            crate::yaml::from_str(&pg_line).expect("README postgres store parses");
        assert!(matches!(pg.get("store"), Some(StoreConfig::Postgres(p)) if p.pool_size == 8));
        assert_eq!(config.rate_limits, RateLimitConfig::default());
        assert!(config.tls.client_ca.is_some() && config.admin_listen.is_some());
        assert_eq!(
            config.auth.resolved_order().expect("order"),
            AuthBackend::DEFAULT_ORDER.to_vec()
        );
        assert_eq!(config.auth.jwt.len(), 1);
        assert_eq!(
            config.auth.jwt[0].claims.service_account.as_deref(),
            Some("sa")
        );
        let tr = config.auth.token_review.as_ref().expect("tokenReview");
        assert_eq!(tr.max_cache_ttl, Duration::from_mins(5));
        assert!(tr.scopes["paddock-system/proxy"].contains(&Scope::SubstituteAuth));
        assert!(tr.scopes["paddock-system/paddock-node"].contains(&Scope::NodeAgent));
        let node_ca = config.node_ca.as_ref().expect("nodeCa");
        assert_eq!(node_ca.lifetime_secs, 86_400);
        assert_eq!(node_ca.name_constraints.excluded_dns, ["cluster.local"]);
        assert_eq!(tr.pod_cache_ttl, Duration::from_secs(30));
        let introspection = config.auth.introspection.as_ref().expect("introspection");
        assert_eq!(introspection.cache_ttl, Duration::from_mins(1));
        assert_eq!(introspection.namespace_claim, "/ext/namespace");
        assert!(introspection.scopes["paddock.proxy"].contains(&Scope::SubstituteAuth));
        introspection
            .validate()
            .expect("README introspection config is valid");
        let rsa = config.auth.rsa_session.as_ref().expect("rsaSession");
        assert_eq!((rsa.decrypts_per_second, rsa.decrypt_burst), (20, 40));
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

    fn auth(yaml: &str) -> AuthConfig {
        crate::yaml::from_str(yaml).expect("auth config parses")
    }

    fn order_error(yaml: &str) -> String {
        match auth(yaml).resolved_order() {
            Ok(order) => panic!("accepted: {order:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn auth_order_defaults_and_explicit() {
        let both = "staticKeys: {file: k}\nrsaSession: {keyFile: r}\n";
        assert_eq!(
            auth(both).resolved_order().expect("default order"),
            vec![AuthBackend::StaticKeys, AuthBackend::RsaSession]
        );
        let explicit = format!("{both}order: [rsaSession, staticKeys]\n");
        assert_eq!(
            auth(&explicit).resolved_order().expect("explicit order"),
            vec![AuthBackend::RsaSession, AuthBackend::StaticKeys]
        );
    }

    #[test]
    fn auth_config_errors_are_clear() {
        assert!(order_error("{}").contains("no authentication backend configured"));
        assert!(order_error("jwt: []").contains("no authentication backend configured"));
        assert_eq!(
            order_error("staticKeys: {file: k}\norder: [staticKeys, jwt]"),
            "config: auth.order names jwt but auth.jwt is not configured"
        );
        assert_eq!(
            order_error("staticKeys: {file: k}\norder: [staticKeys, staticKeys]"),
            "config: auth.order names staticKeys twice"
        );
        assert_eq!(
            order_error("staticKeys: {file: k}\nrsaSession: {keyFile: r}\norder: [staticKeys]"),
            "config: auth.rsaSession is configured but auth.order does not name rsaSession"
        );
        assert_eq!(
            order_error("staticKeys: {file: k}\norder: []"),
            "config: auth.order is empty"
        );
        for bad in [
            "order: [ldap]",
            "jwt: [{issuer: https://i.example, audiences: [a], algorithms: [HS256]}]",
            "jwt: [{issuer: https://i.example, audiences: [a], jwks_uri: x}]",
            "tokenReview: {apiServer: https://k, scopes: {a/b: [broker:everything]}}",
            "rsaSession: {keyFile: r, decryptsPerSecond: -1}",
        ] {
            assert!(crate::yaml::from_str::<AuthConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backend_construction_errors_name_the_backend() {
        let dir = tempfile::tempdir().expect("tempdir");
        let broker = Arc::new(Broker::new(
            Store::open_in_memory().expect("store"),
            Arc::new(PolicyStore::fixed(crate::policy::Policy::default())),
            Arc::new(crate::audit::MemorySink::default()),
            RateLimits::new(&RateLimitConfig::default()).expect("limits"),
        ));
        let err = |yaml: String| match build_auth(&auth(&yaml), &broker) {
            Ok(built) => panic!("accepted: {built:?}"),
            Err(e) => e.to_string(),
        };
        let e = err("jwt: [{issuer: http://issuer.example.com, audiences: [a]}]".into());
        assert!(
            e.starts_with("auth.jwt[0] (http://issuer.example.com): jwt: issuer:"),
            "{e}"
        );
        let e = err(format!(
            "tokenReview: {{apiServer: https://k.example, tokenFile: {}}}",
            dir.path().join("missing").display()
        ));
        assert!(
            e.starts_with("auth.tokenReview: tokenreview: token file"),
            "{e}"
        );
        let e = err(format!(
            "rsaSession: {{keyFile: {}, decryptBurst: 0}}",
            dir.path().join("k.pem").display()
        ));
        assert!(e.contains("decryptBurst must be at least 1"), "{e}");
        let e = err(format!(
            "staticKeys: {{file: {}, defaultScopes: [broker:nope]}}",
            dir.path().join("keys").display()
        ));
        assert!(
            e.contains("auth.staticKeys.defaultScopes: unknown scope"),
            "{e}"
        );
    }

    #[test]
    fn exactly_one_policy_source() {
        let base: Config = crate::yaml::from_str(&readme_block(1)).expect("config");
        base.check_policy_source().expect("files");
        let build_err = |c: &Config| build(c).err().map(|e| e.to_string()).unwrap_or_default();
        // `build` refuses these before it reads any file.
        let mut both = base.clone();
        both.policy_kubernetes = Some(PolicyKubernetesConfig {
            admin_namespace: "paddock-system".into(),
        });
        assert!(
            build_err(&both).contains("exactly one of `policy`"),
            "{}",
            build_err(&both)
        );
        let mut neither = base.clone();
        neither.policy = None;
        assert!(build_err(&neither).contains("exactly one of `policy`"));
        let mut no_secrets = neither.clone();
        no_secrets.policy_kubernetes = both.policy_kubernetes.clone();
        no_secrets.secrets_dir = None;
        assert!(
            build_err(&no_secrets).contains("needs secretsDir"),
            "{}",
            build_err(&no_secrets)
        );
        let text = readme_block(1).replace(
            "policy: /etc/paddock/policies",
            "policyKubernetes: {adminNamespace: paddock-system}",
        );
        let cluster: Config = crate::yaml::from_str(&text).expect("cluster-mode config parses");
        assert!(cluster.policy.is_none());
        assert_eq!(
            cluster
                .policy_kubernetes
                .as_ref()
                .map(|k| k.admin_namespace.as_str()),
            Some("paddock-system")
        );
        cluster.check_policy_source().expect("cluster mode");
    }

    #[test]
    fn unknown_config_fields_are_rejected() {
        let text = readme_block(1).replace("policyPollSeconds", "policyPolSeconds");
        assert!(crate::yaml::from_str::<Config>(&text).is_err());
    }

    #[test]
    fn policy_poll_accepts_fractions_and_refuses_nonsense() {
        let cfg = |v: &str| {
            let text = readme_block(1).replace(
                "policyPollSeconds: 0.25",
                &format!("policyPollSeconds: {v}"),
            );
            crate::yaml::from_str::<Config>(&text).expect("config parses")
        };
        assert_eq!(
            cfg("0.5").policy_poll().expect("valid"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            cfg("2").policy_poll().expect("integers still work"),
            Some(Duration::from_secs(2))
        );
        assert_eq!(cfg("0").policy_poll().expect("off"), None);
        for bad in ["-1", "7200", ".nan", ".inf"] {
            let e = cfg(bad).policy_poll().expect_err(bad).to_string();
            assert!(e.contains("policyPollSeconds"), "{bad}: {e}");
        }
        let default = readme_block(1).replace("policyPollSeconds: 0.25", "");
        let default: Config = crate::yaml::from_str(&default).expect("default");
        assert!(
            default
                .policy_poll()
                .expect("valid")
                .is_some_and(|d| d < Duration::from_secs(1)),
            "the default poll must let a policy change apply within a second"
        );
    }

    /// `database` stays the `SQLite` shorthand; `store` names either backend; never both.
    #[test]
    fn store_forms_parse_and_conflicts_are_refused() {
        let base = "listen: 127.0.0.1:1\ntls: {cert: c, key: k}\npolicy: p\naudit: {path: a}\n\
                    auth: {staticKeys: {file: f}}\n";
        let parse = |extra: &str| {
            Config::parse(Path::new("broker.yaml"), &format!("{base}{extra}"))
                .expect("parses")
                .store_config()
        };
        assert_eq!(
            parse("database: /d/b.db\n").expect("shorthand"),
            StoreConfig::Sqlite(SqliteConfig {
                path: "/d/b.db".into()
            })
        );
        assert_eq!(
            parse("store: {sqlite: {path: /d/b.db}}\n").expect("sqlite"),
            parse("database: /d/b.db\n").expect("shorthand")
        );
        let StoreConfig::Postgres(pg) = parse(
            "store:\n  postgres:\n    urlFile: /s/url\n    caFile: /s/ca.crt\n    poolSize: 16\n",
        )
        .expect("postgres") else {
            panic!("not postgres")
        };
        assert_eq!(
            (
                pg.url_file.to_str(),
                pg.ca_file.as_deref().and_then(Path::to_str),
                pg.pool_size
            ),
            (Some("/s/url"), Some("/s/ca.crt"), 16)
        );
        let StoreConfig::Postgres(snake) =
            parse("store: {postgres: {url_file: /s/url, pool_size: 3}}\n").expect("snake_case")
        else {
            panic!("not postgres")
        };
        assert_eq!((snake.pool_size, snake.ca_file), (3, None));
        for (extra, needle) in [
            ("database: /d\nstore: {sqlite: {path: /d}}\n", "not both"),
            ("", "no store configured"),
        ] {
            let e = parse(extra).expect_err(extra).to_string();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        assert!(
            Config::parse(
                Path::new("broker.yaml"),
                &format!("{base}store: {{mysql: {{url: x}}}}\n")
            )
            .is_err(),
            "an unknown backend is refused"
        );
    }

    /// `paddock-proxy run` writes its embedded broker's config as compact JSON (JSON is YAML).
    #[test]
    fn compact_json_configs_parse() {
        let json = serde_json::json!({
            "listen": "127.0.0.1:0",
            "tls": {"cert": "/run/b/tls.crt", "key": "/run/b/tls.key"},
            "database": "/run/b/broker.db",
            "policy": "/etc/paddock/policy.yaml",
            "secretsDir": "/etc/paddock/secrets dir",
            "policyPollSeconds": 0.25,
            "audit": {"path": "/run/b/audit.jsonl"},
            "auth": {"staticKeys": {"file": "/run/b/keys"}},
            "rateLimits": {"substitute": {"perSecond": 5, "burst": 10}},
        })
        .to_string();
        let cfg = Config::parse(Path::new("broker.yaml"), &json).expect("JSON config parses");
        assert_eq!(
            cfg.policy.as_deref(),
            Some(Path::new("/etc/paddock/policy.yaml"))
        );
        assert_eq!(
            cfg.secrets_dir.as_deref(),
            Some(Path::new("/etc/paddock/secrets dir"))
        );
        assert_eq!(
            cfg.policy_poll().expect("valid"),
            Some(Duration::from_millis(250))
        );
        let e = Config::parse(
            Path::new("broker.yaml"),
            "listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n",
        )
        .expect_err("duplicate key")
        .to_string();
        assert!(e.contains("broker.yaml") && e.contains("line 2"), "{e}");
    }
}
