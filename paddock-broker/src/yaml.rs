//! The broker's one YAML reader, for policy documents and the config file.
//!
//! serde-saphyr: pure Rust and maintained (it replaced `serde_yaml_ng`, unmaintained and built
//! on machine-translated C). The options are the strict ones: a duplicate key, a merge key
//! (`<<`) and YAML 1.1 booleans (`yes`, `off`) are errors, so what the operator reads is what
//! the broker enforces. Alias expansion and nesting are bounded by the parser's budget.

use serde::de::DeserializeOwned;

/// A YAML error: the message and the 1-based line it points at, when known.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}{}", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
pub struct YamlError {
    pub line: Option<usize>,
    pub message: String,
}

fn options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    options.merge_keys = serde_saphyr::MergeKeyPolicy::Error;
    options.strict_booleans = true;
    options.with_snippet = false;
    options
}

/// Deserialises one YAML document.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    serde_saphyr::from_str_with_options(text, options()).map_err(|e| {
        let line = e
            .location()
            .and_then(|l| usize::try_from(l.line()).ok())
            .filter(|&l| l > 0);
        let full = e.to_string();
        // The rendering appends "at line L, column C"; the line is kept separately.
        let message = match full.rfind(" at line ") {
            Some(i) => full[..i].to_owned(),
            None => full,
        };
        YamlError { line, message }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn duplicate_keys_are_refused_with_their_line() {
        let e = from_str::<BTreeMap<String, u16>>("a: 1\nb: 2\na: 3\n").expect_err("duplicate");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("uplicate"), "{e}");
    }

    #[test]
    fn merge_keys_and_yaml_1_1_booleans_are_refused() {
        assert!(from_str::<BTreeMap<String, bool>>("a: yes\n").is_err());
        assert!(from_str::<BTreeMap<String, bool>>("a: true\n").expect("bool")["a"]);
        let merged = "base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\n";
        assert!(from_str::<BTreeMap<String, BTreeMap<String, u8>>>(merged).is_err());
    }
}
