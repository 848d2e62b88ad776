//! The agent-facing TLS server: one rustls configuration per ALPN variant, all sharing one
//! certificate resolver backed by the [`LeafCache`].
//!
//! Building a `ServerConfig` costs about as much as a forge, so none is built per connection:
//! the few ALPN variants the proxy can offer are built once, up front.

use std::fmt;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello as RustlsClientHello, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};

use super::forge::LeafName;
use super::leaf_cache::LeafCache;
use super::{Leg, TlsError};

/// ALPN identifier of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN identifier of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Every ordered subset of the protocols the proxy speaks; a config is prebuilt for each.
const VARIANTS: [&[&[u8]]; 5] = [
    &[],
    &[ALPN_H2],
    &[ALPN_HTTP11],
    &[ALPN_H2, ALPN_HTTP11],
    &[ALPN_HTTP11, ALPN_H2],
];

/// Resumption sessions kept for agents (shared by all variants).
const SESSION_CACHE_SIZE: usize = 4096;

/// Resolves the certificate from the SNI the agent sent, through the leaf cache.
struct LeafResolver {
    leaves: Arc<LeafCache>,
}

impl fmt::Debug for LeafResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafResolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, hello: RustlsClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // No certificate means rustls aborts the handshake: no SNI is a denial, by design.
        let Some(sni) = hello.server_name() else {
            tracing::debug!("agent handshake without SNI refused");
            return None;
        };
        match self.leaves.get_for_host(sni) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!(sni, error = %e, "no leaf for agent handshake");
                None
            }
        }
    }
}

/// Serves one fixed leaf (for a `CONNECT` to an IP literal, where no SNI arrives).
struct FixedResolver(Arc<CertifiedKey>);

impl fmt::Debug for FixedResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedResolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for FixedResolver {
    fn resolve(&self, _hello: RustlsClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// The agent-facing TLS server.
pub struct MitmServer {
    leaves: Arc<LeafCache>,
    provider: Arc<CryptoProvider>,
    sessions: Arc<dyn StoresServerSessions>,
    configs: Vec<Arc<ServerConfig>>,
}

impl fmt::Debug for MitmServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MitmServer")
            .field("leaves", &self.leaves)
            .finish_non_exhaustive()
    }
}

impl MitmServer {
    /// Builds the server configurations around a shared leaf cache.
    pub fn new(leaves: Arc<LeafCache>) -> Result<Self, TlsError> {
        let provider = Arc::new(agent_facing_provider());
        let sessions: Arc<dyn StoresServerSessions> =
            rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
        let resolver: Arc<dyn ResolvesServerCert> = Arc::new(LeafResolver {
            leaves: Arc::clone(&leaves),
        });
        let configs = VARIANTS
            .iter()
            .map(|alpn| build_config(&provider, &sessions, Arc::clone(&resolver), alpn))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            leaves,
            provider,
            sessions,
            configs,
        })
    }

    /// The leaf cache behind the resolver (for metrics and pre-warming).
    #[must_use]
    pub fn leaves(&self) -> &Arc<LeafCache> {
        &self.leaves
    }

    /// The shared configuration offering `protocols` (in that order of preference).
    ///
    /// Only `h2` and `http/1.1` are kept (the proxy speaks nothing else, and the input may
    /// come from the agent); an empty result offers no ALPN, which means HTTP/1.1.
    #[must_use]
    pub fn server_config_for_alpn<P: AsRef<[u8]>>(&self, protocols: &[P]) -> Arc<ServerConfig> {
        let mut wanted: Vec<&[u8]> = Vec::with_capacity(2);
        for p in protocols {
            let p = p.as_ref();
            if (p == ALPN_H2 || p == ALPN_HTTP11) && !wanted.contains(&p) {
                wanted.push(p);
            }
        }
        let index = VARIANTS
            .iter()
            .position(|v| *v == wanted.as_slice())
            .unwrap_or(0);
        Arc::clone(&self.configs[index])
    }

    /// A one-off configuration serving the leaf for `name` whatever the SNI says.
    ///
    /// For a cooperative `CONNECT` to an IP literal, where clients send no SNI. It builds a
    /// `ServerConfig` per call, so keep it off the common path.
    pub fn server_config_for_name<P: AsRef<[u8]>>(
        &self,
        name: &LeafName,
        protocols: &[P],
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let key = self.leaves.get(name)?;
        let template = self.server_config_for_alpn(protocols);
        let alpn: Vec<&[u8]> = template.alpn_protocols.iter().map(Vec::as_slice).collect();
        build_config(
            &self.provider,
            &self.sessions,
            Arc::new(FixedResolver(key)),
            &alpn,
        )
    }

    /// Completes the agent's handshake offering `protocols` (see
    /// [`MitmServer::server_config_for_alpn`]). Wrap it in the handshake timeout.
    pub async fn accept<IO, P>(
        &self,
        io: IO,
        protocols: &[P],
    ) -> Result<tokio_rustls::server::TlsStream<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
        P: AsRef<[u8]>,
    {
        tokio_rustls::TlsAcceptor::from(self.server_config_for_alpn(protocols))
            .accept(io)
            .await
            .map_err(|source| TlsError::Handshake {
                leg: Leg::Agent,
                source,
            })
    }
}

