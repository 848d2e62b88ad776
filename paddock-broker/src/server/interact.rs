//! The interactive routes: prompts, interrupt, end and the attach WebSocket.
//!
//! Each is authorized and audited by [`Broker::authorize_interactive`] before anything
//! reaches the adapter, which is found through the run (the router's connector), never
//! through the caller. Adapter failures are 502 `AdapterUnavailable` with the reason.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        protocol::{CloseFrame, Role, frame::coding::CloseCode},
    },
};

use super::{
    State,
    calls::{blocking, broker_error},
    op::{Op, RunPath},
    respond::{Resp, error_response, json_error_message, ok_json, read_json_body},
    websocket::{self, websocket_key},
};
use crate::{
    audit::AuditKind,
    auth::{Identity, Scope},
    broker::Broker,
    interactive::{AdapterError, Output, adapter_post},
    wire::{ErrorCode, RunInfo},
};

/// How long the adapter may take to accept a prompt, interrupt or end, or to open its output.
const ADAPTER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a prompt waits for the run's previous prompt before giving up (503).
const PROMPT_QUEUE_TIMEOUT: Duration = Duration::from_mins(1);

/// A prompt as a caller sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptBody {
    pub text: String,
}

/// A prompt as the adapter receives it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdapterPrompt {
    pub text: String,
    pub seq: u64,
    /// Who sent it (the caller's subject as the broker authenticated it).
    pub submitter: String,
}

#[derive(Debug, Serialize)]
struct PromptAnswer {
    seq: u64,
}

#[derive(Debug, Serialize)]
struct Acknowledged {
    ok: bool,
}

fn kind_of(op: Op) -> AuditKind {
    match op {
        Op::Prompt => AuditKind::RunPrompted,
        Op::Interrupt => AuditKind::RunInterrupted,
        Op::End => AuditKind::RunEnded,
        Op::Shell => AuditKind::ShellOpened,
        _ => AuditKind::RunAttached,
    }
}

fn adapter_error(e: &AdapterError) -> Resp {
    tracing::info!(error = %e, "adapter unavailable");
    match e {
        AdapterError::NotConfigured(_) => error_response(
            ErrorCode::AdapterUnavailable,
            format!("{e}: this broker has no way to reach the run's adapter"),
        ),
        _ => error_response(ErrorCode::AdapterUnavailable, e.to_string()),
    }
}

/// A caller without the route's scope: 403, and the refusal is audited.
pub(super) async fn denied_scope(
    state: &Arc<State>,
    identity: &Identity,
    rp: &RunPath,
    scope: Scope,
) -> Resp {
    let (subject, ns, run) = (
        identity.subject.clone(),
        rp.namespace.clone(),
        rp.run.clone(),
    );
    let reason = format!("caller lacks scope {}", scope.as_str());
    let why = reason.clone();
    match blocking(state, move |b| {
        b.audit_interactive(AuditKind::InteractDenied, &subject, &ns, &run, Some(why))
    })
    .await
    {
        Ok(()) => error_response(ErrorCode::Forbidden, reason),
        Err(e) => broker_error(&e),
    }
}

pub(super) async fn handle(
    state: &Arc<State>,
    identity: Identity,
    op: Op,
    rp: RunPath,
    req: Request<Incoming>,
) -> Resp {
    // The body is read only after the caller was authenticated (the server did that).
    if matches!(op, Op::Attach | Op::Shell)
        && let Err(why) = websocket_key(&req)
    {
        return error_response(ErrorCode::BadRequest, why);
    }
    let mut attach_req = None;
    let prompt = if op == Op::Prompt {
        let body = match read_json_body(req).await {
            Ok(body) => body,
            Err(resp) => return resp,
        };
        match serde_json::from_slice::<PromptBody>(&body) {
            Ok(p) => Some(p),
            Err(e) => return error_response(ErrorCode::BadRequest, json_error_message(&e)),
        }
    } else {
        attach_req = Some(req);
        None
    };
    let kind = kind_of(op);
    let caller = identity.clone();
    let (ns, run_id) = (rp.namespace.clone(), rp.run.clone());
    let run = match blocking(state, move |b| {
        b.authorize_interactive(&caller, &ns, &run_id, kind)
    })
    .await
    {
        Ok(run) => run,
        Err(e) => return broker_error(&e),
    };
    match (op, prompt) {
        (Op::Prompt, Some(p)) => prompt_run(state, &identity, run, p).await,
        (Op::Interrupt | Op::End, _) => simple(state, &identity, run, op).await,
        (Op::Attach, _) => match attach_req {
            Some(req) => attach(state, &identity, run, req).await,
            None => error_response(ErrorCode::Internal, "internal error"),
        },
        (Op::Shell, _) => match attach_req {
            Some(req) => super::shell::open(state, &identity, run, req).await,
            None => error_response(ErrorCode::Internal, "internal error"),
        },
        _ => error_response(ErrorCode::Internal, "internal error"),
    }
}

