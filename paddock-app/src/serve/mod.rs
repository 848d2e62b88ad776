//! `paddock-proxy serve`: builds the pipeline from a [`ServeConfig`], binds the listeners, the
//! DNS server's sockets and the admin endpoint, then (only then) attaches the agent cgroups of
//! `[ebpf]`; reopens the audit file on SIGHUP and drains on SIGTERM or SIGINT. `run` calls
//! [`serve_until`] with its own policy, substituter and pre-bound sockets. Composition only:
//! every component it starts is the proxy library's.

pub mod config;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use self::config::{ConfigError, DnsConfig, ServeConfig};
use paddock_proxy::audit::{AuditEvent, AuditKind, AuditOutcome, AuditSink, audit_decision};
use paddock_proxy::broker::{BrokerClient, BrokerPolicy, BrokerSubstituter, GrantCache};
use paddock_proxy::cgroup::Cgroup;
use paddock_proxy::dns::{DnsParts, DnsServer};
use paddock_proxy::ebpf::{AgentConfig, Interception, Interceptor, LoadOptions};
use paddock_proxy::http::{NoopSubstituter, Substituter};
use paddock_proxy::metrics::{AdminServer, ProxyMetrics, Readiness};
use paddock_proxy::net::{
    CidrConfig, CidrPolicy, DialSettings, DnsResolver, ResolverSettings, Vetter,
};
use paddock_proxy::origdst::SockoptOriginalDst;
use paddock_proxy::policy::{EgressPolicy, Mode, PolicyFile};
use paddock_proxy::proxy::{Connector, Drain, ListenerKind, Pipeline, PipelineParts, run_listener};
use paddock_proxy::tls::{LeafCache, MitmServer, UpstreamTls};

/// What `serve` is started with.
#[derive(Debug)]
pub struct ServeOptions {
    pub config: ServeConfig,
    /// `--audit` (wins over the file's `audit.target`).
    pub audit: Option<String>,
    /// Decide egress with this instead of the config's static policy file (the broker, in
    /// `run` mode).
    pub policy: Option<Arc<dyn EgressPolicy>>,
    /// Substitute placeholders with this (default: none).
    pub substituter: Option<Arc<dyn Substituter>>,
    /// Told once every listener is bound and interception is attached.
    pub ready: Option<tokio::sync::oneshot::Sender<()>>,
    /// Metrics shared with parts built outside (the broker substituter); default: new.
    pub metrics: Option<Arc<ProxyMetrics>>,
    /// Each notification reopens the audit file (`serve` wires it to `SIGHUP`, for logrotate).
    pub audit_reopen: Option<Arc<tokio::sync::Notify>>,
    /// UDP sockets, already bound, to serve the DNS server on instead of binding
    /// `[dns] listen`: `run` binds them inside the command's network namespace. The server's
    /// settings come from `[dns]` when present, else the defaults; agents are redirected to
    /// them only when `[dns] redirect_agents` is set (see [`paddock_proxy::dns`]).
    pub dns_sockets: Vec<std::net::UdpSocket>,
    /// Transparent listeners bound by the caller, served instead of binding
    /// `listen.transparent` (which then only tells the eBPF programs where they are). `run`
    /// binds them inside the command's network namespace
    /// ([`paddock_proxy::netns::OwnedNetns::bind_run_sockets`]); they must be non-blocking.
    pub transparent_listeners: Vec<std::net::TcpListener>,
    /// Shown every audit record as it is written (`run`'s denial lines and summary).
    pub audit_observer: Option<Arc<dyn paddock_proxy::audit::AuditObserver>>,
}

impl ServeOptions {
    /// Options for a config file and an optional `--audit` override.
    #[must_use]
    pub fn new(config: ServeConfig, audit: Option<String>) -> Self {
        Self {
            config,
            audit,
            policy: None,
            substituter: None,
            ready: None,
            metrics: None,
            audit_reopen: None,
            dns_sockets: Vec::new(),
            transparent_listeners: Vec::new(),
            audit_observer: None,
        }
    }
}

