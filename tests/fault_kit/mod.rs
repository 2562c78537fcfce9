//! Tools of the fault-injection suite (`tests/faults.rs`): a closed-loop load generator that
//! records every request's result, a tally with a one-line summary, and what the proxy process
//! holds (open sockets by kind, RSS) read from `/proc`, with the end-of-scenario checks: nothing
//! in flight, no leaked connection.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) use crate::common::eventually;
use crate::common::Proxy;

/// One request's result.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    /// When it was sent.
    pub at: Instant,
    /// Which load stream sent it (e.g. the proxy it went through).
    pub stream: usize,
    /// `None`: it succeeded; otherwise why not (`status 502`, `truncated stream`, `connect`, …).
    pub failure: Option<String>,
    /// `x-llm-lb-endpoint` of the answer, when the proxy exposes it.
    pub endpoint: Option<String>,
    pub status: u16,
}

impl Sample {
    pub(crate) fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

/// What a load worker sends: the body for its `n`-th request and whether it is a stream.
pub(crate) type BodyFn = Arc<dyn Fn(usize) -> (Vec<u8>, bool) + Send + Sync>;

/// Send one request and read its answer to the end; a 200 whose stream does not end with
/// `[DONE]` or whose JSON does not parse is a failure.
pub(crate) async fn send(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    stream: bool,
    tag: usize,
) -> Sample {
    let at = Instant::now();
    let result = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let (status, endpoint, failure) = match result {
        Err(e) => (0, None, Some(transport(&e))),
        Ok(r) => {
            let status = r.status().as_u16();
            let endpoint = r
                .headers()
                .get("x-llm-lb-endpoint")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let failure = match r.bytes().await {
                Err(e) => Some(format!("body: {}", transport(&e))),
                Ok(_) if status != 200 => Some(format!("status {status}")),
                Ok(b) if stream && !b.ends_with(b"data: [DONE]\n\n") => {
                    Some("truncated stream".to_string())
                }
                Ok(b) if !stream && serde_json::from_slice::<serde_json::Value>(&b).is_err() => {
                    Some("truncated json".to_string())
                }
                Ok(_) => None,
            };
            (status, endpoint, failure)
        }
    };
    Sample {
        at,
        stream: tag,
        failure,
        endpoint,
        status,
    }
}

fn transport(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connect".into()
    } else if e.is_timeout() {
        "client timeout".into()
    } else {
        "transport".into()
    }
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Closed-loop load: `workers` clients on `url`, each sending until `stop` is set or it has sent
/// `max_each` requests. Samples are tagged with `tag`.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Sample>>>,
}

impl Load {
    pub(crate) fn start(
        url: String,
        workers: usize,
        max_each: usize,
        tag: usize,
        body: BodyFn,
    ) -> Load {
        let mut load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            sent: Arc::new(AtomicUsize::new(0)),
            tasks: Vec::new(),
        };
        load.add(url, workers, max_each, tag, body);
        load
    }

    /// More workers, on another URL, sharing this load's stop flag.
    pub(crate) fn add(
        &mut self,
        url: String,
        workers: usize,
        max_each: usize,
        tag: usize,
        body: BodyFn,
    ) {
        for w in 0..workers {
            let (url, stop, sent, body) = (
                url.clone(),
                self.stop.clone(),
                self.sent.clone(),
                body.clone(),
            );
            self.tasks.push(tokio::spawn(async move {
                let client = client();
                let mut samples = Vec::new();
                for i in 0..max_each {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let (b, stream) = body(w * max_each + i);
                    samples.push(send(&client, &url, b, stream, tag).await);
                    sent.fetch_add(1, Ordering::SeqCst);
                }
                samples
            }));
        }
    }

    /// Requests answered so far.
    pub(crate) fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Wait until at least `n` requests were answered (bounded by `within`).
    pub(crate) async fn wait_sent(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.sent() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            self.sent() >= n,
            "only {} of {n} requests in {within:?}",
            self.sent()
        );
    }

    /// Stop and collect every sample.
    pub(crate) async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        self.join().await
    }

    /// Wait for the workers to finish their budgets.
    pub(crate) async fn join(self) -> Vec<Sample> {
        let mut out = Vec::new();
        for t in self.tasks {
            out.extend(t.await.expect("load worker"));
        }
        out
    }
}

