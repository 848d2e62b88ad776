//! The node side of per-node CAs against an in-process root standing in for the broker: the
//! installed intermediate forges leaves an agent trusting only the root accepts, renewal swaps
//! the CA under open connections, and an intermediate that could not be renewed fails closed.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rcgen::{
    BasicConstraints, CertificateSigningRequestParams, CertifiedIssuer, IsCa, KeyUsagePurpose,
};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::tls::{LeafCacheConfig, MitmServer};

/// A root that signs node intermediates the way the broker does, for `lifetime`.
#[derive(Debug)]
struct FakeBroker {
    root: CertifiedIssuer<'static, KeyPair>,
    lifetime: Duration,
    calls: AtomicUsize,
    failing: AtomicBool,
    seen_nodes: Mutex<Vec<String>>,
    /// Serials the revocation list names.
    revoked: Mutex<Vec<Vec<u8>>>,
    crl_reads: AtomicUsize,
}

impl FakeBroker {
    fn new(lifetime: Duration) -> Arc<Self> {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut dn = DistinguishedName::new();
        // Unique, so two roots are told apart by name (not by a failing signature).
        dn.push(
            DnType::CommonName,
            format!("fake cluster root {:016x}", rand::random::<u64>()),
        );
        params.distinguished_name = dn;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("root key");
        Arc::new(Self {
            root: CertifiedIssuer::self_signed(params, key).expect("root"),
            lifetime,
            calls: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            seen_nodes: Mutex::new(Vec::new()),
            revoked: Mutex::new(Vec::new()),
            crl_reads: AtomicUsize::new(0),
        })
    }

    /// Revokes the intermediate `ca` (DER) from now on.
    fn revoke(&self, ca: &CertificateDer<'_>) {
        let (_, cert) = x509_parser::parse_x509_certificate(ca).expect("x509");
        self.revoked
            .lock()
            .expect("lock")
            .push(cert.raw_serial().to_vec());
    }

    fn crl(&self) -> Vec<u8> {
        let now = time::OffsetDateTime::now_utc();
        let revoked_certs = self
            .revoked
            .lock()
            .expect("lock")
            .iter()
            .map(|serial| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(serial),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            })
            .collect();
        rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::HOUR,
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.root)
        .expect("crl")
        .der()
        .to_vec()
    }

    fn root_der(&self) -> CertificateDer<'static> {
        self.root.der().clone()
    }

    fn client(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.root_der()).expect("root");
        Arc::new(
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

impl NodeCaSource for FakeBroker {
    fn request<'a>(
        &'a self,
        request: &'a NodeCaRequest,
    ) -> Pin<Box<dyn Future<Output = Result<NodeCaResponse, String>> + Send + 'a>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err("broker unreachable (test)".to_owned());
            }
            self.seen_nodes
                .lock()
                .expect("lock")
                .push(request.node.clone());
            let csr = CertificateSigningRequestParams::from_pem(&request.csr)
                .map_err(|e| e.to_string())?;
            let mut params = CertificateParams::default();
            params.distinguished_name = csr.params.distinguished_name.clone();
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::seconds(5);
            params.not_after = now + time::Duration::try_from(self.lifetime).expect("lifetime");
            params.serial_number = Some(super::super::ca::random_serial());
            let cert = params
                .signed_by(&csr.public_key, &self.root)
                .map_err(|e| e.to_string())?;
            Ok(NodeCaResponse {
                certificate: cert.pem(),
                root: self.root.pem(),
                not_before: 0,
                not_after: 0,
            })
        })
    }

    fn revocation_list(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>> {
        Box::pin(async move {
            self.crl_reads.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err("broker unreachable (test)".to_owned());
            }
            Ok(self.crl())
        })
    }
}

