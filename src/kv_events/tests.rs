//! The subscriber against real ZMQ sockets run by the test: a PUB socket standing for vLLM's
//! publisher and a ROUTER socket answering replay requests as vLLM's does. No timing
//! assertions: every wait polls the index until a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use rmpv::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::wire::fixtures::{batch, cleared_array, removed_array, stored_array, stored_map, Hash};
use super::{KvEventsSubscriber, KvIndex, SubscriberOptions, DEFAULT_CAPACITY};
use crate::kv_blocks::{chain_keys, BlockKey};

const BS: usize = 4;
const LABEL: &str = "127.0.0.1:8000";
const DEADLINE: Duration = Duration::from_secs(20);

fn tokens(blocks: usize, salt: u32) -> Vec<u32> {
    (0..(blocks * BS) as u32).map(|i| i * 17 + salt).collect()
}

fn ints(first: u64, n: usize) -> Vec<Hash> {
    (first..first + n as u64).map(Hash::Int).collect()
}

/// A `BlockStored` batch of `tokens` with engine hashes `first..` after `parent`.
fn stored(first: u64, parent: Option<u64>, tokens: &[u32]) -> Vec<u8> {
    batch(vec![stored_array(
        &ints(first, tokens.len() / BS),
        parent.map(Hash::Int),
        tokens,
        BS as u64,
    )])
}

fn frames(topic: &[u8], seq: i64, payload: &[u8]) -> ZmqMessage {
    let frames = vec![
        Bytes::copy_from_slice(topic),
        Bytes::copy_from_slice(&seq.to_be_bytes()),
        Bytes::copy_from_slice(payload),
    ];
    ZmqMessage::try_from(frames).unwrap()
}

/// Leading blocks of `tokens` the index says the test endpoint holds.
fn held(index: &KvIndex, tokens: &[u32]) -> usize {
    let keys: Vec<BlockKey> = chain_keys(tokens, BS);
    index.matched(&keys, &[LABEL])[0]
}

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Batches an engine published, by sequence number (its replay buffer).
type Buffer = Arc<Mutex<Vec<(i64, Vec<u8>)>>>;

/// A fake engine: its PUB socket, and the batches it published (for replay).
struct Engine {
    publisher: PubSocket,
    addr: String,
    buffer: Buffer,
}

impl Engine {
    async fn bind(addr: &str) -> Engine {
        let mut publisher = PubSocket::new();
        let addr = publisher.bind(addr).await.unwrap().to_string();
        Engine {
            publisher,
            addr,
            buffer: Arc::default(),
        }
    }

    /// Publish batch `seq` (and keep it for replay).
    async fn publish(&mut self, seq: i64, payload: &[u8]) {
        self.buffer.lock().push((seq, payload.to_vec()));
        self.publisher
            .send(frames(b"kv", seq, payload))
            .await
            .unwrap();
    }

    /// Keep batch `seq` for replay without delivering it (as if the subscriber missed it).
    fn drop_batch(&self, seq: i64, payload: &[u8]) {
        self.buffer.lock().push((seq, payload.to_vec()));
    }

