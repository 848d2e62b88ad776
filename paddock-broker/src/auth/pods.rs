//! Where a run's pod runs, as the Kubernetes API server says: the basis of node-agent
//! authority.
//!
//! A node agent (one privileged process per node serving every agent pod there) holds the
//! `broker:node-agent` scope and a token bound to its own node; it names the run in each call.
//! The broker lets it act for that run only when the run's pod is scheduled to that same
//! node. The caller's node comes from the `TokenReview` answer, the pod's node from
//! `GET /api/v1/namespaces/{ns}/pods?labelSelector=paddock.dev/run={run}` here: neither from
//! the node agent's word.
//!
//! A pod's node never changes over its life, so a located pod is remembered briefly
//! (`podCacheTtl`); a pod deleted and recreated on another node is seen after at most that
//! long. Nothing else is cached: a pending pod, a missing pod or an unreachable API server is
//! asked again on the next call, and an unreachable API server is a denial, never an allow.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Deserialize;
use url::Url;

use super::{
    fetch::{FetchError, JsonClient},
    names,
    token_file::TokenFile,
};

/// The pod label that names a pod's run.
pub const RUN_LABEL: &str = "paddock.dev/run";

/// The pod of one run, as the API server listed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNode {
    pub pod: String,
    pub uid: String,
    /// `spec.nodeName`.
    pub node: String,
}

/// Why a run's pod could not be placed on a node. Only [`PlacementError::Unavailable`] is
/// the API server failing; every other variant is a definite answer that denies.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no running pod is labelled {RUN_LABEL}={run} in namespace {namespace}")]
    NoPod { namespace: String, run: String },
    #[error(
        "{count} running pods are labelled {RUN_LABEL}={run} in namespace {namespace}; \
         exactly one is required"
    )]
    ManyPods {
        namespace: String,
        run: String,
        count: usize,
    },
    #[error("pod {pod} of run {run} is not scheduled to a node yet")]
    NotScheduled { pod: String, run: String },
    #[error("run {run} in namespace {namespace} cannot name a pod (not a valid label value)")]
    InvalidName { namespace: String, run: String },
    #[error("the API server's pod list is not usable: {0}")]
    BadAnswer(String),
    #[error("node agents need auth.tokenReview (the broker looks pods up with it)")]
    NotConfigured,
    #[error("pod lookup unavailable: {0}")]
    Unavailable(String),
}

/// What the server looked up for one request of a node agent: where the pod of `run` (in
/// `namespace`, the run's registered namespace) runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunPlacement {
    pub run: String,
    pub namespace: String,
    pub outcome: Result<PodNode, PlacementError>,
}

/// Lists a run's pod through the API server, with the `TokenReview` backend's API server, CA
/// and token.
pub struct PodLocator {
    base: Url,
    client: JsonClient,
    token: Arc<TokenFile>,
    ttl: Duration,
    cache: quick_cache::sync::Cache<(String, String), (PodNode, Instant)>,
}

impl std::fmt::Debug for PodLocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodLocator")
            .field("api_server", &self.base.as_str())
            .field("token", &self.token)
            .field("ttl", &self.ttl)
            .field("cached_pods", &self.cache.len())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Deserialize)]
struct Pod {
    #[serde(default)]
    metadata: PodMeta,
    #[serde(default)]
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Deserialize, Default)]
struct PodMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    node_name: Option<String>,
}

#[derive(Deserialize, Default)]
struct PodStatus {
    #[serde(default)]
    phase: Option<String>,
}

impl PodLocator {
    pub(super) fn new(
        base: Url,
        client: JsonClient,
        token: Arc<TokenFile>,
        ttl: Duration,
        capacity: usize,
    ) -> Self {
        Self {
            base,
            client,
            token,
            ttl,
            cache: quick_cache::sync::Cache::new(capacity),
        }
    }

    /// The node of the one live pod labelled `paddock.dev/run=<run>` in `namespace`.
    pub async fn locate(&self, namespace: &str, run: &str) -> Result<PodNode, PlacementError> {
        // Both go into a URL: only names that cannot carry a separator or an escape.
        if !names::is_namespace(namespace) || !names::is_label_value(run) {
            return Err(PlacementError::InvalidName {
                namespace: namespace.to_owned(),
                run: run.to_owned(),
            });
        }
        let key = (namespace.to_owned(), run.to_owned());
        if let Some((pod, at)) = self.cache.get(&key) {
            if at.elapsed() < self.ttl {
                return Ok(pod);
            }
            self.cache.remove(&key);
        }
        let pod = self.list(namespace, run).await?;
        if !self.ttl.is_zero() {
            self.cache.insert(key, (pod.clone(), Instant::now()));
        }
        Ok(pod)
    }

    fn url(&self, namespace: &str, run: &str) -> Result<Url, PlacementError> {
        let mut base = self.base.clone();
        if !base.path().ends_with('/') {
            let with_slash = format!("{}/", base.path());
            base.set_path(&with_slash);
        }
        let mut url = base
            .join(&format!("api/v1/namespaces/{namespace}/pods"))
            .map_err(|e| PlacementError::Unavailable(format!("pod list URL: {e}")))?;
        url.query_pairs_mut()
            .clear()
            .append_pair("labelSelector", &format!("{RUN_LABEL}={run}"));
        Ok(url)
    }

