//! Unique, short names: interface names are limited to 15 bytes.

use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, at most 12 bytes plus `tag` (keep tags short).
#[must_use]
pub fn unique(tag: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("pd{:x}{n:x}{tag}", std::process::id() % 0xfffff)
}

/// A small number unique per call in this process, for carving test subnets.
#[must_use]
pub fn next_index() -> u32 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_unique_and_short() {
        let a = super::unique("ab");
        let b = super::unique("ab");
        assert_ne!(a, b);
        assert!(a.len() <= 15, "{a}");
    }
}
