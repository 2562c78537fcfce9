//! An engine's `/metrics` (Prometheus text exposition) read into [`EndpointMetrics`].
//!
//! | signal | vLLM V1 | vLLM V0 | SGLang | llama.cpp (`--metrics`) |
//! |---|---|---|---|---|
//! | waiting queue | `vllm:num_requests_waiting` | same | `sglang:num_queue_reqs` | `llamacpp:requests_deferred` |
//! | running batch | `vllm:num_requests_running` | same | `sglang:num_running_reqs` | `llamacpp:requests_processing` |
//! | KV-cache use (0–1) | `vllm:kv_cache_usage_perc` | `vllm:gpu_cache_usage_perc` | `sglang:token_usage` | — |
//! | LoRA adapters | `vllm:lora_requests_info` | same | — | — |
//!
//! The first name of a row that is present wins (vLLM 0.9 exports both KV names). The waiting
//! queue is required, and so is KV-cache use for vLLM and SGLang; without them the scrape fails
//! (an unknown exposition is a counted scrape failure, never a guess). llama.cpp exports no
//! KV-cache use: its metrics have [`EndpointMetrics::kv_cache_usage`] `None`. A missing
//! `vllm:lora_requests_info` means no LoRA (no adapters, no room for any), not missing data; of its
//! series the one with the largest value (the time it was last set) is the current one, as in the
//! Inference Extension. Several series of one family — data-parallel engines (`engine`,
//! `dp_rank` labels) — are added up for the queues; tensor-parallel ranks reporting the same
//! engine (`tp_rank`) are not double counted (the largest is taken); KV-cache use is the largest.
//!
//! Parsing is done by `prom_text_format_parser` (which, unlike `prometheus-parse` 0.2, accepts
//! metric names with `:`). Only the lines of the families above are handed to it, so an odd line
//! in an unrelated family (a Python client's process metrics, say) does not cost the endpoint
//! its data.

use std::collections::BTreeMap;

use prom_text_format_parser::{Metric, Sample, ScrapeParseError};

use super::{EndpointMetrics, Lora};

const WAITING: &[&str] = &[
    "vllm:num_requests_waiting",
    "sglang:num_queue_reqs",
    LLAMA_CPP_WAITING,
];
const RUNNING: &[&str] = &[
    "vllm:num_requests_running",
    "sglang:num_running_reqs",
    "llamacpp:requests_processing",
];
/// llama.cpp's waiting queue: requests deferred until a slot frees up.
const LLAMA_CPP_WAITING: &str = "llamacpp:requests_deferred";
const KV_CACHE: &[&str] = &[
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
];
const LORA: &str = "vllm:lora_requests_info";

/// Why an exposition could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    /// Not Prometheus text format (the parser's message).
    #[error("not Prometheus text: {0}")]
    Syntax(String),
    /// A metric `least_busy` needs is absent (what it measures).
    #[error("no {0} metric (vllm:, sglang: or llamacpp: names)")]
    Missing(&'static str),
    /// A sample value that is not a finite, non-negative number.
    #[error("{metric} has an unusable value {value}")]
    Invalid {
        /// The metric's name.
        metric: String,
        /// The value as written.
        value: String,
    },
}

fn wanted(name: &str) -> bool {
    WAITING.contains(&name) || RUNNING.contains(&name) || KV_CACHE.contains(&name) || name == LORA
}

/// The lines of the families we read (their samples and `# HELP`/`# TYPE` lines), and those of
/// `target`.
fn select(text: &str, target: Option<&str>) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let line = line.trim();
        let name = match line.strip_prefix('#') {
            Some(comment) => {
                let mut words = comment.split_whitespace();
                match words.next() {
                    Some("HELP" | "TYPE") => words.next(),
                    _ => None,
                }
            }
            None => line
                .split(|c: char| c == '{' || c.is_whitespace())
                .next()
                .filter(|n| !n.is_empty()),
        };
        if name.is_some_and(|n| wanted(n) || Some(n) == target) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Read an exposition.
pub fn parse(text: &str) -> Result<EndpointMetrics, ParseError> {
    parse_with(text, None)
}

