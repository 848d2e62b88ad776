//! The load generator of `cargo xtask bench peers`: HTTPS GETs from N concurrent connections
//! for a fixed time, straight to a host (direct, or redirected to a transparent proxy) or
//! through an HTTP/1.1 `CONNECT` tunnel (cooperative proxies). `wrk` cannot speak `CONNECT`,
//! so every mode of that benchmark uses this one generator and the comparison stays fair.
//!
//! Each connection trusts exactly one CA (the test host's, or the proxy's interception CA),
//! offers only `http/1.1`, and resumes no TLS session: a new connection is a full handshake.
//! Latency is kept per request in microseconds (no histogram: the count is bounded by the
//! duration and [`MAX_REQUESTS_PER_CONNECTION_TASK`]); keep-alive latency runs from sending
//! the request to the last byte of the body, new-connection latency from the TCP connect.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Longest wait for one step (connect, tunnel, handshake, one response).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests one connection task makes at most, whatever the duration (a bound on the loop
/// and on the latency vector).
pub const MAX_REQUESTS_PER_CONNECTION_TASK: u64 = 2_000_000;
/// Largest `CONNECT` answer head accepted.
const MAX_TUNNEL_HEAD: usize = 8 * 1024;

/// What to run: serialised to the generator process as its one argument.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadSpec {
    /// Where each TCP connection goes: the host itself (direct, or redirected to a transparent
    /// proxy) or a `CONNECT` proxy.
    pub target: SocketAddr,
    /// With a `CONNECT` proxy at `target`: the authority to tunnel to (`app.test:443`).
    pub tunnel_to: Option<String>,
    /// TLS server name and `Host` header.
    pub host: String,
    pub path: String,
    /// PEM file of the only CA trusted.
    pub ca: PathBuf,
    pub connections: usize,
    pub duration_ms: u64,
    /// `Connection: close` on every request: one request per TCP connection and TLS handshake.
    pub new_connection: bool,
}

/// What one run did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResult {
    /// Requests answered (any status).
    pub requests: u64,
    /// Answers that were not 2xx.
    pub non_2xx: u64,
    /// Connections or requests that failed (connect, tunnel, TLS, I/O, timeout).
    pub errors: u64,
    pub first_error: Option<String>,
    /// From start to the last connection task's end.
    pub elapsed_ms: f64,
    pub p50_us: u32,
    pub p99_us: u32,
}

impl LoadResult {
    /// Requests per second over the run.
    #[must_use]
    pub fn per_sec(&self) -> f64 {
        if self.elapsed_ms <= 0.0 {
            return 0.0;
        }
        #[expect(
            clippy::cast_precision_loss,
            reason = "request counts stay far below 2^52"
        )]
        let n = self.requests as f64;
        n * 1000.0 / self.elapsed_ms
    }

    /// Any failed request or connection fails the benchmark: it never reports the speed of
    /// error pages or of connections that broke.
    pub fn check(&self) -> Result<()> {
        if self.non_2xx > 0 || self.errors > 0 {
            bail!(
                "{} non-2xx answers, {} errors (first: {})",
                self.non_2xx,
                self.errors,
                self.first_error.as_deref().unwrap_or("-")
            );
        }
        if self.requests == 0 {
            bail!("no request was answered");
        }
        Ok(())
    }
}

/// The value at percentile `p` (0-100) of `sorted` by the nearest-rank method; 0 when empty.
#[must_use]
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a rank between 1 and len, which fits every type involved"
    )]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Sorts `latencies` and fills in the percentiles of `result`.
pub fn summarise(result: &mut LoadResult, mut latencies: Vec<u32>) {
    latencies.sort_unstable();
    result.p50_us = percentile(&latencies, 50.0);
    result.p99_us = percentile(&latencies, 99.0);
}

