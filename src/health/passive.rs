//! Passive health: outlier ejection of endpoints that fail the requests sent to them.
//!
//! The active health check only notices a sick endpoint at its next probe, and a probe of
//! `/health` says nothing about an engine that answers every completion with a 500 in a
//! millisecond — which a least-request policy then *prefers*, since it has nothing in flight
//! (Higress's "error amplification"). So every upstream attempt reports how it ended:
//!
//! - **failure**: the connect failed or timed out; the upstream timed out or broke the
//!   connection (also in the middle of a streamed answer); or it answered **500, 502, 503 or
//!   504**. Those four say "this server cannot serve now" whatever the request; 501 and 505
//!   describe the request, and 429 is back-pressure, not sickness.
//! - **success**: any other upstream answer, **4xx included** — a client's bad request never
//!   counts against an endpoint.
//! - **neutral**: the client went away, the request context was dropped at shutdown, or a pooled
//!   keep-alive connection turned out to be stale (sent again over a fresh connection; the server did
//!   nothing wrong).
//!
//! `consecutive_failures` failures in a row (a success resets the streak) eject the endpoint for
//! `base_ejection × 2^k`, at most `max_ejection`, where `k` counts its earlier ejections (`k`
//! starts again at 0 once it has stayed admitted for `max_ejection`). An ejected endpoint is not
//! a candidate, so no policy can be attracted to it; it is admitted again when the period ends. At
//! most `max_ejected_percent` of a pool's endpoints (at least one, never all) are ejected at once,
//! and when ejection (with the health check) leaves no candidate, ejected endpoints are tried
//! rather than refusing the request — ejection never empties a pool.
//!
//! Reads on the request path ([`Outliers::is_ejected`]) are one atomic load; reports take a
//! short, never-awaited lock. Each endpoint's state is shared with the detector of the next
//! generation (a reload, a DNS change) by endpoint label, so ejections, streaks and back-off
//! survive them, and attempts that finish on the replaced generation still count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::verdict::{failure_text, Verdict};
use crate::config::OutlierConfig;
use crate::telemetry;

/// Outlier state of one endpoint.
#[derive(Debug, Default)]
struct Record {
    consecutive: u32,
    ejected: bool,
    /// Ejections since it last stayed admitted for `max_ejection` (the back-off exponent).
    ejections: u32,
    /// When it was last admitted again (ms since the detector's epoch).
    returned_ms: Option<u64>,
}

/// One endpoint's passive-health state. The detectors of successive generations share it (by
/// endpoint label), so a reload or a DNS change keeps ejections, streaks and back-off, and
/// attempts that finish on a replaced generation still count.
#[derive(Debug, Default)]
struct Slot {
    record: Mutex<Record>,
    /// ms since the detector's epoch until which the endpoint is ejected (0: admitted).
    until_ms: AtomicU64,
}

/// A pool's outlier detector.
pub struct Outliers {
    pool: String,
    labels: Vec<String>,
    config: Option<OutlierConfig>,
    /// Time origin of `until_ms` (the first generation's, carried over).
    epoch: Instant,
    /// Per endpoint, in the pool's order.
    slots: Vec<Arc<Slot>>,
    /// Held while a report decides an ejection, so the pool-wide cap holds.
    deciding: Mutex<()>,
}

