//! The filter tree against the Gateway API Inference Extension's scenarios and its own edge cases.

use super::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// (waiting, kv, max_lora, running adapters)
type Spec<'a> = (u64, f64, usize, &'a [&'a str]);

fn loras(specs: &[Spec<'_>]) -> Vec<Lora> {
    specs
        .iter()
        .map(|(_, _, max, active)| Lora {
            running: active.iter().map(|s| s.to_string()).collect(),
            max: *max,
        })
        .collect()
}

fn pods<'a>(specs: &[Spec<'_>], loras: &'a [Lora]) -> Vec<Pod<'a>> {
    specs
        .iter()
        .zip(loras)
        .map(|((q, kv, _, _), lora)| Pod {
            waiting: *q,
            kv_cache: Some(*kv),
            running: 0,
            lora,
        })
        .collect()
}

fn run_tree(specs: &[Spec<'_>], critical: bool, model: &str) -> Result<Vec<usize>, Dropped> {
    let l = loras(specs);
    let p = pods(specs, &l);
    let ask = Ask {
        critical,
        adapter: Some(model),
    };
    survivors(
        &p,
        ask,
        &Thresholds::default(),
        &mut StdRng::seed_from_u64(1),
    )
}

/// llama.cpp reports no KV-cache use: capacity is the queue alone, and the least loaded by
/// running batch wins among equally short queues.
#[test]
fn without_kv_cache_use_the_running_batch_decides() {
    let none = Lora::default();
    let pod = |waiting, running| Pod {
        waiting,
        kv_cache: None,
        running,
        lora: &none,
    };
    let sheddable = Ask {
        critical: false,
        adapter: None,
    };
    let t = Thresholds::default();
    let mut rng = StdRng::seed_from_u64(7);
    let pods = [pod(0, 4), pod(0, 1), pod(1, 0), pod(0, 3)];
    assert_eq!(survivors(&pods, sheddable, &t, &mut rng), Ok(vec![1]));
    // Over the queue threshold everywhere: a sheddable request is dropped.
    let full = [pod(6, 4), pod(7, 4)];
    assert_eq!(survivors(&full, sheddable, &t, &mut rng), Err(Dropped));
    // One endpoint that reports KV use among ones that do not: compared by running batch.
    let mixed = [
        pod(0, 2),
        Pod {
            kv_cache: Some(0.1),
            ..pod(0, 5)
        },
    ];
    assert_eq!(survivors(&mixed, sheddable, &t, &mut rng), Ok(vec![0]));
}

/// Upstream `filter_test.go` pods for T1 and T2.
const T12: [Spec<'static>; 3] = [
    (0, 0.2, 2, &["foo", "bar"]),
    (3, 0.1, 2, &["foo", "critical"]),
    (10, 0.2, 2, &["foo"]),
];

#[test]
fn t1_critical_request_goes_to_its_adapter() {
    assert_eq!(run_tree(&T12, true, "critical"), Ok(vec![1]));
}

#[test]
fn t2_sheddable_request_goes_to_the_least_queued() {
    assert_eq!(run_tree(&T12, false, "sheddable"), Ok(vec![0]));
}

#[test]
fn t3_sheddable_request_is_dropped_when_nothing_has_capacity() {
    let t3: [Spec<'static>; 3] = [
        (10, 0.9, 2, &["foo", "bar"]),
        (3, 0.85, 2, &["foo", "critical"]),
        (10, 0.85, 2, &["foo"]),
    ];
    assert_eq!(run_tree(&t3, false, "sheddable"), Err(Dropped));
    // A critical request is never dropped.
    assert_eq!(run_tree(&t3, true, "critical"), Ok(vec![1]));
}

#[test]
fn derived_vectors() {
    let d1: [Spec<'static>; 3] = [
        (200, 0.5, 4, &["lora-x"]),
        (130, 0.2, 4, &[]),
        (300, 0.1, 4, &["a", "b", "c", "d"]),
    ];
    assert_eq!(run_tree(&d1, true, "lora-x"), Ok(vec![1]));
    let d2: [Spec<'static>; 3] = [
        (2, 0.7, 2, &["a", "b"]),
        (4, 0.3, 2, &["a"]),
        (5, 0.1, 2, &[]),
    ];
    assert_eq!(run_tree(&d2, true, "lora-x"), Ok(vec![1]));
    let d3: [Spec<'static>; 3] = [
        (9, 0.7, 1, &["a"]),
        (1, 0.3, 1, &["b"]),
        (0, 0.6, 1, &["c"]),
    ];
    assert_eq!(run_tree(&d3, true, "lora-x"), Ok(vec![1]));
    let d4: [Spec<'static>; 2] = [(5, 0.8, 0, &[]), (6, 0.1, 0, &[])];
    assert_eq!(
        run_tree(&d4, false, "m"),
        Ok(vec![0]),
        "bounds are inclusive"
    );
}

fn filter(f: Filter, specs: &[Spec<'_>], adapter: Option<&str>, t: &Thresholds) -> Vec<usize> {
    let l = loras(specs);
    let p = pods(specs, &l);
    let ask = Ask {
        critical: false,
        adapter,
    };
    let all: Vec<usize> = (0..p.len()).collect();
    apply(f, &p, ask, t, &mut StdRng::seed_from_u64(7), &all).expect("no drop")
}

#[test]
fn primitive_least_queuing() {
    let t = Thresholds::default();
    let q = |w: u64| (w, 0.0, 0, &[][..]);
    assert_eq!(
        filter(Filter::LeastQueuing, &[q(0), q(3), q(10)], None, &t),
        vec![0, 1]
    );
    assert_eq!(
        filter(Filter::LeastQueuing, &[], None, &t),
        Vec::<usize>::new()
    );
    // Integer division: [0, 0, 3] keeps waiting ≤ 1.
    assert_eq!(
        filter(Filter::LeastQueuing, &[q(0), q(0), q(3)], None, &t),
        vec![0, 1]
    );
}

#[test]
fn primitive_least_kv_cache() {
    let t = Thresholds::default();
    let k = |kv: f64| (0, kv, 0, &[][..]);
    assert_eq!(
        filter(Filter::LeastKvCache, &[k(0.0), k(0.3), k(1.0)], None, &t),
        vec![0, 1]
    );
    assert_eq!(
        filter(Filter::LeastKvCache, &[], None, &t),
        Vec::<usize>::new()
    );
}

#[test]
fn primitive_no_queue_and_less_than_kv_cache_threshold() {
    let t = Thresholds {
        queue_critical: 0,
        kv_cache: 0.8,
        ..Thresholds::default()
    };
    let specs: [Spec<'static>; 3] = [(0, 0.0, 0, &[]), (1, 0.3, 0, &[]), (0, 1.0, 0, &[])];
    assert_eq!(filter(Filter::HasCapacity, &specs, None, &t), vec![0]);
}

#[test]
fn primitive_low_lora_cost() {
    let t = Thresholds::default();
    let specs: [Spec<'static>; 3] = [
        (0, 0.0, 2, &["model"]),
        (0, 0.0, 2, &["another-model"]),
        (0, 0.0, 2, &["foo", "bar"]),
    ];
    assert_eq!(
        filter(Filter::LowLoraCost, &specs, Some("model"), &t),
        vec![0, 1]
    );
    assert_eq!(filter(Filter::LowLoraCost, &specs, None, &t), vec![0, 1, 2]);
}

#[test]
fn primitive_lora_soft_affinity() {
    let t = Thresholds {
        lora_affinity: 0.75,
        ..Thresholds::default()
    };
    let specs: [Spec<'static>; 2] = [(0, 0.0, 2, &["test-affinity-model"]), (0, 0.0, 2, &[])];
    let l = loras(&specs);
    let p = pods(&specs, &l);
    let ask = Ask {
        critical: true,
        adapter: Some("test-affinity-model"),
    };
    let mut rng = StdRng::seed_from_u64(42);
    let runs = 10_000;
    let mut affine = 0;
    for _ in 0..runs {
        let kept = apply(Filter::LoraAffinity, &p, ask, &t, &mut rng, &[0, 1]).expect("kept");
        assert_eq!(kept.len(), 1, "exactly one endpoint each run");
        if kept == [0] {
            affine += 1;
        }
    }
    let share = f64::from(affine) / f64::from(runs);
    assert!((0.70..=0.80).contains(&share), "affinity share {share}");
    // The Higress default always prefers affinity; no adapter lets everything through.
    let always = Thresholds::default();
    for _ in 0..100 {
        assert_eq!(
            apply(Filter::LoraAffinity, &p, ask, &always, &mut rng, &[0, 1]),
            Ok(vec![0])
        );
    }
    let base = Ask {
        adapter: None,
        ..ask
    };
    assert_eq!(
        apply(Filter::LoraAffinity, &p, base, &t, &mut rng, &[0, 1]),
        Ok(vec![0, 1])
    );
}

#[test]
fn thresholds_are_honoured() {
    // With a lower low-queueing threshold, T1 goes the failure way (least queuing first).
    let l = loras(&T12);
    let p = pods(&T12, &l);
    let ask = Ask {
        critical: true,
        adapter: Some("critical"),
    };
    let t = Thresholds {
        queueing_lora: 1,
        ..Thresholds::default()
    };
    // Only pod 0 has waiting < 1 → affinity fails on {0} but pod 0 cannot accept → {0}.
    assert_eq!(
        survivors(&p, ask, &t, &mut StdRng::seed_from_u64(1)),
        Ok(vec![0])
    );
    // A sheddable request with a stricter KV threshold is dropped.
    let t = Thresholds {
        kv_cache: 0.15,
        queue_critical: 2,
        ..Thresholds::default()
    };
    let shed = Ask {
        critical: false,
        adapter: None,
    };
    assert_eq!(
        survivors(&p, shed, &t, &mut StdRng::seed_from_u64(1)),
        Err(Dropped)
    );
}

#[test]
fn schedule_picks_uniformly_among_survivors() {
    let specs: [Spec<'static>; 3] = [(0, 0.1, 0, &[]), (0, 0.1, 0, &[]), (9, 0.1, 0, &[])];
    let l = loras(&specs);
    let p = pods(&specs, &l);
    let ask = Ask {
        critical: true,
        adapter: None,
    };
    let mut rng = StdRng::seed_from_u64(3);
    let mut hist = [0; 3];
    for _ in 0..1000 {
        let i = schedule(&p, ask, &Thresholds::default(), &mut rng)
            .expect("not dropped")
            .expect("one");
        hist[i] += 1;
    }
    assert_eq!(hist[2], 0);
    assert!(hist[0] > 400 && hist[1] > 400, "{hist:?}");
    assert_eq!(
        schedule(&[], ask, &Thresholds::default(), &mut rng),
        Ok(None)
    );
}
