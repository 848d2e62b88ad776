//! The sandbox launcher, `paddock-proxy __sandbox`: the processes between `run` and the
//! command.
//!
//! `run` (multi-threaded, tokio) starts this program in the agent cgroup with the spec in a
//! memfd and a few descriptors, then three single-threaded processes follow:
//!
//! * **E** (this program, root, in the host PID namespace): keeps only the descriptors it was
//!   given, reads the spec, enters the command's network namespace, unshares PID, mount and
//!   IPC namespaces, forks C, forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to it and
//!   exits with its status.
//! * **C** (root, PID 1 of the new PID namespace): makes every mount private, mounts a fresh
//!   `/proc` (host processes disappear, `/proc/PID/mem` of anything outside included), tmpfs on
//!   `/tmp`, `/var/tmp`, `/dev/shm` and `/run` (the host's X11, tmux, ssh-agent, D-Bus,
//!   systemd-resolved and nscd sockets live there), a new `devpts` instance (the operator's
//!   terminals are not in it), writes the CA files, resolv.conf and (for a per-run uid) passwd
//!   and group entries into [`SANDBOX_DIR`], allocates the pseudo-terminal when asked, forks D,
//!   forwards signals to D's process group, reaps every orphan and exits with D's status
//!   (PID 1 exiting kills what is left in the namespace).
//! * **D**: new session (no controlling terminal but the sandbox's pty), drops to the run
//!   user, enters the working directory, marks every descriptor above 2 close-on-exec,
//!   sets `no_new_privs`, installs the seccomp filter ([`super::seccomp`]) and `execve`s the
//!   command.
//!
//! A failure at any step is written, as one line, to the error pipe `run` holds (it is
//! close-on-exec, so the command never has it) and the process exits with [`FAILED`]; `run`
//! reports the line and exits 125. The launcher never runs a command it could not confine.
#![expect(
    unsafe_code,
    reason = "fork, adopting inherited descriptors, close_range and terminal ioctls; each block \
              has its own SAFETY note"
)]

use std::{
    ffi::CString,
    fs::File,
    io::{Read, Seek, Write},
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{
            ffi::OsStrExt,
            fs::{DirBuilderExt, PermissionsExt},
        },
    },
    path::Path,
};

use nix::{
    errno::Errno,
    fcntl::{FcntlArg, FdFlag, OFlag},
    mount::MsFlags,
    sched::CloneFlags,
    sys::{
        signal::{SigHandler, SigSet, SigmaskHow, Signal},
        stat::Mode,
        wait::{WaitPidFlag, WaitStatus},
    },
    unistd::{ForkResult, Gid, Pid, Uid},
};

use super::{
    seccomp::{self, Filters, SeccompError},
    spec::{MAX_SPEC_BYTES, SANDBOX_DIR, SandboxSpec, SpecError},
};

/// Exit status of a launcher stage that failed (the reason is on the error pipe).
pub const FAILED: i32 = 125;

/// Signals passed down to the command; everything else keeps its default action.
pub const FORWARDED: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Mounts the sandbox puts over the host's, with their root directory mode.
const PRIVATE_TMPFS: [(&str, &str); 4] = [
    ("/tmp", "1777"),
    ("/var/tmp", "1777"),
    ("/dev/shm", "1777"),
    ("/run", "0755"),
];

/// The descriptors the launcher inherits, by number (`--spec FD ...`).
#[derive(Debug, Clone, Copy)]
pub struct LauncherFds {
    /// The memfd holding the JSON spec.
    pub spec: RawFd,
    /// Write end of the error pipe.
    pub errors: RawFd,
    /// The command's network namespace; with `join`, a pidfd of the running sandbox's PID 1.
    pub netns: RawFd,
    /// A unix socket to send the pty master over (pty mode).
    pub pty_socket: Option<RawFd>,
    /// Start a process in an existing sandbox (a shell next to the command) instead of a new
    /// one (the launcher's join mode, `__sandbox --join`).
    pub join: bool,
}

