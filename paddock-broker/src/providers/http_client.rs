//! A small blocking HTTP/1.1 client for provider back-ends (GitHub's token endpoint).
//!
//! Providers run on the broker's blocking pool (or an embedder's thread), so a blocking client
//! with hard timeouts and a response size cap keeps them runtime-agnostic. `https` uses
//! rustls (ring, webpki roots or a configured CA); plain `http` is accepted only for loopback
//! hosts (tests, local fakes).

use std::{
    io::{Read, Write},
    net::{IpAddr, TcpStream, ToSocketAddrs},
    path::Path,
    sync::Arc,
    time::Duration,
};

use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned, pki_types::ServerName};

const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RESPONSE: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL: {0}")]
    Url(String),
    #[error("connection to {0} failed: {1}")]
    Connect(String, String),
    #[error("I/O with {0} failed: {1}")]
    Io(String, String),
    #[error("malformed response from {0}: {1}")]
    Malformed(String, String),
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks a provider base URL: `https`, or `http` to a loopback host.
pub fn validate_base_url(raw: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(raw).map_err(|e| format!("invalid URL {raw:?}: {e}"))?;
    let host = u
        .host_str()
        .ok_or_else(|| format!("URL {raw:?} has no host"))?;
    match u.scheme() {
        "https" => {}
        "http" if is_loopback(host) => {}
        _ => {
            return Err(format!(
                "URL {raw:?} must use https (http only for loopback hosts)"
            ));
        }
    }
    if !u.username().is_empty()
        || u.password().is_some()
        || u.query().is_some()
        || u.fragment().is_some()
    {
        return Err(format!(
            "URL {raw:?} must not carry credentials, a query or a fragment"
        ));
    }
    Ok(u)
}

fn tls_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, HttpError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in
                crate::server::tls::load_certs(path).map_err(|e| HttpError::Tls(e.to_string()))?
            {
                roots.add(cert).map_err(|e| HttpError::Tls(e.to_string()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| HttpError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Sends one request (`Connection: close`) and reads the whole response.
pub fn request(
    method: &str,
    url: &url::Url,
    headers: &[(&str, &str)],
    body: &[u8],
    ca_file: Option<&Path>,
) -> Result<HttpResponse, HttpError> {
    let host = url
        .host_str()
        .ok_or_else(|| HttpError::Url("no host".into()))?
        .to_owned();
    let port = url
        .port_or_known_default()
        .ok_or_else(|| HttpError::Url("no port".into()))?;
    let https = match url.scheme() {
        "https" => true,
        "http" if is_loopback(&host) => false,
        other => return Err(HttpError::Url(format!("scheme {other} not allowed"))),
    };
    let target = format!("{host}:{port}");
    let addr = (host.trim_start_matches('[').trim_end_matches(']'), port)
        .to_socket_addrs()
        .map_err(|e| HttpError::Connect(target.clone(), e.to_string()))?
        .next()
        .ok_or_else(|| HttpError::Connect(target.clone(), "no address".into()))?;
    let tcp = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|e| HttpError::Connect(target.clone(), e.to_string()))?;
    let io_err = |e: std::io::Error| HttpError::Io(target.clone(), e.to_string());
    tcp.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    tcp.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut raw = Vec::new();
    if https {
        let name = ServerName::try_from(host.clone()).map_err(|e| HttpError::Url(e.to_string()))?;
        let conn = ClientConnection::new(tls_config(ca_file)?, name)
            .map_err(|e| HttpError::Tls(e.to_string()))?;
        let mut stream = StreamOwned::new(conn, tcp);
        exchange(&mut stream, head.as_bytes(), body, &mut raw).map_err(io_err)?;
    } else {
        let mut stream = tcp;
        exchange(&mut stream, head.as_bytes(), body, &mut raw).map_err(io_err)?;
    }
    parse(&raw).map_err(|m| HttpError::Malformed(target, m))
}

fn exchange(
    stream: &mut (impl Read + Write),
    head: &[u8],
    body: &[u8],
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    stream.write_all(head)?;
    stream.write_all(body)?;
    stream.flush()?;
    match stream.take(MAX_RESPONSE).read_to_end(out) {
        Ok(_) => Ok(()),
        // Servers often close TLS without close_notify after `Connection: close`.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => Ok(()),
        Err(e) => Err(e),
    }
}

fn parse(raw: &[u8]) -> Result<HttpResponse, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("no status line")?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or("malformed header")?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| "bad content-length")?);
        }
    }
    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or("body shorter than content-length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&data[..line_end]).map_err(|_| "bad chunk size")?;
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap_or_default().trim(), 16)
                .map_err(|_| "bad chunk size")?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).ok_or("truncated chunk")?);
        data = data.get(size + 2..).ok_or("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_and_sized_bodies() {
        let r = parse(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n").expect("chunked");
        assert_eq!((r.status, r.body.as_slice()), (201, b"abcdef".as_slice()));
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiXX").expect("sized");
        assert_eq!(r.body, b"hi");
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhi").is_err());
        assert!(parse(b"garbage").is_err());
    }

    #[test]
    fn base_url_rules() {
        assert!(validate_base_url("https://api.github.com").is_ok());
        assert!(validate_base_url("http://127.0.0.1:8080/api").is_ok());
        assert!(validate_base_url("http://api.github.com").is_err());
        assert!(validate_base_url("https://user:pw@api.github.com").is_err());
    }
}
