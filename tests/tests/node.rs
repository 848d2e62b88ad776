//! Root tier: `paddock-proxy node` on a simulated node (see `paddock_tests::node_lab`): five
//! pods of both kubelet cgroup drivers, each its own run, served by one node agent with the
//! real broker. Each pod reaches its own allowed host with its credential substituted; a
//! host allowed to another pod's run is denied; another pod's placeholder is refused and its
//! secret never sent; UDP goes only to the pod's resolver, whose answers the node agent gives
//! (only names the pod's run could reach); pod deletion frees listeners,
//! programs and map entries; a node agent killed with SIGKILL lets nothing out and serves again
//! after a restart; a pod whose very first action is a connect is intercepted; 200 add/delete
//! cycles leak nothing in the kernel or the agent.

use std::time::Duration;

use serde_json::json;

use paddock_tests::{
    node_lab::{HOST_A, HOST_B, NodeLab, SECRET_A, SECRET_B, UPSTREAM_V4},
    process::client,
    require_root,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_pods_each_reach_only_their_runs_hosts_with_their_own_credentials() {
    if !require_root("five_pods_each_reach_only_their_runs_hosts_with_their_own_credentials") {
        return;
    }
    tokio::task::block_in_place(|| {
        let lab = NodeLab::new(5);
        let listed = lab.listed();
        assert_eq!(listed.len(), 5, "{listed:?}");
        let drivers: std::collections::BTreeSet<_> =
            listed.iter().map(|p| p["driver"].to_string()).collect();
        assert_eq!(
            drivers.len(),
            2,
            "both cgroup drivers among the pods: {listed:?}"
        );
        assert_eq!(lab.intercepted().len(), 5, "one program set per pod cgroup");

        for (i, pod) in lab.pods.iter().enumerate() {
            let (host, secret, other) = if i % 2 == 0 {
                (HOST_A, SECRET_A, HOST_B)
            } else {
                (HOST_B, SECRET_B, HOST_A)
            };
            let path = format!("/pod-{i}");
            let (status, code) = lab.curl(i, host, &path, &pod.placeholder);
            assert_eq!(
                (status, code),
                (200, 0),
                "pod {i} to its host: {}",
                lab.agent_log()
            );
            let seen = lab.upstream(&path);
            assert_eq!(seen.len(), 1, "{seen:?}");
            assert_eq!(
                seen[0]["authorization"],
                format!("Bearer {secret}"),
                "pod {i}"
            );
            // The other runs' host is not this run's.
            let denied = format!("/pod-{i}-other");
            assert_eq!(
                lab.curl(i, other, &denied, &pod.placeholder).0,
                403,
                "pod {i}"
            );
            assert!(lab.upstream(&denied).is_empty());
        }

        // Pod 2 (run-2, allowed host A with credential api-a) presents pod 0's placeholder
        // (run-0, also api-a for host A): refused, and run-0's secret is never sent.
        let stolen = lab.pods[0].placeholder.clone();
        let (status, _) = lab.curl(2, HOST_A, "/stolen", &stolen);
        assert!(
            status == 403 || status == 502,
            "another pod's placeholder must be refused, got {status}"
        );
        assert!(
            lab.upstream("/stolen").is_empty(),
            "nothing reaches upstream"
        );

        // DNS only to the pod's own resolver; UDP anywhere else is refused (EPERM).
        let to_resolver = client(&["udp", "10.88.0.1:53"], &lab.in_pod(1));
        assert_eq!(to_resolver["ok"], true, "{to_resolver}");
        for target in ["10.77.0.1:53", "10.88.0.1:5353", "10.77.0.1:443"] {
            let v = client(&["udp", target], &lab.in_pod(1));
            assert_eq!(v["ok"], false, "UDP to {target} must fail: {v}");
            assert_eq!(v["errno"], libc::EPERM, "{target}: {v}");
        }

        pod_dns_follows_its_run(&lab);

        // Every record names the pod's run; the stolen-placeholder request is pod 2's.
        let audit = lab.audit();
        let stolen_rec: Vec<_> = audit
            .iter()
            .filter(|r| r["kind"] == "request" && r["path"] == "/stolen")
            .collect();
        assert_eq!(stolen_rec.len(), 1, "{audit:?}");
        assert_eq!(stolen_rec[0]["run"], "run-2", "{}", stolen_rec[0]);
        for i in 0..5 {
            let recs: Vec<_> = audit
                .iter()
                .filter(|r| r["kind"] == "request" && r["path"] == format!("/pod-{i}"))
                .collect();
            assert_eq!(recs.len(), 1);
            assert_eq!(recs[0]["run"], format!("run-{i}"), "{}", recs[0]);
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_pod_frees_its_listener_programs_and_map_entries() {
    if !require_root("deleting_a_pod_frees_its_listener_programs_and_map_entries") {
        return;
    }
    tokio::task::block_in_place(|| {
        let lab = NodeLab::new(2);
        let before = lab.intercepted();
        assert_eq!(before.len(), 2);
        let port = lab.listed()[0]["port"].as_u64().expect("port");
        let pod0 = lab
            .pods
            .iter()
            .position(|p| p.uid.as_str() == lab.listed()[0]["uid"])
            .expect("pod");
        let fds = lab.agent_fds();
        lab.delete_pod(pod0).expect("delete");
        let after = lab.intercepted();
        assert_eq!(after.len(), 1, "{after:?}");
        assert!(after.iter().all(|a| a.config.is_some()), "{after:?}");
        assert_eq!(lab.listed().len(), 1);
        // Two listeners (127.0.0.1 and [::1]) closed.
        assert!(
            lab.agent_fds() < fds,
            "listeners of a deleted pod stay open"
        );
        let probe = lab.pods[pod0]
            .netns
            .run(move || {
                std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::from((
                        [127, 0, 0, 1],
                        u16::try_from(port).expect("port"),
                    )),
                    Duration::from_secs(2),
                )
            })
            .expect("netns");
        assert!(probe.is_err(), "the deleted pod's listener still accepts");
        // The other pod is unaffected.
        let other = 1 - pod0;
        let host = if other % 2 == 0 { HOST_A } else { HOST_B };
        assert_eq!(
            lab.curl(other, host, "/still", &lab.pods[other].placeholder)
                .0,
            200
        );
        assert!(
            lab.delete_pod(pod0)
                .is_err_and(|e| e.contains("not served"))
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_agent_lets_nothing_out_and_serves_again_after_restart() {
    if !require_root("a_killed_node_agent_lets_nothing_out_and_serves_again_after_restart") {
        return;
    }
    tokio::task::block_in_place(|| {
        let mut lab = NodeLab::new(2);
        let ph = lab.pods[0].placeholder.clone();
        assert_eq!(lab.curl(0, HOST_A, "/before", &ph).0, 200);
        let port = lab.listed()[0]["port"].clone();
        // Requests in flight from pod 0 while the agent is SIGKILLed.
        std::thread::scope(|s| {
            let lab = &lab;
            let ph = &ph;
            let traffic = s.spawn(move || {
                for n in 0..40 {
                    let _ = lab.curl(0, HOST_A, &format!("/inflight-{n}"), ph);
                }
            });
            std::thread::sleep(Duration::from_millis(300));
            lab.crash_agent();
            traffic.join().expect("traffic");
        });
        lab.kill_agent();
        // Whatever reached upstream went through the proxy: substituted, never the placeholder.
        let inflight: Vec<_> = lab
            .api
            .as_ref()
            .expect("api")
            .requests()
            .into_iter()
            .filter(|r| {
                r["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("/inflight-"))
            })
            .collect();
        assert!(inflight.len() < 40, "the agent died mid-traffic");
        for r in &inflight {
            assert_eq!(r["authorization"], format!("Bearer {SECRET_A}"), "{r}");
        }
        // Programs stay pinned: the pods' connections (to the upstream's own address, which the
        // node would route) go to the dead listener and are refused.
        assert_eq!(
            lab.intercepted().len(),
            2,
            "interception outlives the agent"
        );
        for i in 0..2 {
            let host = if i % 2 == 0 { HOST_A } else { HOST_B };
            let (status, code) = lab.curl(i, host, "/while-down", &lab.pods[i].placeholder);
            assert_eq!(status, 0, "no HTTP answer while the node agent is down");
            assert_eq!(
                code, 7,
                "curl: connection refused (exit 7), not a timeout or a bypass"
            );
        }
        assert!(
            lab.upstream("/while-down").is_empty(),
            "nothing left the node unintercepted"
        );
        // DNS stays redirected to the pod's own (now closed) DNS port: no answer, never one
        // from the nameserver itself.
        let dns = |lab: &NodeLab| client(&["dns", "10.88.0.1:53", HOST_A, "A"], &lab.in_pod(0));
        let down = dns(&lab);
        assert_eq!(
            down["ok"], false,
            "no DNS answer while the agent is down: {down}"
        );
        lab.start_agent();
        let listed = lab.listed();
        assert_eq!(listed.len(), 2, "restored pods: {listed:?}");
        assert!(
            listed.iter().any(|p| p["port"] == port),
            "pod 0 is back on the port its pinned config names: {listed:?}"
        );
        assert_eq!(
            lab.curl(0, HOST_A, "/after", &ph).0,
            200,
            "{}",
            lab.agent_log()
        );
        assert_eq!(lab.upstream("/after").len(), 1);
        let back = dns(&lab);
        assert_eq!(
            back["rcode"], "NOERROR",
            "the restored pod's DNS answers: {back}"
        );
        assert_eq!(back["answers"], json!([UPSTREAM_V4.to_string()]), "{back}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_first_action_is_intercepted() {
    if !require_root("a_pods_first_action_is_intercepted") {
        return;
    }
    tokio::task::block_in_place(|| {
        // The pod is set up (the CNI step) before any process runs in it; its first process
        // connects at once, to a host its run may not reach.
        let lab = NodeLab::new(1);
        let (status, _) = lab.curl(0, HOST_B, "/first", &lab.pods[0].placeholder);
        assert_eq!(
            status,
            403,
            "the very first connect meets the proxy: {}",
            lab.agent_log()
        );
        assert!(lab.upstream("/first").is_empty());
        let audit = lab.audit();
        let denials: Vec<_> = audit
            .iter()
            .filter(|r| r["kind"] == "deny" && r["run"] == "run-0")
            .collect();
        assert!(
            !denials.is_empty(),
            "the denial is audited as run-0's: {audit:?}"
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_pod_add_delete_cycles_leak_nothing() {
    if !require_root("two_hundred_pod_add_delete_cycles_leak_nothing") {
        return;
    }
    tokio::task::block_in_place(|| {
        let lab = NodeLab::new(1);
        // Warm-up.
        for _ in 0..10 {
            lab.delete_pod(0).expect("delete");
            lab.add_pod(0).expect("add");
        }
        let fds = lab.agent_fds();
        let rss = lab.agent_rss_kib();
        for cycle in 0..200 {
            lab.delete_pod(0)
                .unwrap_or_else(|e| panic!("cycle {cycle}: delete: {e}"));
            assert!(
                lab.intercepted().is_empty(),
                "cycle {cycle}: programs left behind"
            );
            lab.add_pod(0)
                .unwrap_or_else(|e| panic!("cycle {cycle}: add: {e}"));
        }
        let status = lab.intercepted();
        assert_eq!(status.len(), 1);
        assert!(status[0].config.is_some());
        // A leak would show as hundreds (two listeners per pod per cycle); the slack is for
        // descriptors that come and go on their own (a pod-socket client still being closed, a
        // pooled broker connection).
        let now = lab.agent_fds();
        assert!(
            now <= fds + 2,
            "descriptors leaked over 200 cycles: {fds} before, {now} after"
        );
        let grown = lab.agent_rss_kib().saturating_sub(rss);
        assert!(
            grown < 2048,
            "node agent memory grew {grown} KiB over 200 cycles"
        );
        // Still serving after all that.
        assert_eq!(
            lab.curl(0, HOST_A, "/after-cycles", &lab.pods[0].placeholder)
                .0,
            200
        );
    });
}

/// Pod 1's DNS (to its nameserver, redirected to its own DNS server) answers only names its
/// run's policy could reach: run-1 may reach host B, not host A (run-0's), and a name carrying
/// data (a DNS tunnel) is refused without being asked onwards, and audited under run-1.
fn pod_dns_follows_its_run(lab: &NodeLab) {
    let dns = |name: &str| client(&["dns", "10.88.0.1:53", name, "A"], &lab.in_pod(1));
    let allowed = dns(HOST_B);
    assert_eq!(allowed["rcode"], "NOERROR", "{allowed}");
    assert_eq!(
        allowed["answers"],
        json!([UPSTREAM_V4.to_string()]),
        "{allowed}"
    );
    assert_eq!(
        allowed["from"], "10.88.0.1:53",
        "the answer comes from the nameserver"
    );
    let tunnel = "7365637265742d6b6579.exfil.example";
    for name in [HOST_A, tunnel] {
        let v = dns(name);
        assert_eq!(v["rcode"], "NXDOMAIN", "{name}: {v}");
    }
    let audit = lab.audit();
    for name in [HOST_A, tunnel] {
        assert!(
            audit
                .iter()
                .any(|r| r["kind"] == "dns_deny" && r["sni"] == name && r["run"] == "run-1"),
            "DNS refusal of {name} not audited for run-1"
        );
    }
}
