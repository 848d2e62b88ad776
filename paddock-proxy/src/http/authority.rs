//! Which authority a request names, and the URI it is forwarded to.
//!
//! The connection's destination was vetted by policy (SNI or plain-HTTP Host). A request on
//! it naming another authority (domain fronting, or an HTTP/2 client coalescing
//! connections) must not reach that other host through this connection: it gets 421 so
//! well-behaved clients retry on a fresh connection, which is then vetted on its own.

use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Uri, header};

use super::{HttpError, RequestContext};

/// The authority the agent addressed: the URI's (HTTP/2 `:authority`, HTTP/1 absolute
/// form) or else the `Host` header.
pub(crate) fn request_authority(parts: &Parts) -> Result<Authority, HttpError> {
    let authority = if let Some(a) = parts.uri.authority() {
        a.clone()
    } else {
        let host = parts
            .headers
            .get(header::HOST)
            .ok_or(HttpError::BadRequest("request names no host"))?;
        Authority::try_from(host.as_bytes())
            .map_err(|_| HttpError::BadRequest("invalid Host header"))?
    };
    if authority.as_str().contains('@') {
        return Err(HttpError::BadRequest("user info in request authority"));
    }
    Ok(authority)
}

/// Checks the agent's authority against the connection destination: same host (ASCII
/// case-insensitive, trailing dot ignored) and, when a port is given, the same port.
pub(crate) fn check(authority: &Authority, ctx: &RequestContext) -> Result<(), HttpError> {
    let same_host = normalize(authority.host()).eq_ignore_ascii_case(normalize(&ctx.host));
    let same_port = authority.port_u16().is_none_or(|p| p == ctx.port);
    if same_host && same_port {
        Ok(())
    } else {
        Err(HttpError::Misdirected {
            authority: authority.as_str().chars().take(255).collect(),
            host: ctx.host.clone(),
            port: ctx.port,
        })
    }
}

/// The absolute URI the request is forwarded to: the connection's destination, never what
/// the agent wrote, plus the agent's path and query.
pub(crate) fn upstream_uri(ctx: &RequestContext, parts: &Parts) -> Result<Uri, HttpError> {
    UpstreamBase::of(ctx)?.uri(parts)
}

/// The scheme and authority of a connection's upstream URIs: the same for every request of
/// the connection, so worked out once (formatting and parsing the authority allocates).
#[derive(Clone, Debug)]
pub(crate) struct UpstreamBase {
    scheme: Scheme,
    authority: Authority,
}

impl UpstreamBase {
    pub(crate) fn of(ctx: &RequestContext) -> Result<Self, HttpError> {
        let scheme = if ctx.upstream_tls() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let default_port = if ctx.upstream_tls() { 443 } else { 80 };
        let host = normalize(&ctx.host);
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let authority = if ctx.port == default_port {
            host
        } else {
            format!("{host}:{}", ctx.port)
        };
        let authority = Authority::try_from(authority)
            .map_err(|_| HttpError::BadRequest("destination is not a valid authority"))?;
        Ok(Self { scheme, authority })
    }

    /// This destination plus the agent's path and query.
    pub(crate) fn uri(&self, parts: &Parts) -> Result<Uri, HttpError> {
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|_| HttpError::BadRequest("cannot build upstream URI"))
    }
}

fn normalize(host: &str) -> &str {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.strip_suffix('.').unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn ctx(host: &str, port: u16, tls: bool) -> RequestContext {
        RequestContext {
            run: "r".into(),
            host: host.into(),
            port,
            sni: tls.then(|| host.to_owned()),
        }
    }

    fn parts(uri: &str, host: Option<&str>) -> Parts {
        let mut b = Request::get(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn authority_check_table() {
        let c = ctx("api.example.com", 443, true);
        let cases = [
            ("/", Some("api.example.com"), Ok(())),
            ("/", Some("API.Example.COM:443"), Ok(())),
            ("/", Some("api.example.com."), Ok(())),
            ("/", Some("api.example.com:8443"), Err(421)),
            ("/", Some("evil.example.com"), Err(421)),
            ("https://api.example.com/x", None, Ok(())),
            (
                "https://evil.example.com/x",
                Some("api.example.com"),
                Err(421),
            ),
            ("/", None, Err(400)),
            ("/", Some("user@api.example.com"), Err(400)),
            ("/", Some("bad host"), Err(400)),
        ];
        for (uri, host, expected) in cases {
            let got = request_authority(&parts(uri, host)).and_then(|a| check(&a, &c));
            let got = got.map_err(|e| e.status().as_u16());
            assert_eq!(got, expected, "{uri} {host:?}");
        }
    }

    #[test]
    fn ipv6_literal_authority() {
        let c = ctx("::1", 8080, false);
        let a = request_authority(&parts("/", Some("[::1]:8080"))).expect("authority");
        check(&a, &c).expect("same host");
        let uri = upstream_uri(&c, &parts("/p?q=1", None)).expect("uri");
        assert_eq!(uri, "http://[::1]:8080/p?q=1");
    }

    #[test]
    fn upstream_uri_uses_connection_destination() {
        let c = ctx("api.example.com", 443, true);
        let uri =
            upstream_uri(&c, &parts("https://api.example.com:443/a/b?c=d", None)).expect("uri");
        assert_eq!(uri, "https://api.example.com/a/b?c=d");
        let c = ctx("api.example.com", 8443, true);
        let uri = upstream_uri(&c, &parts("/", None)).expect("uri");
        assert_eq!(uri, "https://api.example.com:8443/");
    }
}
