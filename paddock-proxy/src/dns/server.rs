//! Serving the DNS server on UDP sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::{Admission, DnsServer, SUMMARY_INTERVAL};
use crate::labels::DnsOutcome;

/// Largest datagram read; anything longer arrives cut and fails to parse (FORMERR).
const MAX_QUERY: usize = 4096;
/// Pause after a failed receive, so a socket that keeps failing cannot spin a core.
const RECV_ERROR_PAUSE: Duration = Duration::from_millis(10);

/// Binds a UDP socket for the server (the `[dns] listen` addresses in `serve` mode). IPv6
/// sockets are IPv6-only, so `[::]:53` and `0.0.0.0:53` can both be bound.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

impl DnsServer {
    /// Serves `socket` (already bound, in whatever network namespace it was bound in) until
    /// `stop` turns true. Takes a `std` socket so callers can bind it anywhere (the command's
    /// namespace in `run` mode); it is made non-blocking here. Call it once per socket on one
    /// shared server.
    pub async fn serve_udp(
        self: Arc<Self>,
        socket: std::net::UdpSocket,
        mut stop: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        socket.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(socket)?);
        let local = socket.local_addr()?;
        tracing::info!(addr = %local, run = %self.run, "DNS server listening");
        let mut buf = vec![0u8; MAX_QUERY];
        let stopped = async move {
            // The guard `wait_for` returns is not `Send`: drop it at once.
            let _ = stop.wait_for(|s| *s).await;
        };
        tokio::pin!(stopped);
        let mut summaries = tokio::time::interval(SUMMARY_INTERVAL);
        summaries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                received = socket.recv_from(&mut buf) => {
                    let (n, peer) = match received {
                        Ok(got) => got,
                        Err(e) => {
                            tracing::debug!(addr = %local, error = %e, "DNS receive failed");
                            tokio::time::sleep(RECV_ERROR_PAUSE).await;
                            continue;
                        }
                    };
                    match self.admit(&buf[..n]) {
                        Admission::Drop => {}
                        Admission::Reply(bytes) => {
                            let _ = socket.send_to(&bytes, peer).await;
                        }
                        Admission::Query(pending) => {
                            let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
                                self.metrics.dns_query(DnsOutcome::Dropped);
                                continue;
                            };
                            let server = Arc::clone(&self);
                            let socket = Arc::clone(&socket);
                            tokio::spawn(async move {
                                if let Some(bytes) = server.answer(*pending).await {
                                    let _ = socket.send_to(&bytes, peer).await;
                                }
                                drop(permit);
                            });
                        }
                    }
                }
                _ = summaries.tick() => self.flush_refusals(),
                () = &mut stopped => break,
            }
        }
        self.flush_refusals();
        Ok(())
    }
}
