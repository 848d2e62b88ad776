//! `paddock-proxy run -- COMMAND`: one agent command under Paddock on this machine.
//!
//! In order: check the policy and that the seccomp filter builds here; reserve the run user;
//! start the broker in-process ([`paddock_broker::embed`]: the same routes, authentication,
//! limits and audit as `paddock-broker serve`, built from a typed config and called over its
//! in-memory link, with a one-time caller key held in memory; no config, key or certificate
//! file and no listener); register the run and issue its
//! placeholders; create the command's network namespace and bind the proxy's transparent
//! listeners and the DNS sockets inside it; start the proxy with the broker as its egress
//! policy and substituter; create the agent cgroup and attach the eBPF programs; open the
//! published ports; start the command in its sandbox ([`super::init`]) as the run user with
//! the run CA and its placeholders, relaying a pty when it runs on a terminal; then tear
//! everything down and exit with the command's code. The run CA's key lives in a 0700
//! root-only directory that is removed at the end; the broker's lease database and caller key
//! live only in memory; the audit logs are kept.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use nix::sys::signal::Signal;
use paddock_broker::{
    embed::{CallerConfig, EmbedConfig, EmbeddedBroker, PolicySource},
    policy::{CredentialGrant, Policy, ProviderSpec},
    ratelimit::{RateLimitConfig, RateSpec},
    secrets::SecretSource,
    wire::{IssueRequest, RunPhase, RunUpsertRequest},
};

use crate::serve::{ServeOptions, config::ServeConfig, serve_until};

use super::{
    CaFiles, ChildError, Launch, Publish, RunUser, SandboxSpec, UserError, child_env,
    env::{BUNDLE_FILE, CA_FILE, ca_bundle},
    publish::PublishError,
    resolv, resolve_user,
    seccomp::SeccompError,
    spawn_sandboxed,
    spec::SandboxFile,
    supervise,
    user::{HostUids, UidLock},
};
use paddock_proxy::{
    broker::{BrokerClient, BrokerPolicy, BrokerSubstituter, DEFAULT_TIMEOUT},
    netns::{NetnsError, OwnedNetns},
};

/// The `SO_MARK` the proxy puts on its upstream sockets in `run` mode.
const BYPASS_MARK: u32 = 0x70ad;
/// How long the command gets to exit after a forwarded Ctrl-C / SIGTERM.
const GRACE: Duration = Duration::from_secs(10);
/// Destinations the command reaches without the proxy: its own namespace's loopback (and the
/// unspecified addresses, which connect to it). Nothing else is reachable from inside.
const LOCAL_BYPASS: [&str; 4] = ["127.0.0.0/8", "::1/128", "0.0.0.0/32", "::/128"];
/// How long the command's last output may take to reach the terminal after it exited.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// How often the embedded broker checks the policy files for changes (as `paddock-broker
/// serve` does by default): an edited policy applies to the running command.
const POLICY_POLL: Duration = Duration::from_millis(250);

