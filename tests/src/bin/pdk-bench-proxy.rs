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

/// Idle intercepted connections held open by `--idle`.
const IDLE_CONNECTIONS: usize = 10_000;

/// Resident memory of this process (the proxy runs in it), KiB.
fn own_rss_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/self/status"))
}

/// Open descriptors of this process.
fn own_fds() -> Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}

/// The Python client of `--idle`: opens the connections, completes TLS trusting the run CA,
/// says how many; on a line from stdin sends one request on each and reads its answer, says
/// how many were answered, then waits for its stdin to close.
fn idle_client(ca: &str) -> String {
    format!(
        r#"
import socket, ssl, sys, resource
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ctx = ssl.create_default_context(cafile="{ca}")
held = []
for i in range({IDLE_CONNECTIONS}):
    s = socket.create_connection(("10.77.0.1", 443), timeout=30)
    held.append(ctx.wrap_socket(s, server_hostname="app.test"))
print(len(held), flush=True)
REQUEST = b"GET /hello.txt HTTP/1.1\r\nHost: app.test\r\n\r\n"
def answer(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            break
        body += chunk
    return head.startswith(b"HTTP/1.1 200") and len(body) == length
sys.stdin.readline()
answered = 0
for s in held:
    s.sendall(REQUEST)
    answered += answer(s)
print(answered, flush=True)
sys.stdin.readline()
for s in held:
    s.sendall(REQUEST)
print(sum(answer(s) for s in held), flush=True)
sys.stdin.read()
"#
    )
}

/// `--idle`: `IDLE_CONNECTIONS` TLS connections through the eBPF path, completed and left
/// idle; the proxy's memory and descriptors before, while they wait for a first request, and
/// after each has carried one request (the HTTP server's buffers then exist).
fn idle() -> Result<()> {
    use std::io::{BufRead as _, BufReader, Write as _};
    // A descriptor per connection in the proxy, and one per upstream leg while the burst's
    // requests are in flight: 65536 where the hard limit may be raised (CAP_SYS_RESOURCE,
    // which containers often lack), else as many as the hard limit allows.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if setrlimit(Resource::RLIMIT_NOFILE, 65_536, 65_536).is_err() {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    // The handshake timeout also bounds the wait for a connection's first request: raised so
    // the first connections are still open when the last one is.
    let lab = Lab::new(
        &format!(
            "max_connections = {}\nidle_timeout_secs = 600\nhandshake_timeout_secs = 600",
            IDLE_CONNECTIONS + 100
        ),
        Some("none"),
    );
    // Warm the path (leaf, DNS, ALPN) so the baseline holds the per-process state.
    wrk(&lab, true, false)?;
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (rss0, fds0) = (own_rss_kib()?, own_fds()?);
    // The client runs in the intercepted cgroup.
    let script = idle_client(&lab.ca());
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    paddock_tests::process::place(&mut cmd, &lab.agent());
    let mut child = cmd.spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
    let mut out = BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    );
    let mut read_count = || -> Result<usize> {
        let mut line = String::new();
        out.read_line(&mut line)?;
        Ok(line.trim().parse().unwrap_or(0))
    };
    let mut parked = 0;
    let measured = (|| -> Result<[(u64, usize); 3]> {
        let opened = read_count()?;
        if opened != IDLE_CONNECTIONS {
            bail!("the client opened {opened} of {IDLE_CONNECTIONS} connections");
        }
        std::thread::sleep(std::time::Duration::from_secs(3));
        let waiting = (own_rss_kib()?, own_fds()?);
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        let answered = read_count()?;
        if answered != IDLE_CONNECTIONS {
            bail!("{answered} of {IDLE_CONNECTIONS} requests were answered");
        }
        std::thread::sleep(std::time::Duration::from_secs(3));
        let used = (own_rss_kib()?, own_fds()?);
        // A second request on each, all sent before any answer is read: every connection
        // has its HTTP server at once, the heap's worst case once they park again.
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        let answered = read_count()?;
        if answered != IDLE_CONNECTIONS {
            bail!("{answered} of {IDLE_CONNECTIONS} requests sent at once were answered");
        }
        std::thread::sleep(std::time::Duration::from_secs(3));
        let burst = (own_rss_kib()?, own_fds()?);
        parked = admin_metric(&lab, "paddock_proxy_parked_connections")?;
        Ok([waiting, used, burst])
    })();
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    drop(lab);
    let [(rss1, fds1), (rss2, fds2), (rss3, fds3)] = measured?;
    // Every connection must still be open in the proxy when measured, or the figure is
    // per fewer connections than it claims.
    for (what, fds) in [
        ("waiting", fds1),
        ("after a request", fds2),
        ("after a burst", fds3),
    ] {
        if fds.saturating_sub(fds0) < IDLE_CONNECTIONS {
            bail!(
                "{what}: the proxy holds {} new descriptors for {IDLE_CONNECTIONS} connections",
                fds.saturating_sub(fds0)
            );
        }
    }
    print_idle(
        rss0,
        fds0,
        [(rss1, fds1), (rss2, fds2), (rss3, fds3)],
        parked,
    );
    Ok(())
}