/// A TLS client trusting only the CA certificates in `ca_pem`, `http/1.1` only, no session
/// resumption.
pub fn client_config(ca_pem: &[u8]) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.context("CA PEM")?)?;
    }
    if roots.is_empty() {
        bail!("no CA certificate in the PEM");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// Checks the head a `CONNECT` proxy answered: a 200 status line and nothing after the blank
/// line (the tunnel carries nothing until the client's `ClientHello`).
pub fn check_tunnel_head(head: &[u8]) -> Result<()> {
    let text = String::from_utf8_lossy(head);
    let Some(end) = text.find("\r\n\r\n") else {
        bail!("incomplete CONNECT answer: {text:?}");
    };
    if end + 4 != head.len() {
        bail!("bytes after the CONNECT answer: {text:?}");
    }
    let status = text.lines().next().unwrap_or_default();
    let mut parts = status.split(' ');
    let version_ok = matches!(parts.next(), Some("HTTP/1.1" | "HTTP/1.0"));
    if !version_ok || parts.next() != Some("200") {
        bail!("CONNECT refused: {status:?}");
    }
    Ok(())
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// One connection ready for requests: TCP, the tunnel when asked, TLS, HTTP/1.1.
async fn open(spec: &LoadSpec, tls: &tokio_rustls::TlsConnector) -> Result<Sender> {
    let mut tcp = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(spec.target))
        .await
        .context("connect timed out")?
        .with_context(|| format!("connect {}", spec.target))?;
    tcp.set_nodelay(true)?;
    if let Some(authority) = &spec.tunnel_to {
        let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        tcp.write_all(req.as_bytes()).await?;
        let mut head = Vec::with_capacity(128);
        let mut buf = [0u8; 512];
        tokio::time::timeout(STEP_TIMEOUT, async {
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tcp.read(&mut buf).await?;
                if n == 0 || head.len() + n > MAX_TUNNEL_HEAD {
                    bail!("CONNECT answer cut off or too long");
                }
                head.extend_from_slice(&buf[..n]);
            }
            Ok(())
        })
        .await
        .context("CONNECT answer timed out")??;
        check_tunnel_head(&head)?;
    }
    let name = ServerName::try_from(spec.host.clone())?;
    let stream = tokio::time::timeout(STEP_TIMEOUT, tls.connect(name, tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// What one connection task saw.
#[derive(Debug, Default)]
struct Tally {
    latencies: Vec<u32>,
    requests: u64,
    non_2xx: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn error(&mut self, e: &anyhow::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{e:#}"));
        }
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

async fn get(spec: &LoadSpec, sender: &mut Sender) -> Result<hyper::StatusCode> {
    let mut req = hyper::Request::get(spec.path.as_str()).header(hyper::header::HOST, &spec.host);
    if spec.new_connection {
        req = req.header(hyper::header::CONNECTION, "close");
    }
    let req = req.body(Empty::new())?;
    tokio::time::timeout(STEP_TIMEOUT, async {
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        Ok(status)
    })
    .await
    .context("request timed out")?
}

/// One connection task: connections one after another (one per request with
/// `new_connection`) until `deadline`. The first error ends the task: it fails the run anyway.
async fn connection_task(
    spec: Arc<LoadSpec>,
    tls: tokio_rustls::TlsConnector,
    deadline: Instant,
) -> Tally {
    let mut t = Tally::default();
    while Instant::now() < deadline && t.requests < MAX_REQUESTS_PER_CONNECTION_TASK {
        let opened = Instant::now();
        let mut sender = match open(&spec, &tls).await {
            Ok(s) => s,
            Err(e) => {
                t.error(&e);
                return t;
            }
        };
        loop {
            let sent = Instant::now();
            match get(&spec, &mut sender).await {
                Ok(status) => {
                    let from = if spec.new_connection { opened } else { sent };
                    t.latencies.push(micros(from.elapsed()));
                    t.requests += 1;
                    if !status.is_success() {
                        t.non_2xx += 1;
                    }
                }
                Err(e) => {
                    t.error(&e);
                    return t;
                }
            }
            if spec.new_connection
                || Instant::now() >= deadline
                || t.requests >= MAX_REQUESTS_PER_CONNECTION_TASK
            {
                break;
            }
        }
    }
    t
}

/// Runs `spec` (on the caller's runtime) and returns the tally without percentiles, and the
/// latencies to [`summarise`] (kept apart so sorting them is not measured as load).
pub async fn run(spec: LoadSpec, tls: rustls::ClientConfig) -> (LoadResult, Vec<u32>) {
    let spec = Arc::new(spec);
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let start = Instant::now();
    let deadline = start + Duration::from_millis(spec.duration_ms);
    let tasks: Vec<_> = (0..spec.connections)
        .map(|_| tokio::spawn(connection_task(Arc::clone(&spec), tls.clone(), deadline)))
        .collect();
    let mut result = LoadResult::default();
    let mut latencies = Vec::new();
    for task in tasks {
        match task.await {
            Ok(t) => {
                result.requests += t.requests;
                result.non_2xx += t.non_2xx;
                result.errors += t.errors;
                if result.first_error.is_none() {
                    result.first_error = t.first_error;
                }
                latencies.extend(t.latencies);
            }
            Err(e) => {
                result.errors += 1;
                result.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    result.elapsed_ms = start.elapsed().as_secs_f64() * 1000.0;
    (result, latencies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let xs: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&xs, 50.0), 50);
        assert_eq!(percentile(&xs, 99.0), 99);
        assert_eq!(percentile(&xs, 100.0), 100);
        assert_eq!(percentile(&xs, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
        // Two samples: the median is the lower one, p99 the higher.
        assert_eq!(percentile(&[3, 9], 50.0), 3);
        assert_eq!(percentile(&[3, 9], 99.0), 9);
    }

    #[test]
    fn summarise_sorts_first() {
        let mut r = LoadResult::default();
        let mut xs: Vec<u32> = (1..=1000).rev().collect();
        xs.push(1_000_000);
        summarise(&mut r, xs);
        assert_eq!(r.p50_us, 501);
        assert_eq!(r.p99_us, 991);
    }

    #[test]
    fn rate_and_failures() {
        let ok = LoadResult {
            requests: 5000,
            elapsed_ms: 2000.0,
            ..LoadResult::default()
        };
        assert!((ok.per_sec() - 2500.0).abs() < 1e-9);
        ok.check().expect("clean run");
        let non_2xx = LoadResult {
            non_2xx: 1,
            ..ok.clone()
        };
        assert!(non_2xx.check().is_err());
        let errors = LoadResult {
            errors: 1,
            first_error: Some("reset".into()),
            ..ok.clone()
        };
        assert!(
            errors
                .check()
                .expect_err("failures")
                .to_string()
                .contains("reset")
        );
        assert!(LoadResult::default().check().is_err());
        assert!(LoadResult::default().per_sec().abs() < f64::EPSILON);
    }

    #[test]
    fn tunnel_answers() {
        check_tunnel_head(b"HTTP/1.1 200 Connection established\r\n\r\n").expect("squid's");
        check_tunnel_head(b"HTTP/1.0 200 OK\r\nX: y\r\n\r\n").expect("with a header");
        assert!(check_tunnel_head(b"HTTP/1.1 403 Forbidden\r\n\r\n").is_err());
        assert!(check_tunnel_head(b"HTTP/1.1 2000 x\r\n\r\n").is_err());
        assert!(check_tunnel_head(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(check_tunnel_head(b"HTTP/1.1 200 OK\r\n\r\n\x16\x03").is_err());
        assert!(check_tunnel_head(b"SSH-2.0 200\r\n\r\n").is_err());
    }

    #[test]
    fn client_config_needs_a_ca() {
        assert!(client_config(b"").is_err());
        assert!(client_config(b"not pem").is_err());
    }
}
