//! [`InflightStore`] on Redis or Redis Cluster (redis-rs): every gateway replica pointed at the same
//! Redis shares the counts.
//!
//! # Configuration
//!
//! From a pool's `lb_config` ([`RedisConfig::from_lb_config`]), with Higress's keys and units:
//!
//! | key | meaning |
//! |---|---|
//! | `serviceFQDN` | Redis host name or IP — **or** a URL, see below. Absent → embedded store. |
//! | `servicePort` | port, default 6379 (only with a host name; a URL carries its own port) |
//! | `username`, `password` | ACL user and password (empty = none) |
//! | `database` | database number, default 0 (Redis Cluster has only 0) |
//! | `timeout` | ms per Redis call, default 50 (0 = default); a call that takes longer fails with [`StoreError::Timeout`] |
//! | `keyPrefix` | (llm-lb) key namespace, default `llmlb` |
//! | `replicaTimeout` | (llm-lb) ms without heartbeat before a replica's counts are removed, default 10000, 1000..=15000; `timeout` must be at most half of it |
//! | `tls` | (llm-lb) `true`: TLS to a host-name `serviceFQDN` (same as a `rediss://` URL) |
//! | `tlsCaFile` | (llm-lb) PEM file of the CA(s) that signed the server's certificate; default: the system's trust store |
//! | `tlsCertFile`, `tlsKeyFile` | (llm-lb) PEM client certificate and key, for servers that require them (`tls-auth-clients`) |
//!
//! `serviceFQDN` may be a URL: `redis://[user[:password]@]host[:port][/db]`, `rediss://…` (TLS) or
//! `redis+unix:///path/redis.sock[?db=N]`. Percent-encode special characters of the user and
//! password. `username`, `password` and `database` may still be given as separate keys when the
//! URL leaves them out (e.g. to keep the password out of the URL); giving one in both places, or
//! `servicePort` with a URL, is an error.
//!
//! **TLS** (`rediss://…` or `tls: true`) uses rustls. The server's certificate is always verified,
//! host name included, against `tlsCaFile` or else the system's trust store; redis-rs's
//! `#insecure` URL fragment is refused, there is no way to turn verification off. The PEM files
//! are read and parsed when the configuration is loaded (so `-t` checks them); nothing else in
//! them is interpreted.
//!
//! Whether the server is a standalone Redis or a Redis Cluster node is detected on the first
//! connection (`INFO cluster`), so one address works for both; [`RedisConfig::with_mode`] forces
//! one. Standalone uses redis-rs's `ConnectionManager` (multiplexed, reconnects by itself); a
//! cluster uses the async cluster client, with the configured node as the seed. The connection is
//! opened lazily by the first call (bounded by the same timeout), so a gateway starts even while
//! Redis is down, and retried by later calls until it succeeds.
//!
//! The password is never logged: errors and [`RedisConfig`]'s `Debug` show only
//! [`RedisConfig::address`], which omits it.
//!
//! # Scripts
//!
//! Five Lua scripts, loaded by SHA (`EVALSHA`; redis-rs sends `SCRIPT LOAD` and retries once when
//! Redis answers `NOSCRIPT`, e.g. after a restart or `SCRIPT FLUSH`). Every key a script touches is
//! in `KEYS` and shares the pool's hash tag. `ARGV` starts with the replica id, the dead-replica
//! timeout and the key TTL (ms) for the scripts that refresh the heartbeat:
//!
//! - **acquire** (`KEYS` inflight, total, replicas; `ARGV` … random, max or `""`, candidates…):
//!   refresh heartbeat and reap the dead, read the candidates' totals with one `HMGET`, take the
//!   least (ties: the `(random mod ties)`-th), return `{0, least}` when `least >= max`, else
//!   `HINCRBY` this replica's field and the total, return `{1-based index, new total}`.
//! - **prefix** (`KEYS` as acquire, then the chain's block keys `<ns>:{<pool>}:pfx:<16 hex>`;
//!   `ARGV` … random, max, TTL, load guard, candidates…): the longest run of block keys with a
//!   candidate among their holders (a comma-separated list, most recent first), the choice of
//!   `acquire_prefix`, the count as in acquire, then every block key rewritten with the chosen
//!   endpoint first (`SET … PX ttl`).
//! - **release** (`KEYS` inflight, total; `ARGV` replica, endpoint): when this replica's field is
//!   positive, decrement it and the total (removing fields that reach 0); otherwise nothing.
//! - **inflight** (`KEYS` as acquire; `ARGV` … endpoints…): refresh, reap, `HMGET` the totals.
//! - **heartbeat** (`KEYS` as acquire): refresh, reap, then drop fields of replicas that have no
//!   heartbeat and recompute every total from the remaining fields. With `ARGV[4] = "restore"`
//!   it first replaces this replica's fields with the (endpoint, count) pairs that follow.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, ConnectionAddr, ConnectionInfo, ErrorKind,
    FromRedisValue, IntoConnectionInfo, RedisError, Script, ScriptInvocation, ServerErrorKind,
    TlsCertificates,
};
use arc_swap::ArcSwapOption;
use async_trait::async_trait;

use super::{
    check_call, heartbeat_interval_for, new_replica_id, validate_dead_after, validate_replica_id,
    Acquired, InflightStore, PrefixAcquired, PrefixOutcome, PrefixQuery, StoreConfigError,
    StoreError, DEFAULT_DEAD_REPLICA_AFTER, KEY_TTL, MAX_HOLDERS,
};
use crate::config::file::LbConfigFile;

/// Per-call timeout used when `timeout` is absent or 0 (Higress's 3 s default is far too long).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// Smallest `replicaTimeout` accepted from a policy file: below it, heartbeats sent once per
/// interval leave too little margin and replicas would reap each other.
pub const MIN_REPLICA_TIMEOUT_MS: u64 = 1000;
/// Key namespace used unless configured otherwise.
pub const DEFAULT_NAMESPACE: &str = "llmlb";

