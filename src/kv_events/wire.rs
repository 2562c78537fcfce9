//! vLLM's KV-event wire format: one ZMQ message → a [`Message`] of decoded [`KvEvent`]s.
//!
//! Followed `vllm/distributed/kv_events.py` at vllm-project/vllm commit
//! `0181ea3173e53eea8cf04a86891488e3dc89bb34` (and its older array-only form at `b4e69e0a`):
//!
//! - A live message has three frames: `[topic, seq, payload]`. `seq` is 8 bytes big-endian (the
//!   publisher counts from 0; the replay end marker is `-1`, so it is read as signed).
//! - `payload` is msgpack of a msgspec `KVEventBatch { ts: float, events: [...],
//!   data_parallel_rank: int | None = None }` with `omit_defaults`. Up to vLLM 0.23 the batch and
//!   its events were `array_like` (`[ts, events, dp_rank?]`, each event `["BlockStored", …]`
//!   tagged by its first element); since vLLM PR #42892 events are maps tagged by their `"type"`
//!   key (`{"type": "BlockStored", "block_hashes": …}`), and the batch is an array or a map
//!   depending on the version. Both shapes are accepted at both levels.
//! - `BlockStored`: `block_hashes, parent_block_hash | nil, token_ids, block_size, lora_id | nil,
//!   medium | nil, lora_name | nil, extra_keys?, group_idx?, …` (newer fields appended, or named).
//!   `BlockRemoved`: `block_hashes, medium | nil, group_idx?, …`. `AllBlocksCleared`: no fields.
//! - A block hash is vLLM's `ExternalBlockHash = bytes | int`: an int is taken as its 64 bits, a
//!   byte string is hashed to 64 bits ([`EngineHash`]). Only equality matters: llm-lb never
//!   interprets an engine's hashes, it recomputes its own keys from the token ids.
//!
//! Unknown trailing (or named) fields are ignored, and events with an unknown tag are skipped and
//! counted ([`KvEventBatch::unknown`]); a known event with a field of the wrong type fails the
//! whole payload ([`WireError`]), since applying the rest of a batch whose meaning is uncertain
//! could leave the index believing what the engine no longer holds.

use rmpv::decode::read_value_ref_with_max_depth;
use rmpv::ValueRef;
use xxhash_rust::xxh3::xxh3_64;

/// An engine's name for a block, as a 64-bit value (see the module docs).
pub type EngineHash = u64;

/// Largest payload decoded. vLLM's batches are one scheduler step's events (kilobytes); a batch
/// of tens of thousands of full 16-token blocks stays far below.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024 * 1024;

/// Nesting accepted in a payload (the schema needs 4 levels; extra keys a few more).
const MAX_DEPTH: usize = 32;

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    /// Not the `[topic, seq, payload]` triple.
    #[error("expected 3 frames (topic, sequence, payload), got {0}")]
    Frames(usize),
    /// The sequence frame is not 8 bytes.
    #[error("sequence frame has {0} bytes, expected 8")]
    Sequence(usize),
    /// The payload is over [`MAX_PAYLOAD_BYTES`].
    #[error("payload of {0} bytes is over the limit of {MAX_PAYLOAD_BYTES}")]
    TooLarge(usize),
    /// The payload is not one msgpack value.
    #[error("payload is not msgpack: {0}")]
    Msgpack(String),
    /// The payload is msgpack but not a `KVEventBatch`.
    #[error("malformed batch: {0}")]
    Batch(&'static str),
    /// A known event has a missing or ill-typed field.
    #[error("malformed {event} event: field {field}")]
    Event {
        /// The event's tag.
        event: &'static str,
        /// The offending field.
        field: &'static str,
    },
}

/// One decoded message of the live stream or of a replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The topic frame (vLLM's configured `topic`, often empty).
    pub topic: Vec<u8>,
    /// The batch's sequence number.
    pub seq: i64,
    /// The decoded batch.
    pub batch: KvEventBatch,
}