/// Why a launcher stage failed (the text `run` prints).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox: {what}: {source}")]
    Sys { what: String, source: Errno },
    #[error("sandbox: {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("sandbox: {0}")]
    Spec(#[from] SpecError),
    #[error("sandbox: {0}")]
    Seccomp(#[from] SeccompError),
    #[error(
        "the run user {user} (uid {uid}) cannot enter the current directory {cwd}: {source}{hint}; \
         start run from a directory that user can enter, or pass --user NAME to run as a user \
         who can"
    )]
    Cwd {
        user: String,
        uid: u32,
        cwd: String,
        source: Errno,
        hint: &'static str,
    },
    #[error("cannot start {program}: {reason}")]
    Exec { program: String, reason: String },
    #[error("sandbox: {0}")]
    Other(String),
}

trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, SandboxError>;
}

impl<T> Context<T> for nix::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, SandboxError> {
        self.map_err(|source| SandboxError::Sys {
            what: what(),
            source,
        })
    }
}

impl<T> Context<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, SandboxError> {
        self.map_err(|source| SandboxError::Io {
            what: what(),
            source,
        })
    }
}

/// Write one failure line to the error pipe (best effort: there is nobody else to tell).
fn report(errors: RawFd, msg: &str) {
    let line: String = msg.chars().take(4000).collect();
    // SAFETY: `errors` is the error pipe, open in every stage until the command's exec; the
    // `File` is never dropped (ManuallyDrop), so the descriptor stays open.
    let mut f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(errors) });
    let _ = f.write_all(line.as_bytes());
}

/// `close_range(2)` (Linux 5.9).
fn close_range(first: u32, last: u32, flags: u32) -> nix::Result<()> {
    // SAFETY: close_range only closes or flags descriptors of this process; callers own every
    // descriptor in the range (nothing else in these single-threaded processes uses them).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) };
    Errno::result(rc).map(drop)
}

/// Mark every descriptor above 2 close-on-exec (`run` does this first: descriptors its caller
/// left open must reach no child).
pub fn cloexec_inherited() {
    let _ = close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
}

/// Close every descriptor but `keep` (and 0-2); mark the kept ones above 2 close-on-exec.
fn keep_only(keep: &[RawFd]) -> Result<(), SandboxError> {
    let mut keep: Vec<u32> = keep
        .iter()
        .chain(&[0, 1, 2])
        .filter_map(|&fd| u32::try_from(fd).ok())
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut next = 0u32;
    for &k in &keep {
        if k > next {
            close_range(next, k - 1, 0).ctx(|| "closing inherited descriptors".into())?;
        }
        next = k + 1;
    }
    close_range(next, u32::MAX, 0).ctx(|| "closing inherited descriptors".into())?;
    for &k in keep.iter().filter(|&&k| k > 2) {
        let fd = RawFd::try_from(k).map_err(|e| SandboxError::Other(e.to_string()))?;
        // SAFETY: `fd` is one of the descriptors this process inherited to use; borrowing it
        // for one fcntl does not change its ownership.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        nix::fcntl::fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
            .ctx(|| format!("descriptor {fd} is not open"))?;
    }
    Ok(())
}

/// Adopt an inherited descriptor.
fn adopt(fd: RawFd) -> OwnedFd {
    // SAFETY: `keep_only` verified the descriptor is open; this process was given it to own
    // and adopts each number exactly once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The launcher (E). Never returns.
pub fn launcher_main(fds: LauncherFds) -> ! {
    let errors = fds.errors;
    std::panic::set_hook(Box::new(move |info| {
        report(errors, &format!("sandbox launcher panicked: {info}"));
    }));
    let code = match launcher(fds) {
        Ok(code) => code,
        Err(e) => {
            report(errors, &e.to_string());
            FAILED
        }
    };
    std::process::exit(code)
}

fn read_spec(fd: OwnedFd) -> Result<SandboxSpec, SandboxError> {
    let mut file = File::from(fd);
    file.rewind().ctx(|| "reading the spec".into())?;
    let mut data = Vec::new();
    (&mut file)
        .take(MAX_SPEC_BYTES + 1)
        .read_to_end(&mut data)
        .ctx(|| "reading the spec".into())?;
    if data.len() as u64 > MAX_SPEC_BYTES {
        return Err(SandboxError::Other("spec too large".into()));
    }
    Ok(SandboxSpec::decode(&data)?)
}

fn blocked_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set
}

