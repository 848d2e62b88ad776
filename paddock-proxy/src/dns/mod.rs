//! The proxy's DNS server: the only resolver an intercepted agent can reach.
//!
//! Without it, an agent allowed to send DNS to a recursive resolver can put anything into the
//! names it asks about (`<hex payload>.exfil.example`) and the resolver carries them to whoever
//! runs `exfil.example`'s name servers: a tunnel through any recursive resolver, whatever the
//! egress policy says. This server closes it: it answers only names the run's egress policy
//! could reach, from the proxy's own resolver, and a name it does not answer never leaves the
//! proxy.
//!
//! # Where queries come from
//!
//! The server serves UDP on sockets it is given ([`DnsServer::serve_udp`]): in `serve` mode the
//! `[dns] listen` addresses, with the eBPF `sendmsg4/6` programs sending an agent's datagrams
//! for its configured resolver to that port on the proxy address and `recvmsg4/6` making the
//! replies look as if the resolver sent them (`dns_redirect_port`); for `run` mode, sockets
//! bound inside the command's own network namespace on `127.0.0.1:53` and handed in through
//! `ServeOptions::dns_sockets` (the command's `resolv.conf` names that address, so no redirect
//! is needed: the agent cgroup's `dns` is `127.0.0.1:53`).
//!
//! # What a query gets
//!
//! Every datagram is handled like this, in order:
//!
//! 1. Shorter than a DNS header, or a response rather than a query: dropped, never answered.
//! 2. Over the run's rate limit (default 50 queries/s, burst 100): REFUSED. Refusals are not
//!    audited one by one: a `dns_rate_limited` record summarises them at most once a second.
//! 3. Unparsable, or not exactly one question: FORMERR. Not a standard query, or not class IN:
//!    NOTIMP.
//! 4. The name: labels of letters, digits, `-` and `_` only, at most `max_name_len` characters
//!    (default 253, the most DNS allows), lower-cased and without the trailing dot
//!    ([`crate::policy::normalize_host`]). A name failing this, or one that reads as an IP
//!    address, is denied like a name the policy does not allow.
//! 5. [`EgressPolicy::name_allowed`]: could the run reach this name, on any port? Answers are
//!    kept per name for `policy_cache` (default 250 ms, the broker re-check interval) and one
//!    question per name is in flight at a time, so a burst of queries is one policy call.
//!    * Denied: NXDOMAIN, audited (`dns_deny`, with the name, at most 320 characters). The
//!      query goes nowhere else: this is what closes the tunnel.
//!    * The policy could not answer (broker down): SERVFAIL, audited. Never forwarded.
//!    * Allowed (or in a discovery window, which would allow the connection too): see below.
//! 6. A and AAAA questions are answered from the proxy's own [`DnsResolver`], the cache the
//!    proxy vets its connections against, so the address the agent dials is one the proxy's
//!    DNS-rebinding check accepts. Addresses the proxy would refuse to dial (the denied CIDR
//!    set: private, loopback, metadata ranges unless carved out) are left out: telling the
//!    agent about them would only leak internal addresses and invite a connection that is
//!    refused anyway. TTLs are the time the answer has left in the proxy's cache, at most
//!    `max_ttl` (default 30 s). Nothing of the family left: NOERROR with no answers (NODATA).
//!    Upstream NXDOMAIN: NXDOMAIN (the true answer for an allowed name); no A/AAAA at all:
//!    NODATA; a timeout or server failure: SERVFAIL.
//! 7. Every other type (TXT, MX, HTTPS, ANY, ...) for an allowed name: NODATA. The proxy never
//!    asks upstream for them, so TXT answers cannot carry data back either.
//!
//! # Size and TCP
//!
//! DNS over TCP is not served: an agent's TCP connects (to port 53 as to any other) are
//! redirected to the transparent proxy, which wants TLS and refuses them. So answers never set
//! the TC bit (a retry over TCP could not succeed); instead an answer holds as many addresses
//! as fit the client's UDP size (512 bytes, or its EDNS size up to 1232), which clients accept
//! as a complete, shorter answer.
//!
//! # Fail closed
//!
//! A `dns_deny` that cannot be written to the audit trail leaves the query unanswered (an
//! unrecorded denial must not look like a clean answer); rate-limit summaries that cannot be
//! written are counted and logged. Too many queries in flight (waiting for the policy or the
//! resolver): dropped. Every datagram is counted in `paddock_proxy_dns_queries_total{outcome}`.

