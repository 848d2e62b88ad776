//! The cluster audit sink (`audit.kubernetes`) against recorded API server answers (kube-rs's
//! client over a mock tower service: no API server runs here), behind a real broker.
//!
//! The stand-in answers the two requests the sink makes: the metadata list of `HarnessRun`
//! objects in a namespace (to find a record's owner) and the create of an `AuditEvent`, with
//! a behaviour per test (created, an error `Status`, no answer, an answer held until the test
//! releases it). Every create is recorded with its body.
#![cfg(feature = "kube")]

use std::{
    collections::BTreeSet,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use http::{Request, Response};
use kube::client::Body;
use paddock_broker::{
    Broker,
    audit::{AuditEvent as Record, AuditKind, AuditSink, JsonlSink, TeeSink},
    auth::{Identity, Scope},
    cluster::audit::{self, KubeAuditSink, Settings},
    metrics::Metrics,
    policy::{Policy, PolicyStore},
    ratelimit::{RateLimitConfig, RateLimits},
    store::Store,
    wire::{ErrorCode, IssueRequest, RunInfo, RunPhase, RunUpsertRequest},
};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

const NS: &str = "team";
const RUN: &str = "fix-bug";
const UID: &str = "6b1d0c2a-1111-4222-8333-000000000001";
const EVENTS_PATH: &str = "/apis/paddock.dev/v1/namespaces/team/auditevents";
const RUNS_PATH: &str = "/apis/paddock.dev/v1/namespaces/team/harnessruns";

/// How the stand-in answers an `AuditEvent` create.
#[derive(Clone, Copy)]
enum OnCreate {
    Created,
    /// An error `Status` with this code.
    Fail(u16),
    /// No answer at all (the API server hangs).
    Hang,
    /// Created, after the test adds a permit to the gate.
    Gated,
    /// Created after a delay.
    Slow(Duration),
}

struct MockApi {
    on_create: OnCreate,
    /// Bodies of the creates, with their path.
    creates: Mutex<Vec<(String, Value)>>,
    lists: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    gate: Semaphore,
}

fn status(code: u16) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": format!("stand-in {code}"), "reason": "StandIn", "code": code})
}

impl MockApi {
    fn new(on_create: OnCreate) -> Arc<Self> {
        Arc::new(Self {
            on_create,
            creates: Mutex::new(Vec::new()),
            lists: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            gate: Semaphore::new(0),
        })
    }

    fn creates(&self) -> Vec<(String, Value)> {
        self.creates.lock().expect("creates").clone()
    }

    fn client(self: &Arc<Self>) -> kube::Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let me = Arc::clone(self);
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let me = Arc::clone(&me);
                // One task per request, so creates overlap as they would on a real server.
                tokio::spawn(async move {
                    let (parts, body) = req.into_parts();
                    let bytes = http_body_util::BodyExt::collect(body)
                        .await
                        .map(http_body_util::Collected::to_bytes)
                        .unwrap_or_default();
                    let (code, value) = me
                        .answer(parts.method.as_str(), parts.uri.path(), &bytes)
                        .await;
                    send.send_response(
                        Response::builder()
                            .status(code)
                            .header("content-type", "application/json")
                            .body(Body::from(serde_json::to_vec(&value).expect("json")))
                            .expect("response"),
                    );
                });
            }
        });
        kube::Client::new(service, "default")
    }

    async fn answer(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        if method == "GET" && path == RUNS_PATH {
            self.lists.fetch_add(1, Ordering::SeqCst);
            return (
                200,
                json!({
                    "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                    "metadata": {"resourceVersion": "7"},
                    "items": [{
                        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                        "metadata": {"name": RUN, "namespace": NS, "uid": UID},
                    }],
                }),
            );
        }
        if method != "POST" || !path.ends_with("/auditevents") {
            return (404, status(404));
        }
        let mut object: Value = serde_json::from_slice(body).expect("create body is JSON");
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let answer = match self.on_create {
            OnCreate::Created => None,
            OnCreate::Fail(code) => Some((code, status(code))),
            OnCreate::Hang => {
                std::future::pending::<()>().await;
                None
            }
            OnCreate::Gated => {
                self.gate.acquire().await.expect("gate").forget();
                None
            }
            OnCreate::Slow(d) => {
                tokio::time::sleep(d).await;
                None
            }
        };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.creates
            .lock()
            .expect("creates")
            .push((path.to_owned(), object.clone()));
        answer.unwrap_or_else(|| {
            let prefix = object["metadata"]["generateName"]
                .as_str()
                .unwrap_or("x-")
                .to_owned();
            let n = self.creates.lock().expect("creates").len();
            object["metadata"]["name"] = format!("{prefix}{n:05}").into();
            (201, object)
        })
    }
}

