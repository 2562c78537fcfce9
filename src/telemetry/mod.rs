//! Logging set-up, the access log, and the Prometheus metrics llm-lb exports.
//!
//! Metric labels are bounded: pool, endpoint, policy, reason, status class — never prompts, models
//! from clients that match no pool, or request ids. Closed label sets are typed ([`labels`]).
//!
//! The bottom of the crate's layers with `config` and `endpoint`: it imports nothing of the
//! crate, and every other module may report through it.

pub mod labels;
pub mod readings;
pub mod trace;

use std::sync::LazyLock;

pub use labels::{FallbackReason, ReloadResult, ReloadTrigger};
pub use readings::Readings;

use pingora_prometheus::prometheus::{
    register_gauge_vec, register_histogram_vec, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec, GaugeVec, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
};

/// Initialise `log` output: `RUST_LOG` if set, else info (Pingora's own chatter at warn).
pub fn init_logging() {
    let env = env_logger::Env::default().default_filter_or(
        "info,pingora=warn,pingora_core=warn,pingora_proxy=warn,pingora_load_balancing=warn",
    );
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}

static REQUESTS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llmlb_requests_total",
        "Requests answered, by pool, endpoint and status class",
        &["pool", "endpoint", "class"]
    )
    .ok()
});

static PICKS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llmlb_picks_total",
        "Endpoint picks, by pool, policy and reason",
        &["pool", "policy", "reason"]
    )
    .ok()
});

static QUEUE_LENGTH: LazyLock<Option<IntGaugeVec>> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llmlb_queue_length",
        "Requests waiting in the pool's waiting room, by priority band",
        &["pool", "band"]
    )
    .ok()
});

static ADMISSIONS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llmlb_admissions_total",
        "Waiting-room decisions, by band, tenant and result (admitted: at once; waited: after \
         waiting; queue_full, deadline: refused)",
        &["pool", "band", "tenant", "result"]
    )
    .ok()
});

static QUEUE_WAIT: LazyLock<Option<HistogramVec>> = LazyLock::new(|| {
    register_histogram_vec!(
        "llmlb_queue_wait_seconds",
        "Time requests waited in the waiting room (admitted after waiting, or refused at their \
         deadline), by band and tenant",
        &["pool", "band", "tenant"],
        vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 90.0,
            120.0
        ]
    )
    .ok()
});

static FALLBACKS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llmlb_fallback_total",
        "Requests routed by a fallback instead of the pool's policy, by reason",
        &["pool", "reason"]
    )
    .ok()
});

static RETRIES: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llmlb_retries_total",
        "Upstream attempts retried on another endpoint",
        &["pool"]
    )
    .ok()
});

static RECONNECTS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llmlb_upstream_reconnects_total",
        "Attempts sent again to the same endpoint over a fresh connection because the pooled \
         keep-alive connection they reused had been closed by the server",
        &["pool"]
    )
    .ok()
});

static HEALTH: LazyLock<Option<IntGaugeVec>> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llmlb_endpoint_healthy",
        "1 if the endpoint passes its health check",
        &["pool", "endpoint"]
    )
    .ok()
});

static EJECTIONS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llmlb_outlier_ejections_total",
        "Endpoints ejected by passive health checking, by the last failure's kind (connect, timeout, reset, 5xx)",
        &["pool", "endpoint", "reason"]
    )
    .ok()
});

static EJECTED: LazyLock<Option<IntGaugeVec>> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llmlb_endpoint_ejected",
        "1 while the endpoint is ejected for failing requests",
        &["pool", "endpoint"]
    )
    .ok()
});

static INFLIGHT: LazyLock<Option<IntGaugeVec>> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llmlb_endpoint_inflight",
        "Requests this replica has in flight to the endpoint",
        &["pool", "endpoint"]
    )
    .ok()
});

static INFLIGHT_GLOBAL: LazyLock<Option<IntGaugeVec>> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llmlb_endpoint_inflight_global",
        "Requests every replica sharing the pool's state store has in flight to the endpoint (read at each heartbeat)",
        &["pool", "endpoint"]
    )
    .ok()
});

static ENDPOINTS: LazyLock<Option<IntGaugeVec>> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llmlb_pool_endpoints",
        "Endpoints in the pool now (host names expanded to their current addresses)",
        &["pool"]
    )
    .ok()
});

