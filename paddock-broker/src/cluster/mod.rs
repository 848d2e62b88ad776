//! Cluster mode: Paddock's Kubernetes objects and the code that watches them.
//!
//! - [`audit`]: the cluster audit sink, writing audit records as `AuditEvent` objects.
//! - [`crd`]: the `BrokerPolicy`, `HarnessRun` and `AuditEvent` custom resources, one module per kind. Their
//!   CRD manifests (`deploy/crds/<kind>.yaml`) are generated from these types
//!   (`cargo xtask crds`); a test fails when the committed YAML differs.
//! - [`reflector`]: the broker's policy source in cluster mode, a watch of `BrokerPolicy`
//!   objects turned into the same [`crate::policy::Policy`] the file source builds.
//!
//! Everything here is tested against recorded API server answers (kube-rs's client over a
//! mock tower service); none of it has run against a real API server (see deploy/README.md).

pub mod audit;
pub mod controller;
pub mod crd;
pub mod reflector;
