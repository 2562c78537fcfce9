//! The Anthropic Messages API (`/v1/messages`): the message object and its usage split into
//! cache reads, cache writes and the rest, the streamed events in vLLM's order, a
//! conversation's second turn served from the cache, system prompts that share only the
//! template's common prefix, and Anthropic-shaped errors.

mod common;

use common::*;
use serde_json::{json, Value};
use vllm_sim::Api;

const B: u64 = 16;

/// (input, output, cache creation, cache read) and their prompt total.
fn usage(u: &Value) -> (u64, u64, u64, u64) {
    let f = |k: &str| u[k].as_u64().unwrap_or_else(|| panic!("no {k} in {u}"));
    (
        f("input_tokens"),
        f("output_tokens"),
        f("cache_creation_input_tokens"),
        f("cache_read_input_tokens"),
    )
}

fn prompt_total(u: &Value) -> u64 {
    let (i, _, w, r) = usage(u);
    i + w + r
}

fn text(v: &Value) -> String {
    v["content"][0]["text"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn message_has_vllms_shape_and_the_chat_prompt() {
    let sim = start(instant("m")).await;
    let body = json!({
        "model": "m",
        "max_tokens": 6,
        "min_tokens": 6,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hello there!"}],
    });
    let (status, v) = post(&sim, "/v1/messages", &body).await;
    assert_eq!(status, 200, "{v}");
    // vLLM answers with its chat completion's id.
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "m");
    assert_eq!(v["content"].as_array().unwrap().len(), 1);
    assert_eq!(v["content"][0]["type"], "text");
    assert_eq!(text(&v).chars().count(), 6 * 4);
    assert_eq!(v["stop_reason"], "max_tokens");
    assert!(v.get("stop_sequence").is_none(), "vLLM drops null fields");
    let (input, output, created, read) = usage(&v["usage"]);
    assert_eq!((output, read), (6, 0));
    // Cold cache: the full prompt blocks are written, the partial last block is the rest.
    let (_, c) = post(
        &sim,
        "/v1/chat/completions",
        &chat("m", &[("system", "Be brief."), ("user", "Hello there!")], 6),
    )
    .await;
    let prompt = c["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(input + created + read, prompt);
    assert_eq!(created, prompt / B * B);
    assert_eq!(input, prompt % B);
    assert_eq!(c["choices"][0]["message"]["content"], text(&v).as_str());

    // A reply that ends on EOS: end_turn.
    let (_, v) = post(
        &sim,
        "/v1/messages",
        &json!({"model": "m", "max_tokens": 200,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}),
    )
    .await;
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(usage(&v["usage"]).1 < 200);
}

#[tokio::test]
async fn stream_sends_anthropics_events_in_order() {
    let sim = start(instant("m")).await;
    let mut body = json!({
        "model": "m",
        "max_tokens": 4,
        "min_tokens": 4,
        "stream": true,
        "messages": [{"role": "user", "content": "Tell me a story."}],
    });
    let events = stream_named(&sim, "/v1/messages", &body).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let mut expected = vec!["message_start", "content_block_start"];
    expected.extend(["content_block_delta"; 4]);
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str());
    }
    let start_msg = &events[0].1["message"];
    assert!(start_msg["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(start_msg["type"], "message");
    assert_eq!(start_msg["role"], "assistant");
    assert_eq!(start_msg["content"], json!([]));
    assert!(start_msg["stop_reason"].is_null() && start_msg["stop_sequence"].is_null());
    assert_eq!(usage(&start_msg["usage"]).1, 0);
    assert_eq!(
        events[1].1,
        json!({"type": "content_block_start", "content_block": {"type": "text", "text": ""}, "index": 0})
    );
    let mut streamed = String::new();
    for (_, d) in &events[2..6] {
        assert_eq!(d["index"], 0);
        assert_eq!(d["delta"]["type"], "text_delta");
        streamed.push_str(d["delta"]["text"].as_str().unwrap());
    }
    assert_eq!(
        events[6].1,
        json!({"type": "content_block_stop", "index": 0})
    );
    let delta = &events[7].1;
    assert_eq!(
        delta["delta"],
        json!({"stop_reason": "max_tokens", "stop_sequence": null})
    );
    assert_eq!(usage(&delta["usage"]).1, 4);
    assert_eq!(
        prompt_total(&delta["usage"]),
        prompt_total(&start_msg["usage"])
    );
    assert_eq!(events[8].1, json!({"type": "message_stop"}));

    body["stream"] = json!(false);
    let (_, v) = post(&sim, "/v1/messages", &body).await;
    assert_eq!(text(&v), streamed);
}

#[tokio::test]
async fn a_conversations_second_turn_reads_the_cache() {
    let sim = start(instant("m")).await;
    let system = "You are a careful assistant. Answer with short, precise sentences. ".repeat(3);
    let q1 = "What is the capital of France?";
    let (_, r1) = post(
        &sim,
        "/v1/messages",
        &json!({"model": "m", "system": system, "max_tokens": 25, "min_tokens": 25,
                "messages": [{"role": "user", "content": q1}]}),
    )
    .await;
    let p1 = prompt_total(&r1["usage"]);
    let c1 = usage(&r1["usage"]).1;
    assert_eq!(usage(&r1["usage"]).3, 0);
    let turn2 = json!({"model": "m", "system": system, "max_tokens": 5, "stream": true,
    "messages": [
        {"role": "user", "content": q1},
        {"role": "assistant", "content": [{"type": "text", "text": text(&r1)}]},
        {"role": "user", "content": "And its population?"},
    ]});
    let events = stream_named(&sim, "/v1/messages", &turn2).await;
    let start_usage = &events[0].1["message"]["usage"];
    let end_usage = &events.iter().rev().nth(1).unwrap().1["usage"];
    let p2 = prompt_total(end_usage);
    let read = usage(end_usage).3;
    assert_eq!(read, expected_cached(p1 + c1 - 1, p2, B));
    assert!(read > p1 / 2, "{read} of {p2}");
    // message_start already knows the split, as in vLLM 0.34.
    assert_eq!(usage(start_usage).3, read);
    assert_eq!(usage(end_usage).2, p2 / B * B - read);
    let st = sim.stats();
    assert_eq!(st.api(Api::Messages).cached_tokens, read);
    assert_eq!(st.api(Api::Messages).requests_served, 2);
    assert_eq!(st.api(Api::Responses).requests_received, 0);
}

#[tokio::test]
async fn different_system_prompts_share_only_the_common_prefix() {
    let sim = start(instant("m")).await;
    let shared = "Shared policy text that every tenant's system prompt starts with. ".repeat(3);
    let ask = |system: String| {
        json!({"model": "m", "max_tokens": 1, "system": system,
               "messages": [{"role": "user", "content": "Same question for everyone."}]})
    };
    let sys_a = format!("{shared}Tenant A: answer in French.");
    let sys_b = format!("{shared}Tenant B: answer in German.");
    let (_, a) = post(&sim, "/v1/messages", &ask(sys_a.clone())).await;
    assert_eq!(usage(&a["usage"]).3, 0);
    let (_, b) = post(&sim, "/v1/messages", &ask(sys_b.clone())).await;
    let read_b = usage(&b["usage"]).3;
    // The common prefix of the two renderings, in whole blocks, and nothing more.
    let user = json!({"role": "user", "content": "Same question for everyone."});
    let ta = tokenize_messages(&sim, &json!([{"role": "system", "content": sys_a}, user])).await;
    let tb = tokenize_messages(&sim, &json!([{"role": "system", "content": sys_b}, user])).await;
    let common = ta.iter().zip(&tb).take_while(|(x, y)| x == y).count() as u64;
    assert!(common >= 2 * B && (common as usize) < tb.len());
    assert_eq!(read_b, common / B * B);
    assert_eq!(prompt_total(&b["usage"]), tb.len() as u64);
    // A system prompt with nothing in common shares only the template's opening (less than a
    // block with the stand-in's ChatML): nothing cached.
    let (_, c) = post(&sim, "/v1/messages", &ask("Entirely different.".into())).await;
    assert_eq!(usage(&c["usage"]).3, 0);
    // The same request again reads everything but its last partial block.
    let (_, b2) = post(&sim, "/v1/messages", &ask(sys_b)).await;
    assert_eq!(usage(&b2["usage"]).3, (tb.len() as u64 - 1) / B * B);
}

#[tokio::test]
async fn messages_and_chat_share_the_cache() {
    let sim = start(instant("m")).await;
    let system = "A long and detailed system prompt for the shared cache test. ".repeat(4);
    let (_, c) = post(
        &sim,
        "/v1/chat/completions",
        &chat("m", &[("system", &system), ("user", "Question?")], 3),
    )
    .await;
    let p = c["usage"]["prompt_tokens"].as_u64().unwrap();
    let (_, m) = post(
        &sim,
        "/v1/messages",
        &json!({"model": "m", "max_tokens": 3, "system": system,
                "messages": [{"role": "user", "content": "Question?"}]}),
    )
    .await;
    assert_eq!(usage(&m["usage"]).3, (p - 1) / B * B);
    let st = sim.stats();
    assert_eq!(st.api(Api::ChatCompletions).cached_tokens, 0);
    assert_eq!(st.api(Api::Messages).cached_tokens, (p - 1) / B * B);
}

#[tokio::test]
async fn errors_take_anthropics_shape() {
    let sim = start(instant("m")).await;
    let (status, v) = post(
        &sim,
        "/v1/messages",
        &json!({"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        v,
        json!({"type": "error", "error": {"type": "not_found_error",
               "message": "The model `nope` does not exist."}})
    );
    // Too long for the context: a handler error, Anthropic-shaped.
    let (status, v) = post(
        &sim,
        "/v1/messages",
        &json!({"model": "m", "max_tokens": 40000, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    // A body that does not validate gets vLLM's generic (OpenAI-shaped) 400.
    let (status, v) = post(
        &sim,
        "/v1/messages",
        &json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], 400);
    // Injected failures are the engine's errors: Anthropic-shaped.
    sim.faults().set_fail(1.0, 503).unwrap();
    let (status, v) = post(
        &sim,
        "/v1/messages",
        &json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 503);
    assert_eq!(v["error"]["type"], "overloaded_error");
    assert_eq!(v["type"], "error");
}