/// PEM contents for a TLS connection to Redis (see [`RedisConfig::with_tls`]).
#[derive(Clone, Default)]
pub struct TlsFiles {
    /// CA certificate(s) the server's certificate must chain to; `None`: the system's trust store.
    pub ca: Option<Vec<u8>>,
    /// Client certificate chain and private key, for servers that authenticate clients.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    /// Read the files an `lb_config` names (`tlsCaFile`, `tlsCertFile` + `tlsKeyFile`).
    pub fn from_lb_config(c: &LbConfigFile) -> Result<Self, StoreConfigError> {
        let ca = c
            .tlsCaFile
            .as_deref()
            .map(|p| read_file("tlsCaFile", p))
            .transpose()?;
        let client = match (c.tlsCertFile.as_deref(), c.tlsKeyFile.as_deref()) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((
                read_file("tlsCertFile", cert)?,
                read_file("tlsKeyFile", key)?,
            )),
            (Some(_), None) => {
                return Err(StoreConfigError::invalid(
                    "tlsKeyFile",
                    "required with tlsCertFile",
                ))
            }
            (None, Some(_)) => {
                return Err(StoreConfigError::invalid(
                    "tlsCertFile",
                    "required with tlsKeyFile",
                ))
            }
        };
        Ok(TlsFiles { ca, client })
    }

    fn is_empty(&self) -> bool {
        self.ca.is_none() && self.client.is_none()
    }
}

fn read_file(key: &'static str, path: &str) -> Result<Vec<u8>, StoreConfigError> {
    std::fs::read(path)
        .map_err(|e| StoreConfigError::invalid(key, format!("cannot read {path}: {e}")))
}

/// Check that `pem` holds at least one PEM item of the expected kind (never echoing its content).
fn check_pem(pem: &[u8], key: &'static str, what: &str) -> Result<(), StoreConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ok = if what == "CERTIFICATE" {
        let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
        matches!(certs, Ok(c) if !c.is_empty())
    } else {
        PrivateKeyDer::from_pem_slice(pem).is_ok()
    };
    if ok {
        Ok(())
    } else {
        Err(StoreConfigError::invalid(
            key,
            format!("no PEM {what} found in the file"),
        ))
    }
}

/// Standalone server or Redis Cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedisMode {
    /// Ask the server on the first connection (`INFO cluster`).
    #[default]
    Auto,
    /// A standalone server (or a proxy in front of one).
    Standalone,
    /// A Redis Cluster; the configured address is the seed node.
    Cluster,
}

/// Where and how to reach Redis, and the store's knobs.
#[derive(Clone)]
pub struct RedisConfig {
    info: ConnectionInfo,
    /// CA and client certificate for TLS (`None`: plain TCP or Unix socket). Already applied to
    /// `info`; kept for the cluster client, which connects to the nodes it discovers with them.
    tls: Option<TlsCertificates>,
    mode: RedisMode,
    timeout: Duration,
    dead_after: Duration,
    namespace: String,
    replica_id: Option<String>,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("address", &self.address())
            .field("tls", &self.tls.is_some())
            .field("mode", &self.mode)
            .field("timeout", &self.timeout)
            .field("dead_replica_after", &self.dead_after)
            .field("namespace", &self.namespace)
            .field("replica_id", &self.replica_id)
            .finish()
    }
}

/// The same server, credentials, database and store settings (a reload keeps the store then).
impl PartialEq for RedisConfig {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.info.redis_settings(), other.info.redis_settings());
        format!("{:?}", self.info.addr()) == format!("{:?}", other.info.addr())
            && a.username() == b.username()
            && a.password() == b.password()
            && a.db() == b.db()
            && self.mode == other.mode
            && self.timeout == other.timeout
            && self.dead_after == other.dead_after
            && self.namespace == other.namespace
            && self.replica_id == other.replica_id
    }
}

impl RedisConfig {
    fn with_info(info: ConnectionInfo) -> Self {
        RedisConfig {
            info,
            tls: None,
            mode: RedisMode::Auto,
            timeout: DEFAULT_TIMEOUT,
            dead_after: DEFAULT_DEAD_REPLICA_AFTER,
            namespace: DEFAULT_NAMESPACE.to_owned(),
            replica_id: None,
        }
    }

