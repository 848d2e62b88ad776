//! `cargo xtask bench redirect`: connection set-up rate and latency to one local listener,
//! dialled directly, through Paddock's eBPF redirect (with and without the inbound-control
//! programs), and through an iptables REDIRECT, in one run. Prints a markdown section for
//! BENCHMARKS.md on stdout.
//!
//! Every mode uses the same listener (which asks `SO_ORIGINAL_DST` and answers one byte) and
//! the same client (sequential connect + 1-byte read), in a private network namespace. Modes
//! are interleaved over several rounds and the median round is reported.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener},
    os::fd::AsFd,
    process::Command,
};

use anyhow::{Context, Result, bail};
use paddock_proxy::{
    cgroup::Cgroup,
    ebpf::{AgentConfig, INBOUND_PROGRAMS, Interception, Interceptor, LoadOptions, agent_link_pin},
    origdst::{OriginalDst, SockoptOriginalDst},
};
use paddock_tests::{
    CgroupGuard, PinDir, Topology,
    inbound::Listener,
    process::{Placement, client},
};
use serde_json::Value;

const PORT: u16 = 15001;
const CONNECTIONS: &str = "4000";
const ROUNDS: usize = 6;

fn serve(listener: TcpListener) {
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = SockoptOriginalDst.original_dst(s.as_fd());
            let _ = s.write_all(b"x");
        }
    });
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

fn sample(v: &Value) -> Result<Sample> {
    let f = |k: &str| v[k].as_f64().with_context(|| format!("missing {k} in {v}"));
    if v["errors"].as_u64().unwrap_or(1) != 0 {
        bail!("connections failed: {v}");
    }
    Ok(Sample {
        per_sec: f("per_sec")?,
        p50_us: f("p50_us")?,
        p99_us: f("p99_us")?,
    })
}

fn median(mut xs: Vec<Sample>) -> Sample {
    xs.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
    xs[xs.len() / 2]
}

fn main() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench redirect needs root (namespaces, cgroups, eBPF, iptables)");
    }
    let topo = Topology::new();
    let listener = topo
        .agent
        .run(|| TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], PORT))))
        .context("netns")??;
    serve(listener);

    let pins = PinDir::new();
    let mut ic = Interceptor::load(&LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        ..LoadOptions::default()
    })?;
    ic.attach_proxy(&Cgroup::current()?)?;
    let agent = CgroupGuard::new("bench");
    ic.attach_agent(agent.cgroup(), &AgentConfig::loopback(PORT))?;
    let no_inbound = attach_without_inbound(&mut ic, &pins)?;
    check_inbound_programs(&topo, &agent, &no_inbound)?;

    // iptables baseline: NAT only port 8443 so the eBPF mode (port 443) is untouched by it.
    let ipt = Command::new("ip")
        .args([
            "netns",
            "exec",
            topo.agent.name(),
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "10.77.0.1",
            "--dport",
            "8443",
            "-j",
            "REDIRECT",
            "--to-ports",
            &PORT.to_string(),
        ])
        .output()?;
    let iptables_ok = ipt.status.success();
    if !iptables_ok {
        eprintln!(
            "iptables REDIRECT unavailable: {}",
            String::from_utf8_lossy(&ipt.stderr)
        );
    }

    let direct_at = Placement {
        netns: Some(&topo.agent),
        cgroup: None,
        user: None,
    };
    let ebpf_at = Placement {
        netns: Some(&topo.agent),
        cgroup: Some(&agent),
        user: None,
    };
    let no_inbound_at = Placement {
        netns: Some(&topo.agent),
        cgroup: Some(&no_inbound),
        user: None,
    };
    let direct_target = format!("127.0.0.1:{PORT}");
    let (mut direct, mut ebpf, mut iptables) = (Vec::new(), Vec::new(), Vec::new());
    let mut ebpf_no_inbound = Vec::new();
    for round in 0..ROUNDS {
        eprintln!("round {}/{ROUNDS}", round + 1);
        direct.push(sample(&client(
            &["bench-connect", &direct_target, CONNECTIONS],
            &direct_at,
        ))?);
        // The two eBPF modes swap places every round, so neither always runs after the other.
        let mut pair = [
            (&mut ebpf, &ebpf_at),
            (&mut ebpf_no_inbound, &no_inbound_at),
        ];
        if round % 2 == 1 {
            pair.reverse();
        }
        for (samples, at) in pair {
            samples.push(sample(&client(
                &["bench-connect", "10.77.0.1:443", CONNECTIONS],
                at,
            ))?);
        }
        if iptables_ok {
            iptables.push(sample(&client(
                &["bench-connect", "10.77.0.1:8443", CONNECTIONS],
                &direct_at,
            ))?);
        }
    }
    report(
        median(direct),
        median(ebpf),
        median(ebpf_no_inbound),
        (!iptables.is_empty()).then(|| median(iptables)),
    );
    Ok(())
}

