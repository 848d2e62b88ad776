//! Chain checks: what the root issues, and that webpki (what rustls clients run) accepts a
//! leaf forged by the intermediate against a root-only trust store, and only then.

use std::sync::Arc;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls_pki_types::{ServerName, UnixTime};

use super::*;

fn config(lifetime_secs: u64) -> NodeCaConfig {
    NodeCaConfig {
        cert_file: PathBuf::new(),
        key_file: PathBuf::new(),
        lifetime_secs,
        name_constraints: NameConstraintsConfig::default(),
    }
}

fn root(validity: Duration, cfg: &NodeCaConfig) -> NodeCa {
    let (cert, key) = generate_root("test root", validity).expect("root");
    NodeCa::from_pem(&cert, &key, cfg).expect("load root")
}

fn csr_for(cn: &str) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("node key");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).expect("csr");
    (key, csr.pem().expect("pem"))
}

/// A leaf for `host` signed by the intermediate `ca_der` with `ca_key`, as the node agent's
/// forger makes it.
fn forge(ca_der: &CertificateDer<'_>, ca_key: KeyPair, host: &str) -> CertificateDer<'static> {
    let issuer = rcgen::Issuer::from_ca_cert_der(ca_der, ca_key).expect("issuer");
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("leaf key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::DnsName(host.try_into().expect("dns"))];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::hours(1);
    params
        .signed_by(&leaf_key, &issuer)
        .expect("leaf")
        .der()
        .clone()
}

/// Verifies `leaf` (with `intermediates`) for `host` at `at` against a store holding only
/// `root`.
fn verify(
    root: &CertificateDer<'static>,
    leaf: &CertificateDer<'static>,
    intermediates: &[CertificateDer<'static>],
    host: &str,
    at: UnixTime,
) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).expect("root");
    let verifier = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("verifier");
    let name = ServerName::try_from(host.to_owned()).expect("name");
    verifier
        .verify_server_cert(leaf, intermediates, &name, &[], at)
        .map(|_| ())
}

/// [`verify`] with the root's CRLs loaded, as a verifier that checks revocation does: the
/// intermediate's status must be known (the root's CRL covers it); the leaf's may be unknown
/// (intermediates publish no CRL: leaves live hours).
fn verify_with_crls(
    root: &CertificateDer<'static>,
    crls: Vec<rustls_pki_types::CertificateRevocationListDer<'static>>,
    leaf: &CertificateDer<'static>,
    intermediates: &[CertificateDer<'static>],
    host: &str,
) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).expect("root");
    let verifier = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .with_crls(crls)
    .allow_unknown_revocation_status()
    .enforce_revocation_expiration()
    .build()
    .expect("verifier");
    let name = ServerName::try_from(host.to_owned()).expect("name");
    verifier
        .verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())
        .map(|_| ())
}

/// A revoked intermediate: the root's CRL lists it and webpki refuses every leaf it forged,
/// while a sibling intermediate (the node's renewal) still verifies under the same CRL.
#[test]
fn a_revoked_intermediate_fails_verification_against_the_roots_crl() {
    let ca = root(Duration::from_hours(24), &config(3600));
    let now = OffsetDateTime::now_utc();
    let (old_key, csr) = csr_for("node-a");
    let old = ca.issue("node-a", "node-a", &csr, now).expect("issued");
    let (new_key, csr) = csr_for("node-a");
    let new = ca.issue("node-a", "node-a", &csr, now).expect("renewed");
    let old_leaf = forge(&old.certificate_der, old_key, "api.example.com");
    let new_leaf = forge(&new.certificate_der, new_key, "api.example.com");

    let empty = ca.crl(&[], now).expect("empty crl");
    for (leaf, chain) in [
        (&old_leaf, &old.certificate_der),
        (&new_leaf, &new.certificate_der),
    ] {
        verify_with_crls(
            ca.root_der(),
            vec![empty.clone().into()],
            leaf,
            std::slice::from_ref(chain),
            "api.example.com",
        )
        .expect("nothing revoked yet");
    }

    let revoked = [Revoked {
        serial: old.serial.clone(),
        revoked_at: now,
    }];
    let crl = ca.crl(&revoked, now).expect("crl");
    let (_, parsed) = x509_parser::parse_x509_crl(&crl).expect("a parseable CRL");
    assert_eq!(parsed.iter_revoked_certificates().count(), 1);
    assert_eq!(
        hex::encode(
            parsed
                .iter_revoked_certificates()
                .next()
                .expect("one")
                .raw_serial()
        ),
        old.serial
    );
    assert!(
        parsed.next_update().is_some(),
        "a CRL says when to fetch the next"
    );
    let err = verify_with_crls(
        ca.root_der(),
        vec![crl.clone().into()],
        &old_leaf,
        std::slice::from_ref(&old.certificate_der),
        "api.example.com",
    )
    .expect_err("revoked");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        ),
        "{err:?}"
    );
    verify_with_crls(
        ca.root_der(),
        vec![crl.into()],
        &new_leaf,
        std::slice::from_ref(&new.certificate_der),
        "api.example.com",
    )
    .expect("the renewed intermediate is not revoked");

    // A list with the root's name but another key's signature is refused as a list (the
    // verification fails closed), never read as this root's revocations.
    let other = root(Duration::from_hours(24), &config(3600));
    let forged = other.crl(&[], now).expect("forged crl");
    let err = verify_with_crls(
        ca.root_der(),
        vec![forged.into()],
        &old_leaf,
        std::slice::from_ref(&old.certificate_der),
        "api.example.com",
    )
    .expect_err("a CRL signed by another key");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertRevocationList(rustls::CertRevocationListError::BadSignature)
        ),
        "{err:?}"
    );

    let bad = [Revoked {
        serial: "not hex".to_owned(),
        revoked_at: now,
    }];
    assert!(matches!(ca.crl(&bad, now), Err(NodeCaError::BadSerial(_))));
}

