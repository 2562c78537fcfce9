//! Session affinity end to end: a session named by a header (or a body field) stays on one
//! endpoint across three llm-lb replicas sharing a real `redis-server`, whatever its prompts, and
//! moves — then sticks where it moved — when that endpoint is over the load guard or gone.

mod common;
mod redis_harness;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use common::*;
use redis_harness::RedisServer;
use serde_json::{json, Value};

/// Where a request went and why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Routed {
    endpoint: String,
    reason: String,
}

/// Turn `turn` of an agent's conversation: every earlier step and its answer, then step `turn`.
fn turn(turn: usize) -> Vec<Value> {
    let mut messages = vec![json!({"role": "system", "content": "You are a coding agent."})];
    for i in 0..turn {
        messages.push(json!({"role": "user", "content": format!("step {i}")}));
        messages.push(json!({"role": "assistant", "content": format!("did {i}")}));
    }
    messages.push(json!({"role": "user", "content": format!("step {turn}")}));
    messages
}

/// A chat request of session `session` (header `x-session-id`) with `messages`.
async fn ask(client: &reqwest::Client, proxy: &Proxy, session: &str, messages: &[Value]) -> Routed {
    ask_with(
        client,
        proxy,
        session,
        json!({"model": "m", "messages": messages}),
    )
    .await
}

/// A chat request of session `session` (header `x-session-id`) with `body`.
async fn ask_with(client: &reqwest::Client, proxy: &Proxy, session: &str, body: Value) -> Routed {
    let resp = client
        .post(proxy.url("/v1/chat/completions"))
        .header("x-session-id", session)
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let header = |n: &str| resp.headers()[n].to_str().expect("header").to_string();
    Routed {
        endpoint: header("x-llm-lb-endpoint"),
        reason: header("x-llm-lb-reason"),
    }
}

fn pool(policy: &str, addrs: &[SocketAddr], extra: &str) -> String {
    format!(
        "expose_endpoint_header: true\npools:\n{}",
        pool_yaml(
            "p",
            "[m]",
            addrs,
            policy,
            &format!("    health_check: {{interval_ms: 100, unhealthy_threshold: 1}}\n{extra}")
        )
    )
}

/// Wait until no replica counts anything in flight in pool `p` in `redis`.
async fn settled(redis: &RedisServer) {
    eventually(
        "no request counted in Redis",
        std::time::Duration::from_secs(10),
        async || match redis.cli(&["HLEN", "llmlb:{p}:total"]) {
            Ok(n) if n.trim() == "0" => Ok(()),
            other => Err(format!(
                "{other:?}: {:?} {:?}",
                redis.cli(&["HGETALL", "llmlb:{p}:total"]),
                redis.cli(&["HGETALL", "llmlb:{p}:inflight"])
            )),
        },
    )
    .await;
}

/// How one policy is tried.
struct Case {
    policy: &'static str,
    /// `lb_config` keys besides the Redis address.
    lb_config: &'static str,
    /// Requests of the session held at its endpoint to put it over the guard.
    held: usize,
    /// What every other request of the session adds to its body.
    extra: Value,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stays_across_replicas_and_moves_when_its_endpoint_is_busy_or_gone() {
    sticks_and_moves(Case {
        policy: "prefix_cache",
        // Over the guard: one request more than the least loaded.
        lb_config: "loadGuardAbsolute: 1, loadGuardRelative: 0",
        held: 2,
        extra: json!({}),
    })
    .await;
}

/// `kv_aware` counts tokens: the guard allows 3 requests like the one placed (10 output tokens
/// and its few uncached prompt tokens); one held request decoding 100 000 is far over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_aware_keeps_sessions_across_replicas_under_its_guard() {
    sticks_and_moves(Case {
        policy: "kv_aware",
        lb_config: "decodeTokens: 100000, loadGuardAbsolute: 3, loadGuardRelative: 0",
        held: 1,
        extra: json!({"max_tokens": 10}),
    })
    .await;
}

/// `latency_aware` with the in-flight counts of every replica (`global_inflight_enabled`): the
/// guard counts requests, as `prefix_cache`'s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_aware_keeps_sessions_across_replicas_under_its_guard() {
    sticks_and_moves(Case {
        policy: "latency_aware",
        lb_config: "global_inflight_enabled: true, loadGuardAbsolute: 1, loadGuardRelative: 0",
        held: 2,
        extra: json!({}),
    })
    .await;
}

