//! The encoded forms a secret can take in a response, each with what replaces it.
//!
//! An upstream that reflects a request (a debug echo endpoint, an error message quoting the
//! key, a redirect carrying it in a query) may hand the secret back raw or encoded. Each form
//! of the secret is paired with the same form of the agent's placeholder, so the agent sees
//! its placeholder where the secret would have been.
//!
//! Base64 needs care: a secret embedded in a longer base64 string (`Basic base64(user:secret)`)
//! is encoded at one of three bit alignments, and the characters at its edges mix its bits with
//! its neighbours'. For each alignment only the characters that depend on the secret's bits
//! alone are matched (and replaced by the placeholder's characters at the same alignment); the
//! edge characters keep at most a few bits of the first and last byte.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};

/// Shortest pattern matched: shorter ones would hit ordinary text by chance.
pub const MIN_PATTERN: usize = 6;

/// One encoded form of a secret and the same form of its placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct Form {
    pub pattern: Vec<u8>,
    pub replacement: Vec<u8>,
}

/// Patterns are secret material: never printed.
impl std::fmt::Debug for Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Form")
            .field("pattern_len", &self.pattern.len())
            .finish_non_exhaustive()
    }
}

/// Secrets with more characters than this that need percent-encoding get only their fully
/// encoded form, not every mix of encoded and raw characters (2^n patterns).
const MAX_PERCENT_MIXES: u32 = 6;

/// Every form of `secret` worth matching (raw and in upper and lower case, JSON- and
/// HTML-escaped, percent-encoded with any mix of raw and encoded reserved characters and
/// either case of hex digits, hex in either case, base64 and base64url at each alignment),
/// paired with the same form of `placeholder`. Forms shorter than [`MIN_PATTERN`] and
/// duplicates are left out.
///
/// Case variants are explicit patterns rather than case-insensitive matching: that would
/// turn off the matcher's prefilter and cost about 30 times the scan (`cargo xtask bench
/// scrub`).
#[must_use]
pub fn forms(secret: &[u8], placeholder: &[u8]) -> Vec<Form> {
    let mut out: Vec<Form> = Vec::new();
    let mut push = |pattern: Vec<u8>, replacement: Vec<u8>| {
        if pattern.len() >= MIN_PATTERN && !out.iter().any(|f| f.pattern == pattern) {
            out.push(Form {
                pattern,
                replacement,
            });
        }
    };
    push(secret.to_vec(), placeholder.to_vec());
    // An upstream that changes the case of what it echoes.
    push(
        secret.to_ascii_uppercase(),
        placeholder.to_ascii_uppercase(),
    );
    push(secret.to_ascii_lowercase(), placeholder.to_vec());
    push(json_escaped(secret), json_escaped(placeholder));
    push(html_escaped(secret), html_escaped(placeholder));
    let reserved = secret.iter().filter(|b| !unreserved(**b)).count();
    let mixes: u64 = match u32::try_from(reserved) {
        Ok(n) if n <= MAX_PERCENT_MIXES => 1 << n,
        _ => 1,
    };
    for upper in [true, false] {
        for mix in 0..mixes {
            // Bit i of `mix` set: the i-th reserved character stays raw (all bits clear: all
            // encoded, the only form when there are too many to mix).
            push(
                percent_encoded(secret, mix, upper),
                percent_encoded(placeholder, 0, upper),
            );
        }
        push(hex(secret, upper), hex(placeholder, upper));
    }
    let filled = base64_filler(placeholder, secret.len());
    for url_safe in [false, true] {
        for align in 0..3 {
            push(
                base64_inner(secret, align, url_safe),
                base64_inner(&filled, align, url_safe),
            );
        }
    }
    out
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// What stands in for the secret inside base64: the placeholder between `~` fillers, as many
/// bytes as the secret modulo 3, so the characters after it keep their bit alignment and the
/// whole still decodes. The two edge characters left from the original mix the neighbours'
/// bits with the secret's first and last byte (at most four bits each); they fall on the
/// fillers, so the placeholder itself decodes intact.
fn base64_filler(placeholder: &[u8], secret_len: usize) -> Vec<u8> {
    let mut r = Vec::with_capacity(placeholder.len() + 4);
    r.push(b'~');
    r.extend_from_slice(placeholder);
    r.push(b'~');
    while r.len() % 3 != secret_len % 3 {
        r.push(b'~');
    }
    r
}

/// As a JSON string body: `"`, `\` and control characters escaped, and `/` as `\/` (what
/// PHP's `json_encode` and others write; the plain `/` is the raw form).
fn json_escaped(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'/' => out.extend_from_slice(b"\\/"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            c if c < 0x20 => out.extend_from_slice(format!("\\u{c:04x}").as_bytes()),
            c => out.push(c),
        }
    }
    out
}

