//! Which secrets each destination of a run has been sent.
//!
//! A host that was given a secret may hand it back in any later response, not only in the
//! answer to the request that carried it (a request bin listing earlier requests, an error page
//! quoting a stored key). So once a secret has gone to a host, every later response from that
//! host to the same run is scrubbed of it, on every connection of the run.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::matcher::{BuildError, Scrubber, SecretPair};

/// Secrets remembered per host; the oldest are dropped beyond this (rotating tokens).
pub const MAX_SECRETS_PER_HOST: usize = 64;

#[derive(Default)]
struct HostSecrets {
    pairs: Vec<SecretPair>,
    scrubber: Option<Arc<Scrubber>>,
}

/// The secrets sent to each host by one run. Shared by the run's connections.
#[derive(Default)]
pub struct ScrubRegistry {
    hosts: Mutex<HashMap<String, HostSecrets>>,
}

impl std::fmt::Debug for ScrubRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("ScrubRegistry")
            .field("hosts", &hosts.len())
            .finish()
    }
}

impl ScrubRegistry {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Remembers that `pairs` were sent to `host`. Rebuilds the host's matcher only when a
    /// secret is new. On error nothing changes, and the caller must not forward the request:
    /// its responses could not be scrubbed.
    pub fn add(&self, host: &str, pairs: &[SecretPair]) -> Result<(), BuildError> {
        self.add_and_get(host, pairs).map(drop)
    }

    /// [`Self::add`], then [`Self::for_host`], under one lock.
    ///
    /// # Errors
    /// As [`Self::add`]: nothing changes, and the request must not be forwarded.
    pub fn add_and_get(
        &self,
        host: &str,
        pairs: &[SecretPair],
    ) -> Result<Option<Arc<Scrubber>>, BuildError> {
        let key = lowercase(host);
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        if pairs.is_empty() {
            return Ok(hosts.get(key.as_ref()).and_then(|h| h.scrubber.clone()));
        }
        // The same secrets as last time (a reused credential, every request of a run):
        // already the newest, in this order, so nothing would move or be rebuilt.
        if let Some(entry) = hosts.get(key.as_ref())
            && entry.scrubber.is_some()
            && entry.pairs.ends_with(pairs)
        {
            return Ok(entry.scrubber.clone());
        }
        let entry = hosts.entry(key.into_owned()).or_default();
        let mut merged = entry.pairs.clone();
        let mut changed = false;
        for p in pairs {
            if let Some(pos) = merged.iter().position(|q| q.secret == p.secret) {
                // Newest use last, so eviction drops what has not been used for longest.
                let q = merged.remove(pos);
                changed |= q.placeholder != p.placeholder;
                merged.push(p.clone());
            } else {
                merged.push(p.clone());
                changed = true;
            }
        }
        if merged.len() > MAX_SECRETS_PER_HOST {
            merged.drain(..merged.len() - MAX_SECRETS_PER_HOST);
        }
        if changed || entry.scrubber.is_none() {
            entry.scrubber = Scrubber::new(&merged)?.map(Arc::new);
        }
        entry.pairs = merged;
        Ok(entry.scrubber.clone())
    }

    /// The matcher for everything `host` was sent, if anything.
    #[must_use]
    pub fn for_host(&self, host: &str) -> Option<Arc<Scrubber>> {
        let hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        hosts
            .get(lowercase(host).as_ref())
            .and_then(|h| h.scrubber.clone())
    }
}

/// `host` in lower case, copied only when it is not already (names from the proxy are).
fn lowercase(host: &str) -> Cow<'_, str> {
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(secret: &str, placeholder: &str) -> SecretPair {
        SecretPair {
            secret: secret.as_bytes().to_vec(),
            placeholder: placeholder.into(),
        }
    }

    #[test]
    fn secrets_are_per_host_and_accumulate() {
        let r = ScrubRegistry::new();
        assert!(r.for_host("api.example.com").is_none());
        r.add("API.example.com", &[pair("first-secret-1", "P1")])
            .expect("add");
        r.add("api.example.com", &[pair("second-secret-2", "P2")])
            .expect("add");
        let sc = r.for_host("api.example.com").expect("scrubber");
        assert_eq!(
            sc.scrub_all(b"first-secret-1 second-secret-2"),
            Some(b"P1 P2".to_vec())
        );
        assert!(r.for_host("other.example.com").is_none());
        // The same secret again reuses the matcher.
        r.add("api.example.com", &[pair("second-secret-2", "P2")])
            .expect("add");
        assert!(Arc::ptr_eq(
            &sc,
            &r.for_host("api.example.com").expect("scrubber")
        ));
    }

    /// Sending an older secret again makes it the newest, so the bound drops the other one;
    /// the same secret twice in a row changes nothing and rebuilds nothing.
    #[test]
    fn a_secret_sent_again_is_the_newest() {
        let r = ScrubRegistry::new();
        let a = [pair("secret-a-aaaaaaaa", "PA")];
        let b = [pair("secret-b-bbbbbbbb", "PB")];
        r.add_and_get("h", &a).expect("add");
        r.add_and_get("h", &b).expect("add");
        let first = r.add_and_get("H", &a).expect("add").expect("scrubber");
        let again = r.add_and_get("h", &a).expect("add").expect("scrubber");
        assert!(Arc::ptr_eq(&first, &again));
        for i in 0..MAX_SECRETS_PER_HOST - 1 {
            r.add("h", &[pair(&format!("rotating-token-{i:04}"), "P")])
                .expect("add");
        }
        let sc = r.for_host("h").expect("scrubber");
        assert_eq!(sc.scrub_all(b"secret-a-aaaaaaaa"), Some(b"PA".to_vec()));
        assert_eq!(sc.scrub_all(b"secret-b-bbbbbbbb"), None);
        // A new placeholder for a known secret rebuilds the matcher.
        let moved = r
            .add_and_get("h", &[pair("secret-a-aaaaaaaa", "PA2")])
            .expect("add")
            .expect("scrubber");
        assert_eq!(moved.scrub_all(b"secret-a-aaaaaaaa"), Some(b"PA2".to_vec()));
    }

    #[test]
    fn the_least_recently_sent_secret_is_dropped_beyond_the_bound() {
        let r = ScrubRegistry::new();
        for i in 0..=MAX_SECRETS_PER_HOST {
            r.add("h", &[pair(&format!("rotating-token-{i:04}"), "P")])
                .expect("add");
        }
        let sc = r.for_host("h").expect("scrubber");
        assert_eq!(sc.scrub_all(b"rotating-token-0000"), None);
        assert!(sc.scrub_all(b"rotating-token-0001").is_some());
    }
}