/// The `--idle` table.
fn print_idle(
    rss0: u64,
    fds0: usize,
    [(rss1, fds1), (rss2, fds2), (rss3, fds3)]: [(u64, usize); 3],
    parked: u64,
) {
    #[expect(clippy::cast_precision_loss, reason = "KiB of one process")]
    let mib = |kib: u64| kib as f64 / 1024.0;
    #[expect(clippy::cast_precision_loss, reason = "a few KiB per connection")]
    let per_conn = |kib: u64| kib.saturating_sub(rss0) as f64 / IDLE_CONNECTIONS as f64;
    println!("## Idle intercepted connections (`cargo xtask bench idle`)\n");
    println!(
        "{IDLE_CONNECTIONS} TLS connections from a Python client in the eBPF-intercepted cgroup, each \
         redirected, checked and intercepted (agent TLS with the forged leaf; upstream's ALPN is \
         already known, so no upstream leg is opened before a request) and then left idle; the \
         proxy (in the benchmark's process, with its DNS responder) measured before, 3 s after \
         the client opened the last one, 3 s after the client sent one request on each \
         (one after another, answers read whole: upstream legs are reused, the agent legs stay \
         open and idle), and 3 s after a second request on each, all sent before any answer \
         was read (every connection has its HTTP server at once); `max_connections` raised to {}, the handshake timeout (which also \
         bounds the wait for a first request) to 600 s; the run fails unless the proxy holds a \
         descriptor for every connection at each point; kernel {}, {} CPUs.\n",
        IDLE_CONNECTIONS + 100,
        kernel(),
        cpus()
    );
    println!("| | RSS (MiB) | descriptors | KiB per connection |");
    println!("|---|---:|---:|---:|");
    println!("| before | {:.1} | {fds0} | - |", mib(rss0));
    println!(
        "| {IDLE_CONNECTIONS} open, before their first request | {:.1} | {fds1} | {:.1} |",
        mib(rss1),
        per_conn(rss1)
    );
    println!(
        "| {IDLE_CONNECTIONS} open, idle after one request each | {:.1} | {fds2} | {:.1} |",
        mib(rss2),
        per_conn(rss2)
    );
    println!(
        "| {IDLE_CONNECTIONS} open, idle after a second request on each, all at once | {:.1} | {fds3} | {:.1} |",
        mib(rss3),
        per_conn(rss3)
    );
    println!(
        "\nConnections parked (their HTTP server dropped, `paddock_proxy_parked_connections`) \
         at the last measurement: {parked} of {IDLE_CONNECTIONS}."
    );
}

