//! The proxy's Prometheus metrics.
//!
//! One [`ProxyMetrics`] per process, shared behind an `Arc`; the admin listener
//! ([`AdminServer`]) serves [`ProxyMetrics::encode`] with `/healthz` and `/readyz`. Every
//! labelled family is pre-populated with all its label values so dashboards and alerts see
//! zeros rather than missing series. The label values themselves live in [`crate::labels`]
//! (re-exported here), which everything that reports a decision depends on.
//!
//! | family | type | labels |
//! | --- | --- | --- |
//! | `paddock_proxy_active_connections` | gauge | |
//! | `paddock_proxy_parked_connections` | gauge | idle HTTP/1.1 agent connections holding no HTTP server |
//! | `paddock_proxy_connections_total` | counter | `decision`: allow, deny, discovery |
//! | `paddock_proxy_rejections_total` | counter | `reason`: see [`Rejection`] |
//! | `paddock_proxy_handshake_failures_total` | counter | `leg`: agent, upstream |
//! | `paddock_proxy_leaf_cache_hits_total` / `_misses_total` | counter | |
//! | `paddock_proxy_leaf_forges_total` | counter | |
//! | `paddock_proxy_upstream_latency_seconds` | histogram | |
//! | `paddock_proxy_substitutions_total` | counter | |
//! | `paddock_proxy_grant_reuses_total` | counter | substitutions served from a reused broker grant (no broker call) |
//! | `paddock_proxy_scrubbed_total` | counter | `location`: see [`ScrubLocation`] |
//! | `paddock_proxy_bytes_total` | counter | `direction`: agent_to_upstream, upstream_to_agent |
//! | `paddock_proxy_audit_write_failures_total` | counter | `kind`: audit event kind |
//! | `paddock_proxy_audit_disabled` | gauge | 1 when running with `--audit none` |
//! | `paddock_proxy_dns_queries_total` | counter | `outcome`: see [`DnsOutcome`] |
//! | `paddock_proxy_dns_in_flight` | gauge | DNS questions waiting for the policy or the resolver |
//! | `paddock_proxy_grants_held` | gauge | reusable broker grants kept |
//! | `paddock_proxy_build_info` | gauge | always 1; `version`, `component` |

mod admin;
pub mod ready;

