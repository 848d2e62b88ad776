//! Vetting a destination before dialling it.
//!
//! * **Transparent mode** ([`Vetter::vet_transparent`]): the agent already chose an address (the
//!   original destination) and claims a name (SNI or `Host`). The original address must pass the
//!   CIDR set, and it must be one of the addresses the proxy itself resolves for the name;
//!   otherwise the agent (or its resolver) was pointed somewhere the name does not lead, which is
//!   what DNS rebinding looks like, and the connection is refused (`dns_rebinding_mismatch`).
//!   Because CDNs rotate answers and the agent's resolver may be fresher than the proxy's cache,
//!   a mismatch against a cached answer is re-checked once against a fresh lookup first.
//! * **CONNECT and plain-HTTP modes** ([`Vetter::vet_name`]): only a name is known; it is resolved
//!   and the answers are vetted.
//!
//! In both, every resolved address goes through the CIDR set. Denied answers are removed (and
//! reported in [`Vetted::filtered`]), never dialled; if nothing remains the destination is
//! refused (`denied_cidr`). IPv4-mapped IPv6 original destinations (dual-stack sockets dialling
//! IPv4 through `connect6`) are compared and dialled as the IPv4 address they carry.

use std::net::IpAddr;
use std::sync::Arc;

use super::cidr::{CidrPolicy, DeniedCidr};
use super::resolve::{DnsResolver, ResolveError};
use crate::labels::Rejection;

/// Addresses that may be dialled, in the order to try them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vetted {
    /// For transparent mode the original destination comes first.
    pub addrs: Vec<IpAddr>,
    /// Resolved addresses removed by the CIDR set (for logs and audit).
    pub filtered: Vec<DeniedCidr>,
}

/// Why a destination was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VetError {
    #[error(transparent)]
    Dns(#[from] ResolveError),
    #[error(transparent)]
    DeniedCidr(DeniedCidr),
    #[error(
        "{host} does not resolve to the original destination {original} (resolved: {resolved:?})"
    )]
    RebindingMismatch {
        host: String,
        original: IpAddr,
        resolved: Vec<IpAddr>,
    },
}

impl VetError {
    /// The rejection metric/audit reason for this error.
    #[must_use]
    pub fn rejection(&self) -> Rejection {
        match self {
            VetError::Dns(_) => Rejection::DnsFailed,
            VetError::DeniedCidr(_) => Rejection::DeniedCidr,
            VetError::RebindingMismatch { .. } => Rejection::DnsRebindingMismatch,
        }
    }
}

/// Resolves and vets destinations.
#[derive(Debug, Clone)]
pub struct Vetter {
    resolver: Arc<DnsResolver>,
    cidr: Arc<CidrPolicy>,
}

impl Vetter {
    #[must_use]
    pub fn new(resolver: Arc<DnsResolver>, cidr: Arc<CidrPolicy>) -> Self {
        Self { resolver, cidr }
    }

    /// The resolver (shared with a DNS server, so both see the same answers).
    #[must_use]
    pub fn resolver(&self) -> &Arc<DnsResolver> {
        &self.resolver
    }

    /// The denied-CIDR set.
    #[must_use]
    pub fn cidr(&self) -> &Arc<CidrPolicy> {
        &self.cidr
    }

    /// Transparent mode: `host` is the normalised SNI (or `Host`), `original` the address the
    /// agent dialled.
    pub async fn vet_transparent(&self, host: &str, original: IpAddr) -> Result<Vetted, VetError> {
        let original = original.to_canonical();
        // Refuse a forbidden destination without spending a DNS query on it.
        self.cidr.check(original).map_err(VetError::DeniedCidr)?;
        let contains = |answers: &[IpAddr]| answers.iter().any(|a| a.to_canonical() == original);
        let mut answers = self.resolver.resolve(host).await?;
        if !contains(&answers) {
            answers = self.resolver.refresh(host, &answers).await?;
        }
        if !contains(&answers) {
            return Err(VetError::RebindingMismatch {
                host: host.to_owned(),
                original,
                resolved: answers.to_vec(),
            });
        }
        let mut vetted = Vetted {
            addrs: vec![original],
            filtered: Vec::new(),
        };
        for addr in answers.iter().filter(|a| a.to_canonical() != original) {
            match self.cidr.check(*addr) {
                Ok(()) => vetted.addrs.push(*addr),
                Err(denied) => vetted.filtered.push(denied),
            }
        }
        Ok(vetted)
    }

