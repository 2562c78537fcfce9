//! `random`: a weighted uniformly random candidate. A baseline for benchmarks.

use async_trait::async_trait;
use rand::Rng;

use super::{Pick, PickInput, Policy, PolicyError};
use crate::config::PolicyKind;
use crate::endpoint::{EndpointId, EndpointView};

/// Weighted random choice.
#[derive(Default)]
pub struct Random;

impl Random {
    /// The policy (it has no state).
    pub fn new() -> Self {
        Random
    }

    /// A candidate at random, each weighted by its endpoint's weight.
    pub fn choose(
        &self,
        endpoints: &[EndpointView],
        candidates: &[EndpointId],
    ) -> Result<EndpointId, PolicyError> {
        let weight = |id: &EndpointId| endpoints.get(id.index()).map_or(1, |e| e.weight.max(1));
        let total: usize = candidates.iter().map(weight).sum();
        if total == 0 {
            return Err(PolicyError::Unavailable("no candidates".into()));
        }
        let mut r = rand::thread_rng().gen_range(0..total);
        for id in candidates {
            let w = weight(id);
            if r < w {
                return Ok(*id);
            }
            r -= w;
        }
        Err(PolicyError::Unavailable("no candidates".into()))
    }
}

#[async_trait]
impl Policy for Random {
    fn name(&self) -> &'static str {
        PolicyKind::Random.name()
    }

    fn reasons(&self) -> &'static [&'static str] {
        &["random"]
    }

    async fn pick(&self, input: PickInput<'_>) -> Result<Pick, PolicyError> {
        Ok(Pick {
            endpoint: self.choose(input.endpoints, input.candidates)?,
            reason: "random",
            lease: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::EndpointId;
    use crate::policy::testing::{histogram, ids};

    #[tokio::test]
    async fn only_candidates_and_roughly_weighted() {
        let c = [EndpointId::new(0), EndpointId::new(2)];
        let h = histogram(&Random, &[1, 1, 3], &c, 4000).await;
        assert_eq!(h[1], 0);
        // expected 1000 vs 3000; bounds are many standard deviations wide
        assert!(h[0] > 700 && h[0] < 1300, "{h:?}");
        let h = histogram(&Random, &[1, 1], &ids(2), 10).await;
        assert_eq!(h.iter().sum::<usize>(), 10);
    }
}
