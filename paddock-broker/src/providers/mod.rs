//! Credential providers: how a grant's real secret is issued and substituted.
//!
//! Providers are built from the current policy grant on every use, so a policy reload takes
//! effect immediately and there is no provider state to drift from the policy.

pub mod github_app;
pub mod http_client;

use std::{collections::BTreeSet, sync::Arc};

use crate::{
    policy::{CredentialGrant, Injection, ProviderSpec},
    secrets::{Secret, SecretError, SecretSource},
    wire::{BasicAuth, DeliveryMode, Header, LeaseInfo, QueryParam, SubstituteAuthResponse},
};

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("secret unavailable: {0}")]
    Secret(#[from] SecretError),
    #[error("provider misconfigured: {0}")]
    Misconfigured(String),
    #[error("provider back-end unavailable: {0}")]
    Backend(String),
}

/// State shared by providers across requests (providers themselves are rebuilt per use).
#[derive(Debug, Default, Clone)]
pub struct ProviderContext {
    pub github: Arc<github_app::GithubTokens>,
}

/// Where a placeholder was found on the intercepted request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Inside a header value (header name lowercase).
    Header(String),
    /// As the username or password of `Authorization: Basic`.
    Basic { username: String },
    /// As the value of a query parameter.
    Query(String),
}

/// Headers that frame or route the request and are never stripped by an allow-list.
const TRANSPORT_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "transfer-encoding",
    "te",
    "connection",
    "accept",
    "accept-encoding",
    "user-agent",
];

/// Headers an Anthropic-style API accepts when no allow-list is configured.
const ANTHROPIC_DEFAULT_HEADERS: &[&str] = &[
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
    "anthropic-dangerous-direct-browser-access",
];

pub trait Provider: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> &'static str;

    /// Size of the pool when leases hold exclusive slots.
    fn pool_size(&self) -> Option<u32> {
        None
    }

    /// Checks the secret is available at issue time; returns it for in-container delivery.
    fn issue(
        &self,
        delivery: DeliveryMode,
        slot: Option<u32>,
    ) -> Result<Option<Secret>, ProviderError>;

    /// Checks the lease can still be served (secret readable).
    fn renew(&self, lease: &LeaseInfo) -> Result<(), ProviderError>;

    /// Releases provider-side state (pool slots are released by the store).
    fn revoke(&self, lease: &LeaseInfo) -> Result<(), ProviderError>;

    /// Computes the edits that replace the placeholder with the real secret.
    fn substitute(
        &self,
        lease: &LeaseInfo,
        headers: &[Header],
        query_names: &[String],
        found: &[Placement],
    ) -> Result<SubstituteAuthResponse, ProviderError>;
}

/// Builds the provider for a grant.
#[must_use]
pub fn for_grant(grant: &CredentialGrant, ctx: &ProviderContext) -> Box<dyn Provider> {
    match &grant.provider {
        ProviderSpec::GithubApp {
            app_id,
            installation_id,
            private_key,
            api_base_url,
            repositories,
            ca_file,
        } => Box::new(github_app::GithubApp {
            config: github_app::GithubAppConfig {
                app_id: *app_id,
                installation_id: *installation_id,
                private_key: private_key.clone(),
                api_base_url: api_base_url
                    .clone()
                    .unwrap_or_else(|| github_app::DEFAULT_API_BASE.to_owned()),
                repositories: repositories.clone(),
                ca_file: ca_file.clone(),
            },
            tokens: ctx.github.clone(),
        }),
        ProviderSpec::UserSecret {
            inject,
            allowed_headers,
            allowed_query,
        } => Box::new(UserSecret {
            secret: grant.secret.clone(),
            inject: inject.clone(),
            allowed_headers: allowed_headers.clone(),
            allowed_query: allowed_query.clone(),
        }),
        ProviderSpec::AnthropicApiKey { allowed_headers } => Box::new(AnthropicApiKey {
            secret: grant.secret.clone(),
            allowed_headers: allowed_headers.clone().unwrap_or_else(|| {
                ANTHROPIC_DEFAULT_HEADERS
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect()
            }),
        }),
        ProviderSpec::PatPool { inject, secrets } => Box::new(PatPool {
            inject: inject.clone(),
            secrets: secrets.clone(),
        }),
    }
}

