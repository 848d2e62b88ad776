//! Starting the command in its sandbox inside the agent cgroup, and supervising it.
//!
//! `run` starts the sandbox launcher ([`super::init`], `paddock-proxy __sandbox`) with the spec
//! in a memfd, the command's network namespace, the write end of an error pipe and (for a
//! terminal) a socket the pty master comes back over. The launcher joins the agent cgroup
//! before it runs anything and is killed should `run` die first (parent-death signal); every
//! process of the sandbox inherits both.
#![expect(
    unsafe_code,
    reason = "Command::pre_exec is unsafe; the hook only makes raw syscalls"
)]

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::process::ExitStatusExt,
    },
    path::{Path, PathBuf},
    process::ExitStatus,
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};

use super::spec::SandboxSpec;

/// How to start the launcher.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// The `paddock-proxy` binary (`run` uses `/proc/self/exe`: exactly the running image).
    pub launcher: &'a Path,
    /// The agent cgroup directory; the launcher joins it before `exec`.
    pub cgroup: &'a Path,
    /// The command's network namespace; with `join`, a pidfd of the sandbox's PID 1.
    pub netns: BorrowedFd<'a>,
    /// Start the spec's program inside the running sandbox of `netns` (a shell) rather than
    /// a new sandbox.
    pub join: bool,
    /// Capture the command's stdout (tests, the demo) instead of sharing Paddock's.
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
    #[error("preparing the sandbox: {0}")]
    Setup(String),
    #[error("starting the sandbox launcher {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    /// A launcher stage failed; the text says which and why.
    #[error("{0}")]
    Sandbox(String),
    #[error("receiving the command's terminal: {0}")]
    Pty(String),
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

/// A started sandbox.
#[derive(Debug)]
pub struct Sandboxed {
    /// The launcher; its exit status is the command's.
    pub child: tokio::process::Child,
    errors: File,
    pty_socket: Option<OwnedFd>,
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> ChildError + '_ {
    move |e| ChildError::Setup(format!("{what}: {e}"))
}

/// Start the launcher for `spec`. Nothing of the command runs before the launcher has joined
/// the cgroup and confined itself; a failure there shows up as [`ChildError::Sandbox`] from
/// [`Sandboxed::failure`]. Call it from a thread that outlives the sandbox: the launcher's
/// parent-death signal fires when the spawning *thread* exits.
pub fn spawn_sandboxed(spec: &SandboxSpec, launch: &Launch<'_>) -> Result<Sandboxed, ChildError> {
    let procs_path = launch.cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .map_err(|source| ChildError::Cgroup {
            path: procs_path,
            source,
        })?;
    let spec_fd = nix::sys::memfd::memfd_create(
        "paddock-sandbox-spec",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    )
    .map_err(setup("memfd_create"))?;
    let mut spec_file = File::from(spec_fd);
    spec_file
        .write_all(&spec.encode().map_err(setup("encoding the spec"))?)
        .map_err(setup("writing the spec"))?;
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(setup("creating a pipe"))?;
    nix::fcntl::fcntl(
        &err_r,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(setup("error pipe"))?;
    let (ours, theirs) = if spec.pty.is_some() {
        let (a, b) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(setup("socketpair"))?;
        (Some(a), Some(b))
    } else {
        (None, None)
    };

    let mut cmd = std::process::Command::new(launch.launcher);
    cmd.arg("__sandbox")
        .arg("--spec")
        .arg(spec_file.as_raw_fd().to_string())
        .arg("--errors")
        .arg(err_w.as_raw_fd().to_string())
        .arg("--netns")
        .arg(launch.netns.as_raw_fd().to_string());
    if launch.join {
        cmd.arg("--join");
    }
    if let Some(t) = &theirs {
        cmd.arg("--pty-socket").arg(t.as_raw_fd().to_string());
    }
    // The launcher needs no environment; the command's comes in the spec.
    cmd.env_clear();
    // Descriptors the command gets its pty on are not handed to the sandbox at all: no
    // process in it ever holds the operator's terminal.
    let on_pty = spec.pty.map_or([false; 3], |p| p.stdio);
    if on_pty[0] {
        cmd.stdin(std::process::Stdio::null());
    }
    if on_pty[1] {
        cmd.stdout(std::process::Stdio::null());
    } else if launch.piped_stdout {
        cmd.stdout(std::process::Stdio::piped());
    }
    if on_pty[2] {
        cmd.stderr(std::process::Stdio::null());
    }
    let pass = [
        spec_file.as_raw_fd(),
        err_w.as_raw_fd(),
        launch.netns.as_raw_fd(),
        theirs.as_ref().map_or(-1, AsRawFd::as_raw_fd),
    ];
    let procs_fd = procs.as_raw_fd();
    // SAFETY: runs between fork and exec; it only issues write(2), fcntl(2) and prctl(2) on
    // descriptors and values prepared before the fork. It allocates nothing and takes no
    // locks.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            // "0" moves the writing process itself into the cgroup.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher inherits exactly these, by the numbers on its command line (the
            // child's descriptor table is its own: clearing the flag here changes nothing in
            // `run`). Everything else stays close-on-exec.
            for fd in pass {
                if fd >= 0 && libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // No command outlives `run`: the launcher dies with it, and it takes the rest.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ChildError::Spawn {
            program: launch.launcher.to_path_buf(),
            source,
        })?;
    // Only the launcher holds these now: EOF on the pty socket means it is gone.
    drop((procs, spec_file, err_w, theirs));
    Ok(Sandboxed {
        child,
        errors: File::from(err_r),
        pty_socket: ours,
    })
}

