//! 200 pod add/delete cycles (and 20 adds whose attach fails) leak nothing: descriptors, map
//! entries, records, memory. Alone in its binary, so no other test opens descriptors meanwhile.

mod common;

use common::Node;

const CYCLES: u32 = 200;
/// Pods alive at once during the cycles.
const WIDTH: u32 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_add_delete_cycles_leak_nothing() {
    let node = Node::new();
    // Warm-up: the runtime's and allocator's one-time growth is not a leak.
    for n in 0..WIDTH {
        let spec = node.pod(n, "warm");
        node.agent.add(spec.clone()).await.expect("add");
        node.agent.remove(&spec.uid).await.expect("remove");
    }
    let fds = common::open_fds();
    let rss = common::rss_kib();
    let mut peak_fds = 0;
    for cycle in 0..CYCLES {
        let specs: Vec<_> = (0..WIDTH)
            .map(|i| node.pod(1000 + cycle * WIDTH + i, &format!("run-{i}")))
            .collect();
        for s in &specs {
            node.agent.add(s.clone()).await.expect("add");
        }
        peak_fds = peak_fds.max(common::open_fds());
        assert_eq!(
            node.maps.0.lock().expect("maps").config.len(),
            WIDTH as usize
        );
        for s in &specs {
            node.agent.remove(&s.uid).await.expect("remove");
            node.delete_pod_files(s);
        }
    }
    assert!(peak_fds > fds, "pods hold listeners while they are served");
    // Failed adds (the attach fails after the listeners were bound) close what they opened.
    for n in 0..20 {
        let spec = node.pod(9000 + n, "run-fail");
        node.maps.0.lock().expect("maps").fail_next_attach = true;
        node.agent
            .add(spec.clone())
            .await
            .expect_err("attach fails");
        node.delete_pod_files(&spec);
    }
    assert_eq!(
        common::open_fds(),
        fds,
        "descriptors leaked over {CYCLES} cycles"
    );
    {
        let maps = node.maps.0.lock().expect("maps");
        assert!(
            maps.config.is_empty() && maps.links.is_empty(),
            "map entries leaked"
        );
    }
    assert!(node.agent.list().await.is_empty());
    let records = std::fs::read_dir(node.dir.path().join("state/pods"))
        .expect("state")
        .count();
    assert_eq!(records, 0, "pod records leaked");
    // 1,000 pods served and released; a leak of even 1 KiB per pod would show as 1 MiB.
    let grown = common::rss_kib().saturating_sub(rss);
    assert!(
        grown < 1024,
        "resident memory grew {grown} KiB over {CYCLES} cycles"
    );
}