mod server;
mod wire;

pub use server::bind_udp;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};

use crate::audit::{AuditEvent, AuditMode, AuditOutcome, AuditSink, audit_decision};
use crate::labels::{AuditKind, DnsOutcome};
use crate::metrics::ProxyMetrics;
use crate::net::{CidrPolicy, DnsResolver, ResolveError};
use crate::policy::{Decision, EgressPolicy, PolicyError, normalize_host};

/// The port DNS records in the audit trail carry.
const DNS_PORT: u16 = 53;
/// Longest queried name written to the audit trail (an escaped binary name can be 4x longer
/// than the 255 bytes DNS allows).
const MAX_AUDIT_NAME: usize = 320;
/// Names whose policy answer is remembered at once; past it the memory starts over.
const NAME_CACHE_CAPACITY: usize = 4096;
/// Rate-limit refusals are summarised in the audit trail at most this often.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(1);

/// Settings of the DNS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Longest name answered, in characters without the trailing dot (1-253).
    pub max_name_len: usize,
    /// Queries per second the run may send (sustained).
    pub rate_per_second: u32,
    /// Queries the run may send at once above the sustained rate.
    pub rate_burst: u32,
    /// Longest TTL handed to the agent.
    pub max_ttl: Duration,
    /// How long a name's policy answer is reused (zero: ask every time).
    pub policy_cache: Duration,
    /// Queries waiting for the policy or the resolver at once; more are dropped.
    pub max_in_flight: usize,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            max_name_len: 253,
            rate_per_second: 50,
            rate_burst: 100,
            max_ttl: Duration::from_secs(30),
            policy_cache: crate::broker::DEFAULT_EGRESS_RECHECK,
            max_in_flight: 256,
        }
    }
}

/// Settings the server cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsSettingsError {
    #[error("dns: max_name_len must be between 1 and 253 (got {0})")]
    NameLength(usize),
    #[error("dns: rate_per_second and rate_burst must be at least 1")]
    Rate,
    #[error("dns: max_ttl must be at least 1 second")]
    Ttl,
    #[error("dns: max_in_flight must be at least 1")]
    InFlight,
}

impl DnsSettings {
    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<(), DnsSettingsError> {
        if !(1..=253).contains(&self.max_name_len) {
            return Err(DnsSettingsError::NameLength(self.max_name_len));
        }
        if self.rate_per_second == 0 || self.rate_burst == 0 {
            return Err(DnsSettingsError::Rate);
        }
        if self.max_ttl < Duration::from_secs(1) {
            return Err(DnsSettingsError::Ttl);
        }
        if self.max_in_flight == 0 {
            return Err(DnsSettingsError::InFlight);
        }
        Ok(())
    }
}

/// What the server is built from.
#[derive(Debug, Clone)]
pub struct DnsParts {
    /// The run every query belongs to.
    pub run: String,
    pub settings: DnsSettings,
    /// Decides which names are answered ([`EgressPolicy::name_allowed`]).
    pub policy: Arc<dyn EgressPolicy>,
    /// The proxy's own resolver (share the one the connection vetting uses).
    pub resolver: Arc<DnsResolver>,
    /// The denied-CIDR set (share the one the connection vetting uses).
    pub cidr: Arc<CidrPolicy>,
    pub audit: Arc<dyn AuditSink>,
    pub metrics: Arc<ProxyMetrics>,
}

