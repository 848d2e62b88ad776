//! Root tier: the `run` command's child handling on a real kernel: the command lands in the
//! agent cgroup as an unprivileged user, its exit code comes back, signals are forwarded, and
//! nothing it started survives it.

use std::{collections::BTreeMap, ffi::OsString, time::Duration};

use nix::sys::signal::Signal;
use paddock_proxy::run::{RunUser, SpawnSpec, resolve_user, spawn_in_cgroup, supervise};
use paddock_tests::{CgroupGuard, require_root};
use tokio::io::AsyncReadExt;

fn spec(cg: &CgroupGuard, script: &str, user: RunUser) -> SpawnSpec {
    let mut env = BTreeMap::new();
    env.insert(
        OsString::from("PATH"),
        OsString::from("/usr/sbin:/usr/bin:/sbin:/bin"),
    );
    SpawnSpec {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env,
        user,
        cgroup: cg.cgroup().path().to_path_buf(),
        cwd: Some("/".into()),
        piped_stdout: true,
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
    let user = resolve_user(None, None).expect("nobody");
    let mut child = spawn_in_cgroup(&spec(
        &cg,
        "id -u; id -G; grep '^0::' /proc/self/cgroup; exit 7",
        user.clone(),
    ))
    .expect("spawn");
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .await
        .expect("read");
    let outcome = supervise(child, cg.cgroup().path(), never(), Duration::from_secs(5))
        .await
        .expect("supervise");
    assert_eq!(outcome.code, 7);
    assert_eq!(outcome.interrupted_by, None);
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
}

#[tokio::test]
async fn interrupt_is_forwarded_and_a_stubborn_command_is_killed_after_grace() {
    if !require_root("interrupt_is_forwarded_and_a_stubborn_command_is_killed_after_grace") {
        return;
    }
    let cg = CgroupGuard::new("sig");
    let user = resolve_user(None, None).expect("nobody");
    // Obeys SIGTERM: exit status is 128 + 15.
    let child = spawn_in_cgroup(&spec(&cg, "exec sleep 30", user.clone())).expect("spawn");
    let started = std::time::Instant::now();
    let interrupt = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Signal::SIGTERM
    };
    let outcome = supervise(child, cg.cgroup().path(), interrupt, Duration::from_secs(5))
        .await
        .expect("supervise");
    assert_eq!(outcome.code, 128 + 15);
    assert_eq!(outcome.interrupted_by, Some(Signal::SIGTERM));
    assert!(started.elapsed() < Duration::from_secs(5));

    // Ignores SIGTERM: killed with its cgroup after the grace period.
    let child = spawn_in_cgroup(&spec(&cg, "trap '' TERM; sleep 30; exit 0", user)).expect("spawn");
    let interrupt = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Signal::SIGTERM
    };
    let outcome = supervise(
        child,
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
    let user = resolve_user(None, None).expect("nobody");
    let child =
        spawn_in_cgroup(&spec(&cg, "sleep 30 >/dev/null 2>&1 & exit 0", user)).expect("spawn");
    let outcome = supervise(child, cg.cgroup().path(), never(), Duration::from_secs(5))
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
