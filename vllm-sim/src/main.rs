//! `vllm-sim` binary: parses flags into a [`SimConfig`], starts the server and runs until
//! SIGINT or SIGTERM.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vllm_sim::kv_events::{BlockHashFormat, KvEventsConfig, KvEventsWire};
use vllm_sim::{KvEventsError, SimConfig};

/// A simulated vLLM server: OpenAI-compatible API (chat and text completions, the Responses
/// API, embeddings) and the Anthropic Messages API, vLLM V1 prefix caching, continuous
/// batching, vLLM metrics and fault injection. Durations are model milliseconds, multiplied
/// by --time-scale (except --keep-alive-timeout-ms, which is wall-clock). Faults can be
/// changed at run time with GET|PUT|DELETE /admin/faults; POST /reset_prefix_cache resets the
/// prefix cache. --kv-events-config publishes vLLM's KV-cache events over ZMQ. --tokenizer
/// tokenizes with the model's own Hugging Face tokenizer and chat template.
#[derive(Debug, Parser)]
#[command(name = "vllm-sim", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Served model name.
    #[arg(long, default_value_t = SimConfig::default().model)]
    model: String,
    /// Most requests in the running batch.
    #[arg(long, default_value_t = SimConfig::default().max_num_seqs)]
    max_num_seqs: usize,
    /// Most requests waiting beyond the free batch seats; more are refused with HTTP 429.
    #[arg(long, default_value_t = SimConfig::default().max_waiting)]
    max_waiting: usize,
    /// KV-cache capacity in blocks (one is vLLM's reserved null block).
    #[arg(long, default_value_t = SimConfig::default().kv_blocks)]
    kv_blocks: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = SimConfig::default().block_size)]
    block_size: usize,
    /// Fixed prefill cost of a request, ms.
    #[arg(long, default_value_t = SimConfig::default().prefill_overhead_ms)]
    prefill_overhead_ms: f64,
    /// Prefill cost per prompt token not served from the prefix cache, ms.
    #[arg(long, default_value_t = SimConfig::default().prefill_ms_per_token)]
    prefill_ms_per_token: f64,
    /// Inter-token latency: cost of one decode step, ms.
    #[arg(long, default_value_t = SimConfig::default().itl_ms)]
    itl_ms: f64,
    /// Slow-down of a step at a full batch (llm-d's time-factor-under-load); grows linearly
    /// from 1 with one running request.
    #[arg(long, default_value_t = SimConfig::default().load_factor)]
    load_factor: f64,
    /// Multiplies every simulated duration; 0 answers instantly.
    #[arg(long, default_value_t = SimConfig::default().time_scale)]
    time_scale: f64,
    /// LoRA adapters served as extra model names: `name` or `name=path`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    lora_modules: Vec<String>,
    /// Most distinct LoRA adapters in the running batch.
    #[arg(long, default_value_t = SimConfig::default().max_loras)]
    max_loras: usize,
    /// Expose vLLM V0 metric names (vllm:gpu_cache_usage_perc, no engine label).
    #[arg(long)]
    legacy_metrics: bool,
    /// Fraction (0-1) of completion requests answered with --fail-status.
    #[arg(long, default_value_t = SimConfig::default().fail_rate)]
    fail_rate: f64,
    /// HTTP status of injected failures.
    #[arg(long, default_value_t = SimConfig::default().fail_status)]
    fail_status: u16,
    /// Seed of the generated text, output lengths and injected failures.
    #[arg(long, default_value_t = SimConfig::default().seed)]
    seed: u64,
    /// Context window in tokens (prompt + completion).
    #[arg(long, default_value_t = SimConfig::default().max_model_len)]
    max_model_len: usize,
    /// Token budget of one engine step (chunked prefill).
    #[arg(long, default_value_t = SimConfig::default().max_num_batched_tokens)]
    max_num_batched_tokens: usize,
    /// Close a keep-alive connection idle this long after its last response, wall-clock ms,
    /// not scaled by --time-scale (uvicorn's --timeout-keep-alive under vLLM is 5 s); 0 never
    /// closes idle connections.
    #[arg(long, default_value_t = SimConfig::default().keep_alive_timeout_ms)]
    keep_alive_timeout_ms: u64,
    /// vLLM's KV-events config, as JSON: publish BlockStored, BlockRemoved and
    /// AllBlocksCleared over ZMQ, e.g. '{"enable_kv_cache_events": true, "publisher": "zmq",
    /// "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558", "topic": "kv-events"}'.
    /// vLLM's keys and defaults (publisher "zmq" once enabled, "null" sends nothing; endpoint
    /// tcp://*:5557; replay_endpoint none; buffer_steps 10000; hwm 100000; max_queue_size
    /// 100000; topic ""); an unknown key is an error. As in vLLM an endpoint with * or :: is
    /// bound and any other is connected to (a subscriber binds it); port 0 binds a free port,
    /// printed on stderr. Block hashes are 64-bit integers, or 8 bytes with
    /// VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0.
    #[arg(long, value_name = "JSON", value_parser = parse_kv_events_config)]
    kv_events_config: Option<KvEventsConfig>,
    /// Wire layout of the KV events: map (vLLM 0.24 and later: each event a map tagged
    /// "type"; replay replies [topic, seq, payload]) or array (vLLM 0.23 and earlier: each
    /// event a tagged array; replay replies [seq, payload]).
    #[arg(long, value_name = "map|array", default_value_t = KvEventsWire::Map, value_parser = parse_kv_events_wire)]
    kv_events_wire: KvEventsWire,
    /// vLLM's --tokenizer: a directory with the model's Hugging Face tokenizer.json and
    /// tokenizer_config.json (chat template in it or in chat_template.jinja). Prompts are then
    /// the engine's own ids (chat requests rendered through the chat template, text prompts
    /// tokenized with the model's special tokens; template errors are HTTP 400), and generated
    /// tokens are real ids of the vocabulary ending with its eos_token. Without it a
    /// deterministic stand-in tokenizer and ChatML template are used.
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// Size of the vectors POST /v1/embeddings returns (requests may ask for fewer with
    /// `dimensions`, as from a Matryoshka model).
    #[arg(long, default_value_t = SimConfig::default().embedding_dim)]
    embedding_dim: usize,
}

