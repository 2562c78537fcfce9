//! Configuration: the policy file (`-p conf/policy.yaml`) loaded, checked and turned into the
//! validated [`Config`] the rest of the crate uses.
//!
//! Two stages, as in River: [`mod@file`] holds the serde types that mirror the YAML exactly (unknown keys
//! are errors), and [`load`]/[`Config::from_file`] validate them into internal types with defaults
//! filled in. Every error names the offending field by its path (`pools[1].endpoints[0]: …`).

pub mod file;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use file::{EndpointFile, LbConfigFile, OneOrMany, PolicyFile, PoolFile};

use crate::outlier::OutlierConfig;
use crate::policy::LeastBusyConfig;
use crate::store::{LoadGuard, PrefixSettings, RedisConfig, StoreConfigError};

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

/// A problem in the policy file, located by its field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Issue>),
}

/// The validated policy file.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub max_body_bytes: usize,
    /// Deadline for reading the whole request body (408 after it: slow-loris bodies).
    pub body_timeout: Duration,
    /// Request target and header fields above this many bytes: 414 / 431.
    pub max_header_bytes: usize,
    pub h2c: bool,
    /// Upstream attempts per request (first try + retries on other endpoints).
    pub max_attempts: usize,
    /// Add `x-llm-lb-endpoint` / `x-llm-lb-policy` / `x-llm-lb-reason` to responses (off: it
    /// reveals internal addresses).
    pub expose_endpoint_header: bool,
    pub upstream: UpstreamConfig,
    /// How often endpoints given by host name are resolved again.
    pub dns_refresh: Duration,
    pub pools: Vec<PoolConfig>,
    /// Accepted but ignored settings, reported once at start.
    pub warnings: Vec<Issue>,
}

/// Timeouts towards inference servers.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub connect_timeout: Duration,
    /// Longest silence between two reads, including time to first byte (prefill).
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    /// How long an idle pooled connection is kept; below the backends' keep-alive timeout.
    pub idle_timeout: Duration,
}

/// One pool of endpoints.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub models: Vec<String>,
    /// As written; [`crate::resolve`] turns them into addresses.
    pub endpoints: Vec<EndpointSpec>,
    pub health_check: Option<HealthCheckConfig>,
    pub metrics: MetricsConfig,
    pub policy: PolicyKind,
    pub lb_config: LbConfigFile,
    /// Where the policy keeps shared state; `None` for policies without state.
    pub store: Option<StoreConfig>,
    /// `maxRequestCount`: refuse with 429 when every endpoint has this many in flight.
    pub max_inflight: Option<u64>,
    /// `prefix_cache` settings (`redisKeyTTL`, `loadGuardAbsolute`, `loadGuardRelative`); `None`
    /// for other policies.
    pub prefix: Option<PrefixSettings>,
    /// `least_busy`'s thresholds and critical models (`None` for other policies).
    pub least_busy: Option<LeastBusyConfig>,
    /// Passive health (`outlier_detection`); `None` when disabled.
    pub outlier: Option<OutlierConfig>,
}

/// The state store a pool's policy uses.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreConfig {
    /// In-process (no Redis keys in `lb_config`): correct for a single gateway replica.
    Embedded,
    /// Redis or Redis Cluster, shared by every replica configured with it.
    Redis(Box<RedisConfig>),
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
    pub address: Address,
    pub weight: usize,
}

/// Where an endpoint is: a fixed `IP:port`, or `host:port` resolved at start and every
/// `dns_refresh_ms` (each address it resolves to is an endpoint).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
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

/// One inference server at a resolved address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointConfig {
    pub addr: SocketAddr,
    pub weight: usize,
}

/// Active health checking of a pool's endpoints.
#[derive(Debug, Clone)]
pub struct HealthCheckConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: usize,
    pub unhealthy_threshold: usize,
}

/// Engine-metrics scraping settings.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub path: String,
    pub interval: Duration,
}

/// The load-balancing policies (`lb_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    RoundRobin,
    Random,
    GlobalLeastRequest,
    PrefixCache,
    LeastBusy,
}

