//! Shared vocabulary: how endpoints are named inside a pool ([`EndpointId`]), what policies see of
//! one ([`EndpointView`]) and how an attempt on one ended ([`Outcome`]).
//!
//! The bottom layer: it imports nothing of the crate, and policies, health, routing and the proxy
//! all speak it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};

/// Index of an endpoint within its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(u32);

impl EndpointId {
    /// The endpoint at `index` in its pool's list.
    pub fn new(index: usize) -> Self {
        EndpointId(u32::try_from(index).unwrap_or(u32::MAX))
    }

    /// Its position in the pool's list.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// One endpoint as policies see it.
#[derive(Debug)]
pub struct EndpointView {
    /// Where the inference server listens.
    pub addr: SocketAddr,
    /// Its share of the traffic relative to the others (1..=1000).
    pub weight: usize,
    /// `addr` as text, the endpoint's metric label and its name in the state store.
    pub label: String,
    /// Requests this replica has in flight to the endpoint.
    inflight: AtomicI64,
}

impl EndpointView {
    /// An endpoint with nothing in flight.
    pub fn new(addr: SocketAddr, weight: usize) -> Self {
        EndpointView {
            addr,
            weight,
            label: addr.to_string(),
            inflight: AtomicI64::new(0),
        }
    }

    /// Requests this replica has in flight to the endpoint.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed).max(0) as u64
    }

    /// Count one more (`+1`) or one fewer (`-1`) request in flight; the routing layer's in-flight
    /// guard is the only caller outside tests.
    pub fn add_inflight(&self, delta: i64) {
        self.inflight.fetch_add(delta, Ordering::Relaxed);
    }
}

/// How an attempt ended: what leases are released with and what passive health judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered (any status) and the response was relayed.
    Completed,
    /// The attempt failed (connect error, upstream error, timeout); the request may be retried.
    Failed,
    /// The client went away.
    Aborted,
    /// The request context was dropped without a verdict (e.g. shutdown).
    Dropped,
}
