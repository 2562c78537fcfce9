//! `latency_aware` (Higress 2.x `cluster_metrics`, its alias): route by the latencies this replica
//! measures itself on each endpoint — time to first token (pick to first byte of the answer) and
//! total time (pick to end) — with Higress's keys ([`LatencyAwareConfig`]):
//!
//! - `mode: AdaptiveScore` (default): each endpoint's score is
//!   `latency × inflight × (1 + error_penalty × error_rate)` with
//!   `latency = ttft_weight·√(ttft + 1) + total_latency_weight·√(total + 1)` over the EWMAs
//!   (`ewma_beta`) of its times in ms (one standing in for the other when only one is known),
//!   `inflight` this replica's requests on it plus one (plus `consecutive_errors + 1` while it
//!   cools down after a failure) and `error_rate` its failed attempts over its finished ones. An
//!   endpoint without any sample scores `inflight` alone (`metrics_missing_policy: least_busy`),
//!   so a new endpoint is tried at once. Candidates in cooldown are left out while another is not;
//!   among the rest, `p2c_choices` sampled at random (all when there are no more), the lowest
//!   score wins (`latency_score`).
//! - `LeastBusy`: the fewest requests in flight from this replica (`latency_least_busy`).
//! - `LeastFirstTokenLatency` / `LeastTotalLatency`: the least mean of the endpoint's last
//!   `queue_size` samples, 0 without any, as Higress (`latency_least_ttft`, `latency_least_total`).
//! - `rate_limit` (every mode): an endpoint whose share of the pool's last `queue_size` picks on
//!   this replica reached `rate_limit` is skipped while another candidate is below it
//!   (`latency_rate_limited` when a skipped candidate ranked better than the pick). As in
//!   Higress the share must stay *below* the limit, so with the default 1 an endpoint that took
//!   every one of the last `queue_size` picks yields the next one: about one pick in
//!   `queue_size` refreshes another endpoint's figures.
//!
//! Ties are broken at random. The measurements come from the [`Lease`] of each pick: the first
//! byte records a time to first token; [`Outcome::Completed`] a total time and a success (any
//! status the engine answered: the lease does not see it), [`Outcome::Failed`] an error, a
//! consecutive error and a cooldown of `failure_cooldown_ms`; [`Outcome::Aborted`] and
//! [`Outcome::Dropped`] nothing. The figures are this replica's, in memory, and start afresh with
//! each routing generation (reload, DNS change). With `global_inflight_enabled` the
//! `AdaptiveScore` load is the endpoint's requests in flight over every replica: the store picks
//! the least `score × (in flight + 1)` and counts it in one round trip ([`CostQuery::scale`]);
//! while the store cannot answer, this replica's own score decides.
//!
//! A request that names a session (the pool's `session_affinity`) goes where the session's last
//! request went — whatever its share of recent picks (`rate_limit`) — unless that endpoint cools
//! down or carries more requests than the load guard allows over the least loaded candidate
//! (`session_hit`); otherwise the mode chooses among all candidates, without sampling, and the
//! session follows (`session_diverted`, `session_new`). A Responses API request that continues
//! a stored response (`previous_response_id`) goes to the endpoint that stored it unless it
//! cools down (`response_hit`, `response_new`). The guard is `loadGuardAbsolute` (default 8) and
//! `loadGuardRelative` (0.5), as in `prefix_cache`; both keys last `redisKeyTTL` (default 30
//! minutes) from their last use: in
//! the store with `global_inflight_enabled` (so every replica agrees, in the same round trip as
//! the pick), else in this replica's memory (at most [`MAX_LOCAL_KEYS`] per pool).

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lru::LruCache;
use parking_lot::Mutex;
use rand::seq::SliceRandom;
use rand::Rng;

use super::local::{outcome_reason, sticky, Reasons};
use super::{Lease, Pick, PickInput, Policy, PolicyError};
use crate::apis::Api;
use crate::config::{LatencyAwareConfig, LatencyMode, PolicyKind};
use crate::endpoint::{EndpointId, Outcome};
use crate::prefix::response_key;
use crate::store::{sticky_choice, CostQuery, PoolCounts, Skip, Sticky};
use crate::telemetry;

/// Without `global_inflight_enabled`, the most session and response keys a pool remembers
/// (least recently used first out).
pub const MAX_LOCAL_KEYS: usize = 65_536;

/// Pick reason: the lowest adaptive score (`AdaptiveScore`).
pub const REASON_SCORE: &str = "latency_score";
/// Pick reason: the fewest requests in flight from this replica (`LeastBusy`).
pub const REASON_LEAST_BUSY: &str = "latency_least_busy";
/// Pick reason: the least mean time to first token (`LeastFirstTokenLatency`).
pub const REASON_LEAST_TTFT: &str = "latency_least_ttft";
/// Pick reason: the least mean total time (`LeastTotalLatency`).
pub const REASON_LEAST_TOTAL: &str = "latency_least_total";
/// Pick reason: a candidate that ranked better was skipped because its share of recent picks
/// reached `rate_limit`.
pub const REASON_RATE_LIMITED: &str = "latency_rate_limited";

