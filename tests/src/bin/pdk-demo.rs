//! `cargo xtask demo`: Paddock end to end on this machine, with real curl and Python.
//!
//! A private HTTPS "API" (`api.paddock.test`) runs in its own network namespace and reports a
//! fingerprint of the credential it received. `paddock-proxy run` starts the broker, the proxy
//! and eBPF interception around a script that only ever sees placeholders; the API receives
//! the real key; a host the policy does not list gets a 403 with the reason; the audit trail
//! records both. Then an interactive run: a prompt sent with `paddock-broker prompt` reaches
//! an adapter inside the intercepted command, and its answer streams back to `paddock-broker
//! attach`.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use paddock_tests::{
    HostLink,
    echo_api::EchoApi,
    interactive::{ADAPTER_PY, wait_for_file},
    process::target_bin,
    proxied::{DnsResponder, make_upstream_certs},
};
use sha2::{Digest, Sha256};

const API_TOKEN: &str = "demo-real-api-token-1b7e";
const ANTHROPIC_KEY: &str = "sk-ant-demo-real-key-42c9";

const SCRIPT: &str = r#"
R="--resolve api.paddock.test:443:$DEMO_IP --resolve blocked.paddock.test:443:$DEMO_IP"
echo "  [agent] I am $(id -un); my environment holds:"
echo "  [agent]   API_TOKEN=$API_TOKEN"
echo "  [agent]   ANTHROPIC_API_KEY=$ANTHROPIC_API_KEY"
echo "  [agent] \$ curl https://api.paddock.test/v1/me -H 'Authorization: Bearer \$API_TOKEN'"
echo "  [agent]   -> $(curl -sS $R https://api.paddock.test/v1/me -H "Authorization: Bearer $API_TOKEN" 2>&1)"
echo "  [agent] \$ python3 (urllib): GET https://api.paddock.test/v1/messages with x-api-key"
python3 -c '
import os, socket, urllib.request
real = socket.getaddrinfo
socket.getaddrinfo = lambda h, *a, **k: real(os.environ["DEMO_IP"] if h.endswith("paddock.test") else h, *a, **k)
req = urllib.request.Request("https://api.paddock.test/v1/messages", headers={"x-api-key": os.environ["ANTHROPIC_API_KEY"]})
print("  [agent]   ->", urllib.request.urlopen(req, timeout=10).read().decode())' 2>&1
echo "  [agent] \$ curl https://blocked.paddock.test/   (not in the policy)"
echo "  [agent]   -> $(curl -sS $R https://blocked.paddock.test/ 2>&1)"
echo "  [agent] \$ cat the secrets directory"
echo "  [agent]   -> $(cat "$DEMO_SECRETS"/* 2>&1 | head -1)"
"#;

fn fingerprint(s: &str) -> String {
    let d = Sha256::digest(s.as_bytes());
    format!("sha256:{}", hex::encode(&d[..8]))
}

fn main() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo needs root: it creates namespaces and cgroups and loads eBPF programs");
    }
    let rt = tokio::runtime::Runtime::new()?;
    let _guard = rt.enter();
    println!("Paddock demo: an agent command that only ever sees placeholders\n");
    let link = HostLink::new();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    make_upstream_certs(d, &["api.paddock.test", "blocked.paddock.test"]);
    let zone = vec![
        ("api.paddock.test".to_owned(), link.host_ip.into()),
        ("blocked.paddock.test".to_owned(), link.host_ip.into()),
    ];
    let _dns = DnsResponder::start(&link.upstream, SocketAddr::from((link.host_ip, 53)), zone);
    let api = EchoApi::start(&link.upstream, d, SocketAddr::from((link.host_ip, 443)));
    println!(
        "1. A test HTTPS API, api.paddock.test ({}), runs in network namespace {}.",
        link.host_ip,
        link.upstream.name()
    );
    println!("   It answers with fingerprints of the credentials it receives.\n");

    let secrets = d.join("secrets");
    std::fs::create_dir(&secrets)?;
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700))?;
    for (name, value) in [("api-token", API_TOKEN), ("anthropic-key", ANTHROPIC_KEY)] {
        std::fs::write(secrets.join(name), value)?;
        std::fs::set_permissions(secrets.join(name), std::fs::Permissions::from_mode(0o600))?;
    }
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo-policy.yaml");
    println!(
        "2. Real secrets (root-only files): api-token {} and anthropic-key {}.",
        fingerprint(API_TOKEN),
        fingerprint(ANTHROPIC_KEY)
    );
    println!("   Policy: examples/demo-policy.yaml (api.paddock.test only).\n");

    let audit = d.join("audit.jsonl");
    let p = |x: &Path| x.to_string_lossy().into_owned();
    println!(
        "3. $ sudo paddock-proxy run --policy examples/demo-policy.yaml --secrets DIR -- sh demo.sh\n"
    );
    let status = Command::new(target_bin("paddock-proxy"))
        .args([
            "run",
            "--policy",
            &p(&policy),
            "--secrets",
            &p(&secrets),
            "--audit",
            &p(&audit),
        ])
        .args([
            "--allow-cidr",
            &format!("{}/24", link.host_ip),
            "--nameserver",
            &format!("{}:53", link.host_ip),
        ])
        .args([
            "--upstream-ca",
            &p(&d.join("test-ca.crt")),
            "--state-dir",
            &p(&d.join("state")),
        ])
        .args(["--", "sh", "-c", SCRIPT])
        .env("DEMO_IP", link.host_ip.to_string())
        .env("DEMO_SECRETS", &secrets)
        .env("RUST_LOG", "warn")
        .status()
        .context("starting paddock-proxy run")?;
    println!("\n   paddock-proxy run exited with the command's status: {status}\n");

    println!("4. What the API received (its own log, which the agent cannot read):");
    for r in api.requests() {
        let auth = r["authorization"].as_str().unwrap_or("");
        let key = r["x-api-key"].as_str().unwrap_or("");
        let got = if auth.is_empty() {
            ("x-api-key", key)
        } else {
            ("Authorization", auth.trim_start_matches("Bearer "))
        };
        let real = got.1 == API_TOKEN || got.1 == ANTHROPIC_KEY;
        println!(
            "   {} {}: {} {} (the real secret: {})",
            r["path"].as_str().unwrap_or("?"),
            got.0,
            fingerprint(got.1),
            if got.1.starts_with("pdk-") {
                "placeholder!"
            } else {
                ""
            },
            if real { "yes" } else { "NO" }
        );
    }
    println!("\n5. The proxy's audit trail (one JSON line per event, summarised here):");
    for line in std::fs::read_to_string(&audit).unwrap_or_default().lines() {
        println!("   {}", summarise(line));
    }
    interactive(d)?;
    println!("\nDone: the namespace, the cgroup, the eBPF programs and the run's keys are gone.");
    Ok(())
}

