//! The Kubernetes manifests in `deploy/broker/` must agree with the broker's code and with each
//! other: the `broker.yaml` the Deployment is started with parses with the broker's own strict
//! config type and builds a serving broker once the files it names exist; the policy
//! `ConfigMap` holds documents the broker's policy parser accepts; the Deployment mounts a
//! volume of the right kind at every path `broker.yaml` names; the probes hit the admin
//! listener's routes; the Service and the `NetworkPolicy` point at the API port; the identities
//! and the TLS Secret named in one file exist in the others.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::{Component, Path, PathBuf},
};

use paddock_broker::{
    config::{self, Config},
    policy::{Policy, ProviderSpec},
    secrets::SecretSource,
    server,
};
use serde::Deserialize;
use serde_yaml_ng::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the kubelet mounts a pod's service-account token when automounting is on.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

/// One YAML document of a manifest file.
#[derive(Debug)]
struct Doc {
    file: PathBuf,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn namespace(&self) -> &str {
        self.value["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
    }
}

/// Every document of every `*.yaml` file directly in `dir`.
fn documents(dir: &Path) -> Vec<Doc> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        // How a directory is applied, not a Kubernetes object (deploy_kustomize.rs checks it).
        .filter(|p| p.file_name().is_none_or(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read manifest");
        for de in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(de)
                .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", file.display()));
            if value.is_null() {
                continue;
            }
            for key in ["apiVersion", "kind"] {
                assert!(
                    value[key].as_str().is_some(),
                    "{}: a document without {key}",
                    file.display()
                );
            }
            assert!(
                value["metadata"]["name"].as_str().is_some(),
                "{}: a {} without metadata.name",
                file.display(),
                value["kind"].as_str().unwrap_or_default()
            );
            docs.push(Doc {
                file: file.clone(),
                value,
            });
        }
    }
    docs
}

fn text<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

fn seq<'a>(v: &'a Value, what: &str) -> &'a [Value] {
    v.as_sequence().map_or_else(
        || panic!("{what}: expected a list, got {v:?}"),
        Vec::as_slice,
    )
}

/// Every `key: value` of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector.as_mapping().is_some_and(|m| {
        !m.is_empty() && m.iter().all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    })
}

/// Where a mounted path comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    ConfigMap(String),
    Secret(String),
    Claim(String),
    EmptyDir,
    /// The automounted service-account token, CA and namespace.
    ServiceAccount,
}

#[derive(Clone, Debug)]
struct Mount {
    path: PathBuf,
    read_only: bool,
    source: Source,
}

/// The manifests of `deploy/broker/` and the broker's own view of them.
struct Deployment {
    docs: Vec<Doc>,
    cert_manager: Vec<Doc>,
    /// `spec.template.spec` of the Deployment.
    pod: Value,
    pod_labels: Value,
    container: Value,
    mounts: Vec<Mount>,
    config: Config,
}

impl Deployment {
    fn load() -> Self {
        let dir = repo_root().join("deploy/broker");
        let docs = documents(&dir);
        let cert_manager = documents(&dir.join("cert-manager"));
        let deployments: Vec<&Doc> = docs.iter().filter(|d| d.kind() == "Deployment").collect();
        assert_eq!(deployments.len(), 1, "one broker Deployment");
        let deployment = &deployments[0].value;
        let pod = deployment["spec"]["template"]["spec"].clone();
        let pod_labels = deployment["spec"]["template"]["metadata"]["labels"].clone();
        let containers = seq(&pod["containers"], "containers");
        assert_eq!(containers.len(), 1, "one container in the broker pod");
        let container = containers[0].clone();
        let mounts = mounts(&pod, &container);

        let args: Vec<&str> = seq(&container["args"], "args")
            .iter()
            .map(|a| text(a, "args"))
            .collect();
        assert_eq!(args.first(), Some(&"serve"), "the container runs `serve`");
        let config_path = PathBuf::from(
            args.iter()
                .position(|a| *a == "--config")
                .and_then(|i| args.get(i + 1))
                .expect("serve --config PATH"),
        );
        let yaml = config_map_text(&docs, &mounts, &config_path);
        let config = Config::parse(&config_path, &yaml)
            .unwrap_or_else(|e| panic!("broker.yaml in the ConfigMap: {e}"));
        Self {
            docs,
            cert_manager,
            pod,
            pod_labels,
            container,
            mounts,
            config,
        }
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Doc> {
        self.docs
            .iter()
            .find(|d| d.kind() == kind && d.name() == name)
    }

    fn all<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Doc> {
        self.docs.iter().filter(move |d| d.kind() == kind)
    }

    fn namespace(&self) -> String {
        let ns = self
            .all("Deployment")
            .next()
            .expect("deployment")
            .namespace();
        assert!(!ns.is_empty(), "the Deployment names its namespace");
        ns.to_owned()
    }

    fn mount_of(&self, path: &Path, what: &str) -> &Mount {
        mount_of(&self.mounts, path, what)
    }

    fn named_port(&self, port: &Value, what: &str) -> u16 {
        if let Some(n) = port.as_u64() {
            return u16::try_from(n).expect("port fits u16");
        }
        let name = text(port, what);
        seq(&self.container["ports"], "container ports")
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("{what}: the container has no port named {name}"))
    }

