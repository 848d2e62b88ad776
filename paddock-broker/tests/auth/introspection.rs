//! The RFC 7662 introspection backend against a real local HTTPS introspection endpoint
//! (hyper + rustls on 127.0.0.1, certificate from rcgen).

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use paddock_broker::auth::{
    AuthError, Authenticator, Scope,
    introspection::{IntrospectionAuthenticator, IntrospectionConfig},
};
use serde_json::json;

use crate::support::{Seen, TestServer, TestTls, assert_no_bearer, test_tls};

pub(crate) const INTROSPECT: &str = "/oauth2/introspect";
pub(crate) const CLIENT_ID: &str = "paddock broker";
/// Characters that RFC 6749 section 2.3.1 form-encodes before base64.
pub(crate) const CLIENT_SECRET: &str = "s3cret:&+/=";
/// The token scope the tests map to the team's broker scopes.
pub(crate) const TEAM_SCOPE: &str = "paddock.team";

/// What the fake identity provider does next.
#[derive(Clone)]
pub(crate) struct Idp {
    /// Seconds from "now" to the `exp` of active answers.
    pub exp_in: Arc<Mutex<u64>>,
    /// The `exp` of the last active answer.
    pub last_exp: Arc<Mutex<Option<SystemTime>>>,
    /// An HTTP status to answer instead (an identity provider in trouble).
    pub status: Arc<Mutex<u16>>,
}

impl Idp {
    pub fn new() -> Self {
        Self {
            exp_in: Arc::new(Mutex::new(600)),
            last_exp: Arc::default(),
            status: Arc::new(Mutex::new(200)),
        }
    }

    /// Answers like an RFC 7662 endpoint. Known tokens:
    /// `opaque-team-a` (active, client `paddock-proxy`, scopes `openid paddock.team`),
    /// `opaque-no-scope` (active, `openid` only), `opaque-other-client` (active, client
    /// `mallory`), `opaque-no-exp` (active, no `exp`); anything else is inactive.
    pub fn handler(&self) -> impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static {
        let idp = self.clone();
        move |seen| {
            let basic = format!(
                "Basic {}",
                STANDARD.encode("paddock+broker:s3cret%3A%26%2B%2F%3D")
            );
            if seen.authorization.as_deref() != Some(basic.as_str()) {
                return (401, r#"{"error":"invalid_client"}"#.to_owned());
            }
            if seen.method != "POST" || seen.path != INTROSPECT {
                return (404, "{}".to_owned());
            }
            let status = *idp.status.lock().expect("status");
            if status != 200 {
                return (status, "{}".to_owned());
            }
            let form: Vec<(String, String)> = url::form_urlencoded::parse(&seen.body)
                .into_owned()
                .collect();
            let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
            assert_eq!(field("token_type_hint"), Some("access_token"));
            let token = field("token").expect("token parameter");
            let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
            let exp = now.as_secs() + *idp.exp_in.lock().expect("exp");
            let active = |client: &str, scope: &str| {
                json!({"active": true, "sub": "ci-bot", "client_id": client, "scope": scope,
                       "exp": exp, "iat": now.as_secs(), "token_type": "Bearer",
                       "ext": {"namespace": "team-a"}})
            };
            let answer = match token {
                "opaque-team-a" => active("paddock-proxy", &format!("openid {TEAM_SCOPE}")),
                "opaque-no-scope" => active("paddock-proxy", "openid"),
                "opaque-other-client" => active("mallory", TEAM_SCOPE),
                "opaque-no-exp" => {
                    let mut a = active("paddock-proxy", TEAM_SCOPE);
                    a.as_object_mut().expect("object").remove("exp");
                    a
                }
                _ => json!({"active": false}),
            };
            if answer["exp"].is_u64() {
                *idp.last_exp.lock().expect("exp") =
                    UNIX_EPOCH.checked_add(Duration::from_secs(exp));
            }
            (200, answer.to_string())
        }
    }
}

/// The team's broker scopes: everything but the controller's.
pub(crate) fn team_scopes() -> BTreeSet<Scope> {
    crate::common::ALL_SCOPES
        .into_iter()
        .filter(|s| *s != Scope::Controller)
        .collect()
}

/// A config for the endpoint at `url`, trusting `tls`'s CA, with the secret in `dir`.
pub(crate) fn config(dir: &std::path::Path, url: &str, tls: &TestTls) -> IntrospectionConfig {
    std::fs::write(dir.join("idp-ca.pem"), &tls.ca_pem).expect("ca");
    std::fs::write(dir.join("idp-secret"), format!("{CLIENT_SECRET}\n")).expect("secret");
    let mut cfg = IntrospectionConfig::new(
        format!("{url}{INTROSPECT}"),
        CLIENT_ID,
        dir.join("idp-secret"),
    );
    cfg.ca_file = Some(dir.join("idp-ca.pem"));
    cfg.namespace_claim = "/ext/namespace".into();
    cfg.allowed_client_ids = Some(vec!["paddock-proxy".into()]);
    cfg.scopes.insert(TEAM_SCOPE.into(), team_scopes());
    cfg.http_timeout = Duration::from_millis(500);
    cfg
}

/// `config` as the broker's YAML/JSON config spells it, with a 2 s timeout.
pub(crate) fn config_json(intro: &IntrospectionConfig, team: &[&str]) -> serde_json::Value {
    json!({
        "endpoint": intro.endpoint,
        "caFile": intro.ca_file,
        "clientId": intro.client_id,
        "clientSecretFile": intro.client_secret_file,
        "scopes": {TEAM_SCOPE: team},
        "allowedClientIds": intro.allowed_client_ids,
        "namespaceClaim": intro.namespace_claim,
        "httpTimeout": "2s",
    })
}

struct Fixture {
    _dir: tempfile::TempDir,
    idp: Idp,
    server: TestServer,
    auth: IntrospectionAuthenticator,
}

async fn fixture(edit: impl FnOnce(&mut IntrospectionConfig)) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = test_tls();
    let idp = Idp::new();
    let server = TestServer::start_tls(idp.handler(), &tls).await;
    let mut cfg = config(dir.path(), &server.https_url(), &tls);
    edit(&mut cfg);
    let auth = IntrospectionAuthenticator::new(cfg).expect("backend");
    Fixture {
        _dir: dir,
        idp,
        server,
        auth,
    }
}

