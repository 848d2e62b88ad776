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
    /// The token's own expiry when it is a JWT with a readable `exp`.
    expires: Option<SystemTime>,
    /// `Bearer <token>`, marked sensitive.
    header: HeaderValue,
}

impl Loaded {
    /// Whether this token may still be served when its file cannot be read: until its JWT
    /// `exp`, or for an opaque token until `max_age` after it was last read successfully.
    fn still_valid(&self, max_age: Duration) -> bool {
        match self.expires {
            Some(exp) => SystemTime::now() < exp,
            None => self.read_at.elapsed() < max_age,
        }
    }
}

/// A bearer token file, re-read whenever its metadata changes and at least every `max_age`
/// (which also covers an in-place rewrite that keeps size and timestamp).
///
/// A transient failure to read the file (an I/O error other than "not found", or an empty
/// file, as a writer that truncates before writing briefly leaves) keeps the last good token
/// in use while it is valid: until its `exp` when it is a JWT, otherwise for `max_age` after
/// the last successful read. After that, and at once when the file is gone (deleting it is how
/// a credential is withdrawn) or holds something that is not a token, calls fail closed.
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

/// A read failure, and whether it may pass (so the cached token may bridge it).
struct ReadFailure {
    error: CredentialError,
    transient: bool,
}

impl BearerFile {
    pub(crate) fn new(path: PathBuf, max_age: Duration) -> Self {
        Self {
            path,
            max_age,
            loaded: Mutex::new(None),
        }
    }

    /// The `Authorization` header value for the next call.
    pub(crate) fn header(&self) -> Result<HeaderValue, CredentialError> {
        // A poisoned lock only means another caller panicked mid-update; the cache is
        // replaced wholesale below, so its content cannot be half-written.
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match self.load(loaded.as_ref()) {
            Ok(Some(fresh)) => {
                let header = fresh.header.clone();
                *loaded = Some(fresh);
                Ok(header)
            }
            Ok(None) => loaded
                .as_ref()
                .map(|l| l.header.clone())
                .ok_or(CredentialError::BadValue),
            Err(ReadFailure { error, transient }) => match loaded.as_ref() {
                Some(l) if transient && l.still_valid(self.max_age) => {
                    tracing::warn!(
                        error = %error,
                        "broker bearer file unreadable; using the last token read while it is valid"
                    );
                    Ok(l.header.clone())
                }
                _ => {
                    // Nothing may bridge a later failure with this token again.
                    *loaded = None;
                    Err(error)
                }
            },
        }
    }

