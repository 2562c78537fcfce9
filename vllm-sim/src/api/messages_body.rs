//! The Anthropic Messages API's bodies as vLLM 0.34 writes them
//! (`vllm/entrypoints/anthropic/serving.py`, `protocol.py`).
//!
//! **Usage and the prefix cache.** vLLM maps the chat usage with `_build_anthropic_usage`:
//! Anthropic counts `input_tokens + cache_read_input_tokens + cache_creation_input_tokens` as
//! the whole prompt, so vLLM reports `cache_read_input_tokens` = the prefix-cache hits
//! (`prompt_tokens_details.cached_tokens`), `cache_creation_input_tokens` = the prompt tokens
//! the request wrote to the cache (`created_cache_tokens`: its full prompt blocks less the
//! hits, [`crate::kv_cache::cache_creation_tokens`]) and `input_tokens` = the rest (the prompt
//! less both, i.e. the tokens of its last, partial block). It does so only when the chat usage
//! carries `prompt_tokens_details` (`--enable-prompt-tokens-details`; without it, vLLM sends
//! `input_tokens` = the prompt and no cache fields). vllm-sim always reports the details in
//! chat usage, so it always reports these fields. (Before vLLM 0.34 the Anthropic usage had
//! no cache fields and `input_tokens` was the whole prompt.)
//!
//! * JSON: `{"id", "type": "message", "role": "assistant", "content": [{"type": "text",
//!   "text"}], "model", "stop_reason": "end_turn" | "max_tokens", "usage": {"input_tokens",
//!   "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"}}` (vLLM drops
//!   `null` fields, so `stop_sequence` is absent); the id is the chat completion's
//!   (`chatcmpl-…`), as vLLM sends it.
//! * SSE: `message_start` (with the usage known at the first token: input and cache fields,
//!   `output_tokens: 0`), then at the first text `content_block_start` (an empty text block,
//!   index 0), one `content_block_delta` (`text_delta`) per token, `content_block_stop`,
//!   `message_delta` (`stop_reason`, `stop_sequence: null`, the final usage) and
//!   `message_stop`, each as `event: TYPE` + `data: JSON`. vLLM sends no `ping`.

use std::collections::VecDeque;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;

use crate::api::drive::{event, Answer, SseFormat};
use crate::kv_cache::cache_creation_tokens;
use crate::metrics::FinishReason;
use crate::protocol::Null;
use crate::scheduler::Usage;

/// Anthropic `usage`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct AnthropicUsage {
    /// Prompt tokens neither read from nor written to the cache.
    pub input_tokens: usize,
    /// Output tokens.
    pub output_tokens: usize,
    /// Prompt tokens written to the cache.
    pub cache_creation_input_tokens: usize,
    /// Prompt tokens read from the cache.
    pub cache_read_input_tokens: usize,
}

impl AnthropicUsage {
    /// The usage of `prompt` tokens, `cached` of them hit, `output` generated.
    pub fn new(prompt: usize, cached: usize, output: usize, block_size: usize) -> Self {
        let created = cache_creation_tokens(prompt, cached, block_size);
        AnthropicUsage {
            input_tokens: prompt.saturating_sub(cached + created),
            output_tokens: output,
            cache_creation_input_tokens: created,
            cache_read_input_tokens: cached,
        }
    }

    fn of(u: &Usage, block_size: usize) -> Self {
        Self::new(
            u.prompt_tokens,
            u.cached_tokens,
            u.completion_tokens,
            block_size,
        )
    }
}

/// vLLM's stop reason of a finish reason.
pub fn stop_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "max_tokens",
        FinishReason::Stop | FinishReason::Abort => "end_turn",
    }
}

#[derive(Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct Message<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    content: [TextBlock<'a>; 1],
    model: &'a str,
    stop_reason: &'static str,
    usage: AnthropicUsage,
}

/// The JSON answer.
pub fn message_json(id: &str, model: &str, a: &Answer, block_size: usize) -> Response {
    let body = Message {
        id,
        kind: "message",
        role: "assistant",
        content: [TextBlock {
            kind: "text",
            text: &a.text,
        }],
        model,
        stop_reason: stop_reason(a.usage.reason),
        usage: AnthropicUsage::of(&a.usage, block_size),
    };
    let json = serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_string());
    ([(header::CONTENT_TYPE, "application/json")], json).into_response()
}

#[derive(Serialize)]
struct StartMessage<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    content: [(); 0],
    model: &'a str,
    stop_reason: Null,
    stop_sequence: Null,
    usage: AnthropicUsage,
}

#[derive(Serialize)]
struct MessageStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: StartMessage<'a>,
}

#[derive(Serialize)]
struct BlockStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    content_block: TextBlock<'a>,
    index: u32,
}

#[derive(Serialize)]
struct TextDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct BlockDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    delta: TextDelta<'a>,
    index: u32,
}

