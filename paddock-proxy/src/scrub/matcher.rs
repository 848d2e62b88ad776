//! Finding and replacing secret forms in a byte stream, chunk by chunk.
//!
//! A stream is scanned as it passes: complete matches are replaced at once, and the only bytes
//! held back are a tail that could still grow into a match (the longest suffix that is a
//! proper prefix of some pattern). Ordinary chunks (an SSE event, a JSON line) therefore pass
//! through without delay, a secret split across chunks or frames is still found, and memory is
//! bounded by the longest pattern. At the end of a stream a held-back tail of at least
//! [`MIN_PARTIAL`] bytes is replaced too, so a response cut off inside a secret does not hand
//! out its beginning.

use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use bytes::{Bytes, BytesMut};

use super::forms::{Form, forms};

/// A held-back tail this long that ends the stream is treated as a cut-off secret.
pub const MIN_PARTIAL: usize = 8;

/// What replaces the secret when the agent's placeholder is not known.
pub const UNKNOWN_PLACEHOLDER: &str = "pdk-redacted";

/// A secret that was put into a request and its placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretPair {
    pub secret: Vec<u8>,
    pub placeholder: String,
}

impl std::fmt::Debug for SecretPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretPair")
            .field("secret", &"<redacted>")
            .field("placeholder", &"<redacted>")
            .finish()
    }
}

/// Why a scrubber could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building the secret matcher: {0}")]
pub struct BuildError(String);

/// The compiled patterns of a set of secrets. Immutable and shared; each stream has a
/// [`ScrubStream`].
pub struct Scrubber {
    ac: AhoCorasick,
    forms: Vec<Form>,
    /// `first[b]`: some pattern starts with byte `b`.
    first: [bool; 256],
    /// Indices into `forms`, ordered by pattern bytes: the patterns a tail begins are a
    /// contiguous run, found by binary search instead of comparing every pattern.
    sorted: Vec<usize>,
    longest: usize,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrubber")
            .field("patterns", &self.forms.len())
            .finish_non_exhaustive()
    }
}

impl Scrubber {
    /// Compiles every form of every secret. `None` when no secret yields a usable pattern
    /// (all shorter than [`super::forms::MIN_PATTERN`]).
    pub fn new(pairs: &[SecretPair]) -> Result<Option<Self>, BuildError> {
        let mut all: Vec<Form> = Vec::new();
        for p in pairs {
            for f in forms(&p.secret, p.placeholder.as_bytes()) {
                if !all.iter().any(|g| g.pattern == f.pattern) {
                    all.push(f);
                }
            }
        }
        if all.is_empty() {
            return Ok(None);
        }
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(all.iter().map(|f| &f.pattern))
            .map_err(|e| BuildError(e.to_string()))?;
        let mut first = [false; 256];
        for f in &all {
            first[usize::from(f.pattern[0])] = true;
        }
        let longest = all.iter().map(|f| f.pattern.len()).max().unwrap_or(0);
        let mut sorted: Vec<usize> = (0..all.len()).collect();
        sorted.sort_unstable_by(|&a, &b| all[a].pattern.cmp(&all[b].pattern));
        Ok(Some(Self {
            ac,
            forms: all,
            first,
            sorted,
            longest,
        }))
    }

    /// How many patterns (encoded forms of all the secrets) the matcher looks for.
    #[must_use]
    pub fn pattern_count(&self) -> usize {
        self.forms.len()
    }

    /// Scrubs a complete value (a header, a control frame). `None` when nothing matched.
    #[must_use]
    pub fn scrub_all(self: &Arc<Self>, input: &[u8]) -> Option<Vec<u8>> {
        // What a stream fed `input` and finished would do when nothing matches whole: only a
        // tail of at least MIN_PARTIAL bytes that begins a pattern is replaced at the end.
        // Shorter suffixes cannot be, so only the starts leaving that much are searched
        // (the stream would look at every start, for the next chunk's sake).
        if self.ac.find(input).is_none() {
            let start = self.tail_start(input, 0, MIN_PARTIAL)?;
            let r = self.partial_replacement(&input[start..])?;
            let mut out = input[..start].to_vec();
            out.extend_from_slice(r);
            return Some(out);
        }
        let mut s = ScrubStream::new(Arc::clone(self));
        let mut out = s.feed(Bytes::copy_from_slice(input)).to_vec();
        out.extend_from_slice(&s.finish());
        (s.replaced() > 0).then_some(out)
    }

