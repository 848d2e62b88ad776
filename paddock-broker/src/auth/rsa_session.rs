//! RSA-OAEP (SHA-256) run session tokens.
//!
//! The broker owns an RSA keypair, created on first start as a PKCS#8 PEM file with mode 0600
//! and reused afterwards (a key file readable by group or others is refused). A run encrypts its
//! own run id with the broker's public key and presents the base64 ciphertext as its bearer.
//! Decryption failure is `Unauthenticated`; a run the [`RunDirectory`] does not know is
//! `Forbidden`. A correctly sized random ciphertext costs a private-key operation, so
//! decryptions of tokens not seen before are rate limited (globally: the backend never sees
//! the peer); beyond the limit such tokens are `Unavailable` (503) while cached ones still work.
//!
//! Anyone holding the public key can mint a token for any run id, so this backend is only as
//! strong as run ids are unguessable; its scopes are deliberately narrow by default.
//!
//! The RSA work is AWS-LC's (through `aws-lc-rs`): blinded, constant-time private-key
//! operations and an OAEP padding check that does not branch on the padding, so callers that
//! time many chosen ciphertexts learn nothing about the key (the `rsa` crate this replaced is
//! RUSTSEC-2023-0071, "Marvin"). Every failed decryption is the same error and the same 401.
//! Key files are PKCS#8 PEM as before; new keys are 2048, 3072, 4096 or 8192 bits (the sizes
//! AWS-LC generates), existing keys of any size in 2048..=8192 load.

use std::{
    collections::BTreeSet,
    fs,
    io::{ErrorKind as IoErrorKind, Read, Write},
    num::NonZeroU32,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use aws_lc_rs::{
    encoding::AsDer,
    rsa::{
        KeySize, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey, OaepPublicEncryptingKey,
        PrivateDecryptingKey, PublicEncryptingKey,
    },
};
use base64::{Engine, engine::general_purpose::STANDARD};
use governor::Quota;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer, pem::PemObject};
use serde::Deserialize;
use sha2::Digest;
use zeroize::Zeroizing;

use super::{
    AuthError, AuthFuture, Authenticator, Identity, RunDirectory, Scope, config_serde, names,
};

const MIN_BITS: usize = 2048;
const MAX_BITS: usize = 8192;
const MAX_KEY_FILE: u64 = 64 * 1024;
/// Decrypted tokens remembered, so a run's repeated bearer costs no private-key operation.
const TOKEN_CACHE: usize = 4096;

/// Configuration of the RSA session backend. Holds a path, never key material.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RsaSessionConfig {
    /// PKCS#8 PEM private key; created (0600) if missing.
    pub key_file: PathBuf,
    /// Modulus size for a newly generated key: 2048, 3072 (default), 4096 or 8192. An existing
    /// key is used as it is.
    #[serde(default = "default_bits")]
    pub key_bits: usize,
    /// Scopes every run token carries.
    #[serde(
        default = "default_scopes",
        deserialize_with = "config_serde::scope_set"
    )]
    pub scopes: BTreeSet<Scope>,
    /// Private-key decryptions (tokens not seen before) per second, across all callers.
    /// A correctly sized random ciphertext costs one; beyond this rate such tokens get 503
    /// while tokens already decrypted keep working from the cache.
    #[serde(default = "default_decrypts_per_second")]
    pub decrypts_per_second: u32,
    /// Decryptions allowed in a burst above the steady rate.
    #[serde(default = "default_decrypt_burst")]
    pub decrypt_burst: u32,
}

fn default_bits() -> usize {
    3072
}

fn default_decrypts_per_second() -> u32 {
    20
}

fn default_decrypt_burst() -> u32 {
    40
}

fn default_scopes() -> BTreeSet<Scope> {
    BTreeSet::from([Scope::ValidateEgress, Scope::SubstituteAuth])
}

