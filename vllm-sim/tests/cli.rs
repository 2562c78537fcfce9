//! The `vllm-sim` binary: documented flags, start-up line, serving, clean stop.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const FLAGS: &[&str] = &[
    "--host",
    "--port",
    "--model",
    "--max-num-seqs",
    "--max-waiting",
    "--kv-blocks",
    "--block-size",
    "--prefill-overhead-ms",
    "--prefill-ms-per-token",
    "--itl-ms",
    "--load-factor",
    "--time-scale",
    "--lora-modules",
    "--max-loras",
    "--legacy-metrics",
    "--fail-rate",
    "--fail-status",
    "--seed",
    "--keep-alive-timeout-ms",
    "--tokenizer",
    "--embedding-dim",
];

#[test]
fn help_documents_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in FLAGS {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
}

#[test]
fn bad_values_exit_non_zero() {
    let out = Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
        .args(["--port", "0", "--kv-blocks", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kv_blocks"));
}

#[tokio::test]
async fn binary_serves_and_reports_where_it_listens() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--model",
            "cli-model",
            "--time-scale",
            "0",
            "--lora-modules",
            "a,b",
            "--max-loras",
            "2",
            "--legacy-metrics",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_string();
    let c = reqwest::Client::new();
    let models: serde_json::Value = c
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["cli-model", "a", "b"]);
    let metrics = c
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("vllm:gpu_cache_usage_perc{model_name=\"cli-model\"}"));
    // SIGTERM stops it cleanly.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
