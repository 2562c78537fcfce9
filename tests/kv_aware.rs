//! `kv_aware` end to end: real `llm-lb` processes in front of `vllm-sim` fleets, and `-t`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const MODEL: &str = "kv-model";

/// `llm-lb -t` on a policy file with one pool whose policy and pool YAML are given.
fn check(extra: &str, endpoints: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("policy.yaml");
    let yaml = format!(
        "pools:\n  - name: kv\n    models: [\"*\"]\n    endpoints: {endpoints}\n    lb_policy: kv_aware\n{extra}"
    );
    std::fs::write(&p, yaml).expect("write");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(binary())
        .args(["-t", "-c"])
        .arg(root.join("conf/pingora.yaml"))
        .arg("-p")
        .arg(&p)
        .output()
        .expect("run llm-lb -t");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn kv_aware_needs_no_other_key_and_names_bad_ones() {
    let (ok, text) = check("", "[\"127.0.0.1:8001\", \"127.0.0.1:8002\"]");
    assert!(ok, "{text}");
    let (ok, text) = check(
        "    lb_config: {blockSize: 32, prefillWeight: 1.5, loadWeight: 0.5, decodeTokens: 64, tieTolerance: 0.1, predictedTtlMs: 500, routedWeight: 0.25, evictionWeight: 2, queueWeight: 0.5, kvIndexBlocks: 1000, kvEventsTopic: kv}\n",
        "[{address: \"127.0.0.1:8001\", kv_events: \"tcp://127.0.0.1:5557\"}]",
    );
    assert!(ok, "{text}");
    let (ok, text) = check(
        "    lb_config: {blockSize: 0, tieTolerance: 2, routedWeight: 1.5, evictionWeight: -1, queueWeight: -1, tokenizer: /nonexistent}\n",
        "[{address: \"127.0.0.1:8001\", kv_events: \"http://127.0.0.1:5557\"}]",
    );
    assert!(!ok, "{text}");
    for named in [
        "blockSize",
        "tieTolerance",
        "routedWeight",
        "evictionWeight",
        "queueWeight",
        "tokenizer",
        "kv_events",
        "tcp://host:port",
    ] {
        assert!(text.contains(named), "{named} not named in: {text}");
    }
    // maxRequestCount counts requests; kv_aware counts tokens: a warning, not an error.
    let (ok, text) = check(
        "    lb_config: {maxRequestCount: 5}\n",
        "[\"127.0.0.1:8001\"]",
    );
    assert!(ok && text.contains("maxRequestCount"), "{text}");
}

/// The multi-turn workload of `prefix_cache`'s fleet test, without KV events (approximate tokens,
/// predicted entries only): `kv_aware` keeps conversations where their context is cached, far
/// above round robin. It is not a pin: a turn whose server is busier (in tokens) than its cached
/// prefix is worth moves (0.59–0.68 against `prefix_cache`'s 0.68 here), so the bound is 80 % of
/// one server's hit rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_events_it_keeps_conversations_where_they_are_cached() {
    let oracle = fleet_hit_rate(MODEL, "round_robin", 1, "").await;
    let rr = fleet_hit_rate(MODEL, "round_robin", 3, "").await;
    let kv = fleet_hit_rate(MODEL, "kv_aware", 3, "").await;
    eprintln!("fleet hit rate: round_robin {rr:.3}, kv_aware {kv:.3}, oracle {oracle:.3}");
    assert!(kv >= 0.8 * oracle, "kv_aware {kv:.3} vs oracle {oracle:.3}");
    assert!(kv >= rr + 0.2, "kv_aware {kv:.3} vs round_robin {rr:.3}");
}

/// One `vllm-sim` publishing KV events on fixed loopback ports (so a restart keeps them).
struct EventSim {
    http: std::net::SocketAddr,
    events: u16,
    replay: u16,
}

impl EventSim {
    fn new() -> Self {
        EventSim {
            http: std::net::SocketAddr::from(([127, 0, 0, 1], restartable_port())),
            events: restartable_port(),
            replay: restartable_port(),
        }
    }