impl RsaSessionConfig {
    #[must_use]
    pub fn new(key_file: impl Into<PathBuf>) -> Self {
        Self {
            key_file: key_file.into(),
            key_bits: default_bits(),
            scopes: default_scopes(),
            decrypts_per_second: default_decrypts_per_second(),
            decrypt_burst: default_decrypt_burst(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RsaSessionError {
    #[error("rsa-session: key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error(
        "rsa-session: key file {path} has mode {mode:03o}; group/other access is refused (chmod 600)"
    )]
    KeyPermissions { path: String, mode: u32 },
    #[error("rsa-session: key size {0} bits is outside {MIN_BITS}..={MAX_BITS}")]
    KeySize(usize),
    #[error("rsa-session: keyBits {0} cannot be generated; use 2048, 3072, 4096 or 8192")]
    KeyBits(usize),
    #[error("rsa-session: key generation failed: {0}")]
    Generate(String),
    #[error("rsa-session: public key: {0}")]
    PublicKey(String),
    #[error("rsa-session: run id is not valid")]
    RunId,
    #[error("rsa-session: encryption failed: {0}")]
    Encrypt(String),
    #[error("rsa-session: decryptsPerSecond and decryptBurst must be at least 1")]
    DecryptLimit,
}

/// The RSA session [`Authenticator`].
pub struct RsaSessionAuthenticator {
    key: Arc<OaepPrivateDecryptingKey>,
    public_pem: String,
    scopes: BTreeSet<Scope>,
    key_file: PathBuf,
    runs: Arc<dyn RunDirectory>,
    decrypted: quick_cache::sync::Cache<[u8; 32], Arc<str>>,
    /// Bounds the CPU that bogus ciphertexts can burn (the trait sees no peer address, so
    /// the bound is global; cached tokens bypass it).
    decrypts: governor::DefaultDirectRateLimiter,
}

impl std::fmt::Debug for RsaSessionAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RsaSessionAuthenticator")
            .field("key_file", &self.key_file)
            .field("key_bits", &self.key.key_size_bits())
            .field("private_key", &"<redacted>")
            .field("scopes", &self.scopes)
            .field("runs", &self.runs)
            .finish_non_exhaustive()
    }
}

impl RsaSessionAuthenticator {
    /// Loads the keypair from `config.key_file`, or generates and stores one. Key generation
    /// is CPU-heavy (seconds for 3072 bits): call this at startup, off the async workers.
    pub fn load_or_create(
        config: &RsaSessionConfig,
        runs: Arc<dyn RunDirectory>,
    ) -> Result<Self, RsaSessionError> {
        if !(MIN_BITS..=MAX_BITS).contains(&config.key_bits) {
            return Err(RsaSessionError::KeySize(config.key_bits));
        }
        // Checked even when the key exists: a config that could not replace a lost key is
        // wrong now, not on the day the key goes missing.
        let generate = key_size(config.key_bits)?;
        let (Some(rate), Some(burst)) = (
            NonZeroU32::new(config.decrypts_per_second),
            NonZeroU32::new(config.decrypt_burst),
        ) else {
            return Err(RsaSessionError::DecryptLimit);
        };
        let key = match read_key(&config.key_file)? {
            Some(key) => key,
            None => create_key(&config.key_file, generate)?,
        };
        let bits = key.key_size_bits();
        if !(MIN_BITS..=MAX_BITS).contains(&bits) {
            return Err(RsaSessionError::KeySize(bits));
        }
        let public_der = key
            .public_key()
            .as_der()
            .map_err(|_| RsaSessionError::PublicKey("cannot encode the public key".into()))?;
        let public_pem = pem_encode("PUBLIC KEY", public_der.as_ref());
        let key = OaepPrivateDecryptingKey::new(key)
            .map_err(|_| RsaSessionError::PublicKey("key is not usable for RSA-OAEP".into()))?;
        Ok(Self {
            key: Arc::new(key),
            public_pem,
            scopes: config.scopes.clone(),
            key_file: config.key_file.clone(),
            runs,
            decrypted: quick_cache::sync::Cache::new(TOKEN_CACHE),
            decrypts: governor::RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
        })
    }

    /// The public key (SPKI PEM) to hand to runs.
    #[must_use]
    pub fn public_key_pem(&self) -> &str {
        &self.public_pem
    }

    async fn verify(&self, bearer: &str) -> Result<Identity, AuthError> {
        let run_id = self.run_id(bearer).await?;
        let namespace = self.runs.run_namespace(&run_id).ok_or_else(|| {
            AuthError::Forbidden("rsa-session: token names a run the broker does not know".into())
        })?;
        Ok(Identity {
            subject: format!("run:{run_id}"),
            namespace,
            service_account: None,
            scopes: self.scopes.clone(),
            backend: "rsa-session",
            run: Some(run_id.to_string()),
            node: None,
            placement: None,
        })
    }

