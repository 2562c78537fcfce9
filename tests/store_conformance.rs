//! One behaviour suite for every [`InflightStore`]: the embedded store, a real standalone
//! `redis-server` and a real 3-master Redis Cluster, all started by the tests themselves.
//!
//! `cases` holds each behaviour once, written against `&dyn InflightStore` handles made by an
//! [`Env`]; `conformance!` instantiates every case for the three backends (`embedded::…`,
//! `single_redis::…`, `redis_cluster::…`). The `redis_only` module covers what exists only with a
//! server: key layout, `NOSCRIPT` recovery, a server killed or restarted empty, authentication.

mod redis_harness;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use llm_lb::config::{LoadGuard, RedisConfig};
use llm_lb::store::{
    CostQuery, InflightStore, MemoryStore, PrefixOutcome, PrefixQuery, RedisStore, Sticky,
    StoreError, MAX_HOLDERS,
};
use redis_harness::{RedisCluster, RedisServer};

/// Per-call timeout for the Redis stores in behaviour tests: generous, the machine may be busy.
const CALL_TIMEOUT: Duration = Duration::from_millis(1000);

/// One standalone server and one cluster per test process, shared by the behaviour cases (each
/// case uses its own pool). The harness kills them when the process exits.
fn shared_server() -> &'static RedisServer {
    static S: OnceLock<RedisServer> = OnceLock::new();
    S.get_or_init(|| RedisServer::start().expect("start redis-server"))
}

fn shared_cluster() -> &'static RedisCluster {
    static C: OnceLock<RedisCluster> = OnceLock::new();
    C.get_or_init(|| RedisCluster::start().expect("start a Redis Cluster"))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Embedded,
    Single,
    Cluster,
}

/// Makes store handles ("replicas") on one backend.
struct Env {
    backend: Backend,
    url: String,
    /// Embedded: one shared state per namespace (a namespace = a deployment).
    memory: Mutex<Vec<(String, MemoryStore)>>,
}

impl Env {
    fn embedded() -> Env {
        Env::new(Backend::Embedded, String::new())
    }

    fn single() -> Env {
        Env::new(Backend::Single, shared_server().url())
    }

    fn cluster() -> Env {
        Env::new(Backend::Cluster, shared_cluster().url())
    }

    fn new(backend: Backend, url: String) -> Env {
        Env {
            backend,
            url,
            memory: Mutex::new(Vec::new()),
        }
    }

    /// A new replica with the default dead-replica timeout in the default namespace.
    fn replica(&self) -> Arc<dyn InflightStore> {
        self.replica_with(Duration::from_secs(10), "llmlb")
    }

    /// A new replica (own replica id) with this dead-replica timeout, in `namespace`.
    fn replica_with(&self, dead_after: Duration, namespace: &str) -> Arc<dyn InflightStore> {
        match self.backend {
            Backend::Embedded => {
                let mut states = self.memory.lock().expect("lock");
                let base = match states.iter().find(|(ns, _)| ns == namespace) {
                    Some((_, s)) => s.clone(),
                    None => {
                        let s = MemoryStore::new();
                        states.push((namespace.to_owned(), s.clone()));
                        s
                    }
                };
                Arc::new(
                    base.replica()
                        .with_dead_replica_after(dead_after)
                        .expect("dead_after"),
                )
            }
            Backend::Single | Backend::Cluster => {
                let config = RedisConfig::from_url(&self.url)
                    .expect("url")
                    .with_timeout(CALL_TIMEOUT)
                    .expect("timeout")
                    .with_dead_replica_after(dead_after)
                    .expect("dead_after")
                    .with_namespace(namespace)
                    .expect("namespace");
                Arc::new(RedisStore::new(config))
            }
        }
    }
}

/// A pool name unique to this test run (the shared servers outlive single tests).
fn pool(case: &str) -> String {
    format!("{case}-{:08x}", rand::random::<u32>())
}

async fn acquire(s: &dyn InflightStore, pool: &str, candidates: &[&str]) -> (usize, u64) {
    let a = s
        .acquire_least(pool, candidates, None)
        .await
        .unwrap_or_else(|e| panic!("acquire_least({candidates:?}): {e}"));
    (a.index, a.inflight)
}

/// Acquire `n` times with `endpoint` as the only candidate.
async fn load(s: &dyn InflightStore, pool: &str, endpoint: &str, n: usize) {
    for _ in 0..n {
        acquire(s, pool, &[endpoint]).await;
    }
}

async fn counts(s: &dyn InflightStore, pool: &str, endpoints: &[&str]) -> Vec<u64> {
    s.inflight(pool, endpoints).await.expect("inflight")
}

/// A cost query without scales or a sticky key.
fn cost_query<'a>(
    candidates: &'a [&'a str],
    base: &'a [u64],
    weights: &'a [u64],
    load_per_mille: u64,
    tie_per_mille: u64,
) -> CostQuery<'a> {
    CostQuery {
        candidates,
        base,
        weights,
        load_per_mille,
        tie_per_mille,
        scale: &[],
        sticky: None,
    }
}

/// Release `n` units of `endpoint` and flush, as `PoolCounts` does within milliseconds: a store
/// that defers releases (Redis) applies them with the replica's next call, so another replica
/// reading at once would not see them yet.
async fn release<S: InflightStore + ?Sized>(
    s: &S,
    pool: &str,
    endpoint: &str,
    n: u64,
) -> Result<(), StoreError> {
    s.release_n(pool, endpoint, n).await?;
    s.flush(pool).await.map(|_| ())
}

const GUARD: LoadGuard = LoadGuard {
    absolute: 4,
    per_mille: 500,
};

/// `acquire_prefix` with the default guard and a long TTL; returns (endpoint, matched, outcome).
async fn prefix(
    s: &dyn InflightStore,
    pool: &str,
    chain: &[u64],
    candidates: &[&str],
) -> (String, usize, PrefixOutcome) {
    prefix_with(s, pool, chain, candidates, Duration::from_secs(60)).await
}

