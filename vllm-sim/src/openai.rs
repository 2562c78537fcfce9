//! The OpenAI-compatible API: request types, validation and the handlers of
//! `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/tokenize`, `/detokenize`,
//! `/health`, `/version` and `/metrics`, with JSON and SSE bodies shaped as vLLM sends them.
//!
//! Prompts are tokenized by the model's tokenizer when the server has one (`--tokenizer`,
//! [`crate::model_tokenizer`]), otherwise by the stand-in of [`crate::tokenizer`].
//!
//! The validation, output planning and engine submission here are shared with the other APIs
//! of [`crate::api`] (Responses, Messages, embeddings).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::metrics::FinishReason;
use crate::model_tokenizer::ModelTokenizer;
use crate::protocol::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatStreamChoice, Completion, CompletionChoice,
    CompletionStreamChoice, Delta, DetokenizeResponse, ModelCard, ModelList, ModelPermission,
    PromptTokensDetails, StreamChunk, TokenizeResponse, UsageInfo,
};
use crate::scheduler::{Event, Submission, Usage};
use crate::server::AppState;
use crate::stats::Api;
use crate::tokenizer::{self, TextGen, TokenId};

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with `usage`.
    pub include_usage: Option<bool>,
    /// Put `usage` in every chunk (vLLM extension).
    pub continuous_usage_stats: Option<bool>,
}

/// Message content: a string or a list of parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts (`{"type": "text", "text": …}` and others).
    Parts(Vec<Value>),
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, …
    pub role: String,
    /// The content (absent or null for tool-call-only messages).
    #[serde(default)]
    pub content: Option<Content>,
    /// Tool calls of an assistant message (rendered as JSON text).
    #[serde(default)]
    pub tool_calls: Option<Value>,
}

impl ChatMessage {
    /// The text the template renders for this message.
    pub fn text(&self) -> String {
        let mut out = match &self.content {
            None => String::new(),
            Some(Content::Text(s)) => s.clone(),
            Some(Content::Parts(parts)) => parts
                .iter()
                .map(
                    |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => t.clone(),
                        _ => p.to_string(),
                    },
                )
                .collect::<Vec<_>>()
                .join("\n"),
        };
        if let Some(calls) = &self.tool_calls {
            if !calls.is_null() {
                out.push_str(&calls.to_string());
            }
        }
        out
    }
}

/// The sampling fields both endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    /// Model or LoRA adapter name (default: the base model).
    pub model: Option<String>,
    /// SSE when true.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Output limit.
    pub max_tokens: Option<i64>,
    /// Output limit (preferred over `max_tokens`).
    pub max_completion_tokens: Option<i64>,
    /// Generate exactly the limit.
    pub ignore_eos: Option<bool>,
    /// Least output tokens before EOS.
    pub min_tokens: Option<i64>,
    /// Choices; only 1 is supported.
    pub n: Option<i64>,
    /// Mixed into the text generator's seed.
    pub seed: Option<i64>,
}

/// `POST /v1/chat/completions` body (fields the simulator does not use are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Shared fields.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `POST /v1/completions` body.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// A string, a list with one string, a list of token ids, or a list with one such list.
    pub prompt: Value,
    /// Shared fields.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// Which endpoint a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

impl Kind {
    /// The API this endpoint is counted under.
    pub fn api(self) -> Api {
        match self {
            Kind::Chat => Api::ChatCompletions,
            Kind::Completion => Api::Completions,
        }
    }
}

/// What the engine runs for one request: its prompt, adapter and planned output.
#[derive(Debug)]
pub(crate) struct EngineJob {
    pub(crate) lora: Option<Arc<str>>,
    pub(crate) prompt: Vec<TokenId>,
    pub(crate) output_len: usize,
    pub(crate) finish: FinishReason,
    pub(crate) gen: TextGen,
    pub(crate) eos: TokenId,
}

impl EngineJob {
    /// Queues the job; its tokens arrive on the receiver, and dropping the receiver aborts
    /// it. Errors as [`crate::scheduler::EngineClient::submit`].
    pub(crate) fn submit(
        self,
        st: &AppState,
        api: Api,
    ) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        st.engine.submit(Submission {
            prompt: self.prompt,
            lora: self.lora,
            output_len: self.output_len,
            finish: self.finish,
            eos: self.eos,
            gen: self.gen,
            tx,
            arrival: Instant::now(),
            api,
        })?;
        Ok(rx)
    }
}

