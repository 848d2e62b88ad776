//! `paddock-proxy`: the egress proxy and its eBPF loader.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use paddock_app::serve::{self, ServeOptions, config::ServeConfig};
use paddock_proxy::{
    cgroup::Cgroup,
    ebpf::{self, AgentConfig, Interception, Interceptor, LoadOptions},
};

#[derive(Debug, Parser)]
#[command(name = "paddock-proxy", version, about = "Paddock egress proxy")]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    /// Async worker threads of `run`, `serve` and `node` [default: half the CPUs this
    /// process may use, at least 1].
    #[arg(long, global = true, env = paddock_app::runtime::WORKER_THREADS_ENV, value_name = "N")]
    worker_threads: Option<std::num::NonZeroUsize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage eBPF interception of cgroups.
    #[command(subcommand)]
    Ebpf(EbpfCommand),
    /// Run the proxy (transparent, CONNECT and plain-HTTP listeners; admin endpoint).
    Serve(ServeArgs),
    /// Run one command under Paddock: embedded broker, transparent proxy and eBPF interception
    /// around it, the command in its own namespaces; exits with the command's exit code.
    Run(RunArgs),
    /// Run the node agent: intercept every agent pod on this node, each as its own run
    /// (per-pod listeners inside the pods' network namespaces, eBPF on the pods' cgroups).
    Node(NodeArgs),
    /// Talk to a running node agent's pod socket (add, delete, list pods).
    NodePods(NodePodsArgs),
    /// Install the `paddock-cni` plugin on this node: copy the binary into the CNI bin
    /// directory and append its entry as the last plugin of the CNI configuration the runtime
    /// reads (idempotent; the node agent `DaemonSet` runs it from an init container).
    InstallCni(InstallCniArgs),
    /// Validate a `serve` (or, with --node, a `node`) configuration and what it names without
    /// starting: policy file, CA, upstream bundle, broker client settings, audit target.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// The file is a node agent configuration.
        #[arg(long)]
        node: bool,
    },
    /// Print shell completions for this command.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (one per subcommand) into a directory.
    Man {
        #[arg(long)]
        out: PathBuf,
    },
    /// Keep a bearer file filled with a fresh access token from an OAuth 2 / OIDC token
    /// endpoint (client-credentials grant): the sidecar that feeds the proxy's `bearer_file`.
    TokenRefresher(TokenRefresherArgs),
    /// Internal: the sandbox launcher `run` starts (not for direct use).
    #[command(name = "__sandbox", hide = true)]
    Sandbox(SandboxArgs),
}

