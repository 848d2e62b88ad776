//! The `HarnessRun` controller and its leader election against API server answers (kube-rs's
//! client over a mock tower service: no API server runs here) and a real broker in-process.
//!
//! The mock answers like the API server does for the few resources the controller touches
//! (pods, Secrets, `HarnessRun` objects and their status, Events, Leases): it stores what is
//! created, answers `404`/`409` with `Status` objects, applies the finalizer JSON patches and
//! status merge patches, and checks `resourceVersion` on Lease replaces. Every request is
//! recorded, so tests can say what the controller did and did not do.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::{Request, Response};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api,
    client::Body,
    runtime::events::{Recorder, Reporter},
};
use paddock_broker::{
    Broker,
    audit::MemorySink,
    cluster::{
        controller::{
            Context, ReconcileError, Settings,
            broker_api::{InProcess, RunBroker},
            lease::{self, Attempt, LeaseLock, LeaseSettings},
            reconcile::{self, FINALIZER},
        },
        crd::HarnessRun,
    },
    policy::{Policy, PolicyStore},
    ratelimit::{RateLimitConfig, RateLimits},
    store::Store,
    wire::RunPhase,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------
// The API server stand-in.

#[derive(Default)]
struct ApiState {
    /// Objects by their path (`/api/v1/namespaces/team/pods/x`).
    objects: BTreeMap<String, Value>,
    /// `METHOD path` of every request, in order.
    log: Vec<String>,
    next_rv: u64,
    /// Answer every Lease request with 500 (an unreachable API server).
    leases_fail: bool,
}

#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<ApiState>>);

fn status(code: u16, reason: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": reason, "reason": reason, "code": code}),
    )
}

impl FakeApi {
    fn state(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.0.lock().expect("fake API state")
    }

