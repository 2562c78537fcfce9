//! The policies a pool may name (`lb_policy`) and their validated settings, and which `lb_config`
//! key each of them reads.
//!
//! One source of truth: a built-in policy is one line of [`policy_kinds!`]; every other place
//! that must know it (its settings in [`PolicySettings::from_lb_config`], whether it keeps shared
//! counts in [`PolicyKind::uses_store`], the keys it reads in [`key_users`], its constructor in
//! `policy::build`) is an exhaustive `match` the compiler checks. A new `lb_config` key is a new
//! field of [`LbConfigFile`], which [`key_users`] destructures exhaustively, so it does not
//! compile until it says which policies read it.

use std::time::Duration;

use super::endpoint_hash::EndpointHashConfig;
use super::endpoint_metrics::EndpointMetricsConfig;
use super::error::InvalidKey;
use super::file::LbConfigFile;
use super::kv_aware::KvAwareSettings;
use super::latency_aware::LatencyAwareConfig;
use super::least_busy::LeastBusyConfig;
use super::prefix::PrefixSettings;
use super::redis::RedisConfig;
use super::session::SessionConfig;

/// Declares [`PolicyKind`] with its `lb_policy` names: one line per built-in policy.
macro_rules! policy_kinds {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, )*) => {
        /// The built-in load-balancing policies (`lb_policy`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum PolicyKind {
            $( $(#[$doc])* $variant, )*
        }

        impl PolicyKind {
            /// Every built-in policy.
            pub const ALL: &'static [PolicyKind] = &[$(PolicyKind::$variant),*];

            /// The `lb_policy` name.
            pub const fn name(self) -> &'static str {
                match self {
                    $(PolicyKind::$variant => $name,)*
                }
            }
        }
    };
}

policy_kinds! {
    /// Weighted round robin over healthy endpoints.
    RoundRobin = "round_robin",
    /// Weighted random.
    Random = "random",
    /// Fewest requests in flight over every gateway replica (shared through the store).
    GlobalLeastRequest = "global_least_request",
    /// Prefix affinity (Higress `prefix_cache`) with a load guard, over the store.
    PrefixCache = "prefix_cache",
    /// The engines' own metrics through the Inference Extension's filter tree.
    LeastBusy = "least_busy",
    /// The least expected time to first token: uncached prompt tokens (from the engines' KV
    /// events, or predicted) plus tokens in flight, shared through the store.
    KvAware = "kv_aware",
    /// Higress 2.x `endpoint_metrics`: the filter tree, or the least or most of any scraped
    /// gauge, with a cap on each endpoint's share of recent picks.
    EndpointMetrics = "endpoint_metrics",
    /// Higress 2.x `cluster_metrics`: the endpoint with the best smoothed time to first token and
    /// total time, weighed by its requests in flight and its errors; failing endpoints cool down.
    LatencyAware = "latency_aware",
    /// Higress 2.x `endpoint_hash`: a request naming a key in a header (`hash_header`) is pinned
    /// to the endpoint the key was bound to in the store; the least loaded binds a new key.
    EndpointHash = "endpoint_hash",
}

impl PolicyKind {
    /// The built-in policy named `name` (Higress's alias `metrics_based` is `endpoint_metrics`,
    /// `cluster_metrics` is `latency_aware`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "metrics_based" => return Some(Self::EndpointMetrics),
            "cluster_metrics" => return Some(Self::LatencyAware),
            _ => {}
        }
        Self::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// Whether the policy keeps state in a store (embedded or Redis).
    pub const fn uses_store(self) -> bool {
        match self {
            // latency_aware: with global_inflight_enabled.
            Self::GlobalLeastRequest
            | Self::PrefixCache
            | Self::KvAware
            | Self::EndpointHash
            | Self::LatencyAware => true,
            Self::RoundRobin | Self::Random | Self::LeastBusy | Self::EndpointMetrics => false,
        }
    }
}

/// The state store a pool's policy uses.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreConfig {
    /// In-process (no Redis keys in `lb_config`): correct for a single gateway replica.
    Embedded,
    /// Redis or Redis Cluster, shared by every replica configured with it.
    Redis(Box<RedisConfig>),
}