/// Reserved bytes as `%XX`, except the i-th reserved byte when bit i of `keep_raw` is set.
fn percent_encoded(s: &[u8], keep_raw: u64, upper: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0u32;
    for &b in s {
        if unreserved(b) {
            out.push(b);
            continue;
        }
        if i < 64 && keep_raw & (1 << i) != 0 {
            out.push(b);
        } else if upper {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.extend_from_slice(format!("%{b:02x}").as_bytes());
        }
        i += 1;
    }
    out
}

/// As HTML text escapes it (OWASP's list: `& < > " ' /`).
fn html_escaped(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for &b in s {
        match b {
            b'&' => out.extend_from_slice(b"&amp;"),
            b'<' => out.extend_from_slice(b"&lt;"),
            b'>' => out.extend_from_slice(b"&gt;"),
            b'"' => out.extend_from_slice(b"&quot;"),
            b'\'' => out.extend_from_slice(b"&#x27;"),
            b'/' => out.extend_from_slice(b"&#x2F;"),
            c => out.push(c),
        }
    }
    out
}

fn hex(s: &[u8], upper: bool) -> Vec<u8> {
    let h = hex::encode(s);
    if upper {
        h.to_ascii_uppercase().into_bytes()
    } else {
        h.into_bytes()
    }
}

