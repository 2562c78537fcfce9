//! `global_least_request` end to end: real `llm-lb` processes sharing a real `redis-server` (or a
//! 3-node Redis Cluster), real backends, real HTTP clients. Shared counts are read straight from
//! Redis by the test, never through llm-lb.

mod common;
mod redis_harness;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use redis_harness::{RedisCluster, RedisServer};

const MODEL: &str = "test-model";
const POOL: &str = "main";

/// A policy file with one `global_least_request` pool on `backends` sharing `redis_url`.
fn config(backends: &[&Backend], redis_url: &str, lb_extra: &str) -> String {
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let lb = format!("    lb_config: {{serviceFQDN: '{redis_url}'{lb_extra}}}\n");
    format!(
        "pools:\n{}",
        pool_yaml(POOL, "[\"*\"]", &addrs, "global_least_request", &lb)
    )
}

fn body(stream: bool, hold: bool, size: usize) -> Vec<u8> {
    let filler: String = (0..size).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    serde_json::to_vec(&serde_json::json!({
        "model": MODEL,
        "stream": stream,
        "hold": hold,
        "messages": [{"role": "user", "content": filler}],
    }))
    .expect("json")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Send a held request and wait until it is in flight at a backend (headers, and for a stream
/// its first event, received).
async fn start_held(
    client: &reqwest::Client,
    proxy: &Proxy,
    stream: bool,
    size: usize,
) -> reqwest::Response {
    let mut r = client
        .post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body(stream, true, size))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    if stream {
        let first = r.chunk().await.expect("first event").expect("not empty");
        assert!(first.starts_with(b"data: "), "{first:?}");
    }
    r
}

/// Read a response to its end; returns its text.
async fn finish(r: reqwest::Response) -> String {
    r.text().await.expect("body")
}

/// The test's own view of the shared counts, read with plain Redis commands.
struct View {
    conn: Box<dyn redis::ConnectionLike + Send>,
}

impl View {
    fn single(url: &str) -> View {
        let conn = redis::Client::open(url)
            .expect("url")
            .get_connection()
            .expect("connect");
        View {
            conn: Box::new(conn),
        }
    }

    fn cluster(url: &str) -> View {
        let conn = redis::cluster::ClusterClient::new(vec![url])
            .expect("url")
            .get_connection()
            .expect("connect");
        View {
            conn: Box::new(conn),
        }
    }

    /// In-flight totals of `backends` over all replicas.
    fn totals(&mut self, backends: &[&Backend]) -> Vec<i64> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(format!("llmlb:{{{POOL}}}:total"));
        for b in backends {
            cmd.arg(b.addr.to_string());
        }
        let v: Vec<Option<i64>> = cmd.query(&mut *self.conn).expect("HMGET");
        v.into_iter().map(|n| n.unwrap_or(0)).collect()
    }

    /// Every replica's contribution: `<replica>|<endpoint>` → count.
    fn contributions(&mut self) -> HashMap<String, i64> {
        redis::cmd("HGETALL")
            .arg(format!("llmlb:{{{POOL}}}:inflight"))
            .query(&mut *self.conn)
            .expect("HGETALL")
    }
}

fn spread(counts: &[i64]) -> i64 {
    counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0)
}

/// Requests each proxy has in flight to each backend, summed over the proxies.
async fn local_inflight(proxies: &[&Proxy], backends: &[&Backend]) -> Vec<f64> {
    let mut out = vec![0.0; backends.len()];
    for p in proxies {
        let text = p.metrics().await;
        for (i, b) in backends.iter().enumerate() {
            let ep = b.addr.to_string();
            out[i] += parse_metric(&text, "llmlb_endpoint_inflight", &[("endpoint", &ep)])
                .unwrap_or(f64::NAN);
        }
    }
    out
}

