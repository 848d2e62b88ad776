//! The node agent's side of the broker's node tunnel ([`paddock_wire::api::tunnel`]).
//!
//! The node agent keeps one outbound connection to the broker, upgraded to HTTP/2 with the
//! broker as the client: nothing listens on the node or the pods for it. Each stream the
//! broker opens names a run, the pod the API server placed it in, and what to open:
//!
//! - `adapter`: a TCP connection to `127.0.0.1:<port>` created inside the pod's network
//!   namespace, where the port is the pod's own (`paddock.dev/adapter-port`), never the
//!   broker's word;
//! - `shell`: `/bin/sh` on a pty in the namespaces, cgroup and user of the pod's container
//!   process (never root; `no_new_privs` and the sandbox's seccomp filter), so its traffic is
//!   intercepted like the agent's.
//!
//! A run whose pod this node agent does not serve, under that UID, is refused (404): a broker
//! cannot make the node agent reach anything but the pods it intercepts. The connection is
//! re-opened with backoff whenever it ends; while the broker refuses it (a token not bound to
//! this node) the node agent says so in its log and retries slowly.

use std::{
    collections::{BTreeSet, HashMap},
    convert::Infallible,
    net::SocketAddr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::watch;

use super::agent::NodeAgent;
use super::pod::PodSpec;
use crate::run::{
    SandboxSpec,
    shell::{open_joined, shell_spec},
};
use paddock_broker::interactive::TermSize;
use paddock_proxy::broker::{BrokerCallError, BrokerClient, BrokerClientConfig};
use paddock_proxy::ebpf::Interception;
use paddock_proxy::netns::NetnsPath;
use paddock_wire::api::{ErrorCode, paths, tunnel};
use tracing::Instrument as _;

const PING_INTERVAL: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Retry interval while the broker refuses the tunnel (a configuration problem).
const REFUSED_RETRY: Duration = Duration::from_mins(5);

/// What the tunnel's streams need.
pub struct TunnelService<I: Interception> {
    pub agent: Arc<NodeAgent<I>>,
    /// The `paddock-proxy` binary (the sandbox launcher of shells).
    pub launcher: PathBuf,
    /// Whether shells may be opened (`[pods] shells`).
    pub shells: bool,
    /// Open shells' resize channels, by session id (removed when the shell ends).
    open_shells: std::sync::Mutex<HashMap<String, ResizeSender>>,
}

impl<I: Interception> TunnelService<I> {
    /// The service of a node agent's tunnel.
    #[must_use]
    pub fn new(agent: Arc<NodeAgent<I>>, launcher: PathBuf, shells: bool) -> Self {
        Self {
            agent,
            launcher,
            shells,
            open_shells: std::sync::Mutex::default(),
        }
    }

    fn shells(&self) -> std::sync::MutexGuard<'_, HashMap<String, ResizeSender>> {
        self.open_shells
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<I: Interception> std::fmt::Debug for TunnelService<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelService")
            .field("launcher", &self.launcher)
            .finish_non_exhaustive()
    }
}

fn answer(status: StatusCode, reason: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(reason.into())));
    *r.status_mut() = status;
    r
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