/// What this replica knows of one endpoint (times in ms).
#[derive(Debug, Default, Clone)]
struct Stats {
    /// Requests picked and not yet released.
    inflight: u64,
    /// Its picks among the pool's recent ones ([`State::recent`]).
    recent_picks: usize,
    ewma_ttft: Option<f64>,
    ewma_total: Option<f64>,
    /// The last `queue_size` samples, oldest first.
    ttfts: VecDeque<f64>,
    totals: VecDeque<f64>,
    successes: u64,
    errors: u64,
    consecutive_errors: u64,
    /// Avoided until then after a failure.
    cooldown_until: Option<Instant>,
}

impl Stats {
    fn in_cooldown(&self, now: Instant) -> bool {
        self.cooldown_until.is_some_and(|until| now < until)
    }

    fn error_rate(&self) -> f64 {
        let finished = self.successes + self.errors;
        if finished == 0 {
            0.0
        } else {
            self.errors as f64 / finished as f64
        }
    }
}

/// The mean of `samples`, 0 without any (as Higress).
fn mean(samples: &VecDeque<f64>) -> f64 {
    if samples.is_empty() {
        0.0
    } else {
        samples.iter().sum::<f64>() / samples.len() as f64
    }
}

/// `old` smoothed with `sample`; the first sample is taken as is.
fn ewma(old: Option<f64>, sample: f64, beta: f64) -> f64 {
    match old {
        None => sample,
        Some(old) => beta * old + (1.0 - beta) * sample,
    }
}

/// Append `sample`, keeping the last `size`.
fn push_window(window: &mut VecDeque<f64>, sample: f64, size: usize) {
    window.push_back(sample);
    while window.len() > size {
        window.pop_front();
    }
}

/// The pool's figures on this replica.
#[derive(Debug)]
struct State {
    /// Indexed by [`EndpointId::index`].
    endpoints: Vec<Stats>,
    /// The pool's last `queue_size` picks, oldest first.
    recent: VecDeque<EndpointId>,
    /// Without shared counts, each session's or stored response's endpoint, until when.
    keys: LruCache<u64, (EndpointId, Instant)>,
}

impl State {
    fn stats(&self, id: EndpointId) -> Option<&Stats> {
        self.endpoints.get(id.index())
    }

    fn stats_mut(&mut self, index: usize) -> &mut Stats {
        if index >= self.endpoints.len() {
            self.endpoints.resize_with(index + 1, Stats::default);
        }
        &mut self.endpoints[index]
    }

    /// Count a pick of `endpoint`: one more in flight, and among the last `window` picks.
    fn picked(&mut self, endpoint: EndpointId, window: usize) {
        self.stats_mut(endpoint.index()).inflight += 1;
        self.count_pick(endpoint, window);
    }

    /// Remember a pick of `endpoint` among the last `window`.
    fn count_pick(&mut self, endpoint: EndpointId, window: usize) {
        self.recent.push_back(endpoint);
        self.stats_mut(endpoint.index()).recent_picks += 1;
        while self.recent.len() > window {
            if let Some(old) = self.recent.pop_front() {
                let s = self.stats_mut(old.index());
                s.recent_picks = s.recent_picks.saturating_sub(1);
            }
        }
    }
}

/// The settings and figures the policy and its leases share.
struct Shared {
    config: LatencyAwareConfig,
    state: Mutex<State>,
}

impl Shared {
    /// A time to first token of `ms` on `endpoint`.
    fn record_ttft(&self, endpoint: usize, ms: f64) {
        let (beta, size) = (self.config.ewma_beta, self.config.queue_size);
        let mut state = self.state.lock();
        let s = state.stats_mut(endpoint);
        s.ewma_ttft = Some(ewma(s.ewma_ttft, ms, beta));
        push_window(&mut s.ttfts, ms, size);
    }

    /// An attempt on `endpoint` ended at `now` with `outcome` after `ms` in all.
    fn record_end(&self, endpoint: usize, outcome: Outcome, ms: f64, now: Instant) {
        let (beta, size) = (self.config.ewma_beta, self.config.queue_size);
        let cooldown = self.config.failure_cooldown;
        let mut state = self.state.lock();
        let s = state.stats_mut(endpoint);
        match outcome {
            Outcome::Completed => {
                s.ewma_total = Some(ewma(s.ewma_total, ms, beta));
                push_window(&mut s.totals, ms, size);
                s.successes += 1;
                s.consecutive_errors = 0;
            }
            Outcome::Failed => {
                s.errors += 1;
                s.consecutive_errors += 1;
                s.cooldown_until = now.checked_add(cooldown).or(s.cooldown_until);
            }
            Outcome::Aborted | Outcome::Dropped => {}
        }
    }

    /// `endpoint`'s request is no longer in flight.
    fn release(&self, endpoint: usize) {
        let mut state = self.state.lock();
        let s = state.stats_mut(endpoint);
        s.inflight = s.inflight.saturating_sub(1);
    }

    /// The adaptive score of an endpoint with `s` (lower is better); [`Stats::default`] for one
    /// never picked.
    fn score(&self, s: &Stats, now: Instant) -> f64 {
        let mut inflight = s.inflight as f64 + 1.0;
        if s.in_cooldown(now) {
            inflight += s.consecutive_errors as f64 + 1.0;
        }
        self.latency_score(s) * inflight
    }

