//! The token ids an inference engine computes for an OpenAI request, computed in the gateway.
//!
//! An engine turns a `/v1/chat/completions` body into tokens in two steps: it renders the model's
//! Hugging Face chat template (Jinja) over the messages, then tokenizes the text with the model's
//! tokenizer, parsing special-token strings such as `<|im_start|>` as the special tokens they
//! name. [`ChatTokenizer`] does both from a model directory's `tokenizer.json` and
//! `tokenizer_config.json` (and `chat_template.jinja` where a repository ships one), with
//! [MiniJinja](https://docs.rs/minijinja) configured as transformers configures Jinja and
//! Hugging Face's own `tokenizers` crate, so the ids are the engine's ids: the KV-cache blocks a
//! router predicts from them are the blocks the engine caches.
//!
//! ```no_run
//! use llm_lb_tokenizer::ChatTokenizer;
//! # fn main() -> Result<(), llm_lb_tokenizer::TokenizerError> {
//! let tok = ChatTokenizer::from_dir(std::path::Path::new("/models/SmolLM2-135M-Instruct"))?;
//! let body = serde_json::json!({"messages": [{"role": "user", "content": "Hello!"}]});
//! let ids = tok.chat_tokens(&body)?; // what the engine feeds its KV cache
//! # let _ = ids; Ok(()) }
//! ```
//!
//! What is rendered follows vLLM and transformers ([`Engine::HuggingFace`], the default):
//! `add_generation_prompt` defaults to true, `continue_final_message` cuts the prompt after the
//! last message's text, content given as a list of parts is joined into one string (parts
//! separated by `"\n"`) for templates that only print string content and passed through for
//! templates that iterate over parts, and tool-call `arguments` strings are parsed into objects.
//! [`Engine::LlamaCpp`] adds what llama.cpp's server does differently (see its docs).
//!
//! A chat is sent whole again with every turn: the ids of the text between two special tokens
//! (a message, for chat templates that wrap each message in them) are kept, bounded, and only the
//! new messages are tokenized ([`SegmentStats`]; exact by construction, and checked now and then
//! against tokenizing the whole prompt).
//!
//! Object keys reach the template in the order of `serde_json`'s `Map`: sorted, unless the
//! final binary enables serde_json's `preserve_order` feature, in which case they keep the
//! request's order as Python does. Only templates that print whole objects (`tools | tojson`)
//! see the difference.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::{Environment, Value as JinjaValue};
use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

mod pyjson;
mod segments;
mod template;

use segments::SegmentCache;
pub use segments::SegmentStats;

/// Why a tokenizer could not be loaded, or a request rendered or tokenized.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// A file of the model directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What reading it said.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file of the model directory is not valid JSON.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Where and why parsing failed.
        #[source]
        source: serde_json::Error,
    },
    /// `tokenizer.json` is not a tokenizer the `tokenizers` crate can load.
    #[error("{}: {message}", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// What `tokenizers` said.
        message: String,
    },
    /// The model has no chat template, so a chat request cannot be rendered.
    #[error("the model has no chat template")]
    NoChatTemplate,
    /// The chat template does not compile, or raised an error while rendering (including its own
    /// `raise_exception`, for example on roles that do not alternate).
    #[error("chat template: {0}")]
    Template(#[from] minijinja::Error),
    /// The request is not a chat request the template can render (no `messages`, or conflicting
    /// options).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The tokenizer failed on the text.
    #[error("tokenizer: {0}")]
    Encode(String),
}

/// Whose conventions [`ChatTokenizer::chat_tokens`] follows where inference engines differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Engine {
    /// vLLM, SGLang, TGI and transformers' `apply_chat_template(tokenize=True)`: the rendered
    /// prompt is tokenized without adding special tokens (the template writes any BOS itself).
    #[default]
    HuggingFace,
    /// llama.cpp's `llama-server`: it strips a leading BOS string from the rendered prompt when
    /// the model adds BOS (and a trailing EOS string when it adds EOS) and then tokenizes with
    /// special tokens added, so the model's BOS is there whether or not the template wrote it.
    /// A trailing assistant message is continued (its server option `prefill_assistant`, on by
    /// default) instead of being followed by a generation prompt.
    LlamaCpp,
}

