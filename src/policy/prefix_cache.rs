//! `prefix_cache`: send each request to the endpoint that already holds the longest prefix of its
//! prompt in its KV cache, unless that endpoint is clearly busier than the least loaded one.
//!
//! One store round trip ([`PoolCounts::acquire_prefix`]) matches the request's chain of block keys
//! ([`crate::prefix`]) against the prefix index, chooses, counts the request in flight (as
//! `global_least_request` does) and records the chosen endpoint as a holder of every block of the
//! chain, with a sliding TTL (`redisKeyTTL`):
//!
//! - **hit** — the least loaded endpoint among the holders of the longest matched prefix;
//! - **diverted** — those holders are over the load guard (more than `max(loadGuardAbsolute,
//!   loadGuardRelative × least)` requests above the least loaded candidate) or at
//!   `maxRequestCount`: the least loaded candidate, now a further holder, so a hot shared prefix
//!   spreads over a few endpoints;
//! - **miss** — nothing matched: the least loaded candidate (global least request).
//!
//! A load-only request (embeddings, rerank: no prompt to keep warm) goes to the least loaded
//! candidate and is counted, without touching the index (reason `least_request`). A request that
//! names a session (see [`crate::config::SessionConfig`]) is placed by its session: its chain
//! starts with the session's key ([`crate::prefix::session_chain`]), with the same guard and
//! lifetime (reasons `session_hit`, `session_diverted`, `session_new`). A Responses API request
//! that continues a stored response (`previous_response_id`) goes to the endpoint that stored it
//! ([`response_affinity`]).
//!
//! Holders that are not candidates (unhealthy, removed, already tried by this request) do not
//! count as matches; the chain is rewritten to the new endpoint, so a conversation that had to move
//! sticks to where it moved. When the store cannot answer, the request is routed like
//! `global_least_request`'s fallback (fewest in flight from this replica), and counted in
//! `llmlb_fallback_total`; affinity resumes with the store.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::global_least_request::least_request;
use super::local::{
    local_least, outcome_reason, request_lease, Reasons, RESPONSE_REASONS, SESSION_REASONS,
};
use super::{Pick, PickInput, Policy, PolicyError};
use crate::config::{LoadGuard, PolicyKind, PrefixSettings};
use crate::prefix::session_chain;
use crate::store::{PoolCounts, PrefixOutcome, Skip};
use crate::telemetry;

/// Blocks of a chain looked up and recorded: the first 256 × 2 KiB = 512 KiB of a prompt. Longer
/// prompts still match on that much, and a store call stays bounded.
pub const MAX_CHAIN_BLOCKS: usize = 256;

/// The policy of one pool.
pub struct PrefixCache {
    counts: Arc<PoolCounts>,
    max: Option<u64>,
    settings: PrefixSettings,
}

impl PrefixCache {
    /// Count and index prefixes in `counts`; refuse when every candidate has `max` in flight;
    /// `settings`: the index entries' lifetime and the load guard.
    pub fn new(counts: Arc<PoolCounts>, max: Option<u64>, settings: PrefixSettings) -> Self {
        PrefixCache {
            counts,
            max,
            settings,
        }
    }
}

#[async_trait]
impl Policy for PrefixCache {
    fn name(&self) -> &'static str {
        PolicyKind::PrefixCache.name()
    }

    fn reasons(&self) -> &'static [&'static str] {
        &[
            "prefix_hit",
            "prefix_diverted",
            "prefix_miss",
            "session_hit",
            "session_diverted",
            "session_new",
            "response_hit",
            "response_diverted",
            "response_new",
            "least_request",
            "local_least_request",
        ]
    }

    async fn pick(&self, input: PickInput<'_>) -> Result<Pick, PolicyError> {
        if input.request.api.load_only() {
            // No prompt to keep warm (embeddings, rerank): the least loaded, counted.
            return least_request(&self.counts, self.max, &input).await;
        }
        if let Some(response) = input.request.previous_response {
            return response_affinity(&self.counts, self.max, self.settings, &input, response)
                .await;
        }
        if let Some(session) = &input.request.session {
            return session_affinity(&self.counts, self.max, self.settings, &input, *session).await;
        }
        let blocks = &input.request.blocks;
        let chain = &blocks[..blocks.len().min(MAX_CHAIN_BLOCKS)];
        let placed = affinity(&self.counts, self.max, self.settings, &input, chain, false).await?;
        if let Some(matched) = placed.matched {
            telemetry::observe_prefix_match(self.counts.pool(), matched);
        }
        Ok(placed.with_reason(PREFIX_REASONS))
    }
}

