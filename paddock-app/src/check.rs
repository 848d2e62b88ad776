//! `paddock-proxy check`: validates a configuration and everything it names without starting
//! (Envoy's `--mode validate`). Nothing is created: a CA that `generate_ca` would make, an
//! audit file that would be opened, are reported instead.

use std::path::Path;

use paddock_proxy::audit::AuditTarget;
use paddock_proxy::broker::BrokerClient;
use paddock_proxy::net::{CidrConfig, CidrPolicy};
use paddock_proxy::policy::PolicyFile;
use paddock_proxy::tls::{RunCa, UpstreamTls};

use crate::node::config::NodeConfig;
use crate::serve::ServeError;
use crate::serve::config::{BrokerConfig, ConfigError, ServeConfig, TlsConfig};

/// Checks a `serve` configuration; one line per part checked.
pub fn serve(cfg: &ServeConfig) -> Result<Vec<String>, ServeError> {
    let mut report = Vec::new();
    report.push(audit(
        &cfg.audit_target(None).or_else(|e| {
            // `--audit` may be given on the command line instead of the file.
            if cfg.audit.target.is_none() {
                Ok(AuditTarget::None)
            } else {
                Err(e)
            }
        })?,
        cfg.audit.target.is_none(),
    )?);
    report.push(tls(&cfg.tls)?);
    match (&cfg.broker, &cfg.policy.file) {
        (Some(b), _) => report.push(broker(b)?),
        (None, Some(file)) => {
            PolicyFile::open(file).map_err(|error| ServeError::Policy {
                path: file.clone(),
                error,
            })?;
            report.push(format!("policy: {} valid", file.display()));
        }
        (None, None) => {
            return Err(ServeError::Config(ConfigError::Invalid(
                "no egress policy: set policy.file or the [broker] table".to_owned(),
            )));
        }
    }
    CidrPolicy::from_config(&CidrConfig {
        deny: cfg.network.deny_cidrs.clone(),
        allow: cfg.network.allow_cidrs.clone(),
    })?;
    report.push("network: address ranges valid".to_owned());
    if let Some(e) = &cfg.ebpf {
        for cgroup in &e.agent_cgroups {
            if !cgroup.is_dir() {
                return Err(ServeError::Config(ConfigError::Invalid(format!(
                    "ebpf.agent_cgroups: {} is not a directory",
                    cgroup.display()
                ))));
            }
        }
        report.push(format!(
            "ebpf: {} agent cgroup(s), pins under {}",
            e.agent_cgroups.len(),
            e.pin_dir.display()
        ));
    }
    Ok(report)
}

/// Checks a `node` configuration; one line per part checked.
pub fn node(cfg: &NodeConfig) -> Result<Vec<String>, ServeError> {
    let mut report = Vec::new();
    let target = cfg
        .audit
        .target
        .as_deref()
        .unwrap_or("none")
        .parse::<AuditTarget>()
        .map_err(|e| ServeError::Config(ConfigError::Invalid(format!("audit: {e}"))))?;
    report.push(audit(&target, false)?);
    report.push(tls(&cfg.tls)?);
    report.push(broker(&cfg.broker)?);
    CidrPolicy::from_config(&CidrConfig {
        deny: cfg.network.deny_cidrs.clone(),
        allow: cfg.network.allow_cidrs.clone(),
    })?;
    report.push(format!(
        "node: {}, state in {}, pods' cgroups under {}",
        cfg.node_name().map_err(ServeError::Config)?,
        cfg.state_dir.display(),
        cfg.pods.cgroup_root.display()
    ));
    Ok(report)
}

fn audit(target: &AuditTarget, from_flag: bool) -> Result<String, ServeError> {
    Ok(match target {
        AuditTarget::None if from_flag => {
            "audit: not in the file (give --audit to serve)".to_owned()
        }
        AuditTarget::None => "audit: none (explicitly disabled)".to_owned(),
        AuditTarget::Stdout => "audit: standard output".to_owned(),
        AuditTarget::File(path) => {
            let dir = path.parent().unwrap_or(Path::new("/"));
            if !dir.is_dir() {
                return Err(ServeError::Config(ConfigError::Invalid(format!(
                    "audit: directory {} does not exist",
                    dir.display()
                ))));
            }
            format!("audit: {}", path.display())
        }
    })
}

