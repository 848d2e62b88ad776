//! `deploy/node/` (the node agent `DaemonSet`) must agree with the node agent's code, with
//! `paddock-proxy install-cni` and with `deploy/broker/`: `node.toml` parses with the node
//! agent's config type and its parts start from it; every path it names is on a volume of the
//! container (host paths where the state must outlive the container or be shared with the
//! host); the CNI entry `install-cni` writes names the socket the node agent binds; the probes
//! reach the admin endpoint's real paths; the capabilities are exactly the justified ones;
//! the node agent reaches the broker's Service under a name its certificate carries, as an
//! account the broker knows and that holds no Kubernetes RBAC; and `deploy/kustomization.yaml`
//! lists every manifest.
//!
//! None of this has run on a Kubernetes cluster: these checks are all the manifests get.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use paddock_app::node::{config::NodeConfig, install_cni};
use paddock_app::serve::config::TlsMode;
use paddock_broker::auth::Scope;
use paddock_proxy::{
    audit::AuditTarget,
    metrics::{AdminServer, ProxyMetrics, Readiness},
    tls::RunCa,
};
use serde::Deserialize;
use serde_yaml_ng::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every YAML document of the `*.yaml` files directly in `dir`.
fn manifests(rel: &str) -> Vec<Value> {
    let dir = repo_root().join(rel);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read manifest");
        for de in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = Value::deserialize(de).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    docs
}

fn of_kind<'a>(docs: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> {
    docs.iter()
        .filter(move |d| d["kind"].as_str() == Some(kind))
}

fn seq<'a>(v: &'a Value, what: &str) -> &'a [Value] {
    v.as_sequence()
        .unwrap_or_else(|| panic!("{what}: not a list"))
}

fn text<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what}: not a string"))
}

/// The node agent's manifests, read once per test.
struct Node {
    docs: Vec<Value>,
    pod: Value,
    namespace: String,
}

impl Node {
    fn load() -> Self {
        let docs = manifests("deploy/node");
        let sets: Vec<&Value> = of_kind(&docs, "DaemonSet").collect();
        assert_eq!(sets.len(), 1, "one DaemonSet in deploy/node");
        let pod = sets[0]["spec"]["template"]["spec"].clone();
        let namespace = text(&sets[0]["metadata"]["namespace"], "namespace").to_owned();
        Self {
            docs,
            pod,
            namespace,
        }
    }

    fn container(&self, name: &str) -> &Value {
        seq(&self.pod["containers"], "containers")
            .iter()
            .chain(
                self.pod["initContainers"]
                    .as_sequence()
                    .into_iter()
                    .flatten(),
            )
            .find(|c| c["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    /// The container running `paddock-proxy node`.
    fn agent(&self) -> &Value {
        seq(&self.pod["containers"], "containers")
            .iter()
            .find(|c| args(c).contains(&"node".to_owned()))
            .expect("a container runs `paddock-proxy node`")
    }

    fn volume(&self, name: &str) -> &Value {
        seq(&self.pod["volumes"], "volumes")
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"))
    }

    /// The path given to `--config`, and the config it names (from the mounted `ConfigMap`).
    fn config(&self) -> NodeConfig {
        let agent = self.agent();
        let argv = args(agent);
        let path = PathBuf::from(flag(&argv, "--config").expect("node --config PATH"));
        let mount = mount_of(agent, &path).expect("the config file is on a volume");
        let volume = self.volume(text(&mount["name"], "mount name"));
        let cm_name = text(
            &volume["configMap"]["name"],
            "the config volume is a ConfigMap",
        );
        let cm = of_kind(&self.docs, "ConfigMap")
            .find(|c| c["metadata"]["name"].as_str() == Some(cm_name))
            .unwrap_or_else(|| panic!("ConfigMap {cm_name} is not in deploy/node"));
        let key = path
            .strip_prefix(text(&mount["mountPath"], "mountPath"))
            .expect("under the mount")
            .to_str()
            .expect("utf-8");
        let toml = text(&cm["data"][key], "node.toml");
        NodeConfig::from_toml_str(toml)
            .unwrap_or_else(|e| panic!("node.toml in ConfigMap {cm_name}: {e}"))
    }
}

/// `command` and `args` of a container, with `--flag=value` split in two.
fn args(container: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for key in ["command", "args"] {
        for a in container[key].as_sequence().into_iter().flatten() {
            let a = text(a, key);
            match a.split_once('=') {
                Some((f, v)) if f.starts_with("--") => {
                    out.push(f.to_owned());
                    out.push(v.to_owned());
                }
                _ => out.push(a.to_owned()),
            }
        }
    }
    out
}

fn flag<'a>(argv: &'a [String], name: &str) -> Option<&'a str> {
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .map(String::as_str)
}

/// The volume mount of `container` holding `path` (the deepest one).
fn mount_of<'a>(container: &'a Value, path: &Path) -> Option<&'a Value> {
    container["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|m| path.starts_with(text(&m["mountPath"], "mountPath")))
        .max_by_key(|m| text(&m["mountPath"], "mountPath").len())
}

