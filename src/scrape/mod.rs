//! Engine metrics for `least_busy`: what each endpoint's inference server says about itself
//! (waiting queue, KV-cache use, loaded LoRA adapters), scraped in the background and published
//! lock-free for the request path.
//!
//! [`ScrapeService`] GETs every endpoint's `metrics.path` every `metrics.interval_ms` and publishes
//! what [`parse()`] makes of it as a [`Snapshot`] in the pool's [`MetricsBoard`]. The request path
//! reads the board with [`MetricsBoard::view`]: no snapshot, or one older than
//! [`STALE_AFTER_INTERVALS`] intervals, means the endpoint's metrics are unknown.
//!
//! **Fresh between scrapes.** A snapshot is up to one interval old, and a burst arriving in that
//! interval would all see the same idlest-looking endpoint. So the board numbers the requests this
//! gateway dispatches to each endpoint ([`MetricsBoard::dispatch`]); those dispatched after the
//! snapshot's scrape was sent and still in flight are added to its waiting queue
//! ([`Known::waiting`], [`Known::running`]). Requests dispatched *before* the scrape was sent that
//! finish after the snapshot was published were in the engine's figures and are gone: they are
//! taken off its running batch ([`Known::running`]), so an engine that just finished its only
//! request does not look busy until the next scrape. The correction is approximate at the edges:
//! a request that finishes while a scrape is on the wire is counted until the next snapshot.

pub mod parse;
mod service;

pub use parse::{parse, parse_with, ParseError};
pub use service::{scrape_timeout, ScrapeService, MIN_SCRAPE_TIMEOUT};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

/// A snapshot older than this many scrape intervals (intervals below [`MIN_SCRAPE_TIMEOUT`] count
/// as that) is stale: the endpoint's metrics are unknown.
pub const STALE_AFTER_INTERVALS: u32 = 3;

/// LoRA adapters as the engine reports them (`vllm:lora_requests_info`). An engine that reports
/// nothing has no adapters and no room for any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lora {
    /// Adapters in the running batch (`running_lora_adapters`).
    pub running: Vec<String>,
    /// Most adapters the engine holds at once (`max_lora`).
    pub max: usize,
}

impl Lora {
    /// Whether `adapter` is in the running batch.
    pub fn has(&self, adapter: &str) -> bool {
        self.running.iter().any(|a| a == adapter)
    }

    /// Whether the engine has room for one more adapter.
    pub fn can_accept(&self) -> bool {
        self.running.len() < self.max
    }
}

/// What one endpoint's engine reports, as far as `least_busy` cares.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointMetrics {
    /// Requests waiting to be scheduled.
    pub waiting: u64,
    /// Requests in the running batch (not used by the filter tree; logged).
    pub running: u64,
    /// KV-cache use, 0–1, when the engine exports it (llama.cpp does not).
    pub kv_cache_usage: Option<f64>,
    /// LoRA adapters (none when the engine reports none).
    pub lora: Lora,
    /// The served base model (`model_name` label), when the engine names it.
    pub model: Option<String>,
    /// The value of the gauge the pool ranks by (`endpoint_metrics`' `target_metric`), when it
    /// names one.
    pub target: Option<f64>,
}

/// One published scrape of one endpoint.
#[derive(Debug)]
pub struct Snapshot {
    /// What the scrape read.
    pub metrics: EndpointMetrics,
    /// When the scrape was sent.
    pub taken: Instant,
    /// The endpoint's dispatch count when the scrape was sent: requests numbered above it are
    /// not reflected in `metrics`.
    dispatched_before: u64,
    /// Requests numbered above `dispatched_before` that have finished since publication.
    finished_since: AtomicU64,
    /// Requests numbered up to `dispatched_before` (in flight when the scrape was sent, so in its
    /// figures) that have finished since publication.
    finished_counted: AtomicU64,
}

/// One endpoint's slot on the board.
#[derive(Debug)]
struct Slot {
    label: String,
    /// Requests dispatched to the endpoint so far (the last one's number).
    dispatched: AtomicU64,
    current: ArcSwapOption<Snapshot>,
}

