//! vLLM's KV-cache events: what the block pool reports, how it is encoded, and the ZMQ
//! publisher that sends it, faithful to vLLM 0.34.0 (PyPI sdist: `vllm/distributed/kv_events.py`,
//! `vllm/config/kv_events.py`, `vllm/v1/core/block_pool.py`, `vllm/v1/core/kv_cache_manager.py`).
//!
//! * Enabled by vLLM's own flag, `--kv-events-config '{"enable_kv_cache_events": true, …}'`
//!   ([`KvEventsConfig`]); without it nothing is opened or sent.
//! * The KV cache ([`crate::kv_cache::KvCache`]) queues [`KvEvent`]s exactly where vLLM's
//!   block pool does: `BlockStored` when a request's full blocks get their hashes (one event
//!   per request and step, parent = the hash of the block before), `BlockRemoved` when a
//!   cached block is reused and its hash evicted (one event per hash), `AllBlocksCleared`
//!   when the prefix cache is reset (`POST /reset_prefix_cache`).
//! * Once per engine step that has requests, the engine takes the queued events and hands
//!   them as one [`EventBatch`] to the publisher's bounded queue ([`KvEventSender`]); the
//!   publisher task ([`KvEventPublisher`]) numbers batches from 0, encodes them
//!   ([`encode_batch`]), sends them on the PUB socket and keeps them for replay.
//! * Block hashes are vLLM's default integers ([`BlockHashFormat::Int`]); the layout is
//!   vLLM 0.34's tagged maps unless [`KvEventsWire::Array`] asks for vLLM 0.23's arrays.

mod config;
mod publisher;
mod wire;

pub use config::{BlockHashFormat, KvEventsConfig, KvEventsWire, Publisher, DEFAULT_ENDPOINT};
pub use publisher::{KvEventPublisher, KvEventSender, KvEventsEndpoints, END_SEQ};
pub use wire::{
    encode_batch, BlockStored, EncodeError, EventBatch, KvEvent, FULL_ATTENTION, MEDIUM_GPU,
};

/// Why KV events cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum KvEventsError {
    /// The configuration is malformed or has a value vLLM would refuse.
    #[error("invalid KV events configuration: {0}")]
    Config(String),
    /// An endpoint this simulator cannot use.
    #[error("KV events endpoint `{endpoint}`: {reason}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Binding a socket failed.
    #[error("KV events: cannot bind {endpoint}: {source}")]
    Bind {
        /// The endpoint as given.
        endpoint: String,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The ZMQ stack refused a socket.
    #[error("KV events: ZMQ socket on {endpoint}: {source}")]
    Zmq {
        /// The endpoint as given.
        endpoint: String,
        /// The ZMQ stack's reason.
        source: zeromq::ZmqError,
    },
}
