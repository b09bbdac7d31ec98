//! StorageSegment: one segment file as readers see it, sealed or active.
//! Reads are `pread` into buffers that the reader owns: a file cut short by
//! another program is an error naming the file and position, never a
//! SIGBUS. A sealed segment opens its file on first read (and the cache
//! closes it when idle) and loads its sparse offset, time and Raft index
//! from its `.idx` file, or rebuilds it from the log. The active segment
//! reads through the writer's file.
//!
//! Invariants: `visible_length` and `next_offset` only grow while the
//! segment is in the log; every byte below `visible_length` belongs to a
//! whole, checksummed slot and frame. A segment is `sealed` when the writer
//! moved on (its `final_length` is fixed; readers move to the next segment
//! once they have read up to it) and `indexed` once it is cut to length and
//! its index file written (only then may retention remove it). Once
//! `removed` (by retention or a truncation) no read of it returns bytes: a
//! recycled file may already hold another segment.

use super::cache::SegmentCache;
use super::index::{progress_of, SegmentProgress};
use super::walker::{walk, MemorySource, WalkParams, WalkStart};
use crate::error::{Error, Result};
use crate::format::frame::salt_state;
use crate::format::index::{decode_index, encode_index, IndexEntry, INDEX_FLAG_SEALED};
use crate::format::metadata::LogId;
use crate::format::segment_header::{SegmentHeader, SEGMENT_HEADER_LENGTH};
use crate::io::{File, FileSystem};
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

enum IndexState {
    Unloaded,
    Loaded(Arc<Vec<IndexEntry>>),
}

enum Handle {
    Closed,
    Open(Arc<dyn File>),
    Removed,
}

/// One segment file.
pub struct StorageSegment {
    base_offset: u64,
    path: PathBuf,
    index_path: PathBuf,
    header: SegmentHeader,
    salt_state: u32,
    file_system: Arc<dyn FileSystem>,
    visible_length: AtomicU64,
    /// Bytes the writer wrote (whole slots and frames), visible or not:
    /// what Raft reads of its own log before it is durable.
    written_length: AtomicU64,
    next_offset: AtomicU64,
    record_count: AtomicU64,
    first_timestamp_ns: AtomicI64,
    last_timestamp_ns: AtomicI64,
    /// Largest timestamp in this and every earlier segment of the stream.
    timestamp_max_through: AtomicI64,
    first_raft_index: AtomicU64,
    last_raft_term: AtomicU64,
    last_raft_index: AtomicU64,
    /// Bytes of this segment known durable (synced).
    durable_length: AtomicU64,
    sealed: AtomicBool,
    /// Length the segment has once all its frames are visible (set when
    /// sealed; `u64::MAX` before).
    final_length: AtomicU64,
    indexed: AtomicBool,
    /// Whole-file CRC of a sealed segment (from its index).
    segment_crc: AtomicU64,
    handle: RwLock<Handle>,
    /// The active segment's handle is the writer's and never closed.
    pinned: AtomicBool,
    index: RwLock<IndexState>,
    /// Entries of the active segment, appended by the writer.
    growing_index: RwLock<Vec<IndexEntry>>,
    /// An index rebuilt by a reader, written to disk by maintenance (a
    /// reader on an async worker must not wait for fsync).
    pending_index: Mutex<Option<Vec<u8>>>,
    /// The active segment's progress at its durable length (what a
    /// checkpoint may claim).
    durable_progress: Mutex<Option<SegmentProgress>>,
    pub(crate) last_used_tick: AtomicU64,
}

impl std::fmt::Debug for StorageSegment {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StorageSegment")
            .field("path", &self.path)
            .field("progress", &self.progress())
            .field("sealed", &self.is_sealed())
            .finish()
    }
}

