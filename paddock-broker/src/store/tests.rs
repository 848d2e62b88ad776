//! One store test suite, instantiated for `SQLite` and for `PostgreSQL` (a real server started by
//! `cargo xtask test`; see [`super::testing`]).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use super::{testing::ScratchDb, *};
use crate::wire::RunPhase;

/// A store under test and what keeps its database alive.
struct Fixture {
    store: Store,
    db: Option<ScratchDb>,
}

#[expect(
    clippy::unnecessary_wraps,
    reason = "the suite macro calls both backends' fixtures alike"
)]
fn sqlite(_test: &str) -> Option<Fixture> {
    Some(Fixture {
        store: Store::open_in_memory().expect("sqlite"),
        db: None,
    })
}

fn postgres(test: &str) -> Option<Fixture> {
    let db = testing::scratch_database(test)?;
    let store = PostgresStore::connect_url(db.url(), None, 4, Duration::from_secs(5))
        .expect("connect to the scratch database");
    store.migrate().expect("migrate");
    Some(Fixture {
        store: Store::from_backend(store),
        db: Some(db),
    })
}

pub(super) fn lease(id: &str, run: &str, cred: &str, hash: u8, expires_at: u64) -> NewLease {
    NewLease {
        lease_id: id.into(),
        run: run.into(),
        namespace: "ns".into(),
        credential: cred.into(),
        provider: "pat-pool".into(),
        delivery: DeliveryMode::ProxyInjected,
        bearer_hash: Some([hash; 32]),
        hosts: vec!["api.github.com".into()],
        issued_at: 100,
        expires_at,
    }
}

fn pool_slots_are_never_shared(s: &Store) {
    let pool = Some(PoolRequest {
        pool: "pats",
        size: 2,
    });
    assert_eq!(
        s.insert_lease(&lease("l1", "r1", "pats", 1, 10_000), pool, 200)
            .expect("l1"),
        Some(0)
    );
    assert_eq!(
        s.insert_lease(&lease("l2", "r2", "pats", 2, 10_000), pool, 200)
            .expect("l2"),
        Some(1)
    );
    assert!(matches!(
        s.insert_lease(&lease("l3", "r3", "pats", 3, 10_000), pool, 200),
        Err(StoreError::PoolExhausted(_))
    ));
    assert!(
        s.lease("l3").expect("query").is_none(),
        "failed insert leaves nothing behind"
    );
    assert!(s.revoke("l1").expect("revoke"));
    assert!(!s.revoke("l1").expect("idempotent"));
    assert!(!s.revoke("nope").expect("unknown lease"));
    assert_eq!(
        s.insert_lease(&lease("l3", "r3", "pats", 3, 10_000), pool, 200)
            .expect("l3"),
        Some(0)
    );
    let found = s
        .lease_by_bearer_hash(&[2; 32])
        .expect("query")
        .expect("present");
    assert_eq!((found.lease_id.as_str(), found.pool_slot), ("l2", Some(1)));
    assert_eq!(
        s.pool_reservations("pats").expect("list"),
        vec![(0, "l3".to_owned()), (1, "l2".to_owned())]
    );
}

fn purge_removes_only_dead_leases(s: &Store) {
    let pool = Some(PoolRequest { pool: "p", size: 3 });
    s.insert_lease(&lease("old", "r1", "p", 1, 150), pool, 100)
        .expect("old");
    s.insert_lease(&lease("live", "r2", "p", 2, 10_000), pool, 100)
        .expect("live");
    s.insert_lease(&lease("rev", "r3", "p", 3, 10_000), pool, 100)
        .expect("rev");
    s.revoke("rev").expect("revoke");
    assert_eq!(s.purge_before(200).expect("purge"), 2);
    assert!(s.lease("live").expect("q").is_some());
    assert!(s.lease("old").expect("q").is_none() && s.lease("rev").expect("q").is_none());
    assert_eq!(s.pool_reservations("p").expect("list").len(), 1);
}