/// Everything drained: the store, both proxies' gauges and the backends agree on zero.
async fn assert_drained(proxies: &[&Proxy], backends: &[&Backend], view: &mut View) {
    eventually("counts back to zero", Duration::from_secs(10), async || {
        let totals = view.totals(backends);
        let mine = view.contributions();
        let local = local_inflight(proxies, backends).await;
        let active: Vec<i64> = backends.iter().map(|b| b.active()).collect();
        if totals.iter().all(|n| *n == 0)
            && mine.is_empty()
            && local.iter().all(|n| *n == 0.0)
            && active.iter().all(|n| *n == 0)
        {
            Ok(())
        } else {
            Err(format!(
                "store {totals:?} {mine:?}, proxies {local:?}, backends {active:?}"
            ))
        }
    })
    .await;
}

/// Samples the store's totals every few milliseconds on its own thread.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Vec<i64>>>,
}

impl Sampler {
    fn start(mut view: View, backends: &[&Backend]) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let addrs: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(format!("llmlb:{{{POOL}}}:total")).arg(&addrs);
                let v: Vec<Option<i64>> = cmd.query(&mut *view.conn).expect("HMGET");
                samples.push(v.into_iter().map(|n| n.unwrap_or(0)).collect());
                std::thread::sleep(Duration::from_millis(2));
            }
            samples
        });
        Sampler { stop, thread }
    }

    fn stop(self) -> Vec<Vec<i64>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("sampler")
    }
}

