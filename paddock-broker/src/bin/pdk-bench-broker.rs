//! `cargo xtask bench broker`: `POST /v1/substitute-auth` throughput and latency with
//! static-key and JWT (RS256, ES256) authentication, against an in-process broker served over
//! loopback TLS 1.3, all modes interleaved in one run. Prints a markdown section on stdout.
//!
//! The broker is the real server (`server::spawn`) with a file-backed `SQLite` store, a policy
//! file and a JSONL audit log; the JWT issuer is a local discovery + JWKS endpoint on
//! 127.0.0.1:0. Request counts are fixed, so the run is bounded.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aws_lc_rs::{
    encoding::AsDer,
    rsa::{KeyPair as RsaKeyPair, KeySize, PublicKeyComponents},
    signature::KeyPair as _,
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use paddock_broker::{
    Broker,
    audit::JsonlSink,
    auth::{
        AuthChain, Authenticator, Scope, StaticKeys,
        jwt::{JwtAuthenticator, JwtConfig},
        static_keys::{StaticKeyDefaults, format_line, hash_key},
    },
    metrics::Metrics,
    policy::PolicyStore,
    ratelimit::{RateLimitConfig, RateLimits, RateSpec},
    server::{self, ServerOptions, tls},
    store::{
        PostgresStore, Store,
        testing::{ScratchDb, scratch_database},
    },
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Keep-alive connections driving load at once.
const CONNECTIONS: usize = 8;
/// Requests per mode per round (split over the connections).
const REQUESTS: usize = 6_000;
/// Interleaved rounds; the reported rate is the median.
const ROUNDS: usize = 3;
/// Requests per connection before each measured round (TLS set-up, JWKS fetch, caches).
const WARMUP: usize = 50;

const PROXY_KEY: &str = "pbk-bench-proxy-0123456789abcdef";
const CONTROLLER_KEY: &str = "pbk-bench-controller-0123456789abcdef";
const AUDIENCE: &str = "paddock-broker";
const RUN: &str = "bench-run";

struct Mode {
    label: &'static str,
    bearer: String,
    /// Index into the brokers under test.
    target: usize,
}

struct Round {
    rate: f64,
    latencies: Vec<Duration>,
}

fn main() -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let dir = std::env::temp_dir().join(format!("pdk-bench-broker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = runtime.block_on(bench(&dir, cpus));
    let _ = std::fs::remove_dir_all(&dir);
    let section = result?;
    print!("{section}");
    Ok(())
}

async fn bench(dir: &Path, cpus: usize) -> Result<String> {
    let signing = SigningKeys::generate()?;
    let issuer = serve_issuer(signing.jwks.clone()).await?;
    let pki = Pki::generate()?;
    // Two brokers, identical but for the JWT backend's verified-token cache.
    let cached = start_broker(&dir.join("cached"), &pki, &issuer, true, None).await?;
    let uncached = start_broker(&dir.join("uncached"), &pki, &issuer, false, None).await?;
    let mut brokers = vec![cached, uncached];
    let mut targets = vec![
        Target::prepare(vec![brokers[0].addr], &pki.ca).await?,
        Target::prepare(vec![brokers[1].addr], &pki.ca).await?,
    ];
    let rs256 = signing.token(Algorithm::RS256, &issuer.url)?;
    let es256 = signing.token(Algorithm::ES256, &issuer.url)?;
    let mut modes = [
        Mode {
            label: "static key",
            bearer: PROXY_KEY.to_owned(),
            target: 0,
        },
        Mode {
            label: "JWT RS256, verified-token cache (default)",
            bearer: rs256.clone(),
            target: 0,
        },
        Mode {
            label: "JWT RS256 (2048-bit), signature checked per request",
            bearer: rs256,
            target: 1,
        },
        Mode {
            label: "JWT ES256 (P-256), signature checked per request",
            bearer: es256,
            target: 1,
        },
    ]
    .into_iter()
    .collect::<Vec<_>>();
    // PostgreSQL (the server `cargo xtask bench broker` starts): one broker, then three
    // replicas on one database with the connections spread over them. Each on its own
    // database (one live lease per run and credential).
    let single = scratch_database("bench_broker_pg");
    let triple = scratch_database("bench_broker_pg3");
    if let (Some(single), Some(triple)) = (&single, &triple) {
        let one = start_broker(
            &dir.join("pg"),
            &pki,
            &issuer,
            true,
            Some(pg_store(single)?),
        )
        .await?;
        targets.push(Target::prepare(vec![one.addr], &pki.ca).await?);
        brokers.push(one);
        let mut addrs = Vec::new();
        for i in 0..3 {
            let b = start_broker(
                &dir.join(format!("pg3-{i}")),
                &pki,
                &issuer,
                true,
                Some(pg_store(triple)?),
            )
            .await?;
            addrs.push(b.addr);
            brokers.push(b);
        }
        targets.push(Target::prepare(addrs, &pki.ca).await?);
        modes.push(Mode {
            label: "static key, PostgreSQL store",
            bearer: PROXY_KEY.to_owned(),
            target: 2,
        });
        modes.push(Mode {
            label: "static key, PostgreSQL store, 3 replicas",
            bearer: PROXY_KEY.to_owned(),
            target: 3,
        });
    }
    // Every mode must answer what the proxy needs before anything is measured.
    for mode in &modes {
        let target = &targets[mode.target];
        let mut c = target.client.connect().await?;
        let body: Value = serde_json::from_slice(&target.body)?;
        let (status, v) = send(&mut c, "/v1/substitute-auth", &mode.bearer, &body).await?;
        ensure!(
            status == 200 && v["set_headers"][0]["value"] == json!("Bearer ghp_bench"),
            "{}: substitute-auth answered {status} {v}",
            mode.label
        );
    }

    let mut rounds: Vec<Vec<Round>> = modes.iter().map(|_| Vec::new()).collect();
    for _ in 0..ROUNDS {
        for (i, mode) in modes.iter().enumerate() {
            let target = &targets[mode.target];
            rounds[i].push(run_round(&target.client, &mode.bearer, &target.body).await?);
        }
    }
    for b in brokers {
        b.handle.shutdown().await;
    }
    issuer.task.abort();
    Ok(report(&modes, &mut rounds, cpus))
}

/// A broker with the bench run registered and a placeholder issued.
struct Target {
    client: Client,
    body: Bytes,
}

impl Target {
    async fn prepare(addrs: Vec<SocketAddr>, ca: &CertificateDer<'static>) -> Result<Self> {
        let client = Client::new(addrs, ca)?;
        let mut setup = client.connect().await?;
        let (status, v) = send(
            &mut setup,
            "/v1/runs",
            CONTROLLER_KEY,
            &json!({"run": RUN, "namespace": "bench", "template": "t", "phase": "Running"}),
        )
        .await?;
        ensure!(status == 200, "registering the run: {status} {v}");
        let (status, v) = send(
            &mut setup,
            "/v1/issue",
            CONTROLLER_KEY,
            &json!({"run": RUN, "credential": "gh"}),
        )
        .await?;
        ensure!(status == 200, "issuing the credential: {status} {v}");
        let placeholder = v["value"].as_str().context("issue response has no value")?;
        let body = json!({
            "run": RUN, "host": "api.github.com", "port": 443, "transport": "tls", "method": "GET", "path": "/user",
            "headers": [{"name": "Authorization", "value": format!("Bearer {placeholder}")}],
        });
        Ok(Self {
            client,
            body: Bytes::from(body.to_string()),
        })
    }
}

fn report(modes: &[Mode], rounds: &mut [Vec<Round>], cpus: usize) -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
    let mut out = String::from("## Broker substitute-auth (`cargo xtask bench broker`)\n\n");
    let _ = write!(
        out,
        "`POST /v1/substitute-auth` (one header placeholder swapped for a file-backed secret) to an \
         in-process broker (release build, SQLite store unless the row says PostgreSQL, auth \
         chain `[staticKeys, jwt]`, rate limits raised out of the way) over loopback TLS 1.3; \
         the PostgreSQL rows use a private PostgreSQL server on a Unix socket on the same \
         machine (`fsync` off), the 3-replica row three brokers in the one process on one \
         database with the connections spread over them (same CPUs: it measures overhead, not \
         scaling); {CONNECTIONS} keep-alive \
         connections from the same process, {REQUESTS} requests per mode per round, median of \
         {ROUNDS} interleaved rounds (latencies pooled); kernel {kernel}, {cpus} CPUs shared by \
         client and server.\n\n"
    );
    out.push_str("| auth | requests/s | p50 (us) | p99 (us) | rate vs static key |\n");
    out.push_str("|---|---:|---:|---:|---:|\n");
    let mut baseline = None;
    let mut medians = Vec::new();
    for (mode, mode_rounds) in modes.iter().zip(rounds.iter_mut()) {
        let mut rates: Vec<f64> = mode_rounds.iter().map(|r| r.rate).collect();
        rates.sort_by(f64::total_cmp);
        let rate = rates[rates.len() / 2];
        let mut all: Vec<Duration> = mode_rounds
            .iter_mut()
            .flat_map(|r| std::mem::take(&mut r.latencies))
            .collect();
        all.sort_unstable();
        let p50 = percentile(&all, 50);
        let p99 = percentile(&all, 99);
        let base = *baseline.get_or_insert(rate);
        let _ = writeln!(
            out,
            "| {} | {rate:.0} | {:.1} | {:.1} | {:.2} |",
            mode.label,
            micros(p50),
            micros(p99),
            rate / base
        );
        medians.push((mode.label, p50));
    }
    if let Some(((_, base), rest)) = medians.split_first() {
        out.push_str(
            "\nThe cached JWT row reuses one token's verified identity (at most `verifiedCacheTtl`, \
             never past `exp`); the other JWT rows run on a second broker with the cache off.\n",
        );
        out.push('\n');
        for (label, p50) in rest {
            let _ = writeln!(
                out,
                "{label} adds {:.1} us to the median request over a static key.",
                micros(*p50) - micros(*base)
            );
        }
    }
    out
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = (sorted.len() * pct).div_ceil(100).saturating_sub(1);
    sorted[idx.min(sorted.len() - 1)]
}

async fn run_round(client: &Client, bearer: &str, body: &Bytes) -> Result<Round> {
    let per_conn = REQUESTS / CONNECTIONS;
    let mut senders = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut s = client.connect().await?;
        for _ in 0..WARMUP {
            substitute(&mut s, bearer, body).await?;
        }
        senders.push(s);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut sender in senders {
        let bearer = bearer.to_owned();
        let body = body.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(per_conn);
            for _ in 0..per_conn {
                let t = Instant::now();
                substitute(&mut sender, &bearer, &body).await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(per_conn * CONNECTIONS);
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.context("load task")??);
    }
    let wall = started.elapsed().as_secs_f64();
    #[expect(
        clippy::cast_precision_loss,
        reason = "request counts are far below 2^52"
    )]
    let rate = latencies.len() as f64 / wall;
    Ok(Round { rate, latencies })
}

