//! `cargo xtask deny`: cargo-deny over the workspace with `deny.toml`.
//!
//! Licenses, bans (duplicate versions) and sources are checked on every run. Advisories need
//! the `RustSec` database, which cargo-deny clones from GitHub; the project's machines and CI
//! cannot reach GitHub, so:
//!
//! - `PADDOCK_ADVISORY_DB=<dir>` (a git clone, worktree or mirror of rustsec/advisory-db with
//!   its `main` branch): cargo-deny fetches that copy instead of GitHub (a `url.insteadOf`
//!   rewrite in git's environment) and advisories are checked; a directory that is not such a
//!   copy is an error.
//! - otherwise cargo-deny tries GitHub itself; when that fails the run prints one loud line
//!   saying advisories were NOT checked and why, and still succeeds.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::util::{cargo, output, run};

/// The database URL in `deny.toml` (`[advisories] db-urls`); the rewrite maps exactly this.
const ADVISORY_DB_URL: &str = "https://github.com/rustsec/advisory-db";
/// An unreachable network must not stall the lint phase: a fetch that takes longer is given up.
const FETCH_TIMEOUT: Duration = Duration::from_mins(2);

pub fn run_deny() -> Result<()> {
    if output(cargo().args(["deny", "--version"])).is_none() {
        bail!("cargo-deny is not installed: run `cargo xtask setup`");
    }
    run(deny().args(["check", "licenses", "bans", "sources"]))
        .context("cargo deny: licenses, bans or sources failed (see deny.toml)")?;
    match std::env::var_os("PADDOCK_ADVISORY_DB") {
        Some(dir) if !dir.is_empty() => advisories_from(&PathBuf::from(dir)),
        _ => advisories_from_github(),
    }
}

/// `cargo deny --locked` in the workspace root (where `deny.toml` and its `db-path` live).
fn deny() -> Command {
    let mut cmd = cargo();
    cmd.args(["deny", "--locked"]);
    cmd
}

fn advisories_from(dir: &Path) -> Result<()> {
    let dir = std::path::absolute(dir)
        .with_context(|| format!("PADDOCK_ADVISORY_DB={}", dir.display()))?;
    let head = advisory_db_head(&dir).with_context(|| {
        format!(
            "PADDOCK_ADVISORY_DB={} is not a git copy of rustsec/advisory-db with a `main` \
             branch (e.g. `git clone <mirror> target/advisory-db`)",
            dir.display()
        )
    })?;
    eprintln!(
        "xtask deny: advisories from PADDOCK_ADVISORY_DB={} (advisory-db {head})",
        dir.display()
    );
    let mut cmd = deny();
    cmd.args(["check", "advisories"]);
    redirect_advisory_db(&mut cmd, &dir);
    run(&mut cmd).context("cargo deny: advisories failed")
}

/// `<short hash> <commit date>` of the copy's `main`, so a stale copy is visible in the log.
fn advisory_db_head(dir: &Path) -> Result<String> {
    let git = || {
        let mut cmd = Command::new("git");
        cmd.arg("-C").arg(dir);
        cmd
    };
    // Git, not the work tree: cargo-deny clones `main` from it (a bare mirror works too).
    if output(git().args(["rev-parse", "--verify", "-q", "main:crates"])).is_none() {
        bail!("its `main` branch has no crates/ directory");
    }
    output(git().args(["log", "-1", "--format=%h %cs", "main", "--"]))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .context("`git log main` failed there")
}

/// Makes every git that cargo-deny runs read `dir` where it would fetch the GitHub database,
/// through git's environment configuration (keeps whatever `GIT_CONFIG_*` is already set).
fn redirect_advisory_db(cmd: &mut Command, dir: &Path) {
    let n: usize = std::env::var("GIT_CONFIG_COUNT")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    cmd.env("GIT_CONFIG_COUNT", (n + 1).to_string())
        .env(
            format!("GIT_CONFIG_KEY_{n}"),
            format!("url.file://{}.insteadOf", dir.display()),
        )
        .env(format!("GIT_CONFIG_VALUE_{n}"), ADVISORY_DB_URL);
}

fn advisories_from_github() -> Result<()> {
    if let Err(why) = fetch_advisory_db() {
        eprintln!(
            "xtask deny: WARNING: ADVISORIES NOT CHECKED: the RustSec advisory database could \
             not be fetched from {ADVISORY_DB_URL} ({why}); set PADDOCK_ADVISORY_DB=<git copy \
             of rustsec/advisory-db> to check them"
        );
        return Ok(());
    }
    run(deny().args(["check", "advisories"])).context("cargo deny: advisories failed")
}

/// `cargo deny fetch db`, bounded in time; the error is a one-line reason.
fn fetch_advisory_db() -> Result<(), String> {
    let mut child = deny()
        .args(["fetch", "db"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start cargo deny: {e}"))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < FETCH_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {}s", FETCH_TIMEOUT.as_secs()));
            }
            Err(e) => return Err(format!("waiting for cargo deny: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    Err(fetch_failure_reason(&stderr))
}

/// The most telling line of cargo-deny's fetch error: git's `fatal:` line when there is one
/// (e.g. "Could not resolve host: github.com"), else the last non-empty line.
fn fetch_failure_reason(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines
        .iter()
        .find_map(|l| l.find("fatal:").map(|i| &l[i..]))
        .or_else(|| lines.last().copied())
        .unwrap_or("cargo deny fetch db failed without a message")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::fetch_failure_reason;

    #[test]
    fn the_fetch_failure_is_named_by_gits_fatal_line_else_the_last_line() {
        let stderr = "2026-12-06 [ERROR] failed to fetch advisory database\n\
                      Caused by:\n    [\"clone\", \"--depth=1\"]\n    \
                      fatal: unable to access 'https://github.com/rustsec/advisory-db/': \
                      Could not resolve host: github.com\n\n";
        assert_eq!(
            fetch_failure_reason(stderr),
            "fatal: unable to access 'https://github.com/rustsec/advisory-db/': Could not \
             resolve host: github.com"
        );
        assert_eq!(fetch_failure_reason("one\ntwo\n\n"), "two");
        assert_eq!(
            fetch_failure_reason(""),
            "cargo deny fetch db failed without a message"
        );
    }
}