/// Two replicas, mixed traffic (streaming and not, small bodies and bodies over 64 KiB) sent
/// concurrently through both: the shared counts never differ by more than one between endpoints,
/// the backends end up exactly balanced, and after half the clients abort mid-stream and the
/// rest finish, every count is back to zero.
async fn two_replicas_balance_and_drain(redis_url: &str, view: impl Fn() -> View) {
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let bs: Vec<&Backend> = backends.iter().collect();
    let a = Proxy::start(&config(&bs, redis_url, ", timeout: 500"));
    let b = Proxy::start(&config(&bs, redis_url, ", timeout: 500"));
    let sampler = Sampler::start(view(), &bs);

    let client = client();
    let mut tasks = Vec::new();
    for i in 0..24 {
        let proxy = if i % 2 == 0 { &a } else { &b };
        let (stream, size) = match i % 3 {
            0 => (true, 256),
            1 => (false, 256),
            _ => (true, 100 * 1024),
        };
        let client = &client;
        tasks.push(async move { (stream, start_held(client, proxy, stream, size).await) });
    }
    let held: Vec<(bool, reqwest::Response)> = futures_util::future::join_all(tasks).await;
    let active: Vec<i64> = bs.iter().map(|b| b.active()).collect();
    assert_eq!(active, vec![8, 8, 8], "backends");
    let samples = sampler.stop();
    let mut view = view();
    assert_eq!(view.totals(&bs), vec![8, 8, 8], "store");
    assert_eq!(
        local_inflight(&[&a, &b], &bs).await.iter().sum::<f64>(),
        24.0
    );
    assert!(samples.len() > 10, "only {} samples", samples.len());
    for s in &samples {
        assert!(spread(s) <= 1, "spread > 1 in sample {s:?}");
    }

    // Half the clients go away mid-stream; then the backends let everything finish.
    let mut kept = Vec::new();
    for (i, (stream, r)) in held.into_iter().enumerate() {
        if i % 2 == 0 {
            drop(r);
        } else {
            kept.push((stream, r));
        }
    }
    for backend in &backends {
        backend.release_held(8);
    }
    for (stream, r) in kept {
        let text = finish(r).await;
        if stream {
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        } else {
            assert!(text.contains("\"held\":true"), "{text}");
        }
    }
    assert_drained(&[&a, &b], &bs, &mut view).await;
    for p in [&a, &b] {
        let picks = p
            .metric(
                "llmlb_picks_total",
                &[
                    ("policy", "global_least_request"),
                    ("reason", "least_request"),
                ],
            )
            .await;
        assert_eq!(picks, Some(12.0), "{}", p.log_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_redis() {
    let redis = RedisServer::start().expect("redis-server");
    let url = redis.url();
    two_replicas_balance_and_drain(&url, || View::single(&url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_redis_cluster() {
    let cluster = RedisCluster::start().expect("redis cluster");
    let url = cluster.url();
    two_replicas_balance_and_drain(&url, || View::cluster(&url)).await;
}

/// Let each backend finish `per_backend` held requests and read every response to its end.
async fn release_all(backends: &[Backend], per_backend: usize, held: Vec<reqwest::Response>) {
    for b in backends {
        b.release_held(per_backend);
    }
    for r in held {
        finish(r).await;
    }
}

/// Which backends have requests in flight right now.
fn actives(backends: &[&Backend]) -> Vec<i64> {
    backends.iter().map(|b| b.active()).collect()
}

/// Replica B routes around load that only replica A knows of: with one request held on one
/// backend through A, B's next two requests go to the two idle backends (a replica balancing on
/// its own counts, or round robin, would pick the busy one half the time or more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_sees_the_other_replicas_load() {
    let redis = RedisServer::start().expect("redis-server");
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let bs: Vec<&Backend> = backends.iter().collect();
    let a = Proxy::start(&config(&bs, &redis.url(), ""));
    let b = Proxy::start(&config(&bs, &redis.url(), ""));
    let client = client();
    for round in 0..5 {
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(start_held(&client, &a, true, 64).await);
        }
        assert_eq!(actives(&bs), vec![1, 1, 1], "round {round}");
        // Keep A's request on backend `busy` only.
        let busy = round % 3;
        for (i, backend) in backends.iter().enumerate() {
            if i != busy {
                backend.release_held(1);
            }
        }
        let mut view = View::single(&redis.url());
        eventually(
            "two of A's requests released",
            Duration::from_secs(5),
            async || {
                let mut want = vec![0; 3];
                want[busy] = 1;
                let now = actives(&bs);
                let store = view.totals(&bs);
                if now == want && store == want {
                    Ok(())
                } else {
                    Err(format!("backends {now:?}, store {store:?}"))
                }
            },
        )
        .await;
        let mut on_b = Vec::new();
        for _ in 0..2 {
            on_b.push(start_held(&client, &b, false, 64).await);
        }
        assert_eq!(
            actives(&bs),
            vec![1, 1, 1],
            "round {round}: B ignored A's load"
        );
        release_all(&backends, 1, held.into_iter().chain(on_b).collect()).await;
        assert_drained(&[&a, &b], &bs, &mut view).await;
    }
}

/// A replica SIGKILLed with requests in flight: the survivor removes its share from Redis within
/// `replicaTimeout` (plus a heartbeat), and then balances on the real load again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_share_disappears() {
    let redis = RedisServer::start().expect("redis-server");
    let backends = [Backend::start().await, Backend::start().await];
    let bs: Vec<&Backend> = backends.iter().collect();
    let timeout_ms = 2000;
    let lb = format!(", replicaTimeout: {timeout_ms}");
    let a = Proxy::start(&config(&bs, &redis.url(), &lb));
    let mut b = Proxy::start(&config(&bs, &redis.url(), &lb));
    let mut view = View::single(&redis.url());
    let client = client();
    let mut held_b = Vec::new();
    for _ in 0..4 {
        held_b.push(start_held(&client, &b, true, 64).await);
    }
    let mut held_a = Vec::new();
    for _ in 0..2 {
        held_a.push(start_held(&client, &a, true, 64).await);
    }
    assert_eq!(view.totals(&bs), vec![3, 3]);

    b.kill();
    let killed = Instant::now();
    drop(held_b);
    // B's connections died with it: the backends see only A's two requests.
    eventually(
        "backends lose B's requests",
        Duration::from_secs(5),
        async || {
            let now = actives(&bs);
            if now == vec![1, 1] {
                Ok(())
            } else {
                Err(format!("{now:?}"))
            }
        },
    )
    .await;
    // Redis still counts B until the survivor reaps it.
    let mut reaped = None;
    while killed.elapsed() < Duration::from_millis(timeout_ms + 3000) {
        if view.totals(&bs) == vec![1, 1] {
            reaped = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reaped = reaped.unwrap_or_else(|| {
        panic!(
            "B's share still counted: {:?} {:?}",
            view.totals(&bs),
            view.contributions()
        )
    });
    // Bound: the timeout plus one heartbeat interval (≤ 1 s), with slack for a busy machine.
    assert!(
        reaped <= Duration::from_millis(timeout_ms + 2000),
        "reaped after {reaped:?}"
    );
    let replicas: std::collections::HashSet<String> = view
        .contributions()
        .keys()
        .filter_map(|f| f.split('|').next().map(str::to_owned))
        .collect();
    assert_eq!(replicas.len(), 1, "only A's contribution is left");

    // The survivor balances on the real load: 4 more requests → 3 and 3.
    for _ in 0..4 {
        held_a.push(start_held(&client, &a, false, 64).await);
    }
    assert_eq!(actives(&bs), vec![3, 3]);
    assert_eq!(view.totals(&bs), vec![3, 3]);
    release_all(&backends, 3, held_a).await;
    assert_drained(&[&a], &bs, &mut view).await;
}

/// One finished request of a load run.
struct Sample {
    at: Instant,
    latency: Duration,
    status: u16,
}

/// Closed-loop load: `workers` clients per proxy sending short requests until `stop`.
fn load(
    proxies: &[&Proxy],
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Sample>>> {
    let mut tasks = Vec::new();
    for p in proxies {
        for _ in 0..workers {
            let url = p.url("/v1/chat/completions");
            let stop = stop.clone();
            let client = client();
            tasks.push(tokio::spawn(async move {
                let mut samples = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let at = Instant::now();
                    let status = match client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body(false, false, 512))
                        .send()
                        .await
                    {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(_) => 0,
                    };
                    samples.push(Sample {
                        at,
                        latency: at.elapsed(),
                        status,
                    });
                }
                samples
            }));
        }
    }
    tasks
}

async fn metric_or_zero(p: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    p.metric(name, labels).await.unwrap_or(0.0)
}

/// Store calls on the request path that failed (error or timeout) so far.
async fn failed_acquires(p: &Proxy) -> f64 {
    let mut n = 0.0;
    for result in ["error", "timeout"] {
        n += metric_or_zero(
            p,
            "llmlb_store_calls_total",
            &[("op", "acquire"), ("result", result)],
        )
        .await;
    }
    n
}

async fn breaker_closed(proxies: &[&Proxy]) -> Result<(), String> {
    for p in proxies {
        let open = p
            .metric("llmlb_store_breaker_open", &[("pool", POOL)])
            .await;
        if open != Some(0.0) {
            return Err(format!("breaker gauge {open:?}"));
        }
    }
    Ok(())
}

/// Redis dies in the middle of a load run through two replicas: no client request fails, the
/// breaker stops the store calls after a few failures (not one per request; latencies are
/// printed), and when Redis is back (empty) the replicas share counts again by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_during_load() {
    let mut redis = RedisServer::start().expect("redis-server");
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let bs: Vec<&Backend> = backends.iter().collect();
    let timeout = Duration::from_millis(100);
    let lb = format!(", timeout: {}", timeout.as_millis());
    let a = Proxy::start(&config(&bs, &redis.url(), &lb));
    let b = Proxy::start(&config(&bs, &redis.url(), &lb));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&[&a, &b], 2, stop.clone());

    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let failed_while_down = [failed_acquires(&a).await, failed_acquires(&b).await];
    redis.restart().expect("restart redis");
    let restarted = Instant::now();
    eventually(
        "breakers close after the restart",
        Duration::from_secs(10),
        async || breaker_closed(&[&a, &b]).await,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.expect("worker"));
    }

    // Zero failed client requests.
    let failed: Vec<u16> = samples
        .iter()
        .map(|s| s.status)
        .filter(|s| *s != 200)
        .collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    let before: Vec<&Sample> = samples.iter().filter(|s| s.at < killed).collect();
    let down: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > killed && s.at < restarted)
        .collect();
    assert!(
        before.len() > 20 && down.len() > 50,
        "{} / {}",
        before.len(),
        down.len()
    );
    // The breaker: a handful of store calls failed, not one per request.
    for (p, n) in [&a, &b].iter().zip(failed_while_down) {
        assert!(n >= 1.0, "no store failure seen: {}", p.log_text());
        assert!(
            n <= 10.0,
            "{n} failed store calls for {} requests while Redis was down",
            down.len()
        );
        let skipped = metric_or_zero(
            p,
            "llmlb_fallback_total",
            &[("reason", "store_breaker_open")],
        )
        .await;
        assert!(skipped >= 10.0, "breaker skips counted: {skipped}");
    }
    // Latencies are reported, not asserted (timings flake on a busy machine): that requests do not
    // wait on the dead store is shown by the breaker counts above (a handful of failed calls).
    let normal = before.iter().map(|s| s.latency).max().unwrap_or_default();
    let worst = down.iter().map(|s| s.latency).max().unwrap_or_default();
    eprintln!(
        "requests before/down/total {}/{}/{}, failed store calls while down {failed_while_down:?}, \
         worst latency before {normal:?}, while down {worst:?} (store timeout {timeout:?})",
        before.len(),
        down.len(),
        samples.len()
    );

    // Shared counting resumed on the fresh, empty Redis.
    let mut view = View::single(&redis.url());
    let client = client();
    let mut held = Vec::new();
    for i in 0..6 {
        held.push(start_held(&client, if i % 2 == 0 { &a } else { &b }, true, 64).await);
    }
    assert_eq!(actives(&bs), vec![2, 2, 2]);
    // A release that timed out around the restart may still land late on the fresh Redis; the
    // next heartbeat's restore undoes it (pool_counts.rs), so the totals converge within a tick.
    eventually(
        "the fresh Redis counts what is held",
        Duration::from_secs(5),
        async || match view.totals(&bs) {
            t if t == [2, 2, 2] => Ok(()),
            t => Err(format!("{t:?}")),
        },
    )
    .await;
    release_all(&backends, 2, held).await;
    assert_drained(&[&a, &b], &bs, &mut view).await;
}

