//! The engine: waiting queue, 429 when full, waiting for KV blocks, preemption, LoRA slots,
//! aborts on client disconnect, instant mode.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use vllm_sim::{SimConfig, SimHandle};

fn timed(model: &str) -> SimConfig {
    SimConfig {
        model: model.into(),
        itl_ms: 10.0,
        ..SimConfig::default()
    }
}

fn long_request(tokens: u64) -> Value {
    json!({"messages": [{"role": "user", "content": "Write a long essay."}],
           "max_tokens": tokens, "ignore_eos": true})
}

fn spawn_post(sim: &SimHandle, body: Value) -> tokio::task::JoinHandle<(u16, Value)> {
    let url = format!("{}/v1/chat/completions", sim.url());
    tokio::spawn(async move {
        let resp = client().post(url).json(&body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    })
}

#[tokio::test]
async fn more_requests_than_seats_wait_in_fifo_order() {
    let sim = start(SimConfig {
        max_num_seqs: 2,
        ..timed("m")
    })
    .await;
    // Each request runs ~1 s, so all six are in before the first two finish.
    let tasks: Vec<_> = (0..6)
        .map(|_| spawn_post(&sim, long_request(100)))
        .collect();
    wait_until(10, "4 waiting", || sim.stats().waiting == 4).await;
    let m = scrape(&sim).await;
    assert_eq!(m.value("vllm:num_requests_waiting"), 4.0);
    assert_eq!(m.value("vllm:num_requests_running"), 2.0);
    assert!(m.value("vllm:kv_cache_usage_perc") > 0.0);
    let mut max_running = 0;
    while !tasks.iter().all(|t| t.is_finished()) {
        max_running = max_running.max(sim.stats().running);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(max_running <= 2);
    for t in tasks {
        let (status, v) = t.await.unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 100);
    }
    let m = scrape(&sim).await;
    assert_eq!(m.value("vllm:num_requests_waiting"), 0.0);
    assert_eq!(m.value("vllm:num_requests_running"), 0.0);
    assert_eq!(m.value("vllm:kv_cache_usage_perc"), 0.0);
    assert_eq!(m.value("vllm:request_queue_time_seconds_count"), 6.0);
    // Four requests waited at least one full request (30 tokens × 10 ms).
    assert!(m.value("vllm:request_queue_time_seconds_sum") > 4.0 * 0.25);
}

#[tokio::test]
async fn full_waiting_queue_answers_429() {
    let sim = start(SimConfig {
        max_num_seqs: 1,
        max_waiting: 1,
        ..timed("m")
    })
    .await;
    let r1 = spawn_post(&sim, long_request(500));
    wait_until(10, "1 running", || sim.stats().running == 1).await;
    let r2 = spawn_post(&sim, long_request(500));
    wait_until(10, "1 waiting", || sim.stats().waiting == 1).await;
    let (status, v) = post(&sim, "/v1/chat/completions", &long_request(5)).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], 429);
    assert_eq!(v["error"]["type"], "RateLimitError");
    assert_eq!(sim.stats().requests_rejected, 1);
    r1.abort();
    r2.abort();
    wait_until(10, "aborted requests leave", || {
        let s = sim.stats();
        s.running == 0 && s.waiting == 0
    })
    .await;
    let (status, _) = post(&sim, "/v1/chat/completions", &long_request(2)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_request_waits_while_its_blocks_do_not_fit() {
    // 10 usable blocks; A holds 6 (96-token prompt) and grows to 8, B needs 6 for its
    // prompt. A runs ~0.9 s.
    let sim = start(SimConfig {
        kv_blocks: 11,
        itl_ms: 30.0,
        ..timed("m")
    })
    .await;
    let a: Vec<u32> = (1000..1096).collect();
    let b: Vec<u32> = (2000..2096).collect();
    let url = format!("{}/v1/completions", sim.url());
    let send = |ids: Vec<u32>| {
        let url = url.clone();
        tokio::spawn(async move {
            let body = json!({"prompt": ids, "max_tokens": 30, "ignore_eos": true});
            let r = client().post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    let ta = send(a);
    wait_until(10, "A running", || sim.stats().running == 1).await;
    let tb = send(b);
    wait_until(10, "B waiting", || sim.stats().waiting == 1).await;
    assert_eq!(
        sim.stats().running,
        1,
        "a seat is free but the blocks are not"
    );
    let (sa, va) = ta.await.unwrap();
    let (sb, vb) = tb.await.unwrap();
    assert_eq!((sa, sb), (200, 200), "{va} {vb}");
    assert_eq!(vb["usage"]["completion_tokens"], 30);
}

#[tokio::test]
async fn decode_growth_preempts_the_latest_request_which_resumes_later() {
    // 10 usable blocks; each request needs 3 to start and 10 to finish.
    let sim = start(SimConfig {
        kv_blocks: 11,
        itl_ms: 5.0,
        ..timed("m")
    })
    .await;
    let url = format!("{}/v1/completions", sim.url());
    let tasks: Vec<_> = [3000u32, 4000]
        .into_iter()
        .map(|base| {
            let url = url.clone();
            let ids: Vec<u32> = (base..base + 48).collect();
            tokio::spawn(async move {
                let body = json!({"prompt": ids, "max_tokens": 100, "ignore_eos": true});
                let r = client().post(url).json(&body).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    for t in tasks {
        let (s, v) = t.await.unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 100);
        assert_eq!(v["choices"][0]["text"].as_str().unwrap().len(), 400);
    }
    let st = sim.stats();
    assert!(st.preemptions >= 1, "{st:?}");
    let m = scrape(&sim).await;
    assert_eq!(m.value("vllm:num_preemptions_total"), st.preemptions as f64);
    assert_eq!(m.value("vllm:kv_cache_usage_perc"), 0.0);
}

#[tokio::test]
async fn lora_adapters_beyond_max_loras_wait() {
    let sim = start(SimConfig {
        lora_modules: vec!["sql-lora".into(), "tweet-lora".into()],
        max_loras: 1,
        ..timed("m")
    })
    .await;
    let mut a = long_request(100);
    a["model"] = json!("sql-lora");
    let mut b = long_request(30);
    b["model"] = json!("tweet-lora");
    let ta = spawn_post(&sim, a);
    wait_until(10, "sql-lora running", || sim.stats().running == 1).await;
    let tb = spawn_post(&sim, b);
    wait_until(10, "tweet-lora waiting", || sim.stats().waiting == 1).await;
    // The engine publishes the LoRA info on its next step.
    let deadline = Instant::now() + Duration::from_secs(10);
    let latest = loop {
        let m = scrape(&sim).await;
        let latest = m.series["vllm:lora_requests_info"]
            .iter()
            .max_by(|x, y| x.1.total_cmp(&y.1))
            .unwrap()
            .clone();
        if latest.0["waiting_lora_adapters"] == "tweet-lora" || Instant::now() > deadline {
            break latest;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(latest.0["running_lora_adapters"], "sql-lora");
    assert_eq!(latest.0["waiting_lora_adapters"], "tweet-lora");
    assert_eq!(latest.0["max_lora"], "1");
    assert!(latest.1 > 1.7e9, "value is the unix time of the update");
    assert_eq!(ta.await.unwrap().0, 200);
    assert_eq!(tb.await.unwrap().0, 200);
}

#[tokio::test]
async fn client_disconnect_aborts_streaming_request_and_frees_blocks() {
    let sim = start(timed("m")).await;
    let mut body = long_request(2000);
    body["stream"] = json!(true);
    let resp = client()
        .post(format!("{}/v1/chat/completions", sim.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut s = resp.bytes_stream();
    let first = s.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    assert_eq!(sim.stats().running, 1);
    assert!(sim.stats().kv_cache_usage > 0.0);
    drop(s);
    wait_until(10, "stream aborted", || {
        let st = sim.stats();
        st.requests_aborted == 1 && st.running == 0 && st.kv_cache_usage == 0.0
    })
    .await;
    let m = scrape(&sim).await;
    assert_eq!(
        m.value_with("vllm:request_success_total", "finished_reason", "abort"),
        1.0
    );
    assert!(sim.stats().generation_tokens < 2000);
}

#[tokio::test]
async fn client_disconnect_aborts_json_and_waiting_requests() {
    let sim = start(SimConfig {
        max_num_seqs: 1,
        ..timed("m")
    })
    .await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let url = format!("{}/v1/chat/completions", sim.url());
    // Running JSON request, then a waiting one behind it; both clients give up.
    let u1 = url.clone();
    let c1 = impatient.clone();
    let t1 = tokio::spawn(async move { c1.post(u1).json(&long_request(2000)).send().await });
    wait_until(10, "running", || sim.stats().running == 1).await;
    let t2 = tokio::spawn(async move { impatient.post(url).json(&long_request(5)).send().await });
    wait_until(10, "waiting", || sim.stats().waiting == 1).await;
    assert!(t1.await.unwrap().is_err());
    assert!(t2.await.unwrap().is_err());
    wait_until(10, "both aborted", || {
        let st = sim.stats();
        st.requests_aborted == 2 && st.running == 0 && st.waiting == 0
    })
    .await;
    assert_eq!(sim.stats().kv_cache_usage, 0.0);
    assert_eq!(sim.stats().requests_served, 0);
}

#[tokio::test]
async fn time_scale_zero_is_instant() {
    let sim = start(SimConfig {
        prefill_overhead_ms: 1000.0,
        itl_ms: 1000.0,
        ..instant("m")
    })
    .await;
    let t0 = Instant::now();
    let (status, v) = post(&sim, "/v1/chat/completions", &long_request(3000)).await;
    assert_eq!(status, 200);
    assert_eq!(v["usage"]["completion_tokens"], 3000);
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    // Many concurrent requests in instant mode all complete.
    let tasks: Vec<_> = (0..40)
        .map(|_| spawn_post(&sim, long_request(50)))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().0, 200);
    }
    assert_eq!(sim.stats().requests_served, 41);
}