fn read_only(mount: &Value) -> bool {
    mount["readOnly"].as_bool() == Some(true)
}

/// Where `path` (in `container`) is on the host, when its volume is a `hostPath`.
fn host_path(node: &Node, container: &Value, path: &Path) -> Option<PathBuf> {
    let mount = mount_of(container, path)?;
    let volume = node.volume(text(&mount["name"], "name"));
    let host = volume["hostPath"]["path"].as_str()?;
    let rest = path
        .strip_prefix(text(&mount["mountPath"], "mountPath"))
        .expect("under the mount");
    Some(Path::new(host).join(rest))
}

#[test]
fn node_toml_parses_and_takes_the_node_name_from_the_downward_api() {
    let node = Node::load();
    let cfg = node.config();
    assert!(
        cfg.node_name.is_none(),
        "one ConfigMap serves every node: the name must come from NODE_NAME"
    );
    let env = seq(&node.agent()["env"], "env");
    let node_name = env
        .iter()
        .find(|e| e["name"].as_str() == Some("NODE_NAME"))
        .expect("NODE_NAME in the environment");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("spec.nodeName")
    );
    assert!(
        cfg.network.bypass_mark.is_none() && cfg.network.nameservers.is_empty(),
        "upstream DNS from the pod's resolv.conf (cluster DNS)"
    );
    assert_eq!(
        node.pod["dnsPolicy"].as_str(),
        Some("ClusterFirstWithHostNet"),
        "with hostNetwork, only this policy gives resolv.conf the cluster DNS the broker URL \
         needs"
    );
}