fn parse_kv_events_config(json: &str) -> Result<KvEventsConfig, String> {
    KvEventsConfig::from_json(json).map_err(|e| e.to_string())
}

fn parse_kv_events_wire(s: &str) -> Result<KvEventsWire, String> {
    s.parse().map_err(|e: KvEventsError| e.to_string())
}

impl Cli {
    fn config(self) -> Result<(SimConfig, SocketAddr), KvEventsError> {
        let addr = SocketAddr::new(self.host, self.port);
        let hashes = BlockHashFormat::from_env_value(
            std::env::var("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES")
                .ok()
                .as_deref(),
        )?;
        let cfg = SimConfig {
            model: self.model,
            max_num_seqs: self.max_num_seqs,
            max_waiting: self.max_waiting,
            kv_blocks: self.kv_blocks,
            block_size: self.block_size,
            prefill_overhead_ms: self.prefill_overhead_ms,
            prefill_ms_per_token: self.prefill_ms_per_token,
            itl_ms: self.itl_ms,
            load_factor: self.load_factor,
            time_scale: self.time_scale,
            lora_modules: self.lora_modules,
            max_loras: self.max_loras,
            legacy_metrics: self.legacy_metrics,
            fail_rate: self.fail_rate,
            fail_status: self.fail_status,
            seed: self.seed,
            max_model_len: self.max_model_len,
            max_num_batched_tokens: self.max_num_batched_tokens,
            keep_alive_timeout_ms: self.keep_alive_timeout_ms,
            kv_events_config: self.kv_events_config,
            kv_events_wire: self.kv_events_wire,
            kv_events_block_hashes: hashes,
            tokenizer: self.tokenizer,
            embedding_dim: self.embedding_dim,
        };
        Ok((cfg, addr))
    }
}

/// SIGINT and SIGTERM, caught from this call on: made before the server announces its address,
/// so a supervisor that signals as soon as it reads the address never kills it mid-start.
#[cfg(unix)]
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Ctrl-C.
#[cfg(not(unix))]
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let stop = match stop_signal() {
        Ok(stop) => stop,
        Err(e) => {
            eprintln!("vllm-sim: cannot catch signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (cfg, addr) = match Cli::parse().config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vllm-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    let model = cfg.model.clone();
    let sim = match vllm_sim::spawn(cfg, addr).await {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("vllm-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("vllm-sim: serving model {model} on http://{}", sim.addr());
    if let Some(t) = sim.tokenizer() {
        let kind = if t.single_token_words() {
            "one token each"
        } else {
            "several tokens each"
        };
        eprintln!(
            "vllm-sim: tokenizer {}: eos id {}, {} generator words ({kind})",
            t.dir().display(),
            t.eos(),
            t.words().len(),
        );
    }
    if let Some(k) = sim.kv_events() {
        let replay = k
            .replay
            .map(|r| format!(", replay on tcp://{r}"))
            .unwrap_or_default();
        eprintln!(
            "vllm-sim: publishing KV events on {} (topic {:?}){replay}",
            k.endpoint, k.topic
        );
    }
    stop.await;
    sim.shutdown().await;
    ExitCode::SUCCESS
}
