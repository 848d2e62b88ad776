//! Static API keys: a file of `<key-id>:<sha256-hex>[:<namespace>[:<scope>,<scope>...]]` lines.
//!
//! Only SHA-256 hashes are at rest. Every presented key is hashed and compared against every
//! entry in constant time (no early exit), so timing reveals neither which entry nor how much
//! of a hash matched. `reload` keeps the previous set when the new file does not parse.

use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{AuthError, AuthFuture, Authenticator, Identity, Scope};

#[derive(Debug, thiserror::Error)]
pub enum StaticKeysError {
    #[error("cannot read static keys file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

#[derive(Clone, PartialEq, Eq)]
struct KeyEntry {
    id: String,
    hash: [u8; 32],
    namespace: String,
    scopes: BTreeSet<Scope>,
}

impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEntry")
            .field("id", &self.id)
            .field("namespace", &self.namespace)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// Defaults for lines that omit the namespace or scopes.
#[derive(Clone, Debug, Default)]
pub struct StaticKeyDefaults {
    pub namespace: String,
    pub scopes: BTreeSet<Scope>,
}

#[derive(Debug)]
pub struct StaticKeys {
    path: Option<PathBuf>,
    defaults: StaticKeyDefaults,
    keys: ArcSwap<Vec<KeyEntry>>,
}

/// SHA-256 of a key, lowercase hex: what goes into the keys file.
#[must_use]
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Formats one keys-file line.
#[must_use]
pub fn format_line(id: &str, hash_hex: &str, namespace: &str, scopes: &BTreeSet<Scope>) -> String {
    let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    format!("{id}:{hash_hex}:{namespace}:{}", scopes.join(","))
}

fn parse(
    text: &str,
    path: &Path,
    defaults: &StaticKeyDefaults,
) -> Result<Vec<KeyEntry>, StaticKeysError> {
    let mut out: Vec<KeyEntry> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |message: String| StaticKeysError::Parse {
            path: path.to_owned(),
            line: index + 1,
            message,
        };
        // Scopes contain ':' themselves, so the fourth field takes the rest of the line.
        let mut parts = line.splitn(4, ':');
        let id = parts.next().unwrap_or_default().trim();
        let hash_hex = parts
            .next()
            .ok_or_else(|| err("expected <key-id>:<sha256-hex>".into()))?
            .trim();
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(err("key id must be non-empty [A-Za-z0-9-_.]".into()));
        }
        let mut hash = [0_u8; 32];
        hex::decode_to_slice(hash_hex, &mut hash)
            .map_err(|_| err("hash must be 64 hex characters (sha256)".into()))?;
        let namespace = match parts.next().map(str::trim) {
            Some(ns) if !ns.is_empty() => ns.to_owned(),
            _ => defaults.namespace.clone(),
        };
        if namespace.is_empty() {
            return Err(err(
                "no namespace on the line and no default namespace configured".into(),
            ));
        }
        let scopes = match parts.next().map(str::trim) {
            Some(list) if !list.is_empty() => list
                .split(',')
                .map(|s| {
                    Scope::parse(s.trim())
                        .ok_or_else(|| err(format!("unknown scope {:?}", s.trim())))
                })
                .collect::<Result<BTreeSet<_>, _>>()?,
            _ => defaults.scopes.clone(),
        };
        if out.iter().any(|k| k.id == id) {
            return Err(err(format!("duplicate key id {id:?}")));
        }
        out.push(KeyEntry {
            id: id.to_owned(),
            hash,
            namespace,
            scopes,
        });
    }
    Ok(out)
}

impl StaticKeys {
    /// Loads the keys file; fails if it cannot be read or parsed.
    pub fn load(path: &Path, defaults: StaticKeyDefaults) -> Result<Self, StaticKeysError> {
        let keys = Self::read(path, &defaults)?;
        Ok(Self {
            path: Some(path.to_owned()),
            defaults,
            keys: ArcSwap::from_pointee(keys),
        })
    }

    /// Keys given as text (tests, embedded mode); `reload` is then a no-op.
    pub fn from_text(text: &str, defaults: StaticKeyDefaults) -> Result<Self, StaticKeysError> {
        let keys = parse(text, Path::new("<inline>"), &defaults)?;
        Ok(Self {
            path: None,
            defaults,
            keys: ArcSwap::from_pointee(keys),
        })
    }