/// How listing commands print.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Args)]
struct SandboxArgs {
    #[arg(long)]
    spec: i32,
    #[arg(long)]
    errors: i32,
    #[arg(long)]
    netns: i32,
    #[arg(long)]
    pty_socket: Option<i32>,
    /// `--netns` is a pidfd of a running sandbox's PID 1: start the spec's program in it.
    #[arg(long)]
    join: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// `BrokerPolicy` YAML file or directory (credentials with `env:` become placeholders).
    #[arg(long)]
    policy: PathBuf,
    /// Base directory for relative `secret: {file: ...}` paths.
    #[arg(long)]
    secrets: Option<PathBuf>,
    /// Run the command as this existing user, e.g. to let it work on your files (default: a
    /// fresh uid for this run with no account and no files on the host; never root;
    /// `SUDO_USER` is not used).
    #[arg(long)]
    user: Option<String>,
    /// Forward an inbound port to the command: `PORT`, `HOSTPORT:PORT` or
    /// `ADDR:HOSTPORT:PORT` (ADDR default 127.0.0.1; IPv6 in brackets). Repeatable; default none.
    #[arg(long, value_name = "[ADDR:]HOSTPORT:PORT")]
    publish: Vec<paddock_app::run::Publish>,
    /// The command serves an interactive adapter (HTTP: POST /prompts, /interrupt, /end;
    /// GET /output) on this port of its loopback: drive it with `paddock-broker
    /// prompt|attach|interrupt|end --socket <state>/<run>/interact.sock`.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    adapter_port: Option<u16>,
    /// More callers of the interactive routes: a static keys file (`paddock-broker keys add`)
    /// whose keys act in the run's namespace (default: only the generated `interact.key`).
    #[arg(long)]
    interact_keys: Option<PathBuf>,
    /// Let the run's operator open shells in the command's sandbox (its user, namespaces and
    /// cgroup, intercepted like the command): `paddock-broker shell --socket
    /// <state>/<run>/interact.sock`. The generated key gets the `broker:shell` scope.
    #[arg(long)]
    shell: bool,
    /// End an interactive run nobody attached to or prompted for this many seconds.
    #[arg(long, requires = "adapter_port", value_name = "SECONDS")]
    idle_timeout: Option<u64>,
    /// Run id (default: random).
    #[arg(long)]
    run_id: Option<String>,
    /// The run's namespace: the policy's `appliesTo.namespaces` must name it.
    #[arg(long, default_value = "local")]
    namespace: String,
    /// The run's template, for `appliesTo.templates`.
    #[arg(long, default_value = "local")]
    template: String,
    /// Parent of the per-run state directories (root-only; removed after the run except the
    /// audit logs).
    #[arg(long, default_value = "/run/paddock")]
    state_dir: PathBuf,
    /// The proxy's audit log (JSONL). Default: under the run's state directory.
    #[arg(long)]
    audit: Option<PathBuf>,
    /// Destination range the proxy may dial although it is private (repeatable).
    #[arg(long)]
    allow_cidr: Vec<String>,
    /// Resolver the proxy uses, and where the command's DNS is forwarded (repeatable; default:
    /// /etc/resolv.conf).
    #[arg(long)]
    nameserver: Vec<std::net::SocketAddr>,
    /// Let the proxy's resolver read /etc/hosts.
    #[arg(long)]
    hosts_file: bool,
    /// Extra root certificates (PEM) the proxy trusts for upstream servers.
    #[arg(long)]
    upstream_ca: Option<PathBuf>,
    /// Substitutions per second the broker allows this run (burst: twice that). Default:
    /// the broker's (50/s, burst 100); more than that is answered 403.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    substitute_rate: Option<u32>,
    /// No line per denied connection on stderr and no summary at exit.
    #[arg(long, short)]
    quiet: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Configuration file (TOML; see `paddock_app::serve::config`).
    #[arg(long)]
    config: PathBuf,
    /// Audit sink: `stdout`, an absolute JSONL file path, or `none` to run without an audit
    /// trail (must be explicit). Overrides `audit.target` in the file.
    #[arg(long)]
    audit: Option<String>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("endpoint").required(true).args(["token_url", "issuer"])))]
struct TokenRefresherArgs {
    /// The token endpoint (https; http only for loopback).
    #[arg(long)]
    token_url: Option<String>,
    /// The OIDC issuer whose `/.well-known/openid-configuration` names the token endpoint.
    #[arg(long)]
    issuer: Option<String>,
    /// This client's id at the token endpoint.
    #[arg(long)]
    client_id: String,
    /// File holding the client secret (re-read for every request; sent with HTTP Basic).
    #[arg(long)]
    client_secret_file: PathBuf,
    /// A scope to request (repeatable).
    #[arg(long)]
    scope: Vec<String>,
    /// The `audience` parameter some identity providers need (Auth0, some Okta and Entra).
    #[arg(long)]
    audience: Option<String>,
    /// The token file to keep fresh: the proxy's `bearer_file`. Written atomically, mode 0600.
    #[arg(long)]
    output: PathBuf,
    /// CA bundle for the endpoint (default: the webpki roots).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// A token's lifetime in seconds when neither `expires_in` nor a JWT `exp` gives one.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    default_lifetime_secs: u64,
    /// First wait after a failed refresh, in milliseconds (doubles up to --max-retry-ms).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    min_retry_ms: u64,
    /// Longest wait between two attempts after failures, in milliseconds.
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_retry_ms: u64,
}

