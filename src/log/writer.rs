//! SegmentWriter: writes slots and frames to the active segment, rotates
//! it by size, age and key, and creates the next segment. Owned by the
//! log's writer lock; one caller writes at a time.
//!
//! Invariants:
//! - frames are written at `position` only, which only grows within a
//!   segment (a truncation cuts and starts a new generation);
//! - before the first write of an open (and of a truncation) the stream's
//!   generation and nonce epoch are raised durably in its metadata, so no
//!   slot or nonce of an abandoned tail is ever reused;
//! - a segment is sealed only after all its frames are durable, and only
//!   then is the next one created: a segment that is not the last always
//!   holds every offset up to the next segment's first (recovery relies on
//!   it to tell an interrupted seal from damage);
//! - a new segment appears under its name only whole: it is built as a
//!   temporary (or recycled) file, its header synced, then renamed in and
//!   the directory synced.

use super::durability::DurablePoint;
use super::index::{IndexBuilder, SegmentProgress};
use super::segment::StorageSegment;
use super::LogShared;
use crate::codec::FrameEncoder;
use crate::error::{Error, Result};
use crate::format::frame::{FrameHeader, FrameKind, SlotHeader};
use crate::format::frame::{FRAME_HEADER_LENGTH, SLOT_HEADER_LENGTH};
use crate::format::metadata::LogId;
use crate::format::segment_header::{SegmentHeader, SEGMENT_HEADER_LENGTH};
use crate::io::File;
use std::sync::Arc;

/// Frame bodies from this length on have their CRC combined into the
/// segment's running CRC instead of being read a second time.
const CRC_COMBINE_BYTES_MIN: usize = 64 * 1024;

/// Wall-clock nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as i64)
        .unwrap_or(0)
}

/// Name of the directory retired segment files wait in for reuse.
pub const RECYCLE_DIRECTORY: &str = "recycle";

/// The segment being appended to.
pub(crate) struct ActiveSegment {
    pub segment: Arc<StorageSegment>,
    pub file: Arc<dyn File>,
    /// End of the last slot written.
    pub position: u64,
    /// Bytes allocated (`fallocate`) so far.
    pub capacity: u64,
    pub builder: IndexBuilder,
    /// Wall-clock time of the first frame written into the segment.
    pub first_write_ns: Option<i64>,
    /// CRC32C of `[0, position)`, kept as frames are written; `None` for a
    /// segment reopened by recovery (computed when it is sealed).
    pub crc: Option<u32>,
}

/// A segment whose frames are durable, waiting to be cut and indexed.
pub(crate) struct SealJob {
    pub segment: Arc<StorageSegment>,
    pub file: Arc<dyn File>,
    pub length: u64,
    pub crc: Option<u32>,
    pub builder: IndexBuilder,
}

/// Where a frame was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Write sequence of the frame (what [`DurablePoint::sequence`] counts).
    pub sequence: u64,
    pub base_offset: u64,
    pub next_offset: u64,
    pub log_id: LogId,
    /// Bytes the frame took in its segment (slot included).
    pub stored_bytes: u64,
    /// Truncations the log had seen when the frame was written (see
    /// [`Log::survives_truncations`](super::Log::survives_truncations)).
    pub truncations: u64,
}

/// Who asked for a frame: the caller's Raft id and whether it is atomic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AppendMeta {
    pub atomic: bool,
    pub raft_term: u64,
    pub raft_index: u64,
}

/// The first allocation of a stream's segment: a nearly empty stream costs
/// about this much disk beyond what it holds.
pub const ALLOCATION_STEP_MIN_BYTES: u64 = 64 * 1024;
/// Allocation steps stop doubling here: a busy stream calls `fallocate`
/// once per this many bytes (twice per default segment).
pub const ALLOCATION_STEP_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Extensions closer together than this double the step; farther apart,
/// halve it: the step follows what the stream writes in about a second.
const ALLOCATION_PACE_NS: i64 = 1_000_000_000;

/// How far ahead of the write position the active segment is allocated.
/// The whole segment is not allocated up front (a nearly empty stream would
/// cost a whole segment of disk); each extension is a `fallocate`, so a
/// full disk fails an append before it is written, never a later store.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AllocationPace {
    step_bytes: u64,
    last_extension_ns: Option<i64>,
}

impl Default for AllocationPace {
    fn default() -> Self {
        AllocationPace {
            step_bytes: ALLOCATION_STEP_MIN_BYTES,
            last_extension_ns: None,
        }
    }
}