/// A usable (fresh) snapshot of one endpoint, with the gateway's own dispatches since.
#[derive(Debug, Clone)]
pub struct Known {
    /// The snapshot.
    pub snapshot: Arc<Snapshot>,
    /// Requests dispatched after the scrape was sent and not finished yet.
    pub fresh: u64,
    /// Requests in the snapshot's figures that have finished since.
    pub gone: u64,
}

impl Known {
    /// The engine's waiting queue plus this gateway's dispatches since the scrape.
    pub fn waiting(&self) -> u64 {
        self.snapshot.metrics.waiting.saturating_add(self.fresh)
    }

    /// The engine's running batch, less this gateway's requests that finished since the scrape,
    /// plus its dispatches since the scrape.
    pub fn running(&self) -> u64 {
        self.snapshot
            .metrics
            .running
            .saturating_sub(self.gone)
            .saturating_add(self.fresh)
    }
}

/// The engine metrics of one pool's endpoints, written by [`ScrapeService`], read by the policy.
#[derive(Debug)]
pub struct MetricsBoard {
    pool: String,
    interval: Duration,
    slots: Vec<Slot>,
    /// A gauge scraped besides the engine metrics (`endpoint_metrics`' `target_metric`).
    target: Option<String>,
}

impl MetricsBoard {
    /// A board for endpoints labelled `labels` (index = endpoint index), scraped every `interval`.
    pub fn new(pool: &str, labels: Vec<String>, interval: Duration) -> Self {
        MetricsBoard {
            pool: pool.to_string(),
            interval,
            slots: labels
                .into_iter()
                .map(|label| Slot {
                    label,
                    dispatched: AtomicU64::new(0),
                    current: ArcSwapOption::empty(),
                })
                .collect(),
            target: None,
        }
    }

    /// This board with gauge `target` scraped too (see [`EndpointMetrics::target`]).
    pub fn with_target(mut self, target: Option<String>) -> Self {
        self.target = target;
        self
    }

    /// The gauge scraped besides the engine metrics, if any.
    pub fn target(&self) -> Option<&str> {
        self.target.as_deref()
    }

    /// The pool's name.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// How often endpoints are scraped.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Snapshots older than this are stale.
    pub fn stale_after(&self) -> Duration {
        self.interval
            .max(MIN_SCRAPE_TIMEOUT)
            .saturating_mul(STALE_AFTER_INTERVALS)
    }

    /// Number of endpoints on the board.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the board has no endpoints.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The endpoint's label (its address).
    pub fn label(&self, endpoint: usize) -> &str {
        self.slots.get(endpoint).map_or("-", |s| s.label.as_str())
    }

