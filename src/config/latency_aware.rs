//! `latency_aware`'s settings (Higress 2.x `cluster_metrics`' keys, snake case as Higress spells
//! them): `mode` (`AdaptiveScore`, `LeastBusy`, `LeastFirstTokenLatency`, `LeastTotalLatency`),
//! the adaptive score's `ewma_beta`, `p2c_choices`, `ttft_weight`, `total_latency_weight`,
//! `error_penalty`, `failure_cooldown_ms`, `metrics_missing_policy`, and `rate_limit` and
//! `queue_size` of every mode, and `global_inflight_enabled` (with Higress's Redis keys: the
//! adaptive score's in-flight counts shared by every replica; read by
//! [`super::policy::PolicySettings`]). Higress's `service_list` / `cluster_header` are refused:
//! llm-lb picks among the pool's endpoints, not services.

use std::time::Duration;

use super::error::InvalidKey;
use super::file::LbConfigFile;
use super::prefix::PrefixSettings;

/// What `latency_aware` ranks endpoints by (`mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatencyMode {
    /// `AdaptiveScore`: smoothed time to first token and total time, times in-flight requests,
    /// times an error penalty, over a power-of-`p2c_choices` sample; failing endpoints cool down.
    AdaptiveScore,
    /// `LeastBusy`: the fewest requests in flight from this replica.
    LeastBusy,
    /// `LeastFirstTokenLatency`: the least mean time to first token of the last `queue_size`
    /// requests.
    LeastFirstTokenLatency,
    /// `LeastTotalLatency`: the least mean total time of the last `queue_size` requests.
    LeastTotalLatency,
}

impl LatencyMode {
    /// Every mode.
    pub const ALL: [LatencyMode; 4] = [
        LatencyMode::AdaptiveScore,
        LatencyMode::LeastBusy,
        LatencyMode::LeastFirstTokenLatency,
        LatencyMode::LeastTotalLatency,
    ];

    /// The `mode` value, as Higress spells it.
    pub const fn name(self) -> &'static str {
        match self {
            LatencyMode::AdaptiveScore => "AdaptiveScore",
            LatencyMode::LeastBusy => "LeastBusy",
            LatencyMode::LeastFirstTokenLatency => "LeastFirstTokenLatency",
            LatencyMode::LeastTotalLatency => "LeastTotalLatency",
        }
    }
}

/// The policy's settings from `lb_config`; defaults are Higress's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyAwareConfig {
    /// How endpoints are ranked (`mode`, default `AdaptiveScore`).
    pub mode: LatencyMode,
    /// EWMA smoothing of the adaptive score's latencies: `new = beta·old + (1 − beta)·sample`
    /// (`ewma_beta`, 0–1, default 0.5).
    pub ewma_beta: f64,
    /// Candidates sampled at random for the adaptive score, the lowest score winning (`p2c_choices`,
    /// default 2; all of them when there are no more).
    pub p2c_choices: usize,
    /// Weight of `√(ttft_ms + 1)` in the adaptive score (`ttft_weight`, default 0.7).
    pub ttft_weight: f64,
    /// Weight of `√(total_ms + 1)` in the adaptive score (`total_latency_weight`, default 0.3).
    pub total_latency_weight: f64,
    /// The adaptive score is multiplied by `1 + error_penalty · error_rate` (`error_penalty`,
    /// default 3).
    pub error_penalty: f64,
    /// How long an endpoint is avoided after a failed attempt (`failure_cooldown_ms`, default
    /// 30000).
    pub failure_cooldown: Duration,
    /// An endpoint whose share of the pool's last `queue_size` picks reached this is skipped while
    /// another candidate is below it (`rate_limit`, (0–1], default 1).
    pub rate_limit: f64,
    /// Latency samples averaged by the `Least*Latency` modes, and picks remembered for
    /// `rate_limit` (`queue_size`, default 100).
    pub queue_size: usize,
    /// How long session and response keys last (`redisKeyTTL`) and when a session's endpoint is
    /// too busy to keep it (`loadGuardAbsolute`, `loadGuardRelative`), as in `prefix_cache`.
    pub sessions: PrefixSettings,
}

/// Default `p2c_choices`.
pub const DEFAULT_P2C_CHOICES: usize = 2;
/// Default `failure_cooldown_ms`.
pub const DEFAULT_FAILURE_COOLDOWN: Duration = Duration::from_secs(30);
/// Default `queue_size` (Higress's `DefaultQueueSize`).
pub const DEFAULT_QUEUE_SIZE: usize = 100;
/// The largest `queue_size`: samples and picks are kept in memory per endpoint and per pool.
pub const MAX_QUEUE_SIZE: usize = 10_000;
/// The longest `failure_cooldown_ms`: one day.
pub const MAX_FAILURE_COOLDOWN_MS: i64 = 86_400_000;

impl Default for LatencyAwareConfig {
    fn default() -> Self {
        LatencyAwareConfig {
            mode: LatencyMode::AdaptiveScore,
            ewma_beta: 0.5,
            p2c_choices: DEFAULT_P2C_CHOICES,
            ttft_weight: 0.7,
            total_latency_weight: 0.3,
            error_penalty: 3.0,
            failure_cooldown: DEFAULT_FAILURE_COOLDOWN,
            rate_limit: 1.0,
            queue_size: DEFAULT_QUEUE_SIZE,
            sessions: PrefixSettings::default(),
        }
    }
}

