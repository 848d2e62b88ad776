//! `paddock-broker policy test`: what the policy would do with one request, and which grant
//! decides (httpjail's `--test`, for `BrokerPolicy` files).
//!
//! The answer uses the same evaluation as the broker ([`Policy::egress`]); on top it names
//! every grant that matched, and the credentials the proxy would put into the request.

use serde::Serialize;
use time::OffsetDateTime;

use super::{EgressDecision, Policy, hosts};
use crate::wire::{DeliveryMode, RunInfo, RunPhase};

/// One request to explain: `[METHOD] URL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRequest {
    pub method: String,
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    pub path: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Https,
    Http,
}

/// Why a request text was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestTextError(String);

impl TestRequest {
    /// Parses `"GET https://host[:port]/path"` (the method defaults to GET).
    pub fn parse(text: &str) -> Result<Self, RequestTextError> {
        let text = text.trim();
        let (method, url) = match text.split_once(char::is_whitespace) {
            Some((m, rest)) => (m.to_ascii_uppercase(), rest.trim()),
            None => ("GET".to_owned(), text),
        };
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(RequestTextError(format!("not an HTTP method: {method:?}")));
        }
        let uri: http::Uri = url
            .parse()
            .map_err(|e| RequestTextError(format!("not a URL: {url:?}: {e}")))?;
        let scheme = match uri.scheme_str() {
            Some("https") => Scheme::Https,
            Some("http") => Scheme::Http,
            _ => {
                return Err(RequestTextError(format!(
                    "the URL needs an http:// or https:// scheme: {url:?}"
                )));
            }
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| RequestTextError(format!("the URL names no host: {url:?}")))?;
        let port = uri.port_u16().unwrap_or(match scheme {
            Scheme::Https => 443,
            Scheme::Http => 80,
        });
        Ok(Self {
            method,
            scheme,
            host: hosts::normalize(host),
            port,
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        })
    }
}

/// An egress grant that lists the destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MatchedGrant {
    pub policy: String,
    pub file: String,
    pub hosts: Vec<String>,
    pub ports: Vec<u16>,
    pub substitute_auth: bool,
    pub passthrough: bool,
}

/// A credential the proxy would substitute into the request (if the agent sends its
/// placeholder).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CredentialUse {
    pub credential: String,
    pub policy: String,
    pub provider: &'static str,
    /// Refused on this request: plain HTTP without `allowCleartext`.
    pub refused: Option<String>,
}

/// What the broker and proxy would do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub allowed: bool,
    /// "granted", "discovery" or "denied".
    pub decision: &'static str,
    /// The policy that decides (none when denied).
    pub policy: Option<String>,
    pub reason: String,
    /// How the connection would be handled: "intercepted", "passthrough", "plain-http".
    pub handling: Option<&'static str>,
    pub matched: Vec<MatchedGrant>,
    pub credentials: Vec<CredentialUse>,
}

/// Explains `request` for `run` under `policy` at `now`.
#[must_use]
pub fn explain(
    policy: &Policy,
    run: &RunInfo,
    request: &TestRequest,
    now: OffsetDateTime,
) -> Explanation {
    let decision = policy.egress(run, &request.host, request.port, now);
    let matched = policy
        .documents()
        .iter()
        .filter(|d| d.doc().spec.applies_to.matches(run))
        .flat_map(|d| {
            d.doc()
                .spec
                .egress
                .iter()
                .filter(|g| g.matches(&request.host, Some(request.port)))
                .map(move |g| MatchedGrant {
                    policy: d.name().to_owned(),
                    file: d.file().display().to_string(),
                    hosts: g.hosts.clone(),
                    ports: g.ports.clone(),
                    substitute_auth: g.substitute_auth,
                    passthrough: g.passthrough,
                })
        })
        .collect();
    let credentials = if decision.substitute_auth() {
        policy
            .credentials()
            .filter(|(d, c)| {
                d.doc().spec.applies_to.matches(run)
                    && c.delivery.mode == DeliveryMode::ProxyInjected
                    && c.hosts.iter().any(|p| hosts::matches(p, &request.host))
            })
            .map(|(d, c)| CredentialUse {
                credential: c.name.clone(),
                policy: d.name().to_owned(),
                provider: c.provider.kind(),
                refused: (request.scheme == Scheme::Http && !c.allow_cleartext).then(|| {
                    "plain HTTP: the credential is TLS-only (allowCleartext is not set)".to_owned()
                }),
            })
            .collect()
    } else {
        Vec::new()
    };
    let handling = decision.allowed().then_some(match request.scheme {
        Scheme::Http => "plain-http",
        Scheme::Https if decision.passthrough() => "passthrough",
        Scheme::Https => "intercepted",
    });
    Explanation {
        allowed: decision.allowed(),
        decision: match decision {
            EgressDecision::Granted { .. } => "granted",
            EgressDecision::Discovery { .. } => "discovery",
            EgressDecision::Denied { .. } => "denied",
        },
        policy: decision.policy().map(str::to_owned),
        reason: decision.reason(),
        handling,
        matched,
        credentials,
    }
}

/// A run for [`explain`] from `NAMESPACE/RUN` and an optional template.
pub fn run_info(ns_run: &str, template: Option<&str>) -> Result<RunInfo, RequestTextError> {
    let (namespace, run) = ns_run
        .split_once('/')
        .filter(|(n, r)| !n.is_empty() && !r.is_empty() && !r.contains('/'))
        .ok_or_else(|| RequestTextError(format!("--run must be NAMESPACE/RUN, not {ns_run:?}")))?;
    Ok(RunInfo {
        run: run.to_owned(),
        namespace: namespace.to_owned(),
        template: template.unwrap_or_default().to_owned(),
        phase: RunPhase::Running,
    })
}

