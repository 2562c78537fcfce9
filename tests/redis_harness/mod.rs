//! Real `redis-server` processes for tests and benchmarks: a standalone server or a 3-master Redis
//! Cluster on free loopback ports, each in its own temporary directory, without persistence.
//!
//! Every server runs under a tiny `sh` guard that holds a pipe from this process: when the
//! [`RedisServer`] is dropped *or this process dies for any reason*, the pipe closes and the guard
//! SIGKILLs its server, so no `redis-server` outlives the test binary (also for servers kept in a
//! `static`). [`RedisServer::kill`] and [`RedisServer::restart`] simulate a crash and a restart that
//! lost all data, on the same port.
//!
//! Needs `redis-server` and `redis-cli` on `PATH`; a missing binary is an error, never a skip.

#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The guard: start redis-server in the background, print its pid, wait for our pipe to close,
/// then kill it. A background job's stdin is /dev/null, so the server does not hold the pipe.
const GUARD: &str = r#"redis-server "$@" & pid=$!
echo "$pid"
read _ignored
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
exit 0"#;

struct Running {
    guard: Child,
    stdin: Option<ChildStdin>,
    pid: u32,
}

/// One `redis-server` process (restartable on the same port).
pub(crate) struct RedisServer {
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    password: Option<String>,
    running: Option<Running>,
    _tmp: tempfile::TempDir,
}

impl RedisServer {
    /// A standalone server on a free port.
    pub(crate) fn start() -> io::Result<Self> {
        Self::start_with(&[])
    }

    /// A server with extra `redis-server` arguments (e.g. `["--requirepass", "pw"]`).
    pub(crate) fn start_with(extra: &[&str]) -> io::Result<Self> {
        let mut last = None;
        for _ in 0..8 {
            let port = free_port()?;
            let tmp = tempfile::Builder::new().prefix("llmlb-redis-").tempdir()?;
            let mut server = RedisServer {
                port,
                dir: tmp.path().to_path_buf(),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                password: extra
                    .iter()
                    .position(|a| *a == "--requirepass")
                    .and_then(|i| extra.get(i + 1))
                    .map(|s| s.to_string()),
                running: None,
                _tmp: tmp,
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                // Most likely another process took the port between probe and bind: try another.
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("could not start redis-server")))
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>` (no credentials).
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn is_running(&self) -> bool {
        self.running.is_some()
    }

    fn spawn(&mut self) -> io::Result<()> {
        let port = self.port.to_string();
        let dir = self.dir.to_string_lossy().into_owned();
        let log = self.dir.join("redis.log").to_string_lossy().into_owned();
        let mut args: Vec<String> = [
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir,
            "--logfile",
            &log,
            "--daemonize",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.extra.iter().cloned());
        let mut guard = Command::new("sh")
            .arg("-c")
            .arg(GUARD)
            .arg("sh")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = guard.stdin.take();
        let mut line = String::new();
        if let Some(out) = guard.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        let pid: u32 = match line.trim().parse() {
            Ok(p) => p,
            Err(_) => {
                drop(stdin);
                let _ = guard.wait();
                return Err(io::Error::other("redis guard did not report a pid"));
            }
        };
        self.running = Some(Running { guard, stdin, pid });
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping(self.port).is_ok() {
                return Ok(());
            }
            if !alive(pid) || Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                self.kill();
                if log.is_empty() && !redis_server_exists() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "redis-server is not installed (apt-get install redis-server)",
                    ));
                }
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                return Err(io::Error::other(format!(
                    "redis-server on port {} did not start: {tail}",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the server (a crash) and wait until it is gone. Idempotent.
    pub(crate) fn kill(&mut self) {
        if let Some(mut r) = self.running.take() {
            let _ = Command::new("kill")
                .args(["-9", &r.pid.to_string()])
                .stderr(Stdio::null())
                .status();
            drop(r.stdin.take());
            let _ = r.guard.wait();
        }
    }

    /// SIGSTOP the server: connections stay open, nothing is answered (a hung Redis).
    pub(crate) fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT a paused server.
    pub(crate) fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(r) = &self.running {
            let _ = Command::new("kill")
                .args([sig, &r.pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Kill (if running) and start again on the same port, with no data (scripts, keys: gone).
    pub(crate) fn restart(&mut self) -> io::Result<()> {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Run `redis-cli` against this server and return its stdout (error on non-zero exit).
    pub(crate) fn cli(&self, args: &[&str]) -> io::Result<String> {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(pw) = &self.password {
            cmd.args(["--no-auth-warning", "-a", pw]);
        }
        let out = cmd.args(args).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "redis-cli {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three masters, no replicas, all 16384 slots assigned.
pub(crate) struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub(crate) fn start() -> io::Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start() {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("could not start a Redis Cluster")))
    }

    fn try_start() -> io::Result<Self> {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        ];
        let nodes = (0..3)
            .map(|_| RedisServer::start_with(&args))
            .collect::<io::Result<Vec<_>>>()?;
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(START_TIMEOUT)?;
        Ok(cluster)
    }

    /// Wait until every node says `cluster_state:ok`, knows all three nodes and all slots.
    pub(crate) fn wait_ok(&self, within: Duration) -> io::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let mut ok = true;
            for n in &self.nodes {
                let info = n.cli(&["cluster", "info"]).unwrap_or_default();
                ok &= info.contains("cluster_state:ok")
                    && info.contains("cluster_known_nodes:3")
                    && info.contains("cluster_slots_ok:16384");
            }
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(
                    "Redis Cluster did not reach cluster_state:ok",
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The seed node's URL.
    pub(crate) fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// Run `redis-cli` on every node.
    pub(crate) fn cli_all(&self, args: &[&str]) -> io::Result<Vec<String>> {
        self.nodes.iter().map(|n| n.cli(args)).collect()
    }

    /// SIGKILL every node.
    pub(crate) fn kill_all(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

/// A port `p` such that `p` and `p + 10000` (the cluster bus) are free on loopback right now.
fn free_port() -> io::Result<u16> {
    for _ in 0..200 {
        let p: u16 = 20000 + (rand::random::<u16>() % 25000);
        let a = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, p)));
        let b = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, p + 10000)));
        if a.is_ok() && b.is_ok() {
            return Ok(p);
        }
    }
    Err(io::Error::other("no free port pair found"))
}

/// `PING` over a raw socket; `+PONG` or `-NOAUTH` both mean the server is up.
fn ping(port: u16) -> io::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    let reply = &buf[..n];
    if reply.starts_with(b"+PONG") || reply.starts_with(b"-NOAUTH") {
        Ok(())
    } else {
        Err(io::Error::other(
            String::from_utf8_lossy(reply).into_owned(),
        ))
    }
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn redis_server_exists() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}