fn launcher(fds: LauncherFds) -> Result<i32, SandboxError> {
    let mut keep = vec![fds.spec, fds.errors, fds.netns];
    keep.extend(fds.pty_socket);
    keep_only(&keep)?;
    let spec = read_spec(adopt(fds.spec))?;
    if fds.join {
        return join(&spec, fds);
    }
    let netns = adopt(fds.netns);
    nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET)
        .ctx(|| "entering the command's network namespace".into())?;
    drop(netns);
    nix::sched::unshare(
        CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC,
    )
    .ctx(|| "creating the PID, mount and IPC namespaces".into())?;
    let blocked = blocked_signals();
    let original_mask = blocked
        .thread_swap_mask(SigmaskHow::SIG_BLOCK)
        .ctx(|| "blocking signals".into())?;
    // C watches this pipe to notice E dying before C's parent-death signal was armed.
    let (alive_r, alive_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).ctx(|| "creating a pipe".into())?;
    // SAFETY: this process is single-threaded (no runtime, no threads were started), so the
    // child may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.ctx(|| "fork".into())? {
        ForkResult::Child => {
            drop(alive_w);
            let code = match init(&spec, fds, alive_r, &blocked, &original_mask) {
                Ok(code) => code,
                Err(e) => {
                    report(fds.errors, &e.to_string());
                    FAILED
                }
            };
            std::process::exit(code)
        }
        ForkResult::Parent { child } => {
            drop(alive_r);
            if let Some(fd) = fds.pty_socket {
                drop(adopt(fd));
            }
            let code = supervise(child, &blocked, false, |sig| {
                let _ = nix::sys::signal::kill(child, sig);
            });
            drop(alive_w);
            code
        }
    }
}

/// E' of a shell: joins every namespace of the running sandbox's PID 1 (network, mount with
/// its private `/proc`, `/tmp` and devpts, PID, IPC, UTS, cgroup) through its pidfd, then
/// forks D', which does what D does for the command (new session on a pty from the sandbox's
/// devpts, the run user, `no_new_privs`, the seccomp filter) and `execve`s the spec's program.
/// E' stays outside the sandbox's PID namespace (it is the parent of a process inside it),
/// forwards signals and exits with D''s status; D' dies with E' (parent-death signal) and
/// with the sandbox (its PID 1 exiting kills the namespace).
fn join(spec: &SandboxSpec, fds: LauncherFds) -> Result<i32, SandboxError> {
    let target = adopt(fds.netns);
    nix::sched::setns(
        &target,
        CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .ctx(|| "joining the run's namespaces".into())?;
    drop(target);
    let blocked = blocked_signals();
    let original_mask = blocked
        .thread_swap_mask(SigmaskHow::SIG_BLOCK)
        .ctx(|| "blocking signals".into())?;
    // D' watches this pipe to notice E' dying before D''s parent-death signal was armed.
    let (alive_r, alive_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).ctx(|| "creating a pipe".into())?;
    // SAFETY: single-threaded process (see `launcher`).
    match unsafe { nix::unistd::fork() }.ctx(|| "fork".into())? {
        ForkResult::Child => {
            drop(alive_w);
            let e = (|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                    .ctx(|| "arming the parent-death signal".into())?;
                let mut poll = [nix::poll::PollFd::new(
                    alive_r.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO).ctx(|| "poll".into())?;
                if poll[0].any().unwrap_or(false) {
                    return Err(SandboxError::Other("the launcher exited early".into()));
                }
                let pty = match (spec.pty, fds.pty_socket) {
                    (Some(_), Some(sock)) => {
                        let sock = adopt(sock);
                        let (master, slave) = open_pty(spec)?;
                        send_fd(&sock, &master)?;
                        Some(slave)
                    }
                    _ => None,
                };
                let filters = seccomp::build()?;
                Ok(command(spec, pty, &filters, &original_mask))
            })();
            let e = match e {
                Ok(e) | Err(e) => e,
            };
            report(fds.errors, &e.to_string());
            std::process::exit(FAILED)
        }
        ForkResult::Parent { child } => {
            drop(alive_r);
            if let Some(fd) = fds.pty_socket {
                drop(adopt(fd));
            }
            let code = supervise(child, &blocked, false, |sig| {
                if nix::sys::signal::kill(Pid::from_raw(-child.as_raw()), sig).is_err() {
                    let _ = nix::sys::signal::kill(child, sig);
                }
            });
            drop(alive_w);
            code
        }
    }
}

/// Wait for `main` with the forwarded signals blocked; pass each one on; with `reap_all`
/// (PID 1) also reap every other child. Returns `main`'s exit code (128 + signal when killed).
fn supervise(
    main: Pid,
    blocked: &SigSet,
    reap_all: bool,
    forward: impl Fn(Signal),
) -> Result<i32, SandboxError> {
    loop {
        loop {
            let target = if reap_all { None } else { Some(main) };
            match nix::sys::wait::waitpid(target, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == main => return Ok(code),
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == main => return Ok(128 + sig as i32),
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    return Err(SandboxError::Sys {
                        what: "waiting for the command".into(),
                        source: e,
                    });
                }
            }
        }
        let sig = blocked.wait().ctx(|| "waiting for signals".into())?;
        if sig != Signal::SIGCHLD {
            forward(sig);
        }
    }
}

