//! Live reload of the policy file (SIGHUP and `POST /-/reload`) under continuous load: new
//! requests follow the new file at once, requests in flight finish where they started, an invalid
//! file changes nothing, and in-flight counts carry over to the new routing table.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

fn file(endpoints: &[std::net::SocketAddr], policy: &str) -> String {
    format!(
        "expose_endpoint_header: true\npools:\n{}",
        pool_yaml("main", "[\"*\"]", endpoints, policy, "")
    )
}

fn held_chat() -> serde_json::Value {
    serde_json::json!({"model": "m", "hold": true,
        "messages": [{"role": "user", "content": "held across the reload"}]})
}

/// `(endpoint, policy)` pairs of the 200s sent at or after `from` and answered before `to`.
fn served(sent: &[Sent], from: Instant, to: Instant) -> BTreeSet<(String, String)> {
    sent.iter()
        .filter(|s| s.at >= from && s.done < to)
        .filter_map(|s| match &s.result {
            Ok((200, e, p)) => Some((e.clone(), p.clone())),
            _ => None,
        })
        .collect()
}

async fn admin_reload(proxy: &Proxy) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{}/-/reload", proxy.admin))
        .send()
        .await
        .expect("reload");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json verdict"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_follows_the_new_file_and_rejects_an_invalid_one() {
    let b = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let a: Vec<_> = b.iter().map(|b| b.addr).collect();
    let proxy = Proxy::start(&file(&a[..2], "round_robin"));
    let url = proxy.url("/v1/chat/completions");

    // A request in flight on an endpoint that the reload removes.
    let client = reqwest::Client::new();
    let held = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { client.post(&url).json(&held_chat()).send().await })
    };
    while b[0].active() + b[1].active() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let load = Load::start(&url, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. SIGHUP: other endpoints and another policy.
    proxy.write_policy(&file(&a[1..], "prefix_cache"));
    let hup = Instant::now();
    proxy.signal("HUP");
    proxy.wait_metric("llmlb_config_generation", &[], 2.0).await;
    let second = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 2. An invalid file: rejected, logged, counted; generation 2 stays in force.
    proxy.write_policy(&file(&a, "fastest"));
    proxy.signal("HUP");
    proxy
        .wait_metric(
            "llmlb_config_reloads_total",
            &[("trigger", "sighup"), ("result", "invalid")],
            1.0,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 3. The admin endpoint: back to the first endpoint only.
    proxy.write_policy(&file(&a[..1], "round_robin"));
    let asked = Instant::now();
    let (status, verdict) = admin_reload(&proxy).await;
    assert_eq!(
        (status, &verdict["generation"]),
        (200, &serde_json::json!(3))
    );
    let third = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 4. The admin endpoint with an invalid file: 400 naming the field; nothing changes.
    proxy.write_policy(&file(&a, "fastest"));
    let (status, verdict) = admin_reload(&proxy).await;
    assert_eq!(status, 400, "{verdict}");
    let error = verdict["error"].as_str().unwrap_or_default();
    assert!(error.contains("pools[0].lb_policy"), "{error}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = load.finish().await;
    let end = Instant::now();

    // The held request finishes on the endpoint it started on, removed since.
    for backend in &b {
        backend.release_held(1);
    }
    let held = held.await.expect("join").expect("held request");
    assert_eq!(held.status().as_u16(), 200);

    let failed = failures(&sent);
    eprintln!(
        "reload under load: {} requests, {} failed",
        sent.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    let (e0, e1, e2) = (a[0].to_string(), a[1].to_string(), a[2].to_string());
    let rr = "round_robin".to_string();
    let pc = "prefix_cache".to_string();
    let first_phase = served(&sent, Instant::now() - Duration::from_secs(3600), hup);
    assert_eq!(
        first_phase,
        BTreeSet::from([(e0.clone(), rr.clone()), (e1.clone(), rr.clone())])
    );
    let second_phase = served(&sent, second, asked);
    assert!(
        !second_phase.is_empty()
            && second_phase
                .iter()
                .all(|(e, p)| (*e == e1 || *e == e2) && *p == pc),
        "generation 2 (also while the invalid file was rejected): {second_phase:?}"
    );
    assert_eq!(served(&sent, third, end), BTreeSet::from([(e0, rr)]));
    let log = proxy.log_text();
    assert!(
        log.contains("rejected, the running configuration stays"),
        "{log}"
    );
    assert_eq!(
        proxy
            .metric(
                "llmlb_config_reloads_total",
                &[("trigger", "admin"), ("result", "invalid")]
            )
            .await,
        Some(1.0)
    );
    // Nothing left in flight; endpoints that left the pool lose their gauges.
    proxy
        .wait_metric(
            "llmlb_endpoint_inflight",
            &[("endpoint", &a[0].to_string())],
            0.0,
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy
        .metric(
            "llmlb_endpoint_inflight",
            &[("endpoint", &a[2].to_string())],
        )
        .await
        .is_some()
    {
        assert!(Instant::now() < deadline, "{}", proxy.metrics().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_carry_over_a_reload_and_retired_counts_drain() {
    let b = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let a: Vec<_> = b.iter().map(|b| b.addr).collect();
    let proxy = Proxy::start(&file(&a[..2], "global_least_request"));
    let url = proxy.url("/v1/chat/completions");
    let client = reqwest::Client::new();
    let send_held = |n: usize| {
        (0..n)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move { client.post(&url).json(&held_chat()).send().await })
            })
            .collect::<Vec<_>>()
    };
    let wait_active = |want: [i64; 3]| {
        let b = &b;
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let got = [b[0].active(), b[1].active(), b[2].active()];
                if got == want {
                    return;
                }
                assert!(Instant::now() < deadline, "active {got:?}, want {want:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let mut held = send_held(4);
    wait_active([2, 2, 0]).await;

    // Same pool, same (embedded) store, endpoints [1, 2]: the counts carry over, so endpoint 1's
    // two requests from generation 1 still count and both new requests go to endpoint 2.
    proxy.write_policy(&file(&a[1..], "global_least_request"));
    let (status, verdict) = admin_reload(&proxy).await;
    assert_eq!(status, 200, "{verdict}");
    held.extend(send_held(2));
    wait_active([2, 2, 2]).await;

    // A pool of another name: the old counts retire. They drain, then withdraw.
    proxy.write_policy(&format!(
        "pools:\n{}",
        pool_yaml("other", "[\"*\"]", &a[2..], "global_least_request", "")
    ));
    let (status, verdict) = admin_reload(&proxy).await;
    assert_eq!(status, 200, "{verdict}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !proxy.log_text().contains("pool main: withdrawn"),
        "withdrawn while 6 requests are held"
    );
    for backend in &b {
        backend.release_held(2);
    }
    for h in held {
        let r = h.await.expect("join").expect("held request");
        assert_eq!(r.status().as_u16(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proxy
        .log_text()
        .contains("pool main: withdrawn from the state store")
    {
        assert!(Instant::now() < deadline, "{}", proxy.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The new pool's counts are exact: a fresh request sees nothing in flight.
    let r = client
        .post(&url)
        .json(&chat_body_json("after"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    proxy
        .wait_metric(
            "llmlb_endpoint_inflight_global",
            &[("pool", "other"), ("endpoint", &a[2].to_string())],
            0.0,
        )
        .await;
}

fn chat_body_json(text: &str) -> serde_json::Value {
    serde_json::json!({"model": "m", "messages": [{"role": "user", "content": text}]})
}
