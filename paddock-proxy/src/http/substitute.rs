//! The per-request credential substitution hook.
//!
//! The agent only ever holds placeholders; the substituter swaps them for real credentials
//! right before the request leaves the proxy. If it fails, the request is answered by the
//! proxy and never forwarded: forwarding the placeholder (or worse, a half-rewritten head)
//! would be failing open.

use std::fmt;

use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, StatusCode, Uri};

use super::{BoxFuture, RequestContext};

/// Why a substitution did not happen. Reasons must not contain credentials.
#[derive(Debug, thiserror::Error)]
pub enum SubstituteError {
    /// The broker refused to substitute for this run and destination.
    #[error("substitution denied: {reason}")]
    Denied { reason: String },
    /// The credential is TLS-only and the request is cleartext HTTP.
    #[error("substitution refused over cleartext: {reason}")]
    TlsRequired { reason: String },
    /// The broker could not be asked (unreachable, timed out, bad answer).
    #[error("credential broker unavailable: {reason}")]
    Unavailable { reason: String },
    /// The rewrite produced something that cannot be sent (invalid header or query).
    #[error("substituted request is invalid: {reason}")]
    Invalid { reason: String },
}

impl SubstituteError {
    /// Denials are the agent's problem (403: stop retrying); the others are the proxy's
    /// side failing (502).
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Denied { .. } | Self::TlsRequired { .. } => StatusCode::FORBIDDEN,
            Self::Unavailable { .. } | Self::Invalid { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// A short machine-readable reason.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Denied { .. } => "substitution_denied",
            Self::TlsRequired { .. } => "tls_required",
            Self::Unavailable { .. } => "substitution_unavailable",
            Self::Invalid { .. } => "substitution_invalid",
        }
    }
}

/// What a substituter put into a request: for the request's audit record the credential's
/// name and lease (never a value), and for response scrubbing the secrets themselves with the
/// placeholders they replaced. The default (nothing) means the request was left as it was.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Substituted {
    /// The name of the credential substituted (the broker's credential name).
    pub credential: Option<String>,
    /// The lease the substituted credential was issued under.
    pub lease_id: Option<String>,
    /// The secrets put in (redacted in `Debug`): the upstream's responses are scrubbed of them.
    pub secrets: Vec<crate::scrub::SecretPair>,
    /// The substitution backend checked the destination's egress policy for this very
    /// request (the broker's `substitute-auth` does), so the request loop need not re-check
    /// it ([`crate::policy::EgressRecheck`]).
    pub egress_checked: bool,
    /// Kept alive until the request has been answered by its upstream (or refused): a reused
    /// grant counts its requests in flight so its invalidation can wait for them.
    pub hold: Hold,
}

/// Something a substitution keeps alive while its request is on the way upstream (see
/// [`Substituted::hold`]). Opaque; every two compare equal.
#[derive(Clone, Default)]
pub struct Hold(Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>);

impl Hold {
    /// Holds `value` until the last clone of this hold is dropped.
    #[must_use]
    pub fn new(value: impl std::any::Any + Send + Sync) -> Self {
        Self(Some(std::sync::Arc::new(value)))
    }
}

impl fmt::Debug for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Hold(held)"
        } else {
            "Hold(none)"
        })
    }
}

impl PartialEq for Hold {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Hold {}

impl Substituted {
    /// Nothing was substituted.
    #[must_use]
    pub fn none() -> Self {
        Self::default()
    }
}

/// Rewrites a request head before it is forwarded.
pub trait Substituter: Send + Sync + fmt::Debug {
    /// Called once per request (including upgrade requests) after hop-by-hop headers are
    /// removed. May rewrite headers and the query string, and says which credential it put
    /// in (for the audit record). An error stops the request.
    fn substitute<'a>(
        &'a self,
        head: &'a mut RequestHead<'_>,
        ctx: &'a RequestContext,
    ) -> BoxFuture<'a, Result<Substituted, SubstituteError>>;
}

