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