    /// Publish `seq` until the subscriber shows it received it: messages sent before a SUB's
    /// subscription reaches the PUB are dropped by design. A batch received twice looks like a
    /// restart to the subscriber, which clears and applies it again: the same end state.
    async fn publish_until(&mut self, seq: i64, payload: &[u8], mut seen: impl FnMut() -> bool) {
        let start = Instant::now();
        self.buffer.lock().push((seq, payload.to_vec()));
        loop {
            self.publisher
                .send(frames(b"kv", seq, payload))
                .await
                .unwrap();
            for _ in 0..20 {
                if seen() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(start.elapsed() < DEADLINE, "batch {seq} never arrived");
        }
    }

    /// Serve replay requests on a ROUTER socket as vLLM does; `with_topic`: newer vLLM's
    /// `[topic, seq, payload]` answers, else `[seq, payload]`.
    async fn serve_replay(&self, with_topic: bool) -> (String, JoinHandle<()>) {
        let mut router = RouterSocket::new();
        let addr = router.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
        let buffer = self.buffer.clone();
        let task = tokio::spawn(async move {
            while let Ok(request) = router.recv().await {
                let request = request.into_vec();
                let [id, _, start] = &request[..] else {
                    continue;
                };
                let start = i64::from_be_bytes(start[..].try_into().unwrap());
                let mut answers: Vec<(i64, Vec<u8>)> = buffer
                    .lock()
                    .iter()
                    .filter(|(seq, _)| *seq >= start)
                    .cloned()
                    .collect();
                answers.push((-1, Vec::new()));
                for (seq, payload) in answers {
                    let mut out = vec![id.clone(), Bytes::new()];
                    if with_topic {
                        out.push(Bytes::from_static(if seq < 0 { b"" } else { b"kv" }));
                    }
                    out.push(Bytes::copy_from_slice(&seq.to_be_bytes()));
                    out.push(Bytes::from(payload));
                    if router
                        .send(ZmqMessage::try_from(out).unwrap())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        });
        (addr, task)
    }
}

fn options(replay: Option<String>) -> SubscriberOptions {
    SubscriberOptions {
        replay,
        connect_timeout: Duration::from_secs(1),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(200),
        idle_reconnect: None,
        ..SubscriberOptions::default()
    }
}

fn start(
    index: &Arc<KvIndex>,
    addr: &str,
    options: SubscriberOptions,
) -> (watch::Sender<bool>, JoinHandle<()>) {
    let (stop, rx) = watch::channel(false);
    let subscriber = KvEventsSubscriber::new(index.clone(), LABEL, addr, options);
    (stop, tokio::spawn(subscriber.run(rx)))
}

async fn stop(stop: watch::Sender<bool>, task: JoinHandle<()>) {
    stop.send(true).unwrap();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("the subscriber stops when told")
        .unwrap();
}

#[tokio::test]
async fn follows_a_stream_through_removals_gaps_restarts_and_bad_batches() {
    let index = Arc::new(KvIndex::new("kv-test-follow", DEFAULT_CAPACITY));
    let mut engine = Engine::bind("tcp://127.0.0.1:0").await;
    let (stop_tx, task) = start(&index, &engine.addr, options(None));

    // seq 0: two blocks.
    let a = tokens(3, 1);
    engine
        .publish_until(0, &stored(1, None, &a[..2 * BS]), || held(&index, &a) == 2)
        .await;
    // seq 1: a third block, after engine block 2.
    engine.publish(1, &stored(3, Some(2), &a[2 * BS..])).await;
    until("the continuation", || held(&index, &a) == 3).await;
    // seq 2: the engine evicts the third block.
    engine
        .publish(2, &batch(vec![removed_array(&ints(3, 1))]))
        .await;
    until("the removal", || held(&index, &a) == 2).await;

    // seq 5 after 2: a gap, and no replay socket: what the index had is forgotten.
    let b = tokens(1, 2);
    engine.publish(5, &stored(10, None, &b)).await;
    until("the gap to clear the endpoint", || {
        held(&index, &b) == 1 && held(&index, &a) == 0
    })
    .await;

    // seq 0 after 5: the engine restarted.
    let c = tokens(2, 3);
    engine.publish(0, &stored(20, None, &c)).await;
    until("the restart to clear the endpoint", || {
        held(&index, &c) == 2 && held(&index, &b) == 0
    })
    .await;

    // seq 1: an unreadable batch forgets everything; seq 2 continues from it.
    engine.publish(1, b"\xc1 not msgpack").await;
    until("the bad batch to clear the endpoint", || {
        held(&index, &c) == 0
    })
    .await;
    let d = tokens(1, 4);
    let bytes_hash = Hash::Bytes(vec![0xab; 32]);
    let payload = batch(vec![stored_map(&[bytes_hash], None, &d, BS as u64)]);
    engine.publish(2, &payload).await;
    until("the batch after the bad one", || held(&index, &d) == 1).await;

    // seq 3: the engine drops its whole cache.
    engine.publish(3, &batch(vec![cleared_array()])).await;
    until("AllBlocksCleared", || held(&index, &d) == 0).await;
    assert_eq!(index.blocks(), 0);

    stop(stop_tx, task).await;
}

#[tokio::test]
async fn a_gap_is_filled_from_the_replay_socket() {
    let index = Arc::new(KvIndex::new("kv-test-replay", DEFAULT_CAPACITY));
    let mut engine = Engine::bind("tcp://127.0.0.1:0").await;
    let (replay, server) = engine.serve_replay(true).await;
    let (stop_tx, task) = start(&index, &engine.addr, options(Some(replay)));

    let a = tokens(3, 5);
    engine
        .publish_until(0, &stored(1, None, &a[..BS]), || held(&index, &a) == 1)
        .await;
    // The subscriber misses seq 1 and 2...
    let b = tokens(2, 6);
    engine.drop_batch(1, &stored(2, Some(1), &a[BS..]));
    engine.drop_batch(2, &stored(10, None, &b[..BS]));
    // ...and sees seq 3, which follows a block stored in seq 2.
    engine.publish(3, &stored(11, Some(10), &b[BS..])).await;
    until("the replayed batches and the live one", || {
        held(&index, &a) == 3 && held(&index, &b) == 2
    })
    .await;

    stop(stop_tx, task).await;
    server.abort();
}

#[tokio::test]
async fn a_new_subscriber_rebuilds_from_the_replay_buffer() {
    let index = Arc::new(KvIndex::new("kv-test-bootstrap", DEFAULT_CAPACITY));
    let mut engine = Engine::bind("tcp://127.0.0.1:0").await;
    let (replay, server) = engine.serve_replay(false).await;
    // What the engine published before anyone subscribed.
    let a = tokens(3, 7);
    engine.drop_batch(0, &stored(1, None, &a[..BS]));
    engine.drop_batch(1, &stored(2, Some(1), &a[BS..2 * BS]));
    engine.drop_batch(
        2,
        &batch(vec![Value::Array(vec![Value::from("SomeFutureEvent")])]),
    );
    let (stop_tx, task) = start(&index, &engine.addr, options(Some(replay)));
    engine
        .publish_until(3, &stored(3, Some(2), &a[2 * BS..]), || {
            held(&index, &a) == 3
        })
        .await;

    stop(stop_tx, task).await;
    server.abort();
}

#[tokio::test]
async fn a_lost_connection_forgets_and_a_restarted_engine_is_followed() {
    let index = Arc::new(KvIndex::new("kv-test-reconnect", DEFAULT_CAPACITY));
    let mut engine = Engine::bind("tcp://127.0.0.1:0").await;
    let addr = engine.addr.clone();
    let (stop_tx, task) = start(&index, &addr, options(None));

    let a = tokens(2, 8);
    engine
        .publish_until(0, &stored(1, None, &a), || held(&index, &a) == 2)
        .await;
    // The engine dies: its cache is gone, so is what the index said of it.
    drop(engine);
    until("the lost connection to clear the endpoint", || {
        held(&index, &a) == 0
    })
    .await;
    // It comes back on the same address and starts its sequence again.
    let mut engine = Engine::bind(&addr).await;
    let b = tokens(3, 9);
    engine
        .publish_until(0, &stored(1, None, &b[..2 * BS]), || held(&index, &b) == 2)
        .await;
    engine.publish(1, &stored(3, Some(2), &b[2 * BS..])).await;
    until("the stream after the reconnect", || held(&index, &b) == 3).await;
    assert_eq!(held(&index, &a), 0);

    stop(stop_tx, task).await;
}

#[tokio::test]
async fn stops_promptly_even_while_connecting() {
    // Nothing listens there: the subscriber keeps trying until told to stop.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let index = Arc::new(KvIndex::new("kv-test-stop", DEFAULT_CAPACITY));
    let mut opts = options(None);
    opts.connect_timeout = Duration::from_secs(30);
    let (stop_tx, task) = start(&index, &format!("tcp://127.0.0.1:{port}"), opts);
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop(stop_tx, task).await;

    // A dropped stop sender stops it too.
    let (stop_tx, task) = start(&index, &format!("tcp://127.0.0.1:{port}"), options(None));
    drop(stop_tx);
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("the subscriber stops when its stop sender is gone")
        .unwrap();
}
