//! The broker's YAML configuration file, parsed and checked as `paddock-broker` does before it
//! opens anything.
#![no_main]

use libfuzzer_sys::fuzz_target;
use paddock_broker::config::Config;
use paddock_broker::ratelimit::RateLimits;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(std::path::Path::new("fuzz.yaml"), text) else {
        return;
    };
    if let Ok(Some(poll)) = config.policy_poll() {
        assert!(!poll.is_zero(), "a zero poll interval would spin");
    }
    let _ = config.auth.resolved_order();
    if let Some(introspection) = &config.auth.introspection {
        let _ = introspection.validate();
    }
    let _ = RateLimits::new(&config.rate_limits);
});
