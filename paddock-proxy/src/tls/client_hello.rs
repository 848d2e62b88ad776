//! Reading a TLS `ClientHello` off a socket without consuming it.
//!
//! The transparent listener must learn the SNI (to check policy and forge a leaf) before the
//! TLS server sees the bytes, so it peeks them: the kernel buffer is left untouched and rustls
//! later reads the very same hello. The parser is strict where a lax reading could let the
//! proxy and rustls disagree about the name (duplicate extensions, several host names, invalid
//! names), and lenient elsewhere (unknown extensions, GREASE values, trailing records).

use std::borrow::Cow;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::TlsError;

const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// RFC 8446 5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD_PAYLOAD: usize = 1 << 14;

const EXT_SERVER_NAME: u16 = 0x0000;
const EXT_ALPN: u16 = 0x0010;
const EXT_SUPPORTED_VERSIONS: u16 = 0x002b;
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;
const SNI_HOST_NAME: u8 = 0;

/// Why a byte buffer is not (yet) a usable `ClientHello`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The bytes so far are a valid prefix; at least this many more are needed.
    #[error("incomplete ClientHello: at least {0} more bytes needed")]
    NeedMore(usize),
    /// The stream does not start with a TLS handshake record.
    #[error("not a TLS handshake")]
    NotTls,
    /// A TLS handshake record, but not a well-formed `ClientHello`.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// A well-formed `ClientHello` without a DNS host name to intercept for.
    #[error("ClientHello carries no server name")]
    NoSni,
}

/// What the `encrypted_client_hello` extension announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchKind {
    /// An outer hello: the real (inner) hello is encrypted and the SNI is the public name.
    Outer,
    /// An inner hello marker, which should never travel in clear.
    Inner,
}

/// The parts of a `ClientHello` the proxy decides on. GREASE values (RFC 8701) are dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    server_name: Option<String>,
    sni_was_ip_literal: bool,
    alpn: Vec<Vec<u8>>,
    supported_versions: Vec<u16>,
    legacy_version: u16,
    cipher_suites: Vec<u16>,
    extensions: Vec<u16>,
    ech: Option<EchKind>,
    wire_len: usize,
}

impl ClientHello {
    /// The SNI host name, lowercased and without a trailing dot, if the client sent a DNS name.
    ///
    /// An IP literal in SNI is illegal (RFC 6066 3); like rustls, it is treated as absent.
    #[must_use]
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// The SNI host name, or [`HelloError::NoSni`]: the proxy denies hellos without one.
    pub fn require_sni(&self) -> Result<&str, HelloError> {
        self.server_name().ok_or(HelloError::NoSni)
    }

    /// Whether the client put an IP literal in SNI (reported as no SNI).
    #[must_use]
    pub fn sni_was_ip_literal(&self) -> bool {
        self.sni_was_ip_literal
    }

    /// ALPN protocol names in the client's order; empty when the extension is absent.
    #[must_use]
    pub fn alpn(&self) -> &[Vec<u8>] {
        &self.alpn
    }

    /// Whether the client offers this ALPN protocol.
    #[must_use]
    pub fn offers_alpn(&self, protocol: &[u8]) -> bool {
        self.alpn.iter().any(|p| p == protocol)
    }

    /// `supported_versions` values; empty when the extension is absent (TLS 1.2 and older).
    #[must_use]
    pub fn supported_versions(&self) -> &[u16] {
        &self.supported_versions
    }

    /// The `legacy_version` field of the hello (0x0303 for TLS 1.2 and 1.3 clients).
    #[must_use]
    pub fn legacy_version(&self) -> u16 {
        self.legacy_version
    }

    /// Offered cipher suites, in the client's order.
    #[must_use]
    pub fn cipher_suites(&self) -> &[u16] {
        &self.cipher_suites
    }

    /// Extension types in the order they were sent (for fingerprinting and audit).
    #[must_use]
    pub fn extension_types(&self) -> &[u16] {
        &self.extensions
    }

    /// The ECH extension's kind, if present.
    #[must_use]
    pub fn ech(&self) -> Option<EchKind> {
        self.ech
    }

    /// Whether this is an ECH outer hello: its SNI is the ECH public name, not the real target.
    #[must_use]
    pub fn is_ech_outer(&self) -> bool {
        self.ech == Some(EchKind::Outer)
    }

    /// How many bytes of the stream the records carrying this hello occupy.
    #[must_use]
    pub fn wire_len(&self) -> usize {
        self.wire_len
    }
}

/// RFC 8701 reserves values of the form 0x?A?A with both bytes equal.
#[must_use]
pub fn is_grease(value: u16) -> bool {
    value & 0x0f0f == 0x0a0a && value >> 8 == value & 0xff
}

