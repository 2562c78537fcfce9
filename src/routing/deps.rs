//! The state a pool's policy reads, built per generation: shared counts in the store the
//! configuration names (carried over from the previous generation when the pool keeps its name
//! and store, so counts and the prefix index survive reloads), and an engine-metrics board for
//! `least_busy`.

use std::sync::Arc;

use crate::config::{EndpointConfig, PolicySettings, PoolConfig, StoreConfig};
use crate::policy::Deps;
use crate::scrape::MetricsBoard;
use crate::store::{InflightStore, MemoryStore, PoolCounts, RedisStore};

use super::table::Routes;

/// What `pc`'s policy needs over `endpoints`, reusing `previous`'s counts where it can.
pub fn build(pc: &PoolConfig, endpoints: &[EndpointConfig], previous: Option<&Routes>) -> Deps {
    let counts = pc.policy.store().map(|store| {
        previous
            .and_then(|r| carried_counts(r, pc))
            .unwrap_or_else(|| new_counts(&pc.name, store))
    });
    let board = match &pc.policy {
        PolicySettings::LeastBusy(_) => {
            let labels = endpoints.iter().map(|e| e.addr.to_string()).collect();
            Some(Arc::new(MetricsBoard::new(
                &pc.name,
                labels,
                pc.metrics.interval,
            )))
        }
        PolicySettings::RoundRobin
        | PolicySettings::Random
        | PolicySettings::GlobalLeastRequest(_)
        | PolicySettings::PrefixCache(..)
        | PolicySettings::Custom(_) => None,
    };
    Deps { counts, board }
}

/// New counts for pool `name` in `store`.
fn new_counts(name: &str, store: &StoreConfig) -> Arc<PoolCounts> {
    let store: Arc<dyn InflightStore> = match store {
        StoreConfig::Redis(redis) => Arc::new(RedisStore::new((**redis).clone())),
        StoreConfig::Embedded => Arc::new(MemoryStore::new()),
    };
    Arc::new(PoolCounts::new(store, name))
}

/// The counts of `previous`'s pool named like `pc`, if it uses the same store.
fn carried_counts(previous: &Routes, pc: &PoolConfig) -> Option<Arc<PoolCounts>> {
    let old = previous.pools.iter().find(|p| p.name() == pc.name)?;
    let store = old.config.policy.store()?;
    if Some(store) == pc.policy.store() {
        old.counts().cloned()
    } else {
        None
    }
}
