//! `POST /v1/embeddings` as vLLM 0.34 serves an embedding model
//! (`vllm/entrypoints/pooling/embed/`): each input is one engine request that is all prefill —
//! it queues, takes a batch seat and KV blocks, hits and fills the prefix cache and takes its
//! modelled prefill time like any prompt (so it shows in `vllm:num_requests_running` and
//! `…_waiting`), then ends without decoding; the prompt tokens count in
//! `vllm:prompt_tokens_total`, none in `…generation_tokens_total`.
//!
//! * `input`: a string, an array of strings, an array of token ids or an array of such
//!   arrays (one embedding each). Text is tokenized with the model's tokenizer, its special
//!   tokens added unless `add_special_tokens: false`, or by the stand-in.
//! * The vectors are deterministic: a function of the server seed and the prompt ids, of
//!   [`crate::SimConfig::embedding_dim`] dimensions, L2-normalised as vLLM's embedding pooler
//!   normalises. The model behaves as a Matryoshka model: `dimensions` keeps that many leading
//!   components (1 to the size, else 400), normalised again.
//! * `encoding_format`: `float` (default) or `base64` (little-endian float32, what the
//!   official `openai` client asks for by default); vLLM's binary formats (`bytes`,
//!   `bytes_only`) and `embed_dtype`s other than `float32` are not simulated (400).
//! * The answer: `{"id": "embd-…", "object": "list", "created", "model", "data": [{"index",
//!   "object": "embedding", "embedding"}], "usage": {"prompt_tokens", "total_tokens",
//!   "completion_tokens": 0, "completion_tokens_details": null}}`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use xxhash_rust::xxh3::xxh3_64;

use crate::api::drive::{collect, Collected};
use crate::error::ApiError;
use crate::metrics::FinishReason;
use crate::openai::{
    apply_faults, off_thread, parse, random_hex, resolve_model, unix_secs, EngineJob,
};
use crate::protocol::Null;
use crate::server::AppState;
use crate::stats::Api;
use crate::tokenizer::{self, digest, TextGen, TokenId};

/// `POST /v1/embeddings` body.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingsRequest {
    /// Model or LoRA adapter (default: the base model).
    pub model: Option<String>,
    /// What to embed.
    pub input: Value,
    /// `float` (default) or `base64`.
    pub encoding_format: Option<String>,
    /// Leading components to keep.
    pub dimensions: Option<i64>,
    /// vLLM extension: `float32` only.
    pub embed_dtype: Option<String>,
    /// vLLM extension: `native` or `little` only.
    pub endianness: Option<String>,
    /// Add the tokenizer's special tokens to text inputs (default true).
    pub add_special_tokens: Option<bool>,
}

/// The inputs: texts or token ids.
#[derive(Debug, Clone, PartialEq)]
enum Input {
    Text(String),
    Ids(Vec<TokenId>),
}

fn ids(items: &[Value]) -> Option<Vec<TokenId>> {
    items
        .iter()
        .map(|v| v.as_u64().and_then(|n| TokenId::try_from(n).ok()))
        .collect()
}

/// The inputs of `input`, in order.
fn inputs(input: &Value) -> Result<Vec<Input>, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "input must be a string, an array of strings, an array of token ids or an array \
             of token-id arrays",
        )
    };
    match input {
        Value::String(s) => Ok(vec![Input::Text(s.clone())]),
        Value::Array(items) if items.is_empty() => {
            Err(ApiError::bad_request("input must not be empty"))
        }
        Value::Array(items) if items.iter().all(Value::is_number) => {
            Ok(vec![Input::Ids(ids(items).ok_or_else(bad)?)])
        }
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(Input::Text(s.clone())),
                Value::Array(inner) => ids(inner).map(Input::Ids).ok_or_else(bad),
                _ => Err(bad()),
            })
            .collect(),
        _ => Err(bad()),
    }
}