/// Settings of the policies that count requests in flight in a store.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedCounts {
    /// Where the counts live.
    pub store: StoreConfig,
    /// `maxRequestCount`: refuse with 429 when every endpoint has this many in flight.
    pub max_inflight: Option<u64>,
}

impl SharedCounts {
    /// `serviceFQDN` and the other Redis keys (embedded store without them), `maxRequestCount`.
    pub fn from_lb_config(c: &LbConfigFile) -> Result<Self, Vec<InvalidKey>> {
        let store = match RedisConfig::from_lb_config(c).map_err(|e| vec![e])? {
            Some(redis) => StoreConfig::Redis(Box::new(redis)),
            None => StoreConfig::Embedded,
        };
        Ok(SharedCounts {
            store,
            max_inflight: c.maxRequestCount.filter(|n| *n > 0),
        })
    }
}

/// `latency_aware`'s shared in-flight counts: with `global_inflight_enabled`, in the Redis that
/// Higress's keys name (required), with `global_inflight_timeout` as the call timeout and
/// `global_inflight_key_prefix` as the key namespace unless `timeout` / `keyPrefix` are given.
fn global_inflight(c: &LbConfigFile) -> Result<Option<SharedCounts>, Vec<InvalidKey>> {
    let mut bad = Vec::new();
    for (key, value) in [
        ("global_inflight_timeout", c.global_inflight_timeout),
        ("global_inflight_key_ttl", c.global_inflight_key_ttl),
    ] {
        if value.is_some_and(|v| v < 0) {
            bad.push(InvalidKey::new(key, "must be 0 or more"));
        }
    }
    if c.global_inflight_enabled != Some(true) || !bad.is_empty() {
        return if bad.is_empty() { Ok(None) } else { Err(bad) };
    }
    let mut shared = SharedCounts::from_lb_config(c)?;
    let StoreConfig::Redis(redis) = &mut shared.store else {
        return Err(vec![InvalidKey::new(
            "global_inflight_enabled",
            "needs the Redis the counts are shared in: serviceFQDN (and servicePort, username, \
             password, …) as in Higress",
        )]);
    };
    let timeout = c
        .global_inflight_timeout
        .filter(|ms| *ms > 0 && c.timeout.is_none());
    if let Some(ms) = timeout.and_then(|ms| u64::try_from(ms).ok()) {
        **redis = (**redis)
            .clone()
            .with_timeout(Duration::from_millis(ms))
            .map_err(|e| vec![e.rekey("global_inflight_timeout")])?;
    }
    if let Some(prefix) = c
        .global_inflight_key_prefix
        .as_deref()
        .filter(|_| c.keyPrefix.is_none())
    {
        **redis = (**redis)
            .clone()
            .with_namespace(prefix)
            .map_err(|e| vec![e.rekey("global_inflight_key_prefix")])?;
    }
    Ok(Some(shared))
}

/// A policy registered by the program embedding llm-lb (`policy::Registry`), with its pool's
/// `lb_config` as written (its own keys; the policy checks them).
#[derive(Debug, Clone, PartialEq)]
pub struct CustomPolicy {
    /// The `lb_policy` name it was registered under.
    pub name: String,
    /// The pool's `lb_config` (`Null` when absent).
    pub lb_config: serde_yaml::Value,
}

/// A pool's validated policy and its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicySettings {
    /// `round_robin`.
    RoundRobin,
    /// `random`.
    Random,
    /// `global_least_request`.
    GlobalLeastRequest(SharedCounts),
    /// `prefix_cache`.
    PrefixCache(SharedCounts, PrefixSettings),
    /// `least_busy`.
    LeastBusy(LeastBusyConfig),
    /// `kv_aware`.
    KvAware(SharedCounts, KvAwareSettings),
    /// `endpoint_metrics`.
    EndpointMetrics(EndpointMetricsConfig),
    /// `latency_aware`.
    LatencyAware(Option<SharedCounts>, LatencyAwareConfig),
    /// `endpoint_hash`.
    EndpointHash(SharedCounts, EndpointHashConfig),
    /// A policy registered from outside the crate.
    Custom(CustomPolicy),
}

