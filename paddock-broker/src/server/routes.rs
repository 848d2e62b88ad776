//! The API route table and request handling.
//!
//! Every route declares the scope it needs; a route without one is refused (fail closed).
//! Authentication happens before the body is read, so unauthenticated callers cannot make
//! the broker buffer anything.

use std::{convert::Infallible, sync::Arc, time::Instant};

use http::{HeaderValue, Request, header};
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use serde::{Serialize, de::DeserializeOwned};
use tracing::Instrument;

use super::State;
pub use super::op::{Op, RunPath};
pub use super::respond::UNAUTHENTICATED_BODY;
pub(crate) use super::respond::{
    Resp, error_response, json_error_message, ok_json, read_json_body, unauthenticated,
};
use crate::{
    auth::{
        AuthError, Identity, Scope,
        pods::{PlacementError, RunPlacement},
    },
    broker::{Broker, BrokerError},
    grants::{GrantError, PollStep},
    wire::{
        self, ErrorCode, GrantPollRequest, SubstituteAuthRequest, ValidateEgressRequest, paths,
    },
};

/// Paths of the interactive routes (`{namespace}` and `{run}` are path parameters).
pub mod interactive_paths {
    pub const PROMPTS: &str = "/v1/runs/{namespace}/{run}/prompts";
    pub const INTERRUPT: &str = "/v1/runs/{namespace}/{run}/interrupt";
    pub const END: &str = "/v1/runs/{namespace}/{run}/end";
    pub const ATTACH: &str = "/v1/runs/{namespace}/{run}/attach";
    pub const SHELL: &str = "/v1/runs/{namespace}/{run}/shell";
}

/// One API route.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    /// The scope a caller needs. `None` makes the route unreachable (fail closed).
    pub scope: Option<Scope>,
    pub op: Op,
}

pub const ROUTES: &[Route] = &[
    Route {
        method: "POST",
        path: paths::ISSUE,
        scope: Some(Scope::Issue),
        op: Op::Issue,
    },
    Route {
        method: "POST",
        path: paths::RENEW,
        scope: Some(Scope::Renew),
        op: Op::Renew,
    },
    Route {
        method: "POST",
        path: paths::REVOKE,
        scope: Some(Scope::Revoke),
        op: Op::Revoke,
    },
    Route {
        method: "POST",
        path: paths::VALIDATE_EGRESS,
        scope: Some(Scope::ValidateEgress),
        op: Op::ValidateEgress,
    },
    Route {
        method: "POST",
        path: paths::SUBSTITUTE_AUTH,
        scope: Some(Scope::SubstituteAuth),
        op: Op::SubstituteAuth,
    },
    Route {
        method: "GET",
        path: paths::LEASES,
        scope: Some(Scope::LeasesRead),
        op: Op::Leases,
    },
    Route {
        method: "POST",
        path: paths::RUNS,
        scope: Some(Scope::Controller),
        op: Op::Runs,
    },
    // The invalidation stream is part of substituting: whoever may substitute may subscribe.
    Route {
        method: "POST",
        path: paths::GRANTS_POLL,
        scope: Some(Scope::SubstituteAuth),
        op: Op::GrantsPoll,
    },
    // Every proxy and node agent validates egress, so that scope is the one a readiness check
    // is sure to hold; the answer says nothing a validate-egress call would not.
    Route {
        method: "GET",
        path: paths::PING,
        scope: Some(Scope::ValidateEgress),
        op: Op::Ping,
    },
    Route {
        method: "POST",
        path: interactive_paths::PROMPTS,
        scope: Some(Scope::Interact),
        op: Op::Prompt,
    },
    Route {
        method: "POST",
        path: interactive_paths::INTERRUPT,
        scope: Some(Scope::Interact),
        op: Op::Interrupt,
    },
    Route {
        method: "POST",
        path: interactive_paths::END,
        scope: Some(Scope::End),
        op: Op::End,
    },
    Route {
        method: "GET",
        path: interactive_paths::ATTACH,
        scope: Some(Scope::Attach),
        op: Op::Attach,
    },
    Route {
        method: "GET",
        path: interactive_paths::SHELL,
        scope: Some(Scope::Shell),
        op: Op::Shell,
    },
    // Only node agents, and each only for the node its token is bound to (checked by the
    // broker against the token's node, never the caller's word).
    Route {
        method: "GET",
        path: paths::NODE_TUNNEL,
        scope: Some(Scope::NodeAgent),
        op: Op::NodeTunnel,
    },
    Route {
        method: "POST",
        path: paths::NODE_CA,
        scope: Some(Scope::NodeAgent),
        op: Op::NodeCa,
    },
    // Node agents watch it to replace a revoked intermediate at once.
    Route {
        method: "GET",
        path: paths::NODE_CA_CRL,
        scope: Some(Scope::NodeAgent),
        op: Op::NodeCaCrl,
    },
];