/// How a template wants a message's `content`, found by rendering a probe message both ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ContentFormat {
    /// It prints a string `content` but not a list of parts: parts are joined into a string.
    StringOnly,
    /// It prints a list of parts but not a string: a string becomes one text part.
    TypedOnly,
    /// It handles both, or the probe told nothing: content is passed as given.
    Any,
}

/// Variables the renderer sets itself; `chat_template_kwargs` cannot override them.
const RESERVED: [&str; 4] = ["messages", "tools", "add_generation_prompt", "documents"];

/// A model's chat template and tokenizer: OpenAI requests in, the engine's token ids out.
///
/// Loading parses a tokenizer of tens of thousands of tokens, so load once and share it (it is
/// `Send + Sync`; an `Arc<ChatTokenizer>` is cheap to clone). Rendering and encoding take
/// `&self` and may run on many threads at once.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    env: Environment<'static>,
    /// Name (in `env`) and content format of the template for requests without tools.
    default_template: Option<(String, ContentFormat)>,
    /// The same for requests with tools, when the model has a separate `tool_use` template.
    tool_template: Option<(String, ContentFormat)>,
    /// `bos_token`, `eos_token`, … as the template sees them.
    special_tokens: BTreeMap<String, JinjaValue>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Whether `encode(_, true)` adds the BOS / EOS token.
    adds_bos: bool,
    adds_eos: bool,
    engine: Engine,
    /// Ids of prompt segments already tokenized (a chat's earlier turns).
    segments: SegmentCache,
}

impl fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("chat_template", &self.default_template.is_some())
            .field("tool_use_template", &self.tool_template.is_some())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("engine", &self.engine)
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| TokenizerError::Json {
                path: path.to_owned(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_text(path: &Path) -> Result<Option<String>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A special token as transformers stores it: a string, or an `AddedToken` object `{content}`.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::Array(_) => None,
    }
}

