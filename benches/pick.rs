//! Cost of one pick (and the release of its lease) per policy on the embedded store, for pools
//! of 4 to 1024 endpoints. The pool comes from a policy file, as in production; `least_busy`
//! gets a fresh engine-metrics snapshot for every endpoint, so it runs its whole filter tree;
//! `prefix_cache` routes a 4-turn conversation that is already cached (the hit path, which
//! walks the chain and records it again); `kv_aware` too, with approximate tokens and, as
//! `kv_aware_tokenizer`, with the model's chat template and tokenizer (the directory in
//! `LLMLB_BENCH_TOKENIZER`, which `scripts/bench-micro.sh` sets to SmolLM2's).
//!
//! The `tokenize` group times that tokenization alone, as `kv_aware` does it for every request,
//! for conversations of about 2k and 20k tokens: over the whole prompt, and for a conversation's
//! next turn, whose earlier turns the tokenizer's segment cache holds.
//!
//! `cargo bench --bench pick` (add `-- --quick` for a fast run).

// criterion_group! defines an undocumented `pub fn` for the group.
#![allow(missing_docs)]

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use llm_lb::config::{Config, PolicyKind};
use llm_lb::endpoint::{EndpointId, EndpointView, Outcome};
use llm_lb::policy::kv_aware::Tokenizer;
use llm_lb::policy::{self, PickInput, Registry};
use llm_lb::request::LlmRequest;
use llm_lb::scrape::EndpointMetrics;
use llm_lb_tokenizer::ChatTokenizer;

const SIZES: [usize; 5] = [4, 16, 64, 256, 1024];

fn addr(i: usize) -> String {
    format!("10.{}.{}.{}:8000", i / 65536, (i / 256) % 256, i % 256)
}

fn config(policy: &str, lb_config: &str, n: usize) -> Config {
    let endpoints: Vec<String> = (0..n).map(|i| format!("\"{}\"", addr(i))).collect();
    let yaml = format!(
        "listen: 127.0.0.1:18080\nadmin: \"off\"\npools:\n  - name: bench\n    models: [\"*\"]\n    \
         endpoints: [{}]\n    lb_policy: {policy}\n    lb_config: {{{lb_config}}}\n",
        endpoints.join(", ")
    );
    Config::from_yaml(&yaml).expect("valid policy file")
}

/// The model's tokenizer directory, if one was given.
fn tokenizer_dir() -> Option<String> {
    let dir = std::env::var("LLMLB_BENCH_TOKENIZER")
        .ok()
        .filter(|d| !d.is_empty());
    if dir.is_none() {
        eprintln!(
            "LLMLB_BENCH_TOKENIZER is not set: kv_aware_tokenizer and tokenize/smollm2 not run"
        );
    }
    dir
}