/// What `run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `BrokerPolicy` file or directory.
    pub policy: PathBuf,
    /// Base directory for relative `secret: {file: ...}` paths (default: the current one).
    pub secrets_dir: Option<PathBuf>,
    /// Run the command as this existing user (default: a fresh uid for this run).
    pub user: Option<String>,
    pub run_id: Option<String>,
    /// The run's namespace, which the policy's `appliesTo.namespaces` must name.
    pub namespace: String,
    pub template: String,
    /// Parent of the per-run state directories.
    pub state_dir: PathBuf,
    /// Where the proxy's audit log goes (default: `<state>/<run>/proxy-audit.jsonl`).
    pub audit: Option<PathBuf>,
    /// Destination ranges carved out of the proxy's denied set (private APIs, test hosts).
    pub allow_cidrs: Vec<String>,
    /// Resolvers the proxy uses itself (default: resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    /// Let the proxy's resolver read `/etc/hosts`.
    pub use_hosts_file: bool,
    /// Extra roots the proxy trusts upstream.
    pub upstream_ca: Option<PathBuf>,
    /// Substitutions per second the embedded broker allows the run (burst: twice that);
    /// `None`: the broker's default.
    pub substitute_rate: Option<u32>,
    /// Inbound ports forwarded into the command's network namespace.
    pub publish: Vec<Publish>,
    /// The command serves an interactive adapter on this loopback port (see
    /// [`super::interactive`]).
    pub adapter_port: Option<u16>,
    /// More callers of the interactive routes (a static keys file).
    pub interact_keys: Option<PathBuf>,
    /// Serve `/shell` on the run's socket (see [`super::shell`]).
    pub shell: bool,
    /// End the run when nobody is attached and nothing was prompted for this long.
    pub idle_timeout: Option<Duration>,
    /// The `paddock-proxy` binary that launches the sandbox (`/proc/self/exe` from the CLI).
    pub launcher: PathBuf,
    pub command: Vec<OsString>,
    /// No line per denial on stderr and no summary at exit (the audit trail is the same).
    pub quiet: bool,
}

