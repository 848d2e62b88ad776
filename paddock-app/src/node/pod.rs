//! What the node agent is told about a pod, checked before anything is done with it.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use paddock_proxy::pod_cgroup::PodUid;

/// Longest run id, namespace or pod name accepted (Kubernetes names are at most 253).
const MAX_NAME: usize = 253;

/// An agent pod on this node: who it is, which run it is, where its network namespace is and
/// which resolver its DNS may go to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    pub uid: PodUid,
    pub namespace: String,
    pub name: String,
    /// The run the pod is (its `paddock.dev/run` label): every decision, placeholder, lease
    /// and audit record of the pod's connections is this run's.
    pub run: String,
    /// The pod's network namespace (`/var/run/netns/cni-...` from the CNI call, or
    /// `/proc/<pid>/ns/net`).
    pub netns: PathBuf,
    /// The resolvers the pod's DNS may go to (cluster DNS from its `resolv.conf`); at most one
    /// per family. Empty: no DNS at all.
    #[serde(default)]
    pub nameservers: Vec<IpAddr>,
    /// The port of the run's interactive adapter on the pod's loopback (the pod's
    /// `paddock.dev/adapter-port` annotation, which the controller sets from the run's
    /// `spec.interactive.adapterPort`); `None`: not an interactive run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_port: Option<u16>,
    /// Shells may be opened in the pod (its `paddock.dev/shell: "true"` annotation, from the
    /// run's `spec.interactive.shell`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shell: bool,
}

/// A pod the node agent cannot take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodSpecError {
    #[error("{field} must be 1 to {MAX_NAME} characters of [A-Za-z0-9._-]")]
    BadName { field: &'static str },
    #[error("netns must be an absolute path without `..` (got {0:?})")]
    BadNetns(PathBuf),
    #[error("at most one nameserver per address family (got {0:?})")]
    TooManyNameservers(Vec<IpAddr>),
}

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl PodSpec {
    /// Checks every field; the UID was checked when it was parsed.
    pub fn validate(&self) -> Result<(), PodSpecError> {
        for (field, value) in [
            ("namespace", &self.namespace),
            ("name", &self.name),
            ("run", &self.run),
        ] {
            if !name_ok(value) {
                return Err(PodSpecError::BadName { field });
            }
        }
        if !self.netns.is_absolute()
            || self
                .netns
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(PodSpecError::BadNetns(self.netns.clone()));
        }
        let v4 = self.nameservers.iter().filter(|a| a.is_ipv4()).count();
        if v4 > 1 || self.nameservers.len() - v4 > 1 {
            return Err(PodSpecError::TooManyNameservers(self.nameservers.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> PodSpec {
        PodSpec {
            uid: PodUid::parse("5f2a1c3e-8b7d-4e6f-9a0b-1c2d3e4f5a6b").expect("uid"),
            namespace: "team-a".into(),
            name: "agent-0".into(),
            run: "run-a".into(),
            netns: "/var/run/netns/cni-1234".into(),
            nameservers: vec!["10.96.0.10".parse().expect("ip")],
            adapter_port: Some(8765),
            shell: false,
        }
    }

    #[test]
    fn a_good_spec_passes_and_round_trips() {
        let s = spec();
        s.validate().expect("valid");
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(serde_json::from_str::<PodSpec>(&json).expect("parse"), s);
    }

    #[test]
    fn bad_fields_are_refused() {
        let mut s = spec();
        s.run = "run a".into();
        assert_eq!(s.validate(), Err(PodSpecError::BadName { field: "run" }));
        let mut s = spec();
        s.namespace = String::new();
        assert_eq!(
            s.validate(),
            Err(PodSpecError::BadName { field: "namespace" })
        );
        let mut s = spec();
        s.netns = "netns/x".into();
        assert!(matches!(s.validate(), Err(PodSpecError::BadNetns(_))));
        let mut s = spec();
        s.netns = "/var/run/netns/../../etc".into();
        assert!(matches!(s.validate(), Err(PodSpecError::BadNetns(_))));
        let mut s = spec();
        s.nameservers = vec![
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        ];
        assert!(matches!(
            s.validate(),
            Err(PodSpecError::TooManyNameservers(_))
        ));
        // A UID that is not a UUID does not even parse.
        let json = serde_json::to_string(&spec())
            .expect("json")
            .replace("5f2a1c3e-8b7d", "../../..-8b7d");
        assert!(serde_json::from_str::<PodSpec>(&json).is_err());
    }
}
