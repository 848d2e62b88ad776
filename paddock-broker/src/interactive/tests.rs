use std::{
    collections::HashMap,
    sync::{
        Arc, Barrier,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use super::*;
use crate::{
    store::Store,
    wire::{DeliveryMode, LeaseInfo, RunPhase},
};

fn run(ns: &str, id: &str) -> RunInfo {
    RunInfo {
        run: id.into(),
        namespace: ns.into(),
        template: "t".into(),
        phase: RunPhase::Running,
    }
}

#[test]
fn attach_detach_pair_and_an_unpaired_detach_never_goes_negative() {
    let r = InteractiveRouter::default();
    assert_eq!(r.on_detach("ns", "r"), 0, "detach of an unknown run");
    assert_eq!(r.on_attach("ns", "r"), 1);
    assert_eq!(r.on_attach("ns", "r"), 2);
    assert_eq!(r.on_attach("ns", "other"), 1, "runs are counted apart");
    assert_eq!(r.on_detach("ns", "r"), 1);
    assert_eq!(r.on_detach("ns", "r"), 0);
    assert_eq!(
        r.on_detach("ns", "r"),
        0,
        "an unpaired detach stays at zero"
    );
    assert_eq!(r.attached_count("ns", "r"), 0);
    // ... and the next attach counts from zero, not from below it.
    assert_eq!(r.on_attach("ns", "r"), 1);
    assert_eq!(r.attached_count("ns", "other"), 1);
}

#[test]
fn sequence_starts_at_one_and_survives_a_restart_with_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broker.db");
    {
        let store = Store::open(&path).expect("open");
        let r = InteractiveRouter::default();
        assert_eq!(r.next_seq(&*store, "ns", "r").expect("seq"), 1);
        assert_eq!(r.next_seq(&*store, "ns", "r").expect("seq"), 2);
        assert_eq!(r.next_seq(&*store, "ns", "b").expect("seq"), 1);
    }
    // A new broker process: a fresh router over the same database.
    let store = Store::open(&path).expect("reopen");
    let r = InteractiveRouter::default();
    assert_eq!(r.next_seq(&*store, "ns", "r").expect("seq"), 3);
}

/// A store that keeps no sequence: the router counts in memory, and forgetting a run
/// restarts it (the run is over; nothing can prompt it any more).
#[derive(Debug)]
struct NoSeq(Store);

impl StoreBackend for NoSeq {
    fn kind(&self) -> &'static str {
        "test"
    }
    fn is_shared(&self) -> bool {
        false
    }
    fn upsert_run(&self, run: &RunInfo, now: u64) -> Result<(), StoreError> {
        self.0.upsert_run(run, now)
    }
    fn run(&self, run: &str) -> Result<Option<RunInfo>, StoreError> {
        self.0.run(run)
    }
    fn insert_lease(
        &self,
        lease: &crate::store::NewLease,
        pool: Option<crate::store::PoolRequest<'_>>,
        now: u64,
    ) -> Result<Option<u32>, StoreError> {
        self.0.insert_lease(lease, pool, now)
    }
    fn delete_lease(&self, lease_id: &str) -> Result<(), StoreError> {
        self.0.delete_lease(lease_id)
    }
    fn lease(&self, lease_id: &str) -> Result<Option<LeaseInfo>, StoreError> {
        self.0.lease(lease_id)
    }
    fn lease_by_bearer_hash(&self, hash: &[u8; 32]) -> Result<Option<LeaseInfo>, StoreError> {
        self.0.lease_by_bearer_hash(hash)
    }
    fn leases_for_run(&self, run: &str) -> Result<Vec<LeaseInfo>, StoreError> {
        self.0.leases_for_run(run)
    }
    fn all_leases(&self) -> Result<Vec<LeaseInfo>, StoreError> {
        self.0.all_leases()
    }
    fn set_expiry(&self, lease_id: &str, expires_at: u64) -> Result<(), StoreError> {
        self.0.set_expiry(lease_id, expires_at)
    }
    fn revoke(&self, lease_id: &str) -> Result<bool, StoreError> {
        self.0.revoke(lease_id)
    }
    fn revoke_run(&self, run: &str) -> Result<Vec<String>, StoreError> {
        self.0.revoke_run(run)
    }
    fn pool_reservations(&self, pool: &str) -> Result<Vec<(u32, String)>, StoreError> {
        self.0.pool_reservations(pool)
    }
    fn purge_before(&self, cutoff: u64) -> Result<usize, StoreError> {
        self.0.purge_before(cutoff)
    }
    fn record_node_ca(
        &self,
        record: &crate::store::NodeCaRecord,
    ) -> Result<crate::store::NodeCaAdmission, StoreError> {
        self.0.record_node_ca(record)
    }
    fn revoke_node_ca(&self, serial: &str, now: u64, reason: &str) -> Result<bool, StoreError> {
        self.0.revoke_node_ca(serial, now, reason)
    }
    fn block_node(&self, node: &str, now: u64, reason: &str) -> Result<Vec<String>, StoreError> {
        self.0.block_node(node, now, reason)
    }
    fn unblock_node(&self, node: &str) -> Result<bool, StoreError> {
        self.0.unblock_node(node)
    }
    fn node_cas(&self, now: u64) -> Result<Vec<crate::store::NodeCaRecord>, StoreError> {
        self.0.node_cas(now)
    }
    fn node_blocks(&self) -> Result<Vec<crate::store::NodeBlock>, StoreError> {
        self.0.node_blocks()
    }
    fn ping(&self) -> Result<(), StoreError> {
        self.0.ping()
    }
    fn schema_version(&self) -> Result<i64, StoreError> {
        self.0.schema_version()
    }
}

