//! Paddock's custom resources (group `paddock.dev`, version `v1`), one module per kind.

pub mod audit_event;
pub mod broker_policy;
pub mod harness_run;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt as _;

pub use audit_event::{AuditEvent, AuditEventSpec};
pub use broker_policy::BrokerPolicy;
pub use harness_run::{HarnessRun, HarnessRunSpec, HarnessRunStatus};

/// Every CRD Paddock defines, with the file it is committed as under `deploy/crds/`.
#[must_use]
pub fn all() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("brokerpolicy.yaml", BrokerPolicy::crd()),
        ("harnessrun.yaml", HarnessRun::crd()),
        ("auditevent.yaml", AuditEvent::crd()),
    ]
}

/// The schema of a field that holds a Kubernetes object the API server already validates
/// elsewhere (a pod template): kept as is rather than copying its several-thousand-line schema
/// into the CRD.
pub(crate) fn preserve_unknown_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}
