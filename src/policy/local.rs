//! What the store policies share: the [`Lease`] of a count held in the store, the keys a request
//! sticks to (its session, the response it continues) and the reasons of their outcomes, and the
//! local fallback when the store cannot answer (fewest requests in flight from this replica).

use std::sync::Arc;
use std::time::Duration;

use super::{Lease, Pick, PickInput, PolicyError};
use crate::apis::Api;
use crate::config::{LoadGuard, PrefixSettings};
use crate::endpoint::Outcome;
use crate::prefix::response_key;
use crate::request::LlmRequest;
use crate::store::{pick_least, PoolCounts, PrefixOutcome, Sticky};

/// Reasons of an affinity's hit, diversion and new placement.
pub(crate) type Reasons = [&'static str; 3];

/// Reasons of a session kept, moved off a busy endpoint, and placed anew.
pub(crate) const SESSION_REASONS: Reasons = ["session_hit", "session_diverted", "session_new"];
/// Reasons of a continued response on its endpoint, diverted, and placed anew.
pub(crate) const RESPONSE_REASONS: Reasons = ["response_hit", "response_diverted", "response_new"];

/// What one attempt holds in the store: one request, or `units` tokens for `kv_aware`, of
/// which `at_first_byte` are given back as soon as the answer starts (the prompt's prefill).
pub(crate) struct StoreLease {
    counts: Arc<PoolCounts>,
    /// The endpoint's label: the count is released against it even after a reload.
    endpoint: String,
    units: u64,
    at_first_byte: u64,
    /// How long to remember where a produced response is stored ([`Lease::produced`]).
    remember: Option<Duration>,
}

impl StoreLease {
    /// `units` held, `at_first_byte` of them (less than `units`) released at the first byte;
    /// with `remember`, which endpoint stored the response the answer names is remembered that
    /// long, under [`response_key`].
    fn boxed_units(
        counts: &Arc<PoolCounts>,
        endpoint: &str,
        units: u64,
        at_first_byte: u64,
        remember: Option<Duration>,
    ) -> Box<dyn Lease> {
        Box::new(StoreLease {
            counts: counts.clone(),
            endpoint: endpoint.to_owned(),
            units,
            at_first_byte: at_first_byte.min(units.saturating_sub(1)),
            remember,
        })
    }
}

/// The lease of `request` counted on `endpoint`: a Responses API request's also remembers, for
/// `ttl`, that `endpoint` stores the response it produces.
pub(crate) fn request_lease(
    counts: &Arc<PoolCounts>,
    endpoint: &str,
    request: &LlmRequest,
    ttl: Duration,
) -> Box<dyn Lease> {
    request_lease_units(counts, endpoint, request, ttl, 1, 0)
}

/// [`request_lease`] holding `units` (`kv_aware`'s tokens), `at_first_byte` of them given back
/// at the first byte of the answer.
pub(crate) fn request_lease_units(
    counts: &Arc<PoolCounts>,
    endpoint: &str,
    request: &LlmRequest,
    ttl: Duration,
    units: u64,
    at_first_byte: u64,
) -> Box<dyn Lease> {
    let remember = (request.api == Api::Responses).then_some(ttl);
    StoreLease::boxed_units(counts, endpoint, units, at_first_byte, remember)
}

impl Lease for StoreLease {
    fn first_byte(&mut self) {
        if self.at_first_byte > 0 {
            self.counts.release_n(&self.endpoint, self.at_first_byte);
            self.units -= self.at_first_byte;
            self.at_first_byte = 0;
        }
    }

    fn produced(&mut self, id: &str) {
        if let Some(ttl) = self.remember.take() {
            self.counts.remember(response_key(id), &self.endpoint, ttl);
        }
    }

    fn release(self: Box<Self>, _outcome: Outcome) {
        self.counts.release_n(&self.endpoint, self.units);
    }
}

/// The key `request` sticks to, if any, and the reasons of its outcomes: the response it
/// continues (kept whatever the load), else its session (under the load guard of `settings`,
/// its absolute part counted in units of `weight`: 1 where counts are requests, the request's
/// least load on any candidate where they are tokens); both keys last the `settings`' TTL.
pub(crate) fn sticky(
    request: &LlmRequest,
    settings: PrefixSettings,
    weight: u64,
) -> Option<(Sticky, Reasons)> {
    if request.api.load_only() {
        return None;
    }
    let ttl = settings.ttl;
    if let Some(key) = request.previous_response {
        let guard = LoadGuard::NEVER;
        return Some((Sticky { key, guard, ttl }, RESPONSE_REASONS));
    }
    let key = request.session?;
    let guard = LoadGuard {
        absolute: settings.guard.absolute.saturating_mul(weight),
        ..settings.guard
    };
    Some((Sticky { key, guard, ttl }, SESSION_REASONS))
}

/// The reason among `reasons` (hit, diverted, new) of an affinity's `outcome`.
pub(crate) fn outcome_reason(reasons: Reasons, outcome: PrefixOutcome) -> &'static str {
    let [hit, diverted, new] = reasons;
    match outcome {
        PrefixOutcome::Hit => hit,
        PrefixOutcome::Diverted => diverted,
        PrefixOutcome::Miss => new,
    }
}

/// Each candidate's requests in flight from this replica (`u64::MAX` for one not in the pool).
pub(crate) fn local_inflight(input: &PickInput<'_>) -> Vec<u64> {
    input
        .candidates
        .iter()
        .map(|c| {
            input
                .endpoints
                .get(c.index())
                .map_or(u64::MAX, |e| e.inflight())
        })
        .collect()
}

/// The candidate with the fewest requests in flight from this replica (ties at random): the
/// fallback of the store policies.
pub(crate) fn local_least(input: &PickInput<'_>, max: Option<u64>) -> Result<Pick, PolicyError> {
    let counts = local_inflight(input);
    if counts.is_empty() {
        return Err(PolicyError::Unavailable("no candidates".into()));
    }
    let (i, least) = pick_least(&counts, rand::random());
    if max.is_some_and(|m| least >= m) {
        return Err(PolicyError::Saturated);
    }
    Ok(Pick {
        endpoint: input.candidates[i],
        reason: "local_least_request",
        lease: None,
    })
}