#[derive(Debug, Args)]
struct NodeArgs {
    /// Configuration file (TOML; see `paddock_app::node::config`).
    #[arg(long)]
    config: PathBuf,
}

#[derive(Debug, Args)]
struct InstallCniArgs {
    /// The host's CNI bin directory, as mounted (e.g. /host/opt/cni/bin).
    #[arg(long)]
    bin_dir: PathBuf,
    /// The host's CNI conf directory, as mounted (e.g. /host/etc/cni/net.d).
    #[arg(long)]
    conf_dir: PathBuf,
    /// The node agent's pod socket as a path ON THE HOST (the plugin runs there).
    #[arg(long, default_value = paddock_app::node::install_cni::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// `timeoutSeconds` of the entry: how long the plugin waits for the node agent.
    #[arg(long, default_value_t = paddock_app::node::install_cni::DEFAULT_TIMEOUT_SECONDS)]
    timeout_seconds: u64,
    /// The plugin binary to copy (default: `paddock-cni` next to this executable).
    #[arg(long)]
    source_binary: Option<PathBuf>,
    /// Refuse to install unless this directory is a bpffs mount (the node agent's pins must
    /// live in the host's bpffs, or they die with its container).
    #[arg(long, value_name = "DIR")]
    require_bpffs: Option<PathBuf>,
    /// Remove the entry (restoring a converted file) and the binary instead.
    #[arg(long, conflicts_with_all = ["watch", "source_binary"])]
    uninstall: bool,
    /// Keep running and repeat the installation every SECONDS, putting the entry back when the
    /// network plugin rewrites its configuration.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    watch: Option<u64>,
}

#[derive(Debug, Args)]
struct NodePodsArgs {
    /// The node agent's pod socket.
    #[arg(long, default_value = "/run/paddock/node/pods.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    op: NodePodsOp,
}

#[derive(Debug, Subcommand)]
enum NodePodsOp {
    /// Intercept a pod (returns once its egress is intercepted).
    Add {
        #[arg(long)]
        uid: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        name: String,
        /// The pod's run (its `paddock.dev/run` label).
        #[arg(long)]
        run: String,
        /// The pod's network namespace (`/var/run/netns/...` or `/proc/PID/ns/net`).
        #[arg(long)]
        netns: PathBuf,
        /// A resolver the pod's DNS may go to (at most one per family).
        #[arg(long)]
        nameserver: Vec<std::net::IpAddr>,
        /// The loopback port of the pod's interactive adapter (reached through the broker's
        /// tunnel).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        adapter_port: Option<u16>,
        /// Shells may be opened in the pod (the `paddock.dev/shell` annotation).
        #[arg(long)]
        shell: bool,
    },
    /// Stop intercepting a pod and free what it held.
    Delete {
        #[arg(long)]
        uid: String,
    },
    /// The pods served, as JSON.
    List,
}

