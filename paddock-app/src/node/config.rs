//! The `paddock-proxy node` configuration file (TOML).
//!
//! ```toml
//! node_name = "worker-1"              # default: $NODE_NAME (the downward API)
//! state_dir = "/run/paddock/node"     # pod records (survive a restart), control socket
//!
//! [pods]
//! cgroup_root = "/sys/fs/cgroup"      # kubelet's cgroup v2 root
//! cgroup_driver = "auto"              # "systemd", "cgroupfs" or "auto" (try both)
//! # control_socket = "/run/paddock/node/pods.sock"   # default: state_dir/pods.sock
//! plain_http_ports = [80]             # original ports served as plain HTTP
//!
//! [ebpf]
//! pin_dir = "/sys/fs/bpf/paddock/node"
//!
//! [tls]                               # one CA for every pod of this node
//! ca_dir = "/var/run/paddock/ca"
//! generate_ca = false
//!
//! [broker]                            # required: each pod's run is decided and
//! url = "https://paddock-broker.paddock-system.svc:8443"   # substituted by the broker
//! ca_file = "/etc/paddock/broker/ca.crt"
//! bearer_file = "/var/run/secrets/paddock/token"
//!
//! [network]                           # as `serve` (upstream dials, resolver, denied CIDRs)
//! [dns]                               # each pod's DNS server (its nameserver traffic is
//! rate_per_second = 50                # redirected there): as `serve`'s `[dns]`, per pod,
//! max_name_len = 253                  # without `listen` and `redirect_agents`
//! [audit]                             # as `serve`: one trail, each record names its run
//! target = "/var/log/paddock/audit.jsonl"
//! [limits]                            # per pod (each pod is its own pipeline)
//! max_connections = 1024
//! [admin]
//! listen = "127.0.0.1:9901"
//!
//! [kubernetes]                        # the pod source the CNI step asks (see `node::pods`)
//! # kubeconfig = "/etc/paddock/kubeconfig"   # default: the in-cluster service account
//! run_label = "paddock.dev/run"       # pods with this label are agent pods; its value: the run
//! cluster_dns = ["10.96.0.10"]        # kubelet's clusterDNS: ClusterFirst pods' resolver
//! cni_wait_secs = 10                  # a CNI ADD for a pod not seen yet waits this long
//! ```
//!
//! Unknown keys are errors, as in `serve`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::serve::config::{
    AdminConfig, AuditConfig, BrokerConfig, ConfigError, DnsConfig, LimitsConfig, NetworkConfig,
    TlsConfig,
};
use paddock_proxy::pod_cgroup::CgroupDriver;

/// The whole node configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name; default `$NODE_NAME`.
    pub node_name: Option<String>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub pods: PodsConfig,
    #[serde(default)]
    pub ebpf: NodeEbpfConfig,
    pub tls: TlsConfig,
    pub broker: BrokerConfig,
    #[serde(default)]
    pub network: NetworkConfig,
    /// Each pod's DNS server: `serve`'s `[dns]` limits, per pod. A pod's DNS to its
    /// nameservers is always redirected to it (`redirect_agents` cannot be turned off: a
    /// nameserver reached directly carries any name onwards) and it listens on the pod's own
    /// port (no `listen`).
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    pub admin: Option<AdminConfig>,
    pub kubernetes: Option<KubernetesConfig>,
}

/// The API server the pod directory watches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// A kubeconfig file; default: the in-cluster configuration (service account).
    pub kubeconfig: Option<PathBuf>,
    #[serde(default = "default_run_label")]
    pub run_label: String,
    /// Kubelet's `clusterDNS`: where `ClusterFirst` pods' DNS may go.
    #[serde(default)]
    pub cluster_dns: Vec<std::net::IpAddr>,
    /// How long a CNI ADD waits for a pod the watch has not brought yet, then fails.
    #[serde(default = "default_cni_wait")]
    pub cni_wait_secs: u64,
}

fn default_cni_wait() -> u64 {
    super::pods::DEFAULT_CNI_WAIT.as_secs()
}

fn default_run_label() -> String {
    super::pods::DEFAULT_RUN_LABEL.to_owned()
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/run/paddock/node")
}

/// Which cgroup driver kubelet uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverSetting {
    /// Try both layouts (exactly one directory must exist per pod).
    #[default]
    Auto,
    Systemd,
    Cgroupfs,
}

impl DriverSetting {
    #[must_use]
    pub fn driver(self) -> Option<CgroupDriver> {
        match self {
            DriverSetting::Auto => None,
            DriverSetting::Systemd => Some(CgroupDriver::Systemd),
            DriverSetting::Cgroupfs => Some(CgroupDriver::Cgroupfs),
        }
    }
}

