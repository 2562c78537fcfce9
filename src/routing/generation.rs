//! A generation: the routing table built from one validated configuration and one DNS answer,
//! and the background work that keeps it current (health checks, engine-metrics scraping).
//!
//! The proxy reads the generation in force from [`super::Live`] once per request and keeps it for the
//! whole request, retries included, so a reload or a DNS change never moves a request that has
//! started: it finishes on the pools it was routed by. A new generation takes over the previous
//! one's in-flight counts ([`PoolCounts`], see [`super::deps`]) for every pool whose name and state store are
//! unchanged, so shared counts and the prefix index survive reloads and leases taken before one
//! are released against the store they were taken from. Each endpoint that stays in a pool keeps
//! its health: passive (ejection, streak, back-off) always, active while the pool's
//! `health_check` settings are unchanged (the checks themselves carry over and keep probing).

use std::sync::Arc;

use pingora::services::background::BackgroundService;
use tokio::sync::watch;

use super::pool::Pool;
use super::table::Routes;
use crate::config::{Config, EndpointConfig};
use crate::endpoint::EndpointId;
use crate::policy::Registry;
use crate::scrape::ScrapeService;
use crate::store::PoolCounts;
use crate::telemetry;

/// A routing table with its background tasks.
pub struct Generation {
    /// The routing table.
    pub routes: Arc<Routes>,
    /// Each pool's endpoints, as resolved for this generation (compared on DNS refresh).
    pub endpoints: Vec<Vec<EndpointConfig>>,
    stop: watch::Sender<bool>,
}

/// Why a generation could not be built.
#[derive(Debug, thiserror::Error)]
#[error("pool '{pool}': {message}")]
pub struct BuildError {
    pool: String,
    message: String,
}

impl Generation {
    /// Build generation `id` of `config` over `endpoints` (one list per pool), carrying over the
    /// in-flight counts of `previous`'s pools that keep their name and store. Health views get
    /// their first membership update here, so the generation can serve as soon as it is built.
    pub async fn build(
        id: u64,
        config: Config,
        endpoints: Vec<Vec<EndpointConfig>>,
        previous: Option<&Routes>,
        registry: &Registry,
    ) -> Result<Generation, BuildError> {
        let mut pools = Vec::with_capacity(config.pools.len());
        for (pc, eps) in config.pools.iter().zip(&endpoints) {
            let deps = super::deps::build(pc, eps, previous).map_err(|message| BuildError {
                pool: pc.name.clone(),
                message,
            })?;
            let before = previous.and_then(|r| r.pools.iter().find(|p| p.name() == pc.name));
            let pool = Pool::new(pc.clone(), eps, deps, registry, before.map(AsRef::as_ref))
                .map_err(|message| BuildError {
                    pool: pc.name.clone(),
                    message,
                })?;
            if let Some(health) = pool.health_view() {
                health.update().await.map_err(|e| BuildError {
                    pool: pc.name.clone(),
                    message: format!("health view: {e}"),
                })?;
                // Carried checks may already know some endpoints to be unhealthy.
                for (i, e) in pool.endpoints.iter().enumerate() {
                    let healthy = pool.is_healthy(EndpointId::new(i));
                    telemetry::set_endpoint_health(pool.name(), &e.label, healthy);
                }
            }
            pools.push(pool);
        }
        let (stop, _) = watch::channel(false);
        Ok(Generation {
            routes: Arc::new(Routes {
                id,
                since: std::time::SystemTime::now(),
                config,
                pools,
            }),
            endpoints,
            stop,
        })
    }

    /// Start the generation's background work: its pools' health checks (unless carried over and
    /// already running) and engine-metrics scraping. (The KV-event feeds of `kv_aware` pools
    /// start with their pool, see [`super::deps`], and outlive generations.)
    pub fn start(&self) {
        for pool in &self.routes.pools {
            if let Some(checks) = pool.health_checks() {
                checks.start();
            }
            if let Some(board) = pool.metrics_board() {
                let scrape = ScrapeService::new(board.clone(), &pool.config.metrics);
                let stop = self.stop.subscribe();
                tokio::spawn(async move { scrape.start(stop).await });
            }
        }
    }

    /// Stop its scraping (requests still routed by this generation carry on). Health checks end
    /// when the last generation holding them is dropped.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// The in-flight counts this generation's pools keep in a store.
    pub fn counts(&self) -> impl Iterator<Item = &Arc<PoolCounts>> {
        self.routes.pools.iter().filter_map(|p| p.counts())
    }
}
