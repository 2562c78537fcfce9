//! The policy file exactly as users write it (YAML), before validation.
//!
//! Every struct rejects unknown keys. `lb_config` accepts Higress's `ai-load-balancer` keys unchanged
//! (camelCase, same units) so a Higress user can paste theirs; keys a policy does not use are
//! accepted and reported as warnings by validation. Defaults and meaning are documented in README.

use serde::Deserialize;

/// One value or a list of them (`listen: 0.0.0.0:8080` or `listen: [a, b]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// A single value.
    One(T),
    /// A list of values.
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    /// The value(s) as a list.
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Top level of the policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Proxy listener address(es), `IP:port` (default `0.0.0.0:8080`).
    pub listen: Option<OneOrMany<String>>,
    /// Admin listener address (default `127.0.0.1:9091`), or `off` / `none`.
    pub admin: Option<String>,
    /// Request body limit in bytes (default 32 MiB).
    pub max_body_bytes: Option<u64>,
    /// Deadline for receiving the whole request body (ms, default 60000).
    pub body_timeout_ms: Option<u64>,
    /// Limit on request target and header fields in bytes (default 64 KiB, at least 1024).
    pub max_header_bytes: Option<u64>,
    /// Accept plaintext HTTP/2 with prior knowledge (default `true`).
    pub h2c: Option<bool>,
    /// Upstream attempts per request (default 3).
    pub max_attempts: Option<usize>,
    /// Add the `x-llm-lb-*` headers to responses (default `false`).
    pub expose_endpoint_header: Option<bool>,
    /// Timeouts towards the inference servers.
    pub upstream: Option<UpstreamFile>,
    /// How often `host:port` endpoints are resolved again (ms).
    pub dns_refresh_ms: Option<u64>,
    /// OpenTelemetry traces (off when absent).
    pub tracing: Option<TracingFile>,
    /// The pools; a request goes to the first one that serves its model.
    pub pools: Vec<PoolFile>,
}

/// OpenTelemetry traces exported over OTLP/HTTP.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingFile {
    /// The collector's OTLP/HTTP traces URL, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub otlp_endpoint: String,
    /// `service.name` of the spans (default `llm-lb`).
    pub service_name: Option<String>,
    /// Share of new traces sampled, 0–1 (default 1).
    pub sample_ratio: Option<f64>,
}

/// Timeouts and connection reuse towards the inference servers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// Connect timeout (ms, default 1000).
    pub connect_timeout_ms: Option<u64>,
    /// Longest silence between two reads (ms, default 600000).
    pub read_timeout_ms: Option<u64>,
    /// Write timeout (ms, default 60000).
    pub write_timeout_ms: Option<u64>,
    /// How long an idle pooled connection is kept (ms, default 4000).
    pub idle_timeout_ms: Option<u64>,
}

/// One pool of interchangeable endpoints serving the same models.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    /// Unique pool name (used in metrics, logs and state-store keys).
    pub name: String,
    /// Model names this pool serves; `"*"` matches any.
    pub models: Vec<String>,
    /// The pool's endpoints.
    pub endpoints: Vec<EndpointFile>,
    /// Active health check (on with defaults when absent).
    pub health_check: Option<HealthCheckFile>,
    /// Engine-metrics scraping.
    pub metrics: Option<MetricsFile>,
    /// Passive health (on with defaults when absent).
    pub outlier_detection: Option<OutlierFile>,
    /// Session affinity (on with the default headers and body fields when absent).
    pub session_affinity: Option<SessionFile>,
    /// The waiting room (none when absent).
    pub admission: Option<AdmissionFile>,
    /// Name of the policy that picks endpoints.
    pub lb_policy: String,
    /// A built-in policy's keys ([`LbConfigFile`]) or a custom policy's own.
    pub lb_config: Option<serde_yaml::Value>,
}

