//! `random`: a weighted uniformly random candidate. A baseline for benchmarks.

use async_trait::async_trait;
use rand::Rng;

use super::{Pick, PickInput, Policy, PolicyError};
use crate::config::PolicyKind;

/// Weighted random choice.
#[derive(Default)]
pub struct Random;

impl Random {
    pub fn new() -> Self {
        Random
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
        let weight = |id: &crate::endpoint::EndpointId| {
            input
                .endpoints
                .get(id.index())
                .map_or(1, |e| e.weight.max(1))
        };
        let total: usize = input.candidates.iter().map(weight).sum();
        if total == 0 {
            return Err(PolicyError::Unavailable("no candidates".into()));
        }
        let mut r = rand::thread_rng().gen_range(0..total);
        for id in input.candidates {
            let w = weight(id);
            if r < w {
                return Ok(Pick {
                    endpoint: *id,
                    reason: "random",
                    lease: None,
                });
            }
            r -= w;
        }
        Err(PolicyError::Unavailable("no candidates".into()))
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
