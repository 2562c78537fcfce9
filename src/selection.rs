//! llm-lb's policies as Pingora [`BackendSelection`]s, for a plain Pingora proxy that chooses with
//! `pingora_load_balancing`'s [`LoadBalancer<S>`](pingora::lb::LoadBalancer).
//!
//! A `BackendSelection` answers synchronously, from a key, with backends in order of preference;
//! `LoadBalancer::select` takes the first healthy one. The policies whose choice is a synchronous
//! function of local state are offered that way:
//!
//! | selection | policy | key | state |
//! |---|---|---|---|
//! | [`RoundRobinSelection`] | `round_robin` | ignored | — |
//! | [`RandomSelection`] | `random` | ignored | — |
//! | [`LeastRequestSelection`] | `global_least_request` | ignored | [`EmbeddedCounts`] |
//! | [`PrefixAffinitySelection`] | `prefix_cache` | [`prompt_key`] of the body | [`EmbeddedCounts`] |
//! | [`LeastBusySelection`] | `least_busy` | the request's model | [`EngineMetrics`] |
//!
//! A selection only *ranks*: it cannot see when a request ends. The state that needs to be told
//! lives in the selection's configuration, which the program keeps a handle on (clones share it)
//! and passes to [`LoadBalancer::from_backends_with_config`](pingora::lb::LoadBalancer::from_backends_with_config):
//! after `select`, [`EmbeddedCounts::start`] counts the request in flight (and records its prompt)
//! until the returned guard drops. For `least_busy`, a [`crate::scrape::ScrapeService`] keeps the
//! board current.
//!
//! ```
//! use pingora::lb::{discovery, Backends, LoadBalancer};
//! use llm_lb::selection::{EmbeddedCounts, LeastRequestSelection};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let counts = EmbeddedCounts::new("upstreams");
//! let backends = Backends::new(discovery::Static::try_from_iter(["127.0.0.1:8001", "127.0.0.1:8002"])?);
//! let lb = LoadBalancer::<LeastRequestSelection>::from_backends_with_config(backends, Some(counts.clone()));
//! lb.update().await?;
//!
//! let first = lb.select(b"", 8).expect("a backend");
//! let held = counts.start(&first, b""); // in flight until dropped
//! let second = lb.select(b"", 8).expect("a backend");
//! assert_ne!(first, second, "the other one has fewer requests in flight");
//! drop(held);
//! assert_eq!(counts.inflight(&first), 0);
//! # Ok(())
//! # }
//! ```
//!
//! Policies that need a Redis round trip (the same policies over a shared store) cannot be a
//! `BackendSelection`: `select` cannot wait for the network. Use llm-lb's proxy
//! (`app::Services`) or call a [`crate::policy::Policy`] from `upstream_peer`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use pingora::lb::selection::{BackendIter, BackendSelection};
use pingora::lb::Backend;

use crate::config::{LeastBusyConfig, PrefixSettings};
use crate::endpoint::{EndpointId, EndpointView};
use crate::policy::{LeastBusy, PickInput, Random, RoundRobin, MAX_CHAIN_BLOCKS};
use crate::prefix::BlockKey;
use crate::request::LlmRequest;
use crate::scrape::MetricsBoard;
use crate::store::{pick_least, prefix_choice, MemoryStore, PrefixQuery};

/// Backends in order of preference: what every selection here returns.
pub struct Ranked {
    backends: Arc<[Backend]>,
    order: Vec<usize>,
    at: usize,
}

impl BackendIter for Ranked {
    fn next(&mut self) -> Option<&Backend> {
        let i = *self.order.get(self.at)?;
        self.at += 1;
        self.backends.get(i)
    }
}

/// The backends of a selection, with their endpoint views (index = [`EndpointId`]).
struct Members {
    backends: Arc<[Backend]>,
    views: Vec<EndpointView>,
    labels: Vec<String>,
    all: Vec<EndpointId>,
}