static RELOADS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llmlb_config_reloads_total",
        "Policy-file reloads, by trigger (sighup, admin) and result (ok, invalid = the file was rejected and the running configuration kept)",
        &["trigger", "result"]
    )
    .ok()
});

static GENERATION: LazyLock<Option<IntGauge>> = LazyLock::new(|| {
    register_int_gauge!(
        "llmlb_config_generation",
        "Routing-table generation in force (1 at start; +1 per applied reload or DNS change)"
    )
    .ok()
});

static DNS_LOOKUPS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llmlb_dns_lookups_total",
        "Lookups of endpoint host names, by name (host:port as configured) and result (ok, error)",
        &["name", "result"]
    )
    .ok()
});

static STORE_CALLS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llmlb_store_calls_total",
        "State-store calls, by pool, operation (acquire, acquire_prefix, release, restore = heartbeat) and result (ok, saturated, timeout, error)",
        &["pool", "op", "result"]
    )
    .ok()
});

static STORE_SECONDS: LazyLock<Option<HistogramVec>> = LazyLock::new(|| {
    register_histogram_vec!(
        "llmlb_store_call_seconds",
        "State-store call latency, by operation",
        &["op"],
        vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
    )
    .ok()
});

static STORE_BREAKER: LazyLock<Option<IntGaugeVec>> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llmlb_store_breaker_open",
        "1 while requests skip the pool's state store after repeated failures",
        &["pool"]
    )
    .ok()
});

static PREFIX_MATCH: LazyLock<Option<HistogramVec>> = LazyLock::new(|| {
    register_histogram_vec!(
        "llmlb_prefix_match_blocks",
        "prefix_cache: leading prompt blocks found cached on a candidate endpoint (0 = miss)",
        &["pool"],
        vec![0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0, 128.0]
    )
    .ok()
});

/// Token buckets of the `kv_aware` histograms.
const TOKEN_BUCKETS: &[f64] = &[
    0.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0,
];

static KV_MATCHED: LazyLock<Option<HistogramVec>> = LazyLock::new(|| {
    register_histogram_vec!(
        "llmlb_kv_matched_tokens",
        "kv_aware: prompt tokens found cached on the chosen endpoint",
        &["pool"],
        TOKEN_BUCKETS.to_vec()
    )
    .ok()
});

static KV_COST: LazyLock<Option<HistogramVec>> = LazyLock::new(|| {
    register_histogram_vec!(
        "llmlb_kv_cost_tokens",
        "kv_aware: the chosen endpoint's cost (weighted uncached prompt tokens plus tokens in flight)",
        &["pool"],
        TOKEN_BUCKETS.to_vec()
    )
    .ok()
});

static SCRAPE_AGE: LazyLock<Option<GaugeVec>> = LazyLock::new(|| {
    register_gauge_vec!(
        "llmlb_scrape_age_seconds",
        "Age of the endpoint's latest engine-metrics snapshot (+Inf: none yet), updated every scrape attempt",
        &["pool", "endpoint"]
    )
    .ok()
});

/// Buckets for request and first-byte times: LLM requests take from milliseconds to minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

static DURATION: LazyLock<Option<HistogramVec>> = LazyLock::new(|| {
    register_histogram_vec!(
        "llmlb_request_duration_seconds",
        "Time from request start to the end of the response, by pool",
        &["pool"],
        LATENCY_BUCKETS.to_vec()
    )
    .ok()
});

static TTFB: LazyLock<Option<HistogramVec>> = LazyLock::new(|| {
    register_histogram_vec!(
        "llmlb_time_to_first_byte_seconds",
        "Time from request start to the first response body byte (for a stream: the first event, about the first token), by pool",
        &["pool"],
        LATENCY_BUCKETS.to_vec()
    )
    .ok()
});

static TOKENS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llmlb_tokens_total",
        "Tokens reported in responses' usage, by pool and kind (prompt, completion, cached = prompt tokens served from the prefix cache)",
        &["pool", "kind"]
    )
    .ok()
});

static SCRAPE_FAILURES: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llmlb_scrape_failures_total",
        "Engine-metrics scrapes that failed, by reason (timeout, connect, http, status, too_large, parse, missing_metrics)",
        &["pool", "endpoint", "reason"]
    )
    .ok()
});

