//! The DNS server's message handling, written as an agent probing it would: every query goes
//! through [`DnsServer::handle`] as bytes and the answer is parsed back as bytes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

use super::*;
use crate::audit::MemorySink;
use crate::net::ResolverSettings;
use crate::net::test_dns::{Answer, TestDns};
use crate::policy::{CheckFuture, EgressRequest, StaticPolicy};

const POLICY: &str = r#"
[[rule]]
name = "apps"
hosts = ["app.test", "mixed.test", "only-private.test", "many.test", "*.allowed.test"]
ports = [443]

[[rule]]
name = "watch"
hosts = ["*.observe.test"]
ports = [443]
action = "discovery"
"#;

/// Bounds every await on the server (a hang is a failure, not a stuck test).
const WAIT: Duration = Duration::from_secs(5);

struct Fx {
    server: Arc<DnsServer>,
    upstream: TestDns,
    audit: Arc<MemorySink>,
    metrics: Arc<ProxyMetrics>,
}

async fn fx_with(policy: Arc<dyn EgressPolicy>, settings: DnsSettings, audit: MemorySink) -> Fx {
    let upstream = TestDns::start(Duration::ZERO).await;
    let resolver = DnsResolver::new(ResolverSettings {
        nameservers: vec![upstream.addr],
        attempt_timeout: Duration::from_millis(300),
        attempts: 1,
        lookup_timeout: Duration::from_secs(1),
        min_ttl: Duration::ZERO,
        ..ResolverSettings::default()
    })
    .expect("resolver");
    // Documentation ranges stand in for public addresses; 10/8 stays denied.
    let cidr = CidrPolicy::with_defaults()
        .allow("192.0.2.0/24".parse().expect("net"))
        .allow("2001:db8::/32".parse().expect("net"));
    let audit = Arc::new(audit);
    let metrics = Arc::new(ProxyMetrics::new());
    let server = DnsServer::new(DnsParts {
        run: "run-dns".into(),
        settings,
        policy,
        resolver: Arc::new(resolver),
        cidr: Arc::new(cidr),
        audit: audit.clone(),
        metrics: metrics.clone(),
    })
    .expect("server");
    Fx {
        server: Arc::new(server),
        upstream,
        audit,
        metrics,
    }
}

async fn fx() -> Fx {
    fx_settings(DnsSettings::default()).await
}

async fn fx_settings(settings: DnsSettings) -> Fx {
    let policy = StaticPolicy::from_toml_str(POLICY).expect("policy");
    fx_with(Arc::new(policy), settings, MemorySink::default()).await
}

fn name(text: &str) -> Name {
    Name::from_ascii(text).expect("test name")
}

fn query_for(n: Name, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(0x5a5a, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(n, qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.edns = Some(e);
    }
    m.to_vec().expect("encode query")
}

fn query(text: &str, qtype: RecordType) -> Vec<u8> {
    query_for(name(text), qtype, None)
}

impl Fx {
    async fn raw(&self, packet: &[u8]) -> Option<Vec<u8>> {
        tokio::time::timeout(WAIT, self.server.handle(packet))
            .await
            .expect("the server answers within the bound")
    }

    async fn ask(&self, packet: &[u8]) -> Message {
        let bytes = self.raw(packet).await.expect("an answer");
        Message::from_vec(&bytes).expect("the answer parses")
    }

    async fn lookup(&self, text: &str, qtype: RecordType) -> Message {
        self.ask(&query(text, qtype)).await
    }

    fn records(&self, kind: &str) -> Vec<serde_json::Value> {
        self.audit
            .records()
            .into_iter()
            .filter(|r| r["kind"] == kind)
            .collect()
    }

    fn count(&self, outcome: DnsOutcome) -> u64 {
        self.metrics.dns_queries(outcome)
    }
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test ip")
}

#[tokio::test]
async fn allowed_names_get_a_and_aaaa_from_the_proxys_own_resolver() {
    let f = fx().await;
    f.upstream
        .addrs("app.test", &["192.0.2.10", "2001:db8::10"], 300);
    let a = f.lookup("app.test", RecordType::A).await;
    assert_eq!(a.metadata.id, 0x5a5a);
    assert_eq!(a.metadata.message_type, MessageType::Response);
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.metadata.recursion_desired && a.metadata.recursion_available);
    assert!(!a.metadata.truncation);
    assert_eq!(addrs(&a), vec![ip("192.0.2.10")]);
    let aaaa = f.lookup("app.test", RecordType::AAAA).await;
    assert_eq!(addrs(&aaaa), vec![ip("2001:db8::10")]);
    // The agent's two questions were one lookup of the proxy's (shared, cached) resolver:
    // what the agent is told is what the proxy vets its connections against.
    assert_eq!(f.upstream.count("app.test", RecordType::A), 1);
    assert_eq!(f.upstream.count("app.test", RecordType::AAAA), 1);
    assert_eq!(f.count(DnsOutcome::Answered), 2);
    assert!(
        f.audit.records().is_empty(),
        "allowed answers are not audited"
    );
}

