//! Three `paddock-broker serve` processes on one `PostgreSQL` database (the server
//! `cargo xtask test` starts; each test has its own database): pool reservations from all
//! three never double-grant, a revoke on one is refused on the very next substitution at the
//! others, one run's substitution rate limit holds for the three together, a replica killed
//! with SIGKILL under load loses no lease, and a database outage is a 503 that heals without
//! a restart.

mod common;

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{
    CONTROLLER_KEY, Served, TEAM_A_KEY, post_request, serve, tls_json, write_broker_files,
};
use paddock_broker::store::{
    PostgresStore, StoreBackend,
    testing::{Outage, ScratchDb, scratch_database},
};
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};

/// A database, the files the brokers read, and a handle on the database for checks.
struct Cluster {
    dir: tempfile::TempDir,
    ca: CertificateDer<'static>,
    store: PostgresStore,
    _db: Option<ScratchDb>,
}

impl Cluster {
    fn new(db: ScratchDb) -> Self {
        let url = db.url().to_owned();
        Self::with_url(&url, Some(db))
    }

    fn with_url(url: &str, db: Option<ScratchDb>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = write_broker_files(dir.path());
        std::fs::write(dir.path().join("pg-url"), url).expect("url file");
        let store = PostgresStore::connect_url(url, None, 2, Duration::from_secs(5))
            .expect("test's own connection");
        Self {
            dir,
            ca,
            store,
            _db: db,
        }
    }

    /// Replica `n`'s config: the shared database, its own audit log.
    fn config(&self, n: usize) -> std::path::PathBuf {
        self.config_with(n, "{perSecond: 100000, burst: 100000}")
    }

    /// Replica `n`'s config with the given substitution rate limit.
    fn config_with(&self, n: usize, substitute: &str) -> std::path::PathBuf {
        let d = self.dir.path();
        let path = d.join(format!("broker-{n}.yaml"));
        std::fs::write(
            &path,
            format!(
                "listen: 127.0.0.1:0\n\
                 tls: {{cert: {d}/cert.pem, key: {d}/key.pem}}\n\
                 store:\n  postgres:\n    urlFile: {d}/pg-url\n    poolSize: 4\n    timeoutSeconds: 2\n\
                 policy: {d}/policy.yaml\n\
                 audit: {{path: {d}/audit-{n}.jsonl, fsync: false}}\n\
                 auth:\n  staticKeys: {{file: {d}/keys}}\n\
                 rateLimits:\n  issue: {{perSecond: 100000, burst: 100000}}\n  \
                 substitute: {substitute}\n",
                d = d.display()
            ),
        )
        .expect("config");
        path
    }

    fn replicas(&self, n: usize) -> Vec<Served> {
        (0..n).map(|i| serve(&self.config(i))).collect()
    }

    fn replicas_with(&self, n: usize, substitute: &str) -> Vec<Served> {
        (0..n)
            .map(|i| serve(&self.config_with(i, substitute)))
            .collect()
    }
}

async fn call(
    served: impl Into<std::net::SocketAddr>,
    ca: &CertificateDer<'static>,
    path: &str,
    key: &str,
    body: &Value,
) -> (u16, Value) {
    tls_json(
        served.into(),
        ca,
        &post_request(path, key, &body.to_string()),
    )
    .await
}

impl From<&Served> for std::net::SocketAddr {
    fn from(s: &Served) -> Self {
        s.addr
    }
}

async fn register(served: &Served, ca: &CertificateDer<'static>, runs: &[String]) {
    for run in runs {
        let (status, v) = call(
            served,
            ca,
            "/v1/runs",
            CONTROLLER_KEY,
            &json!({"run": run, "namespace": "team-a", "template": "t", "phase": "Running"}),
        )
        .await;
        assert_eq!(status, 200, "register {run}: {v}");
    }
}

/// A keep-alive HTTP/1.1 connection to one replica (the 10,000 attempts would otherwise be
/// 10,000 TLS handshakes).
struct KeepAlive(hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>);

impl KeepAlive {
    async fn connect(addr: std::net::SocketAddr, ca: &CertificateDer<'static>) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").expect("name"),
                tcp,
            )
            .await
            .expect("TLS");
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .expect("HTTP handshake");
        tokio::spawn(conn);
        Self(sender)
    }

    async fn post(&mut self, path: &str, key: &str, body: &Value) -> (u16, Value) {
        use http_body_util::BodyExt as _;
        self.0.ready().await.expect("connection reusable");
        let req = hyper::Request::post(path)
            .header("host", "localhost")
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(20), self.0.send_request(req))
            .await
            .expect("answered within 20 s")
            .expect("response");
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

