//! The policy file's validation, key by key.

use std::time::Duration;

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
    assert_eq!(p.policy, PolicySettings::RoundRobin);
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
    assert_eq!(c.pools[0].outlier, Some(OutlierConfig::default()));
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
    assert_eq!(c.pools[0].policy.store(), Some(&StoreConfig::Embedded));
    assert_eq!(
        c.pools[0]
            .policy
            .shared_counts()
            .expect("shared")
            .max_inflight,
        None
    );
    let c = Config::from_yaml(&format!(
        "{glr}    lb_config: {{serviceFQDN: 10.0.0.9, timeout: 20, maxRequestCount: 8, redisKeyTTL: 60, keyPrefix: t1, replicaTimeout: 3000}}\n"
    ))
    .expect("valid");
    let Some(StoreConfig::Redis(r)) = c.pools[0].policy.store() else {
        panic!("redis store expected: {:?}", c.pools[0].policy);
    };
    assert_eq!(r.timeout(), Duration::from_millis(20));
    assert_eq!(
        c.pools[0]
            .policy
            .shared_counts()
            .expect("shared")
            .max_inflight,
        Some(8)
    );
    let w: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("pools[0].lb_config.redisKeyTTL"), "{w:?}");
    // Redis-only keys without Redis are pointed out; maxRequestCount 0 means no cap.
    let c = Config::from_yaml(&format!(
        "{glr}    lb_config: {{timeout: 20, maxRequestCount: 0}}\n"
    ))
    .expect("valid");
    assert_eq!(
        c.pools[0]
            .policy
            .shared_counts()
            .expect("shared")
            .max_inflight,
        None
    );
    assert!(
        c.warnings[0].message.contains("serviceFQDN"),
        "{:?}",
        c.warnings
    );
    // Stateless policies have no store.
    assert!(Config::from_yaml(MIN).expect("valid").pools[0]
        .policy
        .store()
        .is_none());
}

fn prefix_of(c: &Config) -> PrefixSettings {
    match &c.pools[0].policy {
        PolicySettings::PrefixCache(_, prefix) => *prefix,
        other @ (PolicySettings::RoundRobin
        | PolicySettings::Random
        | PolicySettings::GlobalLeastRequest(_)
        | PolicySettings::LeastBusy(_)
        | PolicySettings::KvAware(..)
        | PolicySettings::EndpointMetrics(_)
        | PolicySettings::LatencyAware(..)
        | PolicySettings::EndpointHash(..)
        | PolicySettings::Custom(_)) => panic!("prefix_cache settings expected: {other:?}"),
    }
}

#[test]
fn prefix_cache_keys() {
    let pc = MIN.replace("round_robin", "prefix_cache");
    let c = Config::from_yaml(&pc).expect("valid");
    let p = &c.pools[0];
    let PolicySettings::PrefixCache(shared, prefix) = &p.policy else {
        panic!("prefix_cache settings expected: {:?}", p.policy);
    };
    assert_eq!(shared.store, StoreConfig::Embedded);
    assert_eq!(*prefix, PrefixSettings::default());
    assert_eq!(
        PrefixSettings::default().ttl,
        Duration::from_secs(1800),
        "Higress's default"
    );
    let with = |keys: &str| Config::from_yaml(&format!("{pc}    lb_config: {{{keys}}}\n"));
    let c = with("redisKeyTTL: 0, loadGuardAbsolute: 8, loadGuardRelative: 1.25").expect("valid");
    let p = prefix_of(&c);
    assert_eq!(p.ttl, Duration::from_secs(1800), "0 means the default");
    assert_eq!((p.guard.absolute, p.guard.per_mille), (8, 1250));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let c = with("redisKeyTTL: 60, serviceFQDN: 10.0.0.9").expect("valid");
    assert_eq!(prefix_of(&c).ttl, Duration::from_secs(60));
    assert!(matches!(
        c.pools[0].policy.store(),
        Some(StoreConfig::Redis(_))
    ));
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
    assert_eq!(c.pools[0].policy, PolicySettings::RoundRobin);
}

