//! The cooperative HTTP/1.1 `CONNECT` listener (opt-in): the client names `host:port`, the
//! tunnel carries TLS that is intercepted like a transparent connection. There is no original
//! destination, so there is no rebinding check: the proxy dials only what it resolved itself.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::admission::{Admission, Vet};
use super::head::{host_of, parse_head};
use super::io::read_head;
use super::{ConnInfo, Pipeline, passthrough, reset, transparent};
use crate::audit::ConnId;
use crate::labels::{Leg, Rejection};
use crate::policy::Mode;
use crate::tls::peek_client_hello;

/// `host:port` of a `CONNECT` target (authority form only).
pub(crate) fn parse_authority(target: &str) -> Option<(&str, u16)> {
    let (_, port) = target.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = host_of(target)?;
    Some((host, port))
}

async fn answer(stream: &mut TcpStream, status: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[expect(
    clippy::too_many_lines,
    reason = "one linear sequence of pipeline steps; splitting it hides the order"
)]
pub(super) async fn serve(p: Arc<Pipeline>, mut stream: TcpStream, conn: ConnId) {
    let deadline = Instant::now() + p.limits.handshake_timeout;
    let head = tokio::time::timeout(
        p.limits.handshake_timeout,
        read_head(&mut stream, p.limits.max_header_bytes),
    )
    .await;
    let (head, rest) = match head {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "no usable CONNECT request head");
            answer(&mut stream, "400 Bad Request", "").await;
            return;
        }
        Err(_) => return,
    };
    let parsed = match parse_head(&head, p.http_limits.max_headers) {
        Ok(parsed) => parsed,
        Err(e) => {
            tracing::debug!(error = %e, "refused CONNECT request head");
            answer(&mut stream, "400 Bad Request", &format!("{e}\n")).await;
            return;
        }
    };
    if parsed.method != "CONNECT" {
        answer(
            &mut stream,
            "405 Method Not Allowed",
            "this listener only accepts CONNECT\n",
        )
        .await;
        return;
    }
    let Some((name, port)) = parse_authority(parsed.target).map(|(h, p)| (h.to_owned(), p)) else {
        answer(&mut stream, "400 Bad Request", "CONNECT needs host:port\n").await;
        return;
    };
    if !rest.is_empty() {
        // Bytes before our 200 would be the tunnel's first bytes, sent before the tunnel exists.
        answer(
            &mut stream,
            "400 Bad Request",
            "data before the tunnel was established\n",
        )
        .await;
        return;
    }
    tracing::Span::current().record("sni", name.as_str());
    let info = ConnInfo {
        conn,
        mode: Mode::Connect,
        dst: None,
        sni: Some(&name),
        port,
    };
    // Boxed, as every state that does not last (see `transparent::serve`).
    let admitted = Box::pin(p.admission(&stream, &info, &name, Vet::Name, true, deadline)).await;
    let (host, addrs, passthrough) = match admitted {
        Admission::Admitted {
            host,
            addrs,
            passthrough,
        } => (host, addrs, passthrough),
        Admission::Denied { reason } => {
            answer(
                &mut stream,
                "403 Forbidden",
                &format!("paddock: egress to {name} is denied: {reason}\n"),
            )
            .await;
            return;
        }
        Admission::Refused => return,
    };
    if stream
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let remaining = deadline.saturating_duration_since(Instant::now());
    let hello = match peek_client_hello(&stream, p.limits.max_client_hello_bytes, remaining).await {
        Ok(h) => h,
        Err(e) => {
            p.metrics.handshake_failed(Leg::Agent);
            p.metrics.rejected(Rejection::HandshakeFailed);
            tracing::info!(error = %e, "no TLS inside the CONNECT tunnel");
            reset(&stream);
            return;
        }
    };
    if let Some(sni) = hello.server_name()
        && !sni.eq_ignore_ascii_case(&host)
    {
        // The tunnel was allowed for `host`; TLS for another name must not ride on it.
        p.metrics.rejected(Rejection::PolicyDenied);
        tracing::warn!(
            sni,
            "SNI inside the tunnel differs from the CONNECT authority"
        );
        reset(&stream);
        return;
    }
    if passthrough {
        // The SNI is the authority (checked above) or absent for an IP literal authority.
        Box::pin(passthrough::serve(
            &p, stream, &host, port, &addrs, deadline, &info,
        ))
        .await;
        return;
    }
    Box::pin(transparent::intercept(
        &p, stream, &host, port, &hello, &addrs, deadline, &info,
    ))
    .await;
}

#[cfg(test)]
mod tests {
    use super::parse_authority;

    #[test]
    fn connect_authorities() {
        assert_eq!(
            parse_authority("example.com:443"),
            Some(("example.com", 443))
        );
        assert_eq!(parse_authority("[fd00::1]:8443"), Some(("fd00::1", 8443)));
        assert_eq!(parse_authority("example.com"), None);
        assert_eq!(parse_authority("example.com:0"), None);
        assert_eq!(parse_authority("example.com:http"), None);
        assert_eq!(parse_authority("/path"), None);
        // Found by the `http_head` fuzz target.
        assert_eq!(parse_authority("[]:83"), None);
    }
}
