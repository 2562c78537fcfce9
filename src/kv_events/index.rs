//! [`KvIndex`]: which endpoint of a pool holds which token block, from engines' KV-cache events
//! (confirmed) and from llm-lb's own recent routing (predicted, short-lived).
//!
//! # Structure
//!
//! - Endpoints are named by their label (`host:port`) and mapped to small slots, so the index
//!   survives pool rebuilds that move endpoints around.
//! - One LRU map from a block's llm-lb key ([`BlockKey`]) to its holders, a short list sorted by
//!   slot. A holder is *confirmed* (the engine said it stored the block; its engine hash is kept)
//!   or *predicted* (llm-lb just routed a request there; ignored once its deadline passes).
//! - Per endpoint: the engine hash → key map (a `BlockRemoved` names engine hashes, and a
//!   `BlockStored` names its parent by engine hash), and a queue of its predictions by deadline.
//!
//! # Bounds
//!
//! Every (block, endpoint) pair is one entry. Entries are at most the capacity: past it, the
//! least recently stored or matched blocks are evicted with all their holders, and with them the
//! engine hashes that named them. Each endpoint's engine-hash map has exactly one entry per
//! confirmed holder, and the prediction queues together hold at most the capacity, so memory is
//! bounded by the capacity (plus the endpoints) whatever the event stream says.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lru::LruCache;
use parking_lot::Mutex;

use super::feeds::Feeds;
use super::wire::{BlockRemoved, BlockStored, EngineHash, KvEvent};
use crate::kv_blocks::{block_key, BlockKey, ROOT};
use crate::telemetry;

/// Default bound on (block, endpoint) entries per pool: as many as the store's prefix index keeps
/// block keys (`DEFAULT_PREFIX_KEYS`).
pub const DEFAULT_CAPACITY: usize = 262_144;

/// An endpoint's place in a [`KvIndex`]. A slot of an endpoint that was forgotten
/// ([`KvIndex::forget_endpoint`]) never matches again, even when its place is reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot {
    index: u32,
    generation: u32,
}

/// What one [`KvIndex::apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Blocks recorded as held (new, re-stored or confirming a prediction).
    pub stored: usize,
    /// Blocks forgotten because the engine removed them.
    pub removed: usize,
    /// `AllBlocksCleared` events.
    pub cleared: usize,
    /// `BlockStored` events skipped because their parent is unknown (events were missed, or the
    /// parent was skipped or evicted).
    pub unknown_parent: usize,
    /// Removed engine hashes the index did not know.
    pub unknown_removed: usize,
    /// Events about blocks llm-lb does not route on: another medium than the GPU, another
    /// KV-cache group than the first, LoRA adapters, or blocks with extra hash keys.
    pub ignored: usize,
}

/// Totals since the index was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Blocks evicted to stay within the capacity.
    pub evicted: u64,
    /// `BlockStored` events skipped for an unknown parent.
    pub unknown_parent: u64,
}

/// The precise KV index of one pool; see the module docs. Shared in an `Arc`; every method is
/// synchronous and holds the lock only for its own work.
pub struct KvIndex {
    pool: String,
    capacity: usize,
    feeds: Feeds,
    inner: Mutex<Inner>,
    evicted: AtomicU64,
    unknown_parent: AtomicU64,
    /// Whether this index sets the pool's `llmlb_kv_index_blocks` (not the routed history).
    gauge: bool,
    /// What llm-lb routed to endpoints whose events it follows, kept after the engines evicted
    /// it (see [`KvIndex::remember_routed`]); `None` in the history itself.
    routed: Option<Box<KvIndex>>,
}

impl std::fmt::Debug for KvIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvIndex")
            .field("pool", &self.pool)
            .field("capacity", &self.capacity)
            .field("blocks", &self.blocks())
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// The engine reported the block, under this hash.
    Confirmed(EngineHash),
    /// llm-lb routed the block there; believed until this deadline.
    Predicted(Instant),
}

#[derive(Debug, Clone, Copy)]
struct Holder {
    slot: u32,
    held: Held,
}

impl Holder {
    fn valid(&self, now: Instant) -> bool {
        match self.held {
            Held::Confirmed(_) => true,
            Held::Predicted(deadline) => deadline > now,
        }
    }
}

struct Endpoint {
    label: String,
    /// Engine hash → key, one per confirmed holder of this endpoint.
    by_engine: HashMap<EngineHash, BlockKey>,
    /// Predictions (key, deadline) in the order they were made.
    predictions: VecDeque<(BlockKey, Instant)>,
    /// The most blocks the engine held when it evicted some: its cache's size, as far as the
    /// events tell (0 until it first evicts). Kept through clears.
    full_at: usize,
    /// Whether the engine evicted since its blocks were last cleared (by the engine, or by a
    /// resync that forgot them): then its cache is full, whatever the index still knows of it.
    evicting: bool,
    /// Whether the engine sent events: until it first evicts its cache's size is unknown, and
    /// it counts as full.
    reports: bool,
}

impl Endpoint {
    fn new(label: &str) -> Self {
        Endpoint {
            label: label.to_string(),
            by_engine: HashMap::new(),
            predictions: VecDeque::new(),
            full_at: 0,
            evicting: false,
            reports: false,
        }
    }

