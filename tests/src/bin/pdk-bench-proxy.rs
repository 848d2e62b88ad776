//! `cargo xtask bench proxy`: HTTPS through the Paddock proxy vs direct to the same nginx, in
//! one run, plus the leaf forging rate. Prints a markdown section for BENCHMARKS.md on stdout.
//!
//! The lab is the root-tier test lab (`paddock_tests::proxied::Lab`): nginx in a test-host
//! namespace, the proxy in the agent namespace, eBPF redirection of an agent cgroup. `wrk`
//! runs in the agent namespace, inside the intercepted cgroup ("through") or beside it
//! ("direct"), with the test host name in a bind-mounted hosts file. Keep-alive: 8
//! connections reusing their TLS session for requests; new connections: `Connection: close`
//! on every request, so each request is a new TCP connection and a full TLS handshake (on
//! both legs through the proxy). "Pass-through" asks for `pass.test` (the same nginx), whose
//! rule relays TLS untouched (spliced in the kernel); "bulk" fetches a 16 MiB file.

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

/// The bulk file's size and name in nginx's document root.
const BULK_BYTES: usize = 16 * 1024 * 1024;
const BULK: &str = "bulk.bin";

fn wrk(lab: &Lab, through: bool, new_connections: bool) -> Result<Sample> {
    wrk_url(lab, through, new_connections, "https://app.test/hello.txt")
}

fn wrk_url(lab: &Lab, through: bool, new_connections: bool, url: &str) -> Result<Sample> {
    let hosts = lab.hosts_file();
    let close = if new_connections {
        "-H 'Connection: close'"
    } else {
        ""
    };
    let script = format!(
        "mount --bind {} /etc/hosts && exec wrk -t1 -c{CONNECTIONS} -d{SECONDS}s --latency {close} \
         {url}",
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

    let bulk: Vec<u8> = (0..BULK_BYTES)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    std::fs::write(lab.dir.path().join("www").join(BULK), bulk)?;
    let pass = "https://pass.test/hello.txt";
    let bulk_app = format!("https://app.test/{BULK}");
    let bulk_pass = format!("https://pass.test/{BULK}");

    // Warm both paths (TLS session caches, leaf forge, DNS cache, upstream pool).
    wrk(&lab, true, false)?;
    wrk_url(&lab, true, false, pass)?;
    let ka_direct = wrk(&lab, false, false)?;
    let ka_proxy = wrk(&lab, true, false)?;
    let ka_pass = wrk_url(&lab, true, false, pass)?;
    let nc_direct = wrk(&lab, false, true)?;
    let nc_proxy = wrk(&lab, true, true)?;
    let nc_pass = wrk_url(&lab, true, true, pass)?;
    let bulk_direct = wrk_url(&lab, false, false, &bulk_app)?;
    let bulk_proxy = wrk_url(&lab, true, false, &bulk_app)?;
    let bulk_through = wrk_url(&lab, true, false, &bulk_pass)?;
    let forge = paddock_proxy::tls::bench_forge(FORGE_LEAVES)?;
    drop(lab);

    let cpus = cpus();
    println!("## Proxy throughput (`cargo xtask bench proxy`)\n");
    println!(
        "`wrk -t1 -c{CONNECTIONS} -d{SECONDS}s --latency` GETs of a 25-byte static file from nginx \
         (TLS, test CA) in a private netns; \"through\" runs wrk in an eBPF-intercepted cgroup so \
         every connection crosses the proxy (agent TLS with a forged leaf, policy, DNS and \
         rebinding checks, upstream TLS), \"direct\" runs the same wrk beside it; \
         \"pass-through\" is the same nginx under a name whose rule relays TLS without \
         terminating it (SNI, policy and destination checked, then `splice(2)` both ways). New \
         connections: `Connection: close` on every request; bulk: a {} MiB file per request \
         over keep-alive connections. Audit off (`--audit none`); release build; kernel \
         {}, {cpus} CPUs, wrk, nginx and the proxy sharing them.\n",
        BULK_BYTES / (1024 * 1024),
        kernel()
    );
    println!("| workload | path | requests/s | p50 (ms) | p99 (ms) | rate vs direct |");
    println!("|---|---|---:|---:|---:|---:|");
    for (name, direct, proxy, pass) in [
        ("keep-alive HTTPS", ka_direct, ka_proxy, ka_pass),
        ("new connection per request", nc_direct, nc_proxy, nc_pass),
        ("bulk download", bulk_direct, bulk_proxy, bulk_through),
    ] {
        for (path, s) in [
            ("direct", direct),
            ("through proxy", proxy),
            ("through proxy, pass-through", pass),
        ] {
            println!(
                "| {name} | {path} | {:.0} | {:.2} | {:.2} | {:.2} |",
                s.per_sec,
                s.p50_ms,
                s.p99_ms,
                s.per_sec / direct.per_sec
            );
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "a few MiB")]
    let mib = BULK_BYTES as f64 / (1024.0 * 1024.0);
    println!(
        "\nBulk throughput: direct {:.0} MiB/s, intercepted {:.0} MiB/s ({:.2}x), pass-through \
         {:.0} MiB/s ({:.2}x).",
        bulk_direct.per_sec * mib,
        bulk_proxy.per_sec * mib,
        bulk_proxy.per_sec / bulk_direct.per_sec,
        bulk_through.per_sec * mib,
        bulk_through.per_sec / bulk_direct.per_sec
    );
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
