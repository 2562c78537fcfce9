//! The OpenAI-compatible API: response shapes (JSON and SSE), output lengths, model list,
//! errors.

mod common;

use common::*;
use serde_json::{json, Value};
use vllm_sim::SimConfig;

fn assert_usage(u: &Value, prompt: u64, completion: u64) {
    assert_eq!(u["prompt_tokens"], prompt);
    assert_eq!(u["completion_tokens"], completion);
    assert_eq!(u["total_tokens"], prompt + completion);
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64(), "{u}");
}

#[tokio::test]
async fn chat_json_has_vllm_shape() {
    let sim = start(instant("m")).await;
    let (status, v) = post(
        &sim,
        "/v1/chat/completions",
        &chat("m", &[("system", "Be brief."), ("user", "Hello!")], 7),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "m");
    let c = &v["choices"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["message"]["role"], "assistant");
    assert_eq!(c["finish_reason"], "length");
    assert!(c["stop_reason"].is_null());
    assert!(c["logprobs"].is_null());
    assert_eq!(c["message"]["tool_calls"], json!([]));
    // ignore_eos: exactly max_tokens tokens of 4 characters each.
    assert_eq!(
        c["message"]["content"].as_str().unwrap().chars().count(),
        7 * 4
    );
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 5);
    assert_usage(&v["usage"], prompt, 7);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    // Field order as vLLM writes it.
    let (_, raw) = {
        let resp = client()
            .post(format!("{}/v1/chat/completions", sim.url()))
            .json(&chat("m", &[("user", "Hello!")], 1))
            .send()
            .await
            .unwrap();
        (resp.status(), resp.text().await.unwrap())
    };
    assert!(raw.starts_with(r#"{"id":"chatcmpl-"#), "{raw}");
    assert!(
        raw.contains(r#""object":"chat.completion","created":"#),
        "{raw}"
    );
}

#[tokio::test]
async fn completion_json_has_vllm_shape() {
    let sim = start(instant("m")).await;
    let (status, v) = post(
        &sim,
        "/v1/completions",
        &json!({"model": "m", "prompt": "Once upon a time", "max_tokens": 3, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap().len(), 12);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // "Once upon a time" is 16 characters: 4 tokens.
    assert_usage(&v["usage"], 4, 3);
    // Token-id prompts are taken as they are.
    let (status, v) = post(
        &sim,
        "/v1/completions",
        &json!({"prompt": [1000, 1001, 1002], "max_tokens": 2, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "m");
    assert_usage(&v["usage"], 3, 2);
}

#[tokio::test]
async fn chat_stream_sends_role_tokens_finish_usage_done() {
    let sim = start(instant("m")).await;
    let mut body = chat("m", &[("user", "Tell me a story.")], 5);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = stream(&sim, "/v1/chat/completions", &body).await;
    // role, 5 tokens, usage, [DONE]
    assert_eq!(events.len(), 8, "{events:#?}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..7]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    for c in &chunks {
        assert_eq!(c["id"], id);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "m");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let mut text = String::new();
    for (i, c) in chunks[1..6].iter().enumerate() {
        let choice = &c["choices"][0];
        let t = choice["delta"]["content"].as_str().unwrap();
        assert_eq!(t.chars().count(), 4, "one token per chunk");
        text.push_str(t);
        if i < 4 {
            assert!(choice["finish_reason"].is_null());
            assert!(c.get("usage").is_none());
        } else {
            assert_eq!(choice["finish_reason"], "length");
            assert!(choice["stop_reason"].is_null());
        }
    }
    let usage = &chunks[6];
    assert_eq!(usage["choices"], json!([]));
    let prompt = usage["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_usage(&usage["usage"], prompt, 5);

    // The same request without streaming yields the same text (deterministic output).
    let (_, v) = post(
        &sim,
        "/v1/chat/completions",
        &chat("m", &[("user", "Tell me a story.")], 5),
    )
    .await;
    assert_eq!(v["choices"][0]["message"]["content"], text);

    // Without include_usage: no usage chunk.
    body["stream_options"] = json!({"include_usage": false});
    let events = stream(&sim, "/v1/chat/completions", &body).await;
    assert_eq!(events.len(), 7);
    assert!(!events.iter().any(|e| e.contains("\"usage\"")));
}

#[tokio::test]
async fn completion_stream_sends_tokens_and_done() {
    let sim = start(instant("m")).await;
    let body = json!({"model": "m", "prompt": "abc", "max_tokens": 3, "ignore_eos": true,
                      "stream": true, "stream_options": {"include_usage": true, "continuous_usage_stats": true}});
    let events = stream(&sim, "/v1/completions", &body).await;
    assert_eq!(events.len(), 5, "{events:#?}");
    let chunks: Vec<Value> = events[..4]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    for (i, c) in chunks[..3].iter().enumerate() {
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["choices"][0]["text"].as_str().unwrap().len(), 4);
        assert_eq!(c["usage"]["completion_tokens"], i as u64 + 1);
    }
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[3]["usage"]["completion_tokens"], 3);
    assert_eq!(events[4], "[DONE]");
}

#[tokio::test]
async fn output_length_rules() {
    let sim = start(instant("m")).await;
    // max_completion_tokens wins over max_tokens.
    let (_, v) = post(
        &sim,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
                "max_completion_tokens": 4, "ignore_eos": true}),
    )
    .await;
    assert_eq!(v["usage"]["completion_tokens"], 4);
    // Without ignore_eos the "model" stops between half the limit and the limit; a stop ends
    // with an EOS token that adds no text.
    let mut saw_stop = false;
    for i in 0..40 {
        let content = format!("question {i}");
        let (_, v) = post(
            &sim,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": content}], "max_tokens": 20}),
        )
        .await;
        let n = v["usage"]["completion_tokens"].as_u64().unwrap();
        assert!((10..=20).contains(&n), "{n}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        match v["choices"][0]["finish_reason"].as_str().unwrap() {
            "length" => assert_eq!(n, 20),
            "stop" => {
                saw_stop = true;
                assert_eq!(text.len() as u64, (n - 1) * 4);
            }
            other => panic!("finish_reason {other}"),
        }
    }
    assert!(saw_stop);
    // No limit at all: a short answer.
    let (_, v) = post(&sim, "/v1/completions", &json!({"prompt": "hello"})).await;
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((20..=60).contains(&n), "{n}");
}

#[tokio::test]
async fn same_seed_same_text_other_seed_other_text() {
    let a = start(SimConfig {
        seed: 1,
        ..instant("m")
    })
    .await;
    let b = start(SimConfig {
        seed: 1,
        ..instant("m")
    })
    .await;
    let c = start(SimConfig {
        seed: 2,
        ..instant("m")
    })
    .await;
    let body =
        json!({"messages": [{"role": "user", "content": "same question"}], "max_tokens": 30});
    let text = |v: Value| v["choices"][0]["message"]["content"].clone();
    let ta = text(post(&a, "/v1/chat/completions", &body).await.1);
    let tb = text(post(&b, "/v1/chat/completions", &body).await.1);
    let tc = text(post(&c, "/v1/chat/completions", &body).await.1);
    assert_eq!(ta, tb);
    assert_ne!(ta, tc);
}

#[tokio::test]
async fn models_lists_base_and_lora_adapters() {
    let sim = start(SimConfig {
        lora_modules: vec!["sql-lora".into(), "tweet-lora=/adapters/tweet".into()],
        max_loras: 2,
        ..instant("base")
    })
    .await;
    let (status, body) = get(&sim, "/v1/models").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["base", "sql-lora", "tweet-lora"]);
    assert_eq!(data[0]["owned_by"], "vllm");
    assert_eq!(data[0]["root"], "base");
    assert!(data[0]["parent"].is_null());
    assert_eq!(data[0]["max_model_len"], 32768);
    assert_eq!(data[2]["root"], "/adapters/tweet");
    assert_eq!(data[2]["parent"], "base");
    assert_eq!(data[1]["object"], "model");
    // A LoRA request is served under its own name.
    let (status, v) = post(
        &sim,
        "/v1/chat/completions",
        &chat("tweet-lora", &[("user", "hi")], 2),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "tweet-lora");
}

#[tokio::test]
async fn long_prompts_are_accepted() {
    let sim = start(instant("m")).await;
    // ~120k characters: 30k tokens, well past small default body limits.
    let text = "0123456789".repeat(12_000);
    let (status, v) = post(
        &sim,
        "/v1/completions",
        &json!({"prompt": text, "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 30_000);
}

#[tokio::test]
async fn errors_are_vllm_shaped() {
    let sim = start(SimConfig {
        max_model_len: 100,
        ..instant("m")
    })
    .await;
    let check = |status: u16, v: &Value, want: u16, kind: &str| {
        assert_eq!(status, want, "{v}");
        assert_eq!(v["error"]["code"], want);
        assert_eq!(v["error"]["type"], kind);
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    };
    // Malformed JSON.
    let resp = client()
        .post(format!("{}/v1/chat/completions", sim.url()))
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    check(status, &v, 400, "BadRequestError");
    for body in [
        json!({"model": "m"}),
        json!({"messages": []}),
        json!({"messages": "hi"}),
        json!({"messages": [{"role": "user", "content": "x"}], "n": 2}),
        json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
        json!({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}),
        json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}),
        json!({"messages": [{"role": "user", "content": "x".repeat(1000)}]}),
    ] {
        let (status, v) = post(&sim, "/v1/chat/completions", &body).await;
        check(status, &v, 400, "BadRequestError");
    }
    let (status, v) = post(
        &sim,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("maximum context length is 100 tokens"));
    for body in [
        json!({"prompt": []}),
        json!({"prompt": ["a", "b"]}),
        json!({"prompt": 5}),
        json!({"prompt": [-1]}),
    ] {
        let (status, v) = post(&sim, "/v1/completions", &body).await;
        check(status, &v, 400, "BadRequestError");
    }
    let (status, v) = post(
        &sim,
        "/v1/chat/completions",
        &chat("other", &[("user", "x")], 1),
    )
    .await;
    check(status, &v, 404, "NotFoundError");
    assert_eq!(v["error"]["message"], "The model `other` does not exist.");
    let (status, v) = post(
        &sim,
        "/v1/completions",
        &json!({"model": "other", "prompt": "x"}),
    )
    .await;
    check(status, &v, 404, "NotFoundError");
}

#[tokio::test]
async fn health_version_tokenize() {
    let sim = start(instant("m")).await;
    assert_eq!(get(&sim, "/health").await, (200, String::new()));
    assert_eq!(
        get(&sim, "/nope").await,
        (404, r#"{"detail":"Not Found"}"#.to_string())
    );
    let (status, body) = get(&sim, "/version").await;
    assert_eq!(status, 200);
    assert!(body.contains("version"));
    let (status, v) = post(
        &sim,
        "/tokenize",
        &json!({"model": "m", "prompt": "abcdefgh"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["count"], 2);
    let (_, v1) = post(
        &sim,
        "/tokenize",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let (_, v2) = post(
        &sim,
        "/tokenize",
        &json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " the"}, {"role": "user", "content": "more"}]}),
    )
    .await;
    let t1 = v1["tokens"].as_array().unwrap();
    let t2 = v2["tokens"].as_array().unwrap();
    assert_eq!(
        &t2[..t1.len()],
        &t1[..],
        "a growing conversation is a growing token prefix"
    );
    // Multi-part content is read as its text.
    let (_, v3) = post(
        &sim,
        "/tokenize",
        &json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
    )
    .await;
    assert_eq!(v3["tokens"], v1["tokens"]);
}