/// A decoded `KVEventBatch`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KvEventBatch {
    /// When the engine published it (seconds since the epoch).
    pub ts: f64,
    /// Its events, in order, without the skipped ones.
    pub events: Vec<KvEvent>,
    /// The data-parallel rank that published it, when given.
    pub data_parallel_rank: Option<i64>,
    /// Events skipped because their tag is unknown to llm-lb.
    pub unknown: usize,
}

/// One KV-cache event.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    /// Full blocks entered the cache.
    BlockStored(BlockStored),
    /// Blocks left the cache.
    BlockRemoved(BlockRemoved),
    /// The engine dropped its whole cache (e.g. `reset_prefix_cache`).
    AllBlocksCleared,
}

/// `BlockStored`: consecutive full blocks of one sequence, `block_size` tokens each.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockStored {
    /// The engine's hash of each stored block, in sequence order.
    pub block_hashes: Vec<EngineHash>,
    /// The engine's hash of the block before the first one (`None`: the sequence starts here).
    pub parent_block_hash: Option<EngineHash>,
    /// The stored blocks' tokens, `block_size` per block.
    pub token_ids: Vec<u32>,
    /// Tokens per block.
    pub block_size: usize,
    /// The LoRA adapter's id (deprecated by vLLM in favour of `lora_name`).
    pub lora_id: Option<i64>,
    /// Where the blocks live (`"GPU"`, `"CPU"`, …); `None`: unspecified (GPU).
    pub medium: Option<String>,
    /// The LoRA adapter's name.
    pub lora_name: Option<String>,
    /// Whether any block's hash has extra keys (multi-modal inputs, `cache_salt`, prompt
    /// embeddings, LoRA): then equal tokens do not mean an equal cache entry.
    pub extra_keys: bool,
    /// The KV-cache group (hybrid models have several); `None`: the only one.
    pub group_idx: Option<i64>,
}

/// `BlockRemoved`: blocks evicted from the cache.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockRemoved {
    /// The engine's hash of each removed block.
    pub block_hashes: Vec<EngineHash>,
    /// Where the blocks lived; `None`: unspecified (GPU).
    pub medium: Option<String>,
    /// The KV-cache group; `None`: the only one.
    pub group_idx: Option<i64>,
}

/// Decode one message of the live stream: `[topic, seq, payload]`.
pub fn decode_message<F: AsRef<[u8]>>(frames: &[F]) -> Result<Message, WireError> {
    let [topic, seq, payload] = frames else {
        return Err(WireError::Frames(frames.len()));
    };
    Ok(Message {
        topic: topic.as_ref().to_vec(),
        seq: decode_seq(seq.as_ref())?,
        batch: decode_payload(payload.as_ref())?,
    })
}

/// Decode a sequence frame: 8 bytes, big-endian, signed.
pub fn decode_seq(frame: &[u8]) -> Result<i64, WireError> {
    let bytes: [u8; 8] = frame
        .try_into()
        .map_err(|_| WireError::Sequence(frame.len()))?;
    Ok(i64::from_be_bytes(bytes))
}

