//! The cluster root CA and the short-lived per-node intermediates it issues.
//!
//! Agent pods trust one bundle: the root. No node holds a long-lived forging key: each node
//! agent generates a key, sends a certificate signing request (`POST /v1/node-ca`, scope
//! `broker:node-agent`, token bound to its node) and gets back an intermediate CA for that node
//! only, valid for `lifetimeSecs` (default 24 h) and never past the root. A stolen node key is
//! useless once its intermediate expires.
//!
//! What the broker signs is decided here, not by the request: only the CSR's public key and its
//! subject (`CN=<node>`, which must be the caller's node) are read. The intermediate is
//! `CA:TRUE, pathlen:0`, `keyUsage: keyCertSign` (critical), named `O=Paddock, OU=node-ca,
//! CN=<node>`, and carries the configured name constraints (RFC 5280 4.2.1.10; webpki and the
//! common TLS stacks enforce them on the leaves it forges).
//!
//! Name constraints: none by default, because the node agent must forge leaves for whatever
//! hosts the policy lets agents reach. `nameConstraints.excludedDns` / `excludedIps` shut
//! names out of every node's reach (e.g. `cluster.local` so a stolen node key cannot
//! impersonate in-cluster services to agent pods), `permittedDns` confines nodes to listed
//! domains when the policy's hosts are known up front.

use std::fmt;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, CidrSubnet, DistinguishedName, DnType, DnValue,
    GeneralSubtree, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, NameConstraints,
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, RevocationReason, RevokedCertParams,
    SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::auth::names::is_node_name;

/// File names `paddock-broker ca init` writes.
pub const ROOT_CERT_FILE: &str = "ca.crt";
pub const ROOT_KEY_FILE: &str = "ca.key";

/// Default intermediate lifetime.
pub const DEFAULT_LIFETIME: Duration = Duration::from_hours(24);
/// Shortest intermediate lifetime allowed: renewal at 2/3 must leave room for retries.
pub const MIN_LIFETIME: Duration = Duration::from_mins(5);
/// Longest intermediate lifetime allowed: "short-lived" is the point.
pub const MAX_LIFETIME: Duration = Duration::from_hours(7 * 24);
/// `notBefore` lies this far in the past, for agents whose clock is a little behind.
const BACKDATE: time::Duration = time::Duration::minutes(5);
/// Largest CSR accepted (PEM characters); a P-384 request is under 1 KiB.
const MAX_CSR_LEN: usize = 8 * 1024;
/// A CRL's `nextUpdate`: how long a copy may be relied on before fetching a new one. Short,
/// because intermediates live a day and a revocation should reach verifiers within the hour.
pub const CRL_VALIDITY: Duration = Duration::from_hours(1);

/// `nodeCa:` in the broker config.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeCaConfig {
    /// The root certificate (PEM).
    pub cert_file: PathBuf,
    /// The root private key (PEM, PKCS#8 ECDSA P-256/P-384 as `ca init` writes it; 0600).
    pub key_file: PathBuf,
    /// Lifetime of each intermediate, seconds (300 .. 604800).
    #[serde(default = "default_lifetime_secs")]
    pub lifetime_secs: u64,
    #[serde(default)]
    pub name_constraints: NameConstraintsConfig,
}

fn default_lifetime_secs() -> u64 {
    DEFAULT_LIFETIME.as_secs()
}

/// Name constraints written into every intermediate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NameConstraintsConfig {
    /// DNS subtrees leaves may be forged for (empty: any).
    #[serde(default)]
    pub permitted_dns: Vec<String>,
    /// DNS subtrees no leaf may be forged for.
    #[serde(default)]
    pub excluded_dns: Vec<String>,
    /// IP ranges (CIDR) no leaf may be forged for.
    #[serde(default)]
    pub excluded_ips: Vec<String>,
}

