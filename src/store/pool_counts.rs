//! One pool's shared in-flight counts as policies use them: fail-open, fast, and self-repairing.
//!
//! [`PoolCounts`] wraps an [`InflightStore`] for one pool and is what the request path calls:
//!
//! - [`PoolCounts::acquire`] — one store round trip (bounded by the store's timeout) that picks the
//!   least loaded candidate and counts it. A timeout or error makes the caller fall back to a local
//!   choice for this request; after [`TRIP_AFTER`](super::breaker::TRIP_AFTER) consecutive
//!   failures the [`Breaker`] opens and requests skip the store without waiting at all.
//! - [`PoolCounts::release`] — updates local bookkeeping at once and sends the store call from a
//!   spawned task, so a slow store never delays the end of a response.
//! - [`PoolCounts::tick`] — called by [`CountsService`](super::CountsService) every heartbeat
//!   interval: the heartbeat that keeps this replica alive, and the breaker's probe.
//!
//! # Staying exact when calls fail
//!
//! `held[e]` is what this replica really has in flight to endpoint `e` through the store (acquired
//! and not yet released). A call whose effect on the store is unknown (timed out, cancelled,
//! failed) or skipped (release while the breaker is open), and a store that lost its data, would
//! leave the shared counts wrong forever — Higress's leak. Any such event marks the counts *dirty*
//! for the next [`REPAIR_TICKS`] ticks: each tick that finds no store call of this pool in flight
//! sends `held` with [`InflightStore::restore`] instead of a plain heartbeat, replacing this
//! replica's contribution with the truth. Calls on one connection execute in order, so a call sent
//! before the snapshot is overwritten by it; a call *started* while the restore is under way may
//! not be, so such a restore does not count towards the repair. Several restores, not one, because
//! a call stuck on a connection the client gave up on may still reach Redis a moment later (a
//! paused server resuming).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::breaker::Breaker;
use super::{InflightStore, StoreError};
use crate::telemetry;

/// Quiet restores after the last failure before the store is trusted again.
pub const REPAIR_TICKS: u32 = 3;

/// Why a request was not counted in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Every candidate is at the cap (`maxRequestCount`): refuse the request.
    Saturated,
    /// The store could not be used; choose locally. The reason is a metric label.
    Fallback(&'static str),
}

/// A pool's view of the shared in-flight counts. Share it behind an `Arc`.
pub struct PoolCounts {
    store: Arc<dyn InflightStore>,
    pool: String,
    /// Endpoint labels (`ip:port`) indexed like the pool's endpoints.
    labels: Vec<String>,
    /// Per endpoint: counts this replica holds in the store.
    held: Vec<AtomicU64>,
    /// Store calls of this pool in flight (acquires and releases).
    pending: AtomicUsize,
    /// Store calls of this pool ever started.
    started: AtomicU64,
    /// Restores still due before the store is trusted to agree with `held` again.
    repairs_due: AtomicU32,
    breaker: Breaker,
}

/// Marks one store call in flight; marks the counts dirty if dropped before [`Call::done`].
struct Call<'a> {
    counts: &'a PoolCounts,
    done: bool,
}

impl<'a> Call<'a> {
    fn start(counts: &'a PoolCounts) -> Self {
        counts.pending.fetch_add(1, Ordering::SeqCst);
        counts.started.fetch_add(1, Ordering::SeqCst);
        Call {
            counts,
            done: false,
        }
    }

