use std::path::{Path, PathBuf};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::*;
use crate::{
    secrets::SecretSource,
    wire::{RunInfo, RunPhase},
};

const GOOD: &str = "\
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata:
  name: team-a
spec:
  appliesTo:
    namespaces: [team-a]
    templates: [coder]
  credentials:
    - name: gh
      provider:
        kind: user-secret
        inject:
          header:
            name: Authorization
            prefix: \"Bearer \"
      secret:
        env: GH_TOKEN
      hosts: [api.github.com]
  egress:
    - hosts: [\"*.github.com\", api.github.com]
      ports: [443]
      substituteAuth: true
    - hosts: [pypi.org]
      ports: [443]
";

fn run(ns: &str, template: &str) -> RunInfo {
    RunInfo {
        run: "r1".into(),
        namespace: ns.into(),
        template: template.into(),
        phase: RunPhase::Running,
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

#[test]
fn parses_and_decides() {
    let docs = Policy::parse_text(Path::new("p.yaml"), GOOD, now()).expect("valid");
    let policy = Policy::from_docs(docs).expect("valid set");
    let r = run("team-a", "coder");
    assert!(policy.credential_for(&r, "gh").is_some());
    assert!(
        policy
            .credential_for(&run("team-b", "coder"), "gh")
            .is_none()
    );
    assert!(
        policy
            .credential_for(&run("team-a", "other"), "gh")
            .is_none()
    );
    let d = policy.egress(&r, "api.github.com", 443, now());
    assert!(d.allowed() && d.substitute_auth() && !d.discovery());
    let d = policy.egress(&r, "pypi.org", 443, now());
    assert!(d.allowed() && !d.substitute_auth());
    let d = policy.egress(&r, "pypi.org", 80, now());
    assert!(!d.allowed(), "port must match too");
    assert!(
        !policy
            .egress(&run("team-b", "coder"), "pypi.org", 443, now())
            .allowed()
    );
}

#[test]
fn a_name_is_allowed_when_any_port_of_it_is() {
    let docs = Policy::parse_text(Path::new("p.yaml"), GOOD, now()).expect("valid");
    let policy = Policy::from_docs(docs).expect("valid set");
    let r = run("team-a", "coder");
    let d = policy.egress_on(&r, "pypi.org", None, now());
    assert!(d.allowed() && !d.discovery(), "{d:?}");
    assert_eq!(d.policy(), Some("team-a"));
    let d = policy.egress_on(&r, "PyPI.org.", None, now());
    assert!(d.allowed(), "names are normalised: {d:?}");
    // The wildcard covers subdomains of any depth, not the apex (which has its own grant).
    assert!(
        policy
            .egress_on(&r, "a.b.github.com", None, now())
            .allowed()
    );
    assert!(!policy.egress_on(&r, "github.com", None, now()).allowed());
    let d = policy.egress_on(&r, "exfil.example", None, now());
    assert!(!d.allowed() && !d.discovery());
    assert!(
        d.reason().contains("exfil.example (any port)"),
        "{}",
        d.reason()
    );
    // Another team's run reaches nothing.
    assert!(
        !policy
            .egress_on(&run("team-b", "coder"), "pypi.org", None, now())
            .allowed()
    );
    // With a port it is the connection question, unchanged.
    assert_eq!(
        policy.egress_on(&r, "pypi.org", Some(80), now()),
        policy.egress(&r, "pypi.org", 80, now())
    );
    assert!(!policy.egress_on(&r, "pypi.org", Some(80), now()).allowed());
}

#[test]
fn a_discovery_window_allows_names_as_it_allows_connections() {
    let until = (now() + time::Duration::days(1))
        .format(&Rfc3339)
        .expect("format");
    let text = format!("{GOOD}  discovery:\n    until: \"{until}\"\n");
    let docs = Policy::parse_text(Path::new("p.yaml"), &text, now()).expect("valid");
    let policy = Policy::from_docs(docs).expect("set");
    let d = policy.egress_on(&run("team-a", "coder"), "anything.example", None, now());
    assert!(d.allowed() && d.discovery(), "{d:?}");
    // A listed name is allowed outright, not by the window.
    let d = policy.egress_on(&run("team-a", "coder"), "pypi.org", None, now());
    assert!(d.allowed() && !d.discovery(), "{d:?}");
}

fn err_of(text: &str) -> PolicyError {
    Policy::parse_text(Path::new("bad.yaml"), text, now()).expect_err("must be rejected")
}

#[test]
fn unknown_field_names_file_line_and_field() {
    let text = GOOD.replace(
        "      hosts: [api.github.com]\n",
        "      hosts: [api.github.com]\n      hots: [x]\n",
    );
    let e = err_of(&text);
    assert_eq!(e.file, Path::new("bad.yaml"));
    assert_eq!(e.line, Some(20), "{e}");
    assert!(e.field.contains("spec.credentials[0]"), "{e}");
    assert!(e.message.contains("hots"), "{e}");
}

#[test]
fn in_container_needs_accepted_reason() {
    let text = GOOD.replace(
        "      hosts: [api.github.com]\n",
        "      hosts: [api.github.com]\n      delivery:\n        mode: in-container\n",
    );
    let e = err_of(&text);
    assert_eq!(e.field, "spec.credentials[0].delivery");
    assert_eq!(e.line, Some(20), "{e}");
    assert!(e.message.contains("acceptedReason"));
    let ok = text.replace(
        "mode: in-container\n",
        "mode: in-container\n        acceptedReason: \"tool reads the token itself\"\n",
    );
    assert!(Policy::parse_text(Path::new("ok.yaml"), &ok, now()).is_ok());
}

#[test]
fn discovery_window_is_capped_at_seven_days() {
    let fmt = |d: OffsetDateTime| d.format(&Rfc3339).expect("format");
    let within = format!(
        "{GOOD}  discovery:\n    until: \"{}\"\n",
        fmt(now() + time::Duration::days(6))
    );
    let docs = Policy::parse_text(Path::new("p.yaml"), &within, now()).expect("6 days is fine");
    let policy = Policy::from_docs(docs).expect("set");
    let d = policy.egress(&run("team-a", "coder"), "example.org", 443, now());
    assert!(d.allowed() && d.discovery());
    let beyond = format!(
        "{GOOD}  discovery:\n    until: \"{}\"\n",
        fmt(now() + time::Duration::days(8))
    );
    let e = err_of(&beyond);
    assert_eq!(e.field, "spec.discovery.until");
    assert_eq!(e.line, Some(27), "{e}");
    let expired = format!(
        "{GOOD}  discovery:\n    until: \"{}\"\n",
        fmt(now() - time::Duration::days(1))
    );
    let policy =
        Policy::from_docs(Policy::parse_text(Path::new("p"), &expired, now()).expect("ok"))
            .expect("set");
    assert!(
        !policy
            .egress(&run("team-a", "coder"), "example.org", 443, now())
            .allowed()
    );
}

#[test]
fn multi_document_line_numbers_and_duplicates() {
    let second = GOOD
        .replace("name: team-a\n", "name: team-b\n")
        .replace("name: gh\n", "name: gh2\n");
    let text = format!(
        "{GOOD}---\n{}",
        second.replace(
            "ports: [443]\n      substituteAuth",
            "ports: []\n      substituteAuth"
        )
    );
    let e = err_of(&text);
    assert_eq!(e.field, "spec.egress[0].ports");
    assert_eq!(e.line, Some(26 + 22), "{e}");
    let dup = format!(
        "{GOOD}---\n{}",
        GOOD.replace("name: team-a\n", "name: team-z\n")
    );
    let docs =
        Policy::parse_text(Path::new("d.yaml"), &dup, now()).expect("each document is valid");
    let e = Policy::from_docs(docs).expect_err("credential defined twice");
    assert!(e.message.contains("\"gh\""), "{e}");
}

#[test]
fn store_keeps_old_policy_when_new_one_is_broken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a.yaml");
    std::fs::write(&file, GOOD).expect("write");
    let store = PolicyStore::load(dir.path()).expect("load dir");
    assert_eq!(store.current().documents().len(), 1);
    assert!(!store.reload_if_changed().expect("unchanged"));
    // Broken edit: previous policy stays, error is reported.
    std::fs::write(&file, GOOD.replace("kind: user-secret", "kind: nope")).expect("write");
    let e = store.reload_if_changed().expect_err("broken");
    assert!(e.to_string().contains("a.yaml"), "{e}");
    assert!(store.last_error().is_some());
    assert!(
        store
            .current()
            .credential_for(&run("team-a", "coder"), "gh")
            .is_some()
    );
    // Good edit: new policy replaces it.
    std::fs::write(&file, GOOD.replace("name: gh\n", "name: gh-new\n")).expect("write");
    assert!(store.reload().expect("good"));
    assert!(
        store
            .current()
            .credential_for(&run("team-a", "coder"), "gh-new")
            .is_some()
    );
    assert!(store.last_error().is_none());
}

#[test]
fn unknown_field_inside_provider_points_at_its_line() {
    let text = GOOD.replace(
        "        kind: user-secret\n",
        "        kind: user-secret\n        bogus: 1\n",
    );
    let e = err_of(&text);
    assert_eq!(e.line, Some(13), "{e}");
    assert_eq!(e.field, "spec.credentials[0].provider.bogus", "{e}");
}

#[test]
fn env_names_the_variable_for_run_mode_and_must_be_valid() {
    let with = |env: &str| {
        GOOD.replace(
            "      hosts: [api.github.com]\n",
            &format!("      hosts: [api.github.com]\n      env: {env}\n"),
        )
    };
    let docs = Policy::parse_text(Path::new("p.yaml"), &with("GH_TOKEN_PLACEHOLDER"), now())
        .expect("valid");
    assert_eq!(
        docs[0].doc().spec.credentials[0].env.as_deref(),
        Some("GH_TOKEN_PLACEHOLDER")
    );
    for bad in ["1ABC", "A-B", "\"A B\""] {
        let e = err_of(&with(bad));
        assert_eq!(e.field, "spec.credentials[0].env", "{bad}: {e}");
    }
}

#[test]
fn relative_secret_files_resolve_against_the_secrets_dir() {
    let text = "\
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: files}
spec:
  appliesTo: {namespaces: [team-a]}
  credentials:
    - name: rel
      provider: {kind: user-secret, inject: {header: {name: Authorization, prefix: \"Bearer \"}}}
      secret: {file: tokens/api}
      hosts: [api.example.com]
    - name: abs
      provider: {kind: anthropic-api-key}
      secret: {file: /etc/paddock/key}
      hosts: [api.anthropic.com]
    - name: env
      provider: {kind: anthropic-api-key}
      secret: {env: KEY}
      hosts: [api.anthropic.com]
    - name: pool
      provider:
        kind: pat-pool
        inject: {basic: {username: x}}
        secrets: [{file: pat1}, {file: /abs/pat2}]
      hosts: [github.com]
    - name: app
      provider: {kind: github-app, appId: 1, installationId: 2, privateKey: {file: app.pem}}
      hosts: [api.github.com]
";
    let docs = Policy::parse_text(Path::new("p.yaml"), text, now()).expect("valid");
    let policy = Policy::from_docs(docs)
        .expect("valid set")
        .with_secrets_dir(Path::new("/srv/secrets"))
        .expect("paths inside the secrets dir");
    let r = run("team-a", "any");
    let secret = |name: &str| {
        policy
            .credential_for(&r, name)
            .expect(name)
            .1
            .secret
            .clone()
    };
    let file = |p: &str| Some(SecretSource::File(PathBuf::from(p)));
    assert_eq!(secret("rel"), file("/srv/secrets/tokens/api"));
    assert_eq!(
        secret("abs"),
        file("/etc/paddock/key"),
        "absolute paths stay"
    );
    assert_eq!(secret("env"), Some(SecretSource::Env("KEY".into())));
    let provider = |name: &str| {
        policy
            .credential_for(&r, name)
            .expect(name)
            .1
            .provider
            .clone()
    };
    match provider("pool") {
        ProviderSpec::PatPool { secrets, .. } => assert_eq!(
            secrets,
            vec![
                SecretSource::File("/srv/secrets/pat1".into()),
                SecretSource::File("/abs/pat2".into())
            ]
        ),
        other => panic!("{other:?}"),
    }
    match provider("app") {
        ProviderSpec::GithubApp { private_key, .. } => {
            assert_eq!(
                private_key,
                SecretSource::File("/srv/secrets/app.pem".into())
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn secret_files_may_not_climb_out_of_the_secrets_dir() {
    let text = GOOD.replace(
        "secret:\n        env: GH_TOKEN",
        "secret:\n        file: ../tls/tls.key",
    );
    assert!(text.contains("../tls/tls.key"), "fixture edit applied");
    let docs = Policy::parse_text(Path::new("team-a.yaml"), &text, now()).expect("parses");
    let err = Policy::from_docs(docs)
        .expect("valid set")
        .with_secrets_dir(Path::new("/etc/paddock/secrets"))
        .expect_err("escapes the secrets dir");
    let shown = err.to_string();
    assert!(
        shown.contains("team-a.yaml") && shown.contains("leaves the secrets directory"),
        "{shown}"
    );
}

#[test]
fn a_duplicate_key_is_refused_with_its_line() {
    // Which of two `hosts` lists would apply is exactly what a reviewer cannot tell.
    let text = GOOD.replace(
        "      hosts: [api.github.com]\n",
        "      hosts: [api.github.com]\n      hosts: [evil.example]\n",
    );
    let e = err_of(&text);
    assert_eq!(e.line, Some(20), "{e}");
    assert_eq!(e.field, "spec.credentials[0].hosts", "{e}");
    assert!(e.message.contains("duplicate"), "{e}");
    // Also in a map serde buffers (the internally tagged provider) and in a later document.
    let text = GOOD.replace(
        "        kind: user-secret\n",
        "        kind: user-secret\n        kind: pat-pool\n",
    );
    let e = err_of(&text);
    assert_eq!(e.line, Some(13), "{e}");
    assert!(e.message.contains("duplicate"), "{e}");
    let text = format!(
        "{GOOD}---\n{}",
        GOOD.replace("  name: team-a\n", "  name: team-b\n  name: again\n")
    );
    let e = err_of(&text);
    assert_eq!(e.line, Some(26 + 5), "{e}");
    assert_eq!(e.field, "metadata.name", "{e}");
    assert!(e.message.contains("duplicate"), "{e}");
}

#[test]
fn passthrough_needs_every_grant_and_never_substitutes() {
    let with = |extra: &str| {
        GOOD.replace(
            "    - hosts: [pypi.org]\n      ports: [443]\n",
            &format!("    - hosts: [pypi.org, registry.example]\n      ports: [443]\n      passthrough: true\n{extra}"),
        )
    };
    let docs = Policy::parse_text(Path::new("p.yaml"), &with(""), now()).expect("valid");
    let policy = Policy::from_docs(docs).expect("valid set");
    let r = run("team-a", "coder");
    let d = policy.egress(&r, "pypi.org", 443, now());
    assert!(d.allowed() && d.passthrough() && !d.substitute_auth());
    assert!(
        !policy
            .egress(&r, "api.github.com", 443, now())
            .passthrough()
    );
    // A second grant that intercepts the same host wins.
    let docs = Policy::parse_text(
        Path::new("p.yaml"),
        &with("    - hosts: [pypi.org]\n      ports: [443]\n"),
        now(),
    )
    .expect("valid");
    let policy = Policy::from_docs(docs).expect("valid set");
    let d = policy.egress(&r, "pypi.org", 443, now());
    assert!(d.allowed() && !d.passthrough(), "interception wins");
    assert!(
        policy
            .egress(&r, "registry.example", 443, now())
            .passthrough()
    );
    // Never together with substitution.
    let e = err_of(&GOOD.replace(
        "      substituteAuth: true\n",
        "      substituteAuth: true\n      passthrough: true\n",
    ));
    assert!(e.to_string().contains("passthrough"), "{e}");
}

#[test]
fn the_shortest_idle_timeout_of_the_applying_policies_wins() {
    let text = "\
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: a}
spec:
  appliesTo: {namespaces: [team]}
  interactive: {idleTimeoutSecs: 600}
---
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: b}
spec:
  appliesTo: {namespaces: [team], runs: [r1]}
  interactive: {idleTimeoutSecs: 60}
---
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: c}
spec:
  appliesTo: {namespaces: [other]}
  interactive: {idleTimeoutSecs: 5}
";
    let docs = Policy::parse_text(Path::new("p.yaml"), text, now()).expect("valid");
    let policy = Policy::from_docs(docs).expect("valid set");
    assert_eq!(
        policy.shortest_idle_timeout(),
        Some(std::time::Duration::from_secs(5))
    );
    let run = |ns: &str, id: &str| RunInfo {
        run: id.into(),
        namespace: ns.into(),
        template: "t".into(),
        phase: crate::wire::RunPhase::Running,
    };
    let secs = std::time::Duration::from_secs;
    assert_eq!(policy.idle_timeout(&run("team", "r1")), Some(secs(60)));
    assert_eq!(policy.idle_timeout(&run("team", "r2")), Some(secs(600)));
    assert_eq!(policy.idle_timeout(&run("elsewhere", "r1")), None);
    // Zero would end a run at once: refused when the policy is read.
    let zero = text.replace("idleTimeoutSecs: 600", "idleTimeoutSecs: 0");
    assert!(Policy::parse_text(Path::new("p.yaml"), &zero, now()).is_err());
}