async fn substitute(
    sender: &mut SendRequest<Full<Bytes>>,
    bearer: &str,
    body: &Bytes,
) -> Result<()> {
    // The connection becomes ready again only once its task has seen the previous response end.
    sender.ready().await.context("connection not reusable")?;
    let resp = sender
        .send_request(post("/v1/substitute-auth", bearer, body.clone())?)
        .await
        .context("substitute-auth request")?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if status != 200 {
        bail!(
            "substitute-auth answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    Ok(())
}

fn post(path: &str, bearer: &str, body: Bytes) -> Result<Request<Full<Bytes>>> {
    Request::post(path)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {bearer}"))
        .header("content-type", "application/json")
        .body(Full::new(body))
        .context("building request")
}

async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    path: &str,
    bearer: &str,
    body: &Value,
) -> Result<(u16, Value)> {
    sender.ready().await.context("connection not reusable")?;
    let resp = sender
        .send_request(post(path, bearer, Bytes::from(body.to_string()))?)
        .await
        .with_context(|| format!("POST {path}"))?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// Connections to one broker, or round-robin over replicas (as a Service would spread them).
struct Client {
    addrs: Vec<SocketAddr>,
    next: std::sync::atomic::AtomicUsize,
    connector: tokio_rustls::TlsConnector,
}

impl Client {
    fn new(addrs: Vec<SocketAddr>, ca: &CertificateDer<'static>) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).context("trusting the bench CA")?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self {
            addrs,
            next: std::sync::atomic::AtomicUsize::new(0),
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tcp = tokio::net::TcpStream::connect(self.addrs[n % self.addrs.len()])
            .await
            .context("connecting to the broker")?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").context("server name")?;
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .context("TLS handshake")?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(conn);
        Ok(sender)
    }
}

struct Pki {
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Pki {
    fn generate() -> Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let leaf = CertificateParams::new(vec!["localhost".to_owned()])?.signed_by(&key, &ca)?;
        Ok(Self {
            ca: ca.der().clone(),
            chain: vec![leaf.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }
}

/// PKCS#8 PEM in 64-column lines, the form `EncodingKey::from_rsa_pem` reads.
fn pkcs8_pem(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    pem
}

struct SigningKeys {
    rsa: EncodingKey,
    ec: EncodingKey,
    jwks: Value,
}

impl SigningKeys {
    fn generate() -> Result<Self> {
        let rsa_key = RsaKeyPair::generate(KeySize::Rsa2048).context("RSA keygen")?;
        let rsa_der = rsa_key.as_der().context("RSA PKCS#8")?;
        let rsa_pem = pkcs8_pem(rsa_der.as_ref());
        let public = PublicKeyComponents::<Vec<u8>>::from(rsa_key.public_key());
        let ec_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let raw = ec_key.public_key_raw();
        ensure!(raw.len() == 65, "unexpected P-256 point encoding");
        Ok(Self {
            rsa: EncodingKey::from_rsa_pem(rsa_pem.as_bytes()).context("RSA signing key")?,
            ec: EncodingKey::from_ec_pem(ec_key.serialize_pem().as_bytes())
                .context("EC signing key")?,
            jwks: json!({"keys": [
                {"kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256",
                 "n": URL_SAFE_NO_PAD.encode(&public.n),
                 "e": URL_SAFE_NO_PAD.encode(&public.e)},
                {"kty": "EC", "crv": "P-256", "kid": "ec-1", "use": "sig", "alg": "ES256",
                 "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
                 "y": URL_SAFE_NO_PAD.encode(&raw[33..65])},
            ]}),
        })
    }

    fn token(&self, alg: Algorithm, issuer: &str) -> Result<String> {
        let (key, kid) = match alg {
            Algorithm::RS256 => (&self.rsa, "rsa-1"),
            _ => (&self.ec, "ec-1"),
        };
        let now = jsonwebtoken::get_current_timestamp();
        let claims = json!({
            "iss": issuer, "aud": AUDIENCE, "sub": "bench-proxy", "namespace": "bench",
            "scope": "broker:substitute-auth", "iat": now, "exp": now + 3600,
        });
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &claims, key).context("signing a JWT")
    }
}

struct IssuerServer {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

/// A plain-HTTP OIDC issuer on loopback: discovery document and JWKS.
async fn serve_issuer(jwks: Value) -> Result<IssuerServer> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let discovery =
        Bytes::from(json!({"issuer": url, "jwks_uri": format!("{url}/jwks")}).to_string());
    let jwks = Bytes::from(jwks.to_string());
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (discovery, jwks) = (discovery.clone(), jwks.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let body = match req.uri().path() {
                        "/.well-known/openid-configuration" => Some(discovery.clone()),
                        "/jwks" => Some(jwks.clone()),
                        _ => None,
                    };
                    async move {
                        let mut resp = Response::new(Full::new(body.clone().unwrap_or_default()));
                        if body.is_none() {
                            *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(IssuerServer { url, task })
}

struct RunningBroker {
    addr: SocketAddr,
    handle: server::Handle,
}

async fn start_broker(
    dir: &Path,
    pki: &Pki,
    issuer: &IssuerServer,
    jwt_cache: bool,
    store: Option<Store>,
) -> Result<RunningBroker> {
    std::fs::create_dir_all(dir)?;
    let secret = dir.join("gh");
    std::fs::write(&secret, "ghp_bench")?;
    let policy_path = dir.join("policy.yaml");
    std::fs::write(&policy_path, policy(&secret))?;
    let policy = Arc::new(PolicyStore::load(&policy_path)?);
    let store = match store {
        Some(store) => store,
        None => Store::open(&dir.join("broker.db"))?,
    };
    let audit = Arc::new(JsonlSink::open(
        &dir.join("audit.jsonl"),
        64 << 20,
        2,
        true,
    )?);
    let fast = RateSpec {
        per_second: 1_000_000,
        burst: 1_000_000,
    };
    let limits = RateLimits::new(&RateLimitConfig {
        issue: fast,
        substitute: fast,
        egress: fast,
    })?;
    let broker = Arc::new(Broker::new(store, policy, audit, limits));

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
        format_line("ctrl", &hash_key(CONTROLLER_KEY), "paddock-system", &all),
        format_line(
            "proxy",
            &hash_key(PROXY_KEY),
            "bench",
            &BTreeSet::from([Scope::SubstituteAuth]),
        ),
    ]
    .join("\n");
    let static_keys = StaticKeys::from_text(&keys, StaticKeyDefaults::default())?;
    let mut jwt_config = JwtConfig::new(issuer.url.clone(), vec![AUDIENCE.to_owned()]);
    if !jwt_cache {
        jwt_config.verified_cache_ttl = Duration::ZERO;
    }
    let jwt = JwtAuthenticator::new(jwt_config)?;
    let auth: Arc<dyn Authenticator> =
        Arc::new(AuthChain::new(vec![Arc::new(static_keys), Arc::new(jwt)]));
    let tls = tls::server_config(
        pki.chain.clone(),
        PrivateKeyDer::Pkcs8(pki.key.clone_key()),
        None,
    )?;
    let handle = server::spawn(ServerOptions {
        listen: "127.0.0.1:0".parse()?,
        admin_listen: None,
        tls,
        broker,
        auth,
        metrics: Arc::new(Metrics::new()),
        policy_poll: None,
        rate_limit_sweep: Duration::from_mins(1),
    })
    .await?;
    Ok(RunningBroker {
        addr: handle.addr,
        handle,
    })
}

/// A migrated `PostgreSQL` store on `db` (a pool of 8, as `poolSize` defaults to).
fn pg_store(db: &ScratchDb) -> Result<Store> {
    let store = PostgresStore::connect_url(db.url(), None, 8, Duration::from_secs(5))?;
    store.migrate()?;
    Ok(Store::from_backend(store))
}

fn policy(secret: &Path) -> String {
    format!(
        "\
apiVersion: paddock.dev/v1
kind: BrokerPolicy
metadata: {{name: bench}}
spec:
  appliesTo: {{namespaces: [bench]}}
  credentials:
    - name: gh
      provider: {{kind: user-secret, inject: {{header: {{name: Authorization, prefix: \"Bearer \"}}}}}}
      secret: {{file: {}}}
      hosts: [api.github.com]
  egress:
    - {{hosts: [api.github.com], ports: [443], substituteAuth: true}}
",
        secret.display()
    )
}
