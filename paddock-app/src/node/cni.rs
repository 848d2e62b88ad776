//! `paddock-cni`: a chained CNI plugin (spec 1.0, also 0.3.x and 0.4.0) that the container
//! runtime calls at pod sandbox creation, after the cluster's network plugins. ADD returns
//! only once the node agent has intercepted the pod (or said it is not an agent pod); if the
//! node agent cannot be reached, does not know the pod yet, or fails, ADD fails and the
//! runtime does not start the pod's containers (kubelet retries the sandbox). So an agent
//! pod's containers never run with egress that is not intercepted.
//!
//! Network configuration (the last entry of the node's `.conflist`):
//!
//! ```json
//! {"type": "paddock-cni", "socket": "/run/paddock/node/pods.sock", "timeoutSeconds": 30}
//! ```
//!
//! ADD prints the previous plugin's result unchanged (this plugin adds no interface); CHECK
//! asks the node agent whether the pod is intercepted as it should be; DEL releases the pod
//! (idempotent: an unknown pod is fine, as the spec requires).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::control::{Request, Response};
use paddock_proxy::pod_cgroup::PodUid;

/// CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
const DEFAULT_SOCKET: &str = "/run/paddock/node/pods.sock";
const DEFAULT_TIMEOUT: u64 = 30;

/// CNI error codes (spec section "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Plugin-specific: the node agent refused the pod.
    pub const REFUSED: u32 = 100;
}

/// A CNI error: printed as the spec's error object on stdout, exit status 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: &str, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.to_owned(),
            details: details.into(),
        }
    }

    /// The error object for `version`.
    #[must_use]
    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// The plugin's network configuration, as given on stdin.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub socket: Option<PathBuf>,
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// The previous plugin's result (chained).
    #[serde(default)]
    pub prev_result: Option<Value>,
}

