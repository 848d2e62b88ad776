//! A served proxy (`[broker]` table) against a separately running `paddock-broker serve`,
//! with an agent in an intercepted cgroup: the lab of `serve_broker` and of the broker rows of
//! `faults`. The broker listens on loopback inside the agent namespace (plain-HTTP admin
//! endpoint on [`BROKER_ADMIN`]); the test API (a Python HTTPS server logging every request)
//! plays the upstream in its own namespace.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use paddock_proxy::broker::{BrokerClient, BrokerClientConfig};
use paddock_wire::api::{IssueRequest, RunPhase, RunUpsertRequest};

use crate::{
    CgroupGuard, Netns, PinDir, Topology,
    echo_api::EchoApi,
    files::audit_records,
    process::{Placement, place, run, target_bin},
    proxied::{DnsResponder, ProxyProcess, make_upstream_certs, path_str, scratch},
};

pub const SECRET: &str = "real-upstream-token-4be1d9";
pub const RUN: &str = "run-sb";
pub const NAMESPACE: &str = "team";
pub const PROXY_PORT: u16 = 15001;
pub const BROKER_PORT: u16 = 18443;
pub const DNS: &str = "127.0.0.1:5353";
/// The broker's admin endpoint (plain HTTP: `/readyz`, `/metrics`), in the agent namespace.
pub const BROKER_ADMIN: &str = "127.0.0.1:18444";
/// The proxy's admin endpoint (plain HTTP `/metrics`), in the agent namespace.
pub const PROXY_ADMIN: &str = "127.0.0.1:18445";
pub const API: &str = "api.paddock.test";
pub const HOST_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// The policy with the API allowed (`allow`) or with only an unrelated host allowed.
#[must_use]
pub fn policy(dir: &Path, allow: bool) -> String {
    let host = if allow { API } else { "other.paddock.test" };
    format!(
        r#"
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {{name: sb}}
spec:
  appliesTo: {{namespaces: [{NAMESPACE}]}}
  credentials:
    - name: api
      provider: {{kind: user-secret, inject: {{header: {{name: Authorization, prefix: "Bearer "}}}}}}
      secret: {{file: {secret}}}
      hosts: [{API}]
  egress:
    - {{hosts: [{host}], ports: [443], substituteAuth: true}}
"#,
        secret = dir.join("secret.txt").display()
    )
}

/// `paddock-broker keys add` of a static key `id` for `namespace` with `scopes` into the key
/// file `keys`: the new key.
#[must_use]
pub fn add_static_key(keys: &Path, namespace: &str, id: &str, scopes: &[&str]) -> String {
    let mut cmd = Command::new(target_bin("paddock-broker"));
    cmd.args(["keys", "add", "--file"])
        .arg(keys)
        .args(["--id", id, "--namespace", namespace]);
    for s in scopes {
        cmd.args(["--scope", s]);
    }
    let out = run(&mut cmd, &Placement::default());
    assert!(out.status.success(), "keys add: {out:?}");
    String::from_utf8(out.stdout)
        .expect("key")
        .trim()
        .to_owned()
}

/// One broker call as the holder of `key`, from inside `ns` (where the lab's broker listens
/// on loopback, at `url`, with the certificate of `broker_dir`). The key goes to `key_file`.
pub fn broker_call<T, F, Fut>(
    ns: &Netns,
    url: String,
    broker_dir: &Path,
    key_file: PathBuf,
    key: &str,
    call: F,
) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(BrokerClient) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, paddock_proxy::broker::BrokerCallError>>,
{
    std::fs::write(&key_file, key).expect("key file");
    let mut cfg = BrokerClientConfig::new(url, broker_dir.join("test-ca.crt"));
    cfg.bearer_file = Some(key_file);
    cfg.server_name = Some("broker.paddock.test".into());
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let client = BrokerClient::new(&cfg).map_err(|e| e.to_string())?;
            call(client).await.map_err(|e| e.to_string())
        })
    })
    .map_err(|e| e.to_string())?
}

/// `paddock-broker serve` as a child process in the agent namespace; killed on drop.
#[derive(Debug)]
pub struct BrokerProcess {
    child: Child,
}

