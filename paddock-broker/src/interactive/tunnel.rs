//! Node mode: reaching a pod's adapter (or a shell in it) through its node agent's tunnel.
//!
//! Each node agent keeps one outbound connection to the broker, upgraded to an HTTP/2
//! connection on which the broker is the client ([`crate::wire::tunnel`]). The broker never
//! dials a pod: to reach a run it asks the API server which node the run's pod is on (the
//! same [`PodLocator`] that places node agents' substitutions, never the node agent's word),
//! and opens a `CONNECT` stream on that node's tunnel. The node agent checks the pod is one
//! it serves and takes the adapter port from the pod (never from this request), so a caller
//! chooses nothing but the run.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::TokioIo;

use super::{
    AdapterConnector, AdapterError, AdapterFuture, AdapterIo, ShellError, ShellFuture, ShellOpener,
    ShellSession, TermSize, lock,
};
use crate::{
    auth::pods::PodLocator,
    wire::{RunInfo, tunnel},
};

/// How long opening a stream through a tunnel may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// Tunnels kept per node.
const MAX_TUNNELS_PER_NODE: usize = 8;
/// Longest reason read from a node agent's refusal.
const MAX_REASON_BYTES: usize = 4096;

type Sender = SendRequest<Empty<Bytes>>;

/// The connected node agents' tunnels, by node name.
#[derive(Default)]
pub struct NodeTunnels {
    by_node: Mutex<HashMap<String, Vec<(u64, Sender)>>>,
    next: AtomicU64,
}

impl fmt::Debug for NodeTunnels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTunnels")
            .field("nodes", &self.nodes())
            .finish()
    }
}

/// What a stream through a tunnel opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Open {
    Adapter,
    Shell(TermSize),
}

/// An open stream: its bytes, and for a shell who it runs as and its session id.
pub struct Opened {
    pub io: TokioIo<hyper::upgrade::Upgraded>,
    /// The tunnel it was opened on.
    pub tunnel: u64,
    pub user: Option<String>,
    pub shell_id: Option<String>,
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opened")
            .field("user", &self.user)
            .field("shell_id", &self.shell_id)
            .finish_non_exhaustive()
    }
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the node agent of {0} is not connected to this broker")]
    NotConnected(String),
    #[error("the node agent of {node} refused: {reason}")]
    Refused { node: String, reason: String },
    #[error("the tunnel to {node} failed: {reason}")]
    Broken { node: String, reason: String },
    #[error("the tunnel to {0} did not answer in time")]
    Timeout(String),
}

