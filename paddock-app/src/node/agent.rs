//! The node agent's pod table: each agent pod on the node is a run with its own pipeline,
//! listeners inside its network namespace and eBPF programs on its cgroup.
//!
//! Adding a pod, in order: check the spec; find the pod's cgroup (kubelet layout); bind
//! `127.0.0.1:P` and `[::1]:P` inside the pod's namespace; start a pipeline for the pod's run
//! on those listeners; attach the programs to the pod cgroup, configured to send its
//! connections to `P` on its own loopback and its DNS only to its resolvers; record the pod.
//! Any failure undoes the steps before it and is the answer (the CNI ADD fails, the pod does
//! not start). The pod's run is known from the listener that accepted a connection, so a pod
//! cannot speak for another: no source address is ever trusted.
//!
//! Removing a pod: detach its programs and config, stop its listeners, close its open
//! connections (both legs), drop its pipeline and upstream pool, forget its record.
//!
//! Upstream connections leave from the node agent's own network namespace (the node's, for a
//! `DaemonSet` with `hostNetwork`), not the pod's: upstream servers and node firewalls see the
//! node's address, and Kubernetes network policies selecting the pod do not see its proxied
//! egress (Paddock's policy is what governs it). Dialling from the pod's namespace would need
//! a `setns` round trip per upstream connection and a resolver per pod; see
//! `deploy/README.md`.
//!
//! Attaching per pod, not once at `kubepods`: the programs refuse every connect of a cgroup
//! without config, so an attachment higher up would have to learn an exemption for every
//! non-agent pod, and it would put the programs on every pod's connect path. Per-pod attachment
//! costs 13 link creations per agent pod (see `cargo xtask bench node`) and nothing for other
//! pods.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::pod::{PodSpec, PodSpecError};
use super::state::{PodRecord, StateDir, StateError};
use paddock_proxy::audit::AuditSink;
use paddock_proxy::cgroup::{Cgroup, CgroupError};
use paddock_proxy::dns::{DnsParts, DnsServer, DnsSettings, DnsSettingsError};
use paddock_proxy::ebpf::{AgentConfig, ConfigError, EbpfError, Interception};
use paddock_proxy::http::{HttpLimits, Substituter};
use paddock_proxy::metrics::ProxyMetrics;
use paddock_proxy::net::{DialSettings, Vetter};
use paddock_proxy::netns::{NetnsEntry, NetnsError, NetnsPath, PodSockets};
use paddock_proxy::origdst::OriginalDst;
use paddock_proxy::pod_cgroup::{CgroupDriver, PodCgroupError, PodUid, find_pod_cgroup};
use paddock_proxy::policy::EgressPolicy;
use paddock_proxy::proxy::{
    Connector, Drain, ListenerKind, Pipeline, PipelineLimits, PipelineParts, run_listener,
};
use paddock_proxy::tls::{MitmServer, UpstreamTls};

/// The DNS port allowed towards a pod's nameservers.
const DNS_PORT: u16 = 53;
/// How long a removed pod's connections get to finish before they are closed.
const POD_DRAIN: Duration = Duration::from_millis(0);

/// Binds a pod's listeners inside its network namespace: the one kernel boundary of adding a
/// pod besides the cgroup and eBPF ones, so the table is tested without privileges.
pub trait PodListeners: Send + Sync + std::fmt::Debug + 'static {
    /// TCP and UDP on `127.0.0.1:P` and (with IPv6) `[::1]:P` in the namespace at `netns`,
    /// non-blocking; `preferred` is tried first.
    fn bind(&self, netns: &Path, preferred: u16) -> Result<PodSockets, NetnsError>;
}

/// The real thing: enter the namespace on a short-lived thread and bind there.
#[derive(Debug, Default, Clone, Copy)]
pub struct InPodNamespace;

impl PodListeners for InPodNamespace {
    fn bind(&self, netns: &Path, preferred: u16) -> Result<PodSockets, NetnsError> {
        check_pod_netns(netns)?;
        NetnsPath::new(netns).run_in(move || paddock_proxy::netns::bind_pod_listeners(preferred))?
    }
}

