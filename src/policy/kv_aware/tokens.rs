//! The token ids `kv_aware` keys a request by: the engine's own (its chat template and tokenizer,
//! [`Tokenizer::Exact`]) or an approximation without a tokenizer ([`Tokenizer::Approximate`]).
//!
//! Approximate tokens are pieces of about 4 bytes of the prompt text (cut on character boundaries)
//! hashed to ids, with one marker token per chat message role. They are stable — a growing
//! conversation is a growing token prefix — so llm-lb's own predictions still match, but they are
//! not the engine's ids, so an engine's KV events can only be matched with a tokenizer.

use std::sync::Arc;

use llm_lb_tokenizer::ChatTokenizer;
use serde_json::Value;
use xxhash_rust::xxh3::xxh3_64;

use crate::request::LlmRequest;

/// Bytes per approximate token.
const APPROX_BYTES: usize = 4;

/// The engine's own tokenization of chats and text prompts ([`ChatTokenizer`] is one; a program
/// embedding llm-lb may bring its own).
pub trait EngineTokenizer: Send + Sync {
    /// The token ids the engine computes for an OpenAI chat request body.
    fn chat_tokens(&self, body: &Value) -> Result<Vec<u32>, String>;
    /// The token ids the engine computes for a `/v1/completions` text prompt.
    fn completion_tokens(&self, prompt: &str) -> Result<Vec<u32>, String>;
}

impl EngineTokenizer for ChatTokenizer {
    fn chat_tokens(&self, body: &Value) -> Result<Vec<u32>, String> {
        ChatTokenizer::chat_tokens(self, body).map_err(|e| e.to_string())
    }

    fn completion_tokens(&self, prompt: &str) -> Result<Vec<u32>, String> {
        ChatTokenizer::completion_tokens(self, prompt).map_err(|e| e.to_string())
    }
}

/// How a pool turns requests into token ids.
#[derive(Clone)]
pub enum Tokenizer {
    /// About 4 bytes per token, hashed.
    Approximate,
    /// The model's chat template and tokenizer, as the engine applies them.
    Exact(Arc<dyn EngineTokenizer>),
}

impl Tokenizer {
    /// The prompt's token ids (empty when the body has no chat or prompt). A Responses or
    /// Messages request is tokenized as the chat the engine renders it as.
    pub fn tokens(&self, request: &LlmRequest) -> Vec<u32> {
        let Some(body) = request.prompt_body() else {
            return Vec::new();
        };
        match self {
            Tokenizer::Exact(t) => match exact(&**t, body) {
                Ok(tokens) => return tokens,
                Err(e) => log::debug!("kv_aware: tokenizer failed ({e}); approximate tokens"),
            },
            Tokenizer::Approximate => {}
        }
        approximate(body)
    }

    /// Whether these are the engine's own ids.
    pub fn is_exact(&self) -> bool {
        matches!(self, Tokenizer::Exact(_))
    }
}

fn exact(t: &dyn EngineTokenizer, body: &Value) -> Result<Vec<u32>, String> {
    if body.get("messages").is_some() {
        return t.chat_tokens(body);
    }
    match body.get("prompt") {
        Some(Value::String(p)) => t.completion_tokens(p),
        Some(p) => Ok(token_array(p).unwrap_or_default()),
        None => Ok(Vec::new()),
    }
}

/// A prompt given as token ids (`[1, 2, 3]`, or a batch whose first entry is).
fn token_array(prompt: &Value) -> Option<Vec<u32>> {
    let items = prompt.as_array()?;
    let ids = match items.first() {
        Some(Value::Array(first)) => first,
        Some(_) | None => items,
    };
    ids.iter()
        .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect()
}

fn approximate(body: &Value) -> Vec<u32> {
    let mut out = Vec::new();
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for m in messages {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("");
            out.push(piece_id(&[0x01], role.as_bytes()));
            match m.get("content") {
                Some(Value::String(s)) => pieces(s, &mut out),
                Some(Value::Array(parts)) => {
                    for p in parts {
                        if let Some(text) = p.get("text").and_then(Value::as_str) {
                            pieces(text, &mut out);
                        }
                    }
                }
                Some(
                    other @ (Value::Null | Value::Bool(_) | Value::Number(_) | Value::Object(_)),
                ) => pieces(&other.to_string(), &mut out),
                None => {}
            }
            if let Some(calls) = m.get("tool_calls") {
                pieces(&calls.to_string(), &mut out);
            }
        }
        out.push(piece_id(&[0x02], b"generate"));
        return out;
    }
    match body.get("prompt") {
        Some(Value::String(p)) => pieces(p, &mut out),
        Some(p) => out = token_array(p).unwrap_or_default(),
        None => {}
    }
    out
}

fn piece_id(tag: &[u8], bytes: &[u8]) -> u32 {
    let mut buf = Vec::with_capacity(tag.len() + bytes.len());
    buf.extend_from_slice(tag);
    buf.extend_from_slice(bytes);
    (xxh3_64(&buf) & 0xffff_ffff) as u32
}

/// Appends `text` cut into pieces of at least [`APPROX_BYTES`] bytes on character boundaries.
fn pieces(text: &str, out: &mut Vec<u32>) {
    let mut start = 0;
    for (i, _) in text.char_indices() {
        if i - start >= APPROX_BYTES {
            out.push(piece_id(&[], &text.as_bytes()[start..i]));
            start = i;
        }
    }
    if start < text.len() {
        out.push(piece_id(&[], &text.as_bytes()[start..]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(turns: &[(&str, &str)]) -> LlmRequest {
        let messages: Vec<Value> = turns
            .iter()
            .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
            .collect();
        LlmRequest::parse(
            serde_json::json!({"model": "m", "messages": messages})
                .to_string()
                .as_bytes(),
        )
    }

    #[test]
    fn approximate_tokens_grow_with_the_conversation() {
        let t = Tokenizer::Approximate;
        let one = t.tokens(&chat(&[("user", "hello there, how are you?")]));
        let two = t.tokens(&chat(&[
            ("user", "hello there, how are you?"),
            ("assistant", "fine"),
            ("user", "good"),
        ]));
        // The generation marker ends the first; everything before it is a prefix of the second.
        assert_eq!(&two[..one.len() - 1], &one[..one.len() - 1]);
        // About 4 bytes a token: 25 bytes → 7 pieces, plus the role and generation markers.
        assert_eq!(one.len(), 1 + 7 + 1);
        // Roles matter.
        assert_ne!(
            t.tokens(&chat(&[("system", "x")])),
            t.tokens(&chat(&[("user", "x")]))
        );
    }

    #[test]
    fn approximate_pieces_respect_characters_and_prompts_as_ids_are_kept() {
        let mut out = Vec::new();
        pieces("héllo wörld ✓✓", &mut out);
        assert_eq!(out.len(), 5);
        let r = LlmRequest::parse(br#"{"model":"m","prompt":[5,6,7]}"#);
        assert_eq!(Tokenizer::Approximate.tokens(&r), vec![5, 6, 7]);
        let r = LlmRequest::parse(br#"{"model":"m","prompt":[[8,9],[1]]}"#);
        assert_eq!(Tokenizer::Approximate.tokens(&r), vec![8, 9]);
        assert!(Tokenizer::Approximate
            .tokens(&LlmRequest::empty())
            .is_empty());
    }
}
