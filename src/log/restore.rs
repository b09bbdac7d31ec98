//! Restoring lost Raft entries into a repaired log.
//!
//! A repair (`recovery.rs`) replaces damaged frames by a gap frame for the
//! offsets they held; entries that held no offsets (blank, membership)
//! by a gap of no offsets, which marks the jump in Raft indexes after it. On a replica those entries are
//! committed on the other nodes, as the very same bytes (a Raft entry's
//! frame is identical on every replica), so they are fetched from a peer
//! and written back where the damage was: the damage then costs nothing.
//!
//! [`Log::raft_holes`] finds the entries missing from damaged segments,
//! with the Raft indexes around them; [`restore_raft_frames`] writes one
//! hole's entries back into its segment, with the log closed. The segment
//! is rebuilt whole, every other slot kept as it is, and written as a
//! repair writes one (write to a temporary, sync, rename, directory sync,
//! under a new salt; then its index): a crash anywhere leaves the repaired
//! image or the restored one, never a mix, and the hole is found and
//! restored again by the next run.
//!
//! While the log runs, [`Log::sealed_segment_damage`] names the Raft
//! entries the damaged ranges of a sealed segment held (the valid frames
//! around each range, or the first and last index the segment's sealed
//! index recorded), and [`Log::restore_sealed_segment`] rebuilds the
//! segment with a peer's copies of them and swaps it into the live list:
//! written to `incoming/`, synced, renamed over the segment, the directory
//! synced, then indexed. A crash before the rename leaves the damaged
//! segment, after it the restored one; readers of the old segment finish
//! their read and re-find their offset in the new one.
//!
//! Invariant: a restore only ever adds the entries that close a hole, in
//! order, each checked by its own CRC, with consecutive Raft indexes and
//! offsets covering exactly the hole's gap; anything else is refused.

