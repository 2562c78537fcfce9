//! `kv_aware`: send each request where it is expected to get its first token soonest — the
//! candidate with the least **uncached prompt tokens plus tokens already in flight**.
//!
//! - **Tokens.** The prompt is tokenized as the engine does ([`Tokenizer::Exact`]: the model's
//!   chat template and tokenizer) or approximately without a tokenizer; its full blocks of
//!   `blockSize` tokens are keyed by [`crate::kv_blocks`].
//! - **What each engine holds.** The pool's [`KvIndex`] knows, per endpoint, the blocks its
//!   engine reported in its KV-cache events (stored, removed, cleared) plus what llm-lb routed to
//!   it in the last `predictedTtlMs` (predicted, until the engine confirms). What llm-lb routed
//!   there and the engine evicted since counts `routedWeight` of a block (the index's routed
//!   history, kept `redisKeyTTL` from the last routing), so that content nobody holds any more
//!   goes back where it was placed. For an endpoint without events, what llm-lb routed there is
//!   all it knows: those entries last `redisKeyTTL` from their last use (as `prefix_cache`'s),
//!   within the index's bound. The cached prefix of a candidate is its number of leading blocks
//!   held (routed-and-evicted blocks by their weight).
//! - **One cost.** For candidate *e*:
//!   `(prefillWeight + evictionWeight × full(e)) × uncached(e) + loadWeight × load(e)`,
//!   where `uncached(e)` is the prompt tokens not in *e*'s cache, `full(e)` how full *e*'s cache
//!   is by its KV events (0 to 1, [`KvIndex::matched_and_fullness`]: on a full cache each
//!   uncached token evicts a cached one, which may be needed again), and `load(e)` the tokens in
//!   flight on *e* over every gateway replica (each request counts its uncached prompt tokens
//!   until the first byte of its answer, and `decodeTokens`, or its `max_tokens` when smaller,
//!   until its end), kept in the store. With `queueWeight` (default 0) the engines' own queues
//!   are scraped too ([`MetricsBoard`]): each request an engine reports waiting adds that much
//!   of a request like this one to its cost, for what llm-lb's count does not see (traffic that
//!   bypasses it). The store picks the least cost and counts the request in
//!   the same round trip ([`crate::store::InflightStore::acquire_cost`]); candidates within
//!   `tieTolerance` of the least are chosen among at random so that bursts do not herd.
//! - **New content.** A prompt that costs the same on every candidate (none holds more of it)
//!   goes to the candidates with the fewest requests in flight from this replica, by the cost
//!   among those: it commits a conversation to an engine, and a token count swings with every
//!   prefill.
//!
//! - **Sessions and stored responses.** A request that names a session (the pool's
//!   `session_affinity`) goes where the session's last request went, in the same round trip
//!   ([`crate::store::Sticky`]), unless that endpoint is too busy by the load guard
//!   (`loadGuardAbsolute`, default 8, counted in requests like this one, i.e. its tokens at the
//!   candidate that holds most of it; `loadGuardRelative`, default 0.5, of the least loaded
//!   candidate's tokens) above the least loaded candidate. Then, and for a session's first request, the cost decides, and
//!   the session follows (`session_hit`, `session_diverted`, `session_new`). A Responses API request that continues
//!   a stored response (`previous_response_id`) goes to the endpoint that stored it whatever its
//!   load (`response_hit`, `response_new`; learnt from the answers, as in `prefix_cache`). Both
//!   keys last `redisKeyTTL` from their last use.
//!
//! Reasons otherwise: `kv_hit` (the chosen endpoint holds the longest cached prefix of any
//! candidate), `kv_load` (another held more, but its load made it costlier), `kv_miss` (no
//! candidate holds any block), `local_least_request` (the store could not answer: fewest
//! requests in flight from this replica). Every pick's scores are logged at debug level.

mod tokens;

pub use tokens::{EngineTokenizer, Tokenizer};

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::local::{local_inflight, local_least, outcome_reason, request_lease_units, sticky};
use super::{Pick, PickInput, Policy, PolicyError};
use crate::config::{KvAwareSettings, PolicyKind, PrefixSettings};
use crate::kv_blocks::{chain_keys, BlockKey};
use crate::kv_events::KvIndex;
use crate::scrape::MetricsBoard;
use crate::store::{CostQuery, PoolCounts, Skip};
use crate::telemetry;

