//! The denied-CIDR set: every address the proxy would dial is classified here first.
//!
//! # Decision rule
//!
//! The set holds deny ranges (the defaults below plus configured ones) and configured allow
//! ranges. For an address, the **most specific** (longest-prefix) range containing it decides;
//! on a tie, deny wins. So allowing `127.0.0.1/32` in a test opens that one address inside the
//! denied `127.0.0.0/8`, while denying `10.1.0.0/16` inside an allowed `10.0.0.0/8` still denies.
//! An address in no range is allowed.
//!
//! # Addresses that embed IPv4
//!
//! IPv4-mapped (`::ffff:0:0/96`), IPv4-compatible (`::/96`), NAT64 (`64:ff9b::/96`,
//! `64:ff9b:1::/48`), 6to4 (`2002::/16`) and Teredo (`2001::/32`) addresses are denied as ranges
//! by default. Independently of that, the embedded IPv4 address is extracted and classified with
//! the IPv4 rules: if it is denied, the address is denied and the reason names the embedding and
//! the IPv4 range. Allowing a NAT64 prefix therefore never lets `64:ff9b::a9fe:a9fe` reach
//! 169.254.169.254. For `64:ff9b:1::/48` the common /96 layout (last 32 bits) is always
//! extracted, and the RFC 6052 /48 layout too when the address has that layout's shape (zero
//! `u` octet and suffix); both must pass, so a deployment using the /48 layout cannot be allowed
//! (it fails closed). Teredo yields both the server and the (de-obfuscated) client address.
//! `::` and `::1` are the unspecified and loopback addresses, not IPv4-compatible ones.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::Deserialize;

/// What kind of range an address fell into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RangeKind {
    Loopback,
    Private,
    LinkLocal,
    CloudMetadata,
    SharedCgnat,
    UniqueLocal,
    SiteLocal,
    Multicast,
    Unspecified,
    Broadcast,
    Reserved,
    ProtocolAssignments,
    Documentation,
    Benchmarking,
    Discard,
    Ipv4Mapped,
    Ipv4Compatible,
    Nat64,
    SixToFour,
    Teredo,
    /// A range added by configuration.
    Configured,
}

impl RangeKind {
    /// Stable label for logs and audit records.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            RangeKind::Loopback => "loopback",
            RangeKind::Private => "private",
            RangeKind::LinkLocal => "link_local",
            RangeKind::CloudMetadata => "cloud_metadata",
            RangeKind::SharedCgnat => "shared_cgnat",
            RangeKind::UniqueLocal => "unique_local",
            RangeKind::SiteLocal => "site_local",
            RangeKind::Multicast => "multicast",
            RangeKind::Unspecified => "unspecified",
            RangeKind::Broadcast => "broadcast",
            RangeKind::Reserved => "reserved",
            RangeKind::ProtocolAssignments => "protocol_assignments",
            RangeKind::Documentation => "documentation",
            RangeKind::Benchmarking => "benchmarking",
            RangeKind::Discard => "discard",
            RangeKind::Ipv4Mapped => "ipv4_mapped",
            RangeKind::Ipv4Compatible => "ipv4_compatible",
            RangeKind::Nat64 => "nat64",
            RangeKind::SixToFour => "6to4",
            RangeKind::Teredo => "teredo",
            RangeKind::Configured => "configured",
        }
    }
}

impl fmt::Display for RangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an IPv6 address carries an IPv4 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Embedding {
    Ipv4Mapped,
    Ipv4Compatible,
    Nat64,
    /// `64:ff9b:1::/48` with the RFC 6052 /48 layout.
    Nat64Local48,
    /// `64:ff9b:1::/48` used with a /96 prefix (address in the last 32 bits).
    Nat64Local96,
    SixToFour,
    TeredoServer,
    TeredoClient,
}

impl fmt::Display for Embedding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Embedding::Ipv4Mapped => "IPv4-mapped",
            Embedding::Ipv4Compatible => "IPv4-compatible",
            Embedding::Nat64 => "NAT64",
            Embedding::Nat64Local48 => "local NAT64 (/48 layout)",
            Embedding::Nat64Local96 => "local NAT64 (/96 layout)",
            Embedding::SixToFour => "6to4",
            Embedding::TeredoServer => "Teredo server",
            Embedding::TeredoClient => "Teredo client",
        })
    }
}

