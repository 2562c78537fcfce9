//! The admin `/metrics` after a short mixed run: every family the README lists is exported with
//! plausible values — and the per-pool series exist before the first request.

mod common;
mod redis_harness;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use redis_harness::RedisServer;
use vllm_sim::SimConfig;

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    parse_metric(text, name, labels)
        .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_after_a_mixed_run() {
    let redis = RedisServer::start().expect("redis-server");
    // Three pools: shared counts in Redis, prefix affinity in the embedded store, and engine
    // metrics from two vllm-sim plus an address where nothing listens.
    let fleet = |model: &str| {
        sim_fleet(
            2,
            SimConfig {
                model: model.into(),
                time_scale: 0.0,
                ..SimConfig::default()
            },
        )
    };
    let (pc_sims, sims) = (fleet("pc").await, fleet("sim").await);
    let pc_addrs: Vec<SocketAddr> = pc_sims.iter().map(|s| s.addr()).collect();
    let plain = [Backend::start().await, Backend::start().await];
    let plain: Vec<SocketAddr> = plain.iter().map(|b| b.addr).collect();
    let sim_addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr()).collect();
    // Nothing listens there: its scrapes fail, and requests picked for it are retried elsewhere.
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut busy = sim_addrs.clone();
    busy.push(dead);
    let proxy = Proxy::start(&format!(
        "pools:\n{}{}{}",
        pool_yaml(
            "glr",
            "[glr]",
            &plain,
            "global_least_request",
            &format!("    lb_config: {{serviceFQDN: '{}'}}\n", redis.url())
        ),
        pool_yaml("pc", "[pc]", &pc_addrs, "prefix_cache", ""),
        pool_yaml(
            "busy",
            "[sim]",
            &busy,
            "least_busy",
            "    metrics: {interval_ms: 100}\n"
        ),
    ));

    // Before the first request: per-pool series are there at zero.
    let before = proxy.metrics().await;
    for pool in ["glr", "pc", "busy"] {
        assert_eq!(
            value(&before, "llmlb_retries_total", &[("pool", pool)]),
            0.0
        );
        assert_eq!(
            value(&before, "llmlb_pool_endpoints", &[("pool", pool)]),
            2.0 + f64::from(pool == "busy")
        );
        assert_eq!(
            value(
                &before,
                "llmlb_tokens_total",
                &[("pool", pool), ("kind", "completion")]
            ),
            0.0
        );
        assert_eq!(
            value(
                &before,
                "llmlb_fallback_total",
                &[("pool", pool), ("reason", "no_body")]
            ),
            0.0
        );
        assert_eq!(
            value(
                &before,
                "llmlb_request_duration_seconds_count",
                &[("pool", pool)]
            ),
            0.0
        );
        assert_eq!(
            value(
                &before,
                "llmlb_time_to_first_byte_seconds_count",
                &[("pool", pool)]
            ),
            0.0
        );
    }
    assert_eq!(
        value(
            &before,
            "llmlb_picks_total",
            &[("pool", "pc"), ("reason", "prefix_hit")]
        ),
        0.0
    );
    assert_eq!(
        value(&before, "llmlb_store_breaker_open", &[("pool", "glr")]),
        0.0
    );
    assert_eq!(value(&before, "llmlb_config_generation", &[]), 1.0);
    assert_eq!(
        value(
            &before,
            "llmlb_config_reloads_total",
            &[("trigger", "sighup"), ("result", "ok")]
        ),
        0.0
    );
    let e0 = plain[0].to_string();
    assert_eq!(
        value(
            &before,
            "llmlb_requests_total",
            &[("endpoint", &e0), ("class", "2xx")]
        ),
        0.0
    );
    assert_eq!(
        value(&before, "llmlb_endpoint_inflight", &[("endpoint", &e0)]),
        0.0
    );

    // The mixed run: chats with affinity, streams with usage, plain requests, a request without a
    // body, a model no pool serves.
    let client = reqwest::Client::new();
    let url = proxy.url("/v1/chat/completions");
    let mut messages =
        vec![serde_json::json!({"role": "user", "content": "Tell me about the sea. ".repeat(200)})];
    for _ in 0..3 {
        chat_turn(&client, &url, "pc", &mut messages, 16).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await; // a few scrapes
    for i in 0..6 {
        let r = client
            .post(&url)
            .json(
                &serde_json::json!({"model": "sim", "stream": true, "max_tokens": 8, "ignore_eos": true,
                "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": format!("stream {i}")}]}),
            )
            .send()
            .await
            .expect("stream");
        assert_eq!(r.status().as_u16(), 200);
        r.text().await.expect("stream body");
        let r = client
            .post(&url)
            .json(&serde_json::json!({"model": "glr", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("glr");
        assert_eq!(r.status().as_u16(), 200);
    }
    let r = client
        .get(proxy.url("/v1/models"))
        .send()
        .await
        .expect("models");
    assert!(
        r.status().is_success() || r.status().as_u16() == 404,
        "{}",
        r.status()
    );
    let r = client
        .post(&url)
        .json(&serde_json::json!({"model": "nobody", "messages": []}))
        .send()
        .await
        .expect("404");
    assert_eq!(r.status().as_u16(), 404);
    tokio::time::sleep(Duration::from_millis(1500)).await; // a heartbeat: the global view

    let m = proxy.metrics().await;
    // 6 chats and the body-less GET (no model: the first pool).
    let glr_2xx: f64 = plain
        .iter()
        .map(|e| {
            let e = e.to_string();
            value(
                &m,
                "llmlb_requests_total",
                &[("pool", "glr"), ("endpoint", &e), ("class", "2xx")],
            )
        })
        .sum();
    assert_eq!(glr_2xx, 7.0);
    assert_eq!(
        value(
            &m,
            "llmlb_requests_total",
            &[("pool", "-"), ("class", "4xx")]
        ),
        1.0
    );
    for e in &plain {
        let e = e.to_string();
        assert_eq!(
            value(
                &m,
                "llmlb_endpoint_inflight",
                &[("pool", "glr"), ("endpoint", &e)]
            ),
            0.0
        );
        assert_eq!(
            value(
                &m,
                "llmlb_endpoint_inflight_global",
                &[("pool", "glr"), ("endpoint", &e)]
            ),
            0.0
        );
        assert_eq!(
            value(
                &m,
                "llmlb_endpoint_healthy",
                &[("pool", "glr"), ("endpoint", &e)]
            ),
            1.0
        );
    }
    assert_eq!(
        value(
            &m,
            "llmlb_picks_total",
            &[("pool", "glr"), ("reason", "least_request")]
        ),
        6.0
    );
    assert_eq!(
        value(
            &m,
            "llmlb_picks_total",
            &[("pool", "pc"), ("reason", "prefix_miss")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "llmlb_picks_total",
            &[("pool", "pc"), ("reason", "prefix_hit")]
        ),
        2.0
    );
    assert_eq!(
        value(&m, "llmlb_prefix_match_blocks_count", &[("pool", "pc")]),
        3.0
    );
    assert!(value(&m, "llmlb_prefix_match_blocks_sum", &[("pool", "pc")]) >= 2.0);
    assert!(
        value(
            &m,
            "llmlb_fallback_total",
            &[("pool", "glr"), ("reason", "no_body")]
        ) >= 1.0
    );
    assert_eq!(
        value(
            &m,
            "llmlb_request_duration_seconds_count",
            &[("pool", "busy")]
        ),
        6.0
    );
    assert_eq!(
        value(
            &m,
            "llmlb_time_to_first_byte_seconds_count",
            &[("pool", "busy")]
        ),
        6.0
    );
    assert_eq!(
        value(
            &m,
            "llmlb_tokens_total",
            &[("pool", "busy"), ("kind", "completion")]
        ),
        48.0
    );
    assert!(
        value(
            &m,
            "llmlb_tokens_total",
            &[("pool", "pc"), ("kind", "prompt")]
        ) > 600.0
    );
    assert!(
        value(
            &m,
            "llmlb_tokens_total",
            &[("pool", "pc"), ("kind", "cached")]
        ) > 0.0
    );
    assert!(
        value(
            &m,
            "llmlb_store_calls_total",
            &[("pool", "glr"), ("op", "acquire"), ("result", "ok")]
        ) >= 6.0
    );
    assert!(
        value(
            &m,
            "llmlb_store_calls_total",
            &[("pool", "glr"), ("op", "restore"), ("result", "ok")]
        ) >= 1.0
    );
    assert!(value(&m, "llmlb_store_call_seconds_count", &[("op", "acquire")]) >= 6.0);
    assert_eq!(
        value(&m, "llmlb_store_breaker_open", &[("pool", "glr")]),
        0.0
    );
    for s in &sim_addrs {
        let s = s.to_string();
        let age = value(
            &m,
            "llmlb_scrape_age_seconds",
            &[("pool", "busy"), ("endpoint", &s)],
        );
        assert!((0.0..5.0).contains(&age), "age {age}");
        assert_eq!(
            value(
                &m,
                "llmlb_endpoint_metrics_known",
                &[("pool", "busy"), ("endpoint", &s)]
            ),
            1.0
        );
        assert_eq!(
            value(
                &m,
                "llmlb_engine_waiting",
                &[("pool", "busy"), ("endpoint", &s)]
            ),
            0.0
        );
        let kv = value(
            &m,
            "llmlb_engine_kv_cache_usage",
            &[("pool", "busy"), ("endpoint", &s)],
        );
        assert!((0.0..=1.0).contains(&kv), "kv {kv}");
    }
    let bad = dead.to_string();
    assert_eq!(
        value(
            &m,
            "llmlb_endpoint_metrics_known",
            &[("pool", "busy"), ("endpoint", &bad)]
        ),
        0.0
    );
    assert!(
        m.lines()
            .any(|l| l.starts_with("llmlb_scrape_failures_total{") && l.contains(&bad)),
        "{m}"
    );
    assert_eq!(value(&m, "llmlb_retries_total", &[("pool", "glr")]), 0.0);
    let retried = value(&m, "llmlb_retries_total", &[("pool", "busy")]);
    assert!(retried <= 6.0, "{retried}");
    // Bounded labels: no prompt text, no request ids.
    assert!(!m.contains("sea") && !m.contains("stream 0"), "{m}");
}
