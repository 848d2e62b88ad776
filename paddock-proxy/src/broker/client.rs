//! The client for the broker's JSON API, over any [`BrokerConnector`].
//!
//! HTTP/1.1 over a small keep-alive pool (hyper-util's client); one deadline per call covering
//! connect, handshake, request and the whole answer. Non-2xx answers are decoded from the
//! broker's `{code, message}` envelope. [`BrokerClient::new`] connects over HTTPS: TLS 1.3
//! only (ring provider), trusting only the configured CA file.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::{FixedServerNameResolver, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use paddock_wire::api::{
    self as wire, ErrorBody, ErrorCode, GrantPollRequest, GrantPollResponse, IssueRequest,
    IssueResponse, NodeCaRequest, NodeCaResponse, RenewRequest, RenewResponse, RevokeRequest,
    RevokeResponse, RunInfo, RunUpsertRequest, SubstituteAuthRequest, SubstituteAuthResponse,
    ValidateEgressRequest, ValidateEgressResponse,
};
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::connector::{BrokerConnector, DynConnector, HttpsBrokerConnector};
use super::credentials::{Bearer, BrokerBearer, ClientCertFiles, CredentialError, load_certs};

/// Default deadline of one broker call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default number of idle keep-alive connections kept to the broker.
pub const DEFAULT_MAX_IDLE: usize = 8;
/// Default longest time a bearer read from its file is used without reading it again.
pub const DEFAULT_BEARER_MAX_AGE: Duration = Duration::from_secs(30);
/// Idle pooled connections are dropped before the broker's own 10 s idle limit, so a request
/// is rarely written onto a connection the broker is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Largest broker answer read (answers are a few hundred bytes).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// How to reach and authenticate to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerClientConfig {
    /// Base URL: `https://host:port` (no path, query or user info).
    pub url: String,
    /// PEM file of the CA(s) that sign the broker's certificate; nothing else is trusted.
    pub ca_file: PathBuf,
    /// File holding the caller bearer (`Authorization: Bearer <contents>`), re-read when it
    /// changes. The broker requires a bearer on every API route.
    pub bearer_file: Option<PathBuf>,
    /// TLS client certificate, for brokers that require one (`tls.clientCa`).
    pub client_cert: Option<ClientCertFiles>,
    /// Name to verify the broker certificate against, when it differs from the URL host
    /// (for example a URL with an IP address).
    pub server_name: Option<String>,
    /// Deadline of one call: connect, handshake, request and answer.
    pub timeout: Duration,
    /// Idle keep-alive connections kept to the broker.
    pub max_idle_connections: usize,
    /// A cached bearer is re-read from its file at least this often, even when the file's
    /// metadata looks unchanged. It is also how long an opaque (non-JWT) bearer keeps being
    /// served after its last good read while the file is transiently unreadable; a JWT is
    /// served until its `exp` instead. A deleted file fails at once.
    pub bearer_max_age: Duration,
}

impl BrokerClientConfig {
    /// A configuration with the defaults (5 s timeout, 8 idle connections, bearer re-read at
    /// least every 30 s) and no caller credentials yet.
    #[must_use]
    pub fn new(url: impl Into<String>, ca_file: impl Into<PathBuf>) -> Self {
        Self {
            url: url.into(),
            ca_file: ca_file.into(),
            bearer_file: None,
            client_cert: None,
            server_name: None,
            timeout: DEFAULT_TIMEOUT,
            max_idle_connections: DEFAULT_MAX_IDLE,
            bearer_max_age: DEFAULT_BEARER_MAX_AGE,
        }
    }
}

/// The client cannot be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum BrokerConfigError {
    #[error("broker URL {url:?} is invalid: {reason}")]
    Url { url: String, reason: String },
    #[error("broker client needs a bearer file or a client certificate")]
    NoCredentials,
    #[error("broker timeout must be greater than zero")]
    ZeroTimeout,
    #[error("invalid broker server name {0:?}")]
    ServerName(String),
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error("broker TLS configuration rejected: {0}")]
    Tls(String),
}

