//! The bad-input catalogue, end to end: a real `llm-lb` process and a recording backend, garbage
//! sent over raw TCP where an HTTP client would refuse to send it.
//!
//! Policy (README "Bad input"): HTTP framing that is broken or ambiguous is refused by the proxy
//! with an exact 4xx and never reaches an endpoint; a well-framed body is forwarded byte-exact
//! whatever its JSON looks like (the inference server judges the JSON, as it would without a
//! proxy), and only routing degrades to the fallback. Every case checks the exact status, what the
//! backend received, that the process is still healthy afterwards and that nothing panicked.
//! Every read has a deadline, so a hang fails the test instead of stalling it.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// Limits used by these tests (small, so the cases stay fast).
const MAX_BODY: usize = 1 << 20;
const BODY_TIMEOUT_MS: u64 = 1500;
const MAX_HEADER: usize = 32 * 1024;
/// No exchange may take longer than this (a hang fails the test).
const DEADLINE: Duration = Duration::from_secs(15);

fn start(backend: &Backend) -> Proxy {
    start_with(
        backend,
        &format!("body_timeout_ms: {BODY_TIMEOUT_MS}\nmax_header_bytes: {MAX_HEADER}\n"),
    )
}

fn start_with(backend: &Backend, settings: &str) -> Proxy {
    Proxy::start(&format!(
        "max_body_bytes: {MAX_BODY}\n{settings}pools:\n{}{}",
        pool_yaml("chat", "[chat-model]", &[backend.addr], "prefix_cache", ""),
        pool_yaml("rest", "['*']", &[backend.addr], "round_robin", ""),
    ))
}

/// One response read from a raw connection.
#[derive(Debug, Clone)]
struct Response {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// What came back on a raw connection.
#[derive(Debug)]
struct Exchange {
    responses: Vec<Response>,
    /// The proxy closed the connection (EOF or reset) before the deadline.
    closed: bool,
}

impl Exchange {
    fn status(&self) -> Option<u16> {
        self.responses.first().map(|r| r.status)
    }
    fn statuses(&self) -> Vec<u16> {
        self.responses.iter().map(|r| r.status).collect()
    }
}

/// A piece of what a client sends: bytes, or a pause (slow clients).
enum Part {
    Bytes(Vec<u8>),
    Pause(Duration),
    /// Half-close: the client sends FIN and keeps reading.
    Fin,
}

fn bytes(b: impl AsRef<[u8]>) -> Part {
    Part::Bytes(b.as_ref().to_vec())
}

/// Send `parts` (from a writer thread, ignoring write errors: the proxy may refuse early) and read
/// until `want` responses were parsed, the connection closes, or [`DEADLINE`].
fn exchange(addr: SocketAddr, parts: Vec<Part>, want: usize) -> Exchange {
    let stream = TcpStream::connect(addr).expect("connect");
    let mut writer = stream.try_clone().expect("clone");
    let write = std::thread::spawn(move || {
        for p in parts {
            match p {
                Part::Bytes(b) => {
                    if writer.write_all(&b).is_err() {
                        return;
                    }
                }
                Part::Pause(d) => std::thread::sleep(d),
                Part::Fin => {
                    let _ = writer.shutdown(Shutdown::Write);
                }
            }
        }
    });
    let started = Instant::now();
    let mut reader = stream;
    let mut raw = Vec::new();
    let mut closed = false;
    let mut buf = [0u8; 65536];
    while started.elapsed() < DEADLINE {
        let left = DEADLINE
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
        reader.set_read_timeout(Some(left)).expect("timeout");
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => {
                closed = started.elapsed() < DEADLINE;
                break;
            }
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
        if parse_responses(&raw).len() >= want {
            break;
        }
    }
    let responses = parse_responses(&raw);
    let _ = reader.shutdown(Shutdown::Both);
    let _ = write.join();
    Exchange { responses, closed }
}

/// Parse complete responses (status line, headers, `Content-Length` body) from `raw`; 1xx
/// interim responses are skipped.
fn parse_responses(raw: &[u8]) -> Vec<Response> {
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end + 4]).into_owned();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let body_start = end + 4;
        if rest.len() < body_start + len {
            break;
        }
        let body = rest[body_start..body_start + len].to_vec();
        rest = &rest[body_start + len..];
        if (100..200).contains(&status) {
            continue;
        }
        out.push(Response { status, head, body });
    }
    out
}

