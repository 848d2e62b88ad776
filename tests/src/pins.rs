//! A unique bpffs pin directory, removed (detaching everything pinned in it) on drop.

use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    #[must_use]
    pub fn new() -> Self {
        paddock_proxy::ebpf::mounts::ensure_bpffs().expect("bpffs");
        Self(PathBuf::from("/sys/fs/bpf/paddock-test").join(crate::names::unique("")))
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = paddock_proxy::ebpf::teardown(&self.0);
    }
}