/// C: PID 1 of the command's PID namespace.
fn init(
    spec: &SandboxSpec,
    fds: LauncherFds,
    alive: OwnedFd,
    blocked: &SigSet,
    original_mask: &SigSet,
) -> Result<i32, SandboxError> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .ctx(|| "arming the parent-death signal".into())?;
    let mut poll = [nix::poll::PollFd::new(
        alive.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO).ctx(|| "poll".into())?;
    if poll[0].any().unwrap_or(false) {
        return Err(SandboxError::Other("the launcher exited early".into()));
    }
    drop(alive);
    prepare_filesystem(spec)?;
    let pty = match (spec.pty, fds.pty_socket) {
        (Some(_), Some(sock)) => {
            let sock = adopt(sock);
            let (master, slave) = open_pty(spec)?;
            send_fd(&sock, &master)?;
            Some(slave)
        }
        (Some(_), None) => {
            return Err(SandboxError::Other("pty requested without a socket".into()));
        }
        (None, sock) => {
            drop(sock.map(adopt));
            None
        }
    };
    let filters = seccomp::build()?;
    // SAFETY: single-threaded process (see `launcher`).
    match unsafe { nix::unistd::fork() }.ctx(|| "fork".into())? {
        ForkResult::Child => {
            let e = command(spec, pty, &filters, original_mask);
            report(fds.errors, &e.to_string());
            std::process::exit(FAILED)
        }
        ForkResult::Parent { child } => {
            drop(pty);
            supervise(child, blocked, true, |sig| {
                // The command's process group (its session leader is D); before D's setsid
                // there is no such group yet, so D itself.
                if nix::sys::signal::kill(Pid::from_raw(-child.as_raw()), sig).is_err() {
                    let _ = nix::sys::signal::kill(child, sig);
                }
            })
        }
    }
}

fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SandboxError> {
    nix::mount::mount(source, target, fstype, flags, data).ctx(|| format!("mounting {target}"))
}

