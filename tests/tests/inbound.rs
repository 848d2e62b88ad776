//! Root tier: inbound and bind control (issue 10, item 4), written as the attacker would try
//! it. The finding: a command listens on `0.0.0.0`, a remote host connects in, and the command
//! sends data out over that connection. Each test first shows the attack working from a cgroup
//! that is not intercepted (same namespace, same listener), then closed in an agent cgroup.
//!
//! The "remote host" is a peer namespace linked to the agent namespace by a veth
//! (`10.77.0.1`/`fd00:77::1` to `10.77.0.2`/`fd00:77::2`). Local clients run in the agent
//! namespace but outside the agent cgroup: inside it their connects would go to the proxy.

use std::{
    net::{Ipv6Addr, SocketAddr},
    process::Command,
    sync::atomic::Ordering,
    time::Duration,
};

use paddock_proxy::ebpf::{
    AgentConfig, Interception, Interceptor, LoadOptions, MAP_CONFIG, map_pin_path,
};
use paddock_tests::{
    CgroupGuard, PinDir, Topology,
    inbound::{Listener, REFUSED_WITHIN, accepted_peers, datagrams, tcp_echo, udp_send},
    process::{Placement, client, run, target_bin},
    require_root,
    servers::{PROXY_PORT, UpstreamHost},
    topology::{AGENT_V4, AGENT_V6, UPSTREAM_V4, UPSTREAM_V6},
};

const EPERM: i64 = 1;
const ECONNREFUSED: i32 = 111;
const OK_WITHIN: Duration = Duration::from_secs(5);

struct Fixture {
    // Drop order: loader, pins (detach), cgroups, namespaces.
    _ic: Interceptor,
    pins: PinDir,
    agent: CgroupGuard,
    plain: CgroupGuard,
    topo: Topology,
}

impl Fixture {
    /// An agent cgroup intercepted with DNS allowed to the peer (both families) and `tweak`
    /// applied, and a cgroup beside it that is not intercepted.
    fn new(tweak: impl FnOnce(&mut AgentConfig)) -> Self {
        let topo = Topology::new();
        let agent = CgroupGuard::new("in");
        let plain = CgroupGuard::new("ctl");
        let pins = PinDir::new();
        let mut ic = Interceptor::load(&LoadOptions {
            pin_dir: pins.path().to_path_buf(),
            ..LoadOptions::default()
        })
        .unwrap_or_else(|e| panic!("load eBPF: {e}"));
        let mut cfg = AgentConfig::loopback(PROXY_PORT);
        cfg.dns = vec![
            SocketAddr::from((UPSTREAM_V4, 53)),
            SocketAddr::from((UPSTREAM_V6, 53)),
        ];
        tweak(&mut cfg);
        ic.attach_agent(agent.cgroup(), &cfg)
            .unwrap_or_else(|e| panic!("attach agent: {e}"));
        Self {
            _ic: ic,
            pins,
            agent,
            plain,
            topo,
        }
    }

    fn agent(&self) -> Placement<'_> {
        Placement {
            netns: Some(&self.topo.agent),
            cgroup: Some(&self.agent),
            user: None,
        }
    }

    /// The control: same namespace, not intercepted.
    fn control(&self) -> Placement<'_> {
        Placement {
            netns: Some(&self.topo.agent),
            cgroup: Some(&self.plain),
            user: None,
        }
    }

    /// From the peer namespace.
    fn peer_echo(&self, to: SocketAddr, within: Duration) -> std::io::Result<String> {
        tcp_echo(&self.topo.upstream, to, within)
    }

    /// From the agent namespace, outside the agent cgroup.
    fn local_echo(&self, to: SocketAddr) -> std::io::Result<String> {
        tcp_echo(&self.topo.agent, to, OK_WITHIN)
    }
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from((AGENT_V4, port))
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::from((AGENT_V6, port))
}

fn lo4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn lo6(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv6Addr::LOCALHOST, port))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// The peer reaches a listener of the control cgroup: the attack works without interception.
fn assert_reachable_from_peer(f: &Fixture, to: SocketAddr, args: &[&str]) {
    let l = Listener::start(args, &f.control()).expect("control listener");
    let to = SocketAddr::new(to.ip(), l.port());
    let echo = f
        .peer_echo(to, OK_WITHIN)
        .unwrap_or_else(|e| panic!("the peer must reach the control's {args:?} at {to}: {e}"));
    assert_eq!(echo, "echo:hello");
    let report = l.finish();
    assert_eq!(accepted_peers(&report).len(), 1, "{report}");
}

