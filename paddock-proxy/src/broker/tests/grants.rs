//! Reused substitution answers against the real broker: a revoke racing 1,000 requests in
//! flight lets none through after it returned, run ends and policy changes take grants back
//! before they return, a proxy that cannot acknowledge is cut off, a broken stream falls back
//! to per-request calls, and the run's rate limit still holds.

use std::sync::atomic::{AtomicUsize, Ordering};

use hyper::client::conn::http1::SendRequest;
use paddock_broker::ratelimit::RateSpec;

use super::*;
use crate::broker::GrantCache;
use crate::broker::grants::grant_key;

fn limits(per_second: u32, burst: u32) -> RateLimitConfig {
    RateLimitConfig {
        substitute: RateSpec { per_second, burst },
        ..RateLimitConfig::default()
    }
}

/// A broker whose substitution rate limit stays out of the way.
async fn roomy() -> Fixture {
    Fixture::start(Options {
        limits: Some(limits(10_000, 10_000)),
        ..Options::default()
    })
    .await
}

/// A substituter with a grant cache whose stream is subscribed.
async fn cached(fx: &Fixture) -> (Arc<BrokerSubstituter>, GrantCache) {
    let client = fx.proxy_client();
    let cache = GrantCache::start(client.clone());
    within("subscription", async {
        while cache.subscription().is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    (
        Arc::new(BrokerSubstituter::new(client).with_grants(cache.clone())),
        cache,
    )
}

fn gh_request(gh: &str, extra: &str) -> http::request::Parts {
    request(
        "https://api.github.com/user",
        &[
            (AUTHORIZATION.as_str(), &format!("Bearer {gh}")),
            ("x-request-id", extra),
        ],
    )
}

/// When the upstream saw a request, and whether it carried the real secret.
type Arrivals = Arc<Mutex<Vec<(Instant, bool)>>>;

/// A keep-alive HTTP/1.1 upstream that notes each request's arrival and answers after a
/// little work, so requests are in flight when the revoke comes.
async fn timed_upstream() -> (SocketAddr, Arrivals, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let arrivals: Arrivals = Arc::default();
    let seen = arrivals.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let real = req
                    .headers()
                    .get(AUTHORIZATION)
                    .is_some_and(|v| v.as_bytes() == format!("Bearer {HEADER_SECRET}").as_bytes());
                seen.lock().expect("arrivals").push((Instant::now(), real));
                async {
                    tokio::time::sleep(Duration::from_micros(300)).await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, arrivals, task)
}

/// One agent keep-alive connection into `serve_connection`.
async fn agent_connection(
    upstream: SocketAddr,
    substituter: Arc<dyn Substituter>,
    audit: RequestAudit,
) -> (SendRequest<Empty<Bytes>>, tokio::task::JoinHandle<()>) {
    let ctx = ctx("api.github.com");
    let limits = HttpLimits::default();
    let pool = UpstreamPool::new(&ctx.run, Arc::new(LoopbackConnector(upstream)), &limits);
    let (agent_io, proxy_io) = tokio::io::duplex(64 * 1024);
    let served = tokio::spawn(async move {
        let _ = serve_connection(
            proxy_io,
            Some(b"http/1.1"),
            ctx,
            pool,
            substituter,
            audit,
            limits,
            None,
        )
        .await;
    });
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(agent_io))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    (send, served)
}

/// The issue's race: 1,000 requests from 50 keep-alive connections, most served from a
/// reused grant, and the lease revoked while they run. Every request the upstream received
/// with the real secret arrived before the revoke returned; every request sent after it
/// returned was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: workers, the revoke, then the checks"
)]
async fn a_revoke_racing_a_thousand_requests_lets_none_through_after_it_returned() {
    const TOTAL: usize = 1_000;
    const WORKERS: usize = 50;
    const REVOKE_AFTER: usize = 300;
    /// Bounds the loop if the revoke never returned (the test then fails on its deadline).
    const HARD_CAP: usize = 20_000;
    let fx = Fixture::start(Options {
        limits: Some(limits(100_000, 100_000)),
        ..Options::default()
    })
    .await;
    let (sub, cache) = cached(&fx).await;
    let (lease, gh) = fx.issue("gh").await;
    let (upstream, arrivals, upstream_task) = timed_upstream().await;
    let (_, _, audit) = capture_audit();

    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let reached = Arc::new(tokio::sync::Notify::new());
    // Set once the revoke returned: every worker then sends at least one more request, so
    // requests after the revoke exist however long it took on a loaded machine.
    let revoke_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (mut send, served) = agent_connection(upstream, sub.clone(), audit.clone()).await;
        let (next, answered, reached, gh, revoke_done) = (
            next.clone(),
            answered.clone(),
            reached.clone(),
            gh.clone(),
            revoke_done.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut sent_after = false;
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                let after = revoke_done.load(Ordering::SeqCst);
                if (n >= TOTAL && sent_after) || n >= HARD_CAP {
                    break;
                }
                sent_after |= after;
                let req = Request::get("/user")
                    .header(http::header::HOST, "api.github.com")
                    .header(AUTHORIZATION, format!("Bearer {gh}"))
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                within("ready", send.ready()).await.expect("connection");
                let sent_at = Instant::now();
                let response = within("response", send.send_request(req))
                    .await
                    .expect("response");
                let status = response.status();
                let _ = response.into_body().collect().await;
                outcomes.push((sent_at, status));
                if answered.fetch_add(1, Ordering::SeqCst) + 1 == REVOKE_AFTER {
                    reached.notify_one();
                }
                // Paced so the requests span the revoke: about 40 ms in all.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            served.abort();
            outcomes
        }));
    }
    within("the first requests", reached.notified()).await;
    let revoke_started = Instant::now();
    let revoked = within(
        "revoke",
        fx.admin.revoke(&RevokeRequest {
            lease_id: lease.clone(),
        }),
    )
    .await
    .expect("revoke");
    let revoke_returned = Instant::now();
    revoke_done.store(true, Ordering::SeqCst);
    eprintln!("revoke took {:?}", revoke_returned - revoke_started);
    assert!(revoked.revoked);

    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(within("worker", w).await.expect("worker"));
    }
    upstream_task.abort();
    assert!(outcomes.len() >= TOTAL, "{} requests", outcomes.len());
    let arrivals = arrivals.lock().expect("arrivals").clone();
    let with_secret: Vec<Instant> = arrivals
        .iter()
        .filter(|(_, real)| *real)
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(
        with_secret.len(),
        arrivals.len(),
        "only substituted requests went up"
    );
    let late = with_secret
        .iter()
        .filter(|at| **at >= revoke_returned)
        .count();
    assert_eq!(
        late, 0,
        "{late} requests reached the upstream after the revoke returned"
    );
    let ok = outcomes
        .iter()
        .filter(|(_, s)| *s == StatusCode::OK)
        .count();
    assert_eq!(ok, with_secret.len(), "every 200 was a forwarded request");
    assert!(
        ok >= REVOKE_AFTER - WORKERS,
        "requests before the revoke went through ({ok})"
    );
    let after: Vec<StatusCode> = outcomes
        .iter()
        .filter(|(sent, _)| *sent >= revoke_returned)
        .map(|(_, s)| *s)
        .collect();
    assert!(
        !after.is_empty(),
        "some requests were sent after the revoke returned"
    );
    assert!(
        after.iter().all(|s| *s == StatusCode::FORBIDDEN),
        "requests after the revoke: {after:?}"
    );
    assert!(
        cache.hits() >= (ok / 2) as u64,
        "most substitutions came from the reused grant ({} of {ok})",
        cache.hits()
    );
    assert!(cache.is_empty(), "the revoked grant is gone");
}

