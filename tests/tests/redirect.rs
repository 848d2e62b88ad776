//! Root tier: eBPF redirection, original-destination recovery and closed exits, on a real
//! kernel, in network namespaces and cgroups created (and removed) by each test.

use std::{
    process::Command,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use paddock_proxy::{
    cgroup::Cgroup,
    ebpf::{AgentConfig, Interception, Interceptor, LoadOptions},
    origdst::{MapOriginalDst, OriginalDst},
};
use paddock_tests::{
    CgroupGuard, PinDir, Topology,
    process::{Placement, client, run, target_bin},
    require_root,
    servers::{OrigDstServer, PROXY_PORT, UpstreamHost, raise_nofile, udp_responder},
    topology::{UPSTREAM_V4, UPSTREAM_V6},
};
use serde_json::Value;

const EPERM: i64 = 1;
const ECONNREFUSED: i64 = 111;

/// One agent namespace + cgroup intercepted towards a stand-in proxy, and an upstream host.
struct Fixture {
    // Drop order: servers, then the loader (its getsockopt link), then pins, cgroup, namespaces.
    server: OrigDstServer,
    host: UpstreamHost,
    _ic: Interceptor,
    _pins: PinDir,
    cgroup: CgroupGuard,
    topo: Topology,
}

impl Fixture {
    fn new(tweak: impl FnOnce(&mut AgentConfig)) -> Self {
        let topo = Topology::new();
        let cgroup = CgroupGuard::new("ag");
        let pins = PinDir::new();
        let mut ic = Interceptor::load(&LoadOptions {
            pin_dir: pins.path().to_path_buf(),
            ..LoadOptions::default()
        })
        .unwrap_or_else(|e| panic!("load eBPF: {e}"));
        let mut cfg = AgentConfig::loopback(PROXY_PORT);
        tweak(&mut cfg);
        ic.attach_agent(cgroup.cgroup(), &cfg)
            .unwrap_or_else(|e| panic!("attach agent: {e}"));
        ic.attach_proxy(&Cgroup::current().expect("own cgroup"))
            .unwrap_or_else(|e| panic!("attach proxy: {e}"));
        let map: Arc<dyn OriginalDst> =
            Arc::new(MapOriginalDst::open_pinned(pins.path()).expect("open map"));
        let server = OrigDstServer::start(&topo.agent, Some(&map), Duration::ZERO);
        let host = UpstreamHost::start(&topo.upstream);
        Self {
            server,
            host,
            _ic: ic,
            _pins: pins,
            cgroup,
            topo,
        }
    }

    fn in_cgroup(&self) -> Placement<'_> {
        Placement {
            netns: Some(&self.topo.agent),
            cgroup: Some(&self.cgroup),
            user: None,
        }
    }

    fn outside_cgroup(&self) -> Placement<'_> {
        Placement {
            netns: Some(&self.topo.agent),
            cgroup: None,
            user: None,
        }
    }

    fn client(&self, args: &[&str]) -> Value {
        tokio::task::block_in_place(|| client(args, &self.in_cgroup()))
    }
}

