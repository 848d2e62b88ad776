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
        Self { agent, upstream }
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}