#[tokio::test]
async fn ttls_are_the_cache_time_left_and_capped() {
    let f = fx_settings(DnsSettings {
        max_ttl: Duration::from_secs(7),
        ..DnsSettings::default()
    })
    .await;
    f.upstream.addrs("app.test", &["192.0.2.10"], 3600);
    f.upstream.addrs("a.allowed.test", &["192.0.2.11"], 3);
    let long = f.lookup("app.test", RecordType::A).await;
    assert_eq!(long.answers.len(), 1);
    assert_eq!(long.answers[0].ttl, 7, "an hour is capped at max_ttl");
    let short = f.lookup("a.allowed.test", RecordType::A).await;
    assert!(
        (1..=3).contains(&short.answers[0].ttl),
        "never longer than the proxy keeps it: {}",
        short.answers[0].ttl
    );
    // The default cap is 30 s.
    let f = fx().await;
    f.upstream.addrs("app.test", &["192.0.2.10"], 3600);
    assert_eq!(f.lookup("app.test", RecordType::A).await.answers[0].ttl, 30);
}

#[tokio::test]
async fn denied_names_get_nxdomain_are_audited_and_never_leave_the_proxy() {
    let f = fx().await;
    // What a tunnel looks like: data in the labels, under a domain the attacker runs.
    let payload = "4a6f686e20536d6974682c2034313131203131313120313131312031313131";
    let tunnel = format!("{payload}.exfil.test");
    f.upstream.addrs(&tunnel, &["192.0.2.66"], 60);
    for qtype in [RecordType::A, RecordType::AAAA, RecordType::TXT] {
        let m = f.lookup(&tunnel, qtype).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{qtype}");
        assert!(m.answers.is_empty());
    }
    for qtype in [RecordType::A, RecordType::AAAA, RecordType::TXT] {
        assert_eq!(
            f.upstream.count(&tunnel, qtype),
            0,
            "asked upstream for {qtype}"
        );
    }
    let denied = f.records("dns_deny");
    assert_eq!(denied.len(), 3, "{denied:?}");
    assert_eq!(denied[0]["sni"], tunnel.as_str());
    assert_eq!(denied[0]["mode"], "dns");
    assert_eq!(denied[0]["port"], 53);
    assert_eq!(denied[0]["run"], "run-dns");
    let reason = denied[0]["reason"].as_str().expect("reason");
    assert!(reason.contains("no egress rule allows"), "{reason}");
    assert_eq!(f.count(DnsOutcome::Denied), 3);
    // The apex of an allowed wildcard is not allowed by it.
    let apex = f.lookup("allowed.test", RecordType::A).await;
    assert_eq!(apex.metadata.response_code, ResponseCode::NXDomain);
}

