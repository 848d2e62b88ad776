//! The broker's HTTP API end to end in process: hyper's request parsing, routing, bearer
//! authentication, JSON decoding and validation and the broker operations, through
//! [`LocalLink`] (the in-memory connection `paddock-proxy run` uses), against an in-memory
//! store and a fixed policy.
//!
//! Input: byte 0 even: a well-formed request; byte 1 picks the route, byte 2 the caller (a
//! controller key with every scope, a proxy key, an unknown key) and the rest is the JSON body
//! (or the leases query). Byte 0 odd: the rest is sent as raw bytes.
//!
//! The broker is rebuilt every `RESET_EVERY` inputs so the store and audit memory stay small;
//! a crash reproduces from its single input on a fresh broker in almost every case.
#![no_main]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use paddock_broker::audit::MemorySink;
use paddock_broker::auth::static_keys::{StaticKeyDefaults, format_line, hash_key};
use paddock_broker::auth::{Authenticator, Scope, StaticKeys};
use paddock_broker::broker::Broker;
use paddock_broker::metrics::Metrics;
use paddock_broker::policy::{Policy, PolicyStore};
use paddock_broker::ratelimit::{RateLimitConfig, RateLimits, RateSpec};
use paddock_broker::server::{self, Handle, LocalLink, ServerOptions, tls};
use paddock_broker::store::Store;
use paddock_wire::api::paths;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RESET_EVERY: u64 = 1000;
const QUERY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'%')
    .remove(b'&')
    .remove(b'=')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
const CONTROLLER_KEY: &str = "fuzz-controller-key";
const PROXY_KEY: &str = "fuzz-proxy-key";
const KEYS: [&str; 3] = [CONTROLLER_KEY, PROXY_KEY, "unknown-key"];
/// Real secret values: they may leave the broker only in a substitute-auth answer.
const SECRETS: [(&str, &str); 3] = [
    ("hdr", "fuzz-real-header-secret"),
    ("qry", "fuzz-real-query-secret"),
    ("bas", "fuzz-real-basic-secret"),
];
const ROUTES: [(&str, &str); 8] = [
    ("POST", paths::ISSUE),
    ("POST", paths::RENEW),
    ("POST", paths::REVOKE),
    ("POST", paths::VALIDATE_EGRESS),
    ("POST", paths::SUBSTITUTE_AUTH),
    ("GET", paths::LEASES),
    ("POST", paths::RUNS),
    ("POST", paths::GRANTS_POLL),
];

