//! vLLM prefix caching: cached tokens on a second turn, cold servers, the LoRA key, LRU
//! eviction, and the time a warm cache saves.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use vllm_sim::SimConfig;

const B: u64 = 16;

fn usage(v: &Value) -> (u64, u64, u64) {
    let u = &v["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
    )
}

/// vLLM's rule: the longest run of cached full blocks, capped at ⌊(n−1)/B⌋·B. Turn 1 left
/// its prompt and all but its last output token computed (the last sampled token never is).
fn expected_cached(p1: u64, c1: u64, p2: u64) -> u64 {
    let computed = p1 + c1 - 1;
    (computed / B).min((p2 - 1) / B) * B
}

#[tokio::test]
async fn second_turn_reports_vllm_cached_tokens_and_cold_server_zero() {
    let warm = start(instant("m")).await;
    let cold = start(instant("m")).await;
    let system = "You are a helpful assistant who answers in detail. ".repeat(4);
    let q1 = "What is the capital of France, and why is it famous?";
    for ignore_eos in [true, false] {
        let mut b1 = chat("m", &[("system", &system), ("user", q1)], 37);
        b1["ignore_eos"] = json!(ignore_eos);
        let (s, v1) = post(&warm, "/v1/chat/completions", &b1).await;
        assert_eq!(s, 200);
        let (p1, c1, cached1) = usage(&v1);
        let reply = v1["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        let q2 = "Tell me more about its history.";
        let b2 = chat(
            "m",
            &[
                ("system", &system),
                ("user", q1),
                ("assistant", &reply),
                ("user", q2),
            ],
            10,
        );
        let (_, v2) = post(&warm, "/v1/chat/completions", &b2).await;
        let (p2, _, cached2) = usage(&v2);
        assert!(p2 > p1 + c1);
        if ignore_eos {
            assert_eq!(cached1, 0, "first request on a fresh server");
        }
        assert_eq!(
            cached2,
            expected_cached(p1, c1, p2),
            "p1={p1} c1={c1} p2={p2}"
        );
        assert!(cached2 >= 16 * ((p1 + c1 - 1) / 16) - 16 && cached2 > p1 / 2);
        // The same second turn on a server that never saw the first: nothing cached.
        let (_, v3) = post(&cold, "/v1/chat/completions", &b2).await;
        let (p3, _, cached3) = usage(&v3);
        assert_eq!(p3, p2);
        if ignore_eos {
            assert_eq!(cached3, 0);
        }
        // Identical prompt again: everything but the last (partial) block.
        let (_, v4) = post(&cold, "/v1/chat/completions", &b2).await;
        assert_eq!(usage(&v4).2, (p2 - 1) / B * B);
    }
    let st = warm.stats();
    assert_eq!(st.requests_served, 4);
    assert!(st.cached_tokens > 0);
    assert_eq!(st.cached_tokens, st.prefix_cache_hits);
}

#[tokio::test]
async fn cap_keeps_last_token_uncached() {
    let sim = start(instant("m")).await;
    // 32 token ids: a repeat can hit only the first block (⌊31/16⌋ = 1).
    let ids: Vec<u32> = (5000..5032).collect();
    let body = json!({"prompt": ids, "max_tokens": 1, "ignore_eos": true});
    assert_eq!(usage(&post(&sim, "/v1/completions", &body).await.1).2, 0);
    assert_eq!(usage(&post(&sim, "/v1/completions", &body).await.1).2, 16);
    // 33 tokens with the same 32-token start: both blocks hit.
    let ids33: Vec<u32> = (5000..5033).collect();
    let body = json!({"prompt": ids33, "max_tokens": 1, "ignore_eos": true});
    assert_eq!(usage(&post(&sim, "/v1/completions", &body).await.1).2, 32);
}

#[tokio::test]
async fn lora_adapter_is_part_of_the_block_key() {
    let sim = start(SimConfig {
        lora_modules: vec!["a".into(), "b".into()],
        max_loras: 2,
        ..instant("m")
    })
    .await;
    let ids: Vec<u32> = (7000..7100).collect();
    let req =
        |model: &str| json!({"model": model, "prompt": ids, "max_tokens": 1, "ignore_eos": true});
    assert_eq!(
        usage(&post(&sim, "/v1/completions", &req("m")).await.1).2,
        0
    );
    assert_eq!(
        usage(&post(&sim, "/v1/completions", &req("a")).await.1).2,
        0
    );
    assert_eq!(
        usage(&post(&sim, "/v1/completions", &req("b")).await.1).2,
        0
    );
    assert_eq!(
        usage(&post(&sim, "/v1/completions", &req("a")).await.1).2,
        96
    );
    assert_eq!(
        usage(&post(&sim, "/v1/completions", &req("m")).await.1).2,
        96
    );
}

#[tokio::test]
async fn generated_tokens_are_cached_as_blocks_fill() {
    let sim = start(instant("m")).await;
    // 16-token prompt + 40 generated: the continuation prompt shares 55 computed tokens.
    let ids: Vec<u32> = (9000..9016).collect();
    let (_, v) = post(
        &sim,
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 40, "ignore_eos": true}),
    )
    .await;
    let text = v["choices"][0]["text"].as_str().unwrap();
    let (_, tok) = post(&sim, "/tokenize", &json!({"prompt": text})).await;
    let mut next: Vec<u64> = ids.iter().map(|&i| i as u64).collect();
    next.extend(
        tok["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap()),
    );
    next.extend([1, 2, 3]);
    assert_eq!(next.len(), 59);
    let (_, v2) = post(
        &sim,
        "/v1/completions",
        &json!({"prompt": next, "max_tokens": 1, "ignore_eos": true}),
    )
    .await;
    // 55 computed tokens → 3 full blocks.
    assert_eq!(usage(&v2).2, 48);
}