use super::recovery::{
    load_metadata, lock_stream_directory, push_slot, segment_bases, write_rebuilt_segment,
};
use super::walker::{read_slot, walk, MemorySource, Slot, WalkParams, WalkStart};
use super::{Log, SegmentSource};
use crate::config::StreamConfig;
use crate::error::{Error, Result};
use crate::format::frame::{check_frame, salt_state, FrameCheck, FrameHeader, FrameKind};
use crate::format::index::{encode_index, INDEX_FLAG_SEALED};
use crate::format::metadata::METADATA_FILE_NAME;
use crate::format::segment_header::{SegmentHeader, SEGMENT_HEADER_LENGTH};
use crate::io::FileSystem;
use bytes::Bytes;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Raft entries missing from a segment of the log (a repair cut them out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftHole {
    pub segment: PathBuf,
    /// Raft index of the last entry before the hole (0: none).
    pub after_index: u64,
    /// Raft index of the first entry after it (`None`: the log ends there).
    pub before_index: Option<u64>,
    /// The offsets the lost entries held: `[first_offset, next_offset)`
    /// (empty when they held none).
    pub first_offset: u64,
    pub next_offset: u64,
}

impl RaftHole {
    /// Raft indexes of the missing entries (`None` at the end of the log,
    /// where how many were lost is unknown).
    pub fn missing(&self) -> Option<Range<u64>> {
        self.before_index.map(|before| self.after_index + 1..before)
    }
}

impl Log {
    /// The Raft entries missing from these segments (paths as the repair
    /// report names them), in log order: gap frames, and jumps in Raft
    /// indexes, also across a segment's boundaries.
    pub fn raft_holes(&self, damaged: &[PathBuf]) -> Result<Vec<RaftHole>> {
        let segments = self.segments();
        let purged = self.metadata().last_purged.map_or(0, |purged| purged.index);
        let mut holes: Vec<RaftHole> = Vec::new();
        for (position, segment) in segments.iter().enumerate() {
            if !damaged.iter().any(|path| path == segment.path()) {
                continue;
            }
            let mut previous = match position {
                0 => purged,
                _ => segments[position - 1].last_log_id().index,
            };
            let hole = |after_index, before_index, (first_offset, next_offset)| RaftHole {
                segment: segment.path().to_path_buf(),
                after_index,
                before_index,
                first_offset,
                next_offset,
            };
            let mut gap: Option<(u64, u64)> = None;
            for header in self.segment_frame_headers(segment)? {
                if header.kind == FrameKind::Gap {
                    let first = gap.map_or(header.base_offset, |(first, _)| first);
                    gap = Some((first, header.next_offset()));
                    continue;
                }
                if header.raft_index == 0 {
                    continue;
                }
                // A hole at the end of the previous segment (a gap there)
                // is the jump into this one: it is reported once.
                let reported = holes
                    .last()
                    .is_some_and(|hole| hole.before_index == Some(header.raft_index));
                if gap.is_some() || (header.raft_index > previous + 1 && !reported) {
                    let offsets = gap
                        .take()
                        .unwrap_or((header.base_offset, header.base_offset));
                    holes.push(hole(previous, Some(header.raft_index), offsets));
                }
                previous = header.raft_index;
            }
            let next = segments.get(position + 1);
            let next_first = next
                .map(|next| next.first_raft_index())
                .filter(|index| *index != 0);
            // A jump into a damaged next segment is found there (its hole
            // may begin it).
            let next_damaged =
                next.is_some_and(|next| damaged.iter().any(|path| path == next.path()));
            let jumps = !next_damaged && next_first.is_some_and(|first| first > previous + 1);
            if gap.is_some() || jumps {
                let end = segment.next_offset();
                holes.push(hole(previous, next_first, gap.unwrap_or((end, end))));
            }
        }
        Ok(holes)
    }

    /// Headers of every frame of a segment, in order.
    fn segment_frame_headers(
        &self,
        segment: &Arc<super::segment::StorageSegment>,
    ) -> Result<Vec<FrameHeader>> {
        let end = segment.written_length();
        let mut source = SegmentSource::new(segment, self.cache(), end);
        let mut position = SEGMENT_HEADER_LENGTH as u64;
        let mut headers = Vec::new();
        while position < end {
            match read_slot(&mut source, position, segment.salt_state(), u32::MAX)? {
                Slot::Frame(frame) => {
                    position = frame.end();
                    headers.push(frame.header);
                }
                Slot::Defect(defect) => {
                    return Err(Error::corruption(segment.path(), position, defect.reason))
                }
            }
        }
        Ok(headers)
    }
}

/// Writes a hole's lost entries back into its segment, in place of the
/// gap the repair left. The log must be closed (this takes the directory
/// lock). `frames` are exactly the entries `hole.missing()`, as stored on
/// a peer.
pub fn restore_raft_frames(
    file_system: &Arc<dyn FileSystem>,
    directory: &Path,
    config: &StreamConfig,
    hole: &RaftHole,
    frames: &[Bytes],
) -> Result<()> {
    let _lock = lock_stream_directory(file_system.as_ref(), directory)?;
    check_restored_frames(hole, frames)?;
    let bytes = Bytes::from(file_system.read(&hole.segment)?);
    let header = SegmentHeader::decode(&bytes, &hole.segment)?;
    let old_salt = salt_state(header.salt);
    let header = SegmentHeader {
        salt: file_system.entropy(),
        ..header
    };
    let salt = salt_state(header.salt);
    let mut image = header.encode().to_vec();
    let mut source = MemorySource {
        bytes: bytes.clone(),
    };
    let mut position = SEGMENT_HEADER_LENGTH as u64;
    let mut restored = false;
    // Raft index of the last entry kept so far (`None`: none yet, the
    // segment may begin right after the hole).
    let mut last_index: Option<u64> = None;
    let restore = |image: &mut Vec<u8>, generation: u32| {
        for frame in frames {
            push_slot(image, frame, salt, generation);
        }
    };
    while position < bytes.len() as u64 {
        let frame = match read_slot(&mut source, position, old_salt, u32::MAX)? {
            Slot::Frame(frame) => frame,
            Slot::Defect(defect) if defect.zeros => break,
            Slot::Defect(defect) => {
                return Err(Error::corruption(&hole.segment, position, defect.reason))
            }
        };
        position = frame.end();
        let frame_header = frame.header;
        let generation = frame.slot.generation;
        let in_gap = frame_header.kind == FrameKind::Gap
            && if hole.next_offset > hole.first_offset {
                frame_header.base_offset >= hole.first_offset
                    && frame_header.next_offset() <= hole.next_offset
            } else {
                // The mark of lost entries that held no offsets.
                frame_header.record_count == 0 && frame_header.base_offset == hole.first_offset
            };
        if in_gap {
            if !restored {
                restore(&mut image, generation);
                restored = true;
            }
            continue;
        }
        let before =
            frame_header.raft_index != 0 && Some(frame_header.raft_index) == hole.before_index;
        if before && !restored && last_index.is_none_or(|last| last == hole.after_index) {
            restore(&mut image, generation);
            restored = true;
        }
        if frame_header.raft_index != 0 {
            last_index = Some(frame_header.raft_index);
        }
        push_slot(&mut image, &frame.bytes, salt, generation);
    }
    let ends_at_hole = last_index.is_none_or(|last| last == hole.after_index);
    if !restored && hole.next_offset == hole.first_offset && ends_at_hole {
        // Entries without offsets lost at the segment's end.
        restore(&mut image, 0);
        restored = true;
    }
    if !restored {
        return Err(Error::InvalidInput(format!(
            "{}: no hole after Raft index {} to restore entries into (was it restored already?)",
            hole.segment.display(),
            hole.after_index
        )));
    }
    let bases = segment_bases(file_system.as_ref(), directory)?;
    let is_last = bases.last() == Some(&header.base_offset);
    if is_last {
        // A clean shutdown's mark names the active segment's length before
        // the restore: it goes first, so the next open walks the new image.
        if let Some(mut metadata) = load_metadata(file_system.as_ref(), directory)? {
            if metadata.clean.take().is_some() {
                file_system
                    .write_atomic(&directory.join(METADATA_FILE_NAME), &metadata.encode())?;
            }
        }
    }
    write_rebuilt_segment(
        file_system.as_ref(),
        directory,
        config,
        &header,
        image,
        is_last,
    )?;
    tracing::warn!(
        segment = %hole.segment.display(),
        entries = frames.len(),
        "lost Raft entries restored"
    );
    Ok(())
}

/// The frames must close the hole exactly: whole (their own CRCs), Raft
/// indexes `hole.missing()` in order, terms not decreasing, and offsets
/// covering the hole's gap without a gap or an overlap.
fn check_restored_frames(hole: &RaftHole, frames: &[Bytes]) -> Result<()> {
    let refused = |reason: String| {
        Err(Error::InvalidInput(format!(
            "entries offered for the hole after Raft index {} in {}: {reason}",
            hole.after_index,
            hole.segment.display()
        )))
    };
    let Some(missing) = hole.missing() else {
        return refused("the hole is at the end of the log: its size is unknown".into());
    };
    if frames.len() as u64 != missing.end - missing.start {
        return refused(format!(
            "{} frames for Raft indexes [{}, {})",
            frames.len(),
            missing.start,
            missing.end
        ));
    }
    let mut offset = hole.first_offset;
    let mut term = 0;
    for (frame, index) in frames.iter().zip(missing) {
        let header = match check_frame(frame) {
            FrameCheck::Valid(header) if header.frame_length as usize == frame.len() => header,
            FrameCheck::Valid(_) => return refused(format!("frame {index} has trailing bytes")),
            FrameCheck::Defect(defect) => return refused(format!("frame {index}: {defect}")),
            FrameCheck::Unsupported(reason) => return refused(format!("frame {index}: {reason}")),
        };
        if header.raft_index != index || header.kind == FrameKind::Gap {
            return refused(format!(
                "expected Raft entry {index}, got {:?} with Raft index {}",
                header.kind, header.raft_index
            ));
        }
        if header.raft_term < term {
            return refused(format!(
                "frame {index} goes back to term {}",
                header.raft_term
            ));
        }
        term = header.raft_term;
        if header.kind.takes_offsets() {
            if header.base_offset != offset {
                return refused(format!(
                    "frame {index} starts at offset {}, expected {offset}",
                    header.base_offset
                ));
            }
            offset = header.next_offset();
        }
    }
    if offset != hole.next_offset {
        return refused(format!(
            "the frames end at offset {offset}, the hole at {}",
            hole.next_offset
        ));
    }
    Ok(())
}

/// A sealed segment whose frames fail their checks while the log runs
/// (the background scrub of a replica found it), with the Raft entries
/// each damaged range held: what [`Log::restore_sealed_segment`] needs
/// from a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedSegment {
    pub path: PathBuf,
    pub base_offset: u64,
    /// The CRC it was sealed with: a restore refuses a segment that has
    /// been replaced since.
    pub segment_crc: u32,
    pub ranges: Vec<DamagedEntries>,
}