/// Where pods are found and how they are served.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodsConfig {
    #[serde(default = "default_cgroup_root")]
    pub cgroup_root: PathBuf,
    #[serde(default)]
    pub cgroup_driver: DriverSetting,
    /// The pod source's unix socket (the CNI plugin and `paddock-proxy node-pods`).
    pub control_socket: Option<PathBuf>,
    #[serde(default = "default_plain_ports")]
    pub plain_http_ports: Vec<u16>,
    /// Keep an outbound tunnel to the broker through which interactive runs' adapters and
    /// shells reach this node's pods (needs a token bound to this node). Default on.
    #[serde(default = "default_true")]
    pub tunnel: bool,
    /// With broker replicas: `HOST:PORT` names resolving to *every* replica (a headless
    /// Service, `paddock-broker-headless.paddock-system.svc:8443`); the node agent keeps a
    /// tunnel to each address, re-resolved every 30 s, so whichever replica a person reaches
    /// holds this node's tunnel. Empty: one tunnel through `[broker] url`.
    #[serde(default)]
    pub tunnel_brokers: Vec<String>,
    /// Open shells in pods for the broker's `/shell` route (off by default: a shell needs
    /// capabilities the node agent otherwise does without; see deploy/README.md).
    #[serde(default)]
    pub shells: bool,
}