fn is_grease_protocol(name: &[u8]) -> bool {
    matches!(name, [a, b] if is_grease(u16::from_be_bytes([*a, *b])))
}

/// Parses a `ClientHello` from the start of a TLS stream.
///
/// `bytes` may hold less than the whole hello ([`HelloError::NeedMore`]) or more (trailing
/// bytes are ignored). The hello may be fragmented over several handshake records.
pub fn parse_client_hello(bytes: &[u8]) -> Result<ClientHello, HelloError> {
    let (message, wire_len) = assemble_handshake(bytes)?;
    let mut hello = parse_body(&message[HANDSHAKE_HEADER_LEN..])?;
    hello.wire_len = wire_len;
    Ok(hello)
}

/// Collects the first handshake message from consecutive handshake records.
///
/// Borrows when the message fits in the first record (the usual case) and copies otherwise.
fn assemble_handshake(bytes: &[u8]) -> Result<(Cow<'_, [u8]>, usize), HelloError> {
    let mut message: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    let mut pos = 0;
    // Total message length (header included), known once the 4-byte header is in.
    let mut needed: Option<usize> = None;
    loop {
        let header = &bytes[pos.min(bytes.len())..];
        check_record_header_prefix(header, pos == 0)?;
        let have = message.len();
        if header.len() < RECORD_HEADER_LEN {
            let still = needed.map_or(1, |n| n.saturating_sub(have).max(1));
            return Err(HelloError::NeedMore(
                RECORD_HEADER_LEN - header.len() + still,
            ));
        }
        let record_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if record_len == 0 {
            return Err(HelloError::Malformed("empty handshake record"));
        }
        if record_len > MAX_RECORD_PAYLOAD {
            return Err(HelloError::Malformed("record longer than 2^14 bytes"));
        }
        let payload_available = (header.len() - RECORD_HEADER_LEN).min(record_len);
        let payload = &header[RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload_available];

        // Reject a non-ClientHello as soon as its type byte is visible, without waiting.
        if have == 0
            && payload
                .first()
                .is_some_and(|&t| t != HANDSHAKE_CLIENT_HELLO)
        {
            return Err(HelloError::Malformed(
                "first handshake message is not a ClientHello",
            ));
        }
        if payload_available < record_len {
            let missing_here = record_len - payload_available;
            let after_record = have + record_len;
            let beyond = match needed.or_else(|| peek_message_len(&message, payload)) {
                Some(n) if n > after_record => RECORD_HEADER_LEN + (n - after_record),
                _ => 0,
            };
            return Err(HelloError::NeedMore(missing_here + beyond));
        }

        if message.is_empty() {
            message = Cow::Borrowed(payload);
        } else {
            message.to_mut().extend_from_slice(payload);
        }
        pos += RECORD_HEADER_LEN + record_len;

        if needed.is_none() && message.len() >= HANDSHAKE_HEADER_LEN {
            needed = Some(HANDSHAKE_HEADER_LEN + read_u24(&message[1..4]));
        }
        if let Some(total) = needed
            && message.len() >= total
        {
            // Bytes of a following handshake message in the same record are not ours to judge.
            let message = match message {
                Cow::Borrowed(b) => Cow::Borrowed(&b[..total]),
                Cow::Owned(mut v) => {
                    v.truncate(total);
                    Cow::Owned(v)
                }
            };
            return Ok((message, pos));
        }
    }
}

/// The handshake message length, if the header is visible in what we have plus a partial record.
fn peek_message_len(message: &[u8], partial: &[u8]) -> Option<usize> {
    let mut header = [0u8; HANDSHAKE_HEADER_LEN];
    let mut filled = 0;
    for &b in message.iter().chain(partial).take(HANDSHAKE_HEADER_LEN) {
        header[filled] = b;
        filled += 1;
    }
    (filled == HANDSHAKE_HEADER_LEN).then(|| HANDSHAKE_HEADER_LEN + read_u24(&header[1..4]))
}

/// Checks whatever part of a record header is present, so non-TLS bytes fail on the first byte.
fn check_record_header_prefix(header: &[u8], first_record: bool) -> Result<(), HelloError> {
    let reject = if first_record {
        HelloError::NotTls
    } else {
        HelloError::Malformed("non-handshake record inside ClientHello")
    };
    if header.first().is_some_and(|&t| t != CONTENT_TYPE_HANDSHAKE) {
        return Err(reject);
    }
    // Record layer legacy_version: 0x0300 ..= 0x0304.
    if header.get(1).is_some_and(|&major| major != 0x03) {
        return Err(reject);
    }
    if header.get(2).is_some_and(|&minor| minor > 0x04) {
        return Err(reject);
    }
    Ok(())
}

