//! The proxy's own name resolution.
//!
//! The proxy never trusts the agent's resolution: it asks DNS itself (hickory-resolver, the
//! system `resolv.conf` by default or explicit name servers), keeps answers for their TTL
//! (clamped to `[min_ttl, max_ttl]`) in a bounded cache, and lets only one query per name be in
//! flight: concurrent callers for a name that is not cached wait for the first caller's answer.
//! Names are always looked up as fully-qualified (no search domains) and, unless configured,
//! without `/etc/hosts`.
//!
//! A caller that finds a cached answer stale (the transparent-mode rebinding check) can ask for
//! one fresh lookup with [`DnsResolver::refresh`].
//!
//! Failures are cached too, so the waiters of a failed flight get the same error: NXDOMAIN and
//! empty answers for `negative_ttl`, transient failures (timeouts, server errors) not beyond the
//! flight itself. Callers map every [`ResolveError`] to the `dns_failed` rejection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolveHosts,
    ResolverConfig as HickoryConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use tokio::time::Instant;

/// Resolver settings.
#[derive(Debug, Clone)]
pub struct ResolverSettings {
    /// Name servers to ask (UDP, TCP fallback on truncation); empty means the system
    /// `resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
    /// Time for one query attempt to one server.
    pub attempt_timeout: Duration,
    /// Attempts per server.
    pub attempts: usize,
    /// Hard bound on one whole resolution, whatever the resolver does inside.
    pub lookup_timeout: Duration,
    /// Maximum number of cached names.
    pub cache_capacity: usize,
    /// Shortest time an answer is kept (applies to TTL 0 answers too).
    pub min_ttl: Duration,
    /// Longest time an answer is kept, whatever its TTL.
    pub max_ttl: Duration,
    /// How long NXDOMAIN / no-address answers are kept.
    pub negative_ttl: Duration,
    /// Consult `/etc/hosts` before DNS.
    pub use_hosts_file: bool,
}

impl Default for ResolverSettings {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            attempt_timeout: Duration::from_secs(2),
            attempts: 2,
            lookup_timeout: Duration::from_secs(10),
            cache_capacity: 4096,
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_mins(5),
            negative_ttl: Duration::from_secs(5),
            use_hosts_file: false,
        }
    }
}

/// Why a name did not resolve. Every variant maps to the `dns_failed` rejection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("{host}: no such domain (NXDOMAIN)")]
    NxDomain { host: String },
    #[error("{host}: no A or AAAA records")]
    NoRecords { host: String },
    #[error("{host}: DNS lookup timed out")]
    Timeout { host: String },
    #[error("{host}: DNS server answered {code}")]
    ServerError { host: String, code: String },
    #[error("{host}: DNS lookup failed: {detail}")]
    Other { host: String, detail: String },
}

impl ResolveError {
    /// Whether the failure says something about the name (and so is worth caching).
    #[must_use]
    pub fn is_negative_answer(&self) -> bool {
        matches!(
            self,
            ResolveError::NxDomain { .. } | ResolveError::NoRecords { .. }
        )
    }
}

/// The resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ResolverInitError {
    #[error("cannot read the system resolver configuration: {0}")]
    SystemConfig(String),
    #[error("cannot build the resolver: {0}")]
    Build(String),
    #[error("invalid resolver settings: {0}")]
    Settings(&'static str),
}

/// Resolved addresses, in resolver order, without duplicates.
pub type Addrs = Arc<[IpAddr]>;

#[derive(Debug, Clone)]
struct CacheEntry {
    result: Result<Addrs, ResolveError>,
    expires: Instant,
}

/// Caching, single-flight resolver. Share it behind an `Arc`.
#[derive(Debug)]
pub struct DnsResolver {
    inner: TokioResolver,
    cache: quick_cache::sync::Cache<String, CacheEntry>,
    settings: ResolverSettings,
}

