//! Cost of one pick + release (`acquire_least` then `release`) on the in-flight stores: the
//! embedded store, and a real `redis-server` on loopback that the benchmark starts itself, for 4,
//! 16 and 64 candidate endpoints. With Redis this is one round trip (one `EVALSHA`, which carries
//! the previous iteration's release: releases ride on the next call).
//!
//! `cargo bench --bench store` (add `-- --quick` for a fast run).

// criterion_group! defines an undocumented `pub fn` for the group.
#![allow(missing_docs)]

#[path = "../tests/redis_harness/mod.rs"]
mod redis_harness;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use llm_lb::config::RedisConfig;
use llm_lb::store::{InflightStore, MemoryStore, RedisStore};

const SIZES: [usize; 3] = [4, 16, 64];

fn endpoints(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.0.{}.{}:8000", i / 250, i % 250))
        .collect()
}

fn bench_store(
    c: &mut Criterion,
    name: &str,
    rt: &tokio::runtime::Runtime,
    store: Arc<dyn InflightStore>,
) {
    let mut group = c.benchmark_group(format!("acquire_release/{name}"));
    for n in SIZES {
        let eps = endpoints(n);
        let candidates: Vec<&str> = eps.iter().map(String::as_str).collect();
        let pool = format!("bench-{n}");
        // Some background load so picks compare real counts, not only ties.
        rt.block_on(async {
            for _ in 0..n {
                store
                    .acquire_least(&pool, &candidates, None)
                    .await
                    .expect("warm-up acquire");
            }
        });
        group.bench_with_input(BenchmarkId::from_parameter(n), &candidates, |b, cands| {
            b.to_async(rt).iter(|| async {
                let a = store
                    .acquire_least(&pool, cands, None)
                    .await
                    .expect("acquire");
                store.release(&pool, cands[a.index]).await.expect("release");
                black_box(a)
            });
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");

    bench_store(c, "embedded", &rt, Arc::new(MemoryStore::new()));

    let server = redis_harness::RedisServer::start().expect("start redis-server");
    let config = RedisConfig::from_url(&server.url())
        .expect("url")
        .with_timeout(Duration::from_secs(1))
        .expect("timeout");
    let redis = Arc::new(RedisStore::new(config));
    rt.block_on(redis.connect()).expect("connect to redis");
    bench_store(c, "redis", &rt, redis);
    // Server-side share of the cost: Redis's own time per script call.
    if let Ok(stats) = server.cli(&["INFO", "commandstats"]) {
        for line in stats.lines().filter(|l| l.starts_with("cmdstat_evalsha:")) {
            eprintln!("redis-server {line}");
        }
    }
    drop(server);
}

criterion_group!(store, benches);
criterion_main!(store);
