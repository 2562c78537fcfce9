//! The served model's own tokenizer and chat template (`--tokenizer DIR`, vLLM's flag), applied
//! as vLLM applies them, in place of the stand-in of [`crate::tokenizer`].
//!
//! `DIR` holds the model's Hugging Face `tokenizer.json` and `tokenizer_config.json` (with its
//! `chat_template`, or a `chat_template.jinja` next to it), loaded by [`llm_lb_tokenizer`]:
//!
//! * a chat request's prompt is the whole request body rendered through the template (so
//!   `tools`, `add_generation_prompt`, `continue_final_message`, `chat_template_kwargs` and
//!   `documents` apply as in vLLM) and tokenized without adding special tokens; a template
//!   error is an HTTP 400, as in vLLM;
//! * a `/v1/completions` string prompt is tokenized with the tokenizer's special tokens added
//!   (vLLM's default `add_special_tokens`); token-id prompts are taken as given;
//! * generated tokens are real ids of the vocabulary: the generator's words ([`WORDS`], `" the"`,
//!   `" sky"`, …) as the tokenizer encodes them, each with its decoded text. When at least
//!   [`MIN_SINGLE_TOKEN_WORDS`] of them are single tokens that round-trip (they encode to one id,
//!   decode to the word, and a word repeated encodes to the id repeated — true of byte-level BPE
//!   vocabularies such as Llama 3's, Qwen's or SmolLM's), only those are used, so a reply sent
//!   back as the next turn's assistant message re-tokenizes to the generated ids, as with a
//!   real model. Otherwise (SentencePiece vocabularies, which split `" the"` into `"▁"` and
//!   `"▁the"`) every word is emitted as its several ids, each token carrying the text it adds
//!   to the word, and the round trip is only approximate;
//! * the EOS of both endpoints is the tokenizer's `eos_token` (`tokenizer_config.json`, else
//!   `special_tokens_map.json`, else `generation_config.json`'s `eos_token_id`), as vLLM stops on
//!   the tokenizer's EOS; it is counted in `completion_tokens` and adds no text.
//!
//! What stays approximate: the text is a word salad (the words are real tokens, not a language
//! model's choice); objects in the request reach the template with their keys sorted
//! (serde_json's map order) where Python keeps the request's order, which only templates that
//! print whole objects (`tools | tojson`) show; `generation_config.json`'s extra stop ids are not
//! used.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use llm_lb_tokenizer::{ChatTokenizer, TokenizerError};
use serde_json::Value;

use crate::error::{ApiError, SimError};
use crate::tokenizer::{TokenId, TokenText, Word, Words, WORDS};

/// Fewest round-tripping single-token words for the generator to use only those.
pub const MIN_SINGLE_TOKEN_WORDS: usize = 16;

/// A model's tokenizer, chat template, EOS and the generator's words in its vocabulary.
///
/// Loaded once per server and shared by every request (`Arc`).
#[derive(Debug)]
pub struct ModelTokenizer {
    chat: ChatTokenizer,
    eos: TokenId,
    words: Arc<Words>,
    single_token_words: bool,
    dir: PathBuf,
}

fn load_error(dir: &Path, message: impl std::fmt::Display) -> SimError {
    SimError::Tokenizer {
        dir: dir.to_owned(),
        message: message.to_string(),
    }
}

fn bad_request(e: TokenizerError) -> ApiError {
    ApiError::bad_request(e.to_string())
}

/// A JSON file of the model directory, `None` when absent or unreadable as JSON.
fn read_json(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// A special token as transformers stores it: a string, or an `AddedToken` object `{content}`.
fn token_text(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::Array(_) => None,
    }
}

impl ModelTokenizer {
    /// Loads `dir` (`tokenizer.json`, `tokenizer_config.json`, …) and works out the EOS and
    /// the generator's words.
    pub fn load(dir: &Path) -> Result<Self, SimError> {
        let chat = ChatTokenizer::from_dir(dir).map_err(|e| load_error(dir, e))?;
        let eos = Self::find_eos(dir, &chat)?;
        let (words, single_token_words) =
            Self::generator_words(&chat).map_err(|e| load_error(dir, e))?;
        Ok(ModelTokenizer {
            chat,
            eos,
            words,
            single_token_words,
            dir: dir.to_owned(),
        })
    }

