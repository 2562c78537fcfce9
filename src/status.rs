//! What an operator sees at a glance: a snapshot of the routing table in force — pools, their
//! endpoints' health, ejection, load and engine metrics, pick reasons and cache hits, the state
//! store — with the configuration generation and the last reload's verdict. The admin listener
//! serves it as JSON (`GET /status`) and renders it as a page (`GET /`).
//!
//! Counts (requests, picks, tokens, global in-flight, breaker, KV events) are read back from
//! llm-lb's Prometheus metrics, so the page and `/metrics` always agree. Nothing secret is shown:
//! no store URL or password, no prompt, no client address.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::endpoint::{EndpointId, EndpointView};
use crate::routing::{Pool, ReloadRecord, Routes};
use crate::telemetry::Readings;

/// The whole status document.
#[derive(Debug, Serialize)]
pub struct Status {
    /// llm-lb's version.
    pub version: &'static str,
    /// When the snapshot was taken (Unix seconds).
    pub now: f64,
    /// Seconds since the admin listener started.
    pub uptime_seconds: f64,
    /// The routing table in force (`None` before the first one is built).
    pub generation: Option<GenerationStatus>,
    /// How the last reload ended (`None` before the first reload).
    pub last_reload: Option<ReloadStatus>,
    /// The pools, in the policy file's order.
    pub pools: Vec<PoolStatus>,
}

/// The routing table in force.
#[derive(Debug, Serialize)]
pub struct GenerationStatus {
    /// 1 at start, +1 per applied reload or DNS change.
    pub id: u64,
    /// When it was put in force (Unix seconds).
    pub since: f64,
}

/// The last reload's verdict.
#[derive(Debug, Serialize)]
pub struct ReloadStatus {
    /// When it ended (Unix seconds).
    pub at: f64,
    /// `sighup` or `admin`.
    pub trigger: &'static str,
    /// `ok`, `invalid` or `failed`.
    pub result: &'static str,
    /// The generation it put in force.
    pub generation: Option<u64>,
    /// Why it was not applied.
    pub error: Option<String>,
}

/// One pool.
#[derive(Debug, Serialize)]
pub struct PoolStatus {
    /// Its name.
    pub name: String,
    /// The models it serves.
    pub models: Vec<String>,
    /// Its `lb_policy`.
    pub policy: String,
    /// Where its shared counts live (`None`: the policy keeps none).
    pub store: Option<StoreStatus>,
    /// Requests answered, by status class (`2xx`, `4xx`, `5xx`, …).
    pub requests: BTreeMap<String, u64>,
    /// Picks by the policy, by reason.
    pub picks: BTreeMap<String, u64>,
    /// Requests routed by a fallback instead of the policy, by reason.
    pub fallbacks: BTreeMap<String, u64>,
    /// Tokens from the engines' usage reports.
    pub tokens: TokenStatus,
    /// Entries in the pool's KV index (`kv_aware` only).
    pub kv_index_blocks: Option<u64>,
    /// Its endpoints, in the pool's order.
    pub endpoints: Vec<EndpointStatus>,
}

/// Where a pool's shared counts live.
#[derive(Debug, Serialize)]
pub struct StoreStatus {
    /// `embedded`, `redis` or `redis-cluster`.
    pub kind: &'static str,
    /// This replica's id in the store.
    pub replica: String,
    /// Whether the store's circuit breaker is open (picks fall back to local counts).
    pub breaker_open: bool,
    /// Requests this replica holds counted in the store.
    pub held: u64,
}

/// Prompt and completion tokens, as the engines reported them.
#[derive(Debug, Serialize)]
pub struct TokenStatus {
    /// Prompt tokens.
    pub prompt: u64,
    /// Of which the engines served from their prefix cache.
    pub cached: u64,
    /// Completion tokens.
    pub completion: u64,
    /// `cached / prompt` (`None` before any prompt token).
    pub cache_hit_rate: Option<f64>,
}

/// One endpoint.
#[derive(Debug, Serialize)]
pub struct EndpointStatus {
    /// `IP:port`.
    pub address: String,
    /// Its weight.
    pub weight: usize,
    /// `healthy`, `ejected` (failing requests) or `unhealthy` (failing its health check).
    pub state: &'static str,
    /// Whether its active health check passes (always true without checks).
    pub healthy: bool,
    /// Whether it is ejected for failing requests.
    pub ejected: bool,
    /// How long it stays ejected.
    pub ejected_for_seconds: Option<f64>,
    /// Requests this replica has in flight to it.
    pub inflight: u64,
    /// Requests every replica has in flight to it, as the state store last said.
    pub inflight_global: Option<u64>,
    /// Requests answered by it, by status class.
    pub requests: BTreeMap<String, u64>,
    /// Its engine's metrics, when the pool scrapes them.
    pub engine: Option<EngineStatus>,
    /// Its KV-event stream, when it has one.
    pub kv_events: Option<KvEventsStatus>,
}

