//! The routing table the proxy reads ([`Routes`]: which pool serves a model, its pools) and the
//! handle through which the supervisor publishes a new one ([`Live`]).

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use super::pool::Pool;
use crate::config::Config;

/// The routing table: validated configuration and the pools built from it.
pub struct Routes {
    /// 1 for the configuration loaded at start, +1 per applied change.
    pub id: u64,
    /// When it was put in force.
    pub since: std::time::SystemTime,
    /// The validated configuration it was built from.
    pub config: Config,
    /// One pool per `config.pools` entry, in the same order.
    pub pools: Vec<Arc<Pool>>,
}

impl Routes {
    /// The pool for a request: the first pool serving `model`; a request without a model goes to
    /// the first pool that serves `"*"`, else the first pool.
    pub fn pool_for(&self, model: Option<&str>) -> Option<&Arc<Pool>> {
        match model {
            Some(m) => self.pools.iter().find(|p| p.config.serves(m)),
            None => self
                .pools
                .iter()
                .find(|p| p.config.models.iter().any(|m| m == "*"))
                .or(self.pools.first()),
        }
    }

    /// Log and update the gauges of endpoints whose ejection has ended.
    pub fn readmit_due(&self) {
        for pool in &self.pools {
            pool.readmit_due();
        }
    }

    /// Every pool's endpoints as `(pool, label)` pairs.
    pub fn endpoint_labels(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pools.iter().flat_map(|p| {
            p.endpoints
                .iter()
                .map(move |e| (p.name(), e.label.as_str()))
        })
    }

    /// Whether no request routed by this table is still in flight to any endpoint.
    pub fn idle(&self) -> bool {
        self.pools
            .iter()
            .all(|p| p.endpoints.iter().all(|e| e.inflight() == 0))
    }
}

/// The generation in force, shared by the proxy (reader) and the supervisor (writer).
#[derive(Clone, Default)]
pub struct Live(Arc<ArcSwapOption<Routes>>);

impl Live {
    /// The routing table in force (`None` before the first generation is built).
    pub fn current(&self) -> Option<Arc<Routes>> {
        self.0.load_full()
    }

    pub(crate) fn set(&self, routes: Arc<Routes>) {
        self.0.store(Some(routes));
    }
}
