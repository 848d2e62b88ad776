//! The Kubernetes pod source and the CNI step against recorded API server answers (kube-rs's
//! client over a mock tower service, the kube-rs way of testing without a cluster): the
//! initial list, watch events, a `410 Gone` relist, API errors, pod deletion releasing the
//! interception, and CNI ADD / CHECK / DEL answered from the directory.

mod common;

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

use common::Node;
use paddock_app::node::control::{self, Request as Ctl};
use paddock_app::node::pod::PodSpec;
use paddock_app::node::pods::{Lookup, PodDirectory, PodSettings, pod_meta, watch_pods};
use paddock_proxy::pod_cgroup::PodUid;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn pod_json(spec: &PodSpec, run: Option<&str>, rv: &str) -> Value {
    let mut labels = json!({"app": "agent"});
    if let Some(r) = run {
        labels["paddock.dev/run"] = json!(r);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "uid": spec.uid.as_str(),
                     "labels": labels, "resourceVersion": rv},
        "spec": {"nodeName": "node-1", "containers": [{"name": "agent", "image": "agent"}]},
    })
}

fn list(items: &[Value], rv: &str) -> Response<Body> {
    let body = json!({"apiVersion": "v1", "kind": "PodList",
        "metadata": {"resourceVersion": rv}, "items": items});
    Response::builder()
        .status(200)
        .body(Body::from(serde_json::to_vec(&body).expect("json")))
        .expect("response")
}

fn events(events: &[(&str, Value)]) -> Response<Body> {
    let mut body = Vec::new();
    for (kind, object) in events {
        body.extend(serde_json::to_vec(&json!({"type": kind, "object": object})).expect("json"));
        body.push(b'\n');
    }
    Response::builder()
        .status(200)
        .body(Body::from(body))
        .expect("response")
}

fn gone() -> Response<Body> {
    events(&[(
        "ERROR",
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": "too old resource version", "reason": "Expired", "code": 410}),
    )])
}

