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
}
