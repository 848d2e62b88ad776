//! The `paddock-proxy serve` configuration file (TOML).
//!
//! ```toml
//! run_id = "run-42"
//!
//! [listen]
//! transparent = ["127.0.0.1:15001", "[::1]:15001"]
//! plain_http_ports = [80]          # original ports served as plain HTTP (by Host header)
//! # connect = "127.0.0.1:3128"     # cooperative CONNECT listener (opt-in) ...
//! # connect_reason = "sandbox without eBPF"   # ... with the reason it exists (required)
//!
//! [tls]
//! ca_dir = "/var/run/paddock/ca"   # tls.crt + tls.key (cert-manager layout)
//! generate_ca = false              # true: generate into ca_dir when it is empty
//! leaf_cache_capacity = 1024
//! # upstream_ca_bundle = "/etc/paddock/extra-roots.pem"
//!
//! [policy]
//! file = "/etc/paddock/policy.toml"   # see `StaticPolicy`; or the [broker] table, not both
//!                                     # (read at start: an edit takes a restart, and a broken
//!                                     # file stops the start; the broker reloads its own)
//! deny_page = true                    # 403 page for denied TLS hosts (false: reset)
//!
//! # [broker]                        # egress policy and substitution by paddock-broker
//! # url = "https://paddock-broker.paddock-system.svc:8443"
//! # ca_file = "/etc/paddock/broker/ca.crt"      # the only CA trusted for the broker
//! # bearer_file = "/var/run/secrets/paddock/token"   # re-read when it changes; a transient
//! #                                            # read error keeps the last token until its JWT
//! #                                            # exp (opaque: 30 s); a deleted file fails at once
//! #                                            # (`paddock-proxy token-refresher` can write it)
//! # client_cert = "/etc/paddock/broker/tls.crt" # and client_key: mutual TLS instead/too
//! # client_key = "/etc/paddock/broker/tls.key"
//! # server_name = "paddock-broker"             # when the URL host is not in the certificate
//! # timeout_ms = 5000                          # per call; a late answer is a deny
//! # egress_recheck_ms = 250                    # open connections re-check egress this often
//! # reuse_grants = true                        # reuse granted substitutions (invalidation
//! #                                            # stream); false: one call per request
//!
//! [network]
//! deny_cidrs = []                  # added to the built-in denied set
//! allow_cidrs = []                 # carved out of it (test hosts, internal APIs)
//! nameservers = []                 # empty: the system resolv.conf
//! use_hosts_file = false           # consult /etc/hosts before DNS
//! bypass_mark = 0x70ad             # SO_MARK on upstream sockets (eBPF bypass); default none
//! # dial_attempt_timeout_secs = 5  # connect timeout per upstream address
//!
//! [audit]
//! target = "/var/log/paddock/audit.jsonl"   # or "stdout", or "none" (explicit opt-out)
//!
//! [limits]
//! max_connections = 4096
//! handshake_timeout_secs = 30
//! idle_timeout_secs = 60
//! max_header_bytes = 65536
//! max_headers = 100
//! drain_timeout_secs = 30
//! max_client_hello_bytes = 16384
//! park_after_ms = 250              # an idle HTTP/1.1 connection drops its HTTP server; 0: never
//!
//! [admin]
//! listen = "127.0.0.1:9901"
//! ca_min_valid_hours = 1            # /readyz fails when the CA has this little validity left
//!
//! # [ebpf]                          # optional: attach these agent cgroups at start
//! # pin_dir = "/sys/fs/bpf/paddock/default"
//! # agent_cgroups = ["/sys/fs/cgroup/agents/run-42"]
//! # dns = ["10.0.0.10:53"]          # the resolver(s) the agents' DNS is addressed to
//! # inbound_ports = [8080]         # TCP ports the agents may be reached on from outside
//! #                                # their namespace (at most 8); default none: every
//! #                                # listener of an agent cgroup is loopback-only
//! # bypass = ["10.96.0.0/12"]      # destinations agents reach directly, never redirected
//! # dns_unfiltered = false          # true: `dns` without [dns] is accepted (a DNS tunnel)
//!
//! # [dns]                           # the proxy's DNS server (see `paddock_proxy::dns`)
//! # listen = ["127.0.0.1:15053", "[::1]:15053"]   # UDP; one port, on the transparent
//! #                                 # listeners' addresses when agents are redirected
//! # redirect_agents = true          # with [ebpf] dns: the agents' DNS lands here instead
//! # max_name_len = 253              # longer names are refused (NXDOMAIN, audited)
//! # rate_per_second = 50            # queries per second for the run; more are REFUSED
//! # rate_burst = 100
//! # max_ttl_secs = 30               # longest TTL handed to agents
//! # policy_cache_ms = 250           # how long a name's policy answer is reused
//! ```
//!
//! Without `[dns]`, agents with `[ebpf] dns` resolvers send their DNS straight to those
//! resolvers, which carry any name (and so any data in it) onwards: a DNS tunnel. With it,
//! their DNS to those resolvers is redirected to this server (the reply still comes from the
//! resolver's address), which answers only names the policy could reach. Avoid port 5353: it
//! is mDNS's.
//!
//! Unknown keys are errors: a misspelt limit must not silently fall back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use paddock_proxy::audit::AuditTarget;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// The run (workload) every connection of this proxy belongs to.
    pub run_id: String,
    pub listen: ListenConfig,
    pub tls: TlsConfig,
    #[serde(default)]
    pub policy: PolicyFileConfig,
    /// Ask `paddock-broker` for egress decisions and substitutions (instead of `policy.file`).
    pub broker: Option<BrokerConfig>,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    pub admin: Option<AdminConfig>,
    pub ebpf: Option<EbpfConfig>,
    /// The proxy's DNS server for the agents.
    pub dns: Option<DnsConfig>,
}

