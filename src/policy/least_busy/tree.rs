//! The Gateway API Inference Extension's original scheduler (v0.1–v0.3, as Higress's `least_busy`
//! ports it): a tree of filters over the endpoints' engine metrics, then a uniformly random pick
//! among the survivors. Pure: no clock, no I/O; randomness comes from the caller.
//!
//! ```text
//! critical?
//! ├─ yes → low queueing (waiting < queueingThresholdLoRA)
//! │        ├─ ok   → LoRA affinity ─(ok or not)→ least queuing → least KV cache
//! │        └─ fail → least queuing → low LoRA cost → least KV cache        (all endpoints)
//! └─ no  → has capacity (waiting ≤ queueThresholdCritical and KV ≤ kvCacheThreshold)
//!          ├─ ok   → least queuing → low LoRA cost → least KV cache
//!          └─ fail → drop (429)
//! ```
//!
//! A node whose filter keeps at least one endpoint hands what it kept to its success branch; one
//! that keeps none hands its *own input* to its failure branch; a node without the branch it needs
//! returns its result. **LoRA affinity** keeps the endpoints running the request's adapter; when
//! there are none it keeps those with room for one more adapter; when there are both it takes the
//! affine ones with probability `lora_affinity` (1.0, as Higress: always; the Inference Extension
//! v0.2+ uses 0.999 so new adapters get loaded elsewhere too). **Low LoRA cost** keeps endpoints
//! running the adapter or with room for it. Both let everything through when the request names no
//! adapter. **Least queuing** keeps `min ≤ waiting ≤ min + (max − min) / n` (integer division, as
//! upstream), **least KV cache** the same on KV-cache use (float division).
//!
//! Engines that export no KV-cache use (llama.cpp) pass the capacity filter's KV test, and when
//! an endpoint's KV use is unknown, **least KV cache** compares the running batches instead (the
//! same band rule): the nearest signal of how full an engine is that every engine reports.

use rand::Rng;

use crate::config::Thresholds;
use crate::scrape::Lora;

/// One endpoint as the tree sees it.
#[derive(Debug, Clone, Copy)]
pub struct Pod<'a> {
    /// Waiting queue (the engine's, plus this gateway's dispatches since the scrape).
    pub waiting: u64,
    /// KV-cache use, 0–1, when the engine reports it.
    pub kv_cache: Option<f64>,
    /// Running batch (the engine's, plus this gateway's dispatches since the scrape).
    pub running: u64,
    /// The engine's LoRA adapters.
    pub lora: &'a Lora,
}

/// The request as the tree sees it.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// Critical requests are never dropped; the others are "sheddable".
    pub critical: bool,
    /// The LoRA adapter the request names, if any.
    pub adapter: Option<&'a str>,
}

/// A sheddable request found no endpoint with capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped;

#[derive(Debug, Clone, Copy)]
enum Filter {
    Critical,
    LowQueueing,
    LoraAffinity,
    LowLoraCost,
    HasCapacity,
    LeastQueuing,
    LeastKvCache,
    Drop,
}

struct Node {
    filter: Filter,
    on_success: Option<&'static Node>,
    on_failure: Option<&'static Node>,
    /// Taken when the branch for the outcome is not set.
    on_either: Option<&'static Node>,
}

const fn node(filter: Filter) -> Node {
    Node {
        filter,
        on_success: None,
        on_failure: None,
        on_either: None,
    }
}

static LEAST_KV_CACHE: Node = node(Filter::LeastKvCache);
static QUEUE_AND_KV_CACHE: Node = Node {
    on_either: Some(&LEAST_KV_CACHE),
    ..node(Filter::LeastQueuing)
};
static LOW_LORA_COST: Node = Node {
    on_either: Some(&LEAST_KV_CACHE),
    ..node(Filter::LowLoraCost)
};
static QUEUE_LORA_AND_KV_CACHE: Node = Node {
    on_either: Some(&LOW_LORA_COST),
    ..node(Filter::LeastQueuing)
};
static LORA_AFFINITY: Node = Node {
    on_either: Some(&QUEUE_AND_KV_CACHE),
    ..node(Filter::LoraAffinity)
};
static LOW_QUEUEING: Node = Node {
    on_success: Some(&LORA_AFFINITY),
    on_failure: Some(&QUEUE_LORA_AND_KV_CACHE),
    ..node(Filter::LowQueueing)
};
static DROP: Node = node(Filter::Drop);
static HAS_CAPACITY: Node = Node {
    on_success: Some(&QUEUE_LORA_AND_KV_CACHE),
    on_failure: Some(&DROP),
    ..node(Filter::HasCapacity)
};
static ROOT: Node = Node {
    on_success: Some(&LOW_QUEUEING),
    on_failure: Some(&HAS_CAPACITY),
    ..node(Filter::Critical)
};

