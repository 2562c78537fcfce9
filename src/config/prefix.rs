//! `prefix_cache`'s settings from `lb_config`: `redisKeyTTL` and the load guard
//! (`loadGuardAbsolute`, `loadGuardRelative`).

use std::time::Duration;

use super::error::InvalidKey;
use super::file::LbConfigFile;

/// How `prefix_cache` weighs cache affinity against load: the endpoint that
/// holds the longest prefix is skipped when it has more than `max(absolute, ⌊least × per_mille /
/// 1000⌋)` requests in flight above the least loaded candidate (`least`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadGuard {
    /// The absolute threshold (`loadGuardAbsolute`).
    pub absolute: u64,
    /// The relative threshold in thousandths (500 = half the least loaded endpoint's count).
    pub per_mille: u64,
}

impl LoadGuard {
    /// A guard that never diverts: the holder is kept however busy (only `maxRequestCount`
    /// still applies).
    pub const NEVER: LoadGuard = LoadGuard {
        absolute: u64::MAX,
        per_mille: 0,
    };

    /// Whether a holder with `holder` in flight is too busy compared with `least`.
    pub fn too_busy(&self, holder: u64, least: u64) -> bool {
        let extra = self
            .absolute
            .max(least.saturating_mul(self.per_mille) / 1000);
        holder > least.saturating_add(extra)
    }
}

/// `prefix_cache`'s settings: how long an index entry lives and the load guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixSettings {
    /// When affinity yields to load.
    pub guard: LoadGuard,
    /// How long a prefix stays in the index without being used (`redisKeyTTL`).
    pub ttl: Duration,
}

impl Default for PrefixSettings {
    /// Higress's `redisKeyTTL` (30 min); a holder may carry 8 requests, or half the least loaded
    /// endpoint's count, more than the least loaded endpoint.
    fn default() -> Self {
        PrefixSettings {
            guard: LoadGuard {
                absolute: 8,
                per_mille: 500,
            },
            ttl: Duration::from_secs(1800),
        }
    }
}

impl PrefixSettings {
    /// Read and check the keys: `redisKeyTTL` (s; 0 or absent → the default, as in Higress) and
    /// the load guard. Every problem is reported.
    pub fn from_lb_config(c: &LbConfigFile) -> Result<Self, Vec<InvalidKey>> {
        let defaults = PrefixSettings::default();
        let mut bad = Vec::new();
        let ttl = match c.redisKeyTTL {
            None | Some(0) => defaults.ttl,
            Some(s) if s < 0 => {
                bad.push(InvalidKey::new(
                    "redisKeyTTL",
                    "must be a positive number of seconds (0 means the default, 1800)",
                ));
                defaults.ttl
            }
            Some(s) => Duration::from_secs(s.unsigned_abs()),
        };
        let per_mille = match c.loadGuardRelative {
            None => defaults.guard.per_mille,
            Some(r) if r.is_finite() && (0.0..=1000.0).contains(&r) => (r * 1000.0).round() as u64,
            Some(_) => {
                bad.push(InvalidKey::new(
                    "loadGuardRelative",
                    "must be a number from 0 to 1000 (a fraction of the least loaded endpoint's count)",
                ));
                defaults.guard.per_mille
            }
        };
        if !bad.is_empty() {
            return Err(bad);
        }
        Ok(PrefixSettings {
            ttl,
            guard: LoadGuard {
                absolute: c.loadGuardAbsolute.unwrap_or(defaults.guard.absolute),
                per_mille,
            },
        })
    }
}
