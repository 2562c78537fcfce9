//! Test harness: a recording HTTP backend (axum) and the real `llm-lb` binary started as a child
//! process on free loopback ports.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use sha2::{Digest, Sha256};

/// Whether process `pid` holds the listening TCP socket on 127.0.0.1:`port` (waits up to 5 s
/// for it: the port may answer before every listener of the process is up).
pub(crate) fn listens_on(pid: u32, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
        let wanted = format!("0100007F:{port:04X}");
        let inodes: Vec<String> = table
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(1) == Some(&wanted.as_str()) && f.get(3) == Some(&"0A"))
                    .then(|| f.get(9).map(|i| format!("socket:[{i}]")))
                    .flatten()
            })
            .collect();
        let owned = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .any(|t| inodes.iter().any(|i| t.to_string_lossy() == i.as_str()));
        if owned || Instant::now() > deadline {
            return owned;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free loopback port (bound and released; fine for tests on one machine).
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A free loopback port below the kernel's ephemeral range, for a server a test stops and starts
/// again on the same port: while it is down, no outgoing connection can be given the port as its
/// own, which would keep the restarted server from binding it.
pub(crate) fn restartable_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const FIRST: usize = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(32_768);
    let Some(span) = ephemeral.checked_sub(FIRST).filter(|&n| n > 0) else {
        return free_port();
    };
    // Test binaries run one after another; the process id spreads them over the range anyway.
    let offset = std::process::id() as usize * 7919;
    for _ in 0..span {
        let candidate = FIRST + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(candidate).expect("below the ephemeral range");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port from {FIRST} to {ephemeral}")
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What the backend saw of one request.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub method: String,
    pub path: String,
    pub body_len: usize,
    pub body_sha256: String,
    pub content_length: Option<String>,
    pub expect: Option<String>,
    pub traceparent: Option<String>,
}

pub(crate) struct BackendState {
    pub seen: Mutex<Vec<Seen>>,
    pub unhealthy: AtomicBool,
    /// SSE responses wait here after their first event until released.
    pub sse_gate: tokio::sync::Semaphore,
    /// SSE streams that finished (all events sent) and streams dropped early (client gone).
    pub sse_finished: AtomicUsize,
    pub sse_dropped: AtomicUsize,
    pub health_checks: AtomicUsize,
    /// Requests being answered right now (held ones included), all paths but `/health`.
    pub active: AtomicI64,
    /// Requests with `"hold": true` wait for a permit here before they finish.
    pub hold_gate: tokio::sync::Semaphore,
}

/// A recording OpenAI-ish backend.
pub(crate) struct Backend {
    pub addr: SocketAddr,
    pub state: Arc<BackendState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub(crate) async fn start() -> Backend {
        Self::start_at("127.0.0.1:0").await
    }

    /// A backend listening on `addr` (e.g. `127.0.0.12:0`, or a fixed port on another 127.x).
    pub(crate) async fn start_at(addr: &str) -> Backend {
        let state = Arc::new(BackendState {
            seen: Mutex::default(),
            unhealthy: AtomicBool::new(false),
            sse_gate: tokio::sync::Semaphore::new(0),
            sse_finished: AtomicUsize::new(0),
            sse_dropped: AtomicUsize::new(0),
            health_checks: AtomicUsize::new(0),
            active: AtomicI64::new(0),
            hold_gate: tokio::sync::Semaphore::new(0),
        });
        let app = Router::new()
            .fallback(handle)
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Backend { addr, state, task }
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("lock").clone()
    }

    pub(crate) fn count(&self) -> usize {
        self.state.seen.lock().expect("lock").len()
    }
}

/// Counts one request in `BackendState::active` while alive.
struct Active(Arc<BackendState>);
impl Active {
    fn new(state: &Arc<BackendState>) -> Self {
        state.active.fetch_add(1, Ordering::SeqCst);
        Active(state.clone())
    }
}
impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Backend {
    /// Requests being answered right now.
    pub(crate) fn active(&self) -> i64 {
        self.state.active.load(Ordering::SeqCst)
    }

    /// Let `n` held requests finish.
    pub(crate) fn release_held(&self, n: usize) {
        self.state.hold_gate.add_permits(n);
    }
}

/// Answer a `"hold": true` request: JSON after the gate opens, or (streaming) a first event at
/// once and the rest after the gate opens. Counted in `active` until done or dropped.
fn held_response(state: &Arc<BackendState>, stream: bool) -> Response {
    let active = Active::new(state);
    let wait = {
        let state = state.clone();
        async move {
            if let Ok(permit) = state.hold_gate.acquire().await {
                permit.forget();
            }
        }
    };
    if stream {
        let events = futures_util::stream::unfold(
            (0u32, Some(Box::pin(wait)), active),
            |(i, wait, active)| async move {
                match i {
                    0 => Some((
                        Ok::<_, std::io::Error>(Bytes::from("data: {\"n\":0}\n\n")),
                        (1, wait, active),
                    )),
                    1 => {
                        if let Some(w) = wait {
                            w.await;
                        }
                        Some((Ok(Bytes::from("data: [DONE]\n\n")), (2, None, active)))
                    }
                    _ => None,
                }
            },
        );
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(events))
            .expect("resp");
    }
    let body = futures_util::stream::once(async move {
        wait.await;
        drop(active);
        Ok::<_, std::io::Error>(Bytes::from(
            "{\"object\":\"chat.completion\",\"held\":true}",
        ))
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(body))
        .expect("resp")
}

struct DropFlag(Arc<BackendState>, bool);
impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.sse_dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn handle(
    State(state): State<Arc<BackendState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    if path == "/health" {
        state.health_checks.fetch_add(1, Ordering::SeqCst);
        let code = if state.unhealthy.load(Ordering::SeqCst) {
            503
        } else {
            200
        };
        return Response::builder()
            .status(code)
            .body(Body::from("ok"))
            .expect("resp");
    }
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    state.seen.lock().expect("lock").push(Seen {
        method: method.to_string(),
        path: path.clone(),
        body_len: body.len(),
        body_sha256: sha256_hex(&body),
        content_length: h("content-length"),
        expect: h("expect"),
        traceparent: h("traceparent"),
    });
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let streaming = json.get("stream").and_then(|v| v.as_bool()) == Some(true);
    if json.get("hold").and_then(|v| v.as_bool()) == Some(true) {
        return held_response(&state, streaming);
    }
    if json.get("long_stream").and_then(|v| v.as_bool()) == Some(true) {
        // One event every 20 ms for 10 s: long enough that only a client abort ends it early.
        let flag = DropFlag(state.clone(), false);
        let stream = futures_util::stream::unfold((0u32, flag), |(i, mut flag)| async move {
            if i == 500 {
                flag.1 = true;
                flag.0.sse_finished.fetch_add(1, Ordering::SeqCst);
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            Some((
                Ok::<_, std::io::Error>(Bytes::from(format!("data: {{\"n\":{i}}}\n\n"))),
                (i + 1, flag),
            ))
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(stream))
            .expect("resp");
    }
    if json.get("stream").and_then(|v| v.as_bool()) == Some(true) {
        let st = state.clone();
        let stream =
            futures_util::stream::unfold((0u32, DropFlag(st, false)), |(i, mut flag)| async move {
                match i {
                    0 => Some((
                        Ok::<_, std::io::Error>(Bytes::from("data: {\"n\":0}\n\n")),
                        (1, flag),
                    )),
                    1..=3 => {
                        // wait for the test to allow the rest
                        let permit = flag.0.sse_gate.acquire().await.ok()?;
                        permit.forget();
                        Some((
                            Ok(Bytes::from(format!("data: {{\"n\":{i}}}\n\n"))),
                            (i + 1, flag),
                        ))
                    }
                    4 => {
                        flag.1 = true;
                        flag.0.sse_finished.fetch_add(1, Ordering::SeqCst);
                        Some((Ok(Bytes::from("data: [DONE]\n\n")), (5, flag)))
                    }
                    _ => None,
                }
            });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(stream))
            .expect("resp");
    }
    let reply = serde_json::json!({
        "object": if path == "/v1/models" { "list" } else { "chat.completion" },
        "backend": state_addr_marker(),
        "received_sha256": sha256_hex(&body),
        "received_len": body.len(),
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from(reply.to_string()))
        .expect("resp")
}

fn state_addr_marker() -> &'static str {
    "test-backend"
}

/// A running `llm-lb` process.
pub(crate) struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    pub dir: tempfile::TempDir,
    log: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_llm-lb")
}

/// Write a pingora.yaml for a test in `dir` (1 s grace period).
pub(crate) fn write_pingora_conf(dir: &std::path::Path) -> PathBuf {
    write_pingora_conf_with_grace(dir, 1)
}

/// Write a pingora.yaml for a test in `dir` with a grace period of `grace_s` seconds.
pub(crate) fn write_pingora_conf_with_grace(dir: &std::path::Path, grace_s: u64) -> PathBuf {
    let path = dir.join("pingora.yaml");
    std::fs::write(
        &path,
        format!(
            "---\nversion: 1\nthreads: 2\npid_file: {d}/pid\nupgrade_sock: {d}/upgrade.sock\ngrace_period_seconds: {grace_s}\ngraceful_shutdown_timeout_seconds: 1\n",
            d = dir.display()
        ),
    )
    .expect("write pingora.yaml");
    path
}

impl Proxy {
    /// Start llm-lb with `pools_yaml` (the `pools:` list and any other keys except listen/admin).
    pub(crate) fn start(rest_yaml: &str) -> Proxy {
        Self::start_with_grace(rest_yaml, 1)
    }

    /// [`Proxy::start`] with a graceful-shutdown grace period of `grace_s` seconds.
    pub(crate) fn start_with_grace(rest_yaml: &str, grace_s: u64) -> Proxy {
        Self::launch(rest_yaml, grace_s, None)
    }

    /// [`Proxy::start`] in a private mount namespace whose `/etc/hosts` is `hosts` (bind-mounted,
    /// so rewriting the file in place changes what names resolve to for this process only).
    pub(crate) fn start_with_hosts(rest_yaml: &str, hosts: &std::path::Path) -> Proxy {
        Self::launch(rest_yaml, 1, Some(hosts))
    }

    fn launch(rest_yaml: &str, grace_s: u64, hosts: Option<&std::path::Path>) -> Proxy {
        // A port from `free_port` is free when chosen, not when llm-lb binds it: another test's
        // server may take it in between, and then answers in llm-lb's place. Start again on
        // other ports when llm-lb does not own both listening sockets.
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let (port, admin_port) = (free_port(), free_port());
            let policy = dir.path().join("policy.yaml");
            std::fs::write(
                &policy,
                format!("listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin_port}\n{rest_yaml}"),
            )
            .expect("write policy");
            let conf = write_pingora_conf_with_grace(dir.path(), grace_s);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
            let mut p = Self::spawn(dir, &conf, &policy, addr, admin, &[], hosts);
            p.wait_listening();
            if listens_on(p.pid(), port) && listens_on(p.pid(), admin_port) {
                return p;
            }
            eprintln!("llm-lb lost port {port} or {admin_port} to another process; starting again");
            p.kill();
        }
        panic!("llm-lb could not get its own ports three times");
    }

    /// The policy file this process was started with (rewrite it, then reload).
    pub(crate) fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.yaml")
    }

    /// Replace the policy file, keeping this process's listen and admin addresses.
    pub(crate) fn write_policy(&self, rest_yaml: &str) {
        std::fs::write(
            self.policy_path(),
            format!("listen: {}\nadmin: {}\n{rest_yaml}", self.addr, self.admin),
        )
        .expect("write policy");
    }

    /// Start the binary with `extra` arguments; logs go to `dir`.
    fn spawn(
        dir: tempfile::TempDir,
        conf: &std::path::Path,
        policy: &std::path::Path,
        addr: SocketAddr,
        admin: SocketAddr,
        extra: &[&str],
        hosts: Option<&std::path::Path>,
    ) -> Proxy {
        let log = dir.path().join("llm-lb.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut command = match hosts {
            None => Command::new(binary()),
            Some(hosts) => {
                // `unshare` and `sh` exec in place: the child's pid is llm-lb's.
                let mut c = Command::new("unshare");
                c.args([
                    "--mount",
                    "sh",
                    "-c",
                    "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
                ])
                .arg(hosts)
                .arg(binary());
                c
            }
        };
        let child = command
            .args([
                "-c",
                conf.to_str().expect("utf8"),
                "-p",
                policy.to_str().expect("utf8"),
            ])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("LLMLB_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn llm-lb");
        Proxy {
            addr,
            admin,
            child,
            dir,
            log,
        }
    }

    /// Start a second process with `-u` on this one's configuration files: it waits for this
    /// process to hand over its listening sockets (send [`Proxy::signal`] `QUIT` to this one).
    pub(crate) fn start_upgrade(&self) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::spawn(
            dir,
            &self.dir.path().join("pingora.yaml"),
            &self.dir.path().join("policy.yaml"),
            self.addr,
            self.admin,
            &["-u"],
            None,
        )
    }

    /// Send a signal (`TERM`, `QUIT`, `HUP`, …) to the process.
    pub(crate) fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Whether the process has exited (reaping it if so).
    pub(crate) fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect(self.addr).is_ok() && TcpStream::connect(self.admin).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("llm-lb did not start listening; log:\n{}", self.log_text());
    }

    /// SIGKILL the process (a crash) and reap it.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Access-log lines written so far.
    pub(crate) fn access_lines(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("llm_lb::access"))
            .map(str::to_owned)
            .collect()
    }

    /// Access-log lines once there are at least `n` (the line is written in the `logging` hook,
    /// after the client may already have its answer): waits up to 10 s, then returns them all.
    pub(crate) async fn wait_access_lines(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.access_lines();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fetch the admin `/metrics` text.
    pub(crate) async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Poll `/metrics` until the sample `name{labels}` equals `want` (panics after 20 s).
    pub(crate) async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.metric(name, labels).await;
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name}{labels:?} is {got:?}, not {want}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of one sample line of `/metrics` whose text starts with `prefix`.
    pub(crate) async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = self.metrics().await;
        parse_metric(&text, name, labels)
    }
}

