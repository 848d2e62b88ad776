//! Root tier, end to end over HTTP/2: `paddock-proxy run` (embedded broker, transparent proxy,
//! eBPF) around curl speaking h2 to an nginx API that negotiates h2 too, so both hops (agent to
//! proxy, proxy to upstream) are HTTP/2. Placeholders sit in `Authorization: Bearer`, in
//! `x-api-key` and in a query parameter, on several requests over one agent connection
//! (sequential and multiplexed), next to 1 MiB request bodies with and without a length.
//! Upstream must receive the real secrets and intact bodies, over HTTP/2; nothing the agent
//! can read may hold a secret.

use std::{net::SocketAddr, path::Path, process::Command};

use paddock_tests::{
    HostLink,
    files::{audit_records, write_secrets},
    h2_api::{H2Api, Seen},
    process::{Placement, run, target_bin},
    proxied::{DnsResponder, make_upstream_certs},
    require_root,
};
use sha2::Digest;

const BEARER: &str = "real-h2-bearer-41c9d7e0";
const API_KEY: &str = "sk-ant-real-h2-8d02b5f3";
const QUERY_KEY: &str = "real-h2-query-key-77aa10";
const SECRETS: [(&str, &str); 3] = [
    ("bearer.txt", BEARER),
    ("apikey.txt", API_KEY),
    ("qkey.txt", QUERY_KEY),
];
/// Size of each upload.
const BODY_LEN: usize = 1 << 20;

const POLICY: &str = r#"
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: h2}
spec:
  appliesTo: {namespaces: [local]}
  credentials:
    - name: bearer
      provider: {kind: user-secret, inject: {header: {name: Authorization, prefix: "Bearer "}}}
      secret: {file: bearer.txt}
      hosts: [api.paddock.test]
      env: API_BEARER
    - name: apikey
      provider: {kind: anthropic-api-key}
      secret: {file: apikey.txt}
      hosts: [api.paddock.test]
      env: ANTHROPIC_API_KEY
    - name: qkey
      provider: {kind: user-secret, inject: {query: {param: key}}, allowedQuery: [q, key]}
      secret: {file: qkey.txt}
      hosts: [api.paddock.test]
      env: MAPS_KEY
  egress:
    - {hosts: [api.paddock.test], ports: [443], substituteAuth: true}
"#;

/// Every transfer prints `== w <http_version> <num_connects> <status>`. Each batch is one
/// curl invocation (`--next` starts the next transfer's own options), so its transfers share a
/// connection; a request carries one placeholder, as the broker requires.
const AGENT: &str = r#"
exec 2>&1
C="-sS --no-progress-meter --http2 --max-time 60 --resolve api.paddock.test:443:$E2E_IP"
W='\n== w %{http_version} %{num_connects} %{response_code}\n'
A="https://api.paddock.test"
B="Authorization: Bearer $API_BEARER"
K="x-api-key: $ANTHROPIC_API_KEY"
echo "== env"; env
echo "== sequential"
curl $C -w "$W" -H "$B" "$A/seq/1?q=1" \
  --next $C -w "$W" -H "$K" "$A/seq/2?q=2" \
  --next $C -w "$W" -H "$B" -H "$K" "$A/seq/3?q=3" \
  --next $C -w "$W" "$A/seq/4?q=4&key=$MAPS_KEY" \
  --next $C -w "$W" -H "$B" "$A/seq/5?q=5"
echo "== parallel"
curl --parallel --parallel-max 4 $C -w "$W" -H "$B" "$A/par/1?q=1" \
  --next $C -w "$W" -H "$K" "$A/par/2?q=2" \
  --next $C -w "$W" "$A/par/3?q=3&key=$MAPS_KEY" \
  --next $C -w "$W" -H "$B" "$A/par/4?q=4"
