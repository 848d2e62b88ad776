//! The whole pipeline on loopback without root: original destinations come from a
//! [`StaticOriginalDst`], names from the in-crate test DNS responder, and the "internet" is a
//! rustls + hyper server on 127.0.0.1 with a certificate from a second test CA.
//!
//! The fault cases (RELIABILITY.md, fault matrix) are here too: upstream TLS that does not
//! verify, DNS that fails, connections without an original destination. Each checks what the
//! agent gets and that nothing reached an upstream (counted per TCP connection, not only per
//! request), including a decoy on another address the name resolves to.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use super::{
    Connector, Drain, ListenerKind, Pipeline, PipelineLimits, PipelineParts, run_listener,
};
use crate::audit::{AuditError, AuditEvent, AuditKind, AuditSink, RequestOutcome};
use crate::http::{HttpLimits, NoopSubstituter};
use crate::metrics::{ProxyMetrics, Rejection};
use crate::net::test_dns::Answer;
use crate::net::test_dns::TestDns;
use crate::net::{CidrPolicy, DialSettings, DnsResolver, ResolverSettings, Vetter};
use crate::origdst::StaticOriginalDst;
use crate::policy::{Mode, StaticPolicy};
use crate::tls::{LeafCache, LeafCacheConfig, MitmServer, RunCa, UpstreamTls};

const POLICY: &str = r#"
[[rule]]
name = "app"
hosts = ["app.test", "rebind.test"]
ports = "any"

[[rule]]
name = "faults"
hosts = ["*.fault.test"]
ports = "any"
"#;

/// Records events in memory, or fails every write.
#[derive(Debug, Default)]
struct MemorySink {
    fail: bool,
    events: std::sync::Mutex<Vec<AuditEvent>>,
}

impl AuditSink for MemorySink {
    fn record(&self, ev: &AuditEvent) -> Result<(), AuditError> {
        if self.fail {
            return Err(AuditError::Write {
                target: "memory".to_owned(),
                source: std::io::Error::other("disk full"),
            });
        }
        self.events.lock().expect("lock").push(ev.clone());
        Ok(())
    }
}

fn ca(label: &str) -> RunCa {
    RunCa::generate(label, Duration::from_hours(48))
        .expect("generate CA")
        .ca
}

/// A TLS (any SNI, leaves from `upstream_ca`) HTTP/1.1 server answering "hello <path>":
/// its address, the requests it served and the TCP connections it accepted.
async fn upstream(upstream_ca: RunCa) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let leaves = Arc::new(LeafCache::new(upstream_ca, LeafCacheConfig::default()).expect("cache"));
    let tls = Arc::new(MitmServer::new(leaves).expect("server"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let requests = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&requests);
    let connections = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            connections.fetch_add(1, Ordering::Relaxed);
            let tls = Arc::clone(&tls);
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let Ok(stream) = tls.accept(s, &[b"http/1.1".as_slice()]).await else {
                    return;
                };
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    let body = format!("hello {}", req.uri().path());
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, requests, accepted)
}

struct Rig {
    proxy: SocketAddr,
    /// The cooperative `CONNECT` listener of the same pipeline.
    connect_proxy: SocketAddr,
    origdst: Arc<StaticOriginalDst>,
    run_root: rustls_pki_types::CertificateDer<'static>,
    /// The CA of the test upstream's own certificates.
    upstream_root: rustls_pki_types::CertificateDer<'static>,
    /// A CA the pipeline trusts for upstreams, besides the upstream's own: signs the leaves
    /// the fault tests get wrong on purpose.
    fault_ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    metrics: Arc<ProxyMetrics>,
    sink: Arc<MemorySink>,
    upstream: SocketAddr,
    upstream_requests: Arc<AtomicUsize>,
    upstream_accepted: Arc<AtomicUsize>,
    dns: TestDns,
    stop: watch::Sender<bool>,
    pipeline: Arc<Pipeline>,
}

async fn rig(failing_audit: bool) -> Rig {
    rig_with(failing_audit, None).await
}

/// A rig whose resolver asks `nameserver` instead of the rig's test DNS, when given.
async fn rig_with(failing_audit: bool, nameserver: Option<SocketAddr>) -> Rig {
    let policy = Arc::new(StaticPolicy::from_toml_str(POLICY).expect("policy"));
    rig_full(failing_audit, nameserver, policy, None).await
}

