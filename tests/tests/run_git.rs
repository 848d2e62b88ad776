//! Root tier, end to end: `git clone` over HTTPS through `paddock-proxy run`. git sends its
//! credentials base64-encoded inside `Authorization: Basic` after the server's 401 challenge;
//! the proxy must find the placeholder there and the server must see the real password.

use std::{net::SocketAddr, path::Path, process::Command};

use paddock_tests::{
    HostLink,
    files::write_secrets,
    git_server::GitServer,
    process::{Placement, run, target_bin},
    proxied::{DnsResponder, make_upstream_certs},
    require_root,
};

const PASSWORD: &str = "real-git-token-5e1d2c";
const README: &str = "cloned through paddock\n";

const POLICY: &str = r"
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: git}
spec:
  appliesTo: {namespaces: [local]}
  credentials:
    - name: git
      provider: {kind: user-secret, inject: {basic: {username: git}}}
      secret: {file: git-token}
      hosts: [git.paddock.test]
      env: GIT_TOKEN
  egress:
    - {hosts: [git.paddock.test], ports: [443], substituteAuth: true}
";

const AGENT: &str = r#"
exec 2>&1
dest=$(mktemp -d)
git -c http.curloptResolve="git.paddock.test:443:$E2E_IP" clone -q "https://git:$GIT_TOKEN@git.paddock.test/demo.git" "$dest/demo" && echo "clone ok" && cat "$dest/demo/README"
git -C "$dest/demo" config --get remote.origin.url
rm -rf "$dest"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clone_over_https_gets_the_real_basic_credential() {
    if !require_root("git_clone_over_https_gets_the_real_basic_credential") {
        return;
    }
    let link = HostLink::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    make_upstream_certs(d, &["git.paddock.test"]);
    GitServer::create_repo(d, "demo", README);
    let _dns = DnsResponder::start(
        &link.upstream,
        SocketAddr::from((link.host_ip, 53)),
        vec![("git.paddock.test".to_owned(), link.host_ip.into())],
    );
    let server = GitServer::start(
        &link.upstream,
        d,
        SocketAddr::from((link.host_ip, 443)),
        PASSWORD,
    );
    let secrets = d.join("secrets");
    write_secrets(&secrets, &[("git-token", PASSWORD)]);
    std::fs::write(d.join("policy.yaml"), POLICY).expect("policy");
    let path = |p: &Path| p.to_str().expect("utf-8").to_owned();

    let mut cmd = Command::new(target_bin("paddock-proxy"));
    cmd.args([
        "run",
        "--policy",
        &path(&d.join("policy.yaml")),
        "--secrets",
        &path(&secrets),
    ])
    .args(["--allow-cidr", &format!("{}/24", link.host_ip)])
    .args(["--nameserver", &format!("{}:53", link.host_ip)])
    .args([
        "--upstream-ca",
        &path(&d.join("test-ca.crt")),
        "--state-dir",
        &path(&d.join("state")),
    ])
    .args(["--", "sh", "-c", AGENT])
    .env("E2E_IP", link.host_ip.to_string())
    .env("RUST_LOG", "warn");
    let out = tokio::task::block_in_place(|| run(&mut cmd, &Placement::default()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("clone ok") && stdout.contains(README.trim()),
        "{stdout}\n{stderr}"
    );
    // git stored the URL with the placeholder it was given, never the real password.
    assert!(stdout.contains("https://git:pdk-user-secret-"), "{stdout}");
    assert!(
        !stdout.contains(PASSWORD),
        "the agent saw the real password:\n{stdout}"
    );

    let seen = server.auth_log();
    assert!(
        seen.iter().any(|u| u == &format!("git:{PASSWORD}")),
        "server never got the real credential: {seen:?}"
    );
    assert!(
        seen.iter().all(|u| !u.contains("pdk-")),
        "a placeholder reached the server: {seen:?}"
    );
}
