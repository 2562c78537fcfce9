//! `vllm-sim`: a simulated vLLM server for tests, demos and benchmarks.
//!
//! It speaks vLLM's OpenAI-compatible API (chat and text completions, JSON and SSE), keeps a
//! vLLM V1-style prefix cache (16-token blocks, chained hashes, LRU of freed blocks), runs a
//! continuous-batching scheduler with a FIFO waiting queue, takes modelled time for prefill
//! and decode, and exposes vLLM's Prometheus metrics. Faults can be injected at run time.
//! Like uvicorn under vLLM, it closes a keep-alive connection left idle for
//! [`SimConfig::keep_alive_timeout_ms`] (5 s by default; see [`keep_alive`]).
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

pub mod config;
pub mod error;
pub mod faults;
pub mod keep_alive;
pub mod kv_cache;
pub mod metrics;
pub mod openai;
pub mod protocol;
pub mod scheduler;
pub mod server;
pub mod timing;
pub mod tokenizer;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use config::SimConfig;
pub use error::{ApiError, SimError};
pub use faults::{FaultControl, Faults, FaultsPatch, InvalidFaults};

use metrics::ExpositionInfo;
use scheduler::Shared;
use server::AppState;

/// A snapshot of the simulator's counters and gauges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Requests accepted into the queue.
    pub requests_received: u64,
    /// Requests finished normally (`stop` or `length`).
    pub requests_served: u64,
    /// Requests aborted because the client went away.
    pub requests_aborted: u64,
    /// Requests refused with 429 (waiting queue full).
    pub requests_rejected: u64,
    /// Requests answered with an injected failure.
    pub requests_failed: u64,
    /// Prompt tokens of requests that produced a first token.
    pub prompt_tokens: u64,
    /// Cached prompt tokens reported in `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: u64,
    /// Output tokens produced.
    pub generation_tokens: u64,
    /// `vllm:prefix_cache_queries_total`.
    pub prefix_cache_queries: u64,
    /// `vllm:prefix_cache_hits_total`.
    pub prefix_cache_hits: u64,
    /// Requests in the running batch now.
    pub running: usize,
    /// Requests waiting now.
    pub waiting: usize,
    /// KV-cache usage now, 0–1.
    pub kv_cache_usage: f64,
    /// Preemptions so far.
    pub preemptions: u64,
    /// Model milliseconds (before `time_scale`) spent on prefill, load multiplier included:
    /// a deterministic measure of how much prompt work the cache saved.
    pub prefill_model_ms: f64,
    /// Sum of measured times to first token, seconds.
    pub ttft_seconds_sum: f64,
    /// Number of first tokens measured.
    pub ttft_count: u64,
}

/// A running simulator. Dropping it stops the server and closes every connection.
#[derive(Debug)]
pub struct SimHandle {
    addr: SocketAddr,
    faults: FaultControl,
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
    engine: Option<JoinHandle<()>>,
}

/// Starts a simulator listening on `addr` (port 0 picks a free port); returns once it accepts
/// connections. Must be called inside a Tokio runtime.
pub async fn spawn(cfg: SimConfig, addr: SocketAddr) -> Result<SimHandle, SimError> {
    cfg.validate()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| SimError::Bind { addr, source })?;
    let local = listener.local_addr()?;
    let cfg = Arc::new(cfg);
    let faults = FaultControl::new(
        Faults {
            fail_rate: cfg.fail_rate,
            fail_status: cfg.fail_status,
            ..Faults::default()
        },
        cfg.seed,
    );
    let (engine, client) = scheduler::engine(cfg.clone(), faults.clone());
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
        engine: client,
        faults: faults.clone(),
    };
    let engine = tokio::spawn(engine.run());
    let server = tokio::spawn(server::serve(listener, server::router(state), keep_alive));
    Ok(SimHandle {
        addr: local,
        faults,
        shared,
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
        }
    }

    /// Stops the server and the engine and waits until they are gone.
    pub async fn shutdown(mut self) {
        for task in [self.server.take(), self.engine.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
            // A cancelled task's JoinError is the expected outcome.
            let _ = task.await;
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
