//! `--adapter-port N`: the command serves an interactive adapter on its own loopback, and the
//! embedded broker drives it (prompts, interrupt, end, output) through its interactive routes.
//!
//! The broker reaches the adapter the way `--publish` reaches a published port: a socket
//! created inside the command's network namespace connects to `127.0.0.1:N` there, so no port
//! is opened on the host for it. The address comes from this run's options, never from a
//! caller, and only this run's id is served. People reach the routes through a Unix socket in
//! the run's root-only state directory (`interact.sock`), authenticated by a key written next
//! to it (`interact.key`, mode 0600) or by the keys of `--interact-keys`.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use paddock_broker::{
    auth::{
        Scope,
        static_keys::{format_line, hash_key},
    },
    interactive::{AdapterConnector, AdapterError, AdapterFuture, AdapterIo},
    wire::RunInfo,
};
use paddock_proxy::netns::OwnedNetns;

use super::publish::socket_in;

/// How long connecting to the adapter may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The command's adapter, at `127.0.0.1:port` inside its network namespace.
#[derive(Debug)]
pub struct NetnsAdapter {
    pub netns: Arc<OwnedNetns>,
    /// The one run this adapter belongs to.
    pub run: String,
    pub port: u16,
}

impl AdapterConnector for NetnsAdapter {
    fn connect<'a>(&'a self, run: &'a RunInfo) -> AdapterFuture<'a> {
        Box::pin(async move {
            if run.run != self.run {
                return Err(AdapterError::NotConfigured(run.run.clone()));
            }
            let target = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
            let sock = socket_in(&*self.netns, target)
                .map_err(|e| AdapterError::Unreachable(format!("socket in the run: {e}")))?;
            match tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(target)).await {
                Ok(Ok(stream)) => Ok(Box::new(stream) as AdapterIo),
                Ok(Err(e)) => Err(AdapterError::Unreachable(format!(
                    "127.0.0.1:{} in the run: {e}",
                    self.port
                ))),
                Err(_) => Err(AdapterError::Timeout),
            }
        })
    }
}

/// The files of a run's interactive access, in its state directory.
#[derive(Debug, Clone)]
pub struct InteractFiles {
    pub socket: PathBuf,
    pub key: PathBuf,
    /// The key table the embedded broker loads (the generated key, plus `--interact-keys`).
    pub keys: PathBuf,
}

/// The scopes of the key written for the operator (with `shell`, `broker:shell` too).
pub fn operator_scopes(shell: bool) -> BTreeSet<Scope> {
    let mut scopes: BTreeSet<Scope> = [Scope::Interact, Scope::Attach, Scope::End]
        .into_iter()
        .collect();
    if shell {
        scopes.insert(Scope::Shell);
    }
    scopes
}

fn write_private(path: &Path, data: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::io::Write::write_all(&mut f, data.as_bytes())
}

/// Writes the operator's key (0600) and the key table the broker loads: that key with the
/// interactive scopes in `namespace` (and `broker:shell` with `shell`), then the lines of `extra` (a static keys file).
pub fn write_keys(
    state: &Path,
    namespace: &str,
    extra: Option<&Path>,
    shell: bool,
) -> std::io::Result<InteractFiles> {
    let files = InteractFiles {
        socket: state.join("interact.sock"),
        key: state.join("interact.key"),
        keys: state.join("interact-keys"),
    };
    let mut raw = [0_u8; 32];
    rand::fill(&mut raw[..]);
    let key = hex::encode(raw);
    write_private(&files.key, &format!("{key}\n"))?;
    let mut table = format_line(
        "run-operator",
        &hash_key(&key),
        namespace,
        &operator_scopes(shell),
    );
    table.push('\n');
    if let Some(extra) = extra {
        table.push_str(&std::fs::read_to_string(extra)?);
        table.push('\n');
    }
    write_private(&files.keys, &table)?;
    Ok(files)
}

/// Binds the interactive socket, root-only.
pub fn bind_socket(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
