//! The Log: one stream's segments and everything that keeps them correct.
//! It owns the segment files, the durable watermark, the metadata file and
//! every multi-step file operation; the stream, the BatchCoordinator,
//! readers and retention use it through this API only (the arrows run one
//! way: stream -> coordinator -> log -> segments), and so will Raft
//! replication:
//!
//! - [`Log::append`] writes a frame of records as the leader (the log
//!   assigns the offsets; the caller gives the Raft term and index);
//!   [`Log::append_stored`] writes a frame exactly as a leader stored it,
//!   checking that its offsets and Raft index continue the log;
//!   [`Log::append_raft_entry`] writes a blank or membership entry;
//! - [`Log::sync`] makes everything written durable (group commit) through
//!   the [`durability`] gate, which owns every sync of the log's files;
//!   [`Log::durable`], [`Log::subscribe_durable`] and
//!   [`Log::wait_durable`] give the durable watermark (last durable Raft id
//!   and offset) and resolve when an index is durable;
//! - [`Log::read_frames`] reads stored frames by Raft index or offset range,
//!   as the bytes on disk, never a short range;
//! - [`Log::truncate_after`] / [`Log::truncate_from_offset`] cut the log
//!   online and crash-atomically (a durable intent, then the steps; an open
//!   after a crash finishes them), never splitting a Raft entry; readers past
//!   the cut get [`Error::Truncated`], never stale bytes;
//! - [`Log::install_segment`] links in a sealed segment received from a
//!   peer, checked by CRC and walked before it is renamed in: a crash leaves
//!   no segment or the whole one; [`Log::read_sealed_segment`] and
//!   [`Log::receive_segment_bytes`] carry such a file in chunks, and
//!   [`Log::fill_stored`] appends committed frames that fill a log back up
//!   below its purge point;
//! - [`Log::raft_holes`] and [`restore::restore_raft_frames`] find the
//!   Raft entries a repair cut out and write a peer's copies of them back
//!   in place (crash-atomic, like a repair); [`Log::sealed_segment_damage`]
//!   and [`Log::restore_sealed_segment`] do the same for a sealed segment
//!   damaged while the log runs, swapping the rebuilt segment in;
//! - [`Log::metadata`] and the `save_*` methods keep the Raft vote, commit
//!   index and purge point in the stream's metadata file (atomic, CRC'd; a
//!   damaged one is an error, never a default).
//!
//! Invariants: offsets are dense (a repair's gap frame records lost ones);
//! Raft indexes of consecutive entries are consecutive; every frame below a
//! segment's visible length is whole and checksummed; nothing written after
//! the last successful sync is reported durable; a segment that is not the
//! last holds every offset up to the next one's first.

pub mod cache;
pub mod durability;
pub mod group_sync;
pub mod index;
pub mod recovery;
pub mod restore;
pub mod segment;
pub(crate) mod walker;
pub mod writer;

use crate::codec::{FrameEncoder, Keyring};
use crate::config::StreamConfig;
use crate::error::{Error, Result};
use crate::format::frame::{FrameBuilder, FrameHeader, FrameKind, FRAME_HEADER_LENGTH};
use crate::format::index::{encode_index, IndexEntry, INDEX_FLAG_SEALED};
use crate::format::metadata::{CleanMark, LogId, StreamMetadata, Vote, METADATA_FILE_NAME};
use crate::format::segment_header::{SegmentHeader, SEGMENT_HEADER_LENGTH};
use crate::io::{File, FileSystem};
use crate::lock;
use cache::SegmentCache;
use durability::{DurabilityGate, DurablePoint};
use recovery::{RecoveryManager, RecoveryMode, RecoveryReport, TruncateReport};
use segment::StorageSegment;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use tokio::sync::watch;
use walker::{read_slot, ByteSource, Slot};
use writer::{
    ActiveSegment, AllocationPace, AppendMeta, Appended, SealJob, SegmentWriter, WriterState,
    RECYCLE_DIRECTORY,
};

/// One frame exactly as stored: its checked header and its bytes (header
/// included, slot excluded).
#[derive(Debug, Clone)]
pub struct StoredFrame {
    pub header: FrameHeader,
    pub bytes: bytes::Bytes,
}

impl StoredFrame {
    pub fn is_encrypted(&self) -> bool {
        self.header.is_encrypted()
    }

    pub fn is_compressed(&self) -> bool {
        self.header.is_compressed()
    }
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
    pub first_raft_index: u64,
    pub last_log_id: LogId,
}

/// How often a read of frames starts over after the segment it was in
/// was replaced (a truncation or restore each time): a log that keeps a
/// removed segment listed (a truncation failed half way) fails it.
const READ_RETRIES_MAX: u32 = 8;

/// A range of frames to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameRange {
    /// Frames with Raft index in `[start, end)`.
    RaftIndex { start: u64, end: u64 },
    /// Frames holding offsets in `[start, end)` (the first may begin
    /// before `start`).
    Offset { start: u64, end: u64 },
}

/// Maintenance intervals between two idle checkpoints of one log (see
/// `Log::checkpoint_if_idle`).
pub const IDLE_CHECKPOINT_SPACING: u64 = 30;

/// How to open a log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub name: String,
    pub config: StreamConfig,
    pub recovery_mode: RecoveryMode,
    /// Keys for encrypted segments, old and current.
    pub keyring: Arc<Keyring>,
    /// The node whose nonces this log's frames carry (0 standalone).
    pub node_id: u16,
    pub cache: Arc<SegmentCache>,
    /// Set by a store that holds its directory's lock; `None` takes the
    /// stream directory's own lock (see `recovery::lock_stream_directory`).
    pub store_locked: Option<crate::io::StoreLocked>,
    /// The store's group syncer, if the log's directory is on its file
    /// system: [`Log::sync_grouped`] syncs through it.
    pub group_sync: Option<Arc<group_sync::GroupSync>>,
}

/// The shared state of one log.
pub(crate) struct LogShared {
    pub name: String,
    pub directory: PathBuf,
    pub file_system: Arc<dyn FileSystem>,
    pub config: StreamConfig,
    pub cache: Arc<SegmentCache>,
    pub keyring: Arc<Keyring>,
    pub segments: RwLock<Vec<Arc<StorageSegment>>>,
    pub gate: DurabilityGate,
    pub metadata: Mutex<StreamMetadata>,
    pub seals: Mutex<Vec<SealJob>>,
    /// Bumped by every truncation: readers reposition or fail.
    pub truncations: AtomicU64,
    /// The offset each truncation cut at, in order (appends written before
    /// one of them at or past its cut were removed).
    pub cuts: Mutex<Vec<u64>>,
    /// Bumped whenever more frames may be visible (or the log closes).
    pub visible: watch::Sender<u64>,
    /// Durable length of the active segment at its last checkpoint.
    pub checkpointed: AtomicU64,
    /// The write sequence the previous maintenance saw (idle detection).
    pub maintenance_written: AtomicU64,
    /// Maintenance runs so far, and the one that wrote the last idle
    /// checkpoint (0: none yet).
    pub maintenance_ticks: AtomicU64,
    pub idle_checkpoint_tick: AtomicU64,
    /// Segment files this open created new, and reused from `recycle/`.
    pub segment_files_created: AtomicU64,
    pub segment_files_recycled: AtomicU64,
    pub group_sync: Option<Arc<group_sync::GroupSync>>,
    /// The sync handed to `group_sync`, while it runs and until its
    /// outcome is taken.
    pub grouped: Mutex<Grouped>,
    pub _lock: crate::io::DirectoryLock,
}