    /// Start of the longest suffix of `buf[from..]` that is a proper prefix of a pattern.
    fn held_tail(&self, buf: &[u8], from: usize) -> usize {
        self.tail_start(buf, from, 1).unwrap_or(buf.len())
    }

    /// Start of the longest suffix of `buf[from..]`, at least `min` bytes long, that is a
    /// proper prefix of a pattern.
    fn tail_start(&self, buf: &[u8], from: usize, min: usize) -> Option<usize> {
        let start = from.max(buf.len().saturating_sub(self.longest.saturating_sub(1)));
        let last = buf.len().checked_sub(min)?;
        (start..=last).find(|&s| self.first[usize::from(buf[s])] && self.begins_pattern(&buf[s..]))
    }

    /// Whether `tail` is a proper prefix of some pattern. The patterns starting with `tail`
    /// are the sorted run from the first pattern not below it; patterns are distinct, so the
    /// first or (when the first is `tail` itself) the second of that run decides.
    fn begins_pattern(&self, tail: &[u8]) -> bool {
        let at = self
            .sorted
            .partition_point(|&k| self.forms[k].pattern.as_slice() < tail);
        self.sorted[at..].iter().take(2).any(|&k| {
            let p = &self.forms[k].pattern;
            p.len() > tail.len() && p.starts_with(tail)
        })
    }

    /// The replacement for a cut-off tail: that of the first pattern it begins.
    fn partial_replacement(&self, tail: &[u8]) -> Option<&[u8]> {
        self.forms
            .iter()
            .find(|f| f.pattern.len() > tail.len() && f.pattern.starts_with(tail))
            .map(|f| f.replacement.as_slice())
    }
}

/// The scanning state of one stream (one body, one WebSocket message).
#[derive(Debug)]
pub struct ScrubStream {
    scrubber: Arc<Scrubber>,
    carry: BytesMut,
    replaced: u64,
}

impl ScrubStream {
    #[must_use]
    pub fn new(scrubber: Arc<Scrubber>) -> Self {
        Self {
            scrubber,
            carry: BytesMut::new(),
            replaced: 0,
        }
    }

    /// The matcher this stream uses.
    #[must_use]
    pub fn scrubber(&self) -> &Arc<Scrubber> {
        &self.scrubber
    }

    /// How many secrets were replaced so far.
    #[must_use]
    pub fn replaced(&self) -> u64 {
        self.replaced
    }

    /// Bytes held back waiting for more input.
    #[must_use]
    pub fn held(&self) -> usize {
        self.carry.len()
    }

