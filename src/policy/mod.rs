//! Load-balancing policies: the [`Policy`] trait every `lb_policy` implements, and [`build`].
//!
//! Pingora's `BackendSelection` is synchronous and hash-keyed; our policies need the request
//! summary and (for shared-state policies) an async store round trip, so they implement this async
//! trait and are called from `ProxyHttp::upstream_peer`. The proxy hands a policy only candidates
//! that are healthy and not yet tried for this request; the policy returns one of them and,
//! optionally, a [`Lease`] that the proxy releases exactly once when the attempt ends (success,
//! error, retry on another endpoint, client abort, or the request context being dropped).

mod global_least_request;
pub mod least_busy;
mod prefix_cache;
mod random;
mod round_robin;

pub use global_least_request::GlobalLeastRequest;
pub use least_busy::{LeastBusy, LeastBusyConfig};
pub use prefix_cache::{PrefixCache, MAX_CHAIN_BLOCKS};
pub use random::Random;
pub use round_robin::RoundRobin;

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{EndpointConfig, PolicyKind, PoolConfig, StoreConfig};
use crate::pool::{EndpointId, EndpointView};
use crate::request::LlmRequest;
use crate::scrape::MetricsBoard;
use crate::store::{InflightStore, MemoryStore, PoolCounts, RedisConfig, RedisStore};

/// Everything a policy may look at for one pick.
pub struct PickInput<'a> {
    pub request: &'a LlmRequest,
    /// Every endpoint of the pool, indexed by [`EndpointId`].
    pub endpoints: &'a [EndpointView],
    /// Healthy endpoints not yet tried for this request; never empty.
    pub candidates: &'a [EndpointId],
}

impl<'a> PickInput<'a> {
    /// The candidates' labels (`ip:port`), in order: how the state store names endpoints.
    pub fn candidate_labels(&self) -> Result<Vec<&'a str>, PolicyError> {
        self.candidates
            .iter()
            .map(|c| self.endpoints.get(c.index()).map(|e| e.label.as_str()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| PolicyError::Unavailable("a candidate is not in the pool".into()))
    }
}

/// A policy's choice.
pub struct Pick {
    pub endpoint: EndpointId,
    /// Why this endpoint (bounded label set, e.g. `round_robin`, `prefix_hit`).
    pub reason: &'static str,
    /// Accounting to release when the attempt ends.
    pub lease: Option<Box<dyn Lease>>,
}

/// How an attempt ended, passed to [`Lease::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered (any status) and the response was relayed.
    Completed,
    /// The attempt failed (connect error, upstream error, timeout); the request may be retried.
    Failed,
    /// The client went away.
    Aborted,
    /// The request context was dropped without a verdict (e.g. shutdown).
    Dropped,
}

/// Per-attempt accounting held by a policy (e.g. an in-flight count in the state store).
pub trait Lease: Send + Sync {
    /// Called exactly once.
    fn release(self: Box<Self>, outcome: Outcome);
}

/// Why a policy could not pick.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Every endpoint is at capacity; the request should be refused with 429.
    #[error("all endpoints are at capacity")]
    Saturated,
    /// No candidate could be chosen.
    #[error("no endpoint available: {0}")]
    Unavailable(String),
}

impl PolicyError {
    /// The access log's `reason` for a request no endpoint was picked for.
    pub fn label(&self) -> &'static str {
        match self {
            PolicyError::Saturated => "saturated",
            PolicyError::Unavailable(_) => "unavailable",
        }
    }
}

/// A load-balancing policy.
#[async_trait]
pub trait Policy: Send + Sync {
    /// The `lb_policy` name.
    fn name(&self) -> &'static str;

    /// Every pick reason the policy reports (label values of `llmlb_picks_total`).
    fn reasons(&self) -> &'static [&'static str];

    /// Reasons of `llmlb_fallback_total` the policy itself reports, beyond the proxy's and the
    /// store's.
    fn fallback_reasons(&self) -> &'static [&'static str] {
        &[]
    }

    /// Choose one of `input.candidates`.
    async fn pick(&self, input: PickInput<'_>) -> Result<Pick, PolicyError>;

    /// The engine metrics this policy reads, which a [`crate::scrape::ScrapeService`] must keep
    /// current (policies that scrape nothing: `None`).
    fn metrics_board(&self) -> Option<Arc<MetricsBoard>> {
        None
    }
}

/// Build the policy a pool's configuration asks for over `endpoints`. Policies that keep state in
/// a store use `counts` (the previous generation's, carried over a reload) or new counts in the
/// store the configuration names; the supervisor keeps their heartbeat running.
pub fn build(
    pool: &PoolConfig,
    endpoints: &[EndpointConfig],
    counts: Option<Arc<PoolCounts>>,
) -> (Arc<dyn Policy>, Option<Arc<PoolCounts>>) {
    let weights: Vec<usize> = endpoints.iter().map(|e| e.weight).collect();
    let counts = || counts.unwrap_or_else(|| new_counts(pool));
    match pool.policy {
        PolicyKind::RoundRobin => (Arc::new(RoundRobin::new(&weights)), None),
        PolicyKind::Random => (Arc::new(Random::new()), None),
        PolicyKind::GlobalLeastRequest => {
            let counts = counts();
            let policy = GlobalLeastRequest::new(counts.clone(), pool.max_inflight);
            (Arc::new(policy), Some(counts))
        }
        PolicyKind::PrefixCache => {
            let counts = counts();
            let settings = pool.prefix.unwrap_or_default();
            let policy = PrefixCache::new(counts.clone(), pool.max_inflight, settings);
            (Arc::new(policy), Some(counts))
        }
        PolicyKind::LeastBusy => {
            let labels = endpoints.iter().map(|e| e.addr.to_string()).collect();
            let board = MetricsBoard::new(&pool.name, labels, pool.metrics.interval);
            let config = pool.least_busy.clone().unwrap_or_default();
            (Arc::new(LeastBusy::new(Arc::new(board), config)), None)
        }
    }
}

/// New counts for the pool in the store its configuration names (embedded when none).
fn new_counts(pool: &PoolConfig) -> Arc<PoolCounts> {
    let store: Arc<dyn InflightStore> = match &pool.store {
        Some(StoreConfig::Redis(redis)) => Arc::new(RedisStore::new(RedisConfig::clone(redis))),
        Some(StoreConfig::Embedded) | None => Arc::new(MemoryStore::new()),
    };
    Arc::new(PoolCounts::new(store, &pool.name))
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn views(weights: &[usize]) -> Vec<EndpointView> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                EndpointView::new(format!("127.0.0.1:{}", 9000 + i).parse().expect("addr"), *w)
            })
            .collect()
    }

    pub fn ids(n: usize) -> Vec<EndpointId> {
        (0..n).map(EndpointId::new).collect()
    }

    /// Pick `n` times and count how often each endpoint was chosen.
    pub async fn histogram(
        policy: &dyn Policy,
        weights: &[usize],
        candidates: &[EndpointId],
        n: usize,
    ) -> Vec<usize> {
        let endpoints = views(weights);
        let request = LlmRequest::empty();
        let mut counts = vec![0; weights.len()];
        for _ in 0..n {
            let pick = policy
                .pick(PickInput {
                    request: &request,
                    endpoints: &endpoints,
                    candidates,
                })
                .await
                .expect("pick");
            counts[pick.endpoint.index()] += 1;
        }
        counts
    }
}
