//! Token buckets per (namespace, run, kind), in memory. Unknown kinds are denied (fail closed).
//!
//! On a shared store (`PostgreSQL`, several replicas) the `substitute` bucket lives in the
//! database instead ([`crate::store::StoreBackend::take_rate_token`]), so the configured rate
//! holds for the replicas together; the specs here still say what its rate and burst are.

use std::{collections::BTreeMap, num::NonZeroU32};

use governor::{Quota, RateLimiter, clock::DefaultClock, state::keyed::DefaultKeyedStateStore};
use serde::{Deserialize, Serialize};

pub const KIND_ISSUE: &str = "issue";
pub const KIND_SUBSTITUTE: &str = "substitute";
/// `validate-egress`, asked once per agent connection: its own bucket, so a busy agent opening
/// many connections does not starve its per-request substitutions (and the reverse).
pub const KIND_EGRESS: &str = "egress";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateSpec {
    pub per_second: u32,
    pub burst: u32,
}

/// Rate-limit configuration: one bucket spec per kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    #[serde(default = "default_issue")]
    pub issue: RateSpec,
    #[serde(default = "default_substitute")]
    pub substitute: RateSpec,
    #[serde(default = "default_egress")]
    pub egress: RateSpec,
}

fn default_issue() -> RateSpec {
    RateSpec {
        per_second: 5,
        burst: 10,
    }
}

fn default_substitute() -> RateSpec {
    RateSpec {
        per_second: 50,
        burst: 100,
    }
}