impl DnsResolver {
    /// Builds the resolver. Must be called inside a Tokio runtime.
    pub fn new(settings: ResolverSettings) -> Result<Self, ResolverInitError> {
        if settings.cache_capacity == 0 {
            return Err(ResolverInitError::Settings(
                "cache_capacity must be at least 1",
            ));
        }
        if settings.min_ttl > settings.max_ttl {
            return Err(ResolverInitError::Settings(
                "min_ttl is greater than max_ttl",
            ));
        }
        if settings.attempts == 0 {
            return Err(ResolverInitError::Settings("attempts must be at least 1"));
        }
        let mut builder = if settings.nameservers.is_empty() {
            TokioResolver::builder_tokio()
                .map_err(|e| ResolverInitError::SystemConfig(e.to_string()))?
        } else {
            let servers = settings
                .nameservers
                .iter()
                .map(|sa| {
                    let conn = |protocol| {
                        let mut c = ConnectionConfig::new(protocol);
                        c.port = sa.port();
                        c
                    };
                    NameServerConfig::new(
                        sa.ip(),
                        true,
                        vec![conn(ProtocolConfig::Udp), conn(ProtocolConfig::Tcp)],
                    )
                })
                .collect();
            TokioResolver::builder_with_config(
                HickoryConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        opts.timeout = settings.attempt_timeout;
        opts.attempts = settings.attempts;
        // Our cache is the one that counts (TTL clamp, single flight, negative entries).
        opts.cache_size = 0;
        opts.ndots = 0;
        opts.use_hosts_file = if settings.use_hosts_file {
            ResolveHosts::Always
        } else {
            ResolveHosts::Never
        };
        let inner = builder
            .build()
            .map_err(|e| ResolverInitError::Build(e.to_string()))?;
        Ok(Self {
            inner,
            cache: quick_cache::sync::Cache::new(settings.cache_capacity),
            settings,
        })
    }

    /// Resolves a normalised host name (or IP literal, returned as is) to its addresses.
    pub async fn resolve(&self, host: &str) -> Result<Addrs, ResolveError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Arc::from([ip]));
        }
        self.entry(host).await.result
    }

    /// Resolves a normalised host name like [`DnsResolver::resolve`] and also says how much
    /// longer the answer stays in this cache. The proxy's DNS server hands the agent exactly
    /// these addresses with (at most) this lifetime, so what the agent is told and what the
    /// proxy checks its connections against are the same answer.
    pub async fn resolve_with_ttl(&self, host: &str) -> Result<(Addrs, Duration), ResolveError> {
        let entry = self.entry(host).await;
        let left = entry.expires.saturating_duration_since(Instant::now());
        entry.result.map(|addrs| (addrs, left))
    }

    async fn entry(&self, host: &str) -> CacheEntry {
        let now = Instant::now();
        // An expired entry is removed first so that exactly one caller wins the placeholder
        // below; the predicate keeps a fresh entry another caller may have just inserted.
        self.cache.remove_if(host, |e| e.expires <= now);
        match self.cache.get_value_or_guard_async(host).await {
            Ok(entry) => entry,
            Err(guard) => {
                let entry = self.lookup(host).await;
                // Ignore a failed insert: it only means the entry was evicted concurrently.
                let _ = guard.insert(entry.clone());
                entry
            }
        }
    }

    /// Resolves again, bypassing a cached answer the caller found stale (`seen`). Only that
    /// exact entry is dropped, so concurrent refreshes of one name still share one query.
    pub async fn refresh(&self, host: &str, seen: &Addrs) -> Result<Addrs, ResolveError> {
        self.cache
            .remove_if(host, |e| matches!(&e.result, Ok(a) if Arc::ptr_eq(a, seen)));
        self.resolve(host).await
    }

    async fn lookup(&self, host: &str) -> CacheEntry {
        let fqdn = format!("{host}.");
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            self.settings.lookup_timeout,
            self.inner.lookup_ip(fqdn.as_str()),
        )
        .await;
        let err = |result: ResolveError| {
            let ttl = if result.is_negative_answer() {
                self.settings.negative_ttl
            } else {
                Duration::ZERO
            };
            CacheEntry {
                result: Err(result),
                expires: Instant::now() + ttl,
            }
        };
        let host_s = || host.to_owned();
        match outcome {
            Err(_) => err(ResolveError::Timeout { host: host_s() }),
            Ok(Err(e)) => err(map_error(host, &e)),
            Ok(Ok(lookup)) => {
                let mut addrs: Vec<IpAddr> = Vec::new();
                for ip in lookup.iter() {
                    if !addrs.contains(&ip) {
                        addrs.push(ip);
                    }
                }
                if addrs.is_empty() {
                    return err(ResolveError::NoRecords { host: host_s() });
                }
                let valid_until = Instant::from_std(lookup.valid_until());
                let ttl = valid_until
                    .saturating_duration_since(started)
                    .clamp(self.settings.min_ttl, self.settings.max_ttl);
                CacheEntry {
                    result: Ok(Arc::from(addrs)),
                    expires: Instant::now() + ttl,
                }
            }
        }
    }
}

