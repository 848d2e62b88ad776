//! The node agent's pod source socket: a root-only unix socket speaking one JSON object per
//! line. The CNI plugin calls it at sandbox creation (and the ADD returns only once the pod
//! is intercepted); `paddock-proxy node-pods` is the operator's (and the tests') client.
//!
//! ```text
//! -> {"op":"add","pod":{"uid":"...","namespace":"team","name":"agent-0","run":"run-1",
//!                        "netns":"/var/run/netns/cni-...","nameservers":["10.96.0.10"]}}
//! <- {"ok":true,"pod":{"uid":"...","run":"run-1","port":40123,...}}
//! -> {"op":"delete","uid":"..."}          <- {"ok":true}
//! -> {"op":"list"}                        <- {"ok":true,"pods":[...]}
//! <- {"ok":false,"error":"..."}           on any failure (the pod is then not served)
//! ```
//!
//! The CNI plugin knows only what the runtime tells it (the pod's UID, namespace, name and
//! network namespace); the run and resolvers come from the API server ([`super::pods`]):
//!
//! ```text
//! -> {"op":"cni-add","uid":"...","namespace":"team","name":"agent-0","netns":"/var/run/netns/..."}
//! <- {"ok":true,"intercepted":true,"pod":{...}}   an agent pod, now intercepted
//! <- {"ok":true,"intercepted":false}             not an agent pod (no run label)
//! <- {"ok":false,"error":"...","retry":true}     unknown pod / no API view yet: ADD fails
//! -> {"op":"cni-check","uid":"...","netns":"..."}  -> {"op":"cni-del","uid":"..."}
//! ```
//!
//! Requests are bounded (64 KiB per line, 30 s per connection, 64 connections at once); the
//! socket is created 0600 in a 0700 directory, since whoever can add a pod chooses its run.

use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::agent::{NodeAgent, PodError, PodStatus};
use super::pod::PodSpec;
use super::pods::{Lookup, PodDirectory};
use paddock_proxy::ebpf::Interception;
use paddock_proxy::pod_cgroup::PodUid;

/// Longest request line.
pub const MAX_REQUEST: usize = 64 * 1024;
const CONN_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_CLIENTS: usize = 64;

/// A request on the socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Add {
        pod: PodSpec,
    },
    Delete {
        uid: PodUid,
    },
    List,
    #[serde(rename = "cni-add")]
    CniAdd {
        uid: PodUid,
        namespace: String,
        name: String,
        netns: PathBuf,
    },
    #[serde(rename = "cni-check")]
    CniCheck {
        uid: PodUid,
        netns: PathBuf,
    },
    #[serde(rename = "cni-del")]
    CniDel {
        uid: PodUid,
    },
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<Vec<serde_json::Value>>,
    /// CNI ADD: whether the pod is now intercepted (false: not an agent pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intercepted: Option<bool>,
    /// The failure may pass by itself (the runtime should retry the sandbox).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry: bool,
}

impl Response {
    fn error(e: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            error: Some(e.to_string()),
            pod: None,
            pods: None,
            intercepted: None,
            retry: false,
        }
    }

    fn ok() -> Self {
        Self {
            ok: true,
            error: None,
            pod: None,
            pods: None,
            intercepted: None,
            retry: false,
        }
    }
}

fn status_json(s: &PodStatus) -> serde_json::Value {
    serde_json::to_value(s).unwrap_or(serde_json::Value::Null)
}

/// Binds the socket (replacing a stale one from a previous run), 0600 in a 0700 directory.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers requests until `stop` completes.
pub async fn serve<I: Interception + 'static>(
    listener: UnixListener,
    agent: Arc<NodeAgent<I>>,
    pods: Option<Arc<PodDirectory>>,
    stop: impl Future<Output = ()>,
) {
    let clients = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            () = &mut stop => return,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "pod socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&clients).try_acquire_owned() else {
            tracing::warn!("too many pod socket clients; closing one");
            continue;
        };
        let agent = Arc::clone(&agent);
        let pods = pods.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if tokio::time::timeout(CONN_TIMEOUT, client(stream, &agent, pods.as_deref()))
                .await
                .is_err()
            {
                tracing::warn!("pod socket client timed out");
            }
        });
    }
}

async fn client<I: Interception>(
    stream: UnixStream,
    agent: &NodeAgent<I>,
    pods: Option<&PodDirectory>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let Ok(n) = (&mut lines)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
        else {
            return;
        };
        if n == 0 {
            return;
        }
        let response = if line.len() > MAX_REQUEST {
            let r = Response::error(format!("request longer than {MAX_REQUEST} bytes"));
            let _ = write_response(&mut write, &r).await;
            return;
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => answer(agent, pods, req).await,
                Err(e) => Response::error(format!("bad request: {e}")),
            }
        };
        if write_response(&mut write, &response).await.is_err() {
            return;
        }
    }
}

