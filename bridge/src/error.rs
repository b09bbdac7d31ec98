//! The bridge's one error type.

/// Result alias of the bridge.
pub type Result<T, E = BridgeError> = std::result::Result<T, E>;

/// Everything that can go wrong in the bridge and the CLI.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    /// The storage engine failed.
    #[error(transparent)]
    Engine(#[from] natswal::Error),

    /// An I/O call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// A configuration value is wrong; `key` names it.
    #[error("invalid configuration `{key}`: {reason}")]
    Config { key: String, reason: String },

    /// Talking to NATS failed.
    #[error("NATS: {0}")]
    Nats(String),

    /// A command-line argument or request field is not acceptable.
    #[error("{0}")]
    InvalidArgument(String),
}

impl BridgeError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BridgeError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn nats(context: impl std::fmt::Display, error: impl std::fmt::Display) -> Self {
        BridgeError::Nats(format!("{context}: {error}"))
    }
}