#[test]
fn least_busy_reads_its_keys_and_names_bad_ones() {
    let lb = MIN.replace("round_robin", "least_busy");
    let c = Config::from_yaml(&format!(
        "{lb}    metrics: {{interval_ms: 100}}\n    lb_config: {{criticalModels: [m], kvCacheThreshold: 0.5, serviceFQDN: r}}\n"
    ))
    .expect("valid");
    let p = &c.pools[0];
    assert!(p.policy.store().is_none());
    let PolicySettings::LeastBusy(lbc) = &p.policy else {
        panic!("least_busy settings expected: {:?}", p.policy);
    };
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
    assert_eq!(c.pools[0].policy, PolicySettings::RoundRobin);
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
    assert!(c.pools[0].serves("m1") && !c.pools[0].serves("other"));
    assert!(c.pools[1].serves("other"));
}

#[test]
fn duplicates_are_rejected() {
    let t = err_text(&MIN.replace("['127.0.0.1:8001']", "['127.0.0.1:8001', '127.0.0.1:8001']"));
    assert!(t.contains("duplicate endpoint"), "{t}");
}

#[test]
fn endpoint_metrics_keys() {
    let with = |lb: &str| {
        Config::from_yaml(&MIN.replace(
            "round_robin",
            &format!("endpoint_metrics\n    lb_config: {lb}"),
        ))
    };
    let c =
        with("{metric_policy: least, target_metric: 'vllm:num_requests_waiting', rate_limit: 0.6}")
            .expect("valid");
    assert_eq!(
        c.pools[0].policy,
        PolicySettings::EndpointMetrics(EndpointMetricsConfig {
            policy: MetricPolicy::Least("vllm:num_requests_waiting".into()),
            rate_limit: 0.6,
        })
    );
    // Higress's alias, and its default: least_busy's tree with its keys.
    let alias = Config::from_yaml(&MIN.replace(
        "round_robin",
        "metrics_based\n    lb_config: {criticalModels: [m]}",
    ))
    .expect("valid");
    assert!(matches!(
        &alias.pools[0].policy,
        PolicySettings::EndpointMetrics(EndpointMetricsConfig {
            policy: MetricPolicy::Default(tree),
            ..
        }) if tree.critical_models == ["m"]
    ));
    for (lb, key) in [
        ("{metric_policy: least}", "target_metric"),
        ("{metric_policy: fastest}", "metric_policy"),
        ("{rate_limit: 0}", "rate_limit"),
    ] {
        let e = with(lb).expect_err(lb).to_string();
        assert!(e.contains(&format!("lb_config.{key}")), "{lb}: {e}");
    }
}

