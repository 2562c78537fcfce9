//! The OpenAI Responses API (`/v1/responses`): the response object, the streamed events in
//! vLLM's order, `previous_response_id` continuations that hit the prefix cache, tool items
//! rendered as chat renders them, the store's 404s, stats and metrics.

mod common;

use common::*;
use serde_json::{json, Value};
use vllm_sim::{Api, SimConfig};

const B: u64 = 16;

fn usage(v: &Value) -> (u64, u64, u64) {
    let u = &v["usage"];
    (
        u["input_tokens"].as_u64().unwrap(),
        u["output_tokens"].as_u64().unwrap(),
        u["input_tokens_details"]["cached_tokens"].as_u64().unwrap(),
    )
}

fn output_text(v: &Value) -> String {
    v["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn response_object_has_vllm_shape_and_chat_prompt() {
    let sim = start(instant("m")).await;
    let body = json!({
        "model": "m",
        "instructions": "Be brief.",
        "input": "Hello there!",
        "max_output_tokens": 7,
        "ignore_eos": true,
    });
    let (status, v) = post(&sim, "/v1/responses", &body).await;
    assert_eq!(status, 200, "{v}");
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("resp_") && id.len() == 37, "{id}");
    assert_eq!(v["object"], "response");
    assert_eq!(v["model"], "m");
    assert!(v["created_at"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["instructions"], "Be brief.");
    assert_eq!(v["max_output_tokens"], 7);
    assert_eq!(v["tool_choice"], "auto");
    assert_eq!(v["tools"], json!([]));
    assert_eq!(v["temperature"], 1.0);
    assert_eq!(v["truncation"], "disabled");
    // The limit ended it: vLLM marks the response and its item incomplete.
    assert_eq!(v["status"], "incomplete");
    assert_eq!(
        v["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    let item = &v["output"][0];
    assert_eq!(v["output"].as_array().unwrap().len(), 1);
    assert_eq!(item["type"], "message");
    assert_eq!(item["role"], "assistant");
    assert_eq!(item["status"], "incomplete");
    assert!(item["id"].as_str().unwrap().starts_with("msg_"));
    let part = &item["content"][0];
    assert_eq!(part["type"], "output_text");
    assert_eq!(part["annotations"], json!([]));
    assert_eq!(part["text"].as_str().unwrap().chars().count(), 7 * 4);
    let (input, output, cached) = usage(&v);
    assert_eq!((output, cached), (7, 0));
    assert_eq!(v["usage"]["total_tokens"], input + output);
    assert_eq!(v["usage"]["output_tokens_details"]["reasoning_tokens"], 0);
    // Written to the cache: the prompt's full blocks.
    assert_eq!(
        v["usage"]["input_tokens_details"]["cache_write_tokens"],
        input / B * B
    );
    // Field order as vLLM writes it.
    let raw = client()
        .post(format!("{}/v1/responses", sim.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(raw.starts_with(r#"{"id":"resp_"#), "{raw}");
    assert!(raw.contains(r#""incomplete_details":{"reason":"max_output_tokens"},"instructions":"Be brief.","metadata":null,"model":"m","object":"response","output":[{"id":"msg_"#), "{raw}");

    // The same conversation through chat: the same prompt, hence the same ids and text.
    let (_, c) = post(
        &sim,
        "/v1/chat/completions",
        &chat("m", &[("system", "Be brief."), ("user", "Hello there!")], 7),
    )
    .await;
    assert_eq!(c["usage"]["prompt_tokens"], input);
    assert_eq!(c["choices"][0]["message"]["content"], part["text"]);

    // Without ignore_eos and with room, the model stops on its own: completed.
    let (_, v) = post(
        &sim,
        "/v1/responses",
        &json!({"model": "m", "input": "Hi", "max_output_tokens": 50}),
    )
    .await;
    assert_eq!(v["status"], "completed");
    assert!(v["incomplete_details"].is_null());
    assert_eq!(v["output"][0]["status"], "completed");
    assert!(usage(&v).1 < 50);
}

#[tokio::test]
async fn stream_sends_vllms_events_in_order() {
    let sim = start(instant("m")).await;
    let mut body = json!({
        "model": "m",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]}],
        "max_output_tokens": 5,
        "ignore_eos": true,
        "stream": true,
    });
    let events = stream_named(&sim, "/v1/responses", &body).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(["response.output_text.delta"; 5]);
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]);
    assert_eq!(names, expected);
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_str());
        assert_eq!(data["sequence_number"], i as u64, "{name}");
    }
    let created = &events[0].1["response"];
    assert_eq!(created["status"], "in_progress");
    assert!(created["usage"].is_null());
    assert_eq!(created["output"], json!([]));
    let id = created["id"].as_str().unwrap();
    let added = &events[2].1;
    assert_eq!(added["item"]["status"], "in_progress");
    assert_eq!(added["item"]["content"], json!([]));
    let item_id = added["item"]["id"].as_str().unwrap();
    assert_eq!(events[3].1["part"]["text"], "");
    let mut text = String::new();
    for (_, d) in &events[4..9] {
        assert_eq!(d["item_id"], item_id);
        assert_eq!(
            (d["output_index"].as_u64(), d["content_index"].as_u64()),
            (Some(0), Some(0))
        );
        text.push_str(d["delta"].as_str().unwrap());
    }
    assert_eq!(events[9].1["text"], text.as_str());
    assert_eq!(events[10].1["part"]["text"], text.as_str());
    assert_eq!(events[11].1["item"]["status"], "incomplete");
    let done = &events[12].1["response"];
    assert_eq!(done["id"], id);
    assert_eq!(done["status"], "incomplete");
    assert_eq!(done["output"][0]["id"], item_id);
    assert_eq!(output_text(done), text);
    assert_eq!(usage(done).1, 5);

    // The same request without streaming gives the same text.
    body["stream"] = json!(false);
    let (_, v) = post(&sim, "/v1/responses", &body).await;
    assert_eq!(output_text(&v), text);

    // A response that ends on EOS completes.
    let body = json!({"model": "m", "input": "Hi", "stream": true});
    let events = stream_named(&sim, "/v1/responses", &body).await;
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "response.completed");
    assert_eq!(data["response"]["status"], "completed");
    assert!(data["response"]["usage"]["output_tokens"].as_u64().unwrap() >= 20);
}

#[tokio::test]
async fn previous_response_id_continues_the_conversation_from_the_cache() {
    let sim = start(instant("m")).await;
    let instructions = "You are a patient assistant who explains things step by step. ".repeat(3);
    let q1 = "How does a bicycle stay upright?";
    let (_, r1) = post(
        &sim,
        "/v1/responses",
        &json!({"model": "m", "instructions": instructions, "input": q1,
                "max_output_tokens": 30, "ignore_eos": true}),
    )
    .await;
    let (p1, c1, cached1) = usage(&r1);
    assert_eq!(cached1, 0);
    let q2 = "And why does it fall when it stops?";
    let (status, r2) = post(
        &sim,
        "/v1/responses",
        &json!({"model": "m", "instructions": instructions, "input": q2,
                "previous_response_id": r1["id"], "max_output_tokens": 5}),
    )
    .await;
    assert_eq!(status, 200, "{r2}");
    let (p2, _, cached2) = usage(&r2);
    assert_eq!(r2["previous_response_id"], r1["id"]);
    // The second turn is the first one's prompt and reply plus the new input: everything the
    // first turn computed is a cache hit, as vLLM's rule says.
    assert!(p2 > p1 + c1);
    assert_eq!(cached2, expected_cached(p1 + c1 - 1, p2, B));
    assert!(cached2 > p1 / 2);
    // The prompt is the chat conversation vLLM rebuilds.
    let chat_messages = json!([
        {"role": "system", "content": instructions},
        {"role": "user", "content": q1},
        {"role": "assistant", "content": output_text(&r1)},
        {"role": "user", "content": q2},
    ]);
    assert_eq!(
        tokenize_messages(&sim, &chat_messages).await.len() as u64,
        p2
    );

    // A third turn chains on the second, here streamed.
    let events = stream_named(
        &sim,
        "/v1/responses",
        &json!({"model": "m", "instructions": instructions, "input": "Thanks!",
                "previous_response_id": r2["id"], "max_output_tokens": 3, "stream": true}),
    )
    .await;
    let done = &events.last().unwrap().1["response"];
    let (p3, _, cached3) = usage(done);
    assert!(p3 > p2 && cached3 >= cached2, "{p3} {cached3}");

    // Instructions do not carry over: without them the continuation has no system message.
    let (_, r4) = post(
        &sim,
        "/v1/responses",
        &json!({"model": "m", "input": q2, "previous_response_id": r1["id"],
                "max_output_tokens": 2}),
    )
    .await;
    let without_system = json!([
        {"role": "user", "content": q1},
        {"role": "assistant", "content": output_text(&r1)},
        {"role": "user", "content": q2},
    ]);
    assert_eq!(
        tokenize_messages(&sim, &without_system).await.len() as u64,
        usage(&r4).0
    );

    // GET returns the stored response.
    let (status, text) = get(
        &sim,
        &format!("/v1/responses/{}", r1["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(status, 200);
    let got: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(got, r1);

    // Per-API stats: all of it was Responses traffic.
    let st = sim.stats();
    let api = st.api(Api::Responses);
    assert_eq!(api.requests_received, 4);
    assert_eq!(api.requests_served, 4);
    assert!(api.cached_tokens >= cached2 + cached3);
    assert_eq!(api.cached_tokens, st.cached_tokens);
    assert_eq!(st.api(Api::ChatCompletions).requests_received, 0);
}

#[tokio::test]
async fn unknown_or_unstored_responses_are_404() {
    let sim = start(instant("m")).await;
    let other = start(instant("m")).await;
    let (status, v) = post(
        &sim,
        "/v1/responses",
        &json!({"model": "m", "input": "q", "previous_response_id": "resp_nope"}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        v["error"]["message"],
        "Response with id 'resp_nope' not found."
    );
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], "response_id");
    assert_eq!(v["error"]["code"], 404);
    assert_eq!(get(&sim, "/v1/responses/resp_nope").await.0, 404);

    // store: false keeps nothing.
    let (_, r) = post(
        &sim,
        "/v1/responses",
        &json!({"model": "m", "input": "q", "store": false, "max_output_tokens": 2}),
    )
    .await;
    let again = json!({"model": "m", "input": "q2", "previous_response_id": r["id"]});
    assert_eq!(post(&sim, "/v1/responses", &again).await.0, 404);

    // A stored response lives on the server that produced it only.
    let (_, r) = post(
        &sim,
        "/v1/responses",
        &json!({"model": "m", "input": "q", "max_output_tokens": 2}),
    )
    .await;
    let again = json!({"model": "m", "input": "q2", "previous_response_id": r["id"]});
    assert_eq!(post(&sim, "/v1/responses", &again).await.0, 200);
    assert_eq!(post(&other, "/v1/responses", &again).await.0, 404);

    // Other errors as for chat.
    let (status, v) = post(&sim, "/v1/responses", &json!({"model": "x", "input": "q"})).await;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (404, Some("NotFoundError"))
    );
    let (status, v) = post(
        &sim,
        "/v1/responses",
        &json!({"model": "m", "input": [{"type": "web_search_call"}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["param"], "input");
    assert_eq!(
        post(&sim, "/v1/responses", &json!({"model": "m"})).await.0,
        400
    );
    let (status, _) = post(
        &sim,
        "/v1/responses",
        &json!({"model": "m", "input": "q", "max_output_tokens": 0}),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn tool_items_render_as_chat_tool_messages() {
    let sim = start(instant("m")).await;
    let (status, v) = post(
        &sim,
        "/v1/responses",
        &json!({"model": "m", "max_output_tokens": 4, "ignore_eos": true, "input": [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21C"},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (_, c) = post(
        &sim,
        "/v1/chat/completions",
        &json!({"model": "m", "max_tokens": 4, "ignore_eos": true, "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
        ]}),
    )
    .await;
    assert_eq!(usage(&v).0, c["usage"]["prompt_tokens"].as_u64().unwrap());
    assert_eq!(output_text(&v), c["choices"][0]["message"]["content"]);
}

#[tokio::test]
async fn responses_count_in_metrics_and_take_faults() {
    let sim = start(SimConfig {
        model: "m".into(),
        time_scale: 0.0,
        ..SimConfig::default()
    })
    .await;
    let (_, v) = post(
        &sim,
        "/v1/responses",
        &json!({"model": "m", "input": "Count me.", "max_output_tokens": 6, "ignore_eos": true}),
    )
    .await;
    let (p, c, _) = usage(&v);
    let m = scrape(&sim).await;
    assert_eq!(m.value("vllm:prompt_tokens_total"), p as f64);
    assert_eq!(m.value("vllm:generation_tokens_total"), c as f64);
    assert_eq!(
        m.value_with("vllm:request_success_total", "finished_reason", "length"),
        1.0
    );
    sim.faults().set_fail(1.0, 503).unwrap();
    let (status, v) = post(&sim, "/v1/responses", &json!({"model": "m", "input": "x"})).await;
    assert_eq!(status, 503);
    assert!(v["error"].is_object());
    assert_eq!(sim.stats().requests_failed, 1);
}
