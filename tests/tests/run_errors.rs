//! Root tier: `paddock-proxy run` refuses clearly, runs nothing and leaves nothing behind when
//! it cannot run safely: not root, an invalid policy, a secret file others may read, a missing
//! secrets directory.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use paddock_tests::{
    names::unique,
    process::{Placement, run, target_bin},
    require_root,
};

const POLICY: &str = r#"
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: errors}
spec:
  appliesTo: {namespaces: [local]}
  credentials:
    - name: token
      provider: {kind: user-secret, inject: {header: {name: Authorization, prefix: "Bearer "}}}
      secret: {file: token.txt}
      hosts: [api.paddock.test]
      env: API_TOKEN
  egress:
    - {hosts: [api.paddock.test], ports: [443], substituteAuth: true}
"#;

/// A scratch directory everyone may traverse (the not-root case runs as nobody).
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("pdk-run-errors-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Runs `paddock-proxy run ARGS -- touch MARKER` with a unique run id and state directory.
struct Attempt {
    out: Output,
    run_id: String,
    marker: PathBuf,
    state: PathBuf,
}

fn attempt(bin: &Path, dir: &Path, args: &[&str], user: Option<u32>) -> Attempt {
    let run_id = unique("err");
    let marker = dir.join("command-ran");
    let state = dir.join("state");
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .args(args)
        .arg("--state-dir")
        .arg(&state)
        .args(["--run-id", &run_id, "--", "touch"])
        .arg(&marker)
        .env("RUST_LOG", "warn");
    let out = run(
        &mut cmd,
        &Placement {
            user,
            ..Placement::default()
        },
    );
    Attempt {
        out,
        run_id,
        marker,
        state,
    }
}

impl Attempt {
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }

    /// Refused with a message containing every `needle`; nothing ran and nothing is left.
    fn refused(&self, needles: &[&str]) {
        let stderr = self.stderr();
        assert_eq!(
            self.out.status.code(),
            Some(125),
            "Paddock's own failure, not the command's: {stderr}"
        );
        assert!(
            stderr.starts_with("paddock-proxy: ") && !stderr.contains("Stack backtrace"),
            "one clear line: {stderr}"
        );
        for needle in needles {
            assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
        }
        assert!(!self.marker.exists(), "the command must not run");
        let pins = Path::new("/sys/fs/bpf/paddock").join(&self.run_id);
        assert!(!pins.exists(), "eBPF pins left at {}", pins.display());
        let cgroup = paddock_proxy::ebpf::mounts::cgroup2_root()
            .expect("cgroup2")
            .join("paddock")
            .join(&self.run_id);
        assert!(!cgroup.exists(), "cgroup left at {}", cgroup.display());
        for secret_dir in ["ca", "broker"] {
            let p = self.state.join(&self.run_id).join(secret_dir);
            assert!(!p.exists(), "{} left", p.display());
        }
    }
}

#[test]
fn not_root_is_refused_with_the_reason() {
    if !require_root("not_root_is_refused_with_the_reason") {
        return;
    }
    let dir = scratch();
    // A copy nobody may execute wherever the build tree lives.
    let bin = dir.path().join("paddock-proxy");
    // Copied by `cp`, not in this process: a test thread forking meanwhile would inherit our
    // write descriptor until its exec, and executing the copy would fail with ETXTBSY.
    let copied = Command::new("cp")
        .arg(target_bin("paddock-proxy"))
        .arg(&bin)
        .status()
        .expect("cp");
    assert!(copied.success(), "cp the binary");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let policy = dir.path().join("policy.yaml");
    write(&policy, POLICY, 0o644);
    let a = attempt(
        &bin,
        dir.path(),
        &["--policy", policy.to_str().expect("utf-8")],
        Some(65534),
    );
    a.refused(&["needs root", "sudo"]);
    assert!(!a.state.exists(), "nothing is created before the check");
}

#[test]
fn invalid_policy_names_the_file_line_and_field() {
    if !require_root("invalid_policy_names_the_file_line_and_field") {
        return;
    }
    let dir = scratch();
    let policy = dir.path().join("policy.yaml");
    write(
        &policy,
        &POLICY.replace("hosts: [api", "hostz: [api"),
        0o644,
    );
    write(&dir.path().join("token.txt"), "real-token", 0o600);
    let a = attempt(
        &bin(),
        dir.path(),
        &[
            "--policy",
            policy.to_str().expect("utf-8"),
            "--secrets",
            dir.path().to_str().expect("utf-8"),
        ],
        None,
    );
    a.refused(&["invalid policy", "policy.yaml:", "hostz"]);
}

#[test]
fn secret_file_others_can_read_is_refused() {
    if !require_root("secret_file_others_can_read_is_refused") {
        return;
    }
    let dir = scratch();
    let policy = dir.path().join("policy.yaml");
    write(&policy, POLICY, 0o644);
    write(&dir.path().join("token.txt"), "real-token", 0o644);
    let a = attempt(
        &bin(),
        dir.path(),
        &[
            "--policy",
            policy.to_str().expect("utf-8"),
            "--secrets",
            dir.path().to_str().expect("utf-8"),
        ],
        None,
    );
    a.refused(&["token.txt", "readable by others", "chmod 600"]);
    assert!(
        !a.stderr().contains("real-token"),
        "the secret is never printed"
    );
}

/// A PAT pool's tokens and a GitHub App's key are secrets as much as a `secret:` field: a file
/// the command's user could read is refused the same way.
#[test]
fn pool_tokens_and_app_keys_others_can_read_are_refused() {
    if !require_root("pool_tokens_and_app_keys_others_can_read_are_refused") {
        return;
    }
    for (name, provider) in [
        (
            "pool.txt",
            "{kind: pat-pool, inject: {basic: {username: x}}, secrets: [{file: pool.txt}]}",
        ),
        (
            "app.pem",
            "{kind: github-app, appId: 1, installationId: 2, privateKey: {file: app.pem}}",
        ),
    ] {
        let dir = scratch();
        let policy = dir.path().join("policy.yaml");
        let text = format!(
            r"
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {{name: errors}}
spec:
  appliesTo: {{namespaces: [local]}}
  credentials:
    - name: gh
      provider: {provider}
      hosts: [github.com]
      env: GH_TOKEN
  egress:
    - {{hosts: [github.com], ports: [443], substituteAuth: true}}
"
        );
        write(&policy, &text, 0o644);
        write(&dir.path().join(name), "real-token", 0o644);
        let a = attempt(
            &bin(),
            dir.path(),
            &[
                "--policy",
                policy.to_str().expect("utf-8"),
                "--secrets",
                dir.path().to_str().expect("utf-8"),
            ],
            None,
        );
        a.refused(&[name, "readable by others", "chmod 600"]);
        assert!(!a.stderr().contains("real-token"), "never printed");
    }
}

#[test]
fn missing_secrets_directory_is_named() {
    if !require_root("missing_secrets_directory_is_named") {
        return;
    }
    let dir = scratch();
    let policy = dir.path().join("policy.yaml");
    write(&policy, POLICY, 0o644);
    let missing = dir.path().join("no-such-dir");
    let a = attempt(
        &bin(),
        dir.path(),
        &[
            "--policy",
            policy.to_str().expect("utf-8"),
            "--secrets",
            missing.to_str().expect("utf-8"),
        ],
        None,
    );
    a.refused(&["no-such-dir", "not a directory"]);
}

fn bin() -> PathBuf {
    target_bin("paddock-proxy")
}
