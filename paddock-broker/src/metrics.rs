//! Prometheus metrics. Labels carry route names and status codes only: never a caller-supplied
//! string (unbounded cardinality) and never a secret.

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

type Labels = Vec<(String, String)>;

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
    node_ca: Family<Labels, Counter>,
}

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
            node_ca,
        }
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