fn tls(t: &TlsConfig) -> Result<String, ServeError> {
    t.validate()?;
    let has_ca = t.ca_dir.join("tls.crt").exists() || t.ca_dir.join("tls.key").exists();
    let ca = if has_ca || !t.generate_ca {
        let ca = RunCa::load_dir(&t.ca_dir).map_err(ServeError::Ca)?;
        format!(
            "ca: {} ({}), valid until {}",
            t.ca_dir.display(),
            ca.subject(),
            ca.not_after()
        )
    } else {
        format!(
            "ca: none in {} yet (generate_ca makes one at start)",
            t.ca_dir.display()
        )
    };
    UpstreamTls::new(t.upstream_ca_bundle.as_deref()).map_err(ServeError::Ca)?;
    Ok(match &t.upstream_ca_bundle {
        Some(b) => format!("{ca}; upstream bundle {} loads", b.display()),
        None => ca,
    })
}

fn broker(b: &BrokerConfig) -> Result<String, ServeError> {
    BrokerClient::new(&b.client_config())?;
    Ok(format!(
        "broker: {} (client settings and files load; not contacted)",
        b.url
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, extra: &str) -> ServeConfig {
        ServeConfig::from_toml_str(&format!(
            r#"
run_id = "check"
[listen]
transparent = ["127.0.0.1:15001"]
[tls]
ca_dir = "{ca}"
generate_ca = true
[policy]
file = "{policy}"
[audit]
target = "{audit}"
{extra}
"#,
            ca = dir.join("ca").display(),
            policy = dir.join("policy.toml").display(),
            audit = dir.join("audit.jsonl").display(),
        ))
        .expect("config parses")
    }

    #[test]
    fn a_good_config_checks_and_nothing_is_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(
            d.join("policy.toml"),
            "[[rule]]\nname = \"a\"\nhosts = [\"a.example\"]\nports = [443]\n",
        )
        .expect("policy");
        let report = serve(&config(d, "")).expect("valid");
        assert!(
            report.iter().any(|l| l.contains("generate_ca makes one")),
            "{report:?}"
        );
        assert!(!d.join("ca").exists(), "check generated a CA");
        assert!(
            !d.join("audit.jsonl").exists(),
            "check opened the audit file"
        );
    }

    #[test]
    fn what_serve_would_refuse_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        // A broken policy file.
        std::fs::write(d.join("policy.toml"), "[[rule]]\nname = ").expect("policy");
        let err = serve(&config(d, "")).expect_err("broken policy");
        assert!(err.to_string().contains("policy.toml"), "{err}");
        // A CA directory without a CA and no generate_ca.
        std::fs::write(
            d.join("policy.toml"),
            "[[rule]]\nname = \"a\"\nhosts = [\"a.example\"]\nports = [443]\n",
        )
        .expect("policy");
        let mut cfg = config(d, "");
        cfg.tls.generate_ca = false;
        assert!(serve(&cfg).is_err(), "no CA to load");
        // A missing agent cgroup.
        let cfg = config(
            d,
            "[ebpf]\nagent_cgroups = [\"/sys/fs/cgroup/does-not-exist-paddock\"]\n",
        );
        let err = serve(&cfg).expect_err("missing cgroup");
        assert!(err.to_string().contains("does-not-exist-paddock"), "{err}");
        // An audit file in a directory that does not exist.
        let mut cfg = config(d, "");
        cfg.audit.target = Some("/nonexistent-paddock-dir/audit.jsonl".to_owned());
        let err = serve(&cfg).expect_err("audit directory");
        assert!(err.to_string().contains("nonexistent-paddock-dir"), "{err}");
    }
}
