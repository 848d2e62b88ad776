//! Transparent (kernel-redirected) TLS connections, and the TLS interception they share with
//! cooperative `CONNECT` tunnels.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::admission::{Admission, Vet};
use super::io::IdleIo;
use super::{ConnInfo, Pipeline, original_dst, passthrough, plain, reset};
use crate::audit::ConnId;
use crate::http::{RequestContext, UpstreamStream, serve_denial};
use crate::labels::{Direction, Leg, Rejection};
use crate::net::dial;
use crate::policy::Mode;
use crate::tls::{
    ClientHello, HelloError, TlsError, UpstreamAlpn, agent_alpn_for, peek_client_hello,
};

/// Serves one connection accepted on a transparent listener.
pub(super) async fn serve(p: Arc<Pipeline>, stream: TcpStream, conn: ConnId) {
    let Some(dst) = destination(&p, &stream, conn) else {
        reset(&stream);
        return;
    };
    tracing::Span::current().record("dst", tracing::field::display(dst));
    if p.plain_http_ports.contains(&dst.port()) {
        // Boxed: a plain-HTTP connection's states must not size every TLS connection's task.
        Box::pin(plain::serve(p, stream, dst, conn)).await;
        return;
    }
    let deadline = Instant::now() + p.limits.handshake_timeout;
    let info = ConnInfo {
        conn,
        mode: Mode::Transparent,
        dst: Some(dst),
        sni: None,
        port: dst.port(),
    };
    let hello = match peek_client_hello(
        &stream,
        p.limits.max_client_hello_bytes,
        p.limits.handshake_timeout,
    )
    .await
    {
        Ok(hello) => hello,
        Err(e) => {
            let (rejection, reason) = hello_rejection(&e);
            if rejection == Rejection::HandshakeFailed {
                p.metrics.handshake_failed(Leg::Agent);
            }
            let _ = p.refuse(&info, rejection, &reason);
            reset(&stream);
            return;
        }
    };
    let Some(sni) = hello.server_name().map(str::to_owned) else {
        let _ = p.refuse(
            &info,
            Rejection::NoSni,
            "the ClientHello carries no server name",
        );
        reset(&stream);
        return;
    };
    tracing::Span::current().record("sni", sni.as_str());
    let info = ConnInfo {
        sni: Some(&sni),
        ..info
    };
    // Boxed: the decision (policy, DNS, vetting) is a large future that does not outlive it,
    // and this one lasts as long as the connection.
    let admitted = Box::pin(p.admission(
        &stream,
        &info,
        &sni,
        Vet::OriginalDst(dst.ip()),
        p.deny_page,
        deadline,
    ))
    .await;
    let (host, addrs) = match admitted {
        Admission::Admitted {
            host,
            addrs,
            passthrough: true,
        } => {
            Box::pin(passthrough::serve(
                &p,
                stream,
                &host,
                dst.port(),
                &addrs,
                deadline,
                &info,
            ))
            .await;
            return;
        }
        Admission::Admitted { host, addrs, .. } => (host, addrs),
        Admission::Denied { reason } => {
            Box::pin(deny_page(&p, stream, &sni, &hello, &reason)).await;
            return;
        }
        Admission::Refused => return,
    };
    // Each later state is boxed where it starts (see `intercept`), so this future stays small
    // while the connection is served.
    Box::pin(intercept(
        &p,
        stream,
        &host,
        dst.port(),
        &hello,
        &addrs,
        deadline,
        &info,
    ))
    .await;
}

/// The connection's original destination, or `None` after refusing it (the caller resets).
/// Nothing says where the agent was going, so nothing is guessed (a default, the addresses of
/// the SNI): the connection is refused. Its port is unknown, so the record says 0.
fn destination(p: &Pipeline, stream: &TcpStream, conn: ConnId) -> Option<SocketAddr> {
    match original_dst(p.origdst.as_ref(), stream) {
        Ok(dst) => Some(dst),
        Err(reason) => {
            let info = ConnInfo {
                conn,
                mode: Mode::Transparent,
                dst: None,
                sni: None,
                port: 0,
            };
            let _ = p.refuse(&info, Rejection::NoOriginalDst, &reason);
            None
        }
    }
}

/// The rejection reason for a `ClientHello` that could not be read.
fn hello_rejection(e: &TlsError) -> (Rejection, String) {
    match e {
        TlsError::Hello(HelloError::NoSni) => (
            Rejection::NoSni,
            "the ClientHello carries no server name".to_owned(),
        ),
        TlsError::Hello(HelloError::NotTls) => (
            Rejection::HandshakeFailed,
            "not TLS on a TLS port".to_owned(),
        ),
        other => (Rejection::HandshakeFailed, other.to_string()),
    }
}

