//! The OpenAI Responses API as vLLM 0.34 serves it without a reasoning or tool parser
//! (`vllm/entrypoints/openai/responses/serving.py`, `utils.py`): `POST /v1/responses` and
//! `GET /v1/responses/{id}`.
//!
//! The request becomes chat messages as vLLM's `construct_input_messages` builds them:
//!
//! 1. `instructions` as a system message;
//! 2. with `previous_response_id`, the stored conversation of that response without its
//!    system messages (instructions do not carry over), then its output text as assistant
//!    messages; an unknown id is a 404 (`invalid_request_error`, param `response_id`);
//! 3. `input`: a string is one user message; an array's items are messages (`type:
//!    "message"` or no type; `input_text`/`output_text` parts read as text, an assistant
//!    message as its first part's text), `function_call` items (a tool call of the previous
//!    assistant message, or of a new one), `function_call_output` items (a `tool` message) and
//!    `reasoning` items (the assistant's `reasoning`).
//!
//! Function `tools` reach the template in the chat format; an assistant message last with
//! status `in_progress`/`incomplete` is continued (`continue_final_message`). The prompt then
//! takes the chat path: prefix cache, scheduler, timing. `max_output_tokens` bounds the
//! output (`status: "incomplete"` when it ends it); `ignore_eos` and `seed` are vLLM's
//! extensions. Bodies: [`super::responses_body`].
//!
//! vLLM keeps responses only with `VLLM_ENABLE_RESPONSES_API_STORE=1`; vllm-sim behaves as if
//! it were set (see [`super::store`]). `background` is not supported (400).

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::drive::{collect, sse_response, Collected};
use crate::api::render::{prompt_ids, push_tool_call, text_parts, tool_call, Conversation};
use crate::api::responses_body::{Keep, OutputMessage, ResponseBody, ResponseStream};
use crate::error::ApiError;
use crate::openai::{apply_faults, parse, prepare, resolve_model, unix_secs, Kind, Sampling};
use crate::server::AppState;
use crate::stats::Api;

/// `POST /v1/responses` body (fields vllm-sim does not use are ignored; the response echoes
/// the ones vLLM echoes).
#[derive(Debug, Clone, Deserialize)]
pub struct ResponsesRequest {
    /// Model or LoRA adapter (default: the base model).
    pub model: Option<String>,
    /// A string or an array of items.
    pub input: Value,
    /// A system message before the conversation.
    pub instructions: Option<String>,
    /// Output limit.
    pub max_output_tokens: Option<i64>,
    /// SSE when true.
    pub stream: Option<bool>,
    /// Continue a stored response.
    pub previous_response_id: Option<String>,
    /// Keep the response (default true).
    pub store: Option<bool>,
    /// Not supported.
    pub background: Option<bool>,
    /// Tools (function tools reach the template).
    #[serde(default)]
    pub tools: Vec<Value>,
    /// Echoed (default `"auto"`).
    pub tool_choice: Option<Value>,
    /// Echoed (default 1).
    pub temperature: Option<f64>,
    /// Echoed (default 1).
    pub top_p: Option<f64>,
    /// Echoed.
    pub metadata: Option<Value>,
    /// Echoed (default true).
    pub parallel_tool_calls: Option<bool>,
    /// Echoed.
    pub max_tool_calls: Option<i64>,
    /// Echoed.
    pub prompt: Option<Value>,
    /// Echoed.
    pub prompt_cache_key: Option<String>,
    /// Echoed.
    pub prompt_cache_retention: Option<Value>,
    /// Echoed.
    pub reasoning: Option<Value>,
    /// Echoed.
    pub safety_identifier: Option<String>,
    /// Echoed (default `"auto"`).
    pub service_tier: Option<String>,
    /// Echoed.
    pub text: Option<Value>,
    /// Echoed (default `"disabled"`).
    pub truncation: Option<String>,
    /// Echoed.
    pub user: Option<String>,
    /// Echoed (default 0).
    pub presence_penalty: Option<f64>,
    /// Echoed (default 0).
    pub frequency_penalty: Option<f64>,
    /// vLLM extension: generate exactly the limit.
    pub ignore_eos: Option<bool>,
    /// vLLM extension: mixed into the text generator's seed.
    pub seed: Option<i64>,
    /// vLLM extension: passed to the chat template.
    pub chat_template_kwargs: Option<Value>,
}

