//! Inbound probes: a listener (`pdk-client listen`) placed in a cgroup and namespace, and a
//! peer that tries to reach it from another namespace. Every wait is bounded.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::{Child, ChildStdout, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{
    Netns,
    process::{Placement, client_path, place},
};

/// How long a peer waits for a connection that should not happen: a dropped SYN is only
/// noticed by timing out.
pub const REFUSED_WITHIN: Duration = Duration::from_millis(1500);

/// A running `pdk-client listen`, killed on drop.
#[derive(Debug)]
pub struct Listener {
    child: Child,
    out: BufReader<ChildStdout>,
    /// The address the socket ended up bound to (`getsockname`).
    pub local: SocketAddr,
}

impl Listener {
    /// Start `pdk-client listen ARGS` at `at`. `Err` carries the client's failure report
    /// (`{"ok":false,"stage":...,"errno":...}`), e.g. a refused bind.
    pub fn start(args: &[&str], at: &Placement<'_>) -> Result<Self, Value> {
        let mut cmd = Command::new(client_path());
        cmd.arg("listen")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        place(&mut cmd, at);
        let mut child = cmd.spawn().expect("spawn pdk-client listen");
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read listener report");
        let first: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("pdk-client listen {args:?} printed {line:?}: {e}"));
        if first["ok"] != true {
            let _ = child.wait();
            return Err(first);
        }
        let local = first["local"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no local address in {first}"));
        Ok(Self { child, out, local })
    }

    /// Wait for the listener's final report (it ends after its `--count`, on `end`, or when
    /// its `--wait-ms` is over).
    #[must_use]
    pub fn finish(mut self) -> Value {
        let mut rest = String::new();
        self.out
            .read_to_string(&mut rest)
            .expect("read listener output");
        let _ = self.child.wait();
        serde_json::from_str(rest.trim()).unwrap_or_else(|e| panic!("listener said {rest:?}: {e}"))
    }

    /// The port the socket is bound to.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.local.port()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// From inside `ns`: connect to `to` (waiting at most `timeout`), send `hello`, and return
/// the line echoed back.
pub fn tcp_echo(ns: &Netns, to: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&to, timeout)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"hello\n")?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        Ok(line.trim_end().to_owned())
    })
    .expect("enter netns")
}

/// From inside `ns`: send one datagram `data` from `from` (port 0: any) to `to`.
pub fn udp_send(ns: &Netns, from: SocketAddr, to: SocketAddr, data: &'static str) {
    ns.run(move || {
        let s = UdpSocket::bind(from)?;
        s.send_to(data.as_bytes(), to).map(|_| ())
    })
    .expect("enter netns")
    .unwrap_or_else(|e| panic!("send {data} from {from} to {to}: {e}"));
}

/// The `data` fields of a UDP listener's report, in arrival order.
#[must_use]
pub fn datagrams(report: &Value) -> Vec<String> {
    report["received"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|d| d["data"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The lines a TCP listener's accepted connections sent, in order.
#[must_use]
pub fn accepted_peers(report: &Value) -> Vec<String> {
    report["accepted"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|c| c["peer"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
