//! `cargo xtask setup`: idempotent installation of build and test prerequisites on Debian.
//!
//! Each step checks first and only installs what is missing, so a second run takes a second.

use std::process::Command;

use anyhow::{Context, Result};

use crate::util::{output, run};

/// Debian packages the build, the tests, the benchmarks and the demo use.
pub const APT_PACKAGES: &[&str] = &[
    "iproute2",    // ip netns / veth for the test hosts
    "iptables",    // the iptables REDIRECT baseline in `bench redirect`
    "curl",        // real client in tests and the demo
    "wrk",         // load generator for benchmarks
    "nginx-light", // TLS upstream in proxy tests
    "python3",     // real client in tests
    "git",         // git-over-HTTPS client in end-to-end tests
    "openssl",
    "ca-certificates",
];

/// bpf-linker version known to work with nightly's LLVM here.
const BPF_LINKER: &str = "0.10.4";

fn apt_missing() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect()
}

fn ensure_apt() -> Result<()> {
    let missing = apt_missing();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask setup: installing Debian packages {missing:?}");
    run(Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get update (are you root?)")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get install")
}

pub(crate) fn ensure_nightly() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask setup: installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask setup: adding rust-src to nightly (needed for -Z build-std=core)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.contains(BPF_LINKER) {
        return Ok(());
    }
    eprintln!("xtask setup: installing bpf-linker {BPF_LINKER} (uses nightly's LLVM, ~2 min)");
    run(Command::new("cargo")
        .args([
            "+nightly",
            "install",
            &format!("bpf-linker@{BPF_LINKER}"),
            "--locked",
        ])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC"))
    .context("installing bpf-linker")
}

fn ensure_rust_components() -> Result<()> {
    let comps = output(Command::new("rustup").args(["component", "list", "--installed"]))
        .unwrap_or_default();
    for c in ["clippy", "rustfmt"] {
        if !comps.lines().any(|l| l.starts_with(c)) {
            run(Command::new("rustup").args(["component", "add", c]))?;
        }
    }
    Ok(())
}

pub fn run_setup() -> Result<()> {
    ensure_apt()?;
    ensure_rust_components()?;
    ensure_nightly()?;
    ensure_bpf_linker()?;
    eprintln!("xtask setup: all prerequisites present");
    Ok(())
}
