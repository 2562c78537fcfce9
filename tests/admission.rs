//! The waiting room end to end, in front of a real `vllm-sim` engine: while the pool is full,
//! requests wait in llm-lb and are let in by band (critical first, sheddable last) and, within a
//! band, by tenant in turn; a full queue or a passed deadline answers 429 with `Retry-After`
//! (503 for critical), and the waiting room's metrics count it all.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use parking_lot::Mutex;
use serde_json::json;
use vllm_sim::SimConfig;

fn yaml(endpoint: SocketAddr, admission: &str) -> String {
    format!(
        "pools:\n{}",
        pool_yaml(
            "p",
            "['*']",
            &[endpoint],
            "round_robin",
            &format!("    health_check: {{enabled: false}}\n    admission: {admission}\n"),
        )
    )
}

/// A completion of `tokens` tokens (10 ms each on the engine) with `headers`.
async fn complete(
    client: &reqwest::Client,
    proxy: &Proxy,
    tokens: u32,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client
        .post(proxy.url("/v1/completions"))
        .json(&json!({"model": "m", "prompt": "hi", "max_tokens": tokens, "ignore_eos": true}));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("send")
}

async fn engine() -> vllm_sim::SimHandle {
    let cfg = SimConfig {
        model: "m".into(),
        itl_ms: 10.0,
        ..SimConfig::default()
    };
    vllm_sim::spawn(cfg, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("spawn vllm-sim")
}

/// A request of `tokens` tokens that holds the pool's only slot (10 ms a token), once in flight;
/// answers its status.
async fn hold(
    client: &reqwest::Client,
    proxy: &Proxy,
    tokens: u32,
) -> tokio::task::JoinHandle<reqwest::StatusCode> {
    let (client, url) = (client.clone(), proxy.url("/v1/completions"));
    let holder = tokio::spawn(async move {
        let body =
            json!({"model": "m", "prompt": "hold", "max_tokens": tokens, "ignore_eos": true});
        client
            .post(url)
            .json(&body)
            .send()
            .await
            .expect("send")
            .status()
    });
    proxy
        .wait_metric("llmlb_endpoint_inflight", &[("pool", "p")], 1.0)
        .await;
    holder
}

async fn waiting(proxy: &Proxy, band: &str, n: f64) {
    proxy
        .wait_metric("llmlb_queue_length", &[("pool", "p"), ("band", band)], n)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_let_in_by_band_then_by_tenant_in_turn() {
    let sim = engine().await;
    let proxy = Proxy::start(&yaml(sim.addr(), "{max_inflight: 1}"));
    let client = reqwest::Client::new();
    let holder = hold(&client, &proxy, 100).await;
    // Queue, in this order: tenant a three times, b once, a sheddable, then a critical one.
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let arrivals = [
        ("standard", "a"),
        ("standard", "a"),
        ("standard", "a"),
        ("standard", "b"),
        ("sheddable", "c"),
        ("critical", "d"),
    ];
    for (n, (band, tenant)) in arrivals.into_iter().enumerate() {
        let (client, proxy_url, order) =
            (client.clone(), proxy.url("/v1/completions"), order.clone());
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(proxy_url)
                .header("x-llm-lb-priority", band)
                .header("x-tenant-id", tenant)
                .json(&json!({"model": "m", "prompt": "q", "max_tokens": 5, "ignore_eos": true}))
                .send()
                .await
                .expect("send");
            let status = resp.status().as_u16();
            let _ = resp.bytes().await;
            // With one slot, requests finish in the order they were let in.
            order.lock().push((band, tenant));
            status
        }));
        let queued: usize = arrivals[..=n].iter().filter(|(b, _)| *b == band).count();
        waiting(&proxy, band, queued as f64).await;
    }
    assert_eq!(holder.await.expect("holder"), 200);
    for t in tasks {
        assert_eq!(t.await.expect("task"), 200);
    }
    assert_eq!(
        *order.lock(),
        [
            ("critical", "d"),
            ("standard", "a"),
            ("standard", "b"),
            ("standard", "a"),
            ("standard", "a"),
            ("sheddable", "c"),
        ]
    );
    let waited = proxy
        .metric(
            "llmlb_admissions_total",
            &[("band", "standard"), ("tenant", "a"), ("result", "waited")],
        )
        .await;
    assert_eq!(waited, Some(3.0));
    let waits = proxy
        .metric(
            "llmlb_queue_wait_seconds_count",
            &[("band", "standard"), ("tenant", "a")],
        )
        .await;
    assert_eq!(waits, Some(3.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queues_and_deadlines_answer_429_with_retry_after_and_critical_503() {
    let sim = engine().await;
    let proxy = Proxy::start(&yaml(
        sim.addr(),
        "{max_inflight: 1, bands: {sheddable: {queue: 1, deadline_ms: 300}, critical: {queue: 0}}}",
    ));
    let client = reqwest::Client::new();
    let holder = hold(&client, &proxy, 200).await;
    let shed = [("x-llm-lb-priority", "sheddable")];
    let first = {
        let (client, proxy_url) = (client.clone(), proxy.url("/v1/completions"));
        tokio::spawn(async move {
            let r = client
                .post(proxy_url)
                .header("x-llm-lb-priority", "sheddable")
                .json(&json!({"model": "m", "prompt": "q", "max_tokens": 2}))
                .send()
                .await
                .expect("send");
            (r.status().as_u16(), r.headers().get("retry-after").cloned())
        })
    };
    waiting(&proxy, "sheddable", 1.0).await;
    // The sheddable queue (1) is full: refused at once.
    let full = complete(&client, &proxy, 2, &shed).await;
    assert_eq!(full.status(), 429);
    assert_eq!(full.headers()["retry-after"], "1");
    let body: serde_json::Value = full.json().await.expect("json");
    assert_eq!(body["error"]["code"], "overloaded");
    // The waiting one passes its 300 ms deadline long before the holder ends (2 s).
    let (status, retry_after) = first.await.expect("task");
    assert_eq!(status, 429);
    assert!(retry_after.is_some());
    // Critical with a queue of 0: 503, not 429.
    let critical = complete(&client, &proxy, 2, &[("x-llm-lb-priority", "critical")]).await;
    assert_eq!(critical.status(), 503);
    assert!(critical.headers().contains_key("retry-after"));
    for result in ["queue_full", "deadline"] {
        let n = proxy
            .metric(
                "llmlb_admissions_total",
                &[("band", "sheddable"), ("result", result)],
            )
            .await;
        assert_eq!(n, Some(1.0), "{result}");
    }
    assert_eq!(holder.await.expect("holder"), 200);
    // Room again: let in at once.
    assert_eq!(complete(&client, &proxy, 2, &shed).await.status(), 200);
}

/// A client that gives up while it waits (closes its connection) leaves the queue at once, not
/// at its deadline, and its place goes to the next in line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_waiting_leaves_the_queue() {
    let sim = engine().await;
    let proxy = Proxy::start(&yaml(sim.addr(), "{max_inflight: 1}"));
    let client = reqwest::Client::new();
    let holder = hold(&client, &proxy, 300).await;
    // Gives up after 1 s: sooner than the standard deadline (10 s) and the holder (3 s).
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(1))
        .build()
        .expect("client");
    let next = {
        let (client, url) = (client.clone(), proxy.url("/v1/completions"));
        tokio::spawn(async move {
            client
                .post(url)
                .header("x-tenant-id", "next")
                .json(&json!({"model": "m", "prompt": "q", "max_tokens": 2}))
                .send()
                .await
                .expect("send")
                .status()
        })
    };
    let (gave_up, _) = tokio::join!(
        async {
            impatient
                .post(proxy.url("/v1/completions"))
                .header("x-tenant-id", "gone")
                .json(&json!({"model": "m", "prompt": "q", "max_tokens": 2}))
                .send()
                .await
        },
        waiting(&proxy, "standard", 2.0),
    );
    assert!(gave_up.expect_err("timed out").is_timeout());
    waiting(&proxy, "standard", 1.0).await;
    let left = proxy
        .metric(
            "llmlb_admissions_total",
            &[("tenant", "gone"), ("result", "client_gone")],
        )
        .await;
    assert_eq!(left, Some(1.0));
    assert!(!holder.is_finished(), "it left long before a slot was free");
    assert_eq!(holder.await.expect("holder"), 200);
    assert_eq!(next.await.expect("next"), 200);
}

#[test]
fn bad_admission_settings_are_refused_naming_the_key() {
    let e = llm_lb::config::Config::from_yaml(&yaml(
        "127.0.0.1:1".parse().expect("addr"),
        "{max_inflight: 0, default_band: urgent, bands: {standard: {deadline_ms: 0}}}",
    ))
    .expect_err("invalid");
    let e = e.to_string();
    for key in [
        "admission.max_inflight",
        "admission.default_band",
        "standard.deadline_ms",
    ] {
        assert!(e.contains(key), "{key} in {e}");
    }
}
