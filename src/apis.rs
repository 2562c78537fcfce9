//! The APIs clients call, and what each means for routing: OpenAI chat and text completions,
//! the OpenAI Responses API, Anthropic's Messages API (which coding agents use), and the
//! load-only calls (embeddings, rerank, score, classify) that have no prompt to keep warm.
//!
//! Engines serve Responses and Messages requests by rendering them through the model's chat
//! template, as chat completions (vLLM's `serving_responses` and its Anthropic adapter do). So
//! llm-lb translates both into an equivalent chat-completions body ([`as_chat`]): the same prompt
//! gets the same prefix keys and the same tokens whichever API carried it, and two Messages
//! conversations with different `system` prompts never share a key.

use serde_json::{json, Map, Value};

/// The API a request calls, from its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
    /// `/v1/responses` (OpenAI Responses).
    Responses,
    /// `/v1/messages` (Anthropic Messages).
    Messages,
    /// `/v1/embeddings`.
    Embeddings,
    /// `/v1/rerank`, `/rerank`, `/v2/rerank`, `/v1/score`, `/score`, `/classify`, `/pooling`.
    Rerank,
    /// Anything else, or a request whose path is unknown: judged by the body's shape.
    Other,
}

impl Api {
    /// The API of a request path.
    pub fn of_path(path: &str) -> Api {
        let path = path.trim_end_matches('/');
        let is = |suffix: &str| path.ends_with(suffix);
        if is("/chat/completions") {
            Api::Chat
        } else if is("/completions") {
            Api::Completions
        } else if is("/responses") {
            Api::Responses
        } else if is("/messages") {
            Api::Messages
        } else if is("/embeddings") {
            Api::Embeddings
        } else if is("/rerank") || is("/score") || is("/classify") || is("/pooling") {
            Api::Rerank
        } else {
            Api::Other
        }
    }

    /// Whether requests of this API have no prompt to keep warm: they are routed by load alone,
    /// and counted in it.
    pub fn load_only(self) -> bool {
        matches!(self, Api::Embeddings | Api::Rerank)
    }

    /// The name used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Completions => "completions",
            Api::Responses => "responses",
            Api::Messages => "messages",
            Api::Embeddings => "embeddings",
            Api::Rerank => "rerank",
            Api::Other => "other",
        }
    }
}

/// A Responses or Messages `body` as the chat-completions body the engine renders (`messages`,
/// `max_tokens`, `model`); `None` for other APIs.
pub fn as_chat(api: Api, body: &Value) -> Option<Value> {
    let (messages, max_tokens) = match api {
        Api::Responses => (responses_messages(body), body.get("max_output_tokens")),
        Api::Messages => (anthropic_messages(body), body.get("max_tokens")),
        Api::Chat | Api::Completions | Api::Embeddings | Api::Rerank | Api::Other => return None,
    };
    let mut chat = Map::new();
    if let Some(model) = body.get("model") {
        chat.insert("model".into(), model.clone());
    }
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(n) = max_tokens {
        chat.insert("max_tokens".into(), n.clone());
    }
    Some(Value::Object(chat))
}

/// Responses `instructions` + `input` as chat messages.
// Foreign enum (serde_json's Value): `_` stands for "any other JSON value".
#[allow(clippy::wildcard_enum_match_arm)]
fn responses_messages(body: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(instructions) = body.get("instructions").filter(|v| !v.is_null()) {
        out.push(json!({"role": "system", "content": instructions}));
    }
    match body.get("input") {
        Some(Value::String(text)) => out.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => out.extend(items.iter().filter_map(response_item)),
        _ => {}
    }
    out
}

/// One Responses input item as a chat message (`None` for items the template does not render).
fn response_item(item: &Value) -> Option<Value> {
    let field = |k: &str| item.get(k).cloned().unwrap_or(Value::Null);
    match item.get("type").and_then(Value::as_str) {
        None | Some("message") => Some(json!({
            "role": field("role"),
            "content": text_parts(&field("content")),
        })),
        Some("function_call") => Some(json!({
            "role": "assistant",
            "tool_calls": [{
                "id": field("call_id"),
                "type": "function",
                "function": {"name": field("name"), "arguments": field("arguments")},
            }],
        })),
        Some("function_call_output") => Some(json!({
            "role": "tool",
            "tool_call_id": field("call_id"),
            "content": field("output"),
        })),
        Some("reasoning") => None,
        Some(_) => Some(json!({"role": "user", "content": item.clone()})),
    }
}

/// Content parts of the Responses and Messages APIs (`input_text`, `output_text`, `text`) as chat
/// `text` parts; a string stays a string, other parts stay as they are.
fn text_parts(content: &Value) -> Value {
    let Some(parts) = content.as_array() else {
        return content.clone();
    };
    Value::Array(
        parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("input_text" | "output_text" | "text") => {
                    json!({"type": "text", "text": p.get("text").cloned().unwrap_or(Value::Null)})
                }
                _ => p.clone(),
            })
            .collect(),
    )
}