    fn container_ports(&self) -> BTreeSet<u16> {
        seq(&self.container["ports"], "container ports")
            .iter()
            .map(|p| self.named_port(&p["containerPort"], "containerPort"))
            .collect()
    }

    fn admin_listen(&self) -> SocketAddr {
        self.config
            .admin_listen
            .expect("adminListen is set (the probes need it)")
    }

    /// The policy `ConfigMap`'s policy files, keyed by their path in the pod.
    fn policy_files(&self) -> Vec<(PathBuf, String)> {
        let path = self
            .config
            .policy
            .clone()
            .expect("deploy/broker runs in file mode");
        let mount = self.mount_of(&path, "policy");
        let Source::ConfigMap(name) = &mount.source else {
            panic!("policy is not on a ConfigMap volume: {:?}", mount.source);
        };
        assert_eq!(
            mount.path, path,
            "policy names the ConfigMap's mount point (a directory of *.yaml files)"
        );
        let cm = self
            .find("ConfigMap", name)
            .unwrap_or_else(|| panic!("ConfigMap {name} is not in deploy/broker"));
        let data = cm.value["data"]
            .as_mapping()
            .unwrap_or_else(|| panic!("ConfigMap {name} has no data"));
        let files: Vec<(PathBuf, String)> = data
            .iter()
            .map(|(k, v)| {
                let key = text(k, "policy key");
                (mount.path.join(key), text(v, key).to_owned())
            })
            .filter(|(p, _)| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        assert!(!files.is_empty(), "ConfigMap {name} holds no *.yaml policy");
        files
    }

    fn policy(&self) -> Policy {
        let mut docs = Vec::new();
        for (path, text) in self.policy_files() {
            docs.extend(
                Policy::parse_text(&path, &text, time::OffsetDateTime::now_utc())
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        }
        Policy::from_docs(docs).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// The mount a path lives on (the deepest mount point above it).
fn mount_of<'a>(mounts: &'a [Mount], path: &Path, what: &str) -> &'a Mount {
    assert!(
        path.is_absolute(),
        "{what}: {} is not absolute",
        path.display()
    );
    assert!(
        !path.components().any(|c| c == Component::ParentDir),
        "{what}: {} has `..`",
        path.display()
    );
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.path))
        .max_by_key(|m| m.path.components().count())
        .unwrap_or_else(|| {
            panic!(
                "{what}: nothing is mounted at or above {} (the root file system is read-only)",
                path.display()
            )
        })
}

/// A file served from a `ConfigMap` volume: the `ConfigMap` must exist and hold the key.
fn config_map_text(docs: &[Doc], mounts: &[Mount], path: &Path) -> String {
    let mount = mount_of(mounts, path, "config file");
    let Source::ConfigMap(name) = &mount.source else {
        panic!("{} is not on a ConfigMap volume", path.display());
    };
    let key = path
        .strip_prefix(&mount.path)
        .expect("under the mount")
        .to_str()
        .expect("UTF-8 key");
    let cm = docs
        .iter()
        .find(|d| d.kind() == "ConfigMap" && d.name() == name)
        .unwrap_or_else(|| panic!("ConfigMap {name} is not in deploy/broker"));
    text(
        &cm.value["data"][key],
        &format!("ConfigMap {name} key {key}"),
    )
    .to_owned()
}

fn mounts(pod: &Value, container: &Value) -> Vec<Mount> {
    let volumes = seq(&pod["volumes"], "volumes");
    let mut out: Vec<Mount> = seq(&container["volumeMounts"], "volumeMounts")
        .iter()
        .map(|m| {
            assert!(
                m.get("subPath").is_none(),
                "subPath mounts are not writable by the pod's user; mount whole volumes"
            );
            let name = text(&m["name"], "volumeMount name");
            let volume = volumes
                .iter()
                .find(|v| v["name"].as_str() == Some(name))
                .unwrap_or_else(|| panic!("volumeMount {name} has no volume"));
            let source = if let Some(cm) = volume.get("configMap") {
                Source::ConfigMap(text(&cm["name"], "configMap name").to_owned())
            } else if let Some(s) = volume.get("secret") {
                Source::Secret(text(&s["secretName"], "secretName").to_owned())
            } else if let Some(c) = volume.get("persistentVolumeClaim") {
                Source::Claim(text(&c["claimName"], "claimName").to_owned())
            } else if volume.get("emptyDir").is_some() {
                Source::EmptyDir
            } else {
                panic!("volume {name}: a kind this test does not know")
            };
            Mount {
                path: PathBuf::from(text(&m["mountPath"], "mountPath")),
                read_only: m["readOnly"].as_bool().unwrap_or(false),
                source,
            }
        })
        .collect();
    let mut seen = BTreeSet::new();
    for m in &out {
        assert!(
            seen.insert(m.path.clone()),
            "{} mounted twice",
            m.path.display()
        );
    }
    if pod["automountServiceAccountToken"].as_bool() == Some(true) {
        out.push(Mount {
            path: PathBuf::from(SERVICE_ACCOUNT_DIR),
            read_only: true,
            source: Source::ServiceAccount,
        });
    }
    out
}

