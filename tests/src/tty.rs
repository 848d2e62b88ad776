//! A pseudo-terminal standing in for an operator's terminal: processes started "in" it get
//! its slave as their controlling terminal (new session), and a reader thread collects
//! everything written to it so tests can wait for output with a deadline.
#![expect(
    unsafe_code,
    reason = "Command::pre_exec (setsid, TIOCSCTTY, setuid) and the TIOCSWINSZ ioctl"
)]

use std::{
    fs::File,
    io::{Read, Write},
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// The operator's terminal: master (the terminal emulator's side) and slave (the shell's).
#[derive(Debug)]
pub struct Terminal {
    master: File,
    slave: OwnedFd,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Terminal {
    /// A new pty of `rows` x `cols`, in its default (cooked) mode.
    #[must_use]
    pub fn new(rows: u16, cols: u16) -> Self {
        let ws = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None).expect("openpty");
        let master = File::from(pty.master);
        let reader = master.try_clone().expect("dup master");
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&output);
        std::thread::spawn(move || {
            let mut reader = reader;
            let mut buf = [0u8; 4096];
            // Ends with EIO once no process holds the slave any more.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().expect("lock").extend_from_slice(&buf[..n]);
            }
        });
        Self {
            master,
            slave: pty.slave,
            output,
        }
    }

    /// The slave side (what the operator's shell reads and writes).
    #[must_use]
    pub fn slave(&self) -> &OwnedFd {
        &self.slave
    }

    /// `[dev, rdev]` of the slave device, to tell it apart from other terminals. The device
    /// number alone is not enough: every devpts instance (a sandbox mounts its own) numbers its
    /// terminals from `pts/0`, so two distinct terminals can share an `st_rdev`; the instance's
    /// `st_dev` tells them apart.
    #[must_use]
    pub fn slave_id(&self) -> [u64; 2] {
        let st = nix::sys::stat::fstat(&self.slave).expect("fstat");
        [st.st_dev, st.st_rdev]
    }

    /// Start `cmd` as a session leader with this terminal as its controlling terminal and
    /// stdin/stdout/stderr (as an operator's shell starts a command), optionally as `uid`.
    pub fn spawn(&self, cmd: &mut Command, uid: Option<u32>) -> Child {
        self.spawn_with(cmd, uid, true)
    }

    /// As [`Self::spawn`]; with `stdin_from_terminal` false stdin is `/dev/null` (as in
    /// `command < /dev/null` typed at the operator's shell).
    pub fn spawn_with(
        &self,
        cmd: &mut Command,
        uid: Option<u32>,
        stdin_from_terminal: bool,
    ) -> Child {
        let fd = self.slave.as_raw_fd();
        let dup = || Stdio::from(self.slave.try_clone().expect("dup slave"));
        cmd.stdin(if stdin_from_terminal {
            dup()
        } else {
            Stdio::null()
        });
        cmd.stdout(dup());
        cmd.stderr(dup());
        // SAFETY: between fork and exec; only setsid(2), ioctl(2) and set*id(2) on values
        // prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 || libc::ioctl(fd, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(id) = uid
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(id) != 0
                        || libc::setuid(id) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().expect("spawn in terminal")
    }

    /// Type into the terminal.
    pub fn type_bytes(&self, bytes: &[u8]) {
        (&self.master).write_all(bytes).expect("write to terminal");
    }

    /// Everything written to the terminal so far (lossy UTF-8).
    #[must_use]
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().expect("lock")).into_owned()
    }

    /// Wait until the output after byte `from` contains `needle`; returns the end offset of
    /// the match. Panics with the output on timeout.
    pub fn wait_for(&self, from: usize, needle: &str, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.output();
            if let Some(at) = out.get(from..).and_then(|tail| tail.find(needle)) {
                return from + at + needle.len();
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} did not appear within {timeout:?}; terminal shows:\n{}",
                out.get(from..).unwrap_or("")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resize (the kernel sends SIGWINCH to the terminal's foreground process group).
    pub fn resize(&self, rows: u16, cols: u16) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize through the pointer, which outlives the call.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &raw const ws) };
        assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }

    /// The slave's current mode.
    #[must_use]
    pub fn mode(&self) -> nix::sys::termios::Termios {
        nix::sys::termios::tcgetattr(self.slave.as_fd()).expect("tcgetattr")
    }

    /// Bytes waiting to be read on the slave (what the operator's shell would read next):
    /// switches the slave to non-canonical mode first so a partial line counts too.
    #[must_use]
    pub fn pending_input(&self) -> Vec<u8> {
        let mut t = self.mode();
        nix::sys::termios::cfmakeraw(&mut t);
        t.control_chars[libc::VMIN] = 0;
        t.control_chars[libc::VTIME] = 0;
        nix::sys::termios::tcsetattr(self.slave.as_fd(), nix::sys::termios::SetArg::TCSANOW, &t)
            .expect("tcsetattr");
        let mut buf = [0u8; 256];
        let n = nix::unistd::read(&self.slave, &mut buf).unwrap_or(0);
        buf[..n].to_vec()
    }
}
