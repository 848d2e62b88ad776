//! The per-run MITM certificate authority.
//!
//! In a cluster cert-manager issues it and the controller mounts it as a Secret
//! (`tls.crt`/`tls.key`); locally Paddock generates one. Loading checks everything that would
//! otherwise surface later as every agent handshake failing: the certificate is a CA, may sign
//! certificates, is valid now, and the key belongs to it.

use std::fmt;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::TlsError;

/// File name of the CA certificate (PEM) in the cert-manager Secret layout.
pub const CA_CERT_FILE: &str = "tls.crt";
/// File name of the CA private key (PEM) in the cert-manager Secret layout.
pub const CA_KEY_FILE: &str = "tls.key";

/// Generated CAs start this far in the past to tolerate clock skew between proxy and agents.
const GENERATED_BACKDATE: time::Duration = time::Duration::hours(1);
/// `CommonName` is at most 64 characters (RFC 5280 `ub-common-name`).
const MAX_COMMON_NAME: usize = 64;
const CA_NAME_PREFIX: &str = "Paddock run CA ";

/// A CA able to sign leaves: issuer name and key, certificate chain, validity.
pub struct RunCa {
    issuer: Issuer<'static, KeyPair>,
    chain: Vec<CertificateDer<'static>>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    subject: String,
}

impl fmt::Debug for RunCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunCa")
            .field("subject", &self.subject)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl RunCa {
    /// Loads `tls.crt` and `tls.key` from a directory (a mounted cert-manager Secret).
    pub fn load_dir(dir: &Path) -> Result<Self, TlsError> {
        Self::load(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE))
    }

    /// Loads a CA from a PEM certificate file (the CA first, optionally followed by the
    /// certificates that chain it to a root) and a PEM private key file (PKCS#8, SEC1 or
    /// PKCS#1).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let cert_pem = fs::read(cert_path).map_err(|source| TlsError::ReadFile {
            what: "CA certificate",
            path: cert_path.to_owned(),
            source,
        })?;
        let key_pem = fs::read(key_path).map_err(|source| TlsError::ReadFile {
            what: "CA private key",
            path: key_path.to_owned(),
            source,
        })?;
        if let Ok(meta) = fs::metadata(key_path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %key_path.display(),
                mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
                "CA private key is readable by group or others"
            );
        }
        Self::from_pem_labeled(
            &cert_pem,
            &key_pem,
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        )
    }

    /// Builds a CA from PEM bytes.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        Self::from_pem_labeled(cert_pem, key_pem, "CA certificate", "CA private key")
    }

    fn from_pem_labeled(
        cert_pem: &[u8],
        key_pem: &[u8],
        cert_label: &str,
        key_label: &str,
    ) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::InvalidPem {
                what: cert_label.to_owned(),
                reason: e.to_string(),
            })?;
        let Some(ca_der) = chain.first() else {
            return Err(TlsError::InvalidPem {
                what: cert_label.to_owned(),
                reason: "no CERTIFICATE block".to_owned(),
            });
        };
        let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::InvalidPem {
            what: key_label.to_owned(),
            reason: e.to_string(),
        })?;
        let key = key_pair_from_der(&key_der)?;

        let (_, x509) = x509_parser::parse_x509_certificate(ca_der)
            .map_err(|e| TlsError::InvalidCa(format!("cannot parse certificate: {e}")))?;
        check_is_signing_ca(&x509)?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(TlsError::InvalidCaKey(
                "the private key does not belong to the CA certificate".to_owned(),
            ));
        }
        let not_before = x509.validity().not_before.to_datetime();
        let not_after = x509.validity().not_after.to_datetime();
        let now = OffsetDateTime::now_utc();
        if now < not_before || now >= not_after {
            return Err(TlsError::CaNotValidNow {
                not_before,
                not_after,
            });
        }
        let subject = x509.subject().to_string();
        let issuer = Issuer::from_ca_cert_der(ca_der, key)
            .map_err(|e| TlsError::InvalidCa(format!("cannot use subject as issuer: {e}")))?;
        Ok(Self {
            issuer,
            chain,
            not_before,
            not_after,
            subject,
        })
    }

    /// Generates a fresh ECDSA P-256 CA named "Paddock run CA {label}" for local runs.
    pub fn generate(label: &str, validity: Duration) -> Result<GeneratedCa, TlsError> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| TlsError::Forge {
                name: "run CA".to_owned(),
                source,
            })?;
        let now = OffsetDateTime::now_utc();
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let not_after = time::Duration::try_from(validity)
            .ok()
            .and_then(|v| now.checked_add(v))
            .ok_or_else(|| TlsError::InvalidCa("validity period too long".to_owned()))?;

        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        let label: String = label
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_COMMON_NAME - CA_NAME_PREFIX.len())
            .collect();
        name.push(DnType::CommonName, format!("{CA_NAME_PREFIX}{label}"));
        name.push(DnType::OrganizationName, "Paddock");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - GENERATED_BACKDATE;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(|source| TlsError::Forge {
            name: "run CA".to_owned(),
            source,
        })?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        let ca = Self::from_pem(cert_pem.as_bytes(), key_pem.as_bytes())?;
        Ok(GeneratedCa {
            ca,
            cert_pem,
            key_pem,
        })
    }

    /// Loads the CA from `dir`, or generates one there when neither file exists.
    ///
    /// Exactly one of the two files existing is an error: it means a broken earlier write or a
    /// mistaken path, and silently replacing a CA the agents already trust would break them.
    pub fn load_or_generate(dir: &Path, label: &str, validity: Duration) -> Result<Self, TlsError> {
        let cert = dir.join(CA_CERT_FILE);
        let key = dir.join(CA_KEY_FILE);
        match (cert.exists(), key.exists()) {
            (true, true) => Self::load(&cert, &key),
            (false, false) => {
                let generated = Self::generate(label, validity)?;
                generated.write_to_dir(dir)?;
                Ok(generated.ca)
            }
            (has_cert, _) => Err(TlsError::ReadFile {
                what: if has_cert {
                    "CA private key"
                } else {
                    "CA certificate"
                },
                path: if has_cert { key } else { cert },
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the other half of the CA pair exists; refusing to generate over it",
                ),
            }),
        }
    }

    /// The CA certificate (what agents must trust).
    #[must_use]
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The CA certificate followed by any chain certificates from the PEM file; sent after
    /// each forged leaf.
    #[must_use]
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The CA certificate in PEM form, for agents' trust bundles.
    #[must_use]
    pub fn certificate_pem(&self) -> String {
        der_to_pem("CERTIFICATE", self.certificate())
    }

    /// Start of the CA's validity.
    #[must_use]
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    /// End of the CA's validity; no leaf outlives it.
    #[must_use]
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The CA's subject, for logs.
    #[must_use]
    pub fn subject(&self) -> &str {
        &self.subject
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

/// A freshly generated CA with its PEM encodings, ready to be written out.
pub struct GeneratedCa {
    /// The usable CA.
    pub ca: RunCa,
    cert_pem: String,
    key_pem: String,
}

impl fmt::Debug for GeneratedCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedCa")
            .field("ca", &self.ca)
            .field("key_pem", &"[secret key elided]")
            .finish_non_exhaustive()
    }
}

