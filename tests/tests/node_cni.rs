//! Root tier: the chained CNI plugin `paddock-cni`, invoked exactly as a container runtime
//! does (CNI environment and stdin, after Debian's `bridge` + `host-local` plugins, with their
//! result as `prevResult`), against a node agent that learns pods from the API server
//! (recorded answers). ADD returns only once the agent pod is intercepted, so the pod's very
//! first connect meets the proxy; a pod that is not an agent pod is left alone; a pod the API
//! server does not list, or any ADD while the node agent is down, fails (the runtime would
//! not start the pod); CHECK and DEL work, DEL twice too, and DEL without a node agent.

use paddock_tests::{
    node_lab::{HOST_A, HOST_B, NodeLab, SECRET_A},
    require_root,
};

/// CNI's "try again later" error code.
const TRY_AGAIN_LATER: u64 = 11;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cni_add_returns_once_the_pod_is_intercepted() {
    if !require_root("cni_add_returns_once_the_pod_is_intercepted") {
        return;
    }
    tokio::task::block_in_place(|| {
        // 0: agent pod (run-0), 1: not an agent pod, 2: agent pod the API does not list.
        let mut lab = NodeLab::cni(&[(Some(0), true), (None, true), (Some(2), false)]);

        let (code, out) = lab.cni_add(0);
        assert_eq!(code, 0, "ADD of the agent pod: {out}\n{}", lab.agent_log());
        // The bridge plugin's result goes on unchanged (paddock-cni adds no interface).
        let ip = out["ips"][0]["address"].as_str().expect("ip");
        assert!(ip.starts_with("10.89.0."), "{out}");
        assert_eq!(out["cniVersion"], "1.0.0");
        let listed = lab.listed();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0]["run"], "run-0");
        assert_eq!(lab.intercepted().len(), 1);

        // The pod's first process: its very first connect is intercepted.
        let ph = lab.cni_pods[0].placeholder.clone().expect("placeholder");
        let at = lab.in_cni_pod(0);
        assert_eq!(
            lab.curl_at(&at, "ca.crt", HOST_A, "/cni-first", &ph),
            (200, 0)
        );
        let seen = lab.upstream("/cni-first");
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0]["authorization"], format!("Bearer {SECRET_A}"));
        assert_eq!(
            lab.curl_at(&at, "ca.crt", HOST_B, "/cni-denied", &ph).0,
            403
        );
        assert!(lab.upstream("/cni-denied").is_empty());

        // CHECK: the pod is intercepted as it should be.
        let (code, out) = lab.cni_exec("paddock-cni", "CHECK", 0, &lab.paddock_conf(Some(&out)));
        assert_eq!(code, 0, "CHECK: {out}");

        // Not an agent pod: ADD succeeds, nothing is attached, its egress is its own (it
        // reaches the upstream host directly, with the upstream's own certificate).
        let (code, out) = lab.cni_add(1);
        assert_eq!(code, 0, "ADD of a plain pod: {out}");
        assert_eq!(lab.listed().len(), 1);
        assert_eq!(lab.intercepted().len(), 1);
        let plain = lab.in_cni_pod(1);
        assert_eq!(
            lab.curl_at(
                &plain,
                "upstream-ca.crt",
                HOST_A,
                "/plain-pod",
                "not-a-placeholder"
            ),
            (200, 0)
        );
        assert_eq!(
            lab.upstream("/plain-pod")[0]["authorization"],
            "Bearer not-a-placeholder"
        );

        // A pod the API server does not list: ADD fails, the runtime would not start it.
        let (code, out) = lab.cni_add(2);
        assert_eq!(code, 1, "ADD of an unknown pod must fail: {out}");
        assert_eq!(out["code"], TRY_AGAIN_LATER, "{out}");
        assert!(
            out["details"]
                .as_str()
                .is_some_and(|d| d.contains("not in the node agent's view")),
            "{out}"
        );
        assert_eq!(lab.intercepted().len(), 1);
        let (code, out) = lab.cni_exec("paddock-cni", "DEL", 2, &lab.paddock_conf(None));
        assert_eq!(code, 0, "the runtime cleans up a failed ADD: {out}");
        let (code, out) = lab.cni_exec("bridge", "DEL", 2, &lab.bridge_conf());
        assert_eq!(code, 0, "bridge DEL: {out}");

        // DEL releases the pod; a second DEL is fine.
        assert_eq!(lab.cni_del(0), 0);
        assert!(lab.listed().is_empty());
        assert!(
            lab.intercepted().is_empty(),
            "DEL detaches the pod's programs"
        );
        let (code, out) = lab.cni_exec("paddock-cni", "DEL", 0, &lab.paddock_conf(None));
        assert_eq!(code, 0, "a repeated DEL: {out}");

        // The node agent down: ADD fails at once with "try again later".
        lab.kill_agent();
        let (code, out) = lab.cni_add(0);
        assert_eq!(code, 1, "ADD without a node agent must fail: {out}");
        assert_eq!(out["code"], TRY_AGAIN_LATER, "{out}");
        assert!(lab.intercepted().is_empty());
        // DEL does not wait for the node agent (the next one releases what is gone).
        assert_eq!(lab.cni_del(1), 0, "DEL without a node agent");
    });
}
