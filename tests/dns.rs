//! DNS discovery: an endpoint written as `host:port` follows the name's address set without a
//! restart. llm-lb runs in a private mount namespace whose `/etc/hosts` is a file this test
//! rewrites; the name resolves to several 127.x addresses, each with a backend on it.
//!
//! A private mount namespace needs root (CAP_SYS_ADMIN, as on the project's machines and in CI).
//! Without it the test says so and skips — except under CI (`CI` set), where it must run.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

const NAME: &str = "vllm.llm-lb.test";

fn hosts(file: &std::path::Path, addrs: &[&str]) {
    let mut text = String::from("127.0.0.1 localhost\n");
    for a in addrs {
        text.push_str(&format!("{a} {NAME}\n"));
    }
    // In place (same inode): the bind mount keeps pointing at this file.
    std::fs::write(file, text).expect("write hosts");
}

async fn endpoints_of(proxy: &Proxy, n: usize) -> BTreeSet<String> {
    let client = reqwest::Client::new();
    let mut seen = BTreeSet::new();
    for i in 0..n {
        let r = client
            .post(proxy.url("/v1/chat/completions"))
            .json(&serde_json::json!({"model": "m",
                "messages": [{"role": "user", "content": format!("hello {i}")}]}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 200);
        let e = r.headers()["x-llm-lb-endpoint"].to_str().expect("header");
        seen.insert(e.to_owned());
    }
    seen
}

/// Whether this process may create a mount namespace (`unshare --mount`); why not if it may not.
fn mount_namespaces() -> Result<(), String> {
    let out = std::process::Command::new("unshare")
        .args(["--mount", "true"])
        .output()
        .map_err(|e| format!("cannot run unshare: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_endpoint_follows_its_address_set() {
    if let Err(why) = mount_namespaces() {
        assert!(
            std::env::var_os("CI").is_none(),
            "tests/dns.rs needs mount namespaces (root) under CI: {why}"
        );
        eprintln!("SKIPPED a_host_name_endpoint_follows_its_address_set: it needs a private mount namespace (run as root): {why}");
        return;
    }
    let first = Backend::start_at("127.0.0.11:0").await;
    let port = first.addr.port();
    let b = [
        first,
        Backend::start_at(&format!("127.0.0.12:{port}")).await,
        Backend::start_at(&format!("127.0.0.13:{port}")).await,
    ];
    let at = |i: usize| -> String { b[i].addr.to_string() };
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("hosts");
    hosts(&file, &["127.0.0.11", "127.0.0.12"]);
    let proxy = Proxy::start_with_hosts(
        &format!(
            "expose_endpoint_header: true\ndns_refresh_ms: 200\npools:\n  - name: main\n    models: ['*']\n    endpoints: ['{NAME}:{port}']\n    lb_policy: round_robin\n"
        ),
        &file,
    );
    assert_eq!(
        endpoints_of(&proxy, 10).await,
        BTreeSet::from([at(0), at(1)])
    );
    proxy
        .wait_metric("llmlb_pool_endpoints", &[("pool", "main")], 2.0)
        .await;

    // A request in flight on .11 when .11 leaves: it finishes there.
    let held = {
        let url = proxy.url("/v1/chat/completions");
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .json(&serde_json::json!({"model": "m", "hold": true,
                    "messages": [{"role": "user", "content": "held"}]}))
                .send()
                .await
        })
    };
    while b[0].active() + b[1].active() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // .11 leaves, .13 joins.
    hosts(&file, &["127.0.0.12", "127.0.0.13"]);
    proxy.wait_metric("llmlb_config_generation", &[], 2.0).await;
    assert_eq!(
        endpoints_of(&proxy, 10).await,
        BTreeSet::from([at(1), at(2)])
    );
    for backend in &b {
        backend.release_held(1);
    }
    let held = held.await.expect("join").expect("held request");
    assert_eq!(held.status().as_u16(), 200);

    // The name stops resolving: the last addresses are kept (a DNS failure never empties a pool).
    hosts(&file, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while proxy
        .metric(
            "llmlb_dns_lookups_total",
            &[("name", &format!("{NAME}:{port}")), ("result", "error")],
        )
        .await
        .is_none()
    {
        assert!(std::time::Instant::now() < deadline, "{}", proxy.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        endpoints_of(&proxy, 6).await,
        BTreeSet::from([at(1), at(2)])
    );
    assert_eq!(
        proxy.metric("llmlb_config_generation", &[]).await,
        Some(2.0)
    );

    // It resolves again, to all three.
    hosts(&file, &["127.0.0.11", "127.0.0.12", "127.0.0.13"]);
    proxy.wait_metric("llmlb_config_generation", &[], 3.0).await;
    assert_eq!(
        endpoints_of(&proxy, 12).await,
        BTreeSet::from([at(0), at(1), at(2)])
    );
    assert!(
        proxy
            .log_text()
            .contains(&format!("endpoint name {NAME}:{port} resolves to")),
        "{}",
        proxy.log_text()
    );
}
