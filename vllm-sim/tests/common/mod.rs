//! Helpers shared by the integration tests: starting simulators, calling them, parsing SSE
//! and Prometheus text.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use openmetrics_parser::{MetricNumber, PrometheusValue};
use serde_json::{json, Value};
use vllm_sim::{SimConfig, SimHandle};

/// Starts a simulator on a free loopback port.
pub async fn start(cfg: SimConfig) -> SimHandle {
    vllm_sim::spawn(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("simulator starts")
}

/// An instant simulator (time_scale 0) with the given model name.
pub fn instant(model: &str) -> SimConfig {
    SimConfig {
        model: model.into(),
        time_scale: 0.0,
        ..SimConfig::default()
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// POSTs JSON; returns status and the parsed body.
pub async fn post(sim: &SimHandle, path: &str, body: &Value) -> (u16, Value) {
    let resp = client()
        .post(format!("{}{path}", sim.url()))
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body read");
    let v = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
    (status, v)
}

/// GETs a path; returns status and body text.
pub async fn get(sim: &SimHandle, path: &str) -> (u16, String) {
    let resp = client()
        .get(format!("{}{path}", sim.url()))
        .send()
        .await
        .expect("request sent");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body read"))
}

/// A chat request body.
pub fn chat(model: &str, messages: &[(&str, &str)], max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": messages.iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>(),
        "max_tokens": max_tokens,
        "ignore_eos": true,
    })
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("SSE event without data: {e:?}"))
                .to_string()
        })
        .collect()
}

/// POSTs a streaming request, expects a 200 event stream and returns its body.
async fn stream_body(sim: &SimHandle, path: &str, body: &Value) -> String {
    let resp = client()
        .post(format!("{}{path}", sim.url()))
        .json(body)
        .send()
        .await
        .expect("request sent");
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    resp.text().await.expect("body read")
}

/// POSTs a streaming request and returns the SSE payloads.
pub async fn stream(sim: &SimHandle, path: &str, body: &Value) -> Vec<String> {
    sse_events(&stream_body(sim, path, body).await)
}

/// Polls `cond` every 5 ms until it holds or `secs` pass.
pub async fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A parsed `/metrics`: series name → list of (labels, value); histograms as
/// `<name>_count` / `<name>_sum` and `<name>_bucket` with an `le` label.
#[derive(Debug, Default)]
pub struct Scrape {
    pub types: HashMap<String, String>,
    pub series: HashMap<String, Vec<Series>>,
}

/// Labels and value of one sample.
pub type Series = (HashMap<String, String>, f64);

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let expo = openmetrics_parser::prometheus::parse_prometheus(text)
            .unwrap_or_else(|e| panic!("metrics do not parse: {e:?}\n{text}"));
        let mut out = Scrape::default();
        for (name, fam) in &expo.families {
            out.types.insert(name.clone(), fam.family_type.to_string());
            for s in fam.iter_samples() {
                let ls = s.get_labelset().unwrap();
                let labels: HashMap<String, String> =
                    ls.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                let num = |n: &MetricNumber| n.as_f64();
                match &s.value {
                    PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => out
                        .series
                        .entry(name.clone())
                        .or_default()
                        .push((labels, num(n))),
                    PrometheusValue::Counter(c) => out
                        .series
                        .entry(name.clone())
                        .or_default()
                        .push((labels, num(&c.value))),
                    PrometheusValue::Histogram(h) => {
                        out.series
                            .entry(format!("{name}_count"))
                            .or_default()
                            .push((labels.clone(), h.count.unwrap_or(0) as f64));
                        out.series
                            .entry(format!("{name}_sum"))
                            .or_default()
                            .push((labels.clone(), h.sum.map(|n| num(&n)).unwrap_or(0.0)));
                        for b in &h.buckets {
                            let mut l = labels.clone();
                            l.insert("le".into(), b.upper_bound.to_string());
                            out.series
                                .entry(format!("{name}_bucket"))
                                .or_default()
                                .push((l, num(&b.count)));
                        }
                    }
                    PrometheusValue::Summary(_) => {}
                }
            }
        }
        out
    }

    /// The single value of a series without extra labels.
    pub fn value(&self, name: &str) -> f64 {
        let s = self
            .series
            .get(name)
            .unwrap_or_else(|| panic!("no series {name}"));
        assert_eq!(s.len(), 1, "{name} has {} series", s.len());
        s[0].1
    }

    /// The value of the series whose label `key` is `val`.
    pub fn value_with(&self, name: &str, key: &str, val: &str) -> f64 {
        self.series
            .get(name)
            .and_then(|s| {
                s.iter()
                    .find(|(l, _)| l.get(key).map(String::as_str) == Some(val))
            })
            .unwrap_or_else(|| panic!("no series {name}{{{key}={val}}}"))
            .1
    }
}

/// Scrapes and parses `/metrics`.
pub async fn scrape(sim: &SimHandle) -> Scrape {
    let (status, text) = get(sim, "/metrics").await;
    assert_eq!(status, 200);
    Scrape::parse(&text)
}

/// The `(event, data)` pairs of an SSE body whose events are named (`event: NAME` then
/// `data: JSON`), as the Responses and Messages APIs send them.
pub fn named_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let (name, data) = e
                .strip_prefix("event: ")
                .and_then(|rest| rest.split_once("\ndata: "))
                .unwrap_or_else(|| panic!("SSE event without a name or data: {e:?}"));
            let data = serde_json::from_str(data)
                .unwrap_or_else(|err| panic!("data is not JSON ({err}): {data:?}"));
            (name.to_string(), data)
        })
        .collect()
}

/// POSTs a streaming request to an API with named events and returns them.
pub async fn stream_named(sim: &SimHandle, path: &str, body: &Value) -> Vec<(String, Value)> {
    named_events(&stream_body(sim, path, body).await)
}

/// The prompt ids `/tokenize` gives for chat messages.
pub async fn tokenize_messages(sim: &SimHandle, messages: &Value) -> Vec<u64> {
    let (status, v) = post(sim, "/tokenize", &json!({ "messages": messages })).await;
    assert_eq!(status, 200, "{v}");
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

/// vLLM's cached tokens of a request of `prompt` tokens after one that left `computed` tokens
/// of the same prefix computed: the full blocks of it, capped at ⌊(n−1)/B⌋·B.
pub fn expected_cached(computed: u64, prompt: u64, block: u64) -> u64 {
    (computed / block).min((prompt - 1) / block) * block
}
