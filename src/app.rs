//! Wiring: the Pingora server with the proxy service, the admin listener and each pool's
//! background services (health checks, state-store heartbeat, engine-metrics scraping).

use std::sync::Arc;

use anyhow::Context;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::Service as _;

use crate::cli::Cli;
use crate::config::{self, Config};
use crate::drain::{DrainService, Draining};
use crate::pool::Pool;
use crate::proxy::{LbProxy, Routes};
use crate::scrape::ScrapeService;
use crate::store::CountsService;
use crate::{admin, telemetry};

/// Build the pools and routing table from a validated configuration, plus the health services.
pub fn build_routes(
    config: Config,
) -> anyhow::Result<(Arc<Routes>, Vec<crate::pool::HealthService>)> {
    let mut pools = Vec::with_capacity(config.pools.len());
    let mut services = Vec::new();
    for pc in &config.pools {
        let (pool, health) =
            Pool::new(pc.clone()).with_context(|| format!("pool '{}'", pc.name))?;
        pools.push(pool);
        services.extend(health);
    }
    Ok((Arc::new(Routes { config, pools }), services))
}

/// Validate the policy file, then run the server (does not return unless set-up fails).
pub fn run(cli: Cli) -> anyhow::Result<()> {
    telemetry::init_logging();
    let Cli {
        policy,
        pingora: opt,
    } = cli;
    let config =
        config::load(&policy).with_context(|| format!("policy file {}", policy.display()))?;
    for w in &config.warnings {
        log::warn!("policy file {}: {w}", policy.display());
    }
    let test_only = opt.test;
    let mut server =
        Server::new(Some(opt)).map_err(|e| anyhow::anyhow!("server configuration: {e}"))?;
    if test_only {
        log::info!("policy file {} is valid", policy.display());
    }
    // With -t, bootstrap checks the server configuration and exits.
    server.bootstrap();
    telemetry::touch();

    let listen = config.listen.clone();
    let admin_addr = config.admin;
    let h2c = config.h2c;
    let (routes, health_services) = build_routes(config)?;
    let mut health_handles = Vec::new();
    for svc in health_services {
        health_handles.push(server.add_service(svc));
    }

    let counts: Vec<_> = routes
        .pools
        .iter()
        .filter_map(|p| p.counts.clone())
        .collect();
    if !counts.is_empty() {
        for c in &counts {
            log::info!(
                "pool {}: in-flight counts in the {} state store (replica {})",
                c.pool(),
                c.store().kind(),
                c.store().replica_id()
            );
        }
        server.add_service(background_service(
            "state store heartbeat",
            CountsService::new(counts),
        ));
    }
    for pool in &routes.pools {
        if let Some(board) = pool.policy.metrics_board() {
            server.add_service(background_service(
                &format!("metrics {}", pool.name()),
                ScrapeService::new(board, &pool.config.metrics),
            ));
        }
    }
    let mut options = pingora::apps::HttpServerOptions::default();
    options.h2c = h2c;
    let draining = Draining::default();
    server.add_service(background_service(
        "drain on handover",
        DrainService(draining.clone()),
    ));
    // Protocol detection with a deadline (Pingora's own h2c sniffing waits forever).
    let mut proxy = crate::proxy::h2c::service(&server.configuration, "llm-lb", options, || {
        LbProxy::new(routes.clone(), draining.clone())
    });
    for addr in &listen {
        proxy.add_tcp(&addr.to_string());
    }
    log::info!(
        "llm-lb listening on {}",
        listen
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let proxy_handle = server.add_service(proxy);
    // Serve only once every pool's health view has its first membership update.
    for h in &health_handles {
        proxy_handle.add_dependency(h);
    }
    if let Some(addr) = admin_addr {
        let svc = admin::service(&addr.to_string());
        log::info!("admin (metrics, healthz) on {addr}; {}", svc.name());
        server.add_service(svc);
    }
    server.run_forever()
}
