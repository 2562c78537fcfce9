//! One pool's shared in-flight counts as policies use them: fail-open, fast, and self-repairing.
//!
//! [`PoolCounts`] wraps an [`InflightStore`] for one pool and is what the request path calls:
//!
//! - [`PoolCounts::acquire`] — one store round trip that picks the least loaded candidate and
//!   counts it, bounded as a whole by the store's call timeout ([`PoolCounts::acquire_prefix`]:
//!   the same for `prefix_cache`, choosing by prefix first). A timeout or error makes the
//!   caller fall back to a local choice for this request; after
//!   [`TRIP_AFTER`](super::breaker::TRIP_AFTER) consecutive failures the [`Breaker`] opens and
//!   requests skip the store without waiting at all.
//! - [`PoolCounts::release`] — sends the store call from a spawned task, so a slow store never
//!   delays the end of a response. A store that defers releases (Redis: they ride on the pool's
//!   next call) is flushed 2 ms after a release if no call has taken it by then, so
//!   other replicas see it within milliseconds even when no request follows.
//! - [`PoolCounts::tick`] — called by the [`heartbeat`](super::heartbeat) loop every heartbeat
//!   interval: the heartbeat that keeps this replica alive, the repair described below, the
//!   breaker's probe, and the global in-flight view (`llmlb_endpoint_inflight_global`).
//!
//! # Staying exact when calls fail
//!
//! `held[e]` is what this replica really holds in the store for endpoint `e` (acquired and not yet
//! released). It is keyed by the endpoint's label (`ip:port`), not by a position in one endpoint
//! list, so one `PoolCounts` outlives configuration reloads and DNS changes: requests still in
//! flight on a previous generation's endpoints release against the same counts. A call whose effect is unknown (timed out or cancelled — Redis may still execute
//! it), a release skipped while the breaker is open, a store that lost its data (restart,
//! failover) or a client library that silently re-sent a script would leave the shared counts
//! wrong for as long as this replica lives — Higress's leak. So every tick is a
//! [`InflightStore::restore`]: it replaces this replica's contribution with `held`.
//!
//! For the snapshot of `held` to match the store, no store call of this pool may be in flight
//! while the restore runs. Store calls hold a read guard of `gate` across the call and update
//! `held` under it; the tick holds the write guard across the restore. On the request path this
//! costs an uncontended read lock, and at worst one restore round trip once per tick. A call that
//! timed out may still reach the store after the restore; the next tick undoes it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::RwLock;

use super::breaker::Breaker;
use super::{
    Acquired, CostAcquired, CostQuery, InflightStore, PrefixAcquired, PrefixQuery, StoreError,
};
use crate::config::PrefixSettings;
use crate::telemetry::{self, FallbackReason};

/// Why a request was not counted in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Every candidate is at the cap (`maxRequestCount`): refuse the request.
    Saturated,
    /// The store could not be used; choose locally. The reason is a metric label.
    Fallback(FallbackReason),
}

/// A store answer that names a chosen candidate.
trait Chosen {
    /// Index into the candidates.
    fn index(&self) -> usize;
}

impl Chosen for Acquired {
    fn index(&self) -> usize {
        self.index
    }
}

impl Chosen for CostAcquired {
    fn index(&self) -> usize {
        self.index
    }
}

impl Chosen for PrefixAcquired {
    fn index(&self) -> usize {
        self.index
    }
}

/// A pool's view of the shared in-flight counts. Share it behind an `Arc`.
pub struct PoolCounts {
    store: Arc<dyn InflightStore>,
    pool: String,
    /// Per endpoint label: counts this replica holds in the store (no zero entries). Changed only
    /// under a `gate` guard.
    held: Mutex<HashMap<String, u64>>,
    /// The pool's current endpoints, whose totals each tick exports as the global in-flight view.
    endpoints: Mutex<Vec<String>>,
    /// Store calls read-lock it; a restore write-locks it (see the module docs).
    gate: RwLock<()>,
    breaker: Breaker,
    /// A flush of deferred releases is scheduled.
    flushing: AtomicBool,
}

impl PoolCounts {
    /// Counts for `pool`, kept in `store`.
    pub fn new(store: Arc<dyn InflightStore>, pool: &str) -> Self {
        telemetry::set_store_breaker(pool, false);
        PoolCounts {
            held: Mutex::new(HashMap::new()),
            endpoints: Mutex::new(Vec::new()),
            store,
            pool: pool.to_owned(),
            gate: RwLock::new(()),
            breaker: Breaker::default(),
            flushing: AtomicBool::new(false),
        }
    }

