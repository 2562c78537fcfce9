//! Shared state for policies that must agree across gateway replicas: in-flight request counts
//! and the prefix index.
//!
//! [`InflightStore`] is what `global_least_request` and `prefix_cache` need: pick the
//! candidate endpoint with the fewest requests in flight *summed over every live gateway replica*
//! and count one more for it, atomically; later release that count exactly once. Two
//! implementations have identical semantics and pass one conformance suite
//! (`tests/store_conformance.rs`):
//!
//! - [`MemoryStore`] — embedded, in-process; the default when `lb_config` has no Redis keys.
//! - [`RedisStore`] — Redis or Redis Cluster, shared by every replica pointing at it.
//!
//! # Data model
//!
//! Each gateway process is a *replica* with an id unique per process (`<host>-<pid>-<random>`, see
//! [`new_replica_id`]). Per pool, the store keeps:
//!
//! - **contributions** — for each (replica, endpoint), the requests that replica has in flight to
//!   that endpoint. In Redis: HASH `<ns>:{<pool>}:inflight`, field `<replica>|<endpoint>` → count.
//! - **totals** — for each endpoint, the sum of the live contributions. In Redis: HASH
//!   `<ns>:{<pool>}:total`, field `<endpoint>` → count. Picks read only this, so a pick costs
//!   O(candidates), not O(replicas × candidates).
//! - **heartbeats** — for each replica, when it last spoke. In Redis: ZSET `<ns>:{<pool>}:replicas`,
//!   member `<replica>` → milliseconds from the Redis server's `TIME` (so gateway clocks do not
//!   matter).
//!
//! - **prefix index** — for each block key of a prompt's chain, the endpoints holding that prefix
//!   (most recent first, at most [`MAX_HOLDERS`]), expiring after the caller's TTL unless used. In
//!   Redis: STRING `<ns>:{<pool>}:pfx:<16 hex digits>` → `"ep1,ep2"`.
//!   [`InflightStore::acquire_prefix`] matches, chooses, counts and records in one round trip.
//!
//! `<ns>` is the namespace, `llmlb` by default, so several deployments can share one Redis. The
//! pool name in braces is the Redis Cluster hash tag: all keys of a pool live in one slot, and every
//! script declares every key it touches in `KEYS`.
//!
//! # Rules every implementation follows
//!
//! - Every call refreshes the caller's heartbeat except [`InflightStore::release`] (in Redis, the
//!   calls of one replica do at most every 100 ms, besides every heartbeat: each refresh costs
//!   commands); a replica whose heartbeat is older than the *dead-replica timeout* (default 10 s,
//!   at most 15 s) is reaped by the next survivor that refreshes its own: its contributions are
//!   subtracted from the totals and removed. A replica never reaps itself (it refreshes itself first). So a gateway that
//!   is SIGKILLed leaves its counts behind for at most the timeout plus one heartbeat interval.
//! - [`InflightStore::heartbeat`] must therefore be called every
//!   [`InflightStore::heartbeat_interval`] by a background service while the gateway runs. It also
//!   recomputes the totals from the live contributions (self-healing after partial data loss).
//! - [`InflightStore::restore`] sets this replica's contributions to what it really holds, so a
//!   replica can undo the effect of calls it could not observe (timeouts, a restart of the store).
//! - Counts never go negative: releasing a count that is not there (Redis restarted empty, or this
//!   replica was reaped while partitioned) is a no-op.
//! - Only the candidates passed in are eligible; a candidate the store has never seen counts 0, so
//!   new endpoints are eligible at once. Ties are broken uniformly at random with a random number
//!   drawn by the caller (the Lua RNG is never used).
//! - In Redis, pick + increment is one `EVALSHA` round trip, and releases ride on the next call
//!   of the pool ([`InflightStore::defers_releases`]; within a few milliseconds without one, see
//!   [`PoolCounts`]), so a request costs one round trip, not two; scripts are sent by SHA and reloaded automatically when Redis answers `NOSCRIPT`. Keys expire after
//!   [`KEY_TTL`] without any write, so pools nobody serves any more do not linger.