/// A POST with a `Content-Length` that matches `body`.
fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: llm-lb\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// The proxy answers a normal request and its log shows no panic.
async fn assert_healthy(proxy: &Proxy, backend: &Backend, case: &str) {
    let before = backend.count();
    let body = chat_body("chat-model", 64, false);
    let ex = exchange(
        proxy.addr,
        vec![bytes(post("/v1/chat/completions", &body))],
        1,
    );
    assert_eq!(
        ex.status(),
        Some(200),
        "{case}: proxy unhealthy afterwards: {ex:?}"
    );
    assert_eq!(backend.count(), before + 1, "{case}");
    let r = reqwest::get(format!("http://{}/healthz", proxy.admin))
        .await
        .expect("healthz");
    assert_eq!(r.status().as_u16(), 200, "{case}");
    let log = proxy.log_text();
    assert!(!log.contains("panicked"), "{case}: panic in log:\n{log}");
}

/// A JSON body the proxy must forward untouched (whatever it says) and the backend answers 200.
async fn assert_passed_through(proxy: &Proxy, backend: &Backend, case: &str, body: &[u8]) {
    let before = backend.count();
    let ex = exchange(
        proxy.addr,
        vec![bytes(post("/v1/chat/completions", body))],
        1,
    );
    assert_eq!(ex.status(), Some(200), "{case}: {ex:?}");
    let seen = backend.seen();
    assert_eq!(seen.len(), before + 1, "{case}: reached the backend once");
    let last = &seen[before];
    assert_eq!(last.body_len, body.len(), "{case}");
    assert_eq!(last.body_sha256, sha256_hex(body), "{case}: byte-exact");
    assert_eq!(
        last.content_length.as_deref(),
        Some(body.len().to_string().as_str()),
        "{case}"
    );
}

fn nested(depth: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 * depth + 64);
    v.extend_from_slice(br#"{"model":"chat-model","messages":[{"role":"user","content":"#);
    v.extend(std::iter::repeat_n(b'[', depth));
    v.extend(std::iter::repeat_n(b']', depth));
    v.extend_from_slice(b"}]}");
    v
}

