//! Fixtures for the proxy's root-tier tests and benchmark: an nginx test host with a
//! certificate from a test CA, a WebSocket echo backend, a tiny DNS responder for the proxy's
//! resolver, and the proxy itself running in the agent namespace.
//!
//! DNS: the proxy resolves test names through [`DnsResponder`], a minimal authoritative UDP
//! responder the test runs on 127.0.0.1 inside the agent namespace (where the proxy runs); the
//! proxy config points `network.nameservers` at it. Agents themselves never resolve: clients
//! dial the test host's address with the name pinned (`curl --resolve`).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    Netns,
    process::{Placement, place},
    servers::bind_in,
};

/// Run `openssl` with `args`, panicking with its stderr on failure.
fn openssl(args: &[&str], cwd: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes a two-day P-256 CA certificate and key as `<stem>.crt` and `<stem>.key` into `dir`.
pub fn make_ca(dir: &Path, stem: &str, common_name: &str) {
    let (key, crt, subject) = (
        format!("{stem}.key"),
        format!("{stem}.crt"),
        format!("/CN={common_name}"),
    );
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "2",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        dir,
    );
}

/// Writes `test-ca.crt` and `server.{crt,key}` (SANs = `names`) into `dir`.
pub fn make_upstream_certs(dir: &Path, names: &[&str]) {
    make_ca(dir, "test-ca", "paddock upstream test CA");
    openssl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=paddock test host",
        ],
        dir,
    );
    let san = names
        .iter()
        .map(|n| {
            if n.parse::<std::net::IpAddr>().is_ok() {
                format!("IP:{n}")
            } else {
                format!("DNS:{n}")
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
    )
    .expect("write ext.cnf");
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "test-ca.crt",
            "-CAkey",
            "test-ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
        dir,
    );
}

/// nginx (Debian `nginx-light`) running in a namespace until dropped.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
}

impl Nginx {
    /// Starts nginx in `ns` serving TLS (h1 + h2) on 443 with `dir/server.{crt,key}`:
    /// `/hello.txt` (static), `/sse` (five events 300 ms apart, echo module), `PUT /upload/*`
    /// (`WebDAV` into `dir/www/upload`), `/ws` (proxied to `ws_backend`).
    pub fn start(ns: &Netns, dir: &Path, ws_backend: SocketAddr) -> Self {
        Self::start_with(
            ns,
            dir,
            ws_backend,
            SocketAddr::from(([10, 77, 0, 1], 443)),
            "",
        )
    }

