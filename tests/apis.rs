//! The APIs clients call, through a real llm-lb: Responses and Anthropic Messages conversations
//! get prefix affinity like chat's (two Messages conversations with different system prompts
//! share no key) and the same fleet hit rate on `vllm-sim`, and embeddings are routed by load and
//! counted in it.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn proxy(backends: &[&Backend]) -> Proxy {
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    Proxy::start(&format!(
        "expose_endpoint_header: true\npools:\n{}",
        pool_yaml(
            "p",
            "[m]",
            &addrs,
            "prefix_cache",
            "    health_check: {enabled: false}\n"
        )
    ))
}

/// Send `body` to `path`; returns the endpoint and the pick reason.
async fn send(
    client: &reqwest::Client,
    proxy: &Proxy,
    path: &str,
    body: &Value,
) -> (String, String) {
    let resp = client
        .post(proxy.url(path))
        .json(body)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200, "{path}");
    let header = |name: &str| resp.headers()[name].to_str().expect("header").to_string();
    (header("x-llm-lb-endpoint"), header("x-llm-lb-reason"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_and_messages_conversations_keep_their_affinity() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    let proxy = proxy(&[&a, &b]);
    let client = reqwest::Client::new();

    // Anthropic Messages: the second turn returns to the first turn's endpoint.
    let turn = |system: &str, turns: usize| {
        let mut messages = Vec::new();
        for i in 0..turns {
            messages.push(json!({"role": "user", "content": format!("question {i}")}));
            if i + 1 < turns {
                messages.push(json!({"role": "assistant", "content": [{"type": "text", "text": format!("answer {i}")}]}));
            }
        }
        json!({"model": "m", "max_tokens": 16, "system": system, "messages": messages})
    };
    let (first, reason) = send(&client, &proxy, "/v1/messages", &turn("you are a coder", 1)).await;
    assert_eq!(reason, "prefix_miss");
    let (second, reason) = send(&client, &proxy, "/v1/messages", &turn("you are a coder", 2)).await;
    assert_eq!(
        (second.as_str(), reason.as_str()),
        (first.as_str(), "prefix_hit")
    );
    // The same messages under another system prompt share nothing with it.
    let (_, reason) = send(&client, &proxy, "/v1/messages", &turn("you are a poet", 2)).await;
    assert_eq!(reason, "prefix_miss");

    // Responses, with the client sending the conversation so far as input items.
    let items = |turns: usize| {
        let mut input = Vec::new();
        for i in 0..turns {
            input.push(json!({"role": "user", "content": [{"type": "input_text", "text": format!("step {i}")}]}));
            if i + 1 < turns {
                input.push(json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": format!("done {i}")}]}));
            }
        }
        json!({"model": "m", "instructions": "plan", "input": input})
    };
    let (first, reason) = send(&client, &proxy, "/v1/responses", &items(1)).await;
    assert_eq!(reason, "prefix_miss");
    for turns in 2..4 {
        let (next, reason) = send(&client, &proxy, "/v1/responses", &items(turns)).await;
        assert_eq!(
            (next.as_str(), reason.as_str()),
            (first.as_str(), "prefix_hit")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_routed_by_load_and_counted_in_it() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    let proxy = proxy(&[&a, &b]);
    let client = reqwest::Client::new();
    // Two held turns of one conversation on one endpoint, then two held embeddings: both go to
    // the other endpoint, which has fewer requests in flight (round robin would split them).
    let chat =
        json!({"model": "m", "hold": true, "messages": [{"role": "user", "content": "hello"}]});
    let embedding = |i: usize| json!({"model": "m", "input": format!("text {i}"), "hold": true});
    let mut held = Vec::new();
    for (path, body) in [
        ("/v1/chat/completions", chat.clone()),
        ("/v1/chat/completions", chat),
        ("/v1/embeddings", embedding(0)),
        ("/v1/embeddings", embedding(1)),
    ] {
        let request = client.post(proxy.url(path)).json(&body).send();
        held.push(tokio::spawn(request));
        let want = held.len();
        eventually(
            "the held request reaches a backend",
            Duration::from_secs(10),
            async || match (a.active() + b.active()) as usize {
                n if n == want => Ok(()),
                n => Err(format!("{n} in flight")),
            },
        )
        .await;
    }
    assert_eq!((a.active(), b.active()), (2, 2), "spread by load");
    proxy
        .wait_metric(
            "llmlb_picks_total",
            &[("pool", "p"), ("reason", "least_request")],
            2.0,
        )
        .await;
    a.release_held(2);
    b.release_held(2);
    let mut reasons = Vec::new();
    for h in held {
        let resp = h.await.expect("join").expect("send");
        assert_eq!(resp.status(), 200);
        reasons.push(
            resp.headers()["x-llm-lb-reason"]
                .to_str()
                .expect("reason")
                .to_string(),
        );
    }
    assert_eq!(
        reasons,
        [
            "prefix_miss",
            "prefix_hit",
            "least_request",
            "least_request"
        ]
    );
    proxy
        .wait_metric(
            "llmlb_fallback_total",
            &[("pool", "p"), ("reason", "no_prompt")],
            0.0,
        )
        .await;
}

/// The same 12 five-turn conversations over chat, Responses and Messages, through `prefix_cache`
/// on three `vllm-sim` servers (which serve all three APIs through one engine): the fleet's hit
/// rate, from the simulators' counters, is chat's for each API — and round robin's is far lower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_and_messages_get_chats_fleet_hit_rate() {
    let extra = "    health_check: {enabled: false}\n";
    let mut rates = Vec::new();
    for api in [
        ConversationApi::Chat,
        ConversationApi::Responses,
        ConversationApi::Messages,
    ] {
        let affinity = fleet_hit_rate_over(api, "m", "prefix_cache", 3, extra).await;
        let spread = fleet_hit_rate_over(api, "m", "round_robin", 3, extra).await;
        eprintln!("{api:?}: prefix_cache {affinity:.3}, round_robin {spread:.3}");
        assert!(affinity > spread + 0.15, "{api:?}: {affinity} vs {spread}");
        rates.push(affinity);
    }
    let chat = rates[0];
    for (api, rate) in ["responses", "messages"].iter().zip(&rates[1..]) {
        assert!(
            (rate - chat).abs() <= 0.05,
            "{api}: {rate} vs chat's {chat}"
        );
    }
}