#[test]
fn every_path_in_node_toml_is_on_a_volume_of_the_container() {
    let node = Node::load();
    let cfg = node.config();
    let agent = node.agent();

    // (path, must be writable, must be on the host)
    let mut paths: Vec<(PathBuf, bool, bool, &str)> = vec![
        (cfg.state_dir.clone(), true, true, "state_dir"),
        (cfg.control_socket(), true, true, "pods.control_socket"),
        (
            cfg.pods.cgroup_root.clone(),
            false,
            true,
            "pods.cgroup_root",
        ),
        (cfg.ebpf.pin_dir.clone(), true, true, "ebpf.pin_dir"),
        (cfg.broker.ca_file.clone(), false, false, "broker.ca_file"),
    ];
    if let Some(bundle) = &cfg.tls.upstream_ca_bundle {
        paths.push((bundle.clone(), false, false, "tls.upstream_ca_bundle"));
    }
    let bearer = cfg.broker.bearer_file.clone().expect("bearer_file");
    paths.push((bearer.clone(), false, false, "broker.bearer_file"));
    match cfg
        .audit
        .target
        .as_deref()
        .expect("audit.target")
        .parse::<AuditTarget>()
    {
        Ok(AuditTarget::File(p)) => paths.push((p, true, true, "audit.target")),
        Ok(AuditTarget::Stdout) => {}
        Ok(AuditTarget::None) => panic!("the deployment keeps an audit trail"),
        Err(e) => panic!("audit.target: {e}"),
    }
    // No CA key on any node: the node agent's intermediate comes from the broker, in memory.
    assert_eq!(cfg.tls.mode, TlsMode::Broker, "tls.mode");
    assert!(cfg.tls.ca_dir.as_os_str().is_empty() && !cfg.tls.generate_ca);

    for (path, writable, on_host, what) in &paths {
        let mount = mount_of(agent, path)
            .unwrap_or_else(|| panic!("{what} {} is on no volume", path.display()));
        if *writable {
            assert!(!read_only(mount), "{what} {} is read-only", path.display());
        }
        if *on_host {
            assert!(
                host_path(&node, agent, path).is_some(),
                "{what} {} must be on a hostPath volume (it outlives the container or is \
                 shared with the host)",
                path.display()
            );
        }
    }

    // The pins are in the host's bpffs, mounted where the loader looks for bpffs.
    let pin_host = host_path(&node, agent, &cfg.ebpf.pin_dir).expect("hostPath");
    assert!(
        pin_host.starts_with("/sys/fs/bpf"),
        "{}",
        pin_host.display()
    );
    assert!(
        cfg.ebpf
            .pin_dir
            .starts_with(paddock_proxy::mounts::DEFAULT_BPFFS),
        "the loader mounts a bpffs of its own unless {} is one",
        paddock_proxy::mounts::DEFAULT_BPFFS
    );
    // The host's cgroup tree, and not over the container's own /sys/fs/cgroup (through which
    // the node agent finds its own cgroup).
    assert_eq!(
        host_path(&node, agent, &cfg.pods.cgroup_root),
        Some(PathBuf::from("/sys/fs/cgroup"))
    );
    assert!(
        !cfg.pods.cgroup_root.starts_with("/sys/fs/cgroup"),
        "mounting the host's cgroup tree over /sys/fs/cgroup makes the node agent's own cgroup \
         the host's root"
    );
    // The pods' network namespaces, at the paths the CNI call names, with the runtime's later
    // mounts propagated in.
    let netns =
        mount_of(agent, Path::new("/var/run/netns/cni-0")).expect("/var/run/netns is mounted");
    assert_eq!(text(&netns["mountPath"], "mountPath"), "/var/run/netns");
    assert_eq!(netns["mountPropagation"].as_str(), Some("HostToContainer"));
    assert_eq!(
        host_path(&node, agent, Path::new("/var/run/netns")),
        Some(PathBuf::from("/var/run/netns"))
    );

    // The bearer is a projected token for the broker's audience, and nothing else is.
    let mount = mount_of(agent, &bearer).expect("mounted");
    let volume = node.volume(text(&mount["name"], "name"));
    let sources = seq(&volume["projected"]["sources"], "projected sources");
    assert_eq!(sources.len(), 1);
    let token = &sources[0]["serviceAccountToken"];
    assert_eq!(token["audience"].as_str(), Some("paddock-broker"));
    assert_eq!(
        Path::new(text(&mount["mountPath"], "mountPath")).join(text(&token["path"], "path")),
        bearer
    );
    // The broker's CA without the broker's key.
    let mount = mount_of(agent, &cfg.broker.ca_file).expect("mounted");
    let volume = node.volume(text(&mount["name"], "name"));
    assert!(
        volume["secret"].is_null(),
        "the broker CA comes from a ConfigMap: the Secret paddock-broker-tls holds the broker's \
         private key"
    );
    assert!(volume["configMap"]["name"].as_str().is_some());
}

