//! Serving a connection until it ends or a drain signal asks it to finish gracefully.

use std::pin::Pin;

use super::quiet::Quiet;

/// Runs `conn` to completion, switching it to graceful shutdown if `shutdown` fires first.
pub(crate) async fn drive<C, S>(
    conn: C,
    shutdown: S,
    graceful: impl FnOnce(Pin<&mut C>),
) -> C::Output
where
    C: Future,
    S: Future<Output = ()>,
{
    tokio::pin!(conn);
    tokio::pin!(shutdown);
    // Polled on every wake-up of the task, and ready about never (see `quiet`).
    let mut shutdown = Quiet::new(shutdown);
    tokio::select! {
        biased;
        out = conn.as_mut() => return out,
        () = &mut shutdown => graceful(conn.as_mut()),
    }
    conn.await
}