fn assert_unreachable_from_peer(f: &Fixture, to: SocketAddr, what: &str) {
    match f.peer_echo(to, REFUSED_WITHIN) {
        Ok(echo) => panic!("{what}: the peer reached {to} and got {echo:?}"),
        Err(e) => eprintln!("{what}: peer to {to}: {e}"),
    }
}

/// (a) `listen` on `0.0.0.0:P`: the peer cannot connect, a local client still can.
#[test]
fn a_wildcard_ipv4_listener_is_only_reachable_over_loopback() {
    if !require_root("a_wildcard_ipv4_listener_is_only_reachable_over_loopback") {
        return;
    }
    let f = Fixture::new(|_| {});
    assert_reachable_from_peer(&f, v4(0), &["tcp", "0.0.0.0:7001"]);

    let l = Listener::start(&["tcp", "0.0.0.0:7002"], &f.agent()).expect("agent listens");
    assert_eq!(
        l.local,
        lo4(7002),
        "the wildcard bind is rewritten to loopback"
    );
    assert_unreachable_from_peer(&f, v4(7002), "wildcard listener");
    assert_eq!(f.local_echo(lo4(7002)).expect("local client"), "echo:hello");
    let report = l.finish();
    let peers = accepted_peers(&report);
    assert!(
        peers.len() == 1 && peers[0].starts_with("127.0.0.1:"),
        "only the local client got in: {report}"
    );
}

/// (b) and (f): an explicit bind to the namespace's own outside address is refused, for TCP
/// and UDP, IPv4, IPv6 and the IPv4-mapped form.
#[test]
fn binding_an_outside_address_is_refused() {
    if !require_root("binding_an_outside_address_is_refused") {
        return;
    }
    let f = Fixture::new(|_| {});
    for (args, what) in [
        (vec!["tcp", "10.77.0.2:7003"], "TCP on the IPv4 address"),
        (vec!["tcp", "[fd00:77::2]:7003"], "TCP on the IPv6 address"),
        (
            vec!["tcp", "[::ffff:10.77.0.2]:7004", "--dualstack"],
            "TCP on the IPv4-mapped address",
        ),
        (vec!["udp", "10.77.0.2:7005"], "UDP on the IPv4 address"),
        (vec!["udp", "[fd00:77::2]:7005"], "UDP on the IPv6 address"),
        (
            vec!["tcp", "10.77.0.2:0"],
            "TCP on the IPv4 address, any port",
        ),
    ] {
        // Control: the same bind works outside the agent cgroup (and the listener ends at
        // once: it is only a bind check).
        let mut control = args.clone();
        control.extend(["--wait-ms", "0"]);
        let l = Listener::start(&control, &f.control())
            .unwrap_or_else(|e| panic!("control: {what}: {e}"));
        let _ = l.finish();
        let Err(v) = Listener::start(&args, &f.agent()) else {
            panic!("{what}: the agent could bind it");
        };
        assert_eq!(v["stage"], "bind", "{what}: {v}");
        assert_eq!(v["errno"], EPERM, "{what}: {v}");
    }
}

/// (c) `socket(); listen()` without `bind()` autobinds to the wildcard without running any
/// bind hook: the ingress program drops the peer's SYNs.
#[test]
fn listen_without_bind_is_unreachable_from_outside() {
    if !require_root("listen_without_bind_is_unreachable_from_outside") {
        return;
    }
    let f = Fixture::new(|_| {});
    assert_reachable_from_peer(&f, v4(0), &["tcp", "none"]);

    for args in [&["tcp", "none"][..], &["tcp", "0.0.0.0:0"][..]] {
        let l = Listener::start(args, &f.agent()).expect("agent listens");
        assert!(
            l.local.ip().is_unspecified(),
            "{args:?}: still bound to the wildcard: {}",
            l.local
        );
        let port = l.port();
        let err = f
            .peer_echo(v4(port), REFUSED_WITHIN)
            .expect_err("the peer must not get in");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::TimedOut,
            "{args:?}: the SYN is dropped, not answered: {err}"
        );
        assert_eq!(f.local_echo(lo4(port)).expect("local client"), "echo:hello");
        let report = l.finish();
        assert_eq!(accepted_peers(&report).len(), 1, "{args:?}: {report}");
    }
}

