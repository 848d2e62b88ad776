//! One reconcile of a `HarnessRun`: make the cluster and the broker agree with it.
//!
//! Idempotent: every step first reads what exists (the broker's run and leases, the Secret,
//! the pod) and only creates what is missing, so a second reconcile, or one after a controller
//! restart, issues nothing twice. The controller keeps no state of its own: everything it
//! needs is in the `HarnessRun`, its Secret, its pod and the broker.
//!
//! The order fails closed: the pod is created only once its Secret holds every placeholder
//! (a run that cannot get a credential gets no pod), and deletion waits behind a finalizer
//! until the broker has revoked the run's leases.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    ByteString,
    api::core::v1::{
        EnvVar, EnvVarSource, KeyToPath, Pod, PodDNSConfig, PodDNSConfigOption, PodTemplateSpec,
        Secret, SecretKeySelector, SecretVolumeSource, Volume, VolumeMount,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Api, Resource as _, ResourceExt as _,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::{
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder},
        finalizer::{self, Event as Finalize},
    },
};

use super::broker_api::{BrokerCallError, RunBroker};
use crate::{
    cluster::crd::harness_run::{
        Condition, CredentialRequest, HarnessRun, HarnessRunStatus, IssuedCredential,
    },
    wire::{IssueRequest, LeaseInfo, RunPhase, RunUpsertRequest},
};

/// Keeps a run's object until its leases are revoked and its Secret deleted.
pub const FINALIZER: &str = "paddock.dev/revoke-leases";
/// The label the node agent selects agent pods by (`paddock-proxy node`'s
/// `kubernetes.run_label`); its value is the run id.
pub const DEFAULT_RUN_LABEL: &str = "paddock.dev/run";
/// The pod annotation carrying an interactive run's adapter port (read by the node agent).
pub const ADAPTER_PORT_ANNOTATION: &str = "paddock.dev/adapter-port";
/// The pod annotation allowing shells in an interactive run's pod.
pub const SHELL_ANNOTATION: &str = "paddock.dev/shell";
/// Where the trust bundle is mounted in every container of the agent pod.
pub const TRUST_DIR: &str = "/etc/paddock/trust";
const TRUST_VOLUME: &str = "paddock-trust";
const CA_KEY: &str = "ca.crt";
const BUNDLE_KEY: &str = "bundle.crt";
/// Variables that replace a client's trust store (they get the bundle: CA plus system roots).
const BUNDLE_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "AWS_CA_BUNDLE",
    "PIP_CERT",
];

/// What the controller is configured with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub run_label: String,
    /// The CA certificate(s) agents must trust (PEM).
    pub trust_ca: String,
    /// The CA followed by the system roots (PEM), for variables that replace a trust store.
    pub trust_bundle: Option<String>,
    /// How often an active run is looked at again without a change (lease counts, expiry).
    pub resync: Duration,
}

/// Everything a reconcile needs.
pub struct Context {
    pub client: kube::Client,
    pub broker: Arc<dyn RunBroker>,
    pub recorder: Recorder,
    pub settings: Settings,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("broker", &self.broker)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("broker: {0}")]
    Broker(#[from] BrokerCallError),
    #[error("invalid HarnessRun: {0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("blocking task failed: {0}")]
    Join(String),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

/// The Secret and pod names of run `name`.
#[must_use]
pub fn secret_name(name: &str) -> String {
    format!("{name}-paddock")
}

#[must_use]
pub fn pod_name(name: &str) -> String {
    format!("{name}-agent")
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BrokerCallError> + Send + 'static,
) -> Result<T, ReconcileError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ReconcileError::Join(e.to_string()))?
        .map_err(ReconcileError::Broker)
}

