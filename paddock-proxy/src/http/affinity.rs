//! An HTTP/1.1 agent connection's own upstream connection.
//!
//! An HTTP/1.1 agent connection sends one request at a time, all to the one destination it
//! was allowed for. So it keeps the hyper client handle of the upstream connection its last
//! request used ([`Affinity`]) and sends the next request straight on it. Going through
//! hyper-util's shared pool instead cost, per request, a checkout keyed by scheme and
//! authority (hashed byte by byte), a clone of the whole client, two rewrites of the URI and
//! several boxed futures: about 4 % of the proxy's CPU per keep-alive request in the peers
//! lab (BENCHMARKS.md). The upstream connection still runs in a task of its own, as it did in
//! the pool.
//!
//! What the pool did and this keeps:
//! - **Reuse across agent connections.** When the agent connection parks or ends, its
//!   upstream connection goes to the run's [`IdleH1`] store (at most `pool_max_idle_per_host`
//!   per destination, closed after `pool_idle_timeout`), where the next agent connection to
//!   that destination finds it: no dial, no TLS handshake.
//! - **Retry of a request never written.** A reused connection that the upstream closed
//!   while it was idle hands the request back unsent; it goes out once more on a new
//!   connection. A request that was written is never sent twice.
//! - **HTTP/2 upstreams.** A destination that chose h2 in ALPN is remembered for the run and
//!   served by the shared pool, which multiplexes it; the one connection that found out is
//!   closed.
//! - **The response timeout**, from the request's hand-over to the response head. Its
//!   timer is the connection's, moved to each request's deadline.
//!
//! The key is the vetted destination ([`UpstreamTarget`]) inside one run's pool, as the
//! pool's was: a connection is never shared between runs or destinations.

use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use http::uri::Authority;
use http::{HeaderValue, Request, Response, Uri, header};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use tokio::time::{Instant, Sleep};

use super::park::UpstreamBody;
use super::upstream::{
    Dialed, IdleH1, UpstreamTarget, host_header, host_port, lock, origin_form, target_of,
};
use super::{HttpError, UpstreamPool};

type Sender = SendRequest<UpstreamBody>;

/// Where this agent connection's requests go, worked out on its first request.
struct Destination {
    target: UpstreamTarget,
    /// The absolute URI's authority, which every request of the connection carries.
    authority: Authority,
    host: HeaderValue,
}

#[derive(Default)]
struct Slot {
    destination: Option<Arc<Destination>>,
    /// Out of the slot while a request is on its way.
    sender: Option<Sender>,
    /// The response timeout's timer, kept between requests: moved to each request's
    /// deadline it stays in the runtime's timer wheel (a later deadline only updates it),
    /// where a timer per request was inserted and removed again, a lock each time.
    timer: Option<Pin<Box<Sleep>>>,
}

/// The upstream connection of one HTTP/1.1 agent connection.
pub(crate) struct Affinity {
    idle: Arc<IdleH1>,
    slot: Mutex<Slot>,
}

impl std::fmt::Debug for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slot = lock(&self.slot);
        f.debug_struct("Affinity")
            .field("target", &slot.destination.as_ref().map(|d| &d.target))
            .field("connected", &slot.sender.is_some())
            .finish_non_exhaustive()
    }
}

impl Affinity {
    pub(crate) fn new(pool: &UpstreamPool) -> Self {
        Self {
            idle: Arc::clone(pool.idle_h1()),
            slot: Mutex::default(),
        }
    }

    /// Hands the upstream connection to the run's store (the agent connection parks or ends).
    pub(crate) fn release(&self) {
        let mut slot = lock(&self.slot);
        let sender = slot.sender.take();
        // A parked connection holds no timer either.
        slot.timer = None;
        if let (Some(destination), Some(sender)) = (&slot.destination, sender) {
            let target = destination.target.clone();
            drop(slot);
            self.idle.put(target, sender);
        }
    }

    fn destination(&self, uri: &Uri) -> Result<Arc<Destination>, HttpError> {
        let mut slot = lock(&self.slot);
        if let Some(d) = &slot.destination
            && uri.authority() == Some(&d.authority)
        {
            return Ok(Arc::clone(d));
        }
        let target = target_of(uri, true).ok_or(HttpError::BadRequest("no upstream host"))?;
        let host = host_header(uri)?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or(HttpError::BadRequest("no upstream authority"))?;
        let d = Arc::new(Destination {
            target,
            authority,
            host,
        });
        // Another destination (never seen: a connection's requests all name its own) would
        // make the slot's connection the wrong one.
        if slot.destination.is_some() {
            slot.sender = None;
        }
        slot.destination = Some(Arc::clone(&d));
        Ok(d)
    }