/// Serves `mitm` on loopback, echoing whatever each connection sends.
async fn serve(mitm: Arc<MitmServer>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let mitm = Arc::clone(&mitm);
            tokio::spawn(async move {
                let Ok(mut tls) = mitm.accept(tcp, &[] as &[&[u8]]).await else {
                    return;
                };
                let mut buf = [0u8; 64];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

type Client = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(addr: std::net::SocketAddr, client: Arc<ClientConfig>) -> std::io::Result<Client> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(client)
        .connect(ServerName::try_from("api.example.com").expect("name"), tcp)
        .await
}

async fn echo(tls: &mut Client, text: &[u8]) {
    tls.write_all(text).await.expect("write");
    let mut buf = vec![0u8; text.len()];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(buf, text);
}

fn intermediate_of(tls: &Client) -> CertificateDer<'static> {
    let chain = tls.get_ref().1.peer_certificates().expect("peer chain");
    assert_eq!(chain.len(), 2, "leaf + intermediate, no root");
    chain[1].clone().into_owned()
}

#[tokio::test]
async fn an_agent_trusting_only_the_root_accepts_leaves_of_the_installed_intermediate() {
    let broker = FakeBroker::new(Duration::from_hours(1));
    let issued = obtain(broker.as_ref(), "node-a").await.expect("obtain");
    assert_eq!(*broker.seen_nodes.lock().expect("lock"), ["node-a"]);
    assert!(issued.root_pem.contains("BEGIN CERTIFICATE"));
    let intermediate = issued.ca.certificate().clone();
    let cache = Arc::new(LeafCache::new(issued.ca, LeafCacheConfig::default()).expect("cache"));
    let addr = serve(Arc::new(MitmServer::new(cache).expect("mitm"))).await;
    let mut tls = connect(addr, broker.client()).await.expect("handshake");
    assert_eq!(intermediate_of(&tls), intermediate);
    echo(&mut tls, b"hello").await;

    // An agent trusting another root refuses the same leaves.
    let other = FakeBroker::new(Duration::from_hours(1));
    let err = connect(addr, other.client())
        .await
        .expect_err("foreign root");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn an_answer_for_another_key_or_not_a_ca_is_refused() {
    #[derive(Debug)]
    struct Wrong(Arc<FakeBroker>);
    impl NodeCaSource for Wrong {
        fn request<'a>(
            &'a self,
            request: &'a NodeCaRequest,
        ) -> Pin<Box<dyn Future<Output = Result<NodeCaResponse, String>> + Send + 'a>> {
            Box::pin(async move {
                // Signs a CSR of a key this node never had.
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
                let csr = CertificateParams::default()
                    .serialize_request(&key)
                    .expect("csr")
                    .pem()
                    .expect("pem");
                let swapped = NodeCaRequest {
                    node: request.node.clone(),
                    csr,
                };
                self.0.request(&swapped).await
            })
        }
        fn revocation_list(
            &self,
        ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>> {
            self.0.revocation_list()
        }
    }
    let err = obtain(&Wrong(FakeBroker::new(Duration::from_hours(1))), "node-a")
        .await
        .expect_err("foreign key");
    assert!(
        matches!(err, NodeCaError::Invalid(TlsError::InvalidCaKey(_))),
        "{err}"
    );
}

#[tokio::test]
async fn renewal_swaps_the_ca_while_open_connections_keep_working() {
    // 6 s intermediates renewed at half life: the first swap comes after about 3 s.
    let broker = FakeBroker::new(Duration::from_secs(6));
    let first = obtain(broker.as_ref(), "node-a").await.expect("obtain");
    let first_der = first.ca.certificate().clone();
    let received = first.received;
    let not_after = first.not_after();
    let cache = Arc::new(LeafCache::new(first.ca, LeafCacheConfig::default()).expect("cache"));
    let addr = serve(Arc::new(MitmServer::new(Arc::clone(&cache)).expect("mitm"))).await;
    let mut open = connect(addr, broker.client()).await.expect("handshake");
    assert_eq!(intermediate_of(&open), first_der);
    echo(&mut open, b"before").await;

    let settings = RenewalSettings {
        renew_at: 0.5,
        jitter: 0.0,
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_millis(400),
        revocation_check: None,
    };
    let source: Arc<dyn NodeCaSource> = broker.clone();
    let renewer = tokio::spawn(keep_renewed(
        Arc::clone(&cache),
        source,
        "node-a".to_owned(),
        received,
        not_after,
        settings,
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cache.ca_replacements() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no renewal within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Not before the renewal point (half of the life left at receipt).
    let due = received + renewal_delay(received, not_after, &settings, 0.0);
    assert!(SystemTime::now() >= due, "renewed early");
    // The connection opened under the old CA still works; a new one gets the new CA's leaf.
    echo(&mut open, b"after the swap").await;
    let mut fresh = connect(addr, broker.client()).await.expect("handshake");
    let second = intermediate_of(&fresh);
    assert_ne!(
        second, first_der,
        "new handshakes use the renewed intermediate"
    );
    echo(&mut fresh, b"new").await;
    assert_eq!(
        *broker.seen_nodes.lock().expect("lock"),
        ["node-a", "node-a"]
    );
    renewer.abort();
}

#[tokio::test]
async fn without_a_renewal_new_interceptions_fail_closed_at_expiry() {
    let broker = FakeBroker::new(Duration::from_secs(2));
    let first = obtain(broker.as_ref(), "node-a").await.expect("obtain");
    let (received, not_after) = (first.received, first.not_after());
    let cache = Arc::new(LeafCache::new(first.ca, LeafCacheConfig::default()).expect("cache"));
    let addr = serve(Arc::new(MitmServer::new(Arc::clone(&cache)).expect("mitm"))).await;
    let mut open = connect(addr, broker.client()).await.expect("handshake");
    echo(&mut open, b"ok").await;

    broker.failing.store(true, Ordering::SeqCst);
    let settings = RenewalSettings {
        renew_at: 0.5,
        jitter: 0.0,
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_millis(200),
        revocation_check: None,
    };
    let source: Arc<dyn NodeCaSource> = broker.clone();
    let renewer = tokio::spawn(keep_renewed(
        Arc::clone(&cache),
        source,
        "node-a".to_owned(),
        received,
        not_after,
        settings,
    ));
    let wait = not_after
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
        + Duration::from_millis(1_100);
    tokio::time::sleep(wait).await;
    assert!(
        broker.calls.load(Ordering::SeqCst) >= 3,
        "renewal was retried"
    );
    assert_eq!(cache.ca_replacements(), 0);
    // No leaf of the expired CA, and no other CA: the handshake is refused.
    let err = connect(addr, broker.client())
        .await
        .expect_err("expired CA");
    assert!(!err.to_string().is_empty());
    assert!(matches!(
        cache.get_for_host("api.example.com"),
        Err(TlsError::CaNotValidNow { .. })
    ));
    // The broker comes back: the next retry installs a CA and interception resumes.
    broker.failing.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while cache.ca_replacements() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no recovery within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut fresh = connect(addr, broker.client())
        .await
        .expect("handshake after recovery");
    echo(&mut fresh, b"back").await;
    renewer.abort();
}

/// Waits up to 5 s for `done`.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn watching(every: Duration) -> RenewalSettings {
    RenewalSettings {
        renew_at: 0.9,
        jitter: 0.0,
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        revocation_check: Some(every),
    }
}

/// An hour-long intermediate revoked after a minute of use is replaced at the next read of
/// the revocation list, not at its renewal time; open connections keep working.
#[tokio::test]
async fn a_revoked_intermediate_is_replaced_at_once() {
    let broker = FakeBroker::new(Duration::from_hours(1));
    let first = obtain(broker.as_ref(), "node-a").await.expect("obtain");
    let first_der = first.ca.certificate().clone();
    let (received, not_after) = (first.received, first.not_after());
    let cache = Arc::new(LeafCache::new(first.ca, LeafCacheConfig::default()).expect("cache"));
    let addr = serve(Arc::new(MitmServer::new(Arc::clone(&cache)).expect("mitm"))).await;
    let mut open = connect(addr, broker.client()).await.expect("handshake");
    let source: Arc<dyn NodeCaSource> = broker.clone();
    let renewer = tokio::spawn(keep_renewed(
        Arc::clone(&cache),
        source,
        "node-a".to_owned(),
        received,
        not_after,
        watching(Duration::from_millis(100)),
    ));
    eventually("a few list reads", || {
        broker.crl_reads.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(
        cache.ca_replacements(),
        0,
        "nothing revoked: nothing replaced"
    );

    broker.revoke(&first_der);
    eventually("the revoked CA replaced", || cache.ca_replacements() == 1).await;
    assert!(!cache.ca_withdrawn());
    echo(&mut open, b"still open").await;
    let fresh = connect(addr, broker.client()).await.expect("handshake");
    assert_ne!(intermediate_of(&fresh), first_der);
    // The replacement is not in the list: no further renewals.
    let reads = broker.crl_reads.load(Ordering::SeqCst);
    eventually("more list reads", || {
        broker.crl_reads.load(Ordering::SeqCst) >= reads + 3
    })
    .await;
    assert_eq!(cache.ca_replacements(), 1);
    renewer.abort();
}

/// Signs only while its flag is clear; reads the revocation list always.
#[derive(Debug)]
struct Refusing(Arc<FakeBroker>, AtomicBool);
impl NodeCaSource for Refusing {
    fn request<'a>(
        &'a self,
        request: &'a NodeCaRequest,
    ) -> Pin<Box<dyn Future<Output = Result<NodeCaResponse, String>> + Send + 'a>> {
        Box::pin(async move {
            if self.1.load(Ordering::SeqCst) {
                return Err("403 Forbidden: node \"node-a\" is barred (test)".to_owned());
            }
            self.0.request(request).await
        })
    }
    fn revocation_list(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>> {
        self.0.revocation_list()
    }
}

/// A revoked intermediate that cannot be replaced (the broker bars the node, or is away) is
/// withdrawn: no leaf is forged or served from the cache until a new one arrives.
#[tokio::test]
async fn a_revoked_intermediate_that_cannot_be_replaced_is_withdrawn() {
    let broker = FakeBroker::new(Duration::from_hours(1));
    let first = obtain(broker.as_ref(), "node-a").await.expect("obtain");
    let first_der = first.ca.certificate().clone();
    let (received, not_after) = (first.received, first.not_after());
    let cache = Arc::new(LeafCache::new(first.ca, LeafCacheConfig::default()).expect("cache"));
    let addr = serve(Arc::new(MitmServer::new(Arc::clone(&cache)).expect("mitm"))).await;
    // A leaf in the cache already: withdrawal must not serve it either.
    let mut open = connect(addr, broker.client()).await.expect("handshake");
    echo(&mut open, b"cached").await;

    broker.revoke(&first_der);
    // The list still answers, signing does not (as a barred node's renewals are refused).
    let source = Arc::new(Refusing(broker.clone(), AtomicBool::new(true)));
    let renewer = tokio::spawn(keep_renewed(
        Arc::clone(&cache),
        source.clone(),
        "node-a".to_owned(),
        received,
        not_after,
        watching(Duration::from_millis(100)),
    ));
    eventually("the revoked CA withdrawn", || cache.ca_withdrawn()).await;
    assert!(matches!(
        cache.get_for_host("api.example.com"),
        Err(TlsError::CaWithdrawn)
    ));
    assert!(
        connect(addr, broker.client()).await.is_err(),
        "no handshake"
    );
    assert_eq!(
        cache.ca_not_after(),
        time::OffsetDateTime::UNIX_EPOCH,
        "readiness fails"
    );
    echo(&mut open, b"the open connection keeps its session").await;

    // The bar is lifted: the next retry installs a new intermediate.
    source.1.store(false, Ordering::SeqCst);
    eventually("a replacement", || cache.ca_replacements() == 1).await;
    assert!(!cache.ca_withdrawn());
    let mut fresh = connect(addr, broker.client()).await.expect("handshake");
    assert_ne!(intermediate_of(&fresh), first_der);
    echo(&mut fresh, b"back").await;
    renewer.abort();
}

/// A list from another issuer, or one that does not parse, revokes nothing and says why.
#[test]
fn only_the_issuers_list_revokes() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let broker = FakeBroker::new(Duration::from_hours(1));
    let issued = rt
        .block_on(obtain(broker.as_ref(), "node-a"))
        .expect("obtain");
    let ca = issued.ca.certificate().clone();
    assert_eq!(is_revoked(&broker.crl(), &ca), Ok(false));
    broker.revoke(&ca);
    assert_eq!(is_revoked(&broker.crl(), &ca), Ok(true));
    let other = FakeBroker::new(Duration::from_hours(1));
    other.revoke(&ca);
    let err = is_revoked(&other.crl(), &ca).expect_err("another issuer");
    assert!(err.contains("issued by"), "{err}");
    assert!(is_revoked(b"garbage", &ca).is_err());
}

#[test]
fn renewal_is_due_at_two_thirds_of_the_life_within_the_jitter() {
    let received = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let day = received + Duration::from_hours(24);
    let s = RenewalSettings::default();
    assert_eq!(
        renewal_delay(received, day, &s, 0.0),
        Duration::from_hours(16)
    );
    let early = renewal_delay(received, day, &s, -1.0);
    let late = renewal_delay(received, day, &s, 1.0);
    assert!(
        early >= Duration::from_mins(14 * 60 + 47) && early < Duration::from_hours(16),
        "{early:?}"
    );
    assert!(
        late > Duration::from_hours(16) && late <= Duration::from_mins(17 * 60 + 13),
        "{late:?}"
    );
    // Already expired: renew at once.
    assert_eq!(renewal_delay(day, received, &s, 0.0), Duration::ZERO);
}