/// A request on its way upstream under a grant holds the revoke until it has been answered
/// (its `Substituted::hold` is dropped), so it cannot reach the upstream after the revoke
/// returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_waits_for_the_requests_in_flight_under_its_grant() {
    let fx = roomy().await;
    let (sub, cache) = cached(&fx).await;
    let (lease, gh) = fx.issue("gh").await;
    substitute(sub.as_ref(), &mut gh_request(&gh, "1"), "api.github.com")
        .await
        .expect("granted");
    let in_flight = substitute(sub.as_ref(), &mut gh_request(&gh, "2"), "api.github.com")
        .await
        .expect("reused");
    assert_eq!(cache.hits(), 1);
    let admin = fx.admin.clone();
    let revoke = tokio::spawn(async move {
        admin
            .revoke(&RevokeRequest { lease_id: lease })
            .await
            .expect("revoke");
        Instant::now()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !revoke.is_finished(),
        "the revoke returned with a request in flight"
    );
    assert!(
        cache.is_empty(),
        "the grant is no longer handed out meanwhile"
    );
    let landed = Instant::now();
    drop(in_flight);
    let returned = within("revoke", revoke).await.expect("join");
    assert!(returned >= landed);
    assert!(
        returned - landed < Duration::from_millis(800),
        "acknowledged once the request landed, not cut off ({:?})",
        returned - landed
    );
}

