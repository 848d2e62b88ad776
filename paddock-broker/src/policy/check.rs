//! Parse, don't validate: a [`PolicyDocument`] becomes a [`LoadedPolicy`] only by passing every
//! check here, and a [`Policy`] only from checked documents whose names do not collide. Nothing
//! outside this module can build either, so code that holds one never re-checks it.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{
    CredentialGrant, EgressGrant, Injection, MAX_DISCOVERY, MAX_TTL_SECONDS, PolicyDocument,
    PolicyError, ProviderSpec, hosts,
    locate::{Seg, locate},
    parse,
};
use crate::{secrets::SecretSource, wire::DeliveryMode};

/// One checked document and where it came from.
#[derive(Clone, Debug)]
pub struct LoadedPolicy {
    file: PathBuf,
    doc: PolicyDocument,
    discovery_until: Option<OffsetDateTime>,
}

impl LoadedPolicy {
    #[must_use]
    pub fn name(&self) -> &str {
        &self.doc.metadata.name
    }

    /// The file the document was read from.
    #[must_use]
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The document as written (with secret files resolved, see [`Policy::with_secrets_dir`]).
    #[must_use]
    pub fn doc(&self) -> &PolicyDocument {
        &self.doc
    }

    /// The end of the discovery window, parsed and capped when the document was checked.
    #[must_use]
    pub fn discovery_until(&self) -> Option<OffsetDateTime> {
        self.discovery_until
    }

    pub(super) fn discovery_active(&self, now: OffsetDateTime) -> bool {
        self.discovery_until.is_some_and(|until| now < until)
    }

    /// Checks one document; `ctx` locates errors in the text it came from.
    fn check(ctx: &Ctx<'_>, doc: PolicyDocument, now: OffsetDateTime) -> Result<Self, PolicyError> {
        check_header(ctx, &doc)?;
        let mut names = BTreeSet::new();
        for (i, c) in doc.spec.credentials.iter().enumerate() {
            check_credential(ctx, i, c, &mut names)?;
        }
        for (i, e) in doc.spec.egress.iter().enumerate() {
            check_egress(ctx, i, e)?;
        }
        let discovery_until = match &doc.spec.discovery {
            Some(discovery) => Some(check_discovery(ctx, &discovery.until, now)?),
            None => None,
        };
        Ok(Self {
            file: ctx.file.to_owned(),
            doc,
            discovery_until,
        })
    }
}

/// A complete, checked policy set.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    docs: Vec<LoadedPolicy>,
}