/// A rig deciding with `policy`, re-checking open connections every `recheck` if given.
async fn rig_full(
    failing_audit: bool,
    nameserver: Option<SocketAddr>,
    policy: Arc<dyn crate::policy::EgressPolicy>,
    recheck: Option<Duration>,
) -> Rig {
    let upstream_ca = ca("upstream");
    let upstream_root = upstream_ca.certificate().clone();
    let mut roots = RootCertStore::empty();
    roots.add(upstream_ca.certificate().clone()).expect("root");
    let fault_ca = rcgen_ca("fault test CA");
    roots.add(fault_ca.der().clone()).expect("fault root");
    let (upstream, upstream_requests, upstream_accepted) = upstream(upstream_ca).await;
    let dns = TestDns::start(Duration::ZERO).await;
    dns.addrs("app.test", &["127.0.0.1"], 60);
    dns.addrs("denied.test", &["127.0.0.1"], 60);
    dns.addrs("rebind.test", &["127.0.0.2"], 60);
    let resolver = Arc::new(
        DnsResolver::new(ResolverSettings {
            nameservers: vec![nameserver.unwrap_or(dns.addr)],
            // Bounded so the silent-resolver case ends quickly.
            attempt_timeout: Duration::from_millis(500),
            attempts: 1,
            ..ResolverSettings::default()
        })
        .expect("resolver"),
    );
    let cidr = Arc::new(CidrPolicy::with_defaults().allow("127.0.0.0/8".parse().expect("net")));
    let vetter = Vetter::new(resolver, cidr);
    let metrics = Arc::new(ProxyMetrics::new());
    let upstream_tls = Arc::new(UpstreamTls::with_roots(roots).expect("upstream tls"));
    let run_ca = ca("run");
    let run_root = run_ca.certificate().clone();
    let leaves = Arc::new(LeafCache::new(run_ca, LeafCacheConfig::default()).expect("leaves"));
    let connector = Arc::new(Connector::new(
        vetter.clone(),
        Arc::clone(&upstream_tls),
        DialSettings::default(),
        Duration::from_secs(10),
        Arc::clone(&metrics),
    ));
    let sink = Arc::new(MemorySink {
        fail: failing_audit,
        ..MemorySink::default()
    });
    let origdst = Arc::new(StaticOriginalDst::default());
    let (stop, stop_rx) = watch::channel(false);
    let pipeline = Arc::new(Pipeline::new(
        PipelineParts {
            run: "run-unit".to_owned(),
            policy,
            vetter,
            mitm: Arc::new(MitmServer::new(leaves).expect("mitm")),
            upstream_tls,
            connector,
            substituter: Arc::new(NoopSubstituter),
            audit: sink.clone(),
            metrics: Arc::clone(&metrics),
            origdst: origdst.clone(),
            http_limits: HttpLimits::default(),
            limits: PipelineLimits {
                handshake_timeout: Duration::from_secs(5),
                ..PipelineLimits::default()
            },
            plain_http_ports: vec![80],
            deny_page: true,
            egress_recheck: recheck,
        },
        stop_rx,
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let proxy = listener.local_addr().expect("addr");
    tokio::spawn(run_listener(
        Arc::clone(&pipeline),
        listener,
        ListenerKind::Transparent,
    ));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind CONNECT");
    let connect_proxy = listener.local_addr().expect("addr");
    tokio::spawn(run_listener(
        Arc::clone(&pipeline),
        listener,
        ListenerKind::Connect,
    ));
    Rig {
        proxy,
        connect_proxy,
        origdst,
        run_root,
        upstream_root,
        fault_ca,
        metrics,
        sink,
        upstream,
        upstream_requests,
        upstream_accepted,
        dns,
        stop,
        pipeline,
    }
}

impl Rig {
    /// A TCP connection to the proxy "originally" going to `dst`.
    async fn connect(&self, dst: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        self.origdst
            .insert(socket.local_addr().expect("local"), dst);
        socket.connect(self.proxy).await.expect("connect proxy")
    }

    /// A TLS session with SNI `name` to the proxy "originally" going to `dst`, trusting the
    /// run CA, kept open for several requests.
    async fn tls(&self, dst: SocketAddr, name: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = self.connect(dst).await;
        tls_client(&self.run_root)
            .connect(ServerName::try_from(name.to_owned()).expect("name"), tcp)
            .await
            .expect("handshake")
    }

    /// GET `/path` over TLS with SNI `name`, trusting the run CA; the whole response text.
    async fn get(&self, dst: SocketAddr, name: &str, path: &str) -> std::io::Result<String> {
        let tcp = self.connect(dst).await;
        self.get_over(tcp, name, path).await
    }

    /// GET `/path` over TLS with SNI `name` on an open connection to the proxy.
    async fn get_over(&self, tcp: TcpStream, name: &str, path: &str) -> std::io::Result<String> {
        get_trusting(tcp, name, path, &self.run_root).await
    }
}

/// A TLS client trusting only `root`.
fn tls_client(root: &rustls_pki_types::CertificateDer<'static>) -> tokio_rustls::TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(root.clone()).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// GET `/path` over TLS with SNI `name` on `tcp`, trusting only `root`.
async fn get_trusting(
    tcp: TcpStream,
    name: &str,
    path: &str,
    root: &rustls_pki_types::CertificateDer<'static>,
) -> std::io::Result<String> {
    {
        let connector = tls_client(root);
        let server = ServerName::try_from(name.to_owned()).expect("name");
        let mut tls = connector.connect(server, tcp).await?;
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = String::new();
        tls.read_to_string(&mut out).await?;
        Ok(out)
    }
}

impl Rig {
    /// `CONNECT name:port` on the cooperative listener: the connection and what the proxy
    /// answered before the tunnel (empty when it reset or closed without a word).
    async fn connect_via(&self, name: &str, port: u16) -> (TcpStream, String) {
        let mut tcp = TcpStream::connect(self.connect_proxy)
            .await
            .expect("connect to the CONNECT listener");
        tcp.write_all(
            format!("CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send CONNECT");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut byte)).await {
                Ok(Ok(1)) => head.push(byte[0]),
                Ok(Ok(_) | Err(_)) => break,
                Err(elapsed) => panic!("no answer to CONNECT {name}:{port}: {elapsed}"),
            }
        }
        (tcp, String::from_utf8_lossy(&head).into_owned())
    }

    /// The deny records so far, as (reason, sni).
    fn denials(&self) -> Vec<(String, Option<String>)> {
        self.sink
            .events
            .lock()
            .expect("lock")
            .iter()
            .filter(|e| e.kind == AuditKind::Deny)
            .map(|e| (e.reason.clone().unwrap_or_default(), e.sni.clone()))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_host_is_intercepted_and_forwarded() {
    let rig = rig(false).await;
    let reply = rig
        .get(rig.upstream, "app.test", "/one")
        .await
        .expect("get");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with("hello /one"), "{reply}");
    // A second connection reuses the learned ALPN and the pooled upstream connection.
    let reply = rig
        .get(rig.upstream, "app.test", "/two")
        .await
        .expect("get");
    assert!(reply.ends_with("hello /two"), "{reply}");
    assert_eq!(rig.upstream_requests.load(Ordering::Relaxed), 2);
    let events = rig.sink.events.lock().expect("lock").clone();
    // Per connection: the allow decision, then one record per request.
    let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            AuditKind::Allow,
            AuditKind::Request,
            AuditKind::Allow,
            AuditKind::Request
        ]
    );
    assert!(events.iter().all(|e| e.sni.as_deref() == Some("app.test")
        && e.dst == Some(rig.upstream)
        && e.mode == Mode::Transparent));
    for (e, path) in events
        .iter()
        .filter(|e| e.kind == AuditKind::Request)
        .zip(["/one", "/two"])
    {
        assert_eq!(e.path.as_deref(), Some(path));
        assert_eq!(e.method.as_deref(), Some("GET"));
        assert_eq!(e.status, Some(200));
        assert_eq!(e.protocol, Some("HTTP/1.1"));
        assert_eq!(e.outcome, Some(RequestOutcome::Forwarded));
        assert_eq!(e.rule, None);
    }
    assert!(
        events
            .iter()
            .filter(|e| e.kind == AuditKind::Allow)
            .all(|e| e.rule.as_deref() == Some("app"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_host_gets_the_page_and_no_upstream_traffic() {
    let rig = rig(false).await;
    let reply = rig
        .get(rig.upstream, "denied.test", "/")
        .await
        .expect("get");
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert!(reply.contains("denied.test"), "{reply}");
    assert_eq!(rig.upstream_requests.load(Ordering::Relaxed), 0);
    assert_eq!(rig.metrics.rejections(Rejection::PolicyDenied), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_audit_write_on_deny_resets_instead_of_answering() {
    let rig = rig(true).await;
    let err = rig
        .get(rig.upstream, "denied.test", "/")
        .await
        .expect_err("no page without an audit record");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
        ),
        "{err:?}"
    );
    assert_eq!(
        rig.metrics
            .audit_write_failures(crate::audit::AuditKind::Deny),
        1
    );
    assert_eq!(
        rig.upstream_accepted.load(Ordering::Relaxed),
        0,
        "nothing dialled for the denial"
    );
    // On the allow path the failure is counted and the request still goes through.
    let reply = rig.get(rig.upstream, "app.test", "/ok").await.expect("get");
    assert!(reply.ends_with("hello /ok"), "{reply}");
    assert_eq!(
        rig.metrics
            .audit_write_failures(crate::audit::AuditKind::Allow),
        1
    );
    // So does the forwarded request's record.
    assert_eq!(
        rig.metrics
            .audit_write_failures(crate::audit::AuditKind::Request),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebinding_mismatch_and_missing_sni_are_reset() {
    let rig = rig(false).await;
    // rebind.test resolves to 127.0.0.2, but the agent dialled the upstream at 127.0.0.1.
    let err = rig.get(rig.upstream, "rebind.test", "/").await;
    assert!(err.is_err(), "{err:?}");
    assert_eq!(rig.metrics.rejections(Rejection::DnsRebindingMismatch), 1);
    // A hello without SNI (the test client sends none for an IP address).
    let err = rig.get(rig.upstream, "127.0.0.1", "/").await;
    assert!(err.is_err(), "{err:?}");
    assert_eq!(rig.metrics.rejections(Rejection::NoSni), 1);
    assert_eq!(rig.upstream_requests.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_idle_keep_alive_connections_and_stops_accepting() {
    let rig = rig(false).await;
    // A keep-alive connection with one completed request, then idle.
    let mut tls = rig.tls(rig.upstream, "app.test").await;
    tls.write_all(b"GET /a HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tls.read(&mut buf).await.expect("response");
    assert!(String::from_utf8_lossy(&buf[..n]).ends_with("hello /a"));
    assert_eq!(rig.pipeline.active_connections(), 1);

    rig.stop.send(true).expect("stop");
    // The idle keep-alive connection is closed by the drain, well before the idle timeout.
    let closed = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0) | Err(_))), "{closed:?}");
    assert_eq!(Drain::wait(&rig.pipeline, Duration::from_secs(5)).await, 0);
    // The listener is gone: new connections are refused.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(TcpStream::connect(rig.proxy).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_tls_connection_sends_nothing_and_answers_its_next_request() {
    let rig = rig(false).await;
    let mut tls = rig.tls(rig.upstream, "app.test").await;
    let mut buf = vec![0u8; 4096];
    for path in ["/a", "/b"] {
        tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let n = tls.read(&mut buf).await.expect("response");
        assert!(
            String::from_utf8_lossy(&buf[..n]).ends_with(&format!("hello {path}")),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        // Quiet past the park delay (250 ms by default): the HTTP server is dropped.
        bounded("park", async {
            while rig.metrics.parked() != 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        // Parking wrote nothing: no close_notify, no FIN, no stray bytes.
        let quiet = tokio::time::timeout(Duration::from_millis(300), tls.read(&mut buf)).await;
        assert!(quiet.is_err(), "{quiet:?}");
    }
    assert_eq!(rig.upstream_requests.load(Ordering::Relaxed), 2);
    drop(tls);
    bounded("closed", async {
        while rig.metrics.parked() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

// ---- Faults (RELIABILITY.md, fault matrix) ----

/// Bound on each fault case, so a proxy that hangs fails the test instead.
async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// What an agent sees when the proxy drops its connection: a reset or an early end.
fn dropped(r: &std::io::Result<String>) -> bool {
    matches!(r, Err(e) if matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::BrokenPipe
    ))
}

/// A CA made with rcgen, so tests can sign leaves with any name and validity.
fn rcgen_ca(label: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, label);
    rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().expect("CA key"))
        .expect("CA")
}

/// A leaf for `names` signed by `ca`; `validity` overrides rcgen's (always valid) default.
fn rcgen_leaf(
    ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    names: &[&str],
    validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
) -> Arc<rustls::sign::CertifiedKey> {
    let key = rcgen::KeyPair::generate().expect("leaf key");
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("leaf params");
    if let Some((from, until)) = validity {
        params.not_before = from;
        params.not_after = until;
    }
    let cert = params.signed_by(&key, ca).expect("sign leaf");
    let der = rustls_pki_types::PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(
        key.serialize_der(),
    ));
    let signer = rustls::crypto::ring::sign::any_supported_type(&der).expect("signing key");
    Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    ))
}

/// The certificate a [`TlsUpstream`] presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Cert {
    /// From the fault CA, which the proxy trusts, for the right name.
    Good,
    /// From a CA the proxy does not trust.
    UnknownCa,
    /// From the fault CA, expired yesterday.
    Expired,
    /// From the fault CA, for another name.
    WrongName,
}

/// Serves whichever leaf `current` names.
#[derive(Debug)]
struct SwitchedLeaf {
    leaves: std::collections::HashMap<Cert, Arc<rustls::sign::CertifiedKey>>,
    current: Arc<std::sync::Mutex<Cert>>,
}

impl rustls::server::ResolvesServerCert for SwitchedLeaf {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let cert = *self.current.lock().expect("cert lock");
        self.leaves.get(&cert).cloned()
    }
}

/// An HTTPS upstream for one name on 127.0.0.1 whose certificate the test chooses (and may
/// switch), plus a decoy on 127.0.0.2 at the same port, the name's other address. Counts TCP
/// connections and requests; every answer closes its connection (nothing is pooled).
struct TlsUpstream {
    addr: SocketAddr,
    current: Arc<std::sync::Mutex<Cert>>,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    decoy: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl TlsUpstream {
    async fn start(rig: &Rig, name: &str, cert: Cert) -> Self {
        let stranger = rcgen_ca("a CA the proxy does not trust");
        let now = time::OffsetDateTime::now_utc();
        let day = time::Duration::days(1);
        let leaves = std::collections::HashMap::from([
            (Cert::Good, rcgen_leaf(&rig.fault_ca, &[name], None)),
            (Cert::UnknownCa, rcgen_leaf(&stranger, &[name], None)),
            (
                Cert::Expired,
                rcgen_leaf(&rig.fault_ca, &[name], Some((now - day * 2, now - day))),
            ),
            (
                Cert::WrongName,
                rcgen_leaf(&rig.fault_ca, &["other.fault.test"], None),
            ),
        ]);
        let current = Arc::new(std::sync::Mutex::new(cert));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SwitchedLeaf {
            leaves,
            current: Arc::clone(&current),
        }));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let decoy_listener = TcpListener::bind(("127.0.0.2", addr.port()))
            .await
            .expect("bind the decoy");
        let (accepted, requests, decoy) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (conns, reqs) = (Arc::clone(&accepted), Arc::clone(&requests));
        let serve = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::Relaxed);
                let acceptor = acceptor.clone();
                let reqs = Arc::clone(&reqs);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        reqs.fetch_add(1, Ordering::Relaxed);
                        let body = format!("hello {}", req.uri().path());
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        let decoys = Arc::clone(&decoy);
        let decoy_task = tokio::spawn(async move {
            while let Ok((_tcp, _)) = decoy_listener.accept().await {
                decoys.fetch_add(1, Ordering::Relaxed);
            }
        });
        Self {
            addr,
            current,
            accepted,
            requests,
            decoy,
            tasks: vec![serve, decoy_task],
        }
    }

    fn present(&self, cert: Cert) {
        *self.current.lock().expect("cert lock") = cert;
    }

    fn count(&self) -> (usize, usize, usize) {
        (
            self.accepted.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
            self.decoy.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_that_does_not_verify_is_reset_and_nothing_is_sent() {
    let rig = rig(false).await;
    let cases = [
        (Cert::UnknownCa, "unknown-ca.fault.test"),
        (Cert::Expired, "expired.fault.test"),
        (Cert::WrongName, "wrong-name.fault.test"),
    ];
    for (round, (cert, name)) in cases.into_iter().enumerate() {
        let up = TlsUpstream::start(&rig, name, cert).await;
        // Two addresses: a refused handshake on the first must not move on to the second.
        rig.dns.addrs(name, &["127.0.0.1", "127.0.0.2"], 60);
        let got = bounded(name, rig.get(up.addr, name, "/transparent")).await;
        assert!(dropped(&got), "{cert:?}, transparent: {got:?}");
        let (tcp, head) = rig.connect_via(name, up.addr.port()).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{cert:?}: {head}");
        let got = bounded(name, rig.get_over(tcp, name, "/connect")).await;
        assert!(dropped(&got), "{cert:?}, CONNECT: {got:?}");
        let (accepted, requests, decoy) = up.count();
        assert_eq!(requests, 0, "{cert:?}: a request reached the upstream");
        assert_eq!(
            accepted, 2,
            "{cert:?}: one handshake per agent connection, no retry"
        );
        assert_eq!(decoy, 0, "{cert:?}: retried on the name's other address");
        assert_eq!(
            rig.metrics.rejections(Rejection::HandshakeFailed),
            2 * (round as u64 + 1),
            "{cert:?}"
        );
    }
    assert_eq!(rig.upstream_accepted.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_host_whose_certificate_goes_bad_gets_a_502_and_nothing_is_sent() {
    let rig = rig(false).await;
    let name = "rotated.fault.test";
    let up = TlsUpstream::start(&rig, name, Cert::Good).await;
    rig.dns.addrs(name, &["127.0.0.1", "127.0.0.2"], 60);
    let reply = bounded(name, rig.get(up.addr, name, "/first"))
        .await
        .expect("a verified upstream");
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.ends_with("hello /first"),
        "{reply}"
    );
    // The proxy now knows the host's protocol, so the agent's handshake completes before the
    // upstream is dialled: the failed dial is answered with a 502 rather than a reset.
    up.present(Cert::Expired);
    let reply = bounded(name, rig.get(up.addr, name, "/second"))
        .await
        .expect("an answer");
    assert!(reply.starts_with("HTTP/1.1 502"), "{reply}");
    assert!(reply.contains("paddock: "), "{reply}");
    let (accepted, requests, decoy) = up.count();
    assert_eq!(requests, 1, "only the first request reached the upstream");
    assert_eq!(accepted, 2, "one dial per agent connection, no retry");
    assert_eq!(decoy, 0, "retried on the name's other address");
    let events = rig.sink.events.lock().expect("lock").clone();
    let second = events
        .iter()
        .find(|e| e.kind == AuditKind::Request && e.path.as_deref() == Some("/second"))
        .expect("the failed request is on record");
    assert_eq!(second.status, Some(502));
    assert_eq!(second.outcome, Some(RequestOutcome::Failed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failures_refuse_the_connection_and_nothing_is_dialled() {
    let rig = rig(false).await;
    rig.dns.set("servfail.fault.test", Answer::ServFail);
    rig.dns.set("silent.fault.test", Answer::Silent);
    rig.dns.set("gone.fault.test", Answer::NxDomain);
    let names = [
        "servfail.fault.test",
        "silent.fault.test",
        "gone.fault.test",
    ];
    for name in names {
        // Transparent: the agent dialled a live upstream and claims `name` in its SNI; the
        // proxy cannot check the claim, so it does not connect.
        let got = bounded(name, rig.get(rig.upstream, name, "/")).await;
        assert!(dropped(&got), "{name}, transparent: {got:?}");
        // Cooperative: refused before any tunnel, without a word.
        let (_tcp, head) = rig.connect_via(name, rig.upstream.port()).await;
        assert_eq!(head, "", "{name}, CONNECT: no tunnel");
    }
    assert_eq!(rig.metrics.rejections(Rejection::DnsFailed), 6);
    let denials = rig.denials();
    for name in names {
        let for_name: Vec<_> = denials
            .iter()
            .filter(|(_, sni)| sni.as_deref() == Some(name))
            .collect();
        assert_eq!(for_name.len(), 2, "{name}: {denials:?}");
        assert!(
            for_name.iter().all(|(r, _)| r.starts_with("dns_failed: ")),
            "{denials:?}"
        );
    }
    assert_eq!(
        rig.upstream_accepted.load(Ordering::Relaxed),
        0,
        "nothing was dialled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_that_is_down_refuses_every_connection_and_nothing_is_dialled() {
    // A port nothing listens on: every query is refused by the kernel.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port");
    let rig = rig_with(false, Some(dead)).await;
    let got = bounded("transparent", rig.get(rig.upstream, "app.test", "/")).await;
    assert!(dropped(&got), "{got:?}");
    let (_tcp, head) = rig.connect_via("app.test", rig.upstream.port()).await;
    assert_eq!(head, "", "no tunnel");
    assert_eq!(rig.metrics.rejections(Rejection::DnsFailed), 2);
    assert_eq!(rig.upstream_accepted.load(Ordering::Relaxed), 0);
    assert_eq!(rig.upstream_requests.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_an_original_destination_is_reset_and_never_guessed() {
    let rig = rig(false).await;
    // Nothing recorded for it: what a connection whose eBPF map entry was evicted looks like.
    // On loopback the reset can beat connect() back to userspace.
    let got = bounded("unrecorded", async {
        let tcp = TcpStream::connect(rig.proxy).await?;
        rig.get_over(tcp, "app.test", "/").await
    })
    .await;
    assert!(dropped(&got), "{got:?}");
    // Recorded as the proxy's own listener: what netfilter answers for a connection dialled
    // straight at the proxy. Taking it would make the proxy dial itself.
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    rig.origdst
        .insert(socket.local_addr().expect("local"), rig.proxy);
    let got = bounded("itself", async {
        let tcp = socket.connect(rig.proxy).await?;
        rig.get_over(tcp, "app.test", "/").await
    })
    .await;
    assert!(dropped(&got), "{got:?}");
    assert_eq!(rig.metrics.rejections(Rejection::NoOriginalDst), 2);
    let denials = rig.denials();
    assert_eq!(denials.len(), 2, "{denials:?}");
    assert!(
        denials
            .iter()
            .all(|(r, sni)| r.starts_with("no_original_dst: ") && sni.is_none()),
        "{denials:?}"
    );
    let allowed = rig
        .sink
        .events
        .lock()
        .expect("lock")
        .iter()
        .filter(|e| e.kind == AuditKind::Allow)
        .count();
    assert_eq!(
        allowed, 0,
        "no connection was let through (the proxy never dialled itself)"
    );
    assert_eq!(rig.upstream_accepted.load(Ordering::Relaxed), 0);
    // The same proxy still serves a connection it can place.
    let reply = bounded("placed", rig.get(rig.upstream, "app.test", "/ok"))
        .await
        .expect("get");
    assert!(reply.ends_with("hello /ok"), "{reply}");
}

/// A head whose `Host` is ambiguous (two of them) or not an authority is answered 400 by
/// both head-reading listeners, before any policy decision: nothing is audited as decided,
/// resolved or dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_or_malformed_host_headers_are_refused() {
    let rig = rig(false).await;
    let answer = |mut tcp: TcpStream, head: &'static str| async move {
        tcp.write_all(head.as_bytes()).await.expect("send head");
        let mut out = String::new();
        bounded("answer", tcp.read_to_string(&mut out))
            .await
            .expect("read answer");
        out
    };
    let plain_dst: SocketAddr = "127.0.0.1:80".parse().expect("addr");
    for head in [
        "GET / HTTP/1.1\r\nHost: app.test\r\nHost: denied.test\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: app.test\r\nhost: app.test\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: app.test/x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: app.test evil.test\r\n\r\n",
    ] {
        let reply = answer(rig.connect(plain_dst).await, head).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{head:?}: {reply}");
    }
    for head in [
        "CONNECT app.test:443 HTTP/1.1\r\nHost: app.test:443\r\nHost: denied.test:443\r\n\r\n",
        "CONNECT app.test:443 HTTP/1.1\r\nHost: app.test:443 x\r\n\r\n",
    ] {
        let tcp = TcpStream::connect(rig.connect_proxy)
            .await
            .expect("connect to the CONNECT listener");
        let reply = answer(tcp, head).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{head:?}: {reply}");
    }
    assert!(
        rig.sink.events.lock().expect("lock").is_empty(),
        "nothing was decided"
    );
    assert_eq!(rig.upstream_accepted.load(Ordering::Relaxed), 0);
}

/// Log output captured for one test (the thread's default subscriber).
#[derive(Clone, Default)]
struct CapturedLogs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Every audit record of a connection carries the connection's id, two connections have two
/// ids, and the connection's log lines carry the same id (its span's `conn` field). On one
/// thread, so the test's subscriber sees every task of the pipeline.
#[tokio::test(flavor = "current_thread")]
async fn records_and_log_lines_of_a_connection_share_its_id() {
    // tracing-core caches one interest per callsite for the process, and while exactly one
    // dispatcher is registered it computes that interest from the default of whichever thread
    // reaches the callsite first (tokio-rs/tracing#3611): a parallel test with no subscriber
    // would cache "never" for this connection's span and its events would lose their `conn`
    // field. A second dispatcher registered for the life of the process keeps tracing on the
    // path that asks every live dispatcher, this test's included.
    static SECOND_DISPATCHER: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    SECOND_DISPATCHER
        .get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
    let logs = CapturedLogs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let rig = rig(false).await;
    for path in ["/one", "/two"] {
        let reply = rig.get(rig.upstream, "app.test", path).await.expect("get");
        assert!(reply.ends_with(&format!("hello {path}")), "{reply}");
    }
    let reply = rig
        .get(rig.upstream, "denied.test", "/")
        .await
        .expect("get");
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");

    let events = rig.sink.events.lock().expect("lock").clone();
    let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            AuditKind::Allow,
            AuditKind::Request,
            AuditKind::Allow,
            AuditKind::Request,
            AuditKind::Deny
        ]
    );
    let conns: Vec<_> = events.iter().map(|e| e.conn.expect("conn id")).collect();
    assert_eq!(conns[0], conns[1], "one connection, one id");
    assert_eq!(conns[2], conns[3], "one connection, one id");
    assert_ne!(conns[0], conns[2], "two connections, two ids");
    assert!(conns[4] != conns[0] && conns[4] != conns[2]);
    let json = serde_json::to_value(&events[1]).expect("json");
    assert_eq!(json["conn"], conns[1].to_string());
    assert_eq!(conns[1].to_string().len(), 16);

    let text = String::from_utf8(logs.0.lock().expect("logs").clone()).expect("utf-8");
    let logged = |message: &str, conn| {
        text.lines()
            .any(|l| l.contains(message) && l.contains(&format!("conn={conn}")))
    };
    assert!(logged("connection allowed", conns[0]), "{text}");
    assert!(logged("connection allowed", conns[2]), "{text}");
    assert!(logged("forwarded", conns[1]), "{text}");
    assert!(logged("connection denied", conns[4]), "{text}");
}

/// The whole pipeline with a static policy file: a kept-alive agent connection allowed by the
/// file gets its next request refused (403 `egress_denied`, nothing sent upstream) once the
/// file no longer allows the host and is reloaded, without the agent reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_policy_file_refuses_requests_on_open_connections() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, POLICY).expect("policy");
    let file = Arc::new(crate::policy::PolicyFile::open(&path).expect("policy file"));
    let rig = rig_full(false, None, file.clone(), Some(Duration::ZERO)).await;

    let tcp = rig.connect(rig.upstream).await;
    let connector = tls_client(&rig.run_root);
    let tls = connector
        .connect(ServerName::try_from("app.test").expect("name"), tcp)
        .await
        .expect("agent TLS");
    let (mut agent, conn) =
        hyper::client::conn::http1::handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(tls))
            .await
            .expect("agent HTTP/1.1");
    tokio::spawn(conn);
    let get = |path: &str| {
        hyper::Request::get(path)
            .header("host", "app.test")
            .body(http_body_util::Empty::new())
            .expect("request")
    };
    let first = bounded("first", agent.send_request(get("/before")))
        .await
        .expect("first response");
    assert_eq!(first.status(), 200);
    drop(first);

    std::fs::write(
        &path,
        "[[rule]]\nhosts = [\"other.test\"]\nports = \"any\"\n",
    )
    .expect("withdraw");
    file.reload().expect("reload");
    bounded("ready", agent.ready()).await.expect("kept alive");
    let second = bounded("second", agent.send_request(get("/after")))
        .await
        .expect("answered on the same connection");
    assert_eq!(second.status(), 403);
    assert_eq!(
        second
            .headers()
            .get("x-paddock-denied")
            .map(http::HeaderValue::as_bytes),
        Some(&b"egress_denied"[..])
    );
    assert_eq!(
        rig.upstream_requests.load(Ordering::Relaxed),
        1,
        "only /before went up"
    );
    let events = rig.sink.events.lock().expect("lock").clone();
    let refused = events
        .iter()
        .find(|e| e.path.as_deref() == Some("/after"))
        .expect("the refusal is audited");
    assert_eq!(refused.outcome, Some(RequestOutcome::Denied));
    assert_eq!(refused.status, Some(403));
}

const PASSTHROUGH_POLICY: &str = r#"
[[rule]]
name = "registry"
hosts = ["app.test", "rebind.test"]
ports = "any"
action = "passthrough"
"#;

/// A passthrough rule relays the agent's TLS untouched: the agent sees the upstream's own
/// certificate (one trusting only the run CA fails), the connection is audited once as
/// `passthrough` with no request records, and the SNI and destination checks still apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_relays_tls_untouched_after_the_same_checks() {
    let policy = Arc::new(StaticPolicy::from_toml_str(PASSTHROUGH_POLICY).expect("policy"));
    let rig = rig_full(false, None, policy, None).await;

    let reply = get_trusting(
        rig.connect(rig.upstream).await,
        "app.test",
        "/through",
        &rig.upstream_root,
    )
    .await
    .expect("the upstream's own TLS, end to end");
    assert!(reply.ends_with("hello /through"), "{reply}");
    let forged = get_trusting(
        rig.connect(rig.upstream).await,
        "app.test",
        "/forged",
        &rig.run_root,
    )
    .await;
    assert!(
        forged.is_err(),
        "no leaf of the run CA is served: {forged:?}"
    );

    // Cooperative CONNECT: the same relay after the 200.
    let (tcp, head) = rig.connect_via("app.test", rig.upstream.port()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let reply = get_trusting(tcp, "app.test", "/connect", &rig.upstream_root)
        .await
        .expect("CONNECT pass-through");
    assert!(reply.ends_with("hello /connect"), "{reply}");

    // The rebinding check holds: rebind.test resolves elsewhere than the destination.
    let refused = get_trusting(
        rig.connect(rig.upstream).await,
        "rebind.test",
        "/x",
        &rig.upstream_root,
    )
    .await;
    assert!(dropped(&refused), "{refused:?}");

    let events = rig.sink.events.lock().expect("lock").clone();
    let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            AuditKind::Passthrough,
            AuditKind::Passthrough,
            AuditKind::Passthrough,
            AuditKind::Deny
        ],
        "one record per connection, none per request"
    );
    assert_eq!(rig.upstream_requests.load(Ordering::Relaxed), 2);
    assert!(
        rig.metrics.encode().contains("decision=\"passthrough\""),
        "counted as passthrough"
    );
}

/// A withdrawn destination closes an open pass-through connection at the next re-check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_destination_closes_an_open_passthrough() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, PASSTHROUGH_POLICY).expect("policy");
    let file = Arc::new(crate::policy::PolicyFile::open(&path).expect("policy file"));
    let rig = rig_full(false, None, file.clone(), Some(Duration::from_millis(50))).await;
    let tcp = rig.connect(rig.upstream).await;
    let connector = tls_client(&rig.upstream_root);
    let mut tls = connector
        .connect(ServerName::try_from("app.test").expect("name"), tcp)
        .await
        .expect("TLS through");
    std::fs::write(
        &path,
        "[[rule]]\nhosts = [\"other.test\"]\nports = \"any\"\n",
    )
    .expect("withdraw");
    file.reload().expect("reload");
    let mut buf = [0_u8; 16];
    let closed = bounded("the relay to end", tls.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "the connection was closed: {closed:?}"
    );
}
