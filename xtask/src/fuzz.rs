//! `cargo xtask fuzz`: builds the `cargo fuzz` targets of `fuzz/` and runs each with libFuzzer
//! for a while, from a corpus under `target/fuzz-corpus/<target>` seeded from
//! `fuzz/seeds/<target>/`. Any crash, timeout or out-of-memory input fails the run; the input
//! is kept and the command that reproduces it is printed.
//!
//! Sanitizer: none. The fuzzed code is safe Rust (the unsafe modules are syscall wrappers the
//! targets do not reach), so address sanitizer would mostly re-check the standard library and
//! dependencies at about twice the build and run time; debug assertions and overflow checks
//! (cargo-fuzz's default) stay on, which is what catches parser arithmetic bugs.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::setup::NIGHTLY;
use crate::util::{output, root, run};

/// The cargo-fuzz release installed when it is missing (0.13.2 built in about 75 s here).
const CARGO_FUZZ: &str = "0.13.2";
/// Per-input time limit: an input slower than this is a finding (a hang).
const INPUT_TIMEOUT_SECS: u32 = 10;
/// Where the build puts the target binaries (cargo-fuzz's layout).
const BIN_DIR: &str = "fuzz/target/x86_64-unknown-linux-gnu/release";

/// What to run.
#[derive(Debug, Clone)]
pub struct FuzzOptions {
    /// Seconds per target (libFuzzer `-max_total_time`); 0 means until `runs` or a finding.
    pub seconds: u64,
    /// Executions per target (libFuzzer `-runs`), if bounded.
    pub runs: Option<u64>,
    /// Only these targets (all when empty).
    pub targets: Vec<String>,
    /// Targets fuzzed at the same time (one process each).
    pub jobs: usize,
    /// libFuzzer `-max_len`, if set.
    pub max_len: Option<usize>,
}

/// One target's run.
#[derive(Debug, Clone, Default)]
struct Outcome {
    target: String,
    seconds: f64,
    executions: u64,
    exec_per_sec: u64,
    corpus: usize,
    /// The kept input of a crash, timeout or out-of-memory, if any.
    finding: Option<PathBuf>,
    /// libFuzzer's exit status when it failed without naming an input.
    failed: Option<String>,
}

