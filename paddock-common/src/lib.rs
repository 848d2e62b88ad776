//! Map key and value layouts shared by the eBPF programs (`paddock-ebpf`) and the userspace
//! loader (`paddock-proxy`).
//!
//! Every type is `#[repr(C)]` with explicit padding fields so that no byte is uninitialised
//! when it crosses the kernel boundary. Addresses are stored as 16 bytes in network order;
//! IPv4 addresses use the IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) so one key layout serves
//! both families and a dual-stack socket's `::ffff:` connect matches the IPv4 accept.
#![no_std]

/// `AF_INET`, as the kernel spells it.
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as the kernel spells it.
pub const AF_INET6: u16 = 10;

/// Per-cgroup flag: redirect TCP connects to the proxy listener.
pub const FLAG_INTERCEPT_TCP: u16 = 1 << 0;
/// Per-cgroup flag: refuse UDP except DNS to the configured resolver.
pub const FLAG_BLOCK_UDP: u16 = 1 << 1;
/// Per-cgroup flag: send allowed DNS datagrams to `dns_redirect_port` on the proxy address.
pub const FLAG_DNS_REDIRECT: u16 = 1 << 2;
/// Per-cgroup flag: emit aya-log debug records for decisions (off by default: it costs).
pub const FLAG_DEBUG_LOG: u16 = 1 << 3;

/// The flags a freshly attached cgroup gets unless told otherwise.
pub const DEFAULT_FLAGS: u16 = FLAG_INTERCEPT_TCP | FLAG_BLOCK_UDP;

/// Default bounds of the LRU maps (entries); overridable at load time.
pub const DEFAULT_ORIG_ENTRIES: u32 = 65_536;
/// Maximum number of agent cgroups one loaded program set serves.
pub const MAX_CGROUPS: u32 = 4_096;
/// Maximum number of bypass CIDRs across all cgroups.
pub const MAX_BYPASS: u32 = 16_384;
/// How deep below an attached cgroup a process may sit and still find its config.
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// How many TCP ports one agent cgroup may accept connections on from outside its namespace.
pub const MAX_INBOUND_PORTS: usize = 8;

/// `SOL_IP` / `SO_ORIGINAL_DST`, emulated by the `cgroup/getsockopt` program.
pub const SOL_IP: i32 = 0;
/// `SOL_IPV6`.
pub const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share the number 80.
pub const SO_ORIGINAL_DST: i32 = 80;

/// Per-cgroup configuration, keyed by cgroup id (the inode number of the cgroup directory).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CgroupConfig {
    /// Proxy listener for IPv6 destinations (network order). All zero: IPv6 connects are refused.
    pub proxy_ip6: [u8; 16],
    /// DNS resolver reachable over IPv6 (network order). All zero: none.
    pub dns_ip6: [u8; 16],
    /// Proxy listener for IPv4 and IPv4-mapped destinations (network order).
    pub proxy_ip4: [u8; 4],
    /// DNS resolver reachable over IPv4 (network order). All zero: none.
    pub dns_ip4: [u8; 4],
    /// Proxy listener port, host order.
    pub proxy_port: u16,
    /// Resolver port, host order (normally 53).
    pub dns_port: u16,
    /// With [`FLAG_DNS_REDIRECT`]: the proxy's DNS port on the proxy address, host order.
    pub dns_redirect_port: u16,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// Sockets carrying this `SO_MARK` are never redirected (the proxy's own upstream dials).
    /// Zero disables the check.
    pub bypass_mark: u32,
    /// Explicit padding; always zero.
    pub pad: u32,
    /// TCP ports (host order) the cgroup may listen on for connections arriving from outside
    /// its network namespace; 0 marks an unused slot. Every other listener stays loopback-only.
    pub inbound_ports: [u16; MAX_INBOUND_PORTS],
}

impl CgroupConfig {
    /// Whether `port` is one of the allowed inbound ports (0 never is: it marks free slots).
    #[must_use]
    #[inline]
    pub fn inbound_allowed(&self, port: u16) -> bool {
        if port == 0 {
            return false;
        }
        // Unrolled by hand: a fixed-count loop the verifier accepts on any kernel.
        let p = &self.inbound_ports;
        p[0] == port
            || p[1] == port
            || p[2] == port
            || p[3] == port
            || p[4] == port
            || p[5] == port
            || p[6] == port
            || p[7] == port
    }
}