#[test]
fn the_cni_entry_names_the_socket_the_node_agent_binds() {
    let node = Node::load();
    let cfg = node.config();
    let agent = node.agent();
    let socket_host =
        host_path(&node, agent, &cfg.control_socket()).expect("the socket is on a hostPath");
    assert_eq!(
        socket_host,
        cfg.control_socket(),
        "the same path on the host and in the container"
    );

    for name in ["install-cni", "cni-watch"] {
        let c = node.container(name);
        let argv = args(c);
        assert_eq!(
            argv.get(1).map(String::as_str),
            Some("install-cni"),
            "{name}"
        );
        let dir = |f: &str| PathBuf::from(flag(&argv, f).unwrap_or_else(|| panic!("{name} {f}")));
        assert_eq!(
            host_path(&node, c, &dir("--bin-dir")),
            Some(PathBuf::from("/opt/cni/bin")),
            "{name}"
        );
        assert_eq!(
            host_path(&node, c, &dir("--conf-dir")),
            Some(PathBuf::from("/etc/cni/net.d")),
            "{name}"
        );
        assert!(!read_only(mount_of(c, &dir("--bin-dir")).expect("mounted")));
        assert!(!read_only(
            mount_of(c, &dir("--conf-dir")).expect("mounted")
        ));
        assert!(
            flag(&argv, "--source-binary").is_none(),
            "{name}: the image's paddock-cni"
        );
        assert_eq!(c["image"], agent["image"], "{name}: one image, one version");

        // What install-cni really writes with these arguments.
        let socket = PathBuf::from(flag(&argv, "--socket").unwrap_or(install_cni::DEFAULT_SOCKET));
        let host = tempfile::tempdir().expect("tempdir");
        let (bin, conf) = (host.path().join("bin"), host.path().join("conf"));
        std::fs::create_dir_all(&bin).expect("bin");
        std::fs::create_dir_all(&conf).expect("conf");
        std::fs::write(
            conf.join("10-net.conflist"),
            r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#,
        )
        .expect("conflist");
        let source = host.path().join("paddock-cni");
        std::fs::write(&source, b"plugin").expect("plugin");
        let timeout_seconds = flag(&argv, "--timeout-seconds")
            .map_or(install_cni::DEFAULT_TIMEOUT_SECONDS, |t| {
                t.parse().expect("seconds")
            });
        install_cni::install(&install_cni::InstallOptions {
            bin_dir: bin,
            conf_dir: conf.clone(),
            source_binary: source,
            socket,
            timeout_seconds,
        })
        .expect("install");
        let list: serde_json::Value =
            serde_json::from_slice(&std::fs::read(conf.join("10-net.conflist")).expect("read"))
                .expect("json");
        let entry = list["plugins"]
            .as_array()
            .and_then(|p| p.last())
            .expect("an entry");
        assert_eq!(entry["type"], "paddock-cni");
        assert_eq!(
            entry["socket"].as_str().map(PathBuf::from),
            Some(socket_host.clone()),
            "{name}: the plugin would call a socket nobody binds"
        );
    }

    // The init container refuses a node whose bpffs is not where the pins go.
    let init = node.container("install-cni");
    let bpffs =
        PathBuf::from(flag(&args(init), "--require-bpffs").expect("install-cni --require-bpffs"));
    assert!(cfg.ebpf.pin_dir.starts_with(&bpffs));
    assert_eq!(
        host_path(&node, init, &bpffs),
        host_path(&node, agent, &bpffs),
        "the init container checks the bpffs the node agent pins into"
    );
    let watch = args(node.container("cni-watch"));
    assert!(
        flag(&watch, "--watch").is_some(),
        "cni-watch keeps the entry in place"
    );
}

/// One `GET` to the admin endpoint; returns the status code.
async fn get(addr: std::net::SocketAddr, path: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .expect("read");
    let head = String::from_utf8_lossy(&out);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line")
}

#[tokio::test]
async fn probes_hit_the_admin_endpoint_and_its_real_paths() {
    let node = Node::load();
    let cfg = node.config();
    let admin = cfg
        .admin
        .as_ref()
        .expect("[admin]: the probes need it")
        .listen;
    assert!(
        admin.ip().is_loopback(),
        "plain HTTP on hostNetwork: the node's loopback only"
    );
    assert_eq!(node.pod["hostNetwork"].as_bool(), Some(true));
    let agent = node.agent();
    let probe = |kind: &str| {
        let get = &agent[kind]["httpGet"];
        assert_eq!(
            get["host"].as_str(),
            Some(admin.ip().to_string().as_str()),
            "{kind}: the kubelet must probe the address the admin endpoint listens on"
        );
        assert_eq!(
            get["port"].as_u64(),
            Some(u64::from(admin.port())),
            "{kind}: admin port"
        );
        text(&get["path"], "path").to_owned()
    };
    let (readiness, liveness) = (probe("readinessProbe"), probe("livenessProbe"));

    // The paths are the admin server's: readiness follows readiness, liveness does not.
    let ready = Readiness::new();
    let server = AdminServer::new(Arc::new(ProxyMetrics::new()), ready.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async move {
        let _ = stop_rx.await;
    }));
    assert_eq!(
        get(addr, &readiness).await,
        503,
        "not ready before start-up"
    );
    assert_eq!(get(addr, &liveness).await, 200);
    ready.set_ready(true);
    assert_eq!(get(addr, &readiness).await, 200);
    assert_eq!(
        get(addr, "/no-such-path").await,
        404,
        "unknown paths are not 200"
    );
    let _ = stop_tx.send(());
    task.await.expect("admin server");
}