impl Members {
    fn new(backends: &BTreeSet<Backend>) -> Self {
        let backends: Arc<[Backend]> = backends.iter().cloned().collect();
        let labels: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
        let views = backends
            .iter()
            .map(|b| {
                let addr = b
                    .addr
                    .as_inet()
                    .copied()
                    .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
                EndpointView::new(addr, b.weight.max(1))
            })
            .collect();
        Members {
            all: (0..backends.len()).map(EndpointId::new).collect(),
            backends,
            views,
            labels,
        }
    }

    /// `first`, then every other backend in `rest`'s order.
    fn ranked(&self, first: Option<usize>, rest: impl IntoIterator<Item = usize>) -> Ranked {
        let mut order: Vec<usize> = first.into_iter().collect();
        order.extend(rest.into_iter().filter(|i| Some(*i) != first));
        Ranked {
            backends: self.backends.clone(),
            order,
            at: 0,
        }
    }

    /// `first`, then the others in index order.
    fn first_then_all(&self, first: Option<usize>) -> Ranked {
        self.ranked(first, 0..self.backends.len())
    }
}

/// `round_robin`: smooth weighted round robin (nginx's), by backend weight.
pub struct RoundRobinSelection {
    members: Members,
    policy: RoundRobin,
}

impl BackendSelection for RoundRobinSelection {
    type Iter = Ranked;
    type Config = ();

    fn build(backends: &BTreeSet<Backend>) -> Self {
        let members = Members::new(backends);
        let weights: Vec<usize> = members.views.iter().map(|v| v.weight).collect();
        RoundRobinSelection {
            policy: RoundRobin::new(&weights),
            members,
        }
    }

    fn iter(self: &Arc<Self>, _key: &[u8]) -> Ranked {
        let first = self.policy.pick_sync(&self.members.all).ok();
        self.members.first_then_all(first.map(EndpointId::index))
    }
}

/// `random`: a backend at random, weighted.
pub struct RandomSelection {
    members: Members,
}

impl BackendSelection for RandomSelection {
    type Iter = Ranked;
    type Config = ();

    fn build(backends: &BTreeSet<Backend>) -> Self {
        RandomSelection {
            members: Members::new(backends),
        }
    }

    fn iter(self: &Arc<Self>, _key: &[u8]) -> Ranked {
        let m = &self.members;
        let first = Random::new().choose(&m.views, &m.all).ok();
        m.first_then_all(first.map(EndpointId::index))
    }
}

/// Requests in flight per backend, and the prefix index, in llm-lb's embedded store: the state
/// of [`LeastRequestSelection`] and [`PrefixAffinitySelection`]. Clones share it.
#[derive(Clone)]
pub struct EmbeddedCounts {
    store: MemoryStore,
    pool: Arc<str>,
    prefix: PrefixSettings,
    /// When the store last expired its prefix keys (ms since `epoch`): the proxy's heartbeat
    /// does that once a second; here [`EmbeddedCounts::start`] does.
    swept_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl EmbeddedCounts {
    /// Empty counts for one group of backends (`pool` names it in the store).
    pub fn new(pool: &str) -> Self {
        EmbeddedCounts {
            store: MemoryStore::new(),
            pool: pool.into(),
            prefix: PrefixSettings::default(),
            swept_ms: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
        }
    }

    /// Use these prefix settings (index TTL and load guard) instead of Higress's defaults.
    pub fn with_prefix_settings(mut self, settings: PrefixSettings) -> Self {
        self.prefix = settings;
        self
    }

    /// Count a request in flight to `backend` until the returned guard drops. With a
    /// [`prompt_key`] as `key`, also record that `backend` now holds that prompt's prefix.
    pub fn start(&self, backend: &Backend, key: &[u8]) -> Inflight {
        self.sweep();
        let label = backend.addr.to_string();
        let candidates = [label.as_str()];
        let counted = if key.is_empty() {
            self.store
                .acquire_least_now(&self.pool, &candidates, None)
                .is_ok()
        } else {
            let chain = chain_of(key);
            let query = PrefixQuery {
                chain: &chain,
                candidates: &candidates,
                max: None,
                guard: self.prefix.guard,
                ttl: self.prefix.ttl,
                sole: false,
            };
            self.store.acquire_prefix_now(&self.pool, query).is_ok()
        };
        Inflight {
            counts: self.clone(),
            label: counted.then_some(label),
        }
    }

    /// At most once a second: drop prefix keys past their TTL, so the index stays bounded by
    /// what was recorded within one TTL.
    fn sweep(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.swept_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .swept_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let _ = self.store.heartbeat_now(&self.pool);
        }
    }