    /// The store behind these counts.
    pub fn store(&self) -> &Arc<dyn InflightStore> {
        &self.store
    }

    /// The pool these counts are for.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// Requests this replica holds in the store, over all endpoints.
    pub fn held_total(&self) -> u64 {
        self.held.lock().values().sum()
    }

    /// The pool's current endpoints (labels), reported by each tick's global view.
    pub fn set_endpoints(&self, labels: Vec<String>) {
        *self.endpoints.lock() = labels;
    }

    /// What this replica holds for `label`.
    pub fn held(&self, label: &str) -> u64 {
        self.held.lock().get(label).copied().unwrap_or(0)
    }

    /// Pick the least loaded of `candidates` (endpoint labels) over all replicas and count one
    /// more for it. Returns the chosen candidate's position in `candidates`.
    pub async fn acquire(&self, candidates: &[&str], max: Option<u64>) -> Result<usize, Skip> {
        self.ready(candidates)?;
        let call = self.store.acquire_least(&self.pool, candidates, max);
        let (index, _) = self.counted("acquire", candidates, |_| 1, call).await?;
        Ok(index)
    }

    /// [`InflightStore::acquire_cost`]: the candidate of least cost over all replicas (or the
    /// sticky key's), whose count grows by its weight. Returns the chosen candidate's position
    /// and the answer; release with [`PoolCounts::release_n`] and that weight.
    pub async fn acquire_cost(&self, q: CostQuery<'_>) -> Result<(usize, CostAcquired), Skip> {
        self.ready(q.candidates)?;
        let call = self.store.acquire_cost(&self.pool, q);
        let weight = |i: usize| q.weights.get(i).copied().unwrap_or(1).max(1);
        self.counted("acquire_cost", q.candidates, weight, call)
            .await
    }

    /// [`InflightStore::acquire_prefix`] over `candidates` (endpoint labels): the holder of the
    /// longest prefix of `chain` unless the guard diverts, counted like [`PoolCounts::acquire`].
    /// Returns the chosen candidate's position and how it was chosen. With `sole`, the chosen
    /// endpoint becomes the chain's only holder ([`PrefixQuery::sole`]).
    pub async fn acquire_prefix(
        &self,
        candidates: &[&str],
        chain: &[u64],
        max: Option<u64>,
        settings: PrefixSettings,
        sole: bool,
    ) -> Result<(usize, PrefixAcquired), Skip> {
        self.ready(candidates)?;
        let query = PrefixQuery {
            chain,
            candidates,
            max,
            guard: settings.guard,
            ttl: settings.ttl,
            sole,
        };
        let call = self.store.acquire_prefix(&self.pool, query);
        self.counted("acquire_prefix", candidates, |_| 1, call)
            .await
    }

    /// Why the store is not to be asked about `candidates`, if it is not.
    fn ready(&self, candidates: &[&str]) -> Result<(), Skip> {
        if self.breaker.is_open() {
            return Err(Skip::Fallback(FallbackReason::StoreBreakerOpen));
        }
        if candidates.is_empty() {
            return Err(Skip::Fallback(FallbackReason::StoreError));
        }
        Ok(())
    }

