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
struct DispatchLease {
    board: Arc<MetricsBoard>,
    endpoint: usize,
    number: u64,
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
        let number = self.board.dispatch(endpoint.index());
        Ok(Pick {
            endpoint,
            reason,
            lease: Some(Box::new(DispatchLease {
                board: self.board.clone(),
                endpoint: endpoint.index(),
                number,
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::super::testing::{ids, views};
    use super::*;
    use crate::request::LlmRequest;
    use crate::scrape::{EndpointMetrics, Lora};

    const BASE: &str = "base-model";

    fn metrics(waiting: u64, kv: f64, max: usize, running: &[&str]) -> EndpointMetrics {
        EndpointMetrics {
            waiting,
            running: 0,
            kv_cache_usage: Some(kv),
            lora: Lora {
                running: running.iter().map(|s| s.to_string()).collect(),
                max,
            },
            model: Some(BASE.to_string()),
        }
    }

    fn policy(n: usize, critical: &[&str]) -> (LeastBusy, Arc<MetricsBoard>) {
        let labels = (0..n).map(|i| format!("127.0.0.1:{}", 9000 + i)).collect();
        let board = Arc::new(MetricsBoard::new("p", labels, Duration::from_secs(60)));
        let config = LeastBusyConfig {
            critical_models: critical.iter().map(|s| s.to_string()).collect(),
            ..LeastBusyConfig::default()
        };
        (LeastBusy::new(board.clone(), config), board)
    }

    fn publish(board: &MetricsBoard, i: usize, m: EndpointMetrics) {
        board.publish(i, m, Instant::now(), board.dispatched(i));
    }

    fn request(model: &str) -> LlmRequest {
        LlmRequest::parse(
            format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
                .as_bytes(),
        )
    }

    fn choose(
        p: &LeastBusy,
        endpoints: &[crate::endpoint::EndpointView],
        model: &str,
        candidates: &[EndpointId],
        seed: u64,
    ) -> Result<(EndpointId, &'static str), PolicyError> {
        let req = request(model);
        let input = PickInput {
            request: &req,
            endpoints,
            candidates,
        };
        p.choose(&input, &mut StdRng::seed_from_u64(seed))
    }

    /// Pick `n` times for `model` over 3 endpoints without releasing: where each went, and the
    /// leases held.
    async fn burst(
        p: &LeastBusy,
        endpoints: &[crate::endpoint::EndpointView],
        model: &str,
        n: usize,
    ) -> ([usize; 3], Vec<Option<Box<dyn Lease>>>) {
        let req = request(model);
        let mut hist = [0; 3];
        let mut leases = Vec::new();
        for _ in 0..n {
            let pick = p
                .pick(PickInput {
                    request: &req,
                    endpoints,
                    candidates: &ids(3),
                })
                .await
                .expect("pick");
            hist[pick.endpoint.index()] += 1;
            leases.push(pick.lease);
        }
        (hist, leases)
    }

    /// T1–T3 through the policy: metrics on the board, the request's model decides.
    #[test]
    fn upstream_vectors_through_the_policy() {
        let (p, board) = policy(3, &["critical"]);
        let endpoints = views(&[1, 1, 1]);
        publish(&board, 0, metrics(0, 0.2, 2, &["foo", "bar"]));
        publish(&board, 1, metrics(3, 0.1, 2, &["foo", "critical"]));
        publish(&board, 2, metrics(10, 0.2, 2, &["foo"]));
        for seed in 0..20 {
            assert_eq!(
                choose(&p, &endpoints, "critical", &ids(3), seed).expect("pick"),
                (EndpointId::new(1), REASON_AFFINITY)
            );
            assert_eq!(
                choose(&p, &endpoints, "sheddable", &ids(3), seed).expect("pick"),
                (EndpointId::new(0), REASON)
            );
        }
        publish(&board, 0, metrics(10, 0.9, 2, &["foo", "bar"]));
        publish(&board, 1, metrics(3, 0.85, 2, &["foo", "critical"]));
        publish(&board, 2, metrics(10, 0.85, 2, &["foo"]));
        assert!(matches!(
            choose(&p, &endpoints, "sheddable", &ids(3), 0),
            Err(PolicyError::Saturated)
        ));
        assert_eq!(
            choose(&p, &endpoints, "critical", &ids(3), 0)
                .expect("pick")
                .0,
            EndpointId::new(1)
        );
        // Only candidates are considered.
        let only = [EndpointId::new(2)];
        assert_eq!(
            choose(&p, &endpoints, "critical", &only, 0)
                .expect("pick")
                .0,
            EndpointId::new(2)
        );
    }

    #[test]
    fn the_base_model_is_not_an_adapter() {
        let (p, board) = policy(2, &[BASE]);
        let endpoints = views(&[1, 1]);
        // Endpoint 0 has LoRA room, endpoint 1 has none but a shorter queue.
        publish(&board, 0, metrics(2, 0.1, 2, &[]));
        publish(&board, 1, metrics(1, 0.1, 1, &["x"]));
        assert_eq!(
            choose(&p, &endpoints, BASE, &ids(2), 0).expect("pick"),
            (EndpointId::new(1), REASON)
        );
        // As an adapter name the same request would prefer room for the adapter.
        let (p, board) = policy(2, &["lora-y"]);
        publish(&board, 0, metrics(2, 0.1, 2, &[]));
        publish(&board, 1, metrics(1, 0.1, 1, &["x"]));
        assert_eq!(
            choose(&p, &endpoints, "lora-y", &ids(2), 0)
                .expect("pick")
                .0,
            EndpointId::new(0)
        );
    }

    #[tokio::test]
    async fn dispatches_between_scrapes_spread_a_burst() {
        let (p, board) = policy(3, &["m"]);
        let endpoints = views(&[1, 1, 1]);
        // Endpoint 2 looked idlest at the last scrape.
        publish(&board, 0, metrics(2, 0.0, 0, &[]));
        publish(&board, 1, metrics(2, 0.0, 0, &[]));
        publish(&board, 2, metrics(0, 0.0, 0, &[]));
        let (hist, leases) = burst(&p, &endpoints, "m", 30).await;
        // The idle-looking endpoint is filled up to the others, then the queues stay level.
        let queues = [2 + hist[0], 2 + hist[1], hist[2]];
        let (lo, hi) = (queues.iter().min(), queues.iter().max());
        assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{hist:?}");
        for l in leases {
            l.expect("lease").release(Outcome::Completed);
        }
        assert_eq!(board.view(2, Instant::now()).expect("known").waiting(), 0);
    }

    /// A sheddable burst against idle engines: the dispatches since the scrape push the counted
    /// queues over `queueThresholdCritical`, but the engines report room, so nothing is refused
    /// and the burst still spreads evenly. Engines that themselves report full queues refuse.
    #[tokio::test]
    async fn a_sheddable_burst_is_not_refused_on_our_own_dispatches() {
        let (p, board) = policy(3, &[]);
        let endpoints = views(&[1, 1, 1]);
        for i in 0..3 {
            publish(&board, i, metrics(0, 0.1, 0, &[]));
        }
        let (hist, _leases) = burst(&p, &endpoints, "sheddable", 60).await;
        assert_eq!(hist, [20, 20, 20]);
        for i in 0..3 {
            publish(&board, i, metrics(6, 0.1, 0, &[]));
        }
        assert!(matches!(
            choose(&p, &endpoints, "sheddable", &ids(3), 0),
            Err(PolicyError::Saturated)
        ));
    }

    #[test]
    fn unknown_endpoints_compete_on_in_flight_counts() {
        let (p, board) = policy(3, &[]);
        let endpoints = views(&[1, 1, 1]);
        // Every endpoint unknown: this replica's least request.
        let (id, reason) = choose(&p, &endpoints, "m", &ids(3), 0).expect("pick");
        assert_eq!(reason, REASON_UNKNOWN);
        assert!(id.index() < 3);
        // Endpoint 0 known and idle; 1 and 2 unknown. Endpoint 2 carries two requests of ours.
        publish(&board, 0, metrics(0, 0.1, 0, &[]));
        endpoints[2].add_inflight(2);
        let mut seen = [0; 3];
        for seed in 0..200 {
            let (id, reason) = choose(&p, &endpoints, "m", &ids(3), seed).expect("pick");
            seen[id.index()] += 1;
            assert_eq!(
                reason,
                if id.index() == 0 {
                    REASON
                } else {
                    REASON_UNKNOWN
                }
            );
        }
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
        assert_eq!(seen[2], 0, "more in flight: {seen:?}");
        // A sheddable request finding the known endpoint saturated still goes to an unknown one.
        publish(&board, 0, metrics(9, 0.1, 0, &[]));
        for seed in 0..20 {
            assert_eq!(
                choose(&p, &endpoints, "m", &ids(3), seed).expect("pick"),
                (EndpointId::new(1), REASON_UNKNOWN)
            );
        }
    }
}