echo "== upload"
f=$(mktemp)
head -c 1048576 /dev/urandom > "$f"
echo "sent sha256 $(sha256sum < "$f" | cut -d' ' -f1)"
curl $C -w "$W" -H "$B" -H "content-type: application/octet-stream" \
  --data-binary @"$f" "$A/upload/post"
# From a pipe: no content-length, the body streams in DATA frames of unknown total.
cat "$f" | curl $C -w "$W" -T - "$A/upload/put?key=$MAPS_KEY"
rm -f "$f"
echo "== done"
exit 7
"#;

/// Where a request carries its placeholder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cred {
    Bearer,
    ApiKey,
    Query,
    /// Two placeholders: the broker refuses, the proxy answers 403, upstream never sees it.
    Two,
}

/// The sequential batch, in order: (number, credential).
const SEQUENTIAL: [(usize, Cred); 5] = [
    (1, Cred::Bearer),
    (2, Cred::ApiKey),
    (3, Cred::Two),
    (4, Cred::Query),
    (5, Cred::Bearer),
];
/// The parallel batch (multiplexed on one connection; completion order varies).
const PARALLEL: [(usize, Cred); 4] = [
    (1, Cred::Bearer),
    (2, Cred::ApiKey),
    (3, Cred::Query),
    (4, Cred::Bearer),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_substitutes_over_http2_end_to_end() {
    if !require_root("run_substitutes_over_http2_end_to_end") {
        return;
    }
    let link = HostLink::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    make_upstream_certs(d, &["api.paddock.test"]);
    let _dns = DnsResponder::start(
        &link.upstream,
        SocketAddr::from((link.host_ip, 53)),
        vec![("api.paddock.test".to_owned(), link.host_ip.into())],
    );
    let api = H2Api::start(&link.upstream, d, SocketAddr::from((link.host_ip, 443)));
    let secrets = d.join("secrets");
    write_secrets(&secrets, &SECRETS);
    std::fs::write(d.join("policy.yaml"), POLICY).expect("policy");
    let path = |p: &Path| p.to_str().expect("utf-8").to_owned();

    let mut cmd = Command::new(target_bin("paddock-proxy"));
    cmd.args(["run", "--policy", &path(&d.join("policy.yaml"))])
        .args(["--secrets", &path(&secrets)])
        .args(["--allow-cidr", &format!("{}/24", link.host_ip)])
        .args(["--nameserver", &format!("{}:53", link.host_ip)])
        .args(["--upstream-ca", &path(&d.join("test-ca.crt"))])
        .args(["--audit", &path(&d.join("proxy-audit.jsonl"))])
        .args(["--state-dir", &path(&d.join("state")), "--run-id", "h2-run"])
        .args(["--", "sh", "-c", AGENT])
        .env("E2E_IP", link.host_ip.to_string())
        .env("RUST_LOG", "warn");
    let out = tokio::task::block_in_place(|| run(&mut cmd, &Placement::default()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(7),
        "the command's exit code comes back\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("== done"), "{stdout}\n{stderr}");

    check_agent_view(&stdout);
    let seen = api.requests();
    let context = format!("{seen:#?}\n{stdout}\n{stderr}");
    check_upstream_credentials(&seen, &context);
    check_uploads(&seen, &stdout, &context);
    // Nothing else reached upstream: no retried or duplicated request, no refused one.
    let forwarded = SEQUENTIAL
        .iter()
        .chain(&PARALLEL)
        .filter(|(_, c)| *c != Cred::Two)
        .count();
    assert_eq!(seen.len(), forwarded + 2, "{context}");
    check_request_audit(&d.join("proxy-audit.jsonl"), forwarded + 2);
}

/// One request record per request, all HTTP/2; the refused one says why.
fn check_request_audit(path: &Path, forwarded: usize) {
    let trail = std::fs::read_to_string(path).expect("audit log");
    let records: Vec<serde_json::Value> = audit_records(&trail)
        .into_iter()
        .filter(|r| r["kind"] == "request")
        .collect();
    let count = |outcome: &str| records.iter().filter(|r| r["outcome"] == outcome).count();
    assert_eq!(count("forwarded"), forwarded, "{trail}");
    assert_eq!(count("denied"), 1, "{trail}");
    assert_eq!(records.len(), forwarded + 1, "{trail}");
    assert!(records.iter().all(|r| r["protocol"] == "HTTP/2"), "{trail}");
    let refused = records
        .iter()
        .find(|r| r["outcome"] == "denied")
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(
        refused.contains("/seq/3") && refused.contains("403"),
        "{refused}"
    );
    assert!(!trail.contains("pdk-") && !trail.contains("q=3"), "{trail}");
}

/// The fields of the `== w` lines curl printed in the section that starts with
/// `== {section}` (it ends at the next `== ` line that is not a `== w` line).
fn transfers<'a>(stdout: &'a str, section: &str) -> Vec<Vec<&'a str>> {
    let header = format!("== {section}");
    let mut lines = stdout.lines().skip_while(|l| *l != header);
    assert!(lines.next().is_some(), "no section {section}: {stdout}");
    lines
        .filter(|l| l.starts_with("== "))
        .map_while(|l| l.strip_prefix("== w "))
        .map(|l| l.split(' ').collect())
        .collect()
}

/// The agent negotiated h2 on every transfer, each batch ran on one connection, the request
/// with two placeholders was refused without breaking its connection, upstream's answers
/// reached the agent, and it never held a real secret.
fn check_agent_view(stdout: &str) {
    for (section, batch) in [("sequential", &SEQUENTIAL[..]), ("parallel", &PARALLEL[..])] {
        let t = transfers(stdout, section);
        assert_eq!(
            t.len(),
            batch.len(),
            "{section}: one line per transfer: {stdout}"
        );
        assert!(
            t.iter().all(|f| f.first() == Some(&"2")),
            "{section}: the agent must speak HTTP/2: {stdout}"
        );
        let connects: u32 = t
            .iter()
            .map(|f| f.get(1).and_then(|n| n.parse::<u32>().ok()).unwrap_or(99))
            .sum();
        assert_eq!(
            connects, 1,
            "{section}: the batch must share one agent connection: {stdout}"
        );
        // Sequential transfers report in order; parallel ones as they complete.
        let mut got: Vec<&str> = t.iter().map(|f| f.get(2).copied().unwrap_or("")).collect();
        let mut want: Vec<&str> = batch
            .iter()
            .map(|(_, c)| if *c == Cred::Two { "403" } else { "200" })
            .collect();
        if section == "parallel" {
            got.sort_unstable();
            want.sort_unstable();
        }
        assert_eq!(got, want, "{section}: statuses: {stdout}");
    }
    assert!(
        stdout.contains("more than one distinct placeholder"),
        "the refusal says why: {stdout}"
    );
    let uploads = transfers(stdout, "upload");
    assert_eq!(uploads.len(), 2, "{stdout}");
    assert!(
        uploads
            .iter()
            .all(|f| f.first() == Some(&"2") && f.get(2) == Some(&"200")),
        "uploads accepted over HTTP/2: {stdout}"
    );
    assert_eq!(
        stdout.matches(&format!("stored {BODY_LEN} bytes")).count(),
        2,
        "both uploads reached the sink whole: {stdout}"
    );
    // Upstream's own view of the protocol travelled back on every forwarded GET.
    let forwarded = SEQUENTIAL
        .iter()
        .chain(&PARALLEL)
        .filter(|(_, c)| *c != Cred::Two)
        .count();
    assert_eq!(
        stdout.matches("proto=HTTP/2.0 path=/").count(),
        forwarded,
        "{stdout}"
    );
    for var in ["API_BEARER", "ANTHROPIC_API_KEY", "MAPS_KEY"] {
        assert!(
            stdout.contains(&format!("{var}=pdk-")),
            "{var} must hold a placeholder: {stdout}"
        );
    }
    for (name, secret) in SECRETS {
        assert!(
            !stdout.contains(secret),
            "the agent saw the real {name}:\n{stdout}"
        );
    }
}

/// Every forwarded GET reached upstream over HTTP/2 with the real secret where the agent put
/// its placeholder (and nothing in the other positions), each batch on one upstream
/// connection; no placeholder ever reached upstream.
fn check_upstream_credentials(seen: &[Seen], context: &str) {
    assert!(
        seen.iter().all(|s| s.proto == "HTTP/2.0"),
        "the proxy's upstream hop must be HTTP/2: {context}"
    );
    assert!(
        seen.iter().all(|s| !format!("{s:?}").contains("pdk-")),
        "a placeholder reached upstream: {context}"
    );
    for (prefix, batch) in [("/seq/", &SEQUENTIAL[..]), ("/par/", &PARALLEL[..])] {
        // The pool multiplexes one agent connection's streams onto one upstream h2 connection.
        let mut conns: Vec<&str> = seen
            .iter()
            .filter(|s| s.path.starts_with(prefix))
            .map(|s| s.connection.as_str())
            .collect();
        conns.dedup();
        assert_eq!(
            conns.len(),
            1,
            "{prefix}: one upstream connection: {context}"
        );
        for (n, cred) in batch {
            let path = format!("{prefix}{n}");
            let hits: Vec<&Seen> = seen.iter().filter(|s| s.path == path).collect();
            if *cred == Cred::Two {
                assert!(hits.is_empty(), "{path} must not be forwarded: {context}");
                continue;
            }
            let [s] = hits.as_slice() else {
                panic!("{path}: expected one request upstream: {context}");
            };
            assert_eq!((s.method.as_str(), s.status.as_str()), ("GET", "200"));
            assert_eq!(
                s.query("q"),
                Some(n.to_string().as_str()),
                "other parameters are kept: {context}"
            );
            let bearer = format!("Bearer {BEARER}");
            let want = match cred {
                Cred::Bearer => (bearer.as_str(), "", None),
                Cred::ApiKey => ("", API_KEY, None),
                _ => ("", "", Some(QUERY_KEY)),
            };
            assert_eq!(
                (
                    s.authorization.as_str(),
                    s.x_api_key.as_str(),
                    s.query("key")
                ),
                want,
                "{path}: {context}"
            );
        }
    }
}

/// Both 1 MiB bodies (with a content-length and streamed without one) reached upstream byte
/// for byte, over HTTP/2, with their credentials substituted.
fn check_uploads(seen: &[Seen], stdout: &str, context: &str) {
    let sent = stdout
        .lines()
        .find_map(|l| l.strip_prefix("sent sha256 "))
        .unwrap_or_else(|| panic!("the agent printed no hash: {stdout}"));
    for (path, method) in [("/upload/post", "POST"), ("/upload/put", "PUT")] {
        let s = seen
            .iter()
            .find(|s| s.path == path)
            .unwrap_or_else(|| panic!("no request to {path}: {context}"));
        assert_eq!((s.method.as_str(), s.status.as_str()), (method, "200"));
        assert!(!s.body_file.is_empty(), "{path}: no body kept: {context}");
        let body = std::fs::read(&s.body_file)
            .unwrap_or_else(|e| panic!("{path}: read {}: {e}", s.body_file));
        assert_eq!(body.len(), BODY_LEN, "{path}: body length: {context}");
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&body)),
            sent,
            "{path}: the body must arrive intact"
        );
        let want = if method == "POST" {
            (format!("Bearer {BEARER}"), None)
        } else {
            (String::new(), Some(QUERY_KEY))
        };
        assert_eq!(
            (s.authorization.clone(), s.query("key")),
            want,
            "{path}: {context}"
        );
    }
}