#[tokio::test]
async fn case_and_the_trailing_dot_do_not_matter_and_the_question_is_echoed_as_asked() {
    let f = fx().await;
    f.upstream.addrs("app.test", &["192.0.2.10"], 60);
    for spelling in ["APP.Test.", "app.test", "aPp.TeSt"] {
        let m = f.lookup(spelling, RecordType::A).await;
        assert_eq!(addrs(&m), vec![ip("192.0.2.10")], "{spelling}");
        // Resolvers that randomise case (0x20) check the question comes back unchanged.
        let asked = spelling.trim_end_matches('.');
        let echoed = m.queries[0].name().to_ascii();
        assert_eq!(echoed.trim_end_matches('.'), asked);
        let owner = m.answers[0].name.to_ascii();
        assert_eq!(owner.trim_end_matches('.'), asked);
    }
    assert_eq!(f.upstream.count("app.test", RecordType::A), 1);
    let m = f.lookup("EXFIL.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(f.records("dns_deny")[0]["sni"], "exfil.test");
}

#[tokio::test]
async fn names_longer_than_the_cap_are_refused_before_the_policy() {
    let f = fx_settings(DnsSettings {
        max_name_len: 40,
        ..DnsSettings::default()
    })
    .await;
    let long = format!("{}.allowed.test", "a".repeat(30));
    assert_eq!(long.len(), 43);
    let m = f.lookup(&long, RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(f.upstream.count(&long, RecordType::A), 0);
    let denied = f.records("dns_deny");
    assert_eq!(denied[0]["sni"], long.as_str());
    let reason = denied[0]["reason"].as_str().expect("reason");
    assert!(
        reason.contains("43 characters") && reason.contains("40"),
        "{reason}"
    );
    // At the cap it is the policy's (and the resolver's) to answer.
    let fits = format!("{}.allowed.test", "a".repeat(27));
    assert_eq!(fits.len(), 40);
    f.upstream.addrs(&fits, &["192.0.2.12"], 60);
    assert_eq!(
        addrs(&f.lookup(&fits, RecordType::A).await),
        vec![ip("192.0.2.12")]
    );
}

#[tokio::test]
async fn the_longest_name_dns_allows_passes_the_default_cap() {
    let f = fx().await;
    // 3 x 63 + 48 + "allowed.test" with dots: 253 characters, 255 bytes on the wire.
    let longest = format!(
        "{a}.{a}.{a}.{b}.allowed.test",
        a = "a".repeat(63),
        b = "b".repeat(48)
    );
    assert_eq!(longest.len(), 253);
    f.upstream.addrs(&longest, &["192.0.2.13"], 60);
    let m = f.lookup(&longest, RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("192.0.2.13")]);
}

#[tokio::test]
async fn names_that_are_not_host_names_are_refused_and_audited_escaped() {
    let f = fx().await;
    let binary = Name::from_labels(vec![&b"a\x00\xffb"[..], b"allowed", b"test"]).expect("name");
    let m = f.ask(&query_for(binary, RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let literal = f.lookup("192.0.2.10", RecordType::A).await;
    assert_eq!(literal.metadata.response_code, ResponseCode::NXDomain);
    let root = f.ask(&query_for(Name::root(), RecordType::NS, None)).await;
    assert_eq!(root.metadata.response_code, ResponseCode::NXDomain);
    let denied = f.records("dns_deny");
    assert_eq!(denied.len(), 3, "{denied:?}");
    let shown = denied[0]["sni"].as_str().expect("name");
    assert!(
        shown.is_ascii() && shown.contains("allowed.test"),
        "{shown}"
    );
    assert!(
        denied[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("letters, digits")),
        "{denied:?}"
    );
    assert_eq!(f.upstream.count("192.0.2.10", RecordType::A), 0);
}

#[tokio::test]
async fn malformed_datagrams_are_dropped_or_formerr_never_a_panic() {
    // No rate limit to speak of: every datagram below must reach the parser.
    let f = fx_settings(DnsSettings {
        rate_per_second: 1_000_000,
        rate_burst: 1_000_000,
        ..DnsSettings::default()
    })
    .await;
    for short in [&b""[..], b"\x12", &[0u8; 11]] {
        assert!(f.raw(short).await.is_none(), "{short:?}");
    }
    // A response is never answered (no loops between two servers).
    let mut response = query("app.test", RecordType::A);
    response[2] |= 0x80;
    assert!(f.raw(&response).await.is_none());
    // Header claims a question that is not there.
    let mut cut = query("app.test", RecordType::A);
    cut.truncate(12);
    let bare = f.raw(&cut).await.expect("FORMERR");
    assert_eq!(bare.len(), 12);
    let m = Message::from_vec(&bare).expect("parses");
    assert_eq!(m.metadata.id, 0x5a5a);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    assert!(m.metadata.recursion_desired);
    // A name cut in the middle, a label length of 64 (a reserved label type), a compression
    // pointer that points at itself, 65535 questions claimed.
    let whole = query("app.test", RecordType::A);
    let mut bad_len = whole.clone();
    bad_len[12] = 64;
    let mut looped = whole[..12].to_vec();
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let mut many = whole.clone();
    many[4] = 0xff;
    many[5] = 0xff;
    for packet in [whole[..16].to_vec(), bad_len, looped, many] {
        let m = Message::from_vec(&f.raw(&packet).await.expect("answered")).expect("parses");
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::FormErr,
            "{packet:?}"
        );
    }
    // Random bytes and bit flips of a valid query: whatever comes back parses as a response.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..3000u32 {
        let packet: Vec<u8> = if i % 2 == 0 {
            let len = usize::try_from(next() % 300).unwrap_or(0);
            (0..len).map(|_| next().to_le_bytes()[0]).collect()
        } else {
            let mut p = query("app.test", RecordType::A);
            for _ in 0..=(next() % 4) {
                let at = usize::try_from(next()).unwrap_or(0) % p.len();
                p[at] ^= 1 << (next() % 8);
            }
            p
        };
        if let Some(answer) = f.raw(&packet).await {
            let m = Message::from_vec(&answer).expect("every answer parses");
            assert_eq!(m.metadata.message_type, MessageType::Response);
            assert_ne!(m.metadata.response_code, ResponseCode::Refused);
            assert_eq!(&answer[..2], &packet[..2], "the id is echoed");
        }
    }
    assert!(f.count(DnsOutcome::FormErr) > 1000, "the parser saw them");
}

#[tokio::test]
async fn anything_but_exactly_one_question_is_formerr() {
    let f = fx().await;
    let mut two = Message::new(7, MessageType::Query, OpCode::Query);
    two.add_query(Query::query(name("app.test"), RecordType::A));
    two.add_query(Query::query(name("exfil.test"), RecordType::A));
    let none = Message::new(8, MessageType::Query, OpCode::Query);
    for m in [two, none] {
        let got = f.ask(&m.to_vec().expect("encode")).await;
        assert_eq!(got.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(got.metadata.id, m.metadata.id);
    }
    assert_eq!(f.upstream.count("exfil.test", RecordType::A), 0);
    assert_eq!(f.count(DnsOutcome::FormErr), 2);
}

#[tokio::test]
async fn other_opcodes_and_classes_are_not_implemented() {
    let f = fx().await;
    let mut notify = Message::new(9, MessageType::Query, OpCode::Notify);
    notify.add_query(Query::query(name("app.test"), RecordType::SOA));
    let mut chaos = Message::new(10, MessageType::Query, OpCode::Query);
    let mut q = Query::query(name("version.bind"), RecordType::TXT);
    q.set_query_class(DNSClass::CH);
    chaos.add_query(q);
    for m in [notify, chaos] {
        let got = f.ask(&m.to_vec().expect("encode")).await;
        assert_eq!(got.metadata.response_code, ResponseCode::NotImp);
    }
    assert_eq!(f.count(DnsOutcome::NotImp), 2);
}

#[tokio::test]
async fn other_types_of_allowed_names_are_nodata_and_not_asked_upstream() {
    let f = fx().await;
    f.upstream.addrs("app.test", &["192.0.2.10"], 60);
    for qtype in [
        RecordType::TXT,
        RecordType::MX,
        RecordType::HTTPS,
        RecordType::ANY,
    ] {
        let m = f.lookup("app.test", qtype).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{qtype}");
        assert!(m.answers.is_empty(), "{qtype}");
        assert_eq!(f.upstream.count("app.test", qtype), 0, "{qtype}");
    }
    assert_eq!(f.count(DnsOutcome::NoData), 4);
}

#[tokio::test]
async fn addresses_the_proxy_would_not_dial_are_left_out() {
    let f = fx().await;
    f.upstream.addrs(
        "mixed.test",
        &["10.0.0.5", "192.0.2.10", "169.254.169.254"],
        60,
    );
    f.upstream.addrs("only-private.test", &["10.0.0.5"], 60);
    let mixed = f.lookup("mixed.test", RecordType::A).await;
    assert_eq!(addrs(&mixed), vec![ip("192.0.2.10")]);
    let private = f.lookup("only-private.test", RecordType::A).await;
    assert_eq!(private.metadata.response_code, ResponseCode::NoError);
    assert!(
        private.answers.is_empty(),
        "NODATA, not an internal address"
    );
}

#[tokio::test]
async fn resolution_failures_of_allowed_names() {
    let f = fx().await;
    f.upstream.set("gone.allowed.test", Answer::NxDomain);
    f.upstream.set("slow.allowed.test", Answer::Silent);
    let gone = f.lookup("gone.allowed.test", RecordType::A).await;
    assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);
    let slow = f.lookup("slow.allowed.test", RecordType::A).await;
    assert_eq!(slow.metadata.response_code, ResponseCode::ServFail);
    assert!(f.records("dns_deny").is_empty(), "the policy allowed both");
    assert_eq!(f.count(DnsOutcome::NxDomain), 1);
    assert_eq!(f.count(DnsOutcome::ServFail), 1);
}

#[tokio::test]
async fn discovery_windows_answer_names_as_they_allow_connections() {
    let f = fx().await;
    f.upstream.addrs("x.observe.test", &["192.0.2.20"], 60);
    let m = f.lookup("x.observe.test", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("192.0.2.20")]);
}

