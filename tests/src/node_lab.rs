//! A simulated Kubernetes node for `paddock-proxy node`: a node namespace with a bridge (as a
//! CNI bridge plugin leaves it), pods as network namespaces on veths to that bridge (own IPv4
//! and IPv6 addresses, default routes through the node, which forwards), pod cgroups laid out
//! as kubelet does (systemd and cgroupfs drivers) with a container scope below, the real broker
//! and the node agent in the node namespace, and an upstream host reachable through the node.
//!
//! Because the node forwards, a pod's connection that escaped interception would reach the
//! upstream host: a refused connection is the node agent's doing, not the topology's.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use paddock_proxy::broker::BrokerClient;
use paddock_proxy::pod_cgroup::{CgroupDriver, PodUid, QosClass, pod_cgroup_relpath};
use paddock_wire::api::{IssueRequest, RunPhase, RunUpsertRequest};

use crate::{
    CgroupGuard, Netns, PinDir,
    broker_lab::{BrokerProcess, add_static_key, broker_call},
    echo_api::EchoApi,
    netns::ip,
    process::{Placement, place, run, target_bin},
    proxied::{DnsResponder, Nginx, make_upstream_certs, path_str, scratch},
    pyserver::PyServer,
};

/// A stand-in for the API server's pod endpoints: `GET /api/v1/pods` answers the pod list in
/// the file it is given (read per request), a watch stays open without events (the list is
/// the whole truth here), anything else is 404.
const KUBE_API: &str = r#"
import http.server, json, sys, time, urllib.parse
addr, port, pods = sys.argv[1], int(sys.argv[2]), sys.argv[5]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        u = urllib.parse.urlsplit(self.path)
        q = urllib.parse.parse_qs(u.query)
        if u.path != "/api/v1/pods" or q.get("fieldSelector") != ["spec.nodeName=node-test"]:
            self.send_response(404); self.send_header("content-length", "0"); self.end_headers(); return
        if q.get("watch") == ["true"]:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers(); self.wfile.flush()
            time.sleep(20)
            self.wfile.write(b"0\r\n\r\n"); return
        with open(pods) as f: items = json.load(f)
        body = json.dumps({"apiVersion": "v1", "kind": "PodList",
                           "metadata": {"resourceVersion": "1"}, "items": items}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer((addr, int(port)), H).serve_forever()
"#;
const KUBE_API_ADDR: &str = "127.0.0.1:16443";
/// A stand-in for the API server's `TokenReview` endpoint (plain HTTP on loopback, which the
/// broker allows for loopback only): `NODE_CA_TOKEN` is a pod-bound token of
/// `paddock-node/paddock-node` on node `node-test`, `OTHER_NODE_TOKEN` the same account's
/// token bound to `node-other`; anything else is not authenticated.
const TOKEN_REVIEW: &str = r#"
import http.server, json, sys, urllib.parse
addr, port, placements = sys.argv[1], int(sys.argv[2]), sys.argv[5]
NODES = {"node-ca-token-test": "node-test", "node-ca-token-other": "node-other"}
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        u = urllib.parse.urlsplit(self.path)
        sel = urllib.parse.parse_qs(u.query).get("labelSelector", [""])[0]
        parts = u.path.strip("/").split("/")
        if len(parts) != 5 or parts[:3] != ["api", "v1", "namespaces"] or parts[4] != "pods" \
                or not sel.startswith("paddock.dev/run="):
            self.send_response(404); self.send_header("content-length", "0"); self.end_headers(); return
        run = sel.split("=", 1)[1]
        with open(placements) as f: known = json.load(f)
        items = [{"metadata": {"name": p["name"], "uid": p["uid"],
                               "labels": {"paddock.dev/run": run}},
                  "spec": {"nodeName": p["node"]}, "status": {"phase": "Running"}}
                 for p in known.get(parts[3] + "/" + run, [])]
        out = json.dumps({"apiVersion": "v1", "kind": "PodList", "items": items}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers(); self.wfile.write(out)
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
        spec = body.get("spec", {})
        node = NODES.get(spec.get("token"))
        status = {"authenticated": False}
        if self.path == "/apis/authentication.k8s.io/v1/tokenreviews" and node:
            status = {"authenticated": True, "audiences": spec.get("audiences", []),
                      "user": {"username": "system:serviceaccount:paddock-node:paddock-node",
                               "extra": {"authentication.kubernetes.io/node-name": [node],
                                         "authentication.kubernetes.io/pod-name": ["paddock-node-x"]}}}
        out = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                          "status": status}).encode()
        self.send_response(201)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers(); self.wfile.write(out)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer((addr, port), H).serve_forever()
"#;
const TOKEN_REVIEW_ADDR: &str = "127.0.0.1:16444";
/// The loopback port of every lab pod's interactive adapter (`node-pods add --adapter-port`).
pub const ADAPTER_PORT: u16 = 8765;
/// The node agent's token for `POST /v1/node-ca` (bound to `node-test`).
pub const NODE_CA_TOKEN: &str = "node-ca-token-test";
/// The same account's token, bound to another node.
pub const OTHER_NODE_TOKEN: &str = "node-ca-token-other";
/// The CNI network the pods get from Debian's bridge + host-local plugins.
pub const CNI_SUBNET: &str = "10.89.0.0/24";