const PREFIX_REASONS: Reasons = ["prefix_hit", "prefix_diverted", "prefix_miss"];

/// A pick by affinity, before its reason is named.
struct Placed {
    pick: Pick,
    /// How the store placed it (`None`: the local fallback did).
    outcome: Option<PrefixOutcome>,
    /// Leading blocks of the chain matched (`None`: the local fallback placed it).
    matched: Option<usize>,
}

impl Placed {
    /// The pick, its reason one of `reasons` by outcome (a local fallback keeps its own).
    fn with_reason(self, reasons: Reasons) -> Pick {
        let reason = self
            .outcome
            .map_or(self.pick.reason, |o| outcome_reason(reasons, o));
        Pick {
            reason,
            ..self.pick
        }
    }
}

/// Place a request by the affinity of `chain` (matched in the index, chosen and counted in one
/// store round trip; with `sole` the chosen endpoint becomes the chain's only holder); the local
/// fallback when the store cannot answer.
async fn affinity(
    counts: &Arc<PoolCounts>,
    max: Option<u64>,
    settings: PrefixSettings,
    input: &PickInput<'_>,
    chain: &[u64],
    sole: bool,
) -> Result<Placed, PolicyError> {
    let labels = input.candidate_labels()?;
    match counts
        .acquire_prefix(&labels, chain, max, settings, sole)
        .await
    {
        Ok((i, acquired)) => Ok(Placed {
            pick: Pick {
                endpoint: input.candidates[i],
                reason: "",
                lease: Some(request_lease(
                    counts,
                    labels[i],
                    input.request,
                    settings.ttl,
                )),
            },
            outcome: Some(acquired.outcome),
            matched: Some(acquired.matched),
        }),
        Err(Skip::Saturated) => Err(PolicyError::Saturated),
        Err(Skip::Fallback(reason)) => {
            telemetry::count_fallback(counts.pool(), reason);
            Ok(Placed {
                pick: local_least(input, max)?,
                outcome: None,
                matched: None,
            })
        }
    }
}

/// Place a request of `session` where the session's earlier requests went: its chain is the
/// session's key then its prompt's blocks within the session ([`session_chain`]), under the same
/// load guard and lifetime as prefixes, so the endpoint that served the longest part of this
/// prompt wins among the session's. A new session goes to the least loaded candidate. Reasons
/// `session_hit`, `session_diverted`, `session_new`. Also how `global_least_request` keeps
/// sessions.
pub(super) async fn session_affinity(
    counts: &Arc<PoolCounts>,
    max: Option<u64>,
    settings: PrefixSettings,
    input: &PickInput<'_>,
    session: u64,
) -> Result<Pick, PolicyError> {
    let blocks = &input.request.blocks;
    let chain = session_chain(session, &blocks[..blocks.len().min(MAX_CHAIN_BLOCKS - 1)]);
    let placed = affinity(counts, max, settings, input, &chain, false).await?;
    Ok(placed.with_reason(SESSION_REASONS))
}

/// Place a Responses API request that continues stored response `response` (its
/// `previous_response_id`, [`crate::prefix::response_key`]) on the endpoint that stored it,
/// whatever its load: no other endpoint has that conversation (vLLM answers 404), so only
/// `maxRequestCount` diverts (`response_diverted`). Where the response was stored is learnt from
/// the answer that named it ([`super::Lease::produced`]) and kept as long as prefixes; when it is
/// unknown or no longer a candidate, the least loaded candidate (`response_new`). Also how
/// `global_least_request` routes them.
pub(super) async fn response_affinity(
    counts: &Arc<PoolCounts>,
    max: Option<u64>,
    settings: PrefixSettings,
    input: &PickInput<'_>,
    response: u64,
) -> Result<Pick, PolicyError> {
    let pin = Pin {
        ttl: settings.ttl,
        reasons: RESPONSE_REASONS,
        sole: false,
    };
    pinned(counts, max, input, response, pin).await
}

/// How [`pinned`] keeps a key.
pub(super) struct Pin {
    /// The key lives this long from its last use.
    pub(super) ttl: Duration,
    /// Reasons of a hit, a diversion (`maxRequestCount`) and a new placement.
    pub(super) reasons: Reasons,
    /// The key's endpoint replaces the ones it had (a binding that moves), rather than joining
    /// them ([`crate::store::PrefixQuery::sole`]).
    pub(super) sole: bool,
}