/// A broker call failed. Messages never contain a bearer or a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerCallError {
    /// The proxy's own broker credentials are unusable.
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    /// No complete answer within the deadline.
    #[error("broker did not answer within {0:?}")]
    Timeout(Duration),
    /// Connect, TLS or HTTP failure before an answer arrived.
    #[error("broker unreachable: {0}")]
    Transport(String),
    /// The broker answered with an error envelope.
    #[error("broker refused ({status} {code}): {message}")]
    Rejected {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    /// A non-2xx answer without a valid envelope (not the broker, or a broken one).
    #[error("broker answered HTTP {status} without an error envelope")]
    BadStatus { status: u16 },
    /// A 2xx answer whose body is not the expected JSON.
    #[error("broker answer could not be decoded: {0}")]
    Decode(String),
}

impl BrokerCallError {
    /// The broker's error code, when it answered with one.
    #[must_use]
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the broker refused the request itself (the caller's request is the problem),
    /// as opposed to the broker or the proxy's access to it failing.
    #[must_use]
    pub fn is_refusal(&self) -> bool {
        matches!(
            self.code(),
            Some(
                ErrorCode::Forbidden
                    | ErrorCode::EgressDenied
                    | ErrorCode::TlsRequired
                    | ErrorCode::NotFound
                    | ErrorCode::BadRequest
                    | ErrorCode::PayloadTooLarge
            )
        )
    }
}

/// A client of the broker API. Cheap to clone (shares the pool and the credential cache).
#[derive(Clone)]
pub struct BrokerClient {
    inner: Arc<Inner>,
}

struct Inner {
    base: Uri,
    host_header: HeaderValue,
    client: Client<DynConnector, Full<Bytes>>,
    connector: Arc<dyn BrokerConnector>,
    bearer: Option<Bearer>,
    timeout: Duration,
}

impl fmt::Debug for BrokerClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerClient")
            .field("connector", &self.inner.connector)
            .field("bearer", &self.inner.bearer)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

fn parse_base(url: &str) -> Result<(Uri, Authority), BrokerConfigError> {
    let bad = |reason: &str| BrokerConfigError::Url {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme() != Some(&Scheme::HTTPS) {
        return Err(bad("scheme must be https"));
    }
    let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("user info is not allowed (use bearer_file)"));
    }
    if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
        return Err(bad("must not have a path or query"));
    }
    Ok((uri, authority))
}