pub const NAMESPACE: &str = "team";
pub const HOST_A: &str = "a.paddock.test";
pub const HOST_B: &str = "b.paddock.test";
pub const SECRET_A: &str = "real-secret-for-host-a-51f0";
pub const SECRET_B: &str = "real-secret-for-host-b-9c2e";
/// The upstream host, behind the node.
pub const UPSTREAM_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const NODE_UPLINK_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The node's bridge address: the pods' gateway and resolver.
pub const BRIDGE_V4: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// The lab's broker (in the node namespace).
pub const BROKER: &str = "127.0.0.1:18443";
/// The second broker replica of node-CA labs (same database).
pub const BROKER_REPLICA: &str = "127.0.0.2:18443";
/// The node agent's resolver (in the node namespace).
const NODE_DNS: &str = "127.0.0.1:5353";
const NOBODY: u32 = 65534;

/// One simulated pod: its namespace, kubelet cgroup and container scope.
#[derive(Debug)]
pub struct Pod {
    pub index: u32,
    pub uid: PodUid,
    pub run: String,
    pub driver: CgroupDriver,
    pub netns: Netns,
    /// The container's cgroup (below the pod cgroup), where its processes go.
    pub container: CgroupGuard,
    pub pod_cgroup: PathBuf,
    pub placeholder: String,
}

/// A pod as a container runtime has it when it calls CNI ADD: an empty network namespace,
/// its kubelet cgroup, its run registered with the broker (agent pods) and, when `listed`,
/// present in the API server's pod list.
#[derive(Debug)]
pub struct CniPod {
    pub uid: PodUid,
    pub name: String,
    pub run: Option<String>,
    pub netns: Netns,
    pub container: CgroupGuard,
    pub container_id: String,
    pub placeholder: Option<String>,
}

/// The node.
pub struct NodeLab {
    // Drop order: agent, broker, servers, pods, namespaces, cgroups, pins, files.
    pub agent: Option<Child>,
    /// The API server's recorded answers (the CNI flow's pod source).
    kube_api: Option<PyServer>,
    pub broker: BrokerProcess,
    /// The second broker replica (node-CA labs only), at [`BROKER_REPLICA`].
    pub replica: Option<BrokerProcess>,
    /// The upstream host: the request-logging API (tests) or nginx (benchmarks).
    pub api: Option<EchoApi>,
    pub nginx: Option<Nginx>,
    _dns: DnsResponder,
    pub pods: Vec<Pod>,
    pub cni_pods: Vec<CniPod>,
    pub node: Netns,
    pub upstream: Netns,
    /// The kubelet cgroup root of this node (`.../kubepods.slice`, `.../kubepods` below it).
    pub kubelet: CgroupGuard,
    pub pins: PinDir,
    pub dir: tempfile::TempDir,
    /// World-readable: the node CA for the pods' non-root clients.
    pub public: tempfile::TempDir,
    controller_key: String,
    /// A person driving the runs: `broker:interact`, `broker:attach`, `broker:end` and
    /// `broker:shell` in the pods' namespace (its key is in `operator.key`).
    pub operator_key: String,
    bridge: String,
    /// `tls.mode = "broker"`: the node agent forges with a per-node intermediate from the
    /// broker (see [`NodeLab::with_node_ca`]); `None`: a CA generated into `ca_dir`.
    node_ca: Option<PyServer>,
}

impl std::fmt::Debug for NodeLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLab")
            .field("dir", &self.dir.path())
            .field("pods", &self.pods.len())
            .finish_non_exhaustive()
    }
}

/// Runs 0, 2, 4, ... may reach host A with credential `api-a`; runs 1, 3, ... host B with
/// `api-b`.
fn policy(dir: &Path, runs: u32) -> String {
    // An empty `runs` list would apply the document to every run: name one that never exists.
    let list = |parity: u32| {
        let names: Vec<_> = (0..runs)
            .filter(|i| i % 2 == parity)
            .map(|i| format!("run-{i}"))
            .collect();
        if names.is_empty() {
            "no-such-run".to_owned()
        } else {
            names.join(", ")
        }
    };
    let doc = |name: &str, runs: String, host: &str, secret: &str| {
        format!(
            r#"apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {{name: {name}}}
spec:
  appliesTo: {{namespaces: [{NAMESPACE}], runs: [{runs}]}}
  credentials:
    - name: {name}
      provider: {{kind: user-secret, inject: {{header: {{name: Authorization, prefix: "Bearer "}}}}}}
      secret: {{file: {secret}}}
      hosts: [{host}]
  egress:
    - {{hosts: [{host}], ports: [443], substituteAuth: true}}
"#,
            secret = dir.join(secret).display()
        )
    };
    format!(
        "{}---\n{}",
        doc("api-a", list(0), HOST_A, "secret-a.txt"),
        doc("api-b", list(1), HOST_B, "secret-b.txt")
    )
}