/// Why the proxy did not start (or stopped abnormally).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("run CA: {0}")]
    Ca(#[source] paddock_proxy::tls::TlsError),
    /// The cause is in the message, not chained as a source: `{:#}` would print it twice.
    #[error("egress policy {}: {error}", path.display())]
    Policy {
        path: PathBuf,
        error: paddock_proxy::policy::PolicyConfigError,
    },
    #[error("broker client: {0}")]
    Broker(#[from] paddock_proxy::broker::BrokerConfigError),
    #[error("denied CIDRs: {0}")]
    Cidr(#[from] paddock_proxy::net::CidrConfigError),
    #[error("resolver: {0}")]
    Resolver(#[from] paddock_proxy::net::ResolverInitError),
    #[error("audit: {0}")]
    Audit(#[from] paddock_proxy::audit::AuditError),
    #[error("cannot record the CONNECT listener's reason in the audit trail; not starting it")]
    ConnectReasonUnaudited,
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("eBPF: {0}")]
    Ebpf(#[from] paddock_proxy::ebpf::EbpfError),
    #[error("cgroup: {0}")]
    Cgroup(#[from] paddock_proxy::cgroup::CgroupError),
    #[error("eBPF agent config: {0}")]
    AgentConfig(#[from] paddock_proxy::ebpf::ConfigError),
    #[error("{0}")]
    Dns(#[from] paddock_proxy::dns::DnsSettingsError),
    #[error("cannot serve DNS on a socket: {0}")]
    DnsSocket(std::io::Error),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
}

/// Runs the proxy until SIGTERM or SIGINT, then drains; SIGHUP reopens the audit file.
pub async fn serve(mut opts: ServeOptions) -> Result<(), ServeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
    // Installed before anything is served: SIGHUP's default action would kill the proxy.
    let mut hup = signal(SignalKind::hangup()).map_err(ServeError::Signal)?;
    let reopen = Arc::clone(
        opts.audit_reopen
            .get_or_insert_with(|| Arc::new(tokio::sync::Notify::new())),
    );
    let forward_hup = tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reopening the audit file");
            reopen.notify_one();
        }
    });
    let served = serve_until(opts, async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
    })
    .await;
    forward_hup.abort();
    served
}

/// Runs the proxy until `stop` completes, then drains (bounded by the drain timeout).
#[expect(
    clippy::too_many_lines,
    reason = "one linear sequence of pipeline steps; splitting it hides the order"
)]
pub async fn serve_until(
    mut opts: ServeOptions,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let policy_override = opts.policy.take();
    let prebound = std::mem::take(&mut opts.transparent_listeners);
    let substituter = opts.substituter.take();
    let ready_tx = opts.ready.take();
    let dns_sockets = std::mem::take(&mut opts.dns_sockets);
    let cfg = &opts.config;
    let metrics = opts
        .metrics
        .take()
        .unwrap_or_else(|| Arc::new(ProxyMetrics::new()));

    let audit_target = cfg.audit_target(opts.audit.as_deref())?;
    let mut audit = audit_target.open()?;
    if let Some(observer) = opts.audit_observer.take() {
        audit = Arc::new(paddock_proxy::audit::ObservedSink::new(audit, observer));
    }
    metrics.set_audit_disabled(audit.is_disabled());
    if audit.is_disabled() {
        tracing::warn!("running without an audit trail (--audit none)");
    }

    let leaves = Arc::new(cfg.tls.leaf_cache(&cfg.run_id).map_err(ServeError::Ca)?);
    let mitm = Arc::new(MitmServer::new(Arc::clone(&leaves)).map_err(ServeError::Ca)?);
    let upstream_tls =
        Arc::new(UpstreamTls::new(cfg.tls.upstream_ca_bundle.as_deref()).map_err(ServeError::Ca)?);
    let (policy, substituter, egress_recheck, policy_file) =
        egress_policy(cfg, policy_override, substituter, &metrics)?;
    let cidr = Arc::new(CidrPolicy::from_config(&CidrConfig {
        deny: cfg.network.deny_cidrs.clone(),
        allow: cfg.network.allow_cidrs.clone(),
    })?);
    let resolver = Arc::new(DnsResolver::new(ResolverSettings {
        nameservers: cfg.network.nameservers.clone(),
        use_hosts_file: cfg.network.use_hosts_file,
        ..ResolverSettings::default()
    })?);
    // The DNS server answers from the same resolver and CIDR set the connections are vetted
    // against, so the agent is told what the proxy will accept.
    let dns = dns_server(
        cfg,
        dns_sockets,
        DnsParts {
            run: cfg.run_id.clone(),
            settings: cfg
                .dns
                .as_ref()
                .map(DnsConfig::settings)
                .unwrap_or_default(),
            policy: Arc::clone(&policy),
            resolver: Arc::clone(&resolver),
            cidr: Arc::clone(&cidr),
            audit: Arc::clone(&audit),
            metrics: Arc::clone(&metrics),
        },
    )?;
    let vetter = Vetter::new(resolver, cidr);
    let mut dial = DialSettings {
        mark: cfg.network.bypass_mark,
        ..DialSettings::default()
    };
    if let Some(secs) = cfg.network.dial_attempt_timeout_secs {
        dial.attempt_timeout = Duration::from_secs(secs.max(1));
    }
    let limits = cfg.limits.pipeline_limits();
    let http_limits = cfg.limits.http_limits();
    let connector = Arc::new(Connector::new(
        vetter.clone(),
        Arc::clone(&upstream_tls),
        dial,
        limits.idle_timeout,
        Arc::clone(&metrics),
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let pipeline = Arc::new(Pipeline::new(
        PipelineParts {
            run: cfg.run_id.clone(),
            policy,
            vetter,
            mitm,
            upstream_tls,
            connector,
            substituter,
            audit: Arc::clone(&audit),
            metrics: Arc::clone(&metrics),
            origdst: Arc::new(SockoptOriginalDst),
            http_limits,
            limits,
            plain_http_ports: cfg.listen.plain_http_ports.clone(),
            deny_page: cfg.policy.deny_page,
            egress_recheck: Some(egress_recheck),
        },
        stop_rx.clone(),
    ));

    // Bind everything before attaching interception, so agents never hit a closed port.
    let mut tasks = tokio::task::JoinSet::new();
    let transparent = if prebound.is_empty() {
        let mut bound = Vec::new();
        for addr in &cfg.listen.transparent {
            bound.push(bind(*addr).await?);
        }
        bound
    } else {
        prebound
            .into_iter()
            .map(|l| {
                let addr = l.local_addr().map_err(|source| ServeError::Bind {
                    addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
                    source,
                })?;
                TcpListener::from_std(l).map_err(|source| ServeError::Bind { addr, source })
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    for listener in transparent {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "transparent listener");
        }
        tasks.spawn(run_listener(
            Arc::clone(&pipeline),
            listener,
            ListenerKind::Transparent,
        ));
    }
    if let Some(addr) = cfg.listen.connect {
        let reason = cfg.listen.connect_reason.clone().unwrap_or_default();
        let ev = AuditEvent::new(
            AuditKind::ConnectReason,
            cfg.run_id.clone(),
            Mode::Connect,
            addr.port(),
        )
        .with_reason(reason.clone());
        if audit_decision(audit.as_ref(), &metrics, &ev) == AuditOutcome::DropConnection {
            return Err(ServeError::ConnectReasonUnaudited);
        }
        let listener = bind(addr).await?;
        tracing::warn!(%addr, reason = %reason, "cooperative CONNECT listener enabled");
        tasks.spawn(run_listener(
            Arc::clone(&pipeline),
            listener,
            ListenerKind::Connect,
        ));
    }
    let mut dns_served = Vec::new();
    if let Some((server, sockets)) = dns {
        for socket in sockets {
            dns_served.push(socket.local_addr().map_err(ServeError::DnsSocket)?);
            let server = Arc::clone(&server);
            let stop = stop_rx.clone();
            tasks.spawn(async move {
                if let Err(e) = server.serve_udp(socket, stop).await {
                    tracing::error!(error = %e, "DNS server socket failed");
                }
            });
        }
    }
    let ready = Readiness::new();
    if let Some(admin) = &cfg.admin {
        add_checks(&ready, cfg, admin, &audit, &leaves)?;
        let listener = bind(admin.listen).await?;
        tracing::info!(addr = %admin.listen, "admin listener");
        let server = AdminServer::new(Arc::clone(&metrics), ready.clone());
        let mut rx = stop_rx.clone();
        tasks.spawn(async move {
            server
                .serve(listener, async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await;
        });
    }
    tasks.spawn(sync_leaf_metrics(
        leaves,
        Arc::clone(&metrics),
        stop_rx.clone(),
    ));
    if let Some(file) = policy_file {
        tasks.spawn(file.watch(POLICY_FILE_POLL));
    }
    if let Some(reopen) = opts.audit_reopen.take() {
        tasks.spawn(reopen_audit_on(reopen, Arc::clone(&audit)));
    }

    let _interceptor = match &cfg.ebpf {
        Some(e) => Some(attach(cfg, e, &dns_served)?),
        None => None,
    };

    ready.set_ready(true);
    tracing::info!(run = %cfg.run_id, "proxy ready");
    if let Some(tx) = ready_tx {
        let _ = tx.send(());
    }
    stop.await;
    ready.set_ready(false);
    let _ = stop_tx.send(true);
    let left = Drain::wait(&pipeline, cfg.limits.drain_timeout()).await;
    if left > 0 {
        tracing::warn!(open = left, "drain timeout: closing remaining connections");
    } else {
        tracing::info!("drained");
    }
    tasks.abort_all();
    Ok(())
}

/// The dependencies `/readyz` checks besides the listeners: the broker (when it decides),
/// the eBPF pins (when `serve` attached agents itself), the audit sink and the CA's validity.
fn add_checks(
    ready: &Readiness,
    cfg: &ServeConfig,
    admin: &config::AdminConfig,
    audit: &Arc<dyn AuditSink>,
    leaves: &Arc<LeafCache>,
) -> Result<(), ServeError> {
    use paddock_proxy::health::{AuditCheck, BrokerCheck, CaCheck, EbpfCheck};
    if let Some(b) = &cfg.broker {
        ready.add_check(Arc::new(BrokerCheck(BrokerClient::new(
            &b.client_config(),
        )?)));
    }
    if let Some(e) = &cfg.ebpf {
        let ids = e
            .agent_cgroups
            .iter()
            .map(|p| Cgroup::open(p.clone()).map(|c| c.id()))
            .collect::<Result<Vec<_>, _>>()?;
        ready.add_check(Arc::new(EbpfCheck {
            pin_dir: e.pin_dir.clone(),
            expected: Arc::new(move || {
                let ids = ids.clone();
                Box::pin(async move { ids })
            }),
        }));
    }
    ready.add_check(Arc::new(AuditCheck(Arc::clone(audit))));
    let leaves = Arc::clone(leaves);
    ready.add_check(Arc::new(CaCheck {
        not_after: Arc::new(move || leaves.ca_not_after()),
        min_valid: admin.ca_min_valid(),
    }));
    Ok(())
}

/// Reopens the audit sink on every notification. A failed reopen keeps the open file (records
/// still land, in the rotated file) and says so; the next notification tries again.
async fn reopen_audit_on(reopen: Arc<tokio::sync::Notify>, audit: Arc<dyn AuditSink>) {
    loop {
        reopen.notified().await;
        match audit.reopen() {
            Ok(()) => tracing::info!("audit file reopened"),
            Err(e) => {
                tracing::error!(error = %e, "cannot reopen the audit file; still writing the old one");
            }
        }
    }
}

/// What decides egress, what substitutes credentials, how often open connections re-check
/// egress, and the policy file to watch for changes (static policy only).
type EgressParts = (
    Arc<dyn EgressPolicy>,
    Arc<dyn Substituter>,
    Duration,
    Option<Arc<PolicyFile>>,
);

/// How often the static policy file is looked at for changes.
const POLICY_FILE_POLL: Duration = Duration::from_secs(1);

/// The egress policy and substituter: the caller's (in `run` mode), else the broker named by
/// `[broker]` (both its answers), else the static list of `policy.file` (no substitution,
/// reloaded when the file changes).
fn egress_policy(
    cfg: &ServeConfig,
    policy: Option<Arc<dyn EgressPolicy>>,
    substituter: Option<Arc<dyn Substituter>>,
    metrics: &Arc<ProxyMetrics>,
) -> Result<EgressParts, ServeError> {
    // The broker's client and how often open connections re-check egress with it.
    let broker = match (&policy, &cfg.broker) {
        (None, Some(b)) => {
            let client = BrokerClient::new(&b.client_config())?;
            tracing::info!(url = %b.url, timeout_ms = b.timeout_ms, "egress policy and substitution by the broker");
            Some((client, Duration::from_millis(b.egress_recheck_ms)))
        }
        _ => None,
    };
    let recheck = broker.as_ref().map_or(
        paddock_proxy::policy::DEFAULT_EGRESS_RECHECK,
        |(_, every)| *every,
    );
    // One invalidation stream for reused substitutions and pushed egress re-checks.
    let grants = broker
        .as_ref()
        .filter(|_| cfg.broker.as_ref().is_some_and(|b| b.reuse_grants))
        .map(|(c, _)| GrantCache::start_with_gauge(c.clone(), metrics.grants_held()));
    let mut watched = None;
    let policy: Arc<dyn EgressPolicy> = match (policy, &broker, &cfg.policy.file) {
        (Some(p), _, _) => p,
        (None, Some((c, _)), _) => Arc::new(match &grants {
            Some(grants) => BrokerPolicy::new(c.clone()).with_generation(grants.clone()),
            None => BrokerPolicy::new(c.clone()),
        }),
        (None, None, Some(file)) => {
            let file = Arc::new(PolicyFile::open(file).map_err(|error| ServeError::Policy {
                path: file.clone(),
                error,
            })?);
            watched = Some(Arc::clone(&file));
            file
        }
        (None, None, None) => {
            return Err(ServeError::Config(ConfigError::Invalid(
                "no egress policy: set policy.file or the [broker] table".to_owned(),
            )));
        }
    };
    let substituter: Arc<dyn Substituter> = match (substituter, broker) {
        (Some(s), _) => s,
        (None, Some((c, _))) => {
            let substituter = BrokerSubstituter::new(c).with_metrics(Arc::clone(metrics));
            Arc::new(match grants {
                Some(grants) => substituter.with_grants(grants),
                None => substituter,
            })
        }
        (None, None) => Arc::new(NoopSubstituter),
    };
    Ok((policy, substituter, recheck, watched))
}

/// The DNS server and the sockets it serves.
type DnsServing = (Arc<DnsServer>, Vec<std::net::UdpSocket>);

/// The DNS server and the sockets to serve it on: the caller's, else `[dns] listen` bound
/// here; `None` when there are neither.
fn dns_server(
    cfg: &ServeConfig,
    handed: Vec<std::net::UdpSocket>,
    parts: DnsParts,
) -> Result<Option<DnsServing>, ServeError> {
    let sockets = if handed.is_empty() {
        let listen = cfg.dns.as_ref().map_or(&[][..], |d| d.listen.as_slice());
        listen
            .iter()
            .map(|addr| {
                paddock_proxy::dns::bind_udp(*addr).map_err(|source| ServeError::Bind {
                    addr: *addr,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        handed
    };
    if sockets.is_empty() {
        if cfg.dns.is_some() {
            return Err(ServeError::Config(ConfigError::Invalid(
                "[dns] has no listen address and no sockets were handed in".to_owned(),
            )));
        }
        return Ok(None);
    }
    Ok(Some((Arc::new(DnsServer::new(parts)?), sockets)))
}

async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// The interception settings of the agent cgroups: TCP to the first transparent listener of
/// each family, UDP only to the `[ebpf] dns` resolvers, and that DNS redirected to the DNS
/// server (served on `dns_served`) when `[dns] redirect_agents` says so. `None` without a
/// transparent listener.
pub fn agent_config(
    cfg: &ServeConfig,
    e: &config::EbpfConfig,
    dns_served: &[std::net::SocketAddr],
) -> Result<Option<AgentConfig>, ServeError> {
    let v4 = cfg.listen.transparent.iter().find(|a| a.is_ipv4());
    let v6 = cfg.listen.transparent.iter().find(|a| a.is_ipv6());
    let Some(first) = v4.or(v6) else {
        return Ok(None);
    };
    // A bypass around a resolver lets agents reach it over TCP unredirected: DNS over TCP
    // past the policy (a tunnel). The proxy's own DNS sockets (`run`'s, on loopback, which
    // `run` bypasses) are no resolver of that kind.
    for resolver in e.dns.iter().filter(|r| !dns_served.contains(r)) {
        // The programs key IPv4 addresses as IPv4-mapped IPv6, so an IPv6 range can cover one.
        let mapped = match resolver.ip() {
            std::net::IpAddr::V4(v4) => std::net::IpAddr::V6(v4.to_ipv6_mapped()),
            v6 @ std::net::IpAddr::V6(_) => v6,
        };
        if let Some(net) = e
            .bypass
            .iter()
            .find(|n| n.contains(&resolver.ip()) || n.contains(&mapped))
        {
            return Err(ServeError::Config(ConfigError::Invalid(format!(
                "[ebpf] bypass {net} covers the DNS resolver {resolver}: agents would reach it \
                 over TCP unredirected (DNS past the policy); narrow the bypass"
            ))));
        }
    }
    let redirect = cfg.dns.as_ref().is_some_and(|d| d.redirect_agents);
    let dns_redirect_port = if redirect {
        let port = config::redirect_port(&cfg.listen.transparent, &e.dns, dns_served)?;
        if port.is_none() && !e.dns.is_empty() {
            return Err(ServeError::Config(ConfigError::Invalid(
                "[dns] redirect_agents is set but the DNS server serves no socket".to_owned(),
            )));
        }
        port
    } else {
        // Resolvers that are this proxy's own DNS server (`run`: the sockets in the command's
        // namespace) need no redirect; any other one carries whatever it is asked onwards.
        if e.dns.iter().any(|r| !dns_served.contains(r)) {
            if !e.dns_unfiltered {
                return Err(ServeError::Config(ConfigError::Invalid(format!(
                    "[ebpf] dns {:?}: agents would send DNS straight to these resolvers, which \
                     carry any name onwards (a DNS tunnel past the policy); add [dns] (with \
                     redirect_agents, the default) to answer only names the policy allows, or \
                     set [ebpf] dns_unfiltered = true to accept that",
                    e.dns
                ))));
            }
            tracing::warn!(
                resolvers = ?e.dns,
                "agents send DNS straight to these resolvers, which carry any name onwards \
                 (a DNS tunnel): add [dns] to answer only names the policy allows"
            );
        }
        None
    };
    let agent = AgentConfig {
        proxy_v4: match v4 {
            Some(std::net::SocketAddr::V4(a)) => *a.ip(),
            _ => std::net::Ipv4Addr::LOCALHOST,
        },
        proxy_v6: match v6 {
            Some(std::net::SocketAddr::V6(a)) => Some(*a.ip()),
            _ => None,
        },
        proxy_port: first.port(),
        dns: e.dns.clone(),
        dns_redirect_port,
        bypass: e.bypass.clone(),
        bypass_mark: cfg.network.bypass_mark,
        block_udp: true,
        debug_log: false,
        inbound_ports: e.inbound_ports.clone(),
    };
    agent.validate()?;
    Ok(Some(agent))
}

/// Attaches the configured agent cgroups towards the first transparent listener, and this
/// process's cgroup for `SO_ORIGINAL_DST` answers. The returned loader keeps the latter alive.
fn attach(
    cfg: &ServeConfig,
    e: &config::EbpfConfig,
    dns_served: &[std::net::SocketAddr],
) -> Result<Interceptor, ServeError> {
    // Checked before anything is loaded: a DNS set-up that cannot work must not leave the
    // agents half configured.
    let agent = agent_config(cfg, e, dns_served)?;
    let mut ic = Interceptor::load(&LoadOptions {
        pin_dir: e.pin_dir.clone(),
        ..LoadOptions::default()
    })?;
    if let Some(agent) = agent {
        for path in &e.agent_cgroups {
            let cgroup = Cgroup::open(PathBuf::from(path))?;
            ic.attach_agent(&cgroup, &agent)?;
            tracing::info!(cgroup = %path.display(), "intercepting agent cgroup");
        }
    }
    ic.attach_proxy(&Cgroup::current()?)?;
    Ok(ic)
}

/// Copies the leaf cache's counters into the Prometheus counters once a second.
async fn sync_leaf_metrics(
    leaves: Arc<LeafCache>,
    metrics: Arc<ProxyMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    let counters = metrics.leaf_cache();
    let (mut hits, mut misses, mut forges) = (0u64, 0u64, 0u64);
    loop {
        let stats = leaves.stats();
        let (h, m, f) = (stats.hits(), stats.misses(), stats.forges());
        counters.hits.inc_by(h.saturating_sub(hits));
        counters.misses.inc_by(m.saturating_sub(misses));
        counters.forges.inc_by(f.saturating_sub(forges));
        (hits, misses, forges) = (h, m, f);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};

    use super::*;
    use paddock_proxy::net::test_dns::TestDns;

    fn config(dir: &std::path::Path, nameserver: SocketAddr, extra: &str) -> ServeConfig {
        std::fs::write(
            dir.join("policy.toml"),
            "[[rule]]\nhosts = [\"app.test\"]\nports = [443]\n",
        )
        .expect("policy");
        ServeConfig::from_toml_str(&format!(
            r#"
run_id = "run-serve-dns"
[listen]
transparent = ["127.0.0.1:0"]
[tls]
ca_dir = "{d}/ca"
generate_ca = true
[policy]
file = "{d}/policy.toml"
[network]
nameservers = ["{nameserver}"]
allow_cidrs = ["192.0.2.0/24"]
[audit]
target = "{d}/audit.jsonl"
[limits]
drain_timeout_secs = 1
{extra}
"#,
            d = dir.display()
        ))
        .expect("config")
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        m.to_vec().expect("encode")
    }

    #[tokio::test]
    async fn serve_answers_dns_on_handed_sockets_with_the_configured_settings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let upstream = TestDns::start(Duration::ZERO).await;
        upstream.addrs("app.test", &["192.0.2.10"], 3600);
        let cfg = config(dir.path(), upstream.addr, "[dns]\nmax_ttl_secs = 9\n");
        let socket =
            paddock_proxy::dns::bind_udp("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let dns_addr = socket.local_addr().expect("addr");
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut opts = ServeOptions::new(cfg, None);
        opts.ready = Some(ready_tx);
        opts.dns_sockets = vec![socket];
        let served = tokio::spawn(serve_until(opts, async move {
            let _ = stop_rx.await;
        }));
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("ready in time")
            .expect("ready");
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("client");
        let mut buf = [0u8; 1500];
        let mut ask = async |id: u16, name: &str| {
            client
                .send_to(&query(id, name), dns_addr)
                .await
                .expect("send");
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                .await
                .expect("answered")
                .expect("recv");
            Message::from_vec(&buf[..n]).expect("parses")
        };
        let allowed = ask(1, "app.test").await;
        assert_eq!(allowed.metadata.response_code, ResponseCode::NoError);
        assert!(matches!(allowed.answers[0].data, RData::A(_)));
        assert_eq!(allowed.answers[0].ttl, 9, "[dns] max_ttl_secs applies");
        let denied = ask(2, "c0ffee.exfil.test").await;
        assert_eq!(denied.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(upstream.count("c0ffee.exfil.test", RecordType::A), 0);
        let _ = stop_tx.send(());
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("stops")
            .expect("join")
            .expect("served");
        let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).expect("audit");
        let line = audit
            .lines()
            .find(|l| l.contains("\"dns_deny\""))
            .expect("dns_deny recorded");
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        assert_eq!(v["sni"], "c0ffee.exfil.test");
        assert_eq!(v["run"], "run-serve-dns");
        assert_eq!(v["mode"], "dns");
    }

    #[tokio::test]
    async fn dns_listen_is_bound_and_a_dns_table_without_sockets_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let upstream = TestDns::start(Duration::ZERO).await;
        let parts = |cfg: &ServeConfig| DnsParts {
            run: cfg.run_id.clone(),
            settings: paddock_proxy::dns::DnsSettings::default(),
            policy: Arc::new(
                paddock_proxy::policy::StaticPolicy::from_toml_str("").expect("policy"),
            ),
            resolver: Arc::new(DnsResolver::new(ResolverSettings::default()).expect("resolver")),
            cidr: Arc::new(CidrPolicy::with_defaults()),
            audit: Arc::new(paddock_proxy::audit::NoAudit::explicitly_disabled()),
            metrics: Arc::new(ProxyMetrics::new()),
        };
        let cfg = config(
            dir.path(),
            upstream.addr,
            "[dns]\nlisten = [\"127.0.0.1:0\", \"[::1]:0\"]\nredirect_agents = false\n",
        );
        let (_, sockets) = dns_server(&cfg, Vec::new(), parts(&cfg))
            .expect("binds")
            .expect("a server");
        assert_eq!(sockets.len(), 2);
        let none = config(dir.path(), upstream.addr, "");
        assert!(
            dns_server(&none, Vec::new(), parts(&none))
                .expect("fine")
                .is_none()
        );
        let empty = config(dir.path(), upstream.addr, "[dns]\n");
        assert!(dns_server(&empty, Vec::new(), parts(&empty)).is_err());
    }

    /// A config with an agent cgroup whose DNS goes to `resolver` (plus `ebpf_extra` in
    /// `[ebpf]`), a DNS server on `127.0.0.1:15053` and a transparent listener; the served
    /// DNS sockets.
    fn with_resolver(
        dir: &std::path::Path,
        resolver: &str,
        ebpf_extra: &str,
    ) -> (ServeConfig, config::EbpfConfig, Vec<SocketAddr>) {
        let ns: SocketAddr = "127.0.0.1:53".parse().expect("addr");
        let mut cfg = config(
            dir,
            ns,
            &format!(
                "[ebpf]\nagent_cgroups = [\"/sys/fs/cgroup/a\"]\ndns = [\"{resolver}\"]\n{ebpf_extra}\
                 [dns]\nlisten = [\"127.0.0.1:15053\"]\n"
            ),
        );
        cfg.listen.transparent = vec!["127.0.0.1:15001".parse().expect("addr")];
        let e = cfg.ebpf.clone().expect("ebpf");
        (cfg, e, vec!["127.0.0.1:15053".parse().expect("addr")])
    }

    #[test]
    fn agent_cgroups_dns_is_redirected_to_the_dns_server_when_configured() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut cfg, e, served) = with_resolver(dir.path(), "10.0.0.53:53", "");
        let agent = agent_config(&cfg, &e, &served)
            .expect("valid")
            .expect("agent");
        assert_eq!(agent.dns_redirect_port, Some(15053));
        assert_eq!(
            agent.dns,
            vec!["10.0.0.53:53".parse::<SocketAddr>().expect("addr")]
        );
        // The server is not where the programs would send the DNS: refused, not half set up.
        let elsewhere: Vec<SocketAddr> = vec!["127.0.0.2:15053".parse().expect("addr")];
        assert!(agent_config(&cfg, &e, &elsewhere).is_err());
        assert!(
            agent_config(&cfg, &e, &[]).is_err(),
            "redirect without a server"
        );
        // Not redirected: DNS straight to the resolver, a tunnel past the policy; refused
        // unless said explicitly.
        cfg.dns = Some(super::config::DnsConfig {
            redirect_agents: false,
            ..Default::default()
        });
        let err = agent_config(&cfg, &e, &served).expect_err("fails closed");
        assert!(err.to_string().contains("dns_unfiltered"), "{err}");
        let mut unfiltered = e.clone();
        unfiltered.dns_unfiltered = true;
        let agent = agent_config(&cfg, &unfiltered, &served)
            .expect("valid")
            .expect("agent");
        assert_eq!(agent.dns_redirect_port, None);
        cfg.dns = None;
        assert!(agent_config(&cfg, &e, &[]).is_err(), "no [dns]: refused");
        let agent = agent_config(&cfg, &unfiltered, &[])
            .expect("valid")
            .expect("agent");
        assert_eq!(agent.dns_redirect_port, None);
    }

    #[test]
    fn a_bypass_around_the_resolver_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cfg, e, served) =
            with_resolver(dir.path(), "10.96.0.10:53", "bypass = [\"10.96.0.0/12\"]\n");
        let err = agent_config(&cfg, &e, &served).expect_err("refused");
        assert!(err.to_string().contains("covers the DNS resolver"), "{err}");
        // Also through the IPv4-mapped IPv6 space the programs key IPv4 addresses in.
        for net in ["::ffff:0:0/96", "::/0"] {
            let mut v6 = e.clone();
            v6.bypass = vec![net.parse().expect("net")];
            let err = agent_config(&cfg, &v6, &served).expect_err(net);
            assert!(
                err.to_string().contains("covers the DNS resolver"),
                "{net}: {err}"
            );
        }
        // A narrower bypass beside the resolver is fine, and the proxy's own DNS sockets
        // (`run`: loopback, which `run` bypasses) are not a resolver of that kind.
        let mut narrow = e.clone();
        narrow.bypass = vec!["10.96.1.0/24".parse().expect("net")];
        agent_config(&cfg, &narrow, &served).expect("valid");
        let mut own = e;
        own.dns = vec!["127.0.0.1:15053".parse().expect("addr")];
        own.bypass = vec!["127.0.0.0/8".parse().expect("net")];
        agent_config(&cfg, &own, &served).expect("valid");
    }
}
