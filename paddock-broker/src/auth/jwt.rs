//! OIDC / JWT bearer authentication.
//!
//! Keys come from the issuer's JWKS (found through `/.well-known/openid-configuration`, or a
//! configured `jwks_uri`), are cached, and are re-fetched when a token names an unknown `kid`
//! or the cache ages out. Re-fetches are serialised and spaced at least `jwks_min_refresh`
//! apart, so a flood of tokens with random `kid`s costs the issuer at most one request per
//! interval. Only asymmetric algorithms can be configured: `none` and HMAC cannot be expressed,
//! so a token "signed" with a public key as an HMAC secret never verifies. Keys named inside
//! a token (`jku`, `jwk`, `x5u`, `x5c` headers) are never used. A verified token's identity is
//! reused for `verified_cache_ttl` (keyed by the token's SHA-256, never past its `exp`, and
//! forgotten whenever the key set is re-fetched), so steady callers cost no signature check.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use jsonwebtoken::{
    Algorithm, DecodingKey, Header, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse},
};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use url::Url;

use super::{
    AuthError, AuthFuture, Authenticator, Identity, Scope, config_serde,
    fetch::{JsonClient, parse_service_url},
    names,
};

/// Tokens longer than this are refused before any parsing.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// RSA keys below 2048 bits are ignored when loading a JWKS.
const MIN_RSA_MODULUS_BYTES: usize = 256;

/// Asymmetric JWS algorithms the broker can be configured to accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
pub enum JwtAlgorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl JwtAlgorithm {
    fn to_jsonwebtoken(self) -> Algorithm {
        match self {
            JwtAlgorithm::RS256 => Algorithm::RS256,
            JwtAlgorithm::RS384 => Algorithm::RS384,
            JwtAlgorithm::RS512 => Algorithm::RS512,
            JwtAlgorithm::PS256 => Algorithm::PS256,
            JwtAlgorithm::PS384 => Algorithm::PS384,
            JwtAlgorithm::PS512 => Algorithm::PS512,
            JwtAlgorithm::ES256 => Algorithm::ES256,
            JwtAlgorithm::ES384 => Algorithm::ES384,
            JwtAlgorithm::EdDSA => Algorithm::EdDSA,
        }
    }
}

/// A claim that must be present with a given value: a string claim equal to `value`, or an
/// array claim with an element equal to `value`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequiredClaim {
    /// Claim name, or a JSON pointer into the claims when it starts with `/`
    /// (e.g. `/kubernetes.io/namespace`).
    pub claim: String,
    pub value: String,
}

/// Which claims make up the [`Identity`]. Names starting with `/` are JSON pointers.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ClaimMapping {
    /// Becomes `Identity::subject` (default `sub`).
    pub subject: String,
    /// Becomes `Identity::namespace`; required in every token (default `namespace`).
    pub namespace: String,
    /// Becomes `Identity::service_account` when present (default: not mapped).
    pub service_account: Option<String>,
    /// Scopes, as a space-separated string or an array of wire names (default `scope`).
    /// Values that are not broker scopes (e.g. `openid`) are ignored.
    pub scopes: String,
}

impl Default for ClaimMapping {
    fn default() -> Self {
        Self {
            subject: "sub".to_owned(),
            namespace: "namespace".to_owned(),
            service_account: None,
            scopes: "scope".to_owned(),
        }
    }
}