/// An endpoint's last scraped engine metrics.
#[derive(Debug, Serialize)]
pub struct EngineStatus {
    /// Requests waiting in the engine.
    pub waiting: u64,
    /// Requests in its running batch.
    pub running: u64,
    /// KV-cache use, 0–1 (`None` if the engine does not export it).
    pub kv_cache_usage: Option<f64>,
    /// Age of the scrape, seconds.
    pub age_seconds: f64,
    /// Whether the scrape is too old for routing to use.
    pub stale: bool,
}

/// An endpoint's KV-event stream.
#[derive(Debug, Serialize)]
pub struct KvEventsStatus {
    /// Whether llm-lb is connected to it.
    pub connected: bool,
    /// Events received, by kind.
    pub events: BTreeMap<String, u64>,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn counts(map: BTreeMap<String, f64>) -> BTreeMap<String, u64> {
    map.into_iter().map(|(k, v)| (k, v as u64)).collect()
}

impl Status {
    /// The status of `routes` (the table in force, if any) with the last reload's record;
    /// `started` is when the admin listener started.
    pub fn of(routes: Option<&Routes>, last: Option<ReloadRecord>, started: Instant) -> Self {
        let readings = Readings::take();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            now: unix(SystemTime::now()),
            uptime_seconds: started.elapsed().as_secs_f64(),
            generation: routes.map(|r| GenerationStatus {
                id: r.id,
                since: unix(r.since),
            }),
            last_reload: last.map(|r| ReloadStatus {
                at: unix(r.at),
                trigger: r.trigger.as_str(),
                result: r.result.as_str(),
                generation: r.generation,
                error: r.error,
            }),
            pools: routes
                .map(|r| r.pools.iter().map(|p| pool(p, &readings)).collect())
                .unwrap_or_default(),
        }
    }
}

fn pool(p: &Pool, readings: &Readings) -> PoolStatus {
    let name = p.name();
    let of_pool = [("pool", name)];
    let tokens = readings.sum_by("llmlb_tokens_total", &of_pool, "kind");
    let token = |kind: &str| tokens.get(kind).copied().unwrap_or(0.0) as u64;
    let (prompt, cached) = (token("prompt"), token("cached"));
    let store = p.counts().map(|c| StoreStatus {
        kind: c.store().kind(),
        replica: c.store().replica_id().to_string(),
        breaker_open: readings
            .sum("llmlb_store_breaker_open", &of_pool)
            .is_some_and(|v| v > 0.0),
        held: c.held_total(),
    });
    let now = Instant::now();
    PoolStatus {
        name: name.to_string(),
        models: p.config.models.clone(),
        policy: p.policy.name().to_string(),
        store,
        requests: counts(readings.sum_by("llmlb_requests_total", &of_pool, "class")),
        picks: counts(readings.sum_by(
            "llmlb_picks_total",
            &[("pool", name), ("policy", p.policy.name())],
            "reason",
        )),
        fallbacks: counts(readings.sum_by("llmlb_fallback_total", &of_pool, "reason")),
        tokens: TokenStatus {
            prompt,
            cached,
            completion: token("completion"),
            cache_hit_rate: (prompt > 0).then(|| cached as f64 / prompt as f64),
        },
        kv_index_blocks: p.deps.kv_index.as_ref().map(|index| index.blocks() as u64),
        endpoints: p
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, view)| endpoint(p, EndpointId::new(i), view, readings, now))
            .collect(),
    }
}

fn endpoint(
    p: &Pool,
    id: EndpointId,
    view: &EndpointView,
    readings: &Readings,
    now: Instant,
) -> EndpointStatus {
    let of_endpoint = [("pool", p.name()), ("endpoint", view.label.as_str())];
    let healthy = p.is_healthy(id);
    let ejected_for = p.ejected_for(id);
    let engine = p.metrics_board().and_then(|board| {
        let s = board.latest(id.index())?;
        let age = now.saturating_duration_since(s.taken);
        Some(EngineStatus {
            waiting: s.metrics.waiting,
            running: s.metrics.running,
            kv_cache_usage: s.metrics.kv_cache_usage,
            age_seconds: age.as_secs_f64(),
            stale: age > board.stale_after(),
        })
    });
    let kv_events = readings
        .sum("llmlb_kv_events_connected", &of_endpoint)
        .map(|connected| KvEventsStatus {
            connected: connected > 0.0,
            events: counts(readings.sum_by("llmlb_kv_events_total", &of_endpoint, "kind")),
        });
    EndpointStatus {
        address: view.label.clone(),
        weight: view.weight,
        state: match (ejected_for.is_some(), healthy) {
            (_, false) => "unhealthy",
            (true, true) => "ejected",
            (false, true) => "healthy",
        },
        healthy,
        ejected: ejected_for.is_some(),
        ejected_for_seconds: ejected_for.map(|d| d.as_secs_f64()),
        inflight: view.inflight(),
        inflight_global: p.counts().and_then(|_| {
            readings
                .sum("llmlb_endpoint_inflight_global", &of_endpoint)
                .map(|v| v as u64)
        }),
        requests: counts(readings.sum_by("llmlb_requests_total", &of_endpoint, "class")),
        engine,
        kv_events,
    }
}
