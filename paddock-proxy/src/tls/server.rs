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
        let provider = Arc::new(rustls::crypto::ring::default_provider());
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