/// Configuration of the JWT backend. Holds no secret.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtConfig {
    /// Exact `iss` value; discovery reads `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    /// Accepted `aud` values (a token must name at least one).
    pub audiences: Vec<String>,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<JwtAlgorithm>,
    #[serde(default)]
    pub required_claims: Vec<RequiredClaim>,
    #[serde(default)]
    pub claims: ClaimMapping,
    /// Clock skew tolerated on `exp` / `nbf`.
    #[serde(
        default = "default_leeway",
        deserialize_with = "config_serde::duration"
    )]
    pub leeway: Duration,
    /// Skips discovery when set.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// PEM bundle to trust instead of the webpki roots for the issuer and JWKS.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    #[serde(
        default = "default_http_timeout",
        deserialize_with = "config_serde::duration"
    )]
    pub http_timeout: Duration,
    /// Minimum spacing between two JWKS fetches (unknown `kid`, failures, ageing).
    #[serde(
        default = "default_min_refresh",
        deserialize_with = "config_serde::duration"
    )]
    pub jwks_min_refresh: Duration,
    /// Keys older than this are re-fetched on the next request (the old set stays in use if
    /// the issuer is unreachable).
    #[serde(
        default = "default_max_age",
        deserialize_with = "config_serde::duration"
    )]
    pub jwks_max_age: Duration,
    /// How long a verified token's identity is reused without checking its signature again
    /// (never past the token's `exp`, and dropped whenever the key set is re-fetched); zero
    /// verifies every request.
    #[serde(
        default = "default_verified_ttl",
        deserialize_with = "config_serde::duration"
    )]
    pub verified_cache_ttl: Duration,
    /// Verified tokens remembered, at most.
    #[serde(default = "default_verified_capacity")]
    pub verified_cache_capacity: usize,
}

fn default_algorithms() -> Vec<JwtAlgorithm> {
    vec![JwtAlgorithm::RS256, JwtAlgorithm::ES256]
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_http_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_min_refresh() -> Duration {
    Duration::from_secs(30)
}
fn default_max_age() -> Duration {
    Duration::from_hours(1)
}
fn default_verified_ttl() -> Duration {
    Duration::from_mins(1)
}
fn default_verified_capacity() -> usize {
    10_000
}

impl JwtConfig {
    /// A config with defaults for everything but the issuer and audiences.
    #[must_use]
    pub fn new(issuer: impl Into<String>, audiences: Vec<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audiences,
            algorithms: default_algorithms(),
            required_claims: Vec::new(),
            claims: ClaimMapping::default(),
            leeway: default_leeway(),
            jwks_uri: None,
            ca_file: None,
            http_timeout: default_http_timeout(),
            jwks_min_refresh: default_min_refresh(),
            jwks_max_age: default_max_age(),
            verified_cache_ttl: default_verified_ttl(),
            verified_cache_capacity: default_verified_capacity(),
        }
    }
}

/// A JWT backend configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    #[error("jwt: issuer: {0}")]
    Issuer(String),
    #[error("jwt: jwksUri: {0}")]
    JwksUri(String),
    #[error("jwt: at least one audience is required")]
    NoAudience,
    #[error("jwt: at least one algorithm is required")]
    NoAlgorithm,
    #[error("jwt: claim mapping: {0}")]
    Mapping(String),
    #[error("jwt: HTTP client: {0}")]
    Client(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

struct VerifyKey {
    key: DecodingKey,
    kind: KeyKind,
    alg: Option<Algorithm>,
}

impl VerifyKey {
    fn from_jwk(jwk: &Jwk) -> Option<Self> {
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != PublicKeyUse::Signature)
        {
            return None;
        }
        if let Some(ops) = &jwk.common.key_operations
            && !ops.contains(&KeyOperations::Verify)
        {
            return None;
        }
        let alg = match &jwk.common.key_algorithm {
            None => None,
            Some(a) => Some(Algorithm::try_from(*a).ok()?),
        };
        let kind = match &jwk.algorithm {
            AlgorithmParameters::RSA(p) => {
                let n = base64::Engine::decode(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                    p.n.trim_end_matches('='),
                )
                .ok()?;
                let significant = n.iter().skip_while(|b| **b == 0).count();
                if significant < MIN_RSA_MODULUS_BYTES {
                    return None;
                }
                KeyKind::Rsa
            }
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => KeyKind::P256,
                EllipticCurve::P384 => KeyKind::P384,
                _ => return None,
            },
            AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                EllipticCurve::Ed25519 => KeyKind::Ed25519,
                _ => return None,
            },
            // Symmetric ("oct") and unknown key types never verify anything here.
            _ => return None,
        };
        let key = DecodingKey::from_jwk(jwk).ok()?;
        Some(Self { key, kind, alg })
    }

    fn fits(&self, alg: Algorithm) -> bool {
        let kind_ok = match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => self.kind == KeyKind::Rsa,
            Algorithm::ES256 => self.kind == KeyKind::P256,
            Algorithm::ES384 => self.kind == KeyKind::P384,
            Algorithm::EdDSA => self.kind == KeyKind::Ed25519,
            _ => false,
        };
        kind_ok && self.alg.is_none_or(|a| a == alg)
    }
}

