//! The embedded broker over its in-process link: the same answers as a served broker, and
//! nothing on disk but its audit log.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::*;

fn policy_yaml(secret: &Path) -> String {
    format!(
        "\
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata:
  name: embed
spec:
  appliesTo:
    namespaces: [team-a]
  credentials:
    - name: gh
      provider: {{kind: user-secret, inject: {{header: {{name: Authorization, prefix: \"Bearer \"}}}}}}
      secret: {{file: {}}}
      hosts: [api.github.com]
  egress:
    - hosts: [api.github.com]
      ports: [443]
      substituteAuth: true
",
        secret.display()
    )
}

/// One JSON POST over a fresh in-process connection; `bearer` `None` sends none.
async fn post(link: &LocalLink, bearer: Option<&str>, path: &str, body: &Value) -> (u16, Value) {
    let io = link.connect().expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = http::Request::post(path)
        .header(http::header::HOST, "paddock-broker.local")
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(b) = bearer {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {b}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = send.send_request(req).await.expect("answer");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_substitutes_and_writes_only_its_audit_log() {
    let secrets = tempfile::tempdir().expect("tempdir");
    let secret = secrets.path().join("gh");
    std::fs::write(&secret, "ghp_embedded_real").expect("secret");
    let policy_file = secrets.path().join("policy.yaml");
    std::fs::write(&policy_file, policy_yaml(&secret)).expect("policy");
    let state = tempfile::tempdir().expect("state");
    let config = EmbedConfig::new(
        PolicySource::Files {
            path: policy_file,
            secrets_dir: None,
            poll: Some(Duration::from_millis(50)),
        },
        state.path().join("broker-audit.jsonl"),
        CallerConfig::run_controller("paddock-run", "team-a"),
    );
    let broker = EmbeddedBroker::start(config).expect("start");
    let client = broker.client();
    let (link, bearer) = (client.link(), client.bearer().expose());
    assert!(
        !format!("{client:?}").contains(bearer),
        "Debug must not show the caller key"
    );

    let (status, v) = post(
        link,
        Some(bearer),
        "/v1/runs",
        &json!({"run": "r1", "namespace": "team-a", "template": "t", "phase": "Running"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = post(
        link,
        Some(bearer),
        "/v1/issue",
        &json!({"run": "r1", "credential": "gh"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let placeholder = v["value"].as_str().expect("placeholder").to_owned();
    assert!(placeholder.starts_with("pdk-"), "{placeholder}");
    let (status, v) = post(
        link,
        Some(bearer),
        "/v1/substitute-auth",
        &json!({"run": "r1", "host": "api.github.com", "port": 443, "transport": "tls",
                "method": "GET", "path": "/user",
                "headers": [{"name": "Authorization", "value": format!("Bearer {placeholder}")}]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["set_headers"][0]["value"], "Bearer ghp_embedded_real");

    // Authentication still applies in-process: no key, or another key, is refused.
    let (status, _) = post(
        link,
        None,
        "/v1/validate-egress",
        &json!({"run": "r1", "host": "api.github.com", "port": 443}),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = post(
        link,
        Some("not-the-key"),
        "/v1/validate-egress",
        &json!({"run": "r1", "host": "api.github.com", "port": 443}),
    )
    .await;
    assert_eq!(status, 401);

    // No config, keys, certificates or database: the audit log is the one file.
    assert_eq!(files_under(state.path()), vec!["broker-audit.jsonl"]);
    let audit = std::fs::read_to_string(state.path().join("broker-audit.jsonl")).expect("audit");
    assert!(audit.contains("paddock-run"), "{audit}");
    assert!(!audit.contains(bearer) && !audit.contains("ghp_embedded_real"));

    broker.shutdown().await;
    assert!(client.link().connect().is_err(), "closed after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_policy_files_reload_and_fixed_policies_do_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("gh");
    std::fs::write(&secret, "ghp_real").expect("secret");
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(&policy_file, policy_yaml(&secret)).expect("policy");
    let start = |policy| {
        EmbeddedBroker::start(EmbedConfig::new(
            policy,
            dir.path()
                .join(format!("audit-{}.jsonl", rand::random::<u32>())),
            CallerConfig::run_controller("paddock-run", "team-a"),
        ))
        .expect("start")
    };
    let fixed = start(PolicySource::Fixed(
        Policy::load(&policy_file, time::OffsetDateTime::now_utc()).expect("policy"),
    ));
    let files = start(PolicySource::Files {
        path: policy_file.clone(),
        secrets_dir: None,
        poll: Some(Duration::from_millis(20)),
    });
    let allowed = |b: &EmbeddedBroker| {
        let client = b.client();
        async move {
            let key = client.bearer().expose().to_owned();
            let (status, v) = post(
                client.link(),
                Some(&key),
                "/v1/runs",
                &json!({"run": "r1", "namespace": "team-a", "template": "t", "phase": "Running"}),
            )
            .await;
            assert_eq!(status, 200, "{v}");
            let (status, v) = post(
                client.link(),
                Some(&key),
                "/v1/validate-egress",
                &json!({"run": "r1", "host": "pypi.org", "port": 443}),
            )
            .await;
            assert_eq!(status, 200, "{v}");
            v["allowed"].as_bool().expect("allowed")
        }
    };
    assert!(!allowed(&fixed).await && !allowed(&files).await);
    let widened = policy_yaml(&secret).replace(
        "[api.github.com]\n      ports",
        "[api.github.com, pypi.org]\n      ports",
    );
    assert_ne!(widened, policy_yaml(&secret));
    // A different length, so the change is seen even within the file system's mtime step.
    std::fs::write(&policy_file, widened).expect("rewrite");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !allowed(&files).await {
        assert!(tokio::time::Instant::now() < deadline, "reload not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!allowed(&fixed).await, "a fixed policy never reloads");
    fixed.shutdown().await;
    files.shutdown().await;
}
