//! What an agent cgroup is configured with, validated and encoded for the kernel maps.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use paddock_common::{
    BYPASS_ID_BITS, BypassKeyData, CgroupConfig, FLAG_BLOCK_UDP, FLAG_DEBUG_LOG, FLAG_DNS_REDIRECT,
    FLAG_INTERCEPT_TCP, MAX_INBOUND_PORTS, bypass_key_data, mapped_v4,
};
use serde::Deserialize;

/// Interception settings for one agent cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Proxy listener for IPv4 (and IPv4-mapped) destinations.
    #[serde(default = "default_proxy_v4")]
    pub proxy_v4: Ipv4Addr,
    /// Proxy listener for IPv6 destinations; without one, IPv6 connects are refused.
    #[serde(default)]
    pub proxy_v6: Option<Ipv6Addr>,
    /// Port of the proxy listener (the same on both families).
    pub proxy_port: u16,
    /// Resolvers the agent may send DNS to (at most one per family, same port).
    #[serde(default)]
    pub dns: Vec<SocketAddr>,
    /// Send allowed DNS to this port on the proxy address instead.
    #[serde(default)]
    pub dns_redirect_port: Option<u16>,
    /// Destinations never redirected (for this cgroup).
    #[serde(default)]
    pub bypass: Vec<IpNet>,
    /// Sockets with this `SO_MARK` are never redirected (the proxy's own dials).
    #[serde(default)]
    pub bypass_mark: Option<u32>,
    /// Refuse UDP except DNS (default true; turning it off opens QUIC and other exits).
    #[serde(default = "yes")]
    pub block_udp: bool,
    /// Emit per-decision eBPF debug logs (costly; off by default).
    #[serde(default)]
    pub debug_log: bool,
    /// TCP ports the agent may accept connections on from outside its network namespace (at
    /// most [`MAX_INBOUND_PORTS`], none 0). Every other listener is loopback-only: wildcard
    /// binds become loopback binds, other outside addresses are refused, and packets from
    /// outside for any other listener are dropped. UDP is never published (UDP egress is DNS
    /// only, so a UDP service could not answer).
    #[serde(default)]
    pub inbound_ports: Vec<u16>,
}

fn default_proxy_v4() -> Ipv4Addr {
    Ipv4Addr::LOCALHOST
}

fn yes() -> bool {
    true
}

/// Invalid interception settings.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("proxy_port must not be 0")]
    NoProxyPort,
    #[error("dns: at most one IPv4 and one IPv6 resolver (got {0:?})")]
    TooManyResolvers(Vec<SocketAddr>),
    #[error("dns: all resolvers must use the same port (got {0:?})")]
    MixedDnsPorts(Vec<SocketAddr>),
    #[error("dns_redirect_port needs at least one dns resolver")]
    RedirectWithoutDns,
    #[error("bypass_mark must not be 0 (0 means unmarked)")]
    ZeroMark,
    #[error("inbound_ports: port 0 cannot be published")]
    ZeroInboundPort,
    #[error("inbound_ports: at most {max} distinct ports (got {got})", max = MAX_INBOUND_PORTS)]
    TooManyInboundPorts { got: usize },
}

/// Check a list of inbound ports (duplicates count once).
pub fn validate_inbound_ports(ports: &[u16]) -> Result<(), ConfigError> {
    if ports.contains(&0) {
        return Err(ConfigError::ZeroInboundPort);
    }
    let distinct = distinct_ports(ports);
    if distinct.len() > MAX_INBOUND_PORTS {
        return Err(ConfigError::TooManyInboundPorts {
            got: distinct.len(),
        });
    }
    Ok(())
}

