//! DNS for the command: its resolv.conf names `127.0.0.1` and `::1`, which inside its network
//! namespace are the UDP sockets `run` bound there (`RunSockets::dns_sockets`).
//!
//! INTEGRATION POINT (DNS): this is a plain forwarder to the resolvers the proxy itself uses,
//! which keeps what the command could do before it had its own namespace (ask the host's
//! resolver anything). The policy-aware DNS server replaces [`relay`] and serves on the same
//! sockets; nothing else changes (the eBPF config already allows exactly these addresses).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::UdpSocket;

/// Queries in flight at once; more are dropped (the client retries).
const MAX_IN_FLIGHT: usize = 128;
/// How long an upstream answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest datagram relayed (EDNS0's common buffer size is 1232-4096).
const MAX_DATAGRAM: usize = 4096;

/// Forward every query arriving on `sockets` to the first of `upstream` and the answer back.
/// Dropping the returned set stops it. With no upstream nothing answers (queries time out).
pub fn relay(
    sockets: Vec<std::net::UdpSocket>,
    upstream: &[SocketAddr],
) -> std::io::Result<tokio::task::JoinSet<()>> {
    let mut tasks = tokio::task::JoinSet::new();
    let Some(&upstream) = upstream.first() else {
        tracing::warn!("no resolver for the command's DNS: lookups inside it will fail");
        return Ok(tasks);
    };
    let cap = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    for s in sockets {
        let sock = Arc::new(UdpSocket::from_std(s)?);
        tasks.spawn(serve(sock, upstream, Arc::clone(&cap)));
    }
    Ok(tasks)
}

async fn serve(sock: Arc<UdpSocket>, upstream: SocketAddr, cap: Arc<tokio::sync::Semaphore>) {
    let mut queries = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, client)) = sock.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        while queries.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&cap).try_acquire_owned() else {
            continue;
        };
        let query = buf[..n].to_vec();
        let sock = Arc::clone(&sock);
        queries.spawn(async move {
            let _permit = permit;
            if let Ok(Some(answer)) = ask(&query, upstream).await {
                let _ = sock.send_to(&answer, client).await;
            }
        });
    }
}

/// One query over a fresh socket of the host's namespace; `None` for a reply that is not an
/// answer to it (different id) or no reply in time.
async fn ask(query: &[u8], upstream: SocketAddr) -> std::io::Result<Option<Vec<u8>>> {
    if query.len() < 12 {
        return Ok(None);
    }
    let local: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let Ok(n) = tokio::time::timeout(ANSWER_TIMEOUT, sock.recv(&mut buf)).await else {
        return Ok(None);
    };
    let n = n?;
    if n < 12 || buf[..2] != query[..2] {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some(buf))
}