impl NameConstraintsConfig {
    fn build(&self) -> Result<Option<NameConstraints>, NodeCaError> {
        let dns = |names: &[String]| -> Result<Vec<GeneralSubtree>, NodeCaError> {
            names
                .iter()
                .map(|n| {
                    let n = n.trim().trim_start_matches('.').to_ascii_lowercase();
                    if n.is_empty() || rustls_pki_types::DnsName::try_from(n.as_str()).is_err() {
                        return Err(NodeCaError::Config(format!(
                            "nameConstraints: {n:?} is not a DNS name"
                        )));
                    }
                    Ok(GeneralSubtree::DnsName(n))
                })
                .collect()
        };
        let mut excluded = dns(&self.excluded_dns)?;
        for cidr in &self.excluded_ips {
            let subnet = parse_cidr(cidr).ok_or_else(|| {
                NodeCaError::Config(format!("nameConstraints: {cidr:?} is not a CIDR range"))
            })?;
            excluded.push(GeneralSubtree::IpAddress(subnet));
        }
        let permitted = dns(&self.permitted_dns)?;
        if permitted.is_empty() && excluded.is_empty() {
            return Ok(None);
        }
        Ok(Some(NameConstraints {
            permitted_subtrees: permitted,
            excluded_subtrees: excluded,
        }))
    }
}

fn parse_cidr(s: &str) -> Option<CidrSubnet> {
    let (addr, prefix) = s.trim().split_once('/')?;
    let addr: std::net::IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then(|| CidrSubnet::from_addr_prefix(addr, prefix))
}

/// Why loading the root or issuing an intermediate failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeCaError {
    #[error("nodeCa: {0}")]
    Config(String),
    #[error("nodeCa: cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("nodeCa: cannot write {what} {}: {source}", path.display())]
    Write {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("nodeCa: unusable root certificate: {0}")]
    InvalidRoot(String),
    #[error("nodeCa: unusable root key: {0}")]
    InvalidKey(String),
    /// The root is outside its validity: nothing can be issued.
    #[error("the cluster root CA is not valid now (valid until {0})")]
    RootNotValid(OffsetDateTime),
    /// The request is malformed (the caller's fault).
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    /// The request names another node than the caller's token.
    #[error("the request is for node {requested:?} but the caller's token is bound to {bound:?}")]
    WrongNode { requested: String, bound: String },
    #[error("signing the intermediate: {0}")]
    Sign(rcgen::Error),
    /// The node is barred from intermediates (`paddock-broker ca revoke --node`).
    #[error("node {node:?} is barred from node CAs: {reason}")]
    Blocked { node: String, reason: String },
    #[error("signing the revocation list: {0}")]
    Crl(rcgen::Error),
    #[error("serial {0:?} is not a hex certificate serial")]
    BadSerial(String),
}

/// One revoked intermediate, as the CRL lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    /// Hex serial.
    pub serial: String,
    pub revoked_at: OffsetDateTime,
}

/// One issued intermediate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedNodeCa {
    pub certificate_pem: String,
    pub certificate_der: CertificateDer<'static>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Hex serial, for the audit trail.
    pub serial: String,
}

/// The loaded root: signs intermediates.
pub struct NodeCa {
    issuer: Issuer<'static, KeyPair>,
    root_der: CertificateDer<'static>,
    root_pem: String,
    root_not_before: OffsetDateTime,
    root_not_after: OffsetDateTime,
    lifetime: Duration,
    constraints: Option<NameConstraints>,
    /// The root's subject key identifier: the CRL's authority key identifier names it.
    root_key_id: Option<Vec<u8>>,
}

impl fmt::Debug for NodeCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCa")
            .field("root_not_after", &self.root_not_after)
            .field("lifetime", &self.lifetime)
            .field("constraints", &self.constraints.is_some())
            .field("key", &"[secret key elided]")
            .finish_non_exhaustive()
    }
}

