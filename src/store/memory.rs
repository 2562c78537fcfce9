//! Embedded, in-process [`InflightStore`]: the default when no Redis is configured.
//!
//! It keeps exactly the data model of the Redis store (per-replica contributions, per-endpoint
//! totals, heartbeats; see the parent module) in process memory, with the same reaping and
//! clamping rules, so the conformance suite runs unchanged against both. One gateway process is one
//! replica; [`MemoryStore::replica`] makes another handle on the same state with its own replica
//! id, which is how tests exercise the multi-replica rules without Redis.
//!
//! Locking: a `parking_lot` read-write lock maps pool names to per-pool mutexes; every call takes
//! the pool's mutex for a few map operations and never holds it across an `.await`. The prefix
//! index is bounded (least recently written keys go first, [`MemoryStore::with_prefix_keys`]) and
//! expires keys from its oldest end, never by scanning it.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};

use super::prefix_index::{PrefixIndex, DEFAULT_PREFIX_KEYS};
use crate::config::{
    check_dead_replica_after, check_replica_id, InvalidKey, DEFAULT_DEAD_REPLICA_AFTER,
};

use super::{
    check_call, check_cost, cost_choice, heartbeat_interval_for, new_replica_id, pick_least,
    prefix_choice, sticky_choice, Acquired, CostAcquired, CostQuery, InflightStore, PrefixAcquired,
    PrefixQuery, StoreError,
};

/// The embedded store. Cheap to clone; clones are the same replica.
#[derive(Clone)]
pub struct MemoryStore {
    pools: Arc<RwLock<HashMap<String, Arc<Mutex<PoolState>>>>>,
    replica: Arc<str>,
    dead_after: Duration,
    /// The most prefix keys each pool's index holds.
    prefix_keys: NonZeroUsize,
}

/// One pool's state; the same collections as the Redis keys.
struct PoolState {
    /// replica → endpoint → in-flight count (> 0; zero entries are removed).
    contributions: HashMap<String, HashMap<String, u64>>,
    /// endpoint → sum of live contributions (> 0; zero entries are removed).
    totals: HashMap<String, u64>,
    /// replica → last time it spoke.
    heartbeats: HashMap<String, Instant>,
    /// prefix block key → its holders (most recent first) and when it expires; bounded.
    prefixes: PrefixIndex,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A fresh store with a fresh replica id and the default dead-replica timeout.
    pub fn new() -> Self {
        MemoryStore {
            pools: Arc::default(),
            replica: new_replica_id().into(),
            dead_after: DEFAULT_DEAD_REPLICA_AFTER,
            prefix_keys: DEFAULT_PREFIX_KEYS,
        }
    }

    /// Bound each pool's prefix index to `keys` block keys (default [`DEFAULT_PREFIX_KEYS`]);
    /// beyond it the least recently written keys are forgotten. Set before first use.
    pub fn with_prefix_keys(mut self, keys: NonZeroUsize) -> Self {
        self.prefix_keys = keys;
        self
    }

    /// Set the dead-replica timeout of this handle (more than 0, at most 15 s).
    pub fn with_dead_replica_after(mut self, d: Duration) -> Result<Self, InvalidKey> {
        check_dead_replica_after(d)?;
        self.dead_after = d;
        Ok(self)
    }

    /// Set this handle's replica id (no `|`, no whitespace).
    pub fn with_replica_id(mut self, id: &str) -> Result<Self, InvalidKey> {
        check_replica_id(id)?;
        self.replica = id.into();
        Ok(self)
    }

    /// Another replica on the same state: a new replica id, the same dead-replica timeout.
    pub fn replica(&self) -> Self {
        MemoryStore {
            pools: self.pools.clone(),
            replica: new_replica_id().into(),
            dead_after: self.dead_after,
            prefix_keys: self.prefix_keys,
        }
    }

    fn pool(&self, name: &str) -> Arc<Mutex<PoolState>> {
        if let Some(p) = self.pools.read().get(name) {
            return p.clone();
        }
        self.pools
            .write()
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(PoolState::new(self.prefix_keys))))
            .clone()
    }
}

impl PoolState {
    fn new(prefix_keys: NonZeroUsize) -> Self {
        PoolState {
            contributions: HashMap::new(),
            totals: HashMap::new(),
            heartbeats: HashMap::new(),
            prefixes: PrefixIndex::new(prefix_keys),
        }
    }