fn read_u24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

/// A bounds-checked cursor: every read either succeeds or names what was cut short.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.data.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec_u8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let len = usize::from(self.u8(what)?);
        self.take(len, what)
    }

    fn vec_u16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let len = usize::from(self.u16(what)?);
        self.take(len, what)
    }

    fn expect_end(&self, what: &'static str) -> Result<(), HelloError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(HelloError::Malformed(what))
        }
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader::new(body);
    let legacy_version = r.u16("truncated legacy_version")?;
    r.take(32, "truncated random")?;
    let session_id = r.vec_u8("truncated session id")?;
    if session_id.len() > 32 {
        return Err(HelloError::Malformed("session id longer than 32 bytes"));
    }
    let suites = r.vec_u16("truncated cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher suite list empty or odd"));
    }
    let cipher_suites = suites
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .filter(|&s| !is_grease(s))
        .collect();
    let compression = r.vec_u8("truncated compression methods")?;
    if compression.is_empty() {
        return Err(HelloError::Malformed("no compression method"));
    }

    let mut hello = ClientHello {
        server_name: None,
        sni_was_ip_literal: false,
        alpn: Vec::new(),
        supported_versions: Vec::new(),
        legacy_version,
        cipher_suites,
        extensions: Vec::new(),
        ech: None,
        wire_len: 0,
    };
    // Extensions may be absent altogether in pre-TLS-1.3 hellos.
    if r.is_empty() {
        return Ok(hello);
    }
    let extensions = r.vec_u16("truncated extensions")?;
    r.expect_end("bytes after the extensions")?;

    let mut ext = Reader::new(extensions);
    let mut seen: Vec<u16> = Vec::new();
    while !ext.is_empty() {
        let kind = ext.u16("truncated extension type")?;
        let data = ext.vec_u16("truncated extension body")?;
        if is_grease(kind) {
            continue;
        }
        // RFC 8446 4.2: at most one extension of each type; a duplicate could make the proxy
        // and the TLS server read different names.
        if seen.contains(&kind) {
            return Err(HelloError::Malformed("duplicate extension"));
        }
        seen.push(kind);
        match kind {
            EXT_SERVER_NAME => parse_server_name(data, &mut hello)?,
            EXT_ALPN => hello.alpn = parse_alpn(data)?,
            EXT_SUPPORTED_VERSIONS => hello.supported_versions = parse_supported_versions(data)?,
            EXT_ENCRYPTED_CLIENT_HELLO => hello.ech = Some(parse_ech(data)?),
            _ => {}
        }
    }
    hello.extensions = seen;
    Ok(hello)
}

fn parse_server_name(data: &[u8], hello: &mut ClientHello) -> Result<(), HelloError> {
    let mut outer = Reader::new(data);
    let list = outer.vec_u16("truncated server name list")?;
    outer.expect_end("bytes after the server name list")?;
    if list.is_empty() {
        return Err(HelloError::Malformed("empty server name list"));
    }
    let mut r = Reader::new(list);
    let mut found = false;
    while !r.is_empty() {
        let name_type = r.u8("truncated server name type")?;
        if name_type != SNI_HOST_NAME {
            // Unknown name types have an unknown encoding: nothing after them can be read.
            break;
        }
        let name = r.vec_u16("truncated host name")?;
        if found {
            return Err(HelloError::Malformed("more than one host_name"));
        }
        found = true;
        match ServerName::try_from(name) {
            Ok(ServerName::DnsName(dns)) => {
                let lower = dns.as_ref().to_ascii_lowercase();
                let trimmed = lower.strip_suffix('.').unwrap_or(&lower);
                hello.server_name = Some(trimmed.to_owned());
            }
            Ok(ServerName::IpAddress(_)) => hello.sni_was_ip_literal = true,
            Ok(_) | Err(_) => return Err(HelloError::Malformed("invalid host_name")),
        }
    }
    Ok(())
}

fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut outer = Reader::new(data);
    let list = outer.vec_u16("truncated ALPN list")?;
    outer.expect_end("bytes after the ALPN list")?;
    if list.is_empty() {
        return Err(HelloError::Malformed("empty ALPN list"));
    }
    let mut r = Reader::new(list);
    let mut protocols = Vec::new();
    while !r.is_empty() {
        let name = r.vec_u8("truncated ALPN protocol")?;
        if name.is_empty() {
            return Err(HelloError::Malformed("empty ALPN protocol name"));
        }
        if !is_grease_protocol(name) {
            protocols.push(name.to_vec());
        }
    }
    Ok(protocols)
}

