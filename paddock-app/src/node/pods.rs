//! Which pods are on this node and which of them are agent pods, from the API server.
//!
//! A watch of the pods with `spec.nodeName=<this node>` (kube-rs's watcher: it relists on
//! `410 Gone` and restarts with backoff on errors) keeps a [`PodDirectory`]: each pod's UID,
//! namespace, name, run label and resolvers. The CNI step asks it whether the pod being set up
//! is an agent pod and which run it is; the watch removes a deleted pod's interception (the
//! CNI DEL does too) and, after each full list, every served pod the API no longer has.
//!
//! While the API server is unreachable the directory keeps what it knew: served pods stay
//! intercepted, and a pod it has never seen is refused by the CNI step (the runtime retries
//! the sandbox), never let through.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};

use super::agent::{NodeAgent, PodError};
use paddock_proxy::ebpf::Interception;
use paddock_proxy::pod_cgroup::PodUid;

/// The label naming a pod's run.
pub const DEFAULT_RUN_LABEL: &str = "paddock.dev/run";
/// The annotation naming the loopback port of an interactive run's adapter (set by the
/// controller from the run; a pod cannot change its own annotations).
pub const ADAPTER_PORT_ANNOTATION: &str = "paddock.dev/adapter-port";
/// The annotation allowing shells in the pod (set by the controller from the run).
pub const SHELL_ANNOTATION: &str = "paddock.dev/shell";

/// What the node agent knows about a pod on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: PodUid,
    pub namespace: String,
    pub name: String,
    /// The run label's value; `None`: not an agent pod.
    pub run: Option<String>,
    /// Where its DNS may go (at most one per family).
    pub nameservers: Vec<IpAddr>,
    /// Its interactive adapter's loopback port ([`ADAPTER_PORT_ANNOTATION`]).
    pub adapter_port: Option<u16>,
    /// Shells allowed ([`SHELL_ANNOTATION`] is `"true"`).
    pub shell: bool,
}

/// The answer about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Agent(PodMeta),
    NotAgent(PodMeta),
    /// Not (yet) in the API server's view of this node.
    Unknown,
}

/// How pods are read.
#[derive(Debug, Clone)]
pub struct PodSettings {
    pub run_label: String,
    /// Cluster DNS (kubelet's `clusterDNS`), for pods with the default `ClusterFirst` policy.
    pub cluster_dns: Vec<IpAddr>,
}

#[derive(Debug, Default)]
struct DirState {
    synced: bool,
    pods: HashMap<PodUid, PodMeta>,
}

/// The pods on this node, as last seen.
#[derive(Debug)]
pub struct PodDirectory {
    state: RwLock<DirState>,
    changed: tokio::sync::Notify,
    /// How long the CNI step waits for a pod it does not know yet.
    cni_wait: Duration,
}

/// How long a CNI ADD waits for the pod to appear in the watch, by default.
pub const DEFAULT_CNI_WAIT: Duration = Duration::from_secs(10);

impl PodDirectory {
    #[must_use]
    pub fn new() -> Arc<Self> {
        Self::with_cni_wait(DEFAULT_CNI_WAIT)
    }

    /// A directory whose CNI lookups wait at most `wait` for an unknown pod.
    #[must_use]
    pub fn with_cni_wait(wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: RwLock::default(),
            changed: tokio::sync::Notify::new(),
            cni_wait: wait,
        })
    }

    /// See [`PodDirectory::with_cni_wait`].
    #[must_use]
    pub fn cni_wait(&self) -> Duration {
        self.cni_wait
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, DirState> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, DirState> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A pod was added or changed.
    pub fn apply(&self, meta: PodMeta) {
        self.write().pods.insert(meta.uid.clone(), meta);
        self.changed.notify_waiters();
    }

    /// A pod was deleted.
    pub fn delete(&self, uid: &PodUid) -> Option<PodMeta> {
        let gone = self.write().pods.remove(uid);
        self.changed.notify_waiters();
        gone
    }

    /// A full list: the directory becomes exactly `all`; returns the UIDs that went.
    pub fn replace(&self, all: Vec<PodMeta>) -> Vec<PodUid> {
        let mut state = self.write();
        let fresh: HashMap<PodUid, PodMeta> = all.into_iter().map(|m| (m.uid.clone(), m)).collect();
        let mut gone: Vec<PodUid> = state
            .pods
            .keys()
            .filter(|k| !fresh.contains_key(*k))
            .cloned()
            .collect();
        gone.sort();
        state.pods = fresh;
        state.synced = true;
        drop(state);
        self.changed.notify_waiters();
        gone
    }

    /// Whether a full list has been seen.
    #[must_use]
    pub fn is_synced(&self) -> bool {
        self.read().synced
    }

    /// Whether the pod is known.
    #[must_use]
    pub fn contains(&self, uid: &PodUid) -> bool {
        self.read().pods.contains_key(uid)
    }

    fn answer(&self, uid: &PodUid) -> Option<Lookup> {
        let state = self.read();
        match state.pods.get(uid) {
            Some(m) if m.run.is_some() => Some(Lookup::Agent(m.clone())),
            Some(m) => Some(Lookup::NotAgent(m.clone())),
            None => None,
        }
    }

    /// The pod, waiting up to `wait` for the watch to bring it (a pod can reach the CNI step
    /// before its watch event reaches this node agent).
    pub async fn lookup(&self, uid: &PodUid, wait: Duration) -> Lookup {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(a) = self.answer(uid) {
                return a;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.answer(uid).unwrap_or(Lookup::Unknown);
            }
        }
    }
}

