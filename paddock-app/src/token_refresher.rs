//! `paddock-proxy token-refresher`: a sidecar that keeps the proxy's `bearer_file` filled with
//! a fresh access token from an OAuth 2 / OIDC token endpoint (client-credentials grant).
//!
//! The token endpoint is configured directly or discovered from the issuer's
//! `/.well-known/openid-configuration`. The refresher authenticates with HTTP Basic
//! (`client_secret_basic`, the secret read from a file on every request so a rotated secret is
//! used without a restart) and asks for `grant_type=client_credentials` with optional `scope`
//! and `audience` (Auth0, some Okta and Entra setups).
//!
//! Each token is written atomically: a temporary file in the same directory (created 0600),
//! written, fsynced, renamed over the target, and the directory fsynced, so a reader sees the
//! old token or the new one, never a partial file. A token is refreshed at 70-80 % of its
//! lifetime (`expires_in`, else the JWT's `exp`, else `--default-lifetime`); the random spread
//! keeps many replicas from hitting the endpoint together. A failed refresh is retried with
//! exponential backoff (doubling from `--min-retry` up to `--max-retry`, each wait jittered)
//! while the file keeps the last good token. When that token expires without a successful
//! refresh the file is removed, so the proxy fails closed instead of presenting a dead token;
//! the next success writes it again.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use paddock_broker::providers::http_client;
use paddock_proxy::broker::jwt_expiry;
use serde::Deserialize;
use url::Url;

/// Largest token written (the proxy refuses bearer files above 64 KiB).
const MAX_TOKEN_BYTES: usize = 64 * 1024;
/// Longest lifetime believed (a year): keeps `expires_in` arithmetic in range.
const MAX_LIFETIME: Duration = Duration::from_hours(365 * 24);
/// Largest client secret file read.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Where the token endpoint comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenEndpoint {
    /// `<issuer>/.well-known/openid-configuration` names it (`token_endpoint`).
    Discover(Url),
    /// Used as given.
    Url(Url),
}

/// What the refresher needs. Holds a path to the client secret, never the secret.
#[derive(Debug, Clone)]
pub struct RefresherConfig {
    pub endpoint: TokenEndpoint,
    pub client_id: String,
    pub client_secret_file: PathBuf,
    /// Requested scopes (sent space-separated; none: the client's default).
    pub scopes: Vec<String>,
    /// Sent as the `audience` form parameter when set.
    pub audience: Option<String>,
    /// The file the proxy's `bearer_file` names.
    pub output: PathBuf,
    /// CA bundle for the endpoint (the webpki roots when unset).
    pub ca_file: Option<PathBuf>,
    /// A token's lifetime when neither `expires_in` nor a JWT `exp` says.
    pub default_lifetime: Duration,
    /// First wait after a failure; also the shortest wait between two refreshes.
    pub min_retry: Duration,
    /// Longest wait after repeated failures.
    pub max_retry: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RefresherError {
    #[error("token-refresher: {0}")]
    Config(String),
    #[error("client secret file {path}: {reason}")]
    Secret { path: String, reason: String },
    #[error("token endpoint discovery at {url}: {reason}")]
    Discovery { url: String, reason: String },
    #[error("token request to {url}: {reason}")]
    Token { url: String, reason: String },
    #[error("cannot write the token file {path}: {reason}")]
    Write { path: String, reason: String },
}

/// A token as obtained. Its value never appears in `Debug`, errors or logs.
#[derive(Clone)]
pub struct Token {
    value: String,
    /// When it stops being usable.
    pub expires: SystemTime,
    /// Its whole lifetime, as the endpoint (or the JWT, or the default) said.
    pub lifetime: Duration,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("value", &"<redacted>")
            .field("expires", &self.expires)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl Token {
    /// The token text (for writing it out; never log it).
    #[must_use]
    pub fn secret_value(&self) -> &str {
        &self.value
    }
}

#[derive(Deserialize)]
struct Discovery {
    token_endpoint: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The client-credentials refresher. [`Refresher::run`] is the sidecar's loop.
#[derive(Debug)]
pub struct Refresher {
    config: RefresherConfig,
    token_url: Option<Url>,
}

impl Refresher {
    /// Checks the configuration and that the client secret is readable now.
    pub fn new(config: RefresherConfig) -> Result<Self, RefresherError> {
        let bad = |m: &str| Err(RefresherError::Config(m.to_owned()));
        if config.client_id.is_empty() || config.client_id.chars().any(char::is_control) {
            return bad("--client-id must be a non-empty name");
        }
        if config.min_retry.is_zero() || config.max_retry < config.min_retry {
            return bad("--min-retry must be above zero and at most --max-retry");
        }
        if config.default_lifetime.is_zero() {
            return bad("--default-lifetime must be above zero");
        }
        if config.output.file_name().is_none() {
            return bad("--output must name a file");
        }
        read_secret(&config.client_secret_file)?;
        let token_url = match &config.endpoint {
            TokenEndpoint::Url(url) => Some(url.clone()),
            TokenEndpoint::Discover(_) => None,
        };
        Ok(Self { config, token_url })
    }