static METRICS_KNOWN: LazyLock<Option<IntGaugeVec>> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llmlb_endpoint_metrics_known",
        "1 while the endpoint's engine metrics are fresh enough to route on",
        &["pool", "endpoint"]
    )
    .ok()
});

static ENGINE_WAITING: LazyLock<Option<IntGaugeVec>> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llmlb_engine_waiting",
        "Waiting queue the endpoint's engine reported at its latest successful scrape",
        &["pool", "endpoint"]
    )
    .ok()
});

static ENGINE_KV: LazyLock<Option<GaugeVec>> = LazyLock::new(|| {
    register_gauge_vec!(
        "llmlb_engine_kv_cache_usage",
        "KV-cache use (0-1) the endpoint's engine reported at its latest successful scrape",
        &["pool", "endpoint"]
    )
    .ok()
});

/// Create every family so it is exported before the first request.
pub fn touch() {
    LazyLock::force(&REQUESTS);
    LazyLock::force(&PICKS);
    LazyLock::force(&QUEUE_LENGTH);
    LazyLock::force(&ADMISSIONS);
    LazyLock::force(&QUEUE_WAIT);
    LazyLock::force(&FALLBACKS);
    LazyLock::force(&RETRIES);
    LazyLock::force(&RECONNECTS);
    LazyLock::force(&HEALTH);
    LazyLock::force(&INFLIGHT);
    LazyLock::force(&EJECTIONS);
    LazyLock::force(&EJECTED);
    LazyLock::force(&STORE_CALLS);
    LazyLock::force(&STORE_SECONDS);
    LazyLock::force(&STORE_BREAKER);
    LazyLock::force(&PREFIX_MATCH);
    LazyLock::force(&KV_MATCHED);
    LazyLock::force(&KV_COST);
    LazyLock::force(&DURATION);
    LazyLock::force(&TTFB);
    LazyLock::force(&TOKENS);
    LazyLock::force(&SCRAPE_AGE);
    LazyLock::force(&SCRAPE_FAILURES);
    LazyLock::force(&METRICS_KNOWN);
    LazyLock::force(&ENGINE_WAITING);
    LazyLock::force(&ENGINE_KV);
    LazyLock::force(&INFLIGHT_GLOBAL);
    LazyLock::force(&ENDPOINTS);
    LazyLock::force(&DNS_LOOKUPS);
    touch_kv_events();
    for trigger in ReloadTrigger::ALL {
        for result in ReloadResult::ALL {
            count_reload_by(*trigger, *result, 0);
        }
    }
    if let Some(m) = GENERATION.as_ref() {
        m.set(0);
    }
}

/// What [`touch_pool`] seeds for a pool.
pub struct PoolSeries<'a> {
    /// The pool's `lb_policy`.
    pub policy: &'a str,
    /// Every pick reason the policy reports.
    pub reasons: &'a [&'a str],
    /// The fallback reasons the policy itself reports, beyond the request-shape ones.
    pub fallbacks: &'a [FallbackReason],
    /// Whether the policy keeps counts in a store.
    pub shared_counts: bool,
}

/// Give a pool's series their zero values, so they are exported before its first request.
pub fn touch_pool(pool: &str, endpoints: &[String], series: &PoolSeries<'_>) {
    let shared_counts = series.shared_counts;
    if let Some(m) = PICKS.as_ref() {
        for reason in series.reasons.iter().chain(&["fallback"]) {
            m.with_label_values(&[pool, series.policy, reason])
                .inc_by(0);
        }
    }
    if let Some(m) = FALLBACKS.as_ref() {
        let store = if shared_counts {
            FallbackReason::STORE
        } else {
            &[]
        };
        for reason in FallbackReason::REQUEST
            .iter()
            .chain(store)
            .chain(series.fallbacks)
        {
            m.with_label_values(&[pool, reason.as_str()]).inc_by(0);
        }
    }
    for family in [&RETRIES, &RECONNECTS] {
        if let Some(m) = family.as_ref() {
            m.with_label_values(&[pool]).inc_by(0);
        }
    }
    if let Some(m) = DURATION.as_ref() {
        m.with_label_values(&[pool]);
    }
    if let Some(m) = TTFB.as_ref() {
        m.with_label_values(&[pool]);
    }
    if let Some(m) = TOKENS.as_ref() {
        for kind in ["prompt", "completion", "cached"] {
            m.with_label_values(&[pool, kind]).inc_by(0);
        }
    }
    if let Some(m) = ENDPOINTS.as_ref() {
        m.with_label_values(&[pool])
            .set(i64::try_from(endpoints.len()).unwrap_or(i64::MAX));
    }
    for e in endpoints {
        add_inflight(pool, e, 0);
        // A new health view starts healthy; its checks report every change.
        set_endpoint_health(pool, e, true);
        if let Some(m) = REQUESTS.as_ref() {
            m.with_label_values(&[pool, e, "2xx"]).inc_by(0);
        }
        if shared_counts {
            set_inflight_global(pool, e, 0);
        }
    }
    if shared_counts {
        set_store_breaker(pool, false);
    }
}

