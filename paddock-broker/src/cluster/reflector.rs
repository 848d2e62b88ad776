//! The broker's policy source in cluster mode: a watch of `BrokerPolicy` objects.
//!
//! Every change to the set of objects rebuilds the [`Policy`] from all of them and hands it to
//! a [`PolicyTarget`] (the broker, which then takes back every grant made under the old
//! policy, exactly as a file reload does), so a change reaches new and open connections as
//! fast as the watch delivers it. Until the first complete list arrives the policy is empty:
//! everything is denied.
//!
//! Each object is checked on its own and fails closed on its own: an invalid object (a
//! failed check, a credential name another object already uses, a namespace it may not
//! grant to) contributes nothing and is logged with the reason; the other objects stay. An
//! object that becomes invalid is dropped, not kept at its last good version: the version that
//! passed no longer exists.
//!
//! Who may write a `BrokerPolicy` is who may grant: namespaced objects are confined to their
//! own namespace. Outside the admin namespace (the broker's own) a policy must apply only to
//! its own namespace, reads secrets only from files under `<secretsDir>/<namespace>/` (no
//! absolute paths, no `..`, no environment variables: those would let a namespace's author
//! read any file or variable the broker can read and inject it towards a host of their
//! choosing), and names no CA file. Policies in the admin namespace are trusted like policy
//! files.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
};

use futures_util::StreamExt as _;
use kube::{
    Api, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use time::OffsetDateTime;

use super::crd::BrokerPolicy;
use crate::{
    policy::{
        API_VERSION, KIND, LoadedPolicy, Metadata, Policy, PolicyDocument, PolicyError,
        PolicyStore, ProviderSpec,
    },
    secrets::SecretSource,
};

/// How `BrokerPolicy` objects become policy.
#[derive(Clone, Debug)]
pub struct ClusterPolicyOptions {
    /// The namespace whose policies may apply to any namespace and name any secret source
    /// (the broker's own).
    pub admin_namespace: String,
    /// Base of relative secret files; namespaced policies read under `<dir>/<namespace>/`.
    pub secrets_dir: PathBuf,
}

/// Where a rebuilt policy goes.
pub trait PolicyTarget: Send + Sync + 'static {
    /// Makes `policy` the active one. May block (the broker waits for proxies to drop grants
    /// made under the old policy).
    fn replace(&self, policy: Policy);
    /// The active policy.
    fn current(&self) -> Arc<Policy>;
    /// The first complete list arrived (and its policy, if different, was made active).
    fn synced(&self) {}
}

impl PolicyTarget for PolicyStore {
    fn replace(&self, policy: Policy) {
        PolicyStore::replace(self, policy);
    }

    fn current(&self) -> Arc<Policy> {
        PolicyStore::current(self)
    }

    fn synced(&self) {
        self.mark_synced();
    }
}

impl PolicyTarget for crate::Broker {
    fn replace(&self, policy: Policy) {
        self.replace_policy(policy);
    }

    fn current(&self) -> Arc<Policy> {
        self.policy().current()
    }

    fn synced(&self) {
        self.policy().mark_synced();
    }
}

/// An object's key: `namespace/name`.
fn key(obj: &BrokerPolicy) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

fn rejected(source: &Path, field: &str, message: String) -> PolicyError {
    PolicyError {
        file: source.to_owned(),
        line: None,
        field: field.to_owned(),
        message,
    }
}

/// Checks one object and turns it into a policy document named `namespace/name`.
pub fn convert(
    obj: &BrokerPolicy,
    options: &ClusterPolicyOptions,
    now: OffsetDateTime,
) -> Result<LoadedPolicy, PolicyError> {
    let source = PathBuf::from(format!("BrokerPolicy/{}", key(obj)));
    let Some(namespace) = obj.namespace().filter(|n| !n.is_empty()) else {
        return Err(rejected(&source, "metadata.namespace", "missing".into()));
    };
    let admin = namespace == options.admin_namespace;
    let spec = obj.spec.clone();
    if !admin {
        if let Some(other) = spec.applies_to.namespaces.iter().find(|n| **n != namespace) {
            return Err(rejected(
                &source,
                "spec.appliesTo.namespaces",
                format!(
                    "a policy in namespace {namespace} applies only to {namespace}, not to \
                     {other} (only policies in {} may name other namespaces)",
                    options.admin_namespace
                ),
            ));
        }
        confine_secrets(&source, &spec.credentials, &namespace)?;
    }
    let doc = PolicyDocument {
        api_version: API_VERSION.to_owned(),
        kind: KIND.to_owned(),
        metadata: Metadata { name: key(obj) },
        spec,
    };
    let checked = Policy::check_document(&source, doc, now)?;
    let base = if admin {
        options.secrets_dir.clone()
    } else {
        options.secrets_dir.join(&namespace)
    };
    let resolved = Policy::from_docs(vec![checked])?.with_secrets_dir(&base)?;
    resolved
        .documents()
        .first()
        .cloned()
        .ok_or_else(|| rejected(&source, "", "no document".into()))
}