#[test]
fn capabilities_are_exactly_the_justified_set() {
    let node = Node::load();
    let agent = node.agent();
    let sc = &agent["securityContext"];
    assert_eq!(
        sc["privileged"].as_bool(),
        Some(false),
        "not privileged: no devices, no other capabilities"
    );
    assert!(
        sc["allowPrivilegeEscalation"].is_null(),
        "the API refuses allowPrivilegeEscalation: false with CAP_SYS_ADMIN (it only misses the \
         SYS_ADMIN spelling), and no_new_privs bounds nothing for CAP_SYS_ADMIN"
    );
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(
        seq(&sc["capabilities"]["drop"], "drop")
            .iter()
            .map(|c| text(c, "cap"))
            .collect::<Vec<_>>(),
        ["ALL"]
    );
    let added: BTreeSet<&str> = seq(&sc["capabilities"]["add"], "add")
        .iter()
        .map(|c| text(c, "cap"))
        .collect();
    assert_eq!(
        added,
        BTreeSet::from(["NET_ADMIN", "SYS_ADMIN"]),
        "change deploy/README.md's privilege table with this set"
    );
    // Each one is justified where it is granted: a comment right above it.
    let yaml = read("deploy/node/30-daemonset.yaml");
    let lines: Vec<&str> = yaml.lines().collect();
    for cap in &added {
        let at = lines
            .iter()
            .position(|l| l.trim() == format!("- {cap}"))
            .unwrap_or_else(|| panic!("{cap} not found as a list item"));
        assert!(
            lines[at - 1].trim_start().starts_with('#'),
            "{cap} has no justification comment above it"
        );
    }
    let readme = read("deploy/README.md");
    for cap in &added {
        assert!(
            readme.contains(&format!("| `CAP_{cap}` |")),
            "deploy/README.md's privilege table does not explain CAP_{cap}"
        );
    }
    assert_eq!(
        sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );

    // The pod shares only the host network namespace.
    assert_ne!(node.pod["hostPID"].as_bool(), Some(true));
    assert_ne!(node.pod["hostIPC"].as_bool(), Some(true));
    // The other containers run as root on the CNI directories with no capability at all.
    for name in ["install-cni", "cni-watch"] {
        let sc = &node.container(name)["securityContext"];
        assert!(
            sc["capabilities"]["add"].is_null(),
            "{name} adds capabilities"
        );
        assert_eq!(
            seq(&sc["capabilities"]["drop"], "drop")[0].as_str(),
            Some("ALL"),
            "{name}"
        );
        assert_ne!(sc["privileged"].as_bool(), Some(true), "{name}");
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{name}"
        );
    }
}

#[test]
fn the_namespace_admits_the_daemonset_and_the_brokers_stays_restricted() {
    let node = Node::load();
    let ns = of_kind(&node.docs, "Namespace")
        .find(|n| n["metadata"]["name"].as_str() == Some(node.namespace.as_str()))
        .expect("deploy/node creates the DaemonSet's namespace");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str(),
        Some("privileged"),
        "host paths, hostNetwork and added capabilities are refused below `privileged`"
    );
    let broker = manifests("deploy/broker");
    let broker_ns = of_kind(&broker, "Deployment")
        .next()
        .expect("broker Deployment")["metadata"]["namespace"]
        .as_str()
        .expect("namespace");
    assert_ne!(
        broker_ns, node.namespace,
        "the broker's namespace must not be opened up for the node agent"
    );
    let broker_ns_doc = of_kind(&broker, "Namespace")
        .find(|n| n["metadata"]["name"].as_str() == Some(broker_ns))
        .expect("broker namespace");
    assert_eq!(
        broker_ns_doc["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str(),
        Some("restricted")
    );
    // Scheduling: every node, evicted last, one node at a time.
    let tolerations = seq(&node.pod["tolerations"], "tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t["operator"].as_str() == Some("Exists") && t["key"].is_null()),
        "the node agent must run wherever agent pods may"
    );
    assert_eq!(
        node.pod["priorityClassName"].as_str(),
        Some("system-node-critical")
    );
    let ds = of_kind(&node.docs, "DaemonSet").next().expect("DaemonSet");
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"].as_u64(),
        Some(1)
    );
}