#[derive(Debug)]
struct UserSecret {
    secret: Option<SecretSource>,
    inject: Injection,
    allowed_headers: Option<Vec<String>>,
    allowed_query: Option<Vec<String>>,
}

#[derive(Debug)]
struct AnthropicApiKey {
    secret: Option<SecretSource>,
    allowed_headers: Vec<String>,
}

#[derive(Debug)]
struct PatPool {
    inject: Injection,
    secrets: Vec<SecretSource>,
}

/// Issue for providers backed by one secret: check it is readable now (fail at issue time, not
/// at the first request), and hand it out only for in-container delivery.
fn issue_single(
    source: Option<&SecretSource>,
    delivery: DeliveryMode,
) -> Result<Option<Secret>, ProviderError> {
    let secret = read(source)?;
    Ok((delivery == DeliveryMode::InContainer).then_some(secret))
}

fn read(source: Option<&SecretSource>) -> Result<Secret, ProviderError> {
    source
        .ok_or_else(|| ProviderError::Misconfigured("no secret source".into()))?
        .read()
        .map_err(Into::into)
}

impl Provider for UserSecret {
    fn kind(&self) -> &'static str {
        "user-secret"
    }
    fn issue(
        &self,
        delivery: DeliveryMode,
        _slot: Option<u32>,
    ) -> Result<Option<Secret>, ProviderError> {
        issue_single(self.secret.as_ref(), delivery)
    }
    fn renew(&self, _lease: &LeaseInfo) -> Result<(), ProviderError> {
        read(self.secret.as_ref()).map(drop)
    }
    fn revoke(&self, _lease: &LeaseInfo) -> Result<(), ProviderError> {
        Ok(())
    }
    fn substitute(
        &self,
        _lease: &LeaseInfo,
        headers: &[Header],
        query_names: &[String],
        found: &[Placement],
    ) -> Result<SubstituteAuthResponse, ProviderError> {
        let secret = read(self.secret.as_ref())?;
        let mut out = inject(&self.inject, &secret, found);
        if let Some(allowed) = &self.allowed_headers {
            apply_header_allow_list(&mut out, headers, allowed);
        }
        if let Some(allowed) = &self.allowed_query {
            apply_query_allow_list(&mut out, query_names, allowed);
        }
        Ok(out)
    }
}

impl Provider for AnthropicApiKey {
    fn kind(&self) -> &'static str {
        "anthropic-api-key"
    }
    fn issue(
        &self,
        delivery: DeliveryMode,
        _slot: Option<u32>,
    ) -> Result<Option<Secret>, ProviderError> {
        issue_single(self.secret.as_ref(), delivery)
    }
    fn renew(&self, _lease: &LeaseInfo) -> Result<(), ProviderError> {
        read(self.secret.as_ref()).map(drop)
    }
    fn revoke(&self, _lease: &LeaseInfo) -> Result<(), ProviderError> {
        Ok(())
    }
    fn substitute(
        &self,
        _lease: &LeaseInfo,
        headers: &[Header],
        _query_names: &[String],
        found: &[Placement],
    ) -> Result<SubstituteAuthResponse, ProviderError> {
        let secret = read(self.secret.as_ref())?;
        let injection = Injection::Header {
            name: "x-api-key".into(),
            prefix: String::new(),
        };
        let mut out = inject(&injection, &secret, found);
        // The real key travels only in x-api-key: any other Authorization is dropped.
        if headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("authorization"))
        {
            push_unique(&mut out.remove_headers, "authorization");
        }
        apply_header_allow_list(&mut out, headers, &self.allowed_headers);
        Ok(out)
    }
}

impl PatPool {
    fn slot_secret(&self, slot: Option<u32>) -> Result<Secret, ProviderError> {
        let slot = slot
            .ok_or_else(|| ProviderError::Misconfigured("pat-pool lease without a slot".into()))?;
        let source = usize::try_from(slot)
            .ok()
            .and_then(|i| self.secrets.get(i))
            .ok_or_else(|| {
                ProviderError::Misconfigured(format!("pool slot {slot} no longer exists"))
            })?;
        source.read().map_err(Into::into)
    }
}