/// A system prompt and `turns` question-and-answer turns, then the question `last`.
fn conversation(turns: usize, last: &str) -> LlmRequest {
    let mut messages =
        vec![serde_json::json!({"role": "system", "content": "Be helpful. ".repeat(80)})];
    for t in 0..turns {
        messages.push(
            serde_json::json!({"role": "user", "content": format!("question {t} ").repeat(40)}),
        );
        messages.push(
            serde_json::json!({"role": "assistant", "content": format!("answer {t} ").repeat(120)}),
        );
    }
    messages.push(serde_json::json!({"role": "user", "content": last}));
    let body = serde_json::json!({"model": "m", "stream": true, "messages": messages});
    LlmRequest::parse(&serde_json::to_vec(&body).expect("json"))
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let request = conversation(4, "and now?");
    let tokenizer = tokenizer_dir();
    // (benchmark name, lb_policy, lb_config)
    let mut runs: Vec<(&str, &str, String)> = PolicyKind::ALL
        .iter()
        .map(|k| (k.name(), k.name(), String::new()))
        .collect();
    if let Some(dir) = &tokenizer {
        runs.push((
            "kv_aware_tokenizer",
            "kv_aware",
            format!("tokenizer: {dir:?}"),
        ));
    }
    let mut group = c.benchmark_group("pick");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    for (name, kind, lb_config) in &runs {
        for n in SIZES {
            let cfg = config(kind, lb_config, n);
            let pool = &cfg.pools[0];
            let resolved = llm_lb::routing::resolve::expand(&cfg, &Default::default());
            let deps = llm_lb::routing::deps::build(pool, &resolved[0], None).expect("deps");
            let board = deps.board.clone();
            let policy = policy::build(
                &pool.name,
                &pool.policy,
                &resolved[0],
                deps,
                &Registry::new(),
            )
            .expect("policy");
            let endpoints: Vec<EndpointView> = (0..n)
                .map(|i| EndpointView::new(addr(i).parse().expect("addr"), 1))
                .collect();
            let candidates: Vec<EndpointId> = (0..n).map(EndpointId::new).collect();
            let publish = || {
                if let Some(board) = &board {
                    for i in 0..n {
                        let m = EndpointMetrics {
                            waiting: (i % 7) as u64,
                            running: (i % 5) as u64,
                            kv_cache_usage: Some((i % 10) as f64 / 20.0),
                            ..EndpointMetrics::default()
                        };
                        board.publish(i, m, Instant::now(), board.dispatched(i));
                    }
                }
            };
            group.bench_with_input(BenchmarkId::new(*name, n), &n, |b, _| {
                b.to_async(&rt).iter_custom(|iters| {
                    let policy = policy.clone();
                    let (endpoints, candidates, request) = (&endpoints, &candidates, &request);
                    publish();
                    async move {
                        let start = Instant::now();
                        for _ in 0..iters {
                            let pick = policy
                                .pick(PickInput {
                                    request,
                                    endpoints,
                                    candidates,
                                })
                                .await
                                .expect("pick");
                            black_box(pick.endpoint);
                            if let Some(lease) = pick.lease {
                                lease.release(Outcome::Completed);
                            }
                        }
                        start.elapsed()
                    }
                })
            });
        }
    }
    group.finish();
    tokenize(c, tokenizer.as_deref());
}

/// `kv_aware`'s tokenization alone, per conversation length in tokens: approximate tokens; the
/// model's chat template and tokenizer over the whole prompt (`smollm2_whole`, a conversation's
/// first request); and on a conversation's next turn (`smollm2`: its earlier turns were tokenized
/// before, so only the new question is, the rest comes from the segment cache).
fn tokenize(c: &mut Criterion, dir: Option<&str>) {
    let chat = dir.map(|dir| {
        Arc::new(ChatTokenizer::from_dir(std::path::Path::new(dir)).expect("the model's tokenizer"))
    });
    let mut group = c.benchmark_group("tokenize");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    for turns in [4, 40] {
        let request = conversation(turns, "and now?");
        let approximate = Tokenizer::Approximate;
        let n = approximate.tokens(&request).len();
        group.bench_with_input(BenchmarkId::new("approximate", n), &request, |b, r| {
            b.iter(|| black_box(approximate.tokens(r).len()))
        });
        let Some(chat) = &chat else { continue };
        let exact = Tokenizer::Exact(chat.clone());
        let n = exact.tokens(&request).len();
        let body = request.prompt_body().expect("a chat").clone();
        group.bench_with_input(BenchmarkId::new("smollm2_whole", n), &body, |b, body| {
            b.iter(|| {
                let text = chat.render_chat(body).expect("render");
                let ids = chat.tokenizer().encode_fast(text.as_str(), false);
                black_box(ids.expect("encode").len())
            })
        });
        let asked = Cell::new(0u64);
        group.bench_with_input(BenchmarkId::new("smollm2", n), &turns, |b, &turns| {
            b.iter_batched(
                || {
                    asked.set(asked.get() + 1);
                    conversation(turns, &format!("and now, {}?", asked.get()))
                },
                |r| black_box(exact.tokens(&r).len()),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(pick, benches);
criterion_main!(pick);
