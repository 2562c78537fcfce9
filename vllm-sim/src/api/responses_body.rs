//! The Responses API's bodies as vLLM 0.34 writes them (`ResponsesResponse` and the streaming
//! events of `SimpleStreamingEventProcessor`, `vllm/entrypoints/openai/responses/`), with their
//! fields in vLLM's order:
//!
//! * the response object: `id` (`resp_…`), `created_at`, `incomplete_details`
//!   (`{"reason": "max_output_tokens"}` when the output limit stopped it), the request's echoed
//!   settings, `object: "response"`, `output`, `status` (`completed`, or `incomplete` on the
//!   limit), `usage` with `input_tokens_details.cached_tokens` (the prefix-cache hits, always
//!   reported) and `cache_write_tokens`;
//! * one output item, `{"type": "message", "id": "msg_…", "role": "assistant", "status",
//!   "content": [{"type": "output_text", "text", "annotations": []}]}` (no content part for an
//!   empty text);
//! * the stream: `response.created`, `response.in_progress`, then at the first text
//!   `response.output_item.added` and `response.content_part.added`, one
//!   `response.output_text.delta` per token, `response.output_text.done`,
//!   `response.content_part.done`, `response.output_item.done`, and `response.completed` (or
//!   `response.incomplete`) carrying the whole response with its usage; each event has its
//!   `sequence_number`, from 0, and goes out as `event: TYPE` + `data: JSON`.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};

use crate::api::drive::{event, SseFormat};
use crate::api::store::{ResponseStore, StoredResponse};
use crate::kv_cache::cache_creation_tokens;
use crate::metrics::FinishReason;
use crate::openai::random_hex;
use crate::protocol::Null;
use crate::scheduler::Usage;

/// `incomplete_details`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IncompleteDetails {
    /// Why: `max_output_tokens`.
    pub reason: &'static str,
}

/// An `output_text` content part.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutputText {
    /// Always empty.
    pub annotations: [(); 0],
    /// The text.
    pub text: String,
    /// `output_text`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `[]` while streaming, `null` in the finished item.
    pub logprobs: Option<[(); 0]>,
}

impl OutputText {
    fn new(text: String, logprobs: Option<[(); 0]>) -> Self {
        OutputText {
            annotations: [],
            text,
            kind: "output_text",
            logprobs,
        }
    }
}

/// The assistant `message` output item.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutputMessage {
    /// `msg_…`.
    pub id: String,
    /// The text part (none for an empty text).
    pub content: Vec<OutputText>,
    /// `assistant`.
    pub role: &'static str,
    /// `in_progress`, `completed` or `incomplete`.
    pub status: &'static str,
    /// `message`.
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl OutputMessage {
    /// A new item id.
    pub fn new_id() -> String {
        format!("msg_{}", random_hex())
    }

    /// The finished item of `text`.
    pub fn finished(id: String, text: &str, reason: FinishReason) -> Self {
        let content = if text.is_empty() {
            Vec::new()
        } else {
            vec![OutputText::new(text.to_string(), None)]
        };
        OutputMessage {
            id,
            content,
            role: "assistant",
            status: item_status(reason),
            kind: "message",
        }
    }
}

/// vLLM's `response_item_status`: `incomplete` when the length limit ended the output.
fn item_status(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "incomplete",
        FinishReason::Stop | FinishReason::Abort => "completed",
    }
}

/// `usage.input_tokens_details`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InputTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    /// Prompt tokens the request wrote to the prefix cache.
    pub cache_write_tokens: usize,
    /// Per turn (multi-turn tool contexts only): empty.
    pub input_tokens_per_turn: [(); 0],
    /// Per turn: empty.
    pub cached_tokens_per_turn: [(); 0],
}

/// `usage.output_tokens_details`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutputTokensDetails {
    /// Always 0 (no reasoning parser).
    pub reasoning_tokens: usize,
    /// Always 0 (no built-in tools).
    pub tool_output_tokens: usize,
    /// Per turn: empty.
    pub output_tokens_per_turn: [(); 0],
    /// Per turn: empty.
    pub tool_output_tokens_per_turn: [(); 0],
}

/// `usage` of a response.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ResponseUsage {
    /// Prompt tokens.
    pub input_tokens: usize,
    /// Cache details.
    pub input_tokens_details: InputTokensDetails,
    /// Output tokens (EOS included).
    pub output_tokens: usize,
    /// Output details.
    pub output_tokens_details: OutputTokensDetails,
    /// Input + output.
    pub total_tokens: usize,
}