/// The endpoints (indices into `pods`) the tree keeps for `ask`; never empty when `pods` is not.
pub fn survivors(
    pods: &[Pod<'_>],
    ask: Ask<'_>,
    t: &Thresholds,
    rng: &mut impl Rng,
) -> Result<Vec<usize>, Dropped> {
    if pods.is_empty() {
        return Ok(Vec::new());
    }
    run(&ROOT, pods, ask, t, rng, (0..pods.len()).collect())
}

/// The tree's survivors, then one of them uniformly at random (`None` when `pods` is empty).
pub fn schedule(
    pods: &[Pod<'_>],
    ask: Ask<'_>,
    t: &Thresholds,
    rng: &mut impl Rng,
) -> Result<Option<usize>, Dropped> {
    let kept = survivors(pods, ask, t, rng)?;
    if kept.is_empty() {
        return Ok(None);
    }
    Ok(kept.get(rng.gen_range(0..kept.len())).copied())
}

fn run(
    node: &Node,
    pods: &[Pod<'_>],
    ask: Ask<'_>,
    t: &Thresholds,
    rng: &mut impl Rng,
    input: Vec<usize>,
) -> Result<Vec<usize>, Dropped> {
    let output = apply(node.filter, pods, ask, t, rng, &input);
    match output {
        Ok(kept) if !kept.is_empty() => match node.on_success.or(node.on_either) {
            Some(next) => run(next, pods, ask, t, rng, kept),
            None => Ok(kept),
        },
        failed => match node.on_failure.or(node.on_either) {
            Some(next) => run(next, pods, ask, t, rng, input),
            None => failed,
        },
    }
}

fn apply(
    filter: Filter,
    pods: &[Pod<'_>],
    ask: Ask<'_>,
    t: &Thresholds,
    rng: &mut impl Rng,
    input: &[usize],
) -> Result<Vec<usize>, Dropped> {
    let pod = |i: &usize| pods.get(*i);
    let keep = |p: &dyn Fn(&Pod<'_>) -> bool| -> Vec<usize> {
        input
            .iter()
            .copied()
            .filter(|i| pod(i).is_some_and(p))
            .collect()
    };
    Ok(match filter {
        Filter::Critical => {
            if ask.critical {
                input.to_vec()
            } else {
                Vec::new()
            }
        }
        Filter::LowQueueing => keep(&|p| p.waiting < t.queueing_lora),
        Filter::HasCapacity => {
            keep(&|p| p.waiting <= t.queue_critical && p.kv_cache.is_none_or(|kv| kv <= t.kv_cache))
        }
        Filter::LeastQueuing => least_band(input, pods, |p| p.waiting),
        Filter::LeastKvCache => {
            let kv: Option<Vec<f64>> = input.iter().filter_map(pod).map(|p| p.kv_cache).collect();
            match kv {
                Some(kv) => {
                    let min = kv.iter().copied().fold(f64::INFINITY, f64::min);
                    let max = kv.iter().copied().fold(0.0, f64::max);
                    let limit = min + (max - min) / input.len().max(1) as f64;
                    keep(&|p| p.kv_cache.is_some_and(|kv| kv >= min && kv <= limit))
                }
                None => least_band(input, pods, |p| p.running),
            }
        }
        Filter::LoraAffinity => match ask.adapter {
            None => input.to_vec(),
            Some(a) => {
                let affine = keep(&|p| p.lora.has(a));
                let available = keep(&|p| !p.lora.has(a) && p.lora.can_accept());
                match (affine.is_empty(), available.is_empty()) {
                    (false, false) => {
                        if rng.gen::<f64>() < t.lora_affinity {
                            affine
                        } else {
                            available
                        }
                    }
                    (false, true) => affine,
                    (true, _) => available,
                }
            }
        },
        Filter::LowLoraCost => match ask.adapter {
            None => input.to_vec(),
            Some(a) => keep(&|p| p.lora.has(a) || p.lora.can_accept()),
        },
        Filter::Drop => return Err(Dropped),
    })
}

/// The endpoints whose `value` is within `min + (max − min) / n` (integer division, as upstream).
fn least_band(input: &[usize], pods: &[Pod<'_>], value: impl Fn(&Pod<'_>) -> u64) -> Vec<usize> {
    let values: Vec<u64> = input
        .iter()
        .filter_map(|i| pods.get(*i))
        .map(&value)
        .collect();
    let min = values.iter().copied().min().unwrap_or(0);
    let max = values.iter().copied().max().unwrap_or(0);
    let n = u64::try_from(input.len()).unwrap_or(u64::MAX).max(1);
    let limit = min.saturating_add((max - min) / n);
    input
        .iter()
        .copied()
        .filter(|i| {
            pods.get(*i)
                .is_some_and(|p| (min..=limit).contains(&value(p)))
        })
        .collect()
}

#[cfg(test)]
mod tests;
