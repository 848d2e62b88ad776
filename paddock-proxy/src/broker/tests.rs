//! The broker client against a real in-process broker (`paddock_broker::server::spawn`) over
//! loopback TLS 1.3: every placeholder position, refusals, revocation, policy changes, a
//! stopped or silent broker, bearer rotation and client certificates; then one request path
//! end to end through `http::serve_connection`.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use paddock_broker::audit::MemorySink;
use paddock_broker::auth::static_keys::{StaticKeyDefaults, format_line, hash_key};
use paddock_broker::auth::{AuthChain, Authenticator, Scope, StaticKeys};
use paddock_broker::metrics::Metrics;
use paddock_broker::policy::PolicyStore;
use paddock_broker::ratelimit::{RateLimitConfig, RateLimits};
use paddock_broker::server::{self, Handle, ServerOptions, tls};
use paddock_broker::store::Store;
use paddock_wire::api::{
    ErrorCode, IssueRequest, RevokeRequest, RunPhase, RunUpsertRequest, SubstituteAuthRequest,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::audit::MemorySink as ProxyAuditSink;
use crate::http::{
    BoxFuture, ConnectError, HttpLimits, RequestAudit, RequestContext, RequestHead,
    SubstituteError, Substituted, Substituter, UpstreamConnector, UpstreamPool, UpstreamStream,
    UpstreamTarget, serve_connection,
};
use crate::policy::{Decision, EgressPolicy, EgressRequest, Mode, RecheckError};

const CONTROLLER_KEY: &str = "controller-key-0123456789";
const PROXY_KEY: &str = "proxy-key-0123456789";
const PROXY_KEY_ROTATED: &str = "proxy-key-rotated-9876543210";

const HEADER_SECRET: &str = "ghp_real_header_secret";
const QUERY_SECRET: &str = "maps real/secret+1";
const BASIC_SECRET: &str = "git-real-basic-secret";
const ANTHROPIC_SECRET: &str = "sk-ant-real-api-key";
const ALL_SECRETS: [&str; 4] = [HEADER_SECRET, QUERY_SECRET, BASIC_SECRET, ANTHROPIC_SECRET];

const RUN: &str = "run-1";
/// Bound on every wait, so a broken client fails instead of hanging.
const WAIT: Duration = Duration::from_secs(20);

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("waiting for {what}"))
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ascii"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

struct Pki {
    ca: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivatePkcs8KeyDer<'static>,
    client_cert: PathBuf,
    client_key: PathBuf,
    ca_file: PathBuf,
}

fn pki(dir: &Path) -> Pki {
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
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, pem("CERTIFICATE", ca.der())).expect("ca file");
    let client_cert = dir.join("client.pem");
    std::fs::write(&client_cert, pem("CERTIFICATE", client.der())).expect("client cert");
    let client_key_file = dir.join("client.key");
    std::fs::write(&client_key_file, client_key.serialize_pem()).expect("client key");
    Pki {
        ca: ca.der().clone(),
        server_chain: vec![server.der().clone()],
        server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()),
        client_cert,
        client_key: client_key_file,
        ca_file,
    }
}

/// Four credentials, one per placeholder position, and three kinds of destination:
/// substituted, allowed without substitution, and (anything else) denied.
fn policy_yaml(dir: &Path, with_plain_host: bool) -> String {
    let s = |name: &str| dir.join(name).display().to_string();
    let plain = if with_plain_host {
        "    - {hosts: [plain.example.com], ports: [443]}\n    - {hosts: [registry.example.com], ports: [443], passthrough: true}\n"
    } else {
        ""
    };
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
    - name: anthropic
      provider: {{kind: anthropic-api-key}}
      secret: {{file: {ant}}}
      hosts: [api.anthropic.com]
  egress:
    - hosts: [api.github.com, github.com, maps.example.com, api.anthropic.com]
      ports: [443]
      substituteAuth: true
{plain}",
        hdr = s("hdr"),
        qry = s("qry"),
        bas = s("bas"),
        ant = s("ant"),
    )
}

fn keys_text() -> String {
    let all = BTreeSet::from([
        Scope::Issue,
        Scope::Renew,
        Scope::Revoke,
        Scope::ValidateEgress,
        Scope::SubstituteAuth,
        Scope::LeasesRead,
        Scope::Controller,
    ]);
    let proxy = BTreeSet::from([Scope::ValidateEgress, Scope::SubstituteAuth]);
    [
        format_line("ctrl", &hash_key(CONTROLLER_KEY), "paddock-system", &all),
        format_line("proxy", &hash_key(PROXY_KEY), "team-a", &proxy),
        format_line("proxy2", &hash_key(PROXY_KEY_ROTATED), "team-a", &proxy),
    ]
    .join("\n")
}

#[derive(Default)]
struct Options {
    require_client_cert: bool,
    policy_poll: Option<Duration>,
    limits: Option<RateLimitConfig>,
}

/// A broker served in-process on 127.0.0.1:0, a registered running run, and clients.
struct Fixture {
    dir: tempfile::TempDir,
    pki: Pki,
    handle: Option<Handle>,
    broker: Arc<paddock_broker::Broker>,
    /// The broker's audit trail.
    audit: Arc<MemorySink>,
    /// Controller client: registers runs, issues and revokes.
    admin: BrokerClient,
}