    async fn spawn(&self, kv_blocks: usize) -> vllm_sim::SimHandle {
        self.spawn_with(kv_blocks, None).await
    }

    /// With `tokenizer`: the model's tokenizer and chat template (`vllm-sim --tokenizer`).
    async fn spawn_with(
        &self,
        kv_blocks: usize,
        tokenizer: Option<&std::path::Path>,
    ) -> vllm_sim::SimHandle {
        let events = vllm_sim::KvEventsConfig::from_json(&format!(
            r#"{{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:{}", "replay_endpoint": "tcp://*:{}"}}"#,
            self.events, self.replay
        ))
        .expect("kv events config");
        let cfg = vllm_sim::SimConfig {
            model: MODEL.to_string(),
            time_scale: 0.0,
            kv_blocks,
            kv_events_config: Some(events),
            tokenizer: tokenizer.map(std::path::Path::to_path_buf),
            ..vllm_sim::SimConfig::default()
        };
        // A restart may find its ports still closing: retry for a while.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match vllm_sim::spawn(cfg.clone(), self.http).await {
                Ok(sim) => return sim,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("spawn vllm-sim at {}: {e}; retrying", self.http);
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("spawn vllm-sim at {}: {e}", self.http),
            }
        }
    }

    fn yaml(&self) -> String {
        format!(
            "{{address: \"{}\", kv_events: \"tcp://127.0.0.1:{}\", kv_events_replay: \"tcp://127.0.0.1:{}\"}}",
            self.http, self.events, self.replay
        )
    }
}

