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
    "containernetworking-plugins", // bridge + host-local: the CNI chain paddock-cni joins in tests
    "postgresql", // the broker's PostgreSQL store: a private server per `cargo xtask test`
];

/// The dated nightly every nightly-only build uses (the eBPF object, clippy on it, fuzzing),
/// so a new nightly cannot change the eBPF bytecode or break the build unannounced. It must
/// match `paddock-ebpf/rust-toolchain.toml` (checked by a test). rustc 1.97.0-nightly
/// (e50aa6fba 2026-05-19), LLVM 22: the LLVM bpf-linker links with.
pub(crate) const NIGHTLY: &str = "nightly-2026-05-20";

/// bpf-linker version known to work with nightly's LLVM here.
const BPF_LINKER: &str = "0.10.4";
/// cargo-deny for `cargo xtask deny` (`deny.toml` uses its 0.20 format; builds with rustc
/// 1.88+). No prebuilt download (GitHub is unreachable here): `cargo install` compiles it,
/// measured 12m53s wall / 4m44s CPU on the 2 shared cores under other builds' load.
const CARGO_DENY: &str = "0.20.2";

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
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        eprintln!("xtask setup: installing the pinned {NIGHTLY} toolchain (~40 s)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
            "--component",
            "clippy",
        ]))?;
    }
    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))
    .unwrap_or_default();
    // rust-src for -Z build-std=core, clippy for linting the eBPF crate for its own target.
    for c in ["rust-src", "clippy"] {
        if !comps.lines().any(|l| l.starts_with(c)) {
            eprintln!("xtask setup: adding {c} to {NIGHTLY}");
            run(Command::new("rustup").args(["component", "add", c, "--toolchain", NIGHTLY]))?;
        }
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
            &format!("+{NIGHTLY}"),
            "install",
            &format!("bpf-linker@{BPF_LINKER}"),
            "--locked",
        ])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC"))
    .context("installing bpf-linker")
}

/// Any installed cargo-deny 0.20.x is kept; otherwise the pinned one is installed.
fn ensure_cargo_deny() -> Result<()> {
    let have = output(Command::new("cargo").args(["deny", "--version"])).unwrap_or_default();
    let wanted = CARGO_DENY
        .rsplit_once('.')
        .map_or(CARGO_DENY, |(minor, _)| minor);
    if have
        .split_whitespace()
        .nth(1)
        .is_some_and(|v| v.starts_with(&format!("{wanted}.")))
    {
        return Ok(());
    }
    eprintln!("xtask setup: installing cargo-deny {CARGO_DENY} (compiles from source, minutes)");
    run(Command::new("cargo").args(["install", "--locked", &format!("cargo-deny@{CARGO_DENY}")]))
        .context("installing cargo-deny")
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
    ensure_cargo_deny()?;
    eprintln!("xtask setup: all prerequisites present");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::NIGHTLY;

    #[test]
    fn the_pinned_nightly_is_the_one_the_ebpf_crate_names() {
        let file = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../paddock-ebpf/rust-toolchain.toml"
        );
        let text = std::fs::read_to_string(file).expect("paddock-ebpf/rust-toolchain.toml");
        let doc: toml::Table = text.parse().expect("rust-toolchain.toml parses");
        let channel = doc["toolchain"]["channel"].as_str().expect("a channel");
        assert_eq!(
            channel, NIGHTLY,
            "xtask and paddock-ebpf pin different nightlies"
        );
    }
}
