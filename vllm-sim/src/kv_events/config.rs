//! vLLM's `KVEventsConfig` (`vllm/config/kv_events.py`, vLLM 0.34.0): the JSON of
//! `--kv-events-config`, with the same keys and defaults. As vLLM's pydantic config, an
//! unknown key is an error.
//!
//! Two settings are the simulator's own and are not keys of that JSON: the wire layout to
//! reproduce ([`KvEventsWire`]) and the block-hash encoding ([`BlockHashFormat`], vLLM's
//! environment variable `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use serde::Deserialize;

use super::KvEventsError;

/// vLLM's default PUB endpoint: bind port 5557 on every interface.
pub const DEFAULT_ENDPOINT: &str = "tcp://*:5557";

/// `--kv-events-config`: vLLM's `KVEventsConfig`, key for key.
///
/// vLLM publishes events only when `enable_kv_cache_events` is true and `publisher` is
/// `"zmq"` (the default once events are enabled); `"null"` or `false` publish nothing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvEventsConfig {
    /// Track block storage and removal (default false).
    pub enable_kv_cache_events: bool,
    /// `"zmq"` or `"null"`; unset means `"zmq"` when events are enabled, else `"null"`.
    pub publisher: Option<Publisher>,
    /// The PUB socket's endpoint (default `tcp://*:5557`). As in vLLM it is **bound** when it
    /// contains `*` or `::` (`tcp://*:5557`, `tcp://[::1]:5557`) and otherwise **connected**
    /// (`tcp://127.0.0.1:5557` connects to a subscriber that binds there). Port 0 binds any
    /// free port (see [`crate::SimHandle::kv_events`]).
    pub endpoint: String,
    /// The ROUTER socket that serves replays, always bound (default none).
    pub replay_endpoint: Option<String>,
    /// How many past batches the replay socket keeps (default 10 000).
    pub buffer_steps: i64,
    /// The PUB socket's high-water mark (default 100 000). Accepted for compatibility: the
    /// pure-Rust ZMQ stack queues a fixed 100 000 messages per subscriber and drops beyond.
    pub hwm: i64,
    /// Batches queued between the engine and the publisher (default 100 000; 0 or less is
    /// unbounded, as Python's `Queue(maxsize)`). A full queue makes the engine wait, as
    /// vLLM's blocking `Queue.put` does.
    pub max_queue_size: i64,
    /// First frame of every message; subscribers filter on its prefix (default empty).
    pub topic: String,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        KvEventsConfig {
            enable_kv_cache_events: false,
            publisher: None,
            endpoint: DEFAULT_ENDPOINT.to_string(),
            replay_endpoint: None,
            buffer_steps: 10_000,
            hwm: 100_000,
            max_queue_size: 100_000,
            topic: String::new(),
        }
    }
}

/// vLLM's event publishers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Publisher {
    /// Publishes nothing.
    Null,
    /// ZMQ PUB socket plus optional ROUTER replay socket.
    Zmq,
}

