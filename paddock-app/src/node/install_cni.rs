//! `paddock-proxy install-cni`: puts the `paddock-cni` plugin on a node, as the node agent's
//! `DaemonSet` does from an init container (and keeps it there from a second container).
//!
//! Two things change on the host, in this order:
//!
//! 1. the `paddock-cni` binary is copied into the CNI bin directory (a temporary file renamed
//!    into place, mode 0755, so a runtime never executes half a binary);
//! 2. the CNI configuration the runtime uses (the first `*.conf`, `*.conflist` or `*.json` file
//!    of the conf directory by name, which is what containerd and CRI-O pick) gets the entry
//!
//!    ```json
//!    {"type": "paddock-cni", "socket": "/run/paddock/node/pods.sock", "timeoutSeconds": 30}
//!    ```
//!
//!    as its LAST plugin, chained after the cluster's own plugins, so the pod's network exists
//!    when the node agent binds its listeners inside it. The file is rewritten atomically
//!    (temporary file, rename). A single-plugin `*.conf`/`*.json` file becomes a `*.conflist`
//!    of the same stem, as `libcni` itself converts one (`ConfListFromConf`); the original is
//!    kept next to it as `NAME.paddock-orig` (an extension no runtime reads) so `--uninstall`
//!    can put it back byte for byte.
//!
//! Installing is idempotent: with the entry already last and unchanged nothing is written. A
//! `paddock-cni` entry elsewhere in the list (or with other settings) is replaced, so the list
//! never holds two. No CNI configuration at all is an error, not something to invent: the
//! cluster's network plugin must be installed first. Malformed JSON is an error that changes
//! nothing.
//!
//! `--uninstall` removes the entry from every conflist that has one (restoring a converted
//! file from its `.paddock-orig` copy), then the binary.
//!
//! Which file the runtime reads changes when the cluster's network plugin rewrites its own
//! configuration (some do on every start). `--watch` repeats the installation, so an entry
//! dropped by such a rewrite is put back within one interval.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The plugin's `type` (and binary name) in the CNI configuration.
pub const PLUGIN_TYPE: &str = "paddock-cni";
/// The node agent's pod socket, as the plugin on the host sees it.
pub const DEFAULT_SOCKET: &str = "/run/paddock/node/pods.sock";
/// How long the plugin waits for the node agent per call.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 30;
/// Suffix of the kept original of a converted single-plugin file.
pub const ORIGINAL_SUFFIX: &str = ".paddock-orig";
/// The file extensions runtimes load CNI configuration from (libcni's `ConfFiles`).
const CNI_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];
/// Largest CNI configuration file read (they are a few KiB).
const MAX_CONF_BYTES: u64 = 1024 * 1024;

/// What to install.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// The host's CNI bin directory (as mounted), e.g. `/opt/cni/bin`.
    pub bin_dir: PathBuf,
    /// The host's CNI conf directory (as mounted), e.g. `/etc/cni/net.d`.
    pub conf_dir: PathBuf,
    /// The `paddock-cni` binary to copy.
    pub source_binary: PathBuf,
    /// The pod socket path written into the entry: a path on the HOST.
    pub socket: PathBuf,
    /// `timeoutSeconds` of the entry.
    pub timeout_seconds: u64,
}

/// What an installation or uninstallation did to the CNI configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfChange {
    /// The entry was already the last plugin, as configured: nothing written.
    Unchanged(PathBuf),
    /// The entry was added (or replaced) in this conflist.
    Inserted(PathBuf),
    /// A single-plugin file was converted into this conflist (the original kept aside).
    Converted { from: PathBuf, to: PathBuf },
    /// The entry was removed from these conflists.
    Removed(Vec<PathBuf>),
}

/// The outcome of [`install`] or [`uninstall`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Whether the binary in the bin directory was written (or removed).
    pub binary_changed: bool,
    pub conf: ConfChange,
}

impl Report {
    /// Whether anything on the host changed.
    #[must_use]
    pub fn changed(&self) -> bool {
        self.binary_changed
            || match &self.conf {
                ConfChange::Unchanged(_) => false,
                ConfChange::Removed(files) => !files.is_empty(),
                ConfChange::Inserted(_) | ConfChange::Converted { .. } => true,
            }
    }
}