/// The proxy's DNS server ([`paddock_proxy::dns`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// UDP addresses to serve. Ignored when the caller hands in bound sockets
    /// (`ServeOptions::dns_sockets`, as `run` does).
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    /// With `[ebpf] dns` resolvers: send the agent cgroups' DNS to this server (the eBPF
    /// programs rewrite the destination to the proxy address at the server's port and the
    /// reply's source back to the resolver). The server must then listen on one port, on the
    /// address of the first transparent listener of each resolver's family.
    #[serde(default = "yes")]
    pub redirect_agents: bool,
    /// Longest name answered, characters (1-253).
    #[serde(default = "default_max_name_len")]
    pub max_name_len: usize,
    /// Queries per second the run may send; more are answered REFUSED.
    #[serde(default = "default_dns_rate")]
    pub rate_per_second: u32,
    /// Queries the run may send at once above the rate.
    #[serde(default = "default_dns_burst")]
    pub rate_burst: u32,
    /// Longest TTL handed to agents, seconds.
    #[serde(default = "default_dns_ttl")]
    pub max_ttl_secs: u64,
    /// How long a name's policy answer is reused, milliseconds (0: ask every time).
    #[serde(default = "default_egress_recheck_ms")]
    pub policy_cache_ms: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            redirect_agents: true,
            max_name_len: default_max_name_len(),
            rate_per_second: default_dns_rate(),
            rate_burst: default_dns_burst(),
            max_ttl_secs: default_dns_ttl(),
            policy_cache_ms: default_egress_recheck_ms(),
        }
    }
}

fn default_max_name_len() -> usize {
    paddock_proxy::dns::DnsSettings::default().max_name_len
}
fn default_dns_rate() -> u32 {
    paddock_proxy::dns::DnsSettings::default().rate_per_second
}
fn default_dns_burst() -> u32 {
    paddock_proxy::dns::DnsSettings::default().rate_burst
}
fn default_dns_ttl() -> u64 {
    paddock_proxy::dns::DnsSettings::default().max_ttl.as_secs()
}

impl DnsConfig {
    /// The server settings these values make.
    #[must_use]
    pub fn settings(&self) -> paddock_proxy::dns::DnsSettings {
        paddock_proxy::dns::DnsSettings {
            max_name_len: self.max_name_len,
            rate_per_second: self.rate_per_second,
            rate_burst: self.rate_burst,
            max_ttl: Duration::from_secs(self.max_ttl_secs),
            policy_cache: Duration::from_millis(self.policy_cache_ms),
            ..paddock_proxy::dns::DnsSettings::default()
        }
    }
}

/// Data-plane listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Listeners the eBPF programs (or an iptables REDIRECT) send agent connections to.
    #[serde(default)]
    pub transparent: Vec<SocketAddr>,
    /// Original destination ports carrying plain HTTP (served by `Host` header); every other
    /// port must carry TLS.
    #[serde(default = "default_plain_ports")]
    pub plain_http_ports: Vec<u16>,
    /// Cooperative HTTP/1.1 `CONNECT` listener (opt-in).
    pub connect: Option<SocketAddr>,
    /// Why the `CONNECT` listener is enabled; logged and audited at start. Required with it.
    pub connect_reason: Option<String>,
}

fn default_plain_ports() -> Vec<u16> {
    vec![80]
}

/// Interception TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Where the forging CA comes from: `local` (`ca_dir`) or, for the node agent only,
    /// `broker` (a short-lived per-node intermediate from the broker, renewed in memory).
    #[serde(default)]
    pub mode: TlsMode,
    /// Directory holding `tls.crt` and `tls.key` of the run CA (`local` mode; required there,
    /// refused in `broker` mode, where no CA key is ever on disk).
    #[serde(default)]
    pub ca_dir: PathBuf,
    /// `broker` mode: the node-bound token presented to `POST /v1/node-ca` and to the node
    /// tunnel when it differs from `[broker] bearer_file` (which is the default).
    pub node_ca_bearer_file: Option<PathBuf>,
    /// Generate a CA into `ca_dir` when it holds none (local use).
    #[serde(default)]
    pub generate_ca: bool,
    #[serde(default = "default_leaf_capacity")]
    pub leaf_cache_capacity: usize,
    /// PEM bundle trusted for upstream servers in addition to the webpki roots.
    pub upstream_ca_bundle: Option<PathBuf>,
    /// `broker` mode: seconds between reads of the root's revocation list (a revoked
    /// intermediate is replaced, or withdrawn, within this); 0 turns the check off.
    #[serde(default = "default_revocation_check_secs")]
    pub revocation_check_secs: u64,
}

fn default_revocation_check_secs() -> u64 {
    paddock_proxy::tls::node_ca::DEFAULT_REVOCATION_CHECK.as_secs()
}

/// Where the interception CA comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// `ca_dir` (a mounted Secret, or generated with `generate_ca`).
    #[default]
    Local,
    /// A per-node intermediate CA issued by the broker for this node (node agent only).
    Broker,
}

