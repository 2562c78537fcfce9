//! `endpoint_metrics` (Higress 2.x, alias `metrics_based`): route by what the engines report in
//! their `/metrics`, scraped by llm-lb ([`crate::scrape`]), with Higress's keys:
//!
//! - `metric_policy: default` — `least_busy`'s filter tree over waiting queue, KV-cache use and
//!   LoRA adapters (same thresholds and `criticalModels`, same reasons).
//! - `metric_policy: least` / `most` with `target_metric` — the candidates whose value of that
//!   gauge is within the lowest (highest) `1/N` of the range between the least and the most of
//!   the `N` candidates with known metrics; one of them at random (`metrics_least`,
//!   `metrics_most`). A gauge the exposition lacks reads 0, as in Higress. Candidates whose
//!   metrics are unknown (never scraped, failing, stale) are not ranked; when none is known, this
//!   replica's least request (`unknown_metrics_least_request`, counted in
//!   `llmlb_fallback_total{reason="metrics_unknown"}`).
//! - `rate_limit` (0–1]: when the chosen endpoint took more than this share of the pool's last
//!   [`RATE_WINDOW`] picks on this replica, another candidate at random instead (`rate_limited`):
//!   a cap on herding while the scraped figures lag.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use parking_lot::Mutex;
use rand::Rng;

use super::least_busy::{DispatchLease, LeastBusy, REASON, REASON_AFFINITY, REASON_UNKNOWN};
use super::local::local_least;
use super::{Pick, PickInput, Policy, PolicyError};
use crate::config::{EndpointMetricsConfig, MetricPolicy, PolicyKind, RATE_WINDOW};
use crate::endpoint::EndpointId;
use crate::scrape::MetricsBoard;
use crate::telemetry::{self, FallbackReason};

/// Pick reason: among the least of the target gauge.
pub const REASON_LEAST: &str = "metrics_least";
/// Pick reason: among the most of the target gauge.
pub const REASON_MOST: &str = "metrics_most";
/// Pick reason: the ranked choice had taken more than `rate_limit` of recent picks.
pub const REASON_RATE_LIMITED: &str = "rate_limited";

/// How candidates are ranked.
enum Rank {
    Tree(LeastBusy),
    Least,
    Most,
}

/// The policy of one pool.
pub struct EndpointMetrics {
    board: Arc<MetricsBoard>,
    rank: Rank,
    rate_limit: f64,
    /// The pool's last picks on this replica, oldest first.
    recent: Mutex<VecDeque<EndpointId>>,
}

impl EndpointMetrics {
    /// The policy reading `board` (which scrapes `config`'s target gauge) with `config`.
    pub fn new(board: Arc<MetricsBoard>, config: EndpointMetricsConfig) -> Self {
        let rank = match config.policy {
            MetricPolicy::Default(tree) => Rank::Tree(LeastBusy::new(board.clone(), tree)),
            MetricPolicy::Least(_) => Rank::Least,
            MetricPolicy::Most(_) => Rank::Most,
        };
        EndpointMetrics {
            board,
            rank,
            rate_limit: config.rate_limit,
            recent: Mutex::new(VecDeque::with_capacity(RATE_WINDOW + 1)),
        }
    }

    /// The endpoint for this request by rank, and why.
    fn ranked(
        &self,
        input: &PickInput<'_>,
        rng: &mut impl Rng,
    ) -> Result<(EndpointId, &'static str), PolicyError> {
        let (most, reason) = match &self.rank {
            Rank::Tree(tree) => return tree.choose(input, rng),
            Rank::Least => (false, REASON_LEAST),
            Rank::Most => (true, REASON_MOST),
        };
        let now = Instant::now();
        let known: Vec<(EndpointId, f64)> = input
            .candidates
            .iter()
            .filter_map(|&c| {
                let k = self.board.view(c.index(), now)?;
                Some((c, k.snapshot.metrics.target.unwrap_or(0.0)))
            })
            .collect();
        if known.is_empty() {
            telemetry::count_fallback(self.board.pool(), FallbackReason::MetricsUnknown);
            return Ok((local_least(input, None)?.endpoint, REASON_UNKNOWN));
        }
        let kept = within_range(&known, most);
        let chosen = kept[rng.gen_range(0..kept.len())];
        Ok((chosen, reason))
    }