impl<I: Interception + 'static> TunnelService<I> {
    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        if req.method() == Method::POST && req.uri().path() == tunnel::RESIZE_PATH {
            return Ok(self.resize(&req));
        }
        if req.method() != Method::CONNECT {
            return Ok(answer(
                StatusCode::METHOD_NOT_ALLOWED,
                "streams are CONNECTs",
            ));
        }
        let (Some(ns), Some(run), Some(uid), Some(open)) = (
            header(&req, tunnel::NAMESPACE),
            header(&req, tunnel::RUN),
            header(&req, tunnel::POD_UID),
            header(&req, tunnel::OPEN),
        ) else {
            return Ok(answer(
                StatusCode::BAD_REQUEST,
                "missing run, pod or what to open",
            ));
        };
        let span = tracing::info_span!("tunnel stream", %ns, %run, %open);
        let (ns, run, uid, open) = (
            ns.to_owned(),
            run.to_owned(),
            uid.to_owned(),
            open.to_owned(),
        );
        Ok(self
            .stream(&mut req, &ns, &run, &uid, &open)
            .instrument(span)
            .await)
    }

    /// One CONNECT: what it opens, in which served pod.
    async fn stream(
        self: Arc<Self>,
        req: &mut Request<Incoming>,
        ns: &str,
        run: &str,
        uid: &str,
        open: &str,
    ) -> Response<Full<Bytes>> {
        let Some((spec, cgroup)) = self.agent.run_pod(ns, run, uid).await else {
            tracing::info!("refused: no such pod served here");
            return answer(
                StatusCode::NOT_FOUND,
                format!("run {ns}/{run} has no pod {uid} served on this node"),
            );
        };
        match open {
            tunnel::OPEN_ADAPTER => adapter_stream(req, &spec).await,
            tunnel::OPEN_SHELL if !self.shells => answer(
                StatusCode::FORBIDDEN,
                "shells are turned off on this node ([pods] shells = false)",
            ),
            tunnel::OPEN_SHELL if !spec.shell => answer(
                StatusCode::FORBIDDEN,
                format!(
                    "the run does not allow shells (its pod has no {}: \"true\"; set the \
                     run's spec.interactive.shell)",
                    super::pods::SHELL_ANNOTATION
                ),
            ),
            tunnel::OPEN_SHELL => self.shell_stream(req, &cgroup).await,
            other => answer(StatusCode::BAD_REQUEST, format!("cannot open {other:?}")),
        }
    }

    async fn shell_stream(
        self: &Arc<Self>,
        req: &mut Request<Incoming>,
        cgroup: &Path,
    ) -> Response<Full<Bytes>> {
        let number = |name: &str, default: u16| {
            header(req, name)
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let size = TermSize::checked(number(tunnel::ROWS, 24), number(tunnel::COLS, 80))
            .unwrap_or_default();
        match self.open_shell(cgroup, size).await {
            Ok((stream, user, resize)) => {
                let mut raw = [0u8; 16];
                rand::fill(&mut raw[..]);
                let id = hex::encode(raw);
                tracing::info!(%user, "shell opened in the pod");
                self.shells().insert(id.clone(), resize);
                let service = Arc::clone(self);
                let gone = id.clone();
                splice_then(req, stream, move || {
                    service.shells().remove(&gone);
                });
                let mut r = answer(StatusCode::OK, "");
                for (name, value) in [(tunnel::USER, user), (tunnel::SHELL_ID, id)] {
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        r.headers_mut().insert(name, v);
                    }
                }
                r
            }
            Err(e) => answer(StatusCode::BAD_GATEWAY, e),
        }
    }

    async fn open_shell(
        &self,
        pod_cgroup: &Path,
        size: TermSize,
    ) -> Result<(crate::run::shell::PtyStream, String, ResizeSender), String> {
        let target = pod_process(pod_cgroup)?;
        let spec = shell_spec(&target.spec, size);
        let user = format!("uid {} of pod process {}", target.spec.uid, target.pid);
        // The session's own cgroup goes below the pod's (the pod's interception and limits).
        let (stream, resize) = open_joined(&self.launcher, pod_cgroup, target.pidfd, &spec)
            .await
            .map_err(|e| e.to_string())?;
        Ok((stream, user, resize))
    }

    /// A resize of an open shell's terminal.
    fn resize(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let number = |name: &str| header(req, name).and_then(|v| v.parse().ok()).unwrap_or(0);
        let Some(size) = TermSize::checked(number(tunnel::ROWS), number(tunnel::COLS)) else {
            return answer(StatusCode::BAD_REQUEST, "rows and cols must be 1 to 1000");
        };
        let id = header(req, tunnel::SHELL_ID).unwrap_or_default();
        match self.shells().get(id).map(|tx| tx.send(size)) {
            Some(Ok(())) => answer(StatusCode::NO_CONTENT, ""),
            _ => answer(StatusCode::NOT_FOUND, "no such shell"),
        }
    }
}

type ResizeSender = tokio::sync::watch::Sender<TermSize>;

/// The pod's adapter: a connection from inside its network namespace to its own port.
async fn adapter_stream(req: &mut Request<Incoming>, spec: &PodSpec) -> Response<Full<Bytes>> {
    let Some(port) = spec.adapter_port else {
        return answer(
            StatusCode::NOT_FOUND,
            format!(
                "pod {} declares no adapter port (annotation {})",
                spec.name,
                super::pods::ADAPTER_PORT_ANNOTATION
            ),
        );
    };
    match connect_in_pod(&spec.netns, port).await {
        Ok(tcp) => {
            tracing::info!(port, "adapter stream opened");
            splice(req, tcp);
            answer(StatusCode::OK, "")
        }
        Err(e) => answer(
            StatusCode::BAD_GATEWAY,
            format!("adapter at 127.0.0.1:{port} in pod {}: {e}", spec.name),
        ),
    }
}

/// Answers the CONNECT, then copies between the stream and `io` until either ends.
fn splice<T>(req: &mut Request<Incoming>, io: T)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    splice_then(req, io, || {});
}

/// [`splice`], then `done`.
fn splice_then<T>(req: &mut Request<Incoming>, mut io: T, done: impl FnOnce() + Send + 'static)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(up) => {
                let mut up = TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut up, &mut io).await;
            }
            Err(e) => tracing::debug!(error = %e, "tunnel stream not upgraded"),
        }
        done();
    });
}

