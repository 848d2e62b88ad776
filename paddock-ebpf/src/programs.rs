//! The programs and maps.
//!
//! * `connect4`/`connect6` (agent cgroups): TCP connects go to the proxy listener and the
//!   original destination is remembered under the socket cookie; UDP connects are allowed only
//!   to the configured DNS resolver; every other protocol is refused.
//! * `sockops` (agent cgroups): once the redirected connection is established, re-key the
//!   original destination under (netns cookie, 4-tuple), which is what the proxy can see.
//! * `getsockopt` (the proxy's cgroup): answer `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` on
//!   accepted sockets from that map; every other option passes through untouched.
//! * `getpeername4/6` (agent cgroups): the agent sees the peer it dialled, not the proxy.
//! * `sendmsg4/6`, `recvmsg4/6` (agent cgroups): UDP only to the resolver, optionally via the
//!   proxy's DNS port with the reply's source restored.
//! * `sock_create` (agent cgroups): only TCP and UDP inet sockets (plus unix and netlink).
//! * `bind4`/`bind6` (agent cgroups): no listener on an outside address. Loopback binds and
//!   TCP binds to an allowed inbound port (any address) pass unchanged. A TCP bind to the wildcard address with
//!   a fixed port (a server) is rewritten to the family's loopback: `0.0.0.0` to `127.0.0.1`,
//!   `::ffff:0.0.0.0` to `::ffff:127.0.0.1`, `::` to `::1` (so a dual-stack `::` listener
//!   then serves IPv6 loopback only: IPv4 clients of `127.0.0.1` are refused). Wildcard binds
//!   with port 0 (a client choosing its source before `connect()`) and UDP wildcard binds pass
//!   unchanged: a socket bound to loopback cannot reach a non-loopback resolver or bypassed
//!   destination (`EINVAL`), and `ingress` keeps them closed to the outside anyway. Any other
//!   address (the pod's or host's own) is refused; for UDP too, unless UDP is unblocked for
//!   the cgroup. No config for the cgroup: every non-loopback bind is refused.
//! * `ingress` (`cgroup_skb/ingress`, agent cgroups): binds alone cannot close inbound paths,
//!   because `listen()` on an unbound socket and UDP `sendmsg()` autobind to the wildcard
//!   without running a bind hook. Packets that arrive on loopback pass at once. From outside
//!   the namespace: a TCP listener gets packets only on an allowed inbound port; other TCP
//!   sockets get theirs (their connection came from a `connect()` the hooks above let through,
//!   or from a SYN this program let through); UDP gets only replies from the configured
//!   resolver (or the proxy's DNS port), unless UDP is unblocked for the cgroup.
//!
//! Return values: 1 lets the operation (or packet) proceed, 0 fails it with `EPERM` (drops it).

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock_addr},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, map, sock_ops},
    maps::{HashMap, LpmTrie, LruHashMap, lpm_trie::Key},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext, SockoptContext},
};
use aya_log_ebpf::debug;
use paddock_common::{
    AF_INET, AF_INET6, BYPASS_ID_BITS, BypassKeyData, CgroupConfig, DEFAULT_ORIG_ENTRIES,
    FLAG_BLOCK_UDP, FLAG_DEBUG_LOG, FLAG_DNS_REDIRECT, FLAG_INTERCEPT_TCP, MAX_BYPASS,
    MAX_CGROUP_DEPTH, MAX_CGROUPS, OrigDst, SO_ORIGINAL_DST, SOL_IP, SOL_IPV6, SockKey,
    bypass_key_data, is_mapped_v4, mapped_v4,
};

use crate::addr::{bytes_to_words, eq16, is_zero16, mapped_tail, words_to_bytes};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const AF_UNIX: u32 = 1;
const AF_NETLINK: u32 = 16;

/// The loopback device has index 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// `BPF_TCP_LISTEN`: the state of a listening socket in `struct bpf_sock`.
const TCP_LISTEN: u32 = 10;
const PASS: i32 = 1;
const DROP: i32 = 0;

#[map]
static CONFIG: HashMap<u64, CgroupConfig> = HashMap::pinned(MAX_CGROUPS, 0);

#[map]
static BYPASS: LpmTrie<BypassKeyData, u8> = LpmTrie::pinned(MAX_BYPASS, 0);

