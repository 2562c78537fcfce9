//! `kv_aware` end to end: real `llm-lb` processes in front of `vllm-sim` fleets, and `-t`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const MODEL: &str = "kv-model";

/// `llm-lb -t` on a policy file with one pool whose policy and pool YAML are given.
fn check(extra: &str, endpoints: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("policy.yaml");
    let yaml = format!(
        "pools:\n  - name: kv\n    models: [\"*\"]\n    endpoints: {endpoints}\n    lb_policy: kv_aware\n{extra}"
    );
    std::fs::write(&p, yaml).expect("write");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(binary())
        .args(["-t", "-c"])
        .arg(root.join("conf/pingora.yaml"))
        .arg("-p")
        .arg(&p)
        .output()
        .expect("run llm-lb -t");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn kv_aware_needs_no_other_key_and_names_bad_ones() {
    let (ok, text) = check("", "[\"127.0.0.1:8001\", \"127.0.0.1:8002\"]");
    assert!(ok, "{text}");
    let (ok, text) = check(
        "    lb_config: {blockSize: 32, prefillWeight: 1.5, loadWeight: 0.5, decodeTokens: 64, tieTolerance: 0.1, predictedTtlMs: 500, kvIndexBlocks: 1000, kvEventsTopic: kv}\n",
        "[{address: \"127.0.0.1:8001\", kv_events: \"tcp://127.0.0.1:5557\"}]",
    );
    assert!(ok, "{text}");
    let (ok, text) = check(
        "    lb_config: {blockSize: 0, tieTolerance: 2, tokenizer: /nonexistent}\n",
        "[{address: \"127.0.0.1:8001\", kv_events: \"http://127.0.0.1:5557\"}]",
    );
    assert!(!ok, "{text}");
    for named in [
        "blockSize",
        "tieTolerance",
        "tokenizer",
        "kv_events",
        "tcp://host:port",
    ] {
        assert!(text.contains(named), "{named} not named in: {text}");
    }
    // maxRequestCount counts requests; kv_aware counts tokens: a warning, not an error.
    let (ok, text) = check(
        "    lb_config: {maxRequestCount: 5}\n",
        "[\"127.0.0.1:8001\"]",
    );
    assert!(ok && text.contains("maxRequestCount"), "{text}");
}

/// The multi-turn workload of `prefix_cache`'s fleet test, without KV events (approximate tokens,
/// predicted entries only): `kv_aware` keeps conversations where their context is cached, far
/// above round robin and close to one server's hit rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_events_it_keeps_conversations_where_they_are_cached() {
    let oracle = fleet_hit_rate(MODEL, "round_robin", 1, "").await;
    let rr = fleet_hit_rate(MODEL, "round_robin", 3, "").await;
    let kv = fleet_hit_rate(MODEL, "kv_aware", 3, "").await;
    eprintln!("fleet hit rate: round_robin {rr:.3}, kv_aware {kv:.3}, oracle {oracle:.3}");
    assert!(kv >= 0.9 * oracle, "kv_aware {kv:.3} vs oracle {oracle:.3}");
    assert!(kv >= rr + 0.2, "kv_aware {kv:.3} vs round_robin {rr:.3}");
}