fn policy_text(dir: &Path) -> String {
    let s = |name: &str| dir.join(name).display().to_string();
    format!(
        "\
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata:
  name: team-a
spec:
  appliesTo:
    namespaces: [team-a]
  credentials:
    - name: gh-header
      provider: {{kind: user-secret, inject: {{header: {{name: Authorization, prefix: \"token \"}}}}}}
      secret: {{file: {hdr}}}
      hosts: [api.github.com]
    - name: maps-query
      provider: {{kind: user-secret, inject: {{query: {{param: key}}}}, allowedQuery: [q, key]}}
      secret: {{file: {qry}}}
      hosts: [maps.example.com]
    - name: git-basic
      provider: {{kind: user-secret, inject: {{basic: {{username: x-access-token}}}}}}
      secret: {{file: {bas}}}
      hosts: [github.com]
  egress:
    - hosts: [api.github.com, github.com, maps.example.com]
      ports: [443]
      substituteAuth: true
    - hosts: [pypi.org]
      ports: [443]
",
        hdr = s("hdr"),
        qry = s("qry"),
        bas = s("bas"),
    )
}

struct Fixture {
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    handle: Option<Handle>,
    link: LocalLink,
    inputs: u64,
}

fn spawn(rt: &tokio::runtime::Runtime, dir: &Path) -> Handle {
    let docs = Policy::parse_text(
        Path::new("fuzz.yaml"),
        &policy_text(dir),
        time::OffsetDateTime::now_utc(),
    )
    .expect("policy");
    let policy = Arc::new(PolicyStore::fixed(
        Policy::from_docs(docs).expect("policy set"),
    ));
    let fast = RateSpec {
        per_second: 1_000_000,
        burst: 1_000_000,
    };
    let limits = RateLimits::new(&RateLimitConfig {
        issue: fast,
        substitute: fast,
        egress: fast,
    })
    .expect("limits");
    let broker = Arc::new(Broker::new(
        Store::open_in_memory().expect("store"),
        policy,
        Arc::new(MemorySink::default()),
        limits,
    ));
    let all: BTreeSet<Scope> = [
        Scope::Issue,
        Scope::Renew,
        Scope::Revoke,
        Scope::ValidateEgress,
        Scope::SubstituteAuth,
        Scope::LeasesRead,
        Scope::Controller,
    ]
    .into();
    let keys = [
        format_line("ctrl", &hash_key(CONTROLLER_KEY), "team-a", &all),
        format_line(
            "proxy",
            &hash_key(PROXY_KEY),
            "team-a",
            &BTreeSet::from([Scope::SubstituteAuth, Scope::ValidateEgress]),
        ),
    ]
    .join("\n");
    let auth: Arc<dyn Authenticator> =
        Arc::new(StaticKeys::from_text(&keys, StaticKeyDefaults::default()).expect("static keys"));
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["broker.fuzz".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let tls = tls::server_config(
        vec![CertificateDer::from(cert.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        None,
    )
    .expect("tls");
    rt.block_on(server::spawn(ServerOptions {
        // Loopback only; the fuzzer talks over the in-memory link.
        listen: "127.0.0.1:0".parse().expect("addr"),
        admin_listen: None,
        tls,
        broker,
        auth,
        metrics: Arc::new(Metrics::new()),
        policy_poll: None,
        rate_limit_sweep: Duration::from_secs(60),
    }))
    .expect("spawn")
}

impl Fixture {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, value) in SECRETS {
            std::fs::write(dir.path().join(name), value).expect("secret");
        }
        let handle = spawn(&rt, dir.path());
        let link = handle.local_link();
        Self {
            rt,
            _dir: dir,
            handle: Some(handle),
            link,
            inputs: 0,
        }
    }

    fn reset_if_due(&mut self) {
        self.inputs += 1;
        if self.inputs % RESET_EVERY == 0 {
            if let Some(old) = self.handle.take() {
                self.rt.block_on(old.shutdown());
            }
            let handle = spawn(&self.rt, self._dir.path());
            self.link = handle.local_link();
            self.handle = Some(handle);
        }
    }

    /// Sends `request` and reads until the server closes. A well-formed request says
    /// `connection: close`; raw bytes may not, so the write side is closed after them (hyper
    /// then ends the connection at EOF, possibly before answering).
    fn exchange(&self, request: &[u8], close_write: bool) -> Vec<u8> {
        let link = self.link.clone();
        self.rt.block_on(async move {
            let mut conn = link.connect().expect("local link");
            let io = async {
                // The server answers while we write: write and read concurrently.
                let (mut rd, mut wr) = tokio::io::split(&mut conn);
                let write = async {
                    let _ = wr.write_all(request).await;
                    if close_write {
                        let _ = wr.shutdown().await;
                    }
                };
                let mut out = Vec::new();
                let read = rd.read_to_end(&mut out);
                let ((), r) = tokio::join!(write, read);
                let _ = r;
                out
            };
            tokio::time::timeout(Duration::from_secs(20), io)
                .await
                .expect("the broker did not answer within 20 s")
        })
    }
}

fn well_formed(route: u8, caller: u8, body: &[u8]) -> Vec<u8> {
    let (method, path) = ROUTES[usize::from(route) % ROUTES.len()];
    let key = KEYS[usize::from(caller) % KEYS.len()];
    let mut req = Vec::new();
    if method == "GET" {
        // The body is the query: encoded so it stays inside the request line (`%`, `&` and
        // `=` stay as they are, so the fuzzer still writes its own escapes and pairs).
        let query = percent_encoding::percent_encode(body, QUERY).to_string();
        req.extend_from_slice(format!("GET {path}?{query}").as_bytes());
        req.extend_from_slice(
            format!(" HTTP/1.1\r\nhost: broker\r\nauthorization: Bearer {key}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        );
    } else {
        req.extend_from_slice(
            format!(
                "{method} {path} HTTP/1.1\r\nhost: broker\r\nauthorization: Bearer {key}\r\n\
                 content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        req.extend_from_slice(body);
    }
    req
}

static FIXTURE: Mutex<Option<Fixture>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (request, route) = if mode % 2 == 0 {
        let [route, caller, body @ ..] = rest else {
            return;
        };
        (
            well_formed(*route, *caller, body),
            Some(ROUTES[usize::from(*route) % ROUTES.len()].1),
        )
    } else {
        (rest.to_vec(), None)
    };
    let mut guard = FIXTURE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let fixture = guard.get_or_insert_with(Fixture::new);
    fixture.reset_if_due();
    let response = fixture.exchange(&request, route.is_none());
    if route.is_some() {
        // A well-formed request always gets an answer, and never an internal error.
        assert!(
            response.starts_with(b"HTTP/1.1 "),
            "no HTTP answer to {:?}: {:?}",
            String::from_utf8_lossy(&request),
            String::from_utf8_lossy(&response)
        );
        assert!(
            !response.starts_with(b"HTTP/1.1 500"),
            "internal error: {}",
            String::from_utf8_lossy(&response)
        );
    }
    if route != Some(paths::SUBSTITUTE_AUTH) {
        for (_, secret) in SECRETS {
            assert!(
                !response
                    .windows(secret.len())
                    .any(|w| w == secret.as_bytes()),
                "a real secret left the broker outside substitute-auth"
            );
        }
    }
});
