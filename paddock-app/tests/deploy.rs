//! `deploy/proxy/` must agree with the proxy's code and with `deploy/broker/`: `proxy.toml`
//! parses and validates as `paddock-proxy serve` reads it and starts (without eBPF, which needs
//! root) once the files it names exist; it reaches the broker on the Service's port under a
//! name the broker's certificate carries, with an identity the broker gives the proxy's
//! scopes; and the systemd unit starts it with that file, in a sandbox where every path it
//! writes is writable, after the slice whose cgroup it intercepts.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use paddock_app::serve::{ServeOptions, config::ServeConfig, serve_until};
use paddock_broker::auth::Scope;
use paddock_proxy::{audit::AuditTarget, tls::RunCa};
use serde::Deserialize;
use serde_yaml_ng::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn config() -> ServeConfig {
    ServeConfig::from_toml_str(&read("deploy/proxy/proxy.toml"))
        .unwrap_or_else(|e| panic!("deploy/proxy/proxy.toml: {e}"))
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

/// The `[Section] Key=value` lines of a systemd unit, in order (comments dropped).
fn unit(rel: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in read(rel).lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            s.clone_into(&mut section);
        } else if let Some((k, v)) = line.split_once('=') {
            out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

fn values<'a>(unit: &'a [(String, String, String)], key: &str) -> Vec<&'a str> {
    unit.iter()
        .filter(|(_, k, _)| k == key)
        .map(|(_, _, v)| v.as_str())
        .collect()
}

fn words<'a>(unit: &'a [(String, String, String)], key: &str) -> BTreeSet<&'a str> {
    values(unit, key)
        .into_iter()
        .flat_map(str::split_whitespace)
        .collect()
}

fn yes(unit: &[(String, String, String)], key: &str) -> bool {
    values(unit, key)
        .last()
        .is_some_and(|v| matches!(*v, "yes" | "true" | "1" | "on" | "strict" | "full"))
}

/// The cgroup directory (relative to the cgroup2 root) systemd gives a slice: each dash
/// starts a child, `a-b.slice` lives in `a.slice/a-b.slice`.
fn slice_cgroup(name: &str) -> PathBuf {
    let stem = name.strip_suffix(".slice").expect("a .slice unit");
    let parts: Vec<&str> = stem.split('-').collect();
    (1..=parts.len())
        .map(|n| format!("{}.slice", parts[..n].join("-")))
        .collect()
}

#[test]
fn slice_cgroup_follows_systemd_naming() {
    assert_eq!(
        slice_cgroup("paddock-agent.slice"),
        PathBuf::from("paddock.slice/paddock-agent.slice")
    );
    assert_eq!(slice_cgroup("agents.slice"), PathBuf::from("agents.slice"));
}