/// A run's end and a policy change take grants back before they return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_end_and_policy_changes_take_grants_back_before_returning() {
    let fx = roomy().await;
    let (_, cache) = cached(&fx).await;
    let metrics = Arc::new(crate::metrics::ProxyMetrics::new());
    let sub = Arc::new(
        BrokerSubstituter::new(fx.proxy_client())
            .with_grants(cache.clone())
            .with_metrics(Arc::clone(&metrics)),
    );
    let (_, gh) = fx.issue("gh").await;
    for i in 0..3 {
        substitute(
            sub.as_ref(),
            &mut gh_request(&gh, &i.to_string()),
            "api.github.com",
        )
        .await
        .expect("substituted");
    }
    assert_eq!(cache.hits(), 2, "the second and third came from the grant");
    assert_eq!(cache.len(), 1);
    let exposed = metrics.encode();
    assert!(
        exposed.contains("paddock_proxy_grant_reuses_total 2")
            && exposed.contains("paddock_proxy_substitutions_total 3"),
        "{exposed}"
    );

    // The policy loses its substitution grant: reloaded, and the grant is gone on return.
    let policy_path = fx.dir.path().join("policy.yaml");
    std::fs::write(
        &policy_path,
        policy_yaml(fx.dir.path(), true).replace("substituteAuth: true", "substituteAuth: false"),
    )
    .expect("policy");
    let broker = fx.broker.clone();
    let reloaded = tokio::task::spawn_blocking(move || broker.reload_policy(false))
        .await
        .expect("join")
        .expect("reload");
    assert!(reloaded);
    assert!(
        cache.is_empty(),
        "grants dropped before the reload returned"
    );
    let err = substitute(sub.as_ref(), &mut gh_request(&gh, "p"), "api.github.com")
        .await
        .expect_err("no substitution grant any more");
    assert!(matches!(err, SubstituteError::Denied { .. }), "{err}");

    // Restored, re-granted, then the run ends.
    std::fs::write(&policy_path, policy_yaml(fx.dir.path(), true)).expect("policy");
    let broker = fx.broker.clone();
    tokio::task::spawn_blocking(move || broker.reload_policy(false))
        .await
        .expect("join")
        .expect("reload");
    for i in 0..2 {
        substitute(
            sub.as_ref(),
            &mut gh_request(&gh, &i.to_string()),
            "api.github.com",
        )
        .await
        .expect("substituted again");
    }
    assert_eq!(cache.len(), 1);
    within(
        "run end",
        fx.admin.upsert_run(&RunUpsertRequest {
            run: RUN.into(),
            namespace: "team-a".into(),
            template: "t".into(),
            phase: RunPhase::Succeeded,
        }),
    )
    .await
    .expect("run ended");
    assert!(
        cache.is_empty(),
        "grants dropped before the run's end returned"
    );
    let err = substitute(sub.as_ref(), &mut gh_request(&gh, "e"), "api.github.com")
        .await
        .expect_err("run over");
    assert!(matches!(err, SubstituteError::Denied { .. }), "{err}");
}

