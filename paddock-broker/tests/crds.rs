//! The CRD manifests under `deploy/crds/` are generated from the Rust types
//! (`paddock_broker::cluster::crd`): this test fails when a committed file differs from what
//! the types generate. `cargo xtask crds` (this test with `PADDOCK_WRITE_CRDS=1`) rewrites them.
#![cfg(feature = "kube")]

use std::path::{Path, PathBuf};

use paddock_broker::cluster::crd::{self, BrokerPolicy, HarnessRun};
use serde_json::Value;

fn crds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .join("deploy/crds")
}

const HEADER: &str =
    "# Generated from paddock-broker/src/cluster/crd by `cargo xtask crds`; do not edit.\n";

fn rendered(crd: &impl serde::Serialize) -> String {
    format!(
        "{HEADER}{}",
        serde_yaml_ng::to_string(crd).expect("a CRD serialises to YAML")
    )
}

#[test]
fn committed_crds_match_the_types() {
    let write = std::env::var_os("PADDOCK_WRITE_CRDS").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for (file, crd) in crd::all() {
        let path = crds_dir().join(file);
        let want = rendered(&crd);
        if write {
            std::fs::create_dir_all(crds_dir()).expect("create deploy/crds");
            std::fs::write(&path, &want).expect("write CRD");
            continue;
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have != want {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "generated CRDs differ from the committed ones ({}): run `cargo xtask crds` and commit",
        stale.join(", ")
    );
}

/// Walks a schema and collects the rules a structural schema (what the API server requires of
/// a `v1` CRD) breaks that a schema generator can produce: a node without a `type` (outside
/// the `x-kubernetes-*` escapes and `*Of` branches), and `additionalProperties` next to
/// `properties`.
fn structural_problems(at: &str, schema: &Value, in_branch: bool, out: &mut Vec<String>) {
    let Some(map) = schema.as_object() else {
        return;
    };
    let escapes = map.contains_key("x-kubernetes-preserve-unknown-fields")
        || map.contains_key("x-kubernetes-int-or-string");
    if !in_branch && !escapes && !map.contains_key("type") {
        out.push(format!("{at}: no type"));
    }
    if map.contains_key("properties") && map.contains_key("additionalProperties") {
        out.push(format!("{at}: properties and additionalProperties"));
    }
    if let Some(props) = map.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            structural_problems(&format!("{at}.{k}"), v, false, out);
        }
    }
    if let Some(items) = map.get("items") {
        structural_problems(&format!("{at}[]"), items, false, out);
    }
    if let Some(extra) = map.get("additionalProperties").filter(|v| v.is_object()) {
        structural_problems(&format!("{at}{{}}"), extra, false, out);
    }
    for key in ["oneOf", "anyOf", "allOf"] {
        if let Some(branches) = map.get(key).and_then(Value::as_array) {
            for (i, b) in branches.iter().enumerate() {
                if b.get("type").is_some() && map.contains_key("type") && b["type"] != map["type"] {
                    out.push(format!("{at}.{key}[{i}]: type differs from its parent's"));
                }
                structural_problems(&format!("{at}.{key}[{i}]"), b, true, out);
            }
        }
    }
}

#[test]
fn generated_schemas_are_structural() {
    for (file, crd) in crd::all() {
        let crd = serde_json::to_value(&crd).expect("json");
        let versions = crd["spec"]["versions"].as_array().expect("versions");
        assert_eq!(versions.len(), 1, "{file}");
        assert_eq!(versions[0]["name"], "v1");
        assert_eq!(crd["spec"]["group"], "paddock.dev");
        assert_eq!(crd["spec"]["scope"], "Namespaced", "{file}");
        let schema = &versions[0]["schema"]["openAPIV3Schema"];
        let mut problems = Vec::new();
        structural_problems("", schema, false, &mut problems);
        assert!(problems.is_empty(), "{file}: {problems:#?}");
    }
}

#[test]
fn the_policy_document_is_a_broker_policy_object() {
    // The example policy, as a Kubernetes object: the same document, plus a namespace.
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo-policy.yaml"),
    )
    .expect("example policy");
    let mut value: Value = serde_yaml_ng::from_str(&text).expect("yaml");
    value["metadata"]["namespace"] = "team".into();
    let object: BrokerPolicy = serde_json::from_value(value.clone()).expect("a BrokerPolicy");
    assert_eq!(object.spec.applies_to.namespaces, ["local"]);
    assert_eq!(object.spec.credentials.len(), 2);
    // Unknown fields are refused in objects as in files.
    value["spec"]["appliesTo"]["namespace"] = "typo".into();
    assert!(serde_json::from_value::<BrokerPolicy>(value).is_err());
}

#[test]
fn the_delivery_mode_schema_lists_what_serde_accepts() {
    let crd = serde_json::to_value(crd::all()[0].1.clone()).expect("json");
    let mode = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["credentials"]["items"]["properties"]["delivery"]["properties"]["mode"];
    let listed: Vec<String> = mode["enum"]
        .as_array()
        .expect("enum")
        .iter()
        .map(|v| v.as_str().expect("string").to_owned())
        .collect();
    for m in [
        paddock_broker::wire::DeliveryMode::ProxyInjected,
        paddock_broker::wire::DeliveryMode::InContainer,
    ] {
        let name = serde_json::to_value(m).expect("json");
        assert!(
            listed.iter().any(|l| name == *l),
            "{name} missing from {listed:?}"
        );
    }
    assert_eq!(listed.len(), 2);
}

#[test]
fn a_harness_run_reads_and_its_status_round_trips() {
    let run: HarnessRun = serde_json::from_value(serde_json::json!({
        "apiVersion": "paddock.dev/v1", "kind": "HarnessRun",
        "metadata": {"name": "fix-bug", "namespace": "team"},
        "spec": {
            "template": "claude-code",
            "credentials": [{"name": "api-token", "env": "API_TOKEN"}],
            "podTemplate": {"spec": {"containers": [{"name": "agent", "image": "agent:1"}]}},
        },
    }))
    .expect("a HarnessRun");
    assert_eq!(run.spec.credentials[0].env, "API_TOKEN");
    let status = crd::HarnessRunStatus {
        phase: Some("Running".into()),
        lease_count: 1,
        ..Default::default()
    };
    let json = serde_json::to_value(&status).expect("json");
    assert_eq!(json["leaseCount"], 1);
    assert_eq!(
        serde_json::from_value::<crd::HarnessRunStatus>(json).expect("status"),
        status
    );
}

#[test]
fn the_provider_schema_lists_every_kind() {
    let crd = serde_json::to_value(crd::all()[0].1.clone()).expect("json");
    let provider = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["credentials"]["items"]["properties"]["provider"];
    assert_eq!(
        provider["properties"]["kind"]["enum"],
        serde_json::json!(["user-secret", "anthropic-api-key", "pat-pool", "github-app"])
    );
    // Every field of every kind is allowed through (the broker's checks refuse misplaced ones).
    for field in [
        "inject",
        "allowedHeaders",
        "allowedQuery",
        "secrets",
        "appId",
        "installationId",
        "privateKey",
        "apiBaseUrl",
        "repositories",
        "caFile",
    ] {
        assert!(provider["properties"].get(field).is_some(), "{field}");
    }
}
