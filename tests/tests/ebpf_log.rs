//! Root tier: eBPF debug records reach tracing when a cgroup asks for them, and not otherwise.
//! (Its own test binary: it installs a global tracing subscriber.)

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use paddock_proxy::ebpf::{AgentConfig, Interception, Interceptor, LoadOptions};
use paddock_tests::{
    CgroupGuard, PinDir, Topology,
    process::{Placement, client},
    require_root,
};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().map(|b| b.clone()).unwrap_or_default()).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_records_are_forwarded_only_for_cgroups_that_ask() {
    if !require_root("debug_records_are_forwarded_only_for_cgroups_that_ask") {
        return;
    }
    let captured = Captured::default();
    let sink = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("paddock::ebpf=debug")
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .init();

    let topo = Topology::new();
    let pins = PinDir::new();
    let mut ic = Interceptor::load(&LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        forward_logs: true,
        ..LoadOptions::default()
    })
    .expect("load");
    let quiet = CgroupGuard::new("q");
    let loud = CgroupGuard::new("l");
    ic.attach_agent(quiet.cgroup(), &AgentConfig::loopback(15001))
        .expect("attach quiet");
    let mut cfg = AgentConfig::loopback(15001);
    cfg.debug_log = true;
    ic.attach_agent(loud.cgroup(), &cfg).expect("attach loud");

    let send = |cg: &CgroupGuard, port: &str| {
        let at = Placement {
            netns: Some(&topo.agent),
            cgroup: Some(cg),
            user: None,
        };
        let v = tokio::task::block_in_place(|| client(&["udp", &format!("10.77.0.1:{port}")], &at));
        assert_eq!(v["ok"], false, "{v}");
    };
    send(&quiet, "4101");
    send(&loud, "4202");
    let mut text = String::new();
    for _ in 0..50 {
        text = captured.text();
        if text.contains("4202") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        text.contains("udp send refused, port 4202"),
        "no forwarded record: {text:?}"
    );
    assert!(
        !text.contains("4101"),
        "a cgroup without debug_log must stay quiet: {text:?}"
    );
}
