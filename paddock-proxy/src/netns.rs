//! Entering a network namespace for one operation, on a dedicated thread.
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread, and a socket belongs to the namespace
//! it was created in. So a listener for a pod is created on a short-lived thread that enters the
//! pod's namespace, binds, and hands the socket back; the runtime's threads never move
//! (the approach of istio/ztunnel's in-pod mode).
//!
//! [`OwnedNetns`] is a namespace this process created and owns through a descriptor (no name
//! under `/run/netns`): `paddock-proxy run` gives the command one, with only loopback, and binds
//! the proxy's listeners inside it ([`OwnedNetns::bind_run_sockets`]). The sockets stay in the
//! namespace they were created in while the proxy accepts and dials from its own, so upstream
//! traffic leaves from the host's side. The node agent can reuse the same mechanism for pods.

use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

/// Run closures inside a network namespace.
pub trait NetnsEntry: Send + Sync + std::fmt::Debug {
    /// Run `f` with the calling thread's network namespace switched to this one.
    fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError>;
}

/// Errors entering a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening netns {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setns({path}): {source} (needs CAP_SYS_ADMIN)")]
    Setns { path: PathBuf, source: nix::Error },
    #[error("netns worker thread panicked")]
    Panicked,
    #[error("creating a network namespace: {0} (needs CAP_SYS_ADMIN)")]
    Create(nix::Error),
    #[error("bringing up loopback in the new network namespace: {0}")]
    Loopback(std::io::Error),
    #[error("opening the new network namespace: {0}")]
    Handle(std::io::Error),
    #[error("binding {addr} inside the command's network namespace: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A namespace named by a path (`/run/netns/NAME`, `/proc/PID/ns/net`).
#[derive(Debug, Clone)]
pub struct NetnsPath(PathBuf);

impl NetnsPath {
    #[must_use]
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    /// A namespace created by `ip netns add NAME`.
    #[must_use]
    pub fn named(name: &str) -> Self {
        Self(Path::new("/run/netns").join(name))
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl NetnsEntry for NetnsPath {
    fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        let path = self.0.clone();
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|source| NetnsError::Setns { path, source })?;
            Ok(f())
        })
        .join()
        .map_err(|_| NetnsError::Panicked)?
    }
}

/// A fresh network namespace with only loopback, up, held open by a descriptor: it lives as long
/// as this handle, the sockets created in it, or a process inside it.
#[derive(Debug)]
pub struct OwnedNetns {
    file: File,
}

impl OwnedNetns {
    /// Create the namespace on a short-lived thread (`unshare(CLONE_NEWNET)` moves only that
    /// thread), bring `lo` up there and keep a descriptor of it.
    pub fn create() -> Result<Self, NetnsError> {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(NetnsError::Create)?;
            crate::sys::loopback_up().map_err(NetnsError::Loopback)?;
            let file = File::open("/proc/thread-self/ns/net").map_err(NetnsError::Handle)?;
            Ok(Self { file })
        })
        .join()
        .map_err(|_| NetnsError::Panicked)?
    }

    /// The namespace's inode number (what `/proc/PID/ns/net` links name: `net:[INODE]`).
    pub fn inode(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.ino())
    }

    /// Bind what `paddock-proxy run` serves inside the command's namespace: the transparent
    /// proxy listener on `127.0.0.1:P` and `[::1]:P` (one port the kernel picks, the same on
    /// both) and UDP port 53 on both addresses for the run's DNS server. Without IPv6 in the
    /// namespace only the IPv4 sockets are bound (the eBPF config then refuses IPv6 connects).
    pub fn bind_run_sockets(&self) -> Result<RunSockets, NetnsError> {
        self.run_in(bind_run_sockets)?
    }
}

impl AsFd for OwnedNetns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl NetnsEntry for OwnedNetns {
    fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        let file = self.file.try_clone().map_err(NetnsError::Handle)?;
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
                NetnsError::Setns {
                    path: PathBuf::from("(owned netns)"),
                    source,
                }
            })?;
            Ok(f())
        })
        .join()
        .map_err(|_| NetnsError::Panicked)?
    }
}

/// The sockets `run` owns inside the command's network namespace.
#[derive(Debug)]
pub struct RunSockets {
    /// The transparent listeners' port (the same on both addresses).
    pub port: u16,
    /// `127.0.0.1:port` and, with IPv6, `[::1]:port`: hand them to the proxy
    /// (`ServeOptions::transparent_listeners`).
    pub transparent: Vec<TcpListener>,
    /// UDP `127.0.0.1:53` and, with IPv6, `[::1]:53`, where the command's resolv.conf points.
    pub dns_sockets: Vec<UdpSocket>,
}

