//! Load-balancing policies: the [`Policy`] trait every `lb_policy` implements, and [`build`].
//!
//! Pingora's `BackendSelection` is synchronous and hash-keyed; our policies need the request
//! summary and (for shared-state policies) an async store round trip, so they implement this async
//! trait and are called from `ProxyHttp::upstream_peer`. The proxy hands a policy only candidates
//! that are healthy and not yet tried for this request; the policy returns one of them and,
//! optionally, a [`Lease`] that the proxy releases exactly once when the attempt ends (success,
//! error, retry on another endpoint, client abort, or the request context being dropped).
//!
//! The policies whose choice is a synchronous function of local state are also offered as
//! Pingora `BackendSelection`s (the `selection` module). A program adds its own `lb_policy`
//! through a [`Registry`].

mod build;
pub mod endpoint_hash;
pub mod endpoint_metrics;
mod global_least_request;
pub mod kv_aware;
pub mod latency_aware;
pub mod least_busy;
mod local;
mod prefix_cache;
mod random;
mod registry;
mod round_robin;

pub use build::{build, Deps};
pub use endpoint_hash::EndpointHash;
pub use endpoint_metrics::EndpointMetrics;
pub use global_least_request::GlobalLeastRequest;
pub use kv_aware::KvAware;
pub use latency_aware::LatencyAware;
pub use least_busy::LeastBusy;
pub use prefix_cache::{PrefixCache, MAX_CHAIN_BLOCKS};
pub use random::Random;
pub use registry::{CustomContext, Factory, Registry, RegistryError};
pub use round_robin::RoundRobin;

pub use crate::endpoint::{EndpointId, EndpointView, Outcome};

use async_trait::async_trait;

use crate::request::LlmRequest;
use crate::telemetry::FallbackReason;

/// Everything a policy may look at for one pick.
pub struct PickInput<'a> {
    /// What the request asks for (model, prompt blocks).
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
    /// The chosen candidate.
    pub endpoint: EndpointId,
    /// Why this endpoint (bounded label set, e.g. `round_robin`, `prefix_hit`).
    pub reason: &'static str,
    /// Accounting to release when the attempt ends.
    pub lease: Option<Box<dyn Lease>>,
}

/// Per-attempt accounting held by a policy (e.g. an in-flight count in the state store).
pub trait Lease: Send + Sync {
    /// The first byte of the answer arrived: the engine has done the prompt's prefill. Called at
    /// most once, before [`Lease::release`]; nothing by default.
    fn first_byte(&mut self) {}

    /// The answer named itself `id` (a Responses API response, which the engine stores and a
    /// later request may continue with `previous_response_id`). Called at most once, before
    /// [`Lease::release`]; nothing by default.
    fn produced(&mut self, _id: &str) {}

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
    fn fallback_reasons(&self) -> &'static [FallbackReason] {
        &[]
    }

    /// Choose one of `input.candidates`.
    async fn pick(&self, input: PickInput<'_>) -> Result<Pick, PolicyError>;
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub(crate) fn views(weights: &[usize]) -> Vec<EndpointView> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                EndpointView::new(format!("127.0.0.1:{}", 9000 + i).parse().expect("addr"), *w)
            })
            .collect()
    }

    /// A chat request of one user message per turn.
    pub(crate) fn user_chat(turns: &[&str]) -> LlmRequest {
        let messages: Vec<serde_json::Value> = turns
            .iter()
            .map(|t| serde_json::json!({"role": "user", "content": t}))
            .collect();
        LlmRequest::parse(
            serde_json::json!({"model": "m", "messages": messages})
                .to_string()
                .as_bytes(),
        )
    }

    pub(crate) fn ids(n: usize) -> Vec<EndpointId> {
        (0..n).map(EndpointId::new).collect()
    }

    /// Pick `n` times and count how often each endpoint was chosen.
    pub(crate) async fn histogram(
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
