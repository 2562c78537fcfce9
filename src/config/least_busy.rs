//! `least_busy`'s settings from `lb_config`: the filter tree's thresholds and `criticalModels`.

use super::error::InvalidKey;
use super::file::LbConfigFile;

/// The tree's thresholds (`lb_config` keys in brackets); defaults are Higress's constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Low queueing: waiting strictly below this (`queueingThresholdLoRA`, 50).
    pub queueing_lora: u64,
    /// Capacity for sheddable requests: waiting at most this (`queueThresholdCritical`, 5).
    pub queue_critical: u64,
    /// Capacity for sheddable requests: KV-cache use at most this (`kvCacheThreshold`, 0.8).
    pub kv_cache: f64,
    /// Probability of preferring affine endpoints over ones with a free adapter slot
    /// (`loraAffinityThreshold`, 1.0).
    pub lora_affinity: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            queueing_lora: 50,
            queue_critical: 5,
            kv_cache: 0.8,
            lora_affinity: 1.0,
        }
    }
}

/// The policy's settings from `lb_config`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeastBusyConfig {
    /// The filter tree's thresholds.
    pub thresholds: Thresholds,
    /// `criticalModels`: requests for these models are critical.
    pub critical_models: Vec<String>,
}

impl LeastBusyConfig {
    /// Read and check the keys `least_busy` uses; every problem is reported.
    pub fn from_lb_config(c: &LbConfigFile) -> Result<Self, Vec<InvalidKey>> {
        let mut issues = Vec::new();
        let mut bad = |key: &'static str, reason: &str| issues.push(InvalidKey::new(key, reason));
        let d = Thresholds::default();
        let fraction = |v: Option<f64>, default: f64| v.unwrap_or(default);
        let thresholds = Thresholds {
            queueing_lora: c.queueingThresholdLoRA.unwrap_or(d.queueing_lora),
            queue_critical: c.queueThresholdCritical.unwrap_or(d.queue_critical),
            kv_cache: fraction(c.kvCacheThreshold, d.kv_cache),
            lora_affinity: fraction(c.loraAffinityThreshold, d.lora_affinity),
        };
        if thresholds.queueing_lora == 0 {
            bad("queueingThresholdLoRA", "must be at least 1");
        }
        for (key, v) in [
            ("kvCacheThreshold", thresholds.kv_cache),
            ("loraAffinityThreshold", thresholds.lora_affinity),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bad(key, "must be between 0 and 1");
            }
        }
        let critical_models = c.criticalModels.clone().unwrap_or_default();
        if critical_models.iter().any(|m| m.is_empty()) {
            bad("criticalModels", "model names must not be empty");
        }
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(LeastBusyConfig {
            thresholds,
            critical_models,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keys_defaults_and_ranges() {
        let lb = |yaml: &str| -> LbConfigFile { serde_yaml::from_str(yaml).expect("yaml") };
        let c = LeastBusyConfig::from_lb_config(&lb("{}")).expect("valid");
        assert_eq!(c, LeastBusyConfig::default());
        assert_eq!(c.thresholds.queueing_lora, 50);
        assert_eq!(c.thresholds.queue_critical, 5);
        assert_eq!(c.thresholds.kv_cache, 0.8);
        assert_eq!(c.thresholds.lora_affinity, 1.0);
        let c = LeastBusyConfig::from_lb_config(&lb(
            "{criticalModels: [a, b], queueThresholdCritical: 0, kvCacheThreshold: 0.5, queueingThresholdLoRA: 128, loraAffinityThreshold: 0.999}",
        ))
        .expect("valid");
        assert_eq!(c.critical_models, vec!["a", "b"]);
        assert_eq!(
            c.thresholds,
            Thresholds {
                queueing_lora: 128,
                queue_critical: 0,
                kv_cache: 0.5,
                lora_affinity: 0.999
            }
        );
        let e = LeastBusyConfig::from_lb_config(&lb(
            "{kvCacheThreshold: 1.5, loraAffinityThreshold: -1, queueingThresholdLoRA: 0, criticalModels: ['']}",
        ))
        .expect_err("invalid");
        let keys: Vec<&str> = e.iter().map(|i| i.key).collect();
        assert_eq!(
            keys,
            vec![
                "queueingThresholdLoRA",
                "kvCacheThreshold",
                "loraAffinityThreshold",
                "criticalModels"
            ]
        );
    }
}