/// Decode a payload: one msgpack `KVEventBatch`.
pub fn decode_payload(payload: &[u8]) -> Result<KvEventBatch, WireError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(WireError::TooLarge(payload.len()));
    }
    let mut rest = payload;
    let value = read_value_ref_with_max_depth(&mut rest, MAX_DEPTH)
        .map_err(|e| WireError::Msgpack(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Msgpack(format!(
            "{} bytes after the batch",
            rest.len()
        )));
    }
    let (ts, events, rank) = match value {
        ValueRef::Array(items) => {
            let mut items = items.into_iter();
            (items.next(), items.next(), items.next())
        }
        ValueRef::Map(entries) => {
            let (mut ts, mut events, mut rank) = (None, None, None);
            for (k, v) in entries {
                match as_str(&k) {
                    Some("ts") => ts = Some(v),
                    Some("events") => events = Some(v),
                    Some("data_parallel_rank") => rank = Some(v),
                    Some(_) | None => {}
                }
            }
            (ts, events, rank)
        }
        ValueRef::Nil
        | ValueRef::Boolean(_)
        | ValueRef::Integer(_)
        | ValueRef::F32(_)
        | ValueRef::F64(_)
        | ValueRef::String(_)
        | ValueRef::Binary(_)
        | ValueRef::Ext(..) => return Err(WireError::Batch("not an array or a map")),
    };
    let ts = ts
        .as_ref()
        .and_then(as_f64)
        .ok_or(WireError::Batch("ts is not a number"))?;
    let Some(ValueRef::Array(raw_events)) = events else {
        return Err(WireError::Batch("events is not an array"));
    };
    let data_parallel_rank = match rank {
        None | Some(ValueRef::Nil) => None,
        Some(v) => Some(as_i64(&v).ok_or(WireError::Batch("data_parallel_rank is not an int"))?),
    };
    let mut batch = KvEventBatch {
        ts,
        events: Vec::with_capacity(raw_events.len()),
        data_parallel_rank,
        unknown: 0,
    };
    for raw in raw_events {
        match decode_event(raw)? {
            Some(event) => batch.events.push(event),
            None => batch.unknown += 1,
        }
    }
    Ok(batch)
}

/// The fields of one event, by position (array-like) or by name (map).
enum Fields<'a> {
    Array(Vec<ValueRef<'a>>),
    Map(Vec<(ValueRef<'a>, ValueRef<'a>)>),
}

impl<'a> Fields<'a> {
    /// Field `name`, at `position` among the fields after the tag in the array-like form.
    fn get(&self, position: usize, name: &str) -> Option<&ValueRef<'a>> {
        match self {
            Fields::Array(items) => items.get(position + 1),
            Fields::Map(entries) => entries
                .iter()
                .find(|(k, _)| as_str(k) == Some(name))
                .map(|(_, v)| v),
        }
    }
}

/// `Ok(None)`: an event with an unknown tag, skipped.
fn decode_event(raw: ValueRef<'_>) -> Result<Option<KvEvent>, WireError> {
    let (tag, fields) = match raw {
        ValueRef::Array(items) => {
            let tag = items.first().and_then(as_str).map(str::to_owned);
            (tag, Fields::Array(items))
        }
        ValueRef::Map(entries) => {
            let tag = entries
                .iter()
                .find(|(k, _)| as_str(k) == Some("type"))
                .and_then(|(_, v)| as_str(v))
                .map(str::to_owned);
            (tag, Fields::Map(entries))
        }
        ValueRef::Nil
        | ValueRef::Boolean(_)
        | ValueRef::Integer(_)
        | ValueRef::F32(_)
        | ValueRef::F64(_)
        | ValueRef::String(_)
        | ValueRef::Binary(_)
        | ValueRef::Ext(..) => return Err(WireError::Batch("an event is not an array or a map")),
    };
    let Some(tag) = tag else {
        return Err(WireError::Batch("an event has no tag"));
    };
    match tag.as_str() {
        "BlockStored" => block_stored(&fields).map(|e| Some(KvEvent::BlockStored(e))),
        "BlockRemoved" => block_removed(&fields).map(|e| Some(KvEvent::BlockRemoved(e))),
        "AllBlocksCleared" => Ok(Some(KvEvent::AllBlocksCleared)),
        _ => Ok(None),
    }
}

const STORED: &str = "BlockStored";
const REMOVED: &str = "BlockRemoved";