impl AllocationPace {
    /// The step of an extension (or a new segment's first allocation) at
    /// `now_ns`.
    pub fn step(&mut self, now_ns: i64) -> u64 {
        if let Some(last) = self.last_extension_ns {
            self.step_bytes = if now_ns.saturating_sub(last) < ALLOCATION_PACE_NS {
                (self.step_bytes * 2).min(ALLOCATION_STEP_MAX_BYTES)
            } else {
                (self.step_bytes / 2).max(ALLOCATION_STEP_MIN_BYTES)
            };
        }
        self.last_extension_ns = Some(now_ns);
        self.step_bytes
    }

    /// The end to allocate to so that `needed_end` fits, for a segment of
    /// at most `capacity_max` bytes already allocated to `capacity`.
    pub fn extended_capacity(
        &mut self,
        capacity: u64,
        needed_end: u64,
        capacity_max: u64,
        now_ns: i64,
    ) -> u64 {
        let step = self.step(now_ns);
        needed_end.max(capacity.saturating_add(step).min(capacity_max))
    }
}

/// The writer's state behind the log's writer lock.
pub(crate) struct SegmentWriter {
    pub encoder: FrameEncoder,
    pub state: WriterState,
}

pub(crate) struct WriterState {
    pub active: Option<ActiveSegment>,
    pub next_offset: u64,
    pub last_log_id: LogId,
    /// Raft index the log was purged through (logically: the data stays).
    /// When it is past the last entry (a snapshot installed beyond the
    /// log), the next entry follows it instead of the last entry.
    pub raft_floor: u64,
    pub timestamp_max: i64,
    pub sequence: u64,
    pub generation: u32,
    /// The generation was raised for this open (or truncation).
    pub generation_raised: bool,
    pub allocation: AllocationPace,
}

impl SegmentWriter {
    /// Raises the generation and nonce epoch durably, once per open and per
    /// truncation, before anything is written.
    fn raise_generation(&mut self, shared: &LogShared) -> Result<()> {
        if self.state.generation_raised {
            return Ok(());
        }
        let metadata = shared.raise_generation()?;
        self.state.generation = metadata.generation;
        self.encoder.set_epoch(metadata.nonce_epoch);
        self.state.generation_raised = true;
        Ok(())
    }

    /// Appends the records of `builder` as one frame; the log assigns its
    /// offsets.
    pub fn append(
        &mut self,
        shared: &LogShared,
        builder: &mut crate::format::frame::FrameBuilder,
        meta: AppendMeta,
        now_ns: i64,
    ) -> Result<Appended> {
        if builder.record_count() == 0 {
            return Err(Error::InvalidInput(
                "a frame needs at least one record".to_string(),
            ));
        }
        shared.gate_check()?;
        self.state
            .check_raft_id(meta.raft_term, meta.raft_index, false)?;
        self.raise_generation(shared)?;
        let header = FrameHeader {
            base_offset: self.state.next_offset,
            record_count: builder.record_count(),
            first_timestamp_ns: builder.first_timestamp_ns(),
            last_timestamp_ns: builder.last_timestamp_ns(),
            raft_term: meta.raft_term,
            raft_index: meta.raft_index,
            flags: if meta.atomic {
                crate::format::frame::flags::ATOMIC
            } else {
                0
            },
            kind: FrameKind::Records,
            ..FrameHeader::default()
        };
        let key = self.encoder.segment_key();
        let encoded = self.encoder.encode(builder, header)?;
        let parts = encoded.body_parts();
        self.state.write_frame(
            shared,
            &encoded.header,
            &encoded.header_bytes,
            &parts,
            key,
            now_ns,
        )
    }

    /// Appends a frame exactly as received (a leader's Raft entry): its
    /// offsets must continue the log, its Raft index must follow the last.
    pub fn append_stored(
        &mut self,
        shared: &LogShared,
        frame: &[u8],
        now_ns: i64,
        filling: bool,
    ) -> Result<Appended> {
        shared.gate_check()?;
        let header = match crate::format::frame::check_frame(frame) {
            crate::format::frame::FrameCheck::Valid(header)
                if header.frame_length as usize == frame.len() =>
            {
                header
            }
            crate::format::frame::FrameCheck::Valid(header) => {
                return Err(Error::InvalidInput(format!(
                    "frame says {} bytes but {} were given",
                    header.frame_length,
                    frame.len()
                )))
            }
            crate::format::frame::FrameCheck::Defect(defect) => {
                return Err(Error::InvalidInput(format!("not a valid frame: {defect}")))
            }
            crate::format::frame::FrameCheck::Unsupported(reason) => {
                return Err(Error::InvalidInput(format!(
                    "frame not understood: {reason}"
                )))
            }
        };
        if header.kind == FrameKind::Gap {
            return Err(Error::InvalidInput(
                "gap frames are written by repair only".to_string(),
            ));
        }
        if header.base_offset != self.state.next_offset {
            return Err(Error::InvalidInput(format!(
                "frame starts at offset {} but the log continues at offset {}",
                header.base_offset, self.state.next_offset
            )));
        }
        self.state
            .check_raft_id(header.raft_term, header.raft_index, filling)?;
        self.raise_generation(shared)?;
        let key = (header.key_id, header.cipher);
        let mut header_bytes = [0u8; FRAME_HEADER_LENGTH];
        header_bytes.copy_from_slice(&frame[..FRAME_HEADER_LENGTH]);
        self.state.write_frame(
            shared,
            &header,
            &header_bytes,
            &[&frame[FRAME_HEADER_LENGTH..]],
            key,
            now_ns,
        )
    }