async fn prefix_with(
    s: &dyn InflightStore,
    pool: &str,
    chain: &[u64],
    candidates: &[&str],
    ttl: Duration,
) -> (String, usize, PrefixOutcome) {
    let a = s
        .acquire_prefix(
            pool,
            PrefixQuery {
                chain,
                candidates,
                max: None,
                guard: GUARD,
                ttl,
                sole: false,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("acquire_prefix({chain:?}): {e}"));
    (candidates[a.index].to_owned(), a.matched, a.outcome)
}

mod cases {
    use super::*;
    use PrefixOutcome::{Diverted, Hit, Miss};

    pub(crate) async fn prefix_miss_then_hit_on_the_same_endpoint(env: &Env) {
        let s = env.replica();
        let p = pool("pmiss");
        let eps = ["a", "b", "c"];
        load(&*s, &p, "a", 2).await;
        load(&*s, &p, "c", 1).await;
        assert_eq!(
            prefix(&*s, &p, &[1, 2, 3], &eps).await,
            ("b".into(), 0, Miss)
        );
        // The same chain, and a longer one, come back to b even though b is now busier than c.
        assert_eq!(
            prefix(&*s, &p, &[1, 2, 3], &eps).await,
            ("b".into(), 3, Hit)
        );
        assert_eq!(
            prefix(&*s, &p, &[1, 2, 3, 4], &eps).await,
            ("b".into(), 3, Hit)
        );
        assert_eq!(
            prefix(&*s, &p, &[1, 2, 3, 4, 5], &eps).await,
            ("b".into(), 4, Hit)
        );
        // Counted like acquire_least.
        assert_eq!(counts(&*s, &p, &eps).await, vec![2, 4, 1]);
        // Only a leading run counts: a chain that starts differently is a miss (least loaded: c).
        assert_eq!(
            prefix(&*s, &p, &[99, 2, 3], &eps).await,
            ("c".into(), 0, Miss)
        );
        // An empty chain is a plain least-request pick.
        assert_eq!(prefix(&*s, &p, &[], &eps).await.2, Miss);
    }

    pub(crate) async fn prefix_holder_not_a_candidate_rewrites_the_chain(env: &Env) {
        let s = env.replica();
        let p = pool("pgone");
        assert_eq!(prefix(&*s, &p, &[7, 8, 9], &["a"]).await.0, "a");
        // a is unhealthy (not a candidate): a miss from depth 1, recorded for the new endpoint.
        let (moved, matched, outcome) = prefix(&*s, &p, &[7, 8, 9, 10], &["b", "c"]).await;
        assert_eq!((matched, outcome), (0, Miss));
        // a is back: the conversation stays where it moved, with its whole chain matched.
        assert_eq!(
            prefix(&*s, &p, &[7, 8, 9, 10, 11], &["a", "b", "c"]).await,
            (moved.clone(), 4, Hit)
        );
        // a still holds the first three blocks as a second holder: without `moved` it matches 3.
        let others: Vec<&str> = ["a", "b", "c"]
            .into_iter()
            .filter(|e| *e != moved)
            .collect();
        assert_eq!(
            prefix(&*s, &p, &[7, 8, 9, 10], &others).await,
            ("a".into(), 3, Hit)
        );
    }

    pub(crate) async fn prefix_load_guard_diverts_and_spreads(env: &Env) {
        let s = env.replica();
        let p = pool("pguard");
        let eps = ["a", "b"];
        let hot = [42];
        assert_eq!(prefix(&*s, &p, &hot, &["a"]).await.0, "a");
        // a has 1; 4 more (5 in all) than b's 0 is past the absolute threshold of 4.
        load(&*s, &p, "a", 3).await;
        assert_eq!(prefix(&*s, &p, &hot, &eps).await, ("a".into(), 1, Hit));
        assert_eq!(prefix(&*s, &p, &hot, &eps).await, ("b".into(), 1, Diverted));
        // b is now a holder too: the least loaded holder gets the hot prefix.
        assert_eq!(prefix(&*s, &p, &hot, &eps).await, ("b".into(), 1, Hit));
        // Relative threshold: with b at 20, a may carry up to 30.
        let q = pool("prel");
        load(&*s, &q, "b", 20).await;
        load(&*s, &q, "a", 29).await;
        assert_eq!(prefix(&*s, &q, &[5], &["a"]).await.0, "a");
        assert_eq!(prefix(&*s, &q, &[5], &eps).await, ("a".into(), 1, Hit));
        assert_eq!(prefix(&*s, &q, &[5], &eps).await, ("b".into(), 1, Diverted));
    }

    pub(crate) async fn prefix_holders_are_capped_most_recent_first(env: &Env) {
        let s = env.replica();
        let p = pool("pcap");
        let eps: Vec<String> = (0..MAX_HOLDERS + 2).map(|i| format!("e{i}")).collect();
        for e in &eps {
            assert_eq!(prefix(&*s, &p, &[1], &[e.as_str()]).await.0, *e);
        }
        // Only the last MAX_HOLDERS are remembered.
        let first = eps[0].as_str();
        assert_eq!(prefix(&*s, &p, &[1], &[first]).await.2, Miss);
        let last = eps[MAX_HOLDERS + 1].as_str();
        assert_eq!(
            prefix(&*s, &p, &[1], &[first, last]).await,
            (last.to_owned(), 1, Hit)
        );
    }

    pub(crate) async fn a_sole_binding_replaces_earlier_holders(env: &Env) {
        let s = env.replica();
        let p = pool("psole");
        let bind = |candidates: &'static [&'static str]| PrefixQuery {
            chain: &[7],
            candidates,
            max: None,
            guard: LoadGuard::NEVER,
            ttl: Duration::from_secs(60),
            sole: true,
        };
        let first = s.acquire_prefix(&p, bind(&["a"])).await.expect("bind");
        assert_eq!(first.outcome, Miss);
        // a is not a candidate: the key moves to b, and a is forgotten.
        let moved = s.acquire_prefix(&p, bind(&["b"])).await.expect("move");
        assert_eq!(moved.outcome, Miss);
        load(&*s, &p, "b", 5).await;
        for _ in 0..4 {
            let again = s.acquire_prefix(&p, bind(&["a", "b"])).await.expect("hit");
            assert_eq!((again.index, again.outcome), (1, Hit), "b, however busy");
        }
        // Without sole, a key keeps its earlier holders (most recent first).
        assert_eq!(prefix(&*s, &p, &[7], &["c"]).await.2, Miss);
        assert_eq!(prefix(&*s, &p, &[7], &["b"]).await, ("b".into(), 1, Hit));
    }

    pub(crate) async fn prefix_saturation_writes_nothing(env: &Env) {
        let s = env.replica();
        let p = pool("psat");
        let query = |chain: &'static [u64], max| PrefixQuery {
            chain,
            candidates: &["a"],
            max: Some(max),
            guard: GUARD,
            ttl: Duration::from_secs(60),
            sole: false,
        };
        s.acquire_prefix(&p, query(&[1], 1)).await.expect("room");
        assert!(matches!(
            s.acquire_prefix(&p, query(&[2], 1)).await,
            Err(StoreError::Saturated)
        ));
        assert_eq!(counts(&*s, &p, &["a"]).await, vec![1]);
        // Block 2 was not recorded for a.
        assert_eq!(prefix(&*s, &p, &[2], &["b"]).await.2, Miss);
        let a = s.acquire_prefix(&p, query(&[1], 5)).await.expect("room");
        assert_eq!((a.matched, a.outcome), (1, Hit));
    }

    pub(crate) async fn prefix_keys_expire_unless_used(env: &Env) {
        let s = env.replica();
        let p = pool("pttl");
        let ttl = Duration::from_millis(1500);
        prefix_with(&*s, &p, &[1], &["a"], ttl).await;
        prefix_with(&*s, &p, &[2], &["a"], ttl).await;
        tokio::time::sleep(Duration::from_millis(900)).await;
        // Key 1 is used (refreshed); key 2 is not.
        assert_eq!(prefix_with(&*s, &p, &[1], &["a", "b"], ttl).await.2, Hit);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(prefix_with(&*s, &p, &[1], &["a", "b"], ttl).await.2, Hit);
        let (_, matched, outcome) = prefix_with(&*s, &p, &[2], &["b", "c"], ttl).await;
        assert_eq!((matched, outcome), (0, Miss));
    }

    pub(crate) async fn prefix_affinity_is_shared_by_replicas_and_isolated_by_pool(env: &Env) {
        let r1 = env.replica();
        let r2 = env.replica();
        let p = pool("pshare");
        let eps = ["a", "b", "c"];
        let (ep, _, _) = prefix(&*r1, &p, &[11, 12], &eps).await;
        assert_eq!(
            prefix(&*r2, &p, &[11, 12, 13], &eps).await,
            (ep.clone(), 2, Hit)
        );
        assert_eq!(counts(&*r1, &p, &[ep.as_str()]).await, vec![2]);
        let other = pool("pshare2");
        assert_eq!(prefix(&*r2, &other, &[11, 12], &eps).await.2, Miss);
        let tenant = env.replica_with(Duration::from_secs(10), "tenant2");
        assert_eq!(prefix(&*tenant, &p, &[11, 12], &eps).await.2, Miss);
    }

    pub(crate) async fn least_loaded_is_chosen(env: &Env) {
        let s = env.replica();
        let p = pool("least");
        load(&*s, &p, "a", 3).await;
        load(&*s, &p, "b", 1).await;
        load(&*s, &p, "c", 2).await;
        assert_eq!(acquire(&*s, &p, &["a", "b", "c"]).await, (1, 2));
        // Now b = c = 2: either may be chosen, never a.
        let (i, n) = acquire(&*s, &p, &["a", "b", "c"]).await;
        assert!(i == 1 || i == 2, "picked {i}");
        assert_eq!(n, 3);
        let mut expect = vec![3, 2, 2];
        expect[i] += 1;
        assert_eq!(counts(&*s, &p, &["a", "b", "c"]).await, expect);
    }

    pub(crate) async fn ties_are_broken_uniformly(env: &Env) {
        let s = env.replica();
        let p = pool("ties");
        let eps = ["a", "b", "c"];
        let mut hist = [0usize; 3];
        for _ in 0..300 {
            let (i, n) = acquire(&*s, &p, &eps).await;
            assert_eq!(n, 1);
            hist[i] += 1;
            release(&*s, &p, eps[i], 1).await.expect("release");
        }
        // Expected 100 each, standard deviation ~8.2: [55, 145] is beyond 5 sigma.
        for h in hist {
            assert!((55..=145).contains(&h), "histogram {hist:?}");
        }
        // Ties among a subset: only the minima are eligible, and both of them get picked.
        load(&*s, &p, "a", 1).await;
        let mut seen = [0usize; 3];
        for _ in 0..60 {
            let (i, _) = acquire(&*s, &p, &eps).await;
            seen[i] += 1;
            release(&*s, &p, eps[i], 1).await.expect("release");
        }
        assert_eq!(seen[0], 0, "{seen:?}");
        assert!(seen[1] >= 10 && seen[2] >= 10, "{seen:?}");
    }

    pub(crate) async fn release_never_goes_below_zero(env: &Env) {
        let s = env.replica();
        let p = pool("release");
        release(&*s, &p, "never-acquired", 1)
            .await
            .expect("release");
        release(&*s, "pool-never-used", "x", 1)
            .await
            .expect("release");
        assert_eq!(counts(&*s, &p, &["never-acquired"]).await, vec![0]);
        load(&*s, &p, "a", 1).await;
        for _ in 0..3 {
            release(&*s, &p, "a", 1).await.expect("release");
        }
        assert_eq!(counts(&*s, &p, &["a"]).await, vec![0]);
        // A negative count would make this 0 again.
        assert_eq!(acquire(&*s, &p, &["a"]).await, (0, 1));
        s.heartbeat(&p).await.expect("heartbeat");
        assert_eq!(counts(&*s, &p, &["a"]).await, vec![1]);
    }

    pub(crate) async fn max_saturates_and_counts_nothing(env: &Env) {
        let s = env.replica();
        let p = pool("max");
        let eps = ["a", "b"];
        for _ in 0..4 {
            s.acquire_least(&p, &eps, Some(2)).await.expect("room left");
        }
        assert_eq!(counts(&*s, &p, &eps).await, vec![2, 2]);
        for _ in 0..3 {
            match s.acquire_least(&p, &eps, Some(2)).await {
                Err(StoreError::Saturated) => {}
                other => panic!("expected Saturated, got {other:?}"),
            }
        }
        assert_eq!(counts(&*s, &p, &eps).await, vec![2, 2]);
        // A higher cap (or none) still admits; after a release the freed endpoint is chosen.
        release(&*s, &p, "b", 1).await.expect("release");
        let a = s.acquire_least(&p, &eps, Some(2)).await.expect("room");
        assert_eq!((a.index, a.inflight), (1, 2));
        // max 0: always saturated, nothing counted, also on a fresh pool.
        let fresh = pool("max0");
        assert!(matches!(
            s.acquire_least(&fresh, &eps, Some(0)).await,
            Err(StoreError::Saturated)
        ));
        assert_eq!(counts(&*s, &fresh, &eps).await, vec![0, 0]);
    }

    pub(crate) async fn only_candidates_are_chosen(env: &Env) {
        let s = env.replica();
        let p = pool("candidates");
        load(&*s, &p, "a", 2).await;
        load(&*s, &p, "b", 1).await;
        // "idle" is known to be free but is not a candidate.
        for _ in 0..5 {
            let (i, _) = acquire(&*s, &p, &["a", "b"]).await;
            assert!(i < 2);
        }
        // A single, busier candidate is still the one chosen.
        assert_eq!(acquire(&*s, &p, &["a"]).await.0, 0);
        assert_eq!(counts(&*s, &p, &["idle"]).await, vec![0]);
        assert_eq!(
            s.acquire_least(&p, &[], None)
                .await
                .err()
                .map(|e| e.to_string()),
            Some(StoreError::InvalidInput("no candidates").to_string())
        );
        assert!(matches!(
            s.acquire_least("", &["a"], None).await,
            Err(StoreError::InvalidInput(_))
        ));
    }

    pub(crate) async fn unknown_endpoints_count_zero(env: &Env) {
        let s = env.replica();
        let p = pool("unknown");
        load(&*s, &p, "a", 2).await;
        load(&*s, &p, "b", 2).await;
        assert_eq!(acquire(&*s, &p, &["a", "b", "new:1"]).await, (2, 1));
        assert_eq!(counts(&*s, &p, &["new:1", "other"]).await, vec![1, 0]);
    }

    pub(crate) async fn pools_and_namespaces_are_isolated(env: &Env) {
        let s = env.replica();
        let (p1, p2) = (pool("iso1"), pool("iso2"));
        load(&*s, &p1, "a", 3).await;
        assert_eq!(counts(&*s, &p2, &["a"]).await, vec![0]);
        assert_eq!(acquire(&*s, &p2, &["a", "b"]).await.1, 1);
        release(&*s, &p2, "a", 1).await.expect("release");
        release(&*s, &p2, "b", 1).await.expect("release");
        assert_eq!(counts(&*s, &p1, &["a"]).await, vec![3]);
        // Another deployment (namespace) on the same store sees nothing of ours.
        let other = env.replica_with(Duration::from_secs(10), "tenant2");
        assert_eq!(counts(&*other, &p1, &["a"]).await, vec![0]);
        load(&*other, &p1, "a", 1).await;
        assert_eq!(counts(&*s, &p1, &["a"]).await, vec![3]);
    }

    pub(crate) async fn replicas_see_each_others_counts(env: &Env) {
        let r1 = env.replica();
        let r2 = env.replica();
        assert_ne!(r1.replica_id(), r2.replica_id());
        let p = pool("replicas");
        load(&*r1, &p, "a", 2).await;
        assert_eq!(acquire(&*r2, &p, &["a", "b"]).await, (1, 1));
        assert_eq!(counts(&*r2, &p, &["a", "b"]).await, vec![2, 1]);
        // r2 has nothing in flight to a: its release must not take r1's count.
        release(&*r2, &p, "a", 1).await.expect("release");
        assert_eq!(counts(&*r1, &p, &["a", "b"]).await, vec![2, 1]);
        release(&*r1, &p, "a", 1).await.expect("release");
        release(&*r2, &p, "b", 1).await.expect("release");
        assert_eq!(counts(&*r2, &p, &["a", "b"]).await, vec![1, 0]);
        // Heart-beats recompute totals without changing correct ones.
        r1.heartbeat(&p).await.expect("heartbeat");
        r2.heartbeat(&p).await.expect("heartbeat");
        assert_eq!(counts(&*r1, &p, &["a", "b"]).await, vec![1, 0]);
    }

    pub(crate) async fn silent_replica_is_reaped(env: &Env) {
        let dead_after = Duration::from_secs(1);
        let live = env.replica_with(dead_after, "llmlb");
        let doomed = env.replica_with(dead_after, "llmlb");
        let p = pool("reap");
        load(&*doomed, &p, "a", 3).await;
        load(&*live, &p, "a", 1).await;
        let silent_since = Instant::now();
        assert_eq!(counts(&*live, &p, &["a"]).await, vec![4]);
        // Within the timeout the silent replica still counts, up to just before its end.
        tokio::time::sleep(dead_after / 2).await;
        live.heartbeat(&p).await.expect("heartbeat");
        assert_eq!(counts(&*live, &p, &["a"]).await, vec![4]);
        let almost = (silent_since + dead_after).saturating_duration_since(Instant::now());
        tokio::time::sleep(almost.saturating_sub(Duration::from_millis(150))).await;
        live.heartbeat(&p).await.expect("heartbeat");
        assert_eq!(
            counts(&*live, &p, &["a"]).await,
            vec![4],
            "a replica silent for {:?} (< {dead_after:?}) was reaped",
            silent_since.elapsed()
        );
        // Then it disappears, while the live replica's count stays.
        let reaped_at = loop {
            live.heartbeat(&p).await.expect("heartbeat");
            if counts(&*live, &p, &["a"]).await == vec![1] {
                break silent_since.elapsed();
            }
            assert!(
                silent_since.elapsed() < dead_after + Duration::from_secs(1),
                "silent replica still counted after {:?}",
                silent_since.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Never before its timeout (its last word came just before `silent_since`).
        assert!(
            reaped_at + Duration::from_millis(50) >= dead_after,
            "reaped too early: {reaped_at:?}"
        );
        // Its late releases find nothing; when it speaks again it starts from zero.
        release(&*doomed, &p, "a", 1).await.expect("release");
        assert_eq!(counts(&*live, &p, &["a"]).await, vec![1]);
        assert_eq!(acquire(&*doomed, &p, &["a"]).await, (0, 2));
        // A replica alone never reaps itself, however long it was silent.
        tokio::time::sleep(dead_after + dead_after / 2).await;
        doomed.heartbeat(&p).await.expect("heartbeat");
        assert_eq!(counts(&*doomed, &p, &["a"]).await, vec![1]);
    }

    pub(crate) async fn restore_replaces_only_the_callers_share(env: &Env) {
        let r1 = env.replica();
        let r2 = env.replica();
        let p = pool("restore");
        let eps = ["a", "b", "c"];
        load(&*r1, &p, "a", 2).await;
        load(&*r1, &p, "b", 1).await;
        load(&*r2, &p, "a", 1).await;
        // r1 really holds one on a and two on c (e.g. a timed-out acquire did count on b).
        r1.restore(&p, &[("a", 1), ("c", 2), ("b", 0)])
            .await
            .expect("restore");
        assert_eq!(counts(&*r2, &p, &eps).await, vec![2, 0, 2]);
        // r1's releases now apply to what it holds: b has nothing of r1's left.
        release(&*r1, &p, "b", 1).await.expect("release");
        release(&*r1, &p, "c", 1).await.expect("release");
        assert_eq!(counts(&*r2, &p, &eps).await, vec![2, 0, 1]);
        // Restoring nothing withdraws r1 entirely; r2's share stays.
        r1.restore(&p, &[]).await.expect("restore");
        assert_eq!(counts(&*r2, &p, &eps).await, vec![1, 0, 0]);
        // Restoring after the store lost everything brings the share back.
        r2.restore(&p, &[("a", 1)]).await.expect("restore");
        r1.restore(&p, &[("b", 3)]).await.expect("restore");
        assert_eq!(counts(&*r1, &p, &eps).await, vec![1, 3, 0]);
    }

    /// `acquire_cost` with no tolerance; returns the chosen endpoint.
    async fn cost(
        s: &dyn InflightStore,
        pool: &str,
        candidates: &[&str],
        base: &[u64],
        weights: &[u64],
        load_per_mille: u64,
    ) -> String {
        let a = s
            .acquire_cost(
                pool,
                cost_query(candidates, base, weights, load_per_mille, 0),
            )
            .await
            .unwrap_or_else(|e| panic!("acquire_cost({base:?}): {e}"));
        candidates[a.index].to_owned()
    }

    pub(crate) async fn cost_weighs_base_against_weighted_load(env: &Env) {
        let (s, other) = (env.replica(), env.replica());
        let p = pool("cost");
        let eps = ["a", "b", "c"];
        // Nothing in flight: the least base cost wins and is counted by its own weight.
        assert_eq!(
            cost(&*s, &p, &eps, &[300, 100, 200], &[30, 700, 20], 1000).await,
            "b"
        );
        assert_eq!(counts(&*s, &p, &eps).await, vec![0, 700, 0]);
        // b now costs 100 + 700: c (200) wins; another replica sees and adds to the same load.
        assert_eq!(
            cost(&*other, &p, &eps, &[300, 100, 200], &[30, 1, 20], 1000).await,
            "c"
        );
        assert_eq!(counts(&*s, &p, &eps).await, vec![0, 700, 20]);
        // Load at a tenth of the weight: b costs 100 + 70 = 170, under c's 200 + 2 and a's 300.
        assert_eq!(
            cost(&*s, &p, &eps, &[300, 100, 200], &[5, 5, 5], 100).await,
            "b"
        );
        assert_eq!(counts(&*s, &p, &eps).await, vec![0, 705, 20]);
        // A weight of 0 still counts 1, so every acquire has something to release.
        assert_eq!(cost(&*s, &p, &["a"], &[0], &[0], 1000).await, "a");
        assert_eq!(counts(&*s, &p, &eps).await, vec![1, 705, 20]);
        // Releases take back exactly the units, never more than this replica holds.
        release(&*s, &p, "b", 705).await.expect("release b");
        release(&*s, &p, "a", 1).await.expect("release a");
        release(&*s, &p, "c", 20).await.expect("c is not s's");
        assert_eq!(counts(&*s, &p, &eps).await, vec![0, 0, 20]);
        release(&*other, &p, "c", 500).await.expect("release c");
        assert_eq!(counts(&*s, &p, &eps).await, vec![0, 0, 0]);
        // Mismatched lengths are refused and count nothing.
        let bad = s
            .acquire_cost(&p, cost_query(&eps, &[1, 2], &[1, 1, 1], 1000, 0))
            .await;
        assert!(matches!(bad, Err(StoreError::InvalidInput(_))), "{bad:?}");
        assert_eq!(counts(&*s, &p, &eps).await, vec![0, 0, 0]);
    }

    pub(crate) async fn cost_near_ties_spread_and_far_ones_never_win(env: &Env) {
        let s = env.replica();
        let p = pool("costties");
        let eps = ["a", "b", "c"];
        let mut chosen = std::collections::HashMap::<String, usize>::new();
        for _ in 0..60 {
            let a = s
                .acquire_cost(&p, cost_query(&eps, &[1000, 1040, 2000], &[1, 1, 1], 0, 50))
                .await
                .expect("acquire_cost");
            *chosen.entry(eps[a.index].to_owned()).or_default() += 1;
        }
        // a and b are within 5 % of each other: both are chosen; c is twice the cost: never.
        assert!(chosen.get("a").copied().unwrap_or(0) > 5, "{chosen:?}");
        assert!(chosen.get("b").copied().unwrap_or(0) > 5, "{chosen:?}");
        assert_eq!(chosen.get("c"), None, "{chosen:?}");
    }

    pub(crate) async fn concurrent_acquires_are_atomic(env: &Env) {
        let replicas: Vec<Arc<dyn InflightStore>> = (0..4).map(|_| env.replica()).collect();
        let p = pool("atomic");
        let eps = ["a", "b", "c", "d"];
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = replicas[i % replicas.len()].clone();
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                let a = s.acquire_least(&p, &eps, None).await.expect("acquire");
                (i % 4, eps[a.index])
            }));
        }
        let mut held = Vec::new();
        for t in tasks {
            held.push(t.await.expect("task"));
        }
        // Every pick took a minimum atomically, so the counts never differ by more than one:
        // 200 picks over 4 endpoints leave exactly 50 each.
        assert_eq!(counts(&*replicas[0], &p, &eps).await, vec![50; 4]);
        let mut tasks = Vec::new();
        for (r, ep) in held {
            let s = replicas[r].clone();
            let p = p.clone();
            tasks.push(tokio::spawn(async move { release(&*s, &p, ep, 1).await }));
        }
        for t in tasks {
            t.await.expect("task").expect("release");
        }
        assert_eq!(counts(&*replicas[1], &p, &eps).await, vec![0; 4]);
    }
}

