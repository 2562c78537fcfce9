//! The supervisor: the background service that owns the routing table's generations.
//!
//! - **Start.** Resolves endpoint names, builds generation 1 and only then reports ready, so the
//!   proxy (which depends on it) never serves without a routing table.
//! - **Reload** on SIGHUP or [`ReloadHandle::reload`] (the admin listener's `POST /-/reload`):
//!   the policy file is read and validated first; if it is invalid the running generation stays
//!   and the error is logged, counted (`llmlb_config_reloads_total{result="invalid"}`) and
//!   returned. Otherwise the new generation is built and swapped in: new requests use it at once,
//!   requests in flight finish on the one they started with (see [`super::generation`]).
//!   `listen`, `admin`, `h2c` and `tracing` are bound at start; a change to them needs a restart
//!   or `-u`.
//! - **DNS.** Every `dns_refresh_ms`, names are resolved again; when a pool's address set
//!   changes, a new generation with the same configuration is swapped in (added addresses join,
//!   removed ones drain).
//! - **State-store heartbeats.** One [`heartbeat`] loop per [`PoolCounts`] in use. When a
//!   generation no longer uses some counts (pool removed, store changed), their loop drains what
//!   is still held, withdraws, and ends.
//! - **Sweep** (every second). Endpoints whose ejection ended are logged and their gauge reset
//!   (admission itself needs no timer); once a replaced generation has nothing in flight, the
//!   gauges of endpoints that left are dropped.
//! - **Shutdown.** Stops the tasks, lets every heartbeat loop drain and withdraw, then returns.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::services::ServiceReadyNotifier;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::resolve::{self, Answers};
use super::{BuildError, Generation, Live, Routes};
use crate::config::{self, Config};
use crate::policy::Registry;
use crate::store::{heartbeat, PoolCounts};
use crate::telemetry::{self, ReloadResult, ReloadTrigger};

/// How often replaced generations are checked for the end of their requests.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Why a reload was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The policy file could not be read or is invalid; the running configuration stays.
    #[error("{0}")]
    Invalid(String),
    /// The new routing table could not be built; the running configuration stays.
    #[error("{0}")]
    Failed(String),
    /// The supervisor is not running (starting or shutting down).
    #[error("the supervisor is not running")]
    NotRunning,
}

type ReloadReply = oneshot::Sender<Result<u64, ReloadError>>;

/// How a reload ended, kept for the status page.
#[derive(Debug, Clone)]
pub struct ReloadRecord {
    /// When it ended.
    pub at: SystemTime,
    /// What asked for it.
    pub trigger: ReloadTrigger,
    /// Its verdict.
    pub result: ReloadResult,
    /// The generation it put in force (`None` unless `result` is ok).
    pub generation: Option<u64>,
    /// Why it was not applied (`None` if `result` is ok).
    pub error: Option<String>,
}

/// The last reload's record, shared by the supervisor (writer) and its handles.
type LastReload = Arc<Mutex<Option<ReloadRecord>>>;

/// Asks the supervisor to reload the policy file (what SIGHUP does), and tells how the last
/// reload ended.
#[derive(Clone)]
pub struct ReloadHandle {
    requests: mpsc::Sender<ReloadReply>,
    last: LastReload,
}

impl ReloadHandle {
    /// Reload and wait for the verdict: the new generation's id, or why nothing changed.
    pub async fn reload(&self) -> Result<u64, ReloadError> {
        let (reply, verdict) = oneshot::channel();
        self.requests
            .send(reply)
            .await
            .map_err(|_| ReloadError::NotRunning)?;
        verdict.await.unwrap_or(Err(ReloadError::NotRunning))
    }

    /// How the last reload (SIGHUP or admin) ended; `None` before the first one.
    pub fn last(&self) -> Option<ReloadRecord> {
        self.last.lock().clone()
    }
}

/// The supervisor service; see the module docs.
pub struct Supervisor {
    policy_path: PathBuf,
    live: Live,
    /// Custom policies the policy file may name.
    registry: Registry,
    /// Taken by `start`: the configuration validated at start, and the reload requests.
    start: Mutex<Option<(Config, mpsc::Receiver<ReloadReply>)>>,
    last_reload: LastReload,
}

