//! `paddock-proxy node`: one process per node serving every agent pod on it, each pod as its
//! own run (see [`agent`] for what adding and removing a pod does).
//!
//! Start-up, in order: read the config; open the audit trail, the node CA, the broker client
//! and the shared data-plane parts; load the eBPF programs into the node's pin directory
//! (maps and pod links pinned, so interception outlives this process); answer
//! `SO_ORIGINAL_DST` for this process's cgroup; take back the pods recorded by the previous
//! node agent ([`agent::NodeAgent::restore`]); then open the pod socket ([`control`]) and the
//! admin endpoint and report ready. SIGTERM or SIGINT stops the listeners and connections but
//! leaves the programs and records: pods stay intercepted (refused) until the next start.

pub mod agent;
pub mod cni;
pub mod config;
pub mod control;
pub mod install_cni;
pub mod pod;
pub mod pods;
pub mod state;
pub mod tunnel;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use self::agent::{CgroupLayout, InPodNamespace, NodeAgent, NodeParts};
use self::config::NodeConfig;
use self::state::StateDir;
use crate::serve::ServeError;
use paddock_proxy::broker::{BrokerClient, BrokerPolicy, BrokerSubstituter};
use paddock_proxy::cgroup::Cgroup;
use paddock_proxy::ebpf::{Interception, Interceptor, LoadOptions};
use paddock_proxy::metrics::{AdminServer, ProxyMetrics, Readiness};
use paddock_proxy::net::{
    CidrConfig, CidrPolicy, DialSettings, DnsResolver, ResolverSettings, Vetter,
};
use paddock_proxy::origdst::SockoptOriginalDst;
use paddock_proxy::tls::node_ca::{self, NodeCaSource, RenewalSettings};
use paddock_proxy::tls::{LeafCache, MitmServer, UpstreamTls};

use crate::serve::config::TlsMode;