/// The runtime's call: `CNI_*` environment and stdin.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: String,
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS` as key/value pairs.
    pub args: BTreeMap<String, String>,
    pub conf: NetConf,
}

impl Invocation {
    /// Reads `CNI_COMMAND`, `CNI_NETNS`, `CNI_ARGS` from `env` and the config from `stdin`.
    pub fn parse(env: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Self, CniError> {
        let command = env("CNI_COMMAND")
            .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set", ""))?;
        let conf: NetConf = if command == "VERSION" && stdin.iter().all(u8::is_ascii_whitespace) {
            NetConf {
                cni_version: "1.0.0".into(),
                name: String::new(),
                socket: None,
                timeout_seconds: None,
                prev_result: None,
            }
        } else {
            serde_json::from_slice(stdin).map_err(|e| {
                CniError::new(
                    code::DECODE_FAILURE,
                    "cannot decode the network configuration",
                    e.to_string(),
                )
            })?
        };
        if command != "VERSION" && !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                "incompatible CNI version",
                format!(
                    "{} (supported: {})",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let args = env("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(Self {
            command,
            netns: env("CNI_NETNS")
                .filter(|n| !n.is_empty())
                .map(PathBuf::from),
            args,
            conf,
        })
    }

    fn socket(&self) -> PathBuf {
        self.conf
            .socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    /// The per-call deadline.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.conf.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT).max(1))
    }

    /// The pod this call is about, from the `K8S_POD_*` arguments kubelet's runtimes pass;
    /// `None` when the call is not for a Kubernetes pod.
    fn pod(&self) -> Result<Option<(PodUid, String, String)>, CniError> {
        let (Some(ns), Some(name)) = (
            self.args.get("K8S_POD_NAMESPACE"),
            self.args.get("K8S_POD_NAME"),
        ) else {
            return Ok(None);
        };
        let uid = self.args.get("K8S_POD_UID").ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                "CNI_ARGS has K8S_POD_NAMESPACE but no K8S_POD_UID",
                "the container runtime must pass the pod UID",
            )
        })?;
        let uid = PodUid::parse(uid)
            .map_err(|e| CniError::new(code::INVALID_ENV, "bad K8S_POD_UID", e.to_string()))?;
        Ok(Some((uid, ns.clone(), name.clone())))
    }
}

/// What the plugin does once the call is parsed: `Ok(stdout)` or a CNI error.
pub async fn execute(inv: &Invocation) -> Result<Value, CniError> {
    execute_with(inv, |socket, req| async move {
        super::control::call(&socket, &req).await
    })
    .await
}

/// [`execute`] with the node agent call given (tests).
pub async fn execute_with<F, Fut>(inv: &Invocation, call: F) -> Result<Value, CniError>
where
    F: FnOnce(PathBuf, Request) -> Fut,
    Fut: Future<Output = std::io::Result<Response>>,
{
    let version = inv.conf.cni_version.clone();
    match inv.command.as_str() {
        "VERSION" => Ok(json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS})),
        "ADD" => {
            let prev = inv.conf.prev_result.clone().ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    "paddock-cni must be chained after the network plugins",
                    "no prevResult in the configuration",
                )
            })?;
            let Some((uid, namespace, name)) = inv.pod()? else {
                // Not a Kubernetes pod: nothing of Paddock's to do.
                return Ok(prev);
            };
            let netns = netns_of(inv)?;
            let req = Request::CniAdd {
                uid,
                namespace,
                name,
                netns,
            };
            ask(inv, call, req).await?;
            let mut out = prev;
            if let Some(o) = out.as_object_mut() {
                o.insert("cniVersion".into(), Value::String(version));
            }
            Ok(out)
        }
        "CHECK" => {
            let Some((uid, _, _)) = inv.pod()? else {
                return Ok(Value::Null);
            };
            let netns = netns_of(inv)?;
            ask(inv, call, Request::CniCheck { uid, netns }).await?;
            Ok(Value::Null)
        }
        "DEL" => {
            let Some((uid, _, _)) = inv.pod()? else {
                return Ok(Value::Null);
            };
            match ask(inv, call, Request::CniDel { uid }).await {
                // No node agent to ask: the pod's netns and cgroup are going, and the next
                // node agent releases recorded pods whose netns is gone. Failing would only
                // keep the pod from being deleted.
                Err(e) if e.code == code::TRY_AGAIN_LATER && e.msg.starts_with("cannot reach") => {
                    eprintln!("paddock-cni: DEL without a node agent: {}", e.details);
                    Ok(Value::Null)
                }
                Err(e) => Err(e),
                Ok(()) => Ok(Value::Null),
            }
        }
        other => Err(CniError::new(
            code::INVALID_ENV,
            "unknown CNI_COMMAND",
            other.to_owned(),
        )),
    }
}

fn netns_of(inv: &Invocation) -> Result<PathBuf, CniError> {
    inv.netns
        .clone()
        .filter(|p| p.is_absolute())
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is not an absolute path", ""))
}

async fn ask<F, Fut>(inv: &Invocation, call: F, req: Request) -> Result<(), CniError>
where
    F: FnOnce(PathBuf, Request) -> Fut,
    Fut: Future<Output = std::io::Result<Response>>,
{
    let socket = inv.socket();
    let answered = tokio::time::timeout(inv.timeout(), call(socket.clone(), req)).await;
    let response = match answered {
        Err(_) => {
            return Err(CniError::new(
                code::TRY_AGAIN_LATER,
                "the Paddock node agent did not answer in time",
                socket.display().to_string(),
            ));
        }
        Ok(Err(e)) => {
            return Err(CniError::new(
                code::TRY_AGAIN_LATER,
                "cannot reach the Paddock node agent; the pod is not started unintercepted",
                e.to_string(),
            ));
        }
        Ok(Ok(r)) => r,
    };
    if response.ok {
        return Ok(());
    }
    let code = if response.retry {
        code::TRY_AGAIN_LATER
    } else {
        code::REFUSED
    };
    Err(CniError::new(
        code,
        "the Paddock node agent refused the pod",
        response.error.unwrap_or_default(),
    ))
}

/// Whether a path names an existing socket (for the installer's checks and messages).
#[must_use]
pub fn socket_exists(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6b1d0c2a-1111-4222-8333-000000000001";

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| vars.get(k).cloned()
    }

    fn conf(prev: bool) -> Vec<u8> {
        let mut c = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "paddock-cni",
            "socket": "/run/x.sock"});
        if prev {
            c["prevResult"] = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
                "ips": [{"address": "10.88.0.10/24"}]});
        }
        serde_json::to_vec(&c).expect("json")
    }

    fn k8s_args() -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=team;K8S_POD_NAME=agent-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID={UID}"
        )
    }

    fn ok_response(intercepted: bool) -> Response {
        serde_json::from_value(json!({"ok": true, "intercepted": intercepted})).expect("response")
    }

    #[tokio::test]
    async fn add_sends_the_pod_and_passes_the_previous_result_on() {
        let args = k8s_args();
        let inv = Invocation::parse(
            &env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_NETNS", "/var/run/netns/cni-1"),
                ("CNI_ARGS", &args),
            ]),
            &conf(true),
        )
        .expect("parse");
        let sent = std::sync::Mutex::new(None);
        let out = execute_with(&inv, |socket, req| {
            *sent.lock().expect("sent") = Some((socket, req));
            async { Ok(ok_response(true)) }
        })
        .await
        .expect("add");
        assert_eq!(out["ips"][0]["address"], "10.88.0.10/24");
        assert_eq!(out["cniVersion"], "1.0.0");
        let (socket, req) = sent.lock().expect("sent").take().expect("called");
        assert_eq!(socket, Path::new("/run/x.sock"));
        assert_eq!(
            req,
            Request::CniAdd {
                uid: PodUid::parse(UID).expect("uid"),
                namespace: "team".into(),
                name: "agent-0".into(),
                netns: "/var/run/netns/cni-1".into(),
            }
        );
    }

    #[tokio::test]
    async fn add_fails_when_the_node_agent_refuses_is_down_or_silent() {
        let args = k8s_args();
        let inv = Invocation::parse(
            &env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_NETNS", "/var/run/netns/cni-1"),
                ("CNI_ARGS", &args),
            ]),
            &serde_json::to_vec(&json!({"cniVersion": "0.4.0", "socket": "/run/x.sock",
                "timeoutSeconds": 1, "prevResult": {}}))
            .expect("json"),
        )
        .expect("parse");
        let refused = execute_with(&inv, |_, _| async {
            Ok(
                serde_json::from_value::<Response>(json!({"ok": false, "error": "no cgroup"}))
                    .expect("response"),
            )
        })
        .await
        .expect_err("refused");
        assert_eq!(refused.code, code::REFUSED);
        assert!(refused.details.contains("no cgroup"));
        let unknown = execute_with(&inv, |_, _| async {
            Ok(serde_json::from_value::<Response>(
                json!({"ok": false, "error": "unknown", "retry": true}),
            )
            .expect("response"))
        })
        .await
        .expect_err("unknown");
        assert_eq!(unknown.code, code::TRY_AGAIN_LATER);
        let down = execute_with(&inv, |_, _| async {
            Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
        })
        .await
        .expect_err("down");
        assert_eq!(down.code, code::TRY_AGAIN_LATER);
        let silent = execute_with(&inv, |_, _| std::future::pending())
            .await
            .expect_err("silent");
        assert_eq!(silent.code, code::TRY_AGAIN_LATER);
        assert_eq!(silent.to_json("0.4.0")["cniVersion"], "0.4.0");
    }

    #[tokio::test]
    async fn bad_calls_are_cni_errors() {
        let args = k8s_args();
        // Not chained.
        let inv = Invocation::parse(
            &env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_NETNS", "/n"),
                ("CNI_ARGS", &args),
            ]),
            &conf(false),
        )
        .expect("parse");
        let e = execute_with(&inv, |_, _| async { Ok(ok_response(true)) })
            .await
            .expect_err("unchained");
        assert_eq!(e.code, code::INVALID_CONFIG);
        // Unsupported version, undecodable config, no command, bad UID.
        let e = Invocation::parse(
            &env(&[("CNI_COMMAND", "ADD")]),
            br#"{"cniVersion":"9.9.9"}"#,
        )
        .expect_err("version");
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = Invocation::parse(&env(&[("CNI_COMMAND", "ADD")]), b"{").expect_err("json");
        assert_eq!(e.code, code::DECODE_FAILURE);
        let e = Invocation::parse(&env(&[]), &conf(true)).expect_err("command");
        assert_eq!(e.code, code::INVALID_ENV);
        let bad = "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;K8S_POD_UID=../../x";
        let inv = Invocation::parse(
            &env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_NETNS", "/n"),
                ("CNI_ARGS", bad),
            ]),
            &conf(true),
        )
        .expect("parse");
        let e = execute_with(&inv, |_, _| async { Ok(ok_response(true)) })
            .await
            .expect_err("uid");
        assert_eq!(e.code, code::INVALID_ENV);
    }

    #[tokio::test]
    async fn version_del_and_non_pod_calls() {
        let inv = Invocation::parse(&env(&[("CNI_COMMAND", "VERSION")]), b"").expect("parse");
        let v = execute_with(&inv, |_, _| async { Ok(ok_response(true)) })
            .await
            .expect("version");
        assert_eq!(v["supportedVersions"][3], "1.0.0");
        // A container that is not a Kubernetes pod: passed through, the agent never asked.
        let inv = Invocation::parse(
            &env(&[("CNI_COMMAND", "ADD"), ("CNI_NETNS", "/n")]),
            &conf(true),
        )
        .expect("parse");
        let out = execute_with(&inv, |_, _| async { panic!("not asked") })
            .await
            .expect("pass through");
        assert_eq!(out["interfaces"][0]["name"], "eth0");
        let args = k8s_args();
        let inv = Invocation::parse(
            &env(&[("CNI_COMMAND", "DEL"), ("CNI_ARGS", &args)]),
            &conf(false),
        )
        .expect("parse");
        let sent = std::sync::Mutex::new(None);
        execute_with(&inv, |_, req| {
            *sent.lock().expect("sent") = Some(req);
            async { Ok(ok_response(false)) }
        })
        .await
        .expect("del");
        assert_eq!(
            sent.lock().expect("sent").take(),
            Some(Request::CniDel {
                uid: PodUid::parse(UID).expect("uid")
            })
        );
        // DEL without a node agent succeeds (the next one releases the pod); a refusal fails.
        execute_with(&inv, |_, _| async {
            Err(std::io::Error::from(std::io::ErrorKind::NotFound))
        })
        .await
        .expect("DEL with the node agent gone");
        let e = execute_with(&inv, |_, _| async {
            Ok(
                serde_json::from_value::<Response>(json!({"ok": false, "error": "detach failed"}))
                    .expect("response"),
            )
        })
        .await
        .expect_err("refused DEL");
        assert_eq!(e.code, code::REFUSED);
    }
}
