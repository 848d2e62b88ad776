//! `BrokerPolicy` documents: which credentials and which egress each run gets.
//!
//! Loaded from one YAML file (several documents separated by `---`) or a directory of
//! `*.yaml`/`*.yml` files. Validation errors name the file, the line and the field. A
//! [`PolicyStore`] reloads on change and keeps the previous policy if the new one is broken.

pub mod hosts;
mod locate;

use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    secrets::SecretSource,
    wire::{DeliveryMode, RunInfo},
};
use locate::{Seg, locate};

pub const API_VERSION: &str = "paddock.dev/v1";
pub const KIND: &str = "BrokerPolicy";
/// Longest allowed discovery window.
pub const MAX_DISCOVERY: time::Duration = time::Duration::days(7);
/// Default lease lifetime when a grant sets none.
pub const DEFAULT_TTL_SECONDS: u64 = 3600;
/// Longest lease lifetime a grant may set.
pub const MAX_TTL_SECONDS: u64 = 7 * 24 * 3600;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyDocument {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    // YAML tags are unfriendly in hand-written policy: enums are written as one-key maps
    // (`secret: {file: /path}`).
    #[serde(with = "serde_yaml_ng::with::singleton_map_recursive")]
    pub spec: PolicySpec,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    pub applies_to: AppliesTo,
    #[serde(default)]
    pub credentials: Vec<CredentialGrant>,
    #[serde(default)]
    pub egress: Vec<EgressGrant>,
    #[serde(default)]
    pub discovery: Option<Discovery>,
}

/// Which runs a policy applies to. `namespaces` is required; empty `templates`/`runs` mean any.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppliesTo {
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub templates: Vec<String>,
    #[serde(default)]
    pub runs: Vec<String>,
}

impl AppliesTo {
    #[must_use]
    pub fn matches(&self, run: &RunInfo) -> bool {
        self.namespaces.contains(&run.namespace)
            && (self.templates.is_empty() || self.templates.contains(&run.template))
            && (self.runs.is_empty() || self.runs.contains(&run.run))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialGrant {
    pub name: String,
    pub provider: ProviderSpec,
    #[serde(default)]
    pub secret: Option<SecretSource>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub delivery: Delivery,
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// Environment variable that carries this credential's placeholder (or, for in-container
    /// delivery, its value) into a command started by `paddock-proxy run`.
    #[serde(default)]
    pub env: Option<String>,
    /// Let the proxy put this credential into cleartext (plain HTTP) requests. Off by default:
    /// a secret substituted into plain HTTP crosses the network readable.
    #[serde(default)]
    pub allow_cleartext: bool,
}

impl CredentialGrant {
    #[must_use]
    pub fn ttl_seconds(&self) -> u64 {
        self.ttl_seconds.unwrap_or(DEFAULT_TTL_SECONDS)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delivery {
    pub mode: DeliveryMode,
    #[serde(default)]
    pub accepted_reason: Option<String>,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            mode: DeliveryMode::ProxyInjected,
            accepted_reason: None,
        }
    }
}

/// Provider kind and its configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase",
    deny_unknown_fields
)]
pub enum ProviderSpec {
    /// A user-supplied secret placed into a header, a query parameter or Basic auth.
    UserSecret {
        inject: Injection,
        #[serde(default)]
        allowed_headers: Option<Vec<String>>,
        #[serde(default)]
        allowed_query: Option<Vec<String>>,
    },
    /// Anthropic-style API key in `x-api-key`; other headers filtered by an allow-list.
    AnthropicApiKey {
        #[serde(default)]
        allowed_headers: Option<Vec<String>>,
    },
    /// A pool of personal access tokens; one slot per lease.
    PatPool {
        inject: Injection,
        secrets: Vec<SecretSource>,
    },
    /// A GitHub App installation token (RS256 app JWT exchanged at the API).
    GithubApp {
        app_id: u64,
        installation_id: u64,
        private_key: SecretSource,
        /// Defaults to `https://api.github.com`; `http` only for loopback hosts.
        #[serde(default)]
        api_base_url: Option<String>,
        /// Repositories the token is scoped to (empty: all the installation can reach).
        #[serde(default)]
        repositories: Vec<String>,
        /// CA bundle for GitHub Enterprise Server with a private CA.
        #[serde(default)]
        ca_file: Option<std::path::PathBuf>,
    },
}