#[tokio::test]
async fn answers_fit_the_clients_udp_size_without_the_tc_bit() {
    let f = fx().await;
    // 70 addresses: about 1150 bytes, as much as the proxy's resolver takes over UDP.
    let many: Vec<String> = (1..=70).map(|i| format!("192.0.2.{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    f.upstream.addrs("many.test", &many, 60);
    let plain = f
        .raw(&query("many.test", RecordType::A))
        .await
        .expect("answer");
    assert!(plain.len() <= 512, "{}", plain.len());
    let m = Message::from_vec(&plain).expect("parses");
    assert!(!m.metadata.truncation);
    assert!(m.edns.is_none(), "no OPT record to a client that sent none");
    assert!(
        m.answers.len() > 20 && m.answers.len() < 70,
        "{}",
        m.answers.len()
    );
    let big = f
        .raw(&query_for(name("many.test"), RecordType::A, Some(4096)))
        .await
        .expect("answer");
    assert!(big.len() <= 1232 && big.len() > 512, "{}", big.len());
    let m = Message::from_vec(&big).expect("parses");
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 70, "everything fits in 1232 bytes");
    assert_eq!(m.edns.as_ref().map(Edns::max_payload), Some(1232));
    // A client advertising less than 512 still gets 512.
    let tiny = f
        .raw(&query_for(name("many.test"), RecordType::A, Some(100)))
        .await
        .expect("answer");
    assert!(tiny.len() > 100 && tiny.len() <= 512, "{}", tiny.len());
}

#[tokio::test]
async fn a_flood_is_refused_beyond_the_rate_and_summarised_once_a_second() {
    let f = fx_settings(DnsSettings {
        rate_per_second: 1,
        rate_burst: 3,
        ..DnsSettings::default()
    })
    .await;
    let mut codes = Vec::new();
    for i in 0..10 {
        let m = f
            .lookup(&format!("{i:02x}.exfil.test"), RecordType::A)
            .await;
        codes.push(m.metadata.response_code);
    }
    let refused = codes
        .iter()
        .filter(|c| **c == ResponseCode::Refused)
        .count();
    let nx = codes
        .iter()
        .filter(|c| **c == ResponseCode::NXDomain)
        .count();
    assert_eq!((nx, refused), (3, 7), "{codes:?}");
    assert_eq!(f.count(DnsOutcome::RateLimited), 7);
    // Refused queries are not audited one by one: the first is summarised at once, the rest
    // wait for the next second.
    assert_eq!(f.records("dns_deny").len(), 3);
    let summaries = f.records("dns_rate_limited");
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    assert!(
        summaries[0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("refused 1 DNS queries"))
    );
    f.server.flush_refusals();
    assert_eq!(
        f.records("dns_rate_limited").len(),
        1,
        "at most one a second"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    f.server.flush_refusals();
    let summaries = f.records("dns_rate_limited");
    assert_eq!(summaries.len(), 2);
    assert!(
        summaries[1]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("refused 6 DNS queries")),
        "{summaries:?}"
    );
    f.server.flush_refusals();
    assert_eq!(
        f.records("dns_rate_limited").len(),
        2,
        "nothing left to say"
    );
    // The rate refills: a query a second later is answered again.
    let m = f.lookup("again.exfil.test", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

/// A policy that counts its name questions and answers them as told.
#[derive(Debug)]
struct Scripted {
    calls: AtomicUsize,
    answer: Result<Decision, PolicyError>,
    delay: Duration,
}

impl EgressPolicy for Scripted {
    fn check<'a>(&'a self, _req: &'a EgressRequest) -> CheckFuture<'a> {
        Box::pin(std::future::ready(Ok(Decision::Deny {
            reason: "connections are not asked here".into(),
        })))
    }

    fn name_allowed<'a>(&'a self, _run: &'a str, _host: &'a str) -> CheckFuture<'a> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.answer.clone()
        })
    }
}