/// A hung Redis (SIGSTOP: connections open, no answers) costs a few requests one timeout each,
/// then nothing while the breaker is open; when it resumes, the calls that timed out are executed
/// late, and the replica's restore undoes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_redis_costs_a_timeout_now_and_then() {
    let redis = RedisServer::start().expect("redis-server");
    let backends = [Backend::start().await, Backend::start().await];
    let bs: Vec<&Backend> = backends.iter().collect();
    let a = Proxy::start(&config(&bs, &redis.url(), ", timeout: 100"));
    let client = client();
    let send = async || {
        let r = client
            .post(a.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body(false, false, 64))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 200);
        let _ = r.bytes().await;
    };
    for _ in 0..5 {
        send().await;
    }
    redis.pause();
    for _ in 0..40 {
        send().await;
    }
    let timed_out = metric_or_zero(
        &a,
        "llmlb_store_calls_total",
        &[("op", "acquire"), ("result", "timeout")],
    )
    .await;
    assert!(
        (1.0..=3.0).contains(&timed_out),
        "{timed_out} acquires waited for the timeout"
    );
    let skipped = metric_or_zero(
        &a,
        "llmlb_fallback_total",
        &[("reason", "store_breaker_open")],
    )
    .await;
    assert!(skipped >= 37.0, "{skipped} requests skipped the store");

    redis.resume();
    let mut view = View::single(&redis.url());
    eprintln!("right after resume: totals {:?}", view.totals(&bs));
    eventually("breaker closes", Duration::from_secs(10), async || {
        breaker_closed(&[&a]).await
    })
    .await;
    // The late acquires landed in Redis; the restores remove them.
    assert_drained(&[&a], &bs, &mut view).await;
    let restores = metric_or_zero(
        &a,
        "llmlb_store_calls_total",
        &[("op", "restore"), ("result", "ok")],
    )
    .await;
    assert!(restores >= 1.0);
    for _ in 0..5 {
        send().await;
    }
    let picks = a
        .metric("llmlb_picks_total", &[("reason", "least_request")])
        .await;
    assert_eq!(
        picks,
        Some(10.0),
        "5 before and 5 after the pause went through Redis"
    );
}

