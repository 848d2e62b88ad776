//! [`Substituter`] backed by the broker's `POST /v1/substitute-auth`.

use http::header::{AUTHORIZATION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue};
use paddock_wire::api::{
    Header, QueryParam, SubstituteAuthRequest, SubstituteAuthResponse, Transport,
};
use paddock_wire::{codec, placeholder};

use std::time::Instant;

use paddock_wire::api::ErrorCode;

use super::grants::{GrantCache, grant_key, key_placeholder};
use super::{BrokerCallError, BrokerClient};
use crate::http::{
    BoxFuture, Hold, RequestContext, RequestHead, SubstituteError, Substituted, Substituter,
};

/// Swaps placeholders for real credentials by asking the broker, once per request.
///
/// # When the broker is called
///
/// Only when the request carries a possible placeholder: `pdk-` (any case) in a header
/// value, in the query string (raw or percent-decoded), or inside base64
/// `Authorization: Basic` credentials (git puts the token there). Requests without one are
/// forwarded unchanged with no broker call. This mirrors the broker's semantics: it answers
/// `matched: false` (forward unchanged) for a request without a placeholder, so calling it
/// could not change what is forwarded, and for destinations without a substitute-auth grant
/// it refuses every call, which would break plain allowed traffic. Skipping the call also
/// keeps the run's substitution rate limit for requests that need it. Whether the
/// destination is still allowed is not this type's question: the request loop re-checks
/// egress ([`crate::policy::EgressRecheck`]) for every request this substituter did not send
/// to the broker ([`Substituted::egress_checked`]: `substitute-auth` checks the policy
/// itself).
///
/// Use one `BrokerSubstituter` for every intercepted connection, whatever the egress
/// decision's `substitute_auth` flag said: a placeholder sent to a host without a
/// substitution grant is then refused by the broker (403) instead of leaving the proxy.
///
/// # Outcome
///
/// * broker substitutes: its edits are applied exactly as
///   [`paddock_wire::api::SubstituteAuthResponse`] documents (remove headers, set headers,
///   Basic auth, remove query parameters, set query parameters), all at once or not at all;
/// * broker refuses (forbidden, egress denied, unknown or revoked placeholder, more than one
///   placeholder, oversized request): [`SubstituteError::Denied`], answered 403;
/// * broker unreachable, too slow, rate limiting, or rejecting the proxy's own credentials:
///   [`SubstituteError::Unavailable`], answered 502;
/// * an edit that cannot be applied, or a well-formed placeholder still present afterwards:
///   [`SubstituteError::Invalid`], answered 502.
///
/// On success it reports the broker's credential name and lease id ([`Substituted`]) for the
/// request's audit record. In each error case the request is not forwarded.
///
/// # Reuse
///
/// With [`BrokerSubstituter::with_grants`], an answer the broker granted for reuse is applied
/// to later requests of the same shape ([`super::grants::grant_key`]) without a call, within
/// its uses and lifetime; a revoke, a run's end or a policy change returns only after this
/// proxy dropped the grant and the requests that used it were answered upstream (see
/// [`super::grants`]). Without grants every substitution is asked fresh.
///
/// Placeholders in the path or the body are not substituted (the broker does not look there)
/// and are forwarded as they are.
#[derive(Debug, Clone)]
pub struct BrokerSubstituter {
    client: BrokerClient,
    metrics: Option<std::sync::Arc<crate::metrics::ProxyMetrics>>,
    /// Sent with every call (node agent mode); see [`crate::broker::BrokerPolicy::for_pod`].
    pod: Option<String>,
    /// Answers the broker granted for reuse, shared by every substituter of the process.
    grants: Option<GrantCache>,
}

impl BrokerSubstituter {
    #[must_use]
    pub fn new(client: BrokerClient) -> Self {
        Self {
            client,
            metrics: None,
            pod: None,
            grants: None,
        }
    }