    /// CONNECT and plain-HTTP modes: resolve `host` (a normalised name or IP literal) and keep
    /// the answers the CIDR set allows.
    pub async fn vet_name(&self, host: &str) -> Result<Vetted, VetError> {
        let answers = self.resolver.resolve(host).await?;
        let mut vetted = Vetted {
            addrs: Vec::with_capacity(answers.len()),
            filtered: Vec::new(),
        };
        for addr in answers.iter() {
            match self.cidr.check(*addr) {
                Ok(()) => vetted.addrs.push(*addr),
                Err(denied) => vetted.filtered.push(denied),
            }
        }
        if vetted.addrs.is_empty() {
            // The resolver never returns an empty answer, so something was filtered.
            return Err(match vetted.filtered.into_iter().next() {
                Some(first) => VetError::DeniedCidr(first),
                None => VetError::Dns(ResolveError::NoRecords {
                    host: host.to_owned(),
                }),
            });
        }
        Ok(vetted)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hickory_resolver::proto::rr::RecordType;

    use super::*;
    use crate::net::cidr::RangeKind;
    use crate::net::resolve::ResolverSettings;
    use crate::net::test_dns::{Answer, TestDns};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test ip")
    }

    async fn setup(allow: &[&str]) -> (TestDns, Vetter) {
        let dns = TestDns::start(Duration::ZERO).await;
        let resolver = DnsResolver::new(ResolverSettings {
            nameservers: vec![dns.addr],
            attempt_timeout: Duration::from_millis(300),
            attempts: 1,
            ..ResolverSettings::default()
        })
        .expect("resolver");
        let mut cidr = CidrPolicy::with_defaults();
        for a in allow {
            cidr = cidr.allow(a.parse().expect("test range"));
        }
        (dns, Vetter::new(Arc::new(resolver), Arc::new(cidr)))
    }

    #[tokio::test]
    async fn transparent_original_first_then_other_answers() {
        let (dns, v) = setup(&["127.0.0.0/8", "::1/128"]).await;
        dns.addrs("svc.test", &["127.0.0.1", "127.0.0.2", "::1"], 60);
        let got = v
            .vet_transparent("svc.test", ip("127.0.0.2"))
            .await
            .expect("vetted");
        assert_eq!(got.addrs.first(), Some(&ip("127.0.0.2")));
        let mut rest = got.addrs[1..].to_vec();
        rest.sort();
        assert_eq!(rest, vec![ip("127.0.0.1"), ip("::1")]);
        assert!(got.filtered.is_empty());
    }

    #[tokio::test]
    async fn transparent_mapped_original_is_canonicalised() {
        let (dns, v) = setup(&["127.0.0.0/8"]).await;
        dns.addrs("svc.test", &["127.0.0.1"], 60);
        let got = v
            .vet_transparent("svc.test", ip("::ffff:127.0.0.1"))
            .await
            .expect("vetted");
        assert_eq!(got.addrs, vec![ip("127.0.0.1")]);
    }

    #[tokio::test]
    async fn transparent_rebinding_mismatch() {
        let (dns, v) = setup(&["127.0.0.0/8"]).await;
        dns.addrs("svc.test", &["127.0.0.1"], 60);
        let e = v.vet_transparent("svc.test", ip("127.0.0.3")).await.err();
        assert_eq!(
            e,
            Some(VetError::RebindingMismatch {
                host: "svc.test".into(),
                original: ip("127.0.0.3"),
                resolved: vec![ip("127.0.0.1")],
            })
        );
        assert_eq!(
            e.map(|e| e.rejection()),
            Some(Rejection::DnsRebindingMismatch)
        );
    }

    #[tokio::test]
    async fn mismatch_against_a_stale_cache_rechecks_once() {
        let (dns, v) = setup(&["127.0.0.0/8"]).await;
        dns.addrs("cdn.test", &["127.0.0.1"], 300);
        v.vet_transparent("cdn.test", ip("127.0.0.1"))
            .await
            .expect("vetted");
        // The name moved; the agent's resolver already knows, the proxy's cache does not.
        dns.addrs("cdn.test", &["127.0.0.2"], 300);
        let got = v
            .vet_transparent("cdn.test", ip("127.0.0.2"))
            .await
            .expect("vetted");
        assert_eq!(got.addrs, vec![ip("127.0.0.2")]);
        assert_eq!(dns.count("cdn.test", RecordType::A), 2);
        // A real mismatch costs one fresh lookup and is still refused.
        let e = v.vet_transparent("cdn.test", ip("127.0.0.9")).await.err();
        assert!(
            matches!(e, Some(VetError::RebindingMismatch { .. })),
            "{e:?}"
        );
        assert_eq!(dns.count("cdn.test", RecordType::A), 3);
    }