impl Provider for PatPool {
    fn kind(&self) -> &'static str {
        "pat-pool"
    }
    fn pool_size(&self) -> Option<u32> {
        Some(u32::try_from(self.secrets.len()).unwrap_or(u32::MAX))
    }
    fn issue(
        &self,
        _delivery: DeliveryMode,
        slot: Option<u32>,
    ) -> Result<Option<Secret>, ProviderError> {
        // Pools are proxy-injected only (policy validation); just check the slot is usable.
        self.slot_secret(slot).map(|_| None)
    }
    fn renew(&self, lease: &LeaseInfo) -> Result<(), ProviderError> {
        self.slot_secret(lease.pool_slot).map(drop)
    }
    fn revoke(&self, _lease: &LeaseInfo) -> Result<(), ProviderError> {
        Ok(())
    }
    fn substitute(
        &self,
        lease: &LeaseInfo,
        _headers: &[Header],
        _query_names: &[String],
        found: &[Placement],
    ) -> Result<SubstituteAuthResponse, ProviderError> {
        let secret = self.slot_secret(lease.pool_slot)?;
        Ok(inject(&self.inject, &secret, found))
    }
}

fn push_unique(list: &mut Vec<String>, name: &str) {
    if !list.iter().any(|n| n.eq_ignore_ascii_case(name)) {
        list.push(name.to_owned());
    }
}

/// Puts the secret where the grant says and removes the placeholder from everywhere else,
/// so a placeholder never reaches the upstream.
fn inject(injection: &Injection, secret: &Secret, found: &[Placement]) -> SubstituteAuthResponse {
    let mut out = SubstituteAuthResponse {
        matched: true,
        secrets: vec![secret.expose().to_owned()],
        ..SubstituteAuthResponse::default()
    };
    let target_header = match injection {
        Injection::Header { name, prefix } => {
            out.set_headers.push(Header {
                name: name.to_ascii_lowercase(),
                value: format!("{prefix}{}", secret.expose()),
            });
            Some(name.to_ascii_lowercase())
        }
        Injection::Basic { username } => {
            out.basic_auth = Some(BasicAuth {
                username: username.clone(),
                password: secret.expose().to_owned(),
            });
            Some("authorization".to_owned())
        }
        Injection::Query { param } => {
            out.set_query.push(QueryParam {
                name: param.clone(),
                value: secret.expose().to_owned(),
            });
            None
        }
    };
    let target_query = match injection {
        Injection::Query { param } => Some(param.as_str()),
        _ => None,
    };
    for place in found {
        match place {
            Placement::Header(name) if target_header.as_deref() != Some(name.as_str()) => {
                push_unique(&mut out.remove_headers, name);
            }
            Placement::Basic { .. } if target_header.as_deref() != Some("authorization") => {
                push_unique(&mut out.remove_headers, "authorization");
            }
            Placement::Query(name) if target_query != Some(name.as_str()) => {
                push_unique(&mut out.remove_query, name);
            }
            _ => {}
        }
    }
    out
}

fn apply_header_allow_list(
    out: &mut SubstituteAuthResponse,
    headers: &[Header],
    allowed: &[String],
) {
    let allowed: BTreeSet<String> = allowed
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .chain(TRANSPORT_HEADERS.iter().map(|h| (*h).to_owned()))
        .chain(out.set_headers.iter().map(|h| h.name.to_ascii_lowercase()))
        .chain(out.basic_auth.as_ref().map(|_| "authorization".to_owned()))
        .collect();
    for h in headers {
        let name = h.name.to_ascii_lowercase();
        if !allowed.contains(&name) {
            push_unique(&mut out.remove_headers, &name);
        }
    }
}

fn apply_query_allow_list(out: &mut SubstituteAuthResponse, names: &[String], allowed: &[String]) {
    let set: Vec<&str> = out.set_query.iter().map(|q| q.name.as_str()).collect();
    let mut removals = Vec::new();
    for name in names {
        if !allowed.contains(name) && !set.contains(&name.as_str()) {
            removals.push(name.clone());
        }
    }
    for name in removals {
        if !out.remove_query.contains(&name) {
            out.remove_query.push(name);
        }
    }
}

