//! A response body with secrets scrubbed as it streams: data frames, trailers, and bodies
//! compressed with gzip or deflate (decoded to be scanned, passed on decoded).
//!
//! Content encodings: requests to a host holding secrets ask for `identity`
//! ([`super::prepare_request`]); an upstream that compresses anyway with gzip or deflate is
//! decoded (streaming, so memory stays bounded), and any other encoding is refused before the
//! response starts ([`Encoding::from_headers`]), because a body that cannot be read cannot be
//! scrubbed. Decoding only on that fallback path keeps the common path at one scan per byte.

use std::io::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use flate2::write::{GzDecoder, ZlibDecoder};
use http::{HeaderMap, HeaderValue, header};
use hyper::body::{Body, Frame, SizeHint};

use super::matcher::{ScrubStream, Scrubber};

/// Errors a response body can end with; the agent's stream is reset (fail closed). A
/// concrete type, not a boxed trait object: hyper's server futures stop being provably
/// `Send` with the latter.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Upstream(#[from] hyper::Error),
    #[error("the upstream's compressed body does not decode: {0}")]
    Decode(std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// How the upstream encoded the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Deflate,
}

/// An encoding the scrubber cannot read.
#[derive(Debug, thiserror::Error)]
#[error("the upstream answered with content-encoding {0:?}, which the proxy cannot scrub")]
pub struct UnreadableEncoding(pub String);

impl Encoding {
    /// The body's encoding, from `Content-Encoding` (one coding at most).
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, UnreadableEncoding> {
        let mut codings = headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("\u{fffd}").split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty() && c != "identity");
        let Some(first) = codings.next() else {
            return Ok(Self::Identity);
        };
        if let Some(second) = codings.next() {
            return Err(UnreadableEncoding(format!("{first}, {second}")));
        }
        match first.as_str() {
            "gzip" | "x-gzip" => Ok(Self::Gzip),
            "deflate" => Ok(Self::Deflate),
            _ => Err(UnreadableEncoding(first)),
        }
    }
}

enum Decoder {
    Gzip(GzDecoder<Vec<u8>>),
    Zlib(ZlibDecoder<Vec<u8>>),
}

impl Decoder {
    fn new(encoding: Encoding) -> Option<Self> {
        match encoding {
            Encoding::Identity => None,
            Encoding::Gzip => Some(Self::Gzip(GzDecoder::new(Vec::new()))),
            Encoding::Deflate => Some(Self::Zlib(ZlibDecoder::new(Vec::new()))),
        }
    }

    fn push(&mut self, input: &[u8]) -> std::io::Result<Bytes> {
        let out = match self {
            Self::Gzip(d) => {
                d.write_all(input)?;
                std::mem::take(d.get_mut())
            }
            Self::Zlib(d) => {
                d.write_all(input)?;
                std::mem::take(d.get_mut())
            }
        };
        Ok(Bytes::from(out))
    }

    fn finish(self) -> std::io::Result<Bytes> {
        let out = match self {
            Self::Gzip(d) => d.finish()?,
            Self::Zlib(d) => d.finish()?,
        };
        Ok(Bytes::from(out))
    }
}

/// Told how many secrets a body had replaced once it ends (or is dropped).
pub type OnScrubbed = Box<dyn FnOnce(u64) + Send>;

/// Wraps a body: every data frame is scanned, trailers are scrubbed, and the held-back tail is
/// released before the trailers or the end.
pub struct ScrubBody<B> {
    inner: B,
    stream: ScrubStream,
    decoder: Option<Decoder>,
    /// Trailers waiting behind the final data frame.
    trailers: Option<HeaderMap>,
    done: bool,
    on_scrubbed: Option<OnScrubbed>,
    /// Replacements made in trailers (the stream counts the rest).
    extra: u64,
}