impl ProviderSpec {
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderSpec::UserSecret { .. } => "user-secret",
            ProviderSpec::AnthropicApiKey { .. } => "anthropic-api-key",
            ProviderSpec::PatPool { .. } => "pat-pool",
            ProviderSpec::GithubApp { .. } => "github-app",
        }
    }
}

/// Where a substituted secret goes on the upstream request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    deny_unknown_fields
)]
pub enum Injection {
    Header {
        name: String,
        #[serde(default)]
        prefix: String,
    },
    Query {
        param: String,
    },
    Basic {
        username: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressGrant {
    pub hosts: Vec<String>,
    pub ports: Vec<u16>,
    #[serde(default)]
    pub substitute_auth: bool,
}

impl EgressGrant {
    /// Whether the grant covers `host` on `port`; `None` asks about the name on any port (a
    /// DNS query: could the run reach this name at all?).
    #[must_use]
    pub fn matches(&self, host: &str, port: Option<u16>) -> bool {
        port.is_none_or(|p| self.ports.contains(&p))
            && self.hosts.iter().any(|p| hosts::matches(p, host))
    }
}

/// A time-boxed window during which unlisted egress is allowed and audited.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Discovery {
    /// RFC 3339 end of the window; at most 7 days after the policy is loaded.
    pub until: String,
}

/// A validation or load error, naming the file, the line (when known) and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// One validated document and where it came from.
#[derive(Clone, Debug)]
pub struct LoadedPolicy {
    pub file: PathBuf,
    pub doc: PolicyDocument,
    pub discovery_until: Option<OffsetDateTime>,
}

impl LoadedPolicy {
    #[must_use]
    pub fn name(&self) -> &str {
        &self.doc.metadata.name
    }

    fn discovery_active(&self, now: OffsetDateTime) -> bool {
        self.discovery_until.is_some_and(|until| now < until)
    }
}

/// Outcome of an egress check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressDecision {
    pub allowed: bool,
    pub substitute_auth: bool,
    pub discovery: bool,
    pub policy: Option<String>,
    pub reason: String,
}

/// A complete, validated policy set.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    docs: Vec<LoadedPolicy>,
}

