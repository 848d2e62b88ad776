//! `cargo xtask bench node`: one `paddock-proxy node` on a simulated node (the root tier's
//! `NodeLab`: pods as network namespaces on a bridge, kubelet cgroups, the real broker, nginx
//! as the upstream behind the node). Prints a markdown section for BENCHMARKS.md on stdout.
//!
//! * Pod set-up: the pod socket's `add` (what the CNI ADD waits for), then the pod's first
//!   request through the proxy (`curl`, a new process in the pod, as a container's first
//!   action), against the same first request from the same namespace outside the pod's
//!   cgroup (direct, not intercepted).
//! * What a pod costs the node agent: resident memory and descriptors with 0, 1, 50 and 200
//!   pods added (bare pods: a namespace and a kubelet cgroup each), per pod against 0 pods,
//!   measured first, on the freshly started node agent.
//! * Keep-alive HTTPS request rate through the one node agent, `wrk` in 1 pod (8
//!   connections) and in 50 pods at once (1 connection each), against the same `wrk`s from
//!   the same namespaces outside the pods' cgroups (direct). MITM only: no placeholder, so the
//!   broker is asked once per connection, and the rate measures the node agent's path.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use paddock_tests::{
    CgroupGuard, Netns,
    node_lab::{HOST_A, HOST_B, NodeLab, UPSTREAM_V4},
    process::{Placement, place},
    wrk::{self, Sample, cpus, kernel},
};

const SECONDS: u32 = 5;
const SETUP_PODS: u32 = 10;
const BUSY_PODS: u32 = 50;
const COUNTS: [u32; 3] = [1, 50, 200];

/// Pod `i`'s run may reach host A (even `i`) or host B (odd), both the nginx upstream.
fn url(i: usize) -> String {
    let host = if i.is_multiple_of(2) { HOST_A } else { HOST_B };
    format!("https://{host}/api")
}

/// `sh -c` in a private mount namespace with `hosts` on `/etc/hosts` (wrk and curl resolve
/// with getaddrinfo; the pods have no DNS of their own here).
fn with_hosts(hosts: &Path, script: &str) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(r#"mount --bind "$0" /etc/hosts && {script}"#))
        .arg(hosts)
        .current_dir("/");
    cmd
}

fn spawn_wrk(hosts: &Path, connections: u32, i: usize, at: &Placement<'_>) -> Result<Child> {
    let mut cmd = with_hosts(
        hosts,
        &format!(
            "exec wrk -t1 -c{connections} -d{SECONDS}s --latency {}",
            url(i)
        ),
    );
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    place(&mut cmd, at);
    cmd.spawn().context("spawn wrk")
}

fn finish(child: Child) -> Result<Sample> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {}\n{text}", out.status);
    }
    wrk::parse(&text)
}

/// The summed rate and the median p50 of wrk runs started together.
fn together(children: Vec<Child>) -> Result<(f64, f64)> {
    let samples = children
        .into_iter()
        .map(finish)
        .collect::<Result<Vec<_>>>()?;
    let rate = samples.iter().map(|s| s.per_sec).sum();
    let p50 = wrk::median(samples).p50_ms;
    Ok((rate, p50))
}

/// A curl request from `at`: wall time until its response.
fn first_request(hosts: &Path, i: usize, at: &Placement<'_>) -> Result<Duration> {
    let mut cmd = with_hosts(
        hosts,
        &format!(
            "exec curl -sk -o /dev/null -w '%{{http_code}}' --max-time 10 {}",
            url(i)
        ),
    );
    place(&mut cmd, at);
    let start = Instant::now();
    let out = cmd.output()?;
    let took = start.elapsed();
    let code = String::from_utf8_lossy(&out.stdout);
    if code.trim() != "200" {
        bail!("first request answered {code:?}");
    }
    Ok(took)
}

fn median_ms(mut xs: Vec<Duration>) -> f64 {
    xs.sort();
    xs[xs.len() / 2].as_secs_f64() * 1000.0
}