fn expired_reservations_are_released_and_reissue_rotates(s: &Store) {
    let pool = Some(PoolRequest { pool: "p", size: 1 });
    s.insert_lease(&lease("a", "r1", "p", 1, 150), pool, 100)
        .expect("a");
    assert_eq!(
        s.insert_lease(&lease("b", "r2", "p", 2, 900), pool, 200)
            .expect("b"),
        Some(0)
    );
    // Same run and credential again: the previous lease is revoked, its slot reused.
    assert_eq!(
        s.insert_lease(&lease("c", "r2", "p", 3, 900), pool, 200)
            .expect("c"),
        Some(0)
    );
    assert!(s.lease("b").expect("q").expect("b").revoked);
    assert!(!s.lease("c").expect("q").expect("c").revoked);
}

fn runs_and_leases_round_trip(s: &Store) {
    let run = RunInfo {
        run: "r".into(),
        namespace: "ns".into(),
        template: "t".into(),
        phase: RunPhase::Running,
    };
    s.upsert_run(&run, 1).expect("upsert");
    assert_eq!(s.run("r").expect("q"), Some(run.clone()));
    let finished = RunInfo {
        phase: RunPhase::Succeeded,
        ..run
    };
    s.upsert_run(&finished, 2).expect("upsert again");
    assert_eq!(s.run("r").expect("q"), Some(finished));
    assert_eq!(s.run("x").expect("q"), None);

    let mut l = lease("l1", "r", "c1", 7, 500);
    l.delivery = DeliveryMode::InContainer;
    l.bearer_hash = None;
    l.hosts = vec!["a.example".into(), "*.b.example".into()];
    s.insert_lease(&l, None, 1).expect("l1");
    s.insert_lease(&lease("l2", "r", "c2", 8, 600), None, 1)
        .expect("l2");
    s.insert_lease(&lease("l3", "other", "c1", 9, 600), None, 1)
        .expect("l3");
    let got = s.lease("l1").expect("q").expect("l1");
    assert_eq!(
        (
            got.delivery,
            got.hosts.clone(),
            got.expires_at,
            got.pool_slot,
            got.revoked
        ),
        (DeliveryMode::InContainer, l.hosts.clone(), 500, None, false)
    );
    s.set_expiry("l1", 900).expect("renew");
    assert_eq!(s.lease("l1").expect("q").expect("l1").expires_at, 900);
    let ids = |v: Vec<LeaseInfo>| v.into_iter().map(|l| l.lease_id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.leases_for_run("r").expect("run leases")),
        ["l1", "l2"]
    );
    assert_eq!(ids(s.all_leases().expect("all")), ["l1", "l2", "l3"]);
    let mut revoked = s.revoke_run("r").expect("revoke run");
    revoked.sort();
    assert_eq!(revoked, ["l1", "l2"]);
    assert!(s.revoke_run("r").expect("again").is_empty());
    assert!(!s.lease("l3").expect("q").expect("l3").revoked);
    s.delete_lease("l3").expect("delete");
    assert!(s.lease("l3").expect("q").is_none());
    assert!(s.lease_by_bearer_hash(&[9; 32]).expect("q").is_none());
    s.ping().expect("ping");
    assert_eq!(s.schema_version().expect("version"), SCHEMA_VERSION);
}

