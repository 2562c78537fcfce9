//! A pool: its endpoints, their health and in-flight counts, its policy and its fallback.

use std::sync::Arc;

use pingora::lb::Backend;

use crate::admission::WaitingRoom;
use crate::config::{EndpointConfig, PoolConfig};
use crate::endpoint::{EndpointId, EndpointView};
use crate::health::{Checks, HealthView, Outliers, Verdict};
use crate::policy::{self, Deps, Policy, Registry, RoundRobin};
use crate::scrape::MetricsBoard;
use crate::store::PoolCounts;
use crate::telemetry::{self, PoolSeries};

/// A pool of interchangeable endpoints.
pub struct Pool {
    /// The pool's validated settings.
    pub config: PoolConfig,
    /// Its endpoints, indexed by [`EndpointId`].
    pub endpoints: Vec<EndpointView>,
    /// The endpoints as Pingora backends (health checks), in the same order.
    backends: Vec<Backend>,
    /// Chooses among the candidates.
    pub policy: Arc<dyn Policy>,
    /// The state the policy reads: shared counts (kept alive by heartbeats) and the metrics
    /// board (kept current by scraping).
    pub deps: Deps,
    /// Routes requests the policy cannot judge (no body, not JSON, no prompt).
    pub fallback: RoundRobin,
    /// Active health: the checks (shared with the next generation) and this generation's view.
    health: Option<(Arc<Checks>, HealthView)>,
    /// Passive health: endpoints ejected for failing requests.
    outliers: Arc<Outliers>,
    /// The waiting room (`admission`), carried to the next generation while its settings are
    /// unchanged, so requests in flight keep counting.
    pub room: Option<Arc<WaitingRoom>>,
}

impl Pool {
    /// Build a pool over `endpoints` (its configuration's, resolved) with the state in `deps`
    /// (see [`super::deps`]). The health view, if any, is empty until [`Pool::health_view`]'s
    /// first update. What `previous` (this pool in the generation being replaced) knows of an
    /// endpoint it also has carries over: its passive-health state, and its active health while
    /// the `health_check` settings are unchanged.
    pub fn new(
        config: PoolConfig,
        endpoints: &[EndpointConfig],
        deps: Deps,
        registry: &Registry,
        previous: Option<&Pool>,
    ) -> Result<Arc<Pool>, String> {
        let policy = policy::build(
            &config.name,
            &config.policy,
            endpoints,
            deps.clone(),
            registry,
        )?;
        let views: Vec<EndpointView> = endpoints
            .iter()
            .map(|e| EndpointView::new(e.addr, e.weight))
            .collect();
        let backends: Vec<Backend> = endpoints
            .iter()
            .map(|e| Backend {
                addr: pingora::protocols::l4::socket::SocketAddr::Inet(e.addr),
                weight: e.weight,
                ext: Default::default(),
            })
            .collect();
        let weights: Vec<usize> = views.iter().map(|e| e.weight).collect();
        let health = match &config.health_check {
            Some(hc) => {
                let carried = previous
                    .and_then(|p| p.health.as_ref())
                    .map(|(checks, _)| checks.clone())
                    .filter(|checks| checks.config() == hc);
                let checks = match carried {
                    Some(checks) => checks,
                    None => Checks::new(&config.name, hc).map_err(|e| e.to_string())?,
                };
                let view = checks.view(backends.iter().cloned().collect());
                Some((checks, view))
            }
            None => None,
        };
        let labels: Vec<String> = views.iter().map(|e| e.label.clone()).collect();
        telemetry::touch_pool(
            &config.name,
            &labels,
            &PoolSeries {
                policy: policy.name(),
                reasons: policy.reasons(),
                fallbacks: policy.fallback_reasons(),
                shared_counts: deps.counts.is_some(),
            },
        );
        if let Some(c) = &deps.counts {
            c.set_endpoints(labels.clone());
        }
        let outliers = Outliers::new(
            &config.name,
            labels,
            config.outlier,
            previous.map(|p| p.outliers.as_ref()),
        );
        let room = config.admission.as_ref().map(|admission| {
            previous
                .and_then(|p| p.room.clone())
                .filter(|room| room.config() == admission)
                .unwrap_or_else(|| Arc::new(WaitingRoom::new(&config.name, admission.clone())))
        });
        Ok(Arc::new(Pool {
            room,
            outliers,
            policy,
            deps,
            fallback: RoundRobin::new(&weights),
            endpoints: views,
            backends,
            health,
            config,
        }))
    }

    /// The first pool of `config` over its IP endpoints (tests).
    #[cfg(test)]
    pub(crate) fn first_of(config: &crate::config::Config) -> Arc<Pool> {
        let endpoints = super::resolve::expand(config, &Default::default());
        let pc = config.pools[0].clone();
        let deps = super::deps::build(&pc, &endpoints[0], None).expect("deps");
        Pool::new(pc, &endpoints[0], deps, &Registry::new(), None).expect("pool")
    }

    /// The health-check view, which a background task must keep current (`None`: no checks).
    pub fn health_view(&self) -> Option<&HealthView> {
        self.health.as_ref().map(|(_, view)| view)
    }

    /// The active health checks, which must be started once (`None`: no checks).
    pub fn health_checks(&self) -> Option<&Arc<Checks>> {
        self.health.as_ref().map(|(checks, _)| checks)
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The endpoint `id` (`None` if the pool has no such endpoint).
    pub fn endpoint(&self, id: EndpointId) -> Option<&EndpointView> {
        self.endpoints.get(id.index())
    }

    /// Whether the health check currently passes (always true without health checks).
    pub fn is_healthy(&self, id: EndpointId) -> bool {
        match (&self.health, self.backends.get(id.index())) {
            (None, Some(_)) => true,
            (Some((_, view)), Some(b)) => view.backends().ready(b),
            (_, None) => false,
        }
    }

    /// Whether the endpoint is ejected for failing requests (see [`crate::health::passive`]).
    pub fn is_ejected(&self, id: EndpointId) -> bool {
        self.outliers.is_ejected(id.index())
    }

    /// How long the endpoint stays ejected (`None`: it is admitted).
    pub fn ejected_for(&self, id: EndpointId) -> Option<std::time::Duration> {
        self.outliers.ejected_for(id.index())
    }

    /// The metrics board the policy reads, which a scrape task must keep current.
    pub fn metrics_board(&self) -> Option<&Arc<MetricsBoard>> {
        self.deps.board.as_ref()
    }

    /// The shared counts the policy keeps, which a heartbeat must keep alive.
    pub fn counts(&self) -> Option<&Arc<PoolCounts>> {
        self.deps.counts.as_ref()
    }

    /// Log and update the gauge of endpoints whose ejection has ended.
    pub fn readmit_due(&self) {
        self.outliers.readmit_due();
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
            e.add_inflight(1);
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
    /// The endpoints a request may try next.
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
            e.add_inflight(-1);
            telemetry::add_inflight(self.pool.name(), &e.label, -1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::health::Failure;

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
