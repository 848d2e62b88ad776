//! A small HTTPS "API" (Python's http.server, as a real third-party server) in a test-host
//! namespace. It logs every request it receives (path, query, headers) to a root-only file the
//! agent cannot read, and answers with SHA-256 fingerprints of the credentials it got, never
//! the credentials themselves, so a test can check what reached upstream and that nothing the
//! agent sees holds a secret.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use crate::{Netns, pyserver::PyServer};

const SCRIPT: &str = r#"
import hashlib, http.server, json, ssl, sys, urllib.parse, base64
addr, port, cert, key, log = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
def fp(v):
    return None if v is None else "sha256:" + hashlib.sha256(v.encode()).hexdigest()[:16]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        u = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(u.query))
        auth = self.headers.get("authorization")
        basic = None
        if auth and auth.lower().startswith("basic "):
            try: basic = base64.b64decode(auth[6:]).decode()
            except Exception: basic = "undecodable"
        rec = {"host": self.headers.get("host"), "path": u.path, "query": q,
               "authorization": auth, "basic": basic, "x-api-key": self.headers.get("x-api-key")}
        with open(log, "a") as f: f.write(json.dumps(rec) + "\n")
        bearer = auth[7:] if auth and auth.lower().startswith("bearer ") else auth
        body = json.dumps({"path": u.path, "credentials": {
            "authorization": fp(bearer), "x-api-key": fp(self.headers.get("x-api-key")),
            "query key": fp(q.get("key"))}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer((addr, port), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print("ready", flush=True)
s.serve_forever()
"#;

/// The running API; killed on drop.
#[derive(Debug)]
pub struct EchoApi {
    _server: PyServer,
    pub log: PathBuf,
}

impl EchoApi {
    /// Serve on `addr` inside `ns` with `dir/server.{crt,key}`; requests logged to `dir/requests.jsonl`.
    pub fn start(ns: &Netns, dir: &Path, addr: SocketAddr) -> Self {
        let log = dir.join("requests.jsonl");
        let server = PyServer::start(ns, dir, "echo_api.py", SCRIPT, addr, &[log.as_os_str()]);
        Self {
            _server: server,
            log,
        }
    }

    /// Every request logged so far.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}