/// A pool's waiting room: see [`super::AdmissionConfig`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionFile {
    /// `false` turns it off.
    pub enabled: Option<bool>,
    /// Requests this replica lets in flight per endpoint before new ones wait.
    pub max_inflight: Option<usize>,
    /// Header naming a request's band (default `x-llm-lb-priority`).
    pub priority_header: Option<String>,
    /// Header naming a request's tenant (default `x-tenant-id`).
    pub tenant_header: Option<String>,
    /// Band of requests that name none (default `standard`).
    pub default_band: Option<String>,
    /// Queue and deadline per band.
    pub bands: Option<BandsFile>,
}

/// Per band limits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BandsFile {
    /// `critical`.
    pub critical: Option<BandFile>,
    /// `standard`.
    pub standard: Option<BandFile>,
    /// `sheddable`.
    pub sheddable: Option<BandFile>,
}

/// One band's limits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BandFile {
    /// Most requests of the band waiting at once.
    pub queue: Option<usize>,
    /// Longest wait, ms.
    pub deadline_ms: Option<u64>,
}

/// Session affinity: which headers and body fields name a request's session.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionFile {
    /// `false` turns it off.
    pub enabled: Option<bool>,
    /// Headers naming the session (default: the ones agents send).
    pub headers: Option<Vec<String>>,
    /// Body fields naming the session, dotted paths (default `prompt_cache_key`, `user`,
    /// `metadata.user_id`).
    pub body_fields: Option<Vec<String>>,
}

/// `"127.0.0.1:8001"` or `{address: "127.0.0.1:8001", weight: 2}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EndpointFile {
    /// Just an address (weight 1).
    Address(String),
    /// An address with a weight.
    Detailed(DetailedEndpointFile),
}

/// An endpoint written as `{address, weight}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetailedEndpointFile {
    /// `IP:port` or `host:port`.
    pub address: String,
    /// Relative weight, 1 to 1000 (default 1).
    pub weight: Option<usize>,
    /// The engine's KV-cache event stream (`tcp://host:port`, vLLM's ZMQ publisher).
    pub kv_events: Option<String>,
    /// The engine's replay socket for missed events (`tcp://host:port`, vLLM's `replay_endpoint`).
    pub kv_events_replay: Option<String>,
}

/// Active HTTP health check of every endpoint of a pool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckFile {
    /// `false` turns the check off.
    pub enabled: Option<bool>,
    /// Path to request (default `/health`).
    pub path: Option<String>,
    /// Time between checks (ms, default 1000).
    pub interval_ms: Option<u64>,
    /// Timeout of one check (ms, default 500).
    pub timeout_ms: Option<u64>,
    /// Successes in a row that make an endpoint healthy (default 1).
    pub healthy_threshold: Option<usize>,
    /// Failures in a row that make an endpoint unhealthy (default 2).
    pub unhealthy_threshold: Option<usize>,
}

/// Passive health: ejection of endpoints that fail requests (see `health::passive`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierFile {
    /// `false` turns passive health off.
    pub enabled: Option<bool>,
    /// Failures in a row that eject an endpoint (default 5).
    pub consecutive_failures: Option<u32>,
    /// The first ejection's length (ms, default 10000); each further one doubles it.
    pub base_ejection_ms: Option<u64>,
    /// The longest ejection (ms, default the larger of 300000 and `base_ejection_ms`).
    pub max_ejection_ms: Option<u64>,
    /// At most this percentage of the pool's endpoints is ejected at once (default 50).
    pub max_ejected_percent: Option<u8>,
}

/// Engine-metrics scraping (used by `least_busy`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// Path of the engine's metrics (default `/metrics`).
    pub path: Option<String>,
    /// Time between scrapes (ms, default 200).
    pub interval_ms: Option<u64>,
}

