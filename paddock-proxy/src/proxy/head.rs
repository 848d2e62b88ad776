//! The first request head of a `CONNECT` or plain-HTTP connection, parsed with `httparse`
//! (the parser hyper itself uses, so the proxy decides on the head the request loop will see).
//!
//! The head decides where the connection goes, so anything ambiguous is refused rather than
//! interpreted: a head `httparse` does not accept, one that ends before the blank line
//! [`super::io::read_head`] split it at, more than one `Host` header (which one would the
//! upstream believe?), or a `Host` value that is not a valid authority.

/// The host part of a `Host` header value (`name`, `name:port`, `[v6]:port`).
pub(crate) fn host_of(value: &str) -> Option<&str> {
    if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return (after.is_empty() || after.starts_with(':'))
            .then_some(host)
            .filter(|h| !h.is_empty());
    }
    match value.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => Some(host),
        Some(_) => None,
        None => Some(value),
    }
    .filter(|h| !h.is_empty())
}

/// The parts of a request head the listeners decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedHead<'a> {
    pub method: &'a str,
    /// The request target as written (authority form for `CONNECT`).
    pub target: &'a str,
    /// The one `Host` header's value, whitespace trimmed, if there is one.
    pub host: Option<&'a str>,
}

/// Why a request head is refused (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed request head: {0}")]
    Malformed(httparse::Error),
    #[error("the request head does not end where its blank line is")]
    Incomplete,
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("the Host header is not a valid authority")]
    BadHost,
}

/// Parses a complete head (request line, headers and the blank line, as
/// [`super::io::read_head`] returns it) allowing at most `max_headers` headers.
pub fn parse_head(head: &[u8], max_headers: usize) -> Result<ParsedHead<'_>, HeadError> {
    let mut headers = vec![httparse::EMPTY_HEADER; max_headers.max(1)];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head).map_err(HeadError::Malformed)? {
        httparse::Status::Complete(n) if n == head.len() => {}
        // Parsed to an earlier end (a bare-LF blank line) or not to the end: what follows
        // would be read as another request by the request loop.
        _ => return Err(HeadError::Incomplete),
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(HeadError::Incomplete);
    };
    let mut host = None;
    for h in req.headers.iter() {
        if !h.name.eq_ignore_ascii_case("host") {
            continue;
        }
        if host.is_some() {
            return Err(HeadError::DuplicateHost);
        }
        let value = std::str::from_utf8(h.value)
            .map_err(|_| HeadError::BadHost)?
            .trim();
        if host_of(value).is_none()
            || !value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_:[]%~!$&'()*+,;=".contains(&b))
        {
            return Err(HeadError::BadHost);
        }
        host = Some(value);
    }
    Ok(ParsedHead {
        method,
        target,
        host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Result<ParsedHead<'_>, HeadError> {
        parse_head(head.as_bytes(), 16)
    }

    #[test]
    fn request_line_and_host() {
        assert_eq!(
            parse("GET /a?b HTTP/1.1\r\nHost: Example.com:80\r\nAccept: */*\r\n\r\n"),
            Ok(ParsedHead {
                method: "GET",
                target: "/a?b",
                host: Some("Example.com:80"),
            })
        );
        assert_eq!(
            parse("CONNECT api.test:443 HTTP/1.1\r\n\r\n"),
            Ok(ParsedHead {
                method: "CONNECT",
                target: "api.test:443",
                host: None,
            })
        );
        assert_eq!(
            parse("GET / HTTP/1.0\r\nhOsT:   [fd00::1]:8080  \r\n\r\n")
                .expect("parsed")
                .host,
            Some("[fd00::1]:8080")
        );
    }

    #[test]
    fn duplicate_hosts_are_refused() {
        assert_eq!(
            parse("GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"),
            Err(HeadError::DuplicateHost)
        );
        // The same value twice is still two headers: refused.
        assert_eq!(
            parse("GET / HTTP/1.1\r\nHost: a.test\r\nX: 1\r\nhost: a.test\r\n\r\n"),
            Err(HeadError::DuplicateHost)
        );
        assert_eq!(
            parse("CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"),
            Err(HeadError::DuplicateHost)
        );
    }

    #[test]
    fn malformed_hosts_are_refused() {
        for bad in [
            "",
            ":80",
            "a.test:http",
            "[fd00::1",
            "[]:80",
            "a.test/path",
            "a.test b.test",
            "user@a.test",
            "a.test\u{e9}",
        ] {
            let head = format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n");
            assert!(
                matches!(
                    parse(&head),
                    Err(HeadError::BadHost | HeadError::Malformed(_))
                ),
                "{bad:?}: {:?}",
                parse(&head)
            );
        }
    }

    #[test]
    fn malformed_heads_are_refused() {
        for bad in [
            "GET /\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GET / HTTP/1.1\r\nno colon\r\n\r\n",
            "GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a.test\r\n\r\n",
            "G\u{0}T / HTTP/1.1\r\n\r\n",
            " GET / HTTP/1.1\r\n\r\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}: {:?}", parse(bad));
        }
        // Ends early (bare-LF blank line): the rest would be another request.
        assert_eq!(
            parse("GET / HTTP/1.1\n\nHost: a.test\r\n\r\n"),
            Err(HeadError::Incomplete)
        );
        // More headers than allowed.
        let many = "X-Many: 1\r\n".repeat(20);
        assert!(matches!(
            parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Err(HeadError::Malformed(httparse::Error::TooManyHeaders))
        ));
    }

    #[test]
    fn host_header_forms() {
        assert_eq!(host_of("example.com"), Some("example.com"));
        assert_eq!(host_of("example.com:8080"), Some("example.com"));
        assert_eq!(host_of("[fd00::1]:80"), Some("fd00::1"));
        assert_eq!(host_of("[fd00::1]"), Some("fd00::1"));
        assert_eq!(host_of("[fd00::1]x"), None);
        assert_eq!(host_of(":80"), None);
        assert_eq!(host_of("a:b"), None);
    }

    /// Found by the `http_head` fuzz target (`CONNECT []:83`): empty brackets named an
    /// empty host, which only the name check after it refused.
    #[test]
    fn empty_brackets_are_no_host() {
        assert_eq!(host_of("[]"), None);
        assert_eq!(host_of("[]:80"), None);
    }
}