/// Place a request on the endpoint `key` (a one-block chain) is recorded for, whatever its load:
/// only `maxRequestCount` diverts. When the key is unknown, expired or its endpoint no longer a
/// candidate, the least loaded candidate, which the key is then recorded for. How
/// [`response_affinity`] and `endpoint_hash` place requests.
pub(super) async fn pinned(
    counts: &Arc<PoolCounts>,
    max: Option<u64>,
    input: &PickInput<'_>,
    key: u64,
    pin: Pin,
) -> Result<Pick, PolicyError> {
    let settings = PrefixSettings {
        guard: LoadGuard::NEVER,
        ttl: pin.ttl,
    };
    let placed = affinity(counts, max, settings, input, &[key], pin.sole).await?;
    Ok(placed.with_reason(pin.reasons))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::{ids, user_chat as chat, views};
    use super::super::Outcome;
    use super::*;
    use crate::config::LoadGuard;
    use crate::endpoint::EndpointId;
    use crate::request::LlmRequest;
    use crate::store::MemoryStore;

    fn policy() -> PrefixCache {
        let counts = Arc::new(PoolCounts::new(Arc::new(MemoryStore::new()), "p"));
        let settings = PrefixSettings {
            guard: LoadGuard {
                absolute: 2,
                per_mille: 500,
            },
            ttl: Duration::from_secs(60),
        };
        PrefixCache::new(counts, None, settings)
    }

    async fn pick(p: &PrefixCache, request: &LlmRequest, candidates: &[EndpointId]) -> Pick {
        let endpoints = views(&[1; 3]);
        p.pick(PickInput {
            request,
            endpoints: &endpoints,
            candidates,
        })
        .await
        .expect("pick")
    }

    #[tokio::test]
    async fn a_conversation_sticks_and_misses_spread() {
        let p = policy();
        let first = pick(&p, &chat(&["hello"]), &ids(3)).await;
        assert_eq!(first.reason, "prefix_miss");
        first.lease.expect("lease").release(Outcome::Completed);
        let again = pick(&p, &chat(&["hello", "more"]), &ids(3)).await;
        assert_eq!(again.reason, "prefix_hit");
        assert_eq!(again.endpoint, first.endpoint);
        // While the conversation's request is in flight, a new conversation goes elsewhere.
        let other = pick(&p, &chat(&["something else"]), &ids(3)).await;
        assert_eq!(other.reason, "prefix_miss");
        assert_ne!(other.endpoint, first.endpoint);
    }

    #[tokio::test]
    async fn a_busy_holder_is_skipped() {
        let p = policy();
        let mut held = Vec::new();
        for _ in 0..3 {
            let pick = pick(&p, &chat(&["shared"]), &ids(3)).await;
            held.push(pick.endpoint);
            std::mem::forget(pick.lease);
        }
        // Holder has 3 in flight, the others 0: 3 > 0 + max(2, 0) → diverted.
        let fourth = pick(&p, &chat(&["shared"]), &ids(3)).await;
        assert_eq!(held, vec![held[0]; 3]);
        assert_eq!(fourth.reason, "prefix_diverted");
        assert_ne!(fourth.endpoint, held[0]);
    }

    #[tokio::test]
    async fn a_holder_that_is_not_a_candidate_is_a_miss() {
        let p = policy();
        let first = pick(&p, &chat(&["a"]), &ids(3)).await;
        let others: Vec<EndpointId> = ids(3)
            .into_iter()
            .filter(|e| *e != first.endpoint)
            .collect();
        let moved = pick(&p, &chat(&["a", "b"]), &others).await;
        assert_eq!(moved.reason, "prefix_miss");
        let after = pick(&p, &chat(&["a", "b", "c"]), &ids(3)).await;
        assert_eq!(after.endpoint, moved.endpoint, "sticks where it moved");
        assert_eq!(after.reason, "prefix_hit");
    }

    #[tokio::test]
    async fn long_chains_are_capped() {
        let p = policy();
        let doc = "x".repeat(crate::prefix::CHUNK_BYTES * (MAX_CHAIN_BLOCKS + 10));
        let request = chat(&[&doc]);
        assert!(request.blocks.len() > MAX_CHAIN_BLOCKS);
        let first = pick(&p, &request, &ids(3)).await;
        let second = pick(&p, &chat(&[&doc, "next"]), &ids(3)).await;
        assert_eq!(second.endpoint, first.endpoint);
        assert_eq!(second.reason, "prefix_hit");
    }
}