    /// Refresh `me`, then reap every replica silent for longer than `dead_after`.
    fn touch_and_reap(&mut self, me: &str, now: Instant, dead_after: Duration) {
        match self.heartbeats.get_mut(me) {
            Some(t) => *t = now,
            None => {
                self.heartbeats.insert(me.to_owned(), now);
            }
        }
        let dead: Vec<String> = self
            .heartbeats
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) > dead_after)
            .map(|(r, _)| r.clone())
            .collect();
        for r in dead {
            self.heartbeats.remove(&r);
            if let Some(eps) = self.contributions.remove(&r) {
                for (ep, n) in eps {
                    self.sub_total(&ep, n);
                }
            }
        }
    }

    fn sub_total(&mut self, ep: &str, n: u64) {
        if let Some(t) = self.totals.get_mut(ep) {
            if *t > n {
                *t -= n;
            } else {
                self.totals.remove(ep);
            }
        }
    }

    /// Count `n` more in flight to `ep` for replica `me`; returns the new total.
    fn add(&mut self, me: &str, ep: &str, n: u64) -> u64 {
        *self
            .contributions
            .entry(me.to_owned())
            .or_default()
            .entry(ep.to_owned())
            .or_default() += n;
        let total = self.totals.entry(ep.to_owned()).or_default();
        *total += n;
        *total
    }

    fn total(&self, ep: &str) -> u64 {
        self.totals.get(ep).copied().unwrap_or(0)
    }

    /// Drop contributions of replicas without a heartbeat and recompute every total.
    fn reconcile(&mut self) {
        let heartbeats = &self.heartbeats;
        self.contributions.retain(|r, _| heartbeats.contains_key(r));
        let mut totals: HashMap<String, u64> = HashMap::new();
        for eps in self.contributions.values() {
            for (ep, n) in eps {
                *totals.entry(ep.clone()).or_default() += n;
            }
        }
        totals.retain(|_, n| *n > 0);
        self.totals = totals;
    }
}

#[async_trait]
impl InflightStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn replica_id(&self) -> &str {
        &self.replica
    }

    fn heartbeat_interval(&self) -> Duration {
        heartbeat_interval_for(self.dead_after)
    }

    fn call_timeout(&self) -> Option<Duration> {
        None
    }

    async fn acquire_least(
        &self,
        pool: &str,
        candidates: &[&str],
        max: Option<u64>,
    ) -> Result<Acquired, StoreError> {
        self.acquire_least_now(pool, candidates, max)
    }

    async fn acquire_prefix(
        &self,
        pool: &str,
        q: PrefixQuery<'_>,
    ) -> Result<PrefixAcquired, StoreError> {
        self.acquire_prefix_now(pool, q)
    }

    async fn acquire_cost(&self, pool: &str, q: CostQuery<'_>) -> Result<CostAcquired, StoreError> {
        self.acquire_cost_now(pool, q)
    }

    async fn remember(
        &self,
        pool: &str,
        key: u64,
        endpoint: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        check_call(pool, 1)?;
        let now = Instant::now();
        self.pool(pool)
            .lock()
            .prefixes
            .record(&[key], endpoint, now + ttl, now);
        Ok(())
    }

    async fn release_n(&self, pool: &str, endpoint: &str, n: u64) -> Result<(), StoreError> {
        self.release_n_now(pool, endpoint, n)
    }

    async fn inflight(&self, pool: &str, endpoints: &[&str]) -> Result<Vec<u64>, StoreError> {
        self.inflight_now(pool, endpoints)
    }

    async fn heartbeat(&self, pool: &str) -> Result<(), StoreError> {
        self.heartbeat_now(pool)
    }

    async fn restore(&self, pool: &str, held: &[(&str, u64)]) -> Result<(), StoreError> {
        self.beat(pool, Some(held))
    }
}

impl MemoryStore {
    /// [`InflightStore::acquire_least`], synchronously: the embedded store never waits.
    pub fn acquire_least_now(
        &self,
        pool: &str,
        candidates: &[&str],
        max: Option<u64>,
    ) -> Result<Acquired, StoreError> {
        check_call(pool, candidates.len())?;
        let random = rand::random::<u32>();
        let pool = self.pool(pool);
        let mut st = pool.lock();
        st.touch_and_reap(&self.replica, Instant::now(), self.dead_after);
        let counts: Vec<u64> = candidates.iter().map(|c| st.total(c)).collect();
        let (index, least) = pick_least(&counts, random);
        if max.is_some_and(|m| least >= m) {
            return Err(StoreError::Saturated);
        }
        let ep = candidates[index];
        let inflight = st.add(&self.replica, ep, 1);
        Ok(Acquired { index, inflight })
    }