impl<B> std::fmt::Debug for ScrubBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScrubBody")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl<B> ScrubBody<B> {
    pub fn new(
        inner: B,
        scrubber: Arc<Scrubber>,
        encoding: Encoding,
        on_scrubbed: OnScrubbed,
    ) -> Self {
        Self {
            inner,
            stream: ScrubStream::new(scrubber),
            decoder: Decoder::new(encoding),
            trailers: None,
            done: false,
            on_scrubbed: Some(on_scrubbed),
            extra: 0,
        }
    }

    fn report(&mut self) {
        if let Some(tell) = self.on_scrubbed.take() {
            tell(self.stream.replaced() + self.extra);
        }
    }
}

impl<B> Drop for ScrubBody<B> {
    fn drop(&mut self) {
        self.report();
    }
}

impl<B> Body for ScrubBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                if let Some(t) = this.trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                this.report();
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    // The end: decode and release what is left.
                    this.done = true;
                    let mut tail = match this.decoder.take().map(Decoder::finish) {
                        Some(Ok(rest)) => this.stream.feed(rest).to_vec(),
                        Some(Err(e)) => return Poll::Ready(Some(Err(decode_error(&e)))),
                        None => Vec::new(),
                    };
                    tail.extend_from_slice(&this.stream.finish());
                    if !tail.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))));
                    }
                    continue;
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    let plain = match &mut this.decoder {
                        Some(d) => match d.push(&data) {
                            Ok(p) => p,
                            Err(e) => return Poll::Ready(Some(Err(decode_error(&e)))),
                        },
                        None => data,
                    };
                    let out = this.stream.feed(plain);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Err(frame) => {
                    if let Ok(mut trailers) = frame.into_trailers() {
                        this.extra += scrub_headers(this.stream.scrubber(), &mut trailers);
                        this.trailers = Some(trailers);
                        // Trailers end the body: release the tail first.
                        this.done = true;
                        let mut tail = match this.decoder.take().map(Decoder::finish) {
                            Some(Ok(rest)) => this.stream.feed(rest).to_vec(),
                            Some(Err(e)) => return Poll::Ready(Some(Err(decode_error(&e)))),
                            None => Vec::new(),
                        };
                        tail.extend_from_slice(&this.stream.finish());
                        if !tail.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))));
                        }
                    }
                    // Unknown frame kinds are dropped.
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // The length changes with every replacement.
        SizeHint::default()
    }
}

fn decode_error(e: &std::io::Error) -> BodyError {
    BodyError::Decode(std::io::Error::new(e.kind(), e.to_string()))
}

