//! Every API route with every authentication backend, over the real HTTPS server built from a
//! config file by `config::build`: static keys, JWTs signed by keys served from a local
//! discovery/JWKS endpoint, service-account tokens checked by a local `TokenReview` endpoint,
//! RSA-OAEP session tokens for registered runs, and opaque tokens introspected (RFC 7662) at a
//! local HTTPS endpoint.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aws_lc_rs::{
    encoding::AsDer,
    rsa::{KeySize, PrivateDecryptingKey},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use jsonwebtoken::get_current_timestamp;
use paddock_broker::{
    auth::{Scope, rsa_session::encrypt_run_token},
    config::{self, Config},
    server::{self, Handle, routes::UNAUTHENTICATED_BODY},
};
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};

use crate::{
    common::{self, ALL_SCOPES, CONTROLLER_KEY, TEAM_A_KEY},
    jwt::{AUD, Issuer, TestKey, ec_key, sign},
    support::{TestServer, pem},
    tokenreview::{api_server, sa_token},
};
use crate::{introspection, support::test_tls};

const BROKER_SA_TOKEN: &str = "broker-sa-token-1";

/// The scopes every team caller gets in these tests: all but the controller's.
fn team_scopes() -> Vec<Scope> {
    ALL_SCOPES
        .into_iter()
        .filter(|s| *s != Scope::Controller)
        .collect()
}

fn scope_names(scopes: &[Scope]) -> Vec<&'static str> {
    scopes.iter().map(|s| s.as_str()).collect()
}

/// A broker built from a config file naming all four backends, plus the fake issuer and API
/// server it talks to.
pub(crate) struct Stack {
    pub dir: tempfile::TempDir,
    pub ca: CertificateDer<'static>,
    pub handle: Option<Handle>,
    pub rsa_public_pem: String,
    pub issuer: Issuer,
    pub jwt_key: TestKey,
    _api: TestServer,
    pub idp: TestServer,
    pub idp_state: introspection::Idp,
}

impl Stack {
    /// `rsa_limit`: (decryptsPerSecond, decryptBurst).
    pub async fn start(rsa_limit: (u32, u32)) -> Stack {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |name: &str| dir.path().join(name);
        for (name, value) in [
            ("hdr", "ghp_real"),
            ("qry", "maps-real"),
            ("bas", "git-real"),
            ("p1", "pat-one"),
            ("p2", "pat-two"),
        ] {
            std::fs::write(p(name), value).expect("secret");
        }
        std::fs::write(p("policy.yaml"), common::policy_yaml(dir.path())).expect("policy");
        std::fs::write(p("keys"), common::keys_text()).expect("keys");
        std::fs::write(p("sa-token"), BROKER_SA_TOKEN).expect("sa token");
        let pki = common::pki();
        std::fs::write(p("tls.crt"), pem("CERTIFICATE", &pki.server_chain[0])).expect("cert");
        std::fs::write(
            p("tls.key"),
            pem("PRIVATE KEY", pki.server_key.secret_pkcs8_der()),
        )
        .expect("key");

        let jwt_key = ec_key("k1");
        let issuer = Issuer::start(&[&jwt_key]).await;
        let api = TestServer::start(api_server(
            Arc::new(Mutex::new(BROKER_SA_TOKEN.to_owned())),
            "paddock-broker",
        ))
        .await;
        let team = scope_names(&team_scopes());
        let idp_tls = test_tls();
        let idp_state = introspection::Idp::new();
        let idp = TestServer::start_tls(idp_state.handler(), &idp_tls).await;
        let intro = introspection::config(dir.path(), &idp.https_url(), &idp_tls);
        let doc = json!({
            "listen": "127.0.0.1:0",
            "adminListen": "127.0.0.1:0",
            "tls": {"cert": p("tls.crt"), "key": p("tls.key")},
            "database": p("broker.db"),
            "policy": p("policy.yaml"),
            "policyPollSeconds": 0,
            "audit": {"path": p("audit.jsonl"), "fsync": false},
            "auth": {
                "order": ["staticKeys", "jwt", "tokenReview", "rsaSession", "introspection"],
                "staticKeys": {"file": p("keys")},
                "jwt": [{
                    "issuer": issuer.url(),
                    "audiences": [AUD],
                    "algorithms": ["ES256"],
                    "claims": {"serviceAccount": "sa"},
                    "jwksMinRefresh": "1s",
                }],
                "tokenReview": {
                    "apiServer": api.url(),
                    "tokenFile": p("sa-token"),
                    "scopes": {"team-a/builder": team},
                },
                "rsaSession": {
                    "keyFile": p("rsa/session.pem"),
                    "keyBits": 2048,
                    "scopes": team,
                    "decryptsPerSecond": rsa_limit.0,
                    "decryptBurst": rsa_limit.1,
                },
                "introspection": introspection::config_json(&intro, &team),
            },
        });
        // Through the YAML file, as `paddock-broker serve --config` reads it.
        let yaml = serde_yaml_ng::to_string(&doc).expect("yaml");
        std::fs::write(p("broker.yaml"), yaml).expect("config");
        let config = Config::load(&p("broker.yaml")).expect("config loads");
        // Key generation blocks: keep it off the async workers.
        let built = tokio::task::spawn_blocking(move || config::build(&config))
            .await
            .expect("build task")
            .expect("config builds");
        assert_eq!(
            built.options.auth.name(),
            "chain",
            "config::build serves an AuthChain"
        );
        let rsa_public_pem = built
            .rsa_session
            .as_ref()
            .expect("rsa backend built")
            .public_key_pem()
            .to_owned();
        let handle = server::spawn(built.options).await.expect("spawn");
        Stack {
            dir,
            ca: pki.ca_der,
            handle: Some(handle),
            rsa_public_pem,
            issuer,
            jwt_key,
            _api: api,
            idp,
            idp_state,
        }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.handle.as_ref().expect("running").addr
    }

