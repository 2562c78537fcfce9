//! The embedded store's prefix index: block key → the endpoints that hold that prefix (most
//! recent first, at most [`MAX_HOLDERS`]), each key with a sliding TTL. Bounded: at most
//! `capacity` keys, the least recently written evicted first, so a flood of unique prompts
//! cannot grow the process. Expiry pops from the least recently written end, so it costs what
//! it removes, not a scan of the index.

use std::num::NonZeroUsize;
use std::time::Instant;

use lru::LruCache;

use super::MAX_HOLDERS;

/// Keys the index holds by default per pool: about 40 MiB, the chains of 512 MiB of prompts.
pub const DEFAULT_PREFIX_KEYS: NonZeroUsize = match NonZeroUsize::new(1 << 18) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};

struct Entry {
    holders: Vec<String>,
    expires: Instant,
}

/// One pool's prefix index.
pub(super) struct PrefixIndex {
    /// Grown as keys come (a bounded `LruCache` would allocate its whole table up front).
    entries: LruCache<u64, Entry>,
    capacity: NonZeroUsize,
}

impl PrefixIndex {
    pub(super) fn new(capacity: NonZeroUsize) -> Self {
        PrefixIndex {
            entries: LruCache::unbounded(),
            capacity,
        }
    }

    /// The number of leading blocks of `chain` held by a candidate, and the candidates holding
    /// the last of them (indices into `candidates`). Reading does not refresh anything.
    pub(super) fn holders(
        &self,
        candidates: &[&str],
        chain: &[u64],
        now: Instant,
    ) -> (usize, Vec<usize>) {
        let mut matched = 0;
        let mut holders = Vec::new();
        for key in chain {
            let Some(entry) = self.entries.peek(key).filter(|e| e.expires > now) else {
                break;
            };
            let held: Vec<usize> = (0..candidates.len())
                .filter(|i| entry.holders.iter().any(|h| h == candidates[*i]))
                .collect();
            if held.is_empty() {
                break;
            }
            matched += 1;
            holders = held;
        }
        (matched, holders)
    }

    /// Record `endpoint` as the most recent holder of every block of `chain`, until `expires`.
    pub(super) fn record(&mut self, chain: &[u64], endpoint: &str, expires: Instant, now: Instant) {
        for key in chain {
            match self.entries.get_mut(key) {
                Some(entry) => {
                    if entry.expires <= now {
                        entry.holders.clear();
                    }
                    // The usual hit: already its most recent holder, nothing to move.
                    if entry.holders.first().map(String::as_str) != Some(endpoint) {
                        entry.holders.retain(|h| h != endpoint);
                        entry.holders.insert(0, endpoint.to_owned());
                        entry.holders.truncate(MAX_HOLDERS);
                    }
                    entry.expires = expires;
                }
                None => {
                    let holders = vec![endpoint.to_owned()];
                    self.entries.push(*key, Entry { holders, expires });
                    if self.entries.len() > self.capacity.get() {
                        self.entries.pop_lru();
                    }
                }
            }
        }
    }

    /// Record `endpoint` as the only holder of every block of `chain` (earlier holders
    /// forgotten), until `expires`.
    pub(super) fn bind(&mut self, chain: &[u64], endpoint: &str, expires: Instant, now: Instant) {
        for key in chain {
            if let Some(entry) = self.entries.peek_mut(key) {
                entry.holders.retain(|h| h == endpoint);
            }
        }
        self.record(chain, endpoint, expires, now);
    }

    /// Drop the keys past their TTL, from the least recently written end.
    pub(super) fn expire(&mut self, now: Instant) {
        while self
            .entries
            .peek_lru()
            .is_some_and(|(_, e)| e.expires <= now)
        {
            self.entries.pop_lru();
        }
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_flood_of_unique_prompts_is_bounded_and_recent_ones_still_match() {
        let mut index = PrefixIndex::new(NonZeroUsize::new(1000).expect("cap"));
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        index.record(&[1, 2, 3], "a", later, now);
        for i in 0..10_000u64 {
            index.record(&[1_000_000 + 4 * i, 1_000_001 + 4 * i], "b", later, now);
            // A conversation in use stays: each turn writes its chain again.
            if i % 100 == 0 {
                index.record(&[1, 2, 3], "a", later, now);
            }
        }
        assert_eq!(index.len(), 1000);
        assert_eq!(index.holders(&["a", "b"], &[1, 2, 3, 4], now), (3, vec![0]));
        // The oldest of the flood is gone, the newest is there.
        assert_eq!(index.holders(&["b"], &[1_000_000, 1_000_001], now).0, 0);
        assert_eq!(index.holders(&["b"], &[1_039_996, 1_039_997], now).0, 2);
    }

    #[test]
    fn expiry_pops_what_is_past_its_ttl_and_stops_there() {
        let mut index = PrefixIndex::new(NonZeroUsize::new(100).expect("cap"));
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        index.record(&[1, 2], "a", t0 + s, t0);
        index.record(&[3], "b", t0 + 3 * s, t0 + s);
        // A read does not refresh: key 1 still expires first.
        assert_eq!(index.holders(&["a"], &[1, 2], t0).0, 2);
        index.expire(t0 + 2 * s);
        assert_eq!(index.len(), 1);
        assert_eq!(index.holders(&["b"], &[3], t0 + 2 * s), (1, vec![0]));
        // An expired holder list is replaced, not extended.
        index.record(&[3], "c", t0 + 9 * s, t0 + 4 * s);
        assert_eq!(index.holders(&["b", "c"], &[3], t0 + 4 * s), (1, vec![1]));
    }
}