    /// The tokenizer's EOS id: `eos_token` of `tokenizer_config.json` or
    /// `special_tokens_map.json`, else `eos_token_id` of `generation_config.json`.
    fn find_eos(dir: &Path, chat: &ChatTokenizer) -> Result<TokenId, SimError> {
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            let Some(config) = read_json(&dir.join(file)) else {
                continue;
            };
            if let Some(text) = config.get("eos_token").and_then(token_text) {
                return chat.tokenizer().token_to_id(text).ok_or_else(|| {
                    load_error(
                        dir,
                        format!("{file}: eos_token {text:?} is not in the vocabulary"),
                    )
                });
            }
        }
        let generation = read_json(&dir.join("generation_config.json"));
        let id = match generation.as_ref().and_then(|g| g.get("eos_token_id")) {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::Array(ids)) => ids.first().and_then(Value::as_u64),
            _ => None,
        };
        id.and_then(|i| TokenId::try_from(i).ok()).ok_or_else(|| {
            load_error(
                dir,
                "no eos_token in tokenizer_config.json or special_tokens_map.json, and no \
                 eos_token_id in generation_config.json",
            )
        })
    }

    /// The generator's words as this vocabulary's tokens: the single-token ones that round-trip
    /// when there are enough of them (`true`), else every word as its tokens (`false`).
    fn generator_words(chat: &ChatTokenizer) -> Result<(Arc<Words>, bool), TokenizerError> {
        let decode = |ids: &[TokenId]| {
            chat.tokenizer()
                .decode(ids, false)
                .map_err(|e| TokenizerError::Encode(e.to_string()))
        };
        let mut single = Vec::new();
        for w in WORDS {
            if let [id] = chat.encode(w, false)?[..] {
                if decode(&[id])? == w && chat.encode(&format!("{w}{w}"), false)? == [id, id] {
                    single.extend(Word::new(vec![(id, TokenText::from(w))]));
                }
            }
        }
        if single.len() >= MIN_SINGLE_TOKEN_WORDS {
            if let Some(words) = Words::new(single) {
                return Ok((Arc::new(words), true));
            }
        }
        let mut words = Vec::new();
        for w in WORDS {
            let ids = chat.encode(w, false)?;
            let mut tokens = Vec::with_capacity(ids.len());
            let mut before = String::new();
            for k in 0..ids.len() {
                let text = decode(&ids[..=k])?;
                let piece = text.strip_prefix(before.as_str()).unwrap_or("");
                tokens.push((ids[k], TokenText::from(piece)));
                before = text;
            }
            words.extend(Word::new(tokens));
        }
        let words = Words::new(words).ok_or_else(|| {
            TokenizerError::Encode("the tokenizer encodes the generator's words to nothing".into())
        })?;
        Ok((Arc::new(words), false))
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The chat template and tokenizer.
    pub fn chat(&self) -> &ChatTokenizer {
        &self.chat
    }

    /// The EOS token id.
    pub fn eos(&self) -> TokenId {
        self.eos
    }

    /// The generator's words in this vocabulary.
    pub fn words(&self) -> &Arc<Words> {
        &self.words
    }

    /// Whether every generated word is one token (so replies re-tokenize exactly).
    pub fn single_token_words(&self) -> bool {
        self.single_token_words
    }

    /// The prompt ids of a chat request body, as vLLM computes them; 400 when the template
    /// cannot render it.
    pub fn chat_prompt(&self, body: &Value) -> Result<Vec<TokenId>, ApiError> {
        self.chat.chat_tokens(body).map_err(bad_request)
    }

    /// The chat prompt tokenized with the tokenizer's special tokens added (vLLM's `/tokenize`
    /// with `add_special_tokens: true`).
    pub fn chat_prompt_with_special_tokens(&self, body: &Value) -> Result<Vec<TokenId>, ApiError> {
        let text = self.chat.render_chat(body).map_err(bad_request)?;
        self.chat.encode(&text, true).map_err(bad_request)
    }

    /// The ids of a text prompt, special-token strings parsed, the tokenizer's own special
    /// tokens (BOS, …) added when `add_special_tokens`.
    pub fn text_prompt(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenId>, ApiError> {
        self.chat
            .encode(text, add_special_tokens)
            .map_err(bad_request)
    }

    /// The text of token ids, special tokens included (vLLM's `/detokenize`); 400 for an id
    /// outside the vocabulary.
    pub fn decode(&self, ids: &[TokenId]) -> Result<String, ApiError> {
        let tok = self.chat.tokenizer();
        let size = tok.get_vocab_size(true);
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= size) {
            return Err(ApiError::bad_request(format!(
                "Token id {bad} is out of vocabulary (size {size})."
            )));
        }
        tok.decode(ids, false)
            .map_err(|e| ApiError::bad_request(format!("cannot decode the tokens: {e}")))
    }

    /// The vocabulary strings of token ids (`token_strs` of vLLM's `/tokenize`).
    pub fn token_strs(&self, ids: &[TokenId]) -> Vec<String> {
        let tok = self.chat.tokenizer();
        ids.iter()
            .map(|&id| tok.id_to_token(id).unwrap_or_default())
            .collect()
    }
}
