//! Hop-by-hop header handling (RFC 9110 section 7.6.1, RFC 9112 section 6.3).
//!
//! Connection-specific headers describe one leg; the proxy owns both legs, so it drops
//! what the agent said about its leg and lets hyper write what the upstream leg needs.
//! The one exception is a forwarded `Upgrade`: the upgrade is negotiated end to end, so
//! `Upgrade` and `Connection: upgrade` survive on both the request and the 101.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that are hop-by-hop whether or not `Connection` lists them, the last two legacy
/// names without a constant in `http`. As `HeaderName`s, a comparison with a standard name
/// is an enum compare; as strings, every name of every head would be turned back into text
/// to compare it.
const ALWAYS_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Whether a head asks to upgrade the connection (HTTP/1.1 `Connection: upgrade` plus an
/// `Upgrade` header); returns the protocol list when it does.
///
/// An offer that includes `h2c` is not treated as an upgrade (its `Upgrade` header is then
/// stripped like any hop-by-hop header): the tunnel would carry HTTP/2 requests past this
/// loop's per-request authority check and substitution. The deprecated h2c upgrade is
/// optional for servers, so the request still gets an ordinary answer.
#[must_use]
pub fn upgrade_request(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
    if protocol_names(upgrade).any(|p| p.eq_ignore_ascii_case("h2c")) {
        return None;
    }
    connection_tokens(headers)
        .any(|t| t.eq_ignore_ascii_case("upgrade"))
        .then(|| upgrade.clone())
}

/// Whether the protocol a 101 switched to is one the request offered (names compared
/// case-insensitively, versions ignored).
#[must_use]
pub fn upgrade_accepted(offered: &HeaderValue, chosen: &HeaderValue) -> bool {
    let Some(chosen) = protocol_names(chosen).next() else {
        return false;
    };
    protocol_names(offered).any(|p| p.eq_ignore_ascii_case(chosen))
}

fn protocol_names(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or_default()
        .split(',')
        .filter_map(|p| p.split('/').next())
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// Removes hop-by-hop headers from a head about to be forwarded.
///
/// `keep_upgrade` carries the `Upgrade` value through (and restates `Connection: upgrade`)
/// for an upgrade being forwarded. `TE` survives only as `TE: trailers`, which gRPC needs
/// and which both legs honour because trailers are forwarded.
pub fn strip(headers: &mut HeaderMap, keep_upgrade: Option<&HeaderValue>) {
    // Most heads carry no hop-by-hop header at all: one pass over the names (comparisons of
    // standard names are enum compares) spares a dozen hashed lookups per head.
    if headers.keys().any(is_hop_name) {
        strip_present(headers);
    }
    if let Some(upgrade) = keep_upgrade {
        headers.insert(header::UPGRADE, upgrade.clone());
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether removing hop-by-hop headers could change anything when `name` is present:
/// always-hop names, and `TE` (kept only as `TE: trailers`). Names that `Connection`
/// lists need `Connection` itself, which is one of them.
fn is_hop_name(name: &HeaderName) -> bool {
    ALWAYS_HOP.contains(name) || *name == header::TE
}

fn strip_present(headers: &mut HeaderMap) {
    // Collect first: the listed names are removed too, and a listed name may be an
    // end-to-end header the agent wants gone from this hop only. Only names the head
    // carries are removed: a removal is a hashed lookup, and most heads that get here carry
    // one or two hop-by-hop names (an upstream's `Connection: keep-alive`), not all eight.
    // A listed token is looked up as text first: most name no header of the head
    // (`keep-alive`, `close`), and making a `HeaderName` of one allocates.
    // `Connection: keep-alive`, what nearly every HTTP/1.1 server sends, lists only a name
    // that goes anyway: its tokens are not read at all.
    let lists_more = headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"keep-alive"));
    let listed: Vec<HeaderName> = if lists_more {
        connection_tokens(headers)
            .filter(|t| headers.contains_key(*t))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    // The always-hop names present, as bits of their `ALWAYS_HOP` index: no list to build.
    let mut present = 0u16;
    let mut has_te = false;
    // A message that arrived chunked must not carry Content-Length on (RFC 9112 6.3):
    // the forwarded framing is hyper's to decide.
    let mut chunked = listed.contains(&header::TRANSFER_ENCODING);
    for name in headers.keys() {
        if *name == header::TE {
            has_te = true;
        } else if let Some(i) = ALWAYS_HOP.iter().position(|hop| hop == name) {
            present |= 1 << i;
            chunked |= *name == header::TRANSFER_ENCODING;
        }
    }
    for (i, name) in ALWAYS_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    for name in listed {
        headers.remove(name);
    }
    if chunked {
        headers.remove(header::CONTENT_LENGTH);
    }
    if has_te {
        let keeps_trailers = headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
        headers.remove(header::TE);
        if keeps_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// Appends `via` to the `Via` header list.
pub fn append_via(headers: &mut HeaderMap, via: &HeaderValue) {
    headers.append(header::VIA, via.clone());
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut v: Vec<String> = h
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
            .collect();
        v.sort();
        v
    }

    struct Case {
        name: &'static str,
        input: &'static [(&'static str, &'static str)],
        keep_upgrade: bool,
        expected: &'static [&'static str],
    }

    fn check(cases: &[Case]) {
        for case in cases {
            let mut h = map(case.input);
            let upgrade = if case.keep_upgrade {
                upgrade_request(&h)
            } else {
                None
            };
            assert_eq!(upgrade.is_some(), case.keep_upgrade, "{}", case.name);
            strip(&mut h, upgrade.as_ref());
            let mut expected: Vec<String> = case.expected.iter().map(|s| (*s).to_owned()).collect();
            expected.sort();
            assert_eq!(names(&h), expected, "{}", case.name);
        }
    }

    #[test]
    fn strip_table() {
        let cases = [
            Case {
                name: "end-to-end headers survive",
                input: &[
                    ("accept", "*/*"),
                    ("authorization", "Bearer x"),
                    ("content-length", "3"),
                ],
                keep_upgrade: false,
                expected: &["accept=*/*", "authorization=Bearer x", "content-length=3"],
            },
            Case {
                name: "fixed hop-by-hop set",
                input: &[
                    ("connection", "keep-alive"),
                    ("keep-alive", "timeout=5"),
                    ("proxy-connection", "keep-alive"),
                    ("proxy-authorization", "Basic abc"),
                    ("proxy-authenticate", "Basic"),
                    ("trailer", "x-checksum"),
                    ("upgrade", "h2c"),
                    ("accept", "*/*"),
                ],
                keep_upgrade: false,
                expected: &["accept=*/*"],
            },
            Case {
                name: "headers listed in Connection are removed, case-insensitively",
                input: &[
                    ("connection", "X-Foo, close"),
                    ("connection", " x-bar "),
                    ("x-foo", "1"),
                    ("x-bar", "2"),
                    ("x-baz", "3"),
                ],
                keep_upgrade: false,
                expected: &["x-baz=3"],
            },
            Case {
                name: "listed standard names go; listed tokens that name nothing change nothing",
                input: &[
                    ("connection", "Content-Type, not a name, keep-alive, close"),
                    ("content-type", "text/plain"),
                    ("accept", "*/*"),
                ],
                keep_upgrade: false,
                expected: &["accept=*/*"],
            },
            Case {
                name: "te keeps only trailers",
                input: &[("te", "gzip, trailers;q=1")],
                keep_upgrade: false,
                expected: &["te=trailers"],
            },
            Case {
                name: "te without trailers goes",
                input: &[("te", "gzip, deflate")],
                keep_upgrade: false,
                expected: &[],
            },
            Case {
                name: "forwarded upgrade keeps Upgrade and Connection: upgrade",
                input: &[
                    ("connection", "Upgrade, x-foo"),
                    ("upgrade", "websocket"),
                    ("x-foo", "1"),
                    ("sec-websocket-key", "k"),
                ],
                keep_upgrade: true,
                expected: &[
                    "connection=upgrade",
                    "sec-websocket-key=k",
                    "upgrade=websocket",
                ],
            },
        ];
        check(&cases);
    }

    #[test]
    fn framing_and_listed_names_table() {
        let cases = [
            Case {
                name: "chunked framing drops content-length",
                input: &[("transfer-encoding", "chunked"), ("content-length", "10")],
                keep_upgrade: false,
                expected: &[],
            },
            Case {
                // Framing is judged on the message as received: listing Transfer-Encoding
                // in Connection must not leave a stale Content-Length on.
                name: "chunked framing drops content-length even when Connection lists it",
                input: &[
                    ("connection", "transfer-encoding"),
                    ("transfer-encoding", "chunked"),
                    ("content-length", "10"),
                ],
                keep_upgrade: false,
                expected: &[],
            },
            Case {
                name: "only the listed and hop-by-hop names go",
                input: &[
                    ("connection", "keep-alive"),
                    ("server", "nginx"),
                    ("content-length", "25"),
                    ("etag", "\"x\""),
                ],
                keep_upgrade: false,
                expected: &["content-length=25", "etag=\"x\"", "server=nginx"],
            },
        ];
        check(&cases);
    }

    /// The one-pass check must see every hop-by-hop name on its own, not only beside
    /// `Connection`.
    #[test]
    fn each_hop_by_hop_name_alone_is_removed() {
        let names_of = names;
        let names = [
            "connection",
            "proxy-authorization",
            "proxy-authenticate",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "keep-alive",
            "proxy-connection",
            "te",
        ];
        for name in names {
            let mut h = map(&[(name, "x"), ("accept", "*/*")]);
            strip(&mut h, None);
            assert_eq!(names_of(&h), ["accept=*/*"], "{name}");
        }
    }

    #[test]
    fn upgrade_detection_table() {
        type Headers = &'static [(&'static str, &'static str)];
        let cases: [(Headers, Option<&str>); 6] = [
            (
                &[
                    ("connection", "Upgrade, HTTP2-Settings"),
                    ("upgrade", "h2c"),
                ],
                None,
            ),
            (
                &[("connection", "Upgrade"), ("upgrade", "foo/1, H2C")],
                None,
            ),
            (
                &[("connection", "Upgrade"), ("upgrade", "websocket")],
                Some("websocket"),
            ),
            (
                &[
                    ("connection", "keep-alive, upgrade"),
                    ("upgrade", "websocket"),
                ],
                Some("websocket"),
            ),
            (&[("upgrade", "websocket")], None),
            (&[("connection", "upgrade")], None),
        ];
        for (input, expected) in cases {
            let got = upgrade_request(&map(input));
            assert_eq!(
                got.as_ref().and_then(|v| v.to_str().ok()),
                expected,
                "{input:?}"
            );
        }
    }

    #[test]
    fn upgrade_accepted_table() {
        let v = HeaderValue::from_static;
        assert!(upgrade_accepted(&v("websocket"), &v("WebSocket")));
        assert!(upgrade_accepted(&v("foo/2, websocket"), &v("websocket")));
        assert!(upgrade_accepted(&v("foo/1"), &v("foo/2")));
        assert!(!upgrade_accepted(&v("websocket"), &v("h2c")));
        assert!(!upgrade_accepted(&v("websocket"), &v("")));
    }

    #[test]
    fn via_appends() {
        let mut h = map(&[("via", "1.1 cdn")]);
        append_via(&mut h, &HeaderValue::from_static("1.1 paddock"));
        let all: Vec<_> = h.get_all(header::VIA).iter().collect();
        assert_eq!(all, ["1.1 cdn", "1.1 paddock"]);
    }
}