mod scaled {
    use super::*;

    async fn scaled(
        s: &dyn InflightStore,
        pool: &str,
        candidates: &[&str],
        scale: &[u64],
    ) -> String {
        let a = s
            .acquire_cost(
                pool,
                CostQuery {
                    candidates,
                    base: &vec![1; candidates.len()],
                    weights: &vec![1; candidates.len()],
                    load_per_mille: 1000,
                    tie_per_mille: 0,
                    scale,
                    sticky: None,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("acquire_cost: {e}"));
        candidates[a.index].to_owned()
    }

    /// With a scale per candidate the cost is `scale × (in flight + 1)` (`latency_aware`'s score
    /// times its load over every replica): a fast endpoint takes requests until its load makes it
    /// dearer than a slow idle one.
    pub(crate) async fn cost_scale_multiplies_the_load(env: &Env) {
        let (one, two) = (env.replica(), env.replica());
        let p = pool("scale");
        let eps = ["fast", "slow"];
        // fast costs 10 × (in flight + 1): 10, 20, 30 < slow's 45 × 1.
        for _ in 0..3 {
            assert_eq!(scaled(&*one, &p, &eps, &[10, 45]).await, "fast");
        }
        // Counts come from every replica: fast has 3 in flight, 40 < 45; then 50 > 45.
        assert_eq!(scaled(&*two, &p, &eps, &[10, 45]).await, "fast");
        assert_eq!(scaled(&*two, &p, &eps, &[10, 45]).await, "slow");
    }
}

mod sticky {
    use super::*;
    use PrefixOutcome::{Diverted, Hit, Miss};

