//! The engine: one task stepping a continuous batch the way vLLM V1's scheduler does.
//!
//! Each step:
//! 1. requests whose client went away are aborted and their blocks freed;
//! 2. running requests get their next prefill chunk or one decode token, each allocating the
//!    KV blocks it needs; when the pool is exhausted the most recently admitted request is
//!    preempted (blocks freed, back to the head of the queue, recomputed later);
//! 3. if nothing was preempted, waiting requests are admitted in FIFO order while a batch
//!    seat, step token budget and KV blocks (free + evictable, after prefix-cache hits) allow;
//!    a request whose LoRA adapter cannot join the batch (`max_loras`) is skipped, one that
//!    does not fit in the cache stops admission;
//! 4. the step takes its modelled time ([`crate::timing`]), then every request that
//!    finished its prompt emits one token; requests reaching their length finish. A request
//!    of no output tokens (an embeddings request: vLLM's pooling) finishes with its prefill,
//!    sampling nothing.
//!
//! Full blocks are hashed and cached as soon as they are scheduled, generated tokens too.
//! While the `hang` fault is set the engine takes no steps.
//!
//! With KV events enabled, the blocks a request newly caches in a step make one
//! `BlockStored` event, and every step taken while requests are present hands the events the
//! KV cache queued to the publisher as one batch, as vLLM's `update_from_output` does. Between
//! steps the engine also serves control requests: `reset_prefix_cache`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::config::SimConfig;
use crate::error::ApiError;
use crate::faults::FaultControl;
use crate::kv_cache::{capped_hit_blocks, extend_block_hashes, BlockId, KvCache};
use crate::kv_events::{BlockStored, EventBatch, KvEvent, KvEventSender};
use crate::metrics::{EngineMetrics, FinishReason};
use crate::stats::{Api, ByApi};
use crate::timing::{self, StepWork};
use crate::tokenizer::{empty_text, TextGen, TokenId, TokenText};

/// What the engine tells a request's handler.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One output token (text empty for EOS) and the prompt tokens served from the cache.
    Token(TokenText, usize),
    /// The last output token, and the request's token counts.
    Last(TokenText, Usage),
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Why it ended.
    pub reason: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Output tokens (EOS included).
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache at first scheduling.
    pub cached_tokens: usize,
}

/// A request handed to the engine.
#[derive(Debug)]
pub struct Submission {
    /// Prompt token ids.
    pub prompt: Vec<TokenId>,
    /// LoRA adapter, if the request names one.
    pub lora: Option<Arc<str>>,
    /// Output tokens to produce; 0 for a pooling (embeddings) request, which ends with its
    /// prefill.
    pub output_len: usize,
    /// Finish reason once `output_len` tokens are out (`Stop`: the last one is `eos`).
    pub finish: FinishReason,
    /// The EOS token id.
    pub eos: TokenId,
    /// Output token generator.
    pub gen: TextGen,
    /// Where events go; dropping the receiver aborts the request.
    pub tx: mpsc::UnboundedSender<Event>,
    /// When the request arrived.
    pub arrival: Instant,
    /// The endpoint it came through (for [`crate::Stats::by_api`]).
    pub api: Api,
}

/// Counters of the simulator (see [`crate::Stats`]).
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Requests accepted into the queue.
    pub received: u64,
    /// Requests rejected with 429.
    pub rejected: u64,
    /// Requests answered with an injected failure.
    pub failed: u64,
    /// Prompt tokens of requests that produced a first token.
    pub prompt_tokens: u64,
    /// Cached prompt tokens reported in `usage` (first scheduling of each request).
    pub cached_tokens: u64,
    /// Model milliseconds (unscaled) spent on prefill, load multiplier included.
    pub prefill_ms: f64,
    /// Request and token counters per endpoint.
    pub by_api: ByApi,
}

/// State shared by the engine and the HTTP handlers.
#[derive(Debug)]
pub struct SharedState {
    /// Engine metrics (gauges published every step).
    pub metrics: EngineMetrics,
    /// Simulator counters.
    pub counters: Counters,
}

/// The engine's shared state behind one short-held lock.
#[derive(Debug)]
pub struct Shared {
    /// The state.
    pub state: Mutex<SharedState>,
}

/// Requests to the engine besides completions, served between steps.
#[derive(Debug)]
enum Control {
    /// vLLM's `reset_prefix_cache`: preempt the running requests first if asked; the answer
    /// is whether the cache was reset.
    ResetPrefixCache {
        reset_running_requests: bool,
        reply: oneshot::Sender<bool>,
    },
}