impl Sandboxed {
    /// The pty master the sandbox allocated, once it arrives; `None` when the launcher exited
    /// without sending one (its failure is then in [`Self::failure`]).
    pub async fn pty_master(&mut self) -> Result<Option<OwnedFd>, ChildError> {
        let Some(sock) = self.pty_socket.take() else {
            return Ok(None);
        };
        nix::fcntl::fcntl(
            &sock,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| ChildError::Pty(e.to_string()))?;
        // SAFETY: an OwnedFd keeps its descriptor open and unchanged until the AsyncFd drops it.
        let afd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(sock, tokio::io::Interest::READABLE)
        }
        .map_err(|e| ChildError::Pty(e.into_parts().1.to_string()))?;
        loop {
            let mut guard = afd
                .readable()
                .await
                .map_err(|e| ChildError::Pty(e.to_string()))?;
            match guard.try_io(|fd| recv_fd(fd.get_ref().as_fd()).map_err(std::io::Error::from)) {
                Ok(result) => return result.map_err(|e| ChildError::Pty(e.to_string())),
                Err(_would_block) => {}
            }
        }
    }

    /// What a launcher stage reported before failing, if anything (read after it exited).
    pub fn failure(&mut self) -> Option<String> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while buf.len() < 16 * 1024 {
            match self.errors.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let text = String::from_utf8_lossy(&buf).trim().to_owned();
        (!text.is_empty()).then_some(text)
    }
}

/// One descriptor over `SCM_RIGHTS`; `None` at end of stream.
fn recv_fd(sock: BorrowedFd<'_>) -> nix::Result<Option<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut received = None;
    for c in msg.cmsgs()? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor in our table for us.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if received.is_none() {
                    received = Some(owned);
                }
            }
        }
    }
    Ok(received)
}

/// Kill every process left in a cgroup (the command's own children included).
pub fn kill_cgroup(cgroup: &Path) {
    let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
}

/// Wait for the command. When `interrupt` resolves first (Ctrl-C, SIGTERM), forward the signal
/// to the command, give it `grace` to exit, then kill everything in its cgroup.
pub async fn supervise(
    child: &mut tokio::process::Child,
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