/// Matches `path` against a route pattern whose `{...}` segments are parameters (one
/// non-empty, percent-decoded segment each). Returns the parameters in order.
fn match_pattern(pattern: &str, path: &str) -> Option<Vec<String>> {
    let mut params = Vec::new();
    let mut pat = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (pat.next(), got.next()) {
            (None, None) => return Some(params),
            (Some(p), Some(g)) if p.starts_with('{') && p.ends_with('}') => {
                let value = percent_decode_str(g).decode_utf8().ok()?;
                if value.is_empty() || value.contains('/') {
                    return None;
                }
                params.push(value.into_owned());
            }
            (Some(p), Some(g)) if p == g => {}
            _ => return None,
        }
    }
}

/// The route serving `path` and its (namespace, run) when it has them.
pub fn find_route(path: &str) -> Option<(Route, Option<RunPath>)> {
    ROUTES.iter().find_map(|r| {
        let mut params = match_pattern(r.path, path)?.into_iter();
        let run_path = match (params.next(), params.next()) {
            (Some(namespace), Some(run)) => Some(RunPath { namespace, run }),
            _ => None,
        };
        Some((*r, run_path))
    })
}

fn bearer_of(req: &Request<Incoming>) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

pub(crate) async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let started = Instant::now();
    let found = find_route(req.uri().path());
    let route_name = found.as_ref().map_or("unknown", |(r, _)| r.path);
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        route = route_name,
        caller = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    let resp = dispatch(&state, found, req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    span.record("status", status);
    state
        .metrics
        .observe_request(route_name, status, started.elapsed().as_secs_f64());
    span.in_scope(|| tracing::debug!(status, "request done"));
    Ok(resp)
}

/// The caller behind the request's bearer, or the answer that refuses it (401 byte for byte
/// the same whatever the reason; 403; 503 when a backend cannot decide).
async fn authenticate(state: &Arc<State>, req: &Request<Incoming>) -> Result<Identity, Resp> {
    let Some(token) = bearer_of(req) else {
        state.metrics.auth_failure("missing");
        return Err(unauthenticated());
    };
    match state.auth.authenticate(token).await {
        Ok(identity) => Ok(identity),
        Err(AuthError::Unauthenticated(reason)) => {
            state.metrics.auth_failure("unauthenticated");
            tracing::info!(%reason, "authentication failed");
            Err(unauthenticated())
        }
        Err(AuthError::Forbidden(reason)) => {
            state.metrics.auth_failure("forbidden");
            tracing::info!(%reason, "authentication refused");
            Err(error_response(
                ErrorCode::Forbidden,
                "caller is not allowed",
            ))
        }
        Err(AuthError::Unavailable(reason)) => {
            state.metrics.auth_failure("unavailable");
            tracing::warn!(%reason, "authentication backend unavailable");
            Err(error_response(
                ErrorCode::Unavailable,
                "authentication backend unavailable",
            ))
        }
    }
}

