//! `paddock-broker policy suggest`: turns what runs tried and were refused (or were let through
//! only by a discovery window) into a `BrokerPolicy` snippet for a human to review.
//!
//! Reads the broker's audit trail (`egress-denied`, `egress-discovery`) and the proxy's
//! (`deny`, `discovery` with a name); other records are skipped. Destinations without a name
//! (IP literals, connections without SNI) are counted but never suggested: a policy grants
//! names. The snippet groups hosts of one namespace that were reached on the same ports, and
//! says how often and by which runs each was wanted, so the reviewer sees what each line
//! would open.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// What the records asked for, per namespace and host.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Suggestion {
    /// namespace -> host -> wants.
    pub wanted: BTreeMap<String, BTreeMap<String, Wanted>>,
    /// Records read.
    pub records: usize,
    /// Denied or discovery records with no name to grant (IP literal, no SNI).
    pub unnamed: usize,
    /// Lines that were not JSON objects.
    pub malformed: usize,
}

/// How one host was wanted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub ports: BTreeSet<u16>,
    pub denied: usize,
    pub discovery: usize,
    pub runs: BTreeSet<String>,
}

impl Suggestion {
    /// Adds the records of one JSONL text; records without a namespace (the proxy's) go under
    /// `default_namespace`.
    pub fn add_jsonl(&mut self, text: &str, default_namespace: &str) {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            self.records += 1;
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                self.malformed += 1;
                continue;
            };
            let Some(obj) = v.as_object() else {
                self.malformed += 1;
                continue;
            };
            let s = |k: &str| obj.get(k).and_then(serde_json::Value::as_str);
            // The broker's records say `event`, the proxy's `kind`.
            let denied = match (s("event"), s("kind")) {
                (Some("egress-denied"), _) | (None, Some("deny")) => true,
                (Some("egress-discovery"), _) | (None, Some("discovery")) => false,
                _ => continue,
            };
            let host = s("host").or_else(|| s("sni")).map(super::hosts::normalize);
            let port = obj
                .get("port")
                .and_then(serde_json::Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0);
            let (Some(host), Some(port)) = (host, port) else {
                self.unnamed += 1;
                continue;
            };
            if host.is_empty()
                || host.parse::<std::net::IpAddr>().is_ok()
                || super::hosts::validate_pattern(&host).is_err()
            {
                self.unnamed += 1;
                continue;
            }
            let namespace = s("namespace")
                .filter(|n| !n.is_empty())
                .unwrap_or(default_namespace)
                .to_owned();
            let w = self
                .wanted
                .entry(namespace)
                .or_default()
                .entry(host)
                .or_default();
            w.ports.insert(port);
            if denied {
                w.denied += 1;
            } else {
                w.discovery += 1;
            }
            if let Some(run) = s("run").filter(|r| !r.is_empty()) {
                w.runs.insert(run.to_owned());
            }
        }
    }

    /// The snippet: one `BrokerPolicy` per namespace, hosts with the same ports grouped into
    /// one egress grant, each host with its counts in a comment. Hosts wanted fewer than
    /// `min_count` times are left out (and said so).
    #[must_use]
    pub fn render(&self, name: &str, min_count: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Suggested by `paddock-broker policy suggest` from {} audit records.",
            self.records
        );
        let _ = writeln!(
            out,
            "# REVIEW EVERY HOST before applying: each line widens what runs may reach. No \
             credential is granted here; add substituteAuth and credentials by hand."
        );
        if self.unnamed > 0 {
            let _ = writeln!(
                out,
                "# {} refused connections had no name to grant (IP literals or no SNI): not \
                 suggested.",
                self.unnamed
            );
        }
        if self.malformed > 0 {
            let _ = writeln!(out, "# {} lines were not JSON: skipped.", self.malformed);
        }
        let mut first = true;
        for (namespace, hosts) in &self.wanted {
            let kept: BTreeMap<&String, &Wanted> = hosts
                .iter()
                .filter(|(_, w)| w.denied + w.discovery >= min_count)
                .collect();
            let dropped = hosts.len() - kept.len();
            if kept.is_empty() {
                let _ = writeln!(
                    out,
                    "# namespace {namespace}: {dropped} host(s) wanted fewer than {min_count} \
                     times: not suggested."
                );
                continue;
            }
            if !first {
                out.push_str("---\n");
            }
            first = false;
            // Group hosts by their exact port set.
            let mut groups: BTreeMap<Vec<u16>, Vec<(&String, &Wanted)>> = BTreeMap::new();
            for (host, w) in &kept {
                groups
                    .entry(w.ports.iter().copied().collect())
                    .or_default()
                    .push((host, w));
            }
            let _ = writeln!(out, "apiVersion: paddock.dev/v1");
            let _ = writeln!(out, "kind: BrokerPolicy");
            let _ = writeln!(out, "metadata:");
            let _ = writeln!(
                out,
                "  name: {name}-{namespace}   # as a cluster object: namespace {namespace}"
            );
            let _ = writeln!(out, "spec:");
            let _ = writeln!(out, "  appliesTo:");
            let _ = writeln!(out, "    namespaces: [{namespace}]");
            let _ = writeln!(out, "  egress:");
            for (ports, members) in &groups {
                let _ = writeln!(out, "    - hosts:");
                for (host, w) in members {
                    let runs: Vec<&str> = w.runs.iter().map(String::as_str).take(5).collect();
                    let more = w.runs.len().saturating_sub(runs.len());
                    let _ = writeln!(
                        out,
                        "        - {host}   # {} denied, {} via discovery; runs: {}{}",
                        w.denied,
                        w.discovery,
                        if runs.is_empty() {
                            "-".to_owned()
                        } else {
                            runs.join(", ")
                        },
                        if more > 0 {
                            format!(" and {more} more")
                        } else {
                            String::new()
                        }
                    );
                }
                let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                let _ = writeln!(out, "      ports: [{}]", ports.join(", "));
            }
            if dropped > 0 {
                let _ = writeln!(
                    out,
                    "# {dropped} more host(s) wanted fewer than {min_count} times: not suggested."
                );
            }
        }
        if first && self.wanted.is_empty() {
            let _ = writeln!(out, "# Nothing was denied or let through by discovery.");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BROKER: &str = r#"{"ts":"t","event":"egress-denied","caller":"proxy","namespace":"team-a","run":"r1","host":"api.github.com","port":443,"reason":"x"}
{"ts":"t","event":"egress-discovery","caller":"proxy","namespace":"team-a","run":"r2","host":"API.github.com.","port":443,"policy":"p"}
{"ts":"t","event":"credential-issued","caller":"ctrl","namespace":"team-a","run":"r1","credential":"gh"}
{"ts":"t","event":"egress-denied","caller":"proxy","namespace":"team-a","run":"r1","host":"files.pythonhosted.org","port":443}
{"ts":"t","event":"egress-denied","caller":"proxy","namespace":"team-b","run":"r9","host":"registry.npmjs.org","port":443}
{"ts":"t","event":"egress-denied","caller":"proxy","namespace":"team-a","run":"r1","host":"10.0.0.1","port":443}
not json
"#;

    const PROXY: &str = r#"{"ts":"t","run":"local","conn":"1","kind":"deny","dst":"93.184.216.34:80","port":80,"sni":"example.com","mode":"transparent"}
{"ts":"t","run":"local","conn":"2","kind":"deny","dst":"93.184.216.34:443","port":443,"sni":null,"mode":"transparent"}
{"ts":"t","run":"local","conn":"3","kind":"allow","port":443,"sni":"ok.example","mode":"transparent"}
{"ts":"t","run":"local","conn":"4","kind":"deny","port":443,"sni":"example.com","mode":"transparent"}
"#;

    #[test]
    fn groups_hosts_by_namespace_and_ports_and_skips_what_cannot_be_granted() {
        let mut s = Suggestion::default();
        s.add_jsonl(BROKER, "unused");
        s.add_jsonl(PROXY, "local-ns");
        assert_eq!(s.records, 11);
        assert_eq!(s.malformed, 1);
        assert_eq!(
            s.unnamed, 2,
            "the IP literal and the connection without SNI"
        );
        let gh = &s.wanted["team-a"]["api.github.com"];
        assert_eq!(
            (gh.denied, gh.discovery),
            (1, 1),
            "one host however it is spelled"
        );
        assert_eq!(gh.runs.iter().collect::<Vec<_>>(), ["r1", "r2"]);
        assert_eq!(
            s.wanted["local-ns"]["example.com"].ports,
            BTreeSet::from([80, 443])
        );
        assert!(!s.wanted["local-ns"].contains_key("ok.example"), "allowed");

        let text = s.render("suggested", 1);
        // The snippet is a valid policy set, and it grants what was wanted and nothing else.
        let docs = crate::policy::Policy::parse_text(
            std::path::Path::new("suggested.yaml"),
            &text,
            time::OffsetDateTime::now_utc(),
        )
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let policy = crate::policy::Policy::from_docs(docs).expect("valid set");
        let run = |ns: &str| crate::wire::RunInfo {
            run: "r".into(),
            namespace: ns.into(),
            template: String::new(),
            phase: crate::wire::RunPhase::Running,
        };
        let now = time::OffsetDateTime::now_utc();
        assert!(
            policy
                .egress(&run("team-a"), "api.github.com", 443, now)
                .allowed()
        );
        assert!(
            policy
                .egress(&run("local-ns"), "example.com", 80, now)
                .allowed()
        );
        assert!(
            !policy
                .egress(&run("team-a"), "registry.npmjs.org", 443, now)
                .allowed()
        );
        assert!(
            !policy
                .egress(&run("team-a"), "api.github.com", 80, now)
                .allowed()
        );
        assert!(
            !policy
                .egress(&run("team-a"), "10.0.0.1", 443, now)
                .allowed()
        );
        assert!(
            text.contains("# 2 refused connections had no name"),
            "{text}"
        );
        assert!(text.contains("api.github.com   # 1 denied, 1 via discovery; runs: r1, r2"));
        assert!(text.contains("REVIEW EVERY HOST"));
    }

    #[test]
    fn rare_hosts_are_left_out_when_asked() {
        let mut s = Suggestion::default();
        s.add_jsonl(BROKER, "x");
        let text = s.render("suggested", 2);
        assert!(text.contains("api.github.com"), "{text}");
        assert!(!text.contains("files.pythonhosted.org"), "{text}");
        assert!(
            text.contains("1 more host(s) wanted fewer than 2 times"),
            "{text}"
        );
        assert!(
            text.contains("namespace team-b: 1 host(s) wanted fewer than 2 times"),
            "{text}"
        );
    }

    #[test]
    fn nothing_to_suggest_says_so() {
        let mut s = Suggestion::default();
        s.add_jsonl("", "x");
        assert!(s.render("s", 1).contains("Nothing was denied"));
    }
}