/// The DNS server of one run. Share it behind an `Arc` between its sockets: the rate limit is
/// the run's, whichever socket a query arrives on.
pub struct DnsServer {
    run: String,
    settings: DnsSettings,
    policy: Arc<dyn EgressPolicy>,
    resolver: Arc<DnsResolver>,
    cidr: Arc<CidrPolicy>,
    audit: Arc<dyn AuditSink>,
    metrics: Arc<ProxyMetrics>,
    limiter: DefaultDirectRateLimiter,
    names: quick_cache::sync::Cache<String, (Instant, Result<Decision, PolicyError>)>,
    refusals: Mutex<Refusals>,
    /// Queries waiting for the policy or the resolver, across all the server's sockets.
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsServer")
            .field("run", &self.run)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Rate-limit refusals not yet in the audit trail.
#[derive(Debug, Default)]
struct Refusals {
    pending: u64,
    last_summary: Option<Instant>,
}

/// A query that passed the checks that need nothing but the packet, waiting for the policy
/// and the resolver.
#[derive(Debug)]
pub(crate) struct Pending {
    request: Message,
    /// Normalised name.
    name: String,
    qtype: RecordType,
}

/// What to do with a datagram before anything asynchronous happens.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Send nothing.
    Drop,
    /// Send this at once.
    Reply(Vec<u8>),
    /// Ask the policy (and the resolver), then answer.
    Query(Box<Pending>),
}

/// Why a name was refused before the policy was asked.
enum BadName {
    TooLong(usize),
    Invalid(String),
}

impl DnsServer {
    /// Builds the server; the settings are checked first.
    pub fn new(parts: DnsParts) -> Result<Self, DnsSettingsError> {
        parts.settings.validate()?;
        let nz = |n: u32| NonZeroU32::new(n).ok_or(DnsSettingsError::Rate);
        let quota = Quota::per_second(nz(parts.settings.rate_per_second)?)
            .allow_burst(nz(parts.settings.rate_burst)?);
        Ok(Self {
            run: parts.run,
            limiter: RateLimiter::direct(quota),
            names: quick_cache::sync::Cache::new(NAME_CACHE_CAPACITY),
            refusals: Mutex::new(Refusals::default()),
            in_flight: Arc::new(tokio::sync::Semaphore::new(parts.settings.max_in_flight)),
            settings: parts.settings,
            policy: parts.policy,
            resolver: parts.resolver,
            cidr: parts.cidr,
            audit: parts.audit,
            metrics: parts.metrics,
        })
    }

    /// The settings in force.
    #[must_use]
    pub fn settings(&self) -> &DnsSettings {
        &self.settings
    }

    /// Handles one datagram completely: the answer to send back, if any.
    pub async fn handle(&self, packet: &[u8]) -> Option<Vec<u8>> {
        match self.admit(packet) {
            Admission::Drop => None,
            Admission::Reply(bytes) => Some(bytes),
            Admission::Query(pending) => self.answer(*pending).await,
        }
    }

    /// Everything that needs only the packet: framing, the rate limit, parsing, the question
    /// and the name. Synchronous, so a flood costs no task per datagram.
    pub(crate) fn admit(&self, packet: &[u8]) -> Admission {
        let Some(header) = wire::RawHeader::parse(packet) else {
            self.metrics.dns_query(DnsOutcome::Dropped);
            return Admission::Drop;
        };
        if header.is_response {
            self.metrics.dns_query(DnsOutcome::Dropped);
            return Admission::Drop;
        }
        // Only a single question is ever parsed: a header claiming thousands of them would
        // make the parser allocate for all of them before failing.
        let request = if header.questions == 1 {
            Message::from_vec(packet).ok()
        } else {
            None
        };
        if self.limiter.check().is_err() {
            self.metrics.dns_query(DnsOutcome::RateLimited);
            self.note_refusal();
            return Self::reply(header, request.as_ref(), ResponseCode::Refused);
        }
        let Some(request) = request else {
            self.metrics.dns_query(DnsOutcome::FormErr);
            return Self::reply(header, None, ResponseCode::FormErr);
        };
        let Some(query) = request.queries.first() else {
            self.metrics.dns_query(DnsOutcome::FormErr);
            return Self::reply(header, None, ResponseCode::FormErr);
        };
        if request.metadata.op_code != OpCode::Query || query.query_class() != DNSClass::IN {
            self.metrics.dns_query(DnsOutcome::NotImp);
            return Self::reply(header, Some(&request), ResponseCode::NotImp);
        }
        let qtype = query.query_type();
        match self.checked_name(query.name()) {
            Ok(name) => Admission::Query(Box::new(Pending {
                request,
                name,
                qtype,
            })),
            Err(bad) => {
                let shown = audit_name(query.name());
                let reason = match bad {
                    BadName::TooLong(len) => format!(
                        "name of {len} characters is longer than the {} allowed",
                        self.settings.max_name_len
                    ),
                    BadName::Invalid(why) => format!("invalid name: {why}"),
                };
                match self.deny(&request, &shown, &reason, ResponseCode::NXDomain) {
                    Some(bytes) => Admission::Reply(bytes),
                    None => Admission::Drop,
                }
            }
        }
    }

