//! The HTTPS API server (hyper 1, TLS 1.3 via tokio-rustls) and the admin listener.
//!
//! [`spawn`] runs both in the current tokio runtime and returns a [`Handle`] with the bound
//! addresses; tests and the end-to-end harness use it to run the broker in-process.
//! [`spawn_local`] runs the same API without binding anything: its only way in is the
//! in-process [`LocalLink`] (`paddock-proxy run`, through [`crate::embed`]).

pub mod admin;
mod calls;
mod interact;
mod op;
mod respond;
pub mod routes;
mod shell;
pub mod tls;
mod tunnel;
mod websocket;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

use crate::{auth::Authenticator, broker::Broker, metrics::Metrics};

/// Everything the server needs. Build it from a config file with [`crate::config`] or by hand.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub tls: Arc<rustls::ServerConfig>,
    pub broker: Arc<Broker>,
    pub auth: Arc<dyn Authenticator>,
    pub metrics: Arc<Metrics>,
    /// How often to check the policy files for changes (None: never).
    pub policy_poll: Option<Duration>,
    /// How often to drop idle rate-limit buckets.
    pub rate_limit_sweep: Duration,
}

#[derive(Debug)]
pub(crate) struct State {
    pub broker: Arc<Broker>,
    pub auth: Arc<dyn Authenticator>,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid route table: {0}")]
    Routes(String),
}

/// A running server.
#[derive(Debug)]
pub struct Handle {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    local: LocalLink,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Handle {
    /// In-process connections to this server's API (see [`LocalLink`]).
    #[must_use]
    pub fn local_link(&self) -> LocalLink {
        self.local.clone()
    }

    /// Stops accepting, lets in-flight requests finish (bounded), and waits for the tasks.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// Concurrent API connections.
const MAX_CONNECTIONS: usize = 4096;
const LEASE_RETENTION_SECS: u64 = 7 * 24 * 3600;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Request head limit: room for large JWTs, small enough that huge headers get 431.
const MAX_HEAD_BYTES: usize = 32 * 1024;
/// Connection read buffer (head plus pipelined body bytes).
const MAX_BUF_BYTES: usize = 128 * 1024;

/// Binds the listeners and starts serving.
pub async fn spawn(options: ServerOptions) -> Result<Handle, ServerError> {
    routes::validate_routes(routes::ROUTES).map_err(ServerError::Routes)?;
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: options.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: options.listen,
        source,
    })?;
    let core = Core::new(&options.broker, &options.auth, &options.metrics);
    let (state, rx, local) = (core.state.clone(), core.rx.clone(), core.local.clone());
    let mut tasks = vec![tokio::spawn(api_loop(
        listener,
        TlsAcceptor::from(options.tls.clone()),
        state.clone(),
        rx.clone(),
        core.local.permits.clone(),
    ))];
    let mut admin_addr = None;
    if let Some(admin) = options.admin_listen {
        let l = TcpListener::bind(admin)
            .await
            .map_err(|source| ServerError::Bind {
                addr: admin,
                source,
            })?;
        admin_addr = Some(l.local_addr().map_err(|source| ServerError::Bind {
            addr: admin,
            source,
        })?);
        tasks.push(tokio::spawn(admin_loop(l, state.clone(), rx.clone())));
    }
    tasks.push(tokio::spawn(maintenance(
        Maintenance::of(&options),
        rx.clone(),
    )));
    tracing::info!(%addr, ?admin_addr, "broker listening");
    Ok(Handle {
        addr,
        admin_addr,
        local,
        shutdown: core.shutdown,
        tasks,
    })
}

/// What a server serves, however connections reach it: without a listener or TLS (see
/// [`spawn_local`]).
#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub broker: Arc<Broker>,
    pub auth: Arc<dyn Authenticator>,
    pub metrics: Arc<Metrics>,
    /// How often to check the policy files for changes (None: never).
    pub policy_poll: Option<Duration>,
    /// How often to drop idle rate-limit buckets and purge old leases.
    pub rate_limit_sweep: Duration,
}

/// A running server without listeners: reached only through its [`LocalLink`].
#[derive(Debug)]
pub struct LocalServer {
    local: LocalLink,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl LocalServer {
    /// In-process connections to this server's API.
    #[must_use]
    pub fn local_link(&self) -> LocalLink {
        self.local.clone()
    }

    /// Refuses new connections, lets in-flight requests finish (bounded), and waits for the
    /// maintenance task.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// Starts the API, its policy polling and its maintenance, binding nothing: the same
/// routes, authentication, limits and audit as [`spawn`], reachable only in-process.
pub fn spawn_local(options: LocalOptions) -> Result<LocalServer, ServerError> {
    routes::validate_routes(routes::ROUTES).map_err(ServerError::Routes)?;
    let core = Core::new(&options.broker, &options.auth, &options.metrics);
    let maintenance = tokio::spawn(maintenance(
        Maintenance {
            broker: options.broker,
            metrics: options.metrics,
            policy_poll: options.policy_poll,
            rate_limit_sweep: options.rate_limit_sweep,
        },
        core.rx,
    ));
    tracing::debug!("broker serving in-process only");
    Ok(LocalServer {
        local: core.local,
        shutdown: core.shutdown,
        tasks: vec![maintenance],
    })
}

/// The state shared by every way into one server, and its shutdown signal.
struct Core {
    state: Arc<State>,
    shutdown: watch::Sender<bool>,
    rx: watch::Receiver<bool>,
    local: LocalLink,
}

impl Core {
    fn new(broker: &Arc<Broker>, auth: &Arc<dyn Authenticator>, metrics: &Arc<Metrics>) -> Self {
        let (shutdown, rx) = watch::channel(false);
        let state = Arc::new(State {
            broker: broker.clone(),
            auth: auth.clone(),
            metrics: metrics.clone(),
        });
        // One connection budget for the TLS listener and the in-process link together.
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let local = LocalLink {
            state: state.clone(),
            shutdown: rx.clone(),
            permits,
        };
        Self {
            state,
            shutdown,
            rx,
            local,
        }
    }
}

async fn api_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
    permits: Arc<tokio::sync::Semaphore>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Bounded concurrency: beyond the limit new connections are closed at once.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; closing");
            drop(tcp);
            continue;
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            serve_api_connection(tls, state, shutdown, &peer.to_string()).await;
        });
    }
}

