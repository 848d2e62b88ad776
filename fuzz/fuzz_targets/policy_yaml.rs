//! `BrokerPolicy` YAML documents as the broker parses and validates them (no files touched),
//! then cross-document checks and an egress decision on the result.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use paddock_broker::policy::Policy;
use paddock_wire::api::{RunInfo, RunPhase};
use time::OffsetDateTime;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A fixed clock: discovery windows compare against it, and runs must be reproducible.
    let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("timestamp");
    let docs = match Policy::parse_text(Path::new("fuzz.yaml"), text, now) {
        Ok(docs) => docs,
        Err(e) => {
            // Error messages (with line numbers worked out from the text) must render.
            let _ = e.to_string();
            return;
        }
    };
    let Ok(policy) = Policy::from_docs(docs) else {
        return;
    };
    let run = RunInfo {
        run: "r1".into(),
        namespace: "team-a".into(),
        template: "t".into(),
        phase: RunPhase::Running,
    };
    for (host, port) in [
        ("api.github.com", 443),
        ("x.example.com", 80),
        ("::1", 8080),
    ] {
        let d = policy.egress(&run, host, port, now);
        // Substitution is only ever granted on an allowed destination.
        assert!(
            d.allowed() || !d.substitute_auth(),
            "substitution without egress"
        );
    }
    for (_, grant) in policy.credentials() {
        let _ = policy.credential_for(&run, &grant.name);
    }
});