/// (d) and (g): UDP sockets, autobound by `sendmsg` or bound to the wildcard, receive nothing
/// from outside except the configured resolver's replies (address and port both checked).
#[test]
fn udp_sockets_receive_only_resolver_replies_from_outside() {
    if !require_root("udp_sockets_receive_only_resolver_replies_from_outside") {
        return;
    }
    let f = Fixture::new(|_| {});
    f.topo
        .upstream
        .ip(&["addr", "add", "10.77.0.3/16", "dev", &f.topo.upstream_link]);
    let local_end = |port: u16, family6: bool| {
        let (from, to) = if family6 {
            (lo6(0), lo6(port))
        } else {
            (lo4(0), lo4(port))
        };
        // Anything the peer sent before has long been delivered or dropped.
        std::thread::sleep(Duration::from_millis(200));
        udp_send(&f.topo.agent, from, to, "end");
    };

    // The attack, outside interception: the peer's datagram arrives.
    let l = Listener::start(&["udp", "none", "--send-to", "10.77.0.1:53"], &f.control())
        .expect("control socket");
    udp_send(
        &f.topo.upstream,
        addr("10.77.0.1:9999"),
        v4(l.port()),
        "peer",
    );
    local_end(l.port(), false);
    assert_eq!(datagrams(&l.finish()), ["peer", "end"]);

    for (args, what) in [
        (
            vec!["udp", "none", "--send-to", "10.77.0.1:53"],
            "autobound by a DNS query",
        ),
        (
            vec!["udp", "none", "--send-to", "10.77.0.1:9"],
            "autobound by a refused send",
        ),
        (vec!["udp", "0.0.0.0:7006"], "bound to the wildcard"),
    ] {
        let l = Listener::start(&args, &f.agent()).expect("agent socket");
        assert_ne!(l.port(), 0, "{what}: bound");
        if what == "bound to the wildcard" {
            assert_eq!(
                l.local,
                addr("0.0.0.0:7006"),
                "UDP wildcard binds are kept (a resolver outside must stay reachable)"
            );
        }
        let to = v4(l.port());
        udp_send(&f.topo.upstream, addr("10.77.0.1:9999"), to, "wrong-port");
        udp_send(&f.topo.upstream, addr("10.77.0.3:53"), to, "wrong-host");
        udp_send(&f.topo.upstream, addr("10.77.0.1:53"), to, "resolver");
        local_end(l.port(), false);
        assert_eq!(datagrams(&l.finish()), ["resolver", "end"], "{what}");
    }

    // IPv6: the same, with the IPv6 resolver.
    let l = Listener::start(
        &[
            "udp",
            "none",
            "--family",
            "6",
            "--send-to",
            "[fd00:77::1]:53",
        ],
        &f.agent(),
    )
    .expect("agent socket");
    let to = v6(l.port());
    udp_send(
        &f.topo.upstream,
        addr("[fd00:77::1]:9999"),
        to,
        "wrong-port",
    );
    udp_send(&f.topo.upstream, addr("[fd00:77::1]:53"), to, "resolver");
    local_end(l.port(), true);
    assert_eq!(datagrams(&l.finish()), ["resolver", "end"], "IPv6");
}

/// (e) A port the policy names is published: the peer connects and data flows both ways;
/// in the same cgroup every other port stays closed.
#[test]
fn an_allowed_inbound_port_is_reachable_both_ways() {
    if !require_root("an_allowed_inbound_port_is_reachable_both_ways") {
        return;
    }
    let f = Fixture::new(|c| c.inbound_ports = vec![7010, 7012, 7013]);
    for (args, targets) in [
        (vec!["tcp", "0.0.0.0:7010"], vec![v4(7010)]),
        // A dual-stack wildcard listener on an allowed port: both families get in.
        (
            vec!["tcp", "[::]:7012", "--dualstack", "--count", "2"],
            vec![v6(7012), v4(7012)],
        ),
        // An explicit outside address is fine on an allowed port.
        (vec!["tcp", "10.77.0.2:7013"], vec![v4(7013)]),
    ] {
        let l = Listener::start(&args, &f.agent()).expect("agent listens");
        assert!(
            !l.local.ip().is_loopback(),
            "{args:?}: kept as asked: {}",
            l.local
        );
        for to in &targets {
            assert_eq!(
                f.peer_echo(*to, OK_WITHIN)
                    .unwrap_or_else(|e| panic!("{args:?}: peer to {to}: {e}")),
                "echo:hello",
                "the agent read the peer's line and answered"
            );
        }
        let report = l.finish();
        assert_eq!(accepted_peers(&report).len(), targets.len(), "{report}");
    }
    let l = Listener::start(&["tcp", "0.0.0.0:7011"], &f.agent()).expect("agent listens");
    assert_eq!(l.local, lo4(7011));
    assert_unreachable_from_peer(&f, v4(7011), "a port that is not allowed");
    let l2 = Listener::start(&["tcp", "none"], &f.agent()).expect("agent listens");
    assert_unreachable_from_peer(&f, v4(l2.port()), "an autobound port");
}

