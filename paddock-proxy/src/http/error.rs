//! The request loop's error type and the one answer each error gets.

use std::io;

use http::{HeaderValue, Response, StatusCode, header};

use super::body::{ProxyBody, full};
use super::substitute::SubstituteError;

/// Header carrying the machine-readable denial reason.
pub const DENIED_HEADER: &str = "x-paddock-denied";

/// Keeps printable ASCII and caps the length, so agent-controlled text (SNI, reasons built
/// from it) cannot inject header lines or flood the page.
pub(crate) fn sanitize_reason(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect()
}

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Name resolution or TCP failed.
    #[error("dial failed: {0}")]
    Io(#[from] io::Error),
    /// The TLS handshake failed or the certificate did not verify.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// Every address the name resolved to was refused by network policy (denied CIDR,
    /// rebinding mismatch).
    #[error("destination refused by network policy: {0}")]
    Denied(String),
}

impl ConnectError {
    /// A copy for reporting: the original stays inside the client's error chain.
    pub(super) fn duplicate(&self) -> Self {
        match self {
            Self::Io(e) => Self::Io(io::Error::new(e.kind(), e.to_string())),
            Self::Handshake(s) => Self::Handshake(s.clone()),
            Self::Denied(s) => Self::Denied(s.clone()),
        }
    }
}

