//! Dialling vetted upstream addresses.
//!
//! Addresses are tried in the order given (vetting puts the transparent-mode original
//! destination first), each with its own connect timeout, all within a total budget. The
//! outgoing socket can carry an `SO_MARK` so the eBPF programs let the proxy's own traffic
//! through instead of redirecting it back to the proxy. Setting the mark needs `CAP_NET_ADMIN`;
//! if it fails the dial fails (an unmarked socket would loop back into the proxy).

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Dial settings.
#[derive(Debug, Clone)]
pub struct DialSettings {
    /// Connect timeout for one address.
    pub attempt_timeout: Duration,
    /// Time for all attempts together.
    pub total_budget: Duration,
    /// `SO_MARK` for outgoing sockets (the eBPF bypass mark).
    pub mark: Option<u32>,
}

impl Default for DialSettings {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(5),
            total_budget: Duration::from_secs(15),
            mark: None,
        }
    }
}

/// One failed connect attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptError {
    pub addr: SocketAddr,
    pub kind: io::ErrorKind,
    pub detail: String,
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.addr, self.detail)
    }
}

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no vetted addresses to dial")]
    NoAddresses,
    #[error("cannot create the upstream socket: {0}")]
    Socket(io::Error),
    #[error("cannot set SO_MARK {mark:#x} on the upstream socket: {source}")]
    SetMark { mark: u32, source: io::Error },
    #[error("could not connect upstream{}: {}", if *budget_exhausted { " within the dial budget" } else { "" }, join(attempts))]
    Exhausted {
        attempts: Vec<AttemptError>,
        budget_exhausted: bool,
    },
}

fn join(attempts: &[AttemptError]) -> String {
    if attempts.is_empty() {
        return "no attempt made".to_owned();
    }
    attempts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A connected upstream stream.
#[derive(Debug)]
pub struct Dialed {
    pub stream: TcpStream,
    /// The address that answered.
    pub addr: SocketAddr,
    /// Addresses tried before it.
    pub failed: Vec<AttemptError>,
}

/// Connects to the first of `addrs` (all on `port`) that accepts.
pub async fn dial(
    addrs: &[IpAddr],
    port: u16,
    settings: &DialSettings,
) -> Result<Dialed, DialError> {
    if addrs.is_empty() {
        return Err(DialError::NoAddresses);
    }
    let deadline = Instant::now() + settings.total_budget;
    let mut failed = Vec::new();
    for ip in addrs {
        let addr = SocketAddr::new(*ip, port);
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(DialError::Exhausted {
                attempts: failed,
                budget_exhausted: true,
            });
        }
        let socket = new_socket(addr, settings.mark)?;
        let limit = settings.attempt_timeout.min(remaining);
        match tokio::time::timeout(limit, socket.connect(addr)).await {
            Ok(Ok(stream)) => {
                // Latency matters more than packet count for proxied request/response traffic.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, %addr, "cannot set TCP_NODELAY upstream");
                }
                return Ok(Dialed {
                    stream,
                    addr,
                    failed,
                });
            }
            Ok(Err(e)) => failed.push(AttemptError {
                addr,
                kind: e.kind(),
                detail: e.to_string(),
            }),
            Err(_) => failed.push(AttemptError {
                addr,
                kind: io::ErrorKind::TimedOut,
                detail: format!("connect timed out after {limit:?}"),
            }),
        }
    }
    let budget_exhausted = Instant::now() >= deadline;
    Err(DialError::Exhausted {
        attempts: failed,
        budget_exhausted,
    })
}

fn new_socket(addr: SocketAddr, mark: Option<u32>) -> Result<TcpSocket, DialError> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(DialError::Socket)?;
    if let Some(mark) = mark {
        socket
            .set_mark(mark)
            .map_err(|source| DialError::SetMark { mark, source })?;
    }
    socket.set_nonblocking(true).map_err(DialError::Socket)?;
    Ok(TcpSocket::from_std_stream(socket.into()))
}

