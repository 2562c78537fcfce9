//! Configuration: the policy file (`-p conf/policy.yaml`) loaded, checked and turned into the
//! validated [`Config`] the rest of the crate uses.
//!
//! Two stages, as in River: [`mod@file`] holds the serde types that mirror the YAML exactly (unknown keys
//! are errors), and [`load`]/[`Config::from_yaml`] validate them into internal types with defaults
//! filled in. Every error names the offending field by its path (`pools[1].endpoints[0]: …`).

//!
//! The bottom of the crate's layers: it imports nothing of the crate. Settings of a policy, the
//! store, passive health live here as plain validated data; the modules that act on them import
//! them.

mod admission;
mod endpoint_hash;
mod endpoint_metrics;
mod error;
pub mod file;
mod kv_aware;
mod latency_aware;
mod least_busy;
mod outlier;
mod policy;
mod prefix;
mod redis;
mod session;
mod validate;

pub use admission::{AdmissionConfig, Band, BandLimits};
pub use endpoint_hash::{
    EndpointHashConfig, DEFAULT_HASH_HEADER, DEFAULT_STICKY_TIMEOUT, MAX_STICKY_TIMEOUT_MINUTES,
};
pub use endpoint_metrics::{EndpointMetricsConfig, MetricPolicy, RATE_WINDOW};
pub use error::{ConfigError, InvalidKey, Issue};
pub use kv_aware::KvAwareSettings;
pub use latency_aware::{
    LatencyAwareConfig, LatencyMode, DEFAULT_FAILURE_COOLDOWN, DEFAULT_P2C_CHOICES,
    DEFAULT_QUEUE_SIZE, MAX_FAILURE_COOLDOWN_MS, MAX_QUEUE_SIZE,
};
pub use least_busy::{LeastBusyConfig, Thresholds};
pub use outlier::OutlierConfig;
pub use policy::{
    key_users, CustomPolicy, KeyUse, PolicyKind, PolicySettings, SharedCounts, StoreConfig,
};
pub use prefix::{LoadGuard, PrefixSettings};
pub use redis::{
    check_dead_replica_after, check_replica_id, RedisConfig, RedisMode, TlsFiles,
    DEFAULT_DEAD_REPLICA_AFTER, DEFAULT_NAMESPACE, DEFAULT_TIMEOUT, MAX_DEAD_REPLICA_AFTER,
    MIN_REPLICA_TIMEOUT_MS,
};
pub use session::SessionConfig;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use file::PolicyFile;
use validate::Validator;

/// Default `max_body_bytes`: 32 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Default `body_timeout_ms`: the whole request body must arrive within 60 s.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `max_header_bytes`: 64 KiB of request target and header fields (Envoy: 60 KiB).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Default admin listener (loopback only).
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9091";
/// Default listener.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Default `dns_refresh_ms`: how often `host:port` endpoints are resolved again.
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(5);

/// The validated policy file.
#[derive(Debug, Clone)]
pub struct Config {
    /// Proxy listener addresses.
    pub listen: Vec<SocketAddr>,
    /// Admin listener address; `None` when disabled.
    pub admin: Option<SocketAddr>,
    /// Request bodies above this many bytes are refused (413).
    pub max_body_bytes: usize,
    /// Deadline for reading the whole request body (408 after it: slow-loris bodies).
    pub body_timeout: Duration,
    /// Request target and header fields above this many bytes: 414 / 431.
    pub max_header_bytes: usize,
    /// Accept plaintext HTTP/2 with prior knowledge besides HTTP/1.1.
    pub h2c: bool,
    /// Upstream attempts per request (first try + retries on other endpoints).
    pub max_attempts: usize,
    /// Add `x-llm-lb-endpoint` / `x-llm-lb-policy` / `x-llm-lb-reason` to responses (off: it
    /// reveals internal addresses).
    pub expose_endpoint_header: bool,
    /// Timeouts towards inference servers.
    pub upstream: UpstreamConfig,
    /// How often endpoints given by host name are resolved again.
    pub dns_refresh: Duration,
    /// OpenTelemetry traces (`None`: off).
    pub tracing: Option<TracingConfig>,
    /// The pools; a request goes to the first one that serves its model.
    pub pools: Vec<PoolConfig>,
    /// Accepted but ignored settings, reported once at start.
    pub warnings: Vec<Issue>,
}

/// OpenTelemetry traces: a span per request exported over OTLP/HTTP, and the trace context sent
/// to the engines.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP traces URL (`http://`).
    pub otlp_endpoint: String,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Share of new traces (requests without a sampled `traceparent`) that are sampled, 0–1.
    pub sample_ratio: f64,
}

/// Timeouts towards inference servers.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Deadline for connecting to an endpoint.
    pub connect_timeout: Duration,
    /// Longest silence between two reads, including time to first byte (prefill).
    pub read_timeout: Duration,
    /// Deadline for one write to an endpoint.
    pub write_timeout: Duration,
    /// How long an idle pooled connection is kept; below the backends' keep-alive timeout.
    pub idle_timeout: Duration,
}