#[test]
fn broker_yaml_parses_and_validates() {
    let d = Deployment::load();
    let c = &d.config;
    c.auth.resolved_order().expect("auth backends");
    let poll = c.policy_poll().expect("policyPollSeconds");
    assert!(
        poll.is_some_and(|p| p <= std::time::Duration::from_millis(500)),
        "policy changes must reach requests within a second (poll + proxy re-check): {poll:?}"
    );
    let admin = d.admin_listen();
    assert!(
        admin.ip().is_unspecified() && c.listen.ip().is_unspecified(),
        "listen and adminListen must bind the pod IP (kubelet probes and the Service come \
         from outside the pod's loopback)"
    );
    assert_ne!(admin.port(), c.listen.port(), "API and admin share a port");
    assert_eq!(
        d.container_ports(),
        BTreeSet::from([c.listen.port(), admin.port()]),
        "containerPorts must be exactly the listen and adminListen ports"
    );
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one walk over every path broker.yaml names, each against its mount"
)]
fn every_path_in_broker_yaml_is_mounted() {
    let d = Deployment::load();
    let c = &d.config;

    for (what, file) in [("tls.cert", &c.tls.cert), ("tls.key", &c.tls.key)]
        .into_iter()
        .chain(c.tls.client_ca.as_ref().map(|p| ("tls.clientCa", p)))
    {
        let m = d.mount_of(file, what);
        assert!(
            matches!(m.source, Source::Secret(_)) && m.read_only,
            "{what}: {} must come from a read-only Secret mount, not {:?}",
            file.display(),
            m.source
        );
        let key = file.strip_prefix(&m.path).expect("under the mount");
        assert!(
            ["tls.crt", "tls.key", "ca.crt"].contains(&key.to_str().unwrap_or_default()),
            "{what}: {} is not a key of a kubernetes.io/tls Secret",
            key.display()
        );
    }

    let policy = d.mount_of(c.policy.as_ref().expect("file mode"), "policy");
    assert!(matches!(policy.source, Source::ConfigMap(_)) && policy.read_only);

    // The cluster root that signs node agents' intermediates: a read-only Secret, mounted in
    // the broker only.
    let node_ca = c.node_ca.as_ref().expect("nodeCa is set");
    for (what, file) in [
        ("nodeCa.certFile", &node_ca.cert_file),
        ("nodeCa.keyFile", &node_ca.key_file),
    ] {
        let m = d.mount_of(file, what);
        assert!(
            matches!(&m.source, Source::Secret(name) if name == "paddock-node-ca-root")
                && m.read_only,
            "{what}: {} must come from the read-only Secret paddock-node-ca-root, not {:?}",
            file.display(),
            m.source
        );
    }

    let secrets_dir = c.secrets_dir.as_ref().expect("secretsDir is set");
    let m = d.mount_of(secrets_dir, "secretsDir");
    assert!(
        matches!(m.source, Source::Secret(_)) && m.read_only && &m.path == secrets_dir,
        "secretsDir must be the mount point of a read-only Secret volume: {m:?}"
    );

    // What the broker writes: each file directly in the root of a writable claim (the
    // broker creates no directories, and the root file system is read-only).
    let mut claims = Vec::new();
    let db = c.database.as_ref().expect("database: (SQLite)");
    for (what, file) in [("database", db), ("audit.path", &c.audit.path)]
        .into_iter()
        .chain(
            c.auth
                .rsa_session
                .as_ref()
                .map(|r| ("auth.rsaSession.keyFile", &r.key_file)),
        )
    {
        let m = d.mount_of(file, what);
        let Source::Claim(claim) = &m.source else {
            panic!(
                "{what}: {} must be on a PersistentVolumeClaim, not {:?}",
                file.display(),
                m.source
            );
        };
        assert!(
            !m.read_only,
            "{what}: {} is mounted read-only",
            m.path.display()
        );
        assert_eq!(
            file.parent(),
            Some(m.path.as_path()),
            "{what}: {} must sit directly in the mount {} (the broker creates no directories)",
            file.display(),
            m.path.display()
        );
        assert!(
            d.find("PersistentVolumeClaim", claim).is_some(),
            "{what}: PersistentVolumeClaim {claim} is not in deploy/broker"
        );
        claims.push(claim.clone());
    }
    assert_ne!(
        claims[0], claims[1],
        "the audit log shares the database's claim (a full log must not stop the database)"
    );

    if let Some(keys) = &c.auth.static_keys {
        let m = d.mount_of(&keys.file, "auth.staticKeys.file");
        assert!(matches!(m.source, Source::Secret(_)) && m.read_only);
    }
    if let Some(tr) = &c.auth.token_review {
        for (what, file) in [
            ("tokenFile", Some(&tr.token_file)),
            ("caFile", tr.ca_file.as_ref()),
        ] {
            let file = file.unwrap_or_else(|| panic!("auth.tokenReview.{what} is set"));
            let m = d.mount_of(file, what);
            assert_eq!(
                m.source,
                Source::ServiceAccount,
                "auth.tokenReview.{what}: {} is not the pod's automounted service account \
                 (set automountServiceAccountToken: true on the pod)",
                file.display()
            );
        }
    }
    for jwt in &c.auth.jwt {
        if let Some(ca) = &jwt.ca_file {
            d.mount_of(ca, "auth.jwt.caFile");
        }
    }
    for m in &d.mounts {
        if matches!(m.source, Source::ConfigMap(_) | Source::Secret(_)) {
            assert!(m.read_only, "{} must be mounted readOnly", m.path.display());
        }
    }
}

