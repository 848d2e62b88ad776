//! The `paddock-broker` binary: key management, policy checks, and a served broker that is
//! killed and restarted on the same database.

mod common;

use std::{
    io::Write,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Stdio},
};

use common::{
    CONTROLLER_KEY, TEAM_A_KEY, keys_text, policy_yaml, post_request, serve, tls_json,
    write_broker_files,
};
use paddock_broker::auth::{
    Authenticator, StaticKeys, rsa_session::encrypt_run_token, static_keys::StaticKeyDefaults,
};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_paddock-broker");

#[test]
fn keys_hash_and_add() {
    let mut child = Command::new(BIN)
        .args(["keys", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"my-key\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        paddock_broker::auth::static_keys::hash_key("my-key")
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("keys");
    let out = Command::new(BIN)
        .args(["keys", "add", "--file"])
        .arg(&file)
        .args([
            "--id",
            "proxy",
            "--namespace",
            "team-a",
            "--scope",
            "broker:substitute-auth",
            "--scope",
            "broker:validate-egress",
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stored = std::fs::read_to_string(&file).expect("keys file");
    assert!(!stored.contains(&key), "only the hash is stored");
    let keys = StaticKeys::load(&file, StaticKeyDefaults::default()).expect("parse");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let id = rt
        .block_on(keys.authenticate(&key))
        .expect("new key authenticates");
    assert_eq!(
        (id.subject.as_str(), id.namespace.as_str()),
        ("proxy", "team-a")
    );
    let again = Command::new(BIN)
        .args(["keys", "add", "--file"])
        .arg(&file)
        .args([
            "--id",
            "proxy",
            "--namespace",
            "x",
            "--scope",
            "broker:issue",
        ])
        .output()
        .expect("run");
    assert!(!again.status.success(), "duplicate id refused");
}

#[test]
fn policy_check_reports_file_line_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, policy_yaml(dir.path())).expect("write");
    let out = Command::new(BIN)
        .args(["policy", "check"])
        .arg(&good)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        policy_yaml(dir.path()).replace(
            "      ports: [443]\n",
            "      ports: [443]\n      portz: [80]\n",
        ),
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["policy", "check"])
        .arg(&good)
        .arg(&bad)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("bad.yaml:27:")
            && stdout.contains("spec.egress[0]")
            && stdout.contains("portz"),
        "{stdout}"
    );
}