/// Where a log's grouped sync stands.
#[derive(Default)]
pub(crate) enum Grouped {
    #[default]
    Idle,
    Pending,
    Done(Result<DurablePoint>),
}

/// What [`Log::sync_grouped`] did.
pub(crate) enum SyncProgress {
    /// The sync ended (or was not needed): its outcome.
    Done(Result<DurablePoint>),
    /// The group's thread runs it and will call the waker.
    Pending,
}

impl LogShared {
    pub fn gate_check(&self) -> Result<()> {
        if self.gate.is_poisoned() {
            return Err(self.gate.poisoned_error());
        }
        Ok(())
    }

    pub fn segments_snapshot(&self) -> Vec<Arc<StorageSegment>> {
        self.segments
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn push_segment(&self, segment: Arc<StorageSegment>) {
        self.segments
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(segment);
    }

    /// Puts `replacement` where `segment` is in the list (a sealed
    /// segment restored while the log runs).
    pub fn replace_segment(&self, segment: &Arc<StorageSegment>, replacement: Arc<StorageSegment>) {
        let mut segments = self
            .segments
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let slot = segments
            .iter_mut()
            .find(|listed| Arc::ptr_eq(listed, segment))
            .expect("a segment replaced is listed (the writer lock is held)");
        *slot = replacement;
    }

    pub fn notify_readers(&self) {
        self.visible
            .send_modify(|version| *version = version.wrapping_add(1));
    }

    pub fn queue_seal(&self, job: SealJob) {
        lock(&self.seals).push(job);
    }

    pub fn too_old(&self, active: &ActiveSegment, now_ns: i64) -> bool {
        match (self.config.segment_age_max_ms, active.first_write_ns) {
            (Some(age_max_ms), Some(first)) => {
                now_ns.saturating_sub(first) >= (age_max_ms as i64).saturating_mul(1_000_000)
            }
            _ => false,
        }
    }

    fn metadata_path(&self) -> PathBuf {
        self.directory.join(METADATA_FILE_NAME)
    }

    /// Writes changed metadata atomically, then keeps it.
    fn save_metadata(&self, change: impl FnOnce(&mut StreamMetadata)) -> Result<StreamMetadata> {
        let mut metadata = lock(&self.metadata);
        let mut next = *metadata;
        change(&mut next);
        self.file_system
            .write_atomic(&self.metadata_path(), &next.encode())?;
        *metadata = next;
        Ok(next)
    }

    /// Raises the generation and nonce epoch and clears the clean mark,
    /// durably: done before the first write of an open or a truncation.
    pub fn raise_generation(&self) -> Result<StreamMetadata> {
        let current = *lock(&self.metadata);
        let generation = current.generation.checked_add(1);
        let epoch = current.nonce_epoch.checked_add(1);
        let (Some(generation), Some(epoch)) = (generation, epoch) else {
            return Err(Error::InvalidInput(format!(
                "the generations or nonce epochs of stream '{}' are exhausted; copy it under a new key",
                self.name
            )));
        };
        self.save_metadata(|metadata| {
            metadata.generation = generation;
            metadata.nonce_epoch = epoch;
            metadata.clean = None;
        })
    }

    /// Removes an active segment that holds no frame, durably.
    pub fn remove_empty_segment(&self, segment: &Arc<StorageSegment>) -> Result<()> {
        segment.mark_removed();
        self.segments
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|listed| !Arc::ptr_eq(listed, segment));
        for path in [segment.index_path(), segment.path()] {
            if self.file_system.exists(path) {
                self.file_system.remove(path)?;
            }
        }
        self.gate
            .sync_directory(self.file_system.as_ref(), &self.directory)
    }

