//! The upstream TLS client: always verifying, against the webpki roots plus an optional extra
//! CA bundle (for private upstreams). There is deliberately no way to turn verification off.
//!
//! # Negotiating ALPN on both legs
//!
//! The proxy offers upstream what the agent offered ([`UpstreamAlpn::from_agent_offer`]),
//! connects upstream first, reads the protocol upstream chose from
//! [`UpstreamConnection::alpn`], and then accepts the agent with
//! `MitmServer::server_config_for_alpn(&agent_alpn_for(upstream_alpn, agent_offer))`, so the
//! agent is offered exactly what upstream accepted and both legs speak one protocol.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::{ClientSessionMemoryCache, Resumption};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};

use super::server::{ALPN_H2, ALPN_HTTP11};
use super::{Leg, TlsError};

/// Resumption sessions kept per upstream configuration set.
const SESSION_CACHE_SIZE: usize = 1024;

/// What to offer upstream in ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamAlpn {
    /// `h2` and `http/1.1`.
    H2AndHttp11,
    /// `http/1.1` only.
    Http11,
    /// `h2` only (an agent that offered nothing else, e.g. a gRPC client).
    H2,
    /// No ALPN extension.
    None,
}

impl UpstreamAlpn {
    const ALL: [UpstreamAlpn; 4] = [
        UpstreamAlpn::H2AndHttp11,
        UpstreamAlpn::Http11,
        UpstreamAlpn::H2,
        UpstreamAlpn::None,
    ];

    /// The subset of `h2`/`http/1.1` the agent offered; never more, so whatever upstream picks
    /// is something the agent accepts.
    #[must_use]
    pub fn from_agent_offer<P: AsRef<[u8]>>(offer: &[P]) -> Self {
        let h2 = offer.iter().any(|p| p.as_ref() == ALPN_H2);
        let http11 = offer.iter().any(|p| p.as_ref() == ALPN_HTTP11);
        match (h2, http11) {
            (true, true) => UpstreamAlpn::H2AndHttp11,
            (true, false) => UpstreamAlpn::H2,
            (false, true) => UpstreamAlpn::Http11,
            (false, false) => UpstreamAlpn::None,
        }
    }

    /// The protocol identifiers offered.
    #[must_use]
    pub fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            UpstreamAlpn::H2AndHttp11 => vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()],
            UpstreamAlpn::Http11 => vec![ALPN_HTTP11.to_vec()],
            UpstreamAlpn::H2 => vec![ALPN_H2.to_vec()],
            UpstreamAlpn::None => Vec::new(),
        }
    }

    fn index(self) -> usize {
        match self {
            UpstreamAlpn::H2AndHttp11 => 0,
            UpstreamAlpn::Http11 => 1,
            UpstreamAlpn::H2 => 2,
            UpstreamAlpn::None => 3,
        }
    }
}

/// Upstream client configurations, one per [`UpstreamAlpn`], sharing roots and sessions.
pub struct UpstreamTls {
    configs: Vec<Arc<ClientConfig>>,
    extra_roots: usize,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("extra_roots", &self.extra_roots)
            .finish_non_exhaustive()
    }
}

/// An established upstream TLS connection and the protocol upstream chose.
#[derive(Debug)]
pub struct UpstreamConnection<IO> {
    /// The TLS stream.
    pub stream: tokio_rustls::client::TlsStream<IO>,
    /// The negotiated ALPN protocol, if any.
    pub alpn: Option<Vec<u8>>,
}

impl UpstreamTls {
    /// Trusts the webpki roots, plus every certificate in `extra_ca_bundle` (PEM) if given.
    pub fn new(extra_ca_bundle: Option<&Path>) -> Result<Self, TlsError> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let mut extra = 0;
        if let Some(path) = extra_ca_bundle {
            for cert in load_bundle(path)? {
                roots.add(cert).map_err(|e| TlsError::InvalidPem {
                    what: path.display().to_string(),
                    reason: format!("unusable CA certificate: {e}"),
                })?;
                extra += 1;
            }
        }
        Self::build(roots, extra)
    }

    /// Trusts exactly `roots` (for tests and custom trust stores).
    pub fn with_roots(roots: RootCertStore) -> Result<Self, TlsError> {
        let n = roots.len();
        Self::build(roots, n)
    }

    fn build(roots: RootCertStore, extra_roots: usize) -> Result<Self, TlsError> {
        // aws-lc: its X25519 and P-256 take about half ring's time per handshake.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let roots = Arc::new(roots);
        let resumption =
            Resumption::store(Arc::new(ClientSessionMemoryCache::new(SESSION_CACHE_SIZE)));
        let configs = UpstreamAlpn::ALL
            .iter()
            .map(|alpn| {
                let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(Arc::clone(&roots))
                    .with_no_client_auth();
                config.alpn_protocols = alpn.protocols();
                config.resumption = resumption.clone();
                Ok(Arc::new(config))
            })
            .collect::<Result<Vec<_>, TlsError>>()?;
        Ok(Self {
            configs,
            extra_roots,
        })
    }

    /// The shared client configuration offering `alpn`.
    #[must_use]
    pub fn client_config(&self, alpn: UpstreamAlpn) -> Arc<ClientConfig> {
        Arc::clone(&self.configs[alpn.index()])
    }

    /// Performs the upstream handshake with SNI (and certificate name) = `server_name`, the
    /// name the agent asked for, never the dialled address. Wrap it in the handshake timeout.
    pub async fn connect<IO>(
        &self,
        io: IO,
        server_name: &str,
        alpn: UpstreamAlpn,
    ) -> Result<UpstreamConnection<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = parse_server_name(server_name)?;
        let stream = tokio_rustls::TlsConnector::from(self.client_config(alpn))
            .connect(name, io)
            .await
            .map_err(|source| TlsError::Handshake {
                leg: Leg::Upstream,
                source,
            })?;
        let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        Ok(UpstreamConnection { stream, alpn })
    }
}