impl BrokerClient {
    /// Builds the client: loads the CA (and client certificate), checks the bearer file is
    /// readable, and prepares the pool. Needs no runtime; calls do.
    pub fn new(config: &BrokerClientConfig) -> Result<Self, BrokerConfigError> {
        let (base, _) = parse_base(&config.url)?;
        if config.bearer_file.is_none() && config.client_cert.is_none() {
            return Err(BrokerConfigError::NoCredentials);
        }
        if config.timeout.is_zero() {
            return Err(BrokerConfigError::ZeroTimeout);
        }
        // Fails at start-up on a missing or broken file rather than on the first request.
        let bearer = config
            .bearer_file
            .clone()
            .map(|path| {
                Bearer::new(BrokerBearer::File {
                    path,
                    max_age: config.bearer_max_age,
                })
            })
            .transpose()?;

        let mut roots = rustls::RootCertStore::empty();
        for cert in load_certs(&config.ca_file, "broker CA")? {
            roots
                .add(cert)
                .map_err(|e| BrokerConfigError::Tls(format!("CA certificate: {e}")))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| BrokerConfigError::Tls(e.to_string()))?
        .with_root_certificates(roots);
        // No ALPN is offered: hyper-rustls refuses a preset list (it panics), and the broker
        // speaks HTTP/1.1 only.
        let tls = match &config.client_cert {
            Some(files) => {
                let (chain, key) = files.load()?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| BrokerConfigError::Tls(format!("client certificate: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeout));
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only();
        let https = match &config.server_name {
            Some(name) => {
                let name = ServerName::try_from(name.clone())
                    .map_err(|_| BrokerConfigError::ServerName(name.clone()))?;
                https.with_server_name_resolver(FixedServerNameResolver::new(name))
            }
            None => https,
        };
        let connector = HttpsBrokerConnector {
            base,
            inner: https.enable_http1().wrap_connector(http),
        };
        Self::build(
            Arc::new(connector),
            bearer,
            config.timeout,
            config.max_idle_connections,
        )
    }

    /// A client that reaches the broker through `connector` (for example the in-memory link
    /// of a broker embedded in this process), presenting `bearer` on every call. The same
    /// pool, deadline and answer handling as over HTTPS.
    pub fn with_connector(
        connector: Arc<dyn BrokerConnector>,
        bearer: BrokerBearer,
        timeout: Duration,
    ) -> Result<Self, BrokerConfigError> {
        if timeout.is_zero() {
            return Err(BrokerConfigError::ZeroTimeout);
        }
        Self::build(
            connector,
            Some(Bearer::new(bearer)?),
            timeout,
            DEFAULT_MAX_IDLE,
        )
    }

    fn build(
        connector: Arc<dyn BrokerConnector>,
        bearer: Option<Bearer>,
        timeout: Duration,
        max_idle: usize,
    ) -> Result<Self, BrokerConfigError> {
        let base = connector.base();
        let url_error = |reason: &str| BrokerConfigError::Url {
            url: base.to_string(),
            reason: reason.into(),
        };
        let authority = base.authority().ok_or_else(|| url_error("no host"))?;
        let host_header = HeaderValue::try_from(authority.as_str())
            .map_err(|_| url_error("host is not a valid header"))?;
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(max_idle)
            .build(DynConnector(Arc::clone(&connector)));
        Ok(Self {
            inner: Arc::new(Inner {
                base,
                host_header,
                client,
                connector,
                bearer,
                timeout,
            }),
        })
    }

    /// The deadline of one call.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// `POST /v1/validate-egress`.
    pub async fn validate_egress(
        &self,
        req: &ValidateEgressRequest,
    ) -> Result<ValidateEgressResponse, BrokerCallError> {
        self.post(wire::paths::VALIDATE_EGRESS, req).await
    }

    /// `POST /v1/substitute-auth`. The answer holds the real secret: keep it out of logs.
    pub async fn substitute_auth(
        &self,
        req: &SubstituteAuthRequest,
    ) -> Result<SubstituteAuthResponse, BrokerCallError> {
        self.post(wire::paths::SUBSTITUTE_AUTH, req).await
    }

    /// `POST /v1/grants/poll`: subscribe, or acknowledge and wait for invalidations (the
    /// broker holds the poll up to its hold time, well inside the call's deadline).
    pub async fn poll_grants(
        &self,
        req: &GrantPollRequest,
    ) -> Result<GrantPollResponse, BrokerCallError> {
        self.post(wire::paths::GRANTS_POLL, req).await
    }

    /// `POST /v1/issue`.
    pub async fn issue(&self, req: &IssueRequest) -> Result<IssueResponse, BrokerCallError> {
        self.post(wire::paths::ISSUE, req).await
    }

    /// `POST /v1/renew`.
    pub async fn renew(&self, req: &RenewRequest) -> Result<RenewResponse, BrokerCallError> {
        self.post(wire::paths::RENEW, req).await
    }

    /// `POST /v1/revoke`.
    pub async fn revoke(&self, req: &RevokeRequest) -> Result<RevokeResponse, BrokerCallError> {
        self.post(wire::paths::REVOKE, req).await
    }

    /// `POST /v1/node-ca` (node agents): an intermediate CA for the node the bearer is bound
    /// to, from a certificate signing request (the key stays here).
    pub async fn node_ca(&self, req: &NodeCaRequest) -> Result<NodeCaResponse, BrokerCallError> {
        self.post(wire::paths::NODE_CA, req).await
    }

    /// `POST /v1/runs` (controller scope).
    pub async fn upsert_run(&self, req: &RunUpsertRequest) -> Result<RunInfo, BrokerCallError> {
        self.post(wire::paths::RUNS, req).await
    }

    /// `GET /v1/ping`: the broker accepts this client's bearer and its store answers (the
    /// readiness check; no audit record, no run needed).
    /// `GET /v1/node-ca/crl`: the cluster root's revocation list (DER).
    pub async fn node_ca_crl(&self) -> Result<Bytes, BrokerCallError> {
        self.call_raw(Method::GET, wire::paths::NODE_CA_CRL, Bytes::new())
            .await
    }

    pub async fn ping(&self) -> Result<wire::PingResponse, BrokerCallError> {
        self.call(Method::GET, wire::paths::PING, Bytes::new())
            .await
    }

    /// Opens `GET path` with `Upgrade: protocol` on a new connection and returns the upgraded
    /// connection once the broker answers 101 (within the deadline). Any other answer is an
    /// error like a call's.
    pub async fn open_upgrade(
        &self,
        path: &'static str,
        protocol: &'static str,
    ) -> Result<hyper::upgrade::Upgraded, BrokerCallError> {
        let attempt = async {
            let mut parts = self.inner.base.clone().into_parts();
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static(path));
            let uri =
                Uri::from_parts(parts).map_err(|e| BrokerCallError::Transport(e.to_string()))?;
            let io = self
                .inner
                .connector
                .connect(uri.clone())
                .await
                .map_err(|e| BrokerCallError::Transport(e.to_string()))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| BrokerCallError::Transport(e.to_string()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upgraded broker connection ended");
                }
            });
            let mut builder = Request::builder()
                .method(Method::GET)
                .uri(uri.path())
                .header(http::header::HOST, self.inner.host_header.clone())
                .header(http::header::UPGRADE, HeaderValue::from_static(protocol))
                .header(
                    http::header::CONNECTION,
                    HeaderValue::from_static("upgrade"),
                );
            if let Some(bearer) = &self.inner.bearer {
                builder = builder.header(AUTHORIZATION, bearer.header()?);
            }
            let request = builder
                .body(Full::new(Bytes::new()))
                .map_err(|e| BrokerCallError::Transport(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| BrokerCallError::Transport(e.to_string()))?;
            let status = response.status();
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return hyper::upgrade::on(response)
                    .await
                    .map_err(|e| BrokerCallError::Transport(format!("upgrade: {e}")));
            }
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map(http_body_util::Collected::to_bytes)
                .unwrap_or_default();
            Err(rejection(status, &bytes))
        };
        tokio::time::timeout(self.inner.timeout, attempt)
            .await
            .map_err(|_| BrokerCallError::Timeout(self.inner.timeout))?
    }

    /// One JSON POST within the deadline. A request whose connection closed before any answer
    /// (a pooled connection closed under it, or a broker replica killed with it in flight) is
    /// tried once more on a new connection, still within the same deadline.
    async fn post<Req, Resp>(&self, path: &'static str, body: &Req) -> Result<Resp, BrokerCallError>
    where
        Req: Serialize + Sync,
        Resp: DeserializeOwned,
    {
        let body = Bytes::from(
            serde_json::to_vec(body).map_err(|e| BrokerCallError::Decode(json_error(&e)))?,
        );
        self.call(Method::POST, path, body).await
    }

    /// One call within the deadline (see [`Self::post`] for the retry), its JSON answer.
    async fn call<Resp>(
        &self,
        method: Method,
        path: &'static str,
        body: Bytes,
    ) -> Result<Resp, BrokerCallError>
    where
        Resp: DeserializeOwned,
    {
        let bytes = self.call_raw(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| BrokerCallError::Decode(json_error(&e)))
    }

    /// One call within the deadline; the body of a success as it came.
    async fn call_raw(
        &self,
        method: Method,
        path: &'static str,
        body: Bytes,
    ) -> Result<Bytes, BrokerCallError> {
        let attempt = async {
            match self.post_once(&method, path, body.clone()).await {
                Err(Attempt::Stale(_)) => self.post_once(&method, path, body).await,
                other => other,
            }
        };
        let (status, bytes) = tokio::time::timeout(self.inner.timeout, attempt)
            .await
            .map_err(|_| BrokerCallError::Timeout(self.inner.timeout))?
            .map_err(Attempt::into_error)?;
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(rejection(status, &bytes))
        }
    }

    async fn post_once(
        &self,
        method: &Method,
        path: &'static str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), Attempt> {
        let mut parts = self.inner.base.clone().into_parts();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static(path));
        let uri = Uri::from_parts(parts)
            .map_err(|e| Attempt::Failed(BrokerCallError::Transport(e.to_string())))?;
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header(http::header::HOST, self.inner.host_header.clone())
            .header(ACCEPT, HeaderValue::from_static("application/json"));
        if method == Method::POST {
            builder = builder.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        if let Some(bearer) = &self.inner.bearer {
            let header = bearer.header().map_err(|e| Attempt::Failed(e.into()))?;
            builder = builder.header(AUTHORIZATION, header);
        }
        let request = builder
            .body(Full::new(body))
            .map_err(|e| Attempt::Failed(BrokerCallError::Transport(e.to_string())))?;
        let response = self
            .inner
            .client
            .request(request)
            .await
            .map_err(|e| classify(&e))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| {
                Attempt::Failed(BrokerCallError::Transport(format!(
                    "reading the answer: {e}"
                )))
            })?
            .to_bytes();
        Ok((status, bytes))
    }
}

