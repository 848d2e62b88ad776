//! An agent namespace linked to an upstream "internet" host namespace by a veth pair.
//!
//! Addresses live only inside these namespaces, so traffic that escapes interception still
//! cannot leave the machine: the agent namespace has no route but the veth.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{Netns, netns::ip};

/// Upstream host address (IPv4).
pub const UPSTREAM_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Agent address (IPv4).
pub const AGENT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// Upstream host address (IPv6, ULA).
pub const UPSTREAM_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);
/// Agent address (IPv6, ULA).
pub const AGENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);

/// Two namespaces and the link between them.
#[derive(Debug)]
pub struct Topology {
    pub agent: Netns,
    pub upstream: Netns,
    /// The veth end inside `agent`.
    pub agent_link: String,
    /// The veth end inside `upstream`.
    pub upstream_link: String,
}

impl Topology {
    #[must_use]
    pub fn new() -> Self {
        let agent = Netns::new("a");
        let upstream = Netns::new("u");
        let va = crate::names::unique("va");
        let vu = crate::names::unique("vu");
        ip(&[
            "link",
            "add",
            &va,
            "netns",
            agent.name(),
            "type",
            "veth",
            "peer",
            "name",
            &vu,
            "netns",
            upstream.name(),
        ]);
        agent.ip(&["addr", "add", &format!("{AGENT_V4}/16"), "dev", &va]);
        agent.ip(&[
            "addr",
            "add",
            &format!("{AGENT_V6}/64"),
            "dev",
            &va,
            "nodad",
        ]);
        agent.ip(&["link", "set", &va, "up"]);
        upstream.ip(&["addr", "add", &format!("{UPSTREAM_V4}/16"), "dev", &vu]);
        upstream.ip(&[
            "addr",
            "add",
            &format!("{UPSTREAM_V6}/64"),
            "dev",
            &vu,
            "nodad",
        ]);
        upstream.ip(&["link", "set", &vu, "up"]);
        Self {
            agent,
            upstream,
            agent_link: va,
            upstream_link: vu,
        }
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// An upstream host namespace linked to the *root* namespace (where `paddock-proxy run` and its
/// proxy live), on a /24 of 10.79.0.0/16 unique to this process and call.
#[derive(Debug)]
pub struct HostLink {
    pub upstream: Netns,
    /// The upstream host's address.
    pub host_ip: Ipv4Addr,
    /// The root namespace's end of the link.
    pub local_ip: Ipv4Addr,
}

impl HostLink {
    #[must_use]
    pub fn new() -> Self {
        let upstream = Netns::new("h");
        let n = u8::try_from((std::process::id() + crate::names::next_index() * 7) % 250)
            .unwrap_or(0)
            + 1;
        let host_ip = Ipv4Addr::new(10, 79, n, 1);
        let local_ip = Ipv4Addr::new(10, 79, n, 2);
        let vl = crate::names::unique("hl");
        let vu = crate::names::unique("hu");
        ip(&[
            "link",
            "add",
            &vl,
            "type",
            "veth",
            "peer",
            "name",
            &vu,
            "netns",
            upstream.name(),
        ]);
        ip(&["addr", "add", &format!("{local_ip}/24"), "dev", &vl]);
        ip(&["link", "set", &vl, "up"]);
        upstream.ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &vu]);
        upstream.ip(&["link", "set", &vu, "up"]);
        Self {
            upstream,
            host_ip,
            local_ip,
        }
    }
}

impl Default for HostLink {
    fn default() -> Self {
        Self::new()
    }
}
