//! Kubernetes `TokenReview` authentication of service-account tokens.
//!
//! Each new bearer costs one `POST /apis/authentication.k8s.io/v1/tokenreviews` (audience
//! `paddock-broker` by default); the answer is cached, keyed by the bearer's SHA-256, until the
//! token's own `exp` (capped), so steady traffic costs no API round trip. Rejections are cached
//! only briefly; an unreachable or refusing API server is `Unavailable` and never cached.
//!
//! Node agents: an account whose scopes include `broker:node-agent` must present a token bound
//! to a pod, whose review names the pod's node in `user.extra["authentication.kubernetes.io/
//! node-name"]` (Kubernetes >= 1.30). That node becomes [`Identity::node`]; such an account
//! without it is refused. The same API server answers the pod lookups of [`super::pods`].

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use url::Url;

use super::{
    AuthError, AuthFuture, Authenticator, Identity, Scope, config_serde,
    fetch::{FetchError, JsonClient, parse_service_url},
    names,
    pods::PodLocator,
    token_file::TokenFile,
};

const REVIEW_PATH: &str = "apis/authentication.k8s.io/v1/tokenreviews";
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// The `TokenReview` user extra that names the node of the pod a token is bound to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// Why a node agent's token is refused when its review names no node.
pub const NOT_NODE_BOUND: &str = "token is not bound to a node; Kubernetes >= 1.30 with \
     pod-bound projected tokens required";

/// Configuration of the `TokenReview` backend. Holds paths, never a token.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenReviewConfig {
    /// API server base URL, e.g. `https://kubernetes.default.svc`.
    pub api_server: String,
    /// CA bundle for the API server (the webpki roots when unset).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The broker's own service-account token, re-read when the file changes.
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
    /// `spec.audiences` of each review; the answer must confirm one of them.
    #[serde(default = "default_audiences")]
    pub audiences: Vec<String>,
    /// Scopes per service account, keyed `namespace/name`, or `namespace/*` for every
    /// account of a namespace. An account in neither gets no scope. `broker:node-agent` marks
    /// node agents and may be combined only with `broker:validate-egress` and
    /// `broker:substitute-auth`.
    #[serde(default, deserialize_with = "config_serde::scope_map")]
    pub scopes: BTreeMap<String, BTreeSet<Scope>>,
    /// Cached reviews, at most.
    #[serde(default = "default_capacity")]
    pub cache_capacity: usize,
    /// Upper bound on how long a positive review is trusted.
    #[serde(
        default = "default_max_ttl",
        deserialize_with = "config_serde::duration"
    )]
    pub max_cache_ttl: Duration,
    /// How long a positive review is trusted when the token's expiry cannot be read.
    #[serde(
        default = "default_fallback_ttl",
        deserialize_with = "config_serde::duration"
    )]
    pub fallback_ttl: Duration,
    /// How long a rejection is remembered (absorbs retry storms; zero disables).
    #[serde(
        default = "default_negative_ttl",
        deserialize_with = "config_serde::duration"
    )]
    pub negative_ttl: Duration,
    #[serde(
        default = "default_http_timeout",
        deserialize_with = "config_serde::duration"
    )]
    pub http_timeout: Duration,
    /// How long a node agent's pod lookup (run -> pod -> node) is reused; zero disables.
    #[serde(
        default = "default_pod_cache_ttl",
        deserialize_with = "config_serde::duration"
    )]
    pub pod_cache_ttl: Duration,
    /// Cached pod lookups, at most.
    #[serde(default = "default_capacity")]
    pub pod_cache_capacity: usize,
}

fn default_token_file() -> PathBuf {
    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
}
fn default_audiences() -> Vec<String> {
    vec!["paddock-broker".to_owned()]
}
fn default_capacity() -> usize {
    10_000
}
fn default_max_ttl() -> Duration {
    Duration::from_mins(5)
}
fn default_fallback_ttl() -> Duration {
    Duration::from_mins(1)
}
fn default_negative_ttl() -> Duration {
    Duration::from_secs(5)
}
fn default_http_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_pod_cache_ttl() -> Duration {
    Duration::from_secs(30)
}

