//! `endpoint_metrics`' settings (Higress's keys, snake case as Higress spells them):
//! `metric_policy` (`default`: `least_busy`'s filter tree; `least` / `most`: the endpoints with the
//! least or most of one scraped gauge), `target_metric` (that gauge), `rate_limit` (the largest
//! share of the last 100 picks one endpoint may take).

use super::error::InvalidKey;
use super::file::LbConfigFile;
use super::least_busy::LeastBusyConfig;

/// How `endpoint_metrics` ranks endpoints.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricPolicy {
    /// `least_busy`'s filter tree over waiting queue, KV-cache use and LoRA adapters.
    Default(LeastBusyConfig),
    /// The endpoints with the least of the target gauge.
    Least(String),
    /// The endpoints with the most of the target gauge.
    Most(String),
}

/// The policy's settings from `lb_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointMetricsConfig {
    /// How endpoints are ranked.
    pub policy: MetricPolicy,
    /// The largest share (0–1] of the last [`RATE_WINDOW`] picks one endpoint may take before a
    /// pick goes to another candidate at random (`rate_limit`, default 1: no limit).
    pub rate_limit: f64,
}

/// Picks remembered for `rate_limit` (Higress's `FixedQueueSize`).
pub const RATE_WINDOW: usize = 100;

impl EndpointMetricsConfig {
    /// Read and check the keys `endpoint_metrics` uses; every problem is reported.
    pub fn from_lb_config(c: &LbConfigFile) -> Result<Self, Vec<InvalidKey>> {
        let mut issues = Vec::new();
        let target = c.target_metric.clone().filter(|t| !t.trim().is_empty());
        let policy = match (c.metric_policy.as_deref().unwrap_or("default"), target) {
            ("default", _) => match LeastBusyConfig::from_lb_config(c) {
                Ok(tree) => Some(MetricPolicy::Default(tree)),
                Err(bad) => {
                    issues.extend(bad);
                    None
                }
            },
            ("least", Some(t)) => Some(MetricPolicy::Least(t)),
            ("most", Some(t)) => Some(MetricPolicy::Most(t)),
            ("least" | "most", None) => {
                issues.push(InvalidKey::new(
                    "target_metric",
                    "name the gauge to rank by, e.g. vllm:num_requests_waiting",
                ));
                None
            }
            (other, _) => {
                issues.push(InvalidKey::new(
                    "metric_policy",
                    format!("'{other}' is not one of default, least, most"),
                ));
                None
            }
        };
        let rate_limit = c.rate_limit.unwrap_or(1.0);
        if !(rate_limit > 0.0 && rate_limit <= 1.0) {
            issues.push(InvalidKey::new(
                "rate_limit",
                "must be above 0 and at most 1",
            ));
        }
        match policy {
            Some(policy) if issues.is_empty() => Ok(EndpointMetricsConfig { policy, rate_limit }),
            _ => Err(issues),
        }
    }
}
