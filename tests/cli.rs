//! The command line: `-t` validates the server and policy files and names what is wrong.

mod common;

use std::path::Path;
use std::process::Command;

use common::{binary, write_pingora_conf};

fn check(policy: &Path) -> (bool, String) {
    check_with(Path::new(&binary()), policy)
}

/// `program -t` on `policy`: whether it passed, and what it printed.
fn check_with(program: &Path, policy: &Path) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = write_pingora_conf(dir.path());
    let out = Command::new(program)
        .args([
            "-t",
            "-c",
            conf.to_str().expect("utf8"),
            "-p",
            policy.to_str().expect("utf8"),
        ])
        .output()
        .expect("run llm-lb -t");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn check_text(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("policy.yaml");
    std::fs::write(&p, yaml).expect("write");
    check(&p)
}

#[test]
fn shipped_configs_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("conf/policy.yaml")];
    for e in std::fs::read_dir(root.join("conf/examples")).expect("examples") {
        files.push(e.expect("entry").path());
    }
    assert!(files.len() >= 3);
    for f in files {
        let (ok, text) = check(&f);
        assert!(ok, "{}: {text}", f.display());
    }
    // The shipped pingora.yaml too.
    let out = Command::new(binary())
        .current_dir(root)
        .args(["-t", "-c", "conf/pingora.yaml", "-p", "conf/policy.yaml"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn broken_policy_files_fail_and_name_the_field() {
    let good = "pools:\n  - name: p\n    models: ['*']\n    endpoints: ['127.0.0.1:8001']\n    lb_policy: round_robin\n";
    let cases = [
        (good.replace("lb_policy:", "lb_polic:"), "lb_polic"),
        (
            good.replace("round_robin", "fastest_first"),
            "pools[0].lb_policy",
        ),
        (
            good.replace("127.0.0.1:8001", "not an address"),
            "pools[0].endpoints[0]",
        ),
        (
            format!("{good}    health_check: {{interval_ms: -5}}\n"),
            "pools[0].health_check.interval_ms",
        ),
        (
            format!("{good}    lb_config: {{redisHost: x}}\n"),
            "redisHost",
        ),
        (format!("max_body_bytes: lots\n{good}"), "max_body_bytes"),
        (
            format!(
                "{}    lb_config: {{serviceFQDN: 127.0.0.1, replicaTimeout: 60000}}\n",
                good.replace("round_robin", "global_least_request")
            ),
            "pools[0].lb_config.replicaTimeout",
        ),
        (
            format!(
                "{}    lb_config: {{serviceFQDN: 'redis://h:1', servicePort: 6379}}\n",
                good.replace("round_robin", "global_least_request")
            ),
            "pools[0].lb_config.servicePort",
        ),
        (
            format!(
                "{}    lb_config: {{serviceFQDN: h, keyPrefix: 'a b'}}\n",
                good.replace("round_robin", "global_least_request")
            ),
            "pools[0].lb_config.keyPrefix",
        ),
        (good.replace("name: p", "name: 'a{b}'"), "pools[0].name"),
        ("pools: []\n".to_string(), "pools"),
    ];
    for (yaml, needle) in cases {
        let (ok, text) = check_text(&yaml);
        assert!(!ok, "accepted:\n{yaml}");
        assert!(text.contains(needle), "'{needle}' not named in: {text}");
    }
    let (ok, text) = check(Path::new("/nonexistent/policy.yaml"));
    assert!(!ok);
    assert!(text.contains("/nonexistent/policy.yaml"), "{text}");
}

#[test]
fn ignored_higress_keys_are_warned_about() {
    let (ok, text) = check_text(
        "pools:\n  - name: p\n    models: ['*']\n    endpoints: ['127.0.0.1:8001']\n    lb_policy: round_robin\n    lb_config: {serviceFQDN: redis.static, password: hunter2}\n",
    );
    assert!(ok, "{text}");
    assert!(text.contains("pools[0].lb_config.serviceFQDN"), "{text}");
    assert!(
        !text.contains("hunter2"),
        "secrets are never printed: {text}"
    );
}

/// The custom-policy example is llm-lb with one more `lb_policy`: it validates a file naming it
/// (and checks the policy's own `lb_config` keys), which the plain binary refuses.
#[test]
fn a_program_with_a_registered_policy_validates_files_naming_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = Path::new(&binary())
        .parent()
        .expect("target dir")
        .join("examples/custom_policy");
    assert!(
        example.exists(),
        "cargo test builds examples: {}",
        example.display()
    );
    let file = root.join("examples/primary-backup.yaml");
    let (ok, text) = check_with(&example, &file);
    assert!(ok, "{text}");
    let (ok, text) = check(&file);
    assert!(
        !ok && text.contains("unknown policy 'primary_backup'"),
        "{text}"
    );
    let yaml = std::fs::read_to_string(&file).expect("read");
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, yaml.replace("spill_over: 16", "spil_over: 16")).expect("write");
    let (ok, text) = check_with(&example, &bad);
    assert!(
        !ok && text.contains("pools[0].lb_config") && text.contains("spil_over"),
        "{text}"
    );
}