    /// Run an acquiring store `call` under the gate and the timeout, count what it chose in
    /// `held`, and feed the breaker. Returns the chosen candidate's position and the answer.
    async fn counted<T: Chosen>(
        &self,
        op: &'static str,
        candidates: &[&str],
        weight: impl Fn(usize) -> u64,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<(usize, T), Skip> {
        let started = Instant::now();
        let call = async {
            let _gate = self.gate.read().await;
            let result = call.await;
            if let Some((i, label)) = result
                .as_ref()
                .ok()
                .and_then(|a| Some((a.index(), candidates.get(a.index())?)))
            {
                *self.held.lock().entry((*label).to_owned()).or_default() += weight(i);
            }
            result
        };
        let result = self.bounded(call).await;
        telemetry::store_call(&self.pool, op, outcome(&result), started.elapsed());
        match result {
            Ok(a) => match candidates.get(a.index()) {
                Some(_) => {
                    self.on_success();
                    Ok((a.index(), a))
                }
                None => {
                    self.on_failure(&StoreError::Protocol("index out of range".into()));
                    Err(Skip::Fallback(FallbackReason::StoreError))
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
        }
    }

    /// Release one count of endpoint `label` acquired with [`PoolCounts::acquire`]. Returns at
    /// once; the store call runs in a spawned task. A release that matches no count this replica
    /// holds (a double release) is refused loudly — logged as an error and counted as
    /// `llmlb_store_calls_total{op="release",result="unmatched"}` — and never reaches the store,
    /// where it would take the count of another request in flight.
    pub fn release(self: &Arc<Self>, label: &str) {
        self.release_n(label, 1);
    }

    /// [`PoolCounts::release`] of the `n` units an [`PoolCounts::acquire_cost`] counted.
    pub fn release_n(self: &Arc<Self>, label: &str, n: u64) {
        let label = label.to_owned();
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(rt) if !self.breaker.is_open() => rt,
            // No store call: forget the count here; the next tick's restore removes it there.
            _ => {
                if !self.forget(&label, n) {
                    self.unmatched(&label);
                }
                return;
            }
        };
        let this = self.clone();
        runtime.spawn(async move {
            let started = Instant::now();
            let call = async {
                let _gate = this.gate.read().await;
                if !this.forget(&label, n) {
                    return Ok(false);
                }
                this.store
                    .release_n(&this.pool, &label, n)
                    .await
                    .map(|()| true)
            };
            let result = this.bounded(call).await;
            if let Ok(false) = result {
                return this.unmatched(&label);
            }
            telemetry::store_call(&this.pool, "release", outcome(&result), started.elapsed());
            match result {
                Ok(_) => this.on_success(),
                Err(e) => this.on_failure(&e),
            }
            if this.store.defers_releases() {
                this.schedule_flush();
            }
        });
    }

    /// Unless one is already due, flush the store's deferred releases `FLUSH_AFTER` from now:
    /// by then the pool's next call has usually carried them, and the flush sends nothing.
    fn schedule_flush(self: &Arc<Self>) {
        if self.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(FLUSH_AFTER).await;
            // Releases from now on schedule another flush.
            this.flushing.store(false, Ordering::Release);
            let started = Instant::now();
            let call = async {
                let _gate = this.gate.read().await;
                this.store.flush(&this.pool).await
            };
            let result = this.bounded(call).await;
            if let Ok(false) = result {
                return;
            }
            telemetry::store_call(&this.pool, "flush", outcome(&result), started.elapsed());
            match result {
                Ok(_) => this.on_success(),
                Err(e) => this.on_failure(&e),
            }
        });
    }

