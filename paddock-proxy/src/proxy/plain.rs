//! Plain HTTP (original port in `plain_http_ports`): the name comes from the `Host` header and
//! is policy-checked and vetted exactly like a TLS SNI.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::admission::{Admission, Vet};
use super::head::{ParsedHead, host_of, parse_head};
use super::io::{IdleIo, read_head};
use super::{ConnInfo, Pipeline};
use crate::audit::ConnId;
use crate::http::{RequestContext, serve_denial};
use crate::labels::Direction;
use crate::net::prefixed::PrefixedIo;
use crate::policy::Mode;

const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

pub(super) async fn serve(p: Arc<Pipeline>, stream: TcpStream, dst: SocketAddr, conn: ConnId) {
    let deadline = Instant::now() + p.limits.handshake_timeout;
    let mut io = IdleIo::new(
        stream,
        p.limits.idle_timeout,
        Some((
            Arc::clone(&p.metrics),
            Direction::AgentToUpstream,
            Direction::UpstreamToAgent,
        )),
    );
    let head = tokio::time::timeout(
        p.limits.handshake_timeout,
        read_head(&mut io, p.limits.max_header_bytes),
    )
    .await;
    let (head, rest) = match head {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "no usable plain HTTP request head");
            let _ = io.write_all(BAD_REQUEST).await;
            return;
        }
        Err(_) => {
            tracing::debug!("plain HTTP request head timed out");
            return;
        }
    };
    let host = match parse_head(&head, p.http_limits.max_headers) {
        Ok(ParsedHead {
            host: Some(value), ..
        }) => host_of(value).map(str::to_owned),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(error = %e, "refused plain HTTP request head");
            None
        }
    };
    let Some(host) = host else {
        let _ = io.write_all(BAD_REQUEST).await;
        return;
    };
    tracing::Span::current().record("sni", host.as_str());
    let info = ConnInfo {
        conn,
        mode: Mode::PlainHttp,
        dst: Some(dst),
        sni: Some(&host),
        port: dst.port(),
    };
    let mut replay = head;
    replay.extend_from_slice(&rest);
    let agent = PrefixedIo::new(Bytes::from(replay), io);
    // Each later state boxed where it starts: this future lasts as long as the connection.
    let admitted = Box::pin(p.admission(
        agent.get_ref().get_ref(),
        &info,
        &host,
        Vet::OriginalDst(dst.ip()),
        p.deny_page,
        deadline,
    ))
    .await;
    let normalized = match admitted {
        Admission::Admitted { host, .. } => host,
        Admission::Denied { reason } => {
            if let Err(e) = Box::pin(serve_denial(agent, None, &host, &reason)).await {
                tracing::debug!(error = %e, "denial page connection ended with an error");
            }
            return;
        }
        Admission::Refused => return,
    };
    let ctx = RequestContext {
        run: p.run.clone(),
        host: normalized,
        port: dst.port(),
        sni: None,
    };
    let served = Box::pin(p.serve_requests(agent, None, ctx, &info)).await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "plain HTTP connection ended with an error");
    }
}