/// [`parse`], also reading gauge `target` (the sum of its series) into
/// [`EndpointMetrics::target`]; 0 when the exposition lacks it (as Higress reads it).
pub fn parse_with(text: &str, target: Option<&str>) -> Result<EndpointMetrics, ParseError> {
    let selected = select(text, target);
    if selected.is_empty() {
        return Err(ParseError::Missing("waiting-queue"));
    }
    let (families, problem) = prom_text_format_parser::parse_scrape(&selected);
    match problem {
        Some(ScrapeParseError::Parse(e)) => return Err(ParseError::Syntax(e)),
        // Families declared without samples (an unlabelled LoRA gauge before any request) and
        // the like: the families that did assemble are fine.
        Some(ScrapeParseError::Collect(_)) | None => {}
    }
    let (waiting_name, waiting) =
        first(&families, WAITING).ok_or(ParseError::Missing("waiting-queue"))?;
    let kv_cache_usage = match first(&families, KV_CACHE) {
        Some((_, kv)) => Some(kv_usage(kv)?),
        None if waiting_name == LLAMA_CPP_WAITING => None,
        None => return Err(ParseError::Missing("KV-cache usage")),
    };
    let running = match first(&families, RUNNING) {
        Some((name, m)) => count(name, m)?,
        None => 0,
    };
    Ok(EndpointMetrics {
        waiting: count(waiting_name, waiting)?,
        running,
        kv_cache_usage,
        lora: families
            .iter()
            .find(|m| m.name == LORA)
            .map(lora)
            .unwrap_or_default(),
        model: waiting.samples.first().and_then(|s| label(s, "model_name")),
        target: match target {
            None => None,
            Some(name) => Some(match families.iter().find(|m| m.name == name) {
                Some(m) => m
                    .samples
                    .iter()
                    .map(|s| value(name, s))
                    .sum::<Result<f64, ParseError>>()?,
                None => 0.0,
            }),
        },
    })
}

/// The first family of `names` (in that order) that has samples.
fn first<'a>(families: &'a [Metric], names: &[&'static str]) -> Option<(&'static str, &'a Metric)> {
    names.iter().find_map(|n| {
        families
            .iter()
            .find(|m| m.name == *n && !m.samples.is_empty())
            .map(|m| (*n, m))
    })
}

/// A finite, non-negative sample value.
fn value(metric: &str, s: &Sample) -> Result<f64, ParseError> {
    let raw: &str = &s.value.value;
    match raw.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(ParseError::Invalid {
            metric: metric.to_string(),
            value: raw.to_string(),
        }),
    }
}

/// A request count: summed over data-parallel engines, the largest within one engine.
fn count(name: &str, m: &Metric) -> Result<u64, ParseError> {
    let mut per_engine: BTreeMap<String, f64> = BTreeMap::new();
    for s in &m.samples {
        let v = value(name, s)?;
        let engine = label(s, "engine")
            .or_else(|| label(s, "dp_rank"))
            .unwrap_or_default();
        let e = per_engine.entry(engine).or_insert(0.0);
        *e = e.max(v);
    }
    // Truncated like the Inference Extension's int conversion.
    Ok(per_engine.values().sum::<f64>() as u64)
}

/// KV-cache use: the largest over the family's series, within 0–1.
fn kv_usage(m: &Metric) -> Result<f64, ParseError> {
    let mut usage: f64 = 0.0;
    for s in &m.samples {
        usage = usage.max(value(&m.name, s)?);
    }
    Ok(usage.min(1.0))
}

/// The current LoRA state: the series with the largest value.
fn lora(m: &Metric) -> Lora {
    let current = m
        .samples
        .iter()
        .filter_map(|s| value(&m.name, s).ok().map(|v| (v, s)))
        .fold(None, |best: Option<(f64, &Sample)>, (v, s)| match best {
            Some((b, _)) if b >= v => best,
            _ => Some((v, s)),
        });
    let Some((_, s)) = current else {
        return Lora::default();
    };
    Lora {
        running: label(s, "running_lora_adapters")
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        max: label(s, "max_lora")
            .and_then(|m| m.trim().parse().ok())
            .unwrap_or(0),
    }
}

