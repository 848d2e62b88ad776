//! `cargo xtask`: set-up, eBPF build, the whole test suite, benchmarks and the demo.

mod bench;
mod deny;
mod fuzz;
mod modules;
mod pg;
mod setup;
mod unprivileged;
mod util;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::util::{cargo, root, run};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "Paddock developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install everything the build and tests need (idempotent; fast when all is present).
    Setup,
    /// Build the eBPF object (with BTF) that paddock-proxy embeds.
    BuildEbpf,
    /// cargo-deny: licenses, duplicate versions, sources; advisories when a database is at
    /// hand (`PADDOCK_ADVISORY_DB=<git copy of rustsec/advisory-db>`, or GitHub reachable).
    Deny,
    /// Fail on a module cycle in any crate of the workspace (`crate::`/`super::` paths).
    Modules,
    /// Set-up, eBPF build, lints and the whole test suite (unprivileged and root tiers).
    Test {
        /// Skip the lint phase (rustfmt, cargo-deny, clippy).
        #[arg(long)]
        no_lint: bool,
        /// Skip the short fuzz runs (their nightly build takes minutes from clean).
        #[arg(long)]
        no_fuzz: bool,
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The unprivileged tier (every crate but the root-tier `paddock-tests`) as uid 65534
    /// without capabilities; `test` runs this too when started as root.
    TestUnprivileged,
    /// Run a benchmark and record it in BENCHMARKS.md.
    Bench {
        #[arg(value_enum)]
        which: bench::Which,
    },
    /// Set up, build and show interception working end to end on this machine.
    Demo,
    /// Regenerate deploy/crds/*.yaml from the CRD types (paddock-broker's `cluster::crd`).
    Crds,
    /// Build the `cargo fuzz` targets (fuzz/) and run each with libFuzzer; fails on a finding.
    Fuzz {
        /// Seconds per target (0: no time limit; then give --runs).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Stop each target after this many executions.
        #[arg(long)]
        runs: Option<u64>,
        /// Only this target (repeatable; default: all).
        #[arg(long = "target")]
        targets: Vec<String>,
        /// Targets fuzzed at the same time.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Longest input libFuzzer generates (its default follows the corpus).
        #[arg(long)]
        max_len: Option<usize>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run_setup(),
        Command::BuildEbpf => build_ebpf(),
        Command::Deny => deny::run_deny(),
        Command::Modules => modules::run_modules(),
        Command::Test {
            no_lint,
            no_fuzz,
            args,
        } => test(no_lint, no_fuzz, &args),
        Command::Bench { which } => {
            setup::run_setup()?;
            build_ebpf()?;
            bench::run_bench(which)
        }
        Command::TestUnprivileged => {
            if !is_root() {
                bail!("test-unprivileged switches to uid 65534 and so must start as root");
            }
            let server = pg::start().context("starting the PostgreSQL test server")?;
            let (p, f) = unprivileged::run_as_nobody(&[(pg::ENV, server.conninfo())])?;
            println!("tests (uid 65534): {p} passed, {f} failed");
            Ok(())
        }
        Command::Demo => demo(),
        Command::Crds => run(cargo()
            .args([
                "test",
                "-p",
                "paddock-broker",
                "--test",
                "crds",
                "--",
                "committed_crds_match_the_types",
            ])
            .env("PADDOCK_WRITE_CRDS", "1")),
        Command::Fuzz {
            seconds,
            runs,
            targets,
            jobs,
            max_len,
        } => {
            if seconds == 0 && runs.is_none() {
                bail!("--seconds 0 needs --runs (else the fuzzers never stop)");
            }
            fuzz::run_fuzz(&fuzz::FuzzOptions {
                seconds,
                runs,
                targets,
                jobs,
                max_len,
            })
        }
    }
}

/// Crates the proxy library (the data plane) must never link: the broker and what only the
/// broker needs (its database, JWT, RSA). Composition that needs them lives in `paddock-app`.
const NOT_IN_THE_PROXY: &[&str] = &[
    "paddock-broker",
    "rusqlite",
    "postgres",
    "jsonwebtoken",
    "rsa",
];