impl Supervisor {
    /// A supervisor for the policy file at `policy_path`, already validated as `config` (with
    /// `registry`'s custom policies). Returns it with the [`Live`] routing table it maintains and
    /// a handle to request reloads.
    pub fn new(
        policy_path: PathBuf,
        config: Config,
        registry: Registry,
    ) -> (Supervisor, Live, ReloadHandle) {
        let live = Live::default();
        let (tx, rx) = mpsc::channel(8);
        let last_reload = LastReload::default();
        let supervisor = Supervisor {
            policy_path,
            registry,
            live: live.clone(),
            start: Mutex::new(Some((config, rx))),
            last_reload: last_reload.clone(),
        };
        let handle = ReloadHandle {
            requests: tx,
            last: last_reload,
        };
        (supervisor, live, handle)
    }
}

#[async_trait]
impl BackgroundService for Supervisor {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let Some((config, mut requests)) = self.start.lock().take() else {
            return;
        };
        let mut state = State {
            policy_path: self.policy_path.clone(),
            registry: self.registry.clone(),
            live: self.live.clone(),
            last_reload: self.last_reload.clone(),
            current: None,
            answers: Answers::new(),
            heartbeats: Vec::new(),
            retired: Vec::new(),
            next_id: 1,
        };
        let answers = resolve::resolve(&config, &state.answers).await;
        if let Err(e) = state.apply(config, answers).await {
            log::error!("cannot build the routing table: {e}");
        }
        ready.notify_ready();

        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("cannot watch SIGHUP ({e}); reload with POST /-/reload instead");
                None
            }
        };
        let mut dns = tokio::time::interval(state.dns_refresh());
        dns.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        dns.reset();
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                Some(()) = async { hangup.as_mut()?.recv().await } => {
                    let _ = state.reload(ReloadTrigger::Sighup).await;
                    dns = reset_interval(state.dns_refresh());
                }
                Some(reply) = requests.recv() => {
                    let _ = reply.send(state.reload(ReloadTrigger::Admin).await);
                    dns = reset_interval(state.dns_refresh());
                }
                _ = dns.tick() => state.refresh_dns().await,
                _ = sweep.tick() => state.sweep(),
                _ = shutdown.changed() => break,
            }
        }
        state.shutdown().await;
    }
}

fn reset_interval(period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval(period);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i.reset();
    i
}

/// One heartbeat loop and the switch that tells it to drain and end.
struct Heartbeat {
    counts: Arc<PoolCounts>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct State {
    policy_path: PathBuf,
    registry: Registry,
    live: Live,
    last_reload: LastReload,
    current: Option<Generation>,
    answers: Answers,
    heartbeats: Vec<Heartbeat>,
    /// Replaced routing tables whose requests may still be in flight.
    retired: Vec<Arc<Routes>>,
    next_id: u64,
}

impl State {
    fn dns_refresh(&self) -> Duration {
        self.current
            .as_ref()
            .map_or(config::DEFAULT_DNS_REFRESH, |g| g.routes.config.dns_refresh)
    }

    /// Re-read the policy file and apply it; on any error the running generation stays. The
    /// verdict is counted and kept as the last reload's record.
    async fn reload(&mut self, trigger: ReloadTrigger) -> Result<u64, ReloadError> {
        let verdict = self.try_reload(trigger).await;
        let result = match &verdict {
            Ok(_) => ReloadResult::Ok,
            Err(ReloadError::Invalid(_)) => ReloadResult::Invalid,
            Err(_) => ReloadResult::Failed,
        };
        telemetry::count_reload(trigger, result);
        *self.last_reload.lock() = Some(ReloadRecord {
            at: SystemTime::now(),
            trigger,
            result,
            generation: verdict.as_ref().ok().copied(),
            error: verdict.as_ref().err().map(ToString::to_string),
        });
        verdict
    }

    async fn try_reload(&mut self, trigger: ReloadTrigger) -> Result<u64, ReloadError> {
        let path = self.policy_path.display().to_string();
        let loaded = config::load_with(&self.policy_path, &self.registry.names())
            .and_then(|c| self.registry.check(&c).map(|()| c));
        let config = match loaded {
            Ok(c) => c,
            Err(e) => {
                log::error!("reload ({trigger}): policy file {path} rejected, the running configuration stays: {e}");
                return Err(ReloadError::Invalid(format!("policy file {path}: {e}")));
            }
        };
        for w in &config.warnings {
            log::warn!("policy file {path}: {w}");
        }
        if let Some(running) = self.current.as_ref().map(|g| &g.routes.config) {
            if running.listen != config.listen
                || running.admin != config.admin
                || running.h2c != config.h2c
                || running.tracing != config.tracing
            {
                log::warn!("reload ({trigger}): listen, admin, h2c and tracing are bound at start; their new values apply after a restart or an upgrade (-u)");
            }
        }
        let answers = resolve::resolve(&config, &self.answers).await;
        match self.apply(config, answers).await {
            Ok(id) => {
                log::info!("reload ({trigger}): policy file {path} applied as generation {id}");
                Ok(id)
            }
            Err(e) => {
                log::error!("reload ({trigger}): {e}; the running configuration stays");
                Err(ReloadError::Failed(e.to_string()))
            }
        }
    }

