//! [`build`]: the policy a pool's settings ask for, over state built by the routing layer.
//!
//! No I/O and no infrastructure is created here: the shared counts (embedded or Redis) and the
//! engine-metrics board a policy reads are built, carried over reloads and kept alive by the
//! routing layer, and handed in as [`Deps`].

use std::sync::Arc;

use super::kv_aware::{KvAware, Tokenizer};
use super::{
    EndpointHash, EndpointMetrics, GlobalLeastRequest, LatencyAware, LeastBusy, Policy,
    PrefixCache, Random, Registry, RoundRobin,
};
use crate::config::{EndpointConfig, PolicySettings};
use crate::kv_events::{Feed, KvIndex};
use crate::scrape::MetricsBoard;
use crate::store::PoolCounts;

use super::registry::CustomContext;

/// The state a pool's policy reads, built by the routing layer.
#[derive(Default, Clone)]
pub struct Deps {
    /// The pool's shared counts, for policies that keep them ([`PolicySettings::store`]).
    pub counts: Option<Arc<PoolCounts>>,
    /// The pool's engine-metrics board, for `least_busy`.
    pub board: Option<Arc<MetricsBoard>>,
    /// The pool's index of cached blocks, for `kv_aware`.
    pub kv_index: Option<Arc<KvIndex>>,
    /// The KV-event streams followed into `kv_index`, kept running while this is held.
    pub kv_feeds: Vec<Arc<Feed>>,
    /// How the pool tokenizes, for `kv_aware` (approximate when `None`).
    pub tokenizer: Option<Tokenizer>,
}

/// Build the policy `settings` ask for over `endpoints` (`pool` names it in errors and metrics).
/// Custom policies come from `registry`.
pub fn build(
    pool: &str,
    settings: &PolicySettings,
    endpoints: &[EndpointConfig],
    deps: Deps,
    registry: &Registry,
) -> Result<Arc<dyn Policy>, String> {
    let counts = || {
        deps.counts
            .clone()
            .ok_or_else(|| format!("{} needs shared counts", settings.name()))
    };
    Ok(match settings {
        PolicySettings::RoundRobin => {
            let weights: Vec<usize> = endpoints.iter().map(|e| e.weight).collect();
            Arc::new(RoundRobin::new(&weights))
        }
        PolicySettings::Random => Arc::new(Random::new()),
        PolicySettings::GlobalLeastRequest(shared) => {
            Arc::new(GlobalLeastRequest::new(counts()?, shared.max_inflight))
        }
        PolicySettings::PrefixCache(shared, prefix) => {
            Arc::new(PrefixCache::new(counts()?, shared.max_inflight, *prefix))
        }
        PolicySettings::LeastBusy(config) => {
            let board = deps
                .board
                .clone()
                .ok_or_else(|| "least_busy needs a metrics board".to_owned())?;
            Arc::new(LeastBusy::new(board, config.clone()))
        }
        PolicySettings::EndpointMetrics(config) => {
            let board = deps
                .board
                .clone()
                .ok_or_else(|| "endpoint_metrics needs a metrics board".to_owned())?;
            Arc::new(EndpointMetrics::new(board, config.clone()))
        }
        PolicySettings::EndpointHash(shared, config) => Arc::new(EndpointHash::new(
            counts()?,
            shared.max_inflight,
            config.clone(),
        )),
        PolicySettings::LatencyAware(shared, config) => {
            let policy = LatencyAware::new(endpoints.len(), *config);
            Arc::new(match shared {
                Some(_) => policy.sharing(counts()?),
                None => policy,
            })
        }
        PolicySettings::KvAware(_, kv) => {
            let index = deps
                .kv_index
                .clone()
                .ok_or_else(|| "kv_aware needs a KV index".to_owned())?;
            let tokenizer = deps.tokenizer.clone().unwrap_or(Tokenizer::Approximate);
            Arc::new(
                KvAware::new(counts()?, index, tokenizer, kv.clone())
                    .with_board(deps.board.clone()),
            )
        }
        PolicySettings::Custom(custom) => registry.build(
            &custom.name,
            &CustomContext {
                pool,
                endpoints,
                lb_config: &custom.lb_config,
            },
        )?,
    })
}
