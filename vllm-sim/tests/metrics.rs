//! `/metrics` parses with a Prometheus text parser, carries vLLM's V1 (or V0) names and
//! labels, and its counters agree with what the API reported.

mod common;

use common::*;
use serde_json::json;
use vllm_sim::SimConfig;

const V1_NAMES: &[(&str, &str)] = &[
    ("vllm:num_requests_running", "gauge"),
    ("vllm:num_requests_waiting", "gauge"),
    ("vllm:kv_cache_usage_perc", "gauge"),
    ("vllm:prefix_cache_queries_total", "counter"),
    ("vllm:prefix_cache_hits_total", "counter"),
    ("vllm:num_preemptions_total", "counter"),
    ("vllm:prompt_tokens_total", "counter"),
    ("vllm:generation_tokens_total", "counter"),
    ("vllm:request_success_total", "counter"),
    ("vllm:lora_requests_info", "gauge"),
    ("vllm:cache_config_info", "gauge"),
    ("vllm:time_to_first_token_seconds", "histogram"),
    ("vllm:inter_token_latency_seconds", "histogram"),
    ("vllm:e2e_request_latency_seconds", "histogram"),
    ("vllm:request_queue_time_seconds", "histogram"),
];

#[tokio::test]
async fn v1_metrics_parse_with_vllm_names_labels_and_values() {
    let sim = start(SimConfig {
        lora_modules: vec!["sql-lora".into()],
        max_loras: 2,
        kv_blocks: 1000,
        ..instant("meta-llama/Llama-3.1-8B-Instruct")
    })
    .await;
    let model = "meta-llama/Llama-3.1-8B-Instruct";
    let body = chat(model, &[("user", &"All work and no play. ".repeat(20))], 10);
    let mut prompt = 0;
    let mut cached = 0;
    for _ in 0..3 {
        let (s, v) = post(&sim, "/v1/chat/completions", &body).await;
        assert_eq!(s, 200);
        prompt += v["usage"]["prompt_tokens"].as_u64().unwrap();
        cached += v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
    }
    let (s, _) = post(
        &sim,
        "/v1/chat/completions",
        &json!({"model": model, "messages": [{"role": "user", "content": "q"}], "max_tokens": 8}),
    )
    .await;
    assert_eq!(s, 200);

    let m = scrape(&sim).await;
    for (name, kind) in V1_NAMES {
        assert_eq!(
            m.types.get(*name).map(String::as_str),
            Some(*kind),
            "{name}"
        );
    }
    assert!(!m.types.contains_key("vllm:gpu_cache_usage_perc"));
    // Every series of the engine carries model_name and engine="0", as vLLM V1 does.
    for (name, series) in &m.series {
        if name == "vllm:lora_requests_info" || name == "vllm:cache_config_info" {
            continue;
        }
        for (labels, _) in series {
            assert_eq!(
                labels.get("model_name").map(String::as_str),
                Some(model),
                "{name}"
            );
            assert_eq!(
                labels.get("engine").map(String::as_str),
                Some("0"),
                "{name}"
            );
        }
    }
    assert_eq!(m.value("vllm:num_requests_running"), 0.0);
    assert_eq!(m.value("vllm:num_requests_waiting"), 0.0);
    assert_eq!(m.value("vllm:kv_cache_usage_perc"), 0.0);
    let queries = m.value("vllm:prefix_cache_queries_total");
    let hits = m.value("vllm:prefix_cache_hits_total");
    assert!(queries >= prompt as f64);
    assert_eq!(hits, cached as f64);
    assert!(hits > 0.0);
    assert!(m.value("vllm:prompt_tokens_total") >= prompt as f64);
    assert!(m.value("vllm:generation_tokens_total") >= 30.0);
    assert_eq!(
        m.value_with("vllm:request_success_total", "finished_reason", "length"),
        3.0
    );
    let finished: f64 = ["stop", "length"]
        .iter()
        .map(|r| m.value_with("vllm:request_success_total", "finished_reason", r))
        .sum();
    assert_eq!(finished, 4.0);
    assert_eq!(
        m.value_with("vllm:request_success_total", "finished_reason", "abort"),
        0.0
    );
    let cc = &m.series["vllm:cache_config_info"][0];
    assert_eq!(cc.0["block_size"], "16");
    assert_eq!(cc.0["num_gpu_blocks"], "1000");
    assert_eq!(cc.1, 1.0);
    let lora = &m.series["vllm:lora_requests_info"];
    assert!(lora.iter().all(|(l, _)| l["max_lora"] == "2"
        && l.contains_key("running_lora_adapters")
        && l.contains_key("waiting_lora_adapters")));
    // Histograms: vLLM V1 buckets, one observation per request.
    assert_eq!(m.value("vllm:time_to_first_token_seconds_count"), 4.0);
    assert_eq!(m.value("vllm:e2e_request_latency_seconds_count"), 4.0);
    let buckets = &m.series["vllm:time_to_first_token_seconds_bucket"];
    assert_eq!(buckets.len(), 23, "22 finite buckets and +Inf");
    assert!(buckets.iter().any(|(l, _)| l["le"] == "2560"));

    let st = sim.stats();
    assert_eq!(st.prefix_cache_hits as f64, hits);
    assert_eq!(st.requests_served, 4);
    assert_eq!(st.ttft_count, 4);
}

#[tokio::test]
async fn legacy_metrics_use_v0_names() {
    let sim = start(SimConfig {
        legacy_metrics: true,
        ..instant("m")
    })
    .await;
    let (s, _) = post(
        &sim,
        "/v1/chat/completions",
        &chat("m", &[("user", "hi")], 3),
    )
    .await;
    assert_eq!(s, 200);
    let m = scrape(&sim).await;
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:num_requests_swapped",
        "vllm:gpu_cache_usage_perc",
        "vllm:gpu_prefix_cache_hit_rate",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
        "vllm:time_to_first_token_seconds",
        "vllm:time_per_output_token_seconds",
        "vllm:e2e_request_latency_seconds",
    ] {
        assert!(m.types.contains_key(name), "{name} missing");
    }
    assert!(!m.types.contains_key("vllm:kv_cache_usage_perc"));
    assert!(!m.types.contains_key("vllm:prefix_cache_queries_total"));
    for (name, series) in &m.series {
        for (labels, _) in series {
            assert!(!labels.contains_key("engine"), "{name} has an engine label");
        }
    }
    assert_eq!(m.value("vllm:gpu_cache_usage_perc"), 0.0);
    assert_eq!(
        m.series["vllm:time_to_first_token_seconds_bucket"].len(),
        17
    );
}