#[tokio::test]
async fn active_token_maps_scopes_and_is_cached() {
    let f = fixture(|_| {}).await;
    let id = f.auth.authenticate("opaque-team-a").await.expect("active");
    assert_eq!(
        (id.subject.as_str(), id.namespace.as_str(), id.backend),
        ("ci-bot", "team-a", "introspection")
    );
    assert_eq!(id.scopes, team_scopes(), "openid maps to nothing");
    assert_eq!(f.server.hits(INTROSPECT), 1);
    let again = f.auth.authenticate("opaque-team-a").await.expect("cached");
    assert_eq!(again, id);
    assert_eq!(f.server.hits(INTROSPECT), 1, "served from the cache");
    // Unmapped scopes: authenticated, but no route's scope is granted.
    let bare = f
        .auth
        .authenticate("opaque-no-scope")
        .await
        .expect("active");
    assert!(bare.scopes.is_empty(), "{:?}", bare.scopes);
}

#[tokio::test]
async fn inactive_and_other_clients_are_refused_and_never_cached() {
    let f = fixture(|_| {}).await;
    for (n, token) in [
        "opaque-inactive",
        "opaque-inactive",
        "opaque-other-client",
        "opaque-other-client",
    ]
    .into_iter()
    .enumerate()
    {
        let err = f.auth.authenticate(token).await.expect_err(token);
        assert!(
            matches!(err, AuthError::Unauthenticated(_)),
            "{token}: {err}"
        );
        assert_no_bearer(&err, token);
        assert_eq!(f.server.hits(INTROSPECT), n + 1, "{token} was cached");
    }
    // Without the pin the other client's token is accepted: the pin is what refused it.
    let open = fixture(|c| c.allowed_client_ids = None).await;
    let id = open
        .auth
        .authenticate("opaque-other-client")
        .await
        .expect("no pin");
    assert_eq!(id.scopes, team_scopes());
}

