//! A Python HTTPS test server in a namespace: the script is written to the test's directory,
//! started with `ADDR PORT CERT KEY ARGS...`, waited for until it accepts connections, and
//! killed and reaped on drop (also when a test panics).

use std::{
    ffi::OsStr,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    Netns,
    process::{Placement, place},
};

/// The running server process.
#[derive(Debug)]
pub struct PyServer {
    child: Child,
}

impl PyServer {
    /// Run `script` (saved as `dir/name`) on `addr` inside `ns` with `dir/server.{crt,key}`.
    pub fn start(
        ns: &Netns,
        dir: &Path,
        name: &str,
        script: &str,
        addr: SocketAddr,
        args: &[&OsStr],
    ) -> Self {
        let path = dir.join(name);
        std::fs::write(&path, script).expect("write script");
        let mut cmd = Command::new("python3");
        cmd.arg(&path)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(dir.join("server.crt"))
            .arg(dir.join("server.key"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        place(&mut cmd, &Placement::netns(ns));
        // Owned by the guard at once, so every path below kills and reaps it.
        let server = Self {
            child: cmd.spawn().expect("start python3"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let up = ns
                .run(move || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                })
                .unwrap_or(false);
            if up {
                return server;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{name} did not start on {addr}");
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