/// Higress `ai-load-balancer` `lb_config` keys (same names, same units).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(non_snake_case)]
pub struct LbConfigFile {
    /// Redis host name, IP or URL; absent: the embedded store.
    pub serviceFQDN: Option<String>,
    /// Redis port (default 6379; not with a URL).
    pub servicePort: Option<u16>,
    /// Redis ACL user (empty: none).
    pub username: Option<String>,
    /// Redis password (empty: none).
    pub password: Option<String>,
    /// ms per Redis call (default 50; 0 means the default).
    pub timeout: Option<u64>,
    /// Redis database number (default 0).
    pub database: Option<i64>,
    /// `prefix_cache`: seconds a prefix stays in the index unused (default 1800; 0 means the
    /// default).
    pub redisKeyTTL: Option<i64>,
    /// Refuse with 429 when every endpoint has this many requests in flight (0: no limit).
    pub maxRequestCount: Option<u64>,
    /// `least_busy`: models whose requests are critical.
    pub criticalModels: Option<Vec<String>>,
    /// `least_busy` thresholds (the Inference Extension's names; defaults in README).
    pub queueThresholdCritical: Option<u64>,
    /// `least_busy`: a sheddable request needs an endpoint with KV-cache use at most this (0–1).
    pub kvCacheThreshold: Option<f64>,
    /// `least_busy`: critical requests look for LoRA affinity among endpoints with fewer waiting
    /// than this.
    pub queueingThresholdLoRA: Option<u64>,
    /// `least_busy`: probability of preferring an endpoint running the request's adapter over one
    /// with room for it (0–1).
    pub loraAffinityThreshold: Option<f64>,
    /// llm-lb's addition: Redis key namespace (default `llmlb`), so deployments sharing one Redis
    /// never collide.
    pub keyPrefix: Option<String>,
    /// llm-lb's addition: ms without a heartbeat after which a replica's in-flight counts are
    /// removed by the survivors (default 10000, at most 15000).
    pub replicaTimeout: Option<u64>,
    /// llm-lb's addition (`prefix_cache`): a prefix holder is skipped when it has more than this
    /// many requests in flight above the least loaded endpoint (default 4)…
    pub loadGuardAbsolute: Option<u64>,
    /// …or more than this fraction of the least loaded endpoint's count above it, whichever is
    /// larger (default 0.5).
    pub loadGuardRelative: Option<f64>,
    /// llm-lb's additions: TLS to Redis. `tls: true` with a host-name `serviceFQDN` (a `rediss://`
    /// URL implies it); the server is verified against `tlsCaFile` (PEM) or the system's trust
    /// store; `tlsCertFile` + `tlsKeyFile` (PEM) present a client certificate.
    pub tls: Option<bool>,
    /// PEM file of the CA(s) for the Redis server's certificate (see [`LbConfigFile::tls`]).
    pub tlsCaFile: Option<String>,
    /// PEM client certificate for Redis (see [`LbConfigFile::tls`]).
    pub tlsCertFile: Option<String>,
    /// PEM client private key for Redis (see [`LbConfigFile::tls`]).
    pub tlsKeyFile: Option<String>,
    /// Higress's own knobs that have no meaning here (accepted, warned about).
    pub cleanInterval: Option<serde_yaml::Value>,
    /// Higress's knob with no meaning here (accepted, warned about).
    pub enableDetailLog: Option<serde_yaml::Value>,
    /// `kv_aware`: Hugging Face tokenizer directory (approximate tokens without it).
    pub tokenizer: Option<String>,
    /// `kv_aware`: tokens per KV block (default 16).
    pub blockSize: Option<usize>,
    /// `kv_aware`: cost of one uncached prompt token (default 1.0).
    pub prefillWeight: Option<f64>,
    /// `kv_aware`: cost of one token of load in flight (default 1.0).
    pub loadWeight: Option<f64>,
    /// `kv_aware`: load a request adds for its decoding, in tokens (default 128).
    pub decodeTokens: Option<u64>,
    /// `kv_aware`: what an engine with KV events evicted, but llm-lb routed there, counts as
    /// cached by this fraction (default 0.5).
    pub routedWeight: Option<f64>,
    /// `kv_aware`: extra cost of an uncached prompt token on an engine whose KV cache is full
    /// (default 1.0).
    pub evictionWeight: Option<f64>,
    /// `kv_aware`: extra load of an endpoint per request its engine reports waiting, in requests
    /// like the one placed (default 0: not scraped).
    pub queueWeight: Option<f64>,
    /// `kv_aware`: relative cost difference treated as a tie (default 0.05).
    pub tieTolerance: Option<f64>,
    /// `kv_aware`: lifetime of predicted index entries (ms, default 2000).
    pub predictedTtlMs: Option<u64>,
    /// `kv_aware`: most block entries in the pool's index (default 262144).
    pub kvIndexBlocks: Option<usize>,
    /// `kv_aware`: KV-event topic to subscribe to (default: all).
    pub kvEventsTopic: Option<String>,
    /// `endpoint_metrics`: `default` (the filter tree), `least` or `most` (of `target_metric`).
    pub metric_policy: Option<String>,
    /// `endpoint_metrics`: the scraped gauge `least` and `most` rank by.
    pub target_metric: Option<String>,
    /// `endpoint_metrics`: the largest share of the last 100 picks one endpoint may take (0–1];
    /// `latency_aware`: an endpoint whose share of the last `queue_size` picks reached this is
    /// skipped while another is below it.
    pub rate_limit: Option<f64>,
    /// `latency_aware`: `AdaptiveScore` (default), `LeastBusy`, `LeastFirstTokenLatency` or
    /// `LeastTotalLatency`.
    pub mode: Option<String>,
    /// `latency_aware`: EWMA smoothing of latencies, `new = beta·old + (1 − beta)·sample` (0–1,
    /// default 0.5).
    pub ewma_beta: Option<f64>,
    /// `latency_aware`: candidates sampled for the adaptive score (default 2; 0 or less means
    /// the default).
    pub p2c_choices: Option<i64>,
    /// `latency_aware`: weight of `√(ttft_ms + 1)` in the adaptive score (default 0.7).
    pub ttft_weight: Option<f64>,
    /// `latency_aware`: weight of `√(total_ms + 1)` in the adaptive score (default 0.3).
    pub total_latency_weight: Option<f64>,
    /// `latency_aware`: the score is multiplied by `1 + error_penalty · error_rate` (default 3).
    pub error_penalty: Option<f64>,
    /// `latency_aware`: ms an endpoint is avoided after a failure (default 30000; 0 means the
    /// default).
    pub failure_cooldown_ms: Option<i64>,
    /// `latency_aware`: how an endpoint without latency samples scores (`least_busy` only).
    pub metrics_missing_policy: Option<String>,
    /// `latency_aware`: latency samples averaged by the `Least*Latency` modes and picks
    /// remembered for `rate_limit` (default 100; 0 means the default).
    pub queue_size: Option<i64>,
    /// `latency_aware` (AdaptiveScore): share in-flight counts between replicas through the
    /// Redis the Higress keys name (default false).
    pub global_inflight_enabled: Option<bool>,
    /// `latency_aware`: the shared counts' key namespace when `keyPrefix` is not given.
    pub global_inflight_key_prefix: Option<String>,
    /// `latency_aware`: the Redis call timeout (ms) when `timeout` is not given.
    pub global_inflight_timeout: Option<i64>,
    /// Higress's TTL of its in-flight hash (s); llm-lb's counts are kept by replica heartbeats,
    /// so it has no effect (accepted, checked).
    pub global_inflight_key_ttl: Option<i64>,
    /// Higress `cluster_metrics`' services to pick among; `latency_aware` picks among the pool's
    /// endpoints (refused).
    pub service_list: Option<serde_yaml::Value>,
    /// Higress `cluster_metrics`' header naming the chosen service (refused).
    pub cluster_header: Option<serde_yaml::Value>,
    /// `endpoint_hash`: the header whose value pins a request to an endpoint (default
    /// `x-mse-consumer`).
    pub hash_header: Option<String>,
    /// `endpoint_hash`: minutes a binding lives unused, refreshed on each use (default 60; 0
    /// means the default).
    pub stickyTimeout: Option<i64>,
}