    /// Reuse answers the broker grants for reuse, kept in `grants` (one per broker client,
    /// started with [`GrantCache::start`]) until they run out, expire or are invalidated.
    #[must_use]
    pub fn with_grants(mut self, grants: GrantCache) -> Self {
        self.grants = Some(grants);
        self
    }

    /// Every call names `pod` (its UID); see [`crate::broker::BrokerPolicy::for_pod`].
    #[must_use]
    pub fn for_pod(mut self, pod: impl Into<String>) -> Self {
        self.pod = Some(pod.into());
        self
    }

    /// Count applied substitutions in the proxy's `substitutions` metric.
    #[must_use]
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::ProxyMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

impl Substituter for BrokerSubstituter {
    fn substitute<'a>(
        &'a self,
        head: &'a mut RequestHead<'_>,
        ctx: &'a RequestContext,
    ) -> BoxFuture<'a, Result<Substituted, SubstituteError>> {
        Box::pin(async move {
            if !carries_placeholder(head) {
                return Ok(Substituted::none());
            }
            // The placeholder as the agent wrote it, to put back where a response reflects
            // the secret (the broker accepts one distinct placeholder per request).
            let key = self
                .grants
                .as_ref()
                .and_then(|_| grant_key(head, ctx, self.pod.as_deref()));
            // A key already names the request's one placeholder: no second scan for it.
            let placeholder = key
                .as_deref()
                .and_then(key_placeholder)
                .or_else(|| first_bearer(head));
            if let (Some(cache), Some(key)) = (&self.grants, &key)
                && let Some(hit) = cache.lookup(key)
            {
                if let Some(m) = &self.metrics {
                    m.grant_reused();
                }
                return self.finish(
                    head,
                    ctx,
                    &hit.answer,
                    placeholder.as_deref(),
                    Hold::new(hit.flight),
                );
            }
            // A stale grant or a lost subscription earns one more call (per request then).
            for _ in 0..3 {
                let subscription = self.grants.as_ref().and_then(GrantCache::subscription);
                let sent = Instant::now();
                let answer = self
                    .client
                    .substitute_auth(&SubstituteAuthRequest {
                        pod: self.pod.clone(),
                        subscription: subscription.as_deref().map(str::to_owned),
                        ..wire_request(head, ctx)
                    })
                    .await;
                let mut answer = match answer {
                    Ok(answer) => answer,
                    Err(e) if e.code() == Some(ErrorCode::SubscriptionGone) => {
                        if let Some(cache) = &self.grants {
                            cache.reset("the broker no longer knows the subscription");
                        }
                        continue;
                    }
                    Err(e) => return Err(call_error(&e)),
                };
                let terms = answer.grant.take();
                let (Some(cache), Some(subscription), Some(terms), true) =
                    (&self.grants, subscription, terms, answer.matched)
                else {
                    return self.finish(
                        head,
                        ctx,
                        &answer,
                        placeholder.as_deref(),
                        Hold::default(),
                    );
                };
                match cache.admit(key.clone(), &ctx.run, &subscription, sent, answer, terms) {
                    Ok(used) => {
                        return self.finish(
                            head,
                            ctx,
                            &used.answer,
                            placeholder.as_deref(),
                            Hold::new(used.flight),
                        );
                    }
                    Err(stale) => {
                        tracing::debug!(run = %ctx.run, host = %ctx.host, %stale, "broker answer not used; asking again");
                    }
                }
            }
            Err(SubstituteError::Unavailable {
                reason: "the broker's answers were invalidated before they could be used".into(),
            })
        })
    }
}