    /// Creates the file of a new segment with `header`: a recycled file if
    /// one waits, else a new one; built under another name, its header
    /// synced, then renamed in and the directory synced.
    pub fn install_new_segment_file(
        &self,
        header: &SegmentHeader,
        allocate_bytes: u64,
    ) -> Result<(Arc<dyn File>, u64)> {
        let path = self
            .directory
            .join(crate::format::segment_file_name(header.base_offset));
        // A recycled file keeps the blocks it has (its length).
        let capacity = allocate_bytes
            .max(SEGMENT_HEADER_LENGTH as u64)
            .min(self.config.segment_bytes_max);
        let recycle = self.directory.join(RECYCLE_DIRECTORY);
        let recycled = if self.file_system.is_directory(&recycle) {
            self.file_system.list(&recycle)?.into_iter().next()
        } else {
            None
        };
        let (staging, file) = match recycled {
            Some(name) => {
                let staging = recycle.join(name);
                (staging.clone(), self.file_system.open(&staging, true)?)
            }
            None => {
                let staging = crate::io::temporary_path(&path);
                if self.file_system.exists(&staging) {
                    self.file_system.remove(&staging)?;
                }
                (staging.clone(), self.file_system.create(&staging)?)
            }
        };
        let prepared = file
            .allocate(capacity)
            .and_then(|()| file.write_at(0, &header.encode()));
        if let Err(error) = prepared {
            if staging
                .extension()
                .is_some_and(|extension| extension == "tmp")
            {
                let _ = self.file_system.remove(&staging);
            }
            return Err(error);
        }
        self.gate.sync_file(file.as_ref(), true, 0, 0)?;
        self.file_system.rename(&staging, &path)?;
        self.gate
            .sync_directory(self.file_system.as_ref(), &self.directory)?;
        if staging.starts_with(&recycle) {
            self.gate
                .sync_directory(self.file_system.as_ref(), &recycle)?;
        }
        drop(file);
        let counter = if staging.starts_with(&recycle) {
            &self.segment_files_recycled
        } else {
            &self.segment_files_created
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // Opened again under its name, so that errors name the segment.
        let file = self.file_system.open(&path, true)?;
        let capacity = file.length()?.max(capacity);
        Ok((file, capacity))
    }

    /// Cuts and indexes the segments whose frames rotation made durable.
    /// Index writes failing (a full disk) do not poison: indexes are
    /// derived data and retried later.
    pub fn finish_seals(&self) -> Result<()> {
        let jobs: Vec<SealJob> = std::mem::take(&mut *lock(&self.seals));
        for job in jobs {
            if job.segment.is_removed() {
                continue;
            }
            if let Err(error) = job.file.set_length(job.length) {
                self.gate.poison(&error);
                return Err(self.gate.poisoned_error());
            }
            self.gate.sync_file(job.file.as_ref(), true, 0, 0)?;
            let crc = match job.crc {
                Some(crc) => crc,
                None => crc32c::crc32c(&crate::io::read_exact(
                    job.file.as_ref(),
                    0,
                    job.length as usize,
                )?),
            };
            let mut header = job.builder.header(job.length, job.segment.header().salt);
            header.flags |= INDEX_FLAG_SEALED;
            header.segment_crc = crc;
            let entries: Vec<IndexEntry> = job.builder.entries.clone();
            let encoded = encode_index(&header, &entries);
            if let Err(error) = self
                .file_system
                .write_atomic(job.segment.index_path(), &encoded)
            {
                tracing::warn!(stream = %self.name, %error, "cannot write a sealed segment's index; it is kept in memory and retried");
                job.segment.set_pending_index(encoded);
            }
            job.segment.mark_indexed(crc, entries);
            self.cache.insert(&job.segment);
            tracing::debug!(segment = %job.segment.path().display(), length = job.length, "segment sealed");
        }
        self.notify_readers();
        Ok(())
    }

    /// The active segment (the last one, if not sealed).
    fn active_segment(&self) -> Option<Arc<StorageSegment>> {
        self.segments_snapshot()
            .last()
            .filter(|segment| !segment.is_sealed())
            .cloned()
    }

    /// Rewrites the active segment's checkpoint from what is durable (no
    /// writer lock needed). A failure is logged, never poisons.
    pub fn checkpoint(&self) -> Option<u64> {
        let segment = self.active_segment()?;
        let progress = segment.durable_progress()?;
        let mut header = index::IndexBuilder::new(segment.base_offset(), 1)
            .header(progress.length, segment.header().salt);
        header.next_offset = progress.next_offset;
        header.record_count = progress.record_count;
        header.first_timestamp_ns = progress.first_timestamp_ns;
        header.last_timestamp_ns = if progress.record_count == 0 {
            0
        } else {
            progress.last_timestamp_ns
        };
        header.first_raft_index = progress.first_raft_index;
        header.last_raft_term = progress.last_log_id.term;
        header.last_raft_index = progress.last_log_id.index;
        let entries = segment.growing_entries_below(progress.length);
        match self
            .file_system
            .write_atomic(segment.index_path(), &encode_index(&header, &entries))
        {
            Ok(()) => {
                self.checkpointed.store(progress.length, Ordering::Release);
                Some(progress.length)
            }
            Err(error) => {
                tracing::warn!(stream = %self.name, %error, "cannot write the checkpoint; recovery will validate more of the log");
                None
            }
        }
    }

    /// The stored clean mark and checkpoint describe the active segment as
    /// it is: nothing was written since they were (the first write clears
    /// the mark, so this holds only for a stream untouched since a clean
    /// open).
    fn clean_mark_is_current(&self) -> bool {
        let Some(segment) = self.active_segment() else {
            return false;
        };
        let Some(progress) = segment.durable_progress() else {
            return false;
        };
        let current = CleanMark {
            segment_base: segment.base_offset(),
            data_length: progress.length,
            next_offset: segment.next_offset(),
        };
        lock(&self.metadata).clean == Some(current)
            && self.checkpointed.load(Ordering::Acquire) == progress.length
    }

    /// Writes the checkpoint when enough was made durable since the last.
    pub fn checkpoint_if_due(&self) {
        let Some(segment) = self.active_segment() else {
            return;
        };
        let durable = segment.durable_length();
        let last = self.checkpointed.load(Ordering::Acquire);
        if durable > last.max(SEGMENT_HEADER_LENGTH as u64)
            && (durable - last >= self.config.checkpoint_interval_bytes || durable < last)
        {
            self.checkpoint();
        }
    }
}

/// An open log. Cheap to clone; all clones are the same log.
#[derive(Clone)]
pub struct Log {
    shared: Arc<LogShared>,
    writer: Arc<Mutex<SegmentWriter>>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Log")
            .field("name", &self.shared.name)
            .field("directory", &self.shared.directory)
            .finish()
    }
}

/// A source over a segment's visible bytes, read in windows.
pub(crate) struct SegmentSource<'a> {
    pub segment: &'a Arc<StorageSegment>,
    pub cache: &'a SegmentCache,
    pub end: u64,
    window_start: u64,
    window: bytes::Bytes,
}

impl<'a> SegmentSource<'a> {
    pub fn new(
        segment: &'a Arc<StorageSegment>,
        cache: &'a SegmentCache,
        end: u64,
    ) -> SegmentSource<'a> {
        SegmentSource::with_window(segment, cache, end, 0, bytes::Bytes::new())
    }

    /// A source that starts with bytes already read from `window_start`.
    pub fn with_window(
        segment: &'a Arc<StorageSegment>,
        cache: &'a SegmentCache,
        end: u64,
        window_start: u64,
        window: bytes::Bytes,
    ) -> SegmentSource<'a> {
        SegmentSource {
            segment,
            cache,
            end,
            window_start,
            window,
        }
    }

    /// The bytes read ahead, for the next source over the same segment.
    pub fn into_window(self) -> (u64, bytes::Bytes) {
        (self.window_start, self.window)
    }
}

/// Bytes a window read asks for at least.
pub(crate) const READ_WINDOW_BYTES: usize = 256 * 1024;

impl ByteSource for SegmentSource<'_> {
    fn end(&self) -> u64 {
        self.end
    }

    fn get(&mut self, position: u64, length: usize) -> Result<bytes::Bytes> {
        let wanted_end = (position + length as u64).min(self.end);
        let read_end = (position + READ_WINDOW_BYTES as u64)
            .max(wanted_end)
            .min(self.end);
        let (segment, cache) = (self.segment, self.cache);
        walker::read_through_window(
            &mut self.window_start,
            &mut self.window,
            position,
            wanted_end,
            || segment.read(cache, position, read_end.saturating_sub(position) as usize),
        )
    }
}

