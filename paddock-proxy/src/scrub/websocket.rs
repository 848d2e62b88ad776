//! Scrubbing the server-to-agent direction of a WebSocket tunnel (RFC 6455).
//!
//! Frames are parsed and their payloads scanned per message, so a secret split across
//! fragments is still found. Replacements change lengths, so data is re-framed: each message
//! goes out as one or more fragments (an intermediary may refragment a message that uses no
//! extension, RFC 6455 section 5.4). Extensions are refused: the upgrade request is sent
//! without `Sec-WebSocket-Extensions`, and a frame with an RSV bit set (a compressed
//! `permessage-deflate` frame, say) ends the tunnel, as does a masked server frame. Control
//! frames (at most 125 bytes) are scrubbed whole and, if a replacement makes one too long,
//! shortened.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::matcher::{ScrubStream, Scrubber};

/// Frames larger than this are relayed in fragments of this size.
const CHUNK: usize = 64 * 1024;
const MAX_CONTROL: usize = 125;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;

/// Why a scrubbed tunnel ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("tunnel i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server sent a frame the proxy cannot scrub: {0}")]
    Protocol(&'static str),
}

struct Head {
    fin: bool,
    opcode: u8,
    len: u64,
}

async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Head>, WsError> {
    let mut b = [0u8; 2];
    match r.read_exact(&mut b[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut b[1..]).await?;
    if b[0] & 0x70 != 0 {
        return Err(WsError::Protocol(
            "RSV bit set (an extension was not negotiated)",
        ));
    }
    if b[1] & 0x80 != 0 {
        return Err(WsError::Protocol("masked server frame"));
    }
    let len = match b[1] & 0x7f {
        126 => u64::from(r.read_u16().await?),
        127 => {
            let l = r.read_u64().await?;
            if l >> 63 != 0 {
                return Err(WsError::Protocol("frame length has its top bit set"));
            }
            l
        }
        n => u64::from(n),
    };
    Ok(Some(Head {
        fin: b[0] & 0x80 != 0,
        opcode: b[0] & 0x0f,
        len,
    }))
}

async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    fin: bool,
    opcode: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(10 + payload.len().min(CHUNK));
    head.push(if fin { 0x80 } else { 0 } | opcode);
    let n = payload.len();
    if let Ok(short) = u8::try_from(n)
        && short < 126
    {
        head.push(short);
    } else if let Ok(medium) = u16::try_from(n) {
        head.push(126);
        head.extend_from_slice(&medium.to_be_bytes());
    } else {
        head.push(127);
        head.extend_from_slice(&u64::try_from(n).unwrap_or(u64::MAX).to_be_bytes());
    }
    head.extend_from_slice(payload);
    w.write_all(&head).await
}

/// The message being relayed: its opcode and whether a fragment of it went out yet.
struct Message {
    opcode: u8,
    started: bool,
    stream: ScrubStream,
}

/// Relays server frames from `from` to `to` until `from` ends, scrubbing `scrubber`'s
/// secrets. Returns how many it replaced; `on_scrub` is also told of each replacement batch
/// as it happens (for audit while the tunnel is still open).
pub async fn relay<R, W>(
    mut from: R,
    mut to: W,
    scrubber: Arc<Scrubber>,
    mut on_scrub: impl FnMut(u64) + Send,
) -> Result<u64, WsError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    let mut msg: Option<Message> = None;
    let mut buf = vec![0u8; CHUNK];
    while let Some(head) = read_head(&mut from).await? {
        if head.opcode >= 0x8 {
            if !head.fin || head.len > MAX_CONTROL as u64 {
                return Err(WsError::Protocol("fragmented or oversized control frame"));
            }
            let n = usize::try_from(head.len).unwrap_or(MAX_CONTROL);
            let mut payload = vec![0u8; n];
            from.read_exact(&mut payload).await?;
            if let Some(clean) = scrubber.scrub_all(&payload) {
                total += 1;
                on_scrub(1);
                payload = fit_control(head.opcode, &payload, clean);
            }
            write_frame(&mut to, true, head.opcode, &payload).await?;
            to.flush().await?;
            continue;
        }
        let m = match (head.opcode, msg.take()) {
            (OP_TEXT | OP_BINARY, None) => Message {
                opcode: head.opcode,
                started: false,
                stream: ScrubStream::new(Arc::clone(&scrubber)),
            },
            (OP_CONTINUATION, Some(m)) => m,
            (OP_TEXT | OP_BINARY, Some(_)) => {
                return Err(WsError::Protocol("new message inside a fragmented one"));
            }
            (OP_CONTINUATION, None) => {
                return Err(WsError::Protocol("continuation without a message"));
            }
            _ => return Err(WsError::Protocol("reserved opcode")),
        };
        let mut m = m;
        let before = m.stream.replaced();
        let mut left = head.len;
        let mut out = Vec::new();
        while left > 0 {
            let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
            from.read_exact(&mut buf[..n]).await?;
            left -= u64::try_from(n).unwrap_or(left);
            out.extend_from_slice(&m.stream.feed(Bytes::copy_from_slice(&buf[..n])));
            if out.len() >= CHUNK {
                let op = if m.started { OP_CONTINUATION } else { m.opcode };
                write_frame(&mut to, false, op, &out).await?;
                m.started = true;
                out.clear();
            }
        }
        if head.fin {
            out.extend_from_slice(&m.stream.finish());
            let op = if m.started { OP_CONTINUATION } else { m.opcode };
            write_frame(&mut to, true, op, &out).await?;
        } else if !out.is_empty() {
            let op = if m.started { OP_CONTINUATION } else { m.opcode };
            write_frame(&mut to, false, op, &out).await?;
            m.started = true;
        }
        to.flush().await?;
        let now = m.stream.replaced() - before;
        if now > 0 {
            total += now;
            on_scrub(now);
        }
        if !head.fin {
            msg = Some(m);
        }
    }
    Ok(total)
}