impl BrokerSubstituter {
    /// Applies an answer (fresh or reused) and describes it for the audit record.
    fn finish(
        &self,
        head: &mut RequestHead<'_>,
        ctx: &RequestContext,
        answer: &SubstituteAuthResponse,
        placeholder: Option<&str>,
        hold: Hold,
    ) -> Result<Substituted, SubstituteError> {
        if answer.matched {
            apply(head, answer)?;
            if let Some(m) = &self.metrics {
                m.substituted();
            }
        }
        ensure_no_placeholder(head)?;
        tracing::debug!(
            run = %ctx.run, host = %ctx.host, matched = answer.matched,
            lease = answer.lease_id.as_deref().unwrap_or(""),
            credential = answer.credential.as_deref().unwrap_or(""),
            "broker substitution applied"
        );
        // The broker's names for what it put in (never the value), for the audit record.
        Ok(if answer.matched {
            Substituted {
                credential: answer.credential.clone(),
                lease_id: answer.lease_id.clone(),
                secrets: secrets_put_in(answer, placeholder),
                egress_checked: true,
                hold,
            }
        } else {
            Substituted {
                egress_checked: true,
                ..Substituted::none()
            }
        })
    }
}

fn call_error(e: &BrokerCallError) -> SubstituteError {
    if let BrokerCallError::Rejected {
        code: paddock_wire::api::ErrorCode::TlsRequired,
        message,
        ..
    } = e
    {
        return SubstituteError::TlsRequired {
            reason: message.clone(),
        };
    }
    if e.is_refusal() {
        let reason = match e {
            BrokerCallError::Rejected { message, .. } => message.clone(),
            other => other.to_string(),
        };
        SubstituteError::Denied { reason }
    } else {
        SubstituteError::Unavailable {
            reason: e.to_string(),
        }
    }
}

/// The request as the broker needs it: every header (names drive its allow-lists), the raw
/// query, method and path.
pub(crate) fn wire_request(head: &RequestHead<'_>, ctx: &RequestContext) -> SubstituteAuthRequest {
    SubstituteAuthRequest {
        run: ctx.run.clone(),
        pod: None,
        subscription: None,
        host: ctx.host.clone(),
        port: ctx.port,
        transport: if ctx.upstream_tls() {
            Transport::Tls
        } else {
            Transport::Cleartext
        },
        method: head.method().as_str().to_owned(),
        path: head.path().to_owned(),
        query: head.query().map(str::to_owned),
        headers: head
            .headers()
            .iter()
            .map(|(name, value)| Header {
                name: name.as_str().to_owned(),
                // Non-UTF-8 bytes cannot be placeholders; lossy keeps every ASCII run intact.
                value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
            })
            .collect(),
    }
}

/// The decoded bytes of a `Basic` credential, if the value is one.
pub(crate) fn basic_credentials(value: &[u8]) -> Option<Vec<u8>> {
    codec::basic::decode_raw(value)
}

/// Whether the request might carry a placeholder: the marker in any case in a header value,
/// inside Basic credentials, or in the query (raw or decoded). Looser than the broker, so
/// the broker is asked whenever it might find something.
pub(crate) fn carries_placeholder(head: &RequestHead<'_>) -> bool {
    let in_headers = head.headers().values().any(|v| {
        placeholder::may_contain(v.as_bytes())
            || basic_credentials(v.as_bytes()).is_some_and(|c| placeholder::may_contain(&c))
    });
    in_headers
        || head.query().is_some_and(|q| {
            placeholder::may_contain(q.as_bytes())
                || placeholder::may_contain(codec::query::decode_all(q).as_bytes())
        })
}

/// Whether `text` holds a well-formed placeholder, delimited as the broker delimits them.
fn has_bearer(text: &[u8]) -> bool {
    placeholder::find(text).next().is_some()
}

/// The first well-formed placeholder of a request, looking where the broker looks.
fn first_bearer(head: &RequestHead<'_>) -> Option<String> {
    let from = |b: &[u8]| {
        placeholder::find(b)
            .next()
            .map(|r| String::from_utf8_lossy(&b[r]).into_owned())
    };
    head.headers()
        .values()
        .find_map(|v| {
            from(v.as_bytes()).or_else(|| basic_credentials(v.as_bytes()).and_then(|c| from(&c)))
        })
        .or_else(|| {
            head.query().and_then(|q| {
                from(q.as_bytes()).or_else(|| from(codec::query::decode_all(q).as_bytes()))
            })
        })
}

