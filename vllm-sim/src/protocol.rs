//! Response bodies of the OpenAI-compatible API, with vLLM's fields in vLLM's order
//! (`id, object, created, model, choices, usage, …`); `null` fields are written as vLLM
//! writes them.

use serde::Serialize;

/// `usage`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct UsageInfo {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt + completion.
    pub total_tokens: usize,
    /// Output tokens.
    pub completion_tokens: usize,
    /// Cached prompt tokens.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// A `null` field.
pub type Null = Option<()>;

/// `chat.completion`.
#[derive(Debug, Serialize)]
pub struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [ChatChoice<'a>; 1],
    pub service_tier: Null,
    pub system_fingerprint: Null,
    pub usage: UsageInfo,
    pub prompt_logprobs: Null,
    pub kv_transfer_params: Null,
}

/// A choice of `chat.completion`.
#[derive(Debug, Serialize)]
pub struct ChatChoice<'a> {
    pub index: u32,
    pub message: AssistantMessage<'a>,
    pub logprobs: Null,
    pub finish_reason: &'static str,
    pub stop_reason: Null,
}

/// The assistant message of a `chat.completion`.
#[derive(Debug, Serialize)]
pub struct AssistantMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
    pub refusal: Null,
    pub annotations: Null,
    pub audio: Null,
    pub function_call: Null,
    pub tool_calls: [(); 0],
    pub reasoning_content: Null,
}

/// `text_completion`.
#[derive(Debug, Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [CompletionChoice<'a>; 1],
    pub service_tier: Null,
    pub system_fingerprint: Null,
    pub usage: UsageInfo,
    pub kv_transfer_params: Null,
}

/// A choice of `text_completion`.
#[derive(Debug, Serialize)]
pub struct CompletionChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    pub logprobs: Null,
    pub finish_reason: &'static str,
    pub stop_reason: Null,
    pub prompt_logprobs: Null,
}

/// One SSE chunk (`chat.completion.chunk` or streamed `text_completion`).
#[derive(Debug, Serialize)]
pub struct StreamChunk<'a, C: Serialize> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageInfo>,
}

/// A streamed chat choice.
#[derive(Debug, Serialize)]
pub struct ChatStreamChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub logprobs: Null,
    pub finish_reason: Option<&'static str>,
    /// Present (as `null`) only on the final chunk, as vLLM sends it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<Null>,
}

/// `delta` of a streamed chat choice.
#[derive(Debug, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    pub content: &'a str,
}

/// A streamed completion choice.
#[derive(Debug, Serialize)]
pub struct CompletionStreamChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    pub logprobs: Null,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Null,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<ModelCard<'a>>,
}

/// One model (base or LoRA adapter).
#[derive(Debug, Serialize)]
pub struct ModelCard<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub root: &'a str,
    pub parent: Option<&'a str>,
    pub max_model_len: Option<usize>,
    pub permission: [ModelPermission; 1],
}

/// vLLM's fixed model permission.
#[derive(Debug, Serialize)]
pub struct ModelPermission {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub allow_create_engine: bool,
    pub allow_sampling: bool,
    pub allow_logprobs: bool,
    pub allow_search_indices: bool,
    pub allow_view: bool,
    pub allow_fine_tuning: bool,
    pub organization: &'static str,
    pub group: Null,
    pub is_blocking: bool,
}

impl ModelPermission {
    /// The permission vLLM attaches to every model.
    pub fn new(id: String, created: u64) -> Self {
        ModelPermission {
            id,
            object: "model_permission",
            created,
            allow_create_engine: false,
            allow_sampling: true,
            allow_logprobs: true,
            allow_search_indices: false,
            allow_view: true,
            allow_fine_tuning: false,
            organization: "*",
            group: None,
            is_blocking: false,
        }
    }
}

/// `POST /tokenize`.
#[derive(Debug, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    /// The tokens' vocabulary strings, with `return_token_strs` (and `--tokenizer`).
    pub token_strs: Option<Vec<String>>,
}

/// `POST /detokenize`.
#[derive(Debug, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_keep_vllm_order() {
        let c = StreamChunk {
            id: "x",
            object: "chat.completion.chunk",
            created: 1,
            model: "m",
            choices: vec![ChatStreamChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: "",
                },
                logprobs: None,
                finish_reason: None,
                stop_reason: None,
            }],
            usage: None,
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#
        );
        let m = AssistantMessage {
            role: "assistant",
            content: "hi",
            refusal: None,
            annotations: None,
            audio: None,
            function_call: None,
            tool_calls: [],
            reasoning_content: None,
        };
        assert!(serde_json::to_string(&m)
            .unwrap()
            .contains(r#""tool_calls":[],"#));
    }
}
