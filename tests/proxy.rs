//! The proxy core end to end: real `llm-lb` process, real backends, real HTTP clients.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

const MODEL: &str = "test-model";

fn one_pool(backends: &[&Backend], extra_pool: &str) -> String {
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    format!(
        "pools:\n{}",
        pool_yaml("main", "[\"*\"]", &addrs, "round_robin", extra_pool)
    )
}

fn h1() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .build()
        .expect("client")
}

fn h2c() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client")
}

async fn post(client: &reqwest::Client, url: &str, body: Vec<u8>) -> (u16, String) {
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    (status, r.text().await.expect("text"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_arrive_byte_exact_over_h1_and_h2c() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&format!("max_body_bytes: 4194304\n{}", one_pool(&[&b], "")));
    let url = proxy.url("/v1/chat/completions");
    let mut expected = Vec::new();
    for (name, client) in [("h1", h1()), ("h2c", h2c())] {
        for size in [10 * 1024, 200 * 1024, 1024 * 1024, 3 * 1024 * 1024] {
            let body = chat_body(MODEL, size, false);
            let sha = sha256_hex(&body);
            let (status, text) = post(&client, &url, body.clone()).await;
            assert_eq!(status, 200, "{name} {size}: {text}");
            let v: serde_json::Value = serde_json::from_str(&text).expect("json");
            assert_eq!(v["received_sha256"], sha.as_str(), "{name} {size}");
            expected.push((sha, body.len()));
        }
    }
    let seen = b.seen();
    assert_eq!(seen.len(), expected.len());
    for (s, (sha, len)) in seen.iter().zip(&expected) {
        assert_eq!(&s.body_sha256, sha);
        assert_eq!(
            s.content_length.as_deref(),
            Some(len.to_string().as_str()),
            "Content-Length kept"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_is_413_without_reading_the_body() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&format!("max_body_bytes: 100000\n{}", one_pool(&[&b], "")));
    // Declared too large: answered from the header alone (the body is never sent).
    let head = raw_exchange(
        proxy.addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n{\"model\":",
        Duration::from_secs(10),
    );
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    // Chunked with no length: stopped as soon as it passes the limit.
    let mut s = TcpStream::connect(proxy.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .expect("w");
    let chunk = vec![b'x'; 60000];
    for _ in 0..2 {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .expect("w");
        s.write_all(&chunk).expect("w");
        s.write_all(b"\r\n").expect("w");
    }
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    // Error bodies are OpenAI-shaped.
    let r = h1()
        .post(proxy.url("/v1/chat/completions"))
        .body(vec![b'{'; 100001])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 413);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "request_too_large");
    assert_eq!(b.count(), 0, "nothing reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&one_pool(&[&b], ""));
    let body = chat_body(MODEL, 100, false);
    let mut s = TcpStream::connect(proxy.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .expect("w");
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 100"), "{head}");
    s.write_all(&body).expect("w");
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = b.seen();
    assert_eq!(seen[0].body_sha256, sha256_hex(&body));
    assert_eq!(
        seen[0].expect, None,
        "Expect is not forwarded: the body was already read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_first_chunk_arrives_before_the_backend_finishes() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&format!("max_body_bytes: 4194304\n{}", one_pool(&[&b], "")));
    // Both a small body (Pingora's own replay) and a large one (the subrequest path).
    for (i, size) in [100usize, 300 * 1024].into_iter().enumerate() {
        for client in [h1(), h2c()] {
            let resp = client
                .post(proxy.url("/v1/chat/completions"))
                .body(chat_body(MODEL, size, true))
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status().as_u16(), 200);
            assert_eq!(
                resp.headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok()),
                Some("text/event-stream")
            );
            let mut stream = resp.bytes_stream();
            let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("first chunk in time")
                .expect("some")
                .expect("ok");
            assert!(String::from_utf8_lossy(&first).contains("\"n\":0"));
            let finished_before = b.state.sse_finished.load(Ordering::SeqCst);
            assert!(
                finished_before <= i * 2 + 1,
                "the backend has not finished this stream yet"
            );
            b.state.sse_gate.add_permits(3);
            let mut rest = Vec::new();
            while let Some(chunk) = stream.next().await {
                rest.extend_from_slice(&chunk.expect("chunk"));
            }
            assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_aborts_the_upstream_stream() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&format!("max_body_bytes: 4194304\n{}", one_pool(&[&b], "")));
    for size in [100usize, 300 * 1024] {
        let dropped = b.state.sse_dropped.load(Ordering::SeqCst);
        let resp = h1()
            .post(proxy.url("/v1/chat/completions"))
            .body(chat_body_with(MODEL, size, true, true))
            .send()
            .await
            .expect("send");
        let mut stream = resp.bytes_stream();
        let _ = stream.next().await;
        drop(stream); // client goes away mid-stream
        let deadline = Instant::now() + Duration::from_secs(8);
        while b.state.sse_dropped.load(Ordering::SeqCst) == dropped && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            b.state.sse_dropped.load(Ordering::SeqCst),
            dropped + 1,
            "upstream stream aborted ({size})"
        );
    }
    assert_eq!(b.state.sse_finished.load(Ordering::SeqCst), 0);
    wait_inflight_zero(&proxy).await;
}

async fn wait_inflight_zero(proxy: &Proxy) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = proxy.metrics().await;
        let total: f64 = text
            .lines()
            .filter(|l| l.starts_with("llmlb_endpoint_inflight{"))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum();
        if total == 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "in-flight counts did not return to 0:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodyless_and_non_json_requests_are_proxied() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&one_pool(&[&b], ""));
    let client = h1();
    let get = tokio::time::timeout(
        Duration::from_secs(5),
        client.get(proxy.url("/v1/models")).send(),
    )
    .await
    .expect("not held")
    .expect("send");
    assert_eq!(get.status().as_u16(), 200);
    let (status, _) = post(
        &client,
        &proxy.url("/v1/whatever"),
        b"this is not json".to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    // JSON without a prompt (a chat without messages; embeddings are routed by load instead).
    let (status, _) = post(
        &client,
        &proxy.url("/v1/chat/completions"),
        br#"{"model":"m","input":"x"}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    let r = client
        .post(proxy.url("/v1/chat/completions"))
        .header("content-length", "0")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    let seen = b.seen();
    assert_eq!(seen.len(), 4);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", "/v1/models")
    );
    assert_eq!(seen[1].body_sha256, sha256_hex(b"this is not json"));
    let m = proxy.metrics().await;
    for reason in ["no_body", "not_json", "no_prompt"] {
        assert!(
            parse_metric(&m, "llmlb_fallback_total", &[("reason", reason)]).unwrap_or(0.0) >= 1.0,
            "{reason} counted:\n{m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_route_to_pools_and_unknown_models_get_404() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let proxy = Proxy::start(&format!(
        "pools:\n{}{}",
        pool_yaml("alpha", "[alpha-model]", &[a.addr], "round_robin", ""),
        pool_yaml("beta", "[beta-model, other]", &[b.addr], "random", "")
    ));
    let c = h1();
    for (model, want_a, want_b) in [("alpha-model", 1, 0), ("beta-model", 1, 1), ("other", 1, 2)] {
        let (status, _) = post(
            &c,
            &proxy.url("/v1/chat/completions"),
            chat_body(model, 10, false),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!((a.count(), b.count()), (want_a, want_b), "{model}");
    }
    let r = c
        .post(proxy.url("/v1/chat/completions"))
        .body(chat_body("nobody-serves-this", 10, false))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 404);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("nobody-serves-this"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly_and_logs_each_request() {
    let bs = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let proxy = Proxy::start(&one_pool(&[&bs[0], &bs[1], &bs[2]], ""));
    let c = h1();
    for _ in 0..30 {
        let (status, _) = post(
            &c,
            &proxy.url("/v1/chat/completions"),
            chat_body(MODEL, 50, false),
        )
        .await;
        assert_eq!(status, 200);
    }
    assert_eq!(
        bs.iter().map(Backend::count).collect::<Vec<_>>(),
        vec![10, 10, 10]
    );
    let lines = proxy.wait_access_lines(30).await;
    assert_eq!(lines.len(), 30, "{}", proxy.log_text());
    let l = &lines[0];
    for field in [
        "method=POST",
        "path=/v1/chat/completions",
        "model=test-model",
        "pool=main",
        "policy=round_robin",
        "status=200",
        "attempts=1",
        "duration_ms=",
        "req_bytes=",
        "resp_bytes=",
    ] {
        assert!(l.contains(field), "{field} missing in {l}");
    }
    assert!(
        bs.iter()
            .any(|b| l.contains(&format!("endpoint={}", b.addr))),
        "{l}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_endpoint_is_retried_then_marked_unhealthy_and_skipped() {
    let live = [Backend::start().await, Backend::start().await];
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let proxy = Proxy::start(&format!(
        "max_body_bytes: 4194304\npools:\n{}",
        pool_yaml(
            "main",
            "[\"*\"]",
            &[live[0].addr, dead, live[1].addr],
            "round_robin",
            "    health_check: {path: /health, interval_ms: 200, timeout_ms: 200, unhealthy_threshold: 2}\n"
        )
    ));
    let c = h1();
    // Small and large bodies: both survive a connect failure on the first pick.
    for i in 0..30 {
        let size = if i % 3 == 0 { 200 * 1024 } else { 100 };
        let body = chat_body(MODEL, size, false);
        let sha = sha256_hex(&body);
        let (status, text) = post(&c, &proxy.url("/v1/chat/completions"), body).await;
        assert_eq!(status, 200, "request {i}: {text}");
        assert!(text.contains(&sha), "byte-exact after retry");
    }
    // The health check marks the dead endpoint unhealthy ...
    wait_metric(&proxy, "llmlb_endpoint_healthy", &dead.to_string(), 0.0).await;
    assert!(proxy
        .log_text()
        .contains(&format!("endpoint {dead} is unhealthy")));
    // ... after which it is not even tried.
    let retries_before = proxy
        .metric("llmlb_retries_total", &[("pool", "main")])
        .await
        .unwrap_or(0.0);
    for _ in 0..20 {
        let (status, _) = post(
            &c,
            &proxy.url("/v1/chat/completions"),
            chat_body(MODEL, 100, false),
        )
        .await;
        assert_eq!(status, 200);
    }
    let retries_after = proxy
        .metric("llmlb_retries_total", &[("pool", "main")])
        .await
        .unwrap_or(0.0);
    assert_eq!(
        retries_before, retries_after,
        "no attempt went to the unhealthy endpoint"
    );
    assert!(retries_before >= 1.0, "the connect failures were retried");
    assert_eq!(live[0].count() + live[1].count(), 50);
    wait_inflight_zero(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_endpoint_comes_back() {
    let bs = [Backend::start().await, Backend::start().await];
    let proxy = Proxy::start(&one_pool(
        &[&bs[0], &bs[1]],
        "    health_check: {path: /health, interval_ms: 100, timeout_ms: 200, unhealthy_threshold: 1, healthy_threshold: 1}\n",
    ));
    bs[0].state.unhealthy.store(true, Ordering::SeqCst);
    let label = bs[0].addr.to_string();
    wait_metric(&proxy, "llmlb_endpoint_healthy", &label, 0.0).await;
    let c = h1();
    for _ in 0..10 {
        post(
            &c,
            &proxy.url("/v1/chat/completions"),
            chat_body(MODEL, 10, false),
        )
        .await;
    }
    assert_eq!((bs[0].count(), bs[1].count()), (0, 10));
    bs[0].state.unhealthy.store(false, Ordering::SeqCst);
    wait_metric(&proxy, "llmlb_endpoint_healthy", &label, 1.0).await;
    for _ in 0..10 {
        post(
            &c,
            &proxy.url("/v1/chat/completions"),
            chat_body(MODEL, 10, false),
        )
        .await;
    }
    assert_eq!(bs[0].count(), 5);
}

async fn wait_metric(proxy: &Proxy, name: &str, endpoint: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.metric(name, &[("endpoint", endpoint)]).await != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{name}{{endpoint={endpoint}}} never became {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_can_serve_gives_a_clear_json_error() {
    let dead1: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let dead2: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let proxy = Proxy::start(&format!(
        "pools:\n{}",
        pool_yaml(
            "main",
            "[\"*\"]",
            &[dead1, dead2],
            "round_robin",
            "    health_check: {enabled: false}\n"
        )
    ));
    for size in [100, 200 * 1024] {
        let r = h1()
            .post(proxy.url("/v1/chat/completions"))
            .body(chat_body(MODEL, size, false))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 502, "{size}");
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["error"]["type"], "server_error", "{v}");
    }
    let lines = proxy.wait_access_lines(2).await;
    assert_eq!(
        lines.len(),
        2,
        "one access line per request:\n{}",
        proxy.log_text()
    );
    assert!(
        lines
            .iter()
            .all(|l| l.contains("attempts=2") && l.contains("status=502")),
        "{lines:?}"
    );
    wait_inflight_zero(&proxy).await;
}

/// A raw HTTP/1.1 backend that answers the first request of each connection with keep-alive, then
/// reads the next request on that connection and closes it unanswered: the race of a pooled
/// connection that the server closes just as the proxy reuses it.
fn start_closing_keepalive_backend() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>)
{
    use std::io::{BufRead, BufReader, Read};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                for nth in 0.. {
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() || nth > 0 {
                        return; // second request on this connection: close unanswered
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let reply = format!("{{\"received_sha256\":\"{}\"}}", sha256_hex(&body));
                    let _ = conn.write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: keep-alive\r\n\r\n{reply}",
                            reply.len()
                        )
                        .as_bytes(),
                    );
                }
            });
        }
    });
    (addr, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_keepalive_connections_are_retried_on_the_same_endpoint() {
    let (a, served_a) = start_closing_keepalive_backend();
    let b = Backend::start().await;
    let proxy = Proxy::start(&format!(
        "max_body_bytes: 4194304\npools:\n{}",
        pool_yaml(
            "main",
            "[\"*\"]",
            &[a, b.addr],
            "round_robin",
            "    health_check: {enabled: false}\n"
        )
    ));
    let c = h1();
    // `a` sees small, small, large, large, small, small: every second one of its requests reuses
    // the previous one's pooled connection (a reconnect is not pooled for reuse) and meets a close.
    for i in 0..12 {
        let size = if i % 8 < 4 { 100 } else { 200 * 1024 };
        let body = chat_body(MODEL, size, false);
        let sha = sha256_hex(&body);
        let (status, text) = post(&c, &proxy.url("/v1/chat/completions"), body).await;
        assert_eq!(status, 200, "request {i}: {text}\n{}", proxy.log_text());
        assert!(text.contains(&sha), "byte-exact after the reconnect");
    }
    // Round robin alternates, and a stale connection does not move a request: six each.
    assert_eq!(served_a.load(Ordering::SeqCst), 6, "{}", proxy.log_text());
    assert_eq!(b.count(), 6);
    let metric = |name: &'static str| {
        let proxy = &proxy;
        async move {
            proxy
                .metric(name, &[("pool", "main")])
                .await
                .unwrap_or(-1.0)
        }
    };
    assert_eq!(metric("llmlb_retries_total").await, 0.0, "nothing moved");
    let reconnects = metric("llmlb_upstream_reconnects_total").await;
    assert!(reconnects >= 2.0, "stale connections met: {reconnects}");
    let lines = proxy.access_lines();
    assert!(
        lines.iter().all(|l| l.contains("attempts=1 ")),
        "{lines:#?}"
    );
    let a_label = format!("endpoint={a} ");
    // Large bodies are proxied by a subrequest (`Role::Parent`), small ones directly.
    for (body, large) in [("small", false), ("large", true)] {
        assert!(
            lines.iter().any(|l| l.contains(&a_label)
                && l.contains("reconnects=1 ")
                && l.contains("req_bytes=204946 ") == large),
            "a {body} body was sent again to {a} over a fresh connection:\n{}",
            lines.join("\n")
        );
    }
    wait_inflight_zero(&proxy).await;
}

/// With one endpoint there is nowhere else to go: a stale connection used to end in 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_keepalive_connection_to_the_only_endpoint_does_not_fail() {
    let (a, served_a) = start_closing_keepalive_backend();
    let proxy = Proxy::start(&format!(
        "pools:\n{}",
        pool_yaml(
            "main",
            "[\"*\"]",
            &[a],
            "round_robin",
            "    health_check: {enabled: false}\n"
        )
    ));
    let c = h1();
    for i in 0..4 {
        let (status, text) = post(
            &c,
            &proxy.url("/v1/chat/completions"),
            chat_body(MODEL, 100, false),
        )
        .await;
        assert_eq!(status, 200, "request {i}: {text}\n{}", proxy.log_text());
    }
    assert_eq!(served_a.load(Ordering::SeqCst), 4);
    let lines = proxy.access_lines();
    let reconnected = lines.iter().filter(|l| l.contains("reconnects=1 ")).count();
    // Requests 2 and 4 reuse the connection of 1 and 3; the fresh ones are not pooled for reuse.
    assert!(
        reconnected >= 1,
        "stale connections were met:\n{}",
        lines.join("\n")
    );
    assert!(lines
        .iter()
        .all(|l| l.contains("attempts=1 ") && l.contains("status=200")));
}