/// vLLM's 404 for an unknown `previous_response_id` (or `GET` id).
fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("Response with id '{id}' not found."),
    )
    .with_type("invalid_request_error", Some("response_id"))
}

fn invalid_input(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message).with_type("invalid_request_error", Some("input"))
}

/// The text of an assistant message item: its content string, or its first part's text.
fn assistant_text(content: Option<&Value>) -> Value {
    match content {
        Some(Value::String(s)) => json!(s),
        Some(Value::Array(parts)) => parts
            .first()
            .and_then(|p| p.get("text").and_then(Value::as_str).or_else(|| p.as_str()))
            .map_or(json!(""), |t| json!(t)),
        _ => json!(""),
    }
}

/// Sets `key` of the previous assistant message when it has none; else appends `message`.
fn merge_assistant(messages: &mut Vec<Value>, key: &str, value: Value) {
    if let Some(Value::Object(prev)) = messages.last_mut() {
        if prev.get("role").and_then(Value::as_str) == Some("assistant")
            && prev.get(key).is_none_or(Value::is_null)
        {
            prev.insert(key.into(), value);
            return;
        }
    }
    messages.push(json!({"role": "assistant", key: value}));
}

fn str_field<'a>(item: &'a Value, key: &str) -> Result<&'a str, ApiError> {
    item.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_input(format!("input item is missing the string field `{key}`")))
}

/// The chat messages of `input`, appended to `messages`.
pub fn input_messages(input: &Value, messages: &mut Vec<Value>) -> Result<(), ApiError> {
    let items = match input {
        Value::String(s) => {
            messages.push(json!({"role": "user", "content": s}));
            return Ok(());
        }
        Value::Array(items) => items,
        _ => return Err(invalid_input("input must be a string or an array of items")),
    };
    for item in items {
        if !item.is_object() {
            return Err(invalid_input("input items must be objects"));
        }
        match item.get("type").and_then(Value::as_str) {
            Some("function_call") => {
                let call = tool_call(
                    str_field(item, "call_id")?,
                    str_field(item, "name")?,
                    str_field(item, "arguments")?,
                );
                push_tool_call(messages, call);
            }
            Some("function_call_output") => messages.push(json!({
                "role": "tool",
                "content": text_parts(item.get("output").unwrap_or(&Value::Null)),
                "tool_call_id": str_field(item, "call_id")?,
            })),
            Some("reasoning") => {
                let first_text = |key: &str| {
                    item.get(key)
                        .and_then(Value::as_array)
                        .and_then(|a| a.first())
                        .and_then(|p| p.get("text"))
                        .and_then(Value::as_str)
                };
                let text = first_text("content").or_else(|| first_text("summary"));
                merge_assistant(messages, "reasoning", json!(text.unwrap_or("")));
            }
            None | Some("message") => match item.get("role").and_then(Value::as_str) {
                Some("assistant") => {
                    merge_assistant(messages, "content", assistant_text(item.get("content")));
                }
                Some(_) => {
                    let mut m = item.clone();
                    if let Some(c) = m.get_mut("content") {
                        *c = text_parts(c);
                    }
                    messages.push(m);
                }
                None => return Err(invalid_input("a message item needs a `role`")),
            },
            Some(other) => {
                return Err(invalid_input(format!(
                    "Unsupported input item type: {other}"
                )))
            }
        }
    }
    Ok(())
}

