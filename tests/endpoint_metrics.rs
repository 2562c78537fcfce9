//! `endpoint_metrics` (Higress 2.x) end to end over real `vllm-sim` engines scraped by llm-lb: with
//! `metric_policy: least` on `vllm:num_requests_running`, requests avoid the engine that is busy,
//! by what its `/metrics` says; with `rate_limit`, no endpoint takes more than its share.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::json;
use vllm_sim::SimConfig;

fn yaml(endpoints: &[SocketAddr], lb_config: &str) -> String {
    format!(
        "expose_endpoint_header: true\npools:\n{}",
        pool_yaml(
            "p",
            "['*']",
            endpoints,
            "endpoint_metrics",
            &format!(
                "    health_check: {{enabled: false}}\n    metrics: {{interval_ms: 100}}\n    lb_config: {lb_config}\n"
            ),
        )
    )
}

/// Send one completion; returns the endpoint that answered and the pick reason.
async fn send(client: &reqwest::Client, proxy: &Proxy) -> (String, String) {
    let body = json!({"model": "m", "prompt": "hello", "max_tokens": 2});
    routed(client, proxy, "/v1/completions", &body).await
}

/// Three requests straight to `sim` that stay running for about a minute (3000 tokens at 20 ms
/// each): it reports 3 running, where the other engine reports at most the test's one request.
fn hold(sim: &vllm_sim::SimHandle) -> Vec<tokio::task::JoinHandle<()>> {
    let client = reqwest::Client::new();
    (0..3)
        .map(|_| {
            let request = client
                .post(format!("{}/v1/completions", sim.url()))
                .json(&json!({"model": "m", "prompt": "long", "max_tokens": 3000, "ignore_eos": true}))
                .send();
            tokio::spawn(async move {
                let _ = request.await;
            })
        })
        .collect()
}

/// Sends until `proxy` picks `want` for `reason` (its scrape has seen the held request).
async fn until_picked(client: &reqwest::Client, proxy: &Proxy, want: &str, reason: &str) {
    eventually(
        "a scrape that sees the held request",
        Duration::from_secs(20),
        async || match send(client, proxy).await {
            (e, r) if e == want && r == reason => Ok(()),
            seen => Err(format!("{seen:?}")),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_running_avoids_the_busy_engine_and_rate_limit_caps_its_share() {
    let sims = sim_fleet(
        2,
        SimConfig {
            model: "m".into(),
            itl_ms: 20.0,
            ..SimConfig::default()
        },
    )
    .await;
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr()).collect();
    let (busy, idle) = (addrs[0].to_string(), addrs[1].to_string());
    // The first engine runs long requests, so its vllm:num_requests_running reads 3.
    let held = hold(&sims[0]);
    let client = reqwest::Client::new();

    // least: every request goes to the idle engine, by what the engines report.
    let least = Proxy::start(&yaml(
        &addrs,
        "{metric_policy: least, target_metric: 'vllm:num_requests_running'}",
    ));
    until_picked(&client, &least, &idle, "metrics_least").await;
    for _ in 0..20 {
        assert_eq!(
            send(&client, &least).await,
            (idle.clone(), "metrics_least".into())
        );
    }

    // most, capped at 60 % of recent picks: ranking alone would send everything to the busy
    // engine; the cap sends it no more than its share and the rest elsewhere.
    let capped = Proxy::start(&yaml(
        &addrs,
        "{metric_policy: most, target_metric: 'vllm:num_requests_running', rate_limit: 0.6}",
    ));
    until_picked(&client, &capped, &busy, "metrics_most").await;
    let mut to_busy = 0;
    let mut limited = 0;
    for _ in 0..50 {
        let (endpoint, reason) = send(&client, &capped).await;
        to_busy += usize::from(endpoint == busy);
        limited += usize::from(reason == "rate_limited" && endpoint == idle);
    }
    assert!(
        (27..=33).contains(&to_busy),
        "{to_busy} of 50 to the busy engine"
    );
    assert_eq!(
        to_busy + limited,
        50,
        "every pick elsewhere was rate limited"
    );
    held.iter().for_each(|h| h.abort());
}
