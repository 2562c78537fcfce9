//! [`InflightStore`] on Redis or Redis Cluster (redis-rs): every gateway replica pointed at the same
//! Redis shares the counts.
//!
//! Configuration (Higress keys, URLs, TLS) is validated by [`crate::config::RedisConfig`].
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
//! Six Lua scripts, loaded by SHA (`EVALSHA`; redis-rs sends `SCRIPT LOAD` and retries once when
//! Redis answers `NOSCRIPT`, e.g. after a restart or `SCRIPT FLUSH`). Every key a script touches is
//! in `KEYS` and shares the pool's hash tag. `ARGV` starts with the replica id, the dead-replica
//! timeout, the key TTL (ms) and this replica's releases not yet sent for the scripts that refresh
//! the heartbeat, which apply those releases first.
//!
//! **Releases** cost no round trip of their own: [`InflightStore::release_n`] records them, and
//! the next script of the pool applies them (each takes at most what this replica holds on the
//! endpoint, so a count never goes negative nor takes another replica's share) —
//! [`InflightStore::flush`] sends them alone when no call comes (the caller decides when: see
//! [`crate::store::PoolCounts`]). A call that fails takes its releases with it; the next restore
//! sets this replica's counts to what it holds, which they are already deducted from.
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
//! - **cost** (`KEYS` as acquire, then the sticky key if any; `ARGV` … random, load and tie per
//!   mille, n, sticky TTL and guard, candidates, base costs, weights, scales): `acquire_cost`'s
//!   choice (least `scale × (base × 1000 + load × total)`, near-ties at random), or the sticky
//!   key's endpoint unless too busy, which then becomes the key's only holder; counts the weight.
//! - **remember** (`KEYS` one block key; `ARGV` endpoint, TTL): the endpoint becomes the key's
//!   first holder, as **prefix** records a chain; nothing is counted.
//! - **inflight** (`KEYS` as acquire; `ARGV` … endpoints…): refresh, reap, `HMGET` the totals
//!   (with no endpoint: a flush of the releases).
//! - **heartbeat** (`KEYS` as acquire): refresh, reap, then drop fields of replicas that have no
//!   heartbeat and recompute every total from the remaining fields. With `ARGV[5] = "restore"`
//!   it first replaces this replica's fields with the (endpoint, count) pairs that follow.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{
    AsyncConnectionConfig, Client, ErrorKind, FromRedisValue, RedisError, Script, ScriptInvocation,
    ServerErrorKind,
};
use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use parking_lot::Mutex;

use super::{
    check_call, check_cost, heartbeat_interval_for, new_replica_id, Acquired, CostAcquired,
    CostQuery, InflightStore, PrefixAcquired, PrefixOutcome, PrefixQuery, StoreError, KEY_TTL,
    MAX_HOLDERS,
};
use crate::config::{RedisConfig, RedisMode};

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
/// ARGV[1] replica id, ARGV[2] dead-replica timeout (ms), ARGV[3] key TTL (ms), or 0 for a call
/// that neither refreshes the heartbeat and the keys' TTL nor reaps (one of this replica did
/// less than [`TOUCH_EVERY`] ago), ARGV[4] this replica's releases not yet applied, as lines
/// `<endpoint> <units>` (may be empty).
macro_rules! prelude {
    () => {
        r#"
local inflight, totals, replicas = KEYS[1], KEYS[2], KEYS[3]
local me = ARGV[1]
local dead_after = tonumber(ARGV[2])
local key_ttl = tonumber(ARGV[3])
local touch = key_ttl > 0

local function count(v)
  local n = tonumber(v) or 0
  if n < 0 then return 0 end
  return n
end

local function sub_total(ep, n)
  local t = count(redis.call('HGET', totals, ep)) - n
  if t > 0 then redis.call('HSET', totals, ep, t) else redis.call('HDEL', totals, ep) end
end

-- Apply this replica's releases: each takes at most what this replica holds on the endpoint
-- (a count never goes below zero, nor takes another replica's share).
local function apply_releases()
  for ep, units in string.gmatch(ARGV[4], '([^ \n]+) (%d+)\n') do
    local f = me .. '|' .. ep
    local c = count(redis.call('HGET', inflight, f))
    local n = math.min(c, tonumber(units))
    if c <= n then redis.call('HDEL', inflight, f) else redis.call('HINCRBY', inflight, f, -n) end
    if n > 0 then sub_total(ep, n) end
  end
end

-- Apply this replica's releases; when touching, refresh its heartbeat, then forget every
-- replica silent for longer than dead_after, subtracting its contributions from the totals.
local function touch_and_reap()
  apply_releases()
  if not touch then return end
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
  if not touch then return end
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], key_ttl) end
end
"#
    };
}

