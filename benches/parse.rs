//! What llm-lb does with every request body before it can route it: parse the JSON and hash
//! its prefix blocks (`LlmRequest::parse`), for chat bodies from 1 KiB to 4 MiB. `json_only`
//! is serde_json's parse of the same body into a `Value`, for reference: the difference is
//! the block hashing (and canonicalisation) llm-lb adds.
//!
//! `cargo bench --bench parse` (add `-- --quick` for a fast run).

// criterion_group! defines an undocumented `pub fn` for the group.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use llm_lb::request::LlmRequest;
use serde_json::{json, Value};

const SIZES: [usize; 7] = [
    1 << 10,
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
];

/// A multi-turn chat body of about `size` bytes: a system prompt, then user / assistant turns
/// of about 1.5 KiB each (a long last message fills the remainder).
fn chat_body(size: usize) -> Vec<u8> {
    let words = "the quick brown fox jumps over the lazy dog while the model thinks ";
    let text = |n: usize| words.repeat(n / words.len() + 1)[..n].to_string();
    let mut messages = vec![json!({"role": "system", "content": text(600)})];
    let envelope = 120;
    let mut used = envelope + 620;
    let mut turn = 0;
    while used + 1600 < size {
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": text(1500)}));
        used += 1530;
        turn += 1;
    }
    let rest = size.saturating_sub(used).max(16);
    messages.push(json!({"role": "user", "content": text(rest)}));
    serde_json::to_vec(&json!({
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "stream": true,
        "max_tokens": 512,
        "messages": messages,
    }))
    .expect("serialise")
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for size in SIZES {
        let body = chat_body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        if size >= 1 << 20 {
            group.sample_size(20);
        } else {
            group.sample_size(100);
        }
        group.bench_with_input(
            BenchmarkId::new("parse_and_hash", size),
            &body,
            |b, body| {
                b.iter(|| {
                    let r = LlmRequest::parse(black_box(body));
                    black_box(r.blocks.len())
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("json_only", size), &body, |b, body| {
            b.iter(|| {
                let v: Value = serde_json::from_slice(black_box(body)).expect("json");
                black_box(v)
            })
        });
    }
    group.finish();
}

criterion_group!(parse, benches);
criterion_main!(parse);
