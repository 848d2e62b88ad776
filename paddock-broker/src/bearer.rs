//! Placeholder bearers: `pdk-<provider>-<48 hex>` from a CSPRNG, stored only as SHA-256.

use sha2::{Digest, Sha256};

use crate::secrets::Secret;

const PREFIX: &str = "pdk-";
const RANDOM_HEX: usize = 48;

/// A new bearer for `provider` (a kind such as `user-secret`).
#[must_use]
pub fn generate(provider: &str) -> Secret {
    let mut bytes = [0_u8; RANDOM_HEX / 2];
    // ThreadRng is a ChaCha-based CSPRNG seeded and periodically reseeded from the OS.
    rand::fill(&mut bytes[..]);
    Secret::new(format!("{PREFIX}{provider}-{}", hex::encode(bytes)))
}

/// SHA-256 of a bearer: the only form that is stored.
#[must_use]
pub fn hash(bearer: &str) -> [u8; 32] {
    Sha256::digest(bearer.as_bytes()).into()
}

/// Random lease identifier (not a secret: it is useless without the bearer or a caller key).
#[must_use]
pub fn lease_id() -> String {
    let mut bytes = [0_u8; 12];
    rand::fill(&mut bytes[..]);
    format!("lse-{}", hex::encode(bytes))
}

/// Whether `token` is exactly a well-formed bearer.
#[must_use]
pub fn is_bearer(token: &str) -> bool {
    let Some(rest) = token.strip_prefix(PREFIX) else {
        return false;
    };
    if rest.len() < RANDOM_HEX + 2 {
        return false;
    }
    let (kind, random) = rest.split_at(rest.len() - RANDOM_HEX);
    let Some(kind) = kind.strip_suffix('-') else {
        return false;
    };
    !kind.is_empty()
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && random
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Every well-formed bearer embedded in `text` (delimited by characters that cannot be part
/// of one).
pub fn find_in(text: &str) -> impl Iterator<Item = &str> {
    text.match_indices(PREFIX).filter_map(move |(start, _)| {
        let before_ok = text[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !is_token_char(c));
        let len = text[start..]
            .find(|c: char| !is_token_char(c))
            .unwrap_or(text.len() - start);
        let candidate = &text[start..start + len];
        (before_ok && is_bearer(candidate)).then_some(candidate)
    })
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_bearers_are_well_formed_and_unique() {
        let a = generate("user-secret");
        let b = generate("user-secret");
        assert!(is_bearer(a.expose()), "{}", a.expose().len());
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with("pdk-user-secret-"));
        assert_eq!(a.expose().len(), "pdk-user-secret-".len() + 48);
    }

    #[test]
    fn finds_embedded_bearers_only_when_delimited() {
        let t = generate("pat-pool");
        let t = t.expose();
        let text = format!("Bearer {t}");
        assert_eq!(find_in(&text).collect::<Vec<_>>(), vec![t]);
        let text = format!("a={t}&b=1");
        assert_eq!(find_in(&text).count(), 1);
        assert_eq!(
            find_in(&format!("{t}0")).count(),
            0,
            "longer token is not a bearer"
        );
        assert_eq!(find_in(&format!("x{t}")).count(), 0);
        assert!(!is_bearer("pdk--0123"));
        assert!(!is_bearer(&t.to_uppercase()));
    }
}