/// A validated request, ready for the engine.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) kind: Kind,
    pub(crate) model: String,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) continuous_usage: bool,
    pub(crate) job: EngineJob,
}

pub(crate) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn random_hex() -> String {
    format!("{:032x}", rand::thread_rng().gen::<u128>())
}

pub(crate) fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))
}

/// Resolves the requested model: the base model or one of the LoRA adapters.
pub(crate) fn resolve_model(
    st: &AppState,
    model: Option<&str>,
) -> Result<(String, Option<Arc<str>>), ApiError> {
    match model {
        None => Ok((st.cfg.model.clone(), None)),
        Some(m) if m == st.cfg.model => Ok((m.to_string(), None)),
        Some(m) => st
            .loras
            .iter()
            .find(|l| l.name == m)
            .map(|l| (m.to_string(), Some(Arc::from(l.name.as_str()))))
            .ok_or_else(|| ApiError::model_not_found(m)),
    }
}

/// Runs tokenizer work (template rendering, encoding) off the async workers, as vLLM does.
pub(crate) async fn off_thread<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("tokenization failed: {e}"),
        )
    })?
}

/// The ids of a `/v1/completions` prompt: text is tokenized by the model's tokenizer (its
/// special tokens added when `add_special_tokens`) or by the stand-in; ids are taken as given.
fn completion_prompt(
    prompt: &Value,
    tok: Option<&ModelTokenizer>,
    add_special_tokens: bool,
) -> Result<Vec<TokenId>, ApiError> {
    fn ids(items: &[Value]) -> Option<Vec<TokenId>> {
        items
            .iter()
            .map(|v| v.as_u64().and_then(|n| TokenId::try_from(n).ok()))
            .collect()
    }
    let text = |s: &str| match tok {
        Some(t) => t.text_prompt(s, add_special_tokens),
        None => Ok(tokenizer::encode(s)),
    };
    let tokens = match prompt {
        Value::String(s) => text(s)?,
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::bad_request("prompt must not be empty"))
        }
        Value::Array(items) if items.iter().all(Value::is_number) => ids(items)
            .ok_or_else(|| ApiError::bad_request("prompt token ids must be integers >= 0"))?,
        Value::Array(items) if items.len() == 1 => match &items[0] {
            Value::String(s) => text(s)?,
            Value::Array(inner) => ids(inner)
                .ok_or_else(|| ApiError::bad_request("prompt token ids must be integers >= 0"))?,
            _ => {
                return Err(ApiError::bad_request(
                    "prompt must be a string or token ids",
                ))
            }
        },
        Value::Array(_) => {
            return Err(ApiError::bad_request(
                "vllm-sim serves one prompt per request (got a batch of prompts)",
            ))
        }
        _ => {
            return Err(ApiError::bad_request(
                "prompt must be a string or token ids",
            ))
        }
    };
    if tokens.is_empty() {
        return Err(ApiError::bad_request("prompt must not be empty"));
    }
    Ok(tokens)
}

/// Output length and finish reason, as vLLM with `ignore_eos`, or a deterministic stand-in
/// for the model's EOS: between half the limit and the limit (20–60 tokens without one).
fn plan_output(
    st: &AppState,
    s: &Sampling,
    prompt_len: usize,
    gen: &mut TextGen,
) -> Result<(usize, FinishReason), ApiError> {
    let max_len = st.cfg.max_model_len;
    let limit = s.max_completion_tokens.or(s.max_tokens);
    if let Some(m) = limit {
        if m < 1 {
            return Err(ApiError::bad_request(format!(
                "max_tokens must be at least 1, got {m}."
            )));
        }
    }
    if prompt_len >= max_len
        || limit.is_some_and(|m| prompt_len as u128 + m as u128 > max_len as u128)
    {
        let asked = limit.map(|m| m as u128).unwrap_or(0);
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {max_len} tokens. However, you requested \
             {} tokens ({prompt_len} in the messages, {asked} in the completion). Please reduce \
             the length of the messages or completion.",
            prompt_len as u128 + asked
        )));
    }
    let room = max_len - prompt_len;
    let cap = limit.map(|m| m as usize).unwrap_or(room);
    let min = match s.min_tokens {
        None => 0,
        Some(m) if m < 0 => return Err(ApiError::bad_request("min_tokens must be >= 0")),
        Some(m) if m as u128 > cap as u128 => {
            return Err(ApiError::bad_request(
                "min_tokens must be less than or equal to max_tokens",
            ))
        }
        Some(m) => m as usize,
    };
    if s.ignore_eos.unwrap_or(false) {
        return Ok((cap, FinishReason::Length));
    }
    let (lo, hi) = match limit {
        Some(_) => (cap.div_ceil(2), cap),
        None => (20.min(cap), 60.min(cap)),
    };
    let len = gen.draw(lo.max(min).max(1), hi.max(min).max(1)).min(cap);
    let reason = if len >= cap {
        FinishReason::Length
    } else {
        FinishReason::Stop
    };
    Ok((len, reason))
}

