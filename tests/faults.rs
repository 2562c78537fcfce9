//! Fault injection under load: the real `llm-lb` binary in front of in-process `vllm-sim` servers
//! (or recording backends) and a real `redis-server`, loopback only, bounded loops. Each scenario
//! prints one line (`[faults] name: sent=… succeeded=… failed=… (why) | rss … | …`; run with
//! `--nocapture` to see it), asserts that nothing is lost where nothing may be, and ends with the
//! proxy settled: nothing in flight, no leaked connection.
//!
//! The long variant (`soak`, ignored here) runs minutes of load with rotating faults and compares
//! RSS: `scripts/soak.sh`.

mod common;
mod fault_kit;
mod redis_harness;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pool_yaml, sim_fleet, Backend, Proxy};
use fault_kit::*;
use redis_harness::RedisServer;
use serde_json::json;
use vllm_sim::{SimConfig, SimHandle};

const MODEL: &str = "sim/fault";

/// Simulated servers that take real time: ~5 ms to the first token, 10 ms per token.
async fn fleet(n: usize) -> Vec<SimHandle> {
    let base = SimConfig {
        model: MODEL.to_string(),
        time_scale: 1.0,
        itl_ms: 10.0,
        prefill_ms_per_token: 0.001,
        ..SimConfig::default()
    };
    sim_fleet(n, base).await
}

/// A chat request for a simulator: `tokens` output tokens, streamed every other request.
fn sim_body(tokens: u32) -> BodyFn {
    sim_body_sized(tokens, false)
}

/// [`sim_body`]; with `big`, every third body is over 64 KiB (the subrequest path).
fn sim_body_sized(tokens: u32, big: bool) -> BodyFn {
    let document = "lighthouse keeper log entry. ".repeat(2600);
    Arc::new(move |i| {
        let stream = i % 2 == 0;
        let content = if big && i % 3 == 0 {
            format!("{document}\nrequest {i}: summarise the log")
        } else {
            format!("request {i}: tell me about lighthouses")
        };
        let body = json!({
            "model": MODEL,
            "stream": stream,
            "max_tokens": tokens,
            "ignore_eos": true,
            "messages": [{"role": "user", "content": content}],
        });
        (serde_json::to_vec(&body).expect("json"), stream)
    })
}

/// The policy file around `pools` (a `pools:` list): endpoint header on, short upstream timeouts
/// and a short keep-alive so idle upstream connections are closed within the test.
fn conf(read_timeout_ms: u64, pools: &str) -> String {
    format!(
        "expose_endpoint_header: true\nmax_body_bytes: 4194304\nupstream: {{connect_timeout_ms: 500, read_timeout_ms: {read_timeout_ms}, idle_timeout_ms: 300}}\npools:\n{pools}"
    )
}

fn addrs(sims: &[SimHandle]) -> Vec<SocketAddr> {
    sims.iter().map(SimHandle::addr).collect()
}

async fn metric(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    proxy.metric(name, labels).await.unwrap_or(0.0)
}

/// A backend is killed mid-run (every connection closed, the port refuses): requests in flight
/// to it may fail, requests sent after it died must not — they are retried on another endpoint
/// until passive health ejects it (before the active health check notices). A third of the
/// bodies are over 64 KiB, so retries through fresh subrequests are exercised too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_run() {
    let mut sims = fleet(3).await;
    let all = addrs(&sims);
    let victim = all[2];
    let proxy = Proxy::start(&conf(
        5000,
        &pool_yaml("sim", "[\"*\"]", &all, "round_robin", ""),
    ));
    let rss_before = rss_kib(proxy.pid());
    let load = Load::start(
        proxy.url("/v1/chat/completions"),
        6,
        400,
        0,
        sim_body_sized(8, true),
    );
    load.wait_sent(30, Duration::from_secs(30)).await;

    let dead = sims.remove(2);
    dead.shutdown().await;
    let killed = Instant::now();
    let at_kill = load.sent();
    load.wait_sent(at_kill + 60, Duration::from_secs(30)).await;
    let samples = load.stop().await;

    let before: Vec<&Sample> = samples.iter().filter(|s| s.at < killed).collect();
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= killed).collect();
    let after_tally = Tally::of(after.iter().copied());
    assert_eq!(
        after_tally.failed,
        0,
        "requests sent after the kill failed: {}",
        after_tally.text()
    );
    // Failures before the kill are the requests that were in flight to the victim: at most one
    // per worker.
    let lost = Tally::of(before.iter().copied());
    assert!(lost.failed <= 6, "{}", lost.text());
    assert!(
        after
            .iter()
            .all(|s| s.endpoint.as_deref() != Some(&victim.to_string())),
        "a request sent after the kill was answered by the dead backend"
    );
    let victim_label = victim.to_string();
    let ejections = metric(
        &proxy,
        "llmlb_outlier_ejections_total",
        &[("endpoint", &victim_label), ("reason", "connect")],
    )
    .await;
    let retries = metric(&proxy, "llmlb_retries_total", &[("pool", "sim")]).await;
    assert!(
        ejections >= 1.0,
        "connect failures did not eject the dead backend:\n{}",
        proxy.log_text()
    );
    let settled = assert_settled(&proxy, &all).await;
    report(
        "backend_killed_mid_run",
        &Tally::of(&samples),
        rss_before,
        &settled,
        &format!(
            "in flight at the kill: {}; after the kill: {}; retries {retries}, ejections {ejections}",
            lost.text(),
            after_tally.text()
        ),
    );
}