    /// How full the engine's cache is, per mille: all of it while it evicts, else the blocks it
    /// holds over [`Endpoint::full_at`]. Before it ever evicted its size is unknown: an engine
    /// that sends events counts as full (caches fill within seconds under load, and a copy made
    /// while they fill is still there when they do), one that does not as empty.
    fn fullness(&self) -> u64 {
        match self.full_at {
            _ if self.evicting => 1000,
            0 if self.reports => 1000,
            0 => 0,
            full => (self.by_engine.len().min(full) * 1000 / full) as u64,
        }
    }
}

struct Inner {
    labels: HashMap<String, u32>,
    endpoints: Vec<Option<Endpoint>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    /// Key → holders sorted by slot, never empty.
    blocks: LruCache<BlockKey, Vec<Holder>>,
    /// (block, endpoint) pairs in `blocks`.
    entries: usize,
    /// Items in every endpoint's prediction queue.
    queued: usize,
}

impl KvIndex {
    /// An empty index for `pool` bounded to `capacity` (block, endpoint) entries (at least 1;
    /// [`DEFAULT_CAPACITY`] is a good default).
    pub fn new(pool: &str, capacity: usize) -> Self {
        telemetry::set_kv_index_blocks(pool, 0);
        KvIndex {
            gauge: true,
            routed: Some(Box::new(KvIndex {
                gauge: false,
                routed: None,
                ..KvIndex::empty(pool, capacity)
            })),
            ..KvIndex::empty(pool, capacity)
        }
    }

    fn empty(pool: &str, capacity: usize) -> Self {
        KvIndex {
            gauge: false,
            routed: None,
            pool: pool.to_string(),
            capacity: capacity.max(1),
            feeds: Feeds::default(),
            inner: Mutex::new(Inner {
                labels: HashMap::new(),
                endpoints: Vec::new(),
                generations: Vec::new(),
                free: Vec::new(),
                blocks: LruCache::unbounded(),
                entries: 0,
                queued: 0,
            }),
            evicted: AtomicU64::new(0),
            unknown_parent: AtomicU64::new(0),
        }
    }

    fn report(&self, entries: usize) {
        if self.gauge {
            telemetry::set_kv_index_blocks(&self.pool, entries);
        }
    }

    /// Record that llm-lb routed the blocks `keys` to `endpoint`, whose engine's events it
    /// follows, in the routed history: kept for `ttl` from their last routing whatever the
    /// engine evicts since, within the same bound as the index. It tells where content was
    /// placed when no engine holds it any more ([`KvIndex::matched_routed`]).
    pub fn remember_routed(&self, endpoint: &str, keys: &[BlockKey], ttl: Duration) {
        if let Some(routed) = &self.routed {
            routed.predict(endpoint, keys, ttl);
        }
    }

    /// How many leading blocks of the chain `keys` llm-lb routed to each of `endpoints` in the
    /// routed history ([`KvIndex::remember_routed`]).
    pub fn matched_routed(&self, keys: &[BlockKey], endpoints: &[&str]) -> Vec<usize> {
        match &self.routed {
            Some(routed) => routed.matched(keys, endpoints),
            None => vec![0; endpoints.len()],
        }
    }

    /// The event streams running into this index.
    pub fn feeds(&self) -> &Feeds {
        &self.feeds
    }

    /// The pool this index serves.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The bound on (block, endpoint) entries.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// (block, endpoint) entries held now, confirmed and predicted (expired predictions count
    /// until they are swept).
    pub fn blocks(&self) -> usize {
        self.inner.lock().entries
    }

    /// Totals since the index was made.
    pub fn stats(&self) -> IndexStats {
        IndexStats {
            evicted: self.evicted.load(Ordering::Relaxed),
            unknown_parent: self.unknown_parent.load(Ordering::Relaxed),
        }
    }

    /// The slot of `endpoint` (its label), registering it when new.
    pub fn slot(&self, endpoint: &str) -> Slot {
        let mut inner = self.inner.lock();
        let index = inner.slot_index(endpoint);
        inner.slot(index)
    }

    /// The label of the endpoint at `slot`, unless it was forgotten.
    pub fn label(&self, slot: Slot) -> Option<String> {
        let inner = self.inner.lock();
        if inner.generations.get(slot.index as usize) != Some(&slot.generation) {
            return None;
        }
        inner
            .endpoints
            .get(slot.index as usize)
            .and_then(Option::as_ref)
            .map(|e| e.label.clone())
    }

    /// Apply an engine's events, in order, to what `endpoint` holds.
    ///
    /// `BlockStored` recomputes llm-lb's keys from the event's token ids in blocks of its
    /// `block_size`, chained from the key of its parent (looked up by the parent's engine hash;
    /// an unknown parent skips the event), and records each block as held (confirming a
    /// prediction). `BlockRemoved` forgets blocks by engine hash; `AllBlocksCleared` forgets all
    /// of the endpoint's blocks and predictions.
    pub fn apply(&self, endpoint: &str, events: &[KvEvent]) -> Applied {
        self.apply_at(endpoint, events, Instant::now())
    }

    pub(crate) fn apply_at(&self, endpoint: &str, events: &[KvEvent], now: Instant) -> Applied {
        let mut done = Applied::default();
        let (entries, evicted) = {
            let mut inner = self.inner.lock();
            let slot = inner.slot_index(endpoint);
            inner.sweep(slot, now);
            if let Some(ep) = inner.endpoint(slot) {
                ep.reports = true;
            }
            let mut keys = Vec::new();
            let mut evicted = 0;
            for event in events {
                match event {
                    KvEvent::BlockStored(e) => {
                        evicted += inner.stored(slot, e, &mut keys, &mut done, self.capacity);
                    }
                    KvEvent::BlockRemoved(e) => inner.removed(slot, e, &mut done),
                    KvEvent::AllBlocksCleared => {
                        inner.clear(slot);
                        done.cleared += 1;
                    }
                }
            }
            (inner.entries, evicted)
        };
        self.evicted.fetch_add(evicted, Ordering::Relaxed);
        self.unknown_parent
            .fetch_add(done.unknown_parent as u64, Ordering::Relaxed);
        self.report(entries);
        done
    }

