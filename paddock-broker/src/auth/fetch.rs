//! A small bounded JSON-over-HTTP client for the auth backends (OIDC discovery, JWKS,
//! `TokenReview`). Plain `http` is accepted only for loopback hosts (local test servers and
//! sidecars); everything else must be `https`, verified against webpki roots or one CA file.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use serde::{Serialize, de::DeserializeOwned};
use url::{Host, Url};

/// Largest response body the backends accept (JWKS documents and `TokenReview`s are small).
const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("cannot use CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("invalid request: {0}")]
    Request(String),
    #[error("request to {url} failed: {reason}")]
    Transport { url: String, reason: String },
    #[error("request to {url} timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("response from {url} is not usable: {reason}")]
    Body { url: String, reason: String },
}

/// Checks that `raw` is an absolute `https` URL, or `http` to a loopback host, with no
/// credentials or fragment in it (URLs appear in logs and errors).
pub(crate) fn parse_service_url(raw: &str) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("URL must not carry credentials".to_owned());
    }
    if url.fragment().is_some() {
        return Err(format!("URL {url} must not have a fragment"));
    }
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&url) => {}
        "http" => return Err(format!("URL {url} must use https (http only for loopback)")),
        other => return Err(format!("URL {url} has unsupported scheme {other:?}")),
    }
    if url.host().is_none() {
        return Err(format!("URL {url} has no host"));
    }
    Ok(url)
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// JSON client with a per-request deadline (connect, headers and body together).
#[derive(Clone)]
pub(crate) struct JsonClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for JsonClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl JsonClient {
    /// `ca_file`: trust only the certificates in this PEM file; `None`: the webpki roots.
    pub(crate) fn new(ca_file: Option<&Path>, timeout: Duration) -> Result<Self, FetchError> {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let ca_err = |reason: String| FetchError::CaFile {
                    path: path.display().to_string(),
                    reason,
                };
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| ca_err(e.to_string()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ca_err(e.to_string()))?;
                if certs.is_empty() {
                    return Err(ca_err("no certificate in file".to_owned()));
                }
                for cert in certs {
                    roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| FetchError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self { client, timeout })
    }

    pub(crate) async fn get_json<T: DeserializeOwned>(&self, url: &Url) -> Result<T, FetchError> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(url.as_str())
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| FetchError::Request(e.to_string()))?;
        self.send(url, request, &[StatusCode::OK]).await
    }

    /// GETs JSON with a bearer (never echoed in errors).
    pub(crate) async fn get_json_with_bearer<T: DeserializeOwned>(
        &self,
        url: &Url,
        bearer: &str,
    ) -> Result<T, FetchError> {
        let mut value = http::HeaderValue::from_str(&format!("Bearer {bearer}"))
            .map_err(|_| FetchError::Request("credential is not a valid header".to_owned()))?;
        value.set_sensitive(true);
        let request = Request::builder()
            .method(Method::GET)
            .uri(url.as_str())
            .header(header::ACCEPT, "application/json")
            .header(header::AUTHORIZATION, value)
            .body(Full::new(Bytes::new()))
            .map_err(|e| FetchError::Request(e.to_string()))?;
        self.send(url, request, &[StatusCode::OK]).await
    }

    /// POSTs `body` as JSON with an optional bearer (never echoed in errors).
    pub(crate) async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        url: &Url,
        body: &B,
        bearer: Option<&str>,
        accepted: &[StatusCode],
    ) -> Result<T, FetchError> {
        let body = serde_json::to_vec(body).map_err(|e| FetchError::Request(e.to_string()))?;
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(url.as_str())
            .header(header::ACCEPT, "application/json")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = bearer {
            let mut value = http::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| FetchError::Request("credential is not a valid header".to_owned()))?;
            value.set_sensitive(true);
            builder = builder.header(header::AUTHORIZATION, value);
        }
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| FetchError::Request(e.to_string()))?;
        self.send(url, request, accepted).await
    }

    /// POSTs an `application/x-www-form-urlencoded` body with HTTP Basic client
    /// authentication (RFC 6749 section 2.3.1: id and secret form-encoded, then base64), as
    /// OAuth 2 endpoints expect. Neither the body nor the secret is echoed in errors.
    pub(crate) async fn post_form_basic<T: DeserializeOwned>(
        &self,
        url: &Url,
        form: &[(&str, &str)],
        client: (&str, &str),
        accepted: &[StatusCode],
    ) -> Result<T, FetchError> {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut value = http::HeaderValue::from_str(&basic_credentials(client.0, client.1))
            .map_err(|_| FetchError::Request("credential is not a valid header".to_owned()))?;
        value.set_sensitive(true);
        let request = Request::builder()
            .method(Method::POST)
            .uri(url.as_str())
            .header(header::ACCEPT, "application/json")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::AUTHORIZATION, value)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| FetchError::Request(e.to_string()))?;
        self.send(url, request, accepted).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        url: &Url,
        request: Request<Full<Bytes>>,
        accepted: &[StatusCode],
    ) -> Result<T, FetchError> {
        let exchange = async {
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|e| FetchError::Transport {
                        url: url.to_string(),
                        reason: error_chain(&e),
                    })?;
            let status = response.status();
            if !accepted.contains(&status) {
                return Err(FetchError::Status {
                    url: url.to_string(),
                    status: status.as_u16(),
                });
            }
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| FetchError::Body {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            serde_json::from_slice(&body).map_err(|e| FetchError::Body {
                url: url.to_string(),
                reason: format!("invalid JSON: {e}"),
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| FetchError::Timeout {
                url: url.to_string(),
                timeout: self.timeout,
            })?
    }
}

/// `Basic base64(form(id):form(secret))`, RFC 6749 section 2.3.1.
pub(crate) fn basic_credentials(id: &str, secret: &str) -> String {
    use base64::Engine as _;
    let encode = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pair = format!("{}:{}", encode(id), encode(secret));
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

fn error_chain(err: &dyn std::error::Error) -> String {
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
mod tests {
    use super::*;

    #[test]
    fn service_urls_need_https_except_loopback() {
        assert!(parse_service_url("https://issuer.example.com").is_ok());
        assert!(parse_service_url("http://127.0.0.1:8080/x").is_ok());
        assert!(parse_service_url("http://[::1]:8080/x").is_ok());
        assert!(parse_service_url("http://localhost:1/").is_ok());
        assert!(parse_service_url("http://issuer.example.com").is_err());
        assert!(parse_service_url("http://10.0.0.1").is_err());
        assert!(parse_service_url("ftp://127.0.0.1").is_err());
        assert!(parse_service_url("https://user:pw@issuer.example.com").is_err());
        assert!(parse_service_url("https://issuer.example.com/#frag").is_err());
        assert!(parse_service_url("not a url").is_err());
    }

    #[test]
    fn ca_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "no pem here\n").expect("write");
        let err = JsonClient::new(Some(&path), Duration::from_secs(1)).expect_err("empty CA");
        assert!(err.to_string().contains("no certificate"), "{err}");
        let missing = dir.path().join("missing.pem");
        assert!(JsonClient::new(Some(&missing), Duration::from_secs(1)).is_err());
    }
}