    /// One `acquire_cost` of unit weights and costs `base` for session 91 under `guard`; the
    /// chosen endpoint and the session's outcome.
    async fn pick(
        s: &dyn InflightStore,
        pool: &str,
        candidates: &[&str],
        base: &[u64],
        guard: LoadGuard,
        ttl: Duration,
    ) -> (String, PrefixOutcome) {
        let a = s
            .acquire_cost(
                pool,
                CostQuery {
                    candidates,
                    base,
                    weights: &vec![1; candidates.len()],
                    load_per_mille: 1000,
                    tie_per_mille: 0,
                    scale: &[],
                    sticky: Some(Sticky {
                        key: 91,
                        guard,
                        ttl,
                    }),
                },
            )
            .await
            .unwrap_or_else(|e| panic!("acquire_cost: {e}"));
        let outcome = a
            .sticky
            .unwrap_or_else(|| panic!("no sticky outcome: {a:?}"));
        (candidates[a.index].to_owned(), outcome)
    }

    /// A sticky key keeps its endpoint, on every replica, against the cost and until the guard
    /// finds it too busy; then the cost decides and the key moves with the request (its only
    /// holder); a key whose endpoint is not a candidate, or expired, is placed by the cost.
    pub(crate) async fn a_sticky_key_keeps_its_endpoint_within_the_guard(env: &Env) {
        let (one, two) = (env.replica(), env.replica());
        let p = pool("sticky");
        let eps = ["a", "b", "c"];
        let guard = LoadGuard {
            absolute: 2,
            per_mille: 0,
        };
        let ttl = Duration::from_secs(60);
        // First: the cost's choice (b is cheapest), which the key now names.
        assert_eq!(
            pick(&*one, &p, &eps, &[5, 1, 5], guard, ttl).await,
            ("b".into(), Miss)
        );
        // Kept on b though c is now cheapest, from the other replica too, while b carries at most
        // 2 more than the least loaded (a and c: 0).
        assert_eq!(
            pick(&*two, &p, &eps, &[5, 5, 1], guard, ttl).await,
            ("b".into(), Hit)
        );
        assert_eq!(counts(&*one, &p, &eps).await, vec![0, 2, 0]);
        // b at 2: still within; at 3 it is too busy and the cost (c) takes it and the key.
        assert_eq!(
            pick(&*one, &p, &eps, &[5, 5, 1], guard, ttl).await,
            ("b".into(), Hit)
        );
        assert_eq!(
            pick(&*two, &p, &eps, &[5, 5, 1], guard, ttl).await,
            ("c".into(), Diverted)
        );
        assert_eq!(
            pick(&*one, &p, &eps, &[1, 5, 5], guard, ttl).await,
            ("c".into(), Hit)
        );
        // The key names c alone now: without b among the candidates, c still keeps it.
        assert_eq!(
            pick(&*two, &p, &["a", "c"], &[1, 5], guard, ttl).await,
            ("c".into(), Hit)
        );
        // Its endpoint gone from the candidates: placed by cost (b: 1 + 3 < a's 5), bound there.
        assert_eq!(
            pick(&*one, &p, &["a", "b"], &[5, 1], guard, ttl).await,
            ("b".into(), Miss)
        );
        // b (4 in flight) too busy: c by cost (1 + 3 against a's 5, b's 5 + 4).
        assert_eq!(
            pick(&*one, &p, &eps, &[5, 5, 1], guard, ttl).await,
            ("c".into(), Diverted)
        );
        // Expiry: a short TTL, then the key is new again.
        let short = Duration::from_millis(50);
        assert_eq!(pick(&*two, &p, &eps, &[1, 5, 5], guard, short).await.0, "a");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            pick(&*one, &p, &eps, &[5, 5, 1], guard, ttl).await,
            ("c".into(), Miss)
        );
        // Without a sticky key, no outcome.
        let a = one
            .acquire_cost(&p, cost_query(&eps, &[1, 1, 1], &[1, 1, 1], 1000, 0))
            .await
            .expect("acquire_cost");
        assert_eq!(a.sticky, None);
    }
}