#[test]
fn latency_aware_keys() {
    let with = |policy: &str, lb: &str| {
        Config::from_yaml(&MIN.replace("round_robin", &format!("{policy}\n    lb_config: {lb}")))
    };
    // Defaults, Higress's.
    let c = Config::from_yaml(&MIN.replace("round_robin", "latency_aware")).expect("valid");
    let defaults = LatencyAwareConfig {
        mode: LatencyMode::AdaptiveScore,
        ewma_beta: 0.5,
        p2c_choices: 2,
        ttft_weight: 0.7,
        total_latency_weight: 0.3,
        error_penalty: 3.0,
        failure_cooldown: Duration::from_secs(30),
        rate_limit: 1.0,
        queue_size: 100,
        sessions: PrefixSettings::default(),
    };
    assert_eq!(
        c.pools[0].policy,
        PolicySettings::LatencyAware(None, defaults)
    );
    assert_eq!(LatencyAwareConfig::default(), defaults);
    assert!(c.pools[0].policy.store().is_none());
    // Every key, as a Higress user writes them; 0 (or less, for p2c_choices) means the default.
    let c = with(
        "latency_aware",
        "{mode: LeastTotalLatency, ewma_beta: 0.8, p2c_choices: 3, ttft_weight: 1, \
         total_latency_weight: 0, error_penalty: 0, failure_cooldown_ms: 5000, \
         metrics_missing_policy: least_busy, rate_limit: 0.7, queue_size: 20, \
         global_inflight_enabled: false, redisKeyTTL: 60, loadGuardAbsolute: 2, \
         loadGuardRelative: 0}",
    )
    .expect("valid");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(
        c.pools[0].policy,
        PolicySettings::LatencyAware(
            None,
            LatencyAwareConfig {
                mode: LatencyMode::LeastTotalLatency,
                ewma_beta: 0.8,
                p2c_choices: 3,
                ttft_weight: 1.0,
                total_latency_weight: 0.0,
                error_penalty: 0.0,
                failure_cooldown: Duration::from_millis(5000),
                rate_limit: 0.7,
                queue_size: 20,
                sessions: PrefixSettings {
                    guard: LoadGuard {
                        absolute: 2,
                        per_mille: 0,
                    },
                    ttl: Duration::from_secs(60),
                },
            },
        )
    );
    let c = with(
        "cluster_metrics",
        "{p2c_choices: -1, failure_cooldown_ms: 0, queue_size: 0}",
    )
    .expect("Higress's name is an alias");
    assert_eq!(
        c.pools[0].policy,
        PolicySettings::LatencyAware(None, defaults)
    );
    for mode in LatencyMode::ALL {
        let c = with("latency_aware", &format!("{{mode: {}}}", mode.name())).expect("valid");
        assert!(matches!(
            c.pools[0].policy,
            PolicySettings::LatencyAware(_, LatencyAwareConfig { mode: m, .. }) if m == mode
        ));
    }
    // Each bad value is refused, naming its key.
    for (lb, key) in [
        ("{mode: Fastest}", "mode"),
        ("{mode: adaptivescore}", "mode"),
        ("{ewma_beta: 1.5}", "ewma_beta"),
        ("{ewma_beta: -0.1}", "ewma_beta"),
        ("{ewma_beta: .nan}", "ewma_beta"),
        ("{ttft_weight: -1}", "ttft_weight"),
        ("{total_latency_weight: .inf}", "total_latency_weight"),
        (
            "{ttft_weight: 0, total_latency_weight: 0}",
            "total_latency_weight",
        ),
        ("{error_penalty: -3}", "error_penalty"),
        ("{failure_cooldown_ms: -1}", "failure_cooldown_ms"),
        ("{failure_cooldown_ms: 86400001}", "failure_cooldown_ms"),
        ("{metrics_missing_policy: random}", "metrics_missing_policy"),
        ("{rate_limit: 0}", "rate_limit"),
        ("{rate_limit: 1.01}", "rate_limit"),
        ("{queue_size: -5}", "queue_size"),
        ("{queue_size: 10001}", "queue_size"),
        ("{global_inflight_enabled: true}", "global_inflight_enabled"),
        (
            "{global_inflight_enabled: true, mode: LeastBusy, serviceFQDN: r}",
            "global_inflight_enabled",
        ),
        (
            "{global_inflight_key_prefix: x}",
            "global_inflight_key_prefix",
        ),
        ("{global_inflight_timeout: 50}", "global_inflight_timeout"),
        (
            "{global_inflight_enabled: true, serviceFQDN: r, global_inflight_timeout: -1}",
            "global_inflight_timeout",
        ),
        ("{global_inflight_key_ttl: 60}", "global_inflight_key_ttl"),
        ("{service_list: [a, b]}", "service_list"),
        ("{cluster_header: x-target}", "cluster_header"),
    ] {
        let e = with("latency_aware", lb).expect_err(lb).to_string();
        assert!(e.contains(&format!("lb_config.{key}: ")), "{lb}: {e}");
    }
    let e = with("latency_aware", "{global_inflight_enabled: true}")
        .expect_err("refused")
        .to_string();
    assert!(e.contains("serviceFQDN"), "{e}");
    // Shared in-flight counts in the Redis Higress's keys name; its timeout and prefix apply
    // unless llm-lb's own keys are given.
    let c = with(
        "latency_aware",
        "{global_inflight_enabled: true, serviceFQDN: redis.static, servicePort: 6380, \
         global_inflight_timeout: 200, global_inflight_key_prefix: higress-inflight, \
         global_inflight_key_ttl: 1800}",
    )
    .expect("valid");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let Some(StoreConfig::Redis(redis)) = c.pools[0].policy.store() else {
        panic!("a Redis store: {:?}", c.pools[0].policy)
    };
    assert_eq!(redis.timeout(), Duration::from_millis(200));
    assert_eq!(redis.namespace(), "higress-inflight");
    let e = with("latency_aware", "{service_list: [a]}")
        .expect_err("refused")
        .to_string();
    assert!(e.contains("pool's endpoints"), "{e}");
    // Every problem at once.
    let e = with(
        "latency_aware",
        "{mode: x, ewma_beta: 2, queue_size: -1, cluster_header: h}",
    )
    .expect_err("refused")
    .to_string();
    for key in ["mode", "ewma_beta", "queue_size", "cluster_header"] {
        assert!(e.contains(&format!("lb_config.{key}")), "{key}: {e}");
    }
    // The keys are latency_aware's (rate_limit is endpoint_metrics' too).
    let c = with("round_robin", "{mode: LeastBusy, ewma_beta: 0.9}").expect("valid");
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    let c = with("endpoint_metrics", "{rate_limit: 0.5, queue_size: 10}").expect("valid");
    let w: Vec<&str> = c.warnings.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(w, ["pools[0].lb_config.queue_size"]);
}

