//! A smart-HTTP git server (`git http-backend` behind a small Python HTTPS front) in a
//! test-host namespace. It demands Basic auth `git:<password>` (401 with a challenge
//! otherwise, as real forges do, so git sends its credentials) and logs the decoded
//! credentials it receives to a root-only file.

use std::{
    ffi::OsStr,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Netns, pyserver::PyServer};

const SCRIPT: &str = r#"
import base64, http.server, os, ssl, subprocess, sys
addr, port, cert, key, root, password, log = sys.argv[1], int(sys.argv[2]), *sys.argv[3:8]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def handle_any(self):
        auth = self.headers.get("authorization") or ""
        user = None
        if auth.lower().startswith("basic "):
            try: user = base64.b64decode(auth[6:]).decode()
            except Exception: user = "undecodable"
        with open(log, "a") as f: f.write((user or "-") + "\n")
        if user != "git:" + password:
            body = b"auth required\n"
            self.send_response(401)
            self.send_header("www-authenticate", 'Basic realm="git"')
            self.send_header("content-length", str(len(body)))
            self.end_headers(); self.wfile.write(body); return
        path, _, query = self.path.partition("?")
        n = int(self.headers.get("content-length") or 0)
        data = self.rfile.read(n) if n else b""
        env = dict(os.environ, GIT_PROJECT_ROOT=root, GIT_HTTP_EXPORT_ALL="1", PATH_INFO=path,
                   QUERY_STRING=query, REQUEST_METHOD=self.command, REMOTE_USER="git",
                   CONTENT_TYPE=self.headers.get("content-type") or "", CONTENT_LENGTH=str(len(data)))
        out = subprocess.run(["git", "http-backend"], input=data, env=env, capture_output=True).stdout
        head, _, body = out.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.split(b"\r\n"):
            k, _, v = line.decode().partition(":")
            if k.lower() == "status": status = int(v.strip().split()[0])
            elif k: headers.append((k, v.strip()))
        self.send_response(status)
        for k, v in headers: self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    do_GET = handle_any
    do_POST = handle_any
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer((addr, port), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
s.serve_forever()
"#;

/// The running server; killed on drop.
#[derive(Debug)]
pub struct GitServer {
    _server: PyServer,
    pub log: PathBuf,
}

impl GitServer {
    /// Serve the repositories under `dir/repos` on `addr` inside `ns`, with `dir/server.{crt,key}`.
    pub fn start(ns: &Netns, dir: &Path, addr: SocketAddr, password: &str) -> Self {
        let log = dir.join("git-auth.log");
        let repos = dir.join("repos");
        let args = [repos.as_os_str(), OsStr::new(password), log.as_os_str()];
        let server = PyServer::start(ns, dir, "git_server.py", SCRIPT, addr, &args);
        Self {
            _server: server,
            log,
        }
    }

    /// Create `dir/repos/NAME.git` holding one commit with `README` = `content`.
    pub fn create_repo(dir: &Path, name: &str, content: &str) {
        let git = |args: &[&str], cwd: &Path| {
            let out = Command::new("git")
                .args([
                    "-c",
                    "user.name=t",
                    "-c",
                    "user.email=t@t",
                    "-c",
                    "init.defaultBranch=main",
                ])
                .args(args)
                .current_dir(cwd)
                .output()
                .expect("run git");
            assert!(
                out.status.success(),
                "git {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let repos = dir.join("repos");
        std::fs::create_dir_all(&repos).expect("repos dir");
        let work = dir.join(format!("{name}-work"));
        std::fs::create_dir_all(&work).expect("work dir");
        git(&["init", "-q"], &work);
        std::fs::write(work.join("README"), content).expect("write README");
        git(&["add", "README"], &work);
        git(&["commit", "-q", "-m", "first"], &work);
        let bare = repos.join(format!("{name}.git"));
        git(
            &[
                "clone",
                "-q",
                "--bare",
                work.to_str().expect("utf-8"),
                bare.to_str().expect("utf-8"),
            ],
            dir,
        );
    }

    /// Every decoded `user:password` (or `-`) the server saw, in order.
    pub fn auth_log(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}