    pub async fn post(&self, path: &str, bearer: &str, body: &Value) -> (u16, Value) {
        common::tls_json(
            self.addr(),
            &self.ca,
            &common::post_request(path, bearer, &body.to_string()),
        )
        .await
    }

    pub async fn get(&self, path: &str, bearer: &str) -> (u16, Value) {
        common::tls_json(self.addr(), &self.ca, &get_request(path, bearer)).await
    }

    /// (status, head, body) of a raw request.
    pub async fn raw(&self, request: &str) -> (u16, String, Vec<u8>) {
        common::tls_raw(self.addr(), &self.ca, request).await
    }

    pub async fn register(&self, run: &str, namespace: &str) {
        let (status, v) = self
            .post(
                "/v1/runs",
                CONTROLLER_KEY,
                &json!({"run": run, "namespace": namespace, "template": "t", "phase": "Running"}),
            )
            .await;
        assert_eq!(status, 200, "{v}");
    }

    /// A JWT from the test issuer.
    pub fn jwt(&self, sub: &str, namespace: &str, scopes: &[Scope]) -> String {
        let now = get_current_timestamp();
        let mut claims = json!({
            "iss": self.issuer.url(), "aud": AUD, "sub": sub, "namespace": namespace,
            "sa": "ci", "scope": format!("openid {}", scope_names(scopes).join(" ")),
            "iat": now, "exp": now + 600,
        });
        if scopes.is_empty() {
            claims["scope"] = json!("openid");
        }
        sign(&self.jwt_key, Some("k1"), &claims)
    }

    pub fn rsa_token(&self, run: &str) -> String {
        encrypt_run_token(&self.rsa_public_pem, run).expect("encrypt run token")
    }

    /// The audit log's events as JSON.
    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

fn get_request(path: &str, bearer: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {bearer}\r\nConnection: close\r\n\r\n"
    )
}

