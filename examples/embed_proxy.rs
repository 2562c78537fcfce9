//! llm-lb's proxy inside a Pingora server of your own, next to your other services: here a
//! background service that reports the routing table in force every ten seconds.
//!
//! ```text
//! cargo run --example embed_proxy -- conf/policy.yaml
//! ```

use std::time::Duration;

use async_trait::async_trait;
use llm_lb::app::Services;
use llm_lb::policy::Registry;
use llm_lb::routing::Live;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};

/// Your own service: logs which generation of the routing table is in force.
struct Reporter(Live);

#[async_trait]
impl BackgroundService for Reporter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut every = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = every.tick() => {
                    if let Some(routes) = self.0.current() {
                        let pools: Vec<&str> = routes.pools.iter().map(|p| p.name()).collect();
                        log::info!("routing table {} in force: pools {pools:?}", routes.id);
                    }
                }
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    llm_lb::telemetry::init_logging();
    let policy = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "conf/policy.yaml".into());
    let llm_lb = Services::load(policy.as_ref(), Registry::new())?;
    let mut server = Server::new(None).map_err(|e| anyhow::anyhow!("{e}"))?;
    server.bootstrap();
    let live = llm_lb.add_to(&mut server);
    server.add_service(background_service("reporter", Reporter(live)));
    server.run_forever()
}