impl Fixture {
    async fn start(opts: Options) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, value) in [
            ("hdr", HEADER_SECRET),
            ("qry", QUERY_SECRET),
            ("bas", BASIC_SECRET),
            ("ant", ANTHROPIC_SECRET),
            ("admin-token", CONTROLLER_KEY),
            ("proxy-token", PROXY_KEY),
        ] {
            std::fs::write(dir.path().join(name), value).expect("write");
        }
        let policy_path = dir.path().join("policy.yaml");
        std::fs::write(&policy_path, policy_yaml(dir.path(), true)).expect("policy");
        let pki = pki(dir.path());
        let audit = Arc::new(MemorySink::default());
        let broker = Arc::new(paddock_broker::Broker::new(
            Store::open(&dir.path().join("broker.db")).expect("store"),
            Arc::new(PolicyStore::load(&policy_path).expect("policy")),
            audit.clone(),
            RateLimits::new(&opts.limits.clone().unwrap_or_default()).expect("limits"),
        ));
        let keys = StaticKeys::from_text(&keys_text(), StaticKeyDefaults::default()).expect("keys");
        let auth: Arc<dyn Authenticator> = Arc::new(AuthChain::new(vec![Arc::new(keys)]));
        let tls = tls::server_config(
            pki.server_chain.clone(),
            PrivateKeyDer::Pkcs8(pki.server_key.clone_key()),
            opts.require_client_cert.then(|| vec![pki.ca.clone()]),
        )
        .expect("tls");
        let handle = server::spawn(ServerOptions {
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin_listen: None,
            tls,
            broker: broker.clone(),
            auth,
            metrics: Arc::new(Metrics::new()),
            policy_poll: opts.policy_poll,
            rate_limit_sweep: Duration::from_mins(1),
        })
        .await
        .expect("spawn broker");
        let mut admin_config = BrokerClientConfig::new(
            format!("https://127.0.0.1:{}", handle.addr.port()),
            &pki.ca_file,
        );
        admin_config.bearer_file = Some(dir.path().join("admin-token"));
        if opts.require_client_cert {
            admin_config.client_cert = Some(ClientCertFiles {
                cert_chain: pki.client_cert.clone(),
                key: pki.client_key.clone(),
            });
        }
        let admin = BrokerClient::new(&admin_config).expect("admin client");
        let fixture = Self {
            dir,
            pki,
            handle: Some(handle),
            broker,
            audit,
            admin,
        };
        within(
            "run registration",
            fixture.admin.upsert_run(&RunUpsertRequest {
                run: RUN.into(),
                namespace: "team-a".into(),
                template: "t".into(),
                phase: RunPhase::Running,
            }),
        )
        .await
        .expect("register run");
        fixture
    }

    fn addr(&self) -> SocketAddr {
        self.handle.as_ref().expect("broker running").addr
    }

    /// The proxy's client configuration: bearer from `proxy-token`, 5 s default timeout.
    fn proxy_config(&self) -> BrokerClientConfig {
        let mut c = BrokerClientConfig::new(
            format!("https://127.0.0.1:{}", self.addr().port()),
            &self.pki.ca_file,
        );
        c.bearer_file = Some(self.dir.path().join("proxy-token"));
        c
    }

    fn proxy_client(&self) -> BrokerClient {
        BrokerClient::new(&self.proxy_config()).expect("proxy client")
    }

    /// Issues a lease of `credential` for the run; returns (lease id, placeholder).
    async fn issue(&self, credential: &str) -> (String, String) {
        let issued = within(
            "issue",
            self.admin.issue(&IssueRequest {
                run: RUN.into(),
                credential: credential.into(),
            }),
        )
        .await
        .expect("issue");
        assert!(issued.value.starts_with("pdk-"), "placeholder issued");
        (issued.lease_id, issued.value)
    }

    async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            within("broker shutdown", h.shutdown()).await;
        }
    }
}

fn ctx(host: &str) -> RequestContext {
    RequestContext {
        run: RUN.into(),
        host: host.into(),
        port: 443,
        sni: Some(host.into()),
    }
}

fn request(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = Request::get(uri);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(()).expect("request").into_parts().0
}