#[test]
fn probes_hit_the_admin_listener() {
    let d = Deployment::load();
    let admin = d.admin_listen().port();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &d.container[probe]["httpGet"];
        assert!(!get.is_null(), "{probe} is an httpGet probe");
        assert_eq!(
            d.named_port(&get["port"], probe),
            admin,
            "{probe} must hit adminListen's port"
        );
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
        assert!(
            get["scheme"].as_str().is_none_or(|s| s == "HTTP"),
            "the admin listener is plain HTTP"
        );
    }
}

#[test]
fn service_targets_the_api_port() {
    let d = Deployment::load();
    let services: Vec<&Doc> = d.all("Service").collect();
    assert_eq!(services.len(), 1, "one Service");
    let svc = &services[0].value;
    assert!(
        selects(&svc["spec"]["selector"], &d.pod_labels),
        "the Service's selector does not match the broker pod's labels"
    );
    let ports = seq(&svc["spec"]["ports"], "Service ports");
    let targets: Vec<u16> = ports
        .iter()
        .map(|p| d.named_port(p.get("targetPort").unwrap_or(&p["port"]), "targetPort"))
        .collect();
    assert_eq!(
        targets,
        vec![d.config.listen.port()],
        "the Service must forward to the listen port, and only to it (not the plain-HTTP \
         admin port)"
    );
    assert_eq!(
        ports[0]["port"].as_u64(),
        Some(u64::from(d.config.listen.port())),
        "Service port and listen port differ: proxies' broker URLs name one port"
    );
}

#[test]
fn network_policy_admits_the_api_port_from_paddock_system_only() {
    let d = Deployment::load();
    let ns = d.namespace();
    let policies: Vec<&Doc> = d.all("NetworkPolicy").collect();
    assert_eq!(policies.len(), 1, "one NetworkPolicy");
    let np = &policies[0].value["spec"];
    assert!(
        selects(&np["podSelector"]["matchLabels"], &d.pod_labels),
        "the NetworkPolicy does not select the broker pod"
    );
    assert!(
        seq(&np["policyTypes"], "policyTypes")
            .iter()
            .any(|t| t.as_str() == Some("Ingress")),
        "policyTypes includes Ingress"
    );
    let rules = seq(&np["ingress"], "ingress");
    assert!(!rules.is_empty(), "an ingress rule");
    let mut selectors = Vec::new();
    for rule in rules {
        let ports: Vec<u16> = seq(&rule["ports"], "ingress ports (all ports if absent)")
            .iter()
            .map(|p| d.named_port(&p["port"], "NetworkPolicy port"))
            .collect();
        assert_eq!(
            ports,
            vec![d.config.listen.port()],
            "ingress must admit the API port only (the admin port is plain HTTP)"
        );
        for peer in seq(&rule["from"], "from (everyone if absent)") {
            selectors.push(peer["namespaceSelector"]["matchLabels"].clone());
        }
    }
    let admits = |labels: &Value| selectors.iter().any(|s| selects(s, labels));
    let mut own = serde_yaml_ng::Mapping::new();
    own.insert("kubernetes.io/metadata.name".into(), ns.clone().into());
    assert!(
        admits(&Value::Mapping(own)),
        "the broker's own namespace {ns} is not admitted"
    );
    // Agent namespaces (those a policy serves) hold untrusted pods: they must not reach the
    // broker directly, whatever their labels.
    let policy = d.policy();
    let namespaces: BTreeSet<String> = policy
        .documents()
        .iter()
        .flat_map(|p| p.doc().spec.applies_to.namespaces.iter().cloned())
        .filter(|n| n.as_str() != ns.as_str())
        .collect();
    assert!(
        !namespaces.is_empty(),
        "the example policy serves a namespace"
    );
    for name in namespaces {
        let mut labels = d
            .find("Namespace", &name)
            .and_then(|doc| doc.value["metadata"]["labels"].as_mapping().cloned())
            .unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name".into(), name.clone().into());
        assert!(
            !admits(&Value::Mapping(labels)),
            "agent namespace {name} can reach the broker directly"
        );
    }
    assert!(
        !selectors
            .iter()
            .any(|s| s.is_null() || s.as_mapping().is_some_and(serde_yaml_ng::Mapping::is_empty)),
        "an empty namespaceSelector admits every namespace"
    );
}

