//! vLLM V1's KV block pool with automatic prefix caching.
//!
//! * Only full blocks are hashed; block `i`'s hash chains the hash of block `i-1`, the block's
//!   token ids and the extra keys (the LoRA adapter), so equal hashes mean equal prefixes.
//! * Blocks in use are reference-counted. A block whose count drops to zero keeps its hash and
//!   goes to the tail of the free queue (a request's blocks in reverse order, so its last
//!   block is evicted first); new blocks are taken from the head, evicting the hash they
//!   carried. Unreferenced cached blocks therefore leave in LRU order.
//! * Block 0 is vLLM's null block: never allocated, so usage = `1 - free / (blocks - 1)`.
//! * With KV events enabled ([`KvCache::enable_events`]) the pool queues what vLLM's block
//!   pool queues: `BlockRemoved` for each hash evicted by [`KvCache::allocate`],
//!   `AllBlocksCleared` on [`KvCache::reset_prefix_cache`]; the scheduler adds `BlockStored`
//!   for the blocks [`KvCache::cache`] newly hashes. [`KvCache::take_events`] drains the queue.

use std::collections::HashMap;

use xxhash_rust::xxh3::Xxh3;

use crate::kv_events::KvEvent;
use crate::tokenizer::TokenId;

/// Index of a block in the pool.
pub type BlockId = u32;

const NIL: BlockId = BlockId::MAX;
/// Parent "hash" of the first block of every sequence.
const NONE_HASH: u64 = 0x9e37_79b9_7f4a_7c15;

/// The hash of one full block: parent hash, token ids, extra keys.
pub fn hash_block(parent: Option<u64>, tokens: &[TokenId], extra: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&parent.unwrap_or(NONE_HASH).to_le_bytes());
    h.update(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    h.update(&(extra.len() as u32).to_le_bytes());
    h.update(extra);
    h.digest()
}

/// Extends `hashes` with the hashes of every full block of `tokens` not yet hashed.
pub fn extend_block_hashes(
    hashes: &mut Vec<u64>,
    tokens: &[TokenId],
    block_size: usize,
    extra: &[u8],
) {
    let full = tokens.len() / block_size;
    while hashes.len() < full {
        let i = hashes.len();
        let parent = hashes.last().copied();
        hashes.push(hash_block(
            parent,
            &tokens[i * block_size..(i + 1) * block_size],
            extra,
        ));
    }
}

#[derive(Debug, Clone)]
struct Block {
    ref_cnt: u32,
    hash: Option<u64>,
    prev: BlockId,
    next: BlockId,
    in_free: bool,
}

/// The block pool.
#[derive(Debug)]
pub struct KvCache {
    block_size: usize,
    blocks: Vec<Block>,
    head: BlockId,
    tail: BlockId,
    free_len: usize,
    cached: HashMap<u64, Vec<BlockId>>,
    /// Queued KV events; `None` while events are disabled.
    events: Option<Vec<KvEvent>>,
}

