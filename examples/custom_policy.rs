//! A custom `lb_policy` registered from outside the crate: `primary_backup` sends every request to
//! the first endpoint listed in the pool that is a candidate (healthy, not ejected, not yet tried
//! by this request), so the others only take traffic when it fails — with llm-lb's retries,
//! health checks and outlier ejection doing the failing over. Its one `lb_config` key,
//! `spill_over`, lets the primary's in-flight count go that far above the next endpoint's
//! before traffic spills over.
//!
//! ```text
//! cargo run --example custom_policy -- -p policy.yaml
//! ```
//! with a pool such as
//! ```yaml
//! pools:
//!   - name: main
//!     models: ["*"]
//!     endpoints: ["127.0.0.1:8001", "127.0.0.1:8002"]
//!     lb_policy: primary_backup
//!     lb_config: {spill_over: 16}
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use clap::Parser;
use llm_lb::cli::Cli;
use llm_lb::policy::{CustomContext, Pick, PickInput, Policy, PolicyError, Registry};

/// The policy of one pool.
struct PrimaryBackup {
    spill_over: u64,
}

#[async_trait]
impl Policy for PrimaryBackup {
    fn name(&self) -> &'static str {
        "primary_backup"
    }

    fn reasons(&self) -> &'static [&'static str] {
        &["primary", "spill_over"]
    }

    async fn pick(&self, input: PickInput<'_>) -> Result<Pick, PolicyError> {
        let inflight = |i: usize| {
            input
                .candidates
                .get(i)
                .and_then(|c| input.endpoints.get(c.index()))
                .map_or(u64::MAX, |e| e.inflight())
        };
        let first = *input
            .candidates
            .first()
            .ok_or_else(|| PolicyError::Unavailable("no candidates".into()))?;
        let spill = input.candidates.len() > 1 && inflight(0) > inflight(1) + self.spill_over;
        Ok(Pick {
            endpoint: if spill { input.candidates[1] } else { first },
            reason: if spill { "spill_over" } else { "primary" },
            lease: None,
        })
    }
}

/// Builds the policy for one pool from its `lb_config`.
// Foreign enum (serde_yaml's Value): anything but null or a mapping is refused alike.
#[allow(clippy::wildcard_enum_match_arm)]
fn primary_backup(context: &CustomContext<'_>) -> Result<Arc<dyn Policy>, String> {
    let spill_over = match context.lb_config {
        serde_yaml::Value::Null => 8,
        serde_yaml::Value::Mapping(m) => {
            if let Some(key) = m.keys().find(|k| k.as_str() != Some("spill_over")) {
                return Err(format!(
                    "pool {}: unknown lb_config key {key:?}",
                    context.pool
                ));
            }
            match m.get("spill_over") {
                None => 8,
                Some(v) => v
                    .as_u64()
                    .ok_or_else(|| format!("pool {}: spill_over must be a count", context.pool))?,
            }
        }
        _ => {
            return Err(format!(
                "pool {}: lb_config must be a mapping",
                context.pool
            ))
        }
    };
    Ok(Arc::new(PrimaryBackup { spill_over }))
}

fn main() -> anyhow::Result<()> {
    let mut registry = Registry::new();
    registry.register("primary_backup", primary_backup)?;
    llm_lb::app::run_with(Cli::parse(), registry)
}