    /// From a `redis://`, `rediss://` or `redis+unix://` URL (see the module docs).
    pub fn from_url(url: &str) -> Result<Self, StoreConfigError> {
        let info = url.into_connection_info().map_err(|e| {
            StoreConfigError::invalid(
                "serviceFQDN",
                format!("bad Redis URL: {}", url_error(url, &e)),
            )
        })?;
        if let ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
            return Err(StoreConfigError::invalid(
                "serviceFQDN",
                "'#insecure' (TLS without certificate verification) is not supported; give the \
                 server's CA in tlsCaFile instead",
            ));
        }
        let mut config = Self::with_info(info);
        if config.is_tls() {
            config = config.with_tls(TlsFiles::default())?;
        }
        Ok(config)
    }

    /// Whether connections use TLS (`rediss://` or `tls: true`).
    pub fn is_tls(&self) -> bool {
        matches!(self.info.addr(), ConnectionAddr::TcpTls { .. })
    }

    /// Connect with TLS, verifying the server against `files.ca` (PEM) or else the system's trust
    /// store, presenting `files.client` (certificate and key, PEM) when given. A host-name address
    /// becomes a TLS one; a Unix socket cannot.
    pub fn with_tls(mut self, files: TlsFiles) -> Result<Self, StoreConfigError> {
        let addr = match self.info.addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                ConnectionAddr::TcpTls {
                    host: host.clone(),
                    port: *port,
                    insecure: false,
                    tls_params: None,
                }
            }
            _ => {
                return Err(StoreConfigError::invalid(
                    "tls",
                    "TLS needs a TCP address, not a Unix socket",
                ))
            }
        };
        if let Some(ca) = &files.ca {
            check_pem(ca, "tlsCaFile", "CERTIFICATE")?;
        }
        if let Some((cert, key)) = &files.client {
            check_pem(cert, "tlsCertFile", "CERTIFICATE")?;
            check_pem(key, "tlsKeyFile", "PRIVATE KEY")?;
        }
        // redis-rs asks rustls for the process-wide crypto provider; make it ring (the only one
        // built in) explicitly, so adding a dependency that enables another one cannot break TLS.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs = TlsCertificates {
            client_tls: files
                .client
                .map(|(client_cert, client_key)| ClientTlsConfig {
                    client_cert,
                    client_key,
                }),
            root_cert: files.ca,
        };
        let info = self.info.clone().set_addr(addr);
        // Parses the PEM now, so a bad file fails at load time (and `-t`), not on first use.
        let client = Client::build_with_tls(info, certs.clone()).map_err(|e| {
            StoreConfigError::invalid("tlsCaFile", format!("unusable TLS settings: {e}"))
        })?;
        self.info = client.get_connection_info().clone();
        self.tls = Some(certs);
        Ok(self)
    }

    /// From a host name (or IP address) and port, without credentials.
    pub fn from_host(host: &str, port: u16) -> Result<Self, StoreConfigError> {
        if host.is_empty() {
            return Err(StoreConfigError::invalid("serviceFQDN", "empty"));
        }
        if port == 0 {
            return Err(StoreConfigError::invalid("servicePort", "must not be 0"));
        }
        let info = ConnectionAddr::Tcp(host.to_owned(), port)
            .into_connection_info()
            .map_err(|e| StoreConfigError::invalid("serviceFQDN", e.to_string()))?;
        Ok(Self::with_info(info))
    }

    /// From a pool's `lb_config`: `Ok(None)` when it names no Redis (no `serviceFQDN`), i.e. the
    /// pool uses the embedded store. Errors name the offending key.
    pub fn from_lb_config(c: &LbConfigFile) -> Result<Option<Self>, StoreConfigError> {
        let Some(fqdn) = c.serviceFQDN.as_deref() else {
            return Ok(None);
        };
        let fqdn = fqdn.trim();
        let is_url = fqdn.contains("://");
        let mut config = if is_url {
            if c.servicePort.is_some() {
                return Err(StoreConfigError::invalid(
                    "servicePort",
                    "not allowed when serviceFQDN is a URL; put the port in the URL",
                ));
            }
            Self::from_url(fqdn)?
        } else {
            Self::from_host(fqdn, c.servicePort.unwrap_or(6379))?
        };
        let files = TlsFiles::from_lb_config(c)?;
        match (c.tls, config.is_tls()) {
            (Some(false), true) => {
                return Err(StoreConfigError::invalid(
                    "tls",
                    "false contradicts the rediss:// URL",
                ))
            }
            (Some(true), false) if is_url => {
                return Err(StoreConfigError::invalid(
                    "tls",
                    "use a rediss:// URL for TLS (this one is not)",
                ))
            }
            (Some(true), _) | (_, true) => config = config.with_tls(files)?,
            (_, false) if !files.is_empty() => {
                let key = if c.tlsCaFile.is_some() {
                    "tlsCaFile"
                } else {
                    "tlsCertFile"
                };
                return Err(StoreConfigError::invalid(
                    key,
                    "only used with TLS (a rediss:// URL or tls: true)",
                ));
            }
            _ => {}
        }
        let (url_user, url_password, url_db) = {
            let r = config.info.redis_settings();
            (r.username().is_some(), r.password().is_some(), r.db() != 0)
        };
        let username = c.username.as_deref().filter(|u| !u.is_empty());
        let password = c.password.as_deref().filter(|p| !p.is_empty());
        if is_url && url_user && username.is_some() {
            return Err(StoreConfigError::invalid(
                "username",
                "also given in the serviceFQDN URL; give it once",
            ));
        }
        if is_url && url_password && password.is_some() {
            return Err(StoreConfigError::invalid(
                "password",
                "also given in the serviceFQDN URL; give it once",
            ));
        }
        if is_url && url_db && c.database.is_some() {
            return Err(StoreConfigError::invalid(
                "database",
                "also given in the serviceFQDN URL; give it once",
            ));
        }
        config = config.with_credentials(username, password);
        if let Some(db) = c.database {
            config = config.with_database(db)?;
        }
        if let Some(ms) = c.timeout {
            if ms > 0 {
                config = config.with_timeout(Duration::from_millis(ms))?;
            }
        }
        if let Some(prefix) = c.keyPrefix.as_deref() {
            config = config
                .with_namespace(prefix)
                .map_err(|e| e.rekey("keyPrefix"))?;
        }
        if let Some(ms) = c.replicaTimeout {
            if !(MIN_REPLICA_TIMEOUT_MS..=15_000).contains(&ms) {
                return Err(StoreConfigError::invalid(
                    "replicaTimeout",
                    format!("must be {MIN_REPLICA_TIMEOUT_MS}..=15000 ms, got {ms}"),
                ));
            }
            config = config.with_dead_replica_after(Duration::from_millis(ms))?;
        }
        if config.timeout * 2 > config.dead_after {
            return Err(StoreConfigError::invalid(
                "timeout",
                format!(
                    "{} ms is too long: it must be at most half of replicaTimeout ({} ms), or a \
                     slow Redis could let other replicas reap this one",
                    config.timeout.as_millis(),
                    config.dead_after.as_millis()
                ),
            ));
        }
        Ok(Some(config))
    }

    /// Set the ACL user and password (`None` keeps what the URL says).
    pub fn with_credentials(mut self, username: Option<&str>, password: Option<&str>) -> Self {
        let mut r = self.info.redis_settings().clone();
        if let Some(u) = username {
            r = r.set_username(u);
        }
        if let Some(p) = password {
            r = r.set_password(p);
        }
        self.info = self.info.set_redis_settings(r);
        self
    }

    /// Select a database (not 0 only on a standalone server).
    pub fn with_database(mut self, db: i64) -> Result<Self, StoreConfigError> {
        if db < 0 {
            return Err(StoreConfigError::invalid(
                "database",
                "must not be negative",
            ));
        }
        let r = self.info.redis_settings().clone().set_db(db);
        self.info = self.info.set_redis_settings(r);
        Ok(self)
    }

    /// Bound every call (including connecting) to `timeout` (more than 0, at most 60 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Result<Self, StoreConfigError> {
        if timeout.is_zero() || timeout > Duration::from_secs(60) {
            return Err(StoreConfigError::invalid(
                "timeout",
                "must be more than 0 ms and at most 60000 ms",
            ));
        }
        self.timeout = timeout;
        Ok(self)
    }

    /// Dead-replica timeout (more than 0, at most 15 s; default 10 s).
    pub fn with_dead_replica_after(mut self, d: Duration) -> Result<Self, StoreConfigError> {
        validate_dead_after(d)?;
        self.dead_after = d;
        Ok(self)
    }

    /// Key namespace (default `llmlb`): deployments sharing a Redis use different namespaces.
    pub fn with_namespace(mut self, ns: &str) -> Result<Self, StoreConfigError> {
        if ns.is_empty() || ns.contains(['{', '}']) || ns.chars().any(char::is_whitespace) {
            return Err(StoreConfigError::invalid(
                "namespace",
                "must be non-empty, without braces or whitespace",
            ));
        }
        self.namespace = ns.to_owned();
        Ok(self)
    }

    /// Use this replica id instead of a generated one (tests; ids must be unique per process).
    pub fn with_replica_id(mut self, id: &str) -> Result<Self, StoreConfigError> {
        validate_replica_id(id)?;
        self.replica_id = Some(id.to_owned());
        Ok(self)
    }

    /// Force standalone or cluster instead of detecting it.
    pub fn with_mode(mut self, mode: RedisMode) -> Self {
        self.mode = mode;
        self
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The address for logs: scheme, user, host, port and database, never the password.
    pub fn address(&self) -> String {
        let r = self.info.redis_settings();
        let user = r.username().map(|u| format!("{u}@")).unwrap_or_default();
        match self.info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                format!("redis://{user}{}/{}", host_port(host, *port), r.db())
            }
            ConnectionAddr::TcpTls { host, port, .. } => {
                format!("rediss://{user}{}/{}", host_port(host, *port), r.db())
            }
            ConnectionAddr::Unix(path) => {
                format!("redis+unix://{}?db={}", path.display(), r.db())
            }
            other => format!("{other}/{}", r.db()),
        }
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Describe a URL rejected by redis-rs without its credentials.
fn url_error(url: &str, e: &RedisError) -> String {
    let mut text = e.to_string();
    // redis-rs does not echo the URL today; scrub the user-info part in case a version does.
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if !userinfo.is_empty() {
            text = text.replace(userinfo, "***");
        }
    }
    text
}