/// Find a sample `name{...}` having all `labels` and return its value.
pub(crate) fn parse_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            return None;
        }
        if labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            value.parse().ok()
        } else {
            None
        }
    })
}

/// A pool YAML block.
pub(crate) fn pool_yaml(
    name: &str,
    models: &str,
    endpoints: &[SocketAddr],
    policy: &str,
    extra: &str,
) -> String {
    let eps: Vec<String> = endpoints.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "  - name: {name}\n    models: {models}\n    endpoints: [{}]\n    lb_policy: {policy}\n{extra}",
        eps.join(", ")
    )
}

/// Send raw bytes on a fresh connection and read the response head (status line + headers).
pub(crate) fn raw_exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(timeout)).expect("timeout");
    s.write_all(request).expect("write");
    read_head(&mut s)
}

/// Read one response head from a stream.
pub(crate) fn read_head(s: &mut TcpStream) -> String {
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    let mut head = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
        }
    }
    head
}

/// Read exactly `n` bytes.
pub(crate) fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).expect("read body");
    buf
}

/// A chat body of about `size` bytes.
pub(crate) fn chat_body(model: &str, size: usize, stream: bool) -> Vec<u8> {
    chat_body_with(model, size, stream, false)
}

/// A chat body; `long_stream` asks the test backend for a 10-second event stream.
pub(crate) fn chat_body_with(model: &str, size: usize, stream: bool, long_stream: bool) -> Vec<u8> {
    let filler: String = (0..size).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    serde_json::to_vec(&serde_json::json!({
        "model": model,
        "stream": stream,
        "long_stream": long_stream,
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": filler},
        ],
    }))
    .expect("json")
}