    /// [`InflightStore::remember`] `label` as the holder of `key` for `ttl`. Returns at once; the
    /// store call runs in a spawned task (skipped while the breaker is open: what is not
    /// remembered is routed by the policy as if new).
    pub fn remember(self: &Arc<Self>, key: u64, label: &str, ttl: Duration) {
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(rt) if !self.breaker.is_open() => rt,
            _ => return,
        };
        let (this, label) = (self.clone(), label.to_owned());
        runtime.spawn(async move {
            let started = Instant::now();
            let call = this.store.remember(&this.pool, key, &label, ttl);
            let result = this.bounded(call).await;
            telemetry::store_call(&this.pool, "remember", outcome(&result), started.elapsed());
            match result {
                Ok(()) => this.on_success(),
                Err(e) => this.on_failure(&e),
            }
        });
    }

    /// Report a release that matched nothing held.
    fn unmatched(&self, label: &str) {
        log::error!(
            "pool {}: release of {label} matches no request this replica holds (a double release); ignored",
            self.pool
        );
        telemetry::store_call(&self.pool, "release", "unmatched", Duration::ZERO);
    }

    /// One heartbeat: replace this replica's contribution with what it holds (see the module
    /// docs). Also the breaker's probe.
    pub async fn tick(&self) {
        let started = Instant::now();
        let call = async {
            let _gate = self.gate.write().await;
            let held: Vec<(String, u64)> = self
                .held
                .lock()
                .iter()
                .map(|(l, n)| (l.clone(), *n))
                .collect();
            let held: Vec<(&str, u64)> = held.iter().map(|(l, n)| (l.as_str(), *n)).collect();
            self.store.restore(&self.pool, &held).await
        };
        let result = self.bounded(call).await;
        telemetry::store_call(&self.pool, "restore", outcome(&result), started.elapsed());
        match result {
            Ok(()) => self.on_success(),
            Err(e) => return self.on_failure(&e),
        }
        // The global view: what every replica has in flight to each current endpoint.
        let labels = self.endpoints.lock().clone();
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        if refs.is_empty() {
            return;
        }
        let started = Instant::now();
        let result = self.bounded(self.store.inflight(&self.pool, &refs)).await;
        telemetry::store_call(&self.pool, "inflight", outcome(&result), started.elapsed());
        match result {
            Ok(totals) => {
                for (label, n) in refs.iter().zip(totals) {
                    telemetry::set_inflight_global(&self.pool, label, n);
                }
            }
            Err(e) => log::debug!("pool {}: global in-flight view: {e}", self.pool),
        }
    }

    /// Withdraw this replica's whole contribution (at shutdown, once nothing is held).
    pub async fn withdraw(&self) -> Result<(), StoreError> {
        self.store.restore(&self.pool, &[]).await
    }

    /// Run a store call, waiting for the gate included, within the store's call timeout.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match self.store.call_timeout() {
            Some(limit) => tokio::time::timeout(limit + GATE_SLACK, call)
                .await
                .unwrap_or(Err(StoreError::Timeout)),
            None => call.await,
        }
    }

    /// Forget `n` units held on `label`; false when fewer were held (nothing is forgotten).
    fn forget(&self, label: &str, n: u64) -> bool {
        let mut held = self.held.lock();
        let Some(units) = held.get_mut(label) else {
            return false;
        };
        if *units < n {
            return false;
        }
        *units -= n;
        if *units == 0 {
            held.remove(label);
        }
        true
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

    fn on_failure(&self, e: &StoreError) {
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

/// How long a deferred release may wait for the pool's next store call before it is sent alone.
pub(super) const FLUSH_AFTER: Duration = Duration::from_millis(2);

/// Extra time a call may spend waiting for the gate (a restore in progress) on top of the store's
/// own timeout, which bounds the call itself.
const GATE_SLACK: Duration = Duration::from_millis(5);

/// The `reason` label of a fallback caused by `e`.
fn fallback_reason(e: &StoreError) -> FallbackReason {
    match e {
        StoreError::Timeout => FallbackReason::StoreTimeout,
        StoreError::Saturated
        | StoreError::Unavailable(_)
        | StoreError::Protocol(_)
        | StoreError::InvalidInput(_) => FallbackReason::StoreError,
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

    fn counts() -> (Arc<PoolCounts>, MemoryStore) {
        let store = MemoryStore::new();
        let counts = PoolCounts::new(Arc::new(store.clone()), "p");
        (Arc::new(counts), store)
    }

    async fn totals(store: &MemoryStore, n: usize) -> Vec<u64> {
        let labels: Vec<String> = (0..n).map(|i| format!("ep{i}")).collect();
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        store.inflight("p", &refs).await.expect("inflight")
    }

    /// Wait until the spawned releases have run.
    async fn settle(store: &MemoryStore, n: usize, want: Vec<u64>) {
        for _ in 0..1000 {
            if totals(store, n).await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(totals(store, n).await, want);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_double_release_is_refused_and_takes_no_other_requests_count() {
        // A pool name of its own: the metric below is process-wide.
        let store = MemoryStore::new();
        let c = Arc::new(PoolCounts::new(Arc::new(store.clone()), "double"));
        let total = || store.inflight_now("double", &["ep0"]).expect("inflight")[0];
        c.acquire(&["ep0"], None).await.expect("acquire");
        // Another request of this replica on ep0 that these counts do not track.
        store
            .acquire_least_now("double", &["ep0"], None)
            .expect("untracked request");
        let reported = || {
            pingora_prometheus::prometheus::gather()
                .iter()
                .filter(|f| f.name() == "llmlb_store_calls_total")
                .flat_map(|f| f.get_metric().to_vec())
                .filter(|m| {
                    let has = |k: &str, v: &str| {
                        m.get_label()
                            .iter()
                            .any(|p| p.name() == k && p.value() == v)
                    };
                    has("pool", "double") && has("result", "unmatched")
                })
                .map(|m| m.get_counter().value())
                .sum::<f64>()
        };
        let wait = |done: &dyn Fn() -> bool| {
            let ok = (0..2000).any(|_| {
                std::thread::sleep(Duration::from_millis(1));
                done()
            });
            assert!(ok, "timed out");
        };
        c.release("ep0");
        wait(&|| total() == 1);
        // Released again: nothing is held any more, so nothing may be taken from the store.
        c.release("ep0");
        wait(&|| reported() >= 1.0);
        assert_eq!(reported(), 1.0, "the double release is reported");
        assert_eq!(total(), 1, "the other request keeps its count");
    }

    #[tokio::test]
    async fn acquire_and_release_keep_store_and_held_in_step() {
        let (c, store) = counts();
        let eps = ["ep0", "ep1", "ep2"];
        let mut picks = Vec::new();
        for _ in 0..6 {
            picks.push(c.acquire(&eps, None).await.expect("acquire"));
        }
        assert_eq!(totals(&store, 3).await, vec![2, 2, 2]);
        assert_eq!(c.held_total(), 6);
        assert_eq!(c.held("ep1"), 2);
        for i in picks {
            c.release(eps[i]);
        }
        settle(&store, 3, vec![0, 0, 0]).await;
        assert_eq!(c.held_total(), 0);
        assert!(c.held.lock().is_empty(), "no zero entries are kept");
    }

    #[tokio::test]
    async fn counts_outlive_the_endpoint_list() {
        // A reload replaced ep0 by ep9 while a request on ep0 was in flight: both stay counted
        // until the old request ends, and the tick restores exactly that.
        let (c, store) = counts();
        c.acquire(&["ep0"], None).await.expect("old generation");
        c.acquire(&["ep9"], None).await.expect("new generation");
        c.tick().await;
        let refs = ["ep0", "ep9"];
        assert_eq!(
            store.inflight("p", &refs).await.expect("inflight"),
            vec![1, 1]
        );
        c.release("ep0");
        for _ in 0..1000 {
            if c.held("ep0") == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        c.tick().await;
        assert_eq!(
            store.inflight("p", &refs).await.expect("inflight"),
            vec![0, 1]
        );
    }

    #[tokio::test]
    async fn saturation_is_a_verdict_not_a_failure() {
        let (c, _) = counts();
        c.acquire(&["ep0"], Some(1)).await.expect("room");
        assert_eq!(c.acquire(&["ep0"], Some(1)).await, Err(Skip::Saturated));
        assert!(!c.breaker.is_open());
        assert_eq!(c.held_total(), 1);
    }

    #[tokio::test]
    async fn every_tick_restores_what_is_held() {
        let (c, store) = counts();
        c.acquire(&["ep0"], None).await.expect("acquire");
        // The store drifted (a lost release, a late timed-out call, a restart that lost data).
        store
            .acquire_least("p", &["ep1"], None)
            .await
            .expect("stray");
        store
            .acquire_least("p", &["ep1"], None)
            .await
            .expect("stray");
        store.release("p", "ep0").await.expect("lost");
        assert_eq!(totals(&store, 2).await, vec![0, 2]);
        c.tick().await;
        assert_eq!(totals(&store, 2).await, vec![1, 0]);
    }

    #[tokio::test]
    async fn with_the_breaker_open_releases_wait_for_the_probe() {
        let (c, store) = counts();
        c.acquire(&["ep0"], None).await.expect("acquire");
        for _ in 0..crate::store::TRIP_AFTER {
            c.trip_for_test();
        }
        assert!(c.breaker.is_open());
        assert_eq!(
            c.acquire(&["ep0"], None).await,
            Err(Skip::Fallback(FallbackReason::StoreBreakerOpen))
        );
        c.release("ep0");
        assert_eq!(c.held_total(), 0);
        assert_eq!(totals(&store, 1).await, vec![1], "not sent while open");
        // The probe succeeds: the breaker closes and the skipped release is applied.
        c.tick().await;
        assert!(!c.breaker.is_open());
        assert_eq!(totals(&store, 1).await, vec![0]);
    }

    #[test]
    fn release_outside_a_runtime_is_applied_by_the_next_tick() {
        let (c, store) = counts();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(c.acquire(&["ep0"], None)).expect("acquire");
        c.release("ep0");
        assert_eq!(c.held_total(), 0);
        rt.block_on(async {
            assert_eq!(totals(&store, 1).await, vec![1]);
            c.tick().await;
            assert_eq!(totals(&store, 1).await, vec![0]);
        });
    }
}
