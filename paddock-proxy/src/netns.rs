//! Entering a network namespace for one operation, on a dedicated thread.
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread, and a socket belongs to the namespace
//! it was created in. So a listener for a pod is created on a short-lived thread that enters the
//! pod's namespace, binds, and hands the socket back; the runtime's threads never move
//! (the approach of istio/ztunnel's in-pod mode).

use std::{
    fs::File,
    path::{Path, PathBuf},
};

/// Run closures inside a network namespace.
pub trait NetnsEntry: Send + Sync + std::fmt::Debug {
    /// Run `f` with the calling thread's network namespace switched to this one.
    fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError>;
}

/// Errors entering a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening netns {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setns({path}): {source} (needs CAP_SYS_ADMIN)")]
    Setns { path: PathBuf, source: nix::Error },
    #[error("netns worker thread panicked")]
    Panicked,
}

/// A namespace named by a path (`/run/netns/NAME`, `/proc/PID/ns/net`).
#[derive(Debug, Clone)]
pub struct NetnsPath(PathBuf);

impl NetnsPath {
    #[must_use]
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    /// A namespace created by `ip netns add NAME`.
    #[must_use]
    pub fn named(name: &str) -> Self {
        Self(Path::new("/run/netns").join(name))
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl NetnsEntry for NetnsPath {
    fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        let path = self.0.clone();
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|source| NetnsError::Setns { path, source })?;
            Ok(f())
        })
        .join()
        .map_err(|_| NetnsError::Panicked)?
    }
}

/// The caller's own namespace: runs `f` in place. For tests and single-namespace deployments.
#[derive(Debug, Clone, Copy, Default)]
pub struct CurrentNetns;

impl NetnsEntry for CurrentNetns {
    fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        Ok(f())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_namespace_is_a_clear_error() {
        let err = NetnsPath::named("paddock-no-such-netns")
            .run_in(|| 1)
            .expect_err("missing");
        assert!(
            err.to_string().contains("/run/netns/paddock-no-such-netns"),
            "{err}"
        );
    }

    #[test]
    fn current_namespace_runs_in_place() {
        assert_eq!(CurrentNetns.run_in(|| 41 + 1).expect("runs"), 42);
    }
}