/// Bytes `[position, end)` of a sealed segment that hold no valid slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedEntries {
    pub position: u64,
    pub end: u64,
    /// Raft indexes of the entries they held: one entry is one frame, and
    /// the index recorded at sealing names the segment's first and last.
    pub raft_indexes: Range<u64>,
    /// The offsets they held.
    pub offsets: Range<u64>,
    pub reason: String,
}

impl DamagedEntries {
    /// The same loss as a hole, for the checks a restore shares.
    fn as_hole(&self, segment: &Path) -> RaftHole {
        RaftHole {
            segment: segment.to_path_buf(),
            after_index: self.raft_indexes.start - 1,
            before_index: Some(self.raft_indexes.end),
            first_offset: self.offsets.start,
            next_offset: self.offsets.end,
        }
    }
}

/// A sealed segment read whole and walked, every frame kept.
struct WalkedSealed {
    bytes: Bytes,
    header: SegmentHeader,
    walk: super::walker::Walk,
}

impl Log {
    /// Walks the sealed segment at `base_offset` and names its damaged
    /// ranges with the Raft entries they held. `Ok(None)`: the log no
    /// longer holds it, or every frame verifies. Damage no restore can
    /// mend while the log runs (its header, a range without Raft entries)
    /// is an error naming it; the next start repairs it.
    pub fn sealed_segment_damage(&self, base_offset: u64) -> Result<Option<DamagedSegment>> {
        let Some(segment) = self.sealed_segment_at(base_offset) else {
            return Ok(None);
        };
        let walked = self.walk_sealed(&segment)?;
        damage_of(&segment, &walked)
    }

