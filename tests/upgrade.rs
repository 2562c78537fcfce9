//! Zero-downtime binary upgrade (Pingora's `-u` + SIGQUIT) under continuous load: the new process
//! takes over the listening sockets, the old one finishes what it has (streams included) and exits,
//! and no request fails — clients keep their keep-alive connections.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_loses_nothing() {
    let backends = [Backend::start().await, Backend::start().await];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let mut old = Proxy::start(&format!(
        "pools:\n{}",
        pool_yaml("main", "[\"*\"]", &addrs, "prefix_cache", "")
    ));
    let url = old.url("/v1/chat/completions");
    let load = Load::start(&url, 4);
    // The old process serves a while first (how long the machine takes does not matter).
    old.wait_access_lines(51).await;
    // Two streams in flight on the old process across the handover.
    let client = reqwest::Client::new();
    let mut streams = Vec::new();
    for _ in 0..2 {
        let body = serde_json::json!({"model": "m", "stream": true, "hold": true,
            "messages": [{"role": "user", "content": "a long answer, please"}]});
        let mut r = client.post(&url).json(&body).send().await.expect("stream");
        assert_eq!(r.status().as_u16(), 200);
        let first = r.chunk().await.expect("first event").expect("not empty");
        assert!(first.starts_with(b"data: "), "{first:?}");
        streams.push(r);
    }
    let new = old.start_upgrade();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let quit_at = Instant::now();
    old.signal("QUIT");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for b in &backends {
        b.release_held(2);
    }
    for r in streams {
        let rest = r.text().await.expect("the stream completes");
        assert!(rest.contains("[DONE]"), "{rest}");
    }
    while !old.exited() {
        assert!(
            quit_at.elapsed() < Duration::from_secs(30),
            "the old process did not exit; log:\n{}",
            old.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let handed_over = quit_at.elapsed();
    // And the new one serves a while too.
    new.wait_access_lines(51).await;
    let sent = load.finish().await;
    let failed = failures(&sent);
    let ok = sent.len() - failed.len();
    let (served_old, served_new) = (old.access_lines().len(), new.access_lines().len());
    eprintln!(
        "upgrade: {ok} ok, {} failed; old served {served_old}, new served {served_new}; old exited {handed_over:?} after SIGQUIT",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}\nold log:\n{}\nnew log:\n{}",
        failed.len(),
        &failed[..failed.len().min(5)],
        old.log_text(),
        new.log_text()
    );
    assert!(
        served_old > 50 && served_new > 50,
        "{served_old} / {served_new}"
    );
    // The new process answers on the same addresses, admin included.
    let metrics = new.metrics().await;
    assert!(metrics.contains("llmlb_requests_total"), "{metrics}");
}