/// Why Higress's shared in-flight counts are refused.
impl LatencyAwareConfig {
    /// Read and check the keys `latency_aware` uses; every problem is reported.
    pub fn from_lb_config(c: &LbConfigFile) -> Result<Self, Vec<InvalidKey>> {
        let mut issues = Vec::new();
        let mut bad = |key: &'static str, reason: &str| issues.push(InvalidKey::new(key, reason));
        let d = LatencyAwareConfig::default();
        let mode = match c.mode.as_deref() {
            None => d.mode,
            Some(m) => match LatencyMode::ALL.iter().find(|k| k.name() == m) {
                Some(k) => *k,
                None => {
                    let names: Vec<&str> = LatencyMode::ALL.iter().map(|k| k.name()).collect();
                    bad("mode", &format!("'{m}' is not one of {}", names.join(", ")));
                    d.mode
                }
            },
        };
        let ewma_beta = c.ewma_beta.unwrap_or(d.ewma_beta);
        if !(0.0..=1.0).contains(&ewma_beta) {
            bad("ewma_beta", "must be between 0 and 1");
        }
        let p2c_choices = match c.p2c_choices {
            Some(n) if n > 0 => usize::try_from(n).unwrap_or(usize::MAX),
            _ => d.p2c_choices,
        };
        let mut weight = |key: &'static str, v: Option<f64>, default: f64| {
            let v = v.unwrap_or(default);
            if !(v.is_finite() && v >= 0.0) {
                bad(key, "must be a number at least 0");
            }
            v
        };
        let ttft_weight = weight("ttft_weight", c.ttft_weight, d.ttft_weight);
        let total_latency_weight = weight(
            "total_latency_weight",
            c.total_latency_weight,
            d.total_latency_weight,
        );
        let error_penalty = weight("error_penalty", c.error_penalty, d.error_penalty);
        if ttft_weight == 0.0 && total_latency_weight == 0.0 {
            bad(
                "total_latency_weight",
                "ttft_weight and total_latency_weight must not both be 0",
            );
        }
        let failure_cooldown = match c.failure_cooldown_ms {
            None | Some(0) => d.failure_cooldown,
            Some(ms) if (1..=MAX_FAILURE_COOLDOWN_MS).contains(&ms) => {
                Duration::from_millis(ms.unsigned_abs())
            }
            Some(_) => {
                bad(
                    "failure_cooldown_ms",
                    &format!(
                        "must be between 0 (the default, 30000) and {MAX_FAILURE_COOLDOWN_MS}"
                    ),
                );
                d.failure_cooldown
            }
        };
        match c.metrics_missing_policy.as_deref() {
            None | Some("least_busy") => {}
            Some(other) => bad(
                "metrics_missing_policy",
                &format!("'{other}' is not supported: the only policy is least_busy"),
            ),
        }
        let rate_limit = c.rate_limit.unwrap_or(d.rate_limit);
        if !(rate_limit > 0.0 && rate_limit <= 1.0) {
            bad("rate_limit", "must be above 0 and at most 1");
        }
        let queue_size = match c.queue_size {
            None | Some(0) => d.queue_size,
            Some(n) => match usize::try_from(n) {
                Ok(n) if n <= MAX_QUEUE_SIZE => n,
                _ => {
                    bad(
                        "queue_size",
                        &format!("must be between 0 (the default, 100) and {MAX_QUEUE_SIZE}"),
                    );
                    d.queue_size
                }
            },
        };
        if c.global_inflight_enabled == Some(true) && mode != LatencyMode::AdaptiveScore {
            bad(
                "global_inflight_enabled",
                "only with mode: AdaptiveScore (as in Higress)",
            );
        }
        if c.global_inflight_enabled != Some(true) {
            for (key, present) in [
                (
                    "global_inflight_key_prefix",
                    c.global_inflight_key_prefix.is_some(),
                ),
                (
                    "global_inflight_timeout",
                    c.global_inflight_timeout.is_some(),
                ),
                (
                    "global_inflight_key_ttl",
                    c.global_inflight_key_ttl.is_some(),
                ),
            ] {
                if present {
                    bad(key, "only used with global_inflight_enabled: true");
                }
            }
        }
        for (key, present) in [
            ("service_list", c.service_list.is_some()),
            ("cluster_header", c.cluster_header.is_some()),
        ] {
            if present {
                bad(
                    key,
                    "not used by llm-lb: Higress picks among the services named in service_list \
                     (through cluster_header); latency_aware picks among the pool's endpoints, so \
                     list them under endpoints",
                );
            }
        }
        let sessions = PrefixSettings::from_lb_config(c).unwrap_or_else(|mut e| {
            issues.append(&mut e);
            d.sessions
        });
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(LatencyAwareConfig {
            mode,
            ewma_beta,
            p2c_choices,
            ttft_weight,
            total_latency_weight,
            error_penalty,
            failure_cooldown,
            rate_limit,
            queue_size,
            sessions,
        })
    }
}
