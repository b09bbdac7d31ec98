//! StorageSegment: one segment file as readers see it. A sealed segment is a
//! read-only map opened on demand (and closed by the cache when idle) with a
//! sparse offset and time index loaded from its `.idx` file or rebuilt from
//! the log. The active segment is read through the writer's map.
//!
//! Invariants: `visible_length` and `next_offset` only grow while the stream
//! is open; every byte below `visible_length` belongs to a whole, checksummed
//! frame and is never written again. A segment is `sealed` when the writer
//! moved on (its `final_length` is then fixed; readers move to the next
//! segment once they have read up to it) and `indexed` once it is synced, cut
//! to length and its index file written (only then may retention delete it).

use crate::error::{Error, Result};
use crate::format::frame::{check_frame, FrameCheck, FrameHeader};
use crate::format::index::{decode_index, IndexEntry, IndexHeader};
use crate::format::segment_header::SEGMENT_HEADER_LENGTH;
use crate::io::{FileSystem, ReadableFile};
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::cache::SegmentCache;

/// Published progress of a segment: what readers may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentProgress {
    /// Bytes of whole frames, header included.
    pub length: u64,
    pub next_offset: u64,
    pub record_count: u64,
    pub first_timestamp_ns: i64,
    pub last_timestamp_ns: i64,
}

enum IndexState {
    Unloaded,
    Loaded(Arc<Vec<IndexEntry>>),
}

