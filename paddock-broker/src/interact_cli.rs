//! `paddock-broker prompt|interrupt|end|attach|shell RUN`: drive an interactive run as a person.
//!
//! Talks to a served broker (`--broker https://HOST:PORT`, `--ca` for its certificate) or to
//! the Unix socket of a `paddock-proxy run --adapter-port` (`--socket`), with the bearer read
//! from `--token-file`. Errors say what went wrong in words: run not found, not allowed,
//! adapter gone.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use paddock_broker::wire::{ErrorBody, ErrorCode};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

/// Where the broker is and who is calling.
#[derive(Debug, Args)]
pub struct Target {
    /// A served broker: `https://HOST:PORT`.
    #[arg(long, conflicts_with = "socket", required_unless_present = "socket")]
    broker: Option<String>,
    /// The broker's CA certificate (PEM) for `--broker` (default: the public web roots).
    #[arg(long, requires = "broker")]
    ca: Option<PathBuf>,
    /// The interactive socket of `paddock-proxy run` (`<state>/<run>/interact.sock`).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// File holding the bearer (for `run`: `<state>/<run>/interact.key`).
    #[arg(long, env = "PADDOCK_TOKEN_FILE")]
    token_file: PathBuf,
    /// The run's namespace.
    #[arg(long, short = 'n', default_value = "local")]
    namespace: String,
    /// The run.
    run: String,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Path segment characters left as they are.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_');

impl Target {
    fn path(&self, action: &str) -> String {
        format!(
            "/v1/runs/{}/{}/{action}",
            utf8_percent_encode(&self.namespace, SEGMENT),
            utf8_percent_encode(&self.run, SEGMENT)
        )
    }