/// A backend hangs (accepts, never answers): requests to it time out (504) until
/// `consecutive_failures` timeouts eject it — with the active health check off, so this is
/// passive health alone; then no request goes to it (none waits for a timeout) while ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_backend_is_ejected() {
    let sims = fleet(3).await;
    let all = addrs(&sims);
    let victim = all[2].to_string();
    let workers = 6;
    let threshold = 3;
    let proxy = Proxy::start(&conf(
        1000,
        &pool_yaml(
            "sim",
            "[\"*\"]",
            &all,
            "round_robin",
            &format!(
                "    health_check: {{enabled: false}}\n    outlier_detection: {{consecutive_failures: {threshold}, base_ejection_ms: 120000}}\n"
            ),
        ),
    ));
    let rss_before = rss_kib(proxy.pid());
    let load = Load::start(
        proxy.url("/v1/chat/completions"),
        workers,
        1000,
        0,
        sim_body(4),
    );
    load.wait_sent(20, Duration::from_secs(30)).await;
    sims[2].faults().set_hang(true);
    eventually(
        "the hung backend is ejected",
        Duration::from_secs(30),
        async || match proxy
            .metric("llmlb_endpoint_ejected", &[("endpoint", &victim)])
            .await
        {
            Some(1.0) => Ok(()),
            other => Err(format!("ejected gauge {other:?}")),
        },
    )
    .await;
    let ejected = Instant::now();
    let at_ejection = load.sent();
    load.wait_sent(at_ejection + 60, Duration::from_secs(30))
        .await;
    let samples = load.stop().await;
    sims[2].faults().set_hang(false);

    let tally = Tally::of(&samples);
    // Only timeouts (a stream that had started is cut), and only attempts on the hung backend.
    assert!(
        tally
            .why
            .keys()
            .all(|k| ["status 504", "truncated stream", "body: transport"].contains(&k.as_str())),
        "{}",
        tally.text()
    );
    assert!(
        samples
            .iter()
            .filter(|s| !s.ok())
            .all(|s| s.endpoint.as_deref().is_none_or(|e| e == victim)),
        "a failure came from a healthy backend"
    );
    assert!(
        tally.failed >= threshold && tally.failed < threshold + workers,
        "{}",
        tally.text()
    );
    let later: Vec<&Sample> = samples.iter().filter(|s| s.at >= ejected).collect();
    assert!(later.len() >= 60);
    assert!(
        later
            .iter()
            .all(|s| s.ok() && s.endpoint.as_deref() != Some(victim.as_str())),
        "a request sent after the ejection went to the hung backend: {}",
        Tally::of(later.iter().copied()).text()
    );
    let timeouts = metric(
        &proxy,
        "llmlb_outlier_ejections_total",
        &[("endpoint", &victim), ("reason", "timeout")],
    )
    .await;
    assert_eq!(timeouts, 1.0);
    assert!(proxy
        .log_text()
        .contains("ejected for 120000 ms after 3 consecutive failures (last: timeout)"));
    let settled = assert_settled(&proxy, &all).await;
    report(
        "hanging_backend_is_ejected",
        &tally,
        rss_before,
        &settled,
        &format!(
            "after the ejection: {}",
            Tally::of(later.iter().copied()).text()
        ),
    );
}

/// 4xx answers are the client's fault: a server answering every request with 400 (or 429) is
/// never ejected, however many come in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_never_eject() {
    let sims = fleet(3).await;
    let all = addrs(&sims);
    let proxy = Proxy::start(&conf(
        5000,
        &pool_yaml(
            "sim",
            "[\"*\"]",
            &all,
            "round_robin",
            "    outlier_detection: {consecutive_failures: 2}\n",
        ),
    ));
    let client = client();
    let url = proxy.url("/v1/chat/completions");
    let body = sim_body(2);
    let mut samples = Vec::new();
    for status in [400, 429] {
        sims[2].faults().set_fail(1.0, status).expect("faults");
        for i in 0..12 {
            let (b, stream) = body(i);
            samples.push(send(&client, &url, b, stream, 0).await);
        }
    }
    let tally = Tally::of(&samples);
    assert_eq!(tally.failed, 8, "{}", tally.text());
    assert_eq!(
        tally.why.keys().collect::<Vec<_>>(),
        vec!["status 400", "status 429"]
    );
    let text = proxy.metrics().await;
    assert_eq!(metric_sum(&text, "llmlb_outlier_ejections_total"), 0.0);
    drop(client);
    let settled = assert_settled(&proxy, &all).await;
    report(
        "client_errors_never_eject",
        &tally,
        settled.rss_kib,
        &settled,
        "no ejection",
    );
}