/// Threads issue and revoke against a small pool as fast as they can; each records the slot
/// it holds, so a slot handed to two leases at once is caught.
fn concurrent_reservations_never_double_grant(s: &Store) {
    const THREADS: usize = 6;
    const ROUNDS: usize = 60;
    const SIZE: u32 = 3;
    let held = Arc::new(Mutex::new(vec![None::<String>; SIZE as usize]));
    let granted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (held, granted) = (held.clone(), granted.clone());
            scope.spawn(move || {
                for i in 0..ROUNDS {
                    let id = format!("t{t}-{i}");
                    let mut l = lease(&id, &format!("run{t}"), "pool", 0, 10_000);
                    let hash = u8::try_from((t * ROUNDS + i) % 256).expect("byte");
                    let mut h = [hash; 32];
                    h[0] = u8::try_from(t).expect("byte");
                    h[1] = u8::try_from(i % 256).expect("byte");
                    l.bearer_hash = Some(h);
                    let pool = Some(PoolRequest {
                        pool: "shared",
                        size: SIZE,
                    });
                    match s.insert_lease(&l, pool, 200) {
                        Ok(Some(slot)) => {
                            granted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            {
                                let mut held = held.lock().expect("lock");
                                let cell = &mut held[slot as usize];
                                assert!(
                                    cell.is_none(),
                                    "slot {slot} granted to {id} while {cell:?} holds it"
                                );
                                *cell = Some(id.clone());
                            }
                            held.lock().expect("lock")[slot as usize] = None;
                            assert!(s.revoke(&id).expect("revoke"));
                        }
                        Err(StoreError::PoolExhausted(_)) => {}
                        other => panic!("issue {id}: {other:?}"),
                    }
                }
            });
        }
    });
    assert!(
        granted.load(std::sync::atomic::Ordering::Relaxed) >= ROUNDS,
        "the pool served"
    );
    assert!(s.pool_reservations("shared").expect("list").is_empty());
}

/// Turn numbers start at 1, increase by one per call, and are kept per (namespace, run).
fn turn_sequence_is_persisted_per_run(s: &Store) {
    assert_eq!(s.next_turn_seq("ns", "r").expect("seq"), Some(1));
    assert_eq!(s.next_turn_seq("ns", "r").expect("seq"), Some(2));
    assert_eq!(s.next_turn_seq("other", "r").expect("seq"), Some(1));
    assert_eq!(s.next_turn_seq("ns", "r2").expect("seq"), Some(1));
    assert_eq!(s.next_turn_seq("ns", "r").expect("seq"), Some(3));
}

fn node_ca(serial: &str, node: &str, not_after: u64) -> NodeCaRecord {
    NodeCaRecord {
        serial: serial.to_owned(),
        node: node.to_owned(),
        not_before: 100,
        not_after,
        revoked_at: None,
        reason: None,
    }
}

/// Intermediates are recorded, revoked one by one or all of a node's at once; a barred node
/// gets nothing recorded until the bar is lifted; expired ones are left out and purged.
fn node_ca_records_revocations_and_bars(s: &Store) {
    assert_eq!(
        s.record_node_ca(&node_ca("aa", "node-a", 1_000))
            .expect("record"),
        NodeCaAdmission::Recorded
    );
    s.record_node_ca(&node_ca("ab", "node-a", 2_000))
        .expect("record");
    s.record_node_ca(&node_ca("ac", "node-a", 150))
        .expect("record (expires early)");
    s.record_node_ca(&node_ca("b1", "node-b", 1_000))
        .expect("record");
    let serials = |now| -> Vec<(String, Option<u64>)> {
        s.node_cas(now)
            .expect("list")
            .into_iter()
            .map(|r| (r.serial, r.revoked_at))
            .collect()
    };
    assert_eq!(
        serials(200),
        [
            ("aa".to_owned(), None),
            ("ab".to_owned(), None),
            ("b1".to_owned(), None)
        ],
        "ordered by node then notAfter; the expired one is left out"
    );

    assert!(s.revoke_node_ca("b1", 300, "key copied").expect("revoke"));
    assert!(
        !s.revoke_node_ca("b1", 301, "again")
            .expect("twice is a no-op")
    );
    assert!(
        !s.revoke_node_ca("zz", 301, "unknown")
            .expect("unknown serial")
    );
    let b1 = s
        .node_cas(300)
        .expect("list")
        .into_iter()
        .find(|r| r.serial == "b1")
        .expect("b1");
    assert_eq!(
        (b1.revoked_at, b1.reason.as_deref()),
        (Some(300), Some("key copied"))
    );
    // Revoking one serial does not bar its node.
    assert_eq!(
        s.record_node_ca(&node_ca("b2", "node-b", 1_000))
            .expect("record"),
        NodeCaAdmission::Recorded
    );

    let mut revoked = s
        .block_node("node-a", 400, "node compromised")
        .expect("block");
    revoked.sort();
    assert_eq!(revoked, ["aa", "ab"], "every live intermediate of the node");
    match s
        .record_node_ca(&node_ca("ad", "node-a", 3_000))
        .expect("record")
    {
        NodeCaAdmission::Blocked(b) => {
            assert_eq!(
                (b.node.as_str(), b.blocked_at, b.reason.as_str()),
                ("node-a", 400, "node compromised")
            );
        }
        NodeCaAdmission::Recorded => panic!("a barred node got an intermediate recorded"),
    }
    assert!(
        !s.node_cas(400)
            .expect("list")
            .iter()
            .any(|r| r.serial == "ad"),
        "nothing recorded for a barred node"
    );
    assert_eq!(s.node_blocks().expect("blocks").len(), 1);
    assert!(s.unblock_node("node-a").expect("unblock"));
    assert!(!s.unblock_node("node-a").expect("unblock twice"));
    assert!(s.node_blocks().expect("blocks").is_empty());
    assert_eq!(
        s.record_node_ca(&node_ca("ad", "node-a", 3_000))
            .expect("record"),
        NodeCaAdmission::Recorded
    );

    s.purge_before(1_500).expect("purge");
    let left: Vec<String> = s
        .node_cas(0)
        .expect("list")
        .into_iter()
        .map(|r| r.serial)
        .collect();
    assert_eq!(
        left,
        ["ab", "ad"],
        "only intermediates past notAfter are purged"
    );
}