/// The path must name a network namespace (nsfs; opened without blocking, so a FIFO cannot
/// hang the call) other than the node agent's own: a pod's listeners in the node's
/// namespace would serve its run to every host-network process.
fn check_pod_netns(path: &Path) -> Result<(), NetnsError> {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    let refuse = |why: &str| NetnsError::Open {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_owned()),
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| NetnsError::Open {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(refuse("not a namespace file"));
    }
    let own = std::fs::metadata("/proc/self/ns/net").map_err(|source| NetnsError::Open {
        path: "/proc/self/ns/net".into(),
        source,
    })?;
    let pod = file.metadata().map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if (pod.dev(), pod.ino()) == (own.dev(), own.ino()) {
        return Err(refuse(
            "the node agent's own network namespace, not a pod's",
        ));
    }
    Ok(())
}

/// What every pod's pipeline shares (one CA, one leaf cache, one upstream TLS config, one
/// broker client, one audit trail and one metrics registry per node).
#[derive(Debug, Clone)]
pub struct NodeParts {
    pub policy: Arc<dyn EgressPolicy>,
    pub substituter: Arc<dyn Substituter>,
    /// With a broker: each pod gets its own policy and substituter from this client, naming
    /// the pod's UID in every call (the broker checks the run is that pod's), instead of
    /// `policy` and `substituter`.
    pub broker: Option<paddock_proxy::broker::BrokerClient>,
    /// Reused substitution answers of `broker`, shared by every pod (one subscription).
    pub grants: Option<paddock_proxy::broker::GrantCache>,
    pub vetter: Vetter,
    pub mitm: Arc<MitmServer>,
    pub upstream_tls: Arc<UpstreamTls>,
    /// Each pod gets its own [`Connector`] with these settings, so its dialled connections
    /// (the connector keeps some for the pool) never serve another pod's run.
    pub dial: DialSettings,
    pub audit: Arc<dyn AuditSink>,
    pub metrics: Arc<ProxyMetrics>,
    pub origdst: Arc<dyn OriginalDst>,
    pub http_limits: HttpLimits,
    /// Per pod.
    pub limits: PipelineLimits,
    pub plain_http_ports: Vec<u16>,
    pub deny_page: bool,
    pub egress_recheck: Option<Duration>,
    /// Each pod's DNS server (per pod: its rate limit is the pod's run's).
    pub dns: DnsSettings,
}

/// Where pods' cgroups are.
#[derive(Debug, Clone)]
pub struct CgroupLayout {
    pub root: PathBuf,
    /// `None`: either driver's layout.
    pub driver: Option<CgroupDriver>,
}