/// Drop the gauges of an endpoint that left its pool (counters stay: they only grow).
pub fn forget_endpoint(pool: &str, endpoint: &str) {
    let labels = [pool, endpoint];
    for m in [
        &HEALTH,
        &INFLIGHT,
        &EJECTED,
        &INFLIGHT_GLOBAL,
        &METRICS_KNOWN,
        &ENGINE_WAITING,
    ] {
        if let Some(m) = m.as_ref() {
            let _ = m.remove_label_values(&labels);
        }
    }
    for m in [&SCRAPE_AGE, &ENGINE_KV] {
        if let Some(m) = m.as_ref() {
            let _ = m.remove_label_values(&labels);
        }
    }
}

/// Set the requests every replica sharing the store has in flight to the endpoint
/// (`llmlb_endpoint_inflight_global`).
pub fn set_inflight_global(pool: &str, endpoint: &str, n: u64) {
    if let Some(m) = INFLIGHT_GLOBAL.as_ref() {
        m.with_label_values(&[pool, endpoint])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// Count a policy-file reload (`llmlb_config_reloads_total`).
pub fn count_reload(trigger: ReloadTrigger, result: ReloadResult) {
    count_reload_by(trigger, result, 1);
}

fn count_reload_by(trigger: ReloadTrigger, result: ReloadResult, n: u64) {
    if let Some(m) = RELOADS.as_ref() {
        m.with_label_values(&[trigger.as_str(), result.as_str()])
            .inc_by(n);
    }
}

/// Set the routing-table generation in force (`llmlb_config_generation`).
pub fn set_generation(id: u64) {
    if let Some(m) = GENERATION.as_ref() {
        m.set(i64::try_from(id).unwrap_or(i64::MAX));
    }
}

/// Count a lookup of an endpoint host name, `result` `ok` or `error` (`llmlb_dns_lookups_total`).
pub fn count_dns_lookup(name: &str, result: &str) {
    if let Some(m) = DNS_LOOKUPS.as_ref() {
        m.with_label_values(&[name, result]).inc();
    }
}

/// Record a request's duration and time to first body byte (`llmlb_request_duration_seconds`,
/// `llmlb_time_to_first_byte_seconds`).
pub fn observe_timing(
    pool: &str,
    duration: std::time::Duration,
    first_byte: Option<std::time::Duration>,
) {
    if let Some(m) = DURATION.as_ref() {
        m.with_label_values(&[pool]).observe(duration.as_secs_f64());
    }
    if let (Some(m), Some(t)) = (TTFB.as_ref(), first_byte) {
        m.with_label_values(&[pool]).observe(t.as_secs_f64());
    }
}

/// Count the tokens a response's `usage` reported (`llmlb_tokens_total`).
pub fn count_tokens(pool: &str, prompt: u64, completion: u64, cached: u64) {
    if let Some(m) = TOKENS.as_ref() {
        m.with_label_values(&[pool, "prompt"]).inc_by(prompt);
        m.with_label_values(&[pool, "completion"])
            .inc_by(completion);
        m.with_label_values(&[pool, "cached"]).inc_by(cached);
    }
}

/// Record how many leading prompt blocks `prefix_cache` found cached (`llmlb_prefix_match_blocks`).
pub fn observe_prefix_match(pool: &str, blocks: usize) {
    if let Some(m) = PREFIX_MATCH.as_ref() {
        m.with_label_values(&[pool]).observe(blocks as f64);
    }
}

/// Record a `kv_aware` pick: the prompt tokens cached on the chosen endpoint and its cost
/// (`llmlb_kv_matched_tokens`, `llmlb_kv_cost_tokens`).
pub fn observe_kv_pick(pool: &str, matched_tokens: u64, cost_tokens: u64) {
    if let Some(m) = KV_MATCHED.as_ref() {
        m.with_label_values(&[pool]).observe(matched_tokens as f64);
    }
    if let Some(m) = KV_COST.as_ref() {
        m.with_label_values(&[pool]).observe(cost_tokens as f64);
    }
}

/// Count a state-store call and record its latency (`llmlb_store_calls_total`,
/// `llmlb_store_call_seconds`).
pub fn store_call(pool: &str, op: &str, result: &str, took: std::time::Duration) {
    if let Some(m) = STORE_CALLS.as_ref() {
        m.with_label_values(&[pool, op, result]).inc();
    }
    if let Some(m) = STORE_SECONDS.as_ref() {
        m.with_label_values(&[op]).observe(took.as_secs_f64());
    }
}

/// Set whether the pool's store breaker is open (`llmlb_store_breaker_open`).
pub fn set_store_breaker(pool: &str, open: bool) {
    if let Some(m) = STORE_BREAKER.as_ref() {
        m.with_label_values(&[pool]).set(i64::from(open));
    }
}

/// Set the age of the endpoint's latest engine-metrics snapshot (`llmlb_scrape_age_seconds`).
pub fn set_scrape_age(pool: &str, endpoint: &str, seconds: f64) {
    if let Some(m) = SCRAPE_AGE.as_ref() {
        m.with_label_values(&[pool, endpoint]).set(seconds);
    }
}

/// Count a failed engine-metrics scrape (`llmlb_scrape_failures_total`).
pub fn count_scrape_failure(pool: &str, endpoint: &str, reason: &str) {
    if let Some(m) = SCRAPE_FAILURES.as_ref() {
        m.with_label_values(&[pool, endpoint, reason]).inc();
    }
}

/// Set whether the endpoint's engine metrics are fresh enough to route on
/// (`llmlb_endpoint_metrics_known`).
pub fn set_metrics_known(pool: &str, endpoint: &str, known: bool) {
    if let Some(m) = METRICS_KNOWN.as_ref() {
        m.with_label_values(&[pool, endpoint]).set(i64::from(known));
    }
}

/// What an endpoint's engine reported (waiting queue, KV-cache use) at a successful scrape.
pub fn set_engine_load(pool: &str, endpoint: &str, waiting: u64, kv_cache_usage: Option<f64>) {
    if let Some(m) = ENGINE_WAITING.as_ref() {
        m.with_label_values(&[pool, endpoint])
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }
    // Engines that export no KV-cache use (llama.cpp) have no series.
    if let (Some(m), Some(kv)) = (ENGINE_KV.as_ref(), kv_cache_usage) {
        m.with_label_values(&[pool, endpoint]).set(kv);
    }
}

/// Count an answered request by its status class; status 0: no response was written
/// (`llmlb_requests_total`).
pub fn count_request(pool: &str, endpoint: &str, status: u16) {
    let class = match status {
        0 => "none",
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    if let Some(m) = REQUESTS.as_ref() {
        m.with_label_values(&[pool, endpoint, class]).inc();
    }
}

/// Count an endpoint pick (`llmlb_picks_total`).
pub fn count_pick(pool: &str, policy: &str, reason: &str) {
    if let Some(m) = PICKS.as_ref() {
        m.with_label_values(&[pool, policy, reason]).inc();
    }
}

/// Set the number of requests waiting in `band` of `pool`'s waiting room (`llmlb_queue_length`).
pub fn set_queue_length(pool: &str, band: &str, len: usize) {
    if let Some(m) = QUEUE_LENGTH.as_ref() {
        m.with_label_values(&[pool, band])
            .set(i64::try_from(len).unwrap_or(i64::MAX));
    }
}

/// Count a waiting-room decision (`llmlb_admissions_total`); a request that waited also observes
/// its wait (`llmlb_queue_wait_seconds`).
pub fn count_admission(
    pool: &str,
    band: &str,
    tenant: &str,
    result: &str,
    waited: std::time::Duration,
) {
    if let Some(m) = ADMISSIONS.as_ref() {
        m.with_label_values(&[pool, band, tenant, result]).inc();
    }
    if matches!(result, "waited" | "deadline" | "client_gone") {
        if let Some(m) = QUEUE_WAIT.as_ref() {
            m.with_label_values(&[pool, band, tenant])
                .observe(waited.as_secs_f64());
        }
    }
}

/// Count a request routed by a fallback instead of the pool's policy (`llmlb_fallback_total`);
/// also logged at debug.
pub fn count_fallback(pool: &str, reason: FallbackReason) {
    log::debug!("pool {pool}: fallback routing ({reason})");
    if let Some(m) = FALLBACKS.as_ref() {
        m.with_label_values(&[pool, reason.as_str()]).inc();
    }
}

/// Count an upstream attempt retried on another endpoint (`llmlb_retries_total`).
pub fn count_retry(pool: &str) {
    if let Some(m) = RETRIES.as_ref() {
        m.with_label_values(&[pool]).inc();
    }
}

/// Count an attempt sent again to the same endpoint over a fresh connection
/// (`llmlb_upstream_reconnects_total`).
pub fn count_reconnect(pool: &str) {
    if let Some(m) = RECONNECTS.as_ref() {
        m.with_label_values(&[pool]).inc();
    }
}

/// Set whether the endpoint passes its health check (`llmlb_endpoint_healthy`).
pub fn set_endpoint_health(pool: &str, endpoint: &str, healthy: bool) {
    if let Some(m) = HEALTH.as_ref() {
        m.with_label_values(&[pool, endpoint])
            .set(i64::from(healthy));
    }
}

/// Count an ejection by passive health checking (`llmlb_outlier_ejections_total`).
pub fn count_ejection(pool: &str, endpoint: &str, reason: &str) {
    if let Some(m) = EJECTIONS.as_ref() {
        m.with_label_values(&[pool, endpoint, reason]).inc();
    }
}

/// Set whether the endpoint is ejected (`llmlb_endpoint_ejected`).
pub fn set_endpoint_ejected(pool: &str, endpoint: &str, ejected: bool) {
    if let Some(m) = EJECTED.as_ref() {
        m.with_label_values(&[pool, endpoint])
            .set(i64::from(ejected));
    }
}

/// Add `delta` to the requests this replica has in flight to the endpoint
/// (`llmlb_endpoint_inflight`).
pub fn add_inflight(pool: &str, endpoint: &str, delta: i64) {
    if let Some(m) = INFLIGHT.as_ref() {
        m.with_label_values(&[pool, endpoint]).add(delta);
    }
}

/// One access-log line (target `llm_lb::access`, level info).
pub struct AccessLog<'a> {
    /// Request method.
    pub method: &'a str,
    /// Request path (without the query).
    pub path: &'a str,
    /// The request's `model`, if any.
    pub model: Option<&'a str>,
    /// The pool that served it, if it was routed.
    pub pool: Option<&'a str>,
    /// The last endpoint picked.
    pub endpoint: Option<std::net::SocketAddr>,
    /// The policy that picked (empty: none).
    pub policy: &'a str,
    /// The pick reason (empty: none).
    pub reason: &'a str,
    /// Response status (0: none was written).
    pub status: u16,
    /// Endpoints tried.
    pub attempts: usize,
    /// Times the request was sent again to the same endpoint over a fresh connection.
    pub reconnects: usize,
    /// Time from request start to the end of the response.
    pub duration: std::time::Duration,
    /// Time to the first response body byte.
    pub ttfb: Option<std::time::Duration>,
    /// Request body bytes.
    pub request_bytes: usize,
    /// Response body bytes sent to the client.
    pub response_bytes: usize,
    /// The type of the error the request ended with, if any.
    pub error: Option<&'a str>,
}

impl AccessLog<'_> {
    /// Write the line (absent values as `-`).
    pub fn emit(&self) {
        let dash = |s: Option<&str>| s.unwrap_or("-").to_string();
        log::info!(
            target: "llm_lb::access",
            "method={} path={} model={} pool={} endpoint={} policy={} reason={} status={} attempts={} reconnects={} duration_ms={:.1} ttfb_ms={} req_bytes={} resp_bytes={} error={}",
            self.method,
            self.path,
            dash(self.model),
            dash(self.pool),
            self.endpoint.map_or_else(|| "-".to_string(), |e| e.to_string()),
            if self.policy.is_empty() { "-" } else { self.policy },
            if self.reason.is_empty() { "-" } else { self.reason },
            self.status,
            self.attempts,
            self.reconnects,
            self.duration.as_secs_f64() * 1000.0,
            self.ttfb.map_or_else(|| "-".to_string(), |t| format!("{:.1}", t.as_secs_f64() * 1000.0)),
            self.request_bytes,
            self.response_bytes,
            dash(self.error),
        );
    }
}

// ---- KV-cache events (src/kv_events): the precise index fed by engines' event streams ----

/// Kinds of `llmlb_kv_events_total{kind}`.
pub const KV_EVENT_KINDS: &[&str] = &["stored", "removed", "cleared", "unknown"];

/// Reasons of `llmlb_kv_events_resyncs_total{reason}`.
pub const KV_RESYNC_REASONS: &[&str] = &["gap", "restart", "reconnect", "decode_error"];

static KV_EVENTS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llmlb_kv_events_total",
        "KV-cache events received from the endpoint's engine, by kind (stored, removed, cleared, unknown = an event type llm-lb skips)",
        &["pool", "endpoint", "kind"]
    )
    .ok()
});

