//! Small process helpers.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or(manifest.clone(), PathBuf::from)
}

/// `cargo` (stable, the workspace's toolchain) in the workspace root.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Run a command with inherited stdio; fail with its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("starting {}", cmd.get_program().display()))?;
    if !status.success() {
        bail!("{} failed: {status}", cmd.get_program().display());
    }
    Ok(())
}

/// Run a command and capture stdout; `None` when it cannot start or fails.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run `cargo test`, echoing its output, and add up its `test result:` lines.
pub fn run_counting_tests(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", cmd.get_program().display()))?;
    let (mut passed, mut failed) = (0, 0);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.context("reading test output")?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                passed += count(rest, " passed");
                failed += count(rest, " failed");
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok((passed, failed))
}

/// The number before `label` in `ok. 3 passed; 0 failed; ...`.
fn count(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(label.trim_start())
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Free bytes on the filesystem holding `path`, from `df` (xtask stays free of libc bindings).
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    let out = output(Command::new("df").arg("-Pk").arg(path))?;
    let line = out.lines().nth(1)?;
    let kib: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::free_bytes;

    #[test]
    fn counts_are_read_from_a_cargo_summary() {
        let s = "ok. 22 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!(super::count(s, " passed"), 22);
        assert_eq!(super::count(s, " failed"), 1);
        assert_eq!(super::count("FAILED. 3 passed; 2 failed;", " failed"), 2);
        assert_eq!(super::count("garbage", " passed"), 0);
    }

    #[test]
    fn free_bytes_reads_df_for_an_existing_path_and_refuses_a_missing_one() {
        let free = free_bytes(std::path::Path::new(env!("CARGO_MANIFEST_DIR")));
        assert!(free.is_some_and(|b| b > 0), "{free:?}");
        assert_eq!(
            free_bytes(std::path::Path::new("/nonexistent/paddock")),
            None
        );
    }
}