/// The handlers' side of the engine.
#[derive(Debug, Clone)]
pub struct EngineClient {
    tx: mpsc::UnboundedSender<Submission>,
    ctl: mpsc::UnboundedSender<Control>,
    shared: Arc<Shared>,
    max_waiting: usize,
    max_num_seqs: usize,
    block_size: usize,
    usable_blocks: usize,
}

impl EngineClient {
    /// Queues a request, or refuses it: 429 when the waiting queue is full, 400 when it
    /// could never fit in the KV cache, 503 when the engine is gone.
    pub fn submit(&self, sub: Submission) -> Result<(), ApiError> {
        let computed = sub.prompt.len() + sub.output_len.saturating_sub(1);
        let blocks = computed.div_ceil(self.block_size);
        if blocks > self.usable_blocks {
            return Err(ApiError::bad_request(format!(
                "The request needs {blocks} KV-cache blocks ({} prompt and {} output tokens) \
                 but the cache holds only {} (--kv-blocks).",
                sub.prompt.len(),
                sub.output_len,
                self.usable_blocks
            )));
        }
        {
            let mut st = self.shared.state.lock();
            let (waiting, running) = (st.metrics.waiting, st.metrics.running);
            if waiting + 1 > self.max_waiting + self.max_num_seqs.saturating_sub(running) {
                st.counters.rejected += 1;
                return Err(ApiError::new(
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "The server is overloaded: {waiting} requests are waiting (--max-waiting {}).",
                        self.max_waiting
                    ),
                ));
            }
            st.metrics.waiting += 1;
            st.counters.received += 1;
            st.counters.by_api.get_mut(sub.api).requests_received += 1;
        }
        if self.tx.send(sub).is_err() {
            let mut st = self.shared.state.lock();
            st.metrics.waiting = st.metrics.waiting.saturating_sub(1);
            return Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "The engine is not running.",
            ));
        }
        Ok(())
    }

    /// vLLM's `reset_prefix_cache`: forgets every cached block hash, which succeeds only when
    /// no request holds KV blocks; with `reset_running_requests` the running requests are
    /// preempted first (back to the waiting queue). Answers whether the cache was reset; 503
    /// when the engine is gone.
    pub async fn reset_prefix_cache(&self, reset_running_requests: bool) -> Result<bool, ApiError> {
        let gone = || {
            ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "The engine is not running.",
            )
        };
        let (reply, answer) = oneshot::channel();
        self.ctl
            .send(Control::ResetPrefixCache {
                reset_running_requests,
                reply,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())
    }

    /// Counts a request answered with an injected failure.
    pub fn count_failure(&self) {
        self.shared.state.lock().counters.failed += 1;
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

struct Seq {
    sub: Submission,
    /// Prompt and output token ids.
    tokens: Vec<TokenId>,
    num_prompt: usize,
    block_hashes: Vec<u64>,
    blocks: Vec<BlockId>,
    num_computed: usize,
    cached_tokens: Option<usize>,
    lora_key: Vec<u8>,
    arrival: Instant,
    first_scheduled: Option<Instant>,
    last_token_at: Option<Instant>,
}

impl Seq {
    fn new(sub: Submission) -> Self {
        let lora_key = sub
            .lora
            .as_deref()
            .map(|l| l.as_bytes().to_vec())
            .unwrap_or_default();
        let tokens = sub.prompt.clone();
        let arrival = sub.arrival;
        Seq {
            num_prompt: tokens.len(),
            tokens,
            sub,
            block_hashes: Vec::new(),
            blocks: Vec::new(),
            num_computed: 0,
            cached_tokens: None,
            lora_key,
            arrival,
            first_scheduled: None,
            last_token_at: None,
        }
    }

    fn num_output(&self) -> usize {
        self.tokens.len() - self.num_prompt
    }
}

/// One request's share of a step.
struct Planned {
    /// Index in `running` after scheduling.
    idx: usize,
    /// Tokens computed.
    tokens: usize,
    /// Whether this is the first chunk of a prefill (pays the overhead).
    new_prefill: bool,
    /// Whether this is one decode token (otherwise a prefill chunk).
    decode: bool,
}

/// The engine task's state.
pub struct Engine {
    cfg: Arc<SimConfig>,
    rx: mpsc::UnboundedReceiver<Submission>,
    ctl_rx: mpsc::UnboundedReceiver<Control>,
    /// Where each step's KV events go, when they are published.
    kv_events: Option<KvEventSender>,
    /// vLLM's `lora_int_id` of each adapter: 1, 2, … in `--lora-modules` order.
    lora_ids: HashMap<String, u32>,
    shared: Arc<Shared>,
    kv: KvCache,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    clock: Instant,
    faults: FaultControl,
}

/// Creates the engine and its client; the engine pauses while `faults` say `hang`. With
/// `kv_events`, the KV cache queues events and each step's batch is sent there.
pub fn engine(
    cfg: Arc<SimConfig>,
    faults: FaultControl,
    kv_events: Option<KvEventSender>,
) -> (Engine, EngineClient) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (ctl, ctl_rx) = mpsc::unbounded_channel();
    let mut metrics = EngineMetrics::new(cfg.legacy_metrics);
    metrics.set_lora_info(String::new(), String::new(), unix_now());
    let shared = Arc::new(Shared {
        state: Mutex::new(SharedState {
            metrics,
            counters: Counters::default(),
        }),
    });
    let client = EngineClient {
        tx,
        ctl,
        shared: shared.clone(),
        max_waiting: cfg.max_waiting,
        max_num_seqs: cfg.max_num_seqs,
        block_size: cfg.block_size,
        usable_blocks: cfg.usable_blocks(),
    };
    let mut kv = KvCache::new(cfg.kv_blocks, cfg.block_size);
    if kv_events.is_some() {
        kv.enable_events();
    }
    let lora_ids = cfg
        .loras()
        .into_iter()
        .zip(1u32..)
        .map(|(l, id)| (l.name, id))
        .collect();
    let engine = Engine {
        kv,
        cfg,
        rx,
        ctl_rx,
        kv_events,
        lora_ids,
        shared,
        waiting: VecDeque::new(),
        running: Vec::new(),
        clock: Instant::now(),
        faults,
    };
    (engine, client)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// How long an engine with queued but unschedulable work waits before looking again.
const STALL_POLL: Duration = Duration::from_millis(20);

impl Engine {
    /// Runs until every client is dropped.
    pub async fn run(mut self) {
        loop {
            if self.waiting.is_empty() && self.running.is_empty() {
                tokio::select! {
                    sub = self.rx.recv() => match sub {
                        Some(sub) => self.waiting.push_back(Seq::new(sub)),
                        None => return,
                    },
                    Some(ctl) = self.ctl_rx.recv() => {
                        self.control(ctl);
                        continue;
                    }
                }
            }
            // A hung engine takes no steps: queued and running requests all stall.
            self.faults.wait_while_hung().await;
            while let Ok(sub) = self.rx.try_recv() {
                self.waiting.push_back(Seq::new(sub));
            }
            while let Ok(ctl) = self.ctl_rx.try_recv() {
                self.control(ctl);
            }
            self.drop_aborted();
            let plan = self.schedule();
            self.publish();
            if plan.is_empty() {
                // Nothing could be scheduled: either every request was aborted (the loop then
                // waits for the next one) or the queue head cannot start yet; look again on
                // the next arrival or shortly. vLLM still ends such a step by publishing the
                // KV events queued so far.
                self.flush_kv_events().await;
                if !self.waiting.is_empty() || !self.running.is_empty() {
                    tokio::select! {
                        sub = self.rx.recv() => match sub {
                            Some(sub) => self.waiting.push_back(Seq::new(sub)),
                            None => return,
                        },
                        Some(ctl) = self.ctl_rx.recv() => self.control(ctl),
                        _ = tokio::time::sleep(STALL_POLL) => {}
                    }
                }
                continue;
            }
            let work = StepWork {
                batch: self.running.len(),
                new_prefills: plan.iter().filter(|p| p.new_prefill).count(),
                prefill_tokens: plan.iter().filter(|p| !p.decode).map(|p| p.tokens).sum(),
                decoding: plan.iter().any(|p| p.decode),
            };
            let cost = timing::step_cost(&self.cfg, &work);
            self.account_prefill(&plan, cost.factor);
            self.wait(timing::wall(self.cfg.time_scale, cost.total_ms))
                .await;
            self.apply(plan);
            self.publish();
            self.flush_kv_events().await;
        }
    }

    /// Hands the KV events of the step to the publisher as one batch (vLLM's
    /// `update_from_output`: `take_events`, then `publish` when there are any).
    async fn flush_kv_events(&mut self) {
        let Some(sink) = &self.kv_events else {
            return;
        };
        let events = self.kv.take_events();
        if events.is_empty() {
            return;
        }
        let batch = EventBatch {
            ts: unix_now(),
            events,
            data_parallel_rank: 0,
        };
        // A publisher that is gone (shut down) loses the batch, as vLLM's would.
        let _ = sink.publish(batch).await;
    }

    /// Serves a control request between steps.
    fn control(&mut self, ctl: Control) {
        match ctl {
            Control::ResetPrefixCache {
                reset_running_requests,
                reply,
            } => {
                if reset_running_requests && !self.running.is_empty() {
                    // vLLM preempts from the back so the requests return in FIFO order.
                    let mut preempted = 0;
                    while let Some(s) = self.preempt_last() {
                        self.waiting.push_front(s);
                        preempted += 1;
                    }
                    let mut st = self.shared.state.lock();
                    st.metrics.running = st.metrics.running.saturating_sub(preempted);
                    st.metrics.waiting += preempted;
                }
                let ok = self.kv.reset_prefix_cache();
                // The caller may have gone away; the reset stands.
                let _ = reply.send(ok);
            }
        }
    }

    /// Sleeps until the end of a step of length `d`, keeping a steady cadence.
    async fn wait(&mut self, d: Duration) {
        if d.is_zero() {
            tokio::task::yield_now().await;
            return;
        }
        let now = Instant::now();
        if self.clock + Duration::from_millis(20) < now {
            self.clock = now; // idle or badly behind: do not try to catch up
        }
        self.clock += d;
        tokio::time::sleep_until(self.clock.into()).await;
    }

    fn drop_aborted(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.sub.tx.is_closed());
        let from_waiting = before - self.waiting.len();
        let mut from_running = 0;
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].sub.tx.is_closed() {
                let s = self.running.remove(i);
                self.kv.free(&s.blocks);
                from_running += 1;
            } else {
                i += 1;
            }
        }
        if from_waiting + from_running > 0 {
            let mut st = self.shared.state.lock();
            st.metrics.waiting = st.metrics.waiting.saturating_sub(from_waiting);
            st.metrics.running = st.metrics.running.saturating_sub(from_running);
            for _ in 0..from_waiting + from_running {
                st.metrics.finish(FinishReason::Abort);
            }
        }
    }

    fn running_loras(&self) -> Vec<&str> {
        let mut l: Vec<&str> = self
            .running
            .iter()
            .filter_map(|s| s.sub.lora.as_deref())
            .collect();
        l.sort_unstable();
        l.dedup();
        l
    }

    /// Extends a sequence's block hashes and caches its full blocks up to `upto` tokens. The
    /// blocks newly hashed make a `BlockStored` event (vLLM's `cache_full_blocks`).
    fn cache_blocks(kv: &mut KvCache, lora_ids: &HashMap<String, u32>, seq: &mut Seq, upto: usize) {
        let bs = kv.block_size();
        extend_block_hashes(
            &mut seq.block_hashes,
            &seq.tokens[..upto],
            bs,
            &seq.lora_key,
        );
        let full = (upto / bs).min(seq.blocks.len());
        let mut new_run: Option<usize> = None;
        for i in 0..full {
            if kv.cache(seq.blocks[i], seq.block_hashes[i]) {
                new_run.get_or_insert(i);
            } else if let Some(start) = new_run.take() {
                Self::stored_event(kv, lora_ids, seq, start, i);
            }
        }
        if let Some(start) = new_run {
            Self::stored_event(kv, lora_ids, seq, start, full);
        }
    }

    /// Queues `BlockStored` for blocks `start..end` of `seq`.
    fn stored_event(
        kv: &mut KvCache,
        lora_ids: &HashMap<String, u32>,
        seq: &Seq,
        start: usize,
        end: usize,
    ) {
        if !kv.events_enabled() {
            return;
        }
        let bs = kv.block_size();
        let lora = seq
            .sub
            .lora
            .as_ref()
            .map(|name| (lora_ids.get(&**name).copied().unwrap_or(0), name.clone()));
        kv.push_event(KvEvent::BlockStored(BlockStored {
            block_hashes: seq.block_hashes[start..end].to_vec(),
            parent_block_hash: start.checked_sub(1).map(|p| seq.block_hashes[p]),
            token_ids: seq.tokens[start * bs..end * bs].to_vec(),
            block_size: bs,
            lora,
        }));
    }

    fn preempt_last(&mut self) -> Option<Seq> {
        let mut s = self.running.pop()?;
        self.kv.free(&s.blocks);
        s.blocks.clear();
        s.num_computed = 0;
        let mut st = self.shared.state.lock();
        st.metrics.preemptions += 1;
        Some(s)
    }

    fn schedule(&mut self) -> Vec<Planned> {
        let bs = self.kv.block_size();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut plan = Vec::new();
        let mut preempted: Vec<Seq> = Vec::new();

        // Running requests first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let (computed, total, have) = {
                let s = &self.running[i];
                (s.num_computed, s.tokens.len(), s.blocks.len())
            };
            let n = (total - computed).min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            let need = (computed + n).div_ceil(bs).saturating_sub(have);
            let mut got = self.kv.allocate(need);
            while got.is_none() {
                match self.preempt_last() {
                    Some(p) => preempted.push(p),
                    None => break,
                }
                if self.running.len() <= i {
                    break; // request i itself was preempted
                }
                got = self.kv.allocate(need);
            }
            let Some(new_blocks) = got else {
                break;
            };
            let s = &mut self.running[i];
            s.blocks.extend(new_blocks);
            Self::cache_blocks(&mut self.kv, &self.lora_ids, s, computed + n);
            let decode = n == 1 && computed + 1 == total && total > self.running[i].num_prompt;
            plan.push(Planned {
                idx: i,
                tokens: n,
                new_prefill: false,
                decode,
            });
            budget -= n;
            i += 1;
        }
        let any_preempted = !preempted.is_empty();
        if any_preempted {
            let mut st = self.shared.state.lock();
            st.metrics.running = st.metrics.running.saturating_sub(preempted.len());
            st.metrics.waiting += preempted.len();
        }
        // Preempted requests go back to the head of the queue, earliest admitted first.
        for s in preempted {
            self.waiting.push_front(s);
        }

        // Then waiting requests, unless this step preempted.
        if !any_preempted {
            let mut skipped: Vec<Seq> = Vec::new();
            let mut admitted = 0usize;
            while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
                let Some(mut s) = self.waiting.pop_front() else {
                    break;
                };
                if let Some(l) = s.sub.lora.as_deref() {
                    let loras = self.running_loras();
                    if !loras.contains(&l) && loras.len() >= self.cfg.max_loras {
                        skipped.push(s);
                        continue;
                    }
                }
                let total = s.tokens.len();
                extend_block_hashes(&mut s.block_hashes, &s.tokens, bs, &s.lora_key);
                let max_hit = capped_hit_blocks(s.block_hashes.len(), total, bs);
                let hit = self.kv.lookup(&s.block_hashes[..max_hit]);
                let cached = hit.len() * bs;
                let n = (total - cached).min(budget);
                let need = (cached + n).div_ceil(bs).saturating_sub(hit.len());
                if need + self.kv.count_free(&hit) > self.kv.num_free() {
                    self.waiting.push_front(s);
                    break;
                }
                self.kv.touch(&hit);
                let Some(new_blocks) = self.kv.allocate(need) else {
                    // Cannot happen after the check above; undo and wait.
                    self.kv.free(&hit);
                    self.waiting.push_front(s);
                    break;
                };
                s.blocks = hit;
                s.blocks.extend(new_blocks);
                s.num_computed = cached;
                let first = s.cached_tokens.is_none();
                if first {
                    s.cached_tokens = Some(cached);
                    s.first_scheduled = Some(Instant::now());
                }
                Self::cache_blocks(&mut self.kv, &self.lora_ids, &mut s, cached + n);
                {
                    let mut st = self.shared.state.lock();
                    st.metrics.prefix_queries += total as u64;
                    st.metrics.prefix_hits += cached as u64;
                    if first {
                        st.counters.cached_tokens += cached as u64;
                        st.counters.by_api.get_mut(s.sub.api).cached_tokens += cached as u64;
                        let q = s.first_scheduled.unwrap_or(s.arrival) - s.arrival;
                        st.metrics.queue.observe(q.as_secs_f64());
                    }
                }
                plan.push(Planned {
                    idx: self.running.len(),
                    tokens: n,
                    new_prefill: true,
                    decode: false,
                });
                self.running.push(s);
                budget -= n;
                admitted += 1;
            }
            for s in skipped.into_iter().rev() {
                self.waiting.push_front(s);
            }
            if admitted > 0 {
                let mut st = self.shared.state.lock();
                st.metrics.waiting = st.metrics.waiting.saturating_sub(admitted);
                st.metrics.running += admitted;
            }
        }
        plan
    }

    fn account_prefill(&self, plan: &[Planned], factor: f64) {
        let mut ms = 0.0;
        for p in plan.iter().filter(|p| !p.decode) {
            let overhead = if p.new_prefill {
                self.cfg.prefill_overhead_ms
            } else {
                0.0
            };
            ms += factor * (overhead + p.tokens as f64 * self.cfg.prefill_ms_per_token);
        }
        if ms > 0.0 {
            self.shared.state.lock().counters.prefill_ms += ms;
        }
    }

    fn apply(&mut self, plan: Vec<Planned>) {
        let now = Instant::now();
        let mut finished: Vec<(usize, TokenText)> = Vec::new();
        let mut st = self.shared.state.lock();
        for p in &plan {
            let s = &mut self.running[p.idx];
            s.num_computed += p.tokens;
            if s.num_computed < s.tokens.len() {
                continue; // prefill continues next step
            }
            if s.sub.output_len == 0 {
                // A pooling request: its output is the prefill itself, which vLLM counts as
                // the first token's arrival (TTFT, prompt tokens) without sampling anything.
                st.metrics.ttft.observe((now - s.arrival).as_secs_f64());
                st.metrics.prompt_tokens += s.num_prompt as u64;
                st.counters.prompt_tokens += s.num_prompt as u64;
                st.counters.by_api.get_mut(s.sub.api).prompt_tokens += s.num_prompt as u64;
                finished.push((p.idx, empty_text()));
                continue;
            }
            let api = st.counters.by_api.get_mut(s.sub.api);
            api.generation_tokens += 1;
            if s.num_output() == 0 {
                api.prompt_tokens += s.num_prompt as u64;
            }
            let out_idx = s.num_output();
            let is_last = out_idx + 1 >= s.sub.output_len;
            let (id, text) = if is_last && s.sub.finish == FinishReason::Stop {
                (s.sub.eos, empty_text())
            } else {
                s.sub.gen.next_token()
            };
            s.tokens.push(id);
            st.metrics.generation_tokens += 1;
            if out_idx == 0 {
                st.metrics.ttft.observe((now - s.arrival).as_secs_f64());
                st.metrics.prompt_tokens += s.num_prompt as u64;
                st.counters.prompt_tokens += s.num_prompt as u64;
            } else if let Some(prev) = s.last_token_at {
                st.metrics.itl.observe((now - prev).as_secs_f64());
            }
            s.last_token_at = Some(now);
            if is_last {
                finished.push((p.idx, text));
            } else {
                // A closed receiver is noticed (and the request aborted) at the next step.
                let _ = s
                    .sub
                    .tx
                    .send(Event::Token(text, s.cached_tokens.unwrap_or(0)));
            }
        }
        finished.sort_unstable_by_key(|f| f.0);
        for (idx, text) in finished.into_iter().rev() {
            let s = self.running.remove(idx);
            self.kv.free(&s.blocks);
            st.metrics.finish(s.sub.finish);
            st.counters.by_api.get_mut(s.sub.api).requests_served += 1;
            st.metrics.e2e.observe((now - s.arrival).as_secs_f64());
            st.metrics.running = st.metrics.running.saturating_sub(1);
            let usage = Usage {
                reason: s.sub.finish,
                prompt_tokens: s.num_prompt,
                completion_tokens: s.num_output(),
                cached_tokens: s.cached_tokens.unwrap_or(0),
            };
            let _ = s.sub.tx.send(Event::Last(text, usage));
        }
    }

    /// Publishes gauges: running/waiting counts, KV usage, LoRA info.
    fn publish(&mut self) {
        let running = self.running_loras().join(",");
        let mut waiting: Vec<&str> = self
            .waiting
            .iter()
            .filter_map(|s| s.sub.lora.as_deref())
            .collect();
        waiting.sort_unstable();
        waiting.dedup();
        let waiting = waiting.join(",");
        let usage = self.kv.usage();
        let mut st = self.shared.state.lock();
        st.metrics.kv_usage = usage;
        st.metrics.set_lora_info(running, waiting, unix_now());
    }
}
