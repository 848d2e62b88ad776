//! Policy files on disk and the reloading store that serves the active policy.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use arc_swap::ArcSwap;
use time::OffsetDateTime;

use super::{Policy, PolicyError};

impl Policy {
    /// Loads one file or every `*.yaml`/`*.yml` file of a directory.
    pub fn load(path: &Path, now: OffsetDateTime) -> Result<Self, PolicyError> {
        let mut docs = Vec::new();
        for file in policy_files(path)? {
            let text = std::fs::read_to_string(&file).map_err(|e| PolicyError {
                file: file.clone(),
                line: None,
                field: String::new(),
                message: format!("cannot read: {e}"),
            })?;
            docs.extend(Self::parse_text(&file, &text, now)?);
        }
        Self::from_docs(docs)
    }

    /// Loads the policy at `path` and resolves relative secret files against `secrets_dir`.
    pub fn load_with(
        path: &Path,
        secrets_dir: Option<&Path>,
        now: OffsetDateTime,
    ) -> Result<Self, PolicyError> {
        let policy = Self::load(path, now)?;
        match secrets_dir {
            Some(dir) => policy.with_secrets_dir(dir),
            None => Ok(policy),
        }
    }
}

fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let io_err = |e: std::io::Error| PolicyError {
        file: path.to_owned(),
        line: None,
        field: String::new(),
        message: format!("cannot read: {e}"),
    };
    let meta = std::fs::metadata(path).map_err(io_err)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io_err)? {
        let p = entry.map_err(io_err)?.path();
        let is_yaml = p.extension().is_some_and(|e| e == "yaml" || e == "yml");
        // Skip editor and Kubernetes ConfigMap dot-files (..data symlink farms).
        let hidden = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if is_yaml && !hidden && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Change detector for the policy path: every file with its mtime and length.
fn signature(path: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    policy_files(path)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let mtime = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map_or(0, |m| m.len());
            (f, mtime, len)
        })
        .collect()
}

/// The active policy, reloaded on change. A broken new policy never replaces a good one.
#[derive(Debug)]
pub struct PolicyStore {
    path: Option<PathBuf>,
    secrets_dir: Option<PathBuf>,
    current: ArcSwap<Policy>,
    last_signature: Mutex<Vec<(PathBuf, Option<SystemTime>, u64)>>,
    last_error: Mutex<Option<PolicyError>>,
    /// False while the policy waits for its source's first answer (cluster mode before the
    /// first list of `BrokerPolicy` objects): the broker is not ready then.
    synced: std::sync::atomic::AtomicBool,
}

impl PolicyStore {
    /// Loads the policy at `path`; fails if it is invalid (the broker does not start on a
    /// broken policy).
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        Self::load_with(path, None)
    }

    /// As [`PolicyStore::load`], resolving relative secret files against `secrets_dir` (also
    /// on every reload).
    pub fn load_with(path: &Path, secrets_dir: Option<&Path>) -> Result<Self, PolicyError> {
        let sig = signature(path);
        let policy = Policy::load_with(path, secrets_dir, OffsetDateTime::now_utc())?;
        Ok(Self {
            path: Some(path.to_owned()),
            secrets_dir: secrets_dir.map(Path::to_path_buf),
            current: ArcSwap::from_pointee(policy),
            last_signature: Mutex::new(sig),
            last_error: Mutex::new(None),
            synced: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// A fixed policy (embedded mode, tests); never reloads.
    #[must_use]
    pub fn fixed(policy: Policy) -> Self {
        Self {
            path: None,
            secrets_dir: None,
            current: ArcSwap::from_pointee(policy),
            last_signature: Mutex::new(Vec::new()),
            last_error: Mutex::new(None),
            synced: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// An empty policy that grants nothing until a source calls [`Self::mark_synced`]
    /// (cluster mode: the `BrokerPolicy` reflector).
    #[must_use]
    pub fn awaiting_sync() -> Self {
        let store = Self::fixed(Policy::default());
        store
            .synced
            .store(false, std::sync::atomic::Ordering::Release);
        store
    }

    /// The policy's source gave its first complete answer.
    pub fn mark_synced(&self) {
        self.synced
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether the policy reflects its source (see [`Self::awaiting_sync`]).
    #[must_use]
    pub fn is_synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    #[must_use]
    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    /// Replaces the policy (embedded mode).
    pub fn replace(&self, policy: Policy) {
        self.current.store(Arc::new(policy));
    }

    /// The error of the last failed reload, if the newest files are broken.
    #[must_use]
    pub fn last_error(&self) -> Option<PolicyError> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Reloads if any file changed. Returns `Ok(true)` when a new policy became active;
    /// on error the previous policy stays active.
    pub fn reload_if_changed(&self) -> Result<bool, PolicyError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let sig = signature(path);
        {
            let Ok(mut last) = self.last_signature.lock() else {
                return Ok(false);
            };
            if *last == sig {
                return Ok(false);
            }
            *last = sig;
        }
        self.reload()
    }

    /// Reloads unconditionally.
    pub fn reload(&self) -> Result<bool, PolicyError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let result =
            Policy::load_with(path, self.secrets_dir.as_deref(), OffsetDateTime::now_utc());
        let mut last_error = self.last_error.lock().ok();
        match result {
            Ok(policy) => {
                self.current.store(Arc::new(policy));
                if let Some(e) = last_error.as_mut() {
                    **e = None;
                }
                Ok(true)
            }
            Err(e) => {
                if let Some(slot) = last_error.as_mut() {
                    **slot = Some(e.clone());
                }
                Err(e)
            }
        }
    }
}
