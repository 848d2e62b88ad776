//! Serving one agent connection: each request is checked, substituted and forwarded.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt as _;
use http::{Extensions, HeaderValue, Method, Request, Response, Version, header};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::audit::{Answer, RequestLine};
use super::body::{self, ProxyBody};
use super::substitute::RequestHead;
use super::{
    ALPN_H2, HttpError, HttpLimits, RequestAudit, RequestContext, Substituted, Substituter,
    UpstreamPool, authority, hop, upgrade,
};
use crate::audit::{AuditOutcome, redact_placeholders, redacted_path};

/// Serves HTTP/2 (agent ALPN `h2`) or HTTP/1.1 (anything else) on `io` until the agent
/// closes, forwarding every request to `ctx`'s destination through `pool`.
///
/// `pool` must be the pool of `ctx.run`: pools are per run so connections, and what was
/// sent on them, never cross runs. Per-request failures are answered on the connection
/// (see [`HttpError::status`]); the returned error is about the connection itself.
///
/// Every request is audited through `audit` once its status is decided. When the record of
/// an answer the proxy gives itself (a refusal or a failure) cannot be written, that answer
/// is not given: the HTTP/2 stream is reset, the HTTP/1.1 connection closed.
///
/// The returned future borrows nothing, so it can be spawned directly.
pub fn serve_connection<I>(
    io: I,
    agent_alpn: Option<&[u8]>,
    ctx: RequestContext,
    pool: UpstreamPool,
    substituter: Arc<dyn Substituter>,
    audit: RequestAudit,
    limits: HttpLimits,
) -> impl Future<Output = Result<(), HttpError>> + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_connection_until(
        io,
        agent_alpn,
        ctx,
        pool,
        substituter,
        audit,
        limits,
        std::future::pending(),
    )
}

/// [`serve_connection`] with a drain signal: once `shutdown` completes, the connection
/// stops taking new requests (HTTP/1.1: closes after the response in flight; HTTP/2:
/// GOAWAY), lets in-flight requests finish, then ends. Bounding the drain is the caller's
/// job (drop the future when the grace period is over).
#[expect(
    clippy::too_many_arguments,
    reason = "the connection's parts, each from a different owner; a struct would only be unpacked here"
)]
pub fn serve_connection_until<I, S>(
    io: I,
    agent_alpn: Option<&[u8]>,
    ctx: RequestContext,
    pool: UpstreamPool,
    substituter: Arc<dyn Substituter>,
    audit: RequestAudit,
    limits: HttpLimits,
    shutdown: S,
) -> impl Future<Output = Result<(), HttpError>> + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    let h2 = agent_alpn == Some(ALPN_H2);
    async move {
        if pool.run() != ctx.run {
            return Err(HttpError::PoolRunMismatch {
                pool_run: pool.run().to_owned(),
                ctx_run: ctx.run,
            });
        }
        let forwarder = Arc::new(Forwarder {
            ctx,
            pool,
            substituter,
            audit,
            via: limits.via.clone(),
            tunnels: upgrade::Tunnels::default(),
        });
        let tunnels = forwarder.tunnels.clone();
        // The drain signal goes to hyper and, after an upgrade, to the tunnels.
        let shutdown = shutdown.shared();
        // An `Unrecorded` error makes hyper reset the HTTP/2 stream, or close the HTTP/1.1
        // connection, without an answer.
        let service = service_fn(move |req: Request<Incoming>| {
            let forwarder = Arc::clone(&forwarder);
            async move { forwarder.handle(req).await }
        });
        let io = TokioIo::new(io);
        let served = if h2 {
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(limits.h2_header_list_size())
                .max_concurrent_streams(limits.h2_max_concurrent_streams)
                .serve_connection(io, service);
            drive(conn, shutdown.clone(), http2::Connection::graceful_shutdown).await
        } else {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .max_buf_size(limits.h1_buf_size())
                .max_headers(limits.max_headers)
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(io, service)
                .with_upgrades();
            drive(
                conn,
                shutdown.clone(),
                http1::UpgradeableConnection::graceful_shutdown,
            )
            .await
        };
        // After an upgrade hyper hands the socket to the tunnel and returns: the connection
        // lasts as long as its tunnels (each bounded by the idle timeout of its sockets), or
        // until the drain starts: a tunnel has no request boundary to finish at, so it is
        // closed then (dropping the wait aborts them) rather than holding the drain to its
        // timeout.
        tokio::select! {
            () = tunnels.wait() => {}
            () = shutdown => tracing::debug!("drain: closing upgraded tunnels"),
        }
        served.map_err(HttpError::Agent)
    }
}

/// Runs `conn` to completion, switching it to graceful shutdown if `shutdown` fires first.
pub(crate) async fn drive<C, S>(
    conn: C,
    shutdown: S,
    graceful: impl FnOnce(Pin<&mut C>),
) -> C::Output
where
    C: Future,
    S: Future<Output = ()>,
{
    tokio::pin!(conn);
    tokio::pin!(shutdown);
    tokio::select! {
        out = conn.as_mut() => return out,
        () = &mut shutdown => graceful(conn.as_mut()),
    }
    conn.await
}

/// A request the proxy answered itself could not be audited, so it is not answered.
#[derive(Debug, thiserror::Error)]
#[error("the proxy's answer to this request could not be audited")]
struct Unrecorded;

