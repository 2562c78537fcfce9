//! Token ids cached by prompt segment: a chat is sent whole again every turn, and the text from
//! one special token to the next always tokenizes alike, so only a turn's new messages are
//! tokenized.
//!
//! A rendered prompt is cut right before each occurrence of a *splitting* token: a special token
//! the tokenizer always matches as itself (not normalized, no `lstrip` / `rstrip` /
//! `single_word`, no other added token that could match across it). Hugging Face tokenizers cut
//! their input at such tokens before anything else runs (the normalizer, the pre-tokenizer and
//! the model work on the pieces between them, each starting where it starts in the whole), so the
//! ids of the whole prompt are the ids of its segments, concatenated. Tokenizers that truncate,
//! pad or encode special tokens as text get no splitting token (no cache).
//!
//! One encode in [`VERIFY_EVERY`] is still checked against the whole prompt's ids; a difference
//! turns the cache off for good (and the whole prompt's ids are returned).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use tokenizers::Tokenizer;

/// Every this many cached encodes, the whole prompt is tokenized too and compared.
pub(crate) const VERIFY_EVERY: u64 = 64;
/// The most bytes (segment text plus ids) the cache keeps.
const BUDGET_BYTES: usize = 64 << 20;

/// Segment ids by segment text, least recently used first out.
struct Lru {
    entries: LruCache<String, Arc<[u32]>>,
    bytes: usize,
}

/// What a tokenizer's cache of tokenized prompt segments did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentStats {
    /// Segments found in the cache.
    pub hits: u64,
    /// Segments tokenized.
    pub misses: u64,
    /// Whether the cache is in use (it has splitting tokens and never disagreed with the whole).
    pub enabled: bool,
}

/// The cache of one tokenizer.
pub(crate) struct SegmentCache {
    /// The splitting tokens' text.
    splitters: Vec<String>,
    lru: Mutex<Lru>,
    encodes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    off: AtomicBool,
}

fn bytes(text: &str, ids: &[u32]) -> usize {
    text.len() + std::mem::size_of_val(ids) + 64
}

impl SegmentCache {
    /// The cache for `tokenizer`: off when it has no splitting token.
    pub(crate) fn new(tokenizer: &Tokenizer) -> Self {
        let splitters = splitters(tokenizer);
        SegmentCache {
            off: AtomicBool::new(splitters.is_empty()),
            splitters,
            lru: Mutex::new(Lru {
                entries: LruCache::unbounded(),
                bytes: 0,
            }),
            encodes: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// What the cache did so far.
    pub(crate) fn stats(&self) -> SegmentStats {
        SegmentStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            enabled: !self.off.load(Ordering::Relaxed),
        }
    }

    /// `text`'s ids as `tokenizer.encode_fast(text, false)` gives them.
    pub(crate) fn encode(&self, tokenizer: &Tokenizer, text: &str) -> tokenizers::Result<Vec<u32>> {
        if self.off.load(Ordering::Relaxed) {
            return whole(tokenizer, text);
        }
        let mut ids = Vec::new();
        for segment in self.segments(text) {
            ids.extend_from_slice(&self.segment(tokenizer, segment)?);
        }
        if self
            .encodes
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(VERIFY_EVERY)
        {
            let expected = whole(tokenizer, text)?;
            if expected != ids {
                self.off.store(true, Ordering::Relaxed);
                return Ok(expected);
            }
        }
        Ok(ids)
    }

    /// `text` cut right before every splitting token (no empty segment).
    fn segments<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut cuts: Vec<usize> = self
            .splitters
            .iter()
            .flat_map(|s| text.match_indices(s.as_str()).map(|(at, _)| at))
            .filter(|&at| at > 0)
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut out = Vec::with_capacity(cuts.len() + 1);
        let mut start = 0;
        for cut in cuts {
            out.push(&text[start..cut]);
            start = cut;
        }
        out.push(&text[start..]);
        out
    }

    fn segment(&self, tokenizer: &Tokenizer, text: &str) -> tokenizers::Result<Arc<[u32]>> {
        if let Some(ids) = self.locked().entries.get(text).cloned() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(ids);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let ids: Arc<[u32]> = whole(tokenizer, text)?.into();
        let size = bytes(text, &ids);
        if size <= BUDGET_BYTES / 16 {
            let mut lru = self.locked();
            if let Some(old) = lru.entries.put(text.to_owned(), ids.clone()) {
                lru.bytes -= bytes(text, &old);
            }
            lru.bytes += size;
            while lru.bytes > BUDGET_BYTES {
                match lru.entries.pop_lru() {
                    Some((k, v)) => lru.bytes -= bytes(&k, &v),
                    None => break,
                }
            }
        }
        Ok(ids)
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn whole(tokenizer: &Tokenizer, text: &str) -> tokenizers::Result<Vec<u32>> {
    Ok(tokenizer.encode_fast(text, false)?.get_ids().to_vec())
}

/// The special tokens `tokenizer` always matches as themselves, where a prompt can be cut.
fn splitters(tokenizer: &Tokenizer) -> Vec<String> {
    if tokenizer.get_truncation().is_some()
        || tokenizer.get_padding().is_some()
        || tokenizer.get_added_vocabulary().get_encode_special_tokens()
    {
        return Vec::new();
    }
    let added: Vec<_> = tokenizer.get_added_tokens_decoder().into_values().collect();
    added
        .iter()
        .filter(|t| t.special && !t.normalized && !t.lstrip && !t.rstrip && !t.single_word)
        .filter(|t| !t.content.is_empty())
        .filter(|s| {
            added
                .iter()
                .filter(|a| a.content != s.content)
                .all(|a| !overlaps(&a.content, &s.content))
        })
        .map(|t| t.content.clone())
        .collect()
}

/// Whether a match of `other` could take in the start of `splitter` (so that the splitter would
/// not be matched where it starts): `other` contains it, or ends with a beginning of it.
fn overlaps(other: &str, splitter: &str) -> bool {
    other.contains(splitter)
        || splitter
            .char_indices()
            .skip(1)
            .any(|(at, _)| other.ends_with(&splitter[..at]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_that_can_match_across_a_splitter_disqualifies_it() {
        assert!(overlaps("<|im_start|>assistant", "<|im_start|>"));
        assert!(overlaps("x<|im", "<|im_start|>"));
        assert!(!overlaps("<|im_end|>", "<|im_start|>"));
        assert!(!overlaps("start|>", "<|im_start|>"));
    }
}