    fn read(path: &Path, defaults: &StaticKeyDefaults) -> Result<Vec<KeyEntry>, StaticKeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| StaticKeysError::Read {
            path: path.to_owned(),
            source,
        })?;
        parse(&text, path, defaults)
    }

    /// Re-reads the file. On error the previous set stays active and the error is returned.
    pub fn reload(&self) -> Result<usize, StaticKeysError> {
        let Some(path) = &self.path else {
            return Ok(self.keys.load().len());
        };
        let keys = Self::read(path, &self.defaults)?;
        let n = keys.len();
        self.keys.store(Arc::new(keys));
        Ok(n)
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.keys.load().len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, bearer: &str) -> Option<KeyEntry> {
        let presented: [u8; 32] = Sha256::digest(bearer.as_bytes()).into();
        let keys = self.keys.load();
        let mut found: Option<&KeyEntry> = None;
        for entry in keys.iter() {
            // Visit every entry: no early exit on a match.
            if bool::from(entry.hash.ct_eq(&presented)) && found.is_none() {
                found = Some(entry);
            }
        }
        found.cloned()
    }
}

impl Authenticator for StaticKeys {
    fn name(&self) -> &'static str {
        "static-keys"
    }

    fn authenticate<'a>(&'a self, bearer: &'a str) -> AuthFuture<'a> {
        let result = match self.lookup(bearer) {
            Some(entry) => Ok(Identity {
                subject: entry.id,
                namespace: entry.namespace,
                service_account: None,
                scopes: entry.scopes,
                backend: "static-keys",
                run: None,
                node: None,
                placement: None,
            }),
            None => Err(AuthError::Unauthenticated(
                "no matching static key".to_owned(),
            )),
        };
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> StaticKeyDefaults {
        StaticKeyDefaults {
            namespace: "default".into(),
            scopes: BTreeSet::from([Scope::Issue]),
        }
    }

    #[tokio::test]
    async fn authenticates_by_hash_with_namespace_and_scopes() {
        let text = format!(
            "# comment\n{}\nk2:{}\n",
            format_line(
                "k1",
                &hash_key("secret-one"),
                "team-a",
                &BTreeSet::from([Scope::Controller, Scope::Issue])
            ),
            hash_key("secret-two")
        );
        let keys = StaticKeys::from_text(&text, defaults()).expect("parse");
        let id = keys.authenticate("secret-one").await.expect("auth");
        assert_eq!(id.subject, "k1");
        assert_eq!(id.namespace, "team-a");
        assert!(id.has(Scope::Controller) && id.may_act_in("elsewhere"));
        let id = keys.authenticate("secret-two").await.expect("auth");
        assert_eq!(
            (id.subject.as_str(), id.namespace.as_str()),
            ("k2", "default")
        );
        assert!(id.has(Scope::Issue) && !id.may_act_in("team-a"));
        assert!(matches!(
            keys.authenticate("secret-three").await,
            Err(AuthError::Unauthenticated(_))
        ));
    }

    #[test]
    fn parse_errors_name_the_line() {
        let err = StaticKeys::from_text(
            "ok:{}\nbad:zz\n".replace("{}", &hash_key("a")).as_str(),
            defaults(),
        )
        .expect_err("must fail");
        assert!(err.to_string().contains(":2:"), "{err}");
        let err = StaticKeys::from_text(&format!("a:{}:ns:broker:nope", hash_key("a")), defaults())
            .expect_err("scope");
        assert!(err.to_string().contains("unknown scope"), "{err}");
    }

    #[tokio::test]
    async fn reload_keeps_previous_set_on_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("a:{}\n", hash_key("one"))).expect("write");
        let keys = StaticKeys::load(&path, defaults()).expect("load");
        std::fs::write(&path, "garbage-without-colon\n").expect("write");
        assert!(keys.reload().is_err());
        assert!(
            keys.authenticate("one").await.is_ok(),
            "old set must survive a broken file"
        );
        std::fs::write(&path, format!("b:{}\n", hash_key("two"))).expect("write");
        assert_eq!(keys.reload().expect("reload"), 1);
        assert!(keys.authenticate("one").await.is_err());
        assert!(keys.authenticate("two").await.is_ok());
    }
}
