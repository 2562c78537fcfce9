//! Command line: Pingora's own flags (`-c`, `-d`, `-u`, `-t`) plus the policy file.

use std::path::PathBuf;

use clap::Parser;
use pingora::server::configuration::Opt;

/// llm-lb: an LLM-aware load balancer on Pingora.
#[derive(Parser, Debug)]
#[command(name = "llm-lb", version, about)]
pub struct Cli {
    /// The policy file (pools, endpoints, lb_policy, lb_config).
    #[arg(
        short = 'p',
        long = "policy",
        value_name = "FILE",
        default_value = "conf/policy.yaml"
    )]
    pub policy: PathBuf,

    /// Pingora's own flags.
    #[command(flatten)]
    pub pingora: Opt,
}