/// A directory, not a symlink to one (a symlink follows the mount on its target).
fn real_dir(p: &str) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), SandboxError> {
    let what = || format!("writing {}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(what)?;
    f.write_all(contents).ctx(what)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .ctx(what)
}

/// Bind `src` over the file `target` points to. A dangling link into one of the sandbox's own
/// tmpfs mounts (resolv.conf -> /run/systemd/resolve/stub-resolv.conf) gets its file created
/// there first; a target that does not exist elsewhere is left alone (returns false).
fn bind_over(src: &Path, target: &Path) -> Result<bool, SandboxError> {
    let mut dest = target.to_path_buf();
    for _ in 0..16 {
        match std::fs::symlink_metadata(&dest) {
            Ok(m) if m.file_type().is_symlink() => {
                let link =
                    std::fs::read_link(&dest).ctx(|| format!("reading {}", dest.display()))?;
                dest = dest.parent().unwrap_or(Path::new("/")).join(link);
            }
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !PRIVATE_TMPFS.iter().any(|(m, _)| dest.starts_with(m)) {
                    return Ok(false);
                }
                if let Some(parent) = dest.parent() {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o755)
                        .create(parent)
                        .ctx(|| format!("creating {}", parent.display()))?;
                }
                write_file(&dest, b"", 0o644)?;
                break;
            }
            Err(e) => return Err(e).ctx(|| format!("reading {}", dest.display())),
        }
    }
    nix::mount::mount(
        Some(src),
        &dest,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .ctx(|| format!("binding {} over {}", src.display(), dest.display()))?;
    Ok(true)
}

/// Everything C does to the filesystem view (all in its private mount namespace).
fn prepare_filesystem(spec: &SandboxSpec) -> Result<(), SandboxError> {
    let none = None::<&str>;
    // Nothing below propagates back to the host.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)?;
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        nodev | MsFlags::MS_NOEXEC,
        none,
    )?;
    for (dir, mode) in PRIVATE_TMPFS {
        if real_dir(dir) {
            mount(
                Some("tmpfs"),
                dir,
                Some("tmpfs"),
                nodev,
                Some(&format!("mode={mode}")),
            )?;
        }
    }
    if real_dir("/dev/pts") {
        let gid = spec
            .tty_gid
            .map(|g| format!(",gid={g}"))
            .unwrap_or_default();
        mount(
            Some("devpts"),
            "/dev/pts",
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some(&format!("newinstance,ptmxmode=0666,mode=0620{gid}")),
        )?;
        if Path::new("/dev/ptmx").exists() {
            mount(
                Some("/dev/pts/ptmx"),
                "/dev/ptmx",
                none,
                MsFlags::MS_BIND,
                none,
            )?;
        }
    }
    if real_dir("/dev/mqueue") {
        mount(
            Some("mqueue"),
            "/dev/mqueue",
            Some("mqueue"),
            nodev | MsFlags::MS_NOEXEC,
            none,
        )?;
    }
    let dir = Path::new(SANDBOX_DIR);
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(dir)
        .ctx(|| format!("creating {SANDBOX_DIR}"))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .ctx(|| format!("creating {SANDBOX_DIR}"))?;
    for f in &spec.files {
        write_file(&dir.join(&f.name), f.contents.as_bytes(), f.mode)?;
    }
    if let Some(resolv) = &spec.resolv_conf {
        let src = dir.join("resolv.conf");
        write_file(&src, resolv.as_bytes(), 0o644)?;
        bind_over(&src, Path::new("/etc/resolv.conf"))?;
    }
    if spec.dynamic_user {
        add_dynamic_user(spec, dir)?;
    }
    Ok(())
}

/// Give the per-run uid an account inside the sandbox (so `id -un`, `whoami`, git and ssh
/// find a name and home) and create its home.
fn add_dynamic_user(spec: &SandboxSpec, dir: &Path) -> Result<(), SandboxError> {
    let home = spec.home();
    let entries = [
        (
            "passwd",
            format!(
                "{}:x:{}:{}:Paddock run user:{}:/bin/sh\n",
                spec.user_name,
                spec.uid,
                spec.gid,
                home.display()
            ),
        ),
        ("group", format!("{}:x:{}:\n", spec.user_name, spec.gid)),
    ];
    for (name, line) in entries {
        let target = Path::new("/etc").join(name);
        let mut text = std::fs::read_to_string(&target).unwrap_or_default();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&line);
        let src = dir.join(name);
        write_file(&src, text.as_bytes(), 0o644)?;
        bind_over(&src, &target)?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&home)
        .ctx(|| format!("creating {}", home.display()))?;
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700))
        .ctx(|| format!("creating {}", home.display()))?;
    nix::unistd::chown(
        &home,
        Some(Uid::from_raw(spec.uid)),
        Some(Gid::from_raw(spec.gid)),
    )
    .ctx(|| format!("chown {}", home.display()))
}