    fn bearer(&self) -> anyhow::Result<String> {
        let text = std::fs::read_to_string(&self.token_file)
            .with_context(|| format!("reading {}", self.token_file.display()))?;
        let token = text.trim();
        if token.is_empty() {
            bail!("{} is empty", self.token_file.display());
        }
        Ok(token.to_owned())
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Io>> {
        if let Some(socket) = &self.socket {
            let s = tokio::net::UnixStream::connect(socket)
                .await
                .with_context(|| {
                    format!(
                        "connecting to {} (is the run still running?)",
                        socket.display()
                    )
                })?;
            return Ok(Box::new(s));
        }
        let url = url::Url::parse(self.broker.as_deref().unwrap_or_default())
            .context("--broker must be a URL such as https://broker:8443")?;
        if url.scheme() != "https" {
            bail!("--broker must be https://");
        }
        let host = url.host_str().context("--broker has no host")?.to_owned();
        let port = url.port().unwrap_or(443);
        let config = tls_config(self.ca.as_deref())?;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .with_context(|| format!("connecting to {host}:{port}"))?;
        let name = ServerName::try_from(host.clone()).context("broker host name")?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS to {host}:{port}"))?;
        Ok(Box::new(tls))
    }
}

fn tls_config(ca: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading {}", path.display()))?
            {
                roots
                    .add(cert.with_context(|| format!("parsing {}", path.display()))?)
                    .context("adding the CA")?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// A refusal in words a person can act on.
fn explain(status: StatusCode, body: &[u8], target: &Target) -> anyhow::Error {
    let run = format!("{}/{}", target.namespace, target.run);
    let Ok(err) = serde_json::from_slice::<ErrorBody>(body) else {
        return anyhow::anyhow!("the broker answered HTTP {status}");
    };
    match err.code {
        ErrorCode::NotFound => anyhow::anyhow!("run {run} not found: {}", err.message),
        ErrorCode::Forbidden => anyhow::anyhow!("not allowed: {}", err.message),
        ErrorCode::Unauthenticated => {
            anyhow::anyhow!(
                "the broker did not accept the token in {}",
                target.token_file.display()
            )
        }
        ErrorCode::AdapterUnavailable => {
            anyhow::anyhow!("the adapter of run {run} is gone: {}", err.message)
        }
        ErrorCode::ShellUnavailable => {
            anyhow::anyhow!("no shell in run {run}: {}", err.message)
        }
        code => anyhow::anyhow!("{code}: {}", err.message),
    }
}

/// POSTs to one of the run's routes; returns the answer's JSON.
pub async fn post(
    target: &Target,
    action: &str,
    body: Option<String>,
) -> anyhow::Result<serde_json::Value> {
    let bearer = target.bearer()?;
    let io = target.connect().await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .context("HTTP handshake with the broker")?;
    tokio::spawn(conn);
    let mut req = Request::post(target.path(action))
        .header(header::HOST, "broker")
        .header(header::AUTHORIZATION, format!("Bearer {bearer}"));
    if body.is_some() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .context("request")?;
    let resp = sender
        .send_request(req)
        .await
        .context("calling the broker")?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .context("reading the answer")?
        .to_bytes();
    if !status.is_success() {
        return Err(explain(status, &bytes, target));
    }
    serde_json::from_slice(&bytes).context("the broker's answer is not JSON")
}

pub async fn prompt(target: &Target, text: &str) -> anyhow::Result<()> {
    let body = serde_json::json!({ "text": text }).to_string();
    let answer = post(target, "prompts", Some(body)).await?;
    println!("prompt {} delivered", answer["seq"]);
    Ok(())
}

/// Streams the run's output to stdout until the broker closes the stream.
pub async fn attach(target: &Target) -> anyhow::Result<()> {
    let bearer = target.bearer()?;
    let io = target.connect().await?;
    let mut req = format!("ws://broker{}", target.path("attach"))
        .into_client_request()
        .context("request")?;
    req.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {bearer}").parse().context("bearer")?,
    );
    let (mut ws, _) = match tokio_tungstenite::client_async(req, io).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            return Err(explain(resp.status(), &body, target));
        }
        Err(e) => return Err(e).context("attaching"),
    };
    let mut out = std::io::stdout();
    while let Some(msg) = ws.next().await {
        match msg.context("the stream broke")? {
            Message::Binary(data) => {
                out.write_all(&data)?;
                out.flush()?;
            }
            Message::Text(text) => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            Message::Close(frame) => {
                if let Some(f) = frame {
                    eprintln!("paddock-broker: stream closed: {}", f.reason);
                }
                break;
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// The operator's terminal in raw mode for as long as this lives (restored on drop).
struct RawTerminal {
    saved: rustix::termios::Termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        if !rustix::termios::isatty(&stdin) {
            return None;
        }
        let saved = rustix::termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Flush, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Flush,
            &self.saved,
        );
    }
}

fn terminal_size() -> Option<(u16, u16)> {
    let ws = rustix::termios::tcgetwinsize(std::io::stdout()).ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// An interactive shell in the run's sandbox. Stdin goes to the shell (on a terminal in raw
/// mode, resized with the window; from a pipe, followed by an end-of-file character when
/// the pipe ends), the shell's terminal output to stdout, until the shell exits.
pub async fn shell(target: &Target) -> anyhow::Result<()> {
    let bearer = target.bearer()?;
    let io = target.connect().await?;
    let path = match terminal_size() {
        Some((rows, cols)) => format!("{}?rows={rows}&cols={cols}", target.path("shell")),
        None => target.path("shell"),
    };
    let mut req = format!("ws://broker{path}")
        .into_client_request()
        .context("request")?;
    req.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {bearer}").parse().context("bearer")?,
    );
    let (ws, _) = match tokio_tungstenite::client_async(req, io).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            return Err(explain(resp.status(), &body, target));
        }
        Err(e) => return Err(e).context("opening the shell"),
    };
    let raw = RawTerminal::enter();
    let interactive = raw.is_some();
    let (mut sink, mut stream) = ws.split();
    // Stdin is read on its own thread: a blocking read cannot be cancelled, and the process
    // exits when the shell does, whatever that thread is doing.
    let (tx, mut input) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; 4096];
        loop {
            match std::io::Read::read(&mut stdin, &mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(None);
                    return;
                }
                Ok(n) => {
                    if tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .context("SIGWINCH")?;
    let mut out = std::io::stdout();
    let mut input_open = true;
    let closed = loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(data))) => {
                    out.write_all(&data)?;
                    out.flush()?;
                }
                Some(Ok(Message::Close(frame))) => break frame.map(|f| f.reason.to_string()),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    drop(raw);
                    return Err(e).context("the shell's stream broke");
                }
                None => break None,
            },
            chunk = input.recv(), if input_open => {
                if let Some(Some(data)) = chunk {
                    if sink.send(Message::Binary(data.into())).await.is_err() {
                        break None;
                    }
                } else {
                    input_open = false;
                    if !interactive {
                        // End of the piped input: ^D, as a person would type it.
                        let _ = sink.send(Message::Binary(Bytes::from_static(b"\x04"))).await;
                    }
                }
            },
            _ = winch.recv(), if interactive => {
                if let Some((rows, cols)) = terminal_size() {
                    let size = serde_json::json!({ "rows": rows, "cols": cols }).to_string();
                    let _ = sink.send(Message::Text(size.into())).await;
                }
            }
        }
    };
    drop(raw);
    let _ = sink.close().await;
    if let Some(reason) = closed.filter(|r| r != "the shell exited") {
        eprintln!("paddock-broker: shell closed: {reason}");
    }
    Ok(())
}