/// Numbers the prompt, renews the run's leases close to expiry, and delivers it, all under
/// the run's prompt lock so one run's prompts reach its adapter one at a time, in order.
async fn prompt_run(state: &Arc<State>, identity: &Identity, run: RunInfo, p: PromptBody) -> Resp {
    let router = state.broker.interactive().clone();
    let lock = router.prompt_lock(&run.namespace, &run.run);
    let Ok(_turn) = tokio::time::timeout(PROMPT_QUEUE_TIMEOUT, lock.lock_owned()).await else {
        return error_response(
            ErrorCode::Unavailable,
            "the run's previous prompt is still being delivered",
        );
    };
    let subject = identity.subject.clone();
    let r = run.clone();
    let seq = blocking(state, move |b| {
        let seq = b
            .interactive()
            .next_seq(&**b.store(), &r.namespace, &r.run)?;
        b.audit_interactive(
            AuditKind::RunPrompted,
            &subject,
            &r.namespace,
            &r.run,
            Some(format!("seq {seq}")),
        )?;
        let window = b.interactive().config().renew_window;
        let walked = b.interactive().walker().walk(b, &r, window);
        if !walked.renewed.is_empty() || !walked.failed.is_empty() {
            tracing::info!(
                renewed = walked.renewed.len(),
                failed = walked.failed.len(),
                "leases walked on prompt"
            );
        }
        Ok(seq)
    })
    .await;
    let seq = match seq {
        Ok(seq) => seq,
        Err(e) => return broker_error(&e),
    };
    let Some(connector) = router.connector() else {
        return adapter_error(&AdapterError::NotConfigured(run.run.clone()));
    };
    let body = match serde_json::to_vec(&AdapterPrompt {
        text: p.text,
        seq,
        submitter: identity.subject.clone(),
    }) {
        Ok(b) => Bytes::from(b),
        Err(_) => return error_response(ErrorCode::Internal, "internal error"),
    };
    match adapter_post(&*connector, &run, "/prompts", body, ADAPTER_TIMEOUT).await {
        Ok(_) => ok_json(&PromptAnswer { seq }),
        Err(e) => adapter_error(&e),
    }
}

async fn simple(state: &Arc<State>, identity: &Identity, run: RunInfo, op: Op) -> Resp {
    let kind = kind_of(op);
    let subject = identity.subject.clone();
    let r = run.clone();
    if let Err(e) = blocking(state, move |b| {
        b.audit_interactive(kind, &subject, &r.namespace, &r.run, None)
    })
    .await
    {
        return broker_error(&e);
    }
    let Some(connector) = state.broker.interactive().connector() else {
        return adapter_error(&AdapterError::NotConfigured(run.run.clone()));
    };
    let path = if op == Op::End { "/end" } else { "/interrupt" };
    match adapter_post(&*connector, &run, path, Bytes::new(), ADAPTER_TIMEOUT).await {
        Ok(_) => ok_json(&Acknowledged { ok: true }),
        Err(e) => adapter_error(&e),
    }
}

/// Counts an attached client until dropped, then counts it off (and records the detach).
struct Attached {
    state: Arc<State>,
    subject: String,
    run: RunInfo,
    /// Whether the attach was recorded (only then is the detach).
    recorded: bool,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let router = self.state.broker.interactive();
        let left = router.on_detach(&self.run.namespace, &self.run.run);
        tracing::debug!(run = %self.run.run, left, "client detached");
        if !self.recorded {
            return;
        }
        let (broker, subject, run) = (
            self.state.broker.clone(),
            std::mem::take(&mut self.subject),
            self.run.clone(),
        );
        // Drop runs on a runtime thread: the fsync'd record goes to the blocking pool.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn_blocking(move || {
                if let Err(e) = broker.audit_interactive(
                    AuditKind::RunDetached,
                    &subject,
                    &run.namespace,
                    &run.run,
                    None,
                ) {
                    tracing::error!(error = %e, "audit record of a detach failed");
                }
            });
        }
    }
}