impl Policy {
    /// Parses and checks the documents of one file's text.
    pub fn parse_text(
        file: &Path,
        text: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<LoadedPolicy>, PolicyError> {
        parse::documents(file, text)?
            .into_iter()
            .map(|parsed| {
                let ctx = Ctx {
                    file,
                    text: &parsed.text,
                    line_offset: parsed.line_offset,
                };
                LoadedPolicy::check(&ctx, parsed.doc, now)
            })
            .collect()
    }

    /// Checks one document that was not read from text (a Kubernetes object): its errors name
    /// `source` and the field, without a line.
    pub fn check_document(
        source: &Path,
        doc: PolicyDocument,
        now: OffsetDateTime,
    ) -> Result<LoadedPolicy, PolicyError> {
        let ctx = Ctx {
            file: source,
            text: "",
            line_offset: 0,
        };
        LoadedPolicy::check(&ctx, doc, now)
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

/// Where a document came from, so an error can name its file, line and field.
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

fn credential_at(i: usize, field: &'static str) -> [Seg<'static>; 4] {
    use Seg::{Index, Key};
    [Key("spec"), Key("credentials"), Index(i), Key(field)]
}

fn provider_at(i: usize, field: &'static str) -> [Seg<'static>; 5] {
    use Seg::{Index, Key};
    [
        Key("spec"),
        Key("credentials"),
        Index(i),
        Key("provider"),
        Key(field),
    ]
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

/// `apiVersion`, `kind`, `metadata.name` and `spec.appliesTo`.
fn check_header(ctx: &Ctx<'_>, doc: &PolicyDocument) -> Result<(), PolicyError> {
    use Seg::Key;
    if doc.api_version != super::API_VERSION {
        return Err(ctx.err(
            &[Key("apiVersion")],
            format!("must be {:?}", super::API_VERSION),
        ));
    }
    if doc.kind != super::KIND {
        return Err(ctx.err(&[Key("kind")], format!("must be {:?}", super::KIND)));
    }
    if doc.metadata.name.trim().is_empty() {
        return Err(ctx.err(&[Key("metadata"), Key("name")], "must not be empty"));
    }
    let namespaces = &doc.spec.applies_to.namespaces;
    if namespaces.is_empty() || namespaces.iter().any(|n| n.trim().is_empty()) {
        return Err(ctx.err(
            &[Key("spec"), Key("appliesTo"), Key("namespaces")],
            "must list at least one non-empty namespace",
        ));
    }
    Ok(())
}

/// One credential grant: its name, environment variable, hosts, delivery, lifetime and
/// provider. `names` collects the document's credential names, which must be distinct.
fn check_credential<'d>(
    ctx: &Ctx<'_>,
    i: usize,
    c: &'d CredentialGrant,
    names: &mut BTreeSet<&'d str>,
) -> Result<(), PolicyError> {
    let at = |field| credential_at(i, field);
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
    check_delivery(ctx, i, c)?;
    if let Some(ttl) = c.ttl_seconds
        && (ttl == 0 || ttl > MAX_TTL_SECONDS)
    {
        return Err(ctx.err(
            &at("ttlSeconds"),
            format!("must be between 1 and {MAX_TTL_SECONDS}"),
        ));
    }
    check_provider(ctx, i, c)
}

/// Proxy-injected credentials are bound to hosts; in-container ones expose the secret and
/// need a stated reason.
fn check_delivery(ctx: &Ctx<'_>, i: usize, c: &CredentialGrant) -> Result<(), PolicyError> {
    let at = |field| credential_at(i, field);
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
    Ok(())
}

/// The provider's own settings and where it takes its secret from.
fn check_provider(ctx: &Ctx<'_>, i: usize, c: &CredentialGrant) -> Result<(), PolicyError> {
    let at = |field| credential_at(i, field);
    let provider_at = |field| provider_at(i, field);
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
            check_injection(ctx, inject, &provider_at("inject"))?;
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
                return Err(ctx.err(&provider_at("installationId"), "must be an installation id"));
            }
            if let Some(url) = api_base_url {
                crate::base_url::validate_base_url(url)
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
            check_injection(ctx, inject, &provider_at("inject"))?;
        }
    }
    Ok(())
}

fn check_injection(ctx: &Ctx<'_>, inject: &Injection, at: &[Seg<'_>]) -> Result<(), PolicyError> {
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

fn check_egress(ctx: &Ctx<'_>, i: usize, e: &EgressGrant) -> Result<(), PolicyError> {
    use Seg::{Index, Key};
    let at = |field| [Key("spec"), Key("egress"), Index(i), Key(field)];
    if e.hosts.is_empty() {
        return Err(ctx.err(&at("hosts"), "must list at least one host pattern"));
    }
    for h in &e.hosts {
        hosts::validate_pattern(h).map_err(|m| ctx.err(&at("hosts"), m))?;
    }
    if e.ports.is_empty() || e.ports.contains(&0) {
        return Err(ctx.err(&at("ports"), "must list at least one non-zero port"));
    }
    if e.passthrough && e.substitute_auth {
        return Err(ctx.err(
            &at("passthrough"),
            "a passthrough grant cannot also substitute (its TLS is not terminated)",
        ));
    }
    Ok(())
}

/// Parses the window's end once, here, and caps it relative to `now`.
fn check_discovery(
    ctx: &Ctx<'_>,
    until: &str,
    now: OffsetDateTime,
) -> Result<OffsetDateTime, PolicyError> {
    use Seg::Key;
    let at = [Key("spec"), Key("discovery"), Key("until")];
    let until = OffsetDateTime::parse(until, &Rfc3339)
        .map_err(|e| ctx.err(&at, format!("not an RFC 3339 timestamp: {e}")))?;
    if until - now > MAX_DISCOVERY {
        return Err(ctx.err(&at, "a discovery window may last at most 7 days"));
    }
    Ok(until)
}
