//! Request heads an agent sends: the head reader, the head parser (`httparse`: request line,
//! the one `Host` header) and `CONNECT` authority parsers of the plain-HTTP and cooperative
//! listeners, and the forwarding path's authority check and upstream URI.
#![no_main]

use libfuzzer_sys::fuzz_target;
use paddock_proxy::fuzzing::{authority, connect_authority, host_of};
use paddock_proxy::http::RequestContext;
use paddock_proxy::policy::normalize_host;
use paddock_proxy::proxy::head::parse_head;
use paddock_proxy::proxy::io::read_head;

const MAX_HEAD: usize = 8 * 1024;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    // The head reader splits at the first blank line (or refuses); the split loses nothing.
    let mut reader = data;
    if let Ok((head, rest)) = runtime().block_on(read_head(&mut reader, MAX_HEAD)) {
        assert!(head.ends_with(b"\r\n\r\n"), "head without its blank line");
        assert_eq!(
            head.windows(4).position(|w| w == b"\r\n\r\n"),
            Some(head.len() - 4),
            "head split after a later blank line"
        );
        assert!(data.starts_with(&head), "head is not a prefix");
        assert!(
            data[head.len()..].starts_with(&rest),
            "bytes after the head were lost"
        );
    }

    let parsed = parse_head(data, 32).ok();
    let line = parsed.map(|h| (h.method, h.target));
    if let Some((method, target)) = line {
        assert!(!method.contains(' ') && !target.contains(' '));
        if let Some((host, port)) = connect_authority(target) {
            assert_ne!(port, 0, "CONNECT to port 0");
            assert!(!host.is_empty(), "CONNECT to an empty host");
            assert!(target.contains(host));
        }
    }
    let host_header = parsed.and_then(|h| h.host);
    if let Some(value) = host_header
        && let Some(host) = host_of(value)
    {
        assert!(!host.is_empty(), "empty host from {value:?}");
        assert!(value.contains(host));
        // Policy sees the normalised name; normalising is idempotent, so the name checked
        // is the name dialled.
        if let Ok(name) = normalize_host(host) {
            assert_eq!(
                normalize_host(&name).as_deref(),
                Ok(name.as_str()),
                "{host:?}"
            );
        }
    }

    // The authority check on a request built from what the agent wrote.
    let (Some((method, target)), Some(host)) = (line, host_header) else {
        return;
    };
    let Ok(request) = http::Request::builder()
        .method(method)
        .uri(target)
        .header(http::header::HOST, host)
        .body(())
    else {
        return;
    };
    let (parts, ()) = request.into_parts();
    let dest = host_of(host).unwrap_or("example.com").to_owned();
    for sni in [None, Some(dest.clone())] {
        let ctx = RequestContext {
            run: "fuzz".into(),
            host: dest.clone(),
            port: 443,
            sni,
        };
        if let Ok(uri) = authority(&parts, &ctx) {
            // Whatever the agent wrote, the request goes to the connection's destination.
            let up = uri.authority().expect("upstream URI has an authority");
            // The destination as the proxy spells a host it dials (an enclosing pair of
            // brackets and one trailing dot dropped; a `[` or `]` inside a malformed name is
            // part of it); the upstream URI holds that spelling, bracketed when IPv6.
            fn unbracketed(h: &str) -> &str {
                h.strip_prefix('[')
                    .and_then(|i| i.strip_suffix(']'))
                    .unwrap_or(h)
            }
            let want = unbracketed(&dest);
            let want = want.strip_suffix('.').unwrap_or(want);
            let got = unbracketed(up.host());
            assert!(
                got.eq_ignore_ascii_case(want),
                "forwarded to {got:?}, not {want:?}"
            );
            assert_eq!(
                up.port_u16()
                    .unwrap_or(if ctx.sni.is_some() { 443 } else { 80 }),
                443
            );
        }
    }
});