/// Runs every route as one caller on its own run.
async fn every_route(stack: &Stack, bearer: &str, run: &str) {
    let (status, v) = stack
        .post(
            "/v1/issue",
            bearer,
            &json!({"run": run, "credential": "gh"}),
        )
        .await;
    assert_eq!(status, 200, "issue: {v}");
    let lease = v["lease_id"].as_str().expect("lease id").to_owned();
    let placeholder = v["value"].as_str().expect("placeholder").to_owned();
    assert!(placeholder.starts_with("pdk-user-secret-"), "{v}");

    let (status, v) = stack
        .post("/v1/renew", bearer, &json!({"lease_id": lease}))
        .await;
    assert_eq!(status, 200, "renew: {v}");

    let (status, v) = stack
        .post(
            "/v1/validate-egress",
            bearer,
            &json!({"run": run, "host": "api.github.com", "port": 443}),
        )
        .await;
    assert_eq!(
        (status, v["allowed"].as_bool()),
        (200, Some(true)),
        "validate-egress: {v}"
    );

    let substitute = json!({
        "run": run, "host": "api.github.com", "port": 443, "transport": "tls", "method": "GET", "path": "/user",
        "headers": [{"name": "Authorization", "value": format!("Bearer {placeholder}")}],
    });
    let (status, v) = stack.post("/v1/substitute-auth", bearer, &substitute).await;
    assert_eq!(status, 200, "substitute-auth: {v}");
    assert_eq!(v["matched"], json!(true), "{v}");
    assert_eq!(
        v["set_headers"][0]["value"],
        json!("Bearer ghp_real"),
        "{v}"
    );

    let (status, v) = stack.get(&format!("/v1/leases?run={run}"), bearer).await;
    assert_eq!(status, 200, "leases: {v}");
    assert_eq!(v["leases"][0]["lease_id"], json!(lease), "{v}");

    let (status, v) = stack
        .post("/v1/revoke", bearer, &json!({"lease_id": lease}))
        .await;
    assert_eq!(
        (status, v["revoked"].as_bool()),
        (200, Some(true)),
        "revoke: {v}"
    );
    let (status, v) = stack.post("/v1/substitute-auth", bearer, &substitute).await;
    assert!(
        status >= 400 || v["matched"] == json!(false),
        "a revoked placeholder still substitutes: {status} {v}"
    );

    // Registering runs needs the controller scope, which no team caller holds.
    let (status, v) = stack
        .post(
            "/v1/runs",
            bearer,
            &json!({"run": "x-1", "namespace": "team-a", "template": "t", "phase": "Running"}),
        )
        .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("Forbidden")),
        "{v}"
    );
}

