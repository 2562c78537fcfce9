//! The Anthropic Messages API as vLLM 0.34 serves it (`vllm/entrypoints/anthropic/`):
//! `POST /v1/messages`, turned into a chat completion and answered in Anthropic's shapes
//! ([`super::messages_body`]).
//!
//! The request becomes chat messages as vLLM's `AnthropicServingMessages` converts it:
//!
//! * `system` (a string, or text blocks joined with no separator; blocks starting with
//!   `x-anthropic-billing-header` are dropped, as vLLM drops them) is one system message;
//!   `system` messages inside `messages` stay where they are;
//! * a message's string content is its content; of its blocks, `text` blocks become text
//!   parts (one text part becomes a plain string), `image` blocks image parts, `thinking`
//!   blocks the message's `reasoning`, `tool_use` blocks its `tool_calls` (`input` as JSON
//!   `arguments`); a user's `tool_result` block becomes a `tool` message (text items joined by
//!   newlines), an assistant's a `Tool result: …` text part; a user message left with no
//!   content (only tool results) is dropped;
//! * `tools` reach the template in the chat format (`input_schema` as `parameters`).
//!
//! `max_tokens` is the output limit (`stop_reason: "max_tokens"` when it ends the output,
//! else `"end_turn"`) and `min_tokens` (vLLM's extension) holds back the EOS; the prompt takes
//! the chat path (prefix cache, scheduler, timing). Errors of the request's handling are
//! Anthropic-shaped (`{"type": "error", "error": {"type", "message"}}`, vLLM's
//! `translate_error_type`); a body that does not validate (missing `max_tokens`, a
//! `max_tokens` below 1, an unknown block type) gets vLLM's generic validation answer, the
//! OpenAI-shaped 400, as FastAPI's validation handler sends it before vLLM's Anthropic handler
//! runs. Sampling options (`temperature`, `top_p`, `top_k`, `stop_sequences`, `thinking`, …)
//! are accepted and ignored.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::drive::{collect, sse_response, Collected};
use crate::api::messages_body::{message_json, MessageStream};
use crate::api::render::{prompt_ids, tool_call, Conversation};
use crate::error::ApiError;
use crate::openai::{
    apply_faults, parse, prepare, random_hex, resolve_model, unix_secs, Kind, Sampling,
};
use crate::server::AppState;
use crate::stats::Api;

/// `POST /v1/messages` body.
#[derive(Debug, Clone, Deserialize)]
pub struct MessagesRequest {
    /// Model or LoRA adapter.
    pub model: String,
    /// The conversation.
    pub messages: Vec<AnthropicMessage>,
    /// Output limit (at least 1).
    pub max_tokens: i64,
    /// The system prompt.
    pub system: Option<SystemPrompt>,
    /// SSE when true.
    pub stream: Option<bool>,
    /// vLLM extension: least output tokens before EOS.
    pub min_tokens: Option<i64>,
    /// Tools.
    pub tools: Option<Vec<AnthropicTool>>,
    /// vLLM extension: passed to the chat template.
    pub chat_template_kwargs: Option<Value>,
}

/// `system`: a string or text blocks.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SystemPrompt {
    /// Plain text.
    Text(String),
    /// Blocks (text ones are used).
    Blocks(Vec<ContentBlock>),
}

/// A message's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `user`.
    User,
    /// `assistant`.
    Assistant,
    /// `system` (vLLM accepts it inside `messages`).
    System,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::System => "system",
        }
    }
}

/// One message.
#[derive(Debug, Clone, Deserialize)]
pub struct AnthropicMessage {
    /// Its role.
    pub role: Role,
    /// A string or blocks.
    pub content: MessageContent,
}

/// Message content.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content blocks.
    Blocks(Vec<ContentBlock>),
}

/// The block types vLLM accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockType {
    /// `text`.
    Text,
    /// `image` (an image part; the stand-in renders it as JSON, templates skip it).
    Image,
    /// `tool_use`.
    ToolUse,
    /// `tool_result`.
    ToolResult,
    /// `tool_reference` (ignored).
    ToolReference,
    /// `thinking`.
    Thinking,
    /// `redacted_thinking` (ignored).
    RedactedThinking,
    /// `tool_addition` (ignored).
    ToolAddition,
    /// `tool_removal` (ignored).
    ToolRemoval,
}

