//! `global_least_request`: the endpoint with the fewest requests in flight summed over every
//! gateway replica, chosen and counted in one atomic store round trip ([`PoolCounts::acquire`]);
//! ties broken uniformly at random; weights are not used (as in Higress). The count is released
//! by the attempt's [`Lease`], exactly once.
//!
//! When the store cannot answer (timeout, error, breaker open) the request is not refused: the
//! endpoint with the fewest requests in flight *from this replica* is chosen instead, and the
//! fallback is counted in `llmlb_fallback_total{reason}`. With `maxRequestCount`, a request finds
//! every candidate at the cap → [`PolicyError::Saturated`] (429); the local fallback applies the
//! same cap to local counts.
//!
//! A request that names a session goes where the session's earlier requests went, under the
//! default load guard of `prefix_cache` (the same session chain in the prefix index; reasons
//! `session_hit`, `session_diverted`, `session_new`); a Responses API request that continues a
//! stored response goes to the endpoint that stored it, as in `prefix_cache`.

use std::sync::Arc;

use async_trait::async_trait;

use super::local::{local_least, request_lease};
use super::prefix_cache::{response_affinity, session_affinity};
use super::{Pick, PickInput, Policy, PolicyError};
use crate::config::{PolicyKind, PrefixSettings};
use crate::store::{PoolCounts, Skip};
use crate::telemetry;

/// The policy of one pool.
pub struct GlobalLeastRequest {
    counts: Arc<PoolCounts>,
    max: Option<u64>,
}

impl GlobalLeastRequest {
    /// Count in `counts`; refuse when every candidate has `max` in flight.
    pub fn new(counts: Arc<PoolCounts>, max: Option<u64>) -> Self {
        GlobalLeastRequest { counts, max }
    }
}

#[async_trait]
impl Policy for GlobalLeastRequest {
    fn name(&self) -> &'static str {
        PolicyKind::GlobalLeastRequest.name()
    }

    fn reasons(&self) -> &'static [&'static str] {
        &[
            "least_request",
            "session_hit",
            "session_diverted",
            "session_new",
            "response_hit",
            "response_diverted",
            "response_new",
            "local_least_request",
        ]
    }

    async fn pick(&self, input: PickInput<'_>) -> Result<Pick, PolicyError> {
        let defaults = PrefixSettings::default();
        if let Some(response) = input.request.previous_response {
            return response_affinity(&self.counts, self.max, defaults, &input, response).await;
        }
        match input.request.session {
            Some(session) if !input.request.api.load_only() => {
                session_affinity(&self.counts, self.max, defaults, &input, session).await
            }
            _ => least_request(&self.counts, self.max, &input).await,
        }
    }
}

/// The candidate with the fewest requests in flight over every replica, counted in `counts`
/// (reason `least_request`); the local fallback when the store cannot answer. Also how
/// `prefix_cache` places load-only requests.
pub(super) async fn least_request(
    counts: &Arc<PoolCounts>,
    max: Option<u64>,
    input: &PickInput<'_>,
) -> Result<Pick, PolicyError> {
    let labels = input.candidate_labels()?;
    match counts.acquire(&labels, max).await {
        Ok(i) => Ok(Pick {
            endpoint: input.candidates[i],
            reason: "least_request",
            lease: Some(request_lease(
                counts,
                labels[i],
                input.request,
                PrefixSettings::default().ttl,
            )),
        }),
        Err(Skip::Saturated) => Err(PolicyError::Saturated),
        Err(Skip::Fallback(reason)) => {
            telemetry::count_fallback(counts.pool(), reason);
            local_least(input, max)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ids, views};
    use super::*;
    use crate::endpoint::EndpointId;
    use crate::endpoint::Outcome;
    use crate::request::LlmRequest;
    use crate::store::MemoryStore;

    fn policy(max: Option<u64>) -> (GlobalLeastRequest, Arc<PoolCounts>) {
        let counts = Arc::new(PoolCounts::new(Arc::new(MemoryStore::new()), "p"));
        (GlobalLeastRequest::new(counts.clone(), max), counts)
    }

    async fn pick(
        p: &GlobalLeastRequest,
        n: usize,
        candidates: &[EndpointId],
    ) -> Result<Pick, PolicyError> {
        let endpoints = views(&vec![1; n]);
        let request = LlmRequest::empty();
        p.pick(PickInput {
            request: &request,
            endpoints: &endpoints,
            candidates,
        })
        .await
    }

    #[tokio::test]
    async fn held_picks_spread_evenly_and_leases_release() {
        let (p, counts) = policy(None);
        let mut leases = Vec::new();
        let mut hist = [0; 3];
        for _ in 0..9 {
            let pick = pick(&p, 3, &ids(3)).await.expect("pick");
            assert_eq!(pick.reason, "least_request");
            hist[pick.endpoint.index()] += 1;
            leases.push(pick.lease.expect("lease"));
        }
        assert_eq!(hist, [3, 3, 3]);
        for l in leases {
            l.release(Outcome::Completed);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let totals = counts
            .store()
            .inflight("p", &["127.0.0.1:9000", "127.0.0.1:9001", "127.0.0.1:9002"])
            .await
            .expect("inflight");
        assert_eq!(totals, vec![0, 0, 0]);
    }

    #[tokio::test]
    async fn only_candidates_and_the_cap() {
        let (p, _counts) = policy(Some(1));
        let only = [EndpointId::new(2)];
        let first = pick(&p, 3, &only).await.expect("pick");
        assert_eq!(first.endpoint, EndpointId::new(2));
        assert!(matches!(
            pick(&p, 3, &only).await,
            Err(PolicyError::Saturated)
        ));
        assert!(pick(&p, 3, &ids(3)).await.is_ok());
    }

    #[tokio::test]
    async fn a_sick_store_falls_back_to_local_counts() {
        let (p, counts) = policy(None);
        for _ in 0..crate::store::TRIP_AFTER {
            counts.trip_for_test();
        }
        let pick = pick(&p, 3, &ids(3)).await.expect("pick");
        assert_eq!(pick.reason, "local_least_request");
        assert!(pick.lease.is_none());
        let endpoints = views(&[1, 1, 1]);
        let request = LlmRequest::empty();
        let input = PickInput {
            request: &request,
            endpoints: &endpoints,
            candidates: &ids(3)[1..],
        };
        assert!(local_least(&input, None).expect("pick").endpoint.index() >= 1);
        assert!(matches!(
            local_least(&input, Some(0)),
            Err(PolicyError::Saturated)
        ));
    }
}