fn map_error(host: &str, e: &NetError) -> ResolveError {
    let host = host.to_owned();
    if e.is_nx_domain() {
        return ResolveError::NxDomain { host };
    }
    if e.is_no_records_found() {
        return ResolveError::NoRecords { host };
    }
    match e {
        NetError::Timeout => ResolveError::Timeout { host },
        NetError::Dns(DnsError::ResponseCode(code)) => ResolveError::ServerError {
            host,
            code: code.to_string(),
        },
        other => ResolveError::Other {
            host,
            detail: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use hickory_resolver::proto::rr::RecordType;

    use super::*;
    use crate::net::test_dns::{Answer, TestDns};

    fn settings(dns: &TestDns) -> ResolverSettings {
        ResolverSettings {
            nameservers: vec![dns.addr],
            attempt_timeout: Duration::from_millis(300),
            attempts: 1,
            lookup_timeout: Duration::from_secs(3),
            min_ttl: Duration::ZERO,
            ..ResolverSettings::default()
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().expect("test ip")).collect()
    }

    #[tokio::test]
    async fn resolves_a_and_aaaa() {
        let dns = TestDns::start(Duration::ZERO).await;
        dns.addrs("svc.test", &["127.0.0.1", "::1"], 60);
        let r = DnsResolver::new(settings(&dns)).expect("resolver");
        let got = r.resolve("svc.test").await.expect("resolves");
        let mut got = got.to_vec();
        got.sort();
        assert_eq!(got, ips(&["127.0.0.1", "::1"]));
        assert_eq!(dns.count("svc.test", RecordType::A), 1);
        assert_eq!(dns.count("svc.test", RecordType::AAAA), 1);
        // Cached: no second query.
        r.resolve("svc.test").await.expect("cached");
        assert_eq!(dns.count("svc.test", RecordType::A), 1);
    }

    #[tokio::test]
    async fn resolve_with_ttl_reports_the_time_left_in_the_cache() {
        let dns = TestDns::start(Duration::ZERO).await;
        dns.addrs("ttl.test", &["127.0.0.1"], 60);
        let r = DnsResolver::new(ResolverSettings {
            max_ttl: Duration::from_secs(20),
            ..settings(&dns)
        })
        .expect("resolver");
        let (addrs, left) = r.resolve_with_ttl("ttl.test").await.expect("resolves");
        assert_eq!(addrs.to_vec(), ips(&["127.0.0.1"]));
        assert!(
            left <= Duration::from_secs(20) && left > Duration::from_secs(18),
            "clamped to max_ttl: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (again, later) = r.resolve_with_ttl("ttl.test").await.expect("cached");
        assert!(Arc::ptr_eq(&addrs, &again), "the same cached answer");
        assert!(later < left, "{later:?} < {left:?}");
        assert_eq!(dns.count("ttl.test", RecordType::A), 1);
    }

    #[tokio::test]
    async fn concurrent_first_lookups_send_one_query() {
        let dns = TestDns::start(Duration::from_millis(200)).await;
        dns.addrs("burst.test", &["127.0.0.7"], 60);
        let r = Arc::new(DnsResolver::new(settings(&dns)).expect("resolver"));
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move { r.resolve("burst.test").await })
            })
            .collect();
        for t in tasks {
            let got = t.await.expect("join").expect("resolves");
            assert_eq!(got.to_vec(), ips(&["127.0.0.7"]));
        }
        assert_eq!(dns.count("burst.test", RecordType::A), 1);
        assert_eq!(dns.count("burst.test", RecordType::AAAA), 1);
    }

    #[tokio::test]
    async fn ttl_is_respected_and_clamped() {
        let dns = TestDns::start(Duration::ZERO).await;
        dns.addrs("short.test", &["127.0.0.1"], 1);
        dns.addrs("long.test", &["127.0.0.2"], 3600);
        dns.addrs("zero.test", &["127.0.0.3"], 0);
        let r = DnsResolver::new(ResolverSettings {
            min_ttl: Duration::from_millis(300),
            max_ttl: Duration::from_millis(600),
            ..settings(&dns)
        })
        .expect("resolver");
        for name in ["short.test", "long.test", "zero.test"] {
            r.resolve(name).await.expect("resolves");
        }
        // TTL 0 is raised to min_ttl: still cached right away.
        r.resolve("zero.test").await.expect("cached");
        assert_eq!(dns.count("zero.test", RecordType::A), 1);
        tokio::time::sleep(Duration::from_millis(700)).await;
        // TTL 1 s and TTL 3600 s are both capped at 600 ms: expired now.
        dns.addrs("long.test", &["127.0.0.9"], 3600);
        let got = r.resolve("long.test").await.expect("re-resolves");
        assert_eq!(got.to_vec(), ips(&["127.0.0.9"]));
        r.resolve("short.test").await.expect("re-resolves");
        assert_eq!(dns.count("long.test", RecordType::A), 2);
        assert_eq!(dns.count("short.test", RecordType::A), 2);
    }

    #[tokio::test]
    async fn record_ttl_expiry_without_clamp() {
        let dns = TestDns::start(Duration::ZERO).await;
        dns.addrs("one.test", &["127.0.0.1"], 1);
        let r = DnsResolver::new(settings(&dns)).expect("resolver");
        r.resolve("one.test").await.expect("resolves");
        tokio::time::sleep(Duration::from_millis(300)).await;
        r.resolve("one.test").await.expect("cached");
        assert_eq!(dns.count("one.test", RecordType::A), 1);
        tokio::time::sleep(Duration::from_millis(900)).await;
        r.resolve("one.test").await.expect("re-resolves");
        assert_eq!(dns.count("one.test", RecordType::A), 2);
    }

    #[tokio::test]
    async fn refresh_replaces_only_the_stale_answer() {
        let dns = TestDns::start(Duration::ZERO).await;
        dns.addrs("cdn.test", &["127.0.0.1"], 300);
        let r = DnsResolver::new(settings(&dns)).expect("resolver");
        let old = r.resolve("cdn.test").await.expect("resolves");
        dns.addrs("cdn.test", &["127.0.0.2"], 300);
        let fresh = r.refresh("cdn.test", &old).await.expect("refreshes");
        assert_eq!(fresh.to_vec(), ips(&["127.0.0.2"]));
        assert_eq!(dns.count("cdn.test", RecordType::A), 2);
        // Refreshing with the old answer again does not drop the newer one.
        let again = r.refresh("cdn.test", &old).await.expect("cached");
        assert!(Arc::ptr_eq(&again, &fresh));
        assert_eq!(dns.count("cdn.test", RecordType::A), 2);
    }

    #[tokio::test]
    async fn nxdomain_is_typed_and_negatively_cached() {
        let dns = TestDns::start(Duration::ZERO).await;
        dns.set("gone.test", Answer::NxDomain);
        let r = DnsResolver::new(settings(&dns)).expect("resolver");
        let e = r.resolve("gone.test").await.err();
        assert_eq!(
            e,
            Some(ResolveError::NxDomain {
                host: "gone.test".into()
            })
        );
        let again = r.resolve("gone.test").await.err();
        assert_eq!(again, e);
        assert_eq!(dns.count("gone.test", RecordType::A), 1);
    }

    #[tokio::test]
    async fn empty_answer_is_no_records() {
        let dns = TestDns::start(Duration::ZERO).await;
        dns.set(
            "empty.test",
            Answer::Addrs {
                addrs: Vec::new(),
                ttl: 60,
            },
        );
        let r = DnsResolver::new(settings(&dns)).expect("resolver");
        let e = r.resolve("empty.test").await.err();
        assert_eq!(
            e,
            Some(ResolveError::NoRecords {
                host: "empty.test".into()
            })
        );
    }

    #[tokio::test]
    async fn silent_server_times_out_and_is_not_cached() {
        let dns = TestDns::start(Duration::ZERO).await;
        dns.set("slow.test", Answer::Silent);
        let r = DnsResolver::new(ResolverSettings {
            attempt_timeout: Duration::from_millis(150),
            lookup_timeout: Duration::from_millis(400),
            ..settings(&dns)
        })
        .expect("resolver");
        let started = Instant::now();
        let e = r.resolve("slow.test").await.err();
        assert!(matches!(e, Some(ResolveError::Timeout { .. })), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        dns.addrs("slow.test", &["127.0.0.5"], 60);
        let got = r.resolve("slow.test").await.expect("now answers");
        assert_eq!(got.to_vec(), ips(&["127.0.0.5"]));
    }

    #[tokio::test]
    async fn ip_literals_skip_dns() {
        let dns = TestDns::start(Duration::ZERO).await;
        let r = DnsResolver::new(settings(&dns)).expect("resolver");
        let got = r.resolve("::1").await.expect("literal");
        assert_eq!(got.to_vec(), ips(&["::1"]));
        assert!(dns.count("::1", RecordType::AAAA) == 0);
    }

    #[test]
    fn bad_settings_are_rejected() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let bad = ResolverSettings {
                nameservers: vec!["127.0.0.1:53".parse().expect("addr")],
                min_ttl: Duration::from_secs(10),
                max_ttl: Duration::from_secs(1),
                ..ResolverSettings::default()
            };
            assert!(matches!(
                DnsResolver::new(bad),
                Err(ResolverInitError::Settings(_))
            ));
        });
    }
}
