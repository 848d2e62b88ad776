//! Test servers: a stand-in proxy listener that reports the original destination it recovers,
//! and upstream hosts that count what reaches them.

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use paddock_proxy::origdst::{OriginalDst, SockoptOriginalDst};
use tokio::io::AsyncWriteExt;

use crate::Netns;

/// Listener port used by the stand-in proxy inside each agent namespace.
pub const PROXY_PORT: u16 = 15001;

/// Bind a listening TCP socket inside `ns` (the socket keeps that namespace).
pub fn bind_in(ns: &Netns, addr: SocketAddr) -> TcpListener {
    ns.run(move || {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        if addr.is_ipv6() {
            sock.set_only_v6(true)?;
        }
        sock.set_reuse_address(true)?;
        sock.bind(&addr.into())?;
        sock.listen(4096)?;
        Ok::<TcpListener, std::io::Error>(sock.into())
    })
    .expect("enter netns")
    .unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

/// Answers each connection with `sockopt=<addr|err> map=<addr|err>\n`: what
/// `SO_ORIGINAL_DST` and the direct map lookup recovered.
#[derive(Debug)]
pub struct OrigDstServer {
    pub accepted: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl OrigDstServer {
    /// Listen on 127.0.0.1 and `[::1]` at [`PROXY_PORT`] inside `ns`; each lookup waits `delay`.
    pub fn start(
        ns: &Netns,
        map: Option<&Arc<dyn OriginalDst>>,
        delay: std::time::Duration,
    ) -> Self {
        let accepted = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for addr in [
            SocketAddr::from(([127, 0, 0, 1], PROXY_PORT)),
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, PROXY_PORT)),
        ] {
            let std_l = bind_in(ns, addr);
            std_l.set_nonblocking(true).expect("nonblocking");
            let l = tokio::net::TcpListener::from_std(std_l).expect("tokio listener");
            let accepted = Arc::clone(&accepted);
            let map = map.cloned();
            tasks.push(tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let map = map.clone();
                    tokio::spawn(async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let by_sockopt = match SockoptOriginalDst.original_dst(s.as_fd()) {
                            Ok(a) => a.to_string(),
                            Err(e) => format!("error:{e}"),
                        };
                        let by_map = match &map {
                            Some(m) => match m.original_dst(s.as_fd()) {
                                Ok(a) => a.to_string(),
                                Err(e) => format!("error:{e}"),
                            },
                            None => "none".into(),
                        };
                        let line = format!("sockopt={by_sockopt} map={by_map}\n");
                        let _ = s.write_all(line.as_bytes()).await;
                        let _ = s.shutdown().await;
                    });
                }
            }));
        }
        Self { accepted, tasks }
    }
}

impl Drop for OrigDstServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A host in the upstream namespace: TCP on port 443 (both families) answers `upstream\n`,
/// UDP on port 53 answers `dns-reply`. Counts what arrives.
#[derive(Debug)]
pub struct UpstreamHost {
    pub tcp_accepted: Arc<AtomicUsize>,
    pub udp_received: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl UpstreamHost {
    pub fn start(ns: &Netns) -> Self {
        let tcp_accepted = Arc::new(AtomicUsize::new(0));
        let udp_received = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for addr in [
            SocketAddr::from(([0, 0, 0, 0], 443)),
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 443)),
        ] {
            let std_l = bind_in(ns, addr);
            std_l.set_nonblocking(true).expect("nonblocking");
            let l = tokio::net::TcpListener::from_std(std_l).expect("tokio listener");
            let n = Arc::clone(&tcp_accepted);
            tasks.push(tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    n.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        let _ = s.write_all(b"upstream\n").await;
                        let _ = s.shutdown().await;
                    });
                }
            }));
        }
        let udp = ns
            .run(|| UdpSocket::bind("0.0.0.0:53"))
            .expect("enter netns")
            .expect("bind udp 53");
        udp.set_nonblocking(true).expect("nonblocking");
        let udp = tokio::net::UdpSocket::from_std(udp).expect("tokio udp");
        let n = Arc::clone(&udp_received);
        tasks.push(tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = udp.recv_from(&mut buf).await {
                n.fetch_add(1, Ordering::Relaxed);
                let _ = udp.send_to(b"dns-reply", from).await;
            }
        }));
        Self {
            tcp_accepted,
            udp_received,
            tasks,
        }
    }
}

impl Drop for UpstreamHost {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A UDP responder inside a namespace (the stand-in proxy DNS port).
pub fn udp_responder(
    ns: &Netns,
    addr: SocketAddr,
    reply: &'static [u8],
) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let sock = ns
        .run(move || UdpSocket::bind(addr))
        .expect("enter netns")
        .expect("bind udp");
    sock.set_nonblocking(true).expect("nonblocking");
    let sock = tokio::net::UdpSocket::from_std(sock).expect("tokio udp");
    let n = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&n);
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((_, from)) = sock.recv_from(&mut buf).await {
            count.fetch_add(1, Ordering::Relaxed);
            let _ = sock.send_to(reply, from).await;
        }
    });
    (n, task)
}

/// Raise this process's open-file limit to its hard limit (1,000-connection tests).
pub fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