async fn write_response(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    r: &Response,
) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

/// Answers one request; `pub` so the CNI logic is tested without a socket.
pub async fn answer<I: Interception>(
    agent: &NodeAgent<I>,
    pods: Option<&PodDirectory>,
    req: Request,
) -> Response {
    match req {
        Request::CniAdd {
            uid,
            namespace,
            name,
            netns,
        } => cni_add(agent, pods, uid, namespace, name, netns).await,
        Request::CniCheck { uid, netns } => {
            let served = agent.list().await.into_iter().find(|p| p.uid == uid);
            match (served, pods.map(|d| d.contains(&uid))) {
                (Some(p), _) if p.netns == netns => Response::ok(),
                (Some(_), _) => Response::error(format!("pod {uid} is served for another netns")),
                // Not served: fine only for a pod known not to be an agent pod.
                (None, _) => match pods {
                    Some(d) => match d.lookup(&uid, Duration::ZERO).await {
                        Lookup::NotAgent(_) => Response::ok(),
                        Lookup::Agent(_) => {
                            Response::error(format!("agent pod {uid} is not intercepted"))
                        }
                        Lookup::Unknown => Response::error(format!("pod {uid} is unknown")),
                    },
                    None => Response::error(format!("pod {uid} is not served")),
                },
            }
        }
        Request::CniDel { uid } => match agent.remove(&uid).await {
            Ok(()) | Err(PodError::NotFound(_)) => Response::ok(),
            Err(e) => Response::error(e),
        },
        Request::Add { pod } => {
            let uid = pod.uid.clone();
            match agent.add(pod).await {
                Ok(status) => Response {
                    pod: Some(status_json(&status)),
                    ..Response::ok()
                },
                Err(e) => {
                    tracing::warn!(pod = %uid, error = %e, "pod not intercepted");
                    Response::error(e)
                }
            }
        }
        Request::Delete { uid } => match agent.remove(&uid).await {
            Ok(()) => Response::ok(),
            Err(e) => Response::error(e),
        },
        Request::List => Response {
            pods: Some(agent.list().await.iter().map(status_json).collect()),
            ..Response::ok()
        },
    }
}

/// One request to the socket at `path`, for `paddock-proxy node-pods` and the CNI plugin.
pub async fn call(path: &Path, req: &Request) -> std::io::Result<Response> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("node agent socket {}: {e}", path.display()),
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut reply = Vec::new();
    BufReader::new(read)
        .take(MAX_REQUEST as u64 * 64)
        .read_until(b'\n', &mut reply)
        .await?;
    if reply.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the node agent closed the socket without an answer",
        ));
    }
    serde_json::from_slice(&reply).map_err(std::io::Error::other)
}

/// The default socket path for a state directory.
#[must_use]
pub fn default_path(state_dir: &Path) -> PathBuf {
    state_dir.join("pods.sock")
}

async fn cni_add<I: Interception>(
    agent: &NodeAgent<I>,
    pods: Option<&PodDirectory>,
    uid: PodUid,
    namespace: String,
    name: String,
    netns: PathBuf,
) -> Response {
    let Some(dir) = pods else {
        return Response::error(
            "no pod source: the node agent runs without [kubernetes], so it cannot tell which \
             run a pod is",
        );
    };
    match dir.lookup(&uid, dir.cni_wait()).await {
        Lookup::NotAgent(m) if m.namespace == namespace && m.name == name => Response {
            intercepted: Some(false),
            ..Response::ok()
        },
        Lookup::Agent(m) if m.namespace == namespace && m.name == name => {
            let spec = PodSpec {
                uid: m.uid,
                namespace: m.namespace,
                name: m.name,
                run: m.run.unwrap_or_default(),
                netns,
                nameservers: m.nameservers,
                adapter_port: m.adapter_port,
                shell: m.shell,
            };
            match agent.add(spec).await {
                Ok(status) => Response {
                    pod: Some(status_json(&status)),
                    intercepted: Some(true),
                    ..Response::ok()
                },
                Err(e) => {
                    tracing::warn!(pod = %uid, error = %e, "agent pod not intercepted; CNI ADD fails");
                    Response::error(e)
                }
            }
        }
        Lookup::Agent(m) | Lookup::NotAgent(m) => Response::error(format!(
            "pod {uid} is {}/{} in the API server, not {namespace}/{name}",
            m.namespace, m.name
        )),
        Lookup::Unknown => Response {
            retry: true,
            ..Response::error(format!(
                "pod {uid} ({namespace}/{name}) is not in the node agent's view of this node (the \
                 API server is unreachable or has not told it yet); refusing to start it \
                 unintercepted"
            ))
        },
    }
}
