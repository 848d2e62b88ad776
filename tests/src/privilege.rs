//! The gate for root-only tests: under `CI=true` a missing capability fails the test; elsewhere
//! the test prints a loud SKIPPED line and returns.

use std::{io::Write, path::Path};

fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    match paddock_proxy::ebpf::mounts::cgroup2_root() {
        Ok(_) => {}
        Err(e) => return Some(e.to_string()),
    }
    if !Path::new("/sys/fs/bpf").exists() {
        return Some("/sys/fs/bpf is missing (no bpffs support)".into());
    }
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        return Some("`ip` (iproute2) is not installed: run `cargo xtask setup`".into());
    }
    None
}

/// Returns true when the test may run. Panics under `CI=true` when it may not.
#[must_use]
pub fn require_root(test: &str) -> bool {
    match missing() {
        None => true,
        Some(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: root-tier test cannot run under CI=true: {why}"
            );
            // Straight to the stderr handle: libtest captures eprintln!, and a skip must show.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: {why} (root tier; run `sudo cargo xtask test`)"
            );
            false
        }
    }
}
