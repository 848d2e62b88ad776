//! `paddock-proxy run -- COMMAND`: one agent command under Paddock on this machine.
//!
//! In order: check the policy; start the broker in-process (the same server code as
//! `paddock-broker serve`, called over its in-memory link) with a one-time caller key; register the run and issue its
//! placeholders; start the transparent proxy on loopback with the broker as its egress policy
//! and substituter; create the agent cgroup and attach the eBPF programs; run the command in
//! it as an unprivileged user with the run CA and its placeholders; then tear everything down
//! and exit with the command's code. Everything only Paddock may read (CA key, broker key,
//! database, caller key) lives in a 0700 root-only directory that is removed at the end; the
//! audit logs are kept.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use nix::sys::signal::Signal;
use paddock_broker::{
    auth::{Scope, static_keys},
    policy::Policy,
    secrets::SecretSource,
    wire::{IssueRequest, RunPhase, RunUpsertRequest},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
    SanType,
};

use super::{
    CaFiles, ChildError, SpawnSpec, UserError, child_env, env::write_ca_files, resolv,
    resolve_user, spawn_in_cgroup, supervise,
};
use crate::{
    broker::{BrokerClient, BrokerPolicy, BrokerSubstituter, DEFAULT_TIMEOUT},
    proxy::{ServeOptions, config::ServeConfig, serve_until},
};

/// The `SO_MARK` the proxy puts on its upstream sockets in `run` mode.
const BYPASS_MARK: u32 = 0x70ad;
/// How long the command gets to exit after a forwarded Ctrl-C / SIGTERM.
const GRACE: Duration = Duration::from_secs(10);

/// What `run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `BrokerPolicy` file or directory.
    pub policy: PathBuf,
    /// Base directory for relative `secret: {file: ...}` paths (default: the current one).
    pub secrets_dir: Option<PathBuf>,
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
    pub command: Vec<OsString>,
}

/// Why a run could not start or finish cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "paddock-proxy run needs root: it loads eBPF programs and creates a cgroup (try sudo; \
         the command itself runs as SUDO_USER or nobody)"
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

fn write_private(path: &Path, data: &[u8]) -> Result<(), RunError> {
    std::fs::write(path, data).map_err(io_err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err(path))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(buf.as_mut_slice());
    hex::encode(buf)
}

/// A CA and a `127.0.0.1`/`localhost` server certificate for the in-process broker.
fn broker_tls(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), RunError> {
    let fail = |e: rcgen::Error| RunError::Broker(format!("generating its TLS certificate: {e}"));
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Paddock local broker CA");
    let ca_cert = ca_params.self_signed(&ca_key).map_err(fail)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).map_err(fail)?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let cert = params.signed_by(&key, &issuer).map_err(fail)?;
    let (ca_path, cert_path, key_path) =
        (dir.join("ca.crt"), dir.join("tls.crt"), dir.join("tls.key"));
    write_private(&ca_path, ca_cert.pem().as_bytes())?;
    write_private(&cert_path, cert.pem().as_bytes())?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    Ok((ca_path, cert_path, key_path))
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

/// Pick a port free on both loopback addresses.
fn free_port() -> Result<u16, RunError> {
    for _ in 0..20 {
        let v4 = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| RunError::Proxy(format!("no free port: {e}")))?;
        let port = v4
            .local_addr()
            .map_err(|e| RunError::Proxy(e.to_string()))?
            .port();
        if std::net::TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(RunError::Proxy(
        "no port free on both 127.0.0.1 and [::1]".into(),
    ))
}

/// Everything created for the run, removed on drop (also on error paths).
struct Cleanup {
    state: PathBuf,
    public: PathBuf,
    cgroup: Option<PathBuf>,
    pin_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = crate::ebpf::teardown(&self.pin_dir);
        if let Some(cg) = &self.cgroup {
            super::child::kill_cgroup(cg);
            for _ in 0..50 {
                if std::fs::remove_dir(cg).is_ok() || !cg.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&self.public);
        // Secrets go; audit logs stay.
        for name in ["broker", "ca"] {
            let _ = std::fs::remove_dir_all(self.state.join(name));
        }
    }
}

