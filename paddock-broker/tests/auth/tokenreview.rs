use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use paddock_broker::auth::{
    AuthError, Authenticator, Scope,
    tokenreview::{TokenReviewAuthenticator, TokenReviewConfig},
};
use serde_json::{Value, json};

use crate::support::{Seen, TestServer, assert_no_bearer, test_tls};

const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// A JWT-shaped service-account token (the fake API server does not check signatures).
pub(crate) fn sa_token(name: &str, expires_in: Duration) -> String {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock") + expires_in;
    let payload = json!({"sub": name, "exp": exp.as_secs()}).to_string();
    format!(
        "{}.{}.c2lnbmF0dXJlLW5vdC1jaGVja2Vk",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#),
        URL_SAFE_NO_PAD.encode(payload)
    )
}

/// Answers like kube-apiserver: 201 with the `TokenReview` echoed back plus a status. Tokens
/// whose `sub` is `builder` or `alice` are valid; the broker must present `broker_token`.
pub(crate) fn api_server(
    broker_token: Arc<Mutex<String>>,
    confirmed_audience: &'static str,
) -> impl Fn(&Seen) -> (u16, String) {
    move |seen| {
        let expected = format!("Bearer {}", broker_token.lock().expect("token"));
        if seen.authorization.as_deref() != Some(expected.as_str()) {
            return (401, json!({"kind": "Status", "code": 401}).to_string());
        }
        if seen.method == "GET" && seen.path == "/version" {
            return (
                200,
                json!({"major": "1", "gitVersion": "v1.31.0"}).to_string(),
            );
        }
        if seen.method != "POST" || seen.path != REVIEWS {
            return (404, "{}".to_owned());
        }
        let review: Value = serde_json::from_slice(&seen.body).expect("review JSON");
        assert_eq!(review["apiVersion"], "authentication.k8s.io/v1");
        assert_eq!(review["kind"], "TokenReview");
        assert_eq!(review["spec"]["audiences"], json!(["paddock-broker"]));
        let token = review["spec"]["token"].as_str().expect("spec.token");
        let sub = if token == "opaque-builder-token" {
            Some("builder".to_owned())
        } else {
            None
        };
        let sub = sub
            .or_else(|| {
                token
                    .split('.')
                    .nth(1)
                    .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .and_then(|v| v["sub"].as_str().map(str::to_owned))
            })
            .unwrap_or_default();
        let status = match sub.as_str() {
            "builder" => json!({
                "authenticated": true,
                "user": {
                    "username": "system:serviceaccount:team-a:builder",
                    "uid": "4b1e3c1a-0000-4000-8000-000000000001",
                    "groups": ["system:serviceaccounts", "system:serviceaccounts:team-a",
                               "system:authenticated"],
                    "extra": {"authentication.kubernetes.io/pod-name": ["builder-0"]},
                },
                "audiences": [confirmed_audience],
            }),
            "alice" => json!({
                "authenticated": true,
                "user": {"username": "alice@example.com", "groups": ["system:authenticated"]},
                "audiences": [confirmed_audience],
            }),
            _ => {
                json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
            }
        };
        let mut answer = review.clone();
        answer["metadata"] = json!({"creationTimestamp": null});
        answer["status"] = status;
        (201, answer.to_string())
    }
}

struct Fixture {
    server: TestServer,
    broker_token: Arc<Mutex<String>>,
    token_file: std::path::PathBuf,
    dir: tempfile::TempDir,
}

async fn fixture(confirmed_audience: &'static str) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "broker-token-1\n").expect("write token");
    let broker_token = Arc::new(Mutex::new("broker-token-1".to_owned()));
    let server = TestServer::start(api_server(Arc::clone(&broker_token), confirmed_audience)).await;
    Fixture {
        server,
        broker_token,
        token_file,
        dir,
    }
}

impl Fixture {
    fn config(&self) -> TokenReviewConfig {
        let mut config = TokenReviewConfig::new(self.server.url());
        config.token_file.clone_from(&self.token_file);
        config.scopes.insert(
            "team-a/builder".into(),
            BTreeSet::from([Scope::Issue, Scope::Renew]),
        );
        config
            .scopes
            .insert("team-a/*".into(), BTreeSet::from([Scope::LeasesRead]));
        config
    }
}