impl PolicyKind {
    pub const NAMES: &'static [&'static str] = &[
        "round_robin",
        "random",
        "global_least_request",
        "prefix_cache",
        "least_busy",
    ];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "round_robin" => Some(Self::RoundRobin),
            "random" => Some(Self::Random),
            "global_least_request" => Some(Self::GlobalLeastRequest),
            "prefix_cache" => Some(Self::PrefixCache),
            "least_busy" => Some(Self::LeastBusy),
            _ => None,
        }
    }

    /// Whether the policy keeps state in a store (embedded or Redis).
    pub fn uses_store(self) -> bool {
        matches!(self, Self::GlobalLeastRequest | Self::PrefixCache)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::Random => "random",
            Self::GlobalLeastRequest => "global_least_request",
            Self::PrefixCache => "prefix_cache",
            Self::LeastBusy => "least_busy",
        }
    }
}

/// Read and validate the policy file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Config::from_yaml(&text)
}

impl Config {
    /// Parse and validate a policy file's text.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let file: PolicyFile =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Parse {
                path: match e.path().to_string().as_str() {
                    "." => "(top level)".to_string(),
                    p => p.to_string(),
                },
                message: e.inner().to_string(),
            })?;
        Config::from_file(file)
    }

    /// Validate the file types, collecting every issue.
    pub fn from_file(file: PolicyFile) -> Result<Config, ConfigError> {
        let mut v = Validator::default();
        let listen = file
            .listen
            .unwrap_or(OneOrMany::One(DEFAULT_LISTEN.to_string()))
            .into_vec()
            .iter()
            .enumerate()
            .filter_map(|(i, a)| v.socket_addr(&format!("listen[{i}]"), a))
            .collect::<Vec<_>>();
        if listen.is_empty() {
            v.issue("listen", "at least one address is required");
        }
        let admin = match file.admin.as_deref() {
            None => v.socket_addr("admin", DEFAULT_ADMIN),
            Some("off") | Some("none") => None,
            Some(a) => v.socket_addr("admin", a),
        };
        let max_body_bytes = file
            .max_body_bytes
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            v.issue("max_body_bytes", "must be greater than 0");
        }
        let body_timeout = v.millis(
            "body_timeout_ms",
            file.body_timeout_ms,
            DEFAULT_BODY_TIMEOUT.as_millis() as u64,
        );
        let max_header_bytes = file
            .max_header_bytes
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .unwrap_or(DEFAULT_MAX_HEADER_BYTES);
        if max_header_bytes < 1024 {
            v.issue("max_header_bytes", "must be at least 1024");
        }
        let max_attempts = file.max_attempts.unwrap_or(3);
        if max_attempts == 0 {
            v.issue("max_attempts", "must be at least 1");
        }
        let up = file.upstream.unwrap_or(file::UpstreamFile {
            connect_timeout_ms: None,
            read_timeout_ms: None,
            write_timeout_ms: None,
            idle_timeout_ms: None,
        });
        let upstream = UpstreamConfig {
            connect_timeout: v.millis("upstream.connect_timeout_ms", up.connect_timeout_ms, 1_000),
            read_timeout: v.millis("upstream.read_timeout_ms", up.read_timeout_ms, 600_000),
            write_timeout: v.millis("upstream.write_timeout_ms", up.write_timeout_ms, 60_000),
            idle_timeout: v.millis("upstream.idle_timeout_ms", up.idle_timeout_ms, 4_000),
        };
        let dns_refresh = v.millis(
            "dns_refresh_ms",
            file.dns_refresh_ms,
            DEFAULT_DNS_REFRESH.as_millis() as u64,
        );
        if file.pools.is_empty() {
            v.issue("pools", "at least one pool is required");
        }
        let mut pools = Vec::with_capacity(file.pools.len());
        for (i, p) in file.pools.into_iter().enumerate() {
            if let Some(pool) = v.pool(&format!("pools[{i}]"), p) {
                pools.push(pool);
            }
        }
        for (i, p) in pools.iter().enumerate() {
            if pools[..i].iter().any(|q| q.name == p.name) {
                v.issue(
                    &format!("pools[{i}].name"),
                    &format!("duplicate pool name '{}'", p.name),
                );
            }
        }
        if !v.issues.is_empty() {
            return Err(ConfigError::Invalid(v.issues));
        }
        Ok(Config {
            listen,
            admin,
            max_body_bytes,
            body_timeout,
            max_header_bytes,
            h2c: file.h2c.unwrap_or(true),
            max_attempts,
            expose_endpoint_header: file.expose_endpoint_header.unwrap_or(false),
            upstream,
            dns_refresh,
            pools,
            warnings: v.warnings,
        })
    }

    /// The pool for a request: the first pool serving `model`; a request without a model goes to
    /// the first pool that serves `"*"`, else the first pool.
    pub fn pool_index(&self, model: Option<&str>) -> Option<usize> {
        match model {
            Some(m) => self.pools.iter().position(|p| p.serves(m)),
            None => self
                .pools
                .iter()
                .position(|p| p.models.iter().any(|m| m == "*"))
                .or(if self.pools.is_empty() { None } else { Some(0) }),
        }
    }
}