mod deferred {
    use super::*;

    /// A release needs no round trip of its own: whether the store applies it at once
    /// (embedded) or with the replica's next call of the pool (Redis), that call already sees it,
    /// a restore supersedes what was not sent, and a flush sends the rest.
    pub(crate) async fn releases_ride_on_the_next_call(env: &Env) {
        let (one, two) = (env.replica(), env.replica());
        let p = pool("deferred");
        let eps = ["a", "b"];
        load(&*one, &p, "a", 2).await;
        load(&*two, &p, "b", 1).await;
        // Released, not flushed: one's next pick counts a at 1 (2 - 1) against b's 1, a tie,
        // and its reading sees the release applied before anything else.
        one.release(&p, "a").await.expect("release");
        assert_eq!(counts(&*one, &p, &eps).await, vec![1, 1]);
        one.release(&p, "a").await.expect("release");
        assert_eq!(acquire(&*one, &p, &eps).await, (0, 1), "a (0) is the least");
        assert_eq!(counts(&*two, &p, &eps).await, vec![1, 1]);
        // A restore supersedes a release not sent yet: one holds a once, whatever was pending.
        one.release(&p, "a").await.expect("release");
        one.restore(&p, &[("a", 1)]).await.expect("restore");
        assert_eq!(counts(&*two, &p, &eps).await, vec![1, 1]);
        // A flush sends what waits; with nothing waiting it sends nothing.
        one.release(&p, "a").await.expect("release");
        let sent = one.flush(&p).await.expect("flush");
        assert_eq!(sent, one.defers_releases());
        assert!(!one.flush(&p).await.expect("flush"));
        assert_eq!(counts(&*two, &p, &eps).await, vec![0, 1]);
    }
}