/// The base64 characters of `s` placed `align` bytes into a stream (0, 1 or 2), keeping only
/// the characters whose six bits all come from `s`.
fn base64_inner(s: &[u8], align: usize, url_safe: bool) -> Vec<u8> {
    let mut stream = vec![0u8; align];
    stream.extend_from_slice(s);
    stream.extend_from_slice(&[0, 0]);
    let encoded = if url_safe {
        URL_SAFE.encode(&stream)
    } else {
        STANDARD.encode(&stream)
    };
    // Character j covers bits [6j, 6j + 6); the secret's bits are [8 align, 8 (align + n)).
    let first = (8 * align).div_ceil(6);
    let end = (8 * (align + s.len())) / 6;
    if end <= first {
        return Vec::new();
    }
    encoded.as_bytes()[first..end].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"sk-live-51Hs/Tq+z9";
    const PLACEHOLDER: &[u8] = b"pdk-user-secret-0123456789abcdef";

    fn patterns() -> Vec<Vec<u8>> {
        forms(SECRET, PLACEHOLDER)
            .into_iter()
            .map(|f| f.pattern)
            .collect()
    }

    /// Every form is found inside the real encodings a server would write.
    #[test]
    fn each_form_is_found_where_servers_put_it() {
        let pats = patterns();
        let contains = |hay: &[u8]| pats.iter().any(|p| hay.windows(p.len()).any(|w| w == p));
        let s = std::str::from_utf8(SECRET).expect("ascii");
        let wrapped: Vec<Vec<u8>> = vec![
            SECRET.to_vec(),
            format!("{{\"key\":\"{}\"}}", s.replace('/', "\\/")).into_bytes(),
            format!("?key={}", s.replace('/', "%2F").replace('+', "%2B")).into_bytes(),
            format!("?key={}", s.replace('/', "%2f").replace('+', "%2b")).into_bytes(),
            hex::encode(SECRET).into_bytes(),
            hex::encode_upper(SECRET).into_bytes(),
            // Python's quote() keeps `/`; encodeURIComponent encodes it: both mixes.
            format!("?key={}", s.replace('+', "%2B")).into_bytes(),
            format!("<p>bad key {}</p>", s.replace('/', "&#x2F;")).into_bytes(),
            s.to_ascii_uppercase().into_bytes(),
            s.to_ascii_lowercase().into_bytes(),
        ];
        for w in &wrapped {
            assert!(contains(w), "{}", String::from_utf8_lossy(w));
        }
        // Base64 of the secret after 0..=5 bytes of anything (Basic user:secret), both alphabets.
        for prefix in ["", "u", "us", "use", "user", "user:"] {
            let mut plain = prefix.as_bytes().to_vec();
            plain.extend_from_slice(SECRET);
            plain.extend_from_slice(b"@tail");
            assert!(contains(STANDARD.encode(&plain).as_bytes()), "{prefix}");
            assert!(contains(URL_SAFE.encode(&plain).as_bytes()), "{prefix}");
        }
    }

    /// Replacing the secret's characters inside a longer base64 text leaves valid base64 that
    /// decodes to the neighbours, the placeholder between fillers, and nothing of the secret
    /// beyond a few bits of its first and last byte.
    #[test]
    fn base64_replacements_decode_to_the_placeholder() {
        for prefix in ["", "u", "us", "Bearer ", "x-access-token:"] {
            for secret in [&SECRET[..16], &SECRET[..17], SECRET] {
                let mut plain = prefix.as_bytes().to_vec();
                plain.extend_from_slice(secret);
                plain.extend_from_slice(b" tail");
                let mut text = STANDARD.encode(&plain);
                let f = forms(secret, PLACEHOLDER);
                let hit = f
                    .iter()
                    .filter(|f| f.pattern.len() > 8)
                    .find_map(|f| {
                        text.find(std::str::from_utf8(&f.pattern).ok()?)
                            .map(|at| (at, f))
                    })
                    .expect("a base64 form matches");
                let (at, f) = hit;
                text.replace_range(
                    at..at + f.pattern.len(),
                    std::str::from_utf8(&f.replacement).expect("ascii"),
                );
                let decoded = STANDARD.decode(&text).expect("still valid base64");
                let decoded = String::from_utf8_lossy(&decoded);
                let ph = std::str::from_utf8(PLACEHOLDER).expect("ascii");
                assert!(decoded.starts_with(prefix), "{decoded}");
                assert!(decoded.contains(ph), "{decoded}");
                assert!(decoded.ends_with(" tail"), "{decoded}");
            }
        }
    }

    #[test]
    fn base64_inner_keeps_only_characters_of_the_secret() {
        // 3 bytes at alignment 0: exactly four characters, all from the secret.
        assert_eq!(base64_inner(b"abc", 0, false), b"YWJj");
        // The same bytes one byte in: characters 0 and 1 carry the zero byte's bits and 5
        // those of what follows, so 2..5 are the secret's alone.
        let shifted = STANDARD.encode(b"\0abc\0\0");
        assert_eq!(base64_inner(b"abc", 1, false), &shifted.as_bytes()[2..5]);
    }

    #[test]
    fn replacements_are_the_same_form_of_the_placeholder() {
        let f = forms(SECRET, PLACEHOLDER);
        assert_eq!(f[0].pattern, SECRET);
        assert_eq!(f[0].replacement, PLACEHOLDER);
        let hex_form = f
            .iter()
            .find(|f| f.pattern == hex::encode(SECRET).as_bytes())
            .expect("hex form");
        assert_eq!(hex_form.replacement, hex::encode(PLACEHOLDER).as_bytes());
        assert!(
            !format!("{f:?}").contains("sk-live"),
            "Debug hides patterns"
        );
    }

    #[test]
    fn short_and_duplicate_forms_are_dropped() {
        // Unreserved-only secret: percent forms equal the raw one.
        let f = forms(b"abcdefgh12", PLACEHOLDER);
        let raw = f.iter().filter(|f| f.pattern == b"abcdefgh12").count();
        assert_eq!(raw, 1);
        assert!(f.iter().all(|f| f.pattern.len() >= MIN_PATTERN));
        assert!(forms(b"ab", PLACEHOLDER).is_empty());
    }
}