/// A connection to a standalone server or a cluster; both are cheap, shareable handles.
#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The Lua prelude shared by the scripts that refresh the caller's heartbeat.
///
/// KEYS[1] inflight HASH `<replica>|<endpoint>` → n; KEYS[2] total HASH `<endpoint>` → n;
/// KEYS[3] replicas ZSET `<replica>` → last heartbeat (ms, Redis `TIME`).
/// ARGV[1] replica id, ARGV[2] dead-replica timeout (ms), ARGV[3] key TTL (ms).
macro_rules! prelude {
    () => {
        r#"
local inflight, totals, replicas = KEYS[1], KEYS[2], KEYS[3]
local me = ARGV[1]
local dead_after = tonumber(ARGV[2])
local key_ttl = tonumber(ARGV[3])

local function count(v)
  local n = tonumber(v) or 0
  if n < 0 then return 0 end
  return n
end

local function sub_total(ep, n)
  local t = count(redis.call('HGET', totals, ep)) - n
  if t > 0 then redis.call('HSET', totals, ep, t) else redis.call('HDEL', totals, ep) end
end

-- Refresh this replica's heartbeat, then forget every replica silent for longer than
-- dead_after, subtracting its contributions from the totals.
local function touch_and_reap()
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', replicas, now, me)
  local dead = redis.call('ZRANGEBYSCORE', replicas, '-inf', '(' .. (now - dead_after))
  if #dead == 0 then return end
  local gone = {}
  for _, r in ipairs(dead) do
    gone[r] = true
    redis.call('ZREM', replicas, r)
  end
  local all = redis.call('HGETALL', inflight)
  for i = 1, #all, 2 do
    local f = all[i]
    local sep = string.find(f, '|', 1, true)
    if sep and gone[string.sub(f, 1, sep - 1)] then
      sub_total(string.sub(f, sep + 1), count(all[i + 1]))
      redis.call('HDEL', inflight, f)
    end
  end
end

local function keep()
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], key_ttl) end
end
"#
    };
}

/// ARGV[4] random u32, ARGV[5] max in flight or "", ARGV[6..] candidates.
/// Returns {1-based index, new total} or {0, least} when saturated.
const ACQUIRE_LUA: &str = concat!(
    prelude!(),
    r#"
touch_and_reap()
local n = #ARGV - 5
local raw = redis.call('HMGET', totals, unpack(ARGV, 6))
local counts, least = {}, nil
for i = 1, n do
  local c = count(raw[i])
  counts[i] = c
  if least == nil or c < least then least = c end
end
local ties = 0
for i = 1, n do
  if counts[i] == least then ties = ties + 1 end
end
local want = tonumber(ARGV[4]) % ties
local pick = 1
for i = 1, n do
  if counts[i] == least then
    if want == 0 then
      pick = i
      break
    end
    want = want - 1
  end
end
if ARGV[5] ~= '' and least >= tonumber(ARGV[5]) then
  keep()
  return {0, least}
end
local ep = ARGV[5 + pick]
redis.call('HINCRBY', inflight, me .. '|' .. ep, 1)
local total = redis.call('HINCRBY', totals, ep, 1)
keep()
return {pick, total}
"#
);

