use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use aws_lc_rs::{
    encoding::AsDer,
    rsa::{KeyPair, KeySize, PublicKeyComponents},
    signature::KeyPair as _,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header, get_current_timestamp};
use paddock_broker::auth::{
    AuthError, Authenticator, Scope,
    jwt::{JwtAlgorithm, JwtAuthenticator, JwtConfig, RequiredClaim},
};
use serde_json::{Value, json};

use crate::support::{TestServer, assert_no_bearer, pem};

pub(crate) const AUD: &str = "paddock-broker";

/// A signing key and its public JWK.
pub(crate) struct TestKey {
    encoding: EncodingKey,
    alg: Algorithm,
    jwk: Value,
    public_pem: Option<String>,
}

pub(crate) fn rsa_key(kid: &str) -> TestKey {
    let key = KeyPair::generate(KeySize::Rsa2048).expect("rsa keygen");
    let pkcs8 = pem("PRIVATE KEY", key.as_der().expect("pkcs8").as_ref());
    let public_pem = pem(
        "PUBLIC KEY",
        key.public_key().as_der().expect("spki").as_ref(),
    );
    // Big-endian, no leading zeros: the JWK form.
    let public = PublicKeyComponents::<Vec<u8>>::from(key.public_key());
    TestKey {
        encoding: EncodingKey::from_rsa_pem(pkcs8.as_bytes()).expect("encoding key"),
        alg: Algorithm::RS256,
        jwk: json!({
            "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
            "n": URL_SAFE_NO_PAD.encode(&public.n),
            "e": URL_SAFE_NO_PAD.encode(&public.e),
        }),
        public_pem: Some(public_pem),
    }
}

