//! Types of the broker's HTTP/JSON API: what the broker serves and the proxy's broker client
//! sends and decodes.
//!
//! Requests reject unknown fields: a typo in a client must not silently drop a constraint.
//! Secret-bearing types have a manual `Debug` that redacts the secret.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Largest request body the broker accepts (bytes).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Paths of the API routes.
pub mod paths {
    pub const ISSUE: &str = "/v1/issue";
    pub const RENEW: &str = "/v1/renew";
    pub const REVOKE: &str = "/v1/revoke";
    pub const VALIDATE_EGRESS: &str = "/v1/validate-egress";
    pub const SUBSTITUTE_AUTH: &str = "/v1/substitute-auth";
    pub const LEASES: &str = "/v1/leases";
    pub const RUNS: &str = "/v1/runs";
    /// Long poll of the invalidation stream; each poll also acknowledges and renews.
    pub const GRANTS_POLL: &str = "/v1/grants/poll";
    /// An authenticated "are you serving": the proxies' readiness check.
    pub const PING: &str = "/v1/ping";
    /// A node agent's certificate signing request for its short-lived intermediate CA.
    pub const NODE_CA: &str = "/v1/node-ca";
    /// The cluster root's revocation list of node intermediates (DER, `application/pkix-crl`).
    pub const NODE_CA_CRL: &str = "/v1/node-ca/crl";
    /// A node agent's outbound tunnel (HTTP/1.1 upgrade to [`super::tunnel::PROTOCOL`]).
    pub const NODE_TUNNEL: &str = "/v1/node/tunnel";
}

/// The node tunnel: how the broker reaches a pod without dialing it.
///
/// A node agent opens `GET /v1/node/tunnel` with `Upgrade: paddock-tunnel/1`, authenticated
/// as its node. After the 101 the roles turn: the broker is the HTTP/2 *client* on that
/// connection and the node agent the server. Each stream is a `CONNECT` naming a run (and the
/// pod the API server placed it in) and what to open there; the node agent answers 200 and
/// the stream carries bytes (an adapter connection, or a shell's terminal), or answers an
/// error status with the reason as plain text.
pub mod tunnel {
    /// The upgrade token.
    pub const PROTOCOL: &str = "paddock-tunnel/1";
    /// The run's namespace.
    pub const NAMESPACE: &str = "paddock-namespace";
    /// The run.
    pub const RUN: &str = "paddock-run";
    /// The UID of the pod the API server says holds the run.
    pub const POD_UID: &str = "paddock-pod-uid";
    /// What to open: [`OPEN_ADAPTER`] or [`OPEN_SHELL`].
    pub const OPEN: &str = "paddock-open";
    pub const OPEN_ADAPTER: &str = "adapter";
    pub const OPEN_SHELL: &str = "shell";
    /// A shell's terminal size.
    pub const ROWS: &str = "paddock-rows";
    pub const COLS: &str = "paddock-cols";
    /// In a shell's 200 answer: the user the shell runs as.
    pub const USER: &str = "paddock-user";
    /// In a shell's 200 answer: the session's id, which a resize names.
    pub const SHELL_ID: &str = "paddock-shell-id";
    /// A resize of an open shell's terminal: `POST` of this path with [`SHELL_ID`],
    /// [`ROWS`] and [`COLS`] (204; 404 when the shell is gone).
    pub const RESIZE_PATH: &str = "/resize";
}

