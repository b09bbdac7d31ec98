//! The crate's one error type. openraft's storage traits speak
//! `std::io::Error`; [`Error::into_io`] carries ours across with its message.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The engine refused or failed an operation on a stream's log.
    #[error("stream '{stream}': {source}")]
    Engine {
        stream: String,
        #[source]
        source: natswal::Error,
    },

    /// Bytes of a replication format (an entry body, a network frame, a
    /// manifest) are not what the format allows.
    #[error("{0}")]
    Format(String),

    /// An entry or request contradicts the log (a wrong index, a term going
    /// backwards, a frame whose header disagrees with its log id).
    #[error("{0}")]
    Invalid(String),

    /// This node does not lead the stream's group; `leader` does, if known.
    #[error("stream '{stream}': this node is not the leader{}", leader.map_or(String::new(), |leader| format!(" (node {leader} is)")))]
    NotLeader { stream: String, leader: Option<u64> },

    /// openraft refused or failed a request.
    #[error("stream '{stream}': {message}")]
    Raft { stream: String, message: String },

    /// A network operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub fn engine(stream: &str, source: natswal::Error) -> Error {
        Error::Engine {
            stream: stream.to_string(),
            source,
        }
    }

    /// The error as openraft's storage traits want it, keeping the message.
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            Error::Io { source, .. } => source.kind(),
            Error::Format(_) | Error::Invalid(_) => io::ErrorKind::InvalidData,
            Error::Engine { .. } | Error::NotLeader { .. } | Error::Raft { .. } => {
                io::ErrorKind::Other
            }
        };
        io::Error::new(kind, self)
    }
}