    /// Record that llm-lb just routed the blocks `keys` to `endpoint`: they count as held there
    /// for `ttl`, or until an engine event confirms them (then they are confirmed entries).
    pub fn predict(&self, endpoint: &str, keys: &[BlockKey], ttl: Duration) {
        self.predict_at(endpoint, keys, ttl, Instant::now());
    }

    pub(crate) fn predict_at(
        &self,
        endpoint: &str,
        keys: &[BlockKey],
        ttl: Duration,
        now: Instant,
    ) {
        let deadline = now
            .checked_add(ttl)
            .or_else(|| now.checked_add(Duration::from_secs(86_400)))
            .unwrap_or(now);
        let (entries, evicted) = {
            let mut inner = self.inner.lock();
            let slot = inner.slot_index(endpoint);
            inner.sweep(slot, now);
            inner.predicted(slot, keys, deadline, self.capacity);
            let evicted = inner.evict(self.capacity);
            (inner.entries, evicted)
        };
        self.evicted.fetch_add(evicted, Ordering::Relaxed);
        self.report(entries);
    }

    /// How many leading blocks of the chain `keys` each of `endpoints` (labels) holds, confirmed
    /// or predicted and not expired: one count per endpoint, 0 for one the index does not know.
    /// Walks the chain once and stops when no endpoint still matches.
    pub fn matched(&self, keys: &[BlockKey], endpoints: &[&str]) -> Vec<usize> {
        let mut out = Vec::with_capacity(endpoints.len());
        self.matched_at(keys, endpoints, &mut out, Instant::now());
        out
    }

    /// [`KvIndex::matched`] into `out` (cleared first), to reuse its allocation.
    pub fn matched_into(&self, keys: &[BlockKey], endpoints: &[&str], out: &mut Vec<usize>) {
        self.matched_at(keys, endpoints, out, Instant::now());
    }

    /// For each endpoint holding at least the first block of the chain `keys`, its slot and how
    /// many leading blocks it holds, in `out` (cleared first; by slot).
    pub fn matched_slots(&self, keys: &[BlockKey], out: &mut Vec<(Slot, usize)>) {
        self.matched_slots_at(keys, out, Instant::now());
    }

    pub(crate) fn matched_slots_at(
        &self,
        keys: &[BlockKey],
        out: &mut Vec<(Slot, usize)>,
        now: Instant,
    ) {
        out.clear();
        let mut counts = Vec::new();
        let mut inner = self.inner.lock();
        inner.walk(keys, now, &mut counts);
        out.extend(counts.into_iter().map(|(index, n)| (inner.slot(index), n)));
    }

    pub(crate) fn matched_at(
        &self,
        keys: &[BlockKey],
        endpoints: &[&str],
        out: &mut Vec<usize>,
        now: Instant,
    ) {
        out.clear();
        let mut counts = Vec::new();
        let mut inner = self.inner.lock();
        inner.walk(keys, now, &mut counts);
        out.extend(
            endpoints
                .iter()
                .map(|label| inner.lookup(&counts, label).map_or(0, |(_, n)| n)),
        );
    }

    /// [`KvIndex::matched`], and how full each of `endpoints` reports its KV cache, per mille:
    /// 1000 once it evicts (an engine evicts only when its cache is full), else the blocks it
    /// holds over the most it held when it last evicted. An engine that sent events but never
    /// evicted counts as full (its size is unknown, and under load it fills within seconds);
    /// fullness is 0 for an endpoint whose events llm-lb does not follow or that the index does
    /// not know. An engine that emptied its cache (`AllBlocksCleared`) after it evicted fills up
    /// from 0 again, and after a resync that forgot an endpoint's blocks its next eviction says
    /// it is full again.
    /// One lock and one lookup of each label for both.
    pub fn matched_and_fullness(
        &self,
        keys: &[BlockKey],
        endpoints: &[&str],
    ) -> (Vec<usize>, Vec<u64>) {
        let mut counts = Vec::new();
        let mut inner = self.inner.lock();
        inner.walk(keys, Instant::now(), &mut counts);
        endpoints
            .iter()
            .map(|label| {
                inner.lookup(&counts, label).map_or((0, 0), |(slot, n)| {
                    let endpoint = inner.endpoints.get(slot as usize).and_then(Option::as_ref);
                    (n, endpoint.map_or(0, Endpoint::fullness))
                })
            })
            .unzip()
    }

    /// Forget every block and prediction of `endpoint` (it keeps its slot).
    pub fn clear_endpoint(&self, endpoint: &str) {
        let entries = {
            let mut inner = self.inner.lock();
            if let Some(&slot) = inner.labels.get(endpoint) {
                inner.clear(slot);
            }
            inner.entries
        };
        self.report(entries);
    }

