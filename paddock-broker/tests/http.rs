//! In-process integration tests over loopback TLS.

mod common;

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use common::{CONTROLLER_KEY, Env, EnvOptions, READ_ONLY_KEY, TEAM_A_KEY, TEAM_B_KEY};
use paddock_broker::{
    ratelimit::{RateLimitConfig, RateSpec},
    wire::{IssueResponse, LeasesResponse, SubstituteAuthResponse},
};
use serde_json::json;

async fn env() -> Env {
    let env = Env::start(EnvOptions::default()).await;
    for run in ["r1", "r2", "r3"] {
        env.register(run, "team-a", "Running").await;
    }
    env
}

async fn issue(env: &Env, run: &str, cred: &str) -> IssueResponse {
    let (status, v) = env
        .post(
            "/v1/issue",
            Some(TEAM_A_KEY),
            &json!({"run": run, "credential": cred}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    serde_json::from_value(v).expect("issue response")
}

async fn substitute(env: &Env, body: serde_json::Value) -> (u16, serde_json::Value) {
    env.post("/v1/substitute-auth", Some(TEAM_A_KEY), &body.to_string())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one walk through every route, in order"
)]
async fn every_route_with_static_keys() {
    let env = env().await;
    let gh = issue(&env, "r1", "gh").await;
    assert!(gh.value.starts_with("pdk-user-secret-"));

    let (status, v) = substitute(
        &env,
        json!({"run": "r1", "host": "api.github.com", "port": 443, "transport": "tls", "method": "GET", "path": "/user",
               "headers": [{"name": "Authorization", "value": format!("Bearer {}", gh.value)}]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let out: SubstituteAuthResponse = serde_json::from_value(v).expect("wire type");
    assert_eq!(out.set_headers[0].value, "Bearer ghp_real");

    let (status, v) = env
        .post(
            "/v1/renew",
            Some(TEAM_A_KEY),
            &json!({"lease_id": gh.lease_id}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["expires_at"].as_u64().expect("expiry") >= gh.expires_at);

    let (status, v) = env
        .post(
            "/v1/validate-egress",
            Some(TEAM_A_KEY),
            &json!({"run": "r1", "host": "api.github.com", "port": 443}).to_string(),
        )
        .await;
    assert_eq!(
        (
            status,
            v["allowed"].as_bool(),
            v["substitute_auth"].as_bool()
        ),
        (200, Some(true), Some(true)),
        "{v}"
    );
    let (status, v) = env
        .post(
            "/v1/validate-egress",
            Some(TEAM_A_KEY),
            &json!({"run": "r1", "host": "evil.example", "port": 443}).to_string(),
        )
        .await;
    assert_eq!((status, v["allowed"].as_bool()), (200, Some(false)), "{v}");
    // Without a port: could the run reach the name at all (the proxy's DNS server asks this).
    for (host, allowed) in [("api.github.com", true), ("evil.example", false)] {
        let (status, v) = env
            .post(
                "/v1/validate-egress",
                Some(TEAM_A_KEY),
                &json!({"run": "r1", "host": host}).to_string(),
            )
            .await;
        assert_eq!(
            (status, v["allowed"].as_bool()),
            (200, Some(allowed)),
            "{host}: {v}"
        );
    }

    let (status, v) = env.get("/v1/leases?run=r1", READ_ONLY_KEY).await;
    assert_eq!(status, 200, "{v}");
    let leases: LeasesResponse = serde_json::from_value(v.clone()).expect("wire type");
    assert_eq!(leases.leases.len(), 1);
    assert!(
        !v.to_string().contains(&gh.value),
        "listing never shows the bearer"
    );

    let (status, v) = env
        .post(
            "/v1/revoke",
            Some(TEAM_A_KEY),
            &json!({"lease_id": gh.lease_id}).to_string(),
        )
        .await;
    assert_eq!((status, v["revoked"].as_bool()), (200, Some(true)), "{v}");
    let (status, v) = substitute(
        &env,
        json!({"run": "r1", "host": "api.github.com", "port": 443, "transport": "tls", "method": "GET", "path": "/user",
               "headers": [{"name": "Authorization", "value": format!("Bearer {}", gh.value)}]}),
    )
    .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("Forbidden")),
        "revoked bearer: {v}"
    );

    // Scope enforcement: the read-only key cannot issue; team keys cannot register runs.
    let (status, v) = env
        .post(
            "/v1/issue",
            Some(READ_ONLY_KEY),
            &json!({"run": "r1", "credential": "gh"}).to_string(),
        )
        .await;
    assert_eq!((status, v["code"].as_str()), (403, Some("Forbidden")));
    let (status, _) = env
        .post(
            "/v1/runs",
            Some(TEAM_A_KEY),
            r#"{"run":"x","namespace":"team-a","template":"t","phase":"Running"}"#,
        )
        .await;
    assert_eq!(status, 403);

    let (status, metrics) = env.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("paddock_broker_requests_total"),
        "{metrics}"
    );
    assert!(!metrics.contains(&gh.value));
    assert_eq!(env.admin_get("/healthz").await.0, 200);
    let (status, ready) = env.admin_get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    let ready: serde_json::Value = serde_json::from_str(&ready).expect("JSON");
    assert_eq!(ready["ready"], true);
    let names: Vec<&str> = ready["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["store", "policy", "auth:static-keys"], "{ready}");
    assert_eq!(ready["checks"][0]["detail"], "sqlite answering");

    // The proxies' readiness call: authenticated, scoped, no audit record.
    let (status, v) = env.get("/v1/ping", TEAM_A_KEY).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"store": "sqlite"}));
    let (status, _) = env.get("/v1/ping", READ_ONLY_KEY).await;
    assert_eq!(status, 403, "ping needs broker:validate-egress");
    let (status, _) = env.get("/v1/ping", "not-a-key-0123456789").await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_and_basic_auth_substitution_survive_the_wire() {
    let env = env().await;
    let maps = issue(&env, "r1", "maps").await;
    let (status, v) = substitute(
        &env,
        json!({"run": "r1", "host": "maps.example.com", "port": 443, "transport": "tls", "method": "GET", "path": "/geo",
               "query": format!("q=paris&key={}", maps.value), "headers": []}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let out: SubstituteAuthResponse = serde_json::from_value(v).expect("wire");
    assert_eq!(out.set_query.len(), 1);
    assert_eq!(
        (
            out.set_query[0].name.as_str(),
            out.set_query[0].value.as_str()
        ),
        ("key", "maps-real")
    );

    let git = issue(&env, "r1", "git").await;
    let basic = format!("Basic {}", STANDARD.encode(format!("oauth2:{}", git.value)));
    let (status, v) = substitute(
        &env,
        json!({"run": "r1", "host": "github.com", "port": 443, "transport": "tls", "method": "GET", "path": "/o/r.git/info/refs",
               "query": "service=git-upload-pack", "headers": [{"name": "Authorization", "value": basic}]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let out: SubstituteAuthResponse = serde_json::from_value(v).expect("wire");
    let basic = out.basic_auth.expect("basic auth replacement");
    assert_eq!(
        (basic.username.as_str(), basic.password.as_str()),
        ("x-access-token", "git-real")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_scoping() {
    let env = env().await;
    env.register("rb", "team-b", "Running").await;
    let (status, v) = env
        .post(
            "/v1/issue",
            Some(TEAM_B_KEY),
            &json!({"run": "r1", "credential": "gh"}).to_string(),
        )
        .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("Forbidden")),
        "{v}"
    );
    let (status, v) = env.get("/v1/leases?run=r1", TEAM_B_KEY).await;
    assert_eq!(status, 403, "{v}");
    let gh = issue(&env, "r1", "gh").await;
    let (status, _) = env
        .post(
            "/v1/revoke",
            Some(TEAM_B_KEY),
            &json!({"lease_id": gh.lease_id}).to_string(),
        )
        .await;
    assert_eq!(status, 404);
    // The team-a policy does not apply to team-b runs, even for the controller.
    let (status, v) = env
        .post(
            "/v1/issue",
            Some(CONTROLLER_KEY),
            &json!({"run": "rb", "credential": "gh"}).to_string(),
        )
        .await;
    assert_eq!(status, 403, "{v}");
    let (status, v) = env.get("/v1/leases?run=r1", CONTROLLER_KEY).await;
    assert_eq!(
        (status, v["leases"].as_array().map(Vec::len)),
        (200, Some(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_answers_are_byte_identical() {
    let env = env().await;
    let body = r#"{"run":"r1","credential":"gh"}"#;
    let variants = [
        String::new(),
        "Authorization: Bearer wrong-key\r\n".to_owned(),
        "Authorization: Basic dXNlcjpwYXNz\r\n".to_owned(),
        "Authorization: Bearer \r\n".to_owned(),
        format!("Authorization: Bearer {TEAM_A_KEY}x\r\n"),
    ];
    let mut bodies = Vec::new();
    for auth in variants {
        let req = format!(
            "POST /v1/issue HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let (status, head, body) = env.raw(req.as_bytes()).await;
        assert_eq!(status, 401, "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer")
        );
        bodies.push(body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "401 bodies differ");
    assert_eq!(
        bodies[0],
        paddock_broker::server::routes::UNAUTHENTICATED_BODY.as_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limiting() {
    let limits = RateLimitConfig {
        issue: RateSpec {
            per_second: 1,
            burst: 3,
        },
        ..RateLimitConfig::default()
    };
    let env = Env::start(EnvOptions {
        limits,
        ..EnvOptions::default()
    })
    .await;
    env.register("r1", "team-a", "Running").await;
    env.register("r2", "team-a", "Running").await;
    let req = json!({"run": "r1", "credential": "gh"}).to_string();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(env.post("/v1/issue", Some(TEAM_A_KEY), &req).await);
    }
    assert!(statuses[..3].iter().all(|(s, _)| *s == 200));
    let (status, v) = &statuses[4];
    assert_eq!(
        (*status, v["code"].as_str()),
        (429, Some("RateLimited")),
        "{v}"
    );
    let (status, _) = env
        .post(
            "/v1/issue",
            Some(TEAM_A_KEY),
            &json!({"run": "r2", "credential": "gh"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "another run has its own bucket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_pool_reservations_and_bearers() {
    let mut env = env().await;
    let first = issue(&env, "r1", "pats").await;
    env.stop().await;
    env.boot(&EnvOptions::default()).await;
    let second = issue(&env, "r2", "pats").await;
    let (status, v) = env
        .post(
            "/v1/issue",
            Some(TEAM_A_KEY),
            &json!({"run": "r3", "credential": "pats"}).to_string(),
        )
        .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (503, Some("PoolExhausted")),
        "{v}"
    );
    let sub = |run: &str, bearer: &str| {
        json!({"run": run, "host": "api.gitlab.com", "port": 443, "transport": "tls", "method": "GET", "path": "/",
               "headers": [{"name": "Authorization", "value": format!("Bearer {bearer}")}]})
    };
    let (s1, v1) = substitute(&env, sub("r1", &first.value)).await;
    let (s2, v2) = substitute(&env, sub("r2", &second.value)).await;
    assert_eq!((s1, s2), (200, 200), "{v1} {v2}");
    let a = v1["set_headers"][0]["value"].as_str().expect("pat");
    let b = v2["set_headers"][0]["value"].as_str().expect("pat");
    assert_ne!(a, b, "one PAT per lease across a restart");
    assert!(
        ["Bearer pat-one", "Bearer pat-two"].contains(&a)
            && ["Bearer pat-one", "Bearer pat-two"].contains(&b)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_failure_is_503_and_leaves_nothing() {
    let env = env().await;
    env.audit.set_failing(true);
    let (status, v) = env
        .post(
            "/v1/issue",
            Some(TEAM_A_KEY),
            &json!({"run": "r1", "credential": "pats"}).to_string(),
        )
        .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (503, Some("AuditUnavailable")),
        "{v}"
    );
    env.audit.set_failing(false);
    let (_, v) = env.get("/v1/leases?run=r1", TEAM_A_KEY).await;
    assert_eq!(v["leases"].as_array().map(Vec::len), Some(0), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reload_good_and_broken() {
    let env = Env::start(EnvOptions {
        policy_poll: Some(Duration::from_millis(50)),
        ..EnvOptions::default()
    })
    .await;
    env.register("r1", "team-a", "Running").await;
    let original = std::fs::read_to_string(env.policy_path()).expect("policy");
    // Broken edit: the old policy keeps serving.
    std::fs::write(
        env.policy_path(),
        original.replace("kind: user-secret", "kind: no-such-provider"),
    )
    .expect("write");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while env.broker.policy().last_error().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "broken policy never noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, v) = env
        .post(
            "/v1/issue",
            Some(TEAM_A_KEY),
            &json!({"run": "r1", "credential": "gh"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "old policy still active: {v}");
    let (_, ready) = env.admin_get("/readyz").await;
    assert!(ready.contains("policy reload failing"), "{ready}");
    let (_, metrics) = env.admin_get("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "paddock_broker_policy_reload_failures_total 1"),
        "the rejected reload is counted: {metrics}"
    );
    // Good edit: the credential is renamed.
    std::fs::write(
        env.policy_path(),
        original.replace("- name: gh\n", "- name: gh2\n"),
    )
    .expect("write");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = env
            .post(
                "/v1/issue",
                Some(TEAM_A_KEY),
                &json!({"run": "r1", "credential": "gh2"}).to_string(),
            )
            .await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new policy never loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = env
        .post(
            "/v1/issue",
            Some(TEAM_A_KEY),
            &json!({"run": "r1", "credential": "gh"}).to_string(),
        )
        .await;
    assert_eq!(status, 403, "removed grant is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_4xx() {
    let env = env().await;
    let (status, v) = env.post("/v1/issue", Some(TEAM_A_KEY), "{not json").await;
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("BadRequest")),
        "{v}"
    );
    let (status, v) = env
        .post(
            "/v1/issue",
            Some(TEAM_A_KEY),
            r#"{"run":"r1","credential":"gh","sneaky":true}"#,
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        v["message"].as_str().is_some_and(|m| m.contains("sneaky")),
        "{v}"
    );
    let big = format!(r#"{{"run":"r1","credential":"{}"}}"#, "a".repeat(70 * 1024));
    let (status, v) = env.post("/v1/issue", Some(TEAM_A_KEY), &big).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (413, Some("PayloadTooLarge")),
        "{v}"
    );
    // Chunked body without a length: the cap still applies while streaming.
    let chunk = "a".repeat(70 * 1024);
    let req = format!(
        "POST /v1/issue HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TEAM_A_KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let (status, _, _) = env.raw(req.as_bytes()).await;
    assert_eq!(status, 413);
    let req = format!(
        "POST /v1/issue HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TEAM_A_KEY}\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    assert_eq!(env.raw(req.as_bytes()).await.0, 415);
    let huge = format!(
        "GET /v1/leases?run=r1 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TEAM_A_KEY}\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(40 * 1024)
    );
    let (status, _, _) = env.raw(huge.as_bytes()).await;
    assert_eq!(status, 431);
    let (status, v) = env.get("/v1/nope", TEAM_A_KEY).await;
    assert_eq!((status, v["code"].as_str()), (404, Some("NotFound")));
    let (status, _) = env.get("/v1/issue", TEAM_A_KEY).await;
    assert_eq!(status, 405);
    let (status, v) = env.get("/v1/leases?run=r1&extra=1", TEAM_A_KEY).await;
    assert_eq!(status, 400, "{v}");
    // Nothing was lost: the broker still works and holds no lease from the bad requests.
    let (_, v) = env.get("/v1/leases?run=r1", TEAM_A_KEY).await;
    assert_eq!(v["leases"].as_array().map(Vec::len), Some(0));
    issue(&env, "r1", "gh").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_required_when_configured() {
    let env = Env::start(EnvOptions {
        require_client_cert: true,
        ..EnvOptions::default()
    })
    .await;
    let req = format!(
        "GET /v1/leases?run=r1 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {CONTROLLER_KEY}\r\nConnection: close\r\n\r\n"
    );
    assert!(
        env.raw_with(req.as_bytes(), false).await.is_err(),
        "no client certificate: handshake refused"
    );
    let (status, _, _) = env
        .raw_with(req.as_bytes(), true)
        .await
        .expect("with certificate");
    assert_eq!(
        status, 404,
        "authenticated and reached the broker (unknown run for the controller)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tls13_is_offered() {
    let env = Env::start(EnvOptions::default()).await;
    assert!(
        !env.tls12_handshake_succeeds().await,
        "TLS 1.2 must be refused"
    );
    let (status, _) = env.get("/v1/leases?run=none", CONTROLLER_KEY).await;
    assert_eq!(status, 404, "TLS 1.3 works");
}
