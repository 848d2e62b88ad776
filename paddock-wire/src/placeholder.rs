//! The placeholder format, `pdk-<kind>-<48 lowercase hex>`: the only form of a credential an
//! agent ever holds.
//!
//! `<kind>` is the provider kind (`user-secret`, `pat-pool`, ...): lowercase ASCII letters,
//! digits and `-`. The random part is 24 bytes from the operating system's CSPRNG. A
//! placeholder inside a longer text counts only when delimited by characters that cannot be
//! part of one (anything but ASCII letters, digits and `-`): `Bearer pdk-...`, `key=pdk-...`.
//!
//! Three views of the same format, one strictness each:
//! * [`is_placeholder`] / [`find`]: exactly well-formed and delimited (what the broker
//!   substitutes and the proxy refuses to forward unsubstituted);
//! * [`may_contain`]: the marker `pdk-` in any case (the proxy's cheap "ask the broker?" test,
//!   deliberately looser so nothing the broker would recognise slips past it);
//! * [`redact`]: anything that *starts* with a placeholder, delimited before (for logs and
//!   audit records, where redacting a little too much is the safe error).

use std::borrow::Cow;
use std::ops::Range;

/// How every placeholder starts.
pub const MARKER: &str = "pdk-";
/// Length of the random part in hex digits.
pub const RANDOM_HEX: usize = 48;
/// What [`redact`] writes instead of a placeholder.
pub const REDACTED: &str = "[redacted]";

/// Why a placeholder could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenerateError {
    /// The kind is empty or has characters other than lowercase letters, digits and `-`.
    BadKind,
    /// The operating system's random source failed.
    Random(String),
}

impl std::fmt::Display for GenerateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadKind => {
                f.write_str("placeholder kind must be lowercase letters, digits and -")
            }
            Self::Random(e) => write!(f, "random source failed: {e}"),
        }
    }
}

impl std::error::Error for GenerateError {}

fn kind_ok(kind: &[u8]) -> bool {
    !kind.is_empty()
        && kind
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// A new placeholder of `kind` (a provider kind such as `user-secret`).
pub fn generate(kind: &str) -> Result<String, GenerateError> {
    if !kind_ok(kind.as_bytes()) {
        return Err(GenerateError::BadKind);
    }
    let mut bytes = [0_u8; RANDOM_HEX / 2];
    getrandom::fill(&mut bytes).map_err(|e| GenerateError::Random(e.to_string()))?;
    Ok(format!("{MARKER}{kind}-{}", hex::encode(bytes)))
}

/// Whether `token` is exactly one well-formed placeholder.
#[must_use]
pub fn is_placeholder(token: &[u8]) -> bool {
    let Some(rest) = token.strip_prefix(MARKER.as_bytes()) else {
        return false;
    };
    if rest.len() < RANDOM_HEX + 2 {
        return false;
    }
    let (kind, random) = rest.split_at(rest.len() - RANDOM_HEX);
    let Some(kind) = kind.strip_suffix(b"-") else {
        return false;
    };
    kind_ok(kind)
        && random
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// A character that can be part of a placeholder (so cannot delimit one).
#[must_use]
pub fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}

/// Where each well-formed, delimited placeholder sits in `text`.
pub fn find(text: &[u8]) -> impl Iterator<Item = Range<usize>> + '_ {
    let marker = MARKER.as_bytes();
    let mut from = 0;
    std::iter::from_fn(move || {
        while let Some(pos) = text
            .get(from..)?
            .windows(marker.len())
            .position(|w| w == marker)
        {
            let at = from + pos;
            let end = text[at..]
                .iter()
                .position(|b| !is_token_char(*b))
                .map_or(text.len(), |n| at + n);
            from = at + 1;
            let delimited = at == 0 || !is_token_char(text[at - 1]);
            if delimited && is_placeholder(&text[at..end]) {
                from = end;
                return Some(at..end);
            }
        }
        None
    })
}