impl NodeLab {
    /// A node with `pods` pods, their runs registered with the broker, each with a placeholder
    /// of its own credential; the node agent started and told about every pod (as the CNI
    /// step would, before any process runs in the pod).
    #[must_use]
    pub fn new(pods: u32) -> Self {
        let mut lab = Self::base(pods, false);
        for i in 0..pods {
            let pod = lab.make_pod(i);
            lab.pods.push(pod);
        }
        lab.start_agent();
        for i in 0..lab.pods.len() {
            lab.add_pod(i).expect("add pod");
        }
        lab
    }

    /// Like [`NodeLab::new`], but no CA is on the node: the broker holds a cluster root
    /// (made with `paddock-broker ca init`) and issues the node agent a short-lived
    /// intermediate for `node-test` on a `POST /v1/node-ca` authenticated by a `TokenReview`
    /// (a loopback stand-in for the API server answers it as Kubernetes >= 1.30 does for a
    /// pod-bound token: with the `authentication.kubernetes.io/node-name` extra). The pods'
    /// `ca.crt` is the root only.
    #[must_use]
    pub fn with_node_ca(pods: u32) -> Self {
        let mut lab = Self::base_with(pods, false, true);
        for i in 0..pods {
            let pod = lab.make_pod(i);
            lab.pods.push(pod);
        }
        lab.start_agent();
        for i in 0..lab.pods.len() {
            lab.add_pod(i).expect("add pod");
        }
        lab
    }

    /// The node without pods or node agent; the policy knows runs `run-0..run-{runs}`.
    #[must_use]
    fn base(pods: u32, nginx: bool) -> Self {
        Self::base_with(pods, nginx, false)
    }