fn settings(queue: usize, max_concurrent: usize, timeout: Duration) -> Settings {
    Settings {
        default_namespace: "paddock-system".into(),
        queue,
        max_concurrent,
        timeout,
        owned_by_run: true,
    }
}

/// A sink whose writer runs against `api`, and the metrics it counts into.
fn sink(api: &Arc<MockApi>, settings: Settings) -> (Arc<KubeAuditSink>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let (sink, writer) = audit::channel(settings, metrics.audit_kubernetes());
    tokio::spawn(writer.run(api.client(), std::future::pending()));
    (Arc::new(sink), metrics)
}

fn broker(dir: &Path, audit: Arc<dyn AuditSink>) -> Arc<Broker> {
    std::fs::write(dir.join("token"), "real-secret-value\n").expect("secret");
    let text = format!(
        "apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {{name: p}}
spec:
  appliesTo: {{namespaces: [{NS}]}}
  credentials:
    - name: api-token
      provider: {{kind: user-secret, inject: {{header: {{name: Authorization, prefix: 'Bearer '}}}}}}
      secret: {{file: {}}}
      hosts: [api.example]
  egress:
    - {{hosts: [api.example], ports: [443], substituteAuth: true}}
",
        dir.join("token").display(),
    );
    let docs = Policy::parse_text(Path::new("p.yaml"), &text, time::OffsetDateTime::now_utc())
        .expect("policy");
    let store = Store::open_in_memory().expect("store");
    // Registered beforehand (not through the broker), so a test whose API server refuses
    // every record still reaches the issue.
    store
        .upsert_run(
            &RunInfo {
                run: UID.into(),
                namespace: NS.into(),
                template: "claude-code".into(),
                phase: RunPhase::Running,
            },
            0,
        )
        .expect("run");
    Arc::new(Broker::new(
        store,
        Arc::new(PolicyStore::fixed(Policy::from_docs(docs).expect("set"))),
        audit,
        RateLimits::new(&RateLimitConfig::default()).expect("limits"),
    ))
}

fn controller() -> Identity {
    Identity {
        subject: "system:serviceaccount:paddock-system:paddock-controller".into(),
        namespace: String::new(),
        service_account: None,
        scopes: BTreeSet::from([
            Scope::Controller,
            Scope::Issue,
            Scope::Revoke,
            Scope::LeasesRead,
        ]),
        backend: "in-process",
        run: None,
        node: None,
        placement: None,
    }
}

/// Runs `f` on the blocking pool, as the broker's routes do.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

fn register(broker: &Broker) -> Result<(), paddock_broker::BrokerError> {
    broker
        .upsert_run(
            &controller(),
            &RunUpsertRequest {
                run: UID.into(),
                namespace: NS.into(),
                template: "claude-code".into(),
                phase: RunPhase::Running,
            },
        )
        .map(|_| ())
}

fn issue(broker: &Broker, credential: &str) -> Result<String, paddock_broker::BrokerError> {
    broker
        .issue(
            &controller(),
            &IssueRequest {
                run: UID.into(),
                credential: credential.into(),
            },
        )
        .map(|r| r.value.clone())
}