mod breaker;
mod memory;
mod pool_counts;
mod prefix_index;
mod redis;
mod service;

pub use self::breaker::TRIP_AFTER;
pub use self::memory::MemoryStore;
pub use self::pool_counts::{PoolCounts, Skip};
pub use self::prefix_index::DEFAULT_PREFIX_KEYS;

pub use self::redis::RedisStore;
pub use self::service::heartbeat;

use std::time::Duration;

use async_trait::async_trait;

use crate::config::LoadGuard;

/// Redis keys of a pool expire after this long without any write (heartbeats write every second).
pub const KEY_TTL: Duration = Duration::from_secs(3600);

/// The result of a successful [`InflightStore::acquire_least`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquired {
    /// Index into the `candidates` slice of the chosen endpoint.
    pub index: usize,
    /// In-flight requests to the chosen endpoint over all live replicas, this one included.
    pub inflight: u64,
}

/// One [`InflightStore::acquire_prefix`] call.
#[derive(Debug, Clone, Copy)]
pub struct PrefixQuery<'a> {
    /// The request's ordered chain of block keys (may be empty: then it is a plain least-request
    /// pick).
    pub chain: &'a [u64],
    /// Eligible endpoints (labels), as for [`InflightStore::acquire_least`].
    pub candidates: &'a [&'a str],
    /// `maxRequestCount`, as for [`InflightStore::acquire_least`].
    pub max: Option<u64>,
    /// When a prefix holder is too busy and the request goes elsewhere.
    pub guard: LoadGuard,
    /// Lifetime of the chain's keys, refreshed whenever they are matched or written.
    pub ttl: Duration,
    /// Record the chosen endpoint as the *only* holder of the chain's keys, forgetting earlier
    /// ones: a binding (`endpoint_hash`), which moves rather than spreads. Otherwise it becomes
    /// the first of up to [`MAX_HOLDERS`].
    pub sole: bool,
}

/// How the endpoint of an [`InflightStore::acquire_prefix`] was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixOutcome {
    /// The least loaded endpoint holding the longest matched prefix.
    Hit,
    /// A prefix matched, but its holders were too busy (or full): the least loaded endpoint, now
    /// recorded as a further holder.
    Diverted,
    /// Nothing matched: the least loaded endpoint.
    Miss,
}

/// The result of a successful [`InflightStore::acquire_prefix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixAcquired {
    /// Index into the candidates of the chosen endpoint.
    pub index: usize,
    /// In-flight requests to it over all live replicas, this one included.
    pub inflight: u64,
    /// Leading blocks of the chain held by a candidate (0 on a miss).
    pub matched: usize,
    /// How the endpoint was chosen.
    pub outcome: PrefixOutcome,
}

/// One [`InflightStore::acquire_cost`] call: `kv_aware`'s pick, where the shared counts are units
/// of work (tokens) rather than requests.
#[derive(Debug, Clone, Copy)]
pub struct CostQuery<'a> {
    /// Eligible endpoints (labels), as for [`InflightStore::acquire_least`].
    pub candidates: &'a [&'a str],
    /// Per candidate, the cost of sending the request there before its load is added (e.g. its
    /// uncached prompt tokens), in the same units as the counts.
    pub base: &'a [u64],
    /// Per candidate, what the request adds to that candidate's count if it is chosen (at least 1).
    pub weights: &'a [u64],
    /// How much one unit of count costs, per mille of a unit of `base`.
    pub load_per_mille: u64,
    /// Candidates whose cost is within this per mille of the least cost are near-ties, chosen
    /// among uniformly at random so that bursts do not herd onto one endpoint.
    pub tie_per_mille: u64,
    /// Per candidate, a multiplier of its whole cost (empty: 1 for every candidate). With
    /// `base` 1 and `load_per_mille` 1000 the cost is `scale × (count + 1)`: `latency_aware`'s
    /// score times the endpoint's load over every replica.
    pub scale: &'a [u64],
    /// A key (a session) whose endpoint the request prefers, under a load guard.
    pub sticky: Option<Sticky>,
}

