//! The cluster audit sink (`audit.kubernetes` in `broker.yaml`): every audit record is also
//! written as an [`AuditEvent`] object in its run's namespace, and the operation that caused
//! it is answered only once the API server has created that object.
//!
//! Shape: [`channel`] gives a [`KubeAuditSink`] (the [`AuditSink`] the broker calls, from its
//! blocking pool) and a [`KubeAuditWriter`] (an async task on the server's runtime). A record
//! goes through a bounded queue to the writer, which creates objects concurrently, at most
//! `maxConcurrent` at once; the caller blocks until its own object is created. Everything that
//! keeps a record from the API server fails the caller's operation (`AuditUnavailable`, 503),
//! as a failing file does: a full queue (at once, without waiting), an API error (500, 409,
//! 403, ...), no answer within `timeoutSeconds`, a writer that is not running.
//!
//! A record whose caller stopped waiting (and answered 503) before the writer reached it is
//! not written: its operation was refused. One whose create was already under way may still be
//! created; the cluster, like the file, may hold records of operations answered 503, never
//! miss one that was performed.
//!
//! Names and retention: objects are named by `generateName` (`<event>-xxxxx`), labelled with
//! the run (`paddock.dev/run`, when the run id is a valid label value) and the event
//! (`paddock.dev/audit-event`), and, with `ownedByRun`, owned by their `HarnessRun` (looked up
//! by UID in the run's namespace, cached) so that they are deleted with it. Records of runs
//! that are no `HarnessRun` (agent hosts registered by hand) or written after their run was
//! gone have no owner and stay until deleted by label. The owner reference sets neither
//! `controller` nor `blockOwnerDeletion` (the latter would need update rights on
//! `harnessruns/finalizers`, which the broker does not get).

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc as std_mpsc,
    },
    time::{Duration, Instant},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{
    Api, Resource as _, ResourceExt as _,
    api::{ListParams, PostParams},
};
use tokio::sync::{Semaphore, mpsc};

use crate::{
    audit::{AuditError, AuditEvent as Record, AuditSink},
    auth::names,
    cluster::crd::{AuditEvent, AuditEventSpec, HarnessRun},
    metrics::AuditKubernetesMetrics,
};

/// The label naming the run a record belongs to (as on the run's pod).
pub const RUN_LABEL: &str = "paddock.dev/run";
/// The label naming the record's event kind (`credential-issued`, ...).
pub const EVENT_LABEL: &str = "paddock.dev/audit-event";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// How long "this run is no `HarnessRun` in its namespace" is believed before asking again.
const NEGATIVE_TTL: Duration = Duration::from_mins(1);
/// Owner cache entries kept before the cache starts over.
const MAX_OWNERS: usize = 4096;

/// The writer's settings (`audit.kubernetes`, checked by the config).
#[derive(Clone, Debug)]
pub struct Settings {
    pub default_namespace: String,
    pub queue: usize,
    pub max_concurrent: usize,
    /// The caller's wait for its record, and the bound on one create.
    pub timeout: Duration,
    pub owned_by_run: bool,
}

/// The object for one record: named by the API server (`generateName`), in the run's
/// namespace (or `default_namespace` when the record's is no namespace name).
#[must_use]
pub fn object(
    record: &Record,
    default_namespace: &str,
    owner: Option<OwnerReference>,
) -> AuditEvent {
    let namespace = if names::is_namespace(&record.namespace) {
        record.namespace.clone()
    } else {
        default_namespace.to_owned()
    };
    let mut labels = BTreeMap::from([
        (EVENT_LABEL.to_owned(), record.event.name().to_owned()),
        (MANAGED_BY.to_owned(), "paddock-broker".to_owned()),
    ]);
    if names::is_label_value(&record.run) {
        labels.insert(RUN_LABEL.to_owned(), record.run.clone());
    }
    let mut obj = AuditEvent::new("", AuditEventSpec::from(record));
    obj.metadata = ObjectMeta {
        generate_name: Some(format!("{}-", record.event.name())),
        namespace: Some(namespace),
        labels: Some(labels),
        owner_references: owner.map(|o| vec![o]),
        ..ObjectMeta::default()
    };
    obj
}

/// One record on its way; dropping it (answered or not) leaves the pending count.
struct Job {
    record: Record,
    reply: std_mpsc::SyncSender<Result<(), String>>,
    /// Set by the caller when it stopped waiting (its operation was answered 503).
    abandoned: Arc<AtomicBool>,
    metrics: AuditKubernetesMetrics,
}

impl Drop for Job {
    fn drop(&mut self) {
        self.metrics.pending.dec();
    }
}

/// The broker's side: queues a record and waits for its object. Call [`AuditSink::record`]
/// from a blocking thread (the broker's operations run on the blocking pool), never from the
/// runtime thread that drives the writer.
#[derive(Debug)]
pub struct KubeAuditSink {
    queue: mpsc::Sender<Job>,
    timeout: Duration,
    metrics: AuditKubernetesMetrics,
}

