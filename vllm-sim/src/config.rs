//! Simulator configuration: one struct shared by the library and the command line.
//!
//! [`SimConfig::default`] holds the same defaults as the `vllm-sim` flags, and
//! [`SimConfig::validate`] rejects settings the engine cannot run with.

use std::path::PathBuf;

use crate::error::SimError;
use crate::kv_events::{BlockHashFormat, KvEventsConfig, KvEventsWire};

/// Everything that shapes a simulated vLLM server. Durations are in milliseconds of
/// *model* time; `time_scale` converts them to wall-clock time. The exception is
/// `keep_alive_timeout_ms`, which is wall-clock time.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Served (base) model name, as in `vllm serve MODEL`.
    pub model: String,
    /// Most requests in the running batch (vLLM `--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Most requests allowed to wait beyond the free batch seats; more get HTTP 429.
    pub max_waiting: usize,
    /// KV-cache capacity in blocks, including vLLM's reserved null block.
    pub kv_blocks: usize,
    /// Tokens per KV block (vLLM `--block-size`).
    pub block_size: usize,
    /// Fixed cost of a request's prefill, ms.
    pub prefill_overhead_ms: f64,
    /// Cost of each prompt token not served from the prefix cache, ms.
    pub prefill_ms_per_token: f64,
    /// Cost of one decode step (one output token for every running request), ms.
    pub itl_ms: f64,
    /// Slow-down factor of a step when the batch is full (llm-d `time-factor-under-load`):
    /// a step with `r` running requests costs `1 + (load_factor - 1)·(r-1)/(max_num_seqs-1)` times more.
    pub load_factor: f64,
    /// Multiplies every simulated duration; 0 makes the server instant.
    pub time_scale: f64,
    /// LoRA adapters served next to the base model (`name` or `name=path`).
    pub lora_modules: Vec<String>,
    /// Most distinct LoRA adapters in the running batch.
    pub max_loras: usize,
    /// Expose vLLM V0 metric names (`vllm:gpu_cache_usage_perc`, no `engine` label).
    pub legacy_metrics: bool,
    /// Fraction of completion requests answered with `fail_status` at start-up.
    pub fail_rate: f64,
    /// HTTP status of injected failures.
    pub fail_status: u16,
    /// Seed of generated text, output lengths and injected failures.
    pub seed: u64,
    /// Context window: prompt plus completion tokens (vLLM `--max-model-len`).
    pub max_model_len: usize,
    /// Token budget of one engine step (vLLM `--max-num-batched-tokens`, chunked prefill).
    pub max_num_batched_tokens: usize,
    /// Idle keep-alive timeout of HTTP/1.1 connections, wall-clock ms, **not** scaled by
    /// `time_scale`. A connection that receives no request bytes for this long after a
    /// response is closed (plain TCP close), as uvicorn's `--timeout-keep-alive` (5 s) does
    /// under vLLM. 0 never closes idle connections.
    pub keep_alive_timeout_ms: u64,
    /// vLLM's `--kv-events-config`: publish KV-cache events over ZMQ (see
    /// [`crate::kv_events`]). `None`, vLLM's default, opens no socket and sends nothing.
    pub kv_events_config: Option<KvEventsConfig>,
    /// Which vLLM version's wire layout the events take (not a vLLM setting): vLLM 0.24+ maps
    /// (default) or vLLM 0.23 arrays.
    pub kv_events_wire: KvEventsWire,
    /// How block hashes are sent: vLLM's `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`, integers by
    /// default.
    pub kv_events_block_hashes: BlockHashFormat,
    /// vLLM's `--tokenizer`: a directory with the model's Hugging Face `tokenizer.json` and
    /// `tokenizer_config.json`, whose chat template and tokenizer then make the prompt ids and
    /// whose vocabulary the generated tokens come from (see [`crate::model_tokenizer`]).
    /// `None` uses the deterministic stand-in of [`crate::tokenizer`].
    pub tokenizer: Option<PathBuf>,
    /// Size of the embeddings `/v1/embeddings` returns (a Matryoshka model: requests may ask
    /// for fewer `dimensions`).
    pub embedding_dim: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            model: "sim-model".to_string(),
            max_num_seqs: 16,
            max_waiting: 1000,
            kv_blocks: 8192,
            block_size: 16,
            prefill_overhead_ms: 5.0,
            prefill_ms_per_token: 0.1,
            itl_ms: 10.0,
            load_factor: 1.5,
            time_scale: 1.0,
            lora_modules: Vec::new(),
            max_loras: 1,
            legacy_metrics: false,
            fail_rate: 0.0,
            fail_status: 500,
            seed: 0,
            max_model_len: 32768,
            max_num_batched_tokens: 8192,
            keep_alive_timeout_ms: 5000,
            kv_events_config: None,
            kv_events_wire: KvEventsWire::Map,
            kv_events_block_hashes: BlockHashFormat::Int,
            tokenizer: None,
            embedding_dim: 1024,
        }
    }
}

