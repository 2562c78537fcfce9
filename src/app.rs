//! Wiring: the Pingora server with the proxy service, the admin listener, the drain watcher and
//! the supervisor, which owns the routing table and its background work (health checks,
//! state-store heartbeats, engine-metrics scraping, reloads, DNS refresh).

use anyhow::Context;
use pingora::server::Server;
use pingora::services::background::background_service;

use crate::cli::Cli;
use crate::config;
use crate::drain::{DrainService, Draining};
use crate::proxy::LbProxy;
use crate::supervisor::Supervisor;
use crate::{admin, telemetry};

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
    // Reloads re-read the file from the same place even if the working directory changes (-d).
    let policy = std::fs::canonicalize(&policy).unwrap_or(policy);
    let (supervisor, live, reload) = Supervisor::new(policy, config);
    let supervisor = server.add_service(background_service("supervisor", supervisor));

    let draining = Draining::default();
    server.add_service(background_service(
        "drain on handover",
        DrainService(draining.clone()),
    ));
    let mut options = pingora::apps::HttpServerOptions::default();
    options.h2c = h2c;
    // Protocol detection with a deadline (Pingora's own h2c sniffing waits forever). Every
    // instance reads the same live routing table.
    let mut proxy = crate::proxy::h2c::service(&server.configuration, "llm-lb", options, || {
        LbProxy::new(live.clone(), draining.clone())
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
    // Serve only once the first routing table is built (health views populated).
    server.add_service(proxy).add_dependency(&supervisor);
    if let Some(addr) = admin_addr {
        let svc = admin::service(&addr.to_string(), reload);
        log::info!("admin (metrics, healthz, reload) on {addr}");
        server.add_service(svc);
    }
    server.run_forever()
}