/// A proxy whose request under a grant never lands cannot acknowledge: the broker cuts it
/// off and waits out its lease, and the proxy no longer uses that grant or subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_cannot_acknowledge_is_cut_off_and_waited_out() {
    let fx = roomy().await;
    let (sub, cache) = cached(&fx).await;
    let (lease, gh) = fx.issue("gh").await;
    // Held like a request whose upstream never answers.
    let stuck = substitute(
        sub.as_ref(),
        &mut gh_request(&gh, "stuck"),
        "api.github.com",
    )
    .await
    .expect("substituted");
    let first_subscription = cache.subscription().expect("subscribed");
    let started = Instant::now();
    within(
        "revoke",
        fx.admin.revoke(&RevokeRequest { lease_id: lease }),
    )
    .await
    .expect("revoke");
    let took = started.elapsed();
    let hub = *fx.broker.grants().config();
    assert!(
        took >= hub.ack_timeout && took >= hub.lease.saturating_sub(hub.hold),
        "the revoke waited for the acknowledgement, then the lease ({took:?})"
    );
    assert!(cache.is_empty());
    assert_ne!(
        cache.subscription(),
        Some(first_subscription),
        "the cut-off subscription is not used again"
    );
    let err = substitute(
        sub.as_ref(),
        &mut gh_request(&gh, "after"),
        "api.github.com",
    )
    .await
    .expect_err("revoked");
    assert!(matches!(err, SubstituteError::Denied { .. }), "{err}");
    drop(stuck);
}