/// A key an [`InflightStore::acquire_cost`] keeps on one endpoint, as a preference: the key's
/// endpoint is chosen, whatever the costs, unless [`LoadGuard::too_busy`] with its count against
/// the least count of the candidates (in the counts' units); otherwise (or when the key has no
/// endpoint among the candidates) the cost decides. Either way the chosen endpoint becomes the
/// key's only holder (as [`PrefixQuery::sole`]), for `ttl`.
#[derive(Debug, Clone, Copy)]
pub struct Sticky {
    /// The key, in the prefix index's key space (e.g. [`crate::prefix::session_key`]).
    pub key: u64,
    /// When the key's endpoint is too busy to keep it.
    pub guard: LoadGuard,
    /// The key lives this long from its last use.
    pub ttl: Duration,
}

/// The result of a successful [`InflightStore::acquire_cost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostAcquired {
    /// Index into the candidates of the chosen endpoint.
    pub index: usize,
    /// The chosen endpoint's count over all live replicas, this request included.
    pub inflight: u64,
    /// With [`CostQuery::sticky`], how the key placed the request: kept on its endpoint
    /// ([`PrefixOutcome::Hit`]), moved because that endpoint was too busy
    /// ([`PrefixOutcome::Diverted`]), or placed by cost for want of one ([`PrefixOutcome::Miss`]).
    pub sticky: Option<PrefixOutcome>,
}

/// At most this many endpoints are recorded as holders of one block key (most recent first).
pub const MAX_HOLDERS: usize = 4;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Every candidate already has at least `max` requests in flight; nothing was counted.
    #[error("every candidate is at the in-flight cap")]
    Saturated,
    /// The call did not complete within the configured timeout. It may still have taken effect.
    #[error("state store call timed out")]
    Timeout,
    /// The store cannot be reached (connection refused or lost, cluster down, authentication).
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// The store answered something unexpected.
    #[error("state store protocol error: {0}")]
    Protocol(String),
    /// The call itself was malformed (no candidates, empty pool name).
    #[error("invalid state store call: {0}")]
    InvalidInput(&'static str),
}

impl StoreError {
    /// Whether this is a failure of the store (timeout, unreachable, bad reply) — what a breaker
    /// should count — rather than a verdict ([`StoreError::Saturated`]) or a caller bug.
    pub fn is_store_failure(&self) -> bool {
        match self {
            StoreError::Timeout | StoreError::Unavailable(_) | StoreError::Protocol(_) => true,
            StoreError::Saturated | StoreError::InvalidInput(_) => false,
        }
    }
}

/// In-flight request counts shared by all gateway replicas. See the module docs for the model.
#[async_trait]
pub trait InflightStore: Send + Sync {
    /// Short name of the implementation (`embedded`, `redis`), for logs and metric labels.
    fn kind(&self) -> &'static str;

    /// This replica's id.
    fn replica_id(&self) -> &str;

    /// How often [`InflightStore::heartbeat`] (or [`InflightStore::restore`]) should be called
    /// for each pool in use.
    fn heartbeat_interval(&self) -> Duration;

    /// The longest one call may take before it fails with [`StoreError::Timeout`]; `None` when
    /// calls never wait (the embedded store).
    fn call_timeout(&self) -> Option<Duration>;

    /// One atomic round trip: among `candidates` (endpoint labels, e.g. `"10.0.0.1:8000"`) choose
    /// the one with the fewest in-flight requests summed over all live replicas (ties uniformly at
    /// random) and count one more for it on behalf of this replica.
    ///
    /// With `max = Some(n)`, when every candidate already has `>= n` in flight nothing is counted
    /// and the result is [`StoreError::Saturated`]. Empty `candidates` is
    /// [`StoreError::InvalidInput`].
    async fn acquire_least(
        &self,
        pool: &str,
        candidates: &[&str],
        max: Option<u64>,
    ) -> Result<Acquired, StoreError>;