/// A denied (and audited) TLS host: finish the handshake with a forged leaf and answer every
/// request with the 403 page.
async fn deny_page(p: &Pipeline, stream: TcpStream, name: &str, hello: &ClientHello, reason: &str) {
    let io = IdleIo::new(stream, p.limits.idle_timeout, None);
    let accepted =
        tokio::time::timeout(p.limits.handshake_timeout, p.mitm.accept(io, hello.alpn())).await;
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            p.metrics.handshake_failed(Leg::Agent);
            tracing::debug!(error = %e, "agent handshake for the denial page failed");
            return;
        }
        Err(_) => {
            p.metrics.handshake_failed(Leg::Agent);
            return;
        }
    };
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    if let Err(e) = serve_denial(tls, alpn.as_deref(), name, reason).await {
        tracing::debug!(error = %e, "denial page connection ended with an error");
    }
}

/// Upstream first (dial the vetted addresses, TLS with the agent's ALPN offer), then the
/// agent's handshake offering what upstream chose, then the request loop.
///
/// When upstream's answer to this exact offer is already known (see [`AlpnCache`]), the probe
/// is skipped: the agent is offered the known protocol and the pool dials (or reuses) the
/// upstream connection for the first request, where the certificate is verified as always.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site per mode; a struct adds nothing"
)]
pub(super) async fn intercept(
    p: &Pipeline,
    stream: TcpStream,
    host: &str,
    port: u16,
    hello: &ClientHello,
    addrs: &[std::net::IpAddr],
    deadline: Instant,
    info: &ConnInfo<'_>,
) {
    let mode = info.mode;
    let offer = UpstreamAlpn::from_agent_offer(hello.alpn());
    let upstream_alpn = if let Some(known) = p.alpn_cache.get(host, port, offer) {
        known.chosen
    } else {
        let Some(upstream) = Box::pin(probe_upstream(p, host, port, offer, addrs, deadline)).await
        else {
            reset(&stream);
            return;
        };
        let alpn = upstream.alpn.clone();
        p.alpn_cache.put(host, port, offer, alpn.clone());
        // The probe connection serves the agent's first request (or expires unused).
        p.connector.hand_over(
            host,
            port,
            UpstreamStream {
                io: Box::new(upstream.stream),
                alpn: upstream.alpn,
            },
        );
        alpn
    };
    let agent_alpn = agent_alpn_for(upstream_alpn.as_deref(), hello.alpn());
    // Boxed, and the stream boxed once accepted: a future keeps room for every value it
    // ever held (moved-from arguments included), so a TLS stream (about 1.3 KB) held by value
    // would be paid for at each layer below, for the connection's whole life.
    let Some(agent) = Box::pin(accept_agent(
        p,
        stream,
        host,
        &agent_alpn,
        hello,
        deadline,
        mode,
    ))
    .await
    else {
        return;
    };
    let agent = Box::new(agent);
    let negotiated = agent.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let ctx = RequestContext {
        run: p.run.clone(),
        host: host.to_owned(),
        port,
        sni: Some(host.to_owned()),
    };
    // Boxed: what serves requests is the one state that lasts, so the handshake's states
    // must not be carried along in the same allocation.
    let served = Box::pin(p.serve_requests(agent, negotiated.as_deref(), ctx, info)).await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "agent connection ended with an error");
    }
}

type UpstreamTlsStream = crate::tls::UpstreamConnection<IdleIo<TcpStream>>;

/// Dials the vetted addresses and completes upstream TLS offering `offer`.
async fn probe_upstream(
    p: &Pipeline,
    host: &str,
    port: u16,
    offer: UpstreamAlpn,
    addrs: &[std::net::IpAddr],
    deadline: Instant,
) -> Option<UpstreamTlsStream> {
    let started = std::time::Instant::now();
    let remaining = deadline.saturating_duration_since(Instant::now());
    let dialed =
        match tokio::time::timeout(remaining, dial(addrs, port, p.connector.dial_settings())).await
        {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "upstream dial failed");
                return None;
            }
            Err(_) => {
                tracing::warn!("upstream dial timed out");
                return None;
            }
        };
    let upstream_addr: SocketAddr = dialed.addr;
    tracing::debug!(%upstream_addr, "upstream connected");
    let remaining = deadline.saturating_duration_since(Instant::now());
    let connected = tokio::time::timeout(
        remaining,
        p.upstream_tls
            .connect(p.connector.wrap(dialed.stream), host, offer),
    )
    .await;
    match connected {
        Ok(Ok(u)) => {
            p.metrics.observe_upstream_latency(started.elapsed());
            Some(u)
        }
        Ok(Err(e)) => {
            p.metrics.handshake_failed(Leg::Upstream);
            p.metrics.rejected(Rejection::HandshakeFailed);
            tracing::warn!(error = %e, "upstream TLS handshake failed");
            None
        }
        Err(_) => {
            p.metrics.handshake_failed(Leg::Upstream);
            p.metrics.rejected(Rejection::HandshakeFailed);
            tracing::warn!("upstream TLS handshake timed out");
            None
        }
    }
}