/// A `/v1/completions` request whose prompt is the token ids `ids` (the engine caches exactly
/// these, so llm-lb's keys match its events without a tokenizer). Returns (endpoint, reason,
/// cached tokens).
async fn complete(client: &reqwest::Client, url: &str, ids: &[u32]) -> (String, String, u64) {
    let r = client
        .post(url)
        .json(&serde_json::json!({"model": MODEL, "prompt": ids, "max_tokens": 2}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let header = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let (endpoint, reason) = (header("x-llm-lb-endpoint"), header("x-llm-lb-reason"));
    let body: serde_json::Value = r.json().await.expect("json");
    let cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    (endpoint, reason, cached)
}

/// Poll `/metrics` until `name{labels}` is at least `want`.
async fn wait_at_least(proxy: &Proxy, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let now = proxy.metric(name, labels).await.unwrap_or(0.0);
        if now >= want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}{labels:?} stayed at {now}, wanted {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// With the engines' KV events (and no predictions, so the events alone decide): a prompt goes
/// back to the engine that reported its blocks; when that engine evicts them, resets its cache or
/// restarts, llm-lb sees it and stops sending the prompt there for its cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_events_steer_and_evictions_resets_and_restarts_are_seen() {
    let sims_at = [EventSim::new(), EventSim::new()];
    // 48 blocks of 16 tokens: room for one 512-token prompt and a bit.
    let mut sims = Vec::new();
    for s in &sims_at {
        sims.push(Some(s.spawn(48).await));
    }
    let endpoints: Vec<String> = sims_at.iter().map(EventSim::yaml).collect();
    let proxy = Proxy::start(&format!(
        "expose_endpoint_header: true\npools:\n  - name: kv\n    models: [\"*\"]\n    endpoints: [{}]\n    lb_policy: kv_aware\n    lb_config: {{predictedTtlMs: 0, loadWeight: 0.1}}\n",
        endpoints.join(", ")
    ));
    let client = reqwest::Client::new();
    let url = proxy.url("/v1/completions");
    let place = |prompt: Vec<u32>| {
        let (client, url, proxy, sims_at) = (client.clone(), url.clone(), &proxy, &sims_at);
        async move {
            let before = stored_total(proxy).await;
            let (endpoint, reason, _) = complete(&client, &url, &prompt).await;
            assert_eq!(reason, "kv_miss", "a new prompt is cached nowhere");
            // Wait until the engine's events say it holds the prompt. A subscriber that has
            // just (re)connected may miss that batch; the engine's next batch makes it replay.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let mut nudge = 0u32;
            while stored_total(proxy).await <= before {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no BlockStored from {endpoint}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                nudge += 1;
                let ids: Vec<u32> = (0..16).map(|t| 900_000 + nudge * 16 + t).collect();
                complete(&client, &format!("http://{endpoint}/v1/completions"), &ids).await;
            }
            // From now on the prompt goes back there, and is served from the cache.
            let (e, reason, cached) = complete(&client, &url, &prompt).await;
            assert_eq!((e.as_str(), reason.as_str()), (endpoint.as_str(), "kv_hit"));
            assert!(
                cached >= 496,
                "the engine served {cached} tokens from its cache"
            );
            let sim = sims_at
                .iter()
                .position(|s| s.http.to_string() == endpoint)
                .expect("a sim");
            (endpoint, sim)
        }
    };
    let prompt = |base: u32| -> Vec<u32> { (base..base + 512).collect() };

    // Steering: the engine that reported the prompt's blocks gets it again, from its cache.
    let a = prompt(1000);
    let (home, _) = place(a.clone()).await;
    for _ in 0..2 {
        let (e, reason, cached) = complete(&client, &url, &a).await;
        assert_eq!((e.as_str(), reason.as_str()), (home.as_str(), "kv_hit"));
        assert!(
            cached >= 496,
            "the engine served {cached} tokens from its cache"
        );
    }

    // Eviction: other prompts sent to that engine directly push the prompt's blocks out.
    let direct = format!("http://{home}/v1/completions");
    for k in 0..3u32 {
        complete(&client, &direct, &prompt(50_000 + k * 1000)).await;
    }
    let removed = [
        ("pool", "kv"),
        ("endpoint", home.as_str()),
        ("kind", "removed"),
    ];
    wait_at_least(&proxy, "llmlb_kv_events_total", &removed, 32.0).await;
    let (_, reason, _) = complete(&client, &url, &a).await;
    assert_eq!(reason, "kv_miss", "evicted blocks must not count");

    // Reset: an engine that drops its cache (vLLM's /reset_prefix_cache) is seen.
    let b = prompt(2000);
    let (at, j) = place(b.clone()).await;
    assert!(
        sims[j]
            .as_ref()
            .expect("running")
            .reset_prefix_cache(false)
            .await
    );
    // vLLM sends AllBlocksCleared with its next step's events: run one step on that engine.
    complete(&client, &format!("http://{at}/v1/completions"), &[7, 8, 9]).await;
    let cleared = [
        ("pool", "kv"),
        ("endpoint", at.as_str()),
        ("kind", "cleared"),
    ];
    wait_at_least(&proxy, "llmlb_kv_events_total", &cleared, 1.0).await;
    let (_, reason, _) = complete(&client, &url, &b).await;
    assert_eq!(reason, "kv_miss", "a reset cache must not count");

    // Restart: a restarted engine (same ports, empty cache, sequence from 0) is forgotten, and
    // followed again.
    let c = prompt(3000);
    let (at, k) = place(c.clone()).await;
    let before = resync_total(&proxy, &at).await;
    sims[k].take().expect("running").shutdown().await;
    sims[k] = Some(sims_at[k].spawn(48).await);
    let connected = [("pool", "kv"), ("endpoint", at.as_str())];
    wait_at_least(&proxy, "llmlb_kv_events_connected", &connected, 1.0).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while resync_total(&proxy, &at).await <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "no resync after {at} restarted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (_, reason, _) = complete(&client, &url, &c).await;
    assert_eq!(
        reason, "kv_miss",
        "a restarted engine's old blocks must not count"
    );
    // New events are followed again: a new prompt is placed and comes back.
    place(prompt(4000)).await;
    // Every pick was observed: cached tokens and cost histograms, and the pick reasons.
    let kv = [("pool", "kv")];
    let picks = proxy
        .metric("llmlb_kv_matched_tokens_count", &kv)
        .await
        .expect("matched tokens histogram");
    assert_eq!(
        Some(picks),
        proxy.metric("llmlb_kv_cost_tokens_count", &kv).await
    );
    let hits = [("pool", "kv"), ("reason", "kv_hit")];
    assert!(
        proxy
            .metric("llmlb_picks_total", &hits)
            .await
            .unwrap_or(0.0)
            >= 6.0
    );
    let matched = proxy.metric("llmlb_kv_matched_tokens_sum", &kv).await;
    assert!(matched.unwrap_or(0.0) >= 3.0 * 496.0, "{matched:?}");
}

/// `BlockStored` events applied so far, over every endpoint.
async fn stored_total(proxy: &Proxy) -> f64 {
    let text = proxy.metrics().await;
    text.lines()
        .filter(|l| l.starts_with("llmlb_kv_events_total{") && l.contains("kind=\"stored\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Every resync of `endpoint`'s stream, whatever the reason.
async fn resync_total(proxy: &Proxy, endpoint: &str) -> f64 {
    let text = proxy.metrics().await;
    ["gap", "restart", "reconnect", "decode_error"]
        .iter()
        .filter_map(|r| {
            parse_metric(
                &text,
                "llmlb_kv_events_resyncs_total",
                &[("pool", "kv"), ("endpoint", endpoint), ("reason", r)],
            )
        })
        .sum()
}

#[test]
fn check_loads_the_tokenizer() {
    let dir = &engine_paths().tokenizer;
    let (ok, text) = check(
        &format!("    lb_config: {{tokenizer: \"{}\"}}\n", dir.display()),
        "[\"127.0.0.1:8001\"]",
    );
    assert!(ok, "{text}");
    // A tokenizer.json that is not one is refused by -t, naming the key.
    let broken = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        broken.path().join("tokenizer.json"),
        "{\"not\": \"a tokenizer\"}",
    )
    .expect("write");
    let (ok, text) = check(
        &format!(
            "    lb_config: {{tokenizer: \"{}\"}}\n",
            broken.path().display()
        ),
        "[\"127.0.0.1:8001\"]",
    );
    assert!(!ok && text.contains("lb_config.tokenizer"), "{text}");
}

/// Chats through `kv_aware` to engines that tokenize with the model's tokenizer and publish KV
/// events (predictions off, so the events alone decide). With the same tokenizer, llm-lb's keys
/// are the engine's: a conversation's next turn goes back to the engine that reported its
/// blocks. With approximate tokens, the engine's events never match (so always name the
/// tokenizer when routing on events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_models_tokenizer_a_chat_matches_the_engines_events() {
    let tokenizer = engine_paths().tokenizer.clone();
    for exact in [true, false] {
        let sims_at = [EventSim::new(), EventSim::new()];
        let mut sims = Vec::new();
        for s in &sims_at {
            sims.push(s.spawn_with(1024, Some(&tokenizer)).await);
        }
        let endpoints: Vec<String> = sims_at.iter().map(EventSim::yaml).collect();
        let lb_config = if exact {
            format!(
                "{{predictedTtlMs: 0, tokenizer: \"{}\"}}",
                tokenizer.display()
            )
        } else {
            "{predictedTtlMs: 0}".to_owned()
        };
        let proxy = Proxy::start(&format!(
            "expose_endpoint_header: true\npools:\n  - name: kv\n    models: [\"*\"]\n    endpoints: [{}]\n    lb_policy: kv_aware\n    lb_config: {lb_config}\n",
            endpoints.join(", ")
        ));
        let client = reqwest::Client::new();
        let url = proxy.url("/v1/chat/completions");
        let mut messages = vec![
            serde_json::json!({"role": "system", "content": "You are a careful assistant. ".repeat(20)}),
            serde_json::json!({"role": "user", "content": "Tell me about the sea, in detail. ".repeat(10)}),
        ];
        let ask = |messages: Vec<serde_json::Value>| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let r = client
                    .post(&url)
                    .json(
                        &serde_json::json!({"model": MODEL, "messages": messages, "max_tokens": 8}),
                    )
                    .send()
                    .await
                    .expect("send");
                assert_eq!(r.status(), 200);
                let header = |n: &str| {
                    r.headers()
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned()
                };
                let (endpoint, reason) = (header("x-llm-lb-endpoint"), header("x-llm-lb-reason"));
                let body: serde_json::Value = r.json().await.expect("json");
                let reply = body["choices"][0]["message"]["content"]
                    .as_str()
                    .expect("content")
                    .to_owned();
                let cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0);
                (endpoint, reason, reply, cached)
            }
        };
        let (first, reason, reply, _) = ask(messages.clone()).await;
        assert_eq!(reason, "kv_miss");
        let stored = [
            ("pool", "kv"),
            ("endpoint", first.as_str()),
            ("kind", "stored"),
        ];
        wait_at_least(&proxy, "llmlb_kv_events_total", &stored, 1.0).await;
        messages.push(serde_json::json!({"role": "assistant", "content": reply}));
        messages.push(serde_json::json!({"role": "user", "content": "And the mountains?"}));
        let (second, reason, _, cached) = ask(messages).await;
        if exact {
            assert_eq!(
                (second.as_str(), reason.as_str()),
                (first.as_str(), "kv_hit")
            );
            assert!(
                cached >= 200,
                "the engine served only {cached} tokens from its cache"
            );
        } else {
            assert_eq!(
                reason, "kv_miss",
                "approximate tokens matched the engine's events"
            );
        }
    }
}

