//! Root tier: the `run` command's child handling on a real kernel: the command lands in the
//! agent cgroup, inside its sandbox, as an unprivileged user; its exit code comes back,
//! signals are forwarded through the launcher, and nothing it started survives it.

use std::{collections::BTreeMap, ffi::OsString, os::fd::AsFd, path::PathBuf, time::Duration};

use nix::sys::signal::Signal;
use paddock_app::run::{
    Launch, RunUser, SandboxSpec, Sandboxed, resolve_user, spawn_sandboxed, supervise,
};
use paddock_proxy::netns::OwnedNetns;
use paddock_tests::{CgroupGuard, process::target_bin, require_root};
use tokio::io::AsyncReadExt;

struct Started {
    sandbox: Sandboxed,
    _netns: OwnedNetns,
}

fn start(cg: &CgroupGuard, script: &str, user: &RunUser) -> Started {
    let mut env = BTreeMap::new();
    env.insert(
        OsString::from("PATH"),
        OsString::from("/usr/sbin:/usr/bin:/sbin:/bin"),
    );
    let args = [OsString::from("-c"), OsString::from(script)];
    let spec = SandboxSpec::new("/bin/sh".as_ref(), &args, &env, user, "/".as_ref());
    let netns = OwnedNetns::create().expect("netns");
    let launcher: PathBuf = target_bin("paddock-proxy");
    let sandbox = spawn_sandboxed(
        &spec,
        &Launch {
            join: false,
            launcher: &launcher,
            cgroup: cg.cgroup().path(),
            netns: netns.as_fd(),
            piped_stdout: true,
        },
    )
    .expect("spawn");
    Started {
        sandbox,
        _netns: netns,
    }
}

fn never() -> impl Future<Output = Signal> {
    std::future::pending()
}

#[tokio::test]
async fn command_runs_in_the_cgroup_as_nobody_and_its_exit_code_returns() {
    if !require_root("command_runs_in_the_cgroup_as_nobody_and_its_exit_code_returns") {
        return;
    }
    let cg = CgroupGuard::new("run");
    let user = resolve_user("nobody").expect("nobody");
    let mut s = start(
        &cg,
        "id -u; id -G; grep '^0::' /proc/self/cgroup; echo pid $$; exit 7",
        &user,
    );
    let mut out = String::new();
    s.sandbox
        .child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .await
        .expect("read");
    let outcome = supervise(
        &mut s.sandbox.child,
        cg.cgroup().path(),
        never(),
        Duration::from_secs(5),
    )
    .await
    .expect("supervise");
    assert_eq!(outcome.code, 7);
    assert_eq!(outcome.interrupted_by, None);
    assert_eq!(s.sandbox.failure(), None);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], user.uid.to_string(), "{out}");
    assert_eq!(
        lines[1],
        user.gid.to_string(),
        "only the user's own group: {out}"
    );
    let cg_name = cg
        .cgroup()
        .path()
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name");
    assert!(
        lines[2].ends_with(cg_name),
        "child must be in the agent cgroup: {out}"
    );
    // PID 1 is the sandbox's init; the command is its first child.
    assert_eq!(lines[3], "pid 2", "{out}");
}

#[tokio::test]
async fn interrupt_is_forwarded_and_a_stubborn_command_is_killed_after_grace() {
    if !require_root("interrupt_is_forwarded_and_a_stubborn_command_is_killed_after_grace") {
        return;
    }
    let cg = CgroupGuard::new("sig");
    let user = resolve_user("nobody").expect("nobody");
    // Obeys SIGTERM: exit status is 128 + 15, passed up through the launcher.
    let mut s = start(&cg, "exec sleep 30", &user);
    let started = std::time::Instant::now();
    let interrupt = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Signal::SIGTERM
    };
    let outcome = supervise(
        &mut s.sandbox.child,
        cg.cgroup().path(),
        interrupt,
        Duration::from_secs(5),
    )
    .await
    .expect("supervise");
    assert_eq!(outcome.code, 128 + 15);
    assert_eq!(outcome.interrupted_by, Some(Signal::SIGTERM));
    assert!(started.elapsed() < Duration::from_secs(5));

    // Ignores SIGTERM: killed with its cgroup after the grace period.
    let mut s = start(&cg, "trap '' TERM; sleep 30; exit 0", &user);
    let interrupt = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Signal::SIGTERM
    };
    let outcome = supervise(
        &mut s.sandbox.child,
        cg.cgroup().path(),
        interrupt,
        Duration::from_millis(300),
    )
    .await
    .expect("supervise");
    assert_eq!(outcome.code, 128 + 9, "{outcome:?}");
}

#[tokio::test]
async fn background_processes_do_not_outlive_the_command() {
    if !require_root("background_processes_do_not_outlive_the_command") {
        return;
    }
    let cg = CgroupGuard::new("bg");
    let user = resolve_user("nobody").expect("nobody");
    let mut s = start(&cg, "sleep 30 >/dev/null 2>&1 & exit 0", &user);
    let outcome = supervise(
        &mut s.sandbox.child,
        cg.cgroup().path(),
        never(),
        Duration::from_secs(5),
    )
    .await
    .expect("supervise");
    assert_eq!(outcome.code, 0);
    let procs = cg.procs_path();
    let mut left = String::new();
    for _ in 0..50 {
        left = std::fs::read_to_string(&procs).expect("read cgroup.procs");
        if left.trim().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(left.trim().is_empty(), "left behind: {left}");
}

#[tokio::test]
async fn a_launcher_failure_is_reported_and_runs_nothing() {
    if !require_root("a_launcher_failure_is_reported_and_runs_nothing") {
        return;
    }
    let cg = CgroupGuard::new("fail");
    let user = resolve_user("nobody").expect("nobody");
    // The command cannot be found: the launcher says so and runs nothing.
    let mut env = BTreeMap::new();
    env.insert(OsString::from("PATH"), OsString::from("/nonexistent"));
    let spec = SandboxSpec::new(
        "paddock-no-such-command".as_ref(),
        std::iter::empty(),
        &env,
        &user,
        "/".as_ref(),
    );
    let netns = OwnedNetns::create().expect("netns");
    let launcher = target_bin("paddock-proxy");
    let mut failing = spawn_sandboxed(
        &spec,
        &Launch {
            join: false,
            launcher: &launcher,
            cgroup: cg.cgroup().path(),
            netns: netns.as_fd(),
            piped_stdout: true,
        },
    )
    .expect("spawn");
    let outcome = supervise(
        &mut failing.child,
        cg.cgroup().path(),
        never(),
        Duration::from_secs(5),
    )
    .await
    .expect("supervise");
    assert_eq!(outcome.code, 125);
    let why = failing.failure().expect("a reason");
    assert!(
        why.contains("paddock-no-such-command") && why.contains("not found"),
        "{why}"
    );
    let mut out = String::new();
    failing
        .child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .await
        .expect("read");
    assert_eq!(out, "", "nothing ran");
}
