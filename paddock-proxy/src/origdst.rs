//! Recovering where a redirected connection was going.
//!
//! Two implementations of one trait: [`SockoptOriginalDst`] asks the kernel with
//! `getsockopt(SO_ORIGINAL_DST)` (answered by Paddock's `cgroup/getsockopt` program, or by
//! netfilter behind an iptables `REDIRECT`), and [`MapOriginalDst`] reads the eBPF map
//! directly. [`StaticOriginalDst`] stands in for both in unprivileged tests.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, BorrowedFd},
    path::Path,
    sync::Mutex,
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use nix::sys::socket::{SockaddrStorage, getpeername, getsockname, getsockopt, sockopt};
use paddock_common::{AF_INET, OrigDst, SockKey, is_mapped_v4, mapped_v4};

/// Why no original destination could be recovered. Every variant means "deny".
#[derive(Debug, thiserror::Error)]
pub enum OrigDstError {
    #[error("connection was not redirected (no original destination recorded)")]
    NotRedirected,
    #[error("socket address query failed: {0}")]
    Socket(#[from] nix::Error),
    #[error("netns cookie query failed: {0}")]
    NetnsCookie(std::io::Error),
    #[error("socket has an address family other than IPv4/IPv6")]
    Family,
    #[error("eBPF map: {0}")]
    Map(String),
}

/// Recover the destination an accepted connection originally asked for.
pub trait OriginalDst: Send + Sync + std::fmt::Debug {
    fn original_dst(&self, sock: BorrowedFd<'_>) -> Result<SocketAddr, OrigDstError>;
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` / `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SockoptOriginalDst;

impl OriginalDst for SockoptOriginalDst {
    fn original_dst(&self, sock: BorrowedFd<'_>) -> Result<SocketAddr, OrigDstError> {
        let local = sock_addr(getsockname::<SockaddrStorage>(sock.as_raw_fd())?)?;
        let not_redirected = |e: nix::Error| match e {
            nix::Error::ENOENT | nix::Error::ENOPROTOOPT => OrigDstError::NotRedirected,
            other => OrigDstError::Socket(other),
        };
        if local.is_ipv4() {
            let sin = getsockopt(&sock, sockopt::OriginalDst).map_err(not_redirected)?;
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        } else {
            let sin6 = getsockopt(&sock, sockopt::Ip6tOriginalDst).map_err(not_redirected)?;
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                0,
                0,
            )))
        }
    }
}

fn sock_addr(s: SockaddrStorage) -> Result<SocketAddr, OrigDstError> {
    if let Some(v4) = s.as_sockaddr_in() {
        Ok(SocketAddr::V4(SocketAddrV4::new(v4.ip(), v4.port())))
    } else if let Some(v6) = s.as_sockaddr_in6() {
        Ok(SocketAddr::V6(SocketAddrV6::new(
            v6.ip(),
            v6.port(),
            v6.flowinfo(),
            v6.scope_id(),
        )))
    } else {
        Err(OrigDstError::Family)
    }
}

fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => mapped_v4(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The map key for an accepted socket: the agent's side is the accepted socket's peer.
#[must_use]
pub fn key_for_accepted(
    netns_cookie: u64,
    proxy_local: SocketAddr,
    agent_peer: SocketAddr,
) -> SockKey {
    SockKey {
        netns_cookie,
        local: addr16(agent_peer.ip()),
        remote: addr16(proxy_local.ip()),
        local_port: agent_peer.port(),
        remote_port: proxy_local.port(),
        pad: 0,
    }
}

/// A map value as a socket address (IPv4 dials come back as IPv4).
#[must_use]
pub fn decode(orig: &OrigDst) -> SocketAddr {
    if orig.family == AF_INET && is_mapped_v4(&orig.addr) {
        let a = &orig.addr;
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(a[12], a[13], a[14], a[15]),
            orig.port,
        ))
    } else {
        SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(orig.addr),
            orig.port,
            0,
            0,
        ))
    }
}

/// Direct lookup in the `ORIG_BY_TUPLE` map (pinned by the loader).
pub struct MapOriginalDst {
    map: Mutex<BpfHashMap<MapData, SockKey, OrigDst>>,
}

impl std::fmt::Debug for MapOriginalDst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapOriginalDst").finish_non_exhaustive()
    }
}

impl MapOriginalDst {
    /// Open the pinned `ORIG_BY_TUPLE` map under a loader's pin directory.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, OrigDstError> {
        let path = crate::ebpf::map_pin_path(pin_dir, crate::ebpf::MAP_ORIG_BY_TUPLE);
        let data = MapData::from_pin(&path)
            .map_err(|e| OrigDstError::Map(format!("{}: {e}", path.display())))?;
        Self::from_map(Map::LruHashMap(data))
    }

    /// Wrap an already open map.
    pub fn from_map(map: Map) -> Result<Self, OrigDstError> {
        let map = BpfHashMap::try_from(map).map_err(|e| OrigDstError::Map(e.to_string()))?;
        Ok(Self {
            map: Mutex::new(map),
        })
    }
}