impl TokenReviewConfig {
    #[must_use]
    pub fn new(api_server: impl Into<String>) -> Self {
        Self {
            api_server: api_server.into(),
            ca_file: None,
            token_file: default_token_file(),
            audiences: default_audiences(),
            scopes: BTreeMap::new(),
            cache_capacity: default_capacity(),
            max_cache_ttl: default_max_ttl(),
            fallback_ttl: default_fallback_ttl(),
            negative_ttl: default_negative_ttl(),
            http_timeout: default_http_timeout(),
            pod_cache_ttl: default_pod_cache_ttl(),
            pod_cache_capacity: default_capacity(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenReviewConfigError {
    #[error("tokenreview: apiServer: {0}")]
    ApiServer(String),
    #[error("tokenreview: at least one non-empty audience is required")]
    NoAudience,
    #[error("tokenreview: cacheCapacity and podCacheCapacity must be at least 1")]
    Capacity,
    #[error(
        "tokenreview: scopes of {0:?}: broker:node-agent may be combined only with \
         broker:validate-egress and broker:substitute-auth"
    )]
    NodeAgentScopes(String),
    #[error("tokenreview: scopes key {0:?} is not `namespace/name` or `namespace/*`")]
    ScopeKey(String),
    #[error("tokenreview: {0}")]
    TokenFile(String),
    #[error("tokenreview: HTTP client: {0}")]
    Client(String),
}

#[derive(Clone)]
struct Cached {
    outcome: Result<Identity, String>,
    expires: Instant,
}

/// The Kubernetes `TokenReview` [`Authenticator`].
pub struct TokenReviewAuthenticator {
    config: TokenReviewConfig,
    base: Url,
    url: Url,
    client: JsonClient,
    token: Arc<TokenFile>,
    cache: quick_cache::sync::Cache<[u8; 32], Cached>,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("config", &self.config)
            .field("token", &self.token)
            .field("cached_reviews", &self.cache.len())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewRequest<'a> {
    api_version: &'static str,
    kind: &'static str,
    spec: ReviewSpec<'a>,
}

#[derive(Serialize)]
struct ReviewSpec<'a> {
    token: &'a str,
    audiences: &'a [String],
}

#[derive(Deserialize)]
struct ReviewResponse {
    #[serde(default)]
    status: ReviewStatus,
}

#[derive(Deserialize, Default)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    user: Option<UserInfo>,
    #[serde(default)]
    audiences: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct UserInfo {
    #[serde(default)]
    username: String,
    #[serde(default)]
    extra: BTreeMap<String, Vec<String>>,
}

/// The node a reviewed token is bound to: exactly one valid node name, else none.
fn bound_node(extra: &BTreeMap<String, Vec<String>>) -> Option<String> {
    match extra.get(NODE_NAME_EXTRA).map(Vec::as_slice) {
        Some([node]) if names::is_node_name(node) => Some(node.clone()),
        _ => None,
    }
}

impl TokenReviewAuthenticator {
    /// Checks the config and that the broker's token file is readable now.
    pub fn new(config: TokenReviewConfig) -> Result<Self, TokenReviewConfigError> {
        let base =
            parse_service_url(&config.api_server).map_err(TokenReviewConfigError::ApiServer)?;
        let url = join(&base, REVIEW_PATH).map_err(TokenReviewConfigError::ApiServer)?;
        if config.audiences.is_empty() || config.audiences.iter().any(String::is_empty) {
            return Err(TokenReviewConfigError::NoAudience);
        }
        if config.cache_capacity == 0 || config.pod_cache_capacity == 0 {
            return Err(TokenReviewConfigError::Capacity);
        }
        for key in config.scopes.keys() {
            let valid = key.split_once('/').is_some_and(|(ns, sa)| {
                names::is_namespace(ns) && (sa == "*" || names::is_service_account(sa))
            });
            if !valid {
                return Err(TokenReviewConfigError::ScopeKey(key.clone()));
            }
        }
        for (key, scopes) in &config.scopes {
            let node_agent_only = [
                Scope::NodeAgent,
                Scope::ValidateEgress,
                Scope::SubstituteAuth,
            ];
            if scopes.contains(&Scope::NodeAgent)
                && scopes.iter().any(|s| !node_agent_only.contains(s))
            {
                return Err(TokenReviewConfigError::NodeAgentScopes(key.clone()));
            }
        }
        let token = Arc::new(TokenFile::new(config.token_file.clone()));
        token.read().map_err(TokenReviewConfigError::TokenFile)?;
        let client = JsonClient::new(config.ca_file.as_deref(), config.http_timeout)
            .map_err(|e| TokenReviewConfigError::Client(e.to_string()))?;
        Ok(Self {
            cache: quick_cache::sync::Cache::new(config.cache_capacity),
            base,
            url,
            client,
            token,
            config,
        })
    }

    /// A pod locator on the same API server, CA and broker token, for node agents.
    #[must_use]
    pub fn pod_locator(&self) -> PodLocator {
        PodLocator::new(
            self.base.clone(),
            self.client.clone(),
            Arc::clone(&self.token),
            self.config.pod_cache_ttl,
            self.config.pod_cache_capacity,
        )
    }