/// JSON that is malformed, truncated, badly typed, huge or deep: forwarded byte-exact, 200 from
/// the backend, routed by the fallback when it cannot be understood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_garbage_is_forwarded_unharmed() {
    let b = Backend::start().await;
    let proxy = start(&b);
    let huge_messages = {
        let m: Vec<serde_json::Value> = (0..20_000)
            .map(|i| serde_json::json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": "x"}))
            .collect();
        serde_json::to_vec(&serde_json::json!({"model": "chat-model", "messages": m}))
            .expect("json")
    };
    let huge_prompt = {
        let ids: Vec<u32> = (0..100_000).collect();
        serde_json::to_vec(&serde_json::json!({"model": "chat-model", "prompt": ids}))
            .expect("json")
    };
    let mut non_utf8 =
        br#"{"model":"chat-model","messages":[{"role":"user","content":"caf"#.to_vec();
    non_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    non_utf8.extend_from_slice(br#""}]}"#);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", br#"{"model": "chat-model", "messages": [}"#.to_vec()),
        ("truncated", br#"{"model":"chat-model","messages":[{"role":"user","content":"hel"#.to_vec()),
        ("trailing garbage", br#"{"model":"chat-model","messages":[]} xyz"#.to_vec()),
        ("not an object", br#"["chat-model"]"#.to_vec()),
        ("bare string", br#""hello""#.to_vec()),
        ("only whitespace", b" \r\n\t ".to_vec()),
        ("NUL bytes", b"\0\0\0\0".to_vec()),
        ("non-UTF-8 in a string", non_utf8),
        ("lone surrogate escape", br#"{"model":"chat-model","messages":[{"role":"user","content":"\ud800"}]}"#.to_vec()),
        ("model a number", br#"{"model":5,"messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        ("model null", br#"{"model":null,"messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        ("model an object", br#"{"model":{"a":1},"messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        ("model an array", br#"{"model":["chat-model"],"messages":[]}"#.to_vec()),
        ("model empty", br#"{"model":"","messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        ("duplicate model keys", br#"{"model":"chat-model","model":"other","messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        ("messages a string", br#"{"model":"chat-model","messages":"hi"}"#.to_vec()),
        ("messages a number", br#"{"model":"chat-model","messages":42}"#.to_vec()),
        ("messages null", br#"{"model":"chat-model","messages":null}"#.to_vec()),
        ("messages an object", br#"{"model":"chat-model","messages":{"role":"user","content":"hi"}}"#.to_vec()),
        ("messages of numbers", br#"{"model":"chat-model","messages":[1,2,3]}"#.to_vec()),
        ("messages empty", br#"{"model":"chat-model","messages":[]}"#.to_vec()),
        ("role a number", br#"{"model":"chat-model","messages":[{"role":7,"content":"hi"}]}"#.to_vec()),
        ("content a number", br#"{"model":"chat-model","messages":[{"role":"user","content":7}]}"#.to_vec()),
        ("content an object", br#"{"model":"chat-model","messages":[{"role":"user","content":{"z":1,"a":[true,null]}}]}"#.to_vec()),
        ("content parts of wrong types", br#"{"model":"chat-model","messages":[{"role":"user","content":[{"type":5,"text":null},7,"s",[]]}]}"#.to_vec()),
        ("tool_calls a string", br#"{"model":"chat-model","messages":[{"role":"assistant","content":null,"tool_calls":"x"}]}"#.to_vec()),
        ("prompt a number", br#"{"model":"chat-model","prompt":5}"#.to_vec()),
        ("prompt an object", br#"{"model":"chat-model","prompt":{"a":1}}"#.to_vec()),
        ("prompt mixed list", br#"{"model":"chat-model","prompt":[1,-2,3.5,1e300,"s",null,[1,[2]],{"a":1}]}"#.to_vec()),
        ("stream a string", br#"{"model":"chat-model","stream":"yes","messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        ("stream a number", br#"{"model":"chat-model","stream":1,"messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        ("max_tokens a string", br#"{"model":"chat-model","max_tokens":"many","messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        ("max_tokens negative", br#"{"model":"chat-model","max_tokens":-1,"messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        ("number out of range", br#"{"model":"chat-model","max_tokens":1e400,"messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        ("huge messages array (20 000)", huge_messages),
        ("huge prompt (100 000 token ids)", huge_prompt),
        ("nesting 100 levels (parsed)", nested(100)),
        ("nesting 100 000 levels", nested(100_000)),
        ("nesting 100 000 levels, whole body", {
            let mut v = vec![b'['; 100_000];
            v.extend(vec![b']'; 100_000]);
            v
        }),
        ("unclosed nesting 400 000 levels", vec![b'{'; 1].into_iter().chain(std::iter::repeat_n(b'[', 400_000)).collect()),
    ];
    for (case, body) in &cases {
        assert_passed_through(&proxy, &b, case, body).await;
    }
    assert_healthy(&proxy, &b, "json garbage").await;
    // Bodies the policy could not judge were routed by the fallback, and counted.
    let m = proxy.metrics().await;
    let count = |reason: &str| -> f64 {
        ["chat", "rest"]
            .iter()
            .filter_map(|pool| {
                parse_metric(
                    &m,
                    "llmlb_fallback_total",
                    &[("pool", pool), ("reason", reason)],
                )
            })
            .sum()
    };
    let (not_json, no_prompt) = (count("not_json"), count("no_prompt"));
    assert!(not_json >= 13.0, "{m}");
    assert!(no_prompt >= 5.0, "{m}");
}

/// What a framing case must get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// This exact status, and nothing reaches the backend.
    Refused(u16),
    /// Proxied: the backend's 200, and the backend got a body of this many bytes.
    Proxied(usize),
    /// The connection is closed without a response (the client went away first), nothing proxied.
    ClosedSilently,
}

struct Case {
    name: &'static str,
    parts: Vec<Part>,
    want: Want,
}

fn case(name: &'static str, raw: impl AsRef<[u8]>, want: Want) -> Case {
    Case {
        name,
        parts: vec![bytes(raw)],
        want,
    }
}

async fn run_cases(proxy: &Proxy, backend: &Backend, cases: Vec<Case>) {
    let mut table = Vec::new();
    for c in cases {
        let before = backend.count();
        let ex = exchange(proxy.addr, c.parts, 1);
        let seen = backend.seen();
        let got = match ex.status() {
            Some(200) if seen.len() == before + 1 => Want::Proxied(seen[before].body_len),
            Some(s) => Want::Refused(s),
            None if ex.closed => Want::ClosedSilently,
            None => panic!("{}: no answer and not closed within {DEADLINE:?}", c.name),
        };
        table.push(format!("{:<55} want {:?} got {:?}", c.name, c.want, got));
        if std::env::var("OBSERVE").is_ok() && got != c.want {
            eprintln!(
                "{}: {:?}",
                c.name,
                ex.responses.first().map(|r| (
                    r.head.clone(),
                    String::from_utf8_lossy(&r.body).into_owned()
                ))
            );
        }
        if std::env::var("OBSERVE").is_ok() {
            continue;
        }
        assert_eq!(got, c.want, "{}: {ex:?}\n{}", c.name, table.join("\n"));
        if let Want::Refused(_) = c.want {
            assert_eq!(
                backend.count(),
                before,
                "{}: nothing reaches the backend",
                c.name
            );
            let r = &ex.responses[0];
            // Pingora refuses what it cannot parse before any hook runs, with an empty body;
            // everything llm-lb refuses itself gets an OpenAI-shaped JSON error.
            let by_pingora = r.head.contains("Server: Pingora");
            if by_pingora {
                assert!(r.body.is_empty(), "{}: {r:?}", c.name);
            } else {
                let v: serde_json::Value = serde_json::from_slice(&r.body)
                    .unwrap_or_else(|e| panic!("{}: error body not JSON ({e}): {r:?}", c.name));
                assert!(v["error"]["message"].is_string(), "{}: {v}", c.name);
            }
            table.last_mut().expect("row").push_str(if by_pingora {
                " (Pingora)"
            } else {
                " (llm-lb JSON)"
            });
        }
        assert_healthy(proxy, backend, c.name).await;
    }
    eprintln!("{}", table.join("\n"));
}

const CHAT: &[u8] = br#"{"model":"chat-model","messages":[{"role":"user","content":"hi"}]}"#;

fn head(extra: &str) -> String {
    format!("POST /v1/chat/completions HTTP/1.1\r\nHost: llm-lb\r\n{extra}\r\n")
}

fn with_body(head: String, body: &[u8]) -> Vec<u8> {
    let mut v = head.into_bytes();
    v.extend_from_slice(body);
    v
}

fn chunked(body: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", body.len()).into_bytes();
    v.extend_from_slice(body);
    v.extend_from_slice(b"\r\n0\r\n\r\n");
    v
}

/// Content-Length and Transfer-Encoding: lengths that lie, bodies that never end, bodies too big.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_framing() {
    let b = Backend::start().await;
    let proxy = start(&b);
    let n = CHAT.len();
    let over = vec![b'x'; MAX_BODY + 1];
    let cases = vec![
        case("empty body, Content-Length: 0", head("Content-Length: 0\r\n"), Want::Proxied(0)),
        case("Content-Length matches", with_body(head(&format!("Content-Length: {n}\r\n")), CHAT), Want::Proxied(n)),
        // Shorter than sent: the declared bytes are the body; the rest is the next request on the
        // connection (garbage here, refused separately, see `leftover_bytes_are_a_new_request`).
        case("Content-Length shorter than sent", with_body(head("Content-Length: 10\r\n"), CHAT), Want::Proxied(10)),
        // Longer than sent, client waits: the body never completes within the body timeout.
        case("Content-Length longer than sent (client waits)", with_body(head(&format!("Content-Length: {}\r\n", n + 100)), CHAT), Want::Refused(408)),
        // Longer than sent, client closes its side: an incomplete request (RFC 9112 §8).
        Case {
            name: "Content-Length longer than sent, then FIN",
            parts: vec![bytes(with_body(head(&format!("Content-Length: {}\r\n", n + 100)), CHAT)), Part::Fin],
            want: Want::Refused(400),
        },
        case("Content-Length over the limit", head(&format!("Content-Length: {}\r\n", MAX_BODY + 1)), Want::Refused(413)),
        case("Content-Length over the limit, body sent", with_body(head(&format!("Content-Length: {}\r\n", over.len())), &over), Want::Refused(413)),
        case("Content-Length 2^64 + 1", head("Content-Length: 18446744073709551617\r\n"), Want::Refused(400)),
        case("Content-Length negative", with_body(head("Content-Length: -1\r\n"), CHAT), Want::Refused(400)),
        case("Content-Length with a sign", with_body(head(&format!("Content-Length: +{n}\r\n")), CHAT), Want::Refused(400)),
        case("Content-Length in hex", with_body(head("Content-Length: 0x10\r\n"), CHAT), Want::Refused(400)),
        case("Content-Length not a number", with_body(head("Content-Length: abc\r\n"), CHAT), Want::Refused(400)),
        case("Content-Length empty", with_body(head("Content-Length: \r\n"), CHAT), Want::Refused(400)),
        case("two different Content-Lengths", with_body(head(&format!("Content-Length: {n}\r\nContent-Length: {}\r\n", n + 1)), CHAT), Want::Refused(400)),
        case("Content-Length list of different values", with_body(head(&format!("Content-Length: {n}, {}\r\n", n + 1)), CHAT), Want::Refused(400)),
        case("two identical Content-Lengths (collapsed)", with_body(head(&format!("Content-Length: {n}\r\nContent-Length: {n}\r\n")), CHAT), Want::Proxied(n)),
        case("Content-Length list of identical values (collapsed)", with_body(head(&format!("Content-Length: {n}, {n}\r\n")), CHAT), Want::Proxied(n)),
        case("chunked", with_body(head("Transfer-Encoding: chunked\r\n"), &chunked(CHAT)), Want::Proxied(n)),
        case("chunked, empty", with_body(head("Transfer-Encoding: chunked\r\n"), b"0\r\n\r\n"), Want::Proxied(0)),
        case("chunked with extensions and trailers", with_body(head("Transfer-Encoding: chunked\r\n"), &[format!("{:x};name=value\r\n", n).into_bytes(), CHAT.to_vec(), b"\r\n0\r\nX-Trailer: t\r\n\r\n".to_vec()].concat()), Want::Proxied(n)),
        case("chunked over the limit", with_body(head("Transfer-Encoding: chunked\r\n"), &chunked(&over)), Want::Refused(413)),
        case("chunk size not hex", with_body(head("Transfer-Encoding: chunked\r\n"), b"zz\r\nabc\r\n0\r\n\r\n"), Want::Refused(400)),
        case("chunk size overflows", with_body(head("Transfer-Encoding: chunked\r\n"), b"fffffffffffffffffffff\r\nabc\r\n0\r\n\r\n"), Want::Refused(400)),
        case("chunk longer than its size", with_body(head("Transfer-Encoding: chunked\r\n"), b"3\r\nabcdef\r\n0\r\n\r\n"), Want::Refused(400)),
        case("chunked never terminated (client waits)", with_body(head("Transfer-Encoding: chunked\r\n"), b"3\r\nabc\r\n"), Want::Refused(408)),
        case("Transfer-Encoding gzip (not chunked last)", with_body(head("Transfer-Encoding: gzip\r\n"), CHAT), Want::Refused(400)),
        case("Transfer-Encoding chunked, gzip", with_body(head("Transfer-Encoding: chunked, gzip\r\n"), &chunked(CHAT)), Want::Refused(400)),
        case("Transfer-Encoding xchunked", with_body(head("Transfer-Encoding: xchunked\r\n"), &chunked(CHAT)), Want::Refused(400)),
        case("Transfer-Encoding on HTTP/1.0", with_body("POST /v1/chat/completions HTTP/1.0\r\nHost: llm-lb\r\nTransfer-Encoding: chunked\r\n\r\n".to_string(), &chunked(CHAT)), Want::Refused(400)),
    ];
    run_cases(&proxy, &b, cases).await;
}

/// Broken or oversized request heads and request-smuggling attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_and_smuggling() {
    let b = Backend::start().await;
    let proxy = start(&b);
    let n = CHAT.len();
    let with = |extra: &str| with_body(head(&format!("{extra}Content-Length: {n}\r\n")), CHAT);
    let many_fields: String = (0..300).map(|i| format!("X-F{i}: v\r\n")).collect();
    let big_value = format!("X-Big: {}\r\n", "a".repeat(40 * 1024));
    let big_fields: String = (0..200)
        .map(|i| format!("X-F{i}: {}\r\n", "b".repeat(200)))
        .collect();
    let huge_value = format!("X-Huge: {}\r\n", "a".repeat(2 * 1024 * 1024));
    let target = |len: usize| {
        format!(
            "POST /v1/chat/completions?{} HTTP/1.1\r\nHost: llm-lb\r\nContent-Length: {n}\r\n\r\n",
            "q".repeat(len)
        )
    };
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: llm-lb\r\n\r\n";
    let cases = vec![
        // Sizes: over llm-lb's max_header_bytes (32 KiB here) → 414/431; over Pingora's own
        // limits (1 MiB head, 256 fields, a 64 KiB target for the http crate) → 400 before any
        // hook runs.
        case("header field of 40 KiB", with(&big_value), Want::Refused(431)),
        case("200 header fields, 44 KiB", with(&big_fields), Want::Refused(431)),
        case("header field of 2 MiB", with(&huge_value), Want::Refused(400)),
        case("300 header fields", with(&many_fields), Want::Refused(400)),
        case("request target of 40 KiB", with_body(target(40 * 1024), CHAT), Want::Refused(414)),
        case("request target of 80 KiB", with_body(target(80 * 1024), CHAT), Want::Refused(400)),
        // Syntax.
        // Shorter than the 24-byte HTTP/2 preface: Pingora's h2c sniffing waited for more bytes
        // forever; llm-lb decides from the first byte.
        case("garbage request line (9 bytes)", b"HELLO\r\n\r\n", Want::Refused(400)),
        case("HTTP/1.0 GET of 18 bytes", b"GET / HTTP/1.0\r\n\r\n", Want::Proxied(0)),
        case("invalid method token", with_body(format!("P@ST /v1/chat/completions HTTP/1.1\r\nHost: llm-lb\r\nContent-Length: {n}\r\n\r\n"), CHAT), Want::Refused(400)),
        case("HTTP/1.2", with_body(format!("POST /v1/chat/completions HTTP/1.2\r\nHost: llm-lb\r\nContent-Length: {n}\r\n\r\n"), CHAT), Want::Refused(400)),
        case("space before the colon", with("Transfer-Encoding : chunked\r\n"), Want::Refused(400)),
        case("header name with a space", with("Bad Name: x\r\n"), Want::Refused(400)),
        case("NUL in a header value", with("X-A: a\0b\r\n"), Want::Refused(400)),
        case("bare CR in a header value", with("X-A: a\rb\r\n"), Want::Refused(400)),
        case("obs-fold continuation line", with("X-A: a\r\n folded\r\n"), Want::Refused(400)),
        case("obs-fold hiding Transfer-Encoding", with_body(head(&format!("X-A: a\r\n Transfer-Encoding: chunked\r\nContent-Length: {n}\r\n")), CHAT), Want::Refused(400)),
        case("two Host headers", with("Host: other\r\n"), Want::Refused(400)),
        case("no Host on HTTP/1.1 (RFC 9112 §3.2)", with_body(format!("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {n}\r\n\r\n"), CHAT), Want::Refused(400)),
        case("no Host on HTTP/1.0", with_body(format!("POST /v1/chat/completions HTTP/1.0\r\nContent-Length: {n}\r\n\r\n"), CHAT), Want::Proxied(n)),
        case("CONNECT", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", Want::Refused(405)),
        case("obs-text (bytes 0x80-0xff) in a header value", [&b"POST /v1/chat/completions HTTP/1.1\r\nHost: llm-lb\r\nX-A: caf\xc3\xa9 \xff\r\n"[..], format!("Content-Length: {n}\r\n\r\n").as_bytes(), CHAT].concat(), Want::Proxied(n)),
        case("non-UTF-8 bytes in the path", [&b"POST /v1/chat/\xff\xfe HTTP/1.1\r\nHost: llm-lb\r\n"[..], format!("Content-Length: {n}\r\n\r\n").as_bytes(), CHAT].concat(), Want::Refused(400)),
        case("Expect: 100-continue over the limit", head(&format!("Expect: 100-continue\r\nContent-Length: {}\r\n", MAX_BODY + 1)), Want::Refused(413)),
        // Smuggling: Transfer-Encoding wins over Content-Length (RFC 9112 §6.3), the connection is
        // closed after the response, and the request hidden behind the body is never seen.
        case("CL then TE, request hidden after the chunked body", with_body(head("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n"), format!("0\r\n\r\n{smuggled}").as_bytes()), Want::Proxied(0)),
        case("TE then CL covering a hidden request", with_body(head(&format!("Transfer-Encoding: chunked\r\nContent-Length: {}\r\n", 5 + smuggled.len())), format!("0\r\n\r\n{smuggled}").as_bytes()), Want::Proxied(0)),
        case("TE chunked then TE identity", with_body(head("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"), &chunked(CHAT)), Want::Refused(400)),
        case("TE with CL on HTTP/1.0", with_body(format!("POST /v1/chat/completions HTTP/1.0\r\nHost: llm-lb\r\nTransfer-Encoding: chunked\r\nContent-Length: {n}\r\n\r\n"), &chunked(CHAT)), Want::Refused(400)),
    ];
    run_cases(&proxy, &b, cases).await;
    let paths: Vec<String> = b.seen().into_iter().map(|s| s.path).collect();
    assert!(!paths.iter().any(|p| p.contains("smuggled")), "{paths:?}");
}

/// Bytes sent after a request's end arrive before its response: Pingora 0.9 does not pipeline by
/// default, so it answers the first request and closes the connection (with `Connection: close`)
/// without reading what follows, valid request or smuggling attempt alike; the client resends on
/// a new connection (RFC 9112 §9.3.2). Nothing hidden after a body ever reaches an endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_bytes_are_a_new_request() {
    let b = Backend::start().await;
    let proxy = start(&b);
    let two = [post("/v1/chat/completions", CHAT), post("/v1/second", CHAT)].concat();
    let ex = exchange(proxy.addr, vec![bytes(two)], 2);
    assert_eq!(ex.statuses(), vec![200], "{ex:?}");
    assert!(ex.closed, "{ex:?}");
    let ex = exchange(
        proxy.addr,
        vec![bytes(with_body(head("Content-Length: 10\r\n"), CHAT))],
        2,
    );
    assert_eq!(ex.statuses(), vec![200], "{ex:?}");
    assert!(ex.closed, "{ex:?}");
    let ex = exchange(
        proxy.addr,
        vec![bytes(with_body(
            head("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n"),
            format!(
                "0\r\n\r\n{}",
                String::from_utf8_lossy(&post("/v1/smuggled", CHAT))
            )
            .as_bytes(),
        ))],
        2,
    );
    assert_eq!(ex.statuses(), vec![200], "{ex:?}");
    assert!(
        ex.closed
            && ex.responses[0]
                .head
                .to_ascii_lowercase()
                .contains("connection: close"),
        "{ex:?}"
    );
    let paths: Vec<String> = b.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/v1/chat/completions"; 3]);
    // Sent one after the other, keep-alive requests are all answered on one connection.
    let mut s = TcpStream::connect(proxy.addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    for _ in 0..3 {
        s.write_all(&post("/v1/chat/completions", CHAT))
            .expect("write");
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        while parse_responses(&raw).is_empty() {
            let n = s.read(&mut buf).expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&buf[..n]);
        }
        assert_eq!(parse_responses(&raw)[0].status, 200);
    }
    assert_healthy(&proxy, &b, "leftovers").await;
}

/// A client trickling its body (each read well within Pingora's per-read timeout) is cut off by
/// the body deadline with 408 instead of holding its connection and buffer indefinitely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_bodies_get_408() {
    let b = Backend::start().await;
    let proxy = start(&b);
    let mut parts = vec![bytes(head("Content-Length: 1000\r\n"))];
    for _ in 0..100 {
        parts.push(Part::Pause(Duration::from_millis(100)));
        parts.push(bytes(b"x"));
    }
    let ex = exchange(proxy.addr, parts, 1);
    assert_eq!(ex.status(), Some(408), "{ex:?}");
    let v: serde_json::Value = serde_json::from_slice(&ex.responses[0].body).expect("json");
    assert_eq!(v["error"]["code"], "request_timeout");
    // Chunked, one small chunk at a time.
    let mut parts = vec![bytes(head("Transfer-Encoding: chunked\r\n"))];
    for _ in 0..100 {
        parts.push(Part::Pause(Duration::from_millis(100)));
        parts.push(bytes(b"1\r\nx\r\n"));
    }
    let ex = exchange(proxy.addr, parts, 1);
    assert_eq!(ex.status(), Some(408), "{ex:?}");
    assert_eq!(b.count(), 0);
    assert_healthy(&proxy, &b, "slow loris").await;
}

/// A client that sends its whole over-limit upload before reading (as simple clients do) still
/// gets the 413: llm-lb reads and discards the rest of the body for a while before it closes
/// (lingering close, as nginx), instead of closing on unread data, which resets the connection
/// and loses the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_limit_upload_sent_in_full_still_gets_its_413() {
    let b = Backend::start().await;
    let proxy = start(&b);
    let over = vec![b'x'; 48 * MAX_BODY];
    for framing in ["chunked", "content-length"] {
        for round in 0..3 {
            let mut s = TcpStream::connect(proxy.addr).expect("connect");
            let request = if framing == "chunked" {
                with_body(head("Transfer-Encoding: chunked\r\n"), &chunked(&over))
            } else {
                with_body(head(&format!("Content-Length: {}\r\n", over.len())), &over)
            };
            // Everything first, then the answer. A client whose write fails on a reset never
            // reads the answer (Python's requests, for one): the whole upload must go through.
            let sent = s.write_all(&request);
            s.set_read_timeout(Some(DEADLINE)).expect("timeout");
            let mut raw = Vec::new();
            let mut buf = [0u8; 65536];
            let outcome = loop {
                match s.read(&mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => raw.extend_from_slice(&buf[..n]),
                    Err(e) => break Err(e),
                }
            };
            let statuses: Vec<u16> = parse_responses(&raw).iter().map(|r| r.status).collect();
            assert!(
                sent.is_ok() && statuses == [413],
                "{framing}, round {round}: sending ended with {sent:?}, reading with {outcome:?} after {} bytes ({statuses:?})",
                raw.len()
            );
        }
    }
    assert_eq!(b.count(), 0);
    assert_healthy(&proxy, &b, "over-limit uploads").await;
}

/// Memory a process has mapped (kB): what a reservation costs even before it is written.
fn vm_kb(pid: u32) -> u64 {
    status_kb(pid, "VmSize")
}

/// Connections that declare a large body and then send almost nothing cost little: the body
/// buffer grows with what arrives instead of reserving the declared length up front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_lengths_reserve_nothing_before_the_bytes_arrive() {
    const DECLARED: usize = 64 << 20;
    let b = Backend::start().await;
    let proxy = Proxy::start(&format!(
        "max_body_bytes: {DECLARED}\nbody_timeout_ms: 30000\npools:\n{}",
        pool_yaml("rest", "['*']", &[b.addr], "round_robin", ""),
    ));
    let before = vm_kb(proxy.pid());
    let mut held = Vec::new();
    for _ in 0..32 {
        let mut s = TcpStream::connect(proxy.addr).expect("connect");
        s.write_all(head(&format!("Content-Length: {DECLARED}\r\n")).as_bytes())
            .expect("head");
        s.write_all(b"{\"model\":").expect("a few bytes");
        held.push(s);
    }
    // Every connection is being read by now (its first bytes are in).
    std::thread::sleep(Duration::from_millis(500));
    let grown_mib = vm_kb(proxy.pid()).saturating_sub(before) / 1024;
    // Up-front reservations would map 32 × 64 MiB = 2 GiB.
    assert!(
        grown_mib < 256,
        "mapped {grown_mib} MiB more for 32 idle uploads"
    );
    drop(held);
    assert_healthy(&proxy, &b, "declared lengths").await;
}

/// Resident memory of a process (kB).
fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS")
}

/// A `kB` field of `/proc/<pid>/status`.
fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect(field)
}

/// Bursts of large and over-limit bodies (concurrent) leave memory bounded: a second identical
/// burst does not grow the process materially.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_under_large_bodies() {
    let b = Backend::start().await;
    // The default body timeout (60 s): 48 concurrent uploads on a busy test machine are slow.
    let proxy = start_with(&b, "upstream: {connect_timeout_ms: 20000}\n");
    let client = reqwest::Client::new();
    let big = chat_body("chat-model", MAX_BODY - 1024, false);
    let over = vec![b'x'; MAX_BODY + 1];
    let burst = || async {
        let mut tasks = Vec::new();
        for i in 0..24 {
            let (client, url) = (client.clone(), proxy.url("/v1/chat/completions"));
            let body = if i % 3 == 0 {
                over.clone()
            } else {
                big.clone()
            };
            tasks.push(tokio::spawn(async move {
                let r = client.post(url).body(body).send().await.expect("send");
                r.status().as_u16()
            }));
        }
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.expect("task"));
        }
        statuses
    };
    let first = burst().await;
    assert_eq!(first.iter().filter(|s| **s == 413).count(), 8, "{first:?}");
    assert_eq!(first.iter().filter(|s| **s == 200).count(), 16, "{first:?}");
    let after_first = rss_kb(proxy.pid());
    for _ in 0..3 {
        let again = burst().await;
        assert_eq!(again, first);
    }
    let after_more = rss_kb(proxy.pid());
    // 16 concurrent 1 MiB bodies in flight at most: well under 256 MiB, and no growth per burst.
    assert!(after_first < 256 * 1024, "RSS {after_first} kB");
    assert!(
        after_more < after_first + after_first / 2 + 16 * 1024,
        "RSS grew from {after_first} kB to {after_more} kB over three more bursts"
    );
    assert_healthy(&proxy, &b, "memory").await;
}

/// The same limits over h2c (HTTP/2 without TLS): over-limit body 413, oversized header fields
/// 431 (below the h2 layer's own 64 KiB header-list limit), garbage JSON forwarded byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_gets_the_same_answers() {
    let b = Backend::start().await;
    let proxy = start(&b);
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let url = proxy.url("/v1/chat/completions");
    let send = |body: Vec<u8>, header: Option<String>| {
        let mut r = client.post(&url).body(body);
        if let Some(h) = header {
            r = r.header("x-big", h);
        }
        async move {
            let r = r.send().await.expect("send");
            assert_eq!(r.version(), reqwest::Version::HTTP_2);
            let status = r.status().as_u16();
            (status, r.text().await.expect("text"))
        }
    };
    let (status, text) = send(vec![b'x'; MAX_BODY + 1], None).await;
    assert_eq!(status, 413, "{text}");
    let (status, text) = send(CHAT.to_vec(), Some("a".repeat(40 * 1024))).await;
    assert_eq!(status, 431, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["error"]["code"], "headers_too_large");
    assert_eq!(b.count(), 0);
    let garbage = nested(100_000);
    let (status, _) = send(garbage.clone(), None).await;
    assert_eq!(status, 200);
    let seen = b.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body_sha256, sha256_hex(&garbage));
    assert_healthy(&proxy, &b, "h2c").await;
}

/// The limits are on by default and validated.
#[test]
fn limits_default_on_and_are_validated() {
    use llm_lb::config::{
        Config, DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_HEADER_BYTES,
    };
    let pools = "pools:\n  - name: p\n    models: ['*']\n    endpoints: ['127.0.0.1:1']\n    lb_policy: round_robin\n";
    let c = Config::from_yaml(pools).expect("config");
    assert_eq!(c.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
    assert_eq!(DEFAULT_MAX_BODY_BYTES, 32 << 20);
    assert_eq!(c.body_timeout, DEFAULT_BODY_TIMEOUT);
    assert_eq!(DEFAULT_BODY_TIMEOUT, Duration::from_secs(60));
    assert_eq!(c.max_header_bytes, DEFAULT_MAX_HEADER_BYTES);
    assert_eq!(DEFAULT_MAX_HEADER_BYTES, 64 << 10);
    for (setting, key) in [
        ("body_timeout_ms: 0", "body_timeout_ms"),
        ("max_header_bytes: 100", "max_header_bytes"),
        ("max_body_bytes: 0", "max_body_bytes"),
    ] {
        let e = Config::from_yaml(&format!("{setting}\n{pools}")).expect_err(setting);
        assert!(e.to_string().starts_with(key), "{e}");
    }
}