/// A TCP connection to `127.0.0.1:port` made from inside the pod's network namespace.
async fn connect_in_pod(netns: &Path, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let target = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
    let sock = crate::run::publish::socket_in(&NetnsPath::new(netns), target)?;
    tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// The process a shell joins: the pod's container process.
struct PodProcess {
    pid: u32,
    pidfd: OwnedFd,
    /// Its user and environment as the shell's.
    spec: SandboxSpec,
}

fn status_field(status: &str, name: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The first live process of each cgroup below the pod's that holds one (not the sandbox's
/// `pause`, not a shell session's own cgroup).
fn container_processes(pod_cgroup: &Path) -> Vec<u32> {
    let mut found = Vec::new();
    let mut dirs = vec![pod_cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let shell = e
                    .file_name()
                    .to_string_lossy()
                    .starts_with("paddock-shell-");
                if !shell && e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let first = procs
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() != "pause")
            });
        found.extend(first);
    }
    found
}

fn same_user_namespace(pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let ino = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    ino(&format!("/proc/{pid}/ns/user")).is_some_and(|t| Some(t) == ino("/proc/self/ns/user"))
}

/// The pod's container process a shell joins. A pod whose processes are in more than one
/// container cgroup is refused (the node agent cannot tell which is the agent's without the
/// runtime), as is a process running as root, or in a user namespace of its own.
fn pod_process(pod_cgroup: &Path) -> Result<PodProcess, String> {
    let pid = match container_processes(pod_cgroup).as_slice() {
        [] => return Err("no running container process in the pod".into()),
        [pid] => *pid,
        many => {
            return Err(format!(
                "the pod has processes in {} containers; a shell needs exactly one",
                many.len()
            ));
        }
    };
    let raw =
        rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0)).ok_or("no such process")?;
    // The pidfd first: while the process it names has not exited, /proc/PID is that process.
    let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())
        .map_err(|e| format!("the pod's process {pid}: {e}"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("the pod's process {pid}: {e}"))?;
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let userns_ok = same_user_namespace(pid);
    let mut poll = [rustix::event::PollFd::new(
        &pidfd,
        rustix::event::PollFlags::IN,
    )];
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let exited = rustix::event::poll(&mut poll, Some(&now)).is_ok_and(|n| n > 0);
    if exited {
        return Err(format!("the pod's process {pid} exited"));
    }
    let (Some(uid), Some(gid)) = (status_field(&status, "Uid:"), status_field(&status, "Gid:"))
    else {
        return Err(format!("the pod's process {pid} has no readable user"));
    };
    if uid == 0 || gid == 0 {
        return Err(format!(
            "the pod's container process {pid} runs as root: no shell (shells never run as root)"
        ));
    }
    if !userns_ok {
        return Err(
            "the pod runs in a user namespace of its own (hostUsers: false): not supported".into(),
        );
    }
    let env: Vec<(Vec<u8>, Vec<u8>)> = environ
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let i = kv.iter().position(|&b| b == b'=')?;
            (i > 0).then(|| (kv[..i].to_vec(), kv[i + 1..].to_vec()))
        })
        .collect();
    let mut spec = SandboxSpec::raw(uid, gid, format!("uid-{uid}"));
    spec.env = env;
    if !spec.env.iter().any(|(k, _)| k == b"PATH") {
        spec.env.push((
            b"PATH".to_vec(),
            b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_vec(),
        ));
    }
    Ok(PodProcess { pid, pidfd, spec })
}

/// Serves the broker's streams on an open tunnel connection until it ends.
pub async fn serve<I, T>(io: T, service: Arc<TunnelService<I>>) -> Result<(), hyper::Error>
where
    I: Interception + 'static,
    T: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_INTERVAL)
        .serve_connection(
            io,
            hyper::service::service_fn(move |req| Arc::clone(&service).handle(req)),
        )
        .await
}

/// How often the replicas' names are resolved again.
const RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// The client of one replica at `addr`: the configured client with that address, still
/// verifying the broker's certificate against the configured name (or the URL's host).
fn replica_config(base: &BrokerClientConfig, addr: SocketAddr) -> BrokerClientConfig {
    let mut cfg = base.clone();
    if cfg.server_name.is_none() {
        cfg.server_name = url::Url::parse(&base.url)
            .ok()
            .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_owned()));
    }
    cfg.url = format!("https://{addr}");
    cfg
}

/// Every address the names resolve to now (names that do not resolve are logged and skipped:
/// the tunnels already open to their last addresses stay until the next successful answer).
async fn resolve_all(names: &[String]) -> Option<BTreeSet<SocketAddr>> {
    let mut all = BTreeSet::new();
    let mut any = false;
    for name in names {
        match tokio::net::lookup_host(name.as_str()).await {
            Ok(addrs) => {
                any = true;
                all.extend(addrs);
            }
            Err(e) => tracing::warn!(%name, error = %e, "resolving a broker replica name failed"),
        }
    }
    any.then_some(all)
}

