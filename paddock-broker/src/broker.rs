//! The broker domain service: issue, renew, revoke, egress decisions and substitution.
//!
//! No HTTP here: the server and embedded users call these methods with an authenticated
//! [`Identity`]. Namespace scoping, node-agent node checks, run-phase, grant and egress checks
//! all happen here so every entry point gets them. (For a node agent the server first asks the
//! API server where the run's pod runs and puts the answer in [`Identity::placement`]; without
//! it a node agent is refused.)

use std::{
    collections::BTreeSet,
    sync::{Arc, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use paddock_wire::codec;
use time::OffsetDateTime;

use crate::{
    audit::{AuditEvent, AuditKind, AuditSink},
    auth::{
        Identity, RunDirectory, Scope,
        pods::{PlacementError, PodLocator},
        tokenreview::NOT_NODE_BOUND,
    },
    bearer,
    grants::{GrantError, GrantHub, Invalidated},
    interactive::{InteractiveRouter, LeaseRenewer},
    node_ca::{NodeCa, NodeCaError},
    policy::{EgressDecision, PolicyError, PolicyStore, hosts},
    providers::{self, Placement, ProviderContext, ProviderError, decode_basic},
    ratelimit::{KIND_EGRESS, KIND_ISSUE, KIND_SUBSTITUTE, RateLimitError, RateLimits},
    store::{NewLease, NodeCaAdmission, NodeCaRecord, PoolRequest, Store, StoreError},
    wire::{
        DeliveryMode, ErrorCode, GrantTerms, InvalidationScope, IssueRequest, IssueResponse,
        LeaseInfo, LeasesResponse, NodeCaRequest, NodeCaResponse, RenewRequest, RenewResponse,
        RevokeRequest, RevokeResponse, RunInfo, RunUpsertRequest, SubstituteAuthRequest,
        SubstituteAuthResponse, Transport, ValidateEgressRequest, ValidateEgressResponse,
    },
};

/// A refusal or failure, each mapped to one wire error code.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("rate limited: {0}")]
    RateLimited(String),
    #[error("pool exhausted: {0}")]
    PoolExhausted(String),
    #[error("audit unavailable: {0}")]
    AuditUnavailable(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The broker's database cannot be reached (503; the caller retries, maybe on another
    /// replica).
    #[error("{0}")]
    StoreUnavailable(String),
    #[error("egress denied: {0}")]
    EgressDenied(String),
    #[error("TLS required: {0}")]
    TlsRequired(String),
    #[error("{0}")]
    SubscriptionGone(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl BrokerError {
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            BrokerError::NotFound(_) => ErrorCode::NotFound,
            BrokerError::Forbidden(_) => ErrorCode::Forbidden,
            BrokerError::BadRequest(_) => ErrorCode::BadRequest,
            BrokerError::RateLimited(_) => ErrorCode::RateLimited,
            BrokerError::PoolExhausted(_) => ErrorCode::PoolExhausted,
            BrokerError::AuditUnavailable(_) => ErrorCode::AuditUnavailable,
            BrokerError::Unavailable(_) | BrokerError::StoreUnavailable(_) => {
                ErrorCode::Unavailable
            }
            BrokerError::EgressDenied(_) => ErrorCode::EgressDenied,
            BrokerError::TlsRequired(_) => ErrorCode::TlsRequired,
            BrokerError::SubscriptionGone(_) => ErrorCode::SubscriptionGone,
            BrokerError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The message a caller may see. Internal and backend details stay in logs.
    #[must_use]
    pub fn public_message(&self) -> String {
        match self {
            BrokerError::Internal(_) => "internal error".to_owned(),
            BrokerError::AuditUnavailable(_) => {
                "audit log unavailable; request not performed".to_owned()
            }
            BrokerError::Unavailable(_) => "credential backend unavailable".to_owned(),
            BrokerError::StoreUnavailable(_) => {
                "broker database unavailable; request not performed".to_owned()
            }
            BrokerError::NotFound(m)
            | BrokerError::Forbidden(m)
            | BrokerError::BadRequest(m)
            | BrokerError::RateLimited(m)
            | BrokerError::PoolExhausted(m)
            | BrokerError::EgressDenied(m)
            | BrokerError::TlsRequired(m)
            | BrokerError::SubscriptionGone(m) => m.clone(),
        }
    }
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::PoolExhausted(pool) => {
                BrokerError::PoolExhausted(format!("credential pool {pool} is exhausted"))
            }
            // Fail closed with 503: nothing is decided without the database.
            e @ StoreError::Unavailable(_) => BrokerError::StoreUnavailable(e.to_string()),
            other => BrokerError::Internal(other.to_string()),
        }
    }
}

impl From<ProviderError> for BrokerError {
    fn from(e: ProviderError) -> Self {
        BrokerError::Unavailable(e.to_string())
    }
}

impl From<GrantError> for BrokerError {
    fn from(e: GrantError) -> Self {
        match e {
            GrantError::Gone => BrokerError::SubscriptionGone(e.to_string()),
            GrantError::AheadOfBroker { .. } => BrokerError::BadRequest(e.to_string()),
            GrantError::Full => BrokerError::Unavailable(e.to_string()),
        }
    }
}

impl From<RateLimitError> for BrokerError {
    fn from(e: RateLimitError) -> Self {
        BrokerError::RateLimited(e.to_string())
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Longest accepted identifier (run, credential, lease, host).
const MAX_ID: usize = 253;

fn check_id(what: &str, value: &str) -> Result<(), BrokerError> {
    if value.is_empty() || value.len() > MAX_ID || value.chars().any(char::is_control) {
        return Err(BrokerError::BadRequest(format!(
            "{what} must be 1-{MAX_ID} printable characters"
        )));
    }
    Ok(())
}

#[derive(Debug)]
pub struct Broker {
    store: Store,
    policy: Arc<PolicyStore>,
    audit: Arc<dyn AuditSink>,
    limits: RateLimits,
    providers: ProviderContext,
    /// Where node agents' runs are looked up (set with the `TokenReview` backend).
    pods: RwLock<Option<Arc<PodLocator>>>,
    /// Reusable substitution answers and their invalidation stream.
    grants: Arc<GrantHub>,
    /// Interactive runs (prompts, attach streams), see [`crate::interactive`].
    interactive: Arc<InteractiveRouter>,
    /// The cluster root that signs node agents' intermediates (`nodeCa`).
    node_ca: RwLock<Option<Arc<NodeCa>>>,
}

/// The caller the renewal walker renews as (audit records name it).
pub const RENEWAL_WALKER: &str = "broker:renewal-walker";

/// Whether node agent `caller` may act for `run`: only when the API server placed the run's
/// pod on the node the caller's token is bound to. Err holds the caller's answer and the
/// audited reason (which may name the other node; the answer does not).
fn node_agent_may_act(
    caller: &Identity,
    run: &RunInfo,
    from_pod: Option<&str>,
) -> Result<(), (BrokerError, String)> {
    let forbidden = |reason: String| (BrokerError::Forbidden(reason.clone()), reason);
    let Some(node) = caller.node.as_deref() else {
        return Err(forbidden(format!("node agent: {NOT_NODE_BOUND}")));
    };
    let Some(placement) = caller
        .placement
        .as_deref()
        .filter(|p| p.run == run.run && p.namespace == run.namespace)
    else {
        return Err(forbidden(format!(
            "no pod placement of run {} was looked up for this node agent",
            run.run
        )));
    };
    match &placement.outcome {
        // The run's own pod, on this node: the call must come from that pod. A pod of another
        // namespace carrying the run's label on the same node is not the run.
        Ok(pod) if pod.node == node => match from_pod {
            Some(uid) if uid == pod.uid => Ok(()),
            Some(uid) => Err((
                BrokerError::Forbidden(format!(
                    "the calling pod is not the pod of run {}",
                    run.run
                )),
                format!(
                    "pod {uid} asked as run {}, whose pod is {} (uid {})",
                    run.run, pod.pod, pod.uid
                ),
            )),
            None => Err(forbidden(
                "a node agent must name the pod of each call (field `pod`)".to_owned(),
            )),
        },
        Ok(pod) => Err((
            BrokerError::Forbidden(format!(
                "the pod of run {} is not on this node agent's node {node}",
                run.run
            )),
            format!(
                "pod {} (uid {}) of run {} runs on node {}, not on the caller's node {node}",
                pod.pod, pod.uid, run.run, pod.node
            ),
        )),
        Err(PlacementError::Unavailable(reason)) => Err((
            BrokerError::Unavailable(format!("pod lookup: {reason}")),
            format!("pod lookup unavailable: {reason}"),
        )),
        Err(e) => Err(forbidden(e.to_string())),
    }
}

impl Broker {
    #[must_use]
    pub fn new(
        store: Store,
        policy: Arc<PolicyStore>,
        audit: Arc<dyn AuditSink>,
        limits: RateLimits,
    ) -> Self {
        Self {
            store,
            policy,
            audit,
            limits,
            providers: ProviderContext::default(),
            pods: RwLock::new(None),
            grants: Arc::new(GrantHub::default()),
            interactive: Arc::new(InteractiveRouter::default()),
            node_ca: RwLock::new(None),
        }
    }

    /// Interactive runs: attach counts, turn sequences, output fan-out and adapter access.
    #[must_use]
    pub fn interactive(&self) -> &Arc<InteractiveRouter> {
        &self.interactive
    }

    /// Replaces the grant tuning (before the broker serves anything).
    #[must_use]
    pub fn with_grant_hub(mut self, grants: GrantHub) -> Self {
        self.grants = Arc::new(grants);
        self
    }

    /// Subscriptions, sequence numbers and acknowledgements of reusable substitutions.
    #[must_use]
    pub fn grants(&self) -> &Arc<GrantHub> {
        &self.grants
    }

    /// Publishes an invalidation and waits for it (see [`GrantHub::invalidate`]).
    fn invalidate(&self, scope: &InvalidationScope) -> Invalidated {
        let out = self.grants.invalidate(scope);
        tracing::info!(
            seq = out.seq, acknowledged = out.acknowledged, cut_off = out.cut_off,
            scope = ?scope, "grants invalidated"
        );
        out
    }

    /// Reloads the policy (only when its files changed, with `only_if_changed`) and, when a
    /// new policy became active, takes back every grant made under the old one before
    /// returning. Blocks.
    pub fn reload_policy(&self, only_if_changed: bool) -> Result<bool, PolicyError> {
        let changed = if only_if_changed {
            self.policy.reload_if_changed()?
        } else {
            self.policy.reload()?
        };
        if changed {
            self.invalidate(&InvalidationScope::All);
        }
        Ok(changed)
    }

    /// Replaces the policy and takes back every grant made under the old one. Blocks.
    pub fn replace_policy(&self, policy: crate::policy::Policy) {
        self.policy.replace(policy);
        self.invalidate(&InvalidationScope::All);
    }

    /// Lets node agents act: their runs' pods are looked up with `locator`.
    pub fn set_pod_locator(&self, locator: Arc<PodLocator>) {
        if let Ok(mut pods) = self.pods.write() {
            *pods = Some(locator);
        }
    }

    /// Lets node agents get per-node intermediate CAs signed by `ca`.
    pub fn set_node_ca(&self, ca: Arc<NodeCa>) {
        if let Ok(mut slot) = self.node_ca.write() {
            *slot = Some(ca);
        }
    }

    /// The node CA root, if configured.
    #[must_use]
    pub fn node_ca(&self) -> Option<Arc<NodeCa>> {
        self.node_ca.read().ok().and_then(|c| c.clone())
    }

    /// `POST /v1/node-ca`: signs an intermediate CA for the node the caller's token is bound
    /// to. Every issuance and refusal is audited; an unrecorded issuance is not returned.
    pub fn issue_node_ca(
        &self,
        caller: &Identity,
        request: &NodeCaRequest,
    ) -> Result<NodeCaResponse, BrokerError> {
        let Some(ca) = self.node_ca() else {
            return Err(BrokerError::NotFound(
                "this broker issues no node CAs (nodeCa is not configured)".to_owned(),
            ));
        };
        let mut event = AuditEvent::new(
            AuditKind::NodeCaDenied,
            &caller.subject,
            &caller.namespace,
            "",
        );
        event.node = Some(request.node.chars().take(253).collect());
        let outcome = match (caller.is_node_agent(), caller.node.as_deref()) {
            (false, _) => Err(NodeCaError::Config(
                "only node agents (broker:node-agent) get node CAs".to_owned(),
            )),
            (true, None) => Err(NodeCaError::Config(format!("node agent: {NOT_NODE_BOUND}"))),
            (true, Some(node)) => ca.issue(
                node,
                &request.node,
                &request.csr,
                time::OffsetDateTime::now_utc(),
            ),
        };
        // Recorded before it leaves, so it can be revoked; a barred node gets nothing.
        let outcome = match outcome {
            Ok(issued) => {
                let record = NodeCaRecord {
                    serial: issued.serial.clone(),
                    node: request.node.clone(),
                    not_before: u64::try_from(issued.not_before.unix_timestamp()).unwrap_or(0),
                    not_after: u64::try_from(issued.not_after.unix_timestamp()).unwrap_or(0),
                    revoked_at: None,
                    reason: None,
                };
                match self.store.record_node_ca(&record) {
                    Ok(NodeCaAdmission::Recorded) => Ok(issued),
                    Ok(NodeCaAdmission::Blocked(block)) => Err(NodeCaError::Blocked {
                        node: block.node,
                        reason: block.reason,
                    }),
                    Err(e) => {
                        event.reason = Some(format!("recording the intermediate: {e}"));
                        self.audit(&event)?;
                        return Err(e.into());
                    }
                }
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(issued) => {
                event.event = AuditKind::NodeCaIssued;
                event.serial = Some(issued.serial.clone());
                event.expires_at = u64::try_from(issued.not_after.unix_timestamp()).ok();
                self.audit(&event)?;
                tracing::info!(node = %request.node, serial = %issued.serial, not_after = %issued.not_after, "node CA issued");
                Ok(NodeCaResponse {
                    certificate: issued.certificate_pem,
                    root: ca.root_pem().to_owned(),
                    not_before: u64::try_from(issued.not_before.unix_timestamp()).unwrap_or(0),
                    not_after: u64::try_from(issued.not_after.unix_timestamp()).unwrap_or(0),
                })
            }
            Err(e) => {
                event.reason = Some(e.to_string());
                self.audit(&event)?;
                Err(match e {
                    NodeCaError::BadCsr(_) => BrokerError::BadRequest(e.to_string()),
                    NodeCaError::RootNotValid(_) | NodeCaError::Sign(_) => {
                        BrokerError::Unavailable(e.to_string())
                    }
                    _ => BrokerError::Forbidden(e.to_string()),
                })
            }
        }
    }

    /// `GET /v1/node-ca/crl`: the root's current revocation list (DER), listing every
    /// revoked intermediate that has not expired. Built from the store on each call, so a
    /// revocation committed by any replica or by `paddock-broker ca revoke` is in the next one.
    pub fn node_ca_crl(&self, caller: &Identity) -> Result<Vec<u8>, BrokerError> {
        if !caller.is_node_agent() {
            return Err(BrokerError::Forbidden(
                "only node agents (broker:node-agent) read the node CA revocation list".to_owned(),
            ));
        }
        let Some(ca) = self.node_ca() else {
            return Err(BrokerError::NotFound(
                "this broker issues no node CAs (nodeCa is not configured)".to_owned(),
            ));
        };
        let now = time::OffsetDateTime::now_utc();
        let revoked = revoked_node_cas(&self.store, now)?;
        ca.crl(&revoked, now)
            .map_err(|e| BrokerError::Unavailable(e.to_string()))
    }

    /// The pod locator, if node agents can be served.
    #[must_use]
    pub fn pod_locator(&self) -> Option<Arc<PodLocator>> {
        self.pods.read().ok().and_then(|p| p.clone())
    }

    #[must_use]
    pub fn policy(&self) -> &Arc<PolicyStore> {
        &self.policy
    }

    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }

    #[must_use]
    pub fn rate_limits(&self) -> &RateLimits {
        &self.limits
    }

    fn audit(&self, event: &AuditEvent) -> Result<(), BrokerError> {
        self.audit
            .record(event)
            .map_err(|e| BrokerError::AuditUnavailable(e.to_string()))
    }

    /// Loads a run the caller may act on. Callers without the controller scope get the same
    /// answer for an unknown run and a run in another namespace (no existence oracle).
    fn authorize_run(&self, caller: &Identity, run_id: &str) -> Result<RunInfo, BrokerError> {
        self.authorize_run_from(caller, run_id, None)
    }

    /// [`Broker::authorize_run`] for a call that names the pod it comes from (node agents).
    fn authorize_run_from(
        &self,
        caller: &Identity,
        run_id: &str,
        pod: Option<&str>,
    ) -> Result<RunInfo, BrokerError> {
        check_id("run", run_id)?;
        if caller.is_node_agent() {
            return self.authorize_node_agent(caller, run_id, pod);
        }
        if caller.run.as_deref().is_some_and(|r| r != run_id) {
            return Err(BrokerError::Forbidden(format!(
                "this credential is bound to another run than {run_id}"
            )));
        }
        let run = self.store.run(run_id)?;
        match run {
            Some(run) if caller.may_act_in(&run.namespace) => Ok(run),
            None if caller.has(Scope::Controller) => Err(BrokerError::NotFound(format!(
                "run {run_id} is not registered"
            ))),
            _ => Err(BrokerError::Forbidden(format!(
                "run {run_id} is not accessible to this caller"
            ))),
        }
    }

    /// A node agent acts for a registered run only where [`node_agent_may_act`] agrees; every
    /// refusal of a registered run is audited.
    fn authorize_node_agent(
        &self,
        caller: &Identity,
        run_id: &str,
        pod: Option<&str>,
    ) -> Result<RunInfo, BrokerError> {
        let Some(run) = self.store.run(run_id)? else {
            return Err(BrokerError::Forbidden(format!(
                "run {run_id} is not accessible to this caller"
            )));
        };
        match node_agent_may_act(caller, &run, pod) {
            Ok(()) => Ok(run),
            Err((err, reason)) => {
                let mut ev = AuditEvent::new(
                    AuditKind::NodeAgentDenied,
                    &caller.subject,
                    &run.namespace,
                    &run.run,
                );
                ev.reason = Some(reason);
                self.audit(&ev)?;
                Err(err)
            }
        }
    }

    fn require_active(run: &RunInfo) -> Result<(), BrokerError> {
        if run.phase.is_active() {
            Ok(())
        } else {
            Err(BrokerError::Forbidden(format!(
                "run {} is {}",
                run.run,
                run.phase.as_str()
            )))
        }
    }

    /// Registers a run or changes its phase (controller only). A terminal phase revokes the
    /// run's leases.
    pub fn upsert_run(
        &self,
        caller: &Identity,
        req: &RunUpsertRequest,
    ) -> Result<RunInfo, BrokerError> {
        if !caller.has(Scope::Controller) {
            return Err(BrokerError::Forbidden(
                "registering runs needs the controller scope".into(),
            ));
        }
        for (what, v) in [
            ("run", &req.run),
            ("namespace", &req.namespace),
            ("template", &req.template),
        ] {
            check_id(what, v)?;
        }
        let existing = self.store.run(&req.run)?;
        if let Some(existing) = &existing
            && existing.namespace != req.namespace
        {
            return Err(BrokerError::BadRequest(format!(
                "run {} already exists in another namespace",
                req.run
            )));
        }
        // Another template can change which policies apply: proxies re-ask about the run.
        let retemplated = existing.is_some_and(|e| e.template != req.template);
        let info = RunInfo {
            run: req.run.clone(),
            namespace: req.namespace.clone(),
            template: req.template.clone(),
            phase: req.phase,
        };
        let mut event = AuditEvent::new(
            AuditKind::RunUpdated,
            &caller.subject,
            &info.namespace,
            &info.run,
        );
        event.reason = Some(format!("phase {}", info.phase.as_str()));
        self.audit(&event)?;
        self.store.upsert_run(&info, now_secs())?;
        if !info.phase.is_active() {
            for lease_id in self.store.revoke_run(&info.run)? {
                let mut e = AuditEvent::new(
                    AuditKind::CredentialRevoked,
                    &caller.subject,
                    &info.namespace,
                    &info.run,
                );
                e.lease_id = Some(lease_id);
                e.reason = Some("run finished".into());
                // The revocation already happened and is safe; a failed record is logged.
                if let Err(err) = self.audit.record(&e) {
                    tracing::error!(error = %err, "audit record of run-end revocation failed");
                }
            }
            self.invalidate(&InvalidationScope::Run {
                run: info.run.clone(),
            });
            self.interactive.forget(&info.namespace, &info.run);
        } else if retemplated {
            self.invalidate(&InvalidationScope::Run {
                run: info.run.clone(),
            });
        }
        Ok(info)
    }

    /// Records an interactive action or refusal (who, which run, why). Fails closed: an
    /// action whose record cannot be written is not taken.
    pub fn audit_interactive(
        &self,
        kind: AuditKind,
        caller: &str,
        namespace: &str,
        run: &str,
        reason: Option<String>,
    ) -> Result<(), BrokerError> {
        let mut ev = AuditEvent::new(kind, caller, namespace, run);
        ev.reason = reason;
        self.audit(&ev)
    }

    /// Authorizes an interactive action (`kind`: prompt, interrupt, end, attach) on run
    /// `run_id` of `namespace`; the caller records the action before taking it. The run must be registered
    /// in that namespace, the caller must act there, and the run must be active. A refusal is
    /// recorded as `interact-denied`; an unknown run and one the caller may not see get the
    /// same answer unless the caller is a controller.
    pub fn authorize_interactive(
        &self,
        caller: &Identity,
        namespace: &str,
        run_id: &str,
        kind: AuditKind,
    ) -> Result<RunInfo, BrokerError> {
        check_id("namespace", namespace)?;
        check_id("run", run_id)?;
        let deny = |err: BrokerError| -> Result<RunInfo, BrokerError> {
            self.audit_interactive(
                AuditKind::InteractDenied,
                &caller.subject,
                namespace,
                run_id,
                Some(format!("{}: {err}", kind.as_str())),
            )?;
            Err(err)
        };
        if caller.is_node_agent() {
            return deny(BrokerError::Forbidden(
                "node agents may not drive runs".into(),
            ));
        }
        if caller.run.as_deref().is_some_and(|r| r != run_id) {
            return deny(BrokerError::Forbidden(format!(
                "this credential is bound to another run than {run_id}"
            )));
        }
        let run = match self.store.run(run_id)? {
            Some(run) if run.namespace == namespace && caller.may_act_in(namespace) => run,
            None if caller.has(Scope::Controller) => {
                return deny(BrokerError::NotFound(format!(
                    "run {namespace}/{run_id} is not registered"
                )));
            }
            _ => {
                return deny(BrokerError::Forbidden(format!(
                    "run {namespace}/{run_id} is not accessible to this caller"
                )));
            }
        };
        if !run.phase.is_active() {
            return deny(BrokerError::Forbidden(format!(
                "run {namespace}/{run_id} is {}",
                run.phase.as_str()
            )));
        }
        Ok(run)
    }

    fn deny_issue(
        &self,
        caller: &Identity,
        run: &RunInfo,
        credential: &str,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut e = AuditEvent::new(
            AuditKind::CredentialDenied,
            &caller.subject,
            &run.namespace,
            &run.run,
        );
        e.credential = Some(credential.to_owned());
        e.reason = Some(reason.to_owned());
        self.audit(&e)
    }

    pub fn issue(
        &self,
        caller: &Identity,
        req: &IssueRequest,
    ) -> Result<IssueResponse, BrokerError> {
        check_id("credential", &req.credential)?;
        let run = self.authorize_run(caller, &req.run)?;
        self.limits.check(&run.namespace, &run.run, KIND_ISSUE)?;
        if let Err(e) = Self::require_active(&run) {
            self.deny_issue(caller, &run, &req.credential, &e.public_message())?;
            return Err(e);
        }
        let policy = self.policy.current();
        let Some((doc, grant)) = policy.credential_for(&run, &req.credential) else {
            let msg = format!(
                "no BrokerPolicy grants credential {} to run {}",
                req.credential, run.run
            );
            self.deny_issue(caller, &run, &req.credential, &msg)?;
            return Err(BrokerError::Forbidden(msg));
        };
        let provider = providers::for_grant(grant, &self.providers);
        let bearer = if grant.delivery.mode == DeliveryMode::ProxyInjected {
            Some(
                bearer::generate(provider.kind())
                    .map_err(|e| BrokerError::Internal(format!("generating a placeholder: {e}")))?,
            )
        } else {
            None
        };
        let now = now_secs();
        let lease = NewLease {
            lease_id: bearer::lease_id(),
            run: run.run.clone(),
            namespace: run.namespace.clone(),
            credential: grant.name.clone(),
            provider: provider.kind().to_owned(),
            delivery: grant.delivery.mode,
            bearer_hash: bearer.as_ref().map(|b| bearer::hash(b.expose())),
            hosts: grant.hosts.clone(),
            issued_at: now,
            expires_at: now + grant.ttl_seconds(),
        };
        let pool = provider.pool_size().map(|size| PoolRequest {
            pool: &grant.name,
            size,
        });
        let slot = match self.store.insert_lease(&lease, pool, now) {
            Ok(slot) => slot,
            Err(e) => {
                let e = BrokerError::from(e);
                self.deny_issue(caller, &run, &req.credential, &e.to_string())?;
                return Err(e);
            }
        };
        let secret = match provider.issue(grant.delivery.mode, slot) {
            Ok(secret) => secret,
            Err(e) => {
                self.store.delete_lease(&lease.lease_id)?;
                self.deny_issue(caller, &run, &req.credential, &e.to_string())?;
                return Err(e.into());
            }
        };
        let mut event = AuditEvent::new(
            AuditKind::CredentialIssued,
            &caller.subject,
            &run.namespace,
            &run.run,
        );
        event.credential = Some(grant.name.clone());
        event.provider = Some(provider.kind().to_owned());
        event.lease_id = Some(lease.lease_id.clone());
        event.policy = Some(doc.name().to_owned());
        event.expires_at = Some(lease.expires_at);
        if let Err(e) = self.audit(&event) {
            // Unaudited credentials must not exist: undo the lease.
            self.store.delete_lease(&lease.lease_id)?;
            return Err(e);
        }
        let value = match (bearer, secret) {
            (Some(b), _) => b.expose().to_owned(),
            (None, Some(s)) => s.expose().to_owned(),
            (None, None) => {
                return Err(BrokerError::Internal(
                    "provider returned no in-container secret".into(),
                ));
            }
        };
        Ok(IssueResponse {
            lease_id: lease.lease_id,
            run: run.run,
            credential: grant.name.clone(),
            provider: provider.kind().to_owned(),
            delivery: grant.delivery.mode,
            value,
            hosts: grant.hosts.clone(),
            expires_at: lease.expires_at,
        })
    }

    fn authorize_lease(
        &self,
        caller: &Identity,
        lease_id: &str,
    ) -> Result<(LeaseInfo, RunInfo), BrokerError> {
        check_id("lease_id", lease_id)?;
        let lease = self.store.lease(lease_id)?;
        let Some(lease) = lease.filter(|l| caller.may_act_in(&l.namespace)) else {
            return Err(BrokerError::NotFound(format!("lease {lease_id} not found")));
        };
        let run = self.authorize_run(caller, &lease.run)?;
        Ok((lease, run))
    }

    pub fn renew(
        &self,
        caller: &Identity,
        req: &RenewRequest,
    ) -> Result<RenewResponse, BrokerError> {
        let (lease, run) = self.authorize_lease(caller, &req.lease_id)?;
        self.limits.check(&run.namespace, &run.run, KIND_ISSUE)?;
        let now = now_secs();
        let fail = |reason: String| -> Result<RenewResponse, BrokerError> {
            let mut e = AuditEvent::new(
                AuditKind::RenewalFailed,
                &caller.subject,
                &run.namespace,
                &run.run,
            );
            e.lease_id = Some(lease.lease_id.clone());
            e.credential = Some(lease.credential.clone());
            e.reason = Some(reason.clone());
            self.audit(&e)?;
            Err(BrokerError::Forbidden(reason))
        };
        if lease.revoked {
            return fail(format!("lease {} is revoked", lease.lease_id));
        }
        if lease.expires_at <= now {
            return fail(format!("lease {} has expired", lease.lease_id));
        }
        if !run.phase.is_active() {
            return fail(format!("run {} is {}", run.run, run.phase.as_str()));
        }
        let policy = self.policy.current();
        let Some((_, grant)) = policy.credential_for(&run, &lease.credential) else {
            return fail(format!(
                "credential {} is no longer granted to run {}",
                lease.credential, run.run
            ));
        };
        let provider = providers::for_grant(grant, &self.providers);
        if provider.kind() != lease.provider {
            return fail(format!("credential {} changed provider", lease.credential));
        }
        if let Err(e) = provider.renew(&lease) {
            let mut ev = AuditEvent::new(
                AuditKind::RenewalFailed,
                &caller.subject,
                &run.namespace,
                &run.run,
            );
            ev.lease_id = Some(lease.lease_id.clone());
            ev.reason = Some(e.to_string());
            self.audit(&ev)?;
            return Err(e.into());
        }
        let expires_at = now + grant.ttl_seconds();
        self.store.set_expiry(&lease.lease_id, expires_at)?;
        let mut ev = AuditEvent::new(
            AuditKind::CredentialRenewed,
            &caller.subject,
            &run.namespace,
            &run.run,
        );
        ev.lease_id = Some(lease.lease_id.clone());
        ev.credential = Some(lease.credential.clone());
        ev.expires_at = Some(expires_at);
        if let Err(e) = self.audit(&ev) {
            self.store.set_expiry(&lease.lease_id, lease.expires_at)?;
            return Err(e);
        }
        Ok(RenewResponse {
            lease_id: lease.lease_id,
            expires_at,
        })
    }

    pub fn revoke(
        &self,
        caller: &Identity,
        req: &RevokeRequest,
    ) -> Result<RevokeResponse, BrokerError> {
        check_id("lease_id", &req.lease_id)?;
        let lease = self.store.lease(&req.lease_id)?;
        let Some(lease) = lease.filter(|l| caller.may_act_in(&l.namespace)) else {
            return Err(BrokerError::NotFound(format!(
                "lease {} not found",
                req.lease_id
            )));
        };
        // Revoking stays possible after the run ended: it only ever removes access.
        if caller.run.as_deref().is_some_and(|r| r != lease.run) {
            return Err(BrokerError::Forbidden(
                "this credential is bound to another run".into(),
            ));
        }
        self.limits
            .check(&lease.namespace, &lease.run, KIND_ISSUE)?;
        if lease.revoked {
            return Ok(RevokeResponse {
                lease_id: lease.lease_id,
                revoked: false,
            });
        }
        let mut ev = AuditEvent::new(
            AuditKind::CredentialRevoked,
            &caller.subject,
            &lease.namespace,
            &lease.run,
        );
        ev.lease_id = Some(lease.lease_id.clone());
        ev.credential = Some(lease.credential.clone());
        self.audit(&ev)?;
        let revoked = self.store.revoke(&lease.lease_id)?;
        // Stored first, then published: an answer that read the lease before the revocation
        // carries a lower sequence number than the invalidation (see crate::grants).
        self.invalidate(&InvalidationScope::Lease {
            lease_id: lease.lease_id.clone(),
            run: lease.run.clone(),
        });
        if let Some((_, grant)) = self
            .policy
            .current()
            .credentials()
            .find(|(_, g)| g.name == lease.credential)
            && let Err(e) = providers::for_grant(grant, &self.providers).revoke(&lease)
        {
            tracing::warn!(lease = %lease.lease_id, error = %e, "provider-side revocation failed");
        }
        Ok(RevokeResponse {
            lease_id: lease.lease_id,
            revoked,
        })
    }

    pub fn validate_egress(
        &self,
        caller: &Identity,
        req: &ValidateEgressRequest,
    ) -> Result<ValidateEgressResponse, BrokerError> {
        check_id("host", &req.host)?;
        let run = self.authorize_run_from(caller, &req.run, req.pod.as_deref())?;
        self.limits.check(&run.namespace, &run.run, KIND_EGRESS)?;
        if !run.phase.is_active() {
            return Ok(ValidateEgressResponse {
                allowed: false,
                substitute_auth: false,
                discovery: false,
                passthrough: false,
                policy: None,
                reason: format!("run {} is {}", run.run, run.phase.as_str()),
            });
        }
        let d =
            self.policy
                .current()
                .egress_on(&run, &req.host, req.port, OffsetDateTime::now_utc());
        let audited = match d {
            EgressDecision::Granted { .. } => None,
            EgressDecision::Discovery { .. } => Some(AuditKind::EgressDiscovery),
            EgressDecision::Denied { .. } => Some(AuditKind::EgressDenied),
        };
        let policy = d.policy().map(str::to_owned);
        let reason = d.reason();
        if let Some(kind) = audited {
            let mut ev = AuditEvent::new(kind, &caller.subject, &run.namespace, &run.run);
            ev.host = Some(hosts::normalize(&req.host));
            ev.port = req.port;
            ev.policy.clone_from(&policy);
            ev.reason = Some(reason.clone());
            self.audit(&ev)?;
        }
        Ok(ValidateEgressResponse {
            allowed: d.allowed(),
            substitute_auth: d.substitute_auth(),
            discovery: d.discovery(),
            // Only for a destination with a port: the DNS question has no connection to relay.
            passthrough: d.passthrough() && req.port.is_some(),
            policy,
            reason,
        })
    }

    fn deny_substitution(
        &self,
        caller: &Identity,
        run: &RunInfo,
        req: &SubstituteAuthRequest,
        lease: Option<&LeaseInfo>,
        err: BrokerError,
    ) -> BrokerError {
        let mut ev = AuditEvent::new(
            AuditKind::SubstitutionDenied,
            &caller.subject,
            &run.namespace,
            &run.run,
        );
        ev.host = Some(hosts::normalize(&req.host));
        ev.port = Some(req.port);
        ev.lease_id = lease.map(|l| l.lease_id.clone());
        ev.credential = lease.map(|l| l.credential.clone());
        ev.reason = Some(err.public_message());
        match self.audit(&ev) {
            Ok(()) => err,
            Err(audit_err) => audit_err,
        }
    }

    /// One token of the run's substitution budget: from the database's bucket on a shared
    /// store (every replica draws from it, so the configured rate holds for the cluster),
    /// else from the in-memory one. A store error refuses the request (503 when the database
    /// is out of reach), never lets it through unlimited.
    fn take_substitute_token(&self, run: &RunInfo) -> Result<(), BrokerError> {
        let spec = self.limits.config().substitute;
        match self
            .store
            .take_rate_token(&run.namespace, &run.run, KIND_SUBSTITUTE, spec)?
        {
            Some(true) => Ok(()),
            Some(false) => Err(RateLimitError::Exceeded(KIND_SUBSTITUTE).into()),
            None => Ok(self
                .limits
                .check(&run.namespace, &run.run, KIND_SUBSTITUTE)?),
        }
    }

    pub fn substitute_auth(
        &self,
        caller: &Identity,
        req: &SubstituteAuthRequest,
    ) -> Result<SubstituteAuthResponse, BrokerError> {
        check_id("host", &req.host)?;
        let grant_seq = self.begin_grant(caller, req)?;
        let run = self.authorize_run_from(caller, &req.run, req.pod.as_deref())?;
        self.take_substitute_token(&run)?;
        if let Err(e) = Self::require_active(&run) {
            return Err(self.deny_substitution(caller, &run, req, None, e));
        }
        let policy = self.policy.current();
        let egress = policy.egress(&run, &req.host, req.port, OffsetDateTime::now_utc());
        if !egress.substitute_auth() {
            let msg = format!(
                "credential substitution is not granted for {}:{}",
                hosts::normalize(&req.host),
                req.port
            );
            return Err(self.deny_substitution(
                caller,
                &run,
                req,
                None,
                BrokerError::EgressDenied(msg),
            ));
        }
        let (token, placements, query_names) = match find_placeholders(req) {
            Ok(found) => found,
            Err(e) => return Err(self.deny_substitution(caller, &run, req, None, e)),
        };
        let Some(token) = token else {
            return Ok(SubstituteAuthResponse::default());
        };
        let lease = self.store.lease_by_bearer_hash(&bearer::hash(&token))?;
        let Some(lease) = lease else {
            let e = BrokerError::Forbidden("unknown placeholder credential".into());
            return Err(self.deny_substitution(caller, &run, req, None, e));
        };
        let checks = || -> Result<(), BrokerError> {
            if lease.run != run.run {
                return Err(BrokerError::Forbidden(
                    "placeholder belongs to another run".into(),
                ));
            }
            if lease.revoked || lease.expires_at <= now_secs() {
                return Err(BrokerError::Forbidden(
                    "placeholder lease is revoked or expired".into(),
                ));
            }
            if !lease.hosts.iter().any(|p| hosts::matches(p, &req.host)) {
                return Err(BrokerError::Forbidden(format!(
                    "placeholder is not valid for host {}",
                    hosts::normalize(&req.host)
                )));
            }
            Ok(())
        };
        if let Err(e) = checks() {
            return Err(self.deny_substitution(caller, &run, req, Some(&lease), e));
        }
        let Some((_, grant)) = policy.credential_for(&run, &lease.credential) else {
            let e = BrokerError::Forbidden(format!(
                "credential {} is no longer granted",
                lease.credential
            ));
            return Err(self.deny_substitution(caller, &run, req, Some(&lease), e));
        };
        let provider = providers::for_grant(grant, &self.providers);
        if grant.delivery.mode != DeliveryMode::ProxyInjected
            || provider.kind() != lease.provider
            || !grant.hosts.iter().any(|p| hosts::matches(p, &req.host))
        {
            let e = BrokerError::Forbidden(format!(
                "credential {} no longer covers this request",
                lease.credential
            ));
            return Err(self.deny_substitution(caller, &run, req, Some(&lease), e));
        }
        // Checked before the provider produces anything: a TLS-only secret never exists in a
        // cleartext request, not even in the answer to the proxy.
        if req.transport == Transport::Cleartext && !grant.allow_cleartext {
            let e = BrokerError::TlsRequired(format!(
                "credential {} may only be sent over TLS; refusing to put it into a cleartext \
                 HTTP request to {}:{} (a policy can permit it with allowCleartext: true)",
                lease.credential,
                hosts::normalize(&req.host),
                req.port
            ));
            return Err(self.deny_substitution(caller, &run, req, Some(&lease), e));
        }
        let mut out = match provider.substitute(&lease, &req.headers, &query_names, &placements) {
            Ok(out) => out,
            Err(e) => {
                return Err(self.deny_substitution(caller, &run, req, Some(&lease), e.into()));
            }
        };
        out.matched = true;
        out.lease_id = Some(lease.lease_id.clone());
        out.credential = Some(lease.credential.clone());
        out.grant = grant_seq.map(|seq| self.grant_terms(&run, &lease, seq));
        Ok(out)
    }

    /// Before anything is read (see [`crate::grants`]): marks the run in the caller's
    /// subscription and takes the sequence number its answer will carry.
    fn begin_grant(
        &self,
        caller: &Identity,
        req: &SubstituteAuthRequest,
    ) -> Result<Option<u64>, BrokerError> {
        let Some(id) = &req.subscription else {
            return Ok(None);
        };
        // On a shared store another replica may commit a revocation this process's grant hub
        // never hears of, so no reusable grant is handed out: every request comes back here
        // and reads the lease afresh (see ARCHITECTURE.md, "Broker replicas").
        if self.store.is_shared() {
            return Ok(None);
        }
        check_id("subscription", id)?;
        check_id("run", &req.run)?;
        Ok(Some(self.grants.begin(&caller.subject, id, &req.run)?))
    }

    /// Terms of a reusable answer: a block of the run's substitution budget (the request at
    /// hand's token is already taken), at most the configured lifetime and never past the
    /// lease's expiry.
    fn grant_terms(&self, run: &RunInfo, lease: &LeaseInfo, seq: u64) -> GrantTerms {
        let config = self.grants.config();
        let spec = self.limits.config().substitute;
        // About a tenth of a second's worth per grant: at the full rate the proxy comes back
        // ten times a second, and an idle grant wastes little of the budget.
        let block = (spec.per_second / 10)
            .clamp(1, spec.burst.max(1))
            .min(config.max_uses.max(1));
        let extra = if block > 1 {
            self.limits
                .take_up_to(&run.namespace, &run.run, KIND_SUBSTITUTE, block - 1)
                .unwrap_or(0)
        } else {
            0
        };
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(u64::MAX, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
            });
        let lease_left_ms = lease.expires_at.saturating_mul(1000).saturating_sub(now_ms);
        let ttl_ms = u64::try_from(config.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .min(lease_left_ms);
        GrantTerms {
            seq,
            uses: 1 + extra,
            ttl_ms,
        }
    }

    pub fn leases(&self, caller: &Identity, run: &str) -> Result<LeasesResponse, BrokerError> {
        let run = self.authorize_run(caller, run)?;
        Ok(LeasesResponse {
            leases: self.store.leases_for_run(&run.run)?,
        })
    }
}

/// The placeholder of a request (at most one distinct bearer), where it sits, and the
/// request's query parameter names.
type Found = (Option<String>, Vec<Placement>, Vec<String>);

/// The renewal walker renews through [`Broker::renew`] as its own caller, so a renewal gets
/// the same checks and audit records (a failure keeps the lease and is recorded as
/// `renewal-failed`) as one a client asked for.
impl LeaseRenewer for Broker {
    fn due_leases(
        &self,
        run: &RunInfo,
        window: std::time::Duration,
    ) -> Result<Vec<LeaseInfo>, String> {
        let now = now_secs();
        let horizon = now.saturating_add(window.as_secs());
        Ok(self
            .store
            .leases_for_run(&run.run)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|l| !l.revoked && l.expires_at > now && l.expires_at <= horizon)
            .collect())
    }

    fn renew_lease(&self, run: &RunInfo, lease: &LeaseInfo) -> Result<u64, String> {
        let walker = Identity {
            subject: RENEWAL_WALKER.to_owned(),
            namespace: run.namespace.clone(),
            service_account: None,
            scopes: BTreeSet::from([Scope::Renew]),
            backend: "internal",
            run: Some(run.run.clone()),
            node: None,
            placement: None,
        };
        self.renew(
            &walker,
            &RenewRequest {
                lease_id: lease.lease_id.clone(),
            },
        )
        .map(|r| r.expires_at)
        .map_err(|e| e.to_string())
    }
}

pub(crate) fn find_placeholders(req: &SubstituteAuthRequest) -> Result<Found, BrokerError> {
    let mut tokens: BTreeSet<String> = BTreeSet::new();
    let mut placements = Vec::new();
    for h in &req.headers {
        let name = h.name.to_ascii_lowercase();
        if name == "authorization"
            && let Some((user, pass)) = decode_basic(&h.value)
        {
            let hits: Vec<String> = bearer::find_in(&user)
                .chain(bearer::find_in(&pass))
                .map(str::to_owned)
                .collect();
            if !hits.is_empty() {
                tokens.extend(hits);
                placements.push(Placement::Basic { username: user });
                continue;
            }
        }
        let hits: Vec<&str> = bearer::find_in(&h.value).collect();
        if !hits.is_empty() {
            tokens.extend(hits.into_iter().map(str::to_owned));
            placements.push(Placement::Header(name));
        }
    }
    let mut query_names = Vec::new();
    if let Some(query) = &req.query {
        for (k, v) in codec::query::pairs(query) {
            let (k, v) = (codec::query::decode(k), codec::query::decode(v));
            let hits: Vec<&str> = bearer::find_in(&v).collect();
            if !hits.is_empty() {
                tokens.extend(hits.into_iter().map(str::to_owned));
                placements.push(Placement::Query(k.clone()));
            }
            if !query_names.contains(&k) {
                query_names.push(k);
            }
        }
    }
    if tokens.len() > 1 {
        return Err(BrokerError::BadRequest(
            "the request carries more than one distinct placeholder".into(),
        ));
    }
    Ok((tokens.into_iter().next(), placements, query_names))
}

impl RunDirectory for Broker {
    fn run_namespace(&self, run_id: &str) -> Option<String> {
        // A store error answers "unknown run": the caller is refused (fail closed).
        self.store.run(run_id).ok().flatten().map(|r| r.namespace)
    }
}

#[cfg(test)]
mod tests;

/// The revoked intermediates in `store` that have not expired at `now`, for a CRL.
pub fn revoked_node_cas(
    store: &Store,
    now: time::OffsetDateTime,
) -> Result<Vec<crate::node_ca::Revoked>, StoreError> {
    let secs = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    Ok(store
        .node_cas(secs)?
        .into_iter()
        .filter_map(|r| {
            let at = r.revoked_at?;
            Some(crate::node_ca::Revoked {
                serial: r.serial,
                revoked_at: time::OffsetDateTime::from_unix_timestamp(
                    i64::try_from(at).unwrap_or(i64::MAX),
                )
                .unwrap_or(now),
            })
        })
        .collect())
}