fn scripted(answer: Result<Decision, PolicyError>, delay: Duration) -> Arc<Scripted> {
    Arc::new(Scripted {
        calls: AtomicUsize::new(0),
        answer,
        delay,
    })
}

#[tokio::test]
async fn an_unavailable_policy_fails_closed_with_servfail_and_is_asked_once_per_interval() {
    let policy = scripted(
        Err(PolicyError::Unavailable("broker unreachable".into())),
        Duration::from_millis(50),
    );
    let f = fx_with(
        policy.clone(),
        DnsSettings {
            policy_cache: Duration::from_millis(400),
            ..DnsSettings::default()
        },
        MemorySink::default(),
    )
    .await;
    f.upstream.addrs("app.test", &["192.0.2.10"], 60);
    let asks: Vec<_> = (0..8)
        .map(|_| {
            let server = f.server.clone();
            tokio::spawn(async move { server.handle(&query("app.test", RecordType::A)).await })
        })
        .collect();
    for ask in asks {
        let bytes = tokio::time::timeout(WAIT, ask)
            .await
            .expect("bounded")
            .expect("join")
            .expect("answered");
        let m = Message::from_vec(&bytes).expect("parses");
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(m.answers.is_empty());
    }
    assert_eq!(
        policy.calls.load(Ordering::SeqCst),
        1,
        "one call for the burst"
    );
    assert_eq!(
        f.upstream.count("app.test", RecordType::A),
        0,
        "nothing forwarded"
    );
    let denied = f.records("dns_deny");
    assert_eq!(denied.len(), 8);
    assert!(
        denied[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("egress policy unavailable")),
        "{denied:?}"
    );
    assert_eq!(f.count(DnsOutcome::PolicyUnavailable), 8);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let _ = f.lookup("app.test", RecordType::A).await;
    assert_eq!(
        policy.calls.load(Ordering::SeqCst),
        2,
        "asked again after the interval"
    );
}

