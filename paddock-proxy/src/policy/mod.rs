//! Egress policy: may this run reach `host:port`?
//!
//! The proxy asks an [`EgressPolicy`] once per connection, after it has learned the destination
//! name (SNI, `CONNECT` authority or `Host` header) and before it resolves or dials anything.
//! Its DNS server asks [`EgressPolicy::name_allowed`] (could the run reach this name on any
//! port?) before it answers an agent's query.
//! Implementations: [`StaticPolicy`] (an allow-list from a TOML file, this module; reloadable
//! through [`PolicyFile`]) and the broker-backed `crate::broker::BrokerPolicy`. Open connections
//! re-ask whichever policy it is through [`EgressRecheck`]. Whatever the implementation, a
//! [`PolicyError`] means the caller denies the connection: policy failures never open the gate.
//!
//! # Host names
//!
//! Every host the policy sees is normalised by [`normalize_host`] first, and so is every pattern
//! in a rule:
//!
//! * ASCII letters are lower-cased, so matching is case-insensitive;
//! * one trailing dot is removed (`example.com.` is `example.com`);
//! * internationalised names are converted to their IDNA (punycode) form, so `bücher.example`
//!   and `xn--bcher-kva.example` are the same host, in a request and in a rule alike;
//! * IP literals (`192.0.2.1`, `::1`, `[::1]`) are kept in their canonical textual form;
//! * empty labels (`a..b`, `.a`), labels over 63 bytes, names over 253 bytes and characters
//!   other than letters, digits, `-` and `_` are rejected.
//!
//! # Host patterns
//!
//! | pattern | matches | does not match |
//! | --- | --- | --- |
//! | `example.com` | `example.com` only | `www.example.com`, `example.com.evil` |
//! | `*.example.com` | `a.example.com`, `a.b.example.com` (any depth) | `example.com`, `badexample.com` |
//! | `192.0.2.1`, `::1` | that IP literal | names resolving to it |
//! | `*` | any host, IP literals included | (only accepted when `allow_any_host = true`) |
//!
//! A `*` anywhere else (`a*b.com`, `*example.com`, `www.*.com`, `**.a`) is rejected at load
//! time with an error naming the rule's index. Globs never match IP literals: `*.2.1` is not a
//! way to allow `192.0.2.1`.
//!
//! # Rules
//!
//! Rules are tried in file order; the first rule whose host pattern, port list and mode list all
//! match decides. No match is a deny. See [`StaticPolicy`] for the file format.

mod file;
mod pattern;
mod recheck;
mod static_list;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use serde::Serialize;

pub use file::PolicyFile;
pub use pattern::{HostError, HostPattern, normalize_host};
pub use recheck::{ConnectionRecheck, DEFAULT_EGRESS_RECHECK, EgressRecheck, RecheckError};
pub use static_list::{PolicyConfigError, StaticPolicy};

/// How the agent's connection reached the proxy; rules may be limited to some modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Redirected by the kernel; the name comes from the TLS SNI.
    Transparent,
    /// Cooperative HTTP/1.1 `CONNECT`; the name comes from the request authority.
    Connect,
    /// Plain HTTP on port 80; the name comes from the `Host` header.
    PlainHttp,
}

impl Mode {
    /// Stable lower-case label used in audit records, logs and config files.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Transparent => "transparent",
            Mode::Connect => "connect",
            Mode::PlainHttp => "plain_http",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One question to the policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EgressRequest {
    /// The run (workload) the connection belongs to.
    pub run: String,
    /// Normalised host: lower-cased, IDNA ASCII, no trailing dot (see [`normalize_host`]).
    pub host: String,
    /// Destination port.
    pub port: u16,
    /// How the connection arrived.
    pub mode: Mode,
}

impl EgressRequest {
    /// Builds a request, normalising `host`; an unusable host name is an error (deny it).
    pub fn new(
        run: impl Into<String>,
        host: &str,
        port: u16,
        mode: Mode,
    ) -> Result<Self, HostError> {
        Ok(Self {
            run: run.into(),
            host: normalize_host(host)?,
            port,
            mode,
        })
    }
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by `rule`; `substitute_auth` says whether the rule grants credential
    /// substitution. It is reported, not enforced here: the request loop runs its
    /// [`crate::http::Substituter`] on every request whatever the flag says, and the broker
    /// refuses a substitution its own grant does not cover.
    Allow { rule: String, substitute_auth: bool },
    /// Denied; `reason` is safe to show to the agent (it names no policy internals).
    Deny { reason: String },
    /// Allowed only so the traffic can be observed while an allow-list is being built; audited
    /// as `discovery`, never substituted.
    Discovery { rule: String },
    /// Allowed without terminating TLS: after the SNI and destination checks the bytes are
    /// relayed as they are (no substitution, no per-request audit). Audited as `passthrough`.
    /// Plain HTTP, which has no TLS to pass through, is intercepted as under `Allow`.
    Passthrough { rule: String },
}

impl Decision {
    /// Whether the connection may proceed.
    #[must_use]
    pub fn is_allowed(&self) -> bool {
        !matches!(self, Decision::Deny { .. })
    }
}

/// The policy could not answer. Callers deny the connection (fail closed).
#[derive(Debug, Clone, thiserror::Error)]
pub enum PolicyError {
    #[error("egress request carries an invalid host: {0}")]
    InvalidHost(#[from] HostError),
    #[error("egress policy backend unavailable: {0}")]
    Unavailable(String),
    /// The backend refused to answer for this run or destination (the broker answered with
    /// a refusal such as an unknown run): a deny, reported as one.
    #[error("egress policy backend refused: {0}")]
    Refused(String),
}

/// Future returned by [`EgressPolicy::check`].
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<Decision, PolicyError>> + Send + 'a>>;

/// Decides whether a run may reach a destination.
///
/// Contract for callers: `Err(_)` is treated exactly like [`Decision::Deny`].
pub trait EgressPolicy: Send + Sync + fmt::Debug {
    fn check<'a>(&'a self, req: &'a EgressRequest) -> CheckFuture<'a>;

    /// Could `run` reach the name `host` at all: on any port, in a mode where the agent
    /// resolves names itself? The proxy's DNS server ([`crate::dns`]) asks this before it
    /// answers a query, and answers NXDOMAIN (without asking upstream) when the answer is a
    /// deny. `host` is normalised as [`normalize_host`] does. [`Decision::Allow`],
    /// [`Decision::Discovery`] and [`Decision::Passthrough`] all mean "answer it";
    /// `substitute_auth` means nothing here.
    ///
    /// The default denies every name: a policy that cannot answer the question must not
    /// open DNS (fail closed).
    /// A number that changes whenever an answer this policy gave may have changed (new rules
    /// in force, a run that ended), or `None` when the policy cannot say. While it stays the
    /// same, [`EgressRecheck`] keeps an allow past its interval instead of asking again, so a
    /// change is pushed to open connections instead of polled. The default (`None`) keeps
    /// answers for the interval only.
    fn generation(&self) -> Option<u64> {
        None
    }

    fn name_allowed<'a>(&'a self, run: &'a str, host: &'a str) -> CheckFuture<'a> {
        let _ = run;
        Box::pin(std::future::ready(Ok(Decision::Deny {
            reason: format!("the egress policy does not answer name queries ({host})"),
        })))
    }
}