#[test]
fn proxy_toml_asks_the_deployed_broker() {
    let cfg = config();
    assert!(
        cfg.policy.file.is_none(),
        "the deployment decides egress with the broker, not a static file"
    );
    let broker = cfg.broker.as_ref().expect("[broker]");
    let rest = broker
        .url
        .strip_prefix("https://")
        .expect("the broker URL is https");
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority.rsplit_once(':').expect("the URL names its port");
    let port: u16 = port.parse().expect("numeric port");

    let broker_docs = manifests("deploy/broker");
    let service = of_kind(&broker_docs, "Service")
        .next()
        .expect("the broker's Service");
    let service_ports: Vec<u64> = service["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .collect();
    assert_eq!(
        service_ports,
        vec![u64::from(port)],
        "proxy.toml's broker port is not the broker Service's port"
    );

    // The name the broker's certificate is checked against is one it carries.
    let certs = manifests("deploy/broker/cert-manager");
    let serving = of_kind(&certs, "Certificate")
        .find(|c| c["spec"]["isCA"].as_bool() != Some(true))
        .expect("the broker's serving Certificate");
    let dns_names: Vec<&str> = serving["spec"]["dnsNames"]
        .as_sequence()
        .expect("dnsNames")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let checked = broker.server_name.as_deref().unwrap_or(host);
    assert!(
        dns_names.contains(&checked),
        "the broker certificate names {dns_names:?}, not {checked}"
    );
    assert!(
        broker.bearer_file.is_some(),
        "the broker authenticates the proxy by a bearer (TokenReview)"
    );

    // Some account holds both scopes the proxy's calls need.
    let cm = of_kind(&broker_docs, "ConfigMap")
        .find(|c| !c["data"]["broker.yaml"].is_null())
        .expect("broker.yaml ConfigMap");
    let broker_cfg: paddock_broker::config::Config =
        serde_yaml_ng::from_str(cm["data"]["broker.yaml"].as_str().expect("text"))
            .expect("broker.yaml");
    let tr = broker_cfg.auth.token_review.expect("tokenReview");
    assert!(
        tr.scopes
            .values()
            .any(|s| s.contains(&Scope::ValidateEgress) && s.contains(&Scope::SubstituteAuth)),
        "no account of auth.tokenReview.scopes may validate egress and substitute"
    );
}

#[test]
fn proxy_toml_listens_where_the_agents_are_redirected() {
    let cfg = config();
    assert!(!cfg.listen.transparent.is_empty());
    for addr in &cfg.listen.transparent {
        assert!(
            addr.ip().is_loopback(),
            "{addr}: the agents share the host, so the proxy listens on its loopback"
        );
    }
    assert!(
        cfg.listen.connect.is_none(),
        "cooperative CONNECT is not part of this deployment"
    );
    let admin = cfg.admin.as_ref().expect("[admin]");
    assert!(
        admin.listen.ip().is_loopback(),
        "the admin listener is plain HTTP: keep it on loopback"
    );
    let ebpf = cfg.ebpf.as_ref().expect("[ebpf]");
    assert!(
        !ebpf.dns.is_empty(),
        "agents need a resolver they may reach"
    );
    let dns = cfg
        .dns
        .as_ref()
        .expect("[dns]: without it agents can tunnel data over DNS");
    assert!(
        dns.redirect_agents,
        "the agents' DNS must land on the proxy's server"
    );
    // The eBPF programs send it to the transparent listener's address at the server's port.
    let port =
        paddock_app::serve::config::redirect_port(&cfg.listen.transparent, &ebpf.dns, &dns.listen)
            .expect("redirect target served");
    assert!(
        port.is_some_and(|p| p != 5353),
        "a port of its own (5353 is mDNS)"
    );
    assert!(
        !ebpf.agent_cgroups.is_empty(),
        "an agent cgroup to intercept"
    );
}

#[test]
fn unit_runs_this_config_as_root_with_the_ebpf_capabilities() {
    let unit = unit("deploy/proxy/paddock-proxy.service");

    // ExecStart runs `serve --config <the path deploy/README.md installs proxy.toml at>`.
    let exec = values(&unit, "ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart");
    let argv: Vec<&str> = exec[0].split_whitespace().collect();
    assert!(argv[0].ends_with("/paddock-proxy"), "{}", exec[0]);
    assert_eq!(argv.get(1), Some(&"serve"));
    let config_path = argv
        .iter()
        .position(|a| *a == "--config")
        .and_then(|i| argv.get(i + 1))
        .expect("--config PATH");
    let readme = read("deploy/README.md");
    assert!(
        readme.contains(&format!("deploy/proxy/proxy.toml {config_path}")),
        "deploy/README.md does not install deploy/proxy/proxy.toml at {config_path}"
    );

    // Root with the capabilities the eBPF loader needs.
    assert!(
        values(&unit, "User").is_empty() && values(&unit, "DynamicUser").is_empty(),
        "loading eBPF needs root"
    );
    let caps = words(&unit, "CapabilityBoundingSet");
    for cap in ["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"] {
        assert!(caps.contains(cap), "CapabilityBoundingSet lacks {cap}");
    }

    // `systemctl reload` (logrotate's postrotate in deploy/README.md) is the SIGHUP that
    // reopens the audit file (tests/serve_signals.rs); anything else would restart or kill it.
    assert_eq!(
        values(&unit, "ExecReload"),
        ["/bin/kill -HUP $MAINPID"],
        "reload must send SIGHUP"
    );
    assert!(
        readme.contains("systemctl reload paddock-proxy.service"),
        "deploy/README.md's logrotate example must reload the proxy"
    );
}

#[test]
fn unit_sandbox_leaves_writable_every_path_the_proxy_writes() {
    let cfg = config();
    let unit = unit("deploy/proxy/paddock-proxy.service");
    let strict = values(&unit, "ProtectSystem").last() == Some(&"strict");
    let mut writable: Vec<PathBuf> = words(&unit, "ReadWritePaths")
        .into_iter()
        .map(|p| PathBuf::from(p.trim_start_matches('-')))
        .collect();
    writable.extend(
        words(&unit, "LogsDirectory")
            .into_iter()
            .map(|d| Path::new("/var/log").join(d)),
    );
    writable.extend(
        words(&unit, "StateDirectory")
            .into_iter()
            .map(|d| Path::new("/var/lib").join(d)),
    );
    if !yes(&unit, "ProtectKernelTunables") {
        writable.push(PathBuf::from("/sys"));
    }
    let may_write = |p: &Path| !strict || writable.iter().any(|w| p.starts_with(w));
    let ebpf = cfg.ebpf.as_ref().expect("[ebpf]");
    assert!(
        ebpf.pin_dir.starts_with("/sys/fs/bpf/") && may_write(&ebpf.pin_dir),
        "pin_dir {} must be in bpffs and writable in the sandbox",
        ebpf.pin_dir.display()
    );
    assert!(
        values(&unit, "ExecStartPre")
            .iter()
            .any(|c| c.starts_with('+') && c.contains("mount -t bpf") && c.contains("/sys/fs/bpf")),
        "the host's bpffs must be mounted outside the unit's mount namespace, or the pins die \
         with the process"
    );
    match cfg.audit_target(None).expect("audit target") {
        AuditTarget::File(path) => assert!(
            may_write(path.parent().expect("a directory")),
            "audit file {} is not writable in the sandbox",
            path.display()
        ),
        AuditTarget::Stdout => {}
        AuditTarget::None => panic!("the deployment keeps an audit trail"),
    }
    if cfg.tls.generate_ca {
        assert!(
            may_write(&cfg.tls.ca_dir),
            "generate_ca writes into {}, which is read-only in the sandbox",
            cfg.tls.ca_dir.display()
        );
    }
    if let Some(timeout) = values(&unit, "TimeoutStopSec").last() {
        let secs: u64 = timeout
            .trim_end_matches('s')
            .parse()
            .expect("TimeoutStopSec in seconds");
        assert!(
            secs > cfg.limits.drain_timeout_secs,
            "TimeoutStopSec ({secs} s) cuts the drain ({} s) short",
            cfg.limits.drain_timeout_secs
        );
    }
}

/// The agent cgroup is the slice the unit requires, which systemd creates before it.
#[test]
fn unit_requires_the_slice_whose_cgroup_it_intercepts() {
    let cfg = config();
    let unit = unit("deploy/proxy/paddock-proxy.service");
    let ebpf = cfg.ebpf.as_ref().expect("[ebpf]");
    let slices: Vec<&str> = words(&unit, "Requires")
        .into_iter()
        .filter(|u| Path::new(u).extension().is_some_and(|e| e == "slice"))
        .collect();
    assert_eq!(slices.len(), 1, "the unit requires the agents' slice");
    let slice = slices[0];
    assert!(
        words(&unit, "After").contains(slice),
        "the unit must start after {slice}"
    );
    assert!(
        repo_root().join("deploy/proxy").join(slice).exists(),
        "deploy/proxy/{slice} is missing"
    );
    let cgroup = slice_cgroup(slice);
    assert_eq!(ebpf.agent_cgroups.len(), 1, "one agent cgroup: the slice");
    let agent = &ebpf.agent_cgroups[0];
    assert!(
        agent.starts_with("/sys/fs/cgroup") && agent.ends_with(&cgroup),
        "ebpf.agent_cgroups {} is not the cgroup of {slice} ({})",
        agent.display(),
        cgroup.display()
    );
    assert!(
        !values(&unit, "Slice").contains(&slice),
        "the proxy must not run in the slice it intercepts"
    );
}

/// A path on the host, moved under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").expect("absolute"))
}