/// Decodes `Authorization: Basic` into (username, password), as the proxy does
/// ([`paddock_wire::codec::basic`]: padded or not).
#[must_use]
pub fn decode_basic(value: &str) -> Option<(String, String)> {
    paddock_wire::codec::basic::decode(value.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_file(dir: &tempfile::TempDir, name: &str, value: &str) -> SecretSource {
        let p = dir.path().join(name);
        std::fs::write(&p, value).expect("write");
        SecretSource::File(p)
    }

    fn lease(slot: Option<u32>) -> LeaseInfo {
        LeaseInfo {
            lease_id: "l".into(),
            run: "r".into(),
            namespace: "n".into(),
            credential: "c".into(),
            provider: "x".into(),
            delivery: DeliveryMode::ProxyInjected,
            hosts: vec![],
            pool_slot: slot,
            issued_at: 0,
            expires_at: 0,
            revoked: false,
        }
    }

    fn hdr(name: &str, value: &str) -> Header {
        Header {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn user_secret_query_injection_removes_other_placeholders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = UserSecret {
            secret: Some(secret_file(&dir, "s", "REAL")),
            inject: Injection::Query {
                param: "key".into(),
            },
            allowed_headers: None,
            allowed_query: Some(vec!["q".into()]),
        };
        let found = vec![
            Placement::Query("key".into()),
            Placement::Header("x-token".into()),
        ];
        let out = p
            .substitute(
                &lease(None),
                &[hdr("X-Token", "pdk")],
                &["key".into(), "q".into(), "debug".into()],
                &found,
            )
            .expect("substitute");
        assert_eq!(
            out.set_query,
            vec![QueryParam {
                name: "key".into(),
                value: "REAL".into()
            }]
        );
        assert_eq!(out.remove_headers, vec!["x-token".to_owned()]);
        assert_eq!(out.remove_query, vec!["debug".to_owned()]);
    }

    #[test]
    fn anthropic_swaps_into_x_api_key_and_filters_headers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = AnthropicApiKey {
            secret: Some(secret_file(&dir, "s", "sk-ant-real")),
            allowed_headers: ANTHROPIC_DEFAULT_HEADERS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        };
        let headers = [
            hdr("x-api-key", "pdk-..."),
            hdr("anthropic-version", "1"),
            hdr("cookie", "a"),
            hdr("Content-Type", "j"),
        ];
        let out = p
            .substitute(
                &lease(None),
                &headers,
                &[],
                &[Placement::Header("x-api-key".into())],
            )
            .expect("ok");
        assert_eq!(out.set_headers, vec![hdr("x-api-key", "sk-ant-real")]);
        assert_eq!(out.remove_headers, vec!["cookie".to_owned()]);
    }

    #[test]
    fn pat_pool_uses_the_slot_secret_as_basic_auth() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = PatPool {
            inject: Injection::Basic {
                username: "x-access-token".into(),
            },
            secrets: vec![
                secret_file(&dir, "a", "pat-a"),
                secret_file(&dir, "b", "pat-b"),
            ],
        };
        assert_eq!(p.pool_size(), Some(2));
        let out = p
            .substitute(
                &lease(Some(1)),
                &[],
                &[],
                &[Placement::Basic {
                    username: "git".into(),
                }],
            )
            .expect("ok");
        assert_eq!(
            out.basic_auth.map(|b| (b.username, b.password)),
            Some(("x-access-token".into(), "pat-b".into()))
        );
        assert!(
            out.remove_headers.is_empty(),
            "Authorization is replaced, not removed"
        );
        assert!(
            p.substitute(&lease(Some(5)), &[], &[], &[]).is_err(),
            "unknown slot fails closed"
        );
        assert!(p.substitute(&lease(None), &[], &[], &[]).is_err());
    }

    #[test]
    fn basic_decoding() {
        let v = paddock_wire::codec::basic::encode("git", "pdk-x");
        assert_eq!(decode_basic(&v), Some(("git".into(), "pdk-x".into())));
        // Unpadded, as some clients send it: decoded the same as the proxy decodes it.
        assert_eq!(
            decode_basic("Basic Z2l0OnBkay14"),
            Some(("git".into(), "pdk-x".into()))
        );
        assert_eq!(decode_basic("Bearer abc"), None);
        assert_eq!(decode_basic("Basic !!!"), None);
    }
}
