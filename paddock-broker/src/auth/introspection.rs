//! OAuth 2.0 token introspection (RFC 7662): opaque bearers checked at the identity provider.
//!
//! Each new bearer costs one `POST <endpoint>` (`token=<bearer>&token_type_hint=access_token`,
//! the broker authenticated with HTTP Basic `client_secret_basic` from a secret file that is
//! re-read when it changes). Only an answer of HTTP 200 with `"active": true` (the JSON boolean)
//! authenticates; the token's `scope` (space-separated) becomes broker scopes only through the
//! configured mapping, so an unmapped scope grants nothing and a route still needs its own
//! scope. `allowedClientIds`, when set, pins the OAuth client the token was issued to.
//!
//! Positive answers are cached, keyed by the bearer's SHA-256, until the earlier of the token's
//! `exp` and `cacheTtl`; refusals and failures are never cached. An endpoint that is down, slow
//! (past `httpTimeout`), refuses the broker's credentials or answers nonsense is `Unavailable`
//! (503, the chain stops there: fail closed).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use url::Url;

use super::{
    AuthError, AuthFuture, Authenticator, Identity, Scope, config_serde,
    fetch::{FetchError, JsonClient, parse_service_url},
    jwt::claim,
    names,
    token_file::TokenFile,
};

const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Configuration of the introspection backend. Holds paths, never the client secret.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IntrospectionConfig {
    /// The RFC 7662 endpoint, e.g. `https://idp.example.com/oauth2/introspect`.
    pub endpoint: String,
    /// CA bundle for the endpoint (the webpki roots when unset).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The broker's own OAuth client id at the endpoint.
    pub client_id: String,
    /// File holding the broker's client secret, re-read when it changes.
    pub client_secret_file: PathBuf,
    /// Broker scopes per token scope (`scope` values of the answer). A token scope that is not
    /// a key here grants nothing.
    #[serde(default, deserialize_with = "config_serde::scope_map")]
    pub scopes: BTreeMap<String, BTreeSet<Scope>>,
    /// When set, only tokens whose answer names one of these `client_id`s authenticate.
    #[serde(default)]
    pub allowed_client_ids: Option<Vec<String>>,
    /// The answer member that names the caller's namespace (a JSON pointer when it starts
    /// with `/`, e.g. `/ext/namespace`); required in every answer.
    #[serde(default = "default_namespace_claim")]
    pub namespace_claim: String,
    /// Upper bound on how long a positive answer is reused (never past the token's `exp`);
    /// zero asks the endpoint on every request.
    #[serde(
        default = "default_cache_ttl",
        deserialize_with = "config_serde::duration"
    )]
    pub cache_ttl: Duration,
    /// Cached answers, at most.
    #[serde(default = "default_capacity")]
    pub cache_capacity: usize,
    /// Deadline of one introspection (connect, TLS, request and answer).
    #[serde(
        default = "default_http_timeout",
        deserialize_with = "config_serde::duration"
    )]
    pub http_timeout: Duration,
}

fn default_namespace_claim() -> String {
    "namespace".to_owned()
}
fn default_cache_ttl() -> Duration {
    Duration::from_mins(1)
}
fn default_capacity() -> usize {
    10_000
}
fn default_http_timeout() -> Duration {
    Duration::from_secs(5)
}