impl Explanation {
    /// The human-readable answer.
    #[must_use]
    pub fn render(&self, request: &TestRequest, run: &RunInfo) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} {}://{}:{}{}  (run {}/{}{})",
            request.method,
            match request.scheme {
                Scheme::Https => "https",
                Scheme::Http => "http",
            },
            request.host,
            request.port,
            request.path,
            run.namespace,
            run.run,
            if run.template.is_empty() {
                String::new()
            } else {
                format!(", template {}", run.template)
            }
        );
        let verdict = if self.allowed { "ALLOWED" } else { "DENIED" };
        let _ = writeln!(out, "{verdict}: {}", self.reason);
        if let Some(h) = self.handling {
            let how = match h {
                "passthrough" => {
                    "TLS relayed untouched (passthrough): no substitution, no per-request audit"
                }
                "plain-http" => "plain HTTP: each request audited",
                _ => "TLS intercepted: each request audited",
            };
            let _ = writeln!(out, "handling: {how}");
        }
        for g in &self.matched {
            let _ = writeln!(
                out,
                "  grant in {} ({}): hosts {:?} ports {:?}{}{}",
                g.policy,
                g.file,
                g.hosts,
                g.ports,
                if g.substitute_auth {
                    ", substituteAuth"
                } else {
                    ""
                },
                if g.passthrough { ", passthrough" } else { "" }
            );
        }
        if self.allowed && !self.matched.iter().any(|g| g.substitute_auth) {
            let _ = writeln!(out, "credentials: none substituted on this destination");
        }
        for c in &self.credentials {
            match &c.refused {
                None => {
                    let _ = writeln!(
                        out,
                        "credential {} ({}, policy {}): its placeholder is replaced",
                        c.credential, c.provider, c.policy
                    );
                }
                Some(why) => {
                    let _ = writeln!(
                        out,
                        "credential {} ({}, policy {}): REFUSED: {why}",
                        c.credential, c.provider, c.policy
                    );
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r"
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {name: gh}
spec:
  appliesTo: {namespaces: [team-a]}
  credentials:
    - name: github
      provider: {kind: user-secret, inject: {header: {name: Authorization, prefix: 'Bearer '}}}
      secret: {env: GH_TOKEN}
      hosts: [api.github.com]
  egress:
    - hosts: [api.github.com]
      ports: [443, 80]
      substituteAuth: true
    - hosts: ['*.pypi.org']
      ports: [443]
      passthrough: true
";

    fn policy() -> Policy {
        let docs = Policy::parse_text(
            std::path::Path::new("p.yaml"),
            POLICY,
            OffsetDateTime::now_utc(),
        )
        .expect("policy");
        Policy::from_docs(docs).expect("valid set")
    }

    fn ask(req: &str, run: &str) -> Explanation {
        explain(
            &policy(),
            &run_info(run, None).expect("run"),
            &TestRequest::parse(req).expect("request"),
            OffsetDateTime::now_utc(),
        )
    }

    #[test]
    fn parses_requests_and_refuses_bad_ones() {
        let r = TestRequest::parse("post https://API.github.com:8443/x?y=1").expect("ok");
        assert_eq!(
            (r.method.as_str(), r.host.as_str(), r.port, r.path.as_str()),
            ("POST", "api.github.com", 8443, "/x?y=1")
        );
        assert_eq!(TestRequest::parse("http://h/").expect("ok").port, 80);
        for bad in ["GET ftp://h/", "GET /path", "G3T https://h/", ""] {
            assert!(TestRequest::parse(bad).is_err(), "{bad:?}");
        }
        assert!(run_info("team-a", None).is_err());
        assert!(run_info("team-a/r/x", None).is_err());
    }

    #[test]
    fn names_the_grant_and_the_credentials_that_decide() {
        let e = ask("GET https://api.github.com/user", "team-a/r1");
        assert!(e.allowed);
        assert_eq!(e.decision, "granted");
        assert_eq!(e.policy.as_deref(), Some("gh"));
        assert_eq!(e.handling, Some("intercepted"));
        assert_eq!(e.matched.len(), 1);
        assert!(e.matched[0].substitute_auth);
        assert_eq!(e.credentials.len(), 1);
        assert_eq!(e.credentials[0].credential, "github");
        assert_eq!(e.credentials[0].refused, None);
        let text = e.render(
            &TestRequest::parse("GET https://api.github.com/user").expect("ok"),
            &run_info("team-a/r1", None).expect("run"),
        );
        assert!(text.contains("ALLOWED"), "{text}");
        assert!(text.contains("its placeholder is replaced"), "{text}");
        assert!(text.contains("grant in gh (p.yaml)"), "{text}");
    }

    #[test]
    fn cleartext_passthrough_and_denials_are_told_apart() {
        let e = ask("GET http://api.github.com/", "team-a/r1");
        assert_eq!(e.handling, Some("plain-http"));
        assert!(e.credentials[0].refused.is_some(), "TLS-only by default");

        let e = ask("https://files.pypi.org/simple/", "team-a/r1");
        assert_eq!(e.handling, Some("passthrough"));
        assert!(e.credentials.is_empty());

        let e = ask("https://evil.example/", "team-a/r1");
        assert!(!e.allowed);
        assert_eq!(e.decision, "denied");
        assert!(e.matched.is_empty());

        // Another namespace: the policy does not apply.
        assert!(!ask("https://api.github.com/", "team-b/r1").allowed);
        // Another port.
        assert!(!ask("https://api.github.com:8443/", "team-a/r1").allowed);
    }
}
