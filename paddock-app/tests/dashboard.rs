//! `deploy/grafana/paddock-dashboard.json` may only name metrics the binaries export: a
//! renamed or removed metric would otherwise leave a panel silently empty.

use std::collections::BTreeSet;

/// Every series name the exposition can carry, from its `# TYPE` lines (families with
/// dynamic labels have no samples before their first use, so samples alone would miss them).
fn series_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(family), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        for s in suffixes {
            names.insert(format!("{family}{s}"));
        }
    }
    names
}

/// The `paddock_*` identifiers in a `PromQL` expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("paddock_") {
        let start = i + at;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_')
        };
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |n| start + n);
        if boundary {
            out.push(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

fn expressions(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => expressions(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| expressions(v, out)),
        _ => {}
    }
}

#[test]
fn every_metric_the_dashboard_names_is_exported() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/paddock-dashboard.json"
    );
    let text = std::fs::read_to_string(path).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    assert!(exprs.len() > 20, "the dashboard has its queries: {exprs:?}");

    let mut exported = series_names(&paddock_proxy::metrics::ProxyMetrics::new().encode());
    // Families labelled by route or failure kind have no `# TYPE` line before their first
    // sample: give each one.
    let broker = paddock_broker::metrics::Metrics::new();
    broker.observe_request("/v1/issue", 200, 0.001);
    broker.auth_failure("unauthenticated");
    exported.extend(series_names(&broker.render()));
    exported.extend(series_names(
        &paddock_broker::cluster::controller::admin::ControllerMetrics::new().render(),
    ));
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(
            !names.is_empty(),
            "a query without a Paddock metric: {expr}"
        );
        for name in names {
            assert!(
                exported.contains(&name),
                "{name} (in {expr}) is not exported; exported: {exported:?}"
            );
            used.insert(name);
        }
    }
    // The dashboard covers the security-relevant signals, not just traffic.
    for must in [
        "paddock_proxy_audit_write_failures_total",
        "paddock_proxy_scrubbed_total",
        "paddock_proxy_rejections_total",
        "paddock_broker_auth_failures_total",
        "paddock_broker_leases",
        "paddock_proxy_build_info",
        "paddock_broker_build_info",
        "paddock_controller_build_info",
    ] {
        assert!(used.contains(must), "no panel shows {must}");
    }
}

#[test]
fn the_name_check_itself_sees_a_wrong_name() {
    let exported = series_names("# TYPE paddock_x counter\n# TYPE paddock_h histogram\n");
    assert!(exported.contains("paddock_x_total"));
    assert!(exported.contains("paddock_h_bucket"));
    assert!(!exported.contains("paddock_x"));
    assert_eq!(
        metric_names("sum(rate(paddock_x_total[5m])) / my_paddock_y + paddock_h_count"),
        ["paddock_x_total", "paddock_h_count"]
    );
}