impl GeneratedCa {
    /// The certificate PEM.
    #[must_use]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key PEM (PKCS#8). Secret: never log it.
    #[must_use]
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Writes `tls.crt` (0644) and `tls.key` (0600) into `dir` (created 0700 if missing).
    /// Existing files are never overwritten.
    pub fn write_to_dir(&self, dir: &Path) -> Result<(), TlsError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| TlsError::WriteFile {
                what: "CA directory",
                path: dir.to_owned(),
                source,
            })?;
        let key_path = dir.join(CA_KEY_FILE);
        write_new(&key_path, self.key_pem.as_bytes(), 0o600, "CA private key")?;
        let cert_path = dir.join(CA_CERT_FILE);
        if let Err(e) = write_new(
            &cert_path,
            self.cert_pem.as_bytes(),
            0o644,
            "CA certificate",
        ) {
            // Leave no half pair behind: the next start would refuse it.
            let _ = fs::remove_file(&key_path);
            return Err(e);
        }
        Ok(())
    }
}

fn write_new(path: &Path, bytes: &[u8], mode: u32, what: &'static str) -> Result<(), TlsError> {
    let err = |source| TlsError::WriteFile {
        what,
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    // The umask may have narrowed the mode; make it exact.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

fn check_is_signing_ca(
    x509: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<(), TlsError> {
    match x509.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => {
            return Err(TlsError::InvalidCa(
                "basicConstraints CA:TRUE is missing".to_owned(),
            ));
        }
        Err(e) => return Err(TlsError::InvalidCa(format!("basicConstraints: {e}"))),
    }
    match x509.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            return Err(TlsError::InvalidCa(
                "keyUsage does not allow keyCertSign".to_owned(),
            ));
        }
        Ok(_) => {}
        Err(e) => return Err(TlsError::InvalidCa(format!("keyUsage: {e}"))),
    }
    // rcgen re-encodes the subject from single-valued RDNs only (and panics on empty ones).
    for rdn in x509.subject().iter() {
        if rdn.iter().count() != 1 {
            return Err(TlsError::InvalidCa(
                "subject has an empty or multi-valued RDN".to_owned(),
            ));
        }
    }
    Ok(())
}

