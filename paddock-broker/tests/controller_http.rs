//! The controller's broker client (`HttpBroker`) against a real broker over loopback TLS:
//! the calls the controller makes, and a refusal told apart from an outage.
#![cfg(feature = "kube")]

mod common;

use std::sync::Arc;

use common::{CONTROLLER_KEY, Env, EnvOptions, TEAM_A_KEY};
use paddock_broker::{
    cluster::controller::broker_api::{BrokerCallError, HttpBroker, RunBroker},
    wire::{ErrorCode, IssueRequest, RunPhase, RunUpsertRequest},
};

fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("ascii"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_client_registers_issues_lists_and_revokes() {
    let env = Env::start(EnvOptions::default()).await;
    let addr = env.handle.as_ref().expect("running").addr;
    let ca = env.dir.path().join("broker-ca.crt");
    std::fs::write(&ca, pem(env.pki.ca_der.as_ref())).expect("ca");
    let token = env.dir.path().join("token");
    std::fs::write(&token, format!("{CONTROLLER_KEY}\n")).expect("token");
    let url = format!("https://localhost:{}", addr.port());
    let client: Arc<dyn RunBroker> =
        Arc::new(HttpBroker::new(&url, &token, Some(&ca)).expect("client"));

    let c = Arc::clone(&client);
    let outcome = tokio::task::spawn_blocking(move || {
        let info = c.upsert_run(&RunUpsertRequest {
            run: "uid-1".into(),
            namespace: "team-a".into(),
            template: "t".into(),
            phase: RunPhase::Running,
        })?;
        assert_eq!(info.namespace, "team-a");
        let issued = c.issue(&IssueRequest {
            run: "uid-1".into(),
            credential: "gh".into(),
        })?;
        assert!(issued.value.starts_with("pdk-"));
        let leases = c.leases("uid-1")?;
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].lease_id, issued.lease_id);
        c.revoke(&issued.lease_id)?;
        let leases = c.leases("uid-1")?;
        assert!(leases[0].revoked);
        // Policy refuses: a refusal, not an outage (the controller reports it and backs off).
        let refused = c
            .issue(&IssueRequest {
                run: "uid-1".into(),
                credential: "not-granted".into(),
            })
            .expect_err("refused");
        Ok::<_, BrokerCallError>(refused)
    })
    .await
    .expect("join")
    .expect("calls");
    assert!(
        matches!(
            outcome,
            BrokerCallError::Refused {
                code: ErrorCode::Forbidden,
                ..
            }
        ),
        "{outcome}"
    );

    // A bearer without the controller scope cannot register runs.
    std::fs::write(&token, TEAM_A_KEY).expect("token");
    let c = Arc::clone(&client);
    let e = tokio::task::spawn_blocking(move || {
        c.upsert_run(&RunUpsertRequest {
            run: "uid-2".into(),
            namespace: "team-a".into(),
            template: "t".into(),
            phase: RunPhase::Pending,
        })
    })
    .await
    .expect("join")
    .expect_err("no controller scope");
    assert!(matches!(e, BrokerCallError::Refused { .. }), "{e}");

    // No broker there: an outage, retried later.
    let gone = HttpBroker::new("https://localhost:1", &token, Some(&ca)).expect("client");
    let e = tokio::task::spawn_blocking(move || gone.leases("uid-1"))
        .await
        .expect("join")
        .expect_err("nothing listens");
    assert!(matches!(e, BrokerCallError::Unavailable(_)), "{e}");
    // Plain http only to loopback.
    assert!(HttpBroker::new("http://broker.example:8080", &token, None).is_err());
}