/// A pseudo-terminal from the sandbox's own devpts instance: (master, slave), the slave owned
/// by the run user and sized like `run`'s terminal.
fn open_pty(spec: &SandboxSpec) -> Result<(OwnedFd, OwnedFd), SandboxError> {
    let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    // A devpts mounted with ptmxmode=000 (the host's, when joining a process that shares it)
    // refuses its own ptmx without CAP_DAC_OVERRIDE; /dev/ptmx (0666) opens the devpts at
    // /dev/pts all the same.
    let master = match nix::fcntl::open("/dev/pts/ptmx", flags, Mode::empty()) {
        Err(Errno::EACCES) => nix::fcntl::open("/dev/ptmx", flags, Mode::empty())
            .ctx(|| "opening /dev/ptmx".into())?,
        other => other.ctx(|| "opening /dev/pts/ptmx".into())?,
    };
    // In a pod's mount namespace these paths are the pod's: take nothing but the pty
    // multiplexer (character device 5:2).
    let st = nix::sys::stat::fstat(&master).ctx(|| "fstat of the pty master".into())?;
    let is_ptmx = (st.st_mode & libc::S_IFMT) == libc::S_IFCHR
        && nix::sys::stat::major(st.st_rdev) == 5
        && nix::sys::stat::minor(st.st_rdev) == 2;
    if !is_ptmx {
        return Err(SandboxError::Other(
            "the pty multiplexer is not the kernel's (not character device 5:2)".into(),
        ));
    }
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int through the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &raw const unlock) };
    Errno::result(rc).ctx(|| "unlocking the pty".into())?;
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor.
    let rc = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    let slave = Errno::result(rc).ctx(|| "opening the pty slave".into())?;
    // SAFETY: the ioctl just returned this new descriptor, owned by nobody else.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    // The mode first, while root still owns the slave (no CAP_FOWNER needed), then the owner.
    nix::sys::stat::fchmod(&slave, Mode::from_bits_truncate(0o620))
        .ctx(|| "chmod of the pty slave".into())?;
    let group = Gid::from_raw(spec.tty_gid.unwrap_or(spec.gid));
    nix::unistd::fchown(&slave, Some(Uid::from_raw(spec.uid)), Some(group))
        .ctx(|| "chown of the pty slave".into())?;
    if let Some(pty) = spec.pty {
        set_window_size(master.as_fd(), pty.size.rows, pty.size.cols)
            .ctx(|| "setting the pty size".into())?;
    }
    Ok((master, slave))
}

/// `TIOCSWINSZ` on a terminal descriptor.
pub fn set_window_size(fd: std::os::fd::BorrowedFd<'_>, rows: u16, cols: u16) -> nix::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize through the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &raw const ws) };
    Errno::result(rc).map(drop)
}

fn send_fd(sock: &OwnedFd, fd: &OwnedFd) -> Result<(), SandboxError> {
    let fds = [fd.as_raw_fd()];
    let iov = [std::io::IoSlice::new(b"m")];
    nix::sys::socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .ctx(|| "handing the pty to run".into())
    .map(drop)
}

fn cstring(b: &[u8]) -> Result<CString, SandboxError> {
    CString::new(b).map_err(|_| SandboxError::Other("NUL byte in an argument".into()))
}

