//! A pool: its endpoints, their health and in-flight counts, its policy and its fallback.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use pingora::lb::Backend;

use crate::config::{EndpointConfig, PoolConfig};
use crate::health::{self, HealthView};
use crate::outlier::{Outliers, Verdict};
use crate::policy::{self, Policy, RoundRobin};
use crate::store::PoolCounts;
use crate::telemetry;

/// Index of an endpoint within its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(u32);

impl EndpointId {
    pub fn new(index: usize) -> Self {
        EndpointId(u32::try_from(index).unwrap_or(u32::MAX))
    }

    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// One endpoint as policies see it.
#[derive(Debug)]
pub struct EndpointView {
    pub addr: SocketAddr,
    pub weight: usize,
    /// `addr` as text, the endpoint's metric label.
    pub label: String,
    /// Requests this replica has in flight to the endpoint.
    inflight: AtomicI64,
    backend: Backend,
}

impl EndpointView {
    pub fn new(addr: SocketAddr, weight: usize) -> Self {
        let backend = Backend {
            addr: pingora::protocols::l4::socket::SocketAddr::Inet(addr),
            weight,
            ext: Default::default(),
        };
        EndpointView {
            addr,
            weight,
            label: addr.to_string(),
            inflight: AtomicI64::new(0),
            backend,
        }
    }

    /// Requests this replica has in flight to the endpoint.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed).max(0) as u64
    }
}

/// A pool of interchangeable endpoints.
pub struct Pool {
    pub config: PoolConfig,
    pub endpoints: Vec<EndpointView>,
    pub policy: Arc<dyn Policy>,
    /// The policy's shared in-flight counts, when it keeps them in a store.
    pub counts: Option<Arc<PoolCounts>>,
    /// Routes requests the policy cannot judge (no body, not JSON, no prompt).
    pub fallback: RoundRobin,
    health: Option<HealthView>,
    /// Passive health: endpoints ejected for failing requests.
    outliers: Arc<Outliers>,
}

impl Pool {
    /// Build a pool over `endpoints` (its configuration's, resolved). Store policies use `counts`
    /// when given (carried over from the previous generation). The health view, if any, is
    /// empty until [`Pool::health_view`]'s first update and then kept by its background task.
    pub fn new(
        config: PoolConfig,
        endpoints: &[EndpointConfig],
        counts: Option<Arc<PoolCounts>>,
    ) -> Result<Arc<Pool>, pingora::BError> {
        let (policy, counts) = policy::build(&config, endpoints, counts);
        let endpoints: Vec<EndpointView> = endpoints
            .iter()
            .map(|e| EndpointView::new(e.addr, e.weight))
            .collect();
        let weights: Vec<usize> = endpoints.iter().map(|e| e.weight).collect();
        let health = match &config.health_check {
            Some(hc) => {
                let set: BTreeSet<Backend> = endpoints.iter().map(|e| e.backend.clone()).collect();
                Some(health::view(&config.name, set, hc)?)
            }
            None => None,
        };
        let labels: Vec<String> = endpoints.iter().map(|e| e.label.clone()).collect();
        telemetry::touch_pool(&config.name, &labels, policy.as_ref(), counts.is_some());
        if let Some(c) = &counts {
            c.set_endpoints(labels.clone());
        }
        let outliers = Outliers::new(&config.name, labels, config.outlier);
        Ok(Arc::new(Pool {
            outliers,
            policy,
            counts,
            fallback: RoundRobin::new(&weights),
            endpoints,
            health,
            config,
        }))
    }

    /// The first pool of `config` over its IP endpoints (tests).
    #[cfg(test)]
    pub(crate) fn first_of(config: &crate::config::Config) -> Arc<Pool> {
        let endpoints = crate::resolve::expand(config, &Default::default());
        Pool::new(config.pools[0].clone(), &endpoints[0], None).expect("pool")
    }

