//! [`KvEventsSubscriber`]: one task per endpoint that follows its engine's KV-event stream into
//! the pool's [`KvIndex`].
//!
//! It connects a ZMQ SUB socket (the pure-Rust `zeromq` crate on tokio) to the engine's PUB
//! address, subscribes to the topic, and applies each batch in sequence order. What it cannot
//! prove continuous it forgets (see the module docs of `kv_events` for the whole policy):
//!
//! - start: the endpoint's entries are cleared (nothing is known of the stream yet); the first
//!   message sets the sequence, after replaying what the engine still buffers before it when a
//!   replay address is given;
//! - gap (`seq > last + 1`): the missing batches are asked from the engine's ROUTER replay
//!   socket; without one, or when the replay cannot fill the gap exactly, the endpoint's entries
//!   are cleared before the batch is applied;
//! - sequence going back (`seq <= last`): the engine restarted; clear and start over;
//! - connection lost: clear at once (a dead engine's cache is gone), reconnect with a capped
//!   exponential back-off, start over;
//! - engine silent for `idle_reconnect`: reconnect (a half-open connection would otherwise look
//!   like a quiet engine); any gap right after it clears rather than replays;
//! - an unreadable batch: clear, and continue from its sequence number.
//!
//! The task ends promptly when its stop signal is raised (or its sender dropped).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use zeromq::{
    DealerSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage,
};

use super::index::KvIndex;
use super::wire::{decode_message, decode_payload, decode_seq, KvEvent, KvEventBatch, WireError};
use crate::telemetry;

/// How a subscriber connects, replays and retries.
#[derive(Debug, Clone)]
pub struct SubscriberOptions {
    /// ZMQ topic prefix to subscribe to (`""`: every topic, vLLM's default).
    pub topic: String,
    /// The engine's replay socket (vLLM's `replay_endpoint`, a ROUTER), e.g.
    /// `tcp://10.0.0.5:5558`; `None`: gaps are resolved by forgetting.
    pub replay: Option<String>,
    /// The longest one replay may take.
    pub replay_timeout: Duration,
    /// With a replay socket, rebuild from what the engine still buffers when a stream starts
    /// (first message, after a restart or a lost connection).
    pub replay_on_start: bool,
    /// The longest one connection attempt may take.
    pub connect_timeout: Duration,
    /// First wait before reconnecting after a failure.
    pub backoff_min: Duration,
    /// Longest wait between reconnection attempts.
    pub backoff_max: Duration,
    /// Reconnect after this long without a message; `None`: never.
    pub idle_reconnect: Option<Duration>,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        SubscriberOptions {
            topic: String::new(),
            replay: None,
            replay_timeout: Duration::from_secs(2),
            replay_on_start: true,
            connect_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            idle_reconnect: Some(Duration::from_secs(60)),
        }
    }
}

