//! Host patterns: `api.example.com` (exact) or `*.example.com` (any subdomain, not the apex).

/// Normalises a host for comparison: ASCII lowercase, no trailing dot, no brackets.
#[must_use]
pub fn normalize(host: &str) -> String {
    host.trim_end_matches('.')
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// Checks a pattern is acceptable; a bare `*` or a wildcard not in the leftmost label is not.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    let p = pattern.trim();
    if p.is_empty() {
        return Err("empty host pattern".into());
    }
    let rest = p.strip_prefix("*.").unwrap_or(p);
    if rest.contains('*') {
        return Err(format!(
            "host pattern {p:?}: only a leading \"*.\" wildcard is allowed"
        ));
    }
    if rest.is_empty() || rest.split('.').any(str::is_empty) {
        return Err(format!("host pattern {p:?} has an empty label"));
    }
    if !rest
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-.:".contains(c))
    {
        return Err(format!("host pattern {p:?} contains invalid characters"));
    }
    Ok(())
}

/// Whether `host` matches `pattern` (both normalised here).
#[must_use]
pub fn matches(pattern: &str, host: &str) -> bool {
    let pattern = normalize(pattern);
    let host = normalize(host);
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1 && host.ends_with(suffix) && {
                let cut = host.len() - suffix.len();
                host.as_bytes()[cut - 1] == b'.'
            }
        }
        None => pattern == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globbing() {
        assert!(matches("api.github.com", "API.github.com."));
        assert!(matches("*.github.com", "api.github.com"));
        assert!(matches("*.github.com", "a.b.github.com"));
        assert!(!matches("*.github.com", "github.com"));
        assert!(!matches("*.github.com", "evilgithub.com"));
        assert!(!matches("api.github.com", "api.github.com.evil"));
        assert!(validate_pattern("*").is_err());
        assert!(validate_pattern("a.*.com").is_err());
        assert!(validate_pattern("*.x.com").is_ok());
    }
}
