//! Placeholders the agent put where nothing substitutes them are written as `[redacted]`.

use paddock_wire::placeholder;
use percent_encoding::percent_decode_str;

/// What a redacted placeholder is written as.
const REDACTED: &str = placeholder::REDACTED;

/// `text` with every placeholder (and whatever is glued to it) written as `[redacted]`
/// ([`paddock_wire::placeholder::redact`]).
pub(crate) fn redact_placeholders(text: String) -> String {
    match placeholder::redact(&text) {
        std::borrow::Cow::Borrowed(_) => text,
        std::borrow::Cow::Owned(redacted) => redacted,
    }
}

/// `path` with every segment that holds a placeholder, as is or percent-encoded, replaced by
/// `[redacted]`.
pub(crate) fn redacted_path(path: &str) -> String {
    if !path.contains(placeholder::MARKER) && !path.contains('%') {
        return path.to_owned();
    }
    let holds_placeholder = |segment: &str| {
        let decoded = percent_decode_str(segment).decode_utf8_lossy().into_owned();
        redact_placeholders(decoded.clone()) != decoded
    };
    path.split('/')
        .map(|segment| {
            if holds_placeholder(segment) {
                REDACTED
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}
