//! GitHub App provider: an RS256 app JWT is exchanged for an installation token, cached and
//! refreshed before it expires. The token goes upstream as Basic `x-access-token:<token>` (so
//! git over HTTPS works; the placeholder arrives base64-encoded inside Basic auth) or as a
//! Bearer token when the placeholder was sent as one (REST API clients).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use aws_lc_rs::{
    rand::SystemRandom,
    signature::{RSA_PKCS1_SHA256, RsaKeyPair},
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use rustls_pki_types::{PrivateKeyDer, pem::PemObject};
use serde::Deserialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{Placement, Provider, ProviderError, http_client, inject};
use crate::{
    policy::Injection,
    secrets::{Secret, SecretSource},
    wire::{DeliveryMode, Header, LeaseInfo, SubstituteAuthResponse},
};

/// Refresh a cached token when it has less than this left (seconds).
pub const REFRESH_MARGIN_SECS: u64 = 300;
pub const DEFAULT_API_BASE: &str = "https://api.github.com";

/// What identifies one installation token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GithubAppConfig {
    pub app_id: u64,
    pub installation_id: u64,
    pub private_key: SecretSource,
    pub api_base_url: String,
    pub repositories: Vec<String>,
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug)]
struct CachedToken {
    token: Secret,
    expires_at: u64,
}

