//! Serving one agent connection: each request is checked, substituted and forwarded.

use std::sync::{Arc, Mutex};

use futures_util::FutureExt as _;
use futures_util::future::Either;
use http::{Extensions, HeaderValue, Method, Request, Response, Version, header};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument as _;

use super::affinity::Affinity;
use super::audit::{Answer, RequestLine};
use super::body::{self, ProxyBody};
use super::graceful::drive;
use super::park::{self, Tracked, UpstreamBody};
use super::substitute::RequestHead;
use super::timer::ConnectionTimer;
use super::upstream::lock;
use super::{
    ALPN_H2, HttpError, HttpLimits, RequestAudit, RequestContext, Substituted, Substituter,
    UpstreamPool, authority, hop, upgrade,
};
use crate::audit::{AuditOutcome, redact_placeholders, redacted_path};
use crate::labels::ScrubLocation;
use crate::net::prefixed::{PrefixedIo, next_bytes};
use crate::policy::ConnectionRecheck;
use crate::scrub;

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
/// With `recheck`, a request the substituter did not already check with the policy
/// ([`Substituted::egress_checked`]) is only forwarded while the connection's destination is
/// still allowed, and open tunnels are closed once it no longer is (see
/// [`crate::policy::EgressRecheck`]); without, the connection's first decision stands.
///
/// The returned future borrows nothing, so it can be spawned directly.
#[expect(
    clippy::too_many_arguments,
    reason = "the connection's parts, each from a different owner; a struct would only be unpacked here"
)]
pub fn serve_connection<I>(
    io: I,
    agent_alpn: Option<&[u8]>,
    ctx: RequestContext,
    pool: UpstreamPool,
    substituter: Arc<dyn Substituter>,
    audit: RequestAudit,
    limits: HttpLimits,
    recheck: Option<ConnectionRecheck>,
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
        recheck,
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
    mut io: I,
    agent_alpn: Option<&[u8]>,
    ctx: RequestContext,
    pool: UpstreamPool,
    substituter: Arc<dyn Substituter>,
    audit: RequestAudit,
    limits: HttpLimits,
    recheck: Option<ConnectionRecheck>,
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
        // The drain signal goes to hyper and, after an upgrade, to the tunnels.
        let shutdown = shutdown.shared();
        // Nothing of the HTTP server (hyper's read and write buffers, its dispatcher, the
        // forwarder) exists until the agent sends its first bytes: an idle connection costs
        // its TLS state only. The wait is bounded as hyper bounds it (the header read
        // timeout starts with the connection) and ends at the drain.
        let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
        let Some(first) = next_bytes(&mut io, deadline, shutdown.clone(), "a first request").await
        else {
            return Ok(());
        };
        let io = PrefixedIo::new(first, io);
        let forwarder = Arc::new(Forwarder {
            upstream: authority::UpstreamBase::of(&ctx).ok(),
            ctx,
            substituter,
            recheck,
            audit,
            via: limits.via.clone(),
            tunnels: upgrade::Tunnels::default(),
            // Only HTTP/1.1 connections park.
            activity: (!h2 && limits.park_after.is_some()).then(park::Activity::new),
            affinity: (!h2).then(|| Affinity::new(&pool)),
            pool,
            vetted_host: Mutex::default(),
        });
        // Boxed: while the connection waited, none of this was allocated.
        let served = Box::pin(serve_http(io, h2, forwarder, &limits, shutdown)).await;
        // Most of what a served connection held is freed as its task ends.
        crate::heap::freed(CLOSED_CONNECTION_BYTES);
        served
    }
}

/// About what a served agent connection holds (TLS state, HTTP server, futures).
const CLOSED_CONNECTION_BYTES: u64 = 32 * 1024;

/// The agent-facing HTTP/1.1 server's settings, parked or not, with the connection's timer.
fn h1_builder(limits: &HttpLimits, timer: &ConnectionTimer) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(timer.clone())
        .max_buf_size(limits.h1_buf_size())
        .header_read_timeout(limits.header_read_timeout);
    if let Some(max) = limits.h1_max_headers() {
        builder.max_headers(max);
    }
    builder
}

