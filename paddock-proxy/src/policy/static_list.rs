//! The static allow-list policy, loaded from a TOML file.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::pattern::{HostPattern, PatternError, normalize_host};
use super::{CheckFuture, Decision, EgressPolicy, EgressRequest, Mode, PolicyError};

/// A static allow-list.
///
/// ```toml
/// # Permit the bare "*" host pattern (off by default: it allows every host).
/// allow_any_host = false
///
/// [[rule]]
/// name = "github"                     # optional; defaults to "rule-<index>"
/// hosts = ["github.com", "*.github.com"]
/// ports = [443]                       # or ports = "any"
/// modes = ["transparent", "connect"]  # optional; default: every mode
/// substitute_auth = true              # optional; default false
/// action = "allow"                    # or "discovery" or "passthrough"; default "allow"
/// ```
///
/// `action = "passthrough"` lets TLS connections to the rule's hosts through without
/// terminating them: the SNI and the destination are checked as for any connection, then the
/// bytes are spliced in the kernel (no substitution, no per-request audit, the agent sees the
/// upstream's own certificate). For registries and other hosts that need no credential. A
/// plain-HTTP connection matching such a rule is intercepted as under `allow`.
///
/// Rules are tried in file order and the first match decides; no match is a deny. Unknown keys
/// are errors (a misspelt key must not silently widen or narrow the policy), and every error
/// names the rule's 0-based index.
///
/// `substitute_auth` only ends up in the [`Decision`]: `serve` with a static policy has no
/// broker and substitutes nothing ([`crate::http::NoopSubstituter`]), so placeholders reach
/// the upstream unchanged.
#[derive(Debug, Clone)]
pub struct StaticPolicy {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    name: String,
    hosts: Vec<HostPattern>,
    ports: Ports,
    modes: Option<Vec<Mode>>,
    substitute_auth: bool,
    action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ports {
    Any,
    List(Vec<u16>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
enum Action {
    #[default]
    Allow,
    Discovery,
    Passthrough,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    allow_any_host: bool,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    name: Option<String>,
    #[serde(default)]
    hosts: Vec<String>,
    ports: Option<PortsConfig>,
    modes: Option<Vec<Mode>>,
    #[serde(default)]
    substitute_auth: bool,
    #[serde(default)]
    action: Action,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortsConfig {
    List(Vec<u16>),
    Word(String),
}

/// Why a policy file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyConfigError {
    #[error("cannot read policy file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("policy file is not valid TOML for this schema: {0}")]
    Syntax(String),
    #[error("policy rule[{index}] ({name:?}): {problem}")]
    Rule {
        index: usize,
        name: String,
        problem: RuleProblem,
    },
    #[error("policy rule[{index}] and rule[{first}] share the name {name:?}")]
    DuplicateName {
        index: usize,
        first: usize,
        name: String,
    },
}

/// What is wrong with one rule.
#[derive(Debug, thiserror::Error)]
pub enum RuleProblem {
    #[error("{0}")]
    Pattern(#[from] PatternError),
    #[error("no hosts listed")]
    NoHosts,
    #[error("no ports: write ports = [443, ...] or ports = \"any\"")]
    NoPorts,
    #[error("port 0 is not a destination port")]
    PortZero,
    #[error("ports = {0:?} is neither a list of ports nor \"any\"")]
    BadPortsWord(String),
    #[error("modes is empty: omit it to allow every mode")]
    NoModes,
    #[error("substitute_auth cannot be set on a discovery rule")]
    DiscoverySubstitutes,
    #[error("substitute_auth cannot be set on a passthrough rule (its TLS is not terminated)")]
    PassthroughSubstitutes,
}

impl StaticPolicy {
    /// Loads and validates a policy file.
    pub fn from_file(path: &Path) -> Result<Self, PolicyConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// Parses and validates a policy document.
    pub fn from_toml_str(text: &str) -> Result<Self, PolicyConfigError> {
        let file: FileConfig =
            toml::from_str(text).map_err(|e| PolicyConfigError::Syntax(e.to_string()))?;
        let mut rules: Vec<Rule> = Vec::with_capacity(file.rules.len());
        for (index, cfg) in file.rules.into_iter().enumerate() {
            let name = cfg.name.clone().unwrap_or_else(|| format!("rule-{index}"));
            if let Some(first) = rules.iter().position(|r| r.name == name) {
                return Err(PolicyConfigError::DuplicateName { index, first, name });
            }
            let rule = build_rule(cfg, name.clone(), file.allow_any_host).map_err(|problem| {
                PolicyConfigError::Rule {
                    index,
                    name,
                    problem,
                }
            })?;
            rules.push(rule);
        }
        Ok(Self { rules })
    }

    /// Number of rules loaded.
    #[must_use]
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the policy has no rules (and so denies everything).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The synchronous decision behind [`EgressPolicy::check`].
    pub fn decide(&self, req: &EgressRequest) -> Result<Decision, PolicyError> {
        // Re-normalise: the fields are public, and a host that was never normalised must not
        // be compared against normalised patterns.
        let host = normalize_host(&req.host)?;
        let host_ip = host.parse::<IpAddr>().ok();
        let hit = self.rules.iter().find(|rule| {
            rule.modes.as_ref().is_none_or(|m| m.contains(&req.mode))
                && match &rule.ports {
                    Ports::Any => true,
                    Ports::List(list) => list.contains(&req.port),
                }
                && rule.hosts.iter().any(|p| p.matches_parsed(&host, host_ip))
        });
        Ok(match hit {
            Some(rule) if rule.action == Action::Discovery => Decision::Discovery {
                rule: rule.name.clone(),
            },
            Some(rule) if rule.action == Action::Passthrough => Decision::Passthrough {
                rule: rule.name.clone(),
            },
            Some(rule) => Decision::Allow {
                rule: rule.name.clone(),
                substitute_auth: rule.substitute_auth,
            },
            None => Decision::Deny {
                reason: format!(
                    "no egress rule allows {}:{}",
                    display_host(&host, host_ip),
                    req.port
                ),
            },
        })
    }
}

impl StaticPolicy {
    /// The synchronous answer behind [`EgressPolicy::name_allowed`]: the first rule with a host
    /// pattern matching `host`, whatever its ports, among the rules that apply to transparent
    /// or plain-HTTP connections (the modes where the agent resolves the name itself; a
    /// cooperative `CONNECT` client hands the name to the proxy and needs no DNS). IP literals
    /// are not names and are denied.
    pub fn decide_name(&self, host: &str) -> Result<Decision, PolicyError> {
        let host = normalize_host(host)?;
        if host.parse::<IpAddr>().is_ok() {
            return Ok(Decision::Deny {
                reason: format!("{host} is an IP address, not a name"),
            });
        }
        let resolves_itself =
            |m: &Vec<Mode>| m.contains(&Mode::Transparent) || m.contains(&Mode::PlainHttp);
        let hit = self.rules.iter().find(|rule| {
            rule.modes.as_ref().is_none_or(resolves_itself)
                && rule.hosts.iter().any(|p| p.matches_parsed(&host, None))
        });
        Ok(match hit {
            Some(rule) if rule.action == Action::Discovery => Decision::Discovery {
                rule: rule.name.clone(),
            },
            Some(rule) => Decision::Allow {
                rule: rule.name.clone(),
                substitute_auth: false,
            },
            None => Decision::Deny {
                reason: format!("no egress rule allows {host} on any port"),
            },
        })
    }
}

fn display_host(host: &str, ip: Option<IpAddr>) -> String {
    match ip {
        Some(IpAddr::V6(_)) => format!("[{host}]"),
        _ => host.to_owned(),
    }
}

fn build_rule(cfg: RuleConfig, name: String, allow_any: bool) -> Result<Rule, RuleProblem> {
    if cfg.hosts.is_empty() {
        return Err(RuleProblem::NoHosts);
    }
    let hosts = cfg
        .hosts
        .iter()
        .map(|h| HostPattern::parse(h, allow_any))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = match cfg.ports {
        None => return Err(RuleProblem::NoPorts),
        Some(PortsConfig::Word(w)) if w.eq_ignore_ascii_case("any") => Ports::Any,
        Some(PortsConfig::Word(w)) => return Err(RuleProblem::BadPortsWord(w)),
        Some(PortsConfig::List(list)) if list.is_empty() => return Err(RuleProblem::NoPorts),
        Some(PortsConfig::List(list)) if list.contains(&0) => return Err(RuleProblem::PortZero),
        Some(PortsConfig::List(list)) => Ports::List(list),
    };
    if cfg.modes.as_ref().is_some_and(Vec::is_empty) {
        return Err(RuleProblem::NoModes);
    }
    if cfg.action == Action::Discovery && cfg.substitute_auth {
        return Err(RuleProblem::DiscoverySubstitutes);
    }
    if cfg.action == Action::Passthrough && cfg.substitute_auth {
        return Err(RuleProblem::PassthroughSubstitutes);
    }
    Ok(Rule {
        name,
        hosts,
        ports,
        modes: cfg.modes,
        substitute_auth: cfg.substitute_auth,
        action: cfg.action,
    })
}

impl EgressPolicy for StaticPolicy {
    fn check<'a>(&'a self, req: &'a EgressRequest) -> CheckFuture<'a> {
        Box::pin(std::future::ready(self.decide(req)))
    }

    fn name_allowed<'a>(&'a self, _run: &'a str, host: &'a str) -> CheckFuture<'a> {
        Box::pin(std::future::ready(self.decide_name(host)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        [[rule]]
        name = "github"
        hosts = ["github.com", "*.githubusercontent.com"]
        ports = [443]
        substitute_auth = true

        [[rule]]
        name = "internal-any-port"
        hosts = ["Build.Example."]
        ports = "any"

        [[rule]]
        name = "plain-only"
        hosts = ["mirror.example.org"]
        ports = [80]
        modes = ["plain_http"]

        [[rule]]
        name = "watch"
        hosts = ["*.observe.example"]
        ports = [443, 8443]
        action = "discovery"

        [[rule]]
        hosts = ["192.0.2.7", "[2001:db8::7]"]
        ports = [443]
    "#;

    fn policy() -> StaticPolicy {
        StaticPolicy::from_toml_str(POLICY).unwrap_or_else(|e| panic!("{e}"))
    }

    fn allow(rule: &str, substitute_auth: bool) -> Decision {
        Decision::Allow {
            rule: rule.to_owned(),
            substitute_auth,
        }
    }

    #[tokio::test]
    #[expect(clippy::too_many_lines, reason = "one table row per case")]
    async fn decisions_table() {
        let p = policy();
        let deny = |h: &str, port: u16| Decision::Deny {
            reason: format!("no egress rule allows {h}:{port}"),
        };
        let table: Vec<(&str, u16, Mode, Decision)> = vec![
            ("github.com", 443, Mode::Transparent, allow("github", true)),
            ("GitHub.com.", 443, Mode::Connect, allow("github", true)),
            (
                "github.com",
                8443,
                Mode::Transparent,
                deny("github.com", 8443),
            ),
            (
                "api.github.com",
                443,
                Mode::Transparent,
                deny("api.github.com", 443),
            ),
            (
                "raw.githubusercontent.com",
                443,
                Mode::Transparent,
                allow("github", true),
            ),
            (
                "a.b.githubusercontent.com",
                443,
                Mode::PlainHttp,
                allow("github", true),
            ),
            (
                "githubusercontent.com",
                443,
                Mode::Transparent,
                deny("githubusercontent.com", 443),
            ),
            (
                "build.example",
                1,
                Mode::Transparent,
                allow("internal-any-port", false),
            ),
            (
                "build.example",
                65535,
                Mode::Connect,
                allow("internal-any-port", false),
            ),
            (
                "x.build.example",
                443,
                Mode::Connect,
                deny("x.build.example", 443),
            ),
            (
                "mirror.example.org",
                80,
                Mode::PlainHttp,
                allow("plain-only", false),
            ),
            (
                "mirror.example.org",
                80,
                Mode::Transparent,
                deny("mirror.example.org", 80),
            ),
            (
                "a.observe.example",
                8443,
                Mode::Transparent,
                Decision::Discovery {
                    rule: "watch".into(),
                },
            ),
            (
                "observe.example",
                443,
                Mode::Transparent,
                deny("observe.example", 443),
            ),
            ("192.0.2.7", 443, Mode::Connect, allow("rule-4", false)),
            ("[2001:DB8::7]", 443, Mode::Connect, allow("rule-4", false)),
            (
                "2001:db8::8",
                443,
                Mode::Connect,
                deny("[2001:db8::8]", 443),
            ),
            ("evil.com", 443, Mode::Transparent, deny("evil.com", 443)),
        ];
        for (host, port, mode, want) in table {
            let req = EgressRequest::new("run-1", host, port, mode)
                .unwrap_or_else(|e| panic!("{host}: {e}"));
            let got = p
                .check(&req)
                .await
                .unwrap_or_else(|e| panic!("{host}: {e}"));
            assert_eq!(got, want, "{host}:{port} {mode}");
            assert_eq!(got.is_allowed(), !matches!(want, Decision::Deny { .. }));
        }
    }

    #[tokio::test]
    async fn names_are_allowed_by_any_rule_whose_host_matches_whatever_its_ports() {
        let p = policy();
        let allowed = |rule: &str| Decision::Allow {
            rule: rule.to_owned(),
            substitute_auth: false,
        };
        let table: Vec<(&str, Decision)> = vec![
            // Port 443 only, substituting: the name itself is reachable.
            ("github.com", allowed("github")),
            ("GitHub.COM.", allowed("github")),
            ("raw.githubusercontent.com", allowed("github")),
            ("build.example", allowed("internal-any-port")),
            // Only in plain-HTTP mode, where the agent resolves the name itself.
            ("mirror.example.org", allowed("plain-only")),
            (
                "x.observe.example",
                Decision::Discovery {
                    rule: "watch".into(),
                },
            ),
        ];
        for (name, want) in table {
            assert_eq!(
                p.name_allowed("run-1", name).await.ok(),
                Some(want),
                "{name}"
            );
        }
        for name in [
            "githubusercontent.com",
            "api.github.com",
            "x.build.example",
            "observe.example",
            "4a6f686e.exfil.test",
            // Allowed as IP literals for connections; as names they mean nothing.
            "192.0.2.7",
            "2001:db8::7",
        ] {
            let got = p.name_allowed("run-1", name).await;
            assert!(matches!(&got, Ok(Decision::Deny { .. })), "{name}: {got:?}");
        }
        assert!(matches!(
            p.name_allowed("run-1", "a..b").await,
            Err(PolicyError::InvalidHost(_))
        ));
    }

    #[tokio::test]
    async fn names_of_rules_for_cooperative_clients_only_are_not_resolved() {
        let p = StaticPolicy::from_toml_str(
            "[[rule]]\nname = \"c\"\nhosts = [\"proxied.example\"]\nports = [443]\nmodes = [\"connect\"]\n\
             [[rule]]\nname = \"t\"\nhosts = [\"both.example\"]\nports = [443]\nmodes = [\"connect\", \"transparent\"]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            p.name_allowed("r", "proxied.example").await,
            Ok(Decision::Deny { .. })
        ));
        assert!(
            p.name_allowed("r", "both.example")
                .await
                .is_ok_and(|d| d.is_allowed())
        );
    }

    #[tokio::test]
    async fn unnormalised_host_in_request_is_an_error() {
        let p = policy();
        let req = EgressRequest {
            run: "r".into(),
            host: "a..github.com".into(),
            port: 443,
            mode: Mode::Transparent,
        };
        assert!(matches!(
            p.check(&req).await,
            Err(PolicyError::InvalidHost(_))
        ));
        // Raw fields that merely need normalising still match.
        let req = EgressRequest {
            host: "GITHUB.COM.".into(),
            ..req
        };
        assert_eq!(p.check(&req).await.ok(), Some(allow("github", true)));
    }

    #[tokio::test]
    async fn empty_policy_denies_everything() {
        let p = StaticPolicy::from_toml_str("").unwrap_or_else(|e| panic!("{e}"));
        assert!(p.is_empty());
        let req = EgressRequest::new("r", "example.com", 443, Mode::Transparent)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !p.check(&req)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .is_allowed()
        );
    }

    #[test]
    fn star_needs_the_flag() {
        let doc = "[[rule]]\nhosts = [\"*\"]\nports = \"any\"\n";
        let err = StaticPolicy::from_toml_str(doc)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "policy rule[0] (\"rule-0\"): pattern \"*\" matches every host; set allow_any_host = true to permit it"
            )
        );
        let ok = StaticPolicy::from_toml_str(&format!("allow_any_host = true\n{doc}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let req = EgressRequest::new("r", "anything.example", 9, Mode::Connect)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.decide(&req).ok(), Some(allow("rule-0", false)));
    }

    #[test]
    fn invalid_files_name_the_rule() {
        let ok_rule = "[[rule]]\nhosts = [\"ok.example\"]\nports = [443]\n";
        let table: &[(&str, &str)] = &[
            (
                "hosts = [\"a*b.com\"]\nports = [443]",
                "rule[1] (\"rule-1\"): pattern \"a*b.com\": '*' is only allowed",
            ),
            (
                "hosts = [\"a..com\"]\nports = [443]",
                "rule[1] (\"rule-1\"): pattern \"a..com\": host name \"a..com\" has an empty label",
            ),
            (
                "name = \"x\"\nhosts = [\"*.ok\"]",
                "rule[1] (\"x\"): no ports",
            ),
            (
                "hosts = [\"ok.example\"]\nports = []",
                "rule[1] (\"rule-1\"): no ports",
            ),
            (
                "hosts = [\"ok.example\"]\nports = [0]",
                "rule[1] (\"rule-1\"): port 0",
            ),
            (
                "hosts = [\"ok.example\"]\nports = \"all\"",
                "rule[1] (\"rule-1\"): ports = \"all\"",
            ),
            ("hosts = []\nports = [1]", "rule[1] (\"rule-1\"): no hosts"),
            (
                "hosts = [\"ok.example\"]\nports = [1]\nmodes = []",
                "rule[1] (\"rule-1\"): modes is empty",
            ),
            (
                "hosts = [\"o.example\"]\nports = [1]\naction = \"discovery\"\nsubstitute_auth = true",
                "rule[1] (\"rule-1\"): substitute_auth",
            ),
            (
                "hosts = [\"o.example\"]\nports = [1]\naction = \"passthrough\"\nsubstitute_auth = true",
                "rule[1] (\"rule-1\"): substitute_auth cannot be set on a passthrough rule",
            ),
            (
                "name = \"rule-0\"\nhosts = [\"o.example\"]\nports = [1]",
                "rule[1] and rule[0] share the name",
            ),
            (
                "host = [\"ok.example\"]\nports = [443]",
                "not valid TOML for this schema",
            ),
            (
                "hosts = [\"ok.example\"]\nports = [70000]",
                "not valid TOML for this schema",
            ),
            (
                "hosts = [\"ok.example\"]\nports = [443]\nmodes = [\"udp\"]",
                "not valid TOML for this schema",
            ),
        ];
        for (second, want) in table {
            let doc = format!("{ok_rule}[[rule]]\n{second}\n");
            match StaticPolicy::from_toml_str(&doc) {
                Ok(_) => panic!("accepted invalid rule {second:?}"),
                Err(e) => assert!(e.to_string().contains(want), "{second:?}: got {e}"),
            }
        }
    }

    #[test]
    fn loads_from_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, POLICY).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            StaticPolicy::from_file(&path).map(|p| p.len()).ok(),
            Some(5)
        );
        let missing = StaticPolicy::from_file(&dir.path().join("nope.toml"));
        assert!(matches!(missing, Err(PolicyConfigError::Io { .. })));
    }
}