/// A namespaced policy reads only relative files (resolved under its namespace's directory).
fn confine_secrets(
    source: &Path,
    grants: &[crate::policy::CredentialGrant],
    namespace: &str,
) -> Result<(), PolicyError> {
    for (i, grant) in grants.iter().enumerate() {
        let mut sources: Vec<&SecretSource> = grant.secret.iter().collect();
        match &grant.provider {
            ProviderSpec::PatPool { secrets, .. } => sources.extend(secrets),
            ProviderSpec::GithubApp {
                private_key,
                ca_file,
                ..
            } => {
                sources.push(private_key);
                if ca_file.is_some() {
                    return Err(rejected(
                        source,
                        &format!("spec.credentials[{i}].provider.caFile"),
                        format!("only policies outside namespace {namespace} may name a CA file"),
                    ));
                }
            }
            ProviderSpec::UserSecret { .. } | ProviderSpec::AnthropicApiKey { .. } => {}
        }
        for s in sources {
            match s {
                SecretSource::Env(_) => {
                    return Err(rejected(
                        source,
                        &format!("spec.credentials[{i}]"),
                        "a namespaced policy cannot read the broker's environment: use a file \
                         under the namespace's secrets directory"
                            .into(),
                    ));
                }
                SecretSource::File(p) if !p.is_relative() => {
                    return Err(rejected(
                        source,
                        &format!("spec.credentials[{i}]"),
                        format!(
                            "{} is absolute: a namespaced policy names files relative to its \
                             namespace's secrets directory",
                            p.display()
                        ),
                    ));
                }
                SecretSource::File(_) => {}
            }
        }
    }
    Ok(())
}

/// The policy built from `objects`, and the objects rejected (key, reason). Objects are taken
/// oldest first, so a credential name claimed twice stays with the object that had it first.
pub fn build(
    objects: &[BrokerPolicy],
    options: &ClusterPolicyOptions,
    now: OffsetDateTime,
) -> (Policy, Vec<(String, PolicyError)>) {
    let mut ordered: Vec<&BrokerPolicy> = objects.iter().collect();
    ordered.sort_by_key(|o| (o.metadata.creation_timestamp.clone(), key(o)));
    let mut docs: Vec<LoadedPolicy> = Vec::new();
    let mut credentials = BTreeSet::new();
    let mut problems = Vec::new();
    for obj in ordered {
        let loaded = match convert(obj, options, now) {
            Ok(l) => l,
            Err(e) => {
                problems.push((key(obj), e));
                continue;
            }
        };
        let names: Vec<&str> = loaded
            .doc()
            .spec
            .credentials
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        if let Some(taken) = names.iter().find(|n| credentials.contains(**n)) {
            problems.push((
                key(obj),
                rejected(
                    loaded.file(),
                    "spec.credentials.name",
                    format!("credential {taken:?} is defined by an older policy"),
                ),
            ));
            continue;
        }
        credentials.extend(names.iter().map(|n| (*n).to_owned()));
        docs.push(loaded);
    }
    // Names are `namespace/name` (unique per object) and credentials were checked above.
    let policy = Policy::from_docs(docs).unwrap_or_default();
    (policy, problems)
}

fn same(a: &Policy, b: &Policy) -> bool {
    a.documents().len() == b.documents().len()
        && a.documents()
            .iter()
            .zip(b.documents())
            .all(|(x, y)| x.doc() == y.doc())
}

/// Watches `BrokerPolicy` objects through `api` and keeps `target` on the policy they make
/// until `stop` completes.
pub async fn run(
    api: Api<BrokerPolicy>,
    options: ClusterPolicyOptions,
    target: Arc<dyn PolicyTarget>,
    stop: impl Future<Output = ()>,
) {
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    tokio::pin!(stream);
    tokio::pin!(stop);
    let mut objects: BTreeMap<String, BrokerPolicy> = BTreeMap::new();
    let mut listing: BTreeMap<String, BrokerPolicy> = BTreeMap::new();
    let mut synced = false;
    let mut announced = false;
    let mut reported: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let event = tokio::select! {
            () = &mut stop => return,
            e = stream.next() => e,
        };
        let Some(event) = event else {
            tracing::error!("BrokerPolicy watch ended");
            return;
        };
        match event {
            Ok(Event::Init) => listing.clear(),
            Ok(Event::InitApply(obj)) => {
                listing.insert(key(&obj), obj);
            }
            Ok(Event::InitDone) => {
                objects = std::mem::take(&mut listing);
                synced = true;
                tracing::info!(objects = objects.len(), "BrokerPolicy list in sync");
            }
            Ok(Event::Apply(obj)) => {
                objects.insert(key(&obj), obj);
            }
            Ok(Event::Delete(obj)) => {
                objects.remove(&key(&obj));
            }
            Err(e) => {
                tracing::warn!(error = %e, "BrokerPolicy watch failed; retrying (the active policy stays)");
                continue;
            }
        }
        if !synced {
            continue;
        }
        let all: Vec<BrokerPolicy> = objects.values().cloned().collect();
        let (policy, problems) = build(&all, &options, OffsetDateTime::now_utc());
        // Log each rejection once per object version, not on every unrelated change.
        let mut still = BTreeMap::new();
        for (k, e) in problems {
            let version = objects
                .get(&k)
                .and_then(kube::ResourceExt::resource_version)
                .unwrap_or_default();
            if reported.get(&k) != Some(&version) {
                tracing::error!(policy = %k, error = %e, "BrokerPolicy rejected; it grants nothing");
            }
            still.insert(k, version);
        }
        reported = still;
        if !same(&policy, &target.current()) {
            let docs = policy.documents().len();
            let t = Arc::clone(&target);
            match tokio::task::spawn_blocking(move || t.replace(policy)).await {
                Ok(()) => {
                    tracing::info!(policies = docs, "policy from BrokerPolicy objects active");
                }
                Err(e) => {
                    tracing::error!(error = %e, "policy replacement task failed");
                    continue;
                }
            }
        }
        // Only once the first list's policy is the active one: readiness waits for this.
        if !announced {
            target.synced();
            announced = true;
        }
    }
}