fn session_key_public(config: &Path) -> String {
    let out = Command::new(BIN)
        .args(["session-key", "public", "--config"])
        .arg(config)
        .output()
        .expect("session-key public");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("PEM is UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one linear kill-and-restart scenario"
)]
async fn killed_and_restarted_process_keeps_pool_reservations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = write_broker_files(d);
    let config = d.join("broker.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\ntls: {{cert: {d}/cert.pem, key: {d}/key.pem}}\ndatabase: {d}/broker.db\npolicy: {d}/policy.yaml\naudit: {{path: {d}/audit.jsonl}}\nauth:\n  staticKeys: {{file: {d}/keys}}\n  rsaSession: {{keyFile: {d}/session.pem, keyBits: 2048, scopes: [broker:validate-egress, broker:leases:read]}}\n",
            d = d.display()
        ),
    )
    .expect("config");
    // The run side's public key, before the broker ever ran: the keypair is created here and
    // reused by every later process.
    let session_public = session_key_public(&config);
    assert!(session_public.starts_with("-----BEGIN PUBLIC KEY-----"));
    let mode = std::fs::metadata(d.join("session.pem"))
        .expect("session key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let r1_token = encrypt_run_token(&session_public, "r1").expect("run token");
    let r1_leases = format!(
        "GET /v1/leases?run=r1 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {r1_token}\r\nConnection: close\r\n\r\n"
    );
    let r2_leases = r1_leases.replace("run=r1", "run=r2");

    let first = {
        let served = serve(&config);
        for run in ["r1", "r2", "r3"] {
            let body =
                json!({"run": run, "namespace": "team-a", "template": "t", "phase": "Running"})
                    .to_string();
            let (status, v) = tls_json(
                served.addr,
                &ca,
                &post_request("/v1/runs", CONTROLLER_KEY, &body),
            )
            .await;
            assert_eq!(status, 200, "{v}");
        }
        let (status, v) = tls_json(
            served.addr,
            &ca,
            &post_request(
                "/v1/issue",
                TEAM_A_KEY,
                r#"{"run":"r1","credential":"pats"}"#,
            ),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let (status, leases) = tls_json(served.addr, &ca, &r1_leases).await;
        assert_eq!(status, 200, "RSA session token before restart: {leases}");
        v["value"].as_str().expect("bearer").to_owned()
        // Dropping `served` kills the process (SIGKILL): no graceful shutdown.
    };

    let served = serve(&config);
    // The same keypair after a restart: the run's token still authenticates, bound to its run.
    assert_eq!(session_key_public(&config), session_public);
    let (status, v) = tls_json(served.addr, &ca, &r1_leases).await;
    assert_eq!(status, 200, "RSA session token after restart: {v}");
    let (status, v) = tls_json(served.addr, &ca, &r2_leases).await;
    assert_eq!(status, 403, "run-bound token on another run: {v}");
    let (status, v) = tls_json(
        served.addr,
        &ca,
        &post_request(
            "/v1/issue",
            TEAM_A_KEY,
            r#"{"run":"r2","credential":"pats"}"#,
        ),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let second = v["value"].as_str().expect("bearer").to_owned();
    let (status, v) = tls_json(
        served.addr,
        &ca,
        &post_request(
            "/v1/issue",
            TEAM_A_KEY,
            r#"{"run":"r3","credential":"pats"}"#,
        ),
    )
    .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (503, Some("PoolExhausted")),
        "{v}"
    );
    let substitute = |run: &str, bearer: &str| {
        json!({"run": run, "host": "api.gitlab.com", "port": 443, "transport": "tls", "method": "GET", "path": "/",
               "headers": [{"name": "Authorization", "value": format!("Bearer {bearer}")}]})
        .to_string()
    };
    let (s1, v1) = tls_json(
        served.addr,
        &ca,
        &post_request("/v1/substitute-auth", TEAM_A_KEY, &substitute("r1", &first)),
    )
    .await;
    let (s2, v2) = tls_json(
        served.addr,
        &ca,
        &post_request(
            "/v1/substitute-auth",
            TEAM_A_KEY,
            &substitute("r2", &second),
        ),
    )
    .await;
    assert_eq!((s1, s2), (200, 200), "{v1} {v2}");
    assert_ne!(
        v1["set_headers"][0]["value"], v2["set_headers"][0]["value"],
        "no PAT leased twice"
    );

    // SIGHUP reloads the keys file; a broken file keeps the previous keys.
    let leases = "GET /v1/leases?run=r1 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer rotated-key-1\r\nConnection: close\r\n\r\n";
    assert_eq!(tls_json(served.addr, &ca, leases).await.0, 401);
    let rotated = format!(
        "{}\nrot:{}:team-a:broker:leases:read\n",
        keys_text(),
        paddock_broker::auth::static_keys::hash_key("rotated-key-1")
    );
    std::fs::write(d.join("keys"), rotated).expect("keys");
    served.hangup();
    served.wait_log("static keys reloaded");
    assert_eq!(tls_json(served.addr, &ca, leases).await.0, 200);
    std::fs::write(d.join("keys"), "this is not a keys file\n").expect("keys");
    served.hangup();
    served.wait_log("static keys reload rejected");
    assert_eq!(
        tls_json(served.addr, &ca, leases).await.0,
        200,
        "previous keys stay active"
    );
    drop(served);

    let out = Command::new(BIN)
        .args(["leases", "list", "--config"])
        .arg(&config)
        .output()
        .expect("leases list");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        listing.lines().filter(|l| l.contains("pats")).count(),
        2,
        "{listing}"
    );
    assert!(!listing.contains(&first) && !listing.contains(&second));
    let audit = std::fs::read_to_string(d.join("audit.jsonl")).expect("audit");
    assert!(
        audit.contains("credential-issued")
            && !audit.contains(&first)
            && !audit.contains("pat-one")
    );
}

#[test]
fn session_key_needs_the_rsa_backend_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("broker.yaml");
    std::fs::write(
        &config,
        "listen: 127.0.0.1:0\ntls: {cert: c, key: k}\ndatabase: db\npolicy: p\naudit: {path: a}\nauth:\n  staticKeys: {file: keys}\n",
    )
    .expect("config");
    let out = Command::new(BIN)
        .args(["session-key", "public", "--config"])
        .arg(&config)
        .output()
        .expect("session-key public");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.rsaSession is not configured"), "{err}");
    assert!(out.stdout.is_empty());
}

