//! Shared helpers for the TLS unit tests.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::{ClientConfig, RootCertStore};

use super::ca::RunCa;
use super::forge::Clock;

pub(crate) fn fixture_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

pub(crate) fn hello_fixture(name: &str) -> Vec<u8> {
    let path = fixture_path(&format!("clienthello/{name}"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

pub(crate) fn test_ca() -> RunCa {
    RunCa::generate("unit tests", Duration::from_hours(48))
        .expect("generate CA")
        .ca
}

pub(crate) fn roots_with(ca: &RunCa) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.add(ca.certificate().clone()).expect("add CA root");
    roots
}

/// A rustls client trusting only `ca`, offering `alpn`.
pub(crate) fn client_trusting(ca: &RunCa, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots_with(ca))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A clock that only moves when told to.
#[derive(Debug)]
pub(crate) struct ManualClock {
    now: Mutex<SystemTime>,
}

impl ManualClock {
    pub(crate) fn starting_now() -> Arc<Self> {
        Arc::new(Self {
            now: Mutex::new(SystemTime::now()),
        })
    }

    pub(crate) fn advance(&self, by: Duration) {
        let mut now = self.now.lock().expect("clock lock");
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().expect("clock lock")
    }
}