async fn dispatch(
    state: &Arc<State>,
    found: Option<(Route, Option<RunPath>)>,
    req: Request<Incoming>,
) -> Resp {
    let Some((route, run_path)) = found else {
        return error_response(ErrorCode::NotFound, "no such route");
    };
    if req.method().as_str() != route.method {
        let mut resp = error_response(ErrorCode::MethodNotAllowed, format!("use {}", route.method));
        if let Ok(v) = HeaderValue::from_str(route.method) {
            resp.headers_mut().insert(header::ALLOW, v);
        }
        return resp;
    }
    let Some(scope) = route.scope else {
        tracing::error!("route without a declared scope refused");
        return error_response(ErrorCode::Forbidden, "route is not available");
    };
    let identity = match authenticate(state, &req).await {
        Ok(identity) => identity,
        Err(resp) => return resp,
    };
    tracing::Span::current().record("caller", identity.subject.as_str());
    if !identity.has(scope) {
        if let (true, Some(rp)) = (route.op.is_interactive(), &run_path) {
            return super::interact::denied_scope(state, &identity, rp, scope).await;
        }
        return error_response(
            ErrorCode::Forbidden,
            format!("caller lacks scope {}", scope.as_str()),
        );
    }
    // A node agent acts for the runs on its node through these two calls and nothing else,
    // whatever scopes a configuration gave it.
    if identity.is_node_agent() && !route.op.is_for_node_agents() {
        return error_response(
            ErrorCode::Forbidden,
            "node agents may only call validate-egress, substitute-auth, grants/poll, ping, \
             node-ca and node/tunnel",
        );
    }
    if route.op == Op::Ping {
        return ping(state).await;
    }
    if route.op == Op::NodeCaCrl {
        return node_ca_crl(state, identity).await;
    }
    if route.op == Op::NodeTunnel {
        return super::tunnel::accept(state, &identity, req);
    }
    // Interactive patterns always carry their (namespace, run).
    if let (true, Some(rp)) = (route.op.is_interactive(), run_path) {
        return super::interact::handle(state, identity, route.op, rp, req).await;
    }
    if route.op == Op::Leases {
        return match leases_query(req.uri().query()) {
            Ok(run) => {
                call(
                    state,
                    identity,
                    run,
                    |b: &Broker, id: &Identity, run: &String| b.leases(id, run),
                )
                .await
            }
            Err(msg) => error_response(ErrorCode::BadRequest, msg),
        };
    }
    let body = match read_json_body(req).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    match route.op {
        Op::Issue => parse_and_call(state, identity, &body, Broker::issue).await,
        Op::Renew => parse_and_call(state, identity, &body, Broker::renew).await,
        Op::Revoke => parse_and_call(state, identity, &body, Broker::revoke).await,
        Op::ValidateEgress => {
            parse_and_call_for_run(state, identity, &body, Broker::validate_egress).await
        }
        Op::SubstituteAuth => {
            parse_and_call_for_run(state, identity, &body, Broker::substitute_auth).await
        }
        Op::Runs => parse_and_call(state, identity, &body, Broker::upsert_run).await,
        Op::GrantsPoll => match serde_json::from_slice::<GrantPollRequest>(&body) {
            Ok(request) => grants_poll(state, &identity, request).await,
            Err(e) => error_response(ErrorCode::BadRequest, json_error_message(&e)),
        },
        Op::NodeCa => {
            let resp = parse_and_call(state, identity, &body, Broker::issue_node_ca).await;
            state.metrics.node_ca_request(resp.status().as_u16());
            resp
        }
        Op::Leases
        | Op::Ping
        | Op::NodeCaCrl
        | Op::Prompt
        | Op::Interrupt
        | Op::End
        | Op::Attach
        | Op::Shell
        | Op::NodeTunnel => error_response(ErrorCode::Internal, "internal error"),
    }
}

/// The node CA revocation list, DER (built off the runtime: it reads the store).
async fn node_ca_crl(state: &Arc<State>, identity: Identity) -> Resp {
    let broker = state.broker.clone();
    let span = tracing::Span::current();
    let result =
        tokio::task::spawn_blocking(move || span.in_scope(|| broker.node_ca_crl(&identity))).await;
    match result {
        Ok(Ok(der)) => {
            let mut resp = Resp::new(http_body_util::Full::new(bytes::Bytes::from(der)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/pkix-crl"),
            );
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Ok(Err(e)) => {
            tracing::info!(error = %e, "node CA revocation list refused");
            error_response(e.code(), e.public_message())
        }
        Err(_) => error_response(ErrorCode::Internal, "internal error"),
    }
}

/// The store answers (off the runtime: the `PostgreSQL` client blocks).
async fn ping(state: &Arc<State>) -> Resp {
    let broker = state.broker.clone();
    let kind = broker.store().kind();
    match tokio::task::spawn_blocking(move || broker.store().ping()).await {
        Ok(Ok(())) => ok_json(&wire::PingResponse {
            store: kind.to_owned(),
        }),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "ping: store unavailable");
            error_response(ErrorCode::Unavailable, "store unavailable")
        }
        Err(_) => error_response(ErrorCode::Internal, "internal error"),
    }
}