#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(DEFAULT_ORIG_ENTRIES, 0);

#[map]
static ORIG_BY_TUPLE: LruHashMap<SockKey, OrigDst> = LruHashMap::pinned(DEFAULT_ORIG_ENTRIES, 0);

/// The configuration of the calling task's cgroup, or of its deepest configured ancestor.
#[inline(always)]
fn config() -> Option<(u64, &'static CgroupConfig)> {
    // SAFETY: helper without pointer arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    cgroup_config(id, |level| {
        // SAFETY: helper without pointer arguments.
        unsafe { bpf_get_current_ancestor_cgroup_id(level) }
    })
}

/// The configuration of the cgroup `id`, or of its deepest configured ancestor (`ancestor`
/// answers the id at a level below the root, 0 past the cgroup itself).
#[inline(always)]
fn cgroup_config(id: u64, ancestor: impl Fn(i32) -> u64) -> Option<(u64, &'static CgroupConfig)> {
    // SAFETY: map values are only read here; userspace replaces whole entries.
    if let Some(c) = unsafe { CONFIG.get(id) } {
        return Some((id, c));
    }
    let mut found = None;
    let mut level = 1;
    while level < MAX_CGROUP_DEPTH as i32 {
        let anc = ancestor(level);
        if anc == 0 {
            break;
        }
        // SAFETY: as above.
        if let Some(c) = unsafe { CONFIG.get(anc) } {
            found = Some((anc, c));
        }
        level += 1;
    }
    found
}

#[inline(always)]
fn bypassed(cgroup_id: u64, addr: &[u8; 16]) -> bool {
    // Look up the full address; the trie answers with the longest stored prefix.
    let key = Key::new(BYPASS_ID_BITS + 128, bypass_key_data(cgroup_id, addr));
    BYPASS.get(&key).is_some()
}

/// The socket carries the proxy's bypass mark.
#[inline(always)]
fn has_bypass_mark(sa: *mut bpf_sock_addr, cfg: &CgroupConfig) -> bool {
    if cfg.bypass_mark == 0 {
        return false;
    }
    // SAFETY: `sk` is always set for sock_addr programs; the verifier checks the access.
    let mark = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        if sk.is_null() {
            return false;
        }
        (*sk).mark
    };
    mark == cfg.bypass_mark
}

#[inline(always)]
fn read_port(sa: *mut bpf_sock_addr) -> u16 {
    // SAFETY: context field read, checked by the verifier. `user_port` holds a big-endian u16
    // in its first two bytes.
    u16::from_be(unsafe { (*sa).user_port } as u16)
}

#[inline(always)]
fn write_port(sa: *mut bpf_sock_addr, port: u16) {
    // SAFETY: context field write, checked by the verifier.
    unsafe { core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(port.to_be())) }
}

#[inline(always)]
fn write_ip4(sa: *mut bpf_sock_addr, ip: u32) {
    // SAFETY: context field write, checked by the verifier.
    unsafe { core::ptr::write_volatile(&raw mut (*sa).user_ip4, ip) }
}

/// One store per word: the verifier refuses merged 8-byte stores to `user_ip6`.
#[inline(always)]
fn write_ip6(sa: *mut bpf_sock_addr, addr: &[u8; 16]) {
    let w = bytes_to_words(addr);
    // SAFETY: context field writes, checked by the verifier.
    unsafe {
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], w[0]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], w[1]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], w[2]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], w[3]);
    }
}

#[inline(always)]
fn read_ip6(sa: *mut bpf_sock_addr) -> [u8; 16] {
    // SAFETY: context field reads (4 bytes each), checked by the verifier.
    let w = unsafe {
        [
            core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
        ]
    };
    words_to_bytes(w)
}

#[inline(always)]
fn protocol(sa: *mut bpf_sock_addr) -> u32 {
    // SAFETY: context field read, checked by the verifier.
    unsafe { (*sa).protocol }
}