impl Default for PodsConfig {
    fn default() -> Self {
        Self {
            cgroup_root: default_cgroup_root(),
            cgroup_driver: DriverSetting::Auto,
            control_socket: None,
            plain_http_ports: default_plain_ports(),
            tunnel: true,
            tunnel_brokers: Vec::new(),
            shells: false,
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_cgroup_root() -> PathBuf {
    PathBuf::from("/sys/fs/cgroup")
}

fn default_plain_ports() -> Vec<u16> {
    vec![80]
}

/// The node's eBPF pin directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEbpfConfig {
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
}

impl Default for NodeEbpfConfig {
    fn default() -> Self {
        Self {
            pin_dir: default_pin_dir(),
        }
    }
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/paddock/node")
}

impl NodeConfig {
    /// Reads and validates a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// Parses and validates configuration text.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let cfg: NodeConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |s: &str| Err(ConfigError::Invalid(s.to_owned()));
        if !self.state_dir.is_absolute() {
            return invalid("state_dir must be an absolute path");
        }
        if !self.pods.cgroup_root.is_absolute() {
            return invalid("pods.cgroup_root must be an absolute path");
        }
        if self
            .pods
            .control_socket
            .as_ref()
            .is_some_and(|p| !p.is_absolute())
        {
            return invalid("pods.control_socket must be an absolute path");
        }
        self.limits.validate()?;
        if !self.dns.listen.is_empty() {
            return invalid(
                "dns.listen is not used by the node agent: each pod's DNS server listens on the pod's own port",
            );
        }
        if !self.dns.redirect_agents {
            return invalid(
                "dns.redirect_agents cannot be turned off in node mode: a pod's nameservers would carry any name onwards",
            );
        }
        self.dns
            .settings()
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("dns: {e}")))?;
        self.tls.validate()?;
        self.broker.validate()?;
        if self.network.bypass_mark.is_some() {
            return invalid(
                "network.bypass_mark is not used by the node agent: its dials come from its own \
                 cgroup, which is never intercepted",
            );
        }
        if let Some(k) = &self.kubernetes {
            if k.cni_wait_secs > 60 {
                return invalid("kubernetes.cni_wait_secs must be at most 60");
            }
            if k.run_label.trim().is_empty() {
                return invalid("kubernetes.run_label must not be empty");
            }
            let v4 = k.cluster_dns.iter().filter(|a| a.is_ipv4()).count();
            if v4 > 1 || k.cluster_dns.len() - v4 > 1 {
                return invalid("kubernetes.cluster_dns: at most one address per family");
            }
        }
        if let Some(t) = &self.audit.target {
            t.parse::<paddock_proxy::audit::AuditTarget>()
                .map_err(|e| ConfigError::Invalid(format!("audit.target: {e}")))?;
        } else {
            return invalid(
                "no audit sink: set audit.target (stdout, a file path, or `none` to run without \
                 an audit trail)",
            );
        }
        Ok(())
    }

    /// The node's name: the file's, else `$NODE_NAME`.
    pub fn node_name(&self) -> Result<String, ConfigError> {
        self.node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok())
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| {
                ConfigError::Invalid(
                    "no node name: set node_name or NODE_NAME (spec.nodeName through the \
                     downward API)"
                        .to_owned(),
                )
            })
    }

    /// The control socket's path.
    #[must_use]
    pub fn control_socket(&self) -> PathBuf {
        self.pods
            .control_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("pods.sock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
node_name = "n1"
[tls]
ca_dir = "/ca"
[broker]
url = "https://broker:8443"
ca_file = "/ca.crt"
bearer_file = "/token"
[audit]
target = "stdout"
"#;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = NodeConfig::from_toml_str(MINIMAL).expect("valid");
        assert_eq!(c.state_dir, Path::new("/run/paddock/node"));
        assert_eq!(c.pods.cgroup_root, Path::new("/sys/fs/cgroup"));
        assert_eq!(c.pods.cgroup_driver.driver(), None);
        assert_eq!(c.control_socket(), Path::new("/run/paddock/node/pods.sock"));
        assert_eq!(c.ebpf.pin_dir, Path::new("/sys/fs/bpf/paddock/node"));
        assert_eq!(c.pods.plain_http_ports, [80]);
        assert_eq!(c.node_name().expect("name"), "n1");
    }

    #[test]
    fn pod_dns_settings_follow_the_dns_section() {
        let c = NodeConfig::from_toml_str(MINIMAL).expect("valid");
        assert_eq!(
            c.dns.settings(),
            paddock_proxy::dns::DnsSettings::default(),
            "serve's defaults"
        );
        let c = NodeConfig::from_toml_str(&format!(
            "{MINIMAL}[dns]\nrate_per_second = 5\nmax_name_len = 100\n"
        ))
        .expect("valid");
        let s = c.dns.settings();
        assert_eq!((s.rate_per_second, s.max_name_len), (5, 100));
        for (extra, needle) in [
            ("[dns]\nrate_per_second = 0\n", "dns:"),
            ("[dns]\nmax_name_len = 300\n", "dns:"),
            // Always redirected, always on the pod's port: these are serve's only.
            ("[dns]\nredirect_agents = false\n", "redirect_agents"),
            ("[dns]\nlisten = [\"127.0.0.1:53\"]\n", "listen"),
        ] {
            let err = NodeConfig::from_toml_str(&format!("{MINIMAL}{extra}")).expect_err(extra);
            assert!(err.to_string().contains(needle), "{extra}: {err}");
        }
    }

    #[test]
    fn tls_mode_broker_keeps_no_ca_on_disk() {
        let broker = MINIMAL.replace("ca_dir = \"/ca\"", "mode = \"broker\"");
        let c = NodeConfig::from_toml_str(&broker).expect("valid");
        assert_eq!(c.tls.mode, crate::serve::config::TlsMode::Broker);
        let with_bearer = MINIMAL.replace(
            "ca_dir = \"/ca\"",
            "mode = \"broker\"\nnode_ca_bearer_file = \"/node-ca.token\"",
        );
        NodeConfig::from_toml_str(&with_bearer).expect("valid");
        for (text, needle) in [
            (
                MINIMAL.replace("ca_dir = \"/ca\"", "mode = \"broker\"\nca_dir = \"/ca\""),
                "no CA on disk",
            ),
            (
                MINIMAL.replace("ca_dir = \"/ca\"", "mode = \"broker\"\ngenerate_ca = true"),
                "no CA on disk",
            ),
            (
                MINIMAL.replace("ca_dir = \"/ca\"", ""),
                "tls.ca_dir is required",
            ),
            (
                MINIMAL.replace(
                    "ca_dir = \"/ca\"",
                    "ca_dir = \"/ca\"\nnode_ca_bearer_file = \"/t\"",
                ),
                "needs tls.mode",
            ),
            (
                MINIMAL.replace("ca_dir = \"/ca\"", "mode = \"cluster\""),
                "mode",
            ),
        ] {
            let err = NodeConfig::from_toml_str(&text).expect_err(needle);
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (MINIMAL.replace("[audit]\ntarget = \"stdout\"", ""), "audit"),
            (
                MINIMAL.replace("bearer_file = \"/token\"", ""),
                "bearer_file",
            ),
            (
                format!("{MINIMAL}\n[pods]\ncgroup_driver = \"cgroupsv1\"\n"),
                "cgroup_driver",
            ),
            (
                format!("{MINIMAL}\n[pods]\ncgroup_root = \"sys\"\n"),
                "cgroup_root",
            ),
            (format!("{MINIMAL}\n[pods]\nsurprise = 1\n"), "surprise"),
            (
                MINIMAL.replace("node_name = \"n1\"", "state_dir = \"run\""),
                "state_dir",
            ),
            (
                format!("{MINIMAL}\n[network]\nbypass_mark = 7\n"),
                "bypass_mark",
            ),
            (
                format!("{MINIMAL}\n[limits]\nmax_connections = 0\n"),
                "max_connections",
            ),
        ];
        for (text, needle) in cases {
            let err = NodeConfig::from_toml_str(&text).expect_err(needle);
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
        let systemd = format!("{MINIMAL}\n[pods]\ncgroup_driver = \"systemd\"\n");
        assert_eq!(
            NodeConfig::from_toml_str(&systemd)
                .expect("valid")
                .pods
                .cgroup_driver
                .driver(),
            Some(CgroupDriver::Systemd)
        );
    }
}