/// The HTTP server of one connection, once its first bytes arrived.
async fn serve_http<I, S>(
    io: PrefixedIo<I>,
    h2: bool,
    forwarder: Arc<Forwarder>,
    limits: &HttpLimits,
    shutdown: futures_util::future::Shared<S>,
) -> Result<(), HttpError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    let tunnels = forwarder.tunnels.clone();
    // An `Unrecorded` error makes hyper reset the HTTP/2 stream, or close the HTTP/1.1
    // connection, without an answer.
    // HTTP/2 streams run in tasks hyper spawns: they carry the connection's span (and so
    // its `conn` id) only if given it. HTTP/1.1 requests are polled in the connection's own
    // task, inside its span already; entering it again on every poll would only cost.
    let span = h2.then(tracing::Span::current);
    let activity = forwarder.activity.clone();
    let parking = Arc::clone(&forwarder);
    let metrics = Arc::clone(forwarder.audit.metrics());
    let timer = ConnectionTimer::default();
    let service = service_fn(move |req: Request<Incoming>| {
        let forwarder = Arc::clone(&forwarder);
        // Taken at the call, so the park timer (same task) sees it before the future runs.
        let in_flight = forwarder.activity.as_ref().map(park::InFlight::new);
        // Boxed: hyper keeps a slot the size of this future for the connection's life.
        // Each request moves it into its box, so it is kept small: the rare paths inside
        // (upgrades, dials, the shared pool) are boxed where they start, and HTTP/1.1 gets
        // no `Instrumented` wrapper (one more move). 10 KiB moved twice per request became
        // about 4 KiB moved once.
        let handled = async move { forwarder.handle(req, in_flight).await };
        Box::pin(match &span {
            Some(span) => Either::Left(handled.instrument(span.clone())),
            None => Either::Right(handled),
        })
    });
    let served = if let (Some(activity), Some(after)) = (activity, limits.park_after) {
        park::serve(
            io,
            &h1_builder(limits, &timer),
            service,
            activity,
            park::Timing {
                after,
                idle_for: limits.header_read_timeout,
            },
            &park::OnPark {
                metrics,
                // A parked connection holds no upstream connection, and no timer.
                release: &|| {
                    if let Some(affinity) = &parking.affinity {
                        affinity.release();
                    }
                    timer.clear();
                },
            },
            shutdown.clone(),
        )
        .await
    } else if h2 {
        // Boxed, as the server below: this future lasts as long as the connection, and a
        // future is as large as its largest state.
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(limits.h2_header_list_size())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .serve_connection(TokioIo::new(io), service);
        Box::pin(drive(
            conn,
            shutdown.clone(),
            http2::Connection::graceful_shutdown,
        ))
        .await
    } else {
        let conn = h1_builder(limits, &timer)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        Box::pin(drive(
            conn,
            shutdown.clone(),
            http1::UpgradeableConnection::graceful_shutdown,
        ))
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

/// A request the proxy answered itself could not be audited, so it is not answered.
#[derive(Debug, thiserror::Error)]
#[error("the proxy's answer to this request could not be audited")]
struct Unrecorded;

#[derive(Debug)]
struct Forwarder {
    ctx: RequestContext,
    pool: UpstreamPool,
    substituter: Arc<dyn Substituter>,
    recheck: Option<ConnectionRecheck>,
    audit: RequestAudit,
    via: Option<HeaderValue>,
    /// Upgraded tunnels (WebSocket) of this connection. The connection's future waits for
    /// them, so a tunnel keeps its connection slot, span and drain accounting: an agent
    /// cannot get past the connection cap by upgrading.
    tunnels: upgrade::Tunnels,
    /// What decides when an idle HTTP/1.1 connection parks (`None` on HTTP/2).
    activity: Option<Arc<park::Activity>>,
    /// The scheme and authority of every upstream URI of this connection.
    upstream: Option<authority::UpstreamBase>,
    /// An HTTP/1.1 connection's own upstream connection (`None` on HTTP/2, whose streams
    /// share the run's pool).
    affinity: Option<Affinity>,
    /// The last `Host` value that named this connection's destination (see
    /// [`Forwarder::check_authority`]).
    vetted_host: Mutex<Option<HeaderValue>>,
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
    async fn handle(
        &self,
        req: Request<Incoming>,
        in_flight: Option<park::InFlight>,
    ) -> Result<Response<Tracked>, Unrecorded> {
        if let Some(activity) = &self.activity
            && !keeps_alive(&req)
        {
            activity.request_closes();
        }
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
        let forwarded = self.forward(req, &line, &mut pending.substituted).await;
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
            AuditOutcome::Proceed => Ok(response.map(|body| Tracked::new(body, in_flight))),
            AuditOutcome::DropConnection => Err(Unrecorded),
        }
    }

    /// Forwards `req`; `substituted` says which credential went in, also when a later step
    /// fails or the agent goes away.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        line: &RequestLine,
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
        self.check_authority(&parts)?;
        hop::strip(&mut parts.headers, upgrade.as_ref());
        // The upstream authority comes from the URI; the pool writes Host for HTTP/1 and
        // HTTP/2 carries :authority, so a stale Host must not ride along.
        parts.headers.remove(header::HOST);
        parts.uri = match &self.upstream {
            Some(base) => base.uri(&parts)?,
            // Not a valid authority: the full path answers why, request by request.
            None => authority::upstream_uri(&self.ctx, &parts)?,
        };
        // The pool picks the upstream protocol from ALPN; a request pinned to HTTP/2 would
        // be refused on an HTTP/1 upstream.
        parts.version = Version::HTTP_11;
        parts.extensions = Extensions::new();

        *substituted = self
            .substituter
            .substitute(&mut RequestHead::new(&mut parts), &self.ctx)
            .await?;
        if !substituted.egress_checked
            && let Some(recheck) = &self.recheck
        {
            recheck.check().await?;
        }
        let scrubber = self.scrubber_after(substituted)?;
        if scrubber.is_some() {
            scrub::prepare_request(&mut parts.headers);
            if let Some(offered) = &upgrade
                && !only_websocket(offered)
            {
                return Err(HttpError::UpgradeRefused {
                    protocol: String::from_utf8_lossy(offered.as_bytes()).into_owned(),
                });
            }
        }
        if let Some(via) = &self.via {
            hop::append_via(&mut parts.headers, via);
        }
        let req = Request::from_parts(parts, UpstreamBody::new(body, self.activity.as_ref()));
        let report = scrubber.as_ref().map(|_| Report {
            audit: self.audit.clone(),
            ctx: self.ctx.clone(),
            line: line.clone(),
            credential: substituted.credential.clone(),
        });

        let (response, upgraded) = match agent_upgrade {
            Some(agent) => {
                let watch = upgrade::TunnelWatch {
                    recheck: self.recheck.clone(),
                    scrub: scrubber.clone().zip(report.clone()).map(|(sc, r)| {
                        let tell: upgrade::OnScrub =
                            Box::new(move |n| r.tell(ScrubLocation::WebSocket, n));
                        (sc, tell)
                    }),
                };
                Box::pin(upgrade::forward(
                    &self.pool,
                    req,
                    agent,
                    &self.tunnels,
                    watch,
                ))
                .await?
            }
            None => match &self.affinity {
                Some(affinity) => (affinity.send(&self.pool, req).await?, None),
                None => (Box::pin(self.pool.send(req)).await?, None),
            },
        };
        let (mut parts, body) = response.into_parts();
        hop::strip(&mut parts.headers, upgraded.as_ref());
        if let Some(via) = &self.via {
            hop::append_via(&mut parts.headers, via);
        }
        parts.version = Version::default();
        parts.extensions = Extensions::new();
        let body = match scrubber.zip(report) {
            None => body::stream(body),
            Some((sc, report)) => {
                self.scrub_response(&mut parts, body, sc, &line.method, report)?
            }
        };
        Ok(Response::from_parts(parts, body))
    }

    /// Refuses a request whose authority is not the connection's destination.
    ///
    /// An agent names the same `Host` on each request of a connection, and the check
    /// depends on that value alone (with no authority in the URI, which then wins): the last
    /// value that passed is remembered, and the same bytes pass again without being parsed.
    fn check_authority(&self, parts: &http::request::Parts) -> Result<(), HttpError> {
        let host = match parts.uri.authority() {
            None => parts.headers.get(header::HOST),
            Some(_) => None,
        };
        if let Some(host) = host
            && lock(&self.vetted_host).as_ref() == Some(host)
        {
            return Ok(());
        }
        let requested = authority::request_authority(parts)?;
        authority::check(&requested, &self.ctx)?;
        if let Some(host) = host {
            // A copy: the parsed value shares hyper's read buffer, which a parked connection
            // would otherwise keep alive (a few KiB per idle connection).
            *lock(&self.vetted_host) = HeaderValue::from_bytes(host.as_bytes()).ok();
        }
        Ok(())
    }

    /// Remembers the secrets this request was given and returns the matcher for everything
    /// its host has been sent by this run, if anything.
    fn scrubber_after(
        &self,
        substituted: &Substituted,
    ) -> Result<Option<Arc<scrub::Scrubber>>, HttpError> {
        self.pool
            .scrub_registry()
            .add_and_get(&self.ctx.host, &substituted.secrets)
            .map_err(|e| HttpError::Unscrubbable {
                host: self.ctx.host.clone(),
                port: self.ctx.port,
                reason: e.to_string(),
            })
    }

    /// Scrubs the head now and wraps the body; refuses an answer it could not read.
    fn scrub_response(
        &self,
        parts: &mut http::response::Parts,
        body: Incoming,
        scrubber: Arc<scrub::Scrubber>,
        method: &Method,
        report: Report,
    ) -> Result<ProxyBody, HttpError> {
        let unscrubbable = |reason: String| HttpError::Unscrubbable {
            host: self.ctx.host.clone(),
            port: self.ctx.port,
            reason,
        };
        let encoding = scrub::Encoding::from_headers(&parts.headers)
            .map_err(|e| unscrubbable(e.to_string()))?;
        if let Some(coding) = scrub::grpc_compressed(&parts.headers) {
            return Err(unscrubbable(format!(
                "gRPC messages compressed with {coding}"
            )));
        }
        report.tell(
            ScrubLocation::Headers,
            scrub::scrub_headers(&scrubber, &mut parts.headers),
        );
        let bodiless = *method == Method::HEAD
            || parts.status.is_informational()
            || parts.status == http::StatusCode::NO_CONTENT
            || parts.status == http::StatusCode::NOT_MODIFIED;
        if bodiless {
            return Ok(body::stream(body));
        }
        // Replacements change the length; a decoded body is passed on decoded.
        parts.headers.remove(header::CONTENT_LENGTH);
        if encoding != scrub::Encoding::Identity {
            parts.headers.remove(header::CONTENT_ENCODING);
        }
        let wrapped = scrub::ScrubBody::new(
            body,
            scrubber,
            encoding,
            Box::new(move |n| report.tell(ScrubLocation::Body, n)),
        );
        Ok(http_body_util::BodyExt::boxed_unsync(wrapped))
    }
}

/// Whether an HTTP/1 request lets its connection live on after the answer: HTTP/1.1
/// without `Connection: close`. (HTTP/1.0 keep-alive is left to hyper, never parked.)
fn keeps_alive(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && !req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
        })
}

/// Whether every protocol an `Upgrade` offers is WebSocket (the only tunnel the proxy can
/// scrub).
fn only_websocket(offered: &HeaderValue) -> bool {
    let mut names = offered
        .to_str()
        .unwrap_or_default()
        .split(',')
        .map(|p| p.split('/').next().unwrap_or_default().trim())
        .peekable();
    names.peek().is_some() && names.all(|p| p.eq_ignore_ascii_case("websocket"))
}

/// Where scrub counts of one request's response go: its audit record and the metrics.
#[derive(Clone)]
struct Report {
    audit: RequestAudit,
    ctx: RequestContext,
    line: RequestLine,
    credential: Option<String>,
}

impl Report {
    fn tell(&self, location: ScrubLocation, count: u64) {
        self.audit.scrubbed(
            &self.ctx,
            &self.line,
            self.credential.clone(),
            location,
            count,
        );
    }
}