/// Validity of a CA generated for local use (`generate_ca`).
const GENERATED_CA_VALIDITY: Duration = Duration::from_hours(30 * 24);

impl TlsConfig {
    /// The interception CA of `ca_dir` (generated there under `label` when `generate_ca` is
    /// set and it holds none) behind a leaf cache of `leaf_cache_capacity`.
    pub fn leaf_cache(
        &self,
        label: &str,
    ) -> Result<paddock_proxy::tls::LeafCache, paddock_proxy::tls::TlsError> {
        use paddock_proxy::tls::{LeafCache, LeafCacheConfig, RunCa};
        let ca = if self.generate_ca {
            RunCa::load_or_generate(&self.ca_dir, label, GENERATED_CA_VALIDITY)
        } else {
            RunCa::load_dir(&self.ca_dir)
        }?;
        LeafCache::new(
            ca,
            LeafCacheConfig {
                capacity: self.leaf_cache_capacity,
                ..LeafCacheConfig::default()
            },
        )
    }

    /// The checks `serve` and `node` share.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |s: &str| Err(ConfigError::Invalid(s.to_owned()));
        if self.leaf_cache_capacity == 0 {
            return invalid("tls.leaf_cache_capacity must be at least 1");
        }
        if self.revocation_check_secs > 3600 {
            return invalid("tls.revocation_check_secs must be 0 (off) .. 3600");
        }
        match self.mode {
            TlsMode::Local => {
                if self.ca_dir.as_os_str().is_empty() {
                    return invalid("tls.ca_dir is required (unless tls.mode = \"broker\")");
                }
                if self.node_ca_bearer_file.is_some() {
                    return invalid("tls.node_ca_bearer_file needs tls.mode = \"broker\"");
                }
            }
            TlsMode::Broker => {
                if !self.ca_dir.as_os_str().is_empty() || self.generate_ca {
                    return invalid(
                        "tls.mode = \"broker\" keeps no CA on disk: remove tls.ca_dir and \
                         tls.generate_ca",
                    );
                }
            }
        }
        Ok(())
    }

    /// A leaf cache around a CA obtained elsewhere (the broker's node intermediate).
    pub fn leaf_cache_with(
        &self,
        ca: paddock_proxy::tls::RunCa,
    ) -> Result<paddock_proxy::tls::LeafCache, paddock_proxy::tls::TlsError> {
        use paddock_proxy::tls::{LeafCache, LeafCacheConfig};
        LeafCache::new(
            ca,
            LeafCacheConfig {
                capacity: self.leaf_cache_capacity,
                ..LeafCacheConfig::default()
            },
        )
    }
}

fn default_leaf_capacity() -> usize {
    paddock_proxy::tls::DEFAULT_LEAF_CACHE_CAPACITY
}

/// Egress policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFileConfig {
    /// Static allow-list file (see [`paddock_proxy::policy::StaticPolicy`]); exactly one of this and
    /// the `[broker]` table.
    pub file: Option<PathBuf>,
    /// Answer denied TLS hosts with a 403 page (true) or a reset (false).
    #[serde(default = "yes")]
    pub deny_page: bool,
}

impl Default for PolicyFileConfig {
    fn default() -> Self {
        Self {
            file: None,
            deny_page: true,
        }
    }
}

/// How `serve` reaches the broker (see [`paddock_proxy::broker::BrokerClientConfig`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `https://host:port`.
    pub url: String,
    /// PEM CA bundle that signs the broker's certificate; nothing else is trusted.
    pub ca_file: PathBuf,
    /// Caller bearer (a projected service-account token, a static key), re-read on change.
    pub bearer_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for brokers that require mutual TLS; with `client_key`.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Name the broker certificate is checked against when the URL host is not in it.
    pub server_name: Option<String>,
    /// Deadline of one broker call (connect, handshake, answer), milliseconds.
    #[serde(default = "default_broker_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests on open connections re-check egress when the destination's last answer is
    /// older than this, milliseconds (0: every request), so policy changes reach them too.
    #[serde(default = "default_egress_recheck_ms")]
    pub egress_recheck_ms: u64,
    /// Reuse substitution answers the broker grants for reuse, kept current by its
    /// invalidation stream (`false`: one broker call per request that carries a placeholder).
    #[serde(default = "default_reuse_grants")]
    pub reuse_grants: bool,
}

fn default_reuse_grants() -> bool {
    true
}

fn default_egress_recheck_ms() -> u64 {
    u64::try_from(paddock_proxy::broker::DEFAULT_EGRESS_RECHECK.as_millis()).unwrap_or(250)
}

fn default_broker_timeout_ms() -> u64 {
    u64::try_from(paddock_proxy::broker::DEFAULT_TIMEOUT.as_millis()).unwrap_or(5000)
}

