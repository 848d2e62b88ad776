//! Node agents (`broker:node-agent`) against recorded API server answers: `TokenReview`s of
//! pod-bound projected tokens with and without the `authentication.kubernetes.io/node-name`
//! extra, and pod lists (`GET /api/v1/namespaces/{ns}/pods?labelSelector=paddock.dev/run=...`)
//! in the shape kube-apiserver answers them. No API server runs here: a loopback server plays
//! one from these recorded answers.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use paddock_broker::{
    auth::{
        AuthError, Authenticator, Scope,
        pods::PlacementError,
        tokenreview::{TokenReviewAuthenticator, TokenReviewConfig, TokenReviewConfigError},
    },
    config::{self, Config},
    server::{self, Handle},
};
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};

use crate::{
    common::{self, CONTROLLER_KEY, TEAM_A_KEY},
    support::{Seen, TestServer, pem},
};

const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const BROKER_TOKEN: &str = "broker-sa-token-node";
const NODE_AGENT_SA: &str = "system:serviceaccount:paddock-system:paddock-node";

/// Bearers the recorded reviews know: (username, node-name extra values).
fn known_tokens() -> HashMap<&'static str, (&'static str, Option<Vec<&'static str>>)> {
    HashMap::from([
        ("agent-on-node-a", (NODE_AGENT_SA, Some(vec!["node-a"]))),
        ("agent-on-node-b", (NODE_AGENT_SA, Some(vec!["node-b"]))),
        // A token minted with `kubectl create token` (not pod-bound): no node extra.
        ("agent-unbound", (NODE_AGENT_SA, None)),
        (
            "agent-two-nodes",
            (NODE_AGENT_SA, Some(vec!["node-a", "node-b"])),
        ),
        (
            "builder-on-node-b",
            ("system:serviceaccount:team-a:builder", Some(vec!["node-b"])),
        ),
    ])
}

/// The status of a `TokenReview` of a pod-bound projected token, as kube-apiserver >= 1.30
/// answers it (`extra` also names the pod; the node entries only when `node` is set).
fn review_status(username: &str, node: Option<&[&str]>) -> Value {
    let namespace = username.split(':').nth(2).unwrap_or_default();
    let mut extra = json!({
        "authentication.kubernetes.io/credential-id": ["JTI=0b7c3a50-4d2e-4c1e-9c5f-2b1f0e9d8a77"],
        "authentication.kubernetes.io/pod-name": ["paddock-node-x7k2p"],
        "authentication.kubernetes.io/pod-uid": ["6f1c9e2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b"],
    });
    if let Some(node) = node {
        extra["authentication.kubernetes.io/node-name"] = json!(node);
        extra["authentication.kubernetes.io/node-uid"] =
            json!(["a1b2c3d4-0000-4000-8000-00000000000a"]);
    }
    json!({
        "authenticated": true,
        "user": {
            "username": username,
            "uid": "9d2f6a1e-7c3b-4a5d-8e9f-0a1b2c3d4e5f",
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"),
                       "system:authenticated"],
            "extra": extra,
        },
        "audiences": ["paddock-broker"],
    })
}

/// One pod of a `PodList`, in the API server's shape (trimmed of fields the broker ignores).
fn pod(name: &str, run: &str, node: Option<&str>, phase: &str) -> Value {
    let mut spec = json!({
        "containers": [{"name": "agent", "image": "example.com/agent:1"}],
        "serviceAccountName": "default",
    });
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    json!({
        "metadata": {
            "name": name,
            "namespace": "team-a",
            "uid": format!("{name}-0000-4000-8000-000000000000"),
            "labels": {"paddock.dev/run": run, "app.kubernetes.io/part-of": "paddock"},
            "creationTimestamp": "2026-12-06T15:00:00Z",
        },
        "spec": spec,
        "status": {"phase": phase},
    })
}

/// The UID [`pod`] gives the pod of `run` named `<run>-pod`.
fn pod_uid(run: &str) -> String {
    format!("{run}-pod-0000-4000-8000-000000000000")
}

fn pod_list(items: &[Value]) -> String {
    json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": "48213"},
        "items": items,
    })
    .to_string()
}

