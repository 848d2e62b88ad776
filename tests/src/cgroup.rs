//! Uniquely named cgroups under the cgroup2 root, emptied and removed on drop.

use std::{path::PathBuf, time::Duration};

use paddock_proxy::cgroup::Cgroup;

/// A fresh cgroup v2 directory.
#[derive(Debug)]
pub struct CgroupGuard {
    cgroup: Cgroup,
}

impl CgroupGuard {
    #[must_use]
    pub fn new(tag: &str) -> Self {
        let root = paddock_proxy::ebpf::mounts::cgroup2_root().expect("cgroup2 mount");
        let path = root.join(format!("paddock-test-{}", crate::names::unique(tag)));
        std::fs::create_dir(&path).expect("create cgroup");
        Self {
            cgroup: Cgroup::open(&path).expect("open cgroup"),
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
        let path = self.cgroup.path();
        // cgroup.kill (5.14+) ends every process left behind by a failed test.
        let _ = std::fs::write(path.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(path).is_ok() || !path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", path.display());
    }
}
