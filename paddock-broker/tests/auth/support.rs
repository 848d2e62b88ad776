//! A loopback HTTP server for the tests, and assertions shared by them.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use paddock_broker::auth::AuthError;

/// What the handler sees of a request.
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub body: Bytes,
}

type Handler = dyn Fn(&Seen) -> (u16, String) + Send + Sync;

/// An HTTP/1 server on 127.0.0.1:0 answering with `handler`, counting requests per path.
pub struct TestServer {
    pub addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(
        handler: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static,
    ) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let task_hits = Arc::clone(&hits);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let hits = Arc::clone(&task_hits);
                let handler = Arc::clone(&handler);
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let hits = Arc::clone(&hits);
                        let handler = Arc::clone(&handler);
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().path().to_owned();
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
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestServer { addr, hits, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
