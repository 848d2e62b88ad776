//! A bounded cache of forged leaves with single-flight forging and expiry-aware reuse.
//!
//! Lookups run inside rustls' synchronous certificate resolver. A fresh leaf is returned under
//! a shard read lock; otherwise the first caller for a name takes a `quick_cache` placeholder and
//! signs while later callers for that name block on it (a forge is ~40 us and never awaits, so
//! the wait is short and cannot deadlock against the async runtime). A leaf is not served once
//! it is within the renewal margin of its `notAfter`: it is re-forged, also single-flight.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use quick_cache::sync::{Cache, EntryAction, EntryResult, PlaceholderGuard};
use rustls::sign::CertifiedKey;

use super::TlsError;
use super::ca::RunCa;
use super::forge::{Clock, ForgedLeaf, LeafForger, LeafName, LeafValidity, SystemClock};

/// Default number of cached leaves.
pub const DEFAULT_LEAF_CACHE_CAPACITY: usize = 1024;

/// Tuning for [`LeafCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafCacheConfig {
    /// Maximum number of cached leaves.
    pub capacity: usize,
    /// A leaf is re-forged once it is this close to its `notAfter`.
    pub renew_margin: Duration,
    /// Validity of forged leaves.
    pub validity: LeafValidity,
    /// How long a lookup waits for another connection's forge of the same name.
    pub wait_timeout: Duration,
}

impl Default for LeafCacheConfig {
    fn default() -> Self {
        Self {
            capacity: DEFAULT_LEAF_CACHE_CAPACITY,
            renew_margin: Duration::from_hours(1),
            validity: LeafValidity::default(),
            wait_timeout: Duration::from_secs(5),
        }
    }
}

/// Counters for the metrics layer; all monotonic.
#[derive(Debug, Default)]
pub struct LeafCacheStats {
    hits: AtomicU64,
    misses: AtomicU64,
    forges: AtomicU64,
    forge_failures: AtomicU64,
    renewals: AtomicU64,
    coalesced: AtomicU64,
}

impl LeafCacheStats {
    /// Lookups served with an existing leaf (including ones that waited for another forge).
    #[must_use]
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Lookups that had to sign a leaf themselves.
    #[must_use]
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Leaves signed successfully.
    #[must_use]
    pub fn forges(&self) -> u64 {
        self.forges.load(Ordering::Relaxed)
    }

    /// Signing attempts that failed.
    #[must_use]
    pub fn forge_failures(&self) -> u64 {
        self.forge_failures.load(Ordering::Relaxed)
    }

    /// Forges that replaced an expiring leaf.
    #[must_use]
    pub fn renewals(&self) -> u64 {
        self.renewals.load(Ordering::Relaxed)
    }