/// Where a UDP datagram (or UDP connect) to `dst` may go: `None` refuses it, otherwise the
/// (possibly redirected) destination.
#[inline(always)]
fn udp_target(cfg: &CgroupConfig, dst: &[u8; 16], port: u16, v4: bool) -> Option<([u8; 16], u16)> {
    if cfg.flags & FLAG_BLOCK_UDP == 0 {
        return Some((*dst, port));
    }
    let resolver = if v4 {
        mapped_v4(cfg.dns_ip4)
    } else {
        cfg.dns_ip6
    };
    let unset = if v4 {
        u32::from_ne_bytes(cfg.dns_ip4) == 0
    } else {
        is_zero16(&cfg.dns_ip6)
    };
    if unset || port != cfg.dns_port || !eq16(dst, &resolver) {
        return None;
    }
    if cfg.flags & FLAG_DNS_REDIRECT != 0 && cfg.dns_redirect_port != 0 {
        let proxy = if v4 {
            mapped_v4(cfg.proxy_ip4)
        } else {
            cfg.proxy_ip6
        };
        return Some((proxy, cfg.dns_redirect_port));
    }
    Some((*dst, port))
}

/// Shared by `connect4` (with a mapped address) and `connect6`.
#[inline(always)]
fn connect(ctx: &SockAddrContext, dst: [u8; 16], v4: bool, on_v6_socket: bool) -> i32 {
    let sa = ctx.sock_addr;
    // An attached cgroup without configuration is a setup fault: refuse rather than leak.
    let Some((cgid, cfg)) = config() else {
        return DENY;
    };
    let port = read_port(sa);
    match protocol(sa) {
        IPPROTO_TCP => {}
        IPPROTO_UDP => {
            return match udp_target(cfg, &dst, port, v4) {
                Some((to, to_port)) => {
                    if !eq16(&to, &dst) || to_port != port {
                        rewrite(sa, &to, to_port, v4, on_v6_socket);
                    }
                    ALLOW
                }
                None => {
                    if cfg.flags & FLAG_DEBUG_LOG != 0 {
                        debug!(ctx, "paddock: udp connect refused, port {}", port);
                    }
                    DENY
                }
            };
        }
        _ => return DENY,
    }
    if cfg.flags & FLAG_INTERCEPT_TCP == 0 || has_bypass_mark(sa, cfg) || bypassed(cgid, &dst) {
        return ALLOW;
    }
    let proxy = if v4 {
        mapped_v4(cfg.proxy_ip4)
    } else {
        cfg.proxy_ip6
    };
    if is_zero16(&proxy) && !v4 {
        // No IPv6 listener configured: an IPv6 connect cannot be intercepted, so it fails.
        return DENY;
    }
    if eq16(&proxy, &dst) && port == cfg.proxy_port {
        return ALLOW;
    }
    // SAFETY: the context pointer is valid for the duration of the program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr: dst,
        port,
        family: if v4 { AF_INET } else { AF_INET6 },
        pad: 0,
    };
    if ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        return DENY;
    }
    rewrite(sa, &proxy, cfg.proxy_port, v4, on_v6_socket);
    if cfg.flags & FLAG_DEBUG_LOG != 0 {
        debug!(ctx, "paddock: redirected connect to port {}", port);
    }
    ALLOW
}

#[inline(always)]
fn rewrite(sa: *mut bpf_sock_addr, addr: &[u8; 16], port: u16, v4: bool, on_v6_socket: bool) {
    if on_v6_socket {
        write_ip6(sa, addr);
    } else if v4 {
        write_ip4(sa, mapped_tail(addr));
    }
    write_port(sa, port);
}

#[cgroup_sock_addr(connect4)]
pub fn paddock_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: context field read, checked by the verifier.
    let ip = unsafe { (*ctx.sock_addr).user_ip4 };
    connect(&ctx, mapped_v4(ip.to_ne_bytes()), true, false)
}

#[cgroup_sock_addr(connect6)]
pub fn paddock_connect6(ctx: SockAddrContext) -> i32 {
    let dst = read_ip6(ctx.sock_addr);
    let v4 = is_mapped_v4(&dst);
    connect(&ctx, dst, v4, true)
}