impl RunSockets {
    /// The transparent listeners' addresses.
    #[must_use]
    pub fn transparent_addrs(&self) -> Vec<SocketAddr> {
        self.transparent
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The DNS sockets' addresses.
    #[must_use]
    pub fn dns_addrs(&self) -> Vec<SocketAddr> {
        self.dns_sockets
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }
}

fn tcp_listener(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // A restarted node agent binds a pod's port again while the connections its predecessor
    // accepted there sit in TIME_WAIT; without this the old port (which the pinned config
    // names) is refused. A live listener on the port still makes the bind fail.
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

fn udp_socket(addr: SocketAddr) -> Result<UdpSocket, std::io::Error> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// A pod's sockets (the node agent), all on one port `P` inside its network namespace.
#[derive(Debug)]
pub struct PodSockets {
    pub port: u16,
    /// TCP `127.0.0.1:P` and, when the namespace has IPv6, `[::1]:P`: the transparent
    /// listeners.
    pub listeners: Vec<TcpListener>,
    /// UDP on the same addresses: the pod's DNS, which the eBPF programs redirect there from
    /// its nameservers, answered by the policy-aware DNS server.
    pub dns: Vec<UdpSocket>,
}

/// The sockets of a pod (the node agent): TCP and UDP on `127.0.0.1:P` and, when the
/// namespace has IPv6, `[::1]:P`, one port for all. `preferred` (the port the pod had before
/// a node agent restart, which the pinned eBPF config still names) is tried first; 0, or a
/// taken port, lets the kernel pick one free on every address. Run inside the pod's namespace
/// ([`NetnsEntry::run_in`]).
pub fn bind_pod_listeners(preferred: u16) -> Result<PodSockets, NetnsError> {
    if preferred != 0
        && let Ok(bound) = bind_pod_port(preferred)
    {
        return Ok(bound);
    }
    // The port picked for 127.0.0.1 can be taken on [::1] or for UDP in a pod's namespace (the
    // pod binds what it likes there): try a few picks before giving up.
    let mut last = None;
    for _ in 0..8 {
        match bind_pod_port(0) {
            Ok(bound) => return Ok(bound),
            Err(e @ NetnsError::Bind { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(NetnsError::Panicked))
}

fn bind_pod_port(port: u16) -> Result<PodSockets, NetnsError> {
    let bind_err = |addr| move |source| NetnsError::Bind { addr, source };
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = tcp_listener(v4).map_err(bind_err(v4))?;
    let port = listener.local_addr().map_err(bind_err(v4))?.port();
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut sockets = PodSockets {
        port,
        listeners: vec![listener],
        dns: vec![udp_socket(v4).map_err(bind_err(v4))?],
    };
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    match tcp_listener(v6) {
        Ok(l) => {
            sockets.listeners.push(l);
            sockets.dns.push(udp_socket(v6).map_err(bind_err(v6))?);
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
            ) => {}
        Err(source) => return Err(NetnsError::Bind { addr: v6, source }),
    }
    Ok(sockets)
}

fn bind_run_sockets() -> Result<RunSockets, NetnsError> {
    let bind_err = |addr| move |source| NetnsError::Bind { addr, source };
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let listener = tcp_listener(v4).map_err(bind_err(v4))?;
    let port = listener.local_addr().map_err(bind_err(v4))?.port();
    let mut transparent = vec![listener];
    let dns4 = SocketAddr::from((Ipv4Addr::LOCALHOST, 53));
    let mut dns_sockets = vec![udp_socket(dns4).map_err(bind_err(dns4))?];
    // A fresh namespace has nothing else bound: the same port is free on [::1], unless the
    // kernel runs without IPv6 (EADDRNOTAVAIL / EAFNOSUPPORT), which leaves IPv4 only.
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    match tcp_listener(v6) {
        Ok(l) => {
            transparent.push(l);
            let dns6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 53));
            dns_sockets.push(udp_socket(dns6).map_err(bind_err(dns6))?);
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
            ) =>
        {
            tracing::info!("no IPv6 in the command's network namespace: IPv4 only");
        }
        Err(e) => {
            return Err(NetnsError::Bind {
                addr: v6,
                source: e,
            });
        }
    }
    Ok(RunSockets {
        port,
        transparent,
        dns_sockets,
    })
}

/// The caller's own namespace: runs `f` in place. For tests and single-namespace deployments.
#[derive(Debug, Clone, Copy, Default)]
pub struct CurrentNetns;

impl NetnsEntry for CurrentNetns {
    fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        Ok(f())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_namespace_is_a_clear_error() {
        let err = NetnsPath::named("paddock-no-such-netns")
            .run_in(|| 1)
            .expect_err("missing");
        assert!(
            err.to_string().contains("/run/netns/paddock-no-such-netns"),
            "{err}"
        );
    }

    #[test]
    fn current_namespace_runs_in_place() {
        assert_eq!(CurrentNetns.run_in(|| 41 + 1).expect("runs"), 42);
    }
}