/// Step 6: an interactive run. The command is a small adapter; a person prompts it through
/// the broker and watches its answer stream back, then opens a shell in the run's sandbox,
/// with the `paddock-broker` CLI.
fn interactive(d: &Path) -> Result<()> {
    const RUN: &str = "demo-interactive";
    println!("\n6. An interactive run: the command is an adapter on its own loopback (port 8765).");
    println!(
        "   $ sudo paddock-proxy run --policy examples/demo-policy.yaml --adapter-port 8765 --shell -- python3 -c \"$ADAPTER\" 8765"
    );
    let p = |x: &Path| x.to_string_lossy().into_owned();
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo-policy.yaml");
    let state = d.join("state");
    let mut child = Command::new(target_bin("paddock-proxy"))
        .args([
            "run",
            "--policy",
            &p(&policy),
            "--secrets",
            &p(&d.join("secrets")),
        ])
        .args([
            "--adapter-port",
            "8765",
            "--shell",
            "--state-dir",
            &p(&state),
            "--run-id",
            RUN,
        ])
        // Inline: the command's /tmp (where the demo's files are) is private.
        .args(["--", "python3", "-c", ADAPTER_PY, "8765"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting paddock-proxy run")?;
    let result = drive(&state.join(RUN));
    // However the demo went, the run ends (`end` asked the adapter; this is the fallback).
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    result?;
    println!("   The adapter ended and paddock-proxy run exited: {status}");
    Ok(())
}

fn drive(run_state: &Path) -> Result<()> {
    let socket = run_state.join("interact.sock");
    wait_for_file(&socket, Duration::from_secs(30));
    let cli = |args: &[&str]| {
        let mut c = Command::new(target_bin("paddock-broker"));
        c.args(args).args([
            "--socket",
            &socket.to_string_lossy(),
            "--token-file",
            &run_state.join("interact.key").to_string_lossy(),
            "demo-interactive",
        ]);
        c
    };
    // Attach (retrying while the adapter starts), then prompt and read the streamed answer.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut attach = loop {
        let mut a = cli(&["attach"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(300));
        match a.try_wait()? {
            None => break a,
            Some(_) if Instant::now() < deadline => {}
            Some(status) => bail!("paddock-broker attach exited: {status}"),
        }
    };
    println!(
        "   $ sudo paddock-broker attach --socket <state>/interact.sock --token-file <state>/interact.key demo-interactive &"
    );
    let prompt = "summarise the audit trail";
    println!("   $ sudo paddock-broker prompt ... demo-interactive --text '{prompt}'");
    let out = cli(&["prompt", "--text", prompt]).output()?;
    print!("   {}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        let _ = attach.kill();
        bail!("prompt failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        attach.stdout.take().context("attach stdout")?,
    ));
    if let Some(line) = lines.next() {
        println!("   [attached] {}", line?);
    }
    // A shell in the run's sandbox: the run's user, its namespaces, its interception.
    println!(
        "   $ echo 'echo \"uid $(id -u), pid $$\"; exit' | sudo paddock-broker shell ... demo-interactive"
    );
    let mut shell = cli(&["shell"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(
        &mut shell.stdin.take().context("shell stdin")?,
        b"echo \"uid $(id -u), pid $$\"; exit\n",
    )?;
    let out = shell.wait_with_output()?;
    if !out.status.success() {
        let _ = attach.kill();
        bail!("shell failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("uid "))
    {
        println!("   [shell] {line}");
    }
    println!("   $ sudo paddock-broker end ... demo-interactive");
    let out = cli(&["end"]).output()?;
    if !out.status.success() {
        bail!("end failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let _ = attach.wait();
    Ok(())
}

/// One audit line as a newcomer reads it: what happened, to which host, and why.
fn summarise(line: &str) -> String {
    let Ok(ev) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_owned();
    };
    let text = |k: &str| ev[k].as_str().unwrap_or("-").to_owned();
    let host = format!("{}:{}", text("sni"), ev["port"]);
    match ev["kind"].as_str() {
        Some("request") => {
            let credential = ev["credential"]
                .as_str()
                .map_or_else(String::new, |c| format!(", credential {c} substituted"));
            format!(
                "request  {host} {} {} -> {} {}{credential}",
                text("method"),
                text("path"),
                ev["status"],
                text("outcome"),
            )
        }
        Some("allow") => format!("allow    {host} (connection; rule {})", text("rule")),
        Some("deny") => format!("deny     {host} (connection): {}", text("reason")),
        Some(kind) => format!("{kind:<8} {host} {}", text("reason")),
        None => line.to_owned(),
    }
}