#[tokio::test]
async fn policy_answers_are_reused_briefly_and_then_asked_again() {
    let policy = scripted(
        Ok(Decision::Allow {
            rule: "r".into(),
            substitute_auth: false,
        }),
        Duration::ZERO,
    );
    let f = fx_with(
        policy.clone(),
        DnsSettings {
            policy_cache: Duration::from_millis(300),
            ..DnsSettings::default()
        },
        MemorySink::default(),
    )
    .await;
    f.upstream.addrs("app.test", &["192.0.2.10"], 60);
    for _ in 0..5 {
        let m = f.lookup("app.test", RecordType::A).await;
        assert_eq!(addrs(&m), vec![ip("192.0.2.10")]);
    }
    assert_eq!(policy.calls.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let _ = f.lookup("app.test", RecordType::AAAA).await;
    assert_eq!(policy.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_denial_that_cannot_be_audited_is_not_answered() {
    let policy = StaticPolicy::from_toml_str(POLICY).expect("policy");
    let f = fx_with(
        Arc::new(policy),
        DnsSettings::default(),
        MemorySink::failing(),
    )
    .await;
    assert!(f.raw(&query("exfil.test", RecordType::A)).await.is_none());
    assert_eq!(f.count(DnsOutcome::Dropped), 1);
    assert_eq!(
        f.upstream.count("exfil.test", RecordType::A),
        0,
        "the refused name went nowhere"
    );
    assert_eq!(f.metrics.audit_write_failures(AuditKind::DnsDeny), 1);
    // Allowed names need no record and are still answered.
    f.upstream.addrs("app.test", &["192.0.2.10"], 60);
    let m = f.lookup("app.test", RecordType::A).await;
    assert_eq!(addrs(&m), vec![ip("192.0.2.10")]);
}

#[test]
fn settings_are_checked() {
    let ok = DnsSettings::default();
    assert_eq!(ok.validate(), Ok(()));
    let bad = [
        DnsSettings {
            max_name_len: 0,
            ..ok.clone()
        },
        DnsSettings {
            max_name_len: 254,
            ..ok.clone()
        },
        DnsSettings {
            rate_per_second: 0,
            ..ok.clone()
        },
        DnsSettings {
            rate_burst: 0,
            ..ok.clone()
        },
        DnsSettings {
            max_ttl: Duration::from_millis(500),
            ..ok.clone()
        },
        DnsSettings {
            max_in_flight: 0,
            ..ok.clone()
        },
    ];
    for s in bad {
        assert!(s.validate().is_err(), "{s:?}");
    }
}

#[tokio::test]
async fn serves_udp_sockets_until_stopped() {
    let f = fx().await;
    f.upstream.addrs("app.test", &["192.0.2.10"], 60);
    let socket = bind_udp("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr: SocketAddr = socket.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(f.server.clone().serve_udp(socket, stop_rx));
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("client");
    let mut buf = [0u8; 1500];
    for (text, want) in [
        ("app.test", ResponseCode::NoError),
        ("exfil.test", ResponseCode::NXDomain),
    ] {
        client
            .send_to(&query(text, RecordType::A), addr)
            .await
            .expect("send");
        let (n, from) = tokio::time::timeout(WAIT, client.recv_from(&mut buf))
            .await
            .expect("answered in time")
            .expect("recv");
        assert_eq!(from, addr);
        let m = Message::from_vec(&buf[..n]).expect("parses");
        assert_eq!(m.metadata.response_code, want, "{text}");
    }
    stop_tx.send(true).expect("stop");
    tokio::time::timeout(WAIT, task)
        .await
        .expect("stops")
        .expect("join")
        .expect("served");
}
