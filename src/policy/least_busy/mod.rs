//! `least_busy`: route by what the inference engines report about themselves — waiting queue,
//! KV-cache use, loaded LoRA adapters — through the Inference Extension's filter tree
//! ([`tree`]), as Higress's `least_busy` does, over metrics llm-lb scrapes itself
//! ([`crate::scrape`]).
//!
//! - A request whose `model` is in `criticalModels` is **critical** and never refused; any other is
//!   **sheddable** and gets [`PolicyError::Saturated`] (429) when no endpoint has capacity.
//! - The request's LoRA adapter is its `model` unless an endpoint reports that name as its base
//!   model (`model_name`).
//! - Each endpoint's waiting queue includes the requests this gateway dispatched to it since its
//!   last scrape and that are still in flight (the [`Lease`] of each pick ends that count). A
//!   sheddable request is refused only when the engines' own figures leave no room (see
//!   `LeastBusy::engine_capacity`).
//! - An endpoint whose metrics are unknown (never scraped, scrape failing, snapshot stale) is not
//!   dropped: the tree runs over the known ones, and its survivors and the unknown endpoints are
//!   compared on the signal they share, this replica's in-flight requests (ties at random). When
//!   every candidate is unknown the pick is this replica's least request, counted in
//!   `llmlb_fallback_total{reason="metrics_unknown"}`.
//!
//! Pick reasons: `least_busy`, `least_busy_lora_affinity` (the endpoint runs the request's
//! adapter), `unknown_metrics_least_request` (an endpoint without known metrics was chosen).

pub mod tree;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use rand::Rng;

use super::local::local_least;
use super::{Lease, Pick, PickInput, Policy, PolicyError};
use crate::config::{LeastBusyConfig, PolicyKind};
use crate::endpoint::{EndpointId, Outcome};
use crate::scrape::{Known, MetricsBoard};
use crate::telemetry::{self, FallbackReason};

/// Pick reason: the tree chose.
pub const REASON: &str = "least_busy";
/// Pick reason: the tree chose an endpoint running the request's adapter.
pub const REASON_AFFINITY: &str = "least_busy_lora_affinity";
/// Pick reason: an endpoint whose metrics are unknown, by in-flight count.
pub const REASON_UNKNOWN: &str = "unknown_metrics_least_request";

/// The policy of one pool.
pub struct LeastBusy {
    board: Arc<MetricsBoard>,
    config: LeastBusyConfig,
}

impl LeastBusy {
    /// The policy reading engine metrics from `board`, with `config`'s thresholds and critical
    /// models.
    pub fn new(board: Arc<MetricsBoard>, config: LeastBusyConfig) -> Self {
        LeastBusy { board, config }
    }