/// Scrubs every value of `headers` in place; returns how many secrets it replaced. A value
/// that is no longer a valid header after replacement is removed (it held a secret), and so is
/// a header whose name holds one (a name cannot be rewritten into a placeholder reliably).
pub fn scrub_headers(scrubber: &Arc<Scrubber>, headers: &mut HeaderMap) -> u64 {
    let mut replaced = 0;
    let mut broken = Vec::new();
    for name in headers.keys() {
        if scrubber.scrub_all(name.as_str().as_bytes()).is_some() {
            replaced += 1;
            broken.push(name.clone());
        }
    }
    for name in &broken {
        headers.remove(name);
    }
    broken.clear();
    for (name, value) in headers.iter_mut() {
        if let Some(clean) = scrubber.scrub_all(value.as_bytes()) {
            replaced += 1;
            match HeaderValue::from_bytes(&clean) {
                Ok(v) => *value = v,
                Err(_) => broken.push(name.clone()),
            }
        }
    }
    for name in broken {
        headers.remove(name);
    }
    replaced
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrub::SecretPair;
    use http_body_util::{BodyExt as _, StreamBody};
    use std::sync::atomic::{AtomicU64, Ordering};

    const SECRET: &str = "ghp_realSecretValue1234";
    const PH: &str = "pdk-user-secret-abababababababababababababababababababababababab";

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

    type Frames = Vec<Result<Frame<Bytes>, BodyError>>;

    async fn collect(frames: Frames, encoding: Encoding) -> (Vec<u8>, Option<HeaderMap>, u64) {
        let seen = Arc::new(AtomicU64::new(u64::MAX));
        let s2 = Arc::clone(&seen);
        let inner = StreamBody::new(futures_util::stream::iter(frames));
        let body = ScrubBody::new(
            inner,
            scrubber(),
            encoding,
            Box::new(move |n| s2.store(n, Ordering::SeqCst)),
        );
        let collected = body.collect().await.expect("body");
        let trailers = collected.trailers().cloned();
        let bytes = collected.to_bytes().to_vec();
        (bytes, trailers, seen.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn data_split_across_frames_and_trailers_are_scrubbed() {
        let text = format!("{{\"echo\":\"Bearer {SECRET}\"}}");
        let (a, b) = text.split_at(20);
        let mut trailers = HeaderMap::new();
        trailers.insert("x-echo", HeaderValue::from_str(SECRET).expect("value"));
        let frames = vec![
            Ok(Frame::data(Bytes::copy_from_slice(a.as_bytes()))),
            Ok(Frame::data(Bytes::copy_from_slice(b.as_bytes()))),
            Ok(Frame::trailers(trailers)),
        ];
        let (body, trailers, n) = collect(frames, Encoding::Identity).await;
        assert_eq!(
            String::from_utf8(body).expect("utf-8"),
            format!("{{\"echo\":\"Bearer {PH}\"}}")
        );
        assert_eq!(trailers.expect("trailers")["x-echo"], PH);
        assert_eq!(n, 2, "body and trailer replacements are reported");
    }

    #[tokio::test]
    async fn gzip_and_deflate_bodies_are_decoded_and_scrubbed() {
        use flate2::Compression;
        use flate2::write::{GzEncoder, ZlibEncoder};
        let text = format!("prefix {SECRET} suffix").repeat(50);
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(text.as_bytes()).expect("gzip");
        let gz = gz.finish().expect("gzip");
        let mut zl = ZlibEncoder::new(Vec::new(), Compression::default());
        zl.write_all(text.as_bytes()).expect("zlib");
        let zl = zl.finish().expect("zlib");
        for (bytes, enc) in [(gz, Encoding::Gzip), (zl, Encoding::Deflate)] {
            let frames = bytes
                .chunks(7)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            let (body, _, n) = collect(frames, enc).await;
            let body = String::from_utf8(body).expect("utf-8");
            assert_eq!(body, text.replace(SECRET, PH));
            assert_eq!(n, 50);
        }
    }

    #[tokio::test]
    async fn a_corrupt_compressed_body_fails_instead_of_passing() {
        let frames: Frames = vec![Ok(Frame::data(Bytes::from_static(b"not gzip at all")))];
        let inner = StreamBody::new(futures_util::stream::iter(frames));
        let body = ScrubBody::new(inner, scrubber(), Encoding::Gzip, Box::new(|_| {}));
        assert!(body.collect().await.is_err());
    }

    #[test]
    fn encodings_the_scrubber_cannot_read_are_refused() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_str(v).expect("v"),
            );
            m
        };
        assert_eq!(
            Encoding::from_headers(&HeaderMap::new()).expect("none"),
            Encoding::Identity
        );
        assert_eq!(
            Encoding::from_headers(&h("GZIP")).expect("gz"),
            Encoding::Gzip
        );
        assert_eq!(
            Encoding::from_headers(&h("identity")).expect("id"),
            Encoding::Identity
        );
        for bad in ["br", "zstd", "gzip, gzip", "compress"] {
            assert!(Encoding::from_headers(&h(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn header_values_are_scrubbed_or_removed() {
        let sc = scrubber();
        let mut m = HeaderMap::new();
        m.insert(
            "location",
            HeaderValue::from_str(&format!("/cb?key={SECRET}")).expect("v"),
        );
        m.insert("x-ok", HeaderValue::from_static("fine"));
        let named =
            http::HeaderName::from_bytes(format!("x-{}", SECRET.to_ascii_lowercase()).as_bytes())
                .expect("name");
        m.insert(named.clone(), HeaderValue::from_static("1"));
        assert_eq!(scrub_headers(&sc, &mut m), 2);
        assert_eq!(m["location"], format!("/cb?key={PH}"));
        assert_eq!(m["x-ok"], "fine");
        assert!(!m.contains_key(&named), "a name holding the secret goes");
    }
}
