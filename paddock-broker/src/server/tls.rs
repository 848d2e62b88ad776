//! TLS 1.3-only server configuration (ring provider), optional client-certificate auth.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};

/// How often the certificate files are checked for a renewal (a `stat` of each).
pub const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Pem { path: String, message: String },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA verifier: {0}")]
    Verifier(String),
}

fn pem_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no certificate found"));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_err(path, e))
}

/// Builds a TLS 1.3-only server config. With `client_roots`, every client must present a
/// certificate chaining to one of them.
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Option<Vec<CertificateDer<'static>>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(ring::default_provider());
    let certified = Arc::new(CertifiedKey::from_der(certs, key, &provider)?);
    server_config_with(
        Arc::new(rustls::sign::SingleCertAndKey::from(certified)),
        client_roots,
        provider,
    )
}

fn server_config_with(
    resolver: Arc<dyn ResolvesServerCert>,
    client_roots: Option<Vec<CertificateDer<'static>>>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let mut store = RootCertStore::empty();
            for cert in roots {
                store.add(cert)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Loads certificate, key and optional client CA from PEM files. The certificate and key are
/// re-read when they change (see [`ReloadingCert`]), so a renewal (cert-manager rewrites the
/// mounted Secret) needs no restart.
pub fn from_files(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let roots = client_ca.map(load_certs).transpose()?;
    let provider = Arc::new(ring::default_provider());
    let resolver = ReloadingCert::load(cert, key, Arc::clone(&provider), CERT_CHECK_INTERVAL)?;
    server_config_with(Arc::new(resolver), roots, provider)
}

/// Modification time and length of each file: what a renewal changes.
type Signature = [(Option<SystemTime>, u64); 2];

fn signature(cert: &Path, key: &Path) -> Signature {
    [cert, key].map(|p| std::fs::metadata(p).map_or((None, 0), |m| (m.modified().ok(), m.len())))
}

/// The server certificate from two PEM files, re-read when their modification time or
/// length changes, checked at most once per interval during handshakes. A pair that does not
/// load (half-written files, a key that does not match) is logged and the previous one stays
/// in use, so a bad renewal never takes the broker down.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    interval: Duration,
    current: ArcSwap<CertifiedKey>,
    /// When the files were last checked, and what they looked like when last loaded.
    checked: Mutex<(Instant, Signature)>,
}

impl ReloadingCert {
    /// Loads the pair now (an error here stops the broker from starting).
    pub fn load(
        cert: &Path,
        key: &Path,
        provider: Arc<CryptoProvider>,
        interval: Duration,
    ) -> Result<Self, TlsError> {
        let sig = signature(cert, key);
        let certified = Self::read(cert, key, &provider)?;
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            interval,
            current: ArcSwap::from_pointee(certified),
            checked: Mutex::new((Instant::now(), sig)),
        })
    }

    fn read(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
        Ok(CertifiedKey::from_der(
            load_certs(cert)?,
            load_key(key)?,
            provider,
        )?)
    }

    /// The certificate to present, re-read first if the interval passed and the files
    /// changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        // Another handshake checking right now is enough; never wait for it.
        if let Ok(mut checked) = self.checked.try_lock()
            && checked.0.elapsed() >= self.interval
        {
            checked.0 = Instant::now();
            let sig = signature(&self.cert, &self.key);
            if sig != checked.1 {
                match Self::read(&self.cert, &self.key, &self.provider) {
                    Ok(certified) => {
                        self.current.store(Arc::new(certified));
                        checked.1 = sig;
                        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    }
                    // Not remembered as loaded: tried again at the next check.
                    Err(e) => tracing::error!(
                        error = %e,
                        "new TLS certificate not loaded; the previous one stays in use"
                    ),
                }
            }
        }
        self.current.load_full()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        std::fs::write(dir.join("tls.crt"), cert.pem()).expect("write cert");
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("write key");
        cert.der().to_vec()
    }

    #[test]
    fn renewed_certificates_are_picked_up_and_broken_ones_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let first = write_pair(d, "broker.one");
        let resolver = ReloadingCert::load(
            &d.join("tls.crt"),
            &d.join("tls.key"),
            Arc::new(ring::default_provider()),
            Duration::ZERO,
        )
        .expect("load");
        let presented = |r: &ReloadingCert| r.current().cert[0].to_vec();
        assert_eq!(presented(&resolver), first);

        let second = write_pair(d, "broker.two-renewed");
        assert_eq!(presented(&resolver), second, "renewal picked up");

        // A half-written renewal: the key no longer matches (or parses); keep serving.
        std::fs::write(d.join("tls.key"), "-----BEGIN PRIVATE KEY-----\ngarbage").expect("key");
        assert_eq!(
            presented(&resolver),
            second,
            "broken files keep the previous pair"
        );
        let third = write_pair(d, "broker.three-fixed-later");
        assert_eq!(presented(&resolver), third, "a later good pair is loaded");
    }

    #[test]
    fn files_are_checked_at_most_once_per_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let first = write_pair(d, "broker.one");
        let resolver = ReloadingCert::load(
            &d.join("tls.crt"),
            &d.join("tls.key"),
            Arc::new(ring::default_provider()),
            Duration::from_hours(1),
        )
        .expect("load");
        write_pair(d, "broker.two");
        assert_eq!(
            resolver.current().cert[0].to_vec(),
            first,
            "within the interval the files are not even looked at"
        );
    }

    #[test]
    fn a_pair_that_does_not_load_stops_the_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        write_pair(d, "broker.one");
        std::fs::write(d.join("tls.key"), "not a key").expect("key");
        let err = from_files(&d.join("tls.crt"), &d.join("tls.key"), None).expect_err("bad key");
        assert!(err.to_string().contains("tls.key"), "{err}");
    }
}
