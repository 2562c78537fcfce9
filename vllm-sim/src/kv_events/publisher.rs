//! vLLM's `ZmqEventPublisher` (`vllm/distributed/kv_events.py`, vLLM 0.34.0) on the pure-Rust
//! `zeromq` crate.
//!
//! The engine hands each step's [`EventBatch`] to a queue ([`KvEventSender::publish`]) and
//! goes on; one task owns the sockets and does the rest, as vLLM's publisher thread does:
//!
//! * It numbers batches from 0 (per process), encodes them ([`super::encode_batch`]) and
//!   sends `[topic, seq as 8-byte big-endian, payload]` on the PUB socket. PUB drops what a
//!   slow subscriber cannot take, and everything while no subscriber is connected.
//! * It keeps the last `buffer_steps` `(seq, payload)` pairs for the ROUTER replay socket. A
//!   request is `[identity, b"", start_seq as 8-byte big-endian]` (what a REQ socket sends);
//!   the answer is one message per buffered batch with `seq >= start_seq`, then an end
//!   marker, all behind `[identity, b""]`: `[topic, seq, payload]` and `[b"", -1, b""]`
//!   (vLLM 0.34), or `[seq, payload]` and `[-1, b""]` with [`KvEventsWire::Array`] (vLLM
//!   0.23). `-1` is eight `0xff` bytes. Requests of another shape are ignored, as in vLLM.
//! * An endpoint with `*` or `::` is bound; any other is connected to, retrying until the
//!   subscriber listens (batches are numbered and kept for replay meanwhile).
//!
//! It waits on its queue and sockets only, so an idle simulator stays idle.

use std::collections::VecDeque;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zeromq::{PubSocket, RouterSocket, Socket, SocketOptions, SocketRecv, SocketSend, ZmqMessage};

use super::config::{parse_bind, BlockHashFormat, KvEventsConfig, KvEventsWire, PubEndpoint};
use super::wire::{encode_batch, EventBatch};
use super::KvEventsError;

/// vLLM's end-of-replay sequence number, `(-1).to_bytes(8, "big", signed=True)`.
pub const END_SEQ: [u8; 8] = [0xff; 8];

/// How long [`KvEventPublisher::shutdown`] lets the task drain (vLLM's `SHUTDOWN_TIMEOUT`).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// Where the sockets are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEventsEndpoints {
    /// The PUB endpoint: `tcp://ADDR:PORT` where it is bound (port 0 resolved), or the
    /// endpoint it connects to.
    pub endpoint: String,
    /// The PUB socket's listening address; `None` when it connects.
    pub bound: Option<SocketAddr>,
    /// The replay ROUTER socket's listening address, if there is one.
    pub replay: Option<SocketAddr>,
    /// The topic (first frame of every message).
    pub topic: String,
}

impl KvEventsEndpoints {
    /// Where a subscriber on this machine connects: the bound PUB address, an unspecified IP
    /// (`*`, `::`) replaced by loopback. `None` when the publisher connects.
    pub fn local_endpoint(&self) -> Option<String> {
        self.bound.map(local_tcp)
    }

    /// Where a replay client on this machine connects, as [`Self::local_endpoint`].
    pub fn local_replay_endpoint(&self) -> Option<String> {
        self.replay.map(local_tcp)
    }
}

fn local_tcp(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("tcp://{}", SocketAddr::new(ip, addr.port()))
}

/// The engine's end of the publisher's queue.
#[derive(Debug, Clone)]
pub struct KvEventSender(Queue);

#[derive(Debug, Clone)]
enum Queue {
    Bounded(mpsc::Sender<EventBatch>),
    Unbounded(mpsc::UnboundedSender<EventBatch>),
}

impl KvEventSender {
    /// Queues a batch; waits while a bounded queue is full (vLLM's `Queue.put` blocks too).
    /// `false` when the publisher is gone.
    pub async fn publish(&self, batch: EventBatch) -> bool {
        match &self.0 {
            Queue::Bounded(tx) => tx.send(batch).await.is_ok(),
            Queue::Unbounded(tx) => tx.send(batch).is_ok(),
        }
    }
}