/// `store check` refuses a database that is missing or behind; `store migrate` brings it up
/// to date, after which `check` passes. On `SQLite`, and on `PostgreSQL` when the test server is
/// there.
#[test]
fn store_migrate_and_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let store = |args: &[&str], config: &Path| {
        Command::new(BIN)
            .arg("store")
            .args(args)
            .arg("--config")
            .arg(config)
            .output()
            .expect("paddock-broker store")
    };
    let base = "listen: 127.0.0.1:0\ntls: {cert: c, key: k}\npolicy: p\naudit: {path: a}\n\
                auth: {staticKeys: {file: keys}}\n";
    let sqlite = d.join("sqlite.yaml");
    std::fs::write(
        &sqlite,
        format!("{base}database: {}\n", d.join("b.db").display()),
    )
    .expect("config");
    let mut configs = vec![sqlite];
    let pg_db = paddock_broker::store::testing::scratch_database("cli_store");
    if let Some(db) = &pg_db {
        std::fs::write(d.join("url"), db.url()).expect("url");
        let pg = d.join("pg.yaml");
        std::fs::write(
            &pg,
            format!(
                "{base}store: {{postgres: {{urlFile: {}}}}}\n",
                d.join("url").display()
            ),
        )
        .expect("config");
        configs.push(pg);
    }
    for config in &configs {
        let out = store(&["check"], config);
        assert!(
            !out.status.success(),
            "{}: a missing or empty database fails the check",
            config.display()
        );
        let out = store(&["migrate"], config);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let version = format!("schema version {}", paddock_broker::store::SCHEMA_VERSION);
        assert!(String::from_utf8_lossy(&out.stdout).contains(&version));
        let out = store(&["check"], config);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("reachable, {version}")));
    }
}

fn bin(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("paddock-broker")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `policy test` answers like the broker would, names the grant, and its exit status says
/// allowed (0), denied (1) or could not answer (2).
#[test]
fn policy_test_explains_and_exits_by_the_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_broker_files(d);
    let policy = d.join("policy.yaml").display().to_string();
    let ask = |run: &str, req: &str, json: bool| {
        let mut args = vec!["policy", "test", "--policy", &policy, "--run", run, req];
        if json {
            args.extend(["--output", "json"]);
        }
        bin(&args)
    };
    let out = ask("team-a/r1", "GET https://api.github.com/user", false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("ALLOWED: allowed by policy team-a"), "{t}");
    assert!(t.contains("credential gh (user-secret"), "{t}");
    assert!(!t.contains("ghp_real"), "a secret in the answer: {t}");

    let out = ask("team-a/r1", "POST https://evil.example/x", false);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("DENIED: egress to evil.example:443"));

    let out = ask("team-a/r1", "GET http://api.github.com/", true);
    assert_eq!(out.status.code(), Some(1), "port 80 is not granted");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["decision"], "denied");

    let out = ask("team-a/r1", "https://github.com/org/repo.git", true);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["credentials"][0]["credential"], "git", "{v}");
    assert_eq!(v["matched"][0]["substitute_auth"], true, "{v}");

    let out = ask("team-b/r1", "GET https://api.github.com/", false);
    assert_eq!(out.status.code(), Some(1), "another namespace");
    let out = ask("team-a", "GET https://api.github.com/", false);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("NAMESPACE/RUN"), "{}", text(&out));
}

