//! Active health checks: an HTTP GET of `health_check.path` on every endpoint of a pool each
//! interval, with consecutive-result thresholds.
//!
//! A pool's [`Checks`] own the health state of its endpoints (a Pingora `HealthRegistry`) and the
//! task that probes them. Each generation's pool reads them through a [`HealthView`] (a Pingora
//! `LoadBalancer` used only for membership and readiness; selection is the `policy` module's).
//! The next generation's pool reuses the same `Checks` while the pool keeps its name and its
//! `health_check` settings, so a reload or a DNS change keeps what the checks found: an unhealthy
//! endpoint stays out, and a new endpoint starts healthy. The probing task ends when the last
//! pool holding the `Checks` is dropped.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::lb::health_check::{HealthObserve, HttpHealthCheck};
use pingora::lb::selection::RoundRobin as PingoraRoundRobin;
use pingora::lb::{discovery, Backend, Backends, HealthCheckService, HealthRegistry, LoadBalancer};
use pingora::services::background::BackgroundService;
use tokio::sync::watch;

use crate::config::HealthCheckConfig;
use crate::telemetry;

/// One generation's view of a pool's health: "is this endpoint ready".
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

/// A pool's health checks and the health they found, shared by successive generations.
pub struct Checks {
    config: HealthCheckConfig,
    registry: Arc<HealthRegistry>,
    started: AtomicBool,
    /// Ends the probing task when the checks are dropped.
    stop: watch::Sender<bool>,
}

impl Checks {
    /// Checks of `pool`'s endpoints as `config` says (not probing until [`Checks::start`]).
    pub fn new(pool: &str, config: &HealthCheckConfig) -> Result<Arc<Checks>, pingora::BError> {
        let mut hc = HttpHealthCheck::new("localhost", false);
        let mut req = RequestHeader::build("GET", config.path.as_bytes(), None)?;
        req.insert_header("Host", "localhost")?;
        req.insert_header("User-Agent", "llm-lb-health")?;
        hc.req = req;
        hc.peer_template.options.connection_timeout = Some(config.timeout);
        hc.peer_template.options.read_timeout = Some(config.timeout);
        hc.peer_template.options.write_timeout = Some(config.timeout);
        hc.consecutive_success = config.healthy_threshold;
        hc.consecutive_failure = config.unhealthy_threshold;
        hc.health_changed_callback = Some(Box::new(Observer {
            pool: pool.to_string(),
        }));
        let registry = Arc::new(HealthRegistry::new());
        registry.set_health_check(Box::new(hc));
        let (stop, _) = watch::channel(false);
        Ok(Arc::new(Checks {
            config: config.clone(),
            registry,
            started: AtomicBool::new(false),
            stop,
        }))
    }

    /// The settings they were built with (a pool keeps its checks while these are unchanged).
    pub fn config(&self) -> &HealthCheckConfig {
        &self.config
    }

    /// A view of `backends`' health; ready once its `update` has run.
    pub fn view(&self, backends: BTreeSet<Backend>) -> HealthView {
        let backends = Backends::new_with_health_registry(
            discovery::Static::new(backends),
            self.registry.clone(),
        );
        Arc::new(LoadBalancer::from_backends(backends))
    }

    /// Start probing (once; later calls do nothing). The task ends when the checks are dropped.
    pub fn start(&self) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut service = HealthCheckService::new(self.registry.clone());
        service.health_check_frequency = Some(self.config.interval);
        service.parallel_health_check = true;
        let stop = self.stop.subscribe();
        tokio::spawn(async move { service.start(stop).await });
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
