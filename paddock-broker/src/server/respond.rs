//! Building the API's answers and reading its request bodies: shared by the route table
//! ([`super::routes`]) and the interactive routes ([`super::interact`]).

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;

use crate::wire::{ErrorBody, ErrorCode, MAX_BODY_BYTES};

/// A slow client may not hold a connection and a blocking-pool slot open indefinitely.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The body of every 401, byte for byte: no hint about why.
pub const UNAUTHENTICATED_BODY: &str =
    r#"{"code":"Unauthenticated","message":"authentication required"}"#;

pub(crate) type Resp = Response<Full<Bytes>>;

pub(crate) fn json_response(status: StatusCode, body: Vec<u8>) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub(crate) fn error_response(code: ErrorCode, message: impl Into<String>) -> Resp {
    if code == ErrorCode::Unauthenticated {
        return unauthenticated();
    }
    let body = serde_json::to_vec(&ErrorBody {
        code,
        message: message.into(),
    })
    .unwrap_or_else(|_| br#"{"code":"Internal","message":"internal error"}"#.to_vec());
    json_response(
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    )
}

pub(crate) fn unauthenticated() -> Resp {
    let mut resp = json_response(
        StatusCode::UNAUTHORIZED,
        UNAUTHENTICATED_BODY.as_bytes().to_vec(),
    );
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

pub(crate) fn ok_json<T: Serialize>(value: &T) -> Resp {
    match serde_json::to_vec(value) {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(_) => error_response(ErrorCode::Internal, "internal error"),
    }
}

/// A JSON body error message that names fields but never echoes values (which could hold a
/// bearer sent in the wrong place).
pub(crate) fn json_error_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match e.classify() {
        serde_json::error::Category::Data
            if text.starts_with("unknown field") || text.starts_with("missing field") =>
        {
            match text.find(", expected") {
                Some(i) => format!("invalid request body: {}", &text[..i]),
                None => format!("invalid request body: {text}"),
            }
        }
        _ => format!(
            "invalid request body: malformed or mistyped JSON at line {} column {}",
            e.line(),
            e.column()
        ),
    }
}

pub(crate) async fn read_json_body(req: Request<Incoming>) -> Result<Bytes, Resp> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mime = content_type.split(';').next().unwrap_or_default().trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(error_response(
            ErrorCode::UnsupportedMediaType,
            "Content-Type must be application/json",
        ));
    }
    let too_large = || {
        error_response(
            ErrorCode::PayloadTooLarge,
            format!("request body exceeds {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let collected = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY_BYTES).collect(),
    )
    .await;
    let Ok(collected) = collected else {
        return Err(error_response(
            ErrorCode::BadRequest,
            "request body not received in time",
        ));
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(_) => Err(error_response(
            ErrorCode::BadRequest,
            "request body could not be read",
        )),
    }
}