/// The `SO_MARK` of a connected stream (for diagnostics and tests).
pub fn socket_mark(stream: &TcpStream) -> io::Result<u32> {
    SockRef::from(stream).mark()
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test ip")
    }

    fn quick() -> DialSettings {
        DialSettings {
            attempt_timeout: Duration::from_millis(300),
            total_budget: Duration::from_secs(2),
            mark: None,
        }
    }

    /// A listener whose accept queue is full, so further SYNs go unanswered.
    fn full_listener(addr: &str) -> (Socket, Vec<std::net::TcpStream>, u16) {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        sock.bind(&addr.parse::<SocketAddr>().expect("addr").into())
            .expect("bind");
        sock.listen(0).expect("listen");
        let local = sock.local_addr().expect("local").as_socket().expect("inet");
        let mut fillers = Vec::new();
        for _ in 0..4 {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
            s.set_nonblocking(true).expect("nonblocking");
            let _ = s.connect(&local.into());
            fillers.push(s.into());
        }
        // Let the handshakes that can complete complete.
        std::thread::sleep(Duration::from_millis(100));
        (sock, fillers, local.port())
    }

    #[tokio::test]
    async fn falls_back_from_a_closed_port_to_an_open_one() {
        let open = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = open.local_addr().expect("addr").port();
        // Nothing listens on 127.0.0.2:port (the listener is bound to 127.0.0.1 only).
        let dialed = dial(&[ip("127.0.0.2"), ip("127.0.0.1")], port, &quick())
            .await
            .expect("dials");
        assert_eq!(dialed.addr, SocketAddr::new(ip("127.0.0.1"), port));
        assert_eq!(dialed.failed.len(), 1);
        assert_eq!(
            dialed.failed[0].addr,
            SocketAddr::new(ip("127.0.0.2"), port)
        );
        assert_eq!(dialed.failed[0].kind, io::ErrorKind::ConnectionRefused);
        let (accepted, peer) = open.accept().await.expect("accept");
        assert_eq!(peer, dialed.stream.local_addr().expect("local"));
        drop(accepted);
    }

    #[tokio::test]
    async fn all_refused_reports_every_attempt() {
        let gone = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = gone.local_addr().expect("addr").port();
        drop(gone);
        let err = dial(&[ip("127.0.0.1"), ip("127.0.0.3")], port, &quick())
            .await
            .err();
        match err {
            Some(DialError::Exhausted {
                attempts,
                budget_exhausted: false,
            }) => {
                assert_eq!(attempts.len(), 2);
                assert!(
                    attempts
                        .iter()
                        .all(|a| a.kind == io::ErrorKind::ConnectionRefused)
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            dial(&[], port, &quick()).await,
            Err(DialError::NoAddresses)
        ));
    }

    #[tokio::test]
    async fn unanswered_address_times_out_then_falls_back() {
        let (_full, _fillers, port) = full_listener("127.0.0.1:0");
        let open = TcpListener::bind(("127.0.0.2", port))
            .await
            .expect("bind second");
        let started = Instant::now();
        let settings = DialSettings {
            attempt_timeout: Duration::from_millis(200),
            ..quick()
        };
        let dialed = dial(&[ip("127.0.0.1"), ip("127.0.0.2")], port, &settings)
            .await
            .expect("dials the second address");
        assert_eq!(dialed.addr.ip(), ip("127.0.0.2"));
        assert_eq!(
            dialed.failed.first().map(|a| a.kind),
            Some(io::ErrorKind::TimedOut)
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(open);
    }

    #[tokio::test]
    async fn total_budget_bounds_the_dial() {
        let (_full, _fillers, port) = full_listener("127.0.0.1:0");
        let settings = DialSettings {
            attempt_timeout: Duration::from_secs(5),
            total_budget: Duration::from_millis(250),
            mark: None,
        };
        let started = Instant::now();
        let err = dial(&[ip("127.0.0.1"), ip("127.0.0.1")], port, &settings)
            .await
            .err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            matches!(err, Some(DialError::Exhausted { budget_exhausted: true, ref attempts }) if attempts.len() == 1),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn mark_is_set_or_the_dial_fails_closed() {
        let open = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = open.local_addr().expect("addr").port();
        let settings = DialSettings {
            mark: Some(0x5add),
            ..quick()
        };
        let result = dial(&[ip("127.0.0.1")], port, &settings).await;
        if nix::unistd::geteuid().is_root() {
            let dialed = result.expect("root may set SO_MARK");
            assert_eq!(socket_mark(&dialed.stream).expect("mark"), 0x5add);
        } else {
            assert!(
                matches!(result, Err(DialError::SetMark { mark: 0x5add, .. })),
                "unprivileged dial must fail, not go out unmarked: {result:?}"
            );
        }
    }
}