fn path_str(path: &[Seg<'_>]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    out
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    line_offset: usize,
}

impl Ctx<'_> {
    fn err(&self, path: &[Seg<'_>], message: impl Into<String>) -> PolicyError {
        PolicyError {
            file: self.file.to_owned(),
            line: locate(self.text, path).map(|l| l + self.line_offset),
            field: path_str(path),
            message: message.into(),
        }
    }
}

/// For errors raised inside buffered (internally tagged) values, serde reports the enclosing
/// entry; when the message names an unknown field, point at that field's own line instead.
fn refine_unknown_field(
    text: &str,
    line: Option<usize>,
    field: &str,
    message: &str,
) -> Option<(usize, String)> {
    let name = message.strip_prefix("unknown field `")?.split('`').next()?;
    let start = line?.checked_sub(1)?;
    let entry_indent = text
        .lines()
        .nth(start)
        .map(|l| l.len() - l.trim_start().len())?;
    for (i, l) in text.lines().enumerate().skip(start + 1) {
        let indent = l.len() - l.trim_start().len();
        let content = l.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if indent <= entry_indent {
            return None;
        }
        if content
            .strip_prefix(name)
            .is_some_and(|r| r.starts_with(':'))
        {
            // Walk back up to the entry, collecting the enclosing keys.
            let lines: Vec<&str> = text.lines().collect();
            let mut parents = Vec::new();
            let mut current = indent;
            for parent in lines[start + 1..i].iter().rev() {
                let p_indent = parent.len() - parent.trim_start().len();
                let p_content = parent.trim_start().trim_start_matches("- ");
                if p_indent < current && !p_content.is_empty() && !p_content.starts_with('#') {
                    if let Some((key, _)) = p_content.split_once(':') {
                        parents.push(key.trim());
                    }
                    current = p_indent;
                }
            }
            parents.reverse();
            parents.push(name);
            let tail = parents.join(".");
            let field = if field.is_empty() {
                tail
            } else {
                format!("{field}.{tail}")
            };
            return Some((i + 1, field));
        }
    }
    None
}

fn yaml_error(
    file: &Path,
    text: &str,
    line_offset: usize,
    err: &serde_yaml_ng::Error,
) -> PolicyError {
    let full = err.to_string();
    // serde_yaml_ng renders "<path>: <message> at line L column C"; split it apart.
    let without_mark = match full.rfind(" at line ") {
        Some(i) => full[..i].to_owned(),
        None => full.clone(),
    };
    let (field, message) = match without_mark.split_once(": ") {
        Some((path, msg)) if !path.contains(' ') => (path.to_owned(), msg.to_owned()),
        _ => (String::new(), without_mark),
    };
    let line = err.location().map(|l| l.line());
    let (line, field) = match refine_unknown_field(text, line, &field, &message) {
        Some((l, f)) => (Some(l), f),
        None => (line, field),
    };
    PolicyError {
        file: file.to_owned(),
        line: line.map(|l| l + line_offset),
        field,
        message,
    }
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn validate_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[expect(
    clippy::too_many_lines,
    reason = "one linear list of checks reads best"
)]
fn validate(
    ctx: &Ctx<'_>,
    doc: &PolicyDocument,
    now: OffsetDateTime,
) -> Result<Option<OffsetDateTime>, PolicyError> {
    use Seg::{Index, Key};
    if doc.api_version != API_VERSION {
        return Err(ctx.err(&[Key("apiVersion")], format!("must be {API_VERSION:?}")));
    }
    if doc.kind != KIND {
        return Err(ctx.err(&[Key("kind")], format!("must be {KIND:?}")));
    }
    if doc.metadata.name.trim().is_empty() {
        return Err(ctx.err(&[Key("metadata"), Key("name")], "must not be empty"));
    }
    let spec = &doc.spec;
    if spec.applies_to.namespaces.is_empty()
        || spec
            .applies_to
            .namespaces
            .iter()
            .any(|n| n.trim().is_empty())
    {
        return Err(ctx.err(
            &[Key("spec"), Key("appliesTo"), Key("namespaces")],
            "must list at least one non-empty namespace",
        ));
    }
    let mut names = BTreeSet::new();
    for (i, c) in spec.credentials.iter().enumerate() {
        let at = |field: &'static str| [Key("spec"), Key("credentials"), Index(i), Key(field)];
        if c.name.is_empty()
            || !c
                .name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        {
            return Err(ctx.err(&at("name"), "must be non-empty [A-Za-z0-9-_.]"));
        }
        if !names.insert(c.name.as_str()) {
            return Err(ctx.err(&at("name"), format!("duplicate credential {:?}", c.name)));
        }
        if let Some(env) = &c.env
            && !is_env_name(env)
        {
            return Err(ctx.err(
                &at("env"),
                "must be an environment variable name [A-Za-z_][A-Za-z0-9_]*",
            ));
        }
        for h in &c.hosts {
            hosts::validate_pattern(h).map_err(|m| ctx.err(&at("hosts"), m))?;
        }
        match c.delivery.mode {
            DeliveryMode::ProxyInjected => {
                if c.hosts.is_empty() {
                    return Err(ctx.err(
                        &at("hosts"),
                        "a proxy-injected credential must be bound to at least one host",
                    ));
                }
                if c.delivery.accepted_reason.is_some() {
                    return Err(ctx.err(
                        &at("delivery"),
                        "acceptedReason only applies to in-container delivery",
                    ));
                }
            }
            DeliveryMode::InContainer => {
                if c.delivery
                    .accepted_reason
                    .as_deref()
                    .is_none_or(|r| r.trim().is_empty())
                {
                    return Err(ctx.err(
                        &at("delivery"),
                        "in-container delivery exposes the real secret to the workload and needs an explicit acceptedReason",
                    ));
                }
                if matches!(
                    c.provider,
                    ProviderSpec::PatPool { .. } | ProviderSpec::GithubApp { .. }
                ) {
                    return Err(ctx.err(
                        &at("delivery"),
                        format!("{} credentials are proxy-injected only", c.provider.kind()),
                    ));
                }
            }
        }
        if let Some(ttl) = c.ttl_seconds
            && (ttl == 0 || ttl > MAX_TTL_SECONDS)
        {
            return Err(ctx.err(
                &at("ttlSeconds"),
                format!("must be between 1 and {MAX_TTL_SECONDS}"),
            ));
        }
        let provider_at = |field: &'static str| {
            [
                Key("spec"),
                Key("credentials"),
                Index(i),
                Key("provider"),
                Key(field),
            ]
        };
        match &c.provider {
            ProviderSpec::UserSecret {
                inject,
                allowed_headers,
                ..
            } => {
                if c.secret.is_none() {
                    return Err(ctx.err(
                        &at("secret"),
                        "user-secret needs a secret source (file or env)",
                    ));
                }
                validate_injection(ctx, inject, &provider_at("inject"))?;
                if let Some(list) = allowed_headers
                    && list.iter().any(|h| !validate_header_name(h))
                {
                    return Err(ctx.err(&provider_at("allowedHeaders"), "invalid header name"));
                }
            }
            ProviderSpec::AnthropicApiKey { allowed_headers } => {
                if c.secret.is_none() {
                    return Err(ctx.err(
                        &at("secret"),
                        "anthropic-api-key needs a secret source (file or env)",
                    ));
                }
                if let Some(list) = allowed_headers
                    && list.iter().any(|h| !validate_header_name(h))
                {
                    return Err(ctx.err(&provider_at("allowedHeaders"), "invalid header name"));
                }
            }
            ProviderSpec::GithubApp {
                app_id,
                installation_id,
                api_base_url,
                ..
            } => {
                if c.secret.is_some() {
                    return Err(ctx.err(
                        &at("secret"),
                        "github-app takes its key from provider.privateKey, not secret",
                    ));
                }
                if *app_id == 0 {
                    return Err(ctx.err(&provider_at("appId"), "must be a GitHub App id"));
                }
                if *installation_id == 0 {
                    return Err(
                        ctx.err(&provider_at("installationId"), "must be an installation id")
                    );
                }
                if let Some(url) = api_base_url {
                    crate::providers::http_client::validate_base_url(url)
                        .map_err(|m| ctx.err(&provider_at("apiBaseUrl"), m))?;
                }
            }
            ProviderSpec::PatPool { inject, secrets } => {
                if c.secret.is_some() {
                    return Err(ctx.err(
                        &at("secret"),
                        "pat-pool takes its tokens from provider.secrets, not secret",
                    ));
                }
                if secrets.is_empty() {
                    return Err(ctx.err(
                        &provider_at("secrets"),
                        "a PAT pool needs at least one token",
                    ));
                }
                validate_injection(ctx, inject, &provider_at("inject"))?;
            }
        }
    }
    for (i, e) in spec.egress.iter().enumerate() {
        let at = |field: &'static str| [Key("spec"), Key("egress"), Index(i), Key(field)];
        if e.hosts.is_empty() {
            return Err(ctx.err(&at("hosts"), "must list at least one host pattern"));
        }
        for h in &e.hosts {
            hosts::validate_pattern(h).map_err(|m| ctx.err(&at("hosts"), m))?;
        }
        if e.ports.is_empty() || e.ports.contains(&0) {
            return Err(ctx.err(&at("ports"), "must list at least one non-zero port"));
        }
    }
    let Some(discovery) = &spec.discovery else {
        return Ok(None);
    };
    let at = [Key("spec"), Key("discovery"), Key("until")];
    let until = OffsetDateTime::parse(&discovery.until, &Rfc3339)
        .map_err(|e| ctx.err(&at, format!("not an RFC 3339 timestamp: {e}")))?;
    if until - now > MAX_DISCOVERY {
        return Err(ctx.err(&at, "a discovery window may last at most 7 days"));
    }
    Ok(Some(until))
}

fn validate_injection(
    ctx: &Ctx<'_>,
    inject: &Injection,
    at: &[Seg<'_>],
) -> Result<(), PolicyError> {
    match inject {
        Injection::Header { name, prefix } => {
            if !validate_header_name(name) {
                return Err(ctx.err(at, format!("invalid header name {name:?}")));
            }
            if prefix.chars().any(char::is_control) {
                return Err(ctx.err(at, "prefix must not contain control characters"));
            }
        }
        Injection::Query { param } => {
            if param.is_empty() {
                return Err(ctx.err(at, "query parameter name must not be empty"));
            }
        }
        Injection::Basic { username } => {
            if username.contains(':') || username.chars().any(char::is_control) {
                return Err(ctx.err(
                    at,
                    "Basic username must not contain ':' or control characters",
                ));
            }
        }
    }
    Ok(())
}

/// Splits a YAML stream into documents, with the line offset of each.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim_end() == "---" {
            out.push((start, std::mem::take(&mut current)));
            start = i + 1;
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    out.push((start, current));
    out.into_iter()
        .filter(|(_, doc)| {
            doc.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

impl Policy {
    /// Parses and validates the documents of one file's text.
    pub fn parse_text(
        file: &Path,
        text: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<LoadedPolicy>, PolicyError> {
        let mut out = Vec::new();
        for (offset, chunk) in split_documents(text) {
            let doc: PolicyDocument = serde_yaml_ng::from_str(&chunk)
                .map_err(|e| yaml_error(file, &chunk, offset, &e))?;
            let ctx = Ctx {
                file,
                text: &chunk,
                line_offset: offset,
            };
            let discovery_until = validate(&ctx, &doc, now)?;
            out.push(LoadedPolicy {
                file: file.to_owned(),
                doc,
                discovery_until,
            });
        }
        Ok(out)
    }

    /// Builds a policy from documents, checking names across documents.
    pub fn from_docs(docs: Vec<LoadedPolicy>) -> Result<Self, PolicyError> {
        let mut policy_names = BTreeSet::new();
        let mut cred_names = BTreeSet::new();
        for d in &docs {
            if !policy_names.insert(d.name().to_owned()) {
                return Err(PolicyError {
                    file: d.file.clone(),
                    line: None,
                    field: "metadata.name".into(),
                    message: format!("policy {:?} is defined twice", d.name()),
                });
            }
            for c in &d.doc.spec.credentials {
                // Credential names key providers and pool slots, so they are global.
                if !cred_names.insert(c.name.clone()) {
                    return Err(PolicyError {
                        file: d.file.clone(),
                        line: None,
                        field: "spec.credentials.name".into(),
                        message: format!(
                            "credential {:?} is defined by more than one policy",
                            c.name
                        ),
                    });
                }
            }
        }
        Ok(Self { docs })
    }

    /// Loads one file or every `*.yaml`/`*.yml` file of a directory.
    pub fn load(path: &Path, now: OffsetDateTime) -> Result<Self, PolicyError> {
        let mut docs = Vec::new();
        for file in policy_files(path)? {
            let text = std::fs::read_to_string(&file).map_err(|e| PolicyError {
                file: file.clone(),
                line: None,
                field: String::new(),
                message: format!("cannot read: {e}"),
            })?;
            docs.extend(Self::parse_text(&file, &text, now)?);
        }
        Self::from_docs(docs)
    }

    /// Loads the policy at `path` and resolves relative secret files against `secrets_dir`.
    pub fn load_with(
        path: &Path,
        secrets_dir: Option<&Path>,
        now: OffsetDateTime,
    ) -> Result<Self, PolicyError> {
        let policy = Self::load(path, now)?;
        match secrets_dir {
            Some(dir) => policy.with_secrets_dir(dir),
            None => Ok(policy),
        }
    }

    /// Resolves every relative secret file (`secret: {file: ...}`, PAT pool entries, GitHub
    /// App keys) against `base`; absolute paths and environment sources are kept. Without it
    /// relative paths are read relative to the broker's working directory.
    ///
    /// A relative path that climbs out of `base` (`..`) is refused: whoever may edit one
    /// policy could otherwise point a credential at any file the broker can read (another
    /// team's secret, the broker's TLS key) and have it injected towards a host of their
    /// choosing. Absolute paths are the operator's explicit choice and are kept.
    pub fn with_secrets_dir(mut self, base: &Path) -> Result<Self, PolicyError> {
        let resolve = |file: &Path, src: &mut SecretSource| -> Result<(), PolicyError> {
            if let SecretSource::File(p) = src
                && p.is_relative()
            {
                if p.components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
                {
                    return Err(PolicyError {
                        file: file.to_path_buf(),
                        line: None,
                        field: "secret.file".into(),
                        message: format!(
                            "{} leaves the secrets directory ({}): use a path inside it or an \
                             absolute one",
                            p.display(),
                            base.display()
                        ),
                    });
                }
                *p = base.join(&*p);
            }
            Ok(())
        };
        for doc in &mut self.docs {
            let file = doc.file.clone();
            for grant in &mut doc.doc.spec.credentials {
                if let Some(src) = grant.secret.as_mut() {
                    resolve(&file, src)?;
                }
                match &mut grant.provider {
                    ProviderSpec::PatPool { secrets, .. } => {
                        for src in secrets {
                            resolve(&file, src)?;
                        }
                    }
                    ProviderSpec::GithubApp { private_key, .. } => resolve(&file, private_key)?,
                    ProviderSpec::UserSecret { .. } | ProviderSpec::AnthropicApiKey { .. } => {}
                }
            }
        }
        Ok(self)
    }

    #[must_use]
    pub fn documents(&self) -> &[LoadedPolicy] {
        &self.docs
    }

    /// Every credential grant, with its policy.
    pub fn credentials(&self) -> impl Iterator<Item = (&LoadedPolicy, &CredentialGrant)> {
        self.docs
            .iter()
            .flat_map(|d| d.doc.spec.credentials.iter().map(move |c| (d, c)))
    }

    /// The grant named `name`, if a policy applying to `run` grants it.
    #[must_use]
    pub fn credential_for(
        &self,
        run: &RunInfo,
        name: &str,
    ) -> Option<(&LoadedPolicy, &CredentialGrant)> {
        self.credentials()
            .find(|(d, c)| c.name == name && d.doc.spec.applies_to.matches(run))
    }

    /// Decides whether `run` may reach `host:port`.
    #[must_use]
    pub fn egress(
        &self,
        run: &RunInfo,
        host: &str,
        port: u16,
        now: OffsetDateTime,
    ) -> EgressDecision {
        self.egress_on(run, host, Some(port), now)
    }

    /// Decides whether `run` may reach `host` on `port`, or with `None` on any port: the
    /// question the proxy's DNS server asks before it answers a name. A grant for the host
    /// on any port allows the name, and so does an active discovery window (which would allow
    /// the connection too). `substitute_auth` is meaningless without a port.
    #[must_use]
    pub fn egress_on(
        &self,
        run: &RunInfo,
        host: &str,
        port: Option<u16>,
        now: OffsetDateTime,
    ) -> EgressDecision {
        let applicable: Vec<&LoadedPolicy> = self
            .docs
            .iter()
            .filter(|d| d.doc.spec.applies_to.matches(run))
            .collect();
        let mut allowed_by: Option<&LoadedPolicy> = None;
        for d in &applicable {
            for grant in &d.doc.spec.egress {
                if grant.matches(host, port) {
                    if grant.substitute_auth {
                        return EgressDecision {
                            allowed: true,
                            substitute_auth: true,
                            discovery: false,
                            policy: Some(d.name().to_owned()),
                            reason: format!("allowed by policy {}", d.name()),
                        };
                    }
                    allowed_by.get_or_insert(d);
                }
            }
        }
        if let Some(d) = allowed_by {
            return EgressDecision {
                allowed: true,
                substitute_auth: false,
                discovery: false,
                policy: Some(d.name().to_owned()),
                reason: format!("allowed by policy {}", d.name()),
            };
        }
        if let Some(d) = applicable.iter().find(|d| d.discovery_active(now)) {
            return EgressDecision {
                allowed: true,
                substitute_auth: false,
                discovery: true,
                policy: Some(d.name().to_owned()),
                reason: format!(
                    "allowed by the discovery window of policy {} (audited)",
                    d.name()
                ),
            };
        }
        EgressDecision {
            allowed: false,
            substitute_auth: false,
            discovery: false,
            policy: None,
            reason: match port {
                Some(port) => format!(
                    "egress to {}:{port} is not granted to run {} by any BrokerPolicy",
                    hosts::normalize(host),
                    run.run
                ),
                None => format!(
                    "egress to {} (any port) is not granted to run {} by any BrokerPolicy",
                    hosts::normalize(host),
                    run.run
                ),
            },
        }
    }
}

fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let io_err = |e: std::io::Error| PolicyError {
        file: path.to_owned(),
        line: None,
        field: String::new(),
        message: format!("cannot read: {e}"),
    };
    let meta = std::fs::metadata(path).map_err(io_err)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io_err)? {
        let p = entry.map_err(io_err)?.path();
        let is_yaml = p.extension().is_some_and(|e| e == "yaml" || e == "yml");
        // Skip editor and Kubernetes ConfigMap dot-files (..data symlink farms).
        let hidden = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if is_yaml && !hidden && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Change detector for the policy path: every file with its mtime and length.
fn signature(path: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    policy_files(path)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let mtime = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map_or(0, |m| m.len());
            (f, mtime, len)
        })
        .collect()
}

/// The active policy, reloaded on change. A broken new policy never replaces a good one.
#[derive(Debug)]
pub struct PolicyStore {
    path: Option<PathBuf>,
    secrets_dir: Option<PathBuf>,
    current: ArcSwap<Policy>,
    last_signature: Mutex<Vec<(PathBuf, Option<SystemTime>, u64)>>,
    last_error: Mutex<Option<PolicyError>>,
}

impl PolicyStore {
    /// Loads the policy at `path`; fails if it is invalid (the broker does not start on a
    /// broken policy).
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        Self::load_with(path, None)
    }

    /// As [`PolicyStore::load`], resolving relative secret files against `secrets_dir` (also
    /// on every reload).
    pub fn load_with(path: &Path, secrets_dir: Option<&Path>) -> Result<Self, PolicyError> {
        let sig = signature(path);
        let policy = Policy::load_with(path, secrets_dir, OffsetDateTime::now_utc())?;
        Ok(Self {
            path: Some(path.to_owned()),
            secrets_dir: secrets_dir.map(Path::to_path_buf),
            current: ArcSwap::from_pointee(policy),
            last_signature: Mutex::new(sig),
            last_error: Mutex::new(None),
        })
    }

    /// A fixed policy (embedded mode, tests); never reloads.
    #[must_use]
    pub fn fixed(policy: Policy) -> Self {
        Self {
            path: None,
            secrets_dir: None,
            current: ArcSwap::from_pointee(policy),
            last_signature: Mutex::new(Vec::new()),
            last_error: Mutex::new(None),
        }
    }

    #[must_use]
    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    /// Replaces the policy (embedded mode).
    pub fn replace(&self, policy: Policy) {
        self.current.store(Arc::new(policy));
    }

    /// The error of the last failed reload, if the newest files are broken.
    #[must_use]
    pub fn last_error(&self) -> Option<PolicyError> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Reloads if any file changed. Returns `Ok(true)` when a new policy became active;
    /// on error the previous policy stays active.
    pub fn reload_if_changed(&self) -> Result<bool, PolicyError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let sig = signature(path);
        {
            let Ok(mut last) = self.last_signature.lock() else {
                return Ok(false);
            };
            if *last == sig {
                return Ok(false);
            }
            *last = sig;
        }
        self.reload()
    }

    /// Reloads unconditionally.
    pub fn reload(&self) -> Result<bool, PolicyError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let result =
            Policy::load_with(path, self.secrets_dir.as_deref(), OffsetDateTime::now_utc());
        let mut last_error = self.last_error.lock().ok();
        match result {
            Ok(policy) => {
                self.current.store(Arc::new(policy));
                if let Some(e) = last_error.as_mut() {
                    **e = None;
                }
                Ok(true)
            }
            Err(e) => {
                if let Some(slot) = last_error.as_mut() {
                    **slot = Some(e.clone());
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests;
