//! Fault injection through `/admin/faults` and the library handle, and stopping a server.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use vllm_sim::{Faults, SimConfig};

async fn admin(
    sim: &vllm_sim::SimHandle,
    method: reqwest::Method,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client().request(method, format!("{}/admin/faults", sim.url()));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn admin_endpoint_sets_error_rate_and_status() {
    let sim = start(instant("m")).await;
    let (s, v) = admin(&sim, reqwest::Method::GET, None).await;
    assert_eq!(s, 200);
    assert_eq!(v["fail_rate"], 0.0);
    assert_eq!(v["health_status"], 200);
    let (s, v) = admin(
        &sim,
        reqwest::Method::PUT,
        Some(json!({"fail_rate": 1.0, "fail_status": 503})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["fail_status"], 503);
    let (s, v) = post(
        &sim,
        "/v1/chat/completions",
        &chat("m", &[("user", "hi")], 2),
    )
    .await;
    assert_eq!(s, 503);
    assert_eq!(v["error"]["code"], 503);
    assert_eq!(sim.stats().requests_failed, 1);
    // Bad values and unknown fields are refused.
    let (s, _) = admin(&sim, reqwest::Method::POST, Some(json!({"fail_rate": 3}))).await;
    assert_eq!(s, 400);
    let (s, _) = admin(&sim, reqwest::Method::POST, Some(json!({"typo": 1}))).await;
    assert_eq!(s, 400);
    // About half fail at rate 0.5.
    admin(
        &sim,
        reqwest::Method::POST,
        Some(json!({"fail_rate": 0.5, "fail_status": 429})),
    )
    .await;
    let mut failed = 0;
    for _ in 0..200 {
        let (s, _) = post(
            &sim,
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": 1}),
        )
        .await;
        match s {
            429 => failed += 1,
            200 => {}
            other => panic!("status {other}"),
        }
    }
    assert!((50..150).contains(&failed), "{failed}");
    let (s, v) = admin(&sim, reqwest::Method::DELETE, None).await;
    assert_eq!(s, 200);
    assert_eq!(v["fail_rate"], 0.0);
    let (s, _) = post(
        &sim,
        "/v1/chat/completions",
        &chat("m", &[("user", "hi")], 2),
    )
    .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn start_up_fail_rate_applies() {
    let sim = start(SimConfig {
        fail_rate: 1.0,
        fail_status: 500,
        ..instant("m")
    })
    .await;
    let (s, v) = post(&sim, "/v1/completions", &json!({"prompt": "x"})).await;
    assert_eq!(s, 500);
    assert_eq!(v["error"]["type"], "InternalServerError");
    // Metrics and health are not affected.
    assert_eq!(get(&sim, "/health").await.0, 200);
    assert_eq!(get(&sim, "/metrics").await.0, 200);
}

#[tokio::test]
async fn hang_stalls_the_engine_until_cleared() {
    let sim = start(SimConfig {
        model: "m".into(),
        itl_ms: 5.0,
        ..SimConfig::default()
    })
    .await;
    // An in-flight stream.
    let mut body = chat("m", &[("user", "x")], 2000);
    body["stream"] = json!(true);
    let resp = client()
        .post(format!("{}/v1/chat/completions", sim.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut s = resp.bytes_stream();
    assert!(s.next().await.unwrap().is_ok());
    sim.faults().set_hang(true);
    // Drain what the last step produced, then nothing more arrives.
    let stalled = loop {
        match tokio::time::timeout(Duration::from_millis(300), s.next()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(other) => panic!("stream ended: {other:?}"),
            Err(_) => break true,
        }
    };
    assert!(stalled);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let url = format!("{}/v1/chat/completions", sim.url());
    assert!(impatient
        .post(&url)
        .json(&chat("m", &[("user", "x")], 1))
        .send()
        .await
        .is_err());
    assert!(impatient
        .get(format!("{}/health", sim.url()))
        .send()
        .await
        .is_err());
    assert!(impatient
        .get(format!("{}/v1/models", sim.url()))
        .send()
        .await
        .is_err());
    // A request sent now is queued (visible as waiting) and answered once the hang is lifted.
    let held = tokio::spawn({
        let url = url.clone();
        async move {
            let r = client()
                .post(url)
                .json(&chat("m", &[("user", "x")], 1))
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }
    });
    wait_until(10, "queued while hung", || sim.stats().waiting >= 1).await;
    assert!(!held.is_finished());
    assert_eq!(get(&sim, "/metrics").await.0, 200, "metrics stay available");
    let (st, v) = admin(&sim, reqwest::Method::PUT, Some(json!({"hang": false}))).await;
    assert_eq!((st, v["hang"].as_bool()), (200, Some(false)));
    assert_eq!(held.await.unwrap(), 200);
    assert!(s.next().await.unwrap().is_ok(), "the stream resumes");
    assert_eq!(get(&sim, "/health").await.0, 200);
}

#[tokio::test]
async fn close_after_tokens_cuts_streams_and_json() {
    let sim = start(SimConfig {
        itl_ms: 5.0,
        ..instant("m")
    })
    .await;
    admin(
        &sim,
        reqwest::Method::PUT,
        Some(json!({"close_after_tokens": 3})),
    )
    .await;
    let mut body = chat("m", &[("user", "x")], 20);
    body["stream"] = json!(true);
    let resp = client()
        .post(format!("{}/v1/chat/completions", sim.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut s = resp.bytes_stream();
    let mut text = String::new();
    let mut error = false;
    while let Some(chunk) = s.next().await {
        match chunk {
            Ok(b) => text.push_str(std::str::from_utf8(&b).unwrap()),
            Err(_) => {
                error = true;
                break;
            }
        }
    }
    assert!(error, "the stream must end with a transport error");
    assert!(!text.contains("[DONE]"));
    let tokens = text.matches("\"content\":\"").count() - 1; // minus the role chunk
    assert_eq!(tokens, 3, "{text}");
    // JSON answers are cut before the body.
    let resp = client()
        .post(format!("{}/v1/chat/completions", sim.url()))
        .json(&chat("m", &[("user", "x")], 20))
        .send()
        .await;
    let failed = match resp {
        Err(_) => true,
        Ok(r) => r.bytes().await.is_err(),
    };
    assert!(failed);
    // Cleared with null.
    admin(
        &sim,
        reqwest::Method::PUT,
        Some(json!({"close_after_tokens": null})),
    )
    .await;
    let (s, _) = post(
        &sim,
        "/v1/chat/completions",
        &chat("m", &[("user", "x")], 20),
    )
    .await;
    assert_eq!(s, 200);
}

/// The body of a streamed response read to its end; whether the transport failed.
async fn read_stream(path: &str, sim: &vllm_sim::SimHandle, body: &Value) -> (String, bool) {
    let resp = client()
        .post(format!("{}{path}", sim.url()))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut s = resp.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = s.next().await {
        match chunk {
            Ok(b) => text.push_str(std::str::from_utf8(&b).unwrap()),
            Err(_) => return (text, true),
        }
    }
    (text, false)
}

#[tokio::test]
async fn close_after_tokens_cuts_the_responses_and_messages_streams() {
    // 20 tokens take 200 ms: the cut after 2 comes long before the end.
    let sim = start(SimConfig {
        time_scale: 1.0,
        itl_ms: 10.0,
        ..instant("m")
    })
    .await;
    sim.faults().set_close_after_tokens(Some(2));
    let (text, cut) = read_stream(
        "/v1/responses",
        &sim,
        &json!({"model": "m", "input": "x", "max_output_tokens": 20, "ignore_eos": true,
                "stream": true}),
    )
    .await;
    assert!(cut, "{text}");
    assert_eq!(
        text.matches("event: response.output_text.delta").count(),
        2,
        "{text}"
    );
    assert!(!text.contains("response.incomplete"));
    let (text, cut) = read_stream(
        "/v1/messages",
        &sim,
        &json!({"model": "m", "max_tokens": 20, "min_tokens": 20, "stream": true,
                "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert!(cut, "{text}");
    assert_eq!(
        text.matches("event: content_block_delta").count(),
        2,
        "{text}"
    );
    assert!(!text.contains("message_stop"));
    // A cut request is aborted, not served, and a response cut short is not stored.
    wait_until(5, "the cut requests aborted", || {
        sim.stats().requests_aborted == 2
    })
    .await;
    assert_eq!(sim.stats().requests_served, 0);
}

#[tokio::test]
async fn extra_latency_and_health_status() {
    let sim = start(instant("m")).await;
    sim.faults().set_extra_latency_ms(300.0);
    let t0 = Instant::now();
    let (s, _) = post(
        &sim,
        "/v1/chat/completions",
        &chat("m", &[("user", "x")], 1),
    )
    .await;
    assert_eq!(s, 200);
    assert!(t0.elapsed() >= Duration::from_millis(300));
    sim.faults().set_health_status(503);
    assert_eq!(get(&sim, "/health").await.0, 503);
    sim.faults().clear();
    assert_eq!(sim.faults().get(), Faults::default());
    assert_eq!(get(&sim, "/health").await.0, 200);
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server_and_its_connections() {
    let sim = start(SimConfig {
        model: "m".into(),
        itl_ms: 10.0,
        ..SimConfig::default()
    })
    .await;
    let addr = sim.addr();
    // A kept-alive connection and an in-flight stream.
    let keep = reqwest::Client::new();
    assert_eq!(
        keep.get(format!("http://{addr}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let mut body = chat("m", &[("user", "x")], 20_000);
    body["stream"] = json!(true);
    let resp = keep
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut s = resp.bytes_stream();
    assert!(s.next().await.unwrap().is_ok(), "streaming has started");
    drop(sim);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        let mut text = String::new();
        while let Some(Ok(b)) = s.next().await {
            text.push_str(std::str::from_utf8(&b).unwrap());
        }
        text
    })
    .await;
    let rest = ended.expect("the stream must end when the server stops");
    assert!(!rest.contains("[DONE]"));
    assert!(keep
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .is_err());
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn shutdown_waits_for_the_server_to_stop() {
    let sim = start(instant("m")).await;
    let addr = sim.addr();
    sim.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
