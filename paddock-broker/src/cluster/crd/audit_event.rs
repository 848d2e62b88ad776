//! `AuditEvent` (`paddock.dev/v1`, namespaced): one broker audit record as a Kubernetes
//! object, written by the broker's cluster audit sink ([`crate::cluster::audit`]) into the
//! run's namespace. The spec is the JSONL record's fields and nothing more: identifiers only,
//! never a secret, a placeholder or a bearer.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::audit::AuditKind;

#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "paddock.dev",
    version = "v1",
    kind = "AuditEvent",
    namespaced,
    shortname = "pdkaudit",
    doc = "One broker audit record: what was issued, renewed, revoked or refused, for which run and caller. Identifiers only.",
    printcolumn = r#"{"name": "Event", "type": "string", "jsonPath": ".spec.event"}"#,
    printcolumn = r#"{"name": "Run", "type": "string", "jsonPath": ".spec.run"}"#,
    printcolumn = r#"{"name": "Caller", "type": "string", "jsonPath": ".spec.caller"}"#,
    printcolumn = r#"{"name": "Credential", "type": "string", "jsonPath": ".spec.credential"}"#,
    printcolumn = r#"{"name": "Host", "type": "string", "jsonPath": ".spec.host"}"#,
    printcolumn = r#"{"name": "Time", "type": "date", "jsonPath": ".spec.time"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditEventSpec {
    /// When the broker recorded the event (RFC 3339, UTC).
    pub time: String,
    pub event: AuditKind,
    /// The authenticated caller's identity (key id, service account).
    pub caller: String,
    /// The run's namespace, as the broker knows it (the object lives there when it is a valid
    /// namespace name, else in the sink's default namespace).
    pub namespace: String,
    /// The run's identifier at the broker (a `HarnessRun`'s UID).
    pub run: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Lease expiry, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The node an intermediate CA was issued to or refused for (`node-ca-*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The issued intermediate's serial number (hex; a certificate identifier, not a key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

impl From<&crate::audit::AuditEvent> for AuditEventSpec {
    fn from(e: &crate::audit::AuditEvent) -> Self {
        // Field by field (no `..`): a field added to the record must be decided on here.
        let crate::audit::AuditEvent {
            ts,
            event,
            caller,
            namespace,
            run,
            credential,
            provider,
            lease_id,
            policy,
            host,
            port,
            expires_at,
            reason,
            node,
            serial,
        } = e;
        Self {
            time: ts.clone(),
            event: *event,
            caller: caller.clone(),
            namespace: namespace.clone(),
            run: run.clone(),
            credential: credential.clone(),
            provider: provider.clone(),
            lease_id: lease_id.clone(),
            policy: policy.clone(),
            host: host.clone(),
            port: *port,
            expires_at: *expires_at,
            reason: reason.clone(),
            node: node.clone(),
            serial: serial.clone(),
        }
    }
}
