//! `latency_aware` (Higress 2.x `cluster_metrics`, `mode: AdaptiveScore`) end to end over real
//! `vllm-sim` engines: requests go to the engine whose answers come faster, by the latencies
//! llm-lb measures itself; an endpoint that fails is left alone for `failure_cooldown_ms`, then
//! tried again.

mod common;
mod redis_harness;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use redis_harness::RedisServer;
use serde_json::json;
use vllm_sim::SimConfig;

fn yaml(endpoints: &[SocketAddr], policy: &str, lb_config: &str) -> String {
    format!(
        "expose_endpoint_header: true\npools:\n{}",
        pool_yaml(
            "p",
            "['*']",
            endpoints,
            policy,
            &format!(
                "    health_check: {{enabled: false}}\n    outlier_detection: {{enabled: false}}\n    lb_config: {lb_config}\n"
            ),
        )
    )
}

/// Send one completion; returns the endpoint that answered and the pick reason.
async fn send(client: &reqwest::Client, proxy: &Proxy) -> (String, String) {
    let body = json!({"model": "m", "prompt": "hello", "max_tokens": 2});
    routed(client, proxy, "/v1/completions", &body).await
}

async fn retries(proxy: &Proxy) -> f64 {
    proxy
        .metric("llmlb_retries_total", &[("pool", "p")])
        .await
        .unwrap_or(0.0)
}

async fn sim(prefill_overhead_ms: f64) -> vllm_sim::SimHandle {
    let cfg = SimConfig {
        model: "m".into(),
        prefill_overhead_ms,
        time_scale: 1.0,
        ..SimConfig::default()
    };
    vllm_sim::spawn(cfg, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("spawn vllm-sim")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_score_sends_most_requests_to_the_fast_engine() {
    // The slow engine spends 300 ms on every prefill, the fast one 5 ms.
    let slow = sim(300.0).await;
    let fast = sim(5.0).await;
    let proxy = Proxy::start(&yaml(&[slow.addr(), fast.addr()], "latency_aware", "{}"));
    let client = reqwest::Client::new();
    // Warm-up: an endpoint without a sample scores by in-flight alone, so both are measured.
    for _ in 0..4 {
        send(&client, &proxy).await;
    }
    let mut to_fast = 0;
    for _ in 0..40 {
        let (endpoint, reason) = send(&client, &proxy).await;
        to_fast += usize::from(endpoint == fast.addr().to_string() && reason == "latency_score");
    }
    assert!(to_fast >= 32, "{to_fast} of 40 to the fast engine");
    let picks = proxy
        .metric(
            "llmlb_picks_total",
            &[
                ("pool", "p"),
                ("policy", "latency_aware"),
                ("reason", "latency_score"),
            ],
        )
        .await;
    assert!(picks.is_some_and(|n| n >= 32.0), "{picks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_cools_down_then_is_tried_again() {
    let live = sim(5.0).await;
    // Nobody listens there: every attempt is refused (a failed attempt, retried on the other).
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let proxy = Proxy::start(&yaml(
        &[dead, live.addr()],
        "cluster_metrics",
        "{failure_cooldown_ms: 5000}",
    ));
    let client = reqwest::Client::new();
    let live_label = live.addr().to_string();

    // Within two requests the dead endpoint is tried (the first pick is a tie; otherwise the
    // live one took every recent pick, and rate_limit 1 yields the next).
    let mut failed_at = None;
    for _ in 0..2 {
        let start = Instant::now();
        let (endpoint, _) = send(&client, &proxy).await;
        assert_eq!(endpoint, live_label);
        if retries(&proxy).await >= 1.0 {
            failed_at = Some(start);
            break;
        }
    }
    let failed_at = failed_at.expect("the dead endpoint tried once");
    let before = retries(&proxy).await;
    assert_eq!(before, 1.0);

    // During its cooldown (5 s from the failure; we stop at 3 s) it is never picked.
    let mut sent = 0;
    while failed_at.elapsed() < Duration::from_secs(3) && sent < 20 {
        assert_eq!(
            send(&client, &proxy).await,
            (live_label.clone(), "latency_score".to_string())
        );
        sent += 1;
    }
    assert!(sent > 0);
    assert_eq!(retries(&proxy).await, before, "tried during its cooldown");

    // After it, the endpoint without a latency sample scores lowest: tried again (and retried).
    let after = failed_at + Duration::from_millis(5500);
    tokio::time::sleep(after.saturating_duration_since(Instant::now())).await;
    assert_eq!(send(&client, &proxy).await.0, live_label);
    assert_eq!(retries(&proxy).await, before + 1.0);
}

/// `global_inflight_enabled`: the score is multiplied by the endpoint's requests in flight over
/// every replica sharing the Redis. A second replica, whose pool has only the first endpoint,
/// holds three long requests there; the first replica then sends everything to the other
/// endpoint, though it has nothing in flight itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_in_flight_counts_steer_every_replica() {
    let redis = RedisServer::start().expect("redis-server");
    let (a, b) = (sim(5.0).await, sim(5.0).await);
    let lb = format!(
        "{{global_inflight_enabled: true, serviceFQDN: '{}', global_inflight_timeout: 500}}",
        redis.url()
    );
    let first = Proxy::start(&yaml(&[a.addr(), b.addr()], "latency_aware", &lb));
    let second = Proxy::start(&yaml(&[a.addr()], "latency_aware", &lb));
    let client = reqwest::Client::new();
    // Both endpoints measured by the first replica (an endpoint without a sample scores 1).
    for _ in 0..6 {
        send(&client, &first).await;
    }
    // Three long answers from `a`, held by the second replica.
    let held: Vec<_> = (0..3)
        .map(|_| {
            let (client, url) = (client.clone(), second.url("/v1/completions"));
            tokio::spawn(async move {
                let body =
                    json!({"model": "m", "prompt": "long", "max_tokens": 400, "ignore_eos": true});
                client
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status())
            })
        })
        .collect();
    second
        .wait_metric(
            "llmlb_endpoint_inflight_global",
            &[("endpoint", a.addr().to_string().as_str())],
            3.0,
        )
        .await;
    for _ in 0..10 {
        assert_eq!(
            send(&client, &first).await,
            (b.addr().to_string(), "latency_score".to_string())
        );
    }
    held.into_iter().for_each(|h| h.abort());
}