    /// Takes the next chunk; returns what may be passed on now.
    pub fn feed(&mut self, input: Bytes) -> Bytes {
        let sc = Arc::clone(&self.scrubber);
        if self.carry.is_empty() {
            // Fast path: nothing held back and nothing found: pass the chunk on uncopied.
            if sc.ac.find(input.as_ref()).is_none() {
                let keep = sc.held_tail(&input, 0);
                if keep == input.len() {
                    return input;
                }
                self.carry.extend_from_slice(&input[keep..]);
                return input.slice(..keep);
            }
            return self.rewrite(&input, &sc);
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(&input);
        self.rewrite(&buf, &sc)
    }

    fn rewrite(&mut self, buf: &[u8], sc: &Scrubber) -> Bytes {
        let mut out = BytesMut::with_capacity(buf.len());
        let mut at = 0;
        for m in sc.ac.find_iter(buf) {
            out.extend_from_slice(&buf[at..m.start()]);
            out.extend_from_slice(&sc.forms[m.pattern().as_usize()].replacement);
            at = m.end();
            self.replaced += 1;
        }
        let keep = sc.held_tail(buf, at);
        out.extend_from_slice(&buf[at..keep]);
        self.carry = BytesMut::from(&buf[keep..]);
        out.freeze()
    }

    /// Ends the stream: returns the held-back tail, itself replaced when it is long enough
    /// to be a cut-off secret.
    pub fn finish(&mut self) -> Bytes {
        let tail = std::mem::take(&mut self.carry);
        if tail.len() >= MIN_PARTIAL
            && let Some(r) = self.scrubber.partial_replacement(&tail)
        {
            self.replaced += 1;
            return Bytes::copy_from_slice(r);
        }
        tail.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    const SECRET: &str = "sk-live-51HsTq9zK2";
    const PH: &str = "pdk-user-secret-00112233445566778899aabbccddeeff0011223344556677";

    fn scrubber() -> Arc<Scrubber> {
        Arc::new(
            Scrubber::new(&[SecretPair {
                secret: SECRET.as_bytes().to_vec(),
                placeholder: PH.into(),
            }])
            .expect("builds")
            .expect("patterns"),
        )
    }

    /// The binary search over sorted patterns answers exactly what comparing the tail with
    /// every pattern answers, also when one secret's form is a prefix of another's.
    #[test]
    fn begins_pattern_matches_comparing_every_pattern() {
        let sc = Scrubber::new(&[
            SecretPair {
                secret: b"abcdefgh12".to_vec(),
                placeholder: "pdk-a".into(),
            },
            SecretPair {
                secret: b"abcdefgh1234".to_vec(),
                placeholder: "pdk-b".into(),
            },
            SecretPair {
                secret: SECRET.as_bytes().to_vec(),
                placeholder: PH.into(),
            },
        ])
        .expect("builds")
        .expect("patterns");
        let brute = |tail: &[u8]| {
            sc.forms
                .iter()
                .any(|f| f.pattern.len() > tail.len() && f.pattern.starts_with(tail))
        };
        let mut tails: Vec<Vec<u8>> = Vec::new();
        for f in &sc.forms {
            for n in 1..=f.pattern.len() {
                tails.push(f.pattern[..n].to_vec());
                let mut off = f.pattern[..n].to_vec();
                off.push(b'~');
                tails.push(off);
                let mut changed = f.pattern[..n].to_vec();
                changed[n - 1] ^= 1;
                tails.push(changed);
            }
        }
        let mut proper = 0;
        for t in &tails {
            assert_eq!(sc.begins_pattern(t), brute(t), "tail {t:?}");
            proper += usize::from(brute(t));
        }
        // The whole patterns of the shorter secret are proper prefixes of the longer one's.
        assert!(
            brute(b"abcdefgh12"),
            "the fixture exercises a pattern inside another"
        );
        assert!(proper > 100, "the fixture has proper prefixes to find");
    }

    /// Feeds `text` in chunks of every size from 1 to 40 and checks the output is the same.
    fn run_chunked(sc: &Arc<Scrubber>, text: &[u8]) -> (Vec<u8>, u64) {
        let mut first: Option<(Vec<u8>, u64)> = None;
        for size in 1..=40 {
            let mut s = ScrubStream::new(Arc::clone(sc));
            let mut out = Vec::new();
            for chunk in text.chunks(size) {
                out.extend_from_slice(&s.feed(Bytes::copy_from_slice(chunk)));
            }
            out.extend_from_slice(&s.finish());
            match &first {
                None => first = Some((out, s.replaced())),
                Some((f, n)) => {
                    assert_eq!(f, &out, "chunk size {size}");
                    assert_eq!(*n, s.replaced(), "chunk size {size}");
                }
            }
        }
        first.expect("ran")
    }

    #[test]
    fn replaces_across_every_chunk_boundary() {
        let sc = scrubber();
        let text = format!("{{\"auth\":\"Bearer {SECRET}\",\"again\":\"{SECRET}\"}}");
        let (out, n) = run_chunked(&sc, text.as_bytes());
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            format!("{{\"auth\":\"Bearer {PH}\",\"again\":\"{PH}\"}}")
        );
        assert_eq!(n, 2);
    }

    #[test]
    fn replaces_encoded_forms_and_basic_credentials() {
        let sc = scrubber();
        let basic = STANDARD.encode(format!("x-access-token:{SECRET}"));
        let text = format!(
            "hex={} b64={} basic={basic}",
            hex::encode(SECRET),
            STANDARD.encode(SECRET),
        );
        let (out, n) = run_chunked(&sc, text.as_bytes());
        let out = String::from_utf8(out).expect("ascii");
        assert!(
            !out.contains(SECRET) && !out.contains(&hex::encode(SECRET)),
            "{out}"
        );
        // No window of the secret's base64 (at any alignment) survives.
        for f in forms(SECRET.as_bytes(), PH.as_bytes()) {
            let p = String::from_utf8(f.pattern).expect("ascii");
            assert!(!out.contains(&p), "{p} in {out}");
        }
        assert!(out.contains(&hex::encode(PH)), "{out}");
        assert_eq!(n, 3);
    }

    #[test]
    fn ordinary_chunks_pass_at_once_and_uncopied() {
        let sc = scrubber();
        let mut s = ScrubStream::new(Arc::clone(&sc));
        let event = Bytes::from_static(b"data: {\"delta\":\"hello\"}\n\n");
        let out = s.feed(event.clone());
        assert_eq!(out, event, "an SSE event is not delayed");
        assert_eq!(out.as_ptr(), event.as_ptr(), "and not copied");
        assert_eq!(s.held(), 0);
    }

    #[test]
    fn a_possible_start_is_held_and_released() {
        let sc = scrubber();
        let mut s = ScrubStream::new(Arc::clone(&sc));
        assert_eq!(s.feed(Bytes::from_static(b"token: sk-li")), "token: ");
        assert_eq!(s.held(), 5);
        // Not a secret after all: released with the next chunk.
        assert_eq!(s.feed(Bytes::from_static(b"ne 2")), "sk-line 2");
        assert_eq!(s.held(), 0);
        assert_eq!(s.replaced(), 0);
    }

    #[test]
    fn a_stream_cut_inside_a_secret_does_not_hand_out_its_beginning() {
        let sc = scrubber();
        let mut s = ScrubStream::new(Arc::clone(&sc));
        let cut = &SECRET[..12];
        assert_eq!(s.feed(Bytes::from(format!("key={cut}"))), "key=");
        assert_eq!(s.finish(), PH);
        // A short tail is ordinary text.
        let mut s = ScrubStream::new(sc);
        assert_eq!(s.feed(Bytes::from_static(b"a sk-l")), "a ");
        assert_eq!(s.finish(), "sk-l");
    }

    #[test]
    fn scrub_all_reports_whether_anything_changed() {
        let sc = scrubber();
        assert_eq!(sc.scrub_all(b"no secret here"), None);
        assert_eq!(
            sc.scrub_all(format!("Bearer {SECRET}").as_bytes()),
            Some(format!("Bearer {PH}").into_bytes())
        );
    }

    /// `scrub_all`'s shortcut for values with no whole match answers exactly what feeding
    /// the value to a stream and finishing it does: every cut of every pattern, after text
    /// and on its own, long and short tails.
    #[test]
    fn scrub_all_answers_as_a_finished_stream_does() {
        let sc = scrubber();
        let streamed = |input: &[u8]| {
            let mut s = ScrubStream::new(Arc::clone(&sc));
            let mut out = s.feed(Bytes::copy_from_slice(input)).to_vec();
            out.extend_from_slice(&s.finish());
            (s.replaced() > 0).then_some(out)
        };
        let mut checked = 0;
        for form in &sc.forms {
            for cut in 0..=form.pattern.len() {
                for before in [&b""[..], b"x", b"key=", b"a long value before the cut: "] {
                    let mut input = before.to_vec();
                    input.extend_from_slice(&form.pattern[..cut]);
                    assert_eq!(sc.scrub_all(&input), streamed(&input), "{input:?}");
                    input.extend_from_slice(b" after");
                    assert_eq!(sc.scrub_all(&input), streamed(&input), "{input:?}");
                    checked += 2;
                }
            }
        }
        assert!(checked > 100, "{checked}");
        let cut = &SECRET.as_bytes()[..MIN_PARTIAL];
        assert_eq!(sc.scrub_all(cut), Some(PH.as_bytes().to_vec()));
        assert_eq!(sc.scrub_all(&cut[..MIN_PARTIAL - 1]), None);
    }

    #[test]
    fn several_secrets_and_nothing_to_match() {
        let sc = Scrubber::new(&[
            SecretPair {
                secret: b"first-secret-aaaa".to_vec(),
                placeholder: "P1".into(),
            },
            SecretPair {
                secret: b"second-secret-bbbb".to_vec(),
                placeholder: "P2".into(),
            },
        ])
        .expect("builds")
        .expect("patterns");
        let sc = Arc::new(sc);
        let (out, _) = run_chunked(&sc, b"x second-secret-bbbb y first-secret-aaaa z");
        assert_eq!(out, b"x P2 y P1 z");
        assert!(
            Scrubber::new(&[SecretPair {
                secret: b"ab".to_vec(),
                placeholder: "P".into()
            }])
            .expect("builds")
            .is_none()
        );
        assert!(!format!("{sc:?}").contains("secret-aaaa"));
    }
}