    /// The score's latency and error part: `latency × (1 + error_penalty × error_rate)`, 1 for an
    /// endpoint without samples.
    fn latency_score(&self, s: &Stats) -> f64 {
        let c = &self.config;
        let (ttft, total) = match (s.ewma_ttft, s.ewma_total) {
            (None, None) => return 1.0,
            (Some(t), None) | (None, Some(t)) => (t, t),
            (Some(ttft), Some(total)) => (ttft, total),
        };
        let latency =
            c.ttft_weight * (ttft + 1.0).sqrt() + c.total_latency_weight * (total + 1.0).sqrt();
        latency * (1.0 + c.error_penalty * s.error_rate())
    }

    /// With shared in-flight counts, the score without its load, which the store multiplies by
    /// the endpoint's requests in flight over every replica plus one: the latency part, times
    /// `consecutive_errors + 2` while cooling down (the local score's extra load with none in
    /// flight). In thousandths, at least 1.
    fn unloaded_score(&self, s: &Stats, now: Instant) -> u64 {
        let cooling = if s.in_cooldown(now) {
            s.consecutive_errors as f64 + 2.0
        } else {
            1.0
        };
        let milli = (self.latency_score(s) * cooling * 1000.0).round();
        if milli.is_finite() && milli >= 1.0 {
            milli.min(u64::MAX as f64) as u64
        } else {
            1
        }
    }

    /// The candidate for this request and why, with `state` locked; records nothing. Without
    /// `p2c`, every candidate is ranked.
    fn choose(
        &self,
        state: &State,
        candidates: &[EndpointId],
        now: Instant,
        p2c: bool,
        rng: &mut impl Rng,
    ) -> Result<(EndpointId, &'static str), PolicyError> {
        let reason = match self.config.mode {
            LatencyMode::AdaptiveScore => REASON_SCORE,
            LatencyMode::LeastBusy => REASON_LEAST_BUSY,
            LatencyMode::LeastFirstTokenLatency => REASON_LEAST_TTFT,
            LatencyMode::LeastTotalLatency => REASON_LEAST_TOTAL,
        };
        match candidates {
            [] => return Err(PolicyError::Unavailable("no candidates".into())),
            [only] => return Ok((*only, reason)),
            _ => {}
        }
        let default = Stats::default();
        let stats = |c: EndpointId| state.stats(c).unwrap_or(&default);
        let value = |c: EndpointId| match self.config.mode {
            LatencyMode::AdaptiveScore => self.score(stats(c), now),
            LatencyMode::LeastBusy => stats(c).inflight as f64,
            LatencyMode::LeastFirstTokenLatency => mean(&stats(c).ttfts),
            LatencyMode::LeastTotalLatency => mean(&stats(c).totals),
        };
        let (pool, skipped) = self.sample(state, candidates, now, p2c, rng);
        let ranked: Vec<(EndpointId, f64)> = pool.into_iter().map(|c| (c, value(c))).collect();
        let chosen =
            lowest(&ranked, rng).ok_or_else(|| PolicyError::Unavailable("no candidates".into()))?;
        let least = value(chosen);
        let limited = skipped.into_iter().any(|c| value(c) < least);
        Ok((chosen, if limited { REASON_RATE_LIMITED } else { reason }))
    }

    /// The candidates to rank, and those skipped for `rate_limit`: below the rate limit; for
    /// `AdaptiveScore` also not cooling down (while some are not) and, with `p2c`,
    /// `p2c_choices` of them at random.
    fn sample(
        &self,
        state: &State,
        candidates: &[EndpointId],
        now: Instant,
        p2c: bool,
        rng: &mut impl Rng,
    ) -> (Vec<EndpointId>, Vec<EndpointId>) {
        let (mut pool, skipped) = self.below_rate_limit(state, candidates);
        if self.config.mode == LatencyMode::AdaptiveScore {
            pool = not_cooling(state, pool, now);
            if p2c && self.config.p2c_choices < pool.len() {
                pool = pool
                    .choose_multiple(rng, self.config.p2c_choices)
                    .copied()
                    .collect();
            }
        }
        (pool, skipped)
    }

    /// The candidates whose share of the pool's recent picks is below `rate_limit` (all of them
    /// when none is), and those skipped.
    fn below_rate_limit(
        &self,
        state: &State,
        candidates: &[EndpointId],
    ) -> (Vec<EndpointId>, Vec<EndpointId>) {
        if state.recent.is_empty() {
            return (candidates.to_vec(), Vec::new());
        }
        let picks = state.recent.len() as f64;
        let (below, over): (Vec<EndpointId>, Vec<EndpointId>) =
            candidates.iter().copied().partition(|&c| {
                let mine = state.stats(c).map_or(0, |s| s.recent_picks);
                (mine as f64 / picks) < self.config.rate_limit
            });
        if below.is_empty() {
            (over, Vec::new())
        } else {
            (below, over)
        }
    }

