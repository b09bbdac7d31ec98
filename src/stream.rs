//! Stream: one log (a directory of segments) with its writer and syncer
//! threads. The handle appends through the BatchCoordinator and creates
//! readers; closing drains the queue, syncs and checkpoints.

use crate::config::StreamConfig;
use crate::coordinator::{AppendOutcome, AppendRequest, Completion, Coordinator};
use crate::error::{Error, Result};
use crate::format::record::Record;
use crate::io::FileSystem;
use crate::metrics::StreamMetrics;
use crate::reader::{Reader, StartPosition};
use crate::recovery::{RecoveryManager, RecoveryMode, RecoveryReport};
use crate::retention::RetentionDeletion;
use crate::segment::cache::SegmentCache;
use crate::segment::storage::StorageSegment;
use crate::segment::writer::SegmentWriter;
use crate::subject::SubjectPattern;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use tokio::sync::{oneshot, watch};

/// Called for every segment retention deletes.
pub type RetentionHook = Arc<dyn Fn(&RetentionDeletion) + Send + Sync>;

/// Offset of a new stream's first record. Offsets start at 1, like
/// JetStream sequences, so that 0 can mean "none" (an empty stream's last
/// offset, `Nats-Expected-Last-Sequence: 0`).
pub const FIRST_OFFSET: u64 = 1;

/// Callbacks for events other layers record (audit log, metrics).
#[derive(Clone, Default)]
pub struct StreamHooks {
    pub on_retention: Option<RetentionHook>,
    /// Called when an open switches new segments to another key:
    /// `(stream, old key id, new key id)`; 0 means no encryption.
    pub on_key_rotation: Option<KeyRotationHook>,
}

/// See [`StreamHooks::on_key_rotation`].
pub type KeyRotationHook = Arc<dyn Fn(&str, u32, u32) + Send + Sync>;

impl std::fmt::Debug for StreamHooks {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StreamHooks")
            .field("on_retention", &self.on_retention.is_some())
            .finish()
    }
}

/// State shared by the handle, the writer and syncer threads and readers.
pub(crate) struct StreamShared {
    pub name: String,
    pub directory: PathBuf,
    pub config: StreamConfig,
    pub file_system: Arc<dyn FileSystem>,
    pub cache: Arc<SegmentCache>,
    pub segments: Arc<RwLock<Vec<Arc<StorageSegment>>>>,
    pub coordinator: Coordinator,
    /// Bumped whenever more records become visible (or the stream closes).
    pub visible: watch::Sender<u64>,
    pub metrics: StreamMetrics,
    pub hooks: StreamHooks,
    pub keyring: Arc<crate::codec::Keyring>,
    /// Held while anything of the stream lives.
    pub _lock: crate::io::DirectoryLock,
}

/// The highest nonce epoch in the newest frames of the stream (used only
/// when the epoch file is lost: epochs only grow, so the newest segment with
/// frames holds the highest).
fn epoch_seen_in_log(shared: &StreamShared) -> u32 {
    if shared
        .file_system
        .exists(&shared.directory.join("nonce.epoch"))
    {
        return 0;
    }
    let segments = shared.segments_snapshot();
    for segment in segments.iter().rev() {
        let Ok(bytes) = segment.visible_bytes(&shared.cache) else {
            continue;
        };
        let mut position = crate::format::segment_header::SEGMENT_HEADER_LENGTH;
        let mut highest = 0u32;
        while let crate::format::frame::FrameCheck::Valid(header) =
            crate::format::frame::check_frame(&bytes[position.min(bytes.len())..])
        {
            if header.flags & crate::format::frame::flags::ENCRYPTED != 0 {
                highest = highest.max(u32::from_le_bytes(
                    header.nonce[..4].try_into().expect("4 bytes"),
                ));
            }
            position += header.frame_length as usize;
        }
        if position > crate::format::segment_header::SEGMENT_HEADER_LENGTH {
            return highest;
        }
    }
    0
}

impl StreamShared {
    pub fn segments_snapshot(&self) -> Vec<Arc<StorageSegment>> {
        self.segments
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn notify_readers(&self) {
        self.visible
            .send_modify(|version| *version = version.wrapping_add(1));
    }

    /// Drops the `count` oldest segments from the list readers see.
    pub fn remove_segments(&self, count: usize) {
        let mut segments = self
            .segments
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = count.min(segments.len().saturating_sub(1));
        segments.drain(..count);
    }
}

/// A snapshot of a stream's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStatus {
    pub name: String,
    /// Offset of the oldest stored record (equal to `next_offset` if empty).
    pub first_offset: u64,
    /// Offset the next appended record gets (of what is visible).
    pub next_offset: u64,
    pub records: u64,
    pub bytes: u64,
    pub segments: usize,
    pub first_timestamp_ns: Option<i64>,
    pub last_timestamp_ns: Option<i64>,
    /// Set when a failed sync made the stream read-only.
    pub poisoned: Option<String>,
}