/// A label's value, unescaped (`\\`, `\"`, `\n`).
fn label(s: &Sample, key: &str) -> Option<String> {
    let raw = &s.labels.iter().find(|l| l.key == key)?.value;
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/tests/fixtures/metrics/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

    #[test]
    fn vllm_v1() {
        let m = parse(&fixture("vllm-v1.txt")).expect("parse");
        assert_eq!(m.waiting, 2);
        assert_eq!(m.running, 4);
        assert_eq!(m.kv_cache_usage, Some(0.3417));
        assert_eq!(m.lora.running, vec!["sql-lora", "tweet-lora"]);
        assert_eq!(m.lora.max, 2);
        assert_eq!(m.model.as_deref(), Some(MODEL));
    }

    #[test]
    fn a_target_gauge_is_read_besides() {
        let text = fixture("vllm-v1.txt");
        let m = parse_with(&text, Some("vllm:prefix_cache_hits_total")).expect("parse");
        assert_eq!(m.target, Some(121600.0));
        assert_eq!(m.waiting, 2);
        let absent = parse_with(&text, Some("vllm:no_such_gauge")).expect("parse");
        assert_eq!(
            absent.target,
            Some(0.0),
            "a missing gauge reads 0, as in Higress"
        );
        assert_eq!(parse(&text).expect("parse").target, None);
    }

    #[test]
    fn vllm_v0() {
        let m = parse(&fixture("vllm-v0.txt")).expect("parse");
        assert_eq!(
            (m.waiting, m.running, m.kv_cache_usage),
            (2, 4, Some(0.3417))
        );
        // V0 label order, and the current series is not the last one.
        assert_eq!(m.lora.running, vec!["sql-lora", "tweet-lora"]);
        assert_eq!(m.lora.max, 2);
        assert_eq!(m.model.as_deref(), Some(MODEL));
    }

    #[test]
    fn sglang() {
        let m = parse(&fixture("sglang.txt")).expect("parse");
        assert_eq!((m.waiting, m.running, m.kv_cache_usage), (2, 4, Some(0.28)));
        assert_eq!(m.lora, Lora::default(), "no LoRA metric: no LoRA");
        assert_eq!(m.model.as_deref(), Some(MODEL));
    }

    /// llama.cpp's `llama-server --metrics` (build 11434): no KV-cache use, slots as the batch.
    #[test]
    fn llama_cpp() {
        let m = parse(&fixture("llama-cpp.txt")).expect("llama.cpp exposition");
        assert_eq!((m.waiting, m.running, m.kv_cache_usage), (0, 0, None));
        let busy = fixture("llama-cpp.txt")
            .replace(
                "llamacpp:requests_processing 0",
                "llamacpp:requests_processing 4",
            )
            .replace(
                "llamacpp:requests_deferred 0",
                "llamacpp:requests_deferred 3",
            );
        let m = parse(&busy).expect("busy");
        assert_eq!((m.waiting, m.running, m.kv_cache_usage), (3, 4, None));
        assert!(m.lora.running.is_empty() && m.model.is_none());
        // Without the deferred-requests gauge it is an unknown exposition, not an idle engine.
        let no_queue = fixture("llama-cpp.txt").replace("llamacpp:requests_deferred", "x");
        assert_eq!(parse(&no_queue), Err(ParseError::Missing("waiting-queue")));
    }

    #[test]
    fn vllm_sim_output_v1_and_legacy() {
        use vllm_sim::metrics::{render, EngineMetrics, ExpositionInfo};
        for legacy in [false, true] {
            let info = ExpositionInfo {
                model: "sim/m".into(),
                legacy,
                block_size: 16,
                num_gpu_blocks: 100,
                max_loras: 2,
            };
            let mut e = EngineMetrics::new(legacy);
            e.running = 3;
            e.waiting = 5;
            e.kv_usage = 0.25;
            e.set_lora_info("old".into(), String::new(), 50.0);
            e.set_lora_info("sql,tweet".into(), "chat".into(), 100.0);
            let m = parse(&render(&info, &e)).expect("parse");
            assert_eq!((m.waiting, m.running, m.kv_cache_usage), (5, 3, Some(0.25)));
            assert_eq!(m.lora.running, vec!["sql", "tweet"]);
            assert_eq!(m.lora.max, 2);
            assert_eq!(m.model.as_deref(), Some("sim/m"));
        }
    }

    #[test]
    fn the_newer_kv_name_wins_and_no_lora_means_no_lora() {
        let text = "vllm:num_requests_waiting{model_name=\"m\"} 1\n\
                    vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.9\n\
                    vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.5\n";
        let m = parse(text).expect("parse");
        assert_eq!(m.kv_cache_usage, Some(0.5));
        assert_eq!(m.lora, Lora::default());
        assert_eq!(m.running, 0, "running is optional");
    }

    #[test]
    fn data_parallel_engines_add_up_and_tp_ranks_do_not() {
        let text = "# TYPE vllm:num_requests_waiting gauge\n\
                    vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3\n\
                    vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 4\n\
                    vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.2\n\
                    vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.7\n\
                    sglang:num_queue_reqs{tp_rank=\"0\"} 5\n";
        let m = parse(text).expect("parse");
        assert_eq!((m.waiting, m.kv_cache_usage), (7, Some(0.7)));
        let text = "sglang:num_queue_reqs{tp_rank=\"0\"} 5\n\
                    sglang:num_queue_reqs{tp_rank=\"1\"} 5\n\
                    sglang:token_usage{tp_rank=\"0\"} 0.1\n";
        assert_eq!(parse(text).expect("parse").waiting, 5);
    }

    #[test]
    fn lora_series_edge_cases() {
        let base = "vllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 0\n";
        // Declared but no series yet; the latest series empty (nothing running now).
        let text = format!("{base}# HELP vllm:lora_requests_info Running stats on lora requests.\n# TYPE vllm:lora_requests_info gauge\n");
        assert_eq!(parse(&text).expect("parse").lora, Lora::default());
        let text = format!(
            "{base}vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"a, b\",waiting_lora_adapters=\"\"}} 10\n\
             vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}} 20\n"
        );
        let l = parse(&text).expect("parse").lora;
        assert_eq!((l.running.len(), l.max), (0, 4));
        let text = format!(
            "{base}vllm:lora_requests_info{{max_lora=\"x\",running_lora_adapters=\"a\\\\b,c\",waiting_lora_adapters=\"\"}} 1\n"
        );
        let l = parse(&text).expect("parse").lora;
        assert_eq!(l.running, vec!["a\\b", "c"]);
        assert_eq!(l.max, 0, "an unreadable max_lora leaves no room");
    }

    #[test]
    fn unusable_expositions_are_errors() {
        assert_eq!(parse(""), Err(ParseError::Missing("waiting-queue")));
        assert_eq!(
            parse("<html>not found</html>\n"),
            Err(ParseError::Missing("waiting-queue"))
        );
        assert_eq!(
            parse("vllm:num_requests_waiting 1\n"),
            Err(ParseError::Missing("KV-cache usage"))
        );
        assert!(matches!(
            parse("vllm:num_requests_waiting{ 1\nvllm:kv_cache_usage_perc 0\n"),
            Err(ParseError::Syntax(_))
        ));
        assert!(matches!(
            parse("vllm:num_requests_waiting NaN\nvllm:kv_cache_usage_perc 0\n"),
            Err(ParseError::Invalid { .. })
        ));
        assert!(matches!(
            parse("vllm:num_requests_waiting -1\nvllm:kv_cache_usage_perc 0\n"),
            Err(ParseError::Invalid { .. })
        ));
    }

    #[test]
    fn tolerant_of_line_endings_and_unrelated_families() {
        let text =
            "weird_family{} 1\r\nvllm:num_requests_waiting 3\r\nvllm:kv_cache_usage_perc 0.25";
        let m = parse(text).expect("parse");
        assert_eq!(
            (m.waiting, m.kv_cache_usage, m.model),
            (3, Some(0.25), None)
        );
    }
}
