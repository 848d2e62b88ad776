//! Root tier: per-node CAs on a simulated node (see `paddock_tests::node_lab`). The node agent
//! runs with `tls.mode = "broker"`: it holds no CA on disk, gets a short-lived intermediate for
//! its node from the real broker process (cluster root made by `paddock-broker ca init`,
//! `POST /v1/node-ca` authenticated by a `TokenReview` naming the node), and an agent in a pod
//! that trusts only the root completes a substituted HTTPS request through it. The broker
//! refuses an intermediate for a node other than the token's. An operator's
//! `paddock-broker ca revoke --node` makes the node agent withdraw its intermediate (pods'
//! handshakes fail) until `ca unblock`, after which it gets a new one and serves again.

use std::time::{Duration, Instant};

use paddock_tests::{
    node_lab::{HOST_A, NODE_CA_TOKEN, NodeLab, OTHER_NODE_TOKEN, SECRET_A},
    process::target_bin,
    require_root,
};

/// `paddock-broker ca ARGS --config broker.yaml` on the lab's broker database.
fn ca(lab: &NodeLab, args: &[&str]) -> String {
    let out = std::process::Command::new(target_bin("paddock-broker"))
        .arg("ca")
        .args(args)
        .arg("--config")
        .arg(lab.dir.path().join("broker.yaml"))
        .output()
        .expect("paddock-broker ca");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ca {args:?}: {text}");
    text
}

/// Waits up to 15 s for `done` (the node agent reads the revocation list every second).
fn eventually(lab: &NodeLab, what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within 15 s\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_trusting_only_the_cluster_root_is_served_under_the_nodes_intermediate() {
    if !require_root("a_pod_trusting_only_the_cluster_root_is_served_under_the_nodes_intermediate")
    {
        return;
    }
    tokio::task::block_in_place(|| {
        let lab = NodeLab::with_node_ca(1);
        let d = lab.dir.path();
        assert!(!d.join("ca").exists(), "no CA directory on the node");

        // The pod's curl trusts the root alone (public/ca.crt is the root's certificate).
        let root = std::fs::read(d.join("root/ca.crt")).expect("root");
        let trusted = std::fs::read(lab.public.path().join("ca.crt")).expect("trusted");
        assert_eq!(trusted, root);
        let (status, code) = lab.curl(0, HOST_A, "/via-node-ca", &lab.pods[0].placeholder);
        assert_eq!((status, code), (200, 0), "{}", lab.agent_log());
        let seen = lab.upstream("/via-node-ca");
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0]["authorization"], format!("Bearer {SECRET_A}"));

        // The broker issued exactly one intermediate, for this node, and audited it.
        let issued: Vec<_> = lab
            .broker_audit()
            .into_iter()
            .filter(|e| e["event"] == "node-ca-issued")
            .collect();
        assert_eq!(issued.len(), 1, "{issued:?}");
        assert_eq!(issued[0]["node"], "node-test");
        assert!(lab.agent_log().contains("node CA issued by the broker"));

        // A token bound to another node cannot get this node's CA, nor this node's token
        // another node's.
        for (token, node) in [
            (OTHER_NODE_TOKEN, "node-test"),
            (NODE_CA_TOKEN, "node-other"),
        ] {
            let err = lab.request_node_ca(token, node).expect_err("refused");
            assert!(err.contains("403"), "{token} for {node}: {err}");
        }
        let denied = lab
            .broker_audit()
            .into_iter()
            .filter(|e| e["event"] == "node-ca-denied")
            .count();
        assert_eq!(denied, 2);

        // The node is compromised: revoke its intermediate and bar it. The node agent sees
        // the revocation, is refused a new one and withdraws the CA: the pod's TLS handshake
        // fails (nothing is forged), and nothing reaches upstream.
        let out = ca(
            &lab,
            &[
                "revoke",
                "--node",
                "node-test",
                "--reason",
                "root-tier test",
            ],
        );
        assert!(out.contains("revoked 1 live one(s)"), "{out}");
        eventually(&lab, "the CA withdrawn", || {
            lab.agent_log()
                .contains("the revoked node CA could not be replaced")
        });
        let (status, code) = lab.curl(0, HOST_A, "/after-revoke", &lab.pods[0].placeholder);
        assert_ne!(code, 0, "the handshake must fail (HTTP {status})");
        assert!(lab.upstream("/after-revoke").is_empty());
        assert!(
            lab.broker_audit()
                .iter()
                .any(|e| e["event"] == "node-ca-denied"
                    && e["reason"].as_str().unwrap_or_default().contains("barred")),
            "the refused renewal is audited"
        );

        // The bar is lifted: the next retry installs a new intermediate and pods are served.
        ca(&lab, &["unblock", "--node", "node-test"]);
        eventually(&lab, "a new intermediate", || {
            lab.curl(0, HOST_A, "/after-unblock", &lab.pods[0].placeholder) == (200, 0)
        });
        let listed = ca(&lab, &["list"]);
        assert!(listed.contains("root-tier test"), "{listed}");
    });
}
