//! natswal: the write-ahead log engine behind the natswal NATS bridge.
//!
//! Records are appended through the [`coordinator`] (BatchCoordinator) into
//! batch frames written by the [`segment::writer`] (SegmentWriter) into
//! memory-mapped segment files; sealed segments are [`segment::storage`]
//! (StorageSegment) maps with sparse offset and time indexes; the
//! [`recovery`] module (RecoveryManager) validates, repairs and restores.
//! The byte layout is in `docs/FORMAT.md` and [`format`]; all file I/O goes
//! through [`io::FileSystem`].
//!
//! The engine knows nothing of NATS or Raft; it keeps their seams: Raft
//! term and index in every frame header, a durable truncate of a log suffix
//! ([`recovery::RecoveryManager::truncate_suffix`]), and sealed segments
//! shipped as files checked by CRC ([`stream::Stream::sealed_segments`]).

pub mod codec;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod format;
pub mod io;
pub mod metrics;
pub mod reader;
pub mod recovery;
pub mod retention;
pub mod segment;
pub mod store;
pub mod stream;
pub mod subject;

pub use codec::{Cipher, Compression, EncryptionConfig, Key, Keyring};
pub use config::{Durability, RetentionPolicy, StreamConfig};
pub use coordinator::{AppendOutcome, AppendRequest, Completed, Completion, Precondition};
pub use error::{Error, PreconditionFailure, Result};
pub use format::record::{Record, StoredRecord};
pub use reader::{decode_frame_bytes, Reader, StartPosition, StoredFrame};
pub use recovery::{PointInTime, RecoveryManager, RecoveryMode, RecoveryReport};
pub use store::Store;
pub use stream::{Stream, StreamOptions, StreamStatus, FIRST_OFFSET};
pub use subject::SubjectPattern;
