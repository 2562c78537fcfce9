//! The timing model: what one engine step costs.
//!
//! A step runs every request of the batch once: a prefill chunk for requests still reading
//! their prompt, one decode token for the others. Its cost, in model milliseconds, is
//!
//! ```text
//! step = f × ( Σ prefilling requests starting now: prefill_overhead_ms
//!            + Σ prefill chunk tokens × prefill_ms_per_token
//!            + itl_ms if any request decodes )
//! f    = 1 + (load_factor − 1) × (batch − 1) / (max_num_seqs − 1)     (1 when max_num_seqs = 1)
//! ```
//!
//! so a lone request's TTFT is `f × (overhead + uncached prompt tokens × per-token cost)` plus
//! its queue wait, and each later token takes `f × itl_ms`, as in llm-d-inference-sim's
//! per-token latency model. Wall-clock time is model time × `time_scale`.

use std::time::Duration;

use crate::config::SimConfig;

/// The load slow-down `f` of a step with `batch` running requests.
pub fn load_multiplier(load_factor: f64, batch: usize, max_num_seqs: usize) -> f64 {
    if max_num_seqs <= 1 || batch <= 1 {
        return 1.0;
    }
    let frac = (batch.min(max_num_seqs) - 1) as f64 / (max_num_seqs - 1) as f64;
    1.0 + (load_factor - 1.0) * frac
}

/// What a step computes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepWork {
    /// Requests in the batch.
    pub batch: usize,
    /// Requests whose prefill starts in this step (each pays the overhead once).
    pub new_prefills: usize,
    /// Prompt tokens computed in this step (uncached, all prefilling requests).
    pub prefill_tokens: usize,
    /// Whether any request produces a decode token in this step.
    pub decoding: bool,
}

/// Costs of one step, model milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepCost {
    /// The load multiplier applied.
    pub factor: f64,
    /// Whole step.
    pub total_ms: f64,
}

/// The cost of a step.
pub fn step_cost(cfg: &SimConfig, work: &StepWork) -> StepCost {
    let factor = load_multiplier(cfg.load_factor, work.batch, cfg.max_num_seqs);
    let mut ms = work.new_prefills as f64 * cfg.prefill_overhead_ms
        + work.prefill_tokens as f64 * cfg.prefill_ms_per_token;
    if work.decoding {
        ms += cfg.itl_ms;
    }
    StepCost {
        factor,
        total_ms: factor * ms,
    }
}

/// The model cost of one request's own prefill (`overhead + uncached × per-token`), before the
/// load multiplier.
pub fn prefill_ms(cfg: &SimConfig, uncached_tokens: usize) -> f64 {
    cfg.prefill_overhead_ms + uncached_tokens as f64 * cfg.prefill_ms_per_token
}

/// Wall-clock duration of `model_ms` model milliseconds.
pub fn wall(time_scale: f64, model_ms: f64) -> Duration {
    let ms = model_ms * time_scale;
    if !ms.is_finite() || ms <= 0.0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64((ms / 1000.0).min(1.0e6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_multiplier_grows_linearly_to_the_factor() {
        assert_eq!(load_multiplier(2.0, 1, 16), 1.0);
        assert_eq!(load_multiplier(2.0, 16, 16), 2.0);
        assert!((load_multiplier(2.0, 6, 11) - 1.5).abs() < 1e-12);
        assert_eq!(load_multiplier(3.0, 5, 1), 1.0);
        assert_eq!(load_multiplier(1.0, 16, 16), 1.0);
    }

    #[test]
    fn step_cost_adds_overheads_tokens_and_itl() {
        let cfg = SimConfig {
            prefill_overhead_ms: 5.0,
            prefill_ms_per_token: 0.5,
            itl_ms: 10.0,
            load_factor: 3.0,
            max_num_seqs: 3,
            ..SimConfig::default()
        };
        let lone = step_cost(
            &cfg,
            &StepWork {
                batch: 1,
                new_prefills: 1,
                prefill_tokens: 100,
                decoding: false,
            },
        );
        assert_eq!(lone.total_ms, 55.0);
        let full = step_cost(
            &cfg,
            &StepWork {
                batch: 3,
                new_prefills: 1,
                prefill_tokens: 10,
                decoding: true,
            },
        );
        assert_eq!(full.factor, 3.0);
        assert_eq!(full.total_ms, 3.0 * (5.0 + 5.0 + 10.0));
        assert_eq!(prefill_ms(&cfg, 10), 10.0);
    }

    #[test]
    fn wall_time_scales_and_zero_is_instant() {
        assert_eq!(wall(0.0, 100.0), Duration::ZERO);
        assert_eq!(wall(0.5, 100.0), Duration::from_millis(50));
        assert_eq!(wall(1.0, -1.0), Duration::ZERO);
    }
}
