//! What llm-lb understands of a request: an OpenAI- or Anthropic-style body parsed tolerantly
//! into a summary, by the API its path names ([`Api`]).
//!
//! Nothing here rejects a request: a body that is not JSON, lacks a model or messages, or has
//! fields of the wrong type still yields an [`LlmRequest`] and is proxied unchanged; it just carries
//! no prefix blocks, so policies route it by their fallback. Load-only calls (embeddings, rerank)
//! have no prompt to keep warm but are routed by the pool's policy, by load.

use std::sync::Arc;

use serde_json::Value;

use crate::apis::{self, Api};
use crate::prefix::{self, BlockKey};
use crate::telemetry::FallbackReason;

/// How the request body looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body (GET, or Content-Length 0).
    Empty,
    /// A body that is not a JSON object.
    NotJson,
    /// A JSON object.
    Json,
}

/// The summary of one request that routing needs.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    /// How the body looked.
    pub body: BodyKind,
    /// `model`, when it is a string.
    pub model: Option<String>,
    /// `stream: true`.
    pub stream: bool,
    /// Ordered chain of prefix block keys (DESIGN §3.5); empty without messages or prompt.
    pub blocks: Vec<BlockKey>,
    /// The parsed body, for policies that read more of it (`kv_aware` tokenizes the chat).
    pub json: Option<Arc<Value>>,
    /// The API the request calls.
    pub api: Api,
    /// A Responses or Messages body as the equivalent chat-completions body (see
    /// [`apis::as_chat`]): what the engine renders through its chat template.
    pub chat: Option<Arc<Value>>,
    /// Body size in bytes.
    pub bytes: usize,
    /// The key of the session the request names (see [`prefix::session_key`] and
    /// [`prefix::session_chain`]), when its pool keeps session affinity; set by the proxy, which
    /// sees the headers.
    pub session: Option<BlockKey>,
    /// The key of the response a Responses API request continues (its `previous_response_id`,
    /// see [`prefix::response_key`]): the endpoint that stored that response must serve it.
    pub previous_response: Option<BlockKey>,
}

impl LlmRequest {
    /// A request without a body.
    pub fn empty() -> Self {
        LlmRequest {
            body: BodyKind::Empty,
            model: None,
            stream: false,
            blocks: Vec::new(),
            json: None,
            api: Api::Other,
            chat: None,
            bytes: 0,
            session: None,
            previous_response: None,
        }
    }

    /// Summarise a request body whose API is not known from a path (judged by its shape: chat
    /// `messages`, or a completions `prompt`). Never fails.
    pub fn parse(body: &[u8]) -> Self {
        Self::parse_for(Api::Other, body)
    }

    /// Summarise the body of a request to `path` (see [`Api::of_path`]). Never fails.
    pub fn parse_path(path: &str, body: &[u8]) -> Self {
        Self::parse_for(Api::of_path(path), body)
    }