/// The Python client of `--first-contacts`: opens one connection to each of `MANY_NAMES`
/// names at once (asyncio), sends a GET on each and reads the whole answer; prints how many
/// succeeded, the wall time, and each success's latency (connect to last byte), seconds.
const FIRST_CONTACT_CLIENT: &str = r#"
import asyncio, ssl, sys, time, resource
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
n, ca, addr = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
async def one(i):
    name = f"n{i}.many.test"
    t0 = time.monotonic()
    r, w = await asyncio.wait_for(asyncio.open_connection(addr, 443, ssl=ctx, server_hostname=name), 60)
    try:
        w.write(f"GET /hello.txt HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 60)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        await asyncio.wait_for(r.readexactly(length), 60)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:40])
        return time.monotonic() - t0
    finally:
        w.close()
async def main():
    t0 = time.monotonic()
    res = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    wall = time.monotonic() - t0
    ok = sorted(x for x in res if isinstance(x, float))
    errs = [repr(x) for x in res if not isinstance(x, float)]
    if errs:
        print(errs[0], file=sys.stderr)
    print(len(ok), wall, " ".join(f"{x:.6f}" for x in ok))
asyncio.run(main())
"#;

/// One `--first-contacts` pass: (succeeded, wall seconds, sorted latencies in seconds).
fn contact_pass(lab: &Lab, through: bool) -> Result<(usize, f64, Vec<f64>)> {
    use paddock_tests::proxied::{HOST_V4, MANY_NAMES};
    let ca = if through {
        lab.ca()
    } else {
        lab.dir.path().join("test-ca.crt").display().to_string()
    };
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(FIRST_CONTACT_CLIENT)
        .arg(MANY_NAMES.to_string())
        .arg(ca)
        .arg(HOST_V4);
    paddock_tests::process::place(
        &mut cmd,
        &if through {
            lab.agent()
        } else {
            lab.beside_agent()
        },
    );
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace();
    let ok: usize = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
    let wall: f64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0.0);
    let lat: Vec<f64> = fields.filter_map(|f| f.parse().ok()).collect();
    if !out.status.success() || ok != MANY_NAMES {
        bail!(
            "{ok} of {MANY_NAMES} first contacts succeeded ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((ok, wall, lat))
}

/// The proxy's `paddock_proxy_leaf_forges_total`, read from its admin listener.
fn leaf_forges(lab: &Lab) -> Result<u64> {
    admin_metric(lab, "paddock_proxy_leaf_forges_total")
}

/// One unlabelled series of the proxy's admin metrics (counters and gauges are integers).
fn admin_metric(lab: &Lab, name: &str) -> Result<u64> {
    use paddock_tests::proxied::ADMIN;
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(format!(
        "import urllib.request; print(urllib.request.urlopen('http://{ADMIN}/metrics', timeout=10).read().decode())"
    ));
    paddock_tests::process::place(&mut cmd, &lab.beside_agent());
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no {name} in the admin metrics"))
}

/// `--first-contacts`: `MANY_NAMES` concurrent first contacts to as many distinct names
/// through the eBPF path (a leaf forged and an upstream probe for each), against the same
/// contacts direct and the same names again (leaves cached), in one run.
fn first_contacts() -> Result<()> {
    use paddock_tests::proxied::MANY_NAMES;
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    let lab = Lab::new(
        &format!("max_connections = {}", MANY_NAMES * 3),
        Some("none"),
    );
    let direct = contact_pass(&lab, false)?;
    let forges0 = leaf_forges(&lab)?;
    let first = contact_pass(&lab, true)?;
    let forges1 = leaf_forges(&lab)?;
    let again = contact_pass(&lab, true)?;
    let forges2 = leaf_forges(&lab)?;
    if forges1.saturating_sub(forges0) < MANY_NAMES as u64 {
        bail!(
            "{} leaves forged for {MANY_NAMES} new names",
            forges1.saturating_sub(forges0)
        );
    }
    drop(lab);
    println!("## First contacts (`cargo xtask bench first-contacts`)\n");
    println!(
        "{MANY_NAMES} TLS connections opened at once (Python asyncio, one process) to {MANY_NAMES} \
         distinct names (`n<i>.many.test`, all the nginx test host, whose certificate has \
         `*.many.test`), each sending one GET and reading the whole answer; latency from the \
         connect to the last byte. **direct**: to nginx from outside the intercepted cgroup. \
         **Paddock, first contact**: through the eBPF path into the proxy (in the benchmark's \
         process), so each connection costs a DNS check of its name, a leaf forged for it \
         (one signing per name) and an upstream TLS probe; the proxy's leaf-forge counter \
         rose by {} during the pass. **Paddock, same names again**: a second pass, leaves \
         cached (forges during it: {}). Kernel {}, {} CPUs shared by the client, the proxy \
         and nginx.\n",
        forges1.saturating_sub(forges0),
        forges2.saturating_sub(forges1),
        kernel(),
        cpus()
    );
    println!("| pass | contacts | wall (s) | contacts/s | p50 (ms) | p99 (ms) | max (ms) |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (label, (ok, wall, lat)) in [
        ("direct", &direct),
        ("Paddock, first contact (a leaf forged per name)", &first),
        ("Paddock, same names again (leaves cached)", &again),
    ] {
        let pick = |q: f64| {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "an index into at most a thousand latencies"
            )]
            let i = ((lat.len() as f64 - 1.0) * q).round() as usize;
            lat.get(i).copied().unwrap_or(0.0) * 1000.0
        };
        #[expect(clippy::cast_precision_loss, reason = "a thousand")]
        let rate = *ok as f64 / wall;
        println!(
            "| {label} | {ok} | {wall:.2} | {rate:.0} | {:.1} | {:.1} | {:.1} |",
            pick(0.5),
            pick(0.99),
            pick(1.0)
        );
    }
    // The same number of contacts in every pass: the rate ratio is the wall-time ratio.
    println!(
        "\nFirst contacts through Paddock: {:.2}x direct's rate; cached leaves: {:.2}x.",
        direct.1 / first.1,
        direct.1 / again.1
    );
    Ok(())
}

fn main() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench proxy needs root (namespaces, cgroups, eBPF)");
    }
    if std::env::args().any(|a| a == "--idle") {
        return idle();
    }
    if std::env::args().any(|a| a == "--first-contacts") {
        return first_contacts();
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