    /// A sheddable request the tree dropped because of queues that include this gateway's
    /// dispatches since the last scrape: those may well be running already (an idle engine takes
    /// them straight into its batch), so it is refused only if the engines' own figures leave no
    /// endpoint with capacity. Otherwise the endpoint with the shortest counted queue among those
    /// the engines say have room, so the burst still spreads.
    fn engine_capacity(
        &self,
        known: &[(EndpointId, Known)],
        pods: &[tree::Pod<'_>],
        ask: tree::Ask<'_>,
        rng: &mut impl Rng,
    ) -> Option<Vec<usize>> {
        let reported: Vec<tree::Pod<'_>> = pods
            .iter()
            .zip(known)
            .map(|(p, (_, k))| tree::Pod {
                waiting: k.snapshot.metrics.waiting,
                ..*p
            })
            .collect();
        let room = tree::survivors(&reported, ask, &self.config.thresholds, rng).ok()?;
        let counted = |i: usize| pods.get(i).map_or(u64::MAX, |p| p.waiting);
        let least = room.iter().map(|&i| counted(i)).min()?;
        Some(room.into_iter().filter(|&i| counted(i) == least).collect())
    }

    /// The endpoint for this request and why, without counting it as dispatched (what
    /// [`Policy::pick`] adds).
    pub fn choose(
        &self,
        input: &PickInput<'_>,
        rng: &mut impl Rng,
    ) -> Result<(EndpointId, &'static str), PolicyError> {
        let now = Instant::now();
        let mut known: Vec<(EndpointId, Known)> = Vec::with_capacity(input.candidates.len());
        let mut unknown: Vec<EndpointId> = Vec::new();
        for &c in input.candidates {
            match self.board.view(c.index(), now) {
                Some(k) => known.push((c, k)),
                None => unknown.push(c),
            }
        }
        if known.is_empty() {
            telemetry::count_fallback(self.board.pool(), FallbackReason::MetricsUnknown);
            return Ok((local_least(input, None)?.endpoint, REASON_UNKNOWN));
        }
        let model = input.request.model.as_deref();
        let critical = model.is_some_and(|m| self.config.critical_models.iter().any(|c| c == m));
        let adapter = model.filter(|m| {
            !known
                .iter()
                .any(|(_, k)| k.snapshot.metrics.model.as_deref() == Some(*m))
        });
        let pods: Vec<tree::Pod<'_>> = known
            .iter()
            .map(|(_, k)| tree::Pod {
                waiting: k.waiting(),
                kv_cache: k.snapshot.metrics.kv_cache_usage,
                running: k.running(),
                lora: &k.snapshot.metrics.lora,
            })
            .collect();
        let ask = tree::Ask { critical, adapter };
        let kept = match tree::survivors(&pods, ask, &self.config.thresholds, rng) {
            Ok(kept) => kept,
            Err(tree::Dropped) => match self.engine_capacity(&known, &pods, ask, rng) {
                Some(kept) => kept,
                None if unknown.is_empty() => {
                    log::debug!(
                        "pool {}: no endpoint has capacity for a sheddable request",
                        self.board.pool()
                    );
                    return Err(PolicyError::Saturated);
                }
                None => Vec::new(),
            },
        };
        let reason_for = |id: EndpointId| {
            let runs_adapter = known
                .iter()
                .find(|(c, _)| *c == id)
                .is_some_and(|(_, k)| adapter.is_some_and(|a| k.snapshot.metrics.lora.has(a)));
            if runs_adapter {
                REASON_AFFINITY
            } else {
                REASON
            }
        };
        if unknown.is_empty() {
            let chosen = if kept.is_empty() {
                None
            } else {
                kept.get(rng.gen_range(0..kept.len()))
                    .and_then(|&i| known.get(i))
                    .map(|(c, _)| *c)
            };
            let id = chosen.ok_or_else(|| PolicyError::Unavailable("no candidates".into()))?;
            return Ok((id, reason_for(id)));
        }
        // Survivors and unknown endpoints, on the signal they share.
        let mut contenders: Vec<EndpointId> = kept
            .iter()
            .filter_map(|&i| known.get(i).map(|(c, _)| *c))
            .collect();
        contenders.extend_from_slice(&unknown);
        let pick = local_least(
            &PickInput {
                request: input.request,
                endpoints: input.endpoints,
                candidates: &contenders,
            },
            None,
        )?;
        let reason = if unknown.contains(&pick.endpoint) {
            REASON_UNKNOWN
        } else {
            reason_for(pick.endpoint)
        };
        Ok((pick.endpoint, reason))
    }
}

/// Ends the count of a request dispatched since the last scrape.
pub(super) struct DispatchLease {
    board: Arc<MetricsBoard>,
    endpoint: usize,
    number: u64,
}

impl DispatchLease {
    /// Count a request dispatched to `endpoint` on `board` until the lease is released.
    pub(super) fn boxed(board: &Arc<MetricsBoard>, endpoint: EndpointId) -> Box<Self> {
        Box::new(DispatchLease {
            board: board.clone(),
            number: board.dispatch(endpoint.index()),
            endpoint: endpoint.index(),
        })
    }
}

impl Lease for DispatchLease {
    fn release(self: Box<Self>, _outcome: Outcome) {
        self.board.finish(self.endpoint, self.number);
    }
}

#[async_trait]
impl Policy for LeastBusy {
    fn name(&self) -> &'static str {
        PolicyKind::LeastBusy.name()
    }

    fn reasons(&self) -> &'static [&'static str] {
        &[REASON, REASON_AFFINITY, REASON_UNKNOWN]
    }

    fn fallback_reasons(&self) -> &'static [FallbackReason] {
        &[FallbackReason::MetricsUnknown]
    }

    async fn pick(&self, input: PickInput<'_>) -> Result<Pick, PolicyError> {
        let (endpoint, reason) = self.choose(&input, &mut rand::thread_rng())?;
        Ok(Pick {
            endpoint,
            reason,
            lease: Some(DispatchLease::boxed(&self.board, endpoint)),
        })
    }
}

#[cfg(test)]
mod tests;
