//! llm-lb: an LLM-aware HTTP load balancer built on Pingora.
//!
//! It reads each OpenAI-style request body, routes it by model to a pool of inference servers and
//! lets the pool's policy pick the endpoint that will serve it best.
//!
//! # Layers
//!
//! Each module imports only modules on lower floors (checked by `tests/layers.rs`):
//!
//! ```text
//! 5  app, cli, admin              wiring: the Pingora server, its services, the admin listener
//! 4  proxy, status                Pingora hooks; proxy::choose picks an endpoint without Pingora;
//!                                 the operator's snapshot of the routing table
//! 3  routing                      routing table, pools, generations, DNS, the supervisor
//! 2  policy, selection            choose an endpoint; the same policies as Pingora BackendSelections
//! 1  health, store, scrape,       is it admitted? shared counts and prefixes; engine metrics;
//!    kv_events                    which engine holds which token blocks (KV-cache events)
//! 0  endpoint, config, telemetry, vocabulary, validated settings, metrics and logs,
//!    request, apis, prefix,       understanding OpenAI and Anthropic bodies, token block keys,
//!    usage, kv_blocks, drain      graceful drain
//! ```
//!
//! # Using it as a library
//!
//! - Run llm-lb's proxy inside your own Pingora server: [`app::Services`].
//! - Add your own `lb_policy`: implement [`policy::Policy`] and register it in a
//!   [`policy::Registry`].
//! - Use a policy in a plain Pingora proxy: [`selection`] (Pingora's `BackendSelection`).
//!
//! `examples/` shows all three.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod admin;
pub mod admission;
pub mod apis;
pub mod app;
pub mod cli;
pub mod config;
pub mod drain;
pub mod endpoint;
pub mod health;
pub mod kv_blocks;
pub mod kv_events;
pub mod policy;
pub mod prefix;
pub mod proxy;
pub mod request;
pub mod routing;
pub mod scrape;
pub mod selection;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod usage;