/// A content block (the fields of all block types).
#[derive(Debug, Clone, Deserialize)]
pub struct ContentBlock {
    /// The block type.
    #[serde(rename = "type")]
    pub kind: BlockType,
    /// `text`.
    pub text: Option<String>,
    /// `image`: `{"type": "base64", "media_type", "data"}` or `{"type": "url", "url"}`.
    pub source: Option<Value>,
    /// `tool_use`: the call id.
    pub id: Option<String>,
    /// `tool_result`: the call answered.
    pub tool_use_id: Option<String>,
    /// `tool_use`: the tool.
    pub name: Option<String>,
    /// `tool_use`: the arguments.
    pub input: Option<Value>,
    /// `tool_result`: a string or blocks.
    pub content: Option<Value>,
    /// `thinking`.
    pub thinking: Option<String>,
}

/// A tool definition.
#[derive(Debug, Clone, Deserialize)]
pub struct AnthropicTool {
    /// `custom` or absent (Anthropic-defined tools are refused, as by vLLM).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// JSON schema of the input.
    pub input_schema: serde_json::Map<String, Value>,
}

const BILLING_HEADER: &str = "x-anthropic-billing-header";

/// The text of `system` blocks (or a string), billing headers dropped.
fn system_text(content: &MessageContent) -> String {
    match content {
        MessageContent::Text(s) if s.starts_with(BILLING_HEADER) => String::new(),
        MessageContent::Text(s) => s.clone(),
        MessageContent::Blocks(blocks) => text_of_blocks(blocks),
    }
}

fn text_of_blocks(blocks: &[ContentBlock]) -> String {
    blocks
        .iter()
        .filter(|b| b.kind == BlockType::Text)
        .filter_map(|b| b.text.as_deref())
        .filter(|t| !t.is_empty() && !t.starts_with(BILLING_HEADER))
        .collect()
}

fn image_url(source: &Value) -> String {
    let field = |k: &str| source.get(k).and_then(Value::as_str);
    if field("type") == Some("url") {
        return field("url").unwrap_or("").to_string();
    }
    format!(
        "data:{};base64,{}",
        field("media_type").unwrap_or("image/jpeg"),
        field("data").unwrap_or("")
    )
}

/// A user's `tool_result` block as vLLM adds it: a `tool` message, then a user message with
/// the images it held.
fn user_tool_result(block: &ContentBlock, messages: &mut Vec<Value>) {
    let mut images = Vec::new();
    let text = match &block.content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => {
            let mut texts = Vec::new();
            for item in items {
                match item.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        texts.push(item.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    Some("image") => {
                        let url = image_url(item.get("source").unwrap_or(&Value::Null));
                        if !url.is_empty() {
                            images.push(json!({"type": "image_url", "image_url": {"url": url}}));
                        }
                    }
                    _ => {}
                }
            }
            texts.join("\n")
        }
        _ => String::new(),
    };
    messages.push(json!({
        "role": "tool",
        "tool_call_id": block.tool_use_id.as_deref().unwrap_or(""),
        "content": text,
    }));
    if !images.is_empty() {
        messages.push(json!({"role": "user", "content": images}));
    }
}