impl BrokerProcess {
    /// Starts `paddock-broker serve --config CONFIG` in `ns` and waits until it listens.
    #[must_use]
    pub fn start(ns: &Netns, config: &Path) -> Self {
        let mut cmd = Command::new(target_bin("paddock-broker"));
        cmd.args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        place(
            &mut cmd,
            &Placement {
                netns: Some(ns),
                ..Placement::default()
            },
        );
        let mut broker = Self {
            child: cmd.spawn().expect("spawn paddock-broker"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, BROKER_PORT));
        loop {
            if let Ok(Some(status)) = broker.child.try_wait() {
                panic!("paddock-broker exited at start: {status}");
            }
            if ns
                .run(move || std::net::TcpStream::connect(addr).is_ok())
                .unwrap_or(false)
            {
                return broker;
            }
            assert!(Instant::now() < deadline, "broker did not start listening");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGKILL without waiting for the process (callable while the lab is borrowed
    /// elsewhere); [`BrokerProcess::kill`] or the drop reaps it.
    pub fn crash(&self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// SIGKILL: no drain, no goodbye, as in a crash or an OOM kill.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An agent that keeps one HTTPS connection to the API open and sends one request per line
/// on its stdin (`<path> <bearer>`), answering `<status> <local port>` per request.
#[derive(Debug)]
pub struct KeepAliveAgent {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const KEEPALIVE_AGENT: &str = r#"
import http.client, os, socket, ssl, sys
ctx = ssl.create_default_context(cafile=os.environ["PDK_CA"])
conn = http.client.HTTPSConnection("api.paddock.test", 443, context=ctx, timeout=10)
conn._create_connection = lambda a, *r, **k: socket.create_connection((os.environ["PDK_IP"], 443), *r, **k)
for line in sys.stdin:
    path, bearer = line.split()
    try:
        conn.request("GET", path, headers={"Authorization": "Bearer " + bearer})
        resp = conn.getresponse()
        resp.read()
        print(resp.status, conn.sock.getsockname()[1] if conn.sock else 0, flush=True)
    except Exception as e:
        print("error", type(e).__name__, flush=True)
        conn.close()
"#;

impl KeepAliveAgent {
    #[must_use]
    pub fn start(lab: &BrokerLab) -> Self {
        let mut cmd = Command::new("python3");
        cmd.args(["-c", KEEPALIVE_AGENT])
            .env("PDK_CA", path_str(lab.dir.path(), "ca/tls.crt"))
            .env("PDK_IP", HOST_V4.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        place(&mut cmd, &lab.agent());
        let mut child = cmd.spawn().expect("spawn python3");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// One request on the kept connection: (status or "error", local port).
    pub fn get(&mut self, path: &str, bearer: &str) -> (String, String) {
        writeln!(self.stdin, "{path} {bearer}").expect("write to agent");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("agent answer");
        let mut parts = line.split_whitespace();
        (
            parts.next().unwrap_or("eof").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        )
    }
}

impl Drop for KeepAliveAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Agent namespace + intercepted cgroup, the test API in the upstream namespace, the broker
/// as its own process and the proxy asking it. Removed on drop, also on panic.
pub struct BrokerLab {
    // Drop order: proxy (drains), broker, backends, loader, pins, cgroup, namespaces, files.
    pub proxy: Option<ProxyProcess>,
    pub broker: BrokerProcess,
    pub api: EchoApi,
    _dns: DnsResponder,
    _ic: paddock_proxy::ebpf::Interceptor,
    _pins: PinDir,
    pub cgroup: CgroupGuard,
    pub topo: Topology,
    pub dir: tempfile::TempDir,
    controller_key: String,
}

impl std::fmt::Debug for BrokerLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the controller key.
        f.debug_struct("BrokerLab")
            .field("dir", &self.dir.path())
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

impl Default for BrokerLab {
    fn default() -> Self {
        Self::new()
    }
}

impl BrokerLab {
    /// The lab with [`policy`] allowing the API.
    #[must_use]
    pub fn new() -> Self {
        Self::with_policy(|d| policy(d, true))
    }

    /// The lab with the broker policy `make_policy` writes for the lab's directory.
    #[must_use]
    #[expect(
        clippy::too_many_lines,
        reason = "one linear set-up of the lab's parts; the order is the point"
    )]
    pub fn with_policy(make_policy: impl FnOnce(&Path) -> String) -> Self {
        use paddock_proxy::{
            cgroup::Cgroup,
            ebpf::{AgentConfig, Interception, Interceptor, LoadOptions},
        };
        let dir = scratch();
        let d = dir.path();
        make_upstream_certs(d, &[API, "other.paddock.test"]);
        let broker_dir = d.join("broker");
        std::fs::create_dir(&broker_dir).expect("broker dir");
        make_upstream_certs(&broker_dir, &["broker.paddock.test"]);
        std::fs::write(d.join("secret.txt"), SECRET).expect("secret");
        std::fs::write(d.join("policy.yaml"), make_policy(d)).expect("policy");

        let keys = d.join("keys");
        let add_key = |id: &str, scopes: &[&str]| add_static_key(&keys, NAMESPACE, id, scopes);
        let controller_key = add_key(
            "controller",
            &["broker:controller", "broker:issue", "broker:revoke"],
        );
        let proxy_key = add_key(
            "proxy",
            &["broker:validate-egress", "broker:substitute-auth"],
        );
        std::fs::write(d.join("proxy.token"), &proxy_key).expect("proxy token");
        // policyPollSeconds is left at its default: the default must meet "within 1 s".
        let broker_cfg = serde_json::json!({
            "listen": format!("127.0.0.1:{BROKER_PORT}"),
            "adminListen": BROKER_ADMIN,
            "tls": {"cert": broker_dir.join("server.crt"), "key": broker_dir.join("server.key")},
            "database": d.join("broker.db"),
            "policy": d.join("policy.yaml"),
            "audit": {"path": d.join("broker-audit.jsonl")},
            "auth": {"staticKeys": {"file": keys}},
        });
        std::fs::write(d.join("broker.yaml"), broker_cfg.to_string()).expect("broker.yaml");

        let topo = Topology::new();
        let cgroup = CgroupGuard::new("sb");
        let pins = PinDir::new();
        let mut ic = Interceptor::load(&LoadOptions {
            pin_dir: pins.path().to_path_buf(),
            ..LoadOptions::default()
        })
        .unwrap_or_else(|e| panic!("load eBPF: {e}"));
        let mut agent_cfg = AgentConfig::loopback(PROXY_PORT);
        agent_cfg.bypass_mark = Some(crate::proxied::MARK);
        ic.attach_agent(cgroup.cgroup(), &agent_cfg)
            .unwrap_or_else(|e| panic!("attach agent: {e}"));
        ic.attach_proxy(&Cgroup::current().expect("own cgroup"))
            .unwrap_or_else(|e| panic!("attach proxy: {e}"));
        let dns = DnsResponder::start(
            &topo.agent,
            DNS.parse().expect("addr"),
            vec![
                (API.to_owned(), HOST_V4.into()),
                ("other.paddock.test".to_owned(), HOST_V4.into()),
            ],
        );
        let api = EchoApi::start(&topo.upstream, d, SocketAddr::from((HOST_V4, 443)));
        let broker = BrokerProcess::start(&topo.agent, &d.join("broker.yaml"));
        let mut lab = Self {
            proxy: None,
            broker,
            api,
            _dns: dns,
            _ic: ic,
            _pins: pins,
            cgroup,
            topo,
            dir,
            controller_key,
        };
        // The controller's part: the run exists and is running.
        lab.controller(|c| async move {
            c.upsert_run(&RunUpsertRequest {
                run: RUN.into(),
                namespace: NAMESPACE.into(),
                template: "t".into(),
                phase: RunPhase::Running,
            })
            .await
            .map(|_| ())
        })
        .expect("register the run");

        let d = lab.dir.path();
        let config = format!(
            r#"
run_id = "{RUN}"
[listen]
transparent = ["127.0.0.1:{PROXY_PORT}"]
[tls]
ca_dir = "{ca}"
generate_ca = true
upstream_ca_bundle = "{bundle}"
[broker]
url = "https://127.0.0.1:{BROKER_PORT}"
ca_file = "{broker_ca}"
server_name = "broker.paddock.test"
bearer_file = "{token}"
timeout_ms = 2000
[network]
allow_cidrs = ["10.77.0.0/24"]
nameservers = ["{DNS}"]
bypass_mark = {mark}
[audit]
target = "{audit}"
[limits]
drain_timeout_secs = 1
[admin]
listen = "{PROXY_ADMIN}"
"#,
            ca = path_str(d, "ca"),
            bundle = path_str(d, "test-ca.crt"),
            broker_ca = path_str(d, "broker/test-ca.crt"),
            token = path_str(d, "proxy.token"),
            audit = path_str(d, "proxy-audit.jsonl"),
            mark = crate::proxied::MARK,
        );
        lab.proxy = Some(ProxyProcess::start(
            &lab.topo.agent,
            &config,
            None,
            SocketAddr::from(([127, 0, 0, 1], PROXY_PORT)),
        ));
        lab
    }

    #[must_use]
    pub fn agent(&self) -> Placement<'_> {
        Placement {
            netns: Some(&self.topo.agent),
            cgroup: Some(&self.cgroup),
            user: None,
        }
    }

    /// A broker call as the controller, from inside the agent namespace (where the broker
    /// listens on loopback).
    pub fn controller<T, F, Fut>(&self, call: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce(BrokerClient) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, paddock_proxy::broker::BrokerCallError>>,
    {
        let d = self.dir.path();
        broker_call(
            &self.topo.agent,
            format!("https://127.0.0.1:{BROKER_PORT}"),
            &d.join("broker"),
            d.join("controller.token"),
            &self.controller_key,
            call,
        )
    }

    /// Issue a placeholder for the API credential: (lease id, placeholder).
    #[must_use]
    pub fn issue(&self) -> (String, String) {
        self.controller(|c| async move {
            c.issue(&IssueRequest {
                run: RUN.into(),
                credential: "api".into(),
            })
            .await
            .map(|r| (r.lease_id, r.value))
        })
        .expect("issue")
    }

    /// One request on a new connection (curl in the agent cgroup): the HTTP status, 0 when
    /// there was no HTTP answer.
    #[must_use]
    pub fn curl(&self, path: &str, bearer: &str) -> u16 {
        self.curl_to(API, path, bearer)
    }

    /// [`BrokerLab::curl`] to `host` (resolved to the test API's address).
    #[must_use]
    pub fn curl_to(&self, host: &str, path: &str, bearer: &str) -> u16 {
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
        .args(["--cacert", &path_str(self.dir.path(), "ca/tls.crt")])
        .args(["--resolve", &format!("{host}:443:{HOST_V4}")])
        .args(["-H", &format!("Authorization: Bearer {bearer}")])
        .arg(format!("https://{host}{path}"));
        let out = run(&mut cmd, &self.agent());
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// Requests upstream received at `path`.
    #[must_use]
    pub fn upstream(&self, path: &str) -> Vec<serde_json::Value> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| r["path"] == path)
            .collect()
    }

    /// The broker admin endpoint's body for `path` (`/readyz`, `/metrics`), fetched from the
    /// agent namespace outside the intercepted cgroup.
    #[must_use]
    pub fn broker_admin(&self, path: &str) -> String {
        self.admin(BROKER_ADMIN, path)
    }

    /// The value of the proxy's metric `name` (a sample without labels), if it reports one.
    #[must_use]
    pub fn proxy_metric(&self, name: &str) -> Option<f64> {
        self.admin(PROXY_ADMIN, "/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    fn admin(&self, addr: &str, path: &str) -> String {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "5"])
            .arg(format!("http://{addr}{path}"));
        let out = run(
            &mut cmd,
            &Placement {
                netns: Some(&self.topo.agent),
                ..Placement::default()
            },
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Replaces the broker's policy file atomically (a rename, as a `ConfigMap` update does).
    pub fn write_policy(&self, text: &str) {
        let d = self.dir.path();
        std::fs::write(d.join("policy.yaml.new"), text).expect("new policy");
        std::fs::rename(d.join("policy.yaml.new"), d.join("policy.yaml")).expect("rename");
    }

    #[must_use]
    pub fn proxy_audit(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy-audit.jsonl")).unwrap_or_default()
    }
}

/// The one request record for `path` in the proxy's audit trail.
#[must_use]
pub fn request_record(trail: &str, path: &str) -> serde_json::Value {
    let found: Vec<serde_json::Value> = audit_records(trail)
        .into_iter()
        .filter(|r| r["kind"] == "request" && r["path"] == path)
        .collect();
    assert_eq!(found.len(), 1, "one request record for {path}: {trail}");
    found.into_iter().next().unwrap_or_default()
}