/// `policy suggest` turns the broker's own denial records into a policy that, once loaded,
/// allows exactly what was denied.
#[test]
fn policy_suggest_turns_denials_into_a_policy_that_allows_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let audit = d.join("audit.jsonl");
    std::fs::write(
        &audit,
        concat!(
            r#"{"ts":"t","event":"egress-denied","caller":"p","namespace":"team-a","run":"r1","host":"pypi.org","port":443}"#,
            "\n",
            r#"{"ts":"t","event":"egress-denied","caller":"p","namespace":"team-a","run":"r2","host":"pypi.org","port":443}"#,
            "\n",
            r#"{"ts":"t","event":"egress-discovery","caller":"p","namespace":"team-a","run":"r1","host":"files.pythonhosted.org","port":443,"policy":"x"}"#,
            "\n"
        ),
    )
    .expect("audit");
    let out = bin(&["policy", "suggest", "--from", &audit.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let snippet = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        snippet.contains("pypi.org   # 2 denied, 0 via discovery; runs: r1, r2"),
        "{snippet}"
    );
    let file = d.join("suggested.yaml");
    std::fs::write(&file, &snippet).expect("write");
    let out = bin(&["policy", "check", &file.display().to_string()]);
    assert!(
        out.status.success(),
        "the suggestion is a valid policy: {}",
        text(&out)
    );
    let out = bin(&[
        "policy",
        "test",
        "--policy",
        &file.display().to_string(),
        "--run",
        "team-a/r9",
        "https://files.pythonhosted.org/packages/x",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let out = bin(&["policy", "suggest", "--from", "/nonexistent/audit.jsonl"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("/nonexistent/audit.jsonl"),
        "{}",
        text(&out)
    );
}

/// `check --config` validates everything the config names without creating anything.
#[test]
fn check_validates_a_config_without_side_effects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_broker_files(d);
    let config = d.join("broker.yaml");
    let write = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:0\ntls: {{cert: {d}/cert.pem, key: {d}/key.pem}}\ndatabase: {d}/broker.db\npolicy: {d}/policy.yaml\naudit: {{path: {d}/audit.jsonl}}\nauth:\n  staticKeys: {{file: {d}/keys}}\n{extra}",
                d = d.display()
            ),
        )
        .expect("config");
    };
    write(
        "  rsaSession: {keyFile: SESSION, keyBits: 2048, scopes: [broker:validate-egress]}\n"
            .replace("SESSION", &d.join("session.pem").display().to_string())
            .as_str(),
    );
    let out = bin(&["check", "--config", &config.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("policy: ") && t.contains("valid (1 documents)"),
        "{t}"
    );
    assert!(t.contains("does not exist yet (serve creates it)"), "{t}");
    assert!(t.contains("auth: static-keys"), "{t}");
    for created in ["broker.db", "audit.jsonl", "session.pem"] {
        assert!(!d.join(created).exists(), "check created {created}");
    }

    // A broken policy, a missing certificate: non-zero, and the message names the file.
    std::fs::write(
        d.join("policy.yaml"),
        "apiVersion: paddock.dev/v1\nkind: Nope\n",
    )
    .expect("w");
    let out = bin(&["check", "--config", &config.display().to_string()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("policy.yaml"), "{}", text(&out));
    write_broker_files(d);
    std::fs::remove_file(d.join("cert.pem")).expect("rm");
    let out = bin(&["check", "--config", &config.display().to_string()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("cert.pem"), "{}", text(&out));
}

/// Completions for bash and zsh and man pages come from the same clap definitions.
#[test]
fn completions_and_man_pages_are_generated() {
    for shell in ["bash", "zsh"] {
        let out = bin(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["paddock-broker", "suggest", "leases", "--output"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bin(&["man", "--out", &dir.path().display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let page = std::fs::read_to_string(dir.path().join("paddock-broker.1")).expect("main page");
    assert!(page.contains(".TH paddock-broker"), "{page}");
    assert!(dir.path().join("paddock-broker-policy-test.1").exists());
}

/// `leases list --output json` prints the API's `LeasesResponse`.
#[test]
fn leases_list_prints_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("b.db");
    {
        let store = paddock_broker::store::Store::open(&db).expect("store");
        store
            .upsert_run(
                &paddock_broker::wire::RunInfo {
                    run: "r1".into(),
                    namespace: "team-a".into(),
                    template: "t".into(),
                    phase: paddock_broker::wire::RunPhase::Running,
                },
                1,
            )
            .expect("run");
        store
            .insert_lease(
                &paddock_broker::store::NewLease {
                    lease_id: "lease-1".into(),
                    run: "r1".into(),
                    namespace: "team-a".into(),
                    credential: "gh".into(),
                    provider: "user-secret".into(),
                    delivery: paddock_broker::wire::DeliveryMode::ProxyInjected,
                    bearer_hash: Some([7; 32]),
                    hosts: vec!["api.github.com".into()],
                    issued_at: 10,
                    expires_at: 4_000_000_000,
                },
                None,
                10,
            )
            .expect("lease");
    }
    let out = bin(&[
        "leases",
        "list",
        "--database",
        &db.display().to_string(),
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["leases"][0]["lease_id"], "lease-1", "{v}");
    assert_eq!(v["leases"][0]["credential"], "gh");
    assert_eq!(v["leases"][0]["revoked"], false);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("0707"),
        "no bearer hash"
    );
}

/// `ca list|revoke|unblock|crl` on the broker's database: what an operator runs when a node
/// key leaks or a node is compromised.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one operator session, step by step: revoke, bar, list, CRL, unblock"
)]
fn ca_revoke_lists_bars_and_writes_the_crl() {
    use paddock_broker::store::{NodeCaRecord, Store};
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let root = d.join("root");
    let out = bin(&["ca", "init", "--out", &root.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let config = d.join("broker.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\ntls: {{cert: c, key: k}}\npolicy: p\naudit: {{path: a}}\n\
             auth: {{staticKeys: {{file: keys}}}}\ndatabase: {}\n\
             nodeCa: {{certFile: {}, keyFile: {}}}\n",
            d.join("b.db").display(),
            root.join("ca.crt").display(),
            root.join("ca.key").display()
        ),
    )
    .expect("config");
    let cfg = config.display().to_string();
    {
        let store = Store::open(&d.join("b.db")).expect("store");
        for (serial, node) in [("4a01", "node-a"), ("4a02", "node-a"), ("4b01", "node-b")] {
            store
                .record_node_ca(&NodeCaRecord {
                    serial: serial.into(),
                    node: node.into(),
                    not_before: 1,
                    not_after: 4_000_000_000,
                    revoked_at: None,
                    reason: None,
                })
                .expect("record");
        }
    }
    let crl_serials = |path: &Path| -> Vec<String> {
        let pem = std::fs::read(path).expect("crl file");
        let (_, block) = x509_parser::pem::parse_x509_pem(&pem).expect("PEM");
        assert_eq!(block.label, "X509 CRL");
        let (_, crl) = x509_parser::parse_x509_crl(&block.contents).expect("CRL");
        let mut serials: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| hex::encode(r.raw_serial()))
            .collect();
        serials.sort();
        serials
    };
    let crl = d.join("crl.pem");
    let crl_arg = crl.display().to_string();
    let out = bin(&["ca", "crl", "--config", &cfg, "--out", &crl_arg]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(crl_serials(&crl).is_empty());

    let out = bin(&[
        "ca",
        "revoke",
        "--config",
        &cfg,
        "--serial",
        "4B:01",
        "--reason",
        "key copied",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("revoked intermediate 4b01"),
        "{}",
        text(&out)
    );
    let out = bin(&[
        "ca", "revoke", "--config", &cfg, "--serial", "4b01", "--reason", "again",
    ]);
    assert!(
        out.status.success() && text(&out).contains("already revoked"),
        "{}",
        text(&out)
    );
    let out = bin(&[
        "ca", "revoke", "--config", &cfg, "--serial", "ffff", "--reason", "x",
    ]);
    assert!(!out.status.success(), "an unknown serial is an error");
    assert!(
        text(&out).contains("no intermediate with serial ffff"),
        "{}",
        text(&out)
    );
    for bad in [
        vec!["ca", "revoke", "--config", &cfg, "--reason", "x"],
        vec![
            "ca", "revoke", "--config", &cfg, "--serial", "zz", "--reason", "x",
        ],
        vec![
            "ca",
            "revoke",
            "--config",
            &cfg,
            "--node",
            "Not_A_Node",
            "--reason",
            "x",
        ],
        vec![
            "ca", "revoke", "--config", &cfg, "--node", "node-a", "--reason", " ",
        ],
    ] {
        let out = bin(&bad);
        assert!(!out.status.success(), "{bad:?} must fail: {}", text(&out));
    }

    let out = bin(&[
        "ca",
        "revoke",
        "--config",
        &cfg,
        "--node",
        "node-a",
        "--reason",
        "compromised",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("revoked 2 live one(s)"),
        "{}",
        text(&out)
    );
    let out = bin(&["ca", "crl", "--config", &cfg, "--out", &crl_arg]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(crl_serials(&crl), ["4a01", "4a02", "4b01"]);

    let out = bin(&["ca", "list", "--config", &cfg, "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["intermediates"].as_array().map(Vec::len), Some(3), "{v}");
    assert_eq!(v["intermediates"][0]["reason"], "compromised", "{v}");
    assert_eq!(v["barredNodes"][0]["node"], "node-a", "{v}");

    let out = bin(&["ca", "unblock", "--config", &cfg, "--node", "node-a"]);
    assert!(
        out.status.success() && text(&out).contains("may get intermediates again"),
        "{}",
        text(&out)
    );
    let out = bin(&["ca", "list", "--config", &cfg, "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["barredNodes"], serde_json::json!([]), "{v}");
}