/// The crypto provider of the agent-facing server: aws-lc (already linked for the broker's
/// RSA), whose X25519 and P-256 take about half ring's time, so a new connection costs the
/// proxy about a quarter less CPU (BENCHMARKS.md, peers); the default suites, with the
/// SHA-256 ones first. The server picks (`ignore_client_order`), so a client that lists
/// `AES_256_GCM_SHA384` first (rustls does) still gets `AES_128_GCM_SHA256`: the handshake's
/// hashing is then SHA-256, which has hardware help where SHA-384 had none in ring (SHA-512
/// blocks were 6 % of the proxy's CPU per new connection). AES-128-GCM is what most TLS 1.3
/// connections on the web use.
#[must_use]
pub fn agent_facing_provider() -> CryptoProvider {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| match suite.suite() {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 1,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 2,
            _ => 3,
        });
    provider
}

fn build_config(
    provider: &Arc<CryptoProvider>,
    sessions: &Arc<dyn StoresServerSessions>,
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.session_storage = Arc::clone(sessions);
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// What to offer the agent once upstream has chosen: exactly upstream's protocol, so both legs
/// speak the same one; when upstream chose none (a server without ALPN speaks HTTP/1.1),
/// `http/1.1` if the agent offered it, else nothing.
///
/// An agent that only offered `h2` to an upstream without ALPN then fails its handshake with
/// `no_application_protocol`, which is the honest answer.
#[must_use]
pub fn agent_alpn_for<P: AsRef<[u8]>>(upstream: Option<&[u8]>, agent_offer: &[P]) -> Vec<Vec<u8>> {
    match upstream {
        Some(p) => vec![p.to_vec()],
        None if agent_offer.iter().any(|p| p.as_ref() == ALPN_HTTP11) => {
            vec![ALPN_HTTP11.to_vec()]
        }
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::ClientConfig;
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::tls::client_hello::peek_client_hello;
    use crate::tls::leaf_cache::LeafCacheConfig;
    use crate::tls::test_support::{client_trusting, test_ca};

    fn mitm() -> (
        Arc<MitmServer>,
        Arc<ClientConfig>,
        Arc<ClientConfig>,
        Arc<ClientConfig>,
    ) {
        let ca = test_ca();
        let both = client_trusting(&ca, &[ALPN_H2, ALPN_HTTP11]);
        let http11 = client_trusting(&ca, &[ALPN_HTTP11]);
        let h2 = client_trusting(&ca, &[ALPN_H2]);
        let leaves = Arc::new(LeafCache::new(ca, LeafCacheConfig::default()).expect("cache"));
        (
            Arc::new(MitmServer::new(leaves).expect("server")),
            both,
            http11,
            h2,
        )
    }

    struct Outcome {
        client_alpn: Result<Option<Vec<u8>>, std::io::Error>,
        server: Result<Option<Vec<u8>>, TlsError>,
    }

    /// One handshake over loopback; on success, echoes a line to prove the session works.
    async fn handshake(
        server: Arc<MitmServer>,
        server_alpn: Vec<Vec<u8>>,
        client: Arc<ClientConfig>,
        name: &str,
    ) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut tls = server.accept(tcp, &server_alpn).await?;
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            let mut line = [0u8; 5];
            tls.read_exact(&mut line).await?;
            tls.write_all(&line).await?;
            tls.shutdown().await?;
            Ok(alpn)
        });
        let name = ServerName::try_from(name.to_owned()).expect("name");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let client_alpn = async {
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(name, tcp)
                .await?;
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            tls.write_all(b"hello").await?;
            let mut echo = [0u8; 5];
            tls.read_exact(&mut echo).await?;
            assert_eq!(&echo, b"hello");
            Ok(alpn)
        }
        .await;
        let server = tokio::time::timeout(Duration::from_secs(5), accept)
            .await
            .expect("server finished")
            .expect("server task");
        Outcome {
            client_alpn,
            server,
        }
    }

    /// (agent config, what the proxy offers, protocol both sides must end up with)
    type Case<'a> = (&'a Arc<ClientConfig>, &'a [&'a [u8]], Option<&'a [u8]>);

    fn protos(list: &[&[u8]]) -> Vec<Vec<u8>> {
        list.iter().map(|p| p.to_vec()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn agent_gets_the_offered_protocol() {
        let (server, both, http11, h2) = mitm();
        let cases: [Case<'_>; 5] = [
            (&both, &[ALPN_H2, ALPN_HTTP11], Some(ALPN_H2)),
            (&both, &[ALPN_HTTP11], Some(ALPN_HTTP11)),
            (&both, &[ALPN_H2], Some(ALPN_H2)),
            (&http11, &[ALPN_H2, ALPN_HTTP11], Some(ALPN_HTTP11)),
            (&both, &[], None),
        ];
        for (client, offer, expected) in cases {
            let out = handshake(
                Arc::clone(&server),
                protos(offer),
                Arc::clone(client),
                "api.example.com",
            )
            .await;
            let expected = expected.map(<[u8]>::to_vec);
            assert_eq!(out.client_alpn.expect("client handshake"), expected);
            assert_eq!(out.server.expect("server handshake"), expected);
        }
        // An h2-only agent cannot be offered only http/1.1: the handshake fails, on the agent leg.
        let out = handshake(
            Arc::clone(&server),
            protos(&[ALPN_HTTP11]),
            h2,
            "api.example.com",
        )
        .await;
        assert!(out.client_alpn.is_err());
        let err = out.server.expect_err("no common protocol");
        assert_eq!(err.handshake_leg(), Some(Leg::Agent), "{err}");
        assert_eq!(
            server.leaves().stats().forges(),
            1,
            "one leaf served every handshake"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_sni_is_refused_unless_a_name_is_given() {
        let (server, both, _, _) = mitm();
        // A client dialling an IP literal sends no SNI.
        let out = handshake(
            Arc::clone(&server),
            protos(&[ALPN_HTTP11]),
            Arc::clone(&both),
            "127.0.0.1",
        )
        .await;
        assert!(out.client_alpn.is_err());
        assert!(matches!(
            out.server,
            Err(TlsError::Handshake {
                leg: Leg::Agent,
                ..
            })
        ));
        assert_eq!(server.leaves().stats().forges(), 0);

        // A cooperative CONNECT to an IP knows the name: serve a leaf with an IP SAN.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let config = server
            .server_config_for_name(&LeafName::parse("127.0.0.1").expect("ip"), &[ALPN_HTTP11])
            .expect("config");
        assert_eq!(config.alpn_protocols, protos(&[ALPN_HTTP11]));
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            tokio_rustls::TlsAcceptor::from(config)
                .accept(tcp)
                .await
                .map(|_| ())
        });
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let tls = tokio_rustls::TlsConnector::from(both)
            .connect(name, tcp)
            .await;
        assert!(tls.is_ok(), "{:?}", tls.err());
        accept.await.expect("task").expect("server handshake");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_handshakes_share_one_forge() {
        const N: usize = 64;
        let (server, both, _, _) = mitm();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = {
            let server = Arc::clone(&server);
            tokio::spawn(async move {
                let mut tasks = Vec::new();
                for _ in 0..N {
                    let (tcp, _) = listener.accept().await.expect("accept");
                    let server = Arc::clone(&server);
                    tasks.push(tokio::spawn(async move {
                        let mut tls = server.accept(tcp, &[ALPN_H2, ALPN_HTTP11]).await?;
                        tls.write_all(b"k").await?;
                        tls.shutdown().await?;
                        Ok::<_, TlsError>(())
                    }));
                }
                for t in tasks {
                    t.await.expect("task").expect("server handshake");
                }
            })
        };
        let clients: Vec<_> = (0..N)
            .map(|_| {
                let config = Arc::clone(&both);
                tokio::spawn(async move {
                    let tcp = TcpStream::connect(addr).await.expect("connect");
                    let name = ServerName::try_from("burst.example.com").expect("name");
                    let mut tls = tokio_rustls::TlsConnector::from(config)
                        .connect(name, tcp)
                        .await
                        .expect("client handshake");
                    let mut b = [0u8; 1];
                    tls.read_exact(&mut b).await.expect("read");
                })
            })
            .collect();
        for c in clients {
            c.await.expect("client");
        }
        tokio::time::timeout(Duration::from_secs(10), acceptor)
            .await
            .expect("acceptor done")
            .expect("acceptor");
        assert_eq!(server.leaves().stats().forges(), 1);
    }

    #[test]
    fn configs_are_shared_per_alpn_variant() {
        let (server, _, _, _) = mitm();
        let a = server.server_config_for_alpn(&protos(&[ALPN_H2, ALPN_HTTP11]));
        let b = server.server_config_for_alpn(&[b"h2".as_slice(), b"spdy/3", b"http/1.1", b"h2"]);
        assert!(
            Arc::ptr_eq(&a, &b),
            "unknown and repeated protocols are dropped"
        );
        assert_eq!(a.alpn_protocols, protos(&[ALPN_H2, ALPN_HTTP11]));
        let h1 = server.server_config_for_alpn(&[ALPN_HTTP11]);
        assert!(!Arc::ptr_eq(&a, &h1));
        assert_eq!(h1.alpn_protocols, protos(&[ALPN_HTTP11]));
        let none = server.server_config_for_alpn(&[b"grpc-exp".as_slice()]);
        assert!(none.alpn_protocols.is_empty());
        let reversed = server.server_config_for_alpn(&[ALPN_HTTP11, ALPN_H2]);
        assert_eq!(reversed.alpn_protocols, protos(&[ALPN_HTTP11, ALPN_H2]));
    }

    #[test]
    fn agent_offer_follows_upstream() {
        let offer = protos(&[ALPN_H2, ALPN_HTTP11]);
        assert_eq!(agent_alpn_for(Some(ALPN_H2), &offer), protos(&[ALPN_H2]));
        assert_eq!(
            agent_alpn_for(Some(ALPN_HTTP11), &offer),
            protos(&[ALPN_HTTP11])
        );
        assert_eq!(agent_alpn_for(None, &offer), protos(&[ALPN_HTTP11]));
        assert_eq!(
            agent_alpn_for(None, &protos(&[ALPN_H2])),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(agent_alpn_for::<Vec<u8>>(None, &[]), Vec::<Vec<u8>>::new());
    }

    /// The transparent-listener sequence: peek the hello, then hand the untouched socket to
    /// the TLS server, which sees the same hello.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peeked_socket_still_completes_the_handshake() {
        let (server, both, _, _) = mitm();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let proxy = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let hello = peek_client_hello(&tcp, 16 * 1024, Duration::from_secs(5))
                .await
                .expect("peek");
            assert_eq!(hello.server_name(), Some("peeked.example.org"));
            let mut tls = server.accept(tcp, hello.alpn()).await.expect("accept tls");
            tls.write_all(b"ok").await.expect("write");
            tls.shutdown().await.expect("shutdown");
            hello
        });
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("peeked.example.org").expect("name");
        let mut tls = tokio_rustls::TlsConnector::from(both)
            .connect(name, tcp)
            .await
            .expect("handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.expect("read");
        assert_eq!(buf, b"ok");
        let hello = proxy.await.expect("proxy");
        assert!(hello.offers_alpn(ALPN_H2));
    }
}
