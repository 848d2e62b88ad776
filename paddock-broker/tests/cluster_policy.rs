//! The policy reflector (cluster mode) against recorded API server answers: kube-rs's client
//! over a mock tower service (no API server runs here). The initial list, an added, a
//! modified and a deleted object, invalid objects (rejected alone, the others stay), the
//! namespace confinement of namespaced policies, and how fast a change becomes the policy.
#![cfg(feature = "kube")]

use std::{sync::Arc, time::Duration};

use http::{Request, Response};
use kube::client::Body;
use paddock_broker::{
    cluster::{
        crd::BrokerPolicy,
        reflector::{self, ClusterPolicyOptions, PolicyTarget},
    },
    policy::{Policy, PolicyStore},
    wire::{RunInfo, RunPhase},
};
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const ADMIN: &str = "paddock-system";

fn options() -> ClusterPolicyOptions {
    ClusterPolicyOptions {
        admin_namespace: ADMIN.into(),
        secrets_dir: "/var/run/paddock/secrets".into(),
    }
}

/// A `BrokerPolicy` in `namespace` granting `credential` (a file secret) and egress to `host`.
fn policy(
    namespace: &str,
    name: &str,
    applies: &[&str],
    credential: &str,
    host: &str,
    rv: &str,
) -> Value {
    json!({
        "apiVersion": "paddock.dev/v1", "kind": "BrokerPolicy",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": rv,
                     "uid": format!("00000000-0000-4000-8000-{:012}", rv.parse::<u64>().unwrap_or(0)),
                     "creationTimestamp": format!("2026-12-06T10:00:{:02}Z", rv.parse::<u64>().unwrap_or(0) % 60)},
        "spec": {
            "appliesTo": {"namespaces": applies},
            "credentials": [{
                "name": credential,
                "provider": {"kind": "user-secret", "inject": {"header": {"name": "Authorization", "prefix": "Bearer "}}},
                "secret": {"file": format!("{credential}.token")},
                "hosts": [host],
            }],
            "egress": [{"hosts": [host], "ports": [443], "substituteAuth": true}],
        },
    })
}

fn list(items: &[Value], rv: &str) -> Response<Body> {
    let body = json!({"apiVersion": "paddock.dev/v1", "kind": "BrokerPolicyList",
        "metadata": {"resourceVersion": rv}, "items": items});
    Response::builder()
        .status(200)
        .body(Body::from(serde_json::to_vec(&body).expect("json")))
        .expect("response")
}

fn event(kind: &str, object: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("json");
    body.push(b'\n');
    Response::builder()
        .status(200)
        .body(Body::from(body))
        .expect("response")
}

async fn next(handle: &mut Handle, watch: bool) -> tower_test::mock::SendResponse<Response<Body>> {
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("the watcher asks")
        .expect("a request");
    let uri = req.uri().to_string();
    assert!(
        uri.starts_with("/apis/paddock.dev/v1/brokerpolicies?"),
        "every namespace's BrokerPolicy objects: {uri}"
    );
    assert_eq!(uri.contains("watch=true"), watch, "{uri}");
    send
}

/// The policy's documents by name, sorted.
fn names(p: &Policy) -> Vec<String> {
    let mut n: Vec<String> = p.documents().iter().map(|d| d.name().to_owned()).collect();
    n.sort();
    n
}