    #[must_use]
    #[expect(
        clippy::too_many_lines,
        reason = "one linear set-up of the node's parts; the order is the point"
    )]
    fn base_with(pods: u32, nginx: bool, node_ca: bool) -> Self {
        let dir = scratch();
        let d = dir.path();
        let public = tempfile::Builder::new()
            .prefix("pdk-node-pub-")
            .tempdir()
            .expect("public dir");
        std::fs::set_permissions(public.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        make_upstream_certs(d, &[HOST_A, HOST_B]);
        let broker_dir = d.join("broker");
        std::fs::create_dir(&broker_dir).expect("broker dir");
        make_upstream_certs(
            &broker_dir,
            &["broker.paddock.test", "127.0.0.1", "127.0.0.2"],
        );
        std::fs::write(d.join("secret-a.txt"), SECRET_A).expect("secret");
        std::fs::write(d.join("secret-b.txt"), SECRET_B).expect("secret");
        std::fs::write(d.join("policy.yaml"), policy(d, pods)).expect("policy");
        let keys = d.join("keys");
        let add_key = |id: &str, scopes: &[&str]| add_static_key(&keys, NAMESPACE, id, scopes);
        let controller_key = add_key(
            "controller",
            &["broker:controller", "broker:issue", "broker:revoke"],
        );
        let agent_key = add_key(
            "node-agent",
            &["broker:validate-egress", "broker:substitute-auth"],
        );
        std::fs::write(d.join("agent.token"), &agent_key).expect("agent token");
        let operator_key = add_key(
            "operator",
            &[
                "broker:interact",
                "broker:attach",
                "broker:end",
                "broker:shell",
            ],
        );
        std::fs::write(d.join("operator.key"), &operator_key).expect("operator key");
        std::fs::write(d.join("placements.json"), "{}").expect("placements");
        let mut broker_cfg = serde_json::json!({
            "listen": BROKER,
            "tls": {"cert": broker_dir.join("server.crt"), "key": broker_dir.join("server.key")},
            "database": d.join("broker.db"),
            "policy": d.join("policy.yaml"),
            "audit": {"path": d.join("broker-audit.jsonl")},
            "auth": {"staticKeys": {"file": keys}},
        });
        if node_ca {
            let out = Command::new(target_bin("paddock-broker"))
                .args(["ca", "init", "--out"])
                .arg(d.join("root"))
                .output()
                .expect("paddock-broker ca init");
            assert!(out.status.success(), "ca init: {out:?}");
            std::fs::write(d.join("broker-sa.token"), "broker-own-token").expect("token");
            std::fs::write(d.join("node-ca.token"), NODE_CA_TOKEN).expect("token");
            broker_cfg["nodeCa"] = serde_json::json!({
                "certFile": d.join("root/ca.crt"),
                "keyFile": d.join("root/ca.key"),
                "lifetimeSecs": 600,
            });
            broker_cfg["auth"]["tokenReview"] = serde_json::json!({
                "apiServer": format!("http://{TOKEN_REVIEW_ADDR}"),
                "tokenFile": d.join("broker-sa.token"),
                "scopes": {"paddock-node/paddock-node": ["broker:node-agent"]},
            });
        }
        std::fs::write(d.join("broker.yaml"), broker_cfg.to_string()).expect("broker.yaml");
        // A second replica on the same database (node-CA labs): node agents keep a tunnel to
        // each, and a person may reach either.
        broker_cfg["listen"] = BROKER_REPLICA.into();
        std::fs::write(d.join("broker-replica.yaml"), broker_cfg.to_string())
            .expect("broker-replica.yaml");

        // The node, its uplink to the upstream host, and its pod bridge.
        let node = Netns::new("n");
        let upstream = Netns::new("u");
        let (vn, vu) = (crate::names::unique("vn"), crate::names::unique("vu"));
        ip(&[
            "link",
            "add",
            &vn,
            "netns",
            node.name(),
            "type",
            "veth",
            "peer",
            "name",
            &vu,
            "netns",
            upstream.name(),
        ]);
        node.ip(&["addr", "add", &format!("{NODE_UPLINK_V4}/24"), "dev", &vn]);
        node.ip(&["link", "set", &vn, "up"]);
        upstream.ip(&["addr", "add", &format!("{UPSTREAM_V4}/24"), "dev", &vu]);
        upstream.ip(&["link", "set", &vu, "up"]);
        upstream.ip(&[
            "route",
            "add",
            "10.88.0.0/24",
            "via",
            &NODE_UPLINK_V4.to_string(),
        ]);
        let bridge = crate::names::unique("br");
        node.ip(&["link", "add", &bridge, "type", "bridge"]);
        node.ip(&["addr", "add", &format!("{BRIDGE_V4}/24"), "dev", &bridge]);
        node.ip(&["addr", "add", "fd00:88::1/64", "dev", &bridge, "nodad"]);
        node.ip(&["link", "set", &bridge, "up"]);
        node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
            .expect("netns")
            .expect("ip_forward");

        let dns = DnsResponder::start(
            &node,
            NODE_DNS.parse().expect("addr"),
            vec![
                (HOST_A.to_owned(), UPSTREAM_V4.into()),
                (HOST_B.to_owned(), UPSTREAM_V4.into()),
            ],
        );
        let upstream_addr = SocketAddr::from((UPSTREAM_V4, 443));
        let (api, nginx) = if nginx {
            let location = format!(
                r#"location = /api {{
                if ($http_authorization !~ "^(|Bearer {SECRET_A})$") {{ return 401; }}
                default_type text/plain;
                return 200 "hello from the test host\n";
            }}"#
            );
            let n = Nginx::start_with(
                &upstream,
                d,
                SocketAddr::from(([127, 0, 0, 1], 9)),
                upstream_addr,
                &location,
            );
            (None, Some(n))
        } else {
            (Some(EchoApi::start(&upstream, d, upstream_addr)), None)
        };
        let review = node_ca.then(|| {
            PyServer::start(
                &node,
                d,
                "token_review.py",
                TOKEN_REVIEW,
                TOKEN_REVIEW_ADDR.parse().expect("addr"),
                &[d.join("placements.json").as_os_str()],
            )
        });
        let broker = BrokerProcess::start(&node, &d.join("broker.yaml"));
        let replica = node_ca.then(|| BrokerProcess::start(&node, &d.join("broker-replica.yaml")));
        let kubelet = CgroupGuard::new("node");
        let pins = PinDir::new();
        Self {
            agent: None,
            kube_api: None,
            broker,
            replica,
            api,
            nginx,
            _dns: dns,
            pods: Vec::new(),
            cni_pods: Vec::new(),
            node,
            upstream,
            kubelet,
            pins,
            dir,
            public,
            controller_key,
            operator_key,
            bridge,
            node_ca: review,
        }
    }

    /// Pod `i`: namespace on the bridge, kubelet cgroup (even: systemd, odd: cgroupfs; the
    /// quality-of-service class rotates), its run registered and a placeholder issued.
    fn make_pod(&self, i: u32) -> Pod {
        let uid = PodUid::parse(&format!("6b1d0c2a-1111-4222-8333-{i:012x}")).expect("uid");
        let driver = if i.is_multiple_of(2) {
            CgroupDriver::Systemd
        } else {
            CgroupDriver::Cgroupfs
        };
        let qos = [
            QosClass::Burstable,
            QosClass::Guaranteed,
            QosClass::BestEffort,
        ][(i as usize / 2) % 3];
        let rel = pod_cgroup_relpath(driver, qos, &uid);
        let scope = match driver {
            CgroupDriver::Systemd => format!("cri-containerd-{i:064x}.scope"),
            CgroupDriver::Cgroupfs => format!("{i:064x}"),
        };
        let container = CgroupGuard::nested(&self.kubelet, &rel.join(scope));
        let pod_cgroup = self.kubelet.cgroup().path().join(&rel);
        let netns = Netns::new("p");
        let (host_end, pod_end) = (crate::names::unique("h"), crate::names::unique("e"));
        ip(&[
            "link",
            "add",
            &host_end,
            "netns",
            self.node.name(),
            "type",
            "veth",
            "peer",
            "name",
            &pod_end,
            "netns",
            netns.name(),
        ]);
        self.node
            .ip(&["link", "set", &host_end, "master", &self.bridge]);
        self.node.ip(&["link", "set", &host_end, "up"]);
        let v4 = format!("10.88.0.{}/24", 10 + i);
        let v6 = format!("fd00:88::{:x}/64", 10 + i);
        netns.ip(&["addr", "add", &v4, "dev", &pod_end]);
        netns.ip(&["addr", "add", &v6, "dev", &pod_end, "nodad"]);
        netns.ip(&["link", "set", &pod_end, "up"]);
        netns.ip(&["route", "add", "default", "via", &BRIDGE_V4.to_string()]);
        let run = format!("run-{i}");
        let placeholder = self.register(&run);
        // Where the API server (its stand-in) places the run's pod: this node.
        let placements = self.dir.path().join("placements.json");
        let mut known: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&placements).expect("placements"))
                .expect("placements json");
        known[format!("{NAMESPACE}/{run}")] = serde_json::json!([
            {"name": format!("agent-{i}"), "uid": uid.as_str(), "node": "node-test"}
        ]);
        std::fs::write(&placements, known.to_string()).expect("placements");
        Pod {
            index: i,
            uid,
            run,
            driver,
            netns,
            container,
            pod_cgroup,
            placeholder,
        }
    }

    fn config(&self) -> String {
        let d = self.dir.path();
        format!(
            r#"
node_name = "node-test"
state_dir = "{state}"
[pods]
cgroup_root = "{cgroup_root}"
{tunnels}
[ebpf]
pin_dir = "{pins}"
[tls]
{tls_source}
upstream_ca_bundle = "{bundle}"
[broker]
url = "https://{BROKER}"
ca_file = "{broker_ca}"
server_name = "broker.paddock.test"
bearer_file = "{token}"
timeout_ms = 2000
[network]
allow_cidrs = ["10.77.0.0/24"]
nameservers = ["{NODE_DNS}"]
[audit]
target = "{audit}"
[limits]
drain_timeout_secs = 1
{kubernetes}
"#,
            state = path_str(d, "state"),
            cgroup_root = self.kubelet.cgroup().path().display(),
            tunnels = if self.replica.is_some() {
                format!("tunnel_brokers = [\"{BROKER}\", \"{BROKER_REPLICA}\"]\nshells = true")
            } else {
                String::new()
            },
            pins = self.pins.path().display(),
            tls_source = if self.node_ca.is_some() {
                format!(
                    "mode = \"broker\"\nrevocation_check_secs = 1\nnode_ca_bearer_file = \"{}\"",
                    path_str(d, "node-ca.token")
                )
            } else {
                format!("ca_dir = \"{}\"\ngenerate_ca = true", path_str(d, "ca"))
            },
            bundle = path_str(d, "test-ca.crt"),
            broker_ca = path_str(d, "broker/test-ca.crt"),
            token = path_str(d, "agent.token"),
            audit = path_str(d, "audit.jsonl"),
            kubernetes = if self.kube_api.is_some() {
                format!(
                    // Long enough for the first list on a loaded machine; the unknown-pod case
                    // waits all of it.
                    "[kubernetes]\nkubeconfig = \"{}\"\ncluster_dns = [\"{BRIDGE_V4}\"]\n\
                     cni_wait_secs = 8\n",
                    path_str(d, "kubeconfig")
                )
            } else {
                String::new()
            },
        )
    }

    /// Starts `paddock-proxy node` in the node namespace and waits for its pod socket.
    pub fn start_agent(&mut self) {
        let d = self.dir.path();
        std::fs::write(d.join("node.toml"), self.config()).expect("node.toml");
        let mut cmd = Command::new(target_bin("paddock-proxy"));
        cmd.args(["node", "--config"])
            .arg(d.join("node.toml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("agent.log")).expect("log"));
        place(
            &mut cmd,
            &Placement {
                netns: Some(&self.node),
                ..Placement::default()
            },
        );
        let mut child = cmd.spawn().expect("spawn paddock-proxy node");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "node agent exited at start ({status}): {}",
                    self.agent_log()
                );
            }
            if self.pods_cli(&["list"]).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node agent not ready: {}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        // The node CA (or, with per-node CAs, the cluster root only), for the pods' clients.
        let trusted = if self.node_ca.is_some() {
            d.join("root/ca.crt")
        } else {
            d.join("ca/tls.crt")
        };
        std::fs::copy(trusted, self.public.path().join("ca.crt")).expect("ca");
        std::fs::set_permissions(
            self.public.path().join("ca.crt"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        self.agent = Some(child);
    }

    /// SIGKILL the node agent (a crash, an OOM kill) and reap it.
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL the node agent without reaping it (callable while the lab is shared);
    /// [`NodeLab::kill_agent`] or the drop reaps it.
    pub fn crash_agent(&self) {
        if let Some(child) = &self.agent
            && let Ok(pid) = i32::try_from(child.id())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// The node agent's pid.
    #[must_use]
    pub fn agent_pid(&self) -> u32 {
        self.agent.as_ref().expect("agent running").id()
    }

    #[must_use]
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// `paddock-proxy node-pods --socket ... ARGS`: stdout, or stderr on failure.
    pub fn pods_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(target_bin("paddock-proxy"))
            .arg("node-pods")
            .arg("--socket")
            .arg(self.dir.path().join("state/pods.sock"))
            .args(args)
            .output()
            .expect("spawn node-pods");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Tells the node agent about pod `i` (what the CNI ADD does): its JSON status.
    pub fn add_pod(&self, i: usize) -> Result<serde_json::Value, String> {
        let p = &self.pods[i];
        let netns = p.netns.path().path().display().to_string();
        let out = self.pods_cli(&[
            "add",
            "--uid",
            p.uid.as_str(),
            "--namespace",
            NAMESPACE,
            "--name",
            &format!("agent-{}", p.index),
            "--run",
            &p.run,
            "--netns",
            &netns,
            "--nameserver",
            &BRIDGE_V4.to_string(),
            "--adapter-port",
            &ADAPTER_PORT.to_string(),
            "--shell",
        ])?;
        serde_json::from_str(out.trim()).map_err(|e| format!("{e}: {out}"))
    }

    pub fn delete_pod(&self, i: usize) -> Result<(), String> {
        self.pods_cli(&["delete", "--uid", self.pods[i].uid.as_str()])
            .map(|_| ())
    }

    /// `paddock-broker ACTION ...` as the operator against the lab's broker, from the node
    /// namespace, for pod `i`'s run (not started).
    #[must_use]
    pub fn broker_cli(&self, action: &str, i: usize) -> Command {
        self.broker_cli_at(BROKER, action, i)
    }

    /// [`Self::broker_cli`] against the broker at `addr` (a replica).
    #[must_use]
    pub fn broker_cli_at(&self, addr: &str, action: &str, i: usize) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new(target_bin("paddock-broker"));
        cmd.arg(action)
            .args(["--broker", &format!("https://{addr}")])
            .arg("--ca")
            .arg(d.join("broker/test-ca.crt"))
            .arg("--token-file")
            .arg(d.join("operator.key"))
            .args(["-n", NAMESPACE, &self.pods[i].run]);
        place(&mut cmd, &Placement::netns(&self.node));
        cmd
    }

    /// The pods the node agent serves.
    #[must_use]
    pub fn listed(&self) -> Vec<serde_json::Value> {
        let out = self.pods_cli(&["list"]).expect("list");
        serde_json::from_str::<Vec<serde_json::Value>>(out.trim()).expect("json")
    }

    /// A process of pod `i`'s container: in its namespace and container cgroup, as nobody.
    #[must_use]
    pub fn in_pod(&self, i: usize) -> Placement<'_> {
        Placement {
            netns: Some(&self.pods[i].netns),
            cgroup: Some(&self.pods[i].container),
            user: Some(NOBODY),
        }
    }

    /// curl from pod `i` to `https://host/path` with `bearer`, resolving `host` to the
    /// upstream address: the HTTP status, 0 without an HTTP answer, and curl's exit code.
    #[must_use]
    pub fn curl(&self, i: usize, host: &str, path: &str, bearer: &str) -> (u16, i32) {
        self.curl_at(&self.in_pod(i), "ca.crt", host, path, bearer)
    }

    /// curl at `at`, trusting `ca` (a file in the public directory: `ca.crt` is the node CA,
    /// `upstream-ca.crt` the upstream host's own CA).
    #[must_use]
    pub fn curl_at(
        &self,
        at: &Placement<'_>,
        ca: &str,
        host: &str,
        path: &str,
        bearer: &str,
    ) -> (u16, i32) {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(["--cacert", &path_str(self.public.path(), ca)])
        .args(["--resolve", &format!("{host}:443:{UPSTREAM_V4}")])
        .args(["-H", &format!("Authorization: Bearer {bearer}")])
        .arg(format!("https://{host}{path}"));
        let out = run(&mut cmd, at);
        (
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0),
            out.status.code().unwrap_or(-1),
        )
    }

    /// Requests the upstream host received at `path`.
    #[must_use]
    pub fn upstream(&self, path: &str) -> Vec<serde_json::Value> {
        self.api
            .as_ref()
            .expect("the request-logging API")
            .requests()
            .into_iter()
            .filter(|r| r["path"] == path)
            .collect()
    }

    #[must_use]
    pub fn audit(&self) -> Vec<serde_json::Value> {
        crate::files::audit_records(
            &std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap_or_default(),
        )
    }

    /// Pod cgroup ids with pinned links, and entries in the pinned config map.
    #[must_use]
    pub fn intercepted(&self) -> Vec<paddock_proxy::ebpf::AgentStatus> {
        paddock_proxy::ebpf::agent_status(self.pins.path()).expect("agent status")
    }

    /// The node agent's open descriptors.
    #[must_use]
    pub fn agent_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.agent_pid()))
            .expect("fds")
            .count()
    }

    /// The node agent's resident memory, KiB.
    #[must_use]
    pub fn agent_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.agent_pid())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    /// A broker call as the controller, from the node namespace.
    pub fn controller<T, F, Fut>(&self, call: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce(BrokerClient) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, paddock_proxy::broker::BrokerCallError>>,
    {
        let d = self.dir.path();
        broker_call(
            &self.node,
            format!("https://{BROKER}"),
            &d.join("broker"),
            d.join("controller.token"),
            &self.controller_key,
            call,
        )
    }

    /// `POST /v1/node-ca` with `token` for `node` (the CSR is not reached when the node is
    /// refused): the broker's answer or its error.
    pub fn request_node_ca(&self, token: &str, node: &str) -> Result<String, String> {
        let d = self.dir.path();
        let request = paddock_wire::api::NodeCaRequest {
            node: node.to_owned(),
            csr: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                .to_owned(),
        };
        broker_call(
            &self.node,
            format!("https://{BROKER}"),
            &d.join("broker"),
            d.join("probe.token"),
            token,
            move |client| async move { client.node_ca(&request).await.map(|r| r.certificate) },
        )
    }

    /// The broker's audit records.
    #[must_use]
    pub fn broker_audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("broker-audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The pod's own address (for messages).
    #[must_use]
    pub fn pod_ip(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(
            10,
            88,
            0,
            10 + u8::try_from(i).expect("small"),
        ))
    }
}

