//! Where and how to reach Redis: [`RedisConfig`], validated from a pool's `lb_config`
//! ([`RedisConfig::from_lb_config`]) with Higress's keys and units, or built directly.
//!
//! | key | meaning |
//! |---|---|
//! | `serviceFQDN` | Redis host name or IP — **or** a URL, see below. Absent → embedded store. |
//! | `servicePort` | port, default 6379 (only with a host name; a URL carries its own port) |
//! | `username`, `password` | ACL user and password (empty = none) |
//! | `database` | database number, default 0 (Redis Cluster has only 0) |
//! | `timeout` | ms per Redis call, default 50 (0 = default); a call that takes longer fails as a store timeout |
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
//! The password is never logged: errors and [`RedisConfig`]'s `Debug` show only
//! [`RedisConfig::address`], which omits it.

use std::fmt;
use std::time::Duration;

use redis::{
    Client, ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError,
    TlsCertificates,
};

use super::error::InvalidKey;
use super::file::LbConfigFile;

/// Dead-replica timeout used unless configured otherwise.
pub const DEFAULT_DEAD_REPLICA_AFTER: Duration = Duration::from_secs(10);
/// Largest accepted dead-replica timeout (survivors forget a dead replica within 15 s).
pub const MAX_DEAD_REPLICA_AFTER: Duration = Duration::from_secs(15);

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
    pub fn from_lb_config(c: &LbConfigFile) -> Result<Self, InvalidKey> {
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
                return Err(InvalidKey::new("tlsKeyFile", "required with tlsCertFile"))
            }
            (None, Some(_)) => {
                return Err(InvalidKey::new("tlsCertFile", "required with tlsKeyFile"))
            }
        };
        Ok(TlsFiles { ca, client })
    }

    fn is_empty(&self) -> bool {
        self.ca.is_none() && self.client.is_none()
    }
}

fn read_file(key: &'static str, path: &str) -> Result<Vec<u8>, InvalidKey> {
    std::fs::read(path).map_err(|e| InvalidKey::new(key, format!("cannot read {path}: {e}")))
}

