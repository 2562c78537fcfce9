//! A plain Pingora proxy (no llm-lb proxy, no policy file) choosing its upstream with one of
//! llm-lb's policies as a Pingora `BackendSelection`: `global_least_request` on one replica.
//! The request is counted in flight from `upstream_peer` until `logging`.
//!
//! ```text
//! cargo run --example pingora_selection -- 127.0.0.1:8001 127.0.0.1:8002
//! ```
//! then send requests to 127.0.0.1:6188.

use std::sync::Arc;

use async_trait::async_trait;
use llm_lb::selection::{EmbeddedCounts, Inflight, LeastRequestSelection};
use pingora::lb::{discovery, Backend, Backends, LoadBalancer};
use pingora::prelude::*;

struct Proxy {
    upstreams: Arc<LoadBalancer<LeastRequestSelection>>,
    counts: EmbeddedCounts,
}

#[async_trait]
impl ProxyHttp for Proxy {
    /// The request's in-flight count, released when the context drops.
    type CTX = Option<Inflight>;

    fn new_ctx(&self) -> Self::CTX {
        None
    }

    async fn upstream_peer(&self, _: &mut Session, ctx: &mut Self::CTX) -> Result<Box<HttpPeer>> {
        let backend: Backend = self
            .upstreams
            .select(b"", 256)
            .ok_or_else(|| Error::explain(ErrorType::HTTPStatus(503), "no upstream"))?;
        *ctx = Some(self.counts.start(&backend, b""));
        Ok(Box::new(HttpPeer::new(backend.addr, false, String::new())))
    }

    async fn logging(&self, _: &mut Session, _: Option<&Error>, ctx: &mut Self::CTX) {
        ctx.take();
    }
}

fn main() -> anyhow::Result<()> {
    let addrs: Vec<String> = std::env::args().skip(1).collect();
    let discovery = discovery::Static::try_from_iter(addrs.iter().map(String::as_str))?;
    let counts = EmbeddedCounts::new("upstreams");
    let upstreams =
        LoadBalancer::from_backends_with_config(Backends::new(discovery), Some(counts.clone()));
    let mut server = Server::new(None).map_err(|e| anyhow::anyhow!("{e}"))?;
    server.bootstrap();
    let upstreams = Arc::new(upstreams);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(upstreams.update())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut proxy = http_proxy_service(&server.configuration, Proxy { upstreams, counts });
    proxy.add_tcp("127.0.0.1:6188");
    server.add_service(proxy);
    server.run_forever()
}