#[test]
fn in_memory_sequence_increases_and_forget_drops_the_state() {
    let store = NoSeq(Store::open_in_memory().expect("store"));
    let r = InteractiveRouter::default();
    assert_eq!(r.next_seq(&store, "ns", "r").expect("seq"), 1);
    assert_eq!(r.next_seq(&store, "ns", "r").expect("seq"), 2);
    r.on_attach("ns", "r");
    assert_eq!(r.known_runs(), vec![("ns".to_owned(), "r".to_owned())]);
    r.forget("ns", "r");
    assert!(r.known_runs().is_empty(), "state forgotten");
    assert_eq!(r.attached_count("ns", "r"), 0);
    assert_eq!(r.next_seq(&store, "ns", "r").expect("seq"), 1);
}

#[tokio::test]
async fn forget_ends_the_attached_clients_streams() {
    let r = InteractiveRouter::default();
    let state = r.state("ns", "r");
    let mut rx = state.output.subscribe();
    r.forget("ns", "r");
    assert_eq!(
        rx.recv().await.expect("end message"),
        Output::End("the run ended".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prompts_of_one_run_are_serialized() {
    let r = Arc::new(InteractiveRouter::default());
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (r, inside, most) = (r.clone(), inside.clone(), most.clone());
        tasks.push(tokio::spawn(async move {
            let lock = r.prompt_lock("ns", "r");
            let _turn = lock.lock().await;
            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            inside.fetch_sub(1, Ordering::SeqCst);
        }));
    }
    // Another run's prompt is not held up by them.
    let other = r.prompt_lock("ns", "other");
    assert!(other.try_lock().is_ok());
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "two prompts of one run overlapped"
    );
}

#[test]
fn idle_runs_need_a_timeout_no_client_and_quiet_time() {
    let r = InteractiveRouter::default();
    r.on_attach("ns", "watched");
    let _ = r.prompt_lock("ns", "quiet");
    let later = Instant::now() + Duration::from_hours(1);
    assert!(r.idle_runs(later).is_empty(), "no idle timeout configured");
    r.set_config(InteractiveConfig {
        idle_timeout: Some(Duration::from_mins(1)),
        ..InteractiveConfig::default()
    });
    assert!(r.idle_runs(Instant::now()).is_empty(), "just active");
    assert_eq!(
        r.idle_runs(later),
        vec![("ns".to_owned(), "quiet".to_owned())],
        "the attached run is never idle"
    );
}

fn lease(id: &str, expires_at: u64) -> LeaseInfo {
    LeaseInfo {
        lease_id: id.into(),
        run: "r".into(),
        namespace: "ns".into(),
        credential: "c".into(),
        provider: "github-app".into(),
        delivery: DeliveryMode::ProxyInjected,
        hosts: vec![],
        pool_slot: None,
        issued_at: 0,
        expires_at,
        revoked: false,
    }
}

/// A renewer with leases whose renewal succeeds or fails by id; renewals are slow so
/// concurrent walks would overlap.
#[derive(Default)]
struct FakeRenewer {
    leases: std::sync::Mutex<HashMap<String, u64>>,
    failing: Vec<String>,
    calls: AtomicUsize,
}

impl LeaseRenewer for FakeRenewer {
    fn due_leases(&self, _run: &RunInfo, window: Duration) -> Result<Vec<LeaseInfo>, String> {
        let leases = self.leases.lock().expect("lock");
        let mut due: Vec<_> = leases
            .iter()
            .filter(|(_, exp)| **exp <= 100 + window.as_secs())
            .map(|(id, exp)| lease(id, *exp))
            .collect();
        due.sort_by(|a, b| a.lease_id.cmp(&b.lease_id));
        Ok(due)
    }

    fn renew_lease(&self, _run: &RunInfo, lease: &LeaseInfo) -> Result<u64, String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        if self.failing.contains(&lease.lease_id) {
            return Err("installation token refresh failed".into());
        }
        self.leases
            .lock()
            .expect("lock")
            .insert(lease.lease_id.clone(), 10_000);
        Ok(10_000)
    }
}