struct KeySet {
    by_kid: HashMap<String, Arc<VerifyKey>>,
    without_kid: Vec<Arc<VerifyKey>>,
    fetched_at: Instant,
}

enum Lookup {
    Found(Arc<VerifyKey>),
    /// The token names a `kid` this set does not have.
    UnknownKid,
    /// No usable key for this token (wrong type, or ambiguous without a `kid`).
    NoKey,
}

impl KeySet {
    fn lookup(&self, header: &Header) -> Lookup {
        let Some(kid) = &header.kid else {
            // Without a kid the choice must be unambiguous.
            let mut fitting = self
                .by_kid
                .values()
                .chain(self.without_kid.iter())
                .filter(|k| k.fits(header.alg));
            return match (fitting.next(), fitting.next()) {
                (Some(key), None) => Lookup::Found(Arc::clone(key)),
                _ => Lookup::NoKey,
            };
        };
        match self.by_kid.get(kid) {
            Some(key) if key.fits(header.alg) => Lookup::Found(Arc::clone(key)),
            Some(_) => Lookup::NoKey,
            None => Lookup::UnknownKid,
        }
    }
}

#[derive(Default)]
struct RefreshState {
    jwks_url: Option<Url>,
    last_attempt: Option<Instant>,
}

/// The OIDC / JWT [`Authenticator`].
pub struct JwtAuthenticator {
    config: JwtConfig,
    issuer_url: Url,
    algorithms: Vec<Algorithm>,
    client: JsonClient,
    keys: RwLock<Option<Arc<KeySet>>>,
    generation: AtomicU64,
    refresh: tokio::sync::Mutex<RefreshState>,
    /// Identities of verified tokens, keyed by the token's SHA-256 (never the token).
    verified: Option<quick_cache::sync::Cache<[u8; 32], Verified>>,
}

#[derive(Clone)]
struct Verified {
    identity: Identity,
    until: Instant,
    generation: u64,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthenticator")
            .field("config", &self.config)
            .field("key_generation", &self.generation.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<Value>,
}

impl JwtAuthenticator {
    pub fn new(config: JwtConfig) -> Result<Self, JwtConfigError> {
        let issuer_url = parse_service_url(&config.issuer).map_err(JwtConfigError::Issuer)?;
        let jwks_url = match &config.jwks_uri {
            Some(raw) => Some(parse_service_url(raw).map_err(JwtConfigError::JwksUri)?),
            None => None,
        };
        if config.audiences.is_empty() || config.audiences.iter().any(String::is_empty) {
            return Err(JwtConfigError::NoAudience);
        }
        if config.algorithms.is_empty() {
            return Err(JwtConfigError::NoAlgorithm);
        }
        let mapping = &config.claims;
        for (what, name) in [
            ("subject", Some(&mapping.subject)),
            ("namespace", Some(&mapping.namespace)),
            ("service_account", mapping.service_account.as_ref()),
            ("scopes", Some(&mapping.scopes)),
        ] {
            if name.is_some_and(String::is_empty) {
                return Err(JwtConfigError::Mapping(format!(
                    "{what} claim name is empty"
                )));
            }
        }
        if config.required_claims.iter().any(|c| c.claim.is_empty()) {
            return Err(JwtConfigError::Mapping(
                "required claim with empty name".to_owned(),
            ));
        }
        let client = JsonClient::new(config.ca_file.as_deref(), config.http_timeout)
            .map_err(|e| JwtConfigError::Client(e.to_string()))?;
        let mut algorithms: Vec<Algorithm> = config
            .algorithms
            .iter()
            .map(|a| a.to_jsonwebtoken())
            .collect();
        algorithms.dedup();
        let verified = (!config.verified_cache_ttl.is_zero() && config.verified_cache_capacity > 0)
            .then(|| quick_cache::sync::Cache::new(config.verified_cache_capacity));
        Ok(Self {
            verified,
            issuer_url,
            algorithms,
            client,
            keys: RwLock::new(None),
            generation: AtomicU64::new(0),
            refresh: tokio::sync::Mutex::new(RefreshState {
                jwks_url,
                last_attempt: None,
            }),
            config,
        })
    }

