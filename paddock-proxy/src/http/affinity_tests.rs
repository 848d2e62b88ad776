//! An HTTP/1.1 agent connection's own upstream connection ([`super::affinity`]): reuse
//! within and across agent connections, a connection the upstream closed while idle, h2
//! destinations, and parking.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Request, StatusCode, Version};
use tokio::task::JoinHandle;

use super::test_support::{
    Agent, End, TestBody, TestConnector, Upstream, body_string, ctx, empty, proxy_with_pool,
    raw_upstream, unobserved_audit, within,
};
use super::{HttpLimits, NoopSubstituter, UpstreamPool};

fn get(path: &str) -> Request<TestBody> {
    Request::get(format!("https://api.test{path}"))
        .body(empty())
        .expect("request")
}

/// A pool for the test run whose connections go to `upstream`, and its connector.
fn pool_on(upstream: &Upstream, limits: &HttpLimits) -> (Arc<TestConnector>, UpstreamPool) {
    let connector = upstream.connector();
    let pool = UpstreamPool::new(&ctx().run, connector.clone(), limits);
    (connector, pool)
}

/// An HTTP/1.1 agent connection served on `pool`: the agent's client, its connection's task,
/// and the proxy's task serving it.
async fn open_agent(
    pool: &UpstreamPool,
    limits: &HttpLimits,
) -> (
    Agent,
    JoinHandle<()>,
    JoinHandle<Result<(), super::HttpError>>,
) {
    let (io, task) = proxy_with_pool(
        false,
        ctx(),
        pool.clone(),
        Arc::new(NoopSubstituter),
        unobserved_audit(),
        limits.clone(),
    );
    let (agent, conn) = Agent::connect(io, false).await;
    (agent, conn, task)
}

/// One agent connection on `pool` sending `n` requests one after the other, then closing;
/// returns once the proxy's side of it has ended.
async fn agent_connection(pool: &UpstreamPool, limits: &HttpLimits, n: usize) {
    let (mut agent, conn, task) = open_agent(pool, limits).await;
    for i in 0..n {
        let response = within("response", agent.send(get(&format!("/{i}"))))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_string(response).await, "ok");
    }
    drop(agent);
    conn.abort();
    within("the proxy side ends", task)
        .await
        .expect("task")
        .expect("served");
}

#[tokio::test]
async fn an_agent_connections_upstream_connection_serves_the_next_one() {
    let upstream = Upstream::ok(false).await;
    let limits = HttpLimits::default();
    let (connector, pool) = pool_on(&upstream, &limits);
    for round in 0..3 {
        agent_connection(&pool, &limits, 2).await;
        assert_eq!(pool.idle_h1().idle_count(), 1, "round {round}: given back");
    }
    assert_eq!(upstream.seen().len(), 6);
    assert_eq!(connector.dials(), 1, "one upstream connection for all six");
    assert!(
        upstream
            .seen()
            .iter()
            .all(|s| s.version == Version::HTTP_11 && s.headers[http::header::HOST] == "api.test"),
        "origin form with the destination's Host"
    );
}

#[tokio::test]
async fn no_idle_connections_are_kept_when_the_pool_keeps_none() {
    let upstream = Upstream::ok(false).await;
    let limits = HttpLimits {
        pool_max_idle_per_host: 0,
        ..HttpLimits::default()
    };
    let (connector, pool) = pool_on(&upstream, &limits);
    agent_connection(&pool, &limits, 2).await;
    agent_connection(&pool, &limits, 1).await;
    assert_eq!(pool.idle_h1().idle_count(), 0);
    assert_eq!(
        connector.dials(),
        2,
        "reused within a connection, not across"
    );
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_replaced() {
    // One request per connection, then an unannounced close, as servers do when their
    // keep-alive timeout runs out.
    let (connector, heads, task) = raw_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        End::Close,
    )
    .await;
    let limits = HttpLimits::default();
    let pool = UpstreamPool::new(&ctx().run, connector.clone(), &limits);
    let (mut agent, _conn, _proxy) = open_agent(&pool, &limits).await;
    for i in 1..=3 {
        let response = within("response", agent.send(get("/")))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK, "request {i}");
        assert_eq!(body_string(response).await, "ok");
        // Let the connection's task see the close before the next request.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(heads.load(Ordering::SeqCst), 3, "each request sent once");
    assert_eq!(connector.dials(), 3, "a new connection for each");
    // Across agent connections too: the closed connection given back is not handed out.
    drop(agent);
    agent_connection(&pool, &limits, 1).await;
    assert_eq!(heads.load(Ordering::SeqCst), 4);
    assert_eq!(connector.dials(), 4);
    task.abort();
}

#[tokio::test]
async fn an_h2_destination_found_by_an_http1_agent_goes_to_the_shared_pool() {
    let upstream = Upstream::ok(true).await;
    let limits = HttpLimits::default();
    let (connector, pool) = pool_on(&upstream, &limits);
    for _ in 0..3 {
        agent_connection(&pool, &limits, 2).await;
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 6);
    assert!(seen.iter().all(|s| s.version == Version::HTTP_2));
    // One dial found out (and was closed), one is the pool's multiplexed connection.
    assert_eq!(connector.dials(), 2);
    assert_eq!(pool.idle_h1().idle_count(), 0);
}

#[tokio::test]
async fn a_parked_connection_gives_its_upstream_connection_back() {
    let upstream = Upstream::ok(false).await;
    let limits = HttpLimits {
        park_after: Some(Duration::from_millis(20)),
        ..HttpLimits::default()
    };
    let (connector, pool) = pool_on(&upstream, &limits);
    let (mut agent, _conn, _proxy) = open_agent(&pool, &limits).await;
    let response = within("response", agent.send(get("/")))
        .await
        .expect("response");
    assert_eq!(body_string(response).await, "ok");
    within("the parked connection gives it back", async {
        while pool.idle_h1().idle_count() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // Another agent connection takes it while the first is parked...
    agent_connection(&pool, &limits, 1).await;
    // ...and the parked one, woken, takes it back.
    let response = within("response after the park", agent.send(get("/")))
        .await
        .expect("response");
    assert_eq!(body_string(response).await, "ok");
    assert_eq!(upstream.seen().len(), 3);
    assert_eq!(connector.dials(), 1);
}
