//! Idle keep-alive connections are closed by the server, as uvicorn and llama.cpp do. The
//! client is a raw `TcpStream`, so nothing client-side hides the close. The checks are
//! "closed eventually, within a generous bound" and "still open well before the timeout",
//! never exact durations.

mod common;

use std::time::Duration;

use common::start;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vllm_sim::{SimConfig, SimHandle};

/// Far beyond any timeout used here: a close must come before this.
const CLOSE_BOUND: Duration = Duration::from_secs(10);

/// One raw HTTP/1.1 connection and the bytes read but not yet consumed.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A response as read off the wire.
struct Resp {
    status: u16,
    body: String,
}

impl Conn {
    async fn open(sim: &SimHandle) -> Conn {
        Conn {
            stream: TcpStream::connect(sim.addr()).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    /// Writes `bytes` as they are (a request or a piece of one).
    async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Reads more bytes; panics at EOF or after `CLOSE_BOUND`.
    async fn fill(&mut self) {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(CLOSE_BOUND, self.stream.read(&mut chunk))
            .await
            .expect("response within the bound")
            .expect("read");
        assert!(n > 0, "server closed the connection mid-response");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Takes everything up to and including `delim`.
    async fn take_until(&mut self, delim: &[u8]) -> Vec<u8> {
        loop {
            if let Some(i) = self.buf.windows(delim.len()).position(|w| w == delim) {
                return self.buf.drain(..i + delim.len()).collect();
            }
            self.fill().await;
        }
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            self.fill().await;
        }
        self.buf.drain(..n).collect()
    }

    /// Reads one whole response (Content-Length or chunked).
    async fn response(&mut self) -> Resp {
        let head = String::from_utf8(self.take_until(b"\r\n\r\n").await).expect("utf-8 head");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line: {head:?}"));
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_ascii_lowercase())
            })
        };
        let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut body = Vec::new();
            loop {
                let line = String::from_utf8(self.take_until(b"\r\n").await).expect("utf-8");
                let size = usize::from_str_radix(line.trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size {line:?}"));
                let data = self.take(size + 2).await;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&data[..size]);
            }
            body
        } else {
            let len = header("content-length").map_or(0, |v| v.parse().expect("content-length"));
            self.take(len).await
        };
        Resp {
            status,
            body: String::from_utf8(body).expect("utf-8 body"),
        }
    }

    /// Sends a request and reads its response.
    async fn request(&mut self, method: &str, path: &str, body: Option<&Value>) -> Resp {
        let req = request_bytes(method, path, body);
        self.write(&req).await;
        self.response().await
    }

    /// Asserts the server closes the connection (EOF or reset) within `CLOSE_BOUND`.
    async fn expect_closed(&mut self) {
        assert!(self.buf.is_empty(), "unread bytes before close");
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(CLOSE_BOUND, self.stream.read(&mut chunk)).await {
            Err(_) => panic!("connection still open after {CLOSE_BOUND:?}"),
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => panic!("unexpected bytes instead of a close: {:?}", &chunk[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(Err(e)) => panic!("read failed: {e}"),
        }
    }

    /// Asserts nothing happens on the connection (no close, no bytes) for `d`.
    async fn expect_open_for(&mut self, d: Duration) {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(d, self.stream.read(&mut chunk)).await {
            Err(_) => {}
            Ok(Ok(0)) => panic!("connection closed within {d:?}"),
            Ok(r) => panic!("unexpected read result within {d:?}: {r:?}"),
        }
    }
}

fn request_bytes(method: &str, path: &str, body: Option<&Value>) -> Vec<u8> {
    let body = body.map(Value::to_string).unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn completion(max_tokens: u64, stream: bool) -> Value {
    json!({"prompt": "hello there", "max_tokens": max_tokens, "ignore_eos": true, "stream": stream})
}

fn instant_with_timeout(ms: u64) -> SimConfig {
    SimConfig {
        time_scale: 0.0,
        keep_alive_timeout_ms: ms,
        ..SimConfig::default()
    }
}

#[test]
fn default_matches_uvicorn() {
    assert_eq!(SimConfig::default().keep_alive_timeout_ms, 5000);
    assert_eq!(
        SimConfig::default().keep_alive_timeout(),
        Some(Duration::from_secs(5))
    );
    assert_eq!(instant_with_timeout(0).keep_alive_timeout(), None);
}

#[tokio::test]
async fn idle_connection_is_closed_after_the_timeout() {
    let sim = start(instant_with_timeout(300)).await;
    let mut c = Conn::open(&sim).await;
    let r = c
        .request("POST", "/v1/completions", Some(&completion(4, false)))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Not closed at once…
    c.expect_open_for(Duration::from_millis(50)).await;
    // …but closed by the server, with no response, once idle for the timeout.
    c.expect_closed().await;
}

#[tokio::test]
async fn requests_before_the_timeout_reuse_the_connection() {
    // Each gap is well under the timeout, their sum well over it: the timer restarts after
    // every response.
    let sim = start(instant_with_timeout(1000)).await;
    let mut c = Conn::open(&sim).await;
    for _ in 0..4 {
        let r = c
            .request("POST", "/v1/completions", Some(&completion(3, false)))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let v: Value = serde_json::from_str(&r.body).expect("JSON body");
        assert_eq!(v["usage"]["completion_tokens"], 3);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let r = c.request("GET", "/health", None).await;
    assert_eq!(r.status, 200);
    c.expect_closed().await;
}

#[tokio::test]
async fn request_bytes_restart_the_timer() {
    // A request head that trickles in over more than the timeout, each piece well within it,
    // is served: the connection is not idle while request bytes arrive.
    let sim = start(instant_with_timeout(1000)).await;
    let mut c = Conn::open(&sim).await;
    assert_eq!(c.request("GET", "/health", None).await.status, 200);
    let req = request_bytes("GET", "/v1/models", None);
    let (a, rest) = req.split_at(10);
    let (b, rest) = rest.split_at(10);
    for piece in [a, b] {
        c.write(piece).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    c.write(rest).await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("\"object\":\"list\""), "{}", r.body);
}

#[tokio::test]
async fn a_stream_longer_than_the_timeout_is_not_cut() {
    // Tokens 500 ms apart: the stream is silent for longer than the 300 ms timeout between
    // chunks, and lasts several timeouts in all.
    let sim = start(SimConfig {
        time_scale: 1.0,
        itl_ms: 500.0,
        prefill_overhead_ms: 1.0,
        keep_alive_timeout_ms: 300,
        ..SimConfig::default()
    })
    .await;
    let mut c = Conn::open(&sim).await;
    // A first response arms the timer.
    assert_eq!(c.request("GET", "/health", None).await.status, 200);
    let r = c
        .request("POST", "/v1/completions", Some(&completion(4, true)))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let events = common::sse_events(&r.body);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let tokens: usize = events
        .iter()
        .filter(|e| e.contains("\"text\""))
        .filter(|e| !e.contains("\"text\":\"\""))
        .count();
    assert_eq!(tokens, 4, "{events:?}");
    // The stream did not count as idle time: the connection is still fully usable (not
    // merely allowed to finish the stream and then closed)…
    let r = c.request("GET", "/health", None).await;
    assert_eq!(r.status, 200);
    // …and the timer starts again once the last response is over.
    c.expect_closed().await;
}

#[tokio::test]
async fn zero_keeps_idle_connections_open() {
    let sim = start(instant_with_timeout(0)).await;
    let mut c = Conn::open(&sim).await;
    let r = c
        .request("POST", "/v1/completions", Some(&completion(2, false)))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Several times the 300 ms used above, and more than any timeout a test here would set.
    c.expect_open_for(Duration::from_millis(1500)).await;
    let r = c
        .request("POST", "/v1/completions", Some(&completion(2, false)))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}
