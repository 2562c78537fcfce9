//! Active health checks: one Pingora `LoadBalancer` per pool, used only for membership and
//! liveness (an HTTP GET of `health_check.path` on every endpoint each interval, with
//! consecutive-result thresholds); it runs as a task of its generation (`routing::generation`).
//! Selection is ours (the `policy` module).

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::lb::health_check::{HealthObserve, HttpHealthCheck};
use pingora::lb::selection::RoundRobin as PingoraRoundRobin;
use pingora::lb::{discovery, Backend, Backends, LoadBalancer};

use crate::config::HealthCheckConfig;
use crate::telemetry;

/// The health view of a pool (shared with the background service that updates it).
pub type HealthView = Arc<LoadBalancer<PingoraRoundRobin>>;

/// Logs and counts health transitions.
struct Observer {
    pool: String,
}

#[async_trait]
impl HealthObserve for Observer {
    async fn observe(&self, target: &Backend, healthy: bool) {
        let endpoint = target.addr.to_string();
        if healthy {
            log::info!("pool {}: endpoint {endpoint} is healthy again", self.pool);
        } else {
            log::warn!("pool {}: endpoint {endpoint} is unhealthy", self.pool);
        }
        telemetry::set_endpoint_health(&self.pool, &endpoint, healthy);
    }
}

/// Build the health view of a pool: it answers "is this endpoint ready" once updated, and runs
/// its checks as a background task (`BackgroundService::start`).
pub fn view(
    pool: &str,
    backends: BTreeSet<Backend>,
    cfg: &HealthCheckConfig,
) -> Result<HealthView, pingora::BError> {
    let mut lb = LoadBalancer::<PingoraRoundRobin>::from_backends(Backends::new(
        discovery::Static::new(backends),
    ));
    let mut hc = HttpHealthCheck::new("localhost", false);
    let mut req = RequestHeader::build("GET", cfg.path.as_bytes(), None)?;
    req.insert_header("Host", "localhost")?;
    req.insert_header("User-Agent", "llm-lb-health")?;
    hc.req = req;
    hc.peer_template.options.connection_timeout = Some(cfg.timeout);
    hc.peer_template.options.read_timeout = Some(cfg.timeout);
    hc.peer_template.options.write_timeout = Some(cfg.timeout);
    hc.consecutive_success = cfg.healthy_threshold;
    hc.consecutive_failure = cfg.unhealthy_threshold;
    hc.health_changed_callback = Some(Box::new(Observer {
        pool: pool.to_string(),
    }));
    lb.set_health_check(Box::new(hc));
    lb.health_check_frequency = Some(cfg.interval);
    lb.parallel_health_check = true;
    Ok(Arc::new(lb))
}