/// Whether the last input item is an assistant message to continue (vLLM's
/// `should_continue_final_message`).
fn continues_final_message(input: &Value) -> bool {
    let Some(last) = input.as_array().and_then(|a| a.last()) else {
        return false;
    };
    matches!(
        last.get("type")
            .and_then(Value::as_str)
            .unwrap_or("message"),
        "message" | "reasoning"
    ) && matches!(
        last.get("status").and_then(Value::as_str),
        Some("in_progress" | "incomplete")
    )
}

/// Function tools in the chat format, as vLLM hands them to the template.
fn chat_tools(tools: &[Value]) -> Vec<Value> {
    tools
        .iter()
        .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
        .map(|t| {
            let mut f = serde_json::Map::new();
            for key in ["name", "description", "parameters", "strict"] {
                if let Some(v) = t.get(key) {
                    f.insert(key.into(), v.clone());
                }
            }
            json!({"type": "function", "function": f})
        })
        .collect()
}

/// The response object before generation (status `in_progress`), echoing the request.
fn initial_body(req: &ResponsesRequest, model: String, max_output_tokens: usize) -> ResponseBody {
    ResponseBody {
        id: ResponseBody::new_id(),
        created_at: unix_secs(),
        incomplete_details: None,
        instructions: req.instructions.clone(),
        metadata: req.metadata.clone(),
        model,
        object: "response",
        output: Vec::new(),
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        temperature: req.temperature.unwrap_or(1.0),
        tool_choice: req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        tools: req.tools.clone(),
        top_p: req.top_p.unwrap_or(1.0),
        background: false,
        max_output_tokens,
        max_tool_calls: req.max_tool_calls,
        previous_response_id: req.previous_response_id.clone(),
        prompt: req.prompt.clone(),
        prompt_cache_options: None,
        prompt_cache_key: req.prompt_cache_key.clone(),
        prompt_cache_retention: req.prompt_cache_retention.clone(),
        reasoning: req.reasoning.clone(),
        safety_identifier: req.safety_identifier.clone(),
        service_tier: req.service_tier.clone().unwrap_or_else(|| "auto".into()),
        status: "in_progress",
        text: req.text.clone(),
        top_logprobs: None,
        truncation: req.truncation.clone().unwrap_or_else(|| "disabled".into()),
        usage: None,
        user: req.user.clone(),
        presence_penalty: req.presence_penalty.unwrap_or(0.0),
        frequency_penalty: req.frequency_penalty.unwrap_or(0.0),
        kv_transfer_params: None,
        ec_transfer_params: None,
        input_messages: None,
        output_messages: None,
    }
}