#[tokio::test]
async fn authenticated_review_maps_the_service_account_and_is_cached() {
    let fx = fixture("paddock-broker").await;
    let auth = TokenReviewAuthenticator::new(fx.config()).expect("config");
    let token = sa_token("builder", Duration::from_mins(10));

    for _ in 0..20 {
        let id = auth.authenticate(&token).await.expect("authenticated");
        assert_eq!(id.subject, "system:serviceaccount:team-a:builder");
        assert_eq!(id.namespace, "team-a");
        assert_eq!(id.service_account.as_deref(), Some("builder"));
        assert_eq!(id.scopes, BTreeSet::from([Scope::Issue, Scope::Renew]));
        assert_eq!(id.backend, "tokenreview");
        assert_eq!(id.run, None);
    }
    assert_eq!(
        fx.server.hits(REVIEWS),
        1,
        "20 authentications, one API round trip"
    );

    // Concurrent first use of a new token is still one review.
    let auth = Arc::new(auth);
    let other = sa_token("builder", Duration::from_secs(601));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (auth, other) = (Arc::clone(&auth), other.clone());
        tasks.spawn(async move { auth.authenticate(&other).await.map(|id| id.namespace) });
    }
    while let Some(done) = tasks.join_next().await {
        assert_eq!(done.expect("task").expect("authenticated"), "team-a");
    }
    assert_eq!(fx.server.hits(REVIEWS), 2);

    let debug = format!("{auth:?}");
    assert!(
        !debug.contains("broker-token-1") && !debug.contains(&token),
        "{debug}"
    );
}

#[tokio::test]
async fn cache_entries_end_with_the_token() {
    let fx = fixture("paddock-broker").await;
    let auth = TokenReviewAuthenticator::new(fx.config()).expect("config");
    // `exp` has whole seconds, so a token "expiring in N s" has between N-1 and N s left: 3 s
    // keeps the cached call inside its lifetime on a loaded machine (1 s did not).
    let short = sa_token("builder", Duration::from_secs(3));
    auth.authenticate(&short).await.expect("first");
    auth.authenticate(&short).await.expect("cached");
    assert_eq!(fx.server.hits(REVIEWS), 1);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    auth.authenticate(&short).await.expect("reviewed again");
    assert_eq!(
        fx.server.hits(REVIEWS),
        2,
        "expired entry is reviewed again"
    );

    // An opaque token has no readable expiry: the fallback TTL applies.
    let before = fx.server.hits(REVIEWS);
    for _ in 0..3 {
        auth.authenticate("opaque-builder-token")
            .await
            .expect("opaque");
    }
    assert_eq!(
        fx.server.hits(REVIEWS),
        before + 1,
        "cached for the fallback TTL"
    );
    let mut config = fx.config();
    config.fallback_ttl = Duration::ZERO;
    let uncached = TokenReviewAuthenticator::new(config).expect("config");
    for _ in 0..3 {
        uncached
            .authenticate("opaque-builder-token")
            .await
            .expect("opaque");
    }
    assert_eq!(
        fx.server.hits(REVIEWS),
        before + 4,
        "zero fallback TTL: reviewed each time"
    );

    // A rejection is remembered for negative_ttl (default 5s).
    let invalid = sa_token("mallory", Duration::from_mins(10));
    for _ in 0..3 {
        let err = auth.authenticate(&invalid).await.expect_err("invalid");
        assert!(matches!(err, AuthError::Unauthenticated(_)));
        assert_no_bearer(&err, &invalid);
    }
    assert_eq!(
        fx.server.hits(REVIEWS),
        before + 5,
        "rejection cached briefly"
    );
}

#[tokio::test]
async fn rejections_are_unauthenticated_and_quote_no_bearer() {
    let fx = fixture("paddock-broker").await;
    let mut config = fx.config();
    config.negative_ttl = Duration::ZERO;
    let auth = TokenReviewAuthenticator::new(config).expect("config");

    let invalid = sa_token("mallory", Duration::from_mins(10));
    for _ in 0..2 {
        let err = auth
            .authenticate(&invalid)
            .await
            .expect_err("not authenticated");
        assert!(matches!(err, AuthError::Unauthenticated(_)), "{err:?}");
        assert_no_bearer(&err, &invalid);
    }
    assert_eq!(
        fx.server.hits(REVIEWS),
        2,
        "no negative caching when negative_ttl is zero"
    );

    let user = sa_token("alice", Duration::from_mins(10));
    let err = auth
        .authenticate(&user)
        .await
        .expect_err("not a service account");
    assert!(matches!(err, AuthError::Unauthenticated(_)), "{err:?}");
    assert_no_bearer(&err, &user);

    for junk in ["", &"x".repeat(20_000)] {
        let err = auth.authenticate(junk).await.expect_err("junk");
        assert!(matches!(err, AuthError::Unauthenticated(_)), "{err:?}");
    }
    assert_eq!(
        fx.server.hits(REVIEWS),
        3,
        "junk never reaches the API server"
    );
}

#[tokio::test]
async fn unconfirmed_audience_is_rejected() {
    let fx = fixture("some-other-audience").await;
    let auth = TokenReviewAuthenticator::new(fx.config()).expect("config");
    let token = sa_token("builder", Duration::from_mins(10));
    let err = auth.authenticate(&token).await.expect_err("audience");
    assert!(matches!(err, AuthError::Unauthenticated(_)), "{err:?}");
    assert_no_bearer(&err, &token);
}