#[derive(Default)]
struct Validator {
    issues: Vec<Issue>,
    warnings: Vec<Issue>,
}

impl Validator {
    fn issue(&mut self, path: &str, message: &str) {
        self.issues.push(Issue {
            path: path.to_string(),
            message: message.to_string(),
        });
    }

    fn warn(&mut self, path: &str, message: &str) {
        self.warnings.push(Issue {
            path: path.to_string(),
            message: message.to_string(),
        });
    }

    fn socket_addr(&mut self, path: &str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.issue(path, &format!("'{value}' is not an IP:port address"));
                None
            }
        }
    }

    fn millis(&mut self, path: &str, value: Option<u64>, default: u64) -> Duration {
        let ms = value.unwrap_or(default);
        if ms == 0 {
            self.issue(path, "must be greater than 0");
        }
        Duration::from_millis(ms)
    }

    fn pool(&mut self, path: &str, p: PoolFile) -> Option<PoolConfig> {
        let before = self.issues.len();
        if p.name.is_empty()
            || p.name.contains(['{', '}', '|'])
            || p.name.chars().any(char::is_whitespace)
        {
            self.issue(
                &format!("{path}.name"),
                "must be non-empty, without braces, '|' or whitespace (it names state-store keys)",
            );
        }
        if p.models.is_empty() {
            self.issue(
                &format!("{path}.models"),
                "list at least one model (or \"*\")",
            );
        }
        if p.endpoints.is_empty() {
            self.issue(&format!("{path}.endpoints"), "list at least one endpoint");
        }
        let mut endpoints: Vec<EndpointSpec> = Vec::new();
        for (j, e) in p.endpoints.iter().enumerate() {
            let epath = format!("{path}.endpoints[{j}]");
            let (address, weight) = match e {
                EndpointFile::Address(a) => (a.as_str(), 1),
                EndpointFile::Detailed(d) => (d.address.as_str(), d.weight.unwrap_or(1)),
            };
            if !(1..=MAX_WEIGHT).contains(&weight) {
                self.issue(
                    &format!("{epath}.weight"),
                    &format!("must be between 1 and {MAX_WEIGHT}"),
                );
            }
            match Address::parse(address) {
                Ok(address) if endpoints.iter().any(|x| x.address == address) => {
                    self.issue(&epath, &format!("duplicate endpoint {address}"));
                }
                Ok(address) => endpoints.push(EndpointSpec { address, weight }),
                Err(e) => self.issue(&epath, &e),
            }
        }
        let health_check = match p.health_check {
            Some(h) if h.enabled == Some(false) => None,
            h => {
                let h = h.unwrap_or(file::HealthCheckFile {
                    enabled: None,
                    path: None,
                    interval_ms: None,
                    timeout_ms: None,
                    healthy_threshold: None,
                    unhealthy_threshold: None,
                });
                let hpath = format!("{path}.health_check");
                let check_path = h.path.unwrap_or_else(|| "/health".to_string());
                if !check_path.starts_with('/') {
                    self.issue(&format!("{hpath}.path"), "must start with '/'");
                }
                let healthy_threshold = h.healthy_threshold.unwrap_or(1);
                let unhealthy_threshold = h.unhealthy_threshold.unwrap_or(2);
                if healthy_threshold == 0 {
                    self.issue(&format!("{hpath}.healthy_threshold"), "must be at least 1");
                }
                if unhealthy_threshold == 0 {
                    self.issue(
                        &format!("{hpath}.unhealthy_threshold"),
                        "must be at least 1",
                    );
                }
                Some(HealthCheckConfig {
                    path: check_path,
                    interval: self.millis(&format!("{hpath}.interval_ms"), h.interval_ms, 1_000),
                    timeout: self.millis(&format!("{hpath}.timeout_ms"), h.timeout_ms, 500),
                    healthy_threshold,
                    unhealthy_threshold,
                })
            }
        };
        let metrics = {
            let m = p.metrics.unwrap_or(file::MetricsFile {
                path: None,
                interval_ms: None,
            });
            let mpath = m.path.unwrap_or_else(|| "/metrics".to_string());
            if !mpath.starts_with('/') {
                self.issue(&format!("{path}.metrics.path"), "must start with '/'");
            }
            MetricsConfig {
                path: mpath,
                interval: self.millis(&format!("{path}.metrics.interval_ms"), m.interval_ms, 200),
            }
        };
        let policy = PolicyKind::parse(&p.lb_policy);
        if policy.is_none() {
            self.issue(
                &format!("{path}.lb_policy"),
                &format!(
                    "unknown policy '{}' (supported: {})",
                    p.lb_policy,
                    PolicyKind::NAMES.join(", ")
                ),
            );
        }
        let lb_config = p.lb_config.unwrap_or_default();
        let lb_path = format!("{path}.lb_config");
        let mut store = None;
        let mut prefix = None;
        let mut least_busy = None;
        if let Some(kind) = policy {
            if kind == PolicyKind::PrefixCache {
                prefix = self.prefix(&lb_path, &lb_config);
            }
            self.ignored_lb_keys(&lb_path, kind, &lb_config);
            if kind.uses_store() {
                store = match RedisConfig::from_lb_config(&lb_config) {
                    Ok(Some(redis)) => Some(StoreConfig::Redis(Box::new(redis))),
                    Ok(None) => Some(StoreConfig::Embedded),
                    Err(StoreConfigError::Invalid { key, reason }) => {
                        self.issue(&format!("{lb_path}.{key}"), &reason);
                        None
                    }
                };
            }
            if kind == PolicyKind::LeastBusy {
                match LeastBusyConfig::from_lb_config(&lb_config) {
                    Ok(c) => least_busy = Some(c),
                    Err(invalid) => {
                        for i in invalid {
                            self.issue(&format!("{lb_path}.{}", i.key), &i.reason);
                        }
                    }
                }
            }
        }
        let outlier =
            OutlierConfig::from_file(p.outlier_detection.as_ref()).unwrap_or_else(|bad| {
                for i in bad {
                    self.issue(&format!("{path}.outlier_detection.{}", i.key), &i.reason);
                }
                None
            });
        if self.issues.len() > before {
            return None;
        }
        Some(PoolConfig {
            name: p.name,
            models: p.models,
            endpoints,
            health_check,
            metrics,
            policy: policy?,
            max_inflight: lb_config.maxRequestCount.filter(|n| *n > 0),
            lb_config,
            store,
            prefix,
            least_busy,
            outlier,
        })
    }

    /// `prefix_cache`'s keys: `redisKeyTTL` (s; 0 or absent → the default, as in Higress) and the
    /// load guard.
    fn prefix(&mut self, path: &str, c: &LbConfigFile) -> Option<PrefixSettings> {
        let defaults = PrefixSettings::default();
        let ttl = match c.redisKeyTTL {
            None | Some(0) => defaults.ttl,
            Some(s) if s < 0 => {
                self.issue(
                    &format!("{path}.redisKeyTTL"),
                    "must be a positive number of seconds (0 means the default, 1800)",
                );
                return None;
            }
            Some(s) => Duration::from_secs(s.unsigned_abs()),
        };
        let per_mille = match c.loadGuardRelative {
            None => defaults.guard.per_mille,
            Some(r) if r.is_finite() && (0.0..=1000.0).contains(&r) => (r * 1000.0).round() as u64,
            Some(_) => {
                self.issue(
                    &format!("{path}.loadGuardRelative"),
                    "must be a number from 0 to 1000 (a fraction of the least loaded endpoint's count)",
                );
                return None;
            }
        };
        Some(PrefixSettings {
            ttl,
            guard: LoadGuard {
                absolute: c.loadGuardAbsolute.unwrap_or(defaults.guard.absolute),
                per_mille,
            },
        })
    }

    /// Warn about `lb_config` keys that the chosen policy (or store) does not use.
    fn ignored_lb_keys(&mut self, path: &str, kind: PolicyKind, c: &LbConfigFile) {
        let redis = c.serviceFQDN.is_some();
        // (key, present, used by this policy, why not)
        let store = kind.uses_store();
        let redis_only = "ignored: only used with a Redis store (serviceFQDN)";
        let prefix = kind == PolicyKind::PrefixCache;
        let least_busy = kind == PolicyKind::LeastBusy;
        let set: [(&str, bool, bool, &str); 23] = [
            ("serviceFQDN", redis, store, ""),
            (
                "servicePort",
                c.servicePort.is_some(),
                store && redis,
                redis_only,
            ),
            ("username", c.username.is_some(), store && redis, redis_only),
            ("password", c.password.is_some(), store && redis, redis_only),
            ("timeout", c.timeout.is_some(), store && redis, redis_only),
            ("database", c.database.is_some(), store && redis, redis_only),
            (
                "keyPrefix",
                c.keyPrefix.is_some(),
                store && redis,
                redis_only,
            ),
            (
                "replicaTimeout",
                c.replicaTimeout.is_some(),
                store && redis,
                redis_only,
            ),
            ("tls", c.tls.is_some(), store && redis, redis_only),
            (
                "tlsCaFile",
                c.tlsCaFile.is_some(),
                store && redis,
                redis_only,
            ),
            (
                "tlsCertFile",
                c.tlsCertFile.is_some(),
                store && redis,
                redis_only,
            ),
            (
                "tlsKeyFile",
                c.tlsKeyFile.is_some(),
                store && redis,
                redis_only,
            ),
            ("redisKeyTTL", c.redisKeyTTL.is_some(), prefix, ""),
            (
                "loadGuardAbsolute",
                c.loadGuardAbsolute.is_some(),
                prefix,
                "",
            ),
            (
                "loadGuardRelative",
                c.loadGuardRelative.is_some(),
                prefix,
                "",
            ),
            ("maxRequestCount", c.maxRequestCount.is_some(), store, ""),
            ("criticalModels", c.criticalModels.is_some(), least_busy, ""),
            (
                "queueThresholdCritical",
                c.queueThresholdCritical.is_some(),
                least_busy,
                "",
            ),
            (
                "kvCacheThreshold",
                c.kvCacheThreshold.is_some(),
                least_busy,
                "",
            ),
            (
                "queueingThresholdLoRA",
                c.queueingThresholdLoRA.is_some(),
                least_busy,
                "",
            ),
            (
                "loraAffinityThreshold",
                c.loraAffinityThreshold.is_some(),
                least_busy,
                "",
            ),
            ("cleanInterval", c.cleanInterval.is_some(), false, ""),
            ("enableDetailLog", c.enableDetailLog.is_some(), false, ""),
        ];
        for (key, present, used, why) in set {
            if present && !used {
                let message = if why.is_empty() || !store {
                    format!("ignored: not used by lb_policy {}", kind.name())
                } else {
                    why.to_owned()
                };
                self.warn(&format!("{path}.{key}"), &message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_text(yaml: &str) -> String {
        match Config::from_yaml(yaml) {
            Ok(_) => panic!("expected an error for:\n{yaml}"),
            Err(e) => e.to_string(),
        }
    }

    const MIN: &str = "pools:\n  - name: p\n    models: ['*']\n    endpoints: ['127.0.0.1:8001']\n    lb_policy: round_robin\n";

    #[test]
    fn minimal_file_gets_defaults() {
        let c = Config::from_yaml(MIN).expect("valid");
        assert_eq!(c.listen, vec!["0.0.0.0:8080".parse().expect("addr")]);
        assert_eq!(c.admin, Some("127.0.0.1:9091".parse().expect("addr")));
        assert_eq!(c.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(c.body_timeout, DEFAULT_BODY_TIMEOUT);
        assert_eq!(c.max_header_bytes, DEFAULT_MAX_HEADER_BYTES);
        assert_eq!(c.max_attempts, 3);
        let p = &c.pools[0];
        assert_eq!(p.policy, PolicyKind::RoundRobin);
        let hc = p.health_check.as_ref().expect("on by default");
        assert_eq!(hc.path, "/health");
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let t = err_text(&MIN.replace("lb_policy", "lb_polcy"));
        assert!(t.contains("pools[0]") && t.contains("lb_polcy"), "{t}");
        let t = err_text(&format!("{MIN}    health_check: {{pathh: /x}}\n"));
        assert!(
            t.contains("pools[0].health_check") && t.contains("pathh"),
            "{t}"
        );
        let t = err_text(&format!("{MIN}    outlier_detection: {{consecutive: 3}}\n"));
        assert!(
            t.contains("pools[0].outlier_detection") && t.contains("consecutive"),
            "{t}"
        );
    }

    #[test]
    fn outlier_detection_is_on_by_default_and_validated() {
        let c = Config::from_yaml(MIN).expect("valid");
        assert_eq!(
            c.pools[0].outlier,
            Some(crate::outlier::OutlierConfig::default())
        );
        let off = format!("{MIN}    outlier_detection: {{enabled: false}}\n");
        assert_eq!(
            Config::from_yaml(&off).expect("valid").pools[0].outlier,
            None
        );
        let t = err_text(&format!(
            "{MIN}    outlier_detection: {{consecutive_failures: 0}}\n"
        ));
        assert!(
            t.contains("pools[0].outlier_detection.consecutive_failures"),
            "{t}"
        );
    }

    #[test]
    fn invalid_values_are_named() {
        let t = err_text(&MIN.replace("round_robin", "fastest"));
        assert!(
            t.contains("pools[0].lb_policy: unknown policy 'fastest'"),
            "{t}"
        );
        let t = err_text(&MIN.replace("127.0.0.1:8001", "127.0.0.1"));
        assert!(t.contains("pools[0].endpoints[0]"), "{t}");
        let t = err_text(&format!("admin: nowhere\n{MIN}"));
        assert!(t.starts_with("admin: "), "{t}");
        for weight in [0, MAX_WEIGHT + 1, usize::MAX] {
            let t = err_text(&MIN.replace(
                "'127.0.0.1:8001'",
                &format!("{{address: '127.0.0.1:8001', weight: {weight}}}"),
            ));
            assert!(
                t.contains("pools[0].endpoints[0].weight: must be between 1 and 1000"),
                "{weight}: {t}"
            );
        }
    }

    #[test]
    fn higress_keys_are_accepted_and_unused_ones_warned() {
        let c = Config::from_yaml(&format!(
            "{MIN}    lb_config: {{serviceFQDN: redis.static, servicePort: 6379, timeout: 50, redisKeyTTL: 60}}\n"
        ))
        .expect("valid");
        let w: Vec<String> = c.warnings.iter().map(|i| i.path.clone()).collect();
        assert!(
            w.contains(&"pools[0].lb_config.serviceFQDN".to_string()),
            "{w:?}"
        );
        let t = err_text(&format!("{MIN}    lb_config: {{redisHost: x}}\n"));
        assert!(
            t.contains("pools[0].lb_config") && t.contains("redisHost"),
            "{t}"
        );
    }

    #[test]
    fn store_policies_get_a_store() {
        let glr = MIN.replace("round_robin", "global_least_request");
        let c = Config::from_yaml(&glr).expect("valid");
        assert!(matches!(c.pools[0].store, Some(StoreConfig::Embedded)));
        assert_eq!(c.pools[0].max_inflight, None);
        let c = Config::from_yaml(&format!(
            "{glr}    lb_config: {{serviceFQDN: 10.0.0.9, timeout: 20, maxRequestCount: 8, redisKeyTTL: 60, keyPrefix: t1, replicaTimeout: 3000}}\n"
        ))
        .expect("valid");
        let Some(StoreConfig::Redis(r)) = &c.pools[0].store else {
            panic!("redis store expected: {:?}", c.pools[0].store);
        };
        assert_eq!(r.timeout(), Duration::from_millis(20));
        assert_eq!(c.pools[0].max_inflight, Some(8));
        let w: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("pools[0].lb_config.redisKeyTTL"), "{w:?}");
        // Redis-only keys without Redis are pointed out; maxRequestCount 0 means no cap.
        let c = Config::from_yaml(&format!(
            "{glr}    lb_config: {{timeout: 20, maxRequestCount: 0}}\n"
        ))
        .expect("valid");
        assert_eq!(c.pools[0].max_inflight, None);
        assert!(
            c.warnings[0].message.contains("serviceFQDN"),
            "{:?}",
            c.warnings
        );
        // Stateless policies have no store.
        assert!(Config::from_yaml(MIN).expect("valid").pools[0]
            .store
            .is_none());
    }

    #[test]
    fn prefix_cache_keys() {
        let pc = MIN.replace("round_robin", "prefix_cache");
        let c = Config::from_yaml(&pc).expect("valid");
        let p = &c.pools[0];
        assert!(matches!(p.store, Some(StoreConfig::Embedded)));
        assert_eq!(p.prefix, Some(PrefixSettings::default()));
        assert_eq!(
            PrefixSettings::default().ttl,
            Duration::from_secs(1800),
            "Higress's default"
        );
        let with = |keys: &str| Config::from_yaml(&format!("{pc}    lb_config: {{{keys}}}\n"));
        let c =
            with("redisKeyTTL: 0, loadGuardAbsolute: 8, loadGuardRelative: 1.25").expect("valid");
        let p = c.pools[0].prefix.expect("prefix settings");
        assert_eq!(p.ttl, Duration::from_secs(1800), "0 means the default");
        assert_eq!((p.guard.absolute, p.guard.per_mille), (8, 1250));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = with("redisKeyTTL: 60, serviceFQDN: 10.0.0.9").expect("valid");
        assert_eq!(
            c.pools[0].prefix.expect("prefix").ttl,
            Duration::from_secs(60)
        );
        assert!(matches!(c.pools[0].store, Some(StoreConfig::Redis(_))));
        for (keys, path) in [
            ("redisKeyTTL: -5", "pools[0].lb_config.redisKeyTTL: "),
            (
                "loadGuardRelative: -1",
                "pools[0].lb_config.loadGuardRelative: ",
            ),
            (
                "loadGuardRelative: .nan",
                "pools[0].lb_config.loadGuardRelative: ",
            ),
        ] {
            match with(keys) {
                Err(e) => assert!(e.to_string().starts_with(path), "{keys}: {e}"),
                Ok(_) => panic!("{keys} accepted"),
            }
        }
        // The guard keys mean nothing to other policies.
        let c = Config::from_yaml(&format!("{MIN}    lb_config: {{loadGuardAbsolute: 2}}\n"))
            .expect("valid");
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.pools[0].prefix.is_none());
    }

    #[test]
    fn least_busy_reads_its_keys_and_names_bad_ones() {
        let lb = MIN.replace("round_robin", "least_busy");
        let c = Config::from_yaml(&format!(
            "{lb}    metrics: {{interval_ms: 100}}\n    lb_config: {{criticalModels: [m], kvCacheThreshold: 0.5, serviceFQDN: r}}\n"
        ))
        .expect("valid");
        let p = &c.pools[0];
        assert_eq!(p.policy, PolicyKind::LeastBusy);
        assert!(p.store.is_none());
        let lbc = p.least_busy.as_ref().expect("least_busy settings");
        assert_eq!(lbc.critical_models, vec!["m"]);
        assert_eq!(lbc.thresholds.kv_cache, 0.5);
        assert_eq!(p.metrics.interval, Duration::from_millis(100));
        let w: Vec<String> = c.warnings.iter().map(|i| i.path.clone()).collect();
        assert_eq!(w, vec!["pools[0].lb_config.serviceFQDN"]);
        let t = err_text(&format!(
            "{lb}    lb_config: {{kvCacheThreshold: 2, loraAffinityThreshold: 1.5}}\n"
        ));
        assert!(t.contains("pools[0].lb_config.kvCacheThreshold"), "{t}");
        assert!(
            t.contains("pools[0].lb_config.loraAffinityThreshold"),
            "{t}"
        );
        // The keys are least_busy's only.
        let c = Config::from_yaml(&format!(
            "{MIN}    lb_config: {{criticalModels: [m], queueingThresholdLoRA: 9}}\n"
        ))
        .expect("valid");
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(c.pools[0].least_busy.is_none());
    }

    #[test]
    fn weights_lists_and_routing() {
        let c = Config::from_yaml(
            "listen: ['127.0.0.1:1', '127.0.0.1:2']\nadmin: off\npools:\n  - name: a\n    models: [m1]\n    endpoints: ['127.0.0.1:1', {address: '127.0.0.1:2', weight: 3}]\n    lb_policy: random\n  - name: b\n    models: ['*']\n    endpoints: ['127.0.0.1:3']\n    health_check: {enabled: false}\n    lb_policy: round_robin\n",
        )
        .expect("valid");
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.admin, None);
        assert_eq!(c.pools[0].endpoints[1].weight, 3);
        assert!(c.pools[1].health_check.is_none());
        assert_eq!(c.pool_index(Some("m1")), Some(0));
        assert_eq!(c.pool_index(Some("other")), Some(1));
        assert_eq!(c.pool_index(None), Some(1));
    }

    #[test]
    fn duplicates_are_rejected() {
        let t =
            err_text(&MIN.replace("['127.0.0.1:8001']", "['127.0.0.1:8001', '127.0.0.1:8001']"));
        assert!(t.contains("duplicate endpoint"), "{t}");
    }
}