#[inline(always)]
fn sendmsg(ctx: &SockAddrContext, dst: [u8; 16], v4: bool, on_v6_socket: bool) -> i32 {
    let sa = ctx.sock_addr;
    let Some((_, cfg)) = config() else {
        return DENY;
    };
    let port = read_port(sa);
    match udp_target(cfg, &dst, port, v4) {
        Some((to, to_port)) => {
            if !eq16(&to, &dst) || to_port != port {
                rewrite(sa, &to, to_port, v4, on_v6_socket);
            }
            ALLOW
        }
        None => {
            if cfg.flags & FLAG_DEBUG_LOG != 0 {
                debug!(ctx, "paddock: udp send refused, port {}", port);
            }
            DENY
        }
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn paddock_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: context field read, checked by the verifier.
    let ip = unsafe { (*ctx.sock_addr).user_ip4 };
    sendmsg(&ctx, mapped_v4(ip.to_ne_bytes()), true, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn paddock_sendmsg6(ctx: SockAddrContext) -> i32 {
    let dst = read_ip6(ctx.sock_addr);
    let v4 = is_mapped_v4(&dst);
    sendmsg(&ctx, dst, v4, true)
}

/// A reply from the proxy's DNS port shows the resolver the agent asked as its source.
#[inline(always)]
fn recvmsg(ctx: &SockAddrContext, src: [u8; 16], v4: bool, on_v6_socket: bool) -> i32 {
    let sa = ctx.sock_addr;
    if let Some((_, cfg)) = config()
        && cfg.flags & FLAG_DNS_REDIRECT != 0
        && cfg.dns_redirect_port != 0
    {
        let proxy = if v4 {
            mapped_v4(cfg.proxy_ip4)
        } else {
            cfg.proxy_ip6
        };
        if read_port(sa) == cfg.dns_redirect_port && eq16(&src, &proxy) {
            let resolver = if v4 {
                mapped_v4(cfg.dns_ip4)
            } else {
                cfg.dns_ip6
            };
            rewrite(sa, &resolver, cfg.dns_port, v4, on_v6_socket);
        }
    }
    // recvmsg programs must allow.
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn paddock_recvmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: context field read, checked by the verifier.
    let ip = unsafe { (*ctx.sock_addr).user_ip4 };
    recvmsg(&ctx, mapped_v4(ip.to_ne_bytes()), true, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn paddock_recvmsg6(ctx: SockAddrContext) -> i32 {
    let src = read_ip6(ctx.sock_addr);
    let v4 = is_mapped_v4(&src);
    recvmsg(&ctx, src, v4, true)
}

/// The agent's `getpeername` reports the destination it dialled.
#[inline(always)]
fn getpeername(ctx: &SockAddrContext, on_v6_socket: bool) -> i32 {
    // SAFETY: the context pointer is valid for the duration of the program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only use of a map value.
    if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(cookie) } {
        let addr = orig.addr;
        let v4 = orig.family == AF_INET;
        rewrite(ctx.sock_addr, &addr, orig.port, v4, on_v6_socket);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn paddock_getpeername4(ctx: SockAddrContext) -> i32 {
    getpeername(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn paddock_getpeername6(ctx: SockAddrContext) -> i32 {
    getpeername(&ctx, true)
}

#[sock_ops]
pub fn paddock_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        rekey(&ctx);
    }
    1
}

/// Every context field is read up front with its own volatile load: if LLVM merges the two
/// family branches into one load through a computed context pointer, the verifier refuses it
/// ("dereference of modified ctx ptr").
#[inline(always)]
fn rekey(ctx: &SockOpsContext) {
    // SAFETY: the context pointer is valid for the duration of the program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before any other map operation.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    let ops = ctx.ops;
    // SAFETY: context field reads, checked by the verifier.
    let (family, l4, r4, l6, r6, lport, rport) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ops).family),
            core::ptr::read_volatile(&raw const (*ops).local_ip4),
            core::ptr::read_volatile(&raw const (*ops).remote_ip4),
            [
                core::ptr::read_volatile(&raw const (*ops).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[3]),
            ],
            [
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[3]),
            ],
            core::ptr::read_volatile(&raw const (*ops).local_port),
            core::ptr::read_volatile(&raw const (*ops).remote_port),
        )
    };
    let (local, remote) = if family == u32::from(AF_INET) {
        (mapped_v4(l4.to_ne_bytes()), mapped_v4(r4.to_ne_bytes()))
    } else if family == u32::from(AF_INET6) {
        (words_to_bytes(l6), words_to_bytes(r6))
    } else {
        return;
    };
    // `local_port` is host order; `remote_port` holds the big-endian port in its upper half.
    let key = SockKey {
        // SAFETY: the context pointer is valid for the duration of the program.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local,
        remote,
        local_port: lport as u16,
        remote_port: u16::from_be((rport >> 16) as u16),
        pad: 0,
    };
    let _ = ORIG_BY_TUPLE.insert(key, orig, 0);
}

#[cgroup_sockopt(getsockopt)]
pub fn paddock_getsockopt(ctx: SockoptContext) -> i32 {
    answer_original_dst(&ctx);
    // Always 1: 0 would turn every getsockopt of the cgroup into EPERM.
    1
}

#[inline(always)]
fn answer_original_dst(ctx: &SockoptContext) {
    let so = ctx.sockopt;
    // SAFETY: context field reads, checked by the verifier.
    let (level, optname) = unsafe { ((*so).level, (*so).optname) };
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return;
    }
    let want_v6 = level == SOL_IPV6;
    // SAFETY: `sk` is a valid socket pointer (or null) for sockopt programs.
    let sk = unsafe { (*so).__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    // The accepted socket's source is the proxy, its destination the agent. Fields are read
    // up front, one volatile load each (see `rekey`).
    // SAFETY: socket field reads, checked by the verifier.
    let (family, s4, d4, s6, d6, sport, dport) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*sk).family),
            core::ptr::read_volatile(&raw const (*sk).src_ip4),
            core::ptr::read_volatile(&raw const (*sk).dst_ip4),
            [
                core::ptr::read_volatile(&raw const (*sk).src_ip6[0]),
                core::ptr::read_volatile(&raw const (*sk).src_ip6[1]),
                core::ptr::read_volatile(&raw const (*sk).src_ip6[2]),
                core::ptr::read_volatile(&raw const (*sk).src_ip6[3]),
            ],
            [
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[0]),
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[1]),
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[2]),
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[3]),
            ],
            core::ptr::read_volatile(&raw const (*sk).src_port),
            core::ptr::read_volatile(&raw const (*sk).dst_port),
        )
    };
    let (proxy_addr, agent_addr) = if family == u32::from(AF_INET) {
        (mapped_v4(s4.to_ne_bytes()), mapped_v4(d4.to_ne_bytes()))
    } else if family == u32::from(AF_INET6) {
        (words_to_bytes(s6), words_to_bytes(d6))
    } else {
        return;
    };
    let proxy_port = sport as u16;
    let agent_port = u16::from_be(dport);
    let key = SockKey {
        // SAFETY: the context pointer is valid for the duration of the program.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local: agent_addr,
        remote: proxy_addr,
        local_port: agent_port,
        remote_port: proxy_port,
        pad: 0,
    };
    // SAFETY: the value is copied out immediately.
    let Some(orig) = (unsafe { ORIG_BY_TUPLE.get(key) }).copied() else {
        return;
    };
    // An IPv4 accept answers SOL_IP with sockaddr_in; an IPv6 accept answers SOL_IPV6.
    let is_v4 = orig.family == AF_INET;
    if want_v6 == is_v4 || (family == u32::from(AF_INET)) == want_v6 {
        return;
    }
    // SAFETY: the optval pointers are bounds-checked below before every write.
    unsafe {
        let start = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        let port = orig.port.to_be_bytes();
        if want_v6 {
            // struct sockaddr_in6: family, port, flowinfo, addr[16], scope_id = 28 bytes.
            if start.add(28) > end {
                return;
            }
            let fam = AF_INET6.to_ne_bytes();
            core::ptr::write_volatile(start, fam[0]);
            core::ptr::write_volatile(start.add(1), fam[1]);
            core::ptr::write_volatile(start.add(2), port[0]);
            core::ptr::write_volatile(start.add(3), port[1]);
            let mut i = 4;
            while i < 8 {
                core::ptr::write_volatile(start.add(i), 0);
                i += 1;
            }
            let mut j = 0;
            while j < 16 {
                core::ptr::write_volatile(start.add(8 + j), orig.addr[j]);
                j += 1;
            }
            let mut k = 24;
            while k < 28 {
                core::ptr::write_volatile(start.add(k), 0);
                k += 1;
            }
            (*so).optlen = 28;
        } else {
            // struct sockaddr_in: family, port, addr[4], zero[8] = 16 bytes.
            if start.add(16) > end {
                return;
            }
            let fam = AF_INET.to_ne_bytes();
            core::ptr::write_volatile(start, fam[0]);
            core::ptr::write_volatile(start.add(1), fam[1]);
            core::ptr::write_volatile(start.add(2), port[0]);
            core::ptr::write_volatile(start.add(3), port[1]);
            let mut j = 0;
            while j < 4 {
                core::ptr::write_volatile(start.add(4 + j), orig.addr[12 + j]);
                j += 1;
            }
            let mut k = 8;
            while k < 16 {
                core::ptr::write_volatile(start.add(k), 0);
                k += 1;
            }
            (*so).optlen = 16;
        }
        (*so).retval = 0;
    }
}