/// (f) IPv6: `[::]:P` becomes `[::1]:P` (on a dual-stack socket that serves IPv6 loopback
/// only: IPv4 clients are refused), `[::ffff:0.0.0.0]:P` becomes `[::ffff:127.0.0.1]:P`, and
/// an autobound dual-stack listener is closed to both families from outside.
#[test]
fn ipv6_and_dual_stack_listeners_are_only_reachable_over_loopback() {
    if !require_root("ipv6_and_dual_stack_listeners_are_only_reachable_over_loopback") {
        return;
    }
    let f = Fixture::new(|_| {});
    assert_reachable_from_peer(&f, v6(0), &["tcp", "[::]:7020", "--dualstack"]);
    assert_reachable_from_peer(&f, v4(0), &["tcp", "[::]:7023", "--dualstack"]);

    let l =
        Listener::start(&["tcp", "[::]:7021", "--dualstack"], &f.agent()).expect("agent listens");
    assert_eq!(l.local, lo6(7021));
    assert_unreachable_from_peer(&f, v6(7021), "[::] listener, IPv6 peer");
    assert_unreachable_from_peer(&f, v4(7021), "[::] listener, IPv4 peer");
    let err = f
        .local_echo(lo4(7021))
        .expect_err("IPv4 loopback is not served");
    assert_eq!(err.raw_os_error(), Some(ECONNREFUSED), "{err}");
    assert_eq!(f.local_echo(lo6(7021)).expect("local client"), "echo:hello");
    let _ = l.finish();

    let l = Listener::start(&["tcp", "[::ffff:0.0.0.0]:7022", "--dualstack"], &f.agent())
        .expect("agent listens");
    assert_eq!(l.local, addr("[::ffff:127.0.0.1]:7022"));
    assert_unreachable_from_peer(&f, v4(7022), "[::ffff:0.0.0.0] listener");
    assert_eq!(f.local_echo(lo4(7022)).expect("local client"), "echo:hello");
    let _ = l.finish();

    let l = Listener::start(
        &[
            "tcp",
            "none",
            "--family",
            "6",
            "--dualstack",
            "--count",
            "2",
        ],
        &f.agent(),
    )
    .expect("agent listens");
    let port = l.port();
    for to in [v6(port), v4(port)] {
        let err = f.peer_echo(to, REFUSED_WITHIN).expect_err("dropped");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{to}: {err}");
    }
    assert_eq!(f.local_echo(lo6(port)).expect("local v6"), "echo:hello");
    assert_eq!(f.local_echo(lo4(port)).expect("local v4"), "echo:hello");
    let _ = l.finish();
}

/// An agent cgroup whose config went missing fails closed: binds are refused and what
/// arrives from outside is dropped.
#[test]
fn without_config_binds_are_refused_and_inbound_is_dropped() {
    if !require_root("without_config_binds_are_refused_and_inbound_is_dropped") {
        return;
    }
    let f = Fixture::new(|c| c.inbound_ports = vec![7030]);
    let l = Listener::start(&["tcp", "none"], &f.agent()).expect("listens before");
    let path = map_pin_path(f.pins.path(), MAP_CONFIG);
    let data = aya::maps::MapData::from_pin(&path).expect("pinned config map");
    let mut map: aya::maps::HashMap<_, u64, paddock_common::CgroupConfig> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("hash map");
    map.remove(&f.agent.cgroup().id()).expect("remove config");

    assert_unreachable_from_peer(&f, v4(l.port()), "listener without config");
    for args in [["tcp", "0.0.0.0:7030"], ["udp", "0.0.0.0:7031"]] {
        let Err(v) = Listener::start(&args, &f.agent()) else {
            panic!("{args:?}: bound without config");
        };
        assert_eq!(v["errno"], EPERM, "{args:?}: {v}");
    }
    // Loopback binds do not need the config.
    let lo = Listener::start(&["tcp", "127.0.0.1:7032", "--wait-ms", "0"], &f.agent());
    assert!(lo.is_ok(), "{:?}", lo.err());
}

