//! `vllm-sim`: a simulated vLLM server for tests, demos and benchmarks.
//!
//! It speaks vLLM's OpenAI-compatible API (chat and text completions, JSON and SSE), and the
//! other APIs vLLM serves through the same engine (see [`api`]: the OpenAI Responses API, the
//! Anthropic Messages API, embeddings); it keeps a
//! vLLM V1-style prefix cache (16-token blocks, chained hashes, LRU of freed blocks), runs a
//! continuous-batching scheduler with a FIFO waiting queue, takes modelled time for prefill
//! and decode, and exposes vLLM's Prometheus metrics. Faults can be injected at run time.
//! Like uvicorn under vLLM, it closes a keep-alive connection left idle for
//! [`SimConfig::keep_alive_timeout_ms`] (5 s by default; see [`keep_alive`]). With vLLM's
//! `--kv-events-config` ([`SimConfig::kv_events_config`]) it publishes vLLM's KV-cache events
//! over ZMQ, on vLLM's wire format (see [`kv_events`]). With vLLM's `--tokenizer`
//! ([`SimConfig::tokenizer`]) it tokenizes with the model's own chat template and tokenizer and
//! generates real token ids of its vocabulary (see [`model_tokenizer`]); without, with a
//! deterministic stand-in ([`tokenizer`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), vllm_sim::SimError> {
//! let sim = vllm_sim::spawn(
//!     vllm_sim::SimConfig { model: "m".into(), time_scale: 0.0, ..Default::default() },
//!     "127.0.0.1:0".parse().unwrap(),
//! )
//! .await?;
//! let url = format!("http://{}/v1/chat/completions", sim.addr());
//! sim.faults().set_fail(0.5, 503).unwrap();
//! println!("{url} served {} requests", sim.stats().requests_served);
//! sim.shutdown().await;
//! # Ok(()) }
//! ```

pub mod api;
pub mod config;
pub mod error;
pub mod faults;
pub mod keep_alive;
pub mod kv_cache;
pub mod kv_events;
pub mod metrics;
pub mod model_tokenizer;
pub mod openai;
pub mod protocol;
pub mod scheduler;
pub mod server;
pub mod stats;
pub mod timing;
pub mod tokenizer;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use config::SimConfig;
pub use error::{ApiError, SimError};
pub use faults::{FaultControl, Faults, FaultsPatch, InvalidFaults};
pub use kv_events::{KvEventsConfig, KvEventsEndpoints, KvEventsError};
pub use stats::{Api, ApiStats, ByApi, Stats};

use api::store::ResponseStore;
use kv_events::KvEventPublisher;
use metrics::ExpositionInfo;
use model_tokenizer::ModelTokenizer;
use scheduler::{EngineClient, Shared};
use server::AppState;

/// A running simulator. Dropping it stops the server and closes every connection.
#[derive(Debug)]
pub struct SimHandle {
    addr: SocketAddr,
    faults: FaultControl,
    shared: Arc<Shared>,
    client: EngineClient,
    kv_events: Option<KvEventPublisher>,
    tokenizer: Option<Arc<ModelTokenizer>>,
    server: Option<JoinHandle<()>>,
    engine: Option<JoinHandle<()>>,
}