fn default_egress() -> RateSpec {
    RateSpec {
        per_second: 200,
        burst: 400,
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            issue: default_issue(),
            substitute: default_substitute(),
            egress: default_egress(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateLimitError {
    #[error("rate limit exceeded for {0}")]
    Exceeded(&'static str),
    #[error("no rate limit defined for kind {0:?}")]
    UnknownKind(String),
    #[error("invalid rate limit for {0}: per_second and burst must be positive")]
    Invalid(&'static str),
}

type Key = (String, String);
type Keyed = RateLimiter<Key, DefaultKeyedStateStore<Key>, DefaultClock>;

pub struct RateLimits {
    kinds: BTreeMap<&'static str, Keyed>,
    config: RateLimitConfig,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("kinds", &self.kinds.keys().collect::<Vec<_>>())
            .field("config", &self.config)
            .finish()
    }
}

fn quota(kind: &'static str, spec: RateSpec) -> Result<Quota, RateLimitError> {
    let per = NonZeroU32::new(spec.per_second).ok_or(RateLimitError::Invalid(kind))?;
    let burst = NonZeroU32::new(spec.burst).ok_or(RateLimitError::Invalid(kind))?;
    Ok(Quota::per_second(per).allow_burst(burst))
}

impl RateLimits {
    pub fn new(config: &RateLimitConfig) -> Result<Self, RateLimitError> {
        let mut kinds = BTreeMap::new();
        kinds.insert(
            KIND_ISSUE,
            RateLimiter::keyed(quota(KIND_ISSUE, config.issue)?),
        );
        kinds.insert(
            KIND_SUBSTITUTE,
            RateLimiter::keyed(quota(KIND_SUBSTITUTE, config.substitute)?),
        );
        kinds.insert(
            KIND_EGRESS,
            RateLimiter::keyed(quota(KIND_EGRESS, config.egress)?),
        );
        Ok(Self {
            kinds,
            config: config.clone(),
        })
    }

    /// The configuration the buckets were built from.
    #[must_use]
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Takes one token from the (namespace, run) bucket of `kind`.
    pub fn check(&self, namespace: &str, run: &str, kind: &str) -> Result<(), RateLimitError> {
        let Some((name, limiter)) = self.kinds.get_key_value(kind) else {
            return Err(RateLimitError::UnknownKind(kind.to_owned()));
        };
        limiter
            .check_key(&(namespace.to_owned(), run.to_owned()))
            .map_err(|_| RateLimitError::Exceeded(name))
    }

    /// Takes up to `want` tokens at once from the (namespace, run) bucket of `kind`: `want`,
    /// or fewer (halving down to one) when the bucket holds less. Returns how many were
    /// taken; none available is [`RateLimitError::Exceeded`].
    pub fn take_up_to(
        &self,
        namespace: &str,
        run: &str,
        kind: &str,
        want: u32,
    ) -> Result<u32, RateLimitError> {
        let Some((name, limiter)) = self.kinds.get_key_value(kind) else {
            return Err(RateLimitError::UnknownKind(kind.to_owned()));
        };
        let key = (namespace.to_owned(), run.to_owned());
        let mut n = want.max(1);
        loop {
            let Some(cells) = NonZeroU32::new(n) else {
                return Err(RateLimitError::Exceeded(name));
            };
            // InsufficientCapacity (more than the burst) and "not yet" both mean: try fewer.
            if matches!(limiter.check_key_n(&key, cells), Ok(Ok(()))) {
                return Ok(n);
            }
            if n == 1 {
                return Err(RateLimitError::Exceeded(name));
            }
            n /= 2;
        }
    }

    /// Drops buckets that are back to full (idle), bounding memory.
    pub fn sweep(&self) {
        for limiter in self.kinds.values() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Number of live buckets (for tests and metrics).
    #[must_use]
    pub fn buckets(&self) -> usize {
        self.kinds.values().map(RateLimiter::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_deny_per_key_and_unknown_kind() {
        let cfg = RateLimitConfig {
            issue: RateSpec {
                per_second: 1,
                burst: 3,
            },
            ..RateLimitConfig::default()
        };
        let rl = RateLimits::new(&cfg).expect("valid");
        for _ in 0..3 {
            rl.check("ns", "r1", KIND_ISSUE).expect("within burst");
        }
        assert_eq!(
            rl.check("ns", "r1", KIND_ISSUE),
            Err(RateLimitError::Exceeded("issue"))
        );
        rl.check("ns", "r2", KIND_ISSUE)
            .expect("other run has its own bucket");
        rl.check("ns", "r1", KIND_SUBSTITUTE)
            .expect("other kind has its own bucket");
        rl.check("ns", "r1", KIND_EGRESS)
            .expect("egress checks have their own bucket");
        assert!(matches!(
            rl.check("ns", "r1", "telepathy"),
            Err(RateLimitError::UnknownKind(_))
        ));
        assert!(
            RateLimits::new(&RateLimitConfig {
                issue: RateSpec {
                    per_second: 0,
                    burst: 1
                },
                ..cfg
            })
            .is_err()
        );
    }

    #[test]
    fn blocks_are_taken_whole_then_smaller_and_never_beyond_the_bucket() {
        let cfg = RateLimitConfig {
            substitute: RateSpec {
                per_second: 1,
                burst: 10,
            },
            ..RateLimitConfig::default()
        };
        let rl = RateLimits::new(&cfg).expect("valid");
        // More than the burst: the largest halving that fits.
        assert_eq!(rl.take_up_to("ns", "r", KIND_SUBSTITUTE, 16), Ok(8));
        assert_eq!(rl.take_up_to("ns", "r", KIND_SUBSTITUTE, 8), Ok(2));
        assert_eq!(
            rl.take_up_to("ns", "r", KIND_SUBSTITUTE, 8),
            Err(RateLimitError::Exceeded("substitute"))
        );
        assert_eq!(
            rl.check("ns", "r", KIND_SUBSTITUTE),
            Err(RateLimitError::Exceeded("substitute")),
            "blocks and single calls share one bucket"
        );
    }

    #[test]
    fn sweep_drops_idle_buckets() {
        let cfg = RateLimitConfig {
            issue: RateSpec {
                per_second: 1000,
                burst: 1,
            },
            ..RateLimitConfig::default()
        };
        let rl = RateLimits::new(&cfg).expect("valid");
        rl.check("ns", "r1", KIND_ISSUE).expect("ok");
        assert_eq!(rl.buckets(), 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        rl.sweep();
        assert_eq!(rl.buckets(), 0);
    }
}
