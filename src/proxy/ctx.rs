//! Per-request state (Pingora's CTX) and the attempt bookkeeping that is released exactly once.
//!
//! An [`Attempt`] owns everything taken when an endpoint was picked: the local in-flight count and
//! the policy's [`Lease`]. It is finished explicitly (retry, `logging`) or, on any other path, by
//! being dropped with the CTX — so every path releases exactly once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::admission::Permit;
use crate::apis::ResponseIdScan;
use crate::endpoint::{EndpointId, Outcome};
use crate::health::Observed;
use crate::policy::Lease;
use crate::request::LlmRequest;
use crate::routing::{InflightGuard, Pool, Routes};
use crate::telemetry::trace::RequestSpan;

/// Where a request goes: its pool and what we understood of it.
#[derive(Clone)]
pub struct Route {
    /// The routing table the request started with: it keeps it to the end, retries included.
    pub routes: Arc<Routes>,
    /// The pool serving the request.
    pub pool: Arc<Pool>,
    /// What was understood of the request body.
    pub request: Arc<LlmRequest>,
}

/// How this CTX takes part in serving the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Proxied by this session itself (body replayed from Pingora's retry buffer).
    Direct,
    /// Body too large for Pingora's retry buffer: proxied by a subrequest with a preset body.
    Parent,
    /// The subrequest doing the proxying for a `Parent`.
    Sub,
}

/// Facts about the request shared between a parent and its subrequest(s), for retries across
/// subrequests and for the single access-log line the parent writes.
#[derive(Debug, Default)]
pub struct Shared {
    /// Endpoints tried so far, in order.
    pub tried: Vec<EndpointId>,
    /// The last endpoint picked.
    pub endpoint: Option<SocketAddr>,
    /// The policy that picked the last endpoint, or could not choose one (`""` before that).
    pub policy: &'static str,
    /// Its pick reason, or why it could not choose.
    pub reason: &'static str,
    /// A subrequest failed in a way that is safe to retry (elsewhere, or over a fresh connection
    /// when [`Shared::reconnect`] holds the attempt): the parent runs a new subrequest.
    pub retry_due: bool,
    /// An attempt whose pooled keep-alive connection turned out closed before any answer: the next
    /// attempt reuses it (same endpoint, same lease) over a fresh connection.
    pub reconnect: Option<Attempt>,
    /// How many times the request was sent again over a fresh connection to the same endpoint.
    pub reconnects: usize,
    /// Response body bytes sent to the client.
    pub response_bytes: usize,
    /// Time to the first response body byte (for SSE: the first event, about the first token), or
    /// to the response header while no body has come.
    pub first_byte: Option<Duration>,
    /// The end of the response body, for its `usage`.
    pub tail: crate::usage::Tail,
    /// Time spent choosing endpoints, all attempts together.
    pub choosing: Duration,
    /// When (since the request arrived) the last endpoint was picked.
    pub picked_at: Option<Duration>,
    /// Trace-context headers sent upstream (tracing on): the request's span is their parent.
    pub propagate: Vec<(String, String)>,
}

/// Handed from a parent to its subrequest through Pingora's subrequest user context.
#[derive(Clone)]
pub(crate) struct SubrequestInput {
    /// The parent's route.
    pub(crate) route: Route,
    /// The facts the parent and its subrequests share.
    pub(crate) shared: Arc<Mutex<Shared>>,
    /// When the parent received the request.
    pub(crate) started: Instant,
}

/// One upstream attempt's accounting.
pub struct Attempt {
    /// The endpoint tried.
    pub endpoint: EndpointId,
    lease: Option<Box<dyn Lease>>,
    inflight: InflightGuard,
    /// Whether [`Attempt::first_byte`] ran.
    answered_once: bool,
    /// Looks for the id a Responses API answer names itself by, to tell the lease.
    response_id: Option<ResponseIdScan>,
    /// What the attempt saw of its upstream, for passive health.
    pub observed: Observed,
}

impl Attempt {
    /// Account for an attempt on `endpoint`: the policy's `lease` (if any) and the local in-flight
    /// count `inflight`.
    pub fn new(
        endpoint: EndpointId,
        lease: Option<Box<dyn Lease>>,
        inflight: InflightGuard,
    ) -> Self {
        Attempt {
            endpoint,
            lease,
            inflight,
            answered_once: false,
            response_id: None,
            observed: Observed::default(),
        }
    }

