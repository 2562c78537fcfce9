//! An idle simulator, even with time_scale 0 and KV events published to a connected
//! subscriber, does not burn CPU (its own test binary, so other tests do not disturb the
//! measurement).

use std::time::Duration;

use zeromq::Socket;

fn process_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name: utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_engine_sleeps() {
    if !std::path::Path::new("/proc/self/stat").exists() {
        return;
    }
    let kv_events = vllm_sim::KvEventsConfig::from_json(
        r#"{"enable_kv_cache_events": true, "endpoint": "tcp://*:0",
            "replay_endpoint": "tcp://127.0.0.1:0"}"#,
    )
    .unwrap();
    let sim = vllm_sim::spawn(
        vllm_sim::SimConfig {
            time_scale: 0.0,
            kv_events_config: Some(kv_events),
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    // A subscriber stays connected to the event publisher while the simulator idles.
    let mut sub = zeromq::SubSocket::new();
    sub.subscribe("").await.unwrap();
    let endpoint = sim.kv_events().unwrap().local_endpoint().unwrap();
    sub.connect(&endpoint).await.unwrap();
    // One request so the engine has run at least once.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", sim.url()))
        .json(&serde_json::json!({"prompt": "x", "max_tokens": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let before = process_cpu_ticks();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = process_cpu_ticks() - before;
    // Clock ticks are 10 ms: a busy loop would use ~100 in one second.
    assert!(used < 20, "idle simulator used {used} CPU ticks in 1 s");
}