    fn client(&self) -> kube::Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let me = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let me = me.clone();
                // One task per request: a held watch must not stall the others.
                tokio::spawn(async move {
                    let (parts, body) = req.into_parts();
                    let bytes = http_body_util::BodyExt::collect(body)
                        .await
                        .map(http_body_util::Collected::to_bytes)
                        .unwrap_or_default();
                    let query = parts.uri.query().unwrap_or_default().to_owned();
                    if parts.method == "GET" && query.contains("watch=true") {
                        // A short watch: after a moment, every object of the resource written
                        // since the watch's resourceVersion, as MODIFIED; then it ends and the
                        // watcher asks again.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let body = me.watch(parts.uri.path(), &query);
                        send.send_response(
                            Response::builder()
                                .status(200)
                                .body(Body::from(body))
                                .expect("response"),
                        );
                        return;
                    }
                    let (code, value) = me.answer(parts.method.as_str(), &parts.uri, &bytes);
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

    fn get(&self, path: &str) -> Option<Value> {
        self.state().objects.get(path).cloned()
    }

    fn put(&self, path: &str, value: Value) {
        self.state().objects.insert(path.to_owned(), value);
    }

    fn requests(&self, prefix: &str) -> Vec<String> {
        self.state()
            .log
            .iter()
            .filter(|l| l.starts_with(prefix))
            .cloned()
            .collect()
    }

    fn events(&self) -> Vec<String> {
        self.state()
            .objects
            .iter()
            .filter(|(k, _)| k.contains("/events/"))
            .map(|(_, v)| v["reason"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn watch(&self, path: &str, query: &str) -> Vec<u8> {
        let since: u64 = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let resource = path.rsplit('/').next().unwrap_or_default();
        let mut st = self.state();
        st.log.push(format!("WATCH {path}"));
        let mut out = Vec::new();
        for obj in st
            .objects
            .iter()
            .filter(|(k, _)| k.split('/').rev().nth(1) == Some(resource))
            .map(|(_, v)| v)
        {
            let rv: u64 = obj["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if rv > since {
                out.extend(
                    serde_json::to_vec(&json!({"type": "MODIFIED", "object": obj})).expect("json"),
                );
                out.push(b'\n');
            }
        }
        out
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one match over the verbs the controller uses, each a few lines"
    )]
    fn answer(&self, method: &str, uri: &http::Uri, body: &[u8]) -> (u16, Value) {
        let path = uri.path().to_owned();
        let mut st = self.state();
        st.log.push(format!("{method} {path}"));
        st.next_rv += 1;
        let rv = st.next_rv.to_string();
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if path.contains("/leases") && st.leases_fail {
            return status(500, "InternalError");
        }
        match method {
            "GET" if !st.objects.contains_key(&path) && is_collection(&path) => {
                // A list across namespaces: every object of that resource.
                let resource = path.rsplit('/').next().unwrap_or_default();
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, _)| k.split('/').rev().nth(1) == Some(resource))
                    .map(|(_, v)| v.clone())
                    .collect();
                (
                    200,
                    json!({"kind": "List", "apiVersion": "v1",
                             "metadata": {"resourceVersion": rv}, "items": items}),
                )
            }
            "GET" => match st.objects.get(&path) {
                Some(v) => (200, v.clone()),
                None => status(404, "NotFound"),
            },
            "POST" => {
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let key = format!("{path}/{name}");
                if st.objects.contains_key(&key) {
                    return status(409, "AlreadyExists");
                }
                let mut obj = body;
                obj["metadata"]["resourceVersion"] = rv.clone().into();
                obj["metadata"]["uid"] = format!("00000000-0000-4000-8000-{rv:0>12}").into();
                st.objects.insert(key, obj.clone());
                (201, obj)
            }
            "PUT" => {
                let Some(current) = st.objects.get(&path) else {
                    return status(404, "NotFound");
                };
                if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    return status(409, "Conflict");
                }
                let mut obj = body;
                obj["metadata"]["resourceVersion"] = rv.into();
                st.objects.insert(path, obj.clone());
                (200, obj)
            }
            "DELETE" => match st.objects.remove(&path) {
                Some(v) => (200, v),
                None => status(404, "NotFound"),
            },
            "PATCH" => {
                let (target, sub) = match path.strip_suffix("/status") {
                    Some(p) => (p.to_owned(), true),
                    None => (path.clone(), false),
                };
                let Some(mut obj) = st.objects.get(&target).cloned() else {
                    return status(404, "NotFound");
                };
                if sub {
                    obj["status"] = body["status"].clone();
                } else if let Some(ops) = body.as_array() {
                    for op in ops {
                        let p = op["path"].as_str().unwrap_or_default();
                        match op["op"].as_str() {
                            Some("add") if p == "/metadata/finalizers" => {
                                obj["metadata"]["finalizers"] = op["value"].clone();
                            }
                            Some("add") if p == "/metadata/finalizers/-" => {
                                let mut f = obj["metadata"]["finalizers"]
                                    .as_array()
                                    .cloned()
                                    .unwrap_or_default();
                                f.push(op["value"].clone());
                                obj["metadata"]["finalizers"] = f.into();
                            }
                            Some("remove") => {
                                let i: usize = p
                                    .rsplit('/')
                                    .next()
                                    .and_then(|i| i.parse().ok())
                                    .expect("index");
                                let mut f = obj["metadata"]["finalizers"]
                                    .as_array()
                                    .cloned()
                                    .unwrap_or_default();
                                f.remove(i);
                                obj["metadata"]["finalizers"] = f.into();
                            }
                            _ => {}
                        }
                    }
                } else {
                    // A merge patch of an Event series.
                    if let (Some(o), Some(b)) = (obj.as_object_mut(), body.as_object()) {
                        for (k, v) in b {
                            o.insert(k.clone(), v.clone());
                        }
                    }
                }
                obj["metadata"]["resourceVersion"] = rv.into();
                st.objects.insert(target, obj.clone());
                (200, obj)
            }
            _ => status(405, "MethodNotAllowed"),
        }
    }
}

/// `/api/v1/pods`, `/apis/paddock.dev/v1/harnessruns`: a cluster-wide collection.
fn is_collection(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matches!(parts.as_slice(), ["api", _, _] | ["apis", _, _, _])
}

// ---------------------------------------------------------------------------------------
// Fixtures.

const NS: &str = "team";
const RUN: &str = "fix-bug";
const UID: &str = "6b1d0c2a-1111-4222-8333-000000000001";
const RUN_PATH: &str = "/apis/paddock.dev/v1/namespaces/team/harnessruns/fix-bug";
const SECRET_PATH: &str = "/api/v1/namespaces/team/secrets/fix-bug-paddock";
const POD_PATH: &str = "/api/v1/namespaces/team/pods/fix-bug-agent";

fn broker(dir: &Path) -> Arc<Broker> {
    std::fs::write(dir.join("token"), "real-secret\n").expect("secret");
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
    - name: other-token
      provider: {{kind: user-secret, inject: {{header: {{name: Authorization, prefix: 'Bearer '}}}}}}
      secret: {{file: {}}}
      hosts: [api.example]
  egress:
    - {{hosts: [api.example], ports: [443], substituteAuth: true}}
",
        dir.join("token").display(),
        dir.join("token").display()
    );
    let docs = Policy::parse_text(Path::new("p.yaml"), &text, time::OffsetDateTime::now_utc())
        .expect("policy");
    Arc::new(Broker::new(
        Store::open_in_memory().expect("store"),
        Arc::new(PolicyStore::fixed(Policy::from_docs(docs).expect("set"))),
        Arc::new(MemorySink::default()),
        RateLimits::new(&RateLimitConfig::default()).expect("limits"),
    ))
}

