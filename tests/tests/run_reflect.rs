//! Root tier, attacker's view of two findings against `paddock-proxy run`:
//!
//! 1. **Secret sent in cleartext**: with an egress rule for ports 443 and 80 and
//!    `substituteAuth`, a placeholder sent over plain HTTP used to make the upstream receive the
//!    real secret over plain TCP. Shown possible where a policy explicitly allows it
//!    (`allowCleartext`, the control), and refused (403 `tls_required`, audited, nothing
//!    reaches the upstream) for every other credential, in a header and in the query.
//! 2. **Reflected secret**: an allowed credential host that echoes what it was sent handed the
//!    agent the real value. The upstream here really does reflect it (its own log of what it
//!    answered holds the secret: the attack), in a JSON echo, response headers, base64, a gzip
//!    body it compresses regardless, a later response to a request without a placeholder, a
//!    server-sent-event stream that splits the secret across writes, and a byte range; the
//!    agent sees only its placeholder, and each scrub is audited.

use std::{net::SocketAddr, path::Path, process::Command};

use base64::Engine as _;
use paddock_tests::{
    HostLink,
    files::{audit_records, write_secrets},
    process::{Placement, run, target_bin},
    proxied::{DnsResponder, make_upstream_certs},
    reflect_api::ReflectApi,
    require_root,
};

const BEARER: &str = "real-reflect-bearer-6b1f0c2e9a";
const API_KEY: &str = "sk-ant-real-reflect-03d9e7f1";
const QUERY_KEY: &str = "real-reflect-query-5c5e2a70";
const LEGACY: &str = "real-legacy-cleartext-88aa31";
const SECRETS: [(&str, &str); 4] = [
    ("bearer.txt", BEARER),
    ("apikey.txt", API_KEY),
    ("qkey.txt", QUERY_KEY),
    ("legacy.txt", LEGACY),
];

const POLICY: &str = r#"
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: reflect}
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
      provider: {kind: user-secret, inject: {query: {param: key}}}
      secret: {file: qkey.txt}
      hosts: [api.paddock.test]
      env: MAPS_KEY
    - name: legacy
      provider: {kind: user-secret, inject: {header: {name: X-Token}}}
      secret: {file: legacy.txt}
      hosts: [legacy.paddock.test]
      env: LEGACY_TOKEN
      allowCleartext: true
  egress:
    - {hosts: [api.paddock.test], ports: [443, 80], substituteAuth: true}
    - {hosts: [legacy.paddock.test], ports: [80], substituteAuth: true}
"#;

const AGENT: &str = r#"
exec 2>&1
R="--max-time 20 --resolve api.paddock.test:443:$E2E_IP --resolve api.paddock.test:80:$E2E_IP --resolve legacy.paddock.test:80:$E2E_IP"
A=https://api.paddock.test
B="Authorization: Bearer $API_BEARER"
echo "== cleartext header"; curl -sS -i $R http://api.paddock.test/anything -H "$B"; echo
echo "== cleartext query"; curl -sS -i $R "http://api.paddock.test/anything?key=$MAPS_KEY"; echo
echo "== cleartext allowed"; curl -sS $R http://legacy.paddock.test/anything -H "X-Token: $LEGACY_TOKEN"; echo
echo "== reflect"; curl -sS -i $R "$A/anything" -H "$B"; echo
echo "== reflect query"; curl -sS -i $R "$A/anything?key=$MAPS_KEY"; echo
echo "== reflect key"; curl -sS -i $R $A/anything -H "x-api-key: $ANTHROPIC_API_KEY"; echo
echo "== b64"; curl -sS $R $A/b64 -H "$B"; echo
echo "== b64 decoded"; curl -sS $R $A/b64 -H "$B" | base64 -d; echo
echo "== gzip"; curl -sS --compressed $R $A/gzip -H "$B"; echo
echo "== stored"; curl -sS $R $A/stored; echo
echo "== sse"; curl -sS -N $R $A/sse -H "$B"; echo
echo "== range"; curl -sS -i -r 0-200 $R $A/anything -H "$B"; echo
echo "== end"
"#;

/// The text between `== name` and the next `== ` marker.
fn section<'a>(out: &'a str, name: &str) -> &'a str {
    let start = out
        .find(&format!("== {name}\n"))
        .unwrap_or_else(|| panic!("no section {name}:\n{out}"));
    let rest = &out[start + name.len() + 4..];
    &rest[..rest.find("\n== ").unwrap_or(rest.len())]
}