/// ARGV[5] random u32, ARGV[6] max in flight or "", ARGV[7..] candidates.
/// Returns {1-based index, new total} or {0, least} when saturated.
const ACQUIRE_LUA: &str = concat!(
    prelude!(),
    r#"
touch_and_reap()
local n = #ARGV - 6
local raw = redis.call('HMGET', totals, unpack(ARGV, 7))
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
local want = tonumber(ARGV[5]) % ties
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
if ARGV[6] ~= '' and least >= tonumber(ARGV[6]) then
  keep()
  return {0, least}
end
local ep = ARGV[6 + pick]
redis.call('HINCRBY', inflight, me .. '|' .. ep, 1)
local total = redis.call('HINCRBY', totals, ep, 1)
keep()
return {pick, total}
"#
);

/// KEYS[4..] the chain's block keys in order. ARGV[5] random u32, ARGV[6] max or "", ARGV[7] TTL
/// of block keys (ms), ARGV[8] guard absolute, ARGV[9] guard per mille, ARGV[10] "1" to record
/// the chosen endpoint as the keys' only holder (else "0"), ARGV[11..] candidates.
/// Returns {1-based index, new total, matched, outcome (1 hit, 2 diverted, 3 miss)}, or
/// {0, least, matched, 0} when saturated. Mirrors `prefix_choice` and `MemoryStore`.
const PREFIX_LUA: &str = concat!(
    prelude!(),
    r#"
touch_and_reap()
local random = tonumber(ARGV[5])
local max = tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])
local guard_abs, guard_pm = tonumber(ARGV[8]), tonumber(ARGV[9])
local sole = ARGV[10] == '1'
local cands, pos = {}, {}
for i = 11, #ARGV do
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

-- Record the chosen endpoint as the first holder of every key of the chain (the only one when
-- sole).
for k = 4, #KEYS do
  local list = current[k]
  if sole then
    list = {}
  elseif list == nil then
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

/// KEYS[1] a block key; ARGV[1] the endpoint, ARGV[2] TTL (ms). The endpoint becomes the key's
/// first holder, as the prefix script records a chain. Mirrors `MemoryStore::remember`.
const REMEMBER_LUA: &str = r#"
local ep = ARGV[1]
local out = {ep}
local v = redis.call('GET', KEYS[1])
if v then
  for e in string.gmatch(v, '[^,]+') do
    if e ~= ep and #out < MAX_HOLDERS then out[#out + 1] = e end
  end
end
redis.call('SET', KEYS[1], table.concat(out, ','), 'PX', tonumber(ARGV[2]))
return 1
"#;