/// Why the node agent did not start (or stopped abnormally).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("pod state: {0}")]
    State(#[from] state::StateError),
    #[error("Kubernetes client: {0}")]
    Kube(String),
    #[error("node CA from the broker: {0}")]
    NodeCa(String),
    #[error("pod socket {path}: {source}")]
    Socket {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl From<paddock_proxy::ebpf::EbpfError> for NodeError {
    fn from(e: paddock_proxy::ebpf::EbpfError) -> Self {
        Self::Serve(e.into())
    }
}

/// The shared data-plane parts of every pod, from the config, forging with the CA of
/// `tls.ca_dir` (`tls.mode = "local"`).
pub fn node_parts(cfg: &NodeConfig, metrics: &Arc<ProxyMetrics>) -> Result<NodeParts, ServeError> {
    let leaves = Arc::new(
        cfg.tls
            .leaf_cache(cfg.node_name.as_deref().unwrap_or("node"))
            .map_err(ServeError::Ca)?,
    );
    node_parts_with(cfg, metrics, leaves)
}

/// The shared data-plane parts of every pod, forging through `leaves`.
pub fn node_parts_with(
    cfg: &NodeConfig,
    metrics: &Arc<ProxyMetrics>,
    leaves: Arc<LeafCache>,
) -> Result<NodeParts, ServeError> {
    let audit = cfg
        .audit
        .target
        .as_deref()
        .unwrap_or("none")
        .parse::<paddock_proxy::audit::AuditTarget>()
        .map_err(|e| {
            ServeError::Config(crate::serve::config::ConfigError::Invalid(format!(
                "audit: {e}"
            )))
        })?
        .open()?;
    metrics.set_audit_disabled(audit.is_disabled());
    let mitm = Arc::new(MitmServer::new(leaves).map_err(ServeError::Ca)?);
    let upstream_tls =
        Arc::new(UpstreamTls::new(cfg.tls.upstream_ca_bundle.as_deref()).map_err(ServeError::Ca)?);
    let client = BrokerClient::new(&cfg.broker.client_config())?;
    tracing::info!(url = %cfg.broker.url, "egress policy and substitution by the broker, per pod run");
    let cidr = Arc::new(CidrPolicy::from_config(&CidrConfig {
        deny: cfg.network.deny_cidrs.clone(),
        allow: cfg.network.allow_cidrs.clone(),
    })?);
    let resolver = Arc::new(DnsResolver::new(ResolverSettings {
        nameservers: cfg.network.nameservers.clone(),
        use_hosts_file: cfg.network.use_hosts_file,
        ..ResolverSettings::default()
    })?);
    let vetter = Vetter::new(resolver, cidr);
    let mut dial = DialSettings::default();
    if let Some(secs) = cfg.network.dial_attempt_timeout_secs {
        dial.attempt_timeout = Duration::from_secs(secs.max(1));
    }
    let limits = cfg.limits.pipeline_limits();
    let http_limits = cfg.limits.http_limits();
    Ok(NodeParts {
        policy: Arc::new(BrokerPolicy::new(client.clone())),
        substituter: Arc::new(
            BrokerSubstituter::new(client.clone()).with_metrics(Arc::clone(metrics)),
        ),
        // One subscription for the node: every pod's substituter shares its grants.
        grants: cfg.broker.reuse_grants.then(|| {
            paddock_proxy::broker::GrantCache::start_with_gauge(
                client.clone(),
                metrics.grants_held(),
            )
        }),
        broker: Some(client),
        vetter,
        mitm,
        upstream_tls,
        dial,
        audit,
        metrics: Arc::clone(metrics),
        origdst: Arc::new(SockoptOriginalDst),
        http_limits,
        limits,
        dns: cfg.dns.settings(),
        plain_http_ports: cfg.pods.plain_http_ports.clone(),
        deny_page: true,
        egress_recheck: Some(Duration::from_millis(cfg.broker.egress_recheck_ms)),
    })
}

/// Runs the node agent until SIGTERM or SIGINT (or the pod watch ends).
#[expect(
    clippy::too_many_lines,
    reason = "one linear start-up sequence; its order (restore before the socket) is the point"
)]
pub async fn node(cfg: NodeConfig) -> Result<(), NodeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
    let node_name = cfg.node_name().map_err(ServeError::Config)?;
    let metrics = Arc::new(ProxyMetrics::new());
    let mut renewal = None;
    let parts = match cfg.tls.mode {
        TlsMode::Local => node_parts(&cfg, &metrics)?,
        TlsMode::Broker => {
            let (leaves, task) = broker_ca(&cfg, &node_name).await?;
            renewal = Some(task);
            node_parts_with(&cfg, &metrics, leaves)?
        }
    };
    let checked = Checked {
        broker: parts.broker.clone(),
        audit: Arc::clone(&parts.audit),
        leaves: Arc::clone(parts.mitm.leaves()),
    };

    let mut ic = Interceptor::load(&LoadOptions {
        pin_dir: cfg.ebpf.pin_dir.clone(),
        ..LoadOptions::default()
    })?;
    ic.attach_proxy(&Cgroup::current().map_err(ServeError::Cgroup)?)?;
    let state = StateDir::open(&cfg.state_dir)?;
    let agent = Arc::new(NodeAgent::new(
        parts,
        ic,
        Arc::new(InPodNamespace),
        CgroupLayout {
            root: cfg.pods.cgroup_root.clone(),
            driver: cfg.pods.cgroup_driver.driver(),
        },
        Some(state),
    ));
    let report = agent.restore().await?;
    let unserved = agent
        .release_unserved(&paddock_proxy::ebpf::attached_agents(&cfg.ebpf.pin_dir))
        .await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut watch = None;
    let directory = if let Some(k) = &cfg.kubernetes {
        let client = kube_client(k).await?;
        let dir = pods::PodDirectory::with_cni_wait(Duration::from_secs(k.cni_wait_secs));
        watch = Some(tokio::spawn(pods::watch_pods(
            kube::Api::all(client),
            node_name.clone(),
            pods::PodSettings {
                run_label: k.run_label.clone(),
                cluster_dns: k.cluster_dns.clone(),
            },
            Arc::clone(&dir),
            Arc::clone(&agent),
            stopped(stop_rx.clone()),
        )));
        Some(dir)
    } else {
        tracing::warn!(
            "no [kubernetes] table: pods are added only through `node-pods add` (CNI ADD is \
             refused)"
        );
        None
    };
    tracing::info!(
        restored = report.restored.len(),
        released = report.released.len(),
        unrecorded = unserved.len(),
        "pods from the previous node agent"
    );

    let socket_path = cfg.control_socket();
    let listener = control::bind(&socket_path).map_err(|source| NodeError::Socket {
        path: socket_path.clone(),
        source,
    })?;
    tasks.spawn(control::serve(
        listener,
        Arc::clone(&agent),
        directory,
        stopped(stop_rx.clone()),
    ));
    if cfg.pods.tunnel && checked.broker.is_some() {
        // The sandbox launcher of shells is this very binary.
        let service = Arc::new(tunnel::TunnelService::new(
            Arc::clone(&agent),
            std::path::PathBuf::from("/proc/self/exe"),
            cfg.pods.shells,
        ));
        if cfg.pods.tunnel_brokers.is_empty() {
            tasks.spawn(tunnel::maintain(
                node_bound_client(&cfg)?,
                service,
                stop_rx.clone(),
            ));
        } else {
            tasks.spawn(tunnel::maintain_each(
                node_bound_config(&cfg),
                cfg.pods.tunnel_brokers.clone(),
                service,
                stop_rx.clone(),
            ));
        }
    }
    let ready = Readiness::new();
    if let Some(admin) = &cfg.admin {
        add_checks(&ready, &cfg, admin, &agent, &checked);
        let listener = tokio::net::TcpListener::bind(admin.listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: admin.listen,
                source,
            })?;
        let server = AdminServer::new(Arc::clone(&metrics), ready.clone());
        tasks.spawn(server.serve(listener, stopped(stop_rx.clone())));
    }
    ready.set_ready(true);
    tracing::info!(node = %node_name, socket = %socket_path.display(), "node agent ready");
    // A pod watch that ends would leave the CNI step answering from a frozen view: stop, so
    // the DaemonSet restarts the node agent (pods stay intercepted meanwhile).
    let watch_ended = async {
        match watch.as_mut() {
            Some(w) => {
                let _ = w.await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    let mut failed = None;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping; pods stay intercepted"),
        _ = int.recv() => tracing::info!("SIGINT: stopping; pods stay intercepted"),
        () = watch_ended => {
            tracing::error!("the pod watch ended; stopping (pods stay intercepted)");
            failed = Some(NodeError::Kube("the pod watch ended".to_owned()));
        }
    }
    ready.set_ready(false);
    let _ = stop_tx.send(true);
    agent.shutdown().await;
    tasks.abort_all();
    if let Some(w) = watch {
        w.abort();
    }
    if let Some(r) = renewal {
        r.abort();
    }
    let _ = std::fs::remove_file(&socket_path);
    failed.map_or(Ok(()), Err)
}

/// What the readiness checks watch, taken from the parts before the agent owns them.
struct Checked {
    broker: Option<paddock_proxy::broker::BrokerClient>,
    audit: Arc<dyn paddock_proxy::audit::AuditSink>,
    leaves: Arc<paddock_proxy::tls::LeafCache>,
}

/// The dependencies `/readyz` checks besides the listeners: the broker, every served pod's
/// eBPF links (and the shared maps), the audit sink and the CA's validity.
fn add_checks<I: Interception + Sync + 'static>(
    ready: &Readiness,
    cfg: &NodeConfig,
    admin: &crate::serve::config::AdminConfig,
    agent: &Arc<NodeAgent<I>>,
    checked: &Checked,
) {
    use paddock_proxy::health::{AuditCheck, BrokerCheck, CaCheck, EbpfCheck};
    if let Some(client) = &checked.broker {
        ready.add_check(Arc::new(BrokerCheck(client.clone())));
    }
    let agent = Arc::clone(agent);
    ready.add_check(Arc::new(EbpfCheck {
        pin_dir: cfg.ebpf.pin_dir.clone(),
        expected: Arc::new(move || {
            let agent = Arc::clone(&agent);
            Box::pin(async move { agent.list().await.iter().map(|p| p.cgroup_id).collect() })
        }),
    }));
    ready.add_check(Arc::new(AuditCheck(Arc::clone(&checked.audit))));
    let leaves = Arc::clone(&checked.leaves);
    ready.add_check(Arc::new(CaCheck {
        not_after: Arc::new(move || leaves.ca_not_after()),
        min_valid: admin.ca_min_valid(),
    }));
}