    fn done(mut self) {
        self.done = true;
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Cancelled mid-call (the client went away): the store may or may not have counted.
            self.counts.mark_dirty();
        }
        self.counts.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PoolCounts {
    /// Counts for `pool` whose endpoints are `labels`, kept in `store`.
    pub fn new(store: Arc<dyn InflightStore>, pool: &str, labels: Vec<String>) -> Self {
        telemetry::set_store_breaker(pool, false);
        PoolCounts {
            held: labels.iter().map(|_| AtomicU64::new(0)).collect(),
            store,
            pool: pool.to_owned(),
            labels,
            pending: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            repairs_due: AtomicU32::new(0),
            breaker: Breaker::default(),
        }
    }

    /// The store behind these counts.
    pub fn store(&self) -> &Arc<dyn InflightStore> {
        &self.store
    }

    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// Whether requests currently skip the store.
    pub fn breaker_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// Requests this replica holds in the store, over all endpoints.
    pub fn held_total(&self) -> u64 {
        self.held.iter().map(|h| h.load(Ordering::SeqCst)).sum()
    }

    /// Pick the least loaded of `candidates` (endpoint indices) over all replicas and count one
    /// more for it. Returns the chosen endpoint index and its in-flight count after counting.
    pub async fn acquire(
        &self,
        candidates: &[usize],
        max: Option<u64>,
    ) -> Result<(usize, u64), Skip> {
        if self.breaker.is_open() {
            return Err(Skip::Fallback("store_breaker_open"));
        }
        let labels: Vec<&str> = candidates
            .iter()
            .filter_map(|i| self.labels.get(*i).map(String::as_str))
            .collect();
        if labels.len() != candidates.len() || labels.is_empty() {
            return Err(Skip::Fallback("store_error"));
        }
        let call = Call::start(self);
        let started = Instant::now();
        let result = self.store.acquire_least(&self.pool, &labels, max).await;
        telemetry::store_call(&self.pool, "acquire", outcome(&result), started.elapsed());
        let verdict = match result {
            Ok(a) => match candidates.get(a.index) {
                Some(&index) => {
                    self.held[index].fetch_add(1, Ordering::SeqCst);
                    self.on_success();
                    Ok((index, a.inflight))
                }
                None => {
                    self.on_failure(&StoreError::Protocol("index out of range".into()));
                    Err(Skip::Fallback("store_error"))
                }
            },
            Err(StoreError::Saturated) => {
                self.on_success();
                Err(Skip::Saturated)
            }
            Err(e) => {
                self.on_failure(&e);
                Err(Skip::Fallback(fallback_reason(&e)))
            }
        };
        call.done();
        verdict
    }

    /// Release one count of endpoint `index` acquired with [`PoolCounts::acquire`]. Returns at
    /// once; the store call runs in a spawned task.
    pub fn release(self: &Arc<Self>, index: usize) {
        let (Some(held), Some(label)) = (self.held.get(index), self.labels.get(index)) else {
            return;
        };
        let _ = held.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        let runtime = tokio::runtime::Handle::try_current();
        let (false, Ok(runtime)) = (self.breaker.is_open(), runtime) else {
            // Skipped: the next ticks restore the truth.
            self.mark_dirty();
            return;
        };
        let this = self.clone();
        let label = label.clone();
        this.pending.fetch_add(1, Ordering::SeqCst);
        this.started.fetch_add(1, Ordering::SeqCst);
        runtime.spawn(async move {
            let started = Instant::now();
            let result = this.store.release(&this.pool, &label).await;
            telemetry::store_call(&this.pool, "release", outcome(&result), started.elapsed());
            match result {
                Ok(()) => this.on_success(),
                Err(e) => this.on_failure(&e),
            }
            this.pending.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// Heartbeat (or restore, when dirty and quiet) once; also the breaker's probe.
    pub async fn tick(&self) {
        let started_before = self.started.load(Ordering::SeqCst);
        let restore = self.is_dirty() && self.pending.load(Ordering::SeqCst) == 0;
        let t = Instant::now();
        let (op, result) = if restore {
            let held: Vec<(&str, u64)> = self
                .labels
                .iter()
                .zip(&self.held)
                .map(|(l, h)| (l.as_str(), h.load(Ordering::SeqCst)))
                .collect();
            ("restore", self.store.restore(&self.pool, &held).await)
        } else {
            ("heartbeat", self.store.heartbeat(&self.pool).await)
        };
        telemetry::store_call(&self.pool, op, outcome(&result), t.elapsed());
        match result {
            Ok(()) => {
                if restore && self.started.load(Ordering::SeqCst) == started_before {
                    let _ =
                        self.repairs_due
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                    log::debug!(
                        "pool {}: this replica's in-flight counts restored",
                        self.pool
                    );
                }
                self.on_success();
            }
            Err(e) => self.on_failure(&e),
        }
    }

    /// Withdraw this replica's whole contribution (at shutdown, once nothing is held).
    pub async fn withdraw(&self) -> Result<(), StoreError> {
        self.store.restore(&self.pool, &[]).await
    }

    /// Record one failed call, as a sick store would (tests of the fallback path).
    #[cfg(test)]
    pub(crate) fn trip_for_test(&self) {
        self.on_failure(&StoreError::Timeout);
    }

    fn on_success(&self) {
        if self.breaker.success() {
            telemetry::set_store_breaker(&self.pool, false);
            log::info!(
                "pool {}: state store {} reachable again; shared counting resumed",
                self.pool,
                self.store.kind()
            );
        }
    }

    fn mark_dirty(&self) {
        self.repairs_due.store(REPAIR_TICKS, Ordering::SeqCst);
    }

    fn is_dirty(&self) -> bool {
        self.repairs_due.load(Ordering::SeqCst) > 0
    }

    fn on_failure(&self, e: &StoreError) {
        self.mark_dirty();
        if self.breaker.failure() {
            telemetry::set_store_breaker(&self.pool, true);
            log::warn!(
                "pool {}: state store {} failing ({e}); routing on local counts until it answers",
                self.pool,
                self.store.kind()
            );
        } else {
            log::debug!("pool {}: state store call failed: {e}", self.pool);
        }
    }
}

/// The `reason` label of a fallback caused by `e`.
fn fallback_reason(e: &StoreError) -> &'static str {
    match e {
        StoreError::Timeout => "store_timeout",
        _ => "store_error",
    }
}

/// The `result` label of a store call.
fn outcome<T>(r: &Result<T, StoreError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(StoreError::Saturated) => "saturated",
        Err(StoreError::Timeout) => "timeout",
        Err(_) => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn counts(n: usize) -> (Arc<PoolCounts>, MemoryStore) {
        let store = MemoryStore::new();
        let labels = (0..n).map(|i| format!("ep{i}")).collect();
        let counts = PoolCounts::new(Arc::new(store.clone()), "p", labels);
        (Arc::new(counts), store)
    }

    async fn totals(store: &MemoryStore, n: usize) -> Vec<u64> {
        let labels: Vec<String> = (0..n).map(|i| format!("ep{i}")).collect();
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        store.inflight("p", &refs).await.expect("inflight")
    }

    async fn settle(counts: &PoolCounts) {
        while counts.pending.load(Ordering::SeqCst) > 0 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn acquire_and_release_keep_store_and_held_in_step() {
        let (c, store) = counts(3);
        let mut picks = Vec::new();
        for _ in 0..6 {
            picks.push(c.acquire(&[0, 1, 2], None).await.expect("acquire").0);
        }
        assert_eq!(totals(&store, 3).await, vec![2, 2, 2]);
        assert_eq!(c.held_total(), 6);
        for i in picks {
            c.release(i);
        }
        settle(&c).await;
        assert_eq!(totals(&store, 3).await, vec![0, 0, 0]);
        assert_eq!(c.held_total(), 0);
        assert!(!c.is_dirty());
    }

    #[tokio::test]
    async fn saturation_is_a_verdict_not_a_failure() {
        let (c, _) = counts(1);
        c.acquire(&[0], Some(1)).await.expect("room");
        assert_eq!(c.acquire(&[0], Some(1)).await, Err(Skip::Saturated));
        assert!(!c.breaker_open());
        assert_eq!(c.held_total(), 1);
    }

    #[tokio::test]
    async fn a_dirty_tick_restores_what_is_held() {
        let (c, store) = counts(2);
        c.acquire(&[0], None).await.expect("acquire");
        // Someone (a lost release, a restarted store) left the store wrong.
        store
            .acquire_least("p", &["ep1"], None)
            .await
            .expect("stray");
        store
            .acquire_least("p", &["ep1"], None)
            .await
            .expect("stray");
        assert_eq!(totals(&store, 2).await, vec![1, 2]);
        c.tick().await;
        assert_eq!(
            totals(&store, 2).await,
            vec![1, 2],
            "clean: plain heartbeat"
        );
        c.mark_dirty();
        c.tick().await;
        assert_eq!(totals(&store, 2).await, vec![1, 0]);
        // A straggler lands after the first repair: the next ones undo it too.
        store
            .acquire_least("p", &["ep1"], None)
            .await
            .expect("late");
        for _ in 1..REPAIR_TICKS {
            assert!(c.is_dirty());
            c.tick().await;
        }
        assert_eq!(totals(&store, 2).await, vec![1, 0]);
        assert!(!c.is_dirty());
    }

    #[tokio::test]
    async fn release_without_a_runtime_or_with_the_breaker_open_is_deferred() {
        let (c, store) = counts(1);
        c.acquire(&[0], None).await.expect("acquire");
        for _ in 0..crate::store::TRIP_AFTER {
            c.trip_for_test();
        }
        assert!(c.breaker_open());
        assert_eq!(
            c.acquire(&[0], None).await,
            Err(Skip::Fallback("store_breaker_open"))
        );
        c.release(0);
        assert_eq!(c.held_total(), 0);
        assert_eq!(totals(&store, 1).await, vec![1], "not sent while open");
        // The probe succeeds: the breaker closes and the skipped release is restored.
        c.tick().await;
        assert!(!c.breaker_open());
        assert_eq!(totals(&store, 1).await, vec![0]);
    }
}
