//! Files the root-tier tests hand to `paddock-proxy run` and read back from it.

use std::{os::unix::fs::PermissionsExt, path::Path};

/// Creates `dir` (0700) holding each `(name, value)` as a 0600 file: secrets only root may
/// read, as `run` requires of secret files.
pub fn write_secrets(dir: &Path, secrets: &[(&str, &str)]) {
    std::fs::create_dir(dir).expect("secrets dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    for (name, value) in secrets {
        std::fs::write(dir.join(name), value).expect("write secret");
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
}

/// The records of a JSONL audit trail (lines that are not JSON are skipped).
#[must_use]
pub fn audit_records(trail: &str) -> Vec<serde_json::Value> {
    trail
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