static KV_RESYNCS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llmlb_kv_events_resyncs_total",
        "Times the KV index of the endpoint was resynchronised with its engine's event stream, by reason (gap = missed batches, replayed or forgotten; restart = sequence went back; reconnect = connection lost; decode_error = unreadable batch)",
        &["pool", "endpoint", "reason"]
    )
    .ok()
});

static KV_INDEX_BLOCKS: LazyLock<Option<IntGaugeVec>> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llmlb_kv_index_blocks",
        "(block, endpoint) entries in the pool's KV index, confirmed by engine events or predicted from recent routing",
        &["pool"]
    )
    .ok()
});

static KV_CONNECTED: LazyLock<Option<IntGaugeVec>> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llmlb_kv_events_connected",
        "1 while llm-lb is connected to the endpoint's KV-event stream",
        &["pool", "endpoint"]
    )
    .ok()
});

/// Record whether the endpoint's KV-event stream is connected (`llmlb_kv_events_connected`).
pub fn set_kv_events_connected(pool: &str, endpoint: &str, connected: bool) {
    if let Some(m) = KV_CONNECTED.as_ref() {
        m.with_label_values(&[pool, endpoint])
            .set(i64::from(connected));
    }
}

/// Create the KV-event families (part of [`touch`]).
pub fn touch_kv_events() {
    LazyLock::force(&KV_CONNECTED);
    LazyLock::force(&KV_EVENTS);
    LazyLock::force(&KV_RESYNCS);
    LazyLock::force(&KV_INDEX_BLOCKS);
}