impl NodeLab {
    /// A node whose agent learns pods from the API server (recorded answers, see
    /// `KUBE_API`) through the CNI plugin. `pods`: for each, its run (`None`: not an agent
    /// pod) and whether the API server lists it. Nothing is added yet: [`NodeLab::cni_add`].
    #[must_use]
    pub fn cni(pods: &[(Option<u32>, bool)]) -> Self {
        let runs = pods
            .iter()
            .filter_map(|(r, _)| *r)
            .max()
            .map_or(1, |m| m + 1);
        let mut lab = Self::base(runs, false);
        let d = lab.dir.path().to_path_buf();
        let mut listed = Vec::new();
        for (i, &(run, in_api)) in pods.iter().enumerate() {
            let i = u32::try_from(i).expect("few pods");
            let uid = PodUid::parse(&format!("7c2e1d3b-2222-4333-8444-{i:012x}")).expect("uid");
            let rel = pod_cgroup_relpath(CgroupDriver::Systemd, QosClass::BestEffort, &uid);
            let container_id = format!("{:064x}", 0x00c0_ffee_u64 + u64::from(i));
            let container = CgroupGuard::nested(
                &lab.kubelet,
                &rel.join(format!("cri-containerd-{container_id}.scope")),
            );
            let run = run.map(|r| format!("run-{r}"));
            let placeholder = run.as_ref().map(|run| lab.register(run));
            let name = format!("cni-agent-{i}");
            if in_api {
                let mut labels = serde_json::json!({"app": "agent"});
                if let Some(r) = &run {
                    labels["paddock.dev/run"] = serde_json::json!(r);
                }
                listed.push(serde_json::json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": NAMESPACE, "uid": uid.as_str(),
                                 "labels": labels, "resourceVersion": "1"},
                    "spec": {"nodeName": "node-test", "containers": [{"name": "a", "image": "a"}]},
                    "status": {"phase": "Pending"},
                }));
            }
            lab.cni_pods.push(CniPod {
                uid,
                name,
                run,
                netns: Netns::new("c"),
                container,
                container_id,
                placeholder,
            });
        }
        std::fs::write(
            d.join("pods.json"),
            serde_json::to_vec(&listed).expect("json"),
        )
        .expect("pods.json");
        std::fs::write(
            d.join("kubeconfig"),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: \
                 http://{KUBE_API_ADDR}\nusers:\n- name: node\n  user:\n    token: not-checked\n\
                 contexts:\n- name: lab\n  context:\n    cluster: lab\n    user: node\n\
                 current-context: lab\n"
            ),
        )
        .expect("kubeconfig");
        lab.kube_api = Some(PyServer::start(
            &lab.node,
            &d,
            "kube_api.py",
            KUBE_API,
            KUBE_API_ADDR.parse().expect("addr"),
            &[d.join("pods.json").as_os_str()],
        ));
        lab.upstream.ip(&[
            "route",
            "add",
            CNI_SUBNET,
            "via",
            &NODE_UPLINK_V4.to_string(),
        ]);
        // The upstream host's own CA, for clients of pods that are not intercepted.
        std::fs::copy(
            d.join("test-ca.crt"),
            lab.public.path().join("upstream-ca.crt"),
        )
        .expect("ca");
        std::fs::set_permissions(
            lab.public.path().join("upstream-ca.crt"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        lab.start_agent();
        lab
    }

    /// Registers `run` with the broker and issues it a placeholder of its hosts' credential.
    fn register(&self, run: &str) -> String {
        let n: u32 = run.trim_start_matches("run-").parse().expect("run-N");
        let credential = if n.is_multiple_of(2) {
            "api-a"
        } else {
            "api-b"
        };
        let r = run.to_owned();
        self.controller(move |c| async move {
            c.upsert_run(&RunUpsertRequest {
                run: r,
                namespace: NAMESPACE.into(),
                template: "t".into(),
                phase: RunPhase::Running,
            })
            .await
            .map(|_| ())
        })
        .expect("register the run");
        let r = run.to_owned();
        self.controller(move |c| async move {
            c.issue(&IssueRequest {
                run: r,
                credential: credential.into(),
            })
            .await
            .map(|r| r.value)
        })
        .expect("issue")
    }

    /// A process of CNI pod `k`'s container, as nobody.
    #[must_use]
    pub fn in_cni_pod(&self, k: usize) -> Placement<'_> {
        Placement {
            netns: Some(&self.cni_pods[k].netns),
            cgroup: Some(&self.cni_pods[k].container),
            user: Some(NOBODY),
        }
    }

    /// Runs CNI `plugin` (`bridge` from Debian's plugins, or `paddock-cni`) for pod `k` the way
    /// a container runtime does: in the runtime's (node's) namespace, `CNI_*` environment,
    /// the network configuration on stdin. Exit code and stdout (JSON, or null when empty).
    pub fn cni_exec(
        &self,
        plugin: &str,
        command: &str,
        k: usize,
        conf: &serde_json::Value,
    ) -> (i32, serde_json::Value) {
        use std::io::Write as _;
        let pod = &self.cni_pods[k];
        let bin = if plugin == "paddock-cni" {
            target_bin("paddock-cni")
        } else {
            PathBuf::from("/usr/lib/cni").join(plugin)
        };
        let mut cmd = Command::new(bin);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.container_id)
            .env("CNI_NETNS", pod.netns.path().path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={};\
                     K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                    pod.name, pod.container_id, pod.uid
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        place(
            &mut cmd,
            &Placement {
                netns: Some(&self.node),
                ..Placement::default()
            },
        );
        let mut child = cmd.spawn().expect("spawn CNI plugin");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&serde_json::to_vec(conf).expect("json"))
            .expect("write conf");
        let out = child.wait_with_output().expect("CNI plugin");
        let stdout = if out.stdout.iter().all(u8::is_ascii_whitespace) {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "{plugin} {command} printed no JSON ({e}): {}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        };
        (out.status.code().unwrap_or(-1), stdout)
    }

    /// The bridge plugin's configuration (what `10-bridge.conflist` would hold).
    #[must_use]
    pub fn bridge_conf(&self) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": "1.0.0", "name": "podnet", "type": "bridge",
            "bridge": format!("cb{}", &self.bridge[2..]), "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": CNI_SUBNET}]],
                     "routes": [{"dst": "0.0.0.0/0"}],
                     "dataDir": self.dir.path().join("ipam")},
        })
    }

    /// paddock-cni's configuration as libcni hands it over: the conflist entry plus the
    /// network's name and version and the previous plugin's result.
    #[must_use]
    pub fn paddock_conf(&self, prev: Option<&serde_json::Value>) -> serde_json::Value {
        let mut c = serde_json::json!({
            "cniVersion": "1.0.0", "name": "podnet", "type": "paddock-cni",
            "socket": self.dir.path().join("state/pods.sock"), "timeoutSeconds": 15,
        });
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }

    /// The runtime's ADD of the chain (bridge, then paddock-cni): paddock-cni's exit code and
    /// output.
    pub fn cni_add(&self, k: usize) -> (i32, serde_json::Value) {
        let (code, prev) = self.cni_exec("bridge", "ADD", k, &self.bridge_conf());
        assert_eq!(code, 0, "bridge ADD: {prev}");
        self.cni_exec("paddock-cni", "ADD", k, &self.paddock_conf(Some(&prev)))
    }

    /// The runtime's DEL of the chain, in reverse order: paddock-cni's exit code.
    pub fn cni_del(&self, k: usize) -> i32 {
        let (code, out) = self.cni_exec("paddock-cni", "DEL", k, &self.paddock_conf(None));
        let (bridge, bout) = self.cni_exec("bridge", "DEL", k, &self.bridge_conf());
        assert_eq!(bridge, 0, "bridge DEL: {bout}");
        assert!(code == 0 || out.is_object(), "{out}");
        code
    }
}

