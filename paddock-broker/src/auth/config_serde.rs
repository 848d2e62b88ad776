//! Config field formats shared by the auth backends.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use serde::{Deserialize, Deserializer, de::Error as _};

use super::Scope;

/// Scopes by wire name (`broker:issue`, ...); an unknown name is a config error.
pub(crate) fn scope_set<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeSet<Scope>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    parse_scopes(&names).map_err(D::Error::custom)
}

/// A map from a name to scopes by wire name.
pub(crate) fn scope_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, BTreeSet<Scope>>, D::Error> {
    let raw = BTreeMap::<String, Vec<String>>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, names)| parse_scopes(&names).map(|s| (k, s)))
        .collect::<Result<_, _>>()
        .map_err(D::Error::custom)
}

fn parse_scopes(names: &[String]) -> Result<BTreeSet<Scope>, String> {
    names
        .iter()
        .map(|n| Scope::parse(n).ok_or_else(|| format!("unknown scope {n:?}")))
        .collect()
}

/// A duration: an integer number of seconds, or a string with a unit
/// (`"250ms"`, `"30s"`, `"5m"`, `"1h"`).
pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(s) => Ok(Duration::from_secs(s)),
        Raw::Text(t) => parse(&t).ok_or_else(|| {
            D::Error::custom(format!(
                "invalid duration {t:?} (use e.g. 250ms, 30s, 5m, 1h)"
            ))
        }),
    }
}

fn parse(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_names() {
        assert_eq!(
            parse_scopes(&["broker:issue".into(), "broker:controller".into()]),
            Ok(BTreeSet::from([Scope::Issue, Scope::Controller]))
        );
        assert!(parse_scopes(&["Issue".into()]).is_err());
    }

    #[test]
    fn units() {
        assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Some(Duration::from_mins(5)));
        assert_eq!(parse("1h"), Some(Duration::from_hours(1)));
        assert_eq!(parse("30"), None);
        assert_eq!(parse("s"), None);
        assert_eq!(parse("3d"), None);
    }
}