/// The error of a non-2xx answer: its envelope, or the bare status.
fn rejection(status: StatusCode, bytes: &[u8]) -> BrokerCallError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(envelope) => BrokerCallError::Rejected {
            status: status.as_u16(),
            code: envelope.code,
            message: envelope.message,
        },
        Err(_) => BrokerCallError::BadStatus {
            status: status.as_u16(),
        },
    }
}

/// Describes a JSON error without the values serde quotes in its messages (a broker answer
/// carries secrets): field names and positions only.
fn json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if text.starts_with("unknown field") || text.starts_with("missing field") {
        let field = text.split(", expected").next().unwrap_or_default();
        format!("{field} at line {} column {}", e.line(), e.column())
    } else {
        format!(
            "malformed or mistyped JSON ({:?}) at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        )
    }
}

/// One attempt's failure: `Stale` may be retried once.
enum Attempt {
    Stale(BrokerCallError),
    Failed(BrokerCallError),
}

impl Attempt {
    fn into_error(self) -> BrokerCallError {
        match self {
            Attempt::Stale(e) | Attempt::Failed(e) => e,
        }
    }
}

/// A transport error, described by its whole source chain (hyper-util's top level alone says
/// little), and whether the connection closed before an answer (retried once).
fn classify(e: &hyper_util::client::legacy::Error) -> Attempt {
    let mut text = e.to_string();
    let mut stale = false;
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            stale |= h.is_incomplete_message() || h.is_canceled();
        }
        // The broker's end closed (FIN, or RST when it died with bytes unread) before any
        // answer: a replica killed under the request. Asking again goes out on a new
        // connection, through a Service to another replica; every broker call is safe to
        // repeat (substitutions and egress checks read; issue, renew and revoke are
        // idempotent).
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            stale |= matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            );
        }
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    let err = BrokerCallError::Transport(text);
    if stale && !e.is_connect() {
        Attempt::Stale(err)
    } else {
        Attempt::Failed(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_is_validated() {
        assert!(parse_base("https://broker:8443").is_ok());
        assert!(parse_base("https://broker:8443/").is_ok());
        for bad in [
            "http://broker:8443",
            "https://broker:8443/v1",
            "https://broker:8443/?a=b",
            "https://user:pw@broker:8443",
            "broker:8443",
            "not a url",
        ] {
            assert!(parse_base(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_needs_credentials_and_a_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = BrokerClientConfig::new("https://127.0.0.1:1", dir.path().join("ca"));
        assert!(matches!(
            BrokerClient::new(&config),
            Err(BrokerConfigError::NoCredentials)
        ));
        config.bearer_file = Some(dir.path().join("missing-token"));
        assert!(matches!(
            BrokerClient::new(&config),
            Err(BrokerConfigError::Credentials(CredentialError::Read { .. }))
        ));
        std::fs::write(dir.path().join("token"), "t").expect("token");
        config.bearer_file = Some(dir.path().join("token"));
        config.timeout = Duration::ZERO;
        assert!(matches!(
            BrokerClient::new(&config),
            Err(BrokerConfigError::ZeroTimeout)
        ));
        config.timeout = DEFAULT_TIMEOUT;
        std::fs::write(dir.path().join("ca"), "not pem").expect("ca");
        assert!(matches!(
            BrokerClient::new(&config),
            Err(BrokerConfigError::Credentials(CredentialError::Pem { .. }))
        ));
    }

    /// A connector that fails every connection, or never finishes one.
    #[derive(Debug)]
    struct Broken {
        hang: bool,
    }

    impl BrokerConnector for Broken {
        fn base(&self) -> Uri {
            Uri::from_static("http://broken.invalid")
        }

        fn connect(&self, _uri: Uri) -> super::super::ConnectFuture {
            if self.hang {
                Box::pin(std::future::pending())
            } else {
                Box::pin(std::future::ready(Err("link refused: test".into())))
            }
        }
    }

    #[tokio::test]
    async fn any_connector_fails_closed_with_its_reason_or_the_deadline() {
        let egress = ValidateEgressRequest {
            run: "r".into(),
            pod: None,
            host: "example.com".into(),
            port: Some(443),
        };
        let client = |hang| {
            BrokerClient::with_connector(
                Arc::new(Broken { hang }),
                BrokerBearer::Value("caller-key".into()),
                Duration::from_millis(200),
            )
            .expect("client")
        };
        let err = client(false)
            .validate_egress(&egress)
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, BrokerCallError::Transport(t) if t.contains("link refused: test")),
            "{err}"
        );
        assert!(!err.is_refusal());
        let err = client(true)
            .validate_egress(&egress)
            .await
            .expect_err("never connects");
        assert!(matches!(err, BrokerCallError::Timeout(_)), "{err}");
        assert!(!format!("{:?}", client(false)).contains("caller-key"));
        assert!(matches!(
            BrokerClient::with_connector(
                Arc::new(Broken { hang: false }),
                BrokerBearer::Value("caller-key".into()),
                Duration::ZERO,
            ),
            Err(BrokerConfigError::ZeroTimeout)
        ));
    }

    #[test]
    fn json_errors_do_not_quote_values() {
        let err = serde_json::from_str::<SubstituteAuthResponse>(
            r#"{"matched":true,"basic_auth":"sk-secret-value"}"#,
        )
        .expect_err("mistyped");
        let shown = json_error(&err);
        assert!(!shown.contains("sk-secret-value"), "{shown}");
        assert!(
            err.to_string().contains("sk-secret-value"),
            "serde does quote it"
        );
        let err = serde_json::from_str::<SubstituteAuthResponse>(r#"{"matched":true,"extra":1}"#)
            .expect_err("unknown field");
        assert!(json_error(&err).starts_with("unknown field `extra`"));
    }

    #[test]
    fn refusals_are_told_apart_from_failures() {
        let rejected = |code: ErrorCode| BrokerCallError::Rejected {
            status: code.http_status(),
            code,
            message: String::new(),
        };
        assert!(rejected(ErrorCode::Forbidden).is_refusal());
        assert!(rejected(ErrorCode::EgressDenied).is_refusal());
        assert!(rejected(ErrorCode::BadRequest).is_refusal());
        assert!(!rejected(ErrorCode::Unauthenticated).is_refusal());
        assert!(!rejected(ErrorCode::RateLimited).is_refusal());
        assert!(!rejected(ErrorCode::Unavailable).is_refusal());
        assert!(!BrokerCallError::Timeout(DEFAULT_TIMEOUT).is_refusal());
        assert!(!BrokerCallError::BadStatus { status: 403 }.is_refusal());
    }
}
