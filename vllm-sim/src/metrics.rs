//! Prometheus exposition with vLLM's metric names, labels, help texts and histogram buckets.
//!
//! V1 (default): every series carries `engine="0"` and `model_name`, labels sorted by name
//! as Python's `prometheus_client` writes them, counters exposed with their `_total` names.
//! Legacy (`--legacy-metrics`, vLLM V0): `model_name` only, `vllm:gpu_cache_usage_perc`
//! instead of `vllm:kv_cache_usage_perc`, `vllm:gpu_prefix_cache_hit_rate` instead of the
//! prefix-cache counters, plus `vllm:num_requests_swapped`, and V0's shorter buckets.

use std::fmt::Write;

/// V1 TTFT buckets (seconds).
pub const TTFT_BUCKETS_V1: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// V0 TTFT buckets (seconds).
pub const TTFT_BUCKETS_V0: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// V1 inter-token latency buckets (seconds).
pub const ITL_BUCKETS_V1: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// V0 time-per-output-token buckets (seconds).
pub const ITL_BUCKETS_V0: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
/// V1 request latency buckets (seconds): e2e, queue time.
pub const LATENCY_BUCKETS_V1: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// V0 request latency buckets (seconds).
pub const LATENCY_BUCKETS_V0: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
];

/// Most distinct `vllm:lora_requests_info` label sets kept.
const MAX_LORA_SERIES: usize = 32;

/// A cumulative histogram.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram with these upper bounds (`+Inf` implied).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one value.
    pub fn observe(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    /// Sum of observed values.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Number of observed values.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Finish reasons counted in `vllm:request_success_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Client went away.
    Abort,
}

impl FinishReason {
    /// The label / OpenAI `finish_reason` value.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Engine counters, gauges and histograms.
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    /// Requests in the running batch.
    pub running: usize,
    /// Requests waiting (queued or preempted).
    pub waiting: usize,
    /// KV usage, 0–1.
    pub kv_usage: f64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: u64,
    /// Prompt tokens found in the prefix cache.
    pub prefix_hits: u64,
    /// Prompt tokens of requests that produced their first token.
    pub prompt_tokens: u64,
    /// Output tokens produced.
    pub generation_tokens: u64,
    /// Preemptions (recompute).
    pub preemptions: u64,
    /// Finished requests: stop, length, abort.
    pub finished: [u64; 3],
    /// Time to first token (s).
    pub ttft: Histogram,
    /// Inter-token latency (s).
    pub itl: Histogram,
    /// End-to-end latency (s).
    pub e2e: Histogram,
    /// Time spent waiting before the first schedule (s).
    pub queue: Histogram,
    /// `vllm:lora_requests_info` series: (running, waiting) adapters → last update (unix s).
    lora_series: Vec<((String, String), f64)>,
}

impl EngineMetrics {
    /// Empty metrics, with vLLM V1 or V0 buckets.
    pub fn new(legacy: bool) -> Self {
        let (ttft, itl, lat) = if legacy {
            (TTFT_BUCKETS_V0, ITL_BUCKETS_V0, LATENCY_BUCKETS_V0)
        } else {
            (TTFT_BUCKETS_V1, ITL_BUCKETS_V1, LATENCY_BUCKETS_V1)
        };
        EngineMetrics {
            running: 0,
            waiting: 0,
            kv_usage: 0.0,
            prefix_queries: 0,
            prefix_hits: 0,
            prompt_tokens: 0,
            generation_tokens: 0,
            preemptions: 0,
            finished: [0; 3],
            ttft: Histogram::new(ttft),
            itl: Histogram::new(itl),
            e2e: Histogram::new(lat),
            queue: Histogram::new(lat),
            lora_series: Vec::new(),
        }
    }

    /// Counts a finished request.
    pub fn finish(&mut self, reason: FinishReason) {
        let i = match reason {
            FinishReason::Stop => 0,
            FinishReason::Length => 1,
            FinishReason::Abort => 2,
        };
        self.finished[i] += 1;
    }

    /// Sets the current LoRA label set's time to `now` (unix seconds), as vLLM does each step.
    pub fn set_lora_info(&mut self, running: String, waiting: String, now: f64) {
        let key = (running, waiting);
        if let Some(e) = self.lora_series.iter_mut().find(|(k, _)| *k == key) {
            e.1 = now;
            return;
        }
        if self.lora_series.len() >= MAX_LORA_SERIES {
            if let Some(oldest) = self
                .lora_series
                .iter()
                .enumerate()
                .min_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
                .map(|(i, _)| i)
            {
                self.lora_series.remove(oldest);
            }
        }
        self.lora_series.push((key, now));
    }
}