/// Waits until the active policy has exactly `want`; returns how long that took.
async fn until_names(target: &PolicyStore, want: &[&str]) -> Duration {
    let start = std::time::Instant::now();
    loop {
        if names(&target.current()) == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "policy is {:?}, want {want:?}",
            names(&target.current())
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn run(namespace: &str) -> RunInfo {
    RunInfo {
        run: "r1".into(),
        namespace: namespace.into(),
        template: "t".into(),
        phase: RunPhase::Running,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one scripted conversation with the API server; its steps depend on each other"
)]
async fn objects_become_the_policy_and_each_change_applies_within_a_second() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let target = Arc::new(PolicyStore::awaiting_sync());
    assert!(!target.is_synced(), "not ready before the first list");
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(reflector::run(
        kube::Api::<BrokerPolicy>::all(client),
        options(),
        Arc::clone(&target) as Arc<dyn PolicyTarget>,
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
    ));

    // The initial list: one valid object, one that grants to another namespace (rejected).
    let a = policy("team-a", "a", &["team-a"], "a-token", "a.example", "1");
    let sneaky = policy("team-b", "sneaky", &["team-c"], "c-token", "c.example", "2");
    next(&mut handle, false)
        .await
        .send_response(list(&[a.clone(), sneaky], "2"));
    until_names(&target, &["team-a/a"]).await;
    let start = std::time::Instant::now();
    while !target.is_synced() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "never marked in sync"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let p = target.current();
    assert!(
        p.egress(
            &run("team-a"),
            "a.example",
            443,
            time::OffsetDateTime::now_utc()
        )
        .allowed()
    );
    assert!(
        !p.egress(
            &run("team-c"),
            "c.example",
            443,
            time::OffsetDateTime::now_utc()
        )
        .allowed()
    );
    // Secrets of a namespaced policy resolve under its namespace's directory.
    let (_, grant) = p.credentials().next().expect("a credential");
    assert_eq!(
        grant.secret,
        Some(paddock_broker::secrets::SecretSource::File(
            "/var/run/paddock/secrets/team-a/a-token.token".into()
        ))
    );

    // Added.
    let b = policy("team-b", "b", &["team-b"], "b-token", "b.example", "3");
    next(&mut handle, true)
        .await
        .send_response(event("ADDED", &b));
    let took = until_names(&target, &["team-a/a", "team-b/b"]).await;
    assert!(
        took < Duration::from_secs(1),
        "an added policy took {took:?}"
    );

    // Modified: the egress host changes.
    let mut a2 = policy("team-a", "a", &["team-a"], "a-token", "a2.example", "4");
    a2["metadata"]["creationTimestamp"] = a["metadata"]["creationTimestamp"].clone();
    next(&mut handle, true)
        .await
        .send_response(event("MODIFIED", &a2));
    let start = std::time::Instant::now();
    loop {
        let p = target.current();
        if p.egress(
            &run("team-a"),
            "a2.example",
            443,
            time::OffsetDateTime::now_utc(),
        )
        .allowed()
        {
            assert!(
                !p.egress(
                    &run("team-a"),
                    "a.example",
                    443,
                    time::OffsetDateTime::now_utc()
                )
                .allowed()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "a modification took over a second"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // An invalid object (a credential name another policy already has): rejected, the
    // others stay.
    let thief = policy(
        "team-c",
        "thief",
        &["team-c"],
        "a-token",
        "evil.example",
        "5",
    );
    next(&mut handle, true)
        .await
        .send_response(event("ADDED", &thief));
    // A valid one after it shows the invalid one was processed (and dropped).
    let admin = policy(
        ADMIN,
        "shared",
        &["team-a", "team-b"],
        "shared-token",
        "s.example",
        "6",
    );
    next(&mut handle, true)
        .await
        .send_response(event("ADDED", &admin));
    until_names(&target, &["paddock-system/shared", "team-a/a", "team-b/b"]).await;
    assert!(
        !target
            .current()
            .egress(
                &run("team-c"),
                "evil.example",
                443,
                time::OffsetDateTime::now_utc()
            )
            .allowed()
    );

    // A modification that breaks an accepted object drops it (it does not keep its old
    // version): fail closed.
    let mut b_broken = b.clone();
    b_broken["metadata"]["resourceVersion"] = "7".into();
    b_broken["spec"]["egress"][0]["ports"] = json!([]);
    next(&mut handle, true)
        .await
        .send_response(event("MODIFIED", &b_broken));
    until_names(&target, &["paddock-system/shared", "team-a/a"]).await;

    // Deleted. The credential name it held is free again: the policy that was refused for
    // claiming it now stands on its own.
    next(&mut handle, true)
        .await
        .send_response(event("DELETED", &a2));
    let took = until_names(&target, &["paddock-system/shared", "team-c/thief"]).await;
    assert!(took < Duration::from_secs(1), "a deletion took {took:?}");
    assert!(
        !target
            .current()
            .egress(
                &run("team-a"),
                "a2.example",
                443,
                time::OffsetDateTime::now_utc()
            )
            .allowed()
    );

    // An API error leaves the policy as it is.
    next(&mut handle, true).await.send_response(
        Response::builder()
            .status(500)
            .body(Body::from(b"{\"kind\":\"Status\",\"code\":500}".to_vec()))
            .expect("response"),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        names(&target.current()),
        ["paddock-system/shared", "team-c/thief"]
    );
    let _ = stop_tx.send(true);
    task.await.expect("reflector task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_granted_before_the_first_list() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let target = Arc::new(PolicyStore::fixed(Policy::default()));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(reflector::run(
        kube::Api::<BrokerPolicy>::all(client),
        options(),
        Arc::clone(&target) as Arc<dyn PolicyTarget>,
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
    ));
    // The list fails: still nothing.
    next(&mut handle, false).await.send_response(
        Response::builder()
            .status(403)
            .body(Body::from(
                b"{\"kind\":\"Status\",\"code\":403,\"reason\":\"Forbidden\"}".to_vec(),
            ))
            .expect("response"),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(target.current().documents().is_empty());
    let _ = stop_tx.send(true);
    task.await.expect("reflector task");
}

fn object(v: Value) -> BrokerPolicy {
    serde_json::from_value(v).expect("BrokerPolicy")
}

#[test]
fn namespaced_policies_are_confined_to_their_namespace() {
    let now = time::OffsetDateTime::now_utc();
    let opts = options();
    let convert = |v: Value| reflector::convert(&object(v), &opts, now);

    // Another namespace.
    let e = convert(policy(
        "team-a",
        "x",
        &["team-a", "team-b"],
        "t",
        "h.example",
        "1",
    ))
    .expect_err("other namespace");
    assert_eq!(e.field, "spec.appliesTo.namespaces");
    // The broker's environment.
    let mut v = policy("team-a", "x", &["team-a"], "t", "h.example", "1");
    v["spec"]["credentials"][0]["secret"] = json!({"env": "BROKER_TOKEN"});
    assert!(
        convert(v.clone())
            .expect_err("env")
            .message
            .contains("environment")
    );
    // An absolute file (the broker's TLS key, say).
    v["spec"]["credentials"][0]["secret"] = json!({"file": "/etc/paddock/tls/tls.key"});
    assert!(
        convert(v.clone())
            .expect_err("absolute")
            .message
            .contains("absolute")
    );
    // A relative path out of the namespace's directory.
    v["spec"]["credentials"][0]["secret"] = json!({"file": "../team-b/t.token"});
    assert!(
        convert(v.clone())
            .expect_err("dot-dot")
            .message
            .contains("leaves")
    );
    // The same in the admin namespace is the operator's choice, as in a policy file.
    let mut admin = v.clone();
    admin["metadata"]["namespace"] = ADMIN.into();
    admin["spec"]["appliesTo"]["namespaces"] = json!(["team-a", "team-b"]);
    admin["spec"]["credentials"][0]["secret"] = json!({"file": "/etc/paddock/shared.token"});
    convert(admin).expect("the admin namespace may");
    // The ordinary checks apply to objects as to files, naming the field.
    let mut bad = policy("team-a", "x", &["team-a"], "t", "h.example", "1");
    bad["spec"]["credentials"][0]["hosts"] = json!([]);
    let e = convert(bad).expect_err("no hosts");
    assert!(e.field.starts_with("spec.credentials[0]"), "{e}");
    assert!(e.to_string().starts_with("BrokerPolicy/team-a/x"), "{e}");
}

#[test]
fn a_claimed_credential_name_stays_with_the_older_policy() {
    let now = time::OffsetDateTime::now_utc();
    let older = policy("team-a", "a", &["team-a"], "tok", "a.example", "1");
    let newer = policy("team-b", "b", &["team-b"], "tok", "b.example", "2");
    // Order of the list does not matter: creation time decides.
    let (p, rejected) = reflector::build(&[object(newer), object(older)], &options(), now);
    assert_eq!(names(&p), ["team-a/a"]);
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].0, "team-b/b");
}

/// With the broker as the target, a new policy takes back every grant made under the old one
/// (the same invalidation a file reload publishes, which makes proxies re-ask on open
/// connections); an event that changes nothing the policy holds publishes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_policy_invalidates_grants_and_an_unchanged_one_does_not() {
    let broker = Arc::new(paddock_broker::Broker::new(
        paddock_broker::store::Store::open_in_memory().expect("store"),
        Arc::new(PolicyStore::fixed(Policy::default())),
        Arc::new(paddock_broker::audit::MemorySink::default()),
        paddock_broker::ratelimit::RateLimits::new(
            &paddock_broker::ratelimit::RateLimitConfig::default(),
        )
        .expect("limits"),
    ));
    let seq = || *broker.grants().changes().borrow();
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(reflector::run(
        kube::Api::<BrokerPolicy>::all(client),
        options(),
        Arc::clone(&broker) as Arc<dyn PolicyTarget>,
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
    ));
    let before = seq();
    let a = policy("team-a", "a", &["team-a"], "a-token", "a.example", "1");
    next(&mut handle, false)
        .await
        .send_response(list(std::slice::from_ref(&a), "1"));
    let start = std::time::Instant::now();
    while seq() == before {
        assert!(start.elapsed() < Duration::from_secs(1), "no invalidation");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(broker.policy().current().documents().len(), 1);
    let after_load = seq();
    // A new resourceVersion with the same spec (a label added, say): nothing to take back.
    let mut relabelled = a.clone();
    relabelled["metadata"]["resourceVersion"] = "2".into();
    relabelled["metadata"]["labels"] = json!({"team": "a"});
    next(&mut handle, true)
        .await
        .send_response(event("MODIFIED", &relabelled));
    // The next watch request shows the event was processed.
    let again = next(&mut handle, true).await;
    assert_eq!(seq(), after_load, "an unchanged policy invalidated grants");
    // A real change does.
    again.send_response(event(
        "MODIFIED",
        &policy("team-a", "a", &["team-a"], "a-token", "a3.example", "3"),
    ));
    let start = std::time::Instant::now();
    while seq() == after_load {
        assert!(start.elapsed() < Duration::from_secs(1), "no invalidation");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = stop_tx.send(true);
    task.await.expect("reflector task");
}