impl IntrospectionConfig {
    /// A config with defaults for everything but the endpoint and the broker's client.
    #[must_use]
    pub fn new(
        endpoint: impl Into<String>,
        client_id: impl Into<String>,
        client_secret_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            endpoint: endpoint.into(),
            ca_file: None,
            client_id: client_id.into(),
            client_secret_file: client_secret_file.into(),
            scopes: BTreeMap::new(),
            allowed_client_ids: None,
            namespace_claim: default_namespace_claim(),
            cache_ttl: default_cache_ttl(),
            cache_capacity: default_capacity(),
            http_timeout: default_http_timeout(),
        }
    }

    /// Checks everything that needs no file or network: the endpoint URL, names, bounds.
    pub fn validate(&self) -> Result<Url, IntrospectionConfigError> {
        let url = parse_service_url(&self.endpoint).map_err(IntrospectionConfigError::Endpoint)?;
        if self.client_id.is_empty() || self.client_id.chars().any(char::is_control) {
            return Err(IntrospectionConfigError::ClientId);
        }
        if self
            .allowed_client_ids
            .as_ref()
            .is_some_and(|ids| ids.is_empty() || ids.iter().any(String::is_empty))
        {
            return Err(IntrospectionConfigError::AllowedClientIds);
        }
        if self.namespace_claim.is_empty() {
            return Err(IntrospectionConfigError::NamespaceClaim);
        }
        if self.cache_capacity == 0 {
            return Err(IntrospectionConfigError::Capacity);
        }
        if self.http_timeout.is_zero() {
            return Err(IntrospectionConfigError::Timeout);
        }
        if let Some(key) = self
            .scopes
            .keys()
            .find(|k| k.is_empty() || k.chars().any(|c| c.is_ascii_whitespace()))
        {
            return Err(IntrospectionConfigError::ScopeKey(key.clone()));
        }
        Ok(url)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IntrospectionConfigError {
    #[error("introspection: endpoint: {0}")]
    Endpoint(String),
    #[error("introspection: clientId must be a non-empty name")]
    ClientId,
    #[error("introspection: allowedClientIds, when given, must list non-empty client ids")]
    AllowedClientIds,
    #[error("introspection: namespaceClaim must not be empty")]
    NamespaceClaim,
    #[error("introspection: cacheCapacity must be at least 1")]
    Capacity,
    #[error("introspection: httpTimeout must be greater than zero")]
    Timeout,
    #[error("introspection: scopes key {0:?} is not a single OAuth scope")]
    ScopeKey(String),
    #[error("introspection: client secret: {0}")]
    Secret(String),
    #[error("introspection: HTTP client: {0}")]
    Client(String),
}

#[derive(Clone)]
struct Cached {
    identity: Identity,
    expires: Instant,
}

/// The RFC 7662 introspection [`Authenticator`].
pub struct IntrospectionAuthenticator {
    config: IntrospectionConfig,
    url: Url,
    client: JsonClient,
    secret: TokenFile,
    cache: quick_cache::sync::Cache<[u8; 32], Cached>,
}

impl std::fmt::Debug for IntrospectionAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntrospectionAuthenticator")
            .field("config", &self.config)
            .field("secret", &self.secret)
            .field("cached_answers", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl IntrospectionAuthenticator {
    /// Checks the config and that the client secret file is readable now.
    pub fn new(config: IntrospectionConfig) -> Result<Self, IntrospectionConfigError> {
        let url = config.validate()?;
        let secret = TokenFile::new(config.client_secret_file.clone());
        secret.read().map_err(IntrospectionConfigError::Secret)?;
        let client = JsonClient::new(config.ca_file.as_deref(), config.http_timeout)
            .map_err(|e| IntrospectionConfigError::Client(e.to_string()))?;
        Ok(Self {
            cache: quick_cache::sync::Cache::new(config.cache_capacity),
            url,
            client,
            secret,
            config,
        })
    }

    async fn verify(&self, bearer: &str) -> Result<Identity, AuthError> {
        if bearer.is_empty() || bearer.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Unauthenticated(
                "introspection: token empty or too long".into(),
            ));
        }
        let key: [u8; 32] = Sha256::digest(bearer.as_bytes()).into();
        // Two rounds at most: the second only after dropping an expired entry.
        for _ in 0..2 {
            let guard = match self.cache.get_value_or_guard_async(&key).await {
                Ok(hit) if hit.expires > Instant::now() => return Ok(hit.identity),
                Ok(_) => {
                    self.cache.remove(&key);
                    continue;
                }
                Err(guard) => guard,
            };
            // Refusals and failures drop the guard without an entry: never cached.
            let (identity, ttl) = self.introspect(bearer).await?;
            let ttl = ttl.min(self.config.cache_ttl);
            if !ttl.is_zero() {
                let _ = guard.insert(Cached {
                    identity: identity.clone(),
                    expires: Instant::now() + ttl,
                });
            }
            return Ok(identity);
        }
        Err(AuthError::Unavailable(
            "introspection: cache entry kept expiring".into(),
        ))
    }

    /// Asks the endpoint; on success, the identity and how long the token has left.
    async fn introspect(&self, bearer: &str) -> Result<(Identity, Duration), AuthError> {
        let secret = self
            .secret
            .read()
            .map_err(|e| AuthError::Unavailable(format!("introspection: client secret: {e}")))?;
        let answer: Map<String, Value> = self
            .client
            .post_form_basic(
                &self.url,
                &[("token", bearer), ("token_type_hint", "access_token")],
                (&self.config.client_id, &secret),
                &[StatusCode::OK],
            )
            .await
            .map_err(|e| match e {
                FetchError::Status {
                    status: 401 | 403, ..
                } => AuthError::Unavailable(format!(
                    "introspection: the endpoint refused the broker's client credentials ({e})"
                )),
                other => AuthError::Unavailable(format!("introspection: {other}")),
            })?;
        self.identity(&answer, SystemTime::now())
    }

    /// Judges one introspection answer at time `now`.
    fn identity(
        &self,
        answer: &Map<String, Value>,
        now: SystemTime,
    ) -> Result<(Identity, Duration), AuthError> {
        let refuse = |why: &str| AuthError::Unauthenticated(format!("introspection: {why}"));
        // RFC 7662 section 2.2: anything but the boolean true is an inactive token.
        if answer.get("active") != Some(&Value::Bool(true)) {
            return Err(refuse("token not active"));
        }
        let at = |secs: u64| UNIX_EPOCH.checked_add(Duration::from_secs(secs));
        // Measured against the precise clock: a whole-second `exp` is never overshot.
        let left = match answer.get("exp") {
            None => Duration::MAX,
            Some(v) => match v.as_u64().and_then(at) {
                Some(exp) => exp
                    .duration_since(now)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| refuse("token expired"))?,
                None => return Err(refuse("exp is not a number of seconds")),
            },
        };
        match answer.get("nbf") {
            None => {}
            Some(v) if v.as_u64().and_then(at).is_some_and(|nbf| nbf <= now) => {}
            Some(_) => return Err(refuse("token not yet valid")),
        }
        let client_id = answer.get("client_id").and_then(Value::as_str);
        if let Some(allowed) = &self.config.allowed_client_ids
            && !client_id.is_some_and(|id| allowed.iter().any(|a| a == id))
        {
            return Err(refuse("client_id not allowed"));
        }
        let subject = answer
            .get("sub")
            .and_then(Value::as_str)
            .or(client_id)
            .filter(|s| names::is_subject(s))
            .ok_or_else(|| refuse("answer names no valid sub or client_id"))?;
        let namespace = claim(answer, &self.config.namespace_claim)
            .and_then(Value::as_str)
            .filter(|s| names::is_namespace(s))
            .ok_or_else(|| {
                refuse(&format!(
                    "member {:?} (namespace) missing or invalid",
                    self.config.namespace_claim
                ))
            })?;
        let scopes = answer
            .get("scope")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .split_ascii_whitespace()
            .filter_map(|s| self.config.scopes.get(s))
            .flatten()
            .copied()
            .collect();
        Ok((
            Identity {
                subject: subject.to_owned(),
                namespace: namespace.to_owned(),
                service_account: None,
                scopes,
                backend: "introspection",
                run: None,
                node: None,
                placement: None,
            },
            left,
        ))
    }
}