/// Starts a simulator listening on `addr` (port 0 picks a free port); returns once it accepts
/// connections and, with KV events, once their sockets are open. Must be called inside a
/// Tokio runtime.
pub async fn spawn(cfg: SimConfig, addr: SocketAddr) -> Result<SimHandle, SimError> {
    cfg.validate()?;
    let tokenizer = match cfg.tokenizer.clone() {
        Some(dir) => {
            let loaded = tokio::task::spawn_blocking(move || ModelTokenizer::load(&dir))
                .await
                .map_err(|e| SimError::Io(std::io::Error::other(e)))??;
            Some(Arc::new(loaded))
        }
        None => None,
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| SimError::Bind { addr, source })?;
    let local = listener.local_addr()?;
    let kv_events = match &cfg.kv_events_config {
        Some(k) if k.publishes() => {
            Some(KvEventPublisher::start(k, cfg.kv_events_wire, cfg.kv_events_block_hashes).await?)
        }
        _ => None,
    };
    let cfg = Arc::new(cfg);
    let faults = FaultControl::new(
        Faults {
            fail_rate: cfg.fail_rate,
            fail_status: cfg.fail_status,
            ..Faults::default()
        },
        cfg.seed,
    );
    let (engine, client) = scheduler::engine(
        cfg.clone(),
        faults.clone(),
        kv_events.as_ref().and_then(KvEventPublisher::sender),
    );
    let shared = client.shared().clone();
    let keep_alive = cfg.keep_alive_timeout();
    let state = AppState {
        loras: Arc::new(cfg.loras()),
        exposition: Arc::new(ExpositionInfo {
            model: cfg.model.clone(),
            legacy: cfg.legacy_metrics,
            block_size: cfg.block_size,
            num_gpu_blocks: cfg.kv_blocks,
            max_loras: cfg.max_loras,
        }),
        cfg,
        tokenizer: tokenizer.clone(),
        engine: client.clone(),
        faults: faults.clone(),
        responses: Arc::new(ResponseStore::default()),
    };
    let engine = tokio::spawn(engine.run());
    let server = tokio::spawn(server::serve(listener, server::router(state), keep_alive));
    Ok(SimHandle {
        addr: local,
        faults,
        shared,
        client,
        kv_events,
        tokenizer,
        server: Some(server),
        engine: Some(engine),
    })
}

impl SimHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where the KV events are published; `None` without `--kv-events-config` (or with events
    /// disabled).
    pub fn kv_events(&self) -> Option<&KvEventsEndpoints> {
        self.kv_events.as_ref().map(KvEventPublisher::endpoints)
    }

    /// vLLM's `POST /reset_prefix_cache`: forgets every cached block hash (publishing
    /// `AllBlocksCleared` with the next step's events). Only succeeds while no request holds
    /// KV blocks, unless `reset_running_requests` preempts them first. Whether it was reset.
    pub async fn reset_prefix_cache(&self, reset_running_requests: bool) -> bool {
        self.client
            .reset_prefix_cache(reset_running_requests)
            .await
            .unwrap_or(false)
    }

    /// The model's tokenizer, with `--tokenizer` ([`SimConfig::tokenizer`]).
    pub fn tokenizer(&self) -> Option<&Arc<ModelTokenizer>> {
        self.tokenizer.as_ref()
    }

    /// Run-time fault control (the same state as `/admin/faults`).
    pub fn faults(&self) -> &FaultControl {
        &self.faults
    }

    /// A snapshot of counters and gauges.
    pub fn stats(&self) -> Stats {
        let st = self.shared.state.lock();
        let m = &st.metrics;
        let c = &st.counters;
        Stats {
            requests_received: c.received,
            requests_served: m.finished[0] + m.finished[1],
            requests_aborted: m.finished[2],
            requests_rejected: c.rejected,
            requests_failed: c.failed,
            prompt_tokens: c.prompt_tokens,
            cached_tokens: c.cached_tokens,
            generation_tokens: m.generation_tokens,
            prefix_cache_queries: m.prefix_queries,
            prefix_cache_hits: m.prefix_hits,
            running: m.running,
            waiting: m.waiting,
            kv_cache_usage: m.kv_usage,
            preemptions: m.preemptions,
            prefill_model_ms: c.prefill_ms,
            ttft_seconds_sum: m.ttft.sum(),
            ttft_count: m.ttft.count(),
            by_api: c.by_api,
        }
    }

    /// Stops the server and the engine and waits until they are gone; then the KV events
    /// publisher sends what is queued and closes its sockets.
    pub async fn shutdown(mut self) {
        for task in [self.server.take(), self.engine.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
            // A cancelled task's JoinError is the expected outcome.
            let _ = task.await;
        }
        if let Some(publisher) = self.kv_events.take() {
            publisher.shutdown().await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        for task in [self.server.take(), self.engine.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}
