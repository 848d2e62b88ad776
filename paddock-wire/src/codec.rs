//! The encodings a placeholder hides in, decoded and encoded the same way by the proxy (to
//! decide whether to ask the broker and to apply its edits) and the broker (to find the
//! placeholder and answer), so the two never disagree about what a request carries.

/// `Authorization: Basic base64(user:password)` (RFC 7617).
pub mod basic {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};

    /// The `user` and `password` of a Basic credential header value: scheme matched in any
    /// case, base64 with or without padding, UTF-8, split at the first `:`. `None` for
    /// anything else.
    #[must_use]
    pub fn decode(value: &[u8]) -> Option<(String, String)> {
        let text = String::from_utf8(decode_raw(value)?).ok()?;
        let (user, password) = text.split_once(':')?;
        Some((user.to_owned(), password.to_owned()))
    }

    /// The decoded bytes of a Basic credential header value, whatever they hold (for a quick
    /// look for a placeholder marker, which must not depend on a `:` or on UTF-8).
    #[must_use]
    pub fn decode_raw(value: &[u8]) -> Option<Vec<u8>> {
        let text = std::str::from_utf8(value).ok()?.trim();
        let (scheme, encoded) = text.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let encoded = encoded.trim();
        STANDARD
            .decode(encoded)
            .or_else(|_| STANDARD_NO_PAD.decode(encoded))
            .ok()
    }

    /// The header value for `user` and `password` (padded base64).
    #[must_use]
    pub fn encode(user: &str, password: &str) -> String {
        format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
    }
}

/// Percent-encoding of URI components (RFC 3986).
pub mod percent {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

    /// Bytes kept as they are: RFC 3986 unreserved only.
    const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');

    /// `value` with every byte but the unreserved ones as `%XX`.
    #[must_use]
    pub fn encode(value: &str) -> String {
        utf8_percent_encode(value, COMPONENT).to_string()
    }

    /// `%XX` sequences decoded; invalid sequences are kept as they are and bytes that are not
    /// UTF-8 become U+FFFD (so ASCII, which every placeholder is, always survives).
    #[must_use]
    pub fn decode_lossy(value: &str) -> String {
        percent_encoding::percent_decode_str(value)
            .decode_utf8_lossy()
            .into_owned()
    }
}

/// `application/x-www-form-urlencoded` query strings, as servers read them.
pub mod query {
    /// The `name=value` pairs of a raw query (without `?`), in order, still encoded. Empty
    /// pieces (`a=1&&b=2`) are skipped; a piece without `=` has an empty value.
    pub fn pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
        query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
    }

    /// A name or value decoded: `+` is a space, then percent-decoding (lossy, see
    /// [`super::percent::decode_lossy`]).
    #[must_use]
    pub fn decode(component: &str) -> String {
        super::percent::decode_lossy(&component.replace('+', " "))
    }

    /// The whole query decoded (for a quick look for a placeholder marker).
    #[must_use]
    pub fn decode_all(query: &str) -> String {
        decode(query)
    }

    /// `query` with the value of every parameter that decodes to exactly `placeholder`
    /// replaced by `secret`, percent-encoded; every other byte is kept as it was. `None` when
    /// no parameter carried it.
    #[must_use]
    pub fn replace_value(query: &str, placeholder: &str, secret: &str) -> Option<String> {
        let mut changed = false;
        let pieces: Vec<String> = query
            .split('&')
            .map(|piece| match piece.split_once('=') {
                Some((name, value)) if decode(value) == placeholder => {
                    changed = true;
                    format!("{name}={}", super::percent::encode(secret))
                }
                _ => piece.to_owned(),
            })
            .collect();
        changed.then(|| pieces.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_accepts_padding_or_not_and_any_scheme_case() {
        assert_eq!(
            basic::decode(b"Basic Z2l0OnNlY3JldA=="),
            Some(("git".into(), "secret".into()))
        );
        assert_eq!(
            basic::decode(b"basic  Z2l0OnNlY3JldA"),
            Some(("git".into(), "secret".into()))
        );
        assert_eq!(basic::decode(b"Bearer Z2l0OnNlY3JldA=="), None);
        assert_eq!(basic::decode(b"Basic !!!"), None);
        assert_eq!(basic::decode(b"Basic bm9jb2xvbg=="), None, "no colon");
        assert_eq!(basic::encode("git", "secret"), "Basic Z2l0OnNlY3JldA==");
    }

    #[test]
    fn queries_decode_as_servers_read_them_and_edits_keep_other_bytes() {
        let q = "a=x+y%2Fz&&flag&key=pdk%2Dk";
        let p: Vec<_> = query::pairs(q).collect();
        assert_eq!(p, vec![("a", "x+y%2Fz"), ("flag", ""), ("key", "pdk%2Dk")]);
        assert_eq!(query::decode("x+y%2Fz"), "x y/z");
        assert_eq!(query::decode("%zz%41"), "%zzA", "invalid escapes are kept");
        assert_eq!(
            query::replace_value(q, "pdk-k", "s/+="),
            Some("a=x+y%2Fz&&flag&key=s%2F%2B%3D".to_owned())
        );
        assert_eq!(query::replace_value(q, "absent", "s"), None);
        assert_eq!(percent::encode("a-b_c.d~e f"), "a-b_c.d~e%20f");
    }
}