/// Why a pod could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("pod spec: {0}")]
    Spec(#[from] PodSpecError),
    #[error(transparent)]
    Cgroup(#[from] PodCgroupError),
    #[error("pod cgroup: {0}")]
    CgroupOpen(#[from] CgroupError),
    #[error("pod network namespace: {0}")]
    Netns(#[from] NetnsError),
    #[error("pod listeners: {0}")]
    Listen(std::io::Error),
    #[error("pod DNS server: {0}")]
    Dns(#[from] DnsSettingsError),
    #[error("eBPF: {0}")]
    Ebpf(#[from] EbpfError),
    #[error("eBPF config: {0}")]
    AgentConfig(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "pod {0} is already served with another spec (run, namespace or netns differ): delete \
         it first"
    )]
    Conflict(PodUid),
    #[error("pod {0} is not served here")]
    NotFound(PodUid),
    #[error("the node agent is shutting down")]
    ShuttingDown,
}

/// A served pod as the control socket reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub uid: PodUid,
    pub namespace: String,
    pub name: String,
    pub run: String,
    pub netns: PathBuf,
    pub port: u16,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub driver: CgroupDriver,
    pub connections: usize,
}

struct Served {
    spec: PodSpec,
    cgroup: Cgroup,
    driver: CgroupDriver,
    port: u16,
    /// The `[::1]` listener exists.
    v6: bool,
    pipeline: Arc<Pipeline>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Served {
    fn status(&self) -> PodStatus {
        PodStatus {
            uid: self.spec.uid.clone(),
            namespace: self.spec.namespace.clone(),
            name: self.spec.name.clone(),
            run: self.spec.run.clone(),
            netns: self.spec.netns.clone(),
            port: self.port,
            cgroup: self.cgroup.path().to_path_buf(),
            cgroup_id: self.cgroup.id(),
            driver: self.driver,
            connections: self.pipeline.active_connections(),
        }
    }

    /// Stops the listeners, closes every connection and waits for the tasks to end.
    async fn stop(mut self) {
        let _ = self.stop.send(true);
        self.pipeline.abort_connections();
        let _ = Drain::wait(&self.pipeline, POD_DRAIN).await;
        self.tasks.shutdown().await;
    }
}

/// The pods this node agent serves.
pub struct NodeAgent<I: Interception> {
    parts: NodeParts,
    interception: Mutex<I>,
    listeners: Arc<dyn PodListeners>,
    layout: CgroupLayout,
    state: Option<StateDir>,
    pods: tokio::sync::Mutex<HashMap<PodUid, Served>>,
    closed: std::sync::atomic::AtomicBool,
}

impl<I: Interception> std::fmt::Debug for NodeAgent<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAgent")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl<I: Interception> NodeAgent<I> {
    #[must_use]
    pub fn new(
        parts: NodeParts,
        interception: I,
        listeners: Arc<dyn PodListeners>,
        layout: CgroupLayout,
        state: Option<StateDir>,
    ) -> Self {
        Self {
            parts,
            interception: Mutex::new(interception),
            listeners,
            layout,
            state,
            pods: tokio::sync::Mutex::new(HashMap::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The served pod `uid`, when it is `run`'s in `namespace`: its spec and cgroup.
    pub async fn run_pod(
        &self,
        namespace: &str,
        run: &str,
        uid: &str,
    ) -> Option<(PodSpec, std::path::PathBuf)> {
        let uid = PodUid::parse(uid).ok()?;
        let pods = self.pods.lock().await;
        let served = pods.get(&uid)?;
        (served.spec.namespace == namespace && served.spec.run == run)
            .then(|| (served.spec.clone(), served.cgroup.path().to_path_buf()))
    }

    /// Serves `spec`'s pod; idempotent for the same spec (a retried CNI ADD).
    pub async fn add(&self, spec: PodSpec) -> Result<PodStatus, PodError> {
        self.add_with_port(spec, 0).await
    }

    async fn add_with_port(&self, spec: PodSpec, preferred: u16) -> Result<PodStatus, PodError> {
        spec.validate()?;
        let mut pods = self.pods.lock().await;
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(PodError::ShuttingDown);
        }
        if let Some(served) = pods.get(&spec.uid) {
            if served.spec == spec {
                return Ok(served.status());
            }
            return Err(PodError::Conflict(spec.uid));
        }
        let (path, driver) = find_pod_cgroup(&self.layout.root, &spec.uid, self.layout.driver)?;
        let cgroup = Cgroup::open(path)?;
        let listeners = Arc::clone(&self.listeners);
        let netns = spec.netns.clone();
        let sockets = tokio::task::spawn_blocking(move || listeners.bind(&netns, preferred))
            .await
            .map_err(|_| PodError::Netns(NetnsError::Panicked))??;
        let port = sockets.port;
        let served = self.start(spec, cgroup, driver, sockets)?;
        let status = served.status();
        let uid = served.spec.uid.clone();
        // `preferred` is a recorded pod's port: that pod is running, and taking its programs
        // off on a failure would open its egress (a new pod does not start on a failed ADD).
        if let Err(e) = self.intercept(&served, preferred != 0) {
            served.stop().await;
            return Err(e);
        }
        tracing::info!(
            pod = %uid, namespace = %status.namespace, name = %status.name, run = %status.run,
            port, cgroup = %status.cgroup.display(), "pod intercepted"
        );
        pods.insert(uid, served);
        Ok(status)
    }

    /// The pod's pipeline and accept loops on its listeners, and its DNS server.
    fn start(
        &self,
        spec: PodSpec,
        cgroup: Cgroup,
        driver: CgroupDriver,
        sockets: PodSockets,
    ) -> Result<Served, PodError> {
        let p = &self.parts;
        let (policy, substituter): (Arc<dyn EgressPolicy>, Arc<dyn Substituter>) = match &p.broker {
            Some(client) => (
                Arc::new({
                    let policy = paddock_proxy::broker::BrokerPolicy::new(client.clone())
                        .for_pod(spec.uid.as_str());
                    match &p.grants {
                        Some(grants) => policy.with_generation(grants.clone()),
                        None => policy,
                    }
                }),
                Arc::new({
                    let s = paddock_proxy::broker::BrokerSubstituter::new(client.clone())
                        .with_metrics(Arc::clone(&p.metrics))
                        .for_pod(spec.uid.as_str());
                    match &p.grants {
                        Some(grants) => s.with_grants(grants.clone()),
                        None => s,
                    }
                }),
            ),
            None => (Arc::clone(&p.policy), Arc::clone(&p.substituter)),
        };
        let (stop, stop_rx) = watch::channel(false);
        // The pod's DNS answers only names its run's policy could reach: without it, its
        // nameservers (the cluster DNS) would carry any name onwards, a DNS tunnel.
        let dns = Arc::new(
            DnsServer::new(DnsParts {
                run: spec.run.clone(),
                settings: p.dns.clone(),
                policy: Arc::clone(&policy),
                resolver: Arc::clone(p.vetter.resolver()),
                cidr: Arc::clone(p.vetter.cidr()),
                audit: Arc::clone(&p.audit),
                metrics: Arc::clone(&p.metrics),
            })
            .map_err(PodError::Dns)?,
        );
        let pipeline = Arc::new(Pipeline::new(
            PipelineParts {
                run: spec.run.clone(),
                policy,
                vetter: p.vetter.clone(),
                mitm: Arc::clone(&p.mitm),
                upstream_tls: Arc::clone(&p.upstream_tls),
                connector: Arc::new(Connector::new(
                    p.vetter.clone(),
                    Arc::clone(&p.upstream_tls),
                    p.dial.clone(),
                    p.limits.idle_timeout,
                    Arc::clone(&p.metrics),
                )),
                substituter,
                audit: Arc::clone(&p.audit),
                metrics: Arc::clone(&p.metrics),
                origdst: Arc::clone(&p.origdst),
                http_limits: p.http_limits.clone(),
                limits: p.limits.clone(),
                plain_http_ports: p.plain_http_ports.clone(),
                deny_page: p.deny_page,
                egress_recheck: p.egress_recheck,
            },
            stop_rx.clone(),
        ));
        let mut tasks = tokio::task::JoinSet::new();
        let v6 = sockets.listeners.len() > 1;
        for l in sockets.listeners {
            let l = TcpListener::from_std(l).map_err(PodError::Listen)?;
            tasks.spawn(run_listener(
                Arc::clone(&pipeline),
                l,
                ListenerKind::Transparent,
            ));
        }
        for socket in sockets.dns {
            let (dns, stop) = (Arc::clone(&dns), stop_rx.clone());
            let run = spec.run.clone();
            tasks.spawn(async move {
                if let Err(e) = dns.serve_udp(socket, stop).await {
                    tracing::error!(run = %run, error = %e, "pod DNS server failed");
                }
            });
        }
        Ok(Served {
            spec,
            cgroup,
            driver,
            port: sockets.port,
            v6,
            pipeline,
            stop,
            tasks,
        })
    }

    /// Attaches and configures the pod cgroup's programs, then records the pod; undoes the
    /// attachment when the record cannot be written.
    fn intercept(&self, served: &Served, running: bool) -> Result<(), PodError> {
        let cfg = pod_agent_config(served.port, served.v6, &served.spec)?;
        let mut ic = self
            .interception
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = ic.attach_agent(&served.cgroup, &cfg) {
            // Some programs may be attached already: take them and the config back out, so a
            // pod that does not start leaves nothing pinned; a running pod keeps them.
            if !running && let Err(d) = ic.detach_agent(&served.cgroup) {
                tracing::error!(error = %d, "cannot detach a partly attached pod");
            }
            return Err(e.into());
        }
        if let Some(state) = &self.state
            && let Err(e) = state.save(&PodRecord {
                spec: served.spec.clone(),
                port: served.port,
                cgroup_id: served.cgroup.id(),
            })
        {
            if !running && let Err(d) = ic.detach_agent(&served.cgroup) {
                tracing::error!(error = %d, "cannot detach a pod that could not be recorded");
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Stops serving a pod and frees everything it held.
    pub async fn remove(&self, uid: &PodUid) -> Result<(), PodError> {
        let served = self
            .pods
            .lock()
            .await
            .remove(uid)
            .ok_or_else(|| PodError::NotFound(uid.clone()))?;
        let detached = self
            .interception
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .detach_agent(&served.cgroup);
        let run = served.spec.run.clone();
        served.stop().await;
        if let Some(state) = &self.state {
            state.remove(uid)?;
        }
        detached?;
        tracing::info!(pod = %uid, run = %run, "pod released");
        Ok(())
    }

    /// The served pods, by UID.
    pub async fn list(&self) -> Vec<PodStatus> {
        let mut out: Vec<_> = self
            .pods
            .lock()
            .await
            .values()
            .map(Served::status)
            .collect();
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        out
    }

    /// After a restart: serve the recorded pods that still exist (on their old port when it
    /// is free), and detach and forget the ones whose namespace or cgroup is gone. Pinned
    /// programs of pods without a record are left alone (they refuse connections while no
    /// listener answers; `paddock-proxy ebpf detach` removes them).
    pub async fn restore(&self) -> Result<RestoreReport, StateError> {
        let Some(state) = &self.state else {
            return Ok(RestoreReport::default());
        };
        let mut report = RestoreReport::default();
        for record in state.load()? {
            let uid = record.spec.uid.clone();
            // The pod is gone only when its cgroup is: a pod whose namespace path is not
            // visible (yet) or whose listeners cannot be bound is still running, and
            // detaching it would open its egress. It stays attached (refused) instead.
            let Some(cgroup) = self.recorded_cgroup(&record) else {
                if let Err(e) = self
                    .interception
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .detach_agent_id(record.cgroup_id)
                {
                    tracing::warn!(pod = %uid, error = %e, "cannot detach a gone pod's programs");
                }
                state.remove(&uid)?;
                tracing::info!(pod = %uid, "pod gone while no node agent ran; released");
                report.released.push(uid);
                continue;
            };
            drop(cgroup);
            match self.add_with_port(record.spec.clone(), record.port).await {
                Ok(_) => report.restored.push(uid),
                Err(e) => {
                    tracing::error!(
                        pod = %uid, error = %e,
                        "cannot serve a recorded pod again; it stays intercepted with its \
                         connections refused"
                    );
                    self.refuse_dns(&record);
                    report.failed.push(uid);
                }
            }
        }
        Ok(report)
    }

    /// The recorded pod's cgroup, if it still exists (the same directory, not a new one).
    fn recorded_cgroup(&self, record: &PodRecord) -> Option<Cgroup> {
        find_pod_cgroup(&self.layout.root, &record.spec.uid, self.layout.driver)
            .ok()
            .and_then(|(path, _)| Cgroup::open(path).ok())
            .filter(|c| c.id() == record.cgroup_id)
    }

    /// A recorded pod that could not be served again keeps the config an older node agent
    /// pinned, which may let its DNS reach its nameservers directly (agents before the pods'
    /// own DNS servers): point that DNS at the pod's closed port, so it fails closed like its
    /// connections. Never detaches: a failure here leaves the old config and says so.
    fn refuse_dns(&self, record: &PodRecord) {
        let rewritten = self
            .recorded_cgroup(record)
            .ok_or_else(|| "its cgroup is not found".to_owned())
            .and_then(|cgroup| {
                let cfg = pod_agent_config(record.port, false, &record.spec)
                    .map_err(|e| e.to_string())?;
                self.interception
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .attach_agent(&cgroup, &cfg)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = rewritten {
            tracing::error!(
                pod = %record.spec.uid, error = %e,
                "cannot point an unserved pod's DNS at its closed port: an older node agent's \
                 config may still let it reach its nameservers"
            );
        }
    }

    /// Detaches the pinned pod programs (`pinned`: cgroup ids with links under the pin
    /// directory) whose cgroup no longer exists under the cgroup root and that this node agent
    /// does not serve: pods removed while their record was lost. Programs of a live cgroup
    /// stay (its connections are refused): the cgroup may be a running pod's. Call after
    /// [`NodeAgent::restore`].
    pub async fn release_unserved(&self, pinned: &[u64]) -> Vec<u64> {
        let served: std::collections::HashSet<u64> = self
            .pods
            .lock()
            .await
            .values()
            .map(|s| s.cgroup.id())
            .collect();
        let live = live_cgroup_ids(&self.layout.root);
        let mut released = Vec::new();
        for &id in pinned {
            if served.contains(&id) {
                continue;
            }
            if live.contains(&id) {
                tracing::warn!(
                    cgroup_id = id,
                    "programs pinned for a live cgroup without a pod record: kept (refusing)"
                );
                continue;
            }
            let detached = self
                .interception
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .detach_agent_id(id);
            match detached {
                Ok(()) => {
                    tracing::info!(cgroup_id = id, "programs of a gone cgroup detached");
                    released.push(id);
                }
                Err(e) => {
                    tracing::warn!(cgroup_id = id, error = %e, "cannot detach stale pod programs");
                }
            }
        }
        released
    }

    /// Removes a pod the API server says is deleted, but only once its cgroup is gone: a
    /// force-deleted pod's containers can still run, and a relist can lag behind a pod just
    /// created. Otherwise the pod stays served until the runtime's CNI DEL. `Ok(false)`: kept.
    pub async fn remove_if_gone(&self, uid: &PodUid) -> Result<bool, PodError> {
        let alive = self
            .pods
            .lock()
            .await
            .get(uid)
            .is_some_and(|s| s.cgroup.path().exists());
        if alive {
            tracing::info!(pod = %uid, "deleted in the API but its cgroup is still there; kept until CNI DEL");
            return Ok(false);
        }
        self.remove(uid).await.map(|()| true)
    }

    /// Stops every pod's listeners and connections, keeping their programs and records: while
    /// no node agent runs, the pods' connections are refused, never let out (the upgrade and
    /// crash path), and the next node agent takes the pods back with [`NodeAgent::restore`].
    pub async fn shutdown(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let pods: Vec<Served> = self.pods.lock().await.drain().map(|(_, s)| s).collect();
        for served in pods {
            served.stop().await;
        }
    }
}

/// What [`NodeAgent::restore`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub restored: Vec<PodUid>,
    pub released: Vec<PodUid>,
    /// Still running but not served again (kept attached: refused).
    pub failed: Vec<PodUid>,
}

/// Ids (inode numbers) of every cgroup directory below `root`, a few levels deep (kubelet's
/// layout is at most four below its root).
fn live_cgroup_ids(root: &Path) -> std::collections::HashSet<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = std::collections::HashSet::new();
    let mut stack = vec![(root.to_path_buf(), 0u8)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if let Ok(m) = e.metadata() {
                    out.insert(m.ino());
                }
                if depth < 6 {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
    out
}

/// The pod cgroup's interception settings: TCP to `P` on the pod's own loopback (IPv6 only
/// when the `[::1]` listener exists), UDP only to its nameservers on port 53, and that DNS
/// redirected to the pod's DNS server on UDP `P` of the same loopback.
pub fn pod_agent_config(port: u16, v6: bool, spec: &PodSpec) -> Result<AgentConfig, ConfigError> {
    let mut cfg = AgentConfig::loopback(port);
    cfg.proxy_v4 = Ipv4Addr::LOCALHOST;
    cfg.proxy_v6 = v6.then_some(Ipv6Addr::LOCALHOST);
    // An IPv6 nameserver needs the `[::1]` DNS socket to be redirected to; without it, UDP
    // to that nameserver is refused (EPERM) rather than sent to a port nothing serves.
    cfg.dns = spec
        .nameservers
        .iter()
        .filter(|ip| v6 || ip.is_ipv4())
        .map(|ip: &IpAddr| SocketAddr::new(*ip, DNS_PORT))
        .collect();
    // No nameserver: no UDP at all, so nothing to redirect.
    cfg.dns_redirect_port = (!cfg.dns.is_empty()).then_some(port);
    cfg.validate()?;
    Ok(cfg)
}