/// POST `body` (with `"hold": true`: the test backend holds it until released) with header
/// `(name, value)` through each of `proxies` in the background, and wait until `backend` holds
/// them all. The handles answer when the requests end.
pub(crate) async fn hold_through(
    client: &reqwest::Client,
    proxies: &[&Proxy],
    path: &str,
    (name, value): (&'static str, &'static str),
    body: &serde_json::Value,
    backend: &Backend,
) -> Vec<tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>> {
    let before = backend.active();
    let held: Vec<_> = proxies
        .iter()
        .map(|proxy| {
            let request = client
                .post(proxy.url(path))
                .header(name, value)
                .json(body)
                .send();
            tokio::spawn(request)
        })
        .collect();
    let want = before + proxies.len() as i64;
    eventually(
        "the held requests at the backend",
        Duration::from_secs(10),
        async || match backend.active() {
            n if n == want => Ok(()),
            n => Err(format!("{n} held, want {want}")),
        },
    )
    .await;
    held
}

/// POST `body` to `path` through `proxy` (which exposes its pick headers), expecting a 200: the
/// endpoint that answered and the pick reason.
pub(crate) async fn routed(
    client: &reqwest::Client,
    proxy: &Proxy,
    path: &str,
    body: &serde_json::Value,
) -> (String, String) {
    let resp = client
        .post(proxy.url(path))
        .json(body)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200, "{path}");
    let header = |name: &str| resp.headers()[name].to_str().expect("header").to_string();
    (header("x-llm-lb-endpoint"), header("x-llm-lb-reason"))
}