#[test]
fn walker_renews_due_leases_and_a_failure_keeps_the_lease() {
    let renewer = FakeRenewer {
        leases: std::sync::Mutex::new(HashMap::from([
            ("due".to_owned(), 150),
            ("broken".to_owned(), 160),
            ("later".to_owned(), 5_000),
        ])),
        failing: vec!["broken".into()],
        ..FakeRenewer::default()
    };
    let w = RenewalWalker::new();
    let out = w.walk(&renewer, &run("ns", "r"), Duration::from_mins(5));
    assert_eq!(out.renewed, vec!["due".to_owned()]);
    assert_eq!(out.failed.len(), 1);
    assert_eq!(out.failed[0].0, "broken");
    let leases = renewer.leases.lock().expect("lock");
    assert_eq!(leases["due"], 10_000, "renewed");
    assert_eq!(
        leases["broken"], 160,
        "a failed renewal keeps the lease as it was"
    );
    assert_eq!(leases["later"], 5_000, "not due");
}

#[test]
fn at_most_one_walk_per_run_at_a_time() {
    let renewer = Arc::new(FakeRenewer {
        leases: std::sync::Mutex::new(HashMap::from([("due".to_owned(), 150)])),
        ..FakeRenewer::default()
    });
    let w = Arc::new(RenewalWalker::new());
    let start = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (w, renewer, start) = (w.clone(), renewer.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                w.walk(&*renewer, &run("ns", "r"), Duration::from_mins(5))
            })
        })
        .collect();
    let outcomes: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let ran = outcomes.iter().filter(|o| !o.skipped).count();
    // Walks that started after the first finished may run again, but they find nothing due;
    // what must never happen is the same lease renewed twice.
    assert!(ran >= 1);
    assert_eq!(renewer.calls.load(Ordering::SeqCst), 1, "{outcomes:?}");
    // A finished walk releases the run.
    let again = w.walk(&*renewer, &run("ns", "r"), Duration::from_mins(5));
    assert!(!again.skipped);
}

