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
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
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
    pub listen: Option<OneOrMany<String>>,
    pub admin: Option<String>,
    pub max_body_bytes: Option<u64>,
    pub body_timeout_ms: Option<u64>,
    pub max_header_bytes: Option<u64>,
    pub h2c: Option<bool>,
    pub max_attempts: Option<usize>,
    pub expose_endpoint_header: Option<bool>,
    pub upstream: Option<UpstreamFile>,
    /// How often `host:port` endpoints are resolved again (ms).
    pub dns_refresh_ms: Option<u64>,
    pub pools: Vec<PoolFile>,
}

/// Timeouts and connection reuse towards the inference servers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub connect_timeout_ms: Option<u64>,
    pub read_timeout_ms: Option<u64>,
    pub write_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
}

/// One pool of interchangeable endpoints serving the same models.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    pub name: String,
    pub models: Vec<String>,
    pub endpoints: Vec<EndpointFile>,
    pub health_check: Option<HealthCheckFile>,
    pub metrics: Option<MetricsFile>,
    pub outlier_detection: Option<OutlierFile>,
    pub lb_policy: String,
    /// A built-in policy's keys ([`LbConfigFile`]) or a custom policy's own.
    pub lb_config: Option<serde_yaml::Value>,
}

/// `"127.0.0.1:8001"` or `{address: "127.0.0.1:8001", weight: 2}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EndpointFile {
    Address(String),
    Detailed(DetailedEndpointFile),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetailedEndpointFile {
    pub address: String,
    pub weight: Option<usize>,
}

/// Active HTTP health check of every endpoint of a pool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckFile {
    pub enabled: Option<bool>,
    pub path: Option<String>,
    pub interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub healthy_threshold: Option<usize>,
    pub unhealthy_threshold: Option<usize>,
}

/// Passive health: ejection of endpoints that fail requests (see `health::passive`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierFile {
    pub enabled: Option<bool>,
    pub consecutive_failures: Option<u32>,
    pub base_ejection_ms: Option<u64>,
    pub max_ejection_ms: Option<u64>,
    pub max_ejected_percent: Option<u8>,
}

/// Engine-metrics scraping (used by `least_busy`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    pub path: Option<String>,
    pub interval_ms: Option<u64>,
}

/// Higress `ai-load-balancer` `lb_config` keys (same names, same units).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(non_snake_case)]
pub struct LbConfigFile {
    pub serviceFQDN: Option<String>,
    pub servicePort: Option<u16>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub timeout: Option<u64>,
    pub database: Option<i64>,
    pub redisKeyTTL: Option<i64>,
    pub maxRequestCount: Option<u64>,
    pub criticalModels: Option<Vec<String>>,
    /// `least_busy` thresholds (the Inference Extension's names; defaults in README).
    pub queueThresholdCritical: Option<u64>,
    pub kvCacheThreshold: Option<f64>,
    pub queueingThresholdLoRA: Option<u64>,
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
    pub tlsCaFile: Option<String>,
    pub tlsCertFile: Option<String>,
    pub tlsKeyFile: Option<String>,
    /// Higress's own knobs that have no meaning here (accepted, warned about).
    pub cleanInterval: Option<serde_yaml::Value>,
    pub enableDetailLog: Option<serde_yaml::Value>,
}