impl KvCache {
    /// A pool of `num_blocks` blocks (block 0 reserved) of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        let n = num_blocks.clamp(1, NIL as usize - 1);
        let mut kv = KvCache {
            block_size: block_size.max(1),
            blocks: vec![
                Block {
                    ref_cnt: 0,
                    hash: None,
                    prev: NIL,
                    next: NIL,
                    in_free: false,
                };
                n
            ],
            head: NIL,
            tail: NIL,
            free_len: 0,
            cached: HashMap::new(),
            events: None,
        };
        kv.blocks[0].ref_cnt = 1; // the null block is never free
        for id in 1..n as BlockId {
            kv.push_tail(id);
        }
        kv
    }

    /// Starts queueing KV events (vLLM's `enable_kv_cache_events`).
    pub fn enable_events(&mut self) {
        self.events.get_or_insert_with(Vec::new);
    }

    /// Whether KV events are queued.
    pub fn events_enabled(&self) -> bool {
        self.events.is_some()
    }

    /// Queues an event (dropped while events are disabled).
    pub fn push_event(&mut self, event: KvEvent) {
        if let Some(q) = &mut self.events {
            q.push(event);
        }
    }

    /// Takes every queued event (vLLM's `take_events`).
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that can ever be allocated (null block excluded).
    pub fn usable(&self) -> usize {
        self.blocks.len() - 1
    }

    /// Blocks not referenced by any request (cached or empty).
    pub fn num_free(&self) -> usize {
        self.free_len
    }

    /// Fraction of usable blocks referenced by requests (vLLM `kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        if self.usable() == 0 {
            return 0.0;
        }
        1.0 - self.free_len as f64 / self.usable() as f64
    }

    /// Number of blocks that carry a hash (hittable).
    pub fn num_cached(&self) -> usize {
        self.cached.values().map(Vec::len).sum()
    }

    /// The blocks holding the longest cached run of `hashes` from the start.
    pub fn lookup(&self, hashes: &[u64]) -> Vec<BlockId> {
        hashes
            .iter()
            .map_while(|h| self.cached.get(h).and_then(|ids| ids.first().copied()))
            .collect()
    }

    /// How many of `ids` sit in the free queue (touching them takes them out of it).
    pub fn count_free(&self, ids: &[BlockId]) -> usize {
        ids.iter()
            .filter(|&&id| self.blocks.get(id as usize).is_some_and(|b| b.in_free))
            .count()
    }

    /// Takes a reference on each block, removing unreferenced ones from the free queue.
    pub fn touch(&mut self, ids: &[BlockId]) {
        for &id in ids {
            if self.blocks[id as usize].in_free {
                self.unlink(id);
            }
            self.blocks[id as usize].ref_cnt += 1;
        }
    }

    /// Takes `n` blocks from the head of the free queue, evicting the hashes they carried
    /// (one `BlockRemoved` event each). `None` (and nothing taken) when fewer than `n` are
    /// free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free_len {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.head;
            self.unlink(id);
            if let Some(h) = self.blocks[id as usize].hash.take() {
                if let Some(ids) = self.cached.get_mut(&h) {
                    ids.retain(|&b| b != id);
                    if ids.is_empty() {
                        self.cached.remove(&h);
                    }
                }
                self.push_event(KvEvent::BlockRemoved {
                    block_hashes: vec![h],
                });
            }
            self.blocks[id as usize].ref_cnt = 1;
            out.push(id);
        }
        Some(out)
    }

    /// Records that full block `id` holds the prefix with hash `hash`; `false` (no-op) if the
    /// block already has a hash.
    pub fn cache(&mut self, id: BlockId, hash: u64) -> bool {
        let b = &mut self.blocks[id as usize];
        if b.hash.is_some() || id == 0 {
            return false;
        }
        b.hash = Some(hash);
        self.cached.entry(hash).or_default().push(id);
        true
    }

    /// vLLM's `reset_prefix_cache`: forgets every hash, only when no request holds a block
    /// (`false` and nothing changed otherwise). Queues `AllBlocksCleared`.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.free_len != self.usable() {
            return false;
        }
        self.cached.clear();
        for b in &mut self.blocks {
            b.hash = None;
        }
        self.push_event(KvEvent::AllBlocksCleared);
        true
    }

    /// Drops one reference on each of a request's blocks; blocks reaching zero go to the
    /// tail of the free queue, the request's last block first.
    pub fn free(&mut self, ids: &[BlockId]) {
        for &id in ids.iter().rev() {
            let b = &mut self.blocks[id as usize];
            if b.ref_cnt == 0 || id == 0 {
                continue;
            }
            b.ref_cnt -= 1;
            if b.ref_cnt == 0 {
                self.push_tail(id);
            }
        }
    }

    fn push_tail(&mut self, id: BlockId) {
        let tail = self.tail;
        {
            let b = &mut self.blocks[id as usize];
            b.prev = tail;
            b.next = NIL;
            b.in_free = true;
        }
        if tail == NIL {
            self.head = id;
        } else {
            self.blocks[tail as usize].next = id;
        }
        self.tail = id;
        self.free_len += 1;
    }

    fn unlink(&mut self, id: BlockId) {
        let (prev, next) = {
            let b = &self.blocks[id as usize];
            (b.prev, b.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let b = &mut self.blocks[id as usize];
        b.prev = NIL;
        b.next = NIL;
        b.in_free = false;
        self.free_len -= 1;
    }
}

/// Cached tokens of a prompt of `num_tokens` tokens with `hit_blocks` leading cached blocks:
/// vLLM always recomputes the last prompt token, so at most `⌊(n−1)/B⌋·B`.
pub fn capped_hit_blocks(hit_blocks: usize, num_tokens: usize, block_size: usize) -> usize {
    hit_blocks.min(num_tokens.saturating_sub(1) / block_size)
}

/// Prompt tokens a request newly wrote to the prefix cache, as vLLM 0.34 reports them
/// (`num_cache_creation_tokens`: `PrefillStats.finalize` at the first output takes the tokens
/// the request's hashed blocks cover, at most the prompt, less those it found cached): its full
/// prompt blocks less its cache hits.
pub fn cache_creation_tokens(
    prompt_tokens: usize,
    cached_tokens: usize,
    block_size: usize,
) -> usize {
    let full = prompt_tokens
        .checked_div(block_size)
        .map_or(0, |blocks| blocks * block_size);
    full.saturating_sub(cached_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_creation_counts_full_prompt_blocks_not_hit() {
        assert_eq!(cache_creation_tokens(40, 0, 16), 32);
        assert_eq!(cache_creation_tokens(40, 16, 16), 16);
        assert_eq!(cache_creation_tokens(40, 32, 16), 0);
        assert_eq!(cache_creation_tokens(15, 0, 16), 0);
        assert_eq!(cache_creation_tokens(32, 16, 16), 16);
        assert_eq!(cache_creation_tokens(32, 16, 0), 0);
    }

    fn hashes(tokens: &[TokenId], extra: &[u8]) -> Vec<u64> {
        let mut h = Vec::new();
        extend_block_hashes(&mut h, tokens, 4, extra);
        h
    }

    /// Allocates, caches and frees a sequence's full blocks as a finished request would.
    fn run(kv: &mut KvCache, hs: &[u64]) -> Vec<BlockId> {
        let hit = kv.lookup(hs);
        kv.touch(&hit);
        let new = kv.allocate(hs.len() - hit.len()).unwrap();
        let mut all = hit.clone();
        all.extend(&new);
        for (id, h) in all.iter().zip(hs) {
            kv.cache(*id, *h);
        }
        kv.free(&all);
        hit
    }

    #[test]
    fn chained_hashes_depend_on_order_and_extra_keys() {
        let a = hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9], b"");
        assert_eq!(a.len(), 2);
        let b = hashes(&[5, 6, 7, 8, 1, 2, 3, 4], b"");
        assert_ne!(a[1], b[1]);
        assert_ne!(a[0], b[1]);
        assert_ne!(hashes(&[1, 2, 3, 4], b"lora")[0], a[0]);
    }

    #[test]
    fn cap_keeps_the_last_token_uncached() {
        assert_eq!(capped_hit_blocks(10, 32, 16), 1);
        assert_eq!(capped_hit_blocks(10, 33, 16), 2);
        assert_eq!(capped_hit_blocks(1, 33, 16), 1);
        assert_eq!(capped_hit_blocks(3, 0, 16), 0);
    }

    #[test]
    fn freed_blocks_stay_hittable_then_leave_in_lru_order() {
        // 6 usable blocks of 4 tokens.
        let mut kv = KvCache::new(7, 4);
        assert_eq!(kv.num_free(), 6);
        let a = hashes(&(0..8).collect::<Vec<_>>(), b"");
        let b = hashes(&(100..108).collect::<Vec<_>>(), b"");
        let c = hashes(&(200..208).collect::<Vec<_>>(), b"");
        assert!(run(&mut kv, &a).is_empty());
        assert!(run(&mut kv, &b).is_empty());
        assert!(run(&mut kv, &c).is_empty());
        assert_eq!(kv.num_free(), 6);
        assert_eq!(kv.usage(), 0.0);
        assert_eq!(kv.lookup(&a).len(), 2);
        // A fourth prefix evicts the least recently used one (a), nothing else.
        let d = hashes(&(300..308).collect::<Vec<_>>(), b"");
        assert!(run(&mut kv, &d).is_empty());
        assert_eq!(kv.lookup(&a).len(), 0);
        assert_eq!(kv.lookup(&b).len(), 2);
        assert_eq!(kv.lookup(&c).len(), 2);
        // Using b makes it recent: the next eviction takes c.
        assert_eq!(run(&mut kv, &b).len(), 2);
        let e = hashes(&(400..408).collect::<Vec<_>>(), b"");
        run(&mut kv, &e);
        assert_eq!(kv.lookup(&c).len(), 0);
        assert_eq!(kv.lookup(&b).len(), 2);
    }

    #[test]
    fn last_block_of_a_request_is_evicted_first() {
        let mut kv = KvCache::new(4, 4); // 3 usable
        let a = hashes(&(0..12).collect::<Vec<_>>(), b"");
        run(&mut kv, &a);
        let got = kv.allocate(1).unwrap();
        assert_eq!(got.len(), 1);
        // a's first two blocks still hit, the third is gone.
        assert_eq!(kv.lookup(&a).len(), 2);
    }

    #[test]
    fn events_follow_evictions_and_resets() {
        let mut kv = KvCache::new(3, 4); // 2 usable
        let a = hashes(&(0..8).collect::<Vec<_>>(), b"");
        run(&mut kv, &a);
        assert!(kv.take_events().is_empty(), "disabled: nothing queued");
        kv.enable_events();
        // Taking both blocks evicts a's hashes, the last block first.
        let got = kv.allocate(2).unwrap();
        assert_eq!(
            kv.take_events(),
            vec![
                KvEvent::BlockRemoved {
                    block_hashes: vec![a[1]]
                },
                KvEvent::BlockRemoved {
                    block_hashes: vec![a[0]]
                },
            ]
        );
        assert!(kv.cache(got[0], a[0]));
        assert!(!kv.cache(got[0], a[0]), "already hashed");
        // A reset fails while blocks are held, then clears every hash.
        assert!(!kv.reset_prefix_cache());
        assert!(kv.take_events().is_empty());
        kv.free(&got);
        assert!(kv.reset_prefix_cache());
        assert_eq!(kv.take_events(), vec![KvEvent::AllBlocksCleared]);
        assert_eq!(kv.num_cached(), 0);
        assert!(kv.lookup(&a).is_empty());
        // Blocks without hashes evict nothing.
        kv.allocate(2).unwrap();
        assert!(kv.take_events().is_empty());
    }

    #[test]
    fn referenced_blocks_are_used_and_shared() {
        let mut kv = KvCache::new(5, 4); // 4 usable
        let a = hashes(&(0..8).collect::<Vec<_>>(), b"");
        let blocks = kv.allocate(2).unwrap();
        for (id, h) in blocks.iter().zip(&a) {
            kv.cache(*id, *h);
        }
        assert_eq!(kv.usage(), 0.5);
        // A second request shares both blocks while the first runs.
        let hit = kv.lookup(&a);
        assert_eq!(hit, blocks);
        assert_eq!(kv.count_free(&hit), 0);
        kv.touch(&hit);
        assert_eq!(kv.usage(), 0.5);
        kv.free(&blocks);
        assert_eq!(kv.usage(), 0.5);
        kv.free(&hit);
        assert_eq!(kv.usage(), 0.0);
        assert_eq!(kv.count_free(&hit), 2);
        assert!(kv.allocate(5).is_none());
        assert_eq!(kv.num_free(), 4);
        assert_eq!(kv.num_cached(), 2);
    }
}
