//! Engines' KV-cache events (vLLM's ZMQ/msgpack stream) and the precise index built from them.
//!
//! An engine that publishes KV-cache events (vLLM's `--kv-events-config`, and `vllm-sim`) says
//! which full token blocks enter its cache (`BlockStored`), which leave it (`BlockRemoved`) and
//! when it empties it (`AllBlocksCleared`). [`KvIndex`] turns these into "which endpoint holds
//! which blocks", so a policy can count, for each endpoint, how many leading blocks of a prompt
//! it would find cached: evictions are seen, not guessed.
//!
//! - [`wire`] decodes one message: `[topic, seq, payload]`, the payload a msgpack
//!   `KVEventBatch` in both of vLLM's shapes (positional arrays, and maps since vLLM PR #42892).
//! - [`index`] is the index: bounded, synchronous, one per pool, shared in an `Arc`.
//! - [`subscriber`] is the task that follows one endpoint's stream into the index; [`Feeds`] keeps
//!   one running per endpoint across configuration reloads.
//!
//! # llm-lb's own keys
//!
//! Engines name blocks by hashes of their own (SHA-256 or CBOR-based in recent vLLM, seeded per
//! process, or Python's `hash()` in old versions). llm-lb never uses them to match: it recomputes
//! its own chained key ([`crate::kv_blocks::block_key`]) from the token ids each `BlockStored`
//! carries, cut in blocks of the event's `block_size` and chained from the parent's llm-lb key,
//! exactly as it keys a request's prompt ([`crate::kv_blocks::chain_keys`]). So the engine's
//! hash function, seed and version never matter, and a prompt matches an event when their tokens
//! match (llm-d does the same). The engine's hashes are kept only to follow the engine's
//! references: a `BlockStored`'s parent and a `BlockRemoved`'s blocks. Blocks whose engine hash
//! mixes in more than tokens (LoRA adapters, multi-modal inputs, `cache_salt`) are not indexed,
//! and neither are other media than the GPU or other KV-cache groups than the first.
//!
//! # Predicted entries
//!
//! Between routing a request and its engine's `BlockStored`, the engine is busy prefilling: a
//! second request with the same prefix should still go there. [`KvIndex::predict`] records what
//! llm-lb just routed as short-lived entries; a `BlockStored` of the same block confirms it, and
//! an unconfirmed prediction is ignored after its time to live.
//!
//! # Gaps, restarts and reconnects
//!
//! Each batch carries a sequence number. The index is never left believing what it cannot
//! prove: a subscriber clears its endpoint's entries whenever continuity is lost (see
//! [`subscriber`]): on a gap it first asks the engine's replay socket (vLLM's ROUTER
//! `replay_endpoint`) for the missing batches and clears only when they cannot be had; a
//! sequence number going back means the engine restarted (its cache is empty): clear and start
//! over; a lost connection clears at once and reconnects with a capped back-off. After any
//! clear, the blocks the engine still holds come back as it stores new ones, or at once from
//! its replay buffer. Every resync is counted in `llmlb_kv_events_resyncs_total{reason}`.
//!
//! # Every replica subscribes itself
//!
//! Each llm-lb replica subscribes to every engine of its pools and builds its own index from the
//! same fan-out of events (a ZMQ PUB socket serves many subscribers), as NVIDIA Dynamo's routers
//! do. Replicas therefore agree on what engines hold without sharing anything, and a pick adds
//! no round trip to the state store for it. Only predictions are per replica: a replica does not
//! see what another just routed until the engine confirms it, a fraction of a second later.
//!
//! # Bounded memory
//!
//! The index holds at most its capacity of (block, endpoint) entries
//! ([`index::DEFAULT_CAPACITY`], like the store's prefix index), evicting the least recently
//! stored or matched blocks, and everything else it keeps is bounded by those entries, so a
//! long run or a hostile event stream cannot grow it. A payload over
//! [`wire::MAX_PAYLOAD_BYTES`] is refused before it is decoded.

mod feeds;
pub mod index;
pub mod subscriber;
pub mod wire;

#[cfg(test)]
mod tests;

pub use feeds::{Feed, Feeds};
pub use index::{Applied, IndexStats, KvIndex, Slot, DEFAULT_CAPACITY};
pub use subscriber::{KvEventsSubscriber, SubscriberOptions};
pub use wire::{
    decode_message, decode_payload, BlockRemoved, BlockStored, EngineHash, KvEvent, KvEventBatch,
    Message, WireError,
};
