//! DNS discovery: endpoints written as `host:port` (e.g. a Kubernetes headless Service) become one
//! endpoint per address the name resolves to.
//!
//! Names are resolved with the system resolver (`getaddrinfo`: `/etc/hosts`, `resolv.conf`, search
//! domains), each lookup bounded by [`LOOKUP_TIMEOUT`], at start and every `dns_refresh_ms` by the
//! supervisor — never on the request path. A lookup that fails or times out keeps the addresses
//! the name had before (a DNS hiccup must not empty a pool); a name that never resolved contributes
//! no endpoint until it does. What a pool's endpoint list looks like for a given set of answers is
//! [`expand`], a pure function.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{kv_events_address, Address, Config, EndpointConfig, EndpointSpec};
use crate::telemetry;

/// Longest wait for one name.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The addresses each configured name resolved to (`host:port` → sorted, deduplicated).
pub type Answers = HashMap<String, Vec<SocketAddr>>;

/// Whether any endpoint of `config` is given by name.
pub fn has_names(config: &Config) -> bool {
    names(config).next().is_some()
}

fn names(config: &Config) -> impl Iterator<Item = (&str, u16)> {
    config
        .pools
        .iter()
        .flat_map(|p| &p.endpoints)
        .filter_map(|e| match &e.address {
            Address::Name { host, port } => Some((host.as_str(), *port)),
            Address::Ip(_) => None,
        })
}

/// Resolve every name in `config` (concurrently). A name whose lookup fails keeps its entry in
/// `previous`, if it has one.
pub async fn resolve(config: &Config, previous: &Answers) -> Answers {
    let mut unique: Vec<(&str, u16)> = names(config).collect();
    unique.sort_unstable();
    unique.dedup();
    let mut lookups = tokio::task::JoinSet::new();
    for (host, port) in unique {
        let host = host.to_owned();
        lookups.spawn(async move { (format!("{host}:{port}"), lookup(&host, port).await) });
    }
    let mut answers = Answers::new();
    while let Some(done) = lookups.join_next().await {
        let Ok((key, found)) = done else {
            continue;
        };
        match found {
            Ok(addrs) => {
                telemetry::count_dns_lookup(&key, "ok");
                if previous.get(&key) != Some(&addrs) {
                    log::info!(
                        "endpoint name {key} resolves to {}",
                        list(&addrs).unwrap_or_else(|| "no address".into())
                    );
                }
                answers.insert(key, addrs);
            }
            Err(e) => {
                telemetry::count_dns_lookup(&key, "error");
                match previous.get(&key) {
                    Some(kept) => {
                        log::warn!("cannot resolve {key} ({e}); keeping its last addresses");
                        answers.insert(key, kept.clone());
                    }
                    None => log::warn!("cannot resolve {key} ({e}); it has no endpoint yet"),
                }
            }
        }
    }
    answers
}

async fn lookup(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(found)) => {
            let mut addrs: Vec<SocketAddr> = found.collect();
            addrs.sort_unstable();
            addrs.dedup();
            if addrs.is_empty() {
                Err("no address".into())
            } else {
                Ok(addrs)
            }
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {LOOKUP_TIMEOUT:?}")),
    }
}