    /// Fetches the JWKS now (e.g. at startup, to fail readiness early). Subject to the same
    /// spacing as every other fetch.
    pub async fn refresh_keys(&self) -> Result<(), AuthError> {
        let seen = self.generation.load(Ordering::Acquire);
        if self.refresh(seen).await? {
            Ok(())
        } else {
            Err(AuthError::Unavailable(
                "jwt: JWKS fetch rate-limited".to_owned(),
            ))
        }
    }

    fn current_keys(&self) -> Result<Option<Arc<KeySet>>, AuthError> {
        self.keys
            .read()
            .map(|guard| guard.clone())
            .map_err(|_| AuthError::Unavailable("jwt: key cache poisoned".to_owned()))
    }

    /// Fetches the JWKS unless another task did since `seen` (then `Ok(true)` at once) or the
    /// last attempt is too recent (`Ok(false)`).
    async fn refresh(&self, seen: u64) -> Result<bool, AuthError> {
        let mut state = self.refresh.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return Ok(true);
        }
        if state
            .last_attempt
            .is_some_and(|t| t.elapsed() < self.config.jwks_min_refresh)
        {
            return Ok(false);
        }
        state.last_attempt = Some(Instant::now());
        let jwks_url = if let Some(url) = &state.jwks_url {
            url.clone()
        } else {
            let url = self.discover().await?;
            state.jwks_url = Some(url.clone());
            url
        };
        let fetched = self.fetch_jwks(&jwks_url).await;
        let set = match fetched {
            Ok(set) => set,
            Err(err) => {
                // Re-discover next time in case the issuer moved its JWKS.
                if self.config.jwks_uri.is_none() {
                    state.jwks_url = None;
                }
                return Err(err);
            }
        };
        let mut keys = self
            .keys
            .write()
            .map_err(|_| AuthError::Unavailable("jwt: key cache poisoned".to_owned()))?;
        *keys = Some(Arc::new(set));
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }

    async fn discover(&self) -> Result<Url, AuthError> {
        let base = self.issuer_url.as_str().trim_end_matches('/');
        let url = Url::parse(&format!("{base}/.well-known/openid-configuration"))
            .map_err(|e| AuthError::Unavailable(format!("jwt: discovery URL: {e}")))?;
        let doc: Discovery = self
            .client
            .get_json(&url)
            .await
            .map_err(|e| AuthError::Unavailable(format!("jwt: discovery: {e}")))?;
        if doc.issuer != self.config.issuer {
            return Err(AuthError::Unavailable(format!(
                "jwt: discovery document names issuer {:?}, expected {:?}",
                doc.issuer, self.config.issuer
            )));
        }
        parse_service_url(&doc.jwks_uri)
            .map_err(|e| AuthError::Unavailable(format!("jwt: discovered jwks_uri: {e}")))
    }

    async fn fetch_jwks(&self, url: &Url) -> Result<KeySet, AuthError> {
        let raw: RawJwks = self
            .client
            .get_json(url)
            .await
            .map_err(|e| AuthError::Unavailable(format!("jwt: JWKS: {e}")))?;
        let mut set = KeySet {
            by_kid: HashMap::new(),
            without_kid: Vec::new(),
            fetched_at: Instant::now(),
        };
        let mut skipped = 0usize;
        for value in raw.keys {
            // One odd key (an encryption key, an unknown type) must not hide the others.
            let Some(jwk) = serde_json::from_value::<Jwk>(value).ok() else {
                skipped += 1;
                continue;
            };
            let Some(key) = VerifyKey::from_jwk(&jwk) else {
                skipped += 1;
                continue;
            };
            match jwk.common.key_id {
                Some(kid) => {
                    set.by_kid.insert(kid, Arc::new(key));
                }
                None => set.without_kid.push(Arc::new(key)),
            }
        }
        if set.by_kid.is_empty() && set.without_kid.is_empty() {
            return Err(AuthError::Unavailable(format!(
                "jwt: JWKS at {url} has no usable signing key ({skipped} skipped)"
            )));
        }
        tracing::debug!(
            issuer = %self.config.issuer,
            keys = set.by_kid.len() + set.without_kid.len(),
            skipped,
            "jwt: JWKS loaded"
        );
        Ok(set)
    }

