//! Prometheus metrics. Labels carry route names and status codes only: never a caller-supplied
//! string (unbounded cardinality) and never a secret.

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

type Labels = Vec<(String, String)>;

/// The cluster audit sink's counters (`paddock_broker_audit_kubernetes_*`): records accepted
/// into its queue, written as `AuditEvent` objects, and failed by reason (`queue-full`,
/// `api`, `timeout`, `stopped`); `pending` is queued plus in flight. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct AuditKubernetesMetrics {
    pub queued: Counter,
    pub written: Counter,
    pub failed: Family<Labels, Counter>,
    pub pending: Gauge,
}

impl AuditKubernetesMetrics {
    pub fn fail(&self, reason: &'static str) {
        self.failed
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
    auth_failures: Family<Labels, Counter>,
    policy_reload_failures: Counter,
    rate_limit_buckets: Gauge,
    grant_subscriptions: Gauge,
    grant_cutoffs: Counter,
    leases: Family<Labels, Gauge>,
    audit_kubernetes: AuditKubernetesMetrics,
    node_ca: Family<Labels, Counter>,
}

/// The lease states `paddock_broker_leases` reports (every state is always present).
const LEASE_STATES: [&str; 3] = ["active", "expired", "revoked"];

fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_1, 2.0, 16,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[must_use]
    #[expect(
        clippy::too_many_lines,
        reason = "one registration per family, each with its help text"
    )]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("paddock_broker");
        let requests = Family::<Labels, Counter>::default();
        let latency = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let auth_failures = Family::<Labels, Counter>::default();
        let policy_reload_failures = Counter::default();
        let rate_limit_buckets = Gauge::default();
        let grant_subscriptions = Gauge::default();
        let grant_cutoffs = Counter::default();
        let leases = Family::<Labels, Gauge>::default();
        for state in LEASE_STATES {
            drop(leases.get_or_create(&vec![("state".to_owned(), state.to_owned())]));
        }
        let build_info = Family::<Labels, Gauge>::default();
        build_info
            .get_or_create(&vec![
                ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
                ("component".to_owned(), "broker".to_owned()),
            ])
            .set(1);
        registry.register(
            "build_info",
            "Always 1; labels name the version and component of this binary",
            build_info,
        );
        registry.register(
            "leases",
            "Leases kept in the store, by state (refreshed by the maintenance sweep)",
            leases.clone(),
        );
        let audit_kubernetes = AuditKubernetesMetrics::default();
        registry.register(
            "audit_kubernetes_queued",
            "Audit records accepted into the cluster audit sink's queue",
            audit_kubernetes.queued.clone(),
        );
        registry.register(
            "audit_kubernetes_written",
            "Audit records written as AuditEvent objects",
            audit_kubernetes.written.clone(),
        );
        registry.register(
            "audit_kubernetes_failed",
            "Audit records the cluster sink failed, by reason (the operation was refused)",
            audit_kubernetes.failed.clone(),
        );
        registry.register(
            "audit_kubernetes_pending",
            "Audit records queued or being written to the API server",
            audit_kubernetes.pending.clone(),
        );
        let node_ca = Family::<Labels, Counter>::default();
        registry.register(
            "node_ca_requests",
            "Node agents' intermediate CA requests by result (issued, refused, failed)",
            node_ca.clone(),
        );
        registry.register(
            "grant_subscriptions",
            "Live invalidation-stream subscriptions (proxies reusing substitutions)",
            grant_subscriptions.clone(),
        );
        registry.register(
            "grant_cutoffs",
            "Subscriptions cut off for not acknowledging an invalidation in time",
            grant_cutoffs.clone(),
        );
        registry.register(
            "requests",
            "API requests by route and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "API request latency by route",
            latency.clone(),
        );
        registry.register(
            "auth_failures",
            "Authentication failures by kind",
            auth_failures.clone(),
        );
        registry.register(
            "policy_reload_failures",
            "Policy reloads rejected (previous policy kept)",
            policy_reload_failures.clone(),
        );
        registry.register(
            "rate_limit_buckets",
            "Live rate-limit buckets",
            rate_limit_buckets.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            auth_failures,
            policy_reload_failures,
            rate_limit_buckets,
            grant_subscriptions,
            grant_cutoffs,
            leases,
            audit_kubernetes,
            node_ca,
        }
    }

    /// Counts `leases` by state at `now` (unix seconds) into the `leases` gauge.
    pub fn set_leases(&self, leases: &[paddock_wire::api::LeaseInfo], now: u64) {
        let mut counts = [0_i64; LEASE_STATES.len()];
        for lease in leases {
            // Indexes into LEASE_STATES: active, expired, revoked.
            let state = if lease.revoked {
                2
            } else {
                usize::from(lease.expires_at <= now)
            };
            counts[state] += 1;
        }
        for (state, n) in LEASE_STATES.iter().zip(counts) {
            self.leases
                .get_or_create(&vec![("state".to_owned(), (*state).to_owned())])
                .set(n);
        }
    }

    /// The cluster audit sink's counters, registered in this registry.
    #[must_use]
    pub fn audit_kubernetes(&self) -> AuditKubernetesMetrics {
        self.audit_kubernetes.clone()
    }

    /// Counts one `POST /v1/node-ca` by its answer's status.
    pub fn node_ca_request(&self, status: u16) {
        let result = match status {
            200 => "issued",
            400..=499 => "refused",
            _ => "failed",
        };
        self.node_ca
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc();
    }

    /// Copies the grant hub's state: live subscriptions, and cut-offs up to `cutoffs` in all.
    pub fn set_grant_state(&self, subscriptions: usize, cutoffs: u64) {
        self.grant_subscriptions
            .set(i64::try_from(subscriptions).unwrap_or(i64::MAX));
        let seen = self.grant_cutoffs.get();
        if cutoffs > seen {
            self.grant_cutoffs.inc_by(cutoffs - seen);
        }
    }

    pub fn observe_request(&self, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&vec![
                ("route".to_owned(), route.to_owned()),
                ("status".to_owned(), status.to_string()),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("route".to_owned(), route.to_owned())])
            .observe(seconds);
    }

    pub fn auth_failure(&self, kind: &str) {
        self.auth_failures
            .get_or_create(&vec![("kind".to_owned(), kind.to_owned())])
            .inc();
    }

    pub fn policy_reload_failed(&self) {
        self.policy_reload_failures.inc();
    }

    pub fn set_rate_limit_buckets(&self, n: usize) {
        self.rate_limit_buckets
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// `OpenMetrics` text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_state_is_exposed_and_cutoffs_only_grow() {
        let m = Metrics::new();
        m.set_grant_state(3, 2);
        m.set_grant_state(2, 2);
        m.set_grant_state(2, 1);
        let text = m.render();
        assert!(
            text.contains("paddock_broker_grant_subscriptions 2"),
            "{text}"
        );
        assert!(
            text.contains("paddock_broker_grant_cutoffs_total 2"),
            "{text}"
        );
    }

    fn lease(id: &str, expires_at: u64, revoked: bool) -> paddock_wire::api::LeaseInfo {
        paddock_wire::api::LeaseInfo {
            lease_id: id.to_owned(),
            run: "r".to_owned(),
            namespace: "ns".to_owned(),
            credential: "c".to_owned(),
            provider: "static".to_owned(),
            delivery: paddock_wire::api::DeliveryMode::ProxyInjected,
            hosts: vec![],
            pool_slot: None,
            issued_at: 1,
            expires_at,
            revoked,
        }
    }

    #[test]
    fn build_info_and_lease_states_are_exposed() {
        let m = Metrics::new();
        let text = m.render();
        assert!(
            text.contains(&format!(
                "paddock_broker_build_info{{version=\"{}\",component=\"broker\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        // Every state is present before the first sweep.
        assert!(
            text.contains("paddock_broker_leases{state=\"revoked\"} 0"),
            "{text}"
        );
        m.set_leases(
            &[
                lease("a", 100, false),
                lease("b", 50, false),
                lease("c", 100, true),
                lease("d", 200, false),
            ],
            60,
        );
        let text = m.render();
        assert!(
            text.contains("paddock_broker_leases{state=\"active\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("paddock_broker_leases{state=\"expired\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("paddock_broker_leases{state=\"revoked\"} 1"),
            "{text}"
        );
        // A later sweep replaces the counts rather than adding to them.
        m.set_leases(&[], 60);
        assert!(
            m.render()
                .contains("paddock_broker_leases{state=\"active\"} 0")
        );
    }

    #[test]
    fn node_ca_requests_are_counted_by_result() {
        let m = Metrics::new();
        for status in [200, 200, 403, 400, 503] {
            m.node_ca_request(status);
        }
        let text = m.render();
        for line in [
            r#"paddock_broker_node_ca_requests_total{result="issued"} 2"#,
            r#"paddock_broker_node_ca_requests_total{result="refused"} 2"#,
            r#"paddock_broker_node_ca_requests_total{result="failed"} 1"#,
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }
}