mod remembered {
    use super::*;
    use PrefixOutcome::{Hit, Miss};

    /// What an answer taught (`remember`) is matched by the next pick, on every replica, ahead of
    /// earlier holders, without counting anything; it expires with its TTL.
    pub(crate) async fn remembered_keys_are_matched_by_every_replica(env: &Env) {
        let (one, two) = (env.replica(), env.replica());
        let p = pool("remember");
        let eps = ["a", "b", "c"];
        one.remember(&p, 77, "c", Duration::from_secs(60))
            .await
            .expect("remember");
        assert_eq!(counts(&*one, &p, &eps).await, vec![0; 3], "nothing counted");
        assert_eq!(prefix(&*two, &p, &[77], &eps).await, ("c".into(), 1, Hit));
        // A later answer from b makes b the key's first holder; c is kept behind it.
        two.remember(&p, 77, "b", Duration::from_secs(60))
            .await
            .expect("remember");
        assert_eq!(
            prefix(&*one, &p, &[77], &["a", "b"]).await,
            ("b".into(), 1, Hit)
        );
        assert_eq!(
            prefix(&*one, &p, &[77], &["a", "c"]).await,
            ("c".into(), 1, Hit)
        );
        // Expiry.
        one.remember(&p, 78, "a", Duration::from_millis(50))
            .await
            .expect("remember");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(prefix(&*two, &p, &[78], &["a"]).await.2, Miss);
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::all::$case(&super::Env::embedded()).await;
                }
            )*
        }
        mod single_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::all::$case(&super::Env::single()).await;
                }
            )*
        }
        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::all::$case(&super::Env::cluster()).await;
                }
            )*
        }
    };
}

