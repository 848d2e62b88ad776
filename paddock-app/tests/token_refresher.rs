//! `paddock-proxy token-refresher` against a real local token endpoint (HTTP/1.1 on
//! 127.0.0.1): discovery, rotation, an outage that keeps the last token, expiry that removes
//! it, the file's mode, and atomic replacement under a concurrent reader.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use paddock_app::token_refresher::{Refresher, RefresherConfig, TokenEndpoint, write_atomically};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SECRET: &str = "cc-secret&1";

/// A token endpoint: every successful call issues a new token `tok-<n>`.
struct Endpoint {
    addr: std::net::SocketAddr,
    calls: Arc<AtomicUsize>,
    /// Answer 503 instead (an identity provider outage).
    down: Arc<AtomicBool>,
    /// `expires_in` of the tokens issued.
    expires_in: Arc<Mutex<u64>>,
    /// The form bodies received.
    bodies: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Endpoint {
    async fn start() -> Endpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("addr");
        let calls = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let expires_in = Arc::new(Mutex::new(3600));
        let bodies: Arc<Mutex<Vec<String>>> = Arc::default();
        let (c, d, e, b) = (
            calls.clone(),
            down.clone(),
            expires_in.clone(),
            bodies.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let (c, d, e, b) = (c.clone(), d.clone(), e.clone(), b.clone());
                tokio::spawn(async move {
                    let Some((head, body)) = read_request(&mut stream).await else {
                        return;
                    };
                    let (status, answer) = answer(&head, &body, addr, &c, &d, &e, &b);
                    let response = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{answer}",
                        answer.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Endpoint {
            addr,
            calls,
            down,
            expires_in,
            bodies,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// One request: the head (lowercased header names kept as sent) and the body.
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<(String, String)> {
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut chunk = [0_u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 || Instant::now() > deadline || buf.len() > 1 << 20 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                return Some((head.to_owned(), body.to_owned()));
            }
        }
    }
}

fn answer(
    head: &str,
    body: &str,
    addr: std::net::SocketAddr,
    calls: &AtomicUsize,
    down: &AtomicBool,
    expires_in: &Mutex<u64>,
    bodies: &Mutex<Vec<String>>,
) -> (u16, String) {
    let request_line = head.lines().next().unwrap_or_default();
    if request_line.starts_with("GET /idp/.well-known/openid-configuration ") {
        return (
            200,
            format!(
                r#"{{"issuer":"http://{addr}/idp","token_endpoint":"http://{addr}/idp/token"}}"#
            ),
        );
    }
    if !request_line.starts_with("POST /idp/token ") {
        return (404, "{}".into());
    }
    let basic = format!(
        "authorization: Basic {}",
        STANDARD.encode("proxy-client:cc-secret%261")
    );
    if !head.lines().any(|l| l.eq_ignore_ascii_case(&basic)) {
        return (401, r#"{"error":"invalid_client"}"#.into());
    }
    bodies.lock().expect("bodies").push(body.to_owned());
    if down.load(Ordering::SeqCst) {
        return (503, r#"{"error":"temporarily_unavailable"}"#.into());
    }
    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
    let expires_in = *expires_in.lock().expect("expires_in");
    (
        200,
        format!(r#"{{"access_token":"tok-{n}","token_type":"Bearer","expires_in":{expires_in}}}"#),
    )
}

fn config(dir: &Path, endpoint: TokenEndpoint) -> RefresherConfig {
    std::fs::write(dir.join("secret"), format!("{SECRET}\n")).expect("secret");
    RefresherConfig {
        endpoint,
        client_id: "proxy-client".into(),
        client_secret_file: dir.join("secret"),
        scopes: vec!["paddock.proxy".into(), "openid".into()],
        audience: Some("paddock-broker".into()),
        output: dir.join("run").join("token"),
        ca_file: None,
        default_lifetime: Duration::from_mins(5),
        min_retry: Duration::from_millis(50),
        max_retry: Duration::from_millis(200),
    }
}

fn read_token(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Waits (bounded) until `f` holds.
async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), paddock_app::token_refresher::RefresherError>>,
}

fn start(config: RefresherConfig) -> Running {
    let refresher = Refresher::new(config).expect("refresher");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(refresher.run(async move {
        let _ = stopped.await;
    }));
    Running {
        stop: Some(stop),
        task,
    }
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .expect("stops")
            .expect("task")
            .expect("no error");
    }
}

fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().is_some_and(|n| n != "token"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotates_through_discovery_and_writes_0600() {
    let endpoint = Endpoint::start().await;
    // 1 s tokens: refreshed at 0.7-0.8 s.
    *endpoint.expires_in.lock().expect("e") = 1;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("run")).expect("run dir");
    let issuer = url::Url::parse(&format!("{}/idp", endpoint.url())).expect("url");
    let cfg = config(dir.path(), TokenEndpoint::Discover(issuer));
    let out = cfg.output.clone();
    let running = start(cfg);
    wait_for("the first token", Duration::from_secs(10), || {
        read_token(&out).as_deref() == Some("tok-1")
    })
    .await;
    let mode = std::fs::metadata(&out).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    wait_for("two rotations", Duration::from_secs(10), || {
        read_token(&out).as_deref() == Some("tok-3")
    })
    .await;
    running.stop().await;
    assert!(endpoint.calls.load(Ordering::SeqCst) >= 3);
    let mode = std::fs::metadata(&out).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a replaced file keeps 0600");
    assert!(leftovers(out.parent().expect("dir")).is_empty());
    let body = endpoint.bodies.lock().expect("bodies")[0].clone();
    let form: Vec<(String, String)> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(
        form,
        [
            ("grant_type".to_owned(), "client_credentials".to_owned()),
            ("scope".to_owned(), "paddock.proxy openid".to_owned()),
            ("audience".to_owned(), "paddock-broker".to_owned()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_keeps_the_last_token_until_it_expires_then_removes_it() {
    let endpoint = Endpoint::start().await;
    *endpoint.expires_in.lock().expect("e") = 2;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("run")).expect("run dir");
    let token_url = url::Url::parse(&format!("{}/idp/token", endpoint.url())).expect("url");
    let cfg = config(dir.path(), TokenEndpoint::Url(token_url));
    let out = cfg.output.clone();
    let running = start(cfg);
    wait_for("the first token", Duration::from_secs(10), || {
        read_token(&out).as_deref() == Some("tok-1")
    })
    .await;
    let written = Instant::now();
    endpoint.down.store(true, Ordering::SeqCst);
    // Refreshes fail from ~1.4 s on; the file keeps tok-1 until its 2 s are up.
    let attempts_before = endpoint.bodies.lock().expect("b").len();
    tokio::time::sleep(Duration::from_millis(1700).saturating_sub(written.elapsed())).await;
    assert_eq!(
        read_token(&out).as_deref(),
        Some("tok-1"),
        "kept during the outage"
    );
    assert!(
        endpoint.bodies.lock().expect("b").len() > attempts_before,
        "the refresher kept trying"
    );
    // Past its expiry the file is gone: the proxy's bearer_file fails closed.
    wait_for(
        "the expired token's removal",
        Duration::from_secs(5),
        || !out.exists(),
    )
    .await;
    assert!(
        written.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        written.elapsed()
    );
    // Retries are bounded by the backoff ceiling (200 ms), not a tight loop.
    let attempts = endpoint.bodies.lock().expect("b").len();
    assert!(attempts < 40, "{attempts} attempts in about 2 s");
    // The IdP recovers: a new token is written again.
    *endpoint.expires_in.lock().expect("e") = 3600;
    endpoint.down.store(false, Ordering::SeqCst);
    wait_for("recovery", Duration::from_secs(5), || {
        read_token(&out).as_deref() == Some("tok-2")
    })
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_client_secret_writes_nothing() {
    let endpoint = Endpoint::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("run")).expect("run dir");
    let token_url = url::Url::parse(&format!("{}/idp/token", endpoint.url())).expect("url");
    let mut cfg = config(dir.path(), TokenEndpoint::Url(token_url));
    std::fs::write(dir.path().join("wrong"), "nope\n").expect("secret");
    cfg.client_secret_file = dir.path().join("wrong");
    let mut refresher = Refresher::new(cfg.clone()).expect("refresher");
    let err = tokio::task::spawn_blocking(move || refresher.fetch())
        .await
        .expect("task")
        .expect_err("401");
    assert!(err.to_string().contains("HTTP 401"), "{err}");
    assert!(!err.to_string().contains("nope"));
    assert!(!cfg.output.exists());
    // The right secret, read again on the next request (rotation without a restart).
    std::fs::write(dir.path().join("wrong"), format!("{SECRET}\n")).expect("rotate");
    let mut refresher = Refresher::new(cfg).expect("refresher");
    let token = tokio::task::spawn_blocking(move || refresher.fetch())
        .await
        .expect("task")
        .expect("token");
    assert_eq!(token.secret_value(), "tok-1");
    assert!(!format!("{token:?}").contains("tok-1"));
}

/// A reader racing many replacements only ever sees a whole token, never a partial or
/// missing file.
#[test]
fn atomic_replacement_never_exposes_a_partial_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token");
    let token = |i: usize| format!("tok-{i}-{}", "x".repeat((i % 7) * 3000));
    write_atomically(&path, &token(0)).expect("first");
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (path, done) = (path.clone(), done.clone());
        std::thread::spawn(move || {
            let mut reads = 0_usize;
            while !done.load(Ordering::SeqCst) {
                let text = std::fs::read_to_string(&path).expect("never missing");
                let t = text
                    .strip_suffix('\n')
                    .expect("complete: ends with its newline");
                let i: usize = t
                    .split('-')
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .expect("a token");
                assert_eq!(t, token(i), "partial content");
                reads += 1;
            }
            reads
        })
    };
    for i in 1..300 {
        write_atomically(&path, &token(i)).expect("replace");
    }
    done.store(true, Ordering::SeqCst);
    let reads = reader.join().expect("reader");
    assert!(reads > 10, "the reader raced the writer ({reads} reads)");
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        format!("{}\n", token(299))
    );
    assert_eq!(
        std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
        0o600
    );
    assert!(
        leftovers(dir.path()).is_empty(),
        "temporary files left behind"
    );
}