    /// Seals the active segment if it is older than `segment_age_max_ms`.
    pub fn rotate_if_old(&mut self, shared: &LogShared, now_ns: i64) -> Result<bool> {
        let old = self
            .state
            .active
            .as_ref()
            .is_some_and(|active| shared.too_old(active, now_ns));
        if old {
            self.state.rotate(shared)?;
        }
        Ok(old)
    }
}

impl WriterState {
    fn check_raft_id(&self, term: u64, index: u64, filling: bool) -> Result<()> {
        if index == 0 {
            return Ok(());
        }
        let last = self.last_log_id;
        // Past a purge point beyond the log's end (a snapshot whose missing
        // entries hold no record) the next entry follows the point, except
        // for committed entries that fill the log up to it (a repair,
        // segment shipping), which follow the log's last.
        let follows = if filling {
            last.index
        } else {
            last.index.max(self.raft_floor)
        };
        if follows != 0 && index != follows + 1 {
            return Err(Error::InvalidInput(format!(
                "Raft index {index} does not follow the log's last index {follows}"
            )));
        }
        if term < last.term {
            return Err(Error::InvalidInput(format!(
                "Raft term {term} is older than the log's last term {}",
                last.term
            )));
        }
        Ok(())
    }

    /// Writes one slot and frame and records it with the gate.
    fn write_frame(
        &mut self,
        shared: &LogShared,
        header: &FrameHeader,
        header_bytes: &[u8; FRAME_HEADER_LENGTH],
        body_parts: &[&[u8]],
        key: (u32, u8),
        now_ns: i64,
    ) -> Result<Appended> {
        let stored_bytes = (SLOT_HEADER_LENGTH + header.frame_length as usize) as u64;
        self.prepare(shared, stored_bytes, key, now_ns)?;
        let active = self
            .active
            .as_mut()
            .expect("prepare made an active segment");
        let slot = SlotHeader {
            frame_length: header.frame_length,
            durable_position: active.segment.durable_length() as u32,
            generation: self.generation,
        };
        let mut prefix = [0u8; SLOT_HEADER_LENGTH + FRAME_HEADER_LENGTH];
        prefix[..SLOT_HEADER_LENGTH].copy_from_slice(&slot.encode(active.segment.salt_state()));
        prefix[SLOT_HEADER_LENGTH..].copy_from_slice(header_bytes);
        let mut parts: Vec<&[u8]> = Vec::with_capacity(body_parts.len() + 1);
        parts.push(&prefix);
        parts.extend_from_slice(body_parts);
        if let Err(error) = active.file.write_vectored_at(active.position, &parts) {
            if matches!(error, Error::DiskFull { .. }) {
                return Err(error);
            }
            shared.gate.poison(&error);
            return Err(shared.gate.poisoned_error());
        }
        active.crc = active.crc.map(|crc| {
            // The body's CRC is in its header already. Combining it with
            // the running CRC costs a few microseconds whatever the length
            // (zlib's GF(2) matrix method); reading the body again costs
            // about that at 64 KiB, and a second pass over every byte of
            // large frames (7% of ingest CPU at 1 KiB), so small frames are
            // read again and large ones combined.
            let body_length = header.frame_length as usize - FRAME_HEADER_LENGTH;
            let with_prefix = crc32c::crc32c_append(crc, &prefix);
            let combined = if body_length < CRC_COMBINE_BYTES_MIN {
                body_parts
                    .iter()
                    .fold(with_prefix, |crc, part| crc32c::crc32c_append(crc, part))
            } else {
                crc32c::crc32c_combine(with_prefix, header.body_crc, body_length)
            };
            debug_assert_eq!(
                combined,
                parts
                    .iter()
                    .fold(crc, |crc, part| crc32c::crc32c_append(crc, part)),
                "the combined CRC is the CRC of the bytes written"
            );
            combined
        });
        let position = active.position;
        let entry = active.builder.add(position, header);
        if header.raft_index != 0 {
            // Index entries are relative to it, and Raft reads written
            // frames before they are durable (before progress says so).
            active
                .segment
                .note_first_raft_index(active.builder.first_raft_index);
        }
        if let Some(entry) = entry {
            active.segment.push_index_entry(entry);
        }
        active.position += stored_bytes;
        active.segment.mark_written(active.position);
        active.first_write_ns.get_or_insert(now_ns);
        self.next_offset = header.next_offset();
        if header.raft_index != 0 {
            self.last_log_id = LogId {
                term: header.raft_term,
                index: header.raft_index,
            };
        }
        if header.stored_records() > 0 {
            self.timestamp_max = self.timestamp_max.max(header.last_timestamp_ns);
        }
        self.sequence += 1;
        let point = DurablePoint {
            sequence: self.sequence,
            next_offset: self.next_offset,
            last_log_id: self.last_log_id,
        };
        let progress: SegmentProgress = active.builder.progress(active.position);
        shared.gate.record_write(point, &active.segment, progress);
        Ok(Appended {
            sequence: self.sequence,
            base_offset: header.base_offset,
            next_offset: self.next_offset,
            log_id: self.last_log_id,
            stored_bytes,
            truncations: shared
                .truncations
                .load(std::sync::atomic::Ordering::Acquire),
        })
    }

