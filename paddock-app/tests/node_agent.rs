//! The node agent's pod table without a kernel (see `common`): pods of both kubelet cgroup
//! drivers, idempotent and conflicting adds, failures undone, removal freeing everything, and
//! a restarted agent taking back its pods.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::Node;
use paddock_app::node::agent::{PodError, pod_agent_config};
use paddock_proxy::pod_cgroup::CgroupDriver;

fn listening(port: u16) -> bool {
    match TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    ) {
        Ok(_) => true,
        // The proxy resets a connection without an original destination at once, which can
        // reach the client before its connect() returns: something listened.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_both_drivers_are_intercepted_each_as_its_run() {
    let node = Node::new();
    let a = node.pod(2, "run-a");
    let b = node.pod(3, "run-b");
    let sa = node.agent.add(a.clone()).await.expect("add a");
    let sb = node.agent.add(b.clone()).await.expect("add b");
    assert_eq!(
        (sa.run.as_str(), sa.driver),
        ("run-a", CgroupDriver::Systemd)
    );
    assert_eq!(
        (sb.run.as_str(), sb.driver),
        ("run-b", CgroupDriver::Cgroupfs)
    );
    assert_eq!(sa.cgroup, node.cgroup_of(&a));
    assert_ne!(sa.port, sb.port);
    assert!(listening(sa.port) && listening(sb.port));
    {
        let maps = node.maps.0.lock().expect("maps");
        let cfg = &maps.config[&sa.cgroup_id];
        assert_eq!(cfg.proxy_port, sa.port);
        assert_eq!(cfg.proxy_v4, std::net::Ipv4Addr::LOCALHOST);
        assert_eq!(
            cfg.dns,
            ["10.96.0.10:53".parse::<SocketAddr>().expect("addr")]
        );
        assert!(cfg.block_udp);
        // The pod's DNS goes to its own DNS server on the same port, never to 10.96.0.10.
        assert_eq!(cfg.dns_redirect_port, Some(sa.port));
        assert_eq!(maps.config[&sb.cgroup_id].proxy_port, sb.port);
    }
    // That server answers by run-a's policy (app.test only): a name carrying data is NXDOMAIN.
    assert_eq!(dns_rcode(sa.port, "6b6579.exfil.example").await, 3);
    // `connections` moves with the probes above (the proxy resets them on its own time).
    let listed: Vec<_> = node
        .agent
        .list()
        .await
        .into_iter()
        .map(|mut p| {
            p.connections = 0;
            p
        })
        .collect();
    assert_eq!(listed, [sa.clone(), sb.clone()]);
    let record =
        std::fs::read_to_string(node.dir.path().join(format!("state/pods/{}.json", a.uid)))
            .expect("record");
    assert!(record.contains("\"run\":\"run-a\""), "{record}");
    assert!(
        record.contains(&format!("\"port\":{}", sa.port)),
        "{record}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_add_is_idempotent_and_a_different_spec_conflicts() {
    let node = Node::new();
    let a = node.pod(4, "run-a");
    let first = node.agent.add(a.clone()).await.expect("add");
    let again = node.agent.add(a.clone()).await.expect("retried ADD");
    assert_eq!(first, again);
    let mut other = a.clone();
    other.run = "run-b".into();
    let err = node.agent.add(other).await.expect_err("conflict");
    assert!(matches!(err, PodError::Conflict(_)), "{err}");
    // The pod still runs as run-a.
    assert_eq!(node.agent.list().await[0].run, "run-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_leave_nothing_behind() {
    let node = Node::new();
    // No cgroup: refused before anything is bound.
    let mut ghost = node.pod(6, "run-a");
    ghost.uid = paddock_proxy::pod_cgroup::PodUid::parse("00000000-0000-4000-8000-0000000000ff")
        .expect("uid");
    let err = node.agent.add(ghost).await.expect_err("no cgroup");
    assert!(err.to_string().contains("no cgroup for pod"), "{err}");
    // No network namespace.
    let mut no_ns = node.pod(7, "run-a");
    no_ns.netns = node.dir.path().join("netns-missing");
    let err = node.agent.add(no_ns).await.expect_err("no netns");
    assert!(matches!(err, PodError::Netns(_)), "{err}");
    // The attach fails: nothing recorded, nothing left attached (the listeners it bound are
    // counted in `node_cycles`, alone in its process).
    let a = node.pod(8, "run-a");
    node.maps.0.lock().expect("maps").fail_next_attach = true;
    let err = node.agent.add(a.clone()).await.expect_err("attach fails");
    assert!(matches!(err, PodError::Ebpf(_)), "{err}");
    assert!(node.agent.list().await.is_empty());
    {
        let maps = node.maps.0.lock().expect("maps");
        assert!(
            maps.config.is_empty() && maps.links.is_empty(),
            "a partial attach is undone"
        );
    }
    assert!(
        !node
            .dir
            .path()
            .join(format!("state/pods/{}.json", a.uid))
            .exists()
    );
    // A bad spec never gets that far.
    let mut bad = node.pod(9, "run a");
    bad.name = "x".into();
    assert!(matches!(node.agent.add(bad).await, Err(PodError::Spec(_))));
    // And the same pod is fine once the fault is gone.
    node.agent.add(a).await.expect("add after the fault");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_pod_closes_its_listeners_connections_and_config() {
    let node = Node::new();
    let a = node.pod(10, "run-a");
    let b = node.pod(11, "run-b");
    let sa = node.agent.add(a.clone()).await.expect("add a");
    let sb = node.agent.add(b.clone()).await.expect("add b");
    // An open connection of pod a, waiting in the TLS handshake.
    let mut open = node.connect_pod(sa.port);
    open.write_all(b"\x16\x03\x01").expect("partial hello");
    // Well inside the pipeline's 5 s handshake timeout, which would close it anyway.
    open.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    tokio::time::sleep(Duration::from_millis(100)).await;
    node.agent.remove(&a.uid).await.expect("remove");
    let mut buf = [0u8; 16];
    let read = tokio::task::spawn_blocking(move || open.read(&mut buf))
        .await
        .expect("join");
    assert!(
        matches!(read, Ok(0))
            || read.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the pod's connection must be closed by its removal"
    );
    assert!(!listening(sa.port), "the pod's listener must be gone");
    {
        let maps = node.maps.0.lock().expect("maps");
        assert!(!maps.config.contains_key(&sa.cgroup_id));
        assert!(
            maps.config.contains_key(&sb.cgroup_id),
            "the other pod stays"
        );
    }
    assert!(listening(sb.port));
    assert!(
        !node
            .dir
            .path()
            .join(format!("state/pods/{}.json", a.uid))
            .exists()
    );
    let err = node.agent.remove(&a.uid).await.expect_err("twice");
    assert!(matches!(err, PodError::NotFound(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_takes_back_its_pods_and_releases_stale_ones() {
    let node = Node::new();
    let a = node.pod(12, "run-a");
    let b = node.pod(13, "run-b");
    let sa = node.agent.add(a.clone()).await.expect("add a");
    let sb = node.agent.add(b.clone()).await.expect("add b");
    // The agent goes (an upgrade): listeners close, programs and records stay.
    node.agent.shutdown().await;
    assert!(!listening(sa.port));
    assert_eq!(node.maps.0.lock().expect("maps").config.len(), 2);
    assert!(matches!(
        node.agent.add(node.pod(14, "run-c")).await,
        Err(PodError::ShuttingDown)
    ));
    // Pod b is deleted while no agent runs.
    node.delete_pod_files(&b);
    let restarted = Node::agent_in(node.dir.path(), &node.maps, &node.origdst);
    let report = restarted.restore().await.expect("restore");
    assert_eq!(report.restored, std::slice::from_ref(&a.uid));
    assert_eq!(report.released, std::slice::from_ref(&b.uid));
    let listed = restarted.list().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].port, sa.port,
        "the pinned config names the old port"
    );
    assert!(listening(sa.port));
    let maps = node.maps.0.lock().expect("maps");
    assert!(maps.config.contains_key(&sa.cgroup_id));
    assert!(
        !maps.config.contains_key(&sb.cgroup_id),
        "stale pod detached"
    );
}

/// A recorded pod that cannot be served again after an upgrade keeps its programs (refused),
/// and a config an older agent pinned without the DNS redirect is rewritten to send its DNS
/// to the pod's closed port: DNS fails closed like its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unserved_pods_dns_is_pointed_at_its_closed_port() {
    let node = Node::new();
    let a = node.pod(16, "run-a");
    let sa = node.agent.add(a.clone()).await.expect("add a");
    node.agent.shutdown().await;
    {
        // What an agent from before the pods' DNS servers pinned: nameservers, no redirect.
        let mut maps = node.maps.0.lock().expect("maps");
        let cfg = maps.config.get_mut(&sa.cgroup_id).expect("config");
        cfg.dns_redirect_port = None;
    }
    // Its namespace is not visible to the new agent: it cannot be served again.
    std::fs::remove_file(&a.netns).expect("rm netns");
    let restarted = Node::agent_in(node.dir.path(), &node.maps, &node.origdst);
    let report = restarted.restore().await.expect("restore");
    assert_eq!(report.failed, std::slice::from_ref(&a.uid));
    let maps = node.maps.0.lock().expect("maps");
    let cfg = maps
        .config
        .get(&sa.cgroup_id)
        .expect("still attached, never detached");
    assert_eq!(cfg.dns_redirect_port, Some(sa.port));
    assert_eq!(cfg.proxy_port, sa.port);
    assert!(cfg.block_udp);
}

/// A recorded (running) pod whose programs cannot be attached again after a restart keeps
/// the ones it has: taking them off would open its egress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reattach_never_detaches_a_running_pod() {
    let node = Node::new();
    let a = node.pod(20, "run-a");
    let sa = node.agent.add(a.clone()).await.expect("add a");
    node.agent.shutdown().await;
    node.maps.0.lock().expect("maps").refuse_attaches = true;
    let restarted = Node::agent_in(node.dir.path(), &node.maps, &node.origdst);
    let report = restarted.restore().await.expect("restore");
    assert_eq!(report.failed, std::slice::from_ref(&a.uid));
    let maps = node.maps.0.lock().expect("maps");
    assert_eq!(maps.links.get(&sa.cgroup_id), Some(&13), "programs kept");
    assert_eq!(
        maps.config.get(&sa.cgroup_id).map(|c| c.proxy_port),
        Some(sa.port),
        "config kept"
    );
}

/// An IPv6 nameserver is only allowed (and redirected) when the pod has the `[::1]` DNS
/// socket; without it, UDP to it is refused instead of sent to a port nothing serves.
#[test]
fn an_ipv6_nameserver_needs_the_ipv6_dns_socket() {
    let node = Node::new();
    let mut spec = node.pod(18, "run-a");
    spec.nameservers = vec![
        "10.96.0.10".parse().expect("ip"),
        "fd00::10".parse().expect("ip"),
    ];
    let both = pod_agent_config(4000, true, &spec).expect("valid");
    assert_eq!(both.dns.len(), 2);
    assert_eq!(both.dns_redirect_port, Some(4000));
    let v4 = pod_agent_config(4000, false, &spec).expect("valid");
    assert_eq!(
        v4.dns,
        ["10.96.0.10:53".parse::<SocketAddr>().expect("addr")]
    );
    spec.nameservers = vec!["fd00::10".parse().expect("ip")];
    let v6_only = pod_agent_config(4000, false, &spec).expect("valid");
    assert!(v6_only.dns.is_empty() && v6_only.dns_redirect_port.is_none());
}

/// The response code of an A query for `name` to UDP `127.0.0.1:port`.
async fn dns_rcode(port: u16, name: &str) -> u8 {
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(u8::try_from(label.len()).expect("label"));
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    socket
        .send_to(&query, ("127.0.0.1", port))
        .await
        .expect("send");
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        socket.recv_from(&mut buf),
    )
    .await
    .expect("an answer within 5 s")
    .expect("recv");
    assert!(
        n >= 12 && buf[..2] == [0x12, 0x34],
        "not an answer to the query"
    );
    buf[3] & 0x0f
}