#[derive(Debug, Subcommand)]
enum EbpfCommand {
    /// Redirect a cgroup's egress to a proxy listener (pinned: survives this process).
    Attach(AttachArgs),
    /// Stop intercepting a cgroup.
    Detach {
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(long, default_value = ebpf::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// List intercepted cgroups.
    Status {
        #[arg(long, default_value = ebpf::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Remove every pinned program and map of an instance.
    Teardown {
        #[arg(long, default_value = ebpf::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(Debug, Args)]
struct AttachArgs {
    /// The agent's cgroup v2 directory.
    #[arg(long)]
    cgroup: PathBuf,
    /// Pin directory of this Paddock instance.
    #[arg(long, default_value = ebpf::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Proxy listener port.
    #[arg(long)]
    proxy_port: u16,
    /// Proxy listener address for IPv4 destinations.
    #[arg(long, default_value = "127.0.0.1")]
    proxy_v4: std::net::Ipv4Addr,
    /// Proxy listener address for IPv6 destinations (omit to refuse IPv6).
    #[arg(long)]
    proxy_v6: Option<std::net::Ipv6Addr>,
    /// DNS resolver the agent may use (repeat for one IPv4 and one IPv6).
    #[arg(long)]
    dns: Vec<SocketAddr>,
    /// Send allowed DNS to this port on the proxy address.
    #[arg(long)]
    dns_redirect_port: Option<u16>,
    /// Destinations never redirected.
    #[arg(long)]
    bypass: Vec<IpNet>,
    /// `SO_MARK` of the proxy's own sockets, never redirected.
    #[arg(long)]
    bypass_mark: Option<u32>,
    /// Allow all UDP (opens QUIC and other exits: not recommended).
    #[arg(long)]
    allow_udp: bool,
    /// Also answer `SO_ORIGINAL_DST` for sockets of this cgroup (the proxy's). Lasts while this
    /// process runs; `paddock-proxy serve` attaches its own.
    #[arg(long)]
    proxy_cgroup: Option<PathBuf>,
    /// Emit eBPF debug logs for this cgroup's decisions.
    #[arg(long)]
    debug_log: bool,
    /// TCP port the agent may accept connections on from outside its network namespace
    /// (repeat, at most 8). Without one, every listener of the cgroup is loopback-only.
    #[arg(long = "inbound-port", value_name = "PORT")]
    inbound_ports: Vec<u16>,
    /// Bound of each original-destination LRU map (applies when the maps are first created).
    #[arg(long, default_value_t = paddock_common::DEFAULT_ORIG_ENTRIES)]
    orig_entries: u32,
}

/// stderr for log lines; while `run` holds the terminal in raw mode (an interactive command)
/// each `\n` goes out as `\r\n`, or lines would start where the previous one ended.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if paddock_app::run::pty::terminal_is_raw() {
            for (i, line) in buf.split(|&b| b == b'\n').enumerate() {
                if i > 0 {
                    err.write_all(b"\r\n")?;
                }
                err.write_all(line)?;
            }
        } else {
            err.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `run`'s exit status when Paddock itself failed (the command's own status otherwise), as
/// `docker run` and `env` do, so callers can tell the two apart.
const RUN_FAILED: i32 = 125;

fn main() {
    // Both rustls providers are compiled in (aws-lc for the proxy's TLS legs, ring for the
    // crates that name it), so rustls cannot pick a process default by itself: dependencies
    // that build default configs (kube's client, for one) need this. An error means one was
    // installed already.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    if let Command::Sandbox(a) = &cli.command {
        // Single-threaded and without logging: it forks and execs the command.
        paddock_app::run::init::launcher_main(paddock_app::run::init::LauncherFds {
            spec: a.spec,
            errors: a.errors,
            netns: a.netns,
            pty_socket: a.pty_socket,
            join: a.join,
        });
    }
    init_tracing(cli.log_json);
    let threads = match paddock_app::runtime::resolve(
        cli.worker_threads,
        std::env::var_os(paddock_app::runtime::TOKIO_WORKER_THREADS_ENV).as_deref(),
    ) {
        Ok(threads) => threads,
        Err(e) => {
            eprintln!("paddock-proxy: {e}");
            std::process::exit(2);
        }
    };
    let (result, failed) = match cli.command {
        Command::Ebpf(cmd) => (ebpf_command(cmd), 1),
        Command::Serve(args) => (serve_command(args, threads), 1),
        Command::Node(args) => (node_command(&args, threads), 1),
        Command::NodePods(args) => (node_pods_command(args), 1),
        Command::InstallCni(args) => (install_cni_command(args), 1),
        Command::Check { config, node } => (check_command(&config, node), 1),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "paddock-proxy",
                &mut std::io::stdout(),
            );
            (Ok(()), 1)
        }
        Command::Man { out } => (man_command(&out), 1),
        Command::TokenRefresher(args) => (token_refresher_command(args), 1),
        Command::Run(args) => match run_command(args, threads) {
            Ok(code) => std::process::exit(code),
            Err(e) => (Err(e), RUN_FAILED),
        },
        Command::Sandbox(_) => unreachable!("handled above"),
    };
    if let Err(e) = result {
        // One line with the whole cause chain, for operators; no backtrace.
        eprintln!("paddock-proxy: {e:#}");
        std::process::exit(failed);
    }
}

fn run_command(a: RunArgs, threads: std::num::NonZeroUsize) -> Result<i32> {
    use tokio::signal::unix::{SignalKind, signal};
    // Whatever the caller left open (a socket, a file) must not reach the launcher or the
    // command: mark it close-on-exec before anything is spawned.
    paddock_app::run::init::cloexec_inherited();
    let runtime = paddock_app::runtime::build(threads).context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        // A closed terminal (SIGHUP) or SIGQUIT would otherwise kill run without its teardown.
        let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        let mut quit = signal(SignalKind::quit()).context("SIGQUIT handler")?;
        let interrupt = async move {
            tokio::select! {
                _ = term.recv() => nix::sys::signal::Signal::SIGTERM,
                _ = int.recv() => nix::sys::signal::Signal::SIGINT,
                _ = hup.recv() => nix::sys::signal::Signal::SIGHUP,
                _ = quit.recv() => nix::sys::signal::Signal::SIGQUIT,
            }
        };
        let opts = paddock_app::run::RunOptions {
            policy: a.policy,
            secrets_dir: a.secrets,
            user: a.user,
            run_id: a.run_id,
            namespace: a.namespace,
            template: a.template,
            state_dir: a.state_dir,
            audit: a.audit,
            allow_cidrs: a.allow_cidr,
            nameservers: a.nameserver,
            use_hosts_file: a.hosts_file,
            upstream_ca: a.upstream_ca,
            substitute_rate: a.substitute_rate,
            publish: a.publish,
            adapter_port: a.adapter_port,
            interact_keys: a.interact_keys,
            shell: a.shell,
            idle_timeout: a.idle_timeout.map(std::time::Duration::from_secs),
            // Exactly the running image, whatever happens to the path meanwhile.
            launcher: std::path::PathBuf::from("/proc/self/exe"),
            command: a.command,
            quiet: a.quiet,
        };
        paddock_app::run::run(opts, interrupt)
            .await
            .context("paddock-proxy run")
    })
}