    /// Count one request dispatched to `endpoint`; returns its number, for [`Self::finish`].
    pub fn dispatch(&self, endpoint: usize) -> u64 {
        self.slots
            .get(endpoint)
            .map_or(0, |s| s.dispatched.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// The request numbered `number` (from [`Self::dispatch`]) to `endpoint` has finished.
    pub fn finish(&self, endpoint: usize, number: u64) {
        let Some(slot) = self.slots.get(endpoint) else {
            return;
        };
        if let Some(s) = slot.current.load().as_ref() {
            let counter = if number > s.dispatched_before {
                &s.finished_since
            } else {
                &s.finished_counted
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The dispatch count to record before sending a scrape to `endpoint`.
    pub fn dispatched(&self, endpoint: usize) -> u64 {
        self.slots
            .get(endpoint)
            .map_or(0, |s| s.dispatched.load(Ordering::Relaxed))
    }

    /// Publish a scrape of `endpoint` sent at `taken`, when its dispatch count was `before`.
    pub fn publish(&self, endpoint: usize, metrics: EndpointMetrics, taken: Instant, before: u64) {
        if let Some(slot) = self.slots.get(endpoint) {
            slot.current.store(Some(Arc::new(Snapshot {
                metrics,
                taken,
                dispatched_before: before,
                finished_since: AtomicU64::new(0),
                finished_counted: AtomicU64::new(0),
            })));
        }
    }

    /// Age of the endpoint's latest snapshot at `now`, if it has one.
    pub fn age(&self, endpoint: usize, now: Instant) -> Option<Duration> {
        self.latest(endpoint)
            .map(|s| now.saturating_duration_since(s.taken))
    }

    /// The endpoint's latest snapshot, however old.
    pub fn latest(&self, endpoint: usize) -> Option<Arc<Snapshot>> {
        self.slots.get(endpoint)?.current.load_full()
    }

    /// The endpoint's metrics if they are known (a snapshot no older than [`Self::stale_after`]).
    pub fn view(&self, endpoint: usize, now: Instant) -> Option<Known> {
        let slot = self.slots.get(endpoint)?;
        let snapshot = slot.current.load_full()?;
        if now.saturating_duration_since(snapshot.taken) > self.stale_after() {
            return None;
        }
        let fresh = slot
            .dispatched
            .load(Ordering::Relaxed)
            .saturating_sub(snapshot.dispatched_before)
            .saturating_sub(snapshot.finished_since.load(Ordering::Relaxed));
        let gone = snapshot.finished_counted.load(Ordering::Relaxed);
        Some(Known {
            snapshot,
            fresh,
            gone,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board() -> MetricsBoard {
        MetricsBoard::new(
            "p",
            vec!["a".into(), "b".into()],
            Duration::from_millis(100),
        )
    }

    fn metrics(waiting: u64) -> EndpointMetrics {
        EndpointMetrics {
            waiting,
            ..EndpointMetrics::default()
        }
    }

    #[test]
    fn unknown_until_published_and_again_when_stale() {
        let b = board();
        let t0 = Instant::now();
        assert!(b.view(0, t0).is_none());
        b.publish(0, metrics(2), t0, b.dispatched(0));
        let k = b.view(0, t0 + Duration::from_millis(300)).expect("fresh");
        assert_eq!(k.waiting(), 2);
        assert!(b.view(0, t0 + Duration::from_millis(301)).is_none());
        assert_eq!(
            b.age(0, t0 + Duration::from_secs(1)),
            Some(Duration::from_secs(1))
        );
        assert!(b.view(1, t0).is_none() && b.view(7, t0).is_none());
    }

    #[test]
    fn dispatches_since_the_scrape_count_until_they_finish() {
        let b = board();
        let t0 = Instant::now();
        let early = b.dispatch(0);
        // A scrape sent now sees `early` (it is in the engine's numbers).
        b.publish(0, metrics(1), t0, b.dispatched(0));
        assert_eq!(b.view(0, t0).expect("known").waiting(), 1);
        let late: Vec<u64> = (0..3).map(|_| b.dispatch(0)).collect();
        assert_eq!(b.view(0, t0).expect("known").waiting(), 4);
        b.finish(0, early);
        assert_eq!(
            b.view(0, t0).expect("known").fresh,
            3,
            "early was not fresh"
        );
        b.finish(0, late[0]);
        b.finish(0, late[1]);
        assert_eq!(b.view(0, t0).expect("known").fresh, 1);
        // The next scrape includes what is still running; nothing is fresh any more.
        let before = b.dispatched(0);
        b.publish(0, metrics(1), t0, before);
        assert_eq!(b.view(0, t0).expect("known").fresh, 0);
        b.finish(0, late[2]);
        assert_eq!(b.view(0, t0).expect("known").fresh, 0);
        // Other endpoints are independent.
        assert_eq!(b.dispatch(1), 1);
        assert_eq!(b.dispatched(0), 4);
    }

    #[test]
    fn requests_in_the_scrape_that_finish_leave_the_running_batch() {
        let b = board();
        let t0 = Instant::now();
        let (one, two) = (b.dispatch(0), b.dispatch(0));
        // The engine runs both when the scrape is sent.
        let running = |n| EndpointMetrics {
            running: n,
            ..EndpointMetrics::default()
        };
        b.publish(0, running(2), t0, b.dispatched(0));
        assert_eq!(b.view(0, t0).expect("known").running(), 2);
        b.finish(0, one);
        assert_eq!(b.view(0, t0).expect("known").running(), 1, "one is gone");
        let three = b.dispatch(0);
        assert_eq!(b.view(0, t0).expect("known").running(), 2, "three is fresh");
        b.finish(0, two);
        b.finish(0, three);
        assert_eq!(b.view(0, t0).expect("known").running(), 0);
        // Another gateway's requests in the engine's figures are never taken off.
        b.publish(0, running(3), t0, b.dispatched(0));
        assert_eq!(b.view(0, t0).expect("known").running(), 3);
    }
}
