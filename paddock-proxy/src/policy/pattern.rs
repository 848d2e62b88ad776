//! Host-name normalisation and host patterns (the matching rules are documented in the parent
//! module).

use std::fmt;
use std::net::IpAddr;

const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// Why a host name (from a request or a rule) is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("host name is empty")]
    Empty,
    #[error("host name {host:?} is not a valid internationalised domain name")]
    Idna { host: String },
    #[error("host name {host:?} has an empty label")]
    EmptyLabel { host: String },
    #[error("host name {host:?} has a label longer than {MAX_LABEL_LEN} bytes")]
    LabelTooLong { host: String },
    #[error("host name {host:?} is longer than {MAX_NAME_LEN} bytes")]
    TooLong { host: String },
    #[error("host name {host:?} contains {ch:?}; only letters, digits, '-' and '_' are allowed")]
    InvalidChar { host: String, ch: char },
    #[error(
        "host name {host:?} ends in a numeric label; it is neither a valid IP literal nor a DNS name"
    )]
    NumericTail { host: String },
}

/// Normalises a host name or IP literal (see the parent module docs for the exact rules).
pub fn normalize_host(input: &str) -> Result<String, HostError> {
    if input.is_empty() {
        return Err(HostError::Empty);
    }
    if let Some(ip) = parse_ip_literal(input) {
        return Ok(ip.to_string());
    }
    let trimmed = input.strip_suffix('.').unwrap_or(input);
    if trimmed.is_empty() {
        return Err(HostError::Empty);
    }
    // Reject what IDNA would silently rewrite into something else (e.g. a full stop variant
    // turning into a label separator is fine, but control characters and spaces are not).
    if let Some(ch) = trimmed
        .chars()
        .find(|c| c.is_ascii() && !is_name_char(*c) && *c != '.')
    {
        return Err(HostError::InvalidChar {
            host: input.to_owned(),
            ch: ch.to_ascii_lowercase(),
        });
    }
    let ascii = idna::domain_to_ascii(trimmed).map_err(|_| HostError::Idna {
        host: input.to_owned(),
    })?;
    validate_ascii_name(&ascii, input)?;
    Ok(ascii)
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

fn parse_ip_literal(input: &str) -> Option<IpAddr> {
    let inner = input
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(input);
    inner.parse::<IpAddr>().ok()
}

fn validate_ascii_name(ascii: &str, original: &str) -> Result<(), HostError> {
    if ascii.is_empty() {
        return Err(HostError::Empty);
    }
    if ascii.len() > MAX_NAME_LEN {
        return Err(HostError::TooLong {
            host: original.to_owned(),
        });
    }
    let mut last = "";
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(HostError::EmptyLabel {
                host: original.to_owned(),
            });
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(HostError::LabelTooLong {
                host: original.to_owned(),
            });
        }
        if let Some(ch) = label.chars().find(|c| !is_name_char(*c)) {
            return Err(HostError::InvalidChar {
                host: original.to_owned(),
                ch,
            });
        }
        last = label;
    }
    // "127.1", "0x7f.1" and friends are IPv4 shorthands to inet_aton and to URL parsers; a name
    // that some client would dial as an address must never reach matching as a "name".
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || (last.starts_with("0x") && last[2..].bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric {
        return Err(HostError::NumericTail {
            host: original.to_owned(),
        });
    }
    Ok(())
}

/// Why a host pattern in a rule is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("pattern {pattern:?}: '*' is only allowed as a whole first label (\"*.example.com\")")]
    MisplacedWildcard { pattern: String },
    #[error("pattern {pattern:?}: wildcards do not apply to IP literals")]
    WildcardIp { pattern: String },
    #[error("pattern \"*\" matches every host; set allow_any_host = true to permit it")]
    AnyNotAllowed,
    #[error("pattern {pattern:?}: {source}")]
    Host { pattern: String, source: HostError },
}

/// One host pattern of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: every host.
    Any,
    /// `example.com`: exactly that name.
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: strict subdomains at any depth.
    Subdomains(String),
    /// An IP literal.
    Ip(IpAddr),
}