/// Anthropic `system` + `messages` as chat messages: tool uses become the assistant's tool calls
/// and tool results tool messages, in order.
fn anthropic_messages(body: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(system) = body.get("system").filter(|v| !v.is_null()) {
        out.push(json!({"role": "system", "content": text_parts(system)}));
    }
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return out;
    };
    for m in messages {
        let role = m.get("role").cloned().unwrap_or(Value::Null);
        let content = m.get("content").cloned().unwrap_or(Value::Null);
        let Some(blocks) = content.as_array() else {
            out.push(json!({"role": role, "content": content}));
            continue;
        };
        let mut parts = Vec::new();
        let mut calls = Vec::new();
        for b in blocks {
            let field = |k: &str| b.get(k).cloned().unwrap_or(Value::Null);
            match b.get("type").and_then(Value::as_str) {
                Some("tool_use") => calls.push(json!({
                    "id": field("id"),
                    "type": "function",
                    "function": {"name": field("name"), "arguments": field("input").to_string()},
                })),
                Some("tool_result") => out.push(json!({
                    "role": "tool",
                    "tool_call_id": field("tool_use_id"),
                    "content": text_parts(&field("content")),
                })),
                _ => parts.push(b.clone()),
            }
        }
        if parts.is_empty() && calls.is_empty() {
            continue;
        }
        let mut msg = json!({"role": role, "content": text_parts(&Value::Array(parts))});
        if !calls.is_empty() {
            msg["tool_calls"] = Value::Array(calls);
        }
        out.push(msg);
    }
    out
}

/// Reads the id a Responses API answer names itself by from the start of its body: the JSON
/// response's `id`, or in a stream the `response.created` event's `response.id` — the first
/// `"id"` either way. Looks at the first [`ResponseIdScan::LIMIT`] bytes only.
#[derive(Debug, Default)]
pub struct ResponseIdScan {
    head: Vec<u8>,
    done: bool,
}

impl ResponseIdScan {
    /// Bytes of the body looked at: the id comes first.
    pub const LIMIT: usize = 4096;

    /// Add the next chunk of the body; the id, once, when it is complete.
    pub fn push(&mut self, chunk: &[u8]) -> Option<String> {
        if self.done {
            return None;
        }
        let room = Self::LIMIT.saturating_sub(self.head.len());
        self.head.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let found = first_id(&self.head);
        if found.is_some() || self.head.len() >= Self::LIMIT {
            self.done = true;
            self.head = Vec::new();
        }
        found
    }
}

/// The string value of the first `"id"` key in `head`, if it is complete.
fn first_id(head: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(head)
        .or_else(|e| std::str::from_utf8(&head[..e.valid_up_to()]))
        .ok()?;
    let after = &text[text.find("\"id\"")? + 4..];
    let value = after.trim_start().strip_prefix(':')?.trim_start();
    let value = value.strip_prefix('"')?;
    let end = value.find('"')?;
    let id = &value[..end];
    (!id.is_empty() && !id.contains('\\')).then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_api() {
        for (path, api) in [
            ("/v1/chat/completions", Api::Chat),
            ("/v1/completions", Api::Completions),
            ("/v1/responses", Api::Responses),
            ("/v1/messages", Api::Messages),
            ("/v1/messages/", Api::Messages),
            ("/v1/embeddings", Api::Embeddings),
            ("/v1/rerank", Api::Rerank),
            ("/rerank", Api::Rerank),
            ("/v1/score", Api::Rerank),
            ("/v1/models", Api::Other),
            ("", Api::Other),
        ] {
            assert_eq!(Api::of_path(path), api, "{path}");
        }
        assert!(Api::Embeddings.load_only() && Api::Rerank.load_only());
        assert!(!Api::Messages.load_only() && !Api::Other.load_only());
    }

    #[test]
    fn responses_become_chat() {
        let body = json!({
            "model": "m", "instructions": "be brief", "max_output_tokens": 50,
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "reasoning", "summary": []},
            ],
        });
        let chat = as_chat(Api::Responses, &body).expect("chat");
        assert_eq!(
            chat,
            json!({"model": "m", "max_tokens": 50, "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                    "function": {"name": "weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ]})
        );
        let plain = as_chat(Api::Responses, &json!({"model": "m", "input": "hi"})).expect("chat");
        assert_eq!(
            plain["messages"],
            json!([{"role": "user", "content": "hi"}])
        );
    }

    #[test]
    fn messages_become_chat_with_their_system_prompt() {
        let body = json!({
            "model": "m", "max_tokens": 64,
            "system": [{"type": "text", "text": "you are a coder"}],
            "messages": [
                {"role": "user", "content": "fix it"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "reading"},
                    {"type": "tool_use", "id": "t1", "name": "read", "input": {"path": "a.rs"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "fn main() {}"},
                ]},
            ],
        });
        let chat = as_chat(Api::Messages, &body).expect("chat");
        assert_eq!(
            chat,
            json!({"model": "m", "max_tokens": 64, "messages": [
                {"role": "system", "content": [{"type": "text", "text": "you are a coder"}]},
                {"role": "user", "content": "fix it"},
                {"role": "assistant", "content": [{"type": "text", "text": "reading"}],
                 "tool_calls": [{"id": "t1", "type": "function",
                    "function": {"name": "read", "arguments": "{\"path\":\"a.rs\"}"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "fn main() {}"},
            ]})
        );
        assert_eq!(as_chat(Api::Chat, &body), None);
    }

    #[test]
    fn a_responses_answer_names_its_id_in_json_and_in_its_first_event() {
        let json = br#"{"id": "resp_abc123", "object": "response", "output": []}"#;
        let mut scan = ResponseIdScan::default();
        assert_eq!(scan.push(json).as_deref(), Some("resp_abc123"));
        assert_eq!(scan.push(json), None, "once");
        // A stream, split mid-id: the id comes when it is complete.
        let sse = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_9f\",\"status\":\"in_progress\"}}\n\n";
        let mut scan = ResponseIdScan::default();
        let cut = sse.len() - 40;
        assert_eq!(scan.push(&sse[..cut]), None);
        assert_eq!(scan.push(&sse[cut..]).as_deref(), Some("resp_9f"));
        // No id in the first LIMIT bytes: gives up.
        let mut scan = ResponseIdScan::default();
        assert_eq!(scan.push(&[b' '; ResponseIdScan::LIMIT]), None);
        assert_eq!(scan.push(br#"{"id":"late"}"#), None);
    }
}
