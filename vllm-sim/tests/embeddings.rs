//! `/v1/embeddings`: the list shape and usage, every input form, `dimensions`, base64, and
//! prefill-only requests that go through the engine (queue, batch, cache, metrics).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use vllm_sim::{Api, SimConfig};

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Decodes standard base64 (test side, independent of the server's encoder).
fn unbase64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 {c}"),
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in s {
        acc = (acc << 6) | u32::from(val(c));
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[tokio::test]
async fn embeddings_have_vllms_shape_and_usage() {
    let sim = start(instant("m")).await;
    let (status, v) = post(
        &sim,
        "/v1/embeddings",
        &json!({"model": "m", "input": "The quick brown fox jumps over the lazy dog."}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("embd-"));
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "m");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let d = &v["data"][0];
    assert_eq!(
        (d["index"].as_u64(), d["object"].as_str()),
        (Some(0), Some("embedding"))
    );
    let e = floats(&d["embedding"]);
    assert_eq!(e.len(), 1024);
    assert!((norm(&e) - 1.0).abs() < 1e-4);
    // 44 characters: 11 stand-in tokens.
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 11, "total_tokens": 11, "completion_tokens": 0,
               "completion_tokens_details": null})
    );
    // Deterministic: the same input, the same vector; another input, another one.
    let (_, again) = post(
        &sim,
        "/v1/embeddings",
        &json!({"input": "The quick brown fox jumps over the lazy dog."}),
    )
    .await;
    assert_eq!(again["data"][0]["embedding"], d["embedding"]);
    let (_, other) = post(&sim, "/v1/embeddings", &json!({"input": "Something else."})).await;
    assert_ne!(other["data"][0]["embedding"], d["embedding"]);
}

#[tokio::test]
async fn every_input_form_and_option() {
    let sim = start(SimConfig {
        embedding_dim: 64,
        ..instant("m")
    })
    .await;
    let (_, v) = post(
        &sim,
        "/v1/embeddings",
        &json!({"input": ["abcd", "abcdefgh", [5000, 5001, 5002]]}),
    )
    .await;
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i as u64);
        assert_eq!(floats(&d["embedding"]).len(), 64);
    }
    assert_eq!(v["usage"]["prompt_tokens"], 1 + 2 + 3);
    let (_, ids) = post(
        &sim,
        "/v1/embeddings",
        &json!({"input": [5000, 5001, 5002]}),
    )
    .await;
    assert_eq!(ids["data"][0]["embedding"], data[2]["embedding"]);

    // dimensions: the leading components, normalised again.
    let (_, short) = post(
        &sim,
        "/v1/embeddings",
        &json!({"input": [5000, 5001, 5002], "dimensions": 8}),
    )
    .await;
    let s = floats(&short["data"][0]["embedding"]);
    assert_eq!(s.len(), 8);
    assert!((norm(&s) - 1.0).abs() < 1e-4);
    let full = floats(&data[2]["embedding"]);
    let head_norm = norm(&full[..8]);
    for (x, y) in s.iter().zip(&full[..8]) {
        assert!((x - y / head_norm).abs() < 1e-4);
    }
    for bad in [0, 65] {
        let (status, v) = post(
            &sim,
            "/v1/embeddings",
            &json!({"input": "x", "dimensions": bad}),
        )
        .await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["param"], "dimensions");
    }

    // base64: little-endian float32 of the same vector.
    let (_, b) = post(
        &sim,
        "/v1/embeddings",
        &json!({"input": [5000, 5001, 5002], "encoding_format": "base64"}),
    )
    .await;
    let bytes = unbase64(b["data"][0]["embedding"].as_str().unwrap());
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    // (serde_json's float parsing may miss the last bit of an f64; the f32 values agree.)
    let full32: Vec<f32> = full.iter().map(|&x| x as f32).collect();
    assert_eq!(decoded, full32);

    for bad in [
        json!({"input": []}),
        json!({"input": ""}),
        json!({"input": [{"role": "user", "content": "x"}]}),
        json!({"input": "x", "encoding_format": "bytes"}),
        json!({"input": "x", "embed_dtype": "float16"}),
        json!({"model": "m"}),
    ] {
        assert_eq!(post(&sim, "/v1/embeddings", &bad).await.0, 400, "{bad}");
    }
    let (status, v) = post(&sim, "/v1/embeddings", &json!({"model": "x", "input": "x"})).await;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (404, Some("NotFoundError"))
    );
}

#[tokio::test]
async fn embeddings_are_prefill_only_engine_requests() {
    // One batch seat and a slow prefill: concurrent embeddings queue behind each other.
    let sim = start(SimConfig {
        model: "m".into(),
        max_num_seqs: 1,
        time_scale: 1.0,
        prefill_overhead_ms: 150.0,
        prefill_ms_per_token: 0.0,
        ..SimConfig::default()
    })
    .await;
    let input =
        "A prompt long enough to span a few KV-cache blocks of sixteen tokens each. ".repeat(2);
    let url = format!("{}/v1/embeddings", sim.url());
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let (url, body) = (url.clone(), json!({"input": input}));
        tasks.push(tokio::spawn(async move {
            client()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    wait_until(5, "one running and the others waiting", || {
        let st = sim.stats();
        st.running == 1 && st.waiting >= 1
    })
    .await;
    let m = scrape(&sim).await;
    assert_eq!(m.value("vllm:num_requests_running"), 1.0);
    assert!(m.value("vllm:num_requests_waiting") >= 1.0);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let st = sim.stats();
    let e = st.api(Api::Embeddings);
    let prompt = (input.chars().count() as u64).div_ceil(4);
    assert_eq!(e.requests_received, 3);
    assert_eq!(e.requests_served, 3);
    assert_eq!(e.prompt_tokens, 3 * prompt);
    assert_eq!(e.generation_tokens, 0);
    // The later ones found the first one's blocks in the prefix cache.
    assert_eq!(e.cached_tokens, 2 * ((prompt - 1) / 16 * 16));
    assert_eq!(st.generation_tokens, 0);
    assert_eq!(st.ttft_count, 3);
    let m = scrape(&sim).await;
    assert_eq!(m.value("vllm:prompt_tokens_total"), (3 * prompt) as f64);
    assert_eq!(m.value("vllm:generation_tokens_total"), 0.0);
    assert_eq!(
        m.value_with("vllm:request_success_total", "finished_reason", "stop"),
        3.0
    );
    assert_eq!(
        m.value("vllm:prefix_cache_hits_total"),
        e.cached_tokens as f64
    );
    // Prefill time was charged once per request (the overhead), no decode.
    assert!(
        (st.prefill_model_ms - 3.0 * 150.0).abs() < 1e-6,
        "{}",
        st.prefill_model_ms
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(sim.stats().running, 0);
}