fn block_stored(f: &Fields<'_>) -> Result<BlockStored, WireError> {
    let bad = |field| WireError::Event {
        event: STORED,
        field,
    };
    let block_hashes = hashes(f.get(0, "block_hashes")).ok_or(bad("block_hashes"))?;
    let parent_block_hash = match f.get(1, "parent_block_hash") {
        None | Some(ValueRef::Nil) => None,
        Some(v) => Some(engine_hash(v).ok_or(bad("parent_block_hash"))?),
    };
    let token_ids = match f.get(2, "token_ids") {
        Some(ValueRef::Array(items)) => items
            .iter()
            .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or(bad("token_ids"))?,
        Some(_) | None => return Err(bad("token_ids")),
    };
    let block_size = f
        .get(3, "block_size")
        .and_then(ValueRef::as_u64)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or(bad("block_size"))?;
    let lora_id = optional(f.get(4, "lora_id"), as_i64).ok_or(bad("lora_id"))?;
    let medium =
        optional(f.get(5, "medium"), |v| as_str(v).map(str::to_owned)).ok_or(bad("medium"))?;
    let lora_name = optional(f.get(6, "lora_name"), |v| as_str(v).map(str::to_owned))
        .ok_or(bad("lora_name"))?;
    let extra_keys = match f.get(7, "extra_keys") {
        None | Some(ValueRef::Nil) => false,
        Some(ValueRef::Array(per_block)) => per_block.iter().any(|k| !is_nil(k)),
        Some(_) => return Err(bad("extra_keys")),
    };
    let group_idx = optional(f.get(8, "group_idx"), as_i64).ok_or(bad("group_idx"))?;
    Ok(BlockStored {
        block_hashes,
        parent_block_hash,
        token_ids,
        block_size,
        lora_id,
        medium,
        lora_name,
        extra_keys,
        group_idx,
    })
}

fn block_removed(f: &Fields<'_>) -> Result<BlockRemoved, WireError> {
    let bad = |field| WireError::Event {
        event: REMOVED,
        field,
    };
    Ok(BlockRemoved {
        block_hashes: hashes(f.get(0, "block_hashes")).ok_or(bad("block_hashes"))?,
        medium: optional(f.get(1, "medium"), |v| as_str(v).map(str::to_owned))
            .ok_or(bad("medium"))?,
        group_idx: optional(f.get(2, "group_idx"), as_i64).ok_or(bad("group_idx"))?,
    })
}

/// An optional field: absent or nil → `Some(None)`; present and well-typed → `Some(Some(x))`;
/// ill-typed → `None`.
fn optional<'a, T>(
    v: Option<&ValueRef<'a>>,
    read: impl Fn(&ValueRef<'a>) -> Option<T>,
) -> Option<Option<T>> {
    match v {
        None => Some(None),
        Some(v) if is_nil(v) => Some(None),
        Some(v) => read(v).map(Some),
    }
}

fn hashes(v: Option<&ValueRef<'_>>) -> Option<Vec<EngineHash>> {
    match v {
        Some(ValueRef::Array(items)) => items.iter().map(engine_hash).collect(),
        Some(_) | None => None,
    }
}

/// An `ExternalBlockHash` (`bytes | int`) as 64 bits.
fn engine_hash(v: &ValueRef<'_>) -> Option<EngineHash> {
    match v {
        // Old vLLM used Python's hash(), which may be negative: keep its two's-complement bits.
        ValueRef::Integer(i) => i.as_u64().or_else(|| i.as_i64().map(|n| n as u64)),
        ValueRef::Binary(bytes) => Some(xxh3_64(bytes)),
        ValueRef::Nil
        | ValueRef::Boolean(_)
        | ValueRef::F32(_)
        | ValueRef::F64(_)
        | ValueRef::String(_)
        | ValueRef::Array(_)
        | ValueRef::Map(_)
        | ValueRef::Ext(..) => None,
    }
}

fn is_nil(v: &ValueRef<'_>) -> bool {
    matches!(v, ValueRef::Nil)
}

fn as_str<'b>(v: &'b ValueRef<'_>) -> Option<&'b str> {
    match v {
        ValueRef::String(s) => s.as_str(),
        ValueRef::Nil
        | ValueRef::Boolean(_)
        | ValueRef::Integer(_)
        | ValueRef::F32(_)
        | ValueRef::F64(_)
        | ValueRef::Binary(_)
        | ValueRef::Array(_)
        | ValueRef::Map(_)
        | ValueRef::Ext(..) => None,
    }
}