    async fn run_id(&self, bearer: &str) -> Result<Arc<str>, AuthError> {
        let size = self.key.key_size_bytes();
        // Cheap rejections first: garbage must not cost a private-key operation.
        if bearer.len() > 4 * size.div_ceil(3) {
            return Err(unauthenticated("token has the wrong length"));
        }
        let ciphertext = STANDARD
            .decode(bearer)
            .map_err(|_| unauthenticated("token is not base64"))?;
        if ciphertext.len() != size {
            return Err(unauthenticated("token has the wrong length"));
        }
        let digest: [u8; 32] = sha2::Sha256::digest(bearer.as_bytes()).into();
        if let Some(run) = self.decrypted.get(&digest) {
            return Ok(run);
        }
        if self.decrypts.check().is_err() {
            return Err(AuthError::Unavailable(
                "rsa-session: decryption rate limit reached".into(),
            ));
        }
        let key = Arc::clone(&self.key);
        let plaintext = tokio::task::spawn_blocking(move || {
            let mut out = vec![0; key.min_output_size()];
            key.decrypt(&OAEP_SHA256_MGF1SHA256, &ciphertext, &mut out, None)
                .map(|plain| plain.to_vec())
        })
        .await
        .map_err(|_| AuthError::Unavailable("rsa-session: decryption task failed".into()))?
        .map_err(|_| unauthenticated("token does not decrypt"))?;
        let run = String::from_utf8(plaintext)
            .ok()
            .filter(|s| names::is_run_id(s))
            .ok_or_else(|| unauthenticated("decrypted run id is malformed"))?;
        let run: Arc<str> = Arc::from(run);
        self.decrypted.insert(digest, Arc::clone(&run));
        Ok(run)
    }
}

impl Authenticator for RsaSessionAuthenticator {
    fn name(&self) -> &'static str {
        "rsa-session"
    }

    fn authenticate<'a>(&'a self, bearer: &'a str) -> AuthFuture<'a> {
        Box::pin(self.verify(bearer))
    }
}

fn unauthenticated(reason: &str) -> AuthError {
    AuthError::Unauthenticated(format!("rsa-session: {reason}"))
}

/// Encrypts `run_id` for the broker whose public key (SPKI or PKCS#1 PEM) is given; the
/// result is the run's bearer token.
pub fn encrypt_run_token(public_key_pem: &str, run_id: &str) -> Result<String, RsaSessionError> {
    if !names::is_run_id(run_id) {
        return Err(RsaSessionError::RunId);
    }
    let spki = match SubjectPublicKeyInfoDer::from_pem_slice(public_key_pem.as_bytes()) {
        Ok(spki) => spki.to_vec(),
        Err(_) => pem_decode("RSA PUBLIC KEY", public_key_pem)
            .map(|pkcs1| spki_from_pkcs1(&pkcs1))
            .ok_or_else(|| {
                RsaSessionError::PublicKey("not an SPKI or PKCS#1 PEM public key".into())
            })?,
    };
    let key = PublicEncryptingKey::from_der(&spki)
        .and_then(|key| OaepPublicEncryptingKey::new(key).map_err(Into::into))
        .map_err(|e| RsaSessionError::PublicKey(format!("not a usable RSA key: {e}")))?;
    let mut ciphertext = vec![0; key.ciphertext_size()];
    let ciphertext = key
        .encrypt(
            &OAEP_SHA256_MGF1SHA256,
            run_id.as_bytes(),
            &mut ciphertext,
            None,
        )
        .map_err(|_| RsaSessionError::Encrypt("RSA-OAEP encryption failed".into()))?;
    Ok(STANDARD.encode(ciphertext))
}

/// The sizes AWS-LC generates.
fn key_size(bits: usize) -> Result<KeySize, RsaSessionError> {
    match bits {
        2048 => Ok(KeySize::Rsa2048),
        3072 => Ok(KeySize::Rsa3072),
        4096 => Ok(KeySize::Rsa4096),
        8192 => Ok(KeySize::Rsa8192),
        other => Err(RsaSessionError::KeyBits(other)),
    }
}

/// RFC 7468 text: 64-column base64 lines and LF, as the key files have always been written.
/// Sized up front so the text is never reallocated (a private key leaves no stray copies).
fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = Zeroizing::new(STANDARD.encode(der));
    let mut pem = String::with_capacity(body.len() + body.len() / 64 + 2 * label.len() + 40);
    pem.push_str("-----BEGIN ");
    pem.push_str(label);
    pem.push_str("-----\n");
    for line in body.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END ");
    pem.push_str(label);
    pem.push_str("-----\n");
    pem
}