    /// The token endpoint: configured, or discovered once (and again after a failure).
    fn token_url(&mut self) -> Result<Url, RefresherError> {
        if let Some(url) = &self.token_url {
            return Ok(url.clone());
        }
        let TokenEndpoint::Discover(issuer) = &self.config.endpoint else {
            return Err(RefresherError::Config("no token endpoint".into()));
        };
        let mut url = issuer.clone();
        let path = format!(
            "{}/.well-known/openid-configuration",
            issuer.path().trim_end_matches('/')
        );
        url.set_path(&path);
        let fail = |reason: String| RefresherError::Discovery {
            url: url.to_string(),
            reason,
        };
        let answer = http_client::request(
            "GET",
            &url,
            &[("accept", "application/json")],
            &[],
            self.config.ca_file.as_deref(),
        )
        .map_err(|e| fail(e.to_string()))?;
        if answer.status != 200 {
            return Err(fail(format!("HTTP {}", answer.status)));
        }
        let doc: Discovery =
            serde_json::from_slice(&answer.body).map_err(|e| fail(format!("invalid JSON: {e}")))?;
        let token_url = Url::parse(&doc.token_endpoint).map_err(|e| fail(e.to_string()))?;
        if token_url.scheme() != "https" && token_url.scheme() != url.scheme() {
            return Err(fail(format!(
                "token_endpoint {token_url} downgrades from {}",
                url.scheme()
            )));
        }
        self.token_url = Some(token_url.clone());
        Ok(token_url)
    }

    /// One client-credentials request (blocking; the loop runs it on the blocking pool).
    pub fn fetch(&mut self) -> Result<Token, RefresherError> {
        let url = self.token_url()?;
        let result = self.request_token(&url);
        if result.is_err() && matches!(self.config.endpoint, TokenEndpoint::Discover(_)) {
            // The endpoint may have moved: discover it again next time.
            self.token_url = None;
        }
        result
    }

    fn request_token(&self, url: &Url) -> Result<Token, RefresherError> {
        let fail = |reason: String| RefresherError::Token {
            url: url.to_string(),
            reason,
        };
        let secret = read_secret(&self.config.client_secret_file)?;
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if !self.config.scopes.is_empty() {
            form.append_pair("scope", &self.config.scopes.join(" "));
        }
        if let Some(audience) = &self.config.audience {
            form.append_pair("audience", audience);
        }
        let body = form.finish();
        let basic = basic_credentials(&self.config.client_id, &secret);
        let requested_at = SystemTime::now();
        let answer = http_client::request(
            "POST",
            url,
            &[
                ("authorization", basic.as_str()),
                ("content-type", "application/x-www-form-urlencoded"),
                ("accept", "application/json"),
            ],
            body.as_bytes(),
            self.config.ca_file.as_deref(),
        )
        .map_err(|e| fail(e.to_string()))?;
        if answer.status != 200 {
            // The error body may echo the request: only the status is reported.
            return Err(fail(format!("HTTP {}", answer.status)));
        }
        let answer: TokenAnswer = serde_json::from_slice(&answer.body)
            .map_err(|_| fail("the answer is not a token response".into()))?;
        if let Some(kind) = &answer.token_type
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(fail(format!("token_type {kind:?} is not Bearer")));
        }
        let value = answer.access_token;
        if value.is_empty()
            || value.len() > MAX_TOKEN_BYTES
            || value.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(fail(
                "access_token is empty, too long or not a header value".into(),
            ));
        }
        // Measured from the request, so a slow answer shortens the lifetime, never extends it.
        let lifetime = match answer.expires_in {
            Some(secs) => Duration::from_secs(secs),
            None => jwt_expiry(&value)
                .and_then(|exp| exp.duration_since(requested_at).ok())
                .unwrap_or(self.config.default_lifetime),
        };
        if lifetime.is_zero() {
            return Err(fail("the token is already expired".into()));
        }
        // A nonsensical expires_in (years) must not overflow the clock arithmetic.
        let lifetime = lifetime.min(MAX_LIFETIME);
        Ok(Token {
            value,
            expires: requested_at + lifetime,
            lifetime,
        })
    }