/// The recorded pod list of every run of these tests, keyed by run, as (status, body).
fn recorded_pods() -> HashMap<String, (u16, String)> {
    let ok = |items: &[Value]| (200, pod_list(items));
    HashMap::from([
        (
            "run-a".to_owned(),
            ok(&[
                pod("run-a-pod", "run-a", Some("node-a"), "Running"),
                // The pod of an earlier attempt, finished on another node: not counted.
                pod("run-a-old", "run-a", Some("node-b"), "Failed"),
            ]),
        ),
        (
            "run-b".to_owned(),
            ok(&[pod("run-b-pod", "run-b", Some("node-b"), "Running")]),
        ),
        ("run-none".to_owned(), ok(&[])),
        (
            "run-two".to_owned(),
            ok(&[
                pod("run-two-1", "run-two", Some("node-a"), "Running"),
                pod("run-two-2", "run-two", Some("node-a"), "Pending"),
            ]),
        ),
        (
            "run-pending".to_owned(),
            ok(&[pod("run-pending-pod", "run-pending", None, "Pending")]),
        ),
        (
            "run-down".to_owned(),
            (
                500,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "message": "etcdserver: request timed out", "code": 500})
                .to_string(),
            ),
        ),
    ])
}

/// A loopback API server answering `TokenReview`s from [`known_tokens`] and pod lists from
/// `pods` (shared so a test can change an answer), for the broker's own token only.
fn api_server(pods: Arc<Mutex<HashMap<String, (u16, String)>>>) -> impl Fn(&Seen) -> (u16, String) {
    let tokens = known_tokens();
    move |seen| {
        if seen.authorization.as_deref() != Some(format!("Bearer {BROKER_TOKEN}").as_str()) {
            return (401, json!({"kind": "Status", "code": 401}).to_string());
        }
        if seen.method == "POST" && seen.path == REVIEWS {
            let review: Value = serde_json::from_slice(&seen.body).expect("review JSON");
            let token = review["spec"]["token"].as_str().unwrap_or_default();
            let status = match tokens.get(token) {
                Some((user, node)) => review_status(user, node.as_deref()),
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            let mut answer = review.clone();
            answer["status"] = status;
            return (201, answer.to_string());
        }
        if seen.method == "GET"
            && let Some(namespace) = seen
                .path
                .strip_prefix("/api/v1/namespaces/")
                .and_then(|rest| rest.strip_suffix("/pods"))
        {
            // The selector is form-encoded: `paddock.dev/run=<run>`.
            let query = seen.query.as_deref().unwrap_or_default();
            let Some(run) = query.strip_prefix("labelSelector=paddock.dev%2Frun%3D") else {
                return (400, format!("unexpected query {query:?}"));
            };
            if namespace != "team-a" {
                return (200, pod_list(&[]));
            }
            return pods
                .lock()
                .expect("pods")
                .get(run)
                .cloned()
                .unwrap_or_else(|| (200, pod_list(&[])));
        }
        (404, "{}".to_owned())
    }
}

fn pods_path() -> &'static str {
    "/api/v1/namespaces/team-a/pods"
}

struct Api {
    server: TestServer,
    pods: Arc<Mutex<HashMap<String, (u16, String)>>>,
    _dir: tempfile::TempDir,
    token_file: std::path::PathBuf,
}

async fn api() -> Api {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, BROKER_TOKEN).expect("token");
    let pods = Arc::new(Mutex::new(recorded_pods()));
    let server = TestServer::start(api_server(Arc::clone(&pods))).await;
    Api {
        server,
        pods,
        _dir: dir,
        token_file,
    }
}

impl Api {
    fn config(&self) -> TokenReviewConfig {
        let mut config = TokenReviewConfig::new(self.server.url());
        config.token_file.clone_from(&self.token_file);
        config.scopes.insert(
            "paddock-system/paddock-node".into(),
            BTreeSet::from([
                Scope::NodeAgent,
                Scope::ValidateEgress,
                Scope::SubstituteAuth,
            ]),
        );
        config.scopes.insert(
            "team-a/builder".into(),
            BTreeSet::from([Scope::ValidateEgress]),
        );
        config
    }
}