/// The writer task's side: run it with [`KubeAuditWriter::run`] before the broker serves.
pub struct KubeAuditWriter {
    queue: mpsc::Receiver<Job>,
    settings: Settings,
    metrics: AuditKubernetesMetrics,
}

impl std::fmt::Debug for KubeAuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAuditWriter")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("event", &self.record.event)
            .finish_non_exhaustive()
    }
}

/// A sink and its writer, joined by a queue of `settings.queue` records.
#[must_use]
pub fn channel(
    settings: Settings,
    metrics: AuditKubernetesMetrics,
) -> (KubeAuditSink, KubeAuditWriter) {
    let (tx, rx) = mpsc::channel(settings.queue.max(1));
    (
        KubeAuditSink {
            queue: tx,
            timeout: settings.timeout,
            metrics: metrics.clone(),
        },
        KubeAuditWriter {
            queue: rx,
            settings,
            metrics,
        },
    )
}

fn unavailable(why: &str) -> AuditError {
    AuditError::Unavailable(format!("cluster audit sink: {why}"))
}

impl AuditSink for KubeAuditSink {
    fn record(&self, event: &Record) -> Result<(), AuditError> {
        let (reply, answer) = std_mpsc::sync_channel(1);
        let abandoned = Arc::new(AtomicBool::new(false));
        self.metrics.pending.inc();
        let job = Job {
            record: event.clone(),
            reply,
            abandoned: Arc::clone(&abandoned),
            metrics: self.metrics.clone(),
        };
        if let Err(e) = self.queue.try_send(job) {
            let (reason, why) = match e {
                mpsc::error::TrySendError::Full(_) => ("queue-full", "queue full"),
                mpsc::error::TrySendError::Closed(_) => ("stopped", "writer not running"),
            };
            self.metrics.fail(reason);
            return Err(unavailable(why));
        }
        self.metrics.queued.inc();
        match answer.recv_timeout(self.timeout) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(unavailable(&why)),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                abandoned.store(true, Ordering::SeqCst);
                self.metrics.fail("wait-timeout");
                Err(unavailable("no answer in time"))
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                self.metrics.fail("stopped");
                Err(unavailable("writer stopped"))
            }
        }
    }
}

/// (namespace, run UID).
type OwnerKey = (String, String);

/// What is known of a run's `HarnessRun`.
#[derive(Clone, Debug)]
enum Owner {
    Named(String),
    /// No such run when last asked, at that instant.
    Absent(Instant),
}

/// `HarnessRun` names by (namespace, UID).
#[derive(Debug, Default)]
struct Owners(Mutex<HashMap<OwnerKey, Owner>>);

impl Owners {
    /// `None`: not known (or no longer believed); ask the API server.
    fn cached(&self, key: &OwnerKey) -> Option<Owner> {
        let map = self.0.lock().ok()?;
        match map.get(key)? {
            Owner::Absent(at) if at.elapsed() >= NEGATIVE_TTL => None,
            known => Some(known.clone()),
        }
    }

    /// Lists the namespace's runs (metadata only) and remembers them all.
    async fn ask(&self, client: &kube::Client, key: &OwnerKey) -> Option<String> {
        let api = Api::<HarnessRun>::namespaced(client.clone(), &key.0);
        let list = match api.list_metadata(&ListParams::default()).await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(error = %e, namespace = %key.0, "HarnessRun lookup for an audit record's owner failed");
                return None;
            }
        };
        let mut map = self.0.lock().ok()?;
        if map.len() >= MAX_OWNERS {
            map.clear();
        }
        for r in &list.items {
            if let Some(uid) = r.uid() {
                map.insert((key.0.clone(), uid), Owner::Named(r.name_any()));
            }
        }
        if let Some(Owner::Named(name)) = map.get(key) {
            return Some(name.clone());
        }
        map.insert(key.clone(), Owner::Absent(Instant::now()));
        None
    }

    /// The owner reference of `run`'s `HarnessRun`, if there is one. A failed lookup writes
    /// the record without an owner rather than failing it: the record is what must not be
    /// lost; an ownerless record is only kept longer.
    async fn lookup(
        &self,
        client: &kube::Client,
        namespace: &str,
        run: &str,
    ) -> Option<OwnerReference> {
        if !names::is_namespace(namespace) {
            return None;
        }
        let key = (namespace.to_owned(), run.to_owned());
        let name = match self.cached(&key) {
            Some(Owner::Named(name)) => name,
            Some(Owner::Absent(_)) => return None,
            None => self.ask(client, &key).await?,
        };
        Some(OwnerReference {
            api_version: HarnessRun::api_version(&()).into_owned(),
            kind: HarnessRun::kind(&()).into_owned(),
            name,
            uid: run.to_owned(),
            controller: None,
            block_owner_deletion: None,
        })
    }
}