fn distinct_ports(ports: &[u16]) -> Vec<u16> {
    let mut v = ports.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

impl AgentConfig {
    /// A config that sends everything to a proxy on `127.0.0.1:port` (and `[::1]:port`).
    #[must_use]
    pub fn loopback(port: u16) -> Self {
        Self {
            proxy_v4: Ipv4Addr::LOCALHOST,
            proxy_v6: Some(Ipv6Addr::LOCALHOST),
            proxy_port: port,
            dns: Vec::new(),
            dns_redirect_port: None,
            bypass: Vec::new(),
            bypass_mark: None,
            block_udp: true,
            debug_log: false,
            inbound_ports: Vec::new(),
        }
    }

    /// Check the settings make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.proxy_port == 0 {
            return Err(ConfigError::NoProxyPort);
        }
        let v4 = self.dns.iter().filter(|d| d.is_ipv4()).count();
        let v6 = self.dns.len() - v4;
        if v4 > 1 || v6 > 1 {
            return Err(ConfigError::TooManyResolvers(self.dns.clone()));
        }
        if self.dns.windows(2).any(|w| w[0].port() != w[1].port()) {
            return Err(ConfigError::MixedDnsPorts(self.dns.clone()));
        }
        if self.dns_redirect_port.is_some() && self.dns.is_empty() {
            return Err(ConfigError::RedirectWithoutDns);
        }
        if self.bypass_mark == Some(0) {
            return Err(ConfigError::ZeroMark);
        }
        validate_inbound_ports(&self.inbound_ports)
    }

    /// The map value for this cgroup.
    pub fn encode(&self) -> Result<CgroupConfig, ConfigError> {
        self.validate()?;
        let mut flags = FLAG_INTERCEPT_TCP;
        if self.block_udp {
            flags |= FLAG_BLOCK_UDP;
        }
        if self.dns_redirect_port.is_some() {
            flags |= FLAG_DNS_REDIRECT;
        }
        if self.debug_log {
            flags |= FLAG_DEBUG_LOG;
        }
        let mut out = CgroupConfig {
            proxy_ip6: self.proxy_v6.map_or([0; 16], |a| a.octets()),
            proxy_ip4: self.proxy_v4.octets(),
            proxy_port: self.proxy_port,
            dns_redirect_port: self.dns_redirect_port.unwrap_or(0),
            flags,
            bypass_mark: self.bypass_mark.unwrap_or(0),
            ..CgroupConfig::default()
        };
        for (slot, port) in out
            .inbound_ports
            .iter_mut()
            .zip(distinct_ports(&self.inbound_ports))
        {
            *slot = port;
        }
        for d in &self.dns {
            out.dns_port = d.port();
            match d.ip() {
                IpAddr::V4(a) => out.dns_ip4 = a.octets(),
                IpAddr::V6(a) => out.dns_ip6 = a.octets(),
            }
        }
        Ok(out)
    }
}