/// Subscribes, or acknowledges and waits (up to the hold time) for newer invalidations.
/// Only the hub's short critical sections run here; nothing blocks the runtime.
async fn grants_poll(state: &Arc<State>, identity: &Identity, request: GrantPollRequest) -> Resp {
    let hub = state.broker.grants().clone();
    let owner = identity.subject.as_str();
    let Some(id) = request.subscription else {
        return match hub.subscribe(owner) {
            Ok(answer) => ok_json(&answer),
            Err(e) => grant_error(&e),
        };
    };
    // Taken before the check, so an event published in between still wakes this poll.
    let mut changes = hub.changes();
    match hub.poll(owner, &id, request.acked) {
        Ok(PollStep::Ready(answer)) => ok_json(&answer),
        Ok(PollStep::Wait) => {
            let _ = tokio::time::timeout(hub.config().hold, changes.changed()).await;
            match hub.collect(owner, &id) {
                Ok(answer) => ok_json(&answer),
                Err(e) => grant_error(&e),
            }
        }
        Err(e) => grant_error(&e),
    }
}

fn grant_error(e: &GrantError) -> Resp {
    let e = BrokerError::from(e.clone());
    error_response(e.code(), e.public_message())
}

fn leases_query(query: Option<&str>) -> Result<String, String> {
    let mut run = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != "run" {
            return Err(format!(
                "unknown query parameter {:?}",
                percent_decode_str(k).decode_utf8_lossy()
            ));
        }
        if run.is_some() {
            return Err("run given more than once".into());
        }
        run = Some(
            percent_decode_str(v)
                .decode_utf8()
                .map_err(|_| "run is not UTF-8".to_owned())?
                .into_owned(),
        );
    }
    run.filter(|r| !r.is_empty())
        .ok_or_else(|| "query parameter run is required".to_owned())
}

async fn parse_and_call<Req, Out>(
    state: &Arc<State>,
    identity: Identity,
    body: &[u8],
    op: fn(&Broker, &Identity, &Req) -> Result<Out, BrokerError>,
) -> Resp
where
    Req: DeserializeOwned + Send + 'static,
    Out: Serialize + Send + 'static,
{
    match serde_json::from_slice::<Req>(body) {
        Ok(request) => call(state, identity, request, op).await,
        Err(e) => error_response(ErrorCode::BadRequest, json_error_message(&e)),
    }
}

/// A request that names the run it acts for.
trait NamesRun {
    fn run(&self) -> &str;
}

impl NamesRun for ValidateEgressRequest {
    fn run(&self) -> &str {
        &self.run
    }
}

impl NamesRun for SubstituteAuthRequest {
    fn run(&self) -> &str {
        &self.run
    }
}

/// Like [`parse_and_call`], but a node agent's request first gets the API server's word on
/// where the named run's pod runs, for the broker to compare with the caller's node.
async fn parse_and_call_for_run<Req, Out>(
    state: &Arc<State>,
    mut identity: Identity,
    body: &[u8],
    op: fn(&Broker, &Identity, &Req) -> Result<Out, BrokerError>,
) -> Resp
where
    Req: NamesRun + DeserializeOwned + Send + 'static,
    Out: Serialize + Send + 'static,
{
    let request = match serde_json::from_slice::<Req>(body) {
        Ok(request) => request,
        Err(e) => return error_response(ErrorCode::BadRequest, json_error_message(&e)),
    };
    if identity.is_node_agent() {
        identity.placement = place(state, request.run()).await.map(Arc::new);
    }
    call(state, identity, request, op).await
}

/// Where the API server says the pod of registered run `run_id` runs; `None` for a run the
/// store does not know (the broker then refuses it like any unknown run).
async fn place(state: &Arc<State>, run_id: &str) -> Option<RunPlacement> {
    let broker = state.broker.clone();
    let id = run_id.to_owned();
    let run = match tokio::task::spawn_blocking(move || broker.store().run(&id)).await {
        Ok(Ok(run)) => run?,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "loading a node agent's run failed");
            return None;
        }
        Err(e) => {
            tracing::error!(error = %e, "run lookup task failed");
            return None;
        }
    };
    let outcome = match state.broker.pod_locator() {
        Some(locator) => locator.locate(&run.namespace, &run.run).await,
        None => Err(PlacementError::NotConfigured),
    };
    if let Err(e) = &outcome {
        tracing::info!(run = %run.run, error = %e, "node agent's run not placed on a node");
    }
    Some(RunPlacement {
        run: run.run,
        namespace: run.namespace,
        outcome,
    })
}