/// The chat message of one Anthropic message with blocks (tool results of a user message go
/// to `messages` first); `None` for a user message left without content.
fn blocks_message(role: Role, blocks: &[ContentBlock], messages: &mut Vec<Value>) -> Option<Value> {
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    let mut reasoning = String::new();
    let mut has_reasoning = false;
    for b in blocks {
        match b.kind {
            BlockType::Text => {
                if let Some(t) = b.text.as_deref().filter(|t| !t.is_empty()) {
                    parts.push(json!({"type": "text", "text": t}));
                }
            }
            BlockType::Image => {
                if let Some(source) = &b.source {
                    parts.push(
                        json!({"type": "image_url", "image_url": {"url": image_url(source)}}),
                    );
                }
            }
            BlockType::Thinking => {
                if let Some(t) = &b.thinking {
                    reasoning.push_str(t);
                    has_reasoning = true;
                }
            }
            BlockType::ToolUse => {
                let id =
                    b.id.clone()
                        .unwrap_or_else(|| format!("call_{}", unix_secs()));
                let args = b.input.clone().unwrap_or_else(|| json!({}));
                calls.push(tool_call(
                    &id,
                    b.name.as_deref().unwrap_or(""),
                    &args.to_string(),
                ));
            }
            BlockType::ToolResult if role == Role::User => user_tool_result(b, messages),
            BlockType::ToolResult => {
                let text = match &b.content {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                };
                parts.push(json!({"type": "text", "text": format!("Tool result: {text}")}));
            }
            BlockType::ToolReference
            | BlockType::RedactedThinking
            | BlockType::ToolAddition
            | BlockType::ToolRemoval => {}
        }
    }
    let mut msg = serde_json::Map::new();
    msg.insert("role".into(), json!(role.as_str()));
    if has_reasoning {
        msg.insert("reasoning".into(), json!(reasoning));
    }
    if !calls.is_empty() {
        msg.insert("tool_calls".into(), Value::Array(calls));
    }
    match parts.as_slice() {
        [] => {}
        [only] if only["type"] == "text" => {
            msg.insert("content".into(), only["text"].clone());
        }
        _ => {
            msg.insert("content".into(), Value::Array(parts));
        }
    }
    (role != Role::User || msg.contains_key("content")).then_some(Value::Object(msg))
}

/// The chat messages of a Messages request.
pub fn chat_messages(req: &MessagesRequest) -> Vec<Value> {
    let mut messages = Vec::new();
    let system = match &req.system {
        None => String::new(),
        Some(SystemPrompt::Text(s)) => s.clone(),
        Some(SystemPrompt::Blocks(blocks)) => text_of_blocks(blocks),
    };
    if !system.is_empty() {
        messages.push(json!({"role": "system", "content": system}));
    }
    for m in &req.messages {
        match (&m.role, &m.content) {
            (Role::System, content) => {
                let text = system_text(content);
                if !text.is_empty() {
                    messages.push(json!({"role": "system", "content": text}));
                }
            }
            (role, MessageContent::Text(s)) => {
                messages.push(json!({"role": role.as_str(), "content": s}));
            }
            (role, MessageContent::Blocks(blocks)) => {
                if let Some(msg) = blocks_message(*role, blocks, &mut messages) {
                    messages.push(msg);
                }
            }
        }
    }
    messages
}

/// The tools in the chat format; 400 for Anthropic-defined tools, as vLLM refuses them.
pub fn chat_tools(tools: &[AnthropicTool]) -> Result<Vec<Value>, ApiError> {
    tools
        .iter()
        .map(|t| {
            if let Some(kind) = t.kind.as_deref().filter(|k| *k != "custom") {
                return Err(ApiError::bad_request(format!(
                    "tool type '{kind}' is not supported; only custom tools with an \
                     input_schema are supported"
                )));
            }
            let mut schema = t.input_schema.clone();
            schema.entry("type").or_insert_with(|| json!("object"));
            Ok(json!({
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": schema,
                },
            }))
        })
        .collect()
}

/// Why a request failed: its body did not validate (vLLM's generic OpenAI-shaped 400), or its
/// handling failed (an Anthropic-shaped error).
enum Failure {
    Validation(ApiError),
    Handling(ApiError),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Handling(e)
    }
}

/// The request, validated as vLLM's pydantic model validates it.
fn validate(body: &Bytes) -> Result<MessagesRequest, ApiError> {
    let req: MessagesRequest = parse(body)?;
    if req.model.is_empty() {
        return Err(ApiError::bad_request("Model is required"));
    }
    if req.max_tokens <= 0 {
        return Err(ApiError::bad_request("max_tokens must be positive"));
    }
    Ok(req)
}