/// LPM-trie keys (prefix length, data) for a cgroup's bypass list.
#[must_use]
pub fn bypass_keys(cgroup_id: u64, nets: &[IpNet]) -> Vec<(u32, BypassKeyData)> {
    nets.iter()
        .map(|net| {
            let (addr, bits) = match net.trunc() {
                IpNet::V4(n) => (mapped_v4(n.addr().octets()), 96 + u32::from(n.prefix_len())),
                IpNet::V6(n) => (n.addr().octets(), u32::from(n.prefix_len())),
            };
            (BYPASS_ID_BITS + bits, bypass_key_data(cgroup_id, &addr))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_config_encodes_addresses_in_network_order() {
        let c = AgentConfig::loopback(15001).encode().expect("valid");
        assert_eq!(c.proxy_ip4, [127, 0, 0, 1]);
        assert_eq!(c.proxy_ip6[15], 1);
        assert_eq!(c.proxy_port, 15001);
        assert_eq!(c.flags, FLAG_INTERCEPT_TCP | FLAG_BLOCK_UDP);
        assert_eq!(c.pad, 0);
        assert_eq!(
            c.inbound_ports, [0; MAX_INBOUND_PORTS],
            "nothing published by default"
        );
    }

    #[test]
    fn inbound_ports_are_encoded_once_each_and_validated() {
        let mut a = AgentConfig::loopback(15001);
        a.inbound_ports = vec![9090, 8080, 9090];
        let c = a.encode().expect("valid");
        assert_eq!(c.inbound_ports, [8080, 9090, 0, 0, 0, 0, 0, 0]);
        assert!(c.inbound_allowed(8080) && c.inbound_allowed(9090));
        assert!(!c.inbound_allowed(0));

        a.inbound_ports = (1..=8).collect();
        assert_eq!(a.encode().expect("eight fit").inbound_ports[7], 8);
        a.inbound_ports.push(9);
        assert_eq!(
            a.validate(),
            Err(ConfigError::TooManyInboundPorts { got: 9 })
        );
        assert!(a.encode().is_err());
        a.inbound_ports = vec![80, 0];
        assert_eq!(a.validate(), Err(ConfigError::ZeroInboundPort));
    }

    #[test]
    fn dns_and_redirect_set_fields_and_flags() {
        let mut a = AgentConfig::loopback(1);
        a.dns = vec![
            "10.0.0.53:53".parse().expect("addr"),
            "[fd00::53]:53".parse().expect("addr"),
        ];
        a.dns_redirect_port = Some(5353);
        let c = a.encode().expect("valid");
        assert_eq!(c.dns_ip4, [10, 0, 0, 53]);
        assert_eq!(c.dns_ip6[0], 0xfd);
        assert_eq!(c.dns_port, 53);
        assert_eq!(c.dns_redirect_port, 5353);
        assert_ne!(c.flags & FLAG_DNS_REDIRECT, 0);
    }

    #[test]
    fn invalid_combinations_are_refused() {
        let mut a = AgentConfig::loopback(0);
        assert_eq!(a.validate(), Err(ConfigError::NoProxyPort));
        a.proxy_port = 1;
        a.dns_redirect_port = Some(5353);
        assert_eq!(a.validate(), Err(ConfigError::RedirectWithoutDns));
        a.dns = vec![
            "1.1.1.1:53".parse().expect("addr"),
            "8.8.8.8:53".parse().expect("addr"),
        ];
        assert!(matches!(
            a.validate(),
            Err(ConfigError::TooManyResolvers(_))
        ));
        a.dns = vec![
            "1.1.1.1:53".parse().expect("addr"),
            "[::1]:5353".parse().expect("addr"),
        ];
        assert!(matches!(a.validate(), Err(ConfigError::MixedDnsPorts(_))));
        a.dns.pop();
        a.bypass_mark = Some(0);
        assert_eq!(a.validate(), Err(ConfigError::ZeroMark));
    }

    #[test]
    fn bypass_keys_map_v4_into_v6_space() {
        let keys = bypass_keys(
            7,
            &[
                "10.1.0.0/16".parse().expect("net"),
                "fd00::/8".parse().expect("net"),
            ],
        );
        assert_eq!(keys[0].0, 64 + 96 + 16);
        assert_eq!(&keys[0].1[..8], &7u64.to_be_bytes());
        assert_eq!(&keys[0].1[18..22], &[0xff, 0xff, 10, 1]);
        assert_eq!(keys[1].0, 64 + 8);
        assert_eq!(keys[1].1[8], 0xfd);
    }

    #[test]
    fn host_bits_are_truncated() {
        let keys = bypass_keys(1, &["10.1.2.3/8".parse().expect("net")]);
        assert_eq!(&keys[0].1[20..24], &[10, 0, 0, 0]);
    }

    #[test]
    fn parses_from_toml_and_rejects_unknown_fields() {
        let a: AgentConfig = toml::from_str(
            "proxy_port = 15001\ndns = [\"10.0.0.53:53\"]\nbypass = [\"192.168.0.0/16\"]\n\
             inbound_ports = [8080]\n",
        )
        .expect("parse");
        assert_eq!(a.inbound_ports, vec![8080]);
        assert_eq!(a.proxy_v4, Ipv4Addr::LOCALHOST);
        assert!(a.block_udp);
        assert_eq!(a.bypass.len(), 1);
        assert!(toml::from_str::<AgentConfig>("proxy_port = 1\nnope = 2\n").is_err());
    }
}