    /// [`InflightStore::acquire_prefix`], synchronously.
    pub fn acquire_prefix_now(
        &self,
        pool: &str,
        q: PrefixQuery<'_>,
    ) -> Result<PrefixAcquired, StoreError> {
        check_call(pool, q.candidates.len())?;
        let random = rand::random::<u32>();
        let now = Instant::now();
        let pool = self.pool(pool);
        let mut st = pool.lock();
        st.touch_and_reap(&self.replica, now, self.dead_after);
        let counts: Vec<u64> = q.candidates.iter().map(|c| st.total(c)).collect();
        let (matched, holders) = st.prefixes.holders(q.candidates, q.chain, now);
        let (index, outcome) = prefix_choice(&counts, &holders, random, q.guard, q.max)
            .ok_or(StoreError::Saturated)?;
        let ep = q.candidates[index];
        let inflight = st.add(&self.replica, ep, 1);
        if q.sole {
            st.prefixes.bind(q.chain, ep, now + q.ttl, now);
        } else {
            st.prefixes.record(q.chain, ep, now + q.ttl, now);
        }
        Ok(PrefixAcquired {
            index,
            inflight,
            matched,
            outcome,
        })
    }

    /// [`InflightStore::acquire_cost`], synchronously.
    pub fn acquire_cost_now(
        &self,
        pool: &str,
        q: CostQuery<'_>,
    ) -> Result<CostAcquired, StoreError> {
        check_cost(pool, &q)?;
        let random = rand::random::<u32>();
        let now = Instant::now();
        let pool = self.pool(pool);
        let mut st = pool.lock();
        st.touch_and_reap(&self.replica, now, self.dead_after);
        let counts: Vec<u64> = q.candidates.iter().map(|c| st.total(c)).collect();
        let chosen = cost_choice(
            q.base,
            &counts,
            q.scale,
            q.load_per_mille,
            q.tie_per_mille,
            random,
        );
        let (index, sticky) = match q.sticky {
            None => (chosen, None),
            Some(s) => {
                let (_, holders) = st.prefixes.holders(q.candidates, &[s.key], now);
                let (index, outcome) = sticky_choice(&counts, &holders, s.guard, chosen);
                st.prefixes
                    .bind(&[s.key], q.candidates[index], now + s.ttl, now);
                (index, Some(outcome))
            }
        };
        let weight = q.weights[index].max(1);
        let inflight = st.add(&self.replica, q.candidates[index], weight);
        Ok(CostAcquired {
            index,
            inflight,
            sticky,
        })
    }

    /// [`InflightStore::release`], synchronously.
    pub fn release_now(&self, pool: &str, endpoint: &str) -> Result<(), StoreError> {
        self.release_n_now(pool, endpoint, 1)
    }

    /// [`InflightStore::release_n`], synchronously.
    pub fn release_n_now(&self, pool: &str, endpoint: &str, n: u64) -> Result<(), StoreError> {
        check_call(pool, 1)?;
        let pool = self.pool(pool);
        let mut st = pool.lock();
        let Some(mine) = st.contributions.get_mut(&*self.replica) else {
            return Ok(());
        };
        let taken = match mine.get_mut(endpoint) {
            Some(held) if *held > n => {
                *held -= n;
                n
            }
            Some(held) => {
                let all = *held;
                mine.remove(endpoint);
                all
            }
            None => return Ok(()),
        };
        if mine.is_empty() {
            st.contributions.remove(&*self.replica);
        }
        st.sub_total(endpoint, taken);
        Ok(())
    }

    /// [`InflightStore::inflight`], synchronously.
    pub fn inflight_now(&self, pool: &str, endpoints: &[&str]) -> Result<Vec<u64>, StoreError> {
        check_call(pool, 1)?;
        if endpoints.is_empty() {
            return Ok(Vec::new());
        }
        let pool = self.pool(pool);
        let mut st = pool.lock();
        st.touch_and_reap(&self.replica, Instant::now(), self.dead_after);
        Ok(endpoints.iter().map(|e| st.total(e)).collect())
    }