/// KEYS[4..] the chain's block keys in order. ARGV[4] random u32, ARGV[5] max or "", ARGV[6] TTL
/// of block keys (ms), ARGV[7] guard absolute, ARGV[8] guard per mille, ARGV[9..] candidates.
/// Returns {1-based index, new total, matched, outcome (1 hit, 2 diverted, 3 miss)}, or
/// {0, least, matched, 0} when saturated. Mirrors `prefix_choice` and `MemoryStore`.
const PREFIX_LUA: &str = concat!(
    prelude!(),
    r#"
touch_and_reap()
local random = tonumber(ARGV[4])
local max = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local guard_abs, guard_pm = tonumber(ARGV[7]), tonumber(ARGV[8])
local cands, pos = {}, {}
for i = 9, #ARGV do
  cands[#cands + 1] = ARGV[i]
  pos[ARGV[i]] = #cands
end
local n = #cands
local raw = redis.call('HMGET', totals, unpack(cands))
local counts = {}
for i = 1, n do counts[i] = count(raw[i]) end

-- The least count among indices `idx` (ascending) and the (random mod ties)-th index having it.
local function least_of(idx)
  local lo = nil
  for _, i in ipairs(idx) do
    if lo == nil or counts[i] < lo then lo = counts[i] end
  end
  local ties = {}
  for _, i in ipairs(idx) do
    if counts[i] == lo then ties[#ties + 1] = i end
  end
  return ties[(random % #ties) + 1], lo
end

-- Longest run of chain keys with a candidate holder.
local matched, holders, current = 0, {}, {}
for k = 4, #KEYS do
  local v = redis.call('GET', KEYS[k])
  if not v then break end
  local list, mask = {}, {}
  for ep in string.gmatch(v, '[^,]+') do
    list[#list + 1] = ep
    if pos[ep] then mask[pos[ep]] = true end
  end
  current[k] = list
  local held = {}
  for i = 1, n do
    if mask[i] then held[#held + 1] = i end
  end
  if #held == 0 then break end
  matched = k - 3
  holders = held
end

local all = {}
for i = 1, n do all[i] = i end
local least_i, least = least_of(all)
local function full(i) return max ~= nil and counts[i] >= max end
local pick, outcome = least_i, 3
if #holders > 0 then
  local h, busy = least_of(holders)
  local extra = math.max(guard_abs, math.floor(least * guard_pm / 1000))
  if busy > least + extra or full(h) then
    outcome = 2
  else
    pick, outcome = h, 1
  end
end
if full(pick) then
  keep()
  return {0, least, matched, 0}
end
local ep = cands[pick]
redis.call('HINCRBY', inflight, me .. '|' .. ep, 1)
local total = redis.call('HINCRBY', totals, ep, 1)
keep()

-- Record the chosen endpoint as the first holder of every key of the chain.
for k = 4, #KEYS do
  local list = current[k]
  if list == nil then
    local v = redis.call('GET', KEYS[k])
    list = {}
    if v then
      for e in string.gmatch(v, '[^,]+') do list[#list + 1] = e end
    end
  end
  local out = {ep}
  for _, e in ipairs(list) do
    if e ~= ep and #out < MAX_HOLDERS then out[#out + 1] = e end
  end
  redis.call('SET', KEYS[k], table.concat(out, ','), 'PX', ttl)
end
return {pick, total, matched, outcome}
"#
);

/// KEYS[1] inflight, KEYS[2] total; ARGV[1] replica, ARGV[2] endpoint. Returns 1 when a count was
/// released, 0 when there was none (never goes below zero).
const RELEASE_LUA: &str = r#"
local f = ARGV[1] .. '|' .. ARGV[2]
local c = tonumber(redis.call('HGET', KEYS[1], f)) or 0
if c <= 0 then
  if c < 0 then redis.call('HDEL', KEYS[1], f) end
  return 0
end
if c <= 1 then redis.call('HDEL', KEYS[1], f) else redis.call('HINCRBY', KEYS[1], f, -1) end
local t = tonumber(redis.call('HGET', KEYS[2], ARGV[2])) or 0
if t <= 1 then redis.call('HDEL', KEYS[2], ARGV[2]) else redis.call('HINCRBY', KEYS[2], ARGV[2], -1) end
return 1
"#;

/// ARGV[4..] endpoints. Returns their totals.
const INFLIGHT_LUA: &str = concat!(
    prelude!(),
    r#"
touch_and_reap()
local raw = redis.call('HMGET', totals, unpack(ARGV, 4))
local out = {}
for i = 1, #ARGV - 3 do out[i] = count(raw[i]) end
keep()
return out
"#
);

/// Refresh, reap; with ARGV[4] = "restore", replace this replica's fields with the pairs
/// ARGV[5], ARGV[6], … (endpoint, count); then drop fields of replicas without a heartbeat and
/// recompute all totals.
const HEARTBEAT_LUA: &str = concat!(
    prelude!(),
    r#"
touch_and_reap()
if ARGV[4] == 'restore' then
  local mine = me .. '|'
  local fields = redis.call('HKEYS', inflight)
  for _, f in ipairs(fields) do
    if string.sub(f, 1, #mine) == mine then redis.call('HDEL', inflight, f) end
  end
  for i = 5, #ARGV - 1, 2 do
    local n = tonumber(ARGV[i + 1]) or 0
    if n > 0 then redis.call('HSET', inflight, mine .. ARGV[i], n) end
  end
end
local live = {}
for _, r in ipairs(redis.call('ZRANGE', replicas, 0, -1)) do live[r] = true end
local sums = {}
local all = redis.call('HGETALL', inflight)
for i = 1, #all, 2 do
  local f = all[i]
  local c = tonumber(all[i + 1]) or 0
  local sep = string.find(f, '|', 1, true)
  if sep == nil or c <= 0 or not live[string.sub(f, 1, sep - 1)] then
    redis.call('HDEL', inflight, f)
  else
    local ep = string.sub(f, sep + 1)
    sums[ep] = (sums[ep] or 0) + c
  end
end
local cur = redis.call('HGETALL', totals)
for i = 1, #cur, 2 do
  local ep = cur[i]
  local want = sums[ep]
  if want == nil then
    redis.call('HDEL', totals, ep)
  elseif tonumber(cur[i + 1]) ~= want then
    redis.call('HSET', totals, ep, want)
  end
  sums[ep] = nil
end
for ep, want in pairs(sums) do redis.call('HSET', totals, ep, want) end
keep()
return 1
"#
);

struct Scripts {
    acquire: Script,
    prefix: Script,
    release: Script,
    inflight: Script,
    heartbeat: Script,
}

/// The Redis store: one connection and one replica id. llm-lb makes one per pool that uses
/// Redis; share it behind an `Arc`.
pub struct RedisStore {
    config: RedisConfig,
    replica: String,
    conn: ArcSwapOption<Conn>,
    connecting: tokio::sync::Mutex<()>,
    scripts: Scripts,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("config", &self.config)
            .field("replica", &self.replica)
            .field("connected", &self.conn.load().is_some())
            .finish()
    }
}

/// The three keys of a pool, in the order the scripts expect, and the prefix of its block keys.
struct Keys {
    inflight: String,
    totals: String,
    replicas: String,
    /// `<ns>:{<pool>}:pfx:`; a block key appends its 16 hex digits.
    prefix: String,
}

impl RedisStore {
    /// A store for `config`. Does no I/O: the first call connects.
    pub fn new(config: RedisConfig) -> Self {
        let replica = config.replica_id.clone().unwrap_or_else(new_replica_id);
        RedisStore {
            config,
            replica,
            conn: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            scripts: Scripts {
                acquire: Script::new(ACQUIRE_LUA),
                prefix: Script::new(&PREFIX_LUA.replace("MAX_HOLDERS", &MAX_HOLDERS.to_string())),
                release: Script::new(RELEASE_LUA),
                inflight: Script::new(INFLIGHT_LUA),
                heartbeat: Script::new(HEARTBEAT_LUA),
            },
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// Connect now (within the timeout) instead of on the first call; `Ok` when connected.
    pub async fn connect(&self) -> Result<(), StoreError> {
        tokio::time::timeout(self.config.timeout, self.connection())
            .await
            .map_err(|_| StoreError::Timeout)?
            .map(|_| ())
    }

    /// `Some(true)` when connected to a Redis Cluster, `Some(false)` to a standalone server,
    /// `None` before the first successful connection.
    pub fn is_cluster(&self) -> Option<bool> {
        self.conn
            .load()
            .as_ref()
            .map(|c| matches!(**c, Conn::Cluster(_)))
    }

    /// The Redis keys of `pool`: `<ns>:{<pool>}:inflight`, `…:total`, `…:replicas`.
    pub fn keys(&self, pool: &str) -> [String; 3] {
        let k = self.pool_keys(pool);
        [k.inflight, k.totals, k.replicas]
    }

    fn pool_keys(&self, pool: &str) -> Keys {
        let prefix = format!("{}:{{{pool}}}:", self.config.namespace);
        Keys {
            inflight: format!("{prefix}inflight"),
            totals: format!("{prefix}total"),
            replicas: format!("{prefix}replicas"),
            prefix: format!("{prefix}pfx:"),
        }
    }

    /// The shared connection, opened on first use. Callers bound it with the timeout.
    async fn connection(&self) -> Result<Conn, StoreError> {
        if let Some(c) = self.conn.load().as_ref() {
            return Ok(Conn::clone(c));
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.conn.load().as_ref() {
            return Ok(Conn::clone(c));
        }
        let conn = self.open().await?;
        self.conn.store(Some(Arc::new(conn.clone())));
        log::info!(
            "state store connected to {} ({}) as replica {}",
            self.config.address(),
            match conn {
                Conn::Standalone(_) => "standalone",
                Conn::Cluster(_) => "cluster",
            },
            self.replica
        );
        Ok(conn)
    }

    async fn open(&self) -> Result<Conn, StoreError> {
        let t = self.config.timeout;
        let client = Client::open(self.config.info.clone()).map_err(map_err)?;
        let cluster = match self.config.mode {
            RedisMode::Standalone => false,
            RedisMode::Cluster => true,
            RedisMode::Auto => {
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(t))
                    .set_response_timeout(Some(t));
                let mut probe = client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .map_err(map_err)?;
                let info: String = ::redis::cmd("INFO")
                    .arg("cluster")
                    .query_async(&mut probe)
                    .await
                    .map_err(map_err)?;
                info.lines().any(|l| l.trim() == "cluster_enabled:1")
            }
        };
        if cluster {
            if self.config.info.redis_settings().db() != 0 {
                return Err(StoreError::Unavailable(
                    "Redis Cluster has only database 0".into(),
                ));
            }
            let mut builder = ClusterClientBuilder::new(vec![self.config.info.clone()]);
            if let Some(certs) = &self.config.tls {
                builder = builder.certs(certs.clone());
            }
            let conn = builder
                .connection_timeout(t)
                .response_timeout(t)
                .retries(2)
                .build()
                .map_err(map_err)?
                .get_async_connection()
                .await
                .map_err(map_err)?;
            Ok(Conn::Cluster(conn))
        } else {
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(t))
                .set_response_timeout(Some(t))
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(10))
                .set_max_delay(Duration::from_millis(200));
            let conn = ConnectionManager::new_with_config(client, cfg)
                .await
                .map_err(map_err)?;
            Ok(Conn::Standalone(conn))
        }
    }

    /// Run a script invocation within the timeout.
    async fn invoke<T: FromRedisValue>(&self, inv: &ScriptInvocation<'_>) -> Result<T, StoreError> {
        let call = async {
            let r = match self.connection().await? {
                Conn::Standalone(mut c) => inv.invoke_async(&mut c).await,
                Conn::Cluster(mut c) => inv.invoke_async(&mut c).await,
            };
            r.map_err(map_err)
        };
        tokio::time::timeout(self.config.timeout, call)
            .await
            .map_err(|_| StoreError::Timeout)?
    }

    /// A script invocation with all three keys and the common arguments.
    fn touching<'a>(&self, script: &'a Script, keys: &Keys) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(&keys.inflight)
            .key(&keys.totals)
            .key(&keys.replicas)
            .arg(&self.replica)
            .arg(millis(self.config.dead_after))
            .arg(millis(KEY_TTL));
        inv
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Classify a redis-rs error. Its text never contains the password.
fn map_err(e: RedisError) -> StoreError {
    if e.is_timeout() {
        return StoreError::Timeout;
    }
    match e.kind() {
        ErrorKind::Io
        | ErrorKind::AuthenticationFailed
        | ErrorKind::ClusterConnectionNotFound
        | ErrorKind::InvalidClientConfig
        | ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::NoPerm
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask,
        ) => StoreError::Unavailable(e.to_string()),
        _ if e.is_connection_dropped() || e.is_connection_refusal() => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Protocol(e.to_string()),
    }
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[async_trait]
impl InflightStore for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn replica_id(&self) -> &str {
        &self.replica
    }

    fn heartbeat_interval(&self) -> Duration {
        heartbeat_interval_for(self.config.dead_after)
    }

    fn call_timeout(&self) -> Option<Duration> {
        Some(self.config.timeout)
    }

    async fn acquire_least(
        &self,
        pool: &str,
        candidates: &[&str],
        max: Option<u64>,
    ) -> Result<Acquired, StoreError> {
        check_call(pool, candidates.len())?;
        let keys = self.pool_keys(pool);
        let mut inv = self.touching(&self.scripts.acquire, &keys);
        inv.arg(rand::random::<u32>());
        match max {
            Some(m) => inv.arg(m),
            None => inv.arg(""),
        };
        for c in candidates {
            inv.arg(*c);
        }
        let (pick, count): (i64, i64) = self.invoke(&inv).await?;
        if pick == 0 {
            return Err(StoreError::Saturated);
        }
        let index = usize::try_from(pick - 1)
            .ok()
            .filter(|i| *i < candidates.len())
            .ok_or_else(|| StoreError::Protocol(format!("acquire returned index {pick}")))?;
        Ok(Acquired {
            index,
            inflight: to_u64(count),
        })
    }

    async fn acquire_prefix(
        &self,
        pool: &str,
        q: PrefixQuery<'_>,
    ) -> Result<PrefixAcquired, StoreError> {
        check_call(pool, q.candidates.len())?;
        let keys = self.pool_keys(pool);
        let mut inv = self.touching(&self.scripts.prefix, &keys);
        for block in q.chain {
            inv.key(format!("{}{block:016x}", keys.prefix));
        }
        inv.arg(rand::random::<u32>());
        match q.max {
            Some(m) => inv.arg(m),
            None => inv.arg(""),
        };
        inv.arg(millis(q.ttl).max(1))
            .arg(q.guard.absolute)
            .arg(q.guard.per_mille);
        for c in q.candidates {
            inv.arg(*c);
        }
        let (pick, count, matched, outcome): (i64, i64, i64, i64) = self.invoke(&inv).await?;
        if pick == 0 {
            return Err(StoreError::Saturated);
        }
        let index = usize::try_from(pick - 1)
            .ok()
            .filter(|i| *i < q.candidates.len())
            .ok_or_else(|| StoreError::Protocol(format!("prefix returned index {pick}")))?;
        let outcome = match outcome {
            1 => PrefixOutcome::Hit,
            2 => PrefixOutcome::Diverted,
            3 => PrefixOutcome::Miss,
            other => {
                return Err(StoreError::Protocol(format!(
                    "prefix returned outcome {other}"
                )))
            }
        };
        Ok(PrefixAcquired {
            index,
            inflight: to_u64(count),
            matched: usize::try_from(matched).unwrap_or(0),
            outcome,
        })
    }

    async fn release(&self, pool: &str, endpoint: &str) -> Result<(), StoreError> {
        check_call(pool, 1)?;
        let keys = self.pool_keys(pool);
        let mut inv = self.scripts.release.prepare_invoke();
        inv.key(&keys.inflight)
            .key(&keys.totals)
            .arg(&self.replica)
            .arg(endpoint);
        let _released: i64 = self.invoke(&inv).await?;
        Ok(())
    }

    async fn inflight(&self, pool: &str, endpoints: &[&str]) -> Result<Vec<u64>, StoreError> {
        check_call(pool, 1)?;
        if endpoints.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.pool_keys(pool);
        let mut inv = self.touching(&self.scripts.inflight, &keys);
        for e in endpoints {
            inv.arg(*e);
        }
        let counts: Vec<i64> = self.invoke(&inv).await?;
        if counts.len() != endpoints.len() {
            return Err(StoreError::Protocol(format!(
                "inflight returned {} counts for {} endpoints",
                counts.len(),
                endpoints.len()
            )));
        }
        Ok(counts.into_iter().map(to_u64).collect())
    }

    async fn heartbeat(&self, pool: &str) -> Result<(), StoreError> {
        check_call(pool, 1)?;
        let keys = self.pool_keys(pool);
        let inv = self.touching(&self.scripts.heartbeat, &keys);
        let _: i64 = self.invoke(&inv).await?;
        Ok(())
    }

    async fn restore(&self, pool: &str, held: &[(&str, u64)]) -> Result<(), StoreError> {
        check_call(pool, 1)?;
        let keys = self.pool_keys(pool);
        let mut inv = self.touching(&self.scripts.heartbeat, &keys);
        inv.arg("restore");
        for (endpoint, n) in held {
            inv.arg(*endpoint).arg(*n);
        }
        let _: i64 = self.invoke(&inv).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lb(yaml: &str) -> LbConfigFile {
        serde_yaml::from_str(yaml).expect("lb_config yaml")
    }

    fn err(yaml: &str) -> String {
        match RedisConfig::from_lb_config(&lb(yaml)) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn cfg(yaml: &str) -> RedisConfig {
        RedisConfig::from_lb_config(&lb(yaml))
            .expect("valid")
            .expect("redis configured")
    }

    #[test]
    fn no_service_fqdn_means_embedded() {
        assert!(RedisConfig::from_lb_config(&lb("{maxRequestCount: 3}"))
            .expect("valid")
            .is_none());
    }

    #[test]
    fn higress_keys() {
        let c = cfg(
            "{serviceFQDN: redis.default.svc, servicePort: 6380, username: u, password: s3cret, \
             database: 2, timeout: 75}",
        );
        assert_eq!(c.address(), "redis://u@redis.default.svc:6380/2");
        assert_eq!(c.timeout(), Duration::from_millis(75));
        let r = c.info.redis_settings();
        assert_eq!(r.password(), Some("s3cret"));
        assert_eq!(r.username(), Some("u"));
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn defaults_port_timeout_and_empty_credentials() {
        let c = cfg("{serviceFQDN: 10.0.0.5, username: default, password: '', timeout: 0}");
        assert_eq!(c.address(), "redis://default@10.0.0.5:6379/0");
        assert_eq!(c.timeout(), DEFAULT_TIMEOUT);
        assert_eq!(c.info.redis_settings().password(), None);
    }

    #[test]
    fn url_in_service_fqdn() {
        let c = cfg("{serviceFQDN: 'redis://app:p%40ss@cache:7000/3'}");
        assert_eq!(c.address(), "redis://app@cache:7000/3");
        assert_eq!(c.info.redis_settings().password(), Some("p@ss"));
        // Password kept out of the URL.
        let c = cfg("{serviceFQDN: 'redis://cache', password: hunter2, database: 1}");
        assert_eq!(c.address(), "redis://cache:6379/1");
        assert_eq!(c.info.redis_settings().password(), Some("hunter2"));
        let c = cfg("{serviceFQDN: 'redis://[::1]:7001'}");
        assert_eq!(c.address(), "redis://[::1]:7001/0");
    }

    #[test]
    fn url_conflicts_name_the_key() {
        assert!(err("{serviceFQDN: 'redis://h:1', servicePort: 2}").starts_with("servicePort:"));
        assert!(err("{serviceFQDN: 'redis://:a@h', password: b}").starts_with("password:"));
        assert!(err("{serviceFQDN: 'redis://u@h', username: v}").starts_with("username:"));
        assert!(err("{serviceFQDN: 'redis://h/1', database: 2}").starts_with("database:"));
    }

    #[test]
    fn bad_values_are_rejected_without_echoing_secrets() {
        let e = err("{serviceFQDN: 'redis://u:topsecret@', servicePort: null}");
        assert!(e.starts_with("serviceFQDN:"), "{e}");
        assert!(!e.contains("topsecret"), "{e}");
        assert!(err("{serviceFQDN: ''}").starts_with("serviceFQDN:"));
        assert!(err("{serviceFQDN: h, servicePort: 0}").starts_with("servicePort:"));
        assert!(err("{serviceFQDN: h, database: -1}").starts_with("database:"));
        assert!(err("{serviceFQDN: h, timeout: 600000}").starts_with("timeout:"));
        // Replica timeout in ms, bounded; the call timeout must fit twice into it.
        assert!(err("{serviceFQDN: h, replicaTimeout: 500}")
            .starts_with("replicaTimeout: must be 1000..=15000 ms"));
        assert!(err("{serviceFQDN: h, replicaTimeout: 20000}").starts_with("replicaTimeout:"));
        assert!(err("{serviceFQDN: h, timeout: 6000}").starts_with("timeout: 6000 ms is too long"));
        assert!(
            err("{serviceFQDN: h, timeout: 1000, replicaTimeout: 1500}").starts_with("timeout:")
        );
        assert_eq!(
            cfg("{serviceFQDN: h, timeout: 1000, replicaTimeout: 2000}").timeout(),
            Duration::from_millis(1000)
        );
        assert!(err("{serviceFQDN: 'http://h'}").starts_with("serviceFQDN:"));
    }

    /// A CA certificate (public part only) for parsing tests; nothing is signed with it.
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBkjCCATmgAwIBAgIUbuHhuDaP1rFt8sUK015V6B1XzTgwCgYIKoZIzj0EAwIw\nHjEcMBoGA1UEAwwTbGxtLWxiIHVuaXQtdGVzdCBDQTAgFw0yNjExMjExNTMwMTBa\nGA8yMTI2MTAyODE1MzAxMFowHjEcMBoGA1UEAwwTbGxtLWxiIHVuaXQtdGVzdCBD\nQTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABCG3nJ2J0XZ1C7F0HUgb1YayssiY\npqJFrkZZETs6G66We92CGRtu9WHZ/w8ICrhIwkmV1NBBCVYI2Fu2hJS7q4mjUzBR\nMB0GA1UdDgQWBBQgV5kJql7dyZNcXk7bn2ul9CqXIjAfBgNVHSMEGDAWgBQgV5kJ\nql7dyZNcXk7bn2ul9CqXIjAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cA\nMEQCID3s7d0DyIZCINTujkEna2WBgwdnwVaVNRyxzQRyRN8sAiAdtZZTSDQqeY8h\nMH4DIhARcMsNWRw4WNDpZ0BAx22vtg==\n-----END CERTIFICATE-----";

    fn ca_file() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp");
        std::io::Write::write_all(&mut f, TEST_CA.as_bytes()).expect("write");
        f
    }

    #[test]
    fn rediss_is_tls_with_verification() {
        let c = cfg("{serviceFQDN: 'rediss://u:pw@h:6380'}");
        assert!(c.is_tls());
        assert_eq!(c.address(), "rediss://u@h:6380/0");
        assert!(!format!("{c:?}").contains("pw"));
        // Host-name form with the llm-lb key, and a CA bundle.
        let ca = ca_file();
        let c = cfg(&format!(
            "{{serviceFQDN: h, servicePort: 6380, tls: true, tlsCaFile: '{}'}}",
            ca.path().display()
        ));
        assert!(c.is_tls());
        assert_eq!(c.address(), "rediss://h:6380/0");
        assert!(!cfg("{serviceFQDN: h}").is_tls());
        assert!(!cfg("{serviceFQDN: h, tls: false}").is_tls());
    }

    #[test]
    fn tls_settings_are_checked_at_load() {
        // Verification cannot be switched off.
        let e = err("{serviceFQDN: 'rediss://h:6380/#insecure'}");
        assert!(
            e.starts_with("serviceFQDN:") && e.contains("tlsCaFile"),
            "{e}"
        );
        assert!(err("{serviceFQDN: 'rediss://h', tls: false}").starts_with("tls:"));
        assert!(err("{serviceFQDN: 'redis://h', tls: true}").starts_with("tls:"));
        assert!(err("{serviceFQDN: h, tlsCaFile: /x.pem}").starts_with("tlsCaFile:"));
        assert!(
            err("{serviceFQDN: h, tls: true, tlsCaFile: /nonexistent/ca.pem}")
                .starts_with("tlsCaFile: cannot read")
        );
        let mut junk = tempfile::NamedTempFile::new().expect("temp");
        std::io::Write::write_all(&mut junk, b"not a certificate").expect("write");
        let e = err(&format!(
            "{{serviceFQDN: h, tls: true, tlsCaFile: '{}'}}",
            junk.path().display()
        ));
        assert!(e.starts_with("tlsCaFile: no PEM CERTIFICATE"), "{e}");
        let ca = ca_file();
        let p = ca.path().display();
        assert!(err(&format!(
            "{{serviceFQDN: h, tls: true, tlsCertFile: '{p}'}}"
        ))
        .starts_with("tlsKeyFile: required"));
        // A certificate is not a private key.
        assert!(err(&format!(
            "{{serviceFQDN: h, tls: true, tlsCertFile: '{p}', tlsKeyFile: '{p}'}}"
        ))
        .starts_with("tlsKeyFile: no PEM PRIVATE KEY"));
        assert!(err("{serviceFQDN: 'redis+unix:///tmp/r.sock', tls: true}").starts_with("tls:"));
    }

    #[test]
    fn builder_validation() {
        let c = RedisConfig::from_host("h", 1).expect("host");
        assert!(c.clone().with_namespace("a{b").is_err());
        assert!(c.clone().with_namespace("").is_err());
        assert!(c
            .clone()
            .with_dead_replica_after(Duration::from_secs(20))
            .is_err());
        assert!(c.clone().with_replica_id("a|b").is_err());
        let s = RedisStore::new(c.with_namespace("tenant1").expect("ns"));
        assert_eq!(
            s.keys("llama"),
            [
                "tenant1:{llama}:inflight".to_owned(),
                "tenant1:{llama}:total".to_owned(),
                "tenant1:{llama}:replicas".to_owned()
            ]
        );
    }

    #[test]
    fn scripts_are_distinct_and_declare_keys() {
        for s in [ACQUIRE_LUA, INFLIGHT_LUA, HEARTBEAT_LUA, RELEASE_LUA] {
            assert!(s.contains("KEYS[1]"));
            assert!(!s.contains("math.random"), "no Lua RNG");
        }
    }

    #[tokio::test]
    async fn unreachable_redis_fails_within_the_timeout() {
        // Port 1 on loopback: connection refused at once.
        let c = RedisConfig::from_host("127.0.0.1", 1)
            .expect("host")
            .with_timeout(Duration::from_millis(100))
            .expect("timeout");
        let s = RedisStore::new(c);
        let start = std::time::Instant::now();
        let e = s
            .acquire_least("p", &["a"], None)
            .await
            .expect_err("no redis");
        assert!(e.is_store_failure(), "{e}");
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(s.is_cluster(), None);
    }
}
