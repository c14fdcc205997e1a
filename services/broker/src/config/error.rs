//! [`ConfigError`]: what is wrong with a configuration, one problem or several. A leaf module:
//! the configuration sections (`config/*.rs`) and the loader (`config.rs`) both use it.

/// Configuration errors. Every message names the field (or the source) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or does not fit the schema (unknown key, wrong type).
    #[error("configuration: {0}")]
    Source(String),
    /// A value is present but not acceptable.
    #[error("configuration: `{field}`: {problem}")]
    Invalid {
        /// Dotted path of the field (`grpc.listen`, `seal.keys[0].key_file`).
        field: String,
        /// What is wrong and, where possible, how to fix it.
        problem: String,
    },
    /// No sealing key is configured and the command needs one.
    /// Several problems at once (every unknown key, ill-typed and invalid value found), each
    /// naming its key and source.
    #[error("configuration: {} problems:\n  {}", .0.len(), .0.iter().map(|e| e.to_string().trim_start_matches("configuration: ").to_owned()).collect::<Vec<_>>().join("\n  "))]
    Many(Vec<ConfigError>),
    #[error(
        "configuration: `seal.keys` is empty: the broker needs a sealing key to encrypt secrets at rest.\n\
         Create one and point the configuration at it:\n\
         \n    tokenfleet-broker generate-key > /etc/tokenfleet/seal.key\n    \
         chmod 600 /etc/tokenfleet/seal.key\n\
         \nand in the configuration file:\n\
         \n    [seal]\n    current_key_id = \"k1\"\n    \
         keys = [{{ id = \"k1\", key_file = \"/etc/tokenfleet/seal.key\" }}]\n\
         \n(or run `tokenfleet-broker serve --dev` to try things out with generated keys)"
    )]
    NoSealingKey,
}

impl ConfigError {
    /// One error for `problems`: the only one, or [`ConfigError::Many`].
    pub(crate) fn all(mut problems: Vec<ConfigError>) -> Self {
        if problems.len() == 1 {
            problems.remove(0)
        } else {
            Self::Many(problems)
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            problem: problem.into(),
        }
    }
}
