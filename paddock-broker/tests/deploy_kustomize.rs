//! The kustomizations under `deploy/` and the cluster pieces no other deploy test covers:
//!
//! - every `kustomization.yaml` lists resources and patches that exist (files of Kubernetes
//!   objects, or directories with a kustomization), each once, and every manifest under
//!   `deploy/` is listed by at least one of them; `deploy/README.md` names each kustomization;
//! - the root kustomization lists exactly the generated CRDs (`crd::all()`), first;
//! - the cluster audit sink's RBAC (`broker/35-audit-rbac.yaml`) grants the broker only
//!   `create` on `auditevents` and `list` on `harnessruns`, per namespace, in every agent
//!   namespace the controller is bound in and in the sink's default namespace, and the
//!   `audit.kubernetes` block `deploy/README.md` shows parses with the broker's config type;
//! - the example run (`examples/`) is a `HarnessRun` and a `BrokerPolicy` the broker's own
//!   types and cluster-mode checks accept, and the run asks only for what the policy grants.
//!
//! `kubectl kustomize` is not run here (no kubectl in CI); these checks are what the
//! manifests get besides a manual render.
#![cfg(feature = "kube")]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use paddock_broker::{
    cluster::{
        crd::{self, BrokerPolicy, HarnessRun},
        reflector::{self, ClusterPolicyOptions},
    },
    config::Config,
};
use serde::Deserialize;
use serde_yaml_ng::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .join("deploy")
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| {
            Value::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let path = e.expect("entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Normalises `a/b/../c` (kustomize resolves `..` lexically).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Keys a kustomization here may use: a new one means this test must learn what it lists.
const KUSTOMIZATION_KEYS: [&str; 5] = ["apiVersion", "kind", "resources", "patches", "namespace"];

#[test]
fn every_kustomization_lists_what_exists_and_every_manifest_is_listed() {
    let root = deploy();
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    let (kustomizations, manifests): (Vec<PathBuf>, Vec<PathBuf>) = files
        .into_iter()
        .partition(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"));
    assert!(kustomizations.len() >= 4, "{kustomizations:?}");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("deploy/README.md");
    let mut listed = BTreeSet::new();
    for k in &kustomizations {
        let rel = k.strip_prefix(&root).expect("under deploy/");
        let docs = documents(k);
        assert_eq!(docs.len(), 1, "{}", rel.display());
        let doc = &docs[0];
        assert_eq!(
            doc["kind"].as_str(),
            Some("Kustomization"),
            "{}",
            rel.display()
        );
        assert_eq!(
            doc["apiVersion"].as_str(),
            Some("kustomize.config.k8s.io/v1beta1"),
            "{}",
            rel.display()
        );
        for key in doc.as_mapping().expect("mapping").keys() {
            let key = key.as_str().expect("string key");
            assert!(
                KUSTOMIZATION_KEYS.contains(&key),
                "{}: key {key} is not checked here",
                rel.display()
            );
        }
        let dir = k.parent().expect("dir");
        if rel.parent() != Some(Path::new("")) {
            let shown = rel.parent().expect("dir").display().to_string();
            assert!(
                readme.contains(&shown),
                "deploy/README.md does not say how to apply {shown}"
            );
        }
        let mut entries: Vec<&str> = strs(&doc["resources"]);
        assert!(!entries.is_empty(), "{}: no resources", rel.display());
        let mut seen = BTreeSet::new();
        for r in &entries {
            assert!(seen.insert(*r), "{}: {r} listed twice", rel.display());
        }
        if let Some(patches) = doc["patches"].as_sequence() {
            for p in patches {
                entries.push(p["path"].as_str().expect("patches by path only"));
            }
        }
        for entry in entries {
            let target = lexical(&dir.join(entry));
            assert!(
                target.starts_with(&root),
                "{}: {entry} leaves deploy/",
                rel.display()
            );
            if target.is_dir() {
                assert!(
                    target.join("kustomization.yaml").is_file(),
                    "{}: directory {entry} has no kustomization",
                    rel.display()
                );
                continue;
            }
            assert!(
                target.is_file(),
                "{}: {entry} does not exist",
                rel.display()
            );
            for d in documents(&target) {
                for key in ["apiVersion", "kind"] {
                    assert!(
                        d[key].as_str().is_some(),
                        "{}: {entry} has a document without {key}",
                        rel.display()
                    );
                }
            }
            listed.insert(target);
        }
    }
    let unlisted: Vec<_> = manifests
        .iter()
        .filter(|m| !listed.contains(*m))
        .map(|m| {
            m.strip_prefix(&root)
                .expect("under deploy/")
                .display()
                .to_string()
        })
        .collect();
    assert!(
        unlisted.is_empty(),
        "manifests no kustomization lists: {unlisted:?}"
    );
}

#[test]
fn the_root_kustomization_installs_every_generated_crd_first() {
    let doc = &documents(&deploy().join("kustomization.yaml"))[0];
    let resources = strs(&doc["resources"]);
    let crds: Vec<String> = crd::all()
        .into_iter()
        .map(|(file, _)| format!("crds/{file}"))
        .collect();
    assert_eq!(
        resources[..crds.len()]
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>(),
        crds,
        "the CRDs, in crd::all() order, before anything else"
    );
    let on_disk: BTreeSet<String> = std::fs::read_dir(deploy().join("crds"))
        .expect("crds")
        .map(|e| format!("crds/{}", e.expect("entry").file_name().to_string_lossy()))
        .collect();
    assert_eq!(on_disk, crds.iter().cloned().collect::<BTreeSet<_>>());
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| {
            d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name)
        })
        .collect()
}

/// (group, resource, verb) triples a role grants.
fn grants(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        assert!(rule.get("resourceNames").is_none());
        for g in strs(&rule["apiGroups"]) {
            for r in strs(&rule["resources"]) {
                for v in strs(&rule["verbs"]) {
                    out.insert((g.to_owned(), r.to_owned(), v.to_owned()));
                }
            }
        }
    }
    out
}

