//! Giving the heap back after bursts of freed connection state.
//!
//! A parked connection drops its HTTP server (about 20 KiB) and a closed one all it held,
//! but glibc's allocator returns freed memory to the system only from the top of the heap:
//! after a burst of requests the servers' buffers leave holes between the TLS state of
//! connections that are still open, and the process keeps them resident. A background
//! thread checks once a second whether enough was freed since its last look and, if so,
//! calls `malloc_trim`, which releases the free pages inside the heap. A thread rather than
//! a task: it serves every runtime of the process and holds the allocator's locks only
//! while it walks the free lists.

use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Freed bytes worth a trim.
const TRIM_AFTER_BYTES: u64 = 8 * 1024 * 1024;
/// How often the trimming thread looks.
const TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// Freed bytes noted since the last trim.
static FREED: AtomicU64 = AtomicU64::new(0);
static TRIMMER: Once = Once::new();

/// Notes about `bytes` of connection state freed (starts the trimming thread the first time).
pub(crate) fn freed(bytes: u64) {
    FREED.fetch_add(bytes, Ordering::Relaxed);
    TRIMMER.call_once(|| {
        let started = std::thread::Builder::new()
            .name("heap-trim".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(TRIM_INTERVAL);
                    if take_due(&FREED) {
                        let released = crate::sys::release_free_heap();
                        tracing::debug!(released, "returned free heap pages to the system");
                    }
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "no heap trimming thread: freed memory stays resident");
        }
    });
}

/// Whether enough was freed for a trim; if so, counting starts again.
fn take_due(freed: &AtomicU64) -> bool {
    freed
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n >= TRIM_AFTER_BYTES).then_some(0)
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_is_due_once_enough_was_freed_and_counting_starts_again() {
        let freed = AtomicU64::new(0);
        assert!(!take_due(&freed));
        freed.fetch_add(TRIM_AFTER_BYTES - 1, Ordering::Relaxed);
        assert!(!take_due(&freed), "not yet");
        freed.fetch_add(1, Ordering::Relaxed);
        assert!(take_due(&freed));
        assert_eq!(freed.load(Ordering::Relaxed), 0);
        assert!(!take_due(&freed), "counting started again");
    }
}