type AgentTlsStream = tokio_rustls::server::TlsStream<IdleIo<TcpStream>>;

/// Completes the agent's handshake with a forged leaf, offering `agent_alpn`.
async fn accept_agent(
    p: &Pipeline,
    stream: TcpStream,
    host: &str,
    agent_alpn: &[Vec<u8>],
    hello: &ClientHello,
    deadline: Instant,
    mode: Mode,
) -> Option<AgentTlsStream> {
    let agent_io = IdleIo::new(
        stream,
        p.limits.idle_timeout,
        Some((
            Arc::clone(&p.metrics),
            Direction::AgentToUpstream,
            Direction::UpstreamToAgent,
        )),
    );
    let remaining = deadline.saturating_duration_since(Instant::now());
    let accepted = if mode == Mode::Connect && hello.server_name().is_none() {
        // A CONNECT to an IP literal: the client sends no SNI; serve the leaf for the authority.
        match crate::tls::LeafName::parse(host)
            .and_then(|name| p.mitm.server_config_for_name(&name, agent_alpn))
        {
            Ok(config) => tokio::time::timeout(
                remaining,
                tokio_rustls::TlsAcceptor::from(config).accept(agent_io),
            )
            .await
            .map(|r| {
                r.map_err(|source| TlsError::Handshake {
                    leg: crate::tls::Leg::Agent,
                    source,
                })
            }),
            Err(e) => Ok(Err(e)),
        }
    } else {
        tokio::time::timeout(remaining, p.mitm.accept(agent_io, agent_alpn)).await
    };
    match accepted {
        Ok(Ok(a)) => Some(a),
        Ok(Err(e)) => {
            p.metrics.handshake_failed(Leg::Agent);
            p.metrics.rejected(Rejection::HandshakeFailed);
            tracing::info!(error = %e, "agent TLS handshake failed");
            None
        }
        Err(_) => {
            p.metrics.handshake_failed(Leg::Agent);
            p.metrics.rejected(Rejection::HandshakeFailed);
            tracing::info!("agent TLS handshake timed out");
            None
        }
    }
}

/// What each upstream chose for each ALPN offer, remembered for a minute.
///
/// Keyed by the exact offer, so the agent is never offered a protocol it did not offer. An
/// upstream that changes its mind inside the minute still works: the pool speaks whatever
/// the real upstream connection negotiates, translating between HTTP/1.1 and HTTP/2.
#[derive(Debug)]
pub(super) struct AlpnCache {
    entries: quick_cache::sync::Cache<AlpnKey, KnownAlpn>,
}

type AlpnKey = (String, u16, Vec<Vec<u8>>);

/// Upstream's choice (`None`: no ALPN, i.e. HTTP/1.1) and when it was learned.
#[derive(Debug, Clone)]
struct KnownAlpn {
    chosen: Option<Vec<u8>>,
    learned: Instant,
}

const ALPN_CACHE_TTL: std::time::Duration = std::time::Duration::from_mins(1);

impl AlpnCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            entries: quick_cache::sync::Cache::new(capacity.max(1)),
        }
    }

    fn get(&self, host: &str, port: u16, offer: UpstreamAlpn) -> Option<KnownAlpn> {
        let key = (host.to_owned(), port, offer.protocols());
        self.entries
            .get(&key)
            .filter(|k| k.learned.elapsed() < ALPN_CACHE_TTL)
    }

    fn put(&self, host: &str, port: u16, offer: UpstreamAlpn, chosen: Option<Vec<u8>>) {
        self.entries.insert(
            (host.to_owned(), port, offer.protocols()),
            KnownAlpn {
                chosen,
                learned: Instant::now(),
            },
        );
    }
}
