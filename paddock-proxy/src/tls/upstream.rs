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
        let provider = Arc::new(rustls::crypto::ring::default_provider());
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
