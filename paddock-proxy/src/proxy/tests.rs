//! The whole pipeline on loopback without root: original destinations come from a
//! [`StaticOriginalDst`], names from the in-crate test DNS responder, and the "internet" is a
//! rustls + hyper server on 127.0.0.1 with a certificate from a second test CA.

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

/// A TLS (any SNI, leaves from `upstream_ca`) HTTP/1.1 server answering "hello <path>".
async fn upstream(upstream_ca: RunCa) -> (SocketAddr, Arc<AtomicUsize>) {
    let leaves = Arc::new(LeafCache::new(upstream_ca, LeafCacheConfig::default()).expect("cache"));
    let tls = Arc::new(MitmServer::new(leaves).expect("server"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
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
    (addr, requests)
}

struct Rig {
    proxy: SocketAddr,
    origdst: Arc<StaticOriginalDst>,
    run_root: rustls_pki_types::CertificateDer<'static>,
    metrics: Arc<ProxyMetrics>,
    sink: Arc<MemorySink>,
    upstream: SocketAddr,
    upstream_requests: Arc<AtomicUsize>,
    _dns: TestDns,
    stop: watch::Sender<bool>,
    pipeline: Arc<Pipeline>,
}

async fn rig(failing_audit: bool) -> Rig {
    let upstream_ca = ca("upstream");
    let mut roots = RootCertStore::empty();
    roots.add(upstream_ca.certificate().clone()).expect("root");
    let (upstream, upstream_requests) = upstream(upstream_ca).await;
    let dns = TestDns::start(Duration::ZERO).await;
    dns.addrs("app.test", &["127.0.0.1"], 60);
    dns.addrs("denied.test", &["127.0.0.1"], 60);
    dns.addrs("rebind.test", &["127.0.0.2"], 60);
    let resolver = Arc::new(
        DnsResolver::new(ResolverSettings {
            nameservers: vec![dns.addr],
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
            policy: Arc::new(StaticPolicy::from_toml_str(POLICY).expect("policy")),
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
    Rig {
        proxy,
        origdst,
        run_root,
        metrics,
        sink,
        upstream,
        upstream_requests,
        _dns: dns,
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

    /// GET `/path` over TLS with SNI `name`, trusting the run CA; the whole response text.
    async fn get(&self, dst: SocketAddr, name: &str, path: &str) -> std::io::Result<String> {
        let tcp = self.connect(dst).await;
        let mut roots = RootCertStore::empty();
        roots.add(self.run_root.clone()).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
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
    let tcp = rig.connect(rig.upstream).await;
    let mut roots = RootCertStore::empty();
    roots.add(rig.run_root.clone()).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("app.test").expect("name"), tcp)
        .await
        .expect("handshake");
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