/// Every field the spec of an `AuditEvent` may carry: identifiers, never a value.
const SPEC_FIELDS: [&str; 13] = [
    "time",
    "event",
    "caller",
    "namespace",
    "run",
    "credential",
    "provider",
    "leaseId",
    "policy",
    "host",
    "port",
    "expiresAt",
    "reason",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_operations_become_audit_events_owned_by_their_run_with_identifiers_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = MockApi::new(OnCreate::Created);
    let (cluster, metrics) = sink(&api, settings(16, 4, Duration::from_secs(5)));
    let file_path = dir.path().join("audit.jsonl");
    let file = Arc::new(JsonlSink::open(&file_path, 1 << 20, 1, false).expect("file"));
    let broker = broker(dir.path(), Arc::new(TeeSink::new(file, cluster)));

    let b = Arc::clone(&broker);
    let placeholder = blocking(move || {
        register(&b).expect("register");
        let placeholder = issue(&b, "api-token").expect("issue");
        let denied = issue(&b, "not-granted").expect_err("not granted");
        assert_eq!(denied.code(), ErrorCode::Forbidden);
        placeholder
    })
    .await;

    let creates = api.creates();
    let kinds: Vec<&str> = creates
        .iter()
        .map(|(_, o)| o["spec"]["event"].as_str().expect("event"))
        .collect();
    assert!(kinds.contains(&"run-updated"), "{kinds:?}");
    assert!(kinds.contains(&"credential-issued"), "{kinds:?}");
    assert!(kinds.contains(&"credential-denied"), "{kinds:?}");
    // The file holds the same records, written first.
    let file_lines = std::fs::read_to_string(&file_path).expect("file");
    assert_eq!(file_lines.lines().count(), creates.len());

    let (path, issued) = creates
        .iter()
        .find(|(_, o)| o["spec"]["event"] == "credential-issued")
        .expect("issued");
    assert_eq!(path, EVENTS_PATH, "in the run's namespace");
    let meta = &issued["metadata"];
    assert_eq!(issued["apiVersion"], "paddock.dev/v1");
    assert_eq!(issued["kind"], "AuditEvent");
    assert!(meta.get("name").is_none(), "named by the API server");
    assert_eq!(meta["generateName"], "credential-issued-");
    assert_eq!(meta["labels"]["paddock.dev/run"], UID);
    assert_eq!(
        meta["labels"]["paddock.dev/audit-event"],
        "credential-issued"
    );
    assert_eq!(
        meta["ownerReferences"],
        json!([{"apiVersion": "paddock.dev/v1", "kind": "HarnessRun", "name": RUN, "uid": UID}])
    );
    let spec = &issued["spec"];
    assert_eq!(spec["run"], UID);
    assert_eq!(spec["namespace"], NS);
    assert_eq!(spec["credential"], "api-token");
    assert_eq!(spec["provider"], "user-secret");
    assert!(spec["leaseId"].is_string());
    assert!(
        spec["caller"]
            .as_str()
            .expect("caller")
            .contains("paddock-controller")
    );

    // Identifiers only: no object carries the secret or the placeholder, and no spec has a
    // field outside the record's identifier fields.
    assert!(placeholder.starts_with("pdk-"), "{placeholder}");
    for (_, object) in &creates {
        let text = object.to_string();
        assert!(!text.contains("real-secret-value"), "secret in {text}");
        assert!(!text.contains(&placeholder), "placeholder in {text}");
        for key in object["spec"].as_object().expect("spec").keys() {
            assert!(
                SPEC_FIELDS.contains(&key.as_str()),
                "unexpected spec field {key}"
            );
        }
    }
    // One owner lookup served every record of the run.
    assert_eq!(api.lists.load(Ordering::SeqCst), 1);
    let text = metrics.render();
    let n = creates.len();
    assert!(
        text.contains(&format!(
            "paddock_broker_audit_kubernetes_written_total {n}"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("paddock_broker_audit_kubernetes_queued_total {n}")),
        "{text}"
    );
    // A record leaves the pending count once its writer task is done with it (just after
    // answering).
    wait_for(|| {
        metrics
            .render()
            .contains("paddock_broker_audit_kubernetes_pending 0")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_fail_the_operation_closed_and_undo_the_issue() {
    for code in [500, 409, 403] {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = MockApi::new(OnCreate::Fail(code));
        let (cluster, metrics) = sink(&api, settings(16, 4, Duration::from_secs(5)));
        let broker = broker(dir.path(), cluster);
        let b = Arc::clone(&broker);
        let (reg, iss, leases) = blocking(move || {
            let reg = register(&b).expect_err("registration unaudited");
            let iss = issue(&b, "api-token").expect_err("issue unaudited");
            (reg, iss, b.leases(&controller(), UID))
        })
        .await;
        assert_eq!(reg.code(), ErrorCode::AuditUnavailable, "{code}");
        assert_eq!(iss.code(), ErrorCode::AuditUnavailable, "{code}");
        assert_eq!(ErrorCode::AuditUnavailable.http_status(), 503);
        assert!(
            leases.expect("leases").leases.is_empty(),
            "an unaudited lease remains ({code})"
        );
        assert!(!api.creates().is_empty(), "the create was tried ({code})");
        let text = metrics.render();
        assert!(
            text.contains("paddock_broker_audit_kubernetes_failed_total{reason=\"api\"}"),
            "{text}"
        );
        assert!(
            text.contains("paddock_broker_audit_kubernetes_written_total 0"),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_that_never_answers_fails_the_operation_within_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = MockApi::new(OnCreate::Hang);
    let (cluster, metrics) = sink(&api, settings(16, 4, Duration::from_millis(300)));
    let broker = broker(dir.path(), cluster);
    let b = Arc::clone(&broker);
    let started = Instant::now();
    let err = blocking(move || register(&b).expect_err("unaudited")).await;
    let took = started.elapsed();
    assert_eq!(err.code(), ErrorCode::AuditUnavailable);
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // The writer's bound on the create and the caller's wait are the same length: whichever
    // ends first names the failure.
    let text = metrics.render();
    assert!(
        text.contains("paddock_broker_audit_kubernetes_failed_total{reason=\"wait-timeout\"} 1")
            || text.contains("paddock_broker_audit_kubernetes_failed_total{reason=\"timeout\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("paddock_broker_audit_kubernetes_written_total 0"),
        "{text}"
    );
}

fn record(n: usize) -> Record {
    let mut r = Record::new(AuditKind::EgressDenied, "proxy", NS, UID);
    r.host = Some(format!("host-{n}.example"));
    r.port = Some(443);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once() {
    let api = MockApi::new(OnCreate::Gated);
    let (cluster, metrics) = sink(&api, settings(1, 1, Duration::from_secs(10)));
    // First record: taken by the writer, its create held by the gate.
    let c = Arc::clone(&cluster);
    let first = tokio::task::spawn_blocking(move || c.record(&record(1)));
    wait_for(|| api.in_flight.load(Ordering::SeqCst) == 1).await;
    // Second: waits in the queue (one slot), the writer having no free permit.
    let c = Arc::clone(&cluster);
    let second = tokio::task::spawn_blocking(move || c.record(&record(2)));
    wait_for(|| {
        metrics
            .render()
            .contains("paddock_broker_audit_kubernetes_queued_total 2")
    })
    .await;
    // Third: refused without waiting for the 10 s timeout.
    let c = Arc::clone(&cluster);
    let started = Instant::now();
    let third = blocking(move || c.record(&record(3))).await;
    assert!(third.is_err(), "a full queue refuses");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(
        metrics
            .render()
            .contains("paddock_broker_audit_kubernetes_failed_total{reason=\"queue-full\"} 1"),
        "{}",
        metrics.render()
    );
    // Released, the first two are written.
    api.gate.add_permits(2);
    first.await.expect("task").expect("first written");
    second.await.expect("task").expect("second written");
    assert_eq!(api.creates().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_records_are_written_concurrently_up_to_the_bound() {
    const N: usize = 12;
    let api = MockApi::new(OnCreate::Slow(Duration::from_millis(100)));
    let (cluster, metrics) = sink(&api, settings(64, 3, Duration::from_secs(10)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..N {
        let c = Arc::clone(&cluster);
        tasks.push(tokio::task::spawn_blocking(move || c.record(&record(n))));
    }
    for t in tasks {
        t.await.expect("task").expect("written");
    }
    let took = started.elapsed();
    let creates = api.creates();
    assert_eq!(creates.len(), N);
    let hosts: BTreeSet<String> = creates
        .iter()
        .map(|(_, o)| o["spec"]["host"].as_str().expect("host").to_owned())
        .collect();
    assert_eq!(hosts.len(), N, "every record once");
    assert_eq!(
        api.max_in_flight.load(Ordering::SeqCst),
        3,
        "bounded, and the bound is used"
    );
    // 12 creates of 100 ms, 3 at a time: about 400 ms, not the 1.2 s of one at a time.
    assert!(took < Duration::from_millis(1100), "{took:?}");
    assert!(metrics.render().contains(&format!(
        "paddock_broker_audit_kubernetes_written_total {N}"
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_writer_no_operation() {
    let metrics = Metrics::new();
    let (sink, writer) = audit::channel(
        settings(4, 1, Duration::from_secs(5)),
        metrics.audit_kubernetes(),
    );
    drop(writer);
    let err = blocking(move || sink.record(&record(0))).await;
    assert!(err.is_err());
    assert!(
        metrics.render().contains("reason=\"stopped\"} 1"),
        "{}",
        metrics.render()
    );
}

async fn wait_for(mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "condition not reached in 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