/// The same interception without the inbound programs (`bind4`/`bind6`, `cgroup_skb/ingress`): their
/// pinned links are the only references, so removing the pins detaches them.
fn attach_without_inbound(ic: &mut Interceptor, pins: &PinDir) -> Result<CgroupGuard> {
    let cg = CgroupGuard::new("bench-noin");
    ic.attach_agent(cg.cgroup(), &AgentConfig::loopback(PORT))?;
    for name in INBOUND_PROGRAMS {
        let pin = agent_link_pin(pins.path(), cg.cgroup().id(), name);
        std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
    }
    Ok(cg)
}

/// The two cgroups really differ: a wildcard bind is rewritten to loopback only where the
/// inbound programs are attached.
fn check_inbound_programs(
    topo: &Topology,
    with: &CgroupGuard,
    without: &CgroupGuard,
) -> Result<()> {
    for (cg, want) in [(with, "127.0.0.1:7999"), (without, "0.0.0.0:7999")] {
        let at = Placement {
            netns: Some(&topo.agent),
            cgroup: Some(cg),
            user: None,
        };
        let l = Listener::start(&["tcp", "0.0.0.0:7999", "--wait-ms", "0"], &at)
            .map_err(|v| anyhow::anyhow!("listen: {v}"))?;
        if l.local.to_string() != want {
            bail!(
                "inbound programs: expected a listener on {want}, got {}",
                l.local
            );
        }
        let _ = l.finish();
    }
    Ok(())
}

fn report(d: Sample, e: Sample, e_no_inbound: Sample, iptables: Option<Sample>) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("## Connection redirect (`cargo xtask bench redirect`)\n");
    println!(
        "Sequential connect + 1-byte reply to one listener in a private netns that asks \
         `SO_ORIGINAL_DST` on every accept; {CONNECTIONS} connections per round, median of \
         {ROUNDS} interleaved rounds (the two eBPF modes swap order every round); kernel {}, \
         {} CPUs, load average {} when it ended.\n",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| "unknown".into())
    );
    println!("| mode | connections/s | p50 (us) | p99 (us) | rate vs direct |");
    println!("|---|---:|---:|---:|---:|");
    let row = |name: &str, s: Sample| {
        println!(
            "| {name} | {:.0} | {:.1} | {:.1} | {:.2} |",
            s.per_sec,
            s.p50_us,
            s.p99_us,
            s.per_sec / d.per_sec
        );
    };
    row("direct", d);
    row("eBPF connect4 redirect (Paddock)", e);
    row("same, without the inbound programs", e_no_inbound);
    if let Some(i) = iptables {
        row("iptables nat REDIRECT", i);
    } else {
        println!("| iptables nat REDIRECT | unavailable on this kernel | | | |");
    }
    println!(
        "\nMedian set-up time, eBPF minus direct: {:+.1} us (p50 {:.1} -> {:.1} us); round-to-round \
         noise on this 2-vCPU VM is several us, so a small negative value means \"no measurable cost\".",
        e.p50_us - d.p50_us,
        d.p50_us,
        e.p50_us
    );
    println!(
        "\nInbound control (`bind4`/`bind6`, `cgroup_skb/ingress`, which sees every packet the \
         agent receives, here all on loopback): {:.2}x the rate without it, p50 {:+.1} us \
         ({:.1} -> {:.1} us).",
        e.per_sec / e_no_inbound.per_sec,
        e.p50_us - e_no_inbound.p50_us,
        e_no_inbound.p50_us,
        e.p50_us
    );
}