/// The CLI: `ebpf attach --inbound-port` publishes ports and `ebpf status` shows them.
#[test]
fn cli_attach_publishes_inbound_ports_and_status_shows_them() {
    if !require_root("cli_attach_publishes_inbound_ports_and_status_shows_them") {
        return;
    }
    let topo = Topology::new();
    let cg = CgroupGuard::new("cli");
    let pins = PinDir::new();
    let bin = target_bin("paddock-proxy");
    let pin_dir = pins.path().to_str().expect("utf-8").to_owned();
    let cg_path = cg.cgroup().path().to_str().expect("utf-8").to_owned();
    let port = PROXY_PORT.to_string();
    let out = run(
        Command::new(&bin).args([
            "ebpf",
            "attach",
            "--cgroup",
            &cg_path,
            "--pin-dir",
            &pin_dir,
            "--proxy-port",
            &port,
            "--inbound-port",
            "7040",
            "--inbound-port",
            "7041",
        ]),
        &Placement::default(),
    );
    assert!(
        out.status.success(),
        "attach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        Command::new(&bin).args(["ebpf", "status", "--pin-dir", &pin_dir]),
        &Placement::default(),
    );
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains(&format!(
            "agent cgroup id {}: inbound ports 7040, 7041",
            cg.cgroup().id()
        )),
        "{status}"
    );
    let at = Placement {
        netns: Some(&topo.agent),
        cgroup: Some(&cg),
        user: None,
    };
    let l = Listener::start(&["tcp", "0.0.0.0:7040"], &at).expect("published");
    assert_eq!(
        tcp_echo(&topo.upstream, v4(7040), OK_WITHIN).expect("peer to a published port"),
        "echo:hello"
    );
    let _ = l.finish();
    let l = Listener::start(&["tcp", "0.0.0.0:7042"], &at).expect("not published");
    assert!(tcp_echo(&topo.upstream, v4(7042), REFUSED_WITHIN).is_err());
    drop(l);

    let out = run(
        Command::new(&bin).args([
            "ebpf",
            "attach",
            "--cgroup",
            &cg_path,
            "--pin-dir",
            &pin_dir,
            "--proxy-port",
            &port,
            "--inbound-port",
            "0",
        ]),
        &Placement::default(),
    );
    assert!(!out.status.success(), "port 0 must be refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("inbound_ports"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Clients that bind before `connect()` keep working: a wildcard bind with port 0 is left
/// alone (rewriting it to loopback would make the connect fail with `EINVAL` for any
/// non-loopback destination, such as a bypassed one), while an outside address is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_binding_the_wildcard_before_connect_still_reach_bypassed_hosts() {
    if !require_root("clients_binding_the_wildcard_before_connect_still_reach_bypassed_hosts") {
        return;
    }
    let f = Fixture::new(|c| {
        c.bypass = vec![
            "10.77.0.1/32".parse().expect("net"),
            "fd00:77::1/128".parse().expect("net"),
        ];
    });
    let host = UpstreamHost::start(&f.topo.upstream);
    let at = f.agent();
    let tcp = |args: &[&str]| tokio::task::block_in_place(|| client(args, &at));
    for (target, bind) in [
        ("10.77.0.1:443", "0.0.0.0:0"),
        ("[fd00:77::1]:443", "[::]:0"),
    ] {
        let v = tcp(&["tcp", target, "--bind", bind]);
        assert_eq!(v["line"], "upstream", "bound to {bind}: {v}");
    }
    let v = tcp(&["tcp", "10.77.0.1:443", "--bind", "10.77.0.2:0"]);
    assert_eq!(
        v["errno"], EPERM,
        "an outside source address is refused: {v}"
    );
    assert_eq!(host.tcp_accepted.load(Ordering::Relaxed), 2);
}