    /// `chosen`, or another candidate at random if `chosen` is over `rate_limit`; records the
    /// pick.
    fn limited(
        &self,
        input: &PickInput<'_>,
        chosen: (EndpointId, &'static str),
        rng: &mut impl Rng,
    ) -> (EndpointId, &'static str) {
        let mut recent = self.recent.lock();
        let mut pick = chosen;
        if self.rate_limit < 1.0 && input.candidates.len() > 1 && !recent.is_empty() {
            let mine = recent.iter().filter(|&&e| e == chosen.0).count();
            if mine as f64 / recent.len() as f64 > self.rate_limit {
                let others: Vec<EndpointId> = input
                    .candidates
                    .iter()
                    .copied()
                    .filter(|&c| c != chosen.0)
                    .collect();
                pick = (others[rng.gen_range(0..others.len())], REASON_RATE_LIMITED);
            }
        }
        recent.push_back(pick.0);
        if recent.len() > RATE_WINDOW {
            recent.pop_front();
        }
        pick
    }
}

/// The candidates within the lowest (`most`: highest) `1/N` of the values' range, `N` the number
/// of candidates; never empty when `values` is not.
fn within_range(values: &[(EndpointId, f64)], most: bool) -> Vec<EndpointId> {
    let min = values.iter().map(|(_, v)| *v).fold(f64::INFINITY, f64::min);
    let max = values
        .iter()
        .map(|(_, v)| *v)
        .fold(f64::NEG_INFINITY, f64::max);
    let band = (max - min) / values.len() as f64;
    values
        .iter()
        .filter(|(_, v)| {
            if most {
                *v >= max - band
            } else {
                *v <= min + band
            }
        })
        .map(|(c, _)| *c)
        .collect()
}

#[async_trait]
impl Policy for EndpointMetrics {
    fn name(&self) -> &'static str {
        PolicyKind::EndpointMetrics.name()
    }

    fn reasons(&self) -> &'static [&'static str] {
        &[
            REASON,
            REASON_AFFINITY,
            REASON_LEAST,
            REASON_MOST,
            REASON_RATE_LIMITED,
            REASON_UNKNOWN,
        ]
    }

    fn fallback_reasons(&self) -> &'static [FallbackReason] {
        &[FallbackReason::MetricsUnknown]
    }

    async fn pick(&self, input: PickInput<'_>) -> Result<Pick, PolicyError> {
        let mut rng = rand::thread_rng();
        let ranked = self.ranked(&input, &mut rng)?;
        let (endpoint, reason) = self.limited(&input, ranked, &mut rng);
        Ok(Pick {
            endpoint,
            reason,
            lease: Some(DispatchLease::boxed(&self.board, endpoint)),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::testing::views;
    use crate::request::LlmRequest;
    use crate::scrape::EndpointMetrics as Metrics;

    fn board(values: &[Option<f64>]) -> Arc<MetricsBoard> {
        let labels = (0..values.len())
            .map(|i| format!("127.0.0.1:{}", i + 1))
            .collect();
        let board = Arc::new(
            MetricsBoard::new("p", labels, Duration::from_secs(1)).with_target(Some("g".into())),
        );
        for (i, v) in values.iter().enumerate() {
            if let Some(v) = v {
                let metrics = Metrics {
                    target: Some(*v),
                    ..Metrics::default()
                };
                board.publish(i, metrics, Instant::now(), 0);
            }
        }
        board
    }

    fn policy(values: &[Option<f64>], policy: MetricPolicy, rate_limit: f64) -> EndpointMetrics {
        EndpointMetrics::new(board(values), EndpointMetricsConfig { policy, rate_limit })
    }

    async fn picks(p: &EndpointMetrics, n: usize, candidates: usize) -> Vec<(usize, &'static str)> {
        let request = LlmRequest::parse(br#"{"model":"m","prompt":"hi"}"#);
        let endpoints = views(&vec![1; candidates]);
        let ids: Vec<EndpointId> = (0..candidates).map(EndpointId::new).collect();
        let mut out = Vec::new();
        for _ in 0..n {
            let pick = p
                .pick(PickInput {
                    request: &request,
                    endpoints: &endpoints,
                    candidates: &ids,
                })
                .await
                .expect("pick");
            out.push((pick.endpoint.index(), pick.reason));
        }
        out
    }

    #[tokio::test]
    async fn least_and_most_keep_the_end_of_the_range() {
        // Range 0..9 over 3 candidates: least keeps values ≤ 3, most keeps values ≥ 6.
        let values = [Some(0.0), Some(3.0), Some(9.0)];
        let least = policy(&values, MetricPolicy::Least("g".into()), 1.0);
        for (e, reason) in picks(&least, 50, 3).await {
            assert!(e < 2 && reason == REASON_LEAST, "{e} {reason}");
        }
        let most = policy(&values, MetricPolicy::Most("g".into()), 1.0);
        assert!(picks(&most, 50, 3)
            .await
            .iter()
            .all(|p| *p == (2, REASON_MOST)));
        // Unknown metrics are not ranked; with none known, least request.
        let some = policy(&[None, Some(5.0)], MetricPolicy::Least("g".into()), 1.0);
        assert!(picks(&some, 20, 2)
            .await
            .iter()
            .all(|p| *p == (1, REASON_LEAST)));
        let none = policy(&[None, None], MetricPolicy::Least("g".into()), 1.0);
        assert!(picks(&none, 5, 2)
            .await
            .iter()
            .all(|(_, r)| *r == REASON_UNKNOWN));
    }

    #[tokio::test]
    async fn rate_limit_caps_an_endpoints_share_of_recent_picks() {
        let values = [Some(0.0), Some(10.0), Some(10.0)];
        let p = policy(&values, MetricPolicy::Least("g".into()), 0.5);
        let picks = picks(&p, RATE_WINDOW, 3).await;
        let first = picks.iter().filter(|(e, _)| *e == 0).count();
        assert!((45..=55).contains(&first), "{first} of {RATE_WINDOW}");
        assert!(picks.iter().any(|(_, r)| *r == REASON_RATE_LIMITED));
    }
}