    /// Refreshes until `shutdown` completes. Only a failure to write the token file ends it
    /// early (the sidecar then exits and is restarted; the proxy bridges or fails closed).
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), RefresherError> {
        tokio::pin!(shutdown);
        let mut this = self;
        let mut current: Option<Token> = None;
        let mut failures: u32 = 0;
        loop {
            let outcome = tokio::task::spawn_blocking(move || {
                let mut refresher = this;
                let result = refresher.fetch();
                (refresher, result)
            })
            .await;
            let Ok((refresher, result)) = outcome else {
                return Err(RefresherError::Config("the fetch task panicked".into()));
            };
            this = refresher;
            let wait = match result {
                Ok(token) => {
                    write_atomically(&this.config.output, token.secret_value())?;
                    tracing::info!(
                        path = %this.config.output.display(),
                        lifetime_s = token.lifetime.as_secs(),
                        "token-refresher: new token written"
                    );
                    failures = 0;
                    let wait = refresh_delay(token.lifetime, jitter()).max(this.config.min_retry);
                    current = Some(token);
                    wait
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let backoff = retry_delay(
                        this.config.min_retry,
                        this.config.max_retry,
                        failures,
                        jitter(),
                    );
                    let left = current
                        .as_ref()
                        .and_then(|t| t.expires.duration_since(SystemTime::now()).ok());
                    tracing::warn!(
                        error = %e,
                        retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                        keeps_token_s = left.map(|d| d.as_secs()),
                        "token-refresher: refresh failed; the last good token stays while valid"
                    );
                    // Wake at the token's expiry at the latest, to withdraw it.
                    left.map_or(backoff, |l| backoff.min(l))
                }
            };
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
            if current
                .as_ref()
                .is_some_and(|t| SystemTime::now() >= t.expires)
            {
                current = None;
                match fs::remove_file(&this.config.output) {
                    Ok(()) => tracing::error!(
                        path = %this.config.output.display(),
                        "token-refresher: the token expired without a refresh; file removed \
                         (the proxy fails closed until a refresh succeeds)"
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(RefresherError::Write {
                            path: this.config.output.display().to_string(),
                            reason: format!("cannot remove the expired token: {e}"),
                        });
                    }
                }
            }
        }
    }
}

/// A number in [0, 1) for spreading waits.
fn jitter() -> f64 {
    f64::from(rand::random::<u32>() >> 12) / f64::from(1_u32 << 20)
}

/// When to refresh a token of `lifetime`: at 70 % to 80 % of it (by `jitter` in [0, 1)).
#[must_use]
pub fn refresh_delay(lifetime: Duration, jitter: f64) -> Duration {
    lifetime.mul_f64(0.7 + 0.1 * jitter.clamp(0.0, 1.0))
}

/// The wait after the `failures`-th failure in a row: `min` doubled per failure up to `max`,
/// then spread over its upper half by `jitter` in [0, 1) (never below `min`).
#[must_use]
pub fn retry_delay(min: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    let ceiling = min.saturating_mul(1 << doublings).min(max);
    ceiling.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0)).max(min)
}

/// Writes `token` (and a newline) to `path` so that a concurrent reader sees the old content
/// or the new, never a mix: a new 0600 file in the same directory, written, fsynced, renamed
/// over `path`, then the directory fsynced so the rename survives a crash.
pub fn write_atomically(path: &Path, token: &str) -> Result<(), RefresherError> {
    let fail = |reason: String| RefresherError::Write {
        path: path.display().to_string(),
        reason,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| fail("not a file name".into()))?
        .to_string_lossy();
    let (tmp, file) = (0..8)
        .find_map(|_| {
            let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .ok()
                .map(|f| (tmp, f))
        })
        .ok_or_else(|| {
            fail(format!(
                "cannot create a temporary file in {}",
                dir.display()
            ))
        })?;
    if let Err(e) = fill_and_rename(file, &tmp, path, dir, token) {
        let _ = fs::remove_file(&tmp);
        return Err(fail(e.to_string()));
    }
    Ok(())
}