/// The secrets a substitution put into the request, each with the placeholder to show the
/// agent instead. The broker lists them; an older broker that does not is covered by taking
/// the values it set (whole header values, Basic passwords, query values).
fn secrets_put_in(
    answer: &SubstituteAuthResponse,
    placeholder: Option<&str>,
) -> Vec<crate::scrub::SecretPair> {
    let placeholder = placeholder.unwrap_or(crate::scrub::UNKNOWN_PLACEHOLDER);
    let mut values: Vec<&str> = answer.secrets.iter().map(String::as_str).collect();
    if values.is_empty() {
        values.extend(answer.set_headers.iter().map(|h| h.value.as_str()));
        values.extend(answer.basic_auth.iter().map(|b| b.password.as_str()));
        values.extend(answer.set_query.iter().map(|q| q.value.as_str()));
    }
    values
        .into_iter()
        .filter(|v| !v.is_empty())
        .map(|v| crate::scrub::SecretPair {
            secret: v.as_bytes().to_vec(),
            placeholder: placeholder.to_owned(),
        })
        .collect()
}

/// Last line of defence: a request still carrying a well-formed placeholder after the broker
/// answered is not forwarded (the broker and the proxy disagree on where it was).
pub(crate) fn ensure_no_placeholder(head: &RequestHead<'_>) -> Result<(), SubstituteError> {
    let in_headers = head.headers().values().any(|v| {
        has_bearer(v.as_bytes()) || basic_credentials(v.as_bytes()).is_some_and(|c| has_bearer(&c))
    });
    let in_query = head.query().is_some_and(|q| {
        has_bearer(q.as_bytes()) || has_bearer(codec::query::decode_all(q).as_bytes())
    });
    if in_headers || in_query {
        return Err(SubstituteError::Invalid {
            reason: "a placeholder would have been forwarded unsubstituted".into(),
        });
    }
    Ok(())
}

fn invalid(reason: impl Into<String>) -> SubstituteError {
    SubstituteError::Invalid {
        reason: reason.into(),
    }
}

/// A header the broker may set or remove. Framing and routing headers are the proxy's.
fn editable_header(name: &str) -> Result<HeaderName, SubstituteError> {
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| invalid(format!("broker named an invalid header {name:?}")))?;
    if [CONTENT_LENGTH, TRANSFER_ENCODING, HOST].contains(&parsed) {
        return Err(invalid(format!("broker may not edit the {parsed} header")));
    }
    Ok(parsed)
}

