//! [`Registry`]: `lb_policy` names a program adds to llm-lb without forking the crate.
//!
//! A custom policy implements [`super::Policy`] and is registered under a name with a factory
//! that builds it for a pool from a [`CustomContext`] (the pool's endpoints and its `lb_config`
//! as written). The policy file may then name it in `lb_policy`; validation accepts the name,
//! and the factory's error (for instance a bad `lb_config` key) fails the start or the reload
//! like any invalid file.
//!
//! ```
//! use std::sync::Arc;
//!
//! use async_trait::async_trait;
//! use llm_lb::config::Config;
//! use llm_lb::policy::{Pick, PickInput, Policy, PolicyError, Registry};
//!
//! /// Always the first candidate (the pool's endpoints in order of preference).
//! struct First;
//!
//! #[async_trait]
//! impl Policy for First {
//!     fn name(&self) -> &'static str {
//!         "first"
//!     }
//!     fn reasons(&self) -> &'static [&'static str] {
//!         &["first"]
//!     }
//!     async fn pick(&self, input: PickInput<'_>) -> Result<Pick, PolicyError> {
//!         let endpoint = *input.candidates.first().ok_or(PolicyError::Saturated)?;
//!         Ok(Pick { endpoint, reason: "first", lease: None })
//!     }
//! }
//!
//! let mut registry = Registry::new();
//! registry.register("first", |_| Ok(Arc::new(First) as Arc<dyn Policy>))?;
//! let yaml = "pools:\n  - {name: p, models: ['*'], endpoints: ['127.0.0.1:8001'], lb_policy: first}\n";
//! let config = Config::from_yaml_with(yaml, &registry.names())?;
//! registry.check(&config)?;
//! assert_eq!(config.pools[0].policy.name(), "first");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Policy;
use crate::config::{
    Address, Config, ConfigError, EndpointConfig, Issue, PolicyKind, PolicySettings,
};

/// What a custom policy's factory is given for one pool.
pub struct CustomContext<'a> {
    /// The pool's name.
    pub pool: &'a str,
    /// The pool's endpoints, in the order of their [`crate::endpoint::EndpointId`]s.
    pub endpoints: &'a [EndpointConfig],
    /// The pool's `lb_config` as written (`Null` when absent).
    pub lb_config: &'a serde_yaml::Value,
}

/// Builds a custom policy for a pool, or says why it cannot.
pub type Factory = dyn Fn(&CustomContext<'_>) -> Result<Arc<dyn Policy>, String> + Send + Sync;

/// Why a name cannot be registered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// The name is a built-in policy's.
    #[error("'{0}' is a built-in policy")]
    BuiltIn(String),
    /// The name is already registered.
    #[error("'{0}' is already registered")]
    Taken(String),
    /// The name is empty or has characters other than `[a-z0-9_]`.
    #[error("'{0}' is not a policy name (use [a-z0-9_])")]
    BadName(String),
}

/// The custom policies a program registers (the built-in ones need no registration).
#[derive(Clone, Default)]
pub struct Registry {
    custom: BTreeMap<String, Arc<Factory>>,
}

impl Registry {
    /// No custom policy.
    pub fn new() -> Self {
        Self::default()
    }

    /// Offer `name` as an `lb_policy`, built for each pool by `factory`.
    pub fn register<F>(&mut self, name: &str, factory: F) -> Result<&mut Self, RegistryError>
    where
        F: Fn(&CustomContext<'_>) -> Result<Arc<dyn Policy>, String> + Send + Sync + 'static,
    {
        if PolicyKind::parse(name).is_some() {
            return Err(RegistryError::BuiltIn(name.to_owned()));
        }
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(RegistryError::BadName(name.to_owned()));
        }
        if self.custom.contains_key(name) {
            return Err(RegistryError::Taken(name.to_owned()));
        }
        self.custom.insert(name.to_owned(), Arc::new(factory));
        Ok(self)
    }

    /// The registered names, for [`crate::config::load_with`].
    pub fn names(&self) -> Vec<&str> {
        self.custom.keys().map(String::as_str).collect()
    }

    /// Check what parsing cannot: build every pool's custom policy once over the pool's IP
    /// endpoints (names are resolved later), and load every `kv_aware` tokenizer, so a bad
    /// `lb_config` fails validation (and `-t`) rather than the first routing table.
    pub fn check(&self, config: &Config) -> Result<(), ConfigError> {
        let mut issues = Vec::new();
        for (i, pool) in config.pools.iter().enumerate() {
            if let PolicySettings::KvAware(_, kv) = &pool.policy {
                if let Some(dir) = &kv.tokenizer {
                    if let Err(e) = llm_lb_tokenizer::ChatTokenizer::from_dir(dir) {
                        issues.push(Issue {
                            path: format!("pools[{i}].lb_config.tokenizer"),
                            message: format!("{}: {e}", dir.display()),
                        });
                    }
                }
            }
            let PolicySettings::Custom(custom) = &pool.policy else {
                continue;
            };
            let endpoints: Vec<EndpointConfig> = pool
                .endpoints
                .iter()
                .filter_map(|e| match e.address {
                    Address::Ip(addr) => Some(EndpointConfig {
                        addr,
                        weight: e.weight,
                        kv_events: e.kv_events.clone(),
                        kv_events_replay: e.kv_events_replay.clone(),
                    }),
                    Address::Name { .. } => None,
                })
                .collect();
            let context = CustomContext {
                pool: &pool.name,
                endpoints: &endpoints,
                lb_config: &custom.lb_config,
            };
            if let Err(message) = self.build(&custom.name, &context) {
                issues.push(Issue {
                    path: format!("pools[{i}].lb_config"),
                    message,
                });
            }
        }
        if issues.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(issues))
        }
    }

    /// Build the custom policy `name` for one pool.
    pub(super) fn build(
        &self,
        name: &str,
        context: &CustomContext<'_>,
    ) -> Result<Arc<dyn Policy>, String> {
        let factory = self
            .custom
            .get(name)
            .ok_or_else(|| format!("policy '{name}' is not registered"))?;
        factory(context)
    }
}