/// Only TCP and UDP inet sockets, plus unix and netlink, may be created: no raw, packet,
/// ICMP, SCTP or MPTCP sockets that would slip past the connect and sendmsg hooks.
#[cgroup_sock(sock_create)]
pub fn paddock_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: socket field reads, checked by the verifier.
    let (family, ty, proto) =
        unsafe { ((*ctx.sock).family, (*ctx.sock).type_, (*ctx.sock).protocol) };
    if family == AF_UNIX || family == AF_NETLINK {
        return ALLOW;
    }
    if (family == u32::from(AF_INET) || family == u32::from(AF_INET6))
        && ((ty == SOCK_STREAM && proto == IPPROTO_TCP)
            || (ty == SOCK_DGRAM && proto == IPPROTO_UDP))
    {
        return ALLOW;
    }
    DENY
}

/// What a bind to a non-loopback address becomes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BindVerdict {
    /// Leave it as asked.
    Keep,
    /// Bind the family's loopback address instead (same port).
    Loopback,
    /// Fail it with `EPERM`.
    Refuse,
}

/// The policy shared by `bind4` and `bind6` for an address that is not loopback.
#[inline(always)]
fn bind_verdict(sa: *mut bpf_sock_addr, wildcard: bool) -> BindVerdict {
    // An attached cgroup without configuration is a setup fault: refuse rather than open.
    let Some((_, cfg)) = config() else {
        return BindVerdict::Refuse;
    };
    let port = read_port(sa);
    match protocol(sa) {
        IPPROTO_TCP => {
            if cfg.inbound_allowed(port) || (wildcard && port == 0) {
                BindVerdict::Keep
            } else if wildcard {
                BindVerdict::Loopback
            } else {
                BindVerdict::Refuse
            }
        }
        // UDP that is not blocked is open both ways anyway. Blocked UDP may bind the wildcard
        // (a DNS client's socket must reach a non-loopback resolver); `ingress` drops what
        // does not come from the resolver.
        IPPROTO_UDP if wildcard || cfg.flags & FLAG_BLOCK_UDP == 0 => BindVerdict::Keep,
        _ => BindVerdict::Refuse,
    }
}