    /// Requests in flight to `backend`.
    pub fn inflight(&self, backend: &Backend) -> u64 {
        let label = backend.addr.to_string();
        self.totals(&[label.as_str()]).first().copied().unwrap_or(0)
    }

    fn totals(&self, labels: &[&str]) -> Vec<u64> {
        self.store
            .inflight_now(&self.pool, labels)
            .unwrap_or_else(|_| vec![0; labels.len()])
    }
}

/// One request counted in flight by [`EmbeddedCounts::start`]; released on drop.
pub struct Inflight {
    counts: EmbeddedCounts,
    label: Option<String>,
}

impl Drop for Inflight {
    fn drop(&mut self) {
        if let Some(label) = self.label.take() {
            let _ = self.counts.store.release_now(&self.counts.pool, &label);
        }
    }
}

/// The key [`PrefixAffinitySelection`] ranks by: the request body's prompt as llm-lb's chain of
/// block hashes (`prefix_cache`'s), 8 bytes per block. Empty when the body has no prompt.
pub fn prompt_key(body: &[u8]) -> Vec<u8> {
    let request = LlmRequest::parse(body);
    let blocks = &request.blocks[..request.blocks.len().min(MAX_CHAIN_BLOCKS)];
    blocks.iter().flat_map(|b| b.to_le_bytes()).collect()
}

fn chain_of(key: &[u8]) -> Vec<BlockKey> {
    key.chunks_exact(8)
        .map(|c| {
            let mut b = [0; 8];
            b.copy_from_slice(c);
            BlockKey::from_le_bytes(b)
        })
        .collect()
}

/// Backends by requests in flight, fewest first (ties at random).
fn by_load(members: &Members, counts: &[u64], random: u32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..members.backends.len()).collect();
    // Rotating by a random offset before the stable sort breaks ties at random.
    let n = order.len().max(1);
    order.rotate_left(random as usize % n);
    order.sort_by_key(|&i| counts.get(i).copied().unwrap_or(u64::MAX));
    order
}

/// A group of backends and the counts a counting selection ranks them by.
struct Counted {
    members: Members,
    counts: EmbeddedCounts,
}

impl Counted {
    fn new(backends: &BTreeSet<Backend>, counts: &EmbeddedCounts) -> Self {
        Counted {
            members: Members::new(backends),
            counts: counts.clone(),
        }
    }

    /// The backends' labels and their requests in flight.
    fn totals(&self) -> (Vec<&str>, Vec<u64>) {
        let labels: Vec<&str> = self.members.labels.iter().map(String::as_str).collect();
        let totals = self.counts.totals(&labels);
        (labels, totals)
    }
}

/// `global_least_request` on one replica: the backend with the fewest requests in flight.
pub struct LeastRequestSelection(Counted);

impl BackendSelection for LeastRequestSelection {
    type Iter = Ranked;
    type Config = EmbeddedCounts;

    fn build(backends: &BTreeSet<Backend>) -> Self {
        Self::build_with_config(backends, &EmbeddedCounts::new("default"))
    }

    fn build_with_config(backends: &BTreeSet<Backend>, counts: &EmbeddedCounts) -> Self {
        LeastRequestSelection(Counted::new(backends, counts))
    }

    fn iter(self: &Arc<Self>, _key: &[u8]) -> Ranked {
        let (_, counts) = self.0.totals();
        let random = rand::random();
        let (least, _) = pick_least(&counts, random);
        let m = &self.0.members;
        m.ranked(Some(least), by_load(m, &counts, random))
    }
}

/// `prefix_cache` on one replica: the backend that holds the longest prefix of the prompt,
/// unless it is busier than the load guard allows; otherwise the least loaded.
pub struct PrefixAffinitySelection(Counted);