impl KvEventsConfig {
    /// Parses the JSON of `--kv-events-config` and checks it.
    pub fn from_json(json: &str) -> Result<Self, KvEventsError> {
        let cfg: KvEventsConfig =
            serde_json::from_str(json).map_err(|e| KvEventsError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The publisher in force: the explicit one, else `zmq` when events are enabled.
    pub fn publisher(&self) -> Publisher {
        match self.publisher {
            Some(p) => p,
            None if self.enable_kv_cache_events => Publisher::Zmq,
            None => Publisher::Null,
        }
    }

    /// Whether events are published at all (enabled, through `zmq`).
    pub fn publishes(&self) -> bool {
        self.enable_kv_cache_events && self.publisher() == Publisher::Zmq
    }

    /// Checks the values vLLM would refuse, and (when publishing) that the endpoints are
    /// ones this simulator can open.
    pub fn validate(&self) -> Result<(), KvEventsError> {
        let bad = |why: String| Err(KvEventsError::Config(why));
        if self.buffer_steps < 0 {
            return bad(format!(
                "buffer_steps: must be >= 0, got {}",
                self.buffer_steps
            ));
        }
        if self.hwm < 0 {
            return bad(format!("hwm: must be >= 0, got {}", self.hwm));
        }
        if self.publishes() {
            PubEndpoint::parse(&self.endpoint)?;
            if let Some(r) = &self.replay_endpoint {
                parse_bind(r)?;
            }
        }
        Ok(())
    }
}

/// Which vLLM wire layout the events reproduce (a simulator setting, `--kv-events-wire`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvEventsWire {
    /// vLLM 0.24 and later (as of 0.34.0): each event is a msgpack map tagged
    /// `{"type": "BlockStored", …}`; replay replies carry the topic frame
    /// (`[topic, seq, payload]`, end marker `[b"", -1, b""]`).
    #[default]
    Map,
    /// vLLM 0.23 and earlier: each event is a tagged array (`["BlockStored", …]`,
    /// msgspec `array_like=True`); replay replies are `[seq, payload]`, end marker
    /// `[-1, b""]`.
    Array,
}

impl FromStr for KvEventsWire {
    type Err = KvEventsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "map" => Ok(KvEventsWire::Map),
            "array" => Ok(KvEventsWire::Array),
            other => Err(KvEventsError::Config(format!(
                "kv events wire: expected `map` or `array`, got `{other}`"
            ))),
        }
    }
}

impl fmt::Display for KvEventsWire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvEventsWire::Map => "map",
            KvEventsWire::Array => "array",
        })
    }
}

/// How block hashes go on the wire (vLLM's `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockHashFormat {
    /// vLLM's default (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`): an unsigned integer, the
    /// low 64 bits of the hash read big-endian. The simulator's hashes are 64-bit, so this is
    /// the hash itself.
    #[default]
    Int,
    /// `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`: msgpack `bin`. vLLM sends its 32-byte
    /// digest; the simulator sends its 8-byte hash big-endian, which converts back to the
    /// same integer as vLLM's conversion would.
    Bytes,
}

impl BlockHashFormat {
    /// Reads vLLM's `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES` value (`bool(int(value))`; unset is
    /// `"1"`).
    pub fn from_env_value(value: Option<&str>) -> Result<Self, KvEventsError> {
        let Some(v) = value else {
            return Ok(BlockHashFormat::Int);
        };
        match v.trim().parse::<i64>() {
            Ok(0) => Ok(BlockHashFormat::Bytes),
            Ok(_) => Ok(BlockHashFormat::Int),
            Err(_) => Err(KvEventsError::Config(format!(
                "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES: expected an integer, got `{v}`"
            ))),
        }
    }
}

/// Where the PUB socket goes: vLLM binds an endpoint containing `*` or `::` and connects to
/// any other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PubEndpoint {
    /// Listen here.
    Bind(SocketAddr),
    /// Connect to this `tcp://host:port` (a subscriber binds it).
    Connect(String),
}

impl PubEndpoint {
    /// Applies vLLM's bind-or-connect rule to a `tcp://` endpoint.
    pub(crate) fn parse(endpoint: &str) -> Result<Self, KvEventsError> {
        if endpoint.contains('*') || endpoint.contains("::") {
            return parse_bind(endpoint).map(PubEndpoint::Bind);
        }
        let (host, port) = split_tcp(endpoint)?;
        if host.is_empty() {
            return Err(bad_endpoint(endpoint, "no host"));
        }
        if port == 0 {
            return Err(bad_endpoint(endpoint, "cannot connect to port 0"));
        }
        Ok(PubEndpoint::Connect(endpoint.to_string()))
    }
}

/// The address a bound endpoint listens on: `*` is every IPv4 interface, `[::]` or `::` every
/// IPv6 one, otherwise an IP literal.
pub(crate) fn parse_bind(endpoint: &str) -> Result<SocketAddr, KvEventsError> {
    let (host, port) = split_tcp(endpoint)?;
    let ip = match host {
        "*" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        "::" => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        h => h.parse::<IpAddr>().map_err(|_| {
            bad_endpoint(
                endpoint,
                "a bound endpoint needs `*` or an IP address (interface names are not supported)",
            )
        })?,
    };
    Ok(SocketAddr::new(ip, port))
}