/// Every form the scrubber must have caught, for every secret.
fn forms_of(secret: &str) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    vec![
        secret.to_owned(),
        hex::encode(secret),
        // The bearer as the upstream base64-encodes the whole header value.
        b64.encode(secret),
        b64.encode(format!("Bearer {secret}"))[12..30].to_owned(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_substitution_is_refused_and_reflected_secrets_never_reach_the_agent() {
    if !require_root(
        "cleartext_substitution_is_refused_and_reflected_secrets_never_reach_the_agent",
    ) {
        return;
    }
    let link = HostLink::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    make_upstream_certs(d, &["api.paddock.test", "legacy.paddock.test"]);
    let zone = vec![
        ("api.paddock.test".to_owned(), link.host_ip.into()),
        ("legacy.paddock.test".to_owned(), link.host_ip.into()),
    ];
    let _dns = DnsResponder::start(&link.upstream, SocketAddr::from((link.host_ip, 53)), zone);
    let api = ReflectApi::start(&link.upstream, d, SocketAddr::from((link.host_ip, 443)), 80);
    let secrets = d.join("secrets");
    write_secrets(&secrets, &SECRETS);
    std::fs::write(d.join("policy.yaml"), POLICY).expect("policy");
    let audit = d.join("proxy-audit.jsonl");
    let path = |p: &Path| p.to_str().expect("utf-8").to_owned();

    let mut cmd = Command::new(target_bin("paddock-proxy"));
    cmd.args(["run", "--policy", &path(&d.join("policy.yaml"))])
        .args(["--secrets", &path(&secrets)])
        .args(["--allow-cidr", &format!("{}/24", link.host_ip)])
        .args(["--nameserver", &format!("{}:53", link.host_ip)])
        .args(["--upstream-ca", &path(&d.join("test-ca.crt"))])
        .args(["--audit", &path(&audit)])
        .args(["--state-dir", &path(&d.join("state"))])
        .args(["--run-id", "reflect-run", "--", "sh", "-c", AGENT])
        .env("E2E_IP", link.host_ip.to_string())
        .env("RUST_LOG", "warn");
    let out = tokio::task::block_in_place(|| run(&mut cmd, &Placement::default()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("== end"),
        "the agent script ran to the end\n{stdout}\n{stderr}"
    );
    let seen = api.requests();
    check_cleartext(&seen, &stdout);
    check_reflection(&seen, &stdout);
    check_audit(&std::fs::read_to_string(&audit).expect("audit log"));
}

fn check_cleartext(seen: &[serde_json::Value], stdout: &str) {
    // 1. Cleartext. The control: a credential that allows it does reach the upstream over
    //    plain TCP, so the path the finding used exists.
    assert!(
        seen.iter().any(|r| r["tls"] == false
            && r["host"].as_str().is_some_and(|h| h.starts_with("legacy"))
            && r["x-token"] == LEGACY),
        "allowCleartext credential delivered over plain HTTP: {seen:?}\n{stdout}"
    );
    for name in ["cleartext header", "cleartext query"] {
        let s = section(stdout, name);
        assert!(s.contains("403"), "{name}: {s}");
        assert!(s.contains("x-paddock-denied: tls_required"), "{name}: {s}");
        assert!(s.contains("only be sent over TLS"), "{name}: {s}");
    }
    assert!(
        !seen
            .iter()
            .any(|r| r["tls"] == false && r["host"].as_str().is_some_and(|h| h.starts_with("api"))),
        "nothing reached api.paddock.test over plain HTTP: {seen:?}"
    );
}

fn check_reflection(seen: &[serde_json::Value], stdout: &str) {
    // 2. Reflection. The upstream did send the secrets back (the attack)...
    let sent = |path: &str| -> String {
        seen.iter()
            .filter(|r| r["path"] == path)
            .map(|r| r["sent"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert!(sent("/anything").contains(BEARER), "{seen:?}");
    assert!(sent("/anything").contains(API_KEY));
    assert!(sent("/anything").contains(QUERY_KEY));
    assert!(sent("/stored").contains(BEARER));
    assert!(sent("/sse").contains(BEARER));
    assert!(
        sent("/b64").contains(
            &base64::engine::general_purpose::STANDARD.encode(format!("Bearer {BEARER}"))
        )
    );
    // ...and was asked for whole, uncompressed answers.
    for r in seen.iter().filter(|r| r["tls"] == true) {
        assert_eq!(r["accept-encoding"], "identity", "{r}");
        assert!(r["range"].is_null(), "{r}");
    }
    // ...but the agent saw its placeholders only.
    for (name, secret) in SECRETS {
        for form in forms_of(secret) {
            assert!(
                !stdout.contains(&form),
                "the agent saw {name} (as {form}):\n{stdout}"
            );
        }
    }
    let reflect = section(stdout, "reflect");
    assert!(
        reflect.contains("x-echo-authorization: Bearer pdk-"),
        "{reflect}"
    );
    assert!(
        section(stdout, "reflect query").contains("\"args\": \"key=pdk-"),
        "{stdout}"
    );
    assert!(
        section(stdout, "reflect key").contains("x-echo-api-key: pdk-"),
        "{stdout}"
    );
    assert!(section(stdout, "b64 decoded").contains("pdk-"), "{stdout}");
    assert!(section(stdout, "gzip").contains("Bearer pdk-"), "{stdout}");
    assert!(
        section(stdout, "stored").contains("Bearer pdk-"),
        "{stdout}"
    );
    let sse = section(stdout, "sse");
    assert!(
        sse.contains("data: start") && sse.contains("data: Bearer pdk-"),
        "{sse}"
    );
    let range = section(stdout, "range");
    assert!(
        range.contains("200 OK") && range.contains("pdk-"),
        "{range}"
    );
    assert!(
        section(stdout, "cleartext allowed").contains("pdk-"),
        "a cleartext answer is scrubbed too: {stdout}"
    );
}

/// The audit trail: the refusals and the scrubs, and no secret anywhere.
fn check_audit(trail: &str) {
    let records = audit_records(trail);
    let refused = records
        .iter()
        .filter(|r| {
            r["kind"] == "request"
                && r["outcome"] == "denied"
                && r["reason"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("tls_required"))
        })
        .count();
    assert_eq!(refused, 2, "{trail}");
    let scrubbed: Vec<_> = records.iter().filter(|r| r["kind"] == "scrubbed").collect();
    for path in ["/anything", "/b64", "/gzip", "/stored", "/sse"] {
        assert!(
            scrubbed.iter().any(|r| r["path"] == path),
            "a scrubbed record for {path}: {trail}"
        );
    }
    for (name, secret) in SECRETS {
        assert!(!trail.contains(secret), "the audit trail holds {name}");
    }
}