/// A node agent's side of a tunnel, in memory: it serves run `r1` (echoing the stream's
/// bytes, naming a user and session for shells, recording resizes) and refuses anything else
/// with a reason.
async fn fake_node_agent(
    resizes: Arc<std::sync::Mutex<Vec<String>>>,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    use crate::wire::tunnel;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let svc = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        let resizes = Arc::clone(&resizes);
        async move {
            let header = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
            if req.uri().path() == tunnel::RESIZE_PATH {
                resizes.lock().expect("lock").push(format!(
                    "{} {}x{}",
                    header(tunnel::SHELL_ID),
                    header(tunnel::ROWS),
                    header(tunnel::COLS)
                ));
                *resp.status_mut() = http::StatusCode::NO_CONTENT;
                return Ok::<_, std::convert::Infallible>(resp);
            }
            if header(tunnel::RUN) != "r1" || header(tunnel::POD_UID) != "pod-1" {
                *resp.body_mut() = http_body_util::Full::new(bytes::Bytes::from("no pod here"));
                *resp.status_mut() = http::StatusCode::NOT_FOUND;
                return Ok(resp);
            }
            if header(tunnel::OPEN) == "shell" {
                let user = format!("uid 1000 {}x{}", header(tunnel::ROWS), header(tunnel::COLS));
                let h = resp.headers_mut();
                h.insert(
                    tunnel::USER,
                    http::HeaderValue::from_str(&user).expect("header"),
                );
                h.insert(tunnel::SHELL_ID, http::HeaderValue::from_static("s-1"));
            }
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            Ok(resp)
        }
    });
    tokio::spawn(
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(theirs), svc),
    );
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(ours))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_streams_reach_their_node_and_refusals_carry_the_reason() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tunnels = NodeTunnels::default();
    let r1 = run("ns", "r1");
    match tunnels.open("node-a", "pod-1", &r1, Open::Adapter).await {
        Err(TunnelError::NotConnected(node)) => assert_eq!(node, "node-a"),
        other => panic!("{other:?}"),
    }

    let resizes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let old = tunnels.register("node-a", fake_node_agent(Arc::clone(&resizes)).await);
    let new = tunnels.register("node-a", fake_node_agent(Arc::clone(&resizes)).await);
    assert_eq!(tunnels.nodes(), ["node-a"]);
    // The older tunnel's end does not take the newer one with it.
    tunnels.remove("node-a", old);
    assert_eq!(tunnels.nodes(), ["node-a"]);

    let opened = tunnels
        .open("node-a", "pod-1", &r1, Open::Adapter)
        .await
        .expect("adapter stream");
    assert_eq!(
        (opened.user.as_deref(), opened.shell_id.as_deref()),
        (None, None)
    );
    let mut io = opened.io;
    io.write_all(b"POST /prompts").await.expect("write");
    let mut buf = [0u8; 13];
    io.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"POST /prompts");

    let shell = tunnels
        .open(
            "node-a",
            "pod-1",
            &r1,
            Open::Shell(TermSize {
                rows: 30,
                cols: 100,
            }),
        )
        .await
        .expect("shell stream");
    assert_eq!(shell.user.as_deref(), Some("uid 1000 30x100"));
    assert_eq!(shell.shell_id.as_deref(), Some("s-1"));
    // The newest tunnel of the node carried it; the resize goes to that same tunnel.
    assert_eq!(shell.tunnel, new);
    tunnels
        .resize(
            "node-a",
            shell.tunnel,
            "s-1",
            TermSize {
                rows: 50,
                cols: 132,
            },
        )
        .await
        .expect("resize");
    assert_eq!(resizes.lock().expect("lock").as_slice(), ["s-1 50x132"]);

    // The node agent's refusal reaches the caller with its reason.
    match tunnels.open("node-a", "pod-2", &r1, Open::Adapter).await {
        Err(TunnelError::Refused { node, reason }) => {
            assert_eq!((node.as_str(), reason.as_str()), ("node-a", "no pod here"));
        }
        other => panic!("{other:?}"),
    }
    tunnels.remove("node-a", new);
    assert!(tunnels.nodes().is_empty());
}

#[test]
fn open_shells_are_capped_per_run_and_keep_it_from_looking_idle() {
    let r = InteractiveRouter::default();
    let slots: Vec<_> = (0..MAX_SHELLS_PER_RUN)
        .map(|_| r.shell_slot("ns", "r").expect("a slot"))
        .collect();
    assert!(r.shell_slot("ns", "r").is_none(), "one shell too many");
    assert!(
        r.shell_slot("ns", "other").is_some(),
        "another run has its own"
    );
    let later = Instant::now() + Duration::from_hours(1);
    assert!(
        !r.quiet_runs(later).iter().any(|(k, _)| k.1 == "r"),
        "a run with an open shell is not quiet"
    );
    drop(slots);
    assert!(
        r.shell_slot("ns", "r").is_some(),
        "closed shells free their slots"
    );
    assert!(r.quiet_runs(later).iter().any(|(k, _)| k.1 == "r"));
}
