//! `endpoint_hash` (Higress 2.x) end to end: three llm-lb replicas share a real `redis-server`;
//! requests naming a consumer in `x-mse-consumer` all land on the endpoint that consumer was
//! bound to, through any replica and however busy it is; a new consumer goes where the load is
//! least; a request without the header is never pinned; when the bound endpoint fails its health
//! check the consumer moves once and sticks where it moved, even once it is healthy again.
//! `hash_header` names another header.

mod common;
mod redis_harness;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use common::*;
use redis_harness::RedisServer;
use serde_json::{json, Value};

/// A chat request with `header: value` (none when `value` is `None`) through `proxy`: where it
/// went and why.
async fn ask(
    client: &reqwest::Client,
    proxy: &Proxy,
    path: &str,
    header: (&str, Option<&str>),
    body: &Value,
) -> (String, String) {
    let mut request = client.post(proxy.url(path)).json(body);
    if let (name, Some(value)) = header {
        request = request.header(name, value);
    }
    let resp = request.send().await.expect("send");
    assert_eq!(resp.status(), 200, "{path}");
    let h = |n: &str| resp.headers()[n].to_str().expect("header").to_string();
    (h("x-llm-lb-endpoint"), h("x-llm-lb-reason"))
}

fn chat(text: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": text}]})
}

fn conf(addrs: &[SocketAddr], lb_config: &str) -> String {
    format!(
        "expose_endpoint_header: true\npools:\n{}",
        pool_yaml(
            "p",
            "[m]",
            addrs,
            "endpoint_hash",
            &format!(
                "    health_check: {{interval_ms: 100, unhealthy_threshold: 1}}\n    lb_config: {lb_config}\n"
            )
        )
    )
}

const CHAT: &str = "/v1/chat/completions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_is_pinned_across_replicas_and_moves_once_when_its_endpoint_fails() {
    let redis = RedisServer::start().expect("redis-server");
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let conf = conf(
        &addrs,
        &format!("{{serviceFQDN: '{}', stickyTimeout: 5}}", redis.url()),
    );
    let replicas = [
        Proxy::start(&conf),
        Proxy::start(&conf),
        Proxy::start(&conf),
    ];
    let client = reqwest::Client::new();
    let alice = ("x-mse-consumer", Some("alice"));

    // Through the three replicas in turn, whatever the prompt: all on the first one's endpoint.
    let mut seen = Vec::new();
    for i in 0..6 {
        let r = ask(
            &client,
            &replicas[i % 3],
            CHAT,
            alice,
            &chat(&format!("q{i}")),
        )
        .await;
        let want = if i == 0 { "hash_new" } else { "hash_hit" };
        assert_eq!(r.1, want, "request {i}: {r:?}");
        seen.push(r.0);
    }
    let home = seen[0].clone();
    assert!(seen.iter().all(|e| *e == home), "{seen:?}");

    // A pin, not a preference: with two of alice's requests held at home, she still goes there,
    // and bob, new, goes where the load is least.
    let home_backend = backends
        .iter()
        .find(|b| b.addr.to_string() == home)
        .expect("home backend");
    let held = hold_through(
        &client,
        &[&replicas[0], &replicas[1]],
        CHAT,
        ("x-mse-consumer", "alice"),
        &json!({"model": "m", "hold": true, "messages": [{"role": "user", "content": "long"}]}),
        home_backend,
    )
    .await;
    let r = ask(&client, &replicas[2], CHAT, alice, &chat("busy")).await;
    assert_eq!(r, (home.clone(), "hash_hit".to_owned()));
    let bob = ("x-mse-consumer", Some("bob"));
    let b = ask(&client, &replicas[2], CHAT, bob, &chat("hi")).await;
    assert_eq!(b.1, "hash_new");
    assert_ne!(b.0, home, "bob goes where the load is least");
    for proxy in &replicas {
        let r = ask(&client, proxy, CHAT, bob, &chat("again")).await;
        assert_eq!(r, (b.0.clone(), "hash_hit".to_owned()));
    }
    home_backend.release_held(2);
    for h in held {
        assert_eq!(h.await.expect("join").expect("send").status(), 200);
    }

    // Without the header: never pinned, nothing bound.
    let none = ("x-mse-consumer", None);
    let r = ask(&client, &replicas[0], CHAT, none, &chat("anonymous")).await;
    assert_eq!(r.1, "least_request");
    // Embeddings are pinned by the header too.
    let embed = json!({"model": "m", "input": "some text"});
    let r = ask(&client, &replicas[1], "/v1/embeddings", alice, &embed).await;
    assert_eq!(r, (home.clone(), "hash_hit".to_owned()));

    // The bound endpoint fails its health check: alice moves once, then sticks.
    home_backend.state.unhealthy.store(true, Ordering::SeqCst);
    for proxy in &replicas {
        proxy
            .wait_metric(
                "llmlb_endpoint_healthy",
                &[("endpoint", home.as_str())],
                0.0,
            )
            .await;
    }
    let moved = ask(&client, &replicas[0], CHAT, alice, &chat("moved")).await;
    assert_eq!(moved.1, "hash_new");
    assert_ne!(moved.0, home);
    for (i, proxy) in replicas.iter().enumerate() {
        let r = ask(&client, proxy, CHAT, alice, &chat(&format!("after {i}"))).await;
        assert_eq!(r, (moved.0.clone(), "hash_hit".to_owned()));
    }
    // Healthy again, and as idle as the others: alice stays where she moved.
    home_backend.state.unhealthy.store(false, Ordering::SeqCst);
    for proxy in &replicas {
        proxy
            .wait_metric(
                "llmlb_endpoint_healthy",
                &[("endpoint", home.as_str())],
                1.0,
            )
            .await;
    }
    for i in 0..6 {
        let r = ask(
            &client,
            &replicas[i % 3],
            CHAT,
            alice,
            &chat(&format!("back {i}")),
        )
        .await;
        assert_eq!(r, (moved.0.clone(), "hash_hit".to_owned()), "request {i}");
    }
    // Counted by reason: every replica hit, and the first saw the new binding.
    for (i, proxy) in replicas.iter().enumerate() {
        let hits = proxy.metric("llmlb_picks_total", &[("reason", "hash_hit")]);
        assert!(hits.await.unwrap_or(0.0) >= 1.0, "replica {i}");
    }
    let news = replicas[0].metric("llmlb_picks_total", &[("reason", "hash_new")]);
    assert!(news.await.unwrap_or(0.0) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_header_names_the_header() {
    let backends = [Backend::start().await, Backend::start().await];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let proxy = Proxy::start(&conf(&addrs, "{hash_header: X-User}"));
    let client = reqwest::Client::new();
    let carol = ("x-user", Some("carol"));
    let first = ask(&client, &proxy, CHAT, carol, &chat("a")).await;
    assert_eq!(first.1, "hash_new");
    for i in 0..4 {
        let r = ask(&client, &proxy, CHAT, carol, &chat(&format!("b{i}"))).await;
        assert_eq!(r, (first.0.clone(), "hash_hit".to_owned()));
    }
    // Higress's default header and the session headers mean nothing here.
    for name in ["x-mse-consumer", "x-session-id"] {
        let r = ask(&client, &proxy, CHAT, (name, Some("carol")), &chat("c")).await;
        assert_eq!(r.1, "least_request", "{name}");
    }
    let body = json!({"model": "m", "user": "carol",
        "messages": [{"role": "user", "content": "d"}]});
    let r = ask(&client, &proxy, CHAT, ("x-user", None), &body).await;
    assert_eq!(r.1, "least_request", "body fields name no key");
}