    async fn verify(&self, bearer: &str) -> Result<Identity, AuthError> {
        if bearer.is_empty() || bearer.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Unauthenticated(
                "tokenreview: token empty or too long".into(),
            ));
        }
        let key: [u8; 32] = Sha256::digest(bearer.as_bytes()).into();
        // Two rounds at most: the second only after dropping an expired entry.
        for _ in 0..2 {
            let guard = match self.cache.get_value_or_guard_async(&key).await {
                Ok(hit) if hit.expires > Instant::now() => {
                    return hit.outcome.map_err(AuthError::Unauthenticated);
                }
                Ok(_) => {
                    self.cache.remove(&key);
                    continue;
                }
                Err(guard) => guard,
            };
            let outcome = self.review(bearer).await;
            let ttl = match &outcome {
                Ok(_) => self.positive_ttl(bearer),
                Err(AuthError::Unauthenticated(_)) => self.config.negative_ttl,
                // Never cache the backend being down: the next request asks again.
                Err(_) => Duration::ZERO,
            };
            if !ttl.is_zero() {
                let cached_outcome = match &outcome {
                    Ok(identity) => Ok(identity.clone()),
                    Err(err) => Err(reason(err)),
                };
                let _ = guard.insert(Cached {
                    outcome: cached_outcome,
                    expires: Instant::now() + ttl,
                });
            }
            return outcome;
        }
        Err(AuthError::Unavailable(
            "tokenreview: cache entry kept expiring".into(),
        ))
    }

    /// Until the token's `exp` if its payload shows one, else the fallback; never past the cap.
    fn positive_ttl(&self, bearer: &str) -> Duration {
        let ttl = match token_expiry(bearer) {
            Some(exp) => exp
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
            None => self.config.fallback_ttl,
        };
        ttl.min(self.config.max_cache_ttl)
    }

    async fn review(&self, bearer: &str) -> Result<Identity, AuthError> {
        let own_token = self
            .token
            .read()
            .map_err(|e| AuthError::Unavailable(format!("tokenreview: {e}")))?;
        let request = ReviewRequest {
            api_version: "authentication.k8s.io/v1",
            kind: "TokenReview",
            spec: ReviewSpec {
                token: bearer,
                audiences: &self.config.audiences,
            },
        };
        let response: ReviewResponse = self
            .client
            .post_json(
                &self.url,
                &request,
                Some(&own_token),
                &[StatusCode::OK, StatusCode::CREATED],
            )
            .await
            .map_err(|e| match e {
                FetchError::Status {
                    status: 401 | 403, ..
                } => AuthError::Unavailable(format!(
                    "tokenreview: the API server refused the broker's own credentials ({e}); \
                     it needs `create` on tokenreviews.authentication.k8s.io"
                )),
                other => AuthError::Unavailable(format!("tokenreview: {other}")),
            })?;
        let status = response.status;
        if !status.authenticated {
            return Err(AuthError::Unauthenticated(
                "tokenreview: token not authenticated".into(),
            ));
        }
        let confirmed = status
            .audiences
            .unwrap_or_default()
            .iter()
            .any(|a| self.config.audiences.contains(a));
        if !confirmed {
            return Err(AuthError::Unauthenticated(
                "tokenreview: audience not confirmed by the API server".into(),
            ));
        }
        let (username, extra) = status
            .user
            .map(|u| (u.username, u.extra))
            .unwrap_or_default();
        let (namespace, service_account) = parse_service_account(&username).ok_or_else(|| {
            AuthError::Unauthenticated("tokenreview: not a service-account token".into())
        })?;
        let scopes = self
            .config
            .scopes
            .get(&format!("{namespace}/{service_account}"))
            .or_else(|| self.config.scopes.get(&format!("{namespace}/*")))
            .cloned()
            .unwrap_or_default();
        let node = bound_node(&extra);
        if scopes.contains(&Scope::NodeAgent) && node.is_none() {
            // Fail closed: a node agent without a node would have no bound on its authority.
            return Err(AuthError::Forbidden(format!(
                "tokenreview: node agent {username}: {NOT_NODE_BOUND}"
            )));
        }
        Ok(Identity {
            subject: username.clone(),
            namespace: namespace.to_owned(),
            service_account: Some(service_account.to_owned()),
            scopes,
            backend: "tokenreview",
            run: None,
            node,
            placement: None,
        })
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn name(&self) -> &'static str {
        "tokenreview"
    }

    fn authenticate<'a>(&'a self, bearer: &'a str) -> AuthFuture<'a> {
        Box::pin(self.verify(bearer))
    }

    /// The API server answers `GET /version` with the broker's own token.
    fn readiness(&self) -> super::ReadinessFuture<'_> {
        Box::pin(async move {
            let outcome = async {
                let token = self.token.read().map_err(|e| format!("own token: {e}"))?;
                let url = join(&self.base, "/version")?;
                let version: serde_json::Value = self
                    .client
                    .get_json_with_bearer(&url, &token)
                    .await
                    .map_err(|e| format!("API server: {e}"))?;
                Ok(format!(
                    "API server answering ({})",
                    version["gitVersion"].as_str().unwrap_or("version unknown")
                ))
            }
            .await;
            vec![super::BackendReadiness {
                name: self.name(),
                outcome,
            }]
        })
    }
}

