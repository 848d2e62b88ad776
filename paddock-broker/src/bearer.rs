//! Placeholder bearers: `pdk-<provider>-<48 hex>` from a CSPRNG, stored only as SHA-256.

use paddock_wire::placeholder;
use sha2::{Digest, Sha256};

use crate::secrets::Secret;

/// A new bearer for `provider` (a kind such as `user-secret`), in the placeholder format of
/// [`paddock_wire::placeholder`]. Provider kinds are fixed names, so a kind the format refuses
/// is a programming error; the random source failing is reported.
pub fn generate(provider: &str) -> Result<Secret, placeholder::GenerateError> {
    placeholder::generate(provider).map(Secret::new)
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
    placeholder::is_placeholder(token.as_bytes())
}

/// Every well-formed bearer embedded in `text` (delimited by characters that cannot be part
/// of one).
pub fn find_in(text: &str) -> impl Iterator<Item = &str> {
    placeholder::find_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_bearers_are_well_formed_and_unique() {
        let a = generate("user-secret").expect("generate");
        let b = generate("user-secret").expect("generate");
        assert!(is_bearer(a.expose()), "{}", a.expose().len());
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with("pdk-user-secret-"));
        assert_eq!(a.expose().len(), "pdk-user-secret-".len() + 48);
    }

    #[test]
    fn finds_embedded_bearers_only_when_delimited() {
        let t = generate("pat-pool").expect("generate");
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