pub fn run_fuzz(opts: &FuzzOptions) -> Result<()> {
    crate::setup::ensure_nightly()?;
    ensure_cargo_fuzz()?;
    let all = list_targets()?;
    let targets = if opts.targets.is_empty() {
        all
    } else {
        for t in &opts.targets {
            if !all.contains(t) {
                bail!("no fuzz target {t:?} (targets: {})", all.join(", "));
            }
        }
        opts.targets.clone()
    };
    let started = Instant::now();
    let mut build = nightly_cargo();
    build.args(["fuzz", "build", "--sanitizer", "none"]);
    if targets.len() == 1 {
        build.arg(&targets[0]);
    }
    run(&mut build).context("building the fuzz targets")?;
    eprintln!(
        "xtask fuzz: targets built in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let queue = Arc::new(Mutex::new(targets.iter().cloned().collect::<VecDeque<_>>()));
    let results = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..opts.jobs.clamp(1, targets.len()))
        .map(|_| {
            let (queue, results, opts) = (queue.clone(), results.clone(), opts.clone());
            std::thread::spawn(move || -> Result<()> {
                loop {
                    let next = queue
                        .lock()
                        .map_err(|_| anyhow::anyhow!("lock"))?
                        .pop_front();
                    let Some(target) = next else {
                        return Ok(());
                    };
                    let outcome = fuzz_one(&target, &opts)?;
                    results
                        .lock()
                        .map_err(|_| anyhow::anyhow!("lock"))?
                        .push(outcome);
                }
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a fuzz worker panicked"))??;
    }
    let mut results = results.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
    results.sort_by_key(|o| targets.iter().position(|t| *t == o.target));
    println!("{}", summary(&results));
    let bad: Vec<&Outcome> = results
        .iter()
        .filter(|o| o.finding.is_some() || o.failed.is_some())
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    for o in &bad {
        match &o.finding {
            Some(input) => eprintln!(
                "xtask fuzz: {} found {}\n  reproduce: cargo +{NIGHTLY} fuzz run --sanitizer none {} {}\n  \
                 (or run {}/{} {})",
                o.target,
                input.display(),
                o.target,
                input.display(),
                BIN_DIR,
                o.target,
                input.display()
            ),
            None => eprintln!(
                "xtask fuzz: {} failed: {}",
                o.target,
                o.failed.as_deref().unwrap_or("?")
            ),
        }
    }
    bail!("{} fuzz target(s) found a problem", bad.len())
}

/// `cargo +<pinned nightly>` in the workspace root, with the outer cargo's choices removed.
fn nightly_cargo() -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root())
        .arg(format!("+{NIGHTLY}"))
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS");
    c
}

fn ensure_cargo_fuzz() -> Result<()> {
    if output(nightly_cargo().args(["fuzz", "--version"])).is_some() {
        return Ok(());
    }
    eprintln!("xtask fuzz: installing cargo-fuzz {CARGO_FUZZ} (about 75 s)");
    run(Command::new("cargo").args(["install", "--locked", &format!("cargo-fuzz@{CARGO_FUZZ}")]))
        .context("installing cargo-fuzz")
}

fn list_targets() -> Result<Vec<String>> {
    let text = output(nightly_cargo().args(["fuzz", "list"]))
        .context("`cargo fuzz list` failed (is fuzz/ intact?)")?;
    let targets: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if targets.is_empty() {
        bail!("`cargo fuzz list` named no targets");
    }
    Ok(targets)
}

/// Copies committed seeds the corpus does not have yet (by name; the fuzzer names its own
/// inputs by content hash, so names do not collide).
fn seed_corpus(seeds: &Path, corpus: &Path) -> Result<()> {
    std::fs::create_dir_all(corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let Ok(entries) = std::fs::read_dir(seeds) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let dest = corpus.join(format!("seed-{}", entry.file_name().to_string_lossy()));
        if entry.file_type()?.is_file() && !dest.exists() {
            std::fs::copy(entry.path(), &dest)
                .with_context(|| format!("seeding {}", dest.display()))?;
        }
    }
    Ok(())
}

fn fuzz_one(target: &str, opts: &FuzzOptions) -> Result<Outcome> {
    let root = root();
    let corpus = root.join("target/fuzz-corpus").join(target);
    let artifacts = root.join("target/fuzz-artifacts").join(target);
    seed_corpus(&root.join("fuzz/seeds").join(target), &corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    let log = root.join("target/fuzz-logs").join(format!("{target}.log"));
    std::fs::create_dir_all(log.parent().unwrap_or(&root))?;
    let mut cmd = Command::new(root.join(BIN_DIR).join(target));
    cmd.current_dir(&root)
        .arg(&corpus)
        .arg(format!("-max_total_time={}", opts.seconds))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1");
    if let Some(runs) = opts.runs {
        cmd.arg(format!("-runs={runs}"));
    }
    if let Some(len) = opts.max_len {
        cmd.arg(format!("-max_len={len}"));
    }
    eprintln!("xtask fuzz: {target}: {cmd:?} (log {})", log.display());
    let started = Instant::now();
    // libFuzzer reports on stderr; straight into the log so long runs can be followed.
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let exit = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .status()
        .with_context(|| format!("starting {target} (built?)"))?;
    let seconds = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&std::fs::read(&log)?).into_owned();
    let stats = Stats::parse(&text);
    let mut outcome = Outcome {
        target: target.to_owned(),
        seconds,
        executions: stats.executions,
        exec_per_sec: stats.exec_per_sec,
        corpus: std::fs::read_dir(&corpus).map_or(0, Iterator::count),
        finding: stats.artifact.map(PathBuf::from),
        failed: None,
    };
    if !exit.success() && outcome.finding.is_none() {
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        outcome.failed = Some(format!("{exit}; last lines:\n{}", tail.join("\n")));
    }
    if outcome.finding.is_some() {
        // libFuzzer's own report (panic message, backtrace) is in the log; show its start.
        let report: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.contains("panicked") && !l.starts_with("==") && !l.contains("ERROR"))
            .take(30)
            .collect();
        eprintln!("xtask fuzz: {target}:\n{}", report.join("\n"));
    }
    eprintln!(
        "xtask fuzz: {target}: {} executions in {seconds:.0} s",
        outcome.executions
    );
    Ok(outcome)
}

