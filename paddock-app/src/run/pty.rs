//! Terminals: when any of `run`'s stdin, stdout and stderr is a terminal, the command gets a
//! pseudo-terminal of its own (allocated inside the sandbox) in their place and `run` relays
//! between it and the operator's terminal. The command never holds a descriptor of the
//! operator's terminal: it cannot push keystrokes into the operator's shell (`TIOCSTI`), read
//! the operator's typeahead, or change the terminal's settings or line discipline.
//!
//! With stdin a terminal, `run` puts it in raw mode for the duration: keys such as Ctrl-C and
//! Ctrl-Z then reach the command through its pty's line discipline and job control works
//! inside. The saved mode comes back at the end, with input typed for the command and not yet
//! read discarded (it must not spill into the operator's shell).
#![expect(
    unsafe_code,
    reason = "TIOCGWINSZ ioctl, a blocking read(2) on stdin and registering the pty master with \
              tokio; each block has a SAFETY note"
)]

use std::{
    io::IsTerminal,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use nix::sys::termios::{SetArg, Termios};
use tokio::io::AsyncWriteExt;

use super::spec::WindowSize;

/// Set while `run` holds the operator's terminal in raw mode (log lines need `\r\n` then).
static RAW: AtomicBool = AtomicBool::new(false);

/// Whether `run` currently holds its terminal in raw mode.
pub fn terminal_is_raw() -> bool {
    RAW.load(Ordering::Relaxed)
}

fn stdin_fd() -> BorrowedFd<'static> {
    // SAFETY: descriptor 0 stays open for the life of the process (nothing in `run` closes it).
    unsafe { BorrowedFd::borrow_raw(0) }
}

/// Which of `run`'s stdin, stdout and stderr are terminals (those get the command's pty).
#[must_use]
pub fn terminal_stdio() -> [bool; 3] {
    [
        std::io::stdin().is_terminal(),
        std::io::stdout().is_terminal(),
        std::io::stderr().is_terminal(),
    ]
}

/// The size of the terminal on `fd`.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<WindowSize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &raw mut ws) };
    (rc == 0).then_some(WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// The operator's terminal size (from stdin, stdout or stderr, whichever is one).
#[must_use]
pub fn operator_window_size() -> Option<WindowSize> {
    window_size(stdin_fd())
        .or_else(|| window_size(std::io::stdout().as_fd()))
        .or_else(|| window_size(std::io::stderr().as_fd()))
}

/// The operator's terminal in raw mode; the saved mode comes back on drop, which also runs on
/// every error path and on unwinding panics. (Signals that would kill `run` outright are
/// caught by the CLI and turned into an orderly stop, which drops this.)
#[derive(Debug)]
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enter() -> nix::Result<Self> {
        let saved = nix::sys::termios::tcgetattr(stdin_fd())?;
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        nix::sys::termios::tcsetattr(stdin_fd(), SetArg::TCSANOW, &raw)?;
        RAW.store(true, Ordering::Relaxed);
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // TCSAFLUSH: also drop input typed for the command that it never read.
        let _ = nix::sys::termios::tcsetattr(stdin_fd(), SetArg::TCSAFLUSH, &self.saved);
        RAW.store(false, Ordering::Relaxed);
    }
}

/// The running relay.
#[derive(Debug)]
pub struct Relay {
    output: tokio::task::JoinHandle<()>,
    winch: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relay `master` to stdout (to stderr when only that is a terminal), stdin to `master`
    /// when `input` (a thread doing blocking reads, so the operator's terminal description is
    /// never switched to non-blocking), and the window size on SIGWINCH.
    pub fn start(master: OwnedFd, input: bool, to_stderr: bool) -> std::io::Result<Self> {
        let writer = master.try_clone()?;
        nix::fcntl::fcntl(
            &master,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        // SAFETY: an OwnedFd keeps its descriptor open and unchanged until the AsyncFd drops it.
        let master = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(master, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        let sized = master.get_ref().try_clone()?;
        if input {
            std::thread::Builder::new()
                .name("paddock-pty-input".into())
                .spawn(move || copy_input(&writer))?;
        }
        let output = if to_stderr {
            tokio::spawn(copy_output(master, tokio::io::stderr()))
        } else {
            tokio::spawn(copy_output(master, tokio::io::stdout()))
        };
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
        let winch = tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if let Some(ws) = operator_window_size() {
                    let _ = super::init::set_window_size(sized.as_fd(), ws.rows, ws.cols);
                }
            }
        });
        Ok(Self { output, winch })
    }

    /// Wait (at most `grace`) for the command's last output to reach stdout, then stop.
    pub async fn finish(self, grace: Duration) {
        self.winch.abort();
        let mut output = self.output;
        if tokio::time::timeout(grace, &mut output).await.is_err() {
            output.abort();
        }
    }
}

/// stdin -> pty master. Ends at EOF, on an error, or when the pty is gone (EIO); a read
/// still pending then ends with the process.
fn copy_input(master: &OwnedFd) {
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: `buf` is writable for its length and outlives the call; fd 0 is open.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        let n = match usize::try_from(n) {
            Ok(0) => return,
            Ok(n) => n,
            Err(_) if nix::errno::Errno::last() == nix::errno::Errno::EINTR => continue,
            Err(_) => return,
        };
        let mut data = &buf[..n];
        while !data.is_empty() {
            match nix::unistd::write(master, data) {
                Ok(w) => data = &data[w..],
                Err(nix::errno::Errno::EAGAIN) => {
                    // The command is not reading: wait until the pty takes input again.
                    let mut pfd = [nix::poll::PollFd::new(
                        master.as_fd(),
                        nix::poll::PollFlags::POLLOUT,
                    )];
                    let _ = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(1000u16));
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    }
}

/// pty master -> `out`, until the last holder of the slave is gone (EIO).
async fn copy_output(
    master: tokio::io::unix::AsyncFd<OwnedFd>,
    mut out: impl tokio::io::AsyncWrite + Unpin,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(mut guard) = master.readable().await else {
            return;
        };
        match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buf).map_err(Into::into)) {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => {
                if out.write_all(&buf[..n]).await.is_err() || out.flush().await.is_err() {
                    break;
                }
            }
            Err(_would_block) => {}
        }
    }
    let _ = out.flush().await;
}
