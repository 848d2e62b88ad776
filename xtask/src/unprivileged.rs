//! The unprivileged test tier, run again as a non-root user.
//!
//! Everything outside `paddock-tests` claims to need no privilege (the kernel boundaries sit
//! behind traits, faked in those tests). Run as root, such a test could lean on a capability
//! without anyone noticing (binding a low port, reading a root-only file, joining a namespace);
//! run here as uid/gid 65534 with no capabilities, it cannot.
//!
//! The already-built test executables are run directly (`cargo test --no-run` names them), so
//! the non-root user needs no write access to `target/`. If the checkout is not reachable by
//! that user (a checkout under root's home, mode 0700), the run keeps exactly two capabilities,
//! `CAP_DAC_READ_SEARCH` and `CAP_DAC_OVERRIDE`, so it can read the tree, and says so; no
//! network, namespace, BPF or ownership capability is kept either way.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util::{cargo, root};

/// The user the tier runs as (`nobody` on Debian).
const UID: u32 = 65_534;

/// Test executables of every workspace crate but the root tier, with their package directory
/// (cargo runs a test with the package directory as its working directory).
fn test_executables() -> Result<Vec<(PathBuf, PathBuf)>> {
    let out = cargo()
        .args([
            "test",
            "--workspace",
            "--exclude",
            "paddock-tests",
            "--exclude",
            "xtask",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed: {}", out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(manifest)) =
            (msg["executable"].as_str(), msg["manifest_path"].as_str())
        else {
            continue;
        };
        let dir = Path::new(manifest)
            .parent()
            .map_or_else(root, Path::to_path_buf);
        found.push((PathBuf::from(exe), dir));
    }
    if found.is_empty() {
        bail!("cargo test --no-run named no test executables");
    }
    Ok(found)
}

/// `setpriv` arguments that become uid/gid 65534 keeping only the capabilities in `keep`.
fn setpriv(keep: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    let caps = std::iter::once("-all".to_owned())
        .chain(keep.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    cmd.args([
        &format!("--reuid={UID}"),
        &format!("--regid={UID}"),
        "--clear-groups",
        &format!("--inh-caps={caps}"),
        &format!("--ambient-caps={caps}"),
        &format!("--bounding-set={caps}"),
        "--no-new-privs",
        "--",
    ]);
    cmd
}

/// Whether uid 65534 without capabilities can read `path` (every ancestor searchable).
fn reachable_without_caps(path: &Path) -> bool {
    setpriv(&[])
        .args(["test", "-r"])
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
}

/// Run the unprivileged tier as uid 65534 with `env` set; `Ok((passed, failed))` counts test
/// results.
pub fn run_as_nobody(env: &[(&str, &str)]) -> Result<(u64, u64)> {
    let exes = test_executables()?;
    let probe = exes.first().map(|(exe, _)| exe.clone()).unwrap_or_default();
    let keep: &[&str] = if reachable_without_caps(&probe) {
        &[]
    } else {
        eprintln!(
            "xtask: the checkout is not readable by uid {UID}; the non-root tier keeps \
             CAP_DAC_READ_SEARCH and CAP_DAC_OVERRIDE only, to read it"
        );
        &["dac_read_search", "dac_override"]
    };
    let home = std::env::temp_dir().join(format!("paddock-unpriv-{}", std::process::id()));
    std::fs::create_dir_all(&home).context("creating the non-root tier's HOME")?;
    std::os::unix::fs::chown(&home, Some(UID), Some(UID)).context("chown HOME")?;
    let mut total = (0, 0);
    let mut result = Ok(());
    for (exe, dir) in &exes {
        let mut cmd = setpriv(keep);
        cmd.arg(exe)
            .current_dir(dir)
            .env("HOME", &home)
            .env("TMPDIR", &home)
            .env_remove("CARGO_TARGET_DIR")
            .envs(env.iter().copied());
        match crate::util::run_counting_tests(&mut cmd) {
            Ok((p, f)) => {
                total.0 += p;
                total.1 += f;
            }
            Err(e) => {
                result = Err(e).with_context(|| {
                    format!("{} failed as uid {UID} (it passed as root?)", exe.display())
                });
                break;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&home);
    result.map(|()| total)
}
