//! What llm-lb understands of a request: an OpenAI-style body parsed tolerantly into a summary.
//!
//! Nothing here rejects a request: a body that is not JSON, lacks a model or messages, or has
//! fields of the wrong type still yields an [`LlmRequest`] and is proxied unchanged; it just carries
//! no prefix blocks, so policies route it by their fallback.

use std::sync::Arc;

use serde_json::Value;

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
        }
    }

    /// Summarise a request body. Never fails.
    pub fn parse(body: &[u8]) -> Self {
        if body.is_empty() {
            return Self::empty();
        }
        let v: Value = match serde_json::from_slice(body) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return LlmRequest {
                    body: BodyKind::NotJson,
                    ..Self::empty()
                }
            }
        };
        let model = v.get("model").and_then(Value::as_str).map(str::to_owned);
        let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let model_key = model.as_deref().unwrap_or("");
        let blocks = if let Some(messages) = v.get("messages") {
            prefix::chat_blocks(model_key, messages)
        } else if let Some(prompt) = v.get("prompt") {
            prefix::prompt_blocks(model_key, prompt)
        } else {
            Vec::new()
        };
        LlmRequest {
            body: BodyKind::Json,
            model,
            stream,
            blocks,
            json: Some(Arc::new(v)),
        }
    }

    /// Why the request is routed by the pool's fallback instead of its policy (one of
    /// [`FallbackReason::REQUEST`]), if it is.
    pub fn fallback_reason(&self) -> Option<FallbackReason> {
        match self.body {
            BodyKind::Empty => Some(FallbackReason::NoBody),
            BodyKind::NotJson => Some(FallbackReason::NotJson),
            BodyKind::Json if self.blocks.is_empty() => Some(FallbackReason::NoPrompt),
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
}
