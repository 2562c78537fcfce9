//! A policy defined outside the crate, registered by name, validated with the policy file and
//! used for picks — through the public API only.

use std::sync::Arc;

use async_trait::async_trait;
use llm_lb::config::Config;
use llm_lb::policy::{CustomContext, Pick, PickInput, Policy, PolicyError, Registry};
use llm_lb::proxy::choose::choose;
use llm_lb::request::LlmRequest;
use llm_lb::routing::{resolve, Generation};

/// Always the last candidate.
struct Last;

#[async_trait]
impl Policy for Last {
    fn name(&self) -> &'static str {
        "last"
    }

    fn reasons(&self) -> &'static [&'static str] {
        &["last"]
    }

    async fn pick(&self, input: PickInput<'_>) -> Result<Pick, PolicyError> {
        let endpoint = *input
            .candidates
            .last()
            .ok_or_else(|| PolicyError::Unavailable("no candidates".into()))?;
        Ok(Pick {
            endpoint,
            reason: "last",
            lease: None,
        })
    }
}

fn registry() -> Registry {
    let mut r = Registry::new();
    r.register("last", |c: &CustomContext<'_>| {
        if c.lb_config.get("bad").is_some() {
            return Err(format!("pool {}: 'bad' is not a key of 'last'", c.pool));
        }
        Ok(Arc::new(Last) as Arc<dyn Policy>)
    })
    .expect("register");
    r
}

const POOL: &str = "pools:\n  - name: p\n    models: ['*']\n    endpoints: ['127.0.0.1:1', '127.0.0.1:2', '127.0.0.1:3']\n    health_check: {enabled: false}\n    lb_policy: last\n";

async fn generation(yaml: &str, registry: &Registry) -> Result<Generation, String> {
    let config = Config::from_yaml_with(yaml, &registry.names()).map_err(|e| e.to_string())?;
    let endpoints = resolve::expand(&config, &Default::default());
    Generation::build(1, config, endpoints, None, registry)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_registered_policy_is_named_in_the_policy_file_and_picks() {
    let registry = registry();
    let g = generation(POOL, &registry).await.expect("generation");
    let pool = &g.routes.pools[0];
    assert_eq!(pool.policy.name(), "last");
    let request =
        LlmRequest::parse(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
    let chosen = choose(pool, &request, &[], 3).await.expect("chosen");
    assert_eq!((chosen.addr.port(), chosen.reason), (3, "last"));
    let tried = [chosen.attempt.endpoint];
    let retry = choose(pool, &request, &tried, 3).await.expect("retry");
    assert_eq!(retry.addr.port(), 2, "the last untried candidate");
}

#[tokio::test]
async fn unknown_names_and_bad_settings_are_refused() {
    // Without the registration the name is unknown, and the error lists what exists.
    let e = Config::from_yaml(POOL).expect_err("unregistered");
    assert!(e.to_string().contains("unknown policy 'last'"), "{e}");
    let e = Config::from_yaml_with(&POOL.replace("last", "lost"), &["last"]).expect_err("typo");
    assert!(
        e.to_string()
            .contains("endpoint_metrics, latency_aware, endpoint_hash, last"),
        "{e}"
    );
    // The factory's own check fails the build, naming the pool.
    let bad = format!("{POOL}    lb_config: {{bad: 1}}\n");
    let e = generation(&bad, &registry()).await.err().expect("refused");
    assert!(e.contains("'bad' is not a key of 'last'"), "{e}");
    // Built-in names cannot be taken, nor names that are not policy names.
    let mut r = Registry::new();
    assert!(r.register("round_robin", |_| Err(String::new())).is_err());
    assert!(r.register("Not A Name", |_| Err(String::new())).is_err());
}
