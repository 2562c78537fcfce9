//! A circuit breaker in front of the state store.
//!
//! Closed, every request may call the store. After [`TRIP_AFTER`] consecutive failures it opens:
//! requests skip the store entirely (and fall back to a local choice) while the background
//! heartbeat keeps probing it; the first successful call closes it again. A dead store therefore
//! costs a few requests one timeout each, then nothing until it is back.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Consecutive failed store calls that open the breaker.
pub const TRIP_AFTER: u32 = 3;

/// The breaker state; lock-free, shared by every request of a pool.
#[derive(Debug, Default)]
pub(crate) struct Breaker {
    failures: AtomicU32,
    open: AtomicBool,
}

impl Breaker {
    /// Whether requests should skip the store.
    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// Record a failed call. Returns true when this call opened the breaker.
    pub(crate) fn failure(&self) -> bool {
        let n = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        n >= TRIP_AFTER && !self.open.swap(true, Ordering::Relaxed)
    }

    /// Record a successful call. Returns true when this call closed the breaker.
    pub(crate) fn success(&self) -> bool {
        self.failures.store(0, Ordering::Relaxed);
        self.open.swap(false, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_closes_on_success() {
        let b = Breaker::default();
        assert!(!b.failure());
        assert!(!b.failure());
        assert!(!b.is_open());
        assert!(b.failure(), "the third failure opens it");
        assert!(b.is_open());
        assert!(!b.failure(), "already open");
        assert!(b.success(), "a success closes it");
        assert!(!b.is_open());
        assert!(!b.success());
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = Breaker::default();
        b.failure();
        b.failure();
        b.success();
        b.failure();
        b.failure();
        assert!(!b.is_open());
    }
}