/// With `queueWeight`, the engines' own queues are scraped and weighed: an engine whose queue
/// llm-lb did not fill (its count of that engine is zero) is avoided while it queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_queue_llm_lb_did_not_fill_is_avoided() {
    // One request at a time, 20 ms a token: 300 tokens keep a seat 6 s.
    let cfg = vllm_sim::SimConfig {
        model: MODEL.to_string(),
        max_num_seqs: 1,
        itl_ms: 20.0,
        time_scale: 1.0,
        ..vllm_sim::SimConfig::default()
    };
    let mut sims = Vec::new();
    for _ in 0..2 {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        sims.push((addr, vllm_sim::spawn(cfg.clone(), addr).await.expect("sim")));
    }
    let busy = sims[0].0;
    let proxy = Proxy::start(&format!(
        "expose_endpoint_header: true\npools:\n  - name: kv\n    models: [\"*\"]\n    endpoints: [\"{}\", \"{}\"]\n    metrics: {{interval_ms: 100}}\n    lb_policy: kv_aware\n    lb_config: {{queueWeight: 1}}\n",
        sims[0].0, sims[1].0
    ));
    // Traffic that bypasses llm-lb: three long requests straight to the first engine, one
    // running and two waiting.
    let client = reqwest::Client::new();
    let direct: Vec<_> = (0..3u32)
        .map(|i| {
            let (client, url) = (client.clone(), format!("http://{busy}/v1/completions"));
            tokio::spawn(async move {
                let ids: Vec<u32> = (0..64).map(|t| 800_000 + i * 64 + t).collect();
                client
                    .post(url)
                    .json(&serde_json::json!({"model": MODEL, "prompt": ids, "max_tokens": 300}))
                    .send()
                    .await
                    .map(|r| r.status())
            })
        })
        .collect();
    wait_at_least(
        &proxy,
        "llmlb_engine_waiting",
        &[("pool", "kv"), ("endpoint", &busy.to_string())],
        2.0,
    )
    .await;
    // Ten new prompts through llm-lb, one at a time: none goes to the queueing engine (at
    // equal counts and nothing cached, either would do without its queue).
    let url = proxy.url("/v1/completions");
    for i in 0..10u32 {
        let ids: Vec<u32> = (0..64).map(|t| i * 64 + t).collect();
        let (endpoint, reason, _) = complete(&client, &url, &ids).await;
        assert_ne!(endpoint, busy.to_string(), "request {i} ({reason})");
    }
    for d in direct {
        d.abort();
    }
}