#[test]
fn the_node_agent_reaches_the_deployed_broker_as_a_node_bound_account() {
    let node = Node::load();
    let cfg = node.config();
    let rest = cfg
        .broker
        .url
        .strip_prefix("https://")
        .expect("the broker URL is https");
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority.rsplit_once(':').expect("the URL names its port");
    let port: u64 = port.parse().expect("numeric port");

    let broker = manifests("deploy/broker");
    let service = of_kind(&broker, "Service").next().expect("broker Service");
    let service_host = format!(
        "{}.{}.svc",
        text(&service["metadata"]["name"], "name"),
        text(&service["metadata"]["namespace"], "namespace")
    );
    assert_eq!(
        host, service_host,
        "the node agent dials the broker's Service"
    );
    let ports: Vec<u64> = seq(&service["spec"]["ports"], "ports")
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .collect();
    assert_eq!(
        ports,
        [port],
        "node.toml's broker port is not the Service's"
    );

    let certs = manifests("deploy/broker/cert-manager");
    let serving = of_kind(&certs, "Certificate")
        .find(|c| c["spec"]["isCA"].as_bool() != Some(true))
        .expect("the broker's serving Certificate");
    let checked = cfg.broker.server_name.as_deref().unwrap_or(host);
    assert!(
        seq(&serving["spec"]["dnsNames"], "dnsNames")
            .iter()
            .any(|n| n.as_str() == Some(checked)),
        "the broker certificate does not name {checked}"
    );

    let sa_name = text(&node.pod["serviceAccountName"], "serviceAccountName");
    // The broker gives exactly this account what the node agent's calls need.
    let cm = of_kind(&broker, "ConfigMap")
        .find(|c| !c["data"]["broker.yaml"].is_null())
        .expect("broker.yaml ConfigMap");
    let broker_cfg: paddock_broker::config::Config =
        serde_yaml_ng::from_str(text(&cm["data"]["broker.yaml"], "broker.yaml"))
            .expect("broker.yaml");
    let tr = broker_cfg.auth.token_review.expect("tokenReview");
    let key = format!("{}/{sa_name}", node.namespace);
    let scopes = tr
        .scopes
        .get(&key)
        .unwrap_or_else(|| panic!("auth.tokenReview.scopes has no entry for {key}"));
    assert!(
        scopes.contains(&Scope::ValidateEgress)
            && scopes.contains(&Scope::SubstituteAuth)
            && scopes.contains(&Scope::NodeAgent),
        "{key}: {scopes:?}"
    );
    assert!(
        !scopes.contains(&Scope::Controller),
        "{key} must not act on runs of every namespace"
    );
}

