//! Fault injection, set at start-up (`--fail-rate`, `--fail-status`), at run time through
//! `GET|PUT|POST|DELETE /admin/faults`, or from the library's [`FaultControl`].
//!
//! | field | effect |
//! |---|---|
//! | `fail_rate`, `fail_status` | that fraction of completion requests is answered at once with `fail_status` and an OpenAI error body |
//! | `hang` | the engine stops stepping: queued and in-flight completions (streams too) stall; `/v1/models` and `/health` are held unanswered; all resume when `hang` is cleared |
//! | `close_after_tokens` | the connection is closed after that many streamed tokens (JSON answers: before the body) |
//! | `extra_latency_ms` | wall-clock delay (not scaled) before each completion request is queued |
//! | `health_status` | status of `GET /health` (200 when healthy) |

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::ApiError;

/// A fault setting out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid faults: {0}")]
pub struct InvalidFaults(pub String);

/// The faults in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Faults {
    /// Fraction (0–1) of completion requests that fail with `fail_status`.
    pub fail_rate: f64,
    /// HTTP status of injected failures (400–599).
    pub fail_status: u16,
    /// Stall the engine (every completion, streams included) and hold `/v1/models` and
    /// `/health` unanswered.
    pub hang: bool,
    /// Close the connection after this many streamed tokens.
    pub close_after_tokens: Option<u64>,
    /// Extra wall-clock delay before a completion request is queued, ms.
    pub extra_latency_ms: f64,
    /// Status of `GET /health`.
    pub health_status: u16,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fail_rate: 0.0,
            fail_status: 500,
            hang: false,
            close_after_tokens: None,
            extra_latency_ms: 0.0,
            health_status: 200,
        }
    }
}

/// A partial update: the fields present replace the current values
/// (`close_after_tokens: null` clears that fault).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsPatch {
    /// See [`Faults::fail_rate`].
    pub fail_rate: Option<f64>,
    /// See [`Faults::fail_status`].
    pub fail_status: Option<u16>,
    /// See [`Faults::hang`].
    pub hang: Option<bool>,
    /// See [`Faults::close_after_tokens`]; `Some(None)` clears it.
    #[serde(default, deserialize_with = "double_option")]
    pub close_after_tokens: Option<Option<u64>>,
    /// See [`Faults::extra_latency_ms`].
    pub extra_latency_ms: Option<f64>,
    /// See [`Faults::health_status`].
    pub health_status: Option<u16>,
}

fn double_option<'de, D>(d: D) -> Result<Option<Option<u64>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Option::<u64>::deserialize(d).map(Some)
}

impl Faults {
    /// Checks the values, naming the first bad field.
    pub fn validate(&self) -> Result<(), InvalidFaults> {
        let bad = |m: &str| Err(InvalidFaults(m.to_string()));
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return bad("fail_rate must be between 0 and 1");
        }
        if !(400..=599).contains(&self.fail_status) {
            return bad("fail_status must be an HTTP error status (400-599)");
        }
        if !(100..=599).contains(&self.health_status) {
            return bad("health_status must be an HTTP status (100-599)");
        }
        if !self.extra_latency_ms.is_finite() || self.extra_latency_ms < 0.0 {
            return bad("extra_latency_ms must be a finite number >= 0");
        }
        Ok(())
    }

    /// These faults with `patch` applied.
    pub fn patched(&self, patch: &FaultsPatch) -> Faults {
        let mut f = self.clone();
        if let Some(v) = patch.fail_rate {
            f.fail_rate = v;
        }
        if let Some(v) = patch.fail_status {
            f.fail_status = v;
        }
        if let Some(v) = patch.hang {
            f.hang = v;
        }
        if let Some(v) = patch.close_after_tokens {
            f.close_after_tokens = v;
        }
        if let Some(v) = patch.extra_latency_ms {
            f.extra_latency_ms = v;
        }
        if let Some(v) = patch.health_status {
            f.health_status = v;
        }
        f
    }
}

/// Shared, cheaply cloned control over a running simulator's faults.
#[derive(Debug, Clone)]
pub struct FaultControl {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tx: watch::Sender<Faults>,
    rng: Mutex<StdRng>,
}

impl FaultControl {
    /// A control starting with `initial` faults; `seed` drives the failure draws.
    pub fn new(initial: Faults, seed: u64) -> Self {
        FaultControl {
            inner: Arc::new(Inner {
                tx: watch::Sender::new(initial),
                rng: Mutex::new(StdRng::seed_from_u64(seed ^ 0xfa17_fa17)),
            }),
        }
    }

    /// The faults in force.
    pub fn get(&self) -> Faults {
        self.inner.tx.borrow().clone()
    }

    /// Replaces all faults.
    pub fn set(&self, faults: Faults) -> Result<(), InvalidFaults> {
        faults.validate()?;
        self.inner.tx.send_replace(faults);
        Ok(())
    }

    /// Applies a partial update and returns the faults now in force.
    pub fn patch(&self, patch: &FaultsPatch) -> Result<Faults, InvalidFaults> {
        let next = self.get().patched(patch);
        self.set(next.clone())?;
        Ok(next)
    }