    /// Lookups that waited for another connection's forge of the same name.
    #[must_use]
    pub fn coalesced(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct CachedLeaf {
    certified: Arc<CertifiedKey>,
    not_before: SystemTime,
    refresh_at: SystemTime,
}

impl CachedLeaf {
    fn new(leaf: &ForgedLeaf, margin: Duration) -> Self {
        let lifetime = leaf
            .not_after
            .duration_since(leaf.forged_at)
            .unwrap_or(Duration::ZERO);
        // Renew `margin` before expiry; when the CA clamped the leaf shorter than that, renew
        // at half its remaining life rather than on every lookup.
        let refresh_in = lifetime.saturating_sub(margin).max(lifetime / 2);
        Self {
            certified: Arc::clone(&leaf.certified),
            not_before: leaf.not_before,
            refresh_at: leaf.forged_at + refresh_in,
        }
    }

    fn is_fresh(&self, now: SystemTime) -> bool {
        now >= self.not_before && now < self.refresh_at
    }
}

type LeafMap = Cache<LeafName, CachedLeaf>;
type LeafGuard<'a> = PlaceholderGuard<
    'a,
    LeafName,
    CachedLeaf,
    quick_cache::UnitWeighter,
    quick_cache::DefaultHashBuilder,
    quick_cache::sync::DefaultLifecycle<LeafName, CachedLeaf>,
>;

/// One CA and the leaves it signed. Replacing the CA replaces the whole generation, so no
/// leaf outlives (or is served after the replacement of) its issuer.
struct Generation {
    forger: LeafForger,
    leaves: LeafMap,
}

/// Forged leaves by name; one per process, shared by every listener.
///
/// The CA can be replaced while serving ([`LeafCache::replace_ca`], a node agent renewing its
/// short-lived intermediate): handshakes that already have their leaf finish with it, every
/// later lookup forges under the new CA with a new leaf key.
pub struct LeafCache {
    current: RwLock<Arc<Generation>>,
    config: LeafCacheConfig,
    clock: Arc<dyn Clock>,
    stats: LeafCacheStats,
    replacements: AtomicU64,
    /// The CA was revoked and not replaced: nothing is forged or served from the cache.
    withdrawn: AtomicBool,
    #[cfg(test)]
    forge_delay: Duration,
}

impl fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let generation = self.generation();
        f.debug_struct("LeafCache")
            .field("forger", &generation.forger)
            .field("len", &generation.leaves.len())
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl LeafCache {
    /// A cache signing with `ca`, on the system clock.
    pub fn new(ca: RunCa, config: LeafCacheConfig) -> Result<Self, TlsError> {
        Self::with_clock(ca, config, Arc::new(SystemClock))
    }

    /// A cache with an explicit clock (tests move time with it).
    pub fn with_clock(
        ca: RunCa,
        config: LeafCacheConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, TlsError> {
        let generation = Self::new_generation(ca, &config, &clock)?;
        Ok(Self {
            current: RwLock::new(Arc::new(generation)),
            config,
            clock,
            stats: LeafCacheStats::default(),
            replacements: AtomicU64::new(0),
            withdrawn: AtomicBool::new(false),
            #[cfg(test)]
            forge_delay: Duration::ZERO,
        })
    }

    fn new_generation(
        ca: RunCa,
        config: &LeafCacheConfig,
        clock: &Arc<dyn Clock>,
    ) -> Result<Generation, TlsError> {
        Ok(Generation {
            forger: LeafForger::with_options(ca, config.validity, Arc::clone(clock))?,
            leaves: Cache::new(config.capacity.max(1)),
        })
    }

    fn generation(&self) -> Arc<Generation> {
        // A poisoned lock only means a panic elsewhere while swapping an Arc: the value is
        // still one whole generation.
        let guard = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(&guard)
    }

    /// Replaces the CA: every later lookup forges under `ca` (with a new leaf key) and no leaf
    /// of the old CA is served again. Connections already established keep their session.
    pub fn replace_ca(&self, ca: RunCa) -> Result<(), TlsError> {
        let generation = Arc::new(Self::new_generation(ca, &self.config, &self.clock)?);
        let mut guard = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard = generation;
        self.withdrawn.store(false, Ordering::SeqCst);
        drop(guard);
        self.replacements.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Stops forging under the current CA (it was revoked and no replacement could be had):
    /// every lookup fails, cached leaves included, until [`LeafCache::replace_ca`].
    /// Connections already established keep their session.
    pub fn withdraw_ca(&self) {
        self.withdrawn.store(true, Ordering::SeqCst);
    }

    /// Whether the CA was withdrawn and not replaced since.
    #[must_use]
    pub fn ca_withdrawn(&self) -> bool {
        self.withdrawn.load(Ordering::SeqCst)
    }

    /// How many times the CA was replaced.
    #[must_use]
    pub fn ca_replacements(&self) -> u64 {
        self.replacements.load(Ordering::Relaxed)
    }

    /// The current CA's certificate (first of its chain) and validity end.
    #[must_use]
    pub fn ca_summary(&self) -> (rustls_pki_types::CertificateDer<'static>, SystemTime) {
        let generation = self.generation();
        let ca = generation.forger.ca();
        (ca.certificate().clone(), SystemTime::from(ca.not_after()))
    }

    /// The end of the signing CA's validity (the readiness check watches it); a withdrawn
    /// CA has ended.
    #[must_use]
    pub fn ca_not_after(&self) -> time::OffsetDateTime {
        if self.ca_withdrawn() {
            return time::OffsetDateTime::UNIX_EPOCH;
        }
        self.generation().forger.ca().not_after()
    }

    /// The leaf for `name`, forged at most once however many callers ask at the same time.
    pub fn get(&self, name: &LeafName) -> Result<Arc<CertifiedKey>, TlsError> {
        if self.withdrawn.load(Ordering::Relaxed) {
            return Err(TlsError::CaWithdrawn);
        }
        let generation = self.generation();
        let now = self.clock.now();
        if let Some(leaf) = generation.leaves.get(name)
            && leaf.is_fresh(now)
        {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(leaf.certified);
        }
        loop {
            let entry = generation
                .leaves
                .entry(name, Some(self.config.wait_timeout), |_, leaf| {
                    if leaf.is_fresh(now) {
                        EntryAction::Retain(Arc::clone(&leaf.certified))
                    } else {
                        EntryAction::ReplaceWithGuard
                    }
                });
            return match entry {
                EntryResult::Retained(certified) => {
                    // Someone else forged it between our read and the write lock.
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                    Ok(certified)
                }
                EntryResult::Vacant(guard) => self.forge_into(&generation, name, guard, false),
                EntryResult::Replaced(guard, _stale) => {
                    self.forge_into(&generation, name, guard, true)
                }
                // The callback never asks for removal; look again if it ever happens.
                EntryResult::Removed(..) => continue,
                EntryResult::Timeout => Err(TlsError::ForgeWaitTimeout {
                    name: name.to_string(),
                    waited: self.config.wait_timeout,
                }),
            };
        }
    }

    /// [`LeafCache::get`] for a host string (SNI or `CONNECT` target).
    pub fn get_for_host(&self, host: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        self.get(&LeafName::parse(host)?)
    }

    /// Counters for metrics.
    #[must_use]
    pub fn stats(&self) -> &LeafCacheStats {
        &self.stats
    }

    /// Number of cached leaves.
    #[must_use]
    pub fn len(&self) -> usize {
        self.generation().leaves.len()
    }

    /// Whether no leaf is cached.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.generation().leaves.is_empty()
    }

    /// Maximum number of cached leaves.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.config.capacity.max(1)
    }

    fn forge_into(
        &self,
        generation: &Generation,
        name: &LeafName,
        guard: LeafGuard<'_>,
        renewal: bool,
    ) -> Result<Arc<CertifiedKey>, TlsError> {
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        #[cfg(test)]
        if !self.forge_delay.is_zero() {
            std::thread::sleep(self.forge_delay);
        }
        // On failure the guard drops unfilled and the next waiter tries its own forge.
        let leaf = generation.forger.forge(name).inspect_err(|e| {
            self.stats.forge_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%name, error = %e, "forging leaf failed");
        })?;
        self.stats.forges.fetch_add(1, Ordering::Relaxed);
        if renewal {
            self.stats.renewals.fetch_add(1, Ordering::Relaxed);
        }
        let cached = CachedLeaf::new(&leaf, self.config.renew_margin);
        // A failed insert (evicted at once under pressure) still leaves this caller served.
        let _ = guard.insert(cached);
        Ok(leaf.certified)
    }

    #[cfg(test)]
    pub(crate) fn set_forge_delay(&mut self, delay: Duration) {
        self.forge_delay = delay;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;
    use std::thread;

    use super::*;
    use crate::tls::test_support::{ManualClock, test_ca};

    fn name(host: &str) -> LeafName {
        LeafName::parse(host).expect("name")
    }

    #[test]
    fn second_lookup_is_a_hit() {
        let cache = LeafCache::new(test_ca(), LeafCacheConfig::default()).expect("cache");
        let first = cache.get(&name("a.example")).expect("get");
        let second = cache.get_for_host("A.EXAMPLE.").expect("get");
        assert!(
            Arc::ptr_eq(&first, &second),
            "same leaf for the normalised name"
        );
        let other = cache.get(&name("b.example")).expect("get");
        assert!(!Arc::ptr_eq(&first, &other));
        let stats = cache.stats();
        assert_eq!((stats.hits(), stats.misses(), stats.forges()), (1, 2, 2));
        assert_eq!(cache.len(), 2);
        assert!(matches!(
            cache.get_for_host("not a host"),
            Err(TlsError::InvalidLeafName(_))
        ));
    }

    #[test]
    fn expiring_leaves_are_reforged() {
        let clock = ManualClock::starting_now();
        let config = LeafCacheConfig::default(); // 24h leaves, renewed 1h before expiry
        let ca = RunCa::generate("long", Duration::from_hours(24 * 30))
            .expect("CA")
            .ca;
        let cache = LeafCache::with_clock(ca, config, clock.clone()).expect("cache");
        let n = name("api.example.com");
        let first = cache.get(&n).expect("get");

        clock.advance(Duration::from_hours(22) + Duration::from_mins(59));
        let still = cache.get(&n).expect("get");
        assert!(
            Arc::ptr_eq(&first, &still),
            "not yet inside the renewal margin"
        );
        assert_eq!(cache.stats().forges(), 1);

        clock.advance(Duration::from_mins(2));
        let renewed = cache.get(&n).expect("get");
        assert!(
            !Arc::ptr_eq(&first, &renewed),
            "inside the margin: re-forged"
        );
        assert_eq!(cache.stats().forges(), 2);
        assert_eq!(cache.stats().renewals(), 1);
        let again = cache.get(&n).expect("get");
        assert!(Arc::ptr_eq(&renewed, &again), "the renewed leaf is cached");

        // Long idle: the cached leaf has expired outright and must not be served.
        clock.advance(Duration::from_hours(30));
        let fresh = cache.get(&n).expect("get");
        assert!(!Arc::ptr_eq(&renewed, &fresh));
        let (_, cert) = x509_parser::parse_x509_certificate(&fresh.cert[0]).expect("parse");
        let not_after = cert.validity().not_after.to_datetime();
        assert!(SystemTime::from(not_after) > clock.now() + Duration::from_hours(23));
    }

    #[test]
    fn leaves_clamped_by_the_ca_renew_at_half_life_then_fail_closed() {
        let clock = ManualClock::starting_now();
        // The CA ends 2h from now, so every leaf is clamped to 2h: shorter than 24h and only
        // 1h more than the margin.
        let ca = RunCa::generate("short", Duration::from_hours(2))
            .expect("CA")
            .ca;
        let cache =
            LeafCache::with_clock(ca, LeafCacheConfig::default(), clock.clone()).expect("cache");
        let n = name("a.example");
        let first = cache.get(&n).expect("get");
        clock.advance(Duration::from_mins(50));
        assert!(
            Arc::ptr_eq(&first, &cache.get(&n).expect("get")),
            "served until half-life"
        );
        clock.advance(Duration::from_mins(15));
        let second = cache.get(&n).expect("get");
        assert!(!Arc::ptr_eq(&first, &second), "re-forged after half-life");

        clock.advance(Duration::from_hours(2));
        let err = cache.get(&n).expect_err("CA expired");
        assert!(matches!(err, TlsError::CaNotValidNow { .. }), "{err}");
        assert_eq!(cache.stats().forge_failures(), 1);
    }

    #[test]
    fn capacity_bounds_the_cache() {
        let config = LeafCacheConfig {
            capacity: 16,
            ..LeafCacheConfig::default()
        };
        let cache = LeafCache::new(test_ca(), config).expect("cache");
        for i in 0..200 {
            cache.get(&name(&format!("h{i}.example"))).expect("get");
        }
        assert!(cache.len() <= 16, "{} cached", cache.len());
        assert!(!cache.is_empty());
        assert_eq!(cache.stats().forges(), 200);
    }

    #[test]
    fn concurrent_first_contacts_forge_once() {
        const N: usize = 64;
        let mut cache = LeafCache::new(test_ca(), LeafCacheConfig::default()).expect("cache");
        // Make the forge slow enough that every thread arrives while it is in flight.
        cache.set_forge_delay(Duration::from_millis(100));
        let cache = Arc::new(cache);
        let barrier = Arc::new(Barrier::new(N));
        let handles: Vec<_> = (0..N)
            .map(|_| {
                let cache = Arc::clone(&cache);
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    barrier.wait();
                    cache.get(&name("burst.example.com")).expect("get")
                })
            })
            .collect();
        let keys: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        let stats = cache.stats();
        assert_eq!(
            stats.forges(),
            1,
            "exactly one signature for {N} first contacts"
        );
        assert_eq!(stats.misses(), 1);
        assert_eq!(stats.hits(), u64::try_from(N - 1).expect("n"));
        assert!(
            stats.coalesced() > 0,
            "some callers waited on the in-flight forge"
        );
        assert!(keys.iter().all(|k| Arc::ptr_eq(k, &keys[0])));
    }