impl ResponseUsage {
    /// The usage of a finished request on a cache of `block_size`-token blocks.
    pub fn new(u: &Usage, block_size: usize) -> Self {
        ResponseUsage {
            input_tokens: u.prompt_tokens,
            input_tokens_details: InputTokensDetails {
                cached_tokens: u.cached_tokens,
                cache_write_tokens: cache_creation_tokens(
                    u.prompt_tokens,
                    u.cached_tokens,
                    block_size,
                ),
                input_tokens_per_turn: [],
                cached_tokens_per_turn: [],
            },
            output_tokens: u.completion_tokens,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: 0,
                tool_output_tokens: 0,
                output_tokens_per_turn: [],
                tool_output_tokens_per_turn: [],
            },
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

/// The response object (vLLM's `ResponsesResponse`, fields in its order; settings the request
/// did not give are vLLM's defaults).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ResponseBody {
    pub id: String,
    pub created_at: u64,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<String>,
    pub metadata: Option<Value>,
    pub model: String,
    pub object: &'static str,
    pub output: Vec<OutputMessage>,
    pub parallel_tool_calls: bool,
    pub temperature: f64,
    pub tool_choice: Value,
    pub tools: Vec<Value>,
    pub top_p: f64,
    pub background: bool,
    pub max_output_tokens: usize,
    pub max_tool_calls: Option<i64>,
    pub previous_response_id: Option<String>,
    pub prompt: Option<Value>,
    pub prompt_cache_options: Null,
    pub prompt_cache_key: Option<String>,
    pub prompt_cache_retention: Option<Value>,
    pub reasoning: Option<Value>,
    pub safety_identifier: Option<String>,
    pub service_tier: String,
    pub status: &'static str,
    pub text: Option<Value>,
    pub top_logprobs: Null,
    pub truncation: String,
    pub usage: Option<ResponseUsage>,
    pub user: Option<String>,
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub kv_transfer_params: Null,
    pub ec_transfer_params: Null,
    pub input_messages: Null,
    pub output_messages: Null,
}

impl ResponseBody {
    /// A new response id.
    pub fn new_id() -> String {
        format!("resp_{}", random_hex())
    }

    /// The finished response: its output, status and usage.
    pub fn finish(&mut self, output: Vec<OutputMessage>, u: &Usage, block_size: usize) {
        let incomplete = u.reason == FinishReason::Length;
        self.output = output;
        self.status = if incomplete {
            "incomplete"
        } else {
            "completed"
        };
        self.incomplete_details = incomplete.then_some(IncompleteDetails {
            reason: "max_output_tokens",
        });
        self.usage = Some(ResponseUsage::new(u, block_size));
    }

    /// The JSON text.
    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }
}

/// Where a finished response is kept for `previous_response_id` (`store` not false).
#[derive(Debug)]
pub struct Keep {
    /// The server's store.
    pub store: Arc<ResponseStore>,
    /// The request's messages without system messages (its continuation's start).
    pub history: Vec<Value>,
}

impl Keep {
    /// Stores the finished `body` whose assistant text is `text`. As vLLM rebuilds a
    /// continuation from the stored output, each content part becomes an assistant message,
    /// and an empty text none.
    pub fn keep(self, body: &ResponseBody, json: String) {
        let mut history = self.history;
        for item in &body.output {
            for part in &item.content {
                history.push(json!({"role": "assistant", "content": part.text}));
            }
        }
        self.store.insert(
            body.id.clone(),
            StoredResponse {
                history,
                body: json,
            },
        );
    }
}

#[derive(Serialize)]
struct ResponseEvent<'a> {
    response: &'a ResponseBody,
    sequence_number: u64,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct ItemEvent<'a> {
    item: &'a OutputMessage,
    output_index: u32,
    sequence_number: u64,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct PartEvent<'a> {
    content_index: u32,
    item_id: &'a str,
    output_index: u32,
    part: &'a OutputText,
    sequence_number: u64,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct TextDeltaEvent<'a> {
    content_index: u32,
    delta: &'a str,
    item_id: &'a str,
    logprobs: [(); 0],
    output_index: u32,
    sequence_number: u64,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct TextDoneEvent<'a> {
    content_index: u32,
    item_id: &'a str,
    logprobs: [(); 0],
    output_index: u32,
    sequence_number: u64,
    text: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
}