    /// The health-check view, which a background task must keep current (`None`: no checks).
    pub fn health_view(&self) -> Option<&HealthView> {
        self.health.as_ref()
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn endpoint(&self, id: EndpointId) -> Option<&EndpointView> {
        self.endpoints.get(id.index())
    }

    /// Whether the health check currently passes (always true without health checks).
    pub fn is_healthy(&self, id: EndpointId) -> bool {
        match (&self.health, self.endpoint(id)) {
            (None, Some(_)) => true,
            (Some(h), Some(e)) => h.backends().ready(&e.backend),
            (_, None) => false,
        }
    }

    /// Whether the endpoint is ejected for failing requests (see [`crate::outlier`]).
    pub fn is_ejected(&self, id: EndpointId) -> bool {
        self.outliers.is_ejected(id.index())
    }

    /// Record how an attempt on `id` ended (passive health).
    pub fn report(&self, id: EndpointId, verdict: Verdict) {
        self.outliers.report(id.index(), verdict);
    }

    /// Endpoints a request may try next: healthy, not ejected and not yet tried. When ejection
    /// leaves none, the healthy untried ones (ejection never empties a pool). When none is
    /// healthy, every untried endpoint (health checks may lag; trying beats refusing) — `panic`
    /// is then true.
    pub fn candidates(&self, tried: &[EndpointId]) -> Candidates {
        let untried = (0..self.endpoints.len())
            .map(EndpointId::new)
            .filter(|id| !tried.contains(id));
        let healthy: Vec<EndpointId> = untried.clone().filter(|id| self.is_healthy(*id)).collect();
        let admitted: Vec<EndpointId> = healthy
            .iter()
            .copied()
            .filter(|id| !self.is_ejected(*id))
            .collect();
        if !admitted.is_empty() {
            return Candidates {
                ids: admitted,
                panic: false,
            };
        }
        if healthy.is_empty() {
            Candidates {
                ids: untried.collect(),
                panic: true,
            }
        } else {
            Candidates {
                ids: healthy,
                panic: false,
            }
        }
    }

    /// Count one request in flight to `id` until the guard drops.
    pub fn inflight_guard(self: &Arc<Self>, id: EndpointId) -> InflightGuard {
        if let Some(e) = self.endpoint(id) {
            e.inflight.fetch_add(1, Ordering::Relaxed);
            telemetry::add_inflight(self.name(), &e.label, 1);
        }
        InflightGuard {
            pool: self.clone(),
            id,
        }
    }
}

/// Result of [`Pool::candidates`].
pub struct Candidates {
    pub ids: Vec<EndpointId>,
    /// No endpoint is healthy; these are unhealthy ones tried as a last resort.
    pub panic: bool,
}

/// Holds one in-flight count; releases it on drop (exactly once).
pub struct InflightGuard {
    pool: Arc<Pool>,
    id: EndpointId,
}

impl InflightGuard {
    /// Report the attempt's verdict to the endpoint's pool (passive health).
    pub fn report(&self, verdict: Verdict) {
        self.pool.report(self.id, verdict);
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if let Some(e) = self.pool.endpoint(self.id) {
            e.inflight.fetch_sub(1, Ordering::Relaxed);
            telemetry::add_inflight(self.pool.name(), &e.label, -1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::outlier::Failure;

    #[test]
    fn ejected_endpoints_are_candidates_only_as_a_last_resort() {
        let c = Config::from_yaml(
            "pools:\n  - name: p\n    models: ['*']\n    endpoints: ['127.0.0.1:1', '127.0.0.1:2', '127.0.0.1:3']\n    health_check: {enabled: false}\n    outlier_detection: {consecutive_failures: 2}\n    lb_policy: round_robin\n",
        )
        .expect("config");
        let pool = Pool::first_of(&c);
        let id = EndpointId::new;
        for _ in 0..2 {
            pool.report(id(2), Verdict::Failure(Failure::Status(503)));
        }
        assert!(pool.is_ejected(id(2)));
        assert_eq!(pool.candidates(&[]).ids, vec![id(0), id(1)]);
        assert_eq!(pool.candidates(&[id(0)]).ids, vec![id(1)]);
        let last = pool.candidates(&[id(0), id(1)]);
        assert_eq!(last.ids, vec![id(2)], "ejection never empties a pool");
        assert!(!last.panic);
    }
}
