//! `--publish [ADDR:]HOSTPORT:PORT`: an inbound port into the command's network namespace.
//!
//! The command has only loopback: nothing outside can reach a server it starts unless the
//! operator publishes its port. `run` then listens on the host side (default `127.0.0.1`) and,
//! for each connection, creates a socket inside the command's namespace and connects to
//! `127.0.0.1:PORT` (then `[::1]:PORT`) there, copying both ways. Connections are capped and
//! logged, and all of them close when the run ends.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};

use paddock_proxy::netns::{NetnsEntry, OwnedNetns};

/// Concurrent published connections over all ports; more are refused (closed).
pub const MAX_CONNECTIONS: usize = 256;
/// How long connecting to the command's port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish {
    /// Where `run` listens on the host.
    pub host: SocketAddr,
    /// The command's port (inside its namespace, on loopback).
    pub port: u16,
}

/// A `--publish` value that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid --publish {value:?}: {why} (expected PORT, HOSTPORT:PORT or ADDR:HOSTPORT:PORT)")]
pub struct PublishParseError {
    value: String,
    why: &'static str,
}

fn port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|&p| p != 0)
}

impl FromStr for Publish {
    type Err = PublishParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| PublishParseError {
            value: s.to_owned(),
            why,
        };
        let (rest, inner) = match s.rsplit_once(':') {
            Some((rest, p)) => (Some(rest), p),
            None => (None, s),
        };
        let inner = port(inner).ok_or_else(|| err("the port must be 1-65535"))?;
        let (addr, host_port) = match rest {
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), inner),
            Some(rest) => {
                let (addr, hp) = match rest.rsplit_once(':') {
                    // `[v6]:HOSTPORT` or `v4:HOSTPORT`; a bare v6 address needs brackets.
                    Some((a, hp)) => {
                        let a = a
                            .strip_prefix('[')
                            .and_then(|a| a.strip_suffix(']'))
                            .map_or_else(
                                || a.parse::<Ipv4Addr>().map(IpAddr::V4),
                                |a| a.parse::<Ipv6Addr>().map(IpAddr::V6),
                            );
                        (
                            a.map_err(|_| err("not an IP address (IPv6 in brackets)"))?,
                            hp,
                        )
                    }
                    None => (IpAddr::V4(Ipv4Addr::LOCALHOST), rest),
                };
                (
                    addr,
                    port(hp).ok_or_else(|| err("the host port must be 1-65535"))?,
                )
            }
        };
        Ok(Self {
            host: SocketAddr::new(addr, host_port),
            port: inner,
        })
    }
}

/// Why a published port could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("--publish: cannot listen on {addr}: {source}")]
pub struct PublishError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// The forwarders; dropping this closes every listener and connection.
#[derive(Debug, Default)]
pub struct Published {
    tasks: tokio::task::JoinSet<()>,
}

/// Bind every host-side listener (all or nothing), then forward in the background.
pub async fn publish(netns: Arc<OwnedNetns>, ports: &[Publish]) -> Result<Published, PublishError> {
    let mut listeners = Vec::new();
    for p in ports {
        let l = TcpListener::bind(p.host)
            .await
            .map_err(|source| PublishError {
                addr: p.host,
                source,
            })?;
        listeners.push((l, *p));
    }
    let cap = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut published = Published::default();
    for (listener, p) in listeners {
        tracing::info!(host = %p.host, port = p.port, "publishing the command's port");
        published.tasks.spawn(accept_loop(
            listener,
            p,
            Arc::clone(&netns),
            Arc::clone(&cap),
        ));
    }
    Ok(published)
}

async fn accept_loop(
    listener: TcpListener,
    p: Publish,
    netns: Arc<OwnedNetns>,
    cap: Arc<tokio::sync::Semaphore>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept on a published port failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&cap).try_acquire_owned() else {
            tracing::warn!(%peer, port = p.port, "published connection cap reached; closing");
            continue;
        };
        // Reap finished connections as we go so the set stays small.
        while conns.try_join_next().is_some() {}
        let netns = Arc::clone(&netns);
        conns.spawn(async move {
            let _permit = permit;
            match forward(&netns, stream, p.port).await {
                Ok((up, down)) => {
                    tracing::info!(%peer, port = p.port, up, down, "published connection closed");
                }
                Err(e) => {
                    tracing::info!(%peer, port = p.port, error = %e, "published connection failed");
                }
            }
        });
    }
}

/// A TCP socket created inside a network namespace (so it connects to *its* loopback): the
/// command's, or a pod's.
pub(crate) fn socket_in(
    netns: &impl NetnsEntry,
    target: SocketAddr,
) -> std::io::Result<tokio::net::TcpSocket> {
    let sock = netns
        .run_in(move || {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(target),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(std::net::TcpStream::from(s))
        })
        .map_err(std::io::Error::other)??;
    Ok(tokio::net::TcpSocket::from_std_stream(sock))
}

async fn forward(
    netns: &OwnedNetns,
    mut inbound: TcpStream,
    port: u16,
) -> std::io::Result<(u64, u64)> {
    let mut last = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    for ip in [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ] {
        let target = SocketAddr::new(ip, port);
        let sock = match socket_in(netns, target) {
            Ok(s) => s,
            Err(e) => {
                last = e;
                continue;
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(target)).await {
            Ok(Ok(mut out)) => return tokio::io::copy_bidirectional(&mut inbound, &mut out).await,
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::Error::from(std::io::ErrorKind::TimedOut),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Publish, PublishParseError> {
        s.parse()
    }

    #[test]
    fn parses_port_hostport_and_address_forms() {
        assert_eq!(
            p("8080").expect("port"),
            Publish {
                host: "127.0.0.1:8080".parse().expect("addr"),
                port: 8080
            }
        );
        assert_eq!(
            p("9000:80").expect("hostport"),
            Publish {
                host: "127.0.0.1:9000".parse().expect("addr"),
                port: 80
            }
        );
        assert_eq!(
            p("0.0.0.0:9000:80").expect("v4"),
            Publish {
                host: "0.0.0.0:9000".parse().expect("addr"),
                port: 80
            }
        );
        assert_eq!(
            p("[::1]:9000:80").expect("v6"),
            Publish {
                host: "[::1]:9000".parse().expect("addr"),
                port: 80
            }
        );
    }

    #[test]
    fn refuses_bad_ports_and_addresses() {
        for bad in [
            "",
            "0",
            "65536",
            "x",
            "9000:0",
            "0:80",
            "::1:9000:80",
            "host:9000:80",
            "1.2.3:1:2",
            "[::1]:80",
            ":80",
            "80:",
        ] {
            let e = p(bad).expect_err(bad);
            assert!(e.to_string().contains("--publish"), "{e}");
        }
    }
}
