//! The deployment examples under `deploy/`: every file they reference exists, and every
//! configuration they carry (files, or embedded in the Kubernetes ConfigMap) passes `llm-lb -t`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::binary;
use serde::Deserialize as _;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `llm-lb -t` on a server and a policy file.
fn check(pingora: &Path, policy: &Path) {
    let out = Command::new(binary())
        .args(["-t", "-c"])
        .arg(pingora)
        .arg("-p")
        .arg(policy)
        .output()
        .expect("run llm-lb -t");
    assert!(
        out.status.success(),
        "{} + {}: {}",
        pingora.display(),
        policy.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_unit_and_its_files() {
    let dir = root().join("deploy/systemd");
    let unit = std::fs::read_to_string(dir.join("llm-lb.service")).expect("unit");
    // The unit's /etc/llm-lb/<file> are the files shipped next to it.
    for name in ["pingora.yaml", "policy.yaml"] {
        assert!(unit.contains(&format!("/etc/llm-lb/{name}")), "{name}");
        assert!(dir.join(name).is_file(), "{name}");
    }
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    check(&dir.join("pingora.yaml"), &dir.join("policy.yaml"));
}

#[test]
fn container_image_copies_files_that_exist() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("Dockerfile");
    let mut copied = 0;
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ")) {
        if line.contains("--from=") {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(root().join(src).exists(), "{line}: {src} is missing");
            copied += 1;
        }
    }
    assert!(copied >= 6, "{copied}");
    let dir = root().join("deploy/container");
    check(&dir.join("pingora.yaml"), &dir.join("policy.yaml"));
}

#[test]
fn kubernetes_configmap_passes_the_check() {
    let dir = root().join("deploy/kubernetes");
    let mut configmaps = 0;
    for entry in std::fs::read_dir(&dir).expect("manifests") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let doc = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                doc.get("kind").is_some(),
                "{}: a document without kind",
                path.display()
            );
            if doc["kind"] != "ConfigMap" || doc["metadata"]["name"] != "llm-lb" {
                continue;
            }
            configmaps += 1;
            let tmp = tempfile::tempdir().expect("tempdir");
            for key in ["pingora.yaml", "policy.yaml"] {
                let body = doc["data"][key]
                    .as_str()
                    .unwrap_or_else(|| panic!("data.{key}"));
                std::fs::write(tmp.path().join(key), body).expect("write");
            }
            check(
                &tmp.path().join("pingora.yaml"),
                &tmp.path().join("policy.yaml"),
            );
        }
    }
    assert_eq!(configmaps, 1);
    // The Deployment mounts the ConfigMap where its arguments look for the files, and the
    // policy's endpoint is the headless Service defined next to it.
    let llm_lb = std::fs::read_to_string(dir.join("llm-lb.yaml")).expect("llm-lb.yaml");
    assert!(llm_lb.contains("mountPath: /etc/llm-lb"));
    assert!(llm_lb.contains("\"/etc/llm-lb/pingora.yaml\", \"-p\", \"/etc/llm-lb/policy.yaml\""));
    let vllm = std::fs::read_to_string(dir.join("vllm.yaml")).expect("vllm.yaml");
    assert!(
        vllm.contains("clusterIP: None") && llm_lb.contains("vllm.llm-lb.svc.cluster.local:8000")
    );
    let redis = std::fs::read_to_string(dir.join("redis.yaml")).expect("redis.yaml");
    assert!(
        redis.contains("name: redis")
            && llm_lb.contains("serviceFQDN: redis.llm-lb.svc.cluster.local")
    );
}
