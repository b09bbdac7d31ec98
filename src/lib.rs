//! natswal: the write-ahead log engine behind the natswal NATS bridge.
//!
//! Layers, each using only the ones below it:
//! - [`stream`]: a [`Stream`] is a [`log::Log`] with its
//!   [`coordinator`] (the BatchCoordinator: queue, adaptive batching,
//!   preconditions, group commit) and the threads that drive it;
//!   [`reader`] and [`retention`] work on the log too;
//! - [`log`]: the Log owns the segments and their invariants: the
//!   SegmentWriter ([`log::writer`]), StorageSegment ([`log::segment`]),
//!   the RecoveryManager ([`log::recovery`]), the durable watermark and the
//!   one owner of every sync ([`log::durability`]), truncation and segment
//!   install. Its API is what Raft replication builds on;
//! - [`format`]: the byte layout of docs/FORMAT.md; [`codec`]: compression
//!   and encryption of frame bodies; [`io`]: all file I/O, behind one
//!   trait, with an in-memory implementation that crashes and fails on
//!   demand.
//!
//! The engine knows nothing of NATS or Raft; it keeps their seams: Raft
//! term and index in every frame header, frames that are byte-identical
//! across replicas, crash-atomic truncation, and sealed segments shipped
//! as files checked by CRC.

pub mod codec;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod format;
pub mod io;
pub mod log;
pub mod metrics;
pub mod pool;
pub mod reader;
pub mod retention;
pub mod sim;
pub mod store;
pub mod stream;
pub mod subject;

pub use codec::{Cipher, Compression, EncryptionConfig, Key, Keyring};
pub use config::{Durability, RetentionPolicy, StreamConfig};
pub use coordinator::{AppendOutcome, AppendRequest, Completed, Completion, Precondition};
pub use error::{Error, PreconditionFailure, Result};
pub use format::record::{Record, StoredRecord};
pub use log::cache::SegmentCache;
pub use log::recovery::{
    PointInTime, RecoveryManager, RecoveryMode, RecoveryReport, TruncateReport, VerifyReport,
};
pub use log::{Log, LogOptions, SealedSegment, StoredFrame};
pub use reader::{decode_frame_bytes, Reader, StartPosition};
pub use store::Store;
pub use stream::{Driver, Stream, StreamHooks, StreamOptions, StreamStatus, FIRST_OFFSET};
pub use subject::SubjectPattern;

/// Locks a mutex, taking it over if a holder panicked, so that one panic
/// does not turn every later lock into a panic too (the engine reports
/// failures through its errors and the stream's poisoning).
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
