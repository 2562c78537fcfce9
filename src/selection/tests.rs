//! The selections behave as the policies they offer, through Pingora's own `LoadBalancer`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pingora::lb::{discovery, Backends, LoadBalancer};

use super::*;
use crate::scrape::EndpointMetrics;

fn backends(weights: &[usize]) -> BTreeSet<Backend> {
    weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            Backend::new_with_weight(&format!("127.0.0.1:{}", 9000 + i), *w).expect("addr")
        })
        .collect()
}

async fn balancer<S>(weights: &[usize], config: Option<S::Config>) -> LoadBalancer<S>
where
    S: BackendSelection + 'static,
    S::Iter: BackendIter,
{
    let discovery = discovery::Static::new(backends(weights));
    let lb = LoadBalancer::from_backends_with_config(Backends::new(discovery), config);
    lb.update().await.expect("static discovery");
    lb
}

fn port(b: &Backend) -> usize {
    b.addr.as_inet().map_or(0, |a| usize::from(a.port()) - 9000)
}

fn histogram<S>(lb: &LoadBalancer<S>, n: usize, endpoints: usize) -> Vec<usize>
where
    S: BackendSelection + 'static,
    S::Iter: BackendIter,
{
    let mut counts = vec![0; endpoints];
    for _ in 0..n {
        counts[port(&lb.select(b"", 8).expect("backend"))] += 1;
    }
    counts
}

fn chat(turns: &[&str]) -> Vec<u8> {
    let messages: Vec<serde_json::Value> = turns
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            serde_json::json!({"role": role, "content": t.repeat(200)})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({"model": "m", "messages": messages})).expect("json")
}

#[tokio::test]
async fn round_robin_follows_the_weights_exactly() {
    let lb = balancer::<RoundRobinSelection>(&[1, 3], None).await;
    assert_eq!(histogram(&lb, 400, 2), [100, 300]);
}

#[tokio::test]
async fn random_follows_the_weights() {
    let lb = balancer::<RandomSelection>(&[1, 3], None).await;
    let h = histogram(&lb, 4000, 2);
    assert!((800..1200).contains(&h[0]), "{h:?}");
}

#[tokio::test]
async fn least_request_spreads_held_requests_and_follows_releases() {
    let counts = EmbeddedCounts::new("p");
    let lb = balancer::<LeastRequestSelection>(&[1, 1, 1], Some(counts.clone())).await;
    let mut held = Vec::new();
    let mut hist = [0; 3];
    for _ in 0..9 {
        let b = lb.select(b"", 8).expect("backend");
        hist[port(&b)] += 1;
        held.push((port(&b), counts.start(&b, b"")));
    }
    assert_eq!(hist, [3, 3, 3]);
    // Requests on backend 1 end: it is the least loaded now.
    held.retain(|(p, _)| *p != 1);
    for _ in 0..3 {
        let b = lb.select(b"", 8).expect("backend");
        assert_eq!(port(&b), 1);
        held.push((1, counts.start(&b, b"")));
    }
    drop(held);
    let all = backends(&[1, 1, 1]);
    assert!(
        all.iter().all(|b| counts.inflight(b) == 0),
        "every guard released"
    );
}

#[tokio::test]
async fn prefix_affinity_keeps_a_conversation_on_its_backend_within_the_guard() {
    let counts = EmbeddedCounts::new("p");
    let lb = balancer::<PrefixAffinitySelection>(&[1, 1, 1], Some(counts.clone())).await;
    // Turn 1 of three conversations: each placed by load, so on three backends.
    let mut homes = Vec::new();
    let mut held = Vec::new();
    for c in ["alpha ", "bravo ", "charlie "] {
        let key = prompt_key(&chat(&[c]));
        let b = lb.select(&key, 8).expect("backend");
        homes.push(port(&b));
        held.push(counts.start(&b, &key));
    }
    homes.sort_unstable();
    assert_eq!(homes, [0, 1, 2], "misses go to the least loaded");
    drop(held);
    // Later turns extend the prompt: each returns to its conversation's backend.
    for c in ["alpha ", "bravo ", "charlie "] {
        let first = lb.select(&prompt_key(&chat(&[c])), 8).expect("backend");
        let key = prompt_key(&chat(&[c, "answer ", "more "]));
        let again = lb.select(&key, 8).expect("backend");
        assert_eq!(port(&again), port(&first), "{c}");
    }
    // The holder of "alpha" gets 9 requests more than the others: past the guard (8).
    let key = prompt_key(&chat(&["alpha ", "answer ", "more "]));
    let home = lb.select(&key, 8).expect("backend");
    let busy: Vec<Inflight> = (0..9).map(|_| counts.start(&home, b"")).collect();
    let diverted = lb.select(&key, 8).expect("backend");
    assert_ne!(port(&diverted), port(&home), "over the load guard");
    drop(busy);
    assert_eq!(port(&lb.select(&key, 8).expect("backend")), port(&home));
}

#[tokio::test]
async fn least_busy_follows_the_engines_queues_and_kv_use() {
    let labels: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", 9000 + i)).collect();
    let board = Arc::new(MetricsBoard::new("p", labels, Duration::from_secs(60)));
    let metrics = EngineMetrics {
        board: board.clone(),
        config: LeastBusyConfig {
            critical_models: vec!["m".into()],
            ..LeastBusyConfig::default()
        },
    };
    let lb = balancer::<LeastBusySelection>(&[1, 1, 1], Some(metrics)).await;
    let publish = |i: usize, waiting: u64, kv: f64| {
        let m = EndpointMetrics {
            waiting,
            running: 1,
            kv_cache_usage: Some(kv),
            ..EndpointMetrics::default()
        };
        board.publish(i, m, Instant::now(), board.dispatched(i));
    };
    publish(0, 30, 0.5);
    publish(1, 0, 0.9);
    publish(2, 0, 0.2);
    for _ in 0..20 {
        assert_eq!(port(&lb.select(b"m", 8).expect("backend")), 2);
    }
}

#[tokio::test]
async fn the_prefix_index_forgets_expired_prompts() {
    let settings = PrefixSettings {
        ttl: Duration::from_millis(100),
        ..PrefixSettings::default()
    };
    let counts = EmbeddedCounts::new("p").with_prefix_settings(settings);
    let b = backends(&[1]).into_iter().next().expect("backend");
    for c in ["alpha ", "bravo ", "charlie "] {
        drop(counts.start(&b, &prompt_key(&chat(&[c]))));
    }
    let recorded = counts.store.prefix_keys_now("p");
    assert!(recorded >= 3, "{recorded}");
    // Past the TTL and the once-a-second sweep, the next request drops the expired keys.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let key = prompt_key(&chat(&["delta "]));
    drop(counts.start(&b, &key));
    assert_eq!(counts.store.prefix_keys_now("p"), key.len() / 8);
}
