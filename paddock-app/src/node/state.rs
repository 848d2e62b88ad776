//! Pod records on disk, so a restarted node agent serves the pods it served before (on the
//! same listener port, which the pinned eBPF config still names) and removes what went stale.
//!
//! One JSON file per pod under `state_dir/pods/` (root-only, 0700), written to a temporary
//! name and renamed, so a crash leaves the old record or the new one, never half of one.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::pod::PodSpec;
use paddock_proxy::pod_cgroup::PodUid;

/// What is remembered about a served pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodRecord {
    pub spec: PodSpec,
    /// The pod's listener port (in its namespace).
    pub port: u16,
    /// The pod cgroup's id, which keys its eBPF config and link pins.
    pub cgroup_id: u64,
}

/// Why the records could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("pod state {}: {source}", path.display())]
pub struct StateError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The record directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating, 0700) `state_dir/pods`.
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        let dir = state_dir.join("pods");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| StateError {
                path: dir.clone(),
                source,
            })?;
        Ok(Self { dir })
    }

    fn path(&self, uid: &PodUid) -> PathBuf {
        self.dir.join(format!("{uid}.json"))
    }

    /// Writes (or replaces) a pod's record.
    pub fn save(&self, record: &PodRecord) -> Result<(), StateError> {
        let path = self.path(&record.spec.uid);
        let tmp = self.dir.join(format!(".{}.tmp", record.spec.uid));
        let err = |source| StateError {
            path: path.clone(),
            source,
        };
        let json = serde_json::to_vec(record).map_err(|e| err(std::io::Error::other(e)))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(&json).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }

    /// Forgets a pod (no record is fine).
    pub fn remove(&self, uid: &PodUid) -> Result<(), StateError> {
        let path = self.path(uid);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError { path, source }),
        }
    }

    /// Every readable record; unreadable or foreign files are reported and skipped (they are
    /// never acted on), and left for an operator to look at.
    pub fn load(&self) -> Result<Vec<PodRecord>, StateError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| StateError {
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<PodRecord>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(r) if path.file_stem() == Some(r.spec.uid.as_str().as_ref()) => out.push(r),
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "pod record under another UID's name; ignored");
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable pod record; ignored");
                }
            }
        }
        out.sort_by(|a, b| a.spec.uid.cmp(&b.spec.uid));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn record(uid: &str, port: u16) -> PodRecord {
        PodRecord {
            spec: PodSpec {
                uid: PodUid::parse(uid).expect("uid"),
                namespace: "ns".into(),
                name: "p".into(),
                run: "r".into(),
                netns: "/run/netns/x".into(),
                nameservers: Vec::new(),
                adapter_port: None,
                shell: false,
            },
            port,
            cgroup_id: 42,
        }
    }

    #[test]
    fn records_survive_reopen_and_bad_files_are_skipped() {
        let dir = tempfile::tempdir().expect("dir");
        let state = StateDir::open(dir.path()).expect("open");
        let a = record("00000000-0000-0000-0000-00000000000a", 15001);
        let b = record("00000000-0000-0000-0000-00000000000b", 15002);
        state.save(&a).expect("save a");
        state.save(&b).expect("save b");
        let mut b2 = b.clone();
        b2.port = 15003;
        state.save(&b2).expect("replace b");
        std::fs::write(dir.path().join("pods/garbage.json"), b"{").expect("garbage");
        std::fs::write(
            dir.path()
                .join("pods/00000000-0000-0000-0000-00000000000c.json"),
            serde_json::to_vec(&a).expect("json"),
        )
        .expect("misnamed");
        let reopened = StateDir::open(dir.path()).expect("reopen");
        assert_eq!(reopened.load().expect("load"), [a.clone(), b2]);
        reopened.remove(&b.spec.uid).expect("remove");
        reopened.remove(&b.spec.uid).expect("remove twice");
        assert_eq!(reopened.load().expect("load"), [a]);
        let mode = std::fs::metadata(dir.path().join("pods"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
