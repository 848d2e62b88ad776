//! The async runtime of the long-running commands (`run`, `serve`, `node`) and how many
//! worker threads it gets.
//!
//! Default: half the CPUs this process may use (`available_parallelism`, which honours
//! affinity masks and cgroup CPU quotas), at least one. The proxy shares its machine with
//! the agents it serves (and, in `run` and in the labs, with their upstreams), and every
//! request it forwards wakes one of them twice. Measured with `cargo xtask bench workers`
//! (BENCHMARKS.md), a second worker on a 2-CPU machine costs 15 to 25 % more CPU per
//! keep-alive request (idle workers parking and waking each other) and serves no more.
//! ztunnel (2 workers) and linkerd2-proxy (1, or its CPU limit) size their node and sidecar
//! proxies the same way, below the machine. `--worker-threads` or `PADDOCK_WORKER_THREADS`
//! sets it.

use std::num::NonZeroUsize;

/// The environment variable that sets the worker threads (the `--worker-threads` flag wins).
pub const WORKER_THREADS_ENV: &str = "PADDOCK_WORKER_THREADS";

/// tokio's own variable, which earlier releases left to the runtime and documented for
/// operators; still honoured when neither the flag nor [`WORKER_THREADS_ENV`] is set.
pub const TOKIO_WORKER_THREADS_ENV: &str = "TOKIO_WORKER_THREADS";

/// The worker threads to start: `configured` (the flag or [`WORKER_THREADS_ENV`]), else
/// `tokio_env` (the value of [`TOKIO_WORKER_THREADS_ENV`]), else the default.
///
/// # Errors
/// `tokio_env` is set but is not a positive whole number.
pub fn resolve(
    configured: Option<NonZeroUsize>,
    tokio_env: Option<&std::ffi::OsStr>,
) -> Result<NonZeroUsize, String> {
    if let Some(n) = configured {
        return Ok(n);
    }
    match tokio_env {
        None => Ok(default_here()),
        Some(raw) => raw
            .to_str()
            .and_then(|v| v.trim().parse::<NonZeroUsize>().ok())
            .ok_or_else(|| {
                format!(
                    "{TOKIO_WORKER_THREADS_ENV}={} is not a positive number of worker threads",
                    raw.to_string_lossy()
                )
            }),
    }
}

/// Worker threads for a process that may use `cpus` CPUs.
#[must_use]
pub fn default_worker_threads(cpus: NonZeroUsize) -> NonZeroUsize {
    NonZeroUsize::new(cpus.get() / 2).unwrap_or(NonZeroUsize::MIN)
}

/// The default for this process: [`default_worker_threads`] of the CPUs it may use.
#[must_use]
pub fn default_here() -> NonZeroUsize {
    default_worker_threads(std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN))
}

/// The runtime for `threads` workers (I/O and timers on); blocking work still goes to tokio's
/// blocking pool.
///
/// One worker gets tokio's current-thread scheduler, which runs every task on the thread that
/// calls `block_on`: a multi-threaded runtime with one worker still pays for what several
/// would need (its tasks' wakers go through the shared inject queue and atomics, and the
/// `block_on` thread and the worker wake each other). Measured in the peers lab
/// (BENCHMARKS.md, "What moved the peers numbers"), the current-thread runtime spent about
/// 8 % less CPU per keep-alive request and served about 10 % more. Nothing on the proxy's
/// async path may block for that to be safe; the one synchronous client that must
/// (the broker's `postgres` store) steps out to a thread of its own on this flavour.
///
/// # Errors
/// The runtime could not start (no threads, no epoll instance).
pub fn build(threads: NonZeroUsize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == NonZeroUsize::MIN {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.get())
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: usize) -> NonZeroUsize {
        NonZeroUsize::new(v).expect("non-zero")
    }

    #[test]
    fn the_default_is_half_the_cpus_and_never_zero() {
        assert_eq!(default_worker_threads(n(1)), n(1));
        assert_eq!(default_worker_threads(n(2)), n(1));
        assert_eq!(default_worker_threads(n(3)), n(1));
        assert_eq!(default_worker_threads(n(8)), n(4));
        assert_eq!(default_worker_threads(n(64)), n(32));
    }

    #[test]
    fn a_configured_count_wins_over_the_default() {
        assert_eq!(resolve(Some(n(7)), None), Ok(n(7)));
        let cpus = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
        assert_eq!(resolve(None, None), Ok(default_worker_threads(cpus)));
    }

    #[test]
    fn tokios_own_variable_is_honoured_below_ours_and_checked() {
        use std::ffi::OsStr;
        assert_eq!(resolve(Some(n(3)), Some(OsStr::new("5"))), Ok(n(3)));
        assert_eq!(resolve(None, Some(OsStr::new("5"))), Ok(n(5)));
        assert_eq!(resolve(None, None), Ok(default_here()));
        for bad in ["0", "two", "-1", ""] {
            let err = resolve(None, Some(OsStr::new(bad))).expect_err(bad);
            assert!(err.contains("TOKIO_WORKER_THREADS"), "{err}");
        }
    }

    #[test]
    fn the_runtime_runs_the_workers_it_was_given() {
        use tokio::runtime::RuntimeFlavor;
        let rt = build(n(3)).expect("runtime");
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(rt.metrics().num_workers(), 3);
        assert_eq!(rt.block_on(async { 40 + 2 }), 42);
    }

    #[test]
    fn one_worker_is_the_current_thread_and_still_has_a_blocking_pool() {
        use tokio::runtime::RuntimeFlavor;
        let rt = build(n(1)).expect("runtime");
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        let main = std::thread::current().id();
        let (on_main, off_main) = rt.block_on(async move {
            let spawned = tokio::spawn(async move { std::thread::current().id() == main });
            let blocking = tokio::task::spawn_blocking(move || std::thread::current().id() != main);
            (
                spawned.await.expect("task"),
                blocking.await.expect("blocking"),
            )
        });
        assert!(on_main, "spawned tasks run on the block_on thread");
        assert!(off_main, "blocking work runs on a thread of its own");
    }
}
