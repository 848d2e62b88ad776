//! Property tests of the placeholder format and the codecs: what one side encodes the other
//! decodes, and the three placeholder views (exact, marker, redaction) agree.

use paddock_wire::codec::{basic, percent, query};
use paddock_wire::placeholder;
use proptest::prelude::*;

fn kind() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9-]{0,15}"
}

/// Text around a placeholder: anything, but a delimiter at each edge.
fn surround() -> impl Strategy<Value = (String, String)> {
    ("\\PC{0,20}[ =&:\"/]", "[ =&:\"/]\\PC{0,20}")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn basic_round_trips(user in "[^:\\x00]{0,20}", password in "\\PC{0,40}") {
        let value = basic::encode(&user, &password);
        prop_assert_eq!(basic::decode(value.as_bytes()), Some((user, password)));
    }

    #[test]
    fn percent_round_trips_and_stays_ascii(s in "\\PC{0,60}") {
        let e = percent::encode(&s);
        prop_assert!(e.is_ascii());
        prop_assert_eq!(percent::decode_lossy(&e), s);
    }

    #[test]
    fn a_query_value_is_replaced_exactly(
        names in proptest::collection::vec("[a-z]{1,6}", 0..4),
        at in 0usize..4,
        secret in "\\PC{1,30}",
        k in kind(),
    ) {
        let ph = placeholder::generate(&k).expect("generate");
        let mut pieces: Vec<String> = names.iter().map(|n| format!("{n}=v%20{n}")).collect();
        let at = at.min(pieces.len());
        pieces.insert(at, format!("key={ph}"));
        let q = pieces.join("&");
        let out = query::replace_value(&q, &ph, &secret).expect("replaced");
        let decoded: Vec<(String, String)> = query::pairs(&out)
            .map(|(n, v)| (query::decode(n), query::decode(v)))
            .collect();
        prop_assert_eq!(&decoded[at], &("key".to_owned(), secret));
        for (i, n) in names.iter().enumerate() {
            let j = if i < at { i } else { i + 1 };
            prop_assert_eq!(&decoded[j], &(n.clone(), format!("v {n}")));
        }
        prop_assert!(!out.contains(&ph));
    }

    #[test]
    fn placeholders_are_found_whole_and_redacted((before, after) in surround(), k in kind()) {
        let ph = placeholder::generate(&k).expect("generate");
        prop_assert!(placeholder::is_placeholder(ph.as_bytes()));
        let text = format!("{before}{ph}{after}");
        let found: Vec<&str> = placeholder::find_str(&text).collect();
        prop_assert!(found.contains(&ph.as_str()), "{:?}", found);
        prop_assert!(placeholder::may_contain(text.as_bytes()));
        let redacted = placeholder::redact(&text);
        prop_assert!(!redacted.contains(&ph));
        prop_assert_eq!(placeholder::find_str(&redacted).count(), 0);
        // Inside Basic credentials and a query it is found after decoding.
        let (_, pass) = basic::decode(basic::encode("u", &ph).as_bytes()).expect("basic");
        prop_assert!(placeholder::is_placeholder(pass.as_bytes()));
        let q = format!("key={}", percent::encode(&ph));
        prop_assert_eq!(query::decode(query::pairs(&q).next().expect("pair").1), ph);
    }

    #[test]
    fn anything_found_is_flagged_by_the_marker_test(text in "\\PC{0,80}") {
        if placeholder::find(text.as_bytes()).next().is_some() {
            prop_assert!(placeholder::may_contain(text.as_bytes()));
        }
        prop_assert_eq!(placeholder::find_str(&placeholder::redact(&text)).count(), 0);
    }
}