#[test]
fn the_node_agents_one_rbac_grant_is_watching_pods() {
    let node = Node::load();
    let cfg = node.config();
    let sa_name = text(&node.pod["serviceAccountName"], "serviceAccountName");
    // The account: this namespace's ServiceAccount, no automounted token; its one RBAC grant
    // is get/list/watch on pods (the pod watch), bound once.
    let sa = of_kind(&node.docs, "ServiceAccount")
        .find(|s| {
            s["metadata"]["name"].as_str() == Some(sa_name)
                && s["metadata"]["namespace"].as_str() == Some(node.namespace.as_str())
        })
        .expect("deploy/node creates the DaemonSet's ServiceAccount");
    assert_eq!(sa["automountServiceAccountToken"].as_bool(), Some(false));
    assert_eq!(
        node.pod["automountServiceAccountToken"].as_bool(),
        Some(false),
        "the API token is the projected kube-api-token volume, in the node container only"
    );
    let everything: Vec<Value> = ["deploy/broker", "deploy/node"]
        .into_iter()
        .flat_map(manifests)
        .collect();
    let mut granted = Vec::new();
    for kind in ["RoleBinding", "ClusterRoleBinding"] {
        for b in of_kind(&everything, kind) {
            let binds = b["subjects"].as_sequence().into_iter().flatten().any(|s| {
                s["name"].as_str() == Some(sa_name)
                    && s["namespace"].as_str() == Some(node.namespace.as_str())
            });
            if binds {
                granted.push(text(&b["roleRef"]["name"], "roleRef").to_owned());
            }
        }
    }
    assert_eq!(
        granted.len(),
        1,
        "one binding for the node agent: {granted:?}"
    );
    let role = of_kind(&everything, "ClusterRole")
        .find(|r| r["metadata"]["name"].as_str() == Some(granted[0].as_str()))
        .expect("the bound ClusterRole");
    let rules = seq(&role["rules"], "rules");
    assert_eq!(rules.len(), 1, "{rules:?}");
    let strings = |v: &Value| -> Vec<String> {
        v.as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(strings(&rules[0]["apiGroups"]), [""]);
    assert_eq!(strings(&rules[0]["resources"]), ["pods"]);
    assert_eq!(strings(&rules[0]["verbs"]), ["get", "list", "watch"]);
    // The node container reads that token where the in-cluster client looks.
    let agent = node.agent();
    assert!(
        mount_of(
            agent,
            Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token")
        )
        .is_some(),
        "the node container has no API token for its pod watch"
    );
    assert!(
        cfg.kubernetes
            .as_ref()
            .is_some_and(|k| k.kubeconfig.is_none()),
        "node.toml must enable the in-cluster pod source"
    );
}

/// Every `*.yaml` under `dir`, relative to `deploy/`.
fn yaml_files(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let path = e.expect("entry").path();
        if path.is_dir() {
            yaml_files(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            let rel = path.strip_prefix(root).expect("under deploy/");
            out.insert(rel.to_str().expect("utf-8").to_owned());
        }
    }
}

#[test]
fn kustomization_lists_every_manifest_under_deploy() {
    let root = repo_root().join("deploy");
    let kustomization: Value =
        serde_yaml_ng::from_str(&read("deploy/kustomization.yaml")).expect("kustomization");
    assert_eq!(kustomization["kind"].as_str(), Some("Kustomization"));
    let listed: BTreeSet<String> = seq(&kustomization["resources"], "resources")
        .iter()
        .map(|r| text(r, "resource").to_owned())
        .collect();
    let mut present = BTreeSet::new();
    yaml_files(&root, &root, &mut present);
    present.remove("kustomization.yaml");
    // Needs cert-manager's CRDs, is the PostgreSQL variant of the broker, or is the example
    // run: applied on its own, as the kustomization's comment says.
    let optional: BTreeSet<String> = present
        .iter()
        .filter(|p| {
            p.starts_with("broker/cert-manager/")
                || p.starts_with("broker/postgres/")
                || p.starts_with("examples/")
        })
        .cloned()
        .collect();
    assert!(
        !optional.is_empty(),
        "the cert-manager manifests moved: update this test"
    );
    let expected: BTreeSet<String> = present.difference(&optional).cloned().collect();
    let missing: Vec<_> = expected.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&expected).collect();
    assert!(
        missing.is_empty(),
        "not in deploy/kustomization.yaml: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "listed but not a manifest here: {stale:?}"
    );
    let comment = read("deploy/kustomization.yaml");
    for p in &optional {
        assert!(comment.contains(p.as_str()), "say why {p} is left out");
    }
}

/// A path in the container, moved under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").expect("absolute"))
}

/// The node agent's shared parts (audit, node CA, broker client, resolver, policies) build from
/// this node.toml once the files it names exist: what `paddock-proxy node` does before it
/// loads eBPF (root only).
#[tokio::test(flavor = "multi_thread")]
async fn node_toml_builds_the_node_agents_parts() {
    let mut cfg = Node::load().config();
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();
    // The broker's answer stands in for the per-node intermediate (tls.mode = "broker").
    let ca = RunCa::generate("deploy-node-test", Duration::from_hours(1)).expect("CA");
    cfg.broker.ca_file = under(root, &cfg.broker.ca_file);
    std::fs::create_dir_all(cfg.broker.ca_file.parent().expect("dir")).expect("dir");
    std::fs::write(&cfg.broker.ca_file, ca.cert_pem()).expect("broker CA");
    if let Some(bearer) = cfg.broker.bearer_file.as_mut() {
        *bearer = under(root, bearer);
        std::fs::create_dir_all(bearer.parent().expect("dir")).expect("dir");
        std::fs::write(&*bearer, "eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n").expect("token");
    }
    let metrics = Arc::new(ProxyMetrics::new());
    let intermediate =
        RunCa::from_pem(ca.cert_pem().as_bytes(), ca.key_pem().as_bytes()).expect("CA");
    let leaves = Arc::new(cfg.tls.leaf_cache_with(intermediate).expect("leaf cache"));
    let parts = paddock_app::node::node_parts_with(&cfg, &metrics, leaves)
        .unwrap_or_else(|e| panic!("node parts from deploy/node's node.toml: {e}"));
    assert_eq!(parts.plain_http_ports, cfg.pods.plain_http_ports);
}
