//! OpenTelemetry traces (off unless the policy file's `tracing` names an OTLP endpoint): one
//! server span per request, exported over OTLP/HTTP (protobuf) in batches from a thread of the
//! SDK's own, and the W3C trace context (`traceparent`, `tracestate`) sent to the engines with
//! llm-lb's span as their parent, so a vLLM or SGLang span joins the client's trace.
//!
//! The span continues the client's trace when the request carries a `traceparent` (its sampling
//! decision is kept); other requests start a trace, sampled at `sample_ratio`. Without tracing,
//! the client's own `traceparent` passes to the engine untouched, like any other header.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often finished spans are sent.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// The tracer, once [`init`] has run.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Where and how to export spans.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// The collector's OTLP/HTTP traces URL (`http://host:4318/v1/traces`).
    pub otlp_endpoint: String,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Share of new traces (requests without a `traceparent`) that are sampled, 0–1.
    pub sample_ratio: f64,
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter for {endpoint}: {message}")]
    Exporter {
        /// The endpoint.
        endpoint: String,
        /// Why.
        message: String,
    },
    /// [`init`] already ran in this process.
    #[error("tracing is already set up")]
    AlreadySet,
}

/// Set up the exporter and the tracer. Returns the provider, whose `shutdown` flushes the spans
/// not sent yet.
pub fn init(settings: &TraceSettings) -> Result<SdkTracerProvider, TraceError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(settings.otlp_endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| TraceError::Exporter {
            endpoint: settings.otlp_endpoint.clone(),
            message: e.to_string(),
        })?;
    let batches = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(EXPORT_EVERY)
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(batches)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(settings.service_name.clone())
                .build(),
        )
        .build();
    TRACER
        .set(provider.tracer("llm-lb"))
        .map_err(|_| TraceError::AlreadySet)?;
    Ok(provider)
}

/// What a finished request's span records.
#[derive(Debug, Default)]
pub struct SpanEnd<'a> {
    /// The pool that served it.
    pub pool: Option<&'a str>,
    /// The model the body named.
    pub model: Option<&'a str>,
    /// The policy that picked the last endpoint.
    pub policy: &'a str,
    /// Its pick reason.
    pub reason: &'a str,
    /// The last endpoint tried.
    pub endpoint: Option<String>,
    /// Upstream attempts.
    pub attempts: usize,
    /// Sends again to the same endpoint over a fresh connection.
    pub reconnects: usize,
    /// Response status (0: none sent).
    pub status: u16,
    /// The error that ended it, if any.
    pub error: Option<&'a str>,
    /// Time spent reading the request body.
    pub read_body: Option<Duration>,
    /// Time spent choosing endpoints, all attempts together.
    pub choose: Duration,
    /// From the last endpoint's pick to the first byte of its answer.
    pub wait_first_byte: Option<Duration>,
}

/// The span of one request.
pub struct RequestSpan {
    span: opentelemetry_sdk::trace::Span,
}

impl RequestSpan {
    /// Start the span of a request that arrived at `started` (`None` when tracing is off).
    /// `headers` may carry the client's trace context.
    pub fn start(
        method: &str,
        path: &str,
        headers: &http::HeaderMap,
        started: SystemTime,
    ) -> Option<RequestSpan> {
        let tracer = TRACER.get()?;
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let span = tracer
            .span_builder(format!("{method} {path}"))
            .with_kind(SpanKind::Server)
            .with_start_time(started)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.to_string()),
            ])
            .start_with_context(tracer, &parent);
        Some(RequestSpan { span })
    }

    /// The trace-context headers that make this span the parent of the engine's.
    pub fn propagation_headers(&self) -> Vec<(String, String)> {
        let cx = Context::new().with_remote_span_context(self.span.span_context().clone());
        let mut headers = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut headers);
        headers.into_iter().collect()
    }

    /// Record how the request went and end the span.
    pub fn end(mut self, end: SpanEnd<'_>) {
        let seconds = |d: Duration| d.as_secs_f64();
        let mut attrs = vec![
            KeyValue::new("llm_lb.policy", end.policy.to_string()),
            KeyValue::new("llm_lb.reason", end.reason.to_string()),
            KeyValue::new("llm_lb.attempts", end.attempts as i64),
            KeyValue::new("llm_lb.reconnects", end.reconnects as i64),
            KeyValue::new("llm_lb.choose_seconds", seconds(end.choose)),
        ];
        if end.status != 0 {
            attrs.push(KeyValue::new(
                "http.response.status_code",
                i64::from(end.status),
            ));
        }
        if let Some(pool) = end.pool {
            attrs.push(KeyValue::new("llm_lb.pool", pool.to_string()));
        }
        if let Some(model) = end.model {
            attrs.push(KeyValue::new("gen_ai.request.model", model.to_string()));
        }
        if let Some(endpoint) = end.endpoint {
            attrs.push(KeyValue::new("llm_lb.endpoint", endpoint));
        }
        if let Some(d) = end.read_body {
            attrs.push(KeyValue::new("llm_lb.read_body_seconds", seconds(d)));
        }
        if let Some(d) = end.wait_first_byte {
            attrs.push(KeyValue::new("llm_lb.wait_first_byte_seconds", seconds(d)));
        }
        self.span.set_attributes(attrs);
        if let Some(error) = end.error {
            self.span.set_status(Status::error(error.to_string()));
        } else if end.status >= 500 {
            self.span
                .set_status(Status::error(format!("status {}", end.status)));
        }
        self.span.end();
    }
}