impl NodeLab {
    /// A node for benchmarks: nginx upstream (`/api`), node agent running, no pods.
    #[must_use]
    pub fn bench(runs: u32) -> Self {
        let mut lab = Self::base(runs, true);
        lab.start_agent();
        lab
    }

    /// Pods on the bridge with their runs registered (as [`NodeLab::new`] makes them), not
    /// yet added to the node agent.
    pub fn make_pods(&mut self, n: u32) {
        for i in 0..n {
            let pod = self.make_pod(i);
            self.pods.push(pod);
        }
    }

    /// A bare pod for counting what the node agent holds per pod: a network namespace
    /// without links and a kubelet cgroup; added straight away as run `bench-<i>`.
    pub fn bare_pod(&self, i: u32) -> Result<(Netns, CgroupGuard), String> {
        let uid = PodUid::parse(&format!("8d3f2e4c-3333-4444-8555-{i:012x}")).expect("uid");
        let rel = pod_cgroup_relpath(CgroupDriver::Cgroupfs, QosClass::Burstable, &uid);
        let container = CgroupGuard::nested(&self.kubelet, &rel.join(format!("{i:064x}")));
        let netns = Netns::new("b");
        self.pods_cli(&[
            "add",
            "--uid",
            uid.as_str(),
            "--namespace",
            NAMESPACE,
            "--name",
            &format!("bench-{i}"),
            "--run",
            &format!("bench-{i}"),
            "--netns",
            &netns.path().path().display().to_string(),
        ])?;
        Ok((netns, container))
    }
}

impl Drop for NodeLab {
    fn drop(&mut self) {
        self.kill_agent();
    }
}