/// Why the plugin could not be installed or removed. Nothing is half-written: each file is
/// replaced whole or left as it was.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "no CNI configuration (*.conf, *.conflist, *.json) in {0}: install the cluster's network \
         plugin first; paddock-cni is chained after it"
    )]
    NoConfig(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a usable CNI configuration: {reason} (nothing was changed)", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Conflict { path: PathBuf, reason: String },
    #[error("the socket path must be absolute (it is a path on the host), got {0}")]
    SocketNotAbsolute(PathBuf),
    #[error("timeoutSeconds must be 1 to 3600, got {0}")]
    BadTimeout(u64),
    #[error(
        "{} is not a bpffs mount: mount bpffs there on the host (systemd does at boot) and mount \
         it into the container; pins in a bpffs of the container's own would die with it and \
         release every pod's interception",
        .0.display()
    )]
    NotBpffs(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The CNI network-config entry for `paddock-cni`.
#[must_use]
pub fn plugin_entry(socket: &Path, timeout_seconds: u64) -> Value {
    serde_json::json!({
        "type": PLUGIN_TYPE,
        "socket": socket.display().to_string(),
        "timeoutSeconds": timeout_seconds,
    })
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Installs the binary, then the entry. See the module docs.
pub fn install(opts: &InstallOptions) -> Result<Report, InstallError> {
    if !opts.socket.is_absolute() {
        return Err(InstallError::SocketNotAbsolute(opts.socket.clone()));
    }
    if !(1..=3600).contains(&opts.timeout_seconds) {
        return Err(InstallError::BadTimeout(opts.timeout_seconds));
    }
    // Work out the new configuration before touching anything, so a broken one changes nothing.
    let first = first_config(&opts.conf_dir)?;
    let (parsed, read_bytes) = read_json_bytes(&first)?;
    let entry = plugin_entry(&opts.socket, opts.timeout_seconds);
    let plan = if has_extension(&first, "conflist") {
        plan_list(&first, parsed, &entry)?
    } else {
        plan_conversion(&first, &parsed, &entry)?
    };
    let binary_changed = install_binary(&opts.source_binary, &opts.bin_dir)?;
    let conf = match plan {
        Plan::Unchanged => ConfChange::Unchanged(first),
        Plan::Rewrite(list) => {
            // The network plugin may rewrite its file at any time: replace only what was read,
            // so its newer version is never lost (a watcher retries on the next round).
            if std::fs::read(&first).map_err(io(&first))? != read_bytes {
                return Err(InstallError::Conflict {
                    path: first,
                    reason: "changed while the entry was being added; try again".into(),
                });
            }
            write_atomically(&first, &to_bytes(&list), None)?;
            ConfChange::Inserted(first)
        }
        Plan::Convert { list, target } => convert(&first, &list, target)?,
    };
    // The runtime must now read a list that ends with the entry (a converted file could sort
    // after another one).
    let now_first = first_config(&opts.conf_dir)?;
    let plugins = read_json(&now_first)?
        .get("plugins")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if plugins.last() != Some(&entry) {
        return Err(InstallError::Conflict {
            path: now_first,
            reason: "the configuration the runtime reads first does not end with the \
                     paddock-cni entry after installing"
                .into(),
        });
    }
    Ok(Report {
        binary_changed,
        conf,
    })
}

/// Removes the entry from every conflist of `conf_dir`, then the binary from `bin_dir`.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Report, InstallError> {
    let mut removed = Vec::new();
    for path in config_files(conf_dir)? {
        if !has_extension(&path, "conflist") {
            continue;
        }
        let mut list = read_json(&path)?;
        let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() == before {
            continue;
        }
        if let Some(original) = converted_original(&path, &list)? {
            // Back to the file as it was: the original name sorts before the conflist, so the
            // runtime reads it from the moment it reappears; then the conflist goes.
            let name = original
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(ORIGINAL_SUFFIX))
                .map(|n| original.with_file_name(n))
                .ok_or_else(|| InstallError::Conflict {
                    path: original.clone(),
                    reason: "unexpected name".into(),
                })?;
            std::fs::rename(&original, &name).map_err(io(&original))?;
            std::fs::remove_file(&path).map_err(io(&path))?;
        } else {
            write_atomically(&path, &to_bytes(&list), None)?;
        }
        removed.push(path);
    }
    let target = bin_dir.join(PLUGIN_TYPE);
    let binary_changed = match std::fs::remove_file(&target) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io(&target)(e)),
    };
    Ok(Report {
        binary_changed,
        conf: ConfChange::Removed(removed),
    })
}