    /// Resolve names again; when an address set changed, swap in a generation that has it.
    async fn refresh_dns(&mut self) {
        let Some(config) = self.current.as_ref().map(|g| g.routes.config.clone()) else {
            return;
        };
        if !resolve::has_names(&config) {
            return;
        }
        let answers = resolve::resolve(&config, &self.answers).await;
        let changed = self
            .current
            .as_ref()
            .is_some_and(|g| g.endpoints != resolve::expand(&config, &answers));
        if !changed {
            self.answers = answers;
            return;
        }
        match self.apply(config, answers).await {
            Ok(id) => log::info!("endpoint addresses changed: generation {id} in force"),
            Err(e) => log::error!("endpoint addresses changed but {e}; keeping the old ones"),
        }
    }

    /// Build a generation of `config` over `answers` and put it in force.
    async fn apply(&mut self, config: Config, answers: Answers) -> Result<u64, BuildError> {
        let endpoints = resolve::expand(&config, &answers);
        for (pool, eps) in config.pools.iter().zip(&endpoints) {
            if eps.is_empty() {
                log::warn!(
                    "pool {}: no endpoint address yet; its requests get 503 until one resolves",
                    pool.name
                );
            }
        }
        let id = self.next_id;
        let previous = self.current.as_ref().map(|g| g.routes.clone());
        let next =
            Generation::build(id, config, endpoints, previous.as_deref(), &self.registry).await?;
        self.next_id += 1;
        self.answers = answers;
        next.start();
        self.live.set(next.routes.clone());
        telemetry::set_generation(id);
        if let Some(old) = self.current.replace(next) {
            old.stop();
            self.retired.push(old.routes.clone());
        }
        self.track_counts();
        Ok(id)
    }

    /// Start heartbeats for counts the current generation uses; tell the others to drain.
    fn track_counts(&mut self) {
        let in_use: Vec<Arc<PoolCounts>> = self
            .current
            .iter()
            .flat_map(|g| g.counts().cloned())
            .collect();
        for hb in &self.heartbeats {
            if !in_use.iter().any(|c| Arc::ptr_eq(c, &hb.counts)) {
                let _ = hb.stop.send(true);
            }
        }
        for counts in in_use {
            if self
                .heartbeats
                .iter()
                .any(|h| Arc::ptr_eq(&h.counts, &counts))
            {
                continue;
            }
            log::info!(
                "pool {}: in-flight counts in the {} state store (replica {})",
                counts.pool(),
                counts.store().kind(),
                counts.store().replica_id()
            );
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(heartbeat(counts.clone(), stopped));
            self.heartbeats.push(Heartbeat { counts, stop, task });
        }
    }

    /// Forget finished heartbeats, note endpoints back from ejection, and drop the gauges of
    /// endpoints that left once their replaced generation has nothing in flight.
    fn sweep(&mut self) {
        self.heartbeats.retain(|h| !h.task.is_finished());
        let Some(current) = self.current.as_ref().map(|g| g.routes.clone()) else {
            return;
        };
        current.readmit_due();
        let present: HashSet<(&str, &str)> = current.endpoint_labels().collect();
        self.retired.retain(|old| {
            if !old.idle() {
                return true;
            }
            for (pool, label) in old.endpoint_labels() {
                if !present.contains(&(pool, label)) {
                    telemetry::forget_endpoint(pool, label);
                }
            }
            false
        });
    }

    async fn shutdown(mut self) {
        if let Some(g) = self.current.take() {
            g.stop();
        }
        for hb in &self.heartbeats {
            let _ = hb.stop.send(true);
        }
        for hb in self.heartbeats {
            if let Err(e) = hb.task.await {
                log::error!("state store heartbeat loop failed: {e}");
            }
        }
    }
}