impl ChatTokenizer {
    /// Loads a model directory as Hugging Face repositories lay it out: `tokenizer.json`
    /// (required), `tokenizer_config.json` (its `chat_template` — a string, or a list of
    /// `{name, template}` of which `default` and `tool_use` are used — and its `*_token`
    /// entries, strings or `{content}` objects), `special_tokens_map.json` for special tokens the
    /// config lacks, and `chat_template.jinja` plus `additional_chat_templates/*.jinja`, which
    /// newer repositories ship instead and which take precedence as in transformers.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|source| TokenizerError::Io {
            path: path.clone(),
            source,
        })?;
        let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Load {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_else(|| json!({}));
        let special_map =
            read_json(&dir.join("special_tokens_map.json"))?.unwrap_or_else(|| json!({}));

        let mut templates: BTreeMap<String, String> = BTreeMap::new();
        match config.get("chat_template") {
            Some(Value::String(s)) => {
                templates.insert("default".to_owned(), s.clone());
            }
            Some(Value::Array(list)) => {
                for item in list {
                    if let (Some(name), Some(t)) = (
                        item.get("name").and_then(Value::as_str),
                        item.get("template").and_then(Value::as_str),
                    ) {
                        templates.insert(name.to_owned(), t.to_owned());
                    }
                }
            }
            Some(_) | None => {}
        }
        let extra_dir = dir.join("additional_chat_templates");
        if let Ok(entries) = std::fs::read_dir(&extra_dir) {
            for entry in entries.flatten() {
                let p = entry.path();
                if let (Some(name), Some("jinja")) = (
                    p.file_stem().and_then(|s| s.to_str()),
                    p.extension().and_then(|s| s.to_str()),
                ) {
                    if let Some(t) = read_text(&p)? {
                        templates.insert(name.to_owned(), t);
                    }
                }
            }
        }
        if let Some(t) = read_text(&dir.join("chat_template.jinja"))? {
            templates.insert("default".to_owned(), t);
        }
        Self::build(tokenizer, &config, &special_map, templates)
    }

    /// A tokenizer from a loaded `tokenizers` tokenizer, the `tokenizer_config.json` object and
    /// named chat templates (`default`, `tool_use`).
    fn build(
        tokenizer: Tokenizer,
        config: &Value,
        special_map: &Value,
        templates: BTreeMap<String, String>,
    ) -> Result<Self, TokenizerError> {
        let mut special_tokens = BTreeMap::new();
        let mut bos_token = None;
        let mut eos_token = None;
        for source in [special_map, config] {
            let Some(obj) = source.as_object() else {
                continue;
            };
            for (key, v) in obj {
                if key.ends_with("_token") {
                    if let Some(text) = token_text(v) {
                        if key == "bos_token" {
                            bos_token = Some(text.clone());
                        } else if key == "eos_token" {
                            eos_token = Some(text.clone());
                        }
                        special_tokens.insert(key.clone(), JinjaValue::from(text));
                    }
                } else if key == "additional_special_tokens" {
                    if let Some(list) = v.as_array() {
                        let texts: Vec<String> = list.iter().filter_map(token_text).collect();
                        special_tokens.insert(key.clone(), JinjaValue::from(texts));
                    }
                }
            }
        }

        let mut env = template::environment();
        for (name, source) in &templates {
            env.add_template_owned(name.clone(), template::rewrite_generation_tags(source))?;
        }
        let default_name = if templates.contains_key("default") {
            Some("default".to_owned())
        } else if templates.len() == 1 {
            templates.keys().next().cloned()
        } else {
            None
        };

        let bos_id = bos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
        let eos_id = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
        let empty = tokenizer
            .encode_fast("", true)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let adds_bos = bos_id.is_some() && empty.get_ids().first().copied() == bos_id;
        let adds_eos = eos_id.is_some() && empty.get_ids().last().copied() == eos_id;

        let segments = SegmentCache::new(&tokenizer);
        let mut tok = ChatTokenizer {
            tokenizer,
            segments,
            env,
            default_template: None,
            tool_template: None,
            special_tokens,
            bos_token,
            eos_token,
            adds_bos,
            adds_eos,
            engine: Engine::default(),
        };
        tok.default_template = default_name.map(|n| {
            let format = tok.probe_content_format(&n);
            (n, format)
        });
        if templates.contains_key("tool_use") {
            let format = tok.probe_content_format("tool_use");
            tok.tool_template = Some(("tool_use".to_owned(), format));
        }
        Ok(tok)
    }

    /// Follows `engine`'s conventions where engines differ (default: [`Engine::HuggingFace`]).
    pub fn with_engine(mut self, engine: Engine) -> Self {
        self.engine = engine;
        self
    }

    /// Whose conventions this tokenizer follows.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The underlying Hugging Face tokenizer (to decode, or to look tokens up).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.default_template.is_some()
    }

    /// Renders the template over a probe message given as a string and as a list of parts, and
    /// tells which of the two it prints (as llama.cpp's template capability check does).
    fn probe_content_format(&self, name: &str) -> ContentFormat {
        const MARKER: &str = "LLMLB_CONTENT_PROBE_7f3a";
        let render = |content: Value| {
            let messages = json!([{"role": "user", "content": content}]);
            self.render_template(name, &messages, None, true, &Map::new(), None)
                .ok()
        };
        let string_ok = render(json!(MARKER)).is_some_and(|out| out.contains(MARKER));
        let typed_ok = render(json!([{"type": "text", "text": MARKER}])).is_some_and(|out| {
            // Printing the list itself (`[{"type": "text", "text": "…"}]`) is not handling it.
            out.contains(MARKER)
                && !out.contains(&format!("\"{MARKER}\""))
                && !out.contains(&format!("'{MARKER}'"))
        });
        match (string_ok, typed_ok) {
            (true, false) => ContentFormat::StringOnly,
            (false, true) => ContentFormat::TypedOnly,
            (true, true) | (false, false) => ContentFormat::Any,
        }
    }

    fn render_template(
        &self,
        name: &str,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
        kwargs: &Map<String, Value>,
        documents: Option<&Value>,
    ) -> Result<String, TokenizerError> {
        let mut ctx: BTreeMap<String, JinjaValue> = self.special_tokens.clone();
        for (k, v) in kwargs {
            if !RESERVED.contains(&k.as_str()) {
                ctx.insert(k.clone(), JinjaValue::from_serialize(v));
            }
        }
        ctx.insert("messages".to_owned(), JinjaValue::from_serialize(messages));
        ctx.insert(
            "tools".to_owned(),
            tools.map_or(JinjaValue::from(()), JinjaValue::from_serialize),
        );
        ctx.insert(
            "add_generation_prompt".to_owned(),
            JinjaValue::from(add_generation_prompt),
        );
        ctx.insert(
            "documents".to_owned(),
            documents.map_or(JinjaValue::from(()), JinjaValue::from_serialize),
        );
        let template = self.env.get_template(name)?;
        Ok(template.render(JinjaValue::from(ctx))?)
    }

    /// Renders an OpenAI chat request body into the prompt text the engine tokenizes.
    ///
    /// Reads `messages` (required), `tools`, `documents`, `add_generation_prompt` (default
    /// true), `continue_final_message` (default false; the prompt then ends right after the
    /// last message's text, and `add_generation_prompt` must be false) and
    /// `chat_template_kwargs` (extra template variables, such as `enable_thinking`). The
    /// template sees `messages`, `tools` (or none), `add_generation_prompt`, the special tokens
    /// of the tokenizer config (`bos_token`, `eos_token`, …), `raise_exception` and
    /// `strftime_now`.
    pub fn render_chat(&self, request: &Value) -> Result<String, TokenizerError> {
        let invalid = |m: &str| TokenizerError::InvalidRequest(m.to_owned());
        let messages = request
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("'messages' must be an array"))?;
        let flag = |key: &str, default: bool| -> Result<bool, TokenizerError> {
            match request.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(TokenizerError::InvalidRequest(format!(
                    "'{key}' must be a boolean"
                ))),
            }
        };
        let mut add_generation_prompt = flag("add_generation_prompt", true)?;
        let mut continue_final = flag("continue_final_message", false)?;
        let last_is_assistant = messages
            .last()
            .and_then(|m| m.get("role"))
            .and_then(Value::as_str)
            == Some("assistant");
        if self.engine == Engine::LlamaCpp && !continue_final && last_is_assistant {
            continue_final = true;
            add_generation_prompt = false;
        }
        if continue_final && add_generation_prompt {
            return Err(invalid(
                "cannot set both add_generation_prompt and continue_final_message to true",
            ));
        }
        let tools = request
            .get("tools")
            .filter(|t| t.as_array().is_some_and(|a| !a.is_empty()));
        let (name, format) = match (&self.tool_template, tools) {
            (Some(t), Some(_)) => t,
            _ => self
                .default_template
                .as_ref()
                .ok_or(TokenizerError::NoChatTemplate)?,
        };
        let messages = normalize_messages(messages, *format)?;
        let empty = Map::new();
        let kwargs = request
            .get("chat_template_kwargs")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let rendered = self.render_template(
            name,
            &messages,
            tools,
            add_generation_prompt,
            kwargs,
            request.get("documents"),
        )?;
        if !continue_final {
            return Ok(rendered);
        }
        let Some(last) = messages.as_array().and_then(|m| m.last()) else {
            return Ok(rendered);
        };
        cut_after_final_message(rendered, last)
    }

    /// Tokenizes `text`, parsing the special tokens it contains (`<|im_start|>` …) as the
    /// tokens they name; with `add_special_tokens`, the tokenizer's post-processor adds what the
    /// model adds to every input (a BOS, for many models).
    ///
    /// Without `add_special_tokens`, the text between special tokens is tokenized once and its
    /// ids kept (a chat's earlier turns come back with every new turn; see [`SegmentStats`]).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let ids = if add_special_tokens {
            self.tokenizer
                .encode_fast(text, true)
                .map(|e| e.get_ids().to_vec())
        } else {
            self.segments.encode(&self.tokenizer, text)
        };
        ids.map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// What the cache of tokenized segments did so far.
    pub fn segment_stats(&self) -> SegmentStats {
        self.segments.stats()
    }

    /// The token ids the engine feeds its KV cache for a chat request: [`Self::render_chat`],
    /// then tokenized as the [`Engine`] does it.
    pub fn chat_tokens(&self, request: &Value) -> Result<Vec<u32>, TokenizerError> {
        let prompt = self.render_chat(request)?;
        match self.engine {
            Engine::HuggingFace => self.encode(&prompt, false),
            Engine::LlamaCpp => {
                let mut text = prompt.as_str();
                if self.adds_bos {
                    if let Some(bos) = &self.bos_token {
                        text = text.strip_prefix(bos.as_str()).unwrap_or(text);
                    }
                }
                if self.adds_eos {
                    if let Some(eos) = &self.eos_token {
                        text = text.strip_suffix(eos.as_str()).unwrap_or(text);
                    }
                }
                self.encode(text, true)
            }
        }
    }

    /// The token ids of a `/v1/completions` string prompt: the text with the model's special
    /// tokens added (vLLM's default `add_special_tokens`, and llama.cpp's), special-token strings
    /// parsed.
    pub fn completion_tokens(&self, prompt: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode(prompt, true)
    }
}