enum Receiver {
    Bounded(mpsc::Receiver<EventBatch>),
    Unbounded(mpsc::UnboundedReceiver<EventBatch>),
}

impl Receiver {
    async fn recv(&mut self) -> Option<EventBatch> {
        match self {
            Receiver::Bounded(rx) => rx.recv().await,
            Receiver::Unbounded(rx) => rx.recv().await,
        }
    }
}

/// A running publisher: its sockets are open and its task runs until [`Self::shutdown`] or
/// drop.
#[derive(Debug)]
pub struct KvEventPublisher {
    sender: Option<KvEventSender>,
    endpoints: KvEventsEndpoints,
    task: Option<JoinHandle<()>>,
}

impl KvEventPublisher {
    /// Opens the sockets (binding fails here, typed) and starts the task. Must be called
    /// inside a Tokio runtime.
    pub async fn start(
        cfg: &KvEventsConfig,
        wire: KvEventsWire,
        hashes: BlockHashFormat,
    ) -> Result<Self, KvEventsError> {
        cfg.validate()?;
        let pub_endpoint = PubEndpoint::parse(&cfg.endpoint)?;
        let (pub_sock, bound, connect) = match pub_endpoint {
            PubEndpoint::Bind(addr) => {
                let mut sock = PubSocket::new();
                let local = bind(&mut sock, &cfg.endpoint, addr).await?;
                (sock, Some(local), None)
            }
            PubEndpoint::Connect(ep) => {
                let mut opts = SocketOptions::default();
                opts.no_connect_timeout();
                (PubSocket::with_options(opts), None, Some(ep))
            }
        };
        let (replay, replay_addr) = match &cfg.replay_endpoint {
            Some(ep) => {
                let mut sock = RouterSocket::new();
                let local = bind(&mut sock, ep, parse_bind(ep)?).await?;
                (Some(sock), Some(local))
            }
            None => (None, None),
        };
        let (sender, rx) = if cfg.max_queue_size > 0 {
            let cap = usize::try_from(cfg.max_queue_size)
                .unwrap_or(usize::MAX)
                .min(tokio::sync::Semaphore::MAX_PERMITS);
            let (tx, rx) = mpsc::channel(cap);
            (Queue::Bounded(tx), Receiver::Bounded(rx))
        } else {
            let (tx, rx) = mpsc::unbounded_channel();
            (Queue::Unbounded(tx), Receiver::Unbounded(rx))
        };
        let endpoints = KvEventsEndpoints {
            endpoint: match bound {
                Some(addr) => format!("tcp://{addr}"),
                None => cfg.endpoint.clone(),
            },
            bound,
            replay: replay_addr,
            topic: cfg.topic.clone(),
        };
        let core = Core {
            next_seq: 0,
            buffer: VecDeque::new(),
            capacity: usize::try_from(cfg.buffer_steps).unwrap_or(0),
            topic: Bytes::from(cfg.topic.clone().into_bytes()),
            wire,
            hashes,
            warned_connect: false,
        };
        let task = tokio::spawn(run(core, rx, pub_sock, connect, replay));
        Ok(KvEventPublisher {
            sender: Some(KvEventSender(sender)),
            endpoints,
            task: Some(task),
        })
    }

    /// A handle for the engine.
    pub fn sender(&self) -> Option<KvEventSender> {
        self.sender.clone()
    }

    /// Where the sockets are.
    pub fn endpoints(&self) -> &KvEventsEndpoints {
        &self.endpoints
    }

    /// Lets the task publish what is queued (at most one second once every sender is gone,
    /// as vLLM's shutdown), then closes the sockets and waits until their ports are free.
    pub async fn shutdown(mut self) {
        self.sender = None;
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_TIMEOUT, &mut task)
                .await
                .is_err()
            {
                task.abort();
                // A cancelled task's JoinError is the expected outcome.
                let _ = task.await;
            }
        }
    }
}

