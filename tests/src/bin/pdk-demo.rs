//! `cargo xtask demo`: interception on this machine, step by step, with real curl.
//!
//! Builds a private "internet" host (`10.77.0.1`, `fd00:77::1`) in its own network namespace,
//! puts curl in an agent cgroup whose egress Paddock's eBPF programs redirect, and runs a small
//! stand-in proxy that recovers each connection's original destination, allows one port,
//! denies another with a clear 403, and forwards allowed traffic to the real host.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    process::Command,
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use paddock_proxy::{
    cgroup::Cgroup,
    ebpf::{AgentConfig, Interception, Interceptor, LoadOptions},
    netns::{NetnsEntry, NetnsPath},
    origdst::{OriginalDst, SockoptOriginalDst},
};
use paddock_tests::{
    CgroupGuard, PinDir, Topology,
    process::{Placement, run},
};

const PROXY_PORT: u16 = 15001;
const ALLOWED_PORT: u16 = 80;

fn upstream_http(topo: &Topology, port: u16, body: &'static str) -> Result<()> {
    let l = topo
        .upstream
        .run(move || TcpListener::bind(("::", port)))
        .context("netns")??;
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut req = [0u8; 2048];
            let _ = s.read(&mut req);
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    Ok(())
}

fn handle(mut agent: TcpStream, ns: &NetnsPath) -> Result<()> {
    let orig = SockoptOriginalDst
        .original_dst(agent.as_fd())
        .context("no original destination")?;
    let mut first = String::new();
    BufReader::new(&agent).read_line(&mut first)?;
    if orig.port() != ALLOWED_PORT {
        println!("  proxy: {orig} -> DENY (only port {ALLOWED_PORT} is allowed)");
        let body = format!("paddock: egress to {orig} denied by policy\n");
        write!(
            agent,
            "HTTP/1.1 403 Forbidden\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    println!(
        "  proxy: {orig} -> ALLOW, forwarding `{}`",
        first.trim_end()
    );
    let mut up = ns.run_in(move || TcpStream::connect(orig))??;
    up.write_all(first.as_bytes())?;
    let mut a2 = agent.try_clone()?;
    let mut u2 = up.try_clone()?;
    let t = std::thread::spawn(move || std::io::copy(&mut a2, &mut u2));
    std::io::copy(&mut up, &mut agent)?;
    drop(t);
    Ok(())
}

fn curl(at: &Placement<'_>, url: &str) -> String {
    let out = run(
        Command::new("curl").args(["-sS", "--max-time", "5", url]),
        at,
    );
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if text.is_empty() {
        String::from_utf8_lossy(&out.stderr).trim().to_owned()
    } else {
        text
    }
}

fn main() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo needs root: it creates namespaces and cgroups and loads eBPF programs");
    }
    println!("Paddock demo: eBPF egress interception\n");
    let topo = Topology::new();
    println!(
        "1. Test host 10.77.0.1 / fd00:77::1 in netns {} (HTTP on :80 and :8080)",
        topo.upstream.name()
    );
    upstream_http(&topo, 80, "hello from the upstream host on port 80\n")?;
    upstream_http(
        &topo,
        8080,
        "direct answer from the upstream host on port 8080\n",
    )?;

    let pins = PinDir::new();
    let mut ic = Interceptor::load(&LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        ..LoadOptions::default()
    })?;
    ic.attach_proxy(&Cgroup::current()?)?;
    let agent = CgroupGuard::new("demo");
    let mut cfg = AgentConfig::loopback(PROXY_PORT);
    cfg.dns = vec!["10.77.0.1:53".parse()?];
    ic.attach_agent(agent.cgroup(), &cfg)?;
    println!(
        "2. Agent cgroup {} intercepted: TCP -> proxy on 127.0.0.1/[::1]:{PROXY_PORT}, UDP only to DNS 10.77.0.1:53",
        agent.cgroup().path().display()
    );

    let ns = Arc::new(topo.agent.path().clone());
    for addr in [
        SocketAddr::from(([127, 0, 0, 1], PROXY_PORT)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, PROXY_PORT)),
    ] {
        let l = topo
            .agent
            .run(move || {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    None,
                )?;
                if addr.is_ipv6() {
                    s.set_only_v6(true)?;
                }
                s.bind(&addr.into())?;
                s.listen(128)?;
                Ok::<TcpListener, std::io::Error>(s.into())
            })
            .context("netns")??;
        let ns = Arc::clone(&ns);
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let ns = Arc::clone(&ns);
                std::thread::spawn(move || {
                    if let Err(e) = handle(s, &ns) {
                        println!("  proxy: connection dropped: {e:#}");
                    }
                });
            }
        });
    }
    println!(
        "3. Stand-in proxy listening; it recovers each connection's destination with SO_ORIGINAL_DST\n"
    );

    let at = Placement {
        netns: Some(&topo.agent),
        cgroup: Some(&agent),
        user: None,
    };
    let outside = Placement {
        netns: Some(&topo.agent),
        cgroup: None,
        user: None,
    };
    println!("$ curl http://10.77.0.1/            (inside the agent cgroup)");
    println!("  curl saw: {}\n", curl(&at, "http://10.77.0.1/"));
    println!("$ curl 'http://[fd00:77::1]/'       (IPv6, inside the agent cgroup)");
    println!("  curl saw: {}\n", curl(&at, "http://[fd00:77::1]/"));
    println!("$ curl http://10.77.0.1:8080/       (inside the agent cgroup)");
    println!("  curl saw: {}\n", curl(&at, "http://10.77.0.1:8080/"));
    println!(
        "$ curl http://10.77.0.1:8080/       (same namespace, outside the agent cgroup: not intercepted)"
    );
    println!("  curl saw: {}\n", curl(&outside, "http://10.77.0.1:8080/"));
    let q = run(
        Command::new(paddock_tests::process::client_path()).args(["udp", "10.77.0.1:443"]),
        &at,
    );
    println!("$ UDP to 10.77.0.1:443 (QUIC) from the agent cgroup");
    println!("  {}\n", String::from_utf8_lossy(&q.stdout).trim());
    println!("Done: namespaces, cgroup and pinned programs are removed on exit.");
    Ok(())
}
