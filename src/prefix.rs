//! Prefix blocks of a prompt and their ordered chain of 64-bit keys (DESIGN §3.5).
//!
//! A chat request is cut into blocks as Higress does: a block ends after each `user` message and
//! after the last message; a block's text is each message's role and content (plus `tool_calls`).
//! Unlike Higress, key *k* hashes block *k* seeded with key *k−1* (the first seeded with the model),
//! so `[A,B]` and `[B,A]` differ and repeated blocks never cancel. Non-string content is
//! canonicalised (keys sorted, no whitespace) so equivalent JSON hashes the same. Text longer than
//! [`CHUNK_BYTES`] inside one block, and `/v1/completions` prompts, are also cut every
//! [`CHUNK_BYTES`], so long shared documents still match in part. The cut points depend only on the
//! text before them, so a growing conversation yields a growing chain.

use serde_json::Value;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// A block's key: a hash of the block and every block before it.
pub type BlockKey = u64;

/// Bytes of text after which a block is cut even without a message boundary (~512 tokens).
pub const CHUNK_BYTES: usize = 2048;

const FIELD_SEP: &[u8] = &[0x1f];
const MESSAGE_SEP: &[u8] = &[0x1e];

/// Builds the chain of block keys from a stream of text pieces.
struct Chain {
    prev: BlockKey,
    hasher: Xxh3,
    pending: usize,
    keys: Vec<BlockKey>,
}

impl Chain {
    fn new(model: &str) -> Self {
        let prev = xxh3_64(model.as_bytes());
        Chain {
            prev,
            hasher: Xxh3::with_seed(prev),
            pending: 0,
            keys: Vec::new(),
        }
    }

    /// Append text to the current block, cutting it every [`CHUNK_BYTES`].
    fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = CHUNK_BYTES - self.pending;
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.hasher.update(now);
            self.pending += now.len();
            bytes = rest;
            if self.pending == CHUNK_BYTES {
                self.cut();
            }
        }
    }

    /// End the current block (no-op when it is empty).
    fn cut(&mut self) {
        if self.pending == 0 {
            return;
        }
        let key = self.hasher.digest();
        self.keys.push(key);
        self.prev = key;
        self.hasher = Xxh3::with_seed(key);
        self.pending = 0;
    }
}

/// The key of a session id: a one-block chain of its own in the prefix index (the id is hashed,
/// never stored or logged in clear).
pub fn session_key(id: &str) -> BlockKey {
    let mut h = Xxh3::with_seed(SESSION_SEED);
    h.update(id.as_bytes());
    h.digest()
}

/// Seed of [`session_key`], apart from every chain's.
const SESSION_SEED: u64 = 0x5e55_1011_5e55_1011;

/// The key under which the endpoint that stored Responses API response `id` is remembered (a
/// one-block chain, hashed apart from sessions' and prompts' keys).
pub fn response_key(id: &str) -> BlockKey {
    let mut h = Xxh3::with_seed(RESPONSE_SEED);
    h.update(id.as_bytes());
    h.digest()
}

/// Seed of [`response_key`].
const RESPONSE_SEED: u64 = 0x7e59_0115_e7e5_9011;

/// The chain of a prompt's `blocks` within session `session`: the session's key, then each block
/// key mixed with it. A session's requests all match its first key; the endpoint that served its
/// longest prompt prefix matches more (a conversation that moved is found where it moved), and two
/// sessions never share a key.
pub fn session_chain(session: BlockKey, blocks: &[BlockKey]) -> Vec<BlockKey> {
    std::iter::once(session)
        .chain(
            blocks
                .iter()
                .map(|b| xxhash_rust::xxh3::xxh3_64_with_seed(&b.to_le_bytes(), session)),
        )
        .collect()
}

/// Block keys of a chat request's `messages` (an object is treated as a one-element list).
// Foreign enum (serde_json's Value): `_` / `other` stands for "any other JSON value".
#[allow(clippy::wildcard_enum_match_arm)]
pub fn chat_blocks(model: &str, messages: &Value) -> Vec<BlockKey> {
    let list: &[Value] = match messages {
        Value::Array(a) => a,
        Value::Object(_) => std::slice::from_ref(messages),
        _ => return Vec::new(),
    };
    let mut chain = Chain::new(model);
    let mut scratch = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        chain.push(role.as_bytes());
        chain.push(FIELD_SEP);
        if let Some(content) = m.get("content") {
            push_value(&mut chain, content, &mut scratch);
        }
        if let Some(calls) = m.get("tool_calls") {
            chain.push(FIELD_SEP);
            push_value(&mut chain, calls, &mut scratch);
        }
        chain.push(MESSAGE_SEP);
        if role == "user" || i + 1 == list.len() {
            chain.cut();
        }
    }
    chain.cut();
    chain.keys
}

