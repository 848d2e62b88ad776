//! The HTTP client of provider back-ends (GitHub's token endpoint), on hyper.
//!
//! Providers are synchronous: they run on the broker's blocking pool or on an embedder's
//! thread, and either may belong to a tokio runtime. [`request`] therefore blocks its caller
//! and drives the exchange on a thread of its own with a current-thread runtime (a runtime
//! cannot be entered from a thread that already drives one). Token fetches are rare (tokens
//! are cached for most of their hour), so a thread per fetch costs nothing that matters.
//!
//! Every resolved address is tried in turn, a body cut short (before its `Content-Length`, its
//! last chunk or, over TLS, its `close_notify`) is an error rather than a short body, and one
//! deadline bounds the whole exchange. `https` uses rustls (ring, webpki roots or a configured
//! CA); plain `http` is accepted only for loopback hosts (tests, local fakes).

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::{
    client::legacy::{Client, connect::Connect, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls::{ClientConfig, RootCertStore};

/// Deadline of one exchange: connecting (all addresses), the request, the response.
const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RESPONSE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL: {0}")]
    Url(String),
    #[error("connection to {0} failed: {1}")]
    Connect(String, String),
    #[error("I/O with {0} failed: {1}")]
    Io(String, String),
    #[error("malformed response from {0}: {1}")]
    Malformed(String, String),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("no complete answer from {0} within {TIMEOUT:?}")]
    Timeout(String),
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

use crate::base_url::is_loopback;
pub use crate::base_url::validate_base_url;

fn tls_config(ca_file: Option<&Path>) -> Result<ClientConfig, HttpError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            use rustls::pki_types::pem::PemObject as _;
            // Read here rather than through the server's TLS helpers: providers sit below the
            // server in the module graph.
            let pem_err =
                |e: &dyn std::fmt::Display| HttpError::Tls(format!("{}: {e}", path.display()));
            let mut found = 0usize;
            for cert in
                rustls::pki_types::CertificateDer::pem_file_iter(path).map_err(|e| pem_err(&e))?
            {
                roots
                    .add(cert.map_err(|e| pem_err(&e))?)
                    .map_err(|e| pem_err(&e))?;
                found += 1;
            }
            if found == 0 {
                return Err(pem_err(&"no certificate found"));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpError::Tls(e.to_string()))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// The TCP connector tries every resolved address in turn, each with a share of the deadline.
fn configure<R>(tcp: &mut HttpConnector<R>) {
    // The TLS layer above it handles `https`.
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(TIMEOUT));
    tcp.set_nodelay(true);
}

/// Sends one request and reads the whole response, blocking the calling thread.
pub fn request(
    method: &str,
    url: &url::Url,
    headers: &[(&str, &str)],
    body: &[u8],
    ca_file: Option<&Path>,
) -> Result<HttpResponse, HttpError> {
    let host = url
        .host_str()
        .ok_or_else(|| HttpError::Url("no host".into()))?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(host) => {}
        other => return Err(HttpError::Url(format!("scheme {other} not allowed"))),
    }
    let mut tcp = HttpConnector::new();
    configure(&mut tcp);
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(ca_file)?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    send(connector, method, url, headers, body)
}

/// Builds the request and runs the exchange over `connector` on a thread of its own.
fn send<C>(
    connector: C,
    method: &str,
    url: &url::Url,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse, HttpError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let target = match (url.host_str(), url.port_or_known_default()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        _ => return Err(HttpError::Url("no host or port".into())),
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| HttpError::Url(format!("invalid method {method:?}")))?;
    let mut builder = Request::builder().method(method).uri(url.as_str());
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| HttpError::Url(format!("invalid header name {name:?}")))?;
        // The value may be a credential: never echo it.
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| HttpError::Url(format!("invalid value for header {name}")))?;
        if name == header::AUTHORIZATION {
            value.set_sensitive(true);
        }
        builder = builder.header(name, value);
    }
    let request = builder
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| HttpError::Url(e.to_string()))?;
    let client = Client::builder(TokioExecutor::new())
        // One request per client: nothing to keep idle.
        .pool_max_idle_per_host(0)
        .build(connector);
    let exchange = async {
        let response = client.request(request).await.map_err(|e| {
            if e.is_connect() {
                HttpError::Connect(target.clone(), error_chain(&e))
            } else {
                HttpError::Io(target.clone(), error_chain(&e))
            }
        })?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| HttpError::Malformed(target.clone(), error_chain(&*e)))?
            .to_bytes()
            .to_vec();
        Ok(HttpResponse { status, body })
    };
    block_on(async {
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| HttpError::Timeout(target.clone()))?
    })
}

/// Runs `exchange` to completion on a new thread with its own current-thread runtime.
fn block_on<T: Send>(
    exchange: impl Future<Output = Result<T, HttpError>> + Send,
) -> Result<T, HttpError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| HttpError::Io("runtime".into(), e.to_string()))?;
                runtime.block_on(exchange)
            })
            .join()
            .unwrap_or_else(|_| Err(HttpError::Io("client".into(), "thread panicked".into())))
    })
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        out.push_str(": ");
        out.push_str(&inner.to_string());
        source = inner.source();
    }
    out
}

#[cfg(test)]
mod tests;