fn recovered(target: &str) -> String {
    format!("sockopt={target} map={target}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ipv4_connect_lands_on_proxy_and_destination_is_recovered() {
    if !require_root("ipv4_connect_lands_on_proxy_and_destination_is_recovered") {
        return;
    }
    let f = Fixture::new(|_| {});
    let target = format!("{UPSTREAM_V4}:443");
    let v = f.client(&["tcp", &target]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["line"], recovered(&target), "{v}");
    assert_eq!(
        v["peer"], target,
        "getpeername must show the original peer: {v}"
    );
    assert_eq!(f.server.accepted.load(Ordering::Relaxed), 1);
    assert_eq!(
        f.host.tcp_accepted.load(Ordering::Relaxed),
        0,
        "nothing may reach the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ipv6_connect_lands_on_proxy_and_destination_is_recovered() {
    if !require_root("ipv6_connect_lands_on_proxy_and_destination_is_recovered") {
        return;
    }
    let f = Fixture::new(|_| {});
    let target = format!("[{UPSTREAM_V6}]:443");
    let v = f.client(&["tcp", &target]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["line"], recovered(&target), "{v}");
    assert_eq!(v["peer"], target, "{v}");
    assert_eq!(f.host.tcp_accepted.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ipv4_mapped_dial_on_dual_stack_socket_is_recovered() {
    if !require_root("ipv4_mapped_dial_on_dual_stack_socket_is_recovered") {
        return;
    }
    let f = Fixture::new(|_| {});
    let target = format!("{UPSTREAM_V4}:443");
    let v = f.client(&["tcp", &target, "--dualstack"]);
    assert_eq!(v["ok"], true, "{v}");
    // The proxy's IPv4 listener accepted it and recovered the IPv4 destination.
    assert_eq!(v["line"], recovered(&target), "{v}");
    assert_eq!(v["peer"], format!("[::ffff:{UPSTREAM_V4}]:443"), "{v}");
    assert_eq!(f.host.tcp_accepted.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bypass_mark_bypass_cidr_and_other_cgroups_reach_the_real_host() {
    if !require_root("bypass_mark_bypass_cidr_and_other_cgroups_reach_the_real_host") {
        return;
    }
    let f = Fixture::new(|c| {
        c.bypass_mark = Some(0x70ad);
        c.bypass = vec!["10.77.0.1/32".parse().expect("net")];
    });
    // The proxy's own upstream dial carries the mark.
    let v = f.client(&["tcp", "10.77.0.1:443", "--mark", &0x70ad.to_string()]);
    assert_eq!(v["line"], "upstream", "{v}");
    // A bypassed destination is dialled directly; a neighbour is still intercepted.
    let v = f.client(&["tcp", "10.77.0.1:443"]);
    assert_eq!(v["line"], "upstream", "{v}");
    let v = f.client(&["tcp", "[fd00:77::1]:443"]);
    assert_eq!(
        v["line"],
        recovered("[fd00:77::1]:443"),
        "bypass is per address family: {v}"
    );
    // A process outside any intercepted cgroup is never redirected.
    let v =
        tokio::task::block_in_place(|| client(&["tcp", "[fd00:77::1]:443"], &f.outside_cgroup()));
    assert_eq!(v["line"], "upstream", "{v}");
    assert_eq!(f.host.tcp_accepted.load(Ordering::Relaxed), 3);
    assert_eq!(f.server.accepted.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn udp_is_closed_except_dns_and_raw_sockets_cannot_be_created() {
    if !require_root("udp_is_closed_except_dns_and_raw_sockets_cannot_be_created") {
        return;
    }
    let f = Fixture::new(|c| c.dns = vec!["10.77.0.1:53".parse().expect("addr")]);
    for target in [
        "10.77.0.1:9999",
        "10.77.0.1:443",
        "[fd00:77::1]:53",
        "10.77.0.2:53",
    ] {
        let v = f.client(&["udp", target]);
        assert_eq!(v["ok"], false, "UDP to {target} must fail: {v}");
        assert_eq!(v["errno"], EPERM, "{target}: {v}");
    }
    let v = f.client(&["udp", "10.77.0.1:53", "--reply"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["reply"], "dns-reply", "{v}");
    assert_eq!(f.host.udp_received.load(Ordering::Relaxed), 1);

    // Even root inside the cgroup cannot open sockets that slip past the connect and sendmsg
    // hooks: the refusal (EPERM) is the sock_create program's.
    let v = f.client(&["sockets"]);
    for kind in ["raw_icmp4", "raw_icmp6", "ping4", "sctp"] {
        assert_eq!(v[kind]["ok"], false, "{kind} socket must be refused: {v}");
    }
    for kind in ["raw_icmp4", "raw_icmp6"] {
        assert_eq!(v[kind]["errno"], EPERM, "{kind}: {v}");
    }
    assert_eq!(v["tcp"]["ok"], true, "{v}");
    assert_eq!(v["udp6"]["ok"], true, "{v}");
    // Outside the cgroup root may open them: the refusal above is ours, not the namespace's.
    let v = tokio::task::block_in_place(|| client(&["sockets"], &f.outside_cgroup()));
    assert_eq!(v["raw_icmp4"]["ok"], true, "{v}");
    // cgroup/sock_create does not run for AF_PACKET (the kernel calls it from inet_create
    // only), so packet sockets are closed by running agents without CAP_NET_RAW, as `run` mode
    // and the Kubernetes manifests do. Show that an unprivileged agent cannot open one.
    let v = tokio::task::block_in_place(|| {
        let mut cmd = Command::new(paddock_tests::process::client_path());
        cmd.arg("sockets");
        let out = run(
            &mut cmd,
            &Placement {
                user: Some(65534),
                ..f.in_cgroup()
            },
        );
        serde_json::from_slice::<Value>(&out.stdout).expect("json")
    });
    for kind in ["packet", "raw_icmp4", "raw_icmp6"] {
        assert_eq!(v[kind]["ok"], false, "unprivileged {kind} must fail: {v}");
    }
    assert_eq!(v["tcp"]["ok"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dns_can_be_redirected_to_the_proxy_and_the_reply_looks_like_the_resolver() {
    if !require_root("dns_can_be_redirected_to_the_proxy_and_the_reply_looks_like_the_resolver") {
        return;
    }
    let f = Fixture::new(|c| {
        c.dns = vec!["10.77.0.1:53".parse().expect("addr")];
        c.dns_redirect_port = Some(5353);
    });
    let (proxy_dns, _task) = udp_responder(
        &f.topo.agent,
        "127.0.0.1:5353".parse().expect("addr"),
        b"proxy-dns",
    );
    let v = f.client(&["udp", "10.77.0.1:53", "--reply"]);
    assert_eq!(v["reply"], "proxy-dns", "{v}");
    assert_eq!(
        v["from"], "10.77.0.1:53",
        "the reply's source must be the resolver asked: {v}"
    );
    assert_eq!(proxy_dns.load(Ordering::Relaxed), 1);
    assert_eq!(f.host.udp_received.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_connections_each_recover_their_own_destination() {
    if !require_root("a_thousand_concurrent_connections_each_recover_their_own_destination") {
        return;
    }
    raise_nofile();
    let f = Fixture::new(|_| {});
    let v = f.client(&["tcp-many", "1000"]);
    assert_eq!(v["ok"], 1000, "{v}");
    assert_eq!(f.server.accepted.load(Ordering::Relaxed), 1000);
    assert_eq!(f.host.tcp_accepted.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_four_tuples_in_two_namespaces_recover_their_own_destination() {
    if !require_root("identical_four_tuples_in_two_namespaces_recover_their_own_destination") {
        return;
    }
    let pins = PinDir::new();
    let mut ic = Interceptor::load(&LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        ..LoadOptions::default()
    })
    .expect("load");
    ic.attach_proxy(&Cgroup::current().expect("own cgroup"))
        .expect("attach proxy");
    let (ta, tb) = (Topology::new(), Topology::new());
    let (ca, cb) = (CgroupGuard::new("a"), CgroupGuard::new("b"));
    let cfg = AgentConfig::loopback(PROXY_PORT);
    ic.attach_agent(ca.cgroup(), &cfg).expect("attach a");
    ic.attach_agent(cb.cgroup(), &cfg).expect("attach b");
    let map: Arc<dyn OriginalDst> =
        Arc::new(MapOriginalDst::open_pinned(pins.path()).expect("map"));
    // The servers wait before looking up, so both connections are recorded first: a key
    // without the netns cookie would make one overwrite the other.
    let _sa = OrigDstServer::start(&ta.agent, Some(&map), Duration::from_millis(500));
    let _sb = OrigDstServer::start(&tb.agent, Some(&map), Duration::from_millis(500));
    let (a_target, b_target) = ("10.77.0.1:443", "10.77.3.3:8443");
    let bind = "127.0.0.1:40000";
    let (va, vb) = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let a = s.spawn(|| {
                client(
                    &["tcp", a_target, "--bind", bind],
                    &Placement {
                        netns: Some(&ta.agent),
                        cgroup: Some(&ca),
                        user: None,
                    },
                )
            });
            let b = s.spawn(|| {
                client(
                    &["tcp", b_target, "--bind", bind],
                    &Placement {
                        netns: Some(&tb.agent),
                        cgroup: Some(&cb),
                        user: None,
                    },
                )
            });
            (a.join().expect("client a"), b.join().expect("client b"))
        })
    });
    assert_eq!(va["line"], recovered(a_target), "{va}");
    assert_eq!(vb["line"], recovered(b_target), "{vb}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_proxy_listener_down_connects_are_refused_and_never_reach_the_origin() {
    if !require_root("with_the_proxy_listener_down_connects_are_refused_and_never_reach_the_origin")
    {
        return;
    }
    // Point the cgroup at a port nothing listens on.
    let f = Fixture::new(|c| c.proxy_port = PROXY_PORT + 1);
    for target in ["10.77.0.1:443", "[fd00:77::1]:443"] {
        let v = f.client(&["tcp", target]);
        assert_eq!(v["ok"], false, "{v}");
        assert_eq!(v["errno"], ECONNREFUSED, "{target}: {v}");
    }
    assert_eq!(f.host.tcp_accepted.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pinned_interception_survives_the_loader_and_detach_removes_it() {
    if !require_root("pinned_interception_survives_the_loader_and_detach_removes_it") {
        return;
    }
    let topo = Topology::new();
    let cg = CgroupGuard::new("pin");
    let pins = PinDir::new();
    let host = UpstreamHost::start(&topo.upstream);
    let bin = target_bin("paddock-proxy");
    let pin_dir = pins.path().to_str().expect("utf-8 path").to_owned();
    let cg_path = cg.cgroup().path().to_str().expect("utf-8 path").to_owned();
    let port = PROXY_PORT.to_string();
    let attach = |what: &str| {
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
                "--proxy-v6",
                "::1",
            ]),
            &Placement::default(),
        );
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    attach("first loader");
    // The loader process has exited; its pinned programs and maps remain.
    let map: Arc<dyn OriginalDst> =
        Arc::new(MapOriginalDst::open_pinned(pins.path()).expect("pinned map"));
    let server = OrigDstServer::start(&topo.agent, Some(&map), Duration::ZERO);
    let at = Placement {
        netns: Some(&topo.agent),
        cgroup: Some(&cg),
        user: None,
    };
    let v = tokio::task::block_in_place(|| client(&["tcp", "10.77.0.1:443"], &at));
    assert!(
        v["line"]
            .as_str()
            .unwrap_or("")
            .ends_with("map=10.77.0.1:443"),
        "{v}"
    );
    // `ebpf status --output json` lists the cgroup with its links in place.
    let out = run(
        Command::new(&bin).args(["ebpf", "status", "--pin-dir", &pin_dir, "--output", "json"]),
        &Placement::default(),
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let cgroup_id = std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(cg.cgroup().path()).expect("cgroup"),
    );
    assert_eq!(status["agents"][0]["cgroup_id"], cgroup_id, "{status}");
    assert_eq!(status["agents"][0]["configured"], true, "{status}");
    assert_eq!(status["agents"][0]["links_pinned"], true, "{status}");
    // A restarted loader re-opens the same maps and keeps the existing links.
    attach("restarted loader");
    let v = tokio::task::block_in_place(|| client(&["tcp", "[fd00:77::1]:443"], &at));
    assert!(
        v["line"]
            .as_str()
            .unwrap_or("")
            .ends_with("map=[fd00:77::1]:443"),
        "{v}"
    );
    assert_eq!(server.accepted.load(Ordering::Relaxed), 2);
    assert_eq!(host.tcp_accepted.load(Ordering::Relaxed), 0);
    // Explicit detach removes interception.
    let out = run(
        Command::new(&bin).args([
            "ebpf",
            "detach",
            "--cgroup",
            &cg_path,
            "--pin-dir",
            &pin_dir,
        ]),
        &Placement::default(),
    );
    assert!(
        out.status.success(),
        "detach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = tokio::task::block_in_place(|| client(&["tcp", "10.77.0.1:443"], &at));
    assert_eq!(v["line"], "upstream", "{v}");
    assert_eq!(host.tcp_accepted.load(Ordering::Relaxed), 1);
    let out = run(
        Command::new(&bin).args(["ebpf", "status", "--pin-dir", &pin_dir]),
        &Placement::default(),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no intercepted cgroups"),
        "{out:?}"
    );
}
