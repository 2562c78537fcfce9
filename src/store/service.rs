//! The background service that keeps this replica alive in the state store.
//!
//! For each pool that uses a store it runs a loop calling [`PoolCounts::tick`] every heartbeat
//! interval: the heartbeat that stops survivors from reaping this replica, the repair of counts
//! left wrong by failed calls, and the probe that closes an open breaker. Pools tick
//! independently, so one pool's hung Redis never delays another pool's heartbeat. On shutdown a
//! loop keeps beating while requests of its pool are still counted (the grace period drains them),
//! then withdraws this replica's contribution and stops.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::PoolCounts;

/// Heart-beats every pool's counts; see the module docs.
pub struct CountsService {
    pools: Vec<Arc<PoolCounts>>,
}

impl CountsService {
    pub fn new(pools: Vec<Arc<PoolCounts>>) -> Self {
        CountsService { pools }
    }
}

async fn run(pool: Arc<PoolCounts>, mut shutdown: ShutdownWatch) {
    let mut every = tokio::time::interval(pool.store().heartbeat_interval());
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => pool.tick().await,
            _ = shutdown.changed() => break,
        }
    }
    // Draining: stay alive in the store while requests are still counted.
    while pool.held_total() > 0 {
        every.tick().await;
        pool.tick().await;
    }
    match pool.withdraw().await {
        Ok(()) => log::info!("pool {}: withdrawn from the state store", pool.pool()),
        Err(e) => log::warn!(
            "pool {}: could not withdraw from the state store: {e}",
            pool.pool()
        ),
    }
}

#[async_trait]
impl BackgroundService for CountsService {
    async fn start(&self, shutdown: ShutdownWatch) {
        let loops: Vec<_> = self
            .pools
            .iter()
            .map(|p| tokio::spawn(run(p.clone(), shutdown.clone())))
            .collect();
        for l in loops {
            if let Err(e) = l.await {
                log::error!("state store heartbeat loop failed: {e}");
            }
        }
    }
}