    /// Summarise the body of a request to `api`. Never fails.
    pub fn parse_for(api: Api, body: &[u8]) -> Self {
        let empty = LlmRequest {
            api,
            bytes: body.len(),
            ..Self::empty()
        };
        if body.is_empty() {
            return empty;
        }
        let v: Value = match serde_json::from_slice(body) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return LlmRequest {
                    body: BodyKind::NotJson,
                    ..empty
                }
            }
        };
        let model = v.get("model").and_then(Value::as_str).map(str::to_owned);
        let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let model_key = model.as_deref().unwrap_or("");
        let chat = apis::as_chat(api, &v).map(Arc::new);
        let prompt_body = chat.as_deref().unwrap_or(&v);
        let blocks = if api.load_only() {
            Vec::new()
        } else if let Some(messages) = prompt_body.get("messages") {
            prefix::chat_blocks(model_key, messages)
        } else if let Some(prompt) = prompt_body.get("prompt") {
            prefix::prompt_blocks(model_key, prompt)
        } else {
            Vec::new()
        };
        let previous_response = v
            .get("previous_response_id")
            .and_then(Value::as_str)
            .filter(|id| api == Api::Responses && !id.is_empty())
            .map(prefix::response_key);
        LlmRequest {
            body: BodyKind::Json,
            model,
            stream,
            blocks,
            json: Some(Arc::new(v)),
            chat,
            previous_response,
            ..empty
        }
    }

    /// The body the engine renders: the chat-completions form of a Responses or Messages
    /// request, else the body itself.
    pub fn prompt_body(&self) -> Option<&Value> {
        self.chat.as_deref().or(self.json.as_deref())
    }

    /// Why the request is routed by the pool's fallback instead of its policy (one of
    /// [`FallbackReason::REQUEST`]), if it is.
    pub fn fallback_reason(&self) -> Option<FallbackReason> {
        match self.body {
            BodyKind::Empty => Some(FallbackReason::NoBody),
            BodyKind::NotJson => Some(FallbackReason::NotJson),
            BodyKind::Json if self.blocks.is_empty() && !self.api.load_only() => {
                Some(FallbackReason::NoPrompt)
            }
            BodyKind::Json => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_request() {
        let r = LlmRequest::parse(
            br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert_eq!(r.model.as_deref(), Some("m"));
        assert!(r.stream);
        assert_eq!(r.blocks.len(), 1);
        assert_eq!(r.fallback_reason(), None);
    }

    #[test]
    fn tolerant_of_anything() {
        assert_eq!(
            LlmRequest::parse(b"").fallback_reason(),
            Some(FallbackReason::NoBody)
        );
        assert_eq!(
            LlmRequest::parse(b"not json").fallback_reason(),
            Some(FallbackReason::NotJson)
        );
        assert_eq!(
            LlmRequest::parse(b"[1,2]").fallback_reason(),
            Some(FallbackReason::NotJson)
        );
        assert_eq!(
            LlmRequest::parse(b"{\"model\":\"m\"").fallback_reason(),
            Some(FallbackReason::NotJson)
        );
        let r = LlmRequest::parse(br#"{"model":5,"stream":"yes","messages":7}"#);
        assert_eq!(r.model, None);
        assert!(!r.stream);
        assert_eq!(r.fallback_reason(), Some(FallbackReason::NoPrompt));
        let r = LlmRequest::parse(br#"{"model":"m","input":"embed me"}"#);
        assert_eq!(r.fallback_reason(), Some(FallbackReason::NoPrompt));
        let r = LlmRequest::parse(br#"{"model":"m","prompt":"once upon"}"#);
        assert_eq!(r.blocks.len(), 1);
    }

    #[test]
    fn every_api_by_its_path() {
        let chat = LlmRequest::parse_path(
            "/v1/chat/completions",
            br#"{"model":"m","messages":[{"role":"system","content":"sys"},{"role":"user","content":"hi"}]}"#,
        );
        // A Responses request keys its prompt as the chat the engine renders it as.
        let responses = LlmRequest::parse_path(
            "/v1/responses",
            br#"{"model":"m","instructions":"sys","input":"hi"}"#,
        );
        assert_eq!(responses.api, Api::Responses);
        assert_eq!(responses.blocks, chat.blocks);
        assert_eq!(responses.fallback_reason(), None);
        // Messages with different system prompts never share a key.
        let messages = |system: &str| {
            LlmRequest::parse_path(
                "/v1/messages",
                format!(r#"{{"model":"m","max_tokens":9,"system":"{system}","messages":[{{"role":"user","content":"hi"}}]}}"#)
                    .as_bytes(),
            )
        };
        let (a, b) = (messages("sys"), messages("other"));
        assert_eq!(a.blocks, chat.blocks);
        assert_ne!(a.blocks[0], b.blocks[0]);
        assert_eq!(
            a.prompt_body().and_then(|c| c.get("max_tokens")),
            Some(&serde_json::json!(9))
        );
        // Load-only calls are routed by the policy (by load), never by prefix.
        for path in ["/v1/embeddings", "/v1/rerank", "/v1/score"] {
            let r = LlmRequest::parse_path(path, br#"{"model":"m","input":"embed me"}"#);
            assert!(r.api.load_only() && r.blocks.is_empty(), "{path}");
            assert_eq!(r.fallback_reason(), None, "{path}");
            assert_eq!(r.bytes, 32);
        }
    }
}
