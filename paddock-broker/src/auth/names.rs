//! Validation of the names an identity carries, so a token can never smuggle an odd string
//! (path separators, control characters, huge values) into routing, storage or logs.

/// A Kubernetes namespace (RFC 1123 label): 1-63 of `[a-z0-9-]`, alphanumeric at both ends.
pub(crate) fn is_namespace(s: &str) -> bool {
    is_dns_label(s, 63)
}

/// A Kubernetes service account name (RFC 1123 subdomain): 1-253 of `[a-z0-9.-]`, made of
/// labels that are alphanumeric at both ends.
pub(crate) fn is_service_account(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(|label| is_dns_label(label, 63))
}

/// A Kubernetes node name (RFC 1123 subdomain, like a service account name).
pub fn is_node_name(s: &str) -> bool {
    is_service_account(s)
}

/// A Kubernetes label value: 1-63 of `[A-Za-z0-9._-]`, alphanumeric at both ends (the empty
/// value is valid in Kubernetes but names no run).
pub(crate) fn is_label_value(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A run id: 1-253 of `[A-Za-z0-9._-]`, starting with an alphanumeric.
pub(crate) fn is_run_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A subject: 1-512 printable characters without control characters.
pub(crate) fn is_subject(s: &str) -> bool {
    !s.is_empty() && s.len() <= 512 && !s.chars().any(char::is_control)
}

fn is_dns_label(s: &str, max: usize) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= max
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_namespace("team-a"));
        assert!(!is_namespace("Team-a"));
        assert!(!is_namespace("-a"));
        assert!(!is_namespace("a/b"));
        assert!(!is_namespace(&"a".repeat(64)));
        assert!(is_service_account("builder.v2"));
        assert!(!is_service_account("builder..v2"));
        assert!(!is_service_account(""));
        assert!(is_run_id("run-01HZ_x.1"));
        assert!(!is_run_id("-run"));
        assert!(!is_run_id("run id"));
        assert!(!is_run_id("run\n"));
        assert!(is_label_value("Run-01HZ_x.1"));
        assert!(!is_label_value("run-"));
        assert!(!is_label_value("a/b"));
        assert!(!is_label_value("a&labelSelector=x"));
        assert!(!is_label_value(&"a".repeat(64)));
        assert!(is_node_name("ip-10-0-0-1.ec2.internal"));
        assert!(!is_node_name("node/../a"));
        assert!(is_subject("user@example.com"));
        assert!(!is_subject("a\u{7}b"));
    }
}
