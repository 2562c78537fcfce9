//! Draining client connections before this process goes away.
//!
//! On a binary upgrade (`-u` + SIGQUIT) Pingora hands the listening sockets to the new process at
//! once, but keeps serving the connections it already has for a few seconds and then drops the
//! idle keep-alive ones. A client that reuses such a connection at that moment sees its request
//! fail. So from the SIGQUIT (or SIGTERM) on, every response carries `Connection: close`: each
//! client finishes its current request, reconnects, and lands on the new process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};

/// Set once this process is handing over or shutting down.
#[derive(Clone, Default)]
pub struct Draining(Arc<AtomicBool>);

impl Draining {
    /// Whether this process is handing over or shutting down.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The background service that sets [`Draining`] on SIGQUIT or on shutdown.
pub struct DrainService(pub Draining);

#[async_trait]
impl BackgroundService for DrainService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        match signal(SignalKind::quit()) {
            Ok(mut quit) => {
                tokio::select! {
                    _ = quit.recv() => log::info!(
                        "SIGQUIT: handing over; closing client connections after their current request"
                    ),
                    _ = shutdown.changed() => {}
                }
            }
            Err(e) => {
                log::warn!("cannot watch SIGQUIT ({e}); connections close only at shutdown");
                let _ = shutdown.changed().await;
            }
        }
        self.0 .0.store(true, Ordering::Relaxed);
    }
}