/// Stable error codes. The HTTP status is fixed per code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    Unauthenticated,
    Forbidden,
    NotFound,
    BadRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    MethodNotAllowed,
    RateLimited,
    PoolExhausted,
    AuditUnavailable,
    Unavailable,
    EgressDenied,
    /// The credential may only travel over TLS and the request is cleartext HTTP.
    TlsRequired,
    /// The invalidation-stream subscription a call named is unknown (cut off or expired):
    /// drop every cached grant and subscribe again.
    SubscriptionGone,
    /// An interactive run's adapter could not be reached or failed (502; the message says why).
    AdapterUnavailable,
    /// A shell could not be started in the run's sandbox (502; the message says why).
    ShellUnavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::BadRequest,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::MethodNotAllowed,
        ErrorCode::RateLimited,
        ErrorCode::PoolExhausted,
        ErrorCode::AuditUnavailable,
        ErrorCode::Unavailable,
        ErrorCode::EgressDenied,
        ErrorCode::TlsRequired,
        ErrorCode::SubscriptionGone,
        ErrorCode::AdapterUnavailable,
        ErrorCode::ShellUnavailable,
        ErrorCode::Internal,
    ];

    #[must_use]
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::Unauthenticated => 401,
            ErrorCode::Forbidden | ErrorCode::EgressDenied | ErrorCode::TlsRequired => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::BadRequest => 400,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::SubscriptionGone => 410,
            ErrorCode::RateLimited => 429,
            ErrorCode::PoolExhausted | ErrorCode::AuditUnavailable | ErrorCode::Unavailable => 503,
            ErrorCode::AdapterUnavailable | ErrorCode::ShellUnavailable => 502,
            ErrorCode::Internal => 500,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthenticated => "Unauthenticated",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::NotFound => "NotFound",
            ErrorCode::BadRequest => "BadRequest",
            ErrorCode::PayloadTooLarge => "PayloadTooLarge",
            ErrorCode::UnsupportedMediaType => "UnsupportedMediaType",
            ErrorCode::MethodNotAllowed => "MethodNotAllowed",
            ErrorCode::RateLimited => "RateLimited",
            ErrorCode::PoolExhausted => "PoolExhausted",
            ErrorCode::AuditUnavailable => "AuditUnavailable",
            ErrorCode::Unavailable => "Unavailable",
            ErrorCode::EgressDenied => "EgressDenied",
            ErrorCode::TlsRequired => "TlsRequired",
            ErrorCode::SubscriptionGone => "SubscriptionGone",
            ErrorCode::AdapterUnavailable => "AdapterUnavailable",
            ErrorCode::ShellUnavailable => "ShellUnavailable",
            ErrorCode::Internal => "Internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Body of every non-2xx response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// How an issued credential reaches the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryMode {
    /// The workload gets a placeholder bearer; the proxy swaps in the real secret.
    ProxyInjected,
    /// The workload gets the real secret (policy must state an accepted reason).
    InContainer,
}

/// `POST /v1/issue`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueRequest {
    pub run: String,
    pub credential: String,
}

/// Answer to `POST /v1/issue`. `value` is the placeholder bearer for proxy-injected
/// credentials and the real secret for in-container ones; it is redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueResponse {
    pub lease_id: String,
    pub run: String,
    pub credential: String,
    pub provider: String,
    pub delivery: DeliveryMode,
    pub value: String,
    pub hosts: Vec<String>,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
}

impl fmt::Debug for IssueResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueResponse")
            .field("lease_id", &self.lease_id)
            .field("run", &self.run)
            .field("credential", &self.credential)
            .field("provider", &self.provider)
            .field("delivery", &self.delivery)
            .field("value", &"<redacted>")
            .field("hosts", &self.hosts)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// `POST /v1/renew`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub lease_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewResponse {
    pub lease_id: String,
    pub expires_at: u64,
}

/// `POST /v1/revoke`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    pub lease_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeResponse {
    pub lease_id: String,
    /// False when the lease was already revoked (revocation is idempotent).
    pub revoked: bool,
}

/// `POST /v1/validate-egress`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateEgressRequest {
    pub run: String,
    /// The UID of the pod the connection came from, sent by a node agent (which serves many
    /// runs): the broker lets it act for the run only from that pod, the run's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub host: String,
    /// The destination port; absent (or `null`) asks whether the run could reach `host` on
    /// any port, which is what the proxy's DNS server needs before it answers a name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[expect(
    clippy::struct_excessive_bools,
    reason = "the JSON wire format: flat fields, each read on its own; the proxy maps them to one decision enum"
)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateEgressResponse {
    pub allowed: bool,
    /// Whether the proxy should intercept and call `/v1/substitute-auth` for this destination.
    pub substitute_auth: bool,
    /// True when the destination is allowed only by an active discovery window.
    pub discovery: bool,
    /// True when the proxy should relay the connection's TLS without terminating it (every
    /// grant listing the destination says `passthrough`; never with `substitute_auth`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passthrough: bool,
    /// Name of the policy that decided, if any.
    pub policy: Option<String>,
    /// Human-readable reason, suitable for a deny message to the agent.
    pub reason: String,
}

/// One HTTP header as seen by the proxy. Values are redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub name: String,
    pub value: String,
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Header")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// One query parameter (already percent-decoded). Values are redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryParam {
    pub name: String,
    pub value: String,
}

impl fmt::Debug for QueryParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryParam")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// How the intercepted request travels between the proxy and the upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// TLS on both legs (the proxy terminated the agent's TLS and dials the upstream with TLS).
    Tls,
    /// Plain HTTP: whatever is substituted crosses the network readable. The default, so a
    /// client that does not say is treated as the less safe case (fail closed).
    #[default]
    Cleartext,
}