fn parse_supported_versions(data: &[u8]) -> Result<Vec<u16>, HelloError> {
    let mut outer = Reader::new(data);
    let list = outer.vec_u8("truncated supported_versions")?;
    outer.expect_end("bytes after supported_versions")?;
    if list.is_empty() || list.len() % 2 != 0 {
        return Err(HelloError::Malformed("supported_versions empty or odd"));
    }
    Ok(list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .filter(|&v| !is_grease(v))
        .collect())
}

/// draft-ietf-tls-esni: `ECHClientHello { ECHClientHelloType type; select (type) {...} }`.
fn parse_ech(data: &[u8]) -> Result<EchKind, HelloError> {
    let mut r = Reader::new(data);
    match r.u8("empty encrypted_client_hello")? {
        0 => {
            r.take(4, "truncated ECH cipher suite")?;
            r.u8("truncated ECH config id")?;
            r.vec_u16("truncated ECH enc")?;
            let payload = r.vec_u16("truncated ECH payload")?;
            if payload.is_empty() {
                return Err(HelloError::Malformed("empty ECH payload"));
            }
            r.expect_end("bytes after the ECH payload")?;
            Ok(EchKind::Outer)
        }
        1 => {
            r.expect_end("bytes after the ECH inner marker")?;
            Ok(EchKind::Inner)
        }
        _ => Err(HelloError::Malformed("unknown ECH type")),
    }
}

const INITIAL_PEEK_BUFFER: usize = 2048;

/// Waits until the socket holds a complete `ClientHello` and parses it, consuming nothing.
///
/// `max_bytes` caps how much is buffered (a hello claiming more is rejected), `timeout` bounds
/// the whole wait. Each wake-up peeks once; when the peek shows no new bytes the readiness is
/// cleared inside the same `try_io` call, so a segment arriving in between is never missed
/// and an incomplete hello does not spin the task.
pub async fn peek_client_hello(
    stream: &TcpStream,
    max_bytes: usize,
    timeout: Duration,
) -> Result<ClientHello, TlsError> {
    match tokio::time::timeout(timeout, peek_loop(stream, max_bytes)).await {
        Ok(result) => result,
        Err(_) => Err(TlsError::HelloTimeout(timeout)),
    }
}