/// An address the proxy must not dial.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DeniedCidr {
    /// The address as it would have been dialled.
    pub addr: IpAddr,
    /// The deciding range (for an embedded address: the IPv4 range).
    pub range: IpNet,
    /// What the deciding range is.
    pub why: RangeKind,
    /// Set when the embedded IPv4 address, not the IPv6 address itself, was denied.
    pub embedded: Option<(Embedding, Ipv4Addr)>,
}

impl fmt::Display for DeniedCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.embedded {
            Some((form, v4)) => write!(
                f,
                "address {} denied: its {form} IPv4 address {v4} is in {} ({})",
                self.addr, self.range, self.why
            ),
            None => write!(
                f,
                "address {} denied: in {} ({})",
                self.addr, self.range, self.why
            ),
        }
    }
}

/// Configuration additions to the default set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CidrConfig {
    /// Extra ranges to deny.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Ranges to allow even though a default (or less specific configured) range denies them.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// A configured range that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{list}[{index}] = {value:?} is not a CIDR range or IP address")]
pub struct CidrConfigError {
    pub list: &'static str,
    pub index: usize,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Deny,
    Allow,
}

#[derive(Debug, Clone)]
struct Entry {
    net: IpNet,
    action: Action,
    why: RangeKind,
}

impl Entry {
    /// Tie-break rank among ranges of equal prefix length (higher wins).
    fn rank(&self) -> u8 {
        match (self.action, self.why) {
            (Action::Deny, RangeKind::Configured) => 2,
            (Action::Allow, _) => 1,
            (Action::Deny, _) => 0,
        }
    }
}

/// The classification set. Cheap to share behind an `Arc`.
#[derive(Debug, Clone)]
pub struct CidrPolicy {
    entries: Vec<Entry>,
}

const DEFAULT_DENY: &[(&str, RangeKind)] = &[
    ("0.0.0.0/8", RangeKind::Unspecified),
    ("10.0.0.0/8", RangeKind::Private),
    ("100.64.0.0/10", RangeKind::SharedCgnat),
    ("127.0.0.0/8", RangeKind::Loopback),
    ("169.254.0.0/16", RangeKind::LinkLocal),
    ("169.254.169.254/32", RangeKind::CloudMetadata),
    ("172.16.0.0/12", RangeKind::Private),
    ("192.0.0.0/24", RangeKind::ProtocolAssignments),
    ("192.0.2.0/24", RangeKind::Documentation),
    ("192.168.0.0/16", RangeKind::Private),
    ("198.18.0.0/15", RangeKind::Benchmarking),
    ("198.51.100.0/24", RangeKind::Documentation),
    ("203.0.113.0/24", RangeKind::Documentation),
    ("224.0.0.0/4", RangeKind::Multicast),
    ("240.0.0.0/4", RangeKind::Reserved),
    ("255.255.255.255/32", RangeKind::Broadcast),
    ("::/128", RangeKind::Unspecified),
    ("::1/128", RangeKind::Loopback),
    ("::/96", RangeKind::Ipv4Compatible),
    ("::ffff:0:0/96", RangeKind::Ipv4Mapped),
    ("64:ff9b::/96", RangeKind::Nat64),
    ("64:ff9b:1::/48", RangeKind::Nat64),
    ("100::/64", RangeKind::Discard),
    ("2001::/32", RangeKind::Teredo),
    ("2001:2::/48", RangeKind::Benchmarking),
    ("2001:db8::/32", RangeKind::Documentation),
    ("2002::/16", RangeKind::SixToFour),
    ("fc00::/7", RangeKind::UniqueLocal),
    ("fd00:ec2::254/128", RangeKind::CloudMetadata),
    ("fe80::/10", RangeKind::LinkLocal),
    ("fec0::/10", RangeKind::SiteLocal),
    ("ff00::/8", RangeKind::Multicast),
];