impl Drop for KvEventPublisher {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Binds `sock` on `addr` (the resolved form of `endpoint`); returns the local address.
async fn bind<S: Socket>(
    sock: &mut S,
    endpoint: &str,
    addr: SocketAddr,
) -> Result<SocketAddr, KvEventsError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|source| KvEventsError::Bind {
        endpoint: endpoint.to_string(),
        source,
    })?;
    let local = listener
        .local_addr()
        .map_err(|source| KvEventsError::Bind {
            endpoint: endpoint.to_string(),
            source,
        })?;
    sock.bind_listener(listener)
        .await
        .map_err(|source| KvEventsError::Zmq {
            endpoint: endpoint.to_string(),
            source,
        })?;
    Ok(local)
}

/// The publisher's state besides its sockets.
struct Core {
    next_seq: u64,
    buffer: VecDeque<(u64, Bytes)>,
    capacity: usize,
    topic: Bytes,
    wire: KvEventsWire,
    hashes: BlockHashFormat,
    warned_connect: bool,
}

impl Core {
    /// Numbers, encodes and keeps a batch; returns the PUB message.
    fn record(&mut self, batch: EventBatch) -> Option<ZmqMessage> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let payload = match encode_batch(&batch, self.wire, self.hashes) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                eprintln!("vllm-sim: kv events: batch {seq} dropped: {e}");
                return None;
            }
        };
        if self.capacity > 0 {
            if self.buffer.len() == self.capacity {
                self.buffer.pop_front();
            }
            self.buffer.push_back((seq, payload.clone()));
        }
        ZmqMessage::try_from(vec![
            self.topic.clone(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload,
        ])
        .ok()
    }

    /// Answers one replay request.
    async fn serve_replay(&self, router: &mut RouterSocket, request: ZmqMessage) {
        let frames = request.into_vec();
        let [client, _delimiter, start] = frames.as_slice() else {
            eprintln!(
                "vllm-sim: kv events: invalid replay request of {} frames",
                frames.len()
            );
            return;
        };
        let start = be_uint(start);
        for (seq, payload) in self.buffer.iter().filter(|(s, _)| u128::from(*s) >= start) {
            let seq = Bytes::copy_from_slice(&seq.to_be_bytes());
            let frames = match self.wire {
                KvEventsWire::Map => vec![
                    client.clone(),
                    Bytes::new(),
                    self.topic.clone(),
                    seq,
                    payload.clone(),
                ],
                KvEventsWire::Array => vec![client.clone(), Bytes::new(), seq, payload.clone()],
            };
            if !send_reply(router, frames).await {
                return;
            }
        }
        let end = Bytes::from_static(&END_SEQ);
        let frames = match self.wire {
            KvEventsWire::Map => vec![
                client.clone(),
                Bytes::new(),
                Bytes::new(),
                end,
                Bytes::new(),
            ],
            KvEventsWire::Array => vec![client.clone(), Bytes::new(), end, Bytes::new()],
        };
        send_reply(router, frames).await;
    }

    /// Serves the queue (numbering and keeping batches without sending them) and the replay
    /// socket until `fut` completes; `None` once the queue is closed.
    async fn serve_until<F: Future>(
        &mut self,
        rx: &mut Receiver,
        replay: &mut Option<RouterSocket>,
        fut: F,
    ) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                batch = rx.recv() => match batch {
                    Some(b) => {
                        let _ = self.record(b);
                    }
                    None => return None,
                },
                req = recv_replay(replay) => self.on_replay(replay, req).await,
            }
        }
    }

    async fn on_replay(
        &self,
        replay: &mut Option<RouterSocket>,
        req: zeromq::ZmqResult<ZmqMessage>,
    ) {
        match (req, replay.as_mut()) {
            (Ok(msg), Some(router)) => self.serve_replay(router, msg).await,
            (Ok(_), None) => {}
            (Err(e), _) => {
                eprintln!("vllm-sim: kv events: replay socket: {e}");
                // Do not spin on a broken socket.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Sends a ROUTER reply; `false` when the client is gone.
async fn send_reply(router: &mut RouterSocket, frames: Vec<Bytes>) -> bool {
    match ZmqMessage::try_from(frames) {
        Ok(msg) => router.send(msg).await.is_ok(),
        Err(_) => false,
    }
}

/// The next replay request, or never without a replay socket.
async fn recv_replay(replay: &mut Option<RouterSocket>) -> zeromq::ZmqResult<ZmqMessage> {
    match replay {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Python's `int.from_bytes(b, "big")`, saturating beyond 128 bits.
fn be_uint(b: &[u8]) -> u128 {
    b.iter().fold(0u128, |acc, &x| {
        acc.checked_mul(256)
            .and_then(|v| v.checked_add(u128::from(x)))
            .unwrap_or(u128::MAX)
    })
}

async fn run(
    mut core: Core,
    mut rx: Receiver,
    mut pub_sock: PubSocket,
    connect: Option<String>,
    mut replay: Option<RouterSocket>,
) {
    if let Some(ep) = connect {
        let mut delay = Duration::from_millis(100);
        loop {
            let attempt = core
                .serve_until(&mut rx, &mut replay, pub_sock.connect(&ep))
                .await;
            match attempt {
                None => return close(pub_sock, replay).await,
                Some(Ok(())) => break,
                Some(Err(e)) => {
                    if !core.warned_connect {
                        eprintln!("vllm-sim: kv events: cannot connect to {ep} ({e}); retrying");
                        core.warned_connect = true;
                    }
                    let wait = tokio::time::sleep(delay);
                    if core.serve_until(&mut rx, &mut replay, wait).await.is_none() {
                        return close(pub_sock, replay).await;
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
    loop {
        tokio::select! {
            batch = rx.recv() => match batch {
                Some(b) => {
                    if let Some(msg) = core.record(b) {
                        if let Err(e) = pub_sock.send(msg).await {
                            eprintln!("vllm-sim: kv events: publish failed: {e}");
                        }
                    }
                }
                None => break,
            },
            req = recv_replay(&mut replay) => core.on_replay(&mut replay, req).await,
        }
    }
    close(pub_sock, replay).await;
}

/// Closes the sockets, waiting until their listeners are gone.
async fn close(pub_sock: PubSocket, replay: Option<RouterSocket>) {
    let _ = pub_sock.close().await;
    if let Some(r) = replay {
        let _ = r.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_endpoints_use_loopback_for_wildcards() {
        let e = KvEventsEndpoints {
            endpoint: "tcp://0.0.0.0:5557".into(),
            bound: Some("0.0.0.0:5557".parse().unwrap()),
            replay: Some("[::]:5558".parse().unwrap()),
            topic: String::new(),
        };
        assert_eq!(e.local_endpoint().unwrap(), "tcp://127.0.0.1:5557");
        assert_eq!(e.local_replay_endpoint().unwrap(), "tcp://[::1]:5558");
        let e = KvEventsEndpoints {
            bound: None,
            replay: Some("127.0.0.2:1".parse().unwrap()),
            ..e
        };
        assert_eq!(e.local_endpoint(), None);
        assert_eq!(e.local_replay_endpoint().unwrap(), "tcp://127.0.0.2:1");
    }

    #[test]
    fn start_seq_is_pythons_big_endian_int() {
        assert_eq!(be_uint(&5u64.to_be_bytes()), 5);
        assert_eq!(be_uint(&[]), 0);
        assert_eq!(be_uint(&[1, 0]), 256);
        assert_eq!(be_uint(&[0xff; 20]), u128::MAX);
    }
}