    /// Choose for `candidates` at `now` and count the pick (in flight, recent picks) under one
    /// lock, so concurrent picks see each other.
    #[cfg(test)]
    fn pick(
        &self,
        candidates: &[EndpointId],
        now: Instant,
        rng: &mut impl Rng,
    ) -> Result<(EndpointId, &'static str), PolicyError> {
        self.pick_keyed(candidates, None, now, rng)
    }

    /// [`Shared::pick`] for a request that sticks to a key (a session, a stored response) kept
    /// in this replica's memory: its endpoint, unless it cools down or is too busy by the key's
    /// guard (in this replica's requests in flight); otherwise the mode's choice among all
    /// candidates. The chosen endpoint becomes the key's.
    fn pick_keyed(
        &self,
        candidates: &[EndpointId],
        key: Option<(Sticky, Reasons)>,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Result<(EndpointId, &'static str), PolicyError> {
        let mut state = self.state.lock();
        let (mut endpoint, mut reason) =
            self.choose(&state, candidates, now, key.is_none(), rng)?;
        if let Some((sticky, reasons)) = key {
            let eligible = not_cooling(&state, candidates.to_vec(), now);
            let counts: Vec<u64> = candidates
                .iter()
                .map(|&c| state.stats(c).map_or(0, |s| s.inflight))
                .collect();
            let holder = state
                .keys
                .get(&sticky.key)
                .filter(|(_, until)| *until > now)
                .map(|(e, _)| *e)
                .filter(|h| eligible.contains(h));
            let holders: Vec<usize> = holder
                .and_then(|h| candidates.iter().position(|&c| c == h))
                .into_iter()
                .collect();
            let chosen = candidates.iter().position(|&c| c == endpoint).unwrap_or(0);
            let (i, outcome) = sticky_choice(&counts, &holders, sticky.guard, chosen);
            endpoint = candidates.get(i).copied().unwrap_or(endpoint);
            reason = outcome_reason(reasons, outcome);
            let until = now.checked_add(sticky.ttl).unwrap_or(now);
            state.keys.put(sticky.key, (endpoint, until));
        }
        state.picked(endpoint, self.config.queue_size);
        Ok((endpoint, reason))
    }
}

/// The endpoints of `pool` not cooling down after a failure; all of them when every one is.
fn not_cooling(state: &State, pool: Vec<EndpointId>, now: Instant) -> Vec<EndpointId> {
    let cool: Vec<EndpointId> = pool
        .iter()
        .copied()
        .filter(|&c| !state.stats(c).is_some_and(|s| s.in_cooldown(now)))
        .collect();
    if cool.is_empty() {
        pool
    } else {
        cool
    }
}

/// The entry of `ranked` with the lowest value, ties at random.
fn lowest(ranked: &[(EndpointId, f64)], rng: &mut impl Rng) -> Option<EndpointId> {
    let least = ranked.iter().map(|(_, v)| *v).fold(f64::INFINITY, f64::min);
    let tied: Vec<EndpointId> = ranked
        .iter()
        .filter(|(_, v)| *v <= least)
        .map(|(c, _)| *c)
        .collect();
    tied.choose(rng).copied()
}

/// The policy of one pool.
pub struct LatencyAware {
    shared: Arc<Shared>,
    /// In-flight counts shared by every replica (`global_inflight_enabled`).
    counts: Option<Arc<PoolCounts>>,
}

impl LatencyAware {
    /// The policy over a pool of `endpoints` endpoints with `config`.
    pub fn new(endpoints: usize, config: LatencyAwareConfig) -> Self {
        LatencyAware {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(State {
                    endpoints: vec![Stats::default(); endpoints],
                    recent: VecDeque::with_capacity(config.queue_size + 1),
                    keys: LruCache::new(NonZeroUsize::MIN.saturating_add(MAX_LOCAL_KEYS - 1)),
                }),
            }),
            counts: None,
        }
    }

    /// The policy scoring `AdaptiveScore` with the in-flight counts of every replica in
    /// `counts` (`global_inflight_enabled`).
    pub fn sharing(self, counts: Arc<PoolCounts>) -> Self {
        LatencyAware {
            counts: Some(counts),
            ..self
        }
    }

    /// The key `input`'s request sticks to, if any ([`sticky`]; the guard in requests).
    fn sticky_key(&self, input: &PickInput<'_>) -> Option<(Sticky, Reasons)> {
        sticky(input.request, self.shared.config.sessions, 1)
    }

    /// How long to remember which endpoint stored the response `input`'s answer will name: a
    /// Responses API request's.
    fn remember(&self, input: &PickInput<'_>) -> Option<Duration> {
        (input.request.api == Api::Responses).then_some(self.shared.config.sessions.ttl)
    }

    /// `AdaptiveScore` over the shared counts: the sampled candidates' scores without their
    /// load go to the store, which picks the least `score × (in flight everywhere + 1)` and
    /// counts it in one round trip. `None` when the store cannot answer (the local score then
    /// decides, as the other store policies fall back).
    async fn pick_shared(
        &self,
        counts: &Arc<PoolCounts>,
        input: &PickInput<'_>,
        key: Option<(Sticky, Reasons)>,
        now: Instant,
    ) -> Result<Option<Pick>, PolicyError> {
        let (sample, scale) = {
            let state = self.shared.state.lock();
            let sample = match key {
                // A key's endpoint is kept whatever its share of recent picks.
                Some(_) => not_cooling(&state, input.candidates.to_vec(), now),
                None => {
                    let mut rng = rand::thread_rng();
                    self.shared
                        .sample(&state, input.candidates, now, true, &mut rng)
                        .0
                }
            };
            let default = Stats::default();
            let scale: Vec<u64> = sample
                .iter()
                .map(|&c| {
                    self.shared
                        .unloaded_score(state.stats(c).unwrap_or(&default), now)
                })
                .collect();
            (sample, scale)
        };
        let labels = PickInput {
            candidates: &sample,
            ..*input
        }
        .candidate_labels()?;
        let ones = vec![1; sample.len()];
        let query = CostQuery {
            candidates: &labels,
            base: &ones,
            weights: &ones,
            load_per_mille: 1000,
            tie_per_mille: 0,
            scale: &scale,
            sticky: key.map(|(s, _)| s),
        };
        let (i, reason) = match counts.acquire_cost(query).await {
            Ok((i, acquired)) => match (key, acquired.sticky) {
                (Some((_, reasons)), Some(outcome)) => (i, outcome_reason(reasons, outcome)),
                _ => (i, REASON_SCORE),
            },
            Err(Skip::Saturated) => return Err(PolicyError::Saturated),
            Err(Skip::Fallback(reason)) => {
                telemetry::count_fallback(counts.pool(), reason);
                return Ok(None);
            }
        };
        let (endpoint, label) = (sample[i], labels[i]);
        self.shared
            .state
            .lock()
            .picked(endpoint, self.shared.config.queue_size);
        Ok(Some(Pick {
            endpoint,
            reason,
            lease: Some(Box::new(LatencyLease {
                shared: self.shared.clone(),
                endpoint: endpoint.index(),
                picked: now,
                store: Some((counts.clone(), label.to_owned())),
                remember: self.remember(input),
            })),
        }))
    }
}