/// Applies the broker's edits in the documented order. Everything is computed before the
/// request is touched, so a failure leaves it as it was.
pub(crate) fn apply(
    head: &mut RequestHead<'_>,
    answer: &SubstituteAuthResponse,
) -> Result<(), SubstituteError> {
    let mut headers: HeaderMap = head.headers().clone();
    for name in &answer.remove_headers {
        headers.remove(editable_header(name)?);
    }
    for h in &answer.set_headers {
        let name = editable_header(&h.name)?;
        let mut value = HeaderValue::from_str(&h.value)
            .map_err(|_| invalid(format!("substituted value of {name} is not a valid header")))?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    if let Some(basic) = &answer.basic_auth {
        let mut value =
            HeaderValue::try_from(codec::basic::encode(&basic.username, &basic.password))
                .map_err(|_| invalid("substituted Basic credentials are not a valid header"))?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    match rewrite_query(head.query(), &answer.remove_query, &answer.set_query) {
        QueryEdit::Unchanged => {}
        QueryEdit::Removed => head.set_query(None)?,
        QueryEdit::Set(query) => head.set_query(Some(&query))?,
    }
    *head.headers_mut() = headers;
    Ok(())
}

/// Decoded name of one `name=value` query piece, decoded as the broker decodes it.
fn query_name(piece: &str) -> String {
    let raw = piece.split_once('=').map_or(piece, |(k, _)| k);
    codec::query::decode(raw)
}

/// What happens to the query string.
#[derive(Debug, PartialEq, Eq)]
enum QueryEdit {
    Unchanged,
    Removed,
    Set(String),
}

/// The rewritten query. Untouched parameters keep their exact bytes; set values are
/// percent-encoded.
fn rewrite_query(query: Option<&str>, remove: &[String], set: &[QueryParam]) -> QueryEdit {
    if remove.is_empty() && set.is_empty() {
        return QueryEdit::Unchanged;
    }
    let mut pieces: Vec<(String, String)> = query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| (query_name(p), p.to_owned()))
        .filter(|(name, _)| !remove.contains(name))
        .collect();
    for param in set {
        let encoded = format!(
            "{}={}",
            codec::percent::encode(&param.name),
            codec::percent::encode(&param.value)
        );
        match pieces.iter().position(|(name, _)| *name == param.name) {
            Some(first) => {
                pieces[first].1 = encoded;
                let mut i = 0;
                pieces.retain(|(name, _)| {
                    let keep = i == first || *name != param.name;
                    i += 1;
                    keep
                });
            }
            None => pieces.push((param.name.clone(), encoded)),
        }
    }
    if pieces.is_empty() {
        QueryEdit::Removed
    } else {
        QueryEdit::Set(
            pieces
                .into_iter()
                .map(|(_, p)| p)
                .collect::<Vec<_>>()
                .join("&"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use http::Request;
    use paddock_wire::api::BasicAuth;

    const BEARER: &str = "pdk-user-secret-0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = Request::get(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn bearer_recognition_matches_the_broker_format() {
        assert!(placeholder::is_placeholder(BEARER.as_bytes()));
        assert!(has_bearer(format!("Bearer {BEARER}").as_bytes()));
        assert!(has_bearer(format!("a=1&k={BEARER}").as_bytes()));
        assert!(!has_bearer(format!("x{BEARER}").as_bytes()));
        assert!(!has_bearer(format!("{BEARER}0").as_bytes()));
        assert!(!has_bearer(BEARER.to_uppercase().as_bytes()));
        assert!(!has_bearer(b"pdk-user-secret-short"));
    }

    #[test]
    fn detects_candidates_in_every_position() {
        let basic = format!(
            "Basic {}",
            STANDARD.encode(format!("x-access-token:{BEARER}"))
        );
        let cases: Vec<http::request::Parts> = vec![
            parts(
                "https://h/p",
                &[("authorization", &format!("Bearer {BEARER}"))],
            ),
            parts("https://h/p", &[("x-api-key", "PDK-whatever")]),
            parts("https://h/p", &[("authorization", &basic)]),
            parts(&format!("https://h/p?key={BEARER}"), &[]),
            parts("https://h/p?key=pdk%2Dencoded", &[]),
        ];
        for mut p in cases {
            let shown = format!("{:?}", p.uri.query());
            assert!(carries_placeholder(&RequestHead::new(&mut p)), "{shown}");
        }
        let mut plain = parts(
            "https://h/pdk-in-path?key=value",
            &[
                (
                    "authorization",
                    &format!("Basic {}", STANDARD.encode("u:p")),
                ),
                ("x-api-key", "sk-other"),
            ],
        );
        assert!(!carries_placeholder(&RequestHead::new(&mut plain)));
    }

    #[test]
    fn query_rewrite_keeps_untouched_bytes() {
        let set = |name: &str, value: &str| QueryParam {
            name: name.into(),
            value: value.into(),
        };
        assert_eq!(rewrite_query(Some("a=1"), &[], &[]), QueryEdit::Unchanged);
        assert_eq!(
            rewrite_query(
                Some("keep=a%20b&key=pdk-x&other=1&key=dup"),
                &[],
                &[set("key", "s/e+c=r t")]
            ),
            QueryEdit::Set("keep=a%20b&key=s%2Fe%2Bc%3Dr%20t&other=1".into())
        );
        assert_eq!(
            rewrite_query(Some("a=1&tok%65n=x"), &["token".into()], &[]),
            QueryEdit::Set("a=1".into())
        );
        assert_eq!(
            rewrite_query(Some("token=x"), &["token".into()], &[]),
            QueryEdit::Removed
        );
        assert_eq!(
            rewrite_query(None, &[], &[set("key", "v")]),
            QueryEdit::Set("key=v".into())
        );
    }

    #[test]
    fn applies_edits_in_order_and_marks_them_sensitive() {
        let mut p = parts(
            "https://h/p?key=pdk-x&drop=1",
            &[
                ("authorization", "Bearer old"),
                ("x-api-key", "pdk-x"),
                ("x-extra", "1"),
            ],
        );
        let answer = SubstituteAuthResponse {
            matched: true,
            remove_headers: vec!["x-extra".into(), "x-api-key".into()],
            set_headers: vec![Header {
                name: "x-api-key".into(),
                value: "real".into(),
            }],
            basic_auth: Some(BasicAuth {
                username: "u".into(),
                password: "secret".into(),
            }),
            remove_query: vec!["drop".into()],
            set_query: vec![QueryParam {
                name: "key".into(),
                value: "qs".into(),
            }],
            ..SubstituteAuthResponse::default()
        };
        apply(&mut RequestHead::new(&mut p), &answer).expect("applied");
        assert_eq!(p.headers["x-api-key"], "real");
        assert!(p.headers["x-api-key"].is_sensitive());
        assert!(!p.headers.contains_key("x-extra"));
        assert_eq!(
            p.headers[AUTHORIZATION],
            format!("Basic {}", STANDARD.encode("u:secret"))
        );
        assert!(p.headers[AUTHORIZATION].is_sensitive());
        assert_eq!(p.uri.query(), Some("key=qs"));
    }

    #[test]
    fn a_bad_edit_changes_nothing() {
        let mut p = parts("https://h/p?key=pdk-x", &[("x-api-key", "pdk-x")]);
        for bad in [
            SubstituteAuthResponse {
                matched: true,
                set_query: vec![QueryParam {
                    name: "key".into(),
                    value: "v".into(),
                }],
                set_headers: vec![Header {
                    name: "content-length".into(),
                    value: "0".into(),
                }],
                ..SubstituteAuthResponse::default()
            },
            SubstituteAuthResponse {
                matched: true,
                set_query: vec![QueryParam {
                    name: "key".into(),
                    value: "v".into(),
                }],
                set_headers: vec![Header {
                    name: "x-api-key".into(),
                    value: "line\nbreak".into(),
                }],
                ..SubstituteAuthResponse::default()
            },
            SubstituteAuthResponse {
                matched: true,
                remove_headers: vec!["bad header".into()],
                ..SubstituteAuthResponse::default()
            },
        ] {
            let err = apply(&mut RequestHead::new(&mut p), &bad).expect_err("refused");
            assert!(matches!(err, SubstituteError::Invalid { .. }), "{err}");
            assert_eq!(p.uri.query(), Some("key=pdk-x"));
            assert_eq!(p.headers["x-api-key"], "pdk-x");
        }
    }

    #[test]
    fn leftover_placeholders_are_caught() {
        let basic = format!("Basic {}", STANDARD.encode(format!("u:{BEARER}")));
        for mut p in [
            parts("https://h/p", &[("x-other", &format!("t {BEARER}"))]),
            parts("https://h/p", &[("authorization", &basic)]),
            parts(&format!("https://h/p?k={BEARER}"), &[]),
        ] {
            assert!(ensure_no_placeholder(&RequestHead::new(&mut p)).is_err());
        }
        let mut p = parts("https://h/p?k=pdk-short", &[("x", "pdk-short")]);
        assert!(ensure_no_placeholder(&RequestHead::new(&mut p)).is_ok());
    }
}