/// An ejected endpoint is admitted again when its period ends — without any request having to
/// notice (the gauge and the log line follow the clock) — and serves its share again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejected_endpoint_returns_after_its_period() {
    let sims = fleet(3).await;
    let all = addrs(&sims);
    let victim = all[2].to_string();
    let proxy = Proxy::start(&conf(
        5000,
        &pool_yaml(
            "sim",
            "[\"*\"]",
            &all,
            "round_robin",
            "    outlier_detection: {consecutive_failures: 2, base_ejection_ms: 800}\n",
        ),
    ));
    let client = client();
    let url = proxy.url("/v1/chat/completions");
    let body = sim_body(2);
    sims[2].faults().set_fail(1.0, 503).expect("faults");
    let mut samples = Vec::new();
    for i in 0..30 {
        let (b, stream) = body(i);
        samples.push(send(&client, &url, b, stream, 0).await);
        if proxy
            .metric("llmlb_endpoint_ejected", &[("endpoint", &victim)])
            .await
            == Some(1.0)
        {
            break;
        }
    }
    let tally = Tally::of(&samples);
    assert_eq!(tally.failed, 2, "{}", tally.text());
    sims[2].faults().clear();
    eventually("back from ejection", Duration::from_secs(10), async || {
        let gauge = proxy
            .metric("llmlb_endpoint_ejected", &[("endpoint", &victim)])
            .await;
        if gauge == Some(0.0) && proxy.log_text().contains("is back from ejection") {
            Ok(())
        } else {
            Err(format!("gauge {gauge:?}"))
        }
    })
    .await;
    let mut after = Vec::new();
    for i in 0..9 {
        let (b, stream) = body(100 + i);
        after.push(send(&client, &url, b, stream, 0).await);
    }
    let back = Tally::of(&after);
    assert_eq!(back.failed, 0, "{}", back.text());
    let on_victim = after
        .iter()
        .filter(|s| s.endpoint.as_deref() == Some(victim.as_str()))
        .count();
    assert_eq!(on_victim, 3, "round robin gives it its share again");
    drop(client);
    let settled = assert_settled(&proxy, &all).await;
    report(
        "ejected_endpoint_returns_after_its_period",
        &tally,
        settled.rss_kib,
        &settled,
        &format!("after its return: {}, {on_victim} on it", back.text()),
    );
}

/// Rewrite the policy file of `proxy` to `rest` and reload it through the admin listener.
async fn reload(client: &reqwest::Client, proxy: &Proxy, rest: &str) {
    proxy.write_policy(rest);
    let reloaded = client
        .post(format!("http://{}/-/reload", proxy.admin))
        .send()
        .await
        .expect("reload");
    assert_eq!(reloaded.status(), 200);
}

/// Send 9 requests (bodies `first..first + 9`), none may fail; how many `endpoint` served.
async fn served_by(
    client: &reqwest::Client,
    url: &str,
    body: &BodyFn,
    first: usize,
    endpoint: &str,
) -> usize {
    let mut samples = Vec::new();
    for i in 0..9 {
        let (b, stream) = body(first + i);
        samples.push(send(client, url, b, stream, 0).await);
    }
    let tally = Tally::of(&samples);
    assert_eq!(tally.failed, 0, "{}", tally.text());
    samples
        .iter()
        .filter(|s| s.endpoint.as_deref() == Some(endpoint))
        .count()
}

/// A reload (or a DNS change) builds a new routing table; an ejected endpoint stays ejected in it
/// (the detector's state is carried by endpoint), instead of getting traffic again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejection_survives_a_reload() {
    let sims = fleet(3).await;
    let all = addrs(&sims);
    let victim = all[2].to_string();
    let file = |attempts: u32| {
        let pool = pool_yaml(
            "sim",
            "[\"*\"]",
            &all,
            "round_robin",
            "    outlier_detection: {consecutive_failures: 2, base_ejection_ms: 60000}\n",
        );
        format!("max_attempts: {attempts}\n{}", conf(5000, &pool))
    };
    let proxy = Proxy::start(&file(3));
    let client = client();
    let url = proxy.url("/v1/chat/completions");
    let body = sim_body(2);
    sims[2].faults().set_fail(1.0, 503).expect("faults");
    let ejected = async || {
        proxy
            .metric("llmlb_endpoint_ejected", &[("endpoint", &victim)])
            .await
    };
    for i in 0..30 {
        let (b, stream) = body(i);
        send(&client, &url, b, stream, 0).await;
        if ejected().await == Some(1.0) {
            break;
        }
    }
    assert_eq!(
        ejected().await,
        Some(1.0),
        "the failing endpoint is ejected"
    );
    // It would answer now: only its ejection keeps requests away from it.
    sims[2].faults().clear();
    reload(&client, &proxy, &file(2)).await;
    assert_eq!(
        ejected().await,
        Some(1.0),
        "still ejected in the new generation"
    );
    let on_victim = served_by(&client, &url, &body, 100, &victim).await;
    assert_eq!(
        on_victim, 0,
        "an ejected endpoint gets no traffic after a reload"
    );
}