    /// As [`Nginx::start`], waiting for `probe` (an address of `ns` on 443) to accept, with
    /// `extra` appended inside the `server` block (more locations).
    pub fn start_with(
        ns: &Netns,
        dir: &Path,
        ws_backend: SocketAddr,
        probe: SocketAddr,
        extra: &str,
    ) -> Self {
        let www = dir.join("www");
        std::fs::create_dir_all(www.join("upload")).expect("www");
        std::fs::create_dir_all(dir.join("tmp")).expect("tmp");
        std::fs::write(www.join("hello.txt"), "hello from the test host\n").expect("hello");
        let echo = "/usr/lib/nginx/modules/ngx_http_echo_module.so";
        let load_echo = if Path::new(echo).exists() {
            format!("load_module {echo};")
        } else {
            String::new()
        };
        let d = dir.display();
        let conf = format!(
            r#"{load_echo}
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
# Room for the first-contact benchmark's thousand connections at once, and for the idle
# benchmark's ten thousand requests sent at once (an upstream connection each).
worker_rlimit_nofile 32768;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    keepalive_requests 1000000;
    server {{
        listen 443 ssl http2 backlog=4096;
        listen [::]:443 ssl http2 backlog=4096;
        listen 80;
        ssl_certificate {d}/server.crt;
        ssl_certificate_key {d}/server.key;
        root {d}/www;
        client_max_body_size 200m;
        location /upload/ {{ dav_methods PUT; create_full_put_path on; }}
        location /sse {{
            default_type text/event-stream;
            echo "data: 1"; echo ""; echo_flush; echo_sleep 0.3;
            echo "data: 2"; echo ""; echo_flush; echo_sleep 0.3;
            echo "data: 3"; echo ""; echo_flush; echo_sleep 0.3;
            echo "data: 4"; echo ""; echo_flush; echo_sleep 0.3;
            echo "data: 5"; echo "";
        }}
        location /ws {{
            proxy_pass http://{ws_backend};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
        }}
        {extra}
    }}
}}
"#
        );
        Self::start_config(ns, dir, &conf, probe)
    }

    /// Starts nginx in `ns` with `conf`, a complete configuration (saved as `dir/nginx.conf`;
    /// it must keep nginx in the foreground with `daemon off;`), and waits until `probe`
    /// accepts connections.
    pub fn start_config(ns: &Netns, dir: &Path, conf: &str, probe: SocketAddr) -> Self {
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("nginx.conf");
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        place(&mut cmd, &Placement::netns(ns));
        let child = cmd
            .spawn()
            .expect("spawn nginx (apt-get install nginx-light)");
        let mut nginx = Self { child };
        // Wait until it listens (its own namespace: probe from inside it).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = nginx.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                panic!("nginx exited ({status}): {err}");
            }
            let up = ns
                .run(move || std::net::TcpStream::connect(probe).is_ok())
                .unwrap_or(false);
            if up {
                return nginx;
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Nginx {
    /// The master process (its workers are its children).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers and exits. SIGKILL would orphan the workers.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebSocket echo server on `addr` inside `ns` (runs on the caller's tokio runtime).
pub fn ws_echo(ns: &Netns, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    use futures_util::{SinkExt, StreamExt};
    let std_l = bind_in(ns, addr);
    std_l.set_nonblocking(true).expect("nonblocking");
    let l = tokio::net::TcpListener::from_std(std_l).expect("tokio listener");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        if ws.send(msg).await.is_err() {
                            return;
                        }
                    } else if msg.is_close() {
                        return;
                    }
                }
            });
        }
    })
}

/// A minimal authoritative DNS responder: A records from a fixed zone, empty NOERROR for other
/// types of known names, NXDOMAIN otherwise. It logs the name of every query it receives,
/// which is what a resolver an agent tunnels through would see.
#[derive(Debug)]
pub struct DnsResponder {
    pub addr: SocketAddr,
    names: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsResponder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsResponder {
    /// Serves `zone` on `addr` (UDP) inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr, zone: Vec<(String, IpAddr)>) -> Self {
        let sock = ns
            .run(move || std::net::UdpSocket::bind(addr))
            .expect("enter netns")
            .unwrap_or_else(|e| panic!("bind DNS {addr}: {e}"));
        sock.set_nonblocking(true).expect("nonblocking");
        let sock = tokio::net::UdpSocket::from_std(sock).expect("tokio udp");
        let zone = Arc::new(zone);
        let names: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let log = Arc::clone(&names);
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                if let Some(reply) = dns_answer(&buf[..n], &zone, &log) {
                    let _ = sock.send_to(&reply, peer).await;
                }
            }
        });
        Self { addr, names, task }
    }

    /// Every name queried so far (lower-cased, without the trailing dot), in order.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        self.names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

fn dns_answer(
    query: &[u8],
    zone: &[(String, IpAddr)],
    log: &std::sync::Mutex<Vec<String>>,
) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // Walk the question name.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question_end = i + 4;
    query.get(..question_end)?;
    let name = labels.join(".");
    log.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(name.clone());
    let known: Vec<IpAddr> = zone
        .iter()
        .filter(|(n, _)| *n == name)
        .map(|(_, a)| *a)
        .collect();
    // A = 1, AAAA = 28.
    let answers: Vec<IpAddr> = known
        .iter()
        .copied()
        .filter(|a| (qtype == 1 && a.is_ipv4()) || (qtype == 28 && a.is_ipv6()))
        .collect();
    let rcode: u8 = if known.is_empty() { 3 } else { 0 };
    let mut out = Vec::with_capacity(question_end + answers.len() * 16);
    out.extend_from_slice(&query[..2]);
    out.push(0x84 | (query[2] & 0x01)); // QR, AA, RD copied
    out.push(0x80 | rcode); // RA
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&u16::try_from(answers.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&query[12..question_end]);
    for a in answers {
        match a {
            IpAddr::V4(v4) => {
                out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
                out.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                out.extend_from_slice(&[0xc0, 0x0c, 0, 28, 0, 1, 0, 0, 0, 30, 0, 16]);
                out.extend_from_slice(&v6.octets());
            }
        }
    }
    Some(out)
}