/// Every well-formed, delimited placeholder in `text`.
pub fn find_str(text: &str) -> impl Iterator<Item = &str> + '_ {
    // Ranges start and end next to ASCII bytes (or the ends), so they are char boundaries.
    find(text.as_bytes()).map(move |r| &text[r])
}

/// Whether `bytes` holds the marker in any ASCII case: a request that might carry a
/// placeholder, to be looked at closely.
#[must_use]
pub fn may_contain(bytes: &[u8]) -> bool {
    bytes
        .windows(MARKER.len())
        .any(|w| w.eq_ignore_ascii_case(MARKER.as_bytes()))
}

/// Longest `<kind>-` looked at after the marker; provider kinds are a few words.
const MAX_KIND: usize = 128;

/// Whether `rest` (what follows a marker) starts with `<kind>-<48 lowercase hex>`, whatever
/// follows.
fn starts_with_placeholder(rest: &[u8]) -> bool {
    // Consecutive hex digits since the last `-` that could end the kind.
    let mut random: Option<usize> = None;
    for (i, &b) in rest.iter().enumerate().take(MAX_KIND + RANDOM_HEX) {
        if b == b'-' {
            random = (i > 0).then_some(0);
        } else if !(b.is_ascii_lowercase() || b.is_ascii_digit()) {
            return false;
        } else if let Some(n) = random.as_mut() {
            if b.is_ascii_hexdigit() {
                *n += 1;
                if *n == RANDOM_HEX {
                    return true;
                }
            } else {
                random = None;
            }
        }
    }
    false
}

/// `text` with everything that starts with a placeholder (up to the next character that
/// cannot be part of one) written as [`REDACTED`].
#[must_use]
pub fn redact(text: &str) -> Cow<'_, str> {
    if !text.contains(MARKER) {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut from) = (0, 0);
    while let Some(pos) = text[from..].find(MARKER) {
        let at = from + pos;
        let end = bytes[at..]
            .iter()
            .position(|b| !is_token_char(*b))
            .map_or(bytes.len(), |n| at + n);
        if starts_with_placeholder(&bytes[at + MARKER.len()..end]) {
            // `at` and `end` sit next to ASCII bytes, so both are char boundaries.
            out.push_str(&text[copied..at]);
            out.push_str(REDACTED);
            copied = end;
            from = end;
        } else {
            from = at + 1;
        }
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_placeholders_are_well_formed_and_unique() {
        let a = generate("user-secret").expect("generate");
        let b = generate("user-secret").expect("generate");
        assert!(is_placeholder(a.as_bytes()));
        assert_ne!(a, b);
        assert_eq!(a.len(), "pdk-user-secret-".len() + RANDOM_HEX);
        assert_eq!(generate("Bad Kind"), Err(GenerateError::BadKind));
        assert_eq!(generate(""), Err(GenerateError::BadKind));
    }

    #[test]
    fn placeholders_are_found_only_when_whole_and_delimited() {
        let t = generate("pat-pool").expect("generate");
        assert_eq!(
            find_str(&format!("Bearer {t}")).collect::<Vec<_>>(),
            vec![t.as_str()]
        );
        assert_eq!(find_str(&format!("a={t}&b={t}")).count(), 2);
        assert_eq!(find_str(&format!("{t}0")).count(), 0, "longer token");
        assert_eq!(find_str(&format!("x{t}")).count(), 0, "not delimited");
        assert!(!is_placeholder(b"pdk--0123"));
        assert!(!is_placeholder(t.to_uppercase().as_bytes()));
        assert!(may_contain(b"x PDK-whatever"));
        assert!(!may_contain(b"pd-k"));
    }

    #[test]
    fn redaction_covers_anything_that_starts_with_a_placeholder() {
        let t = generate("user-secret").expect("generate");
        assert_eq!(redact(&format!("/v1/{t}/x")), "/v1/[redacted]/x");
        assert_eq!(redact(&format!("{t}trailing")), REDACTED);
        assert!(matches!(redact("nothing here"), Cow::Borrowed(_)));
        assert!(matches!(redact("pdk-not-one"), Cow::Borrowed(_)));
    }
}
