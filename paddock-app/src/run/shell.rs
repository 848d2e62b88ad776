//! `run --shell`: a shell in the running command's sandbox for the broker's `/shell` route.
//!
//! The shell is started by the sandbox launcher in join mode ([`super::init`]): it enters the
//! agent cgroup, then every namespace of the sandbox's PID 1 through a pidfd, and confines
//! itself exactly as the command did (run user, never root; `no_new_privs`; the seccomp
//! filter; a pty from the sandbox's own devpts). Its traffic is intercepted like the
//! command's. Dropping the session kills it.
#![expect(
    unsafe_code,
    reason = "registering the pty master with tokio; the block has a SAFETY note"
)]

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use paddock_broker::{
    interactive::{AdapterIo, ShellError, ShellFuture, ShellOpener, ShellSession, TermSize},
    wire::RunInfo,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, unix::AsyncFd};

use super::{
    child::{Launch, spawn_sandboxed},
    init::set_window_size,
    spec::{PtySpec, SandboxSpec, WindowSize},
};

/// How long the launcher may take to hand over the shell's terminal.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens shells in one run's sandbox.
#[derive(Debug)]
pub struct RunShell {
    pub launcher: PathBuf,
    pub cgroup: PathBuf,
    /// The one run served.
    pub run: String,
    /// The command's spec: the shell gets its user, environment and working directory.
    pub spec: SandboxSpec,
    /// The sandbox launcher of the command (E); the sandbox's PID 1 is its only child.
    pub launcher_pid: u32,
}

/// The parent of `pid`, from `/proc/PID/status`.
fn parent_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A pidfd of the sandbox's PID 1: the process of the run's cgroup whose parent is the
/// launcher (checked again once the pidfd is held, so a recycled PID is never joined).
pub fn sandbox_init(cgroup: &Path, launcher_pid: u32) -> io::Result<OwnedFd> {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"))?;
    for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        if parent_of(pid) != Some(launcher_pid) {
            continue;
        }
        let Some(raw) = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0)) else {
            continue;
        };
        let Ok(fd) = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) else {
            continue;
        };
        if parent_of(pid) == Some(launcher_pid) {
            return Ok(fd);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "the command's sandbox is not running",
    ))
}

/// The shell's spec: the command's user, environment and directory, `/bin/sh` on a pty.
#[must_use]
pub fn shell_spec(command: &SandboxSpec, size: TermSize) -> SandboxSpec {
    let mut spec = command.clone();
    spec.program = b"/bin/sh".to_vec();
    spec.args = Vec::new();
    if !spec.env.iter().any(|(k, _)| k == b"TERM") {
        spec.env
            .push((b"TERM".to_vec(), b"xterm-256color".to_vec()));
    }
    spec.pty = Some(PtySpec {
        size: WindowSize {
            rows: size.rows,
            cols: size.cols,
        },
        stdio: [true; 3],
    });
    // The sandbox's files are in place already; the launcher writes nothing in join mode.
    spec.files = Vec::new();
    spec.resolv_conf = None;
    spec
}

impl ShellOpener for RunShell {
    fn open<'a>(&'a self, run: &'a RunInfo, size: TermSize) -> ShellFuture<'a> {
        Box::pin(async move {
            if run.run != self.run {
                return Err(ShellError::NotConfigured(run.run.clone()));
            }
            let init = sandbox_init(&self.cgroup, self.launcher_pid)
                .map_err(|e| ShellError::Failed(format!("the run's sandbox: {e}")))?;
            let spec = shell_spec(&self.spec, size);
            let (stream, resize) = open_joined(&self.launcher, &self.cgroup, init, &spec).await?;
            Ok(ShellSession {
                io: Box::new(stream) as AdapterIo,
                resize: Some(resize),
                user: format!("{} (uid {})", spec.user_name, spec.uid),
            })
        })
    }
}