#[cgroup_sock_addr(bind4)]
pub fn paddock_bind4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: context field read, checked by the verifier.
    let ip = unsafe { (*sa).user_ip4 }.to_ne_bytes();
    if ip[0] == 127 {
        return ALLOW;
    }
    let wildcard = u32::from_ne_bytes(ip) == 0;
    match bind_verdict(sa, wildcard) {
        BindVerdict::Keep => ALLOW,
        BindVerdict::Loopback => {
            write_ip4(sa, u32::from_ne_bytes([127, 0, 0, 1]));
            ALLOW
        }
        BindVerdict::Refuse => DENY,
    }
}

#[cgroup_sock_addr(bind6)]
pub fn paddock_bind6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let addr = read_ip6(sa);
    let mapped = is_mapped_v4(&addr);
    let mut lo6 = [0u8; 16];
    lo6[15] = 1;
    if eq16(&addr, &lo6) || (mapped && addr[12] == 127) {
        return ALLOW;
    }
    let wildcard = is_zero16(&addr) || (mapped && mapped_tail(&addr) == 0);
    match bind_verdict(sa, wildcard) {
        BindVerdict::Keep => ALLOW,
        BindVerdict::Loopback => {
            if mapped {
                write_ip6(sa, &mapped_v4([127, 0, 0, 1]));
            } else {
                write_ip6(sa, &lo6);
            }
            ALLOW
        }
        BindVerdict::Refuse => DENY,
    }
}

/// Inbound control. The loopback test comes first and alone: it is the whole cost on the
/// path every redirected connection takes (agent to proxy and back over `lo`).
#[cgroup_skb(ingress)]
pub fn paddock_ingress(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: context field read, checked by the verifier.
    let ifindex = unsafe { core::ptr::read_volatile(&raw const (*skb).ifindex) };
    if ifindex == LOOPBACK_IFINDEX {
        return PASS;
    }
    ingress_from_outside(&ctx)
}