#[test]
fn deployment_is_single_replica_and_locked_down() {
    let d = Deployment::load();
    let deployment = &d.all("Deployment").next().expect("deployment").value;
    assert_eq!(
        deployment["spec"]["replicas"].as_u64(),
        Some(1),
        "one broker: SQLite has one writer"
    );
    assert_eq!(
        deployment["spec"]["strategy"]["type"].as_str(),
        Some("Recreate"),
        "a rolling update would run two brokers on one database"
    );
    assert!(
        selects(
            &deployment["spec"]["selector"]["matchLabels"],
            &d.pod_labels
        ),
        "the Deployment's selector does not match its pods"
    );
    let pod_sc = &d.pod["securityContext"];
    assert_eq!(pod_sc["runAsNonRoot"].as_bool(), Some(true));
    assert!(pod_sc["runAsUser"].as_u64().is_some_and(|u| u > 0));
    assert_eq!(
        pod_sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let sc = &d.container["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert!(
        seq(&sc["capabilities"]["drop"], "capabilities.drop")
            .iter()
            .any(|c| c.as_str() == Some("ALL"))
            && sc["capabilities"].get("add").is_none(),
        "drop ALL capabilities, add none"
    );
    assert!(
        d.pod.get("hostNetwork").is_none() && sc.get("privileged").is_none(),
        "the broker needs no host access"
    );
    for what in ["requests", "limits"] {
        assert!(
            !d.container["resources"][what]["memory"].is_null(),
            "resources.{what}.memory"
        );
    }
    // The binary path the Deployment runs is where deploy/Dockerfile installs it.
    let command = seq(&d.container["command"], "command");
    let binary = text(&command[0], "command");
    let dockerfile =
        std::fs::read_to_string(repo_root().join("deploy/Dockerfile")).expect("deploy/Dockerfile");
    assert!(
        dockerfile.contains(binary),
        "deploy/Dockerfile does not install {binary}"
    );
    assert!(
        text(&d.container["image"], "image").starts_with("ghcr.io/paddock/paddock-broker:"),
        "image"
    );
}

#[test]
fn token_review_is_wired_to_accounts_that_exist() {
    let d = Deployment::load();
    let ns = d.namespace();
    let tr = d
        .config
        .auth
        .token_review
        .as_ref()
        .expect("auth.tokenReview");
    assert_eq!(tr.api_server, "https://kubernetes.default.svc");
    assert!(
        tr.audiences.iter().any(|a| a == "paddock-broker"),
        "proxies' tokens are minted for the audience paddock-broker"
    );
    tr.scopes
        .values()
        .for_each(|s| assert!(!s.is_empty(), "an account with no scope"));

    // The broker's account may create TokenReviews, and nothing more is needed.
    let sa = text(&d.pod["serviceAccountName"], "serviceAccountName");
    assert!(
        d.all("ServiceAccount")
            .any(|s| s.name() == sa && s.namespace() == ns),
        "ServiceAccount {ns}/{sa} is not in deploy/broker"
    );
    let may_review = d.all("ClusterRoleBinding").any(|b| {
        let binds_sa = seq(&b.value["subjects"], "subjects").iter().any(|s| {
            s["kind"].as_str() == Some("ServiceAccount")
                && s["name"].as_str() == Some(sa)
                && s["namespace"].as_str() == Some(ns.as_str())
        });
        let role = text(&b.value["roleRef"]["name"], "roleRef.name");
        binds_sa
            && b.value["roleRef"]["kind"].as_str() == Some("ClusterRole")
            && d.find("ClusterRole", role).is_some_and(|r| {
                seq(&r.value["rules"], "rules").iter().any(|rule| {
                    let has = |key: &str, want: &str| {
                        seq(&rule[key], key)
                            .iter()
                            .any(|v| v.as_str() == Some(want))
                    };
                    has("apiGroups", "authentication.k8s.io")
                        && has("resources", "tokenreviews")
                        && has("verbs", "create")
                })
            })
    });
    assert!(
        may_review,
        "no ClusterRoleBinding lets {ns}/{sa} create tokenreviews"
    );

    // Every account given scopes exists in the manifests (a typo would leave a caller with
    // no scope, silently): the broker's own, or the node agents' of deploy/node.
    let node_docs = documents(&repo_root().join("deploy/node"));
    for key in tr.scopes.keys() {
        let (sa_ns, sa_name) = key.split_once('/').expect("namespace/name");
        if sa_name == "*" {
            continue;
        }
        assert!(
            d.all("ServiceAccount")
                .chain(node_docs.iter().filter(|s| s.kind() == "ServiceAccount"))
                .any(|s| s.name() == sa_name && s.namespace() == sa_ns),
            "auth.tokenReview.scopes names {key}, which deploy/broker and deploy/node do not \
             create"
        );
    }
}

#[test]
fn policies_parse_with_the_broker_parser() {
    let d = Deployment::load();
    let policy = d.policy();
    assert!(!policy.documents().is_empty());
    // Relative secret files are keys of the secretsDir Secret; deploy/README.md shows how to
    // create it with each of them.
    let readme =
        std::fs::read_to_string(repo_root().join("deploy/README.md")).expect("deploy/README.md");
    for (_, grant) in policy.credentials() {
        let mut sources: Vec<&SecretSource> = grant.secret.iter().collect();
        match &grant.provider {
            ProviderSpec::PatPool { secrets, .. } => sources.extend(secrets),
            ProviderSpec::GithubApp { private_key, .. } => sources.push(private_key),
            ProviderSpec::UserSecret { .. } | ProviderSpec::AnthropicApiKey { .. } => {}
        }
        for source in sources {
            let SecretSource::File(file) = source else {
                panic!(
                    "credential {}: environment secrets need an env entry in the Deployment; \
                     use files from secretsDir",
                    grant.name
                );
            };
            assert!(
                file.is_relative(),
                "credential {}: {} is absolute; name a key of the secretsDir Secret",
                grant.name,
                file.display()
            );
            let flag = format!("--from-file={}=", file.display());
            assert!(
                readme.contains(&flag),
                "deploy/README.md does not create the secret file {} ({flag})",
                file.display()
            );
        }
    }
}

#[test]
fn tls_secret_is_the_cert_manager_certificate() {
    let d = Deployment::load();
    let ns = d.namespace();
    let m = d.mount_of(&d.config.tls.cert, "tls.cert");
    let Source::Secret(secret) = &m.source else {
        panic!("tls.cert is not on a Secret");
    };
    let serving: Vec<&Doc> = d
        .cert_manager
        .iter()
        .filter(|c| c.kind() == "Certificate" && c.value["spec"]["isCA"].as_bool() != Some(true))
        .collect();
    assert_eq!(serving.len(), 1, "one serving Certificate");
    let cert = &serving[0].value["spec"];
    assert_eq!(
        cert["secretName"].as_str(),
        Some(secret.as_str()),
        "the Certificate writes another Secret than the broker mounts"
    );
    let svc = d.all("Service").next().expect("service").name().to_owned();
    let names: Vec<&str> = seq(&cert["dnsNames"], "dnsNames")
        .iter()
        .map(|n| text(n, "dnsName"))
        .collect();
    for name in [format!("{svc}.{ns}.svc"), format!("{svc}.{ns}")] {
        assert!(
            names.contains(&name.as_str()),
            "the certificate does not name {name}"
        );
    }
    // Its issuer is defined next to it, as is the issuer's CA.
    let issuer = text(&cert["issuerRef"]["name"], "issuerRef.name");
    assert!(
        d.cert_manager
            .iter()
            .any(|i| i.kind() == "Issuer" && i.name() == issuer),
        "Issuer {issuer} is not in deploy/broker/cert-manager"
    );
    for doc in &d.cert_manager {
        assert_eq!(
            doc.namespace(),
            ns,
            "{}: {}",
            doc.file.display(),
            doc.name()
        );
    }
}

/// A path inside the pod, moved under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").expect("absolute"))
}