impl Default for CidrPolicy {
    fn default() -> Self {
        Self::with_defaults()
    }
}

impl CidrPolicy {
    /// The default deny set, nothing allowed explicitly.
    #[must_use]
    pub fn with_defaults() -> Self {
        let entries = DEFAULT_DENY
            .iter()
            .filter_map(|(net, why)| {
                let parsed = net.parse::<IpNet>();
                debug_assert!(parsed.is_ok(), "bad built-in range {net}");
                parsed.ok().map(|net| Entry {
                    net,
                    action: Action::Deny,
                    why: *why,
                })
            })
            .collect();
        Self { entries }
    }

    /// An empty set that denies nothing; only for composing with [`Self::deny`]/[`Self::allow`].
    #[must_use]
    pub fn empty() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    /// The defaults plus the configured additions.
    pub fn from_config(cfg: &CidrConfig) -> Result<Self, CidrConfigError> {
        let mut set = Self::with_defaults();
        for (list, values, action) in [
            ("deny", &cfg.deny, Action::Deny),
            ("allow", &cfg.allow, Action::Allow),
        ] {
            for (index, value) in values.iter().enumerate() {
                let net = parse_range(value).ok_or_else(|| CidrConfigError {
                    list,
                    index,
                    value: value.clone(),
                })?;
                set.push(net, action);
            }
        }
        Ok(set)
    }

    /// Adds a denied range.
    #[must_use]
    pub fn deny(mut self, net: IpNet) -> Self {
        self.push(net, Action::Deny);
        self
    }

    /// Adds an explicitly allowed range.
    #[must_use]
    pub fn allow(mut self, net: IpNet) -> Self {
        self.push(net, Action::Allow);
        self
    }

    fn push(&mut self, net: IpNet, action: Action) {
        self.entries.push(Entry {
            net: net.trunc(),
            action,
            why: RangeKind::Configured,
        });
    }

    /// Classifies `addr`: `Ok(())` if it may be dialled.
    pub fn check(&self, addr: IpAddr) -> Result<(), DeniedCidr> {
        if let IpAddr::V6(v6) = addr {
            for (form, v4) in embedded_ipv4(v6) {
                if let Some(entry) = self.deciding(IpAddr::V4(v4))
                    && entry.action == Action::Deny
                {
                    return Err(DeniedCidr {
                        addr,
                        range: entry.net,
                        why: entry.why,
                        embedded: Some((form, v4)),
                    });
                }
            }
        }
        match self.deciding(addr) {
            Some(entry) if entry.action == Action::Deny => Err(DeniedCidr {
                addr,
                range: entry.net,
                why: entry.why,
                embedded: None,
            }),
            _ => Ok(()),
        }
    }

    /// The longest-prefix entry containing `addr`, ties broken by [`Entry::rank`].
    fn deciding(&self, addr: IpAddr) -> Option<&Entry> {
        self.entries
            .iter()
            .filter(|e| e.net.contains(&addr))
            .max_by_key(|e| (e.net.prefix_len(), e.rank()))
    }
}