/// `POST /v1/substitute-auth`: the intercepted request, as the proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubstituteAuthRequest {
    pub run: String,
    /// As in [`ValidateEgressRequest::pod`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub host: String,
    pub port: u16,
    /// Whether the request reaches the upstream over TLS. Credentials are TLS-only unless
    /// their policy entry has `allowCleartext: true`.
    #[serde(default)]
    pub transport: Transport,
    pub method: String,
    pub path: String,
    /// Raw query string without the leading `?` (percent-encoded, as on the wire).
    #[serde(default)]
    pub query: Option<String>,
    #[serde(default)]
    pub headers: Vec<Header>,
    /// The caller's invalidation-stream subscription ([`GrantPollResponse::subscription`]).
    /// With one, a substitution comes back with [`GrantTerms`] the caller may reuse; a
    /// subscription the broker no longer knows is answered [`ErrorCode::SubscriptionGone`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription: Option<String>,
}

/// Basic-auth replacement: the proxy sets `Authorization: Basic base64(username:password)`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BasicAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// What the proxy must change on the intercepted request. The proxy applies, in order:
/// `remove_headers`, `set_headers` (replacing any header of the same name), `basic_auth`
/// (replacing `Authorization`), `remove_query`, then `set_query` (replacing any parameter of
/// the same name, appending otherwise). When `matched` is false no placeholder was found and
/// the request is forwarded unchanged.
///
/// `secrets` lists the raw secret values the edits put in, so the proxy can scrub them (and
/// their encoded forms) from the upstream's responses before the agent sees them.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubstituteAuthResponse {
    pub matched: bool,
    pub lease_id: Option<String>,
    pub credential: Option<String>,
    #[serde(default)]
    pub set_headers: Vec<Header>,
    #[serde(default)]
    pub remove_headers: Vec<String>,
    #[serde(default)]
    pub set_query: Vec<QueryParam>,
    #[serde(default)]
    pub remove_query: Vec<String>,
    #[serde(default)]
    pub basic_auth: Option<BasicAuth>,
    /// The secret values put into the request (redacted in `Debug`).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Present when the request named a live subscription: the caller may apply this same
    /// answer to further requests of the same shape within these terms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<GrantTerms>,
}

/// How long and how often a substitution answer may be reused by the proxy that asked.
///
/// A proxy may apply the answer to `uses` requests in all (this one included) of the same
/// run, pod, destination, transport, placeholder and request shape (header names, query
/// parameter names, where the placeholder sits), within `ttl_ms` of sending its request, and
/// only while its subscription is live. It must drop the answer when an invalidation with a
/// sequence number above `seq` names its lease or run, or everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantTerms {
    /// The broker's invalidation sequence number read before it checked the request.
    pub seq: u64,
    /// Requests the answer covers, charged to the run's substitution rate limit up front.
    pub uses: u32,
    /// Lifetime from the moment the proxy sent its request, in milliseconds.
    pub ttl_ms: u64,
}

/// `POST /v1/grants/poll`: subscribe (no `subscription`), or acknowledge every event up to
/// `acked` and wait for newer ones. Each poll renews the subscription's liveness.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantPollRequest {
    #[serde(default)]
    pub subscription: Option<String>,
    /// Every event with a sequence number up to this one has been applied: its grants are
    /// dropped and no request that used them is still being handed to an upstream.
    #[serde(default)]
    pub acked: u64,
}

/// The answer to a poll: events newer than `acked`, or none once the broker's hold time
/// passed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantPollResponse {
    pub subscription: String,
    /// The newest sequence number (events included).
    pub seq: u64,
    #[serde(default)]
    pub events: Vec<GrantEvent>,
    /// How long after sending a poll the proxy may keep using grants without another
    /// successful poll, in milliseconds.
    pub lease_ms: u64,
}

/// One invalidation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantEvent {
    pub seq: u64,
    pub scope: InvalidationScope,
}

/// What an invalidation drops.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", deny_unknown_fields)]
pub enum InvalidationScope {
    /// Grants under this lease (revoked).
    Lease {
        #[serde(rename = "leaseId")]
        lease_id: String,
        run: String,
    },
    /// Grants of this run (it ended).
    Run { run: String },
    /// Every grant (the policy changed).
    All,
}