/// Why a run could not start or finish cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "paddock-proxy run needs root: it loads eBPF programs and creates namespaces and a \
         cgroup (try sudo; the command itself runs as a fresh unprivileged user, or --user)"
    )]
    NotRoot,
    #[error("no command given: paddock-proxy run --policy FILE -- COMMAND [ARGS...]")]
    NoCommand,
    #[error("invalid policy: {0}")]
    Policy(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("broker: {0}")]
    Broker(String),
    #[error("proxy: {0}")]
    Proxy(String),
    #[error("cgroup: {0}")]
    Cgroup(String),
    #[error(
        "secret file {path} is readable by others (mode {mode:04o}): the command runs as another \
         user and must not be able to read it; chmod 600 it"
    )]
    SecretExposed { path: PathBuf, mode: u32 },
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Child(#[from] ChildError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("network namespace: {0}")]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("terminal: {0}")]
    Terminal(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn mkdir(path: &Path, mode: u32) -> Result<(), RunError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io_err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(buf.as_mut_slice());
    hex::encode(buf)
}

/// Refuse secret files that group or others may read: the command runs as another user.
pub fn check_secret_file(path: &Path) -> Result<(), RunError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(RunError::SecretExposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Everything created for the run, removed on drop (also on error paths).
struct Cleanup {
    state: PathBuf,
    cgroup: Option<PathBuf>,
    pin_dir: PathBuf,
    /// Released after everything above is gone (fields drop after `drop` ran).
    _uid: Option<UidLock>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = paddock_proxy::ebpf::teardown(&self.pin_dir);
        if let Some(cg) = &self.cgroup {
            // cgroup.kill takes the shells' cgroups below it too.
            super::child::kill_cgroup(cg);
            for _ in 0..50 {
                // A shell's cgroup still open (its session not yet dropped) is removed first.
                if let Ok(children) = std::fs::read_dir(cg) {
                    for child in children.flatten() {
                        if child.file_type().is_ok_and(|t| t.is_dir()) {
                            let _ = std::fs::remove_dir(child.path());
                        }
                    }
                }
                if std::fs::remove_dir(cg).is_ok() || !cg.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Secrets go; audit logs stay.
        let _ = std::fs::remove_dir_all(self.state.join("ca"));
    }
}

/// Start the broker in-process with a one-time caller key, and an in-process client for it.
fn start_broker(
    state: &Path,
    policy_path: &Path,
    secrets_dir: &Path,
    namespace: &str,
    substitute_rate: Option<u32>,
    extra_keys: Option<&Path>,
) -> Result<(EmbeddedBroker, BrokerClient), RunError> {
    let mut config = EmbedConfig::new(
        PolicySource::Files {
            path: policy_path.to_path_buf(),
            secrets_dir: Some(secrets_dir.to_path_buf()),
            poll: Some(POLICY_POLL),
        },
        state.join("broker-audit.jsonl"),
        CallerConfig::run_controller("paddock-run", namespace),
    );
    config.extra_keys = extra_keys.map(Path::to_path_buf);
    if let Some(rate) = substitute_rate {
        config.rate_limits = RateLimitConfig {
            substitute: RateSpec {
                per_second: rate,
                burst: rate.saturating_mul(2),
            },
            ..RateLimitConfig::default()
        };
    }
    let broker = EmbeddedBroker::start(config).map_err(|e| RunError::Broker(e.to_string()))?;
    // The proxy shares the broker's process: it calls the same server, routes and
    // authentication over an in-memory link, not loopback TCP and TLS on every substitution.
    let client = crate::broker_link::client(&broker.client(), DEFAULT_TIMEOUT)
        .map_err(|e| RunError::Broker(e.to_string()))?;
    Ok((broker, client))
}

/// Every place a grant's real secrets come from: its `secret`, a PAT pool's tokens, a GitHub
/// App's private key. Each must stay out of the command's reach (an `env` source is removed
/// from its environment, a file must not be readable by others).
fn secret_sources(grant: &CredentialGrant) -> Vec<&SecretSource> {
    let mut sources: Vec<&SecretSource> = grant.secret.iter().collect();
    match &grant.provider {
        ProviderSpec::PatPool { secrets, .. } => sources.extend(secrets),
        ProviderSpec::GithubApp { private_key, .. } => sources.push(private_key),
        ProviderSpec::UserSecret { .. } | ProviderSpec::AnthropicApiKey { .. } => {}
    }
    sources
}

/// Issue a placeholder for every credential the policy names an `env` for (and applies to
/// this run); also return the environment variables that hold real secrets, which the
/// command must not inherit.
async fn issue_placeholders(
    client: &BrokerClient,
    policy: &Policy,
    run_info: &RunUpsertRequest,
) -> Result<(BTreeMap<String, String>, BTreeSet<String>), RunError> {
    let run_id = &run_info.run;
    let mut placeholders = BTreeMap::new();
    let mut secret_envs = BTreeSet::new();
    for (doc, grant) in policy.credentials() {
        for source in secret_sources(grant) {
            match source {
                SecretSource::Env(name) => {
                    secret_envs.insert(name.clone());
                }
                SecretSource::File(path) => check_secret_file(path)?,
            }
        }
        let (Some(var), true) = (
            &grant.env,
            doc.doc()
                .spec
                .applies_to
                .matches(&paddock_wire::api::RunInfo {
                    run: run_info.run.clone(),
                    namespace: run_info.namespace.clone(),
                    template: run_info.template.clone(),
                    phase: run_info.phase,
                }),
        ) else {
            continue;
        };
        let issued = client
            .issue(&IssueRequest {
                run: run_id.clone(),
                credential: grant.name.clone(),
            })
            .await
            .map_err(|e| RunError::Broker(format!("issuing {}: {e}", grant.name)))?;
        placeholders.insert(var.clone(), issued.value);
    }

    Ok((placeholders, secret_envs))
}

/// The run user: `--user NAME`, else a fresh uid reserved for this run.
fn run_user(explicit: Option<&str>) -> Result<(RunUser, Option<UidLock>), RunError> {
    if let Some(name) = explicit {
        return Ok((resolve_user(name)?, None));
    }
    let (uid, lock) = super::user::pick_dynamic_uid(&HostUids::default(), rand::random())?;
    Ok((RunUser::dynamic(uid), Some(lock)))
}

/// Run the command under Paddock; returns the exit code to exit with.
pub async fn run(
    opts: RunOptions,
    interrupt: impl Future<Output = Signal>,
) -> Result<i32, RunError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(RunError::NotRoot);
    }
    if opts.command.is_empty() {
        return Err(RunError::NoCommand);
    }
    // Refuse before anything exists when the command could not be confined on this machine.
    super::seccomp::build()?;
    let cwd = std::env::current_dir().map_err(io_err(Path::new(".")))?;
    let policy_path = std::path::absolute(&opts.policy).map_err(io_err(&opts.policy))?;
    // Relative secret files resolve against --secrets, else the directory run started in.
    let secrets_dir = match &opts.secrets_dir {
        Some(dir) => std::path::absolute(dir).map_err(io_err(dir))?,
        None => cwd.clone(),
    };
    if !secrets_dir.is_dir() {
        return Err(RunError::Io {
            path: secrets_dir,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        });
    }
    let policy = Policy::load_with(
        &policy_path,
        Some(&secrets_dir),
        time::OffsetDateTime::now_utc(),
    )
    .map_err(|e| RunError::Policy(e.to_string()))?;
    let (user, uid_lock) = run_user(opts.user.as_deref())?;

    let run_id = opts
        .run_id
        .clone()
        .unwrap_or_else(|| format!("run-{}", random_hex(4)));
    let state = opts.state_dir.join(&run_id);
    mkdir(&opts.state_dir, 0o755)?;
    mkdir(&state, 0o700)?;
    let mut cleanup = Cleanup {
        state: state.clone(),
        cgroup: None,
        pin_dir: PathBuf::from("/sys/fs/bpf/paddock").join(&run_id),
        _uid: uid_lock,
    };

    // 1. The broker, in-process (with the interactive callers' keys, for an adapter).
    let interact = if opts.adapter_port.is_some() || opts.shell {
        Some(
            super::interactive::write_keys(
                &state,
                &opts.namespace,
                opts.interact_keys.as_deref(),
                opts.shell,
            )
            .map_err(io_err(&state))?,
        )
    } else {
        None
    };
    let (broker, client) = start_broker(
        &state,
        &policy_path,
        &secrets_dir,
        &opts.namespace,
        opts.substitute_rate,
        interact.as_ref().map(|f| f.keys.as_path()),
    )?;
    if let Some(idle) = opts.idle_timeout {
        let router = broker.broker().interactive();
        router.set_config(paddock_broker::interactive::InteractiveConfig {
            idle_timeout: Some(idle),
            ..router.config()
        });
    }
    let run = Run {
        opts: &opts,
        id: &run_id,
        state: &state,
        policy_path: &policy_path,
        cwd: &cwd,
        user: &user,
        broker: &broker,
        interact: interact.as_ref(),
    };
    let result = run
        .serve_and_run(&client, &policy, &mut cleanup, interrupt)
        .await;
    broker.shutdown().await;
    if let Some(files) = &interact {
        let _ = std::fs::remove_file(&files.socket);
        let _ = std::fs::remove_file(&files.key);
    }
    drop(cleanup);
    if result.is_ok() {
        let audit = opts
            .audit
            .clone()
            .unwrap_or_else(|| state.join("proxy-audit.jsonl"));
        eprintln!(
            "paddock: run {run_id} finished; audit logs: {} and {}",
            audit.display(),
            state.join("broker-audit.jsonl").display()
        );
    }
    result
}

/// What one run is about, shared by its steps.
struct Run<'a> {
    opts: &'a RunOptions,
    id: &'a str,
    state: &'a Path,
    policy_path: &'a Path,
    cwd: &'a Path,
    user: &'a RunUser,
    broker: &'a EmbeddedBroker,
    interact: Option<&'a super::interactive::InteractFiles>,
}