async fn peek_loop(stream: &TcpStream, max_bytes: usize) -> Result<ClientHello, TlsError> {
    let mut buf = vec![0u8; INITIAL_PEEK_BUFFER.min(max_bytes.max(1))];
    let mut seen = 0usize;
    loop {
        // A half-closed socket stays readable forever: remember it so a truncated hello
        // followed by FIN ends in an error instead of a busy loop.
        let closed = stream.ready(Interest::READABLE).await?.is_read_closed();
        let n = match stream.try_io(Interest::READABLE, || {
            let n = peek_fd(stream, &mut buf)?;
            // Same bytes as last time and room for more: nothing new yet, wait for readiness.
            if n != 0 && n == seen && n < buf.len() && !closed {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(TlsError::Io(e)),
        };
        if n == 0 || (closed && n == seen && n < buf.len()) {
            return Err(TlsError::HelloEof { received: n });
        }
        seen = n;
        match parse_client_hello(&buf[..n]) {
            Ok(hello) => return Ok(hello),
            Err(HelloError::NeedMore(more)) => {
                let wanted = n.saturating_add(more);
                if wanted > max_bytes {
                    return Err(TlsError::HelloTooLarge { limit: max_bytes });
                }
                if wanted > buf.len() {
                    buf.resize(wanted.max(buf.len().saturating_mul(2)).min(max_bytes), 0);
                }
            }
            Err(e) => return Err(TlsError::Hello(e)),
        }
    }
}

fn peek_fd(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use nix::sys::socket::{MsgFlags, recv};
    recv(stream.as_raw_fd(), buf, MsgFlags::MSG_PEEK).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::tls::test_support::{fixture_path, hello_fixture};

    const ALL_FIXTURES: [&str; 10] = [
        "curl_h2.bin",
        "curl_http11.bin",
        "openssl.bin",
        "openssl_tls12.bin",
        "openssl_nosni.bin",
        "python.bin",
        "rustls.bin",
        "fragmented.bin",
        "grease.bin",
        "ech_outer.bin",
    ];

    fn parse_fixture(name: &str) -> ClientHello {
        let bytes = hello_fixture(name);
        let hello = parse_client_hello(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(hello.wire_len(), bytes.len(), "{name}: wire length");
        hello
    }

    fn alpn(names: &[&str]) -> Vec<Vec<u8>> {
        names.iter().map(|n| n.as_bytes().to_vec()).collect()
    }

    /// Builds a single-record `ClientHello` with the given extensions.
    fn craft(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]);
        body.extend_from_slice(&[0x01, 0x00]);
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend_from_slice(&kind.to_be_bytes());
            ext.extend_from_slice(&u16::try_from(data.len()).expect("len").to_be_bytes());
            ext.extend_from_slice(data);
        }
        body.extend_from_slice(&u16::try_from(ext.len()).expect("len").to_be_bytes());
        body.extend_from_slice(&ext);
        wrap_records(&handshake(&body), usize::MAX)
    }

    fn handshake(body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).expect("len").to_be_bytes();
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO, len[1], len[2], len[3]];
        msg.extend_from_slice(body);
        msg
    }

    fn wrap_records(msg: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in msg.chunks(chunk.min(MAX_RECORD_PAYLOAD)) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&u16::try_from(part.len()).expect("len").to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    fn sni_ext(names: &[&[u8]]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for name in names {
            list.push(SNI_HOST_NAME);
            list.extend_from_slice(&u16::try_from(name.len()).expect("len").to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = u16::try_from(list.len())
            .expect("len")
            .to_be_bytes()
            .to_vec();
        data.extend_from_slice(&list);
        (EXT_SERVER_NAME, data)
    }

    fn alpn_ext(names: &[&[u8]]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for name in names {
            list.push(u8::try_from(name.len()).expect("len"));
            list.extend_from_slice(name);
        }
        let mut data = u16::try_from(list.len())
            .expect("len")
            .to_be_bytes()
            .to_vec();
        data.extend_from_slice(&list);
        (EXT_ALPN, data)
    }

    #[test]
    fn curl_hellos() {
        let h2 = parse_fixture("curl_h2.bin");
        assert_eq!(h2.server_name(), Some("api.example.com"));
        assert_eq!(h2.require_sni(), Ok("api.example.com"));
        assert_eq!(h2.alpn(), alpn(&["h2", "http/1.1"]).as_slice());
        assert!(h2.offers_alpn(b"h2"));
        assert!(h2.supported_versions().contains(&0x0304));
        assert!(h2.supported_versions().contains(&0x0303));
        assert_eq!(h2.legacy_version(), 0x0303);
        assert!(h2.cipher_suites().contains(&0x1301));
        assert!(!h2.is_ech_outer());
        assert_eq!(h2.ech(), None);

        let h1 = parse_fixture("curl_http11.bin");
        assert_eq!(h1.server_name(), Some("files.example.org"));
        assert_eq!(h1.alpn(), alpn(&["http/1.1"]).as_slice());
        assert!(!h1.offers_alpn(b"h2"));
    }

    #[test]
    fn openssl_hellos() {
        let hello = parse_fixture("openssl.bin");
        assert_eq!(hello.server_name(), Some("db.internal.example"));
        assert_eq!(hello.alpn(), alpn(&["h2", "http/1.1"]).as_slice());
        assert!(hello.supported_versions().contains(&0x0304));

        let tls12 = parse_fixture("openssl_tls12.bin");
        assert_eq!(tls12.server_name(), Some("legacy.example.com"));
        assert!(tls12.alpn().is_empty());
        assert!(tls12.supported_versions().is_empty());
        assert!(!tls12.extension_types().contains(&EXT_SUPPORTED_VERSIONS));

        let nosni = parse_fixture("openssl_nosni.bin");
        assert_eq!(nosni.server_name(), None);
        assert_eq!(nosni.require_sni(), Err(HelloError::NoSni));
        assert!(!nosni.sni_was_ip_literal());
    }

    #[test]
    fn python_hello() {
        let hello = parse_fixture("python.bin");
        assert_eq!(hello.server_name(), Some("pypi.example.net"));
        assert_eq!(hello.alpn(), alpn(&["http/1.1"]).as_slice());
        assert!(hello.supported_versions().contains(&0x0304));
    }

    #[test]
    fn rustls_hello_fixture() {
        let hello = parse_fixture("rustls.bin");
        assert_eq!(hello.server_name(), Some("rustls.example.com"));
        assert_eq!(hello.alpn(), alpn(&["h2", "http/1.1"]).as_slice());
        assert!(hello.supported_versions().contains(&0x0304));
    }

    #[test]
    fn fragmented_hello_matches_unfragmented() {
        let bytes = hello_fixture("fragmented.bin");
        // Several records, and the 4-byte handshake header is split across the first three.
        assert_eq!(&bytes[..6], &[0x16, 0x03, 0x01, 0x00, 0x02, 0x01]);
        let fragmented = parse_fixture("fragmented.bin");
        let whole = parse_fixture("curl_h2.bin");
        assert_eq!(fragmented.server_name(), Some("api.example.com"));
        assert_eq!(fragmented.alpn(), whole.alpn());
        assert_eq!(fragmented.cipher_suites(), whole.cipher_suites());
        assert_eq!(fragmented.extension_types(), whole.extension_types());
        assert_eq!(fragmented.supported_versions(), whole.supported_versions());
    }

    #[test]
    fn grease_values_are_ignored() {
        let raw = hello_fixture("grease.bin");
        let grease = parse_fixture("grease.bin");
        let plain = parse_fixture("openssl.bin");
        assert!(
            raw.windows(2).any(|w| w == [0x0a, 0x0a]),
            "fixture has GREASE"
        );
        assert_eq!(grease.server_name(), plain.server_name());
        assert_eq!(grease.alpn(), plain.alpn());
        assert_eq!(grease.cipher_suites(), plain.cipher_suites());
        assert_eq!(grease.supported_versions(), plain.supported_versions());
        assert_eq!(grease.extension_types(), plain.extension_types());
        assert!(!grease.cipher_suites().iter().any(|&s| is_grease(s)));
        assert!(!grease.extension_types().iter().any(|&e| is_grease(e)));
    }

    #[test]
    fn grease_predicate() {
        for v in [0x0a0a, 0x1a1a, 0x2a2a, 0xfafa] {
            assert!(is_grease(v), "{v:#06x}");
        }
        for v in [0x0a1a, 0x0a0b, 0x1301, 0x0000, 0xfe0d] {
            assert!(!is_grease(v), "{v:#06x}");
        }
    }

    #[test]
    fn ech_outer_flag() {
        let hello = parse_fixture("ech_outer.bin");
        assert!(hello.is_ech_outer());
        assert_eq!(hello.ech(), Some(EchKind::Outer));
        assert_eq!(hello.server_name(), Some("public.example.net"));
        for name in ALL_FIXTURES.iter().filter(|n| **n != "ech_outer.bin") {
            assert!(!parse_fixture(name).is_ech_outer(), "{name}");
        }
        let inner = craft(&[
            sni_ext(&[b"a.example"]),
            (EXT_ENCRYPTED_CLIENT_HELLO, vec![1]),
        ]);
        assert_eq!(
            parse_client_hello(&inner).map(|h| h.ech()),
            Ok(Some(EchKind::Inner))
        );
        let bad = craft(&[
            sni_ext(&[b"a.example"]),
            (EXT_ENCRYPTED_CLIENT_HELLO, vec![0, 0]),
        ]);
        assert!(matches!(
            parse_client_hello(&bad),
            Err(HelloError::Malformed(_))
        ));
    }

    #[test]
    fn trailing_bytes_are_not_part_of_the_hello() {
        for name in ALL_FIXTURES {
            let mut bytes = hello_fixture(name);
            let len = bytes.len();
            bytes.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
            let hello = parse_client_hello(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(hello.wire_len(), len, "{name}");
        }
    }

    #[test]
    fn every_truncation_asks_for_more_and_never_overshoots() {
        for name in ALL_FIXTURES {
            let bytes = hello_fixture(name);
            for cut in 0..bytes.len() {
                match parse_client_hello(&bytes[..cut]) {
                    Err(HelloError::NeedMore(n)) => {
                        assert!(n >= 1, "{name} cut {cut}");
                        assert!(
                            cut + n <= bytes.len(),
                            "{name} cut {cut}: asked {n} too many"
                        );
                    }
                    other => panic!("{name} cut at {cut}: {other:?}"),
                }
            }
        }
    }

    /// Deterministic xorshift so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % u64::try_from(n).expect("n")).expect("index")
        }

        fn byte(&mut self) -> u8 {
            self.next().to_le_bytes()[0]
        }
    }

    #[test]
    fn random_corruption_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut outcomes = [0usize; 5];
        for name in ALL_FIXTURES {
            let original = hello_fixture(name);
            for _ in 0..3000 {
                let mut bytes = original.clone();
                for _ in 0..=rng.below(4) {
                    let i = rng.below(bytes.len());
                    bytes[i] ^= rng.byte() | 1;
                }
                if rng.below(4) == 0 {
                    let cut = rng.below(bytes.len());
                    bytes.truncate(cut);
                }
                let slot = match parse_client_hello(&bytes) {
                    Ok(h) => {
                        assert!(h.wire_len() <= bytes.len());
                        0
                    }
                    Err(HelloError::NeedMore(_)) => 1,
                    Err(HelloError::NotTls) => 2,
                    Err(HelloError::Malformed(_)) => 3,
                    Err(HelloError::NoSni) => 4,
                };
                outcomes[slot] += 1;
            }
        }
        // Corruption must actually reach the error paths, not only flip ignored bytes.
        assert!(
            outcomes[1] > 0 && outcomes[2] > 0 && outcomes[3] > 0,
            "{outcomes:?}"
        );
        // The parser itself never reports NoSni; that is `require_sni`'s answer.
        assert_eq!(outcomes[4], 0);

        for len in 0..600 {
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            let _ = parse_client_hello(&bytes);
            if len >= 5 {
                bytes[..3].copy_from_slice(&[0x16, 0x03, 0x01]);
                let _ = parse_client_hello(&bytes);
            }
        }
    }

    #[test]
    fn non_tls_bytes_fail_at_once() {
        assert_eq!(parse_client_hello(b"G"), Err(HelloError::NotTls));
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            Err(HelloError::NotTls)
        );
        assert_eq!(
            parse_client_hello(b"SSH-2.0-OpenSSH_9.2"),
            Err(HelloError::NotTls)
        );
        // SSLv2-compatible hello.
        assert_eq!(
            parse_client_hello(&[0x80, 0x2e, 0x01]),
            Err(HelloError::NotTls)
        );
        assert_eq!(parse_client_hello(&[0x16, 0x02]), Err(HelloError::NotTls));
        assert_eq!(
            parse_client_hello(&[0x16, 0x03, 0x09]),
            Err(HelloError::NotTls)
        );
        assert_eq!(
            parse_client_hello(&[]),
            Err(HelloError::NeedMore(RECORD_HEADER_LEN + 1))
        );
    }

    #[test]
    fn malformed_hellos_are_typed_errors() {
        let malformed =
            |bytes: &[u8]| matches!(parse_client_hello(bytes), Err(HelloError::Malformed(_)));
        // A ServerHello where a ClientHello belongs, rejected from its first payload byte.
        assert!(malformed(&[0x16, 0x03, 0x03, 0x00, 0x40, 0x02]));
        assert!(malformed(&[0x16, 0x03, 0x01, 0x00, 0x00]));
        assert!(malformed(&[0x16, 0x03, 0x01, 0x40, 0x01]));
        // An alert record in the middle of a fragmented hello.
        let mut bytes = hello_fixture("fragmented.bin");
        bytes[7] = 0x15;
        assert!(malformed(&bytes));

        let a: &[u8] = b"a.example";
        assert!(
            malformed(&craft(&[sni_ext(&[a]), sni_ext(&[a])])),
            "duplicate extension"
        );
        assert!(
            malformed(&craft(&[sni_ext(&[a, b"b.example"])])),
            "two host names"
        );
        assert!(
            malformed(&craft(&[sni_ext(&[b"bad name!"])])),
            "invalid host name"
        );
        assert!(malformed(&craft(&[sni_ext(&[])])), "empty name list");
        assert!(malformed(&craft(&[alpn_ext(&[b""])])), "empty protocol");
        assert!(malformed(&craft(&[alpn_ext(&[])])), "empty ALPN list");
        assert!(malformed(&craft(&[(
            EXT_SUPPORTED_VERSIONS,
            vec![3, 3, 4, 3]
        )])));
        assert!(
            malformed(&craft(&[(EXT_SERVER_NAME, vec![0, 9, 0])])),
            "short SNI"
        );

        let mut extra = craft(&[sni_ext(&[a])]);
        // Claim one byte more in record and handshake lengths, then add a stray byte after
        // the extensions block.
        extra[4] += 1;
        extra[8] += 1;
        extra.push(0);
        assert!(malformed(&extra), "bytes after extensions");
    }

    #[test]
    fn crafted_names_are_normalised() {
        let hello = parse_client_hello(&craft(&[
            sni_ext(&[b"API.Example.COM."]),
            alpn_ext(&[b"\x1a\x1a", b"h2"]),
        ]))
        .expect("parse");
        assert_eq!(hello.server_name(), Some("api.example.com"));
        assert_eq!(hello.alpn(), alpn(&["h2"]).as_slice());

        let ip = parse_client_hello(&craft(&[sni_ext(&[b"10.1.2.3"])])).expect("parse");
        assert_eq!(ip.server_name(), None);
        assert!(ip.sni_was_ip_literal());
        assert_eq!(ip.require_sni(), Err(HelloError::NoSni));

        // A hello without any extensions (legal before TLS 1.3).
        let mut body = vec![0x03, 0x01];
        body.extend_from_slice(&[1u8; 32]);
        body.extend_from_slice(&[0, 0x00, 0x02, 0x00, 0x2f, 0x01, 0x00]);
        let bare = parse_client_hello(&wrap_records(&handshake(&body), usize::MAX)).expect("bare");
        assert_eq!(bare.server_name(), None);
        assert_eq!(bare.legacy_version(), 0x0301);
    }

    #[test]
    fn one_byte_records_assemble() {
        let hello = hello_fixture("curl_h2.bin");
        let message = &hello[RECORD_HEADER_LEN..];
        let bytes = wrap_records(message, 1);
        let parsed = parse_client_hello(&bytes).expect("parse");
        assert_eq!(parsed.server_name(), Some("api.example.com"));
        assert_eq!(parsed.wire_len(), bytes.len());
        for cut in (0..bytes.len()).step_by(7) {
            let Err(HelloError::NeedMore(n)) = parse_client_hello(&bytes[..cut]) else {
                panic!("cut {cut}");
            };
            assert!(cut + n <= bytes.len());
        }
    }

    async fn loopback_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    #[tokio::test]
    async fn peek_waits_for_pieces_and_consumes_nothing() {
        let (mut client, mut server) = loopback_pair().await;
        let bytes = hello_fixture("fragmented.bin");
        let sent = bytes.clone();
        let writer = tokio::spawn(async move {
            for piece in [&sent[..3], &sent[3..40], &sent[40..300], &sent[300..]] {
                client.write_all(piece).await.expect("write");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client
        });
        let hello = peek_client_hello(&server, 16 * 1024, Duration::from_secs(5))
            .await
            .expect("peek");
        assert_eq!(hello.server_name(), Some("api.example.com"));
        assert_eq!(hello.wire_len(), bytes.len());
        let _client = writer.await.expect("writer");
        let mut read_back = vec![0u8; bytes.len()];
        server.read_exact(&mut read_back).await.expect("read");
        assert_eq!(
            read_back, bytes,
            "peeking must leave the bytes in the socket"
        );
    }

    #[tokio::test]
    async fn peek_times_out_on_a_stalled_hello() {
        let (mut client, server) = loopback_pair().await;
        let bytes = hello_fixture("curl_h2.bin");
        client.write_all(&bytes[..100]).await.expect("write");
        let started = std::time::Instant::now();
        let err = peek_client_hello(&server, 16 * 1024, Duration::from_millis(200))
            .await
            .expect_err("incomplete");
        assert!(matches!(err, TlsError::HelloTimeout(_)), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn peek_reports_eof_and_non_tls_and_size() {
        let (mut client, server) = loopback_pair().await;
        let bytes = hello_fixture("curl_h2.bin");
        client.write_all(&bytes[..100]).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let err = peek_client_hello(&server, 16 * 1024, Duration::from_secs(5))
            .await
            .expect_err("eof");
        assert!(matches!(err, TlsError::HelloEof { received: 100 }), "{err}");

        let (mut client, server) = loopback_pair().await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let err = peek_client_hello(&server, 16 * 1024, Duration::from_secs(5))
            .await
            .expect_err("not tls");
        assert!(matches!(err, TlsError::Hello(HelloError::NotTls)), "{err}");

        let (mut client, server) = loopback_pair().await;
        client.write_all(&bytes).await.expect("write");
        let err = peek_client_hello(&server, 256, Duration::from_secs(5))
            .await
            .expect_err("too large");
        assert!(
            matches!(err, TlsError::HelloTooLarge { limit: 256 }),
            "{err}"
        );

        let (client, server) = loopback_pair().await;
        drop(client);
        let err = peek_client_hello(&server, 256, Duration::from_secs(5))
            .await
            .expect_err("closed");
        assert!(matches!(err, TlsError::HelloEof { received: 0 }), "{err}");
    }

    /// Captures a rustls client's hello on loopback through `peek_client_hello`, checks it,
    /// and (with `PADDOCK_WRITE_FIXTURES=1`) stores it as `rustls.bin`.
    #[tokio::test]
    async fn rustls_hello_captured_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let ca = crate::tls::test_support::test_ca();
        let config = crate::tls::test_support::client_trusting(&ca, &[b"h2", b"http/1.1"]);
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = rustls_pki_types::ServerName::try_from("rustls.example.com").expect("name");
            // The server never answers; the handshake ends when it closes.
            let _ = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await;
        });
        let (server, _) = listener.accept().await.expect("accept");
        let hello = peek_client_hello(&server, 16 * 1024, Duration::from_secs(5))
            .await
            .expect("peek");
        assert_eq!(hello.server_name(), Some("rustls.example.com"));
        assert_eq!(hello.alpn(), alpn(&["h2", "http/1.1"]).as_slice());
        assert!(hello.supported_versions().contains(&0x0304));

        let mut raw = vec![0u8; hello.wire_len()];
        let mut reader = server;
        reader.read_exact(&mut raw).await.expect("read");
        assert_eq!(parse_client_hello(&raw).as_ref(), Ok(&hello));
        if std::env::var_os("PADDOCK_WRITE_FIXTURES").is_some() {
            std::fs::write(fixture_path("clienthello/rustls.bin"), &raw).expect("write fixture");
        }
        drop(reader);
        client.await.expect("client task");
    }
}
