//! A small HTTPS "API" (Python's http.server, as a real third-party server) in a test-host
//! namespace. It logs every request it receives (path, query, headers) to a root-only file the
//! agent cannot read, and answers with SHA-256 fingerprints of the credentials it got, never
//! the credentials themselves, so a test can check what reached upstream and that nothing the
//! agent sees holds a secret.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    Netns,
    process::{Placement, place},
};

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
    child: Child,
    pub log: PathBuf,
}

impl EchoApi {
    /// Serve on `addr` inside `ns` with `dir/server.{crt,key}`; requests logged to `dir/requests.jsonl`.
    pub fn start(ns: &Netns, dir: &Path, addr: SocketAddr) -> Self {
        let script = dir.join("echo_api.py");
        std::fs::write(&script, SCRIPT).expect("write script");
        let log = dir.join("requests.jsonl");
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(dir.join("server.crt"))
            .arg(dir.join("server.key"))
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        place(
            &mut cmd,
            &Placement {
                netns: Some(ns),
                cgroup: None,
                user: None,
            },
        );
        // Owned by the guard at once, so every path below kills and reaps it.
        let api = Self {
            child: cmd.spawn().expect("start python3 API"),
            log,
        };
        // Ready when it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let up = ns
                .run(move || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                })
                .unwrap_or(false);
            if up {
                return api;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the test API did not start on {addr}");
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

impl Drop for EchoApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
