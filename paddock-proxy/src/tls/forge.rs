//! Forging leaf certificates for intercepted names.
//!
//! Every leaf shares one ECDSA P-256 key generated at start-up and never written anywhere, so a
//! forge is one CA signature (~40 us with a P-256 CA) and rustls reuses one parsed signing key.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::TlsError;
use super::ca::{RunCa, random_serial};

/// Where the current time comes from; tests substitute a clock they can move.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A name a leaf is forged for: a DNS name (lowercase, no trailing dot) or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LeafName {
    /// A DNS host name, as found in SNI or a `CONNECT` target.
    Dns(String),
    /// An IP address (a `CONNECT` to a literal address); goes into an IP SAN.
    Ip(IpAddr),
}

impl LeafName {
    /// Parses and normalises a host: IP literals (also `[v6]`) become [`LeafName::Ip`], valid
    /// DNS names are lowercased without a trailing dot, anything else is refused.
    pub fn parse(host: &str) -> Result<Self, TlsError> {
        let unbracketed = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(LeafName::Ip(ip));
        }
        let lower = host.to_ascii_lowercase();
        let trimmed = lower.strip_suffix('.').unwrap_or(&lower);
        if trimmed.is_empty() || DnsName::try_from(trimmed).is_err() {
            return Err(TlsError::InvalidLeafName(host.to_owned()));
        }
        Ok(LeafName::Dns(trimmed.to_owned()))
    }
}

impl fmt::Display for LeafName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeafName::Dns(name) => f.write_str(name),
            LeafName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// How long forged leaves live. Both ends are further clamped to the CA's own validity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafValidity {
    /// From now to `notAfter`.
    pub lifetime: Duration,
    /// How far `notBefore` lies in the past, to tolerate agents whose clock is behind.
    pub backdate: Duration,
}

impl Default for LeafValidity {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_hours(24),
            backdate: Duration::from_hours(1),
        }
    }
}

/// A forged leaf ready for rustls, with its validity.
#[derive(Clone)]
pub struct ForgedLeaf {
    /// The leaf followed by the CA chain, with the shared signing key.
    pub certified: Arc<CertifiedKey>,
    /// The leaf's `notBefore`.
    pub not_before: SystemTime,
    /// The leaf's `notAfter`.
    pub not_after: SystemTime,
    /// When it was forged (by the forger's clock).
    pub forged_at: SystemTime,
}

impl fmt::Debug for ForgedLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForgedLeaf")
            .field("chain_len", &self.certified.cert.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Signs leaves with the run CA and the shared leaf key.
pub struct LeafForger {
    ca: RunCa,
    leaf_key: KeyPair,
    signing_key: Arc<dyn rustls::sign::SigningKey>,
    validity: LeafValidity,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for LeafForger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafForger")
            .field("ca", &self.ca)
            .field("validity", &self.validity)
            .field("leaf_key", &"[secret key elided]")
            .finish_non_exhaustive()
    }
}

impl LeafForger {
    /// A forger with the default validity and the system clock.
    pub fn new(ca: RunCa) -> Result<Self, TlsError> {
        Self::with_options(ca, LeafValidity::default(), Arc::new(SystemClock))
    }

    /// A forger with explicit leaf validity and clock.
    pub fn with_options(
        ca: RunCa,
        validity: LeafValidity,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, TlsError> {
        let leaf_key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| TlsError::Forge {
                name: "shared leaf key".to_owned(),
                source,
            })?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let signing_key = rustls::crypto::aws_lc_rs::sign::any_ecdsa_type(&der)?;
        Ok(Self {
            ca,
            leaf_key,
            signing_key,
            validity,
            clock,
        })
    }

    /// The CA leaves are signed with.
    #[must_use]
    pub fn ca(&self) -> &RunCa {
        &self.ca
    }