/// `tcp://HOST:PORT` → (host without brackets, port).
fn split_tcp(endpoint: &str) -> Result<(&str, u16), KvEventsError> {
    let Some(rest) = endpoint.strip_prefix("tcp://") else {
        return Err(bad_endpoint(
            endpoint,
            "only tcp:// endpoints are supported (not ipc:// or inproc://)",
        ));
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(bad_endpoint(endpoint, "expected tcp://HOST:PORT"));
    };
    let port = port
        .parse::<u16>()
        .map_err(|_| bad_endpoint(endpoint, "the port must be a number from 0 to 65535"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Ok((host, port))
}

fn bad_endpoint(endpoint: &str, why: &str) -> KvEventsError {
    KvEventsError::Endpoint {
        endpoint: endpoint.to_string(),
        reason: why.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_vllms() {
        let c = KvEventsConfig::from_json("{}").unwrap();
        assert_eq!(c, KvEventsConfig::default());
        assert!(!c.publishes());
        assert_eq!(c.publisher(), Publisher::Null);
        assert_eq!(c.endpoint, "tcp://*:5557");
        assert_eq!(c.buffer_steps, 10_000);
        assert_eq!(c.hwm, 100_000);
        assert_eq!(c.max_queue_size, 100_000);
        assert_eq!(c.topic, "");
        assert_eq!(c.replay_endpoint, None);
    }

    #[test]
    fn enabling_picks_zmq_and_null_publishes_nothing() {
        let c = KvEventsConfig::from_json(r#"{"enable_kv_cache_events": true}"#).unwrap();
        assert_eq!(c.publisher(), Publisher::Zmq);
        assert!(c.publishes());
        let c =
            KvEventsConfig::from_json(r#"{"enable_kv_cache_events": true, "publisher": "null"}"#)
                .unwrap();
        assert!(!c.publishes());
        let c = KvEventsConfig::from_json(r#"{"publisher": "zmq"}"#).unwrap();
        assert!(!c.publishes());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = KvEventsConfig::from_json(r#"{"enable_kv_cache_events": true, "bogus": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        assert!(KvEventsConfig::from_json(r#"{"publisher": "kafka"}"#).is_err());
        assert!(KvEventsConfig::from_json(r#"{"buffer_steps": -1}"#).is_err());
        assert!(KvEventsConfig::from_json("not json").is_err());
        let e = KvEventsConfig::from_json(
            r#"{"enable_kv_cache_events": true, "endpoint": "ipc:///tmp/x"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tcp://"), "{e}");
    }

    #[test]
    fn bind_or_connect_follows_vllm() {
        assert_eq!(
            PubEndpoint::parse("tcp://*:5557").unwrap(),
            PubEndpoint::Bind("0.0.0.0:5557".parse().unwrap())
        );
        assert_eq!(
            PubEndpoint::parse("tcp://[::1]:5557").unwrap(),
            PubEndpoint::Bind("[::1]:5557".parse().unwrap())
        );
        assert_eq!(
            PubEndpoint::parse("tcp://127.0.0.1:5557").unwrap(),
            PubEndpoint::Connect("tcp://127.0.0.1:5557".into())
        );
        assert!(PubEndpoint::parse("tcp://127.0.0.1:0").is_err());
        assert_eq!(
            parse_bind("tcp://127.0.0.1:0").unwrap(),
            "127.0.0.1:0".parse().unwrap()
        );
        assert!(parse_bind("tcp://eth0:5557").is_err());
    }

    #[test]
    fn int_hashes_env_value() {
        assert_eq!(
            BlockHashFormat::from_env_value(None).unwrap(),
            BlockHashFormat::Int
        );
        assert_eq!(
            BlockHashFormat::from_env_value(Some("0")).unwrap(),
            BlockHashFormat::Bytes
        );
        assert_eq!(
            BlockHashFormat::from_env_value(Some("1")).unwrap(),
            BlockHashFormat::Int
        );
        assert!(BlockHashFormat::from_env_value(Some("yes")).is_err());
    }
}