fn as_i64(v: &ValueRef<'_>) -> Option<i64> {
    match v {
        ValueRef::Integer(i) => i.as_i64(),
        ValueRef::Nil
        | ValueRef::Boolean(_)
        | ValueRef::F32(_)
        | ValueRef::F64(_)
        | ValueRef::String(_)
        | ValueRef::Binary(_)
        | ValueRef::Array(_)
        | ValueRef::Map(_)
        | ValueRef::Ext(..) => None,
    }
}

fn as_f64(v: &ValueRef<'_>) -> Option<f64> {
    match v {
        ValueRef::F64(x) => Some(*x),
        ValueRef::F32(x) => Some(f64::from(*x)),
        // msgspec writes floats as floats; an integral timestamp is harmless.
        ValueRef::Integer(i) => i.as_f64(),
        ValueRef::Nil
        | ValueRef::Boolean(_)
        | ValueRef::String(_)
        | ValueRef::Binary(_)
        | ValueRef::Array(_)
        | ValueRef::Map(_)
        | ValueRef::Ext(..) => None,
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Payloads built with rmpv exactly as msgspec encodes them (shared with the subscriber's
    //! tests).

    use rmpv::Value;

    /// An engine block hash as vLLM may send it.
    #[derive(Debug, Clone)]
    pub(crate) enum Hash {
        Int(u64),
        Bytes(Vec<u8>),
    }

    impl Hash {
        fn value(&self) -> Value {
            match self {
                Hash::Int(n) => Value::from(*n),
                Hash::Bytes(b) => Value::Binary(b.clone()),
            }
        }
    }

    /// One event in the positional (array_like, vLLM ≤ 0.23) form.
    pub(crate) fn stored_array(
        hashes: &[Hash],
        parent: Option<Hash>,
        tokens: &[u32],
        block_size: u64,
    ) -> Value {
        Value::Array(vec![
            Value::from("BlockStored"),
            Value::Array(hashes.iter().map(Hash::value).collect()),
            parent.map_or(Value::Nil, |p| p.value()),
            Value::Array(tokens.iter().map(|t| Value::from(*t)).collect()),
            Value::from(block_size),
            Value::Nil,
            Value::from("GPU"),
            Value::Nil,
        ])
    }

    /// One event in the map form (vLLM ≥ PR #42892), with newer fields.
    pub(crate) fn stored_map(
        hashes: &[Hash],
        parent: Option<Hash>,
        tokens: &[u32],
        block_size: u64,
    ) -> Value {
        Value::Map(vec![
            (Value::from("type"), Value::from("BlockStored")),
            (
                Value::from("block_hashes"),
                Value::Array(hashes.iter().map(Hash::value).collect()),
            ),
            (
                Value::from("parent_block_hash"),
                parent.map_or(Value::Nil, |p| p.value()),
            ),
            (
                Value::from("token_ids"),
                Value::Array(tokens.iter().map(|t| Value::from(*t)).collect()),
            ),
            (Value::from("block_size"), Value::from(block_size)),
            (Value::from("lora_id"), Value::Nil),
            (Value::from("medium"), Value::from("GPU")),
            (Value::from("lora_name"), Value::Nil),
            (Value::from("event_version"), Value::from(1)),
            (
                Value::from("extra_keys"),
                Value::Array(hashes.iter().map(|_| Value::Nil).collect()),
            ),
            (Value::from("group_idx"), Value::from(0)),
            (
                Value::from("kv_cache_spec_kind"),
                Value::from("full_attention"),
            ),
        ])
    }

    /// `BlockRemoved` in the positional form.
    pub(crate) fn removed_array(hashes: &[Hash]) -> Value {
        Value::Array(vec![
            Value::from("BlockRemoved"),
            Value::Array(hashes.iter().map(Hash::value).collect()),
            Value::from("GPU"),
        ])
    }

    /// `AllBlocksCleared` in the positional form.
    pub(crate) fn cleared_array() -> Value {
        Value::Array(vec![Value::from("AllBlocksCleared")])
    }

    /// A positional batch `[ts, events]` (`data_parallel_rank` omitted as a default).
    pub(crate) fn batch(events: Vec<Value>) -> Vec<u8> {
        encode(&Value::Array(vec![
            Value::F64(1_700_000_000.5),
            Value::Array(events),
        ]))
    }

    pub(crate) fn encode(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use rmpv::Value;

    #[test]
    fn decodes_a_positional_batch_with_int_hashes() {
        let tokens: Vec<u32> = (0..32).collect();
        let payload = batch(vec![
            stored_array(&[Hash::Int(11), Hash::Int(u64::MAX)], None, &tokens, 16),
            removed_array(&[Hash::Int(11)]),
            cleared_array(),
        ]);
        let b = decode_payload(&payload).unwrap();
        assert_eq!(b.ts, 1_700_000_000.5);
        assert_eq!(b.data_parallel_rank, None);
        assert_eq!(b.unknown, 0);
        assert_eq!(
            b.events,
            vec![
                KvEvent::BlockStored(BlockStored {
                    block_hashes: vec![11, u64::MAX],
                    parent_block_hash: None,
                    token_ids: tokens,
                    block_size: 16,
                    medium: Some("GPU".into()),
                    ..BlockStored::default()
                }),
                KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![11],
                    medium: Some("GPU".into()),
                    group_idx: None,
                }),
                KvEvent::AllBlocksCleared,
            ]
        );
    }

    #[test]
    fn negative_int_hashes_keep_their_bits() {
        let payload = batch(vec![Value::Array(vec![
            Value::from("BlockRemoved"),
            Value::Array(vec![Value::from(-5i64)]),
        ])]);
        let b = decode_payload(&payload).unwrap();
        assert_eq!(
            b.events,
            vec![KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![(-5i64) as u64],
                medium: None,
                group_idx: None,
            })]
        );
    }

    #[test]
    fn decodes_map_events_with_bytes_hashes_and_newer_fields() {
        let h1 = vec![7u8; 32];
        let h0 = vec![9u8; 32];
        let tokens: Vec<u32> = (100..116).collect();
        let payload = encode(&Value::Array(vec![
            Value::F64(2.0),
            Value::Array(vec![stored_map(
                &[Hash::Bytes(h1.clone())],
                Some(Hash::Bytes(h0.clone())),
                &tokens,
                16,
            )]),
            Value::from(0),
        ]));
        let b = decode_payload(&payload).unwrap();
        assert_eq!(b.data_parallel_rank, Some(0));
        let KvEvent::BlockStored(s) = &b.events[0] else {
            panic!("not stored: {:?}", b.events);
        };
        assert_eq!(s.block_hashes, vec![xxh3_64(&h1)]);
        assert_eq!(s.parent_block_hash, Some(xxh3_64(&h0)));
        assert_eq!(s.token_ids, tokens);
        assert_eq!(s.group_idx, Some(0));
        assert!(!s.extra_keys);
    }

    #[test]
    fn decodes_a_map_batch() {
        let payload = encode(&Value::Map(vec![
            (Value::from("ts"), Value::F64(3.5)),
            (
                Value::from("events"),
                Value::Array(vec![Value::Map(vec![(
                    Value::from("type"),
                    Value::from("AllBlocksCleared"),
                )])]),
            ),
            (Value::from("data_parallel_rank"), Value::from(2)),
        ]));
        let b = decode_payload(&payload).unwrap();
        assert_eq!(b.ts, 3.5);
        assert_eq!(b.events, vec![KvEvent::AllBlocksCleared]);
        assert_eq!(b.data_parallel_rank, Some(2));
    }

    #[test]
    fn unknown_trailing_fields_and_unknown_tags_are_tolerated() {
        let tokens: Vec<u32> = (0..16).collect();
        let mut stored = stored_array(&[Hash::Int(1)], Some(Hash::Int(0)), &tokens, 16);
        if let Value::Array(items) = &mut stored {
            // extra_keys, group_idx, then fields from a future vLLM.
            items.push(Value::Array(vec![Value::Nil]));
            items.push(Value::from(0));
            items.push(Value::from("full_attention"));
            items.push(Value::Map(vec![(Value::from("future"), Value::from(true))]));
        }
        let payload = batch(vec![
            Value::Array(vec![Value::from("BlockPinned"), Value::from(1)]),
            stored,
            Value::Map(vec![(Value::from("type"), Value::from("SomethingNew"))]),
        ]);
        let b = decode_payload(&payload).unwrap();
        assert_eq!(b.unknown, 2);
        assert_eq!(b.events.len(), 1);
        let KvEvent::BlockStored(s) = &b.events[0] else {
            panic!("not stored");
        };
        assert_eq!(s.parent_block_hash, Some(0));
        assert_eq!(s.group_idx, Some(0));
    }

    #[test]
    fn extra_keys_and_lora_are_reported() {
        let tokens: Vec<u32> = (0..16).collect();
        let mut stored = stored_array(&[Hash::Int(1)], None, &tokens, 16);
        if let Value::Array(items) = &mut stored {
            items[5] = Value::from(3); // lora_id
            items[7] = Value::from("adapter"); // lora_name
            items.push(Value::Array(vec![Value::Array(vec![Value::from("salt")])]));
        }
        let b = decode_payload(&batch(vec![stored])).unwrap();
        let KvEvent::BlockStored(s) = &b.events[0] else {
            panic!("not stored");
        };
        assert_eq!(s.lora_id, Some(3));
        assert_eq!(s.lora_name.as_deref(), Some("adapter"));
        assert!(s.extra_keys);
    }

    #[test]
    fn malformed_payloads_are_errors() {
        assert!(matches!(
            decode_payload(b"\x92\xcb"),
            Err(WireError::Msgpack(_))
        ));
        assert!(decode_payload(b"\xc1").is_err());
        assert_eq!(
            decode_payload(&encode(&Value::from(1))),
            Err(WireError::Batch("not an array or a map"))
        );
        assert_eq!(
            decode_payload(&encode(&Value::Array(vec![Value::F64(1.0)]))),
            Err(WireError::Batch("events is not an array"))
        );
        // A token id that is not a u32.
        let bad = batch(vec![stored_array(&[Hash::Int(1)], None, &[], 16)]);
        let mut v = rmpv::decode::read_value(&mut &bad[..]).unwrap();
        if let Value::Array(b) = &mut v {
            if let Value::Array(events) = &mut b[1] {
                if let Value::Array(items) = &mut events[0] {
                    items[3] = Value::Array(vec![Value::from(-1)]);
                }
            }
        }
        assert_eq!(
            decode_payload(&encode(&v)),
            Err(WireError::Event {
                event: "BlockStored",
                field: "token_ids"
            })
        );
        // Trailing bytes after the batch.
        let mut trailing = batch(vec![]);
        trailing.push(0);
        assert!(matches!(
            decode_payload(&trailing),
            Err(WireError::Msgpack(_))
        ));
    }

    #[test]
    fn frames_and_sequence_numbers() {
        let payload = batch(vec![cleared_array()]);
        let seq = 42i64.to_be_bytes();
        let m = decode_message(&[&b"kv-events"[..], &seq[..], &payload[..]]).unwrap();
        assert_eq!(m.topic, b"kv-events");
        assert_eq!(m.seq, 42);
        assert_eq!(m.batch.events, vec![KvEvent::AllBlocksCleared]);
        assert_eq!(decode_seq(&(-1i64).to_be_bytes()), Ok(-1));
        assert_eq!(
            decode_message(&[&seq[..], &payload[..]]),
            Err(WireError::Frames(2))
        );
        assert_eq!(
            decode_message(&[&b""[..], &[0u8; 4][..], &payload[..]]),
            Err(WireError::Sequence(4))
        );
    }
}