/// The next request, checked to be a list (`watch` absent) or a watch of this node's pods.
async fn next(handle: &mut Handle, watch: bool) -> tower_test::mock::SendResponse<Response<Body>> {
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("the watcher asks again")
        .expect("a request");
    let uri = req.uri().to_string();
    assert!(uri.starts_with("/api/v1/pods?"), "{uri}");
    assert!(
        uri.contains("fieldSelector=spec.nodeName%3Dnode-1"),
        "only this node's pods: {uri}"
    );
    assert_eq!(uri.contains("watch=true"), watch, "{uri}");
    send
}

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn settings() -> PodSettings {
    PodSettings {
        run_label: "paddock.dev/run".into(),
        cluster_dns: vec!["10.96.0.10".parse().expect("ip")],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one scripted conversation with the API server; its steps depend on each other"
)]
async fn the_watch_keeps_the_directory_and_releases_deleted_pods() {
    let node = Arc::new(Node::new());
    let agent_pod = node.pod(20, "run-a");
    let plain_pod = node.pod(21, "unused");
    let late_pod = node.pod(22, "run-b");
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let dir = PodDirectory::with_cni_wait(Duration::from_secs(5));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let agent = Arc::new(Node::agent_in(node.dir.path(), &node.maps, &node.origdst));
    let watch = tokio::spawn(watch_pods(
        kube::Api::all(client),
        "node-1".into(),
        settings(),
        Arc::clone(&dir),
        Arc::clone(&agent),
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
    ));

    // Nothing is known before the first list: a CNI ADD now would be refused.
    assert_eq!(
        dir.lookup(&agent_pod.uid, Duration::ZERO).await,
        Lookup::Unknown
    );
    next(&mut handle, false).await.send_response(list(
        &[
            pod_json(&agent_pod, Some("run-a"), "10"),
            pod_json(&plain_pod, None, "11"),
        ],
        "11",
    ));
    until("listed", async || dir.is_synced()).await;
    let Lookup::Agent(meta) = dir.lookup(&agent_pod.uid, Duration::ZERO).await else {
        panic!("the labelled pod is an agent pod");
    };
    assert_eq!(meta.run.as_deref(), Some("run-a"));
    assert_eq!(
        meta.nameservers,
        ["10.96.0.10".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert!(matches!(
        dir.lookup(&plain_pod.uid, Duration::ZERO).await,
        Lookup::NotAgent(_)
    ));

    // The CNI step intercepts the agent pod from what the directory says.
    let added = control::answer(
        &agent,
        Some(&dir),
        Ctl::CniAdd {
            uid: agent_pod.uid.clone(),
            namespace: agent_pod.namespace.clone(),
            name: agent_pod.name.clone(),
            netns: agent_pod.netns.clone(),
        },
    )
    .await;
    assert!(added.ok, "{added:?}");
    assert_eq!(added.intercepted, Some(true));
    assert_eq!(added.pod.as_ref().expect("pod")["run"], "run-a");

    // A watch brings a new pod; a CNI ADD waiting for it succeeds once it arrives.
    let watching = next(&mut handle, true).await;
    let late = {
        let (agent, dir, p) = (Arc::clone(&agent), Arc::clone(&dir), late_pod.clone());
        tokio::spawn(async move {
            control::answer(
                &agent,
                Some(&dir),
                Ctl::CniAdd {
                    uid: p.uid,
                    namespace: p.namespace,
                    name: p.name,
                    netns: p.netns,
                },
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    watching.send_response(events(&[
        ("ADDED", pod_json(&late_pod, Some("run-b"), "12")),
        ("DELETED", pod_json(&agent_pod, Some("run-a"), "13")),
    ]));
    let late = late.await.expect("join");
    assert!(late.ok && late.intercepted == Some(true), "{late:?}");
    // Deleted in the API while its cgroup is still there (a force delete; containers may
    // still run): kept intercepted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        agent.list().await.iter().any(|p| p.uid == agent_pod.uid),
        "a deleted pod whose cgroup remains must stay intercepted"
    );
    // Once kubelet has removed its cgroup, the next deletion event releases it.
    node.delete_pod_files(&agent_pod);
    next(&mut handle, true).await.send_response(events(&[(
        "DELETED",
        pod_json(&agent_pod, Some("run-a"), "14"),
    )]));
    until("deleted pod released", async || {
        agent.list().await.iter().all(|p| p.uid != agent_pod.uid)
    })
    .await;
    assert!(
        !node.maps.0.lock().expect("maps").config.is_empty(),
        "the late pod stays"
    );

    // The watch ends; the next one is answered 410 Gone: the watcher relists. The relist no
    // longer has the late pod (deleted, cgroup and all, while the watch was down): it is
    // released too.
    node.delete_pod_files(&late_pod);
    next(&mut handle, true).await.send_response(gone());
    let relist = next(&mut handle, false).await;
    relist.send_response(list(&[pod_json(&plain_pod, None, "20")], "20"));
    until("stale pod released after relist", async || {
        agent.list().await.is_empty()
    })
    .await;
    assert!(node.maps.0.lock().expect("maps").config.is_empty());
    assert!(!dir.contains(&late_pod.uid));

    // API server errors: the watcher backs off and asks again; the directory keeps its view.
    next(&mut handle, true).await.send_response(
        Response::builder()
            .status(500)
            .body(Body::from(b"{\"kind\":\"Status\",\"code\":500}".to_vec()))
            .expect("response"),
    );
    assert!(dir.contains(&plain_pod.uid), "an API error forgets nothing");
    let _again = tokio::time::timeout(Duration::from_secs(30), handle.next_request())
        .await
        .expect("retried after an error");
    let _ = stop_tx.send(true);
    watch.await.expect("watch task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cni_calls_are_answered_from_the_directory() {
    let node = Node::new();
    let dir = PodDirectory::with_cni_wait(Duration::from_millis(200));
    let agent_pod = node.pod(30, "run-a");
    let plain_pod = node.pod(31, "unused");
    let stranger = node.pod(32, "run-z");
    let meta = |spec: &PodSpec, run: Option<&str>| {
        let pod: k8s_openapi::api::core::v1::Pod =
            serde_json::from_value(pod_json(spec, run, "1")).expect("pod");
        pod_meta(&pod, &settings()).expect("meta")
    };
    dir.replace(vec![
        meta(&agent_pod, Some("run-a")),
        meta(&plain_pod, None),
    ]);
    let add = |p: &PodSpec, namespace: &str| Ctl::CniAdd {
        uid: p.uid.clone(),
        namespace: namespace.into(),
        name: p.name.clone(),
        netns: p.netns.clone(),
    };

    // Not an agent pod: fine, nothing intercepted.
    let r = control::answer(&node.agent, Some(&dir), add(&plain_pod, "team")).await;
    assert!(r.ok && r.intercepted == Some(false), "{r:?}");
    assert!(node.agent.list().await.is_empty());
    // A pod the directory does not know: refused after the wait, marked retryable.
    let r = control::answer(&node.agent, Some(&dir), add(&stranger, "team")).await;
    assert!(!r.ok && r.retry, "{r:?}");
    assert!(node.agent.list().await.is_empty());
    // The runtime's namespace/name must match the API server's for that UID.
    let r = control::answer(&node.agent, Some(&dir), add(&agent_pod, "other-team")).await;
    assert!(!r.ok && !r.retry, "{r:?}");
    // No pod source at all: refused.
    let r = control::answer(&node.agent, None, add(&agent_pod, "team")).await;
    assert!(!r.ok, "{r:?}");
    // The agent pod.
    let r = control::answer(&node.agent, Some(&dir), add(&agent_pod, "team")).await;
    assert!(r.ok && r.intercepted == Some(true), "{r:?}");
    // CHECK: served with this netns; another netns is an error; a plain pod is fine.
    let check = |p: &PodSpec, netns: &std::path::Path| Ctl::CniCheck {
        uid: p.uid.clone(),
        netns: netns.to_path_buf(),
    };
    assert!(
        control::answer(&node.agent, Some(&dir), check(&agent_pod, &agent_pod.netns))
            .await
            .ok
    );
    assert!(
        !control::answer(
            &node.agent,
            Some(&dir),
            check(&agent_pod, std::path::Path::new("/x"))
        )
        .await
        .ok
    );
    assert!(
        control::answer(&node.agent, Some(&dir), check(&plain_pod, &plain_pod.netns))
            .await
            .ok
    );
    // DEL twice: idempotent.
    for _ in 0..2 {
        let r = control::answer(
            &node.agent,
            Some(&dir),
            Ctl::CniDel {
                uid: agent_pod.uid.clone(),
            },
        )
        .await;
        assert!(r.ok, "{r:?}");
    }
    assert!(node.agent.list().await.is_empty());
    // An agent pod that is not served fails CHECK.
    let r = control::answer(&node.agent, Some(&dir), check(&agent_pod, &agent_pod.netns)).await;
    assert!(!r.ok, "{r:?}");
    let _ = PodUid::parse(agent_pod.uid.as_str()).expect("uid");
}

#[test]
fn dns_follows_the_pods_policy() {
    let spec = |policy: Value, config: Value| -> k8s_openapi::api::core::v1::Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "6b1d0c2a-1111-4222-8333-000000000001"},
            "spec": {"containers": [], "dnsPolicy": policy, "dnsConfig": config},
        }))
        .expect("pod")
    };
    let ips = |v: &[&str]| -> Vec<std::net::IpAddr> {
        v.iter().map(|s| s.parse().expect("ip")).collect()
    };
    let s = settings();
    let m = pod_meta(&spec(json!("ClusterFirst"), json!({})), &s).expect("meta");
    assert_eq!(m.nameservers, ips(&["10.96.0.10"]));
    // A pod cannot name its own resolver: only the node's cluster DNS is ever allowed.
    let m = pod_meta(
        &spec(
            json!("None"),
            json!({"nameservers": ["10.0.0.53", "fd00::53"]}),
        ),
        &s,
    )
    .expect("meta");
    assert!(m.nameservers.is_empty(), "{:?}", m.nameservers);
    let m = pod_meta(
        &spec(
            json!("None"),
            json!({"nameservers": ["10.0.0.53", "10.96.0.10"]}),
        ),
        &s,
    )
    .expect("meta");
    assert_eq!(m.nameservers, ips(&["10.96.0.10"]));
    let m = pod_meta(
        &spec(json!("ClusterFirst"), json!({"nameservers": ["fd00::53"]})),
        &s,
    )
    .expect("meta");
    assert_eq!(
        m.nameservers,
        ips(&["10.96.0.10"]),
        "no IPv6 resolver of the pod's choosing"
    );
    let m = pod_meta(&spec(json!("Default"), json!({})), &s).expect("meta");
    assert!(
        m.nameservers.is_empty(),
        "the node's resolvers are not handed to pods"
    );
    assert!(m.run.is_none());
    // A pod without a UUID UID is ignored.
    let mut bad = spec(json!("ClusterFirst"), json!({}));
    bad.metadata.uid = Some("../x".into());
    assert!(pod_meta(&bad, &s).is_none());
}

#[test]
fn the_adapter_port_comes_from_the_pods_annotation() {
    let pod = |annotations: Value| -> k8s_openapi::api::core::v1::Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "6b1d0c2a-1111-4222-8333-000000000001",
                         "annotations": annotations},
            "spec": {"containers": []},
        }))
        .expect("pod")
    };
    let s = settings();
    let port = |a: Value| pod_meta(&pod(a), &s).expect("meta").adapter_port;
    assert_eq!(
        port(json!({"paddock.dev/adapter-port": "8765"})),
        Some(8765)
    );
    assert_eq!(port(json!({})), None);
    for bad in ["0", "70000", "http", "-1", " 80"] {
        assert_eq!(
            port(json!({"paddock.dev/adapter-port": bad})),
            None,
            "{bad}"
        );
    }
    let shell = |a: Value| pod_meta(&pod(a), &s).expect("meta").shell;
    assert!(shell(json!({"paddock.dev/shell": "true"})));
    for no in ["false", "yes", "True", ""] {
        assert!(!shell(json!({"paddock.dev/shell": no})), "{no}");
    }
    assert!(!shell(json!({})));
}