/// Serves the API on one connection (TLS from the listener, or an in-process link) until
/// it closes or the server shuts down (then gracefully, bounded).
async fn serve_api_connection<IO>(
    io: IO,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
    peer: &str,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| routes::handle(state.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_BUF_BYTES)
        .serve_connection(TokioIo::new(io), service)
        // The attach route upgrades to a WebSocket.
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection ended with error") },
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

/// Connections to the API from inside the broker's own process (`paddock-proxy run` embeds
/// the broker): the same HTTP server, routes, authentication, limits and audit as the TLS
/// listener, over an in-memory pipe instead of loopback TCP and TLS, which only cost CPU
/// there and expose a port.
#[derive(Debug, Clone)]
pub struct LocalLink {
    state: Arc<State>,
    shutdown: watch::Receiver<bool>,
    permits: Arc<tokio::sync::Semaphore>,
}

/// Size of each direction's in-memory buffer; answers are a few hundred bytes.
const LOCAL_PIPE_BYTES: usize = 64 * 1024;

impl LocalLink {
    /// A new connection to the API, served on the current runtime.
    pub fn connect(&self) -> std::io::Result<tokio::io::DuplexStream> {
        if *self.shutdown.borrow() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "the broker is shut down",
            ));
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "broker connection limit reached",
            ));
        };
        let (client, server) = tokio::io::duplex(LOCAL_PIPE_BYTES);
        let (state, shutdown) = (self.state.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            serve_api_connection(server, state, shutdown, "in-process").await;
        });
        Ok(client)
    }
}

impl LocalLink {
    /// Serves the API on a Unix socket as well (plain HTTP/1.1: the socket's file mode is the
    /// transport's protection, bearers still authenticate every call), until the server shuts
    /// down. `paddock-proxy run` uses it for its interactive routes.
    pub fn serve_unix(&self, listener: tokio::net::UnixListener) -> JoinHandle<()> {
        let link = self.clone();
        tokio::spawn(async move {
            let mut shutdown = link.shutdown.clone();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = shutdown.changed() => return,
                };
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept on the unix socket failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = link.permits.clone().try_acquire_owned() else {
                    tracing::warn!("connection limit reached; closing");
                    continue;
                };
                let (state, shutdown) = (link.state.clone(), link.shutdown.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    serve_api_connection(stream, state, shutdown, "unix").await;
                });
            }
        })
    }
}

async fn admin_loop(listener: TcpListener, state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| admin::handle(state.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// What the maintenance task needs of a server's options.
struct Maintenance {
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    policy_poll: Option<Duration>,
    rate_limit_sweep: Duration,
}

impl Maintenance {
    fn of(options: &ServerOptions) -> Self {
        Self {
            broker: options.broker.clone(),
            metrics: options.metrics.clone(),
            policy_poll: options.policy_poll,
            rate_limit_sweep: options.rate_limit_sweep,
        }
    }
}

/// Policy polling and rate-limit sweeping.
async fn maintenance(options: Maintenance, mut shutdown: watch::Receiver<bool>) {
    let mut sweep = tokio::time::interval(options.rate_limit_sweep);
    let mut poll = tokio::time::interval(options.policy_poll.unwrap_or(Duration::from_hours(1)));
    let mut interactive = tokio::time::interval(Duration::from_secs(1));
    interactive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_walk = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = interactive.tick() => {
                // Read each time: `paddock-proxy run` sets it after the server started.
                let walk = last_walk.elapsed() >= options.broker.interactive().config().walk_interval;
                if walk {
                    last_walk = tokio::time::Instant::now();
                }
                interact::tick(options.broker.clone(), walk).await;
            }
            _ = sweep.tick() => {
                options.broker.rate_limits().sweep();
                // Dead leases are kept a week for `leases list` and investigations.
                let broker = options.broker.clone();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let cutoff = now.saturating_sub(LEASE_RETENTION_SECS);
                match tokio::task::spawn_blocking(move || {
                    broker.store().purge_before(cutoff)?;
                    broker.store().all_leases()
                })
                .await
                {
                    Ok(Ok(leases)) => options.metrics.set_leases(&leases, now),
                    Ok(Err(e)) => tracing::warn!(error = %e, "purging or counting leases failed"),
                    Err(e) => tracing::warn!(error = %e, "lease sweep task failed"),
                }
                options.metrics.set_rate_limit_buckets(options.broker.rate_limits().buckets());
                let grants = options.broker.grants();
                options.metrics.set_grant_state(grants.subscriptions(), grants.cut_offs());
            }
            _ = poll.tick(), if options.policy_poll.is_some() => {
                let broker = options.broker.clone();
                match tokio::task::spawn_blocking(move || broker.reload_policy(true)).await {
                    Ok(Ok(true)) => tracing::info!("policy reloaded"),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        options.metrics.policy_reload_failed();
                        tracing::error!(error = %e, "policy reload rejected; previous policy stays active");
                    }
                    Err(e) => tracing::error!(error = %e, "policy reload task failed"),
                }
            }
        }
    }
}