/// The `audit.kubernetes` block of deploy/README.md, spliced into the deployed broker.yaml.
fn readme_audit_config() -> Config {
    let readme = std::fs::read_to_string(deploy().join("README.md")).expect("README");
    let start = readme
        .find("```yaml\n# audit.kubernetes")
        .expect("deploy/README.md shows the audit.kubernetes block");
    let block = &readme[start + "```yaml\n".len()..];
    let block = &block[..block.find("```").expect("end of block")];
    let cm = &documents(&deploy().join("broker/20-config.yaml"))[0];
    let broker_yaml = cm["data"]["broker.yaml"].as_str().expect("broker.yaml");
    // The block is the `audit:` section with `kubernetes:` added; replace the deployed one.
    let mut value: Value = serde_yaml_ng::from_str(broker_yaml).expect("broker.yaml");
    let audit: Value = serde_yaml_ng::from_str(block).expect("README block");
    value["audit"] = audit["audit"].clone();
    let text = serde_yaml_ng::to_string(&value).expect("yaml");
    Config::parse(Path::new("README block"), &text).expect("the README's audit block parses")
}

#[test]
fn the_audit_sink_gets_create_only_in_each_agent_namespace() {
    let docs = documents(&deploy().join("broker/35-audit-rbac.yaml"));
    let role = find(&docs, "ClusterRole", "paddock-broker-audit");
    assert_eq!(role.len(), 1);
    let want: BTreeSet<(String, String, String)> = [
        ("paddock.dev", "auditevents", "create"),
        ("paddock.dev", "harnessruns", "list"),
    ]
    .into_iter()
    .map(|(g, r, v)| (g.to_owned(), r.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(
        grants(role[0]),
        want,
        "exactly these, nothing to alter a record with"
    );
    // Bound per namespace only, never cluster-wide.
    assert!(
        docs.iter()
            .all(|d| d["kind"].as_str() != Some("ClusterRoleBinding")),
        "no ClusterRoleBinding"
    );
    let bound: BTreeSet<&str> = docs
        .iter()
        .filter(|d| {
            d["kind"].as_str() == Some("RoleBinding")
                && d["roleRef"]["name"].as_str() == Some("paddock-broker-audit")
        })
        .map(|d| {
            let subjects = d["subjects"].as_sequence().expect("subjects");
            assert_eq!(subjects.len(), 1);
            assert_eq!(subjects[0]["name"].as_str(), Some("paddock-broker"));
            assert_eq!(subjects[0]["namespace"].as_str(), Some("paddock-system"));
            d["metadata"]["namespace"].as_str().expect("namespace")
        })
        .collect();
    // Wherever the controller runs agents, the broker may record their events.
    let controller = documents(&deploy().join("controller/10-rbac.yaml"));
    let agent_namespaces: BTreeSet<&str> = controller
        .iter()
        .filter(|d| {
            d["kind"].as_str() == Some("RoleBinding")
                && d["roleRef"]["name"].as_str() == Some("paddock-controller-agents")
        })
        .map(|d| d["metadata"]["namespace"].as_str().expect("namespace"))
        .collect();
    assert!(!agent_namespaces.is_empty());
    for ns in &agent_namespaces {
        assert!(
            bound.contains(ns),
            "no paddock-broker-audit binding in {ns}"
        );
    }
    // And in the sink's default namespace, as the README configures it.
    let config = readme_audit_config();
    let k = config.audit.kubernetes.as_ref().expect("audit.kubernetes");
    k.checked_timeout().expect("valid settings");
    assert!(
        bound.contains(k.default_namespace.as_str()),
        "{}",
        k.default_namespace
    );
    // The deployed broker.yaml leaves the sink off (it has never met an API server).
    let cm = &documents(&deploy().join("broker/20-config.yaml"))[0];
    let deployed = Config::parse(
        Path::new("20-config.yaml"),
        cm["data"]["broker.yaml"].as_str().expect("yaml"),
    )
    .expect("broker.yaml");
    assert!(deployed.audit.kubernetes.is_none());
    assert_eq!(
        deployed.audit.path, config.audit.path,
        "the README block keeps the file sink"
    );
    // Readers are a separate role, read-only.
    let reader = find(&docs, "ClusterRole", "paddock-audit-reader");
    assert!(grants(reader[0]).iter().all(|(g, r, v)| g == "paddock.dev"
        && r == "auditevents"
        && ["get", "list", "watch"].contains(&v.as_str())));
}

#[test]
fn the_example_run_and_policy_are_accepted_and_agree() {
    let policy_doc = &documents(&deploy().join("examples/brokerpolicy.yaml"))[0];
    // Through JSON, as the API server hands objects to the broker and the controller.
    let json = |v: &Value| serde_json::to_value(v).expect("YAML as JSON");
    let policy: BrokerPolicy =
        serde_json::from_value(json(policy_doc)).expect("a BrokerPolicy object");
    let run_doc = &documents(&deploy().join("examples/harnessrun.yaml"))[0];
    let run: HarnessRun = serde_json::from_value(json(run_doc)).expect("a HarnessRun object");
    let ns = run.metadata.namespace.as_deref().expect("run namespace");
    assert_eq!(policy.metadata.namespace.as_deref(), Some(ns));
    // The broker's cluster-mode checks (namespace confinement, relative secrets) pass.
    let options = ClusterPolicyOptions {
        admin_namespace: "paddock-system".into(),
        secrets_dir: PathBuf::from("/etc/paddock/secrets"),
    };
    let (_, problems) = reflector::build(
        std::slice::from_ref(&policy),
        &options,
        time::OffsetDateTime::now_utc(),
    );
    assert!(problems.is_empty(), "{problems:?}");
    // The policy applies to the run, and grants every credential it asks for.
    assert!(policy.spec.applies_to.namespaces.iter().any(|n| n == ns));
    assert!(
        policy.spec.applies_to.templates.is_empty()
            || policy
                .spec
                .applies_to
                .templates
                .contains(&run.spec.template)
    );
    let granted: BTreeMap<&str, _> = policy
        .spec
        .credentials
        .iter()
        .map(|c| (c.name.as_str(), c))
        .collect();
    assert!(!run.spec.credentials.is_empty());
    for c in &run.spec.credentials {
        assert!(
            granted.contains_key(c.name.as_str()),
            "{} not granted",
            c.name
        );
    }
    // The agent's containers would pass the restricted Pod Security Standard.
    let pod = run.spec.pod_template.spec.as_ref().expect("pod spec");
    let psc = pod.security_context.as_ref().expect("pod securityContext");
    assert_eq!(psc.run_as_non_root, Some(true));
    for c in &pod.containers {
        let sc = c
            .security_context
            .as_ref()
            .expect("container securityContext");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        let drop = sc
            .capabilities
            .as_ref()
            .and_then(|c| c.drop.clone())
            .unwrap_or_default();
        assert_eq!(drop, ["ALL"], "{}", c.name);
    }
}