/// Fails unless `path` is a bpffs mount (where the node agent pins its programs).
pub fn check_bpffs(path: &Path) -> Result<(), InstallError> {
    let fs = nix::sys::statfs::statfs(path)
        .map_err(|e| io(path)(std::io::Error::from_raw_os_error(e as i32)))?;
    if fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC {
        Ok(())
    } else {
        Err(InstallError::NotBpffs(path.to_path_buf()))
    }
}

fn has_extension(path: &Path, ext: &str) -> bool {
    path.extension().is_some_and(|e| e == ext)
}

/// The CNI configuration files of `dir`, sorted by name as runtimes sort them.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let is_cni = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CNI_EXTENSIONS.contains(&e));
        // Follows symlinks, as the runtime's read does.
        if is_cni && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

fn first_config(dir: &Path) -> Result<PathBuf, InstallError> {
    config_files(dir)?
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConfig(dir.to_path_buf()))
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    read_json_bytes(path).map(|(v, _)| v)
}

/// The file parsed and as read.
fn read_json_bytes(path: &Path) -> Result<(Value, Vec<u8>), InstallError> {
    let malformed = |reason: String| InstallError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let len = std::fs::metadata(path).map_err(io(path))?.len();
    if len > MAX_CONF_BYTES {
        return Err(malformed(format!("larger than {MAX_CONF_BYTES} bytes")));
    }
    let bytes = std::fs::read(path).map_err(io(path))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| malformed(e.to_string()))?;
    if !value.is_object() {
        return Err(malformed("not a JSON object".into()));
    }
    if has_extension(path, "conflist") {
        let plugins = value
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed("a conflist needs a `plugins` array".into()))?;
        if plugins.iter().any(|p| !p.is_object()) {
            return Err(malformed("every plugin must be a JSON object".into()));
        }
    }
    Ok((value, bytes))
}

fn to_bytes(value: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(value).unwrap_or_default();
    out.push(b'\n');
    out
}

/// What installing does to the configuration the runtime reads.
enum Plan {
    Unchanged,
    Rewrite(Value),
    Convert { list: Value, target: PathBuf },
}

fn plan_list(path: &Path, mut list: Value, entry: &Value) -> Result<Plan, InstallError> {
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| InstallError::Malformed {
            path: path.to_path_buf(),
            reason: "a conflist needs a `plugins` array".into(),
        })?;
    if plugins.last() == Some(entry) && plugins.iter().filter(|p| is_ours(p)).count() == 1 {
        return Ok(Plan::Unchanged);
    }
    plugins.retain(|p| !is_ours(p));
    if plugins.is_empty() {
        return Err(InstallError::Malformed {
            path: path.to_path_buf(),
            reason: "no plugin before paddock-cni: it chains after the cluster's network plugin"
                .into(),
        });
    }
    plugins.push(entry.clone());
    Ok(Plan::Rewrite(list))
}

/// libcni's `ConfListFromConf`: the list takes the single plugin's `cniVersion` and `name`.
fn list_from_single(path: &Path, single: &Value) -> Result<Value, InstallError> {
    let malformed = |reason: &str| InstallError::Malformed {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    let obj = single
        .as_object()
        .ok_or_else(|| malformed("not a JSON object"))?;
    if obj.contains_key("plugins") {
        return Err(malformed(
            "has `plugins` but is not named *.conflist (runtimes would not read it as a list)",
        ));
    }
    if obj.get("type").and_then(Value::as_str).is_none() {
        return Err(malformed("a single-plugin configuration needs a `type`"));
    }
    if is_ours(single) {
        return Err(malformed("paddock-cni cannot be the only plugin"));
    }
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(v) = obj.get(key) {
            list.insert(key.to_owned(), v.clone());
        }
    }
    list.insert("plugins".to_owned(), Value::Array(vec![single.clone()]));
    Ok(Value::Object(list))
}

fn plan_conversion(path: &Path, single: &Value, entry: &Value) -> Result<Plan, InstallError> {
    let mut list = list_from_single(path, single)?;
    if let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) {
        plugins.push(entry.clone());
    }
    let target = path.with_extension("conflist");
    if target.exists() {
        return Err(InstallError::Conflict {
            path: target,
            reason: format!(
                "exists next to {}, which runtimes read first; cannot convert the latter",
                path.display()
            ),
        });
    }
    Ok(Plan::Convert { list, target })
}