    /// The clock validity is computed from.
    #[must_use]
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Forges a leaf for `name`: SAN is the name (DNS or IP), the serial is random, and the
    /// validity is `now - backdate .. now + lifetime` clamped into the CA's validity.
    pub fn forge(&self, name: &LeafName) -> Result<ForgedLeaf, TlsError> {
        let forged_at = self.clock.now();
        let now = OffsetDateTime::from(forged_at);
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let (ca_from, ca_until) = (self.ca.not_before(), self.ca.not_after());
        if now < ca_from || now >= ca_until {
            return Err(TlsError::CaNotValidNow {
                not_before: ca_from,
                not_after: ca_until,
            });
        }
        let not_before = now
            .checked_sub(to_time(self.validity.backdate))
            .map_or(ca_from, |t| t.max(ca_from));
        let not_after = now
            .checked_add(to_time(self.validity.lifetime))
            .map_or(ca_until, |t| t.min(ca_until));

        let forge_err = |source| TlsError::Forge {
            name: name.to_string(),
            source,
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let text = name.to_string();
        if text.len() <= 64 {
            dn.push(DnType::CommonName, text);
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match name {
            LeafName::Dns(host) => SanType::DnsName(host.clone().try_into().map_err(forge_err)?),
            LeafName::Ip(ip) => SanType::IpAddress(*ip),
        }];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;

        let cert = params
            .signed_by(&self.leaf_key, self.ca.issuer())
            .map_err(forge_err)?;
        let mut chain = Vec::with_capacity(1 + self.ca.chain().len());
        chain.push(cert.der().clone());
        chain.extend(self.ca.chain().iter().cloned());
        Ok(ForgedLeaf {
            certified: Arc::new(CertifiedKey::new(chain, Arc::clone(&self.signing_key))),
            not_before: SystemTime::from(not_before),
            not_after: SystemTime::from(not_after),
            forged_at,
        })
    }
}

fn to_time(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

/// Result of [`bench_forge`].
#[derive(Debug, Clone, Copy)]
pub struct ForgeBench {
    /// Leaves forged.
    pub leaves: usize,
    /// Wall time for all of them (CA and key set-up excluded).
    pub elapsed: Duration,
}

impl ForgeBench {
    /// Leaves per second.
    #[must_use]
    pub fn per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            #[expect(clippy::cast_precision_loss, reason = "a rate for a report")]
            let leaves = self.leaves as f64;
            leaves / secs
        } else {
            0.0
        }
    }

    /// Mean time per leaf.
    #[must_use]
    pub fn per_leaf(&self) -> Duration {
        u32::try_from(self.leaves.max(1)).map_or(Duration::ZERO, |n| self.elapsed / n)
    }
}