/// A bar racing issuances on other connections never leaves an unrevoked intermediate of
/// the barred node: each record lands either before the bar (and is revoked by it) or is
/// refused.
fn node_bar_racing_issuance_leaves_nothing_unrevoked(s: &Store) {
    const THREADS: usize = 4;
    const ROUNDS: usize = 40;
    let blocked = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let blocked = &blocked;
            scope.spawn(move || {
                for i in 0..ROUNDS {
                    let seen_block = blocked.load(std::sync::atomic::Ordering::SeqCst);
                    let got = s
                        .record_node_ca(&node_ca(&format!("s{t}-{i}"), "node-r", 10_000))
                        .expect("record");
                    if seen_block {
                        assert!(
                            matches!(got, NodeCaAdmission::Blocked(_)),
                            "recorded after the bar had returned"
                        );
                    }
                }
            });
        }
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(5));
            s.block_node("node-r", 500, "race").expect("block");
            blocked.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    });
    let live: Vec<String> = s
        .node_cas(500)
        .expect("list")
        .into_iter()
        .filter(|r| r.node == "node-r" && r.revoked_at.is_none())
        .map(|r| r.serial)
        .collect();
    assert!(live.is_empty(), "unrevoked after the bar: {live:?}");
}

macro_rules! suite {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            fn fixture(test: &str) -> Option<Fixture> {
                super::$backend(&format!("{}_{test}", stringify!($backend)))
            }

            #[test]
            fn pool_slots_are_never_shared() {
                let Some(f) = fixture("pool_slots") else {
                    return;
                };
                super::pool_slots_are_never_shared(&f.store);
            }

            #[test]
            fn purge_removes_only_dead_leases() {
                let Some(f) = fixture("purge") else { return };
                super::purge_removes_only_dead_leases(&f.store);
            }

            #[test]
            fn expired_reservations_are_released_and_reissue_rotates() {
                let Some(f) = fixture("expired") else { return };
                super::expired_reservations_are_released_and_reissue_rotates(&f.store);
            }

            #[test]
            fn runs_and_leases_round_trip() {
                let Some(f) = fixture("round_trip") else {
                    return;
                };
                super::runs_and_leases_round_trip(&f.store);
            }

            #[test]
            fn concurrent_reservations_never_double_grant() {
                let Some(f) = fixture("concurrent") else {
                    return;
                };
                super::concurrent_reservations_never_double_grant(&f.store);
            }

            #[test]
            fn node_ca_records_revocations_and_bars() {
                let Some(f) = fixture("node_ca") else { return };
                super::node_ca_records_revocations_and_bars(&f.store);
            }

            #[test]
            fn node_bar_racing_issuance_leaves_nothing_unrevoked() {
                let Some(f) = fixture("node_bar") else { return };
                super::node_bar_racing_issuance_leaves_nothing_unrevoked(&f.store);
            }

            #[test]
            fn turn_sequence_is_persisted_per_run() {
                let Some(f) = fixture("turn_seq") else { return };
                super::turn_sequence_is_persisted_per_run(&f.store);
            }
        }
    };
}