/// The messages as the engine hands them to the template: content parts joined or wrapped for
/// the template's content format, tool-call arguments parsed from JSON strings (vLLM).
fn normalize_messages(messages: &[Value], format: ContentFormat) -> Result<Value, TokenizerError> {
    let mut out = Vec::with_capacity(messages.len());
    for message in messages {
        let Some(obj) = message.as_object() else {
            return Err(TokenizerError::InvalidRequest(
                "every message must be an object".to_owned(),
            ));
        };
        let mut obj = obj.clone();
        if let Some(content) = obj.get_mut("content") {
            match (format, &*content) {
                (ContentFormat::StringOnly, Value::Array(parts)) => {
                    *content = Value::String(join_text_parts(parts));
                }
                (ContentFormat::TypedOnly, Value::String(s)) => {
                    *content = json!([{"type": "text", "text": s}]);
                }
                _ => {}
            }
        }
        if obj.get("role").and_then(Value::as_str) == Some("assistant") {
            if let Some(Value::Array(calls)) = obj.get_mut("tool_calls") {
                for call in calls {
                    if let Some(function) = call.get_mut("function").and_then(Value::as_object_mut)
                    {
                        let parsed = match function.get("arguments") {
                            None | Some(Value::Null) => Some(json!({})),
                            Some(Value::String(s)) if s.is_empty() => Some(json!({})),
                            Some(Value::String(s)) => serde_json::from_str::<Value>(s).ok(),
                            Some(_) => None,
                        };
                        if let Some(parsed) = parsed {
                            function.insert("arguments".to_owned(), parsed);
                        }
                    }
                }
            }
        }
        out.push(Value::Object(obj));
    }
    Ok(Value::Array(out))
}