impl Outliers {
    /// A detector for `pool`'s endpoints `labels`; `None` config disables ejection. Endpoints
    /// that `previous` (the same pool in the generation being replaced) also has keep their
    /// state.
    pub fn new(
        pool: &str,
        labels: Vec<String>,
        config: Option<OutlierConfig>,
        previous: Option<&Outliers>,
    ) -> Arc<Self> {
        let carried = |label: &String| {
            let p = previous?;
            let i = p.labels.iter().position(|l| l == label)?;
            p.slots.get(i).cloned()
        };
        let slots: Vec<Arc<Slot>> = labels
            .iter()
            .map(|l| carried(l).unwrap_or_default())
            .collect();
        for (label, slot) in labels.iter().zip(&slots) {
            telemetry::set_endpoint_ejected(pool, label, slot.record.lock().ejected);
        }
        Arc::new(Outliers {
            pool: pool.to_string(),
            slots,
            labels,
            config,
            epoch: previous.map_or_else(Instant::now, |p| p.epoch),
            deciding: Mutex::new(()),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Whether endpoint `index` is ejected right now.
    pub fn is_ejected(&self, index: usize) -> bool {
        self.is_ejected_at(index, self.now_ms())
    }

    /// How long endpoint `index` stays ejected (`None`: it is admitted).
    pub fn ejected_for(&self, index: usize) -> Option<Duration> {
        let now = self.now_ms();
        let until = self.slots.get(index)?.until_ms.load(Ordering::Acquire);
        (until > now).then(|| Duration::from_millis(until - now))
    }

    fn is_ejected_at(&self, index: usize, now_ms: u64) -> bool {
        self.slots
            .get(index)
            .is_some_and(|s| s.until_ms.load(Ordering::Acquire) > now_ms)
    }

    /// Record how an attempt on endpoint `index` ended; may eject it.
    pub fn report(&self, index: usize, verdict: Verdict) {
        self.report_at(index, verdict, self.now_ms());
    }

    /// [`Outliers::report`] at `now_ms`; returns the ejection period if it ejected the endpoint.
    fn report_at(&self, index: usize, verdict: Verdict, now_ms: u64) -> Option<Duration> {
        let config = self.config?;
        if verdict == Verdict::Neutral {
            return None;
        }
        let _deciding = self.deciding.lock();
        let slot = self.slots.get(index)?;
        let mut record = slot.record.lock();
        self.readmit_if_over(index, slot, &mut record, now_ms);
        if record.ejected {
            // Attempts started before the ejection: they neither extend nor shorten it.
            return None;
        }
        let failure = match verdict {
            Verdict::Failure(f) => f,
            Verdict::Success | Verdict::Neutral => {
                record.consecutive = 0;
                return None;
            }
        };
        record.consecutive = record.consecutive.saturating_add(1);
        if record.consecutive < config.consecutive_failures {
            return None;
        }
        // Only now, about to eject, look at the whole pool (atomics only): the cap.
        let total = self.slots.len();
        let ejected_now = (0..total)
            .filter(|i| self.is_ejected_at(*i, now_ms))
            .count();
        let cap = (total * usize::from(config.max_ejected_percent) / 100)
            .max(1)
            .min(total.saturating_sub(1));
        let label = self.labels.get(index).map_or("?", String::as_str);
        if ejected_now >= cap {
            log::debug!(
                "pool {}: endpoint {label} failed {} times in a row but {ejected_now} of {total} endpoints are already ejected",
                self.pool,
                record.consecutive
            );
            return None;
        }
        let max_ms = u64::try_from(config.max_ejection.as_millis()).unwrap_or(u64::MAX);
        if record
            .returned_ms
            .is_some_and(|t| now_ms.saturating_sub(t) >= max_ms)
        {
            record.ejections = 0;
        }
        let period = config
            .base_ejection
            .saturating_mul(1u32.checked_shl(record.ejections).unwrap_or(u32::MAX))
            .min(config.max_ejection);
        log::warn!(
            "pool {}: endpoint {label} ejected for {} ms after {} consecutive failures (last: {})",
            self.pool,
            period.as_millis(),
            record.consecutive,
            failure_text(failure)
        );
        record.ejections = record.ejections.saturating_add(1);
        record.consecutive = 0;
        record.ejected = true;
        let until = now_ms.saturating_add(u64::try_from(period.as_millis()).unwrap_or(u64::MAX));
        slot.until_ms.store(until, Ordering::Release);
        telemetry::count_ejection(&self.pool, label, failure.label());
        telemetry::set_endpoint_ejected(&self.pool, label, true);
        Some(period)
    }

    /// Mark endpoint `index` admitted again if its period is over (log line, gauge).
    fn readmit_if_over(&self, index: usize, slot: &Slot, record: &mut Record, now_ms: u64) {
        let until = slot.until_ms.load(Ordering::Acquire);
        if record.ejected && until <= now_ms {
            record.ejected = false;
            record.consecutive = 0;
            // The period's end, even when noticed later.
            record.returned_ms = Some(until);
            let label = self.labels.get(index).map_or("?", String::as_str);
            log::info!("pool {}: endpoint {label} is back from ejection", self.pool);
            telemetry::set_endpoint_ejected(&self.pool, label, false);
        }
    }

    /// Log and update the gauge of endpoints whose ejection has ended. Admission itself needs no
    /// call (the request path compares times); the routing layer's sweep calls this every
    /// second so the gauge follows even when no request reports.
    pub fn readmit_due(&self) {
        let _deciding = self.deciding.lock();
        let now_ms = self.now_ms();
        for (i, slot) in self.slots.iter().enumerate() {
            self.readmit_if_over(i, slot, &mut slot.record.lock(), now_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Failure;

    fn detector(n: usize, config: OutlierConfig) -> Arc<Outliers> {
        let labels = (0..n).map(|i| format!("127.0.0.1:{}", 7000 + i)).collect();
        Outliers::new("t", labels, Some(config), None)
    }

    fn config(threshold: u32, base_ms: u64, pct: u8) -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: threshold,
            base_ejection: Duration::from_millis(base_ms),
            max_ejection: Duration::from_millis(base_ms * 4),
            max_ejected_percent: pct,
        }
    }

    const FAIL: Verdict = Verdict::Failure(Failure::Status(500));

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_streak() {
        let o = detector(3, config(3, 60_000, 50));
        o.report(0, FAIL);
        o.report(0, FAIL);
        o.report(0, Verdict::Success);
        o.report(0, FAIL);
        o.report(0, FAIL);
        o.report(0, Verdict::Neutral);
        assert!(!o.is_ejected(0));
        o.report(0, FAIL);
        assert!(o.is_ejected(0));
        assert!(!o.is_ejected(1));
    }

    #[test]
    fn at_most_the_cap_is_ejected_and_never_the_whole_pool() {
        let o = detector(2, config(1, 60_000, 100));
        o.report(0, FAIL);
        o.report(1, FAIL);
        assert!(o.is_ejected(0));
        assert!(!o.is_ejected(1), "the last admitted endpoint stays");

        let o = detector(4, config(1, 60_000, 50));
        for i in 0..4 {
            o.report(i, FAIL);
        }
        let ejected = (0..4).filter(|i| o.is_ejected(*i)).count();
        assert_eq!(ejected, 2);

        // 10 % of 3 rounds down to 0, but one may always go.
        let o = detector(3, config(1, 60_000, 10));
        o.report(2, FAIL);
        o.report(1, FAIL);
        assert!(o.is_ejected(2) && !o.is_ejected(1));

        // A single endpoint is never ejected.
        let o = detector(1, config(1, 60_000, 100));
        o.report(0, FAIL);
        assert!(!o.is_ejected(0));
    }

    #[test]
    fn ejection_ends_and_backs_off_up_to_the_maximum() {
        // base 100 ms, max 400 ms
        let o = detector(2, config(1, 100, 50));
        let eject = |at: u64| o.report_at(0, FAIL, at);
        assert_eq!(eject(1000), Some(Duration::from_millis(100)));
        assert!(o.is_ejected_at(0, 1099));
        // Reports while ejected change nothing.
        assert_eq!(eject(1050), None);
        assert!(!o.is_ejected_at(0, 1100), "admitted again after the period");
        assert_eq!(eject(1100), Some(Duration::from_millis(200)));
        assert!(o.is_ejected_at(0, 1299) && !o.is_ejected_at(0, 1300));
        assert_eq!(eject(1300), Some(Duration::from_millis(400)));
        assert_eq!(eject(1700), Some(Duration::from_millis(400)), "capped");
        // Admitted for the maximum period: back to the base.
        assert_eq!(eject(2100 + 400), Some(Duration::from_millis(100)));
    }

    #[test]
    fn a_new_generation_keeps_each_endpoints_state_and_back_off() {
        // base 100 ms, max 400 ms; two of three endpoints may be ejected.
        let old = detector(3, config(1, 100, 67));
        assert_eq!(
            old.report_at(2, FAIL, 1000),
            Some(Duration::from_millis(100))
        );
        // The next generation drops endpoint 0 and adds one; 2 is now at index 0.
        let labels = vec!["127.0.0.1:7002".to_owned(), "127.0.0.1:7009".to_owned()];
        let new = Outliers::new("t", labels, Some(config(1, 100, 67)), Some(&old));
        assert!(new.is_ejected_at(0, 1099) && !new.is_ejected_at(1, 1099));
        // Its back-off goes on: the second ejection doubles.
        assert_eq!(
            new.report_at(0, FAIL, 1100),
            Some(Duration::from_millis(200))
        );
        // Reports that reach the replaced generation (attempts it started) land in the same state.
        assert!(old.is_ejected_at(2, 1299));
    }

    #[test]
    fn disabled_never_ejects() {
        let o = Outliers::new("t", vec!["a".into(), "b".into()], None, None);
        for _ in 0..100 {
            o.report(0, FAIL);
        }
        assert!(!o.is_ejected(0));
    }
}