    /// The longest prefix of `chain` some of `candidates` hold, and which of them (indices into
    /// `candidates`), without changing anything.
    pub fn holders_now(
        &self,
        pool: &str,
        candidates: &[&str],
        chain: &[u64],
    ) -> (usize, Vec<usize>) {
        let pool = self.pool(pool);
        let st = pool.lock();
        st.prefixes.holders(candidates, chain, Instant::now())
    }

    /// How many prefix block keys the index of `pool` holds (expired ones included until the
    /// next heartbeat drops them).
    pub fn prefix_keys_now(&self, pool: &str) -> usize {
        self.pool(pool).lock().prefixes.len()
    }

    /// [`InflightStore::heartbeat`], synchronously: also drops prefix keys past their TTL.
    pub fn heartbeat_now(&self, pool: &str) -> Result<(), StoreError> {
        self.beat(pool, None)
    }

    /// Heartbeat, expire prefix keys, optionally replace this replica's contribution with `held`,
    /// and recompute the totals.
    fn beat(&self, pool: &str, held: Option<&[(&str, u64)]>) -> Result<(), StoreError> {
        check_call(pool, 1)?;
        let pool = self.pool(pool);
        let mut st = pool.lock();
        let now = Instant::now();
        st.touch_and_reap(&self.replica, now, self.dead_after);
        st.prefixes.expire(now);
        if let Some(held) = held {
            let mine: HashMap<String, u64> = held
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(ep, n)| ((*ep).to_owned(), *n))
                .collect();
            if mine.is_empty() {
                st.contributions.remove(&*self.replica);
            } else {
                st.contributions.insert(self.replica.to_string(), mine);
            }
        }
        st.reconcile();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_unique_prompts_leaves_the_index_bounded() {
        let store = MemoryStore::new().with_prefix_keys(NonZeroUsize::new(1000).expect("cap"));
        let candidates = ["a", "b"];
        for i in 0..5000u64 {
            let chain = [i * 3, i * 3 + 1, i * 3 + 2];
            let q = PrefixQuery {
                chain: &chain,
                candidates: &candidates,
                max: None,
                guard: crate::config::LoadGuard {
                    absolute: 8,
                    per_mille: 500,
                },
                ttl: Duration::from_secs(600),
                sole: false,
            };
            let got = store.acquire_prefix_now("p", q).expect("acquire");
            store
                .release_now("p", candidates[got.index])
                .expect("release");
        }
        assert_eq!(store.prefix_keys_now("p"), 1000);
    }

    #[tokio::test]
    async fn reaping_subtracts_only_the_dead_replicas_share() {
        let a = MemoryStore::new()
            .with_dead_replica_after(Duration::from_millis(50))
            .expect("timeout");
        let b = a.replica();
        a.acquire_least("p", &["x"], None).await.expect("a");
        b.acquire_least("p", &["x"], None).await.expect("b");
        b.acquire_least("p", &["x"], None).await.expect("b");
        assert_eq!(a.inflight("p", &["x"]).await.expect("read"), vec![3]);
        // b goes silent; a keeps speaking.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(25)).await;
            a.heartbeat("p").await.expect("hb");
        }
        assert_eq!(a.inflight("p", &["x"]).await.expect("read"), vec![1]);
        // b's late release finds nothing of its own: a's count is untouched.
        b.release("p", "x").await.expect("release");
        assert_eq!(a.inflight("p", &["x"]).await.expect("read"), vec![1]);
    }

    #[tokio::test]
    async fn a_lone_replica_never_reaps_itself() {
        let a = MemoryStore::new()
            .with_dead_replica_after(Duration::from_millis(20))
            .expect("timeout");
        a.acquire_least("p", &["x"], None).await.expect("a");
        tokio::time::sleep(Duration::from_millis(60)).await;
        a.heartbeat("p").await.expect("hb");
        assert_eq!(a.inflight("p", &["x"]).await.expect("read"), vec![1]);
    }

    #[tokio::test]
    async fn reconcile_repairs_drifted_totals() {
        let a = MemoryStore::new();
        a.acquire_least("p", &["x"], None).await.expect("a");
        {
            let pool = a.pool("p");
            let mut st = pool.lock();
            st.totals.insert("x".into(), 7);
            st.totals.insert("ghost".into(), 2);
        }
        a.heartbeat("p").await.expect("hb");
        assert_eq!(
            a.inflight("p", &["x", "ghost"]).await.expect("read"),
            vec![1, 0]
        );
    }
}