/// ARGV[5] random u32, ARGV[6] load per mille, ARGV[7] tie per mille, ARGV[8] n, ARGV[9] the
/// sticky key's TTL (ms) or "" without one (else KEYS[4] is the sticky key), ARGV[10] and
/// ARGV[11] its guard (absolute, per mille); then n candidates, n base costs, n weights and
/// optionally n scales. Returns {1-based index, new total, sticky outcome (0 none, 1 hit,
/// 2 diverted, 3 miss)}. Mirrors `cost_choice` and `sticky_choice`.
const COST_LUA: &str = concat!(
    prelude!(),
    r#"
touch_and_reap()
local random, load_pm, tie_pm = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local n = tonumber(ARGV[8])
local at = 11
local raw = redis.call('HMGET', totals, unpack(ARGV, at + 1, at + n))
local counts, costs, least = {}, {}, nil
local scaled = #ARGV >= at + 4 * n
for i = 1, n do
  counts[i] = count(raw[i])
  local c = tonumber(ARGV[at + n + i]) * 1000 + load_pm * counts[i]
  if scaled then c = c * tonumber(ARGV[at + 3 * n + i]) end
  costs[i] = c
  if least == nil or c < least then least = c end
end
local within = least + math.floor(least * tie_pm / 1000)
local ties = 0
for i = 1, n do
  if costs[i] <= within then ties = ties + 1 end
end
local want = random % ties
local pick = 1
for i = 1, n do
  if costs[i] <= within then
    if want == 0 then
      pick = i
      break
    end
    want = want - 1
  end
end
local outcome = 0
local sticky_ttl = tonumber(ARGV[9])
if sticky_ttl then
  local held = {}
  local v = redis.call('GET', KEYS[4])
  if v then
    for e in string.gmatch(v, '[^,]+') do held[e] = true end
  end
  local h, lo = nil, nil
  for i = 1, n do
    if lo == nil or counts[i] < lo then lo = counts[i] end
    if held[ARGV[at + i]] and (h == nil or counts[i] < counts[h]) then h = i end
  end
  if h == nil then
    outcome = 3
  else
    local extra = math.max(tonumber(ARGV[10]), math.floor(lo * tonumber(ARGV[11]) / 1000))
    if counts[h] > lo + extra then
      outcome = 2
    else
      pick, outcome = h, 1
    end
  end
  redis.call('SET', KEYS[4], ARGV[at + pick], 'PX', sticky_ttl)
end
local ep = ARGV[at + pick]
local w = math.max(1, tonumber(ARGV[at + 2 * n + pick]))
redis.call('HINCRBY', inflight, me .. '|' .. ep, w)
local total = redis.call('HINCRBY', totals, ep, w)
keep()
return {pick, total, outcome}
"#
);

/// ARGV[5..] endpoints (none: only this replica's releases and heartbeat). Returns their
/// totals.
const INFLIGHT_LUA: &str = concat!(
    prelude!(),
    r#"
touch_and_reap()
local out = {}
if #ARGV > 4 then
  local raw = redis.call('HMGET', totals, unpack(ARGV, 5))
  for i = 1, #ARGV - 4 do out[i] = count(raw[i]) end
end
keep()
return out
"#
);