    async fn list(&self, namespace: &str, run: &str) -> Result<PodNode, PlacementError> {
        let url = self.url(namespace, run)?;
        let own_token = self
            .token
            .read()
            .map_err(|e| PlacementError::Unavailable(format!("broker token: {e}")))?;
        let list: PodList = self
            .client
            .get_json_with_bearer(&url, &own_token)
            .await
            .map_err(|e| match e {
                FetchError::Status {
                    status: 401 | 403, ..
                } => PlacementError::Unavailable(format!(
                    "the API server refused the broker's own credentials ({e}); it needs \
                     `list` on pods"
                )),
                other => PlacementError::Unavailable(other.to_string()),
            })?;
        select_pod(namespace, run, list.items)
    }
}

/// The one live pod of `run` among the listed ones, and its node. The label is checked again
/// here so an answer that ignored the selector cannot place another run's pod.
fn select_pod(namespace: &str, run: &str, items: Vec<Pod>) -> Result<PodNode, PlacementError> {
    let mut live: Vec<Pod> = items
        .into_iter()
        .filter(|p| p.metadata.labels.get(RUN_LABEL).map(String::as_str) == Some(run))
        .filter(|p| !matches!(p.status.phase.as_deref(), Some("Succeeded" | "Failed")))
        .collect();
    let pod = match live.len() {
        0 => {
            return Err(PlacementError::NoPod {
                namespace: namespace.to_owned(),
                run: run.to_owned(),
            });
        }
        1 => live.swap_remove(0),
        count => {
            return Err(PlacementError::ManyPods {
                namespace: namespace.to_owned(),
                run: run.to_owned(),
                count,
            });
        }
    };
    if !names::is_service_account(&pod.metadata.name) || pod.metadata.uid.is_empty() {
        return Err(PlacementError::BadAnswer(
            "a pod without a valid name or uid".to_owned(),
        ));
    }
    let node = match pod.spec.node_name {
        Some(node) if !node.is_empty() => node,
        _ => {
            return Err(PlacementError::NotScheduled {
                pod: pod.metadata.name,
                run: run.to_owned(),
            });
        }
    };
    if !names::is_node_name(&node) {
        return Err(PlacementError::BadAnswer(format!(
            "pod {} has an invalid nodeName",
            pod.metadata.name
        )));
    }
    Ok(PodNode {
        pod: pod.metadata.name,
        uid: pod.metadata.uid,
        node,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(json: &str) -> Vec<Pod> {
        serde_json::from_str::<PodList>(json)
            .expect("pod list")
            .items
    }

    fn pod(name: &str, run: &str, node: Option<&str>, phase: &str) -> String {
        serde_json::json!({
            "metadata": {"name": name, "uid": format!("uid-{name}"),
                         "labels": {RUN_LABEL: run}},
            "spec": {"nodeName": node},
            "status": {"phase": phase},
        })
        .to_string()
    }

    #[test]
    fn exactly_one_live_scheduled_pod_is_placed() {
        let one = format!(
            r#"{{"items":[{},{}]}}"#,
            pod("a", "r1", Some("node-a"), "Running"),
            pod("old", "r1", Some("node-b"), "Succeeded")
        );
        assert_eq!(
            select_pod("ns", "r1", pods(&one)),
            Ok(PodNode {
                pod: "a".into(),
                uid: "uid-a".into(),
                node: "node-a".into()
            })
        );
        let two = format!(
            r#"{{"items":[{},{}]}}"#,
            pod("a", "r1", Some("node-a"), "Running"),
            pod("b", "r1", Some("node-b"), "Pending")
        );
        assert!(matches!(
            select_pod("ns", "r1", pods(&two)),
            Err(PlacementError::ManyPods { count: 2, .. })
        ));
        assert!(matches!(
            select_pod("ns", "r1", pods(r#"{"items":[]}"#)),
            Err(PlacementError::NoPod { .. })
        ));
        let pending = format!(r#"{{"items":[{}]}}"#, pod("a", "r1", None, "Pending"));
        assert!(matches!(
            select_pod("ns", "r1", pods(&pending)),
            Err(PlacementError::NotScheduled { .. })
        ));
        // An answer that ignored the selector places nothing of another run.
        let other = format!(
            r#"{{"items":[{}]}}"#,
            pod("x", "r2", Some("node-a"), "Running")
        );
        assert!(matches!(
            select_pod("ns", "r1", pods(&other)),
            Err(PlacementError::NoPod { .. })
        ));
        let bad_node = format!(
            r#"{{"items":[{}]}}"#,
            pod("a", "r1", Some("node/../a"), "Running")
        );
        assert!(matches!(
            select_pod("ns", "r1", pods(&bad_node)),
            Err(PlacementError::BadAnswer(_))
        ));
    }
}