/// An agent's turns through three replicas sharing a real Redis stay on one endpoint; with
/// `case.held` of its requests held there the next one moves, and the session follows it; when
/// that endpoint fails its health check the session moves once more, then stays.
async fn sticks_and_moves(case: Case) {
    let redis = RedisServer::start().expect("redis-server");
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let conf = pool(
        case.policy,
        &addrs,
        &format!(
            "    lb_config: {{serviceFQDN: '{}', {}}}\n",
            redis.url(),
            case.lb_config
        ),
    );
    let body = |messages: Vec<Value>| {
        let mut body = json!({"model": "m", "messages": messages});
        if let (Some(b), Some(extra)) = (body.as_object_mut(), case.extra.as_object()) {
            b.extend(extra.clone());
        }
        body
    };
    let replicas = [
        Proxy::start(&conf),
        Proxy::start(&conf),
        Proxy::start(&conf),
    ];
    let client = reqwest::Client::new();
    let agent =
        async |proxy: &Proxy, i: usize| ask_with(&client, proxy, "agent-1", body(turn(i))).await;
    // A turn once the previous ones are released everywhere: a replica's release reaches Redis
    // with its next call or a few milliseconds later, and the turns here follow each other
    // faster than that through different replicas.
    let next_turn = async |proxy: &Proxy, i: usize| {
        settled(&redis).await;
        agent(proxy, i).await
    };

    // An agent's turns through the three replicas in turn: all on the endpoint of the first.
    let mut endpoints = Vec::new();
    for i in 0..5 {
        let r = next_turn(&replicas[i % 3], i).await;
        let want = if i == 0 { "session_new" } else { "session_hit" };
        assert_eq!(r.reason, want, "{}: turn {i}", case.policy);
        endpoints.push(r.endpoint);
    }
    let home = endpoints[0].clone();
    assert!(endpoints.iter().all(|e| *e == home), "{endpoints:?}");

    // Over the load guard: with requests of the session held at home, its next turn goes
    // elsewhere — and the session follows it there.
    let home_backend = backends
        .iter()
        .find(|b| b.addr.to_string() == home)
        .expect("home backend");
    settled(&redis).await;
    let through: Vec<&Proxy> = replicas.iter().cycle().take(case.held).collect();
    let held = hold_through(
        &client,
        &through,
        "/v1/chat/completions",
        ("x-session-id", "agent-1"),
        &json!({"model": "m", "hold": true, "messages": turn(5)}),
        home_backend,
    )
    .await;
    let diverted = agent(&replicas[2], 6).await;
    assert_ne!(diverted.endpoint, home, "{}", case.policy);
    assert_eq!(diverted.reason, "session_diverted", "{}", case.policy);
    home_backend.release_held(case.held);
    for h in held {
        assert_eq!(h.await.expect("join").expect("send").status(), 200);
    }
    for (i, proxy) in replicas.iter().enumerate() {
        let r = next_turn(proxy, 7 + i).await;
        assert_eq!(
            (&r.endpoint, r.reason.as_str()),
            (&diverted.endpoint, "session_hit"),
            "{}",
            case.policy
        );
    }

    // Gone: that endpoint fails its health check; the session moves once, then stays.
    let gone = backends
        .iter()
        .find(|b| b.addr.to_string() == diverted.endpoint)
        .expect("backend");
    gone.state.unhealthy.store(true, Ordering::SeqCst);
    for proxy in &replicas {
        proxy
            .wait_metric(
                "llmlb_endpoint_healthy",
                &[("endpoint", diverted.endpoint.as_str())],
                0.0,
            )
            .await;
    }
    let moved = next_turn(&replicas[0], 10).await;
    assert_ne!(moved.endpoint, diverted.endpoint, "{moved:?}");
    for (i, proxy) in replicas.iter().enumerate() {
        let r = next_turn(proxy, 11 + i).await;
        assert_eq!(
            (&r.endpoint, r.reason.as_str()),
            (&moved.endpoint, "session_hit"),
            "{}",
            case.policy
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_come_from_headers_or_body_fields_and_can_be_turned_off() {
    let backends = [Backend::start().await, Backend::start().await];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let client = reqwest::Client::new();

    // global_least_request keeps sessions too; OpenAI's prompt_cache_key names one.
    let proxy = Proxy::start(&pool("global_least_request", &addrs, ""));
    let mut endpoints = Vec::new();
    for i in 0..4 {
        let resp = client
            .post(proxy.url("/v1/chat/completions"))
            .json(&json!({"model": "m", "prompt_cache_key": "conv-9",
                "messages": [{"role": "user", "content": format!("q{i}")}]}))
            .send()
            .await
            .expect("send");
        let reason = resp.headers()["x-llm-lb-reason"]
            .to_str()
            .expect("reason")
            .to_string();
        assert_eq!(reason, if i == 0 { "session_new" } else { "session_hit" });
        endpoints.push(resp.headers()["x-llm-lb-endpoint"].clone());
    }
    assert!(endpoints.windows(2).all(|w| w[0] == w[1]), "{endpoints:?}");

    // Turned off: the header is ignored and prompts are keyed as usual.
    let off = Proxy::start(&pool(
        "prefix_cache",
        &addrs,
        "    session_affinity: {enabled: false}\n",
    ));
    let r = ask(&client, &off, "agent-2", &turn(0)).await;
    assert_eq!(r.reason, "prefix_miss");

    // A custom header.
    let custom = Proxy::start(&pool(
        "prefix_cache",
        &addrs,
        "    session_affinity: {headers: [x-conversation], body_fields: []}\n",
    ));
    let resp = client
        .post(custom.url("/v1/chat/completions"))
        .header("x-conversation", "c1")
        .header("x-session-id", "ignored")
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.headers()["x-llm-lb-reason"], "session_new");
    assert_eq!(
        ask(&client, &custom, "other", &turn(0)).await.reason,
        "prefix_miss"
    );
}