async fn substitute(
    sub: &dyn Substituter,
    parts: &mut http::request::Parts,
    host: &str,
) -> Result<Substituted, SubstituteError> {
    within(
        "substitution",
        sub.substitute(&mut RequestHead::new(parts), &ctx(host)),
    )
    .await
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

fn assert_no_placeholder(parts: &http::request::Parts, placeholder: &str) {
    let shown = format!("{:?} {:?}", parts.uri, parts.headers);
    assert!(!shown.contains(placeholder), "placeholder left: {shown}");
}

/// A placeholder in a cleartext (plain-HTTP) request is refused in every position: the
/// credentials are TLS-only unless their grant says `allowCleartext`. Nothing is edited.
#[tokio::test]
async fn cleartext_requests_are_refused_substitution() {
    let fx = Fixture::start(Options::default()).await;
    let sub = BrokerSubstituter::new(fx.proxy_client());
    let plain = |host: &str| RequestContext {
        sni: None,
        ..ctx(host)
    };
    let (_, gh) = fx.issue("gh").await;
    let (_, maps) = fx.issue("maps").await;
    let (_, git) = fx.issue("git").await;
    let cases = [
        (
            "api.github.com",
            request(
                "http://api.github.com/user",
                &[(AUTHORIZATION.as_str(), &format!("Bearer {gh}"))],
            ),
        ),
        (
            "maps.example.com",
            request(&format!("http://maps.example.com/geo?key={maps}"), &[]),
        ),
        (
            "github.com",
            request(
                "http://github.com/o/r.git/info/refs",
                &[(AUTHORIZATION.as_str(), &basic("x-access-token", &git))],
            ),
        ),
    ];
    for (host, mut parts) in cases {
        let before = format!("{:?} {:?}", parts.uri, parts.headers);
        let err = within(
            "substitution",
            sub.substitute(&mut RequestHead::new(&mut parts), &plain(host)),
        )
        .await
        .expect_err("cleartext refused");
        assert!(
            matches!(err, SubstituteError::TlsRequired { .. }),
            "{host}: {err:?}"
        );
        assert_eq!(err.status(), http::StatusCode::FORBIDDEN);
        assert_eq!(err.reason(), "tls_required");
        assert!(err.to_string().contains("only be sent over TLS"), "{err}");
        assert_eq!(format!("{:?} {:?}", parts.uri, parts.headers), before);
    }
}

#[tokio::test]
async fn each_placeholder_position_gets_the_real_secret() {
    let fx = Fixture::start(Options::default()).await;
    let metrics = std::sync::Arc::new(crate::metrics::ProxyMetrics::new());
    let sub =
        BrokerSubstituter::new(fx.proxy_client()).with_metrics(std::sync::Arc::clone(&metrics));

    // Authorization: Bearer <placeholder>
    let (gh_lease, gh) = fx.issue("gh").await;
    let mut p = request(
        "https://api.github.com/user?per_page=5",
        &[(AUTHORIZATION.as_str(), &format!("Bearer {gh}"))],
    );
    let done = substitute(&sub, &mut p, "api.github.com")
        .await
        .expect("header substituted");
    assert_eq!(
        done,
        Substituted {
            credential: Some("gh".into()),
            lease_id: Some(gh_lease),
            secrets: vec![crate::scrub::SecretPair {
                secret: HEADER_SECRET.as_bytes().to_vec(),
                placeholder: gh.clone(),
            }],
            egress_checked: true,
            hold: crate::http::Hold::default(),
        },
        "the broker's names for what went in (for the audit record) and the secret with the \
         placeholder it replaced (for scrubbing)"
    );
    assert_eq!(p.headers[AUTHORIZATION], format!("Bearer {HEADER_SECRET}"));
    assert!(p.headers[AUTHORIZATION].is_sensitive());
    assert_eq!(p.uri.query(), Some("per_page=5"));
    assert!(
        metrics
            .encode()
            .lines()
            .any(|l| l.starts_with("paddock_proxy_substitutions_total 1")),
        "an applied substitution is counted: {}",
        metrics.encode()
    );

    // ?key=<placeholder>, the other parameters byte for byte.
    let (_, maps) = fx.issue("maps").await;
    let mut p = request(
        &format!("https://maps.example.com/geo?q=a%20b&key={maps}&z=1"),
        &[],
    );
    substitute(&sub, &mut p, "maps.example.com")
        .await
        .expect("query substituted");
    assert_eq!(
        p.uri.query(),
        Some("q=a%20b&key=maps%20real%2Fsecret%2B1&z=1")
    );
    assert_no_placeholder(&p, &maps);

    // Basic auth as git sends it: base64(user:placeholder).
    let (_, git) = fx.issue("git").await;
    let mut p = request(
        "https://github.com/org/repo.git/info/refs?service=git-upload-pack",
        &[(AUTHORIZATION.as_str(), &basic("x-access-token", &git))],
    );
    substitute(&sub, &mut p, "github.com")
        .await
        .expect("basic substituted");
    assert_eq!(
        p.headers[AUTHORIZATION],
        basic("x-access-token", BASIC_SECRET)
    );

    // x-api-key, with the Anthropic header allow-list applied.
    let (_, ant) = fx.issue("anthropic").await;
    let mut p = request(
        "https://api.anthropic.com/v1/messages",
        &[
            ("x-api-key", &ant),
            ("anthropic-version", "2023-06-01"),
            ("x-tracking", "drop-me"),
            ("content-type", "application/json"),
        ],
    );
    substitute(&sub, &mut p, "api.anthropic.com")
        .await
        .expect("x-api-key substituted");
    assert_eq!(p.headers["x-api-key"], ANTHROPIC_SECRET);
    assert_eq!(p.headers["anthropic-version"], "2023-06-01");
    assert_eq!(p.headers["content-type"], "application/json");
    assert!(
        !p.headers.contains_key("x-tracking"),
        "allow-list strips the rest"
    );
}

#[tokio::test]
async fn foreign_hosts_and_unknown_placeholders_are_refused() {
    let fx = Fixture::start(Options::default()).await;
    let sub = BrokerSubstituter::new(fx.proxy_client());
    let (_, gh) = fx.issue("gh").await;
    let bearer = format!("Bearer {gh}");
    // Egress allowed but no substitution grant, a substituted host the lease is not bound
    // to, and a well-formed placeholder the broker never issued.
    let forged = format!("Bearer pdk-user-secret-{}", "0".repeat(48));
    for (host, value) in [
        ("plain.example.com", bearer.as_str()),
        ("maps.example.com", bearer.as_str()),
        ("api.github.com", forged.as_str()),
    ] {
        let mut p = request(
            &format!("https://{host}/x"),
            &[(AUTHORIZATION.as_str(), value)],
        );
        let err = substitute(&sub, &mut p, host).await.expect_err("refused");
        assert!(
            matches!(err, SubstituteError::Denied { .. }),
            "{host}: {err}"
        );
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
        assert_eq!(p.headers[AUTHORIZATION], value, "request left as it was");
    }
}

#[tokio::test]
async fn revocation_refuses_the_next_substitution() {
    let fx = Fixture::start(Options::default()).await;
    let sub = BrokerSubstituter::new(fx.proxy_client());
    let (lease, gh) = fx.issue("gh").await;
    let bearer = format!("Bearer {gh}");
    let mut p = request(
        "https://api.github.com/",
        &[(AUTHORIZATION.as_str(), &bearer)],
    );
    substitute(&sub, &mut p, "api.github.com")
        .await
        .expect("before revocation");

    let revoked = within(
        "revoke",
        fx.admin.revoke(&RevokeRequest { lease_id: lease }),
    )
    .await
    .expect("revoke");
    assert!(revoked.revoked);

    let mut p = request(
        "https://api.github.com/",
        &[(AUTHORIZATION.as_str(), &bearer)],
    );
    let err = substitute(&sub, &mut p, "api.github.com")
        .await
        .expect_err("revoked");
    assert!(matches!(err, SubstituteError::Denied { .. }), "{err}");
}

#[tokio::test]
async fn requests_without_placeholders_never_reach_the_broker() {
    // A client pointing at a closed port: any broker call would fail.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let dir = tempfile::tempdir().expect("tempdir");
    let fx_pki = pki(dir.path());
    std::fs::write(dir.path().join("token"), PROXY_KEY).expect("token");
    let mut config = BrokerClientConfig::new(format!("https://127.0.0.1:{port}"), &fx_pki.ca_file);
    config.bearer_file = Some(dir.path().join("token"));
    let sub = BrokerSubstituter::new(BrokerClient::new(&config).expect("client"));

    let mut p = request(
        "https://api.github.com/x?a=1",
        &[
            (AUTHORIZATION.as_str(), &basic("me", "my-own-password")),
            ("x-api-key", "sk-not-a-placeholder"),
        ],
    );
    let before = (p.uri.clone(), p.headers.clone());
    substitute(&sub, &mut p, "api.github.com")
        .await
        .expect("no placeholder, no call");
    assert_eq!((p.uri.clone(), p.headers.clone()), before);

    // The same substituter with a placeholder does call, and fails closed.
    let mut p = request(
        "https://api.github.com/x",
        &[("x-api-key", "pdk-user-secret-anything")],
    );
    let err = substitute(&sub, &mut p, "api.github.com")
        .await
        .expect_err("broker unreachable");
    assert!(matches!(err, SubstituteError::Unavailable { .. }), "{err}");
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn a_stopped_broker_fails_closed_within_the_timeout() {
    let mut fx = Fixture::start(Options::default()).await;
    let client = fx.proxy_client();
    let sub = BrokerSubstituter::new(client.clone());
    let policy = BrokerPolicy::new(client.clone());
    let (_, gh) = fx.issue("gh").await;
    let bearer = format!("Bearer {gh}");
    let egress =
        EgressRequest::new(RUN, "api.github.com", 443, Mode::Transparent).expect("request");
    assert!(
        within("check", policy.check(&egress))
            .await
            .expect("up")
            .is_allowed()
    );
    let mut p = request(
        "https://api.github.com/",
        &[(AUTHORIZATION.as_str(), &bearer)],
    );
    substitute(&sub, &mut p, "api.github.com")
        .await
        .expect("pooled connection in use");

    fx.stop().await;
    let started = Instant::now();
    let mut p = request(
        "https://api.github.com/",
        &[(AUTHORIZATION.as_str(), &bearer)],
    );
    let err = substitute(&sub, &mut p, "api.github.com")
        .await
        .expect_err("broker gone");
    assert!(matches!(err, SubstituteError::Unavailable { .. }), "{err}");
    assert_eq!(p.headers[AUTHORIZATION], bearer.as_str());
    let err = within("check", policy.check(&egress))
        .await
        .expect_err("policy fails closed");
    assert!(matches!(err, crate::policy::PolicyError::Unavailable(_)));
    assert!(
        started.elapsed() < client.timeout(),
        "{:?}",
        started.elapsed()
    );
    // Through the request loop: a 502, and the upstream gets nothing.
    let (upstream, seen, up_task) = recording_upstream().await;
    let (_sink, _metrics, audit) = capture_audit();
    let (status, answer) = agent_request(
        false,
        "api.github.com",
        "/",
        &[(AUTHORIZATION.as_str(), &bearer)],
        upstream,
        Arc::new(sub),
        audit,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{answer}");
    assert!(seen.lock().expect("seen").is_empty(), "forwarded");
    up_task.abort();
}

#[tokio::test]
async fn a_silent_broker_times_out() {
    // Accepts TCP and never speaks TLS.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let held = Arc::new(Mutex::new(Vec::<TcpStream>::new()));
    let held_in = held.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            held_in.lock().expect("held").push(tcp);
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let fx_pki = pki(dir.path());
    std::fs::write(dir.path().join("token"), PROXY_KEY).expect("token");
    let mut config = BrokerClientConfig::new(format!("https://{addr}"), &fx_pki.ca_file);
    config.bearer_file = Some(dir.path().join("token"));
    config.timeout = Duration::from_millis(300);
    let client = BrokerClient::new(&config).expect("client");

    let started = Instant::now();
    let err = within(
        "timeout",
        client.substitute_auth(&SubstituteAuthRequest {
            run: RUN.into(),
            pod: None,
            host: "api.github.com".into(),
            port: 443,
            transport: paddock_wire::api::Transport::Tls,
            method: "GET".into(),
            path: "/".into(),
            query: None,
            headers: Vec::new(),
            subscription: None,
        }),
    )
    .await
    .expect_err("silent broker");
    let elapsed = started.elapsed();
    assert!(matches!(err, BrokerCallError::Timeout(_)), "{err}");
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    let policy = BrokerPolicy::new(client);
    let egress =
        EgressRequest::new(RUN, "api.github.com", 443, Mode::Transparent).expect("request");
    assert!(within("check", policy.check(&egress)).await.is_err());
    assert!(
        !held.lock().expect("held").is_empty(),
        "the client did dial"
    );
    task.abort();
}

/// How a [`StandInBroker`] fails once it has read a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dies {
    /// Resets the connection: a crash (SIGKILL, OOM) with the request in flight.
    Reset,
    /// Sends half an answer, then closes: a crash while writing the answer.
    HalfAnswer,
    /// Never answers: a hung broker.
    Silent,
}

/// A broker stand-in on loopback TLS (the fixture PKI): it completes the handshake and reads
/// each request head, then fails as told. Counts the request heads it read.
struct StandInBroker {
    addr: SocketAddr,
    heads: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandInBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandInBroker {
    async fn start(pki: &Pki, dies: Dies) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let config = tls::server_config(
            pki.server_chain.clone(),
            PrivateKeyDer::Pkcs8(pki.server_key.clone_key()),
            None,
        )
        .expect("tls");
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let heads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = heads.clone();
        let task = tokio::spawn(async move {
            let mut hung = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                match dies {
                    Dies::Reset => {
                        let (tcp, _) = tls.into_inner();
                        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                    }
                    Dies::HalfAnswer => {
                        let _ = tls
                            .write_all(
                                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                  content-length: 400\r\n\r\n{\"headers\":[{\"name\":\"authorization\"",
                            )
                            .await;
                        let _ = tls.flush().await;
                        let (tcp, _) = tls.into_inner();
                        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                    }
                    Dies::Silent => hung.push(tls),
                }
            }
        });
        Self { addr, heads, task }
    }

    fn heads(&self) -> usize {
        self.heads.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A substitution in flight when the broker dies, half answers or hangs: the agent gets a
/// 502, the upstream gets nothing, the request is on record as failed, and the broker was
/// asked at most twice (the client retries once a request whose connection closed under it,
/// never anywhere else). The egress check against the same broker fails closed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_failing_mid_request_gets_a_502_and_nothing_reaches_upstream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fx_pki = pki(dir.path());
    std::fs::write(dir.path().join("token"), PROXY_KEY).expect("token");
    let (upstream, seen, up_task) = recording_upstream().await;
    let placeholder = "pdk-user-secret-0123456789abcdef0123456789abcdef0123456789abcdef";
    let timeout = Duration::from_millis(1500);
    for dies in [Dies::Reset, Dies::HalfAnswer, Dies::Silent] {
        let broker = StandInBroker::start(&fx_pki, dies).await;
        let mut config =
            BrokerClientConfig::new(format!("https://{}", broker.addr), &fx_pki.ca_file);
        config.bearer_file = Some(dir.path().join("token"));
        config.timeout = timeout;
        let client = BrokerClient::new(&config).expect("client");
        let sub: Arc<dyn Substituter> = Arc::new(BrokerSubstituter::new(client.clone()));
        let (sink, _metrics, audit) = capture_audit();
        let started = Instant::now();
        for h2 in [false, true] {
            let (status, answer) = agent_request(
                h2,
                "api.github.com",
                "/user",
                &[(AUTHORIZATION.as_str(), &format!("Bearer {placeholder}"))],
                upstream,
                sub.clone(),
                audit.clone(),
            )
            .await;
            assert_eq!(
                status,
                StatusCode::BAD_GATEWAY,
                "{dies:?} h2={h2}: {answer}"
            );
        }
        let elapsed = started.elapsed();
        if dies == Dies::Silent {
            assert!(
                elapsed >= timeout,
                "{dies:?}: answered before the deadline: {elapsed:?}"
            );
        } else {
            assert!(
                elapsed < timeout,
                "{dies:?}: waited for the deadline: {elapsed:?}"
            );
        }
        assert!(seen.lock().expect("seen").is_empty(), "{dies:?}: forwarded");
        assert!(
            (2..=4).contains(&broker.heads()),
            "{dies:?}: two requests, each asked at most twice: {}",
            broker.heads()
        );
        let records = sink.records();
        assert_eq!(records.len(), 2, "{records:?}");
        for r in &records {
            assert_eq!(r["outcome"], "failed", "{r}");
            assert_eq!(r["status"], 502, "{r}");
            assert!(
                r["reason"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("substitution_unavailable: ")),
                "{r}"
            );
        }
        let policy = BrokerPolicy::new(client);
        let egress =
            EgressRequest::new(RUN, "api.github.com", 443, Mode::Transparent).expect("request");
        assert!(
            within("check", policy.check(&egress)).await.is_err(),
            "{dies:?}: egress must fail closed"
        );
    }
    up_task.abort();
}

/// A broker replica killed with a call's request read but not answered (its kernel closes the
/// keep-alive connection) fails no call: the client asks again on a new connection, which a
/// Service gives to another replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_a_call_fails_no_call() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().expect("tempdir");
    let fx_pki = pki(dir.path());
    std::fs::write(dir.path().join("token"), PROXY_KEY).expect("token");
    let config = tls::server_config(
        fx_pki.server_chain.clone(),
        PrivateKeyDer::Pkcs8(fx_pki.server_key.clone_key()),
        None,
    )
    .expect("tls");
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let (conns, answers) = (connections.clone(), answered.clone());
    // Every connection answers `revoke`; the first one dies with its second request read.
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let nth = conns.fetch_add(1, Ordering::SeqCst);
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let answers = answers.clone();
            tokio::spawn(async move {
                let mut served = 0usize;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match tls.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + length {
                        match tls.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..end + 4 + length);
                    if nth == 0 && served > 0 {
                        // The replica's process dies with this request read: its kernel
                        // closes the connection, nothing is answered.
                        return;
                    }
                    served += 1;
                    let body = serde_json::to_vec(&paddock_wire::api::RevokeResponse {
                        lease_id: "l-1".into(),
                        revoked: true,
                    })
                    .expect("json");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    if tls.write_all(answer.as_bytes()).await.is_err()
                        || tls.write_all(&body).await.is_err()
                        || tls.flush().await.is_err()
                    {
                        return;
                    }
                    answers.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    let mut config = BrokerClientConfig::new(format!("https://{addr}"), &fx_pki.ca_file);
    config.bearer_file = Some(dir.path().join("token"));
    let client = BrokerClient::new(&config).expect("client");
    let req = RevokeRequest {
        lease_id: "l-1".into(),
    };
    for call in 0..3 {
        let answer = within("revoke", client.revoke(&req))
            .await
            .unwrap_or_else(|e| panic!("call {call} failed: {e}"));
        assert!(answer.revoked);
        // Give the close time to reach the client before the next call, as between requests.
        // (no pause)
    }
    assert_eq!(answered.load(Ordering::SeqCst), 3);
    // The killed replica's connection, then at least one more (the pool may open another
    // while the previous one is on its way back to it).
    assert!(connections.load(Ordering::SeqCst) >= 2);
    server.abort();
}

#[tokio::test]
async fn bearer_file_rotation_is_picked_up() {
    let fx = Fixture::start(Options::default()).await;
    let token = fx.dir.path().join("proxy-token");
    std::fs::write(&token, "not-a-known-key").expect("write");
    let client = fx.proxy_client();
    let policy = BrokerPolicy::new(client.clone());
    let egress =
        EgressRequest::new(RUN, "api.github.com", 443, Mode::Transparent).expect("request");

    let err = within(
        "unknown key",
        client.validate_egress(&paddock_wire::api::ValidateEgressRequest {
            run: RUN.into(),
            pod: None,
            host: "api.github.com".into(),
            port: Some(443),
        }),
    )
    .await
    .expect_err("unknown key");
    assert_eq!(err.code(), Some(ErrorCode::Unauthenticated));
    assert!(!err.to_string().contains("not-a-known-key"));
    assert!(!format!("{client:?}").contains("not-a-known-key"));

    for key in [PROXY_KEY, PROXY_KEY_ROTATED] {
        std::fs::write(&token, format!("{key}\n")).expect("rotate");
        let decision = within("check", policy.check(&egress))
            .await
            .unwrap_or_else(|e| panic!("key {key} rejected: {e}"));
        assert!(decision.is_allowed());
    }
    // Removing the file stops the proxy at once, whatever was cached.
    std::fs::remove_file(&token).expect("remove");
    let err = within("check", policy.check(&egress))
        .await
        .expect_err("no bearer");
    assert!(err.to_string().contains("bearer file"), "{err}");
}

#[tokio::test]
async fn egress_decisions_follow_policy_changes_within_a_second() {
    let fx = Fixture::start(Options {
        policy_poll: Some(Duration::from_millis(200)),
        ..Options::default()
    })
    .await;
    let policy = BrokerPolicy::new(fx.proxy_client());
    let check = |host: &str| {
        let req = EgressRequest::new(RUN, host, 443, Mode::Transparent).expect("request");
        let policy = policy.clone();
        async move { within("check", policy.check(&req)).await.expect("answer") }
    };
    assert_eq!(
        check("api.github.com").await,
        Decision::Allow {
            rule: "team-a".into(),
            substitute_auth: true
        }
    );
    assert_eq!(
        check("plain.example.com").await,
        Decision::Allow {
            rule: "team-a".into(),
            substitute_auth: false
        }
    );
    assert!(matches!(
        check("evil.example.net").await,
        Decision::Deny { .. }
    ));

    // Drop plain.example.com; the broker polls its policy files, the proxy caches nothing.
    std::fs::write(
        fx.dir.path().join("policy.yaml"),
        policy_yaml(fx.dir.path(), false),
    )
    .expect("policy");
    let changed = Instant::now();
    loop {
        if matches!(check("plain.example.com").await, Decision::Deny { .. }) {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "policy change not seen within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(check("api.github.com").await.is_allowed());
    assert!(fx.broker.policy().last_error().is_none());
}

#[tokio::test]
async fn names_are_allowed_when_the_broker_grants_them_on_any_port() {
    let mut fx = Fixture::start(Options::default()).await;
    let policy = BrokerPolicy::new(fx.proxy_client());
    let name = |host: &'static str| {
        let policy = policy.clone();
        async move { within("name", policy.name_allowed(RUN, host)).await }
    };
    // Granted on 443 (with and without substitution): the name may be resolved.
    assert_eq!(
        name("plain.example.com").await.expect("answer"),
        Decision::Allow {
            rule: "team-a".into(),
            substitute_auth: false
        }
    );
    assert!(name("api.github.com").await.expect("answer").is_allowed());
    // A name is a name: pass-through is decided per connection, with its port.
    assert!(matches!(
        name("registry.example.com").await.expect("answer"),
        Decision::Allow { .. }
    ));
    let connection = within(
        "passthrough",
        policy.check(
            &EgressRequest::new(RUN, "registry.example.com", 443, Mode::Transparent).expect("req"),
        ),
    )
    .await
    .expect("answer");
    assert_eq!(
        connection,
        Decision::Passthrough {
            rule: "team-a".into()
        },
        "the broker's passthrough grant reaches the proxy's decision"
    );
    let denied = name("c2f1.exfil.example").await.expect("answer");
    assert!(
        matches!(&denied, Decision::Deny { reason } if reason.contains("(any port)")),
        "{denied:?}"
    );
    // The broker audited the refused name, with no port.
    let ev = fx
        .audit
        .events()
        .into_iter()
        .find(|e| e.host.as_deref() == Some("c2f1.exfil.example"))
        .expect("audited");
    assert_eq!(ev.port, None);
    // Another run's names are not this proxy's to ask about: a refusal, never an allow.
    let stranger = within("name", policy.name_allowed("other-run", "api.github.com")).await;
    assert!(!matches!(stranger, Ok(d) if d.is_allowed()));
    // Broker gone: an error (the DNS server answers SERVFAIL), never an allow.
    fx.stop().await;
    let err = name("api.github.com").await.expect_err("broker gone");
    assert!(matches!(err, crate::policy::PolicyError::Unavailable(_)));
}

/// The egress re-check the proxy runs over the broker's `validate-egress`.
fn broker_recheck(fx: &Fixture, interval: Duration) -> crate::policy::EgressRecheck {
    crate::policy::EgressRecheck::new(Arc::new(BrokerPolicy::new(fx.proxy_client())), interval)
}

fn egress(host: &str) -> EgressRequest {
    EgressRequest::new(RUN, host, 443, Mode::Transparent).expect("request")
}

#[tokio::test]
async fn open_connections_recheck_egress_and_see_policy_changes() {
    let mut fx = Fixture::start(Options {
        policy_poll: Some(Duration::from_millis(200)),
        ..Options::default()
    })
    .await;
    let interval = Duration::from_millis(300);
    let sub = broker_recheck(&fx, interval);
    sub.check(&egress("plain.example.com"))
        .await
        .expect("allowed at first");

    // Withdraw plain.example.com: re-checks for connections allowed before are refused
    // within a second.
    std::fs::write(
        fx.dir.path().join("policy.yaml"),
        policy_yaml(fx.dir.path(), false),
    )
    .expect("policy");
    let changed = Instant::now();
    loop {
        match within("recheck", sub.check(&egress("plain.example.com"))).await {
            Err(RecheckError::Denied { reason }) => {
                assert!(reason.contains("no longer allowed"), "{reason}");
                break;
            }
            Ok(()) => assert!(
                changed.elapsed() < Duration::from_secs(1),
                "policy change not seen by an open connection within 1 s"
            ),
            Err(e) => panic!("unexpected: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A fresh answer covers its interval (no call per request); past it, a broker that is
    // gone fails the request closed.
    let github = || egress("api.github.com");
    let long = broker_recheck(&fx, Duration::from_mins(1));
    long.check(&github()).await.expect("still allowed");
    sub.check(&github()).await.expect("still allowed");
    fx.stop().await;
    long.check(&github())
        .await
        .expect("covered by the answer given within the interval");
    tokio::time::sleep(interval).await;
    let err = within("recheck", sub.check(&github()))
        .await
        .expect_err("stale answer, broker gone");
    assert!(matches!(err, RecheckError::Unavailable { .. }), "{err}");
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
    assert!(
        !err.to_string()
            .contains("unavailable: egress policy backend unavailable"),
        "{err}"
    );
}

#[tokio::test]
async fn rechecks_of_a_refused_destination_cannot_flood_the_broker() {
    let fx = Fixture::start(Options::default()).await;
    let sub = Arc::new(broker_recheck(&fx, Duration::from_secs(30)));
    let denials = || {
        fx.audit
            .events()
            .iter()
            .filter(|e| e.host.as_deref() == Some("evil.example.net"))
            .count()
    };
    // 64 concurrent requests (an h2 connection's worth of streams), then 64 more one by one.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let sub = Arc::clone(&sub);
        tasks.spawn(async move { within("recheck", sub.check(&egress("evil.example.net"))).await });
    }
    while let Some(r) = tasks.join_next().await {
        let err = r.expect("join").expect_err("refused");
        assert!(matches!(err, RecheckError::Denied { .. }), "{err}");
    }
    for _ in 0..64 {
        let err = within("recheck", sub.check(&egress("evil.example.net")))
            .await
            .expect_err("refused");
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
    }
    assert_eq!(
        denials(),
        1,
        "one broker call (and audit line) per destination and interval, not per request"
    );
}

/// The broker's in-memory link as a [`BrokerConnector`] (what `paddock-app` does for `run`).
#[derive(Debug)]
struct LinkConnector(paddock_broker::server::LocalLink);

impl BrokerConnector for LinkConnector {
    fn base(&self) -> Uri {
        Uri::from_static("http://paddock-broker.local")
    }

    fn connect(&self, _uri: Uri) -> ConnectFuture {
        let opened = self
            .0
            .connect()
            .map(|s| Box::new(TokioIo::new(s)) as BrokerStream)
            .map_err(Into::into);
        Box::pin(std::future::ready(opened))
    }
}

fn link_client(link: &paddock_broker::server::LocalLink, bearer: PathBuf) -> BrokerClient {
    BrokerClient::with_connector(
        Arc::new(LinkConnector(link.clone())),
        BrokerBearer::File {
            path: bearer,
            max_age: DEFAULT_BEARER_MAX_AGE,
        },
        Duration::from_secs(5),
    )
    .expect("in-process client")
}

#[tokio::test]
async fn the_in_process_link_is_the_same_api_without_tcp_or_tls() {
    let mut fx = Fixture::start(Options::default()).await;
    let link = fx.handle.as_ref().expect("running").local_link();
    let client = link_client(&link, fx.dir.path().join("proxy-token"));

    // Same routes and answers: egress decisions and a real substitution.
    let policy = BrokerPolicy::new(client.clone());
    let egress =
        EgressRequest::new(RUN, "api.github.com", 443, Mode::Transparent).expect("request");
    assert!(
        within("check", policy.check(&egress))
            .await
            .expect("answer")
            .is_allowed()
    );
    let (_, gh) = fx.issue("gh").await;
    let sub = BrokerSubstituter::new(client.clone());
    let mut p = request(
        "https://api.github.com/user",
        &[(AUTHORIZATION.as_str(), &format!("Bearer {gh}"))],
    );
    substitute(&sub, &mut p, "api.github.com")
        .await
        .expect("substituted in process");
    assert_eq!(p.headers[AUTHORIZATION], format!("Bearer {HEADER_SECRET}"));

    // Same authentication: an unknown caller key is refused.
    std::fs::write(fx.dir.path().join("stranger"), "not-a-known-key").expect("write");
    let stranger = link_client(&link, fx.dir.path().join("stranger"));
    let err = within(
        "stranger",
        stranger.validate_egress(&paddock_wire::api::ValidateEgressRequest {
            run: RUN.into(),
            pod: None,
            host: "api.github.com".into(),
            port: Some(443),
        }),
    )
    .await
    .expect_err("unknown key");
    assert_eq!(err.code(), Some(ErrorCode::Unauthenticated));

    // Broker stopped: fail closed, at once.
    fx.stop().await;
    let started = Instant::now();
    let err = within("check", policy.check(&egress))
        .await
        .expect_err("broker gone");
    assert!(
        matches!(err, crate::policy::PolicyError::Unavailable(_)),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn client_certificates_are_presented() {
    let fx = Fixture::start(Options {
        require_client_cert: true,
        ..Options::default()
    })
    .await;
    let egress =
        EgressRequest::new(RUN, "api.github.com", 443, Mode::Transparent).expect("request");

    let without = BrokerPolicy::new(fx.proxy_client());
    assert!(within("check", without.check(&egress)).await.is_err());

    let mut config = fx.proxy_config();
    config.client_cert = Some(ClientCertFiles {
        cert_chain: fx.pki.client_cert.clone(),
        key: fx.pki.client_key.clone(),
    });
    let with = BrokerPolicy::new(BrokerClient::new(&config).expect("client"));
    assert!(
        within("check", with.check(&egress))
            .await
            .expect("mutual TLS")
            .is_allowed()
    );
}

#[tokio::test]
async fn only_the_configured_ca_is_trusted() {
    let fx = Fixture::start(Options::default()).await;
    let other = tempfile::tempdir().expect("tempdir");
    let other_pki = pki(other.path());
    let mut config = fx.proxy_config();
    config.ca_file = other_pki.ca_file;
    let client = BrokerClient::new(&config).expect("client");
    let err = within(
        "untrusted broker",
        client.validate_egress(&paddock_wire::api::ValidateEgressRequest {
            run: RUN.into(),
            pod: None,
            host: "api.github.com".into(),
            port: Some(443),
        }),
    )
    .await
    .expect_err("untrusted certificate");
    assert!(matches!(err, BrokerCallError::Transport(_)), "{err}");

    // The broker certificate names localhost and 127.0.0.1, not this.
    let mut config = fx.proxy_config();
    config.server_name = Some("broker.elsewhere".into());
    let client = BrokerClient::new(&config).expect("client");
    assert!(
        within(
            "wrong name",
            client.validate_egress(&paddock_wire::api::ValidateEgressRequest {
                run: RUN.into(),
                pod: None,
                host: "api.github.com".into(),
                port: Some(443),
            })
        )
        .await
        .is_err()
    );
}

// ---- end to end through the request loop ----

/// What the upstream received.
#[derive(Clone, Debug)]
struct Seen {
    uri: Uri,
    headers: HeaderMap,
}

/// A plain HTTP/1.1 upstream on loopback that records request heads and answers 200.
async fn recording_upstream() -> (
    SocketAddr,
    Arc<Mutex<Vec<Seen>>>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen_in = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = seen_in.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                seen.lock().expect("seen").push(Seen {
                    uri: req.uri().clone(),
                    headers: req.headers().clone(),
                });
                async {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("x-upstream", "yes")
                            .body(Full::new(Bytes::from_static(b"hello from upstream")))
                            .expect("response"),
                    )
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, seen, task)
}

/// Dials the recording upstream whatever destination is asked for (plain TCP).
#[derive(Debug)]
struct LoopbackConnector(SocketAddr);

impl UpstreamConnector for LoopbackConnector {
    fn connect<'a>(
        &'a self,
        _target: &'a UpstreamTarget,
    ) -> BoxFuture<'a, Result<UpstreamStream, ConnectError>> {
        Box::pin(async move {
            let tcp = TcpStream::connect(self.0).await?;
            Ok(UpstreamStream {
                io: Box::new(tcp),
                alpn: Some(b"http/1.1".to_vec()),
            })
        })
    }
}

/// Sends one request as an agent over an in-memory connection served by
/// `serve_connection`; returns status and every byte of the answer the agent could read.
async fn agent_request(
    h2: bool,
    host: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    upstream: SocketAddr,
    substituter: Arc<dyn Substituter>,
    audit: RequestAudit,
) -> (StatusCode, String) {
    let ctx = ctx(host);
    let limits = HttpLimits::default();
    let pool = UpstreamPool::new(&ctx.run, Arc::new(LoopbackConnector(upstream)), &limits);
    let (agent_io, proxy_io) = tokio::io::duplex(64 * 1024);
    let alpn: &'static [u8] = if h2 { b"h2" } else { b"http/1.1" };
    let served = tokio::spawn(serve_connection(
        proxy_io,
        Some(alpn),
        ctx,
        pool,
        substituter,
        audit,
        limits,
        None,
    ));
    let mut req = Request::get(format!("https://{host}{path_and_query}"));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let io = TokioIo::new(agent_io);
    let response = if h2 {
        let req = req.body(Empty::<Bytes>::new()).expect("request");
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        within("h2 response", send.send_request(req))
            .await
            .expect("response")
    } else {
        let req = req
            .header(http::header::HOST, host)
            .uri(path_and_query)
            .body(Empty::<Bytes>::new())
            .expect("request");
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        within("h1 response", send.send_request(req))
            .await
            .expect("response")
    };
    let status = response.status();
    let head = format!("{:?}", response.headers());
    let body = within("body", response.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    served.abort();
    (
        status,
        format!("{head}\n{}", String::from_utf8_lossy(&body)),
    )
}

#[tokio::test]
async fn end_to_end_the_upstream_gets_the_secret_and_the_agent_never_does() {
    let fx = Fixture::start(Options::default()).await;
    let sub: Arc<dyn Substituter> = Arc::new(BrokerSubstituter::new(fx.proxy_client()));
    let (upstream, seen, task) = recording_upstream().await;
    let (gh_lease, gh) = fx.issue("gh").await;
    let (maps_lease, maps) = fx.issue("maps").await;
    let (sink, metrics, audit) = capture_audit();

    for h2 in [false, true] {
        let before = seen.lock().expect("seen").len();
        let (status, answer) = agent_request(
            h2,
            "api.github.com",
            "/user",
            &[(AUTHORIZATION.as_str(), &format!("Bearer {gh}"))],
            upstream,
            sub.clone(),
            audit.clone(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert!(answer.contains("hello from upstream"));
        let (status, answer2) = agent_request(
            h2,
            "maps.example.com",
            &format!("/geo?key={maps}&q=x"),
            &[],
            upstream,
            sub.clone(),
            audit.clone(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{answer2}");
        for secret in ALL_SECRETS {
            assert!(!answer.contains(secret) && !answer2.contains(secret));
        }

        let seen = seen.lock().expect("seen").clone();
        assert_eq!(seen.len(), before + 2, "h2={h2}");
        assert_eq!(
            seen[before].headers[AUTHORIZATION],
            format!("Bearer {HEADER_SECRET}")
        );
        assert_eq!(
            seen[before + 1].uri.query(),
            Some("key=maps%20real%2Fsecret%2B1&q=x")
        );
        for s in &seen[before..] {
            let shown = format!("{:?} {:?}", s.uri, s.headers);
            assert!(
                !shown.contains(&gh) && !shown.contains(&maps),
                "placeholder reached upstream: {shown}"
            );
        }
    }

    // Refused: the placeholder is sent to a host it is not bound to; nothing is forwarded.
    let before = seen.lock().expect("seen").len();
    let (status, answer) = agent_request(
        false,
        "plain.example.com",
        "/",
        &[(AUTHORIZATION.as_str(), &format!("Bearer {gh}"))],
        upstream,
        sub.clone(),
        audit.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(
        seen.lock().expect("seen").len(),
        before,
        "nothing forwarded"
    );
    for secret in ALL_SECRETS {
        assert!(!answer.contains(secret), "{answer}");
    }

    // One request record each: the broker's credential name and lease id, never a value.
    let hidden: Vec<&str> = ALL_SECRETS
        .iter()
        .copied()
        .chain([gh.as_str(), maps.as_str()])
        .collect();
    let mut want = Vec::new();
    for protocol in ["HTTP/1.1", "HTTP/2"] {
        want.push(RecordShape::forwarded("/user", "gh", &gh_lease, protocol));
        want.push(RecordShape::forwarded(
            "/geo",
            "maps",
            &maps_lease,
            protocol,
        ));
    }
    want.push(RecordShape::refused(
        "/",
        403,
        "denied",
        "substitution_denied",
    ));
    check_request_records(&sink, &metrics, &hidden, &want);
    task.abort();
}

/// A capturing audit for request records: the sink, the metrics counting failed writes, and
/// the `RequestAudit` to hand to `serve_connection`.
fn capture_audit() -> (
    Arc<ProxyAuditSink>,
    Arc<crate::metrics::ProxyMetrics>,
    RequestAudit,
) {
    let sink = Arc::new(ProxyAuditSink::default());
    let metrics = Arc::new(crate::metrics::ProxyMetrics::new());
    let audit = RequestAudit::new(
        Arc::clone(&sink) as Arc<dyn crate::audit::AuditSink>,
        Arc::clone(&metrics),
        Mode::Transparent,
    );
    (sink, metrics, audit)
}

/// What a request record says, for comparing records as a whole. `reason` is the
/// machine-readable part, before the first `": "`.
#[derive(Debug, PartialEq, Eq)]
struct RecordShape {
    path: String,
    status: u64,
    outcome: String,
    reason: Option<String>,
    credential: Option<String>,
    lease_id: Option<String>,
    protocol: String,
}

impl RecordShape {
    fn forwarded(path: &str, credential: &str, lease_id: &str, protocol: &str) -> Self {
        Self {
            path: path.into(),
            status: 200,
            outcome: "forwarded".into(),
            reason: None,
            credential: Some(credential.into()),
            lease_id: Some(lease_id.into()),
            protocol: protocol.into(),
        }
    }

    /// Answered by the proxy over HTTP/1.1; nothing substituted.
    fn refused(path: &str, status: u64, outcome: &str, reason: &str) -> Self {
        Self {
            path: path.into(),
            status,
            outcome: outcome.into(),
            reason: Some(reason.into()),
            credential: None,
            lease_id: None,
            protocol: "HTTP/1.1".into(),
        }
    }

    fn of(r: &serde_json::Value) -> Self {
        let text = |field: &str| r[field].as_str().map(str::to_owned);
        assert_eq!(r["kind"], "request", "{r}");
        Self {
            path: text("path").unwrap_or_default(),
            status: r["status"].as_u64().unwrap_or_default(),
            outcome: text("outcome").unwrap_or_default(),
            reason: r["reason"]
                .as_str()
                .and_then(|t| t.split_once(": "))
                .map(|(code, _)| code.to_owned()),
            credential: text("credential"),
            lease_id: text("lease_id"),
            protocol: text("protocol").unwrap_or_default(),
        }
    }
}

/// Checks the request records in `sink` against `want`, that none of `hidden` (secrets,
/// placeholders) nor any query string appears anywhere in the audit output, and that no
/// write failed.
fn check_request_records(
    sink: &ProxyAuditSink,
    metrics: &crate::metrics::ProxyMetrics,
    hidden: &[&str],
    want: &[RecordShape],
) {
    let text = sink.text();
    for h in hidden {
        assert!(
            !text.contains(h),
            "audit holds a secret or placeholder: {text}"
        );
    }
    assert!(!text.contains("q=x") && !text.contains('?'), "{text}");
    let records = sink.records();
    assert_eq!(
        records.iter().map(RecordShape::of).collect::<Vec<_>>(),
        want,
        "{text}"
    );
    assert_eq!(
        metrics.audit_write_failures(crate::audit::AuditKind::Request),
        0
    );
}

/// A broker stand-in over an in-memory pipe that records each call's JSON body and answers
/// with `answer` (for checking what the client sends, not what a broker decides).
#[derive(Debug)]
struct RecordingConnector {
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    answer: &'static str,
}

impl crate::broker::BrokerConnector for RecordingConnector {
    fn base(&self) -> Uri {
        Uri::from_static("http://recording-broker.local")
    }

    fn connect(&self, _uri: Uri) -> crate::broker::ConnectFuture {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let bodies = Arc::clone(&self.bodies);
        let answer = self.answer;
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let bodies = Arc::clone(&bodies);
                async move {
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(http_body_util::Collected::to_bytes);
                    if let Ok(b) = body
                        && let Ok(v) = serde_json::from_slice(&b)
                    {
                        bodies.lock().expect("bodies").push(v);
                    }
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(answer.as_bytes())))
                            .expect("response"),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        Box::pin(std::future::ready(Ok(
            Box::new(TokioIo::new(client)) as crate::broker::BrokerStream
        )))
    }
}

/// In node mode each pod's policy and substituter name the pod in every call, so the broker
/// can check a node agent asks for a run from the run's own pod; without `for_pod` no pod is
/// sent (the field is absent on the wire).
#[tokio::test]
async fn pod_bound_policy_and_substituter_name_their_pod() {
    let client = |answer| {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let c = BrokerClient::with_connector(
            Arc::new(RecordingConnector {
                bodies: Arc::clone(&bodies),
                answer,
            }),
            crate::broker::BrokerBearer::Value("node-agent-token".into()),
            Duration::from_secs(5),
        )
        .expect("client");
        (c, bodies)
    };
    let egress =
        r#"{"allowed":true,"substitute_auth":true,"discovery":false,"policy":null,"reason":"ok"}"#;
    let (c, bodies) = client(egress);
    let req = EgressRequest::new("run-a", "api.test", 443, Mode::Transparent).expect("req");
    let pod = "6b1d0c2a-1111-4222-8333-000000000001";
    BrokerPolicy::new(c.clone())
        .for_pod(pod)
        .check(&req)
        .await
        .expect("decision");
    BrokerPolicy::new(c).check(&req).await.expect("decision");
    let sent = bodies.lock().expect("bodies").clone();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0]["pod"], pod, "{}", sent[0]);
    assert_eq!(sent[0]["run"], "run-a");
    assert!(sent[1].get("pod").is_none(), "{}", sent[1]);

    let (c, bodies) = client(r#"{"matched":false,"lease_id":null,"credential":null}"#);
    let (mut parts, ()) = Request::get("https://api.test/x")
        .header(
            AUTHORIZATION,
            "Bearer pdk-user-secret-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        )
        .body(())
        .expect("request")
        .into_parts();
    let sub = BrokerSubstituter::new(c).for_pod(pod);
    let _ = substitute(&sub, &mut parts, "api.test").await;
    let sent = bodies.lock().expect("bodies").clone();
    assert_eq!(
        sent.len(),
        1,
        "the placeholder-looking header reaches the broker: {sent:?}"
    );
    assert_eq!(sent[0]["pod"], pod, "{}", sent[0]);
}

mod grants;

#[tokio::test]
async fn the_broker_readiness_check_follows_the_broker() {
    use crate::health::BrokerCheck;
    use crate::metrics::ReadyCheck;
    let mut fx = Fixture::start(Options::default()).await;
    let check = BrokerCheck(fx.proxy_client());
    let records = fx.audit.events().len();
    let ok = within("ping", check.check()).await.expect("broker up");
    assert_eq!(ok, "answering (store sqlite)");
    assert_eq!(
        fx.audit.events().len(),
        records,
        "a readiness probe writes no audit record"
    );

    // A bearer the broker does not accept is not ready either: every real call would fail.
    std::fs::write(fx.dir.path().join("stale-token"), "pdk-not-a-key").expect("write");
    let mut stale = fx.proxy_config();
    stale.bearer_file = Some(fx.dir.path().join("stale-token"));
    let err = within(
        "ping",
        BrokerCheck(BrokerClient::new(&stale).expect("client")).check(),
    )
    .await
    .expect_err("bearer refused");
    assert!(err.contains("401"), "{err}");
    assert!(!err.contains("pdk-not-a-key"), "bearer echoed: {err}");

    fx.stop().await;
    let err = within("ping", check.check())
        .await
        .expect_err("broker gone");
    assert!(!err.is_empty());
}