#[inline(always)]
fn ingress_from_outside(ctx: &SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // The receiving socket's cgroup: the same walk as `config`, from the skb's socket.
    // SAFETY: the context pointer is valid for the duration of the program.
    let id = unsafe { bpf_skb_cgroup_id(skb) };
    let Some((_, cfg)) = cgroup_config(id, |level| {
        // SAFETY: as above.
        unsafe { bpf_skb_ancestor_cgroup_id(skb, level) }
    }) else {
        return DROP;
    };
    // SAFETY: `sk` is the receiving socket (or null) in cgroup_skb programs; checked below and
    // by the verifier, and narrowed to a full socket before its protocol is read.
    let (protocol, state, local_port) = unsafe {
        let sk = core::ptr::read_volatile(&raw const (*skb).__bindgen_anon_2.sk);
        if sk.is_null() {
            return DROP;
        }
        let full = bpf_sk_fullsock(sk);
        if full.is_null() {
            return DROP;
        }
        (
            core::ptr::read_volatile(&raw const (*full).protocol),
            core::ptr::read_volatile(&raw const (*full).state),
            core::ptr::read_volatile(&raw const (*full).src_port),
        )
    };
    match protocol {
        IPPROTO_TCP => {
            if state != TCP_LISTEN || cfg.inbound_allowed(local_port as u16) {
                PASS
            } else {
                if cfg.flags & FLAG_DEBUG_LOG != 0 {
                    debug!(
                        ctx,
                        "paddock: inbound connection to port {} dropped", local_port
                    );
                }
                DROP
            }
        }
        IPPROTO_UDP => {
            if cfg.flags & FLAG_BLOCK_UDP == 0 || from_resolver(ctx, cfg) {
                PASS
            } else {
                if cfg.flags & FLAG_DEBUG_LOG != 0 {
                    debug!(
                        ctx,
                        "paddock: inbound datagram to port {} dropped", local_port
                    );
                }
                DROP
            }
        }
        _ => DROP,
    }
}

/// Whether a datagram's source (read from its IP and UDP headers: an unconnected socket has
/// no peer to compare with) is the resolver, or the proxy's DNS port when DNS is redirected.
#[inline(always)]
fn from_resolver(ctx: &SkBuffContext, cfg: &CgroupConfig) -> bool {
    // The data starts at the network header in cgroup_skb programs.
    let Ok(first) = ctx.load::<u8>(0) else {
        return false;
    };
    let (src, udp_offset, v4) = match first >> 4 {
        4 => {
            let Ok(proto) = ctx.load::<u8>(9) else {
                return false;
            };
            let Ok(src) = ctx.load::<[u8; 4]>(12) else {
                return false;
            };
            if u32::from(proto) != IPPROTO_UDP {
                return false;
            }
            (mapped_v4(src), usize::from(first & 0x0f) * 4, true)
        }
        6 => {
            // A reply with extension headers is not followed: it is dropped.
            let Ok(next) = ctx.load::<u8>(6) else {
                return false;
            };
            let Ok(src) = ctx.load::<[u8; 16]>(8) else {
                return false;
            };
            if u32::from(next) != IPPROTO_UDP {
                return false;
            }
            (src, 40, false)
        }
        _ => return false,
    };
    let Ok(sport) = ctx.load::<[u8; 2]>(udp_offset) else {
        return false;
    };
    let sport = u16::from_be_bytes(sport);
    let (resolver, proxy) = if v4 {
        (mapped_v4(cfg.dns_ip4), mapped_v4(cfg.proxy_ip4))
    } else {
        (cfg.dns_ip6, cfg.proxy_ip6)
    };
    let resolver_set = if v4 {
        u32::from_ne_bytes(cfg.dns_ip4) != 0
    } else {
        !is_zero16(&cfg.dns_ip6)
    };
    if resolver_set && sport == cfg.dns_port && eq16(&src, &resolver) {
        return true;
    }
    cfg.flags & FLAG_DNS_REDIRECT != 0
        && cfg.dns_redirect_port != 0
        && sport == cfg.dns_redirect_port
        && eq16(&src, &proxy)
}