#[test]
fn intermediate_is_a_pathlen_0_signing_ca_for_its_node_and_its_leaves_verify_under_the_root() {
    let ca = root(Duration::from_hours(24 * 365), &config(3600));
    let (key, csr) = csr_for("node-a");
    let now = OffsetDateTime::now_utc();
    let issued = ca.issue("node-a", "node-a", &csr, now).expect("issued");

    let (_, x509) = x509_parser::parse_x509_certificate(&issued.certificate_der).expect("x509");
    let bc = x509
        .basic_constraints()
        .expect("bc")
        .expect("present")
        .value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let ku = x509.key_usage().expect("ku").expect("present");
    assert!(ku.critical);
    assert!(ku.value.key_cert_sign());
    assert!(!ku.value.digital_signature() && !ku.value.crl_sign());
    let cn: Vec<_> = x509
        .subject()
        .iter_common_name()
        .filter_map(|c| c.as_str().ok())
        .collect();
    assert_eq!(cn, ["node-a"]);
    // The node's own key went in; the broker never saw its private half.
    assert_eq!(
        x509.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    let lifetime = issued.not_after - now.replace_nanosecond(0).expect("ns");
    assert_eq!(lifetime, time::Duration::hours(1));
    assert!(issued.not_before <= now - time::Duration::minutes(4));

    // A leaf forged by the intermediate verifies against the root-only store when the chain
    // carries the intermediate, and not without it.
    let leaf = forge(&issued.certificate_der, key, "api.example.com");
    let chain = [issued.certificate_der.clone()];
    verify(
        ca.root_der(),
        &leaf,
        &chain,
        "api.example.com",
        UnixTime::now(),
    )
    .expect("leaf + intermediate verify under the root");
    let err = verify(
        ca.root_der(),
        &leaf,
        &[],
        "api.example.com",
        UnixTime::now(),
    )
    .expect_err("no intermediate");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        ),
        "{err:?}"
    );
    // Another root's store rejects the same chain.
    let other = root(Duration::from_hours(24), &config(3600));
    assert!(
        verify(
            other.root_der(),
            &leaf,
            &chain,
            "api.example.com",
            UnixTime::now()
        )
        .is_err()
    );
}

#[test]
fn an_expired_intermediate_fails_verification_and_none_outlives_the_root() {
    // A root that ends in 2 h: a 24 h intermediate is cut to the root's end.
    let ca = root(Duration::from_hours(2), &config(86_400));
    let (key, csr) = csr_for("node-a");
    let issued = ca
        .issue("node-a", "node-a", &csr, OffsetDateTime::now_utc())
        .expect("issued");
    let (_, root_x509) = x509_parser::parse_x509_certificate(ca.root_der()).expect("root");
    assert_eq!(
        issued.not_after,
        root_x509.validity().not_after.to_datetime()
    );

    let leaf = forge(&issued.certificate_der, key, "api.example.com");
    let chain = [issued.certificate_der.clone()];
    let after = issued.not_after + time::Duration::seconds(1);
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(after.unix_timestamp()).expect("positive"),
    ));
    let err = verify(ca.root_der(), &leaf, &chain, "api.example.com", at).expect_err("expired");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. }
            )
        ),
        "{err:?}"
    );
    // The root refuses to issue once it is itself expired.
    let err = ca
        .issue("node-a", "node-a", &csr, after)
        .expect_err("root expired");
    assert!(matches!(err, NodeCaError::RootNotValid(_)), "{err}");
}

#[test]
fn a_request_for_another_node_is_refused() {
    let ca = root(Duration::from_hours(24), &config(3600));
    let (_, csr_b) = csr_for("node-b");
    let now = OffsetDateTime::now_utc();
    // The JSON names another node than the token.
    let err = ca
        .issue("node-a", "node-b", &csr_b, now)
        .expect_err("other node");
    assert!(
        matches!(&err, NodeCaError::WrongNode { requested, bound } if requested == "node-b" && bound == "node-a"),
        "{err}"
    );
    // The JSON names the token's node but the CSR asks for another.
    let err = ca
        .issue("node-a", "node-a", &csr_b, now)
        .expect_err("csr for other node");
    assert!(matches!(err, NodeCaError::WrongNode { .. }), "{err}");
    // No CN at all.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    assert!(matches!(
        ca.issue("node-a", "node-a", &csr, now),
        Err(NodeCaError::WrongNode { .. })
    ));
}