/// The substituter for destinations without credential injection: leaves requests as-is.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopSubstituter;

impl Substituter for NoopSubstituter {
    fn substitute<'a>(
        &'a self,
        _head: &'a mut RequestHead<'_>,
        _ctx: &'a RequestContext,
    ) -> BoxFuture<'a, Result<Substituted, SubstituteError>> {
        Box::pin(async { Ok(Substituted::none()) })
    }
}

/// The part of a request a substituter may see and change: method and path are read-only;
/// headers and the query string are writable.
pub struct RequestHead<'a> {
    parts: &'a mut Parts,
}

impl<'a> RequestHead<'a> {
    pub(crate) fn new(parts: &'a mut Parts) -> Self {
        Self { parts }
    }

    #[must_use]
    pub fn method(&self) -> &Method {
        &self.parts.method
    }

    /// The upstream URI (scheme and authority are the connection's destination).
    #[must_use]
    pub fn uri(&self) -> &Uri {
        &self.parts.uri
    }

    #[must_use]
    pub fn path(&self) -> &str {
        self.parts.uri.path()
    }

    #[must_use]
    pub fn query(&self) -> Option<&str> {
        self.parts.uri.query()
    }

    /// Replaces the query string (`None` removes it); the path is kept.
    pub fn set_query(&mut self, query: Option<&str>) -> Result<(), SubstituteError> {
        let path = self.parts.uri.path();
        let pq = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        };
        let pq = PathAndQuery::try_from(pq).map_err(|_| SubstituteError::Invalid {
            reason: "query string is not valid in a URI".into(),
        })?;
        let mut parts = self.parts.uri.clone().into_parts();
        parts.path_and_query = Some(pq);
        self.parts.uri = Uri::from_parts(parts).map_err(|_| SubstituteError::Invalid {
            reason: "rewritten URI is invalid".into(),
        })?;
        Ok(())
    }

    #[must_use]
    pub fn headers(&self) -> &HeaderMap {
        &self.parts.headers
    }

    pub fn headers_mut(&mut self) -> &mut HeaderMap {
        &mut self.parts.headers
    }
}