/// Check that `pem` holds at least one PEM item of the expected kind (never echoing its content).
fn check_pem(pem: &[u8], key: &'static str, what: &str) -> Result<(), InvalidKey> {
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
        Err(InvalidKey::new(
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
    pub fn from_url(url: &str) -> Result<Self, InvalidKey> {
        let info = url.into_connection_info().map_err(|e| {
            InvalidKey::new(
                "serviceFQDN",
                format!("bad Redis URL: {}", url_error(url, &e)),
            )
        })?;
        if let ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
            return Err(InvalidKey::new(
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
    pub fn with_tls(mut self, files: TlsFiles) -> Result<Self, InvalidKey> {
        let addr = match self.info.addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                ConnectionAddr::TcpTls {
                    host: host.clone(),
                    port: *port,
                    insecure: false,
                    tls_params: None,
                }
            }
            // `ConnectionAddr` is non-exhaustive: `_` covers only variants added in the future.
            ConnectionAddr::Unix(_) | _ => {
                return Err(InvalidKey::new(
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
        let client = Client::build_with_tls(info, certs.clone())
            .map_err(|e| InvalidKey::new("tlsCaFile", format!("unusable TLS settings: {e}")))?;
        self.info = client.get_connection_info().clone();
        self.tls = Some(certs);
        Ok(self)
    }

    /// From a host name (or IP address) and port, without credentials.
    pub fn from_host(host: &str, port: u16) -> Result<Self, InvalidKey> {
        if host.is_empty() {
            return Err(InvalidKey::new("serviceFQDN", "empty"));
        }
        if port == 0 {
            return Err(InvalidKey::new("servicePort", "must not be 0"));
        }
        let info = ConnectionAddr::Tcp(host.to_owned(), port)
            .into_connection_info()
            .map_err(|e| InvalidKey::new("serviceFQDN", e.to_string()))?;
        Ok(Self::with_info(info))
    }

    /// From a pool's `lb_config`: `Ok(None)` when it names no Redis (no `serviceFQDN`), i.e. the
    /// pool uses the embedded store. Errors name the offending key.
    pub fn from_lb_config(c: &LbConfigFile) -> Result<Option<Self>, InvalidKey> {
        let Some(fqdn) = c.serviceFQDN.as_deref() else {
            return Ok(None);
        };
        let fqdn = fqdn.trim();
        let is_url = fqdn.contains("://");
        let mut config = if is_url {
            if c.servicePort.is_some() {
                return Err(InvalidKey::new(
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
                return Err(InvalidKey::new(
                    "tls",
                    "false contradicts the rediss:// URL",
                ))
            }
            (Some(true), false) if is_url => {
                return Err(InvalidKey::new(
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
                return Err(InvalidKey::new(
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
            return Err(InvalidKey::new(
                "username",
                "also given in the serviceFQDN URL; give it once",
            ));
        }
        if is_url && url_password && password.is_some() {
            return Err(InvalidKey::new(
                "password",
                "also given in the serviceFQDN URL; give it once",
            ));
        }
        if is_url && url_db && c.database.is_some() {
            return Err(InvalidKey::new(
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
                return Err(InvalidKey::new(
                    "replicaTimeout",
                    format!("must be {MIN_REPLICA_TIMEOUT_MS}..=15000 ms, got {ms}"),
                ));
            }
            config = config.with_dead_replica_after(Duration::from_millis(ms))?;
        }
        if config.timeout * 2 > config.dead_after {
            return Err(InvalidKey::new(
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
    pub fn with_database(mut self, db: i64) -> Result<Self, InvalidKey> {
        if db < 0 {
            return Err(InvalidKey::new("database", "must not be negative"));
        }
        let r = self.info.redis_settings().clone().set_db(db);
        self.info = self.info.set_redis_settings(r);
        Ok(self)
    }

    /// Bound every call (including connecting) to `timeout` (more than 0, at most 60 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Result<Self, InvalidKey> {
        if timeout.is_zero() || timeout > Duration::from_secs(60) {
            return Err(InvalidKey::new(
                "timeout",
                "must be more than 0 ms and at most 60000 ms",
            ));
        }
        self.timeout = timeout;
        Ok(self)
    }

    /// Dead-replica timeout (more than 0, at most 15 s; default 10 s).
    pub fn with_dead_replica_after(mut self, d: Duration) -> Result<Self, InvalidKey> {
        check_dead_replica_after(d)?;
        self.dead_after = d;
        Ok(self)
    }

    /// Key namespace (default `llmlb`): deployments sharing a Redis use different namespaces.
    pub fn with_namespace(mut self, ns: &str) -> Result<Self, InvalidKey> {
        if ns.is_empty() || ns.contains(['{', '}']) || ns.chars().any(char::is_whitespace) {
            return Err(InvalidKey::new(
                "namespace",
                "must be non-empty, without braces or whitespace",
            ));
        }
        self.namespace = ns.to_owned();
        Ok(self)
    }

    /// Use this replica id instead of a generated one (tests; ids must be unique per process).
    pub fn with_replica_id(mut self, id: &str) -> Result<Self, InvalidKey> {
        check_replica_id(id)?;
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

    /// The server's address, credentials and database, as redis-rs takes them.
    pub fn connection_info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// CA and client certificate for TLS (`None`: plain TCP or a Unix socket).
    pub fn tls_certificates(&self) -> Option<&TlsCertificates> {
        self.tls.as_ref()
    }

    /// Standalone, cluster or detect.
    pub fn mode(&self) -> RedisMode {
        self.mode
    }

    /// How long a replica may stay silent before the others remove its counts.
    pub fn dead_replica_after(&self) -> Duration {
        self.dead_after
    }

    /// The key namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The replica id set with [`RedisConfig::with_replica_id`], if any.
    pub fn replica_id(&self) -> Option<&str> {
        self.replica_id.as_deref()
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

/// Check a caller-chosen replica id: 1..=200 characters without `|` (the separator in the store's
/// field names) or whitespace.
pub fn check_replica_id(id: &str) -> Result<(), InvalidKey> {
    if id.is_empty() || id.len() > 200 || id.contains('|') || id.chars().any(char::is_whitespace) {
        return Err(InvalidKey::new(
            "replica_id",
            "must be 1..=200 characters without '|' or whitespace",
        ));
    }
    Ok(())
}

/// Check a dead-replica timeout: more than zero and at most [`MAX_DEAD_REPLICA_AFTER`].
pub fn check_dead_replica_after(d: Duration) -> Result<(), InvalidKey> {
    if d.is_zero() || d > MAX_DEAD_REPLICA_AFTER {
        return Err(InvalidKey::new(
            "dead_replica_after",
            format!(
                "must be more than 0 and at most {} s, got {d:?}",
                MAX_DEAD_REPLICA_AFTER.as_secs()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::LbConfigFile;

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
}
