//! KV-cache events on vLLM's wire (`--kv-events-config`): ZMQ subscribers and replay clients
//! built on the `zeromq` crate, and a msgpack decoder written here (an `rmpv` walk that also
//! checks the layout vLLM's msgspec writes), independent of the simulator's encoder.
//!
//! Subscribers may join late (ZMQ's slow joiner), so every assertion about *all* batches uses
//! the replay socket, which holds them from seq 0; live delivery is checked against it.
//! Everything polls with deadlines.

mod common;

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rmpv::Value;
use serde_json::{json, Value as Json};
use vllm_sim::kv_events::{BlockHashFormat, KvEventsWire};
use vllm_sim::{KvEventsConfig, SimConfig, SimHandle};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

const DEADLINE: Duration = Duration::from_secs(20);
const TOPIC: &str = "kv-events";

// ---------------------------------------------------------------------------------------
// An independent decoder of vLLM's KVEventBatch.

#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Stored(Stored),
    Removed(Vec<u64>),
    Cleared,
}

#[derive(Debug, Clone, PartialEq)]
struct Stored {
    hashes: Vec<u64>,
    parent: Option<u64>,
    tokens: Vec<u64>,
    block_size: u64,
    lora_id: Option<u64>,
    lora_name: Option<String>,
    extra_keys: Vec<Value>,
}

#[derive(Debug, Clone)]
struct Batch {
    seq: u64,
    payload: Bytes,
    events: Vec<Ev>,
}

fn hash_of(v: &Value) -> u64 {
    match v {
        Value::Integer(i) => i.as_u64().expect("hash is an unsigned integer"),
        Value::Binary(b) => u64::from_be_bytes(b.as_slice().try_into().expect("8-byte hash")),
        other => panic!("block hash of unexpected type: {other:?}"),
    }
}

fn hashes_of(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("hash list")
        .iter()
        .map(hash_of)
        .collect()
}

fn opt_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Nil => None,
        v => Some(v.as_u64().expect("integer or nil")),
    }
}

fn opt_str(v: &Value) -> Option<String> {
    match v {
        Value::Nil => None,
        v => Some(v.as_str().expect("string or nil").to_string()),
    }
}

/// The fields of one event in declaration order: (name, value). For the map layout the keys
/// must be exactly `names`, in that order, after `"type"`; for the array layout the values
/// are positional.
fn fields(ev: &Value, wire: KvEventsWire) -> (String, Vec<(String, &Value)>) {
    match wire {
        KvEventsWire::Map => {
            let m = ev.as_map().expect("map-encoded event (vLLM >= 0.24)");
            let (k0, tag) = &m[0];
            assert_eq!(k0.as_str(), Some("type"), "the tag comes first");
            let tag = tag.as_str().expect("tag string").to_string();
            let rest = m[1..]
                .iter()
                .map(|(k, v)| (k.as_str().expect("string key").to_string(), v))
                .collect();
            (tag, rest)
        }
        KvEventsWire::Array => {
            let a = ev.as_array().expect("array-encoded event (vLLM <= 0.23)");
            let tag = a[0].as_str().expect("tag string").to_string();
            let names: &[&str] = match tag.as_str() {
                "BlockStored" => &[
                    "block_hashes",
                    "parent_block_hash",
                    "token_ids",
                    "block_size",
                    "lora_id",
                    "medium",
                    "lora_name",
                    "extra_keys",
                    "group_idx",
                    "kv_cache_spec_kind",
                    "kv_cache_spec_sliding_window",
                ],
                "BlockRemoved" => &["block_hashes", "medium", "group_idx"],
                "AllBlocksCleared" => &[],
                t => panic!("unknown event tag {t}"),
            };
            assert_eq!(
                a.len(),
                names.len() + 1,
                "{tag}: msgspec writes every field"
            );
            let rest = names
                .iter()
                .zip(&a[1..])
                .map(|(n, v)| (n.to_string(), v))
                .collect();
            (tag, rest)
        }
    }
}

