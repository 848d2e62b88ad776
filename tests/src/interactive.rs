//! Interactive runs: a small adapter for the command of `paddock-proxy run --adapter-port`, and
//! a client of the run's interactive socket (HTTP and the attach WebSocket over a Unix socket).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest},
};

/// The adapter, run as the intercepted command: `python3 -c ADAPTER_PY PORT`. It answers each
/// prompt on its output stream (`answer SEQ from SUBMITTER: TEXT-IN-CAPITALS`), says
/// `interrupted` on an interrupt, and on `/end` closes its output streams, stops listening,
/// lingers `ADAPTER_LINGER` seconds (default 0) and exits 0.
pub const ADAPTER_PY: &str = r#"
import json, os, queue, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

listeners = []
lock = threading.Lock()

def broadcast(item):
    with lock:
        for q in listeners:
            q.put(item)

class Adapter(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        if self.path != "/output":
            self.send_error(404)
            return
        q = queue.Queue()
        with lock:
            listeners.append(q)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        try:
            while True:
                item = q.get()
                if item is None:
                    break
                data = item.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        finally:
            with lock:
                listeners.remove(q)
        self.close_connection = True
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.path == "/prompts":
            p = json.loads(body)
            print("adapter got", json.dumps(p, sort_keys=True), flush=True)
            self.reply({"ok": True})
            broadcast("answer %d from %s: %s\n" % (p["seq"], p["submitter"], p["text"].upper()))
        elif self.path == "/interrupt":
            self.reply({"ok": True})
            broadcast("interrupted\n")
        elif self.path == "/end":
            self.reply({"ok": True})
            broadcast(None)
            threading.Thread(target=server.shutdown).start()
        else:
            self.send_error(404)

server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Adapter)
server.daemon_threads = True
print("adapter listening", flush=True)
server.serve_forever()
server.server_close()
time.sleep(float(os.environ.get("ADAPTER_LINGER", "0")))
print("adapter done", flush=True)
"#;

/// A caller of a run's interactive socket.
#[derive(Debug, Clone)]
pub struct InteractClient {
    pub socket: PathBuf,
    pub bearer: String,
    pub namespace: String,
    pub run: String,
}

/// Waits (bounded) until `path` exists.
pub fn wait_for_file(path: &Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl InteractClient {
    fn path(&self, action: &str) -> String {
        format!("/v1/runs/{}/{}/{action}", self.namespace, self.run)
    }

    /// POSTs to one of the run's routes; returns the status and the JSON answer.
    pub async fn post(&self, action: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let io = UnixStream::connect(&self.socket).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let mut req = hyper::Request::post(self.path(action))
            .header("host", "broker")
            .header("authorization", format!("Bearer {}", self.bearer));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))
            .expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(40), sender.send_request(req))
            .await
            .expect("answer in time")
            .expect("answer");
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    /// Opens the attach stream; `Err(status)` when the broker refused the upgrade.
    pub async fn attach(&self) -> Result<WebSocketStream<UnixStream>, u16> {
        let io = UnixStream::connect(&self.socket).await.expect("connect");
        let mut req = format!("ws://broker{}", self.path("attach"))
            .into_client_request()
            .expect("request");
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.bearer).parse().expect("header"),
        );
        match tokio_tungstenite::client_async(req, io).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("attach failed: {e}"),
        }
    }

    /// Attaches, retrying (bounded) while the adapter is not up yet (502).
    pub async fn attach_when_up(&self, limit: Duration) -> WebSocketStream<UnixStream> {
        let deadline = Instant::now() + limit;
        loop {
            match self.attach().await {
                Ok(ws) => return ws,
                Err(502) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => panic!("attach refused with {status}"),
            }
        }
    }
}

/// Reads an attach stream until its text contains `needle` (bounded); returns what it read.
/// A close frame ends the read; its reason is appended as `[closed: REASON]`.
pub async fn read_until(
    ws: &mut WebSocketStream<UnixStream>,
    needle: &str,
    limit: Duration,
) -> String {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + limit;
    while !seen.contains(needle) {
        let Ok(msg) = tokio::time::timeout_at(deadline, ws.next()).await else {
            panic!("{needle:?} did not arrive; got {seen:?}");
        };
        match msg {
            Some(Ok(Message::Binary(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
            Some(Ok(Message::Text(t))) => seen.push_str(&t),
            Some(Ok(Message::Close(f))) => {
                seen.push_str("[closed: ");
                seen.push_str(&f.map(|f| f.reason.to_string()).unwrap_or_default());
                seen.push(']');
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("stream error {e}; got {seen:?}"),
            None => break,
        }
    }
    seen
}
