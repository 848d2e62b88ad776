//! `GET /v1/runs/{namespace}/{run}/shell`: an interactive terminal in the run's sandbox, over
//! a WebSocket.
//!
//! Binary messages carry terminal bytes both ways; a text message from the client is a
//! control message, `{"rows": R, "cols": C}`, resizing the terminal. The initial size comes
//! from the query (`?rows=R&cols=C`, default 24x80). The shell is started by the router's
//! [`ShellOpener`](crate::interactive::ShellOpener) (the run's sandbox: its namespaces, cgroup
//! and user, never root) before the 101 is answered, so a shell that cannot start is a 502
//! with the reason. `shell-opened` (who, as which user) is recorded before the caller gets the
//! terminal (an audit outage refuses the shell), and `shell-closed` with its duration when it
//! ends, whichever side ends it.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        protocol::{CloseFrame, Role, frame::coding::CloseCode},
    },
};

use super::{
    State,
    calls::{blocking, broker_error},
    respond::{Resp, error_response},
    websocket::{self, websocket_key},
};
use crate::{
    audit::AuditKind,
    auth::Identity,
    interactive::{ShellError, ShellSession, TermSize},
    wire::{ErrorCode, RunInfo},
};

/// How long starting the shell may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// The terminal size a query asks for (`rows=R&cols=C`, both or neither).
pub(crate) fn query_size(query: Option<&str>) -> Result<TermSize, String> {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(TermSize::default());
    };
    let (mut rows, mut cols) = (None, None);
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        let slot = match &*k {
            "rows" => &mut rows,
            "cols" => &mut cols,
            other => return Err(format!("unknown query parameter {other:?}")),
        };
        if slot.is_some() {
            return Err(format!("{k} given twice"));
        }
        *slot = Some(
            v.parse::<u16>()
                .map_err(|_| format!("{k} must be a number"))?,
        );
    }
    match (rows, cols) {
        (Some(r), Some(c)) => {
            TermSize::checked(r, c).ok_or_else(|| "rows and cols must be 1 to 1000".to_owned())
        }
        _ => Err("give both rows and cols".to_owned()),
    }
}

fn shell_error(e: &ShellError) -> Resp {
    tracing::info!(error = %e, "shell unavailable");
    error_response(ErrorCode::ShellUnavailable, e.to_string())
}

pub(super) async fn open(
    state: &Arc<State>,
    identity: &Identity,
    run: RunInfo,
    mut req: Request<Incoming>,
) -> Resp {
    let Ok(key) = websocket_key(&req) else {
        return error_response(ErrorCode::BadRequest, "not a WebSocket upgrade");
    };
    let size = match query_size(req.uri().query()) {
        Ok(s) => s,
        Err(why) => return error_response(ErrorCode::BadRequest, why),
    };
    let Some(opener) = state.broker.interactive().shell_opener() else {
        return shell_error(&ShellError::NotConfigured(run.run.clone()));
    };
    let Some(slot) = state
        .broker
        .interactive()
        .shell_slot(&run.namespace, &run.run)
    else {
        return error_response(
            ErrorCode::Unavailable,
            format!(
                "{} shells are open in this run already",
                crate::interactive::MAX_SHELLS_PER_RUN
            ),
        );
    };
    let session = match tokio::time::timeout(OPEN_TIMEOUT, opener.open(&run, size)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return shell_error(&e),
        Err(_) => {
            return shell_error(&ShellError::Failed(
                "the sandbox did not start it in time".into(),
            ));
        }
    };
    let (subject, r, user) = (identity.subject.clone(), run.clone(), session.user.clone());
    // Recorded before the caller gets the terminal; on failure the session is dropped here,
    // which ends the shell.
    if let Err(e) = blocking(state, move |b| {
        b.audit_interactive(
            AuditKind::ShellOpened,
            &subject,
            &r.namespace,
            &r.run,
            Some(format!("as {user}")),
        )
    })
    .await
    {
        return broker_error(&e);
    }
    tracing::info!(run = %run.run, user = %session.user, "shell opened");
    let upgrade = hyper::upgrade::on(&mut req);
    let state = state.clone();
    let subject = identity.subject.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let started = Instant::now();
        let how = match upgrade.await {
            Ok(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                relay(ws, session).await
            }
            Err(e) => format!("upgrade failed: {e}"),
        };
        let secs = started.elapsed().as_secs();
        tracing::info!(run = %run.run, secs, %how, "shell closed");
        let reason = format!("after {secs} s: {how}");
        if let Err(e) = blocking(&state, move |b| {
            b.audit_interactive(
                AuditKind::ShellClosed,
                &subject,
                &run.namespace,
                &run.run,
                Some(reason),
            )
        })
        .await
        {
            tracing::error!(error = %e, "audit record of a closed shell failed");
        }
    });
    websocket::accepted(&key)
}

/// How often the server pings the client (a dead client then shows as a failed send).
const PING_EVERY: Duration = Duration::from_secs(30);

/// Copies terminal bytes both ways until either side ends; returns how it ended. The two
/// directions are independent: a shell blocked writing output never stops input from being
/// read, and the reverse.
async fn relay<S>(ws: WebSocketStream<S>, session: ShellSession) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let ShellSession { io, resize, .. } = session;
    let (mut from_shell, mut to_shell) = tokio::io::split(io);
    let (mut sink, mut stream) = ws.split();
    let to_client = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                n = from_shell.read(&mut buf) => match n {
                    Ok(0) | Err(_) => return Some((CloseCode::Normal, "the shell exited")),
                    Ok(n) => {
                        let chunk = Bytes::copy_from_slice(&buf[..n]);
                        if sink.send(Message::Binary(chunk)).await.is_err() {
                            return None;
                        }
                    }
                },
                _ = ping.tick() => {
                    if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                        return None;
                    }
                }
            }
        }
    };
    let from_client = async {
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(Message::Binary(data)) => {
                    if to_shell.write_all(&data).await.is_err() {
                        return Some((CloseCode::Normal, "the shell exited"));
                    }
                }
                Ok(Message::Text(text)) => match serde_json::from_str::<TermSize>(&text) {
                    Ok(s) if TermSize::checked(s.rows, s.cols).is_some() => {
                        if let Some(tx) = &resize {
                            let _ = tx.send(s);
                        }
                    }
                    _ => {
                        return Some((
                            CloseCode::Invalid,
                            "a text message must be {\"rows\":R,\"cols\":C}",
                        ));
                    }
                },
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
        None
    };
    let ended = tokio::select! {
        e = to_client => e,
        e = from_client => e,
    };
    let Some((code, how)) = ended else {
        return "the client closed the terminal".to_owned();
    };
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: how.into(),
        })))
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    how.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_sizes() {
        assert_eq!(query_size(None), Ok(TermSize::default()));
        assert_eq!(query_size(Some("")), Ok(TermSize::default()));
        assert_eq!(
            query_size(Some("rows=50&cols=132")),
            Ok(TermSize {
                rows: 50,
                cols: 132
            })
        );
        for bad in [
            "rows=50",
            "rows=0&cols=80",
            "rows=5000&cols=80",
            "rows=x&cols=80",
            "rows=1&rows=2&cols=3",
            "rows=1&cols=2&user=root",
        ] {
            assert!(query_size(Some(bad)).is_err(), "{bad}");
        }
    }
}