    async fn key_for(&self, header: &Header) -> Result<Arc<VerifyKey>, AuthError> {
        let seen = self.generation.load(Ordering::Acquire);
        match self.current_keys()? {
            None => {
                if !self.refresh(seen).await? {
                    return Err(AuthError::Unavailable(
                        "jwt: no JWKS loaded yet (retry spacing)".to_owned(),
                    ));
                }
            }
            Some(set) if set.fetched_at.elapsed() >= self.config.jwks_max_age => {
                if let Err(err) = self.refresh(seen).await {
                    tracing::warn!(issuer = %self.config.issuer, error = %err,
                        "jwt: JWKS refresh failed; keeping the previous keys");
                }
            }
            Some(set) => match set.lookup(header) {
                Lookup::Found(key) => return Ok(key),
                Lookup::NoKey => {
                    return Err(AuthError::Unauthenticated(
                        "jwt: no key fits the token".into(),
                    ));
                }
                Lookup::UnknownKid => {
                    // Either a rotation we have not seen or a made-up kid; the spacing in
                    // `refresh` bounds what the second case costs.
                    if let Err(err) = self.refresh(seen).await {
                        tracing::warn!(issuer = %self.config.issuer, error = %err,
                            "jwt: JWKS refresh for an unknown kid failed");
                    }
                }
            },
        }
        let set = self
            .current_keys()?
            .ok_or_else(|| AuthError::Unavailable("jwt: no JWKS loaded".to_owned()))?;
        match set.lookup(header) {
            Lookup::Found(key) => Ok(key),
            Lookup::UnknownKid => Err(AuthError::Unauthenticated("jwt: unknown key id".into())),
            Lookup::NoKey => Err(AuthError::Unauthenticated(
                "jwt: no key fits the token".into(),
            )),
        }
    }