suite!(sqlite);
suite!(postgres);

/// A database outage answers `Unavailable` (503 upstream) quickly, and the same store works
/// again once the database is back, without a restart.
#[test]
fn postgres_outage_is_unavailable_and_recovers() {
    let Some((outage, db)) = testing::Outage::start("outage") else {
        return;
    };
    let store = PostgresStore::connect_url(&outage.url(&db), None, 2, Duration::from_secs(2))
        .expect("connect through the relay");
    store.migrate().expect("migrate");
    store.upsert_run(&run_info("r"), 1).expect("upsert");
    outage.cut();
    let started = std::time::Instant::now();
    for _ in 0..3 {
        match store.run("r") {
            Err(e) => assert!(e.is_unavailable(), "an outage is Unavailable, got {e:?}"),
            Ok(r) => panic!("answered {r:?} with the database cut off"),
        }
        // The shared rate limiter fails closed too: no token is "unlimited".
        let spec = crate::ratelimit::RateSpec {
            per_second: 1,
            burst: 1,
        };
        match store.take_rate_token("ns", "r", "substitute", spec) {
            Err(e) => assert!(e.is_unavailable(), "an outage is Unavailable, got {e:?}"),
            Ok(t) => panic!("rate token {t:?} with the database cut off"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "outage answers come within the timeout ({:?})",
        started.elapsed()
    );
    outage.restore();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store.run("r") {
            Ok(found) => {
                assert_eq!(found, Some(run_info("r")));
                break;
            }
            Err(e) if e.is_unavailable() && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("not recovered: {e:?}"),
        }
    }
}

/// Two stores on one database (two replicas) draw from one bucket per (namespace, run,
/// kind): the burst is shared, not doubled; other runs and kinds have their own buckets; the
/// bucket refills at the configured rate. `SQLite` keeps no shared buckets (`None`: the
/// broker's in-memory limiter applies).
#[test]
fn rate_buckets_are_shared_by_replicas_on_postgres() {
    use crate::ratelimit::RateSpec;
    let slow = RateSpec {
        per_second: 1,
        burst: 4,
    };
    let lite = Store::open_in_memory().expect("sqlite");
    assert_eq!(
        lite.take_rate_token("ns", "r", "substitute", slow)
            .expect("sqlite"),
        None
    );
    let Some(f) = postgres("rate_shared") else {
        return;
    };
    let db = f.db.as_ref().expect("postgres fixture has a database");
    let other = PostgresStore::connect_url(db.url(), None, 2, Duration::from_secs(5))
        .expect("second replica's connection");
    let replicas: [&dyn StoreBackend; 2] = [&*f.store, &other];
    let taken = (0..8)
        .filter(|i| {
            replicas[i % 2]
                .take_rate_token("ns", "r", "substitute", slow)
                .expect("take")
                == Some(true)
        })
        .count();
    // Eight calls within well under a second: the burst of four, maybe one refilled token.
    assert!(
        (4..=5).contains(&taken),
        "{taken} tokens from a shared burst of 4"
    );
    for r in replicas {
        assert_eq!(
            r.take_rate_token("ns", "r", "substitute", slow)
                .expect("take"),
            Some(false),
            "empty for every replica"
        );
    }
    assert_eq!(
        other
            .take_rate_token("ns", "r2", "substitute", slow)
            .expect("other run"),
        Some(true)
    );
    assert_eq!(
        other
            .take_rate_token("ns", "r", "egress", slow)
            .expect("other kind"),
        Some(true)
    );
    let fast = RateSpec {
        per_second: 20,
        burst: 4,
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        f.store
            .take_rate_token("ns", "r", "substitute", fast)
            .expect("refilled"),
        Some(true),
        "the bucket refills with time"
    );
}

/// A database no broker can reach refuses at start-up with `Unavailable`.
#[test]
fn postgres_unreachable_at_start_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("host=127.0.0.1 port={port} user=postgres sslmode=disable");
    let err = PostgresStore::connect_url(&url, None, 1, Duration::from_secs(1))
        .expect_err("nothing listens");
    assert!(err.is_unavailable(), "{err:?}");
}