/// Active health carries over a reload too: an endpoint whose health check fails stays out of the
/// new routing table at once, instead of looking healthy until its checks fail again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_health_checks_survive_a_reload() {
    let sims = fleet(3).await;
    let all = addrs(&sims);
    let victim = all[2].to_string();
    let file = |attempts: u32| {
        // Checks every 2 s, unhealthy after 2 failures: a new view that started healthy would
        // take about 4 s to notice.
        let pool = pool_yaml(
            "sim",
            "[\"*\"]",
            &all,
            "round_robin",
            "    health_check: {path: /health, interval_ms: 2000, timeout_ms: 500, unhealthy_threshold: 2}\n    outlier_detection: {enabled: false}\n",
        );
        format!("max_attempts: {attempts}\n{}", conf(5000, &pool))
    };
    let proxy = Proxy::start(&file(3));
    let client = client();
    let url = proxy.url("/v1/chat/completions");
    let body = sim_body(2);
    // Its completions still work: only the health check keeps requests away from it.
    sims[2].faults().set_health_status(503);
    let healthy = async || {
        proxy
            .metric("llmlb_endpoint_healthy", &[("endpoint", &victim)])
            .await
    };
    eventually(
        "the victim unhealthy",
        Duration::from_secs(15),
        async || match healthy().await {
            Some(0.0) => Ok(()),
            other => Err(format!("gauge {other:?}")),
        },
    )
    .await;
    reload(&client, &proxy, &file(2)).await;
    assert_eq!(
        healthy().await,
        Some(0.0),
        "still unhealthy in the new generation"
    );
    let on_victim = served_by(&client, &url, &body, 200, &victim).await;
    assert_eq!(
        on_victim, 0,
        "an unhealthy endpoint gets no traffic after a reload"
    );
}

/// Runs `total` requests with `workers` clients through `global_least_request` over three
/// simulators of which the third answers every completion with a fast 500. Returns the tally
/// and how many requests the failing one answered.
async fn least_request_with_a_failing_backend(
    outlier: &str,
    workers: usize,
    each: usize,
) -> (Tally, u64, u64, Proxy, Vec<SimHandle>) {
    let sims = fleet(3).await;
    sims[2].faults().set_fail(1.0, 500).expect("faults");
    let proxy = Proxy::start(&conf(
        5000,
        &pool_yaml(
            "sim",
            "[\"*\"]",
            &addrs(&sims),
            "global_least_request",
            outlier,
        ),
    ));
    let rss_before = rss_kib(proxy.pid());
    let load = Load::start(
        proxy.url("/v1/chat/completions"),
        workers,
        each,
        0,
        sim_body(10),
    );
    let samples = load.join().await;
    let failed_by_sim = sims[2].stats().requests_failed;
    (Tally::of(&samples), failed_by_sim, rss_before, proxy, sims)
}

/// A backend that answers 500 at once has nothing in flight, so least-request would send it
/// almost everything ("error amplification"). Control: with outlier detection off it gets most
/// requests. With it on (default threshold 5), it gets at most the threshold plus the requests
/// already on their way when it was ejected, and then nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_500s_do_not_attract_traffic() {
    let workers = 8;
    let each = 15;
    let (control, control_500s, _, control_proxy, control_sims) =
        least_request_with_a_failing_backend(
            "    outlier_detection: {enabled: false}\n",
            workers,
            each,
        )
        .await;
    assert!(
        control_500s as usize * 2 > control.sent,
        "control run: the failing backend should attract most traffic: {}",
        control.text()
    );
    drop(control_proxy);
    drop(control_sims);

    let (tally, failed_500s, rss_before, proxy, sims) = least_request_with_a_failing_backend(
        "    outlier_detection: {base_ejection_ms: 120000}\n",
        workers,
        each,
    )
    .await;
    assert_eq!(tally.sent, workers * each);
    assert_eq!(
        tally.why.keys().collect::<Vec<_>>(),
        vec!["status 500"],
        "{}",
        tally.text()
    );
    assert_eq!(tally.failed as u64, failed_500s);
    // The threshold, plus at most one request per client already on its way at the ejection.
    assert!(
        (5..=5 + workers).contains(&tally.failed),
        "{} (control: {})",
        tally.text(),
        control.text()
    );
    let victim = sims[2].addr().to_string();
    assert_eq!(
        metric(
            &proxy,
            "llmlb_outlier_ejections_total",
            &[("endpoint", &victim), ("reason", "5xx")]
        )
        .await,
        1.0
    );
    let settled = assert_settled(&proxy, &addrs(&sims)).await;
    report(
        "fast_500s_do_not_attract_traffic",
        &tally,
        rss_before,
        &settled,
        &format!("control without ejection: {}", control.text()),
    );
}

