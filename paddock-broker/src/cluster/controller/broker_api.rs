//! How the controller talks to the broker: the four calls it needs, behind [`RunBroker`].
//!
//! In a cluster the controller is its own Deployment and calls the broker's HTTPS API
//! ([`HttpBroker`]) with a bearer that has the `controller` scope: the broker (which holds the
//! real secrets) then needs no right to create pods or Secrets, and the controller (which
//! does) never holds a secret, only placeholders. [`InProcess`] calls a [`Broker`] directly
//! (tests, and an embedder that runs both in one process).
//!
//! The calls block (the HTTP client drives its exchange on a thread of its own, the broker's
//! store is `SQLite`): call them from `spawn_blocking`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    Broker, BrokerError,
    auth::{Identity, Scope},
    providers::http_client,
    wire::{
        ErrorBody, ErrorCode, IssueRequest, IssueResponse, LeaseInfo, LeasesResponse,
        RevokeRequest, RevokeResponse, RunInfo, RunUpsertRequest, paths,
    },
};

/// Why a broker call failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerCallError {
    /// The broker answered and refused (policy, scope, bad request): retrying the same call
    /// gets the same answer until something changes.
    #[error("{code:?}: {message}")]
    Refused { code: ErrorCode, message: String },
    /// No answer, or a transient one (unavailable, rate limited, internal): retry later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

impl BrokerCallError {
    fn from_code(code: ErrorCode, message: String) -> Self {
        match code {
            ErrorCode::Unavailable
            | ErrorCode::RateLimited
            | ErrorCode::Internal
            | ErrorCode::AuditUnavailable => Self::Unavailable(format!("{code:?}: {message}")),
            _ => Self::Refused { code, message },
        }
    }
}

/// The broker calls of the controller.
pub trait RunBroker: Send + Sync + std::fmt::Debug + 'static {
    fn upsert_run(&self, req: &RunUpsertRequest) -> Result<RunInfo, BrokerCallError>;
    fn issue(&self, req: &IssueRequest) -> Result<IssueResponse, BrokerCallError>;
    fn revoke(&self, lease_id: &str) -> Result<(), BrokerCallError>;
    /// Every lease of the run, revoked ones included.
    fn leases(&self, run: &str) -> Result<Vec<LeaseInfo>, BrokerCallError>;
}

/// A [`Broker`] in this process, called as the controller.
#[derive(Debug, Clone)]
pub struct InProcess {
    broker: Arc<Broker>,
    identity: Identity,
}

impl InProcess {
    #[must_use]
    pub fn new(broker: Arc<Broker>, subject: &str) -> Self {
        Self {
            broker,
            identity: Identity {
                subject: subject.to_owned(),
                namespace: String::new(),
                service_account: None,
                scopes: BTreeSet::from([
                    Scope::Controller,
                    Scope::Issue,
                    Scope::Revoke,
                    Scope::LeasesRead,
                ]),
                backend: "in-process",
                run: None,
                node: None,
                placement: None,
            },
        }
    }
}

fn from_broker(e: &BrokerError) -> BrokerCallError {
    BrokerCallError::from_code(e.code(), e.public_message())
}

impl RunBroker for InProcess {
    fn upsert_run(&self, req: &RunUpsertRequest) -> Result<RunInfo, BrokerCallError> {
        self.broker
            .upsert_run(&self.identity, req)
            .map_err(|e| from_broker(&e))
    }

    fn issue(&self, req: &IssueRequest) -> Result<IssueResponse, BrokerCallError> {
        self.broker
            .issue(&self.identity, req)
            .map_err(|e| from_broker(&e))
    }

    fn revoke(&self, lease_id: &str) -> Result<(), BrokerCallError> {
        self.broker
            .revoke(
                &self.identity,
                &RevokeRequest {
                    lease_id: lease_id.to_owned(),
                },
            )
            .map(|_| ())
            .map_err(|e| from_broker(&e))
    }

    fn leases(&self, run: &str) -> Result<Vec<LeaseInfo>, BrokerCallError> {
        self.broker
            .leases(&self.identity, run)
            .map(|r| r.leases)
            .map_err(|e| from_broker(&e))
    }
}

/// The broker's HTTPS API.
#[derive(Clone)]
pub struct HttpBroker {
    base: url::Url,
    /// Re-read on every call: projected service-account tokens rotate.
    token_file: PathBuf,
    ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for HttpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpBroker")
            .field("base", &self.base.as_str())
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

impl HttpBroker {
    /// `base` is the broker's URL (`https://`; `http` only for loopback hosts).
    pub fn new(base: &str, token_file: &Path, ca_file: Option<&Path>) -> Result<Self, String> {
        let base = url::Url::parse(base).map_err(|e| format!("broker URL {base:?}: {e}"))?;
        match base.scheme() {
            "https" => {}
            "http" if base.host_str().is_some_and(crate::base_url::is_loopback) => {}
            s => return Err(format!("broker URL scheme {s} not allowed (https)")),
        }
        Ok(Self {
            base,
            token_file: token_file.to_owned(),
            ca_file: ca_file.map(Path::to_path_buf),
        })
    }

    fn call<Resp: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<Resp, BrokerCallError> {
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| {
            BrokerCallError::Unavailable(format!("token file {}: {e}", self.token_file.display()))
        })?;
        let auth = format!("Bearer {}", token.trim());
        let url = self
            .base
            .join(path_and_query)
            .map_err(|e| BrokerCallError::Unavailable(format!("URL: {e}")))?;
        let resp = http_client::request(
            method,
            &url,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body,
            self.ca_file.as_deref(),
        )
        .map_err(|e| BrokerCallError::Unavailable(e.to_string()))?;
        if (200..300).contains(&resp.status) {
            return serde_json::from_slice(&resp.body)
                .map_err(|e| BrokerCallError::Unavailable(format!("malformed answer: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&resp.body) {
            Ok(err) => Err(BrokerCallError::from_code(err.code, err.message)),
            Err(_) => Err(BrokerCallError::Unavailable(format!(
                "HTTP {}",
                resp.status
            ))),
        }
    }

    fn post<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
    ) -> Result<Resp, BrokerCallError> {
        let body =
            serde_json::to_vec(req).map_err(|e| BrokerCallError::Unavailable(e.to_string()))?;
        self.call("POST", path, &body)
    }
}

impl RunBroker for HttpBroker {
    fn upsert_run(&self, req: &RunUpsertRequest) -> Result<RunInfo, BrokerCallError> {
        self.post(paths::RUNS, req)
    }

    fn issue(&self, req: &IssueRequest) -> Result<IssueResponse, BrokerCallError> {
        self.post(paths::ISSUE, req)
    }

    fn revoke(&self, lease_id: &str) -> Result<(), BrokerCallError> {
        let _: RevokeResponse = self.post(
            paths::REVOKE,
            &RevokeRequest {
                lease_id: lease_id.to_owned(),
            },
        )?;
        Ok(())
    }

    fn leases(&self, run: &str) -> Result<Vec<LeaseInfo>, BrokerCallError> {
        let q = percent_encoding::utf8_percent_encode(run, percent_encoding::NON_ALPHANUMERIC);
        let r: LeasesResponse = self.call("GET", &format!("{}?run={q}", paths::LEASES), &[])?;
        Ok(r.leases)
    }
}