#[tokio::test]
async fn review_node_name_extra_binds_a_node_agent() {
    let api = api().await;
    let auth = TokenReviewAuthenticator::new(api.config()).expect("config");

    let id = auth
        .authenticate("agent-on-node-a")
        .await
        .expect("node agent");
    assert_eq!(id.subject, NODE_AGENT_SA);
    assert_eq!(id.node.as_deref(), Some("node-a"));
    assert!(id.is_node_agent());
    assert!(!id.may_act_in("paddock-system"), "no namespace authority");

    // No node-name extra (a token that is not pod-bound, or Kubernetes < 1.30): refused.
    let err = auth
        .authenticate("agent-unbound")
        .await
        .expect_err("unbound node agent");
    let AuthError::Forbidden(reason) = &err else {
        panic!("expected Forbidden, got {err:?}");
    };
    assert!(
        reason.contains("not bound to a node") && reason.contains("1.30"),
        "{reason}"
    );
    // Two node names are no node.
    assert!(matches!(
        auth.authenticate("agent-two-nodes").await,
        Err(AuthError::Forbidden(_))
    ));
    // Refusals are not cached as identities: the next call reviews again and refuses again.
    let before = api.server.hits(REVIEWS);
    assert!(matches!(
        auth.authenticate("agent-unbound").await,
        Err(AuthError::Forbidden(_))
    ));
    assert_eq!(api.server.hits(REVIEWS), before + 1);

    // Any other account keeps its namespace rules; the node it carries gives it nothing.
    let id = auth
        .authenticate("builder-on-node-b")
        .await
        .expect("builder");
    assert!(!id.is_node_agent());
    assert_eq!(id.node.as_deref(), Some("node-b"));
    assert!(id.may_act_in("team-a"));
    assert!(!id.may_act_in("team-b"));
}

#[tokio::test]
async fn node_agent_scope_combines_only_with_its_two_calls() {
    let api = api().await;
    for extra in [
        Scope::Issue,
        Scope::Controller,
        Scope::Revoke,
        Scope::LeasesRead,
    ] {
        let mut config = api.config();
        config
            .scopes
            .get_mut("paddock-system/paddock-node")
            .expect("key")
            .insert(extra);
        assert!(
            matches!(
                TokenReviewAuthenticator::new(config),
                Err(TokenReviewConfigError::NodeAgentScopes(_))
            ),
            "{extra:?}"
        );
    }
}

#[tokio::test]
async fn pod_locator_reads_recorded_pod_lists() {
    let api = api().await;
    let auth = TokenReviewAuthenticator::new(api.config()).expect("config");
    let pods = auth.pod_locator();

    let placed = pods.locate("team-a", "run-a").await.expect("run-a");
    assert_eq!(placed.node, "node-a");
    assert_eq!(placed.pod, "run-a-pod");
    assert_eq!(api.server.hits(pods_path()), 1);
    // A placed pod is remembered: no second round trip.
    pods.locate("team-a", "run-a").await.expect("cached");
    assert_eq!(api.server.hits(pods_path()), 1);

    assert_eq!(
        pods.locate("team-a", "run-b").await.map(|p| p.node),
        Ok("node-b".to_owned())
    );
    assert!(matches!(
        pods.locate("team-a", "run-none").await,
        Err(PlacementError::NoPod { .. })
    ));
    assert!(matches!(
        pods.locate("team-a", "run-two").await,
        Err(PlacementError::ManyPods { count: 2, .. })
    ));
    assert!(matches!(
        pods.locate("team-a", "run-pending").await,
        Err(PlacementError::NotScheduled { .. })
    ));
    // Names that are not label values never reach a URL.
    let hits = api.server.hits(pods_path());
    assert!(matches!(
        pods.locate("team-a", "run-a&labelSelector=x").await,
        Err(PlacementError::InvalidName { .. })
    ));
    assert!(matches!(
        pods.locate("../team-a", "run-a").await,
        Err(PlacementError::InvalidName { .. })
    ));
    assert_eq!(api.server.hits(pods_path()), hits);

    // An API server error is Unavailable and not remembered: once it answers, the run is
    // placed.
    for _ in 0..2 {
        assert!(matches!(
            pods.locate("team-a", "run-down").await,
            Err(PlacementError::Unavailable(_))
        ));
    }
    assert_eq!(api.server.hits(pods_path()), hits + 2);
    api.pods.lock().expect("pods").insert(
        "run-down".into(),
        (
            200,
            pod_list(&[pod("run-down-pod", "run-down", Some("node-a"), "Running")]),
        ),
    );
    assert_eq!(
        pods.locate("team-a", "run-down").await.map(|p| p.node),
        Ok("node-a".to_owned())
    );

    // The broker's own credentials are refused: Unavailable, with the RBAC hint.
    std::fs::write(&api.token_file, "some-other-token").expect("token");
    let err = pods
        .locate("team-a", "run-b-uncached")
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, PlacementError::Unavailable(r) if r.contains("list")),
        "{err:?}"
    );
}

