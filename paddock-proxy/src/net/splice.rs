//! Relaying bytes between two TCP sockets inside the kernel with `splice(2)`: socket -> pipe
//! -> socket, so a pass-through connection's payload is never copied into the proxy.
//!
//! Each direction owns a pipe (non-blocking, close-on-exec). Readiness comes from tokio's
//! reactor (`readable`/`writable` + `try_io`), so the relay is an ordinary task. An end of
//! stream is passed on as a half-close (`shutdown(SHUT_WR)`) and the other direction goes on
//! until it ends too; the relay ends when both have, when neither moved a byte for the idle
//! timeout, when `stop` fires, or on the first error.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per `splice` call at most (the default pipe holds 64 KiB).
const CHUNK: usize = 64 * 1024;

/// What a relay moved, and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// Agent to upstream.
    pub up: u64,
    /// Upstream to agent.
    pub down: u64,
    pub end: RelayEnd,
}

/// Why a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides finished sending.
    Closed,
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// The caller's stop signal (drain, policy withdrawn).
    Stopped,
}

/// One direction's pipe.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Self { read, write })
    }
}

/// Milliseconds since `origin`, for the shared last-activity stamp.
fn stamp(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Moves everything `from` sends to `to` until `from` ends its stream, then half-closes `to`.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    moved: &AtomicU64,
    active: &AtomicU64,
    origin: Instant,
) -> io::Result<()> {
    let pipe = Pipe::new()?;
    loop {
        from.readable().await?;
        let filled = from.try_io(Interest::READABLE, || {
            splice(
                from.as_fd(),
                None,
                pipe.write.as_fd(),
                None,
                CHUNK,
                SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
            )
            .map_err(io::Error::from)
        });
        let mut pending = match filled {
            Ok(0) => {
                // End of stream: pass the half-close on.
                let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        active.store(stamp(origin), Ordering::Relaxed);
        while pending > 0 {
            to.writable().await?;
            let drained = to.try_io(Interest::WRITABLE, || {
                splice(
                    pipe.read.as_fd(),
                    None,
                    to.as_fd(),
                    None,
                    pending,
                    SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
                )
                .map_err(io::Error::from)
            });
            match drained {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    pending -= n;
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                    active.store(stamp(origin), Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Relays between `agent` and `upstream` in both directions (see the module docs).
pub async fn relay(
    agent: &TcpStream,
    upstream: &TcpStream,
    idle: Duration,
    stop: impl Future<Output = ()>,
) -> io::Result<Relayed> {
    let origin = Instant::now();
    let (up, down, active) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let both = async {
        let (a, b) = tokio::join!(
            one_way(agent, upstream, &up, &active, origin),
            one_way(upstream, agent, &down, &active, origin),
        );
        a.and(b)
    };
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX).max(1);
    let watch = async {
        loop {
            let last = active.load(Ordering::Relaxed);
            let quiet = stamp(origin).saturating_sub(last);
            if quiet >= idle_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(idle_ms - quiet)).await;
        }
    };
    let end = tokio::select! {
        r = both => { r?; RelayEnd::Closed }
        () = watch => RelayEnd::Idle,
        () = stop => RelayEnd::Stopped,
    };
    Ok(Relayed {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
        end,
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    #[tokio::test]
    async fn bytes_both_ways_half_closes_and_counts() {
        // agent_peer <-> [agent | relay | upstream] <-> upstream_peer
        let (mut agent_peer, agent) = pair().await;
        let (upstream, mut upstream_peer) = pair().await;
        let relay = tokio::spawn(async move {
            relay(
                &agent,
                &upstream,
                Duration::from_secs(5),
                std::future::pending(),
            )
            .await
        });
        let big: Vec<u8> = (0..3_000_000_u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            agent_peer.write_all(&sent).await.expect("write");
            agent_peer.shutdown().await.expect("half-close");
            let mut back = Vec::new();
            agent_peer.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, big, "every byte, in order");
        upstream_peer.write_all(b"answer").await.expect("answer");
        upstream_peer.shutdown().await.expect("close");
        assert_eq!(writer.await.expect("join"), b"answer");
        let relayed = relay.await.expect("join").expect("relay");
        assert_eq!(
            relayed,
            Relayed {
                up: 3_000_000,
                down: 6,
                end: RelayEnd::Closed
            }
        );
    }

    #[tokio::test]
    async fn idle_and_stop_end_the_relay() {
        let (_agent_peer, agent) = pair().await;
        let (upstream, _upstream_peer) = pair().await;
        let started = Instant::now();
        let idle = relay(
            &agent,
            &upstream,
            Duration::from_millis(100),
            std::future::pending(),
        )
        .await
        .expect("relay");
        assert_eq!(idle.end, RelayEnd::Idle);
        assert!(started.elapsed() >= Duration::from_millis(100));
        let stopped = relay(&agent, &upstream, Duration::from_mins(1), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
        })
        .await
        .expect("relay");
        assert_eq!(stopped.end, RelayEnd::Stopped);
    }
}