/// [`UpstreamTls::connect`] as a free function.
pub async fn connect_upstream<IO>(
    tls: &UpstreamTls,
    io: IO,
    server_name: &str,
    alpn: UpstreamAlpn,
) -> Result<UpstreamConnection<IO>, TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    tls.connect(io, server_name, alpn).await
}

fn parse_server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    let unbracketed = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    ServerName::try_from(unbracketed.to_owned())
        .map_err(|_| TlsError::InvalidServerName(name.to_owned()))
}

fn load_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::ReadFile {
        what: "upstream CA bundle",
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::InvalidPem {
            what: path.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::InvalidPem {
            what: path.display().to_string(),
            reason: "no CERTIFICATE block".to_owned(),
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use rustls::ServerConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::tls::client_hello::{ClientHello, peek_client_hello};
    use crate::tls::forge::{LeafForger, LeafName};
    use crate::tls::leaf_cache::{LeafCache, LeafCacheConfig};
    use crate::tls::server::{MitmServer, agent_alpn_for};
    use crate::tls::test_support::{client_trusting, test_ca};
    use crate::tls::{RunCa, TlsError};

    /// A stand-in upstream HTTPS server on loopback with a certificate for `upstream.test`
    /// from its own CA; reports the hello it received.
    struct Upstream {
        addr: SocketAddr,
        bundle: tempfile::NamedTempFile,
        hellos: tokio::sync::mpsc::UnboundedReceiver<ClientHello>,
    }

    async fn upstream(alpn: &[&[u8]], connections: usize) -> Upstream {
        let ca = RunCa::generate("upstream test CA", Duration::from_hours(2))
            .expect("CA")
            .ca;
        let mut bundle = tempfile::NamedTempFile::new().expect("tempfile");
        std::io::Write::write_all(&mut bundle, ca.certificate_pem().as_bytes())
            .expect("write bundle");
        let leaf = LeafForger::new(ca)
            .expect("forger")
            .forge(&LeafName::parse("upstream.test").expect("name"))
            .expect("forge");
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Fixed(leaf.certified)));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, hellos) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for _ in 0..connections {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                if let Ok(hello) = peek_client_hello(&tcp, 16 * 1024, Duration::from_secs(5)).await
                {
                    let _ = tx.send(hello);
                }
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"upstream").await;
                    let _ = tls.shutdown().await;
                }
            }
        });
        Upstream {
            addr,
            bundle,
            hellos,
        }
    }

    #[derive(Debug)]
    struct Fixed(Arc<rustls::sign::CertifiedKey>);

    impl rustls::server::ResolvesServerCert for Fixed {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(Arc::clone(&self.0))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verifies_with_the_extra_bundle_and_negotiates_alpn() {
        let mut up = upstream(&[ALPN_H2, ALPN_HTTP11], 3).await;
        let tls = UpstreamTls::new(Some(up.bundle.path())).expect("upstream tls");
        for (offer, expected) in [
            (UpstreamAlpn::H2AndHttp11, Some(ALPN_H2)),
            (UpstreamAlpn::Http11, Some(ALPN_HTTP11)),
            (UpstreamAlpn::None, None),
        ] {
            let tcp = TcpStream::connect(up.addr).await.expect("connect");
            let mut conn = connect_upstream(&tls, tcp, "upstream.test", offer)
                .await
                .expect("handshake");
            assert_eq!(conn.alpn.as_deref(), expected, "{offer:?}");
            let mut body = Vec::new();
            conn.stream.read_to_end(&mut body).await.expect("read");
            assert_eq!(body, b"upstream");
            let hello = up.hellos.recv().await.expect("hello");
            assert_eq!(
                hello.server_name(),
                Some("upstream.test"),
                "SNI is the original name"
            );
            assert_eq!(hello.alpn(), offer.protocols().as_slice());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_trusts_what_it_cannot_verify() {
        let up = upstream(&[ALPN_HTTP11], 2).await;
        // webpki roots only: the private CA is unknown.
        let public_only = UpstreamTls::new(None).expect("upstream tls");
        let tcp = TcpStream::connect(up.addr).await.expect("connect");
        let err = public_only
            .connect(tcp, "upstream.test", UpstreamAlpn::Http11)
            .await
            .expect_err("unknown issuer");
        assert_eq!(err.handshake_leg(), Some(Leg::Upstream), "{err}");
        assert!(
            err.to_string().contains("UnknownIssuer") || err.to_string().contains("unknown"),
            "{err}"
        );

        // Trusted CA, wrong name.
        let tls = UpstreamTls::new(Some(up.bundle.path())).expect("upstream tls");
        let tcp = TcpStream::connect(up.addr).await.expect("connect");
        let err = tls
            .connect(tcp, "other.test", UpstreamAlpn::Http11)
            .await
            .expect_err("wrong name");
        assert_eq!(err.handshake_leg(), Some(Leg::Upstream), "{err}");
    }

    #[test]
    fn bundle_errors_are_clear() {
        let err = UpstreamTls::new(Some(Path::new("/nonexistent/paddock/bundle.pem")))
            .expect_err("missing");
        assert!(
            matches!(
                err,
                TlsError::ReadFile {
                    what: "upstream CA bundle",
                    ..
                }
            ),
            "{err}"
        );
        let empty = tempfile::NamedTempFile::new().expect("tempfile");
        let err = UpstreamTls::new(Some(empty.path())).expect_err("empty");
        assert!(matches!(err, TlsError::InvalidPem { .. }), "{err}");
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
        let tls = UpstreamTls::new(None).expect("webpki only");
        assert_eq!(tls.extra_roots, 0);
        assert!(matches!(
            parse_server_name("not a name"),
            Err(TlsError::InvalidServerName(_))
        ));
        assert!(parse_server_name("[2001:db8::1]").is_ok());
    }

    #[test]
    fn upstream_offer_is_what_the_agent_offered() {
        let p = |l: &[&[u8]]| l.iter().map(|x| x.to_vec()).collect::<Vec<_>>();
        assert_eq!(
            UpstreamAlpn::from_agent_offer(&p(&[ALPN_H2, ALPN_HTTP11])),
            UpstreamAlpn::H2AndHttp11
        );
        assert_eq!(
            UpstreamAlpn::from_agent_offer(&p(&[ALPN_HTTP11, ALPN_H2])),
            UpstreamAlpn::H2AndHttp11
        );
        assert_eq!(
            UpstreamAlpn::from_agent_offer(&p(&[ALPN_HTTP11])),
            UpstreamAlpn::Http11
        );
        assert_eq!(
            UpstreamAlpn::from_agent_offer(&p(&[ALPN_H2, b"grpc-exp"])),
            UpstreamAlpn::H2
        );
        assert_eq!(
            UpstreamAlpn::from_agent_offer(&p(&[b"acme-tls/1"])),
            UpstreamAlpn::None
        );
        let tls = UpstreamTls::new(None).expect("tls");
        for alpn in UpstreamAlpn::ALL {
            assert_eq!(tls.client_config(alpn).alpn_protocols, alpn.protocols());
        }
    }

    /// Both legs: the agent offers h2 and http/1.1, upstream only speaks http/1.1, so the
    /// agent is offered (and gets) http/1.1.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn agent_is_offered_what_upstream_accepted() {
        let up = upstream(&[ALPN_HTTP11], 1).await;
        let upstream_tls =
            Arc::new(UpstreamTls::new(Some(up.bundle.path())).expect("upstream tls"));
        let ca = test_ca();
        let agent_config = client_trusting(&ca, &[ALPN_H2, ALPN_HTTP11]);
        let mitm = Arc::new(
            MitmServer::new(Arc::new(
                LeafCache::new(ca, LeafCacheConfig::default()).expect("cache"),
            ))
            .expect("mitm"),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let proxy_addr = listener.local_addr().expect("addr");
        let upstream_addr = up.addr;
        let proxy = tokio::spawn(async move {
            let (agent, _) = listener.accept().await.expect("accept");
            let hello = peek_client_hello(&agent, 16 * 1024, Duration::from_secs(5)).await?;
            let sni = hello.require_sni()?.to_owned();
            let tcp = TcpStream::connect(upstream_addr).await?;
            let mut up = upstream_tls
                .connect(tcp, &sni, UpstreamAlpn::from_agent_offer(hello.alpn()))
                .await?;
            let offer = agent_alpn_for(up.alpn.as_deref(), hello.alpn());
            let mut agent = mitm.accept(agent, &offer).await?;
            let mut body = Vec::new();
            up.stream.read_to_end(&mut body).await?;
            agent.write_all(&body).await?;
            agent.shutdown().await?;
            Ok::<_, TlsError>(up.alpn)
        });
        let tcp = TcpStream::connect(proxy_addr).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from("upstream.test").expect("name");
        let mut tls = tokio_rustls::TlsConnector::from(agent_config)
            .connect(name, tcp)
            .await
            .expect("agent handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_HTTP11));
        let mut body = Vec::new();
        tls.read_to_end(&mut body).await.expect("read");
        assert_eq!(body, b"upstream");
        let upstream_alpn = proxy.await.expect("proxy task").expect("proxy");
        assert_eq!(upstream_alpn.as_deref(), Some(ALPN_HTTP11));
    }
}
