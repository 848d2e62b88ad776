//! The `paddock-proxy` binary's operator commands: `check`, completions and man pages.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_paddock-proxy");

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn check_validates_a_serve_config_and_names_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(
        d.join("policy.toml"),
        "[[rule]]\nname = \"a\"\nhosts = [\"a.example\"]\nports = [443]\n",
    )
    .expect("policy");
    let config = d.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "run_id = \"c\"\n[listen]\ntransparent = [\"127.0.0.1:15001\"]\n[tls]\nca_dir = \"{ca}\"\ngenerate_ca = true\n[policy]\nfile = \"{p}\"\n[audit]\ntarget = \"stdout\"\n",
            ca = d.join("ca").display(),
            p = d.join("policy.toml").display()
        ),
    )
    .expect("config");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("policy: "), "{}", text(&out));
    assert!(!d.join("ca").exists(), "check generated a CA");

    std::fs::write(d.join("policy.toml"), "[[rule]]\nhosts = 3\n").expect("policy");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("policy.toml"), "{}", text(&out));

    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/proxy.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("/nonexistent/proxy.toml"),
        "{}",
        text(&out)
    );
}

#[test]
fn completions_and_man_pages_are_generated() {
    for shell in ["bash", "zsh"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .expect("run");
        assert!(out.status.success(), "{shell}: {}", text(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["paddock-proxy", "node-pods", "--quiet", "--output"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["man", "--out"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let page = std::fs::read_to_string(dir.path().join("paddock-proxy-run.1")).expect("run page");
    assert!(page.contains("quiet"), "{page}");
}
