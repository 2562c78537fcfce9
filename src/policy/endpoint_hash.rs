//! `endpoint_hash` (Higress 2.x): a request that carries the `hash_header` header (default
//! `x-mse-consumer`) is pinned to the endpoint its value was bound to; bindings live in the store,
//! shared by every replica, for `stickyTimeout` minutes from their last use.
//!
//! The header's value is the request's session key: the pool's
//! [`SessionConfig`](crate::config::SessionConfig) is that header alone
//! ([`crate::config::EndpointHashConfig::session`]), and the proxy hashes it into
//! `request.session`. One store round trip ([`PoolCounts::acquire_prefix`] over the one-key chain
//! `[key]`, load guard [`LoadGuard::NEVER`](crate::config::LoadGuard::NEVER), `sole`) matches the
//! binding, counts the request in flight (as `global_least_request` does) and writes the chosen
//! endpoint as the key's only one, refreshing its TTL:
//!
//! - **`hash_hit`** — the endpoint the key is bound to, however busy: a pin, not a preference;
//! - **`hash_diverted`** — that endpoint is at `maxRequestCount`: the least loaded candidate,
//!   which the key is bound to from now on;
//! - **`hash_new`** — no binding (first request, expired), or its endpoint is no longer a
//!   candidate (unhealthy, ejected, removed, already tried by this request): the least loaded
//!   candidate, which the key is bound to from now on. As in Higress (one Redis value per key),
//!   the endpoint it moved away from is forgotten: coming back does not take the key back.
//!
//! Load-only requests (embeddings, rerank) with the header are pinned too: Higress pins by
//! header, whatever the body. A request without the header is never pinned and binds nothing: the
//! least loaded candidate over every replica (`least_request`). When the store cannot answer, the
//! request is routed by local in-flight counts (`local_least_request`) and counted in
//! `llmlb_fallback_total`; bindings resume with the store.

use std::sync::Arc;

use async_trait::async_trait;

use super::global_least_request::least_request;
use super::local::Reasons;
use super::prefix_cache::{pinned, Pin};
use super::{Pick, PickInput, Policy, PolicyError};
use crate::config::{EndpointHashConfig, PolicyKind};
use crate::store::PoolCounts;

/// Reasons of a hit, a diversion (`maxRequestCount`) and a new binding.
const HASH_REASONS: Reasons = ["hash_hit", "hash_diverted", "hash_new"];

/// The policy of one pool.
pub struct EndpointHash {
    counts: Arc<PoolCounts>,
    max: Option<u64>,
    config: EndpointHashConfig,
}

impl EndpointHash {
    /// Count and bind in `counts`; refuse when every candidate has `max` in flight; `config`: the
    /// bindings' lifetime (its header is read by the proxy through the pool's session settings).
    pub fn new(counts: Arc<PoolCounts>, max: Option<u64>, config: EndpointHashConfig) -> Self {
        EndpointHash {
            counts,
            max,
            config,
        }
    }
}