impl NodeCa {
    /// Loads the root named by the config and checks it can sign intermediates now.
    pub fn load(config: &NodeCaConfig) -> Result<Self, NodeCaError> {
        let read = |what, path: &Path| {
            fs::read_to_string(path).map_err(|source| NodeCaError::Read {
                what,
                path: path.to_owned(),
                source,
            })
        };
        let cert = read("root certificate", &config.cert_file)?;
        let key = read("root key", &config.key_file)?;
        if let Ok(meta) = fs::metadata(&config.key_file)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %config.key_file.display(), "node CA root key is readable by group or others");
        }
        Self::from_pem(&cert, &key, config)
    }

    /// Builds the root from PEM text; `config` gives lifetime and name constraints.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        config: &NodeCaConfig,
    ) -> Result<Self, NodeCaError> {
        let lifetime = Duration::from_secs(config.lifetime_secs);
        if !(MIN_LIFETIME..=MAX_LIFETIME).contains(&lifetime) {
            return Err(NodeCaError::Config(format!(
                "lifetimeSecs must be {} .. {}",
                MIN_LIFETIME.as_secs(),
                MAX_LIFETIME.as_secs()
            )));
        }
        let constraints = config.name_constraints.build()?;
        let root_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| NodeCaError::InvalidRoot(format!("no certificate: {e}")))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| NodeCaError::InvalidKey(e.to_string()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&root_der)
            .map_err(|e| NodeCaError::InvalidRoot(e.to_string()))?;
        match x509.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca && bc.value.path_len_constraint.is_none_or(|n| n >= 1) => {}
            _ => {
                return Err(NodeCaError::InvalidRoot(
                    "basicConstraints must be CA:TRUE with room for one intermediate".to_owned(),
                ));
            }
        }
        if let Ok(Some(ku)) = x509.key_usage()
            && !ku.value.key_cert_sign()
        {
            return Err(NodeCaError::InvalidRoot(
                "keyUsage lacks keyCertSign".to_owned(),
            ));
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(NodeCaError::InvalidKey(
                "the key does not belong to the root certificate".to_owned(),
            ));
        }
        let root_key_id = x509
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                    Some(id.0.to_vec())
                }
                _ => None,
            });
        let root_not_before = x509.validity().not_before.to_datetime();
        let root_not_after = x509.validity().not_after.to_datetime();
        let now = OffsetDateTime::now_utc();
        if now < root_not_before || now >= root_not_after {
            return Err(NodeCaError::RootNotValid(root_not_after));
        }
        let issuer = Issuer::from_ca_cert_der(&root_der, key)
            .map_err(|e| NodeCaError::InvalidRoot(e.to_string()))?;
        Ok(Self {
            issuer,
            root_pem: der_to_pem(&root_der),
            root_der: root_der.into_owned(),
            root_not_before,
            root_not_after,
            lifetime,
            constraints,
            root_key_id,
        })
    }

    /// A certificate revocation list signed by the root, listing `revoked`, valid from `now`
    /// for [`CRL_VALIDITY`]. Its number is `now` in milliseconds, so a later list (from any
    /// replica) has a larger one.
    pub fn crl(&self, revoked: &[Revoked], now: OffsetDateTime) -> Result<Vec<u8>, NodeCaError> {
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                let serial = hex::decode(&r.serial)
                    .ok()
                    .filter(|b| !b.is_empty() && b.len() <= 20)
                    .ok_or_else(|| NodeCaError::BadSerial(r.serial.clone()))?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: r.revoked_at.replace_nanosecond(0).unwrap_or(r.revoked_at),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, NodeCaError>>()?;
        let number = u64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now
                + time::Duration::try_from(CRL_VALIDITY).unwrap_or(time::Duration::HOUR),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: self
                .root_key_id
                .clone()
                .map_or(KeyIdMethod::Sha256, KeyIdMethod::PreSpecified),
        };
        let crl = params.signed_by(&self.issuer).map_err(NodeCaError::Crl)?;
        Ok(crl.der().to_vec())
    }

    /// The root certificate, PEM: the trust bundle of agent pods.
    #[must_use]
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root certificate, DER.
    #[must_use]
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// Signs an intermediate for `bound_node` (the node the caller's token is bound to) from
    /// the request's CSR, valid from `now - 5 min` to `min(now + lifetime, root notAfter)`.
    pub fn issue(
        &self,
        bound_node: &str,
        requested_node: &str,
        csr_pem: &str,
        now: OffsetDateTime,
    ) -> Result<IssuedNodeCa, NodeCaError> {
        if requested_node != bound_node {
            return Err(NodeCaError::WrongNode {
                requested: requested_node.to_owned(),
                bound: bound_node.to_owned(),
            });
        }
        if !is_node_name(bound_node) {
            return Err(NodeCaError::BadCsr("invalid node name".to_owned()));
        }
        if csr_pem.len() > MAX_CSR_LEN {
            return Err(NodeCaError::BadCsr(format!(
                "longer than {MAX_CSR_LEN} characters"
            )));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| NodeCaError::BadCsr(e.to_string()))?;
        let alg = csr.public_key.algorithm();
        if alg != &PKCS_ECDSA_P256_SHA256 && alg != &PKCS_ECDSA_P384_SHA384 {
            return Err(NodeCaError::BadCsr(
                "the key must be ECDSA P-256 or P-384".to_owned(),
            ));
        }
        let csr_cn = csr
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .and_then(|v| match v {
                DnValue::Utf8String(s) => Some(s.clone()),
                DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
                _ => None,
            });
        if csr_cn.as_deref() != Some(bound_node) {
            return Err(NodeCaError::WrongNode {
                requested: csr_cn.unwrap_or_default(),
                bound: bound_node.to_owned(),
            });
        }
        let now = now.replace_nanosecond(0).unwrap_or(now);
        if now < self.root_not_before || now >= self.root_not_after {
            return Err(NodeCaError::RootNotValid(self.root_not_after));
        }
        let not_before = (now - BACKDATE).max(self.root_not_before);
        let lifetime = time::Duration::try_from(self.lifetime).unwrap_or(time::Duration::DAY);
        let not_after = (now + lifetime).min(self.root_not_after);

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Paddock");
        dn.push(DnType::OrganizationalUnitName, "node-ca");
        dn.push(DnType::CommonName, bound_node);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.name_constraints.clone_from(&self.constraints);
        params.not_before = not_before;
        params.not_after = not_after;
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(NodeCaError::Sign)?;
        Ok(IssuedNodeCa {
            certificate_pem: der_to_pem(cert.der()),
            certificate_der: cert.der().clone(),
            not_before,
            not_after,
            serial: hex::encode(serial),
        })
    }
}

