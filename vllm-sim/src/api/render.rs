//! Chat messages to prompt ids, exactly as a `/v1/chat/completions` request with those
//! messages is rendered (vLLM turns Responses and Messages requests into chat messages and
//! applies the chat template to them the same way):
//!
//! * with the model's tokenizer (`--tokenizer`), a chat request body (`messages`, `tools`,
//!   `chat_template_kwargs`, `add_generation_prompt`, `continue_final_message`) goes through
//!   the chat template ([`crate::model_tokenizer::ModelTokenizer::chat_prompt`]);
//! * without, the messages go through the stand-in's ChatML rendering
//!   ([`crate::tokenizer::render_chat`]), which, as for chat, ignores tools and template
//!   options.
//!
//! Content parts of the Responses API (`input_text`, `output_text`) are text parts, as vLLM's
//! chat-message parser reads them ([`text_parts`]).

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::openai::{off_thread, ChatMessage};
use crate::server::AppState;
use crate::tokenizer::{self, TokenId};

/// A conversation as chat messages, with what else the template sees.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    /// Chat messages (`{"role", "content", "tool_calls", "tool_call_id", …}`).
    pub messages: Vec<Value>,
    /// Tools in the chat format (`{"type": "function", "function": {…}}`), if any.
    pub tools: Vec<Value>,
    /// `chat_template_kwargs` of the request.
    pub chat_template_kwargs: Option<Value>,
    /// Continue the last (assistant) message instead of opening a new one.
    pub continue_final_message: bool,
}

impl Conversation {
    /// The chat request body the template renders.
    fn body(&self) -> Value {
        let mut body = Map::new();
        body.insert("messages".into(), Value::Array(self.messages.clone()));
        if !self.tools.is_empty() {
            body.insert("tools".into(), Value::Array(self.tools.clone()));
        }
        if let Some(kwargs) = &self.chat_template_kwargs {
            body.insert("chat_template_kwargs".into(), kwargs.clone());
        }
        if self.continue_final_message {
            body.insert("add_generation_prompt".into(), json!(false));
            body.insert("continue_final_message".into(), json!(true));
        }
        Value::Object(body)
    }
}

/// The prompt ids of a conversation: 400 for messages the stand-in cannot read (no `role`),
/// a template error, or an empty prompt.
pub async fn prompt_ids(st: &AppState, conv: Conversation) -> Result<Vec<TokenId>, ApiError> {
    if conv.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty"));
    }
    let prompt = match st.tokenizer.clone() {
        None => {
            let messages = conv
                .messages
                .iter()
                .map(ChatMessage::deserialize)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ApiError::bad_request(format!("Invalid message: {e}")))?;
            let texts: Vec<(String, String)> = messages
                .iter()
                .map(|m| (m.role.clone(), m.text()))
                .collect();
            tokenizer::render_chat(texts.iter().map(|(r, c)| (r.as_str(), c.as_str())))
        }
        Some(tok) => {
            let body = conv.body();
            off_thread(move || tok.chat_prompt(&body)).await?
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::bad_request("The decoder prompt cannot be empty"));
    }
    Ok(prompt)
}

/// Content with the Responses API's text parts (`input_text`, `output_text`) as chat `text`
/// parts, which is how vLLM's chat-message parser takes them; a string and other parts
/// (images, files) are left as they are.
pub fn text_parts(content: &Value) -> Value {
    match content {
        Value::Array(parts) => Value::Array(
            parts
                .iter()
                .map(|p| match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text") => json!({
                        "type": "text",
                        "text": p.get("text").cloned().unwrap_or(Value::Null),
                    }),
                    _ => p.clone(),
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A tool call in the chat format.
pub fn tool_call(id: &str, name: &str, arguments: &str) -> Value {
    json!({
        "id": id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    })
}

/// Adds a tool call to the conversation as vLLM does: to the previous message when it is an
/// assistant message (its `tool_calls` extended), else as a new assistant message.
pub fn push_tool_call(messages: &mut Vec<Value>, call: Value) {
    if let Some(Value::Object(prev)) = messages.last_mut() {
        if prev.get("role").and_then(Value::as_str) == Some("assistant") {
            match prev.get_mut("tool_calls") {
                Some(Value::Array(calls)) => {
                    calls.push(call);
                    return;
                }
                None | Some(Value::Null) => {
                    prev.insert("tool_calls".into(), Value::Array(vec![call]));
                    return;
                }
                Some(_) => {}
            }
        }
    }
    messages.push(json!({"role": "assistant", "tool_calls": [call]}));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_text_parts_become_text_parts() {
        let c = json!([
            {"type": "input_text", "text": "a"},
            {"type": "output_text", "text": "b", "annotations": []},
            {"type": "input_image", "image_url": "x"},
        ]);
        assert_eq!(
            text_parts(&c),
            json!([
                {"type": "text", "text": "a"},
                {"type": "text", "text": "b"},
                {"type": "input_image", "image_url": "x"},
            ])
        );
        assert_eq!(text_parts(&json!("s")), json!("s"));
    }

    #[test]
    fn tool_calls_join_the_previous_assistant_message() {
        let mut m = vec![json!({"role": "user", "content": "q"})];
        push_tool_call(&mut m, tool_call("c1", "f", "{}"));
        push_tool_call(&mut m, tool_call("c2", "g", "{}"));
        assert_eq!(m.len(), 2);
        assert_eq!(m[1]["tool_calls"].as_array().unwrap().len(), 2);
        m.push(json!({"role": "assistant", "content": "x"}));
        push_tool_call(&mut m, tool_call("c3", "h", "{}"));
        assert_eq!(m.len(), 3);
        assert_eq!(m[2]["tool_calls"][0]["id"], "c3");
    }

    #[test]
    fn body_carries_tools_and_continuation() {
        let conv = Conversation {
            messages: vec![json!({"role": "user", "content": "q"})],
            tools: vec![json!({"type": "function", "function": {"name": "f"}})],
            chat_template_kwargs: Some(json!({"x": 1})),
            continue_final_message: true,
        };
        let b = conv.body();
        assert_eq!(b["tools"][0]["function"]["name"], "f");
        assert_eq!(b["add_generation_prompt"], false);
        assert_eq!(b["continue_final_message"], true);
        assert_eq!(b["chat_template_kwargs"]["x"], 1);
        assert!(Conversation::default().body().get("tools").is_none());
    }
}