impl Log {
    /// Opens (recovering if needed) or creates the log stored in
    /// `directory`.
    pub fn open(
        file_system: Arc<dyn FileSystem>,
        directory: &Path,
        options: LogOptions,
    ) -> Result<(Log, RecoveryReport)> {
        options.config.validate()?;
        let recovered = RecoveryManager::open(
            &file_system,
            directory,
            &options.config,
            options.recovery_mode,
            options.node_id,
            options.store_locked.is_some(),
        )?;
        let encryption = match options.config.encryption {
            None => None,
            Some(encryption) => {
                let key = options.keyring.get(encryption.key_id).ok_or_else(|| Error::InvalidConfig {
                    key: "encryption".to_string(),
                    reason: format!(
                        "stream '{}' is to be encrypted with key id {}, which is not configured (configured: {:?})",
                        options.name,
                        encryption.key_id,
                        options.keyring.ids()
                    ),
                })?;
                Some((encryption.cipher, Arc::clone(key)))
            }
        };
        let metadata = StreamMetadata {
            node_id: options.node_id,
            ..recovered.metadata
        };
        let encoder = FrameEncoder::new(
            options.config.compression,
            encryption,
            options.node_id,
            metadata.nonce_epoch,
        );
        let recovered_point = DurablePoint {
            sequence: 0,
            next_offset: recovered.next_offset,
            last_log_id: recovered.last_log_id,
        };
        let gate = DurabilityGate::new(&options.name, recovered_point);
        let mut tail_synced = false;
        if let Some(active) = &recovered.active {
            gate.set_active(
                Arc::clone(&active.segment),
                Arc::clone(&active.file),
                active.position,
            );
            // The tail recovery validated past what was known durable may
            // be in the page cache only: the process died, or a sync failed
            // and the kernel marked its pages clean without writing them
            // (then a sync now would succeed and persist nothing). Write
            // it again and sync it before anything builds on it.
            let durable = active.segment.durable_length();
            tail_synced = durable < active.position;
            if tail_synced {
                let tail = crate::io::read_exact(
                    active.file.as_ref(),
                    durable,
                    (active.position - durable) as usize,
                )?;
                active.file.write_at(durable, &tail)?;
                gate.sync_file(active.file.as_ref(), false, durable, active.position)?;
            }
            active
                .segment
                .set_durable_progress(active.builder.progress(active.position));
        }
        let (visible, _) = watch::channel(0u64);
        let checkpointed = recovered
            .active
            .as_ref()
            .map_or(0, |active| active.position);
        let shared = Arc::new(LogShared {
            name: options.name.clone(),
            directory: directory.to_path_buf(),
            file_system,
            config: options.config.clone(),
            cache: options.cache,
            keyring: options.keyring,
            segments: RwLock::new(recovered.segments),
            gate,
            metadata: Mutex::new(metadata),
            seals: Mutex::new(Vec::new()),
            truncations: AtomicU64::new(0),
            cuts: Mutex::new(Vec::new()),
            visible,
            checkpointed: AtomicU64::new(checkpointed),
            maintenance_written: AtomicU64::new(0),
            maintenance_ticks: AtomicU64::new(0),
            idle_checkpoint_tick: AtomicU64::new(0),
            segment_files_created: AtomicU64::new(0),
            segment_files_recycled: AtomicU64::new(0),
            group_sync: options.group_sync,
            grouped: Mutex::new(Grouped::Idle),
            _lock: recovered.lock,
        });
        let writer = SegmentWriter {
            encoder,
            state: WriterState {
                active: recovered.active,
                next_offset: recovered.next_offset,
                last_log_id: recovered.last_log_id,
                raft_floor: metadata.last_purged.map_or(0, |purged| purged.index),
                timestamp_max: recovered.timestamp_max,
                sequence: 0,
                generation: metadata.generation,
                generation_raised: false,
                allocation: AllocationPace::default(),
            },
        };
        let unindexed = shared
            .active_segment()
            .is_some_and(|segment| !shared.file_system.exists(segment.index_path()));
        if tail_synced || unindexed {
            // What recovery validated is durable now: checkpoint it.
            shared.checkpoint();
        }
        let report = recovered.report;
        if !report.truncated.is_empty() || !report.quarantined.is_empty() || !report.lost.is_empty()
        {
            tracing::warn!(stream = %options.name, ?report, "stream recovered with changes");
        } else {
            tracing::info!(
                stream = %options.name,
                segments = report.segments,
                validated_bytes = report.validated_bytes,
                clean = report.clean_shutdown,
                "stream opened"
            );
        }
        Ok((
            Log {
                shared,
                writer: Arc::new(Mutex::new(writer)),
            },
            report,
        ))
    }

    pub(crate) fn shared(&self) -> &Arc<LogShared> {
        &self.shared
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Segment files created new and reused from `recycle/` since the log
    /// was opened (steady writing under retention should only reuse).
    pub fn segment_file_counts(&self) -> (u64, u64) {
        (
            self.shared.segment_files_created.load(Ordering::Relaxed),
            self.shared.segment_files_recycled.load(Ordering::Relaxed),
        )
    }

    pub fn directory(&self) -> &Path {
        &self.shared.directory
    }

    pub fn config(&self) -> &StreamConfig {
        &self.shared.config
    }

    pub fn cache(&self) -> &Arc<SegmentCache> {
        &self.shared.cache
    }

    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.shared.keyring
    }