/// A broker built from a config file (static keys for the controller and team-a, the
/// `TokenReview` backend naming a node-agent account) over HTTPS, with its API server.
struct Stack {
    dir: tempfile::TempDir,
    ca: CertificateDer<'static>,
    handle: Handle,
    api: Api,
}

impl Stack {
    async fn start() -> Stack {
        let api = api().await;
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
        let pki = common::pki();
        let (root_cert, root_key) = paddock_broker::node_ca::generate_root(
            "test cluster root",
            std::time::Duration::from_hours(24),
        )
        .expect("root");
        paddock_broker::node_ca::write_root(&p("root"), &root_cert, &root_key).expect("root");
        std::fs::write(p("tls.crt"), pem("CERTIFICATE", &pki.server_chain[0])).expect("cert");
        std::fs::write(
            p("tls.key"),
            pem("PRIVATE KEY", pki.server_key.secret_pkcs8_der()),
        )
        .expect("key");
        let doc = json!({
            "listen": "127.0.0.1:0",
            "tls": {"cert": p("tls.crt"), "key": p("tls.key")},
            "database": p("broker.db"),
            "policy": p("policy.yaml"),
            "policyPollSeconds": 0,
            "audit": {"path": p("audit.jsonl"), "fsync": false},
            "nodeCa": {
                "certFile": p("root/ca.crt"),
                "keyFile": p("root/ca.key"),
                "lifetimeSecs": 3600,
            },
            "auth": {
                "staticKeys": {"file": p("keys")},
                "tokenReview": {
                    "apiServer": api.server.url(),
                    "tokenFile": api.token_file,
                    "scopes": {
                        "paddock-system/paddock-node":
                            ["broker:node-agent", "broker:validate-egress",
                             "broker:substitute-auth"],
                    },
                    "podCacheTtl": "30s",
                },
            },
        });
        let yaml = serde_yaml_ng::to_string(&doc).expect("yaml");
        std::fs::write(p("broker.yaml"), yaml).expect("config");
        let config = Config::load(&p("broker.yaml")).expect("config loads");
        let built = tokio::task::spawn_blocking(move || config::build(&config))
            .await
            .expect("build task")
            .expect("config builds");
        let handle = server::spawn(built.options).await.expect("spawn");
        let stack = Stack {
            dir,
            ca: pki.ca_der,
            handle,
            api,
        };
        for run in [
            "run-a",
            "run-b",
            "run-none",
            "run-two",
            "run-pending",
            "run-down",
        ] {
            let (status, v) = stack
                .post(
                    "/v1/runs",
                    CONTROLLER_KEY,
                    &json!({"run": run, "namespace": "team-a", "template": "t",
                            "phase": "Running"}),
                )
                .await;
            assert_eq!(status, 200, "{v}");
        }
        stack
    }

    async fn post(&self, path: &str, bearer: &str, body: &Value) -> (u16, Value) {
        common::tls_json(
            self.handle.addr,
            &self.ca,
            &common::post_request(path, bearer, &body.to_string()),
        )
        .await
    }

    /// A node agent's call for `run`, naming the run's pod (as the node agent does).
    async fn egress(&self, bearer: &str, run: &str) -> (u16, Value) {
        self.egress_from(bearer, run, &pod_uid(run)).await
    }

    async fn egress_from(&self, bearer: &str, run: &str, pod: &str) -> (u16, Value) {
        self.post(
            "/v1/validate-egress",
            bearer,
            &json!({"run": run, "pod": pod, "host": "api.github.com", "port": 443}),
        )
        .await
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .expect("audit")
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line"))
            .collect()
    }
}