/// `cargo tree -p paddock-proxy -e normal` holds none of [`NOT_IN_THE_PROXY`].
fn proxy_links_no_broker() -> Result<()> {
    let out = cargo()
        .args([
            "tree",
            "-p",
            "paddock-proxy",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .output()
        .context("cargo tree")?;
    if !out.status.success() {
        bail!("cargo tree -p paddock-proxy failed: {}", out.status);
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    let found: Vec<&str> = NOT_IN_THE_PROXY
        .iter()
        .copied()
        .filter(|krate| {
            tree.lines()
                .any(|l| l.split_whitespace().next() == Some(*krate))
        })
        .collect();
    if !found.is_empty() {
        bail!(
            "the paddock-proxy library links {found:?}; it depends on paddock-wire only (move \
             the code that needs them to paddock-app)"
        );
    }
    eprintln!("xtask: paddock-proxy links none of {NOT_IN_THE_PROXY:?}");
    Ok(())
}

/// clippy on the eBPF crate for its own target (it is outside the host build, so the
/// workspace clippy run never sees it).
fn clippy_ebpf() -> Result<()> {
    let root = root();
    let mut cmd = std::process::Command::new("cargo");
    cmd.current_dir(root.join("paddock-ebpf"))
        .arg(format!("+{}", setup::NIGHTLY))
        .args([
            "clippy",
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
            "--release",
        ])
        .arg("--target-dir")
        .arg(root.join("target"))
        .args(["--", "-D", "warnings"])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run(&mut cmd).context("clippy on the eBPF crate (bpfel-unknown-none) found problems")
}

/// `cargo +<pinned nightly> build -Z build-std=core --target bpfel-unknown-none --release` with BTF.
pub fn build_ebpf() -> Result<()> {
    let root = root();
    let target_dir = root.join("target");
    let mut cmd = std::process::Command::new("cargo");
    cmd.current_dir(root.join("paddock-ebpf"))
        .arg(format!("+{}", setup::NIGHTLY))
        .args([
            "build",
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
            "--release",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        // The outer cargo's choices must not leak into the nightly BPF build.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run(&mut cmd).context("eBPF build failed (is `cargo xtask setup` done?)")?;
    let obj = target_dir.join("bpfel-unknown-none/release/paddock-ebpf");
    if !obj.exists() {
        bail!("eBPF build produced no object at {}", obj.display());
    }
    eprintln!("xtask: eBPF object at {}", obj.display());
    Ok(())
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Seconds each fuzz target runs in `cargo xtask test`.
const CI_FUZZ_SECONDS: u64 = 5;

/// What a clean `cargo xtask test` writes: 2.2 GB peak under `target/` and 0.86 GB under
/// `fuzz/target/` (measured).
const CLEAN_TEST_BUILD_BYTES: u64 = 3_300_000_000;

fn test(no_lint: bool, no_fuzz: bool, extra: &[String]) -> Result<()> {
    warn_if_disk_short();
    setup::run_setup()?;
    build_ebpf()?;
    // Milliseconds, no build: run even with --no-lint.
    modules::run_modules().context("module cycles: move the shared item to a leaf module")?;
    proxy_links_no_broker()?;
    if !no_lint {
        run(cargo().args(["fmt", "--all", "--check"])).context("rustfmt: run `cargo fmt --all`")?;
        deny::run_deny()?;
        clippy_ebpf()?;
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
        .context("clippy found problems")?;
        // Broken intra-doc links and malformed doc HTML fail the build like lints do.
        run(cargo()
            .args(["doc", "--workspace", "--no-deps"])
            .env("RUSTDOCFLAGS", "-D warnings"))
        .context("cargo doc found problems")?;
    }
    // Root-tier tests start the binaries (paddock-proxy, pdk-client) next to them.
    // With --tests so dev-dependency feature unification matches `cargo test` (one build, not two).
    run(cargo().args(["build", "--workspace", "--bins", "--tests"]))?;
    if !is_root() {
        if std::env::var("CI").as_deref() == Ok("true") {
            bail!("CI=true but not root: the root tier (netns, cgroups, eBPF) cannot run");
        }
        eprintln!(
            "xtask: not root: root-tier tests will print SKIPPED; run `sudo cargo xtask test`"
        );
    }
    // Stopped and removed when `server` drops, whichever way this function returns.
    let server = pg::start().context("starting the PostgreSQL test server")?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"])
        .env(pg::ENV, server.conninfo());
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    let (mut passed, mut failed) = util::run_counting_tests(&mut cmd).context("tests failed")?;
    // As root, the unprivileged tier once more as uid 65534 without capabilities: a test that
    // leans on root unnoticed fails here.
    if is_root() {
        let (p, f) = unprivileged::run_as_nobody(&[(pg::ENV, server.conninfo())])
            .context("the non-root test tier failed")?;
        eprintln!("xtask: non-root tier (uid 65534): {p} passed, {f} failed");
        passed += p;
        failed += f;
    }
    // Short fuzz runs: every target builds, and its seeds and a few seconds of mutations pass.
    // The long runs (10M executions per target) are recorded in RELIABILITY.md.
    if no_fuzz {
        eprintln!("xtask: --no-fuzz: fuzz targets not run");
    } else {
        fuzz::run_fuzz(&fuzz::FuzzOptions {
            seconds: CI_FUZZ_SECONDS,
            runs: None,
            targets: Vec::new(),
            jobs: 1,
            max_len: None,
        })
        .context("fuzzing found a problem")?;
    }
    // One closing line for the whole suite (cargo's last line is often an empty doc-test run).
    println!("tests: {passed} passed, {failed} failed");
    Ok(())
}

/// A full disk shows up minutes later as a linker bus error; say it up front instead.
fn warn_if_disk_short() {
    let target = root().join("target");
    let probe = if target.exists() { target } else { root() };
    if let Some(free) = util::free_bytes(&probe)
        && free < CLEAN_TEST_BUILD_BYTES
    {
        #[expect(
            clippy::cast_precision_loss,
            reason = "a human-readable size, two decimals"
        )]
        let gb = |b: u64| b as f64 / 1e9;
        eprintln!(
            "xtask: warning: {:.2} GB free under {}; a clean test build writes about {:.1} GB \
             (an existing target/ and fuzz/target/ need less)",
            gb(free),
            probe.display(),
            gb(CLEAN_TEST_BUILD_BYTES)
        );
    }
}

fn demo() -> Result<()> {
    setup::run_setup()?;
    build_ebpf()?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "paddock-app",
        "-p",
        "paddock-tests",
        // The interactive part drives the run with the `paddock-broker` CLI.
        "-p",
        "paddock-broker",
        "--bins",
    ]))?;
    if !is_root() {
        bail!("the demo attaches eBPF programs and creates namespaces: run it as root");
    }
    run(&mut std::process::Command::new(
        root().join("target/release/pdk-demo"),
    ))
}