/// Text parts joined by newlines, other parts (images, audio) left out, as llama.cpp and vLLM
/// flatten content for string-only templates.
fn join_text_parts(parts: &[Value]) -> String {
    let mut text = String::new();
    for part in parts {
        if part.get("type").and_then(Value::as_str) != Some("text") {
            continue;
        }
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(part.get("text").and_then(Value::as_str).unwrap_or(""));
    }
    text
}

/// transformers' `continue_final_message`: the prompt ends right after the final message's text
/// (its last text part), keeping the message's trailing whitespace where the template kept it.
fn cut_after_final_message(rendered: String, last: &Value) -> Result<String, TokenizerError> {
    let final_text = match last.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .rev()
            .find_map(|p| p.get("text").and_then(Value::as_str))
            .map(str::to_owned)
            .ok_or_else(|| {
                TokenizerError::InvalidRequest(
                    "continue_final_message: the final message has no text".to_owned(),
                )
            })?,
        _ => String::new(),
    };
    let stripped = final_text.trim();
    let loc = rendered.rfind(stripped).ok_or_else(|| {
        TokenizerError::InvalidRequest(
            "continue_final_message: the final message does not appear in the rendered chat"
                .to_owned(),
        )
    })?;
    let lstripped = final_text.trim_start().len();
    let end = if rendered.get(loc..loc + lstripped) == Some(final_text.as_str()) {
        loc + lstripped
    } else {
        loc + stripped.len()
    };
    let mut rendered = rendered;
    rendered.truncate(end);
    Ok(rendered)
}

#[cfg(test)]
mod tests;
