//! The controller's manifests (`deploy/controller/`) agree with its code and with the
//! broker's: `controller.yaml` parses with the controller's strict config type, every path it
//! names is a volume mount of the Deployment, the broker token is minted for the broker's
//! audience, the broker gives the controller's account the scopes its calls need, the run label
//! is the node agents', and the RBAC grants what the reconcile does (and the leader election's
//! Lease). None of it has run on a cluster.
#![cfg(feature = "kube")]

use std::path::{Path, PathBuf};

use paddock_broker::{
    auth::Scope,
    cluster::controller::{config::ControllerConfig, reconcile::FINALIZER},
    config::Config,
};
use serde::Deserialize as _;
use serde_yaml_ng::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

fn docs(rel: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo_root().join(rel)).expect(rel);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("yaml"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(all: &'a [Value], kind: &str, name: &str) -> &'a Value {
    all.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("{kind} {name} missing"))
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Whether some rule of `role` grants `verb` on `group`/`resource`.
fn grants(role: &Value, group: &str, resource: &str, verb: &str) -> bool {
    role["rules"].as_sequence().is_some_and(|rules| {
        rules.iter().any(|r| {
            strs(&r["apiGroups"]).contains(&group)
                && strs(&r["resources"]).contains(&resource)
                && strs(&r["verbs"]).contains(&verb)
        })
    })
}

fn config() -> ControllerConfig {
    let all = docs("deploy/controller/20-config.yaml");
    let cm = find(&all, "ConfigMap", "paddock-controller-config");
    ControllerConfig::parse(
        cm["data"]["controller.yaml"]
            .as_str()
            .expect("controller.yaml"),
    )
    .expect("controller.yaml parses with the controller's config type")
}

#[test]
fn every_configured_path_is_mounted() {
    let c = config();
    let all = docs("deploy/controller/30-deployment.yaml");
    let dep = find(&all, "Deployment", "paddock-controller");
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "paddock-controller");
    let container = &pod["containers"][0];
    assert_eq!(
        strs(&container["args"]),
        [
            "controller",
            "--config",
            "/etc/paddock/config/controller.yaml"
        ]
    );
    let mounts: Vec<(String, String)> = container["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().expect("name").to_owned(),
                m["mountPath"].as_str().expect("path").to_owned(),
            )
        })
        .collect();
    let volume = |name: &str| -> &Value {
        pod["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("volume {name}"))
    };
    let mount_of = |p: &Path| -> (String, String) {
        mounts
            .iter()
            .find(|(_, dir)| p.parent() == Some(Path::new(dir)))
            .cloned()
            .unwrap_or_else(|| panic!("{} is not in a mounted directory", p.display()))
    };
    // The config itself.
    let (name, _) = mount_of(Path::new("/etc/paddock/config/controller.yaml"));
    assert_eq!(
        volume(&name)["configMap"]["name"],
        "paddock-controller-config"
    );
    // The broker token: a projected token for the broker's audience, at tokenFile.
    let (name, _) = mount_of(&c.broker.token_file);
    let src = &volume(&name)["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(src["audience"], "paddock-broker");
    assert_eq!(
        src["path"].as_str(),
        c.broker.token_file.file_name().and_then(|f| f.to_str())
    );
    // The broker's CA, from its TLS Secret.
    let ca = c.broker.ca_file.as_deref().expect("broker caFile");
    let (name, _) = mount_of(ca);
    assert_eq!(volume(&name)["secret"]["secretName"], "paddock-broker-tls");
    // The trust bundle.
    let (name, _) = mount_of(&c.trust.ca_file);
    assert!(volume(&name)["configMap"]["name"].as_str().is_some());
    assert!(
        c.broker
            .url
            .starts_with("https://paddock-broker.paddock-system.svc:8443"),
        "the broker's Service: {}",
        c.broker.url
    );
}

#[test]
fn the_broker_lets_the_controller_do_what_it_does() {
    let all = docs("deploy/broker/20-config.yaml");
    let cm = find(&all, "ConfigMap", "paddock-broker-config");
    let broker: Config = serde_yaml_ng::from_str(cm["data"]["broker.yaml"].as_str().expect("yaml"))
        .expect("broker.yaml");
    let tr = broker.auth.token_review.expect("tokenReview");
    let scopes = &tr.scopes["paddock-system/paddock-controller"];
    for s in [
        Scope::Controller,
        Scope::Issue,
        Scope::Revoke,
        Scope::LeasesRead,
    ] {
        assert!(scopes.contains(&s), "the controller needs {s:?}");
    }
    // The node agents select agent pods by the label the controller sets.
    let node =
        std::fs::read_to_string(repo_root().join("deploy/node/20-config.yaml")).expect("node");
    assert!(
        node.contains(&format!("run_label = \"{}\"", config().run_label)),
        "deploy/node's run_label differs from the controller's runLabel"
    );
}

#[test]
fn rbac_grants_what_the_reconcile_does() {
    let c = config();
    let all = docs("deploy/controller/10-rbac.yaml");
    let cluster = find(&all, "ClusterRole", "paddock-controller");
    for verb in ["get", "list", "watch", "patch"] {
        assert!(
            grants(cluster, "paddock.dev", "harnessruns", verb),
            "harnessruns {verb}"
        );
    }
    assert!(grants(
        cluster,
        "paddock.dev",
        "harnessruns/status",
        "patch"
    ));
    for verb in ["list", "watch"] {
        assert!(grants(cluster, "", "pods", verb), "pods {verb}");
    }
    // Secrets are never readable cluster-wide.
    assert!(!grants(cluster, "", "secrets", "get") && !grants(cluster, "", "secrets", "list"));
    let agents = find(&all, "ClusterRole", "paddock-controller-agents");
    for (res, verb) in [
        ("pods", "create"),
        ("pods", "delete"),
        ("secrets", "get"),
        ("secrets", "create"),
        ("secrets", "delete"),
    ] {
        assert!(grants(agents, "", res, verb), "{res} {verb}");
    }
    assert!(grants(agents, "events.k8s.io", "events", "create"));
    assert!(
        !grants(agents, "", "secrets", "list"),
        "no listing of a namespace's Secrets"
    );
    let lease = find(&all, "Role", "paddock-controller-lease");
    assert_eq!(
        lease["metadata"]["namespace"].as_str(),
        Some(c.leader_election.namespace.as_str())
    );
    assert!(grants(lease, "coordination.k8s.io", "leases", "create"));
    let named = lease["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .find(|r| strs(&r["resourceNames"]).contains(&c.leader_election.name.as_str()))
        .expect("a rule for the configured Lease");
    assert!(strs(&named["verbs"]).contains(&"get") && strs(&named["verbs"]).contains(&"update"));
    // Every binding binds the controller's account.
    for b in all
        .iter()
        .filter(|d| d["kind"].as_str().is_some_and(|k| k.ends_with("Binding")))
    {
        assert_eq!(b["subjects"][0]["name"], "paddock-controller");
        assert_eq!(b["subjects"][0]["namespace"], "paddock-system");
    }
    assert!(FINALIZER.starts_with("paddock.dev/"));
}
