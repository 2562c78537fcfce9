//! The configuration's errors: one [`Issue`] per problem, located by its field path, and the
//! [`ConfigError`] that collects them. Settings validated outside the file (builders such as
//! [`super::RedisConfig::from_url`]) report an [`InvalidKey`], which validation files under the
//! key's path.

/// A problem in the policy file, located by its field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Where: `pools[1].lb_config.timeout`.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not YAML of the expected shape.
    #[error("{path}: {message}")]
    Parse {
        /// The field path of the problem.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// The file parsed but some values are unusable; every one is listed.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Issue>),
}

/// A setting with an unusable value, named by its key (an `lb_config` key, an
/// `outlier_detection` key or a builder setting). Never contains a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct InvalidKey {
    /// The key as the user wrote it.
    pub key: &'static str,
    /// Why its value cannot be used.
    pub reason: String,
}

impl InvalidKey {
    /// `key` cannot be used because of `reason`.
    pub fn new(key: &'static str, reason: impl Into<String>) -> Self {
        InvalidKey {
            key,
            reason: reason.into(),
        }
    }

    /// The same error reported under the configuration key the user wrote.
    pub fn rekey(self, key: &'static str) -> Self {
        InvalidKey { key, ..self }
    }
}