impl BackendSelection for PrefixAffinitySelection {
    type Iter = Ranked;
    type Config = EmbeddedCounts;

    fn build(backends: &BTreeSet<Backend>) -> Self {
        Self::build_with_config(backends, &EmbeddedCounts::new("default"))
    }

    fn build_with_config(backends: &BTreeSet<Backend>, counts: &EmbeddedCounts) -> Self {
        PrefixAffinitySelection(Counted::new(backends, counts))
    }

    fn iter(self: &Arc<Self>, key: &[u8]) -> Ranked {
        let Counted {
            members: m,
            counts: state,
        } = &self.0;
        let (labels, counts) = self.0.totals();
        let chain = chain_of(key);
        let (_, holders) = state.store.holders_now(&state.pool, &labels, &chain);
        let random = rand::random();
        let first =
            prefix_choice(&counts, &holders, random, state.prefix.guard, None).map(|(i, _)| i);
        m.ranked(first, by_load(m, &counts, random))
    }
}

/// The state of [`LeastBusySelection`]: the engines' metrics board (kept current by a
/// [`crate::scrape::ScrapeService`]; its labels are the backends' `ip:port`) and the filter
/// tree's settings.
#[derive(Clone)]
pub struct EngineMetrics {
    /// The scraped metrics.
    pub board: Arc<MetricsBoard>,
    /// Thresholds and critical models.
    pub config: LeastBusyConfig,
}

/// `least_busy`: the Inference Extension's filter tree over the engines' own metrics. The key
/// is the request's model (critical models and LoRA adapters are judged by it). A selection
/// does not see requests end, so between scrapes it cannot count its own dispatches as the
/// proxy's policy does; backends without known metrics are ranked after the tree's choice.
pub struct LeastBusySelection {
    members: Members,
    /// Board index → backend index (backends the board does not name are never first).
    on_board: Vec<Option<usize>>,
    views: Vec<EndpointView>,
    policy: Option<LeastBusy>,
}

impl BackendSelection for LeastBusySelection {
    type Iter = Ranked;
    type Config = EngineMetrics;

    /// Without a board nothing is known: the backends in order (configure it with
    /// `from_backends_with_config`).
    fn build(backends: &BTreeSet<Backend>) -> Self {
        LeastBusySelection {
            members: Members::new(backends),
            on_board: Vec::new(),
            views: Vec::new(),
            policy: None,
        }
    }

    fn build_with_config(backends: &BTreeSet<Backend>, metrics: &EngineMetrics) -> Self {
        let members = Members::new(backends);
        let board = &metrics.board;
        let on_board: Vec<Option<usize>> = (0..board.len())
            .map(|i| members.labels.iter().position(|l| l == board.label(i)))
            .collect();
        let views = on_board
            .iter()
            .map(|b| {
                let view = b.and_then(|i| members.views.get(i));
                EndpointView::new(
                    view.map_or(([0, 0, 0, 0], 0).into(), |v| v.addr),
                    view.map_or(1, |v| v.weight),
                )
            })
            .collect();
        LeastBusySelection {
            members,
            on_board,
            views,
            policy: Some(LeastBusy::new(board.clone(), metrics.config.clone())),
        }
    }

    fn iter(self: &Arc<Self>, key: &[u8]) -> Ranked {
        let first = self.policy.as_ref().and_then(|policy| {
            let model = std::str::from_utf8(key).ok().filter(|m| !m.is_empty());
            let mut request = LlmRequest::empty();
            request.model = model.map(str::to_owned);
            let candidates: Vec<EndpointId> = (0..self.views.len())
                .filter(|i| self.on_board[*i].is_some())
                .map(EndpointId::new)
                .collect();
            let input = PickInput {
                request: &request,
                endpoints: &self.views,
                candidates: &candidates,
            };
            let (id, _) = policy.choose(&input, &mut rand::thread_rng()).ok()?;
            self.on_board.get(id.index()).copied().flatten()
        });
        self.members.first_then_all(first)
    }
}

#[cfg(test)]
mod tests;