/// The SSE events of a streamed response.
#[derive(Debug)]
pub struct ResponseStream {
    body: ResponseBody,
    seq: u64,
    /// The open message item's id and text so far, once text arrived.
    item: Option<(String, String)>,
    block_size: usize,
    keep: Option<Keep>,
}

impl ResponseStream {
    /// The stream of `body` (status `in_progress`) and its first events, `response.created`
    /// and `response.in_progress`, sent before the engine's first token as vLLM sends them.
    pub fn start(
        body: ResponseBody,
        block_size: usize,
        keep: Option<Keep>,
    ) -> (Self, VecDeque<Bytes>) {
        let mut s = ResponseStream {
            body,
            seq: 0,
            item: None,
            block_size,
            keep,
        };
        let mut first = VecDeque::new();
        for kind in ["response.created", "response.in_progress"] {
            let seq = s.next_seq();
            first.push_back(event(
                kind,
                &ResponseEvent {
                    response: &s.body,
                    sequence_number: seq,
                    kind,
                },
            ));
        }
        (s, first)
    }

    fn next_seq(&mut self) -> u64 {
        let n = self.seq;
        self.seq += 1;
        n
    }

    /// A text delta: opens the message item at the first text (empty text, the EOS, sends
    /// nothing).
    fn delta(&mut self, text: &str, out: &mut VecDeque<Bytes>) {
        if text.is_empty() {
            return;
        }
        if self.item.is_none() {
            let id = OutputMessage::new_id();
            let item = OutputMessage {
                id: id.clone(),
                content: Vec::new(),
                role: "assistant",
                status: "in_progress",
                kind: "message",
            };
            let kind = "response.output_item.added";
            let seq = self.next_seq();
            out.push_back(event(
                kind,
                &ItemEvent {
                    item: &item,
                    output_index: 0,
                    sequence_number: seq,
                    kind,
                },
            ));
            let kind = "response.content_part.added";
            let seq = self.next_seq();
            out.push_back(event(
                kind,
                &PartEvent {
                    content_index: 0,
                    item_id: &id,
                    output_index: 0,
                    part: &OutputText::new(String::new(), Some([])),
                    sequence_number: seq,
                    kind,
                },
            ));
            self.item = Some((id, String::new()));
        }
        let kind = "response.output_text.delta";
        let seq = self.next_seq();
        if let Some((id, acc)) = &mut self.item {
            acc.push_str(text);
            out.push_back(event(
                kind,
                &TextDeltaEvent {
                    content_index: 0,
                    delta: text,
                    item_id: id,
                    logprobs: [],
                    output_index: 0,
                    sequence_number: seq,
                    kind,
                },
            ));
        }
    }
}

impl SseFormat for ResponseStream {
    fn token(&mut self, text: &str, _cached: usize, out: &mut VecDeque<Bytes>) {
        self.delta(text, out);
    }

    fn last(&mut self, text: &str, usage: &Usage, out: &mut VecDeque<Bytes>) {
        self.delta(text, out);
        let mut output = Vec::new();
        if let Some((id, acc)) = self.item.take() {
            let part = OutputText::new(acc.clone(), None);
            let item = OutputMessage::finished(id, &acc, usage.reason);
            let kind = "response.output_text.done";
            let seq = self.next_seq();
            out.push_back(event(
                kind,
                &TextDoneEvent {
                    content_index: 0,
                    item_id: &item.id,
                    logprobs: [],
                    output_index: 0,
                    sequence_number: seq,
                    text: &acc,
                    kind,
                },
            ));
            let kind = "response.content_part.done";
            let seq = self.next_seq();
            out.push_back(event(
                kind,
                &PartEvent {
                    content_index: 0,
                    item_id: &item.id,
                    output_index: 0,
                    part: &part,
                    sequence_number: seq,
                    kind,
                },
            ));
            let kind = "response.output_item.done";
            let seq = self.next_seq();
            out.push_back(event(
                kind,
                &ItemEvent {
                    item: &item,
                    output_index: 0,
                    sequence_number: seq,
                    kind,
                },
            ));
            output.push(item);
        }
        self.body.finish(output, usage, self.block_size);
        let kind = if self.body.status == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        let seq = self.next_seq();
        out.push_back(event(
            kind,
            &ResponseEvent {
                response: &self.body,
                sequence_number: seq,
                kind,
            },
        ));
        if let Some(keep) = self.keep.take() {
            keep.keep(&self.body, self.body.json());
        }
    }
}
