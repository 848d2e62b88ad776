//! Root tier: per-node CAs on a simulated node (see `paddock_tests::node_lab`). The node agent
//! runs with `tls.mode = "broker"`: it holds no CA on disk, gets a short-lived intermediate for
//! its node from the real broker process (cluster root made by `paddock-broker ca init`,
//! `POST /v1/node-ca` authenticated by a `TokenReview` naming the node), and an agent in a pod
//! that trusts only the root completes a substituted HTTPS request through it. The broker
//! refuses an intermediate for a node other than the token's.

use paddock_tests::{
    node_lab::{HOST_A, NODE_CA_TOKEN, NodeLab, OTHER_NODE_TOKEN, SECRET_A},
    require_root,
};

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
    });
}