    /// The policy decision and, for allowed names, the resolution.
    pub(crate) async fn answer(&self, pending: Pending) -> Option<Vec<u8>> {
        let _in_flight = self.metrics.track_dns_question();
        let Pending {
            request,
            name,
            qtype,
        } = pending;
        match self.decide(&name).await {
            Ok(Decision::Deny { reason }) => {
                self.deny(&request, &name, &reason, ResponseCode::NXDomain)
            }
            Err(PolicyError::InvalidHost(e)) => {
                self.deny(&request, &name, &e.to_string(), ResponseCode::NXDomain)
            }
            Err(PolicyError::Unavailable(why) | PolicyError::Refused(why)) => self.deny(
                &request,
                &name,
                &format!("egress policy unavailable: {why}"),
                ResponseCode::ServFail,
            ),
            Ok(
                Decision::Allow { .. } | Decision::Discovery { .. } | Decision::Passthrough { .. },
            ) => {
                let (code, records, outcome) = self.resolve(&name, qtype).await;
                self.metrics.dns_query(outcome);
                wire::encode(&request, code, &records)
            }
        }
    }

    /// The name as the policy sees it, or why it is not asked about at all.
    fn checked_name(&self, name: &Name) -> Result<String, BadName> {
        let mut text = String::with_capacity(name.len());
        for label in name {
            if !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            {
                return Err(BadName::Invalid(
                    "labels may hold only letters, digits, '-' and '_'".to_owned(),
                ));
            }
            if !text.is_empty() {
                text.push('.');
            }
            // Checked above: every byte is ASCII.
            text.extend(label.iter().map(|b| char::from(*b)));
        }
        if text.is_empty() {
            return Err(BadName::Invalid("the root is not a host".to_owned()));
        }
        if text.len() > self.settings.max_name_len {
            return Err(BadName::TooLong(text.len()));
        }
        let host = normalize_host(&text).map_err(|e| BadName::Invalid(e.to_string()))?;
        if host.parse::<IpAddr>().is_ok() {
            return Err(BadName::Invalid("an IP address is not a name".to_owned()));
        }
        Ok(host)
    }

    /// The policy's answer for `name`, reused for `policy_cache`; one question per name in
    /// flight. Failures are kept too, so a silent broker costs one timeout per interval.
    async fn decide(&self, name: &str) -> Result<Decision, PolicyError> {
        let ttl = self.settings.policy_cache;
        if ttl.is_zero() {
            return self.policy.name_allowed(&self.run, name).await;
        }
        let now = Instant::now();
        self.names.remove_if(name, |(asked, _)| {
            now.saturating_duration_since(*asked) >= ttl
        });
        match self.names.get_value_or_guard_async(name).await {
            Ok((_, answer)) => answer,
            Err(guard) => {
                // The age counts from the question, so an allow given before a policy change
                // never outlives the interval after it.
                let asked = Instant::now();
                let answer = self.policy.name_allowed(&self.run, name).await;
                let _ = guard.insert((asked, answer.clone()));
                answer
            }
        }
    }

