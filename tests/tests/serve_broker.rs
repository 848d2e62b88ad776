//! Root tier: the served proxy (`[broker]` table) against a separately running
//! `paddock-broker serve`, with an agent in an intercepted cgroup. The broker is the only
//! source of truth: a revoked lease is refused on the very next request (also on a kept-alive
//! connection), a policy change denies new connections within a second, and a broker killed
//! mid-run lets no further request reach upstream.

use std::time::{Duration, Instant};

use paddock_tests::{
    broker_lab::{API, BrokerLab, KeepAliveAgent, SECRET, policy, request_record},
    files::audit_records,
    require_root,
};
use paddock_wire::api::RevokeRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_lease_is_refused_on_the_next_request() {
    if !require_root("revoked_lease_is_refused_on_the_next_request") {
        return;
    }
    tokio::task::block_in_place(|| {
        let lab = BrokerLab::new();
        let (lease, placeholder) = lab.issue();
        let mut agent = KeepAliveAgent::start(&lab);

        let (status, port) = agent.get("/before", &placeholder);
        assert_eq!(status, "200", "the lease works before revocation");
        let seen = lab.upstream("/before");
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0]["authorization"], format!("Bearer {SECRET}"));

        let revoked = lab
            .controller(move |c| async move { c.revoke(&RevokeRequest { lease_id: lease }).await })
            .expect("revoke");
        assert!(revoked.revoked);
        let at = Instant::now();
        // The very next request, on the connection the proxy already allowed.
        let (status, again) = agent.get("/after", &placeholder);
        let took = at.elapsed();
        assert_eq!(status, "403", "a revoked placeholder is refused");
        assert_eq!(again, port, "refused on the same kept-alive connection");
        assert!(took < Duration::from_secs(1), "refusal took {took:?}");
        // And on a new connection.
        assert_eq!(lab.curl("/after-new", &placeholder), 403);
        assert!(lab.upstream("/after").is_empty() && lab.upstream("/after-new").is_empty());

        let trail = lab.proxy_audit();
        let refused = request_record(&trail, "/after");
        assert_eq!(refused["outcome"], "denied", "{refused}");
        assert_eq!(refused["status"], 403, "{refused}");
        assert!(
            refused["reason"]
                .as_str()
                .is_some_and(|r| r.contains("substitution_denied")),
            "{refused}"
        );

        // Revocation is per lease: a new one works on the same connection.
        let (_, fresh) = lab.issue();
        let (status, _) = agent.get("/fresh", &fresh);
        assert_eq!(status, "200");
        assert_eq!(
            lab.upstream("/fresh")[0]["authorization"],
            format!("Bearer {SECRET}")
        );
        assert!(
            lab.api
                .requests()
                .iter()
                .all(|r| !r.to_string().contains("pdk-")),
            "a placeholder reached upstream"
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_change_denies_new_connections_within_a_second() {
    if !require_root("policy_change_denies_new_connections_within_a_second") {
        return;
    }
    tokio::task::block_in_place(|| {
        let lab = BrokerLab::new();
        let (_, placeholder) = lab.issue();
        assert_eq!(lab.curl("/allowed", &placeholder), 200);
        // A connection opened before the change, used without a placeholder.
        let mut agent = KeepAliveAgent::start(&lab);
        let (status, port) = agent.get("/kept-before", "own-token");
        assert_eq!(status, "200");

        // Write the new policy atomically (rename), as a ConfigMap update does.
        lab.write_policy(&policy(lab.dir.path(), false));
        let changed = Instant::now();
        // Probe a new connection and the old one in turn. What counts is when the first
        // refused probe *started*: process start-up and handshakes under load are not the
        // policy's latency.
        let (mut new_refused, mut kept_refused) = (None, None);
        let mut tries = 0;
        while (new_refused.is_none() || kept_refused.is_none())
            && changed.elapsed() < Duration::from_secs(3)
        {
            tries += 1;
            if new_refused.is_none() {
                let started = changed.elapsed();
                match lab.curl(&format!("/probe-{tries}"), &placeholder) {
                    403 => new_refused = Some(started),
                    status => assert_eq!(status, 200, "new connection, try {tries}"),
                }
            }
            if kept_refused.is_none() {
                let started = changed.elapsed();
                let (status, again) = agent.get(&format!("/kept-{tries}"), "own-token");
                assert_eq!(again, port, "the connection opened before the change");
                match status.as_str() {
                    "403" => kept_refused = Some(started),
                    _ => assert_eq!(status, "200", "kept connection, try {tries}"),
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "policy change refused: new connection probe started at {new_refused:?}, open \
             connection probe at {kept_refused:?} ({tries} rounds)"
        );
        let second = Duration::from_secs(1);
        assert!(
            new_refused.is_some_and(|t| t < second),
            "new connections: {new_refused:?}"
        );
        assert!(
            kept_refused.is_some_and(|t| t < second),
            "open connection: {kept_refused:?}"
        );

        // On record: every refusal, as a connection decision or a request outcome.
        let trail = lab.proxy_audit();
        let records = audit_records(&trail);
        let refusals = records
            .iter()
            .filter(|r| r["kind"] == "deny" || r["outcome"] == "denied")
            .count();
        assert!(refusals >= 2, "both refusals are audited: {trail}");
        let kept: Vec<_> = records
            .iter()
            .filter(|r| {
                r["path"].as_str().is_some_and(|p| p.starts_with("/kept-"))
                    && r["outcome"] == "denied"
            })
            .collect();
        assert_eq!(kept.len(), 1, "{trail}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_run_lets_nothing_more_upstream() {
    if !require_root("broker_killed_mid_run_lets_nothing_more_upstream") {
        return;
    }
    tokio::task::block_in_place(|| {
        let mut lab = BrokerLab::new();
        let (_, placeholder) = lab.issue();
        let mut agent = KeepAliveAgent::start(&lab);
        let (status, port) = agent.get("/before", &placeholder);
        assert_eq!(status, "200");
        assert_eq!(lab.curl("/before-new", &placeholder), 200);
        let before = lab.api.requests().len();

        assert!(
            lab.proxy_metric("paddock_proxy_grants_held")
                .is_some_and(|held| held >= 1.0),
            "the first substitution left a reusable grant"
        );
        lab.broker.kill();
        // The proxy notices the broken grant stream within moments and drops every grant it
        // held (a grant is a decision the broker already made; until the stream is seen to
        // break it may still be used, as ARCHITECTURE.md's fault table says).
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while lab.proxy_metric("paddock_proxy_grants_held") != Some(0.0) {
            assert!(
                std::time::Instant::now() < deadline,
                "the proxy kept its grants after the broker died"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Kept-alive connection: the substitution cannot be made, so the request is answered
        // 502 (a dependency of the gateway failed), never sent on as is.
        let (status, again) = agent.get("/after", &placeholder);
        assert_eq!(
            status, "502",
            "broker gone: the request must be refused, not sent as is"
        );
        assert_eq!(again, port);
        // New connections: the egress check cannot be made, so nothing is allowed; neither
        // with a placeholder nor without one.
        assert_ne!(lab.curl("/after-new", &placeholder), 200);
        assert_ne!(lab.curl("/after-plain", "not-a-placeholder"), 200);
        // And requests without a placeholder on the open connection, once the last egress
        // answer is stale (0.25 s).
        std::thread::sleep(Duration::from_millis(400));
        let (status, _) = agent.get("/after-kept-plain", "own-token");
        assert_eq!(status, "502", "no broker, no egress: nothing is forwarded");
        assert_eq!(
            lab.api.requests().len(),
            before,
            "no request reached upstream after the broker died: {:?}",
            lab.api.requests()
        );
        let trail = lab.proxy_audit();
        assert!(
            trail
                .lines()
                .any(|l| l.contains("\"deny\"") && l.contains(API)),
            "new connections are denied and audited: {trail}"
        );
        let failed = request_record(&trail, "/after");
        assert_eq!(failed["outcome"], "failed", "{failed}");
        assert_eq!(failed["status"], 502, "{failed}");
        assert_eq!(request_record(&trail, "/before")["outcome"], "forwarded");
    });
}