/// A failure while serving an agent connection or one of its requests.
///
/// Messages never carry header values or query strings: those may hold credentials.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Dialling or handshaking the upstream failed.
    #[error("upstream {host}:{port} unreachable: {source}")]
    UpstreamConnect {
        host: String,
        port: u16,
        #[source]
        source: ConnectError,
    },
    /// The upstream did not connect, or did not answer, in time.
    #[error("upstream {host}:{port} timed out ({stage})")]
    UpstreamTimeout {
        host: String,
        port: u16,
        stage: &'static str,
    },
    /// The upstream connection failed while sending the request or reading the response
    /// head (closed early, protocol error).
    #[error("upstream {host}:{port} request failed: {source}")]
    UpstreamRequest {
        host: String,
        port: u16,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The upstream answered a forwarded upgrade with 101 but without a usable protocol.
    #[error("upstream {host}:{port} negotiated HTTP/2 for an upgrade request")]
    UpgradeNotHttp1 { host: String, port: u16 },
    /// The substituter refused or failed: the request is not forwarded.
    #[error("credential substitution failed: {0}")]
    Substitution(#[from] SubstituteError),
    /// The connection's destination is no longer allowed (or the policy could not say):
    /// the egress re-check of an open connection refused the request.
    #[error("{0}")]
    Egress(#[from] crate::policy::RecheckError),
    /// The request names an authority other than the connection's destination.
    #[error("request for {authority} on a connection to {host}:{port}")]
    Misdirected {
        authority: String,
        host: String,
        port: u16,
    },
    /// The request is malformed for forwarding (no authority, user info in it, ...).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// `CONNECT` inside an intercepted connection would be a tunnel past the proxy.
    #[error("method {0} is not allowed through the proxy")]
    MethodNotAllowed(http::Method),
    /// The pool handed in belongs to another run: refusing to mix runs' connections.
    #[error("upstream pool belongs to run {pool_run}, connection to run {ctx_run}")]
    PoolRunMismatch { pool_run: String, ctx_run: String },
    /// Serving the agent connection failed (protocol error, reset, header timeout).
    #[error("agent connection failed: {0}")]
    Agent(#[source] hyper::Error),
    /// The agent connection outlived its bound (denial pages only).
    #[error("agent connection exceeded its time bound")]
    AgentTimeout,
    /// The upstream's answer could not be scrubbed of the secrets its host was sent (an
    /// unreadable content encoding, a compressed gRPC stream), so it is not passed on.
    #[error("upstream {host}:{port} answer cannot be scrubbed: {reason}")]
    Unscrubbable {
        host: String,
        port: u16,
        reason: String,
    },
    /// An upgrade to a protocol the proxy cannot scrub, to a host that holds secrets.
    #[error(
        "upgrade to {protocol} refused: the proxy can only scrub WebSocket tunnels to a host that was sent a credential"
    )]
    UpgradeRefused { protocol: String },
}

impl HttpError {
    /// True when the upstream could not be dialled or handshaken.
    #[must_use]
    pub fn is_upstream_connect(&self) -> bool {
        matches!(self, Self::UpstreamConnect { .. })
    }

    /// True when an upstream deadline passed.
    #[must_use]
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::UpstreamTimeout { .. } | Self::AgentTimeout)
    }

    /// True when the upstream failed after the connection was up.
    #[must_use]
    pub fn is_upstream_request(&self) -> bool {
        matches!(
            self,
            Self::UpstreamRequest { .. } | Self::UpgradeNotHttp1 { .. }
        )
    }

    /// True when credential substitution refused or failed.
    #[must_use]
    pub fn is_substitution(&self) -> bool {
        matches!(self, Self::Substitution(_))
    }

    /// True when the request was refused before forwarding because of what it asked for.
    #[must_use]
    pub fn is_request_refused(&self) -> bool {
        matches!(
            self,
            Self::Misdirected { .. } | Self::BadRequest(_) | Self::MethodNotAllowed(_)
        )
    }

    /// True when the proxy refused the request on purpose (substitution refused, a denied
    /// upstream address, another authority, a malformed request, `CONNECT`) rather than
    /// failing to serve it: audited as `denied` rather than `failed`.
    #[must_use]
    pub fn is_denial(&self) -> bool {
        self.is_request_refused()
            || matches!(
                self,
                Self::Substitution(
                    SubstituteError::Denied { .. } | SubstituteError::TlsRequired { .. }
                ) | Self::UpgradeRefused { .. }
                    | Self::Egress(crate::policy::RecheckError::Denied { .. })
                    | Self::UpstreamConnect {
                        source: ConnectError::Denied(_),
                        ..
                    }
            )
    }

    /// True when the agent side of the connection failed.
    #[must_use]
    pub fn is_agent(&self) -> bool {
        matches!(self, Self::Agent(_) | Self::AgentTimeout)
    }

    /// The status the agent gets for this error.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UpstreamConnect {
                source: ConnectError::Denied(_),
                ..
            }
            | Self::UpgradeRefused { .. } => StatusCode::FORBIDDEN,
            Self::UpstreamConnect { .. }
            | Self::UpstreamRequest { .. }
            | Self::UpgradeNotHttp1 { .. }
            | Self::Unscrubbable { .. }
            | Self::PoolRunMismatch { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } | Self::AgentTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Substitution(e) => e.status(),
            Self::Egress(e) => e.status(),
            Self::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            Self::BadRequest(_) | Self::Agent(_) => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// A short machine-readable reason, used in the `x-paddock-denied` header of 403s and
    /// in logs and metrics.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UpstreamConnect {
                source: ConnectError::Denied(_),
                ..
            } => "upstream_address_denied",
            Self::UpstreamConnect { .. } => "upstream_connect_failed",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::UpstreamRequest { .. } => "upstream_request_failed",
            Self::UpgradeNotHttp1 { .. } => "upstream_upgrade_failed",
            Self::Substitution(e) => e.reason(),
            Self::Egress(e) => e.reason(),
            Self::Misdirected { .. } => "misdirected_request",
            Self::BadRequest(_) => "bad_request",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::PoolRunMismatch { .. } => "pool_run_mismatch",
            Self::Agent(_) => "agent_protocol_error",
            Self::AgentTimeout => "agent_timeout",
            Self::Unscrubbable { .. } => "upstream_unscrubbable",
            Self::UpgradeRefused { .. } => "upgrade_refused",
        }
    }

    /// The response the agent gets: the status, a one-line text body, and for refusals the
    /// `x-paddock-denied` header so agents can tell a policy answer from an upstream one.
    #[must_use]
    pub fn to_response(&self) -> Response<ProxyBody> {
        let status = self.status();
        let body = format!("paddock: {}\n", sanitize_reason(&self.to_string()));
        let mut response = Response::new(full(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::FORBIDDEN || status == StatusCode::MISDIRECTED_REQUEST {
            headers.insert(DENIED_HEADER, HeaderValue::from_static(self.reason()));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_err(source: ConnectError) -> HttpError {
        HttpError::UpstreamConnect {
            host: "api.test".into(),
            port: 443,
            source,
        }
    }

    #[test]
    fn each_error_maps_to_its_status() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let cases: Vec<(HttpError, StatusCode)> = vec![
            (connect_err(ConnectError::Io(io)), StatusCode::BAD_GATEWAY),
            (
                connect_err(ConnectError::Handshake("bad cert".into())),
                StatusCode::BAD_GATEWAY,
            ),
            (
                connect_err(ConnectError::Denied("denied cidr".into())),
                StatusCode::FORBIDDEN,
            ),
            (
                HttpError::UpstreamTimeout {
                    host: "h".into(),
                    port: 1,
                    stage: "connect",
                },
                StatusCode::GATEWAY_TIMEOUT,
            ),
            (
                HttpError::Substitution(SubstituteError::Denied {
                    reason: "no grant".into(),
                }),
                StatusCode::FORBIDDEN,
            ),
            (
                HttpError::Substitution(SubstituteError::Unavailable {
                    reason: "broker down".into(),
                }),
                StatusCode::BAD_GATEWAY,
            ),
            (
                HttpError::Misdirected {
                    authority: "b".into(),
                    host: "a".into(),
                    port: 443,
                },
                StatusCode::MISDIRECTED_REQUEST,
            ),
            (
                HttpError::MethodNotAllowed(http::Method::CONNECT),
                StatusCode::METHOD_NOT_ALLOWED,
            ),
        ];
        for (err, status) in cases {
            assert_eq!(err.status(), status, "{err}");
            let response = err.to_response();
            assert_eq!(response.status(), status);
            assert_eq!(
                response.headers().contains_key(DENIED_HEADER),
                status == StatusCode::FORBIDDEN || status == StatusCode::MISDIRECTED_REQUEST
            );
        }
    }

    #[test]
    fn predicates_partition_errors() {
        let e = connect_err(ConnectError::Handshake("x".into()));
        assert!(e.is_upstream_connect() && !e.is_timeout() && !e.is_substitution());
        let e = HttpError::Substitution(SubstituteError::Denied { reason: "x".into() });
        assert!(e.is_substitution() && !e.is_upstream_connect());
        let e = HttpError::BadRequest("no authority");
        assert!(e.is_request_refused() && !e.is_agent() && e.is_denial());
        assert!(connect_err(ConnectError::Denied("cidr".into())).is_denial());
        assert!(!connect_err(ConnectError::Handshake("x".into())).is_denial());
        let e = HttpError::Substitution(SubstituteError::Denied { reason: "x".into() });
        assert!(e.is_denial());
        let e = HttpError::Substitution(SubstituteError::Unavailable { reason: "x".into() });
        assert!(!e.is_denial());
    }
}
