//! Wiring: llm-lb's services on a Pingora server — the proxy (behind an h2c sniffer), the admin
//! listener, the drain watcher, the supervisor, which owns the routing table and its
//! background work (health checks, state-store heartbeats, engine-metrics scraping, reloads, DNS
//! refresh), and with `tracing` the span exporter's flush at shutdown.
//!
//! [`run`] is the binary. A program that runs its own Pingora [`Server`] adds llm-lb to it with
//! [`Services`], next to its other services, optionally with its own policies
//! ([`Registry`]); see `examples/embed_proxy.rs`.
//!
//! ```no_run
//! use llm_lb::app::Services;
//! use llm_lb::policy::Registry;
//! use pingora::server::Server;
//!
//! let mut server = Server::new(None)?;
//! server.bootstrap();
//! // ... add your own services here ...
//! let live = Services::load("conf/policy.yaml".as_ref(), Registry::new())?.add_to(&mut server);
//! server.run_forever();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use async_trait::async_trait;
use opentelemetry_sdk::trace::SdkTracerProvider;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};

use crate::cli::Cli;
use crate::config::{self, Config};
use crate::drain::{DrainService, Draining};
use crate::policy::Registry;
use crate::proxy::LbProxy;
use crate::routing::{Live, Supervisor};
use crate::{admin, telemetry};

/// Validate the policy file, then run the server (does not return unless set-up fails).
pub fn run(cli: Cli) -> anyhow::Result<()> {
    run_with(cli, Registry::new())
}

/// [`run`] with custom policies the policy file may name.
pub fn run_with(cli: Cli, registry: Registry) -> anyhow::Result<()> {
    telemetry::init_logging();
    let Cli {
        policy,
        pingora: opt,
    } = cli;
    let services = Services::load(&policy, registry)?;
    let test_only = opt.test;
    let mut server =
        Server::new(Some(opt)).map_err(|e| anyhow::anyhow!("server configuration: {e}"))?;
    if test_only {
        log::info!("policy file {} is valid", policy.display());
    }
    // With -t, bootstrap checks the server configuration and exits.
    server.bootstrap();
    services.add_to(&mut server);
    server.run_forever()
}

/// llm-lb's services for one policy file, validated and ready to be added to a Pingora server.
pub struct Services {
    policy: PathBuf,
    config: Config,
    registry: Registry,
}

impl Services {
    /// Read and validate the policy file (warnings are logged); `registry` holds the custom
    /// policies it may name.
    pub fn load(policy: &Path, registry: Registry) -> anyhow::Result<Services> {
        let config = config::load_with(policy, &registry.names())
            .and_then(|c| registry.check(&c).map(|()| c))
            .with_context(|| format!("policy file {}", policy.display()))?;
        for w in &config.warnings {
            log::warn!("policy file {}: {w}", policy.display());
        }
        // Reloads re-read the file from the same place even if the working directory changes (-d).
        let policy = std::fs::canonicalize(policy).unwrap_or_else(|_| policy.to_owned());
        Ok(Services {
            policy,
            config,
            registry,
        })
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Add the supervisor, the drain watcher, the proxy (on the file's `listen` addresses, serving
    /// once the first routing table is built) and the admin listener (if `admin` is not off) to
    /// `server`. Returns the live routing table, for programs that want to look at it.
    pub fn add_to(self, server: &mut Server) -> Live {
        telemetry::touch();
        let Services {
            policy,
            config,
            registry,
        } = self;
        let listen = config.listen.clone();
        let admin_addr = config.admin;
        let h2c = config.h2c;
        if let Some(t) = &config.tracing {
            let settings = telemetry::trace::TraceSettings {
                otlp_endpoint: t.otlp_endpoint.clone(),
                service_name: t.service_name.clone(),
                sample_ratio: t.sample_ratio,
            };
            match telemetry::trace::init(&settings) {
                Ok(provider) => {
                    log::info!(
                        "tracing: spans to {} (service {}, sampling {} of new traces)",
                        t.otlp_endpoint,
                        t.service_name,
                        t.sample_ratio
                    );
                    server.add_service(background_service("trace flush", TraceFlush(provider)));
                }
                Err(e) => log::error!("tracing is off: {e}"),
            }
        }
        let (supervisor, live, reload) = Supervisor::new(policy, config, registry);
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
        let proxy_live = live.clone();
        let mut proxy =
            crate::proxy::h2c::service(&server.configuration, "llm-lb", options, || {
                LbProxy::new(proxy_live.clone(), draining.clone())
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
            let svc = admin::service(&addr.to_string(), live.clone(), reload);
            log::info!("admin (status page, metrics, healthz, reload) on {addr}");
            server.add_service(svc);
        }
        live
    }
}

/// Sends the spans not exported yet when the server shuts down.
struct TraceFlush(SdkTracerProvider);

#[async_trait]
impl BackgroundService for TraceFlush {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let _ = shutdown.changed().await;
        let provider = self.0.clone();
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => log::debug!("tracing: spans flushed"),
            Ok(Err(e)) => log::warn!("tracing: flushing spans at shutdown failed: {e}"),
            Err(e) => log::warn!("tracing: flushing spans at shutdown failed: {e}"),
        }
    }
}
