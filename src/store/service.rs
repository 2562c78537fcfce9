//! The heartbeat that keeps this replica alive in the state store.
//!
//! The supervisor runs one [`heartbeat`] loop per [`PoolCounts`], calling [`PoolCounts::tick`]
//! every heartbeat interval: the heartbeat that stops survivors from reaping this replica, the
//! repair of counts left wrong by failed calls, and the probe that closes an open breaker. Pools
//! tick independently, so one pool's hung Redis never delays another pool's heartbeat. When told
//! to stop (shutdown, or a reload that gave the pool other counts) a loop keeps beating while
//! requests are still counted (they drain), then withdraws this replica's contribution and ends.

use std::sync::Arc;

use tokio::sync::watch;

use super::PoolCounts;

/// Heart-beat `pool` until `stop` turns true and nothing is held any more; see the module docs.
pub async fn heartbeat(pool: Arc<PoolCounts>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(pool.store().heartbeat_interval());
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*stop.borrow() {
        tokio::select! {
            _ = every.tick() => pool.tick().await,
            changed = stop.changed() => if changed.is_err() { break },
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