/// Block keys of a completions `prompt` (a string, a list of strings, or token ids).
// Foreign enum (serde_json's Value): `_` / `other` stands for "any other JSON value".
#[allow(clippy::wildcard_enum_match_arm)]
pub fn prompt_blocks(model: &str, prompt: &Value) -> Vec<BlockKey> {
    let mut chain = Chain::new(model);
    let mut scratch = Vec::new();
    match prompt {
        Value::String(s) => chain.push(s.as_bytes()),
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Number(n) => chain.push(&n.as_u64().unwrap_or(u64::MAX).to_le_bytes()),
                    other => {
                        push_value(&mut chain, other, &mut scratch);
                        chain.push(MESSAGE_SEP);
                    }
                }
            }
        }
        _ => return Vec::new(),
    }
    chain.cut();
    chain.keys
}

// Foreign enum (serde_json's Value): `_` / `other` stands for "any other JSON value".
#[allow(clippy::wildcard_enum_match_arm)]
fn push_value(chain: &mut Chain, v: &Value, scratch: &mut Vec<u8>) {
    match v {
        Value::String(s) => chain.push(s.as_bytes()),
        Value::Null => {}
        other => {
            scratch.clear();
            canonical_json(other, scratch);
            chain.push(scratch);
        }
    }
}

/// Serialise JSON with object keys sorted and no whitespace, whatever order they arrived in.
// Foreign enum (serde_json's Value): `_` / `other` stands for "any other JSON value".
#[allow(clippy::wildcard_enum_match_arm)]
pub fn canonical_json(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_string(k, out);
                out.push(b':');
                if let Some(value) = map.get(k) {
                    canonical_json(value, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(item, out);
            }
            out.push(b']');
        }
        Value::String(s) => write_json_string(s, out),
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

fn write_json_string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(Value::String(s.to_string()).to_string().as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msgs(v: &[(&str, &str)]) -> Value {
        Value::Array(
            v.iter()
                .map(|(r, c)| json!({"role": r, "content": c}))
                .collect(),
        )
    }

    #[test]
    fn blocks_end_after_user_and_last_message() {
        let b = chat_blocks("m", &msgs(&[("system", "s"), ("user", "u1")]));
        assert_eq!(b.len(), 1);
        let b2 = chat_blocks(
            "m",
            &msgs(&[
                ("system", "s"),
                ("user", "u1"),
                ("assistant", "a1"),
                ("user", "u2"),
            ]),
        );
        assert_eq!(b2.len(), 2);
        assert_eq!(b2[0], b[0], "a growing conversation is a growing chain");
        let b3 = chat_blocks(
            "m",
            &msgs(&[("system", "s"), ("user", "u1"), ("assistant", "a1")]),
        );
        assert_eq!(b3.len(), 2, "the last message closes a block");
    }

    #[test]
    fn order_and_repetition_matter() {
        // Higress XORs block hashes: [go, go, x] collides with [x] and [A,B] with [B,A].
        let x = chat_blocks("m", &msgs(&[("user", "x")]));
        let ggx = chat_blocks("m", &msgs(&[("user", "go"), ("user", "go"), ("user", "x")]));
        assert_ne!(ggx.last(), x.last());
        assert!(!ggx.contains(&x[0]));
        let ab = chat_blocks("m", &msgs(&[("user", "A"), ("user", "B")]));
        let ba = chat_blocks("m", &msgs(&[("user", "B"), ("user", "A")]));
        assert_ne!(ab[1], ba[1]);
        assert_ne!(ab[0], ba[0]);
    }

    #[test]
    fn model_and_role_are_part_of_the_key() {
        let a = chat_blocks("m1", &msgs(&[("user", "hi")]));
        let b = chat_blocks("m2", &msgs(&[("user", "hi")]));
        let c = chat_blocks("m1", &msgs(&[("system", "hi")]));
        assert_ne!(a, b);
        assert_ne!(a, c);
        // no ambiguity between role and content boundaries
        let d = chat_blocks("m", &msgs(&[("user", "ab")]));
        let e = chat_blocks("m", &json!([{"role": "usera", "content": "b"}]));
        assert_ne!(d, e);
    }

    #[test]
    fn multipart_content_is_canonical() {
        let a = json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]);
        let b: Value = serde_json::from_str(
            r#"[{"content": [ { "text" : "hi", "type": "text" } ], "role": "user"}]"#,
        )
        .expect("json");
        assert_eq!(chat_blocks("m", &a), chat_blocks("m", &b));
    }

    #[test]
    fn long_messages_are_chunked_and_share_their_prefix() {
        let doc = "lorem ipsum ".repeat(1000); // 12 000 bytes
        let a = chat_blocks("m", &msgs(&[("user", &format!("{doc} question one"))]));
        let b = chat_blocks("m", &msgs(&[("user", &format!("{doc} second question"))]));
        assert!(a.len() >= 6, "{}", a.len());
        let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        assert_eq!(
            shared,
            a.len() - 1,
            "all full chunks of the shared document match"
        );
    }

    #[test]
    fn prompts_are_chunked() {
        let p = "x".repeat(CHUNK_BYTES * 2 + 10);
        assert_eq!(prompt_blocks("m", &Value::String(p)).len(), 3);
        assert_eq!(prompt_blocks("m", &json!([1, 2, 3])).len(), 1);
        assert!(prompt_blocks("m", &json!(5)).is_empty());
        assert!(chat_blocks("m", &json!("not a list")).is_empty());
    }
}