    /// Rewrites a sealed segment with `frames[i]` (as stored on a peer) in
    /// place of `damaged.ranges[i]`, while the log runs. The segment must
    /// still be the one `damaged` describes, with the same damage; the
    /// frames must close each range exactly (as [`restore_raft_frames`]
    /// checks). The image is written under a new salt to `incoming/`,
    /// synced, renamed over the segment, then indexed: a crash leaves the
    /// damaged segment (the next start repairs it) or the restored one,
    /// and a reader in the segment goes on in the new one.
    pub fn restore_sealed_segment(
        &self,
        damaged: &DamagedSegment,
        frames: &[Vec<Bytes>],
    ) -> Result<()> {
        // Serialized with truncations and installs, which change the list.
        let _writer = self.writer();
        let shared = &self.shared;
        shared.gate_check()?;
        let segment = self
            .sealed_segment_at(damaged.base_offset)
            .filter(|segment| segment.segment_crc() == damaged.segment_crc)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{}: not the sealed segment found damaged (restored or removed since)",
                    damaged.path.display()
                ))
            })?;
        let walked = self.walk_sealed(&segment)?;
        if damage_of(&segment, &walked)?.as_ref() != Some(damaged) {
            return Err(Error::InvalidInput(format!(
                "{}: its damage changed since it was found",
                damaged.path.display()
            )));
        }
        if frames.len() != damaged.ranges.len() {
            return Err(Error::InvalidInput(format!(
                "{}: frames for {} damaged ranges offered, it has {}",
                damaged.path.display(),
                frames.len(),
                damaged.ranges.len()
            )));
        }
        for (range, frames) in damaged.ranges.iter().zip(frames) {
            check_restored_frames(&range.as_hole(&damaged.path), frames)?;
        }
        let header = SegmentHeader {
            salt: shared.file_system.entropy(),
            ..walked.header
        };
        let image = restored_image(&walked, &header, &damaged.ranges, frames);
        let rewalked = super::recovery::walk_whole(
            image.clone(),
            &header,
            shared.config.index_interval_bytes,
        )?;
        let progress = rewalked.builder.progress(rewalked.end);
        assert!(
            rewalked.damages.is_empty()
                && rewalked.end == image.len() as u64
                && progress.next_offset == segment.next_offset()
                && progress.last_log_id == segment.last_log_id(),
            "a restored image holds exactly the sealed segment's entries"
        );
        let temporary = self
            .incoming_path(damaged.base_offset)?
            .with_extension("restored");
        if shared.file_system.exists(&temporary) {
            shared.file_system.remove(&temporary)?;
        }
        let file = shared.file_system.create(&temporary)?;
        file.write_at(0, &image)?;
        shared.gate.sync_file(file.as_ref(), true, 0, 0)?;
        drop(file);
        shared.file_system.rename(&temporary, segment.path())?;
        shared
            .gate
            .sync_directory(shared.file_system.as_ref(), &shared.directory)?;
        let crc = crc32c::crc32c(&image);
        let restored = Arc::new(super::segment::StorageSegment::new(
            Arc::clone(&shared.file_system),
            &shared.directory,
            header,
            progress,
            true,
        ));
        let mut index = rewalked.builder.header(rewalked.end, header.salt);
        index.flags |= INDEX_FLAG_SEALED;
        index.segment_crc = crc;
        if let Err(error) = shared.file_system.write_atomic(
            restored.index_path(),
            &encode_index(&index, &rewalked.builder.entries),
        ) {
            // The old index names the old salt: the next open rebuilds it.
            tracing::warn!(%error, "cannot write a restored segment's index");
        }
        restored.mark_indexed(crc, rewalked.builder.entries.clone());
        restored.set_timestamp_max_through(segment.timestamp_max_through());
        shared.replace_segment(&segment, restored);
        // Reads of the old file in progress finish; later ones fail with
        // SegmentRemoved, and readers go on in the restored segment.
        segment.mark_removed();
        shared.notify_readers();
        tracing::warn!(
            segment = %damaged.path.display(),
            ranges = damaged.ranges.len(),
            entries = frames.iter().map(Vec::len).sum::<usize>(),
            "damaged Raft entries of a sealed segment restored while the log runs"
        );
        Ok(())
    }

    /// Reads a sealed segment whole and walks it, searching past damage
    /// across the whole file (all of it was durable).
    fn walk_sealed(&self, segment: &Arc<super::segment::StorageSegment>) -> Result<WalkedSealed> {
        let file = self.shared.file_system.open(segment.path(), false)?;
        let bytes = crate::io::read_exact(file.as_ref(), 0, segment.visible_length() as usize)?;
        let header = SegmentHeader::decode(&bytes, segment.path())?;
        if header.salt != segment.header().salt || header.base_offset != segment.base_offset() {
            return Err(Error::corruption(
                segment.path(),
                0,
                "the segment header differs from the one the log opened",
            ));
        }
        let length = bytes.len() as u64;
        let params = WalkParams {
            search_bytes: length,
            collect_frames: true,
            ..WalkParams::whole(salt_state(header.salt), length)
        };
        let start =
            WalkStart::segment_start(header.base_offset, self.shared.config.index_interval_bytes);
        let walk = walk(
            &mut MemorySource {
                bytes: bytes.clone(),
            },
            start,
            &params,
        )?;
        Ok(WalkedSealed {
            bytes,
            header,
            walk,
        })
    }
}