/// Refresh, reap; with ARGV[5] = "restore", replace this replica's fields with the pairs
/// ARGV[6], ARGV[7], … (endpoint, count); then drop fields of replicas without a heartbeat and
/// recompute all totals.
const HEARTBEAT_LUA: &str = concat!(
    prelude!(),
    r#"
touch_and_reap()
if ARGV[5] == 'restore' then
  local mine = me .. '|'
  local fields = redis.call('HKEYS', inflight)
  for _, f in ipairs(fields) do
    if string.sub(f, 1, #mine) == mine then redis.call('HDEL', inflight, f) end
  end
  for i = 6, #ARGV - 1, 2 do
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
    cost: Script,
    remember: Script,
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
    /// What this replica has not told Redis yet, per pool.
    pools: Mutex<HashMap<String, PoolState>>,
}

/// A pool's releases not sent yet, and when a call last refreshed the heartbeat.
#[derive(Default)]
struct PoolState {
    /// Per endpoint: units released and not yet sent (they go with the next call).
    unsent: HashMap<String, u64>,
    /// When a call last refreshed this replica's heartbeat and the keys' TTL, and reaped.
    touched: Option<Instant>,
}

/// Calls refresh the heartbeat, the keys' TTL and reap at most this often (the heartbeat loop
/// every second regardless): each refresh is three Redis commands, a reap two more.
const TOUCH_EVERY: Duration = Duration::from_millis(100);

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
        let replica = config
            .replica_id()
            .map_or_else(new_replica_id, str::to_owned);
        RedisStore {
            config,
            replica,
            conn: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            pools: Mutex::new(HashMap::new()),
            scripts: Scripts {
                acquire: Script::new(ACQUIRE_LUA),
                prefix: Script::new(&PREFIX_LUA.replace("MAX_HOLDERS", &MAX_HOLDERS.to_string())),
                cost: Script::new(COST_LUA),
                remember: Script::new(
                    &REMEMBER_LUA.replace("MAX_HOLDERS", &MAX_HOLDERS.to_string()),
                ),
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
        tokio::time::timeout(self.config.timeout(), self.connection())
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
        let prefix = format!("{}:{{{pool}}}:", self.config.namespace());
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
        let t = self.config.timeout();
        let client = Client::open(self.config.connection_info().clone()).map_err(map_err)?;
        let cluster = match self.config.mode() {
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
            if self.config.connection_info().redis_settings().db() != 0 {
                return Err(StoreError::Unavailable(
                    "Redis Cluster has only database 0".into(),
                ));
            }
            let mut builder =
                ClusterClientBuilder::new(vec![self.config.connection_info().clone()]);
            if let Some(certs) = self.config.tls_certificates() {
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
        tokio::time::timeout(self.config.timeout(), call)
            .await
            .map_err(|_| StoreError::Timeout)?
    }

    /// A script invocation with all three keys and the common arguments, carrying the releases
    /// of `pool` not sent yet (which the script applies first). It refreshes this replica's
    /// heartbeat and the keys' TTL, and reaps, when `always` or when no call of this replica
    /// did for [`TOUCH_EVERY`]: picks at thousands a second need not each do it.
    fn touching<'a>(
        &self,
        script: &'a Script,
        pool: &str,
        keys: &Keys,
        always: bool,
    ) -> ScriptInvocation<'a> {
        let mut releases = String::new();
        let touch = {
            let mut pools = self.pools.lock();
            let state = pools.entry(pool.to_owned()).or_default();
            for (endpoint, n) in state.unsent.drain() {
                releases.push_str(&endpoint);
                releases.push(' ');
                releases.push_str(&n.to_string());
                releases.push('\n');
            }
            let now = Instant::now();
            let due = always
                || state
                    .touched
                    .is_none_or(|t| now.saturating_duration_since(t) >= TOUCH_EVERY);
            if due {
                state.touched = Some(now);
            }
            due
        };
        let mut inv = script.prepare_invoke();
        inv.key(&keys.inflight)
            .key(&keys.totals)
            .key(&keys.replicas)
            .arg(&self.replica)
            .arg(millis(self.config.dead_replica_after()))
            .arg(if touch { millis(KEY_TTL) } else { 0 })
            .arg(releases);
        inv
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Classify a redis-rs error. Its text never contains the password.
// Foreign, non-exhaustive enum (redis's ErrorKind): the kinds not listed all mean a dropped
// connection or a bad reply.
#[allow(clippy::wildcard_enum_match_arm)]
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
        heartbeat_interval_for(self.config.dead_replica_after())
    }

    fn call_timeout(&self) -> Option<Duration> {
        Some(self.config.timeout())
    }

    async fn acquire_least(
        &self,
        pool: &str,
        candidates: &[&str],
        max: Option<u64>,
    ) -> Result<Acquired, StoreError> {
        check_call(pool, candidates.len())?;
        let keys = self.pool_keys(pool);
        let mut inv = self.touching(&self.scripts.acquire, pool, &keys, false);
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
        let mut inv = self.touching(&self.scripts.prefix, pool, &keys, false);
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
            .arg(q.guard.per_mille)
            .arg(if q.sole { "1" } else { "0" });
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

    async fn acquire_cost(&self, pool: &str, q: CostQuery<'_>) -> Result<CostAcquired, StoreError> {
        check_cost(pool, &q)?;
        let keys = self.pool_keys(pool);
        let mut inv = self.touching(&self.scripts.cost, pool, &keys, false);
        inv.arg(rand::random::<u32>())
            .arg(q.load_per_mille)
            .arg(q.tie_per_mille)
            .arg(q.candidates.len());
        match q.sticky {
            Some(s) => {
                inv.key(format!("{}{:016x}", keys.prefix, s.key))
                    .arg(millis(s.ttl).max(1))
                    .arg(s.guard.absolute)
                    .arg(s.guard.per_mille);
            }
            None => {
                inv.arg("").arg(0).arg(0);
            }
        }
        for c in q.candidates {
            inv.arg(*c);
        }
        for b in q.base {
            inv.arg(*b);
        }
        for w in q.weights {
            inv.arg(*w);
        }
        for m in q.scale {
            inv.arg(*m);
        }
        let (pick, count, outcome): (i64, i64, i64) = self.invoke(&inv).await?;
        let index = usize::try_from(pick - 1)
            .ok()
            .filter(|i| *i < q.candidates.len())
            .ok_or_else(|| StoreError::Protocol(format!("cost returned index {pick}")))?;
        let sticky = match (q.sticky, outcome) {
            (None, 0) => None,
            (Some(_), 1) => Some(PrefixOutcome::Hit),
            (Some(_), 2) => Some(PrefixOutcome::Diverted),
            (Some(_), 3) => Some(PrefixOutcome::Miss),
            (_, o) => return Err(StoreError::Protocol(format!("cost returned outcome {o}"))),
        };
        Ok(CostAcquired {
            index,
            inflight: to_u64(count),
            sticky,
        })
    }

    async fn remember(
        &self,
        pool: &str,
        key: u64,
        endpoint: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        check_call(pool, 1)?;
        let keys = self.pool_keys(pool);
        let mut inv = self.scripts.remember.prepare_invoke();
        inv.key(format!("{}{key:016x}", keys.prefix))
            .arg(endpoint)
            .arg(millis(ttl).max(1));
        let _: i64 = self.invoke(&inv).await?;
        Ok(())
    }

    async fn release_n(&self, pool: &str, endpoint: &str, n: u64) -> Result<(), StoreError> {
        check_call(pool, 1)?;
        if n > 0 {
            let mut pools = self.pools.lock();
            let units = pools
                .entry(pool.to_owned())
                .or_default()
                .unsent
                .entry(endpoint.to_owned())
                .or_default();
            *units = units.saturating_add(n);
        }
        Ok(())
    }

    fn defers_releases(&self) -> bool {
        true
    }

    async fn flush(&self, pool: &str) -> Result<bool, StoreError> {
        check_call(pool, 1)?;
        if self
            .pools
            .lock()
            .get(pool)
            .is_none_or(|p| p.unsent.is_empty())
        {
            return Ok(false);
        }
        let keys = self.pool_keys(pool);
        let inv = self.touching(&self.scripts.inflight, pool, &keys, false);
        let _: Vec<i64> = self.invoke(&inv).await?;
        Ok(true)
    }

    async fn inflight(&self, pool: &str, endpoints: &[&str]) -> Result<Vec<u64>, StoreError> {
        check_call(pool, 1)?;
        if endpoints.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.pool_keys(pool);
        let mut inv = self.touching(&self.scripts.inflight, pool, &keys, false);
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
        let inv = self.touching(&self.scripts.heartbeat, pool, &keys, true);
        let _: i64 = self.invoke(&inv).await?;
        Ok(())
    }

    async fn restore(&self, pool: &str, held: &[(&str, u64)]) -> Result<(), StoreError> {
        check_call(pool, 1)?;
        let keys = self.pool_keys(pool);
        let mut inv = self.touching(&self.scripts.heartbeat, pool, &keys, true);
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
    use crate::config::RedisConfig;

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
        for s in [ACQUIRE_LUA, COST_LUA, INFLIGHT_LUA, HEARTBEAT_LUA] {
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
