//! A loopback HTTP server for the tests, and assertions shared by them.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use paddock_broker::auth::AuthError;

/// What the handler sees of a request.
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub body: Bytes,
}

type Handler = dyn Fn(&Seen) -> (u16, String) + Send + Sync;

/// An HTTP/1 server on 127.0.0.1:0 answering with `handler`, counting requests per path.
pub struct TestServer {
    pub addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    /// How long each answer is held back (a slow server).
    delay: Arc<Mutex<std::time::Duration>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(
        handler: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static,
    ) -> TestServer {
        Self::serve(handler, None).await
    }

    /// Same, over TLS with `tls.server`.
    pub async fn start_tls(
        handler: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static,
        tls: &TestTls,
    ) -> TestServer {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.server));
        Self::serve(handler, Some(acceptor)).await
    }

    async fn serve(
        handler: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let delay: Arc<Mutex<std::time::Duration>> = Arc::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let task_hits = Arc::clone(&hits);
        let task_delay = Arc::clone(&delay);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let hits = Arc::clone(&task_hits);
                let delay = Arc::clone(&task_delay);
                let handler = Arc::clone(&handler);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let hits = Arc::clone(&hits);
                        let handler = Arc::clone(&handler);
                        let delay = *delay.lock().expect("delay");
                        async move {
                            tokio::time::sleep(delay).await;
                            let method = req.method().to_string();
                            let path = req.uri().path().to_owned();
                            let query = req.uri().query().map(str::to_owned);
                            let authorization = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            let body = req.into_body().collect().await?.to_bytes();
                            *hits.lock().expect("hits").entry(path.clone()).or_default() += 1;
                            let seen = Seen {
                                method,
                                path,
                                query,
                                authorization,
                                body,
                            };
                            let (status, body) = handler(&seen);
                            let response = Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                                .expect("response");
                            Ok::<_, hyper::Error>(response)
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        TestServer {
            addr,
            hits,
            delay,
            task,
        }
    }

    /// Holds every later answer back by `delay`.
    pub fn set_delay(&self, delay: std::time::Duration) {
        *self.delay.lock().expect("delay") = delay;
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .expect("hits")
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A throwaway CA and a server certificate for 127.0.0.1 signed by it.
pub struct TestTls {
    pub ca_pem: String,
    pub server: Arc<rustls::ServerConfig>,
}

pub fn test_tls() -> TestTls {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
        .expect("ca cert");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf cert");
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .expect("server config");
    TestTls {
        ca_pem: ca.pem(),
        server: Arc::new(server),
    }
}

/// RFC 7468 PEM text of `der`.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// The error and its `Debug` never quote the bearer (nor a long piece of it).
pub fn assert_no_bearer(err: &AuthError, bearer: &str) {
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(bearer), "error quotes the bearer: {shown}");
    for piece in bearer.split('.').filter(|p| p.len() >= 12) {
        assert!(
            !shown.contains(piece),
            "error quotes part of the bearer: {shown}"
        );
    }
}