impl InvalidationScope {
    /// Whether a grant of `run` under `lease_id` falls under this scope.
    #[must_use]
    pub fn covers(&self, run: &str, lease_id: &str) -> bool {
        match self {
            Self::Lease { lease_id: l, .. } => l == lease_id,
            Self::Run { run: r } => r == run,
            Self::All => true,
        }
    }

    /// The run this scope is limited to, if any.
    #[must_use]
    pub fn run(&self) -> Option<&str> {
        match self {
            Self::Lease { run, .. } | Self::Run { run } => Some(run),
            Self::All => None,
        }
    }
}

impl fmt::Debug for SubstituteAuthResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubstituteAuthResponse")
            .field("matched", &self.matched)
            .field("lease_id", &self.lease_id)
            .field("credential", &self.credential)
            .field("set_headers", &self.set_headers)
            .field("remove_headers", &self.remove_headers)
            .field("set_query", &self.set_query)
            .field("remove_query", &self.remove_query)
            .field("basic_auth", &self.basic_auth)
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.secrets.len()),
            )
            .field("grant", &self.grant)
            .finish()
    }
}

/// Query of `GET /v1/leases?run=...`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeasesQuery {
    pub run: String,
}

/// A lease as listed; never contains the bearer or the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseInfo {
    pub lease_id: String,
    pub run: String,
    pub namespace: String,
    pub credential: String,
    pub provider: String,
    pub delivery: DeliveryMode,
    pub hosts: Vec<String>,
    pub pool_slot: Option<u32>,
    pub issued_at: u64,
    pub expires_at: u64,
    pub revoked: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeasesResponse {
    pub leases: Vec<LeaseInfo>,
}

/// Lifecycle phase of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RunPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunPhase {
    /// Only active runs may be issued credentials or have them substituted.
    #[must_use]
    pub fn is_active(self) -> bool {
        matches!(self, RunPhase::Pending | RunPhase::Running)
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            RunPhase::Pending => "Pending",
            RunPhase::Running => "Running",
            RunPhase::Succeeded => "Succeeded",
            RunPhase::Failed => "Failed",
            RunPhase::Cancelled => "Cancelled",
        }
    }

    #[must_use]
    pub fn parse(s: &str) -> Option<RunPhase> {
        [
            RunPhase::Pending,
            RunPhase::Running,
            RunPhase::Succeeded,
            RunPhase::Failed,
            RunPhase::Cancelled,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// `POST /v1/runs` (controller scope): register a run or update its phase. Moving a run to a
/// terminal phase revokes its leases and frees its pool slots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunUpsertRequest {
    pub run: String,
    pub namespace: String,
    pub template: String,
    pub phase: RunPhase,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunInfo {
    pub run: String,
    pub namespace: String,
    pub template: String,
    pub phase: RunPhase,
}

/// The answer to `GET /v1/ping`: the broker authenticated the caller and its store answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingResponse {
    /// The store backend that answered ("sqlite", "postgres").
    pub store: String,
}

/// Names of every schema the `OpenAPI` document must define (checked by a test).
pub const SCHEMA_NAMES: &[&str] = &[
    "ErrorBody",
    "ErrorCode",
    "DeliveryMode",
    "IssueRequest",
    "IssueResponse",
    "RenewRequest",
    "RenewResponse",
    "RevokeRequest",
    "RevokeResponse",
    "ValidateEgressRequest",
    "ValidateEgressResponse",
    "Header",
    "QueryParam",
    "Transport",
    "SubstituteAuthRequest",
    "SubstituteAuthResponse",
    "BasicAuth",
    "LeaseInfo",
    "LeasesResponse",
    "RunPhase",
    "RunUpsertRequest",
    "RunInfo",
    "PingResponse",
    "NodeCaRequest",
    "NodeCaResponse",
];

/// `POST /v1/node-ca`: a node agent asks for an intermediate CA for its own node. Only the
/// certificate signing request travels; the private key never leaves the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCaRequest {
    /// The node the CA is for; must be the node the caller's token is bound to.
    pub node: String,
    /// PKCS#10 request (PEM `CERTIFICATE REQUEST`), subject `CN=<node>`. Only its public key
    /// and subject are read: the broker decides every other field of the certificate.
    pub csr: String,
}

/// The issued intermediate and the root it chains to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCaResponse {
    /// The intermediate CA certificate (PEM).
    pub certificate: String,
    /// The cluster root certificate (PEM): what agent pods trust.
    pub root: String,
    /// The intermediate's `notBefore`, seconds since the Unix epoch.
    pub not_before: u64,
    /// The intermediate's `notAfter`, seconds since the Unix epoch.
    pub not_after: u64,
}