    /// `Ok(None)`: the cached token is current; `Ok(Some)`: a newly read token.
    fn load(&self, cached: Option<&Loaded>) -> Result<Option<Loaded>, ReadFailure> {
        let meta = std::fs::metadata(&self.path).map_err(|e| self.io_failure(&e))?;
        let fingerprint = Fingerprint {
            modified: meta.modified().ok(),
            len: meta.len(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        if let Some(l) = cached
            && l.fingerprint == fingerprint
            && l.read_at.elapsed() < self.max_age
        {
            return Ok(None);
        }
        let (header, expires) = self.read()?;
        Ok(Some(Loaded {
            fingerprint,
            read_at: Instant::now(),
            expires,
            header,
        }))
    }

    fn io_failure(&self, e: &std::io::Error) -> ReadFailure {
        ReadFailure {
            error: self.read_error(e),
            transient: e.kind() != std::io::ErrorKind::NotFound,
        }
    }

    fn read(&self) -> Result<(HeaderValue, Option<SystemTime>), ReadFailure> {
        let path = || self.path.display().to_string();
        let lasting = |error| ReadFailure {
            error,
            transient: false,
        };
        let mut raw = Vec::new();
        File::open(&self.path)
            .and_then(|f| f.take(MAX_BEARER_FILE_BYTES + 1).read_to_end(&mut raw))
            .map_err(|e| self.io_failure(&e))?;
        if raw.len() as u64 > MAX_BEARER_FILE_BYTES {
            return Err(lasting(CredentialError::TooLarge { path: path() }));
        }
        let token = std::str::from_utf8(&raw)
            .map_err(|_| lasting(CredentialError::NotAHeader { path: path() }))?
            .trim();
        if token.is_empty() {
            return Err(ReadFailure {
                error: CredentialError::Empty { path: path() },
                transient: true,
            });
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(lasting(CredentialError::NotAHeader { path: path() }));
        }
        let mut header = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| lasting(CredentialError::NotAHeader { path: path() }))?;
        header.set_sensitive(true);
        Ok((header, jwt_expiry(token)))
    }

    fn read_error(&self, e: &std::io::Error) -> CredentialError {
        CredentialError::Read {
            path: self.path.display().to_string(),
            reason: e.kind().to_string(),
        }
    }
}

/// The `exp` of a JWT-shaped token, read without verifying it: the proxy only needs to know
/// how long its own token may bridge an unreadable file, the token refresher when to refresh
/// (the broker verifies the token).
#[must_use]
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    #[derive(serde::Deserialize)]
    struct Exp {
        exp: u64,
    }
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let exp: Exp = serde_json::from_slice(&bytes).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(exp.exp))
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

    /// A transient failure: the path is a directory, so `open` works and `read` fails
    /// (EISDIR), even for root, who ignores permission bits.
    fn break_transiently(path: &Path) {
        std::fs::remove_file(path).expect("remove");
        std::fs::create_dir(path).expect("dir in its place");
    }

    fn jwt_with_exp(exp: u64) -> String {
        use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
        let payload = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"proxy","exp":{exp}}}"#));
        format!("eyJhbGciOiJFUzI1NiJ9.{payload}.c2ln")
    }

    fn now_secs() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    }

    #[test]
    fn opaque_token_bridges_a_transient_failure_for_max_age_then_fails_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "opaque-token").expect("write");
        let file = BearerFile::new(path.clone(), Duration::from_millis(600));
        assert_eq!(file.header().expect("read"), "Bearer opaque-token");
        break_transiently(&path);
        assert_eq!(
            file.header().expect("bridged by the cached token"),
            "Bearer opaque-token"
        );
        std::thread::sleep(Duration::from_millis(700));
        assert!(matches!(file.header(), Err(CredentialError::Read { .. })));
        // And the token is gone for good: a later transient failure is not bridged by it.
        std::fs::remove_dir(&path).expect("rmdir");
        std::fs::write(&path, "").expect("empty file");
        assert!(matches!(file.header(), Err(CredentialError::Empty { .. })));
    }

    #[test]
    fn an_empty_file_mid_rewrite_is_bridged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "opaque-token").expect("write");
        let file = BearerFile::new(path.clone(), Duration::from_hours(1));
        file.header().expect("read");
        std::fs::write(&path, "").expect("truncated by a non-atomic writer");
        assert_eq!(file.header().expect("bridged"), "Bearer opaque-token");
        std::fs::write(&path, "opaque-token-2").expect("written");
        assert_eq!(file.header().expect("new"), "Bearer opaque-token-2");
    }

    #[test]
    fn jwt_bridges_a_transient_failure_until_its_exp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        let token = jwt_with_exp(now_secs() + 2);
        std::fs::write(&path, &token).expect("write");
        // max_age zero: an opaque token would not be bridged at all; the JWT's exp decides.
        let file = BearerFile::new(path.clone(), Duration::ZERO);
        file.header().expect("read");
        break_transiently(&path);
        assert_eq!(
            file.header().expect("bridged until exp"),
            format!("Bearer {token}").as_str()
        );
        let deadline = Instant::now() + Duration::from_secs(4);
        while file.header().is_ok() {
            assert!(Instant::now() < deadline, "still served after its exp");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(SystemTime::now() >= jwt_expiry(&token).expect("exp"));

        // An expired JWT bridges nothing, however recently it was read.
        std::fs::remove_dir(&path).expect("rmdir");
        std::fs::write(&path, jwt_with_exp(now_secs() - 10)).expect("write");
        let file = BearerFile::new(path.clone(), Duration::from_hours(1));
        file.header().expect("read");
        break_transiently(&path);
        assert!(file.header().is_err());
    }

    #[test]
    fn a_deleted_file_is_never_bridged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, jwt_with_exp(now_secs() + 3600)).expect("write");
        let file = BearerFile::new(path.clone(), Duration::from_hours(1));
        file.header().expect("read");
        std::fs::remove_file(&path).expect("withdrawn");
        assert!(matches!(file.header(), Err(CredentialError::Read { .. })));
        assert_eq!(jwt_expiry("opaque"), None);
        assert_eq!(jwt_expiry("a.b.c.d"), None);
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