/// Installation tokens shared by every use of a grant (providers are rebuilt per request).
#[derive(Debug, Default)]
pub struct GithubTokens {
    entries: Mutex<HashMap<GithubAppConfig, Arc<Mutex<Option<CachedToken>>>>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unavailable(msg: impl Into<String>) -> ProviderError {
    ProviderError::Backend(msg.into())
}

impl GithubTokens {
    /// A token with at least [`REFRESH_MARGIN_SECS`] left, fetching one if needed. One fetch
    /// per installation at a time; other installations are not blocked.
    pub fn token(&self, cfg: &GithubAppConfig) -> Result<Secret, ProviderError> {
        let slot = {
            let mut entries = self
                .entries
                .lock()
                .map_err(|_| unavailable("token cache poisoned"))?;
            entries.entry(cfg.clone()).or_default().clone()
        };
        let mut cached = slot
            .lock()
            .map_err(|_| unavailable("token cache poisoned"))?;
        if let Some(t) = cached.as_ref()
            && t.expires_at > now_secs() + REFRESH_MARGIN_SECS
        {
            return Ok(t.token.clone());
        }
        let fresh = fetch(cfg)?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }
}

fn app_jwt(cfg: &GithubAppConfig) -> Result<String, ProviderError> {
    let pem = cfg.private_key.read_multiline()?;
    let not_rsa =
        || ProviderError::Misconfigured("GitHub App private key is not an RSA PEM key".into());
    // GitHub hands out PKCS#1 ("RSA PRIVATE KEY"); PKCS#8 conversions work too.
    let key =
        match PrivateKeyDer::from_pem_slice(pem.expose().as_bytes()).map_err(|_| not_rsa())? {
            PrivateKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.secret_pkcs1_der()),
            PrivateKeyDer::Pkcs8(der) => RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()),
            _ => return Err(not_rsa()),
        }
        .map_err(|_| not_rsa())?;
    let now = now_secs();
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    // Backdated against clock skew; GitHub caps the lifetime at 10 minutes.
    let claims = serde_json::json!({"iat": now.saturating_sub(60), "exp": now + 540, "iss": cfg.app_id.to_string()});
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let mut signature = vec![0; key.public_modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .map_err(|_| unavailable("signing the GitHub App JWT failed"))?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

#[derive(Deserialize)]
struct TokenResponse {
    token: String,
    expires_at: String,
}

fn fetch(cfg: &GithubAppConfig) -> Result<CachedToken, ProviderError> {
    let base =
        http_client::validate_base_url(&cfg.api_base_url).map_err(ProviderError::Misconfigured)?;
    let mut url = base.clone();
    let path = format!(
        "{}/app/installations/{}/access_tokens",
        base.path().trim_end_matches('/'),
        cfg.installation_id
    );
    url.set_path(&path);
    let jwt = app_jwt(cfg)?;
    let auth = format!("Bearer {jwt}");
    let body = if cfg.repositories.is_empty() {
        "{}".to_owned()
    } else {
        serde_json::json!({ "repositories": cfg.repositories }).to_string()
    };
    let headers = [
        ("Authorization", auth.as_str()),
        ("Accept", "application/vnd.github+json"),
        ("X-GitHub-Api-Version", "2022-11-28"),
        ("User-Agent", "paddock-broker"),
        ("Content-Type", "application/json"),
    ];
    let resp = http_client::request(
        "POST",
        &url,
        &headers,
        body.as_bytes(),
        cfg.ca_file.as_deref(),
    )
    .map_err(|e| unavailable(format!("GitHub token request failed: {e}")))?;
    if resp.status != 201 {
        return Err(unavailable(format!(
            "GitHub answered {} to the installation token request",
            resp.status
        )));
    }
    let parsed: TokenResponse = serde_json::from_slice(&resp.body)
        .map_err(|_| unavailable("GitHub token response is not the expected JSON"))?;
    let expires = OffsetDateTime::parse(&parsed.expires_at, &Rfc3339)
        .map_err(|_| unavailable("GitHub token expiry is not RFC 3339"))?;
    let expires_at = u64::try_from(expires.unix_timestamp()).unwrap_or(0);
    if parsed.token.is_empty() || parsed.token.chars().any(|c| c.is_control() || c == ':') {
        return Err(unavailable("GitHub returned an unusable token"));
    }
    Ok(CachedToken {
        token: Secret::new(parsed.token),
        expires_at,
    })
}

#[derive(Debug)]
pub struct GithubApp {
    pub config: GithubAppConfig,
    pub tokens: Arc<GithubTokens>,
}

impl Provider for GithubApp {
    fn kind(&self) -> &'static str {
        "github-app"
    }
    fn issue(
        &self,
        _delivery: DeliveryMode,
        _slot: Option<u32>,
    ) -> Result<Option<Secret>, ProviderError> {
        // Fetching now fails the issue early if the app cannot get a token, and warms the cache.
        self.tokens.token(&self.config).map(|_| None)
    }
    fn renew(&self, _lease: &LeaseInfo) -> Result<(), ProviderError> {
        self.tokens.token(&self.config).map(drop)
    }
    fn revoke(&self, _lease: &LeaseInfo) -> Result<(), ProviderError> {
        // Installation tokens are shared by the installation's leases; they expire on their own.
        Ok(())
    }
    fn substitute(
        &self,
        _lease: &LeaseInfo,
        _headers: &[Header],
        _query_names: &[String],
        found: &[Placement],
    ) -> Result<SubstituteAuthResponse, ProviderError> {
        let token = self.tokens.token(&self.config)?;
        let as_bearer = found
            .iter()
            .any(|p| matches!(p, Placement::Header(h) if h == "authorization"))
            && !found.iter().any(|p| matches!(p, Placement::Basic { .. }));
        let injection = if as_bearer {
            Injection::Header {
                name: "authorization".into(),
                prefix: "Bearer ".into(),
            }
        } else {
            Injection::Basic {
                username: "x-access-token".into(),
            }
        };
        Ok(inject(&injection, &token, found))
    }
}

