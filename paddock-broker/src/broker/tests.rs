use std::collections::BTreeSet;
use std::path::Path;

use base64::{Engine as _, engine::general_purpose::STANDARD};

use super::*;
use crate::{
    audit::MemorySink,
    policy::Policy,
    ratelimit::RateLimitConfig,
    wire::{Header, RunPhase},
};

/// Every scope (the auth contract exposes no list; keep this one local).
const ALL_SCOPES: [Scope; 7] = [
    Scope::Issue,
    Scope::Renew,
    Scope::Revoke,
    Scope::ValidateEgress,
    Scope::SubstituteAuth,
    Scope::LeasesRead,
    Scope::Controller,
];

pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    pub broker: Broker,
    pub audit: Arc<MemorySink>,
}

pub(crate) fn policy_text(dir: &Path) -> String {
    let s = |name: &str| dir.join(name).display().to_string();
    format!(
        "\
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata:
  name: team-a
spec:
  appliesTo:
    namespaces: [team-a]
  credentials:
    - name: gh-header
      provider: {{kind: user-secret, inject: {{header: {{name: Authorization, prefix: \"token \"}}}}}}
      secret: {{file: {hdr}}}
      hosts: [api.github.com]
    - name: maps-query
      provider: {{kind: user-secret, inject: {{query: {{param: key}}}}, allowedQuery: [q, key]}}
      secret: {{file: {qry}}}
      hosts: [maps.example.com]
    - name: git-basic
      provider: {{kind: user-secret, inject: {{basic: {{username: x-access-token}}}}}}
      secret: {{file: {bas}}}
      hosts: [github.com]
    - name: pats
      provider: {{kind: pat-pool, inject: {{header: {{name: Authorization, prefix: \"Bearer \"}}}}, secrets: [{{file: {p1}}}, {{file: {p2}}}]}}
      hosts: [api.gitlab.com]
    - name: anthropic
      provider: {{kind: anthropic-api-key}}
      secret: {{file: {ant}}}
      hosts: [api.anthropic.com]
    - name: npm-token
      provider: {{kind: user-secret, inject: {{header: {{name: Authorization}}}}}}
      secret: {{file: {hdr}}}
      delivery: {{mode: in-container, acceptedReason: \"npm reads .npmrc itself\"}}
    - name: intranet
      provider: {{kind: user-secret, inject: {{header: {{name: Authorization, prefix: \"Bearer \"}}}}}}
      secret: {{file: {qry}}}
      hosts: [intranet.example.com]
      allowCleartext: true
  egress:
    - hosts: [api.github.com, github.com, maps.example.com, api.gitlab.com, api.anthropic.com]
      ports: [443, 80]
      substituteAuth: true
    - hosts: [intranet.example.com]
      ports: [80]
      substituteAuth: true
    - hosts: [pypi.org]
      ports: [443]
",
        hdr = s("hdr"),
        qry = s("qry"),
        bas = s("bas"),
        p1 = s("p1"),
        p2 = s("p2"),
        ant = s("ant"),
    )
}

pub(crate) fn fixture_with(limits: &RateLimitConfig) -> Fixture {
    fixture_on(Store::open_in_memory().expect("store"), limits)
}

fn fixture_on(store: Store, limits: &RateLimitConfig) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, value) in [
        ("hdr", "ghp_real"),
        ("qry", "maps-real"),
        ("bas", "git-real"),
        ("p1", "pat-one"),
        ("p2", "pat-two"),
        ("ant", "sk-ant-real"),
    ] {
        std::fs::write(dir.path().join(name), value).expect("secret");
    }
    let docs = Policy::parse_text(
        Path::new("t.yaml"),
        &policy_text(dir.path()),
        OffsetDateTime::now_utc(),
    )
    .expect("policy");
    let policy = Arc::new(PolicyStore::fixed(Policy::from_docs(docs).expect("set")));
    let audit = Arc::new(MemorySink::default());
    let broker = Broker::new(
        store,
        policy,
        audit.clone(),
        RateLimits::new(limits).expect("limits"),
    );
    let f = Fixture { dir, broker, audit };
    for (run, ns) in [
        ("r1", "team-a"),
        ("r2", "team-a"),
        ("r3", "team-a"),
        ("rb", "team-b"),
    ] {
        f.broker
            .upsert_run(
                &controller(),
                &RunUpsertRequest {
                    run: run.into(),
                    namespace: ns.into(),
                    template: "t".into(),
                    phase: RunPhase::Running,
                },
            )
            .expect("run");
    }
    f
}

pub(crate) fn fixture() -> Fixture {
    fixture_with(&RateLimitConfig::default())
}

pub(crate) fn identity(ns: &str, scopes: &[Scope]) -> Identity {
    Identity {
        subject: format!("key-{ns}"),
        namespace: ns.into(),
        service_account: None,
        scopes: scopes.iter().copied().collect::<BTreeSet<_>>(),
        backend: "test",
        run: None,
        node: None,
        placement: None,
    }
}

pub(crate) fn controller() -> Identity {
    identity("paddock-system", &ALL_SCOPES)
}

fn team_a() -> Identity {
    identity("team-a", &ALL_SCOPES[..6])
}

fn issue(f: &Fixture, run: &str, cred: &str) -> Result<IssueResponse, BrokerError> {
    f.broker.issue(
        &team_a(),
        &IssueRequest {
            run: run.into(),
            credential: cred.into(),
        },
    )
}

fn sub(
    run: &str,
    host: &str,
    headers: Vec<(&str, String)>,
    query: Option<String>,
) -> SubstituteAuthRequest {
    SubstituteAuthRequest {
        run: run.into(),
        pod: None,
        host: host.into(),
        port: 443,
        transport: Transport::Tls,
        method: "GET".into(),
        path: "/x".into(),
        query,
        headers: headers
            .into_iter()
            .map(|(n, v)| Header {
                name: n.into(),
                value: v,
            })
            .collect(),
        subscription: None,
    }
}

#[test]
fn header_substitution_end_to_end() {
    let f = fixture();
    let issued = issue(&f, "r1", "gh-header").expect("issue");
    assert!(issued.value.starts_with("pdk-user-secret-"));
    assert_eq!(issued.delivery, DeliveryMode::ProxyInjected);
    let out = f
        .broker
        .substitute_auth(
            &team_a(),
            &sub(
                "r1",
                "api.github.com",
                vec![("Authorization", format!("Bearer {}", issued.value))],
                None,
            ),
        )
        .expect("substitute");
    assert!(out.matched);
    assert_eq!(
        out.set_headers,
        vec![Header {
            name: "authorization".into(),
            value: "token ghp_real".into()
        }]
    );
    assert_eq!(out.lease_id.as_deref(), Some(issued.lease_id.as_str()));
    assert_eq!(
        out.secrets,
        vec!["ghp_real".to_owned()],
        "the secret to scrub"
    );
    assert!(!format!("{out:?}").contains("ghp_real"), "Debug redacts it");
    // Another host: the bearer is bound to api.github.com.
    let e = f
        .broker
        .substitute_auth(
            &team_a(),
            &sub(
                "r1",
                "github.com",
                vec![("Authorization", format!("Bearer {}", issued.value))],
                None,
            ),
        )
        .expect_err("wrong host");
    assert_eq!(e.code(), ErrorCode::Forbidden);
    // Another run cannot use it.
    let e = f
        .broker
        .substitute_auth(
            &team_a(),
            &sub(
                "r2",
                "api.github.com",
                vec![("Authorization", format!("Bearer {}", issued.value))],
                None,
            ),
        )
        .expect_err("wrong run");
    assert_eq!(e.code(), ErrorCode::Forbidden);
    // Host without substituteAuth grant.
    let e = f
        .broker
        .substitute_auth(&team_a(), &sub("r1", "pypi.org", vec![], None))
        .expect_err("no substitution grant");
    assert_eq!(e.code(), ErrorCode::EgressDenied);
    // No placeholder: nothing to do.
    let out = f
        .broker
        .substitute_auth(
            &team_a(),
            &sub("r1", "api.github.com", vec![("accept", "x".into())], None),
        )
        .expect("ok");
    assert!(!out.matched && out.set_headers.is_empty());
    let audit = f.audit.events();
    assert!(audit.iter().any(|e| e.event == AuditKind::CredentialIssued));
    assert!(
        audit
            .iter()
            .any(|e| e.event == AuditKind::SubstitutionDenied)
    );
    let dump = serde_json::to_string(&audit).expect("json");
    assert!(
        !dump.contains(&issued.value) && !dump.contains("ghp_real"),
        "no bearer or secret in audit"
    );
}

/// A placeholder in a plain-HTTP request: the secret is refused (TLS only) in every position
/// unless the credential's grant allows cleartext; the refusal is audited.
#[test]
fn cleartext_substitution_needs_allow_cleartext() {
    let f = fixture();
    let plain = |req: SubstituteAuthRequest| SubstituteAuthRequest {
        port: 80,
        transport: Transport::Cleartext,
        ..req
    };
    let hdr = issue(&f, "r1", "gh-header").expect("issue");
    let qry = issue(&f, "r1", "maps-query").expect("issue");
    let bas = issue(&f, "r1", "git-basic").expect("issue");
    let basic = format!(
        "Basic {}",
        STANDARD.encode(format!("x-access-token:{}", bas.value))
    );
    for req in [
        sub(
            "r1",
            "api.github.com",
            vec![("Authorization", format!("Bearer {}", hdr.value))],
            None,
        ),
        sub(
            "r1",
            "maps.example.com",
            vec![],
            Some(format!("key={}", qry.value)),
        ),
        sub("r1", "github.com", vec![("Authorization", basic)], None),
    ] {
        // Over TLS the same request is substituted.
        assert!(
            f.broker
                .substitute_auth(
                    &team_a(),
                    &SubstituteAuthRequest {
                        port: 80,
                        ..req.clone()
                    }
                )
                .expect("tls")
                .matched
        );
        let e = f
            .broker
            .substitute_auth(&team_a(), &plain(req))
            .expect_err("cleartext refused");
        assert_eq!(e.code(), ErrorCode::TlsRequired, "{e}");
        assert_eq!(e.code().http_status(), 403);
        assert!(e.public_message().contains("only be sent over TLS"), "{e}");
    }
    // A client that does not say how the request travels is treated as cleartext.
    let json = serde_json::json!({
        "run": "r1", "host": "api.github.com", "port": 443, "method": "GET", "path": "/",
        "headers": [{"name": "Authorization", "value": format!("Bearer {}", hdr.value)}],
    });
    let unsaid: SubstituteAuthRequest = serde_json::from_value(json).expect("decodes");
    assert_eq!(unsaid.transport, Transport::Cleartext);
    assert_eq!(
        f.broker
            .substitute_auth(&team_a(), &unsaid)
            .expect_err("refused")
            .code(),
        ErrorCode::TlsRequired
    );
    // The explicit opt-in is honoured.
    let intranet = issue(&f, "r1", "intranet").expect("issue");
    let out = f
        .broker
        .substitute_auth(
            &team_a(),
            &plain(sub(
                "r1",
                "intranet.example.com",
                vec![("Authorization", format!("Bearer {}", intranet.value))],
                None,
            )),
        )
        .expect("allowCleartext");
    assert!(out.matched);
    assert_eq!(out.secrets, vec!["maps-real".to_owned()]);
    let denials = f
        .audit
        .events()
        .into_iter()
        .filter(|e| e.event == AuditKind::SubstitutionDenied)
        .count();
    assert_eq!(denials, 4, "every refusal is audited");
}

#[test]
#[expect(
    clippy::many_single_char_names,
    reason = "short names for the three leases"
)]
fn query_and_basic_substitution() {
    let f = fixture();
    let q = issue(&f, "r1", "maps-query").expect("issue");
    let out = f
        .broker
        .substitute_auth(
            &team_a(),
            &sub(
                "r1",
                "maps.example.com",
                vec![],
                Some(format!("q=paris&key={}&debug=1", q.value)),
            ),
        )
        .expect("query substitution");
    assert_eq!(out.set_query.len(), 1);
    assert_eq!(
        (
            out.set_query[0].name.as_str(),
            out.set_query[0].value.as_str()
        ),
        ("key", "maps-real")
    );
    assert_eq!(
        out.remove_query,
        vec!["debug".to_owned()],
        "query allow-list applied"
    );

    let b = issue(&f, "r1", "git-basic").expect("issue");
    let basic = format!(
        "Basic {}",
        STANDARD.encode(format!("x-access-token:{}", b.value))
    );
    let out = f
        .broker
        .substitute_auth(
            &team_a(),
            &sub("r1", "github.com", vec![("Authorization", basic)], None),
        )
        .expect("basic substitution");
    let ba = out.basic_auth.expect("basic auth replacement");
    assert_eq!(
        (ba.username.as_str(), ba.password.as_str()),
        ("x-access-token", "git-real")
    );

    let a = issue(&f, "r1", "anthropic").expect("issue");
    let out = f
        .broker
        .substitute_auth(
            &team_a(),
            &sub(
                "r1",
                "api.anthropic.com",
                vec![
                    ("x-api-key", a.value.clone()),
                    ("x-stainless-os", "linux".into()),
                ],
                None,
            ),
        )
        .expect("anthropic");
    assert_eq!(
        out.set_headers,
        vec![Header {
            name: "x-api-key".into(),
            value: "sk-ant-real".into()
        }]
    );
    assert_eq!(out.remove_headers, vec!["x-stainless-os".to_owned()]);

    // Two distinct placeholders in one request are refused.
    let e = f
        .broker
        .substitute_auth(
            &team_a(),
            &sub(
                "r1",
                "api.anthropic.com",
                vec![("x-api-key", a.value.clone()), ("x-other", q.value.clone())],
                None,
            ),
        )
        .expect_err("ambiguous");
    assert_eq!(e.code(), ErrorCode::BadRequest);
}

#[test]
fn pat_pool_exhaustion_and_release() {
    let f = fixture();
    let a = issue(&f, "r1", "pats").expect("slot 0");
    let _b = issue(&f, "r2", "pats").expect("slot 1");
    let e = issue(&f, "r3", "pats").expect_err("exhausted");
    assert_eq!(e.code(), ErrorCode::PoolExhausted);
    assert_eq!(e.code().http_status(), 503);
    f.broker
        .revoke(
            &team_a(),
            &RevokeRequest {
                lease_id: a.lease_id.clone(),
            },
        )
        .expect("revoke");
    let c = issue(&f, "r3", "pats").expect("freed slot reused");
    let out = f
        .broker
        .substitute_auth(
            &team_a(),
            &sub(
                "r3",
                "api.gitlab.com",
                vec![("Authorization", format!("Bearer {}", c.value))],
                None,
            ),
        )
        .expect("substitute");
    assert_eq!(out.set_headers[0].value, "Bearer pat-one");
    let e = f
        .broker
        .substitute_auth(
            &team_a(),
            &sub(
                "r1",
                "api.gitlab.com",
                vec![("Authorization", format!("Bearer {}", a.value))],
                None,
            ),
        )
        .expect_err("revoked bearer");
    assert_eq!(e.code(), ErrorCode::Forbidden);
}

#[test]
fn namespace_scoping_and_run_binding() {
    let f = fixture();
    let other = identity("team-b", &ALL_SCOPES[..6]);
    let e = f
        .broker
        .issue(
            &other,
            &IssueRequest {
                run: "r1".into(),
                credential: "gh-header".into(),
            },
        )
        .expect_err("cross-ns");
    assert_eq!(e.code(), ErrorCode::Forbidden);
    let e2 = f
        .broker
        .issue(
            &other,
            &IssueRequest {
                run: "nope".into(),
                credential: "gh-header".into(),
            },
        )
        .expect_err("unknown");
    assert_eq!(
        (e.code(), e.public_message().replace("r1", "X")),
        (e2.code(), e2.public_message().replace("nope", "X")),
        "no existence oracle"
    );
    let lease = issue(&f, "r1", "gh-header").expect("issue");
    let e = f
        .broker
        .revoke(
            &other,
            &RevokeRequest {
                lease_id: lease.lease_id.clone(),
            },
        )
        .expect_err("cross-ns revoke");
    assert_eq!(e.code(), ErrorCode::NotFound);
    assert!(f.broker.leases(&other, "r1").is_err());
    // The controller acts anywhere.
    assert_eq!(
        f.broker
            .leases(&controller(), "r1")
            .expect("list")
            .leases
            .len(),
        1
    );
    // A run-bound identity acts only on its run.
    let mut bound = team_a();
    bound.run = Some("r2".into());
    assert_eq!(
        f.broker.leases(&bound, "r1").expect_err("bound").code(),
        ErrorCode::Forbidden
    );
    // Non-controllers cannot register runs.
    let e = f
        .broker
        .upsert_run(
            &team_a(),
            &RunUpsertRequest {
                run: "x".into(),
                namespace: "team-a".into(),
                template: "t".into(),
                phase: RunPhase::Running,
            },
        )
        .expect_err("needs controller");
    assert_eq!(e.code(), ErrorCode::Forbidden);
    // Policy grants apply only to the namespaces they name.
    let e = f
        .broker
        .issue(
            &controller(),
            &IssueRequest {
                run: "rb".into(),
                credential: "gh-header".into(),
            },
        )
        .expect_err("not granted");
    assert_eq!(e.code(), ErrorCode::Forbidden);
}

#[test]
fn terminal_run_revokes_and_blocks() {
    let f = fixture();
    let lease = issue(&f, "r1", "gh-header").expect("issue");
    f.broker
        .upsert_run(
            &controller(),
            &RunUpsertRequest {
                run: "r1".into(),
                namespace: "team-a".into(),
                template: "t".into(),
                phase: RunPhase::Succeeded,
            },
        )
        .expect("finish");
    let leases = f.broker.leases(&team_a(), "r1").expect("list").leases;
    assert!(leases.iter().all(|l| l.revoked));
    let e = f
        .broker
        .substitute_auth(
            &team_a(),
            &sub(
                "r1",
                "api.github.com",
                vec![("Authorization", format!("Bearer {}", lease.value))],
                None,
            ),
        )
        .expect_err("finished run");
    assert_eq!(e.code(), ErrorCode::Forbidden);
    assert_eq!(
        issue(&f, "r1", "gh-header").expect_err("finished").code(),
        ErrorCode::Forbidden
    );
    let d = f
        .broker
        .validate_egress(
            &team_a(),
            &ValidateEgressRequest {
                run: "r1".into(),
                pod: None,
                host: "pypi.org".into(),
                port: Some(443),
            },
        )
        .expect("decision");
    assert!(!d.allowed);
}

#[test]
fn renew_and_revoke() {
    let f = fixture();
    let lease = issue(&f, "r1", "gh-header").expect("issue");
    let renewed = f
        .broker
        .renew(
            &team_a(),
            &RenewRequest {
                lease_id: lease.lease_id.clone(),
            },
        )
        .expect("renew");
    assert!(renewed.expires_at >= lease.expires_at);
    let r = f
        .broker
        .revoke(
            &team_a(),
            &RevokeRequest {
                lease_id: lease.lease_id.clone(),
            },
        )
        .expect("revoke");
    assert!(r.revoked);
    let r = f
        .broker
        .revoke(
            &team_a(),
            &RevokeRequest {
                lease_id: lease.lease_id.clone(),
            },
        )
        .expect("idempotent");
    assert!(!r.revoked);
    let e = f
        .broker
        .renew(
            &team_a(),
            &RenewRequest {
                lease_id: lease.lease_id.clone(),
            },
        )
        .expect_err("revoked");
    assert_eq!(e.code(), ErrorCode::Forbidden);
    assert!(
        f.audit
            .events()
            .iter()
            .any(|e| e.event == AuditKind::RenewalFailed)
    );
}

#[test]
fn in_container_returns_the_secret() {
    let f = fixture();
    let issued = issue(&f, "r1", "npm-token").expect("issue");
    assert_eq!(issued.delivery, DeliveryMode::InContainer);
    assert_eq!(issued.value, "ghp_real");
    assert!(!format!("{issued:?}").contains("ghp_real"), "Debug redacts");
}

#[test]
fn audit_failure_undoes_issue() {
    let f = fixture();
    f.audit.set_failing(true);
    let e = issue(&f, "r1", "pats").expect_err("audit down");
    assert_eq!(e.code(), ErrorCode::AuditUnavailable);
    assert!(
        f.broker
            .store()
            .leases_for_run("r1")
            .expect("list")
            .is_empty(),
        "no unaudited lease remains"
    );
    assert!(
        f.broker
            .store()
            .pool_reservations("pats")
            .expect("list")
            .is_empty()
    );
    f.audit.set_failing(false);
    issue(&f, "r1", "pats").expect("works again");
}

#[test]
fn missing_secret_fails_closed() {
    let f = fixture();
    std::fs::remove_file(f.dir.path().join("hdr")).expect("rm");
    let e = issue(&f, "r1", "gh-header").expect_err("secret gone");
    assert_eq!(e.code(), ErrorCode::Unavailable);
    assert!(
        f.broker
            .store()
            .leases_for_run("r1")
            .expect("list")
            .is_empty()
    );
}

#[test]
fn rate_limited_issue() {
    let f = fixture_with(&RateLimitConfig {
        issue: crate::ratelimit::RateSpec {
            per_second: 1,
            burst: 2,
        },
        ..RateLimitConfig::default()
    });
    issue(&f, "r1", "gh-header").expect("1");
    issue(&f, "r1", "gh-header").expect("2");
    assert_eq!(
        issue(&f, "r1", "gh-header").expect_err("3").code(),
        ErrorCode::RateLimited
    );
    issue(&f, "r2", "gh-header").expect("other run unaffected");
}

/// A store that keeps shared buckets (as `PostgreSQL` does) whose answer the test sets; every
/// other call goes to an in-memory `SQLite` store.
#[derive(Debug)]
struct SharedBuckets {
    inner: crate::store::SqliteStore,
    /// 0: token granted, 1: bucket empty, 2: database out of reach.
    answer: Arc<std::sync::atomic::AtomicU8>,
}

impl crate::store::StoreBackend for SharedBuckets {
    fn kind(&self) -> &'static str {
        "test"
    }
    fn is_shared(&self) -> bool {
        true
    }
    fn upsert_run(&self, run: &RunInfo, now: u64) -> Result<(), StoreError> {
        self.inner.upsert_run(run, now)
    }
    fn run(&self, run: &str) -> Result<Option<RunInfo>, StoreError> {
        self.inner.run(run)
    }
    fn insert_lease(
        &self,
        lease: &NewLease,
        pool: Option<PoolRequest<'_>>,
        now: u64,
    ) -> Result<Option<u32>, StoreError> {
        self.inner.insert_lease(lease, pool, now)
    }
    fn delete_lease(&self, lease_id: &str) -> Result<(), StoreError> {
        self.inner.delete_lease(lease_id)
    }
    fn lease(&self, lease_id: &str) -> Result<Option<LeaseInfo>, StoreError> {
        self.inner.lease(lease_id)
    }
    fn lease_by_bearer_hash(&self, hash: &[u8; 32]) -> Result<Option<LeaseInfo>, StoreError> {
        self.inner.lease_by_bearer_hash(hash)
    }
    fn leases_for_run(&self, run: &str) -> Result<Vec<LeaseInfo>, StoreError> {
        self.inner.leases_for_run(run)
    }
    fn all_leases(&self) -> Result<Vec<LeaseInfo>, StoreError> {
        self.inner.all_leases()
    }
    fn set_expiry(&self, lease_id: &str, expires_at: u64) -> Result<(), StoreError> {
        self.inner.set_expiry(lease_id, expires_at)
    }
    fn revoke(&self, lease_id: &str) -> Result<bool, StoreError> {
        self.inner.revoke(lease_id)
    }
    fn revoke_run(&self, run: &str) -> Result<Vec<String>, StoreError> {
        self.inner.revoke_run(run)
    }
    fn pool_reservations(&self, pool: &str) -> Result<Vec<(u32, String)>, StoreError> {
        self.inner.pool_reservations(pool)
    }
    fn purge_before(&self, cutoff: u64) -> Result<usize, StoreError> {
        self.inner.purge_before(cutoff)
    }
    fn record_node_ca(
        &self,
        record: &crate::store::NodeCaRecord,
    ) -> Result<crate::store::NodeCaAdmission, StoreError> {
        self.inner.record_node_ca(record)
    }
    fn revoke_node_ca(&self, serial: &str, now: u64, reason: &str) -> Result<bool, StoreError> {
        self.inner.revoke_node_ca(serial, now, reason)
    }
    fn block_node(&self, node: &str, now: u64, reason: &str) -> Result<Vec<String>, StoreError> {
        self.inner.block_node(node, now, reason)
    }
    fn unblock_node(&self, node: &str) -> Result<bool, StoreError> {
        self.inner.unblock_node(node)
    }
    fn node_cas(&self, now: u64) -> Result<Vec<crate::store::NodeCaRecord>, StoreError> {
        self.inner.node_cas(now)
    }
    fn node_blocks(&self) -> Result<Vec<crate::store::NodeBlock>, StoreError> {
        self.inner.node_blocks()
    }
    fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping()
    }
    fn schema_version(&self) -> Result<i64, StoreError> {
        self.inner.schema_version()
    }
    fn take_rate_token(
        &self,
        _namespace: &str,
        _run: &str,
        kind: &str,
        _spec: crate::ratelimit::RateSpec,
    ) -> Result<Option<bool>, StoreError> {
        assert_eq!(kind, KIND_SUBSTITUTE);
        match self.answer.load(std::sync::atomic::Ordering::SeqCst) {
            0 => Ok(Some(true)),
            1 => Ok(Some(false)),
            _ => Err(StoreError::Unavailable("test outage".into())),
        }
    }
}

/// On a shared store the substitution budget is the store's bucket, not the in-memory one
/// (which here would allow everything), and a store error refuses with 503, never
/// "unlimited".
#[test]
fn substitutions_on_a_shared_store_take_the_stores_token_and_fail_closed() {
    use std::sync::atomic::{AtomicU8, Ordering};
    let answer = Arc::new(AtomicU8::new(0));
    let store = Store::from_backend(SharedBuckets {
        inner: crate::store::SqliteStore::open_in_memory().expect("sqlite"),
        answer: answer.clone(),
    });
    let f = fixture_on(store, &RateLimitConfig::default());
    let issued = issue(&f, "r1", "gh-header").expect("issue");
    let req = sub(
        "r1",
        "api.github.com",
        vec![("Authorization", format!("Bearer {}", issued.value))],
        None,
    );
    assert!(
        f.broker
            .substitute_auth(&team_a(), &req)
            .expect("token")
            .matched
    );
    answer.store(1, Ordering::SeqCst);
    assert_eq!(
        f.broker
            .substitute_auth(&team_a(), &req)
            .expect_err("empty")
            .code(),
        ErrorCode::RateLimited
    );
    answer.store(2, Ordering::SeqCst);
    let e = f
        .broker
        .substitute_auth(&team_a(), &req)
        .expect_err("outage");
    assert!(matches!(e, BrokerError::StoreUnavailable(_)), "{e:?}");
    assert_eq!(e.code(), ErrorCode::Unavailable);
    answer.store(0, Ordering::SeqCst);
    assert!(
        f.broker
            .substitute_auth(&team_a(), &req)
            .expect("healed")
            .matched
    );
}

#[test]
fn validate_egress_decisions() {
    let f = fixture();
    let d = f
        .broker
        .validate_egress(
            &team_a(),
            &ValidateEgressRequest {
                run: "r1".into(),
                pod: None,
                host: "api.github.com".into(),
                port: Some(443),
            },
        )
        .expect("ok");
    assert!(d.allowed && d.substitute_auth);
    let d = f
        .broker
        .validate_egress(
            &team_a(),
            &ValidateEgressRequest {
                run: "r1".into(),
                pod: None,
                host: "evil.example".into(),
                port: Some(443),
            },
        )
        .expect("ok");
    assert!(!d.allowed && d.reason.contains("evil.example"));
    assert!(
        f.audit
            .events()
            .iter()
            .any(|e| e.event == AuditKind::EgressDenied)
    );
}

#[test]
fn validate_egress_without_a_port_asks_about_the_name() {
    let f = fixture();
    let ask = |host: &str, port: Option<u16>| {
        f.broker
            .validate_egress(
                &team_a(),
                &ValidateEgressRequest {
                    run: "r1".into(),
                    pod: None,
                    host: host.into(),
                    port,
                },
            )
            .expect("decision")
    };
    // pypi.org is granted on 443 only: the name is reachable, port 80 is not.
    assert!(ask("pypi.org", None).allowed);
    assert!(!ask("pypi.org", Some(80)).allowed);
    let d = ask("exfil.example", None);
    assert!(!d.allowed, "{d:?}");
    assert!(
        d.reason.contains("exfil.example (any port)"),
        "{}",
        d.reason
    );
    let denied = f
        .audit
        .events()
        .into_iter()
        .find(|e| e.event == AuditKind::EgressDenied && e.host.as_deref() == Some("exfil.example"))
        .expect("the denied name is audited");
    assert_eq!(denied.port, None, "no port was asked about");
}

#[test]
fn validate_egress_request_json_keeps_old_clients_working() {
    let old: ValidateEgressRequest =
        serde_json::from_str(r#"{"run":"r1","host":"pypi.org","port":443}"#).expect("old JSON");
    assert_eq!(old.port, Some(443));
    let any: ValidateEgressRequest =
        serde_json::from_str(r#"{"run":"r1","host":"pypi.org"}"#).expect("no port");
    assert_eq!(any.port, None);
    let null: ValidateEgressRequest =
        serde_json::from_str(r#"{"run":"r1","host":"pypi.org","port":null}"#).expect("null");
    assert_eq!(null.port, None);
    assert_eq!(
        serde_json::to_string(&any).expect("encode"),
        r#"{"run":"r1","host":"pypi.org"}"#
    );
    assert_eq!(
        serde_json::to_string(&old).expect("encode"),
        r#"{"run":"r1","host":"pypi.org","port":443}"#
    );
}

#[test]
fn github_app_basic_placeholder_end_to_end() {
    let gh = crate::providers::github_app::fake::start(7, 42);
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("app.pem");
    std::fs::write(&key, crate::providers::github_app::fake::TEST_KEY_PEM).expect("key");
    let text = format!(
        "\
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata:
  name: gh-app
spec:
  appliesTo:
    namespaces: [team-a]
  credentials:
    - name: github
      provider:
        kind: github-app
        appId: 7
        installationId: 42
        privateKey: {{file: {key}}}
        apiBaseUrl: {base}
        repositories: [octo/repo]
      hosts: [github.com, api.github.com]
  egress:
    - hosts: [github.com, api.github.com]
      ports: [443]
      substituteAuth: true
",
        key = key.display(),
        base = gh.base_url
    );
    let docs =
        Policy::parse_text(Path::new("gh.yaml"), &text, OffsetDateTime::now_utc()).expect("policy");
    let audit = Arc::new(MemorySink::default());
    let broker = Broker::new(
        Store::open_in_memory().expect("store"),
        Arc::new(PolicyStore::fixed(Policy::from_docs(docs).expect("set"))),
        audit,
        RateLimits::new(&RateLimitConfig::default()).expect("limits"),
    );
    broker
        .upsert_run(
            &controller(),
            &RunUpsertRequest {
                run: "r1".into(),
                namespace: "team-a".into(),
                template: "t".into(),
                phase: RunPhase::Running,
            },
        )
        .expect("run");
    let issued = broker
        .issue(
            &team_a(),
            &IssueRequest {
                run: "r1".into(),
                credential: "github".into(),
            },
        )
        .expect("issue");
    assert!(issued.value.starts_with("pdk-github-app-"));
    let basic = format!(
        "Basic {}",
        STANDARD.encode(format!("x-access-token:{}", issued.value))
    );
    let out = broker
        .substitute_auth(
            &team_a(),
            &sub("r1", "github.com", vec![("Authorization", basic)], None),
        )
        .expect("substitute");
    let ba = out.basic_auth.expect("basic");
    assert_eq!(
        (ba.username.as_str(), ba.password.as_str()),
        ("x-access-token", "ghs_fake_1")
    );
    assert_eq!(
        gh.fetches.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "issue warmed the cache; substitution reused it"
    );
}

/// A node agent of `paddock-system` bound to `node`, carrying the API server's placement of
/// `run` (in `namespace`) on `outcome`.
fn node_agent(
    node: Option<&str>,
    placement: Option<(&str, &str, Result<&str, PlacementError>)>,
) -> Identity {
    let mut id = identity(
        "paddock-system",
        &[
            Scope::NodeAgent,
            Scope::ValidateEgress,
            Scope::SubstituteAuth,
        ],
    );
    id.subject = "system:serviceaccount:paddock-system:paddock-node".into();
    id.node = node.map(str::to_owned);
    id.placement = placement.map(|(run, namespace, outcome)| {
        Arc::new(crate::auth::pods::RunPlacement {
            run: run.into(),
            namespace: namespace.into(),
            outcome: outcome.map(|node| crate::auth::pods::PodNode {
                pod: format!("{run}-pod"),
                uid: format!("uid-{run}"),
                node: node.into(),
            }),
        })
    });
    id
}

fn egress(run: &str) -> ValidateEgressRequest {
    ValidateEgressRequest {
        run: run.into(),
        pod: None,
        host: "api.github.com".into(),
        port: Some(443),
    }
}

/// [`egress`] as a node agent sends it: naming the pod the connection came from.
fn egress_from(run: &str, pod: &str) -> ValidateEgressRequest {
    ValidateEgressRequest {
        pod: Some(pod.into()),
        ..egress(run)
    }
}

fn node_denials(f: &Fixture) -> Vec<AuditEvent> {
    f.audit
        .events()
        .into_iter()
        .filter(|e| e.event == AuditKind::NodeAgentDenied)
        .collect()
}

#[test]
fn node_agent_acts_only_for_runs_on_its_node() {
    let f = fixture();
    // Pod of r1 on node-a, caller on node-a: allowed, in any namespace (r1 is in team-a, the
    // agent in paddock-system).
    let on_a = node_agent(Some("node-a"), Some(("r1", "team-a", Ok("node-a"))));
    let d = f
        .broker
        .validate_egress(&on_a, &egress_from("r1", "uid-r1"))
        .expect("same node");
    assert!(d.allowed, "{d:?}");
    assert!(node_denials(&f).is_empty());

    // Pod of r1 on node-b: refused, audited with the other node, answered without it.
    let elsewhere = node_agent(Some("node-a"), Some(("r1", "team-a", Ok("node-b"))));
    let err = f
        .broker
        .validate_egress(&elsewhere, &egress_from("r1", "uid-r1"))
        .expect_err("other node");
    assert_eq!(err.code(), ErrorCode::Forbidden);
    assert!(!err.public_message().contains("node-b"), "{err}");
    let denials = node_denials(&f);
    assert_eq!(denials.len(), 1);
    assert_eq!(denials[0].run, "r1");
    assert_eq!(denials[0].namespace, "team-a");
    let reason = denials[0].reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("node-b") && reason.contains("node-a"),
        "{reason}"
    );

    // The same on substitute-auth.
    let err = f
        .broker
        .substitute_auth(&elsewhere, &sub("r1", "api.github.com", vec![], None))
        .expect_err("other node");
    assert_eq!(err.code(), ErrorCode::Forbidden);
    let from_pod = |pod: Option<&str>| SubstituteAuthRequest {
        pod: pod.map(str::to_owned),
        ..sub("r1", "api.github.com", vec![], None)
    };
    let ok = f
        .broker
        .substitute_auth(&on_a, &from_pod(Some("uid-r1")))
        .expect("same node");
    assert!(!ok.matched);

    // Right node, but another pod (one of another namespace labelled as the run, on the same
    // node) or no pod named: refused and audited.
    for pod in [Some("uid-impostor"), None] {
        let err = f
            .broker
            .validate_egress(
                &on_a,
                &ValidateEgressRequest {
                    pod: pod.map(str::to_owned),
                    ..egress("r1")
                },
            )
            .expect_err("another pod");
        assert_eq!(err.code(), ErrorCode::Forbidden, "{pod:?}");
        let err = f
            .broker
            .substitute_auth(&on_a, &from_pod(pod))
            .expect_err("another pod");
        assert_eq!(err.code(), ErrorCode::Forbidden, "{pod:?}");
    }
    let impostor = node_denials(&f);
    assert!(
        impostor.iter().any(|d| d
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("uid-impostor") && r.contains("uid-r1"))),
        "{impostor:?}"
    );

    // A placement looked up for another run does not carry over.
    let err = f
        .broker
        .validate_egress(&on_a, &egress_from("r2", "uid-r1"))
        .expect_err("placement of r1 used for r2");
    assert_eq!(err.code(), ErrorCode::Forbidden);
}

#[test]
fn node_agent_without_node_or_placement_is_refused() {
    let f = fixture();
    for (caller, why) in [
        (
            node_agent(None, Some(("r1", "team-a", Ok("node-a")))),
            "not bound to a node",
        ),
        (node_agent(Some("node-a"), None), "no pod placement"),
        (
            node_agent(Some("node-a"), Some(("r1", "team-b", Ok("node-a")))),
            "no pod placement",
        ),
        (
            node_agent(
                Some("node-a"),
                Some((
                    "r1",
                    "team-a",
                    Err(PlacementError::NotScheduled {
                        pod: "r1-pod".into(),
                        run: "r1".into(),
                    }),
                )),
            ),
            "not scheduled",
        ),
        (
            node_agent(
                Some("node-a"),
                Some((
                    "r1",
                    "team-a",
                    Err(PlacementError::ManyPods {
                        namespace: "team-a".into(),
                        run: "r1".into(),
                        count: 2,
                    }),
                )),
            ),
            "exactly one",
        ),
    ] {
        let err = f
            .broker
            .validate_egress(&caller, &egress("r1"))
            .expect_err(why);
        assert_eq!(err.code(), ErrorCode::Forbidden, "{why}: {err}");
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
    assert_eq!(node_denials(&f).len(), 5);

    // The API server being down is 503, never an allow.
    let down = node_agent(
        Some("node-a"),
        Some((
            "r1",
            "team-a",
            Err(PlacementError::Unavailable("HTTP 500".into())),
        )),
    );
    let err = f
        .broker
        .validate_egress(&down, &egress("r1"))
        .expect_err("down");
    assert_eq!(err.code(), ErrorCode::Unavailable);

    // An unknown run answers like for any caller, without an audit record (no namespace).
    let err = f
        .broker
        .validate_egress(&node_agent(Some("node-a"), None), &egress("nope"))
        .expect_err("unknown run");
    assert_eq!(err.code(), ErrorCode::Forbidden);
    assert_eq!(node_denials(&f).len(), 6);

    // A denial that cannot be audited is not answered as a plain denial.
    f.audit.set_failing(true);
    let err = f
        .broker
        .validate_egress(&node_agent(Some("node-a"), None), &egress("r1"))
        .expect_err("unaudited");
    assert_eq!(err.code(), ErrorCode::AuditUnavailable);
}

#[test]
fn node_agent_has_no_namespace_authority() {
    let f = fixture();
    let issued = issue(&f, "r1", "gh-header").expect("issue");
    // Even with a valid placement (which only the server's validate-egress and
    // substitute-auth paths fill in), the namespace-scoped calls refuse a node agent.
    let mut on_a = node_agent(Some("node-a"), Some(("r1", "team-a", Ok("node-a"))));
    on_a.namespace = "team-a".into();
    let err = f
        .broker
        .revoke(
            &on_a,
            &RevokeRequest {
                lease_id: issued.lease_id.clone(),
            },
        )
        .expect_err("revoke");
    assert_eq!(err.code(), ErrorCode::NotFound);
    let err = f
        .broker
        .renew(
            &on_a,
            &RenewRequest {
                lease_id: issued.lease_id,
            },
        )
        .expect_err("renew");
    assert_eq!(err.code(), ErrorCode::NotFound);
    let err = f
        .broker
        .upsert_run(
            &on_a,
            &RunUpsertRequest {
                run: "r9".into(),
                namespace: "team-a".into(),
                template: "t".into(),
                phase: RunPhase::Running,
            },
        )
        .expect_err("register");
    assert_eq!(err.code(), ErrorCode::Forbidden);
    // A caller that is not a node agent is unaffected by node fields it may carry.
    let mut team = team_a();
    team.node = Some("node-z".into());
    f.broker
        .validate_egress(&team, &egress("r1"))
        .expect("namespace caller");
}