impl NodeTunnels {
    /// Records one of `node`'s tunnels. A node may hold several (one per address of this
    /// replica, or a node agent being replaced): new streams use the newest that is open, and
    /// none pushes another out, so two never take turns replacing each other. Beyond
    /// `MAX_TUNNELS_PER_NODE` (8) the oldest is let go. Returns the id [`Self::remove`] takes.
    pub fn register(&self, node: &str, sender: Sender) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut map = lock(&self.by_node);
        let tunnels = map.entry(node.to_owned()).or_default();
        tunnels.retain(|(_, s)| !s.is_closed());
        tunnels.push((id, sender));
        if tunnels.len() > MAX_TUNNELS_PER_NODE {
            tunnels.remove(0);
        }
        id
    }

    /// Forgets the tunnel `id` of `node` (its connection ended).
    pub fn remove(&self, node: &str, id: u64) {
        let mut map = lock(&self.by_node);
        if let Some(tunnels) = map.get_mut(node) {
            tunnels.retain(|(t, _)| *t != id);
            if tunnels.is_empty() {
                map.remove(node);
            }
        }
    }

    /// The newest open tunnel of `node`, or the one `id` names.
    fn sender(&self, node: &str, id: Option<u64>) -> Result<(u64, Sender), TunnelError> {
        lock(&self.by_node)
            .get(node)
            .and_then(|tunnels| {
                tunnels
                    .iter()
                    .rev()
                    .find(|(t, s)| id.map_or(!s.is_closed(), |id| *t == id))
                    .cloned()
            })
            .ok_or_else(|| TunnelError::NotConnected(node.to_owned()))
    }

    /// Nodes with a tunnel, sorted.
    #[must_use]
    pub fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = lock(&self.by_node).keys().cloned().collect();
        nodes.sort();
        nodes
    }

    /// Opens a stream to `what` in the pod `pod_uid` of `run` on `node`; the stream's bytes,
    /// and the answer's [`tunnel::USER`] header for a shell.
    pub async fn open(
        &self,
        node: &str,
        pod_uid: &str,
        run: &RunInfo,
        what: Open,
    ) -> Result<Opened, TunnelError> {
        let (id, sender) = self.sender(node, None)?;
        tokio::time::timeout(
            OPEN_TIMEOUT,
            Self::open_on(sender, id, node, pod_uid, run, what),
        )
        .await
        .map_err(|_| TunnelError::Timeout(node.to_owned()))?
    }

    async fn open_on(
        mut sender: Sender,
        tunnel: u64,
        node: &str,
        pod_uid: &str,
        run: &RunInfo,
        what: Open,
    ) -> Result<Opened, TunnelError> {
        let broken = |reason: String| TunnelError::Broken {
            node: node.to_owned(),
            reason,
        };
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri("paddock-node-agent:443")
            .header(tunnel::NAMESPACE, &run.namespace)
            .header(tunnel::RUN, &run.run)
            .header(tunnel::POD_UID, pod_uid);
        req = match what {
            Open::Adapter => req.header(tunnel::OPEN, tunnel::OPEN_ADAPTER),
            Open::Shell(size) => req
                .header(tunnel::OPEN, tunnel::OPEN_SHELL)
                .header(tunnel::ROWS, size.rows)
                .header(tunnel::COLS, size.cols),
        };
        let req = req.body(Empty::new()).map_err(|e| broken(e.to_string()))?;
        sender.ready().await.map_err(|e| broken(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| broken(e.to_string()))?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let reason = Limited::new(resp.into_body(), MAX_REASON_BYTES)
                .collect()
                .await
                .map(|c| String::from_utf8_lossy(&c.to_bytes()).trim().to_owned())
                .unwrap_or_default();
            return Err(TunnelError::Refused {
                node: node.to_owned(),
                reason: if reason.is_empty() {
                    format!("HTTP {status}")
                } else {
                    reason
                },
            });
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (user, shell_id) = (header(tunnel::USER), header(tunnel::SHELL_ID));
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| broken(e.to_string()))?;
        Ok(Opened {
            io: TokioIo::new(upgraded),
            tunnel,
            user,
            shell_id,
        })
    }

    /// Resizes the terminal of the shell `shell_id` opened on `node`'s tunnel `tunnel_id`
    /// (the node agent that holds the shell).
    pub async fn resize(
        &self,
        node: &str,
        tunnel_id: u64,
        shell_id: &str,
        size: TermSize,
    ) -> Result<(), TunnelError> {
        let (_, mut sender) = self.sender(node, Some(tunnel_id))?;
        let broken = |reason: String| TunnelError::Broken {
            node: node.to_owned(),
            reason,
        };
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("https://paddock-node-agent{}", tunnel::RESIZE_PATH))
            .header(tunnel::SHELL_ID, shell_id)
            .header(tunnel::ROWS, size.rows)
            .header(tunnel::COLS, size.cols)
            .body(Empty::new())
            .map_err(|e| broken(e.to_string()))?;
        let answer = tokio::time::timeout(OPEN_TIMEOUT, async {
            sender.ready().await?;
            sender.send_request(req).await
        })
        .await
        .map_err(|_| TunnelError::Timeout(node.to_owned()))?
        .map_err(|e| broken(e.to_string()))?;
        if answer.status().is_success() {
            Ok(())
        } else {
            Err(TunnelError::Refused {
                node: node.to_owned(),
                reason: format!("resize: HTTP {}", answer.status()),
            })
        }
    }
}

/// The connector and shell opener of a broker serving node mode: the run's pod from the API
/// server, then a stream on its node's tunnel.
#[derive(Debug)]
pub struct TunnelRoute {
    pub locator: Arc<PodLocator>,
    pub tunnels: Arc<NodeTunnels>,
}

impl TunnelRoute {
    async fn open(&self, run: &RunInfo, what: Open) -> Result<(Opened, String), String> {
        let pod = self
            .locator
            .locate(&run.namespace, &run.run)
            .await
            .map_err(|e| format!("where is the run's pod: {e}"))?;
        let opened = self
            .tunnels
            .open(&pod.node, &pod.uid, run, what)
            .await
            .map_err(|e| e.to_string())?;
        Ok((opened, pod.node))
    }
}

impl AdapterConnector for TunnelRoute {
    fn connect<'a>(&'a self, run: &'a RunInfo) -> AdapterFuture<'a> {
        Box::pin(async move {
            let (opened, _) = self
                .open(run, Open::Adapter)
                .await
                .map_err(AdapterError::Unreachable)?;
            Ok(Box::new(opened.io) as AdapterIo)
        })
    }
}

impl ShellOpener for TunnelRoute {
    fn open<'a>(&'a self, run: &'a RunInfo, size: TermSize) -> ShellFuture<'a> {
        Box::pin(async move {
            let (opened, node) = TunnelRoute::open(self, run, Open::Shell(size))
                .await
                .map_err(ShellError::Failed)?;
            // Resizes go to the node agent as their own requests on the tunnel, in order.
            let tunnel = opened.tunnel;
            let resize = opened.shell_id.map(|id| {
                let (tx, mut rx) = tokio::sync::watch::channel(size);
                let tunnels = Arc::clone(&self.tunnels);
                tokio::spawn(async move {
                    while rx.changed().await.is_ok() {
                        let size = *rx.borrow_and_update();
                        if let Err(e) = tunnels.resize(&node, tunnel, &id, size).await {
                            tracing::debug!(error = %e, "shell resize not delivered");
                        }
                    }
                });
                tx
            });
            Ok(ShellSession {
                io: Box::new(opened.io) as AdapterIo,
                resize,
                user: opened.user.unwrap_or_else(|| "the pod's user".into()),
            })
        })
    }
}