#[tokio::test]
async fn endpoint_trouble_is_unavailable_and_never_cached() {
    let f = fixture(|_| {}).await;
    *f.idp.status.lock().expect("status") = 500;
    let err = f.auth.authenticate("opaque-team-a").await.expect_err("500");
    assert!(matches!(err, AuthError::Unavailable(_)), "{err}");
    *f.idp.status.lock().expect("status") = 200;
    f.auth
        .authenticate("opaque-team-a")
        .await
        .expect("asked again after the failure");
    assert_eq!(f.server.hits(INTROSPECT), 2);

    // Slow: past httpTimeout (500 ms) is a failure, bounded in time.
    f.server.set_delay(Duration::from_secs(3));
    let started = Instant::now();
    let err = f
        .auth
        .authenticate("opaque-no-exp")
        .await
        .expect_err("slow");
    assert!(matches!(err, AuthError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    f.server.set_delay(Duration::ZERO);
    f.auth
        .authenticate("opaque-no-exp")
        .await
        .expect("fast again");

    // Down: nothing listens on the port any more.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let down = fixture(|c| c.endpoint = format!("https://127.0.0.1:{port}{INTROSPECT}")).await;
    let err = down
        .auth
        .authenticate("opaque-team-a")
        .await
        .expect_err("down");
    assert!(matches!(err, AuthError::Unavailable(_)), "{err}");

    // The broker's own credentials refused (a rotated secret not yet deployed).
    let wrong = fixture(|c| c.client_id = "someone-else".into()).await;
    let err = wrong
        .auth
        .authenticate("opaque-team-a")
        .await
        .expect_err("401");
    assert!(
        matches!(&err, AuthError::Unavailable(r) if r.contains("client credentials")),
        "{err}"
    );
    // And no secret in any error.
    assert!(!format!("{err} {err:?} {:?}", wrong.auth).contains("s3cret"));

    // Readiness follows the endpoint: up, down, credentials refused.
    let up = f.auth.readiness().await;
    assert_eq!(up[0].name, "introspection");
    assert!(up[0].outcome.is_ok(), "{up:?}");
    assert!(down.auth.readiness().await[0].outcome.is_err());
    let refused = wrong.auth.readiness().await;
    assert!(
        refused[0]
            .outcome
            .as_ref()
            .is_err_and(|e| e.contains("client credentials") && !e.contains("s3cret")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn an_untrusted_certificate_is_unavailable() {
    let other = test_tls();
    let f = fixture(|c| {
        let path = c.ca_file.clone().expect("ca file");
        std::fs::write(path, &other.ca_pem).expect("other CA");
    })
    .await;
    let err = f
        .auth
        .authenticate("opaque-team-a")
        .await
        .expect_err("bad CA");
    assert!(matches!(err, AuthError::Unavailable(_)), "{err}");
    assert_eq!(
        f.server.hits(INTROSPECT),
        0,
        "no request over an unverified channel"
    );
}

#[tokio::test]
async fn cache_ends_at_exp_and_at_the_configured_ttl() {
    let f = fixture(|c| c.cache_ttl = Duration::from_hours(1)).await;
    *f.idp.exp_in.lock().expect("exp") = 2;
    f.auth.authenticate("opaque-team-a").await.expect("active");
    let exp = f.idp.last_exp.lock().expect("exp").expect("exp given");
    f.auth.authenticate("opaque-team-a").await.expect("cached");
    assert_eq!(f.server.hits(INTROSPECT), 1);
    // The answer is not reused past its exp, though cacheTtl is an hour.
    while SystemTime::now() < exp {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f.auth
        .authenticate("opaque-team-a")
        .await
        .expect("asked again");
    assert_eq!(f.server.hits(INTROSPECT), 2, "reused past exp");

    // Without exp, cacheTtl bounds the reuse.
    let short = fixture(|c| c.cache_ttl = Duration::from_millis(400)).await;
    short
        .auth
        .authenticate("opaque-no-exp")
        .await
        .expect("active");
    short
        .auth
        .authenticate("opaque-no-exp")
        .await
        .expect("cached");
    assert_eq!(short.server.hits(INTROSPECT), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    short
        .auth
        .authenticate("opaque-no-exp")
        .await
        .expect("asked again");
    assert_eq!(short.server.hits(INTROSPECT), 2, "reused past cacheTtl");

    // Zero turns the cache off.
    let off = fixture(|c| c.cache_ttl = Duration::ZERO).await;
    off.auth
        .authenticate("opaque-team-a")
        .await
        .expect("active");
    off.auth
        .authenticate("opaque-team-a")
        .await
        .expect("active");
    assert_eq!(off.server.hits(INTROSPECT), 2);
}
