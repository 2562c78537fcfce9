//! llm-lb: an LLM-aware HTTP load balancer built on Pingora.
//!
//! It reads each OpenAI-style request body, routes it by model to a pool of inference servers and
//! lets the pool's policy pick the endpoint that will serve it best. See `proxy` for the request
//! path, `policy` for the policies, `config` for the policy file.

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod drain;
pub mod generation;
pub mod health;
pub mod outlier;
pub mod policy;
pub mod pool;
pub mod prefix;
pub mod proxy;
pub mod request;
pub mod resolve;
pub mod scrape;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod usage;