/// One turn of a chat against an OpenAI-compatible `url`: send `messages`, append the assistant's
/// answer to them, and return the whole reply.
pub(crate) async fn chat_turn(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    messages: &mut Vec<serde_json::Value>,
    max_tokens: u32,
) -> serde_json::Value {
    let reply: serde_json::Value = client
        .post(url)
        .json(&serde_json::json!({"model": model, "messages": messages, "max_tokens": max_tokens}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let answer = reply["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    messages.push(serde_json::json!({"role": "assistant", "content": answer}));
    reply
}

/// `n` in-process `vllm-sim` servers on free loopback ports, configured as `base` with seeds 0..n.
pub(crate) async fn sim_fleet(n: usize, base: vllm_sim::SimConfig) -> Vec<vllm_sim::SimHandle> {
    let mut sims = Vec::with_capacity(n);
    for seed in 0..n as u64 {
        let cfg = vllm_sim::SimConfig {
            seed,
            ..base.clone()
        };
        sims.push(
            vllm_sim::spawn(cfg, "127.0.0.1:0".parse().expect("addr"))
                .await
                .expect("spawn vllm-sim"),
        );
    }
    sims
}

/// One request sent by [`Load`]: when it was sent and how it ended.
#[derive(Debug)]
pub(crate) struct Sent {
    pub at: Instant,
    /// When the answer (or the error) was complete.
    pub done: Instant,
    /// Status and the `x-llm-lb-endpoint` / `x-llm-lb-policy` headers, or the client error.
    pub result: Result<(u16, String, String), String>,
}

impl Sent {
    /// The endpoint that answered with 200, if it did.
    pub(crate) fn ok_endpoint(&self) -> Option<&str> {
        match &self.result {
            Ok((200, endpoint, _)) => Some(endpoint),
            _ => None,
        }
    }
}

/// Continuous load: `workers` keep-alive clients sending chat requests to `url` back to back
/// until [`Load::finish`].
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<Vec<Sent>>>,
}

impl Load {
    pub(crate) fn start(url: &str, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|w| {
                let (stop, url) = (stop.clone(), url.to_owned());
                tokio::spawn(async move {
                    let client = reqwest::Client::builder()
                        .timeout(Duration::from_secs(30))
                        .build()
                        .expect("client");
                    let mut sent = Vec::new();
                    let mut i = 0;
                    while !stop.load(Ordering::SeqCst) {
                        i += 1;
                        let body =
                            chat_body_with(&format!("worker-{w}"), 200 + i % 300, false, false);
                        let at = Instant::now();
                        let result = match client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .await
                        {
                            Ok(r) => {
                                let header = |n: &str| {
                                    r.headers()
                                        .get(n)
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or("-")
                                        .to_owned()
                                };
                                let (endpoint, policy) =
                                    (header("x-llm-lb-endpoint"), header("x-llm-lb-policy"));
                                let status = r.status().as_u16();
                                match r.bytes().await {
                                    Ok(_) => Ok((status, endpoint, policy)),
                                    Err(e) => Err(format!("body: {e:?}")),
                                }
                            }
                            Err(e) => Err(format!("{e:?}")),
                        };
                        sent.push(Sent {
                            at,
                            done: Instant::now(),
                            result,
                        });
                    }
                    sent
                })
            })
            .collect();
        Load { stop, workers }
    }

    /// Stop the clients and return every request they sent.
    pub(crate) async fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for w in self.workers {
            all.extend(w.await.expect("load worker"));
        }
        all
    }
}

