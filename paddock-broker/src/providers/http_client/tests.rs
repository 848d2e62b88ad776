use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    task::{Context, Poll},
    thread::JoinHandle,
};

use hyper_util::client::legacy::connect::dns::Name;

use super::*;

/// Reads one request (head and announced body) so the answer is not sent early.
fn read_request(conn: &mut impl Read) {
    let mut buf = Vec::new();
    let mut chunk = [0_u8; 4096];
    while let Ok(n) = conn.read(&mut chunk) {
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap_or(0));
            if buf.len() >= end + 4 + len {
                return;
            }
        }
    }
}

fn accept(listener: &TcpListener) -> TcpStream {
    let (conn, _) = listener.accept().expect("accept");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    conn
}

/// A stand-in upstream on loopback: answers one connection with `response`, then closes it.
fn serve_once(response: &'static [u8]) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        let mut conn = accept(&listener);
        read_request(&mut conn);
        conn.write_all(response).expect("answer");
        // Dropping closes the connection: whatever was not sent is cut off.
    });
    (addr, server)
}

fn get(addr: SocketAddr) -> Result<HttpResponse, HttpError> {
    let url = url::Url::parse(&format!("http://{addr}/x")).expect("url");
    request("GET", &url, &[], b"", None)
}

#[test]
fn reads_chunked_and_sized_bodies() {
    let (addr, server) = serve_once(
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n",
    );
    let r = get(addr).expect("chunked");
    assert_eq!((r.status, r.body.as_slice()), (201, b"abcdef".as_slice()));
    server.join().expect("server");
    let (addr, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi");
    assert_eq!(get(addr).expect("sized").body, b"hi");
    server.join().expect("server");
    let (addr, server) = serve_once(b"garbage\r\n\r\n");
    assert!(get(addr).is_err());
    server.join().expect("server");
}

#[test]
fn a_body_cut_short_is_an_error_not_a_short_body() {
    let (addr, server) = serve_once(b"HTTP/1.1 201 Created\r\nContent-Length: 9\r\n\r\nhi");
    let err = get(addr).expect_err("Content-Length not reached");
    assert!(matches!(err, HttpError::Malformed(..)), "{err}");
    server.join().expect("server");
    let (addr, server) =
        serve_once(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n");
    let err = get(addr).expect_err("no last chunk");
    assert!(matches!(err, HttpError::Malformed(..)), "{err}");
    server.join().expect("server");
}

/// A TLS upstream whose body runs to the end of the connection; `close_notify` decides
/// whether the connection ended or was cut.
fn tls_once(close_notify: bool) -> Result<HttpResponse, HttpError> {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert.pem()).expect("write CA");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("server config");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        let conn = rustls::ServerConnection::new(Arc::new(config)).expect("conn");
        let mut tls = rustls::StreamOwned::new(conn, accept(&listener));
        read_request(&mut tls);
        tls.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"token\":")
            .expect("answer");
        if close_notify {
            tls.conn.send_close_notify();
        }
        tls.flush().expect("flush");
        // Dropping the socket ends the connection, with or without close_notify.
    });
    let url = url::Url::parse(&format!("https://{addr}/x")).expect("url");
    let result = request("GET", &url, &[], b"", Some(&ca));
    server.join().expect("server");
    result
}

#[test]
fn a_tls_body_without_close_notify_is_an_error() {
    let whole = tls_once(true).expect("a body that ends with close_notify is complete");
    assert_eq!(whole.body, b"{\"token\":");
    let err = tls_once(false).expect_err("truncated TLS body accepted");
    assert!(matches!(err, HttpError::Malformed(..)), "{err}");
}

/// Resolves every name to `addrs`, in order.
#[derive(Clone)]
struct Fixed(Vec<SocketAddr>);

impl tower_service::Service<Name> for Fixed {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Name) -> Self::Future {
        std::future::ready(Ok(self.0.clone().into_iter()))
    }
}

#[test]
fn every_resolved_address_is_tried() {
    let (addr, server) = serve_once(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok");
    // Nothing listens on 127.0.0.2 at that port: the first address refuses.
    let refused = SocketAddr::from(([127, 0, 0, 2], addr.port()));
    let mut tcp = HttpConnector::new_with_resolver(Fixed(vec![refused, addr]));
    configure(&mut tcp);
    let url = url::Url::parse(&format!("http://upstream.test:{}/x", addr.port())).expect("url");
    let r = send(tcp, "POST", &url, &[("Accept", "*/*")], b"{}").expect("second address");
    assert_eq!((r.status, r.body.as_slice()), (201, b"ok".as_slice()));
    server.join().expect("server");
    // With only the refusing address, the connection error surfaces.
    let mut tcp = HttpConnector::new_with_resolver(Fixed(vec![refused]));
    configure(&mut tcp);
    let err = send(tcp, "POST", &url, &[], b"").expect_err("refused");
    assert!(matches!(err, HttpError::Connect(..)), "{err}");
}

#[test]
fn plain_http_only_to_loopback() {
    let url = url::Url::parse("http://upstream.example/x").expect("url");
    let err = request("GET", &url, &[], b"", None).expect_err("cleartext off loopback");
    assert!(matches!(err, HttpError::Url(_)), "{err}");
}

#[test]
fn base_url_rules() {
    assert!(validate_base_url("https://api.github.com").is_ok());
    assert!(validate_base_url("http://127.0.0.1:8080/api").is_ok());
    assert!(validate_base_url("http://api.github.com").is_err());
    assert!(validate_base_url("https://user:pw@api.github.com").is_err());
}