fn json_response(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `POST /v1/responses`.
pub async fn create(State(st): State<AppState>, body: Bytes) -> Response {
    let run = async {
        apply_faults(&st).await?;
        let req: ResponsesRequest = parse(&body)?;
        resolve_model(&st, req.model.as_deref())?;
        if req.background == Some(true) {
            return Err(
                ApiError::bad_request("vllm-sim does not support background responses")
                    .with_type("invalid_request_error", Some("background")),
            );
        }
        let mut messages = Vec::new();
        if let Some(instructions) = req.instructions.as_deref().filter(|s| !s.is_empty()) {
            messages.push(json!({"role": "system", "content": instructions}));
        }
        if let Some(id) = &req.previous_response_id {
            let prev = st.responses.get(id).ok_or_else(|| not_found(id))?;
            messages.extend(prev.history.iter().cloned());
        }
        input_messages(&req.input, &mut messages)?;
        let history: Vec<Value> = messages
            .iter()
            .filter(|m| m.get("role").and_then(Value::as_str) != Some("system"))
            .cloned()
            .collect();
        let conv = Conversation {
            messages,
            tools: chat_tools(&req.tools),
            chat_template_kwargs: req.chat_template_kwargs.clone(),
            continue_final_message: continues_final_message(&req.input),
        };
        let prompt = prompt_ids(&st, conv).await?;
        let sampling = Sampling {
            model: req.model.clone(),
            stream: req.stream,
            max_tokens: req.max_output_tokens,
            ignore_eos: req.ignore_eos,
            seed: req.seed,
            ..Sampling::default()
        };
        let room = st.cfg.max_model_len.saturating_sub(prompt.len());
        let p = prepare(&st, Kind::Chat, &sampling, prompt)?;
        let max_output_tokens = req
            .max_output_tokens
            .and_then(|m| usize::try_from(m).ok())
            .map_or(room, |m| m.min(room));
        let mut body = initial_body(&req, p.model.clone(), max_output_tokens);
        let keep = (req.store != Some(false)).then(|| Keep {
            store: st.responses.clone(),
            history,
        });
        let block_size = st.cfg.block_size;
        let close_after = st.faults.get().close_after_tokens;
        let rx = p.job.submit(&st, Api::Responses)?;
        if p.stream {
            let (format, first) = ResponseStream::start(body, block_size, keep);
            return Ok(sse_response(rx, close_after, format, first));
        }
        let answer = match collect(rx, close_after).await? {
            Collected::Done(a) => a,
            Collected::Cut(r) => return Ok(r),
        };
        let item =
            OutputMessage::finished(OutputMessage::new_id(), &answer.text, answer.usage.reason);
        body.finish(vec![item], &answer.usage, block_size);
        let json = body.json();
        if let Some(keep) = keep {
            keep.keep(&body, json.clone());
        }
        Ok(json_response(json))
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/responses/{id}`: a stored response, or vLLM's 404.
pub async fn retrieve(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    match st.responses.get(&id) {
        Some(r) => json_response(r.body.clone()),
        None => not_found(&id).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(input: Value) -> Vec<Value> {
        let mut m = Vec::new();
        input_messages(&input, &mut m).unwrap();
        m
    }

    #[test]
    fn a_string_is_one_user_message() {
        assert_eq!(
            convert(json!("hi")),
            vec![json!({"role": "user", "content": "hi"})]
        );
    }

    #[test]
    fn items_become_chat_messages_as_vllm_builds_them() {
        let m = convert(json!([
            {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "checking", "annotations": []}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"role": "user", "content": "thanks"},
        ]));
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[0]["content"],
            json!([{"type": "text", "text": "weather?"}])
        );
        assert_eq!(m[1]["role"], "assistant");
        assert_eq!(m[1]["content"], "checking");
        assert_eq!(m[1]["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(m[1]["tool_calls"][0]["id"], "c1");
        assert_eq!(
            m[2],
            json!({"role": "tool", "content": "sunny", "tool_call_id": "c1"})
        );
        assert_eq!(m[3]["content"], "thanks");
    }

    #[test]
    fn a_call_without_an_assistant_message_opens_one() {
        let m = convert(json!([
            {"role": "user", "content": "q"},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        ]));
        assert_eq!(m[1]["role"], "assistant");
        assert!(m[1].get("content").is_none());
    }

    #[test]
    fn bad_items_are_400_on_input() {
        for bad in [
            json!([{"type": "web_search_call"}]),
            json!([{"content": "no role"}]),
            json!([{"type": "function_call", "name": "f"}]),
            json!([1]),
            json!(3),
        ] {
            let mut m = Vec::new();
            let e = input_messages(&bad, &mut m).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.param, Some("input"));
        }
    }

    #[test]
    fn partial_assistant_message_is_continued() {
        assert!(continues_final_message(&json!([
            {"role": "user", "content": "q"},
            {"type": "message", "role": "assistant", "status": "incomplete", "content": "a"},
        ])));
        assert!(!continues_final_message(
            &json!([{"role": "user", "content": "q"}])
        ));
        assert!(!continues_final_message(&json!("q")));
    }

    #[test]
    fn function_tools_take_the_chat_format() {
        let t = chat_tools(&[
            json!({"type": "function", "name": "f", "parameters": {"type": "object"}}),
            json!({"type": "web_search_preview"}),
        ]);
        assert_eq!(
            t,
            vec![
                json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}})
            ]
        );
    }
}