fn context(api: &FakeApi, broker: &Arc<Broker>) -> Arc<Context> {
    let client = api.client();
    Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "paddock-controller".into(),
                instance: None,
            },
        ),
        client,
        broker: Arc::new(InProcess::new(Arc::clone(broker), "controller:test")),
        settings: Settings {
            run_label: "paddock.dev/run".into(),
            trust_ca: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            trust_bundle: None,
            resync: Duration::from_mins(1),
        },
    })
}

fn harness_run(credentials: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "paddock.dev/v1", "kind": "HarnessRun",
        "metadata": {"name": RUN, "namespace": NS, "uid": UID, "resourceVersion": "1", "generation": 1},
        "spec": {
            "template": "claude-code",
            "credentials": credentials.iter().map(|(n, e)| json!({"name": n, "env": e})).collect::<Vec<_>>(),
            "podTemplate": {
                "metadata": {"labels": {"app": "agent", "paddock.dev/run": "someone-else"},
                             "annotations": {"paddock.dev/adapter-port": "22", "note": "kept",
                                             "paddock.dev/shell": "true"}},
                "spec": {"containers": [{"name": "agent", "image": "agent:1",
                                         "env": [{"name": "API_TOKEN", "value": "spoofed"}]}]},
            },
            "interactive": {"adapterPort": 8765},
        },
    })
}

async fn reconcile_once(
    api: &FakeApi,
    ctx: &Arc<Context>,
) -> Result<kube::runtime::controller::Action, ReconcileError> {
    let run: HarnessRun =
        serde_json::from_value(api.get(RUN_PATH).expect("run object")).expect("HarnessRun");
    reconcile::reconcile(Arc::new(run), Arc::clone(ctx)).await
}

fn active_leases(broker: &Broker) -> usize {
    broker
        .store()
        .leases_for_run(UID)
        .expect("leases")
        .iter()
        .filter(|l| !l.revoked)
        .count()
}

fn set_pod_phase(api: &FakeApi, phase: &str) {
    let mut pod = api.get(POD_PATH).expect("pod");
    pod["status"] = json!({"phase": phase});
    pod["spec"]["nodeName"] = "node-1".into();
    api.put(POD_PATH, pod);
}

fn run_status(api: &FakeApi) -> Value {
    api.get(RUN_PATH).expect("run")["status"].clone()
}