pub use admin::AdminServer;
pub use ready::{CheckOutcome, Readiness, ReadyCheck};

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::labels::AuditKind;
pub use crate::labels::{DecisionLabel, Direction, DnsOutcome, Leg, Rejection, ScrubLocation};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ScrubLabels {
    location: ScrubLocation,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    decision: DecisionLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: Rejection,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LegLabels {
    leg: Leg,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabels {
    direction: Direction,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AuditLabels {
    kind: AuditKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DnsLabels {
    outcome: DnsOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    component: &'static str,
}

/// Counters the TLS layer's leaf cache bumps directly (clones share the same values).
#[derive(Debug, Clone, Default)]
pub struct LeafCacheMetrics {
    pub hits: Counter,
    pub misses: Counter,
    pub forges: Counter,
}

/// All proxy metrics and the registry that encodes them.
#[derive(Debug)]
pub struct ProxyMetrics {
    registry: Registry,
    active: Gauge,
    parked: Gauge,
    connections: Family<DecisionLabels, Counter>,
    rejections: Family<ReasonLabels, Counter>,
    handshake_failures: Family<LegLabels, Counter>,
    leaf_cache: LeafCacheMetrics,
    upstream_latency: Histogram,
    substitutions: Counter,
    grant_reuses: Counter,
    scrubbed: Family<ScrubLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    audit_failures: Family<AuditLabels, Counter>,
    audit_disabled: Gauge,
    dns_queries: Family<DnsLabels, Counter>,
    dns_in_flight: Gauge,
    grants_held: Gauge,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyMetrics {
    /// Creates and registers every family.
    #[must_use]
    #[expect(
        clippy::too_many_lines,
        reason = "one registration per family, in the order of the table above"
    )]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("paddock_proxy");
        let m = Self {
            active: Gauge::default(),
            parked: Gauge::default(),
            connections: Family::default(),
            rejections: Family::default(),
            handshake_failures: Family::default(),
            leaf_cache: LeafCacheMetrics::default(),
            // 0.5 ms .. ~16 s
            upstream_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            substitutions: Counter::default(),
            grant_reuses: Counter::default(),
            scrubbed: Family::default(),
            bytes: Family::default(),
            audit_failures: Family::default(),
            audit_disabled: Gauge::default(),
            dns_queries: Family::default(),
            dns_in_flight: Gauge::default(),
            grants_held: Gauge::default(),
            registry: Registry::default(),
        };
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                component: "proxy",
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; labels name the version and component of this binary",
            build_info,
        );
        registry.register(
            "dns_in_flight",
            "DNS questions waiting for the policy's answer or the resolver",
            m.dns_in_flight.clone(),
        );
        registry.register(
            "grants_held",
            "Reusable broker grants this process keeps",
            m.grants_held.clone(),
        );
        registry.register(
            "active_connections",
            "Agent connections currently open",
            m.active.clone(),
        );
        registry.register(
            "parked_connections",
            "Idle HTTP/1.1 agent connections parked without an HTTP server (their TLS state only)",
            m.parked.clone(),
        );
        registry.register(
            "connections",
            "Agent connections by policy decision",
            m.connections.clone(),
        );
        registry.register(
            "rejections",
            "Connections refused before the request loop, by reason",
            m.rejections.clone(),
        );
        registry.register(
            "handshake_failures",
            "TLS handshake failures by leg",
            m.handshake_failures.clone(),
        );
        registry.register(
            "leaf_cache_hits",
            "Forged-leaf cache hits",
            m.leaf_cache.hits.clone(),
        );
        registry.register(
            "leaf_cache_misses",
            "Forged-leaf cache misses",
            m.leaf_cache.misses.clone(),
        );
        registry.register(
            "leaf_forges",
            "Leaf certificates forged",
            m.leaf_cache.forges.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Time from sending a request upstream to its response head",
            m.upstream_latency.clone(),
        );
        registry.register(
            "substitutions",
            "Requests whose credentials were substituted",
            m.substitutions.clone(),
        );
        registry.register(
            "grant_reuses",
            "Substitutions served from a reused broker grant, without a broker call",
            m.grant_reuses.clone(),
        );
        registry.register(
            "scrubbed",
            "Secrets replaced by their placeholder in upstream responses, by location",
            m.scrubbed.clone(),
        );
        registry.register("bytes", "Bytes relayed, by direction", m.bytes.clone());
        registry.register(
            "audit_write_failures",
            "Audit records that could not be written, by event kind",
            m.audit_failures.clone(),
        );
        registry.register(
            "audit_disabled",
            "1 when the proxy runs with auditing explicitly disabled (--audit none)",
            m.audit_disabled.clone(),
        );
        registry.register(
            "dns_queries",
            "Datagrams received by the proxy's DNS server, by what was done with them",
            m.dns_queries.clone(),
        );
        // Materialise every series at zero (the returned read guards are not needed).
        for d in DecisionLabel::ALL {
            drop(
                m.connections
                    .get_or_create(&DecisionLabels { decision: *d }),
            );
        }
        for r in Rejection::ALL {
            drop(m.rejections.get_or_create(&ReasonLabels { reason: *r }));
        }
        for l in Leg::ALL {
            drop(m.handshake_failures.get_or_create(&LegLabels { leg: *l }));
        }
        for d in Direction::ALL {
            drop(m.bytes.get_or_create(&DirectionLabels { direction: *d }));
        }
        for l in ScrubLocation::ALL {
            drop(m.scrubbed.get_or_create(&ScrubLabels { location: *l }));
        }
        for k in AuditKind::ALL {
            drop(m.audit_failures.get_or_create(&AuditLabels { kind: *k }));
        }
        for o in DnsOutcome::ALL {
            drop(m.dns_queries.get_or_create(&DnsLabels { outcome: *o }));
        }
        Self { registry, ..m }
    }

    /// Counts a DNS question in flight until the guard drops.
    #[must_use]
    pub fn track_dns_question(&self) -> ConnectionGuard {
        self.dns_in_flight.inc();
        ConnectionGuard {
            gauge: self.dns_in_flight.clone(),
        }
    }

    /// Sets the number of reusable broker grants kept.
    pub fn set_grants_held(&self, n: usize) {
        self.grants_held.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The grants-held gauge, for the grant cache to keep current
    /// ([`crate::broker::GrantCache::start_with_gauge`]).
    #[must_use]
    pub fn grants_held(&self) -> Gauge {
        self.grants_held.clone()
    }

    /// Counts a parked agent connection until the guard drops.
    #[must_use]
    pub fn track_parked(&self) -> ConnectionGuard {
        self.parked.inc();
        ConnectionGuard {
            gauge: self.parked.clone(),
        }
    }

    /// Agent connections parked now.
    #[must_use]
    pub fn parked(&self) -> i64 {
        self.parked.get()
    }

    /// Counts an open agent connection until the guard drops.
    #[must_use]
    pub fn track_connection(&self) -> ConnectionGuard {
        self.active.inc();
        ConnectionGuard {
            gauge: self.active.clone(),
        }
    }

    pub fn connection_decided(&self, decision: DecisionLabel) {
        self.connections
            .get_or_create(&DecisionLabels { decision })
            .inc();
    }

    pub fn rejected(&self, reason: Rejection) {
        self.rejections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn handshake_failed(&self, leg: Leg) {
        self.handshake_failures
            .get_or_create(&LegLabels { leg })
            .inc();
    }

    /// The leaf-cache counters, to hand to the TLS layer.
    #[must_use]
    pub fn leaf_cache(&self) -> LeafCacheMetrics {
        self.leaf_cache.clone()
    }

    pub fn observe_upstream_latency(&self, latency: Duration) {
        self.upstream_latency.observe(latency.as_secs_f64());
    }

    pub fn substituted(&self) {
        self.substitutions.inc();
    }

    pub fn grant_reused(&self) {
        self.grant_reuses.inc();
    }

    pub fn scrubbed(&self, location: ScrubLocation, n: u64) {
        self.scrubbed
            .get_or_create(&ScrubLabels { location })
            .inc_by(n);
    }

    /// Current value of a scrub counter.
    #[must_use]
    pub fn scrubbed_count(&self, location: ScrubLocation) -> u64 {
        self.scrubbed.get_or_create(&ScrubLabels { location }).get()
    }

    pub fn add_bytes(&self, direction: Direction, n: u64) {
        self.bytes
            .get_or_create(&DirectionLabels { direction })
            .inc_by(n);
    }

    /// The counter of bytes relayed in `direction`, for a hot path to keep (one lookup).
    #[must_use]
    pub fn byte_counter(&self, direction: Direction) -> Counter {
        self.bytes
            .get_or_create(&DirectionLabels { direction })
            .clone()
    }

    /// Bytes relayed so far in `direction`.
    #[must_use]
    pub fn bytes(&self, direction: Direction) -> u64 {
        self.bytes
            .get_or_create(&DirectionLabels { direction })
            .get()
    }

    pub fn audit_write_failed(&self, kind: AuditKind) {
        self.audit_failures
            .get_or_create(&AuditLabels { kind })
            .inc();
    }

    pub fn set_audit_disabled(&self, disabled: bool) {
        self.audit_disabled.set(i64::from(disabled));
    }

    pub fn dns_query(&self, outcome: DnsOutcome) {
        self.dns_queries.get_or_create(&DnsLabels { outcome }).inc();
    }

    /// Current value of a DNS outcome counter.
    #[must_use]
    pub fn dns_queries(&self, outcome: DnsOutcome) -> u64 {
        self.dns_queries.get_or_create(&DnsLabels { outcome }).get()
    }

    /// Current value of a rejection counter (for tests and health reporting).
    #[must_use]
    pub fn rejections(&self, reason: Rejection) -> u64 {
        self.rejections
            .get_or_create(&ReasonLabels { reason })
            .get()
    }

    /// Current value of an audit-failure counter.
    #[must_use]
    pub fn audit_write_failures(&self, kind: AuditKind) -> u64 {
        self.audit_failures
            .get_or_create(&AuditLabels { kind })
            .get()
    }

    /// The Prometheus text exposition (`OpenMetrics` text format, `# EOF` terminated).
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing into a String cannot fail; an encoder bug must not take the admin
            // endpoint down, so serve what was produced and say so.
            tracing::error!(error = %e, "metrics encoding failed");
            out.push_str("# metrics encoding failed\n");
        }
        out
    }
}

/// Decrements its gauge (active connections, DNS questions in flight) when dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    gauge: Gauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_line(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    #[test]
    fn every_family_and_label_is_exposed_at_zero() {
        let m = ProxyMetrics::new();
        let text = m.encode();
        for family in [
            "# TYPE paddock_proxy_active_connections gauge",
            "# TYPE paddock_proxy_connections counter",
            "# TYPE paddock_proxy_rejections counter",
            "# TYPE paddock_proxy_handshake_failures counter",
            "# TYPE paddock_proxy_leaf_cache_hits counter",
            "# TYPE paddock_proxy_leaf_cache_misses counter",
            "# TYPE paddock_proxy_leaf_forges counter",
            "# TYPE paddock_proxy_upstream_latency_seconds histogram",
            "# TYPE paddock_proxy_substitutions counter",
            "# TYPE paddock_proxy_bytes counter",
            "# TYPE paddock_proxy_audit_write_failures counter",
            "# TYPE paddock_proxy_audit_disabled gauge",
            "# TYPE paddock_proxy_dns_queries counter",
            "# TYPE paddock_proxy_dns_in_flight gauge",
            "# TYPE paddock_proxy_grants_held gauge",
            "# TYPE paddock_proxy_build_info gauge",
        ] {
            assert!(has_line(&text, family), "missing {family:?} in\n{text}");
        }
        for r in Rejection::ALL {
            let line = format!("paddock_proxy_rejections_total{{reason=\"{r}\"}} 0");
            assert!(has_line(&text, &line), "missing {line:?} in\n{text}");
        }
        for (family, label, values) in [
            (
                "connections",
                "decision",
                &["allow", "deny", "discovery"][..],
            ),
            ("handshake_failures", "leg", &["agent", "upstream"][..]),
            (
                "bytes",
                "direction",
                &["agent_to_upstream", "upstream_to_agent"][..],
            ),
            (
                "audit_write_failures",
                "kind",
                &[
                    "allow",
                    "deny",
                    "discovery",
                    "connect_reason",
                    "dns_deny",
                    "dns_rate_limited",
                ][..],
            ),
            (
                "dns_queries",
                "outcome",
                &["answered", "denied", "rate_limited", "policy_unavailable"][..],
            ),
        ] {
            for v in values {
                let line = format!("paddock_proxy_{family}_total{{{label}=\"{v}\"}} 0");
                assert!(has_line(&text, &line), "missing {line:?} in\n{text}");
            }
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn updates_show_up() {
        let m = ProxyMetrics::new();
        let g1 = m.track_connection();
        let g2 = m.track_connection();
        drop(g1);
        m.connection_decided(DecisionLabel::Allow);
        m.rejected(Rejection::DnsRebindingMismatch);
        m.rejected(Rejection::DnsRebindingMismatch);
        m.handshake_failed(Leg::Upstream);
        let leaf = m.leaf_cache();
        leaf.misses.inc();
        leaf.forges.inc();
        leaf.hits.inc_by(3);
        m.observe_upstream_latency(Duration::from_millis(3));
        m.substituted();
        m.add_bytes(Direction::UpstreamToAgent, 1500);
        m.audit_write_failed(AuditKind::Allow);
        m.set_audit_disabled(true);
        m.dns_query(DnsOutcome::Denied);
        let q = m.track_dns_question();
        m.set_grants_held(4);
        let text = m.encode();
        for line in [
            "paddock_proxy_active_connections 1",
            "paddock_proxy_connections_total{decision=\"allow\"} 1",
            "paddock_proxy_rejections_total{reason=\"dns_rebinding_mismatch\"} 2",
            "paddock_proxy_rejections_total{reason=\"no_sni\"} 0",
            "paddock_proxy_handshake_failures_total{leg=\"upstream\"} 1",
            "paddock_proxy_leaf_cache_hits_total 3",
            "paddock_proxy_leaf_cache_misses_total 1",
            "paddock_proxy_leaf_forges_total 1",
            "paddock_proxy_upstream_latency_seconds_count 1",
            "paddock_proxy_upstream_latency_seconds_bucket{le=\"0.004\"} 1",
            "paddock_proxy_upstream_latency_seconds_bucket{le=\"0.002\"} 0",
            "paddock_proxy_substitutions_total 1",
            "paddock_proxy_bytes_total{direction=\"upstream_to_agent\"} 1500",
            "paddock_proxy_audit_write_failures_total{kind=\"allow\"} 1",
            "paddock_proxy_audit_disabled 1",
            "paddock_proxy_dns_queries_total{outcome=\"denied\"} 1",
            "paddock_proxy_dns_queries_total{outcome=\"answered\"} 0",
            "paddock_proxy_dns_in_flight 1",
            "paddock_proxy_grants_held 4",
            &format!(
                "paddock_proxy_build_info{{version=\"{}\",component=\"proxy\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(has_line(&text, line), "missing {line:?} in\n{text}");
        }
        assert_eq!(m.rejections(Rejection::DnsRebindingMismatch), 2);
        drop(g2);
        drop(q);
        let text = m.encode();
        assert!(has_line(&text, "paddock_proxy_active_connections 0"));
        assert!(has_line(&text, "paddock_proxy_dns_in_flight 0"));
    }
}