/// What each create needs.
struct Writer {
    client: kube::Client,
    settings: Settings,
    metrics: AuditKubernetesMetrics,
    owners: Owners,
}

impl Writer {
    async fn create(&self, record: &Record) -> Result<(), kube::Error> {
        let owner = if self.settings.owned_by_run {
            self.owners
                .lookup(&self.client, &record.namespace, &record.run)
                .await
        } else {
            None
        };
        let obj = object(record, &self.settings.default_namespace, owner);
        let namespace = obj.metadata.namespace.clone().unwrap_or_default();
        Api::<AuditEvent>::namespaced(self.client.clone(), &namespace)
            .create(&PostParams::default(), &obj)
            .await?;
        Ok(())
    }

    async fn write(&self, job: Job) {
        if job.abandoned.load(Ordering::SeqCst) {
            // Its caller already answered 503: the operation was not performed.
            return;
        }
        let answer = match tokio::time::timeout(self.settings.timeout, self.create(&job.record))
            .await
        {
            Ok(Ok(())) => {
                self.metrics.written.inc();
                Ok(())
            }
            Ok(Err(e)) => {
                self.metrics.fail("api");
                tracing::error!(error = %e, event = job.record.event.name(), "AuditEvent create failed");
                Err(format!("AuditEvent create failed: {e}"))
            }
            Err(_) => {
                self.metrics.fail("timeout");
                tracing::error!(
                    event = job.record.event.name(),
                    "AuditEvent create timed out"
                );
                Err("AuditEvent create timed out".to_owned())
            }
        };
        // The caller may have stopped waiting; nothing to tell it then.
        let _ = job.reply.send(answer);
    }
}

impl KubeAuditWriter {
    /// Writes records until `stop` completes, then refuses what is still queued (those callers
    /// get 503 at once, not at their timeout) and gives the creates under way up to one
    /// timeout to finish.
    pub async fn run(mut self, client: kube::Client, stop: impl Future<Output = ()>) {
        let permits = Arc::new(Semaphore::new(self.settings.max_concurrent.max(1)));
        let writer = Arc::new(Writer {
            client,
            settings: self.settings.clone(),
            metrics: self.metrics.clone(),
            owners: Owners::default(),
        });
        let mut tasks = tokio::task::JoinSet::new();
        tokio::pin!(stop);
        loop {
            // A permit first, then a record: the backlog waits in the bounded queue, where a
            // full queue refuses new records, rather than in unbounded tasks.
            let permit = tokio::select! {
                p = Arc::clone(&permits).acquire_owned() => p,
                () = &mut stop => break,
            };
            let Ok(permit) = permit else { break };
            let job = tokio::select! {
                j = self.queue.recv() => j,
                () = &mut stop => break,
            };
            let Some(job) = job else { break };
            while tasks.try_join_next().is_some() {}
            let writer = Arc::clone(&writer);
            tasks.spawn(async move {
                writer.write(job).await;
                drop(permit);
            });
        }
        self.queue.close();
        while let Ok(job) = self.queue.try_recv() {
            self.metrics.fail("stopped");
            let _ = job.reply.send(Err("broker shutting down".to_owned()));
        }
        let _ = tokio::time::timeout(self.settings.timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditKind;

    fn record() -> Record {
        let mut r = Record::new(
            AuditKind::CredentialIssued,
            "system:serviceaccount:paddock-system:paddock-controller",
            "team",
            "6b1d0c2a-1111-4222-8333-000000000001",
        );
        r.credential = Some("api-token".into());
        r.lease_id = Some("lease-1".into());
        r
    }

    #[test]
    fn object_is_named_by_the_server_labelled_and_in_the_run_namespace() {
        let r = record();
        let obj = object(&r, "paddock-system", None);
        assert_eq!(obj.metadata.name, None);
        assert_eq!(
            obj.metadata.generate_name.as_deref(),
            Some("credential-issued-")
        );
        assert_eq!(obj.metadata.namespace.as_deref(), Some("team"));
        let labels = obj.metadata.labels.expect("labels");
        assert_eq!(labels[RUN_LABEL], "6b1d0c2a-1111-4222-8333-000000000001");
        assert_eq!(labels[EVENT_LABEL], "credential-issued");
        assert_eq!(obj.spec.credential.as_deref(), Some("api-token"));
        assert_eq!(obj.spec.time, r.ts);
    }

    #[test]
    fn odd_namespaces_and_run_ids_fall_back() {
        let mut r = record();
        r.namespace = "Not A Namespace".into();
        r.run = "run/with/slashes".into();
        let obj = object(&r, "paddock-system", None);
        assert_eq!(obj.metadata.namespace.as_deref(), Some("paddock-system"));
        assert!(!obj.metadata.labels.expect("labels").contains_key(RUN_LABEL));
        // The spec still says where the record belongs.
        assert_eq!(obj.spec.namespace, "Not A Namespace");
        assert_eq!(obj.spec.run, "run/with/slashes");
    }
}
