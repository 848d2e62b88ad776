//! Running a process inside a cgroup and a network namespace.
#![expect(
    unsafe_code,
    reason = "Command::pre_exec is unsafe; the hooks only make raw syscalls"
)]

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::{Command, Output},
};

use crate::{CgroupGuard, Netns};

/// Where to put a child process.
#[derive(Debug, Default)]
pub struct Placement<'a> {
    pub netns: Option<&'a Netns>,
    pub cgroup: Option<&'a CgroupGuard>,
    /// Drop to this uid/gid (with no supplementary groups) after entering the above.
    pub user: Option<u32>,
}

impl<'a> Placement<'a> {
    /// In `ns`, in this process's cgroup, as this user.
    #[must_use]
    pub fn netns(ns: &'a Netns) -> Self {
        Self {
            netns: Some(ns),
            ..Self::default()
        }
    }
}

/// Prepare `cmd` to start in the given namespace and cgroup. The files are opened here, in the
/// parent; the child only calls `setns(2)` and `write(2)`, which are async-signal-safe.
pub fn place(cmd: &mut Command, at: &Placement<'_>) {
    let ns: Option<File> = at
        .netns
        .map(|n| File::open(n.path().path()).expect("open netns"));
    let procs: Option<File> = at.cgroup.map(|c| {
        OpenOptions::new()
            .write(true)
            .open(c.procs_path())
            .expect("open cgroup.procs")
    });
    let user = at.user;
    // SAFETY: the closure runs between fork and exec. It only issues setns(2), write(2) and the
    // set*id(2) calls on descriptors and values prepared before the fork; it allocates nothing
    // and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(f) = &procs {
                // "0" moves the writing process itself.
                let rc = libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1);
                if rc != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(f) = &ns
                && libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // Last: entering the namespace and the cgroup needs the privileges dropped here.
            if let Some(id) = user
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(id) != 0
                    || libc::setuid(id) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Let the child of `cmd` (only it) inherit descriptors: each `(from, to)` is duplicated to
/// number `to` without close-on-exec, the way a careless launcher leaks a socket or a file.
pub fn inherit_fds(cmd: &mut Command, fds: &[(std::os::fd::RawFd, std::os::fd::RawFd)]) {
    let fds = fds.to_vec();
    // SAFETY: between fork and exec; only dup2(2) on descriptors open in the parent.
    unsafe {
        cmd.pre_exec(move || {
            for &(from, to) in &fds {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Path of a binary built next to the running executable: `target/<profile>/NAME`, found
/// from a test (`target/<profile>/deps/test-xxxx`) or from another binary.
#[must_use]
pub fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    let candidates = [
        dir.join(name),
        dir.parent().map(|d| d.join(name)).unwrap_or_default(),
    ];
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not built next to {}: run the tests with `cargo xtask test` (it builds \
             every binary)",
                exe.display()
            )
        })
}

/// Run the test client with `args` at `at`, returning its parsed JSON output.
pub fn client(args: &[&str], at: &Placement<'_>) -> serde_json::Value {
    let out = run(Command::new(client_path()).args(args), at);
    assert!(
        out.status.success(),
        "pdk-client {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pdk-client {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The test client's path (a binary of this package: cargo builds it for the tests).
#[must_use]
pub fn client_path() -> PathBuf {
    target_bin("pdk-client")
}

/// Run a command to completion at a placement.
pub fn run(cmd: &mut Command, at: &Placement<'_>) -> Output {
    place(cmd, at);
    cmd.output().expect("spawn")
}

/// Write to a file, panicking with the path on failure (tests only).
pub fn write_file(path: &std::path::Path, data: &str) {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all(data.as_bytes())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A child process that is stopped when dropped (a test that fails midway leaves nothing
/// running): SIGTERM, up to 10 s to exit, then SIGKILL, and reaped.
#[derive(Debug)]
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            if let Ok(pid) = i32::try_from(self.0.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while matches!(self.0.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