/// One attempt's measurements: time to first byte and to the end, and its in-flight count.
struct LatencyLease {
    shared: Arc<Shared>,
    endpoint: usize,
    picked: Instant,
    /// The shared count held (`global_inflight_enabled`): the store and the endpoint's label.
    store: Option<(Arc<PoolCounts>, String)>,
    /// How long to remember where the response the answer names is stored, if it is one.
    remember: Option<Duration>,
}

impl Lease for LatencyLease {
    fn first_byte(&mut self) {
        let ms = self.picked.elapsed().as_secs_f64() * 1000.0;
        self.shared.record_ttft(self.endpoint, ms);
    }

    fn produced(&mut self, id: &str) {
        let Some(ttl) = self.remember.take() else {
            return;
        };
        let key = response_key(id);
        match &self.store {
            Some((counts, label)) => counts.remember(key, label, ttl),
            None => {
                let now = Instant::now();
                let until = now.checked_add(ttl).unwrap_or(now);
                let endpoint = EndpointId::new(self.endpoint);
                self.shared.state.lock().keys.put(key, (endpoint, until));
            }
        }
    }

    fn release(self: Box<Self>, outcome: Outcome) {
        let now = Instant::now();
        let ms = now.saturating_duration_since(self.picked).as_secs_f64() * 1000.0;
        self.shared.record_end(self.endpoint, outcome, ms, now);
        // Drop ends the in-flight count.
    }
}

impl Drop for LatencyLease {
    fn drop(&mut self) {
        self.shared.release(self.endpoint);
        if let Some((counts, label)) = self.store.take() {
            counts.release(&label);
        }
    }
}

