//! The engine's one error type. Every variant carries the context an operator
//! needs to act: which stream, file, byte position or configuration key.

use std::path::PathBuf;

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the storage engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The disk has no room; nothing of the failed operation was acknowledged.
    #[error(
        "disk full: {context}; nothing of this write was acknowledged, earlier data is intact"
    )]
    DiskFull { context: String },

    /// A sync failed earlier; the writer refuses all further appends.
    #[error(
        "stream '{stream}' is read-only: a sync failed ({cause}); no append after the last \
         successful sync was acknowledged and none will be until natswal is restarted"
    )]
    Poisoned { stream: String, cause: String },

    /// Bytes on disk do not match their checksum or structure.
    #[error("corruption in {path} at byte {position}: {reason}")]
    Corruption {
        path: PathBuf,
        position: u64,
        reason: String,
    },

    /// Records are encrypted with a key that is not configured. They are
    /// intact; configuring the key makes them readable again. Records from
    /// `resume_offset` on are in other segments and may be readable.
    #[error(
        "{path} is encrypted with key id {key_id}, which is not configured (add that key to read it); readable records may resume at offset {resume_offset}"
    )]
    KeyUnavailable {
        path: PathBuf,
        key_id: u32,
        resume_offset: u64,
    },

    /// Another process holds the stream directory's lock.
    #[error(
        "{path} is held by another process (a running natswal serve, or an offline repair, restore or truncate); stop it first"
    )]
    Locked { path: PathBuf },

    /// A file of a format version this build does not read.
    #[error(
        "{path} uses format version {found}; this natswal reads version {supported}; {}",
        version_hint(*found, *supported)
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u16,
        supported: u16,
    },

    /// A record is larger than the stream allows.
    #[error("record of {size_bytes} bytes exceeds the stream's maximum of {limit_bytes} bytes")]
    RecordTooLarge { size_bytes: u64, limit_bytes: u64 },

    /// A caller passed something the engine cannot accept.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration `{key}`: {reason}")]
    InvalidConfig { key: String, reason: String },

    /// The stream was closed while the operation was pending.
    #[error("stream '{stream}' is closed")]
    Closed { stream: String },

    /// An injected fault (in-memory file system only).
    #[error("injected fault: {0}")]
    Injected(String),

    /// A publish precondition did not hold when the writer checked it.
    #[error("{0}")]
    PreconditionFailed(PreconditionFailure),

    /// A segment left the stream (retention, truncation) while being read.
    #[error("{path} was removed from the stream while it was being read")]
    SegmentRemoved { path: PathBuf },

    /// The stream was truncated below what a reader had already read.
    #[error(
        "stream '{stream}' was truncated: it now ends before offset {next_offset}, but this reader had read up to offset {reader_offset}"
    )]
    Truncated {
        stream: String,
        next_offset: u64,
        reader_offset: u64,
    },
}

fn version_hint(found: u16, supported: u16) -> &'static str {
    if found > supported {
        "upgrade natswal"
    } else {
        "it was written by an earlier natswal; read it with that version (or replay it into a new stream)"
    }
}

/// Why a precondition failed, with the stream's actual state at the moment
/// the writer checked it (in offset order, so racing appends cannot both
/// pass).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PreconditionFailure {
    /// The last offset was `last` (0: the stream is empty).
    WrongLastOffset { expected: u64, last: u64 },
    /// The last record carried message id `last` (None: no id).
    WrongLastMessageId {
        expected: String,
        last: Option<String>,
    },
}

impl std::fmt::Display for PreconditionFailure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PreconditionFailure::WrongLastOffset { last, .. } => {
                write!(formatter, "wrong last sequence: {last}")
            }
            PreconditionFailure::WrongLastMessageId { last, .. } => {
                write!(
                    formatter,
                    "wrong last msg ID: {}",
                    last.as_deref().unwrap_or("")
                )
            }
        }
    }
}

impl Error {
    /// Wraps an I/O error with context, mapping ENOSPC to [`Error::DiskFull`].
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        let context = context.into();
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.kind() == std::io::ErrorKind::StorageFull
        {
            return Error::DiskFull { context };
        }
        Error::Io { context, source }
    }

    pub(crate) fn corruption(
        path: impl Into<PathBuf>,
        position: u64,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corruption {
            path: path.into(),
            position,
            reason: reason.into(),
        }
    }

    /// True for errors that mean stored bytes are damaged.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corruption { .. })
    }

    /// A stable, short name of the kind of error, for metrics labels.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::DiskFull { .. } => "disk_full",
            Error::Poisoned { .. } => "poisoned",
            Error::Corruption { .. } => "corruption",
            Error::KeyUnavailable { .. } => "key_unavailable",
            Error::Locked { .. } => "locked",
            Error::UnsupportedVersion { .. } => "unsupported_version",
            Error::RecordTooLarge { .. } => "too_large",
            Error::InvalidInput(_) => "invalid_input",
            Error::InvalidConfig { .. } => "invalid_config",
            Error::Closed { .. } => "closed",
            Error::Injected(_) => "injected",
            Error::PreconditionFailed(_) => "precondition_failed",
            Error::SegmentRemoved { .. } => "segment_removed",
            Error::Truncated { .. } => "truncated",
        }
    }

    /// A copy for fanning one failure out to many waiters (I/O sources are
    /// not `Clone`, so they are rendered into the context).
    pub fn duplicate(&self) -> Self {
        match self {
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::DiskFull { context } => Error::DiskFull {
                context: context.clone(),
            },
            Error::Poisoned { stream, cause } => Error::Poisoned {
                stream: stream.clone(),
                cause: cause.clone(),
            },
            Error::Corruption {
                path,
                position,
                reason,
            } => Error::Corruption {
                path: path.clone(),
                position: *position,
                reason: reason.clone(),
            },
            Error::KeyUnavailable {
                path,
                key_id,
                resume_offset,
            } => Error::KeyUnavailable {
                path: path.clone(),
                key_id: *key_id,
                resume_offset: *resume_offset,
            },
            Error::Locked { path } => Error::Locked { path: path.clone() },
            Error::UnsupportedVersion {
                path,
                found,
                supported,
            } => Error::UnsupportedVersion {
                path: path.clone(),
                found: *found,
                supported: *supported,
            },
            Error::RecordTooLarge {
                size_bytes,
                limit_bytes,
            } => Error::RecordTooLarge {
                size_bytes: *size_bytes,
                limit_bytes: *limit_bytes,
            },
            Error::InvalidInput(message) => Error::InvalidInput(message.clone()),
            Error::InvalidConfig { key, reason } => Error::InvalidConfig {
                key: key.clone(),
                reason: reason.clone(),
            },
            Error::Closed { stream } => Error::Closed {
                stream: stream.clone(),
            },
            Error::Injected(message) => Error::Injected(message.clone()),
            Error::PreconditionFailed(failure) => Error::PreconditionFailed(failure.clone()),
            Error::SegmentRemoved { path } => Error::SegmentRemoved { path: path.clone() },
            Error::Truncated {
                stream,
                next_offset,
                reader_offset,
            } => Error::Truncated {
                stream: stream.clone(),
                next_offset: *next_offset,
                reader_offset: *reader_offset,
            },
        }
    }
}