/// `POST /v1/messages`.
pub async fn create(State(st): State<AppState>, body: Bytes) -> Response {
    let run = async {
        let req = validate(&body).map_err(Failure::Validation)?;
        apply_faults(&st).await?;
        resolve_model(&st, Some(&req.model))?;
        let conv = Conversation {
            messages: chat_messages(&req),
            tools: chat_tools(req.tools.as_deref().unwrap_or(&[]))?,
            chat_template_kwargs: req.chat_template_kwargs.clone(),
            continue_final_message: false,
        };
        let prompt = prompt_ids(&st, conv).await?;
        let sampling = Sampling {
            model: Some(req.model.clone()),
            stream: req.stream,
            max_tokens: Some(req.max_tokens),
            min_tokens: req.min_tokens.filter(|&m| m > 0),
            ..Sampling::default()
        };
        let p = prepare(&st, Kind::Chat, &sampling, prompt)?;
        // vLLM answers with the chat completion's id.
        let id = format!("chatcmpl-{}", random_hex());
        let block_size = st.cfg.block_size;
        let close_after = st.faults.get().close_after_tokens;
        let prompt_tokens = p.job.prompt.len();
        let rx = p.job.submit(&st, Api::Messages)?;
        if p.stream {
            let format = MessageStream::new(id, p.model, prompt_tokens, block_size);
            return Ok(sse_response(rx, close_after, format, Default::default()));
        }
        match collect(rx, close_after).await? {
            Collected::Done(answer) => Ok(message_json(&id, &p.model, &answer, block_size)),
            Collected::Cut(r) => Ok(r),
        }
    };
    match run.await {
        Ok(r) => r,
        Err(Failure::Validation(e)) => e.into_response(),
        Err(Failure::Handling(e)) => e.anthropic_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> MessagesRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn system_and_blocks_convert_as_vllm_does() {
        let r = req(json!({
            "model": "m", "max_tokens": 5,
            "system": [{"type": "text", "text": "x-anthropic-billing-header: 123"},
                       {"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "tu1", "name": "get", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "tu1",
                     "content": [{"type": "text", "text": "sunny"}, {"type": "text", "text": "20C"}]}]},
                {"role": "user", "content": "thanks"},
            ],
        }));
        let m = chat_messages(&r);
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(m[1], json!({"role": "user", "content": "weather?"}));
        assert_eq!(m[2]["content"], "Checking.");
        assert_eq!(m[2]["reasoning"], "hmm");
        assert_eq!(m[2]["tool_calls"][0]["id"], "tu1");
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(
            m[3],
            json!({"role": "tool", "tool_call_id": "tu1", "content": "sunny\n20C"})
        );
        assert_eq!(m[4], json!({"role": "user", "content": "thanks"}));
        assert_eq!(m.len(), 5, "the tool-result-only user message is dropped");
    }

    #[test]
    fn several_parts_stay_a_list_and_inline_system_stays_in_place() {
        let r = req(json!({
            "model": "m", "max_tokens": 5,
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"},
                    {"type": "image", "source": {"type": "url", "url": "http://x/i.png"}}]},
                {"role": "system", "content": "late rule"},
                {"role": "assistant", "content": [{"type": "tool_result", "content": "r"}]},
            ],
        }));
        let m = chat_messages(&r);
        assert_eq!(m[0]["content"][1]["image_url"]["url"], "http://x/i.png");
        assert_eq!(m[1], json!({"role": "system", "content": "late rule"}));
        assert_eq!(m[2]["content"], "Tool result: r");
    }

    #[test]
    fn tools_take_the_chat_format_and_builtin_tools_are_refused() {
        let tools: Vec<AnthropicTool> = serde_json::from_value(json!([
            {"name": "get", "description": "d", "input_schema": {"properties": {}}}
        ]))
        .unwrap();
        let t = chat_tools(&tools).unwrap();
        assert_eq!(t[0]["function"]["parameters"]["type"], "object");
        assert_eq!(t[0]["function"]["name"], "get");
        let builtin: Vec<AnthropicTool> = serde_json::from_value(json!([
            {"type": "web_search_20250305", "name": "web", "input_schema": {}}
        ]))
        .unwrap();
        assert!(chat_tools(&builtin).is_err());
    }

    #[test]
    fn validation_follows_vllm() {
        let ok = Bytes::from(r#"{"model":"m","max_tokens":1,"messages":[]}"#);
        assert!(validate(&ok).is_ok());
        for bad in [
            r#"{"model":"m","messages":[]}"#,
            r#"{"model":"m","max_tokens":0,"messages":[]}"#,
            r#"{"model":"","max_tokens":1,"messages":[]}"#,
            r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"video"}]}]}"#,
            r#"{"model":"m","max_tokens":1,"messages":[{"role":"tool","content":"x"}]}"#,
        ] {
            assert_eq!(
                validate(&Bytes::from(bad)).unwrap_err().status,
                400,
                "{bad}"
            );
        }
    }
}
