//! Placeholder scanning on both sides of the substitute-auth call, and the codecs around it.
//!
//! Differential: whatever the broker would recognise as a placeholder in a request, the
//! proxy's cheap pre-scan must flag (else the broker is never asked and the placeholder
//! leaves unsubstituted), and so must the proxy's last check before forwarding. Then the
//! proxy's application of a broker answer and the Basic/query codecs are checked for what they
//! promise. A reused grant's key must exist exactly when the broker finds one placeholder, and
//! name that one.
//!
//! Input: pieces separated by 0xFF. Piece 0 is the query string; each later piece is a header
//! value whose first byte picks the header name.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use paddock_broker::bearer;
use paddock_broker::fuzzing::find_placeholder;
use paddock_wire::api::{BasicAuth, Header, QueryParam, SubstituteAuthResponse};
use paddock_proxy::fuzzing::{
    apply_answer, basic_credentials, carries_placeholder, grant_key, still_holds_placeholder,
    wire_request,
};
use paddock_proxy::http::RequestContext;
use paddock_wire::codec;
use percent_encoding::percent_decode_str;

const NAMES: [&str; 4] = ["authorization", "x-api-key", "cookie", "private-token"];

fn decode(s: &str) -> String {
    percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

fn ctx() -> RequestContext {
    RequestContext {
        run: "fuzz".into(),
        host: "api.example.com".into(),
        port: 443,
        sni: Some("api.example.com".into()),
    }
}

fn scanners_agree(pieces: &[&[u8]]) -> Option<http::request::Parts> {
    let query = std::str::from_utf8(pieces[0]).ok()?;
    let uri = if query.is_empty() {
        "/p".to_owned()
    } else {
        format!("/p?{query}")
    };
    let mut builder = http::Request::builder().uri(uri);
    for piece in &pieces[1..] {
        let (&pick, value) = piece.split_first()?;
        let value = HeaderValue::from_bytes(value).ok()?;
        builder = builder.header(NAMES[usize::from(pick) % NAMES.len()], value);
    }
    let (mut parts, ()) = builder.body(()).ok()?.into_parts();
    let flagged = carries_placeholder(&mut parts);
    let last_check = still_holds_placeholder(&mut parts);
    let wire = wire_request(&mut parts, &ctx());
    let key = grant_key(&mut parts, &ctx());
    match find_placeholder(&wire) {
        Ok((Some(token), places)) => {
            // A reused grant is keyed by the one placeholder the broker would substitute.
            let key = key.expect("the broker finds one placeholder, the grant key none");
            assert!(
                key.ends_with(token.as_bytes()),
                "the grant key names another placeholder than the broker"
            );
            assert!(bearer::is_bearer(&token));
            assert!(places > 0, "a placeholder found nowhere");
            assert!(
                flagged,
                "the broker finds a placeholder the proxy never asks about"
            );
            assert!(
                last_check,
                "the proxy's last check misses a broker placeholder"
            );
        }
        Ok((None, places)) => {
            assert_eq!(places, 0);
            assert!(key.is_none(), "a grant key for a request without a placeholder");
        }
        // Refused: more than one distinct placeholder, so there is at least one.
        Err(_) => {
            assert!(flagged && last_check, "two placeholders, proxy sees none");
            assert!(key.is_none(), "a grant key for a request the broker refuses");
        }
    }
    if last_check {
        assert!(
            flagged,
            "the last check flags what the pre-scan let through"
        );
    }
    Some(parts)
}

/// The proxy applies a broker answer as documented, all or nothing.
fn apply_is_all_or_nothing(mut parts: http::request::Parts, pieces: &[&[u8]]) {
    let text =
        |i: usize| String::from_utf8_lossy(pieces.get(i).copied().unwrap_or(b"")).into_owned();
    let answer = SubstituteAuthResponse {
        matched: true,
        set_headers: vec![Header {
            name: "x-api-key".into(),
            value: text(1),
        }],
        remove_headers: vec!["cookie".into()],
        set_query: vec![QueryParam {
            name: text(2),
            value: text(3),
        }],
        remove_query: vec![text(4)],
        basic_auth: (pieces.len() > 5).then(|| BasicAuth {
            username: text(5),
            password: text(6),
        }),
        ..SubstituteAuthResponse::default()
    };
    let before = parts.clone();
    match apply_answer(&mut parts, &answer) {
        Err(_) => {
            assert_eq!(parts.uri, before.uri, "a failed apply changed the URI");
            assert_eq!(
                parts.headers, before.headers,
                "a failed apply changed headers"
            );
        }
        Ok(()) => {
            assert_eq!(
                parts.headers.get("x-api-key").map(HeaderValue::as_bytes),
                Some(text(1).as_bytes())
            );
            assert!(parts.headers.get("cookie").is_none());
            let q = parts.uri.query().unwrap_or("");
            let set: Vec<(String, String)> = q
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect();
            let name = text(2);
            let hits: Vec<_> = set.iter().filter(|(k, _)| *k == name).collect();
            assert_eq!(hits.len(), 1, "set_query left {} copies", hits.len());
            assert_eq!(hits[0].1, text(3), "set_query value does not round-trip");
            if let Some(basic) = &answer.basic_auth {
                let got = basic_credentials(parts.headers["authorization"].as_bytes());
                let want = format!("{}:{}", basic.username, basic.password).into_bytes();
                assert_eq!(got, Some(want), "Basic credentials do not round-trip");
            }
        }
    }
}

/// The shared codecs (`paddock_wire::codec`), as both sides use them.
fn codecs_round_trip(pieces: &[&[u8]]) {
    let text =
        |i: usize| String::from_utf8_lossy(pieces.get(i).copied().unwrap_or(b"")).into_owned();
    let (user, placeholder, secret) = (text(0), text(1), text(2));
    if !user.contains(':') {
        let value = format!("Basic {}", STANDARD.encode(format!("{user}:{placeholder}")));
        if let Ok(value) = HeaderValue::from_str(&value) {
            let (u, p) = codec::basic::decode(value.as_bytes()).expect("Basic");
            assert_eq!((u.as_str(), p.as_str()), (user.as_str(), placeholder.as_str()));
            let replaced = codec::basic::encode(&user, &secret);
            let got = basic_credentials(replaced.as_bytes()).expect("Basic");
            assert_eq!(got, format!("{user}:{secret}").into_bytes());
        }
    }
    let query = text(3);
    if let Some(new) = codec::query::replace_value(&query, &placeholder, &secret) {
        let values = |q: &str| -> Vec<String> {
            q.split('&')
                .filter_map(|p| p.split_once('=').map(|(_, v)| decode(v)))
                .collect()
        };
        let before = values(&query).iter().filter(|v| **v == placeholder).count();
        assert!(before > 0, "changed a query without the placeholder");
        let after = values(&new).iter().filter(|v| **v == secret).count();
        assert!(after >= before, "secret lost in the query");
        // Untouched parameters keep their bytes; replaced ones carry the secret, encoded.
        assert_eq!(new.split('&').count(), query.split('&').count());
        for (old, new) in query.split('&').zip(new.split('&')) {
            if old != new {
                let (_, value) = new.split_once('=').expect("a replaced pair has a value");
                assert!(
                    value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b))
                );
                assert_eq!(decode(value), secret, "replaced value is not the secret");
            }
        }
    }
    for hit in bearer::find_in(&query) {
        assert!(bearer::is_bearer(hit));
    }
}

fuzz_target!(|data: &[u8]| {
    let pieces: Vec<&[u8]> = data.split(|b| *b == 0xff).collect();
    if let Some(parts) = scanners_agree(&pieces) {
        apply_is_all_or_nothing(parts, &pieces);
    }
    codecs_round_trip(&pieces);
});
