//! `BrokerPolicy` (`paddock.dev/v1`, namespaced): today's policy document as a Kubernetes
//! object. Its spec is [`crate::policy::PolicySpec`] itself (the derive sits on that type), so
//! files and objects share one schema and one set of checks.

pub use crate::policy::BrokerPolicy;