impl BrokerConfig {
    /// The checks `serve` and `node` share.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |s: &str| Err(ConfigError::Invalid(s.to_owned()));
        if self.client_cert.is_some() != self.client_key.is_some() {
            return invalid("broker.client_cert and broker.client_key go together");
        }
        if self.bearer_file.is_none() && self.client_cert.is_none() {
            return invalid(
                "broker: set bearer_file or client_cert/client_key (the broker authenticates \
                 every caller)",
            );
        }
        if self.timeout_ms == 0 {
            return invalid("broker.timeout_ms must be at least 1");
        }
        // Longer would quietly stop policy changes and a dead broker from reaching open
        // connections.
        if self.egress_recheck_ms > 60_000 {
            return invalid("broker.egress_recheck_ms must be at most 60000 (a minute)");
        }
        Ok(())
    }

    /// The client configuration; validation of the URL and files happens when the client is
    /// built (at start, so a bad setting stops `serve` before it listens).
    #[must_use]
    pub fn client_config(&self) -> paddock_proxy::broker::BrokerClientConfig {
        let mut c =
            paddock_proxy::broker::BrokerClientConfig::new(self.url.clone(), self.ca_file.clone());
        c.bearer_file.clone_from(&self.bearer_file);
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            c.client_cert = Some(paddock_proxy::broker::ClientCertFiles {
                cert_chain: cert.clone(),
                key: key.clone(),
            });
        }
        c.server_name.clone_from(&self.server_name);
        c.timeout = Duration::from_millis(self.timeout_ms);
        c
    }
}

fn yes() -> bool {
    true
}

/// Network defences and upstream dialling.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    #[serde(default)]
    pub deny_cidrs: Vec<String>,
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
    /// DNS servers the proxy asks; empty means the system configuration.
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    /// Consult `/etc/hosts` before DNS.
    #[serde(default)]
    pub use_hosts_file: bool,
    /// `SO_MARK` on upstream sockets so the eBPF programs never redirect them.
    pub bypass_mark: Option<u32>,
    /// Connect timeout per upstream address, seconds.
    pub dial_attempt_timeout_secs: Option<u64>,
}

/// Audit sink.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// `stdout`, `none` or an absolute path of a JSONL file. No default: see [`AuditTarget`].
    pub target: Option<String>,
}

/// Connection limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_handshake")]
    pub handshake_timeout_secs: u64,
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    #[serde(default = "default_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(default = "default_headers")]
    pub max_headers: usize,
    #[serde(default = "default_drain")]
    pub drain_timeout_secs: u64,
    /// Largest `ClientHello` accepted, bytes.
    #[serde(default = "default_hello")]
    pub max_client_hello_bytes: usize,
    /// An HTTP/1.1 agent connection quiet this long between requests drops its HTTP server
    /// (about 20 KiB) until its next request; 0 keeps it.
    #[serde(default = "default_park_after")]
    pub park_after_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            handshake_timeout_secs: default_handshake(),
            idle_timeout_secs: default_idle(),
            max_header_bytes: default_header_bytes(),
            max_headers: default_headers(),
            drain_timeout_secs: default_drain(),
            max_client_hello_bytes: default_hello(),
            park_after_ms: default_park_after(),
        }
    }
}

fn default_max_connections() -> usize {
    4096
}
fn default_handshake() -> u64 {
    30
}
fn default_idle() -> u64 {
    60
}
fn default_header_bytes() -> usize {
    64 * 1024
}
fn default_headers() -> usize {
    100
}
fn default_drain() -> u64 {
    30
}
fn default_hello() -> usize {
    16 * 1024
}
fn default_park_after() -> u64 {
    250
}

impl LimitsConfig {
    /// The checks `serve` and `node` share.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_connections must be at least 1".to_owned(),
            ));
        }
        if self.handshake_timeout_secs == 0 || self.idle_timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "limits: timeouts must be at least 1 second".to_owned(),
            ));
        }
        Ok(())
    }

    /// The pipeline's bounds (per proxy; per pod in `node`).
    #[must_use]
    pub fn pipeline_limits(&self) -> paddock_proxy::proxy::PipelineLimits {
        paddock_proxy::proxy::PipelineLimits {
            max_connections: self.max_connections,
            handshake_timeout: self.handshake_timeout(),
            idle_timeout: self.idle_timeout(),
            max_client_hello_bytes: self.max_client_hello_bytes,
            max_header_bytes: self.max_header_bytes,
        }
    }

    /// The request loop's bounds.
    #[must_use]
    pub fn http_limits(&self) -> paddock_proxy::http::HttpLimits {
        paddock_proxy::http::HttpLimits {
            max_header_bytes: self.max_header_bytes,
            max_headers: self.max_headers,
            header_read_timeout: self.handshake_timeout(),
            park_after: (self.park_after_ms > 0).then(|| Duration::from_millis(self.park_after_ms)),
            ..paddock_proxy::http::HttpLimits::default()
        }
    }

    #[must_use]
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
    #[must_use]
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    #[must_use]
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
}

/// Admin (metrics and health) listener, separate from the data plane.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// `/readyz` fails once the forging CA has this many hours of validity left or fewer.
    #[serde(default = "default_ca_min_valid_hours")]
    pub ca_min_valid_hours: u64,
}

fn default_ca_min_valid_hours() -> u64 {
    1
}

impl AdminConfig {
    /// [`Self::ca_min_valid_hours`] as a duration (capped at a year, so it cannot overflow).
    #[must_use]
    pub fn ca_min_valid(&self) -> Duration {
        Duration::from_hours(self.ca_min_valid_hours.min(24 * 366))
    }
}

