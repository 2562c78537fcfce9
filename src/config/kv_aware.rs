//! `kv_aware`'s settings from `lb_config`: the tokenizer, the block size, the weights of its one
//! cost, near-ties, predicted entries and the index bound. Every key is optional.

use std::path::PathBuf;
use std::time::Duration;

use super::error::InvalidKey;
use super::file::LbConfigFile;
use super::prefix::{LoadGuard, PrefixSettings};

/// How `kv_aware` tokenizes, indexes and weighs.
#[derive(Debug, Clone, PartialEq)]
pub struct KvAwareSettings {
    /// A Hugging Face tokenizer directory (`tokenizer.json`, `tokenizer_config.json` with the chat
    /// template); `None`: approximate tokens (about 4 bytes each).
    pub tokenizer: Option<PathBuf>,
    /// Tokens per KV block, as the engine's `--block-size` (`blockSize`, default 16, vLLM's).
    pub block_size: usize,
    /// Cost of one uncached prompt token, per mille (`prefillWeight`, default 1.0).
    pub prefill_per_mille: u64,
    /// Cost of one token of load in flight, per mille (`loadWeight`, default 1.0).
    pub load_per_mille: u64,
    /// Load a request adds besides its uncached prompt tokens: its decoding, in prompt-token
    /// equivalents (`decodeTokens`, default 128). With continuous batching a decoding request
    /// delays a new prompt's prefill little, but it holds its context in the engine's KV cache:
    /// weighed too lightly, the requests (and so the conversations) an engine serves drift
    /// apart from the others', and the busiest engine evicts more (see docs/benchmarks.md).
    pub decode_tokens: u64,
    /// What llm-lb routed to an endpoint whose KV events it follows counts as cached there, per
    /// mille of a block, once the engine evicted it (`routedWeight`, default 0.5): content stays
    /// where it was placed when no engine holds it any more, instead of going wherever load
    /// says and being cached everywhere in turn.
    pub routed_per_mille: u64,
    /// On an endpoint whose KV events say its cache is full (or that has not evicted yet, its
    /// size unknown), each uncached prompt token also evicts a cached one, which may be needed
    /// again: it costs this much more, per mille, in proportion to how full the cache is
    /// (`evictionWeight`, default 1.0). Moving content off its holder onto a full engine then
    /// needs a bigger difference in load, and new content goes preferably to an engine with
    /// room (one that just emptied its cache).
    pub eviction_per_mille: u64,
    /// The engine's own queue, scraped from its metrics (the pool's `metrics`): each request it
    /// reports waiting adds this much, per mille, of the placed request's least load to the
    /// endpoint's cost (`queueWeight`, default 0: not scraped). It sees what llm-lb's own count
    /// does not, such as traffic that bypasses llm-lb; where llm-lb routes everything, it
    /// moves content off engines that queue for KV-cache room, which costs hit rate on shared
    /// content (docs/benchmarks.md).
    pub queue_per_mille: u64,
    /// Costs within this per mille of the least are near-ties, chosen among at random
    /// (`tieTolerance`, default 0.05).
    pub tie_per_mille: u64,
    /// How long what llm-lb just routed counts as cached on an endpoint whose KV events llm-lb
    /// follows, until the engine confirms it (`predictedTtlMs`, default 2000).
    pub predicted_ttl: Duration,
    /// How long llm-lb's own record of what it routed counts as cached on an endpoint without
    /// KV events, and session and response keys last, refreshed whenever used (`redisKeyTTL`,
    /// s, default 1800, as `prefix_cache`).
    pub guess_ttl: Duration,
    /// When a session's endpoint is too busy to keep it (`loadGuardAbsolute`, in requests like
    /// the one placed, and `loadGuardRelative`), as in `prefix_cache`.
    pub session_guard: LoadGuard,
    /// The most block entries the pool's index keeps, and its routed history as many
    /// (`kvIndexBlocks`, default 262144).
    pub index_blocks: usize,
    /// The event topic subscribed to (`kvEventsTopic`, default all).
    pub events_topic: String,
}

