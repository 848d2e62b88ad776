//! A node agent without a kernel: a fake interception recording what the eBPF maps would
//! hold, listeners bound in the test's own namespace, and pod cgroups as plain directories
//! in kubelet's layout.
#![allow(dead_code, reason = "each test binary uses part of the fixture")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use paddock_app::node::agent::{CgroupLayout, NodeAgent, NodeParts, PodListeners};
use paddock_app::node::pod::PodSpec;
use paddock_app::node::state::StateDir;
use paddock_proxy::cgroup::Cgroup;
use paddock_proxy::ebpf::{AgentConfig, EbpfError, Interception};
use paddock_proxy::http::{HttpLimits, NoopSubstituter};
use paddock_proxy::metrics::ProxyMetrics;
use paddock_proxy::net::{CidrPolicy, DialSettings, DnsResolver, ResolverSettings, Vetter};
use paddock_proxy::netns::NetnsError;
use paddock_proxy::origdst::StaticOriginalDst;
use paddock_proxy::pod_cgroup::{CgroupDriver, PodUid, QosClass, pod_cgroup_relpath};
use paddock_proxy::policy::StaticPolicy;
use paddock_proxy::proxy::PipelineLimits;
use paddock_proxy::tls::{LeafCache, LeafCacheConfig, MitmServer, RunCa, UpstreamTls};

/// What the eBPF maps would hold: config by cgroup id, and links per cgroup id.
#[derive(Debug, Default)]
pub struct Maps {
    pub config: HashMap<u64, AgentConfig>,
    pub links: HashMap<u64, usize>,
    pub proxy_attached: bool,
    /// Fail the next attach (to see the agent undo what it did).
    pub fail_next_attach: bool,
    /// Fail every attach before changing anything (a kernel that refuses them all).
    pub refuse_attaches: bool,
}

#[derive(Debug, Clone, Default)]
pub struct FakeInterception(pub Arc<Mutex<Maps>>);

impl Interception for FakeInterception {
    fn attach_agent(&mut self, cgroup: &Cgroup, cfg: &AgentConfig) -> Result<(), EbpfError> {
        let mut m = self.0.lock().expect("maps");
        if m.refuse_attaches {
            return Err(EbpfError::MissingProgram("paddock_connect4"));
        }
        if std::mem::take(&mut m.fail_next_attach) {
            // As the real loader can: config written and some links pinned, then a failure.
            m.config.insert(cgroup.id(), cfg.clone());
            m.links.insert(cgroup.id(), 4);
            return Err(EbpfError::MissingProgram("paddock_connect4"));
        }
        m.config.insert(cgroup.id(), cfg.clone());
        m.links.insert(cgroup.id(), 13);
        Ok(())
    }

    fn detach_agent_id(&mut self, cgroup_id: u64) -> Result<(), EbpfError> {
        let mut m = self.0.lock().expect("maps");
        m.config.remove(&cgroup_id);
        m.links.remove(&cgroup_id);
        Ok(())
    }

    fn attach_proxy(&mut self, _cgroup: &Cgroup) -> Result<(), EbpfError> {
        self.0.lock().expect("maps").proxy_attached = true;
        Ok(())
    }
}

/// Binds in the test's own namespace; the "netns" path must exist (as a pod's would).
#[derive(Debug, Default)]
pub struct HereListeners;