/// Writes `files` the way the kubelet lays out a `ConfigMap` or `Secret` volume: the data in
/// a timestamped directory, `..data` pointing at it, and each key a symlink through `..data`.
fn write_projected(dir: &Path, files: &[(&str, &[u8])]) {
    let stamp = dir.join("..2026_01_01_00_00_00.000000001");
    std::fs::create_dir_all(&stamp).expect("volume dir");
    for (key, bytes) in files {
        std::fs::write(stamp.join(key), bytes).expect("volume file");
        std::os::unix::fs::symlink(Path::new("..data").join(key), dir.join(key)).expect("link");
    }
    std::os::unix::fs::symlink(stamp.file_name().expect("name"), dir.join("..data"))
        .expect("..data");
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect admin");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// The Deployment's probes against the served broker: liveness answers 200; readiness checks
/// the deployed `TokenReview` backend's API server, which does not exist here, so everything
/// else must pass and that check must be the one that says why.
async fn probes_answer(admin: SocketAddr, d: &Deployment) {
    let path = text(
        &d.container["livenessProbe"]["httpGet"]["path"],
        "livenessProbe",
    );
    let (status, body) = http_get(admin, path).await;
    assert_eq!(status, 200, "livenessProbe {path}: {body}");
    let path = text(
        &d.container["readinessProbe"]["httpGet"]["path"],
        "readinessProbe",
    );
    let (status, body) = http_get(admin, path).await;
    assert_eq!(status, 503, "readinessProbe {path}: {body}");
    let json = &body[body.find('{').expect("a JSON body")..];
    let report: serde_json::Value = serde_json::from_str(json).expect("JSON report");
    for check in report["checks"].as_array().expect("checks") {
        let failing_is_the_api_server = check["name"] == "auth:tokenreview"
            && check["detail"]
                .as_str()
                .is_some_and(|d| d.contains("kubernetes.default.svc"));
        assert!(
            check["ok"] == true || failing_is_the_api_server,
            "only the absent API server may fail readiness: {report}"
        );
    }
}

/// The configuration as deployed, with the pod's files recreated under a temporary root,
/// builds a broker whose admin listener answers the Deployment's probes.
#[tokio::test(flavor = "multi_thread")]
async fn deployed_config_builds_a_broker_that_answers_the_probes() {
    let d = Deployment::load();
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();
    for m in &d.mounts {
        std::fs::create_dir_all(under(root, &m.path)).expect("mount point");
    }
    let mut c = d.config.clone();

    // The TLS Secret, as cert-manager writes it.
    let key = rcgen::KeyPair::generate().expect("key");
    let svc = d.all("Service").next().expect("service").name().to_owned();
    let cert = rcgen::CertificateParams::new(vec![format!("{svc}.{}.svc", d.namespace())])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let tls_dir = under(root, &d.mount_of(&c.tls.cert, "tls.cert").path);
    write_projected(
        &tls_dir,
        &[
            ("tls.crt", cert.pem().as_bytes()),
            ("tls.key", key.serialize_pem().as_bytes()),
            ("ca.crt", cert.pem().as_bytes()),
        ],
    );
    // The policy ConfigMap, laid out as the kubelet does (..data symlinks).
    let policy_dir = under(root, c.policy.as_ref().expect("file mode"));
    let files = d.policy_files();
    let files: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, t)| {
            (
                p.file_name().and_then(|n| n.to_str()).expect("key"),
                t.as_bytes(),
            )
        })
        .collect();
    write_projected(&policy_dir, &files);
    // The automounted service account.
    if let Some(tr) = c.auth.token_review.as_mut() {
        let sa = under(root, Path::new(SERVICE_ACCOUNT_DIR));
        write_projected(
            &sa,
            &[
                ("token", b"eyJhbGciOiJSUzI1NiJ9.e30.c2ln"),
                ("ca.crt", cert.pem().as_bytes()),
                ("namespace", d.namespace().as_bytes()),
            ],
        );
        tr.token_file = under(root, &tr.token_file);
        tr.ca_file = tr.ca_file.as_deref().map(|p| under(root, p));
    }

    // The cluster root, as `paddock-broker ca init` writes it, in its Secret.
    if let Some(node_ca) = c.node_ca.as_mut() {
        let (root_cert, root_key) = paddock_broker::node_ca::generate_root(
            "deploy test root",
            std::time::Duration::from_hours(1),
        )
        .expect("root");
        let dir = under(
            root,
            &d.mount_of(&node_ca.cert_file, "nodeCa.certFile").path,
        );
        write_projected(
            &dir,
            &[
                ("ca.crt", root_cert.as_bytes()),
                ("ca.key", root_key.as_bytes()),
            ],
        );
        node_ca.cert_file = under(root, &node_ca.cert_file);
        node_ca.key_file = under(root, &node_ca.key_file);
    }
    c.tls.cert = under(root, &c.tls.cert);
    c.tls.key = under(root, &c.tls.key);
    c.tls.client_ca = c.tls.client_ca.as_deref().map(|p| under(root, p));
    c.database = c.database.as_deref().map(|p| under(root, p));
    c.audit.path = under(root, &c.audit.path);
    c.policy = Some(policy_dir);
    c.secrets_dir = c.secrets_dir.as_deref().map(|p| under(root, p));
    c.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    c.admin_listen = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));

    let built = config::build(&c).unwrap_or_else(|e| panic!("deployed broker.yaml: {e}"));
    assert!(
        built.options.broker.node_ca().is_some(),
        "the deployed broker issues node CAs"
    );
    let policy = built.options.broker.policy().current();
    assert_eq!(
        policy.documents().len(),
        d.policy().documents().len(),
        "the broker loaded every policy document of the ConfigMap (and no ..data copy)"
    );
    let handle = server::spawn(built.options).await.expect("serve");
    let admin = handle.admin_addr.expect("admin listener");
    probes_answer(admin, &d).await;
    assert!(
        c.database.as_ref().is_some_and(|p| p.exists()) && c.audit.path.exists(),
        "the database and the audit log are created on their claims"
    );
    handle.shutdown().await;
}