    #[test]
    fn different_names_forge_in_parallel_and_once_each() {
        let cache = Arc::new(LeafCache::new(test_ca(), LeafCacheConfig::default()).expect("cache"));
        let barrier = Arc::new(Barrier::new(32));
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let cache = Arc::clone(&cache);
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    barrier.wait();
                    cache
                        .get(&name(&format!("n{}.example", i % 4)))
                        .expect("get")
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        assert_eq!(cache.stats().forges(), 4);
        assert_eq!(cache.stats().hits(), 28);
    }

    #[test]
    fn waiting_for_a_stuck_forge_times_out() {
        let config = LeafCacheConfig {
            wait_timeout: Duration::from_millis(50),
            ..LeafCacheConfig::default()
        };
        let mut cache = LeafCache::new(test_ca(), config).expect("cache");
        cache.set_forge_delay(Duration::from_millis(500));
        let cache = Arc::new(cache);
        let slow = {
            let cache = Arc::clone(&cache);
            thread::spawn(move || cache.get(&name("slow.example")).map(|_| ()))
        };
        // Wait until the other thread holds the placeholder (it counts the miss first).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cache.stats().misses() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "forging thread never started"
            );
            thread::sleep(Duration::from_millis(1));
        }
        let err = cache.get(&name("slow.example")).expect_err("timeout");
        assert!(matches!(err, TlsError::ForgeWaitTimeout { .. }), "{err}");
        slow.join()
            .expect("thread")
            .expect("the first caller still succeeds");
        assert_eq!(cache.stats().forges(), 1);
    }
}
