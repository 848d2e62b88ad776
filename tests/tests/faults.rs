//! Root tier: the fault matrix of RELIABILITY.md. Each test injects one fault into the shape
//! Paddock runs in (a served proxy, a broker process, eBPF interception of an agent cgroup,
//! upstream hosts in their own namespace) and checks both what the agent observes and that
//! nothing reached an upstream unchecked: upstreams count what they receive, and the
//! "nothing" is asserted, not assumed.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use paddock_tests::{
    CgroupGuard, Netns, PinDir, Topology,
    broker_lab::{API, BrokerLab, SECRET, policy, request_record},
    echo_api::EchoApi,
    process::{Placement, client, place, run, target_bin},
    proxied::{DnsResponder, MARK, make_upstream_certs, path_str, scratch},
    require_root,
    servers::bind_in,
};

/// The value of one series in a Prometheus text exposition (0 when absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).map(str::trim))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Polls `cond` every 25 ms for at most `limit`.
fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A TCP listener in a namespace that only counts the connections it accepts: the upstream
/// that must see nothing.
struct CountingListener {
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingListener {
    fn start(ns: &Netns, addrs: &[SocketAddr]) -> Self {
        let accepted = Arc::new(AtomicUsize::new(0));
        let listeners: Vec<_> = addrs
            .iter()
            .map(|a| {
                let l = bind_in(ns, *a);
                l.set_nonblocking(true).expect("nonblocking");
                tokio::net::TcpListener::from_std(l).expect("tokio listener")
            })
            .collect();
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            let accepts = listeners.into_iter().map(|l| {
                let count = Arc::clone(&count);
                async move {
                    while let Ok((_s, _)) = l.accept().await {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
            futures_util::future::join_all(accepts).await;
        });
        Self { accepted, task }
    }

    fn count(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CountingListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- The broker's policy file broken at reload ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_broker_policy_edit_keeps_the_previous_policy_in_force() {
    if !require_root("a_broken_broker_policy_edit_keeps_the_previous_policy_in_force") {
        return;
    }
    tokio::task::block_in_place(|| {
        let lab = BrokerLab::new();
        let good = policy(lab.dir.path(), true);
        let other = "other.paddock.test";
        let (_, placeholder) = lab.issue();
        assert_eq!(lab.curl("/before", &placeholder), 200);
        assert_eq!(lab.curl_to(other, "/other-before", "own-token"), 403);
        let failures = || {
            metric(
                &lab.broker_admin("/metrics"),
                "paddock_broker_policy_reload_failures_total",
            )
        };
        assert_eq!(failures(), 0);
        let widened = good.replace(
            &format!("hosts: [{API}], ports: [443]"),
            &format!("hosts: [{API}, {other}], ports: [443]"),
        );
        assert_ne!(widened, good);
        let cut = good.find("substituteAuth").expect("an egress entry");
        let broken = [
            // As an editor or an interrupted copy leaves it.
            ("half written", good[..cut].to_owned()),
            (
                "unknown provider",
                good.replace("kind: user-secret", "kind: no-such-provider"),
            ),
            // Would allow the other host, were the misspelt key ignored.
            (
                "widening with a misspelt key",
                widened.replace(
                    "substituteAuth: true}",
                    "substituteAuth: true, substitueAuth: false}",
                ),
            ),
        ];
        for (n, (what, text)) in broken.iter().enumerate() {
            lab.write_policy(text);
            let want = u64::try_from(n).expect("small") + 1;
            wait_for(Duration::from_secs(5), what, || failures() == want);
            let ready = lab.broker_admin("/readyz");
            assert!(
                ready.contains("policy reload failing, previous policy active"),
                "{what}: {ready}"
            );
            let path = format!("/kept-{n}");
            assert_eq!(lab.curl(&path, &placeholder), 200, "{what}: allowed still");
            assert_eq!(
                lab.upstream(&path)[0]["authorization"],
                format!("Bearer {SECRET}"),
                "{what}: substituted still"
            );
            let path = format!("/other-{n}");
            assert_eq!(
                lab.curl_to(other, &path, "own-token"),
                403,
                "{what}: nothing newly allowed"
            );
            assert!(lab.upstream(&path).is_empty(), "{what}");
        }
        // The same edit without the mistake is taken within a second: the broker was reading
        // every version, and refused the broken ones.
        lab.write_policy(&widened);
        let at = Instant::now();
        wait_for(Duration::from_secs(3), "the good edit", || {
            lab.curl_to(other, "/other-after", "own-token") == 200
        });
        eprintln!("good edit in force after {:?}", at.elapsed());
        assert_eq!(lab.broker_admin("/readyz"), "ready\n");
        assert_eq!(failures(), 3);
    });
}

// ---- The broker killed with a request in flight ----

/// Where the stand-in for GitHub's token endpoint listens (the broker's loopback).
const GITHUB_PORT: u16 = 18480;
const GITHUB_TOKEN: &str = "ghs_fault_matrix_token_0123456789";

/// A broker policy whose credential is a GitHub App: the broker fetches an installation token
/// from [`TokenApi`] while it answers `substitute-auth`. Writes the app key into `dir`.
fn github_policy(dir: &Path) -> String {
    let key = dir.join("app.pem");
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{out:?}");
    format!(
        r#"
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {{name: faults}}
spec:
  appliesTo: {{namespaces: [team]}}
  credentials:
    - name: api
      provider: {{kind: github-app, appId: 1, installationId: 2, privateKey: {{file: {key}}},
                 apiBaseUrl: "http://127.0.0.1:{GITHUB_PORT}"}}
      hosts: [{API}]
  egress:
    - {{hosts: [{API}], ports: [443], substituteAuth: true}}
"#,
        key = key.display()
    )
}

/// A stand-in for GitHub's installation-token endpoint on the broker's loopback: it answers
/// with a token that expires within the broker's refresh margin (so every substitution
/// fetches anew) until told to hold; then it reads each request and never answers, keeping
/// the broker's substitution in flight.
struct TokenApi {
    fetches: Arc<AtomicUsize>,
    held: Arc<AtomicUsize>,
    hold: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TokenApi {
    fn start(ns: &Netns) -> Self {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let expires = Command::new("date")
            .args(["-u", "-d", "+200 seconds", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .expect("date");
        let expires = String::from_utf8_lossy(&expires.stdout).trim().to_owned();
        let body = serde_json::json!({"token": GITHUB_TOKEN, "expires_at": expires}).to_string();
        let l = bind_in(ns, SocketAddr::from(([127, 0, 0, 1], GITHUB_PORT)));
        l.set_nonblocking(true).expect("nonblocking");
        let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
        let (fetches, held, hold) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (f, h, stop) = (Arc::clone(&fetches), Arc::clone(&held), Arc::clone(&hold));
        let task = tokio::spawn(async move {
            let mut hung = Vec::new();
            while let Ok((mut s, _)) = l.accept().await {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                f.fetch_add(1, Ordering::SeqCst);
                if stop.load(Ordering::SeqCst) {
                    h.fetch_add(1, Ordering::SeqCst);
                    hung.push(s);
                    continue;
                }
                let answer = format!(
                    "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
        Self {
            fetches,
            held,
            hold,
            task,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_with_a_substitution_in_flight_answers_502_and_sends_nothing() {
    if !require_root("a_broker_killed_with_a_substitution_in_flight_answers_502_and_sends_nothing")
    {
        return;
    }
    tokio::task::block_in_place(|| {
        let lab = BrokerLab::with_policy(github_policy);
        let tokens = TokenApi::start(&lab.topo.agent);
        let (_, placeholder) = lab.issue();
        assert_eq!(lab.curl("/before", &placeholder), 200);
        assert_eq!(
            lab.upstream("/before")[0]["authorization"],
            format!("Bearer {GITHUB_TOKEN}")
        );
        let fetched = tokens.fetches.load(Ordering::SeqCst);
        assert!(
            fetched >= 2,
            "issue and substitution each fetched: {fetched}"
        );

        tokens.hold.store(true, Ordering::SeqCst);
        let (status, after_kill) = std::thread::scope(|s| {
            let agent = s.spawn(|| lab.curl("/during", &placeholder));
            // The broker is inside substitute-auth, waiting on its token fetch: kill it now.
            wait_for(Duration::from_secs(10), "the held token fetch", || {
                tokens.held.load(Ordering::SeqCst) > 0
            });
            let killed = Instant::now();
            lab.broker.crash();
            let status = agent.join().expect("agent thread");
            (status, killed.elapsed())
        });
        eprintln!("agent answered {status} {after_kill:?} after the broker was killed");
        assert_eq!(status, 502, "the request must be refused, not sent as is");
        assert!(lab.upstream("/during").is_empty());
        let seen = lab.api.requests();
        assert_eq!(seen.len(), 1, "only /before reached upstream: {seen:?}");
        let failed = request_record(&lab.proxy_audit(), "/during");
        assert_eq!(failed["outcome"], "failed", "{failed}");
        assert_eq!(failed["status"], 502, "{failed}");
        let reason = failed["reason"].as_str().unwrap_or_default();
        assert!(reason.starts_with("substitution_unavailable: "), "{failed}");
        // Answered because the broker's connection died, not at the call deadline.
        assert!(!reason.contains("did not answer within"), "{failed}");
    });
}

// ---- The proxy killed (SIGKILL) while an agent cgroup is intercepted ----

const KILL_PROXY_PORT: u16 = 15001;
const KILL_DNS: &str = "127.0.0.1:5353";
const APP: &str = "app.test";

/// `paddock-proxy serve` as its own process in the agent namespace and its own cgroup;
/// killed on drop.
struct ServeProcess {
    child: Child,
}

impl ServeProcess {
    /// Starts `serve` and returns once it says it is ready (listeners bound, interception
    /// attached) and its listener accepts, or `Err(log)` when it exits first.
    fn start(ns: &Netns, cgroup: &CgroupGuard, config: &Path, log: &Path) -> Result<Self, String> {
        let stderr = std::fs::File::create(log).expect("log file");
        let mut cmd = Command::new(target_bin("paddock-proxy"));
        cmd.args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        place(
            &mut cmd,
            &Placement {
                netns: Some(ns),
                cgroup: Some(cgroup),
                user: None,
            },
        );
        let mut child = cmd.spawn().expect("spawn paddock-proxy serve");
        let probe = SocketAddr::from(([127, 0, 0, 1], KILL_PROXY_PORT));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "{status}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                ));
            }
            let ready = std::fs::read_to_string(log)
                .unwrap_or_default()
                .contains("proxy ready");
            if ready
                && ns
                    .run(move || std::net::TcpStream::connect(probe).is_ok())
                    .unwrap_or(false)
            {
                return Ok(Self { child });
            }
            assert!(Instant::now() < deadline, "serve did not get ready");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGKILL, as in a crash or an OOM kill: no drain, no detach.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An agent (Python, in the intercepted cgroup) that keeps one HTTPS connection to the app
/// open and sends a request per line on its stdin, answering the status or `error`.
struct KeptConnection {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const KEPT_CONNECTION: &str = r#"
import http.client, os, socket, ssl, sys
ctx = ssl.create_default_context(cafile=os.environ["PDK_CA"])
conn = http.client.HTTPSConnection("app.test", 443, context=ctx, timeout=10)
conn._create_connection = lambda a, *r, **k: socket.create_connection(("10.77.0.1", 443), *r, **k)
for line in sys.stdin:
    try:
        conn.request("GET", line.strip())
        resp = conn.getresponse()
        resp.read()
        print(resp.status, flush=True)
    except Exception as e:
        print("error", type(e).__name__, flush=True)
        break
"#;

impl KeptConnection {
    fn start(at: &Placement<'_>, ca: &str) -> Self {
        let mut cmd = Command::new("python3");
        cmd.args(["-c", KEPT_CONNECTION])
            .env("PDK_CA", ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        place(&mut cmd, at);
        let mut child = cmd.spawn().expect("spawn python3");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    fn get(&mut self, path: &str) -> String {
        writeln!(self.stdin, "{path}").expect("write to agent");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("agent answer");
        line.trim().to_owned()
    }
}

impl Drop for KeptConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one story: serve, kill, refuse to restart broken, restart; the order is the point"
)]
async fn a_killed_proxy_leaves_interception_in_place_and_nothing_bypasses_it() {
    if !require_root("a_killed_proxy_leaves_interception_in_place_and_nothing_bypasses_it") {
        return;
    }
    tokio::task::block_in_place(|| {
        // Dropped last to first: the proxy, backends, pins, cgroups, namespaces, files.
        let dir = scratch();
        let d = dir.path();
        let topo = Topology::new();
        let agent_cg = CgroupGuard::new("fk-agent");
        let proxy_cg = CgroupGuard::new("fk-proxy");
        let pins = PinDir::new();
        make_upstream_certs(d, &[APP]);
        let good_policy = format!("[[rule]]\nname = \"app\"\nhosts = [\"{APP}\"]\nports = [443]\n");
        std::fs::write(d.join("policy.toml"), &good_policy).expect("policy");
        let _dns = DnsResponder::start(
            &topo.agent,
            KILL_DNS.parse().expect("addr"),
            vec![(APP.to_owned(), std::net::Ipv4Addr::new(10, 77, 0, 1).into())],
        );
        let api = EchoApi::start(&topo.upstream, d, SocketAddr::from(([10, 77, 0, 1], 443)));
        // What the agent would reach if anything bypassed the proxy.
        let bystander = CountingListener::start(
            &topo.upstream,
            &[
                "10.77.0.1:8443".parse().expect("addr"),
                "[fd00:77::1]:8443".parse().expect("addr"),
            ],
        );
        let config = format!(
            r#"
run_id = "run-faults-kill"
[listen]
transparent = ["127.0.0.1:{KILL_PROXY_PORT}", "[::1]:{KILL_PROXY_PORT}"]
[tls]
ca_dir = "{ca}"
generate_ca = true
upstream_ca_bundle = "{bundle}"
[policy]
file = "{policy}"
[network]
allow_cidrs = ["10.77.0.0/24", "fd00:77::/64"]
nameservers = ["{KILL_DNS}"]
bypass_mark = {MARK}
[audit]
target = "{audit}"
[limits]
drain_timeout_secs = 1
[ebpf]
pin_dir = "{pins}"
agent_cgroups = ["{agent}"]
"#,
            ca = path_str(d, "ca"),
            bundle = path_str(d, "test-ca.crt"),
            policy = path_str(d, "policy.toml"),
            audit = path_str(d, "audit.jsonl"),
            pins = pins.path().display(),
            agent = agent_cg.cgroup().path().display(),
        );
        std::fs::write(d.join("proxy.toml"), config).expect("config");
        let config = d.join("proxy.toml");
        let log = d.join("serve.log");
        let at = Placement {
            netns: Some(&topo.agent),
            cgroup: Some(&agent_cg),
            user: None,
        };
        let ca = path_str(d, "ca/tls.crt");
        let curl = |path: &str| -> (u16, i32) {
            let mut cmd = Command::new("curl");
            cmd.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
                .args(["--max-time", "10", "--cacert", &ca])
                .args(["--resolve", &format!("{APP}:443:10.77.0.1")])
                .arg(format!("https://{APP}{path}"));
            let out = run(&mut cmd, &at);
            eprintln!(
                "curl {path}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            let code = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0);
            (code, out.status.code().unwrap_or(-1))
        };
        let refused = |what: &str| {
            for target in ["10.77.0.1:8443", "[fd00:77::1]:8443", "10.77.0.1:443"] {
                let v = client(&["tcp", target], &at);
                assert_eq!(v["ok"], false, "{what}: {target}: {v}");
                assert_eq!(v["errno"], 111, "{what}: {target}: ECONNREFUSED, {v}");
            }
            // curl exit 7: could not connect.
            assert_eq!(curl("/while-down"), (0, 7), "{what}");
        };
        let cgroup_id = std::fs::metadata(agent_cg.cgroup().path())
            .expect("cgroup dir")
            .ino();
        let intercepted = || {
            paddock_proxy::ebpf::agent_status(pins.path())
                .expect("status")
                .iter()
                .any(|a| a.cgroup_id == cgroup_id && a.config.is_some())
        };

        let mut proxy =
            ServeProcess::start(&topo.agent, &proxy_cg, &config, &log).expect("serve starts");
        let before = curl("/before");
        assert_eq!(
            before.0,
            200,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let mut kept = KeptConnection::start(&at, &ca);
        assert_eq!(kept.get("/kept-before"), "200");
        assert!(intercepted());

        proxy.kill();
        // The connection the proxy held is gone with it; nothing carries it on.
        assert!(
            kept.get("/kept-after").starts_with("error"),
            "kept connection"
        );
        refused("proxy killed");
        assert!(
            intercepted(),
            "interception stays pinned with the proxy dead"
        );

        // A restart with a broken policy file refuses to start; interception stays.
        std::fs::write(
            d.join("policy.toml"),
            "[[rule]]\nname = \"app\"\nhosts = [\"app.",
        )
        .expect("broken policy");
        let err = ServeProcess::start(&topo.agent, &proxy_cg, &config, &log)
            .err()
            .expect("serve must refuse a broken policy");
        assert!(
            err.contains("egress policy") && err.contains("policy.toml"),
            "{err}"
        );
        refused("restart refused");
        assert!(intercepted());

        // Fixed and restarted: the agent works again, through the same pinned programs.
        std::fs::write(d.join("policy.toml"), &good_policy).expect("policy");
        let _proxy =
            ServeProcess::start(&topo.agent, &proxy_cg, &config, &log).expect("serve restarts");
        assert_eq!(curl("/after").0, 200);

        assert_eq!(bystander.count(), 0, "something bypassed the proxy");
        let paths: Vec<_> = api
            .requests()
            .iter()
            .map(|r| r["path"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(paths, ["/before", "/kept-before", "/after"]);
    });
}