/// Starts `spec` (a program on a pty) in the namespaces of the process `target` (a pidfd)
/// and in `cgroup`, through the launcher's join mode; returns the terminal and its resize
/// channel. Call it from a runtime worker thread: the launcher dies with the spawning thread
/// (parent-death signal), and workers live as long as the runtime.
pub async fn open_joined(
    launcher: &Path,
    cgroup: &Path,
    target: OwnedFd,
    spec: &SandboxSpec,
) -> Result<(PtyStream, tokio::sync::watch::Sender<TermSize>), ShellError> {
    // Every process of the session goes into a cgroup of its own below `cgroup` (so the
    // run's interception and limits still apply), and the whole cgroup is killed when the
    // session ends: the parent-death signal does not survive the shell's change of user, and
    // a `nohup` or `setsid` job must not outlive its audited session.
    let own = ShellCgroup::create(cgroup)
        .map_err(|e| ShellError::Failed(format!("the shell's cgroup: {e}")))?;
    let launch = Launch {
        launcher,
        cgroup: own.path(),
        netns: target.as_fd(),
        piped_stdout: false,
        join: true,
    };
    let mut sandbox =
        spawn_sandboxed(spec, &launch).map_err(|e| ShellError::Failed(e.to_string()))?;
    drop(target);
    let master = match tokio::time::timeout(START_TIMEOUT, sandbox.pty_master()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => {
            let _ = tokio::time::timeout(START_TIMEOUT, sandbox.child.wait()).await;
            return Err(ShellError::Failed(
                sandbox
                    .failure()
                    .unwrap_or_else(|| "the launcher exited".into()),
            ));
        }
        Ok(Err(e)) => return Err(ShellError::Failed(e.to_string())),
        Err(_) => return Err(ShellError::Failed("timed out".into())),
    };
    let stream = PtyStream::new(master, sandbox, own)
        .map_err(|e| ShellError::Failed(format!("the shell's terminal: {e}")))?;
    let size = spec.pty.map_or_else(TermSize::default, |p| TermSize {
        rows: p.size.rows,
        cols: p.size.cols,
    });
    let (tx, mut rx) = tokio::sync::watch::channel(size);
    let fd = Arc::clone(&stream.fd);
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let s = *rx.borrow_and_update();
            let _ = set_window_size(fd.get_ref().as_fd(), s.rows, s.cols);
        }
    });
    Ok((stream, tx))
}

/// The master side of the shell's pty as a byte stream. Holds the launcher: dropping the
/// stream kills it, and the shell with it. When the shell could not start after its terminal
/// was handed over (the user could not be taken, the program is missing), the launcher's
/// reason is the last line the stream carries.
#[derive(Debug)]
pub struct PtyStream {
    fd: Arc<AsyncFd<OwnedFd>>,
    launcher: super::child::Sandboxed,
    /// Whether the launcher's failure was looked for at the end.
    told: bool,
    /// Dropped after the launcher: kills what the session left behind.
    _cgroup: ShellCgroup,
}

/// A shell session's own cgroup: killed and removed when dropped.
#[derive(Debug)]
pub struct ShellCgroup {
    path: PathBuf,
}

impl ShellCgroup {
    /// `parent/paddock-shell-<random>`.
    pub fn create(parent: &Path) -> io::Result<Self> {
        let mut raw = [0u8; 8];
        rand::fill(&mut raw[..]);
        let path = parent.join(format!("paddock-shell-{}", hex::encode(raw)));
        std::fs::create_dir(&path)?;
        Ok(Self { path })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ShellCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        // The killed processes leave within moments; the directory goes once they have.
        let path = std::mem::take(&mut self.path);
        std::thread::spawn(move || {
            for _ in 0..100 {
                if std::fs::remove_dir(&path).is_ok() || !path.exists() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            tracing::warn!(cgroup = %path.display(), "a shell's cgroup could not be removed");
        });
    }
}

impl PtyStream {
    fn new(
        master: OwnedFd,
        launcher: super::child::Sandboxed,
        cgroup: ShellCgroup,
    ) -> io::Result<Self> {
        nix::fcntl::fcntl(
            &master,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        // SAFETY: an OwnedFd keeps its descriptor open and unchanged until the AsyncFd drops it.
        let fd = unsafe {
            AsyncFd::register_with_interest(
                master,
                tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
            )
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(Self {
            fd: Arc::new(fd),
            launcher,
            told: false,
            _cgroup: cgroup,
        })
    }
}

impl AsyncRead for PtyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) if n > 0 => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // 0 or EIO: every slave descriptor is closed, the shell is gone. Before the
                // end of the stream, the launcher's reason if it failed.
                Ok(Ok(_)) => {
                    this.last_words(buf);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => {
                    this.last_words(buf);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl PtyStream {
    /// Puts the launcher's failure, if it reported one, into `buf` (once).
    fn last_words(&mut self, buf: &mut ReadBuf<'_>) {
        if std::mem::replace(&mut self.told, true) {
            return;
        }
        if let Some(why) = self.launcher.failure() {
            let line = format!("\r\npaddock: {why}\r\n");
            let n = line.len().min(buf.remaining());
            buf.put_slice(&line.as_bytes()[..n]);
        }
    }
}

impl AsyncWrite for PtyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