    /// Removes every fault.
    pub fn clear(&self) {
        self.inner.tx.send_replace(Faults::default());
    }

    /// Sets the failure rate and status.
    pub fn set_fail(&self, rate: f64, status: u16) -> Result<(), InvalidFaults> {
        self.patch(&FaultsPatch {
            fail_rate: Some(rate),
            fail_status: Some(status),
            ..FaultsPatch::default()
        })
        .map(|_| ())
    }

    /// Holds (or releases) requests.
    pub fn set_hang(&self, hang: bool) {
        self.inner.tx.send_modify(|f| f.hang = hang);
    }

    /// Closes streams after `tokens` tokens (`None`: never).
    pub fn set_close_after_tokens(&self, tokens: Option<u64>) {
        self.inner.tx.send_modify(|f| f.close_after_tokens = tokens);
    }

    /// Adds wall-clock latency before each completion request.
    pub fn set_extra_latency_ms(&self, ms: f64) {
        if ms.is_finite() && ms >= 0.0 {
            self.inner.tx.send_modify(|f| f.extra_latency_ms = ms);
        }
    }

    /// Sets the status `GET /health` answers with.
    pub fn set_health_status(&self, status: u16) {
        if (100..=599).contains(&status) {
            self.inner.tx.send_modify(|f| f.health_status = status);
        }
    }

    /// Draws whether this request fails; returns the error to answer with.
    pub fn draw_failure(&self) -> Option<ApiError> {
        let f = self.get();
        if f.fail_rate <= 0.0 {
            return None;
        }
        let hit = f.fail_rate >= 1.0 || self.inner.rng.lock().gen::<f64>() < f.fail_rate;
        if !hit {
            return None;
        }
        let status =
            StatusCode::from_u16(f.fail_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Some(ApiError::new(
            status,
            format!("vllm-sim injected failure ({})", status.as_u16()),
        ))
    }

    /// Waits while `hang` is set.
    pub async fn wait_while_hung(&self) {
        let mut rx = self.inner.tx.subscribe();
        // An error means the control is gone; nothing left to wait for.
        let _ = rx.wait_for(|f| !f.hang).await;
    }
}

/// `GET /admin/faults`: the faults in force.
pub async fn get_faults(State(ctl): State<FaultControl>) -> Json<Faults> {
    Json(ctl.get())
}

/// `PUT|POST /admin/faults` with a JSON [`FaultsPatch`]: updates and returns the faults.
pub async fn put_faults(State(ctl): State<FaultControl>, body: Bytes) -> Response {
    let patch: FaultsPatch = if body.iter().all(u8::is_ascii_whitespace) {
        FaultsPatch::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => return ApiError::bad_request(format!("invalid faults: {e}")).into_response(),
        }
    };
    match ctl.patch(&patch) {
        Ok(f) => Json(f).into_response(),
        Err(e) => ApiError::bad_request(e.to_string()).into_response(),
    }
}

/// `DELETE /admin/faults`: removes every fault.
pub async fn delete_faults(State(ctl): State<FaultControl>) -> Json<Faults> {
    ctl.clear();
    Json(ctl.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_merges_and_validates() {
        let ctl = FaultControl::new(Faults::default(), 1);
        let p: FaultsPatch = serde_json::from_str(
            r#"{"fail_rate": 1.0, "fail_status": 503, "close_after_tokens": 3}"#,
        )
        .unwrap();
        let f = ctl.patch(&p).unwrap();
        assert_eq!(f.fail_status, 503);
        assert_eq!(f.close_after_tokens, Some(3));
        assert_eq!(ctl.draw_failure().unwrap().status.as_u16(), 503);
        let p: FaultsPatch = serde_json::from_str(r#"{"close_after_tokens": null}"#).unwrap();
        assert_eq!(ctl.patch(&p).unwrap().close_after_tokens, None);
        assert_eq!(ctl.get().fail_rate, 1.0);
        let bad: FaultsPatch = serde_json::from_str(r#"{"fail_rate": 2}"#).unwrap();
        assert!(ctl.patch(&bad).is_err());
        assert!(serde_json::from_str::<FaultsPatch>(r#"{"nope": 1}"#).is_err());
        ctl.clear();
        assert!(ctl.draw_failure().is_none());
    }

    #[test]
    fn failure_rate_is_roughly_honoured() {
        let ctl = FaultControl::new(
            Faults {
                fail_rate: 0.25,
                ..Faults::default()
            },
            42,
        );
        let fails = (0..4000).filter(|_| ctl.draw_failure().is_some()).count();
        assert!((800..1200).contains(&fails), "{fails}");
    }

    #[tokio::test]
    async fn hang_holds_until_cleared() {
        let ctl = FaultControl::new(Faults::default(), 1);
        ctl.set_hang(true);
        let c2 = ctl.clone();
        let waiter = tokio::spawn(async move { c2.wait_while_hung().await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        ctl.set_hang(false);
        waiter.await.unwrap();
    }
}
