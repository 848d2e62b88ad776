//! The policy document as written: the serde schema of a `BrokerPolicy`.
//!
//! These types say what a document may contain, not whether its values make sense: a
//! [`PolicyDocument`] is only ever used after [`super::LoadedPolicy`] checked it.

use serde::{Deserialize, Serialize};

use super::DEFAULT_TTL_SECONDS;
use crate::{secrets::SecretSource, wire::DeliveryMode};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyDocument {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    // Enums are written as one-key maps (`secret: {file: /path}`), not YAML tags.
    pub spec: PolicySpec,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
}

// In cluster mode the spec of a `BrokerPolicy` object is this same type: one schema for files
// and objects (the CRD's YAML is generated from it, see `crate::kube::crd`).
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource, schemars::JsonSchema),
    kube(
        group = "paddock.dev",
        version = "v1",
        kind = "BrokerPolicy",
        namespaced,
        shortname = "bpol",
        doc = "Which credentials and which egress the runs it applies to get.",
        printcolumn = r#"{"name": "Namespaces", "type": "string", "jsonPath": ".spec.appliesTo.namespaces"}"#,
        printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
    )
)]
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
    /// Interactive runs this policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interactive: Option<InteractivePolicy>,
}

/// What a policy says about the interactive runs it applies to.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InteractivePolicy {
    /// End a run (through its adapter's `/end`) once nobody has been attached and nothing was
    /// prompted for this many seconds. With several policies the shortest wins; without any,
    /// the broker's own setting (`interactive.idleTimeoutSecs`) applies.
    #[serde(default)]
    pub idle_timeout_secs: Option<std::num::NonZeroU64>,
}

/// Which runs a policy applies to. `namespaces` is required; empty `templates`/`runs` mean any.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppliesTo {
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub templates: Vec<String>,
    #[serde(default)]
    pub runs: Vec<String>,
}

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialGrant {
    pub name: String,
    #[cfg_attr(feature = "kube", schemars(schema_with = "provider_schema"))]
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

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delivery {
    #[cfg_attr(feature = "kube", schemars(schema_with = "delivery_mode_schema"))]
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
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
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
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
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

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressGrant {
    pub hosts: Vec<String>,
    pub ports: Vec<u16>,
    #[serde(default)]
    pub substitute_auth: bool,
    /// Let TLS to these hosts through without terminating it (no substitution, no
    /// per-request audit): for registries and other hosts that need no credential. Only when
    /// every grant listing the destination says so; never with `substituteAuth`.
    #[serde(default)]
    pub passthrough: bool,
}

/// A time-boxed window during which unlisted egress is allowed and audited.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Discovery {
    /// RFC 3339 end of the window; at most 7 days after the policy is loaded.
    pub until: String,
}

/// `DeliveryMode` lives in `paddock-wire`, which does not depend on schemars.
#[cfg(feature = "kube")]
fn delivery_mode_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": ["proxy-injected", "in-container"],
    })
}

/// `ProviderSpec` as one object: `kind` plus every variant's fields. The derived schema (one
/// `oneOf` branch per kind, each with its own `kind` constant) is not structural, and kube's
/// rewriter refuses to merge the differing `kind` constants. Generated from the enum's own
/// schema, so a new variant or field shows up here without editing; the broker's checks (not
/// the API server) then refuse fields that do not belong to the kind, as for files.
#[cfg(feature = "kube")]
fn provider_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut settings = schemars::generate::SchemaSettings::openapi3();
    settings.inline_subschemas = true;
    let root = settings
        .into_generator()
        .into_root_schema_for::<ProviderSpec>();
    let mut properties = serde_json::Map::new();
    let mut kinds = Vec::new();
    let branches = root
        .get("oneOf")
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default();
    for branch in branches {
        let Some(props) = branch
            .get("properties")
            .and_then(serde_json::Value::as_object)
        else {
            continue;
        };
        for (name, schema) in props {
            if name == "kind" {
                let values = schema
                    .get("enum")
                    .and_then(serde_json::Value::as_array)
                    .cloned()
                    .or_else(|| schema.get("const").map(|c| vec![c.clone()]))
                    .unwrap_or_default();
                kinds.extend(values);
            } else {
                properties
                    .entry(name.clone())
                    .or_insert_with(|| schema.clone());
            }
        }
    }
    properties.insert(
        "kind".into(),
        serde_json::json!({"type": "string", "enum": kinds}),
    );
    schemars::json_schema!({
        "type": "object",
        "description": "The provider: `kind` and that kind's fields.",
        "properties": properties,
        "required": ["kind"],
    })
}