/// Reconciles one run (the `kube::runtime::Controller` reconciler).
pub async fn reconcile(run: Arc<HarnessRun>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let namespace = run
        .namespace()
        .ok_or_else(|| ReconcileError::Invalid("no namespace".into()))?;
    let api: Api<HarnessRun> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer::finalizer(&api, FINALIZER, run, |event| async {
        match event {
            Finalize::Apply(run) => apply(&run, &ctx).await,
            Finalize::Cleanup(run) => cleanup(&run, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => ReconcileError::Finalizer(other.to_string()),
    })
}

struct Names {
    namespace: String,
    run_id: String,
    secret: String,
    pod: String,
}

fn names(run: &HarnessRun) -> Result<Names, ReconcileError> {
    let namespace = run
        .namespace()
        .ok_or_else(|| ReconcileError::Invalid("no namespace".into()))?;
    let name = run.name_any();
    let run_id = run
        .uid()
        .ok_or_else(|| ReconcileError::Invalid("no uid".into()))?;
    // Room for the suffixes within a 253-character object name.
    if name.len() > 240 {
        return Err(ReconcileError::Invalid(
            "name longer than 240 characters".into(),
        ));
    }
    Ok(Names {
        secret: secret_name(&name),
        pod: pod_name(&name),
        namespace,
        run_id,
    })
}

fn owner(run: &HarnessRun) -> Result<OwnerReference, ReconcileError> {
    run.controller_owner_ref(&())
        .ok_or_else(|| ReconcileError::Invalid("no name or uid".into()))
}

fn owned_by(meta: &ObjectMeta, run_id: &str) -> bool {
    meta.owner_references.as_ref().is_some_and(|o| {
        o.iter()
            .any(|r| r.uid == run_id && r.controller == Some(true))
    })
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What the API server's schema cannot say. Checked before anything is created; deletion
/// never depends on it (a run that fails it can still be deleted).
fn check_spec(run: &HarnessRun) -> Result<(), ReconcileError> {
    // Room for the suffixes within a 253-character object name.
    if run.name_any().len() > 240 {
        return Err(ReconcileError::Invalid(
            "name longer than 240 characters (the pod and Secret names add a suffix)".into(),
        ));
    }
    let mut envs = std::collections::BTreeSet::new();
    for c in &run.spec.credentials {
        if !is_env_name(&c.env)
            || BUNDLE_VARS.contains(&c.env.as_str())
            || c.env == "NODE_EXTRA_CA_CERTS"
        {
            return Err(ReconcileError::Invalid(format!(
                "credential {}: env {:?} is not a usable variable name",
                c.name, c.env
            )));
        }
        if !envs.insert(c.env.as_str()) {
            return Err(ReconcileError::Invalid(format!(
                "env {} named twice",
                c.env
            )));
        }
    }
    Ok(())
}

fn terminal(phase: Option<&str>) -> bool {
    matches!(phase, Some("Succeeded" | "Failed" | "Cancelled"))
}

fn phase_of(p: RunPhase) -> String {
    p.as_str().to_owned()
}

async fn event(ctx: &Context, run: &HarnessRun, type_: EventType, reason: &str, note: String) {
    let ev = KubeEvent {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &run.object_ref(&())).await {
        // An event is a report, not a step: its failure changes nothing else.
        tracing::warn!(run = %run.name_any(), error = %e, "event not recorded");
    }
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// Sets condition `type_`, keeping its transition time when its status did not change.
fn set_condition(
    status: &mut HarnessRunStatus,
    old: Option<&HarnessRunStatus>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
) {
    let value = if ok { "True" } else { "False" };
    let previous = old.and_then(|o| o.conditions.iter().find(|c| c.type_ == type_));
    let last_transition_time = match previous {
        Some(p) if p.status == value => p.last_transition_time.clone(),
        _ => now_rfc3339(),
    };
    status.conditions.retain(|c| c.type_ != type_);
    status.conditions.push(Condition {
        type_: type_.to_owned(),
        status: value.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time,
        observed_generation: None,
    });
}

async fn write_status(
    ctx: &Context,
    run: &HarnessRun,
    status: HarnessRunStatus,
) -> Result<(), ReconcileError> {
    if run.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<HarnessRun> =
        Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    let patch = serde_json::json!({ "status": status });
    api.patch_status(
        &run.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

fn issued(spec: &[CredentialRequest], leases: &[LeaseInfo]) -> Vec<IssuedCredential> {
    let mut out: Vec<IssuedCredential> = leases
        .iter()
        .filter(|l| !l.revoked)
        .filter_map(|l| {
            let env = spec.iter().find(|c| c.name == l.credential)?.env.clone();
            Some(IssuedCredential {
                name: l.credential.clone(),
                lease_id: l.lease_id.clone(),
                env,
                expires_at: l.expires_at,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.lease_id.cmp(&b.lease_id)));
    out
}

/// The run's phase from its pod: `None` while there is no pod yet.
fn pod_phase(pod: Option<&Pod>, had_pod: bool) -> RunPhase {
    match pod
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.phase.as_deref())
    {
        Some("Running") => RunPhase::Running,
        Some("Succeeded") => RunPhase::Succeeded,
        Some("Failed") => RunPhase::Failed,
        // The pod existed and is gone before it finished: the run failed.
        None if pod.is_none() && had_pod => RunPhase::Failed,
        Some(_) | None => RunPhase::Pending,
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one ordered sequence of idempotent steps; each depends on the one before"
)]
async fn apply(run: &HarnessRun, ctx: &Context) -> Result<Action, ReconcileError> {
    let n = names(run)?;
    let old = run.status.as_ref();
    let mut status = old.cloned().unwrap_or_default();
    status.run_id = Some(n.run_id.clone());
    status.observed_generation = run.metadata.generation;
    if let Err(e) = check_spec(run) {
        set_condition(
            &mut status,
            old,
            "Ready",
            false,
            "InvalidSpec",
            &e.to_string(),
        );
        status.phase = Some("Failed".into());
        write_status(ctx, run, status).await?;
        event(ctx, run, EventType::Warning, "InvalidSpec", e.to_string()).await;
        return Ok(Action::await_change());
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &n.namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &n.namespace);

    // A finished run stays finished: only make sure nothing of it is left.
    if terminal(status.phase.as_deref()) {
        let phase = status
            .phase
            .as_deref()
            .and_then(RunPhase::parse)
            .unwrap_or(RunPhase::Failed);
        finish(ctx, run, &n, phase, &mut status).await?;
        write_status(ctx, run, status).await?;
        return Ok(Action::await_change());
    }

    let pod = pods.get_opt(&n.pod).await?;
    if let Some(p) = &pod
        && !owned_by(&p.metadata, &n.run_id)
    {
        let msg = format!("pod {} exists and does not belong to this run", n.pod);
        set_condition(&mut status, old, "Ready", false, "PodConflict", &msg);
        write_status(ctx, run, status).await?;
        event(ctx, run, EventType::Warning, "PodConflict", msg.clone()).await;
        return Err(ReconcileError::Conflict(msg));
    }
    let phase = pod_phase(pod.as_ref(), status.pod.is_some());
    let upsert = RunUpsertRequest {
        run: n.run_id.clone(),
        namespace: n.namespace.clone(),
        template: run.spec.template.clone(),
        phase,
    };
    let broker = Arc::clone(&ctx.broker);
    if let Err(e) = blocking(move || broker.upsert_run(&upsert)).await {
        set_condition(
            &mut status,
            old,
            "Registered",
            false,
            "BrokerRefused",
            &e.to_string(),
        );
        write_status(ctx, run, status).await?;
        return Err(e);
    }
    set_condition(
        &mut status,
        old,
        "Registered",
        true,
        "Registered",
        "the broker knows the run",
    );
    if let Some(p) = &pod {
        status.node = p.spec.as_ref().and_then(|s| s.node_name.clone());
    }
    if !phase.is_active() {
        finish(ctx, run, &n, phase, &mut status).await?;
        write_status(ctx, run, status).await?;
        event(
            ctx,
            run,
            EventType::Normal,
            "RunFinished",
            format!("run {}: leases revoked, Secret deleted", phase.as_str()),
        )
        .await;
        return Ok(Action::await_change());
    }
    status.phase = Some(phase_of(phase));

    // The Secret: issued once; its existence is the record that the placeholders were handed
    // out.
    let secret = secrets.get_opt(&n.secret).await?;
    match &secret {
        Some(s) if !owned_by(&s.metadata, &n.run_id) => {
            let msg = format!("Secret {} exists and does not belong to this run", n.secret);
            set_condition(
                &mut status,
                old,
                "CredentialsIssued",
                false,
                "SecretConflict",
                &msg,
            );
            write_status(ctx, run, status).await?;
            event(ctx, run, EventType::Warning, "SecretConflict", msg.clone()).await;
            return Err(ReconcileError::Conflict(msg));
        }
        Some(_) => {}
        None => {
            if let Err(e) = issue_into_secret(ctx, run, &n, &secrets).await {
                let msg = e.to_string();
                if matches!(e, ReconcileError::Broker(BrokerCallError::Refused { .. })) {
                    status.last_denial = Some(msg.clone());
                    event(
                        ctx,
                        run,
                        EventType::Warning,
                        "CredentialDenied",
                        msg.clone(),
                    )
                    .await;
                }
                set_condition(
                    &mut status,
                    old,
                    "CredentialsIssued",
                    false,
                    "IssueFailed",
                    &msg,
                );
                write_status(ctx, run, status).await?;
                return Err(e);
            }
            event(
                ctx,
                run,
                EventType::Normal,
                "CredentialsIssued",
                format!(
                    "{} credential(s) in Secret {}",
                    run.spec.credentials.len(),
                    n.secret
                ),
            )
            .await;
        }
    }
    set_condition(
        &mut status,
        old,
        "CredentialsIssued",
        true,
        "Issued",
        "placeholders are in the run's Secret",
    );
    status.secret = Some(n.secret.clone());

    // The pod, once.
    if pod.is_none() && status.pod.is_none() {
        let agent = agent_pod(run, &n, &ctx.settings)?;
        match pods.create(&PostParams::default(), &agent).await {
            Ok(_) => {}
            // Created by a reconcile whose status write was lost: it is ours (checked next time).
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        event(
            ctx,
            run,
            EventType::Normal,
            "PodCreated",
            format!("agent pod {}", n.pod),
        )
        .await;
    }
    status.pod = Some(n.pod.clone());
    set_condition(
        &mut status,
        old,
        "PodCreated",
        true,
        "Created",
        "the agent pod exists",
    );

    let run_id = n.run_id.clone();
    let broker = Arc::clone(&ctx.broker);
    let leases = blocking(move || broker.leases(&run_id)).await?;
    status.credentials = issued(&run.spec.credentials, &leases);
    status.lease_count =
        u32::try_from(leases.iter().filter(|l| !l.revoked).count()).unwrap_or(u32::MAX);
    write_status(ctx, run, status).await?;
    Ok(Action::requeue(ctx.settings.resync))
}

/// Issues every credential of the run and creates its Secret. Leases left by an attempt that
/// never created the Secret (a controller that stopped in between) were never handed to
/// anyone: they are revoked first. On any failure the leases of this attempt are revoked.
async fn issue_into_secret(
    ctx: &Context,
    run: &HarnessRun,
    n: &Names,
    secrets: &Api<Secret>,
) -> Result<(), ReconcileError> {
    let run_id = n.run_id.clone();
    let broker = Arc::clone(&ctx.broker);
    let stale = blocking(move || broker.leases(&run_id)).await?;
    for lease in stale.into_iter().filter(|l| !l.revoked) {
        let broker = Arc::clone(&ctx.broker);
        blocking(move || broker.revoke(&lease.lease_id)).await?;
    }
    let mut data = BTreeMap::new();
    let mut issued_now = Vec::new();
    let mut failure = None;
    for c in &run.spec.credentials {
        let req = IssueRequest {
            run: n.run_id.clone(),
            credential: c.name.clone(),
        };
        let broker = Arc::clone(&ctx.broker);
        match blocking(move || broker.issue(&req)).await {
            Ok(resp) => {
                issued_now.push(resp.lease_id.clone());
                data.insert(c.env.clone(), ByteString(resp.value.clone().into_bytes()));
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if failure.is_none() {
        data.insert(
            CA_KEY.to_owned(),
            ByteString(ctx.settings.trust_ca.clone().into_bytes()),
        );
        if let Some(b) = &ctx.settings.trust_bundle {
            data.insert(BUNDLE_KEY.to_owned(), ByteString(b.clone().into_bytes()));
        }
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(n.secret.clone()),
                namespace: Some(n.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    ctx.settings.run_label.clone(),
                    n.run_id.clone(),
                )])),
                owner_references: Some(vec![owner(run)?]),
                ..ObjectMeta::default()
            },
            data: Some(data),
            type_: Some("Opaque".into()),
            immutable: Some(true),
            ..Secret::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => return Ok(()),
            Err(e) => failure = Some(e.into()),
        }
    }
    for lease_id in issued_now {
        let broker = Arc::clone(&ctx.broker);
        if let Err(e) = blocking(move || broker.revoke(&lease_id)).await {
            tracing::warn!(error = %e, "revoking an undelivered lease failed; the next attempt revokes it");
        }
    }
    Err(failure.unwrap_or_else(|| ReconcileError::Conflict("issue failed".into())))
}

/// A finished run: the broker marks it (and revokes its leases), the Secret goes.
async fn finish(
    ctx: &Context,
    run: &HarnessRun,
    n: &Names,
    phase: RunPhase,
    status: &mut HarnessRunStatus,
) -> Result<(), ReconcileError> {
    let upsert = RunUpsertRequest {
        run: n.run_id.clone(),
        namespace: n.namespace.clone(),
        template: run.spec.template.clone(),
        phase,
    };
    let broker = Arc::clone(&ctx.broker);
    blocking(move || broker.upsert_run(&upsert)).await?;
    delete_secret(ctx, n).await?;
    status.phase = Some(phase_of(phase));
    status.lease_count = 0;
    status.credentials.clear();
    Ok(())
}

async fn delete_secret(ctx: &Context, n: &Names) -> Result<(), ReconcileError> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &n.namespace);
    match secrets.delete(&n.secret, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The run's object is being deleted: the broker revokes its leases (a run deleted before it
/// ended is `Cancelled`), the Secret and the pod go. Until this succeeds the finalizer keeps
/// the object.
async fn cleanup(run: &HarnessRun, ctx: &Context) -> Result<Action, ReconcileError> {
    let n = names(run)?;
    let phase = run
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .and_then(RunPhase::parse)
        .filter(|p| !p.is_active())
        .unwrap_or(RunPhase::Cancelled);
    let mut status = run.status.clone().unwrap_or_default();
    finish(ctx, run, &n, phase, &mut status).await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &n.namespace);
    match pods.delete(&n.pod, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    event(
        ctx,
        run,
        EventType::Normal,
        "LeasesRevoked",
        format!(
            "run deleted ({}): leases revoked, Secret deleted",
            phase.as_str()
        ),
    )
    .await;
    Ok(Action::await_change())
}

/// An agent's names are external ones. With the cluster's default `ndots: 5` every lookup of
/// `api.example.com` first tries each search domain: NXDOMAIN answers the pod's DNS server
/// audits as refusals (`dns_deny`), counted against the run's DNS rate. `ndots: 1` asks the
/// name as written first; a template that sets `ndots` keeps its own.
fn external_names_first(spec: &mut k8s_openapi::api::core::v1::PodSpec) {
    let dns = spec.dns_config.get_or_insert_with(PodDNSConfig::default);
    let options = dns.options.get_or_insert_with(Vec::new);
    if !options.iter().any(|o| o.name.as_deref() == Some("ndots")) {
        options.push(PodDNSConfigOption {
            name: Some("ndots".into()),
            value: Some("1".into()),
        });
    }
}

/// The agent pod: the run's template, labelled for the node agent, with the placeholders as
/// environment variables and the trust bundle mounted in every container.
fn agent_pod(run: &HarnessRun, n: &Names, settings: &Settings) -> Result<Pod, ReconcileError> {
    let PodTemplateSpec { metadata, spec } = run.spec.pod_template.clone();
    let mut meta = metadata.unwrap_or_default();
    let mut spec = spec.ok_or_else(|| ReconcileError::Invalid("podTemplate has no spec".into()))?;
    meta.name = Some(n.pod.clone());
    meta.generate_name = None;
    meta.namespace = Some(n.namespace.clone());
    // The run label is the controller's to set: a template's own value would make the node
    // agent attribute the pod to another run.
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(settings.run_label.clone(), n.run_id.clone());
    // Likewise the adapter port: only the run's own field sets it (a template's annotation
    // would point the broker at another port of the pod).
    let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    annotations.remove(ADAPTER_PORT_ANNOTATION);
    annotations.remove(SHELL_ANNOTATION);
    if let Some(interactive) = &run.spec.interactive {
        annotations.insert(
            ADAPTER_PORT_ANNOTATION.into(),
            interactive.adapter_port.to_string(),
        );
        if interactive.shell {
            annotations.insert(SHELL_ANNOTATION.into(), "true".into());
        }
    }
    meta.owner_references = Some(vec![owner(run)?]);
    // A run ends once; a restarted container would reuse revoked placeholders.
    spec.restart_policy = Some("Never".into());
    external_names_first(&mut spec);
    let mut items = vec![KeyToPath {
        key: CA_KEY.into(),
        path: CA_KEY.into(),
        mode: None,
    }];
    if settings.trust_bundle.is_some() {
        items.push(KeyToPath {
            key: BUNDLE_KEY.into(),
            path: BUNDLE_KEY.into(),
            mode: None,
        });
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.retain(|v| v.name != TRUST_VOLUME);
    volumes.push(Volume {
        name: TRUST_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(n.secret.clone()),
            items: Some(items),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    });
    let mut env: Vec<EnvVar> = run
        .spec
        .credentials
        .iter()
        .map(|c| EnvVar {
            name: c.env.clone(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: n.secret.clone(),
                    key: c.env.clone(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
        })
        .collect();
    let plain = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    };
    env.push(plain(
        "NODE_EXTRA_CA_CERTS",
        format!("{TRUST_DIR}/{CA_KEY}"),
    ));
    if settings.trust_bundle.is_some() {
        for var in BUNDLE_VARS {
            env.push(plain(var, format!("{TRUST_DIR}/{BUNDLE_KEY}")));
        }
    }
    let containers = spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten());
    for c in containers {
        let own = c.env.get_or_insert_with(Vec::new);
        own.retain(|e| !env.iter().any(|x| x.name == e.name));
        own.extend(env.iter().cloned());
        let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
        mounts.retain(|m| m.name != TRUST_VOLUME && m.mount_path != TRUST_DIR);
        mounts.push(VolumeMount {
            name: TRUST_VOLUME.into(),
            mount_path: TRUST_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    Ok(Pod {
        metadata: meta,
        spec: Some(spec),
        status: None,
    })
}