/// One pool of endpoints.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Unique name (used in metrics, logs and state-store keys).
    pub name: String,
    /// Model names this pool serves; `"*"` matches any.
    pub models: Vec<String>,
    /// As written; the routing layer resolves them into addresses.
    pub endpoints: Vec<EndpointSpec>,
    /// Active health checking; `None` when disabled.
    pub health_check: Option<HealthCheckConfig>,
    /// Engine-metrics scraping.
    pub metrics: MetricsConfig,
    /// `lb_policy` and the `lb_config` settings it reads.
    pub policy: PolicySettings,
    /// Passive health (`outlier_detection`); `None` when disabled.
    pub outlier: Option<OutlierConfig>,
    /// Where requests name their session (`session_affinity`); `None` when disabled.
    pub session: Option<SessionConfig>,
    /// The waiting room (`admission`); `None` when there is none.
    pub admission: Option<AdmissionConfig>,
}

impl PoolConfig {
    /// Whether this pool serves `model` (`"*"` matches any model).
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }
}

/// The largest endpoint `weight`: round robin unrolls one cycle of the weights' sum.
pub const MAX_WEIGHT: usize = 1000;

/// One configured endpoint: an address or a host name, and a weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Where the endpoint is.
    pub address: Address,
    /// Relative weight, 1 to [`MAX_WEIGHT`].
    pub weight: usize,
    /// Its KV-cache event stream (`tcp://host:port`), if it publishes one.
    pub kv_events: Option<String>,
    /// Its replay socket for missed events (`tcp://host:port`).
    pub kv_events_replay: Option<String>,
}

/// Where an endpoint is: a fixed `IP:port`, or `host:port` resolved at start and every
/// `dns_refresh_ms` (each address it resolves to is an endpoint).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// A fixed `IP:port`.
    Ip(SocketAddr),
    /// A `host:port` to resolve.
    Name {
        /// Host name.
        host: String,
        /// Port.
        port: u16,
    },
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Ip(a) => write!(f, "{a}"),
            Address::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl Address {
    /// Parse `IP:port` or `host:port` (without resolving anything).
    pub fn parse(value: &str) -> Result<Address, String> {
        if let Ok(a) = value.parse::<SocketAddr>() {
            return Ok(Address::Ip(a));
        }
        let Some((host, port)) = value.rsplit_once(':') else {
            return Err(format!("'{value}' needs a port (host:port)"));
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("'{value}': '{port}' is not a port")),
        };
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        let name = host.strip_suffix('.').unwrap_or(host);
        if name.len() > 253 || !name.split('.').all(valid_label) {
            return Err(format!(
                "'{value}' is neither an IP:port address nor a host:port name"
            ));
        }
        Ok(Address::Name {
            host: host.to_owned(),
            port,
        })
    }
}

/// The `host:port` of a `kv_events` URL (`tcp://host:port`, ZMQ's TCP transport).
pub fn kv_events_address(url: &str) -> Result<Address, String> {
    let Some(rest) = url.strip_prefix("tcp://") else {
        return Err(format!(
            "'{url}' must be tcp://host:port (the engine's ZMQ event publisher)"
        ));
    };
    Address::parse(rest)
}

/// One inference server at a resolved address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// The resolved address.
    pub addr: SocketAddr,
    /// Relative weight, 1 to [`MAX_WEIGHT`].
    pub weight: usize,
    /// Its KV-cache event stream (`tcp://IP:port`), if it publishes one.
    pub kv_events: Option<String>,
    /// Its replay socket for missed events (`tcp://IP:port`).
    pub kv_events_replay: Option<String>,
}

/// Active health checking of a pool's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Path requested on each endpoint.
    pub path: String,
    /// Time between two checks of an endpoint.
    pub interval: Duration,
    /// Deadline of one check.
    pub timeout: Duration,
    /// Successes in a row that make an endpoint healthy.
    pub healthy_threshold: usize,
    /// Failures in a row that make an endpoint unhealthy.
    pub unhealthy_threshold: usize,
}

/// Engine-metrics scraping settings.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Path of the engine's metrics.
    pub path: String,
    /// Time between two scrapes of an endpoint.
    pub interval: Duration,
}

/// Read and validate the policy file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, &[])
}

/// [`load`], accepting `lb_policy` names of the policies `custom` (registered by the program
/// embedding llm-lb).
pub fn load_with(path: &Path, custom: &[&str]) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Config::from_yaml_with(&text, custom)
}

impl Config {
    /// Parse and validate a policy file's text.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml_with(text, &[])
    }

    /// [`Config::from_yaml`], accepting the custom policies `custom` as `lb_policy`.
    pub fn from_yaml_with(text: &str, custom: &[&str]) -> Result<Config, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let file: PolicyFile =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Parse {
                path: match e.path().to_string().as_str() {
                    "." => "(top level)".to_string(),
                    p => p.to_string(),
                },
                message: e.inner().to_string(),
            })?;
        Validator::new(custom).config(file)
    }
}

#[cfg(test)]
mod tests;