/// The shared counts of `pool` in Redis, by endpoint, and every replica's contribution.
fn store_counts(
    url: &str,
    pool: &str,
    endpoints: &[SocketAddr],
) -> (Vec<i64>, HashMap<String, i64>) {
    let mut conn = redis::Client::open(url)
        .expect("url")
        .get_connection()
        .expect("connect");
    let mut cmd = redis::cmd("HMGET");
    cmd.arg(format!("llmlb:{{{pool}}}:total"));
    for e in endpoints {
        cmd.arg(e.to_string());
    }
    let totals: Vec<Option<i64>> = cmd.query(&mut conn).expect("HMGET");
    let mine: HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("llmlb:{{{pool}}}:inflight"))
        .query(&mut conn)
        .expect("HGETALL");
    (totals.into_iter().map(|n| n.unwrap_or(0)).collect(), mine)
}

/// A recording-backend request for `model` (prefix-shared for `prefix_cache`).
fn backend_body(model: &'static str) -> BodyFn {
    Arc::new(move |i| {
        let body = json!({
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a careful assistant. ".repeat(20)},
                {"role": "user", "content": format!("conversation {} turn {}", i % 7, i)},
            ],
        });
        (serde_json::to_vec(&body).expect("json"), false)
    })
}

/// Redis is killed and restarted (empty) while `global_least_request` and `prefix_cache` pools
/// serve load through it, with three long requests held open across the outage: no request
/// fails (the store is skipped while it is down); once Redis is back the replica counts in it
/// again, its heartbeat restores the held requests' counts into the empty Redis (the store then
/// agrees with what the backends really serve), and everything returns to exactly zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted() {
    let mut redis = RedisServer::start().expect("redis-server");
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let all: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let lb = format!(
        "    lb_config: {{serviceFQDN: '{}', timeout: 100}}\n",
        redis.url()
    );
    let pools = format!(
        "{}{}",
        pool_yaml("glr", "[\"m-glr\"]", &all, "global_least_request", &lb),
        pool_yaml("pfx", "[\"m-pfx\"]", &all, "prefix_cache", &lb)
    );
    // A long read timeout: the held requests must outlive the outage (with 5 s they would be
    // cut before the restore could be checked).
    let proxy = Proxy::start(&conf(120_000, &pools));
    let rss_before = rss_kib(proxy.pid());
    let client = client();
    let mut held_open = Vec::new();
    for _ in 0..3 {
        held_open.push(held(&client, &proxy, "m-glr").await);
    }
    assert_eq!(store_counts(&redis.url(), "glr", &all).0, vec![1, 1, 1]);
    let url = proxy.url("/v1/chat/completions");
    let mut load = Load::start(url.clone(), 2, 100_000, 0, backend_body("m-glr"));
    load.add(url, 2, 100_000, 1, backend_body("m-pfx"));
    load.wait_sent(40, Duration::from_secs(30)).await;

    redis.kill();
    let at_kill = load.sent();
    load.wait_sent(at_kill + 100, Duration::from_secs(30)).await;
    let skipped_while_down = metric(
        &proxy,
        "llmlb_fallback_total",
        &[("reason", "store_breaker_open")],
    )
    .await;
    redis.restart().expect("restart redis");
    let ok_before: f64 = metric(
        &proxy,
        "llmlb_store_calls_total",
        &[("pool", "pfx"), ("op", "acquire_prefix"), ("result", "ok")],
    )
    .await
        + metric(
            &proxy,
            "llmlb_store_calls_total",
            &[("pool", "glr"), ("op", "acquire"), ("result", "ok")],
        )
        .await;
    eventually(
        "both pools count in the restarted Redis",
        Duration::from_secs(20),
        async || {
            let pfx = metric(
                &proxy,
                "llmlb_store_calls_total",
                &[("pool", "pfx"), ("op", "acquire_prefix"), ("result", "ok")],
            )
            .await;
            let glr = metric(
                &proxy,
                "llmlb_store_calls_total",
                &[("pool", "glr"), ("op", "acquire"), ("result", "ok")],
            )
            .await;
            if pfx + glr >= ok_before + 20.0 {
                Ok(())
            } else {
                Err(format!(
                    "{} ok calls since the restart",
                    pfx + glr - ok_before
                ))
            }
        },
    )
    .await;
    let samples = load.stop().await;
    let tally = Tally::of(&samples);
    assert_eq!(tally.failed, 0, "{}", tally.text());
    assert!(
        skipped_while_down >= 10.0,
        "breaker skips: {skipped_while_down}"
    );
    // The heartbeat wrote the three requests held across the outage into the empty Redis.
    let redis_url = redis.url();
    eventually(
        "held requests restored into the new Redis",
        Duration::from_secs(10),
        async || match store_counts(&redis_url, "glr", &all).0 {
            t if t == [1, 1, 1] => Ok(()),
            t => Err(format!("totals {t:?}")),
        },
    )
    .await;
    for b in &backends {
        b.release_held(1);
    }
    for r in held_open {
        assert_eq!(r.status(), 200);
        let tail = r.text().await.expect("held stream completes");
        assert!(tail.contains("[DONE]"), "{tail}");
    }
    drop(client);
    let settled = assert_settled(&proxy, &all).await;
    eventually(
        "store counts back to zero",
        Duration::from_secs(10),
        async || {
            let got: Vec<_> = ["glr", "pfx"]
                .iter()
                .map(|p| store_counts(&redis_url, p, &all))
                .collect();
            if got
                .iter()
                .all(|(t, c)| t.iter().all(|n| *n == 0) && c.values().all(|n| *n == 0))
            {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .await;
    report(
        "redis_killed_and_restarted",
        &tally,
        rss_before,
        &settled,
        &format!("requests that skipped the store while it was down: {skipped_while_down}"),
    );
}

/// Held stream of `model` through `proxy` (first event received).
async fn held(client: &reqwest::Client, proxy: &Proxy, model: &str) -> reqwest::Response {
    let body = json!({"model": model, "stream": true, "hold": true,
        "messages": [{"role": "user", "content": "hold me"}]});
    let mut r = client
        .post(proxy.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    let first = r.chunk().await.expect("first event").expect("not empty");
    assert!(first.starts_with(b"data: "));
    r
}

/// One of two replicas sharing Redis is SIGKILLed under load with requests in flight: clients of
/// the survivor lose nothing; the dead replica's share of the counts stays in Redis only until
/// the survivor reaps it (`replicaTimeout` + a heartbeat), then the survivor balances on the
/// real load again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_replica_sigkilled_under_load() {
    let redis = RedisServer::start().expect("redis-server");
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let all: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let lb = format!(
        "    lb_config: {{serviceFQDN: '{}', replicaTimeout: 2000}}\n",
        redis.url()
    );
    let pools = pool_yaml("main", "[\"*\"]", &all, "global_least_request", &lb);
    let a = Proxy::start(&conf(5000, &pools));
    let mut b = Proxy::start(&conf(5000, &pools));
    let rss_before = rss_kib(a.pid());
    let client = client();
    let mut on_b = Vec::new();
    for _ in 0..3 {
        on_b.push(held(&client, &b, "m").await);
    }
    let (totals, _) = store_counts(&redis.url(), "main", &all);
    assert_eq!(totals, vec![1, 1, 1]);
    let load_a = Load::start(
        a.url("/v1/chat/completions"),
        3,
        100_000,
        0,
        backend_body("m"),
    );
    let load_b = Load::start(
        b.url("/v1/chat/completions"),
        2,
        100_000,
        1,
        backend_body("m"),
    );
    load_a.wait_sent(40, Duration::from_secs(30)).await;
    load_b.wait_sent(20, Duration::from_secs(30)).await;

    let kill_sent = Instant::now();
    b.kill();
    let killed = Instant::now();
    drop(on_b);
    // B's clients stop at their first failure's end; A's carry on.
    let mut samples = load_b.stop().await;
    let at_kill = load_a.sent();
    load_a
        .wait_sent(at_kill + 60, Duration::from_secs(30))
        .await;
    samples.extend(load_a.stop().await);
    let through_a = Tally::of(samples.iter().filter(|s| s.stream == 0));
    let through_b = Tally::of(samples.iter().filter(|s| s.stream == 1));
    assert_eq!(
        through_a.failed,
        0,
        "survivor lost requests: {}",
        through_a.text()
    );
    assert!(
        samples
            .iter()
            .filter(|s| s.stream == 1 && s.at < kill_sent)
            .filter(|s| !s.ok())
            .count()
            <= 2,
        "only B's in-flight requests may fail before the kill: {}",
        through_b.text()
    );

    // B's three held requests stay counted until the survivor reaps B.
    let url = redis.url();
    eventually(
        "the dead replica's share is reaped",
        Duration::from_millis(2000 + 5000),
        async || {
            let (totals, mine) = store_counts(&url, "main", &all);
            let replicas: std::collections::HashSet<String> = mine
                .iter()
                .filter(|(_, n)| **n != 0)
                .filter_map(|(f, _)| f.split('|').next().map(str::to_owned))
                .collect();
            if totals.iter().all(|n| *n == 0) && replicas.is_empty() {
                Ok(())
            } else {
                Err(format!("totals {totals:?}, contributions {mine:?}"))
            }
        },
    )
    .await;
    let reaped = killed.elapsed();
    // The survivor balances on the real load again.
    let mut on_a = Vec::new();
    for _ in 0..3 {
        on_a.push(held(&client, &a, "m").await);
    }
    assert_eq!(store_counts(&url, "main", &all).0, vec![1, 1, 1]);
    for backend in &backends {
        backend.release_held(16);
    }
    for r in on_a {
        let _ = r.text().await;
    }
    drop(client);
    let settled = assert_settled(&a, &all).await;
    report(
        "gateway_replica_sigkilled_under_load",
        &Tally::of(&samples),
        rss_before,
        &settled,
        &format!(
            "through the survivor: {}; through the killed replica: {}; its share reaped after {reaped:.1?}",
            through_a.text(),
            through_b.text()
        ),
    );
}

/// Clients that go away mid-stream — small bodies (Pingora's own path) and bodies over 64 KiB
/// (the subrequest path): every simulator request is aborted, the simulators end with nothing
/// running or waiting, the proxy with nothing in flight and no connection left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_disconnect_mid_stream() {
    let sims = fleet(3).await;
    let all = addrs(&sims);
    let proxy = Proxy::start(&conf(
        5000,
        &pool_yaml("sim", "[\"*\"]", &all, "global_least_request", ""),
    ));
    let rss_before = rss_kib(proxy.pid());
    let client = client();
    let n = 12;
    let mut tasks = Vec::new();
    for i in 0..n {
        let big = i % 3 == 0;
        let content = if big {
            "word ".repeat(16 * 1024)
        } else {
            format!("short question {i}")
        };
        let body = json!({"model": MODEL, "stream": true, "max_tokens": 2000, "ignore_eos": true,
            "messages": [{"role": "user", "content": content}]});
        let (client, url) = (client.clone(), proxy.url("/v1/chat/completions"));
        tasks.push(tokio::spawn(async move {
            let at = Instant::now();
            let mut r = client.post(url).json(&body).send().await.expect("send");
            let status = r.status().as_u16();
            let first = r.chunk().await.ok().flatten();
            // Dropping the response closes the connection mid-stream.
            let failure = match (&first, status) {
                (Some(c), 200) if c.starts_with(b"data: ") => None,
                _ => Some(format!("status {status}, first {first:?}")),
            };
            Sample {
                at,
                stream: usize::from(big),
                failure,
                endpoint: None,
                status,
            }
        }));
    }
    let mut samples = Vec::new();
    for t in tasks {
        samples.push(t.await.expect("client"));
    }
    let tally = Tally::of(&samples);
    assert_eq!(tally.failed, 0, "{}", tally.text());
    eventually(
        "every simulator request aborted",
        Duration::from_secs(20),
        async || {
            let stats: Vec<_> = sims.iter().map(|s| s.stats()).collect();
            let aborted: u64 = stats.iter().map(|s| s.requests_aborted).sum();
            let busy: usize = stats.iter().map(|s| s.running + s.waiting).sum();
            if aborted == n as u64 && busy == 0 {
                Ok(())
            } else {
                Err(format!("aborted {aborted}, running+waiting {busy}"))
            }
        },
    )
    .await;
    let served: u64 = sims.iter().map(|s| s.stats().requests_served).sum();
    assert_eq!(served, 0, "no stream ran to its end");
    let settled = assert_settled(&proxy, &all).await;
    report(
        "clients_disconnect_mid_stream",
        &tally,
        rss_before,
        &settled,
        &format!("{n} streams abandoned after the first event, {n} aborted at the simulators"),
    );
}

/// One round of hostile input for the soak: 32 connections that declare a 4 MiB body and send a
/// few bytes (cut by the body deadline), and 200 requests with unique ~8 KiB prompts through the
/// `prefix_cache` pool (the simulators answer 404 for its model; the prefix index records them
/// anyway). Takes about 3 s.
async fn hostile_input(proxy: &Proxy, round: usize) {
    let addr = proxy.addr;
    let idle = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let held: Vec<std::net::TcpStream> = (0..32)
            .filter_map(|_| {
                let mut s = std::net::TcpStream::connect(addr).ok()?;
                let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: llm-lb\r\nContent-Type: application/json\r\nContent-Length: 4194304\r\n\r\n{\"model\":";
                s.write_all(head.as_bytes()).ok()?;
                Some(s)
            })
            .collect();
        std::thread::sleep(Duration::from_millis(2500));
        drop(held);
    });
    let client = client();
    let url = proxy.url("/v1/chat/completions");
    let flood: Vec<_> = (0..200)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            let text = format!("round {round} prompt {i} ").repeat(400);
            tokio::spawn(async move {
                let body =
                    json!({"model": "hostile", "messages": [{"role": "user", "content": text}]});
                let _ = client.post(url).json(&body).send().await;
            })
        })
        .collect();
    for f in flood {
        let _ = f.await;
    }
    let _ = idle.await;
}

