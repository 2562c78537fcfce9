//! `least_busy` over a metrics board: the tree's choice, capacity, unknown metrics, dispatch counting.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::super::testing::{ids, views};
use super::*;
use crate::request::LlmRequest;
use crate::scrape::{EndpointMetrics, Lora};

const BASE: &str = "base-model";

fn metrics(waiting: u64, kv: f64, max: usize, running: &[&str]) -> EndpointMetrics {
    EndpointMetrics {
        waiting,
        running: 0,
        kv_cache_usage: Some(kv),
        lora: Lora {
            running: running.iter().map(|s| s.to_string()).collect(),
            max,
        },
        model: Some(BASE.to_string()),
        target: None,
    }
}

fn policy(n: usize, critical: &[&str]) -> (LeastBusy, Arc<MetricsBoard>) {
    let labels = (0..n).map(|i| format!("127.0.0.1:{}", 9000 + i)).collect();
    let board = Arc::new(MetricsBoard::new("p", labels, Duration::from_secs(60)));
    let config = LeastBusyConfig {
        critical_models: critical.iter().map(|s| s.to_string()).collect(),
        ..LeastBusyConfig::default()
    };
    (LeastBusy::new(board.clone(), config), board)
}

fn publish(board: &MetricsBoard, i: usize, m: EndpointMetrics) {
    board.publish(i, m, Instant::now(), board.dispatched(i));
}

fn request(model: &str) -> LlmRequest {
    LlmRequest::parse(
        format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
            .as_bytes(),
    )
}

fn choose(
    p: &LeastBusy,
    endpoints: &[crate::endpoint::EndpointView],
    model: &str,
    candidates: &[EndpointId],
    seed: u64,
) -> Result<(EndpointId, &'static str), PolicyError> {
    let req = request(model);
    let input = PickInput {
        request: &req,
        endpoints,
        candidates,
    };
    p.choose(&input, &mut StdRng::seed_from_u64(seed))
}

/// Pick `n` times for `model` over 3 endpoints without releasing: where each went, and the
/// leases held.
async fn burst(
    p: &LeastBusy,
    endpoints: &[crate::endpoint::EndpointView],
    model: &str,
    n: usize,
) -> ([usize; 3], Vec<Option<Box<dyn Lease>>>) {
    let req = request(model);
    let mut hist = [0; 3];
    let mut leases = Vec::new();
    for _ in 0..n {
        let pick = p
            .pick(PickInput {
                request: &req,
                endpoints,
                candidates: &ids(3),
            })
            .await
            .expect("pick");
        hist[pick.endpoint.index()] += 1;
        leases.push(pick.lease);
    }
    (hist, leases)
}

/// T1–T3 through the policy: metrics on the board, the request's model decides.
#[test]
fn upstream_vectors_through_the_policy() {
    let (p, board) = policy(3, &["critical"]);
    let endpoints = views(&[1, 1, 1]);
    publish(&board, 0, metrics(0, 0.2, 2, &["foo", "bar"]));
    publish(&board, 1, metrics(3, 0.1, 2, &["foo", "critical"]));
    publish(&board, 2, metrics(10, 0.2, 2, &["foo"]));
    for seed in 0..20 {
        assert_eq!(
            choose(&p, &endpoints, "critical", &ids(3), seed).expect("pick"),
            (EndpointId::new(1), REASON_AFFINITY)
        );
        assert_eq!(
            choose(&p, &endpoints, "sheddable", &ids(3), seed).expect("pick"),
            (EndpointId::new(0), REASON)
        );
    }
    publish(&board, 0, metrics(10, 0.9, 2, &["foo", "bar"]));
    publish(&board, 1, metrics(3, 0.85, 2, &["foo", "critical"]));
    publish(&board, 2, metrics(10, 0.85, 2, &["foo"]));
    assert!(matches!(
        choose(&p, &endpoints, "sheddable", &ids(3), 0),
        Err(PolicyError::Saturated)
    ));
    assert_eq!(
        choose(&p, &endpoints, "critical", &ids(3), 0)
            .expect("pick")
            .0,
        EndpointId::new(1)
    );
    // Only candidates are considered.
    let only = [EndpointId::new(2)];
    assert_eq!(
        choose(&p, &endpoints, "critical", &only, 0)
            .expect("pick")
            .0,
        EndpointId::new(2)
    );
}