/// Measures leaf forging as the proxy does it: a generated P-256 run CA, the shared leaf key,
/// and `leaves` distinct names (so nothing is cached).
pub fn bench_forge(leaves: usize) -> Result<ForgeBench, TlsError> {
    let ca = RunCa::generate("bench", Duration::from_hours(1))?.ca;
    let forger = LeafForger::new(ca)?;
    let names = (0..leaves)
        .map(|i| LeafName::Dns(format!("host-{i}.bench.paddock.test")))
        .collect::<Vec<_>>();
    let start = Instant::now();
    for name in &names {
        forger.forge(name)?;
    }
    Ok(ForgeBench {
        leaves,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::{ServerName, UnixTime};

    use super::*;
    use crate::tls::test_support::{ManualClock, fixture_path, roots_with, test_ca};

    fn verify(ca: &RunCa, leaf: &ForgedLeaf, name: &str) -> Result<(), rustls::Error> {
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots_with(ca)),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        let chain = &leaf.certified.cert;
        let name = ServerName::try_from(name.to_owned()).expect("server name");
        verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    fn x509_validity(der: &[u8]) -> (OffsetDateTime, OffsetDateTime, Vec<u8>) {
        let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse leaf");
        (
            cert.validity().not_before.to_datetime(),
            cert.validity().not_after.to_datetime(),
            cert.raw_serial().to_vec(),
        )
    }

    #[test]
    fn forged_leaf_verifies_for_its_name_only() {
        let foreign = RunCa::generate("foreign", Duration::from_hours(2))
            .expect("CA")
            .ca;
        let forger = LeafForger::new(test_ca()).expect("forger");
        let leaf = forger
            .forge(&LeafName::parse("api.example.com").expect("name"))
            .expect("forge");
        verify(forger.ca(), &leaf, "api.example.com").expect("valid for its name");
        let err = verify(forger.ca(), &leaf, "other.example.com").expect_err("wrong name");
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{err:?}"
        );
        // A different CA's trust store rejects it.
        let err = verify(&foreign, &leaf, "api.example.com").expect_err("foreign CA");
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{err:?}"
        );
        // Chain: the leaf, then the CA.
        assert_eq!(leaf.certified.cert.len(), 2);
        assert_eq!(&leaf.certified.cert[1], forger.ca().certificate());
    }

    #[test]
    fn ip_names_get_an_ip_san() {
        let forger = LeafForger::new(test_ca()).expect("forger");
        for (host, check) in [("10.0.0.7", "10.0.0.7"), ("[2001:db8::1]", "2001:db8::1")] {
            let name = LeafName::parse(host).expect("name");
            assert!(matches!(name, LeafName::Ip(_)));
            let leaf = forger.forge(&name).expect("forge");
            verify(forger.ca(), &leaf, check).expect("IP SAN verifies");
            assert!(verify(forger.ca(), &leaf, "10.0.0.8").is_err());
        }
    }

    #[test]
    fn leaves_from_openssl_made_cas_verify() {
        for (cert, key) in [
            ("ec_ca.crt", "ec_sec1.key"),
            ("p384_ca.crt", "p384_sec1.key"),
            ("rsa_ca.crt", "rsa_pkcs1.key"),
        ] {
            let ca = RunCa::load(
                &fixture_path(&format!("ca/{cert}")),
                &fixture_path(&format!("ca/{key}")),
            )
            .expect("load");
            let forger = LeafForger::new(ca).expect("forger");
            let leaf = forger
                .forge(&LeafName::parse("git.example.com").expect("name"))
                .expect("forge");
            verify(forger.ca(), &leaf, "git.example.com")
                .unwrap_or_else(|e| panic!("{cert}: {e:?}"));
        }
    }

    #[test]
    fn validity_sits_inside_the_cas() {
        let clock = ManualClock::starting_now();
        let forger = LeafForger::with_options(test_ca(), LeafValidity::default(), clock.clone())
            .expect("forger");
        let (ca_from, ca_until) = (forger.ca().not_before(), forger.ca().not_after());
        let now = OffsetDateTime::from(clock.now());
        let leaf = forger
            .forge(&LeafName::parse("a.example").expect("name"))
            .expect("forge");
        let (from, until, _) = x509_validity(&leaf.certified.cert[0]);
        assert!(
            from >= ca_from && until <= ca_until,
            "{from} {until} vs {ca_from} {ca_until}"
        );
        assert!(
            from <= now - time::Duration::minutes(59),
            "backdated ~1h: {from} vs {now}"
        );
        assert!(
            until >= now + time::Duration::hours(23),
            "lives ~24h: {until} vs {now}"
        );
        assert_eq!(SystemTime::from(until), leaf.not_after);

        // 47h into a 48h CA: the leaf ends with the CA, not 24h later.
        clock.advance(Duration::from_hours(46));
        let late = forger
            .forge(&LeafName::parse("a.example").expect("name"))
            .expect("forge");
        let (_, until, _) = x509_validity(&late.certified.cert[0]);
        assert_eq!(until, ca_until);
        assert!(
            late.not_after
                < SystemTime::from(OffsetDateTime::from(clock.now()) + time::Duration::hours(24))
        );

        clock.advance(Duration::from_hours(3));
        let err = forger
            .forge(&LeafName::parse("a.example").expect("name"))
            .expect_err("CA expired");
        assert!(matches!(err, TlsError::CaNotValidNow { .. }), "{err}");
    }

    #[test]
    fn serials_are_unique_and_positive() {
        let forger = LeafForger::new(test_ca()).expect("forger");
        let name = LeafName::parse("same.example").expect("name");
        let serials: HashSet<Vec<u8>> = (0..50)
            .map(|_| {
                let leaf = forger.forge(&name).expect("forge");
                let serial = x509_validity(&leaf.certified.cert[0]).2;
                assert!(serial[0] & 0x80 == 0, "positive");
                assert!(serial.len() >= 16, "{} bytes", serial.len());
                serial
            })
            .collect();
        assert_eq!(serials.len(), 50);
    }

    #[test]
    fn leaf_names_normalise_and_reject_garbage() {
        assert_eq!(
            LeafName::parse("API.Example.COM.").expect("dns"),
            LeafName::Dns("api.example.com".into())
        );
        assert_eq!(
            LeafName::parse("::1").expect("ip"),
            LeafName::Ip("::1".parse().expect("ip"))
        );
        assert_eq!(
            LeafName::parse("_srv.example").expect("underscore"),
            LeafName::Dns("_srv.example".into())
        );
        for bad in ["", ".", "bad name", "a..b", "exa\0mple.com", "-", "x/y"] {
            assert!(
                matches!(LeafName::parse(bad), Err(TlsError::InvalidLeafName(_))),
                "{bad:?} accepted"
            );
        }
        let long = format!("{}.example.com", "a".repeat(60));
        let forger = LeafForger::new(test_ca()).expect("forger");
        let leaf = forger
            .forge(&LeafName::parse(&long).expect("long"))
            .expect("forge long");
        verify(forger.ca(), &leaf, &long).expect("SAN carries names longer than a CN");
    }

    #[test]
    fn bench_reports_a_rate() {
        let bench = bench_forge(20).expect("bench");
        assert_eq!(bench.leaves, 20);
        assert!(bench.elapsed > Duration::ZERO);
        assert!(bench.per_second() > 0.0);
        assert!(bench.per_leaf() > Duration::ZERO);
    }
}