/// Keeps the original aside, writes the conflist, then removes the original (until then the
/// runtime still reads the original, which sorts first).
fn convert(path: &Path, list: &Value, target: PathBuf) -> Result<ConfChange, InstallError> {
    let original = original_path(path);
    let bytes = std::fs::read(path).map_err(io(path))?;
    let mode = std::fs::metadata(path)
        .map_err(io(path))?
        .permissions()
        .mode()
        & 0o7777;
    write_atomically(&original, &bytes, Some(mode))?;
    write_atomically(&target, &to_bytes(list), Some(mode))?;
    std::fs::remove_file(path).map_err(io(path))?;
    Ok(ConfChange::Converted {
        from: path.to_path_buf(),
        to: target,
    })
}

fn original_path(single: &Path) -> PathBuf {
    let mut name = single.file_name().unwrap_or_default().to_os_string();
    name.push(ORIGINAL_SUFFIX);
    single.with_file_name(name)
}

/// The kept original of `conflist` (without the entry), if it was converted from one and still
/// says the same thing.
fn converted_original(
    conflist: &Path,
    without_entry: &Value,
) -> Result<Option<PathBuf>, InstallError> {
    for ext in ["conf", "json"] {
        let original = original_path(&conflist.with_extension(ext));
        if !original.exists() {
            continue;
        }
        let single = read_json(&original)?;
        if list_from_single(&original, &single).ok().as_ref() == Some(without_entry) {
            return Ok(Some(original));
        }
        // The list changed since (the network plugin rewrote it): keep the list, drop the
        // stale copy.
        std::fs::remove_file(&original).map_err(io(&original))?;
    }
    Ok(None)
}

/// Copies `source` into `bin_dir/paddock-cni` unless an identical 0755 file is there already.
fn install_binary(source: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    let bytes = std::fs::read(source).map_err(io(source))?;
    let target = bin_dir.join(PLUGIN_TYPE);
    if let (Ok(existing), Ok(meta)) = (std::fs::read(&target), std::fs::metadata(&target))
        && existing == bytes
        && meta.permissions().mode() & 0o7777 == 0o755
    {
        return Ok(false);
    }
    write_atomically(&target, &bytes, Some(0o755))?;
    Ok(true)
}

/// Writes `bytes` to a temporary file next to `path`, syncs it and renames it over `path`.
/// `mode`: the new file's permissions (default: those of the file replaced, else 0644).
fn write_atomically(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<(), InstallError> {
    let mode = mode.unwrap_or_else(|| {
        std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777)
    });
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(format!(".{}.paddock-tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path)(e));
    }
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "ipam": {"type": "calico-ipam"}, "mtu": 1440},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}"#;
    const BRIDGE_CONF: &str = r#"{"cniVersion": "1.0.0", "name": "mynet", "type": "bridge",
  "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}}
