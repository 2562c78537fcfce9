//! `round_robin`: smooth weighted round robin (as nginx), skipping endpoints that are not candidates.
//!
//! The schedule over all endpoints is computed once; a shared counter walks it. When only some
//! endpoints are candidates the counter walks the schedule restricted to them, so requests spread
//! evenly (by weight) over whatever subset is healthy. It is also every pool's fallback for requests without a prompt.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;

use super::{Pick, PickInput, Policy, PolicyError};
use crate::config::PolicyKind;
use crate::endpoint::EndpointId;

/// Weighted round robin.
pub struct RoundRobin {
    schedule: Vec<EndpointId>,
    endpoints: usize,
    next: AtomicUsize,
}

impl RoundRobin {
    /// A schedule for endpoints with these weights (index = endpoint id).
    pub fn new(weights: &[usize]) -> Self {
        RoundRobin {
            schedule: smooth_schedule(weights),
            endpoints: weights.len(),
            next: AtomicUsize::new(0),
        }
    }

    /// The next scheduled candidate (synchronous; used directly as the fallback).
    pub fn pick_sync(&self, candidates: &[EndpointId]) -> Result<EndpointId, PolicyError> {
        let n = self.schedule.len();
        if n == 0 || candidates.is_empty() {
            return Err(PolicyError::Unavailable("no candidates".into()));
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        if candidates.len() == self.endpoints {
            return Ok(self.schedule[turn % n]);
        }
        // Walk the schedule restricted to the candidates, so each keeps its share (skipping an
        // endpoint must not hand its turns to its neighbour).
        let allowed: Vec<EndpointId> = self
            .schedule
            .iter()
            .copied()
            .filter(|id| candidates.contains(id))
            .collect();
        if allowed.is_empty() {
            // Candidates outside this pool's schedule cannot happen; be total anyway.
            return Ok(candidates[turn % candidates.len()]);
        }
        Ok(allowed[turn % allowed.len()])
    }
}

#[async_trait]
impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        PolicyKind::RoundRobin.name()
    }

    fn reasons(&self) -> &'static [&'static str] {
        &["round_robin"]
    }

    async fn pick(&self, input: PickInput<'_>) -> Result<Pick, PolicyError> {
        Ok(Pick {
            endpoint: self.pick_sync(input.candidates)?,
            reason: "round_robin",
            lease: None,
        })
    }
}

/// nginx's smooth weighted round robin, unrolled over one full cycle (sum of weights).
fn smooth_schedule(weights: &[usize]) -> Vec<EndpointId> {
    let total: i64 = weights.iter().map(|w| *w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total.max(0) as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += *w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(EndpointId::new(best));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::{histogram, ids};

    #[tokio::test]
    async fn even_spread() {
        let rr = RoundRobin::new(&[1, 1, 1]);
        assert_eq!(
            histogram(&rr, &[1, 1, 1], &ids(3), 300).await,
            vec![100, 100, 100]
        );
    }

    #[tokio::test]
    async fn weighted_and_interleaved() {
        assert_eq!(
            smooth_schedule(&[5, 1, 1])
                .iter()
                .map(|i| i.index())
                .collect::<Vec<_>>(),
            vec![0, 0, 1, 0, 2, 0, 0]
        );
        let rr = RoundRobin::new(&[1, 2]);
        assert_eq!(histogram(&rr, &[1, 2], &ids(2), 300).await, vec![100, 200]);
    }

    #[tokio::test]
    async fn skips_non_candidates() {
        let rr = RoundRobin::new(&[1, 1, 1]);
        let c = [EndpointId::new(0), EndpointId::new(2)];
        assert_eq!(histogram(&rr, &[1, 1, 1], &c, 300).await, vec![150, 0, 150]);
    }
}