fn decode_event(ev: &Value, wire: KvEventsWire) -> Ev {
    let (tag, f) = fields(ev, wire);
    let names: Vec<&str> = f.iter().map(|(n, _)| n.as_str()).collect();
    let get = |name: &str| -> &Value {
        f.iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{tag} without {name}"))
            .1
    };
    match tag.as_str() {
        "BlockStored" => {
            let mut want = vec![
                "block_hashes",
                "parent_block_hash",
                "token_ids",
                "block_size",
                "lora_id",
                "medium",
                "lora_name",
                "extra_keys",
                "group_idx",
                "kv_cache_spec_kind",
            ];
            if wire == KvEventsWire::Array {
                want.push("kv_cache_spec_sliding_window");
                assert!(get("kv_cache_spec_sliding_window").is_nil());
            }
            assert_eq!(names, want, "BlockStored fields, in vLLM's order");
            assert_eq!(get("medium").as_str(), Some("GPU"));
            assert_eq!(get("group_idx").as_u64(), Some(0));
            assert_eq!(get("kv_cache_spec_kind").as_str(), Some("full_attention"));
            let hashes = hashes_of(get("block_hashes"));
            let extra_keys = get("extra_keys").as_array().expect("extra_keys").clone();
            assert_eq!(
                extra_keys.len(),
                hashes.len(),
                "one extra_keys entry per block"
            );
            Ev::Stored(Stored {
                parent: match get("parent_block_hash") {
                    Value::Nil => None,
                    v => Some(hash_of(v)),
                },
                tokens: get("token_ids")
                    .as_array()
                    .expect("token_ids")
                    .iter()
                    .map(|t| t.as_u64().expect("token id"))
                    .collect(),
                block_size: get("block_size").as_u64().expect("block_size"),
                lora_id: opt_u64(get("lora_id")),
                lora_name: opt_str(get("lora_name")),
                extra_keys,
                hashes,
            })
        }
        "BlockRemoved" => {
            assert_eq!(names, ["block_hashes", "medium", "group_idx"]);
            assert_eq!(get("medium").as_str(), Some("GPU"));
            assert_eq!(get("group_idx").as_u64(), Some(0));
            let hashes = hashes_of(get("block_hashes"));
            assert_eq!(hashes.len(), 1, "vLLM removes one hash per event");
            Ev::Removed(hashes)
        }
        "AllBlocksCleared" => {
            assert!(names.is_empty());
            Ev::Cleared
        }
        t => panic!("unknown event tag {t}"),
    }
}