"#;

    struct Host {
        _dir: tempfile::TempDir,
        bin: PathBuf,
        conf: PathBuf,
        opts: InstallOptions,
    }

    fn host() -> Host {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("opt/cni/bin");
        let conf = dir.path().join("etc/cni/net.d");
        std::fs::create_dir_all(&bin).expect("bin");
        std::fs::create_dir_all(&conf).expect("conf");
        let source = dir.path().join("image/paddock-cni");
        std::fs::create_dir_all(source.parent().expect("dir")).expect("image");
        std::fs::write(&source, b"\x7fELF plugin v1").expect("source");
        let opts = InstallOptions {
            bin_dir: bin.clone(),
            conf_dir: conf.clone(),
            source_binary: source,
            socket: PathBuf::from(DEFAULT_SOCKET),
            timeout_seconds: DEFAULT_TIMEOUT_SECONDS,
        };
        Host {
            _dir: dir,
            bin,
            conf,
            opts,
        }
    }

    fn json(path: &Path) -> Value {
        serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json")
    }

    fn types(list: &Value) -> Vec<String> {
        list["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .map(|p| p["type"].as_str().expect("type").to_owned())
            .collect()
    }

    /// Every file of `dir` with its bytes, sorted by name.
    fn snapshot(dir: &Path) -> Vec<(std::ffi::OsString, Vec<u8>)> {
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| {
                let e = e.expect("entry");
                (e.file_name(), std::fs::read(e.path()).expect("read"))
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn installs_last_keeping_the_other_plugins_in_order_and_is_idempotent() {
        let h = host();
        std::fs::write(h.conf.join("10-calico.conflist"), CALICO).expect("write");
        // Sorts after the one runtimes read: left alone.
        std::fs::write(h.conf.join("99-loopback.conf"), BRIDGE_CONF).expect("write");

        let report = install(&h.opts).expect("install");
        assert_eq!(
            report,
            Report {
                binary_changed: true,
                conf: ConfChange::Inserted(h.conf.join("10-calico.conflist")),
            }
        );
        let list = json(&h.conf.join("10-calico.conflist"));
        assert_eq!(
            types(&list),
            ["calico", "portmap", "bandwidth", "paddock-cni"]
        );
        let original: Value = serde_json::from_str(CALICO).expect("json");
        assert_eq!(list["plugins"][0], original["plugins"][0], "kept as it was");
        assert_eq!(list["name"], "k8s-pod-network");
        assert_eq!(
            list["plugins"][3],
            serde_json::json!({"type": "paddock-cni", "socket": "/run/paddock/node/pods.sock",
                               "timeoutSeconds": 30})
        );
        assert_eq!(
            std::fs::read_to_string(h.conf.join("99-loopback.conf")).expect("read"),
            BRIDGE_CONF
        );
        let bin = h.bin.join("paddock-cni");
        assert_eq!(std::fs::read(&bin).expect("bin"), b"\x7fELF plugin v1");
        assert_eq!(
            std::fs::metadata(&bin).expect("meta").permissions().mode() & 0o7777,
            0o755
        );

        let before = (snapshot(&h.conf), snapshot(&h.bin));
        let again = install(&h.opts).expect("again");
        assert!(!again.changed(), "{again:?}");
        assert_eq!(
            again.conf,
            ConfChange::Unchanged(h.conf.join("10-calico.conflist"))
        );
        assert_eq!(
            (snapshot(&h.conf), snapshot(&h.bin)),
            before,
            "nothing rewritten"
        );
    }

    #[test]
    fn a_moved_or_outdated_entry_is_replaced_not_duplicated() {
        let h = host();
        let mut list: Value = serde_json::from_str(CALICO).expect("json");
        let plugins = list["plugins"].as_array_mut().expect("plugins");
        plugins.insert(
            1,
            serde_json::json!({"type": "paddock-cni", "socket": "/old.sock", "timeoutSeconds": 5}),
        );
        std::fs::write(h.conf.join("10-calico.conflist"), to_bytes(&list)).expect("write");
        let report = install(&h.opts).expect("install");
        assert!(matches!(report.conf, ConfChange::Inserted(_)), "{report:?}");
        let list = json(&h.conf.join("10-calico.conflist"));
        assert_eq!(
            types(&list),
            ["calico", "portmap", "bandwidth", "paddock-cni"]
        );
        assert_eq!(list["plugins"][3]["socket"], DEFAULT_SOCKET);
    }

    #[test]
    fn a_new_binary_replaces_the_old_one() {
        let h = host();
        std::fs::write(h.conf.join("10-calico.conflist"), CALICO).expect("write");
        install(&h.opts).expect("install");
        std::fs::write(&h.opts.source_binary, b"\x7fELF plugin v2").expect("v2");
        let report = install(&h.opts).expect("upgrade");
        assert!(report.binary_changed);
        assert_eq!(
            std::fs::read(h.bin.join("paddock-cni")).expect("bin"),
            b"\x7fELF plugin v2"
        );
        // No temporary file is left behind.
        assert_eq!(snapshot(&h.bin).len(), 1);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist_and_uninstall_restores_it() {
        let h = host();
        std::fs::write(h.conf.join("10-bridge.conf"), BRIDGE_CONF).expect("write");
        let before = snapshot(&h.conf);
        let report = install(&h.opts).expect("install");
        assert_eq!(
            report.conf,
            ConfChange::Converted {
                from: h.conf.join("10-bridge.conf"),
                to: h.conf.join("10-bridge.conflist"),
            }
        );
        assert!(
            !h.conf.join("10-bridge.conf").exists(),
            "runtimes would read it first"
        );
        let list = json(&h.conf.join("10-bridge.conflist"));
        assert_eq!(list["cniVersion"], "1.0.0");
        assert_eq!(list["name"], "mynet");
        assert_eq!(types(&list), ["bridge", "paddock-cni"]);
        let single: Value = serde_json::from_str(BRIDGE_CONF).expect("json");
        assert_eq!(
            list["plugins"][0], single,
            "the plugin as libcni converts it"
        );
        assert!(!install(&h.opts).expect("again").changed());

        let report = uninstall(&h.bin, &h.conf).expect("uninstall");
        assert_eq!(
            report,
            Report {
                binary_changed: true,
                conf: ConfChange::Removed(vec![h.conf.join("10-bridge.conflist")]),
            }
        );
        assert_eq!(snapshot(&h.conf), before, "byte for byte as before");
        assert!(snapshot(&h.bin).is_empty());
    }

    #[test]
    fn uninstall_restores_a_conflist_and_is_idempotent() {
        let h = host();
        std::fs::write(h.conf.join("10-calico.conflist"), CALICO).expect("write");
        install(&h.opts).expect("install");
        uninstall(&h.bin, &h.conf).expect("uninstall");
        assert_eq!(
            json(&h.conf.join("10-calico.conflist")),
            serde_json::from_str::<Value>(CALICO).expect("json")
        );
        assert!(!h.bin.join("paddock-cni").exists());
        let again = uninstall(&h.bin, &h.conf).expect("again");
        assert!(!again.changed(), "{again:?}");
    }

    #[test]
    fn no_configuration_is_a_clear_error_and_installs_nothing() {
        let h = host();
        std::fs::write(h.conf.join("README"), "not cni").expect("write");
        let err = install(&h.opts).expect_err("nothing to chain after");
        assert!(matches!(err, InstallError::NoConfig(_)), "{err}");
        assert!(err.to_string().contains("network plugin first"), "{err}");
        assert!(snapshot(&h.bin).is_empty(), "no binary without a config");
    }

    #[test]
    fn malformed_json_is_a_clear_error_that_changes_nothing() {
        let cases = [
            ("10-a.conflist", "{\"plugins\": [{\"type\": \"calico\"},"),
            ("10-a.conflist", "[1, 2]"),
            ("10-a.conflist", "{\"name\": \"x\"}"),
            ("10-a.conflist", "{\"plugins\": [\"calico\"]}"),
            ("10-a.conflist", "{\"plugins\": []}"),
            ("10-a.conf", "{\"name\": \"no type\"}"),
            ("10-a.conf", "{\"type\": \"paddock-cni\"}"),
            ("10-a.json", "{\"plugins\": [{\"type\": \"calico\"}]}"),
        ];
        for (name, text) in cases {
            let h = host();
            std::fs::write(h.conf.join(name), text).expect("write");
            let before = snapshot(&h.conf);
            let err = install(&h.opts).expect_err(text);
            assert!(
                matches!(err, InstallError::Malformed { .. }),
                "{text}: {err}"
            );
            assert!(err.to_string().contains(name), "{err}");
            assert_eq!(snapshot(&h.conf), before, "{text}: changed the config");
            assert!(snapshot(&h.bin).is_empty(), "{text}: copied the binary");
        }
    }

    #[test]
    fn bad_options_are_refused() {
        let h = host();
        std::fs::write(h.conf.join("10-calico.conflist"), CALICO).expect("write");
        let mut o = h.opts.clone();
        o.socket = PathBuf::from("run/pods.sock");
        assert!(matches!(
            install(&o),
            Err(InstallError::SocketNotAbsolute(_))
        ));
        let mut o = h.opts.clone();
        o.timeout_seconds = 0;
        assert!(matches!(install(&o), Err(InstallError::BadTimeout(0))));
        let mut o = h.opts.clone();
        o.source_binary = h.bin.join("missing");
        assert!(matches!(install(&o), Err(InstallError::Io { .. })));
        assert_eq!(
            std::fs::read_to_string(h.conf.join("10-calico.conflist")).expect("read"),
            CALICO
        );
    }

    #[test]
    fn a_conf_with_a_conflist_of_the_same_stem_is_not_overwritten() {
        let h = host();
        std::fs::write(h.conf.join("10-a.conf"), BRIDGE_CONF).expect("write");
        std::fs::write(h.conf.join("10-a.conflist"), CALICO).expect("write");
        let err = install(&h.opts).expect_err("conflict");
        assert!(matches!(err, InstallError::Conflict { .. }), "{err}");
        assert_eq!(
            std::fs::read_to_string(h.conf.join("10-a.conflist")).expect("read"),
            CALICO
        );
    }

    #[test]
    fn a_plain_directory_is_not_bpffs() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            check_bpffs(dir.path()),
            Err(InstallError::NotBpffs(_))
        ));
    }
}