/// Keeps a tunnel to every address `names` resolve to (broker replicas), following changes,
/// until `stop` turns true.
pub async fn maintain_each<I: Interception + 'static>(
    base: BrokerClientConfig,
    names: Vec<String>,
    service: Arc<TunnelService<I>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut running: HashMap<SocketAddr, (watch::Sender<bool>, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    loop {
        if let Some(now) = resolve_all(&names).await {
            running.retain(|addr, (tx, _)| {
                let keep = now.contains(addr);
                if !keep {
                    tracing::info!(%addr, "broker replica gone: closing its tunnel");
                    let _ = tx.send(true);
                }
                keep
            });
            for addr in now {
                if running.contains_key(&addr) {
                    continue;
                }
                match BrokerClient::new(&replica_config(&base, addr)) {
                    Ok(client) => {
                        tracing::info!(%addr, "keeping a tunnel to a broker replica");
                        let (tx, rx) = watch::channel(false);
                        let task = tokio::spawn(maintain(client, Arc::clone(&service), rx));
                        running.insert(addr, (tx, task));
                    }
                    Err(e) => tracing::warn!(%addr, error = %e, "no client for a broker replica"),
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RESOLVE_EVERY) => {}
            _ = stop.changed() => break,
        }
    }
    for (_, (tx, task)) in running {
        let _ = tx.send(true);
        let _ = task.await;
    }
}

/// Keeps the tunnel to the broker open until `stop` turns true.
pub async fn maintain<I: Interception + 'static>(
    client: BrokerClient,
    service: Arc<TunnelService<I>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = FIRST_RETRY;
    loop {
        let opened = tokio::select! {
            r = client.open_upgrade(paths::NODE_TUNNEL, tunnel::PROTOCOL) => r,
            _ = stop.changed() => return,
        };
        match opened {
            Ok(upgraded) => {
                retry = FIRST_RETRY;
                tracing::info!("tunnel to the broker open");
                let conn = serve(upgraded, Arc::clone(&service));
                tokio::select! {
                    r = conn => match r {
                        Ok(()) => tracing::info!("tunnel to the broker closed"),
                        Err(e) => tracing::warn!(error = %e, "tunnel to the broker broke"),
                    },
                    _ = stop.changed() => return,
                }
            }
            Err(
                e @ BrokerCallError::Rejected {
                    code: ErrorCode::Forbidden | ErrorCode::Unauthenticated | ErrorCode::NotFound,
                    ..
                },
            ) => {
                tracing::warn!(
                    error = %e,
                    retry_secs = REFUSED_RETRY.as_secs(),
                    "the broker refused the node tunnel (interactive runs and shells cannot \
                     reach this node's pods; the token must be bound to this node)"
                );
                retry = REFUSED_RETRY;
            }
            Err(e) => {
                tracing::warn!(error = %e, "opening the tunnel to the broker failed");
                // A refusal's long wait is not kept for an unrelated failure.
                if retry == REFUSED_RETRY {
                    retry = FIRST_RETRY;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            _ = stop.changed() => return,
        }
        if retry < REFUSED_RETRY {
            retry = (retry * 2).min(MAX_RETRY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_is_dialled_by_address_and_verified_by_the_brokers_name() {
        let mut base =
            BrokerClientConfig::new("https://paddock-broker.paddock-system.svc:8443", "/ca.crt");
        let v4 = replica_config(&base, "10.0.0.7:8443".parse().expect("addr"));
        assert_eq!(v4.url, "https://10.0.0.7:8443");
        assert_eq!(
            v4.server_name.as_deref(),
            Some("paddock-broker.paddock-system.svc")
        );
        let v6 = replica_config(&base, "[fd00::7]:8443".parse().expect("addr"));
        assert_eq!(v6.url, "https://[fd00::7]:8443");
        // A configured name wins over the URL's host.
        base.server_name = Some("broker.example".into());
        let named = replica_config(&base, "10.0.0.8:8443".parse().expect("addr"));
        assert_eq!(named.server_name.as_deref(), Some("broker.example"));
        assert!(
            BrokerClient::new(&named).is_err(),
            "no bearer: refused like any client"
        );
    }

    #[tokio::test]
    async fn replica_names_resolve_to_every_address_and_failures_are_skipped() {
        let all = resolve_all(&["127.0.0.1:8443".into(), "[::1]:8443".into()])
            .await
            .expect("resolved");
        assert_eq!(all.len(), 2);
        let some = resolve_all(&["127.0.0.1:8443".into(), "not a name".into()])
            .await
            .expect("one resolved");
        assert_eq!(some.len(), 1);
        assert!(resolve_all(&["not a name".into()]).await.is_none());
    }
}