impl PolicySettings {
    /// Read and check what built-in policy `kind` takes from `lb_config`; every problem is
    /// reported.
    pub fn from_lb_config(kind: PolicyKind, c: &LbConfigFile) -> Result<Self, Vec<InvalidKey>> {
        Ok(match kind {
            PolicyKind::RoundRobin => Self::RoundRobin,
            PolicyKind::Random => Self::Random,
            PolicyKind::GlobalLeastRequest => {
                Self::GlobalLeastRequest(SharedCounts::from_lb_config(c)?)
            }
            PolicyKind::PrefixCache => {
                let (s, p) = both(
                    SharedCounts::from_lb_config(c),
                    PrefixSettings::from_lb_config(c),
                )?;
                Self::PrefixCache(s, p)
            }
            PolicyKind::LeastBusy => Self::LeastBusy(LeastBusyConfig::from_lb_config(c)?),
            PolicyKind::EndpointMetrics => {
                Self::EndpointMetrics(EndpointMetricsConfig::from_lb_config(c)?)
            }
            PolicyKind::LatencyAware => {
                Self::LatencyAware(global_inflight(c)?, LatencyAwareConfig::from_lb_config(c)?)
            }
            PolicyKind::EndpointHash => {
                let (s, h) = both(
                    SharedCounts::from_lb_config(c),
                    EndpointHashConfig::from_lb_config(c),
                )?;
                Self::EndpointHash(s, h)
            }
            PolicyKind::KvAware => {
                let (mut s, k) = both(
                    SharedCounts::from_lb_config(c),
                    KvAwareSettings::from_lb_config(c),
                )?;
                // Its counts are tokens: `maxRequestCount` does not apply.
                s.max_inflight = None;
                Self::KvAware(s, k)
            }
        })
    }

    /// The `lb_policy` name.
    pub fn name(&self) -> &str {
        match self {
            Self::Custom(c) => &c.name,
            other @ (Self::RoundRobin
            | Self::Random
            | Self::GlobalLeastRequest(_)
            | Self::PrefixCache(..)
            | Self::LeastBusy(_)
            | Self::KvAware(..)
            | Self::EndpointMetrics(_)
            | Self::LatencyAware(..)
            | Self::EndpointHash(..)) => other.kind().map_or("", PolicyKind::name),
        }
    }

    /// The built-in policy (`None` for a custom one).
    pub fn kind(&self) -> Option<PolicyKind> {
        Some(match self {
            Self::RoundRobin => PolicyKind::RoundRobin,
            Self::Random => PolicyKind::Random,
            Self::GlobalLeastRequest(_) => PolicyKind::GlobalLeastRequest,
            Self::PrefixCache(..) => PolicyKind::PrefixCache,
            Self::LeastBusy(_) => PolicyKind::LeastBusy,
            Self::KvAware(..) => PolicyKind::KvAware,
            Self::EndpointMetrics(_) => PolicyKind::EndpointMetrics,
            Self::LatencyAware(..) => PolicyKind::LatencyAware,
            Self::EndpointHash(..) => PolicyKind::EndpointHash,
            Self::Custom(_) => return None,
        })
    }

    /// The shared counts' settings, for policies that keep them.
    pub fn shared_counts(&self) -> Option<&SharedCounts> {
        match self {
            Self::GlobalLeastRequest(s)
            | Self::PrefixCache(s, _)
            | Self::KvAware(s, _)
            | Self::EndpointHash(s, _)
            | Self::LatencyAware(Some(s), _) => Some(s),
            Self::RoundRobin
            | Self::Random
            | Self::LeastBusy(_)
            | Self::EndpointMetrics(_)
            | Self::LatencyAware(None, _)
            | Self::Custom(_) => None,
        }
    }

    /// Where the policy keeps shared state (`None`: it keeps none).
    pub fn store(&self) -> Option<&StoreConfig> {
        self.shared_counts().map(|s| &s.store)
    }

    /// The session settings the policy imposes on its pool, whatever `session_affinity` says
    /// (`endpoint_hash`: its `hash_header` alone).
    pub fn session(&self) -> Option<SessionConfig> {
        match self {
            Self::EndpointHash(_, h) => Some(h.session()),
            Self::RoundRobin
            | Self::Random
            | Self::GlobalLeastRequest(_)
            | Self::PrefixCache(..)
            | Self::LeastBusy(_)
            | Self::KvAware(..)
            | Self::EndpointMetrics(_)
            | Self::LatencyAware(..)
            | Self::Custom(_) => None,
        }
    }
}

