//! An HTTPS "API" that negotiates HTTP/2 (nginx with ALPN `h2` and `http/1.1`) in a test-host
//! namespace. Like [`crate::echo_api::EchoApi`] it records what it *received* in a root-only
//! file the agent cannot read, here nginx's access log in JSON: per request the protocol
//! (`HTTP/2.0` or `HTTP/1.1`), the `Authorization` and `x-api-key` headers, the query string,
//! the nginx connection serial and, for uploads, the file holding the request body. Its
//! answers carry no credential: `GET` answers `proto=... path=... conn=...`; `POST` and `PUT`
//! under `/upload` keep the whole body on disk (`client_body_in_file_only`) and answer
//! `stored N bytes`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Netns, proxied::Nginx};

/// One request as nginx saw it (a line of its access log).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Seen {
    /// `$server_protocol`: `HTTP/2.0` or `HTTP/1.1`.
    pub proto: String,
    pub method: String,
    /// `$uri`: the path, without the query.
    pub path: String,
    /// `$args`: the raw query string.
    pub args: String,
    pub authorization: String,
    pub x_api_key: String,
    /// `$connection`: the serial number of the client connection (the proxy's upstream hop).
    pub connection: String,
    /// `$request_body_file`: where the body was kept (uploads only).
    pub body_file: String,
    pub status: String,
}

impl Seen {
    /// The value of query parameter `name`, if present.
    #[must_use]
    pub fn query(&self, name: &str) -> Option<&str> {
        self.args
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// nginx's `listen` parameters and server directive that turn HTTP/2 on: `listen ... http2`
/// before 1.25.1, `http2 on;` from then on (the old form is deprecated there).
fn http2_syntax() -> (&'static str, &'static str) {
    let out = Command::new("nginx")
        .arg("-v")
        .output()
        .expect("run nginx -v (apt-get install nginx-light)");
    // "nginx version: nginx/1.22.1" (on stderr).
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    let version: Vec<u32> = text
        .rsplit('/')
        .next()
        .unwrap_or("")
        .trim()
        .split('.')
        .map_while(|p| p.parse().ok())
        .collect();
    assert!(version.len() >= 2, "cannot parse `nginx -v`: {text}");
    if version.as_slice() >= [1, 25, 1].as_slice() {
        (" ssl", "http2 on;")
    } else {
        (" ssl http2", "")
    }
}

/// The running API; nginx is stopped on drop.
#[derive(Debug)]
pub struct H2Api {
    _nginx: Nginx,
    /// The access log (JSON lines).
    pub log: PathBuf,
}

impl H2Api {
    /// Serve TLS on `addr` inside `ns` with `dir/server.{crt,key}`; the access log goes to
    /// `dir/h2-access.jsonl` and upload bodies to `dir/h2-tmp/body`.
    pub fn start(ns: &Netns, dir: &Path, addr: SocketAddr) -> Self {
        let (listen_params, http2_on) = http2_syntax();
        let tmp = dir.join("h2-tmp");
        std::fs::create_dir_all(&tmp).expect("h2 tmp dir");
        let log = dir.join("h2-access.jsonl");
        let d = dir.display();
        let t = tmp.display();
        // The upload sink listens on loopback inside the namespace: nginx keeps the body file
        // only when a module reads the body, and proxying it is one every nginx build has.
        let sink = "127.0.0.1:8081";
        let conf = format!(
            r#"
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format seen escape=json '{{"proto":"$server_protocol","method":"$request_method",'
        '"path":"$uri","args":"$args","authorization":"$http_authorization",'
        '"x_api_key":"$http_x_api_key","connection":"$connection",'
        '"body_file":"$request_body_file","status":"$status"}}';
    client_body_temp_path {t}/body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    server {{
        listen {addr}{listen_params};
        {http2_on}
        access_log {log} seen;
        ssl_certificate {d}/server.crt;
        ssl_certificate_key {d}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size 64m;
        location /upload {{
            client_body_in_file_only on;
            proxy_pass http://{sink};
        }}
        location / {{
            default_type text/plain;
            return 200 "proto=$server_protocol path=$uri conn=$connection\n";
        }}
    }}
    server {{
        listen {sink};
        access_log off;
        location / {{
            default_type text/plain;
            return 200 "stored $content_length bytes\n";
        }}
    }}
}}
"#,
            log = log.display(),
        );
        let nginx = Nginx::start_config(ns, dir, &conf, addr);
        Self { _nginx: nginx, log }
    }

    /// Every request logged so far (nginx logs a request when it completes).
    #[must_use]
    pub fn requests(&self) -> Vec<Seen> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("access log line {l:?}: {e}"))
            })
            .collect()
    }
}