    /// This connection's sender if it is still open, and the response timer.
    fn take_own(&self) -> (Option<Sender>, Option<Pin<Box<Sleep>>>) {
        let mut slot = lock(&self.slot);
        let own = slot.sender.take().filter(|s| !s.is_closed());
        (own, slot.timer.take())
    }

    fn keep_timer(&self, timer: Pin<Box<Sleep>>) {
        lock(&self.slot).timer = Some(timer);
    }

    fn keep(&self, d: &Arc<Destination>, sender: Sender) {
        let mut slot = lock(&self.slot);
        if slot
            .destination
            .as_ref()
            .is_some_and(|cur| Arc::ptr_eq(cur, d))
        {
            slot.sender = Some(sender);
        }
    }

    /// Sends `req` (absolute URI naming the connection's destination) on this connection's
    /// upstream connection, else an idle one, else a new one; an h2 destination goes to the
    /// shared pool.
    pub(crate) async fn send(
        &self,
        pool: &UpstreamPool,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, HttpError> {
        let d = self.destination(req.uri())?;
        let (mut own, timer) = self.take_own();
        // A connection in hand speaks HTTP/1.1; only one about to be dialled asks whether
        // the destination turned out to be h2.
        if own.is_none() && self.idle.is_h2(&d.target) {
            return Box::pin(pool.send(req)).await;
        }
        let absolute = req.uri().clone();
        // HTTP/1.1 carries origin form and a Host header.
        *req.uri_mut() = origin_form(&absolute);
        req.headers_mut().insert(header::HOST, d.host.clone());
        let request_failed = |e: hyper::Error| {
            let (host, port) = host_port(&absolute);
            HttpError::UpstreamRequest {
                host,
                port,
                source: Box::new(e),
            }
        };
        let deadline = Instant::now() + pool.response_timeout();
        let mut timer = match timer {
            Some(mut timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        let mut exchange = pin!(async {
            let mut fresh_only = false;
            loop {
                let reused = match own.take() {
                    Some(sender) => Some(sender),
                    None if fresh_only => None,
                    None => self.idle.take(&d.target),
                };
                let was_reused = reused.is_some();
                let mut sender = match reused {
                    Some(sender) => sender,
                    None => match Box::pin(pool.dial_h1(&absolute, &d.target)).await? {
                        Dialed::H1(sender) => sender,
                        Dialed::H2 => {
                            // This destination speaks h2: the shared pool multiplexes it.
                            self.idle.mark_h2(&d.target);
                            *req.uri_mut() = absolute.clone();
                            req.headers_mut().remove(header::HOST);
                            return Box::pin(pool.send(req)).await;
                        }
                    },
                };
                if let Err(e) = std::future::poll_fn(|cx| sender.poll_ready(cx)).await {
                    if was_reused {
                        fresh_only = true;
                        continue;
                    }
                    return Err(request_failed(e));
                }
                match sender.try_send_request(req).await {
                    Ok(response) => {
                        self.keep(&d, sender);
                        return Ok(response);
                    }
                    Err(mut e) => match e.take_message() {
                        // Never written: safe to send on a new connection.
                        Some(unsent) if was_reused => {
                            req = unsent;
                            fresh_only = true;
                        }
                        _ => return Err(request_failed(e.into_error())),
                    },
                }
            }
        });
        let answer = std::future::poll_fn(|cx| match exchange.as_mut().poll(cx) {
            Poll::Ready(answer) => Poll::Ready(Some(answer)),
            Poll::Pending => timer.as_mut().poll(cx).map(|()| None),
        })
        .await;
        self.keep_timer(timer);
        answer.unwrap_or_else(|| {
            let (host, port) = host_port(&absolute);
            Err(HttpError::UpstreamTimeout {
                host,
                port,
                stage: "response head",
            })
        })
    }
}

impl Drop for Affinity {
    fn drop(&mut self) {
        self.release();
    }
}
