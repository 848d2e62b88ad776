//! The floors under any TLS-terminating proxy built as Paddock's is, for `cargo xtask bench
//! peers`: a relay on the same runtime (tokio, one worker by default) and the same TLS stack
//! (rustls with Paddock's own crypto providers and suite order) that answers a `CONNECT`,
//! terminates the client's TLS with a fixed certificate, opens one TLS connection upstream
//! per client connection, and then either
//! - copies decrypted bytes between the two legs ([`Floor::Bytes`]): no HTTP parsed, no
//!   policy, no audit, nothing rewritten, so what it spends per keep-alive request is the
//!   cost of two TLS legs and four socket calls on this kernel, which no HTTP processing
//!   can take away; or
//! - forwards each HTTP/1.1 request with hyper ([`Floor::Hyper`]): hyper's server on the
//!   client leg, hyper's client connection upstream (its own task, as hyper-util's pool runs
//!   it), the request and response passed on untouched. What it spends above the byte relay
//!   is the HTTP machinery Paddock is built on; what Paddock spends above it is Paddock's own.
//!
//! Never a product path: bench references only.

use std::{io, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, Result, bail};
use paddock_proxy::{
    proxy::io::read_head,
    tls::{UpstreamAlpn, UpstreamTls, agent_facing_provider},
};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use serde::{Deserialize, Serialize};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The longest `CONNECT` head the relay reads.
const MAX_HEAD: usize = 8 * 1024;
const TUNNEL_OK: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// What a relay does between its two TLS legs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Floor {
    /// Copies bytes.
    Bytes,
    /// Forwards HTTP/1.1 requests with hyper, untouched.
    Hyper,
}

/// What the relay serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelaySpec {
    pub floor: Floor,
    /// Where it accepts `CONNECT`s.
    pub listen: SocketAddr,
    /// The one upstream every tunnel goes to, whatever the `CONNECT` names.
    pub upstream: SocketAddr,
    /// The name upstream's certificate must carry.
    pub server_name: String,
    /// The client-facing certificate chain and key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA upstream's certificate must chain to (PEM).
    pub upstream_ca: PathBuf,
}

/// The relay's two TLS configurations, built from Paddock's own pieces.
#[derive(Clone)]
pub struct Relay {
    floor: Floor,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    upstream: SocketAddr,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("upstream", &self.upstream)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Reads the certificates `spec` names.
    ///
    /// # Errors
    /// A file that cannot be read or holds no usable certificate or key.
    pub fn new(spec: &RelaySpec) -> Result<Self> {
        let chain = CertificateDer::pem_file_iter(&spec.cert)
            .with_context(|| format!("read {}", spec.cert.display()))?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&spec.key)
            .with_context(|| format!("read {}", spec.key.display()))?;
        let mut server = ServerConfig::builder_with_provider(Arc::new(agent_facing_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        server.ignore_client_order = true;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&spec.upstream_ca)? {
            roots.add(cert?)?;
        }
        let client = UpstreamTls::with_roots(roots)?.client_config(UpstreamAlpn::Http11);
        Ok(Self {
            floor: spec.floor,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(client),
            upstream: spec.upstream,
            server_name: ServerName::try_from(spec.server_name.clone())?,
        })
    }

    /// Serves `listener` until the task is dropped; one task per connection, whose error
    /// ends only that connection.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors, say: wait instead of spinning on the error.
                    eprintln!("relay accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let relay = self.clone();
            tokio::spawn(async move {
                if let Err(e) = relay.tunnel(tcp).await {
                    eprintln!("relay: {e}");
                }
            });
        }
    }

    /// One client connection: the `CONNECT` answer, both handshakes, then bytes both ways
    /// until either side closes.
    ///
    /// # Errors
    /// Any I/O or TLS failure on either leg, or a `CONNECT` head over 8 KiB.
    pub async fn tunnel(&self, mut tcp: TcpStream) -> Result<()> {
        tcp.set_nodelay(true)?;
        // A client sends nothing after the head until it has the answer.
        let (head, _) = read_head(&mut tcp, MAX_HEAD).await?;
        if !head.starts_with(b"CONNECT ") {
            bail!("not a CONNECT");
        }
        tcp.write_all(TUNNEL_OK).await?;
        let mut agent = self.acceptor.accept(tcp).await.context("client TLS")?;
        let up = TcpStream::connect(self.upstream).await?;
        up.set_nodelay(true)?;
        let mut up = self
            .connector
            .connect(self.server_name.clone(), up)
            .await
            .context("upstream TLS")?;
        if self.floor == Floor::Hyper {
            return forward_http(agent, up).await;
        }
        match tokio::io::copy_bidirectional(&mut agent, &mut up).await {
            Ok(_) => Ok(()),
            // A client that closes without close_notify ends its tunnel, nothing more.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// [`Floor::Hyper`]: hyper's HTTP/1.1 server on `agent`, each request sent as it came over
/// hyper's client connection on `up`, whose answer goes back as it came.
async fn forward_http<A, U>(agent: A, up: U) -> Result<()>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper::{Request, body::Incoming, service::service_fn};
    use hyper_util::rt::TokioIo;

    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("relay upstream: {e}");
        }
    });
    // HTTP/1.1 answers one request at a time: the lock is never contended.
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let service = service_fn(move |req: Request<Incoming>| {
        let sender = Arc::clone(&sender);
        async move {
            let mut sender = sender.lock().await;
            sender.ready().await?;
            sender.send_request(req).await
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(agent), service)
        .await?;
    Ok(())
}
