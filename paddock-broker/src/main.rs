//! `paddock-broker` command line.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

mod interact_cli;

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use paddock_broker::{
    auth::{
        RunDirectory, Scope,
        rsa_session::RsaSessionAuthenticator,
        static_keys::{format_line, hash_key},
    },
    config::{self, Config},
    policy::Policy,
    server,
    store::{SCHEMA_VERSION, SqliteConfig, Store, StoreConfig},
};

#[derive(Parser, Debug)]
#[command(name = "paddock-broker", version, about = "Paddock credential broker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the broker.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the `HarnessRun` controller (in a cluster; leader-elected through a `Lease`).
    Controller {
        #[arg(long)]
        config: PathBuf,
    },
    /// Manage static API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Work with `BrokerPolicy` files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Inspect leases.
    Leases {
        #[command(subcommand)]
        command: LeasesCommand,
    },
    /// The broker's database (`store:` or `database:` in the config).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// The RSA-OAEP session keypair (auth.rsaSession).
    SessionKey {
        #[command(subcommand)]
        command: SessionKeyCommand,
    },
    /// Send a prompt to an interactive run (its answer streams to `attach`).
    Prompt {
        #[command(flatten)]
        target: interact_cli::Target,
        /// The prompt; `-` reads it from stdin.
        #[arg(long, short = 't')]
        text: String,
    },
    /// Interrupt an interactive run's current turn.
    Interrupt {
        #[command(flatten)]
        target: interact_cli::Target,
    },
    /// Ask an interactive run's adapter to end the run.
    End {
        #[command(flatten)]
        target: interact_cli::Target,
    },
    /// Stream an interactive run's output to stdout.
    Attach {
        #[command(flatten)]
        target: interact_cli::Target,
    },
    /// Open an interactive shell in the run's sandbox (its namespaces, cgroup and user; its
    /// traffic intercepted like the agent's). Needs the `broker:shell` scope.
    Shell {
        #[command(flatten)]
        target: interact_cli::Target,
    },
    /// Validate a broker config and everything it names (TLS files, policy, auth backends)
    /// without starting; the database is not opened. Exits non-zero on the first problem.
    Check {
        #[arg(long)]
        config: PathBuf,
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
    /// The cluster root CA that signs node agents' short-lived intermediates (`nodeCa`).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

/// How listing and explaining commands print.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Generate a root CA (ECDSA P-256) into DIR: `ca.crt` (0644, the agents' trust bundle)
    /// and `ca.key` (0600, for the broker's `nodeCa.keyFile` only). Never overwrites.
    Init {
        #[arg(long)]
        out: PathBuf,
        /// Validity of the root, days.
        #[arg(long, default_value_t = 3650)]
        days: u64,
        /// The root's common name.
        #[arg(long, default_value = "Paddock cluster root CA")]
        name: String,
    },
    /// List the node intermediates that have not expired and the barred nodes.
    List {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke one intermediate (`--serial`, e.g. its key was copied; the node may get a new
    /// one), or every intermediate of a node and bar it from new ones (`--node`, e.g. the node
    /// is compromised; lift with `ca unblock`). Node agents replace a revoked intermediate
    /// within their CRL check interval; verifiers that load the CRL refuse it at once.
    Revoke {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, conflicts_with = "node", required_unless_present = "node")]
        serial: Option<String>,
        #[arg(long)]
        node: Option<String>,
        /// Why (kept with the revocation).
        #[arg(long)]
        reason: String,
    },
    /// Let a barred node get intermediates again.
    Unblock {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        node: String,
    },
    /// Write the root's current revocation list (PEM) for verifiers that load CRLs.
    Crl {
        #[arg(long)]
        config: PathBuf,
        /// Output file (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Generate a key, append its hash to the keys file, print the key once.
    Add {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        namespace: String,
        /// Scope wire name, e.g. broker:issue (repeatable).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
    /// Read a key from stdin and print its SHA-256 (for hand-written keys files).
    Hash,
}

#[derive(Subcommand, Debug)]
#[expect(
    clippy::doc_markdown,
    reason = "clap prints these doc comments as help text, where backticks would show"
)]
enum PolicyCommand {
    /// Validate policy files or directories; exits non-zero on the first invalid one.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// What the policy would do with one request, and which grant decides; exits 1 when the
    /// request would be denied.
    Test {
        /// A policy file or directory.
        #[arg(long)]
        policy: PathBuf,
        /// The run, as NAMESPACE/RUN.
        #[arg(long)]
        run: String,
        /// The run's template (policies may apply to some templates only).
        #[arg(long)]
        template: Option<String>,
        /// The request: "[METHOD] URL", e.g. "GET https://api.github.com/user".
        request: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Turn denied and discovery-mode audit records (the broker's or the proxy's JSONL) into
    /// a BrokerPolicy snippet to review.
    Suggest {
        /// An audit trail (repeatable).
        #[arg(long = "from", required = true)]
        from: Vec<PathBuf>,
        /// The namespace of records that name none (the proxy's).
        #[arg(long, default_value = "default")]
        namespace: String,
        /// The suggested policies' name prefix.
        #[arg(long, default_value = "suggested")]
        name: String,
        /// Leave out hosts wanted fewer times than this.
        #[arg(long, default_value_t = 1)]
        min_count: usize,
    },
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Bring the schema up to date (`serve` does this too; run it first when several
    /// replicas share a `PostgreSQL` database and you want the upgrade under your eyes).
    Migrate {
        #[arg(long)]
        config: PathBuf,
    },
    /// Reach the database and compare its schema version with this binary's; exits non-zero
    /// when it is unreachable or not at the expected version. Changes nothing.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum SessionKeyCommand {
    /// Print the RSA session public key (PEM) that runs encrypt their run id with; creates
    /// the keypair if the config's auth.rsaSession.keyFile does not exist yet.
    Public {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum LeasesCommand {
    /// List leases (never bearers or secrets).
    List {
        /// Database path; or give --config.
        #[arg(long, conflicts_with = "config")]
        database: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        run: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

#[expect(
    clippy::too_many_lines,
    reason = "one match arm per subcommand; the work is in the functions they call"
)]
fn main() -> ExitCode {
    // Both rustls providers are compiled in (aws-lc for the proxy's TLS legs, ring for the
    // crates that name it), so rustls cannot pick a process default by itself: dependencies
    // that build default configs (kube's client, for one) need this. An error means one was
    // installed already.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    if let Command::Policy {
        command:
            PolicyCommand::Test {
                policy,
                run,
                template,
                request,
                output,
            },
    } = &cli.command
    {
        return policy_test(policy, run, template.as_deref(), request, *output).unwrap_or_else(
            |e| {
                eprintln!("paddock-broker: {e:#}");
                ExitCode::from(2)
            },
        );
    }
    let result = match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Controller { config } => controller(&config),
        Command::Keys {
            command:
                KeysCommand::Add {
                    file,
                    id,
                    namespace,
                    scopes,
                },
        } => keys_add(&file, &id, &namespace, &scopes),
        Command::Keys {
            command: KeysCommand::Hash,
        } => keys_hash(),
        Command::Policy {
            command: PolicyCommand::Check { files },
        } => policy_check(&files),
        Command::Policy {
            command: PolicyCommand::Test { .. },
        } => unreachable!("answered above"),
        Command::Policy {
            command:
                PolicyCommand::Suggest {
                    from,
                    namespace,
                    name,
                    min_count,
                },
        } => policy_suggest(&from, &namespace, &name, min_count),
        Command::Leases {
            command:
                LeasesCommand::List {
                    database,
                    config,
                    run,
                    output,
                },
        } => leases_list(database, config, run.as_deref(), output),
        Command::Check { config } => check(&config),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "paddock-broker",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { out } => man(&out),
        Command::SessionKey {
            command: SessionKeyCommand::Public { config },
        } => session_key_public(&config),
        Command::Store {
            command: StoreCommand::Migrate { config },
        } => store_migrate(&config),
        Command::Store {
            command: StoreCommand::Check { config },
        } => store_check(&config),
        Command::Prompt { target, text } => interact(async move {
            let text = if text == "-" {
                let mut buf = String::new();
                std::io::stdin().read_to_string(&mut buf)?;
                buf
            } else {
                text
            };
            interact_cli::prompt(&target, &text).await
        }),
        Command::Interrupt { target } => interact(async move {
            interact_cli::post(&target, "interrupt", None)
                .await
                .map(drop)
        }),
        Command::End { target } => {
            interact(async move { interact_cli::post(&target, "end", None).await.map(drop) })
        }
        Command::Attach { target } => interact(async move { interact_cli::attach(&target).await }),
        Command::Shell { target } => interact(async move { interact_cli::shell(&target).await }),
        Command::Ca {
            command: CaCommand::Init { out, days, name },
        } => ca_init(&out, days, &name),
        Command::Ca {
            command: CaCommand::List { config, output },
        } => ca_list(&config, output),
        Command::Ca {
            command:
                CaCommand::Revoke {
                    config,
                    serial,
                    node,
                    reason,
                },
        } => ca_revoke(&config, serial.as_deref(), node.as_deref(), &reason),
        Command::Ca {
            command: CaCommand::Unblock { config, node },
        } => ca_unblock(&config, &node),
        Command::Ca {
            command: CaCommand::Crl { config, out },
        } => ca_crl(&config, out.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("paddock-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one interactive client command on a small runtime.
fn interact(f: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(f)
}

fn ca_init(out: &Path, days: u64, name: &str) -> anyhow::Result<()> {
    if !(1..=36_500).contains(&days) {
        bail!("--days must be 1 .. 36500");
    }
    let (cert, key) = paddock_broker::node_ca::generate_root(
        name,
        std::time::Duration::from_secs(days.saturating_mul(86_400)),
    )?;
    paddock_broker::node_ca::write_root(out, &cert, &key)?;
    println!(
        "wrote {} and {} (the key never leaves the broker; agents trust the certificate)",
        out.join(paddock_broker::node_ca::ROOT_CERT_FILE).display(),
        out.join(paddock_broker::node_ca::ROOT_KEY_FILE).display()
    );
    Ok(())
}

/// The configured store, refused unless its schema is this binary's (nothing is migrated
/// behind the operator's back).
fn current_store(config: &Path) -> anyhow::Result<Store> {
    let store = Store::open_config_unmigrated(&Config::load(config)?.store_config()?)?;
    let found = store.schema_version()?;
    if found != SCHEMA_VERSION {
        bail!(
            "store schema version {found} is not {SCHEMA_VERSION}: run `paddock-broker store migrate --config {}`",
            config.display()
        );
    }
    Ok(store)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn ca_list(config: &Path, output: Output) -> anyhow::Result<()> {
    let store = current_store(config)?;
    let cas = store.node_cas(unix_now())?;
    let blocks = store.node_blocks()?;
    if output == Output::Json {
        let cas: Vec<_> = cas
            .iter()
            .map(|r| {
                serde_json::json!({
                    "serial": r.serial, "node": r.node, "notBefore": r.not_before,
                    "notAfter": r.not_after, "revokedAt": r.revoked_at, "reason": r.reason,
                })
            })
            .collect();
        let blocks: Vec<_> = blocks
            .iter()
            .map(|b| serde_json::json!({"node": b.node, "blockedAt": b.blocked_at, "reason": b.reason}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"intermediates": cas, "barredNodes": blocks})
            )?
        );
        return Ok(());
    }
    println!(
        "{:<34} {:<24} {:>11} {:>11} REVOKED",
        "SERIAL", "NODE", "NOT_BEFORE", "NOT_AFTER"
    );
    for r in &cas {
        let revoked = r.revoked_at.map_or_else(
            || "-".to_owned(),
            |at| format!("{at} ({})", r.reason.as_deref().unwrap_or_default()),
        );
        println!(
            "{:<34} {:<24} {:>11} {:>11} {revoked}",
            r.serial, r.node, r.not_before, r.not_after
        );
    }
    for b in &blocks {
        println!(
            "barred node {} since {}: {}",
            b.node, b.blocked_at, b.reason
        );
    }
    Ok(())
}

fn ca_revoke(
    config: &Path,
    serial: Option<&str>,
    node: Option<&str>,
    reason: &str,
) -> anyhow::Result<()> {
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > 200 {
        bail!("--reason must be 1 .. 200 characters");
    }
    let store = current_store(config)?;
    match (serial, node) {
        (Some(serial), _) => {
            let serial = serial.trim().to_ascii_lowercase().replace(':', "");
            if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("--serial must be the hex serial `ca list` shows");
            }
            if store.revoke_node_ca(&serial, unix_now(), reason)? {
                println!("revoked intermediate {serial}");
            } else if store.node_cas(0)?.iter().any(|r| r.serial == serial) {
                println!("intermediate {serial} was already revoked");
            } else {
                bail!("no intermediate with serial {serial} (see `paddock-broker ca list`)");
            }
        }
        (None, Some(node)) => {
            if !paddock_broker::auth::names::is_node_name(node) {
                bail!("--node {node:?} is not a node name");
            }
            let revoked = store.block_node(node, unix_now(), reason)?;
            println!(
                "node {node} is barred from new intermediates; revoked {} live one(s){}",
                revoked.len(),
                if revoked.is_empty() {
                    String::new()
                } else {
                    format!(": {}", revoked.join(", "))
                }
            );
        }
        (None, None) => bail!("give --serial or --node"),
    }
    Ok(())
}

fn ca_unblock(config: &Path, node: &str) -> anyhow::Result<()> {
    let store = current_store(config)?;
    if store.unblock_node(node)? {
        println!("node {node} may get intermediates again");
    } else {
        println!("node {node} was not barred");
    }
    Ok(())
}

fn ca_crl(config: &Path, out: Option<&Path>) -> anyhow::Result<()> {
    let loaded = Config::load(config)?;
    let node_ca = loaded
        .node_ca
        .as_ref()
        .context("the config has no nodeCa: there is no root to sign a CRL")?;
    let ca = paddock_broker::node_ca::NodeCa::load(node_ca)?;
    let store = current_store(config)?;
    let now = time::OffsetDateTime::now_utc();
    let revoked = paddock_broker::broker::revoked_node_cas(&store, now)?;
    let pem = paddock_broker::node_ca::crl_to_pem(&ca.crl(&revoked, now)?);
    match out {
        Some(path) => {
            std::fs::write(path, &pem).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {} ({} revoked)", path.display(), revoked.len());
        }
        None => print!("{pem}"),
    }
    Ok(())
}

fn serve(config_path: &Path) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Config::load(config_path)?;
    let mut built = config::build(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(async move {
        let broker = built.options.broker.clone();
        // The cluster audit writer runs before anything is served: without it every audited
        // operation would be refused.
        let (audit_stop, audit_stopped) = tokio::sync::oneshot::channel::<()>();
        let audit_writer = match built.audit_writer.take() {
            Some(writer) => {
                let client = kube::Client::try_default()
                    .await
                    .context("Kubernetes client for audit.kubernetes (in-cluster service account)")?;
                Some(tokio::spawn(writer.run(client, async move {
                    let _ = audit_stopped.await;
                })))
            }
            None => None,
        };
        let handle = server::spawn(built.options).await?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let reflector = match (&config.policy_kubernetes, &config.secrets_dir) {
            (Some(k), Some(dir)) => Some(spawn_policy_reflector(k, dir, &broker, stop_rx).await?),
            _ => None,
        };
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("SIGHUP handler")?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    if let Some(keys) = &built.static_keys {
                        match keys.reload() {
                            Ok(n) => tracing::info!(keys = n, "static keys reloaded"),
                            Err(e) => tracing::error!(error = %e, "static keys reload rejected; previous keys stay active"),
                        }
                    }
                    // Blocks until proxies dropped grants made under the old policy.
                    let b = broker.clone();
                    match tokio::task::spawn_blocking(move || b.reload_policy(false)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "policy reload rejected; previous policy stays active"),
                        Err(e) => tracing::error!(error = %e, "policy reload task failed"),
                    }
                }
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        if let Some(r) = reflector {
            let _ = r.await;
        }
        handle.shutdown().await;
        // Last: operations still answering during the shutdown need their records written.
        let _ = audit_stop.send(());
        if let Some(w) = audit_writer {
            let _ = w.await;
        }
        Ok(())
    })
}

/// This replica's name in the Lease: the pod name (downward API `POD_NAME`), else the host
/// name (a pod's host name is its name).
fn replica_identity() -> anyhow::Result<String> {
    if let Ok(name) = std::env::var("POD_NAME")
        && !name.trim().is_empty()
    {
        return Ok(name.trim().to_owned());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").context("host name")?;
    Ok(host.trim().to_owned())
}

fn controller(config_path: &Path) -> anyhow::Result<()> {
    use paddock_broker::cluster::controller::{
        self as ctl,
        broker_api::HttpBroker,
        config::ControllerConfig,
        lease::{self, LeaseLock},
    };
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("read {}", config_path.display()))?;
    let config = ControllerConfig::parse(&text)?;
    let lease_settings = config.lease_settings()?;
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()));
    let trust_ca = read(&config.trust.ca_file)?;
    let trust_bundle = config.trust.bundle_file.as_deref().map(read).transpose()?;
    let broker = HttpBroker::new(
        &config.broker.url,
        &config.broker.token_file,
        config.broker.ca_file.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let identity = replica_identity()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(async move {
        let client = kube::Client::try_default()
            .await
            .context("Kubernetes client (in-cluster service account)")?;
        let ctx = Arc::new(ctl::Context {
            recorder: kube::runtime::events::Recorder::new(
                client.clone(),
                kube::runtime::events::Reporter {
                    controller: "paddock-controller".into(),
                    instance: Some(identity.clone()),
                },
            ),
            client: client.clone(),
            broker: Arc::new(broker),
            settings: ctl::Settings {
                run_label: config.run_label.clone(),
                trust_ca,
                trust_bundle,
                resync: std::time::Duration::from_secs(config.resync_seconds),
            },
        });
        let lock = LeaseLock::new(
            kube::Api::namespaced(client, &config.leader_election.namespace),
            &config.leader_election.name,
            &identity,
            lease_settings,
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("SIGTERM handler")?;
        let metrics = Arc::new(ctl::admin::ControllerMetrics::new());
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        if let Some(addr) = config.admin_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("admin listener {addr}"))?;
            tracing::info!(%addr, "admin listener");
            tokio::spawn(ctl::admin::serve(
                listener,
                Arc::clone(&metrics),
                async move {
                    let _ = admin_stopped.await;
                },
            ));
        }
        tracing::info!(identity = %identity, "controller replica started");
        lease::lead(
            &lock,
            || {
                let leading = metrics.lead();
                let work = ctl::run(Arc::clone(&ctx), std::future::pending());
                async move {
                    let _leading = leading;
                    work.await;
                }
            },
            async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            },
        )
        .await;
        let _ = admin_stop.send(());
        tracing::info!("controller stopped");
        Ok(())
    })
}