/// Decodes `[ts: float64, events, data_parallel_rank]`.
fn decode(payload: &[u8], wire: KvEventsWire) -> Vec<Ev> {
    let mut rd = payload;
    let v = rmpv::decode::read_value(&mut rd).expect("valid msgpack");
    assert!(rd.is_empty(), "trailing bytes after the batch");
    let a = v.as_array().expect("the batch is an array (array_like)");
    assert_eq!(a.len(), 3, "ts, events, data_parallel_rank");
    assert!(
        matches!(a[0], Value::F64(t) if t > 1.6e9),
        "ts is a float64 unix time"
    );
    assert_eq!(a[2].as_u64(), Some(0), "data_parallel_rank");
    a[1].as_array()
        .expect("events")
        .iter()
        .map(|e| decode_event(e, wire))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Simulators, subscribers and replay clients.

fn events_config(extra: Json) -> KvEventsConfig {
    let mut j = json!({
        "enable_kv_cache_events": true,
        "publisher": "zmq",
        "endpoint": "tcp://*:0",
        "replay_endpoint": "tcp://127.0.0.1:0",
        "topic": TOPIC,
    });
    if let (Some(m), Json::Object(e)) = (j.as_object_mut(), extra) {
        m.extend(e);
    }
    KvEventsConfig::from_json(&j.to_string()).expect("valid config")
}

async fn start(kv: KvEventsConfig, tweak: impl FnOnce(&mut SimConfig)) -> SimHandle {
    let mut cfg = common::instant("m");
    cfg.kv_events_config = Some(kv);
    tweak(&mut cfg);
    common::start(cfg).await
}

fn pub_endpoint(sim: &SimHandle) -> String {
    let k = sim.kv_events().expect("kv events on");
    let ep = k.local_endpoint().expect("bound PUB");
    assert_eq!(ep, format!("tcp://127.0.0.1:{}", k.bound.unwrap().port()));
    ep
}

fn replay_endpoint(sim: &SimHandle) -> String {
    let k = sim.kv_events().expect("kv events on");
    k.local_replay_endpoint().expect("replay socket")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn subscriber(endpoint: &str, topic: &str) -> SubSocket {
    let mut s = SubSocket::new();
    s.subscribe(topic).await.unwrap();
    s.connect(endpoint).await.expect("SUB connects");
    s
}

/// One live message `[topic, seq, payload]`, or `None` after `wait`.
async fn recv_live(sub: &mut SubSocket, wait: Duration) -> Option<(Bytes, u64, Bytes)> {
    let msg = tokio::time::timeout(wait, sub.recv())
        .await
        .ok()?
        .expect("SUB recv");
    let f = msg.into_vec();
    assert_eq!(f.len(), 3, "PUB frames: topic, seq, payload");
    let seq = u64::from_be_bytes(f[1].as_ref().try_into().expect("8-byte seq"));
    Some((f[0].clone(), seq, f[2].clone()))
}

/// Asks the replay socket for every batch from `start`, as a REQ client would (a DEALER
/// sending the empty delimiter), and reads up to the end marker. Returns (topic, seq,
/// payload); the topic is empty in the array layout, which has no topic frame.
async fn replay_raw(endpoint: &str, start: u64, wire: KvEventsWire) -> Vec<(Bytes, u64, Bytes)> {
    let mut d = DealerSocket::new();
    d.connect(endpoint).await.expect("replay connects");
    let req = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&start.to_be_bytes()),
    ])
    .unwrap();
    d.send(req).await.unwrap();
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(DEADLINE, d.recv())
            .await
            .expect("replay answers before the deadline")
            .expect("replay recv");
        let f = msg.into_vec();
        assert!(f[0].is_empty(), "REQ delimiter first: {f:?}");
        let (topic, seq, payload) = match wire {
            KvEventsWire::Map => {
                assert_eq!(f.len(), 4, "[b'', topic, seq, payload]: {f:?}");
                (f[1].clone(), f[2].clone(), f[3].clone())
            }
            KvEventsWire::Array => {
                assert_eq!(f.len(), 3, "[b'', seq, payload]: {f:?}");
                (Bytes::new(), f[1].clone(), f[2].clone())
            }
        };
        if seq.as_ref() == [0xff; 8] {
            assert!(payload.is_empty(), "end marker payload is empty");
            assert!(topic.is_empty(), "end marker topic frame is empty");
            return out;
        }
        let seq = u64::from_be_bytes(seq.as_ref().try_into().expect("8-byte seq"));
        out.push((topic, seq, payload));
    }
}

async fn replay(endpoint: &str, start: u64, wire: KvEventsWire) -> Vec<Batch> {
    replay_raw(endpoint, start, wire)
        .await
        .into_iter()
        .map(|(topic, seq, payload)| {
            if wire == KvEventsWire::Map {
                assert_eq!(topic.as_ref(), TOPIC.as_bytes(), "replay carries the topic");
            }
            Batch {
                seq,
                events: decode(&payload, wire),
                payload,
            }
        })
        .collect()
}

