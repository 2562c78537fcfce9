//! vLLM's KV-cache events and their msgpack bytes, as msgspec encodes them
//! (`vllm/distributed/kv_events.py`, vLLM 0.34.0; the array layout is vLLM 0.23.0's).
//!
//! * The batch is `KVEventBatch(array_like=True, omit_defaults=True)`:
//!   `[ts: float64, events: [...], data_parallel_rank: int]`. The publisher sets the rank
//!   (0 here), so it is always present.
//! * Each event is a tagged struct with `omit_defaults=True`. [`KvEventsWire::Map`] (vLLM 0.24
//!   and later) writes a map whose first key is `"type"`, then the fields in declaration
//!   order, fields equal to their default omitted; msgspec sizes the map header for every
//!   declared field, so `BlockStored` (15 fields in 0.34) takes a `map16` header.
//!   [`KvEventsWire::Array`] (vLLM 0.23 and earlier, `array_like=True`) writes the tag then
//!   every field: msgspec omits nothing from array-like structs.
//! * What the engine fills in for a plain full-attention model, as vLLM does:
//!   `BlockStored{block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium:
//!   "GPU", lora_name, extra_keys: one entry per block (None, or `[lora_name]`), group_idx:
//!   0, kv_cache_spec_kind: "full_attention"}` (the later fields are None: omitted from the
//!   map; in the 0.23 array only `kv_cache_spec_sliding_window` follows, written as nil);
//!   `BlockRemoved{block_hashes: [one hash], medium: "GPU", group_idx: 0}`;
//!   `AllBlocksCleared{}`.
//! * Integers use msgpack's smallest form (positive ones unsigned), strings the smallest
//!   `str` header, as msgspec does.

use std::io;
use std::sync::Arc;

use rmp::encode;

use super::config::{BlockHashFormat, KvEventsWire};
use crate::tokenizer::TokenId;

/// vLLM's `MEDIUM_GPU`.
pub const MEDIUM_GPU: &str = "GPU";
/// The cache-spec kind of a full-attention KV cache group.
pub const FULL_ATTENTION: &str = "full_attention";

/// One KV-cache event.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    /// Full blocks of a request got their hashes and became hittable.
    BlockStored(BlockStored),
    /// A cached block was reused for something else: its hash can no longer hit.
    BlockRemoved {
        /// The hashes removed (vLLM sends one per event).
        block_hashes: Vec<u64>,
    },
    /// The prefix cache was reset.
    AllBlocksCleared,
}

/// The fields of a `BlockStored` event the engine knows.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockStored {
    /// Hashes of the newly cached blocks, in order; each chains the previous one.
    pub block_hashes: Vec<u64>,
    /// Hash of the block before the first one, `None` for a sequence's first block.
    pub parent_block_hash: Option<u64>,
    /// The blocks' token ids, concatenated.
    pub token_ids: Vec<TokenId>,
    /// Tokens per block.
    pub block_size: usize,
    /// The request's LoRA adapter: vLLM's `lora_int_id` (1-based, in `--lora-modules`
    /// order) and its name.
    pub lora: Option<(u32, Arc<str>)>,
}

/// The events of one engine step, as vLLM's scheduler publishes them.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// Wall-clock time of the batch, seconds since the Unix epoch.
    pub ts: f64,
    /// The events, in the order the block pool produced them.
    pub events: Vec<KvEvent>,
    /// vLLM's data-parallel rank (0: the simulator is one engine).
    pub data_parallel_rank: u32,
}

/// Writing msgpack into memory failed (it cannot, short of running out of memory).
#[derive(Debug, thiserror::Error)]
#[error("msgpack encoding failed: {0}")]
pub struct EncodeError(String);

impl From<encode::ValueWriteError<io::Error>> for EncodeError {
    fn from(e: encode::ValueWriteError<io::Error>) -> Self {
        EncodeError(e.to_string())
    }
}

impl From<io::Error> for EncodeError {
    fn from(e: io::Error) -> Self {
        EncodeError(e.to_string())
    }
}

/// The msgpack payload of a batch, byte for byte what vLLM's msgspec encoder writes.
pub fn encode_batch(
    batch: &EventBatch,
    wire: KvEventsWire,
    hashes: BlockHashFormat,
) -> Result<Vec<u8>, EncodeError> {
    let mut w = Writer {
        buf: Vec::with_capacity(64 + batch.events.len() * 32),
        wire,
        hashes,
    };
    encode::write_array_len(&mut w.buf, 3)?;
    encode::write_f64(&mut w.buf, batch.ts)?;
    w.len(batch.events.len())?;
    for ev in &batch.events {
        w.event(ev)?;
    }
    encode::write_uint(&mut w.buf, u64::from(batch.data_parallel_rank))?;
    Ok(w.buf)
}

struct Writer {
    buf: Vec<u8>,
    wire: KvEventsWire,
    hashes: BlockHashFormat,
}

impl Writer {
    fn len(&mut self, n: usize) -> Result<(), EncodeError> {
        encode::write_array_len(&mut self.buf, to_u32(n)?)?;
        Ok(())
    }