#[tokio::test]
async fn node_agent_over_https_acts_only_for_pods_on_its_node() {
    let stack = Stack::start().await;

    // Pod of run-a on node-a: the agent of node-a may, the agent of node-b may not.
    let (status, v) = stack.egress("agent-on-node-a", "run-a").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["allowed"], json!(true), "{v}");
    let (status, v) = stack.egress("agent-on-node-b", "run-a").await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["code"], "Forbidden");
    let (status, v) = stack.egress("agent-on-node-b", "run-b").await;
    assert_eq!(status, 200, "{v}");
    let (status, _) = stack.egress("agent-on-node-a", "run-b").await;
    assert_eq!(status, 403);
    // The right node but not the run's pod (a pod of another namespace with the run's label),
    // or no pod named: refused.
    let (status, v) = stack
        .egress_from(
            "agent-on-node-a",
            "run-a",
            "0badc0de-0000-4000-8000-000000000000",
        )
        .await;
    assert_eq!(status, 403, "{v}");
    let (status, v) = stack
        .post(
            "/v1/validate-egress",
            "agent-on-node-a",
            &json!({"run": "run-a", "host": "api.github.com", "port": 443}),
        )
        .await;
    assert_eq!(status, 403, "{v}");

    // The same rule on substitute-auth.
    let sub = |run: &str| {
        json!({"run": run, "pod": pod_uid(run), "host": "api.github.com", "port": 443, "transport": "tls",
               "method": "GET", "path": "/user", "headers": []})
    };
    let (status, v) = stack
        .post("/v1/substitute-auth", "agent-on-node-a", &sub("run-a"))
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = stack
        .post("/v1/substitute-auth", "agent-on-node-a", &sub("run-b"))
        .await;
    assert_eq!(status, 403, "{v}");

    // No node-name extra in the review: refused before any pod lookup.
    let (status, v) = stack.egress("agent-unbound", "run-a").await;
    assert_eq!(status, 403, "{v}");

    // No pod, two pods, a pod not scheduled yet: refused.
    for run in ["run-none", "run-two", "run-pending"] {
        let (status, v) = stack.egress("agent-on-node-a", run).await;
        assert_eq!(status, 403, "{run}: {v}");
    }
    // An unregistered run: refused like for anyone else, with no pod lookup.
    let hits = stack.api.server.hits(pods_path());
    let (status, _) = stack.egress("agent-on-node-a", "run-unknown").await;
    assert_eq!(status, 403);
    assert_eq!(stack.api.server.hits(pods_path()), hits);

    // The API server failing is 503, every time (not cached), never an allow.
    for _ in 0..2 {
        let (status, v) = stack.egress("agent-on-node-a", "run-down").await;
        assert_eq!(status, 503, "{v}");
        assert_eq!(v["code"], "Unavailable");
    }
    assert_eq!(stack.api.server.hits(pods_path()), hits + 2);

    // Node agents get nothing beyond these two calls.
    let (status, v) = stack
        .post(
            "/v1/issue",
            "agent-on-node-a",
            &json!({"run": "run-a", "credential": "gh"}),
        )
        .await;
    assert_eq!(status, 403, "{v}");

    // Callers that are not node agents keep their namespace rules and cost no pod lookup.
    let hits = stack.api.server.hits(pods_path());
    let (status, v) = stack.egress(TEAM_A_KEY, "run-b").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(stack.api.server.hits(pods_path()), hits);

    // Every refusal of a registered run is audited with its reason.
    let denials: Vec<Value> = stack
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "node-agent-denied")
        .collect();
    let reason_for = |run: &str| -> Vec<String> {
        denials
            .iter()
            .filter(|e| e["run"] == run)
            .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert!(
        reason_for("run-a")
            .iter()
            .any(|r| r.contains("runs on node node-a, not on the caller's node node-b")),
        "{denials:?}"
    );
    assert!(reason_for("run-none")[0].contains("no running pod"));
    assert!(reason_for("run-two")[0].contains("exactly one"));
    assert!(reason_for("run-pending")[0].contains("not scheduled"));
    assert_eq!(reason_for("run-down").len(), 2);
    assert!(
        denials
            .iter()
            .all(|e| e["caller"] == NODE_AGENT_SA && e["namespace"] == "team-a"),
        "{denials:?}"
    );
}

/// A CSR for `cn` and its key, as the node agent makes it.
fn node_csr(cn: &str) -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, cn);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    (key, csr)
}