// ---------------------------------------------------------------------------------------
// Reconcile.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(clippy::too_many_lines, reason = "one run's whole life, step by step")]
async fn a_run_from_creation_to_deletion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let api = FakeApi::default();
    api.put(RUN_PATH, harness_run(&[("api-token", "API_TOKEN")]));
    let ctx = context(&api, &broker);

    // First the finalizer, nothing else: cleanup must be guaranteed before anything exists.
    reconcile_once(&api, &ctx).await.expect("reconcile");
    assert_eq!(
        api.get(RUN_PATH).expect("run")["metadata"]["finalizers"],
        json!([FINALIZER])
    );
    assert!(broker.store().run(UID).expect("store").is_none());
    assert!(api.get(SECRET_PATH).is_none());

    // Registered, issued into the Secret, pod created.
    reconcile_once(&api, &ctx).await.expect("reconcile");
    let info = broker.store().run(UID).expect("store").expect("registered");
    assert_eq!(
        (info.namespace.as_str(), info.template.as_str(), info.phase),
        (NS, "claude-code", RunPhase::Pending)
    );
    assert_eq!(active_leases(&broker), 1);
    let secret = api.get(SECRET_PATH).expect("Secret");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], UID);
    assert_eq!(secret["metadata"]["ownerReferences"][0]["controller"], true);
    let placeholder = {
        use base64::Engine as _;
        let b64 = secret["data"]["API_TOKEN"].as_str().expect("API_TOKEN key");
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("base64"),
        )
        .expect("utf8")
    };
    assert!(
        placeholder.starts_with("pdk-"),
        "a placeholder, never the secret"
    );
    assert!(!placeholder.contains("real-secret"));
    assert!(secret["data"]["ca.crt"].is_string());
    let pod = api.get(POD_PATH).expect("pod");
    assert_eq!(
        pod["metadata"]["labels"]["paddock.dev/run"], UID,
        "the controller's run label wins"
    );
    assert_eq!(pod["metadata"]["labels"]["app"], "agent");
    assert_eq!(
        pod["metadata"]["annotations"]["paddock.dev/adapter-port"], "8765",
        "the adapter port comes from the run, never the template"
    );
    assert_eq!(pod["metadata"]["annotations"]["note"], "kept");
    assert!(
        pod["metadata"]["annotations"]["paddock.dev/shell"].is_null(),
        "shells only when the run asks for them, never the template"
    );
    assert_eq!(pod["metadata"]["ownerReferences"][0]["uid"], UID);
    assert_eq!(pod["spec"]["restartPolicy"], "Never");
    assert_eq!(
        pod["spec"]["dnsConfig"]["options"],
        json!([{"name": "ndots", "value": "1"}]),
        "external names are asked as written first"
    );
    let env = pod["spec"]["containers"][0]["env"].as_array().expect("env");
    let token: Vec<&Value> = env.iter().filter(|e| e["name"] == "API_TOKEN").collect();
    assert_eq!(
        token.len(),
        1,
        "the template's own API_TOKEN is replaced: {env:?}"
    );
    assert_eq!(
        token[0]["valueFrom"]["secretKeyRef"],
        json!({"name": "fix-bug-paddock", "key": "API_TOKEN", "optional": false})
    );
    assert!(
        env.iter().any(
            |e| e["name"] == "NODE_EXTRA_CA_CERTS" && e["value"] == "/etc/paddock/trust/ca.crt"
        )
    );
    assert_eq!(
        pod["spec"]["containers"][0]["volumeMounts"][0]["mountPath"],
        "/etc/paddock/trust"
    );
    assert_eq!(
        pod["spec"]["volumes"][0]["secret"]["secretName"],
        "fix-bug-paddock"
    );
    let st = run_status(&api);
    assert_eq!(st["phase"], "Pending");
    assert_eq!(st["runId"], UID);
    assert_eq!(st["leaseCount"], 1);
    assert_eq!(st["credentials"][0]["name"], "api-token");
    assert_eq!(st["credentials"][0]["env"], "API_TOKEN");
    assert_eq!(st["secret"], "fix-bug-paddock");
    let conditions: Vec<(String, String)> = st["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap_or_default().to_owned(),
                c["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for want in ["Registered", "CredentialsIssued", "PodCreated"] {
        assert!(
            conditions.contains(&(want.to_owned(), "True".to_owned())),
            "{want}: {conditions:?}"
        );
    }
    assert_eq!(api.events(), ["CredentialsIssued", "PodCreated"]);

    // Reconciling again changes nothing: no second lease, Secret, pod or event.
    let before = api.requests("POST").len();
    reconcile_once(&api, &ctx).await.expect("reconcile");
    assert_eq!(active_leases(&broker), 1);
    assert_eq!(
        broker.store().leases_for_run(UID).expect("leases").len(),
        1,
        "nothing issued twice"
    );
    assert_eq!(api.requests("POST").len(), before, "nothing created twice");
    assert!(
        api.requests("PATCH")
            .iter()
            .filter(|r| r.ends_with("/status"))
            .count()
            >= 1
    );

    // A controller restart (new client, recorder and broker handle; the same cluster and
    // broker) picks up where the last one stopped, issuing nothing.
    let ctx = context(&api, &broker);
    set_pod_phase(&api, "Running");
    reconcile_once(&api, &ctx).await.expect("reconcile");
    assert_eq!(broker.store().leases_for_run(UID).expect("leases").len(), 1);
    assert_eq!(
        broker.store().run(UID).expect("store").expect("run").phase,
        RunPhase::Running
    );
    let st = run_status(&api);
    assert_eq!(st["phase"], "Running");
    assert_eq!(st["node"], "node-1");

    // The pod completes: leases revoked, Secret deleted, the run marked at the broker.
    set_pod_phase(&api, "Succeeded");
    reconcile_once(&api, &ctx).await.expect("reconcile");
    assert_eq!(active_leases(&broker), 0);
    assert!(api.get(SECRET_PATH).is_none());
    assert_eq!(
        broker.store().run(UID).expect("store").expect("run").phase,
        RunPhase::Succeeded
    );
    let st = run_status(&api);
    assert_eq!(st["phase"], "Succeeded");
    assert_eq!(st["leaseCount"], 0);
    assert!(api.events().contains(&"RunFinished".to_owned()));
    // A finished run stays finished, even when its pod is gone.
    api.state().objects.remove(POD_PATH);
    reconcile_once(&api, &ctx).await.expect("reconcile");
    assert_eq!(run_status(&api)["phase"], "Succeeded");
    assert!(
        api.get(POD_PATH).is_none(),
        "no second pod for a finished run"
    );

    // Deleted: the finalizer goes once cleanup is done.
    let mut obj = api.get(RUN_PATH).expect("run");
    obj["metadata"]["deletionTimestamp"] = "2026-12-06T12:00:00Z".into();
    api.put(RUN_PATH, obj);
    reconcile_once(&api, &ctx).await.expect("reconcile");
    assert_eq!(
        api.get(RUN_PATH).expect("run")["metadata"]["finalizers"],
        json!([])
    );
    assert_eq!(
        broker.store().run(UID).expect("store").expect("run").phase,
        RunPhase::Succeeded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_running_run_revokes_its_leases_before_the_object_goes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let api = FakeApi::default();
    api.put(RUN_PATH, harness_run(&[("api-token", "API_TOKEN")]));
    let ctx = context(&api, &broker);
    reconcile_once(&api, &ctx).await.expect("finalizer");
    reconcile_once(&api, &ctx).await.expect("issue");
    set_pod_phase(&api, "Running");
    reconcile_once(&api, &ctx).await.expect("running");
    assert_eq!(active_leases(&broker), 1);

    let mut obj = api.get(RUN_PATH).expect("run");
    obj["metadata"]["deletionTimestamp"] = "2026-12-06T12:00:00Z".into();
    api.put(RUN_PATH, obj);
    // The broker is unreachable: cleanup fails and the finalizer stays (the object is not
    // released with live leases).
    let offline = Arc::new(Context {
        client: ctx.client.clone(),
        recorder: Recorder::new(
            ctx.client.clone(),
            Reporter {
                controller: "c".into(),
                instance: None,
            },
        ),
        broker: Arc::new(Unreachable),
        settings: ctx.settings.clone(),
    });
    assert!(reconcile_once(&api, &offline).await.is_err());
    assert_eq!(
        api.get(RUN_PATH).expect("run")["metadata"]["finalizers"],
        json!([FINALIZER])
    );
    assert_eq!(active_leases(&broker), 1);

    reconcile_once(&api, &ctx).await.expect("cleanup");
    assert_eq!(active_leases(&broker), 0);
    assert_eq!(
        broker.store().run(UID).expect("store").expect("run").phase,
        RunPhase::Cancelled
    );
    assert!(api.get(SECRET_PATH).is_none());
    assert!(api.get(POD_PATH).is_none());
    assert_eq!(
        api.get(RUN_PATH).expect("run")["metadata"]["finalizers"],
        json!([])
    );
    assert!(api.events().contains(&"LeasesRevoked".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credential_gets_no_pod_and_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let api = FakeApi::default();
    // `api-token` is granted, `prod-db` is not.
    api.put(
        RUN_PATH,
        harness_run(&[("api-token", "API_TOKEN"), ("prod-db", "DB_PASSWORD")]),
    );
    let ctx = context(&api, &broker);
    reconcile_once(&api, &ctx).await.expect("finalizer");
    let err = reconcile_once(&api, &ctx).await.expect_err("refused");
    assert!(matches!(err, ReconcileError::Broker(_)), "{err}");
    assert!(api.get(SECRET_PATH).is_none());
    assert!(
        api.get(POD_PATH).is_none(),
        "no pod without every credential"
    );
    assert_eq!(
        active_leases(&broker),
        0,
        "the lease of this attempt was taken back"
    );
    let st = run_status(&api);
    assert!(
        st["lastDenial"]
            .as_str()
            .expect("lastDenial")
            .contains("prod-db"),
        "{st}"
    );
    assert!(api.events().contains(&"CredentialDenied".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_a_stopped_controller_never_delivered_are_revoked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let api = FakeApi::default();
    api.put(RUN_PATH, harness_run(&[("api-token", "API_TOKEN")]));
    let ctx = context(&api, &broker);
    reconcile_once(&api, &ctx).await.expect("finalizer");
    // A controller that issued and then stopped before writing the Secret, and the run's
    // credentials changed meanwhile (the broker itself replaces a run's earlier lease of the
    // same credential; one the run no longer asks for only the controller can take back).
    ctx.broker
        .upsert_run(&paddock_broker::wire::RunUpsertRequest {
            run: UID.into(),
            namespace: NS.into(),
            template: "claude-code".into(),
            phase: RunPhase::Pending,
        })
        .expect("register");
    let lost = ctx
        .broker
        .issue(&paddock_broker::wire::IssueRequest {
            run: UID.into(),
            credential: "other-token".into(),
        })
        .expect("issue");
    reconcile_once(&api, &ctx).await.expect("reconcile");
    let leases = broker.store().leases_for_run(UID).expect("leases");
    assert_eq!(leases.len(), 2);
    assert!(
        leases
            .iter()
            .any(|l| l.lease_id == lost.lease_id && l.revoked),
        "the undelivered lease is revoked"
    );
    assert_eq!(active_leases(&broker), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_finds_runs_through_its_watch_and_reconciles_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let api = FakeApi::default();
    api.put(RUN_PATH, harness_run(&[("api-token", "API_TOKEN")]));
    let ctx = context(&api, &broker);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(paddock_broker::cluster::controller::run(
        Arc::clone(&ctx),
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
    ));
    // The list brings the run; the watch brings the run again once the finalizer is on it,
    // and that reconcile issues and creates the pod.
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.get(POD_PATH).is_none() {
        assert!(
            Instant::now() < deadline,
            "no pod; requests: {:?}",
            api.requests("")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(api.get(SECRET_PATH).is_some());
    assert_eq!(active_leases(&broker), 1);
    assert!(
        !api.requests("GET /apis/paddock.dev/v1/harnessruns")
            .is_empty(),
        "listed runs cluster-wide"
    );
    assert!(
        !api.requests("GET /api/v1/pods").is_empty(),
        "listed pods cluster-wide"
    );
    let _ = stop_tx.send(true);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("graceful shutdown")
        .expect("task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_run_gets_nothing_and_can_still_be_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let api = FakeApi::default();
    // SSL_CERT_FILE is the controller's (it points at the trust bundle).
    api.put(RUN_PATH, harness_run(&[("api-token", "SSL_CERT_FILE")]));
    let ctx = context(&api, &broker);
    reconcile_once(&api, &ctx).await.expect("finalizer");
    reconcile_once(&api, &ctx)
        .await
        .expect("reported, not retried");
    let st = run_status(&api);
    assert_eq!(st["phase"], "Failed");
    assert!(st["conditions"].to_string().contains("InvalidSpec"), "{st}");
    assert!(api.events().contains(&"InvalidSpec".to_owned()));
    assert!(api.get(SECRET_PATH).is_none() && api.get(POD_PATH).is_none());
    assert!(
        broker
            .store()
            .leases_for_run(UID)
            .expect("leases")
            .is_empty()
    );
    let mut obj = api.get(RUN_PATH).expect("run");
    obj["metadata"]["deletionTimestamp"] = "2026-12-06T12:00:00Z".into();
    api.put(RUN_PATH, obj);
    reconcile_once(&api, &ctx).await.expect("cleanup");
    assert_eq!(
        api.get(RUN_PATH).expect("run")["metadata"]["finalizers"],
        json!([])
    );
}

/// A broker that never answers.
#[derive(Debug)]
struct Unreachable;

impl RunBroker for Unreachable {
    fn upsert_run(
        &self,
        _: &paddock_broker::wire::RunUpsertRequest,
    ) -> Result<
        paddock_broker::wire::RunInfo,
        paddock_broker::cluster::controller::broker_api::BrokerCallError,
    > {
        Err(
            paddock_broker::cluster::controller::broker_api::BrokerCallError::Unavailable(
                "down".into(),
            ),
        )
    }
    fn issue(
        &self,
        _: &paddock_broker::wire::IssueRequest,
    ) -> Result<
        paddock_broker::wire::IssueResponse,
        paddock_broker::cluster::controller::broker_api::BrokerCallError,
    > {
        Err(
            paddock_broker::cluster::controller::broker_api::BrokerCallError::Unavailable(
                "down".into(),
            ),
        )
    }
    fn revoke(
        &self,
        _: &str,
    ) -> Result<(), paddock_broker::cluster::controller::broker_api::BrokerCallError> {
        Err(
            paddock_broker::cluster::controller::broker_api::BrokerCallError::Unavailable(
                "down".into(),
            ),
        )
    }
    fn leases(
        &self,
        _: &str,
    ) -> Result<
        Vec<paddock_broker::wire::LeaseInfo>,
        paddock_broker::cluster::controller::broker_api::BrokerCallError,
    > {
        Err(
            paddock_broker::cluster::controller::broker_api::BrokerCallError::Unavailable(
                "down".into(),
            ),
        )
    }
}

// ---------------------------------------------------------------------------------------
// Leader election.

const LEASE_PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/paddock-system/leases/paddock-controller";

fn settings() -> LeaseSettings {
    LeaseSettings {
        duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry: Duration::from_secs(2),
    }
}

fn lock(api: &FakeApi, who: &str, s: LeaseSettings) -> LeaseLock {
    LeaseLock::new(
        Api::<Lease>::namespaced(api.client(), "paddock-system"),
        "paddock-controller",
        who,
        s,
    )
}

fn holder(api: &FakeApi) -> Value {
    api.get(LEASE_PATH).expect("lease")["spec"]["holderIdentity"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_and_another_takes_over_only_after_expiry() {
    let api = FakeApi::default();
    let a = lock(&api, "a", settings());
    let b = lock(&api, "b", settings());
    let t0 = Instant::now();

    assert_eq!(
        a.try_acquire_or_renew(t0).await.expect("a"),
        Attempt::Leading
    );
    assert_eq!(holder(&api), "a");
    assert_eq!(
        b.try_acquire_or_renew(t0).await.expect("b"),
        Attempt::Following {
            holder: Some("a".into())
        }
    );
    // a renews; b, seeing the record change, keeps waiting even long after its first look.
    assert_eq!(
        a.try_acquire_or_renew(t0 + Duration::from_secs(10))
            .await
            .expect("a"),
        Attempt::Leading
    );
    assert!(matches!(
        b.try_acquire_or_renew(t0 + Duration::from_secs(20))
            .await
            .expect("b"),
        Attempt::Following { .. }
    ));
    // a stops renewing: once b has seen no change for a whole lease duration, b takes over.
    assert!(
        matches!(
            b.try_acquire_or_renew(t0 + Duration::from_secs(30))
                .await
                .expect("b"),
            Attempt::Following { .. }
        ),
        "14 s without change is not yet expiry"
    );
    assert_eq!(
        b.try_acquire_or_renew(t0 + Duration::from_secs(36))
            .await
            .expect("b"),
        Attempt::Leading
    );
    let lease = api.get(LEASE_PATH).expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    // a comes back: it has lost, and does not take the lease back.
    assert_eq!(
        a.try_acquire_or_renew(t0 + Duration::from_secs(37))
            .await
            .expect("a"),
        Attempt::Following {
            holder: Some("b".into())
        }
    );
    assert_eq!(holder(&api), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_for_an_expired_lease_never_both_lead() {
    for round in 0..20_u64 {
        let api = FakeApi::default();
        let old = lock(&api, "old", settings());
        let t0 = Instant::now();
        assert_eq!(
            old.try_acquire_or_renew(t0).await.expect("old"),
            Attempt::Leading
        );
        let a = lock(&api, "a", settings());
        let b = lock(&api, "b", settings());
        // Both saw the record at t0 and nothing since.
        let _ = a.try_acquire_or_renew(t0).await.expect("a");
        let _ = b.try_acquire_or_renew(t0).await.expect("b");
        let later = t0 + Duration::from_secs(16 + round % 3);
        let (ra, rb) = tokio::join!(a.try_acquire_or_renew(later), b.try_acquire_or_renew(later));
        let leaders = [ra.expect("a"), rb.expect("b")]
            .into_iter()
            .filter(|r| *r == Attempt::Leading)
            .count();
        assert_eq!(leaders, 1, "round {round}: exactly one replica takes over");
        assert!(holder(&api) == "a" || holder(&api) == "b");
    }
}

/// Marks the work stopped (and when) as it is dropped.
struct Guard(
    Arc<std::sync::atomic::AtomicBool>,
    Arc<Mutex<Option<Instant>>>,
);
impl Drop for Guard {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
        *self.1.lock().expect("lock") = Some(Instant::now());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_stops_acting_before_the_lease_expires() {
    let api = FakeApi::default();
    let s = LeaseSettings {
        duration: Duration::from_millis(1500),
        renew_deadline: Duration::from_millis(600),
        retry: Duration::from_millis(100),
    };
    let l = lock(&api, "a", s);
    let running = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let starts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stopped_at = Arc::new(Mutex::new(None::<Instant>));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let task = {
        let (running, starts, stopped_at) = (
            Arc::clone(&running),
            Arc::clone(&starts),
            Arc::clone(&stopped_at),
        );
        tokio::spawn(async move {
            lease::lead(
                &l,
                || {
                    let (running, starts, stopped_at) = (
                        Arc::clone(&running),
                        Arc::clone(&starts),
                        Arc::clone(&stopped_at),
                    );
                    async move {
                        starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        running.store(true, std::sync::atomic::Ordering::SeqCst);
                        let _guard = Guard(running, stopped_at);
                        std::future::pending::<()>().await;
                    }
                },
                async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                },
            )
            .await;
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !running.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "never led");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Leading and renewing: still running after several renewals.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(running.load(std::sync::atomic::Ordering::SeqCst));
    assert!(
        api.requests("PUT").len() >= 2,
        "renewals: {:?}",
        api.requests("PUT")
    );
    // The API server becomes unreachable: the work stops within the renew deadline (plus one
    // retry), well before another replica could take the lease (1.5 s after the last renewal).
    let cut = Instant::now();
    api.state().leases_fail = true;
    while running.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            cut.elapsed() < Duration::from_secs(5),
            "still acting without a lease"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopped = stopped_at.lock().expect("lock").expect("stopped");
    assert!(
        stopped.duration_since(cut) < s.duration,
        "stopped after {:?}",
        stopped.duration_since(cut)
    );
    // While the API stays down it does not start again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(starts.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Back: it leads again (the lease is still its own).
    api.state().leases_fail = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while starts.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "did not lead again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Shutdown releases the lease.
    let _ = stop_tx.send(true);
    task.await.expect("lead task");
    assert!(holder(&api).is_null(), "released: {}", holder(&api));
}