/// One segment file.
pub struct StorageSegment {
    base_offset: u64,
    path: PathBuf,
    index_path: PathBuf,
    file_system: Arc<dyn FileSystem>,
    visible_length: AtomicU64,
    next_offset: AtomicU64,
    record_count: AtomicU64,
    first_timestamp_ns: AtomicI64,
    last_timestamp_ns: AtomicI64,
    /// Largest timestamp in this and every earlier segment of the stream.
    timestamp_max_through: AtomicI64,
    /// Bytes of this segment known durable (synced).
    durable_length: AtomicU64,
    sealed: AtomicBool,
    /// Length the segment will have once all its frames are visible (set
    /// when sealed; `u64::MAX` before).
    final_length: AtomicU64,
    indexed: AtomicBool,
    /// Whole-file CRC of a sealed segment (from its index), 0 if unknown.
    segment_crc: AtomicU64,
    /// The map readers use; for sealed segments owned by the cache.
    source: Mutex<Option<Arc<dyn ReadableFile>>>,
    /// Pinned sources (the active segment's) are never evicted.
    pinned: AtomicBool,
    index: RwLock<IndexState>,
    /// Entries of the active segment, appended by the writer.
    growing_index: RwLock<Vec<IndexEntry>>,
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

impl StorageSegment {
    pub(crate) fn new(
        file_system: Arc<dyn FileSystem>,
        directory: &Path,
        base_offset: u64,
        progress: SegmentProgress,
        sealed: bool,
    ) -> StorageSegment {
        StorageSegment {
            base_offset,
            path: directory.join(crate::format::segment_file_name(base_offset)),
            index_path: directory.join(crate::format::index_file_name(base_offset)),
            file_system,
            visible_length: AtomicU64::new(progress.length),
            next_offset: AtomicU64::new(progress.next_offset),
            record_count: AtomicU64::new(progress.record_count),
            first_timestamp_ns: AtomicI64::new(progress.first_timestamp_ns),
            last_timestamp_ns: AtomicI64::new(progress.last_timestamp_ns),
            timestamp_max_through: AtomicI64::new(progress.last_timestamp_ns),
            durable_length: AtomicU64::new(progress.length),
            sealed: AtomicBool::new(sealed),
            final_length: AtomicU64::new(if sealed { progress.length } else { u64::MAX }),
            indexed: AtomicBool::new(sealed),
            segment_crc: AtomicU64::new(0),
            source: Mutex::new(None),
            pinned: AtomicBool::new(false),
            index: RwLock::new(IndexState::Unloaded),
            growing_index: RwLock::new(Vec::new()),
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

    /// No more frames will be written to this segment.
    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// Synced, cut to length and indexed: a finished, shippable file.
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

    pub fn progress(&self) -> SegmentProgress {
        SegmentProgress {
            length: self.visible_length(),
            next_offset: self.next_offset(),
            record_count: self.record_count(),
            first_timestamp_ns: self.first_timestamp_ns.load(Ordering::Acquire),
            last_timestamp_ns: self.last_timestamp_ns.load(Ordering::Acquire),
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

    pub(crate) fn mark_durable(&self, length: u64) {
        self.durable_length.fetch_max(length, Ordering::AcqRel);
    }

    /// The writer moved on: no frame will follow `final_length`.
    pub(crate) fn mark_sealed(&self, final_length: u64) {
        self.final_length.store(final_length, Ordering::Release);
        self.sealed.store(true, Ordering::Release);
    }

    /// The sealed segment is synced, cut and indexed.
    pub(crate) fn mark_indexed(&self, segment_crc: u32) {
        self.segment_crc
            .store(u64::from(segment_crc), Ordering::Release);
        self.indexed.store(true, Ordering::Release);
    }

    /// Gives the active segment its (pinned) read source and index.
    pub(crate) fn attach_active(&self, source: Arc<dyn ReadableFile>, entries: Vec<IndexEntry>) {
        *self
            .source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(source);
        self.pinned.store(true, Ordering::Release);
        *self
            .growing_index
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = entries;
    }

    /// Turns the active segment's growing index into a loaded, immutable one
    /// and lets the cache manage its map from now on.
    pub(crate) fn freeze_index(&self) -> Vec<IndexEntry> {
        let entries = std::mem::take(
            &mut *self
                .growing_index
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        *self
            .index
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
            IndexState::Loaded(Arc::new(entries.clone()));
        self.pinned.store(false, Ordering::Release);
        entries
    }

    pub(crate) fn push_index_entry(&self, entry: IndexEntry) {
        self.growing_index
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(entry);
    }

    pub(crate) fn growing_index_snapshot(&self) -> Vec<IndexEntry> {
        self.growing_index
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Drops the map and the loaded index (cache eviction). Readers that hold
    /// `Bytes` of the map keep it alive until they drop them.
    pub(crate) fn release(&self) {
        if self.pinned.load(Ordering::Acquire) {
            return;
        }
        *self
            .source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        *self
            .index
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = IndexState::Unloaded;
    }

    pub(crate) fn is_mapped(&self) -> bool {
        self.source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some()
    }

    /// The visible bytes of the segment, `[0, visible_length)`, zero-copy.
    pub fn visible_bytes(self: &Arc<Self>, cache: &SegmentCache) -> Result<Bytes> {
        let length = self.visible_length();
        let source = self.source(cache)?;
        if source.length() < length {
            return Err(Error::corruption(
                &self.path,
                source.length(),
                format!("segment file is shorter than the {length} bytes its index covers"),
            ));
        }
        source.bytes(0, length)
    }

    fn source(self: &Arc<Self>, cache: &SegmentCache) -> Result<Arc<dyn ReadableFile>> {
        let mut guard = self
            .source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(source) = guard.as_ref() {
            let source = Arc::clone(source);
            drop(guard);
            cache.touch(self);
            return Ok(source);
        }
        let source = self.file_system.open_readable(&self.path)?;
        *guard = Some(Arc::clone(&source));
        drop(guard);
        cache.insert(self);
        Ok(source)
    }

    /// Sparse index entries, loading or rebuilding them if needed.
    fn index_entries(self: &Arc<Self>, cache: &SegmentCache) -> Result<Arc<Vec<IndexEntry>>> {
        if !self.is_indexed() || self.pinned.load(Ordering::Acquire) {
            return Ok(Arc::new(self.growing_index_snapshot()));
        }
        if let IndexState::Loaded(entries) = &*self
            .index
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
        {
            return Ok(Arc::clone(entries));
        }
        let entries = match self.load_index_file() {
            Some(entries) => entries,
            None => {
                tracing::warn!(index = %self.index_path.display(), "index missing or stale, rebuilding from the log");
                let bytes = self.visible_bytes(cache)?;
                let (header, entries) = build_index(
                    &bytes,
                    &self.path,
                    self.base_offset,
                    true,
                    crate::config::INDEX_INTERVAL_DEFAULT,
                )?;
                let encoded = crate::format::index::encode_index(&header, &entries);
                if let Err(error) = self.file_system.write_atomic(&self.index_path, &encoded) {
                    tracing::warn!(%error, "cannot rewrite rebuilt index; it stays in memory");
                }
                entries
            }
        };
        let entries = Arc::new(entries);
        *self
            .index
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
            IndexState::Loaded(Arc::clone(&entries));
        Ok(entries)
    }

    fn load_index_file(&self) -> Option<Vec<IndexEntry>> {
        let bytes = self.file_system.read(&self.index_path).ok()?;
        let (header, entries) = decode_index(&bytes).ok()?;
        let matches = header.base_offset == self.base_offset
            && header.data_length == self.visible_length()
            && header.next_offset == self.next_offset();
        matches.then_some(entries)
    }

    /// Byte position of a frame at or before the frame holding `offset`.
    pub fn seek_offset(self: &Arc<Self>, cache: &SegmentCache, offset: u64) -> Result<u64> {
        let entries = self.index_entries(cache)?;
        let relative = offset.saturating_sub(self.base_offset);
        let index = entries.partition_point(|entry| u64::from(entry.relative_offset) <= relative);
        Ok(match index {
            0 => SEGMENT_HEADER_LENGTH as u64,
            found => u64::from(entries[found - 1].position),
        })
    }

    /// Byte position from which records with timestamp >= `timestamp_ns` can
    /// appear (every frame before it has only smaller timestamps).
    pub fn seek_time(self: &Arc<Self>, cache: &SegmentCache, timestamp_ns: i64) -> Result<u64> {
        let entries = self.index_entries(cache)?;
        let index = entries.partition_point(|entry| entry.timestamp_max_before < timestamp_ns);
        Ok(match index {
            0 => SEGMENT_HEADER_LENGTH as u64,
            found => u64::from(entries[found - 1].position),
        })
    }
}

/// Walks the whole frames of a segment image and builds its index. Any
/// frame defect before `bytes.len()` is corruption (used for sealed data).
pub(crate) fn build_index(
    bytes: &[u8],
    path: &Path,
    base_offset: u64,
    sealed: bool,
    index_interval_bytes: u64,
) -> Result<(IndexHeader, Vec<IndexEntry>)> {
    let mut builder = IndexBuilder::new(base_offset, index_interval_bytes);
    let mut position = SEGMENT_HEADER_LENGTH as u64;
    while position < bytes.len() as u64 {
        let header = match check_frame(&bytes[position as usize..]) {
            FrameCheck::Valid(header) => header,
            FrameCheck::Defect(defect) => {
                return Err(Error::corruption(path, position, defect.to_string()))
            }
            FrameCheck::Unsupported(reason) => {
                return Err(Error::corruption(path, position, reason))
            }
        };
        if header.base_offset < builder.next_offset {
            return Err(Error::corruption(
                path,
                position,
                format!(
                    "frame offset {} goes back before {}",
                    header.base_offset, builder.next_offset
                ),
            ));
        }
        builder.add(position, &header);
        position += u64::from(header.frame_length);
    }
    let mut index_header = builder.header(position);
    if sealed {
        index_header.flags |= crate::format::index::INDEX_FLAG_SEALED;
        index_header.segment_crc = crc32c::crc32c(bytes);
    }
    Ok((index_header, builder.entries))
}

/// Accumulates index entries and segment statistics frame by frame.
#[derive(Debug, Clone)]
pub(crate) struct IndexBuilder {
    pub base_offset: u64,
    pub interval_bytes: u64,
    pub entries: Vec<IndexEntry>,
    pub next_offset: u64,
    pub record_count: u64,
    pub first_timestamp_ns: i64,
    pub timestamp_max: i64,
    last_entry_position: Option<u64>,
}

impl IndexBuilder {
    pub fn new(base_offset: u64, interval_bytes: u64) -> IndexBuilder {
        IndexBuilder {
            base_offset,
            interval_bytes,
            entries: Vec::new(),
            next_offset: base_offset,
            record_count: 0,
            first_timestamp_ns: 0,
            timestamp_max: i64::MIN,
            last_entry_position: None,
        }
    }

    /// Resumes from a checkpoint.
    pub fn resume(
        header: &IndexHeader,
        entries: Vec<IndexEntry>,
        interval_bytes: u64,
    ) -> IndexBuilder {
        IndexBuilder {
            base_offset: header.base_offset,
            interval_bytes,
            last_entry_position: entries.last().map(|entry| u64::from(entry.position)),
            entries,
            next_offset: header.next_offset,
            record_count: header.record_count,
            first_timestamp_ns: header.first_timestamp_ns,
            timestamp_max: if header.record_count == 0 {
                i64::MIN
            } else {
                header.last_timestamp_ns
            },
        }
    }

    /// Adds a frame; returns the index entry if one was made for it.
    pub fn add(&mut self, position: u64, header: &FrameHeader) -> Option<IndexEntry> {
        let due = match self.last_entry_position {
            None => true,
            Some(last) => position >= last + self.interval_bytes,
        };
        let entry = due.then(|| IndexEntry {
            relative_offset: (header.base_offset - self.base_offset) as u32,
            position: position as u32,
            timestamp_max_before: self.timestamp_max,
        });
        if let Some(entry) = entry {
            self.entries.push(entry);
            self.last_entry_position = Some(position);
        }
        if self.record_count == 0 {
            self.first_timestamp_ns = header.first_timestamp_ns;
        }
        self.record_count += u64::from(header.record_count);
        self.timestamp_max = self.timestamp_max.max(header.last_timestamp_ns);
        self.next_offset = header.next_offset();
        entry
    }

    pub fn header(&self, data_length: u64) -> IndexHeader {
        IndexHeader {
            flags: 0,
            base_offset: self.base_offset,
            next_offset: self.next_offset,
            data_length,
            first_timestamp_ns: self.first_timestamp_ns,
            last_timestamp_ns: if self.record_count == 0 {
                0
            } else {
                self.timestamp_max
            },
            segment_crc: 0,
            record_count: self.record_count,
        }
    }

    pub fn progress(&self, length: u64) -> SegmentProgress {
        SegmentProgress {
            length,
            next_offset: self.next_offset,
            record_count: self.record_count,
            first_timestamp_ns: self.first_timestamp_ns,
            last_timestamp_ns: if self.record_count == 0 {
                i64::MIN
            } else {
                self.timestamp_max
            },
        }
    }
}