/// The requests that did not end with a 200, as text.
pub(crate) fn failures(sent: &[Sent]) -> Vec<String> {
    sent.iter()
        .filter(|s| s.ok_endpoint().is_none())
        .map(|s| format!("{:?}", s.result))
        .collect()
}

/// An API a conversation is carried over: the same turns as chat, Responses or Messages bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConversationApi {
    Chat,
    Responses,
    Messages,
}

impl ConversationApi {
    fn path(self) -> &'static str {
        match self {
            ConversationApi::Chat => "/v1/chat/completions",
            ConversationApi::Responses => "/v1/responses",
            ConversationApi::Messages => "/v1/messages",
        }
    }

    /// One turn of the conversation `messages` (role/content pairs) in this API; appends the
    /// assistant's answer to `messages`.
    async fn turn(
        self,
        client: &reqwest::Client,
        url: &str,
        model: &str,
        messages: &mut Vec<serde_json::Value>,
        max_tokens: u32,
    ) {
        let body = match self {
            ConversationApi::Chat => {
                chat_turn(client, url, model, messages, max_tokens).await;
                return;
            }
            ConversationApi::Responses => serde_json::json!(
                {"model": model, "input": messages, "max_output_tokens": max_tokens}),
            ConversationApi::Messages => serde_json::json!(
                {"model": model, "messages": messages, "max_tokens": max_tokens}),
        };
        let reply: serde_json::Value = client
            .post(url)
            .json(&body)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        let answer = match self {
            ConversationApi::Responses => &reply["output"][0]["content"][0]["text"],
            ConversationApi::Chat | ConversationApi::Messages => &reply["content"][0]["text"],
        };
        let answer = answer
            .as_str()
            .unwrap_or_else(|| panic!("no answer in {reply}"));
        messages.push(serde_json::json!({"role": "assistant", "content": answer}));
    }
}

