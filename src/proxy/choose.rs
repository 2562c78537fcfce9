//! Choosing the endpoint of one attempt: the proxy's decision, without Pingora, so unit tests
//! can drive it.
//!
//! Candidates are the pool's untried endpoints that pass health (active and passive; see
//! [`Pool::candidates`]). A request the policy cannot judge (no body, not JSON, no prompt) is
//! placed by the pool's round-robin fallback; any other by the pool's policy. The pick is checked
//! against the candidates, counted, and wrapped in an [`Attempt`] that holds its lease and the
//! local in-flight count until the attempt ends.

use std::net::SocketAddr;
use std::sync::Arc;

use super::ctx::Attempt;
use crate::apis::Api;
use crate::endpoint::{EndpointId, Outcome};
use crate::policy::{Pick, PickInput, PolicyError};
use crate::request::LlmRequest;
use crate::routing::Pool;
use crate::telemetry::{self, FallbackReason};

/// The endpoint chosen for an attempt.
#[derive(Debug)]
pub struct Chosen {
    /// Where to send the request.
    pub addr: SocketAddr,
    /// The policy that chose (`""` never: the pool's policy or its fallback's name).
    pub policy: &'static str,
    /// Why (a pick reason, or `fallback`).
    pub reason: &'static str,
    /// The attempt's accounting, released exactly once.
    pub attempt: Attempt,
}

/// Why no endpoint was chosen.
#[derive(Debug, thiserror::Error)]
pub enum ChooseError {
    /// `max_attempts` endpoints were tried already.
    #[error("gave up after {0} attempts")]
    GaveUp(usize),
    /// Every endpoint of the pool has been tried.
    #[error("no endpoint of pool '{0}' is available")]
    NoCandidate(String),
    /// The policy could not choose.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The policy chose an endpoint that is not a candidate (a bug in the policy).
    #[error("policy picked a non-candidate")]
    NotACandidate,
}

/// Choose an endpoint of `pool` for `request`, which has tried `tried` (at most `max_attempts`
/// attempts in all).
pub async fn choose(
    pool: &Arc<Pool>,
    request: &LlmRequest,
    tried: &[EndpointId],
    max_attempts: usize,
) -> Result<Chosen, ChooseError> {
    if tried.len() >= max_attempts {
        return Err(ChooseError::GaveUp(tried.len()));
    }
    let candidates = pool.candidates(tried);
    if candidates.ids.is_empty() {
        return Err(ChooseError::NoCandidate(pool.name().to_owned()));
    }
    if candidates.panic {
        telemetry::count_fallback(pool.name(), FallbackReason::NoHealthyEndpoint);
    }
    let pick = match request.fallback_reason() {
        Some(reason) => {
            telemetry::count_fallback(pool.name(), reason);
            Pick {
                endpoint: pool.fallback.pick_sync(&candidates.ids)?,
                reason: "fallback",
                lease: None,
            }
        }
        None => {
            let input = PickInput {
                request,
                endpoints: &pool.endpoints,
                candidates: &candidates.ids,
            };
            pool.policy.pick(input).await?
        }
    };
    let Some(endpoint) = pool
        .endpoint(pick.endpoint)
        .filter(|_| candidates.ids.contains(&pick.endpoint))
    else {
        if let Some(lease) = pick.lease {
            lease.release(Outcome::Failed);
        }
        return Err(ChooseError::NotACandidate);
    };
    let policy = pool.policy.name();
    telemetry::count_pick(pool.name(), policy, pick.reason);
    let attempt = Attempt::new(
        pick.endpoint,
        pick.lease,
        pool.inflight_guard(pick.endpoint),
    );
    Ok(Chosen {
        addr: endpoint.addr,
        policy,
        reason: pick.reason,
        attempt: if request.api == Api::Responses {
            attempt.watch_response_id()
        } else {
            attempt
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::health::{Failure, Verdict};

    fn pool(policy: &str) -> Arc<Pool> {
        let c = Config::from_yaml(&format!(
            "pools:\n  - name: p\n    models: ['*']\n    endpoints: ['127.0.0.1:1', '127.0.0.1:2', '127.0.0.1:3']\n    health_check: {{enabled: false}}\n    outlier_detection: {{consecutive_failures: 1}}\n    lb_policy: {policy}\n"
        ))
        .expect("config");
        Pool::first_of(&c)
    }

    fn chat() -> LlmRequest {
        LlmRequest::parse(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
    }

    #[tokio::test]
    async fn a_pick_holds_an_inflight_count_until_its_attempt_ends() {
        let pool = pool("global_least_request");
        let chosen = choose(&pool, &chat(), &[], 3).await.expect("chosen");
        assert_eq!(chosen.policy, "global_least_request");
        assert_eq!(chosen.reason, "least_request");
        let id = chosen.attempt.endpoint;
        assert_eq!(pool.endpoints[id.index()].inflight(), 1);
        chosen.attempt.finish(Outcome::Completed);
        assert_eq!(pool.endpoints[id.index()].inflight(), 0);
    }

    #[tokio::test]
    async fn requests_without_a_prompt_take_the_fallback() {
        let pool = pool("prefix_cache");
        for body in [&b""[..], b"not json", br#"{"model":"m"}"#] {
            let chosen = choose(&pool, &LlmRequest::parse(body), &[], 3)
                .await
                .expect("chosen");
            assert_eq!(chosen.reason, "fallback");
        }
    }

    #[tokio::test]
    async fn tried_and_ejected_endpoints_are_avoided_and_attempts_are_bounded() {
        let pool = pool("round_robin");
        let id = EndpointId::new;
        pool.report(id(0), Verdict::Failure(Failure::Status(503)));
        for _ in 0..6 {
            let chosen = choose(&pool, &chat(), &[id(1)], 3).await.expect("chosen");
            assert_eq!(chosen.attempt.endpoint, id(2), "0 is ejected, 1 was tried");
        }
        let all = [id(0), id(1), id(2)];
        assert!(matches!(
            choose(&pool, &chat(), &all, 5).await,
            Err(ChooseError::NoCandidate(_))
        ));
        assert!(matches!(
            choose(&pool, &chat(), &all[..2], 2).await,
            Err(ChooseError::GaveUp(2))
        ));
    }
}
