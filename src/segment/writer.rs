//! SegmentWriter: appends whole frames to the active segment, rotates it by
//! size and age, and keeps the active segment's checkpoint. Owned by the
//! stream's writer thread alone. Rotation only marks the old segment sealed
//! and starts the next one; [`finish_sealed`] (run off the write path) syncs,
//! cuts and indexes the old one.
//!
//! Invariants: frames are written at `write_position` only, which only grows
//! within a segment; a sealed segment's index is written only after all its
//! bytes are synced; the directory is synced after every file create.

use super::cache::SegmentCache;
use super::storage::{IndexBuilder, SegmentProgress, StorageSegment};
use crate::config::StreamConfig;
use crate::error::{Error, Result};
use crate::format::frame::FrameHeader;
use crate::format::index::{encode_index, INDEX_FLAG_CLEAN, INDEX_FLAG_SEALED};
use crate::format::segment_header::{SegmentHeader, SEGMENT_HEADER_LENGTH};
use crate::io::{FileSystem, WritableFile};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The segment being appended to.
pub(crate) struct ActiveSegment {
    pub segment: Arc<StorageSegment>,
    pub file: Arc<dyn WritableFile>,
    pub write_position: u64,
    pub builder: IndexBuilder,
    pub last_checkpoint_length: u64,
    /// Wall-clock time of the first frame written into the segment.
    pub first_write_ns: Option<i64>,
    /// CRC32C of `[0, write_position)`, kept as frames are written; `None`
    /// for a segment reopened by recovery (computed when it is sealed).
    pub crc: Option<u32>,
    /// Key id and cipher from the segment header (0: not encrypted).
    pub key_id: u32,
    pub cipher: u8,
}

/// Where a frame landed.
pub(crate) struct WrittenFrame {
    pub segment: Arc<StorageSegment>,
    pub file: Arc<dyn WritableFile>,
    pub progress: SegmentProgress,
}

pub(crate) struct SegmentWriter {
    file_system: Arc<dyn FileSystem>,
    directory: PathBuf,
    config: StreamConfig,
    cache: Arc<SegmentCache>,
    segments: Arc<RwLock<Vec<Arc<StorageSegment>>>>,
    active: Option<ActiveSegment>,
    next_offset: u64,
    timestamp_max: i64,
    /// Compresses and encrypts frames; new segments take its key.
    pub encoder: crate::codec::FrameEncoder,
}

pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as i64)
        .unwrap_or(0)
}