    /// Makes sure an active segment with room for `stored_bytes` under
    /// `key` exists: rotates a full, old or differently keyed one.
    fn prepare(
        &mut self,
        shared: &LogShared,
        stored_bytes: u64,
        key: (u32, u8),
        now_ns: i64,
    ) -> Result<()> {
        let capacity_max = shared.config.segment_bytes_max;
        if stored_bytes > capacity_max - SEGMENT_HEADER_LENGTH as u64 {
            return Err(Error::InvalidInput(format!(
                "a frame of {stored_bytes} bytes cannot fit a segment of {capacity_max} bytes"
            )));
        }
        if let Some(active) = &self.active {
            let header = active.segment.header();
            let full = active.position + stored_bytes > capacity_max;
            let other_key = (header.key_id, header.cipher) != key;
            if full || other_key || shared.too_old(active, now_ns) {
                self.rotate(shared)?;
            }
        }
        if self.active.is_none() {
            self.create_segment(shared, key, now_ns)?;
        }
        let active = self.active.as_mut().expect("created above");
        let needed_end = active.position + stored_bytes;
        if needed_end > active.capacity {
            let length = self.allocation.extended_capacity(
                active.capacity,
                needed_end,
                capacity_max,
                now_ns,
            );
            active.file.allocate(length)?;
            active.capacity = length;
        }
        Ok(())
    }

    /// Makes every frame of the active segment durable, marks it sealed and
    /// queues it to be cut and indexed. An active segment without frames is
    /// removed instead (its name is the next segment's).
    pub fn rotate(&mut self, shared: &LogShared) -> Result<()> {
        let Some(active) = self.active.take() else {
            return Ok(());
        };
        if active.position == SEGMENT_HEADER_LENGTH as u64 {
            shared.gate.clear_active();
            return shared.remove_empty_segment(&active.segment);
        }
        if let Err(error) = shared.gate.sync() {
            self.active = Some(active);
            return Err(error);
        }
        shared.gate.clear_active();
        active.segment.mark_sealed(active.position);
        shared.queue_seal(SealJob {
            segment: active.segment,
            file: active.file,
            length: active.position,
            crc: active.crc,
            builder: active.builder,
        });
        shared.notify_readers();
        Ok(())
    }

    /// Creates the segment the next frame goes to, at `next_offset`.
    fn create_segment(&mut self, shared: &LogShared, key: (u32, u8), now_ns: i64) -> Result<()> {
        let header = SegmentHeader {
            base_offset: self.next_offset,
            created_at_ns: now_ns,
            key_id: key.0,
            compression: 0,
            cipher: key.1,
            salt: shared.file_system.entropy(),
        };
        let first_allocation = self.allocation.step(now_ns);
        let (file, capacity) = shared.install_new_segment_file(&header, first_allocation)?;
        let builder = IndexBuilder::new(header.base_offset, shared.config.index_interval_bytes);
        let segment = Arc::new(StorageSegment::new(
            Arc::clone(&shared.file_system),
            &shared.directory,
            header,
            builder.progress(SEGMENT_HEADER_LENGTH as u64),
            false,
        ));
        segment.set_timestamp_max_through(self.timestamp_max);
        segment.attach_active(Arc::clone(&file), Vec::new());
        shared.push_segment(Arc::clone(&segment));
        shared.gate.set_active(
            Arc::clone(&segment),
            Arc::clone(&file),
            SEGMENT_HEADER_LENGTH as u64,
        );
        tracing::debug!(segment = %segment.path().display(), "segment created");
        self.active = Some(ActiveSegment {
            segment,
            file,
            position: SEGMENT_HEADER_LENGTH as u64,
            capacity,
            builder,
            first_write_ns: None,
            crc: Some(crc32c::crc32c(&header.encode())),
        });
        Ok(())
    }
}