    /// Addresses of an allowed name for an A or AAAA question, from the proxy's resolver.
    async fn resolve(
        &self,
        name: &str,
        qtype: RecordType,
    ) -> (ResponseCode, Vec<wire::Answer>, DnsOutcome) {
        let wants_v4 = match qtype {
            RecordType::A => true,
            RecordType::AAAA => false,
            _ => return (ResponseCode::NoError, Vec::new(), DnsOutcome::NoData),
        };
        match self.resolver.resolve_with_ttl(name).await {
            Ok((addrs, left)) => {
                let ttl = u32::try_from(left.min(self.settings.max_ttl).as_secs())
                    .unwrap_or(u32::MAX)
                    .max(1);
                let answers: Vec<wire::Answer> = addrs
                    .iter()
                    .filter(|a| a.is_ipv4() == wants_v4)
                    .filter(|a| self.cidr.check(**a).is_ok())
                    .map(|a| wire::Answer { addr: *a, ttl })
                    .collect();
                let outcome = if answers.is_empty() {
                    DnsOutcome::NoData
                } else {
                    DnsOutcome::Answered
                };
                (ResponseCode::NoError, answers, outcome)
            }
            Err(ResolveError::NxDomain { .. }) => {
                (ResponseCode::NXDomain, Vec::new(), DnsOutcome::NxDomain)
            }
            Err(ResolveError::NoRecords { .. }) => {
                (ResponseCode::NoError, Vec::new(), DnsOutcome::NoData)
            }
            Err(e) => {
                tracing::debug!(name, error = %e, "dns: allowed name did not resolve");
                (ResponseCode::ServFail, Vec::new(), DnsOutcome::ServFail)
            }
        }
    }

    /// Audits a refused name and builds its answer; `None` when the record could not be
    /// written (the query then goes unanswered).
    fn deny(
        &self,
        request: &Message,
        name: &str,
        reason: &str,
        code: ResponseCode,
    ) -> Option<Vec<u8>> {
        let outcome = if code == ResponseCode::ServFail {
            DnsOutcome::PolicyUnavailable
        } else {
            DnsOutcome::Denied
        };
        tracing::debug!(run = %self.run, name, reason, "dns: name refused");
        let ev = AuditEvent::new(
            AuditKind::DnsDeny,
            self.run.clone(),
            AuditMode::Dns,
            DNS_PORT,
        )
        .with_sni(capped(name))
        .with_reason(reason);
        if audit_decision(self.audit.as_ref(), &self.metrics, &ev) == AuditOutcome::DropConnection {
            self.metrics.dns_query(DnsOutcome::Dropped);
            return None;
        }
        self.metrics.dns_query(outcome);
        wire::encode(request, code, &[])
    }

    /// A reply without answers: to the parsed request when there is one, else from the raw
    /// header.
    fn reply(header: wire::RawHeader, request: Option<&Message>, code: ResponseCode) -> Admission {
        let bytes = match request {
            Some(request) => wire::encode(request, code, &[]),
            None => Some(header.bare_reply(code)),
        };
        bytes.map_or(Admission::Drop, Admission::Reply)
    }

    /// Counts a rate-limit refusal; writes the summary when the last one is a second old.
    fn note_refusal(&self) {
        let mut r = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.pending += 1;
        if r.last_summary
            .is_none_or(|t| t.elapsed() >= SUMMARY_INTERVAL)
        {
            self.write_summary(&mut r);
        }
    }

    /// Writes the refusals not yet summarised, unless a summary went out less than a second
    /// ago (the serving loop calls this every second, so a flood's tail is not lost).
    pub fn flush_refusals(&self) {
        let mut r = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.pending > 0
            && r.last_summary
                .is_none_or(|t| t.elapsed() >= SUMMARY_INTERVAL)
        {
            self.write_summary(&mut r);
        }
    }

    fn write_summary(&self, r: &mut Refusals) {
        let reason = format!(
            "refused {} DNS queries over the rate limit ({}/s, burst {})",
            r.pending, self.settings.rate_per_second, self.settings.rate_burst
        );
        let ev = AuditEvent::new(
            AuditKind::DnsRateLimited,
            self.run.clone(),
            AuditMode::Dns,
            DNS_PORT,
        )
        .with_reason(reason);
        // Not a fail-closed kind: the queries were refused whatever happens to the record.
        let _ = audit_decision(self.audit.as_ref(), &self.metrics, &ev);
        tracing::warn!(run = %self.run, refused = r.pending, "dns: queries over the rate limit refused");
        r.pending = 0;
        r.last_summary = Some(Instant::now());
    }
}

/// A queried name fit for the audit trail: escaped as DNS text, at most [`MAX_AUDIT_NAME`].
fn audit_name(name: &Name) -> String {
    let text = name.to_ascii();
    capped(text.strip_suffix('.').unwrap_or(&text)).to_owned()
}

fn capped(name: &str) -> &str {
    if name.len() <= MAX_AUDIT_NAME {
        return name;
    }
    let mut end = MAX_AUDIT_NAME;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}