/// A sealed segment as a file that can be shipped and checked by CRC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSegment {
    pub path: PathBuf,
    pub base_offset: u64,
    pub next_offset: u64,
    pub length: u64,
    /// CRC32C of the whole file.
    pub crc32c: u32,
}

/// How to open a stream.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub config: StreamConfig,
    pub recovery_mode: RecoveryMode,
    pub hooks: StreamHooks,
    /// Keys for encrypted segments, old and current.
    pub keyring: Arc<crate::codec::Keyring>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            config: StreamConfig::default(),
            recovery_mode: RecoveryMode::Strict,
            hooks: StreamHooks::default(),
            keyring: Arc::new(crate::codec::Keyring::default()),
        }
    }
}

/// An open stream.
pub struct Stream {
    shared: Arc<StreamShared>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Stream")
            .field("name", &self.shared.name)
            .finish()
    }
}

/// Checks a stream name: `[A-Za-z0-9_-]{1,64}`.
pub fn validate_stream_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "stream name '{name}' must be 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'"
        )))
    }
}

impl Stream {
    /// Opens (recovering if needed) or creates the stream stored in `directory`.
    pub fn open(
        file_system: Arc<dyn FileSystem>,
        directory: &Path,
        name: &str,
        cache: Arc<SegmentCache>,
        options: StreamOptions,
    ) -> Result<(Stream, RecoveryReport)> {
        validate_stream_name(name)?;
        options.config.validate()?;
        let recovered = RecoveryManager::open(
            &file_system,
            directory,
            &options.config,
            options.recovery_mode,
        )?;
        let report = recovered.report.clone();
        if !report.truncated.is_empty() || !report.quarantined.is_empty() {
            tracing::warn!(stream = name, ?report, "stream recovered with changes");
        } else {
            tracing::info!(
                stream = name,
                segments = report.segments,
                validated_bytes = report.validated_bytes,
                clean = report.clean_shutdown,
                "stream opened"
            );
        }
        let segments = Arc::new(RwLock::new(recovered.segments));
        let (visible, _) = watch::channel(0u64);
        let shared = Arc::new(StreamShared {
            name: name.to_string(),
            directory: directory.to_path_buf(),
            config: options.config.clone(),
            file_system: Arc::clone(&file_system),
            cache: Arc::clone(&cache),
            segments: Arc::clone(&segments),
            coordinator: Coordinator::new(options.config.queue_bytes_max),
            visible,
            metrics: StreamMetrics::default(),
            hooks: options.hooks.clone(),
            keyring: Arc::clone(&options.keyring),
            _lock: recovered.lock,
        });
        let encryption = match options.config.encryption {
            None => None,
            Some(encryption) => {
                let key = options.keyring.get(encryption.key_id).ok_or_else(|| Error::InvalidConfig {
                    key: "encryption".to_string(),
                    reason: format!(
                        "stream '{name}' is to be encrypted with key id {}, which is not configured (configured: {:?})",
                        encryption.key_id,
                        options.keyring.ids()
                    ),
                })?;
                Some((encryption.cipher, Arc::clone(key)))
            }
        };
        let epoch = if encryption.is_some() {
            crate::codec::next_epoch(file_system.as_ref(), directory, epoch_seen_in_log(&shared))?
        } else {
            0
        };
        let encoder =
            crate::codec::FrameEncoder::new(options.config.compression, encryption, epoch);
        let mut writer = SegmentWriter::new(
            file_system,
            directory,
            options.config,
            cache,
            segments,
            recovered.active,
            recovered.next_offset,
            recovered.timestamp_max,
        );
        writer.encoder = encoder;
        // A new key (or a change to or from encryption) starts a new segment,
        // so that every segment is written with one key.
        let wanted = writer.encoder.segment_key();
        if let Some(active) = writer.active_key() {
            if active != wanted {
                if let Some(sealed) = writer.seal_active() {
                    crate::segment::writer::finish_sealed(
                        shared.file_system.as_ref(),
                        &shared.cache,
                        sealed,
                    )?;
                }
                tracing::info!(
                    stream = name,
                    from = active.0,
                    to = wanted.0,
                    "key rotation: new segments use the new key"
                );
                if let Some(hook) = &options.hooks.on_key_rotation {
                    hook(name, active.0, wanted.0);
                }
            }
        }
        let thread_shared = Arc::clone(&shared);
        let writer_thread = std::thread::Builder::new()
            .name(format!("natswal-write-{name}"))
            .spawn(move || crate::coordinator::run_writer(thread_shared, writer))
            .map_err(|error| Error::io("cannot start the writer thread", error))?;
        Ok((
            Stream {
                shared,
                writer_thread: Mutex::new(Some(writer_thread)),
            },
            report,
        ))
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn config(&self) -> &StreamConfig {
        &self.shared.config
    }

    pub fn directory(&self) -> &Path {
        &self.shared.directory
    }

    pub fn metrics(&self) -> &StreamMetrics {
        &self.shared.metrics
    }

    /// Appends one record; resolves once it meets the stream's durability.
    pub async fn append(&self, record: Record) -> Result<AppendOutcome> {
        self.append_request(AppendRequest {
            records: vec![record],
            ..AppendRequest::default()
        })
        .await
    }

    /// Appends records as one atomic frame: after a crash they are all there
    /// or none is, and no reader ever sees part of them.
    pub async fn append_batch(&self, records: Vec<Record>) -> Result<AppendOutcome> {
        self.append_request(AppendRequest {
            records,
            atomic: true,
            ..AppendRequest::default()
        })
        .await
    }

    /// Appends a request and waits for its durability.
    pub async fn append_request(&self, request: AppendRequest) -> Result<AppendOutcome> {
        let (sender, receiver) = oneshot::channel();
        self.shared
            .enqueue(request, Completion::Oneshot(sender))
            .await?;
        receiver.await.map_err(|_| Error::Closed {
            stream: self.shared.name.clone(),
        })?
    }

    /// Queues an append and returns as soon as it is queued (waiting only
    /// while the queue is full); `completion` reports its durability. This
    /// is how a producer keeps many appends in flight.
    pub async fn submit(&self, request: AppendRequest, completion: Completion) -> Result<()> {
        self.shared.enqueue(request, completion).await
    }

    /// A reader from `start`, optionally filtered by a subject pattern.
    pub fn reader(&self, start: StartPosition, filter: Option<SubjectPattern>) -> Result<Reader> {
        Reader::new(Arc::clone(&self.shared), start, filter)
    }

    pub fn status(&self) -> StreamStatus {
        let segments = self.shared.segments_snapshot();
        let records = segments.iter().map(|segment| segment.record_count()).sum();
        let next_offset = segments
            .last()
            .map_or(FIRST_OFFSET, |segment| segment.next_offset());
        let first_offset = segments
            .iter()
            .find(|segment| segment.record_count() > 0)
            .map_or(next_offset, |segment| segment.base_offset());
        let with_records: Vec<_> = segments
            .iter()
            .filter(|segment| segment.record_count() > 0)
            .collect();
        StreamStatus {
            name: self.shared.name.clone(),
            first_offset,
            next_offset,
            records,
            bytes: segments
                .iter()
                .map(|segment| segment.visible_length())
                .sum(),
            segments: segments.len(),
            first_timestamp_ns: with_records
                .first()
                .map(|segment| segment.progress().first_timestamp_ns),
            last_timestamp_ns: with_records
                .last()
                .map(|segment| segment.timestamp_max_through()),
            poisoned: self.shared.coordinator.poison_cause(),
        }
    }

    /// Tells the writer the message id of the last stored record (read from
    /// the log at start), for `ExpectedLastMessageId` preconditions.
    pub fn set_last_message_id(&self, id: Option<Arc<str>>) {
        self.shared.coordinator.set_last_message_id(id);
    }

    /// The last stored record, if any.
    pub fn last_record(&self) -> Result<Option<crate::StoredRecord>> {
        let next = self.status().next_offset;
        if next <= FIRST_OFFSET {
            return Ok(None);
        }
        let mut reader = self.reader(StartPosition::Offset(next - 1), None)?;
        reader.next()
    }

    /// Sealed segments, oldest first, as files with their CRC.
    pub fn sealed_segments(&self) -> Vec<SealedSegment> {
        self.shared
            .segments_snapshot()
            .iter()
            .filter(|segment| segment.is_indexed())
            .map(|segment| SealedSegment {
                path: segment.path().to_path_buf(),
                base_offset: segment.base_offset(),
                next_offset: segment.next_offset(),
                length: segment.visible_length(),
                crc32c: segment.segment_crc(),
            })
            .collect()
    }

    /// Applies retention now (it also runs in the background).
    pub fn enforce_retention(&self) -> Result<Vec<RetentionDeletion>> {
        crate::retention::enforce(&self.shared, crate::segment::writer::now_ns())
    }

    /// Stops intake, writes and syncs everything queued, completes its
    /// appends, checkpoints and stops the threads. Blocks; idempotent.
    pub fn close(&self) -> Result<()> {
        self.shared.coordinator.begin_close();
        let handle = self
            .writer_thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                return Err(Error::InvalidInput(format!(
                    "writer thread of stream '{}' panicked",
                    self.shared.name
                )));
            }
        }
        match self.shared.coordinator.poison_cause() {
            Some(cause) => Err(Error::Poisoned {
                stream: self.shared.name.clone(),
                cause,
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