#[test]
fn the_base_model_is_not_an_adapter() {
    let (p, board) = policy(2, &[BASE]);
    let endpoints = views(&[1, 1]);
    // Endpoint 0 has LoRA room, endpoint 1 has none but a shorter queue.
    publish(&board, 0, metrics(2, 0.1, 2, &[]));
    publish(&board, 1, metrics(1, 0.1, 1, &["x"]));
    assert_eq!(
        choose(&p, &endpoints, BASE, &ids(2), 0).expect("pick"),
        (EndpointId::new(1), REASON)
    );
    // As an adapter name the same request would prefer room for the adapter.
    let (p, board) = policy(2, &["lora-y"]);
    publish(&board, 0, metrics(2, 0.1, 2, &[]));
    publish(&board, 1, metrics(1, 0.1, 1, &["x"]));
    assert_eq!(
        choose(&p, &endpoints, "lora-y", &ids(2), 0)
            .expect("pick")
            .0,
        EndpointId::new(0)
    );
}

#[tokio::test]
async fn dispatches_between_scrapes_spread_a_burst() {
    let (p, board) = policy(3, &["m"]);
    let endpoints = views(&[1, 1, 1]);
    // Endpoint 2 looked idlest at the last scrape.
    publish(&board, 0, metrics(2, 0.0, 0, &[]));
    publish(&board, 1, metrics(2, 0.0, 0, &[]));
    publish(&board, 2, metrics(0, 0.0, 0, &[]));
    let (hist, leases) = burst(&p, &endpoints, "m", 30).await;
    // The idle-looking endpoint is filled up to the others, then the queues stay level.
    let queues = [2 + hist[0], 2 + hist[1], hist[2]];
    let (lo, hi) = (queues.iter().min(), queues.iter().max());
    assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{hist:?}");
    for l in leases {
        l.expect("lease").release(Outcome::Completed);
    }
    assert_eq!(board.view(2, Instant::now()).expect("known").waiting(), 0);
}

/// A sheddable burst against idle engines: the dispatches since the scrape push the counted
/// queues over `queueThresholdCritical`, but the engines report room, so nothing is refused
/// and the burst still spreads evenly. Engines that themselves report full queues refuse.
#[tokio::test]
async fn a_sheddable_burst_is_not_refused_on_our_own_dispatches() {
    let (p, board) = policy(3, &[]);
    let endpoints = views(&[1, 1, 1]);
    for i in 0..3 {
        publish(&board, i, metrics(0, 0.1, 0, &[]));
    }
    let (hist, _leases) = burst(&p, &endpoints, "sheddable", 60).await;
    assert_eq!(hist, [20, 20, 20]);
    for i in 0..3 {
        publish(&board, i, metrics(6, 0.1, 0, &[]));
    }
    assert!(matches!(
        choose(&p, &endpoints, "sheddable", &ids(3), 0),
        Err(PolicyError::Saturated)
    ));
}

#[test]
fn unknown_endpoints_compete_on_in_flight_counts() {
    let (p, board) = policy(3, &[]);
    let endpoints = views(&[1, 1, 1]);
    // Every endpoint unknown: this replica's least request.
    let (id, reason) = choose(&p, &endpoints, "m", &ids(3), 0).expect("pick");
    assert_eq!(reason, REASON_UNKNOWN);
    assert!(id.index() < 3);
    // Endpoint 0 known and idle; 1 and 2 unknown. Endpoint 2 carries two requests of ours.
    publish(&board, 0, metrics(0, 0.1, 0, &[]));
    endpoints[2].add_inflight(2);
    let mut seen = [0; 3];
    for seed in 0..200 {
        let (id, reason) = choose(&p, &endpoints, "m", &ids(3), seed).expect("pick");
        seen[id.index()] += 1;
        assert_eq!(
            reason,
            if id.index() == 0 {
                REASON
            } else {
                REASON_UNKNOWN
            }
        );
    }
    assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
    assert_eq!(seen[2], 0, "more in flight: {seen:?}");
    // A sheddable request finding the known endpoint saturated still goes to an unknown one.
    publish(&board, 0, metrics(9, 0.1, 0, &[]));
    for seed in 0..20 {
        assert_eq!(
            choose(&p, &endpoints, "m", &ids(3), seed).expect("pick"),
            (EndpointId::new(1), REASON_UNKNOWN)
        );
    }
}
