//! Loader errors that name the missing kernel feature and carry the verifier log.

use std::path::PathBuf;

use aya::programs::ProgramError;

/// Why loading or attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "the eBPF object is missing from this build: run `cargo xtask build-ebpf`, then rebuild"
    )]
    ObjectMissing,
    #[error(
        "the embedded eBPF object is older than the eBPF sources: run `cargo xtask build-ebpf`, \
         then rebuild"
    )]
    ObjectStale,
    #[error(transparent)]
    Mount(#[from] crate::mounts::MountError),
    #[error("loading the eBPF object: {reason}{}", hint_suffix(*.hint))]
    Load {
        reason: String,
        hint: Option<&'static str>,
    },
    #[error("loading program {program}: {reason}{}", hint_suffix(*.hint))]
    Program {
        program: &'static str,
        reason: String,
        hint: Option<&'static str>,
    },
    #[error("attaching {program}: {reason}{}", hint_suffix(*.hint))]
    Attach {
        program: &'static str,
        reason: String,
        hint: Option<&'static str>,
    },
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("eBPF map {map}: {reason}")]
    Map { map: &'static str, reason: String },
    #[error("program {0} is not in the eBPF object (stale object? run `cargo xtask build-ebpf`)")]
    MissingProgram(&'static str),
    #[error("map {0} is not in the eBPF object (stale object? run `cargo xtask build-ebpf`)")]
    MissingMap(&'static str),
    #[error("invalid interception config: {0}")]
    Config(#[from] super::config::ConfigError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn hint_suffix(hint: Option<&'static str>) -> String {
    hint.map(|h| format!(" (hint: {h})")).unwrap_or_default()
}

/// Recognise the usual reasons a kernel refuses us, from an error text or verifier log.
#[must_use]
pub fn kernel_hint(text: &str) -> Option<&'static str> {
    let t = text.to_ascii_lowercase();
    if t.contains("unknown func") || t.contains("invalid func") || t.contains("not supported for") {
        if t.contains("unknown func bpf_get_netns_cookie") {
            Some("bpf_get_netns_cookie in sockops/getsockopt programs needs Linux 5.15 or newer")
        } else {
            Some("the kernel lacks a BPF helper these programs use: Linux 5.15+ is required")
        }
    } else if t.contains("operation not permitted") {
        Some("needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)")
    } else if t.contains("btf") && (t.contains("not found") || t.contains("no btf")) {
        Some("the kernel needs BTF (CONFIG_DEBUG_INFO_BTF=y)")
    } else if t.contains("bpf_link_create") && t.contains("invalid argument") {
        Some("cgroup BPF links need Linux 5.7 or newer with CONFIG_CGROUP_BPF=y")
    } else if t.contains("invalid access to map value") {
        Some(
            "the pinned maps may come from an older Paddock with another layout: run \
             `paddock-proxy ebpf teardown --pin-dir DIR`, then attach again",
        )
    } else if t.contains("function not implemented") {
        Some("the kernel was built without BPF syscall support (CONFIG_BPF_SYSCALL=y)")
    } else {
        None
    }
}

impl EbpfError {
    pub(crate) fn load(e: &aya::EbpfError) -> Self {
        let reason = e.to_string();
        Self::Load {
            hint: kernel_hint(&reason),
            reason,
        }
    }

    pub(crate) fn program(program: &'static str, e: &ProgramError) -> Self {
        // ProgramError::LoadError's Display includes the verifier output.
        let reason = e.to_string();
        Self::Program {
            program,
            hint: kernel_hint(&reason),
            reason,
        }
    }

    pub(crate) fn attach(program: &'static str, e: &ProgramError) -> Self {
        let reason = e.to_string();
        let detail = format!("{reason} {e:?}");
        Self::Attach {
            program,
            hint: kernel_hint(&detail),
            reason,
        }
    }

    pub(crate) fn attach_link(program: &'static str, e: &dyn std::fmt::Display) -> Self {
        Self::Attach {
            program,
            reason: e.to_string(),
            hint: None,
        }
    }

    pub(crate) fn map(map: &'static str, e: &aya::maps::MapError) -> Self {
        Self::Map {
            map,
            reason: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_missing_feature() {
        assert!(
            kernel_hint("bpf_prog_load: Operation not permitted")
                .unwrap_or("")
                .contains("root")
        );
        assert!(
            kernel_hint("unknown func bpf_get_netns_cookie#122")
                .unwrap_or("")
                .contains("5.15")
        );
        assert!(
            kernel_hint("no BTF found for kernel")
                .unwrap_or("")
                .contains("BTF")
        );
        assert!(
            kernel_hint("invalid access to map value, value_size=56 off=56 size=2")
                .unwrap_or("")
                .contains("teardown")
        );
        assert!(kernel_hint("all good").is_none());
    }

    #[test]
    fn display_carries_reason_and_hint() {
        let e = EbpfError::Program {
            program: "paddock_connect4",
            reason: "verifier says: R1 invalid mem access".into(),
            hint: Some("x"),
        };
        let s = e.to_string();
        assert!(
            s.contains("paddock_connect4")
                && s.contains("R1 invalid mem access")
                && s.contains("hint: x")
        );
        assert!(
            EbpfError::ObjectMissing
                .to_string()
                .contains("cargo xtask build-ebpf")
        );
    }
}