/// Start the broker in-process with a one-time caller key, and an in-process client for it.
async fn start_broker(
    state: &Path,
    policy_path: &Path,
    secrets_dir: &Path,
    namespace: &str,
    substitute_rate: Option<u32>,
) -> Result<(paddock_broker::server::Handle, BrokerClient), RunError> {
    let broker_dir = state.join("broker");
    mkdir(&broker_dir, 0o700)?;
    let (_, broker_crt, broker_key) = broker_tls(&broker_dir)?;
    let caller_key = random_hex(32);
    let scopes: BTreeSet<Scope> = [
        Scope::Controller,
        Scope::Issue,
        Scope::Revoke,
        Scope::ValidateEgress,
        Scope::SubstituteAuth,
        Scope::LeasesRead,
    ]
    .into_iter()
    .collect();
    let keys_file = broker_dir.join("keys");
    let line = static_keys::format_line(
        "paddock-run",
        &static_keys::hash_key(&caller_key),
        namespace,
        &scopes,
    );
    write_private(&keys_file, format!("{line}\n").as_bytes())?;
    let bearer_file = broker_dir.join("caller.token");
    write_private(&bearer_file, caller_key.as_bytes())?;
    // YAML, as an operator would write it for `paddock-broker serve`: the same code path.
    let broker_yaml = broker_dir.join("broker.yaml");
    let mut yaml = serde_json::json!({
        "listen": "127.0.0.1:0",
        "tls": {"cert": broker_crt, "key": broker_key},
        "database": broker_dir.join("broker.db"),
        "policy": policy_path,
        "secretsDir": secrets_dir,
        "policyPollSeconds": 0.25,
        "audit": {"path": state.join("broker-audit.jsonl")},
        "auth": {"staticKeys": {"file": keys_file}},
    });
    if let Some(rate) = substitute_rate {
        yaml["rateLimits"] = serde_json::json!({
            "substitute": {"perSecond": rate, "burst": rate.saturating_mul(2)},
        });
    }
    // JSON is YAML.
    write_private(&broker_yaml, yaml.to_string().as_bytes())?;
    let broker_cfg = paddock_broker::config::Config::load(&broker_yaml)
        .map_err(|e| RunError::Broker(e.to_string()))?;
    let built =
        paddock_broker::config::build(&broker_cfg).map_err(|e| RunError::Broker(e.to_string()))?;
    let broker = paddock_broker::server::spawn(built.options)
        .await
        .map_err(|e| RunError::Broker(e.to_string()))?;
    // The proxy shares the broker's process: it calls the same server, routes and
    // authentication over an in-memory link, not loopback TCP and TLS on every substitution.
    // (The shared start-up still binds the loopback TLS listener; nothing in the run uses it.)
    let client = BrokerClient::local(broker.local_link(), bearer_file, DEFAULT_TIMEOUT)
        .map_err(|e| RunError::Broker(e.to_string()))?;

    Ok((broker, client))
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
        match &grant.secret {
            Some(SecretSource::Env(name)) => {
                secret_envs.insert(name.clone());
            }
            Some(SecretSource::File(path)) => check_secret_file(path)?,
            None => {}
        }
        let (Some(var), true) = (
            &grant.env,
            doc.doc
                .spec
                .applies_to
                .matches(&paddock_broker::wire::RunInfo {
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

/// Run the command under Paddock; returns the exit code to exit with.
#[expect(
    clippy::too_many_lines,
    reason = "one linear start-up and teardown sequence; splitting it further hides the order"
)]
pub async fn run(
    opts: RunOptions,
    interrupt: impl Future<Output = Signal>,
) -> Result<i32, RunError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(RunError::NotRoot);
    }
    let Some((program, args)) = opts.command.split_first() else {
        return Err(RunError::NoCommand);
    };
    let user = resolve_user(
        opts.user.as_deref(),
        std::env::var("SUDO_USER").ok().as_deref(),
    )?;
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

    let run_id = opts
        .run_id
        .clone()
        .unwrap_or_else(|| format!("run-{}", random_hex(4)));
    let state = opts.state_dir.join(&run_id);
    let public = opts.state_dir.join(format!("{run_id}-public"));
    mkdir(&opts.state_dir, 0o755)?;
    mkdir(&state, 0o700)?;
    mkdir(&public, 0o755)?;
    let mut cleanup = Cleanup {
        state: state.clone(),
        public: public.clone(),
        cgroup: None,
        pin_dir: PathBuf::from("/sys/fs/bpf/paddock").join(&run_id),
    };

    // 1. The broker, in-process.
    let (broker, client) = start_broker(
        &state,
        &policy_path,
        &secrets_dir,
        &opts.namespace,
        opts.substitute_rate,
    )
    .await?;

    // 2. The run and its placeholders.
    let run_info = RunUpsertRequest {
        run: run_id.clone(),
        namespace: opts.namespace.clone(),
        template: opts.template.clone(),
        phase: RunPhase::Running,
    };
    client
        .upsert_run(&run_info)
        .await
        .map_err(|e| RunError::Broker(format!("registering the run: {e}")))?;
    let (placeholders, secret_envs) = match issue_placeholders(&client, &policy, &run_info).await {
        Ok(v) => v,
        Err(e) => {
            broker.shutdown().await;
            return Err(e);
        }
    };

    // 3. The proxy on loopback, attached to a fresh agent cgroup.
    let cg_root =
        crate::ebpf::mounts::cgroup2_root().map_err(|e| RunError::Cgroup(e.to_string()))?;
    let cgroup = cg_root.join("paddock").join(&run_id);
    std::fs::create_dir_all(&cgroup).map_err(io_err(&cgroup))?;
    cleanup.cgroup = Some(cgroup.clone());
    let port = free_port()?;
    let resolvers = resolv::one_per_family(&resolv::nameservers(
        &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    ));
    let audit = opts
        .audit
        .clone()
        .unwrap_or_else(|| state.join("proxy-audit.jsonl"));
    let config = ServeConfig::local_run(
        &run_id,
        port,
        &state.join("ca"),
        &policy_path,
        &cgroup,
        &cleanup.pin_dir,
        &resolvers,
    )
    .with_network(
        &opts.allow_cidrs,
        &opts.nameservers,
        opts.use_hosts_file,
        Some(BYPASS_MARK),
    )
    .with_upstream_ca(opts.upstream_ca.clone());
    let mut serve = ServeOptions::new(config, Some(audit.display().to_string()));
    serve.policy = Some(Arc::new(BrokerPolicy::new(client.clone())));
    let metrics = Arc::new(crate::metrics::ProxyMetrics::new());
    serve.substituter = Some(Arc::new(
        BrokerSubstituter::new(client.clone())
            .with_metrics(Arc::clone(&metrics))
            .with_egress_recheck(crate::broker::DEFAULT_EGRESS_RECHECK),
    ));
    serve.metrics = Some(metrics);
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
            broker.shutdown().await;
            return Err(RunError::Proxy(why));
        },
        r = &mut proxy => {
            broker.shutdown().await;
            return Err(RunError::Proxy(match r { Ok(Err(e)) => e.to_string(), Ok(Ok(())) => "stopped early".into(), Err(e) => e.to_string() }));
        }
    }

    // 4. The command.
    let ca_pem = std::fs::read_to_string(state.join("ca/tls.crt"))
        .map_err(io_err(&state.join("ca/tls.crt")))?;
    let ca: CaFiles =
        write_ca_files(&public, &ca_pem, super::env::SYSTEM_BUNDLES).map_err(io_err(&public))?;
    let inherited =
        std::env::vars_os().filter(|(k, _)| !k.to_str().is_some_and(|k| secret_envs.contains(k)));
    let spec = SpawnSpec {
        program: program.clone(),
        args: args.to_vec(),
        env: child_env(inherited, &ca, &placeholders, &user),
        user,
        cgroup: cgroup.clone(),
        cwd: Some(cwd),
        piped_stdout: false,
    };
    tracing::info!(run = %run_id, port, placeholders = placeholders.len(), "starting the command");
    let outcome = match spawn_in_cgroup(&spec) {
        Ok(child) => supervise(child, &cgroup, interrupt, GRACE).await,
        Err(e) => Err(e),
    };

    // 5. Tear down: the run ends (its leases are revoked), then the proxy and broker stop.
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
    broker.shutdown().await;
    drop(cleanup);
    eprintln!(
        "paddock: run {run_id} finished; audit logs: {} and {}",
        audit.display(),
        state.join("broker-audit.jsonl").display()
    );
    Ok(outcome?.code)
}

#[cfg(test)]
mod tests {
    use super::*;

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