/// The deterministic embedding of a prompt: `dim` components in [-1, 1), the first `keep`
/// of them L2-normalised, as float32 values.
pub fn embedding(seed: u64, prompt: &[TokenId], dim: usize, keep: usize) -> Vec<f32> {
    let d = digest(prompt) ^ seed.rotate_left(29);
    let mut v: Vec<f64> = (0..dim.min(keep))
        .map(|i| {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&d.to_le_bytes());
            bytes[8..].copy_from_slice(&(i as u64).to_le_bytes());
            (xxh3_64(&bytes) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v.into_iter().map(|x| x as f32).collect()
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An embedding as floats or base64.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
enum Vector {
    Floats(Vec<f64>),
    Base64(String),
}

#[derive(Debug, Serialize)]
struct Datum {
    index: usize,
    object: &'static str,
    embedding: Vector,
}

#[derive(Debug, Serialize)]
struct EmbeddingUsage {
    prompt_tokens: usize,
    total_tokens: usize,
    completion_tokens: usize,
    completion_tokens_details: Null,
}

#[derive(Debug, Serialize)]
struct EmbeddingResponse<'a> {
    id: String,
    object: &'static str,
    created: u64,
    model: &'a str,
    data: Vec<Datum>,
    usage: EmbeddingUsage,
}

/// Checks the options; `Ok(base64)`.
fn check_format(req: &EmbeddingsRequest) -> Result<bool, ApiError> {
    if let Some(t) = req.embed_dtype.as_deref().filter(|t| *t != "float32") {
        return Err(ApiError::bad_request(format!(
            "vllm-sim supports only embed_dtype float32 (got {t})"
        )));
    }
    if let Some(e) = req
        .endianness
        .as_deref()
        .filter(|e| !matches!(*e, "native" | "little"))
    {
        return Err(ApiError::bad_request(format!(
            "vllm-sim supports only native (little) endianness (got {e})"
        )));
    }
    match req.encoding_format.as_deref() {
        None | Some("float") => Ok(false),
        Some("base64") => Ok(true),
        Some(f @ ("bytes" | "bytes_only")) => Err(ApiError::bad_request(format!(
            "vllm-sim does not simulate encoding_format {f}; use float or base64"
        ))),
        Some(f) => Err(ApiError::bad_request(format!(
            "encoding_format must be float or base64 (got {f})"
        ))),
    }
}

/// `POST /v1/embeddings`.
pub async fn create(State(st): State<AppState>, body: Bytes) -> Response {
    let run = async {
        apply_faults(&st).await?;
        let req: EmbeddingsRequest = parse(&body)?;
        let (model, lora) = resolve_model(&st, req.model.as_deref())?;
        let as_base64 = check_format(&req)?;
        let dim = st.cfg.embedding_dim;
        let keep = match req.dimensions {
            None => dim,
            Some(d) if d >= 1 && d as u64 <= dim as u64 => d as usize,
            Some(d) => {
                return Err(ApiError::bad_request(format!(
                    "Model '{model}' only supports dimensions in range [1, {dim}], got {d}."
                ))
                .with_type("BadRequestError", Some("dimensions")))
            }
        };
        let items = inputs(&req.input)?;
        let add_special = req.add_special_tokens.unwrap_or(true);
        let prompts: Vec<Vec<TokenId>> = match st.tokenizer.clone() {
            None => items
                .into_iter()
                .map(|i| match i {
                    Input::Text(s) => tokenizer::encode(&s),
                    Input::Ids(ids) => ids,
                })
                .collect(),
            Some(tok) => {
                off_thread(move || {
                    items
                        .into_iter()
                        .map(|i| match i {
                            Input::Text(s) => tok.text_prompt(&s, add_special),
                            Input::Ids(ids) => Ok(ids),
                        })
                        .collect()
                })
                .await?
            }
        };
        let max_len = st.cfg.max_model_len;
        for p in &prompts {
            if p.is_empty() {
                return Err(ApiError::bad_request("The decoder prompt cannot be empty"));
            }
            if p.len() > max_len {
                return Err(ApiError::bad_request(format!(
                    "This model's maximum context length is {max_len} tokens. However, you \
                     requested {} tokens in the input for embedding generation. Please reduce \
                     the length of the input.",
                    p.len()
                )));
            }
        }
        let vectors: Vec<Vec<f32>> = prompts
            .iter()
            .map(|p| embedding(st.cfg.seed, p, dim, keep))
            .collect();
        let mut receivers = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let job = EngineJob {
                lora: lora.clone(),
                prompt,
                output_len: 0,
                finish: FinishReason::Stop,
                gen: TextGen::new(st.cfg.seed, 0),
                eos: tokenizer::END_OF_TEXT,
            };
            receivers.push(job.submit(&st, Api::Embeddings)?);
        }
        let close_after = st.faults.get().close_after_tokens;
        let mut prompt_tokens = 0;
        for rx in receivers {
            match collect(rx, close_after).await? {
                Collected::Done(a) => prompt_tokens += a.usage.prompt_tokens,
                Collected::Cut(r) => return Ok(r),
            }
        }
        let data = vectors
            .into_iter()
            .enumerate()
            .map(|(index, v)| Datum {
                index,
                object: "embedding",
                embedding: if as_base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Vector::Base64(base64(&bytes))
                } else {
                    Vector::Floats(v.into_iter().map(f64::from).collect())
                },
            })
            .collect();
        let body = EmbeddingResponse {
            id: format!("embd-{}", random_hex()),
            object: "list",
            created: unix_secs(),
            model: &model,
            data,
            usage: EmbeddingUsage {
                prompt_tokens,
                total_tokens: prompt_tokens,
                completion_tokens: 0,
                completion_tokens_details: None,
            },
        };
        let json = serde_json::to_string(&body).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding: {e}"))
        })?;
        Ok::<_, ApiError>(([(header::CONTENT_TYPE, "application/json")], json).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inputs_take_every_openai_form() {
        assert_eq!(inputs(&json!("a")).unwrap(), vec![Input::Text("a".into())]);
        assert_eq!(
            inputs(&json!(["a", "b"])).unwrap(),
            vec![Input::Text("a".into()), Input::Text("b".into())]
        );
        assert_eq!(
            inputs(&json!([1, 2])).unwrap(),
            vec![Input::Ids(vec![1, 2])]
        );
        assert_eq!(
            inputs(&json!([[1], [2, 3]])).unwrap(),
            vec![Input::Ids(vec![1]), Input::Ids(vec![2, 3])]
        );
        for bad in [json!([]), json!([-1]), json!([{"role": "user"}]), json!(1)] {
            assert!(inputs(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embedding(0, &[1, 2, 3], 64, 64);
        assert_eq!(a, embedding(0, &[1, 2, 3], 64, 64));
        assert_ne!(a, embedding(0, &[1, 2, 4], 64, 64));
        assert_ne!(a, embedding(1, &[1, 2, 3], 64, 64));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        let short = embedding(0, &[1, 2, 3], 64, 8);
        assert_eq!(short.len(), 8);
        let norm: f32 = short.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        // Matryoshka: the short vector points the way the long one's head does.
        let head: Vec<f32> = a[..8].to_vec();
        let dot: f32 = head.iter().zip(&short).map(|(x, y)| x * y).sum();
        let head_norm: f32 = head.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((dot / head_norm - 1.0).abs() < 1e-5);
    }

    #[test]
    fn base64_is_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&1.0f32.to_le_bytes()), "AACAPw==");
    }
}