/// What libFuzzer reports at the end of a run.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stats {
    executions: u64,
    exec_per_sec: u64,
    /// `Test unit written to <path>` (crash, timeout, oom, leak).
    artifact: Option<String>,
}

impl Stats {
    fn parse(log: &str) -> Self {
        let stat = |name: &str| {
            log.lines()
                .rev()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        let mut stats = Stats {
            executions: stat("stat::number_of_executed_units:").unwrap_or(0),
            exec_per_sec: stat("stat::average_exec_per_sec:").unwrap_or(0),
            artifact: log.lines().find_map(|l| {
                l.split_once("Test unit written to ")
                    .map(|(_, p)| p.trim().to_owned())
            }),
        };
        if stats.executions == 0 {
            // A crash ends the run before the final stats; the last status line has the count
            // (`#1234 NEW cov: ...`, `#1234 DONE ...`).
            stats.executions = log
                .lines()
                .rev()
                .find_map(|l| {
                    let rest = l.strip_prefix('#')?;
                    rest.split_whitespace().next()?.parse().ok()
                })
                .unwrap_or(0);
        }
        stats
    }
}

fn summary(results: &[Outcome]) -> String {
    let mut out = String::from(
        "\nfuzz summary\n| target | seconds | executions | exec/s | corpus | crashes |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for o in results {
        let crashes = usize::from(o.finding.is_some() || o.failed.is_some());
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {} |",
            o.target, o.seconds, o.executions, o.exec_per_sec, o.corpus, crashes
        );
    }
    let total: u64 = results.iter().map(|o| o.executions).sum();
    let _ = writeln!(out, "total executions: {total}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_stats_are_read() {
        let log = "#2\tINITED cov: 10 ft: 10 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #70000\tDONE   cov: 99 ft: 120 corp: 9/99b lim: 4 exec/s: 35000 rss: 40Mb\n\
                   Done 70000 runs in 2 second(s)\n\
                   stat::number_of_executed_units: 70000\n\
                   stat::average_exec_per_sec:     35000\n\
                   stat::new_units_added:          8\n";
        assert_eq!(
            Stats::parse(log),
            Stats {
                executions: 70000,
                exec_per_sec: 35000,
                artifact: None
            }
        );
    }

    #[test]
    fn a_crash_names_its_input_and_the_last_count() {
        let log = "#1024\tpulse  cov: 50 ft: 60 corp: 5/50b exec/s: 512 rss: 30Mb\n\
                   #1500\tNEW    cov: 51 ft: 61 corp: 6/55b lim: 4 exec/s: 500 rss: 30Mb\n\
                   thread '<unnamed>' panicked at fuzz_targets/x.rs:3:5:\n\
                   ==123== ERROR: libFuzzer: deadly signal\n\
                   artifact_prefix='/t/'; Test unit written to /t/crash-abc\n";
        let stats = Stats::parse(log);
        assert_eq!(stats.artifact.as_deref(), Some("/t/crash-abc"));
        assert_eq!(stats.executions, 1500);
    }

    #[test]
    fn summary_counts_findings() {
        let ok = Outcome {
            target: "a".into(),
            executions: 10,
            ..Outcome::default()
        };
        let bad = Outcome {
            target: "b".into(),
            executions: 5,
            finding: Some("/x".into()),
            ..Outcome::default()
        };
        let text = summary(&[ok, bad]);
        assert!(text.contains("| a | 0 | 10 | 0 | 0 | 0 |"), "{text}");
        assert!(text.contains("| b | 0 | 5 | 0 | 0 | 1 |"), "{text}");
        assert!(text.contains("total executions: 15"), "{text}");
    }
}