fn substitute_body(run: &str, bearer: &str) -> Value {
    json!({"run": run, "host": "api.github.com", "port": 443, "transport": "tls",
           "method": "GET", "path": "/", "subscription": "sub-1",
           "headers": [{"name": "Authorization", "value": format!("Bearer {bearer}")}]})
}

/// 10,000 issue attempts on a two-slot PAT pool from three replicas at once (two clients
/// each, each client with its own runs). Every granted lease's slot, read back from the
/// database, must be free at that moment: a slot handed to two live leases fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_reservations_from_three_replicas_never_double_grant() {
    const ATTEMPTS: usize = 10_000;
    const CLIENTS_PER_REPLICA: usize = 2;
    let Some(db) = scratch_database("replicas_pool") else {
        return;
    };
    let cluster = Arc::new(Cluster::new(db));
    let served = cluster.replicas(3);
    let replicas: Arc<Vec<std::net::SocketAddr>> =
        Arc::new(served.iter().map(|r| r.addr).collect());
    let clients = replicas.len() * CLIENTS_PER_REPLICA;
    let runs: Vec<String> = (0..clients * 2).map(|i| format!("pool-run-{i}")).collect();
    register(&served[0], &cluster.ca, &runs).await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let granted = Arc::new(AtomicUsize::new(0));
    let held: Arc<Mutex<[Option<String>; 2]>> = Arc::default();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (cluster, replicas, attempts, granted, held) = (
            cluster.clone(),
            replicas.clone(),
            attempts.clone(),
            granted.clone(),
            held.clone(),
        );
        let my_runs = [runs[c * 2].clone(), runs[c * 2 + 1].clone()];
        tasks.push(tokio::spawn(async move {
            let mut conn = KeepAlive::connect(replicas[c % replicas.len()], &cluster.ca).await;
            let mut i = 0;
            while attempts.fetch_add(1, Ordering::Relaxed) < ATTEMPTS {
                let run = &my_runs[i % 2];
                i += 1;
                let (status, v) = conn
                    .post(
                        "/v1/issue",
                        TEAM_A_KEY,
                        &json!({"run": run, "credential": "pats"}),
                    )
                    .await;
                match (status, v["code"].as_str()) {
                    (200, _) => {}
                    (503, Some("PoolExhausted")) => continue,
                    other => panic!("issue on replica {}: {other:?} {v}", c % 3),
                }
                granted.fetch_add(1, Ordering::Relaxed);
                let lease_id = v["lease_id"].as_str().expect("lease id").to_owned();
                let lease = cluster
                    .store
                    .lease(&lease_id)
                    .expect("read back")
                    .expect("stored");
                let slot = lease.pool_slot.expect("a pool lease has a slot") as usize;
                {
                    let mut held = held.lock().expect("lock");
                    assert!(
                        held[slot].is_none(),
                        "slot {slot} granted to {lease_id} while {:?} holds it",
                        held[slot]
                    );
                    held[slot] = Some(lease_id.clone());
                }
                // Released before the revoke is sent: the slot cannot be granted again
                // before the revoke commits.
                held.lock().expect("lock")[slot] = None;
                let (status, v) = conn
                    .post("/v1/revoke", TEAM_A_KEY, &json!({"lease_id": lease_id}))
                    .await;
                assert_eq!((status, v["revoked"].as_bool()), (200, Some(true)), "{v}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let granted = granted.load(Ordering::Relaxed);
    eprintln!("{ATTEMPTS} attempts from 3 replicas: {granted} granted");
    assert!(granted > 100, "the pool was granted and reused ({granted})");
    assert!(
        cluster
            .store
            .pool_reservations("pats")
            .expect("reservations")
            .is_empty()
            && cluster
                .store
                .all_leases()
                .expect("leases")
                .iter()
                .all(|l| l.revoked),
        "every reservation was released"
    );
}

/// A lease revoked on replica 0 is refused by the very next substitution on replicas 1 and
/// 2, although the proxy asked for reusable grants (a shared store hands out none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_on_one_replica_is_refused_on_the_next_substitution_at_the_others() {
    let Some(db) = scratch_database("replicas_revoke") else {
        return;
    };
    let cluster = Cluster::new(db);
    let replicas = cluster.replicas(3);
    let ca = &cluster.ca;
    register(&replicas[0], ca, &["rv".to_owned()]).await;
    let (status, issued) = call(
        &replicas[1],
        ca,
        "/v1/issue",
        TEAM_A_KEY,
        &json!({"run": "rv", "credential": "gh"}),
    )
    .await;
    assert_eq!(status, 200, "{issued}");
    let bearer = issued["value"].as_str().expect("bearer").to_owned();
    for r in &replicas {
        let (status, v) = call(
            r,
            ca,
            "/v1/substitute-auth",
            TEAM_A_KEY,
            &substitute_body("rv", &bearer),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["set_headers"][0]["value"], "Bearer ghp_real", "{v}");
        assert!(
            v["grant"].is_null(),
            "no reusable grant from a replica on a shared store: {v}"
        );
    }
    let (status, v) = call(
        &replicas[0],
        ca,
        "/v1/revoke",
        TEAM_A_KEY,
        &json!({"lease_id": issued["lease_id"]}),
    )
    .await;
    assert_eq!((status, v["revoked"].as_bool()), (200, Some(true)), "{v}");
    for r in &replicas[1..] {
        let (status, v) = call(
            r,
            ca,
            "/v1/substitute-auth",
            TEAM_A_KEY,
            &substitute_body("rv", &bearer),
        )
        .await;
        assert_eq!(status, 403, "revoked elsewhere, refused here at once: {v}");
    }
    // Retried revokes, on any replica, are harmless.
    for r in &replicas {
        let (status, v) = call(
            r,
            ca,
            "/v1/revoke",
            TEAM_A_KEY,
            &json!({"lease_id": issued["lease_id"]}),
        )
        .await;
        assert_eq!((status, v["revoked"].as_bool()), (200, Some(false)), "{v}");
    }
}

/// One run's substitutions hammered through all three replicas at once (two keep-alive
/// clients each) for a bounded time: the replicas draw from one bucket in the database, so
/// the run gets at most burst + rate x elapsed successes in total (plus one token for
/// floating-point rounding), not three times that, and every other request is refused with
/// 429 `RateLimited`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_substitution_rate_limit_holds_across_replicas() {
    const BURST: u32 = 20;
    const PER_SECOND: u32 = 10;
    const HAMMER: Duration = Duration::from_secs(3);
    const MAX_PER_CLIENT: usize = 3_000;
    const CLIENTS_PER_REPLICA: usize = 2;
    let Some(db) = scratch_database("replicas_rate") else {
        return;
    };
    let cluster = Cluster::new(db);
    let served = cluster.replicas_with(3, &format!("{{perSecond: {PER_SECOND}, burst: {BURST}}}"));
    let ca = &cluster.ca;
    register(&served[0], ca, &["rl".to_owned()]).await;
    let (status, issued) = call(
        &served[1],
        ca,
        "/v1/issue",
        TEAM_A_KEY,
        &json!({"run": "rl", "credential": "gh"}),
    )
    .await;
    assert_eq!(status, 200, "{issued}");
    let body = substitute_body("rl", issued["value"].as_str().expect("bearer"));
    let mut clients = Vec::new();
    for r in &served {
        for _ in 0..CLIENTS_PER_REPLICA {
            clients.push(KeepAlive::connect(r.addr, ca).await);
        }
    }
    let started = std::time::Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let body = body.clone();
            tokio::spawn(async move {
                let (mut served, mut refused) = (0_u32, 0_u32);
                for _ in 0..MAX_PER_CLIENT {
                    if started.elapsed() >= HAMMER {
                        break;
                    }
                    let (status, v) = client.post("/v1/substitute-auth", TEAM_A_KEY, &body).await;
                    match status {
                        200 => served += 1,
                        429 => {
                            assert_eq!(v["code"], "RateLimited", "{v}");
                            refused += 1;
                        }
                        other => panic!("{other}: {v}"),
                    }
                }
                (served, refused)
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (s, r) = t.await.expect("client");
        ok += s;
        refused += r;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = f64::from(BURST) + f64::from(PER_SECOND) * elapsed + 1.0;
    eprintln!("{ok} served, {refused} refused in {elapsed:.2} s (at most {allowed:.1})");
    assert!(
        f64::from(ok) <= allowed,
        "{ok} substitutions served in {elapsed:.2} s by three replicas: more than burst {BURST} \
         + {PER_SECOND}/s (at most {allowed:.1})"
    );
    assert!(ok >= BURST, "the burst is served ({ok} of {BURST})");
    assert!(refused > 0, "the load exceeded the rate");
}

/// Substitutions spread over three replicas like a Service would; replica 1 is killed with
/// SIGKILL mid-load. Clients retry a failed connection on the next replica. No lease is
/// lost, nothing answers 5xx, and every request is eventually served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_under_load_loses_no_lease() {
    const CLIENTS: usize = 6;
    const REQUESTS: usize = 150;
    let Some(db) = scratch_database("replicas_kill") else {
        return;
    };
    let cluster = Arc::new(Cluster::new(db));
    let mut replicas = cluster.replicas(3);
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    let runs: Vec<String> = (0..CLIENTS).map(|i| format!("kill-run-{i}")).collect();
    register(&replicas[0], &cluster.ca, &runs).await;
    let mut bearers = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        let (status, v) = call(
            &replicas[i % 3],
            &cluster.ca,
            "/v1/issue",
            TEAM_A_KEY,
            &json!({"run": run, "credential": "gh"}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        bearers.push(v["value"].as_str().expect("bearer").to_owned());
    }
    let before: BTreeSet<String> = cluster
        .store
        .all_leases()
        .expect("leases")
        .into_iter()
        .map(|l| l.lease_id)
        .collect();
    let done = Arc::new(AtomicUsize::new(0));
    let retried = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (cluster, addrs, done, retried) = (
            cluster.clone(),
            addrs.clone(),
            done.clone(),
            retried.clone(),
        );
        let request = post_request(
            "/v1/substitute-auth",
            TEAM_A_KEY,
            &substitute_body(&runs[c], &bearers[c]).to_string(),
        );
        tasks.push(tokio::spawn(async move {
            for i in 0..REQUESTS {
                let mut served = false;
                // A proxy behind a Service: a refused or reset connection goes to the next
                // replica (bounded).
                for attempt in 0..addrs.len() {
                    let addr = addrs[(c + i + attempt) % addrs.len()];
                    let Ok((status, _, body)) =
                        common::try_tls_raw(addr, &cluster.ca, &request).await
                    else {
                        retried.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    assert_eq!(
                        status,
                        200,
                        "client {c} request {i} on {addr}: {}",
                        String::from_utf8_lossy(&body)
                    );
                    served = true;
                    break;
                }
                assert!(served, "client {c} request {i}: no replica served it");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Kill replica 1 once the load is well under way.
    let deadline = std::time::Instant::now() + Duration::from_mins(1);
    while done.load(Ordering::Relaxed) < CLIENTS * REQUESTS / 4 {
        assert!(std::time::Instant::now() < deadline, "load did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed = replicas.remove(1);
    drop(killed); // SIGKILL and reap
    for t in tasks {
        t.await.expect("client");
    }
    assert_eq!(done.load(Ordering::Relaxed), CLIENTS * REQUESTS);
    let retried = retried.load(Ordering::Relaxed);
    eprintln!(
        "{} requests, {retried} connection failures retried on another replica",
        CLIENTS * REQUESTS
    );
    assert!(
        retried > 0,
        "the replica died while the load still went to it"
    );
    let after: BTreeSet<String> = cluster
        .store
        .all_leases()
        .expect("leases")
        .into_iter()
        .filter(|l| !l.revoked)
        .map(|l| l.lease_id)
        .collect();
    assert_eq!(before, after, "every lease is still there and live");
}

/// The database goes away under a served broker: calls answer 503 "Unavailable" with a log
/// line naming the database, and the same process serves again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_503_and_heals_without_a_restart() {
    let Some((outage, db)) = Outage::start("replicas_outage") else {
        return;
    };
    let url = outage.url(&db);
    let cluster = Cluster::with_url(&url, Some(db));
    let served = serve(&cluster.config(0));
    let ca = &cluster.ca;
    register(&served, ca, &["ov".to_owned()]).await;
    let (status, issued) = call(
        &served,
        ca,
        "/v1/issue",
        TEAM_A_KEY,
        &json!({"run": "ov", "credential": "gh"}),
    )
    .await;
    assert_eq!(status, 200, "{issued}");
    let bearer = issued["value"].as_str().expect("bearer").to_owned();
    outage.cut();
    let started = std::time::Instant::now();
    let (status, v) = call(
        &served,
        ca,
        "/v1/substitute-auth",
        TEAM_A_KEY,
        &substitute_body("ov", &bearer),
    )
    .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (503, Some("Unavailable")),
        "fail closed: {v}"
    );
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("database unavailable")),
        "{v}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let line = served.wait_log("request failed");
    assert!(
        line["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("database unavailable")),
        "the log line says why: {line}"
    );
    let (status, _) = tls_json(
        served.addr,
        ca,
        "GET /v1/leases?run=ov HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer team-a-key-0123456789\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 503, "reads fail closed too");
    outage.restore();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, v) = call(
            &served,
            ca,
            "/v1/substitute-auth",
            TEAM_A_KEY,
            &substitute_body("ov", &bearer),
        )
        .await;
        if status == 200 {
            assert_eq!(v["set_headers"][0]["value"], "Bearer ghp_real");
            break;
        }
        assert_eq!(status, 503, "{v}");
        assert!(
            std::time::Instant::now() < deadline,
            "not recovered within 15 s: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