#[expect(
    clippy::too_many_lines,
    reason = "one linear benchmark script; each step prints its rows"
)]
#[expect(
    clippy::cast_precision_loss,
    reason = "KiB counts of one process are far below 2^52"
)]
fn main() -> Result<()> {
    // The lab's DNS responder runs on this runtime's workers; everything else blocks.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _runtime = runtime.enter();
    let mut lab = NodeLab::bench(BUSY_PODS);
    let d = lab.dir.path().to_path_buf();
    let hosts = lab.public.path().join("hosts");
    let system_hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    std::fs::write(
        &hosts,
        format!("{system_hosts}\n{UPSTREAM_V4} {HOST_A} {HOST_B}\n"),
    )?;
    // What pods cost, first, on the fresh node agent (an allocator keeps what a busy phase
    // grew, which would hide the per-pod cost): bare pods, counted, then removed.
    std::thread::sleep(Duration::from_millis(300));
    let (rss0, fds0) = (lab.agent_rss_kib(), lab.agent_fds());
    let mut bare: Vec<(Netns, CgroupGuard)> = Vec::new();
    let mut costs = Vec::new();
    for &n in &COUNTS {
        while bare.len() < n as usize {
            let i = u32::try_from(bare.len())?;
            bare.push(lab.bare_pod(i).map_err(anyhow::Error::msg)?);
        }
        std::thread::sleep(Duration::from_millis(300));
        costs.push((n, lab.agent_rss_kib(), lab.agent_fds()));
    }
    for i in 0..bare.len() {
        let uid = format!("8d3f2e4c-3333-4444-8555-{i:012x}");
        lab.pods_cli(&["delete", "--uid", &uid])
            .map_err(anyhow::Error::msg)?;
    }
    drop(bare);

    lab.make_pods(BUSY_PODS);
    let outside: Vec<CgroupGuard> = (0..BUSY_PODS)
        .map(|i| CgroupGuard::nested(&lab.kubelet, Path::new(&format!("outside-{i}"))))
        .collect();
    let direct_at = |i: usize| Placement {
        netns: Some(&lab.pods[i].netns),
        cgroup: Some(&outside[i]),
        user: None,
    };
    let pod_at = |i: usize| Placement {
        netns: Some(&lab.pods[i].netns),
        cgroup: Some(&lab.pods[i].container),
        user: None,
    };

    // Pod set-up.
    let (mut adds, mut firsts, mut directs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..SETUP_PODS as usize {
        directs.push(first_request(&hosts, i, &direct_at(i))?);
        let start = Instant::now();
        lab.add_pod(i).map_err(anyhow::Error::msg)?;
        adds.push(start.elapsed());
        firsts.push(first_request(&hosts, i, &pod_at(i))?);
    }
    for i in SETUP_PODS as usize..BUSY_PODS as usize {
        lab.add_pod(i).map_err(anyhow::Error::msg)?;
    }

    // Keep-alive rate: 1 pod, then 50 pods at once; direct first each time.
    let one_direct = finish(spawn_wrk(&hosts, 8, 0, &direct_at(0))?)?;
    let one_pod = finish(spawn_wrk(&hosts, 8, 0, &pod_at(0))?)?;
    let many_direct = together(
        (0..BUSY_PODS as usize)
            .map(|i| spawn_wrk(&hosts, 1, i, &direct_at(i)))
            .collect::<Result<Vec<_>>>()?,
    )?;
    let many_pods = together(
        (0..BUSY_PODS as usize)
            .map(|i| spawn_wrk(&hosts, 1, i, &pod_at(i)))
            .collect::<Result<Vec<_>>>()?,
    )?;
    let audit_lines =
        std::fs::read_to_string(d.join("audit.jsonl")).map_or(0, |t| t.lines().count());
    for i in 0..BUSY_PODS as usize {
        lab.delete_pod(i).map_err(anyhow::Error::msg)?;
    }
    drop(outside);

    println!("## Node agent (`cargo xtask bench node`)\n");
    println!(
        "One `paddock-proxy node` (release build) on a simulated node: pods are network \
         namespaces on a bridge with kubelet cgroups, the real broker and nginx (`/api`, 25-byte \
         body, TLS with a test CA) behind the node. Direct baselines run the same client from \
         the same pod namespace but outside the pod's cgroup (not intercepted). Kernel {}, {} \
         CPUs shared by everything.\n",
        kernel(),
        cpus()
    );
    println!("### Pod set-up ({SETUP_PODS} pods, median)\n");
    println!("| step | ms |");
    println!("|---|---:|");
    println!(
        "| pod socket `add` (listeners in the pod netns, eBPF attach, record): what CNI ADD waits for | {:.1} |",
        median_ms(adds)
    );
    println!(
        "| pod added -> first request answered through the proxy (new `curl` process in the pod) | {:.1} |",
        median_ms(firsts.clone())
    );
    println!(
        "| the same first request, direct | {:.1} |",
        median_ms(directs.clone())
    );
    println!(
        "\nThe first request through the proxy (policy call to the broker, leaf forging for the \
         name, upstream TLS) differs from the direct one by {:+.1} ms, inside the spread of \
         starting `curl` in a fresh mount namespace (both rows are mostly that): a pod's \
         set-up cost is the `add` row.\n",
        median_ms(firsts) - median_ms(directs)
    );
    println!("### What a pod costs the node agent\n");
    println!(
        "| pods | RSS (MiB) | RSS per pod vs 0 pods (KiB) | descriptors | descriptors per pod |"
    );
    println!("|---:|---:|---:|---:|---:|");
    println!("| 0 | {:.1} | - | {fds0} | - |", rss0 as f64 / 1024.0);
    for (n, rss, fds) in costs {
        println!(
            "| {n} | {:.1} | {:.0} | {fds} | {:.1} |",
            rss as f64 / 1024.0,
            (rss.saturating_sub(rss0)) as f64 / f64::from(n),
            (fds.saturating_sub(fds0)) as f64 / f64::from(n)
        );
    }
    println!("\n### Keep-alive rate through one node agent (`wrk -d{SECONDS}s`, MITM only)\n");
    println!(
        "| load | direct req/s | through req/s | ratio | direct p50 (ms) | through p50 (ms) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| 1 pod, 8 connections | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
        one_direct.per_sec,
        one_pod.per_sec,
        one_pod.per_sec / one_direct.per_sec,
        one_direct.p50_ms,
        one_pod.p50_ms
    );
    println!(
        "| {BUSY_PODS} pods at once, 1 connection each | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
        many_direct.0,
        many_pods.0,
        many_pods.0 / many_direct.0,
        many_direct.1,
        many_pods.1
    );
    println!(
        "\n{audit_lines} audit records written during the run (one per connection and request)."
    );
    Ok(())
}