    fn str(&mut self, s: &str) -> Result<(), EncodeError> {
        encode::write_str(&mut self.buf, s)?;
        Ok(())
    }

    fn uint(&mut self, v: u64) -> Result<(), EncodeError> {
        encode::write_uint(&mut self.buf, v)?;
        Ok(())
    }

    fn nil(&mut self) -> Result<(), EncodeError> {
        encode::write_nil(&mut self.buf)?;
        Ok(())
    }

    fn hash(&mut self, h: u64) -> Result<(), EncodeError> {
        match self.hashes {
            BlockHashFormat::Int => self.uint(h),
            BlockHashFormat::Bytes => {
                encode::write_bin(&mut self.buf, &h.to_be_bytes())?;
                Ok(())
            }
        }
    }

    fn hashes(&mut self, hs: &[u64]) -> Result<(), EncodeError> {
        self.len(hs.len())?;
        for &h in hs {
            self.hash(h)?;
        }
        Ok(())
    }

    /// The start of a tagged struct: in the map layout a map of `present` entries (tag
    /// included) whose header is sized for `declared` entries, as msgspec sizes it before
    /// omitting defaults (16 or more takes a `map16` header); in the array layout an array of
    /// `declared` elements (msgspec omits nothing from array-like structs).
    fn open(&mut self, tag: &str, present: u32, declared: u32) -> Result<(), EncodeError> {
        match self.wire {
            KvEventsWire::Map => {
                if declared < 16 {
                    encode::write_map_len(&mut self.buf, present)?;
                } else {
                    let n = u16::try_from(present)
                        .map_err(|_| EncodeError(format!("{present} map entries")))?;
                    self.buf.push(0xde);
                    self.buf.extend_from_slice(&n.to_be_bytes());
                }
                self.str("type")?;
            }
            KvEventsWire::Array => {
                encode::write_array_len(&mut self.buf, declared)?;
            }
        }
        self.str(tag)
    }

    /// A field's key (maps only).
    fn key(&mut self, name: &str) -> Result<(), EncodeError> {
        match self.wire {
            KvEventsWire::Map => self.str(name),
            KvEventsWire::Array => Ok(()),
        }
    }

    fn event(&mut self, ev: &KvEvent) -> Result<(), EncodeError> {
        match ev {
            KvEvent::BlockStored(s) => self.block_stored(s),
            KvEvent::BlockRemoved { block_hashes } => {
                // vLLM 0.34 declares block_hashes, medium, group_idx, locality, ownership
                // (the last two None, omitted); vLLM 0.23 the first three.
                let declared = match self.wire {
                    KvEventsWire::Map => 6,
                    KvEventsWire::Array => 4,
                };
                self.open("BlockRemoved", 4, declared)?;
                self.key("block_hashes")?;
                self.hashes(block_hashes)?;
                self.key("medium")?;
                self.str(MEDIUM_GPU)?;
                self.key("group_idx")?;
                self.uint(0)
            }
            KvEvent::AllBlocksCleared => self.open("AllBlocksCleared", 1, 1),
        }
    }

    fn block_stored(&mut self, s: &BlockStored) -> Result<(), EncodeError> {
        // vLLM 0.34 declares 15 fields: seven required ones, then extra_keys, group_idx,
        // kv_cache_spec_kind (set, so written), kv_cache_spec_sliding_window, locality,
        // ownership, session_id and lookahead_token_ids (None, omitted). vLLM 0.23 declares
        // the first eleven and writes them all.
        let declared = match self.wire {
            KvEventsWire::Map => 16,
            KvEventsWire::Array => 12,
        };
        self.open("BlockStored", 11, declared)?;
        self.key("block_hashes")?;
        self.hashes(&s.block_hashes)?;
        self.key("parent_block_hash")?;
        match s.parent_block_hash {
            Some(h) => self.hash(h)?,
            None => self.nil()?,
        }
        self.key("token_ids")?;
        self.len(s.token_ids.len())?;
        for &t in &s.token_ids {
            self.uint(u64::from(t))?;
        }
        self.key("block_size")?;
        self.uint(s.block_size as u64)?;
        self.key("lora_id")?;
        match &s.lora {
            Some((id, _)) => self.uint(u64::from(*id))?,
            None => self.nil()?,
        }
        self.key("medium")?;
        self.str(MEDIUM_GPU)?;
        self.key("lora_name")?;
        match &s.lora {
            Some((_, name)) => self.str(name)?,
            None => self.nil()?,
        }
        // One entry per block: the untagged extra keys of its hash (the adapter name), or
        // None.
        self.key("extra_keys")?;
        self.len(s.block_hashes.len())?;
        for _ in &s.block_hashes {
            match &s.lora {
                Some((_, name)) => {
                    self.len(1)?;
                    self.str(name)?;
                }
                None => self.nil()?,
            }
        }
        self.key("group_idx")?;
        self.uint(0)?;
        self.key("kv_cache_spec_kind")?;
        self.str(FULL_ATTENTION)?;
        if self.wire == KvEventsWire::Array {
            self.nil()?; // kv_cache_spec_sliding_window
        }
        Ok(())
    }
}