    async fn verify(&self, bearer: &str) -> Result<Identity, AuthError> {
        if bearer.is_empty() || bearer.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Unauthenticated(
                "jwt: token empty or too long".into(),
            ));
        }
        let header = jsonwebtoken::decode_header(bearer)
            .map_err(|_| AuthError::Unauthenticated("jwt: malformed token header".into()))?;
        // RFC 7515 4.1.11: extensions we do not implement must not be silently ignored.
        if header.crit.as_ref().is_some_and(|c| !c.is_empty()) {
            return Err(AuthError::Unauthenticated(
                "jwt: unsupported critical header".into(),
            ));
        }
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::Unauthenticated(format!(
                "jwt: algorithm {:?} not allowed",
                header.alg
            )));
        }
        let digest: [u8; 32] = Sha256::digest(bearer.as_bytes()).into();
        // Read before the key lookup: a refresh during it makes this entry stale at once.
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(cache) = &self.verified
            && let Some(hit) = cache.get(&digest)
        {
            if hit.generation == generation && hit.until > Instant::now() {
                return Ok(hit.identity);
            }
            cache.remove(&digest);
        }
        let key = self.key_for(&header).await?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&self.config.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = self.config.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<Map<String, Value>>(bearer, &key.key, &validation)
            .map_err(|e| AuthError::Unauthenticated(describe(e.kind()).to_owned()))?;
        let identity = self.identity(&data.claims)?;
        if let Some(cache) = &self.verified {
            self.remember(cache, digest, &data.claims, &identity, generation);
        }
        Ok(identity)
    }

    /// Caches a verified identity until the earlier of the cache TTL and the token's own
    /// `exp` (without leeway); a token already at or past `exp` is not cached.
    fn remember(
        &self,
        cache: &quick_cache::sync::Cache<[u8; 32], Verified>,
        digest: [u8; 32],
        claims: &Map<String, Value>,
        identity: &Identity,
        generation: u64,
    ) {
        let Some(exp) = claims.get("exp").and_then(Value::as_u64) else {
            return;
        };
        let now = jsonwebtoken::get_current_timestamp();
        let Some(left) = exp.checked_sub(now).filter(|s| *s > 0) else {
            return;
        };
        let ttl = self
            .config
            .verified_cache_ttl
            .min(Duration::from_secs(left));
        cache.insert(
            digest,
            Verified {
                identity: identity.clone(),
                until: Instant::now() + ttl,
                generation,
            },
        );
    }

    fn identity(&self, claims: &Map<String, Value>) -> Result<Identity, AuthError> {
        for required in &self.config.required_claims {
            let matches = match claim(claims, &required.claim) {
                Some(Value::String(s)) => *s == required.value,
                Some(Value::Array(items)) => items
                    .iter()
                    .any(|v| v.as_str() == Some(required.value.as_str())),
                _ => false,
            };
            if !matches {
                return Err(AuthError::Unauthenticated(format!(
                    "jwt: required claim {:?} missing or not matching",
                    required.claim
                )));
            }
        }
        let mapping = &self.config.claims;
        let subject = string_claim(claims, &mapping.subject)
            .filter(|s| names::is_subject(s))
            .ok_or_else(|| unmapped("subject", &mapping.subject))?;
        let namespace = string_claim(claims, &mapping.namespace)
            .filter(|s| names::is_namespace(s))
            .ok_or_else(|| unmapped("namespace", &mapping.namespace))?;
        let service_account = match &mapping.service_account {
            None => None,
            Some(name) => Some(
                string_claim(claims, name)
                    .filter(|s| names::is_service_account(s))
                    .ok_or_else(|| unmapped("service account", name))?,
            ),
        };
        let scopes = scopes_from(claim(claims, &mapping.scopes));
        Ok(Identity {
            subject: subject.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.map(str::to_owned),
            scopes,
            backend: "jwt",
            run: None,
            node: None,
            placement: None,
        })
    }
}

impl Authenticator for JwtAuthenticator {
    fn name(&self) -> &'static str {
        "jwt"
    }

    fn authenticate<'a>(&'a self, bearer: &'a str) -> AuthFuture<'a> {
        Box::pin(self.verify(bearer))
    }

    /// Ready with keys in hand; without any yet, one fetch is tried now (subject to the usual
    /// spacing between fetches).
    fn readiness(&self) -> super::ReadinessFuture<'_> {
        Box::pin(async move {
            let outcome = match self.current_keys() {
                Ok(Some(keys)) => Ok(format!(
                    "{} keys, fetched {} s ago",
                    keys.by_kid.len() + keys.without_kid.len(),
                    keys.fetched_at.elapsed().as_secs()
                )),
                Ok(None) => self
                    .refresh_keys()
                    .await
                    .map(|()| "keys fetched".to_owned())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            vec![super::BackendReadiness {
                name: self.name(),
                outcome,
            }]
        })
    }
}

fn unmapped(what: &str, claim_name: &str) -> AuthError {
    AuthError::Unauthenticated(format!(
        "jwt: claim {claim_name:?} ({what}) missing or invalid"
    ))
}

/// Fixed reasons only: jsonwebtoken's own messages may quote parts of the token.
fn describe(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "jwt: token expired",
        ErrorKind::ImmatureSignature => "jwt: token not yet valid",
        ErrorKind::InvalidIssuer => "jwt: wrong issuer",
        ErrorKind::InvalidAudience => "jwt: wrong audience",
        ErrorKind::InvalidSignature => "jwt: bad signature",
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => "jwt: algorithm mismatch",
        ErrorKind::MissingRequiredClaim(_) => "jwt: a required registered claim is missing",
        ErrorKind::InvalidClaimFormat(_) => "jwt: a registered claim has the wrong type",
        _ => "jwt: malformed or unverifiable token",
    }
}