/// Cluster mode: policies come from `BrokerPolicy` objects in every namespace.
async fn spawn_policy_reflector(
    k: &config::PolicyKubernetesConfig,
    secrets_dir: &Path,
    broker: &Arc<paddock_broker::Broker>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use paddock_broker::cluster::reflector::{self, ClusterPolicyOptions, PolicyTarget};
    let client = kube::Client::try_default()
        .await
        .context("Kubernetes client (in-cluster service account)")?;
    let options = ClusterPolicyOptions {
        admin_namespace: k.admin_namespace.clone(),
        secrets_dir: secrets_dir.to_owned(),
    };
    let target: Arc<dyn PolicyTarget> = broker.clone();
    Ok(tokio::spawn(reflector::run(
        kube::Api::all(client),
        options,
        target,
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
    )))
}

fn keys_add(file: &Path, id: &str, namespace: &str, scopes: &[String]) -> anyhow::Result<()> {
    let scopes = scopes
        .iter()
        .map(|s| Scope::parse(s).with_context(|| format!("unknown scope {s:?}")))
        .collect::<anyhow::Result<BTreeSet<_>>>()?;
    if let Ok(existing) = std::fs::read_to_string(file)
        && existing
            .lines()
            .any(|l| l.trim().split(':').next() == Some(id))
    {
        bail!("key id {id:?} already exists in {}", file.display());
    }
    let mut bytes = [0_u8; 32];
    rand::fill(&mut bytes[..]);
    let key = format!("pbk_{}", hex::encode(bytes));
    let line = format_line(id, &hash_key(&key), namespace, &scopes);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("open {}", file.display()))?;
    writeln!(f, "{line}").context("write keys file")?;
    println!("{key}");
    eprintln!(
        "added key {id} to {} (the key above is shown once)",
        file.display()
    );
    Ok(())
}