impl HostPattern {
    /// Parses and normalises a pattern. `allow_any` permits the bare `*`.
    pub fn parse(pattern: &str, allow_any: bool) -> Result<Self, PatternError> {
        if pattern == "*" {
            return if allow_any {
                Ok(HostPattern::Any)
            } else {
                Err(PatternError::AnyNotAllowed)
            };
        }
        let (wild, rest) = match pattern.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, pattern),
        };
        if rest.contains('*') {
            return Err(PatternError::MisplacedWildcard {
                pattern: pattern.to_owned(),
            });
        }
        let host_err = |source| PatternError::Host {
            pattern: pattern.to_owned(),
            source,
        };
        if !wild && let Some(ip) = parse_ip_literal(rest) {
            return Ok(HostPattern::Ip(ip));
        }
        let norm = normalize_host(rest).map_err(host_err)?;
        if wild {
            if norm.parse::<IpAddr>().is_ok() {
                return Err(PatternError::WildcardIp {
                    pattern: pattern.to_owned(),
                });
            }
            Ok(HostPattern::Subdomains(format!(".{norm}")))
        } else {
            Ok(HostPattern::Exact(norm))
        }
    }

    /// Whether this pattern matches an already-normalised host.
    #[must_use]
    pub fn matches(&self, host: &str) -> bool {
        self.matches_parsed(host, host.parse::<IpAddr>().ok())
    }

    pub(super) fn matches_parsed(&self, host: &str, host_ip: Option<IpAddr>) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(name) => host_ip.is_none() && host == name,
            HostPattern::Subdomains(suffix) => {
                host_ip.is_none() && host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
            HostPattern::Ip(ip) => host_ip == Some(*ip),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Subdomains(suffix) => write!(f, "*{suffix}"),
            HostPattern::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type HostCheck = fn(&HostError) -> bool;
    type PatternCheck = fn(&PatternError) -> bool;

    #[test]
    fn normalisation_table() {
        let ok: &[(&str, &str)] = &[
            ("Example.COM", "example.com"),
            ("example.com.", "example.com"),
            ("API.Example.com.", "api.example.com"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("bücher.example", "xn--bcher-kva.example"),
            ("BÜCHER.example", "xn--bcher-kva.example"),
            ("_dmarc.example.com", "_dmarc.example.com"),
            ("a-b.example", "a-b.example"),
            ("192.0.2.1", "192.0.2.1"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("[2001:DB8::1]", "2001:db8::1"),
            ("localhost", "localhost"),
            // Full-width letters and the ideographic full stop map to their ASCII forms.
            ("ｅｘａｍｐｌｅ。ｃｏｍ", "example.com"),
        ];
        for (input, want) in ok {
            assert_eq!(
                normalize_host(input).as_deref(),
                Ok(*want),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn normalisation_rejects() {
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}com", "abcdefghi.".repeat(26));
        let bad: &[(&str, HostCheck)] = &[
            ("", |e| matches!(e, HostError::Empty)),
            (".", |e| matches!(e, HostError::Empty)),
            ("a..b.com", |e| matches!(e, HostError::EmptyLabel { .. })),
            (".example.com", |e| {
                matches!(e, HostError::EmptyLabel { .. })
            }),
            ("example.com..", |e| {
                matches!(e, HostError::EmptyLabel { .. })
            }),
            ("exa mple.com", |e| {
                matches!(e, HostError::InvalidChar { ch: ' ', .. })
            }),
            ("exa*mple.com", |e| {
                matches!(e, HostError::InvalidChar { ch: '*', .. })
            }),
            ("evil.com/x", |e| {
                matches!(e, HostError::InvalidChar { ch: '/', .. })
            }),
            ("evil.com:443", |e| {
                matches!(e, HostError::InvalidChar { ch: ':', .. })
            }),
            ("127.1", |e| matches!(e, HostError::NumericTail { .. })),
            ("0x7f.1", |e| matches!(e, HostError::NumericTail { .. })),
            ("a.0x7f", |e| matches!(e, HostError::NumericTail { .. })),
            ("1.2.3.4.5", |e| matches!(e, HostError::NumericTail { .. })),
            (long_label.as_str(), |e| {
                matches!(e, HostError::LabelTooLong { .. })
            }),
            (long_name.as_str(), |e| {
                matches!(e, HostError::TooLong { .. })
            }),
        ];
        for (input, check) in bad {
            match normalize_host(input) {
                Err(e) => assert!(check(&e), "input {input:?}: unexpected error {e:?}"),
                Ok(v) => panic!("input {input:?} normalised to {v:?}, expected an error"),
            }
        }
    }

    #[test]
    fn pattern_matching_table() {
        // (pattern, host, expected)
        let table: &[(&str, &str, bool)] = &[
            ("example.com", "example.com", true),
            ("example.com", "www.example.com", false),
            ("example.com", "example.com.evil", false),
            ("example.com", "notexample.com", false),
            ("Example.COM.", "example.com", true),
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "a.b.c.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "badexample.com", false),
            ("*.example.com", "a.example.com.evil", false),
            ("*.example.com", "aexample.com", false),
            ("*.EXAMPLE.com", "x.example.com", true),
            ("*.bücher.example", "www.xn--bcher-kva.example", true),
            ("bücher.example", "xn--bcher-kva.example", true),
            ("192.0.2.1", "192.0.2.1", true),
            ("192.0.2.1", "192.0.2.10", false),
            ("[2001:db8::1]", "2001:db8::1", true),
            ("*", "anything.example", true),
            ("*", "192.0.2.1", true),
        ];
        for (pattern, host, want) in table {
            let p = HostPattern::parse(pattern, true)
                .unwrap_or_else(|e| panic!("pattern {pattern:?} failed to parse: {e}"));
            let host = normalize_host(host).unwrap_or_else(|e| panic!("host {host:?}: {e}"));
            assert_eq!(p.matches(&host), *want, "pattern {pattern:?} host {host:?}");
        }
    }

    #[test]
    fn globs_never_match_ip_literals() {
        // Even a hand-built suffix that looks like the tail of an address does not match it.
        let p = HostPattern::Subdomains(".0.2.1".to_owned());
        assert!(!p.matches("192.0.2.1"));
        assert!(!HostPattern::Exact("192.0.2.1".to_owned()).matches("192.0.2.1"));
        assert!(HostPattern::Ip("192.0.2.1".parse().expect("literal")).matches("192.0.2.1"));
    }

    #[test]
    fn invalid_patterns() {
        let table: &[(&str, bool, PatternCheck)] = &[
            ("*", false, |e| matches!(e, PatternError::AnyNotAllowed)),
            ("a*b.com", true, |e| {
                matches!(e, PatternError::MisplacedWildcard { .. })
            }),
            ("*example.com", true, |e| {
                matches!(e, PatternError::MisplacedWildcard { .. })
            }),
            ("www.*.com", true, |e| {
                matches!(e, PatternError::MisplacedWildcard { .. })
            }),
            ("*.*.com", true, |e| {
                matches!(e, PatternError::MisplacedWildcard { .. })
            }),
            ("**.com", true, |e| {
                matches!(e, PatternError::MisplacedWildcard { .. })
            }),
            ("example.*", true, |e| {
                matches!(e, PatternError::MisplacedWildcard { .. })
            }),
            ("*.", true, |e| matches!(e, PatternError::Host { .. })),
            ("*..com", true, |e| matches!(e, PatternError::Host { .. })),
            ("a..com", true, |e| matches!(e, PatternError::Host { .. })),
            ("", true, |e| matches!(e, PatternError::Host { .. })),
            ("*.192.0.2.1", true, |e| {
                matches!(e, PatternError::WildcardIp { .. })
            }),
            ("*.[::1]", true, |e| {
                matches!(e, PatternError::WildcardIp { .. })
            }),
            ("*.2.1", true, |e| matches!(e, PatternError::Host { .. })),
        ];
        for (pattern, allow_any, check) in table {
            match HostPattern::parse(pattern, *allow_any) {
                Err(e) => assert!(check(&e), "pattern {pattern:?}: unexpected error {e:?}"),
                Ok(p) => panic!("pattern {pattern:?} parsed as {p:?}, expected an error"),
            }
        }
    }
}
