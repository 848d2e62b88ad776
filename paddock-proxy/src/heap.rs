//! Giving the heap back after bursts of freed connection state.
//!
//! A parked connection drops its HTTP server (about 20 KiB), but glibc's allocator returns
//! freed memory to the system only from the top of the heap: after a burst of requests the
//! servers' buffers leave holes between the TLS state of connections that are still open,
//! and the process keeps them resident. After enough of them were freed, and at most once a
//! second, `malloc_trim` releases the free pages inside the heap (on a blocking thread: it
//! holds the allocator's locks while it walks the free lists).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Freed bytes worth a trim.
const TRIM_AFTER_BYTES: u64 = 8 * 1024 * 1024;
/// Fewest milliseconds between two trims.
const TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// Counts freed bytes and decides when a trim is due.
#[derive(Debug)]
pub(crate) struct Trimmer {
    freed: AtomicU64,
    /// Milliseconds since `base` of the last trim (0: none yet).
    last_ms: AtomicU64,
}

impl Trimmer {
    const fn new() -> Self {
        Self {
            freed: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Notes `bytes` freed at `now_ms`; `true` when the caller should trim now (then only
    /// one caller gets `true` until the next interval).
    fn note(&self, bytes: u64, now_ms: u64) -> bool {
        let freed = self.freed.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if freed < TRIM_AFTER_BYTES {
            return false;
        }
        let last = self.last_ms.load(Ordering::Acquire);
        let interval = u64::try_from(TRIM_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if last != 0 && now_ms.saturating_sub(last) < interval {
            return false;
        }
        if self
            .last_ms
            .compare_exchange(last, now_ms.max(1), Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        self.freed.store(0, Ordering::Release);
        true
    }
}

static TRIMMER: Trimmer = Trimmer::new();

fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Notes about `bytes` of connection state freed; trims the heap on a blocking thread when
/// enough was. Must be called inside a tokio runtime.
pub(crate) fn freed(bytes: u64) {
    if TRIMMER.note(bytes, now_ms()) {
        tokio::task::spawn_blocking(|| {
            let released = crate::sys::release_free_heap();
            tracing::debug!(released, "returned free heap pages to the system");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_enough_was_freed_and_not_more_than_once_an_interval() {
        let t = Trimmer::new();
        let step = TRIM_AFTER_BYTES / 4;
        assert!(!t.note(step, 10));
        assert!(!t.note(step, 20));
        assert!(!t.note(step, 30));
        assert!(t.note(step, 40), "the fourth quarter makes a trim");
        assert!(!t.note(TRIM_AFTER_BYTES, 500), "within the interval");
        assert!(!t.note(0, 900));
        assert!(
            t.note(0, 1040),
            "what was freed meanwhile is trimmed after the interval"
        );
        assert!(!t.note(step, 5000), "counting starts again after a trim");
    }
}
