//! The response scrubber: a body built from the fuzzer's bytes with secret forms spliced in
//! (ops select a form of a secret, or a literal byte), cut into chunks at fuzzer-chosen
//! places and streamed through `ScrubStream`. Asserts that no encoded form of a secret
//! survives, that where the chunks are cut changes nothing, and that a body holding no secret
//! (and not ending in a cut-off one) comes out unchanged.
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use paddock_proxy::scrub::forms::forms;
use paddock_proxy::scrub::matcher::MIN_PARTIAL;
use paddock_proxy::scrub::{ScrubStream, Scrubber, SecretPair};

const SECRETS: [(&str, &str); 2] = [
    (
        "sk-live/Abc+123=xyz_SECRET",
        "pdk-user-secret-000000000000000000000000000000000000000000000000",
    ),
    (
        "ghp_0123456789abcdefABCDEF",
        "pdk-pat-pool-111111111111111111111111111111111111111111111111",
    ),
];

fn pairs() -> Vec<SecretPair> {
    SECRETS
        .iter()
        .map(|(s, p)| SecretPair {
            secret: s.as_bytes().to_vec(),
            placeholder: (*p).to_owned(),
        })
        .collect()
}

fn stream(sc: &Arc<Scrubber>, chunks: &[&[u8]]) -> Vec<u8> {
    let mut s = ScrubStream::new(Arc::clone(sc));
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&s.feed(Bytes::copy_from_slice(c)));
    }
    out.extend_from_slice(&s.finish());
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// The scrubber and the secrets' forms, built once: the secrets are fixed, and building the
/// automaton per input made the target 50 executions a second.
fn setup() -> &'static (Arc<Scrubber>, Vec<Vec<u8>>) {
    static SETUP: OnceLock<(Arc<Scrubber>, Vec<Vec<u8>>)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let pats = SECRETS
            .iter()
            .flat_map(|(s, p)| forms(s.as_bytes(), p.as_bytes()))
            .map(|f| f.pattern)
            .collect();
        let sc = Scrubber::new(&pairs())
            .expect("builds")
            .expect("patterns");
        (Arc::new(sc), pats)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&cuts_seed, ops)) = data.split_first() else {
        return;
    };
    let (sc, pats) = setup();
    // Ops: 0xF0..=0xFF splice in pattern (b - 0xF0) mod n, anything else is itself.
    let mut body = Vec::new();
    for &b in ops {
        if b >= 0xF0 {
            body.extend_from_slice(&pats[usize::from(b - 0xF0) % pats.len()]);
        } else {
            body.push(b);
        }
    }
    let whole = stream(sc, &[&body]);
    // Chunk sizes from the seed (1..=32, cycling), so splits land everywhere.
    let mut chunks = Vec::new();
    let (mut at, mut k) = (0usize, usize::from(cuts_seed));
    while at < body.len() {
        let n = (k % 32) + 1;
        let end = (at + n).min(body.len());
        chunks.push(&body[at..end]);
        at = end;
        k = k.wrapping_mul(31).wrapping_add(7);
    }
    let chunked = stream(sc, &chunks);
    assert_eq!(whole, chunked, "the output depends on where the body was cut");
    for p in pats {
        assert!(!contains(&whole, p), "a secret form survived");
    }
    let clean = !pats.iter().any(|p| contains(&body, p));
    let longest = pats.iter().map(Vec::len).max().unwrap_or(0);
    // Up to and including the whole body: a body that is nothing but the start of a secret
    // form is cut off as much as one that ends in it.
    let cut_off = (MIN_PARTIAL..=body.len().min(longest)).any(|n| {
        let tail = &body[body.len() - n..];
        pats.iter().any(|p| p.len() > n && p.starts_with(tail))
    });
    if clean && !cut_off {
        assert_eq!(whole, body, "a body without a secret was changed");
    }
});
