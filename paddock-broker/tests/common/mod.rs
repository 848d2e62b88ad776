//! Shared harness: a broker served over loopback TLS with rcgen certificates.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use paddock_broker::{
    Broker,
    audit::MemorySink,
    auth::{
        AuthChain, Authenticator, Scope, StaticKeys,
        static_keys::{StaticKeyDefaults, format_line, hash_key},
    },
    metrics::Metrics,
    policy::PolicyStore,
    ratelimit::{RateLimitConfig, RateLimits},
    server::{self, Handle, ServerOptions, tls},
    store::Store,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every scope (the auth contract exposes no list).
pub const ALL_SCOPES: [Scope; 7] = [
    Scope::Issue,
    Scope::Renew,
    Scope::Revoke,
    Scope::ValidateEgress,
    Scope::SubstituteAuth,
    Scope::LeasesRead,
    Scope::Controller,
];

pub const CONTROLLER_KEY: &str = "ctrl-key-0123456789";
pub const TEAM_A_KEY: &str = "team-a-key-0123456789";
pub const TEAM_B_KEY: &str = "team-b-key-0123456789";
pub const READ_ONLY_KEY: &str = "read-only-key-0123456789";

#[derive(Debug)]
pub struct Pki {
    pub ca_der: CertificateDer<'static>,
    pub server_chain: Vec<CertificateDer<'static>>,
    pub server_key: PrivatePkcs8KeyDer<'static>,
    pub client_chain: Vec<CertificateDer<'static>>,
    pub client_key: PrivatePkcs8KeyDer<'static>,
}

#[must_use]
pub fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key")).expect("ca");
    let server_key = KeyPair::generate().expect("server key");
    let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&server_key, &ca)
        .expect("server cert");
    let client_key = KeyPair::generate().expect("client key");
    let client = CertificateParams::new(vec!["proxy.paddock".to_owned()])
        .expect("params")
        .signed_by(&client_key, &ca)
        .expect("client cert");
    Pki {
        ca_der: ca.der().clone(),
        server_chain: vec![server.der().clone()],
        server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()),
        client_chain: vec![client.der().clone()],
        client_key: PrivatePkcs8KeyDer::from(client_key.serialize_der()),
    }
}