    /// One atomic round trip for `prefix_cache`: find the longest leading run of `q.chain` whose
    /// keys have a holder among the candidates; choose the least loaded holder of the deepest
    /// matched key — unless [`LoadGuard::too_busy`] (or it is at `max`), then the least loaded
    /// candidate; with no match, the least loaded candidate. Count one in flight for it exactly
    /// as [`InflightStore::acquire_least`] does, and record it as the first holder of every key
    /// of the chain (keeping up to [`MAX_HOLDERS`] earlier holders, none with `q.sole`),
    /// refreshing their TTL.
    ///
    /// A key whose holders are all non-candidates (unhealthy, gone, already tried) ends the match
    /// there, and the chain from that key on is rewritten for the chosen endpoint. Saturation and
    /// input errors as for [`InflightStore::acquire_least`]; on saturation nothing is written.
    async fn acquire_prefix(
        &self,
        pool: &str,
        q: PrefixQuery<'_>,
    ) -> Result<PrefixAcquired, StoreError>;

    /// One atomic round trip for `kv_aware`: the candidate with the least
    /// `base[i] × 1000 + load_per_mille × total[i]` (near-ties within `tie_per_mille` of the least
    /// uniformly at random, the same rule in both stores), whose count grows by `weights[i]` on behalf of
    /// this replica (release it with [`InflightStore::release_n`]). With [`CostQuery::sticky`],
    /// the key's endpoint instead, unless too busy ([`Sticky`]). Input errors as for
    /// [`InflightStore::acquire_least`], and when `base` or `weights` do not match `candidates`.
    async fn acquire_cost(&self, pool: &str, q: CostQuery<'_>) -> Result<CostAcquired, StoreError>;

    /// One round trip: record `endpoint` as the most recent holder of block key `key` (keeping up
    /// to [`MAX_HOLDERS`] earlier holders), for `ttl` — what an answer taught after the pick, e.g.
    /// which endpoint stored a Responses API response, so that a later request naming it in
    /// `previous_response_id` matches the key in [`InflightStore::acquire_prefix`]. Counts
    /// nothing.
    async fn remember(
        &self,
        pool: &str,
        key: u64,
        endpoint: &str,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// This replica's count for `endpoint` minus one; nothing when it is already zero or unknown
    /// (never negative). Call exactly once per successful acquire. A store whose
    /// [`InflightStore::defers_releases`] records it here and applies it with this replica's
    /// next call for the pool (before that call reads anything) or at
    /// [`InflightStore::flush`]; [`InflightStore::restore`] supersedes the releases not yet
    /// applied.
    async fn release(&self, pool: &str, endpoint: &str) -> Result<(), StoreError> {
        self.release_n(pool, endpoint, 1).await
    }

    /// [`InflightStore::release`] of `n` units at once (what an [`InflightStore::acquire_cost`]
    /// counted); never below zero.
    async fn release_n(&self, pool: &str, endpoint: &str, n: u64) -> Result<(), StoreError>;

    /// Whether releases wait for the next call or [`InflightStore::flush`] (Redis: they ride on
    /// the next pick's round trip instead of costing one of their own).
    fn defers_releases(&self) -> bool {
        false
    }

    /// One round trip, if any release of `pool` waits: apply them now. Whether one was sent.
    async fn flush(&self, _pool: &str) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// In-flight requests per endpoint (same order as `endpoints`), summed over live replicas.
    async fn inflight(&self, pool: &str, endpoints: &[&str]) -> Result<Vec<u64>, StoreError>;

    /// Refresh this replica's heartbeat for `pool`, remove the contribution of replicas whose
    /// heartbeat is older than the dead-replica timeout, and recompute the totals from the live
    /// contributions.
    async fn heartbeat(&self, pool: &str) -> Result<(), StoreError>;

    /// [`InflightStore::heartbeat`], but first replace this replica's contributions for `pool`
    /// with exactly `held` (endpoint, count); endpoints not listed count 0. A replica that knows
    /// what it really has in flight uses this to repair the store after calls whose effect is
    /// unknown (timeouts) or lost (a Redis restart, releases skipped while the store was down).
    async fn restore(&self, pool: &str, held: &[(&str, u64)]) -> Result<(), StoreError>;
}

/// A replica id unique per process and start: `<hostname>-<pid>-<8 random hex digits>`.
///
/// Contains no `|` (the separator in contribution field names) and no whitespace.
pub fn new_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let host = if host.is_empty() { "host".into() } else { host };
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Heartbeat period for a dead-replica timeout: a quarter of it, at most one second.
fn heartbeat_interval_for(dead_after: Duration) -> Duration {
    (dead_after / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

fn check_call(pool: &str, n_candidates: usize) -> Result<(), StoreError> {
    if pool.is_empty() {
        return Err(StoreError::InvalidInput("empty pool name"));
    }
    if n_candidates == 0 {
        return Err(StoreError::InvalidInput("no candidates"));
    }
    Ok(())
}

/// The selection rule both implementations follow (the Lua script mirrors it line by line): the
/// minimum count; among the `k` candidates that have it, the `(random mod k)`-th in order.
/// Returns (index, minimum). `counts` must not be empty.
pub(crate) fn pick_least(counts: &[u64], random: u32) -> (usize, u64) {
    let min = counts.iter().copied().min().unwrap_or(0);
    let ties = counts.iter().filter(|c| **c == min).count().max(1);
    let want = random as usize % ties;
    let index = counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c == min)
        .nth(want)
        .map(|(i, _)| i)
        .unwrap_or(0);
    (index, min)
}

/// Checks an [`InflightStore::acquire_cost`] call.
fn check_cost(pool: &str, q: &CostQuery<'_>) -> Result<(), StoreError> {
    check_call(pool, q.candidates.len())?;
    if q.base.len() != q.candidates.len()
        || q.weights.len() != q.candidates.len()
        || !(q.scale.is_empty() || q.scale.len() == q.candidates.len())
    {
        return Err(StoreError::InvalidInput(
            "one base cost, weight (and scale, if any) per candidate",
        ));
    }
    Ok(())
}

/// The cost choice both implementations follow (the Lua script mirrors it line by line): cost
/// `scale[i] × (base[i] × 1000 + load_per_mille × counts[i])` (`scale` empty: 1); the candidates
/// within `least + least × tie_per_mille / 1000` are near-ties, and the `(random mod k)`-th of the
/// `k` near-ties in order is chosen. `counts` and `base` have one entry per candidate (not empty).
pub(crate) fn cost_choice(
    base: &[u64],
    counts: &[u64],
    scale: &[u64],
    load_per_mille: u64,
    tie_per_mille: u64,
    random: u32,
) -> usize {
    let costs: Vec<u64> = base
        .iter()
        .zip(counts)
        .enumerate()
        .map(|(i, (b, c))| {
            b.saturating_mul(1000)
                .saturating_add(load_per_mille.saturating_mul(*c))
                .saturating_mul(scale.get(i).copied().unwrap_or(1))
        })
        .collect();
    let least = costs.iter().copied().min().unwrap_or(0);
    let within = least.saturating_add(least.saturating_mul(tie_per_mille) / 1000);
    let ties = costs.iter().filter(|c| **c <= within).count().max(1);
    let want = random as usize % ties;
    costs
        .iter()
        .enumerate()
        .filter(|(_, c)| **c <= within)
        .nth(want)
        .map_or(0, |(i, _)| i)
}

/// The sticky choice both implementations follow (the Lua script mirrors it): `holders` are the
/// candidate indices (ascending) holding the sticky key, `chosen` the cost's choice. The least
/// loaded holder (the first of equals) keeps the request unless `guard` finds it too busy
/// against the least count.
pub(crate) fn sticky_choice(
    counts: &[u64],
    holders: &[usize],
    guard: LoadGuard,
    chosen: usize,
) -> (usize, PrefixOutcome) {
    let count = |i: usize| counts.get(i).copied().unwrap_or(u64::MAX);
    let Some(holder) = holders.iter().copied().min_by_key(|i| count(*i)) else {
        return (chosen, PrefixOutcome::Miss);
    };
    let least = counts.iter().copied().min().unwrap_or(0);
    if guard.too_busy(count(holder), least) {
        (chosen, PrefixOutcome::Diverted)
    } else {
        (holder, PrefixOutcome::Hit)
    }
}

/// The prefix-cache choice both implementations follow (the Lua script mirrors it): `holders`
/// are the candidate indices (ascending) holding the deepest matched key, empty on a miss.
/// `None` when the chosen endpoint — the least loaded one, at worst — is at `max`.
pub(crate) fn prefix_choice(
    counts: &[u64],
    holders: &[usize],
    random: u32,
    guard: LoadGuard,
    max: Option<u64>,
) -> Option<(usize, PrefixOutcome)> {
    let count = |i: usize| counts.get(i).copied().unwrap_or(u64::MAX);
    let full = |i: usize| max.is_some_and(|m| count(i) >= m);
    let (least_index, least) = pick_least(counts, random);
    let (index, outcome) = if holders.is_empty() {
        (least_index, PrefixOutcome::Miss)
    } else {
        let held: Vec<u64> = holders.iter().map(|i| count(*i)).collect();
        let (h, busy) = pick_least(&held, random);
        let holder = holders.get(h).copied().unwrap_or(least_index);
        if guard.too_busy(busy, least) || full(holder) {
            (least_index, PrefixOutcome::Diverted)
        } else {
            (holder, PrefixOutcome::Hit)
        }
    };
    (!full(index)).then_some((index, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUARD: LoadGuard = LoadGuard {
        absolute: 4,
        per_mille: 500,
    };

    #[test]
    fn load_guard_thresholds() {
        assert!(!GUARD.too_busy(4, 0));
        assert!(GUARD.too_busy(5, 0));
        // Relative: half of 20 = 10 above the least.
        assert!(!GUARD.too_busy(30, 20));
        assert!(GUARD.too_busy(31, 20));
    }

    #[test]
    fn prefix_choice_prefers_holders_within_the_guard() {
        use PrefixOutcome::*;
        assert_eq!(
            prefix_choice(&[3, 0, 1], &[], 0, GUARD, None),
            Some((1, Miss))
        );
        assert_eq!(
            prefix_choice(&[3, 0, 1], &[0], 0, GUARD, None),
            Some((0, Hit))
        );
        assert_eq!(
            prefix_choice(&[3, 0, 1], &[0, 2], 0, GUARD, None),
            Some((2, Hit))
        );
        assert_eq!(
            prefix_choice(&[5, 0, 1], &[0], 0, GUARD, None),
            Some((1, Diverted))
        );
        // The holder is full: the least loaded has room.
        assert_eq!(
            prefix_choice(&[2, 0, 1], &[0], 0, GUARD, Some(2)),
            Some((1, Diverted))
        );
        assert_eq!(prefix_choice(&[2, 2], &[0], 0, GUARD, Some(2)), None);
    }

    #[test]
    fn cost_choice_weighs_base_against_load_and_spreads_near_ties() {
        // 100 uncached tokens and 50 in flight (at 1:1) beats 0 uncached and 200 in flight.
        assert_eq!(cost_choice(&[100, 0], &[50, 200], &[], 1000, 0, 0), 0);
        // Load at half weight: 100 + 25 = 125 against 0 + 100 = 100.
        assert_eq!(cost_choice(&[100, 0], &[50, 200], &[], 500, 0, 0), 1);
        // Costs 1000, 1040, 2000 (× 1000) with 5 %: the first two are near-ties, the third never.
        let base = [1000, 1000, 2000];
        let counts = [0, 40, 0];
        let picks: Vec<usize> = (0..4)
            .map(|r| cost_choice(&base, &counts, &[], 1000, 50, r))
            .collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
        // Exact ties without tolerance still spread.
        assert_eq!(cost_choice(&[0, 0], &[3, 3], &[], 1000, 0, 1), 1);
        // Scaled: score × (count + 1); 10 × 3 beats 40 × 1, but not 40 × 0 + ... (1 × 40 = 40).
        assert_eq!(cost_choice(&[1, 1], &[2, 0], &[10, 40], 1000, 0, 0), 0);
        assert_eq!(cost_choice(&[1, 1], &[4, 0], &[10, 40], 1000, 0, 0), 1);
    }

    #[test]
    fn sticky_choice_keeps_the_holder_within_the_guard() {
        // Holder 1 at 7 against a least of 3: within 3 + max(4, 3/2).
        assert_eq!(
            sticky_choice(&[3, 7, 5], &[1], GUARD, 0),
            (1, PrefixOutcome::Hit)
        );
        // At 8 it is too busy: the cost's choice.
        assert_eq!(
            sticky_choice(&[3, 8, 5], &[1], GUARD, 2),
            (2, PrefixOutcome::Diverted)
        );
        // No holder among the candidates.
        assert_eq!(
            sticky_choice(&[3, 12], &[], GUARD, 1),
            (1, PrefixOutcome::Miss)
        );
        // Several holders: the least loaded, the first of equals.
        assert_eq!(
            sticky_choice(&[9, 4, 4], &[0, 1, 2], GUARD, 0),
            (1, PrefixOutcome::Hit)
        );
    }

    #[test]
    fn pick_least_takes_the_minimum() {
        assert_eq!(pick_least(&[3, 1, 2], 0), (1, 1));
        assert_eq!(pick_least(&[3, 1, 2], 7), (1, 1));
        assert_eq!(pick_least(&[0], 12345), (0, 0));
    }

    #[test]
    fn pick_least_spreads_ties_by_the_random_value() {
        let counts = [1, 0, 5, 0, 0];
        let picks: Vec<usize> = (0..6).map(|r| pick_least(&counts, r).0).collect();
        assert_eq!(picks, vec![1, 3, 4, 1, 3, 4]);
    }

    #[test]
    fn replica_ids_are_unique_and_safe() {
        let a = new_replica_id();
        let b = new_replica_id();
        assert_ne!(a, b);
        assert!(crate::config::check_replica_id(&a).is_ok(), "{a}");
        assert!(a.contains(&format!("-{}-", std::process::id())));
    }

    #[test]
    fn dead_after_bounds() {
        assert!(crate::config::check_dead_replica_after(Duration::from_secs(10)).is_ok());
        assert!(crate::config::check_dead_replica_after(Duration::from_secs(15)).is_ok());
        assert!(crate::config::check_dead_replica_after(Duration::from_secs(16)).is_err());
        assert!(crate::config::check_dead_replica_after(Duration::ZERO).is_err());
        assert_eq!(
            heartbeat_interval_for(Duration::from_secs(10)),
            Duration::from_secs(1)
        );
        assert_eq!(
            heartbeat_interval_for(Duration::from_secs(1)),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn bad_replica_ids_are_rejected() {
        for id in ["", "a|b", "a b", &"x".repeat(201)] {
            assert!(crate::config::check_replica_id(id).is_err(), "{id:?}");
        }
    }

    #[test]
    fn only_store_failures_count_for_a_breaker() {
        assert!(StoreError::Timeout.is_store_failure());
        assert!(StoreError::Unavailable("x".into()).is_store_failure());
        assert!(!StoreError::Saturated.is_store_failure());
        assert!(!StoreError::InvalidInput("no candidates").is_store_failure());
    }
}