#[test]
fn malformed_or_tampered_requests_are_bad_requests() {
    let ca = root(Duration::from_hours(24), &config(3600));
    let now = OffsetDateTime::now_utc();
    for garbage in [
        "",
        "not pem",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        assert!(
            matches!(
                ca.issue("node-a", "node-a", garbage, now),
                Err(NodeCaError::BadCsr(_))
            ),
            "{garbage:?}"
        );
    }
    // A flipped bit in the signature: the proof of key possession fails.
    let (_, csr) = csr_for("node-a");
    let mut der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
        .expect("der")
        .as_ref()
        .to_vec();
    let last = der.len() - 1;
    der[last] ^= 1;
    let tampered = to_pem("CERTIFICATE REQUEST", &der);
    let err = ca
        .issue("node-a", "node-a", &tampered, now)
        .expect_err("tampered");
    assert!(matches!(err, NodeCaError::BadCsr(_)), "{err}");
    let long = "A".repeat(MAX_CSR_LEN + 1);
    assert!(matches!(
        ca.issue("node-a", "node-a", &long, now),
        Err(NodeCaError::BadCsr(_))
    ));
}

#[test]
fn excluded_names_are_written_as_name_constraints_that_webpki_enforces() {
    let mut cfg = config(3600);
    cfg.name_constraints.excluded_dns = vec![".cluster.local".to_owned()];
    cfg.name_constraints.excluded_ips = vec!["10.96.0.0/12".to_owned()];
    let ca = root(Duration::from_hours(24), &cfg);
    let (key, csr) = csr_for("node-a");
    let issued = ca
        .issue("node-a", "node-a", &csr, OffsetDateTime::now_utc())
        .expect("issued");
    let chain = [issued.certificate_der.clone()];
    let der = issued.certificate_der.clone();
    let ok = forge(
        &der,
        KeyPair::from_pem(&key.serialize_pem()).expect("key"),
        "api.example.com",
    );
    verify(
        ca.root_der(),
        &ok,
        &chain,
        "api.example.com",
        UnixTime::now(),
    )
    .expect("outside the exclusion");
    let bad = forge(&der, key, "kubernetes.default.svc.cluster.local");
    let err = verify(
        ca.root_der(),
        &bad,
        &chain,
        "kubernetes.default.svc.cluster.local",
        UnixTime::now(),
    )
    .expect_err("excluded subtree");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(_)
                    | rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{err:?}"
    );

    for (bad, needle) in [("10.0.0.0/33", "CIDR"), ("nonsense", "CIDR")] {
        let mut cfg = config(3600);
        cfg.name_constraints.excluded_ips = vec![bad.to_owned()];
        let (cert, key) = generate_root("r", Duration::from_hours(1)).expect("root");
        let err = NodeCa::from_pem(&cert, &key, &cfg).expect_err(bad);
        assert!(err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn the_root_must_match_its_key_and_lifetimes_are_bounded() {
    let (cert, key) = generate_root("r", Duration::from_hours(1)).expect("root");
    let (_, other_key) = generate_root("o", Duration::from_hours(1)).expect("other");
    let err = NodeCa::from_pem(&cert, &other_key, &config(3600)).expect_err("mismatch");
    assert!(matches!(err, NodeCaError::InvalidKey(_)), "{err}");
    for secs in [0, 299, 604_801] {
        let err = NodeCa::from_pem(&cert, &key, &config(secs)).expect_err("bounds");
        assert!(err.to_string().contains("lifetimeSecs"), "{secs}: {err}");
    }
    NodeCa::from_pem(&cert, &key, &config(300)).expect("lower bound");
    // A leaf (not a CA) cannot be the root.
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let leaf = CertificateParams::new(vec!["x.example".to_owned()])
        .expect("params")
        .self_signed(&leaf_key)
        .expect("leaf");
    let err = NodeCa::from_pem(&leaf.pem(), &leaf_key.serialize_pem(), &config(3600))
        .expect_err("not a CA");
    assert!(matches!(err, NodeCaError::InvalidRoot(_)), "{err}");
    let dbg = format!(
        "{:?}",
        NodeCa::from_pem(&cert, &key, &config(3600)).expect("ok")
    );
    assert!(!dbg.contains("PRIVATE"), "{dbg}");
}

#[test]
fn init_writes_a_strict_pair_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("root");
    let (cert, key) = generate_root("r", Duration::from_hours(1)).expect("root");
    write_root(&out, &cert, &key).expect("write");
    let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&out.join(ROOT_KEY_FILE)), 0o600);
    assert_eq!(mode(&out.join(ROOT_CERT_FILE)), 0o644);
    assert_eq!(mode(&out), 0o700);
    let err = write_root(&out, &cert, &key).expect_err("no overwrite");
    assert!(matches!(err, NodeCaError::Write { .. }), "{err}");
    let cfg = NodeCaConfig {
        cert_file: out.join(ROOT_CERT_FILE),
        key_file: out.join(ROOT_KEY_FILE),
        ..config(3600)
    };
    NodeCa::load(&cfg).expect("written root loads");
}