/// The first `label` section of a PEM text. Only for the PKCS#1 "RSA PUBLIC KEY" label, which
/// `rustls-pki-types` does not know; everything else goes through its parser.
fn pem_decode(label: &str, pem: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let body: String = pem[start..stop].split_ascii_whitespace().collect();
    STANDARD.decode(body).ok()
}

/// Wraps a PKCS#1 `RSAPublicKey` in the X.509 `SubjectPublicKeyInfo` AWS-LC parses:
/// `SEQUENCE { SEQUENCE { rsaEncryption, NULL }, BIT STRING { 0 unused bits, key } }`.
fn spki_from_pkcs1(pkcs1: &[u8]) -> Vec<u8> {
    const RSA_ENCRYPTION: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = Vec::with_capacity(pkcs1.len() + 1);
    bits.push(0);
    bits.extend_from_slice(pkcs1);
    let mut body = RSA_ENCRYPTION.to_vec();
    body.extend(der_tlv(0x03, &bits));
    der_tlv(0x30, &body)
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match u8::try_from(content.len()) {
        Ok(short) if short < 0x80 => out.push(short),
        _ => {
            let len = content.len().to_be_bytes();
            let skip = len.iter().take_while(|b| **b == 0).count();
            let octets = u8::try_from(len.len() - skip).unwrap_or(u8::MAX);
            out.push(0x80 | octets);
            out.extend_from_slice(&len[skip..]);
        }
    }
    out.extend_from_slice(content);
    out
}

fn key_file_error(path: &Path, reason: impl std::fmt::Display) -> RsaSessionError {
    RsaSessionError::KeyFile {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Reads an existing key; `None` if the file does not exist.
fn read_key(path: &Path) -> Result<Option<PrivateDecryptingKey>, RsaSessionError> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == IoErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(key_file_error(path, e)),
    };
    if !meta.is_file() {
        return Err(key_file_error(path, "not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(RsaSessionError::KeyPermissions {
            path: path.display().to_string(),
            mode,
        });
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(key_file_error(path, "file is too large for a key"));
    }
    let mut pem = Zeroizing::new(Vec::new());
    fs::File::open(path)
        .and_then(|f| f.take(MAX_KEY_FILE).read_to_end(&mut pem))
        .map_err(|e| key_file_error(path, e))?;
    // Fixed reasons only: a PEM parser's message may quote a line of the file.
    let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|_| {
        key_file_error(
            path,
            "not a PKCS#8 PEM RSA key: no readable PRIVATE KEY section",
        )
    })?;
    // KeyRejected names the failing property ("TooSmall", "InvalidEncoding"), never key bytes.
    PrivateDecryptingKey::from_pkcs8(der.secret_pkcs8_der())
        .map(Some)
        .map_err(|e| key_file_error(path, format!("not a PKCS#8 PEM RSA key: {e}")))
}

/// Generates a key and stores it without ever exposing a partial or too-open file: written
/// to a private temporary file, then hard-linked into place (which fails rather than replace a
/// key another process created meanwhile; that key is then used).
fn create_key(path: &Path, size: KeySize) -> Result<PrivateDecryptingKey, RsaSessionError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| key_file_error(path, format!("cannot create directory: {e}")))?;
    let key = PrivateDecryptingKey::generate(size)
        .map_err(|e| RsaSessionError::Generate(e.to_string()))?;
    let bits = key.key_size_bits();
    let der = key
        .as_der()
        .map_err(|e| RsaSessionError::Generate(e.to_string()))?;
    let pem = Zeroizing::new(pem_encode("PRIVATE KEY", der.as_ref()));
    let file_name = path
        .file_name()
        .map_or_else(|| "key".into(), |n| n.to_string_lossy());
    // A random name: a fixed one (the pid is 1 in most containers) left behind by a crash
    // would block every later start.
    let nonce = getrandom::u64().map_err(|e| RsaSessionError::Generate(e.to_string()))?;
    let tmp = dir.join(format!(".{file_name}.tmp-{nonce:016x}"));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(pem.as_bytes())?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(key_file_error(path, format!("cannot write key: {e}")));
    }
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), bits, "rsa-session: generated a new keypair");
            Ok(key)
        }
        Err(e) if e.kind() == IoErrorKind::AlreadyExists => read_key(path)?
            .ok_or_else(|| key_file_error(path, "key file vanished while being created")),
        Err(e) => Err(key_file_error(path, format!("cannot store key: {e}"))),
    }
}