/// Sends a 49-token prompt (3 full blocks + 1) built from `base` and returns its cached tokens.
async fn probe(sim: &vllm_sim::SimHandle, base: u32) -> u64 {
    let ids: Vec<u32> = (base..base + 49).collect();
    let (s, v) = post(
        sim,
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 1, "ignore_eos": true}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    usage(&v).2
}

#[tokio::test]
async fn eviction_drops_least_recently_used_prefixes_first() {
    // 12 usable blocks: room for exactly three 4-block requests.
    let sim = start(SimConfig {
        kv_blocks: 13,
        ..instant("m")
    })
    .await;
    let (a, b, c, d) = (10_000, 20_000, 30_000, 40_000);
    for p in [a, b, c] {
        assert_eq!(probe(&sim, p).await, 0);
    }
    // Everything still cached; using A makes B the least recently used.
    assert_eq!(probe(&sim, a).await, 48);
    // D needs 4 blocks: B's go.
    assert_eq!(probe(&sim, d).await, 0);
    assert_eq!(probe(&sim, a).await, 48);
    assert_eq!(probe(&sim, c).await, 48);
    assert_eq!(probe(&sim, d).await, 48);
    assert_eq!(probe(&sim, b).await, 0, "B was least recently used");
    // B's return evicted the now least recently used prefix, A, and nothing else.
    assert_eq!(probe(&sim, c).await, 48);
    assert_eq!(probe(&sim, d).await, 48);
    assert_eq!(probe(&sim, a).await, 0);
    assert_eq!(
        sim.stats().kv_cache_usage,
        0.0,
        "freed blocks are not usage"
    );
}

#[tokio::test]
async fn a_request_that_can_never_fit_is_refused() {
    let sim = start(SimConfig {
        kv_blocks: 5,
        ..instant("m")
    })
    .await;
    let ids: Vec<u32> = (100..200).collect();
    let (s, v) = post(
        &sim,
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 1, "ignore_eos": true}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("KV-cache blocks"));
}

/// Streams a chat request and returns (time to first content chunk, usage).
async fn timed_stream(sim: &vllm_sim::SimHandle, body: &Value) -> (Duration, Value) {
    use futures_util::StreamExt;
    let mut body = body.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let t0 = Instant::now();
    let resp = client()
        .post(format!("{}/v1/chat/completions", sim.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut s = resp.bytes_stream();
    let mut ttft = None;
    let mut buf = String::new();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.unwrap();
        if ttft.is_none() {
            ttft = Some(t0.elapsed());
        }
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let usage = sse_events(&buf)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .find(|v| v.get("usage").is_some())
        .unwrap()["usage"]
        .clone();
    (ttft.unwrap(), usage)
}

#[tokio::test]
async fn warm_cache_answers_a_long_conversation_much_faster() {
    // Default costs (5 ms overhead + 0.1 ms per uncached prompt token), at half speed so the
    // wall-clock gap (~1.2 s against ~10 ms) survives a busy machine.
    let cfg = SimConfig {
        model: "m".into(),
        time_scale: 2.0,
        ..SimConfig::default()
    };
    let warm = start(cfg.clone()).await;
    let cold = start(cfg.clone()).await;
    let document = "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(400);
    let turn1 = chat("m", &[("system", &document), ("user", "Summarise.")], 2);
    let (_, v1) = post(&warm, "/v1/chat/completions", &turn1).await;
    let reply = v1["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let turn2 = chat(
        "m",
        &[
            ("system", &document),
            ("user", "Summarise."),
            ("assistant", &reply),
            ("user", "Shorter."),
        ],
        2,
    );

    let before_warm = warm.stats().prefill_model_ms;
    let (t_warm, u_warm) = timed_stream(&warm, &turn2).await;
    let prefill_warm = warm.stats().prefill_model_ms - before_warm;
    let (t_cold, u_cold) = timed_stream(&cold, &turn2).await;
    let prefill_cold = cold.stats().prefill_model_ms;

    let n = u_cold["prompt_tokens"].as_u64().unwrap();
    assert!(n > 6000, "{n}");
    let cached = u_warm["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(u_cold["prompt_tokens_details"]["cached_tokens"], 0);
    // The simulator's own prefill model, exactly.
    assert!(
        (prefill_cold - (5.0 + 0.1 * n as f64)).abs() < 1e-6,
        "{prefill_cold}"
    );
    assert!(
        (prefill_warm - (5.0 + 0.1 * (n - cached) as f64)).abs() < 1e-6,
        "{prefill_warm}"
    );
    assert!(prefill_warm < 10.0 && prefill_cold > 600.0);
    // Wall clock, with a wide margin.
    assert!(
        t_warm * 3 < t_cold,
        "warm TTFT {t_warm:?} should be far below cold {t_cold:?}"
    );
    assert!(t_cold >= Duration::from_millis(1000), "{t_cold:?}");
}