/// The proxy (`paddock_app::serve::serve_until`) on its own runtime, on threads inside the
/// agent namespace (so its upstream sockets and DNS queries live there), until dropped.
#[derive(Debug)]
pub struct ProxyProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProxyProcess {
    /// Starts the proxy with `config` (TOML text) in `ns` and waits until it says it is ready
    /// (listeners bound and, with `[ebpf]`, the agent cgroups attached) and `probe` accepts.
    pub fn start(ns: &Netns, config: &str, audit: Option<&str>, probe: SocketAddr) -> Self {
        let (me, mut ready_rx, err_rx) = Self::spawn(ns, config, audit, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut ready = false;
        loop {
            if let Ok(e) = err_rx.try_recv() {
                panic!("proxy failed to start: {e}");
            }
            ready = ready || ready_rx.try_recv().is_ok();
            let up = ready
                && ns
                    .run(move || std::net::TcpStream::connect(probe).is_ok())
                    .unwrap_or(false);
            if up {
                return me;
            }
            assert!(Instant::now() < deadline, "proxy did not get ready");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// As [`ProxyProcess::start`], serving `listeners` (non-blocking, bound by the caller in
    /// `ns`, so connections may already wait in their backlog) as the transparent listeners;
    /// returns once the proxy says it is ready, without probing them.
    pub fn start_with_listeners(
        ns: &Netns,
        config: &str,
        listeners: Vec<std::net::TcpListener>,
    ) -> Self {
        let (me, mut ready_rx, err_rx) = Self::spawn(ns, config, None, listeners);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(e) = err_rx.try_recv() {
                panic!("proxy failed to start: {e}");
            }
            if ready_rx.try_recv().is_ok() {
                return me;
            }
            assert!(Instant::now() < deadline, "proxy did not get ready");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn spawn(
        ns: &Netns,
        config: &str,
        audit: Option<&str>,
        listeners: Vec<std::net::TcpListener>,
    ) -> (
        Self,
        tokio::sync::oneshot::Receiver<()>,
        std::sync::mpsc::Receiver<String>,
    ) {
        let config = paddock_app::serve::config::ServeConfig::from_toml_str(config)
            .unwrap_or_else(|e| panic!("proxy config: {e}"));
        let audit = audit.map(str::to_owned);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let (err_tx, err_rx) = std::sync::mpsc::channel::<String>();
        let path = ns.path().clone();
        let thread = std::thread::spawn(move || {
            use paddock_proxy::netns::NetnsEntry;
            let ran = path.run_in(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                let mut opts = paddock_app::serve::ServeOptions::new(config, audit);
                opts.ready = Some(ready_tx);
                opts.transparent_listeners = listeners;
                let r = rt.block_on(paddock_app::serve::serve_until(opts, async move {
                    let _ = rx.await;
                }));
                if let Err(e) = r {
                    let _ = err_tx.send(e.to_string());
                }
            });
            if let Err(e) = ran {
                eprintln!("proxy thread: {e}");
            }
        });
        let me = Self {
            stop: Some(tx),
            thread: Some(thread),
        };
        (me, ready_rx, err_rx)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Scratch directory for one test (removed on drop, also on panic).
#[must_use]
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("pdk-proxy-")
        .tempdir()
        .expect("tempdir")
}

/// `dir/name` as a string (config files want text).
#[must_use]
pub fn path_str(dir: &Path, name: &str) -> String {
    let p: PathBuf = dir.join(name);
    p.display().to_string()
}

/// Transparent listener port of the proxy inside the agent namespace.
pub const PROXY_PORT: u16 = 15001;
/// Admin listener of the proxy inside the agent namespace.
pub const ADMIN: &str = "127.0.0.1:9901";
/// Cooperative `CONNECT` listener of the proxy inside the agent namespace.
pub const CONNECT: &str = "127.0.0.1:3128";
/// The DNS responder the proxy asks, inside the agent namespace.
pub const DNS: &str = "127.0.0.1:5353";
/// The proxy's bypass `SO_MARK`.
pub const MARK: u32 = 0x70ad;
/// The test host (nginx) address.
pub const HOST_V4: &str = "10.77.0.1";
/// How many `n<i>.many.test` names the lab's DNS answers (all the test host).
pub const MANY_NAMES: usize = 1000;

/// The `i`-th of the lab's many names.
#[must_use]
pub fn many_name(i: usize) -> String {
    format!("n{i}.many.test")
}

/// Policy of the lab: `app.test`, `app6.test`, `rebind.test` and `cidr.test` allowed on 443 and 80;
/// `pass.test` (the same test host) relayed without TLS termination on 443; everything else
/// (`denied.test`) denied; [`MANY_NAMES`] distinct names under `many.test` (the test host
/// again, its certificate has `*.many.test`) allowed on 443, for first-contact benchmarks.
pub const POLICY: &str = r#"
[[rule]]
name = "test-hosts"
hosts = ["app.test", "app6.test", "rebind.test", "cidr.test"]
ports = [443, 80]

[[rule]]
name = "pass-through"
hosts = ["pass.test"]
ports = [443]
action = "passthrough"

[[rule]]
name = "many-names"
hosts = ["*.many.test"]
ports = [443]
"#;

/// An agent namespace + intercepted cgroup, a test host running nginx, a DNS responder and
/// the proxy, wired through the eBPF programs. Everything is removed on drop (also on panic).
#[derive(Debug)]
pub struct Lab {
    // Drop order: proxy first (drains), then backends, loader, pins, cgroup, namespaces, files.
    pub proxy: ProxyProcess,
    _nginx: Nginx,
    _ws: tokio::task::JoinHandle<()>,
    _dns: DnsResponder,
    _ic: paddock_proxy::ebpf::Interceptor,
    _pins: crate::PinDir,
    pub cgroup: crate::CgroupGuard,
    pub topo: crate::Topology,
    pub dir: tempfile::TempDir,
}

impl Lab {
    /// Builds the lab; `limits` is extra TOML for the proxy's `[limits]` table and `audit`
    /// the audit target (`None`: a JSONL file `audit.jsonl` in the scratch directory).
    /// Must be called inside a multi-threaded tokio runtime.
    pub fn new(limits: &str, audit: Option<&str>) -> Self {
        use paddock_proxy::{
            cgroup::Cgroup,
            ebpf::{AgentConfig, Interception, Interceptor, LoadOptions},
        };
        let dir = scratch();
        let d = dir.path();
        make_upstream_certs(
            d,
            &[
                "app.test",
                "app6.test",
                "rebind.test",
                "cidr.test",
                "pass.test",
                "*.many.test",
            ],
        );
        std::fs::write(d.join("policy.toml"), POLICY).expect("policy");
        let topo = crate::Topology::new();
        let cgroup = crate::CgroupGuard::new("px");
        let pins = crate::PinDir::new();
        let mut ic = Interceptor::load(&LoadOptions {
            pin_dir: pins.path().to_path_buf(),
            ..LoadOptions::default()
        })
        .unwrap_or_else(|e| panic!("load eBPF: {e}"));
        let mut cfg = AgentConfig::loopback(PROXY_PORT);
        cfg.bypass_mark = Some(MARK);
        ic.attach_agent(cgroup.cgroup(), &cfg)
            .unwrap_or_else(|e| panic!("attach agent: {e}"));
        // The proxy runs in this process: answer SO_ORIGINAL_DST for its accepted sockets.
        ic.attach_proxy(&Cgroup::current().expect("own cgroup"))
            .unwrap_or_else(|e| panic!("attach proxy: {e}"));
        let many = (0..MANY_NAMES).map(|i| (many_name(i), Ipv4Addr::new(10, 77, 0, 1).into()));
        let dns = DnsResponder::start(
            &topo.agent,
            DNS.parse().expect("addr"),
            many.chain([
                ("app.test".into(), Ipv4Addr::new(10, 77, 0, 1).into()),
                ("pass.test".into(), Ipv4Addr::new(10, 77, 0, 1).into()),
                // Resolves elsewhere than where the agent connects: a rebinding mismatch.
                ("rebind.test".into(), Ipv4Addr::new(10, 77, 0, 3).into()),
                // Outside the test host range the config carves out of RFC 1918.
                ("cidr.test".into(), Ipv4Addr::new(10, 77, 1, 1).into()),
                ("denied.test".into(), Ipv4Addr::new(10, 77, 0, 1).into()),
                // The test host over IPv6 only.
                (
                    "app6.test".into(),
                    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1).into(),
                ),
            ])
            .collect(),
        );
        let ws_addr: SocketAddr = "127.0.0.1:8090".parse().expect("addr");
        let ws = ws_echo(&topo.upstream, ws_addr);
        let nginx = Nginx::start(&topo.upstream, d, ws_addr);
        let audit = audit.map_or_else(|| path_str(d, "audit.jsonl"), str::to_owned);
        let config = format!(
            r#"
run_id = "run-proxy-test"
[listen]
transparent = ["127.0.0.1:{PROXY_PORT}", "[::1]:{PROXY_PORT}"]
connect = "{CONNECT}"
connect_reason = "root-tier test of cooperative mode"
[tls]
ca_dir = "{ca}"
generate_ca = true
upstream_ca_bundle = "{bundle}"
[policy]
file = "{policy}"
[network]
allow_cidrs = ["10.77.0.0/24", "fd00:77::/64"]
nameservers = ["{DNS}"]
bypass_mark = {MARK}
[audit]
target = "{audit}"
[limits]
drain_timeout_secs = 1
{limits}
[admin]
listen = "{ADMIN}"
"#,
            ca = path_str(d, "ca"),
            bundle = path_str(d, "test-ca.crt"),
            policy = path_str(d, "policy.toml"),
        );
        let proxy = ProxyProcess::start(
            &topo.agent,
            &config,
            None,
            SocketAddr::from(([127, 0, 0, 1], PROXY_PORT)),
        );
        Self {
            proxy,
            _nginx: nginx,
            _ws: ws,
            _dns: dns,
            _ic: ic,
            _pins: pins,
            cgroup,
            topo,
            dir,
        }
    }

    /// Inside the intercepted cgroup, in the agent namespace.
    #[must_use]
    pub fn agent(&self) -> Placement<'_> {
        Placement {
            netns: Some(&self.topo.agent),
            cgroup: Some(&self.cgroup),
            user: None,
        }
    }

    /// In the agent namespace but outside the intercepted cgroup (not redirected).
    #[must_use]
    pub fn beside_agent(&self) -> Placement<'_> {
        Placement {
            netns: Some(&self.topo.agent),
            cgroup: None,
            user: None,
        }
    }

    /// The run CA certificate agents trust.
    #[must_use]
    pub fn ca(&self) -> String {
        path_str(self.dir.path(), "ca/tls.crt")
    }

    /// A copy of `/etc/hosts` naming the lab's test hosts, for clients (wrk) that resolve
    /// names themselves; bind-mount it in a private mount namespace.
    #[must_use]
    pub fn hosts_file(&self) -> PathBuf {
        let path = self.dir.path().join("hosts");
        let base = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        std::fs::write(&path, format!("{base}\n{HOST_V4} app.test pass.test\n")).expect("hosts");
        path
    }
}
