//! Starting the command inside the agent cgroup as the run user, and supervising it.
#![expect(
    unsafe_code,
    reason = "Command::pre_exec is unsafe; the hook only makes raw syscalls"
)]

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs::OpenOptions,
    os::{fd::AsRawFd, unix::process::ExitStatusExt},
    path::{Path, PathBuf},
    process::ExitStatus,
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};

use super::RunUser;

/// What to start.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// The complete environment (nothing else is inherited).
    pub env: BTreeMap<OsString, OsString>,
    pub user: RunUser,
    /// The agent cgroup directory; the child joins it before `exec`.
    pub cgroup: PathBuf,
    pub cwd: Option<PathBuf>,
    /// Capture stdout (tests, the demo) instead of sharing Paddock's.
    pub piped_stdout: bool,
}

/// Failures starting or supervising the command.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("opening {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting {program:?}: {source}")]
    Spawn {
        program: OsString,
        source: std::io::Error,
    },
    #[error("waiting for the command: {0}")]
    Wait(std::io::Error),
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitOutcome {
    /// The exit code Paddock itself exits with: the command's, or 128 + signal number.
    pub code: i32,
    /// A signal Paddock received and forwarded, if any.
    pub interrupted_by: Option<Signal>,
}

/// Exit code for a wait status, the way shells report it.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Spawn the command: in the child, join the cgroup, drop to the run user, and ask for
/// SIGKILL should Paddock die first (no command outlives its proxy).
pub fn spawn_in_cgroup(spec: &SpawnSpec) -> Result<tokio::process::Child, ChildError> {
    let procs_path = spec.cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .map_err(|source| ChildError::Cgroup {
            path: procs_path,
            source,
        })?;
    let mut cmd = std::process::Command::new(&spec.program);
    cmd.args(&spec.args).env_clear().envs(&spec.env);
    if let Some(dir) = &spec.cwd {
        cmd.current_dir(dir);
    }
    let (uid, gid) = (spec.user.uid.as_raw(), spec.user.gid.as_raw());
    // SAFETY: runs between fork and exec; it only issues write(2), setgroups(2), setgid(2),
    // setuid(2) and prctl(2) with values and a descriptor prepared before the fork. It
    // allocates nothing and takes no locks.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            // "0" moves the writing process itself into the cgroup.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            let groups = [gid];
            if libc::setgroups(1, groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // After setuid: a credential change clears the parent-death signal.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if spec.piped_stdout {
        cmd.stdout(std::process::Stdio::piped());
    }
    tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ChildError::Spawn {
            program: spec.program.clone(),
            source,
        })
}

/// Kill every process left in a cgroup (the command's own children included).
pub fn kill_cgroup(cgroup: &Path) {
    let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
}

/// Wait for the command. When `interrupt` resolves first (Ctrl-C, SIGTERM), forward the signal
/// to the command, give it `grace` to exit, then kill everything in its cgroup.
pub async fn supervise(
    mut child: tokio::process::Child,
    cgroup: &Path,
    interrupt: impl Future<Output = Signal>,
    grace: Duration,
) -> Result<ExitOutcome, ChildError> {
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(Pid::from_raw);
    let outcome = tokio::select! {
        status = child.wait() => ExitOutcome { code: exit_code(status.map_err(ChildError::Wait)?), interrupted_by: None },
        sig = interrupt => {
            if let Some(pid) = pid {
                let _ = nix::sys::signal::kill(pid, sig);
            }
            let status = if let Ok(s) = tokio::time::timeout(grace, child.wait()).await {
                s.map_err(ChildError::Wait)?
            } else {
                tracing::warn!(grace_secs = grace.as_secs(), "command ignored the signal: killing its cgroup");
                kill_cgroup(cgroup);
                child.wait().await.map_err(ChildError::Wait)?
            };
            ExitOutcome { code: exit_code(status), interrupted_by: Some(sig) }
        }
    };
    // Whatever the command left running in its cgroup goes with it.
    kill_cgroup(cgroup);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_shell_conventions() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 128 + 15);
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
    }
}
