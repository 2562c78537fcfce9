//! Token blocks and their chained keys: how llm-lb names what an engine holds in its KV cache.
//!
//! A prompt's token ids are cut into full blocks of `block_size` tokens (a partial last block is
//! never cached by an engine, so it is never keyed). Block *k*'s key hashes its token ids seeded
//! with block *k−1*'s key (the first with [`ROOT`]), so equal keys mean equal prefixes. llm-lb
//! computes these keys itself, both for requests and for the token ids an engine reports in its
//! KV-cache events, so the engine's own hash function and seed never matter (as llm-d does).

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// A block's key: a hash of its tokens and of every block before it.
pub type BlockKey = u64;

/// The "parent key" of a sequence's first block.
pub const ROOT: BlockKey = 0x6c6c_6d2d_6c62_6b76;

/// The key of the block `tokens` that follows the block keyed `parent`.
pub fn block_key(parent: BlockKey, tokens: &[u32]) -> BlockKey {
    let mut bytes = [0u8; 4 * 64];
    if tokens.len() <= 64 {
        for (chunk, t) in bytes.chunks_exact_mut(4).zip(tokens) {
            chunk.copy_from_slice(&t.to_le_bytes());
        }
        return xxh3_64_with_seed(&bytes[..4 * tokens.len()], parent);
    }
    let long: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    xxh3_64_with_seed(&long, parent)
}

/// Appends to `keys` the keys of the full blocks of `tokens` (which follow the block keyed
/// `parent`), and returns the key of the last block (or `parent` when there is none).
pub fn extend_keys(
    parent: BlockKey,
    tokens: &[u32],
    block_size: usize,
    keys: &mut Vec<BlockKey>,
) -> BlockKey {
    let mut prev = parent;
    if block_size == 0 {
        return prev;
    }
    for block in tokens.chunks_exact(block_size) {
        prev = block_key(prev, block);
        keys.push(prev);
    }
    prev
}

/// The keys of every full block of a sequence.
pub fn chain_keys(tokens: &[u32], block_size: usize) -> Vec<BlockKey> {
    let mut keys = Vec::with_capacity(tokens.len() / block_size.max(1));
    extend_keys(ROOT, tokens, block_size, &mut keys);
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_full_blocks_are_keyed_and_keys_chain() {
        let tokens: Vec<u32> = (0..40).collect();
        let keys = chain_keys(&tokens, 16);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0], block_key(ROOT, &tokens[..16]));
        assert_eq!(keys[1], block_key(keys[0], &tokens[16..32]));
        // The same block after a different prefix has a different key.
        assert_ne!(block_key(ROOT, &tokens[16..32]), keys[1]);
    }

    #[test]
    fn a_growing_sequence_extends_its_chain() {
        let tokens: Vec<u32> = (0..100).map(|i| i * 7 + 3).collect();
        let short = chain_keys(&tokens[..50], 16);
        let long = chain_keys(&tokens, 16);
        assert_eq!(&long[..short.len()], &short[..]);
        let mut resumed = short.clone();
        extend_keys(short[2], &tokens[48..], 16, &mut resumed);
        assert_eq!(resumed, long);
    }

    #[test]
    fn long_blocks_hash_like_short_ones_would() {
        let tokens: Vec<u32> = (0..200).collect();
        let manual: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        assert_eq!(block_key(ROOT, &tokens), xxh3_64_with_seed(&manual, ROOT));
        let manual: Vec<u8> = tokens[..10].iter().flat_map(|t| t.to_le_bytes()).collect();
        assert_eq!(
            block_key(ROOT, &tokens[..10]),
            xxh3_64_with_seed(&manual, ROOT)
        );
    }
}