#[must_use]
pub fn policy_yaml(dir: &Path) -> String {
    let s = |name: &str| dir.join(name).display().to_string();
    format!(
        "\
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata:
  name: team-a
spec:
  appliesTo:
    namespaces: [team-a]
  credentials:
    - name: gh
      provider: {{kind: user-secret, inject: {{header: {{name: Authorization, prefix: \"Bearer \"}}}}}}
      secret: {{file: {hdr}}}
      hosts: [api.github.com]
    - name: maps
      provider: {{kind: user-secret, inject: {{query: {{param: key}}}}}}
      secret: {{file: {qry}}}
      hosts: [maps.example.com]
    - name: git
      provider: {{kind: user-secret, inject: {{basic: {{username: x-access-token}}}}}}
      secret: {{file: {bas}}}
      hosts: [github.com]
    - name: pats
      provider: {{kind: pat-pool, inject: {{header: {{name: Authorization, prefix: \"Bearer \"}}}}, secrets: [{{file: {p1}}}, {{file: {p2}}}]}}
      hosts: [api.gitlab.com]
  egress:
    - hosts: [api.github.com, github.com, maps.example.com, api.gitlab.com]
      ports: [443]
      substituteAuth: true
",
        hdr = s("hdr"),
        qry = s("qry"),
        bas = s("bas"),
        p1 = s("p1"),
        p2 = s("p2"),
    )
}

#[derive(Debug)]
pub struct Env {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub handle: Option<Handle>,
    pub audit: Arc<MemorySink>,
    pub broker: Arc<Broker>,
    pub client_cert: bool,
}

#[derive(Default, Debug)]
pub struct EnvOptions {
    pub limits: RateLimitConfig,
    pub require_client_cert: bool,
    pub policy_poll: Option<Duration>,
}

#[must_use]
pub fn keys_text() -> String {
    let all: BTreeSet<Scope> = ALL_SCOPES.into_iter().collect();
    let team: BTreeSet<Scope> = ALL_SCOPES
        .into_iter()
        .filter(|s| *s != Scope::Controller)
        .collect();
    [
        format_line("ctrl", &hash_key(CONTROLLER_KEY), "paddock-system", &all),
        format_line("team-a", &hash_key(TEAM_A_KEY), "team-a", &team),
        format_line("team-b", &hash_key(TEAM_B_KEY), "team-b", &team),
        format_line(
            "reader",
            &hash_key(READ_ONLY_KEY),
            "team-a",
            &BTreeSet::from([Scope::LeasesRead]),
        ),
    ]
    .join("\n")
}

impl Env {
    #[must_use]
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("broker.db")
    }

    #[must_use]
    pub fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.yaml")
    }

    pub async fn start(opts: EnvOptions) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, value) in [
            ("hdr", "ghp_real"),
            ("qry", "maps-real"),
            ("bas", "git-real"),
            ("p1", "pat-one"),
            ("p2", "pat-two"),
        ] {
            std::fs::write(dir.path().join(name), value).expect("secret");
        }
        std::fs::write(dir.path().join("policy.yaml"), policy_yaml(dir.path())).expect("policy");
        let mut env = Env {
            dir,
            pki: pki(),
            handle: None,
            audit: Arc::new(MemorySink::default()),
            broker: Arc::new(Broker::new(
                Store::open_in_memory().expect("placeholder store"),
                Arc::new(PolicyStore::fixed(paddock_broker::policy::Policy::default())),
                Arc::new(MemorySink::default()),
                RateLimits::new(&RateLimitConfig::default()).expect("limits"),
            )),
            client_cert: opts.require_client_cert,
        };
        env.boot(&opts).await;
        env
    }

    /// (Re)starts the server on the same database file and policy.
    pub async fn boot(&mut self, opts: &EnvOptions) {
        let policy = Arc::new(PolicyStore::load(&self.policy_path()).expect("policy"));
        let store = Store::open(&self.db_path()).expect("store");
        self.broker = Arc::new(Broker::new(
            store,
            policy,
            self.audit.clone(),
            RateLimits::new(&opts.limits).expect("limits"),
        ));
        let keys = StaticKeys::from_text(&keys_text(), StaticKeyDefaults::default()).expect("keys");
        let auth: Arc<dyn Authenticator> = Arc::new(AuthChain::new(vec![Arc::new(keys)]));
        let tls = tls::server_config(
            self.pki.server_chain.clone(),
            PrivateKeyDer::Pkcs8(self.pki.server_key.clone_key()),
            opts.require_client_cert
                .then(|| vec![self.pki.ca_der.clone()]),
        )
        .expect("tls");
        let handle = server::spawn(ServerOptions {
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin_listen: Some("127.0.0.1:0".parse().expect("addr")),
            tls,
            broker: self.broker.clone(),
            auth,
            metrics: Arc::new(Metrics::new()),
            policy_poll: opts.policy_poll,
            rate_limit_sweep: Duration::from_mins(1),
        })
        .await
        .expect("spawn");
        self.handle = Some(handle);
    }

    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }

    fn connector(&self, with_client_cert: bool) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.pki.ca_der.clone()).expect("root");
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots);
        let config = if with_client_cert {
            builder
                .with_client_auth_cert(
                    self.pki.client_chain.clone(),
                    PrivateKeyDer::Pkcs8(self.pki.client_key.clone_key()),
                )
                .expect("client cert")
        } else {
            builder.with_no_client_auth()
        };
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// Whether a TLS 1.2-only client completes a handshake (it must not: TLS 1.3 only).
    pub async fn tls12_handshake_succeeds(&self) -> bool {
        let addr = self.handle.as_ref().expect("running").addr;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.pki.ca_der.clone()).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("tls12")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("localhost").expect("name"), tcp)
                .await
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(10), attempt).await,
            Ok(Ok(_))
        )
    }

    /// Sends raw request bytes over TLS and returns (status, head, body).
    pub async fn raw_with(
        &self,
        request: &[u8],
        with_client_cert: bool,
    ) -> std::io::Result<(u16, String, Vec<u8>)> {
        let addr = self.handle.as_ref().expect("running").addr;
        let io = async {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let mut tls = self
                .connector(with_client_cert)
                .connect(ServerName::try_from("localhost").expect("name"), tcp)
                .await?;
            // The server may answer (e.g. 431) and close before the whole request is written;
            // the answer is still readable, so a write error is only fatal if nothing comes back.
            let written = async {
                tls.write_all(request).await?;
                tls.flush().await
            }
            .await;
            let mut out = Vec::new();
            match tls.read_to_end(&mut out).await {
                Ok(_) => {}
                // Peers may close without close_notify after a complete response.
                Err(_) if !out.is_empty() => {}
                Err(e) => return Err(written.err().unwrap_or(e)),
            }
            Ok(out)
        };
        let out = tokio::time::timeout(Duration::from_secs(10), io)
            .await
            .map_err(|_| std::io::Error::other("timeout"))??;
        parse_response(&out)
    }

    pub async fn raw(&self, request: &[u8]) -> (u16, String, Vec<u8>) {
        self.raw_with(request, self.client_cert)
            .await
            .expect("request")
    }

    pub async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let auth = key
            .map(|k| format!("Authorization: Bearer {k}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let (status, _, body) = self.raw(req.as_bytes()).await;
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn get(&self, path: &str, key: &str) -> (u16, serde_json::Value) {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        );
        let (status, _, body) = self.raw(req.as_bytes()).await;
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let addr = self
            .handle
            .as_ref()
            .and_then(|h| h.admin_addr)
            .expect("admin");
        let io = async {
            let mut tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            let mut out = Vec::new();
            tcp.read_to_end(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        let out = tokio::time::timeout(Duration::from_secs(10), io)
            .await
            .expect("timeout")
            .expect("admin io");
        let (status, _, body) = parse_response(&out).expect("parse");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    pub async fn register(&self, run: &str, namespace: &str, phase: &str) {
        let body = format!(
            r#"{{"run":"{run}","namespace":"{namespace}","template":"t","phase":"{phase}"}}"#
        );
        let (status, v) = self.post("/v1/runs", Some(CONTROLLER_KEY), &body).await;
        assert_eq!(status, 200, "{v}");
    }
}

fn parse_response(out: &[u8]) -> std::io::Result<(u16, String, Vec<u8>)> {
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    Ok((status, head, out[split + 4..].to_vec()))
}

/// One request over TLS to `addr`, trusting `ca`; returns (status, body as JSON or Null).
pub async fn tls_json(
    addr: std::net::SocketAddr,
    ca: &CertificateDer<'static>,
    request: &str,
) -> (u16, serde_json::Value) {
    let (status, _, body) = tls_raw(addr, ca, request).await;
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// One request over TLS to `addr`, trusting `ca`; returns (status, head, body bytes).
pub async fn tls_raw(
    addr: std::net::SocketAddr,
    ca: &CertificateDer<'static>,
    request: &str,
) -> (u16, String, Vec<u8>) {
    try_tls_raw(addr, ca, request).await.expect("io")
}

/// [`tls_raw`] that reports a failed connection (refused, reset, cut short, 10 s timeout)
/// instead of panicking.
pub async fn try_tls_raw(
    addr: std::net::SocketAddr,
    ca: &CertificateDer<'static>,
    request: &str,
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let io = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await?;
        tls.write_all(request.as_bytes()).await?;
        let mut out = Vec::new();
        match tls.read_to_end(&mut out).await {
            Ok(_) => {}
            Err(_) if !out.is_empty() => {}
            Err(e) => return Err(e),
        }
        Ok::<_, std::io::Error>(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "10 s"))??;
    parse_response(&out)
}

/// A JSON POST request with `Connection: close`.
pub fn post_request(path: &str, key: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A `paddock-broker serve` process, killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct Served {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
    logs: std::sync::mpsc::Receiver<serde_json::Value>,
}
impl Served {
    /// Waits (bounded) for a log line whose message contains `needle`.
    pub fn wait_log(&self, needle: &str) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .logs
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line containing {needle:?}"));
            if line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(needle))
            {
                return line;
            }
        }
    }

    pub fn hangup(&self) {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `paddock-broker serve --config CONFIG` and waits (bounded) for its address.
pub fn serve(config: &Path) -> Served {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_paddock-broker"))
        .args(["serve", "--config"])
        .arg(config)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn broker");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let addr = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let v = rx
            .recv_timeout(left)
            .expect("broker did not report its address");
        if v["fields"]["message"] == "broker listening"
            && let Some(addr) = v["fields"]["addr"]
                .as_str()
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        {
            break addr;
        }
    };
    Served {
        child,
        addr,
        logs: rx,
    }
}

/// Writes what a served broker reads into `d`: the secrets, `policy.yaml`, `keys`, and a
/// server certificate (`cert.pem`, `key.pem`). Returns the CA that signed it.
pub fn write_broker_files(d: &Path) -> CertificateDer<'static> {
    for (name, value) in [
        ("hdr", "ghp_real"),
        ("qry", "maps-real"),
        ("bas", "git-real"),
        ("p1", "pat-one"),
        ("p2", "pat-two"),
    ] {
        std::fs::write(d.join(name), value).expect("secret");
    }
    std::fs::write(d.join("policy.yaml"), policy_yaml(d)).expect("policy");
    std::fs::write(d.join("keys"), keys_text()).expect("keys");
    let pki = pki();
    let pem = |der: &[u8], label: &str| {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    };
    std::fs::write(d.join("cert.pem"), pem(&pki.server_chain[0], "CERTIFICATE")).expect("cert");
    std::fs::write(
        d.join("key.pem"),
        pem(pki.server_key.secret_pkcs8_der(), "PRIVATE KEY"),
    )
    .expect("key");
    pki.ca_der
}