/// The stream goes down with the broker: every grant is dropped at once and requests fail
/// closed, whatever uses a grant had left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_drops_every_grant() {
    let mut fx = roomy().await;
    let (sub, cache) = cached(&fx).await;
    let (_, gh) = fx.issue("gh").await;
    substitute(sub.as_ref(), &mut gh_request(&gh, "1"), "api.github.com")
        .await
        .expect("substituted");
    assert_eq!(cache.len(), 1);
    fx.stop().await;
    let lease = fx.broker.grants().config().lease;
    within("grants dropped", async {
        while !cache.is_empty() || cache.subscription().is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let err = substitute(sub.as_ref(), &mut gh_request(&gh, "2"), "api.github.com")
        .await
        .expect_err("broker gone");
    assert!(matches!(err, SubstituteError::Unavailable { .. }), "{err}");
    assert!(lease > Duration::ZERO);
}

/// Grants are paid for out of the run's substitution budget up front: however requests are
/// served, no more succeed than the bucket allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_grants_stay_within_the_runs_rate_limit() {
    const PER_SECOND: u32 = 100;
    const BURST: u32 = 50;
    let fx = Fixture::start(Options {
        limits: Some(limits(PER_SECOND, BURST)),
        ..Options::default()
    })
    .await;
    let (sub, cache) = cached(&fx).await;
    let (_, gh) = fx.issue("gh").await;
    let started = Instant::now();
    let mut ok = 0_u32;
    for i in 0..300 {
        match substitute(
            sub.as_ref(),
            &mut gh_request(&gh, &i.to_string()),
            "api.github.com",
        )
        .await
        {
            Ok(_) => ok += 1,
            Err(SubstituteError::Unavailable { reason }) => {
                assert!(reason.contains("rate limit"), "{reason}");
            }
            Err(e) => panic!("{e}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a few hundred at most"
    )]
    let allowed = BURST + (f64::from(PER_SECOND) * elapsed).ceil() as u32;
    assert!(
        ok <= allowed,
        "{ok} substitutions, the bucket allowed {allowed}"
    );
    assert!(ok >= BURST / 2, "the budget was used ({ok})");
    assert!(cache.hits() > 0, "grants were reused");
}

/// The key holds what the broker's answer depends on and nothing else.
#[test]
#[expect(clippy::too_many_lines, reason = "a table of request variants")]
fn grant_keys_follow_the_request_shape_not_its_other_values() {
    let gh = "pdk-user-secret-0123456789abcdef0123456789abcdef0123456789abcdef";
    let other = "pdk-user-secret-fedcba9876543210fedcba9876543210fedcba9876543210";
    let key = |parts: &mut http::request::Parts, ctx: &RequestContext, pod: Option<&str>| {
        grant_key(&RequestHead::new(parts), ctx, pod)
    };
    let gh_ctx = super::ctx("api.github.com");
    let base = key(&mut gh_request(gh, "a"), &gh_ctx, None).expect("key");
    assert_eq!(
        crate::broker::grants::key_placeholder(&base).as_deref(),
        Some(gh),
        "the key names the placeholder"
    );
    assert_eq!(
        key(&mut gh_request(gh, "another id"), &gh_ctx, None),
        Some(base.clone()),
        "other header values do not matter"
    );
    let mut different = vec![
        key(&mut gh_request(other, "a"), &gh_ctx, None),
        key(&mut gh_request(gh, "a"), &gh_ctx, Some("pod-uid")),
        key(&mut gh_request(gh, "a"), &super::ctx("github.com"), None),
        key(
            &mut gh_request(gh, "a"),
            &RequestContext {
                port: 8443,
                ..gh_ctx.clone()
            },
            None,
        ),
        key(
            &mut gh_request(gh, "a"),
            &RequestContext {
                sni: None,
                ..gh_ctx.clone()
            },
            None,
        ),
        key(
            &mut gh_request(gh, "a"),
            &RequestContext {
                run: "run-2".into(),
                ..gh_ctx.clone()
            },
            None,
        ),
        key(
            &mut request(
                "https://api.github.com/user",
                &[
                    (AUTHORIZATION.as_str(), &format!("Bearer {gh}")),
                    ("x-extra", "a"),
                ],
            ),
            &gh_ctx,
            None,
        ),
        key(
            &mut request(
                &format!("https://api.github.com/user?k={gh}"),
                &[("x-request-id", "a")],
            ),
            &gh_ctx,
            None,
        ),
        key(
            &mut request(
                "https://api.github.com/user",
                &[
                    (AUTHORIZATION.as_str(), &basic("x-access-token", gh)),
                    ("x-request-id", "a"),
                ],
            ),
            &gh_ctx,
            None,
        ),
        key(
            &mut request(
                "https://api.github.com/user",
                &[
                    (AUTHORIZATION.as_str(), &basic("someone", gh)),
                    ("x-request-id", "a"),
                ],
            ),
            &gh_ctx,
            None,
        ),
    ];
    different.push(Some(base));
    let distinct: BTreeSet<Vec<u8>> = different
        .iter()
        .map(|k| k.clone().expect("each has a key").to_vec())
        .collect();
    assert_eq!(
        distinct.len(),
        different.len(),
        "each difference changes the key"
    );

    let mut two = request(
        "https://api.github.com/user",
        &[
            (AUTHORIZATION.as_str(), &format!("Bearer {gh}")),
            ("x-api-key", other),
        ],
    );
    assert_eq!(
        key(&mut two, &gh_ctx, None),
        None,
        "two placeholders: the broker decides"
    );
    let mut none = request("https://api.github.com/user?k=pdk-short", &[]);
    assert_eq!(key(&mut none, &gh_ctx, None), None);
}

/// Egress re-checks over the broker keep an allow while the invalidation stream's generation
/// holds (no broker call per interval), and a policy reload is seen by the very next re-check
/// after the reload returned, however long the interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_are_pushed_to_egress_rechecks() {
    let fx = Fixture::start(Options::default()).await;
    let (_, cache) = cached(&fx).await;
    let policy = Arc::new(BrokerPolicy::new(fx.proxy_client()).with_generation(cache.clone()));
    let recheck = Arc::new(crate::policy::EgressRecheck::new(
        policy,
        Duration::from_millis(50),
    ));
    let conn = recheck.for_connection(
        EgressRequest::new(RUN, "plain.example.com", 443, Mode::Transparent).expect("req"),
    );
    let egress_calls = || fx.audit.events().len();
    within("recheck", conn.check()).await.expect("allowed");
    let generation = cache.generation().expect("live");
    tokio::time::sleep(Duration::from_millis(120)).await;
    within("recheck", conn.check())
        .await
        .expect("still allowed");
    assert_eq!(cache.generation(), Some(generation), "nothing changed");
    let before = egress_calls();

    std::fs::write(
        fx.dir.path().join("policy.yaml"),
        policy_yaml(fx.dir.path(), false),
    )
    .expect("policy without plain.example.com");
    let broker = fx.broker.clone();
    tokio::task::spawn_blocking(move || broker.reload_policy(false))
        .await
        .expect("join")
        .expect("reload");
    assert_ne!(
        cache.generation(),
        Some(generation),
        "pushed before the reload returned"
    );
    let err = within("recheck", conn.check())
        .await
        .expect_err("withdrawn at once");
    assert!(err.is_denial(), "{err}");
    assert!(
        egress_calls() > before,
        "the broker was asked (and audited the denial)"
    );
}