fn fill_and_rename(
    mut file: File,
    tmp: &Path,
    path: &Path,
    dir: &Path,
    token: &str,
) -> std::io::Result<()> {
    file.write_all(token.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    drop(file);
    fs::rename(tmp, path)?;
    File::open(dir)?.sync_all()
}

fn read_secret(path: &Path) -> Result<String, RefresherError> {
    use std::io::Read as _;
    let fail = |reason: String| RefresherError::Secret {
        path: path.display().to_string(),
        reason,
    };
    let mut raw = String::new();
    File::open(path)
        .and_then(|f| f.take(MAX_SECRET_BYTES + 1).read_to_string(&mut raw))
        .map_err(|e| fail(e.kind().to_string()))?;
    if raw.len() as u64 > MAX_SECRET_BYTES {
        return Err(fail("too large".into()));
    }
    let secret = raw.trim();
    if secret.is_empty() {
        return Err(fail("empty".into()));
    }
    Ok(secret.to_owned())
}

/// `Basic base64(form(id):form(secret))`, RFC 6749 section 2.3.1.
fn basic_credentials(id: &str, secret: &str) -> String {
    use base64::engine::general_purpose::STANDARD;
    let encode = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", encode(id), encode(secret)))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_and_retry_schedules() {
        let hour = Duration::from_hours(1);
        assert_eq!(refresh_delay(hour, 0.0), Duration::from_mins(42));
        assert!(refresh_delay(hour, 0.999) < Duration::from_mins(48));
        assert!(refresh_delay(hour, 0.999) > Duration::from_secs(2870));
        let (min, max) = (Duration::from_secs(1), Duration::from_mins(1));
        assert_eq!(retry_delay(min, max, 1, 0.999_999), Duration::from_secs(1));
        assert_eq!(retry_delay(min, max, 1, 0.0), min, "never below min");
        assert_eq!(retry_delay(min, max, 4, 0.0), Duration::from_secs(4));
        assert!(retry_delay(min, max, 4, 0.999_999) <= Duration::from_secs(8));
        assert_eq!(retry_delay(min, max, 40, 0.0), Duration::from_secs(30));
        assert!(retry_delay(min, max, u32::MAX, 0.999_999) <= max);
        let j = jitter();
        assert!((0.0..1.0).contains(&j));
    }

    #[test]
    fn basic_credentials_form_encode_first() {
        // RFC 6749 2.3.1: "a:b c" -> "a%3Ab+c" before base64.
        let header = basic_credentials("client:1", "p w&d");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(header.strip_prefix("Basic ").expect("basic"))
            .expect("base64");
        assert_eq!(decoded, b"client%3A1:p+w%26d");
    }

    #[test]
    fn config_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s\n").expect("secret");
        let base = RefresherConfig {
            endpoint: TokenEndpoint::Url(Url::parse("https://idp.example.com/token").expect("url")),
            client_id: "proxy".into(),
            client_secret_file: secret,
            scopes: vec![],
            audience: None,
            output: dir.path().join("token"),
            ca_file: None,
            default_lifetime: Duration::from_mins(5),
            min_retry: Duration::from_secs(1),
            max_retry: Duration::from_mins(1),
        };
        assert!(Refresher::new(base.clone()).is_ok());
        let mut c = base.clone();
        c.client_id = String::new();
        assert!(Refresher::new(c).is_err());
        let mut c = base.clone();
        c.max_retry = Duration::from_millis(1);
        assert!(Refresher::new(c).is_err());
        let mut c = base.clone();
        std::fs::write(dir.path().join("empty"), "\n").expect("empty");
        c.client_secret_file = dir.path().join("empty");
        assert!(matches!(
            Refresher::new(c),
            Err(RefresherError::Secret { .. })
        ));
        let mut c = base;
        c.client_secret_file = dir.path().join("missing");
        assert!(matches!(
            Refresher::new(c),
            Err(RefresherError::Secret { .. })
        ));
    }
}