/// Static facts the exposition needs.
#[derive(Debug, Clone)]
pub struct ExpositionInfo {
    /// `model_name` label.
    pub model: String,
    /// V0 names and labels.
    pub legacy: bool,
    /// Tokens per block.
    pub block_size: usize,
    /// KV blocks.
    pub num_gpu_blocks: usize,
    /// `max_lora` label.
    pub max_loras: usize,
}

/// Python `prometheus_client`'s float formatting (Go style exponents for large values).
pub fn fmt_float(d: f64) -> String {
    if d == f64::INFINITY {
        return "+Inf".into();
    }
    if d == f64::NEG_INFINITY {
        return "-Inf".into();
    }
    if d.is_nan() {
        return "NaN".into();
    }
    let s = format!("{d:?}");
    if let Some(dot) = s.find('.') {
        if d > 0.0 && dot > 6 && !s.contains('e') {
            let digits: String = s[1..dot].chars().chain(s[dot + 1..].chars()).collect();
            let mantissa = format!("{}.{}", &s[..1], digits);
            let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
            return format!("{mantissa}e+{:02}", dot - 1);
        }
    }
    s
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Writer<'a> {
    out: String,
    info: &'a ExpositionInfo,
}

impl Writer<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// The standard labels plus `extra`, sorted by name (V1) as prometheus_client does.
    fn labels(&self, extra: &[(&str, String)]) -> String {
        let mut l: Vec<(&str, String)> = extra.to_vec();
        l.push(("model_name", self.info.model.clone()));
        if !self.info.legacy {
            l.push(("engine", "0".into()));
        }
        l.sort_by(|a, b| a.0.cmp(b.0));
        join_labels(&l)
    }

    fn sample(&mut self, name: &str, labels: &str, v: f64) {
        let _ = writeln!(self.out, "{name}{{{labels}}} {}", fmt_float(v));
    }

    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.header(name, "gauge", help);
        let l = self.labels(&[]);
        self.sample(name, &l, v);
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.header(name, "counter", help);
        let l = self.labels(&[]);
        self.sample(name, &l, v as f64);
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (b, c) in h.bounds.iter().zip(&h.counts) {
            let l = self.labels(&[("le", fmt_float(*b))]);
            self.sample(&bucket, &l, *c as f64);
        }
        let l = self.labels(&[("le", "+Inf".into())]);
        self.sample(&bucket, &l, h.count as f64);
        let l = self.labels(&[]);
        self.sample(&format!("{name}_count"), &l, h.count as f64);
        self.sample(&format!("{name}_sum"), &l, h.sum);
    }
}