/// The damaged ranges of a walked sealed segment, with the Raft entries
/// and offsets each held (from the valid frames around it, or the
/// segment's first and last entries its index recorded at sealing).
fn damage_of(
    segment: &super::segment::StorageSegment,
    walked: &WalkedSealed,
) -> Result<Option<DamagedSegment>> {
    let frames = &walked.walk.frames;
    let length = walked.bytes.len() as u64;
    if let Some((position, reason)) = &walked.walk.unsupported {
        return Err(Error::corruption(segment.path(), *position, reason.clone()));
    }
    let first_index = segment.first_raft_index();
    if first_index == 0 && !walked.walk.damages.is_empty() {
        return Err(Error::corruption(
            segment.path(),
            walked.walk.damages[0].position,
            "damaged, and the segment holds no Raft entries to fetch from a peer",
        ));
    }
    let mut ranges = Vec::new();
    for damage in &walked.walk.damages {
        let end = damage.resume.unwrap_or(length);
        let after = frames
            .iter()
            .rev()
            .find(|frame| frame.position < damage.position && frame.header.raft_index != 0)
            .map_or(first_index - 1, |frame| frame.header.raft_index);
        let before = frames
            .iter()
            .find(|frame| frame.position >= end && frame.header.raft_index != 0)
            .map_or(segment.last_log_id().index + 1, |frame| {
                frame.header.raft_index
            });
        if before <= after + 1 {
            return Err(Error::corruption(
                segment.path(),
                damage.position,
                format!(
                    "{}; the damaged bytes held no Raft entry to fetch from a peer",
                    damage.reason
                ),
            ));
        }
        ranges.push(DamagedEntries {
            position: damage.position,
            end,
            raft_indexes: after + 1..before,
            offsets: damage.offset..damage.resume_offset.unwrap_or(segment.next_offset()),
            reason: damage.reason.clone(),
        });
    }
    if ranges.is_empty() {
        if crc32c::crc32c(&walked.bytes) != segment.segment_crc() {
            return Err(Error::corruption(
                segment.path(),
                0,
                "the segment's CRC differs from the one it was sealed with, though every frame verifies",
            ));
        }
        return Ok(None);
    }
    Ok(Some(DamagedSegment {
        path: segment.path().to_path_buf(),
        base_offset: segment.base_offset(),
        segment_crc: segment.segment_crc(),
        ranges,
    }))
}

/// The segment image under `header` (a new salt): every valid frame of
/// `walked` in its slot's generation, and each range's frames where the
/// range was, in the generation of the slot before it.
fn restored_image(
    walked: &WalkedSealed,
    header: &SegmentHeader,
    ranges: &[DamagedEntries],
    frames: &[Vec<Bytes>],
) -> Bytes {
    let salt = salt_state(header.salt);
    let mut image = header.encode().to_vec();
    let mut generation = 0u32;
    let mut ranges = ranges.iter().zip(frames).peekable();
    for frame in &walked.walk.frames {
        while let Some((_, restored)) = ranges.next_if(|(range, _)| range.position < frame.position)
        {
            for bytes in restored {
                push_slot(&mut image, bytes, salt, generation);
            }
        }
        let start = frame.position as usize + crate::format::frame::SLOT_HEADER_LENGTH;
        let end = start + frame.header.frame_length as usize;
        push_slot(
            &mut image,
            &walked.bytes[start..end],
            salt,
            frame.slot.generation,
        );
        generation = frame.slot.generation;
    }
    for (_, restored) in ranges {
        for bytes in restored {
            push_slot(&mut image, bytes, salt, generation);
        }
    }
    Bytes::from(image)
}
