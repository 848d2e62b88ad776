//! The audit log's placeholder redaction: no well-formed placeholder (as the broker issues
//! and recognises them) may survive it, wherever it is glued, and text without one is kept.
#![no_main]

use libfuzzer_sys::fuzz_target;
use paddock_broker::bearer::is_bearer;
use paddock_proxy::fuzzing::{redact_placeholders, redacted_path};
use percent_encoding::percent_decode_str;

/// Longest `<kind>-` the redaction looks at (`PLACEHOLDER_MAX_KIND` in audit.rs); the
/// broker's kinds are a few words.
const MAX_KIND: usize = 128;

/// A placeholder starting anywhere in `text`, glued to anything.
fn holds_placeholder(text: &str) -> Option<&str> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b == b'-';
    let bytes = text.as_bytes();
    for (at, _) in text.match_indices("pdk-") {
        let end = bytes[at..]
            .iter()
            .position(|b| !token(*b))
            .map_or(bytes.len(), |n| at + n);
        let longest = (at + 4 + MAX_KIND + 48).min(end);
        if (at + 4..=longest).any(|e| is_bearer(&text[at..e])) {
            return Some(&text[at..end]);
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let out = redact_placeholders(text.to_owned());
    if let Some(p) = holds_placeholder(&out) {
        panic!("placeholder {p:?} survived redaction");
    }
    if holds_placeholder(text).is_none() {
        assert_eq!(out, text, "text without a placeholder was changed");
    }

    let path = redacted_path(text);
    for segment in path.split('/') {
        let decoded = percent_decode_str(segment).decode_utf8_lossy();
        if let Some(p) = holds_placeholder(&decoded) {
            panic!("placeholder {p:?} survived path redaction");
        }
    }
    assert_eq!(
        path.split('/').count(),
        text.split('/').count(),
        "segments lost"
    );
});