/// A fake GitHub API on 127.0.0.1 for tests: checks the app JWT signature and hands out
/// numbered installation tokens.
#[cfg(test)]
pub(crate) mod fake {
    use std::{
        io::{Read, Write},
        net::TcpListener,
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        },
        time::{Duration, Instant},
    };

    use aws_lc_rs::signature::{
        KeyPair as _, RSA_PKCS1_2048_8192_SHA256, RsaKeyPair, UnparsedPublicKey,
    };
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    use rustls_pki_types::{PrivatePkcs1KeyDer, pem::PemObject};

    pub const TEST_KEY_PEM: &str = include_str!("../../tests/data/github-app-test-key.pem");

    #[derive(Debug)]
    pub struct FakeGithub {
        pub base_url: String,
        pub fetches: Arc<AtomicUsize>,
        /// Lifetime of the tokens handed out, seconds.
        pub ttl: Arc<AtomicU64>,
        pub last_body: Arc<std::sync::Mutex<String>>,
        stop: Arc<AtomicBool>,
    }

    impl Drop for FakeGithub {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    fn verify_jwt(jwt: &str, public: &[u8], app_id: u64) -> bool {
        let mut parts = jwt.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let Ok(sig) = URL_SAFE_NO_PAD.decode(s) else {
            return false;
        };
        if UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public)
            .verify(format!("{h}.{c}").as_bytes(), &sig)
            .is_err()
        {
            return false;
        }
        let Ok(claims) = URL_SAFE_NO_PAD.decode(c) else {
            return false;
        };
        let Ok(claims) = serde_json::from_slice::<serde_json::Value>(&claims) else {
            return false;
        };
        let now = super::now_secs();
        claims["iss"].as_str() == Some(app_id.to_string().as_str())
            && claims["exp"]
                .as_u64()
                .is_some_and(|e| e > now && e <= now + 600)
    }

    /// Serves until dropped (and at most 60 s), one request per connection.
    pub fn start(app_id: u64, installation_id: u64) -> FakeGithub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let base_url = format!("http://{}", listener.local_addr().expect("addr"));
        let pkcs1 = PrivatePkcs1KeyDer::from_pem_slice(TEST_KEY_PEM.as_bytes()).expect("test key");
        // PKCS#1 RSAPublicKey DER, what RSA_PKCS1_* verification takes.
        let public = RsaKeyPair::from_der(pkcs1.secret_pkcs1_der())
            .expect("test key")
            .public_key()
            .as_ref()
            .to_vec();
        let fetches = Arc::new(AtomicUsize::new(0));
        let ttl = Arc::new(AtomicU64::new(3600));
        let last_body = Arc::new(std::sync::Mutex::new(String::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (hit_count, lifetime, body_seen, stopped) = (
            fetches.clone(),
            ttl.clone(),
            last_body.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_mins(1);
            while !stopped.load(Ordering::SeqCst) && Instant::now() < deadline {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::new();
                let mut chunk = [0_u8; 4096];
                // Read head, then the announced body.
                while let Ok(n) = conn.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let text = String::from_utf8_lossy(&buf).to_string();
                let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
                let path_ok = head.starts_with(&format!(
                    "POST /app/installations/{installation_id}/access_tokens "
                ));
                // Header names are case-insensitive (hyper sends them in lower case).
                let jwt = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(": ")?;
                        name.eq_ignore_ascii_case("authorization")
                            .then(|| value.strip_prefix("Bearer "))?
                    })
                    .unwrap_or_default();
                let response = if path_ok && verify_jwt(jwt, &public, app_id) {
                    let n = hit_count.fetch_add(1, Ordering::SeqCst) + 1;
                    if let Ok(mut last) = body_seen.lock() {
                        *last = body.to_owned();
                    }
                    let expires = time::OffsetDateTime::now_utc()
                        + time::Duration::seconds(
                            i64::try_from(lifetime.load(Ordering::SeqCst)).unwrap_or(3600),
                        );
                    let expires = expires
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default();
                    let json = format!(r#"{{"token":"ghs_fake_{n}","expires_at":"{expires}"}}"#);
                    format!(
                        "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{json}\r\n0\r\n\r\n",
                        json.len()
                    )
                } else {
                    "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n".to_owned()
                };
                let _ = conn.write_all(response.as_bytes());
            }
        });
        FakeGithub {
            base_url,
            fetches,
            ttl,
            last_body,
            stop,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    fn config(dir: &tempfile::TempDir, base: &str, key: &str) -> GithubAppConfig {
        let path = dir.path().join("app.pem");
        std::fs::write(&path, key).expect("key");
        GithubAppConfig {
            app_id: 7,
            installation_id: 42,
            private_key: SecretSource::File(path),
            api_base_url: base.to_owned(),
            repositories: vec!["octo/repo".into()],
            ca_file: None,
        }
    }

    #[test]
    fn tokens_are_fetched_cached_and_refreshed() {
        let gh = fake::start(7, 42);
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(&dir, &gh.base_url, fake::TEST_KEY_PEM);
        let tokens = GithubTokens::default();
        assert_eq!(tokens.token(&cfg).expect("token").expose(), "ghs_fake_1");
        assert_eq!(tokens.token(&cfg).expect("cached").expose(), "ghs_fake_1");
        assert_eq!(
            gh.fetches.load(Ordering::SeqCst),
            1,
            "second call served from cache"
        );
        assert!(
            gh.last_body.lock().expect("body").contains("octo/repo"),
            "token scoped to repositories"
        );
        // Tokens close to expiry are refreshed.
        gh.ttl.store(REFRESH_MARGIN_SECS - 10, Ordering::SeqCst);
        let mut other = cfg.clone();
        other.repositories = vec!["octo/other".into()];
        assert_eq!(tokens.token(&other).expect("token").expose(), "ghs_fake_2");
        assert_eq!(
            tokens.token(&other).expect("refreshed").expose(),
            "ghs_fake_3"
        );
    }

    #[test]
    fn wrong_key_or_unreachable_api_fails_closed() {
        let gh = fake::start(7, 42);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(&dir, &gh.base_url, fake::TEST_KEY_PEM);
        cfg.app_id = 8;
        assert!(matches!(
            GithubTokens::default().token(&cfg),
            Err(ProviderError::Backend(_))
        ));
        let cfg = config(
            &dir,
            &gh.base_url,
            "-----BEGIN RSA PRIVATE KEY-----\nnope\n-----END RSA PRIVATE KEY-----",
        );
        assert!(matches!(
            GithubTokens::default().token(&cfg),
            Err(ProviderError::Misconfigured(_))
        ));
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let cfg = config(&dir, &format!("http://{closed}"), fake::TEST_KEY_PEM);
        assert!(matches!(
            GithubTokens::default().token(&cfg),
            Err(ProviderError::Backend(_))
        ));
    }

    #[test]
    fn substitution_uses_basic_for_git_and_bearer_for_api() {
        let gh = fake::start(7, 42);
        let dir = tempfile::tempdir().expect("tempdir");
        let provider = GithubApp {
            config: config(&dir, &gh.base_url, fake::TEST_KEY_PEM),
            tokens: Arc::default(),
        };
        let lease = LeaseInfo {
            lease_id: "l".into(),
            run: "r".into(),
            namespace: "n".into(),
            credential: "c".into(),
            provider: "github-app".into(),
            delivery: DeliveryMode::ProxyInjected,
            hosts: vec![],
            pool_slot: None,
            issued_at: 0,
            expires_at: 0,
            revoked: false,
        };
        let out = provider
            .substitute(
                &lease,
                &[],
                &[],
                &[Placement::Basic {
                    username: "git".into(),
                }],
            )
            .expect("basic");
        let basic = out.basic_auth.expect("basic");
        assert_eq!(
            (basic.username.as_str(), basic.password.as_str()),
            ("x-access-token", "ghs_fake_1")
        );
        let out = provider
            .substitute(
                &lease,
                &[],
                &[],
                &[Placement::Header("authorization".into())],
            )
            .expect("bearer");
        assert_eq!(
            out.set_headers,
            vec![Header {
                name: "authorization".into(),
                value: "Bearer ghs_fake_1".into()
            }]
        );
    }
}