impl Authenticator for IntrospectionAuthenticator {
    fn name(&self) -> &'static str {
        "introspection"
    }

    fn authenticate<'a>(&'a self, bearer: &'a str) -> AuthFuture<'a> {
        Box::pin(self.verify(bearer))
    }

    /// Introspects a token no issuer made: an `active: false` answer shows the endpoint is
    /// up and accepts the broker's client credentials (never cached, like every question).
    fn readiness(&self) -> super::ReadinessFuture<'_> {
        Box::pin(async move {
            let outcome = match self.introspect(READINESS_PROBE_TOKEN).await {
                Ok(_) | Err(AuthError::Unauthenticated(_) | AuthError::Forbidden(_)) => {
                    Ok("endpoint answering, client credentials accepted".to_owned())
                }
                Err(AuthError::Unavailable(why)) => Err(why),
            };
            vec![super::BackendReadiness {
                name: self.name(),
                outcome,
            }]
        })
    }
}

/// The token readiness probes introspect: no issuer makes one like it.
const READINESS_PROBE_TOKEN: &str = "paddock-broker-readiness-probe-not-a-token";

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn backend(
        dir: &tempfile::TempDir,
        edit: impl FnOnce(&mut IntrospectionConfig),
    ) -> Result<IntrospectionAuthenticator, IntrospectionConfigError> {
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret-value\n").expect("secret");
        let mut cfg = IntrospectionConfig::new(
            "https://idp.example.com/introspect",
            "paddock-broker",
            secret,
        );
        cfg.scopes.insert(
            "paddock.proxy".into(),
            BTreeSet::from([Scope::ValidateEgress, Scope::SubstituteAuth]),
        );
        cfg.scopes
            .insert("paddock.issue".into(), BTreeSet::from([Scope::Issue]));
        edit(&mut cfg);
        IntrospectionAuthenticator::new(cfg)
    }

    fn judge(
        b: &IntrospectionAuthenticator,
        answer: &Value,
    ) -> Result<(Identity, Duration), AuthError> {
        let Value::Object(map) = answer else {
            panic!("object")
        };
        b.identity(map, UNIX_EPOCH + Duration::from_secs(1_000_000))
    }

    #[test]
    fn answers_are_judged_strictly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b =
            backend(&dir, |c| c.allowed_client_ids = Some(vec!["proxy".into()])).expect("backend");
        let good = json!({"active": true, "sub": "proxy", "client_id": "proxy", "namespace": "team-a",
                          "scope": "openid paddock.proxy unknown", "exp": 1_000_030});
        let (id, left) = judge(&b, &good).expect("active");
        assert_eq!(
            id.scopes,
            BTreeSet::from([Scope::ValidateEgress, Scope::SubstituteAuth])
        );
        assert_eq!(
            (id.subject.as_str(), id.namespace.as_str(), id.backend),
            ("proxy", "team-a", "introspection")
        );
        assert_eq!(left, Duration::from_secs(30));
        for (what, edit) in [
            ("inactive", json!({"active": false})),
            ("string active", json!({"active": "true"})),
            ("expired", json!({"exp": 999_999})),
            ("exp not a number", json!({"exp": "soon"})),
            ("not yet valid", json!({"nbf": 1_000_100})),
            ("other client", json!({"client_id": "someone"})),
            ("bad namespace", json!({"namespace": "../x"})),
            ("no subject", json!({"sub": null, "client_id": null})),
        ] {
            let mut answer = good.clone();
            for (k, v) in edit.as_object().expect("object") {
                if v.is_null() {
                    answer.as_object_mut().expect("o").remove(k);
                } else {
                    answer[k] = v.clone();
                }
            }
            // A null sub and client_id also trips the client pin; either way it is refused.
            assert!(
                matches!(judge(&b, &answer), Err(AuthError::Unauthenticated(_))),
                "{what}"
            );
        }
        let mut missing = good.clone();
        missing.as_object_mut().expect("o").remove("active");
        assert!(judge(&b, &missing).is_err());
        // No mapped scope: authenticated, with nothing to do.
        let mut unmapped = good.clone();
        unmapped["scope"] = json!("openid admin");
        assert!(judge(&b, &unmapped).expect("active").0.scopes.is_empty());
    }

    #[test]
    fn config_is_checked_and_the_secret_never_shown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = backend(&dir, |_| {}).expect("backend");
        assert!(!format!("{b:?}").contains("s3cret"));
        for (edit, needle) in [
            (
                Box::new(|c: &mut IntrospectionConfig| {
                    c.endpoint = "http://idp.example.com/i".into();
                }) as Box<dyn FnOnce(&mut IntrospectionConfig)>,
                "https",
            ),
            (
                Box::new(|c: &mut IntrospectionConfig| c.client_id = String::new()),
                "clientId",
            ),
            (
                Box::new(|c: &mut IntrospectionConfig| c.allowed_client_ids = Some(vec![])),
                "allowedClientIds",
            ),
            (
                Box::new(|c: &mut IntrospectionConfig| c.cache_capacity = 0),
                "cacheCapacity",
            ),
            (
                Box::new(|c: &mut IntrospectionConfig| c.http_timeout = Duration::ZERO),
                "httpTimeout",
            ),
            (
                Box::new(|c: &mut IntrospectionConfig| {
                    c.scopes.insert("a b".into(), BTreeSet::new());
                }),
                "scopes key",
            ),
            (
                Box::new(|c: &mut IntrospectionConfig| {
                    c.client_secret_file = "/nonexistent/secret".into();
                }),
                "client secret",
            ),
        ] {
            let e = backend(&dir, edit).expect_err(needle).to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