    #[tokio::test]
    async fn transparent_denied_original_needs_no_dns() {
        let (dns, v) = setup(&[]).await;
        dns.addrs("svc.test", &["127.0.0.1"], 60);
        let e = v.vet_transparent("svc.test", ip("127.0.0.1")).await.err();
        assert!(
            matches!(&e, Some(VetError::DeniedCidr(d)) if d.why == RangeKind::Loopback),
            "{e:?}"
        );
        assert_eq!(e.map(|e| e.rejection()), Some(Rejection::DeniedCidr));
        assert_eq!(dns.count("svc.test", RecordType::A), 0);
    }

    #[tokio::test]
    async fn denied_answers_are_filtered_not_dialled() {
        let (dns, v) = setup(&["127.0.0.0/8"]).await;
        // Test data only: these addresses are classified, never contacted.
        dns.addrs(
            "mixed.test",
            &["169.254.169.254", "127.0.0.1", "10.0.0.1"],
            60,
        );
        let got = v
            .vet_transparent("mixed.test", ip("127.0.0.1"))
            .await
            .expect("vetted");
        assert_eq!(got.addrs, vec![ip("127.0.0.1")]);
        let whys: Vec<_> = got.filtered.iter().map(|d| d.why).collect();
        assert_eq!(whys, vec![RangeKind::CloudMetadata, RangeKind::Private]);

        let got = v.vet_name("mixed.test").await.expect("vetted");
        assert_eq!(got.addrs, vec![ip("127.0.0.1")]);
        assert_eq!(got.filtered.len(), 2);
    }

    #[tokio::test]
    async fn name_with_only_denied_answers_is_refused() {
        let (dns, v) = setup(&["127.0.0.0/8"]).await;
        dns.addrs("meta.test", &["169.254.169.254", "::ffff:127.0.0.1"], 60);
        let e = v.vet_name("meta.test").await.err();
        assert!(
            matches!(&e, Some(VetError::DeniedCidr(d))
                if matches!(d.why, RangeKind::CloudMetadata | RangeKind::Ipv4Mapped)),
            "{e:?}"
        );
        // A mapped answer names the same destination as its IPv4 address; the allowed original
        // is dialled as IPv4 and the metadata answer is dropped.
        let got = v
            .vet_transparent("meta.test", ip("127.0.0.1"))
            .await
            .expect("vetted");
        assert_eq!(got.addrs, vec![ip("127.0.0.1")]);
        assert_eq!(got.filtered.len(), 1);
        // An allowed original that the answers do not contain is a mismatch.
        let e = v.vet_transparent("meta.test", ip("127.0.0.9")).await.err();
        assert!(
            matches!(e, Some(VetError::RebindingMismatch { .. })),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn dns_failure_maps_to_dns_failed() {
        let (dns, v) = setup(&["127.0.0.0/8"]).await;
        dns.set("gone.test", Answer::NxDomain);
        let e = v.vet_name("gone.test").await.err();
        assert!(
            matches!(e, Some(VetError::Dns(ResolveError::NxDomain { .. }))),
            "{e:?}"
        );
        assert_eq!(e.map(|e| e.rejection()), Some(Rejection::DnsFailed));
        let e = v.vet_transparent("gone.test", ip("127.0.0.1")).await.err();
        assert_eq!(e.map(|e| e.rejection()), Some(Rejection::DnsFailed));
    }

    #[tokio::test]
    async fn ip_literal_names_are_vetted_without_dns() {
        let (_dns, v) = setup(&["127.0.0.1/32"]).await;
        assert_eq!(
            v.vet_name("127.0.0.1").await.map(|v| v.addrs).ok(),
            Some(vec![ip("127.0.0.1")])
        );
        assert!(matches!(
            v.vet_name("127.0.0.2").await,
            Err(VetError::DeniedCidr(_))
        ));
    }
}