    /// Forget `endpoint` altogether (it left the pool): its blocks, predictions, routed
    /// history and slot.
    pub fn forget_endpoint(&self, endpoint: &str) {
        if let Some(routed) = &self.routed {
            routed.forget_endpoint(endpoint);
        }
        let entries = {
            let mut inner = self.inner.lock();
            if let Some(slot) = inner.labels.remove(endpoint) {
                inner.clear(slot);
                let at = slot as usize;
                if let Some(e) = inner.endpoints.get_mut(at) {
                    *e = None;
                }
                if let Some(g) = inner.generations.get_mut(at) {
                    *g = g.wrapping_add(1);
                }
                inner.free.push(slot);
            }
            inner.entries
        };
        self.report(entries);
    }
}

impl Inner {
    fn slot(&self, index: u32) -> Slot {
        Slot {
            index,
            generation: self.generations.get(index as usize).copied().unwrap_or(0),
        }
    }

    fn slot_index(&mut self, label: &str) -> u32 {
        if let Some(&slot) = self.labels.get(label) {
            return slot;
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                if let Some(e) = self.endpoints.get_mut(slot as usize) {
                    *e = Some(Endpoint::new(label));
                }
                slot
            }
            None => {
                self.endpoints.push(Some(Endpoint::new(label)));
                self.generations.push(0);
                u32::try_from(self.endpoints.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.labels.insert(label.to_string(), slot);
        slot
    }

    /// `label`'s slot and its leading-blocks count in `counts` (from [`Inner::walk`]), if the
    /// index knows the endpoint.
    fn lookup(&self, counts: &[(u32, usize)], label: &str) -> Option<(u32, usize)> {
        let slot = *self.labels.get(label)?;
        let n = counts
            .binary_search_by_key(&slot, |(i, _)| *i)
            .map_or(0, |at| counts[at].1);
        Some((slot, n))
    }

    fn endpoint(&mut self, slot: u32) -> Option<&mut Endpoint> {
        self.endpoints
            .get_mut(slot as usize)
            .and_then(Option::as_mut)
    }

    /// Remove `slot`'s holder of `key`, returning what it was.
    fn remove_holder(&mut self, key: BlockKey, slot: u32) -> Option<Held> {
        let holders = self.blocks.peek_mut(&key)?;
        let at = holders.binary_search_by_key(&slot, |h| h.slot).ok()?;
        let held = holders.remove(at).held;
        if holders.is_empty() {
            self.blocks.pop(&key);
        }
        self.entries -= 1;
        Some(held)
    }

    /// Record a `BlockStored` (evicting as it goes, so even a huge event stays within
    /// `capacity`); returns how many blocks were evicted.
    fn stored(
        &mut self,
        slot: u32,
        e: &BlockStored,
        keys: &mut Vec<BlockKey>,
        done: &mut Applied,
        capacity: usize,
    ) -> u64 {
        let gpu = matches!(e.medium.as_deref(), None | Some("GPU") | Some("gpu"));
        let first_group = matches!(e.group_idx, None | Some(0));
        let plain = e.lora_id.is_none() && e.lora_name.is_none() && !e.extra_keys;
        if !(gpu && first_group && plain) || e.block_size == 0 {
            done.ignored += 1;
            return 0;
        }
        let parent = match e.parent_block_hash {
            None => ROOT,
            Some(h) => match self
                .endpoint(slot)
                .and_then(|ep| ep.by_engine.get(&h).copied())
            {
                Some(key) => {
                    self.blocks.promote(&key);
                    key
                }
                None => {
                    done.unknown_parent += 1;
                    return 0;
                }
            },
        };
        keys.clear();
        let mut prev = parent;
        for block in e.token_ids.chunks_exact(e.block_size) {
            prev = block_key(prev, block);
            keys.push(prev);
        }
        // Insert the deepest block first, so the sequence's first block is the most recent:
        // eviction then takes a chain from its tail, as engines do.
        let mut evicted = 0;
        for (&hash, &key) in e.block_hashes.iter().zip(keys.iter()).rev() {
            self.confirm(slot, hash, key);
            done.stored += 1;
            evicted += self.evict(capacity);
        }
        evicted
    }

    /// Record that `slot` holds `key` under the engine hash `hash`.
    fn confirm(&mut self, slot: u32, hash: EngineHash, key: BlockKey) {
        // One key per engine hash: a hash re-used for other tokens drops its old block.
        let old = self
            .endpoint(slot)
            .and_then(|ep| ep.by_engine.get(&hash).copied());
        if let Some(old) = old.filter(|&old| old != key) {
            self.remove_holder(old, slot);
        }
        let replaced = match self.blocks.get_mut(&key) {
            Some(holders) => match holders.binary_search_by_key(&slot, |h| h.slot) {
                Ok(at) => {
                    let before = holders[at].held;
                    holders[at].held = Held::Confirmed(hash);
                    match before {
                        Held::Confirmed(h) if h != hash => Some(h),
                        Held::Confirmed(_) | Held::Predicted(_) => None,
                    }
                }
                Err(at) => {
                    holders.insert(
                        at,
                        Holder {
                            slot,
                            held: Held::Confirmed(hash),
                        },
                    );
                    self.entries += 1;
                    None
                }
            },
            None => {
                self.blocks.put(
                    key,
                    vec![Holder {
                        slot,
                        held: Held::Confirmed(hash),
                    }],
                );
                self.entries += 1;
                None
            }
        };
        if let Some(ep) = self.endpoint(slot) {
            // One engine hash per key: the key's previous hash no longer names it.
            if let Some(h) = replaced {
                ep.by_engine.remove(&h);
            }
            ep.by_engine.insert(hash, key);
        }
    }

    fn removed(&mut self, slot: u32, e: &BlockRemoved, done: &mut Applied) {
        let gpu = matches!(e.medium.as_deref(), None | Some("GPU") | Some("gpu"));
        let first_group = matches!(e.group_idx, None | Some(0));
        if !(gpu && first_group) {
            done.ignored += 1;
            return;
        }
        if let Some(ep) = self.endpoint(slot) {
            // An engine evicts only when its cache is full (an emptied one says AllBlocksCleared).
            ep.full_at = ep.full_at.max(ep.by_engine.len());
            ep.evicting = true;
        }
        for hash in &e.block_hashes {
            let key = self.endpoint(slot).and_then(|ep| ep.by_engine.remove(hash));
            match key {
                Some(key) => {
                    self.remove_holder(key, slot);
                    done.removed += 1;
                }
                None => done.unknown_removed += 1,
            }
        }
    }

    fn predicted(&mut self, slot: u32, keys: &[BlockKey], deadline: Instant, capacity: usize) {
        let mut queued = Vec::with_capacity(keys.len());
        // The first block ends most recent (see `stored`).
        for &key in keys.iter().rev() {
            let fresh = Holder {
                slot,
                held: Held::Predicted(deadline),
            };
            match self.blocks.get_mut(&key) {
                Some(holders) => match holders.binary_search_by_key(&slot, |h| h.slot) {
                    Ok(at) => match holders[at].held {
                        Held::Confirmed(_) => {}
                        Held::Predicted(d) => {
                            holders[at].held = Held::Predicted(d.max(deadline));
                            queued.push(key);
                        }
                    },
                    Err(at) => {
                        holders.insert(at, fresh);
                        self.entries += 1;
                        queued.push(key);
                    }
                },
                None => {
                    self.blocks.put(key, vec![fresh]);
                    self.entries += 1;
                    queued.push(key);
                }
            }
        }
        let n = queued.len();
        if let Some(ep) = self.endpoint(slot) {
            ep.predictions
                .extend(queued.into_iter().rev().map(|k| (k, deadline)));
        }
        self.queued += n;
        // Bound the queues: drop this endpoint's oldest predictions first.
        while self.queued > capacity {
            let Some((key, _)) = self
                .endpoint(slot)
                .and_then(|ep| ep.predictions.pop_front())
            else {
                break;
            };
            self.queued -= 1;
            self.drop_prediction(key, slot, None);
        }
    }

    /// Remove `slot`'s prediction of `key` if it is still a prediction (and, with `now`, only if
    /// it has expired).
    fn drop_prediction(&mut self, key: BlockKey, slot: u32, now: Option<Instant>) {
        let still = self.blocks.peek(&key).and_then(|holders| {
            holders
                .binary_search_by_key(&slot, |h| h.slot)
                .ok()
                .map(|at| holders[at].held)
        });
        if let Some(Held::Predicted(deadline)) = still {
            if now.is_none_or(|now| deadline <= now) {
                self.remove_holder(key, slot);
            }
        }
    }

    /// Drop `slot`'s expired predictions.
    fn sweep(&mut self, slot: u32, now: Instant) {
        loop {
            let front = self
                .endpoint(slot)
                .and_then(|ep| ep.predictions.front().copied());
            match front {
                Some((key, deadline)) if deadline <= now => {
                    if let Some(ep) = self.endpoint(slot) {
                        ep.predictions.pop_front();
                    }
                    self.queued -= 1;
                    self.drop_prediction(key, slot, Some(now));
                }
                Some(_) | None => break,
            }
        }
    }

    /// Forget every block and prediction of `slot`.
    fn clear(&mut self, slot: u32) {
        let Some(ep) = self.endpoint(slot) else {
            return;
        };
        ep.evicting = false;
        let confirmed: Vec<BlockKey> = ep.by_engine.drain().map(|(_, key)| key).collect();
        let predicted: Vec<(BlockKey, Instant)> = ep.predictions.drain(..).collect();
        for key in confirmed {
            self.remove_holder(key, slot);
        }
        self.queued -= predicted.len();
        for (key, _) in predicted {
            self.drop_prediction(key, slot, None);
        }
    }

    /// Evict least recently used blocks until the entries fit; returns how many blocks went.
    fn evict(&mut self, capacity: usize) -> u64 {
        let mut evicted = 0;
        while self.entries > capacity {
            let Some((key, holders)) = self.blocks.pop_lru() else {
                break;
            };
            evicted += 1;
            self.entries -= holders.len();
            for h in holders {
                if let Held::Confirmed(hash) = h.held {
                    if let Some(ep) = self.endpoint(h.slot) {
                        if ep.by_engine.get(&hash) == Some(&key) {
                            ep.by_engine.remove(&hash);
                        }
                    }
                }
                // A prediction's queue item finds no holder when it is swept.
            }
        }
        evicted
    }

    /// The leading-blocks count of every endpoint holding the chain's first block, sorted by slot
    /// index; the matched blocks become the most recently used.
    fn walk(&mut self, keys: &[BlockKey], now: Instant, counts: &mut Vec<(u32, usize)>) {
        counts.clear();
        let Some(first) = keys.first().and_then(|k| self.blocks.peek(k)) else {
            return;
        };
        counts.extend(first.iter().filter(|h| h.valid(now)).map(|h| (h.slot, 1)));
        let mut alive = counts.len();
        let mut depth = usize::from(alive > 0);
        for (level, key) in keys.iter().enumerate().skip(1) {
            if alive == 0 {
                break;
            }
            let Some(holders) = self.blocks.peek(key) else {
                break;
            };
            // Both sorted by slot: one merge pass.
            let mut j = 0;
            let mut extended = false;
            for entry in counts.iter_mut().filter(|(_, n)| *n == level) {
                while j < holders.len() && holders[j].slot < entry.0 {
                    j += 1;
                }
                if j < holders.len() && holders[j].slot == entry.0 && holders[j].valid(now) {
                    entry.1 += 1;
                    extended = true;
                } else {
                    alive -= 1;
                }
            }
            if extended {
                depth = level + 1;
            }
        }
        for key in keys[..depth].iter().rev() {
            self.blocks.promote(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_blocks::chain_keys;

    const BS: usize = 4;

    fn tokens(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32)
            .map(|i| i.wrapping_mul(31).wrapping_add(salt))
            .collect()
    }

    /// A `BlockStored` of `tokens` (whole blocks) with engine hashes `first..`.
    fn stored(first: u64, parent: Option<u64>, tokens: &[u32]) -> KvEvent {
        KvEvent::BlockStored(BlockStored {
            block_hashes: (first..first + (tokens.len() / BS) as u64).collect(),
            parent_block_hash: parent,
            token_ids: tokens.to_vec(),
            block_size: BS,
            ..BlockStored::default()
        })
    }

    fn removed(hashes: &[u64]) -> KvEvent {
        KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: hashes.to_vec(),
            medium: None,
            group_idx: None,
        })
    }

    fn counts(index: &KvIndex, keys: &[BlockKey], labels: &[&str], now: Instant) -> Vec<usize> {
        let mut out = Vec::new();
        index.matched_at(keys, labels, &mut out, now);
        out
    }

    #[test]
    fn stored_blocks_match_requests_with_the_same_tokens() {
        let index = KvIndex::new("p", DEFAULT_CAPACITY);
        let t = tokens(4 * BS + 2, 0);
        let done = index.apply("a:1", &[stored(100, None, &t[..4 * BS])]);
        assert_eq!(done.stored, 4);
        assert_eq!(index.blocks(), 4);
        let keys = chain_keys(&t, BS);
        assert_eq!(keys.len(), 4);
        let now = Instant::now();
        assert_eq!(counts(&index, &keys, &["a:1", "b:1"], now), vec![4, 0]);
        // A request that diverges after two blocks matches two.
        let mut other = t.clone();
        other[2 * BS] += 1;
        assert_eq!(
            counts(&index, &chain_keys(&other, BS), &["a:1"], now),
            vec![2]
        );
        assert_eq!(index.matched(&keys, &["b:1", "a:1"]), vec![0, 4]);
        let mut out = Vec::new();
        index.matched_slots(&keys, &mut out);
        assert_eq!(out, vec![(index.slot("a:1"), 4)]);
        assert_eq!(index.label(out[0].0).as_deref(), Some("a:1"));
    }

    #[test]
    fn a_continuation_chains_from_its_parent_and_an_unknown_parent_is_skipped() {
        let index = KvIndex::new("p", DEFAULT_CAPACITY);
        let t = tokens(6 * BS, 1);
        index.apply("a", &[stored(1, None, &t[..2 * BS])]);
        // Blocks 3-4 follow engine block 2.
        let done = index.apply("a", &[stored(3, Some(2), &t[2 * BS..4 * BS])]);
        assert_eq!(done.stored, 2);
        // Blocks 6-7 follow a block 5 whose event was missed.
        let done = index.apply("a", &[stored(6, Some(5), &t[5 * BS..])]);
        assert_eq!(done.unknown_parent, 1);
        assert_eq!(index.stats().unknown_parent, 1);
        let keys = chain_keys(&t, BS);
        assert_eq!(counts(&index, &keys, &["a"], Instant::now()), vec![4]);
        // The parent is per endpoint: b never stored block 2.
        let done = index.apply("b", &[stored(3, Some(2), &t[2 * BS..4 * BS])]);
        assert_eq!(done.unknown_parent, 1);
    }

    fn full(index: &KvIndex, labels: &[&str]) -> Vec<u64> {
        index.matched_and_fullness(&[], labels).1
    }

    #[test]
    fn an_engine_is_full_once_it_evicts_and_empty_after_a_clear() {
        let index = KvIndex::new("p", DEFAULT_CAPACITY);
        let t = tokens(4 * BS, 3);
        // An endpoint the index does not know counts as empty.
        assert_eq!(full(&index, &["a", "b"]), vec![0, 0]);
        index.apply("a", &[stored(1, None, &t)]);
        // Four blocks held, none evicted yet: the cache's size is unknown, it counts as full.
        assert_eq!(full(&index, &["a", "b"]), vec![1000, 0]);
        // Evicting one block to store another says the cache holds four.
        let u = tokens(BS, 4);
        index.apply("a", &[removed(&[4]), stored(9, None, &u)]);
        assert_eq!(full(&index, &["a"]), vec![1000]);
        // While it evicts it is full, whatever the index still knows of it.
        index.apply("a", &[removed(&[3, 2])]);
        assert_eq!(full(&index, &["a"]), vec![1000]);
        // An emptied cache fills up from nothing, against the size it had.
        index.apply("a", &[KvEvent::AllBlocksCleared]);
        assert_eq!(full(&index, &["a"]), vec![0]);
        index.apply("a", &[stored(1, None, &t[..2 * BS])]);
        assert_eq!(full(&index, &["a"]), vec![500]);
        // A resync forgets what the engine holds, not that it was full: its next eviction says
        // so again.
        index.clear_endpoint("a");
        assert_eq!(full(&index, &["a"]), vec![0]);
        index.apply("a", &[removed(&[77])]);
        assert_eq!(full(&index, &["a"]), vec![1000]);
        // A forgotten endpoint starts over: its size unknown again.
        index.forget_endpoint("a");
        assert_eq!(full(&index, &["a"]), vec![0]);
        index.apply("a", &[stored(1, None, &t)]);
        assert_eq!(full(&index, &["a"]), vec![1000]);
    }

    #[test]
    fn removed_blocks_and_cleared_endpoints_stop_matching() {
        let index = KvIndex::new("p", DEFAULT_CAPACITY);
        let t = tokens(3 * BS, 2);
        let keys = chain_keys(&t, BS);
        index.apply("a", &[stored(10, None, &t)]);
        index.apply("b", &[stored(20, None, &t)]);
        let now = Instant::now();
        assert_eq!(counts(&index, &keys, &["a", "b"], now), vec![3, 3]);
        // a evicts its middle block: only the first still matches.
        let done = index.apply("a", &[removed(&[11, 99])]);
        assert_eq!((done.removed, done.unknown_removed), (1, 1));
        assert_eq!(counts(&index, &keys, &["a", "b"], now), vec![1, 3]);
        let done = index.apply("b", &[KvEvent::AllBlocksCleared]);
        assert_eq!(done.cleared, 1);
        assert_eq!(counts(&index, &keys, &["a", "b"], now), vec![1, 0]);
        index.clear_endpoint("a");
        assert_eq!(counts(&index, &keys, &["a", "b"], now), vec![0, 0]);
        assert_eq!(index.blocks(), 0);
    }

    #[test]
    fn predictions_expire_unless_confirmed() {
        let index = KvIndex::new("p", DEFAULT_CAPACITY);
        let t = tokens(3 * BS, 3);
        let keys = chain_keys(&t, BS);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(2);
        index.predict_at("a", &keys, ttl, t0);
        index.predict_at("b", &keys[..1], ttl, t0);
        assert_eq!(index.blocks(), 4);
        assert_eq!(counts(&index, &keys, &["a", "b"], t0), vec![3, 1]);
        // The engine confirms a's first two blocks.
        index.apply_at("a", &[stored(1, None, &t[..2 * BS])], t0);
        assert_eq!(index.blocks(), 4);
        let later = t0 + ttl + Duration::from_millis(1);
        assert_eq!(counts(&index, &keys, &["a", "b"], later), vec![2, 0]);
        // Sweeping drops the expired predictions for good.
        index.apply_at("a", &[], later);
        index.apply_at("b", &[], later);
        assert_eq!(index.blocks(), 2);
        // A confirmed block stays confirmed when predicted again.
        index.predict_at("a", &keys, Duration::ZERO, later);
        assert_eq!(counts(&index, &keys, &["a"], later), vec![2]);
    }

    #[test]
    fn clearing_drops_predictions_too() {
        let index = KvIndex::new("p", DEFAULT_CAPACITY);
        let keys = chain_keys(&tokens(2 * BS, 4), BS);
        let now = Instant::now();
        index.predict_at("a", &keys, Duration::from_secs(60), now);
        index.apply_at("a", &[KvEvent::AllBlocksCleared], now);
        assert_eq!(counts(&index, &keys, &["a"], now), vec![0]);
        assert_eq!(index.blocks(), 0);
    }

    #[test]
    fn ignored_events_do_not_enter_the_index() {
        let index = KvIndex::new("p", DEFAULT_CAPACITY);
        let t = tokens(BS, 5);
        let mut cpu = BlockStored {
            block_hashes: vec![1],
            token_ids: t.clone(),
            block_size: BS,
            medium: Some("CPU".into()),
            ..BlockStored::default()
        };
        let lora = BlockStored {
            medium: None,
            lora_name: Some("x".into()),
            ..cpu.clone()
        };
        let salted = BlockStored {
            medium: None,
            extra_keys: true,
            ..cpu.clone()
        };
        let group = BlockStored {
            medium: None,
            group_idx: Some(1),
            ..cpu.clone()
        };
        let done = index.apply(
            "a",
            &[
                KvEvent::BlockStored(cpu.clone()),
                KvEvent::BlockStored(lora),
                KvEvent::BlockStored(salted),
                KvEvent::BlockStored(group),
            ],
        );
        assert_eq!(done.ignored, 4);
        assert_eq!(index.blocks(), 0);
        cpu.medium = Some("GPU".into());
        index.apply("a", &[KvEvent::BlockStored(cpu)]);
        assert_eq!(index.blocks(), 1);
    }

    #[test]
    fn a_reused_engine_hash_names_only_its_latest_block() {
        let index = KvIndex::new("p", DEFAULT_CAPACITY);
        let a = tokens(BS, 6);
        let b = tokens(BS, 7);
        index.apply("e", &[stored(1, None, &a)]);
        index.apply("e", &[stored(1, None, &b)]);
        let now = Instant::now();
        assert_eq!(counts(&index, &chain_keys(&a, BS), &["e"], now), vec![0]);
        assert_eq!(counts(&index, &chain_keys(&b, BS), &["e"], now), vec![1]);
        assert_eq!(index.blocks(), 1);
        index.apply("e", &[removed(&[1])]);
        assert_eq!(index.blocks(), 0);
    }

    #[test]
    fn capacity_evicts_least_recently_used_blocks_and_their_engine_hashes() {
        let index = KvIndex::new("p", 8);
        let old = tokens(4 * BS, 8);
        let new = tokens(6 * BS, 9);
        index.apply("a", &[stored(1, None, &old)]);
        // Matching the old chain makes it recent...
        let now = Instant::now();
        assert_eq!(counts(&index, &chain_keys(&old, BS), &["a"], now), vec![4]);
        // ...but 10 entries do not fit in 8: the old chain loses its tail first.
        index.apply("a", &[stored(100, None, &new)]);
        assert_eq!(index.blocks(), 8);
        assert_eq!(index.stats().evicted, 2);
        assert_eq!(counts(&index, &chain_keys(&old, BS), &["a"], now), vec![2]);
        assert_eq!(counts(&index, &chain_keys(&new, BS), &["a"], now), vec![6]);
        // The evicted blocks' engine hashes are gone too: removing them is a no-op.
        let done = index.apply("a", &[removed(&[3, 4])]);
        assert_eq!(done.unknown_removed, 2);
    }

    #[test]
    fn memory_stays_bounded_under_a_hostile_stream() {
        let capacity = 64;
        let index = KvIndex::new("p", capacity);
        let now = Instant::now();
        for round in 0..200u32 {
            let t = tokens(8 * BS, round);
            let label = format!("e{}", round % 5);
            index.apply_at(
                &label,
                &[
                    stored(u64::from(round) * 1000, None, &t),
                    // Re-uses engine hashes for other tokens, removes unknown ones.
                    stored(7, None, &t[..BS]),
                    removed(&[u64::from(round) * 7919]),
                ],
                now,
            );
            index.predict_at(
                &label,
                &chain_keys(&tokens(16 * BS, !round), BS),
                Duration::from_secs(3600),
                now,
            );
            assert!(index.blocks() <= capacity);
        }
        let inner = index.inner.lock();
        assert!(inner.blocks.len() <= capacity);
        assert!(inner.queued <= capacity);
        let by_engine: usize = inner
            .endpoints
            .iter()
            .flatten()
            .map(|e| e.by_engine.len())
            .sum();
        let queued: usize = inner
            .endpoints
            .iter()
            .flatten()
            .map(|e| e.predictions.len())
            .sum();
        assert!(by_engine <= capacity);
        assert_eq!(queued, inner.queued);
        let holders: usize = inner.blocks.iter().map(|(_, h)| h.len()).sum();
        assert_eq!(holders, inner.entries);
    }

    #[test]
    fn matched_walks_many_endpoints_and_stops_where_they_diverge() {
        let index = KvIndex::new("p", DEFAULT_CAPACITY);
        let t = tokens(8 * BS, 10);
        let keys = chain_keys(&t, BS);
        let labels: Vec<String> = (0..50).map(|i| format!("10.0.0.{i}:8000")).collect();
        for (i, label) in labels.iter().enumerate() {
            // Endpoint i holds the first i % 9 blocks.
            let n = i % 9;
            if n > 0 {
                index.apply(label, &[stored(1, None, &t[..n * BS])]);
            }
        }
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        let got = counts(&index, &keys, &refs, Instant::now());
        let want: Vec<usize> = (0..50).map(|i| i % 9).collect();
        assert_eq!(got, want);
        let mut out = Vec::new();
        index.matched_slots(&keys, &mut out);
        assert_eq!(out.len(), want.iter().filter(|&&n| n > 0).count());
        index.matched_slots(&[], &mut out);
        assert!(out.is_empty());
        assert_eq!(index.matched(&[], &refs), vec![0; 50]);
    }

    #[test]
    fn forgotten_endpoints_free_their_slot() {
        let index = KvIndex::new("p", DEFAULT_CAPACITY);
        let t = tokens(BS, 11);
        index.apply("a", &[stored(1, None, &t)]);
        let old = index.slot("a");
        index.forget_endpoint("a");
        assert_eq!(index.blocks(), 0);
        assert_eq!(index.label(old), None);
        let new = index.slot("b");
        assert_ne!(old, new);
        assert_eq!(index.label(new).as_deref(), Some("b"));
        let mut out = Vec::new();
        index.matched_slots(&chain_keys(&t, BS), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn the_routed_history_outlives_evictions_within_its_bound() {
        let index = KvIndex::new("p", 4);
        let t = tokens(4 * BS, 12);
        let keys = chain_keys(&t, BS);
        index.remember_routed("a", &keys, Duration::from_secs(60));
        index.apply("a", &[stored(1, None, &t)]);
        assert_eq!(index.matched(&keys, &["a"]), vec![4]);
        // The engine evicts and then clears: the index forgets, the history does not.
        index.apply(
            "a",
            &[KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![EngineHash::from(1u64)],
                ..BlockRemoved::default()
            })],
        );
        index.clear_endpoint("a");
        assert_eq!(index.matched(&keys, &["a"]), vec![0]);
        assert_eq!(index.matched_routed(&keys, &["a", "b"]), vec![4, 0]);
        // Bounded like the index, and not counted in the index's own blocks.
        let routed = index.routed.as_deref().expect("history");
        for salt in 13..20 {
            let other = chain_keys(&tokens(8 * BS, salt), BS);
            index.remember_routed("b", &other, Duration::from_secs(60));
            assert!(routed.blocks() <= 4);
        }
        assert_eq!(index.blocks(), 0);
        // Forgotten with the endpoint.
        assert_eq!(index.matched_routed(&keys, &["a"]), vec![4]);
        index.forget_endpoint("a");
        assert_eq!(index.matched_routed(&keys, &["a"]), vec![0]);
    }
}