fn list(addrs: &[SocketAddr]) -> Option<String> {
    (!addrs.is_empty()).then(|| {
        addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// Each pool's endpoints for these answers, in configuration order (a name's addresses sorted).
/// An address that appears twice in a pool is an endpoint once, with the first weight.
pub fn expand(config: &Config, answers: &Answers) -> Vec<Vec<EndpointConfig>> {
    config
        .pools
        .iter()
        .map(|pool| {
            let mut out: Vec<EndpointConfig> = Vec::new();
            for spec in &pool.endpoints {
                let addrs = match &spec.address {
                    Address::Ip(a) => std::slice::from_ref(a),
                    name => answers
                        .get(&name.to_string())
                        .map(Vec::as_slice)
                        .unwrap_or_default(),
                };
                for &addr in addrs {
                    if !out.iter().any(|e| e.addr == addr) {
                        out.push(EndpointConfig {
                            addr,
                            weight: spec.weight,
                            kv_events: own_stream(spec, spec.kv_events.as_ref(), addr),
                            kv_events_replay: own_stream(
                                spec,
                                spec.kv_events_replay.as_ref(),
                                addr,
                            ),
                        });
                    }
                }
            }
            out
        })
        .collect()
}

/// An event socket `url` of the endpoint `spec` resolved to `addr`: a URL naming the endpoint's
/// own host name is each resolved address's own socket (`tcp://<its IP>:<port>`).
fn own_stream(spec: &EndpointSpec, url: Option<&String>, addr: SocketAddr) -> Option<String> {
    let url = url?;
    match (&spec.address, kv_events_address(url)) {
        (
            Address::Name { host, .. },
            Ok(Address::Name {
                host: events_host,
                port,
            }),
        ) if *host == events_host => Some(format!("tcp://{}", SocketAddr::new(addr.ip(), port))),
        _ => Some(url.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_POOLS: &str = "pools:\n  - name: a\n    models: [m]\n    endpoints: ['127.0.0.1:1', {address: 'vllm.svc:8000', weight: 2}, '127.0.0.3:8000']\n    lb_policy: round_robin\n  - name: b\n    models: ['*']\n    endpoints: ['127.0.0.1:2']\n    lb_policy: random\n";

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn names_expand_in_place_and_duplicates_keep_the_first_weight() {
        let config = Config::from_yaml(TWO_POOLS).expect("valid");
        assert!(has_names(&config));
        let mut answers = Answers::new();
        let pools = expand(&config, &answers);
        assert_eq!(pools[0].len(), 2, "an unresolved name has no endpoint yet");
        answers.insert(
            "vllm.svc:8000".into(),
            vec![addr("127.0.0.2:8000"), addr("127.0.0.3:8000")],
        );
        let pools = expand(&config, &answers);
        let got: Vec<(String, usize)> = pools[0]
            .iter()
            .map(|e| (e.addr.to_string(), e.weight))
            .collect();
        assert_eq!(
            got,
            vec![
                ("127.0.0.1:1".into(), 1),
                ("127.0.0.2:8000".into(), 2),
                ("127.0.0.3:8000".into(), 2),
            ]
        );
        assert_eq!(pools[1].len(), 1);
    }

    #[test]
    fn event_sockets_on_the_endpoints_own_name_follow_each_address() {
        let yaml = "pools:\n  - name: a\n    models: [m]\n    endpoints:\n      - {address: 'vllm.svc:8000', kv_events: 'tcp://vllm.svc:5557', kv_events_replay: 'tcp://vllm.svc:5558'}\n      - {address: '127.0.0.9:8000', kv_events: 'tcp://events.svc:5557'}\n    lb_policy: kv_aware\n";
        let config = Config::from_yaml(yaml).expect("valid");
        let mut answers = Answers::new();
        answers.insert(
            "vllm.svc:8000".into(),
            vec![addr("127.0.0.2:8000"), addr("127.0.0.3:8000")],
        );
        let got: Vec<(String, Option<String>, Option<String>)> = expand(&config, &answers)[0]
            .iter()
            .map(|e| {
                (
                    e.addr.to_string(),
                    e.kv_events.clone(),
                    e.kv_events_replay.clone(),
                )
            })
            .collect();
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            got,
            vec![
                (
                    "127.0.0.2:8000".into(),
                    some("tcp://127.0.0.2:5557"),
                    some("tcp://127.0.0.2:5558")
                ),
                (
                    "127.0.0.3:8000".into(),
                    some("tcp://127.0.0.3:5557"),
                    some("tcp://127.0.0.3:5558")
                ),
                // Another host's socket is taken as written.
                ("127.0.0.9:8000".into(), some("tcp://events.svc:5557"), None),
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_lookup_keeps_the_last_answer() {
        let config =
            Config::from_yaml(&TWO_POOLS.replace("vllm.svc:8000", "no-such-host.invalid:8000"))
                .expect("valid");
        let mut previous = Answers::new();
        previous.insert(
            "no-such-host.invalid:8000".into(),
            vec![addr("127.0.0.9:8000")],
        );
        let answers = resolve(&config, &previous).await;
        assert_eq!(answers, previous);
        assert!(resolve(&config, &Answers::new()).await.is_empty());
    }

    #[tokio::test]
    async fn localhost_resolves() {
        let config = Config::from_yaml(&TWO_POOLS.replace("vllm.svc:8000", "localhost:8000"))
            .expect("valid");
        let answers = resolve(&config, &Answers::new()).await;
        let got = answers.get("localhost:8000").expect("resolved");
        assert!(
            got.iter().all(|a| a.ip().is_loopback() && a.port() == 8000),
            "{got:?}"
        );
    }
}
