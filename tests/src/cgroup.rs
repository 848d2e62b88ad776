//! Uniquely named cgroups under the cgroup2 root, emptied and removed on drop.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use paddock_proxy::cgroup::Cgroup;

/// A fresh cgroup v2 directory.
#[derive(Debug)]
pub struct CgroupGuard {
    cgroup: Cgroup,
    /// The directories this guard created, outermost first; removed innermost first.
    created: Vec<PathBuf>,
}

impl CgroupGuard {
    #[must_use]
    pub fn new(tag: &str) -> Self {
        let root = paddock_proxy::ebpf::mounts::cgroup2_root().expect("cgroup2 mount");
        let path = root.join(format!("paddock-test-{}", crate::names::unique(tag)));
        std::fs::create_dir(&path).expect("create cgroup");
        Self {
            cgroup: Cgroup::open(&path).expect("open cgroup"),
            created: vec![path],
        }
    }

    /// A cgroup at `rel` below `parent`, creating the directories on the way (a kubelet
    /// layout: `kubepods.slice/.../pod.slice/container.scope`). It owns nothing: `parent`'s
    /// drop removes the whole tree below it, innermost first.
    #[must_use]
    pub fn nested(parent: &CgroupGuard, rel: &Path) -> Self {
        let path = parent.cgroup.path().join(rel);
        std::fs::create_dir_all(&path).expect("create cgroup");
        Self {
            cgroup: Cgroup::open(&path).expect("open cgroup"),
            created: Vec::new(),
        }
    }

    #[must_use]
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    #[must_use]
    pub fn procs_path(&self) -> PathBuf {
        self.cgroup.path().join("cgroup.procs")
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        for path in &self.created {
            // cgroup.kill (5.14+) ends every process left behind by a failed test, below too.
            let _ = std::fs::write(path.join("cgroup.kill"), "1");
            remove_tree(path);
        }
    }
}

/// Removes a cgroup and every cgroup below it, innermost first.
fn remove_tree(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        if std::fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: could not remove cgroup {}", path.display());
}