/// Long variant: minutes of load through `global_least_request` over four simulators while a
/// fault rotates every few seconds (backend killed and restarted, hang, fast 500s, clients
/// abandoning streams), and hostile input every round: connections that declare a large body
/// and send almost nothing, and a flood of unique prompts through a `prefix_cache` pool. Asserts
/// the proxy settles after every round and its RSS after the run stays near its RSS after
/// warm-up. `SOAK_SECS` (default 120) sets the length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: scripts/soak.sh"]
async fn soak() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let base = SimConfig {
        model: MODEL.to_string(),
        time_scale: 1.0,
        itl_ms: 5.0,
        prefill_ms_per_token: 0.001,
        ..SimConfig::default()
    };
    let mut sims: Vec<Option<SimHandle>> = sim_fleet(4, base.clone())
        .await
        .into_iter()
        .map(Some)
        .collect();
    let all: Vec<SocketAddr> = sims.iter().flatten().map(SimHandle::addr).collect();
    let proxy = Proxy::start(&format!(
        "body_timeout_ms: 2000\n{}",
        conf(
            1000,
            &format!(
                "{}{}",
                pool_yaml(
                    "hostile",
                    "[\"hostile\"]",
                    &all,
                    "prefix_cache",
                    "    health_check: {interval_ms: 500}\n",
                ),
                pool_yaml(
                    "sim",
                    "[\"*\"]",
                    &all,
                    "global_least_request",
                    "    health_check: {interval_ms: 500}\n    outlier_detection: {consecutive_failures: 3, base_ejection_ms: 1000, max_ejection_ms: 4000}\n",
                )
            ),
        )
    ));
    let started = Instant::now();
    let mut total = Tally::default();
    let mut rss_warm = 0;
    let mut round = 0usize;
    while started.elapsed() < Duration::from_secs(secs) {
        let victim = (round + round / 4) % all.len();
        let load = Load::start(
            proxy.url("/v1/chat/completions"),
            8,
            100_000,
            0,
            sim_body(6),
        );
        load.wait_sent(50, Duration::from_secs(60)).await;
        let fault = round % 4;
        match fault {
            0 => {
                if let Some(s) = sims[victim].take() {
                    s.shutdown().await;
                }
            }
            1 => {
                if let Some(s) = &sims[victim] {
                    s.faults().set_hang(true);
                }
            }
            2 => {
                if let Some(s) = &sims[victim] {
                    s.faults().set_fail(1.0, 503).expect("faults");
                }
            }
            _ => {
                // Clients abandoning long streams.
                let client = client();
                for i in 0..8 {
                    let body = json!({"model": MODEL, "stream": true, "max_tokens": 500,
                        "ignore_eos": true, "messages": [{"role": "user", "content": format!("abandon {i}")}]});
                    if let Ok(mut r) = client
                        .post(proxy.url("/v1/chat/completions"))
                        .json(&body)
                        .send()
                        .await
                    {
                        let _ = r.chunk().await;
                    }
                }
            }
        }
        hostile_input(&proxy, round).await;
        let samples = load.stop().await;
        // Heal.
        match fault {
            0 => {
                let cfg = SimConfig {
                    seed: victim as u64,
                    ..base.clone()
                };
                sims[victim] = Some(
                    vllm_sim::spawn(cfg, all[victim])
                        .await
                        .expect("restart sim"),
                );
            }
            _ => {
                if let Some(s) = &sims[victim] {
                    s.faults().clear();
                }
            }
        }
        let t = Tally::of(&samples);
        total.sent += t.sent;
        total.succeeded += t.succeeded;
        total.failed += t.failed;
        for (k, v) in t.why {
            *total.why.entry(k).or_default() += v;
        }
        let settled = assert_settled(&proxy, &all).await;
        if round <= 1 {
            rss_warm = settled.rss_kib;
        }
        eprintln!(
            "[soak] round {round} fault {fault} on {}: rss {} KiB, {} sockets, total {}",
            all[victim],
            settled.rss_kib,
            settled.sockets,
            total.text()
        );
        round += 1;
    }
    let rss_end = rss_kib(proxy.pid());
    eprintln!(
        "[faults] soak {secs}s, {round} rounds: {} | rss after warm-up {rss_warm} KiB, at the end {rss_end} KiB",
        total.text()
    );
    // Generous: allocator caches and metric series grow a little, a leak per request would not.
    assert!(
        rss_end <= rss_warm + rss_warm / 2 + 16 * 1024,
        "RSS grew from {rss_warm} to {rss_end} KiB"
    );
    // Faults cost only requests that were on the faulty backend: a small share.
    assert!(total.failed * 10 <= total.sent, "{}", total.text());
}