fn parse_range(value: &str) -> Option<IpNet> {
    let value = value.trim();
    value
        .parse::<IpNet>()
        .ok()
        .or_else(|| value.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

/// Every IPv4 address `v6` embeds, with the form it is embedded in.
#[must_use]
pub fn embedded_ipv4(v6: Ipv6Addr) -> Vec<(Embedding, Ipv4Addr)> {
    let s = v6.segments();
    let o = v6.octets();
    let last32 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => vec![(Embedding::Ipv4Mapped, last32)],
        // `::` and `::1` are themselves, not IPv4-compatible 0.0.0.0 and 0.0.0.1.
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => Vec::new(),
        [0, 0, 0, 0, 0, 0, _, _] => vec![(Embedding::Ipv4Compatible, last32)],
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => vec![(Embedding::Nat64, last32)],
        [0x64, 0xff9b, 1, ..] if o[8] == 0 && o[11..].iter().all(|b| *b == 0) => vec![
            (
                Embedding::Nat64Local48,
                Ipv4Addr::new(o[6], o[7], o[9], o[10]),
            ),
            (Embedding::Nat64Local96, last32),
        ],
        [0x64, 0xff9b, 1, ..] => vec![(Embedding::Nat64Local96, last32)],
        [0x2002, ..] => vec![(Embedding::SixToFour, Ipv4Addr::new(o[2], o[3], o[4], o[5]))],
        [0x2001, 0, ..] => vec![
            (
                Embedding::TeredoServer,
                Ipv4Addr::new(o[4], o[5], o[6], o[7]),
            ),
            (
                Embedding::TeredoClient,
                Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]),
            ),
        ],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// (address, expected: None = allowed, Some((range, why, embedded form)))
    type Row = (
        &'static str,
        Option<(&'static str, RangeKind, Option<Embedding>)>,
    );

    #[test]
    #[expect(clippy::too_many_lines, reason = "one table row per address form")]
    fn default_classification_table() {
        use Embedding as E;
        use RangeKind as K;
        let table: &[Row] = &[
            // public addresses pass
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("2606:4700:4700::1111", None),
            ("2a00:1450:4001:80b::200e", None),
            // IPv4 specials
            ("0.0.0.0", Some(("0.0.0.0/8", K::Unspecified, None))),
            ("0.1.2.3", Some(("0.0.0.0/8", K::Unspecified, None))),
            ("127.0.0.1", Some(("127.0.0.0/8", K::Loopback, None))),
            ("127.255.255.254", Some(("127.0.0.0/8", K::Loopback, None))),
            ("10.1.2.3", Some(("10.0.0.0/8", K::Private, None))),
            ("172.16.0.1", Some(("172.16.0.0/12", K::Private, None))),
            ("172.31.255.255", Some(("172.16.0.0/12", K::Private, None))),
            ("172.32.0.1", None),
            ("192.168.1.1", Some(("192.168.0.0/16", K::Private, None))),
            ("169.254.1.1", Some(("169.254.0.0/16", K::LinkLocal, None))),
            (
                "169.254.169.254",
                Some(("169.254.169.254/32", K::CloudMetadata, None)),
            ),
            ("100.64.0.1", Some(("100.64.0.0/10", K::SharedCgnat, None))),
            (
                "100.127.255.255",
                Some(("100.64.0.0/10", K::SharedCgnat, None)),
            ),
            ("100.128.0.1", None),
            ("224.0.0.1", Some(("224.0.0.0/4", K::Multicast, None))),
            ("239.255.255.250", Some(("224.0.0.0/4", K::Multicast, None))),
            ("240.0.0.1", Some(("240.0.0.0/4", K::Reserved, None))),
            (
                "255.255.255.255",
                Some(("255.255.255.255/32", K::Broadcast, None)),
            ),
            (
                "192.0.0.9",
                Some(("192.0.0.0/24", K::ProtocolAssignments, None)),
            ),
            ("192.0.2.1", Some(("192.0.2.0/24", K::Documentation, None))),
            (
                "198.51.100.7",
                Some(("198.51.100.0/24", K::Documentation, None)),
            ),
            (
                "203.0.113.9",
                Some(("203.0.113.0/24", K::Documentation, None)),
            ),
            ("198.18.0.1", Some(("198.18.0.0/15", K::Benchmarking, None))),
            (
                "198.19.255.255",
                Some(("198.18.0.0/15", K::Benchmarking, None)),
            ),
            // IPv6 specials
            ("::", Some(("::/128", K::Unspecified, None))),
            ("::1", Some(("::1/128", K::Loopback, None))),
            ("fe80::1", Some(("fe80::/10", K::LinkLocal, None))),
            ("febf:ffff::1", Some(("fe80::/10", K::LinkLocal, None))),
            ("fc00::1", Some(("fc00::/7", K::UniqueLocal, None))),
            ("fd12:3456::1", Some(("fc00::/7", K::UniqueLocal, None))),
            (
                "fd00:ec2::254",
                Some(("fd00:ec2::254/128", K::CloudMetadata, None)),
            ),
            ("ff02::1", Some(("ff00::/8", K::Multicast, None))),
            (
                "2001:db8::1",
                Some(("2001:db8::/32", K::Documentation, None)),
            ),
            ("100::1", Some(("100::/64", K::Discard, None))),
            // IPv4-mapped: the embedded address is reported when it is itself denied
            (
                "::ffff:127.0.0.1",
                Some(("127.0.0.0/8", K::Loopback, Some(E::Ipv4Mapped))),
            ),
            (
                "::ffff:7f00:1",
                Some(("127.0.0.0/8", K::Loopback, Some(E::Ipv4Mapped))),
            ),
            (
                "::ffff:169.254.169.254",
                Some(("169.254.169.254/32", K::CloudMetadata, Some(E::Ipv4Mapped))),
            ),
            (
                "::ffff:8.8.8.8",
                Some(("::ffff:0:0/96", K::Ipv4Mapped, None)),
            ),
            // IPv4-compatible (deprecated)
            (
                "::10.0.0.1",
                Some(("10.0.0.0/8", K::Private, Some(E::Ipv4Compatible))),
            ),
            ("::8.8.8.8", Some(("::/96", K::Ipv4Compatible, None))),
            (
                "::2",
                Some(("0.0.0.0/8", K::Unspecified, Some(E::Ipv4Compatible))),
            ),
            // NAT64
            (
                "64:ff9b::a9fe:a9fe",
                Some(("169.254.169.254/32", K::CloudMetadata, Some(E::Nat64))),
            ),
            (
                "64:ff9b::192.168.0.1",
                Some(("192.168.0.0/16", K::Private, Some(E::Nat64))),
            ),
            ("64:ff9b::8.8.8.8", Some(("64:ff9b::/96", K::Nat64, None))),
            (
                "64:ff9b:1::7f00:1",
                Some(("127.0.0.0/8", K::Loopback, Some(E::Nat64Local96))),
            ),
            // /48 layout: 10.0.0.1 in bits 48-63 and 72-87.
            (
                "64:ff9b:1:a00:0:100::",
                Some(("10.0.0.0/8", K::Private, Some(E::Nat64Local48))),
            ),
            // ... and the /96 reading of that shape is 0.0.0.0, so it fails closed.
            (
                "64:ff9b:1:808:8:800::",
                Some(("0.0.0.0/8", K::Unspecified, Some(E::Nat64Local96))),
            ),
            (
                "64:ff9b:1:0:1::808:808",
                Some(("64:ff9b:1::/48", K::Nat64, None)),
            ),
            // 6to4
            (
                "2002:a9fe:a9fe::1",
                Some(("169.254.169.254/32", K::CloudMetadata, Some(E::SixToFour))),
            ),
            (
                "2002:7f00:1::",
                Some(("127.0.0.0/8", K::Loopback, Some(E::SixToFour))),
            ),
            ("2002:808:808::1", Some(("2002::/16", K::SixToFour, None))),
            // Teredo: server 65.54.227.120 (public), client obfuscated
            // (RFC 4380's example: client 192.0.2.45, a documentation address)
            (
                "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                Some(("192.0.2.0/24", K::Documentation, Some(E::TeredoClient))),
            ),
            // public server and client 8.8.8.8: only the Teredo range itself denies
            (
                "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
                Some(("2001::/32", K::Teredo, None)),
            ),
            // client !(0x80ffff fe) = 127.0.0.1
            (
                "2001:0:4136:e378:8000:63bf:80ff:fffe",
                Some(("127.0.0.0/8", K::Loopback, Some(E::TeredoClient))),
            ),
            (
                "2001:0:a00:1::1",
                Some(("10.0.0.0/8", K::Private, Some(E::TeredoServer))),
            ),
            // neighbours of the embedding ranges are ordinary addresses
            ("2001:1::1", None),
            ("2003::1", None),
            ("64:ff9c::1", None),
            ("::1:0:0:1", None),
        ];
        let set = CidrPolicy::with_defaults();
        for (addr, want) in table {
            let got = set.check(ip(addr));
            match (want, got) {
                (None, Ok(())) => {}
                (None, Err(e)) => panic!("{addr}: expected allowed, got {e}"),
                (Some(_), Ok(())) => panic!("{addr}: expected denied, got allowed"),
                (Some((range, why, form)), Err(e)) => {
                    assert_eq!(e.addr, ip(addr), "{addr}");
                    assert_eq!(e.range, net(range), "{addr}: {e}");
                    assert_eq!(e.why, *why, "{addr}: {e}");
                    assert_eq!(e.embedded.map(|(f, _)| f), *form, "{addr}: {e}");
                }
            }
        }
    }

    #[test]
    fn embedded_extraction_reports_the_address() {
        let e = CidrPolicy::with_defaults()
            .check(ip("64:ff9b::a9fe:a9fe"))
            .err();
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some(
                "address 64:ff9b::a9fe:a9fe denied: its NAT64 IPv4 address 169.254.169.254 is in \
                 169.254.169.254/32 (cloud_metadata)"
            )
        );
        let teredo = embedded_ipv4(
            "2001:0:4136:e378:8000:63bf:3fff:fdd2"
                .parse()
                .unwrap_or(Ipv6Addr::UNSPECIFIED),
        );
        assert_eq!(
            teredo,
            vec![
                (Embedding::TeredoServer, Ipv4Addr::new(65, 54, 227, 120)),
                (Embedding::TeredoClient, Ipv4Addr::new(192, 0, 2, 45)),
            ]
        );
    }

    #[test]
    fn longest_prefix_decides() {
        let set = CidrPolicy::with_defaults()
            .allow(net("127.0.0.1/32"))
            .allow(net("::1/128"))
            .allow(net("10.0.0.0/8"))
            .deny(net("10.1.0.0/16"))
            .deny(net("93.184.216.0/24"))
            .allow(net("64:ff9b::/96"));
        assert_eq!(set.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(set.check(ip("::1")), Ok(()));
        assert!(set.check(ip("127.0.0.2")).is_err());
        assert_eq!(set.check(ip("10.2.0.1")), Ok(()));
        let e = set.check(ip("10.1.0.1")).err();
        assert_eq!(
            e.map(|e| (e.range, e.why)),
            Some((net("10.1.0.0/16"), RangeKind::Configured))
        );
        assert!(set.check(ip("93.184.216.34")).is_err());
        // The NAT64 prefix is allowed, but what it embeds is still classified.
        assert_eq!(set.check(ip("64:ff9b::8.8.8.8")), Ok(()));
        let e = set.check(ip("64:ff9b::a9fe:a9fe")).err();
        assert_eq!(e.map(|e| e.why), Some(RangeKind::CloudMetadata));
        // An allowed embedded IPv4 does not open the embedding range itself.
        let e = set.check(ip("::ffff:127.0.0.1")).err();
        assert_eq!(
            e.map(|e| (e.why, e.embedded)),
            Some((RangeKind::Ipv4Mapped, None))
        );
        // Same prefix length: configured deny beats configured allow beats built-in deny.
        let tie = CidrPolicy::empty().allow(net("198.51.100.0/24"));
        assert!(tie.clone().check(ip("198.51.100.1")).is_ok());
        assert!(
            tie.deny(net("198.51.100.0/24"))
                .check(ip("198.51.100.1"))
                .is_err()
        );
    }

    #[test]
    fn config_parsing() {
        let cfg: CidrConfig = toml::from_str(
            "deny = [\"93.184.216.0/24\", \"2606:2800::1\"]\nallow = [\"127.0.0.1\", \"::1/128\"]",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let set = CidrPolicy::from_config(&cfg).unwrap_or_else(|e| panic!("{e}"));
        assert!(set.check(ip("127.0.0.1")).is_ok());
        assert!(set.check(ip("::1")).is_ok());
        assert!(set.check(ip("93.184.216.1")).is_err());
        assert!(set.check(ip("2606:2800::1")).is_err());
        assert!(set.check(ip("2606:2800::2")).is_ok());

        let bad = CidrConfig {
            deny: vec![],
            allow: vec!["127.0.0.1".into(), "10.0.0.0/33".into()],
        };
        let err = CidrPolicy::from_config(&bad).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("allow[1] = \"10.0.0.0/33\" is not a CIDR range or IP address")
        );
    }
}
