//! Network namespaces created with `ip netns add` and deleted on drop.

use std::process::Command;

use paddock_proxy::netns::{NetnsEntry, NetnsError, NetnsPath};

/// Run `ip` with arguments; panics with the command's stderr on failure (tests only).
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A uniquely named network namespace, removed (with its interfaces) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: NetnsPath,
}

impl Netns {
    /// Create a namespace with loopback up.
    #[must_use]
    pub fn new(tag: &str) -> Self {
        let name = crate::names::unique(tag);
        ip(&["netns", "add", &name]);
        let ns = Self {
            path: NetnsPath::named(&name),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn path(&self) -> &NetnsPath {
        &self.path
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// Run a closure in this namespace (on a dedicated thread).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        self.path.run_in(f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
