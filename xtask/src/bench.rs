//! `cargo xtask bench ...`: run a benchmark binary (release build) and record its markdown
//! section in BENCHMARKS.md between `<!-- bench:NAME -->` markers.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::util::{cargo, root, run};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Which {
    /// Connection set-up: direct vs eBPF-redirected vs iptables REDIRECT.
    Redirect,
    /// HTTPS through the proxy vs direct (keep-alive and new connections), leaf forging.
    Proxy,
    /// Broker substitute-auth requests/s and latency with static-key and JWT auth.
    Broker,
    /// `paddock-proxy run` end to end (eBPF + MITM + broker substitution) vs direct.
    E2e,
    /// Response scrubbing cost per byte (identity, many secrets, gzip) vs pass-through.
    Scrub,
    /// The same HTTPS workload direct, through squid's ssl-bump and through Paddock
    /// (cooperative and transparent), interleaved, with CPU per request of each process.
    Peers,
    /// `paddock-proxy node`: pod set-up latency, memory and descriptors per pod, keep-alive
    /// rate with 1 and 50 busy pods, each vs direct.
    Node,
    /// Over a million substituted requests through `paddock-proxy run`, its memory and
    /// descriptors sampled every 10 s.
    Soak,
    /// 10,000 idle intercepted connections: the proxy's memory and descriptors per connection.
    Idle,
    /// 1,000 concurrent first contacts to 1,000 distinct names (a leaf forged for each) vs
    /// direct and vs the same names again.
    FirstContacts,
    /// The peers lab's Paddock with one and with two runtime worker threads, interleaved.
    Workers,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Self::Redirect => "redirect",
            Self::Proxy => "proxy",
            Self::Broker => "broker",
            Self::E2e => "e2e",
            Self::Scrub => "scrub",
            Self::Node => "node",
            Self::Soak => "soak",
            Self::Idle => "idle",
            Self::FirstContacts => "first-contacts",
            Self::Peers => "peers",
            Self::Workers => "workers",
        }
    }
    fn binary(self) -> &'static str {
        match self {
            Self::Redirect => "pdk-bench-redirect",
            // Idle connections are a mode of the proxy lab.
            Self::Proxy | Self::Idle | Self::FirstContacts => "pdk-bench-proxy",
            Self::Broker => "pdk-bench-broker",
            // The soak is a mode of the end-to-end lab.
            Self::E2e | Self::Soak => "pdk-bench-e2e",
            Self::Scrub => "pdk-bench-scrub",
            Self::Node => "pdk-bench-node",
            // A mode of the peers lab.
            Self::Peers | Self::Workers => "pdk-bench-peers",
        }
    }
    /// Arguments of the benchmark binary.
    fn args(self) -> &'static [&'static str] {
        match self {
            Self::Soak => &["--soak"],
            Self::Idle => &["--idle"],
            Self::FirstContacts => &["--first-contacts"],
            Self::Workers => &["workers"],
            _ => &[],
        }
    }

    /// `cargo build --release` arguments that produce the binary.
    fn build_args(self) -> &'static [&'static str] {
        match self {
            Self::Redirect
            | Self::Proxy
            | Self::E2e
            | Self::Scrub
            | Self::Soak
            | Self::Peers
            | Self::Workers
            | Self::Idle
            | Self::FirstContacts => &["-p", "paddock-tests", "-p", "paddock-app", "--bins"],
            Self::Broker => &[
                "-p",
                "paddock-broker",
                "--features",
                "bench",
                "--bin",
                "pdk-bench-broker",
            ],
            // The node lab runs the broker as its own process.
            Self::Node => &[
                "-p",
                "paddock-tests",
                "-p",
                "paddock-app",
                "-p",
                "paddock-broker",
                "--bins",
            ],
        }
    }
}

/// Where cargo puts release binaries (honours `CARGO_TARGET_DIR`).
fn release_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), |d| root().join(PathBuf::from(d)));
    target.join("release")
}

pub fn run_bench(which: Which) -> Result<()> {
    run(cargo()
        .args(["build", "--release"])
        .args(which.build_args()))?;
    let bin = release_dir().join(which.binary());
    // The broker bench's PostgreSQL rows run against a private server (stopped on return).
    let postgres = matches!(which, Which::Broker)
        .then(crate::pg::start)
        .transpose()
        .context("starting the PostgreSQL server for the broker bench")?;
    let out = Command::new(&bin)
        .args(which.args())
        .envs(postgres.iter().map(|p| (crate::pg::ENV, p.conninfo())))
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{} failed: {}", bin.display(), out.status);
    }
    let section = String::from_utf8(out.stdout).context("benchmark output is not UTF-8")?;
    print!("{section}");
    record(which.name(), &section)
}

/// Replace (or append) the section between the markers of `name`.
fn record(name: &str, section: &str) -> Result<()> {
    let path = root().join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let start = format!("<!-- bench:{name}:start -->");
    let end = format!("<!-- bench:{name}:end -->");
    let block = format!("{start}\n{}\n{end}", section.trim_end());
    let new = match (text.find(&start), text.find(&end)) {
        (Some(s), Some(e)) if e > s => format!("{}{block}{}", &text[..s], &text[e + end.len()..]),
        _ => format!("{}\n{block}\n", text.trim_end()),
    };
    std::fs::write(&path, new).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("xtask: recorded {name} in {}", path.display());
    Ok(())
}