/// `serve` starts from this configuration, minus the eBPF attachment (root only), once the
/// files it names exist: the CA loads, the broker client accepts its URL, CA and bearer, the
/// network settings and the audit file are usable.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_toml_starts_serve_without_ebpf() {
    let mut cfg = config();
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();

    let ca_dir = under(root, &cfg.tls.ca_dir);
    std::fs::create_dir_all(&ca_dir).expect("ca dir");
    let ca = RunCa::generate("deploy-test", Duration::from_hours(1)).expect("run CA");
    ca.write_to_dir(&ca_dir).expect("write CA");
    cfg.tls.ca_dir = ca_dir;

    let broker = cfg.broker.as_mut().expect("[broker]");
    let ca_file = under(root, &broker.ca_file);
    std::fs::create_dir_all(ca_file.parent().expect("dir")).expect("broker dir");
    std::fs::write(&ca_file, ca.cert_pem()).expect("broker CA");
    broker.ca_file = ca_file;
    if let Some(bearer) = broker.bearer_file.as_mut() {
        *bearer = under(root, bearer);
        std::fs::create_dir_all(bearer.parent().expect("dir")).expect("token dir");
        std::fs::write(&*bearer, "eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n").expect("token");
    }
    if let Some(target) = cfg.audit.target.as_mut()
        && target.starts_with('/')
    {
        let path = under(root, Path::new(target.as_str()));
        std::fs::create_dir_all(path.parent().expect("dir")).expect("audit dir");
        *target = path.display().to_string();
    }
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    for addr in &mut cfg.listen.transparent {
        *addr = loopback;
    }
    if let Some(admin) = cfg.admin.as_mut() {
        admin.listen = loopback;
    }
    if let Some(dns) = cfg.dns.as_mut() {
        for addr in &mut dns.listen {
            *addr = SocketAddr::new(addr.ip(), 0);
        }
    }
    cfg.ebpf = None;

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut opts = ServeOptions::new(cfg, None);
    opts.ready = Some(ready_tx);
    let ran = tokio::time::timeout(
        Duration::from_secs(30),
        serve_until(opts, async move {
            let _ = ready_rx.await;
        }),
    )
    .await
    .expect("serve stops after ready");
    ran.unwrap_or_else(|e| panic!("serve with deploy/proxy/proxy.toml: {e}"));
}
