//! `least_busy` end to end: the real llm-lb binary scraping backends that serve fixed `/metrics`
//! texts (vLLM V1, vLLM V0 and SGLang names) routes as the Inference Extension's filter tree says,
//! refuses sheddable requests with 429 when every endpoint is saturated, keeps routing when
//! `/metrics` fails or hangs, and spreads a burst over idle `vllm-sim` servers between scrapes.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::Uri;
use axum::response::Response;
use axum::Router;
use common::{chat_body, parse_metric, pool_yaml, sim_fleet, Proxy};
use serde_json::{json, Value};
use vllm_sim::{SimConfig, SimHandle};

const BASE: &str = "meta-llama/Llama-3.1-8B-Instruct";
const POOL: &str = "lb";

/// What a backend's `/metrics` does.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    Serve = 0,
    Fail = 1,
    Hang = 2,
}

struct MetricsState {
    text: Mutex<String>,
    mode: AtomicU8,
    /// Completion requests answered.
    served: AtomicUsize,
}

/// A backend answering every request with a small JSON completion, `/metrics` with settable text.
struct MetricsBackend {
    addr: SocketAddr,
    state: Arc<MetricsState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MetricsBackend {
    async fn start(text: String) -> MetricsBackend {
        let state = Arc::new(MetricsState {
            text: Mutex::new(text),
            mode: AtomicU8::new(Mode::Serve as u8),
            served: AtomicUsize::new(0),
        });
        let app = Router::new().fallback(handle).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        MetricsBackend { addr, state, task }
    }

    fn set_text(&self, text: String) {
        *self.state.text.lock().expect("lock") = text;
    }

    fn set_mode(&self, mode: Mode) {
        self.state.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn served(&self) -> usize {
        self.state.served.load(Ordering::SeqCst)
    }
}

async fn handle(State(state): State<Arc<MetricsState>>, uri: Uri) -> Response {
    match uri.path() {
        "/metrics" => match state.mode.load(Ordering::SeqCst) {
            0 => {
                let text = state.text.lock().expect("lock").clone();
                Response::builder()
                    .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                    .body(Body::from(text))
                    .expect("resp")
            }
            1 => Response::builder()
                .status(500)
                .body(Body::from("internal error"))
                .expect("resp"),
            _ => std::future::pending().await,
        },
        "/health" => Response::new(Body::from("ok")),
        _ => {
            state.served.fetch_add(1, Ordering::SeqCst);
            Response::builder()
                .header("content-type", "application/json")
                .body(Body::from(r#"{"object":"chat.completion"}"#))
                .expect("resp")
        }
    }
}

/// The metric names an engine uses.
#[derive(Clone, Copy, Debug)]
enum Flavour {
    VllmV1,
    VllmV0,
    Sglang,
}

/// An exposition for (waiting, KV-cache use, max LoRA, running adapters), with the usual
/// neighbours (running batch, counters, an unrelated Python family).
fn exposition(f: Flavour, waiting: u64, kv: f64, max_lora: usize, adapters: &[&str]) -> String {
    let running = adapters.join(",");
    let gauge = |name: &str, labels: &str, v: String| {
        format!("# HELP {name} help text.\n# TYPE {name} gauge\n{name}{{{labels}}} {v}\n")
    };
    let python = "# HELP python_gc_objects_collected_total Objects collected during gc\n# TYPE python_gc_objects_collected_total counter\npython_gc_objects_collected_total{generation=\"0\"} 123.0\n";
    match f {
        Flavour::VllmV1 => {
            let l = format!("engine=\"0\",model_name=\"{BASE}\"");
            format!(
                "{python}{}{}{}# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{{{l}}} 600.0\n{}",
                gauge("vllm:num_requests_running", &l, "1.0".into()),
                gauge("vllm:num_requests_waiting", &l, format!("{waiting}.0")),
                gauge("vllm:kv_cache_usage_perc", &l, kv.to_string()),
                gauge(
                    "vllm:lora_requests_info",
                    &format!("max_lora=\"{max_lora}\",running_lora_adapters=\"{running}\",waiting_lora_adapters=\"\""),
                    "1.756000245e+09".into()
                ),
            )
        }
        Flavour::VllmV0 => {
            let l = format!("model_name=\"{BASE}\"");
            format!(
                "{python}{}{}{}{}{}",
                gauge("vllm:num_requests_running", &l, "1.0".into()),
                gauge("vllm:num_requests_swapped", &l, "0.0".into()),
                gauge("vllm:num_requests_waiting", &l, format!("{waiting}.0")),
                gauge("vllm:gpu_cache_usage_perc", &l, kv.to_string()),
                gauge(
                    "vllm:lora_requests_info",
                    &format!("running_lora_adapters=\"{running}\",max_lora=\"{max_lora}\",waiting_lora_adapters=\"\""),
                    "1.756000245e+09".into()
                ),
            )
        }
        Flavour::Sglang => {
            let l = format!(
                "engine_type=\"unified\",model_name=\"{BASE}\",pp_rank=\"0\",tp_rank=\"0\""
            );
            format!(
                "{}{}{}{}",
                gauge("sglang:num_running_reqs", &l, "1.0".into()),
                gauge("sglang:token_usage", &l, kv.to_string()),
                gauge("sglang:num_queue_reqs", &l, format!("{waiting}.0")),
                gauge("sglang:cache_hit_rate", &l, "0.0075".into()),
            )
        }
    }
}

fn yaml(endpoints: &[SocketAddr], interval_ms: u64, lb_config: &str) -> String {
    format!(
        "expose_endpoint_header: true\npools:\n{}",
        pool_yaml(
            POOL,
            "['*']",
            endpoints,
            "least_busy",
            &format!(
                "    health_check: {{enabled: false}}\n    metrics: {{path: /metrics, interval_ms: {interval_ms}}}\n    lb_config: {lb_config}\n"
            ),
        )
    )
}

/// Poll the admin metrics until `ok` holds for them (20 s at most).
async fn wait_for(proxy: &Proxy, what: &str, ok: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = proxy.metrics().await;
        if ok(&text) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}\nmetrics:\n{text}\nlog:\n{}",
                proxy.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn known(text: &str, endpoint: SocketAddr) -> Option<f64> {
    parse_metric(
        text,
        "llmlb_endpoint_metrics_known",
        &[("pool", POOL), ("endpoint", &endpoint.to_string())],
    )
}

fn picks(text: &str, reason: &str) -> f64 {
    parse_metric(
        text,
        "llmlb_picks_total",
        &[("pool", POOL), ("policy", "least_busy"), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// POST a chat request for `model`; the status and the endpoint that served it.
async fn send(
    client: &reqwest::Client,
    proxy: &Proxy,
    model: &str,
) -> (u16, Option<String>, String) {
    let resp = client
        .post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat_body(model, 32, false))
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .expect("send");
    let status = resp.status().as_u16();
    let endpoint = resp
        .headers()
        .get("x-llm-lb-endpoint")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, endpoint, resp.text().await.unwrap_or_default())
}

/// T1–T3 of the upstream filter tree through a real llm-lb, with `flavour`'s metric names.
async fn follows_the_tree(flavour: Flavour) {
    // T1/T2 pods: (waiting, kv, max_lora, running adapters).
    let b = [
        MetricsBackend::start(exposition(flavour, 0, 0.2, 2, &["foo", "bar"])).await,
        MetricsBackend::start(exposition(flavour, 3, 0.1, 2, &["foo", "critical"])).await,
        MetricsBackend::start(exposition(flavour, 10, 0.2, 2, &["foo"])).await,
    ];
    let addrs: Vec<SocketAddr> = b.iter().map(|x| x.addr).collect();
    // Scrapes every 500 ms: a snapshot goes stale (unknown) only after 1.5 s, which a busy
    // machine (the other tests of this file run alongside) does not reach between two scrapes.
    let proxy = Proxy::start(&yaml(&addrs, 500, "{criticalModels: [critical]}"));
    wait_for(&proxy, "all endpoints' metrics known", |t| {
        addrs.iter().all(|a| known(t, *a) == Some(1.0))
    })
    .await;
    let client = reqwest::Client::new();
    let (b1, b2) = (addrs[0].to_string(), addrs[1].to_string());
    for _ in 0..10 {
        // T1: the critical request goes where its adapter runs (SGLang, without LoRA metrics:
        // the least queued, then the least KV-cache use — the same endpoint).
        let (status, ep, body) = send(&client, &proxy, "critical").await;
        assert_eq!(
            (status, ep.as_deref()),
            (200, Some(b2.as_str())),
            "{flavour:?}: {body}"
        );
        // T2: the sheddable request goes to the least queued endpoint with capacity.
        let (status, ep, body) = send(&client, &proxy, "sheddable").await;
        assert_eq!(
            (status, ep.as_deref()),
            (200, Some(b1.as_str())),
            "{flavour:?}: {body}"
        );
    }
    let text = proxy.metrics().await;
    match flavour {
        Flavour::Sglang => assert_eq!(picks(&text, "least_busy"), 20.0, "{text}"),
        Flavour::VllmV1 | Flavour::VllmV0 => {
            assert_eq!(picks(&text, "least_busy_lora_affinity"), 10.0, "{text}");
            assert_eq!(picks(&text, "least_busy"), 10.0, "{text}");
        }
    }
    let waiting = parse_metric(
        &text,
        "llmlb_engine_waiting",
        &[("endpoint", &addrs[2].to_string())],
    );
    assert_eq!(waiting, Some(10.0), "{text}");

    // T3: nothing has capacity for a sheddable request.
    b[0].set_text(exposition(flavour, 10, 0.9, 2, &["foo", "bar"]));
    b[1].set_text(exposition(flavour, 3, 0.85, 2, &["foo", "critical"]));
    b[2].set_text(exposition(flavour, 10, 0.85, 2, &["foo"]));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, _) = send(&client, &proxy, "sheddable").await;
        if status == 429 {
            break;
        }
        assert!(Instant::now() < deadline, "{flavour:?}: never saturated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let served_before: usize = b.iter().map(MetricsBackend::served).sum();
    for _ in 0..5 {
        let (status, ep, body) = send(&client, &proxy, "sheddable").await;
        assert_eq!(status, 429, "{flavour:?}: {body}");
        assert_eq!(ep, None);
        let v: Value = serde_json::from_str(&body).expect("OpenAI-style JSON error");
        assert_eq!(v["error"]["type"], "rate_limit_error", "{body}");
        assert_eq!(v["error"]["code"], "overloaded", "{body}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(POOL)),
            "{body}"
        );
        // A critical request is never refused.
        let (status, ep, body) = send(&client, &proxy, "critical").await;
        assert_eq!(
            (status, ep.as_deref()),
            (200, Some(b2.as_str())),
            "{flavour:?}: {body}"
        );
    }
    let served_after: usize = b.iter().map(MetricsBackend::served).sum();
    assert_eq!(
        served_after - served_before,
        5,
        "refused requests never reach a backend"
    );
    assert!(
        proxy
            .access_lines()
            .iter()
            .any(|l| l.contains("status=429") && l.contains("reason=saturated")),
        "{}",
        proxy.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_filter_tree_on_vllm_v1_metrics() {
    follows_the_tree(Flavour::VllmV1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_filter_tree_on_vllm_v0_metrics() {
    follows_the_tree(Flavour::VllmV0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_filter_tree_on_sglang_metrics() {
    follows_the_tree(Flavour::Sglang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_or_hung_metrics_do_not_stop_routing() {
    let b = [
        MetricsBackend::start(exposition(Flavour::VllmV1, 0, 0.1, 0, &[])).await,
        MetricsBackend::start(exposition(Flavour::VllmV1, 0, 0.1, 0, &[])).await,
        MetricsBackend::start(exposition(Flavour::VllmV1, 0, 0.1, 0, &[])).await,
    ];
    b[0].set_mode(Mode::Hang);
    b[1].set_mode(Mode::Fail);
    let addrs: Vec<SocketAddr> = b.iter().map(|x| x.addr).collect();
    let label = |i: usize| addrs[i].to_string();
    let proxy = Proxy::start(&yaml(&addrs, 100, "{}"));
    wait_for(&proxy, "one known, two failing", |t| {
        let failures = |i: usize, reason: &str| {
            parse_metric(
                t,
                "llmlb_scrape_failures_total",
                &[("endpoint", &label(i)), ("reason", reason)],
            )
            .unwrap_or(0.0)
        };
        known(t, addrs[2]) == Some(1.0)
            && known(t, addrs[0]) == Some(0.0)
            && known(t, addrs[1]) == Some(0.0)
            && failures(0, "timeout") >= 2.0
            && failures(1, "status") >= 2.0
    })
    .await;
    let text = proxy.metrics().await;
    let age = parse_metric(
        &text,
        "llmlb_scrape_age_seconds",
        &[("endpoint", &label(0))],
    );
    assert_eq!(age, Some(f64::INFINITY), "never scraped: {text}");

    // Unknown endpoints are not dropped: they compete with the tree's choice on in-flight counts.
    let client = reqwest::Client::new();
    for _ in 0..45 {
        let (status, _, body) = send(&client, &proxy, "m").await;
        assert_eq!(status, 200, "{body}");
    }
    let served: Vec<usize> = b.iter().map(MetricsBackend::served).collect();
    assert!(served.iter().all(|n| *n > 0), "{served:?}");
    let text = proxy.metrics().await;
    assert!(
        picks(&text, "unknown_metrics_least_request") > 0.0,
        "{text}"
    );
    assert!(picks(&text, "least_busy") > 0.0, "{text}");
    let log = proxy.log_text();
    assert!(
        log.contains(&format!("engine metrics of {} unknown", label(0))),
        "{log}"
    );
    assert!(
        log.contains(&format!("engine metrics of {} unknown", label(1))),
        "{log}"
    );

    // Every endpoint unknown: this replica's least request, counted as a fallback.
    b[2].set_mode(Mode::Hang);
    wait_for(&proxy, "all unknown", |t| known(t, addrs[2]) == Some(0.0)).await;
    for _ in 0..10 {
        let (status, _, body) = send(&client, &proxy, "m").await;
        assert_eq!(status, 200, "{body}");
    }
    let text = proxy.metrics().await;
    let fallbacks = parse_metric(
        &text,
        "llmlb_fallback_total",
        &[("pool", POOL), ("reason", "metrics_unknown")],
    );
    assert!(fallbacks.is_some_and(|n| n >= 10.0), "{text}");

    // A recovered endpoint is known again.
    b[0].set_mode(Mode::Serve);
    wait_for(&proxy, "endpoint 0 known again", |t| {
        known(t, addrs[0]) == Some(1.0)
    })
    .await;
    let log = proxy.log_text();
    assert!(
        log.contains(&format!("engine metrics of {} known again", label(0))),
        "{log}"
    );
}

const MODEL: &str = "sim/llama";

async fn sims(n: usize, max_num_seqs: usize) -> Vec<SimHandle> {
    let base = SimConfig {
        model: MODEL.to_string(),
        max_num_seqs,
        ..SimConfig::default()
    };
    sim_fleet(n, base).await
}

/// Send `n` chat requests at once through the proxy; every status.
async fn burst(proxy: &Proxy, n: usize, max_tokens: u32) -> Vec<u16> {
    let client = reqwest::Client::new();
    let url = proxy.url("/v1/chat/completions");
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let body = json!({
                    "model": MODEL,
                    "messages": [{"role": "user", "content": format!("Question {i}: tell me about lighthouses.")}],
                    "max_tokens": max_tokens, "ignore_eos": true,
                });
                client
                    .post(url)
                    .json(&body)
                    .timeout(Duration::from_secs(120))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap_or(0));
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_spreads_over_idle_sims_between_scrapes() {
    let sims = sims(3, 16).await;
    let addrs: Vec<SocketAddr> = sims.iter().map(SimHandle::addr).collect();
    // One scrape a second: the burst lands between two scrapes that both saw idle servers.
    let proxy = Proxy::start(&yaml(
        &addrs,
        1000,
        &format!("{{criticalModels: ['{MODEL}']}}"),
    ));
    wait_for(&proxy, "all sims' metrics known", |t| {
        addrs.iter().all(|a| known(t, *a) == Some(1.0))
    })
    .await;
    let statuses = burst(&proxy, 50, 100).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let got: Vec<u64> = sims.iter().map(|s| s.stats().requests_received).collect();
    assert_eq!(got.iter().sum::<u64>(), 50);
    // Counting the burst's own dispatches keeps the three level (16–17 each); a uniformly random
    // choice among equally idle servers would leave one below 14 in about half the runs.
    assert!(got.iter().all(|n| *n >= 14), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_does_not_herd_onto_the_server_that_looked_idlest() {
    // Two servers have two requests waiting each (four running), the third is idle: a stale
    // snapshot alone would send the whole burst to the third (Higress issue #4751).
    let sims = sims(3, 4).await;
    let addrs: Vec<SocketAddr> = sims.iter().map(SimHandle::addr).collect();
    let proxy = Proxy::start(&yaml(
        &addrs,
        1000,
        &format!("{{criticalModels: ['{MODEL}']}}"),
    ));
    let client = reqwest::Client::new();
    let mut preload = Vec::new();
    for sim in &sims[..2] {
        for i in 0..6 {
            let req = client
                .post(format!("{}/v1/chat/completions", sim.url()))
                .json(&json!({
                    "model": MODEL,
                    "messages": [{"role": "user", "content": format!("long {i}")}],
                    "max_tokens": 800, "ignore_eos": true,
                }))
                .timeout(Duration::from_secs(120))
                .send();
            preload.push(tokio::spawn(req));
        }
    }
    let waiting = |t: &str, a: SocketAddr| {
        parse_metric(t, "llmlb_engine_waiting", &[("endpoint", &a.to_string())])
    };
    wait_for(&proxy, "llm-lb to see the preloaded queues", |t| {
        waiting(t, addrs[0]) == Some(2.0)
            && waiting(t, addrs[1]) == Some(2.0)
            && waiting(t, addrs[2]) == Some(0.0)
    })
    .await;
    let statuses = burst(&proxy, 50, 10).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let got: Vec<u64> = sims
        .iter()
        .zip([6, 6, 0])
        .map(|(s, pre)| s.stats().requests_received - pre)
        .collect();
    assert_eq!(got.iter().sum::<u64>(), 50, "{got:?}");
    assert!(got.iter().all(|n| *n >= 10), "{got:?}");
    for p in preload {
        p.abort();
    }
}