/// 12 conversations of 5 turns (~200 prompt tokens a turn), 4 at a time, through `policy` on
/// `n` simulators (`extra`: more of the pool's YAML, e.g. its `lb_config`). The fleet's prefix-cache
/// hit rate, from the simulators' own counters.
pub(crate) async fn fleet_hit_rate(model: &str, policy: &str, n: usize, extra: &str) -> f64 {
    fleet_hit_rate_over(ConversationApi::Chat, model, policy, n, extra).await
}

/// [`fleet_hit_rate`] with the conversations carried over `api`.
pub(crate) async fn fleet_hit_rate_over(
    api: ConversationApi,
    model: &str,
    policy: &str,
    n: usize,
    extra: &str,
) -> f64 {
    let base = vllm_sim::SimConfig {
        model: model.to_string(),
        time_scale: 0.0,
        ..vllm_sim::SimConfig::default()
    };
    let sims = sim_fleet(n, base).await;
    let addrs: Vec<SocketAddr> = sims.iter().map(vllm_sim::SimHandle::addr).collect();
    let proxy = Proxy::start(&format!(
        "pools:\n{}",
        pool_yaml("sim", "[\"*\"]", &addrs, policy, extra)
    ));
    let client = reqwest::Client::new();
    let url = proxy.url(api.path());
    for batch in [0..4, 4..8, 8..12] {
        let tasks: Vec<_> = batch
            .map(|c| {
                let (client, url, model) = (client.clone(), url.clone(), model.to_owned());
                tokio::spawn(async move {
                    let mut messages = Vec::new();
                    for turn in 0..5 {
                        let question = format!("Conversation {c}, turn {turn}. ")
                            + &"Please explain the next step in detail. ".repeat(20);
                        messages.push(serde_json::json!({"role": "user", "content": question}));
                        api.turn(&client, &url, &model, &mut messages, 32).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("conversation");
        }
    }
    let (mut hits, mut queries) = (0.0, 0.0);
    for addr in &addrs {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("sim metrics")
            .text()
            .await
            .expect("text");
        hits += parse_metric(&text, "vllm:prefix_cache_hits_total", &[]).expect("hits");
        queries += parse_metric(&text, "vllm:prefix_cache_queries_total", &[]).expect("queries");
    }
    assert!(queries > 0.0);
    if std::env::var("LLMLB_TEST_LOG").is_ok() {
        eprintln!("{}", proxy.log_text());
    }
    hits / queries
}

/// What `scripts/engine.sh` installs once per machine: llama.cpp's `llama-server`, the SmolLM2
/// model, and the model's tokenizer files (derived from its GGUF).
pub(crate) struct EnginePaths {
    pub server: PathBuf,
    pub model: PathBuf,
    pub tokenizer: PathBuf,
}

/// The real engine's paths, installing it on first use (about 12 minutes on 2 cores, once).
pub(crate) fn engine_paths() -> &'static EnginePaths {
    static PATHS: std::sync::OnceLock<EnginePaths> = std::sync::OnceLock::new();
    PATHS.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/engine.sh");
        let out = Command::new("bash")
            .arg(script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/engine.sh");
        assert!(
            out.status.success(),
            "scripts/engine.sh could not install llama-server and the model"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let value = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("scripts/engine.sh printed no {key}: {text}"))
        };
        EnginePaths {
            server: value("LLAMA_SERVER="),
            model: value("LLAMA_MODEL="),
            tokenizer: value("LLAMA_TOKENIZER="),
        }
    })
}

/// Poll `check` every 50 ms until it returns `Ok`, failing with its last message after `within`.
pub(crate) async fn eventually<F>(what: &str, within: Duration, mut check: F)
where
    F: AsyncFnMut() -> Result<(), String>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(()) => return,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: still {last} after {within:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