async fn attach(
    state: &Arc<State>,
    identity: &Identity,
    run: RunInfo,
    mut req: Request<Incoming>,
) -> Resp {
    let Ok(key) = websocket_key(&req) else {
        return error_response(ErrorCode::BadRequest, "not a WebSocket upgrade");
    };
    let router = state.broker.interactive().clone();
    // Counted first, so a detach of the last other client cannot stop the output pump this
    // attach is about to share; the guard counts it off on every path below.
    let count = router.on_attach(&run.namespace, &run.run);
    let mut guard = Attached {
        state: state.clone(),
        subject: identity.subject.clone(),
        run: run.clone(),
        recorded: false,
    };
    // Subscribed before answering, so nothing the adapter writes after the 101 is missed.
    let mut output = match router.subscribe_output(&run, ADAPTER_TIMEOUT).await {
        Ok(rx) => rx,
        Err(e) => return adapter_error(&e),
    };
    let subject = identity.subject.clone();
    let r = run.clone();
    if let Err(e) = blocking(state, move |b| {
        b.audit_interactive(AuditKind::RunAttached, &subject, &r.namespace, &r.run, None)
    })
    .await
    {
        return broker_error(&e);
    }
    guard.recorded = true;
    tracing::info!(run = %run.run, attached = count, "client attached");
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _guard = guard;
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "attach upgrade failed");
                return;
            }
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let close = loop {
            tokio::select! {
                out = output.recv() => match out {
                    Ok(Output::Data(data)) => {
                        if ws.send(Message::Binary(data)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Output::End(why)) => break (CloseCode::Away, why),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        break (CloseCode::Policy, format!("client too slow: {n} messages dropped"));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        break (CloseCode::Away, "the run's output closed".to_owned());
                    }
                },
                msg = ws.next() => match msg {
                    // What clients send is ignored (prompts go through POST /prompts).
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                    Some(Ok(_)) => {}
                },
            }
        };
        let _ = ws
            .send(Message::Close(Some(CloseFrame {
                code: close.0,
                reason: close.1.into(),
            })))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    });
    websocket::accepted(&key)
}

/// The timer's share, every second: every `walk_interval` (when `walk` is set) walk the
/// leases of every interactive run; and end the runs the idle watchdog finds idle (no
/// attached client and no prompt for the run's timeout: the shortest of the policies that
/// apply to it, else the broker's `interactive.idleTimeoutSecs`).
pub(super) async fn tick(broker: Arc<Broker>, walk: bool) {
    let router = broker.interactive().clone();
    let global = router.config().idle_timeout;
    // Only runs quiet for at least the shortest timeout anywhere can be idle: the others are
    // not loaded from the store.
    let shortest = match (global, broker.policy().current().shortest_idle_timeout()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let quiet: std::collections::HashMap<_, _> = match shortest {
        Some(shortest) => router
            .quiet_runs(std::time::Instant::now())
            .into_iter()
            .filter(|(_, q)| *q >= shortest)
            .collect(),
        None => std::collections::HashMap::new(),
    };
    if !walk && quiet.is_empty() {
        return;
    }
    let known = if walk {
        router.known_runs()
    } else {
        quiet.keys().cloned().collect()
    };
    let b = broker.clone();
    let runs = tokio::task::spawn_blocking(move || {
        let window = b.interactive().config().renew_window;
        let policy = b.policy().current();
        let mut idle = Vec::new();
        for (ns, run_id) in known {
            match b.store().run(&run_id) {
                Ok(Some(run)) if run.namespace == ns && run.phase.is_active() => {
                    if walk {
                        b.interactive().walker().walk(&*b, &run, window);
                    }
                    let limit = policy.idle_timeout(&run).or(global);
                    let key = (run.namespace.clone(), run.run.clone());
                    if let (Some(limit), Some(q)) = (limit, quiet.get(&key))
                        && *q >= limit
                    {
                        idle.push(run);
                    }
                }
                // Gone or finished while we were not looking: nothing to keep.
                Ok(_) => b.interactive().forget(&ns, &run_id),
                Err(e) => tracing::warn!(error = %e, "loading an interactive run failed"),
            }
        }
        idle
    })
    .await
    .unwrap_or_default();
    for run in runs {
        let b = broker.clone();
        let r = run.clone();
        let recorded = tokio::task::spawn_blocking(move || {
            b.audit_interactive(
                AuditKind::RunIdleEnded,
                "broker:idle-watchdog",
                &r.namespace,
                &r.run,
                Some("no attached client and no prompt within the idle timeout".into()),
            )
        })
        .await;
        if !matches!(recorded, Ok(Ok(()))) {
            tracing::error!(run = %run.run, "idle end not recorded; the run is left alone");
            continue;
        }
        // Forgotten either way: an adapter that cannot be told is not asked every second.
        router.forget(&run.namespace, &run.run);
        let Some(connector) = router.connector() else {
            continue;
        };
        match adapter_post(&*connector, &run, "/end", Bytes::new(), ADAPTER_TIMEOUT).await {
            Ok(_) => tracing::info!(run = %run.run, "idle run ended"),
            Err(e) => tracing::warn!(run = %run.run, error = %e, "ending an idle run failed"),
        }
    }
}