/// A LoRA adapter served under its own model name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraModule {
    /// The name clients put in `model`.
    pub name: String,
    /// The path shown as `root` in `/v1/models` (the name when none was given).
    pub path: String,
}

impl SimConfig {
    /// Checks the settings, naming the first bad one.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |field: &str, why: &str| Err(SimError::Config(format!("{field}: {why}")));
        if self.model.trim().is_empty() {
            return bad("model", "must not be empty");
        }
        if self.max_num_seqs == 0 {
            return bad("max_num_seqs", "must be at least 1");
        }
        if self.block_size == 0 {
            return bad("block_size", "must be at least 1");
        }
        if self.kv_blocks < 2 {
            return bad(
                "kv_blocks",
                "must be at least 2 (one block is vLLM's null block)",
            );
        }
        if self.max_model_len == 0 {
            return bad("max_model_len", "must be at least 1");
        }
        if self.max_num_batched_tokens == 0 {
            return bad("max_num_batched_tokens", "must be at least 1");
        }
        if self.embedding_dim == 0 {
            return bad("embedding_dim", "must be at least 1");
        }
        for (field, v) in [
            ("prefill_overhead_ms", self.prefill_overhead_ms),
            ("prefill_ms_per_token", self.prefill_ms_per_token),
            ("itl_ms", self.itl_ms),
            ("time_scale", self.time_scale),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(field, "must be a finite number >= 0");
            }
        }
        if !self.load_factor.is_finite() || self.load_factor < 1.0 {
            return bad("load_factor", "must be a finite number >= 1");
        }
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return bad("fail_rate", "must be between 0 and 1");
        }
        if !(400..=599).contains(&self.fail_status) {
            return bad("fail_status", "must be an HTTP error status (400-599)");
        }
        let loras = self.loras();
        for (i, l) in loras.iter().enumerate() {
            if l.name.is_empty() {
                return bad("lora_modules", "adapter names must not be empty");
            }
            if l.name == self.model || loras[..i].iter().any(|o| o.name == l.name) {
                return bad(
                    "lora_modules",
                    &format!("duplicate model name `{}`", l.name),
                );
            }
        }
        if !loras.is_empty() && self.max_loras == 0 {
            return bad(
                "max_loras",
                "must be at least 1 when LoRA adapters are served",
            );
        }
        if let Some(k) = &self.kv_events_config {
            k.validate()?;
        }
        Ok(())
    }

    /// The LoRA adapters parsed from `lora_modules` (`name` or `name=path`).
    pub fn loras(&self) -> Vec<LoraModule> {
        self.lora_modules
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| match s.split_once('=') {
                Some((name, path)) => LoraModule {
                    name: name.trim().to_string(),
                    path: path.trim().to_string(),
                },
                None => LoraModule {
                    name: s.to_string(),
                    path: s.to_string(),
                },
            })
            .collect()
    }

    /// The idle keep-alive timeout as a wall-clock duration; `None` when disabled (0).
    pub fn keep_alive_timeout(&self) -> Option<std::time::Duration> {
        (self.keep_alive_timeout_ms > 0)
            .then(|| std::time::Duration::from_millis(self.keep_alive_timeout_ms))
    }

    /// Usable KV blocks (the null block excluded).
    pub fn usable_blocks(&self) -> usize {
        self.kv_blocks.saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        SimConfig::default().validate().unwrap();
    }

    #[test]
    fn rejects_bad_values_naming_the_field() {
        let cfg = SimConfig {
            kv_blocks: 1,
            ..SimConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("kv_blocks"), "{err}");
        let cfg = SimConfig {
            load_factor: 0.5,
            ..SimConfig::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("load_factor"));
        let cfg = SimConfig {
            lora_modules: vec!["a".into(), "a=/x".into()],
            ..SimConfig::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("duplicate"));
    }

    #[test]
    fn parses_lora_modules() {
        let cfg = SimConfig {
            lora_modules: vec!["sql".into(), " tweet = /loras/tweet ".into(), "".into()],
            ..SimConfig::default()
        };
        let l = cfg.loras();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].name, "sql");
        assert_eq!(l[0].path, "sql");
        assert_eq!(l[1].name, "tweet");
        assert_eq!(l[1].path, "/loras/tweet");
    }
}