/// Every case, whichever module defines it.
mod all {
    pub(crate) use super::cases::*;
    pub(crate) use super::deferred::*;
    pub(crate) use super::remembered::*;
    pub(crate) use super::scaled::*;
    pub(crate) use super::sticky::*;
}

conformance!(
    releases_ride_on_the_next_call,
    a_sticky_key_keeps_its_endpoint_within_the_guard,
    cost_scale_multiplies_the_load,
    remembered_keys_are_matched_by_every_replica,
    least_loaded_is_chosen,
    ties_are_broken_uniformly,
    release_never_goes_below_zero,
    max_saturates_and_counts_nothing,
    only_candidates_are_chosen,
    unknown_endpoints_count_zero,
    pools_and_namespaces_are_isolated,
    replicas_see_each_others_counts,
    silent_replica_is_reaped,
    restore_replaces_only_the_callers_share,
    concurrent_acquires_are_atomic,
    cost_weighs_base_against_weighted_load,
    cost_near_ties_spread_and_far_ones_never_win,
    prefix_miss_then_hit_on_the_same_endpoint,
    prefix_holder_not_a_candidate_rewrites_the_chain,
    prefix_load_guard_diverts_and_spreads,
    prefix_holders_are_capped_most_recent_first,
    prefix_saturation_writes_nothing,
    a_sole_binding_replaces_earlier_holders,
    prefix_keys_expire_unless_used,
    prefix_affinity_is_shared_by_replicas_and_isolated_by_pool,
);

/// Behaviour that only exists with a server.
mod redis_only {
    use super::*;