/// Replays from 0 until `done` holds for the batches.
async fn wait_batches(
    sim: &SimHandle,
    wire: KvEventsWire,
    what: &str,
    done: impl Fn(&[Batch]) -> bool,
) -> Vec<Batch> {
    let end = Instant::now() + DEADLINE;
    loop {
        let b = replay(&replay_endpoint(sim), 0, wire).await;
        if done(&b) {
            return b;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}: {b:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn all_events(batches: &[Batch]) -> Vec<Ev> {
    batches.iter().flat_map(|b| b.events.clone()).collect()
}

fn stored(batches: &[Batch]) -> Vec<Stored> {
    all_events(batches)
        .into_iter()
        .filter_map(|e| match e {
            Ev::Stored(s) => Some(s),
            _ => None,
        })
        .collect()
}

fn assert_consecutive_from(batches: &[Batch], first: u64) {
    let seqs: Vec<u64> = batches.iter().map(|b| b.seq).collect();
    let want: Vec<u64> = (first..first + seqs.len() as u64).collect();
    assert_eq!(seqs, want, "sequence numbers");
}

/// A `/v1/completions` request for exact token ids; returns its cached prompt tokens.
async fn complete_ids(sim: &SimHandle, ids: &[u32], max_tokens: u64) -> u64 {
    let (status, body) = common::post(
        sim,
        "/v1/completions",
        &json!({"model": "m", "prompt": ids, "max_tokens": max_tokens, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens")
}

async fn tokenize_chat(sim: &SimHandle, messages: &[(&str, &str)]) -> Vec<u64> {
    let msgs: Vec<Json> = messages
        .iter()
        .map(|(r, c)| json!({"role": r, "content": c}))
        .collect();
    let (status, body) =
        common::post(sim, "/tokenize", &json!({"model": "m", "messages": msgs})).await;
    assert_eq!(status, 200, "{body}");
    body["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------
// The tests.

#[tokio::test]
async fn a_chat_request_stores_its_full_prompt_blocks_with_chained_hashes() {
    let sim = start(events_config(json!({})), |_| {}).await;
    let turn1 = [
        ("system", "You are a careful assistant who answers briefly."),
        (
            "user",
            "Name three rivers of Europe and the seas they flow into, one per line.",
        ),
    ];
    let t1 = tokenize_chat(&sim, &turn1).await;
    let full1 = t1.len() / 16;
    assert!(
        full1 >= 2,
        "the prompt spans several blocks ({} tokens)",
        t1.len()
    );
    let (status, body) =
        common::post(&sim, "/v1/chat/completions", &common::chat("m", &turn1, 1)).await;
    assert_eq!(status, 200, "{body}");

    let batches = wait_batches(&sim, KvEventsWire::Map, "the first BlockStored", |b| {
        !stored(b).is_empty()
    })
    .await;
    assert_consecutive_from(&batches, 0);
    assert_eq!(batches.len(), 1, "one step, one batch: {batches:#?}");
    let s = &stored(&batches)[0];
    assert_eq!(batches[0].events.len(), 1);
    assert_eq!(s.hashes.len(), full1, "one hash per full prompt block");
    assert_eq!(s.tokens, t1[..full1 * 16], "the full blocks' token ids");
    assert_eq!(s.parent, None, "a sequence's first block has no parent");
    assert_eq!(s.block_size, 16);
    assert_eq!((s.lora_id, s.lora_name.as_deref()), (None, None));
    assert!(s.extra_keys.iter().all(Value::is_nil));
    assert_eq!(
        s.hashes.iter().collect::<HashSet<_>>().len(),
        full1,
        "distinct hashes"
    );

    // The next turn extends the conversation: its new blocks chain onto the last cached one.
    let reply = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let turn2 = [
        turn1[0],
        turn1[1],
        ("assistant", reply.as_str()),
        (
            "user",
            "Now give the length of each river in kilometres, please, as a table.",
        ),
    ];
    let t2 = tokenize_chat(&sim, &turn2).await;
    assert_eq!(
        t2[..full1 * 16],
        t1[..full1 * 16],
        "a conversation grows its prefix"
    );
    let full2 = t2.len() / 16;
    assert!(full2 > full1);
    let (status, body) =
        common::post(&sim, "/v1/chat/completions", &common::chat("m", &turn2, 1)).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(full1 as u64 * 16),
        "the first turn's blocks hit"
    );
    let batches = wait_batches(&sim, KvEventsWire::Map, "the second BlockStored", |b| {
        stored(b).len() >= 2
    })
    .await;
    assert_consecutive_from(&batches, 0);
    let s2 = &stored(&batches)[1];
    assert_eq!(
        s2.parent,
        s.hashes.last().copied(),
        "parent = previous block's hash"
    );
    assert_eq!(s2.hashes.len(), full2 - full1, "only the new blocks");
    assert_eq!(s2.tokens, t2[full1 * 16..full2 * 16]);
    assert!(s2.hashes.iter().all(|h| !s.hashes.contains(h)));
    sim.shutdown().await;
}

#[tokio::test]
async fn generated_tokens_store_their_blocks_as_they_fill() {
    let sim = start(events_config(json!({})), |_| {}).await;
    let prompt: Vec<u32> = (1000..1020).collect();
    // 20 prompt tokens + 40 outputs: the KV holds 59 tokens, three full blocks.
    complete_ids(&sim, &prompt, 40).await;
    let batches = wait_batches(&sim, KvEventsWire::Map, "three stored blocks", |b| {
        stored(b).iter().map(|s| s.hashes.len()).sum::<usize>() >= 3
    })
    .await;
    assert_consecutive_from(&batches, 0);
    let s = stored(&batches);
    assert_eq!(
        s.len(),
        3,
        "prompt block, then each output block as it fills: {s:#?}"
    );
    let want_prompt: Vec<u64> = prompt.iter().map(|&t| u64::from(t)).collect();
    assert_eq!(s[0].tokens, want_prompt[..16]);
    assert_eq!(s[1].tokens[..4], want_prompt[16..20]);
    assert_eq!(s[0].parent, None);
    assert_eq!(s[1].parent, Some(s[0].hashes[0]));
    assert_eq!(s[2].parent, Some(s[1].hashes[0]));
    sim.shutdown().await;
}

#[tokio::test]
async fn eviction_removes_exactly_the_evicted_hashes_and_the_index_matches_the_cache() {
    // 8 usable blocks of 16 tokens; each request holds 3 full blocks (48 tokens, 1 output).
    let sim = start(events_config(json!({})), |c| c.kv_blocks = 9).await;
    let prompts: Vec<Vec<u32>> = (0..4u32)
        .map(|p| (0..48).map(|i| 10_000 * (p + 1) + i).collect())
        .collect();
    let mut index: HashSet<u64> = HashSet::new();
    let mut hashes_of_prompt: Vec<Vec<u64>> = Vec::new();
    let mut seen = 0usize;
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(complete_ids(&sim, p, 1).await, 0);
        let batches = wait_batches(&sim, KvEventsWire::Map, "the request's batch", |b| {
            stored(b).len() > i
        })
        .await;
        assert_consecutive_from(&batches, 0);
        assert_eq!(batches.len(), i + 1, "one batch per request");
        let events = &batches[i].events;
        let Some(Ev::Stored(s)) = events.last() else {
            panic!("the batch ends with BlockStored: {events:?}")
        };
        assert_eq!(
            s.tokens,
            p.iter().map(|&t| u64::from(t)).collect::<Vec<_>>()
        );
        let removed: Vec<u64> = events[..events.len() - 1]
            .iter()
            .map(|e| match e {
                Ev::Removed(h) => h[0],
                other => panic!("only removals before the store: {other:?}"),
            })
            .collect();
        // The LRU queue: a finished request's blocks are freed last block first, so they
        // are evicted A3 (for C), then A2, A1, B3 (for D).
        let want_removed: Vec<u64> = match i {
            0 | 1 => vec![],
            2 => vec![hashes_of_prompt[0][2]],
            _ => vec![
                hashes_of_prompt[0][1],
                hashes_of_prompt[0][0],
                hashes_of_prompt[1][2],
            ],
        };
        assert_eq!(removed, want_removed, "request {i}");
        for h in &removed {
            assert!(index.remove(h), "removed hash {h} was stored");
        }
        index.extend(&s.hashes);
        hashes_of_prompt.push(s.hashes.clone());
        seen = batches.len();
    }
    assert_eq!(index.len(), 8, "the cache holds 8 blocks");

    // The index built from the events predicts every later request's cache hits.
    for &i in &[1usize, 0, 3, 2, 1] {
        let hs = &hashes_of_prompt[i];
        let hit = hs
            .iter()
            .take_while(|h| index.contains(h))
            .count()
            .min(47 / 16);
        let cached = complete_ids(&sim, &prompts[i], 1).await;
        assert_eq!(
            cached,
            hit as u64 * 16,
            "prompt {i}: cached tokens vs the event index"
        );
        let batches = wait_batches(&sim, KvEventsWire::Map, "the batch", |b| b.len() > seen).await;
        assert_consecutive_from(&batches, 0);
        for ev in &batches[seen].events {
            match ev {
                Ev::Removed(h) => assert!(index.remove(&h[0])),
                Ev::Stored(s) => {
                    assert_eq!(s.parent, hit.checked_sub(1).map(|p| hs[p]));
                    assert_eq!(s.hashes, hs[hit..], "re-stored blocks keep their hashes");
                    index.extend(&s.hashes);
                }
                Ev::Cleared => panic!("no reset here"),
            }
        }
        seen = batches.len();
        assert!(index.len() <= 8);
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn reset_prefix_cache_publishes_all_blocks_cleared() {
    let sim = start(events_config(json!({})), |_| {}).await;
    let prompt: Vec<u32> = (500..540).collect();
    complete_ids(&sim, &prompt, 1).await;
    wait_batches(&sim, KvEventsWire::Map, "BlockStored", |b| !b.is_empty()).await;
    let (status, body) = common::post(&sim, "/reset_prefix_cache", &json!({})).await;
    assert_eq!((status, &body), (200, &json!({"success": true})));
    // As in vLLM, the event goes out with the next step's batch.
    assert_eq!(
        complete_ids(&sim, &prompt, 1).await,
        0,
        "nothing cached after a reset"
    );
    let batches = wait_batches(&sim, KvEventsWire::Map, "the batch after the reset", |b| {
        b.len() >= 2
    })
    .await;
    assert_consecutive_from(&batches, 0);
    let Ev::Stored(first) = &batches[0].events[0] else {
        panic!("first batch stores")
    };
    let events = &batches[1].events;
    assert_eq!(events[0], Ev::Cleared, "{events:?}");
    let Ev::Stored(again) = &events[1] else {
        panic!("then the prompt is stored again: {events:?}")
    };
    assert_eq!(again.hashes, first.hashes, "same tokens, same hashes");
    assert_eq!(again.parent, None);
    assert_eq!(
        events.len(),
        2,
        "nothing was evicted: the reset dropped the hashes"
    );
    assert!(sim.reset_prefix_cache(false).await);
    sim.shutdown().await;
}

#[tokio::test]
async fn reset_fails_while_a_request_holds_blocks_unless_it_is_preempted() {
    let mut cfg = common::instant("m");
    cfg.time_scale = 1.0;
    cfg.itl_ms = 5.0;
    let sim = common::start(cfg).await;
    let url = format!("{}/v1/completions", sim.url());
    // Reads the stream to its end (about 10 s), holding the request's KV blocks meanwhile.
    let long = tokio::spawn(async move {
        let r = common::client()
            .post(url)
            .json(&json!({"model": "m", "prompt": "a long story", "max_tokens": 2000, "ignore_eos": true, "stream": true}))
            .send()
            .await?;
        r.bytes().await
    });
    common::wait_until(20, "the request runs", || sim.stats().running == 1).await;
    let (status, body) = common::post(&sim, "/reset_prefix_cache", &json!({})).await;
    assert_eq!((status, body), (200, json!({"success": false})));
    let (status, body) = common::post(
        &sim,
        "/reset_prefix_cache?reset_running_requests=true",
        &json!({}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"success": true})));
    assert!(sim.stats().preemptions >= 1);
    long.abort();
    sim.shutdown().await;
}

#[tokio::test]
async fn live_stream_replay_and_topic_filtering_agree() {
    let sim = start(events_config(json!({})), |_| {}).await;
    let ep = pub_endpoint(&sim);
    let mut exact = subscriber(&ep, TOPIC).await;
    let mut prefix = subscriber(&ep, "kv").await;
    let mut other = subscriber(&ep, "kv-events-of-another-engine").await;
    // Send requests until both subscriptions are live (ZMQ's slow joiner).
    let end = Instant::now() + DEADLINE;
    let mut n = 0u32;
    let (mut got_exact, mut got_prefix) = (Vec::new(), Vec::new());
    while got_exact.is_empty() || got_prefix.is_empty() {
        assert!(
            Instant::now() < end,
            "no live batch reached the subscribers"
        );
        complete_ids(&sim, &(n * 100..n * 100 + 20).collect::<Vec<_>>(), 1).await;
        n += 1;
        if let Some(m) = recv_live(&mut exact, Duration::from_millis(200)).await {
            got_exact.push(m);
        }
        if let Some(m) = recv_live(&mut prefix, Duration::from_millis(50)).await {
            got_prefix.push(m);
        }
    }
    for k in 0..3 {
        complete_ids(
            &sim,
            &((n + k) * 100..(n + k) * 100 + 20).collect::<Vec<_>>(),
            1,
        )
        .await;
    }
    let total = (n + 3) as usize;
    let all = wait_batches(&sim, KvEventsWire::Map, "every request's batch", |b| {
        b.len() >= total
    })
    .await;
    assert_eq!(all.len(), total, "one batch per request");
    assert_consecutive_from(&all, 0);
    let last = all.last().unwrap().seq;
    for (sub, got) in [(&mut exact, &mut got_exact), (&mut prefix, &mut got_prefix)] {
        while got.last().map(|m| m.1) != Some(last) {
            let m = recv_live(sub, DEADLINE)
                .await
                .expect("live batches up to the last");
            got.push(m);
        }
        let first = got[0].1;
        for (i, (topic, seq, payload)) in got.iter().enumerate() {
            assert_eq!(topic.as_ref(), TOPIC.as_bytes());
            assert_eq!(*seq, first + i as u64, "live seqs are consecutive");
            assert_eq!(
                payload, &all[*seq as usize].payload,
                "live = replayed bytes"
            );
        }
    }
    // A subscriber to another topic gets nothing (every batch above went out meanwhile).
    assert!(recv_live(&mut other, Duration::from_millis(300))
        .await
        .is_none());

    // Replay from the middle, and past the end (just the end marker).
    let mid = replay(&replay_endpoint(&sim), 2, KvEventsWire::Map).await;
    assert_consecutive_from(&mid, 2);
    assert_eq!(mid.len(), total - 2);
    assert!(replay(&replay_endpoint(&sim), last + 1, KvEventsWire::Map)
        .await
        .is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn replay_keeps_the_last_buffer_steps_batches() {
    let sim = start(events_config(json!({"buffer_steps": 2})), |_| {}).await;
    for k in 0..4u32 {
        complete_ids(&sim, &(k * 100..k * 100 + 20).collect::<Vec<_>>(), 1).await;
    }
    let b = wait_batches(&sim, KvEventsWire::Map, "the last batch", |b| {
        b.last().map(|x| x.seq) == Some(3)
    })
    .await;
    assert_consecutive_from(&b, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn no_events_without_the_flag() {
    let sim = common::start(common::instant("m")).await;
    assert!(sim.kv_events().is_none());
    sim.shutdown().await;
    for json in [
        r#"{"enable_kv_cache_events": false, "publisher": "zmq", "endpoint": "tcp://*:PORT"}"#,
        r#"{"enable_kv_cache_events": true, "publisher": "null", "endpoint": "tcp://*:PORT"}"#,
    ] {
        let port = free_port();
        let kv = KvEventsConfig::from_json(&json.replace("PORT", &port.to_string())).unwrap();
        let sim = start(kv, |_| {}).await;
        assert!(sim.kv_events().is_none());
        complete_ids(&sim, &(0..40).collect::<Vec<_>>(), 1).await;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
            "nothing listens on the endpoint ({json})"
        );
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn array_wire_is_vllm_0_23s_and_bytes_hashes_convert_to_the_ints() {
    let prompt: Vec<u32> = (7..47).collect();
    let int_sim = start(events_config(json!({})), |_| {}).await;
    complete_ids(&int_sim, &prompt, 1).await;
    let ints =
        stored(&wait_batches(&int_sim, KvEventsWire::Map, "stored", |b| !b.is_empty()).await);
    int_sim.shutdown().await;

    let sim = start(events_config(json!({})), |c| {
        c.kv_events_wire = KvEventsWire::Array;
        c.kv_events_block_hashes = BlockHashFormat::Bytes;
    })
    .await;
    complete_ids(&sim, &prompt, 1).await;
    // The decoder checks the array layout (tag first, every field) and the replay framing
    // without a topic frame.
    let arrays =
        stored(&wait_batches(&sim, KvEventsWire::Array, "stored", |b| !b.is_empty()).await);
    assert_eq!(
        arrays, ints,
        "same events; 8-byte hashes read big-endian are the ints"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn lora_requests_carry_the_adapter() {
    let sim = start(events_config(json!({})), |c| {
        c.lora_modules = vec!["sql".into(), "tweet=/loras/tweet".into()];
    })
    .await;
    let (status, body) = common::post(
        &sim,
        "/v1/completions",
        &json!({"model": "tweet", "prompt": (0..40).collect::<Vec<u32>>(), "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let s = stored(&wait_batches(&sim, KvEventsWire::Map, "stored", |b| !b.is_empty()).await);
    assert_eq!(
        s[0].lora_id,
        Some(2),
        "vLLM numbers adapters from 1 in --lora-modules order"
    );
    assert_eq!(s[0].lora_name.as_deref(), Some("tweet"));
    assert_eq!(s[0].extra_keys, vec![Value::Array(vec!["tweet".into()]); 2]);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_connecting_publisher_reaches_a_binding_subscriber() {
    // vLLM connects when the endpoint has neither `*` nor `::`: the subscriber binds.
    let mut sub = SubSocket::new();
    sub.subscribe("").await.unwrap();
    let bound = sub.bind("tcp://127.0.0.1:0").await.unwrap();
    let sim = start(
        events_config(json!({"endpoint": bound.to_string()})),
        |_| {},
    )
    .await;
    let k = sim.kv_events().unwrap();
    assert_eq!(k.bound, None);
    assert_eq!(k.endpoint, bound.to_string());
    let end = Instant::now() + DEADLINE;
    let mut n = 0u32;
    let (topic, seq, payload) = loop {
        assert!(
            Instant::now() < end,
            "nothing reached the binding subscriber"
        );
        complete_ids(&sim, &(n * 100..n * 100 + 20).collect::<Vec<_>>(), 1).await;
        n += 1;
        if let Some(m) = recv_live(&mut sub, Duration::from_millis(200)).await {
            break m;
        }
    };
    assert_eq!(topic.as_ref(), TOPIC.as_bytes());
    let all = replay(&replay_endpoint(&sim), 0, KvEventsWire::Map).await;
    assert_eq!(all[seq as usize].payload, payload);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_restart_starts_again_at_seq_zero_with_an_empty_cache() {
    let (pub_port, replay_port) = (free_port(), free_port());
    let kv = events_config(json!({
        "endpoint": format!("tcp://*:{pub_port}"),
        "replay_endpoint": format!("tcp://127.0.0.1:{replay_port}"),
    }));
    let prompt: Vec<u32> = (0..40).collect();
    let mut first = Vec::new();
    for run in 0..2 {
        let sim = start(kv.clone(), |_| {}).await;
        assert_eq!(sim.kv_events().unwrap().bound.unwrap().port(), pub_port);
        assert_eq!(
            complete_ids(&sim, &prompt, 1).await,
            0,
            "run {run}: cold cache"
        );
        let b = wait_batches(&sim, KvEventsWire::Map, "stored", |b| !b.is_empty()).await;
        assert_consecutive_from(&b, 0);
        assert_eq!(b.len(), 1);
        if run == 0 {
            first = b[0].events.clone();
        } else {
            assert_eq!(
                b[0].events, first,
                "the same first batch, no AllBlocksCleared"
            );
        }
        sim.shutdown().await;
    }
}

#[test]
fn cli_documents_the_flags_and_rejects_unknown_keys() {
    let out = Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--kv-events-config",
        "--kv-events-wire",
        "enable_kv_cache_events",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
        .args([
            "--port",
            "0",
            "--kv-events-config",
            r#"{"enable_kv_cache_events": true, "bogus": 1}"#,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus"), "{err}");
}

#[tokio::test]
async fn the_binary_publishes_with_vllms_flag() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
        .args([
            "--port",
            "0",
            "--model",
            "m",
            "--time-scale",
            "0",
            "--kv-events-config",
            r#"{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:0", "replay_endpoint": "tcp://127.0.0.1:0", "topic": "kv-events"}"#,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = lines.next().unwrap().unwrap();
    let events = lines.next().unwrap().unwrap();
    let url = serving
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    assert!(
        events.contains("publishing KV events on tcp://0.0.0.0:"),
        "{events}"
    );
    let replay_ep = events
        .split_whitespace()
        .find(|w| w.starts_with("tcp://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no replay endpoint in {events:?}"))
        .to_string();
    let r = common::client()
        .post(format!("{url}/v1/completions"))
        .json(&json!({"model": "m", "prompt": (0..40).collect::<Vec<u32>>(), "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let end = Instant::now() + DEADLINE;
    let b = loop {
        let b = replay_raw(&replay_ep, 0, KvEventsWire::Map).await;
        if !b.is_empty() {
            break b;
        }
        assert!(Instant::now() < end, "no batch from the binary");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(b[0].1, 0);
    let Ev::Stored(s) = &decode(&b[0].2, KvEventsWire::Map)[0] else {
        panic!("BlockStored first")
    };
    assert_eq!(s.tokens, (0..32).collect::<Vec<u64>>());
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(child.wait().unwrap().success());
}
