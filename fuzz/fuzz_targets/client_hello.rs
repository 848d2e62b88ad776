//! The transparent listener's `ClientHello`/SNI parser on arbitrary stream prefixes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use paddock_proxy::tls::{HelloError, parse_client_hello};

fuzz_target!(|data: &[u8]| {
    match parse_client_hello(data) {
        Ok(hello) => {
            // The hello occupies a prefix of the stream; that prefix alone parses the same.
            assert!(hello.wire_len() <= data.len(), "wire_len beyond the input");
            let again = parse_client_hello(&data[..hello.wire_len()]).expect("own prefix");
            assert_eq!(again, hello, "the hello's own records parse differently");
            if let Some(name) = hello.server_name() {
                // What the proxy decides on is a normalised DNS name, never an IP literal.
                assert!(!name.is_empty() && !name.ends_with('.'), "{name:?}");
                assert_eq!(name, name.to_ascii_lowercase(), "SNI not lowercased");
                assert!(
                    name.parse::<std::net::IpAddr>().is_err(),
                    "IP literal as SNI"
                );
            }
            for alpn in hello.alpn() {
                assert!(!alpn.is_empty(), "empty ALPN name");
            }
        }
        Err(HelloError::NeedMore(n)) => {
            // A valid prefix: more bytes are needed, at least one.
            assert!(n > 0, "NeedMore(0)");
            // Fewer than `n` more bytes can never complete it.
            let mut short = data.to_vec();
            short.resize(data.len() + n - 1, 0);
            assert!(
                parse_client_hello(&short).is_err(),
                "NeedMore({n}) overshot"
            );
        }
        Err(HelloError::NotTls | HelloError::Malformed(_) | HelloError::NoSni) => {}
    }
});
