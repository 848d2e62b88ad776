//! `HarnessRun` (`paddock.dev/v1`, namespaced): one agent run. The controller registers it
//! with the broker, issues its credentials into a Secret, creates its agent pod from
//! `spec.podTemplate` (labelled for the node agent, credentials as environment variables, the
//! trust bundle mounted) and reports what happened in `status` and as Events.
//!
//! The controller creates the pod rather than adopting one: the node agent decides at the
//! pod's CNI step whether to intercept it, from its run label, so a pod labelled after it
//! started would already be running unintercepted.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "paddock.dev",
    version = "v1",
    kind = "HarnessRun",
    namespaced,
    status = "HarnessRunStatus",
    shortname = "hrun",
    doc = "One agent run: its pod, the credentials it gets and what became of them.",
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Node", "type": "string", "jsonPath": ".status.node"}"#,
    printcolumn = r#"{"name": "Leases", "type": "integer", "jsonPath": ".status.leaseCount"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HarnessRunSpec {
    /// The harness template the run is an instance of; `BrokerPolicy` objects select runs by
    /// namespace, template (`appliesTo.templates`) and run name.
    pub template: String,
    /// Credentials (grant names of the policies that apply) to issue before the pod starts.
    /// The broker refuses a credential no applying policy grants.
    #[serde(default)]
    pub credentials: Vec<CredentialRequest>,
    /// The agent pod. The controller adds the run label, the credential environment variables
    /// and the trust bundle; `restartPolicy` is forced to `Never` (a run ends once).
    #[schemars(schema_with = "super::preserve_unknown_object")]
    pub pod_template: PodTemplateSpec,
    /// An interactive run: people drive it through the broker (prompts, attach, shell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interactive: Option<InteractiveSpec>,
}

/// How the broker reaches an interactive run's adapter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InteractiveSpec {
    /// The port of the adapter on the agent pod's loopback (`127.0.0.1`). The controller
    /// writes it into the pod's `paddock.dev/adapter-port` annotation, where the node agent
    /// reads it; nothing listens on the pod network for it.
    #[schemars(range(min = 1, max = 65535))]
    pub adapter_port: u16,
    /// Allow shells in the run's pod (`paddock-broker shell`, scope `broker:shell`), on nodes
    /// whose node agent allows them (`[pods] shells`). Written as `paddock.dev/shell: "true"`.
    #[serde(default)]
    pub shell: bool,
}

/// One credential the run asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialRequest {
    /// The credential grant's name.
    pub name: String,
    /// The environment variable that carries its placeholder (or, for in-container delivery,
    /// its value) into the agent container(s).
    pub env: String,
}

/// What the controller last saw and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HarnessRunStatus {
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Cancelled` (deleted before it ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The run's identifier at the broker and the value of its pod's run label (the object's
    /// UID, so a run recreated under the same name is a new run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Credentials issued into the run's Secret (names, never values).
    #[serde(default)]
    pub credentials: Vec<IssuedCredential>,
    /// Leases the broker holds for the run (revoked ones excluded).
    #[serde(default)]
    pub lease_count: u32,
    /// The Secret holding the placeholders and the trust bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// The agent pod and the node it was scheduled on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The broker's answer to the last refused issue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_denial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A `metav1.Condition`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One issued credential, as the status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCredential {
    pub name: String,
    pub lease_id: String,
    /// The environment variable that carries it.
    pub env: String,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
}
