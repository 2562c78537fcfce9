//! Validation: the file types turned into [`Config`], every issue collected with its field path.

use std::net::SocketAddr;
use std::time::Duration;

use super::file::{self, EndpointFile, LbConfigFile, OneOrMany, PolicyFile, PoolFile};
use super::{
    key_users, kv_events_address, Address, AdmissionConfig, Config, ConfigError, CustomPolicy,
    EndpointSpec, HealthCheckConfig, InvalidKey, Issue, KeyUse, MetricsConfig, OutlierConfig,
    PolicyKind, PolicySettings, PoolConfig, SessionConfig, TracingConfig, UpstreamConfig,
    DEFAULT_ADMIN, DEFAULT_BODY_TIMEOUT, DEFAULT_DNS_REFRESH, DEFAULT_LISTEN,
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_HEADER_BYTES, MAX_WEIGHT,
};

/// Collects issues and warnings while the file is checked.
pub(super) struct Validator<'a> {
    issues: Vec<Issue>,
    warnings: Vec<Issue>,
    /// `lb_policy` names registered from outside the crate.
    custom: &'a [&'a str],
}

impl<'a> Validator<'a> {
    pub(super) fn new(custom: &'a [&'a str]) -> Self {
        Validator {
            issues: Vec::new(),
            warnings: Vec::new(),
            custom,
        }
    }

    /// Validate the file types, collecting every issue.
    pub(super) fn config(mut self, file: PolicyFile) -> Result<Config, ConfigError> {
        let v = &mut self;
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
        let tracing = file.tracing.and_then(|t| v.tracing(t));
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
            return Err(ConfigError::Invalid(self.issues));
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
            tracing,
            pools,
            warnings: self.warnings,
        })
    }

    fn tracing(&mut self, t: file::TracingFile) -> Option<TracingConfig> {
        let mut ok = true;
        match t.otlp_endpoint.strip_prefix("http://") {
            Some(rest) if !rest.is_empty() => {}
            _ => {
                ok = false;
                self.issue(
                    "tracing.otlp_endpoint",
                    "must be an http:// URL of an OTLP/HTTP collector, e.g. http://127.0.0.1:4318/v1/traces (https is not supported: run the collector next to llm-lb)",
                );
            }
        }
        let sample_ratio = t.sample_ratio.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_ratio) {
            ok = false;
            self.issue("tracing.sample_ratio", "must be between 0 and 1");
        }
        let service_name = t.service_name.unwrap_or_else(|| "llm-lb".to_string());
        if service_name.trim().is_empty() {
            ok = false;
            self.issue("tracing.service_name", "must not be empty");
        }
        ok.then_some(TracingConfig {
            otlp_endpoint: t.otlp_endpoint,
            service_name,
            sample_ratio,
        })
    }

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
            let (address, weight, kv_events, kv_events_replay) = match e {
                EndpointFile::Address(a) => (a.as_str(), 1, None, None),
                EndpointFile::Detailed(d) => (
                    d.address.as_str(),
                    d.weight.unwrap_or(1),
                    d.kv_events.clone(),
                    d.kv_events_replay.clone(),
                ),
            };
            for (key, url) in [
                ("kv_events", &kv_events),
                ("kv_events_replay", &kv_events_replay),
            ] {
                if let Some(Err(e)) = url.as_deref().map(kv_events_address) {
                    self.issue(&format!("{epath}.{key}"), &e);
                }
            }
            if kv_events.is_none() && kv_events_replay.is_some() {
                self.issue(
                    &format!("{epath}.kv_events_replay"),
                    "needs kv_events (the stream it replays)",
                );
            }
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
                Ok(address) => endpoints.push(EndpointSpec {
                    address,
                    weight,
                    kv_events,
                    kv_events_replay,
                }),
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
        let critical_models: Vec<String> = p
            .lb_config
            .as_ref()
            .and_then(|c| c.get("criticalModels"))
            .and_then(|m| m.as_sequence())
            .map(|m| {
                m.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let admission = AdmissionConfig::from_file(p.admission.as_ref(), critical_models)
            .unwrap_or_else(|bad| {
                self.invalid_keys(&format!("{path}.admission"), bad);
                None
            });
        let policy = self.policy(path, &p.lb_policy, p.lb_config);
        if admission.is_some() {
            // The waiting room reads criticalModels whatever the policy.
            let used = format!("{path}.lb_config.criticalModels");
            self.warnings.retain(|w| w.path != used);
        }
        let outlier =
            OutlierConfig::from_file(p.outlier_detection.as_ref()).unwrap_or_else(|bad| {
                self.invalid_keys(&format!("{path}.outlier_detection"), bad);
                None
            });
        let imposed = policy.as_ref().and_then(PolicySettings::session);
        let session = match imposed {
            // endpoint_hash: the session is its hash_header, nothing else.
            Some(imposed) => {
                if p.session_affinity.is_some() {
                    self.issue(
                        &format!("{path}.session_affinity"),
                        "not with lb_policy endpoint_hash: its key is the header named by \
                         lb_config.hash_header (default x-mse-consumer); remove session_affinity",
                    );
                }
                Some(imposed)
            }
            None => SessionConfig::from_file(p.session_affinity.as_ref()).unwrap_or_else(|bad| {
                self.invalid_keys(&format!("{path}.session_affinity"), bad);
                None
            }),
        };
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
            outlier,
            session,
            admission,
        })
    }

    /// `lb_policy` and its `lb_config`: a built-in policy's settings, or a registered custom
    /// policy with its `lb_config` as written.
    fn policy(
        &mut self,
        path: &str,
        name: &str,
        lb_config: Option<serde_yaml::Value>,
    ) -> Option<PolicySettings> {
        let lb_path = format!("{path}.lb_config");
        let Some(kind) = PolicyKind::parse(name) else {
            if self.custom.contains(&name) {
                return Some(PolicySettings::Custom(CustomPolicy {
                    name: name.to_owned(),
                    lb_config: lb_config.unwrap_or_default(),
                }));
            }
            let names: Vec<&str> = PolicyKind::ALL
                .iter()
                .map(|k| k.name())
                .chain(self.custom.iter().copied())
                .collect();
            self.issue(
                &format!("{path}.lb_policy"),
                &format!("unknown policy '{name}' (supported: {})", names.join(", ")),
            );
            return None;
        };
        let lb_config: LbConfigFile = match lb_config {
            None => LbConfigFile::default(),
            Some(value) => match serde_path_to_error::deserialize(value) {
                Ok(c) => c,
                Err(e) => {
                    let at = match e.path().to_string().as_str() {
                        "." => lb_path.clone(),
                        p => format!("{lb_path}.{p}"),
                    };
                    self.issue(&at, &e.inner().to_string());
                    return None;
                }
            },
        };
        self.ignored_lb_keys(&lb_path, kind, &lb_config);
        PolicySettings::from_lb_config(kind, &lb_config)
            .map_err(|bad| self.invalid_keys(&lb_path, bad))
            .ok()
    }

    /// File each invalid key under `path`.
    fn invalid_keys(&mut self, path: &str, bad: Vec<InvalidKey>) {
        for i in bad {
            self.issue(&format!("{path}.{}", i.key), &i.reason);
        }
    }

    /// Warn about `lb_config` keys that the chosen policy (or store) does not use.
    fn ignored_lb_keys(&mut self, path: &str, kind: PolicyKind, c: &LbConfigFile) {
        let redis = c.serviceFQDN.is_some();
        for (key, present, users) in key_users(c) {
            if present && !users.used_by(kind, redis) {
                let message = if users == KeyUse::Redis && kind.uses_store() {
                    "ignored: only used with a Redis store (serviceFQDN)".to_owned()
                } else {
                    format!("ignored: not used by lb_policy {}", kind.name())
                };
                self.warn(&format!("{path}.{key}"), &message);
            }
        }
    }
}