impl Run<'_> {
    /// With `--adapter-port`: lets the broker reach the command's adapter and serves the
    /// interactive routes on the run's socket until the broker shuts down.
    fn serve_interactive(
        &self,
        netns: &Arc<OwnedNetns>,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, RunError> {
        let Some(files) = self.interact else {
            return Ok(None);
        };
        if let Some(port) = self.opts.adapter_port {
            self.broker.broker().interactive().set_connector(Arc::new(
                super::interactive::NetnsAdapter {
                    netns: Arc::clone(netns),
                    run: self.id.to_owned(),
                    port,
                },
            ));
        }
        let listener =
            super::interactive::bind_socket(&files.socket).map_err(io_err(&files.socket))?;
        eprintln!(
            "paddock: interactive run {}/{}: socket {}, key {} (paddock-broker prompt|attach|shell --socket ...)",
            self.opts.namespace,
            self.id,
            files.socket.display(),
            files.key.display()
        );
        Ok(Some(self.broker.client().link().serve_unix(listener)))
    }

    /// Steps 2-6 with the broker running; the caller stops it and cleans up afterwards.
    #[expect(
        clippy::too_many_lines,
        reason = "one linear start-up and teardown sequence; splitting it further hides the order"
    )]
    async fn serve_and_run(
        &self,
        client: &BrokerClient,
        policy: &Policy,
        cleanup: &mut Cleanup,
        interrupt: impl Future<Output = Signal>,
    ) -> Result<i32, RunError> {
        let opts = self.opts;
        // 2. The run and its placeholders.
        let run_info = RunUpsertRequest {
            run: self.id.to_owned(),
            namespace: opts.namespace.clone(),
            template: opts.template.clone(),
            phase: RunPhase::Running,
        };
        client
            .upsert_run(&run_info)
            .await
            .map_err(|e| RunError::Broker(format!("registering the run: {e}")))?;
        let (placeholders, secret_envs) = issue_placeholders(client, policy, &run_info).await?;

        // 3. The command's network namespace: only loopback, with the proxy's listeners and
        //    the DNS sockets bound inside; the proxy accepts and dials from the host's side.
        let netns = Arc::new(OwnedNetns::create()?);
        let sockets = netns.bind_run_sockets()?;
        let ipv6 = sockets.transparent.len() > 1;
        let transparent = sockets.transparent_addrs();
        let dns_addrs = sockets.dns_addrs();
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        // The command's DNS sockets are served by the proxy's policy-aware DNS server (see
        // `paddock_proxy::dns`): only names the run's policy could reach get an answer, from the
        // proxy's own resolver (`--nameserver`, else the host's resolv.conf).

        // 4. The proxy, attached to a fresh agent cgroup.
        let cg_root = paddock_proxy::ebpf::mounts::cgroup2_root()
            .map_err(|e| RunError::Cgroup(e.to_string()))?;
        let cgroup = cg_root.join("paddock").join(self.id);
        std::fs::create_dir_all(&cgroup).map_err(io_err(&cgroup))?;
        cleanup.cgroup = Some(cgroup.clone());
        let audit = opts
            .audit
            .clone()
            .unwrap_or_else(|| self.state.join("proxy-audit.jsonl"));
        let bypass = LOCAL_BYPASS
            .iter()
            .map(|n| n.parse::<ipnet::IpNet>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RunError::Proxy(e.to_string()))?;
        let config = ServeConfig::local_run(
            self.id,
            &transparent,
            &self.state.join("ca"),
            self.policy_path,
            &cgroup,
            &cleanup.pin_dir,
            &dns_addrs,
            &bypass,
        )
        .with_network(
            &opts.allow_cidrs,
            &opts.nameservers,
            opts.use_hosts_file,
            Some(BYPASS_MARK),
        )
        .with_upstream_ca(opts.upstream_ca.clone())
        // A published port is one the command may listen on as it likes (a dual-stack `::`
        // bind stays dual-stack); the others are kept on loopback by the bind hooks.
        .with_inbound_ports(&opts.publish.iter().map(|p| p.port).collect::<Vec<_>>());
        let mut serve = ServeOptions::new(config, Some(audit.display().to_string()));
        serve.transparent_listeners = sockets.transparent;
        serve.dns_sockets = sockets.dns_sockets;
        // One invalidation stream for reused substitutions and pushed egress re-checks.
        let grants = paddock_proxy::broker::GrantCache::start(client.clone());
        serve.policy = Some(Arc::new(
            BrokerPolicy::new(client.clone()).with_generation(grants.clone()),
        ));
        let metrics = Arc::new(paddock_proxy::metrics::ProxyMetrics::new());
        serve.substituter = Some(Arc::new(
            BrokerSubstituter::new(client.clone())
                .with_metrics(Arc::clone(&metrics))
                .with_grants(grants),
        ));
        serve.metrics = Some(Arc::clone(&metrics));
        let tally = Arc::new(super::summary::RunTally::new(opts.quiet));
        serve.audit_observer =
            Some(Arc::clone(&tally) as Arc<dyn paddock_proxy::audit::AuditObserver>);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        serve.ready = Some(ready_tx);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut proxy = tokio::spawn(serve_until(serve, async move {
            let _ = stop_rx.await;
        }));
        tokio::select! {
            r = ready_rx => if r.is_err() {
                let why = match (&mut proxy).await {
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(())) => "stopped before it was ready".into(),
                    Err(e) => e.to_string(),
                };
                return Err(RunError::Proxy(why));
            },
            r = &mut proxy => {
                return Err(RunError::Proxy(match r { Ok(Err(e)) => e.to_string(), Ok(Ok(())) => "stopped early".into(), Err(e) => e.to_string() }));
            }
        }

        // 5. The command, in its sandbox.
        let outcome = async {
            let published = super::publish::publish(Arc::clone(&netns), &opts.publish).await?;
            let _interact = self.serve_interactive(&netns)?;
            let spec = self.spec(&placeholders, &secret_envs, &host_resolv, ipv6)?;
            tracing::info!(
                run = %self.id,
                port = transparent.first().map(std::net::SocketAddr::port),
                placeholders = placeholders.len(),
                user = %self.user.name,
                "starting the command"
            );
            let launch = Launch {
                launcher: &opts.launcher,
                cgroup: &cgroup,
                netns: std::os::fd::AsFd::as_fd(netns.as_ref()),
                piped_stdout: false,
                join: false,
            };
            let mut sandbox = spawn_sandboxed(&spec, &launch)?;
            if opts.shell
                && let Some(pid) = sandbox.child.id()
            {
                self.broker
                    .broker()
                    .interactive()
                    .set_shell_opener(Arc::new(super::shell::RunShell {
                        launcher: opts.launcher.clone(),
                        cgroup: cgroup.clone(),
                        run: self.id.to_owned(),
                        spec: spec.clone(),
                        launcher_pid: pid,
                    }));
            }
            let mut terminal = None;
            if spec.pty.is_some() {
                let master = tokio::time::timeout(Duration::from_secs(30), sandbox.pty_master())
                    .await
                    .map_err(|_| ChildError::Pty("timed out".into()))??;
                // No master: the launcher failed, and says why below.
                if let (Some(master), Some(pty)) = (master, spec.pty) {
                    let [stdin, stdout, _] = pty.stdio;
                    let raw = if stdin {
                        Some(
                            super::pty::RawMode::enter()
                                .map_err(|e| RunError::Terminal(format!("raw mode: {e}")))?,
                        )
                    } else {
                        None
                    };
                    let relay = super::pty::Relay::start(master, stdin, !stdout)
                        .map_err(|e| RunError::Terminal(format!("relay: {e}")))?;
                    terminal = Some((relay, raw));
                }
            }
            let outcome = supervise(&mut sandbox.child, &cgroup, interrupt, GRACE).await;
            if let Some((relay, raw)) = terminal {
                relay.finish(OUTPUT_DRAIN).await;
                drop(raw);
            }
            drop(published);
            if let Some(why) = sandbox.failure() {
                return Err(RunError::Child(ChildError::Sandbox(why)));
            }
            Ok::<_, RunError>(outcome?)
        }
        .await;

        // 6. Tear down: the run ends (its leases are revoked), then the proxy stops.
        let phase = match &outcome {
            Ok(o) if o.code == 0 => RunPhase::Succeeded,
            Ok(o) if o.interrupted_by.is_some() => RunPhase::Cancelled,
            _ => RunPhase::Failed,
        };
        let _ = client
            .upsert_run(&RunUpsertRequest { phase, ..run_info })
            .await;
        let _ = stop_tx.send(());
        let _ = proxy.await;
        if outcome.is_ok() {
            tally.print_summary(&metrics);
        }
        Ok(outcome?.code)
    }

    /// What the sandbox launcher is told: the command, its environment and files.
    fn spec(
        &self,
        placeholders: &BTreeMap<String, String>,
        secret_envs: &BTreeSet<String>,
        host_resolv: &str,
        ipv6: bool,
    ) -> Result<SandboxSpec, RunError> {
        let ca_path = self.state.join("ca/tls.crt");
        let ca_pem = std::fs::read_to_string(&ca_path).map_err(io_err(&ca_path))?;
        let ca = CaFiles::in_sandbox();
        let inherited = std::env::vars_os()
            .filter(|(k, _)| !k.to_str().is_some_and(|k| secret_envs.contains(k)));
        let env = child_env(inherited, &ca, placeholders, self.user);
        let (program, args) = self.opts.command.split_first().ok_or(RunError::NoCommand)?;
        let mut spec = SandboxSpec::new(program, args, env.iter(), self.user, self.cwd);
        spec.files = vec![
            SandboxFile {
                name: CA_FILE.into(),
                contents: ca_bundle(&ca_pem, &[]),
                mode: 0o644,
            },
            SandboxFile {
                name: BUNDLE_FILE.into(),
                contents: ca_bundle(&ca_pem, super::env::SYSTEM_BUNDLES),
                mode: 0o644,
            },
        ];
        spec.resolv_conf = Some(resolv::sandbox_resolv_conf(host_resolv, ipv6));
        spec.tty_gid = nix::unistd::Group::from_name("tty")
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw());
        let stdio = super::pty::terminal_stdio();
        if stdio.contains(&true) {
            spec.pty = Some(super::spec::PtySpec {
                size: super::pty::operator_window_size()
                    .unwrap_or(super::spec::WindowSize { rows: 24, cols: 80 }),
                stdio,
            });
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(secret: &Path) -> String {
        format!(
            "\
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata:
  name: local
spec:
  appliesTo:
    namespaces: [local]
  credentials:
    - name: gh
      env: GH_TOKEN
      provider: {{kind: user-secret, inject: {{header: {{name: Authorization, prefix: \"Bearer \"}}}}}}
      secret: {{file: {}}}
      hosts: [api.github.com]
  egress:
    - hosts: [api.github.com]
      ports: [443]
      substituteAuth: true
",
            secret.display()
        )
    }

    /// `run`'s broker start-up, unprivileged: the embedded broker answers registration,
    /// placeholders and substitutions over the in-process client, with the run's rate limit,
    /// and the run's state directory gets nothing but the broker's audit log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_embedded_broker_writes_no_config_or_keys_and_substitutes() {
        let secrets = tempfile::tempdir().expect("tempdir");
        let secret = secrets.path().join("gh");
        std::fs::write(&secret, "ghp_run_real").expect("secret");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let policy_path = secrets.path().join("policy.yaml");
        std::fs::write(&policy_path, policy(&secret)).expect("policy");
        let state = tempfile::tempdir().expect("state");

        let (broker, client) = start_broker(
            state.path(),
            &policy_path,
            secrets.path(),
            "local",
            Some(1),
            None,
        )
        .expect("broker");
        let run_info = RunUpsertRequest {
            run: "run-t".into(),
            namespace: "local".into(),
            template: "local".into(),
            phase: RunPhase::Running,
        };
        client.upsert_run(&run_info).await.expect("run registered");
        let loaded = Policy::load_with(
            &policy_path,
            Some(secrets.path()),
            time::OffsetDateTime::now_utc(),
        )
        .expect("policy");
        let (placeholders, secret_envs) = issue_placeholders(&client, &loaded, &run_info)
            .await
            .expect("placeholders");
        assert!(secret_envs.is_empty());
        let placeholder = placeholders
            .get("GH_TOKEN")
            .expect("GH_TOKEN issued")
            .clone();
        assert!(placeholder.starts_with("pdk-"), "{placeholder}");

        let request = paddock_broker::wire::SubstituteAuthRequest {
            run: "run-t".into(),
            pod: None,
            host: "api.github.com".into(),
            port: 443,
            transport: paddock_broker::wire::Transport::Tls,
            method: "GET".into(),
            path: "/user".into(),
            query: None,
            headers: vec![paddock_broker::wire::Header {
                name: "Authorization".into(),
                value: format!("Bearer {placeholder}"),
            }],
            subscription: None,
        };
        let answer = client.substitute_auth(&request).await.expect("substituted");
        assert_eq!(answer.set_headers[0].value, "Bearer ghp_run_real");
        // --substitute-rate 1 means a burst of 2: the third substitution in a row is refused.
        client.substitute_auth(&request).await.expect("second");
        let refused = client.substitute_auth(&request).await.expect_err("limited");
        assert_eq!(
            refused.code(),
            Some(paddock_broker::wire::ErrorCode::RateLimited),
            "{refused}"
        );

        let mut files: Vec<_> = std::fs::read_dir(state.path())
            .expect("state")
            .map(|e| e.expect("entry").file_name())
            .collect();
        files.sort();
        assert_eq!(
            files,
            vec![OsString::from("broker-audit.jsonl")],
            "no broker config, keys, certificates, token or database on disk"
        );
        broker.shutdown().await;
    }

    #[test]
    fn every_secret_source_of_every_provider_is_kept_from_the_command() {
        let text = r"
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: sources}
spec:
  appliesTo: {namespaces: [local]}
  credentials:
    - name: user
      provider: {kind: user-secret, inject: {header: {name: Authorization}}}
      secret: {env: USER_KEY}
      hosts: [a.test]
    - name: pool
      provider:
        kind: pat-pool
        inject: {basic: {username: x}}
        secrets: [{env: POOL_ONE}, {file: /srv/pool-two}]
      hosts: [github.com]
    - name: app
      provider: {kind: github-app, appId: 1, installationId: 2, privateKey: {env: APP_KEY}}
      hosts: [api.github.com]
";
        let docs = Policy::parse_text(Path::new("p.yaml"), text, time::OffsetDateTime::now_utc())
            .expect("valid");
        let policy = Policy::from_docs(docs).expect("valid set");
        let mut seen: Vec<String> = policy
            .credentials()
            .flat_map(|(_, g)| secret_sources(g))
            .map(|s| match s {
                SecretSource::Env(v) => format!("env:{v}"),
                SecretSource::File(p) => format!("file:{}", p.display()),
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                "env:APP_KEY",
                "env:POOL_ONE",
                "env:USER_KEY",
                "file:/srv/pool-two"
            ]
        );
    }

    #[test]
    fn secret_files_readable_by_others_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("s");
        std::fs::write(&f, "x").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = check_secret_file(&f).expect_err("world-readable");
        assert!(err.to_string().contains("0644"), "{err}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(
            check_secret_file(&f).is_err(),
            "group-readable is refused too"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(check_secret_file(&f).is_ok());
        assert!(matches!(
            check_secret_file(&dir.path().join("missing")),
            Err(RunError::Io { .. })
        ));
    }
}
