//! The background service that keeps this replica alive in the state store.
//!
//! Every heartbeat interval it calls [`PoolCounts::tick`] for each pool that uses a store: the
//! heartbeat that stops survivors from reaping this replica, the repair of counts left dirty by
//! failed calls, and the probe that closes an open breaker. On shutdown it keeps beating while
//! requests of this replica are still counted (the grace period drains them), then withdraws this
//! replica's contribution and stops.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::PoolCounts;

/// Heart-beats every pool's counts; see the module docs.
pub struct CountsService {
    pools: Vec<Arc<PoolCounts>>,
    interval: Duration,
}

impl CountsService {
    /// A service for `pools`, ticking at the shortest heartbeat interval among their stores.
    pub fn new(pools: Vec<Arc<PoolCounts>>) -> Self {
        let interval = pools
            .iter()
            .map(|p| p.store().heartbeat_interval())
            .min()
            .unwrap_or(Duration::from_secs(1));
        CountsService { pools, interval }
    }

    async fn tick_all(&self) {
        for p in &self.pools {
            p.tick().await;
        }
    }
}

#[async_trait]
impl BackgroundService for CountsService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut every = tokio::time::interval(self.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => self.tick_all().await,
                _ = shutdown.changed() => break,
            }
        }
        // Draining: stay alive in the store while requests are still counted.
        while self.pools.iter().any(|p| p.held_total() > 0) {
            every.tick().await;
            self.tick_all().await;
        }
        for p in &self.pools {
            match p.withdraw().await {
                Ok(()) => log::info!("pool {}: withdrawn from the state store", p.pool()),
                Err(e) => log::warn!(
                    "pool {}: could not withdraw from the state store: {e}",
                    p.pool()
                ),
            }
        }
    }
}