#[tokio::test]
async fn node_ca_is_issued_only_to_node_agents_for_their_own_node() {
    let stack = Stack::start().await;
    let root = std::fs::read_to_string(stack.dir.path().join("root/ca.crt")).expect("root");

    let (key, csr) = node_csr("node-a");
    let (status, v) = stack
        .post(
            "/v1/node-ca",
            "agent-on-node-a",
            &json!({"node": "node-a", "csr": csr}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["root"],
        json!(root),
        "the answer names the configured root"
    );
    let not_after = v["not_after"].as_u64().expect("not_after");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(
        (now + 3590..=now + 3610).contains(&not_after),
        "{not_after} vs {now}"
    );
    // The intermediate is for this key and node, and chains to the root.
    let cert_pem = v["certificate"].as_str().expect("certificate");
    let (_, pem_block) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).expect("pem");
    let cert = pem_block.parse_x509().expect("x509");
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    assert!(
        cert.subject().to_string().contains("CN=node-a"),
        "{}",
        cert.subject()
    );
    let (_, root_block) = x509_parser::pem::parse_x509_pem(root.as_bytes()).expect("root pem");
    let root_x509 = root_block.parse_x509().expect("root x509");
    cert.verify_signature(Some(root_x509.public_key()))
        .expect("signed by the root");

    // Another node's name, in the request or only in the CSR: refused.
    let (_, csr_b) = node_csr("node-b");
    for body in [
        json!({"node": "node-b", "csr": csr_b}),
        json!({"node": "node-a", "csr": csr_b}),
    ] {
        let (status, v) = stack.post("/v1/node-ca", "agent-on-node-a", &body).await;
        assert_eq!(status, 403, "{v}");
        assert_eq!(v["code"], "Forbidden");
    }
    // Not node agents (no broker:node-agent scope), or a node agent without a bound node.
    for bearer in [
        TEAM_A_KEY,
        CONTROLLER_KEY,
        "builder-on-node-b",
        "agent-unbound",
    ] {
        let (status, v) = stack
            .post(
                "/v1/node-ca",
                bearer,
                &json!({"node": "node-b", "csr": csr_b}),
            )
            .await;
        assert_eq!(status, 403, "{bearer}: {v}");
    }
    let (status, v) = stack
        .post(
            "/v1/node-ca",
            "agent-on-node-a",
            &json!({"node": "node-a", "csr": "garbage"}),
        )
        .await;
    assert_eq!(status, 400, "{v}");

    // Every issuance and refusal of a node agent is audited; no certificate or key is.
    let audit = stack.audit();
    let issued: Vec<&Value> = audit
        .iter()
        .filter(|e| e["event"] == "node-ca-issued")
        .collect();
    assert_eq!(issued.len(), 1, "{audit:?}");
    assert_eq!(issued[0]["node"], "node-a");
    assert_eq!(issued[0]["caller"], NODE_AGENT_SA);
    assert_eq!(issued[0]["expires_at"], json!(not_after));
    assert_eq!(issued[0]["serial"].as_str().map(str::len), Some(32));
    let denied: Vec<&Value> = audit
        .iter()
        .filter(|e| e["event"] == "node-ca-denied")
        .collect();
    assert_eq!(
        denied.len(),
        3,
        "two wrong nodes and one bad CSR: {denied:?}"
    );
    assert!(
        denied[0]["reason"]
            .as_str()
            .expect("reason")
            .contains("bound to \"node-a\"")
    );
    let text = std::fs::read_to_string(stack.dir.path().join("audit.jsonl")).expect("audit");
    assert!(!text.contains("BEGIN"), "no PEM in the audit trail");
}