/// The broker client that presents this node's own token: `tls.node_ca_bearer_file` when
/// set, else `[broker] bearer_file` (the node CA and the node tunnel are granted per node).
fn node_bound_client(cfg: &NodeConfig) -> Result<BrokerClient, NodeError> {
    Ok(BrokerClient::new(&node_bound_config(cfg)).map_err(ServeError::from)?)
}

fn node_bound_config(cfg: &NodeConfig) -> paddock_proxy::broker::BrokerClientConfig {
    let mut client_cfg = cfg.broker.client_config();
    if let Some(bearer) = &cfg.tls.node_ca_bearer_file {
        client_cfg.bearer_file = Some(bearer.clone());
    }
    client_cfg
}

/// Start attempts for the first node CA before the node agent gives up (the `DaemonSet` then
/// restarts it; its pods stay intercepted and refused meanwhile).
const NODE_CA_ATTEMPTS: u32 = 5;

/// `tls.mode = "broker"`: this node's intermediate CA from the broker, and the task that
/// renews it for as long as the node agent runs.
async fn broker_ca(
    cfg: &NodeConfig,
    node_name: &str,
) -> Result<(Arc<LeafCache>, tokio::task::JoinHandle<()>), NodeError> {
    let source: Arc<dyn NodeCaSource> = Arc::new(node_bound_client(cfg)?);
    let mut delay = Duration::from_secs(1);
    let mut attempt = 1;
    let issued = loop {
        match node_ca::obtain(source.as_ref(), node_name).await {
            Ok(issued) => break issued,
            Err(e) if attempt < NODE_CA_ATTEMPTS => {
                tracing::warn!(error = %e, attempt, retry_in = ?delay, "no node CA yet");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(e) => return Err(NodeError::NodeCa(e.to_string())),
        }
    };
    tracing::info!(
        node = node_name,
        subject = issued.ca.subject(),
        not_after = %issued.ca.not_after(),
        "node CA issued by the broker; the key stays in memory"
    );
    let (received, not_after) = (issued.received, issued.not_after());
    let leaves = Arc::new(cfg.tls.leaf_cache_with(issued.ca).map_err(ServeError::Ca)?);
    let task = tokio::spawn(node_ca::keep_renewed(
        Arc::clone(&leaves),
        source,
        node_name.to_owned(),
        received,
        not_after,
        RenewalSettings {
            revocation_check: (cfg.tls.revocation_check_secs > 0)
                .then(|| Duration::from_secs(cfg.tls.revocation_check_secs)),
            ..RenewalSettings::default()
        },
    ));
    Ok((leaves, task))
}

/// The API client: the kubeconfig's, else the in-cluster service account's.
async fn kube_client(k: &config::KubernetesConfig) -> Result<kube::Client, NodeError> {
    let config = match &k.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| NodeError::Kube(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| NodeError::Kube(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::incluster()
            .map_err(|e| NodeError::Kube(format!("in-cluster configuration: {e}")))?,
    };
    kube::Client::try_from(config).map_err(|e| NodeError::Kube(e.to_string()))
}