/// Optional eBPF attachment done by `serve` itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EbpfConfig {
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Agent cgroup v2 directories to intercept towards the first transparent listener.
    #[serde(default)]
    pub agent_cgroups: Vec<PathBuf>,
    /// Resolvers the agents may send DNS to.
    #[serde(default)]
    pub dns: Vec<SocketAddr>,
    /// TCP ports the agents may accept connections on from outside their network namespace
    /// (see [`paddock_proxy::ebpf::AgentConfig::inbound_ports`]); none by default.
    #[serde(default)]
    pub inbound_ports: Vec<u16>,
    /// Destinations the agents reach directly, never redirected (`run`: the loopback of the
    /// command's own network namespace).
    #[serde(default)]
    pub bypass: Vec<ipnet::IpNet>,
    /// Let the agents' DNS reach the `dns` resolvers unfiltered (no `[dns]` redirect). The
    /// resolvers then carry any name onwards, a DNS tunnel past the policy, so it must be
    /// said: without it, `dns` resolvers and no redirect to `[dns]` refuse to start.
    #[serde(default)]
    pub dns_unfiltered: bool,
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(paddock_proxy::ebpf::DEFAULT_PIN_DIR)
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Syntax(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ServeConfig {
    /// The configuration `paddock-proxy run` starts: transparent listeners at `transparent`
    /// (`run` binds them itself inside the command's network namespace and passes them in
    /// `ServeOptions::transparent_listeners`; the addresses tell the eBPF programs where they
    /// are), a CA generated into `ca_dir`, and one agent cgroup attached with `dns` as its
    /// allowed resolvers and `bypass` as the destinations it reaches directly. `policy_file` is
    /// recorded for reference only: `run` supplies the broker as the egress policy.
    #[must_use]
    #[expect(
        clippy::too_many_arguments,
        reason = "every argument is a distinct piece of the run; a struct would only rename them"
    )]
    pub fn local_run(
        run_id: &str,
        transparent: &[SocketAddr],
        ca_dir: &Path,
        policy_file: &Path,
        cgroup: &Path,
        pin_dir: &Path,
        dns: &[SocketAddr],
        bypass: &[ipnet::IpNet],
    ) -> Self {
        Self {
            run_id: run_id.to_owned(),
            listen: ListenConfig {
                transparent: transparent.to_vec(),
                plain_http_ports: default_plain_ports(),
                connect: None,
                connect_reason: None,
            },
            tls: TlsConfig {
                mode: TlsMode::Local,
                node_ca_bearer_file: None,
                ca_dir: ca_dir.to_path_buf(),
                generate_ca: true,
                leaf_cache_capacity: default_leaf_capacity(),
                upstream_ca_bundle: None,
                revocation_check_secs: default_revocation_check_secs(),
            },
            policy: PolicyFileConfig {
                file: Some(policy_file.to_path_buf()),
                deny_page: true,
            },
            broker: None,
            network: NetworkConfig::default(),
            audit: AuditConfig::default(),
            limits: LimitsConfig::default(),
            admin: None,
            ebpf: Some(EbpfConfig {
                pin_dir: pin_dir.to_path_buf(),
                agent_cgroups: vec![cgroup.to_path_buf()],
                dns: dns.to_vec(),
                inbound_ports: Vec::new(),
                bypass: bypass.to_vec(),
                dns_unfiltered: false,
            }),
            dns: None,
        }
    }

    /// Set the network section's carve-outs, resolvers and bypass mark.
    #[must_use]
    pub fn with_network(
        mut self,
        allow_cidrs: &[String],
        nameservers: &[SocketAddr],
        use_hosts_file: bool,
        bypass_mark: Option<u32>,
    ) -> Self {
        self.network.allow_cidrs = allow_cidrs.to_vec();
        self.network.nameservers = nameservers.to_vec();
        self.network.use_hosts_file = use_hosts_file;
        self.network.bypass_mark = bypass_mark;
        self
    }

    /// Let the agent cgroups accept TCP connections from outside their namespace on these
    /// ports (`run --publish`); no-op without an `[ebpf]` section.
    #[must_use]
    pub fn with_inbound_ports(mut self, ports: &[u16]) -> Self {
        if let Some(e) = &mut self.ebpf {
            e.inbound_ports = ports.to_vec();
        }
        self
    }

    /// Trust these extra roots upstream.
    #[must_use]
    pub fn with_upstream_ca(mut self, bundle: Option<PathBuf>) -> Self {
        self.tls.upstream_ca_bundle = bundle;
        self
    }

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
        let cfg: ServeConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |s: &str| Err(ConfigError::Invalid(s.to_owned()));
        if self.run_id.trim().is_empty() {
            return invalid("run_id must not be empty");
        }
        if self.listen.transparent.is_empty() && self.listen.connect.is_none() {
            return invalid("no data-plane listener: set listen.transparent or listen.connect");
        }
        if self.listen.connect.is_some()
            && self
                .listen
                .connect_reason
                .as_deref()
                .is_none_or(|r| r.trim().is_empty())
        {
            return invalid("listen.connect needs listen.connect_reason (why cooperative mode)");
        }
        self.limits.validate()?;
        self.tls.validate()?;
        if self.tls.mode == TlsMode::Broker {
            return Err(ConfigError::Invalid(
                "tls.mode = \"broker\" is for the node agent (`paddock-proxy node`); `serve` \
                 forges with the CA in tls.ca_dir"
                    .to_owned(),
            ));
        }
        if let Some(ebpf) = &self.ebpf
            && !ebpf.agent_cgroups.is_empty()
            && self.listen.transparent.is_empty()
        {
            return invalid("ebpf.agent_cgroups needs a transparent listener");
        }
        if let Some(ebpf) = &self.ebpf {
            paddock_proxy::ebpf::config::validate_inbound_ports(&ebpf.inbound_ports)
                .map_err(|e| ConfigError::Invalid(format!("ebpf.{e}")))?;
        }
        match (&self.policy.file, &self.broker) {
            (None, None) => {
                return invalid(
                    "no egress policy: set policy.file (static list) or the [broker] table",
                );
            }
            (Some(_), Some(_)) => {
                return invalid("policy.file and [broker] both set: choose one egress policy");
            }
            _ => {}
        }
        if let Some(b) = &self.broker {
            b.validate()?;
        }
        if let Some(dns) = &self.dns {
            self.validate_dns(dns)?;
        }
        if let Some(t) = &self.audit.target {
            t.parse::<AuditTarget>()
                .map_err(|e| ConfigError::Invalid(format!("audit.target: {e}")))?;
        }
        Ok(())
    }

    fn validate_dns(&self, dns: &DnsConfig) -> Result<(), ConfigError> {
        dns.settings()
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if dns.policy_cache_ms > 60_000 {
            return Err(ConfigError::Invalid(
                "dns.policy_cache_ms must be at most 60000 (a minute)".to_owned(),
            ));
        }
        if dns.listen.windows(2).any(|w| w[0].port() != w[1].port()) {
            return Err(ConfigError::Invalid(
                "dns.listen: every address must use the same port".to_owned(),
            ));
        }
        if let Some(ebpf) = &self.ebpf
            && dns.redirect_agents
            && !dns.listen.is_empty()
        {
            redirect_port(&self.listen.transparent, &ebpf.dns, &dns.listen)?;
        }
        Ok(())
    }

    /// The audit target: `--audit` wins over the file; neither is an error (no default sink).
    pub fn audit_target(&self, flag: Option<&str>) -> Result<AuditTarget, ConfigError> {
        let Some(text) = flag.or(self.audit.target.as_deref()) else {
            return Err(ConfigError::Invalid(
                "no audit sink: set audit.target or --audit (stdout, a file path, or `none` to \
                 run without an audit trail)"
                    .to_owned(),
            ));
        };
        text.parse::<AuditTarget>()
            .map_err(|e| ConfigError::Invalid(format!("audit: {e}")))
    }
}

