//! `endpoint_hash`'s settings (Higress 2.x `endpoint_hash`'s keys, spelt as Higress spells them):
//! `hash_header`, the request header whose value pins a request to an endpoint (default
//! `x-mse-consumer`), and `stickyTimeout`, how long a binding lives unused, in minutes (default
//! 60; 0 means the default, as in Higress). The store keys (`serviceFQDN`…) and `maxRequestCount`
//! are [`super::SharedCounts`]'.
//!
//! The header is the pool's session: an `endpoint_hash` pool's
//! [`SessionConfig`](super::SessionConfig) is that header alone ([`EndpointHashConfig::session`]),
//! so a pool that also writes `session_affinity` is refused.

use std::time::Duration;

use super::error::InvalidKey;
use super::file::LbConfigFile;
use super::session::SessionConfig;

/// Default `hash_header` (Higress's: the consumer name its key-auth plugins set).
pub const DEFAULT_HASH_HEADER: &str = "x-mse-consumer";
/// Default `stickyTimeout`: 60 minutes.
pub const DEFAULT_STICKY_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// The longest `stickyTimeout`, in minutes: one year.
pub const MAX_STICKY_TIMEOUT_MINUTES: i64 = 365 * 24 * 60;

/// The policy's settings from `lb_config`; defaults are Higress's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointHashConfig {
    /// The header whose value is bound to an endpoint, lower case (`hash_header`).
    pub hash_header: String,
    /// How long a binding lives without being used; each use refreshes it (`stickyTimeout`).
    pub sticky: Duration,
}

impl Default for EndpointHashConfig {
    fn default() -> Self {
        EndpointHashConfig {
            hash_header: DEFAULT_HASH_HEADER.to_owned(),
            sticky: DEFAULT_STICKY_TIMEOUT,
        }
    }
}

impl EndpointHashConfig {
    /// Read and check the keys `endpoint_hash` uses; every problem is reported.
    pub fn from_lb_config(c: &LbConfigFile) -> Result<Self, Vec<InvalidKey>> {
        let mut issues = Vec::new();
        let d = EndpointHashConfig::default();
        let hash_header = match c.hash_header.as_deref() {
            None => d.hash_header,
            Some(name) => match http::HeaderName::from_bytes(name.trim().as_bytes()) {
                Ok(h) => h.as_str().to_owned(),
                Err(_) => {
                    issues.push(InvalidKey::new(
                        "hash_header",
                        format!("'{name}' is not a header name"),
                    ));
                    d.hash_header
                }
            },
        };
        let sticky = match c.stickyTimeout {
            None | Some(0) => d.sticky,
            Some(m) if (1..=MAX_STICKY_TIMEOUT_MINUTES).contains(&m) => {
                Duration::from_secs(m.unsigned_abs() * 60)
            }
            Some(_) => {
                issues.push(InvalidKey::new(
                    "stickyTimeout",
                    format!(
                        "must be a number of minutes between 0 (the default, 60) and \
                         {MAX_STICKY_TIMEOUT_MINUTES}"
                    ),
                ));
                d.sticky
            }
        };
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(EndpointHashConfig {
            hash_header,
            sticky,
        })
    }

    /// Where the pool finds a request's key: `hash_header` alone, no body field.
    pub fn session(&self) -> SessionConfig {
        SessionConfig {
            headers: vec![self.hash_header.clone()],
            body_fields: Vec::new(),
        }
    }
}