/// Give an endpoint's KV-event series their zero values.
pub fn touch_kv_endpoint(pool: &str, endpoint: &str) {
    set_kv_events_connected(pool, endpoint, false);
    if let Some(m) = KV_EVENTS.as_ref() {
        for kind in KV_EVENT_KINDS {
            m.with_label_values(&[pool, endpoint, kind]).inc_by(0);
        }
    }
    if let Some(m) = KV_RESYNCS.as_ref() {
        for reason in KV_RESYNC_REASONS {
            m.with_label_values(&[pool, endpoint, reason]).inc_by(0);
        }
    }
}

/// Count KV-cache events of one `kind` (one of [`KV_EVENT_KINDS`]) from the endpoint's engine
/// (`llmlb_kv_events_total`).
pub fn count_kv_events(pool: &str, endpoint: &str, kind: &str, n: u64) {
    if n == 0 {
        return;
    }
    if let Some(m) = KV_EVENTS.as_ref() {
        m.with_label_values(&[pool, endpoint, kind]).inc_by(n);
    }
}

/// Count a resynchronisation of the endpoint's KV index, `reason` one of [`KV_RESYNC_REASONS`]
/// (`llmlb_kv_events_resyncs_total`).
pub fn count_kv_resync(pool: &str, endpoint: &str, reason: &str) {
    if let Some(m) = KV_RESYNCS.as_ref() {
        m.with_label_values(&[pool, endpoint, reason]).inc();
    }
}

/// Set the (block, endpoint) entries of the pool's KV index (`llmlb_kv_index_blocks`).
pub fn set_kv_index_blocks(pool: &str, entries: usize) {
    if let Some(m) = KV_INDEX_BLOCKS.as_ref() {
        m.with_label_values(&[pool])
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }
}