/// A new root CA (ECDSA P-256, `CA:TRUE, pathlen:1`), valid from an hour ago for `validity`:
/// `(certificate PEM, private key PEM)`.
pub fn generate_root(
    common_name: &str,
    validity: Duration,
) -> Result<(String, String), NodeCaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(NodeCaError::Sign)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Paddock");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::HOUR;
    params.not_after = now + time::Duration::try_from(validity).unwrap_or(time::Duration::DAY);
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    let cert = params.self_signed(&key).map_err(NodeCaError::Sign)?;
    Ok((der_to_pem(cert.der()), key.serialize_pem()))
}

/// Writes a new root into `dir` (created 0700): `ca.crt` 0644, `ca.key` 0600. Never
/// overwrites an existing file.
pub fn write_root(dir: &Path, cert_pem: &str, key_pem: &str) -> Result<(), NodeCaError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| NodeCaError::Write {
            what: "directory",
            path: dir.to_owned(),
            source,
        })?;
    let write = |name: &str, text: &str, mode: u32, what: &'static str| {
        let path = dir.join(name);
        let err = |source| NodeCaError::Write {
            what,
            path: path.clone(),
            source,
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(err)?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)
    };
    write(ROOT_KEY_FILE, key_pem, 0o600, "root key")?;
    if let Err(e) = write(ROOT_CERT_FILE, cert_pem, 0o644, "root certificate") {
        let _ = fs::remove_file(dir.join(ROOT_KEY_FILE));
        return Err(e);
    }
    Ok(())
}

fn random_serial() -> [u8; 16] {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and of fixed length (RFC 5280 4.1.2.2).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    bytes
}

fn der_to_pem(der: &[u8]) -> String {
    to_pem("CERTIFICATE", der)
}

/// A CRL in PEM (`X509 CRL`), for files operators hand to verifiers.
#[must_use]
pub fn crl_to_pem(der: &[u8]) -> String {
    to_pem("X509 CRL", der)
}

fn to_pem(label: &str, der: &[u8]) -> String {
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
mod tests;