fn lock_read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lock_write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl StorageSegment {
    pub(crate) fn new(
        file_system: Arc<dyn FileSystem>,
        directory: &Path,
        header: SegmentHeader,
        progress: SegmentProgress,
        sealed: bool,
    ) -> StorageSegment {
        let base_offset = header.base_offset;
        StorageSegment {
            base_offset,
            path: directory.join(crate::format::segment_file_name(base_offset)),
            index_path: directory.join(crate::format::index_file_name(base_offset)),
            header,
            salt_state: salt_state(header.salt),
            file_system,
            visible_length: AtomicU64::new(progress.length),
            written_length: AtomicU64::new(progress.length),
            next_offset: AtomicU64::new(progress.next_offset),
            record_count: AtomicU64::new(progress.record_count),
            first_timestamp_ns: AtomicI64::new(progress.first_timestamp_ns),
            last_timestamp_ns: AtomicI64::new(progress.last_timestamp_ns),
            timestamp_max_through: AtomicI64::new(progress.last_timestamp_ns),
            first_raft_index: AtomicU64::new(progress.first_raft_index),
            last_raft_term: AtomicU64::new(progress.last_log_id.term),
            last_raft_index: AtomicU64::new(progress.last_log_id.index),
            durable_length: AtomicU64::new(progress.length),
            sealed: AtomicBool::new(sealed),
            final_length: AtomicU64::new(if sealed { progress.length } else { u64::MAX }),
            indexed: AtomicBool::new(sealed),
            segment_crc: AtomicU64::new(0),
            handle: RwLock::new(Handle::Closed),
            pinned: AtomicBool::new(false),
            index: RwLock::new(IndexState::Unloaded),
            growing_index: RwLock::new(Vec::new()),
            pending_index: Mutex::new(None),
            durable_progress: Mutex::new(None),
            last_used_tick: AtomicU64::new(0),
        }
    }

    pub fn base_offset(&self) -> u64 {
        self.base_offset
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn index_path(&self) -> &Path {
        &self.index_path
    }

    pub fn header(&self) -> &SegmentHeader {
        &self.header
    }

    pub(crate) fn salt_state(&self) -> u32 {
        self.salt_state
    }

    /// No more frames will be written to this segment.
    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// Cut to length and indexed: a finished, shippable file.
    pub fn is_indexed(&self) -> bool {
        self.indexed.load(Ordering::Acquire)
    }

    /// The length a sealed segment has once all its frames are visible.
    pub fn final_length(&self) -> u64 {
        self.final_length.load(Ordering::Acquire)
    }

    pub fn visible_length(&self) -> u64 {
        self.visible_length.load(Ordering::Acquire)
    }

    pub fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    /// Bytes written so far (at least the visible length).
    pub fn written_length(&self) -> u64 {
        self.written_length
            .load(Ordering::Acquire)
            .max(self.visible_length())
    }

    pub(crate) fn mark_written(&self, length: u64) {
        self.written_length.fetch_max(length, Ordering::AcqRel);
    }

    pub fn record_count(&self) -> u64 {
        self.record_count.load(Ordering::Acquire)
    }

    pub fn durable_length(&self) -> u64 {
        self.durable_length.load(Ordering::Acquire)
    }

    pub fn segment_crc(&self) -> u32 {
        self.segment_crc.load(Ordering::Acquire) as u32
    }

    pub fn timestamp_max_through(&self) -> i64 {
        self.timestamp_max_through.load(Ordering::Acquire)
    }

    pub fn first_raft_index(&self) -> u64 {
        self.first_raft_index.load(Ordering::Acquire)
    }

    pub fn last_log_id(&self) -> LogId {
        LogId {
            term: self.last_raft_term.load(Ordering::Acquire),
            index: self.last_raft_index.load(Ordering::Acquire),
        }
    }

    pub fn progress(&self) -> SegmentProgress {
        SegmentProgress {
            length: self.visible_length(),
            next_offset: self.next_offset(),
            record_count: self.record_count(),
            first_timestamp_ns: self.first_timestamp_ns.load(Ordering::Acquire),
            last_timestamp_ns: self.last_timestamp_ns.load(Ordering::Acquire),
            first_raft_index: self.first_raft_index(),
            last_log_id: self.last_log_id(),
        }
    }

    /// Makes more frames visible. Values only move forward.
    pub(crate) fn publish(&self, progress: SegmentProgress) {
        if self.record_count() == 0 && progress.record_count > 0 {
            self.first_timestamp_ns
                .store(progress.first_timestamp_ns, Ordering::Release);
        }
        self.last_timestamp_ns
            .fetch_max(progress.last_timestamp_ns, Ordering::AcqRel);
        self.timestamp_max_through
            .fetch_max(progress.last_timestamp_ns, Ordering::AcqRel);
        self.record_count
            .fetch_max(progress.record_count, Ordering::AcqRel);
        if progress.first_raft_index != 0 {
            let _ = self.first_raft_index.compare_exchange(
                0,
                progress.first_raft_index,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        if progress.last_log_id.index > self.last_raft_index.load(Ordering::Acquire) {
            self.last_raft_term
                .store(progress.last_log_id.term, Ordering::Release);
            self.last_raft_index
                .store(progress.last_log_id.index, Ordering::Release);
        }
        self.next_offset
            .fetch_max(progress.next_offset, Ordering::AcqRel);
        // Length last: a reader that sees the length sees the rest.
        self.visible_length
            .fetch_max(progress.length, Ordering::AcqRel);
    }

    pub(crate) fn set_timestamp_max_through(&self, earlier_segments_max: i64) {
        self.timestamp_max_through
            .fetch_max(earlier_segments_max, Ordering::AcqRel);
    }

    /// After recovery: only this much is known durable.
    pub(crate) fn reset_durable_length(&self, length: u64) {
        self.durable_length.store(length, Ordering::Release);
    }

    pub(crate) fn mark_durable(&self, length: u64) {
        self.durable_length.fetch_max(length, Ordering::AcqRel);
    }

    /// The writer moved on: no frame will follow `final_length`.
    pub(crate) fn mark_sealed(&self, final_length: u64) {
        self.final_length.store(final_length, Ordering::Release);
        self.sealed.store(true, Ordering::Release);
    }

    /// The sealed segment is cut and indexed; the cache manages its handle
    /// from now on.
    pub(crate) fn mark_indexed(&self, segment_crc: u32, entries: Vec<IndexEntry>) {
        *lock_write(&self.index) = IndexState::Loaded(Arc::new(entries));
        lock_write(&self.growing_index).clear();
        self.segment_crc
            .store(u64::from(segment_crc), Ordering::Release);
        self.indexed.store(true, Ordering::Release);
        self.pinned.store(false, Ordering::Release);
    }

    /// Gives the active segment the writer's file and its index so far.
    pub(crate) fn attach_active(&self, file: Arc<dyn File>, entries: Vec<IndexEntry>) {
        *lock_write(&self.handle) = Handle::Open(file);
        self.pinned.store(true, Ordering::Release);
        *lock_write(&self.growing_index) = entries;
    }

    /// The Raft index of the segment's first frame, known once that frame
    /// is written (progress publishes it only when it is durable, but
    /// seeking written frames by Raft index needs it at once).
    pub(crate) fn note_first_raft_index(&self, raft_index: u64) {
        let _ = self.first_raft_index.compare_exchange(
            0,
            raft_index,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    pub(crate) fn push_index_entry(&self, entry: IndexEntry) {
        lock_write(&self.growing_index).push(entry);
    }

    /// Entries of the active segment's index for frames below `length`.
    pub(crate) fn growing_entries_below(&self, length: u64) -> Vec<IndexEntry> {
        lock_read(&self.growing_index)
            .iter()
            .filter(|entry| u64::from(entry.position) < length)
            .copied()
            .collect()
    }

    /// Closes the file handle and unloads the index (cache eviction).
    pub(crate) fn close_handle(&self) {
        if self.pinned.load(Ordering::Acquire) {
            return;
        }
        let mut handle = lock_write(&self.handle);
        if matches!(*handle, Handle::Open(_)) {
            *handle = Handle::Closed;
        }
        drop(handle);
        *lock_write(&self.index) = IndexState::Unloaded;
    }

    /// The segment left the log: from now on no read returns its bytes.
    /// Waits for reads in progress.
    pub(crate) fn mark_removed(&self) {
        *lock_write(&self.handle) = Handle::Removed;
        self.pinned.store(false, Ordering::Release);
    }

    pub fn is_removed(&self) -> bool {
        matches!(*lock_read(&self.handle), Handle::Removed)
    }

    pub(crate) fn is_open(&self) -> bool {
        matches!(*lock_read(&self.handle), Handle::Open(_))
    }

    fn removed_error(&self) -> Error {
        Error::SegmentRemoved {
            path: self.path.clone(),
        }
    }

    /// Reads `[position, position + length)` of the file. Holds the handle
    /// while reading, so a removal waits for it.
    pub fn read(
        self: &Arc<Self>,
        cache: &SegmentCache,
        position: u64,
        length: usize,
    ) -> Result<Bytes> {
        loop {
            {
                let handle = lock_read(&self.handle);
                match &*handle {
                    Handle::Open(file) => {
                        let result = crate::io::read_exact(file.as_ref(), position, length);
                        drop(handle);
                        cache.touch(self);
                        return result;
                    }
                    Handle::Removed => return Err(self.removed_error()),
                    Handle::Closed => {}
                }
            }
            let file = self.file_system.open(&self.path, false)?;
            {
                let mut handle = lock_write(&self.handle);
                match &*handle {
                    Handle::Closed => *handle = Handle::Open(file),
                    Handle::Removed => return Err(self.removed_error()),
                    Handle::Open(_) => {}
                }
            }
            cache.insert(self);
        }
    }

    /// The visible bytes `[0, visible_length)`.
    pub fn visible_bytes(self: &Arc<Self>, cache: &SegmentCache) -> Result<Bytes> {
        self.read(cache, 0, self.visible_length() as usize)
    }

    /// Sparse index entries, loading or rebuilding them if needed.
    fn index_entries(self: &Arc<Self>, cache: &SegmentCache) -> Result<Arc<Vec<IndexEntry>>> {
        if !self.is_indexed() || self.pinned.load(Ordering::Acquire) {
            return Ok(Arc::new(lock_read(&self.growing_index).clone()));
        }
        if let IndexState::Loaded(entries) = &*lock_read(&self.index) {
            return Ok(Arc::clone(entries));
        }
        let entries = match self.load_index_file() {
            Some(entries) => entries,
            None => {
                tracing::warn!(index = %self.index_path.display(), "index missing or stale, rebuilding it from the log");
                let (encoded, entries) = self.rebuild_index(cache)?;
                *self
                    .pending_index
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(encoded);
                entries
            }
        };
        let entries = Arc::new(entries);
        *lock_write(&self.index) = IndexState::Loaded(Arc::clone(&entries));
        Ok(entries)
    }

    /// Walks the sealed segment's bytes and builds its index file.
    pub(crate) fn rebuild_index(
        self: &Arc<Self>,
        cache: &SegmentCache,
    ) -> Result<(Vec<u8>, Vec<IndexEntry>)> {
        let bytes = self.visible_bytes(cache)?;
        let length = bytes.len() as u64;
        let mut source = MemorySource { bytes };
        let start =
            WalkStart::segment_start(self.base_offset, crate::config::INDEX_INTERVAL_DEFAULT);
        let params = WalkParams::whole(self.salt_state, length);
        let walked = walk(&mut source, start, &params)?;
        if let Some(damage) = walked.damages.first() {
            return Err(Error::corruption(
                &self.path,
                damage.position,
                damage.reason.clone(),
            ));
        }
        if walked.end != length || walked.builder.next_offset != self.next_offset() {
            return Err(Error::corruption(
                &self.path,
                walked.end,
                format!(
                    "the frames end at byte {} (offset {}), the segment is {length} bytes up to offset {}",
                    walked.end,
                    walked.builder.next_offset,
                    self.next_offset()
                ),
            ));
        }
        let mut header = walked.builder.header(length, self.header.salt);
        header.flags |= INDEX_FLAG_SEALED;
        header.segment_crc = crc32c::crc32c(&source.bytes);
        Ok((
            encode_index(&header, &walked.builder.entries),
            walked.builder.entries,
        ))
    }

    /// Records the progress of the durable part of the active segment.
    pub(crate) fn set_durable_progress(&self, progress: SegmentProgress) {
        self.mark_durable(progress.length);
        let mut durable = self
            .durable_progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if durable.is_none_or(|current| current.length <= progress.length) {
            *durable = Some(progress);
        }
    }

    pub(crate) fn durable_progress(&self) -> Option<SegmentProgress> {
        *self
            .durable_progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An index that could not be written, to be retried by maintenance.
    pub(crate) fn set_pending_index(&self, encoded: Vec<u8>) {
        *self
            .pending_index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(encoded);
    }

    /// An index rebuilt by a reader, to be written by maintenance.
    pub(crate) fn take_pending_index(&self) -> Option<Vec<u8>> {
        self.pending_index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    fn load_index_file(&self) -> Option<Vec<IndexEntry>> {
        let bytes = self.file_system.read(&self.index_path).ok()?;
        let (header, entries) = decode_index(&bytes).ok()?;
        let matches = header.base_offset == self.base_offset
            && header.salt == self.header.salt
            && header.is_sealed()
            && progress_of(&header).length == self.visible_length()
            && header.next_offset == self.next_offset();
        matches.then_some(entries)
    }

    /// Slot position of a frame at or before the frame holding `offset`.
    pub fn seek_offset(self: &Arc<Self>, cache: &SegmentCache, offset: u64) -> Result<u64> {
        let entries = self.index_entries(cache)?;
        let relative = offset.saturating_sub(self.base_offset);
        let index = entries.partition_point(|entry| u64::from(entry.relative_offset) <= relative);
        Ok(match index {
            0 => SEGMENT_HEADER_LENGTH as u64,
            found => u64::from(entries[found - 1].position),
        })
    }

    /// Slot position from which records with timestamp >= `timestamp_ns`
    /// can appear (every frame before it has only smaller timestamps).
    pub fn seek_time(self: &Arc<Self>, cache: &SegmentCache, timestamp_ns: i64) -> Result<u64> {
        let entries = self.index_entries(cache)?;
        let index = entries.partition_point(|entry| entry.timestamp_max_before < timestamp_ns);
        Ok(match index {
            0 => SEGMENT_HEADER_LENGTH as u64,
            found => u64::from(entries[found - 1].position),
        })
    }

    /// Slot position of a frame at or before the frame with Raft index
    /// `raft_index`.
    pub fn seek_raft_index(self: &Arc<Self>, cache: &SegmentCache, raft_index: u64) -> Result<u64> {
        let entries = self.index_entries(cache)?;
        let relative = raft_index.saturating_sub(self.first_raft_index());
        let index =
            entries.partition_point(|entry| u64::from(entry.relative_raft_index) <= relative);
        Ok(match index {
            0 => SEGMENT_HEADER_LENGTH as u64,
            found => u64::from(entries[found - 1].position),
        })
    }
}