    fn store(url: &str, timeout: Duration) -> RedisStore {
        RedisStore::new(
            RedisConfig::from_url(url)
                .expect("url")
                .with_timeout(timeout)
                .expect("timeout"),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn detects_standalone_and_cluster() {
        let single = store(&shared_server().url(), CALL_TIMEOUT);
        single.connect().await.expect("connect");
        assert_eq!(single.is_cluster(), Some(false));
        let cluster = store(&shared_cluster().url(), CALL_TIMEOUT);
        cluster.connect().await.expect("connect");
        assert_eq!(cluster.is_cluster(), Some(true));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn key_layout_is_namespaced_with_the_pool_hash_tag() {
        let server = shared_server();
        let s = RedisStore::new(
            RedisConfig::from_url(&server.url())
                .expect("url")
                .with_timeout(CALL_TIMEOUT)
                .expect("timeout")
                .with_replica_id("gw-1")
                .expect("id"),
        );
        let p = pool("layout");
        acquire(&s, &p, &["10.0.0.1:8000"]).await;
        let [inflight, total, replicas] = s.keys(&p);
        assert_eq!(inflight, format!("llmlb:{{{p}}}:inflight"));
        assert_eq!(
            server.cli(&["HGETALL", &inflight]).expect("cli"),
            "gw-1|10.0.0.1:8000\n1\n"
        );
        assert_eq!(
            server.cli(&["HGETALL", &total]).expect("cli"),
            "10.0.0.1:8000\n1\n"
        );
        let score = server.cli(&["ZSCORE", &replicas, "gw-1"]).expect("cli");
        let ms: f64 = score.trim().parse().expect("heartbeat score");
        let time = server.cli(&["TIME"]).expect("cli");
        let secs: f64 = time.lines().next().expect("secs").parse().expect("secs");
        assert!(
            (secs * 1000.0 - ms).abs() < 5000.0,
            "score {ms} vs TIME {secs}"
        );
        for k in [&inflight, &total, &replicas] {
            let ttl: i64 = server
                .cli(&["PTTL", k])
                .expect("cli")
                .trim()
                .parse()
                .expect("ttl");
            assert!(ttl > 0, "{k} has no TTL");
        }
        // All keys of a pool share one cluster slot.
        let cluster = shared_cluster();
        let slots: Vec<String> = [&inflight, &total, &replicas]
            .iter()
            .map(|k| {
                cluster.nodes[0]
                    .cli(&["CLUSTER", "KEYSLOT", k])
                    .expect("keyslot")
            })
            .collect();
        assert!(slots.iter().all(|s| *s == slots[0]), "{slots:?}");
        release(&s, &p, "10.0.0.1:8000", 1).await.expect("release");
        assert_eq!(server.cli(&["HLEN", &inflight]).expect("cli").trim(), "0");
    }

    async fn survives_script_flush(s: &RedisStore, flush: impl Fn()) {
        let p = pool("noscript");
        load(s, &p, "a", 1).await;
        s.heartbeat(&p).await.expect("heartbeat");
        flush();
        // Every script reloads itself on NOSCRIPT, transparently.
        assert_eq!(acquire(s, &p, &["a", "b"]).await, (1, 1));
        flush();
        release(s, &p, "a", 1).await.expect("release after flush");
        flush();
        s.heartbeat(&p).await.expect("heartbeat after flush");
        flush();
        assert_eq!(counts(s, &p, &["a", "b"]).await, vec![0, 1]);
    }

    /// How many `SCRIPT LOAD`s the server has executed.
    fn script_loads(server: &RedisServer) -> u64 {
        let stats = server.cli(&["INFO", "commandstats"]).expect("info");
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_script|load:calls="))
            .and_then(|rest| rest.split(',').next())
            .map(|n| n.parse().expect("calls"))
            .unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn noscript_is_recovered_single() {
        // A server of its own: the shared one's SCRIPT LOAD count moves with other tests.
        let server = RedisServer::start().expect("redis");
        let s = store(&server.url(), CALL_TIMEOUT);
        let warm = pool("warm");
        load(&s, &warm, "a", 2).await;
        release(&s, &warm, "a", 1).await.expect("release");
        let before = script_loads(&server);
        // Loaded once, then called by SHA: repeated calls load nothing more.
        load(&s, &warm, "a", 5).await;
        assert_eq!(script_loads(&server), before);
        survives_script_flush(&s, || {
            assert_eq!(
                server.cli(&["SCRIPT", "FLUSH"]).expect("flush").trim(),
                "OK"
            );
        })
        .await;
        // Each call after a flush reloaded its script (acquire, release, heartbeat, inflight).
        assert!(script_loads(&server) >= before + 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn noscript_is_recovered_cluster() {
        let cluster = shared_cluster();
        let s = store(&cluster.url(), CALL_TIMEOUT);
        survives_script_flush(&s, || {
            for out in cluster.cli_all(&["SCRIPT", "FLUSH"]).expect("flush") {
                assert_eq!(out.trim(), "OK");
            }
        })
        .await;
    }

    /// After the server dies every call fails, as a store failure, within the timeout (+ slack).
    async fn fails_fast(s: &RedisStore, timeout: Duration) {
        let p = pool("dead");
        for i in 0..5 {
            let start = Instant::now();
            let r = match i % 4 {
                0 => s.acquire_least(&p, &["a", "b"], None).await.map(|_| ()),
                1 => release(s, &p, "a", 1).await,
                2 => s.inflight(&p, &["a"]).await.map(|_| ()),
                _ => s.heartbeat(&p).await,
            };
            let took = start.elapsed();
            let e = r.expect_err("server is dead");
            assert!(e.is_store_failure(), "{e}");
            assert!(
                took < timeout + Duration::from_secs(1),
                "call {i} took {took:?}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_server_fails_within_the_timeout() {
        let mut server = RedisServer::start().expect("redis");
        let timeout = Duration::from_millis(300);
        let s = store(&server.url(), timeout);
        let p = pool("kill");
        load(&s, &p, "a", 1).await;
        server.kill();
        fails_fast(&s, timeout).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_cluster_fails_within_the_timeout() {
        let mut cluster = RedisCluster::start().expect("cluster");
        let timeout = Duration::from_millis(300);
        let s = store(&cluster.url(), timeout);
        let p = pool("kill");
        load(&s, &p, "a", 1).await;
        assert_eq!(s.is_cluster(), Some(true));
        cluster.kill_all();
        fails_fast(&s, timeout).await;
    }

    /// Retry `f` until it succeeds (the connection manager reconnects in the background).
    async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match f().await {
                Ok(v) => return v,
                Err(e) if Instant::now() < deadline => {
                    assert!(e.is_store_failure(), "{what}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{what} never recovered: {e}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_that_lost_data_never_goes_negative() {
        let mut server = RedisServer::start().expect("redis");
        let s = store(&server.url(), CALL_TIMEOUT);
        let other = store(&server.url(), CALL_TIMEOUT);
        let p = pool("restart");
        load(&s, &p, "a", 2).await;
        load(&other, &p, "b", 1).await;
        server.restart().expect("restart");
        assert_eq!(server.cli(&["DBSIZE"]).expect("cli").trim(), "0");
        // The two in-flight requests finish after the restart: their releases are no-ops.
        for (r, ep) in [(&s, "a"), (&s, "a"), (&other, "b")] {
            r.release(&p, ep).await.expect("recorded");
        }
        eventually("flush", || s.flush(&p)).await;
        eventually("flush", || other.flush(&p)).await;
        assert_eq!(counts(&s, &p, &["a", "b"]).await, vec![0, 0]);
        let [inflight, total, _] = s.keys(&p);
        for k in [&inflight, &total] {
            let dump = server.cli(&["HGETALL", k]).expect("cli");
            assert!(!dump.contains('-'), "negative count in {k}: {dump}");
        }
        // Picks work again and count from zero.
        let a = eventually("acquire", || s.acquire_least(&p, &["a", "b"], None)).await;
        assert_eq!(a.inflight, 1);
        let b = eventually("acquire", || other.acquire_least(&p, &["a", "b"], None)).await;
        assert_eq!(b.inflight, 1);
        assert_ne!(a.index, b.index);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn down_at_start_then_connects() {
        let mut server = RedisServer::start().expect("redis");
        let url = server.url();
        server.kill();
        let s = store(&url, Duration::from_millis(300));
        let p = pool("late");
        let start = Instant::now();
        assert!(s.acquire_least(&p, &["a"], None).await.is_err());
        assert!(start.elapsed() < Duration::from_millis(1300));
        assert_eq!(s.is_cluster(), None);
        server.restart().expect("start");
        let a = eventually("acquire", || s.acquire_least(&p, &["a"], None)).await;
        assert_eq!(a.inflight, 1);
        assert_eq!(s.is_cluster(), Some(false));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn higress_keys_with_password() {
        let server = RedisServer::start_with(&["--requirepass", "s3cret-pw"]).expect("redis");
        let lb = |password: &str| {
            let yaml = format!(
                "{{serviceFQDN: 127.0.0.1, servicePort: {}, password: '{password}', timeout: 1000}}",
                server.port()
            );
            let file: llm_lb::config::file::LbConfigFile =
                serde_yaml::from_str(&yaml).expect("yaml");
            RedisConfig::from_lb_config(&file)
                .expect("config")
                .expect("redis")
        };
        let good = RedisStore::new(lb("s3cret-pw"));
        let p = pool("auth");
        assert_eq!(acquire(&good, &p, &["a"]).await, (0, 1));
        let bad = RedisStore::new(lb("wrong-pw"));
        let e = bad
            .acquire_least(&p, &["a"], None)
            .await
            .expect_err("wrong password");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        let text = format!("{e} {e:?} {bad:?}");
        assert!(!text.contains("wrong-pw"), "{text}");
    }
}