/// Blocks of a prompt keyed and looked up, at most (with 16-token blocks, the first 64 Ki tokens).
pub const MAX_KEYED_BLOCKS: usize = 4096;

/// The policy of one pool.
pub struct KvAware {
    counts: Arc<PoolCounts>,
    index: Arc<KvIndex>,
    tokenizer: Tokenizer,
    settings: KvAwareSettings,
    board: Option<Arc<MetricsBoard>>,
}

impl KvAware {
    /// Count load in `counts`, look cached blocks up in `index`, tokenize with `tokenizer`.
    pub fn new(
        counts: Arc<PoolCounts>,
        index: Arc<KvIndex>,
        tokenizer: Tokenizer,
        settings: KvAwareSettings,
    ) -> Self {
        KvAware {
            counts,
            index,
            tokenizer,
            settings,
            board: None,
        }
    }

    /// Read the engines' own queues from `board` (scraped in the background), if any.
    pub fn with_board(mut self, board: Option<Arc<MetricsBoard>>) -> Self {
        self.board = board;
        self
    }

    /// The requests each candidate's engine reports waiting, by its last fresh scrape (0 when
    /// unknown or not scraped).
    fn queued(&self, input: &PickInput<'_>) -> Vec<u64> {
        let now = Instant::now();
        input
            .candidates
            .iter()
            .map(|c| {
                self.board
                    .as_ref()
                    .and_then(|b| b.view(c.index(), now))
                    .map_or(0, |k| k.snapshot.metrics.waiting)
            })
            .collect()
    }

    /// The prompt's token count and block keys. A load-only request (embeddings, rerank) has no
    /// prompt to keep warm: its input, about 4 bytes a token, counts as prefill load.
    fn keys(&self, input: &PickInput<'_>) -> (u64, Vec<BlockKey>) {
        if input.request.api.load_only() {
            return ((input.request.bytes as u64 / 4).max(1), Vec::new());
        }
        let tokens = self.tokenizer.tokens(input.request);
        let bs = self.settings.block_size;
        let keyed = tokens.len().min(MAX_KEYED_BLOCKS * bs);
        (tokens.len() as u64, chain_keys(&tokens[..keyed], bs))
    }
}

/// The decoding load a request adds: `decodeTokens`, or less when the request asks for fewer
/// (`max_completion_tokens`, `max_tokens`; Responses' `max_output_tokens`); none for a
/// load-only request.
fn decode_tokens(request: &crate::request::LlmRequest, default: u64) -> u64 {
    if request.api.load_only() {
        return 0;
    }
    let asked = request.prompt_body().and_then(|body| {
        ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| body.get(*k).and_then(serde_json::Value::as_u64))
    });
    asked.map_or(default, |n| n.min(default))
}

/// Cost added to a candidate ruled out before the load is weighed: more than any cost.
const RULED_OUT: u64 = 1 << 40;

/// New content — a prompt every candidate would prefill alike, at the same cost — commits a
/// conversation (or a shared document) to an engine for as long as it is cached there: it goes
/// to the candidates with the fewest requests in flight from this replica (each one a context
/// its engine holds), the others being ruled out, and by the cost among those. Tokens in flight
/// would place it by whichever engine happens not to be prefilling at that instant.
fn spread_new_content(input: &PickInput<'_>, base: &mut [u64]) {
    let inflight = local_inflight(input);
    let least = inflight.iter().copied().min().unwrap_or(0);
    for (b, n) in base.iter_mut().zip(&inflight) {
        if *n > least {
            *b = b.saturating_add(RULED_OUT);
        }
    }
}

/// Each candidate's cached blocks, the chosen one's reason.
fn reason(matched: &[usize], chosen: usize) -> &'static str {
    let best = matched.iter().copied().max().unwrap_or(0);
    match matched.get(chosen).copied().unwrap_or(0) {
        _ if best == 0 => "kv_miss",
        m if m == best => "kv_hit",
        _ => "kv_load",
    }
}

