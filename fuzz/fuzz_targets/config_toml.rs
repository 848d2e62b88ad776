//! The proxy's TOML files: `serve`'s configuration and the static egress policy list.
#![no_main]

use libfuzzer_sys::fuzz_target;
use paddock_proxy::policy::{EgressRequest, Mode, StaticPolicy};
use paddock_app::serve::config::ServeConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = ServeConfig::from_toml_str(text) {
        // Validation promised these; the listeners divide and sleep by them.
        assert!(!cfg.limits.handshake_timeout().is_zero());
        assert!(!cfg.limits.idle_timeout().is_zero());
        let _ = cfg.limits.drain_timeout();
        let _ = cfg.audit_target(None);
    }
    if let Ok(policy) = StaticPolicy::from_toml_str(text) {
        for (host, port, mode) in [
            ("api.github.com", 443, Mode::Transparent),
            ("x.example.com", 80, Mode::PlainHttp),
            ("::1", 8443, Mode::Connect),
        ] {
            let req = EgressRequest::new("r1", host, port, mode).expect("valid host");
            let _ = policy.decide(&req);
        }
    }
});