/// Migrating twice is a no-op; a schema newer than the binary is refused, not used.
#[test]
fn postgres_migrations_are_versioned() {
    let Some(f) = postgres("migrations") else {
        return;
    };
    let db = f.db.as_ref().expect("scratch db");
    let again = PostgresStore::connect_url(db.url(), None, 1, Duration::from_secs(5))
        .expect("second replica");
    assert_eq!(again.migrate().expect("again"), SCHEMA_VERSION);
    assert_eq!(f.store.schema_version().expect("version"), SCHEMA_VERSION);
    testing::admin_sql(db.url(), "INSERT INTO schema_version (version) VALUES (99)")
        .expect("future version");
    assert!(matches!(
        again.migrate(),
        Err(StoreError::SchemaVersion {
            found: 99,
            expected: SCHEMA_VERSION
        })
    ));
}

/// A database written before versioning (the tables, no `schema_version`) migrates in place
/// and keeps its rows.
#[test]
fn sqlite_unversioned_database_migrates_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("old.db");
    {
        let c = rusqlite::Connection::open(&path).expect("open");
        c.execute_batch(
            "CREATE TABLE runs (run TEXT PRIMARY KEY, namespace TEXT NOT NULL, template TEXT NOT NULL,
             phase TEXT NOT NULL, updated_at INTEGER NOT NULL);
             INSERT INTO runs VALUES ('r', 'ns', 't', 'Running', 1);",
        )
        .expect("old schema");
    }
    let s = Store::open(&path).expect("migrate");
    assert_eq!(s.schema_version().expect("version"), SCHEMA_VERSION);
    assert_eq!(s.run("r").expect("q"), Some(run_info("r")));
    s.insert_lease(&lease("l", "r", "c", 1, 10), None, 1)
        .expect("the new tables exist");
}

/// A restarted broker (the same `SQLite` file opened again) continues the turn sequence.
#[test]
fn sqlite_turn_sequence_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("seq.db");
    {
        let s = Store::open(&path).expect("open");
        assert_eq!(s.next_turn_seq("ns", "r").expect("seq"), Some(1));
        assert_eq!(s.next_turn_seq("ns", "r").expect("seq"), Some(2));
    }
    let s = Store::open(&path).expect("reopen");
    assert_eq!(s.next_turn_seq("ns", "r").expect("seq"), Some(3));
}

fn run_info(run: &str) -> RunInfo {
    RunInfo {
        run: run.into(),
        namespace: "ns".into(),
        template: "t".into(),
        phase: RunPhase::Running,
    }
}

/// The synchronous client blocks on a runtime of its own: called from an async worker (an
/// authenticator resolving a run does that) it must step aside, not panic, on both runtime
/// flavours.
#[test]
fn postgres_store_is_callable_from_async_workers() {
    let Some(f) = postgres("async_workers") else {
        return;
    };
    f.store.upsert_run(&run_info("a"), 1).expect("upsert");
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("multi-thread runtime");
    let current = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("current-thread runtime");
    for rt in [&multi, &current] {
        let store = f.store.clone();
        let found = rt
            .block_on(async move { tokio::spawn(async move { store.run("a") }).await })
            .expect("task")
            .expect("query");
        assert_eq!(found, Some(run_info("a")));
    }
}
