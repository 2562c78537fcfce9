//! The waiting room of a pool: while every endpoint has `max_inflight` requests in flight from
//! this replica, new requests wait here instead of piling onto the engines' queues. A freed slot
//! goes to the most important band that has someone waiting (critical, then standard, then
//! sheddable) and, within a band, to its tenants in turn (round robin over the tenants waiting,
//! first come first served within a tenant), so a tenant with many requests waiting gets no more
//! turns than one with few. Each band has a bounded queue and a deadline: a request that finds
//! its band's queue full, or waits past its deadline, is refused ([`Refused`]). Sheddable
//! requests have the shortest queue and deadline by default, so under overload they are refused
//! first, a few at a time as their deadlines pass, not all at once.
//!
//! The room counts this replica's requests: with several replicas, each lets `max_inflight` per
//! endpoint in flight.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::config::{AdmissionConfig, Band};
use crate::telemetry;

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its band's queue was full.
    #[error("the {} queue is full", .0.name())]
    QueueFull(Band),
    /// It waited past its band's deadline.
    #[error("waited past the {} deadline", .0.name())]
    Deadline(Band),
    /// Its client went away while it waited.
    #[error("the client left the {} queue", .0.name())]
    ClientGone(Band),
}

impl Refused {
    /// The band of the refused request.
    pub fn band(self) -> Band {
        match self {
            Refused::QueueFull(b) | Refused::Deadline(b) | Refused::ClientGone(b) => b,
        }
    }
}

/// One request waiting.
struct Waiter {
    id: u64,
    /// Where a freed slot is handed over. A permit sent to a waiter that has just given up is
    /// dropped with its channel, which frees it again.
    slot: oneshot::Sender<Permit>,
}

/// The requests of one band waiting, per tenant.
#[derive(Default)]
struct Queue {
    /// Tenants with someone waiting, in turn order.
    turns: VecDeque<String>,
    waiting: HashMap<String, VecDeque<Waiter>>,
    len: usize,
}

impl Queue {
    fn push(&mut self, tenant: &str, waiter: Waiter) {
        let queue = self.waiting.entry(tenant.to_owned()).or_default();
        if queue.is_empty() {
            self.turns.push_back(tenant.to_owned());
        }
        queue.push_back(waiter);
        self.len += 1;
    }

    /// The first waiter of the tenant whose turn it is.
    fn pop(&mut self) -> Option<Waiter> {
        let tenant = self.turns.pop_front()?;
        let queue = self.waiting.get_mut(&tenant)?;
        let waiter = queue.pop_front();
        if queue.is_empty() {
            self.waiting.remove(&tenant);
        } else {
            self.turns.push_back(tenant);
        }
        self.len -= usize::from(waiter.is_some());
        waiter
    }

    /// Remove waiter `id` of `tenant`, if still waiting.
    fn remove(&mut self, tenant: &str, id: u64) -> bool {
        let Some(queue) = self.waiting.get_mut(tenant) else {
            return false;
        };
        let before = queue.len();
        queue.retain(|w| w.id != id);
        let removed = queue.len() < before;
        if queue.is_empty() {
            self.waiting.remove(tenant);
            self.turns.retain(|t| t != tenant);
        }
        self.len -= usize::from(removed);
        removed
    }
}

struct State {
    inflight: usize,
    /// The pool's capacity at the last admission: `max_inflight` × healthy endpoints.
    capacity: usize,
    queues: [Queue; 3],
    next_id: u64,
}

/// A pool's waiting room. Share it behind an `Arc`.
pub struct WaitingRoom {
    pool: String,
    config: AdmissionConfig,
    state: Mutex<State>,
}

/// A slot in flight; given back (to the next waiter, or freed) when dropped.
pub struct Permit {
    /// `None` once disarmed (a hand-over that found no one to take it).
    room: Option<Arc<WaitingRoom>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(room) = self.room.take() {
            room.release();
        }
    }
}

/// Removes a waiter that gave up (deadline, client gone) from its queue.
struct Queued<'a> {
    room: &'a WaitingRoom,
    band: Band,
    tenant: &'a str,
    id: u64,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut state = self.room.state.lock();
        if state.queues[self.band.index()].remove(self.tenant, self.id) {
            self.room.publish_len(&state, self.band);
        }
    }
}