    fn writer(&self) -> MutexGuard<'_, SegmentWriter> {
        lock(&self.writer)
    }

    /// Key id and cipher of the active segment and of new segments.
    pub fn keys(&self) -> (Option<(u32, u8)>, (u32, u8)) {
        let writer = self.writer();
        let active = writer.state.active.as_ref().map(|active| {
            let header = active.segment.header();
            (header.key_id, header.cipher)
        });
        (active, writer.encoder.segment_key())
    }

    /// Appends the records in `builder` as one frame (leader, standalone):
    /// the log assigns their offsets; `meta` gives the Raft id and whether
    /// the frame is an atomic batch. Durable after the next [`sync`].
    ///
    /// [`sync`]: Log::sync
    pub fn append(
        &self,
        builder: &mut FrameBuilder,
        meta: AppendMeta,
        now_ns: i64,
    ) -> Result<Appended> {
        self.writer().append(&self.shared, builder, meta, now_ns)
    }

    /// Appends a frame exactly as a leader stored it.
    pub fn append_stored(&self, frame: &[u8], now_ns: i64) -> Result<Appended> {
        self.writer()
            .append_stored(&self.shared, frame, now_ns, false)
    }

    /// Appends a committed frame fetched from a peer to fill the log back
    /// up (a repair, segment shipping): it follows the log's last entry
    /// even where the log ends below the purge point.
    pub fn fill_stored(&self, frame: &[u8], now_ns: i64) -> Result<Appended> {
        self.writer()
            .append_stored(&self.shared, frame, now_ns, true)
    }

    /// Appends a Raft entry that holds no records: a blank entry, or an
    /// opaque one (membership) with `body`.
    pub fn append_raft_entry(
        &self,
        kind: FrameKind,
        term: u64,
        raft_index: u64,
        body: &[u8],
        now_ns: i64,
    ) -> Result<Appended> {
        if !matches!(kind, FrameKind::Blank | FrameKind::Opaque) || raft_index == 0 {
            return Err(Error::InvalidInput(
                "a Raft entry without records is blank or opaque and has an index".to_string(),
            ));
        }
        let mut writer = self.writer();
        let header = FrameHeader {
            frame_length: (FRAME_HEADER_LENGTH + body.len()) as u32,
            body_crc: crc32c::crc32c(body),
            base_offset: writer.state.next_offset,
            body_length_plain: body.len() as u32,
            raft_term: term,
            raft_index,
            kind,
            ..FrameHeader::default()
        };
        let mut frame = header.encode().to_vec();
        frame.extend_from_slice(body);
        writer.append_stored(&self.shared, &frame, now_ns, false)
    }

    /// Makes every frame written so far durable (one sync: group commit),
    /// then finishes sealed segments and writes a checkpoint when due.
    pub fn sync(&self) -> Result<DurablePoint> {
        let point = self.shared.gate.sync()?;
        self.after_sync(point)
    }

    /// What follows a successful sync: the seals it allows, a checkpoint
    /// when due, readers told.
    fn after_sync(&self, point: DurablePoint) -> Result<DurablePoint> {
        self.shared.finish_seals()?;
        self.shared.checkpoint_if_due();
        self.shared.notify_readers();
        Ok(point)
    }

    /// Whether [`sync_grouped`](Self::sync_grouped) hands syncs to a group.
    pub(crate) fn syncs_in_groups(&self) -> bool {
        self.shared.group_sync.is_some()
    }

    /// Whether a grouped sync runs or has an outcome not yet taken.
    pub(crate) fn grouped_sync_outstanding(&self) -> bool {
        !matches!(*lock(&self.shared.grouped), Grouped::Idle)
    }

    /// [`sync`](Self::sync) through the store's [`GroupSync`]: the first
    /// call captures what is written and hands it to the group's thread,
    /// which calls `wake` when it is done; the call after that returns the
    /// outcome. One caller at a time (the stream's sync lane).
    ///
    /// [`GroupSync`]: group_sync::GroupSync
    pub(crate) fn sync_grouped(&self, wake: Box<dyn Fn() + Send + Sync>) -> SyncProgress {
        let Some(group) = &self.shared.group_sync else {
            return SyncProgress::Done(self.sync());
        };
        let mut grouped = lock(&self.shared.grouped);
        match std::mem::take(&mut *grouped) {
            Grouped::Done(result) => {
                drop(grouped);
                return SyncProgress::Done(result.and_then(|point| self.after_sync(point)));
            }
            Grouped::Pending => {
                // Under the same lock: the outcome cannot land in between.
                *grouped = Grouped::Pending;
                return SyncProgress::Pending;
            }
            Grouped::Idle => {}
        }
        drop(grouped);
        let capture = match self.shared.gate.begin_group_sync() {
            Err(error) => return SyncProgress::Done(Err(error)),
            Ok(Err(durable)) => return SyncProgress::Done(self.after_sync(durable)),
            Ok(Ok(capture)) => capture,
        };
        *lock(&self.shared.grouped) = Grouped::Pending;
        let file = Arc::clone(capture.file());
        let range = capture.range();
        let shared = Arc::clone(&self.shared);
        group.submit(
            file,
            range,
            Box::new(move |result| {
                let outcome = shared.gate.finish_group_sync(capture, result);
                *lock(&shared.grouped) = Grouped::Done(outcome);
                wake();
            }),
        );
        SyncProgress::Pending
    }

    /// Makes frames written so far visible to readers before they are
    /// durable (durability `none` and `interval`).
    pub fn publish_written(&self) {
        self.shared.gate.publish_written();
        self.shared.notify_readers();
    }

    pub fn written(&self) -> DurablePoint {
        self.shared.gate.written()
    }

    pub fn durable(&self) -> DurablePoint {
        self.shared.gate.durable()
    }

    pub fn subscribe_durable(&self) -> watch::Receiver<DurablePoint> {
        self.shared.gate.subscribe()
    }

    /// Resolves once the frame with Raft index `raft_index` is durable (the
    /// Raft LogFlushed callback hangs on it); fails if a sync failed.
    pub async fn wait_durable(&self, raft_index: u64) -> Result<DurablePoint> {
        let mut receiver = self.subscribe_durable();
        loop {
            if self.shared.gate.is_poisoned() {
                return Err(self.shared.gate.poisoned_error());
            }
            let point = *receiver.borrow_and_update();
            if point.last_log_id.index >= raft_index {
                return Ok(point);
            }
            if receiver.changed().await.is_err() {
                return Err(Error::Closed {
                    stream: self.shared.name.clone(),
                });
            }
        }
    }

    /// Resolves once the frame with write sequence `sequence` is durable.
    pub async fn wait_durable_sequence(&self, sequence: u64) -> Result<DurablePoint> {
        let mut receiver = self.subscribe_durable();
        loop {
            if self.shared.gate.is_poisoned() {
                return Err(self.shared.gate.poisoned_error());
            }
            let point = *receiver.borrow_and_update();
            if point.sequence >= sequence {
                return Ok(point);
            }
            if receiver.changed().await.is_err() {
                return Err(Error::Closed {
                    stream: self.shared.name.clone(),
                });
            }
        }
    }

    pub fn is_poisoned(&self) -> bool {
        self.shared.gate.is_poisoned()
    }

    pub fn poison_cause(&self) -> Option<String> {
        self.shared.gate.poison_cause()
    }

    /// Segments, oldest first.
    pub fn segments(&self) -> Vec<Arc<StorageSegment>> {
        self.shared.segments_snapshot()
    }

    /// Sealed, indexed segments, oldest first, as files with their CRC.
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
                first_raft_index: segment.first_raft_index(),
                last_log_id: segment.last_log_id(),
            })
            .collect()
    }

    /// How many truncations the log has seen since it was opened.
    pub fn truncations(&self) -> u64 {
        self.shared.truncations.load(Ordering::Acquire)
    }

    /// True if a frame written when the log had seen `truncations`
    /// truncations, ending before `next_offset`, is still in the log (no
    /// later truncation cut below its end).
    pub fn survives_truncations(&self, truncations: u64, next_offset: u64) -> bool {
        lock(&self.shared.cuts)
            .iter()
            .skip(truncations as usize)
            .all(|cut| next_offset <= *cut)
    }

    pub fn subscribe_visible(&self) -> watch::Receiver<u64> {
        self.shared.visible.subscribe()
    }

    /// The stream's metadata (vote, commit index, purge point, generation).
    pub fn metadata(&self) -> StreamMetadata {
        *lock(&self.shared.metadata)
    }

    /// Saves the Raft vote durably before returning.
    pub fn save_vote(&self, vote: Vote) -> Result<()> {
        self.shared
            .save_metadata(|metadata| metadata.vote = Some(vote))
            .map(|_| ())
    }

    /// Saves the Raft commit index durably.
    pub fn save_committed(&self, committed: Option<LogId>) -> Result<()> {
        self.shared
            .save_metadata(|metadata| metadata.committed = committed)
            .map(|_| ())
    }

    /// Saves the last purged Raft id durably (purging is logical: the log
    /// is the stream, retention alone removes data).
    /// Purging past the last entry (a snapshot installed beyond the log)
    /// makes the next entry follow the purge point.
    pub fn save_purged(&self, purged: LogId) -> Result<()> {
        let mut writer = self.writer();
        self.shared
            .save_metadata(|metadata| metadata.last_purged = Some(purged))?;
        writer.state.raft_floor = purged.index;
        Ok(())
    }

    /// Reads stored frames, exactly as on disk. Every frame of the range
    /// is returned or the call fails: a range is never short.
    ///
    /// A truncation (or a restore) replaces a segment while a read may be
    /// in it: the old one then fails with `SegmentRemoved`, and the read
    /// starts over once the replacement is listed (the writer lock, which
    /// the replacement holds throughout, is taken and let go first). The
    /// frames the cut kept are read from the new segment; a range it cut
    /// fails as a range beyond the log does. Openraft's apply once failed
    /// fatally on a committed entry that shared a segment with entries a
    /// conflict truncated.
    pub fn read_frames(&self, range: FrameRange) -> Result<Vec<StoredFrame>> {
        let mut attempts = 0;
        loop {
            match self.read_frames_once(range) {
                Err(Error::SegmentRemoved { .. }) if attempts < READ_RETRIES_MAX => {
                    attempts += 1;
                    drop(self.writer());
                }
                result => return result,
            }
        }
    }

    fn read_frames_once(&self, range: FrameRange) -> Result<Vec<StoredFrame>> {
        let (start, end) = match range {
            FrameRange::RaftIndex { start, end } | FrameRange::Offset { start, end } => {
                (start, end)
            }
        };
        if start >= end {
            return Ok(Vec::new());
        }
        let segments = self.shared.segments_snapshot();
        let cache = &self.shared.cache;
        let first = match range {
            FrameRange::RaftIndex { .. } => segments.iter().rposition(|segment| {
                segment.first_raft_index() != 0 && segment.first_raft_index() <= start
            }),
            FrameRange::Offset { .. } => segments
                .iter()
                .rposition(|segment| segment.base_offset() <= start),
        };
        let mut frames = Vec::new();
        let mut expected = start;
        for segment in segments.iter().skip(first.unwrap_or(0)) {
            let mut position = match range {
                FrameRange::RaftIndex { .. } => segment.seek_raft_index(cache, expected)?,
                FrameRange::Offset { .. } => segment.seek_offset(cache, expected)?,
            };
            // Written frames, durable or not: Raft reads its own entries
            // before they are flushed.
            let end_position = segment.written_length();
            let mut source = SegmentSource::new(segment, cache, end_position);
            while position < end_position {
                let frame = match read_slot(&mut source, position, segment.salt_state(), u32::MAX)?
                {
                    Slot::Frame(frame) => frame,
                    Slot::Defect(defect) => {
                        return Err(Error::corruption(segment.path(), position, defect.reason))
                    }
                };
                position = frame.end();
                let header = frame.header;
                let wanted = match range {
                    FrameRange::RaftIndex { .. } => {
                        header.raft_index >= start && header.raft_index < end
                    }
                    FrameRange::Offset { .. } => {
                        header.kind.takes_offsets()
                            && header.next_offset() > start
                            && header.base_offset < end
                    }
                };
                if wanted {
                    if let FrameRange::RaftIndex { .. } = range {
                        if header.raft_index != expected {
                            return Err(Error::InvalidInput(format!(
                                "Raft index {expected} is not in the log (found {})",
                                header.raft_index
                            )));
                        }
                        expected += 1;
                    } else {
                        expected = header.next_offset();
                    }
                    frames.push(StoredFrame {
                        header,
                        bytes: frame.bytes,
                    });
                }
                let done = match range {
                    FrameRange::RaftIndex { .. } => {
                        header.raft_index + 1 >= end && header.raft_index != 0
                    }
                    FrameRange::Offset { .. } => header.next_offset() >= end,
                };
                if done && wanted {
                    return Ok(frames);
                }
            }
        }
        if expected < end {
            return Err(Error::InvalidInput(format!(
                "the log holds {} frames of the range [{start}, {end}); it ends before {expected}",
                frames.len()
            )));
        }
        Ok(frames)
    }

    /// Removes these segments (identities, not counts: a segment already
    /// gone is skipped) for retention. Never the active segment. Their
    /// files are recycled for new segments or deleted.
    pub fn remove_segments(
        &self,
        doomed: &[Arc<StorageSegment>],
    ) -> Result<Vec<Arc<StorageSegment>>> {
        let removed: Vec<Arc<StorageSegment>> = {
            let mut segments = self
                .shared
                .segments
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let last = segments.last().cloned();
            let mut removed = Vec::new();
            segments.retain(|segment| {
                let goes = segment.is_indexed()
                    && !last.as_ref().is_some_and(|last| Arc::ptr_eq(last, segment))
                    && doomed.iter().any(|doomed| Arc::ptr_eq(doomed, segment));
                if goes {
                    removed.push(Arc::clone(segment));
                }
                !goes
            });
            removed
        };
        for segment in &removed {
            // Waits for reads of it in progress; later reads fail.
            segment.mark_removed();
            recovery::retire_segment_file(
                self.shared.file_system.as_ref(),
                &self.shared.directory,
                segment,
                self.shared.config.recycle_segments_max,
            )?;
        }
        if !removed.is_empty() {
            self.shared.notify_readers();
        }
        Ok(removed)
    }

    /// Idle-time work: age rotation, seals, indexes rebuilt by readers, a
    /// checkpoint of what became durable since the last.
    pub fn maintenance(&self, now_ns: i64) -> Result<()> {
        if self.shared.gate.is_poisoned() {
            return Ok(());
        }
        let rotated = self.writer().rotate_if_old(&self.shared, now_ns)?;
        self.shared.finish_seals()?;
        for segment in self.shared.segments_snapshot() {
            if let Some(encoded) = segment.take_pending_index() {
                if let Err(error) = self
                    .shared
                    .file_system
                    .write_atomic(segment.index_path(), &encoded)
                {
                    tracing::warn!(%error, "cannot write a rebuilt index; retried later");
                    segment.set_pending_index(encoded);
                }
            }
        }
        // Writes that sat unsynced for a whole maintenance interval with
        // nothing after them (durability none) are synced now: the stream is
        // idle, and only a synced file can be closed by the handle limit.
        let written = self.shared.gate.written();
        let previous = self
            .shared
            .maintenance_written
            .swap(written.sequence, Ordering::AcqRel);
        let idle = previous == written.sequence;
        if idle && written.sequence > self.shared.gate.durable().sequence {
            self.shared.gate.sync()?;
        }
        self.checkpoint_if_idle(idle);
        if rotated {
            self.shared.notify_readers();
        }
        Ok(())
    }

    /// The idle checkpoint: once nothing was written for a whole
    /// maintenance interval, a checkpoint vouches for the last group commit
    /// (no later frame does; docs/FORMAT.md, recovery step 6). A stream that
    /// writes a little every few seconds would pay an atomic file write
    /// (two fsyncs) per message, more than the message itself: its idle
    /// checkpoints are spaced [`IDLE_CHECKPOINT_SPACING`] maintenance
    /// intervals apart.
    fn checkpoint_if_idle(&self, idle: bool) {
        let shared = &self.shared;
        let tick = shared.maintenance_ticks.fetch_add(1, Ordering::AcqRel) + 1;
        let durable = shared
            .active_segment()
            .map_or(0, |segment| segment.durable_length());
        let last = shared.idle_checkpoint_tick.load(Ordering::Acquire);
        let spaced = last == 0 || tick >= last + IDLE_CHECKPOINT_SPACING;
        if idle
            && spaced
            && durable > shared.checkpointed.load(Ordering::Acquire)
            && shared.checkpoint().is_some()
        {
            shared.idle_checkpoint_tick.store(tick, Ordering::Release);
        }
    }

    /// Truncates the log after the entry with Raft index `raft_index`
    /// (keeping it), online and crash-atomically. Entries are never split.
    pub fn truncate_after(&self, raft_index: u64) -> Result<TruncateReport> {
        self.truncate(recovery::Cut::AfterRaftIndex(raft_index))
    }

    /// Truncates the log so that its last record is below `from_offset`,
    /// online and crash-atomically, at a frame boundary (a frame holding
    /// `from_offset` goes whole: frames are never split online).
    pub fn truncate_from_offset(&self, from_offset: u64) -> Result<TruncateReport> {
        self.truncate(recovery::Cut::FrameHolding(from_offset))
    }

    fn truncate(&self, cut: recovery::Cut) -> Result<TruncateReport> {
        let mut writer = self.writer();
        let shared = &self.shared;
        shared.gate_check()?;
        shared.gate.sync()?;
        shared.finish_seals()?;
        let segments = shared.segments_snapshot();
        let Some((intent, report)) = recovery::plan_cut(
            &shared.file_system,
            &segments,
            writer.state.next_offset,
            cut,
        )?
        else {
            return Ok(TruncateReport {
                next_offset: writer.state.next_offset,
                ..TruncateReport::default()
            });
        };
        let boundary = segments
            .iter()
            .position(|segment| segment.base_offset() == intent.segment_base)
            .expect("the boundary is a segment of the log");
        for segment in &segments[boundary..] {
            segment.mark_removed();
        }
        shared.gate.clear_active();
        writer.state.active = None;
        let metadata = *lock(&shared.metadata);
        let done = recovery::execute_truncation(
            shared.file_system.as_ref(),
            &shared.directory,
            metadata,
            &intent,
        )
        .and_then(|raised| {
            *lock(&shared.metadata) = raised;
            recovery::reopen_tail(
                &shared.file_system,
                &shared.directory,
                &shared.config,
                intent.segment_base,
                raised,
            )
        });
        let (segment, active) = match done {
            Ok(reopened) => reopened,
            Err(error) => {
                // The intent is durable: the next open finishes the cut.
                shared.gate.poison(&error);
                return Err(shared.gate.poisoned_error());
            }
        };
        {
            let mut listed = shared
                .segments
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            listed.truncate(boundary);
            if let Some(previous) = listed.last() {
                segment.set_timestamp_max_through(previous.timestamp_max_through());
            }
            listed.push(Arc::clone(&segment));
        }
        let metadata = *lock(&shared.metadata);
        writer.state.generation = metadata.generation;
        writer.state.generation_raised = true;
        writer.encoder.set_epoch(metadata.nonce_epoch);
        writer.state.next_offset = segment.next_offset();
        writer.state.last_log_id = shared
            .segments_snapshot()
            .iter()
            .rev()
            .map(|segment| segment.last_log_id())
            .find(|id| id.index != 0)
            .unwrap_or_default();
        writer.state.timestamp_max = segment.timestamp_max_through();
        let point = DurablePoint {
            sequence: 0,
            next_offset: writer.state.next_offset,
            last_log_id: writer.state.last_log_id,
        };
        shared.gate.reset(point, active.position);
        shared.gate.set_active(
            Arc::clone(&segment),
            Arc::clone(&active.file),
            active.position,
        );
        segment.set_durable_progress(active.builder.progress(active.position));
        shared.checkpointed.store(0, Ordering::Release);
        writer.state.active = Some(active);
        lock(&shared.cuts).push(writer.state.next_offset);
        shared.truncations.fetch_add(1, Ordering::AcqRel);
        shared.notify_readers();
        Ok(report)
    }

    /// `length` bytes (fewer at the end) at `position` of this log's sealed
    /// segment with `base_offset` and whole-file CRC `crc32c`, as a peer
    /// ships it. Fails, naming it, when the log holds no such sealed
    /// segment (retention removed it, or this log's segment there is
    /// another file).
    pub fn read_sealed_segment(
        &self,
        base_offset: u64,
        crc32c: u32,
        position: u64,
        length: usize,
    ) -> Result<Vec<u8>> {
        let segment = self
            .sealed_segment_at(base_offset)
            .filter(|segment| segment.segment_crc() == crc32c)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "stream '{}' holds no sealed segment at offset {base_offset} with CRC {crc32c:#010x}",
                    self.name()
                ))
            })?;
        let visible = segment.visible_length();
        let file = self.shared.file_system.open(segment.path(), false)?;
        if position == 0 {
            // A transfer begins: a file damaged since it was sealed is
            // refused here, naming it, rather than shipped to fail the
            // peer's check again and again.
            verify_whole(file.as_ref(), visible, crc32c)?;
        }
        let end = visible.min(position.saturating_add(length as u64));
        let bytes = crate::io::read_exact(
            file.as_ref(),
            position.min(end),
            end.saturating_sub(position) as usize,
        )?;
        Ok(bytes.to_vec())
    }

    /// The sealed (indexed) segment that begins at `base_offset`, if the
    /// log holds one.
    fn sealed_segment_at(&self, base_offset: u64) -> Option<Arc<StorageSegment>> {
        self.shared
            .segments_snapshot()
            .into_iter()
            .find(|segment| segment.is_indexed() && segment.base_offset() == base_offset)
    }

    /// Re-reads the sealed segment with `base_offset` whole (1 MiB at a
    /// time) and checks it against the CRC its index recorded when it was
    /// sealed: `Ok(false)` when the log no longer holds it (retention), an
    /// [`Error::Corruption`] naming the file when a byte changed since.
    pub fn verify_sealed_segment(&self, base_offset: u64) -> Result<bool> {
        let Some(segment) = self.sealed_segment_at(base_offset) else {
            return Ok(false);
        };
        let file = self.shared.file_system.open(segment.path(), false)?;
        verify_whole(
            file.as_ref(),
            segment.visible_length(),
            segment.segment_crc(),
        )?;
        Ok(true)
    }

    /// Writes `bytes` at `position` of the file received for the segment
    /// at `base_offset` (at [`incoming_path`](Log::incoming_path)); position
    /// 0 starts the file over. Returns the file's length after the write.
    pub fn receive_segment_bytes(
        &self,
        base_offset: u64,
        position: u64,
        bytes: &[u8],
    ) -> Result<u64> {
        let path = self.incoming_path(base_offset)?;
        let file_system = &self.shared.file_system;
        if position == 0 && file_system.exists(&path) {
            file_system.remove(&path)?;
        }
        let file = if file_system.exists(&path) {
            file_system.open(&path, true)?
        } else {
            file_system.create(&path)?
        };
        file.write_at(position, bytes)?;
        file_system.file_length(&path)
    }

    /// The length of the file received so far for the segment at
    /// `base_offset` (0 if none): a transfer resumes from there.
    pub fn received_segment_length(&self, base_offset: u64) -> Result<u64> {
        let path = self.incoming_path(base_offset)?;
        if self.shared.file_system.exists(&path) {
            self.shared.file_system.file_length(&path)
        } else {
            Ok(0)
        }
    }

    /// Checks the file received for the segment at `base_offset` against
    /// the `length` and `crc32c` its sender announced (1 MiB at a time): an
    /// [`Error::Corruption`] naming the file when they differ.
    pub fn check_received_segment(&self, base_offset: u64, length: u64, crc32c: u32) -> Result<()> {
        let path = self.incoming_path(base_offset)?;
        let file = self.shared.file_system.open(&path, false)?;
        let received = file.length()?;
        if received != length {
            return Err(Error::corruption(
                &path,
                received,
                format!("{received} bytes were received, the sender announced {length}"),
            ));
        }
        verify_whole(file.as_ref(), length, crc32c)
    }

    /// Where a segment file received from a peer is written before
    /// [`install_segment`](Log::install_segment) links it in.
    pub fn incoming_path(&self, base_offset: u64) -> Result<PathBuf> {
        let incoming = self.shared.directory.join(recovery::INCOMING_DIRECTORY);
        self.shared.file_system.create_directory(&incoming)?;
        Ok(incoming.join(crate::format::segment_file_name(base_offset)))
    }

    /// Links in a sealed segment received from a peer (written at
    /// [`incoming_path`](Log::incoming_path)): checked against the
    /// expected length and CRC, walked whole, synced, then renamed in. It
    /// must continue the log (its first offset is the log's next, its first
    /// Raft index follows the log's last); the active segment's frames are
    /// sealed first. A crash leaves no segment or the whole one.
    pub fn install_segment(&self, received: &Path, expected: &SealedSegment) -> Result<()> {
        let mut writer = self.writer();
        let shared = &self.shared;
        shared.gate_check()?;
        if expected.base_offset != writer.state.next_offset {
            return Err(Error::InvalidInput(format!(
                "segment starting at offset {} does not continue the log at offset {}",
                expected.base_offset, writer.state.next_offset
            )));
        }
        // Checked and walked in 1 MiB reads: a segment is never read whole
        // into memory.
        let file = shared.file_system.open(received, true)?;
        let length = file.length()?;
        let crc = if length == expected.length {
            crc_of(file.as_ref(), length)?
        } else {
            0
        };
        if length != expected.length || crc != expected.crc32c {
            return Err(Error::corruption(
                received,
                0,
                format!(
                    "received segment is {length} bytes with CRC {crc:#010x}, expected {} bytes with CRC {:#010x}",
                    expected.length,
                    expected.crc32c
                ),
            ));
        }
        let head = crate::io::read_up_to(file.as_ref(), 0, SEGMENT_HEADER_LENGTH)?;
        let header = SegmentHeader::decode(&head, received)?;
        if header.base_offset != expected.base_offset {
            return Err(Error::corruption(
                received,
                16,
                format!(
                    "header says base offset {}, expected {}",
                    header.base_offset, expected.base_offset
                ),
            ));
        }
        let walked = recovery::walk_whole_file(
            file.as_ref(),
            length,
            &header,
            shared.config.index_interval_bytes,
        )?;
        if let Some(damage) = walked.damages.first() {
            return Err(Error::corruption(
                received,
                damage.position,
                damage.reason.clone(),
            ));
        }
        if walked.end != length || walked.builder.next_offset != expected.next_offset {
            return Err(Error::corruption(
                received,
                walked.end,
                format!(
                    "the frames end at byte {} (offset {}), the file is {} bytes to offset {}",
                    walked.end, walked.builder.next_offset, length, expected.next_offset
                ),
            ));
        }
        let last = writer.state.last_log_id.index;
        let first_index = walked.builder.first_raft_index;
        if last != 0 && first_index != 0 && first_index != last + 1 {
            return Err(Error::InvalidInput(format!(
                "segment begins at Raft index {first_index}, the log ends at {last}"
            )));
        }
        shared.gate.sync_file(file.as_ref(), true, 0, 0)?;
        // The installed segment follows the active one's frames: seal them
        // (an empty active segment is removed instead).
        writer.state.rotate(shared)?;
        // Its slots carry the peer's generations: ours must be above them
        // before anything is written after it.
        let generation_max = walked.generation;
        shared.save_metadata(|metadata| {
            metadata.generation = metadata.generation.max(generation_max);
            metadata.clean = None;
        })?;
        let path = shared
            .directory
            .join(crate::format::segment_file_name(header.base_offset));
        shared.file_system.rename(received, &path)?;
        shared
            .gate
            .sync_directory(shared.file_system.as_ref(), &shared.directory)?;
        let mut index = walked.builder.header(walked.end, header.salt);
        index.flags |= INDEX_FLAG_SEALED;
        index.segment_crc = crc;
        let segment = Arc::new(StorageSegment::new(
            Arc::clone(&shared.file_system),
            &shared.directory,
            header,
            walked.builder.progress(walked.end),
            true,
        ));
        if let Err(error) = shared.file_system.write_atomic(
            segment.index_path(),
            &encode_index(&index, &walked.builder.entries),
        ) {
            tracing::warn!(%error, "cannot write an installed segment's index; the next open rebuilds it");
        }
        segment.mark_indexed(crc, walked.builder.entries.clone());
        if let Some(previous) = shared.segments_snapshot().last() {
            segment.set_timestamp_max_through(previous.timestamp_max_through());
        }
        writer.state.next_offset = segment.next_offset();
        if segment.last_log_id().index != 0 {
            writer.state.last_log_id = segment.last_log_id();
        }
        writer.state.timestamp_max = writer
            .state
            .timestamp_max
            .max(segment.timestamp_max_through());
        writer.state.generation_raised = false;
        shared.push_segment(segment);
        let point = DurablePoint {
            sequence: writer.state.sequence,
            next_offset: writer.state.next_offset,
            last_log_id: writer.state.last_log_id,
        };
        shared.gate.reset(point, 0);
        shared.notify_readers();
        Ok(())
    }

    /// Syncs, seals, checkpoints and marks the log cleanly closed. After a
    /// failed sync it only reports the failure.
    pub fn close(&self) -> Result<()> {
        let _writer = self.writer();
        let shared = &self.shared;
        if shared.gate.is_poisoned() {
            shared.notify_readers();
            return Err(shared.gate.poisoned_error());
        }
        shared.gate.sync()?;
        shared.finish_seals()?;
        if shared.clean_mark_is_current() {
            // Nothing was written since the last clean close: its
            // checkpoint and mark still describe the files exactly.
            shared.notify_readers();
            return Ok(());
        }
        let mark = shared.active_segment().and_then(|segment| {
            shared.checkpoint().map(|length| CleanMark {
                segment_base: segment.base_offset(),
                data_length: length,
                next_offset: segment.next_offset(),
            })
        });
        if let Some(mark) = mark {
            if let Err(error) = shared.save_metadata(|metadata| metadata.clean = Some(mark)) {
                tracing::warn!(stream = %shared.name, %error, "cannot mark the clean shutdown; the next open validates the tail");
            }
        }
        shared.notify_readers();
        Ok(())
    }
}

/// CRC32C of `[0, length)` of a file, read 1 MiB at a time.
fn crc_of(file: &dyn crate::io::File, length: u64) -> Result<u32> {
    const CHUNK_BYTES: u64 = 1 << 20;
    let mut crc = 0;
    let mut position = 0;
    while position < length {
        let chunk = CHUNK_BYTES.min(length - position);
        let bytes = crate::io::read_exact(file, position, chunk as usize)?;
        crc = crc32c::crc32c_append(crc, &bytes);
        position += chunk;
    }
    Ok(crc)
}

/// Checks the first `length` bytes of a sealed segment file against
/// `crc32c`.
fn verify_whole(file: &dyn crate::io::File, length: u64, crc32c: u32) -> Result<()> {
    let crc = crc_of(file, length)?;
    if crc != crc32c {
        return Err(Error::corruption(
            file.path(),
            0,
            format!("the sealed segment's CRC is {crc:#010x}, its index says {crc32c:#010x}: it was damaged after it was sealed"),
        ));
    }
    Ok(())
}