/// `maxRequestCount` on the embedded store (no Redis keys): when every endpoint has that many in
/// flight the request gets 429 with an OpenAI-style error, and is admitted again once one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_request_count_refuses_with_429() {
    let backends = [Backend::start().await, Backend::start().await];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let p = Proxy::start(&format!(
        "pools:\n{}",
        pool_yaml(
            POOL,
            "[\"*\"]",
            &addrs,
            "global_least_request",
            "    lb_config: {maxRequestCount: 1}\n"
        )
    ));
    let client = client();
    let first = start_held(&client, &p, true, 64).await;
    let second = start_held(&client, &p, false, 64).await;
    let bs: Vec<&Backend> = backends.iter().collect();
    assert_eq!(actives(&bs), vec![1, 1]);
    let r = client
        .post(p.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body(false, false, 64))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 429);
    let err: serde_json::Value = r.json().await.expect("json error");
    assert_eq!(err["error"]["type"], "rate_limit_error", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("capacity"),
        "{err}"
    );
    assert_eq!(
        backends.iter().map(|b| b.count()).sum::<usize>(),
        2,
        "never forwarded"
    );
    for b in &backends {
        b.release_held(1);
    }
    finish(first).await;
    finish(second).await;
    let r = client
        .post(p.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body(false, false, 64))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    let lines = p.access_lines();
    assert!(
        lines.iter().any(|l| l.contains("status=429")
            && l.contains("policy=global_least_request reason=saturated")),
        "{lines:?}"
    );
}

