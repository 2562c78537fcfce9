//! Security defaults end to end: TLS to Redis (`rediss://`) against a real `redis-server` with TLS
//! and client-certificate authentication, secrets kept out of logs, metrics and `-t` output, the
//! admin listener on loopback.
//!
//! Certificates are made for each test with the `openssl` command line (a CA, a server
//! certificate for `IP:127.0.0.1`, a client certificate, and an unrelated CA); Debian's
//! `redis-server` 7 is built with TLS. A missing tool is an error, never a skip.

mod common;
mod redis_harness;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use llm_lb::config::file::LbConfigFile;
use llm_lb::config::RedisConfig;
use llm_lb::store::{InflightStore, RedisStore};
use redis_harness::RedisServer;

const PASSWORD: &str = "tls-Pa55word-9f3c";
const WRONG_PASSWORD: &str = "wrong-Pa55word-77aa";

/// Test certificates in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl is needed (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for ca in ["ca", "other-ca"] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=llm-lb test {ca}"),
                ],
            );
        }
        for (name, ext) in [
            ("server", "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
            ("client", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(d.join(format!("{name}.ext")), ext).expect("ext");
            openssl(
                d,
                &[
                    "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", &format!("{name}.key"), "-out", &format!("{name}.csr"),
                    "-subj", &format!("/CN=llm-lb test {name}"),
                ],
            );
            openssl(
                d,
                &[
                    "x509", "-req", "-in", &format!("{name}.csr"), "-CA", "ca.pem", "-CAkey",
                    "ca.key", "-set_serial", "7", "-days", "2", "-out", &format!("{name}.pem"),
                    "-extfile", &format!("{name}.ext"),
                ],
            );
        }
        Pki { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }
}

/// A `redis-server` with a TLS port that requires client certificates and a password (its plain
/// port stays open on loopback for the harness and for inspecting keys with `redis-cli`).
fn tls_redis(pki: &Pki) -> (RedisServer, u16) {
    let mut last = None;
    for _ in 0..5 {
        let tls_port = free_port().to_string();
        let (ca, cert, key) = (
            pki.path("ca.pem"),
            pki.path("server.pem"),
            pki.path("server.key"),
        );
        let args = [
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "yes",
            "--requirepass",
            PASSWORD,
        ];
        match RedisServer::start_with(&args) {
            Ok(s) => {
                let port = tls_port.parse().expect("port");
                wait_port(port);
                return (s, port);
            }
            Err(e) => last = Some(e),
        }
    }
    panic!("redis-server with TLS did not start: {last:?}");
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "TLS port {port} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn redis_config(yaml: &str) -> RedisConfig {
    let file: LbConfigFile = serde_yaml::from_str(yaml).expect("lb_config yaml");
    RedisConfig::from_lb_config(&file)
        .expect("valid lb_config")
        .expect("redis configured")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_verifies_the_server_and_presents_a_client_certificate() {
    let pki = Pki::new();
    let (server, port) = tls_redis(&pki);
    let client = format!(
        "tlsCertFile: '{}', tlsKeyFile: '{}'",
        pki.path("client.pem"),
        pki.path("client.key")
    );
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{port}");
    // The right CA and a client certificate: works, as a URL and as host + `tls: true`.
    for yaml in [
        format!(
            "{{serviceFQDN: '{url}', timeout: 2000, tlsCaFile: '{}', {client}}}",
            pki.path("ca.pem")
        ),
        format!(
            "{{serviceFQDN: 127.0.0.1, servicePort: {port}, tls: true, password: '{PASSWORD}', \
             timeout: 2000, tlsCaFile: '{}', {client}}}",
            pki.path("ca.pem")
        ),
    ] {
        let store = RedisStore::new(redis_config(&yaml));
        let got = store
            .acquire_least("tls", &["a", "b"], None)
            .await
            .expect("acquire over TLS");
        assert_eq!(got.inflight, 1);
        assert_eq!(store.is_cluster(), Some(false));
    }
    // The keys really are in that server.
    let keys = server.cli(&["KEYS", "llmlb:*"]).expect("redis-cli");
    assert!(keys.contains("llmlb:{tls}:total"), "{keys}");

    // A server whose certificate does not chain to the configured CA is refused…
    let wrong_ca = format!(
        "{{serviceFQDN: '{url}', timeout: 2000, tlsCaFile: '{}', {client}}}",
        pki.path("other-ca.pem")
    );
    // …and so is the system trust store (no CA given): verification is never skipped.
    let system_roots = format!("{{serviceFQDN: '{url}', timeout: 2000, {client}}}");
    // Without a client certificate the server refuses us; plain TCP to a TLS port fails too.
    let no_client_cert = format!(
        "{{serviceFQDN: '{url}', timeout: 2000, tlsCaFile: '{}'}}",
        pki.path("ca.pem")
    );
    let plain = format!("{{serviceFQDN: 'redis://:{PASSWORD}@127.0.0.1:{port}', timeout: 500}}");
    for (what, yaml) in [
        ("wrong CA", wrong_ca),
        ("system roots", system_roots),
        ("no client certificate", no_client_cert),
        ("plain TCP", plain),
    ] {
        let store = RedisStore::new(redis_config(&yaml));
        let e = store
            .acquire_least("refused", &["a"], None)
            .await
            .expect_err(what);
        assert!(e.is_store_failure(), "{what}: {e}");
        let text = format!("{e} {e:?} {store:?}");
        assert!(!text.contains(PASSWORD), "{what}: {text}");
    }
    let keys = server
        .cli(&["KEYS", "llmlb:{refused}:*"])
        .expect("redis-cli");
    assert!(
        keys.trim().is_empty(),
        "nothing written when refused: {keys}"
    );
}

/// A running llm-lb at `RUST_LOG=debug` (the most talkative level), logs captured.
struct Gateway {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn start(rest_yaml: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let (port, admin_port) = (free_port(), free_port());
        let policy = dir.path().join("policy.yaml");
        std::fs::write(
            &policy,
            format!("listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin_port}\n{rest_yaml}"),
        )
        .expect("policy");
        let conf = write_pingora_conf(dir.path());
        let log = dir.path().join("llm-lb.log");
        let child = Command::new(binary())
            .args([
                "-c",
                &conf.display().to_string(),
                "-p",
                &policy.display().to_string(),
            ])
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn llm-lb");
        let g = Gateway {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            log,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(g.addr).is_err()
            || std::net::TcpStream::connect(g.admin).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "llm-lb did not start:\n{}",
                g.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        g
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }
}

/// `llm-lb -t` on a policy file: (success, stdout + stderr).
fn check_config(dir: &Path, policy_yaml: &str) -> (bool, String) {
    let policy = dir.join("check-policy.yaml");
    std::fs::write(&policy, policy_yaml).expect("write");
    let conf = write_pingora_conf(dir);
    let out = Command::new(binary())
        .args([
            "-t",
            "-c",
            &conf.display().to_string(),
            "-p",
            &policy.display().to_string(),
        ])
        .env("RUST_LOG", "debug")
        .output()
        .expect("llm-lb -t");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_over_rediss_never_reveals_the_password() {
    let pki = Pki::new();
    let (server, port) = tls_redis(&pki);
    let b = Backend::start().await;
    let tls = format!(
        "tlsCaFile: '{}', tlsCertFile: '{}', tlsKeyFile: '{}'",
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key")
    );
    // Pool `good`: password in the URL. Pool `bad`: a wrong password in the `password` key, so
    // every store call fails and gets logged.
    let pools = format!(
        "pools:\n{}    lb_config: {{serviceFQDN: 'rediss://:{PASSWORD}@127.0.0.1:{port}', timeout: 2000, {tls}}}\n{}    lb_config: {{serviceFQDN: 127.0.0.1, servicePort: {port}, tls: true, password: '{WRONG_PASSWORD}', timeout: 2000, {tls}}}\n",
        pool_yaml("good", "[good]", &[b.addr], "global_least_request", ""),
        pool_yaml("bad", "[bad]", &[b.addr], "global_least_request", ""),
    );
    let gw = Gateway::start(&pools);
    let client = reqwest::Client::new();
    for model in ["good", "bad"] {
        for _ in 0..5 {
            let r = client
                .post(format!("http://{}/v1/chat/completions", gw.addr))
                .body(chat_body(model, 50, false))
                .send()
                .await
                .expect("send");
            // The store fails open: a wrong password costs routing quality, not requests.
            assert_eq!(r.status().as_u16(), 200, "{model}");
        }
    }
    let metrics = gw.metrics().await;
    let ok = parse_metric(
        &metrics,
        "llmlb_store_calls_total",
        &[("pool", "good"), ("op", "acquire"), ("result", "ok")],
    );
    assert_eq!(
        ok,
        Some(5.0),
        "every pick of `good` went through Redis over TLS:\n{metrics}"
    );
    let failed = parse_metric(
        &metrics,
        "llmlb_store_calls_total",
        &[("pool", "bad"), ("op", "acquire"), ("result", "error")],
    )
    .unwrap_or(0.0);
    assert!(failed >= 1.0, "the wrong password fails:\n{metrics}");
    let keys = server.cli(&["KEYS", "llmlb:*"]).expect("redis-cli");
    assert!(keys.contains("llmlb:{good}:replicas"), "{keys}");
    assert!(!keys.contains("{bad}"), "{keys}");

    // `-t` on the same file, and on one with an error in the same lb_config.
    let policy = std::fs::read_to_string(gw.dir.path().join("policy.yaml")).expect("policy");
    let (valid, t_ok) = check_config(gw.dir.path(), &policy);
    assert!(valid, "{t_ok}");
    let broken = policy.replacen("timeout: 2000", "timeout: 2000, database: -1", 1);
    let (valid, t_err) = check_config(gw.dir.path(), &broken);
    assert!(!valid && t_err.contains("database"), "{t_err}");

    let log = gw.log_text();
    assert!(
        log.contains("state store connected to rediss://127.0.0.1"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    for (what, text) in [
        ("log", &log),
        ("metrics", &metrics),
        ("-t", &t_ok),
        ("-t error", &t_err),
    ] {
        for secret in [PASSWORD, WRONG_PASSWORD] {
            assert!(!text.contains(secret), "{what} reveals a password:\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_is_loopback_by_default_and_binds_only_what_is_configured() {
    // The default when `admin` is absent.
    let c = llm_lb::config::Config::from_yaml(
        "pools:\n  - name: p\n    models: ['*']\n    endpoints: ['127.0.0.1:1']\n    lb_policy: round_robin\n",
    )
    .expect("config");
    assert!(c.admin.expect("admin on by default").ip().is_loopback());

    let b = Backend::start().await;
    let proxy = Proxy::start(&format!(
        "pools:\n{}",
        pool_yaml("p", "['*']", &[b.addr], "round_robin", "")
    ));
    // The kernel's table of listening sockets: the admin port is bound to 127.0.0.1 only.
    let tcp = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port_hex = format!(":{:04X}", proxy.admin.port());
    let bound: Vec<&str> = tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(3) == Some(&"0A") && f.get(1).is_some_and(|a| a.ends_with(&port_hex)))
                .then(|| f[1])
        })
        .collect();
    assert_eq!(bound, vec![format!("0100007F{port_hex}")], "{tcp}");
    // /metrics on the proxy listener is proxied like any path, never the admin's.
    let r = reqwest::get(proxy.url("/metrics")).await.expect("get");
    let text = r.text().await.expect("text");
    assert!(!text.contains("llmlb_requests_total"), "{text}");
    assert_eq!(
        b.seen().last().map(|s| s.path.clone()).as_deref(),
        Some("/metrics")
    );
}
