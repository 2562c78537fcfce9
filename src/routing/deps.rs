//! The state a pool's policy reads, built per generation: shared counts in the store the
//! configuration names (carried over from the previous generation when the pool keeps its name
//! and store, so counts and the prefix index survive reloads), an engine-metrics board for
//! `least_busy`, `endpoint_metrics` and `kv_aware`'s engine queues, and for `kv_aware` the index
//! of cached blocks (carried over like the counts) and the model's tokenizer (loaded from disk).

use std::sync::Arc;

use crate::config::{
    EndpointConfig, KvAwareSettings, MetricPolicy, PolicySettings, PoolConfig, StoreConfig,
};
use crate::kv_events::{Feed, KvIndex, SubscriberOptions};
use crate::policy::kv_aware::Tokenizer;
use crate::policy::Deps;
use crate::scrape::MetricsBoard;
use crate::store::{InflightStore, MemoryStore, PoolCounts, RedisStore};

use super::table::Routes;

/// What `pc`'s policy needs over `endpoints`, reusing `previous`'s counts and index where it can.
/// Fails when `kv_aware`'s tokenizer cannot be loaded.
pub fn build(
    pc: &PoolConfig,
    endpoints: &[EndpointConfig],
    previous: Option<&Routes>,
) -> Result<Deps, String> {
    let counts = pc.policy.store().map(|store| {
        previous
            .and_then(|r| carried_counts(r, pc))
            .unwrap_or_else(|| new_counts(&pc.name, store))
    });
    let board = |target: Option<String>| {
        let labels = endpoints.iter().map(|e| e.addr.to_string()).collect();
        Some(Arc::new(
            MetricsBoard::new(&pc.name, labels, pc.metrics.interval).with_target(target),
        ))
    };
    let board = match &pc.policy {
        PolicySettings::LeastBusy(_) => board(None),
        PolicySettings::EndpointMetrics(m) => board(match &m.policy {
            MetricPolicy::Default(_) => None,
            MetricPolicy::Least(target) | MetricPolicy::Most(target) => Some(target.clone()),
        }),
        // `kv_aware` reads its engines' own queues unless told not to.
        PolicySettings::KvAware(_, kv) if kv.queue_per_mille > 0 => board(None),
        PolicySettings::RoundRobin
        | PolicySettings::Random
        | PolicySettings::GlobalLeastRequest(_)
        | PolicySettings::PrefixCache(..)
        | PolicySettings::KvAware(..)
        | PolicySettings::LatencyAware(..)
        | PolicySettings::EndpointHash(..)
        | PolicySettings::Custom(_) => None,
    };
    let (kv_index, kv_feeds, tokenizer) = match &pc.policy {
        PolicySettings::KvAware(_, kv) => {
            let index = previous
                .and_then(|r| carried_index(r, pc, kv))
                .unwrap_or_else(|| Arc::new(KvIndex::new(&pc.name, kv.index_blocks)));
            let feeds = follow(&index, endpoints, kv);
            (Some(index), feeds, Some(tokenizer(kv)?))
        }
        PolicySettings::RoundRobin
        | PolicySettings::Random
        | PolicySettings::GlobalLeastRequest(_)
        | PolicySettings::PrefixCache(..)
        | PolicySettings::LeastBusy(_)
        | PolicySettings::EndpointMetrics(_)
        | PolicySettings::LatencyAware(..)
        | PolicySettings::EndpointHash(..)
        | PolicySettings::Custom(_) => (None, Vec::new(), None),
    };
    Ok(Deps {
        counts,
        board,
        kv_index,
        kv_feeds,
        tokenizer,
    })
}

/// The feeds of every endpoint that names a KV-event stream: those already running (carried
/// over from the previous generation), new subscribers for the others.
fn follow(
    index: &Arc<KvIndex>,
    endpoints: &[EndpointConfig],
    kv: &KvAwareSettings,
) -> Vec<Arc<Feed>> {
    endpoints
        .iter()
        .filter_map(|e| {
            let url = e.kv_events.as_deref()?;
            let options = SubscriberOptions {
                topic: kv.events_topic.clone(),
                replay: e.kv_events_replay.clone(),
                ..SubscriberOptions::default()
            };
            index
                .feeds()
                .follow(index, &e.addr.to_string(), url, options)
        })
        .collect()
}

/// `kv_aware`'s tokenizer: the model's, loaded from its directory, or approximate tokens.
fn tokenizer(kv: &KvAwareSettings) -> Result<Tokenizer, String> {
    let Some(dir) = &kv.tokenizer else {
        return Ok(Tokenizer::Approximate);
    };
    let t = llm_lb_tokenizer::ChatTokenizer::from_dir(dir)
        .map_err(|e| format!("lb_config.tokenizer {}: {e}", dir.display()))?;
    Ok(Tokenizer::Exact(Arc::new(t)))
}

/// The index of `previous`'s `kv_aware` pool named like `pc`, if its bound is unchanged.
fn carried_index(previous: &Routes, pc: &PoolConfig, kv: &KvAwareSettings) -> Option<Arc<KvIndex>> {
    let old = previous.pools.iter().find(|p| p.name() == pc.name)?;
    match &old.config.policy {
        PolicySettings::KvAware(_, before) if before.index_blocks == kv.index_blocks => {
            old.deps.kv_index.clone()
        }
        PolicySettings::KvAware(..)
        | PolicySettings::RoundRobin
        | PolicySettings::Random
        | PolicySettings::GlobalLeastRequest(_)
        | PolicySettings::PrefixCache(..)
        | PolicySettings::LeastBusy(_)
        | PolicySettings::EndpointMetrics(_)
        | PolicySettings::LatencyAware(..)
        | PolicySettings::EndpointHash(..)
        | PolicySettings::Custom(_) => None,
    }
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