impl Default for KvAwareSettings {
    fn default() -> Self {
        KvAwareSettings {
            tokenizer: None,
            block_size: 16,
            prefill_per_mille: 1000,
            load_per_mille: 1000,
            decode_tokens: 128,
            routed_per_mille: 500,
            eviction_per_mille: 1000,
            queue_per_mille: 0,
            tie_per_mille: 50,
            predicted_ttl: Duration::from_millis(2000),
            guess_ttl: PrefixSettings::default().ttl,
            session_guard: PrefixSettings::default().guard,
            index_blocks: 262_144,
            events_topic: String::new(),
        }
    }
}

/// A number in `0..=max` as per mille (`max` 1: a fraction, 1000: a weight).
fn per_mille(
    key: &'static str,
    value: Option<f64>,
    default: u64,
    max: f64,
    bad: &mut Vec<InvalidKey>,
) -> u64 {
    match value {
        None => default,
        Some(v) if v.is_finite() && (0.0..=max).contains(&v) => (v * 1000.0).round() as u64,
        Some(_) => {
            bad.push(InvalidKey::new(
                key,
                format!("must be a number from 0 to {max}"),
            ));
            default
        }
    }
}

impl KvAwareSettings {
    /// Read and check the keys; every problem is reported.
    pub fn from_lb_config(c: &LbConfigFile) -> Result<Self, Vec<InvalidKey>> {
        let d = KvAwareSettings::default();
        let mut bad = Vec::new();
        let block_size = match c.blockSize {
            None => d.block_size,
            Some(n) if (1..=4096).contains(&n) => n,
            Some(_) => {
                bad.push(InvalidKey::new(
                    "blockSize",
                    "must be from 1 to 4096 tokens",
                ));
                d.block_size
            }
        };
        let tokenizer = c.tokenizer.as_ref().map(PathBuf::from);
        if let Some(dir) = &tokenizer {
            if !dir.join("tokenizer.json").is_file() {
                bad.push(InvalidKey::new(
                    "tokenizer",
                    format!("{} has no tokenizer.json", dir.display()),
                ));
            }
        }
        let prefix = PrefixSettings::from_lb_config(c).unwrap_or_else(|mut e| {
            bad.append(&mut e);
            PrefixSettings::default()
        });
        let settings = KvAwareSettings {
            tokenizer,
            block_size,
            prefill_per_mille: per_mille(
                "prefillWeight",
                c.prefillWeight,
                d.prefill_per_mille,
                1000.0,
                &mut bad,
            ),
            load_per_mille: per_mille(
                "loadWeight",
                c.loadWeight,
                d.load_per_mille,
                1000.0,
                &mut bad,
            ),
            decode_tokens: c.decodeTokens.unwrap_or(d.decode_tokens),
            routed_per_mille: per_mille(
                "routedWeight",
                c.routedWeight,
                d.routed_per_mille,
                1.0,
                &mut bad,
            ),
            eviction_per_mille: per_mille(
                "evictionWeight",
                c.evictionWeight,
                d.eviction_per_mille,
                1000.0,
                &mut bad,
            ),
            queue_per_mille: per_mille(
                "queueWeight",
                c.queueWeight,
                d.queue_per_mille,
                1000.0,
                &mut bad,
            ),
            tie_per_mille: per_mille(
                "tieTolerance",
                c.tieTolerance,
                d.tie_per_mille,
                1.0,
                &mut bad,
            ),
            predicted_ttl: match c.predictedTtlMs {
                None => d.predicted_ttl,
                Some(ms) if ms <= 600_000 => Duration::from_millis(ms),
                Some(_) => {
                    bad.push(InvalidKey::new(
                        "predictedTtlMs",
                        "must be at most 600000 (10 min)",
                    ));
                    d.predicted_ttl
                }
            },
            guess_ttl: prefix.ttl,
            session_guard: prefix.guard,
            index_blocks: match c.kvIndexBlocks {
                None => d.index_blocks,
                Some(n) if n >= 1 => n,
                Some(_) => {
                    bad.push(InvalidKey::new("kvIndexBlocks", "must be at least 1"));
                    d.index_blocks
                }
            },
            events_topic: c.kvEventsTopic.clone().unwrap_or_default(),
        };
        if bad.is_empty() {
            Ok(settings)
        } else {
            Err(bad)
        }
    }
}
