//! `llm-lb -c conf/pingora.yaml -p conf/policy.yaml`

use clap::Parser;

fn main() {
    let cli = llm_lb::cli::Cli::parse();
    if let Err(e) = llm_lb::app::run(cli) {
        eprintln!("llm-lb: error: {e:#}");
        std::process::exit(2);
    }
}
