//! Passive health settings (`outlier_detection`): when failing endpoints are ejected and for how
//! long (the detector itself is `health::passive`).

use std::time::Duration;

use super::error::InvalidKey;
use super::file::OutlierFile;

/// Validated `outlier_detection` settings of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Failures in a row that eject an endpoint.
    pub consecutive_failures: u32,
    /// The first ejection's length; each further one doubles it.
    pub base_ejection: Duration,
    /// The longest ejection.
    pub max_ejection: Duration,
    /// At most this share of a pool's endpoints is ejected at once (at least one, never all).
    pub max_ejected_percent: u8,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

impl OutlierConfig {
    /// The settings a pool's `outlier_detection` block asks for: `None` when it is disabled, the
    /// defaults when the block is absent.
    pub fn from_file(file: Option<&OutlierFile>) -> Result<Option<Self>, Vec<InvalidKey>> {
        let Some(f) = file else {
            return Ok(Some(OutlierConfig::default()));
        };
        if f.enabled == Some(false) {
            return Ok(None);
        }
        let d = OutlierConfig::default();
        let mut bad = Vec::new();
        let mut invalid = |key: &'static str, reason: &str| bad.push(InvalidKey::new(key, reason));
        let consecutive_failures = f.consecutive_failures.unwrap_or(d.consecutive_failures);
        if consecutive_failures == 0 {
            invalid("consecutive_failures", "must be at least 1");
        }
        let base_ms = f
            .base_ejection_ms
            .unwrap_or(d.base_ejection.as_millis() as u64);
        if base_ms == 0 {
            invalid("base_ejection_ms", "must be at least 1");
        }
        let max_ms = f
            .max_ejection_ms
            .unwrap_or((d.max_ejection.as_millis() as u64).max(base_ms));
        if max_ms < base_ms {
            invalid("max_ejection_ms", "must be at least base_ejection_ms");
        }
        let pct = f.max_ejected_percent.unwrap_or(d.max_ejected_percent);
        if pct > 100 {
            invalid("max_ejected_percent", "must be between 0 and 100");
        }
        if !bad.is_empty() {
            return Err(bad);
        }
        Ok(Some(OutlierConfig {
            consecutive_failures,
            base_ejection: Duration::from_millis(base_ms),
            max_ejection: Duration::from_millis(max_ms),
            max_ejected_percent: pct,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_from_file() {
        assert_eq!(
            OutlierConfig::from_file(None),
            Ok(Some(OutlierConfig::default()))
        );
        let off = OutlierFile {
            enabled: Some(false),
            ..OutlierFile::default()
        };
        assert_eq!(OutlierConfig::from_file(Some(&off)), Ok(None));
        let bad = OutlierFile {
            consecutive_failures: Some(0),
            base_ejection_ms: Some(1000),
            max_ejection_ms: Some(10),
            max_ejected_percent: Some(101),
            ..OutlierFile::default()
        };
        let keys: Vec<&str> = OutlierConfig::from_file(Some(&bad))
            .expect_err("invalid")
            .iter()
            .map(|i| i.key)
            .collect();
        assert_eq!(
            keys,
            [
                "consecutive_failures",
                "max_ejection_ms",
                "max_ejected_percent"
            ]
        );
        // A long base ejection raises the default maximum with it.
        let long = OutlierFile {
            base_ejection_ms: Some(600_000),
            ..OutlierFile::default()
        };
        let c = OutlierConfig::from_file(Some(&long))
            .expect("valid")
            .expect("on");
        assert_eq!(c.max_ejection, Duration::from_secs(600));
    }
}
