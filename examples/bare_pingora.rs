//! The bare Pingora anchor of `scripts/bench-overhead.sh`: the smallest HTTP proxy Pingora runs,
//! with nothing of llm-lb in it. `upstream_peer` returns one fixed upstream; the request body is
//! not read, nothing is routed, counted or logged per request; upstream connections are kept
//! alive in Pingora's pool. What llm-lb adds to a proxied request is measured against this: it
//! is the limit for llm-lb's architecture on a given machine.
//!
//! ```text
//! cargo run --release --example bare_pingora -- LISTEN UPSTREAM [PINGORA_YAML]
//! cargo run --release --example bare_pingora -- 127.0.0.1:6190 127.0.0.1:8001 conf/pingora.yaml
//! ```
//!
//! `LISTEN` and `UPSTREAM` are `ip:port`. `PINGORA_YAML` is a Pingora server configuration (the
//! benchmark passes the one its llm-lb instances use, so both run with the same `threads` and
//! keep-alive pool); without it the proxy runs with Pingora's defaults and 2 threads.

use std::net::SocketAddr;

use anyhow::Context;
use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

/// Worker threads when no Pingora configuration is given (as in `conf/pingora.yaml`).
const DEFAULT_THREADS: usize = 2;

/// A proxy with one fixed upstream.
struct Bare {
    /// Where every request goes.
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _: &mut Session, _: &mut Self::CTX) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

/// `LISTEN UPSTREAM [PINGORA_YAML]` from the command line.
fn args() -> anyhow::Result<(SocketAddr, SocketAddr, Option<String>)> {
    const USAGE: &str = "usage: bare_pingora LISTEN UPSTREAM [PINGORA_YAML]";
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        anyhow::bail!(USAGE);
    };
    let conf = args.next();
    if args.next().is_some() {
        anyhow::bail!(USAGE);
    }
    let listen = listen
        .parse()
        .with_context(|| format!("LISTEN must be ip:port, not {listen:?}"))?;
    let upstream = upstream
        .parse()
        .with_context(|| format!("UPSTREAM must be ip:port, not {upstream:?}"))?;
    Ok((listen, upstream, conf))
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let (listen, upstream, conf) = args()?;
    let mut server = match conf {
        Some(path) => {
            let opt = Opt {
                conf: Some(path.clone()),
                ..Opt::default()
            };
            Server::new(Some(opt))
                .map_err(|e| anyhow::anyhow!("Pingora configuration {path}: {e}"))?
        }
        None => {
            let mut conf = ServerConf::new().context("Pingora's default configuration")?;
            conf.threads = DEFAULT_THREADS;
            Server::new_with_opt_and_conf(None, conf)
        }
    };
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Bare { upstream });
    proxy.add_tcp(&listen.to_string());
    server.add_service(proxy);
    log::info!("bare Pingora proxy on {listen} -> {upstream}");
    server.run_forever()
}
