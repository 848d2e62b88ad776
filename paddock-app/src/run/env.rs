//! The command's environment: the run CA for every common TLS stack, and its placeholders.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::{Path, PathBuf},
};

/// The CA files handed to the command (both world-readable; neither holds a key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// The run CA certificate alone (for `NODE_EXTRA_CA_CERTS`, which adds to Node's roots).
    pub ca_cert: PathBuf,
    /// The run CA followed by the system roots: variables that *replace* a client's trust store
    /// point here, so destinations Paddock does not intercept (bypass list) still verify.
    pub bundle: PathBuf,
}

impl CaFiles {
    /// Where the sandbox writes them: its private `/tmp`, in a root-owned directory.
    #[must_use]
    pub fn in_sandbox() -> Self {
        let dir = Path::new(super::spec::SANDBOX_DIR);
        Self {
            ca_cert: dir.join(CA_FILE),
            bundle: dir.join(BUNDLE_FILE),
        }
    }
}

/// File names of the run CA and the bundle inside the sandbox directory.
pub const CA_FILE: &str = "ca.crt";
pub const BUNDLE_FILE: &str = "bundle.crt";

/// Variables that tell TLS clients which CA to trust, by ecosystem.
pub const CA_VARS: &[&str] = &[
    "SSL_CERT_FILE",      // OpenSSL (curl, Python ssl, Ruby, git with OpenSSL)
    "REQUESTS_CA_BUNDLE", // Python requests
    "CURL_CA_BUNDLE",     // curl
    "GIT_SSL_CAINFO",     // git
    "AWS_CA_BUNDLE",      // AWS SDKs and CLI
    "PIP_CERT",           // pip
];

/// Variables never passed through from Paddock's own environment: they could point the command
/// at Paddock's files or loosen TLS checks.
const STRIPPED: &[&str] = &[
    "NODE_TLS_REJECT_UNAUTHORIZED",
    "PYTHONHTTPSVERIFY",
    "GIT_SSL_NO_VERIFY",
    "SSL_CERT_DIR",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "https_proxy",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "SUDO_COMMAND",
    // Handles to the operator's session the sandbox hides (private /tmp and /run, own network
    // namespace): passing them on only produces confusing failures.
    "SSH_AUTH_SOCK",
    "SSH_AGENT_PID",
    "GPG_AGENT_INFO",
    "DBUS_SESSION_BUS_ADDRESS",
    "XDG_RUNTIME_DIR",
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "XAUTHORITY",
    "KRB5CCNAME",
];

/// Build the command's environment from Paddock's own (`inherited`), the CA files, the
/// placeholders (`NAME=pdk-...`, as the policy names them) and the run user's home.
pub fn child_env(
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
    ca: &CaFiles,
    placeholders: &BTreeMap<String, String>,
    user: &super::RunUser,
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = inherited
        .into_iter()
        .filter(|(k, _)| {
            !k.to_str()
                .is_some_and(|k| STRIPPED.contains(&k) || k.starts_with("PADDOCK_"))
        })
        .collect();
    for var in CA_VARS {
        env.insert((*var).into(), ca.bundle.clone().into());
    }
    env.insert("NODE_EXTRA_CA_CERTS".into(), ca.ca_cert.clone().into());
    env.insert("PADDOCK_CA_FILE".into(), ca.ca_cert.clone().into());
    env.insert("HOME".into(), user.home.clone().into());
    env.insert("USER".into(), user.name.clone().into());
    env.insert("LOGNAME".into(), user.name.clone().into());
    for (k, v) in placeholders {
        env.insert(k.into(), v.into());
    }
    env
}

/// System root bundles, in the order distributions put them.
pub const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The bundle: the run CA followed by the first system bundle found, so destinations Paddock
/// does not intercept still verify for clients that replace their trust store with it.
pub fn ca_bundle(ca_pem: &str, system_bundles: &[&str]) -> String {
    let mut all = ca_pem.trim_end().to_owned();
    all.push('\n');
    if let Some(sys) = system_bundles
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
    {
        all.push_str(&sys);
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> super::super::RunUser {
        super::super::RunUser {
            name: "agent".into(),
            uid: nix::unistd::Uid::from_raw(1000),
            gid: nix::unistd::Gid::from_raw(1000),
            home: "/home/agent".into(),
            dynamic: false,
        }
    }

    #[test]
    fn sets_ca_vars_placeholders_and_strips_dangerous_ones() {
        let ca = CaFiles {
            ca_cert: "/run/p/ca.crt".into(),
            bundle: "/run/p/bundle.crt".into(),
        };
        let mut ph = BTreeMap::new();
        ph.insert(
            "ANTHROPIC_API_KEY".to_owned(),
            "pdk-anthropic-00ff".to_owned(),
        );
        let inherited = vec![
            ("PATH".into(), "/usr/bin".into()),
            ("NODE_TLS_REJECT_UNAUTHORIZED".into(), "0".into()),
            ("HTTPS_PROXY".into(), "http://elsewhere".into()),
            ("PADDOCK_BROKER_TOKEN".into(), "secret".into()),
            ("ANTHROPIC_API_KEY".into(), "sk-real-key".into()),
            ("HOME".into(), "/root".into()),
            ("SSH_AUTH_SOCK".into(), "/tmp/ssh-x/agent.1".into()),
        ];
        let env = child_env(inherited, &ca, &ph, &user());
        let get = |k: &str| {
            env.get(&OsString::from(k))
                .and_then(|v| v.to_str())
                .map(str::to_owned)
        };
        assert_eq!(get("PATH").as_deref(), Some("/usr/bin"));
        for v in CA_VARS {
            assert_eq!(get(v).as_deref(), Some("/run/p/bundle.crt"), "{v}");
        }
        assert_eq!(get("NODE_EXTRA_CA_CERTS").as_deref(), Some("/run/p/ca.crt"));
        assert_eq!(get("PADDOCK_CA_FILE").as_deref(), Some("/run/p/ca.crt"));
        // The placeholder replaces a real key that leaked into Paddock's own environment.
        assert_eq!(
            get("ANTHROPIC_API_KEY").as_deref(),
            Some("pdk-anthropic-00ff")
        );
        assert_eq!(get("NODE_TLS_REJECT_UNAUTHORIZED"), None);
        assert_eq!(get("HTTPS_PROXY"), None);
        assert_eq!(get("PADDOCK_BROKER_TOKEN"), None);
        assert_eq!(
            get("SSH_AUTH_SOCK"),
            None,
            "the agent socket is not reachable inside"
        );
        assert_eq!(get("HOME").as_deref(), Some("/home/agent"));
        assert_eq!(get("USER").as_deref(), Some("agent"));
    }

    #[test]
    fn bundle_starts_with_the_run_ca_and_appends_system_roots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sys = dir.path().join("sys.pem");
        std::fs::write(&sys, "SYSTEM ROOTS\n").expect("write");
        let bundle = ca_bundle("RUN CA", &["/nonexistent", sys.to_str().expect("utf-8")]);
        assert_eq!(bundle, "RUN CA\nSYSTEM ROOTS\n");
        assert_eq!(ca_bundle("RUN CA\n\n", &["/nonexistent"]), "RUN CA\n");
        let files = CaFiles::in_sandbox();
        assert!(
            files.ca_cert.starts_with("/tmp/.paddock") && files.bundle.starts_with("/tmp/.paddock")
        );
    }
}