fn keys_hash() -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin()
        .take(64 * 1024)
        .read_to_string(&mut input)
        .context("read stdin")?;
    let key = input.trim_end_matches(['\r', '\n']);
    if key.is_empty() {
        bail!("no key on stdin");
    }
    println!("{}", hash_key(key));
    Ok(())
}

fn policy_check(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut failed = 0;
    for file in files {
        match Policy::load(file, time::OffsetDateTime::now_utc()) {
            Ok(p) => println!("{}: ok ({} policies)", file.display(), p.documents().len()),
            Err(e) => {
                println!("{e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} policy paths invalid", files.len());
    }
    Ok(())
}

/// Knows no run: printing the public key never authenticates anything.
#[derive(Debug)]
struct NoRuns;

impl RunDirectory for NoRuns {
    fn run_namespace(&self, _run_id: &str) -> Option<String> {
        None
    }
}

fn session_key_public(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let Some(rsa) = &config.auth.rsa_session else {
        bail!(
            "{}: auth.rsaSession is not configured",
            config_path.display()
        );
    };
    let key = RsaSessionAuthenticator::load_or_create(rsa, Arc::new(NoRuns))?;
    print!("{}", key.public_key_pem());
    Ok(())
}

fn store_migrate(config: &Path) -> anyhow::Result<()> {
    let store = Config::load(config)?.store_config()?;
    let version = Store::migrate_config(&store)?;
    println!("store migrated: schema version {version}");
    Ok(())
}

fn store_check(config: &Path) -> anyhow::Result<()> {
    let config = Config::load(config)?.store_config()?;
    let store = Store::open_config_unmigrated(&config)?;
    store.ping()?;
    let found = store.schema_version()?;
    println!(
        "store {}: reachable, schema version {found} (this broker: {SCHEMA_VERSION})",
        store.kind()
    );
    if found != SCHEMA_VERSION {
        bail!("schema version {found} is not {SCHEMA_VERSION}: run `paddock-broker store migrate`");
    }
    Ok(())
}

fn leases_list(
    database: Option<PathBuf>,
    config: Option<PathBuf>,
    run: Option<&str>,
    output: Output,
) -> anyhow::Result<()> {
    let store = match (database, config) {
        (Some(db), _) => StoreConfig::Sqlite(SqliteConfig { path: db }),
        (None, Some(cfg)) => Config::load(&cfg)?.store_config()?,
        (None, None) => bail!("give --database or --config"),
    };
    let store = Store::open_config_unmigrated(&store)?;
    let leases = match run {
        Some(r) => store.leases_for_run(r)?,
        None => store.all_leases()?,
    };
    if output == Output::Json {
        // One JSON document, the API's `LeasesResponse` shape (never bearers or secrets).
        let body = paddock_broker::wire::LeasesResponse { leases };
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    println!(
        "{:<28} {:<20} {:<16} {:<20} {:<18} {:>5} {:>11} REVOKED",
        "LEASE", "RUN", "NAMESPACE", "CREDENTIAL", "PROVIDER", "SLOT", "EXPIRES"
    );
    for l in leases {
        let slot = l
            .pool_slot
            .map_or_else(|| "-".to_owned(), |s| s.to_string());
        println!(
            "{:<28} {:<20} {:<16} {:<20} {:<18} {:>5} {:>11} {}",
            l.lease_id, l.run, l.namespace, l.credential, l.provider, slot, l.expires_at, l.revoked
        );
    }
    Ok(())
}

fn policy_test(
    policy: &Path,
    run: &str,
    template: Option<&str>,
    request: &str,
    output: Output,
) -> anyhow::Result<ExitCode> {
    use paddock_broker::policy::explain::{TestRequest, explain, run_info};
    let now = time::OffsetDateTime::now_utc();
    let loaded = Policy::load(policy, now)?;
    let run = run_info(run, template)?;
    let request = TestRequest::parse(request)?;
    let answer = explain(&loaded, &run, &request, now);
    match output {
        Output::Text => print!("{}", answer.render(&request, &run)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
    }
    Ok(if answer.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn policy_suggest(
    from: &[PathBuf],
    namespace: &str,
    name: &str,
    min_count: usize,
) -> anyhow::Result<()> {
    let mut suggestion = paddock_broker::policy::suggest::Suggestion::default();
    for file in from {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        suggestion.add_jsonl(&text, namespace);
    }
    print!("{}", suggestion.render(name, min_count.max(1)));
    Ok(())
}

fn check(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    for line in config::check(&config)? {
        println!("{line}");
    }
    println!("{}: ok", config_path.display());
    Ok(())
}

fn man(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    clap_mangen::generate_to(Cli::command(), out)
        .with_context(|| format!("writing man pages into {}", out.display()))?;
    println!("man pages written to {}", out.display());
    Ok(())
}