#[tokio::test]
async fn api_trouble_is_unavailable_and_never_cached() {
    let token = sa_token("builder", Duration::from_mins(10));

    // Nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let fx = fixture("paddock-broker").await;
    let mut config = fx.config();
    config.api_server = format!("http://{closed}");
    config.http_timeout = Duration::from_secs(2);
    let auth = TokenReviewAuthenticator::new(config).expect("config");
    for _ in 0..2 {
        let err = auth.authenticate(&token).await.expect_err("down");
        assert!(matches!(err, AuthError::Unavailable(_)), "{err:?}");
        assert_no_bearer(&err, &token);
    }

    // The API server refuses the broker's own token; after the kubelet rotates the file,
    // the broker picks the new one up without a restart.
    let auth = TokenReviewAuthenticator::new(fx.config()).expect("config");
    *fx.broker_token.lock().expect("token") = "broker-token-2".to_owned();
    let err = auth.authenticate(&token).await.expect_err("refused");
    assert!(matches!(err, AuthError::Unavailable(_)), "{err:?}");
    assert!(!err.to_string().contains("broker-token"), "{err}");
    std::fs::write(&fx.token_file, "broker-token-2\n").expect("rotate");
    auth.authenticate(&token)
        .await
        .expect("rotated broker token is used");

    // Server errors and garbage answers.
    for (status, body) in [(500, "{}"), (201, "not json"), (200, "[1,2]")] {
        let server = TestServer::start(move |_| (status, body.to_owned())).await;
        let mut config = fx.config();
        config.api_server = server.url();
        let auth = TokenReviewAuthenticator::new(config).expect("config");
        let err = auth.authenticate(&token).await.expect_err("bad answer");
        assert!(
            matches!(err, AuthError::Unavailable(_)),
            "{status} {body}: {err:?}"
        );
        auth.authenticate(&token).await.expect_err("not cached");
        assert_eq!(server.hits(REVIEWS), 2, "failures are not cached");
    }
}

#[tokio::test]
async fn https_api_server_is_verified_against_the_configured_ca() {
    let tls = test_tls();
    let fx = fixture("paddock-broker").await;
    let server = TestServer::start_tls(
        api_server(Arc::clone(&fx.broker_token), "paddock-broker"),
        &tls,
    )
    .await;
    let ca_file = fx.dir.path().join("ca.pem");
    std::fs::write(&ca_file, &tls.ca_pem).expect("write ca");
    let token = sa_token("builder", Duration::from_mins(10));

    let mut config = fx.config();
    config.api_server = server.https_url();
    config.ca_file = Some(ca_file);
    let auth = TokenReviewAuthenticator::new(config.clone()).expect("config");
    let id = auth.authenticate(&token).await.expect("over https");
    assert_eq!(id.namespace, "team-a");
    assert_eq!(server.hits(REVIEWS), 1);

    // The same server is not trusted through the public roots, nor through another CA.
    let other_ca = fx.dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, test_tls().ca_pem).expect("write other ca");
    for ca in [None, Some(other_ca)] {
        let mut untrusted = config.clone();
        untrusted.ca_file = ca;
        let auth = TokenReviewAuthenticator::new(untrusted).expect("config");
        let err = auth
            .authenticate(&token)
            .await
            .expect_err("untrusted server");
        assert!(matches!(err, AuthError::Unavailable(_)), "{err:?}");
        assert_no_bearer(&err, &token);
    }
    assert_eq!(
        server.hits(REVIEWS),
        1,
        "no request reaches an unverified server"
    );
}

#[tokio::test]
async fn readiness_asks_the_api_server_with_the_brokers_own_token() {
    let fx = fixture("paddock-broker").await;
    let auth = TokenReviewAuthenticator::new(fx.config()).expect("config");
    let ready = auth.readiness().await;
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].name, "tokenreview");
    assert_eq!(
        ready[0].outcome,
        Ok("API server answering (v1.31.0)".to_owned())
    );
    assert_eq!(fx.server.hits("/version"), 1);

    // The API server no longer accepts the broker's token: not ready, and no token in the
    // reason.
    *fx.broker_token.lock().expect("token") = "rotated-elsewhere".to_owned();
    let ready = auth.readiness().await;
    let err = ready[0].outcome.clone().expect_err("refused");
    assert!(err.contains("401"), "{err}");
    assert!(!err.contains("broker-token-1"), "{err}");

    // Gone altogether.
    drop(fx.server);
    let ready = auth.readiness().await;
    assert!(ready[0].outcome.is_err(), "{ready:?}");
}