impl PodListeners for HereListeners {
    fn bind(
        &self,
        netns: &Path,
        preferred: u16,
    ) -> Result<paddock_proxy::netns::PodSockets, NetnsError> {
        if !netns.exists() {
            return Err(NetnsError::Open {
                path: netns.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        paddock_proxy::netns::bind_pod_listeners(preferred)
    }
}

/// A scratch node: cgroup root, state directory, fake netns files.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub maps: FakeInterception,
    /// Original destinations of the pods' connections, by the client's address.
    pub origdst: Arc<StaticOriginalDst>,
    pub agent: Arc<NodeAgent<FakeInterception>>,
}

pub fn parts(dir: &Path, origdst: Arc<StaticOriginalDst>) -> NodeParts {
    let metrics = Arc::new(ProxyMetrics::new());
    let ca = RunCa::load_or_generate(&dir.join("ca"), "node-test", Duration::from_hours(24))
        .expect("ca");
    let leaves = Arc::new(LeafCache::new(ca, LeafCacheConfig::default()).expect("leaves"));
    let upstream_tls = Arc::new(UpstreamTls::new(None).expect("upstream tls"));
    let resolver = Arc::new(
        DnsResolver::new(ResolverSettings {
            nameservers: vec!["127.0.0.1:9".parse().expect("addr")],
            ..ResolverSettings::default()
        })
        .expect("resolver"),
    );
    let vetter = Vetter::new(resolver, Arc::new(CidrPolicy::with_defaults()));
    let limits = PipelineLimits {
        max_connections: 16,
        handshake_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        max_client_hello_bytes: 16 * 1024,
        max_header_bytes: 64 * 1024,
    };
    NodeParts {
        policy: Arc::new(
            StaticPolicy::from_toml_str("[[rule]]\nhosts = [\"app.test\"]\nports = [443]\n")
                .expect("policy"),
        ),
        substituter: Arc::new(NoopSubstituter),
        broker: None,
        grants: None,
        dial: DialSettings::default(),
        vetter,
        mitm: Arc::new(MitmServer::new(leaves).expect("mitm")),
        upstream_tls,
        audit: "none"
            .parse::<paddock_proxy::audit::AuditTarget>()
            .expect("target")
            .open()
            .expect("audit"),
        metrics,
        origdst,
        http_limits: HttpLimits::default(),
        limits,
        plain_http_ports: vec![80],
        deny_page: true,
        egress_recheck: None,
        dns: paddock_proxy::dns::DnsSettings::default(),
    }
}

impl Node {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let maps = FakeInterception::default();
        let origdst = Arc::new(StaticOriginalDst::default());
        let agent = Arc::new(Self::agent_in(dir.path(), &maps, &origdst));
        Self {
            dir,
            maps,
            origdst,
            agent,
        }
    }

    /// A second agent on the same node state (a restart).
    pub fn agent_in(
        dir: &Path,
        maps: &FakeInterception,
        origdst: &Arc<StaticOriginalDst>,
    ) -> NodeAgent<FakeInterception> {
        NodeAgent::new(
            parts(dir, Arc::clone(origdst)),
            maps.clone(),
            Arc::new(HereListeners),
            CgroupLayout {
                root: dir.join("cgroup"),
                driver: None,
            },
            Some(StateDir::open(&dir.join("state")).expect("state")),
        )
    }

    /// Creates pod `n`'s cgroup (systemd layout for even `n`, cgroupfs for odd) with a
    /// container scope below, and its "netns" file; returns its spec.
    pub fn pod(&self, n: u32, run: &str) -> PodSpec {
        let uid = PodUid::parse(&format!("00000000-0000-4000-8000-{n:012x}")).expect("uid");
        let (driver, qos) = if n.is_multiple_of(2) {
            (CgroupDriver::Systemd, QosClass::Burstable)
        } else {
            (CgroupDriver::Cgroupfs, QosClass::Guaranteed)
        };
        let cg = self
            .dir
            .path()
            .join("cgroup")
            .join(pod_cgroup_relpath(driver, qos, &uid));
        std::fs::create_dir_all(cg.join("cri-containerd-0.scope")).expect("cgroup");
        std::fs::write(cg.join("cgroup.procs"), "").expect("cgroup.procs");
        let netns = self.dir.path().join(format!("netns-{n}"));
        std::fs::write(&netns, "").expect("netns");
        PodSpec {
            uid,
            namespace: "team".into(),
            name: format!("agent-{n}"),
            run: run.into(),
            netns,
            nameservers: vec!["10.96.0.10".parse().expect("ip")],
            adapter_port: None,
            shell: false,
        }
    }

    pub fn cgroup_of(&self, spec: &PodSpec) -> PathBuf {
        paddock_proxy::pod_cgroup::find_pod_cgroup(&self.dir.path().join("cgroup"), &spec.uid, None)
            .expect("cgroup")
            .0
    }

    /// Removes the pod's cgroup and netns, as kubelet and the runtime do on deletion.
    pub fn delete_pod_files(&self, spec: &PodSpec) {
        let cg = self.cgroup_of(spec);
        std::fs::remove_dir_all(&cg).expect("rm cgroup");
        std::fs::remove_file(&spec.netns).expect("rm netns");
    }

    /// A connection to a pod's listener whose original destination is `app.test:443`'s
    /// address, so the pod's pipeline keeps it (waiting for a `ClientHello`).
    pub fn connect_pod(&self, port: u16) -> std::net::TcpStream {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        let local = sock.local_addr().expect("local").as_socket().expect("inet");
        self.origdst
            .insert(local, SocketAddr::from(([127, 0, 0, 1], 443)));
        sock.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
            .expect("connect");
        sock.into()
    }
}

/// Open descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("fds").count()
}

/// Resident set size in KiB.
pub fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("rss");
    pages * 4
}