#[async_trait]
impl Policy for EndpointHash {
    fn name(&self) -> &'static str {
        PolicyKind::EndpointHash.name()
    }

    fn reasons(&self) -> &'static [&'static str] {
        &[
            "hash_hit",
            "hash_diverted",
            "hash_new",
            "least_request",
            "local_least_request",
        ]
    }

    async fn pick(&self, input: PickInput<'_>) -> Result<Pick, PolicyError> {
        match input.request.session {
            Some(key) => {
                let pin = Pin {
                    ttl: self.config.sticky,
                    reasons: HASH_REASONS,
                    sole: true,
                };
                pinned(&self.counts, self.max, &input, key, pin).await
            }
            None => least_request(&self.counts, self.max, &input).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::{ids, user_chat as chat, views};
    use super::*;
    use crate::endpoint::EndpointId;
    use crate::prefix::session_key;
    use crate::request::LlmRequest;
    use crate::store::MemoryStore;

    fn policy(max: Option<u64>) -> EndpointHash {
        let counts = Arc::new(PoolCounts::new(Arc::new(MemoryStore::new()), "p"));
        let config = EndpointHashConfig {
            sticky: Duration::from_secs(600),
            ..EndpointHashConfig::default()
        };
        EndpointHash::new(counts, max, config)
    }

    /// A chat request whose header named `key` (`None`: no header).
    fn request(key: Option<&str>, text: &str) -> LlmRequest {
        let mut r = chat(&[text]);
        r.session = key.map(session_key);
        r
    }

    /// Pick among `candidates`; the lease is kept (the request stays in flight).
    async fn held(p: &EndpointHash, key: Option<&str>, candidates: &[EndpointId]) -> Pick {
        let endpoints = views(&[1; 3]);
        let request = request(key, "hi");
        let pick = p
            .pick(PickInput {
                request: &request,
                endpoints: &endpoints,
                candidates,
            })
            .await
            .expect("pick");
        std::mem::forget(pick.lease);
        Pick {
            lease: None,
            ..pick
        }
    }

    #[tokio::test]
    async fn a_key_is_bound_then_hits() {
        let p = policy(None);
        let first = held(&p, Some("alice"), &ids(3)).await;
        assert_eq!(first.reason, "hash_new");
        let again = held(&p, Some("alice"), &ids(3)).await;
        assert_eq!((again.endpoint, again.reason), (first.endpoint, "hash_hit"));
    }

    #[tokio::test]
    async fn a_pin_holds_however_busy_its_endpoint() {
        let p = policy(None);
        let home = held(&p, Some("alice"), &ids(3)).await.endpoint;
        for _ in 0..20 {
            let r = held(&p, Some("alice"), &ids(3)).await;
            assert_eq!((r.endpoint, r.reason), (home, "hash_hit"));
        }
        // 21 in flight at home, none elsewhere: a new key goes elsewhere.
        let bob = held(&p, Some("bob"), &ids(3)).await;
        assert_eq!(bob.reason, "hash_new");
        assert_ne!(bob.endpoint, home);
    }

    #[tokio::test]
    async fn only_max_request_count_diverts() {
        let p = policy(Some(2));
        let home = held(&p, Some("alice"), &ids(3)).await.endpoint;
        assert_eq!(held(&p, Some("alice"), &ids(3)).await.reason, "hash_hit");
        let diverted = held(&p, Some("alice"), &ids(3)).await;
        assert_eq!(diverted.reason, "hash_diverted");
        assert_ne!(diverted.endpoint, home);
        // The binding moved with it.
        let next = held(&p, Some("alice"), &ids(3)).await;
        assert_eq!(
            (next.endpoint, next.reason),
            (diverted.endpoint, "hash_hit")
        );
    }

    #[tokio::test]
    async fn a_new_key_goes_to_the_least_loaded_and_is_recorded() {
        let p = policy(None);
        // Endpoints 0 and 2 busy with requests without the header.
        for e in [0, 2, 0, 2] {
            let r = held(&p, None, &[EndpointId::new(e)]).await;
            assert_eq!(r.reason, "least_request");
        }
        let first = held(&p, Some("alice"), &ids(3)).await;
        assert_eq!(
            (first.endpoint, first.reason),
            (EndpointId::new(1), "hash_new")
        );
        let again = held(&p, Some("alice"), &ids(3)).await;
        assert_eq!((again.endpoint, again.reason), (first.endpoint, "hash_hit"));
    }

    #[tokio::test]
    async fn a_bound_endpoint_that_is_not_a_candidate_moves_the_key_for_good() {
        let p = policy(None);
        let home = held(&p, Some("alice"), &ids(3)).await.endpoint;
        let others: Vec<EndpointId> = ids(3).into_iter().filter(|e| *e != home).collect();
        let moved = held(&p, Some("alice"), &others).await;
        assert_eq!(moved.reason, "hash_new");
        assert_ne!(moved.endpoint, home);
        for _ in 0..5 {
            let r = held(&p, Some("alice"), &others).await;
            assert_eq!((r.endpoint, r.reason), (moved.endpoint, "hash_hit"));
        }
        // The old endpoint is back, far less loaded: the key stays where it moved.
        for _ in 0..5 {
            let r = held(&p, Some("alice"), &ids(3)).await;
            assert_eq!((r.endpoint, r.reason), (moved.endpoint, "hash_hit"));
        }
    }

    #[tokio::test]
    async fn without_the_header_the_least_loaded_and_nothing_bound() {
        let p = policy(None);
        let mut hist = [0; 3];
        for _ in 0..6 {
            let r = held(&p, None, &ids(3)).await;
            assert_eq!(r.reason, "least_request");
            hist[r.endpoint.index()] += 1;
        }
        assert_eq!(hist, [2, 2, 2]);
    }

    #[tokio::test]
    async fn load_only_requests_are_pinned_and_a_sick_store_falls_back() {
        let p = policy(None);
        let home = held(&p, Some("alice"), &ids(3)).await.endpoint;
        let endpoints = views(&[1; 3]);
        let mut embed =
            LlmRequest::parse_path("/v1/embeddings", br#"{"model": "m", "input": "some text"}"#);
        assert!(embed.api.load_only());
        embed.session = Some(session_key("alice"));
        let all = ids(3);
        let input = || PickInput {
            request: &embed,
            endpoints: &endpoints,
            candidates: &all,
        };
        let r = p.pick(input()).await.expect("pick");
        assert_eq!((r.endpoint, r.reason), (home, "hash_hit"));
        for _ in 0..crate::store::TRIP_AFTER {
            p.counts.trip_for_test();
        }
        let r = p.pick(input()).await.expect("pick");
        assert_eq!(r.reason, "local_least_request");
    }
}