impl WaitingRoom {
    /// The waiting room of `pool`.
    pub fn new(pool: &str, config: AdmissionConfig) -> Self {
        for band in Band::ALL {
            telemetry::set_queue_length(pool, band.name(), 0);
        }
        WaitingRoom {
            pool: pool.to_owned(),
            config,
            state: Mutex::new(State {
                inflight: 0,
                capacity: 0,
                queues: Default::default(),
                next_id: 0,
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> &AdmissionConfig {
        &self.config
    }

    /// Let a request of `band` from `tenant` in now if there is room (and no one more important
    /// or earlier waits), else queue it until a slot is handed to it, its deadline passes or
    /// `gone` completes (its client left: the place goes to the next in line at once).
    /// `endpoints` is the number of endpoints the pool can use now.
    pub async fn admit(
        self: &Arc<Self>,
        band: Band,
        tenant: &str,
        endpoints: usize,
        gone: impl std::future::Future<Output = ()>,
    ) -> Result<Permit, Refused> {
        let started = Instant::now();
        let limits = self.config.bands[band.index()];
        let (id, slot) = {
            let mut state = self.state.lock();
            state.capacity = self.config.max_inflight.saturating_mul(endpoints.max(1));
            // Room that grew (an endpoint came back) goes to those waiting first.
            self.dispatch(&mut state);
            let ahead = state.queues[..=band.index()].iter().any(|q| q.len > 0);
            if state.inflight < state.capacity && !ahead {
                state.inflight += 1;
                drop(state);
                self.admitted(band, tenant, "admitted", Duration::ZERO);
                return Ok(self.permit());
            }
            if state.queues[band.index()].len >= limits.queue {
                drop(state);
                self.admitted(band, tenant, "queue_full", Duration::ZERO);
                return Err(Refused::QueueFull(band));
            }
            let id = state.next_id;
            state.next_id += 1;
            let (tx, rx) = oneshot::channel();
            state.queues[band.index()].push(tenant, Waiter { id, slot: tx });
            self.publish_len(&state, band);
            (id, rx)
        };
        let queued = Queued {
            room: self,
            band,
            tenant,
            id,
        };
        let mut slot = slot;
        let handed = tokio::select! {
            waited = tokio::time::timeout(limits.deadline, &mut slot) => match waited {
                Ok(Ok(permit)) => Some(permit),
                // Past the deadline: leave the queue. A slot handed over meanwhile (under the
                // lock, so before the waiter could be removed) is in the channel: take it.
                Ok(Err(_)) | Err(_) => {
                    drop(queued);
                    slot.try_recv().ok()
                }
            },
            () = gone => {
                // Leave the queue; a slot handed over meanwhile is freed with the channel.
                drop(queued);
                drop(slot);
                self.admitted(band, tenant, "client_gone", started.elapsed());
                return Err(Refused::ClientGone(band));
            }
        };
        match handed {
            Some(permit) => {
                self.admitted(band, tenant, "waited", started.elapsed());
                Ok(permit)
            }
            None => {
                self.admitted(band, tenant, "deadline", started.elapsed());
                Err(Refused::Deadline(band))
            }
        }
    }

    fn permit(self: &Arc<Self>) -> Permit {
        Permit {
            room: Some(self.clone()),
        }
    }

    /// A slot is free: hand it on to whoever waits, or free it.
    fn release(self: &Arc<Self>) {
        let mut state = self.state.lock();
        state.inflight = state.inflight.saturating_sub(1);
        self.dispatch(&mut state);
    }

    /// While there is room, hand slots to the waiters in turn (bands first, then tenants).
    fn dispatch(self: &Arc<Self>, state: &mut State) {
        for band in Band::ALL {
            while state.inflight < state.capacity {
                let Some(waiter) = state.queues[band.index()].pop() else {
                    break;
                };
                self.publish_len(state, band);
                match waiter.slot.send(self.permit()) {
                    Ok(()) => state.inflight += 1,
                    // The waiter is gone: disarm the permit (dropping it here would release
                    // under the lock) and try the next.
                    Err(mut unclaimed) => unclaimed.room = None,
                }
            }
        }
    }

    fn publish_len(&self, state: &State, band: Band) {
        let len = state.queues[band.index()].len;
        telemetry::set_queue_length(&self.pool, band.name(), len);
    }

    fn admitted(&self, band: Band, tenant: &str, result: &'static str, waited: Duration) {
        telemetry::count_admission(&self.pool, band.name(), tenant, result, waited);
    }

    /// Requests waiting in `band` now.
    pub fn waiting(&self, band: Band) -> usize {
        self.state.lock().queues[band.index()].len
    }

    /// Requests let in and not finished.
    pub fn inflight(&self) -> usize {
        self.state.lock().inflight
    }
}

/// The tenant a request belongs to, as a metric label: the value of `tenant_header` when it is a
/// short plain token, else a hash of it; without it, a hash of the API key (`Authorization` or
/// `x-api-key`), never the key itself; `-` when there is neither.
pub fn tenant_of(headers: &http::HeaderMap, tenant_header: &str) -> String {
    use xxhash_rust::xxh3::xxh3_64;
    let plain = |v: &str| {
        v.len() <= 64
            && !v.is_empty()
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    if let Some(v) = headers.get(tenant_header).and_then(|v| v.to_str().ok()) {
        return if plain(v) {
            v.to_owned()
        } else {
            format!("h-{:08x}", xxh3_64(v.as_bytes()) as u32)
        };
    }
    ["authorization", "x-api-key"]
        .iter()
        .find_map(|h| headers.get(*h))
        .map(|key| format!("key-{:08x}", xxh3_64(key.as_bytes()) as u32))
        .unwrap_or_else(|| "-".to_owned())
}

#[cfg(test)]
mod tests {
    use std::future::pending;

    use super::*;
    use crate::config::BandLimits;

    fn room(max_inflight: usize, queue: usize, deadline_ms: u64) -> Arc<WaitingRoom> {
        let limits = BandLimits {
            queue,
            deadline: Duration::from_millis(deadline_ms),
        };
        Arc::new(WaitingRoom::new(
            "p",
            AdmissionConfig {
                max_inflight,
                priority_header: "x-llm-lb-priority".into(),
                tenant_header: "x-tenant-id".into(),
                default_band: Band::Standard,
                critical_models: vec!["vip".into()],
                bands: [limits; 3],
            },
        ))
    }

    /// Queue a request in the background; returns the handle answering with its permit.
    fn queue(
        room: &Arc<WaitingRoom>,
        band: Band,
        tenant: &str,
    ) -> tokio::task::JoinHandle<Result<Permit, Refused>> {
        let (room, tenant) = (room.clone(), tenant.to_owned());
        tokio::spawn(async move { room.admit(band, &tenant, 1, pending()).await })
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn bands_go_first_and_tenants_take_turns() {
        let room = room(1, 100, 60_000);
        let held = room
            .admit(Band::Standard, "a", 1, pending())
            .await
            .expect("room");
        // Waiting: tenant a three times, then b once, a sheddable, and then a critical.
        let mut waiting = Vec::new();
        for (band, tenant) in [
            (Band::Standard, "a"),
            (Band::Standard, "a"),
            (Band::Standard, "a"),
            (Band::Standard, "b"),
            (Band::Sheddable, "c"),
            (Band::Critical, "d"),
        ] {
            waiting.push((band, tenant, queue(&room, band, tenant)));
            settle().await;
        }
        assert_eq!(room.waiting(Band::Standard), 4);
        // Each release hands the slot on: critical d, then a and b in turn, then a, a, then c.
        let mut order = Vec::new();
        let mut current = held;
        let mut handles: Vec<_> = waiting.into_iter().map(Some).collect();
        for _ in 0..6 {
            drop(current);
            settle().await;
            let i = handles
                .iter()
                .position(|h| h.as_ref().is_some_and(|(_, _, j)| j.is_finished()))
                .expect("one admitted");
            let (band, tenant, j) = handles[i].take().expect("handle");
            order.push((band.name(), tenant));
            current = j.await.expect("task").expect("admitted");
        }
        assert_eq!(
            order,
            [
                ("critical", "d"),
                ("standard", "a"),
                ("standard", "b"),
                ("standard", "a"),
                ("standard", "a"),
                ("sheddable", "c"),
            ]
        );
        drop(current);
        assert_eq!(room.inflight(), 0);
    }

    #[tokio::test]
    async fn full_queues_and_deadlines_refuse() {
        let room = room(1, 1, 50);
        let _held = room
            .admit(Band::Standard, "a", 1, pending())
            .await
            .expect("room");
        let waiting = queue(&room, Band::Sheddable, "a");
        settle().await;
        assert_eq!(
            room.admit(Band::Sheddable, "b", 1, pending()).await.err(),
            Some(Refused::QueueFull(Band::Sheddable))
        );
        assert_eq!(
            waiting.await.expect("task").err(),
            Some(Refused::Deadline(Band::Sheddable))
        );
        assert_eq!(
            room.waiting(Band::Sheddable),
            0,
            "the one that gave up left"
        );
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_never_takes_a_slot() {
        let room = room(1, 10, 60_000);
        let held = room
            .admit(Band::Standard, "a", 1, pending())
            .await
            .expect("room");
        let gone = queue(&room, Band::Standard, "a");
        settle().await;
        gone.abort();
        settle().await;
        assert_eq!(room.waiting(Band::Standard), 0);
        drop(held);
        assert_eq!(room.inflight(), 0);
        // Capacity follows the endpoints usable now.
        let a = room
            .admit(Band::Standard, "a", 2, pending())
            .await
            .expect("room");
        let b = room
            .admit(Band::Standard, "a", 2, pending())
            .await
            .expect("room for two");
        drop((a, b));
    }

    #[tokio::test]
    async fn a_client_that_leaves_gives_its_place_to_the_next_at_once() {
        let room = room(1, 10, 60_000);
        let held = room
            .admit(Band::Standard, "a", 1, pending())
            .await
            .expect("room");
        let (leave, left) = oneshot::channel::<()>();
        let leaving = {
            let room = room.clone();
            tokio::spawn(async move {
                let gone = async {
                    let _ = left.await;
                };
                room.admit(Band::Standard, "a", 1, gone).await
            })
        };
        let next = queue(&room, Band::Standard, "b");
        settle().await;
        assert_eq!(room.waiting(Band::Standard), 2);
        let _ = leave.send(());
        assert_eq!(
            leaving.await.expect("task").err(),
            Some(Refused::ClientGone(Band::Standard))
        );
        assert_eq!(room.waiting(Band::Standard), 1);
        drop(held);
        settle().await;
        assert!(next.is_finished(), "the slot went to the next in line");
        assert_eq!(room.inflight(), 1);
    }

    #[tokio::test]
    async fn room_that_grows_goes_to_those_waiting_first() {
        let room = room(1, 10, 60_000);
        let _held = room
            .admit(Band::Standard, "a", 1, pending())
            .await
            .expect("room");
        let waiting = queue(&room, Band::Standard, "a");
        settle().await;
        // A second endpoint comes: its slot goes to the one waiting, the newcomer waits.
        let newcomer = {
            let room = room.clone();
            tokio::spawn(async move { room.admit(Band::Standard, "b", 2, pending()).await })
        };
        settle().await;
        assert!(waiting.is_finished(), "the waiter got the new slot");
        assert!(!newcomer.is_finished());
        assert_eq!(room.inflight(), 2);
    }

    #[test]
    fn tenants_are_names_or_hashes_never_keys() {
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Bearer sk-secret".parse().expect("value"));
        let t = tenant_of(&h, "x-tenant-id");
        assert!(t.starts_with("key-") && !t.contains("secret"), "{t}");
        h.insert("x-tenant-id", "team-a".parse().expect("value"));
        assert_eq!(tenant_of(&h, "x-tenant-id"), "team-a");
        h.insert(
            "x-tenant-id",
            "a tenant with spaces".parse().expect("value"),
        );
        assert!(tenant_of(&h, "x-tenant-id").starts_with("h-"));
        assert_eq!(tenant_of(&http::HeaderMap::new(), "x-tenant-id"), "-");
    }
}
