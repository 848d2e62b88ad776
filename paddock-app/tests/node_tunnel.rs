//! The node agent's side of the broker tunnel without a kernel (see `common`): the broker can
//! open nothing but the adapter or a shell of a pod the node agent serves, under that pod's
//! UID and run, and every refusal says why.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::Node;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use paddock_app::node::tunnel::{TunnelService, serve};
use paddock_wire::api::tunnel;

async fn connect(
    node: &Node,
    shells: bool,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let service = Arc::new(TunnelService::new(
        Arc::clone(&node.agent),
        "/nonexistent/paddock-proxy".into(),
        shells,
    ));
    tokio::spawn(serve(TokioIo::new(theirs), service));
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(ours))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    sender
}

async fn open(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    method: Method,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let uri = if method == Method::CONNECT {
        "paddock-node-agent:443"
    } else {
        "https://paddock-node-agent/"
    };
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    sender.ready().await.expect("ready");
    let resp = sender
        .send_request(req.body(Empty::new()).expect("request"))
        .await
        .expect("answer");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "every refusal of one tunnel, in turn, against the same two pods"
)]
async fn only_served_pods_of_the_named_run_are_opened() {
    let node = Node::new();
    let mut with_port = node.pod(40, "run-t");
    with_port.adapter_port = Some(8765);
    with_port.shell = true;
    let without = node.pod(41, "run-u");
    node.agent.add(with_port.clone()).await.expect("add");
    node.agent.add(without.clone()).await.expect("add");
    let mut tunnel = connect(&node, true).await;
    let uid = with_port.uid.as_str().to_owned();
    let ask = |ns: &'static str, run: &'static str, uid: String, what: &'static str| {
        vec![
            (tunnel::NAMESPACE, ns.to_owned()),
            (tunnel::RUN, run.to_owned()),
            (tunnel::POD_UID, uid),
            (tunnel::OPEN, what.to_owned()),
        ]
    };
    let call = async |t: &mut _, h: Vec<(&'static str, String)>| {
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        open(t, Method::CONNECT, &h).await
    };

    // Not a CONNECT, or not naming everything: refused before anything is looked up.
    let (status, _) = open(&mut tunnel, Method::GET, &[]).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _) = open(&mut tunnel, Method::CONNECT, &[(tunnel::RUN, "run-t")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The pod must be served here, under that UID, as that run of that namespace.
    for (ns, run, uid, why) in [
        (
            "team",
            "run-t",
            "6b1d0c2a-1111-4222-8333-00000000ffff".to_owned(),
            "another pod",
        ),
        ("team", "run-u", uid.clone(), "another run"),
        ("other", "run-t", uid.clone(), "another namespace"),
        ("team", "run-t", "not-a-uid".to_owned(), "not a UID"),
    ] {
        let (status, reason) = call(&mut tunnel, ask(ns, run, uid, tunnel::OPEN_ADAPTER)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{why}: {reason}");
        assert!(reason.contains("no pod"), "{why}: {reason}");
    }

    // A served pod without an adapter port: nothing to connect to, and the annotation named.
    let (status, reason) = call(
        &mut tunnel,
        ask(
            "team",
            "run-u",
            without.uid.as_str().to_owned(),
            tunnel::OPEN_ADAPTER,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(reason.contains("paddock.dev/adapter-port"), "{reason}");

    // The served pod's adapter: its namespace here is a plain file, so the connection fails,
    // and the answer says where it tried (the pod's port, not one the broker chose).
    let (status, reason) = call(
        &mut tunnel,
        ask("team", "run-t", uid.clone(), tunnel::OPEN_ADAPTER),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{reason}");
    assert!(reason.contains("127.0.0.1:8765"), "{reason}");

    // A shell needs a container process in the pod; this pod's cgroup has none.
    let (status, reason) = call(
        &mut tunnel,
        ask("team", "run-t", uid.clone(), tunnel::OPEN_SHELL),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{reason}");
    assert!(reason.contains("no running container process"), "{reason}");

    // A run that does not allow shells gets none, whatever the node allows.
    let (status, reason) = call(
        &mut tunnel,
        ask(
            "team",
            "run-u",
            without.uid.as_str().to_owned(),
            tunnel::OPEN_SHELL,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(reason.contains("paddock.dev/shell"), "{reason}");

    // Anything else is not opened.
    let (status, _) = call(&mut tunnel, ask("team", "run-t", uid.clone(), "socket")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A resize names a shell this node agent opened; anything else is not found, and a size
    // no terminal has is refused.
    let resize = |id: &'static str, rows: &'static str| {
        vec![
            (tunnel::SHELL_ID, id),
            (tunnel::ROWS, rows),
            (tunnel::COLS, "80"),
        ]
    };
    let mut post = async |h: Vec<(&'static str, &'static str)>| {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("https://paddock-node-agent{}", tunnel::RESIZE_PATH));
        for (k, v) in h {
            req = req.header(k, v);
        }
        tunnel.ready().await.expect("ready");
        tunnel
            .send_request(req.body(Empty::new()).expect("request"))
            .await
            .expect("answer")
            .status()
    };
    assert_eq!(post(resize("0123", "24")).await, StatusCode::NOT_FOUND);
    assert_eq!(post(resize("0123", "0")).await, StatusCode::BAD_REQUEST);

    // With shells turned off (the default), a shell is refused and says how to turn it on.
    let mut off = connect(&node, false).await;
    let (status, reason) = call(&mut off, ask("team", "run-t", uid, tunnel::OPEN_SHELL)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(reason.contains("[pods] shells"), "{reason}");
}
