//! llm-lb in front of three real `vllm-sim` servers: OpenAI streaming and JSON through the proxy.

mod common;

use std::net::SocketAddr;

use common::{chat_turn, parse_metric, pool_yaml, sim_fleet, Proxy};
use futures_util::StreamExt;
use serde_json::{json, Value};
use vllm_sim::{SimConfig, SimHandle};

const MODEL: &str = "sim/llama";

async fn fleet(n: usize) -> Vec<SimHandle> {
    let base = SimConfig {
        model: MODEL.to_string(),
        time_scale: 0.0,
        ..SimConfig::default()
    };
    sim_fleet(n, base).await
}

fn proxy_for(sims: &[SimHandle], policy: &str) -> Proxy {
    let addrs: Vec<SocketAddr> = sims.iter().map(SimHandle::addr).collect();
    Proxy::start(&format!(
        "max_body_bytes: 4194304\npools:\n{}",
        pool_yaml("sim", &format!("[\"{MODEL}\"]"), &addrs, policy, "")
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_with_usage_through_the_proxy() {
    let sims = fleet(3).await;
    let proxy = proxy_for(&sims, "round_robin");
    let client = reqwest::Client::new();
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a story about a lighthouse."}],
        "max_tokens": 24, "ignore_eos": true, "stream": true,
        "stream_options": {"include_usage": true},
    });
    let resp = client
        .post(proxy.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    let mut text = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
    }
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let usage: Value = serde_json::from_str(events[events.len() - 2]).expect("usage chunk");
    assert_eq!(usage["usage"]["completion_tokens"], 24, "{usage}");
    let tokens = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count();
    assert_eq!(tokens, 24, "one token per chunk");
    // The gateway read the usage at the end of the stream (logged just after the last byte).
    let mut text = proxy.metrics().await;
    for _ in 0..50 {
        if parse_metric(
            &text,
            "llmlb_request_duration_seconds_count",
            &[("pool", "sim")],
        )
        .is_some()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        text = proxy.metrics().await;
    }
    let tokens = |kind| parse_metric(&text, "llmlb_tokens_total", &[("kind", kind)]);
    assert_eq!(tokens("completion"), Some(24.0));
    assert_eq!(tokens("prompt"), usage["usage"]["prompt_tokens"].as_f64());
    for family in [
        "llmlb_request_duration_seconds_count",
        "llmlb_time_to_first_byte_seconds_count",
    ] {
        assert_eq!(
            parse_metric(&text, family, &[("pool", "sim")]),
            Some(1.0),
            "{family}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_a_conversation_over_the_fleet() {
    let sims = fleet(3).await;
    let proxy = proxy_for(&sims, "round_robin");
    let client = reqwest::Client::new();
    let mut messages = vec![json!({"role": "system", "content": "You are terse. ".repeat(200)})];
    for turn in 0..6 {
        messages.push(json!({"role": "user", "content": format!("Question number {turn}?")}));
        let url = proxy.url("/v1/chat/completions");
        let reply = chat_turn(&client, &url, MODEL, &mut messages, 16).await;
        assert!(reply["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 400);
    }
    let served: Vec<u64> = sims.iter().map(|s| s.stats().requests_served).collect();
    assert_eq!(served, vec![2, 2, 2]);
    // A large prompt (over Pingora's 64 KiB replay buffer) is served too.
    let big = "lorem ipsum dolor sit amet ".repeat(3_000);
    let r = client
        .post(proxy.url("/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": big}], "max_tokens": 4}))
        .send()
        .await
        .expect("send");
    assert_eq!(
        r.status().as_u16(),
        200,
        "{}",
        r.text().await.unwrap_or_default()
    );
}