/// Counts of a set of samples.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub sent: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub why: BTreeMap<String, usize>,
}

impl Tally {
    pub(crate) fn of<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Tally {
        let mut t = Tally::default();
        for s in samples {
            t.sent += 1;
            match &s.failure {
                None => t.succeeded += 1,
                Some(why) => {
                    t.failed += 1;
                    *t.why.entry(why.clone()).or_default() += 1;
                }
            }
        }
        t
    }

    pub(crate) fn text(&self) -> String {
        let why: Vec<String> = self.why.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!(
            "sent={} succeeded={} failed={}{}",
            self.sent,
            self.succeeded,
            self.failed,
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({})", why.join(", "))
            }
        )
    }
}

/// One TCP socket of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sock {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Kernel state: 1 established, 8 close-wait, 10 listen, …
    pub state: u8,
}

pub(crate) const ESTABLISHED: u8 = 1;
pub(crate) const CLOSE_WAIT: u8 = 8;
pub(crate) const LISTEN: u8 = 10;

/// The TCP sockets (IPv4) process `pid` holds open.
pub(crate) fn sockets(pid: u32) -> Vec<Sock> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            if let Ok(target) = std::fs::read_link(e.path()) {
                let t = target.to_string_lossy();
                if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(n.to_string());
                }
            }
        }
    }
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let inode = f.get(9)?;
            if !inodes.contains(*inode) {
                return None;
            }
            Some(Sock {
                local: hex_addr(f.get(1)?)?,
                remote: hex_addr(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
            })
        })
        .collect()
}

/// `0100007F:1F90` → 127.0.0.1:8080.
fn hex_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(ip)),
        port,
    )))
}

/// Resident memory of `pid`, KiB.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The sum of every sample of metric `name`.
pub(crate) fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let n = series.split_once('{').map_or(series, |(n, _)| n);
            (n == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// What a proxy process holds once a scenario is over.
#[derive(Debug)]
pub(crate) struct Settled {
    pub rss_kib: u64,
    pub sockets: usize,
}

/// After a scenario: the proxy has nothing in flight (`llmlb_endpoint_inflight` all zero), holds
/// no socket in CLOSE_WAIT (a peer closed and the proxy never did), no client connection and —
/// once its upstream idle timeout has passed — no connection to a backend (`upstreams`).
pub(crate) async fn assert_settled(proxy: &Proxy, upstreams: &[SocketAddr]) -> Settled {
    let pid = proxy.pid();
    eventually(
        "proxy in flight back to zero",
        Duration::from_secs(15),
        async || {
            let text = proxy.metrics().await;
            let n = metric_sum(&text, "llmlb_endpoint_inflight");
            if n == 0.0 {
                Ok(())
            } else {
                Err(format!("{n} in flight"))
            }
        },
    )
    .await;
    eventually("no leaked connection", Duration::from_secs(15), async || {
        let socks = sockets(pid);
        let close_wait: Vec<&Sock> = socks.iter().filter(|s| s.state == CLOSE_WAIT).collect();
        let clients: Vec<&Sock> = socks
            .iter()
            .filter(|s| s.state != LISTEN && s.local.port() == proxy.addr.port())
            .collect();
        let backends: Vec<&Sock> = socks
            .iter()
            .filter(|s| s.state != LISTEN && upstreams.contains(&s.remote))
            .collect();
        if close_wait.is_empty() && clients.is_empty() && backends.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "close-wait {close_wait:?}, client connections {clients:?}, backend connections {backends:?}"
            ))
        }
    })
    .await;
    Settled {
        rss_kib: rss_kib(pid),
        sockets: sockets(pid).len(),
    }
}

/// The summary line every scenario prints.
pub(crate) fn report(name: &str, tally: &Tally, rss_before: u64, settled: &Settled, extra: &str) {
    eprintln!(
        "[faults] {name}: {} | rss {} -> {} KiB, {} sockets open after{}",
        tally.text(),
        rss_before,
        settled.rss_kib,
        settled.sockets,
        if extra.is_empty() {
            String::new()
        } else {
            format!(" | {extra}")
        }
    );
}