#[async_trait]
impl Policy for KvAware {
    fn name(&self) -> &'static str {
        PolicyKind::KvAware.name()
    }

    fn reasons(&self) -> &'static [&'static str] {
        &[
            "kv_hit",
            "kv_load",
            "kv_miss",
            "session_hit",
            "session_diverted",
            "session_new",
            "response_hit",
            "response_new",
            "local_least_request",
        ]
    }

    async fn pick(&self, input: PickInput<'_>) -> Result<Pick, PolicyError> {
        let labels = input.candidate_labels()?;
        let (prompt, keys) = self.keys(&input);
        let (matched, fullness) = self.index.matched_and_fullness(&keys, &labels);
        let routed = self.index.matched_routed(&keys, &labels);
        let bs = self.settings.block_size as u64;
        // Blocks held count whole; blocks llm-lb routed there and the engine evicted since
        // count `routedWeight` of a block.
        let uncached: Vec<u64> = matched
            .iter()
            .zip(&routed)
            .map(|(m, r)| {
                let evicted = r.saturating_sub(*m) as u64;
                let cached = *m as u64 * bs + evicted * bs * self.settings.routed_per_mille / 1000;
                prompt.saturating_sub(cached)
            })
            .collect();
        // An uncached token costs its prefill, and on a full cache the token it evicts.
        let mut base: Vec<u64> = uncached
            .iter()
            .zip(&fullness)
            .map(|(u, f)| {
                let per_million =
                    self.settings.prefill_per_mille * 1000 + self.settings.eviction_per_mille * f;
                u.saturating_mul(per_million) / 1_000_000
            })
            .collect();
        let decode = decode_tokens(input.request, self.settings.decode_tokens);
        let weights: Vec<u64> = uncached
            .iter()
            .map(|u| u.saturating_add(decode).max(1))
            .collect();
        let least_weight = weights.iter().copied().min().unwrap_or(1);
        // Each request an engine reports waiting counts like one more such request.
        let queued = self.queued(&input);
        let queue_cost = |q: u64| {
            q.saturating_mul(least_weight)
                .saturating_mul(self.settings.queue_per_mille)
                / 1000
        };
        for (b, q) in base.iter_mut().zip(&queued) {
            *b = b.saturating_add(queue_cost(*q));
        }
        if base.iter().all(|b| *b == base[0]) {
            spread_new_content(&input, &mut base);
        }
        let sessions = PrefixSettings {
            guard: self.settings.session_guard,
            ttl: self.settings.guess_ttl,
        };
        let sticky = sticky(input.request, sessions, least_weight);
        let query = CostQuery {
            candidates: &labels,
            base: &base,
            weights: &weights,
            load_per_mille: self.settings.load_per_mille,
            tie_per_mille: self.settings.tie_per_mille,
            scale: &[],
            sticky: sticky.map(|(s, _)| s),
        };
        match self.counts.acquire_cost(query).await {
            Ok((i, acquired)) => {
                let load = acquired.inflight;
                let pool = self.counts.pool();
                let cost = base[i]
                    + (load.saturating_sub(weights[i])) * self.settings.load_per_mille / 1000;
                log::debug!(
                    "pool {pool}: kv_aware prompt={prompt} tokens, {} blocks; candidates {labels:?} matched blocks {matched:?} uncached {uncached:?} fullness {fullness:?} queued {queued:?}; chose {} (cost {cost}, load after {load})",
                    keys.len(),
                    labels[i],
                );
                telemetry::observe_kv_pick(pool, (matched[i] as u64 * bs).min(prompt), cost);
                let ttl = if self.index.feeds().follows(labels[i]) {
                    if self.settings.routed_per_mille > 0 {
                        self.index
                            .remember_routed(labels[i], &keys, self.settings.guess_ttl);
                    }
                    self.settings.predicted_ttl
                } else {
                    self.settings.guess_ttl
                };
                self.index.predict(labels[i], &keys, ttl);
                let reason = match (sticky, acquired.sticky) {
                    (Some((_, reasons)), Some(outcome)) => outcome_reason(reasons, outcome),
                    _ => reason(&matched, i),
                };
                Ok(Pick {
                    endpoint: input.candidates[i],
                    reason,
                    // The prefill part of the load ends with the first byte of the answer.
                    lease: Some(request_lease_units(
                        &self.counts,
                        labels[i],
                        input.request,
                        self.settings.guess_ttl,
                        weights[i],
                        uncached[i],
                    )),
                })
            }
            Err(Skip::Saturated) => Err(PolicyError::Saturated),
            Err(Skip::Fallback(reason)) => {
                telemetry::count_fallback(self.counts.pool(), reason);
                local_least(&input, None)
            }
        }
    }
}

#[cfg(test)]
mod tests;