/// `deploy/broker/postgres/`: the same broker with `store: postgres`, three replicas, a
/// `PodDisruptionBudget`, rolling updates, a per-pod audit directory on a shared claim. Checked
/// against the base manifests so the two cannot drift apart.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one walk over the variant's five files, each against its base"
)]
fn postgres_variant_is_the_base_with_a_shared_store() {
    let root = repo_root().join("deploy/broker");
    let load = |rel: &str| -> Vec<Value> {
        let text = std::fs::read_to_string(root.join(rel)).expect(rel);
        serde_yaml_ng::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).expect(rel))
            .filter(|v| !v.is_null())
            .collect()
    };
    let broker_yaml = |rel: &str| -> Config {
        let docs = load(rel);
        let text = docs[0]["data"]["broker.yaml"]
            .as_str()
            .expect("broker.yaml");
        Config::parse(Path::new(rel), text).expect(rel)
    };
    let base = broker_yaml("20-config.yaml");
    let mut pg = broker_yaml("postgres/config.yaml");
    let Ok(paddock_broker::store::StoreConfig::Postgres(store)) = pg.store_config() else {
        panic!("the postgres variant's broker.yaml has no postgres store");
    };
    assert!(base.database.is_some() && pg.database.is_none());
    // Nothing but the store differs.
    pg.store = None;
    pg.database.clone_from(&base.database);
    assert_eq!(
        format!("{pg:?}"),
        format!("{base:?}"),
        "postgres/config.yaml must be 20-config.yaml with store: in place of database:"
    );

    let patch = &load("postgres/deployment.yaml")[0];
    assert_eq!(patch["spec"]["replicas"].as_u64(), Some(3));
    assert_eq!(
        patch["spec"]["strategy"]["type"].as_str(),
        Some("RollingUpdate")
    );
    let container = &seq(
        &patch["spec"]["template"]["spec"]["containers"],
        "containers",
    )[0];
    let base_deployment = &load("50-deployment.yaml")[0];
    let base_container = &seq(
        &base_deployment["spec"]["template"]["spec"]["containers"],
        "containers",
    )[0];
    assert_eq!(
        container["name"], base_container["name"],
        "patches the broker"
    );
    let mounts = seq(&container["volumeMounts"], "volumeMounts");
    let mount = |path: &str| {
        mounts
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(path))
            .unwrap_or_else(|| panic!("no mount patch for {path}"))
    };
    let db = mount("/etc/paddock/db");
    assert_eq!(db["readOnly"].as_bool(), Some(true));
    for file in std::iter::once(&store.url_file).chain(store.ca_file.as_ref()) {
        assert_eq!(
            file.parent(),
            Some(Path::new("/etc/paddock/db")),
            "{} is on the db Secret",
            file.display()
        );
    }
    assert_eq!(mount("/var/lib/paddock")["$patch"].as_str(), Some("delete"));
    let audit_dir = pg.audit.path.parent().expect("audit dir");
    let audit = mount(audit_dir.to_str().expect("utf-8"));
    assert_eq!(audit["subPathExpr"].as_str(), Some("$(POD_NAME)"));
    let env = seq(&container["env"], "env");
    assert!(
        env.iter().any(|e| e["name"] == "POD_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"),
        "POD_NAME from the downward API"
    );
    let volumes = seq(&patch["spec"]["template"]["spec"]["volumes"], "volumes");
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume patch {name}"))
    };
    assert_eq!(volume("data")["$patch"].as_str(), Some("delete"));
    assert_eq!(
        volume("db")["secret"]["secretName"].as_str(),
        Some("paddock-broker-db")
    );

    let pdb = &load("postgres/pdb.yaml")[0];
    assert_eq!(pdb["kind"].as_str(), Some("PodDisruptionBudget"));
    assert!(
        pdb["spec"]["minAvailable"]
            .as_u64()
            .is_some_and(|m| (1..3).contains(&m)),
        "the budget lets one replica go and keeps one serving"
    );
    assert!(selects(
        &pdb["spec"]["selector"]["matchLabels"],
        &base_deployment["spec"]["template"]["metadata"]["labels"]
    ));

    let claims = load("postgres/storage.yaml");
    let base_claims = load("40-storage.yaml");
    assert_eq!(claims.len(), 1, "only the audit claim: no data claim");
    assert!(
        base_claims
            .iter()
            .any(|c| c["metadata"]["name"] == claims[0]["metadata"]["name"]),
        "the claim the Deployment mounts as audit"
    );
    assert_eq!(
        seq(&claims[0]["spec"]["accessModes"], "accessModes"),
        [Value::from("ReadWriteMany")]
    );

    let k = &load("postgres/kustomization.yaml")[0];
    let resources: BTreeSet<&str> = seq(&k["resources"], "resources")
        .iter()
        .map(|r| text(r, "resource"))
        .collect();
    let mut expected: BTreeSet<String> = std::fs::read_dir(&root)
        .expect("deploy/broker")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| Path::new(n).extension().is_some_and(|e| e == "yaml") && n != "40-storage.yaml")
        .map(|n| format!("../{n}"))
        .collect();
    expected.extend(["storage.yaml".to_owned(), "pdb.yaml".to_owned()]);
    assert_eq!(
        resources,
        expected.iter().map(String::as_str).collect(),
        "every base manifest but 40-storage.yaml, plus the variant's own"
    );
    let patches: BTreeSet<&str> = seq(&k["patches"], "patches")
        .iter()
        .map(|p| text(&p["path"], "path"))
        .collect();
    assert_eq!(patches, BTreeSet::from(["deployment.yaml", "config.yaml"]));
}