/// Who reads an `lb_config` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUse {
    /// Every policy that keeps shared counts.
    Store,
    /// Policies with shared counts, only when they are in Redis (`serviceFQDN`).
    Redis,
    /// These policies.
    Policies(&'static [PolicyKind]),
    /// Higress's knobs that mean nothing here (accepted, warned about).
    Nobody,
}

impl KeyUse {
    /// Whether a pool with `kind` (and Redis or not) reads the key.
    pub fn used_by(self, kind: PolicyKind, redis: bool) -> bool {
        match self {
            KeyUse::Store => kind.uses_store(),
            KeyUse::Redis => kind.uses_store() && redis,
            KeyUse::Policies(kinds) => kinds.contains(&kind),
            KeyUse::Nobody => false,
        }
    }
}

/// Both settings, or every problem of either.
fn both<A, B>(
    a: Result<A, Vec<InvalidKey>>,
    b: Result<B, Vec<InvalidKey>>,
) -> Result<(A, B), Vec<InvalidKey>> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (a, b) => Err([a.err(), b.err()].into_iter().flatten().flatten().collect()),
    }
}

/// Every `lb_config` key as `(name, present in c, who reads it)`.
pub fn key_users(c: &LbConfigFile) -> [(&'static str, bool, KeyUse); 55] {
    use KeyUse::{Nobody, Policies, Redis, Store};
    const KV: KeyUse = Policies(&[PolicyKind::KvAware]);
    // The lifetime and load guard of prefix, session and response keys.
    const SESSIONS: KeyUse = Policies(&[
        PolicyKind::PrefixCache,
        PolicyKind::KvAware,
        PolicyKind::LatencyAware,
    ]);
    const COUNTS_REQUESTS: KeyUse = Policies(&[
        PolicyKind::GlobalLeastRequest,
        PolicyKind::PrefixCache,
        PolicyKind::EndpointHash,
    ]);
    const HASH: KeyUse = Policies(&[PolicyKind::EndpointHash]);
    const LEAST_BUSY: KeyUse = Policies(&[PolicyKind::LeastBusy, PolicyKind::EndpointMetrics]);
    const METRICS: KeyUse = Policies(&[PolicyKind::EndpointMetrics]);
    const LATENCY: KeyUse = Policies(&[PolicyKind::LatencyAware]);
    // Exhaustive on purpose: a new key does not compile until it is listed here.
    let LbConfigFile {
        serviceFQDN,
        servicePort,
        username,
        password,
        timeout,
        database,
        redisKeyTTL,
        maxRequestCount,
        criticalModels,
        queueThresholdCritical,
        kvCacheThreshold,
        queueingThresholdLoRA,
        loraAffinityThreshold,
        keyPrefix,
        replicaTimeout,
        loadGuardAbsolute,
        loadGuardRelative,
        tls,
        tlsCaFile,
        tlsCertFile,
        tlsKeyFile,
        cleanInterval,
        enableDetailLog,
        tokenizer,
        blockSize,
        prefillWeight,
        loadWeight,
        decodeTokens,
        routedWeight,
        evictionWeight,
        queueWeight,
        tieTolerance,
        predictedTtlMs,
        kvIndexBlocks,
        kvEventsTopic,
        metric_policy,
        target_metric,
        rate_limit,
        mode,
        ewma_beta,
        p2c_choices,
        ttft_weight,
        total_latency_weight,
        error_penalty,
        failure_cooldown_ms,
        metrics_missing_policy,
        queue_size,
        global_inflight_enabled,
        global_inflight_key_prefix,
        global_inflight_timeout,
        global_inflight_key_ttl,
        service_list,
        cluster_header,
        hash_header,
        stickyTimeout,
    } = c;
    [
        ("serviceFQDN", serviceFQDN.is_some(), Store),
        ("servicePort", servicePort.is_some(), Redis),
        ("username", username.is_some(), Redis),
        ("password", password.is_some(), Redis),
        ("timeout", timeout.is_some(), Redis),
        ("database", database.is_some(), Redis),
        ("keyPrefix", keyPrefix.is_some(), Redis),
        ("replicaTimeout", replicaTimeout.is_some(), Redis),
        ("tls", tls.is_some(), Redis),
        ("tlsCaFile", tlsCaFile.is_some(), Redis),
        ("tlsCertFile", tlsCertFile.is_some(), Redis),
        ("tlsKeyFile", tlsKeyFile.is_some(), Redis),
        ("redisKeyTTL", redisKeyTTL.is_some(), SESSIONS),
        ("loadGuardAbsolute", loadGuardAbsolute.is_some(), SESSIONS),
        ("loadGuardRelative", loadGuardRelative.is_some(), SESSIONS),
        (
            "maxRequestCount",
            maxRequestCount.is_some(),
            COUNTS_REQUESTS,
        ),
        ("criticalModels", criticalModels.is_some(), LEAST_BUSY),
        (
            "queueThresholdCritical",
            queueThresholdCritical.is_some(),
            LEAST_BUSY,
        ),
        ("kvCacheThreshold", kvCacheThreshold.is_some(), LEAST_BUSY),
        (
            "queueingThresholdLoRA",
            queueingThresholdLoRA.is_some(),
            LEAST_BUSY,
        ),
        (
            "loraAffinityThreshold",
            loraAffinityThreshold.is_some(),
            LEAST_BUSY,
        ),
        ("cleanInterval", cleanInterval.is_some(), Nobody),
        ("enableDetailLog", enableDetailLog.is_some(), Nobody),
        ("tokenizer", tokenizer.is_some(), KV),
        ("blockSize", blockSize.is_some(), KV),
        ("prefillWeight", prefillWeight.is_some(), KV),
        ("loadWeight", loadWeight.is_some(), KV),
        ("decodeTokens", decodeTokens.is_some(), KV),
        ("routedWeight", routedWeight.is_some(), KV),
        ("evictionWeight", evictionWeight.is_some(), KV),
        ("queueWeight", queueWeight.is_some(), KV),
        ("tieTolerance", tieTolerance.is_some(), KV),
        ("predictedTtlMs", predictedTtlMs.is_some(), KV),
        ("kvIndexBlocks", kvIndexBlocks.is_some(), KV),
        ("kvEventsTopic", kvEventsTopic.is_some(), KV),
        ("metric_policy", metric_policy.is_some(), METRICS),
        ("target_metric", target_metric.is_some(), METRICS),
        (
            "rate_limit",
            rate_limit.is_some(),
            Policies(&[PolicyKind::EndpointMetrics, PolicyKind::LatencyAware]),
        ),
        ("mode", mode.is_some(), LATENCY),
        ("ewma_beta", ewma_beta.is_some(), LATENCY),
        ("p2c_choices", p2c_choices.is_some(), LATENCY),
        ("ttft_weight", ttft_weight.is_some(), LATENCY),
        (
            "total_latency_weight",
            total_latency_weight.is_some(),
            LATENCY,
        ),
        ("error_penalty", error_penalty.is_some(), LATENCY),
        (
            "failure_cooldown_ms",
            failure_cooldown_ms.is_some(),
            LATENCY,
        ),
        (
            "metrics_missing_policy",
            metrics_missing_policy.is_some(),
            LATENCY,
        ),
        ("queue_size", queue_size.is_some(), LATENCY),
        (
            "global_inflight_enabled",
            global_inflight_enabled.is_some(),
            LATENCY,
        ),
        (
            "global_inflight_key_prefix",
            global_inflight_key_prefix.is_some(),
            LATENCY,
        ),
        (
            "global_inflight_timeout",
            global_inflight_timeout.is_some(),
            LATENCY,
        ),
        (
            "global_inflight_key_ttl",
            global_inflight_key_ttl.is_some(),
            LATENCY,
        ),
        ("service_list", service_list.is_some(), LATENCY),
        ("cluster_header", cluster_header.is_some(), LATENCY),
        ("hash_header", hash_header.is_some(), HASH),
        ("stickyTimeout", stickyTimeout.is_some(), HASH),
    ]
}