fn reason(err: &AuthError) -> String {
    match err {
        AuthError::Unauthenticated(r) | AuthError::Forbidden(r) | AuthError::Unavailable(r) => {
            r.clone()
        }
    }
}

fn join(base: &Url, path: &str) -> Result<Url, String> {
    let mut base = base.clone();
    if !base.path().ends_with('/') {
        let with_slash = format!("{}/", base.path());
        base.set_path(&with_slash);
    }
    base.join(path).map_err(|e| e.to_string())
}

/// `system:serviceaccount:<namespace>:<name>` -> (namespace, name).
fn parse_service_account(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    (names::is_namespace(namespace) && names::is_service_account(name)).then_some((namespace, name))
}

/// The `exp` of a JWT-shaped token, read without verification (the API server verified it).
fn token_expiry(token: &str) -> Option<SystemTime> {
    #[derive(Deserialize)]
    struct Exp {
        exp: u64,
    }
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let exp: Exp = serde_json::from_slice(&bytes).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(exp.exp))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn service_account_usernames() {
        assert_eq!(
            parse_service_account("system:serviceaccount:team-a:builder"),
            Some(("team-a", "builder"))
        );
        assert_eq!(parse_service_account("system:serviceaccount:team-a"), None);
        assert_eq!(parse_service_account("system:serviceaccount:Team:x"), None);
        assert_eq!(parse_service_account("system:serviceaccount:a:b:c"), None);
        assert_eq!(parse_service_account("alice"), None);
    }

    #[test]
    fn node_binding_needs_exactly_one_valid_node_name() {
        let extra = |values: &[&str]| {
            BTreeMap::from([(
                NODE_NAME_EXTRA.to_owned(),
                values.iter().map(|v| (*v).to_owned()).collect::<Vec<_>>(),
            )])
        };
        assert_eq!(bound_node(&extra(&["node-a"])), Some("node-a".to_owned()));
        assert_eq!(bound_node(&extra(&[])), None);
        assert_eq!(bound_node(&extra(&["node-a", "node-a"])), None);
        assert_eq!(bound_node(&extra(&["Node A"])), None);
        assert_eq!(bound_node(&extra(&["../node-a"])), None);
        assert_eq!(bound_node(&BTreeMap::new()), None);
        let other = BTreeMap::from([(
            "authentication.kubernetes.io/pod-name".to_owned(),
            vec!["node-a".to_owned()],
        )]);
        assert_eq!(bound_node(&other), None);
    }

    #[test]
    fn expiry_from_jwt_payload() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"exp":2000000000,"sub":"x"}"#);
        let token = format!("e30.{payload}.sig");
        assert_eq!(
            token_expiry(&token),
            UNIX_EPOCH.checked_add(Duration::from_secs(2_000_000_000))
        );
        assert_eq!(token_expiry("opaque-token"), None);
        assert_eq!(token_expiry("a.b.c.d"), None);
        assert_eq!(
            token_expiry(&format!("e30.{}.s", URL_SAFE_NO_PAD.encode(b"{}"))),
            None
        );
    }

    #[test]
    fn url_join_keeps_base_path() {
        let base = Url::parse("https://k8s.example.com/prefix").expect("url");
        assert_eq!(
            join(&base, REVIEW_PATH).expect("join").as_str(),
            "https://k8s.example.com/prefix/apis/authentication.k8s.io/v1/tokenreviews"
        );
    }

    #[test]
    fn scope_keys_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        fs::write(&token, "broker-token\n").expect("write");
        let mut cfg = TokenReviewConfig::new("https://k8s.example.com");
        cfg.token_file = token;
        cfg.scopes
            .insert("team-a/*".into(), BTreeSet::from([Scope::Issue]));
        assert!(TokenReviewAuthenticator::new(cfg.clone()).is_ok());
        cfg.scopes.insert("nonsense".into(), BTreeSet::new());
        assert!(matches!(
            TokenReviewAuthenticator::new(cfg),
            Err(TokenReviewConfigError::ScopeKey(_))
        ));
    }

    #[test]
    fn missing_token_file_is_a_config_error() {
        let mut cfg = TokenReviewConfig::new("https://k8s.example.com");
        cfg.token_file = PathBuf::from("/nonexistent/paddock/token");
        assert!(matches!(
            TokenReviewAuthenticator::new(cfg),
            Err(TokenReviewConfigError::TokenFile(_))
        ));
    }
}
