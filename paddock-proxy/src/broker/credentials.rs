//! How the proxy proves who it is to the broker: a bearer read from a file (re-read when the
//! file changes, so a rotated token is picked up without a restart) or held in memory (an
//! embedded broker's one-time caller key), and/or a TLS client certificate.
//!
//! Bearer values never appear in errors, logs or `Debug` output.

use std::fmt;
use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Largest bearer file accepted (large projected service-account JWTs fit easily).
const MAX_BEARER_FILE_BYTES: u64 = 64 * 1024;

/// Why the proxy's own broker credentials are unusable. Never contains a credential.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read broker bearer file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("broker bearer file {path} is empty")]
    Empty { path: String },
    #[error("broker bearer file {path} is larger than {MAX_BEARER_FILE_BYTES} bytes")]
    TooLarge { path: String },
    #[error("broker bearer in {path} contains characters not allowed in an HTTP header")]
    NotAHeader { path: String },
    #[error("the broker bearer given in memory is empty or not allowed in an HTTP header")]
    BadValue,
    #[error("cannot load {what} from {path}: {reason}")]
    Pem {
        what: &'static str,
        path: String,
        reason: String,
    },
}

/// The bearer the client presents to the broker (`Authorization: Bearer <token>`).
#[derive(Clone)]
pub enum BrokerBearer {
    /// Read from a file, re-read when the file changes and at least every `max_age`.
    File { path: PathBuf, max_age: Duration },
    /// Held in memory for the client's lifetime (an embedded broker's caller key).
    Value(String),
}

impl fmt::Debug for BrokerBearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { path, max_age } => f
                .debug_struct("File")
                .field("path", path)
                .field("max_age", max_age)
                .finish(),
            Self::Value(_) => f.write_str("Value(<redacted>)"),
        }
    }
}

/// A [`BrokerBearer`] ready for use.
#[derive(Debug)]
pub(crate) enum Bearer {
    File(BearerFile),
    /// `Bearer <token>`, marked sensitive (its `Debug` shows no value).
    Fixed(HeaderValue),
}

impl Bearer {
    /// Checks the bearer now: a missing or broken file fails at start-up, not on the first
    /// request.
    pub(crate) fn new(bearer: BrokerBearer) -> Result<Self, CredentialError> {
        match bearer {
            BrokerBearer::File { path, max_age } => {
                let file = BearerFile::new(path, max_age);
                file.header()?;
                Ok(Self::File(file))
            }
            BrokerBearer::Value(token) => {
                let token = token.trim();
                if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(CredentialError::BadValue);
                }
                let mut header = HeaderValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| CredentialError::BadValue)?;
                header.set_sensitive(true);
                Ok(Self::Fixed(header))
            }
        }
    }

    /// The `Authorization` header value for the next call.
    pub(crate) fn header(&self) -> Result<HeaderValue, CredentialError> {
        match self {
            Self::File(file) => file.header(),
            Self::Fixed(header) => Ok(header.clone()),
        }
    }
}

/// What identifies a bearer file version: a rotation (rewrite or symlink swap, as Kubernetes
/// does for projected tokens) changes at least one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    dev: u64,
    ino: u64,
}

struct Loaded {
    fingerprint: Fingerprint,
    read_at: Instant,
    /// `Bearer <token>`, marked sensitive.
    header: HeaderValue,
}

/// A bearer token file, re-read whenever its metadata changes and at least every `max_age`
/// (which also covers an in-place rewrite that keeps size and timestamp).
pub(crate) struct BearerFile {
    path: PathBuf,
    max_age: Duration,
    loaded: Mutex<Option<Loaded>>,
}

impl fmt::Debug for BearerFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerFile")
            .field("path", &self.path)
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

impl BearerFile {
    pub(crate) fn new(path: PathBuf, max_age: Duration) -> Self {
        Self {
            path,
            max_age,
            loaded: Mutex::new(None),
        }
    }