pub(crate) fn ec_key(kid: &str) -> TestKey {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ec keygen");
    let raw = key.public_key_raw();
    assert_eq!(raw.len(), 65, "uncompressed P-256 point");
    TestKey {
        encoding: EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("ec key"),
        alg: Algorithm::ES256,
        jwk: json!({
            "kty": "EC", "crv": "P-256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        }),
        public_pem: None,
    }
}

fn ed25519_key(kid: &str) -> TestKey {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 keygen");
    TestKey {
        encoding: EncodingKey::from_ed_pem(key.serialize_pem().as_bytes()).expect("ed key"),
        alg: Algorithm::EdDSA,
        jwk: json!({
            "kty": "OKP", "crv": "Ed25519", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(key.public_key_raw()),
        }),
        public_pem: None,
    }
}

/// A fake OIDC issuer: discovery document plus a JWKS that tests can rotate.
pub(crate) struct Issuer {
    server: TestServer,
    jwks: Arc<Mutex<Vec<Value>>>,
}

impl Issuer {
    pub(crate) async fn start(keys: &[&TestKey]) -> Issuer {
        let jwks: Arc<Mutex<Vec<Value>>> =
            Arc::new(Mutex::new(keys.iter().map(|k| k.jwk.clone()).collect()));
        let issuer_url: Arc<Mutex<String>> = Arc::default();
        let (served_jwks, served_url) = (Arc::clone(&jwks), Arc::clone(&issuer_url));
        let server = TestServer::start(move |seen| {
            let base = served_url.lock().expect("url").clone();
            match seen.path.as_str() {
                "/.well-known/openid-configuration" => (
                    200,
                    json!({"issuer": base, "jwks_uri": format!("{base}/jwks")}).to_string(),
                ),
                "/jwks" => (
                    200,
                    json!({"keys": *served_jwks.lock().expect("jwks")}).to_string(),
                ),
                _ => (404, "{}".to_owned()),
            }
        })
        .await;
        *issuer_url.lock().expect("url") = server.url();
        Issuer { server, jwks }
    }

    pub(crate) fn url(&self) -> String {
        self.server.url()
    }

    fn config(&self) -> JwtConfig {
        JwtConfig::new(self.url(), vec![AUD.to_owned()])
    }

    fn claims(&self) -> Value {
        let now = get_current_timestamp();
        json!({
            "iss": self.url(), "aud": AUD, "sub": "ci-bot",
            "namespace": "team-a", "scope": "openid broker:issue broker:renew",
            "iat": now, "exp": now + 600,
        })
    }
}

pub(crate) fn sign(key: &TestKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key.encoding).expect("sign")
}

async fn rejected(auth: &JwtAuthenticator, token: &str) -> AuthError {
    let err = auth
        .authenticate(token)
        .await
        .expect_err("token must be rejected");
    assert_no_bearer(&err, token);
    err
}

#[tokio::test]
async fn valid_rsa_and_ec_tokens_map_to_identities() {
    let (rsa, ec, ed) = (rsa_key("rsa-1"), ec_key("ec-1"), ed25519_key("ed-1"));
    let issuer = Issuer::start(&[&rsa, &ec, &ed]).await;
    let mut config = issuer.config();
    config.algorithms = vec![
        JwtAlgorithm::RS256,
        JwtAlgorithm::ES256,
        JwtAlgorithm::EdDSA,
    ];
    let auth = JwtAuthenticator::new(config).expect("config");

    let id = auth
        .authenticate(&sign(&rsa, Some("rsa-1"), &issuer.claims()))
        .await
        .expect("rsa");
    assert_eq!(id.subject, "ci-bot");
    assert_eq!(id.namespace, "team-a");
    assert_eq!(id.backend, "jwt");
    assert_eq!(id.service_account, None);
    assert_eq!(id.run, None);
    assert_eq!(id.scopes, BTreeSet::from([Scope::Issue, Scope::Renew]));

    let id = auth
        .authenticate(&sign(&ec, Some("ec-1"), &issuer.claims()))
        .await
        .expect("ec");
    assert_eq!(id.namespace, "team-a");
    let id = auth
        .authenticate(&sign(&ed, Some("ed-1"), &issuer.claims()))
        .await
        .expect("eddsa");
    assert_eq!(id.subject, "ci-bot");
    assert_eq!(issuer.server.hits("/.well-known/openid-configuration"), 1);
    assert_eq!(issuer.server.hits("/jwks"), 1, "keys are cached");

    // A key of the wrong type for the header's algorithm is not used.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("rsa-1".to_owned());
    let mismatched = jsonwebtoken::encode(&header, &issuer.claims(), &ec.encoding).expect("sign");
    assert!(matches!(
        rejected(&auth, &mismatched).await,
        AuthError::Unauthenticated(_)
    ));
}

#[tokio::test]
async fn registered_claims_are_enforced() {
    let key = rsa_key("k1");
    let issuer = Issuer::start(&[&key]).await;
    let mut config = issuer.config();
    config.leeway = Duration::from_secs(5);
    let auth = JwtAuthenticator::new(config).expect("config");
    let now = get_current_timestamp();

    let cases: Vec<(&str, Value)> = vec![
        ("wrong iss", json!({"iss": "https://evil.example.com"})),
        ("wrong aud", json!({"aud": "someone-else"})),
        ("aud list without ours", json!({"aud": ["a", "b"]})),
        ("expired", json!({"exp": now - 3600})),
        ("not yet valid", json!({"nbf": now + 3600})),
        ("missing exp", json!({"exp": null})),
        ("missing namespace", json!({"namespace": null})),
        ("bad namespace", json!({"namespace": "Team/../a"})),
    ];
    for (what, patch) in cases {
        let mut claims = issuer.claims();
        for (k, v) in patch.as_object().expect("object") {
            if v.is_null() {
                claims.as_object_mut().expect("object").remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        let err = rejected(&auth, &sign(&key, Some("k1"), &claims)).await;
        assert!(
            matches!(err, AuthError::Unauthenticated(_)),
            "{what}: {err:?}"
        );
    }

    // An audience list containing ours is fine; so is a clock skew within the leeway.
    let mut claims = issuer.claims();
    claims["aud"] = json!(["other", AUD]);
    claims["nbf"] = json!(now + 2);
    auth.authenticate(&sign(&key, Some("k1"), &claims))
        .await
        .expect("aud list + leeway");
}

#[tokio::test]
async fn none_and_hmac_tokens_never_verify() {
    let key = rsa_key("k1");
    let issuer = Issuer::start(&[&key]).await;
    let mut config = issuer.config();
    config.algorithms = vec![
        JwtAlgorithm::RS256,
        JwtAlgorithm::PS256,
        JwtAlgorithm::ES256,
    ];
    let auth = JwtAuthenticator::new(config).expect("config");
    let payload = URL_SAFE_NO_PAD.encode(issuer.claims().to_string());

    for header in [
        r#"{"alg":"none","typ":"JWT","kid":"k1"}"#,
        r#"{"alg":"None","kid":"k1"}"#,
    ] {
        let token = format!("{}.{payload}.", URL_SAFE_NO_PAD.encode(header));
        assert!(matches!(
            rejected(&auth, &token).await,
            AuthError::Unauthenticated(_)
        ));
    }

    // The classic confusion attack: HMAC keyed with the issuer's public key.
    let public_pem = key.public_pem.as_deref().expect("public pem");
    for secret in [
        public_pem.as_bytes(),
        key.jwk["n"].as_str().expect("n").as_bytes(),
    ] {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let mut header = Header::new(alg);
            header.kid = Some("k1".to_owned());
            let hmac = EncodingKey::from_secret(secret).expect("hmac key");
            let token = jsonwebtoken::encode(&header, &issuer.claims(), &hmac).expect("sign hmac");
            let err = rejected(&auth, &token).await;
            assert!(
                matches!(err, AuthError::Unauthenticated(_)),
                "{alg:?}: {err:?}"
            );
        }
    }

    // An allowed family, but not on the allow-list.
    let mut header = Header::new(Algorithm::RS512);
    header.kid = Some("k1".to_owned());
    let rs512 = jsonwebtoken::encode(&header, &issuer.claims(), &key.encoding).expect("sign");
    assert!(matches!(
        rejected(&auth, &rs512).await,
        AuthError::Unauthenticated(_)
    ));

    // A critical header extension the broker does not implement.
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("k1".to_owned());
    header.crit = Some(vec!["exp".to_owned()]);
    let crit = jsonwebtoken::encode(&header, &issuer.claims(), &key.encoding).expect("sign");
    assert!(matches!(
        rejected(&auth, &crit).await,
        AuthError::Unauthenticated(_)
    ));

    // A forged signature.
    let good = sign(&key, Some("k1"), &issuer.claims());
    let (head, _) = good.rsplit_once('.').expect("three parts");
    let forged = format!("{head}.{}", URL_SAFE_NO_PAD.encode([7u8; 256]));
    assert!(matches!(
        rejected(&auth, &forged).await,
        AuthError::Unauthenticated(_)
    ));

    for junk in ["", "a.b", "a.b.c", &"x".repeat(20_000)] {
        let err = auth.authenticate(junk).await.expect_err("junk");
        assert!(matches!(err, AuthError::Unauthenticated(_)), "{err:?}");
    }
    assert_eq!(
        issuer.server.hits("/jwks"),
        1,
        "rejected tokens cost no extra JWKS fetch"
    );
}

#[tokio::test]
async fn unknown_kid_refreshes_once_then_rotation_succeeds() {
    let (old, new) = (rsa_key("old"), ec_key("new"));
    let issuer = Issuer::start(&[&old]).await;
    let mut config = issuer.config();
    config.jwks_min_refresh = Duration::from_secs(1);
    let auth = JwtAuthenticator::new(config).expect("config");

    auth.authenticate(&sign(&old, Some("old"), &issuer.claims()))
        .await
        .expect("old key");
    assert_eq!(issuer.server.hits("/jwks"), 1);

    // The issuer rotates; the broker learns the new key on the first token that names it.
    *issuer.jwks.lock().expect("jwks") = vec![new.jwk.clone()];
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Signed up front so the flood below fits well inside the spacing window.
    let flood: Vec<String> = (0..25)
        .map(|i| sign(&new, Some(&format!("random-{i}")), &issuer.claims()))
        .collect();
    let new_token = sign(&new, Some("new"), &issuer.claims());
    let started = std::time::Instant::now();
    let id = auth.authenticate(&new_token).await.expect("new");
    assert_eq!(id.subject, "ci-bot");
    assert_eq!(
        issuer.server.hits("/jwks"),
        2,
        "exactly one refresh for the unknown kid"
    );

    // A flood of made-up kids inside the spacing window fetches nothing more.
    for token in &flood {
        let err = rejected(&auth, token).await;
        assert!(matches!(err, AuthError::Unauthenticated(_)), "{err:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "flood outlasted the window"
    );
    assert_eq!(
        issuer.server.hits("/jwks"),
        2,
        "random kids are rate-limited"
    );
    // The rotated-out key is gone.
    let err = rejected(&auth, &sign(&old, Some("old"), &issuer.claims())).await;
    assert!(matches!(err, AuthError::Unauthenticated(_)));
    assert_eq!(issuer.server.hits("/.well-known/openid-configuration"), 1);
}

#[tokio::test]
async fn verified_tokens_are_reused_only_while_keys_and_expiry_allow() {
    let (a, b) = (ec_key("a"), ec_key("b"));
    let issuer = Issuer::start(&[&a]).await;
    let mut config = issuer.config();
    config.jwks_min_refresh = Duration::from_millis(100);
    config.leeway = Duration::ZERO;
    let auth = JwtAuthenticator::new(config).expect("config");

    // Cached only until the token's own exp, even though the cache TTL is longer.
    let now = get_current_timestamp();
    let mut short = issuer.claims();
    short["exp"] = json!(now + 2);
    let short = sign(&a, Some("a"), &short);
    auth.authenticate(&short).await.expect("fresh token");
    auth.authenticate(&short).await.expect("still fresh");
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let err = rejected(&auth, &short).await;
    assert!(matches!(err, AuthError::Unauthenticated(_)), "{err:?}");

    // A re-fetched key set drops every cached identity: a token whose key was rotated out
    // stops working at the refresh, not at the end of the cache TTL.
    let token = sign(&a, Some("a"), &issuer.claims());
    auth.authenticate(&token).await.expect("key a");
    *issuer.jwks.lock().expect("jwks") = vec![b.jwk.clone()];
    auth.authenticate(&token)
        .await
        .expect("cached while the key set is unchanged");
    tokio::time::sleep(Duration::from_millis(150)).await;
    auth.authenticate(&sign(&b, Some("b"), &issuer.claims()))
        .await
        .expect("unknown kid b re-fetches the keys");
    let err = rejected(&auth, &token).await;
    assert!(matches!(err, AuthError::Unauthenticated(_)), "{err:?}");
}

#[tokio::test]
async fn required_claims_match_strings_and_arrays() {
    let key = ec_key("k1");
    let issuer = Issuer::start(&[&key]).await;
    let mut config = issuer.config();
    config.required_claims = vec![
        RequiredClaim {
            claim: "groups".into(),
            value: "paddock-users".into(),
        },
        RequiredClaim {
            claim: "env".into(),
            value: "prod".into(),
        },
    ];
    let auth = JwtAuthenticator::new(config).expect("config");
    let with = |groups: Value, env: Value| {
        let mut claims = issuer.claims();
        claims["groups"] = groups;
        claims["env"] = env;
        sign(&key, Some("k1"), &claims)
    };

    auth.authenticate(&with(json!(["dev", "paddock-users"]), json!("prod")))
        .await
        .expect("array");
    auth.authenticate(&with(json!("paddock-users"), json!(["prod"])))
        .await
        .expect("string");
    for (groups, env) in [
        (json!(["dev"]), json!("prod")),
        (json!("paddock-users"), json!("staging")),
        (json!(["paddock-users"]), json!(null)),
        (json!([["paddock-users"]]), json!("prod")),
        (json!({"paddock-users": true}), json!("prod")),
    ] {
        let err = rejected(&auth, &with(groups, env)).await;
        assert!(matches!(err, AuthError::Unauthenticated(_)), "{err:?}");
    }
}

#[tokio::test]
async fn claim_mapping_uses_configured_claims() {
    let key = rsa_key("k1");
    let issuer = Issuer::start(&[&key]).await;
    let mut config = issuer.config();
    config.claims.subject = "email".into();
    config.claims.namespace = "/kubernetes.io/namespace".into();
    config.claims.service_account = Some("/kubernetes.io/serviceaccount/name".into());
    config.claims.scopes = "permissions".into();
    let auth = JwtAuthenticator::new(config).expect("config");

    let mut claims = issuer.claims();
    claims["email"] = json!("bot@example.com");
    claims["kubernetes.io"] = json!({"namespace": "team-b", "serviceaccount": {"name": "runner"}});
    claims["permissions"] = json!(["broker:controller", "broker:leases:read", "admin"]);
    let id = auth
        .authenticate(&sign(&key, Some("k1"), &claims))
        .await
        .expect("mapped");
    assert_eq!(id.subject, "bot@example.com");
    assert_eq!(id.namespace, "team-b");
    assert_eq!(id.service_account.as_deref(), Some("runner"));
    assert_eq!(
        id.scopes,
        BTreeSet::from([Scope::LeasesRead, Scope::Controller])
    );
    assert!(id.may_act_in("team-z"));

    // A mapped service account that is missing is a rejection, not a silent None.
    claims["kubernetes.io"] = json!({"namespace": "team-b"});
    let err = rejected(&auth, &sign(&key, Some("k1"), &claims)).await;
    assert!(matches!(err, AuthError::Unauthenticated(_)));
}

#[tokio::test]
async fn unreachable_or_inconsistent_issuer_is_unavailable() {
    let key = rsa_key("k1");
    // A port nobody listens on any more.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let mut config = JwtConfig::new(format!("http://{closed}"), vec![AUD.to_owned()]);
    config.http_timeout = Duration::from_secs(2);
    let auth = JwtAuthenticator::new(config).expect("config");
    let mut claims = json!({"iss": format!("http://{closed}"), "aud": AUD, "sub": "s",
        "namespace": "team-a", "exp": get_current_timestamp() + 600});
    let token = sign(&key, Some("k1"), &claims);
    let err = rejected(&auth, &token).await;
    assert!(matches!(err, AuthError::Unavailable(_)), "{err:?}");
    let ready = auth.readiness().await;
    assert_eq!(ready[0].name, "jwt");
    assert!(ready[0].outcome.is_err(), "no keys, issuer down: {ready:?}");
    // Retries inside the spacing window do not hammer the issuer; still fail closed.
    assert!(matches!(
        rejected(&auth, &token).await,
        AuthError::Unavailable(_)
    ));

    // Discovery must name the configured issuer exactly.
    let issuer = Issuer::start(&[&key]).await;
    let auth = JwtAuthenticator::new(JwtConfig::new(
        format!("{}/", issuer.url()),
        vec![AUD.into()],
    ))
    .expect("config");
    claims["iss"] = json!(format!("{}/", issuer.url()));
    let err = rejected(&auth, &sign(&key, Some("k1"), &claims)).await;
    assert!(matches!(err, AuthError::Unavailable(_)), "{err:?}");
    assert_eq!(issuer.server.hits("/jwks"), 0);

    // With an explicit jwks_uri, discovery is skipped.
    let mut config = issuer.config();
    config.jwks_uri = Some(format!("{}/jwks", issuer.url()));
    let auth = JwtAuthenticator::new(config).expect("config");
    claims["iss"] = json!(issuer.url());
    auth.authenticate(&sign(&key, Some("k1"), &claims))
        .await
        .expect("jwks_uri");
    let ready = auth.readiness().await;
    let detail = ready[0].outcome.clone().expect("keys in hand");
    assert!(detail.starts_with("1 keys"), "{detail}");
    assert_eq!(issuer.server.hits("/.well-known/openid-configuration"), 1);
    assert!(!format!("{auth:?}").contains("BEGIN"));
}
