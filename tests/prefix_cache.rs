//! `prefix_cache` end to end: real `llm-lb` processes in front of recording backends (and of three
//! `vllm-sim` servers for the hit rate), on the embedded store and on a real `redis-server`.
//! Which endpoint served a request and why come from the `x-llm-lb-endpoint` / `x-llm-lb-reason`
//! response headers.

mod common;
mod redis_harness;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use redis_harness::RedisServer;
use serde_json::{json, Value};

const MODEL: &str = "test-model";

/// A policy file with one `prefix_cache` pool on `addrs`; `lb_config` entries in `lb`.
fn config(addrs: &[SocketAddr], lb: &str, extra: &str) -> String {
    let lb_config = if lb.is_empty() {
        String::new()
    } else {
        format!("    lb_config: {{{lb}}}\n")
    };
    format!(
        "expose_endpoint_header: true\nmax_body_bytes: 4194304\npools:\n{}",
        pool_yaml(
            "main",
            "[\"*\"]",
            addrs,
            "prefix_cache",
            &format!("{lb_config}{extra}")
        )
    )
}

fn addrs(backends: &[Backend]) -> Vec<SocketAddr> {
    backends.iter().map(|b| b.addr).collect()
}

async fn backends(n: usize) -> Vec<Backend> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(Backend::start().await);
    }
    v
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// The messages of turn `turns` (1-based) of conversation `conv`: an optional system prompt, then
/// user questions with the assistant's answers in between, as a chat client sends them.
fn conversation(system: Option<&str>, conv: usize, turns: usize) -> Vec<Value> {
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(json!({"role": "system", "content": s}));
    }
    for t in 0..turns {
        m.push(json!({"role": "user", "content": format!("conversation {conv}, question {t}: what next?")}));
        if t + 1 < turns {
            m.push(json!({"role": "assistant", "content": format!("answer {t} to conversation {conv}")}));
        }
    }
    m
}

/// Where a request went.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Routed {
    status: u16,
    endpoint: String,
    reason: String,
}

async fn ask(client: &reqwest::Client, url: &str, messages: &[Value], hold: bool) -> Routed {
    let r = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": messages, "hold": hold}))
        .send()
        .await
        .expect("send");
    let header = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string()
    };
    let routed = Routed {
        status: r.status().as_u16(),
        endpoint: header("x-llm-lb-endpoint"),
        reason: header("x-llm-lb-reason"),
    };
    let _ = r.bytes().await;
    routed
}