pub(crate) fn prepare(
    st: &AppState,
    kind: Kind,
    s: &Sampling,
    prompt: Vec<TokenId>,
) -> Result<Prepared, ApiError> {
    let (model, lora) = resolve_model(st, s.model.as_deref())?;
    if let Some(n) = s.n {
        if n != 1 {
            return Err(ApiError::bad_request(format!(
                "vllm-sim supports only n=1 (got n={n})."
            )));
        }
    }
    let stream = s.stream.unwrap_or(false);
    if s.stream_options.is_some() && !stream {
        return Err(ApiError::bad_request(
            "Stream options can only be defined when `stream=True`.",
        ));
    }
    let opts = s.stream_options.clone().unwrap_or_default();
    let salt = tokenizer::digest(&prompt) ^ s.seed.map(|v| v as u64).unwrap_or(0);
    // vLLM stops both endpoints on the tokenizer's EOS; the stand-in has one per endpoint.
    let (mut gen, eos) = match &st.tokenizer {
        Some(t) => (
            TextGen::with_words(st.cfg.seed, salt, t.words().clone()),
            t.eos(),
        ),
        None => (
            TextGen::new(st.cfg.seed, salt),
            match kind {
                Kind::Chat => tokenizer::IM_END,
                Kind::Completion => tokenizer::END_OF_TEXT,
            },
        ),
    };
    let (output_len, finish) = plan_output(st, s, prompt.len(), &mut gen)?;
    Ok(Prepared {
        kind,
        model,
        stream,
        include_usage: opts.include_usage.unwrap_or(false),
        continuous_usage: opts.continuous_usage_stats.unwrap_or(false),
        job: EngineJob {
            lora,
            prompt,
            output_len,
            finish,
            gen,
            eos,
        },
    })
}

