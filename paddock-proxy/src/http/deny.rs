//! The denial page: an explicit 403 for a denied destination.
//!
//! A reset makes agents retry (it looks like a network fault); a 403 that names the host
//! and the reason makes them stop and tells the human what to add to the allow-list.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use super::body::{ProxyBody, full};
use super::error::{DENIED_HEADER, sanitize_reason};
use super::graceful::drive;
use super::{ALPN_H2, HttpError};

/// Most time a denial connection may take in total: it serves one answer, not a session.
const DENIAL_LIFETIME: Duration = Duration::from_secs(10);
/// Header caps for denial connections: the request is never forwarded, only answered.
const DENIAL_MAX_HEADER_BYTES: usize = 16 * 1024;

/// The 403 a denied destination gets.
#[must_use]
pub fn denial_response(host: &str, reason: &str) -> Response<ProxyBody> {
    let host = sanitize_reason(host);
    let reason = sanitize_reason(reason);
    let body = format!(
        "paddock: egress to {host} is denied: {reason}\n\
         This destination is not allowed for this run; retrying will not help.\n"
    );
    let mut response = Response::new(full(body));
    *response.status_mut() = StatusCode::FORBIDDEN;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // sanitize_reason leaves only visible ASCII and spaces, always a valid header value.
    let value = HeaderValue::try_from(reason.as_str())
        .unwrap_or_else(|_| HeaderValue::from_static("denied"));
    headers.insert(DENIED_HEADER, value);
    response
}

/// Answers every request on `io` with the denial page, then closes: HTTP/1.1 after the
/// first response, HTTP/2 with a GOAWAY after the first response (requests already in
/// flight are still answered). Request bodies are never read. Bounded in time.
pub fn serve_denial<I>(
    io: I,
    agent_alpn: Option<&[u8]>,
    host: &str,
    reason: &str,
) -> impl Future<Output = Result<(), HttpError>> + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let h2 = agent_alpn == Some(ALPN_H2);
    let page: Arc<(String, String)> = Arc::new((host.to_owned(), reason.to_owned()));
    async move {
        let answered = Arc::new(Notify::new());
        let any_answered = Arc::new(AtomicBool::new(false));
        let service = {
            let answered = Arc::clone(&answered);
            let any_answered = Arc::clone(&any_answered);
            service_fn(move |_req: Request<Incoming>| {
                let page = Arc::clone(&page);
                let answered = Arc::clone(&answered);
                let any_answered = Arc::clone(&any_answered);
                async move {
                    any_answered.store(true, Ordering::Relaxed);
                    answered.notify_one();
                    Ok::<_, Infallible>(denial_response(&page.0, &page.1))
                }
            })
        };
        let io = TokioIo::new(io);
        let serve = async {
            if h2 {
                let conn = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_header_list_size(
                        u32::try_from(DENIAL_MAX_HEADER_BYTES).unwrap_or(u32::MAX),
                    )
                    .max_concurrent_streams(16)
                    .serve_connection(io, service);
                drive(
                    conn,
                    answered.notified(),
                    http2::Connection::graceful_shutdown,
                )
                .await
            } else {
                http1::Builder::new()
                    .timer(TokioTimer::new())
                    .keep_alive(false)
                    .max_buf_size(DENIAL_MAX_HEADER_BYTES)
                    .header_read_timeout(DENIAL_LIFETIME)
                    .serve_connection(io, service)
                    .await
            }
        };
        match tokio::time::timeout(DENIAL_LIFETIME, serve).await {
            Ok(Ok(())) => Ok(()),
            // Once the page is out, the agent hanging up mid-shutdown (an h2 client closing
            // on the first GOAWAY, say) is the expected end, not a failure.
            Ok(Err(e)) if any_answered.load(Ordering::Relaxed) => {
                tracing::debug!(error = %e, "agent closed after the denial page");
                Ok(())
            }
            Ok(Err(e)) => Err(HttpError::Agent(e)),
            Err(_) => Err(HttpError::AgentTimeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_names_host_and_reason() {
        let r = denial_response("evil.example", "not in allow-list");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(r.headers()[DENIED_HEADER], "not in allow-list");
    }

    #[test]
    fn sanitize_strips_control_characters() {
        assert_eq!(sanitize_reason("a\r\nb\u{7f}c\u{e9}"), "a??b?c?");
        assert_eq!(sanitize_reason(&"x".repeat(500)).len(), 200);
        let r = denial_response("h", "bad\r\nSet-Cookie: x=1");
        assert_eq!(r.headers()[DENIED_HEADER], "bad??Set-Cookie: x=1");
        assert!(!r.headers().contains_key(header::SET_COOKIE));
    }
}