fn to_u32(n: usize) -> Result<u32, EncodeError> {
    u32::try_from(n).map_err(|_| EncodeError(format!("{n} items do not fit a msgpack array")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn plain_batch() -> EventBatch {
        EventBatch {
            ts: 1_757_500_000.25,
            events: vec![
                KvEvent::BlockStored(BlockStored {
                    block_hashes: vec![1, u64::MAX, 300],
                    parent_block_hash: None,
                    token_ids: (0..48).map(|i| i * 3000).collect(),
                    block_size: 16,
                    lora: None,
                }),
                KvEvent::BlockRemoved {
                    block_hashes: vec![1 << 63],
                },
                KvEvent::AllBlocksCleared,
            ],
            data_parallel_rank: 0,
        }
    }

    fn lora_batch() -> EventBatch {
        EventBatch {
            ts: 2.0,
            events: vec![KvEvent::BlockStored(BlockStored {
                block_hashes: vec![5],
                parent_block_hash: Some(u64::MAX),
                token_ids: vec![1, 2],
                block_size: 2,
                lora: Some((1, "sql-lora".into())),
            })],
            data_parallel_rank: 0,
        }
    }

    // Golden bytes: msgspec 0.19.0 and 0.23.0 (identical) encoding vLLM's own structs, the
    // class definitions executed from the vllm-0.34.0 and vllm-0.23.0 sdists on PyPI, filled
    // as vLLM's block pool fills them (ints: default hashes; the LoRA case with
    // VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0 and 8-byte hashes).
    const TOKENS_HEX: &str = "dc003000cd0bb8cd1770cd2328cd2ee0cd3a98cd4650cd5208cd5dc0cd6978cd7530cd80e8cd8ca0cd9858cda410cdafc8cdbb80cdc738cdd2f0cddea8cdea60cdf618ce000101d0ce00010d88ce00011940ce000124f8ce000130b0ce00013c68ce00014820ce000153d8ce00015f90ce00016b48ce00017700ce000182b8ce00018e70ce00019a28ce0001a5e0ce0001b198ce0001bd50ce0001c908ce0001d4c0ce0001e078ce0001ec30ce0001f7e8ce000203a0ce00020f58ce00021b10ce000226c8";

    #[test]
    fn map_layout_is_msgspecs_for_vllm_0_34() {
        let got = encode_batch(&plain_batch(), KvEventsWire::Map, BlockHashFormat::Int).unwrap();
        let want = format!(
            "93cb41da30549810000093de000ba474797065ab426c6f636b53746f726564ac626c6f636b5f6861736865739301cfffffffffffffffffcd012cb1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473{TOKENS_HEX}aa626c6f636b5f73697a6510a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c0aa65787472615f6b65797393c0c0c0a967726f75705f69647800b26b765f63616368655f737065635f6b696e64ae66756c6c5f617474656e74696f6e84a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657391cf8000000000000000a66d656469756da3475055a967726f75705f6964780081a474797065b0416c6c426c6f636b73436c656172656400"
        );
        assert_eq!(hex(&got), want);
        let got = encode_batch(&lora_batch(), KvEventsWire::Map, BlockHashFormat::Bytes).unwrap();
        assert_eq!(
            hex(&got),
            "93cb400000000000000091de000ba474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391c4080000000000000005b1706172656e745f626c6f636b5f68617368c408ffffffffffffffffa9746f6b656e5f696473920102aa626c6f636b5f73697a6502a76c6f72615f696401a66d656469756da3475055a96c6f72615f6e616d65a873716c2d6c6f7261aa65787472615f6b6579739191a873716c2d6c6f7261a967726f75705f69647800b26b765f63616368655f737065635f6b696e64ae66756c6c5f617474656e74696f6e00"
        );
    }

    #[test]
    fn array_layout_is_msgspecs_for_vllm_0_23() {
        let got = encode_batch(&plain_batch(), KvEventsWire::Array, BlockHashFormat::Int).unwrap();
        let want = format!(
            "93cb41da305498100000939cab426c6f636b53746f7265649301cfffffffffffffffffcd012cc0{TOKENS_HEX}10c0a3475055c093c0c0c000ae66756c6c5f617474656e74696f6ec094ac426c6f636b52656d6f76656491cf8000000000000000a34750550091b0416c6c426c6f636b73436c656172656400"
        );
        assert_eq!(hex(&got), want);
        let got = encode_batch(&lora_batch(), KvEventsWire::Array, BlockHashFormat::Bytes).unwrap();
        assert_eq!(
            hex(&got),
            "93cb4000000000000000919cab426c6f636b53746f72656491c4080000000000000005c408ffffffffffffffff9201020201a3475055a873716c2d6c6f72619191a873716c2d6c6f726100ae66756c6c5f617474656e74696f6ec000"
        );
    }
}