/// Send every request at once, held by the backends until all of them are in flight (so every
/// pick saw the others' counts), then let them finish. `requests`: (proxy URL, messages).
async fn held_round(backends: &[Backend], requests: Vec<(String, Vec<Value>)>) -> Vec<Routed> {
    let n = requests.len() as i64;
    let client = client();
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|(url, messages)| {
            let client = client.clone();
            tokio::spawn(async move { ask(&client, &url, &messages, true).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while backends.iter().map(Backend::active).sum::<i64>() < n {
        assert!(Instant::now() < deadline, "requests did not all arrive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for b in backends {
        b.release_held(usize::try_from(b.active()).unwrap_or(0));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

/// How many requests each endpoint got.
fn histogram(routed: &[Routed]) -> BTreeMap<String, usize> {
    let mut h = BTreeMap::new();
    for r in routed {
        *h.entry(r.endpoint.clone()).or_default() += 1;
    }
    h
}

fn reasons(routed: &[Routed]) -> BTreeMap<String, usize> {
    let mut h = BTreeMap::new();
    for r in routed {
        *h.entry(r.reason.clone()).or_default() += 1;
    }
    h
}

/// Play `turns` turns of `convs` conversations in held rounds (turn k of every conversation at
/// once); `url_for(conv, turn)` names the proxy. Returns, per conversation, where each turn went.
async fn play(
    backends: &[Backend],
    system: Option<&str>,
    convs: usize,
    turns: usize,
    url_for: impl Fn(usize, usize) -> String,
) -> Vec<Vec<Routed>> {
    let mut per_conv = vec![Vec::new(); convs];
    for turn in 1..=turns {
        let requests = (0..convs)
            .map(|c| (url_for(c, turn), conversation(system, c, turn)))
            .collect();
        for (c, r) in held_round(backends, requests).await.into_iter().enumerate() {
            assert_eq!(r.status, 200, "conversation {c} turn {turn}: {r:?}");
            per_conv[c].push(r);
        }
    }
    per_conv
}

/// Every conversation stayed on the endpoint of its first turn, and later turns were hits.
fn assert_sticky(per_conv: &[Vec<Routed>]) {
    for (c, turns) in per_conv.iter().enumerate() {
        let endpoints: HashSet<&str> = turns.iter().map(|r| r.endpoint.as_str()).collect();
        assert_eq!(endpoints.len(), 1, "conversation {c} moved: {turns:?}");
        for r in &turns[1..] {
            assert_eq!(r.reason, "prefix_hit", "conversation {c}: {turns:?}");
        }
    }
}

/// One conversation alone, then 20 at once: every turn of a conversation on one endpoint, and the
/// conversations spread evenly (first turns are least-request picks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_stay_put_and_spread() {
    let backends = backends(3).await;
    let proxy = Proxy::start(&config(&addrs(&backends), "", ""));
    let client = client();
    let url = proxy.url("");
    let mut alone = Vec::new();
    for turn in 1..=5 {
        alone.push(ask(&client, &url, &conversation(None, 999, turn), false).await);
    }
    assert!(alone.iter().all(|r| r.status == 200), "{alone:?}");
    assert_eq!(alone[0].reason, "prefix_miss");
    assert_sticky(&[alone]);

    let per_conv = play(&backends, None, 20, 5, |_, _| proxy.url("")).await;
    assert_sticky(&per_conv);
    let firsts: Vec<Routed> = per_conv.iter().map(|t| t[0].clone()).collect();
    assert_eq!(reasons(&firsts).get("prefix_miss"), Some(&20));
    let mut spread: Vec<usize> = histogram(&firsts).into_values().collect();
    spread.sort();
    assert_eq!(spread, vec![6, 7, 7], "{:?}", histogram(&firsts));
    assert_eq!(
        proxy
            .metric("llmlb_picks_total", &[("reason", "prefix_hit")])
            .await,
        Some(84.0)
    );
    // Match depths: every pick observed; the 20 first turns matched nothing.
    let text = proxy.metrics().await;
    let observed = |name: &str, le: Option<&str>| {
        let mut labels = vec![("pool", "main")];
        labels.extend(le.map(|le| ("le", le)));
        parse_metric(&text, name, &labels)
    };
    assert_eq!(
        observed("llmlb_prefix_match_blocks_count", None),
        Some(105.0)
    );
    assert_eq!(
        observed("llmlb_prefix_match_blocks_bucket", Some("0")),
        Some(21.0)
    );
}

/// Two replicas share the prefix index through Redis: turns alternate between them and every
/// conversation still stays on one endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_redis_keep_conversations_together() {
    let redis = RedisServer::start().expect("redis-server");
    let backends = backends(3).await;
    let lb = format!("serviceFQDN: '{}', timeout: 200", redis.url());
    let a = Proxy::start(&config(&addrs(&backends), &lb, ""));
    let b = Proxy::start(&config(&addrs(&backends), &lb, ""));
    let urls = [a.url(""), b.url("")];
    let per_conv = play(&backends, None, 12, 4, |c, t| urls[(c + t) % 2].clone()).await;
    assert_sticky(&per_conv);
    let firsts: Vec<Routed> = per_conv.iter().map(|t| t[0].clone()).collect();
    let spread: Vec<usize> = histogram(&firsts).into_values().collect();
    assert_eq!(spread, vec![4, 4, 4], "{:?}", histogram(&firsts));
    // Both replicas served hits, so each used what the other recorded.
    for p in [&a, &b] {
        let hits = p
            .metric("llmlb_picks_total", &[("reason", "prefix_hit")])
            .await
            .unwrap_or(0.0);
        assert!(hits >= 12.0, "{hits}");
    }
}

/// 100 conversations share one long system prompt: their first turns match it, and the load
/// guard spreads them instead of piling all on its first holder; each then keeps its endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_system_prompt_spreads_and_conversations_stay() {
    let backends = backends(3).await;
    let proxy = Proxy::start(&config(&addrs(&backends), "", ""));
    let system = "You are a meticulous assistant for the ACME support desk. ".repeat(60);
    assert!(system.len() > 3000, "longer than one 2 KiB block");
    let url = proxy.url("");
    let requests = (0..100)
        .map(|c| (url.clone(), conversation(Some(&system), c, 1)))
        .collect();
    let firsts = held_round(&backends, requests).await;
    assert!(firsts.iter().all(|r| r.status == 200));
    let h = histogram(&firsts);
    assert_eq!(h.len(), 3, "{h:?}");
    assert!(h.values().all(|n| *n >= 20), "not spread: {h:?}");
    let why = reasons(&firsts);
    assert!(why.get("prefix_hit").is_some_and(|n| *n > 50), "{why:?}");
    assert!(
        why.get("prefix_diverted").is_some_and(|n| *n >= 2),
        "{why:?}"
    );

    // Turns 2 and 3, six clients at a time (no endpoint can get far ahead): nobody moves.
    let client = client();
    let mut per_conv: Vec<Vec<Routed>> = firsts.into_iter().map(|r| vec![r]).collect();
    for turn in 2..=3 {
        for chunk in (0..100).collect::<Vec<usize>>().chunks(6) {
            let mut tasks = Vec::new();
            for &c in chunk {
                let (client, url, m) = (
                    client.clone(),
                    url.clone(),
                    conversation(Some(&system), c, turn),
                );
                tasks.push(tokio::spawn(
                    async move { ask(&client, &url, &m, false).await },
                ));
            }
            for (&c, t) in chunk.iter().zip(tasks) {
                per_conv[c].push(t.await.expect("task"));
            }
        }
    }
    assert_sticky(&per_conv);
}

/// Higress XORs block hashes, so `[go, go, x]` looks like a fresh `[x]`, and `[A, B]` like
/// `[B, A]`. Here they are different prefixes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_and_reordered_blocks_do_not_collide() {
    let backends = backends(3).await;
    let proxy = Proxy::start(&config(&addrs(&backends), "", ""));
    let client = client();
    let url = proxy.url("");
    let user = |texts: &[&str]| -> Vec<Value> {
        texts
            .iter()
            .map(|t| json!({"role": "user", "content": t}))
            .collect()
    };
    let ggx = ask(&client, &url, &user(&["go", "go", "x"]), false).await;
    assert_eq!(ggx.reason, "prefix_miss");
    assert_eq!(
        ask(&client, &url, &user(&["x"]), false).await.reason,
        "prefix_miss"
    );
    let longer = ask(&client, &url, &user(&["go", "go", "x", "y"]), false).await;
    assert_eq!(
        (longer.reason.as_str(), &longer.endpoint),
        ("prefix_hit", &ggx.endpoint)
    );

    let ab = ask(&client, &url, &user(&["A", "B"]), false).await;
    assert_eq!(ab.reason, "prefix_miss");
    let ba = ask(&client, &url, &user(&["B", "A"]), false).await;
    assert_eq!(
        ba.reason, "prefix_miss",
        "reordered blocks are another prefix"
    );
}

/// An endpoint that fails its health check mid-conversation: the conversation moves once, and
/// stays where it moved even after the endpoint is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_moves_once_when_its_endpoint_goes() {
    let backends = backends(3).await;
    let hc = "    health_check: {interval_ms: 100, timeout_ms: 500, unhealthy_threshold: 1}\n";
    let proxy = Proxy::start(&config(&addrs(&backends), "", hc));
    let client = client();
    let url = proxy.url("");
    let mut turns = Vec::new();
    for turn in 1..=2 {
        turns.push(ask(&client, &url, &conversation(None, 1, turn), false).await);
    }
    assert_eq!(turns[0].endpoint, turns[1].endpoint);
    let first = turns[0].endpoint.clone();
    let gone = backends
        .iter()
        .find(|b| b.addr.to_string() == first)
        .expect("a backend");

    let healthy = async |want: f64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = proxy
                .metric("llmlb_endpoint_healthy", &[("endpoint", first.as_str())])
                .await;
            if v == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "health of {first} still {v:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    gone.state
        .unhealthy
        .store(true, std::sync::atomic::Ordering::SeqCst);
    healthy(0.0).await;
    let moved = ask(&client, &url, &conversation(None, 1, 3), false).await;
    assert_ne!(moved.endpoint, first);
    assert_eq!(moved.reason, "prefix_miss");
    gone.state
        .unhealthy
        .store(false, std::sync::atomic::Ordering::SeqCst);
    healthy(1.0).await;
    for turn in 4..=5 {
        let r = ask(&client, &url, &conversation(None, 1, turn), false).await;
        assert_eq!(
            (&r.endpoint, r.reason.as_str()),
            (&moved.endpoint, "prefix_hit")
        );
    }
}

/// Redis goes away: every request is still served (least request on this replica's counts), and
/// once Redis is back conversations stick again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_requests_flow_and_affinity_resumes() {
    let mut redis = RedisServer::start().expect("redis-server");
    let backends = backends(3).await;
    let lb = format!("serviceFQDN: '{}', timeout: 100", redis.url());
    let proxy = Proxy::start(&config(&addrs(&backends), &lb, ""));
    let client = client();
    let url = proxy.url("");
    let before: Vec<Routed> = {
        let mut v = Vec::new();
        for turn in 1..=2 {
            v.push(ask(&client, &url, &conversation(None, 7, turn), false).await);
        }
        v
    };
    assert_sticky(&[before]);

    redis.kill();
    let mut down = Vec::new();
    for c in 0..10 {
        for turn in 1..=3 {
            down.push(ask(&client, &url, &conversation(None, 100 + c, turn), false).await);
        }
    }
    assert!(down.iter().all(|r| r.status == 200), "{down:?}");
    assert_eq!(
        reasons(&down).get("local_least_request"),
        Some(&30),
        "{:?}",
        reasons(&down)
    );
    let text = proxy.metrics().await;
    let fallbacks: f64 = ["store_error", "store_timeout", "store_breaker_open"]
        .iter()
        .filter_map(|reason| parse_metric(&text, "llmlb_fallback_total", &[("reason", reason)]))
        .sum();
    assert_eq!(fallbacks, 30.0);

    redis.restart().expect("restart redis");
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy
        .metric("llmlb_store_breaker_open", &[("pool", "main")])
        .await
        != Some(0.0)
    {
        assert!(Instant::now() < deadline, "breaker still open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Redis came back empty: the conversation's next turn is recorded again, then sticks.
    let mut after = Vec::new();
    for turn in 3..=6 {
        after.push(ask(&client, &url, &conversation(None, 7, turn), false).await);
    }
    assert!(after.iter().all(|r| r.status == 200), "{after:?}");
    assert_sticky(&[after]);
}

/// Three `vllm-sim` servers, a multi-turn workload: the fleet's prefix-cache hit rate (from the
/// simulators' own counters) with `prefix_cache` is far above round robin's and reaches the
/// oracle bound — the same workload on a single server, where every turn finds its whole
/// previous context cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_hit_rate_is_far_above_round_robin() {
    let oracle = fleet_hit_rate(MODEL, "round_robin", 1, "").await;
    let rr = fleet_hit_rate(MODEL, "round_robin", 3, "").await;
    let pc = fleet_hit_rate(MODEL, "prefix_cache", 3, "").await;
    eprintln!(
        "fleet prefix-cache hit rate: round_robin {rr:.3}, prefix_cache {pc:.3}, oracle {oracle:.3}"
    );
    assert!(
        pc >= 0.95 * oracle,
        "prefix_cache {pc:.3} vs oracle {oracle:.3}"
    );
    assert!(
        pc >= rr + 0.2,
        "prefix_cache {pc:.3} vs round_robin {rr:.3}"
    );
}