    /// Look for the id of the response a Responses API answer stores, and tell the lease where
    /// it was produced ([`Lease::produced`]).
    pub fn watch_response_id(mut self) -> Self {
        self.response_id = Some(ResponseIdScan::default());
        self
    }

    /// A chunk of the answer's body arrived: the first byte, and perhaps the response's id (read
    /// from a successful answer only).
    pub fn body(&mut self, chunk: &[u8]) {
        self.first_byte();
        if !self.observed.succeeded() {
            return;
        }
        let Some(id) = self.response_id.as_mut().and_then(|scan| scan.push(chunk)) else {
            return;
        };
        self.response_id = None;
        if let Some(lease) = self.lease.as_mut() {
            lease.produced(&id);
        }
    }

    /// The first byte of the answer arrived (tells the lease once).
    pub fn first_byte(&mut self) {
        if !self.answered_once {
            self.answered_once = true;
            if let Some(lease) = self.lease.as_mut() {
                lease.first_byte();
            }
        }
    }

    /// Release with a verdict, and tell the pool's outlier detector how the endpoint did.
    pub fn finish(mut self, outcome: Outcome) {
        self.inflight.report(self.observed.verdict(outcome));
        if let Some(lease) = self.lease.take() {
            lease.release(outcome);
        }
    }
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempt")
            .field("endpoint", &self.endpoint)
            .field("observed", &self.observed)
            .finish_non_exhaustive()
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release(Outcome::Dropped);
        }
    }
}

/// Pingora CTX of llm-lb.
pub struct RequestCtx {
    /// When the request arrived (a subrequest takes its parent's).
    pub started: Instant,
    /// How this CTX takes part in serving the request.
    pub role: Role,
    /// Where the request goes; `None` until its body is read and routed.
    pub route: Option<Route>,
    /// Facts about the request, shared between a parent and its subrequest(s).
    pub shared: Arc<Mutex<Shared>>,
    /// The current upstream attempt, until it is finished.
    pub attempt: Option<Attempt>,
    /// Request body bytes read from the client.
    pub request_bytes: usize,
    /// Time spent reading the request body.
    pub read_body: Option<Duration>,
    /// The request's span (tracing on; the parent's, for a subrequest).
    pub trace: Option<RequestSpan>,
    /// Its slot in the pool's waiting room, held until the request ends.
    pub permit: Option<Permit>,
    /// Seconds after which a refused request may be retried (`Retry-After`).
    pub retry_after: Option<u64>,
}

impl RequestCtx {
    /// The CTX of a new request: a direct one, not routed yet.
    pub fn new() -> Self {
        RequestCtx {
            started: Instant::now(),
            role: Role::Direct,
            route: None,
            shared: Arc::default(),
            attempt: None,
            request_bytes: 0,
            read_body: None,
            trace: None,
            permit: None,
            retry_after: None,
        }
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::config::Config;

    struct Counting(Arc<Mutex<Vec<Outcome>>>);
    impl Lease for Counting {
        fn release(self: Box<Self>, outcome: Outcome) {
            self.0.lock().push(outcome);
        }
    }

    fn pool() -> Arc<Pool> {
        let c = Config::from_yaml(
            "pools:\n  - name: p\n    models: ['*']\n    endpoints: ['127.0.0.1:1']\n    health_check: {enabled: false}\n    lb_policy: round_robin\n",
        )
        .expect("config");
        Pool::first_of(&c)
    }

    #[test]
    fn an_attempt_releases_exactly_once_on_every_path() {
        let pool = pool();
        let id = EndpointId::new(0);
        let log = Arc::new(Mutex::new(Vec::new()));
        let calls = AtomicUsize::new(0);
        let attempt = |log: &Arc<Mutex<Vec<Outcome>>>| {
            calls.fetch_add(1, Ordering::Relaxed);
            Attempt::new(
                id,
                Some(Box::new(Counting(log.clone()))),
                pool.inflight_guard(id),
            )
        };
        // finished explicitly
        attempt(&log).finish(Outcome::Completed);
        // dropped (e.g. CTX dropped at shutdown)
        drop(attempt(&log));
        // in a CTX that is dropped
        let mut ctx = RequestCtx::new();
        ctx.attempt = Some(attempt(&log));
        assert_eq!(pool.endpoints[0].inflight(), 1);
        drop(ctx);
        assert_eq!(
            *log.lock(),
            vec![Outcome::Completed, Outcome::Dropped, Outcome::Dropped]
        );
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        assert_eq!(
            pool.endpoints[0].inflight(),
            0,
            "in-flight count back to zero"
        );
    }
}