/// The destination a socket asked for before it was redirected.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// Address, network order; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Port, host order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`]: the family the caller dialled (a dual-stack socket's
    /// `::ffff:` dial is [`AF_INET`]).
    pub family: u16,
    /// Explicit padding; always zero.
    pub pad: u32,
}

/// A connection as seen from the connecting (agent) side, qualified by its network namespace:
/// 4-tuples repeat across pods, netns cookies do not.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    /// `bpf_get_netns_cookie` of the socket's network namespace.
    pub netns_cookie: u64,
    /// Agent's local address, network order, IPv4 mapped.
    pub local: [u8; 16],
    /// Address the agent is connected to after redirection (the proxy), network order.
    pub remote: [u8; 16],
    /// Agent's local port, host order.
    pub local_port: u16,
    /// Proxy's port, host order.
    pub remote_port: u16,
    /// Explicit padding; always zero.
    pub pad: u32,
}

/// Data part of a bypass LPM-trie key: the cgroup id (big endian, always fully matched) then
/// the destination address (IPv4 mapped). The prefix length counts the 64 id bits too.
pub type BypassKeyData = [u8; 24];

/// Number of key bits taken by the cgroup id in [`BypassKeyData`].
pub const BYPASS_ID_BITS: u32 = 64;

/// Build the IPv4-mapped form of an IPv4 address.
#[must_use]
pub const fn mapped_v4(ip4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ip4[0], ip4[1], ip4[2], ip4[3],
    ]
}

/// Whether a 16-byte address is IPv4-mapped.
#[must_use]
pub const fn is_mapped_v4(a: &[u8; 16]) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// Bypass key data for a cgroup and an address.
#[must_use]
pub const fn bypass_key_data(cgroup_id: u64, addr: &[u8; 16]) -> BypassKeyData {
    let id = cgroup_id.to_be_bytes();
    let mut out = [0u8; 24];
    let mut i = 0;
    while i < 8 {
        out[i] = id[i];
        i += 1;
    }
    while i < 24 {
        out[i] = addr[i - 8];
        i += 1;
    }
    out
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are repr(C), Copy, contain only integers and byte arrays, and carry
    // explicit padding fields, so every bit pattern is valid and no byte is uninitialised.
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::CgroupConfig {}
    // SAFETY: as above.
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::SockKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(
            core::mem::size_of::<CgroupConfig>(),
            16 + 16 + 4 + 4 + 2 * 4 + 4 + 4 + 2 * MAX_INBOUND_PORTS
        );
        // A multiple of the alignment: no trailing padding either.
        assert_eq!(
            core::mem::size_of::<CgroupConfig>() % core::mem::align_of::<CgroupConfig>(),
            0
        );
        assert_eq!(core::mem::size_of::<OrigDst>(), 24);
        assert_eq!(core::mem::size_of::<SockKey>(), 48);
    }

    #[test]
    fn inbound_ports_match_only_listed_nonzero_ports() {
        let mut c = CgroupConfig::default();
        assert!(!c.inbound_allowed(0), "free slots must not allow port 0");
        assert!(!c.inbound_allowed(8080));
        c.inbound_ports[0] = 8080;
        c.inbound_ports[7] = 9090;
        assert!(c.inbound_allowed(8080));
        assert!(c.inbound_allowed(9090));
        assert!(!c.inbound_allowed(0));
        assert!(!c.inbound_allowed(8081));
    }

    #[test]
    fn mapped_roundtrip() {
        let m = mapped_v4([10, 1, 2, 3]);
        assert!(is_mapped_v4(&m));
        assert_eq!(&m[12..], &[10, 1, 2, 3]);
        let mut v6 = [0u8; 16];
        v6[0] = 0xfd;
        assert!(!is_mapped_v4(&v6));
        // ::1 is not mapped
        let mut lo = [0u8; 16];
        lo[15] = 1;
        assert!(!is_mapped_v4(&lo));
    }

    #[test]
    fn bypass_key_puts_id_first_big_endian() {
        let k = bypass_key_data(0x0102_0304_0506_0708, &mapped_v4([192, 0, 2, 1]));
        assert_eq!(&k[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&k[8..20], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&k[20..], &[192, 0, 2, 1]);
    }
}