#[test]
fn endpoint_hash_keys() {
    let with = |lb: &str| {
        Config::from_yaml(&MIN.replace(
            "round_robin",
            &format!("endpoint_hash\n    lb_config: {lb}"),
        ))
    };
    // Defaults, Higress's: x-mse-consumer, 60 minutes, the embedded store.
    let c = Config::from_yaml(&MIN.replace("round_robin", "endpoint_hash")).expect("valid");
    let p = &c.pools[0];
    let defaults = EndpointHashConfig {
        hash_header: "x-mse-consumer".into(),
        sticky: Duration::from_secs(3600),
    };
    assert_eq!(EndpointHashConfig::default(), defaults);
    let shared = SharedCounts {
        store: StoreConfig::Embedded,
        max_inflight: None,
    };
    assert_eq!(
        p.policy,
        PolicySettings::EndpointHash(shared, defaults.clone())
    );
    // The pool's session is the header alone, whatever the defaults of session_affinity.
    let session = p.session.as_ref().expect("the header is the session");
    assert_eq!(session.headers, ["x-mse-consumer"]);
    assert!(session.body_fields.is_empty());
    // Every key, as a Higress user writes them; stickyTimeout in minutes, 0 is the default.
    let c = with(
        "{hash_header: X-User, stickyTimeout: 5, serviceFQDN: redis.local, servicePort: 6380, \
         password: pw, timeout: 100, database: 2, maxRequestCount: 10}",
    )
    .expect("valid");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let PolicySettings::EndpointHash(shared, hash) = &c.pools[0].policy else {
        panic!("endpoint_hash settings expected: {:?}", c.pools[0].policy);
    };
    assert_eq!(hash.hash_header, "x-user");
    assert_eq!(hash.sticky, Duration::from_secs(300));
    assert_eq!(shared.max_inflight, Some(10));
    assert!(matches!(shared.store, StoreConfig::Redis(_)));
    assert_eq!(
        c.pools[0].session.as_ref().map(|s| s.headers.clone()),
        Some(vec!["x-user".to_owned()])
    );
    let c = with("{stickyTimeout: 0}").expect("valid");
    assert!(matches!(
        &c.pools[0].policy,
        PolicySettings::EndpointHash(_, h) if h.sticky == DEFAULT_STICKY_TIMEOUT
    ));
    // Each bad value is refused, naming its key; every problem at once.
    for (lb, key) in [
        ("{stickyTimeout: -1}", "stickyTimeout"),
        ("{stickyTimeout: 525601}", "stickyTimeout"),
        ("{hash_header: ''}", "hash_header"),
        ("{hash_header: 'x user'}", "hash_header"),
        ("{hash_header: 'x-user:'}", "hash_header"),
    ] {
        let e = with(lb).expect_err(lb).to_string();
        assert!(e.contains(&format!("lb_config.{key}: ")), "{lb}: {e}");
    }
    let e = with("{hash_header: 'a b', stickyTimeout: -5, servicePort: 0}")
        .expect_err("refused")
        .to_string();
    for key in ["hash_header", "stickyTimeout"] {
        assert!(e.contains(&format!("lb_config.{key}")), "{key}: {e}");
    }
    assert!(e.contains("minutes"), "{e}");
    // session_affinity is refused on such a pool, saying why.
    let e = err_text(&format!(
        "{}    session_affinity: {{headers: [x-session-id]}}\n",
        MIN.replace("round_robin", "endpoint_hash")
    ));
    assert!(
        e.contains("pools[0].session_affinity") && e.contains("hash_header"),
        "{e}"
    );
    // The keys are endpoint_hash's; redisKeyTTL is not (stickyTimeout is its TTL).
    let c = Config::from_yaml(&MIN.replace(
        "round_robin",
        "prefix_cache\n    lb_config: {hash_header: x-user, stickyTimeout: 5}",
    ))
    .expect("valid");
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    let c = with("{redisKeyTTL: 60}").expect("valid");
    let w: Vec<&str> = c.warnings.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(w, ["pools[0].lb_config.redisKeyTTL"]);
}
