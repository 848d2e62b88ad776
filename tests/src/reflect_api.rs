//! A hostile-but-allowed upstream (Python's http.server, as a real third-party server) in a
//! test-host namespace: it reflects what it was sent, the way debug echo endpoints and error
//! pages do, over HTTPS and plain HTTP. Every request it received and every body it answered
//! is logged to a root-only file the agent cannot read, so a test can show the upstream really
//! did hand the secret back (the attack) while the agent only saw its placeholder.
//!
//! Endpoints: `/anything` (httpbin-style JSON of all headers and the query, plus the
//! `Authorization` and `x-api-key` values in `X-Echo-*` response headers), `/b64` (the
//! `Authorization` value base64-encoded), `/gzip` (the `/anything` JSON gzip-compressed,
//! whatever `Accept-Encoding` said), `/stored` (the last `Authorization` it saw, to a request
//! without one), `/sse` (server-sent events that carry the `Authorization` value split across
//! two writes), and `Range` support on `/anything` (a partial answer).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use crate::{Netns, pyserver::PyServer};

const SCRIPT: &str = r#"
import base64, gzip, http.server, json, ssl, sys, threading, time, urllib.parse
addr, port, cert, key, plain_port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6]
last = {"auth": None}
lock = threading.Lock()
def record(rec):
    with lock:
        with open(log, "a") as f: f.write(json.dumps(rec) + "\n")
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        u = urllib.parse.urlsplit(self.path)
        auth = self.headers.get("authorization")
        if auth: last["auth"] = auth
        tls = isinstance(self.connection, ssl.SSLSocket)
        rec = {"tls": tls, "host": self.headers.get("host"), "path": u.path, "query": u.query,
               "authorization": auth, "x-api-key": self.headers.get("x-api-key"),
               "x-token": self.headers.get("x-token"),
               "accept-encoding": self.headers.get("accept-encoding"),
               "range": self.headers.get("range")}
        echo = json.dumps({"headers": dict(self.headers.items()), "args": u.query})
        if u.path == "/sse":
            a = auth or ""
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("connection", "close")
            self.end_headers()
            parts = ["data: start\n\n", "data: " + a[: len(a) // 2], a[len(a) // 2 :] + "\n\n"]
            for p in parts:
                self.wfile.write(p.encode()); self.wfile.flush(); time.sleep(0.2)
            rec["sent"] = "".join(parts)
            record(rec)
            self.close_connection = True
            return
        headers = {"content-type": "application/json"}
        if u.path == "/b64":
            body = base64.b64encode((auth or "").encode())
        elif u.path == "/gzip":
            body = gzip.compress(echo.encode()); headers["content-encoding"] = "gzip"
        elif u.path == "/stored":
            body = json.dumps({"last_authorization": last["auth"]}).encode()
        else:
            body = echo.encode()
            if auth: headers["x-echo-authorization"] = auth
            if self.headers.get("x-api-key"): headers["x-echo-api-key"] = self.headers.get("x-api-key")
        status = 200
        rng = self.headers.get("range")
        if rng and rng.startswith("bytes=") and u.path == "/anything":
            a, b = rng[6:].split("-")
            start, end = int(a), min(int(b), len(body) - 1)
            headers["content-range"] = "bytes %d-%d/%d" % (start, end, len(body))
            body = body[start : end + 1]; status = 206
        rec["sent"] = body.decode("latin-1") if u.path != "/gzip" else gzip.decompress(body).decode()
        record(rec)
        self.send_response(status)
        for k, v in headers.items(): self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
tls_server = http.server.ThreadingHTTPServer((addr, port), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
tls_server.socket = ctx.wrap_socket(tls_server.socket, server_side=True)
plain_server = http.server.ThreadingHTTPServer((addr, plain_port), H)
threading.Thread(target=plain_server.serve_forever, daemon=True).start()
print("ready", flush=True)
tls_server.serve_forever()
"#;

/// The running API; killed on drop.
#[derive(Debug)]
pub struct ReflectApi {
    _server: PyServer,
    pub log: PathBuf,
}

impl ReflectApi {
    /// Serve HTTPS on `tls` and plain HTTP on the same address at `plain_port`, inside `ns`,
    /// with `dir/server.{crt,key}`; requests and answers logged to `dir/reflect.jsonl`.
    pub fn start(ns: &Netns, dir: &Path, tls: SocketAddr, plain_port: u16) -> Self {
        let log = dir.join("reflect.jsonl");
        let plain = plain_port.to_string();
        let server = PyServer::start(
            ns,
            dir,
            "reflect_api.py",
            SCRIPT,
            tls,
            &[plain.as_ref(), log.as_os_str()],
        );
        Self {
            _server: server,
            log,
        }
    }

    /// Every request logged so far, with what was answered in `sent`.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}