/// What the directory keeps of a pod; `None` for a pod without a usable UID.
#[must_use]
pub fn pod_meta(pod: &Pod, settings: &PodSettings) -> Option<PodMeta> {
    let uid = PodUid::parse(pod.metadata.uid.as_deref()?).ok()?;
    let namespace = pod.metadata.namespace.clone()?;
    let name = pod.metadata.name.clone()?;
    let run = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(&settings.run_label))
        .cloned();
    // A pod's own dnsConfig cannot widen where its UDP may go: only the node's configured
    // cluster DNS is ever allowed (a pod naming another resolver would get raw UDP/53 to it,
    // a tunnel past the proxy). `None`/`Default` policies get the cluster DNS only when they
    // name it themselves.
    let spec = pod.spec.as_ref();
    let policy = spec
        .and_then(|s| s.dns_policy.as_deref())
        .unwrap_or("ClusterFirst");
    let named: Vec<IpAddr> = spec
        .and_then(|s| s.dns_config.as_ref())
        .and_then(|c| c.nameservers.as_ref())
        .map(|n| n.iter().filter_map(|a| a.parse().ok()).collect())
        .unwrap_or_default();
    let candidates: Vec<IpAddr> = match policy {
        "None" | "Default" => named
            .into_iter()
            .filter(|a| settings.cluster_dns.contains(a))
            .collect(),
        _ => settings.cluster_dns.clone(),
    };
    let v4 = candidates.iter().find(|a| a.is_ipv4()).copied();
    let v6 = candidates.iter().find(|a| a.is_ipv6()).copied();
    let annotation = |name: &str| pod.metadata.annotations.as_ref()?.get(name);
    let adapter_port = annotation(ADAPTER_PORT_ANNOTATION)
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|&p| p != 0);
    let shell = annotation(SHELL_ANNOTATION).is_some_and(|v| v == "true");
    Some(PodMeta {
        uid,
        namespace,
        name,
        run,
        nameservers: v4.into_iter().chain(v6).collect(),
        adapter_port,
        shell,
    })
}

/// Keeps `dir` in step with the pods on `node` until `stop`, and releases the interception of
/// pods that go. Errors are logged and retried with backoff; the directory keeps its last
/// state meanwhile.
pub async fn watch_pods<I: Interception>(
    api: kube::Api<Pod>,
    node: String,
    settings: PodSettings,
    dir: Arc<PodDirectory>,
    agent: Arc<NodeAgent<I>>,
    stop: impl Future<Output = ()>,
) {
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let stream = watcher::watcher(api, config).default_backoff();
    tokio::pin!(stream);
    tokio::pin!(stop);
    let mut listing: Vec<PodMeta> = Vec::new();
    loop {
        let event = tokio::select! {
            () = &mut stop => return,
            e = stream.next() => e,
        };
        let Some(event) = event else {
            tracing::error!("pod watch ended");
            return;
        };
        match event {
            Ok(Event::Init) => listing.clear(),
            Ok(Event::InitApply(pod)) => listing.extend(pod_meta(&pod, &settings)),
            Ok(Event::InitDone) => {
                let gone = dir.replace(std::mem::take(&mut listing));
                tracing::info!(node = %node, gone = gone.len(), "pod list in sync");
                for uid in gone {
                    release(&agent, &uid).await;
                }
                // Served pods the API does not have (deleted while no node agent ran).
                for served in agent.list().await {
                    if !dir.contains(&served.uid) {
                        release(&agent, &served.uid).await;
                    }
                }
            }
            Ok(Event::Apply(pod)) => {
                if let Some(m) = pod_meta(&pod, &settings) {
                    dir.apply(m);
                }
            }
            Ok(Event::Delete(pod)) => {
                if let Some(m) = pod_meta(&pod, &settings) {
                    dir.delete(&m.uid);
                    release(&agent, &m.uid).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "pod watch failed; retrying (served pods stay intercepted)");
            }
        }
    }
}

async fn release<I: Interception>(agent: &NodeAgent<I>, uid: &PodUid) {
    match agent.remove_if_gone(uid).await {
        Ok(_) | Err(PodError::NotFound(_)) => {}
        Err(e) => tracing::warn!(pod = %uid, error = %e, "cannot release a deleted pod"),
    }
}
