//! cgroup v2 paths and ids.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// A cgroup v2 directory and its id (the directory's inode number, which is what
/// `bpf_get_current_cgroup_id` returns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
    id: u64,
}

/// Errors about cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a cgroup v2 directory (no cgroup.procs)")]
    NotCgroup { path: PathBuf },
    #[error("no cgroup v2 entry (`0::/...`) in /proc/self/cgroup")]
    NoUnifiedEntry,
    #[error(transparent)]
    Mount(#[from] crate::mounts::MountError),
}

impl Cgroup {
    /// Open an existing cgroup v2 directory.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, CgroupError> {
        let path = path.into();
        if !path.join("cgroup.procs").exists() {
            return Err(CgroupError::NotCgroup { path });
        }
        let id = std::fs::metadata(&path)
            .map_err(|source| CgroupError::Io {
                path: path.clone(),
                source,
            })?
            .ino();
        Ok(Self { path, id })
    }

    /// The cgroup this process runs in.
    pub fn current() -> Result<Self, CgroupError> {
        let path = PathBuf::from("/proc/self/cgroup");
        let text =
            std::fs::read_to_string(&path).map_err(|source| CgroupError::Io { path, source })?;
        let rel = unified_path(&text).ok_or(CgroupError::NoUnifiedEntry)?;
        let root = crate::mounts::cgroup2_root()?;
        Self::open(root.join(rel.trim_start_matches('/')))
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    #[must_use]
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// The cgroup v2 path (`0::/a/b` -> `/a/b`) from the contents of `/proc/<pid>/cgroup`.
#[must_use]
pub fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_entry_is_found_among_v1_lines() {
        let text = "12:cpu,cpuacct:/x\n0::/user.slice/session-1.scope\n1:name=systemd:/y\n";
        assert_eq!(unified_path(text), Some("/user.slice/session-1.scope"));
        assert_eq!(unified_path("0::/\n"), Some("/"));
        assert_eq!(unified_path("3:memory:/a\n"), None);
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Cgroup::open(dir.path()).expect_err("not a cgroup");
        assert!(matches!(err, CgroupError::NotCgroup { .. }), "{err}");
    }
}
