//! OpenTelemetry traces: with `tracing` set, each request's span reaches an OTLP/HTTP receiver run
//! by the test (protobuf, decoded with the OpenTelemetry protocol's own types), continuing the
//! client's trace, and the engine receives a `traceparent` whose parent is that span. Without
//! `tracing`, the client's `traceparent` reaches the engine untouched.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// A span as received, with its resource's `service.name`.
#[derive(Debug, Clone)]
struct Received {
    service: Option<String>,
    span: Span,
}

/// An OTLP/HTTP traces receiver on a free loopback port.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(spans): State<Arc<Mutex<Vec<Received>>>>,
    body: Bytes,
) -> (StatusCode, Vec<u8>) {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut spans = spans.lock().expect("lock");
    for rs in request.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| string_attr(&r.attributes, "service.name"));
        for ss in rs.scope_spans {
            for span in ss.spans {
                spans.push(Received {
                    service: service.clone(),
                    span,
                });
            }
        }
    }
    // An empty ExportTraceServiceResponse.
    (StatusCode::OK, Vec::new())
}

impl Collector {
    async fn start() -> Collector {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Collector { addr, spans, task }
    }

    /// The first span of trace `trace_id` (hex), once it has arrived.
    async fn span_of(&self, trace_id: &str) -> Received {
        let mut found = None;
        eventually(
            &format!("a span of trace {trace_id}"),
            Duration::from_secs(20),
            async || {
                found = self
                    .spans
                    .lock()
                    .expect("lock")
                    .iter()
                    .find(|r| hex(&r.span.trace_id) == trace_id)
                    .cloned();
                found.as_ref().map(|_| ()).ok_or_else(|| "none yet".into())
            },
        )
        .await;
        found.expect("found")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key) {
        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key) {
        Some(any_value::Value::IntValue(n)) => Some(*n),
        _ => None,
    }
}

fn seconds_attr(attrs: &[KeyValue], key: &str) -> f64 {
    match attr(attrs, key) {
        Some(any_value::Value::DoubleValue(x)) => *x,
        other => panic!("{key} is {other:?}, not seconds"),
    }
}

/// `traceparent` fields: version, trace id, parent id, flags.
fn fields(traceparent: &str) -> Vec<&str> {
    let f: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(f.len(), 4, "traceparent {traceparent}");
    f
}

async fn chat(proxy: &Proxy, traceparent: Option<&str>) {
    let client = reqwest::Client::new();
    let mut req = client
        .post(proxy.url("/v1/chat/completions"))
        .json(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let resp = req.send().await.expect("send");
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_span_reaches_the_collector_and_parents_the_engines_span() {
    let collector = Collector::start().await;
    let backend = Backend::start().await;
    let proxy = Proxy::start(&format!(
        "tracing: {{otlp_endpoint: 'http://{}/v1/traces', service_name: llm-lb-test}}\npools:\n{}",
        collector.addr,
        pool_yaml("p", "[m]", &[backend.addr], "round_robin", "")
    ));

    // The client's trace: llm-lb's span continues it.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    chat(&proxy, Some(&format!("00-{trace_id}-{client_span}-01"))).await;
    let received = collector.span_of(trace_id).await;
    let span = &received.span;
    assert_eq!(received.service.as_deref(), Some("llm-lb-test"));
    assert_eq!(
        hex(&span.parent_span_id),
        client_span,
        "child of the client's span"
    );
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(span.name, "POST /v1/chat/completions");
    let a = &span.attributes;
    assert_eq!(string_attr(a, "llm_lb.pool").as_deref(), Some("p"));
    assert_eq!(
        string_attr(a, "llm_lb.policy").as_deref(),
        Some("round_robin")
    );
    assert_eq!(
        string_attr(a, "llm_lb.reason").as_deref(),
        Some("round_robin")
    );
    assert_eq!(
        string_attr(a, "llm_lb.endpoint"),
        Some(backend.addr.to_string())
    );
    assert_eq!(string_attr(a, "gen_ai.request.model").as_deref(), Some("m"));
    assert_eq!(int_attr(a, "llm_lb.attempts"), Some(1));
    assert_eq!(int_attr(a, "http.response.status_code"), Some(200));
    for key in [
        "llm_lb.read_body_seconds",
        "llm_lb.choose_seconds",
        "llm_lb.wait_first_byte_seconds",
    ] {
        let s = seconds_attr(a, key);
        assert!((0.0..10.0).contains(&s), "{key} = {s}");
    }
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano);

    // The engine's parent is llm-lb's span, in the client's trace.
    let seen = backend.seen();
    let tp = seen[0]
        .traceparent
        .as_deref()
        .expect("traceparent upstream");
    let f = fields(tp);
    assert_eq!(f[1], trace_id);
    assert_eq!(
        f[2],
        hex(&span.span_id),
        "the engine's parent is llm-lb's span"
    );
    assert_eq!(f[3], "01", "sampled, as the client asked");

    // A request without a trace context starts a trace of its own.
    chat(&proxy, None).await;
    let seen = backend.seen();
    let tp = seen[1]
        .traceparent
        .as_deref()
        .expect("traceparent upstream");
    let f = fields(tp);
    let root = collector.span_of(f[1]).await;
    assert!(root.span.parent_span_id.is_empty(), "a root span");
    assert_eq!(f[2], hex(&root.span.span_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tracing_the_clients_traceparent_passes_untouched() {
    let backend = Backend::start().await;
    let proxy = Proxy::start(&format!(
        "pools:\n{}",
        pool_yaml("p", "[m]", &[backend.addr], "round_robin", "")
    ));
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    chat(&proxy, Some(tp)).await;
    assert_eq!(backend.seen()[0].traceparent.as_deref(), Some(tp));
}

#[test]
fn tracing_settings_are_validated() {
    for (yaml, want) in [
        (
            "tracing: {otlp_endpoint: 'https://collector:4318/v1/traces'}",
            "tracing.otlp_endpoint",
        ),
        (
            "tracing: {otlp_endpoint: 'http://127.0.0.1:4318/v1/traces', sample_ratio: 2}",
            "tracing.sample_ratio",
        ),
        (
            "tracing: {otlp_endpoint: 'http://127.0.0.1:4318/v1/traces', exporter: zipkin}",
            "exporter",
        ),
    ] {
        let dir = tempfile::tempdir().expect("dir");
        let policy = dir.path().join("policy.yaml");
        std::fs::write(
            &policy,
            format!("{yaml}\npools:\n  - name: p\n    models: ['*']\n    endpoints: ['127.0.0.1:9']\n    lb_policy: round_robin\n"),
        )
        .expect("write");
        let conf = write_pingora_conf(dir.path());
        let out = std::process::Command::new(binary())
            .args(["-t", "-c"])
            .arg(&conf)
            .arg("-p")
            .arg(&policy)
            .output()
            .expect("run -t");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{yaml} accepted");
        assert!(stderr.contains(want), "{yaml}: {stderr}");
    }
}
