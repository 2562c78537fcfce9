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
    let (first, reason) =
        routed(&client, &proxy, "/v1/messages", &turn("you are a coder", 1)).await;
    assert_eq!(reason, "prefix_miss");
    let (second, reason) =
        routed(&client, &proxy, "/v1/messages", &turn("you are a coder", 2)).await;
    assert_eq!(
        (second.as_str(), reason.as_str()),
        (first.as_str(), "prefix_hit")
    );
    // The same messages under another system prompt share nothing with it.
    let (_, reason) = routed(&client, &proxy, "/v1/messages", &turn("you are a poet", 2)).await;
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
    let (first, reason) = routed(&client, &proxy, "/v1/responses", &items(1)).await;
    assert_eq!(reason, "prefix_miss");
    for turns in 2..4 {
        let (next, reason) = routed(&client, &proxy, "/v1/responses", &items(turns)).await;
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

/// One Responses API call to `proxy`: its status, endpoint, pick reason and response id (from the
/// JSON, or from the stream's `response.created` event).
async fn respond(
    client: &reqwest::Client,
    proxy: &Proxy,
    body: Value,
) -> (u16, String, String, Option<String>) {
    let stream = body["stream"].as_bool().unwrap_or(false);
    let resp = client
        .post(proxy.url("/v1/responses"))
        .json(&body)
        .send()
        .await
        .expect("send");
    let status = resp.status().as_u16();
    let header = |name: &str| resp.headers()[name].to_str().expect("header").to_string();
    let (endpoint, reason) = (header("x-llm-lb-endpoint"), header("x-llm-lb-reason"));
    let text = resp.text().await.expect("body");
    let answer: Value = match stream {
        false => serde_json::from_str(&text).expect("json"),
        true => {
            let created = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .map(|d| serde_json::from_str::<Value>(d).expect("event"))
                .find(|e| e["type"] == "response.created")
                .expect("response.created");
            created["response"].clone()
        }
    };
    let id = answer["id"].as_str().map(str::to_owned);
    (status, endpoint, reason, id)
}

/// A Responses conversation carried by `previous_response_id` (the engine keeps the
/// conversation; each request sends only the new input) through `prefix_cache` on two
/// `vllm-sim` servers, which — as vLLM — answer 404 for a response they did not store: every
/// turn, streamed or not, goes to the endpoint that stored the previous response, even while that
/// endpoint is busier than the guard allows a prefix hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_response_id_goes_where_the_response_is_stored() {
    // A guard of 0: any difference in load diverts a prefix or session hit.
    let guard = "lb_config: {loadGuardAbsolute: 0, loadGuardRelative: 0}";
    continues_where_stored("prefix_cache", guard, "prefix_miss").await;
}

/// The same with `kv_aware` and `latency_aware`, which keep the ids in the store (or, for
/// `latency_aware` without shared counts, in memory) the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_aware_and_latency_aware_continue_responses_where_stored() {
    continues_where_stored("kv_aware", "lb_config: {}", "kv_miss").await;
    continues_where_stored("latency_aware", "lb_config: {}", "latency_score").await;
}

/// A Responses API conversation through `policy` (with `lb_config`) on two vllm-sims, which
/// answer 404 to an id they did not store: its first turn is placed by the policy
/// (`first_reason`), every later one goes where the previous response is stored, also while a
/// long answer keeps that endpoint busy; an unrelated request is placed by load.
async fn continues_where_stored(policy: &str, lb_config: &str, first_reason: &str) {
    let sims = sim_fleet(
        2,
        vllm_sim::SimConfig {
            model: "m".into(),
            itl_ms: 20.0,
            ..vllm_sim::SimConfig::default()
        },
    )
    .await;
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr()).collect();
    let proxy = Proxy::start(&format!(
        "expose_endpoint_header: true\npools:\n{}",
        pool_yaml(
            "p",
            "[m]",
            &addrs,
            policy,
            &format!("    health_check: {{enabled: false}}\n    {lb_config}\n")
        )
    ));
    let client = reqwest::Client::new();
    let ask = |input: &str, previous: Option<&str>, stream: bool, max: u32| {
        json!({"model": "m", "input": input, "previous_response_id": previous,
               "stream": stream, "max_output_tokens": max})
    };
    let (status, home, reason, id) =
        respond(&client, &proxy, ask("plan a trip", None, false, 4)).await;
    assert_eq!((status, reason.as_str()), (200, first_reason), "{policy}");
    let mut previous = id.expect("an id");
    for turn in 0..6 {
        let body = ask(
            &format!("and then {turn}?"),
            Some(&previous),
            turn % 2 == 1,
            4,
        );
        let (status, endpoint, reason, id) = respond(&client, &proxy, body).await;
        assert_eq!(
            (status, endpoint.as_str(), reason.as_str()),
            (200, home.as_str(), "response_hit"),
            "{policy}: turn {turn}"
        );
        previous = id.expect("an id");
    }
    // A long answer keeps the home endpoint busy; a fork of the conversation still goes there.
    let long = tokio::spawn({
        let (client, body) = (
            client.clone(),
            ask("write a long story", Some(&previous), true, 300),
        );
        let url = proxy.url("/v1/responses");
        async move {
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("send")
                .text()
                .await
        }
    });
    eventually(
        "the long answer in flight",
        Duration::from_secs(10),
        async || match proxy
            .metric("llmlb_endpoint_inflight", &[("endpoint", home.as_str())])
            .await
        {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    let (status, endpoint, reason, _) = respond(
        &client,
        &proxy,
        ask("or a short one", Some(&previous), false, 4),
    )
    .await;
    assert_eq!(
        (status, endpoint.as_str(), reason.as_str()),
        (200, home.as_str(), "response_hit"),
        "{policy}"
    );
    // Without the id, the same kind of request is placed by load: to the other endpoint.
    let (_, endpoint, _, _) = respond(&client, &proxy, ask("unrelated", None, false, 4)).await;
    assert_ne!(endpoint, home, "{policy}");
    long.abort();
}