#[derive(Debug)]
struct Forwarder {
    ctx: RequestContext,
    pool: UpstreamPool,
    substituter: Arc<dyn Substituter>,
    audit: RequestAudit,
    via: Option<HeaderValue>,
    /// Upgraded tunnels (WebSocket) of this connection. The connection's future waits for
    /// them, so a tunnel keeps its connection slot, span and drain accounting: an agent
    /// cannot get past the connection cap by upgrading.
    tunnels: upgrade::Tunnels,
}

/// A request whose answer is not decided yet.
struct Pending<'a> {
    audit: &'a RequestAudit,
    ctx: &'a RequestContext,
    line: &'a RequestLine,
    substituted: Substituted,
    answered: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.answered {
            tracing::info!(
                run = %self.ctx.run, host = %self.ctx.host,
                method = %redact_placeholders(self.line.method.to_string()),
                path = %redacted_path(self.line.uri.path()), "request abandoned by the agent"
            );
            // Nothing is left to answer, so the outcome of the write changes nothing.
            let _ = self.audit.record(
                self.ctx,
                self.line,
                std::mem::take(&mut self.substituted),
                Answer::Abandoned,
            );
        }
    }
}

impl Forwarder {
    async fn handle(&self, req: Request<Incoming>) -> Result<Response<ProxyBody>, Unrecorded> {
        let line = RequestLine {
            method: req.method().clone(),
            // Kept whole for the audit record, which takes only its path.
            uri: req.uri().clone(),
            version: req.version(),
        };
        // Recorded as abandoned if hyper drops this future (the agent reset the stream or
        // closed the connection) before an answer is decided: the request may be upstream.
        let mut pending = Pending {
            audit: &self.audit,
            ctx: &self.ctx,
            line: &line,
            substituted: Substituted::none(),
            answered: false,
        };
        let forwarded = self.forward(req, &mut pending.substituted).await;
        pending.answered = true;
        let substituted = std::mem::take(&mut pending.substituted);
        let (response, audited) = match forwarded {
            Ok(response) => {
                tracing::debug!(
                    run = %self.ctx.run, host = %self.ctx.host, method = %redact_placeholders(line.method.to_string()),
                    // The path only (the query may carry credentials), placeholders redacted;
                    // evaluated only when the event is enabled.
                    path = %redacted_path(line.uri.path()),
                    status = response.status().as_u16(), "forwarded"
                );
                let audited = self.audit.record(
                    &self.ctx,
                    &line,
                    substituted,
                    Answer::Forwarded(response.status()),
                );
                (response, audited)
            }
            Err(e) => {
                tracing::info!(
                    run = %self.ctx.run, host = %self.ctx.host, method = %redact_placeholders(line.method.to_string()),
                    // The path only (the query may carry credentials), placeholders redacted;
                    // evaluated only when the event is enabled.
                    path = %redacted_path(line.uri.path()),
                    status = e.status().as_u16(), reason = e.reason(), error = %e,
                    "request answered by the proxy"
                );
                let audited = self
                    .audit
                    .record(&self.ctx, &line, substituted, Answer::Refused(&e));
                (e.to_response(), audited)
            }
        };
        match audited {
            AuditOutcome::Proceed => Ok(response),
            AuditOutcome::DropConnection => Err(Unrecorded),
        }
    }

    /// Forwards `req`; `substituted` says which credential went in, also when a later step
    /// fails or the agent goes away.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        substituted: &mut Substituted,
    ) -> Result<Response<ProxyBody>, HttpError> {
        if req.method() == Method::CONNECT {
            return Err(HttpError::MethodNotAllowed(Method::CONNECT));
        }
        let upgrade = if req.version() == Version::HTTP_11 {
            hop::upgrade_request(req.headers())
        } else {
            None
        };
        let agent_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        let requested = authority::request_authority(&parts)?;
        authority::check(&requested, &self.ctx)?;
        hop::strip(&mut parts.headers, upgrade.as_ref());
        // The upstream authority comes from the URI; the pool writes Host for HTTP/1 and
        // HTTP/2 carries :authority, so a stale Host must not ride along.
        parts.headers.remove(header::HOST);
        parts.uri = authority::upstream_uri(&self.ctx, &parts)?;
        // The pool picks the upstream protocol from ALPN; a request pinned to HTTP/2 would
        // be refused on an HTTP/1 upstream.
        parts.version = Version::HTTP_11;
        parts.extensions = Extensions::new();

        *substituted = self
            .substituter
            .substitute(&mut RequestHead::new(&mut parts), &self.ctx)
            .await?;
        if let Some(via) = &self.via {
            hop::append_via(&mut parts.headers, via);
        }
        let req = Request::from_parts(parts, body);

        let (response, upgraded) = match agent_upgrade {
            Some(agent) => {
                let watch = upgrade::TunnelWatch {
                    substituter: Arc::clone(&self.substituter),
                    ctx: self.ctx.clone(),
                };
                upgrade::forward(&self.pool, req, agent, &self.tunnels, watch).await?
            }
            None => (self.pool.send(req).await?, None),
        };
        let (mut parts, body) = response.into_parts();
        hop::strip(&mut parts.headers, upgraded.as_ref());
        if let Some(via) = &self.via {
            hop::append_via(&mut parts.headers, via);
        }
        parts.version = Version::default();
        parts.extensions = Extensions::new();
        Ok(Response::from_parts(parts, body::stream(body)))
    }
}