/// Names only: header values and the query may hold credentials.
impl fmt::Debug for RequestHead<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestHead")
            .field("method", &self.parts.method)
            .field("path", &self.parts.uri.path())
            .field("has_query", &self.parts.uri.query().is_some())
            .field("headers", &self.parts.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use http::HeaderValue;
    use paddock_wire::codec;

    /// `Authorization: Basic` with the password `placeholder` replaced by `secret`; `None` when
    /// the header is not Basic or holds another password.
    fn replace_basic_auth_password(
        value: &HeaderValue,
        placeholder: &str,
        secret: &str,
    ) -> Result<Option<HeaderValue>, SubstituteError> {
        match codec::basic::decode(value.as_bytes()) {
            Some((user, password)) if password == placeholder => {
                let mut v =
                    HeaderValue::try_from(codec::basic::encode(&user, secret)).map_err(|_| {
                        SubstituteError::Invalid {
                            reason: "basic credentials are not a valid header".into(),
                        }
                    })?;
                v.set_sensitive(true);
                Ok(Some(v))
            }
            _ => Ok(None),
        }
    }

    fn replace_query_value(query: &str, placeholder: &str, secret: &str) -> Option<String> {
        codec::query::replace_value(query, placeholder, secret)
    }
    use http::Request;
    use http::header::AUTHORIZATION;

    pub(crate) const PLACEHOLDER: &str = "pdk-placeholder-0001";
    pub(crate) const SECRET: &str = "sk-real/secret+value=1";
    /// The credential name and lease id `PlaceholderSubstituter` reports when it swapped.
    pub(crate) const CREDENTIAL: &str = "test-api-key";
    pub(crate) const LEASE: &str = "lease-test-1";

    /// Swaps `PLACEHOLDER` for `SECRET` wherever the broker-backed substituter will have to:
    /// bearer tokens, API-key headers, query parameters and Basic-auth passwords. Fails
    /// closed on a configured destination it has no grant for.
    #[derive(Debug)]
    pub(crate) struct PlaceholderSubstituter {
        pub deny_host: Option<String>,
    }

    impl Substituter for PlaceholderSubstituter {
        fn substitute<'a>(
            &'a self,
            head: &'a mut RequestHead<'_>,
            ctx: &'a RequestContext,
        ) -> BoxFuture<'a, Result<Substituted, SubstituteError>> {
            Box::pin(async move {
                if self.deny_host.as_deref() == Some(ctx.host.as_str()) {
                    return Err(SubstituteError::Denied {
                        reason: "no grant for host".into(),
                    });
                }
                Ok(if swap(head)? {
                    Substituted {
                        credential: Some(CREDENTIAL.into()),
                        lease_id: Some(LEASE.into()),
                        secrets: vec![crate::scrub::SecretPair {
                            secret: SECRET.as_bytes().to_vec(),
                            placeholder: PLACEHOLDER.into(),
                        }],
                        egress_checked: false,
                        hold: Hold::default(),
                    }
                } else {
                    Substituted::none()
                })
            })
        }
    }

    /// Whether anything was swapped.
    fn swap(head: &mut RequestHead<'_>) -> Result<bool, SubstituteError> {
        let mut swapped = false;
        let invalid = |_| SubstituteError::Invalid {
            reason: "bad header".into(),
        };
        if let Some(value) = head.headers().get(AUTHORIZATION).cloned() {
            let bearer = format!("Bearer {PLACEHOLDER}");
            if value.as_bytes() == bearer.as_bytes() {
                let mut v = HeaderValue::try_from(format!("Bearer {SECRET}")).map_err(invalid)?;
                v.set_sensitive(true);
                head.headers_mut().insert(AUTHORIZATION, v);
                swapped = true;
            } else if let Some(v) = replace_basic_auth_password(&value, PLACEHOLDER, SECRET)? {
                head.headers_mut().insert(AUTHORIZATION, v);
                swapped = true;
            }
        }
        if head
            .headers()
            .get("x-api-key")
            .is_some_and(|v| v.as_bytes() == PLACEHOLDER.as_bytes())
        {
            let v = HeaderValue::try_from(SECRET).map_err(invalid)?;
            head.headers_mut().insert("x-api-key", v);
            swapped = true;
        }
        if let Some(q) = head
            .query()
            .and_then(|q| replace_query_value(q, PLACEHOLDER, SECRET))
        {
            head.set_query(Some(&q))?;
            swapped = true;
        }
        Ok(swapped)
    }

    fn ctx() -> RequestContext {
        RequestContext {
            run: "run-1".into(),
            host: "api.test".into(),
            port: 443,
            sni: Some("api.test".into()),
        }
    }

    async fn run(sub: &dyn Substituter, req: Request<()>) -> Result<Parts, SubstituteError> {
        let (mut parts, ()) = req.into_parts();
        sub.substitute(&mut RequestHead::new(&mut parts), &ctx())
            .await?;
        Ok(parts)
    }

    fn basic(user: &str, password: &str) -> String {
        codec::basic::encode(user, password)
    }

    #[tokio::test]
    async fn swaps_placeholder_in_all_four_positions() {
        let sub = PlaceholderSubstituter { deny_host: None };
        let req = Request::get(format!(
            "https://api.test/v1/x?keep=a%20b&key={PLACEHOLDER}&other=1"
        ))
        .header(AUTHORIZATION, format!("Bearer {PLACEHOLDER}"))
        .header("x-api-key", PLACEHOLDER)
        .body(())
        .expect("request");
        let parts = run(&sub, req).await.expect("substituted");
        assert_eq!(parts.headers[AUTHORIZATION], format!("Bearer {SECRET}"));
        assert!(parts.headers[AUTHORIZATION].is_sensitive());
        assert_eq!(parts.headers["x-api-key"], SECRET);
        assert_eq!(
            parts.uri.query(),
            Some("keep=a%20b&key=sk-real%2Fsecret%2Bvalue%3D1&other=1")
        );
        assert_eq!(parts.uri.path(), "/v1/x");

        let req = Request::get("https://api.test/repo.git/info/refs")
            .header(AUTHORIZATION, basic("x-access-token", PLACEHOLDER))
            .body(())
            .expect("request");
        let parts = run(&sub, req).await.expect("substituted");
        assert_eq!(
            parts.headers[AUTHORIZATION],
            basic("x-access-token", SECRET)
        );
    }

    #[tokio::test]
    async fn leaves_non_placeholders_alone() {
        let sub = PlaceholderSubstituter { deny_host: None };
        let req = Request::get("https://api.test/?key=other")
            .header(AUTHORIZATION, basic("user", "own-password"))
            .header("x-api-key", "not-the-placeholder")
            .body(())
            .expect("request");
        let parts = run(&sub, req).await.expect("substituted");
        assert_eq!(parts.headers[AUTHORIZATION], basic("user", "own-password"));
        assert_eq!(parts.headers["x-api-key"], "not-the-placeholder");
        assert_eq!(parts.uri.query(), Some("key=other"));
    }

    #[tokio::test]
    async fn denial_is_an_error() {
        let sub = PlaceholderSubstituter {
            deny_host: Some("api.test".into()),
        };
        let req = Request::get("https://api.test/").body(()).expect("request");
        let err = run(&sub, req).await.expect_err("denied");
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn noop_changes_nothing() {
        let req = Request::get("https://api.test/a?b=c")
            .header(AUTHORIZATION, format!("Bearer {PLACEHOLDER}"))
            .body(())
            .expect("request");
        let parts = run(&NoopSubstituter, req).await.expect("noop");
        assert_eq!(parts.uri, "https://api.test/a?b=c");
        assert_eq!(
            parts.headers[AUTHORIZATION],
            format!("Bearer {PLACEHOLDER}")
        );
    }

    #[test]
    fn set_query_rejects_invalid_and_can_remove() {
        let (mut parts, ()) = Request::get("https://api.test/p?x=1")
            .body(())
            .expect("request")
            .into_parts();
        let mut head = RequestHead::new(&mut parts);
        assert!(head.set_query(Some("a=b c")).is_err());
        assert_eq!(head.query(), Some("x=1"), "a failed rewrite loses nothing");
        head.set_query(None).expect("remove");
        assert_eq!(head.uri(), "https://api.test/p");
    }

    #[test]
    fn debug_does_not_show_values() {
        let (mut parts, ()) = Request::get(format!("https://api.test/p?k={PLACEHOLDER}"))
            .header(AUTHORIZATION, format!("Bearer {SECRET}"))
            .body(())
            .expect("request")
            .into_parts();
        let shown = format!("{:?}", RequestHead::new(&mut parts));
        assert!(
            !shown.contains(SECRET) && !shown.contains(PLACEHOLDER),
            "{shown}"
        );
        assert!(shown.contains("authorization"));
    }

    #[test]
    fn basic_auth_edge_cases() {
        let v = |s: &str| HeaderValue::try_from(s).expect("header");
        assert!(
            replace_basic_auth_password(&v("Basic !!notbase64"), PLACEHOLDER, SECRET)
                .expect("ok")
                .is_none()
        );
        assert!(
            replace_basic_auth_password(&v(&format!("Bearer {PLACEHOLDER}")), PLACEHOLDER, SECRET)
                .expect("ok")
                .is_none()
        );
        // A colon inside the password is part of the password.
        let got = replace_basic_auth_password(&v(&basic("u", PLACEHOLDER)), PLACEHOLDER, "a:b")
            .expect("ok")
            .expect("replaced");
        assert_eq!(got, basic("u", "a:b"));
    }
}