/// Why a replay could not be used.
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error("replay socket: {0}")]
    Zmq(#[from] zeromq::ZmqError),
    #[error("replay timed out")]
    Timeout,
    #[error("replay answer has {0} frames")]
    Frames(usize),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Why a connection ended.
enum Ended {
    /// The connection was lost or failed.
    Lost(String),
    /// Nothing arrived for `idle_reconnect`.
    Idle,
}

/// Follows one endpoint's KV-event stream into its pool's [`KvIndex`]; see the module docs.
pub struct KvEventsSubscriber {
    index: Arc<KvIndex>,
    endpoint: String,
    addr: String,
    options: SubscriberOptions,
    /// Sequence number of the last batch applied.
    last: Option<i64>,
    /// No message has arrived yet on the current connection.
    fresh: bool,
}

impl KvEventsSubscriber {
    /// Follow the stream published at `zmq_addr` (`tcp://host:port`) by the engine of
    /// `endpoint` (its label, `host:port`) into `index`.
    pub fn new(
        index: Arc<KvIndex>,
        endpoint: &str,
        zmq_addr: &str,
        options: SubscriberOptions,
    ) -> Self {
        KvEventsSubscriber {
            index,
            endpoint: endpoint.to_string(),
            addr: zmq_addr.to_string(),
            options,
            last: None,
            fresh: true,
        }
    }

    /// Run until `stop` holds `true` (or its sender is dropped).
    pub async fn run(mut self, stop: watch::Receiver<bool>) {
        self.follow(stop).await;
        telemetry::set_kv_events_connected(self.index.pool(), &self.endpoint, false);
    }

    async fn follow(&mut self, mut stop: watch::Receiver<bool>) {
        let pool = self.index.pool().to_string();
        telemetry::touch_kv_endpoint(&pool, &self.endpoint);
        // Whatever the index holds for this endpoint, this stream cannot vouch for it.
        self.index.clear_endpoint(&self.endpoint);
        let mut backoff = self.options.backoff_min;
        let mut failures = 0u32;
        loop {
            let mut socket_options = SocketOptions::default();
            socket_options.connect_timeout(self.options.connect_timeout);
            let mut socket = SubSocket::with_options(socket_options);
            let mut monitor = socket.monitor();
            let connected = tokio::select! {
                biased;
                _ = stopped(&mut stop) => return,
                r = connect(&mut socket, &self.addr, &self.options.topic) => r,
            };
            let ended = match connected {
                Err(e) => Ended::Lost(format!("cannot connect: {e}")),
                Ok(()) => {
                    if failures > 0 {
                        log::info!(
                            "pool {pool}: KV events of {} connected again ({})",
                            self.endpoint,
                            self.addr
                        );
                    } else {
                        log::info!(
                            "pool {pool}: following KV events of {} at {}",
                            self.endpoint,
                            self.addr
                        );
                    }
                    failures = 0;
                    telemetry::set_kv_events_connected(&pool, &self.endpoint, true);
                    self.fresh = true;
                    loop {
                        let frames = tokio::select! {
                            biased;
                            _ = stopped(&mut stop) => return,
                            event = monitor.recv() => {
                                let lost = match &event {
                                    Ok(e) => matches!(e, SocketEvent::Disconnected(_)),
                                    Err(_) => true,
                                };
                                if lost {
                                    break Ended::Lost("disconnected".into());
                                }
                                continue;
                            }
                            msg = socket.recv() => match msg {
                                Ok(m) => m.into_vec(),
                                Err(e) => break Ended::Lost(format!("receive failed: {e}")),
                            },
                            _ = idle(self.options.idle_reconnect) => break Ended::Idle,
                        };
                        backoff = self.options.backoff_min;
                        tokio::select! {
                            biased;
                            _ = stopped(&mut stop) => return,
                            _ = self.on_message(&frames) => {}
                        }
                    }
                }
            };
            drop(socket);
            telemetry::set_kv_events_connected(&pool, &self.endpoint, false);
            match ended {
                Ended::Idle => {
                    log::debug!(
                        "pool {pool}: no KV events from {} for a while; reconnecting",
                        self.endpoint
                    );
                }
                Ended::Lost(why) => {
                    if failures == 0 && self.last.is_some() {
                        log::warn!(
                            "pool {pool}: KV events of {} ({}): {why}; its cached blocks are forgotten until the stream resumes",
                            self.endpoint,
                            self.addr
                        );
                    } else if failures == 0 {
                        log::warn!(
                            "pool {pool}: KV events of {} ({}): {why}; retrying",
                            self.endpoint,
                            self.addr
                        );
                    } else {
                        log::debug!("pool {pool}: KV events of {}: {why}", self.endpoint);
                    }
                    // Only a stream that delivered something left entries to forget.
                    if self.last.is_some() {
                        self.resync("reconnect");
                    }
                    self.last = None;
                    failures = failures.saturating_add(1);
                    tokio::select! {
                        biased;
                        _ = stopped(&mut stop) => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = backoff.saturating_mul(2).min(self.options.backoff_max);
                }
            }
        }
    }

    /// Handle one live message.
    async fn on_message(&mut self, frames: &[Bytes]) {
        let message = match decode_message(frames) {
            Ok(m) => m,
            Err(e) => {
                log::warn!(
                    "pool {}: unreadable KV-event batch from {}: {e}; its blocks are forgotten",
                    self.index.pool(),
                    self.endpoint
                );
                self.resync("decode_error");
                // Continue from its sequence number when it has one.
                self.last = match frames {
                    [_, seq, _] => decode_seq(seq).ok(),
                    _ => None,
                };
                self.fresh = false;
                return;
            }
        };
        let seq = message.seq;
        match self.last {
            None => self.bootstrap(seq).await,
            Some(last) if Some(seq) == last.checked_add(1) => {}
            Some(last) if seq > last => {
                self.count_resync("gap");
                match &self.options.replay {
                    Some(_) if !self.fresh => {
                        log::debug!(
                            "pool {}: KV events of {}: batches {}..{seq} missed; replaying",
                            self.index.pool(),
                            self.endpoint,
                            last + 1
                        );
                        self.replay(last + 1, seq, true).await;
                    }
                    Some(_) | None => {
                        log::warn!(
                            "pool {}: KV events of {}: batches {}..{seq} missed; its cached blocks are forgotten",
                            self.index.pool(),
                            self.endpoint,
                            last + 1
                        );
                        self.index.clear_endpoint(&self.endpoint);
                        self.bootstrap(seq).await;
                    }
                }
            }
            Some(last) => {
                log::info!(
                    "pool {}: KV events of {}: sequence went back from {last} to {seq} (engine restarted); starting over",
                    self.index.pool(),
                    self.endpoint
                );
                self.resync("restart");
                self.bootstrap(seq).await;
            }
        }
        self.apply(&message.batch);
        self.last = Some(seq);
        self.fresh = false;
    }

    /// The stream starts at `seq` over an empty state: replay what the engine buffers before it.
    async fn bootstrap(&mut self, seq: i64) {
        if self.options.replay.is_some() && self.options.replay_on_start && seq > 0 {
            self.replay(0, seq, false).await;
        }
    }

    /// Apply the batches `from..upto` from the replay socket. `exact`: the index is continuous up
    /// to `from - 1`, so the replay must start at `from`; otherwise the index holds nothing of
    /// this stream and any run ending at `upto - 1` rebuilds it. Whatever cannot be proven
    /// continuous up to `upto - 1` is cleared.
    async fn replay(&mut self, from: i64, upto: i64, exact: bool) {
        let Some(addr) = self.options.replay.clone() else {
            return;
        };
        let mut expect = from;
        let mut exact = exact;
        let mut started = false;
        let timeout = self.options.replay_timeout;
        let result = tokio::time::timeout(timeout, async {
            let mut socket = DealerSocket::new();
            socket.connect(&addr).await?;
            let request: ZmqMessage =
                vec![Bytes::new(), Bytes::copy_from_slice(&from.to_be_bytes())]
                    .try_into()
                    .map_err(|_| ReplayError::Frames(0))?;
            socket.send(request).await?;
            loop {
                let frames = socket.recv().await?.into_vec();
                let (seq, payload) = replay_frames(&frames)?;
                if seq < 0 {
                    return Ok::<(), ReplayError>(());
                }
                if seq < from || seq >= upto {
                    continue;
                }
                if seq != expect && (exact || started) {
                    // A hole: what came before it cannot be trusted with what follows.
                    self.index.clear_endpoint(&self.endpoint);
                    exact = false;
                }
                match decode_payload(payload) {
                    Ok(batch) => {
                        self.apply(&batch);
                        started = true;
                    }
                    Err(e) => {
                        log::debug!("replayed batch {seq} of {}: {e}", self.endpoint);
                        self.index.clear_endpoint(&self.endpoint);
                        exact = false;
                        started = false;
                    }
                }
                expect = seq.saturating_add(1);
            }
        })
        .await
        .unwrap_or(Err(ReplayError::Timeout));
        let complete = result.is_ok() && expect == upto && (started || from == upto);
        if !complete {
            log::warn!(
                "pool {}: KV events of {}: could not replay batches {from}..{upto} ({}); its cached blocks are forgotten",
                self.index.pool(),
                self.endpoint,
                match &result {
                    Ok(()) => "the engine no longer has them".to_string(),
                    Err(e) => e.to_string(),
                }
            );
            self.index.clear_endpoint(&self.endpoint);
        }
    }

    fn apply(&self, batch: &KvEventBatch) {
        let (mut stored, mut removed, mut cleared) = (0u64, 0u64, 0u64);
        for event in &batch.events {
            match event {
                KvEvent::BlockStored(_) => stored += 1,
                KvEvent::BlockRemoved(_) => removed += 1,
                KvEvent::AllBlocksCleared => cleared += 1,
            }
        }
        let done = self.index.apply(&self.endpoint, &batch.events);
        if done.unknown_parent > 0 {
            log::debug!(
                "pool {}: {}: {} stored blocks follow unknown parents",
                self.index.pool(),
                self.endpoint,
                done.unknown_parent
            );
        }
        let pool = self.index.pool();
        telemetry::count_kv_events(pool, &self.endpoint, "stored", stored);
        telemetry::count_kv_events(pool, &self.endpoint, "removed", removed);
        telemetry::count_kv_events(pool, &self.endpoint, "cleared", cleared);
        telemetry::count_kv_events(pool, &self.endpoint, "unknown", batch.unknown as u64);
    }

    fn count_resync(&self, reason: &str) {
        telemetry::count_kv_resync(self.index.pool(), &self.endpoint, reason);
    }

    /// Count a resync and forget the endpoint's entries.
    fn resync(&self, reason: &str) {
        self.count_resync(reason);
        self.index.clear_endpoint(&self.endpoint);
    }
}

async fn connect(socket: &mut SubSocket, addr: &str, topic: &str) -> zeromq::ZmqResult<()> {
    socket.connect(addr).await?;
    socket.subscribe(topic).await
}

/// A replay answer without the ROUTER's empty delimiter: `[seq, payload]` (vLLM up to the
/// commit followed in `wire`) or `[topic, seq, payload]` (newer vLLM, like the live stream).
fn replay_frames(frames: &[Bytes]) -> Result<(i64, &[u8]), ReplayError> {
    let frames = match frames.split_first() {
        Some((first, rest)) if first.is_empty() && rest.len() >= 2 => rest,
        Some(_) | None => frames,
    };
    match frames {
        [seq, payload] | [_, seq, payload] => Ok((decode_seq(seq)?, payload)),
        _ => Err(ReplayError::Frames(frames.len())),
    }
}

/// Resolves once `stop` holds `true` or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves after `after`, or never.
async fn idle(after: Option<Duration>) {
    match after {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
