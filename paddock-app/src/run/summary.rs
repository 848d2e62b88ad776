//! What `run` tells its user on the terminal: one line as each connection or name is denied,
//! and a summary when the command ends (requests, denials by host, substitutions by
//! credential, bytes). `--quiet` turns both off; the audit trail is unchanged either way.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use paddock_proxy::audit::{AuditEvent, AuditKind, AuditObserver};
use paddock_proxy::metrics::{Direction, ProxyMetrics};

/// Denial lines printed before the rest are only counted (a command retrying in a loop must
/// not bury the terminal).
const MAX_DENIAL_LINES: u64 = 50;

/// Counts what the run's audit records say and prints denials as they happen.
#[derive(Debug, Default)]
pub struct RunTally {
    quiet: bool,
    requests: AtomicU64,
    denial_lines: AtomicU64,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    denied: BTreeMap<String, u64>,
    substituted: BTreeMap<String, u64>,
    scrubbed: u64,
}

impl RunTally {
    #[must_use]
    pub fn new(quiet: bool) -> Self {
        Self {
            quiet,
            ..Self::default()
        }
    }

    /// Where a record says the agent wanted to go.
    fn destination(ev: &AuditEvent) -> String {
        match (&ev.sni, ev.dst) {
            (Some(name), _) if ev.port != 0 => format!("{name}:{}", ev.port),
            (Some(name), _) => name.clone(),
            (None, Some(dst)) => dst.to_string(),
            (None, None) => format!("port {}", ev.port),
        }
    }

    fn say(line: &str) {
        // While an interactive command holds the terminal in raw mode, `\n` alone would not
        // return the cursor.
        let end = if super::pty::terminal_is_raw() {
            "\r\n"
        } else {
            "\n"
        };
        let _ = write!(std::io::stderr().lock(), "{line}{end}");
    }

    /// The summary text (without printing it).
    #[must_use]
    pub fn summary(&self, metrics: &ProxyMetrics) -> String {
        use std::fmt::Write as _;
        let counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = format!(
            "paddock: {} requests; {} bytes out, {} bytes in",
            self.requests.load(Ordering::Relaxed),
            metrics.bytes(Direction::AgentToUpstream),
            metrics.bytes(Direction::UpstreamToAgent),
        );
        if counts.denied.is_empty() {
            out.push_str("; nothing denied");
        } else {
            let total: u64 = counts.denied.values().sum();
            let mut by_host: Vec<(&String, &u64)> = counts.denied.iter().collect();
            by_host.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let shown: Vec<String> = by_host
                .iter()
                .take(10)
                .map(|(h, n)| format!("{h} x{n}"))
                .collect();
            let more = by_host.len().saturating_sub(shown.len());
            let _ = write!(out, "; {total} denied: {}", shown.join(", "));
            if more > 0 {
                let _ = write!(out, " and {more} more");
            }
        }
        if !counts.substituted.is_empty() {
            let subs: Vec<String> = counts
                .substituted
                .iter()
                .map(|(c, n)| format!("{c} x{n}"))
                .collect();
            let _ = write!(out, "; substituted: {}", subs.join(", "));
        }
        if counts.scrubbed > 0 {
            let _ = write!(out, "; {} responses had a secret scrubbed", counts.scrubbed);
        }
        out
    }

    /// Prints the summary unless quiet.
    pub fn print_summary(&self, metrics: &ProxyMetrics) {
        if !self.quiet {
            Self::say(&self.summary(metrics));
        }
    }
}

impl AuditObserver for RunTally {
    fn observe(&self, ev: &AuditEvent) {
        match ev.kind {
            AuditKind::Request => {
                self.requests.fetch_add(1, Ordering::Relaxed);
                if let Some(credential) = &ev.credential {
                    let mut c = self
                        .counts
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    *c.substituted.entry(credential.clone()).or_default() += 1;
                }
            }
            AuditKind::Scrubbed => {
                self.counts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .scrubbed += 1;
            }
            AuditKind::Deny | AuditKind::DnsDeny => {
                let what = Self::destination(ev);
                *self
                    .counts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .denied
                    .entry(what.clone())
                    .or_default() += 1;
                if self.quiet {
                    return;
                }
                let n = self.denial_lines.fetch_add(1, Ordering::Relaxed);
                if n < MAX_DENIAL_LINES {
                    let reason = ev.reason.as_deref().unwrap_or("not allowed by the policy");
                    let kind = if ev.kind == AuditKind::DnsDeny {
                        "name"
                    } else {
                        "connection"
                    };
                    Self::say(&format!("paddock: denied {kind} {what}: {reason}"));
                } else if n == MAX_DENIAL_LINES {
                    Self::say(
                        "paddock: further denials are not shown (counted in the summary and \
                         the audit log)",
                    );
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use paddock_proxy::policy::Mode;

    fn ev(kind: AuditKind, sni: &str) -> AuditEvent {
        AuditEvent::new(kind, "r", Mode::Transparent, 443).with_sni(sni)
    }

    #[test]
    fn counts_requests_denials_and_substitutions() {
        let t = RunTally::new(true);
        t.observe(&ev(AuditKind::Allow, "a.example"));
        let mut req = ev(AuditKind::Request, "a.example");
        t.observe(&req);
        req.credential = Some("gh".to_owned());
        t.observe(&req);
        t.observe(&req);
        t.observe(&ev(AuditKind::Deny, "evil.example"));
        t.observe(&ev(AuditKind::Deny, "evil.example"));
        t.observe(&ev(AuditKind::Deny, "other.example"));
        t.observe(&ev(AuditKind::Scrubbed, "a.example"));
        let m = ProxyMetrics::new();
        m.add_bytes(Direction::AgentToUpstream, 10);
        m.add_bytes(Direction::UpstreamToAgent, 2000);
        let s = t.summary(&m);
        assert!(s.contains("3 requests; 10 bytes out, 2000 bytes in"), "{s}");
        assert!(
            s.contains("3 denied: evil.example:443 x2, other.example:443 x1"),
            "{s}"
        );
        assert!(s.contains("substituted: gh x2"), "{s}");
        assert!(s.contains("1 responses had a secret scrubbed"), "{s}");
    }

    #[test]
    fn a_quiet_run_with_nothing_denied_says_so() {
        let t = RunTally::new(true);
        assert!(t.summary(&ProxyMetrics::new()).contains("nothing denied"));
    }
}