#[derive(Serialize)]
struct BlockStop {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
}

#[derive(Serialize)]
struct StopDelta {
    stop_reason: &'static str,
    stop_sequence: Null,
}

#[derive(Serialize)]
struct MessageDelta {
    #[serde(rename = "type")]
    kind: &'static str,
    delta: StopDelta,
    usage: AnthropicUsage,
}

#[derive(Serialize)]
struct MessageStop {
    #[serde(rename = "type")]
    kind: &'static str,
}

/// The SSE events of a streamed message.
#[derive(Debug)]
pub struct MessageStream {
    id: String,
    model: String,
    prompt_tokens: usize,
    block_size: usize,
    started: bool,
    block_open: bool,
}

impl MessageStream {
    /// The stream of message `id` from `model` for a prompt of `prompt_tokens`.
    pub fn new(id: String, model: String, prompt_tokens: usize, block_size: usize) -> Self {
        MessageStream {
            id,
            model,
            prompt_tokens,
            block_size,
            started: false,
            block_open: false,
        }
    }

    /// `message_start` at the first token, then the token's text.
    fn token_events(&mut self, text: &str, usage: AnthropicUsage, out: &mut VecDeque<Bytes>) {
        if !self.started {
            self.started = true;
            out.push_back(event(
                "message_start",
                &MessageStart {
                    kind: "message_start",
                    message: StartMessage {
                        id: &self.id,
                        kind: "message",
                        role: "assistant",
                        content: [],
                        model: &self.model,
                        stop_reason: None,
                        stop_sequence: None,
                        usage: AnthropicUsage {
                            output_tokens: 0,
                            ..usage
                        },
                    },
                },
            ));
        }
        if text.is_empty() {
            return;
        }
        if !self.block_open {
            self.block_open = true;
            out.push_back(event(
                "content_block_start",
                &BlockStart {
                    kind: "content_block_start",
                    content_block: TextBlock {
                        kind: "text",
                        text: "",
                    },
                    index: 0,
                },
            ));
        }
        out.push_back(event(
            "content_block_delta",
            &BlockDelta {
                kind: "content_block_delta",
                delta: TextDelta {
                    kind: "text_delta",
                    text,
                },
                index: 0,
            },
        ));
    }
}

impl SseFormat for MessageStream {
    fn token(&mut self, text: &str, cached: usize, out: &mut VecDeque<Bytes>) {
        let u = AnthropicUsage::new(self.prompt_tokens, cached, 0, self.block_size);
        self.token_events(text, u, out);
    }

    fn last(&mut self, text: &str, usage: &Usage, out: &mut VecDeque<Bytes>) {
        let u = AnthropicUsage::of(usage, self.block_size);
        self.token_events(text, u, out);
        if self.block_open {
            out.push_back(event(
                "content_block_stop",
                &BlockStop {
                    kind: "content_block_stop",
                    index: 0,
                },
            ));
        }
        out.push_back(event(
            "message_delta",
            &MessageDelta {
                kind: "message_delta",
                delta: StopDelta {
                    stop_reason: stop_reason(usage.reason),
                    stop_sequence: None,
                },
                usage: u,
            },
        ));
        out.push_back(event(
            "message_stop",
            &MessageStop {
                kind: "message_stop",
            },
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_splits_the_prompt_as_vllm() {
        // 40 prompt tokens, 16 hit: block 2 (16..32) written, 8 tokens of the partial block.
        let u = AnthropicUsage::new(40, 16, 3, 16);
        assert_eq!(
            u,
            AnthropicUsage {
                input_tokens: 8,
                output_tokens: 3,
                cache_creation_input_tokens: 16,
                cache_read_input_tokens: 16,
            }
        );
        let total = u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens;
        assert_eq!(total, 40);
        assert_eq!(stop_reason(FinishReason::Length), "max_tokens");
        assert_eq!(stop_reason(FinishReason::Stop), "end_turn");
    }

    #[test]
    fn stream_events_come_in_anthropic_order() {
        let mut s = MessageStream::new("chatcmpl-1".into(), "m".into(), 20, 16);
        let mut out = VecDeque::new();
        s.token(" the", 0, &mut out);
        s.token(" sky", 0, &mut out);
        s.last(
            "",
            &Usage {
                reason: FinishReason::Stop,
                prompt_tokens: 20,
                completion_tokens: 3,
                cached_tokens: 0,
            },
            &mut out,
        );
        let names: Vec<String> = out
            .iter()
            .map(|b| {
                let t = std::str::from_utf8(b).unwrap();
                t.lines()
                    .next()
                    .unwrap()
                    .trim_start_matches("event: ")
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let start = std::str::from_utf8(&out[0]).unwrap();
        assert!(start.contains(r#""usage":{"input_tokens":4,"output_tokens":0,"cache_creation_input_tokens":16,"cache_read_input_tokens":0}"#), "{start}");
    }
}