/// The port the agents' DNS is redirected to: `served` (the DNS server's addresses) must share
/// one port and hold, for each resolver family in `resolvers`, the address of the first
/// transparent listener of that family (where the eBPF programs send the datagrams). `None`
/// when there is nothing to redirect.
pub fn redirect_port(
    transparent: &[SocketAddr],
    resolvers: &[SocketAddr],
    served: &[SocketAddr],
) -> Result<Option<u16>, ConfigError> {
    let Some(first) = served.first() else {
        return Ok(None);
    };
    if resolvers.is_empty() {
        return Ok(None);
    }
    let port = first.port();
    if served.iter().any(|a| a.port() != port) {
        return Err(ConfigError::Invalid(format!(
            "dns: the DNS server's addresses {served:?} must share one port to receive the \
             agents' redirected DNS"
        )));
    }
    for resolver in resolvers {
        let proxy = transparent
            .iter()
            .find(|t| t.is_ipv4() == resolver.is_ipv4())
            .map(SocketAddr::ip);
        let Some(proxy) = proxy else {
            return Err(ConfigError::Invalid(format!(
                "dns: agents' DNS to {resolver} is redirected to the transparent listener's \
                 address of that family, and there is none"
            )));
        };
        let needed = SocketAddr::new(proxy, port);
        if !served.contains(&needed) {
            return Err(ConfigError::Invalid(format!(
                "dns: agents' DNS to {resolver} is redirected to {needed}; add it to dns.listen \
                 (the DNS server serves {served:?})"
            )));
        }
    }
    Ok(Some(port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
run_id = "r1"
[listen]
transparent = ["127.0.0.1:15001"]
[tls]
ca_dir = "/tmp/ca"
[policy]
file = "/tmp/policy.toml"
"#;

    #[test]
    fn minimal_config_gets_issue_defaults() {
        let cfg = ServeConfig::from_toml_str(MINIMAL).expect("parse");
        assert_eq!(cfg.limits.handshake_timeout(), Duration::from_secs(30));
        assert_eq!(cfg.limits.idle_timeout(), Duration::from_mins(1));
        assert_eq!(cfg.listen.plain_http_ports, vec![80]);
        assert_eq!(cfg.tls.leaf_cache_capacity, 1024);
        assert!(cfg.policy.deny_page);
        assert_eq!(
            cfg.limits.http_limits().park_after,
            Some(Duration::from_millis(250))
        );
        let never = ServeConfig::from_toml_str(
            &MINIMAL.replace("[policy]", "[limits]\npark_after_ms = 0\n[policy]"),
        )
        .expect("parse");
        assert_eq!(never.limits.http_limits().park_after, None);
    }

    #[test]
    fn no_audit_sink_is_refused_unless_explicitly_none() {
        let cfg = ServeConfig::from_toml_str(MINIMAL).expect("parse");
        assert!(cfg.audit_target(None).is_err());
        assert_eq!(
            cfg.audit_target(Some("none")).expect("none"),
            AuditTarget::None
        );
        assert_eq!(
            cfg.audit_target(Some("stdout")).expect("stdout"),
            AuditTarget::Stdout
        );
        assert!(cfg.audit_target(Some("relative/path")).is_err());
    }

    #[test]
    fn serve_forges_only_with_a_local_ca() {
        let broker_mode = MINIMAL.replace("ca_dir = \"/tmp/ca\"", "mode = \"broker\"");
        let err = ServeConfig::from_toml_str(&broker_mode).expect_err("node agent only");
        assert!(err.to_string().contains("node agent"), "{err}");
        let no_dir = MINIMAL.replace("ca_dir = \"/tmp/ca\"", "");
        let err = ServeConfig::from_toml_str(&no_dir).expect_err("ca_dir required");
        assert!(err.to_string().contains("tls.ca_dir is required"), "{err}");
    }

    #[test]
    fn connect_listener_requires_a_reason() {
        let text = MINIMAL.to_owned();
        let with_connect = text.replace("[listen]\n", "[listen]\nconnect = \"127.0.0.1:3128\"\n");
        let err = ServeConfig::from_toml_str(&with_connect).expect_err("no reason");
        assert!(err.to_string().contains("connect_reason"), "{err}");
        let with_reason = text.replace(
            "[listen]\n",
            "[listen]\nconnect = \"127.0.0.1:3128\"\nconnect_reason = \"no eBPF here\"\n",
        );
        ServeConfig::from_toml_str(&with_reason).expect("reason given");
    }

    #[test]
    fn unknown_keys_and_zero_limits_are_errors() {
        let typo = MINIMAL.replace("[policy]", "[limits]\nidle_timeout = 5\n[policy]");
        assert!(ServeConfig::from_toml_str(&typo).is_err());
        let zero = MINIMAL.replace("[policy]", "[limits]\nmax_connections = 0\n[policy]");
        let err = ServeConfig::from_toml_str(&zero).expect_err("zero cap");
        assert!(err.to_string().contains("max_connections"), "{err}");
    }

    fn with_broker(extra: &str) -> String {
        MINIMAL.replace(
            "[policy]\nfile = \"/tmp/policy.toml\"\n",
            &format!(
                "[broker]\nurl = \"https://broker.test:8443\"\nca_file = \"/tmp/ca.crt\"\n{extra}"
            ),
        )
    }

    #[test]
    fn broker_table_replaces_the_policy_file() {
        let cfg = ServeConfig::from_toml_str(&with_broker("bearer_file = \"/tmp/token\"\n"))
            .expect("broker config");
        assert!(cfg.policy.file.is_none());
        assert!(
            cfg.policy.deny_page,
            "deny page defaults on without [policy]"
        );
        let client = cfg.broker.as_ref().expect("broker").client_config();
        assert_eq!(client.url, "https://broker.test:8443");
        assert_eq!(client.timeout, paddock_proxy::broker::DEFAULT_TIMEOUT);
        assert_eq!(
            cfg.broker.as_ref().map(|b| b.egress_recheck_ms),
            Some(250),
            "open connections see policy changes within a second by default"
        );
        assert_eq!(client.bearer_file.as_deref(), Some(Path::new("/tmp/token")));
        assert!(client.client_cert.is_none());

        let mtls = ServeConfig::from_toml_str(&with_broker(
            "client_cert = \"/c.crt\"\nclient_key = \"/c.key\"\ntimeout_ms = 250\nserver_name = \"broker\"\n",
        ))
        .expect("mutual TLS only");
        let client = mtls.broker.as_ref().expect("broker").client_config();
        assert_eq!(client.timeout, Duration::from_millis(250));
        assert_eq!(client.server_name.as_deref(), Some("broker"));
        assert_eq!(
            client.client_cert.map(|c| (c.cert_chain, c.key)),
            Some((PathBuf::from("/c.crt"), PathBuf::from("/c.key")))
        );
    }

    #[test]
    fn egress_policy_must_be_exactly_one_of_file_and_broker() {
        let neither = MINIMAL.replace("[policy]\nfile = \"/tmp/policy.toml\"\n", "");
        let err = ServeConfig::from_toml_str(&neither).expect_err("no policy");
        assert!(err.to_string().contains("no egress policy"), "{err}");
        let both = format!(
            "{MINIMAL}[broker]\nurl = \"https://b:1\"\nca_file = \"/ca\"\nbearer_file = \"/t\"\n"
        );
        let err = ServeConfig::from_toml_str(&both).expect_err("both");
        assert!(err.to_string().contains("choose one"), "{err}");
    }

    #[test]
    fn broker_table_needs_credentials_and_a_timeout() {
        for (extra, needle) in [
            ("", "bearer_file or client_cert"),
            ("client_cert = \"/c.crt\"\n", "go together"),
            ("bearer_file = \"/t\"\ntimeout_ms = 0\n", "timeout_ms"),
            (
                "bearer_file = \"/t\"\negress_recheck_ms = 3600000\n",
                "egress_recheck_ms",
            ),
            ("bearer_file = \"/t\"\ntoken = \"x\"\n", "unknown field"),
        ] {
            let err = ServeConfig::from_toml_str(&with_broker(extra)).expect_err(extra);
            assert!(err.to_string().contains(needle), "{extra}: {err}");
        }
    }

    #[test]
    fn dns_table_defaults_and_limits() {
        let cfg = ServeConfig::from_toml_str(&format!(
            "{MINIMAL}[dns]\nlisten = [\"127.0.0.1:15053\"]\n"
        ))
        .expect("dns");
        let dns = cfg.dns.as_ref().expect("[dns]");
        assert!(dns.redirect_agents);
        assert_eq!(dns.settings(), paddock_proxy::dns::DnsSettings::default());
        assert_eq!(dns.policy_cache_ms, 250);
        for (extra, needle) in [
            ("max_name_len = 254\n", "max_name_len"),
            ("max_name_len = 0\n", "max_name_len"),
            ("rate_per_second = 0\n", "rate_per_second"),
            ("rate_burst = 0\n", "rate_burst"),
            ("max_ttl_secs = 0\n", "max_ttl"),
            ("policy_cache_ms = 3600000\n", "policy_cache_ms"),
            ("listen = [\"127.0.0.1:1\", \"[::1]:2\"]\n", "same port"),
            ("resolver = \"x\"\n", "unknown field"),
        ] {
            let err =
                ServeConfig::from_toml_str(&format!("{MINIMAL}[dns]\n{extra}")).expect_err(extra);
            assert!(err.to_string().contains(needle), "{extra}: {err}");
        }
    }

    #[test]
    fn redirected_dns_must_land_on_the_servers_addresses() {
        let ebpf = "[ebpf]\nagent_cgroups = [\"/sys/fs/cgroup/a\"]\ndns = [\"10.0.0.53:53\", \"[fd00::53]:53\"]\n";
        let two_listeners = MINIMAL.replace(
            "transparent = [\"127.0.0.1:15001\"]",
            "transparent = [\"127.0.0.1:15001\", \"[::1]:15001\"]",
        );
        let with = |listen: &str| {
            ServeConfig::from_toml_str(&format!("{two_listeners}{ebpf}[dns]\nlisten = {listen}\n"))
        };
        with("[\"127.0.0.1:15053\", \"[::1]:15053\"]").expect("both families served");
        let err = with("[\"127.0.0.1:15053\"]").expect_err("no IPv6 server");
        assert!(err.to_string().contains("[::1]:15053"), "{err}");
        let err = with("[\"127.0.0.2:15053\", \"[::1]:15053\"]").expect_err("wrong address");
        assert!(err.to_string().contains("127.0.0.1:15053"), "{err}");
        // Not redirected: any addresses will do (something else points the agents here).
        ServeConfig::from_toml_str(&format!(
            "{two_listeners}{ebpf}[dns]\nlisten = [\"127.0.0.9:53\"]\nredirect_agents = false\n"
        ))
        .expect("no redirect");
        // A resolver of a family without a transparent listener cannot be redirected.
        let v4_only = ServeConfig::from_toml_str(&format!(
            "{MINIMAL}{ebpf}[dns]\nlisten = [\"127.0.0.1:15053\"]\n"
        ))
        .expect_err("no IPv6 listener");
        assert!(v4_only.to_string().contains("there is none"), "{v4_only}");
        let t: Vec<SocketAddr> = vec!["127.0.0.1:15001".parse().expect("addr")];
        let r: Vec<SocketAddr> = vec!["10.0.0.53:53".parse().expect("addr")];
        let s: Vec<SocketAddr> = vec!["127.0.0.1:15053".parse().expect("addr")];
        assert_eq!(redirect_port(&t, &r, &s).ok(), Some(Some(15053)));
        assert_eq!(redirect_port(&t, &[], &s).ok(), Some(None));
        assert_eq!(redirect_port(&t, &r, &[]).ok(), Some(None));
    }

    #[test]
    fn ebpf_inbound_ports_are_parsed_and_validated() {
        let with = |ports: &str| {
            format!(
                "{MINIMAL}[ebpf]\nagent_cgroups = [\"/sys/fs/cgroup/a\"]\ninbound_ports = {ports}\n"
            )
        };
        let cfg = ServeConfig::from_toml_str(&with("[8080, 9090]")).expect("two ports");
        assert_eq!(
            cfg.ebpf.as_ref().map(|e| e.inbound_ports.clone()),
            Some(vec![8080, 9090])
        );
        let none = ServeConfig::from_toml_str(&format!(
            "{MINIMAL}[ebpf]\nagent_cgroups = [\"/sys/fs/cgroup/a\"]\n"
        ))
        .expect("default");
        assert_eq!(none.ebpf.map(|e| e.inbound_ports), Some(Vec::new()));
        let err = ServeConfig::from_toml_str(&with("[0]")).expect_err("port 0");
        assert!(err.to_string().contains("ebpf.inbound_ports"), "{err}");
        let err =
            ServeConfig::from_toml_str(&with("[1, 2, 3, 4, 5, 6, 7, 8, 9]")).expect_err("nine");
        assert!(err.to_string().contains("at most 8"), "{err}");
    }

    #[test]
    fn local_run_publishes_nothing_until_asked() {
        let p = Path::new("/x");
        let listen: Vec<SocketAddr> = vec!["127.0.0.1:15001".parse().expect("addr")];
        let cfg = ServeConfig::local_run("r", &listen, p, p, p, p, &[], &[]);
        assert_eq!(cfg.ebpf.as_ref().map(|e| e.inbound_ports.len()), Some(0));
        let cfg = cfg.with_inbound_ports(&[3000]);
        assert_eq!(cfg.ebpf.map(|e| e.inbound_ports), Some(vec![3000]));
    }
}