/// ring only reads PKCS#8; cert-manager writes SEC1 (EC) and PKCS#1 (RSA) by default, so those
/// are wrapped into PKCS#8 first.
fn key_pair_from_der(key: &PrivateKeyDer<'_>) -> Result<KeyPair, TlsError> {
    let invalid = |e: rcgen::Error| TlsError::InvalidCaKey(e.to_string());
    match key {
        PrivateKeyDer::Pkcs8(k) => KeyPair::try_from(k).map_err(invalid),
        PrivateKeyDer::Sec1(k) => {
            let mut last = None;
            for curve in [OID_P256, OID_P384] {
                let pkcs8 = PrivatePkcs8KeyDer::from(wrap_pkcs8(
                    &[OID_EC_PUBLIC_KEY, curve].concat(),
                    k.secret_sec1_der(),
                ));
                match KeyPair::try_from(&pkcs8) {
                    Ok(pair) => return Ok(pair),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.map_or_else(
                || TlsError::InvalidCaKey("unsupported EC key".to_owned()),
                invalid,
            ))
        }
        PrivateKeyDer::Pkcs1(k) => {
            let pkcs8 = PrivatePkcs8KeyDer::from(wrap_pkcs8(
                &[OID_RSA_ENCRYPTION, DER_NULL].concat(),
                k.secret_pkcs1_der(),
            ));
            KeyPair::try_from(&pkcs8).map_err(invalid)
        }
        _ => Err(TlsError::InvalidCaKey(
            "unsupported private key format".to_owned(),
        )),
    }
}

const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_RSA_ENCRYPTION: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const DER_NULL: &[u8] = &[0x05, 0x00];

/// RFC 5208 `PrivateKeyInfo { version 0, AlgorithmIdentifier, OCTET STRING key }`.
fn wrap_pkcs8(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let mut inner = vec![0x02, 0x01, 0x00];
    inner.extend(der_tlv(0x30, algorithm));
    inner.extend(der_tlv(0x04, key));
    der_tlv(0x30, &inner)
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = Vec::with_capacity(len + 6);
    out.push(tag);
    if len < 0x80 {
        out.push(u8::try_from(len).unwrap_or(0));
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        let significant = &bytes[skip..];
        out.push(0x80 | u8::try_from(significant.len()).unwrap_or(0));
        out.extend_from_slice(significant);
    }
    out.extend_from_slice(content);
    out
}

pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive (RFC 5280 4.1.2.2) and a fixed length, so no leading-zero ambiguity.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

pub(crate) fn der_to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_support::fixture_path;

    fn ca_fixture(name: &str) -> Vec<u8> {
        std::fs::read(fixture_path(&format!("ca/{name}"))).expect("fixture")
    }

    #[test]
    fn generated_ca_round_trips_through_pem() {
        let generated = RunCa::generate("run-42", Duration::from_hours(24)).expect("generate");
        assert!(
            generated.ca.subject().contains("Paddock run CA run-42"),
            "{}",
            generated.ca.subject()
        );
        let lifetime = generated.ca.not_after() - generated.ca.not_before();
        assert_eq!(
            lifetime,
            time::Duration::hours(25),
            "24h plus the 1h backdate"
        );
        let (_, x509) =
            x509_parser::parse_x509_certificate(generated.ca.certificate()).expect("x509");
        assert!(x509.is_ca());
        assert_eq!(
            x509.public_key().algorithm.algorithm.to_id_string(),
            "1.2.840.10045.2.1",
            "EC key"
        );

        let reloaded = RunCa::from_pem(
            generated.cert_pem().as_bytes(),
            generated.key_pem().as_bytes(),
        )
        .expect("reload");
        assert_eq!(reloaded.certificate(), generated.ca.certificate());
        assert_eq!(generated.ca.certificate_pem(), generated.cert_pem());
        let dbg = format!("{generated:?}");
        assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
    }

    #[test]
    fn generated_ca_files_have_strict_modes_and_are_not_clobbered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("ca");
        let ca =
            RunCa::load_or_generate(&ca_dir, "local", Duration::from_hours(24)).expect("generate");
        let mode = |f: &str| {
            std::fs::metadata(ca_dir.join(f))
                .expect("metadata")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        assert_eq!(mode(CA_CERT_FILE), 0o644);
        assert_eq!(
            std::fs::metadata(&ca_dir)
                .expect("dir")
                .permissions()
                .mode()
                & 0o777,
            0o700
        );

        // A second start loads the same CA instead of generating a new one.
        let again =
            RunCa::load_or_generate(&ca_dir, "local", Duration::from_hours(24)).expect("load");
        assert_eq!(again.certificate(), ca.certificate());
        let loaded = RunCa::load_dir(&ca_dir).expect("load_dir");
        assert_eq!(loaded.certificate(), ca.certificate());

        let other = RunCa::generate("other", Duration::from_hours(1)).expect("generate");
        let err = other.write_to_dir(&ca_dir).expect_err("must not overwrite");
        assert!(matches!(err, TlsError::WriteFile { .. }), "{err}");
        assert_eq!(
            RunCa::load_dir(&ca_dir).expect("load").certificate(),
            ca.certificate()
        );

        // Half a pair is refused rather than replaced.
        std::fs::remove_file(ca_dir.join(CA_KEY_FILE)).expect("rm");
        let err =
            RunCa::load_or_generate(&ca_dir, "local", Duration::from_hours(24)).expect_err("half");
        assert!(err.to_string().contains(CA_KEY_FILE), "{err}");
    }

    #[test]
    fn cert_manager_key_formats_load() {
        for (cert, key) in [
            ("ec_ca.crt", "ec_sec1.key"),
            ("p384_ca.crt", "p384_sec1.key"),
            ("rsa_ca.crt", "rsa_pkcs1.key"),
        ] {
            let ca = RunCa::from_pem(&ca_fixture(cert), &ca_fixture(key))
                .unwrap_or_else(|e| panic!("{cert}: {e}"));
            assert!(ca.subject().contains("Paddock test"), "{}", ca.subject());
        }
        let ca = RunCa::load(
            &fixture_path("ca/ec_ca.crt"),
            &fixture_path("ca/ec_sec1.key"),
        )
        .expect("load");
        assert_eq!(ca.chain().len(), 1);
    }

    #[test]
    fn chain_after_the_ca_is_kept() {
        let mut bundle = ca_fixture("ec_ca.crt");
        bundle.extend(ca_fixture("rsa_ca.crt"));
        let ca = RunCa::from_pem(&bundle, &ca_fixture("ec_sec1.key")).expect("load");
        assert_eq!(ca.chain().len(), 2);
        assert!(ca.subject().contains("EC CA"));
    }

    #[test]
    fn clear_errors_for_bad_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = RunCa::load_dir(dir.path()).expect_err("missing");
        assert!(
            matches!(
                err,
                TlsError::ReadFile {
                    what: "CA certificate",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("tls.crt"), "{err}");

        let key = ca_fixture("ec_sec1.key");
        let err = RunCa::from_pem(b"not pem at all", &key).expect_err("no cert");
        assert!(matches!(err, TlsError::InvalidPem { .. }), "{err}");
        let err = RunCa::from_pem(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            &key,
        )
        .expect_err("garbage cert");
        assert!(matches!(err, TlsError::InvalidCa(_)), "{err}");
        let err = RunCa::from_pem(&ca_fixture("ec_ca.crt"), b"").expect_err("no key");
        assert!(matches!(err, TlsError::InvalidPem { .. }), "{err}");
        let err = RunCa::from_pem(
            &ca_fixture("ec_ca.crt"),
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .expect_err("garbage key");
        assert!(matches!(err, TlsError::InvalidCaKey(_)), "{err}");
        let err = RunCa::from_pem(&ca_fixture("ec_ca.crt"), &ca_fixture("rsa_pkcs1.key"))
            .expect_err("mismatch");
        assert!(matches!(err, TlsError::InvalidCaKey(_)), "{err}");
        assert!(err.to_string().contains("does not belong"), "{err}");
        let err = RunCa::from_pem(&ca_fixture("not_ca.crt"), &key).expect_err("not a CA");
        assert!(matches!(err, TlsError::InvalidCa(_)), "{err}");
        assert!(err.to_string().contains("CA:TRUE"), "{err}");
    }

    #[test]
    fn expired_ca_is_refused() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let cert = params.self_signed(&key).expect("cert");
        let err = RunCa::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
            .expect_err("expired");
        assert!(matches!(err, TlsError::CaNotValidNow { .. }), "{err}");
    }

    #[test]
    fn pkcs8_wrapping_matches_der_rules() {
        assert_eq!(der_tlv(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = vec![0u8; 300];
        let tlv = der_tlv(0x30, &long);
        assert_eq!(&tlv[..4], &[0x30, 0x82, 0x01, 0x2c]);
        assert_eq!(tlv.len(), 304);
        let tlv = der_tlv(0x30, &[0u8; 200]);
        assert_eq!(&tlv[..3], &[0x30, 0x81, 200]);
    }
}