/// On SIGTERM a replica keeps heart-beating while its requests drain (so a survivor does not
/// reap counts that are still real, even when the grace period outlasts `replicaTimeout`), then
/// withdraws from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_keeps_counts_while_draining() {
    let redis = RedisServer::start().expect("redis-server");
    let backends = [Backend::start().await, Backend::start().await];
    let bs: Vec<&Backend> = backends.iter().collect();
    let lb = ", replicaTimeout: 1000";
    let a = Proxy::start_with_grace(&config(&bs, &redis.url(), lb), 10);
    let survivor = Proxy::start(&config(&bs, &redis.url(), lb));
    let mut view = View::single(&redis.url());
    let client = client();
    let held = vec![
        start_held(&client, &a, true, 64).await,
        start_held(&client, &a, true, 64).await,
        start_held(&client, &a, true, 64).await,
    ];
    let mut before = view.totals(&bs);
    before.sort();
    assert_eq!(before, vec![1, 2]);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &a.pid().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    // Twice the replica timeout: the survivor would have reaped a silent replica by now.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut draining = view.totals(&bs);
    draining.sort();
    assert_eq!(draining, vec![1, 2], "still counted while draining");
    // The survivor balances around the draining replica's requests.
    let fourth = start_held(&client, &survivor, false, 64).await;
    assert_eq!(view.totals(&bs), vec![2, 2]);
    assert_eq!(actives(&bs), vec![2, 2]);
    for b in &backends {
        b.release_held(2);
    }
    for r in held {
        assert!(finish(r).await.ends_with("data: [DONE]\n\n"));
    }
    finish(fourth).await;
    eventually(
        "drained and withdrawn",
        Duration::from_secs(5),
        async || {
            let left = view.contributions();
            if left.is_empty() && a.log_text().contains("withdrawn from the state store") {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;
    assert_drained(&[&survivor], &bs, &mut view).await;
}

/// An unhealthy endpoint has nothing in flight, so it would attract every request; it is not a
/// candidate until its health check passes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_endpoints_are_not_candidates() {
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    backends[2].state.unhealthy.store(true, Ordering::SeqCst);
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let p = Proxy::start(&format!(
        "pools:\n{}",
        pool_yaml(
            POOL,
            "[\"*\"]",
            &addrs,
            "global_least_request",
            "    health_check: {interval_ms: 100, unhealthy_threshold: 1}\n"
        )
    ));
    let sick = addrs[2].to_string();
    eventually(
        "health check marks it",
        Duration::from_secs(5),
        async || match p
            .metric("llmlb_endpoint_healthy", &[("endpoint", &sick)])
            .await
        {
            Some(0.0) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    let client = client();
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(start_held(&client, &p, true, 64).await);
    }
    let bs: Vec<&Backend> = backends.iter().collect();
    assert_eq!(actives(&bs), vec![3, 3, 0]);
    release_all(&backends, 3, held).await;
}