fn check_command(path: &std::path::Path, node: bool) -> Result<()> {
    let lines = if node {
        let config = paddock_app::node::config::NodeConfig::from_file(path)
            .with_context(|| format!("loading {}", path.display()))?;
        paddock_app::check::node(&config)
    } else {
        let config =
            ServeConfig::from_file(path).with_context(|| format!("loading {}", path.display()))?;
        paddock_app::check::serve(&config)
    }
    .with_context(|| format!("checking {}", path.display()))?;
    for line in lines {
        println!("{line}");
    }
    println!("{}: ok", path.display());
    Ok(())
}

fn man_command(out: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    clap_mangen::generate_to(Cli::command(), out)
        .with_context(|| format!("writing man pages into {}", out.display()))?;
    println!("man pages written to {}", out.display());
    Ok(())
}

fn serve_command(args: ServeArgs, threads: std::num::NonZeroUsize) -> Result<()> {
    let config = ServeConfig::from_file(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    let runtime = paddock_app::runtime::build(threads).context("starting the async runtime")?;
    tracing::info!(worker_threads = threads, "async runtime started");
    runtime
        .block_on(serve::serve(ServeOptions::new(config, args.audit)))
        .context("paddock-proxy serve")
}

fn token_refresher_command(a: TokenRefresherArgs) -> Result<()> {
    use paddock_app::token_refresher::{Refresher, RefresherConfig, TokenEndpoint};
    use std::time::Duration;
    let parse = |raw: &str, what: &str| {
        paddock_broker::base_url::validate_base_url(raw).map_err(|e| anyhow::anyhow!("{what}: {e}"))
    };
    let endpoint = match (&a.token_url, &a.issuer) {
        (Some(u), None) => TokenEndpoint::Url(parse(u, "--token-url")?),
        (None, Some(i)) => TokenEndpoint::Discover(parse(i, "--issuer")?),
        _ => anyhow::bail!("give exactly one of --token-url and --issuer"),
    };
    let refresher = Refresher::new(RefresherConfig {
        endpoint,
        client_id: a.client_id,
        client_secret_file: a.client_secret_file,
        scopes: a.scope,
        audience: a.audience,
        output: a.output,
        ca_file: a.ca_file,
        default_lifetime: Duration::from_secs(a.default_lifetime_secs),
        min_retry: Duration::from_millis(a.min_retry_ms),
        max_retry: Duration::from_millis(a.max_retry_ms),
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        refresher
            .run(shutdown)
            .await
            .context("paddock-proxy token-refresher")
    })
}

fn node_command(args: &NodeArgs, threads: std::num::NonZeroUsize) -> Result<()> {
    let config = paddock_app::node::config::NodeConfig::from_file(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    let runtime = paddock_app::runtime::build(threads).context("starting the async runtime")?;
    tracing::info!(worker_threads = threads, "async runtime started");
    runtime
        .block_on(paddock_app::node::node(config))
        .context("paddock-proxy node")
}

fn install_cni_command(args: InstallCniArgs) -> Result<()> {
    use paddock_app::node::install_cni::{self, ConfChange, InstallOptions, Report};
    fn say(report: &Report) {
        let what = match &report.conf {
            ConfChange::Unchanged(f) => format!("entry already in {}", f.display()),
            ConfChange::Inserted(f) => format!("entry appended to {}", f.display()),
            ConfChange::Converted { from, to } => {
                format!(
                    "{} converted to {} with the entry",
                    from.display(),
                    to.display()
                )
            }
            ConfChange::Removed(files) if files.is_empty() => "no entry found".to_owned(),
            ConfChange::Removed(files) => format!(
                "entry removed from {}",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        tracing::info!(
            binary_changed = report.binary_changed,
            "paddock-cni: {what}"
        );
    }
    if args.uninstall {
        let report = install_cni::uninstall(&args.bin_dir, &args.conf_dir)
            .context("removing paddock-cni")?;
        say(&report);
        return Ok(());
    }
    if let Some(dir) = &args.require_bpffs {
        install_cni::check_bpffs(dir)?;
    }
    let source_binary = match args.source_binary {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name(install_cni::PLUGIN_TYPE),
    };
    let opts = InstallOptions {
        bin_dir: args.bin_dir,
        conf_dir: args.conf_dir,
        source_binary,
        socket: args.socket,
        timeout_seconds: args.timeout_seconds,
    };
    let report = install_cni::install(&opts).context("installing paddock-cni")?;
    say(&report);
    let Some(interval) = args.watch else {
        return Ok(());
    };
    loop {
        std::thread::sleep(std::time::Duration::from_secs(interval));
        match install_cni::install(&opts) {
            Ok(report) if report.changed() => {
                tracing::warn!("paddock-cni was missing or outdated on this node: put back");
                say(&report);
            }
            Ok(_) => {}
            // The network plugin may be rewriting its file: try again next round. Until the
            // entry is back, new pods are not intercepted (logged every round).
            Err(e) => tracing::error!(error = %e, "paddock-cni: cannot reinstall the entry"),
        }
    }
}

fn node_pods_command(args: NodePodsArgs) -> Result<()> {
    use paddock_app::node::{control, pod::PodSpec};
    use paddock_proxy::pod_cgroup::PodUid;
    let req = match args.op {
        NodePodsOp::Add {
            uid,
            namespace,
            name,
            run,
            netns,
            nameserver,
            adapter_port,
            shell,
        } => control::Request::Add {
            pod: PodSpec {
                uid: PodUid::parse(&uid)?,
                namespace,
                name,
                run,
                netns,
                nameservers: nameserver,
                adapter_port,
                shell,
            },
        },
        NodePodsOp::Delete { uid } => control::Request::Delete {
            uid: PodUid::parse(&uid)?,
        },
        NodePodsOp::List => control::Request::List,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let response = runtime.block_on(control::call(&args.socket, &req))?;
    if !response.ok {
        anyhow::bail!(
            "{}",
            response
                .error
                .as_deref()
                .unwrap_or("the node agent refused")
        );
    }
    if let Some(pod) = response.pod {
        println!("{pod}");
    }
    if let Some(pods) = response.pods {
        println!("{}", serde_json::Value::Array(pods));
    }
    Ok(())
}

fn ebpf_command(cmd: EbpfCommand) -> Result<()> {
    match cmd {
        EbpfCommand::Attach(a) => {
            let cfg = AgentConfig {
                proxy_v4: a.proxy_v4,
                proxy_v6: a.proxy_v6,
                proxy_port: a.proxy_port,
                dns: a.dns,
                dns_redirect_port: a.dns_redirect_port,
                bypass: a.bypass,
                bypass_mark: a.bypass_mark,
                block_udp: !a.allow_udp,
                debug_log: a.debug_log,
                inbound_ports: a.inbound_ports,
            };
            cfg.validate().context("invalid interception settings")?;
            let cgroup = Cgroup::open(&a.cgroup)?;
            let mut ic = Interceptor::load(&LoadOptions {
                pin_dir: a.pin_dir,
                orig_entries: a.orig_entries,
                ..LoadOptions::default()
            })?;
            ic.attach_agent(&cgroup, &cfg)?;
            println!(
                "intercepting {} (cgroup id {})",
                cgroup.path().display(),
                cgroup.id()
            );
            if let Some(p) = a.proxy_cgroup {
                ic.attach_proxy(&Cgroup::open(p)?)?;
            }
            Ok(())
        }
        EbpfCommand::Detach { cgroup, pin_dir } => {
            let cgroup = Cgroup::open(&cgroup)?;
            let mut ic = Interceptor::load(&LoadOptions {
                pin_dir,
                ..LoadOptions::default()
            })?;
            ic.detach_agent(&cgroup)?;
            println!("no longer intercepting {}", cgroup.path().display());
            Ok(())
        }
        EbpfCommand::Status { pin_dir, output } => {
            let agents = ebpf::agent_status(&pin_dir)?;
            if output == Output::Json {
                let list: Vec<serde_json::Value> = agents
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "cgroup_id": a.cgroup_id,
                            "configured": a.config.is_some(),
                            "inbound_ports": a.inbound_ports(),
                            "links_pinned": ebpf::check_pins(&pin_dir, &[a.cgroup_id]).is_ok(),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "pin_dir": pin_dir,
                        "agents": list,
                    }))?
                );
                return Ok(());
            }
            if agents.is_empty() {
                println!("no intercepted cgroups under {}", pin_dir.display());
            }
            for a in agents {
                let inbound = match (&a.config, a.inbound_ports()) {
                    (None, _) => "no config (refuses everything)".to_owned(),
                    (Some(_), ports) if ports.is_empty() => "none (loopback only)".to_owned(),
                    (Some(_), ports) => ports
                        .iter()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                };
                println!("agent cgroup id {}: inbound ports {inbound}", a.cgroup_id);
            }
            Ok(())
        }
        EbpfCommand::Teardown { pin_dir } => {
            ebpf::teardown(&pin_dir)?;
            println!("removed {}", pin_dir.display());
            Ok(())
        }
    }
}