impl SegmentWriter {
    // Called once, by `Stream::open`, with what recovery handed over; a
    // parameter struct would only restate these fields.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        file_system: Arc<dyn FileSystem>,
        directory: &Path,
        config: StreamConfig,
        cache: Arc<SegmentCache>,
        segments: Arc<RwLock<Vec<Arc<StorageSegment>>>>,
        active: Option<ActiveSegment>,
        next_offset: u64,
        timestamp_max: i64,
    ) -> SegmentWriter {
        SegmentWriter {
            file_system,
            directory: directory.to_path_buf(),
            config,
            cache,
            segments,
            active,
            next_offset,
            timestamp_max,
            encoder: crate::codec::FrameEncoder::new(crate::codec::Compression::None, None, 0),
        }
    }

    /// Key id and cipher of the active segment, if there is one.
    pub fn active_key(&self) -> Option<(u32, u8)> {
        self.active
            .as_ref()
            .map(|active| (active.key_id, active.cipher))
    }

    /// The offset the next record gets.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// What the next frame's `durable_position` must say.
    pub fn durable_position(&self) -> u64 {
        self.active
            .as_ref()
            .map_or(0, |active| active.segment.durable_length())
    }

    /// Makes sure an active segment with room for `frame_length` bytes
    /// exists: seals a full or too old segment and creates the next one.
    /// Returns the segment it sealed, for [`finish_sealed`].
    pub fn prepare(&mut self, frame_length: u64, now_ns: i64) -> Result<Option<ActiveSegment>> {
        if frame_length > self.config.frame_capacity_bytes() {
            return Err(Error::InvalidInput(format!(
                "a frame of {frame_length} bytes cannot fit a segment of {} bytes",
                self.config.segment_bytes_max
            )));
        }
        let mut sealed = None;
        if let Some(active) = &self.active {
            let full = active.write_position + frame_length > active.file.capacity();
            if full || self.too_old(active, now_ns) {
                sealed = self.seal_active();
            }
        }
        if self.active.is_none() {
            if let Err(error) = self.create_segment(now_ns) {
                // The sealed segment still needs finishing; hand it back
                // through the error path by finishing it here.
                if let Some(old) = sealed {
                    finish_sealed(self.file_system.as_ref(), &self.cache, old)?;
                }
                return Err(error);
            }
        }
        Ok(sealed)
    }

    fn too_old(&self, active: &ActiveSegment, now_ns: i64) -> bool {
        match (self.config.segment_age_max_ms, active.first_write_ns) {
            (Some(age_max_ms), Some(first)) => {
                now_ns.saturating_sub(first) >= (age_max_ms as i64).saturating_mul(1_000_000)
            }
            _ => false,
        }
    }

    /// Seals the active segment if it is older than `segment_age_max_ms`.
    pub fn rotate_if_old(&mut self, now_ns: i64) -> Option<ActiveSegment> {
        let old = self
            .active
            .as_ref()
            .is_some_and(|active| self.too_old(active, now_ns));
        if old {
            self.seal_active()
        } else {
            None
        }
    }

    /// Copies a finished frame into the active segment (after [`prepare`]).
    ///
    /// [`prepare`]: SegmentWriter::prepare
    pub fn write_frame(
        &mut self,
        frame: &[u8],
        header: &FrameHeader,
        now_ns: i64,
    ) -> Result<WrittenFrame> {
        let active = self.active.as_mut().ok_or_else(|| {
            Error::InvalidInput("write_frame without an active segment".to_string())
        })?;
        debug_assert_eq!(header.base_offset, self.next_offset, "offsets are dense");
        debug_assert!(active.write_position + frame.len() as u64 <= active.file.capacity());
        let position = active.write_position;
        active.file.write_at(position, frame)?;
        active.write_position += frame.len() as u64;
        active.crc = active.crc.map(|crc| crc32c::crc32c_append(crc, frame));
        if let Some(entry) = active.builder.add(position, header) {
            active.segment.push_index_entry(entry);
        }
        active.first_write_ns.get_or_insert(now_ns);
        self.next_offset = header.next_offset();
        self.timestamp_max = self.timestamp_max.max(header.last_timestamp_ns);
        Ok(WrittenFrame {
            segment: Arc::clone(&active.segment),
            file: Arc::clone(&active.file),
            progress: active.builder.progress(active.write_position),
        })
    }

    /// Bytes written into the active segment beyond its last checkpoint.
    pub fn bytes_since_checkpoint(&self) -> u64 {
        self.active.as_ref().map_or(0, |active| {
            active.write_position - active.last_checkpoint_length
        })
    }

    /// Syncs everything written to the active segment and publishes it.
    pub fn sync_active(&mut self) -> Result<()> {
        let Some(active) = &self.active else {
            return Ok(());
        };
        let durable = active.segment.durable_length();
        active
            .file
            .sync_range(durable.min(active.write_position), active.write_position)?;
        active.segment.mark_durable(active.write_position);
        active
            .segment
            .publish(active.builder.progress(active.write_position));
        Ok(())
    }

    /// Syncs the active segment and rewrites its checkpoint, so a restart
    /// validates only what was written after it.
    pub fn checkpoint(&mut self, clean: bool) -> Result<()> {
        self.sync_active()?;
        let Some(active) = &mut self.active else {
            return Ok(());
        };
        let mut header = active.builder.header(active.write_position);
        if clean {
            header.flags |= INDEX_FLAG_CLEAN;
        }
        let bytes = encode_index(&header, &active.builder.entries);
        self.file_system
            .write_atomic(active.segment.index_path(), &bytes)?;
        active.last_checkpoint_length = active.write_position;
        Ok(())
    }

    /// Marks the active segment sealed at its current length; the next frame
    /// goes to a new segment. Returns it for [`finish_sealed`].
    pub fn seal_active(&mut self) -> Option<ActiveSegment> {
        let active = self.active.take()?;
        active.segment.mark_sealed(active.write_position);
        Some(active)
    }

    fn create_segment(&mut self, now_ns: i64) -> Result<()> {
        let base_offset = self.next_offset;
        let path = self
            .directory
            .join(crate::format::segment_file_name(base_offset));
        let file = self
            .file_system
            .create_preallocated(&path, self.config.segment_bytes_max)?;
        let (key_id, cipher) = self.encoder.segment_key();
        let header = SegmentHeader {
            base_offset,
            created_at_ns: now_ns,
            key_id,
            compression: 0,
            cipher,
        };
        let written = file
            .write_at(0, &header.encode())
            .and_then(|()| file.sync_range(0, SEGMENT_HEADER_LENGTH as u64))
            .and_then(|()| self.file_system.sync_directory(&self.directory));
        if let Err(error) = written {
            let _ = self.file_system.remove(&path);
            return Err(error);
        }
        let builder = IndexBuilder::new(base_offset, self.config.index_interval_bytes);
        let segment = Arc::new(StorageSegment::new(
            Arc::clone(&self.file_system),
            &self.directory,
            base_offset,
            builder.progress(SEGMENT_HEADER_LENGTH as u64),
            false,
        ));
        segment.set_timestamp_max_through(self.timestamp_max);
        segment.attach_active(file.view(), Vec::new());
        self.segments
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Arc::clone(&segment));
        tracing::debug!(segment = %path.display(), "segment created");
        self.active = Some(ActiveSegment {
            segment,
            file,
            write_position: SEGMENT_HEADER_LENGTH as u64,
            builder,
            last_checkpoint_length: SEGMENT_HEADER_LENGTH as u64,
            first_write_ns: None,
            crc: Some(crc32c::crc32c(&header.encode())),
            key_id,
            cipher,
        });
        Ok(())
    }
}

/// Finishes a sealed segment: syncs its frames, cuts the file to their
/// length, writes its index, and hands its map to the cache. Runs off the
/// write path; an error is a failed sync (the caller poisons the stream).
pub(crate) fn finish_sealed(
    file_system: &dyn FileSystem,
    cache: &SegmentCache,
    active: ActiveSegment,
) -> Result<()> {
    let length = active.write_position;
    let durable = active.segment.durable_length().min(length);
    active.file.sync_range(durable, length)?;
    active.segment.mark_durable(length);
    active.segment.publish(active.builder.progress(length));
    active.file.set_length(length)?;
    active.file.sync_all()?;
    let segment_crc = match active.crc {
        Some(crc) => crc,
        None => crc32c::crc32c(&active.file.view().bytes(0, length)?),
    };
    let mut header = active.builder.header(length);
    header.flags |= INDEX_FLAG_SEALED;
    header.segment_crc = segment_crc;
    let entries = active.segment.freeze_index();
    file_system.write_atomic(
        active.segment.index_path(),
        &encode_index(&header, &entries),
    )?;
    active.segment.mark_indexed(segment_crc);
    cache.insert(&active.segment);
    tracing::debug!(segment = %active.segment.path().display(), length, "segment sealed");
    Ok(())
}