/// Applies the latency and failure faults; `Err` is the injected failure. (`hang` pauses
/// the engine, so accepted requests queue and stall there.)
pub(crate) async fn apply_faults(st: &AppState) -> Result<(), ApiError> {
    let extra = st.faults.get().extra_latency_ms;
    if extra > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(extra / 1000.0)).await;
    }
    if let Some(err) = st.faults.draw_failure() {
        st.engine.count_failure();
        return Err(err);
    }
    Ok(())
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(st): State<AppState>, body: Bytes) -> Response {
    let run = async {
        apply_faults(&st).await?;
        let (sampling, prompt) = match st.tokenizer.clone() {
            None => {
                let req: ChatRequest = parse(&body)?;
                if req.messages.is_empty() {
                    return Err(ApiError::bad_request("messages must not be empty"));
                }
                let texts: Vec<(String, String)> = req
                    .messages
                    .iter()
                    .map(|m| (m.role.clone(), m.text()))
                    .collect();
                let prompt =
                    tokenizer::render_chat(texts.iter().map(|(r, c)| (r.as_str(), c.as_str())));
                (req.sampling, prompt)
            }
            Some(tok) => {
                // The whole body goes through the template: tools, add_generation_prompt,
                // chat_template_kwargs … apply as in vLLM.
                let request: Value = parse(&body)?;
                let sampling = Sampling::deserialize(&request)
                    .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))?;
                let prompt = off_thread(move || tok.chat_prompt(&request)).await?;
                if prompt.is_empty() {
                    return Err(ApiError::bad_request("The decoder prompt cannot be empty"));
                }
                (sampling, prompt)
            }
        };
        let prepared = prepare(&st, Kind::Chat, &sampling, prompt)?;
        run_request(&st, prepared).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/completions`.
pub async fn completions(State(st): State<AppState>, body: Bytes) -> Response {
    let run = async {
        apply_faults(&st).await?;
        let CompletionRequest { prompt, sampling } = parse(&body)?;
        let prompt = match st.tokenizer.clone() {
            None => completion_prompt(&prompt, None, true)?,
            Some(tok) => off_thread(move || completion_prompt(&prompt, Some(&tok), true)).await?,
        };
        let prepared = prepare(&st, Kind::Completion, &sampling, prompt)?;
        run_request(&st, prepared).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// The parts of every response body that do not change per chunk.
struct Envelope {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Envelope {
    fn usage(u: &Usage) -> UsageInfo {
        UsageInfo {
            prompt_tokens: u.prompt_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            completion_tokens: u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            },
        }
    }

    fn chunk_object(&self) -> &'static str {
        match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        }
    }

    fn chunk<C: Serialize>(&self, choices: Vec<C>, usage: Option<UsageInfo>) -> Bytes {
        sse(&StreamChunk {
            id: &self.id,
            object: self.chunk_object(),
            created: self.created,
            model: &self.model,
            choices,
            usage,
        })
    }

    fn role_chunk(&self, usage: Option<UsageInfo>) -> Bytes {
        self.chunk(
            vec![ChatStreamChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: "",
                },
                logprobs: None,
                finish_reason: None,
                stop_reason: None,
            }],
            usage,
        )
    }

    fn token_chunk(
        &self,
        text: &str,
        finish: Option<FinishReason>,
        usage: Option<UsageInfo>,
    ) -> Bytes {
        let finish_reason = finish.map(FinishReason::as_str);
        match self.kind {
            Kind::Chat => self.chunk(
                vec![ChatStreamChoice {
                    index: 0,
                    delta: Delta {
                        role: None,
                        content: text,
                    },
                    logprobs: None,
                    finish_reason,
                    stop_reason: finish.map(|_| None),
                }],
                usage,
            ),
            Kind::Completion => self.chunk(
                vec![CompletionStreamChoice {
                    index: 0,
                    text,
                    logprobs: None,
                    finish_reason,
                    stop_reason: None,
                }],
                usage,
            ),
        }
    }

    fn usage_chunk(&self, u: &Usage) -> Bytes {
        self.chunk::<()>(Vec::new(), Some(Self::usage(u)))
    }

    fn full(&self, text: &str, u: &Usage) -> String {
        let usage = Self::usage(u);
        let finish_reason = u.reason.as_str();
        let out = match self.kind {
            Kind::Chat => serde_json::to_string(&ChatCompletion {
                id: &self.id,
                object: "chat.completion",
                created: self.created,
                model: &self.model,
                choices: [ChatChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant",
                        content: text,
                        refusal: None,
                        annotations: None,
                        audio: None,
                        function_call: None,
                        tool_calls: [],
                        reasoning_content: None,
                    },
                    logprobs: None,
                    finish_reason,
                    stop_reason: None,
                }],
                service_tier: None,
                system_fingerprint: None,
                usage,
                prompt_logprobs: None,
                kv_transfer_params: None,
            }),
            Kind::Completion => serde_json::to_string(&Completion {
                id: &self.id,
                object: "text_completion",
                created: self.created,
                model: &self.model,
                choices: [CompletionChoice {
                    index: 0,
                    text,
                    logprobs: None,
                    finish_reason,
                    stop_reason: None,
                    prompt_logprobs: None,
                }],
                service_tier: None,
                system_fingerprint: None,
                usage,
                kv_transfer_params: None,
            }),
        };
        out.unwrap_or_else(|_| "{}".to_string())
    }
}

fn sse<T: Serialize>(v: &T) -> Bytes {
    match serde_json::to_string(v) {
        Ok(s) => Bytes::from(format!("data: {s}\n\n")),
        Err(_) => Bytes::from_static(b"data: {}\n\n"),
    }
}

pub(crate) fn closed_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "vllm-sim fault: connection closed",
    )
}

async fn run_request(st: &AppState, p: Prepared) -> Result<Response, ApiError> {
    let env = Envelope {
        kind: p.kind,
        id: match p.kind {
            Kind::Chat => format!("chatcmpl-{}", random_hex()),
            Kind::Completion => format!("cmpl-{}", random_hex()),
        },
        created: unix_secs(),
        model: p.model,
    };
    let prompt_tokens = p.job.prompt.len();
    let rx = p.job.submit(st, p.kind.api())?;
    let close_after = st.faults.get().close_after_tokens;
    if p.stream {
        let stream = SseStream {
            rx,
            env,
            pending: VecDeque::new(),
            sent_tokens: 0,
            close_after,
            include_usage: p.include_usage,
            continuous_usage: p.continuous_usage,
            prompt_tokens,
            done: false,
        };
        let body = Body::from_stream(futures_util::stream::unfold(stream, SseStream::next));
        return Ok((
            [(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")],
            body,
        )
            .into_response());
    }
    collect_json(rx, env, close_after).await
}

/// Waits for the whole answer and returns it as one JSON body.
async fn collect_json(
    mut rx: mpsc::UnboundedReceiver<Event>,
    env: Envelope,
    close_after: Option<u64>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut n = 0u64;
    loop {
        if close_after.is_some_and(|c| n >= c) {
            let body = Body::from_stream(futures_util::stream::once(async {
                Err::<Bytes, _>(closed_error())
            }));
            return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
        }
        match rx.recv().await {
            Some(Event::Token(t, _)) => {
                text.push_str(&t);
                n += 1;
            }
            Some(Event::Last(t, usage)) => {
                text.push_str(&t);
                let body = env.full(&text, &usage);
                return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The engine stopped before the request finished.",
                ))
            }
        }
    }
}

/// The SSE body of a streaming request.
struct SseStream {
    rx: mpsc::UnboundedReceiver<Event>,
    env: Envelope,
    pending: VecDeque<Bytes>,
    sent_tokens: u64,
    close_after: Option<u64>,
    include_usage: bool,
    continuous_usage: bool,
    prompt_tokens: usize,
    done: bool,
}

type Chunk = Result<Bytes, std::io::Error>;

impl SseStream {
    fn running_usage(&self, cached: usize) -> Option<UsageInfo> {
        (self.include_usage && self.continuous_usage).then(|| {
            Envelope::usage(&Usage {
                reason: FinishReason::Length,
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.sent_tokens as usize,
                cached_tokens: cached,
            })
        })
    }

    async fn next(mut self) -> Option<(Chunk, SseStream)> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Some((Ok(b), self));
            }
            if self.done {
                return None;
            }
            let ev = self.rx.recv().await;
            if self.close_after.is_some_and(|c| self.sent_tokens >= c) {
                self.done = true;
                return Some((Err(closed_error()), self));
            }
            match ev {
                None => {
                    self.done = true;
                    return Some((Err(closed_error()), self));
                }
                Some(Event::Token(text, cached)) => {
                    if self.sent_tokens == 0 && self.env.kind == Kind::Chat {
                        let u = self.running_usage(cached);
                        self.pending.push_back(self.env.role_chunk(u));
                    }
                    self.sent_tokens += 1;
                    let u = self.running_usage(cached);
                    self.pending.push_back(self.env.token_chunk(&text, None, u));
                }
                Some(Event::Last(text, usage)) => {
                    if self.sent_tokens == 0 && self.env.kind == Kind::Chat {
                        let u = self.running_usage(usage.cached_tokens);
                        self.pending.push_back(self.env.role_chunk(u));
                    }
                    self.sent_tokens += 1;
                    let u = (self.include_usage && self.continuous_usage)
                        .then(|| Envelope::usage(&usage));
                    self.pending
                        .push_back(self.env.token_chunk(&text, Some(usage.reason), u));
                    if self.include_usage {
                        self.pending.push_back(self.env.usage_chunk(&usage));
                    }
                    self.pending
                        .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    self.done = true;
                }
            }
        }
    }
}

/// `GET /v1/models`: the base model and the LoRA adapters, as vLLM lists them.
pub async fn models(State(st): State<AppState>) -> Response {
    st.faults.wait_while_hung().await;
    let created = unix_secs();
    let perm = || {
        [ModelPermission::new(
            format!("modelperm-{}", random_hex()),
            created,
        )]
    };
    let mut data = vec![ModelCard {
        id: &st.cfg.model,
        object: "model",
        created,
        owned_by: "vllm",
        root: &st.cfg.model,
        parent: None,
        max_model_len: Some(st.cfg.max_model_len),
        permission: perm(),
    }];
    for l in st.loras.iter() {
        data.push(ModelCard {
            id: &l.name,
            object: "model",
            created,
            owned_by: "vllm",
            root: &l.path,
            parent: Some(&st.cfg.model),
            max_model_len: None,
            permission: perm(),
        });
    }
    axum::Json(ModelList {
        object: "list",
        data,
    })
    .into_response()
}

/// `POST /tokenize` (vLLM's): `{"prompt": …}` or `{"messages": […]}` → token ids and count.
///
/// With the model's tokenizer, a chat request is rendered as `/v1/chat/completions` renders it
/// (`add_generation_prompt`, `continue_final_message`, `tools`, `chat_template_kwargs`), special
/// tokens added only with `add_special_tokens: true`; a prompt gets them unless
/// `add_special_tokens: false`; `return_token_strs` adds the vocabulary strings. The stand-in
/// ignores these options.
pub async fn tokenize(State(st): State<AppState>, body: Bytes) -> Response {
    #[derive(Deserialize)]
    struct TokenizeRequest {
        model: Option<String>,
        prompt: Option<Value>,
        messages: Option<Value>,
        add_special_tokens: Option<bool>,
        return_token_strs: Option<bool>,
    }
    let run = async {
        let req: TokenizeRequest = parse(&body)?;
        resolve_model(&st, req.model.as_deref())?;
        let (tokens, token_strs) = match (st.tokenizer.clone(), req.prompt, req.messages) {
            (None, Some(p), None) => (completion_prompt(&p, None, true)?, None),
            (None, None, Some(msgs)) => {
                let msgs = Vec::<ChatMessage>::deserialize(&msgs)
                    .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))?;
                let texts: Vec<(String, String)> =
                    msgs.iter().map(|m| (m.role.clone(), m.text())).collect();
                let tokens =
                    tokenizer::render_chat(texts.iter().map(|(r, c)| (r.as_str(), c.as_str())));
                (tokens, None)
            }
            (Some(tok), prompt, messages) if prompt.is_some() != messages.is_some() => {
                let request: Value = parse(&body)?;
                let strs = req.return_token_strs.unwrap_or(false);
                off_thread(move || {
                    let tokens = match &prompt {
                        Some(p) => completion_prompt(
                            p,
                            Some(&tok),
                            req.add_special_tokens.unwrap_or(true),
                        )?,
                        None if req.add_special_tokens.unwrap_or(false) => {
                            tok.chat_prompt_with_special_tokens(&request)?
                        }
                        None => tok.chat_prompt(&request)?,
                    };
                    let token_strs = strs.then(|| tok.token_strs(&tokens));
                    Ok((tokens, token_strs))
                })
                .await?
            }
            _ => {
                return Err(ApiError::bad_request(
                    "give exactly one of `prompt` and `messages`",
                ))
            }
        };
        Ok(axum::Json(TokenizeResponse {
            count: tokens.len(),
            max_model_len: st.cfg.max_model_len,
            tokens,
            token_strs,
        })
        .into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /detokenize` (vLLM's): `{"tokens": [ids]}` → `{"prompt": text}`, special tokens
/// included. The stand-in hashes text pieces, so it names only its special tokens and the
/// generated words; other ids get a 400 (start with `--tokenizer` for a real vocabulary).
pub async fn detokenize(State(st): State<AppState>, body: Bytes) -> Response {
    #[derive(Deserialize)]
    struct DetokenizeRequest {
        model: Option<String>,
        tokens: Vec<u64>,
    }
    let run = async {
        let req: DetokenizeRequest = parse(&body)?;
        resolve_model(&st, req.model.as_deref())?;
        let ids: Vec<TokenId> = req
            .tokens
            .iter()
            .map(|&t| TokenId::try_from(t))
            .collect::<Result<_, _>>()
            .map_err(|_| ApiError::bad_request("token ids must fit in 32 bits"))?;
        let prompt = match st.tokenizer.clone() {
            Some(tok) => off_thread(move || tok.decode(&ids)).await?,
            None => tokenizer::decode_known(&ids).map_err(|id| {
                ApiError::bad_request(format!(
                    "Token id {id} is not one vllm-sim's stand-in tokenizer can decode: it \
                     hashes prompt text and names only its special tokens and generated words \
                     (start it with --tokenizer DIR for a real vocabulary)."
                ))
            })?,
        };
        Ok::<_, ApiError>(axum::Json(DetokenizeResponse { prompt }).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /health`: empty 200 (or the injected status).
pub async fn health(State(st): State<AppState>) -> Response {
    st.faults.wait_while_hung().await;
    let status = StatusCode::from_u16(st.faults.get().health_status).unwrap_or(StatusCode::OK);
    status.into_response()
}

/// `GET /version`.
pub async fn version() -> Response {
    #[derive(Serialize)]
    struct Version {
        version: &'static str,
    }
    axum::Json(Version {
        version: concat!(env!("CARGO_PKG_VERSION"), "+vllm-sim"),
    })
    .into_response()
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(st): State<AppState>) -> Response {
    let text = {
        let s = st.engine.shared().state.lock();
        crate::metrics::render(&st.exposition, &s.metrics)
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