#[async_trait]
impl Policy for LatencyAware {
    fn name(&self) -> &'static str {
        PolicyKind::LatencyAware.name()
    }

    fn reasons(&self) -> &'static [&'static str] {
        &[
            REASON_SCORE,
            REASON_LEAST_BUSY,
            REASON_LEAST_TTFT,
            REASON_LEAST_TOTAL,
            REASON_RATE_LIMITED,
            "session_hit",
            "session_diverted",
            "session_new",
            "response_hit",
            "response_new",
        ]
    }

    async fn pick(&self, input: PickInput<'_>) -> Result<Pick, PolicyError> {
        let now = Instant::now();
        let key = self.sticky_key(&input);
        if let Some(counts) = &self.counts {
            if let Some(pick) = self.pick_shared(counts, &input, key, now).await? {
                return Ok(pick);
            }
        }
        let (endpoint, reason) =
            self.shared
                .pick_keyed(input.candidates, key, now, &mut rand::thread_rng())?;
        Ok(Pick {
            endpoint,
            reason,
            lease: Some(Box::new(LatencyLease {
                shared: self.shared.clone(),
                endpoint: endpoint.index(),
                picked: now,
                store: None,
                remember: self.remember(&input),
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::LoadGuard;
    use crate::policy::local::SESSION_REASONS;
    use crate::policy::testing::{histogram, ids};

    fn config(mode: LatencyMode) -> LatencyAwareConfig {
        LatencyAwareConfig {
            mode,
            ..LatencyAwareConfig::default()
        }
    }

    fn policy(n: usize, config: LatencyAwareConfig) -> LatencyAware {
        LatencyAware::new(n, config)
    }

    /// Without shared counts a session is kept in this replica's memory: on its endpoint
    /// whatever the scores and the rate limit, until that endpoint carries more than the guard
    /// allows or cools down; then the session moves with the pick.
    #[test]
    fn local_sessions_stick_within_the_guard_and_move() {
        let p = policy(3, config(LatencyMode::AdaptiveScore));
        let (now, mut rng) = (Instant::now(), rand::thread_rng());
        let key = Some((
            Sticky {
                key: 7,
                guard: LoadGuard {
                    absolute: 2,
                    per_mille: 0,
                },
                ttl: Duration::from_secs(60),
            },
            SESSION_REASONS,
        ));
        let pick = |key| {
            p.shared
                .pick_keyed(&ids(3), key, now, &mut rand::thread_rng())
        };
        let (home, reason) = pick(key).expect("pick");
        assert_eq!(reason, "session_new");
        // Kept while home carries up to 2 more than the least loaded (these picks stay in
        // flight), though its score is then the worst and it took every recent pick.
        for _ in 0..2 {
            assert_eq!(pick(key).expect("pick"), (home, "session_hit"));
        }
        let (moved, reason) = pick(key).expect("pick");
        assert_eq!(reason, "session_diverted");
        assert_ne!(moved, home);
        assert_eq!(pick(key).expect("pick"), (moved, "session_hit"));
        // Cooling down after a failure, its endpoint is no holder any more (as one no longer a
        // candidate): the session is placed anew.
        p.shared
            .record_end(moved.index(), Outcome::Failed, 1.0, Instant::now());
        let (again, reason) = p
            .shared
            .pick_keyed(&ids(3), key, Instant::now(), &mut rng)
            .expect("pick");
        assert_eq!(reason, "session_new");
        assert_ne!(again, moved);
        // Without a key the scores decide as before.
        assert_eq!(pick(None).expect("pick").1, REASON_SCORE);
    }

    /// `n` completed attempts on `endpoint` of `ttft` and `total` ms (without counting picks).
    fn measured(p: &LatencyAware, endpoint: usize, ttft: f64, total: f64, n: usize) {
        for _ in 0..n {
            p.shared.record_ttft(endpoint, ttft);
            p.shared
                .record_end(endpoint, Outcome::Completed, total, Instant::now());
        }
    }

    fn stats(p: &LatencyAware, endpoint: usize) -> Stats {
        p.shared.state.lock().endpoints[endpoint].clone()
    }

    /// Count a pick of each of `endpoints` among the recent ones, so that none of the next picks
    /// (up to `queue_size`) finds one endpoint with every recent pick (`rate_limit` 1).
    fn seen(p: &LatencyAware, endpoints: &[usize]) {
        let mut state = p.shared.state.lock();
        for &e in endpoints {
            state.count_pick(EndpointId::new(e), p.shared.config.queue_size);
        }
    }

    /// Pick `n` times at `now` among `candidates`, each pick released before the next.
    fn picks(
        p: &LatencyAware,
        candidates: &[EndpointId],
        now: Instant,
        n: usize,
    ) -> Vec<(usize, &'static str)> {
        let mut rng = rand::thread_rng();
        (0..n)
            .map(|_| {
                let (e, r) = p.shared.pick(candidates, now, &mut rng).expect("pick");
                p.shared.release(e.index());
                (e.index(), r)
            })
            .collect()
    }

    #[test]
    fn the_score_is_higress_formula() {
        let p = policy(1, LatencyAwareConfig::default());
        let now = Instant::now();
        let s = Stats {
            inflight: 2,
            ewma_ttft: Some(99.0),
            ewma_total: Some(399.0),
            successes: 3,
            errors: 1,
            ..Stats::default()
        };
        // latency = 0.7·√100 + 0.3·√400 = 13; inflight 3; error rate 1/4 → ×1.75.
        assert!((p.shared.score(&s, now) - 13.0 * 3.0 * 1.75).abs() < 1e-9);
        // One time stands in for the other.
        let only_ttft = Stats {
            ewma_ttft: Some(99.0),
            ..Stats::default()
        };
        assert!((p.shared.score(&only_ttft, now) - 10.0).abs() < 1e-9);
        let only_total = Stats {
            ewma_total: Some(99.0),
            ..Stats::default()
        };
        assert!((p.shared.score(&only_total, now) - 10.0).abs() < 1e-9);
        // No sample: in-flight alone (least_busy).
        let unknown = Stats {
            inflight: 4,
            errors: 2,
            ..Stats::default()
        };
        assert_eq!(p.shared.score(&unknown, now), 5.0);
        // In cooldown: in-flight + consecutive errors + 1.
        let cooling = Stats {
            consecutive_errors: 2,
            cooldown_until: Some(now + Duration::from_secs(1)),
            ..unknown.clone()
        };
        assert_eq!(p.shared.score(&cooling, now), 5.0 + 3.0);
        assert_eq!(
            p.shared.score(&cooling, now + Duration::from_secs(2)),
            5.0,
            "the cooldown is over"
        );
    }

    #[test]
    fn latencies_are_smoothed_and_windowed() {
        let p = policy(
            1,
            LatencyAwareConfig {
                ewma_beta: 0.25,
                queue_size: 2,
                ..LatencyAwareConfig::default()
            },
        );
        p.shared.record_ttft(0, 100.0);
        assert_eq!(stats(&p, 0).ewma_ttft, Some(100.0), "first sample as is");
        p.shared.record_ttft(0, 200.0);
        // 0.25·100 + 0.75·200
        assert_eq!(stats(&p, 0).ewma_ttft, Some(175.0));
        p.shared.record_ttft(0, 300.0);
        assert_eq!(mean(&stats(&p, 0).ttfts), 250.0, "the last two samples");
        let now = Instant::now();
        p.shared.record_end(0, Outcome::Completed, 40.0, now);
        p.shared.record_end(0, Outcome::Aborted, 1.0, now);
        p.shared.record_end(0, Outcome::Dropped, 1.0, now);
        let s = stats(&p, 0);
        assert_eq!((s.ewma_total, s.successes, s.errors), (Some(40.0), 1, 0));
        p.shared.record_end(0, Outcome::Failed, 1.0, now);
        p.shared.record_end(0, Outcome::Failed, 1.0, now);
        let s = stats(&p, 0);
        assert_eq!(
            (s.ewma_total, s.errors, s.consecutive_errors),
            (Some(40.0), 2, 2)
        );
        assert!(s.in_cooldown(now + Duration::from_secs(29)));
        assert!(!s.in_cooldown(now + Duration::from_secs(31)));
        p.shared.record_end(0, Outcome::Completed, 40.0, now);
        assert_eq!(stats(&p, 0).consecutive_errors, 0);
    }

    #[test]
    fn adaptive_score_prefers_the_fast_endpoint_and_counts_in_flight() {
        let p = policy(2, LatencyAwareConfig::default());
        measured(&p, 0, 300.0, 500.0, 3);
        measured(&p, 1, 10.0, 50.0, 3);
        seen(&p, &[0]);
        let now = Instant::now();
        for (e, r) in picks(&p, &ids(2), now, 20) {
            assert_eq!((e, r), (1, REASON_SCORE));
        }
        // Endpoint 1 scores 0.7·√11 + 0.3·√51 ≈ 4.46 per request in flight, endpoint 0 about
        // 18.8: with four in flight on 1 (score ≈ 22) the next goes to 0.
        let mut rng = rand::thread_rng();
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(p.shared.pick(&ids(2), now, &mut rng).expect("pick").0);
        }
        assert!(held.iter().all(|e| e.index() == 1), "{held:?}");
        let (e, _) = p.shared.pick(&ids(2), now, &mut rng).expect("pick");
        assert_eq!(e.index(), 0);
        assert_eq!(stats(&p, 1).inflight, 4);
    }

    #[test]
    fn cooldown_is_avoided_while_an_alternative_exists_and_ends() {
        let p = policy(2, LatencyAwareConfig::default());
        // Endpoint 0 is much faster, but fails once.
        measured(&p, 0, 5.0, 10.0, 5);
        measured(&p, 1, 500.0, 900.0, 5);
        seen(&p, &[0]);
        let now = Instant::now();
        p.shared.record_end(0, Outcome::Failed, 1.0, now);
        for (e, _) in picks(&p, &ids(2), now + Duration::from_secs(1), 10) {
            assert_eq!(e, 1, "in cooldown");
        }
        // Alone, a cooling endpoint is still picked.
        assert_eq!(
            picks(&p, &[EndpointId::new(0)], now + Duration::from_secs(1), 1)[0].0,
            0
        );
        // Both cooling: the score decides (0's is still far lower).
        p.shared.record_end(1, Outcome::Failed, 1.0, now);
        assert_eq!(picks(&p, &ids(2), now + Duration::from_secs(1), 1)[0].0, 0);
        // After the cooldown, endpoint 0 is used again.
        let later = now + Duration::from_secs(31);
        for (e, r) in picks(&p, &ids(2), later, 10) {
            assert_eq!((e, r), (0, REASON_SCORE));
        }
    }

    #[test]
    fn p2c_samples_distinct_candidates_and_considers_all_when_few() {
        // One pick of a fresh policy over six endpoints: five measured, one without samples
        // (the lowest score). With p2c_choices ≥ 6 it always wins; with 2 only when sampled (2
        // of 6: a third of the time).
        let one_pick = |choices: usize, candidates: &[EndpointId]| {
            let p = policy(
                6,
                LatencyAwareConfig {
                    p2c_choices: choices,
                    ..LatencyAwareConfig::default()
                },
            );
            for e in 0..5 {
                measured(&p, e, 100.0 * (e + 1) as f64, 100.0, 1);
            }
            picks(&p, candidates, Instant::now(), 1)[0].0
        };
        for choices in [6, 7, 100] {
            assert!((0..50).all(|_| one_pick(choices, &ids(6)) == 5));
        }
        let to_unknown = (0..600).filter(|_| one_pick(2, &ids(6)) == 5).count();
        assert!((120..=280).contains(&to_unknown), "{to_unknown} of 600");
        // The two sampled are distinct: the worst of three never wins.
        let three = [0, 1, 4].map(EndpointId::new);
        assert!((0..300).all(|_| one_pick(2, &three) != 4));
    }

    #[test]
    fn rate_limit_caps_a_share_of_recent_picks() {
        let p = policy(
            2,
            LatencyAwareConfig {
                rate_limit: 0.5,
                queue_size: 10,
                ..LatencyAwareConfig::default()
            },
        );
        measured(&p, 0, 1.0, 1.0, 1);
        measured(&p, 1, 900.0, 900.0, 1);
        let out = picks(&p, &ids(2), Instant::now(), 100);
        // Alternating, except when the window holds as many of each (0.5 each: none is below,
        // so the score decides).
        let fast = out.iter().filter(|(e, _)| *e == 0).count();
        assert!((50..=56).contains(&fast), "{out:?}");
        assert!(out.iter().all(|&(e, r)| e == 0 || r == REASON_RATE_LIMITED));
        // Default 1: an endpoint that took every one of the last queue_size picks yields one.
        let p = policy(
            2,
            LatencyAwareConfig {
                queue_size: 10,
                ..LatencyAwareConfig::default()
            },
        );
        measured(&p, 0, 1.0, 1.0, 1);
        measured(&p, 1, 900.0, 900.0, 1);
        let out = picks(&p, &ids(2), Instant::now(), 100);
        let slow = out.iter().filter(|(e, _)| *e == 1).count();
        assert!((9..=10).contains(&slow), "{out:?}");
        assert!(out
            .iter()
            .all(|&(e, r)| (e, r) == (0, REASON_SCORE) || (e, r) == (1, REASON_RATE_LIMITED)));
    }

    #[test]
    fn missing_metrics_go_by_least_in_flight() {
        // Every candidate compared (p2c_choices 3 of 3).
        let p = policy(
            3,
            LatencyAwareConfig {
                p2c_choices: 3,
                ..LatencyAwareConfig::default()
            },
        );
        seen(&p, &[0, 1, 2]);
        let mut rng = rand::thread_rng();
        let now = Instant::now();
        // Nothing measured: each pick goes where the fewest are in flight.
        let mut held = [0; 3];
        for _ in 0..9 {
            let (e, r) = p.shared.pick(&ids(3), now, &mut rng).expect("pick");
            assert_eq!(r, REASON_SCORE);
            held[e.index()] += 1;
        }
        assert_eq!(held, [3, 3, 3]);
    }

    #[test]
    fn other_modes_rank_by_in_flight_or_mean_latency() {
        let now = Instant::now();
        let mut rng = rand::thread_rng();
        let busy = policy(2, config(LatencyMode::LeastBusy));
        seen(&busy, &[0, 1]);
        let (first, _) = busy.shared.pick(&ids(2), now, &mut rng).expect("pick");
        let (second, r) = busy.shared.pick(&ids(2), now, &mut rng).expect("pick");
        assert_ne!(first, second);
        assert_eq!(r, REASON_LEAST_BUSY);
        for (mode, reason) in [
            (LatencyMode::LeastFirstTokenLatency, REASON_LEAST_TTFT),
            (LatencyMode::LeastTotalLatency, REASON_LEAST_TOTAL),
        ] {
            let p = policy(
                3,
                LatencyAwareConfig {
                    rate_limit: 0.9,
                    ..config(mode)
                },
            );
            measured(&p, 0, 50.0, 50.0, 2);
            measured(&p, 1, 10.0, 10.0, 2);
            measured(&p, 2, 90.0, 90.0, 2);
            let out = picks(&p, &ids(3), now, 20);
            assert!(out
                .iter()
                .all(|&(e, r)| (e == 1 && r == reason) || r == REASON_RATE_LIMITED));
            assert!(out.iter().filter(|(e, _)| *e == 1).count() >= 17, "{out:?}");
            // An endpoint without samples counts 0, as in Higress.
            let fresh = policy(2, config(mode));
            measured(&fresh, 0, 10.0, 10.0, 1);
            assert_eq!(picks(&fresh, &ids(2), now, 1)[0].0, 1);
        }
    }

    #[tokio::test]
    async fn leases_measure_and_release() {
        let p = policy(2, LatencyAwareConfig::default());
        let endpoints = crate::policy::testing::views(&[1, 1]);
        let request = crate::request::LlmRequest::empty();
        let pick = p
            .pick(PickInput {
                request: &request,
                endpoints: &endpoints,
                candidates: &ids(2),
            })
            .await
            .expect("pick");
        let e = pick.endpoint.index();
        assert_eq!(stats(&p, e).inflight, 1);
        let mut lease = pick.lease.expect("a lease");
        lease.first_byte();
        lease.release(Outcome::Completed);
        let s = stats(&p, e);
        assert_eq!(s.inflight, 0);
        assert!(s.ewma_ttft.is_some() && s.ewma_total.is_some() && s.successes == 1);
        // A lease dropped without a release still ends its in-flight count.
        let counts = histogram(&p, &[1, 1], &ids(2), 4).await;
        assert_eq!(counts.iter().sum::<usize>(), 4);
        assert_eq!(stats(&p, 0).inflight + stats(&p, 1).inflight, 0);
    }
}