impl OriginalDst for MapOriginalDst {
    fn original_dst(&self, sock: BorrowedFd<'_>) -> Result<SocketAddr, OrigDstError> {
        let local = sock_addr(getsockname::<SockaddrStorage>(sock.as_raw_fd())?)?;
        let peer = sock_addr(getpeername::<SockaddrStorage>(sock.as_raw_fd())?)?;
        let cookie = crate::sys::netns_cookie(sock).map_err(OrigDstError::NetnsCookie)?;
        let key = key_for_accepted(cookie, local, peer);
        let map = self
            .map
            .lock()
            .map_err(|_| OrigDstError::Map("map lock poisoned".into()))?;
        match map.get(&key, 0) {
            Ok(v) => Ok(decode(&v)),
            Err(aya::maps::MapError::KeyNotFound) => Err(OrigDstError::NotRedirected),
            Err(e) => Err(OrigDstError::Map(e.to_string())),
        }
    }
}

/// A fixed table from accepted socket's peer address to original destination: the seam that
/// lets the proxy pipeline be tested without a kernel.
#[derive(Debug, Default)]
pub struct StaticOriginalDst {
    by_peer: Mutex<HashMap<SocketAddr, SocketAddr>>,
}

impl StaticOriginalDst {
    /// Record that connections from `peer` were going to `dst`.
    pub fn insert(&self, peer: SocketAddr, dst: SocketAddr) {
        if let Ok(mut m) = self.by_peer.lock() {
            m.insert(peer, dst);
        }
    }
}

impl OriginalDst for StaticOriginalDst {
    fn original_dst(&self, sock: BorrowedFd<'_>) -> Result<SocketAddr, OrigDstError> {
        let peer = sock_addr(getpeername::<SockaddrStorage>(sock.as_raw_fd())?)?;
        let m = self
            .by_peer
            .lock()
            .map_err(|_| OrigDstError::Map("poisoned".into()))?;
        m.get(&peer).copied().ok_or(OrigDstError::NotRedirected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn key_puts_the_agent_side_first() {
        let proxy: SocketAddr = "127.0.0.1:15001".parse().expect("addr");
        let agent: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let k = key_for_accepted(99, proxy, agent);
        assert_eq!(k.netns_cookie, 99);
        assert_eq!(k.local_port, 40000);
        assert_eq!(k.remote_port, 15001);
        assert_eq!(k.local, mapped_v4([127, 0, 0, 1]));
        assert_eq!(k.pad, 0);
    }

    #[test]
    fn v6_key_keeps_native_addresses() {
        let proxy: SocketAddr = "[::1]:15001".parse().expect("addr");
        let agent: SocketAddr = "[fd00::2]:40000".parse().expect("addr");
        let k = key_for_accepted(1, proxy, agent);
        assert_eq!(k.local[0], 0xfd);
        assert_eq!(k.remote[15], 1);
    }

    #[test]
    fn decode_returns_the_family_that_was_dialled() {
        let v4 = OrigDst {
            addr: mapped_v4([10, 0, 0, 1]),
            port: 443,
            family: AF_INET,
            pad: 0,
        };
        assert_eq!(
            decode(&v4),
            "10.0.0.1:443".parse::<SocketAddr>().expect("addr")
        );
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[15] = 1;
        let v6 = OrigDst {
            addr: a,
            port: 8443,
            family: paddock_common::AF_INET6,
            pad: 0,
        };
        assert_eq!(
            decode(&v6),
            "[fd00::1]:8443".parse::<SocketAddr>().expect("addr")
        );
    }

    #[test]
    fn static_table_answers_by_peer_and_denies_unknown_peers() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, peer) = listener.accept().expect("accept");
        let table = StaticOriginalDst::default();
        assert!(matches!(
            table.original_dst(accepted.as_fd()),
            Err(OrigDstError::NotRedirected)
        ));
        let dst: SocketAddr = "192.0.2.7:443".parse().expect("addr");
        table.insert(peer, dst);
        assert_eq!(table.original_dst(accepted.as_fd()).expect("known"), dst);
        drop(client);
    }

    #[test]
    fn sockopt_on_a_plain_connection_is_not_redirected() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let _client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        let err = SockoptOriginalDst
            .original_dst(accepted.as_fd())
            .expect_err("no redirect");
        assert!(matches!(err, OrigDstError::NotRedirected), "{err}");
    }
}