pub(super) fn claim<'c>(claims: &'c Map<String, Value>, name: &str) -> Option<&'c Value> {
    if let Some(pointer) = name.strip_prefix('/') {
        // The first segment is looked up directly so claim names with dots or slashes
        // (`kubernetes.io`, `https://example.com/ns`) need no escaping beyond RFC 6901's.
        let (first, rest) = pointer.split_once('/').unwrap_or((pointer, ""));
        let top = claims.get(&first.replace("~1", "/").replace("~0", "~"))?;
        if rest.is_empty() {
            Some(top)
        } else {
            top.pointer(&format!("/{rest}"))
        }
    } else {
        claims.get(name)
    }
}

fn string_claim<'c>(claims: &'c Map<String, Value>, name: &str) -> Option<&'c str> {
    claim(claims, name).and_then(Value::as_str)
}

fn scopes_from(value: Option<&Value>) -> BTreeSet<Scope> {
    match value {
        Some(Value::String(s)) => s
            .split_ascii_whitespace()
            .filter_map(Scope::parse)
            .collect(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .filter_map(Scope::parse)
            .collect(),
        _ => BTreeSet::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_pointer_claims() {
        let claims: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "kubernetes.io": {"namespace": "team-a", "serviceaccount": {"name": "ci"}},
            "a/b": "slash",
            "plain": "p"
        }))
        .expect("claims");
        assert_eq!(
            string_claim(&claims, "/kubernetes.io/namespace"),
            Some("team-a")
        );
        assert_eq!(
            string_claim(&claims, "/kubernetes.io/serviceaccount/name"),
            Some("ci")
        );
        assert_eq!(string_claim(&claims, "/a~1b"), Some("slash"));
        assert_eq!(string_claim(&claims, "plain"), Some("p"));
        assert_eq!(string_claim(&claims, "/missing/x"), None);
    }

    #[test]
    fn scopes_from_string_or_array() {
        let s = serde_json::json!("openid broker:issue  broker:renew bogus");
        assert_eq!(
            scopes_from(Some(&s)),
            BTreeSet::from([Scope::Issue, Scope::Renew])
        );
        let a = serde_json::json!(["broker:controller", 3, "email"]);
        assert_eq!(scopes_from(Some(&a)), BTreeSet::from([Scope::Controller]));
        assert!(scopes_from(Some(&serde_json::json!(7))).is_empty());
        assert!(scopes_from(None).is_empty());
    }

    #[test]
    fn config_rejects_hmac_and_none_algorithms() {
        for alg in ["HS256", "HS384", "HS512", "none"] {
            let doc = serde_json::json!({
                "issuer": "https://issuer.example.com",
                "audiences": ["paddock-broker"],
                "algorithms": [alg],
            });
            assert!(
                serde_json::from_value::<JwtConfig>(doc).is_err(),
                "{alg} accepted"
            );
        }
        let doc = serde_json::json!({
            "issuer": "https://issuer.example.com",
            "audiences": ["paddock-broker"],
            "algorithms": ["PS256", "EdDSA"],
            "leeway": "10s",
            "claims": {"namespace": "/kubernetes.io/namespace"},
        });
        let cfg: JwtConfig = serde_json::from_value(doc).expect("valid config");
        assert_eq!(cfg.leeway, Duration::from_secs(10));
        assert_eq!(cfg.claims.subject, "sub");
        assert!(JwtAuthenticator::new(cfg).is_ok());
    }

    #[test]
    fn config_validation() {
        let base = || JwtConfig::new("https://issuer.example.com", vec!["a".into()]);
        assert!(JwtAuthenticator::new(base()).is_ok());
        let mut c = base();
        c.audiences.clear();
        assert!(matches!(
            JwtAuthenticator::new(c),
            Err(JwtConfigError::NoAudience)
        ));
        let mut c = base();
        c.algorithms.clear();
        assert!(matches!(
            JwtAuthenticator::new(c),
            Err(JwtConfigError::NoAlgorithm)
        ));
        let mut c = base();
        c.issuer = "http://issuer.example.com".into();
        assert!(matches!(
            JwtAuthenticator::new(c),
            Err(JwtConfigError::Issuer(_))
        ));
        let mut c = base();
        c.claims.namespace = String::new();
        assert!(matches!(
            JwtAuthenticator::new(c),
            Err(JwtConfigError::Mapping(_))
        ));
    }
}