    /// The `Authorization` header value for the next call. A file that cannot be read is an
    /// error even if an older token is cached: a deleted or broken credential must not keep
    /// working (fail closed).
    pub(crate) fn header(&self) -> Result<HeaderValue, CredentialError> {
        let meta = std::fs::metadata(&self.path).map_err(|e| self.read_error(&e))?;
        let fingerprint = Fingerprint {
            modified: meta.modified().ok(),
            len: meta.len(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        // A poisoned lock only means another caller panicked mid-update; the cache is
        // replaced wholesale below, so its content cannot be half-written.
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(l) = loaded.as_ref()
            && l.fingerprint == fingerprint
            && l.read_at.elapsed() < self.max_age
        {
            return Ok(l.header.clone());
        }
        let header = self.read()?;
        *loaded = Some(Loaded {
            fingerprint,
            read_at: Instant::now(),
            header: header.clone(),
        });
        Ok(header)
    }

    fn read(&self) -> Result<HeaderValue, CredentialError> {
        let path = || self.path.display().to_string();
        let mut raw = Vec::new();
        File::open(&self.path)
            .and_then(|f| f.take(MAX_BEARER_FILE_BYTES + 1).read_to_end(&mut raw))
            .map_err(|e| self.read_error(&e))?;
        if raw.len() as u64 > MAX_BEARER_FILE_BYTES {
            return Err(CredentialError::TooLarge { path: path() });
        }
        let token = std::str::from_utf8(&raw)
            .map_err(|_| CredentialError::NotAHeader { path: path() })?
            .trim();
        if token.is_empty() {
            return Err(CredentialError::Empty { path: path() });
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(CredentialError::NotAHeader { path: path() });
        }
        let mut header = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| CredentialError::NotAHeader { path: path() })?;
        header.set_sensitive(true);
        Ok(header)
    }

    fn read_error(&self, e: &std::io::Error) -> CredentialError {
        CredentialError::Read {
            path: self.path.display().to_string(),
            reason: e.kind().to_string(),
        }
    }
}

/// PEM files of the proxy's TLS client certificate (chain first, leaf at the top) and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertFiles {
    pub cert_chain: PathBuf,
    pub key: PathBuf,
}

impl ClientCertFiles {
    pub(crate) fn load(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CredentialError> {
        let chain = load_certs(&self.cert_chain, "client certificate")?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| CredentialError::Pem {
            what: "client key",
            path: self.key.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok((chain, key))
    }
}

/// Every certificate in a PEM file; an empty file is an error.
pub(crate) fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, CredentialError> {
    let pem = |reason: String| CredentialError::Pem {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no certificate found".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_trims_and_follows_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "first-token\n").expect("write");
        let file = BearerFile::new(path.clone(), Duration::from_hours(1));
        let h = file.header().expect("header");
        assert_eq!(h, "Bearer first-token");
        assert!(h.is_sensitive());
        // A different length guarantees a new fingerprint even on coarse-mtime filesystems.
        std::fs::write(&path, "second-token-rotated").expect("rotate");
        assert_eq!(
            file.header().expect("header"),
            "Bearer second-token-rotated"
        );
    }

    #[test]
    fn max_age_forces_a_reread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "aaaa").expect("write");
        let file = BearerFile::new(path.clone(), Duration::ZERO);
        assert_eq!(file.header().expect("header"), "Bearer aaaa");
        // Same length; with max_age zero the content is read again regardless of metadata.
        std::fs::write(&path, "bbbb").expect("rewrite");
        assert_eq!(file.header().expect("header"), "Bearer bbbb");
    }

    #[test]
    fn broken_files_fail_closed_without_leaking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "good-token").expect("write");
        let file = BearerFile::new(path.clone(), Duration::from_hours(1));
        file.header().expect("first read");

        std::fs::remove_file(&path).expect("remove");
        assert!(matches!(file.header(), Err(CredentialError::Read { .. })));

        std::fs::write(&path, "  \n").expect("write");
        assert!(matches!(file.header(), Err(CredentialError::Empty { .. })));

        std::fs::write(&path, "two words-secret").expect("write");
        let err = file.header().expect_err("inner space");
        assert!(matches!(err, CredentialError::NotAHeader { .. }));
        assert!(!err.to_string().contains("words-secret"));

        std::fs::write(&path, vec![b'a'; 70 * 1024]).expect("write");
        assert!(matches!(
            file.header(),
            Err(CredentialError::TooLarge { .. })
        ));
        assert!(!format!("{file:?}").contains("good-token"));
    }

    #[test]
    fn in_memory_bearers_are_checked_and_never_shown() {
        let bearer = BrokerBearer::Value("caller-key-secret".into());
        assert!(!format!("{bearer:?}").contains("caller-key-secret"));
        let ready = Bearer::new(bearer).expect("valid");
        let h = ready.header().expect("header");
        assert_eq!(h, "Bearer caller-key-secret");
        assert!(h.is_sensitive());
        assert!(!format!("{ready:?}").contains("caller-key-secret"));
        for bad in ["", "  ", "two words", "nul\0byte"] {
            assert!(
                matches!(
                    Bearer::new(BrokerBearer::Value(bad.into())),
                    Err(CredentialError::BadValue)
                ),
                "{bad:?}"
            );
        }
    }
}