/// The program's path, searched in the command's `PATH` as the run user.
fn find_program(spec: &SandboxSpec) -> Result<CString, SandboxError> {
    let program = spec.program();
    if program.as_bytes().contains(&b'/') {
        return cstring(program.as_bytes());
    }
    let path = spec.path_var().unwrap_or(b"/usr/local/bin:/usr/bin:/bin");
    for dir in path.split(|&b| b == b':') {
        let dir = if dir.is_empty() { b"." } else { dir };
        let candidate = Path::new(std::ffi::OsStr::from_bytes(dir)).join(program);
        let is_file = std::fs::metadata(&candidate).is_ok_and(|m| m.is_file());
        if is_file && nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).is_ok() {
            return cstring(candidate.as_os_str().as_bytes());
        }
    }
    Err(SandboxError::Exec {
        program: program.to_string_lossy().into_owned(),
        reason: "not found in PATH".into(),
    })
}

/// D: becomes the command. Returns only on failure.
fn command(
    spec: &SandboxSpec,
    pty: Option<OwnedFd>,
    filters: &Filters,
    original_mask: &SigSet,
) -> SandboxError {
    match confine(spec, pty, filters, original_mask) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn confine(
    spec: &SandboxSpec,
    pty: Option<OwnedFd>,
    filters: &Filters,
    original_mask: &SigSet,
) -> Result<std::convert::Infallible, SandboxError> {
    // Default dispositions (Rust ignores SIGPIPE; an ignored signal would stay ignored across
    // exec), then the mask `run` started the launcher with.
    for sig in Signal::iterator().filter(|s| !matches!(s, Signal::SIGKILL | Signal::SIGSTOP)) {
        // SAFETY: installing SIG_DFL runs no handler code.
        let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
    }
    original_mask
        .thread_set_mask()
        .ctx(|| "restoring the signal mask".into())?;
    nix::unistd::setsid().ctx(|| "setsid".into())?;
    if let (Some(slave), Some(p)) = (pty, spec.pty) {
        // SAFETY: TIOCSCTTY takes an int argument by value (0: do not steal).
        let rc = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
        Errno::result(rc).ctx(|| "making the pty the controlling terminal".into())?;
        for (target, wanted) in (0..).zip(p.stdio) {
            if wanted {
                // SAFETY: descriptors 0-2 are this process's own; dup2 replaces one with the
                // pty slave atomically.
                let rc = unsafe { libc::dup2(slave.as_raw_fd(), target) };
                Errno::result(rc).ctx(|| "attaching the pty".into())?;
            }
        }
        drop(slave);
    }
    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
    nix::unistd::setgroups(&[gid]).ctx(|| "setgroups".into())?;
    nix::unistd::setgid(gid).ctx(|| "setgid".into())?;
    nix::unistd::setuid(uid).ctx(|| "setuid".into())?;
    if nix::unistd::getuid() != uid
        || nix::unistd::geteuid() != uid
        || nix::unistd::getegid() != gid
        || nix::unistd::setuid(Uid::from_raw(0)).is_ok()
    {
        return Err(SandboxError::Other(
            "dropping privileges did not stick".into(),
        ));
    }
    let cwd = spec.cwd();
    nix::unistd::chdir(&cwd).map_err(|source| SandboxError::Cwd {
        user: spec.user_name.clone(),
        uid: spec.uid,
        cwd: cwd.display().to_string(),
        source,
        hint: if PRIVATE_TMPFS.iter().any(|(m, _)| cwd.starts_with(m)) {
            " (the command's /tmp, /var/tmp, /dev/shm and /run are private, empty mounts)"
        } else {
            ""
        },
    })?;
    let path = find_program(spec)?;
    let argv = std::iter::once(&spec.program)
        .chain(&spec.args)
        .map(|a| cstring(a))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = spec
        .env
        .iter()
        .map(|(k, v)| cstring(&[k.as_slice(), b"=", v.as_slice()].concat()))
        .collect::<Result<Vec<_>, _>>()?;
    // Close-on-exec rather than close: the error pipe must stay usable until execve.
    close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC)
        .ctx(|| "marking descriptors close-on-exec".into())?;
    nix::sys::prctl::set_no_new_privs().ctx(|| "no_new_privs".into())?;
    seccomp::install(filters)?;
    let Err(err) = nix::unistd::execve(&path, &argv, &envp);
    Err(SandboxError::Exec {
        program: spec.program().to_string_lossy().into_owned(),
        reason: err.desc().to_owned(),
    })
}