/// A scrubbed control payload that must stay within 125 bytes: a close frame keeps its status
/// code and as much of its (UTF-8) reason as fits; ping and pong are cut.
fn fit_control(opcode: u8, original: &[u8], mut clean: Vec<u8>) -> Vec<u8> {
    if clean.len() <= MAX_CONTROL {
        return clean;
    }
    if opcode == OP_CLOSE && original.len() >= 2 {
        let mut end = MAX_CONTROL;
        while end > 2 && std::str::from_utf8(&clean[2..end]).is_err() {
            end -= 1;
        }
        clean.truncate(end);
        return clean;
    }
    clean.truncate(MAX_CONTROL);
    clean
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrub::SecretPair;

    const SECRET: &str = "xoxb-real-slack-token-42";
    const PH: &str = "pdk-slack-000000000000000000000000000000000000000000000000";

    fn scrubber() -> Arc<Scrubber> {
        Arc::new(
            Scrubber::new(&[SecretPair {
                secret: SECRET.into(),
                placeholder: PH.into(),
            }])
            .expect("builds")
            .expect("patterns"),
        )
    }

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        futures_util::FutureExt::now_or_never(write_frame(&mut v, fin, opcode, payload))
            .expect("sync")
            .expect("write");
        v
    }

    /// Decodes a relayed byte stream into (opcode of message, payload) per message, checking
    /// fragmentation rules as a client would.
    fn messages(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut cur: Option<(u8, Vec<u8>)> = None;
        while !bytes.is_empty() {
            let fin = bytes[0] & 0x80 != 0;
            let op = bytes[0] & 0x0f;
            assert_eq!(bytes[0] & 0x70, 0);
            assert_eq!(bytes[1] & 0x80, 0, "server frames are unmasked");
            let (len, hl) = match bytes[1] & 0x7f {
                126 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
                127 => (
                    usize::try_from(u64::from_be_bytes(bytes[2..10].try_into().expect("8")))
                        .expect("fits"),
                    10,
                ),
                n => (usize::from(n), 2),
            };
            let payload = bytes[hl..hl + len].to_vec();
            bytes = &bytes[hl + len..];
            if op >= 8 {
                out.push((op, payload));
                continue;
            }
            match (&mut cur, op) {
                (None, 1 | 2) => cur = Some((op, payload)),
                (Some((_, p)), 0) => p.extend_from_slice(&payload),
                _ => panic!("bad fragmentation"),
            }
            if fin {
                out.push(cur.take().expect("message"));
            }
        }
        assert!(cur.is_none(), "unterminated message");
        out
    }

    async fn relay_bytes(input: Vec<u8>) -> (Vec<u8>, u64) {
        let mut out = Vec::new();
        let n = relay(&input[..], &mut out, scrubber(), |_| {})
            .await
            .expect("relay");
        (out, n)
    }

    #[tokio::test]
    async fn secrets_in_single_and_fragmented_messages_are_replaced() {
        let text = format!("{{\"token\":\"{SECRET}\"}}");
        let (a, b) = text.split_at(14);
        let mut input = frame(true, OP_TEXT, text.as_bytes());
        // The same message in two fragments, the secret split between them, a ping between.
        input.extend(frame(false, OP_TEXT, a.as_bytes()));
        input.extend(frame(true, 0x9, b"ping"));
        input.extend(frame(true, OP_CONTINUATION, b.as_bytes()));
        input.extend(frame(true, OP_BINARY, b"plain binary"));
        let (out, n) = relay_bytes(input).await;
        let want = format!("{{\"token\":\"{PH}\"}}");
        assert_eq!(
            messages(&out),
            vec![
                (OP_TEXT, want.clone().into_bytes()),
                (0x9, b"ping".to_vec()),
                (OP_TEXT, want.into_bytes()),
                (OP_BINARY, b"plain binary".to_vec()),
            ]
        );
        assert_eq!(n, 2);
    }

    #[tokio::test]
    async fn large_frames_are_refragmented_and_control_frames_fit() {
        let big = format!("{}{SECRET}{}", "a".repeat(CHUNK + 10), "b".repeat(CHUNK));
        let mut input = frame(true, OP_BINARY, big.as_bytes());
        let reason = format!("bad token {SECRET}{}", "x".repeat(80));
        let mut close = 1008u16.to_be_bytes().to_vec();
        close.extend_from_slice(reason.as_bytes());
        input.extend(frame(true, OP_CLOSE, &close));
        let (out, n) = relay_bytes(input).await;
        let msgs = messages(&out);
        assert_eq!(msgs[0].1, big.replace(SECRET, PH).into_bytes());
        let (op, close) = &msgs[1];
        assert_eq!(*op, OP_CLOSE);
        assert!(close.len() <= MAX_CONTROL);
        assert_eq!(&close[..2], &1008u16.to_be_bytes());
        assert!(!String::from_utf8_lossy(close).contains(SECRET));
        assert_eq!(n, 2);
    }

    #[tokio::test]
    async fn frames_the_proxy_cannot_read_end_the_tunnel() {
        for bad in [
            // permessage-deflate compressed frame (RSV1).
            vec![0xC1, 0x02, 0x00, 0x00],
            // Masked server frame.
            vec![0x81, 0x82, 1, 2, 3, 4, 0, 0],
            // Continuation without a message.
            frame(true, OP_CONTINUATION, b"x"),
        ] {
            let mut out = Vec::new();
            assert!(
                relay(&bad[..], &mut out, scrubber(), |_| {}).await.is_err(),
                "{bad:?}"
            );
            assert!(out.is_empty());
        }
    }
}