fn join_labels(l: &[(&str, String)]) -> String {
    l.iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The `/metrics` text.
pub fn render(info: &ExpositionInfo, m: &EngineMetrics) -> String {
    let mut w = Writer {
        out: String::with_capacity(8192),
        info,
    };
    let legacy = info.legacy;
    w.gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        m.running as f64,
    );
    if legacy {
        w.gauge(
            "vllm:num_requests_swapped",
            "Number of requests swapped to CPU.",
            0.0,
        );
    }
    w.gauge(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        m.waiting as f64,
    );
    if legacy {
        w.gauge(
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage.",
            m.kv_usage,
        );
        w.gauge(
            "vllm:cpu_cache_usage_perc",
            "CPU KV-cache usage. 1 means 100 percent usage.",
            0.0,
        );
        let rate = if m.prefix_queries == 0 {
            0.0
        } else {
            m.prefix_hits as f64 / m.prefix_queries as f64
        };
        w.gauge(
            "vllm:gpu_prefix_cache_hit_rate",
            "GPU prefix cache block hit rate.",
            rate,
        );
    } else {
        w.gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            m.kv_usage,
        );
        w.counter(
            "vllm:prefix_cache_queries_total",
            "Prefix cache queries, in terms of number of queried tokens.",
            m.prefix_queries,
        );
        w.counter(
            "vllm:prefix_cache_hits_total",
            "Prefix cache hits, in terms of number of cached tokens.",
            m.prefix_hits,
        );
    }
    w.counter(
        "vllm:num_preemptions_total",
        "Cumulative number of preemption from the engine.",
        m.preemptions,
    );
    w.counter(
        "vllm:prompt_tokens_total",
        "Number of prefill tokens processed.",
        m.prompt_tokens,
    );
    w.counter(
        "vllm:generation_tokens_total",
        "Number of generation tokens processed.",
        m.generation_tokens,
    );
    w.header(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
    );
    for (reason, n) in [
        FinishReason::Stop,
        FinishReason::Length,
        FinishReason::Abort,
    ]
    .iter()
    .zip(m.finished)
    {
        let l = w.labels(&[("finished_reason", reason.as_str().into())]);
        w.sample("vllm:request_success_total", &l, n as f64);
    }
    w.header(
        "vllm:lora_requests_info",
        "gauge",
        "Running stats on lora requests.",
    );
    for ((running, waiting), t) in &m.lora_series {
        let max = info.max_loras.to_string();
        let l = if legacy {
            // V0 wrote these labels unsorted, in declaration order.
            join_labels(&[
                ("running_lora_adapters", running.clone()),
                ("max_lora", max),
                ("waiting_lora_adapters", waiting.clone()),
            ])
        } else {
            join_labels(&[
                ("max_lora", max),
                ("running_lora_adapters", running.clone()),
                ("waiting_lora_adapters", waiting.clone()),
            ])
        };
        w.sample("vllm:lora_requests_info", &l, *t);
    }
    w.header(
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig",
    );
    let mut cc: Vec<(&str, String)> = vec![
        ("block_size", info.block_size.to_string()),
        ("cache_dtype", "auto".into()),
        ("enable_prefix_caching", "True".into()),
        ("gpu_memory_utilization", "0.9".into()),
        ("num_cpu_blocks", "None".into()),
        ("num_gpu_blocks", info.num_gpu_blocks.to_string()),
        ("prefix_caching_hash_algo", "xxhash".into()),
    ];
    if !legacy {
        cc.push(("engine", "0".into()));
    }
    cc.sort_by(|a, b| a.0.cmp(b.0));
    let l = join_labels(&cc);
    w.sample("vllm:cache_config_info", &l, 1.0);
    w.histogram(
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &m.ttft,
    );
    if legacy {
        w.histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            &m.itl,
        );
    } else {
        w.histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &m.itl,
        );
    }
    w.histogram(
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &m.e2e,
    );
    w.histogram(
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        &m.queue,
    );
    w.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(legacy: bool) -> ExpositionInfo {
        ExpositionInfo {
            model: "m\"x".into(),
            legacy,
            block_size: 16,
            num_gpu_blocks: 100,
            max_loras: 2,
        }
    }

    #[test]
    fn floats_like_prometheus_client() {
        assert_eq!(fmt_float(4.0), "4.0");
        assert_eq!(fmt_float(0.001), "0.001");
        assert_eq!(fmt_float(2560.0), "2560.0");
        assert_eq!(fmt_float(1_756_000_245.0), "1.756000245e+09");
        assert_eq!(fmt_float(1_756_000_200.0), "1.7560002e+09");
        assert_eq!(fmt_float(f64::INFINITY), "+Inf");
        assert_eq!(fmt_float(0.3417), "0.3417");
    }

    #[test]
    fn histogram_is_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        assert_eq!(h.counts, vec![1, 2]);
        assert_eq!(h.count(), 3);
        assert!((h.sum() - 5.55).abs() < 1e-9);
    }

    #[test]
    fn v1_lines_match_vllm() {
        let mut m = EngineMetrics::new(false);
        m.running = 4;
        m.set_lora_info("a,b".into(), "".into(), 1_756_000_245.0);
        m.ttft.observe(0.03);
        let text = render(&info(false), &m);
        assert!(
            text.contains("vllm:num_requests_running{engine=\"0\",model_name=\"m\\\"x\"} 4.0\n")
        );
        assert!(text.contains("# TYPE vllm:prefix_cache_hits_total counter\n"));
        assert!(text.contains(
            "vllm:request_success_total{engine=\"0\",finished_reason=\"length\",model_name=\"m\\\"x\"} 0.0"
        ));
        assert!(text.contains(
            "vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"\"} 1.756000245e+09"
        ));
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"0.04\",model_name=\"m\\\"x\"} 1.0"
        ));
        assert!(text.contains("le=\"2560.0\""));
        assert!(text.contains("num_gpu_blocks=\"100\""));
        assert!(!text.contains("gpu_cache_usage_perc"));
    }

    #[test]
    fn legacy_lines_match_vllm_v0() {
        let mut m = EngineMetrics::new(true);
        m.set_lora_info("".into(), "".into(), 1.0);
        let text = render(&info(true), &m);
        assert!(text.contains("vllm:gpu_cache_usage_perc{model_name=\"m\\\"x\"} 0.0"));
        assert!(text.contains("vllm:num_requests_swapped{"));
        assert!(!text.contains("engine="));
        assert!(!text.contains("kv_cache_usage_perc"));
        assert!(!text.contains("le=\"2560.0\""));
        assert!(text.contains(
            "vllm:lora_requests_info{running_lora_adapters=\"\",max_lora=\"2\",waiting_lora_adapters=\"\"} 1.0"
        ));
    }

    #[test]
    fn lora_series_are_capped() {
        let mut m = EngineMetrics::new(false);
        for i in 0..100 {
            m.set_lora_info(format!("a{i}"), String::new(), i as f64);
        }
        assert_eq!(m.lora_series.len(), MAX_LORA_SERIES);
        assert!(m.lora_series.iter().any(|(k, _)| k.0 == "a99"));
    }
}