/// The subject the audit log recorded for the credential issued on `run`.
fn issuer_of(stack: &Stack, run: &str) -> String {
    stack
        .audit()
        .into_iter()
        .find(|e| e["run"] == json!(run) && e["event"] == json!("credential-issued"))
        .and_then(|e| e["caller"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no issue event for {run}: {:?}", stack.audit()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_with_every_backend() {
    let mut stack = Stack::start((20, 40)).await;
    for run in ["run-static", "run-jwt", "run-tr", "run-rsa", "run-intro"] {
        stack.register(run, "team-a").await;
    }
    let jwt = stack.jwt("ci-bot", "team-a", &team_scopes());
    let sa = sa_token("builder", Duration::from_mins(10));
    let rsa = stack.rsa_token("run-rsa");
    every_route(&stack, TEAM_A_KEY, "run-static").await;
    every_route(&stack, &jwt, "run-jwt").await;
    every_route(&stack, &sa, "run-tr").await;
    every_route(&stack, &rsa, "run-rsa").await;
    every_route(&stack, "opaque-team-a", "run-intro").await;

    // Each request was authenticated by the backend its credential belongs to.
    assert_eq!(issuer_of(&stack, "run-static"), "team-a");
    assert_eq!(issuer_of(&stack, "run-jwt"), "ci-bot");
    assert_eq!(
        issuer_of(&stack, "run-tr"),
        "system:serviceaccount:team-a:builder"
    );
    assert_eq!(issuer_of(&stack, "run-rsa"), "run:run-rsa");
    assert_eq!(issuer_of(&stack, "run-intro"), "ci-bot");

    // An introspected token without a mapped scope authenticates but may do nothing.
    let (status, v) = stack
        .post(
            "/v1/validate-egress",
            "opaque-no-scope",
            &json!({"run": "run-intro", "host": "api.github.com", "port": 443}),
        )
        .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("Forbidden")),
        "{v}"
    );

    // A JWT with the controller scope may register runs in any namespace.
    let ctrl = stack.jwt("controller", "paddock-system", &ALL_SCOPES);
    let (status, v) = stack
        .post(
            "/v1/runs",
            &ctrl,
            &json!({"run": "run-b", "namespace": "team-b", "template": "t", "phase": "Running"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");

    // An RSA token is bound to its run: another run of the same namespace is refused.
    let (status, v) = stack
        .post(
            "/v1/validate-egress",
            &rsa,
            &json!({"run": "run-static", "host": "api.github.com", "port": 443}),
        )
        .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("Forbidden")),
        "{v}"
    );
    // A well-formed token for a run the broker does not know is 403, not 401.
    let (status, v) = stack
        .post(
            "/v1/validate-egress",
            &stack.rsa_token("run-ghost"),
            &json!({"run": "run-ghost", "host": "api.github.com", "port": 443}),
        )
        .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("Forbidden")),
        "{v}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_get_byte_identical_401s_from_every_backend() {
    let mut stack = Stack::start((20, 40)).await;
    stack.register("run-a", "team-a").await;
    let now = get_current_timestamp();
    let stranger = ec_key("k1");
    let expired = sign(
        &stack.jwt_key,
        Some("k1"),
        &json!({"iss": stack.issuer.url(), "aud": AUD, "sub": "x", "namespace": "team-a",
                "scope": "broker:issue", "iat": now - 7200, "exp": now - 3600}),
    );
    let wrong_audience = sign(
        &stack.jwt_key,
        Some("k1"),
        &json!({"iss": stack.issuer.url(), "aud": "someone-else", "sub": "x",
                "namespace": "team-a", "scope": "broker:issue", "iat": now, "exp": now + 600}),
    );
    let good_jwt = stack.jwt("ci-bot", "team-a", &team_scopes());
    let forged = sign(
        &stranger,
        Some("k1"),
        &json!({"iss": stack.issuer.url(), "aud": AUD, "sub": "x", "namespace": "team-a",
                "scope": "broker:issue", "iat": now, "exp": now + 600}),
    );
    let mut tampered = good_jwt.clone();
    tampered.replace_range(tampered.len() - 4.., "AAAA");
    // Correctly sized ciphertexts that do not decrypt (the key is 2048 bits: 256 bytes).
    let random_rsa = STANDARD.encode([0x5a_u8; 256]);
    let other_key_rsa = {
        let other = PrivateDecryptingKey::generate(KeySize::Rsa2048).expect("keygen");
        let spki = other.public_key().as_der().expect("spki");
        encrypt_run_token(&pem("PUBLIC KEY", spki.as_ref()), "run-a").expect("encrypt")
    };
    let bad: Vec<(&str, String)> = vec![
        ("unknown static key", "team-a-key-wrong".to_owned()),
        ("static key with a typo", format!("{TEAM_A_KEY}x")),
        ("expired jwt", expired),
        ("jwt for another audience", wrong_audience),
        ("jwt signed by another key", forged),
        ("jwt with a broken signature", tampered),
        (
            "service-account token TokenReview rejects",
            sa_token("mallory", Duration::from_mins(10)),
        ),
        ("rsa ciphertext that does not decrypt", random_rsa),
        ("rsa token for another broker's key", other_key_rsa),
        ("garbage", "%%%".to_owned()),
        (
            "opaque token the IdP says is inactive",
            "opaque-revoked".to_owned(),
        ),
        (
            "opaque token of a client not allowed",
            "opaque-other-client".to_owned(),
        ),
    ];
    let mut first: Option<(String, Vec<u8>)> = None;
    for (what, bearer) in &bad {
        for request in [
            common::post_request("/v1/issue", bearer, r#"{"run":"run-a","credential":"gh"}"#),
            common::post_request(
                "/v1/substitute-auth",
                bearer,
                r#"{"run":"run-a","host":"api.github.com","port":443,"transport":"tls","method":"GET","path":"/","headers":[]}"#,
            ),
            get_request("/v1/leases?run=run-a", bearer),
        ] {
            let (status, head, body) = stack.raw(&request).await;
            assert_eq!(status, 401, "{what}: {}", String::from_utf8_lossy(&body));
            assert_eq!(body, UNAUTHENTICATED_BODY.as_bytes(), "{what}");
            let www: Vec<&str> = head
                .lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("www-authenticate:"))
                .collect();
            assert_eq!(www, ["www-authenticate: Bearer"], "{what}: {head}");
            match &first {
                None => first = Some(((*what).to_owned(), body)),
                Some((_, b)) => assert_eq!(&body, b, "{what}"),
            }
        }
    }
    // A missing or non-bearer Authorization header is the same 401.
    for request in [
        "POST /v1/issue HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_owned(),
        format!("GET /v1/leases?run=run-a HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic {}\r\nConnection: close\r\n\r\n", STANDARD.encode("a:b")),
    ] {
        let (status, _, body) = stack.raw(&request).await;
        assert_eq!((status, body.as_slice()), (401, UNAUTHENTICATED_BODY.as_bytes()));
    }
    // And the good credentials of the same shapes still work after all that.
    let (status, v) = stack.get("/v1/leases?run=run-a", &good_jwt).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = stack
        .get("/v1/leases?run=run-a", &stack.rsa_token("run-a"))
        .await;
    // This stack gives RSA session tokens the team scopes, leases:read included.
    assert_eq!(status, 200, "{v}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_trouble_is_503_never_401_and_never_cached() {
    let mut stack = Stack::start((20, 40)).await;
    stack.register("run-a", "team-a").await;
    let path = "/v1/leases?run=run-a";
    *stack.idp_state.status.lock().expect("status") = 503;
    let (status, v) = stack.get(path, "opaque-team-a").await;
    assert_eq!(
        (status, v["code"].as_str()),
        (503, Some("Unavailable")),
        "{v}"
    );
    // Slow beyond httpTimeout (2 s) is the same.
    *stack.idp_state.status.lock().expect("status") = 200;
    stack.idp.set_delay(Duration::from_secs(4));
    let started = Instant::now();
    let (status, _) = stack.get(path, "opaque-team-a").await;
    assert_eq!(status, 503);
    assert!(started.elapsed() < Duration::from_secs(4));
    // Local backends do not depend on the IdP.
    let (status, v) = stack.get(path, TEAM_A_KEY).await;
    assert_eq!(status, 200, "{v}");
    stack.idp.set_delay(Duration::ZERO);
    let (status, v) = stack.get(path, "opaque-team-a").await;
    assert_eq!(status, 200, "the failures were not cached: {v}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_identities_act_only_in_their_namespace() {
    let mut stack = Stack::start((20, 40)).await;
    stack.register("run-a", "team-a").await;
    stack.register("run-b", "team-b").await;
    let team_a = stack.jwt("alice", "team-a", &team_scopes());
    let team_b = stack.jwt("bob", "team-b", &team_scopes());

    let (status, v) = stack
        .post(
            "/v1/issue",
            &team_a,
            &json!({"run": "run-a", "credential": "gh"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let lease = v["lease_id"].as_str().expect("lease").to_owned();
    let placeholder = v["value"].as_str().expect("value").to_owned();

    // team-b's caller cannot touch team-a's run, its lease or its placeholder.
    for (path, body) in [
        ("/v1/issue", json!({"run": "run-a", "credential": "gh"})),
        ("/v1/renew", json!({"lease_id": lease})),
        ("/v1/revoke", json!({"lease_id": lease})),
        (
            "/v1/validate-egress",
            json!({"run": "run-a", "host": "api.github.com", "port": 443}),
        ),
        (
            "/v1/substitute-auth",
            json!({"run": "run-a", "host": "api.github.com", "port": 443, "transport": "tls", "method": "GET",
                   "path": "/", "headers": [{"name": "Authorization",
                                              "value": format!("Bearer {placeholder}")}]}),
        ),
    ] {
        let (status, v) = stack.post(path, &team_b, &body).await;
        assert!(
            status == 403 || status == 404,
            "{path} across namespaces: {status} {v}"
        );
        assert!(
            !v.to_string().contains("ghp_real"),
            "{path} leaked the secret: {v}"
        );
    }
    let (status, v) = stack.get("/v1/leases?run=run-a", &team_b).await;
    assert_eq!(status, 403, "{v}");
    // team-b's policy has no credential, but its own run is reachable (a policy answer, not 403).
    let (status, v) = stack
        .post(
            "/v1/validate-egress",
            &team_b,
            &json!({"run": "run-b", "host": "api.github.com", "port": 443}),
        )
        .await;
    assert_eq!((status, v["allowed"].as_bool()), (200, Some(false)), "{v}");

    // The lease is intact for its owner.
    let (status, v) = stack.get("/v1/leases?run=run-a", &team_a).await;
    assert_eq!(
        (status, v["leases"][0]["revoked"].as_bool()),
        (200, Some(false)),
        "{v}"
    );

    // A namespace claim that is not a valid namespace never authenticates.
    let odd = stack.jwt("eve", "../team-a", &team_scopes());
    let (status, _, body) = stack.raw(&get_request("/v1/leases?run=run-a", &odd)).await;
    assert_eq!(
        (status, body.as_slice()),
        (401, UNAUTHENTICATED_BODY.as_bytes())
    );

    // Scopes come from the token: without substitute-auth the route is refused.
    let narrow = stack.jwt("carol", "team-a", &[Scope::Issue]);
    let (status, v) = stack
        .post(
            "/v1/validate-egress",
            &narrow,
            &json!({"run": "run-a", "host": "api.github.com", "port": 443}),
        )
        .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("Forbidden")),
        "{v}"
    );

    // The controller scope crosses namespaces.
    let ctrl = stack.jwt("controller", "paddock-system", &ALL_SCOPES);
    let (status, v) = stack.get("/v1/leases?run=run-a", &ctrl).await;
    assert_eq!(status, 200, "{v}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_rsa_tokens_are_bounded_by_the_decryption_limit() {
    let mut stack = Stack::start((1, 2)).await;
    stack.register("run-a", "team-a").await;
    let valid = stack.rsa_token("run-a");
    let egress = json!({"run": "run-a", "host": "api.github.com", "port": 443});
    let started = Instant::now();
    // Decrypted once (one of the two burst slots), then served from the cache.
    let (status, v) = stack.post("/v1/validate-egress", &valid, &egress).await;
    assert_eq!(status, 200, "{v}");

    let bogus: Vec<String> = (0..8_u8)
        .map(|i| STANDARD.encode([i.wrapping_add(1); 256]))
        .collect();
    let answers = concurrent_statuses(&stack, &bogus, &egress).await;
    let elapsed = started.elapsed().as_secs_f64().ceil();
    let unauthenticated = answers.iter().filter(|s| **s == 401).count();
    let limited = answers.iter().filter(|s| **s == 503).count();
    assert_eq!(unauthenticated + limited, bogus.len(), "{answers:?}");
    // At most the remaining burst plus what refilled meanwhile cost a decryption.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a few seconds"
    )]
    let allowed = 1 + elapsed as usize;
    assert!(
        limited >= 1 && unauthenticated <= allowed,
        "{answers:?} in {elapsed}s"
    );

    // Tokens already seen, and the other backends, are not affected by the limit.
    let (status, v) = stack.post("/v1/validate-egress", &valid, &egress).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = stack.post("/v1/validate-egress", TEAM_A_KEY, &egress).await;
    assert_eq!(status, 200, "{v}");
    stack.stop().await;
}

/// Sends one request per bogus bearer, all at once, and returns the statuses.
async fn concurrent_statuses(stack: &Stack, bearers: &[String], body: &Value) -> Vec<u16> {
    let requests: Vec<String> = bearers
        .iter()
        .map(|b| common::post_request("/v1/validate-egress", b, &body.to_string()))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for request in requests {
        let (addr, ca) = (stack.addr(), stack.ca.clone());
        tasks.spawn(async move { common::tls_raw(addr, &ca, &request).await.0 });
    }
    let mut out = Vec::new();
    while let Some(status) = tasks.join_next().await {
        out.push(status.expect("request task"));
    }
    out
}
