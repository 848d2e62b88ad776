//! `cargo xtask bench proxy`: HTTPS through the Paddock proxy vs direct to the same nginx, in
//! one run, plus the leaf forging rate. Prints a markdown section for BENCHMARKS.md on stdout.
//!
//! The lab is the root-tier test lab (`paddock_tests::proxied::Lab`): nginx in a test-host
//! namespace, the proxy in the agent namespace, eBPF redirection of an agent cgroup. `wrk`
//! runs in the agent namespace, inside the intercepted cgroup ("through") or beside it
//! ("direct"), with the test host name in a bind-mounted hosts file. Keep-alive: 8
//! connections reusing their TLS session for requests; new connections: `Connection: close`
//! on every request, so each request is a new TCP connection and a full TLS handshake (on
//! both legs through the proxy).

use std::process::Command;

use anyhow::{Result, bail};
use paddock_tests::{
    process::run,
    proxied::Lab,
    wrk::{self, Sample, cpus, kernel},
};

const SECONDS: &str = "8";
const CONNECTIONS: &str = "8";
const FORGE_LEAVES: usize = 200;

fn wrk(lab: &Lab, through: bool, new_connections: bool) -> Result<Sample> {
    let hosts = lab.hosts_file();
    let close = if new_connections {
        "-H 'Connection: close'"
    } else {
        ""
    };
    let script = format!(
        "mount --bind {} /etc/hosts && exec wrk -t1 -c{CONNECTIONS} -d{SECONDS}s --latency {close} \
         https://app.test/hello.txt",
        hosts.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let at = if through {
        lab.agent()
    } else {
        lab.beside_agent()
    };
    let out = run(&mut cmd, &at);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk failed: {}\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wrk::parse(&text)
}

fn main() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench proxy needs root (namespaces, cgroups, eBPF)");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    let lab = Lab::new("", Some("none"));

    // Warm both paths (TLS session caches, leaf forge, DNS cache, upstream pool).
    wrk(&lab, true, false)?;
    let ka_direct = wrk(&lab, false, false)?;
    let ka_proxy = wrk(&lab, true, false)?;
    let nc_direct = wrk(&lab, false, true)?;
    let nc_proxy = wrk(&lab, true, true)?;
    let forge = paddock_proxy::tls::bench_forge(FORGE_LEAVES)?;
    drop(lab);

    let cpus = cpus();
    println!("## Proxy throughput (`cargo xtask bench proxy`)\n");
    println!(
        "`wrk -t1 -c{CONNECTIONS} -d{SECONDS}s --latency` GETs of a 25-byte static file from nginx \
         (TLS, test CA) in a private netns; \"through\" runs wrk in an eBPF-intercepted cgroup so \
         every connection crosses the proxy (agent TLS with a forged leaf, policy, DNS and \
         rebinding checks, upstream TLS), \"direct\" runs the same wrk beside it. New connections: \
         `Connection: close` on every request. Audit off (`--audit none`); release build; kernel \
         {}, {cpus} CPUs, wrk, nginx and the proxy sharing them.\n",
        kernel()
    );
    println!("| workload | path | requests/s | p50 (ms) | p99 (ms) | rate vs direct |");
    println!("|---|---|---:|---:|---:|---:|");
    for (name, direct, proxy) in [
        ("keep-alive HTTPS", ka_direct, ka_proxy),
        ("new connection per request", nc_direct, nc_proxy),
    ] {
        for (path, s) in [("direct", direct), ("through proxy", proxy)] {
            println!(
                "| {name} | {path} | {:.0} | {:.2} | {:.2} | {:.2} |",
                s.per_sec,
                s.p50_ms,
                s.p99_ms,
                s.per_sec / direct.per_sec
            );
        }
    }
    println!(
        "\nLeaf forging (`paddock_proxy::tls::bench_forge`, ECDSA P-256 leaf signed by the run \
         CA, {FORGE_LEAVES} distinct names): {:.0} leaves/s ({:.2} ms per leaf). Forged leaves \
         are cached, so this is paid once per host name.",
        forge.per_second(),
        forge.per_leaf().as_secs_f64() * 1000.0
    );
    println!(
        "\nWith {cpus} CPUs, wrk, nginx and the proxy compete for the same cores, so the keep-alive \
         ratio measures CPU per request (the proxy decrypts and re-encrypts every byte and parses \
         every request on both legs) more than added latency; numbers move with other load on the \
         machine, so compare ratios from one run, not absolute rates across runs."
    );
    Ok(())
}