/// Runs a broker operation on the blocking pool (`SQLite` and fsync'd audit writes block).
async fn call<Req, Out>(
    state: &Arc<State>,
    identity: Identity,
    request: Req,
    op: fn(&Broker, &Identity, &Req) -> Result<Out, BrokerError>,
) -> Resp
where
    Req: Send + 'static,
    Out: Serialize + Send + 'static,
{
    let broker = state.broker.clone();
    let span = tracing::Span::current();
    let result =
        tokio::task::spawn_blocking(move || span.in_scope(|| op(&broker, &identity, &request)))
            .await;
    match result {
        Ok(Ok(out)) => ok_json(&out),
        Ok(Err(e)) => {
            match e.code() {
                ErrorCode::Internal | ErrorCode::AuditUnavailable | ErrorCode::Unavailable => {
                    tracing::error!(error = %e, "request failed");
                }
                _ => tracing::info!(error = %e, "request refused"),
            }
            error_response(e.code(), e.public_message())
        }
        Err(join) => {
            tracing::error!(error = %join, "broker task failed");
            error_response(ErrorCode::Internal, "internal error")
        }
    }
}

/// Checks the route table: every route must declare a scope and paths must be unique.
pub fn validate_routes(routes: &[Route]) -> Result<(), String> {
    for (i, r) in routes.iter().enumerate() {
        if r.scope.is_none() {
            return Err(format!("route {} {} declares no scope", r.method, r.path));
        }
        if routes[..i].iter().any(|o| o.path == r.path) {
            return Err(format!("route {} is declared twice", r.path));
        }
    }
    if !routes
        .iter()
        .any(|r| r.path == wire::paths::SUBSTITUTE_AUTH)
    {
        return Err("substitute-auth route missing".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_table_is_valid_and_a_missing_scope_is_caught() {
        validate_routes(ROUTES).expect("shipped routes are valid");
        let mut routes = ROUTES.to_vec();
        routes[0].scope = None;
        assert!(validate_routes(&routes).is_err());
    }

    #[test]
    fn interactive_paths_match_with_their_run_and_scope() {
        let (route, rp) = find_route("/v1/runs/team-a/run%2D1/prompts").expect("prompts");
        assert_eq!(route.op, Op::Prompt);
        assert_eq!(route.scope, Some(Scope::Interact));
        assert_eq!(
            rp,
            Some(RunPath {
                namespace: "team-a".into(),
                run: "run-1".into()
            })
        );
        let scopes: Vec<_> = [
            ("/v1/runs/a/b/interrupt", Scope::Interact),
            ("/v1/runs/a/b/end", Scope::End),
            ("/v1/runs/a/b/attach", Scope::Attach),
            ("/v1/runs/a/b/shell", Scope::Shell),
        ]
        .into_iter()
        .map(|(p, want)| (find_route(p).expect(p).0.scope, want))
        .collect();
        for (got, want) in scopes {
            assert_eq!(got, Some(want));
        }
        // The plain runs route still matches exactly; anything else is unmapped.
        assert_eq!(find_route("/v1/runs").expect("runs").0.op, Op::Runs);
        for unmapped in [
            "/v1/runs/a/b/shells",
            "/v1/runs/a/b",
            "/v1/runs//b/prompts",
            "/v1/runs/a/b/prompts/x",
            "/v1/runs/a%2Fx/b/prompts",
            "/v1/runs/a/b/c/prompts",
        ] {
            assert!(find_route(unmapped).is_none(), "{unmapped}");
        }
    }

    #[test]
    fn leases_query_parsing() {
        assert_eq!(leases_query(Some("run=r%201")), Ok("r 1".to_owned()));
        assert!(leases_query(Some("run=a&run=b")).is_err());
        assert!(leases_query(Some("run=a&x=1")).is_err());
        assert!(leases_query(None).is_err());
    }

    #[test]
    fn json_errors_do_not_echo_values() {
        let e =
            serde_json::from_str::<wire::IssueRequest>(r#"{"run": 5, "credential": "pdk-secret"}"#)
                .expect_err("bad");
        let msg = json_error_message(&e);
        assert!(
            !msg.contains("pdk-secret") && msg.contains("line 1"),
            "{msg}"
        );
        let e =
            serde_json::from_str::<wire::IssueRequest>(r#"{"run":"a","credential":"b","extra":1}"#)
                .expect_err("bad");
        assert!(
            json_error_message(&e).contains("unknown field `extra`"),
            "{}",
            json_error_message(&e)
        );
    }
}