impl Stack {
    /// `GET /v1/node-ca/crl`: (status, content type, body).
    async fn crl(&self, bearer: &str) -> (u16, String, Vec<u8>) {
        let request = format!(
            "GET /v1/node-ca/crl HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {bearer}\r\nConnection: close\r\n\r\n"
        );
        let (status, head, body) = common::tls_raw(self.handle.addr, &self.ca, &request).await;
        let content_type = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-type:")
                    .map(|v| v.trim().to_owned())
            })
            .unwrap_or_default();
        (status, content_type, body)
    }

    /// The serials a CRL from this broker lists, after checking the root signed it.
    fn crl_serials(&self, der: &[u8]) -> Vec<String> {
        let root = std::fs::read_to_string(self.dir.path().join("root/ca.crt")).expect("root");
        let (_, root_block) = x509_parser::pem::parse_x509_pem(root.as_bytes()).expect("pem");
        let root = root_block.parse_x509().expect("root x509");
        let (_, crl) = x509_parser::parse_x509_crl(der).expect("a DER CRL");
        crl.verify_signature(root.public_key())
            .expect("signed by the root");
        assert_eq!(crl.issuer(), root.subject());
        crl.iter_revoked_certificates()
            .map(|r| hex::encode(r.raw_serial()))
            .collect()
    }

    async fn issue_node_ca(&self, bearer: &str, node: &str) -> (u16, Value) {
        let (_, csr) = node_csr(node);
        self.post("/v1/node-ca", bearer, &json!({"node": node, "csr": csr}))
            .await
    }
}

fn serial_of(cert_pem: &str) -> String {
    let (_, block) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).expect("pem");
    hex::encode(block.parse_x509().expect("x509").raw_serial())
}

/// Revocation as an operator does it (`paddock-broker ca revoke`, on the broker's database):
/// the CRL node agents read lists a revoked intermediate at once; a barred node gets no new
/// one (403, audited) until the bar is lifted; only node agents read the list.
#[tokio::test]
async fn revoked_intermediates_are_listed_and_a_barred_node_gets_none() {
    let stack = Stack::start().await;
    let (status, first) = stack.issue_node_ca("agent-on-node-a", "node-a").await;
    assert_eq!(status, 200, "{first}");
    let first = serial_of(first["certificate"].as_str().expect("certificate"));
    let (status, second) = stack.issue_node_ca("agent-on-node-a", "node-a").await;
    assert_eq!(status, 200, "{second}");
    let second = serial_of(second["certificate"].as_str().expect("certificate"));

    let (status, content_type, body) = stack.crl("agent-on-node-a").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(content_type, "application/pkix-crl");
    assert!(stack.crl_serials(&body).is_empty(), "nothing revoked yet");
    for bearer in [TEAM_A_KEY, CONTROLLER_KEY] {
        let (status, _, _) = stack.crl(bearer).await;
        assert_eq!(status, 403, "{bearer} is no node agent");
    }

    // Another process (the CLI) writes the revocations into the same database.
    let db = paddock_broker::store::Store::open(&stack.dir.path().join("broker.db")).expect("db");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(
        db.revoke_node_ca(&first, now, "key copied")
            .expect("revoke")
    );
    let (_, _, body) = stack.crl("agent-on-node-a").await;
    assert_eq!(stack.crl_serials(&body), std::slice::from_ref(&first));
    // One revoked serial does not bar the node: a renewal is still issued.
    let (status, v) = stack.issue_node_ca("agent-on-node-a", "node-a").await;
    assert_eq!(status, 200, "{v}");
    let third = serial_of(v["certificate"].as_str().expect("certificate"));

    let mut barred = db
        .block_node("node-a", now, "node compromised")
        .expect("bar");
    barred.sort();
    let mut want = vec![second.clone(), third.clone()];
    want.sort();
    assert_eq!(
        barred, want,
        "every live intermediate of the node is revoked"
    );
    let (status, v) = stack.issue_node_ca("agent-on-node-a", "node-a").await;
    assert_eq!(status, 403, "{v}");
    assert!(
        v["message"].as_str().unwrap_or_default().contains("barred"),
        "{v}"
    );
    let (_, _, body) = stack.crl("agent-on-node-a").await;
    let mut listed = stack.crl_serials(&body);
    listed.sort();
    let mut all = vec![first, second, third];
    all.sort();
    assert_eq!(listed, all);
    // Other nodes are untouched.
    let (status, v) = stack.issue_node_ca("agent-on-node-b", "node-b").await;
    assert_eq!(status, 200, "{v}");

    let denied: Vec<Value> = stack
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "node-ca-denied")
        .collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert!(
        denied[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("node compromised"),
        "{denied:?}"
    );

    assert!(db.unblock_node("node-a").expect("unblock"));
    let (status, v) = stack.issue_node_ca("agent-on-node-a", "node-a").await;
    assert_eq!(status, 200, "{v}");
}
