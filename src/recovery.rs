//! RecoveryManager: brings a stream directory to a consistent state on open,
//! verifies and repairs it offline, truncates a suffix durably, and produces
//! the stream as it was at a point in time.
//!
//! What it guarantees (docs/FORMAT.md section 6): after open, the log is a
//! prefix of what was written that contains every append that was synced; a
//! torn tail is truncated and reported; damage that is not a torn tail makes
//! open fail with the file and byte position, unless repair was asked for, in
//! which case the damaged bytes are moved to `quarantine/` and reported.
//! Only the active segment past its checkpoint is validated on open; sealed
//! segments are trusted through their index and checked on read.

use crate::config::StreamConfig;
use crate::error::{Error, Result};
use crate::format::frame::{
    check_frame, FrameBuilder, FrameCheck, FrameDefect, FrameHeader, FRAME_MAGIC,
};
use crate::format::index::{
    decode_index, decode_index_header, encode_index, INDEX_FLAG_CLEAN, INDEX_FLAG_SEALED,
};
use crate::format::record::Record;
use crate::format::segment_header::{SegmentHeader, SEGMENT_HEADER_LENGTH};
use crate::format::{index_file_name, parse_segment_file_name, segment_file_name};
use crate::io::FileSystem;
use crate::segment::storage::{IndexBuilder, SegmentProgress, StorageSegment};
use crate::segment::writer::ActiveSegment;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Whether open may change damaged data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Refuse to open on damage that is not a torn tail.
    #[default]
    Strict,
    /// Move damaged ranges to `quarantine/` and open what remains.
    Repair,
}

/// A torn tail that recovery cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncatedTail {
    pub segment: PathBuf,
    pub position: u64,
    pub reason: String,
}

/// A damaged byte range moved aside by a repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedRange {
    pub segment: PathBuf,
    pub start: u64,
    pub end: u64,
    pub reason: String,
    pub saved_to: PathBuf,
}

/// What recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    /// Bytes of frames validated (the part of the log that could be torn).
    pub validated_bytes: u64,
    pub clean_shutdown: bool,
    pub truncated: Vec<TruncatedTail>,
    pub rebuilt_indexes: Vec<PathBuf>,
    pub quarantined: Vec<QuarantinedRange>,
    pub removed_files: Vec<PathBuf>,
}

/// A stream directory after recovery, ready for the writer.
pub(crate) struct Recovered {
    /// The directory's lock: whoever opened the stream keeps it.
    pub lock: crate::io::DirectoryLock,
    pub segments: Vec<Arc<StorageSegment>>,
    pub active: Option<ActiveSegment>,
    pub next_offset: u64,
    pub timestamp_max: i64,
    pub report: RecoveryReport,
}

/// How a scan over frames ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ScanEnd {
    /// Only zeros (or nothing) follow `end`.
    Clean { end: u64 },
    /// Invalid bytes at `end`, and nothing after them was ever synced.
    Torn { end: u64, reason: String },
    /// Invalid bytes at `position`, yet a later frame proves they had been
    /// synced: damage. `resume` is the next valid frame.
    Corrupt {
        position: u64,
        reason: String,
        resume: u64,
    },
    /// A checksummed frame this version does not understand.
    Unsupported { position: u64, reason: String },
}

/// Validates frames from `start` and feeds them to `builder`.
/// `clean` skips the search for later frames after the end (a clean
/// shutdown wrote nothing after it).
fn scan_frames(bytes: &[u8], start: u64, builder: &mut IndexBuilder, clean: bool) -> ScanEnd {
    let mut position = start;
    loop {
        if position >= bytes.len() as u64 {
            return ScanEnd::Clean { end: position };
        }
        let defect = match check_frame(&bytes[position as usize..]) {
            FrameCheck::Valid(header) if header.base_offset >= builder.next_offset => {
                builder.add(position, &header);
                position += u64::from(header.frame_length);
                continue;
            }
            FrameCheck::Valid(header) => format!(
                "frame with offset {} where offset {} or later was expected",
                header.base_offset, builder.next_offset
            ),
            FrameCheck::Unsupported(reason) => return ScanEnd::Unsupported { position, reason },
            FrameCheck::Defect(FrameDefect::Empty) if clean => {
                return ScanEnd::Clean { end: position }
            }
            FrameCheck::Defect(defect) => defect.to_string(),
        };
        let empty = matches!(
            check_frame(&bytes[position as usize..]),
            FrameCheck::Defect(FrameDefect::Empty)
        );
        return match find_proof_of_durability(bytes, position) {
            Some(resume) => ScanEnd::Corrupt {
                position,
                reason: defect,
                resume,
            },
            None if empty => ScanEnd::Clean { end: position },
            None => ScanEnd::Torn {
                end: position,
                reason: defect,
            },
        };
    }
}

/// Looks past a bad position for a valid frame whose `durable_position`
/// shows the bad bytes had been synced before it was written. Returns the
/// first valid frame after `bad_position` if such proof exists.
fn find_proof_of_durability(bytes: &[u8], bad_position: u64) -> Option<u64> {
    let search_from = bad_position as usize + 1;
    if search_from >= bytes.len() {
        return None;
    }
    let mut first_valid = None;
    for found in memchr::memmem::find_iter(&bytes[search_from..], FRAME_MAGIC) {
        let candidate = search_from + found;
        if let FrameCheck::Valid(header) = check_frame(&bytes[candidate..]) {
            first_valid.get_or_insert(candidate as u64);
            if header.durable_position > bad_position {
                return first_valid;
            }
        }
    }
    None
}

/// Position one past the last nonzero byte at or after `from`.
fn nonzero_end(bytes: &[u8], from: u64) -> u64 {
    let from = from as usize;
    if from >= bytes.len() {
        return from as u64;
    }
    match bytes[from..].iter().rposition(|byte| *byte != 0) {
        Some(last) => (from + last + 1) as u64,
        None => from as u64,
    }
}

/// The recovery entry points.
pub struct RecoveryManager;

impl RecoveryManager {
    /// Brings `directory` to a consistent state and returns what the writer
    /// needs. Creates the directory if it does not exist.
    pub(crate) fn open(
        file_system: &Arc<dyn FileSystem>,
        directory: &Path,
        config: &StreamConfig,
        mode: RecoveryMode,
    ) -> Result<Recovered> {
        file_system.create_directory(directory)?;
        let lock = file_system.lock_directory(directory)?;
        let mut report = RecoveryReport::default();
        let names = file_system.list(directory)?;
        for name in names.iter().filter(|name| name.ends_with(".tmp")) {
            let path = directory.join(name);
            file_system.remove(&path)?;
            report.removed_files.push(path);
        }
        let mut bases: Vec<u64> = names
            .iter()
            .filter_map(|name| parse_segment_file_name(name))
            .collect();
        bases.sort_unstable();
        for name in &names {
            if let Some(base) = name
                .strip_suffix(".idx")
                .and_then(|digits| parse_segment_file_name(&format!("{digits}.log")))
            {
                if bases.binary_search(&base).is_err() {
                    let path = directory.join(name);
                    file_system.remove(&path)?;
                    report.removed_files.push(path);
                }
            }
        }
        // A last segment that never got its header (crash while creating it)
        // holds nothing: remove it.
        while let Some(&last) = bases.last() {
            let path = directory.join(segment_file_name(last));
            if !segment_never_written(file_system.as_ref(), &path)? {
                break;
            }
            tracing::warn!(segment = %path.display(), "removing a segment whose creation did not complete");
            file_system.remove(&path)?;
            let index_path = directory.join(index_file_name(last));
            if file_system.exists(&index_path) {
                file_system.remove(&index_path)?;
            }
            file_system.sync_directory(directory)?;
            report.removed_files.push(path);
            bases.pop();
        }
        let mut segments: Vec<Arc<StorageSegment>> = Vec::with_capacity(bases.len());
        let mut active = None;
        let mut next_offset = 0u64;
        let mut timestamp_max = i64::MIN;
        let mut position = 0;
        while let Some(&base) = bases.get(position) {
            if base < next_offset {
                return Err(Error::corruption(
                    directory.join(segment_file_name(base)),
                    0,
                    format!("segment starts at offset {base} but the previous segment ends at offset {next_offset}"),
                ));
            }
            if let Some(&next_base) = bases.get(position + 1) {
                if let Some((end, lost_from)) =
                    interrupted_seal_lost_tail(file_system, directory, base, next_base, config)?
                {
                    // The log is a prefix: what was written after the lost
                    // bytes goes with them, and this segment becomes the
                    // active one again (its torn tail is cut below).
                    let path = directory.join(segment_file_name(base));
                    let later = bases.split_off(position + 1);
                    for &later_base in &later {
                        let later_path = directory.join(segment_file_name(later_base));
                        file_system.remove(&later_path)?;
                        let later_index = directory.join(index_file_name(later_base));
                        if file_system.exists(&later_index) {
                            file_system.remove(&later_index)?;
                        }
                        report.removed_files.push(later_path);
                    }
                    file_system.sync_directory(directory)?;
                    let reason = format!(
                        "a crash interrupted the sealing of this segment: its frames stop at offset \
                         {lost_from}, before the next segment's first offset {next_base}; removed \
                         {} later segment(s) written after the lost bytes",
                        later.len()
                    );
                    tracing::warn!(segment = %path.display(), position = end, %reason, "torn tail across segments truncated");
                    report.truncated.push(TruncatedTail {
                        segment: path,
                        position: end,
                        reason,
                    });
                }
            }
            let is_last = position + 1 == bases.len();
            position += 1;
            let (segment, active_segment) = recover_segment(
                file_system,
                directory,
                base,
                is_last,
                config,
                mode,
                &mut report,
            )?;
            segment.set_timestamp_max_through(timestamp_max);
            timestamp_max = timestamp_max.max(segment.timestamp_max_through());
            next_offset = segment.next_offset().max(base);
            segments.push(segment);
            active = active_segment;
        }
        if segments.is_empty() {
            next_offset = crate::stream::FIRST_OFFSET;
        }
        report.segments = segments.len();
        Ok(Recovered {
            lock,
            segments,
            active,
            next_offset,
            timestamp_max,
            report,
        })
    }

    /// Recovers a stream directory without opening it for writing (offline
    /// repair and checks): torn tails are truncated, indexes rebuilt and, in
    /// repair mode, damaged ranges quarantined. Encrypted frames need no
    /// keys for this.
    pub fn recover(
        file_system: &Arc<dyn FileSystem>,
        directory: &Path,
        mode: RecoveryMode,
    ) -> Result<RecoveryReport> {
        let config = StreamConfig::default();
        let recovered = RecoveryManager::open(file_system, directory, &config, mode)?;
        Ok(recovered.report)
    }

    /// Checks every frame of every segment and every index without changing
    /// anything. `progress` is called with bytes checked so far.
    pub fn verify(
        file_system: &Arc<dyn FileSystem>,
        directory: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let bases = segment_bases(file_system.as_ref(), directory)?;
        let mut expected_next = 0u64;
        for (position, &base) in bases.iter().enumerate() {
            let path = directory.join(segment_file_name(base));
            let file = file_system.open_readable(&path)?;
            let bytes = file.bytes(0, file.length())?;
            SegmentHeader::decode(&bytes, &path)?;
            if base < expected_next {
                report.problems.push(format!(
                    "{}: starts at offset {base}, before the previous segment's end {expected_next}",
                    path.display()
                ));
            }
            let mut builder = IndexBuilder::new(base, crate::config::INDEX_INTERVAL_DEFAULT);
            let is_last = position + 1 == bases.len();
            let end = match scan_frames(&bytes, SEGMENT_HEADER_LENGTH as u64, &mut builder, false) {
                ScanEnd::Clean { end } => end,
                ScanEnd::Torn { end, reason } if is_last => {
                    report.torn_tail = Some(format!("{} at byte {end}: {reason}", path.display()));
                    end
                }
                ScanEnd::Torn {
                    end: position,
                    reason,
                }
                | ScanEnd::Corrupt {
                    position, reason, ..
                } => {
                    report.problems.push(format!(
                        "{}: damage at byte {position}: {reason}",
                        path.display()
                    ));
                    position
                }
                ScanEnd::Unsupported { position, reason } => {
                    report.problems.push(format!(
                        "{}: unsupported frame at byte {position}: {reason}",
                        path.display()
                    ));
                    position
                }
            };
            let index_path = directory.join(index_file_name(base));
            if let Ok(index_bytes) = file_system.read(&index_path) {
                match decode_index(&index_bytes) {
                    Ok((header, _)) if header.is_sealed() => {
                        if header.data_length != end
                            || header.segment_crc != crc32c::crc32c(&bytes[..end as usize])
                        {
                            report.problems.push(format!(
                                "{}: sealed index does not match the segment (stale; it will be rebuilt on open)",
                                index_path.display()
                            ));
                        }
                    }
                    Ok(_) => {}
                    Err(reason) => report.problems.push(format!(
                        "{}: {reason} (it will be rebuilt on open)",
                        index_path.display()
                    )),
                }
            }
            report.segments += 1;
            report.records += builder.record_count;
            report.bytes += end;
            expected_next = builder.next_offset;
            progress(report.bytes);
        }
        // A stream without segments starts at FIRST_OFFSET, as on open.
        report.next_offset = if bases.is_empty() {
            crate::stream::FIRST_OFFSET
        } else {
            expected_next
        };
        Ok(report)
    }

    /// Cuts the stream so that its last record has an offset below
    /// `from_offset`, durably (the seam Raft uses to drop a conflicting log
    /// suffix). The stream must be closed. A frame that straddles the cut is
    /// re-encoded with the records before it, unless it is an atomic batch,
    /// which is dropped whole.
    pub fn truncate_suffix(
        file_system: &Arc<dyn FileSystem>,
        directory: &Path,
        from_offset: u64,
    ) -> Result<TruncateReport> {
        let _lock = file_system.lock_directory(directory)?;
        cut_stream(file_system, directory, &|record_offset, _| {
            record_offset < from_offset
        })
    }

    /// Produces, in `target`, the stream as it was at a point in time: every
    /// record up to the first one that is past the point. `source` is not
    /// changed; `target` must not exist or be empty.
    pub fn restore(
        file_system: &Arc<dyn FileSystem>,
        source: &Path,
        target: &Path,
        point: PointInTime,
    ) -> Result<TruncateReport> {
        if file_system.exists(target) && !file_system.list(target)?.is_empty() {
            return Err(Error::InvalidInput(format!(
                "restore target {} is not empty",
                target.display()
            )));
        }
        file_system.create_directory(target)?;
        // Nothing may write the source while it is copied, nor the target
        // while it is cut.
        let _source_lock = file_system.lock_directory(source)?;
        let _target_lock = file_system.lock_directory(target)?;
        for base in segment_bases(file_system.as_ref(), source)? {
            let name = segment_file_name(base);
            let bytes = file_system.read(&source.join(&name))?;
            file_system.write_atomic(&target.join(&name), &bytes)?;
        }
        let keep = move |offset: u64, timestamp_ns: i64| match point {
            PointInTime::Offset(last) => offset <= last,
            PointInTime::Time(time) => timestamp_ns <= time,
        };
        cut_stream(file_system, target, &keep)
    }
}

/// Where a point-in-time restore stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointInTime {
    /// Keep records with offsets up to and including this one.
    Offset(u64),
    /// Keep records with timestamps up to and including this (ns).
    Time(i64),
}

/// Result of a truncation or restore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TruncateReport {
    /// Offset one past the last record kept.
    pub next_offset: u64,
    pub records_kept: u64,
    pub records_removed: u64,
    pub segments_removed: usize,
}

/// Result of [`RecoveryManager::verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub segments: usize,
    pub records: u64,
    pub bytes: u64,
    pub next_offset: u64,
    /// A torn tail in the last segment (recovery truncates it on open).
    pub torn_tail: Option<String>,
    /// Damage or inconsistencies, each naming a file and position.
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn is_healthy(&self) -> bool {
        self.problems.is_empty()
    }
}

fn segment_bases(file_system: &dyn FileSystem, directory: &Path) -> Result<Vec<u64>> {
    let mut bases: Vec<u64> = file_system
        .list(directory)?
        .iter()
        .filter_map(|name| parse_segment_file_name(name))
        .collect();
    bases.sort_unstable();
    Ok(bases)
}

/// True for a segment file that is empty, or whose header is all zeros and
/// that holds no frame magic anywhere (the crash came between creating the
/// file and syncing its header).
fn segment_never_written(file_system: &dyn FileSystem, path: &Path) -> Result<bool> {
    let length = file_system.file_length(path)?;
    if length == 0 {
        return Ok(true);
    }
    let header = file_system.read_prefix(path, SEGMENT_HEADER_LENGTH)?;
    if header.iter().any(|byte| *byte != 0) {
        return Ok(false);
    }
    let file = file_system.open_readable(path)?;
    let bytes = file.bytes(0, file.length())?;
    Ok(memchr::memmem::find(&bytes, FRAME_MAGIC).is_none())
}

/// The header of a sealed segment's index when it can be trusted without
/// reading the segment: sealed, same base offset, same length as the file.
fn trusted_sealed_index(
    file_system: &dyn FileSystem,
    index_path: &Path,
    base: u64,
    file_length: u64,
) -> Option<crate::format::index::IndexHeader> {
    file_system
        .read_prefix(index_path, crate::format::index::INDEX_HEADER_LENGTH)
        .ok()
        .and_then(|bytes| decode_index_header(&bytes).ok())
        .map(|(header, _)| header)
        .filter(|index| {
            index.is_sealed() && index.base_offset == base && index.data_length == file_length
        })
}

/// Detects a segment that is not the last one, whose sealing a crash
/// interrupted, and whose frames stop short of the next segment's base
/// offset. Returns the position and offset at which its frames stop.
///
/// Rotation starts the next segment before the old one is synced, cut and
/// indexed (that runs off the write path), so after a power loss the old
/// segment's unsynced tail can be missing while pages of the next segment,
/// written later, did reach the disk. Those later frames follow a hole: the
/// log would have a gap of offsets and records after lost ones. Nothing
/// there can be an acknowledged `fsync` append: syncs complete in write
/// order, so a synced frame in the next segment means the old segment's
/// frames were synced before it. A segment whose seal finished is cut to
/// its last frame (or has a valid sealed index), so a gap after it (left by
/// a repair) is not mistaken for a lost tail.
fn interrupted_seal_lost_tail(
    file_system: &Arc<dyn FileSystem>,
    directory: &Path,
    base: u64,
    next_base: u64,
    config: &StreamConfig,
) -> Result<Option<(u64, u64)>> {
    let path = directory.join(segment_file_name(base));
    let index_path = directory.join(index_file_name(base));
    let file_length = file_system.file_length(&path)?;
    if trusted_sealed_index(file_system.as_ref(), &index_path, base, file_length).is_some() {
        return Ok(None);
    }
    let file = file_system.open_readable(&path)?;
    let bytes = file.bytes(0, file.length())?;
    if SegmentHeader::decode(&bytes, &path).is_err() {
        // recover_segment reports (or repairs) a damaged header.
        return Ok(None);
    }
    let mut builder = IndexBuilder::new(base, config.index_interval_bytes);
    let end = match scan_frames(&bytes, SEGMENT_HEADER_LENGTH as u64, &mut builder, false) {
        ScanEnd::Clean { end } | ScanEnd::Torn { end, .. } => end,
        // Damage and format errors are recover_segment's to report.
        ScanEnd::Corrupt { .. } | ScanEnd::Unsupported { .. } => return Ok(None),
    };
    let still_preallocated = end < file_length;
    Ok((still_preallocated && builder.next_offset < next_base)
        .then_some((end, builder.next_offset)))
}

/// Recovers one segment. Returns it, and the active state when it is the
/// last, unsealed segment.
fn recover_segment(
    file_system: &Arc<dyn FileSystem>,
    directory: &Path,
    base: u64,
    is_last: bool,
    config: &StreamConfig,
    mode: RecoveryMode,
    report: &mut RecoveryReport,
) -> Result<(Arc<StorageSegment>, Option<ActiveSegment>)> {
    let path = directory.join(segment_file_name(base));
    let index_path = directory.join(index_file_name(base));
    let file_length = file_system.file_length(&path)?;
    let header_bytes = file_system.read_prefix(&path, SEGMENT_HEADER_LENGTH)?;
    let header = match SegmentHeader::decode(&header_bytes, &path) {
        Ok(header) => header,
        Err(error @ Error::Corruption { .. }) if mode == RecoveryMode::Repair => {
            quarantine_whole(file_system, directory, &path, &error.to_string(), report)?;
            return Err(Error::InvalidInput(format!(
                "segment {} had a damaged header and was moved to quarantine; open the stream again",
                path.display()
            )));
        }
        Err(error) => return Err(error),
    };
    if header.base_offset != base {
        return Err(Error::corruption(
            &path,
            16,
            format!(
                "header says base offset {} but the file name says {base}",
                header.base_offset
            ),
        ));
    }
    // Trust a sealed segment's index without reading the segment.
    if let Some(index) = trusted_sealed_index(file_system.as_ref(), &index_path, base, file_length)
    {
        let segment = StorageSegment::new(
            Arc::clone(file_system),
            directory,
            base,
            progress_of(&index),
            true,
        );
        segment.mark_indexed(index.segment_crc);
        return Ok((Arc::new(segment), None));
    }
    // Read and validate what could be torn.
    let checkpoint = if is_last {
        file_system
            .read(&index_path)
            .ok()
            .and_then(|bytes| decode_index(&bytes).ok())
            .filter(|(index, _)| {
                index.base_offset == base
                    && !index.is_sealed()
                    && index.data_length >= SEGMENT_HEADER_LENGTH as u64
                    && index.data_length <= file_length
            })
    } else {
        None
    };
    let file = file_system.open_readable(&path)?;
    let bytes = file.bytes(0, file.length())?;
    let (mut builder, start, clean) = match checkpoint {
        Some((index, entries)) => {
            let clean = index.flags & INDEX_FLAG_CLEAN != 0;
            (
                IndexBuilder::resume(&index, entries, config.index_interval_bytes),
                index.data_length,
                clean,
            )
        }
        None => {
            report.rebuilt_indexes.push(index_path.clone());
            (
                IndexBuilder::new(base, config.index_interval_bytes),
                SEGMENT_HEADER_LENGTH as u64,
                false,
            )
        }
    };
    report.clean_shutdown = clean;
    let scanned = scan_frames(&bytes, start, &mut builder, clean);
    let end = match scanned {
        ScanEnd::Clean { end } => end,
        ScanEnd::Torn { end, reason } if is_last => {
            tracing::warn!(segment = %path.display(), position = end, %reason, "torn tail truncated");
            report.truncated.push(TruncatedTail {
                segment: path.clone(),
                position: end,
                reason,
            });
            end
        }
        ScanEnd::Unsupported { position, reason } => {
            return Err(Error::corruption(
                &path,
                position,
                format!("frame not understood by this version: {reason}"),
            ))
        }
        ScanEnd::Torn {
            end: position,
            reason,
        }
        | ScanEnd::Corrupt {
            position, reason, ..
        } => {
            if mode == RecoveryMode::Repair {
                drop(bytes);
                drop(file);
                repair_segment(file_system, directory, &path, base, report)?;
                return recover_segment(
                    file_system,
                    directory,
                    base,
                    is_last,
                    config,
                    RecoveryMode::Strict,
                    report,
                );
            }
            return Err(Error::corruption(
                &path,
                position,
                format!(
                    "{reason}, followed by frames that were synced after it: this is damage, not a torn write; \
                     the stream will not open. Run `natswal repair` to move the damaged range to quarantine"
                ),
            ));
        }
    };
    report.validated_bytes += end - start;
    let garbage_end = if clean { end } else { nonzero_end(&bytes, end) };
    drop(bytes);
    drop(file);
    let progress = builder.progress(end);
    if !is_last {
        // A sealed segment whose index was missing or stale: cut it (a crash
        // can come between its sync and its cut) and write its index.
        let writable = file_system.open_writable(&path, end)?;
        writable.set_length(end)?;
        writable.sync_all()?;
        let image = file_system.open_readable(&path)?.bytes(0, end)?;
        let mut index = builder.header(end);
        index.flags |= INDEX_FLAG_SEALED;
        index.segment_crc = crc32c::crc32c(&image);
        file_system.write_atomic(&index_path, &encode_index(&index, &builder.entries))?;
        let segment = StorageSegment::new(Arc::clone(file_system), directory, base, progress, true);
        segment.mark_indexed(index.segment_crc);
        return Ok((Arc::new(segment), None));
    }
    let capacity = config.segment_bytes_max.max(file_length);
    let writable = file_system.open_writable(&path, capacity)?;
    if garbage_end > end {
        // Zero the torn bytes so no stale frame can ever be mistaken for a
        // new one, and make that durable before accepting appends.
        writable.zero_range(end, garbage_end)?;
        writable.sync_range(end, garbage_end)?;
    }
    let segment = Arc::new(StorageSegment::new(
        Arc::clone(file_system),
        directory,
        base,
        progress,
        false,
    ));
    segment.attach_active(writable.view(), builder.entries.clone());
    let active = ActiveSegment {
        segment: Arc::clone(&segment),
        file: writable,
        write_position: end,
        builder,
        last_checkpoint_length: start,
        first_write_ns: (progress.record_count > 0).then_some(header.created_at_ns),
        crc: None,
        key_id: header.key_id,
        cipher: header.cipher,
    };
    Ok((segment, Some(active)))
}

fn progress_of(index: &crate::format::index::IndexHeader) -> SegmentProgress {
    SegmentProgress {
        length: index.data_length,
        next_offset: index.next_offset,
        record_count: index.record_count,
        first_timestamp_ns: index.first_timestamp_ns,
        last_timestamp_ns: if index.record_count == 0 {
            i64::MIN
        } else {
            index.last_timestamp_ns
        },
    }
}

fn quarantine_directory(file_system: &dyn FileSystem, directory: &Path) -> Result<PathBuf> {
    let quarantine = directory.join("quarantine");
    file_system.create_directory(&quarantine)?;
    Ok(quarantine)
}

fn save_quarantined(
    file_system: &dyn FileSystem,
    directory: &Path,
    segment: &Path,
    start: u64,
    end: u64,
    bytes: &[u8],
    reason: &str,
) -> Result<QuarantinedRange> {
    let quarantine = quarantine_directory(file_system, directory)?;
    let name = segment
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("segment");
    let saved_to = quarantine.join(format!("{name}.at-{start}-{end}.bin"));
    file_system.write_atomic(&saved_to, bytes)?;
    let note = format!(
        "segment: {}\nrange: [{start}, {end})\nreason: {reason}\nsaved: {}\n",
        segment.display(),
        saved_to.display()
    );
    file_system.write_atomic(
        &quarantine.join(format!("{name}.at-{start}-{end}.txt")),
        note.as_bytes(),
    )?;
    tracing::warn!(segment = %segment.display(), start, end, %reason, "damaged range moved to quarantine");
    Ok(QuarantinedRange {
        segment: segment.to_path_buf(),
        start,
        end,
        reason: reason.to_string(),
        saved_to,
    })
}

fn quarantine_whole(
    file_system: &Arc<dyn FileSystem>,
    directory: &Path,
    path: &Path,
    reason: &str,
    report: &mut RecoveryReport,
) -> Result<()> {
    let bytes = file_system.read(path)?;
    let range = save_quarantined(
        file_system.as_ref(),
        directory,
        path,
        0,
        bytes.len() as u64,
        &bytes,
        reason,
    )?;
    file_system.remove(path)?;
    let index_path = path.with_extension("idx");
    if file_system.exists(&index_path) {
        file_system.remove(&index_path)?;
    }
    file_system.sync_directory(directory)?;
    report.quarantined.push(range);
    Ok(())
}

/// Rewrites a segment without its damaged ranges, saving each to quarantine.
fn repair_segment(
    file_system: &Arc<dyn FileSystem>,
    directory: &Path,
    path: &Path,
    base: u64,
    report: &mut RecoveryReport,
) -> Result<()> {
    let bytes = file_system.read(path)?;
    let mut image = bytes[..SEGMENT_HEADER_LENGTH].to_vec();
    let mut builder = IndexBuilder::new(base, crate::config::INDEX_INTERVAL_DEFAULT);
    let mut position = SEGMENT_HEADER_LENGTH as u64;
    loop {
        let before = position;
        let scanned = scan_frames(&bytes, position, &mut builder, false);
        let (good_end, damage) = match scanned {
            ScanEnd::Clean { end } | ScanEnd::Torn { end, .. } => (end, None),
            ScanEnd::Corrupt {
                position,
                reason,
                resume,
            } => (position, Some((position, resume, reason))),
            ScanEnd::Unsupported { position, reason } => {
                return Err(Error::corruption(
                    path,
                    position,
                    format!("frame not understood by this version: {reason}"),
                ))
            }
        };
        image.extend_from_slice(&bytes[before as usize..good_end as usize]);
        let Some((start, resume, reason)) = damage else {
            break;
        };
        let range = save_quarantined(
            file_system.as_ref(),
            directory,
            path,
            start,
            resume,
            &bytes[start as usize..resume as usize],
            &reason,
        )?;
        report.quarantined.push(range);
        position = resume;
    }
    file_system.write_atomic(path, &image)?;
    let index_path = directory.join(index_file_name(base));
    if file_system.exists(&index_path) {
        file_system.remove(&index_path)?;
        file_system.sync_directory(directory)?;
    }
    Ok(())
}

/// Keeps the longest prefix of records for which `keep(offset, timestamp)`
/// holds, in place and durably.
fn cut_stream(
    file_system: &Arc<dyn FileSystem>,
    directory: &Path,
    keep: &dyn Fn(u64, i64) -> bool,
) -> Result<TruncateReport> {
    let bases = segment_bases(file_system.as_ref(), directory)?;
    let segments_none = bases.is_empty();
    let mut report = TruncateReport::default();
    let mut cut_done = false;
    for base in bases {
        let path = directory.join(segment_file_name(base));
        let index_path = directory.join(index_file_name(base));
        if cut_done {
            let bytes = file_system.read(&path)?;
            report.records_removed += count_records(&bytes, &path)?;
            file_system.remove(&path)?;
            if file_system.exists(&index_path) {
                file_system.remove(&index_path)?;
            }
            report.segments_removed += 1;
            continue;
        }
        let bytes = file_system.read(&path)?;
        SegmentHeader::decode(&bytes, &path)?;
        let mut position = SEGMENT_HEADER_LENGTH;
        let mut replacement: Option<Vec<u8>> = None;
        while position < bytes.len() {
            let header = match check_frame(&bytes[position..]) {
                FrameCheck::Valid(header) => header,
                FrameCheck::Defect(FrameDefect::Empty) => break,
                FrameCheck::Defect(defect) => {
                    return Err(Error::corruption(
                        &path,
                        position as u64,
                        defect.to_string(),
                    ))
                }
                FrameCheck::Unsupported(reason) => {
                    return Err(Error::corruption(&path, position as u64, reason))
                }
            };
            let frame = bytes::Bytes::copy_from_slice(
                &bytes[position..position + header.frame_length as usize],
            );
            let decoded = crate::reader::decode_frame(&header, &frame);
            let records = match decoded {
                Ok(records) => records,
                // Offline, without keys, an encrypted frame is kept or cut
                // whole, judged by its header (last offset, newest time).
                Err(_) if header.flags & crate::format::frame::flags::ENCRYPTED != 0 => {
                    if keep(header.next_offset() - 1, header.last_timestamp_ns) {
                        report.records_kept += u64::from(header.record_count);
                        report.next_offset = header.next_offset();
                        position += header.frame_length as usize;
                        continue;
                    }
                    Vec::new()
                }
                Err(reason) => return Err(Error::corruption(&path, position as u64, reason)),
            };
            let records_in_frame = if records.is_empty() {
                header.record_count as usize
            } else {
                records.len()
            };
            let kept = records
                .iter()
                .take_while(|record| keep(record.offset, record.timestamp_ns))
                .count();
            if kept == records_in_frame {
                report.records_kept += kept as u64;
                report.next_offset = header.next_offset();
                position += header.frame_length as usize;
                continue;
            }
            cut_done = true;
            // The stream goes on at this frame's first offset unless part of
            // it is kept (set below): without this, a cut before the first
            // record of the stream reported next offset 0.
            report.next_offset = header.base_offset;
            report.records_removed += (records_in_frame - kept) as u64;
            if kept > 0 && !header.is_atomic() {
                let mut image = bytes[..position].to_vec();
                image.extend_from_slice(&reencode_prefix(&header, &records[..kept]));
                report.records_kept += kept as u64;
                report.next_offset = header.base_offset + kept as u64;
                replacement = Some(image);
            } else {
                report.records_removed += if kept > 0 { kept as u64 } else { 0 };
                replacement = Some(bytes[..position].to_vec());
            }
            report.records_removed +=
                count_records(&bytes[position + header.frame_length as usize..], &path)
                    .unwrap_or(0);
            break;
        }
        if let Some(image) = replacement {
            file_system.write_atomic(&path, &image)?;
            if file_system.exists(&index_path) {
                file_system.remove(&index_path)?;
            }
        } else if report.next_offset == 0 && position == SEGMENT_HEADER_LENGTH {
            report.next_offset = base;
        }
    }
    if segments_none {
        // As recovery opens a stream without segments.
        report.next_offset = crate::stream::FIRST_OFFSET;
    }
    file_system.sync_directory(directory)?;
    Ok(report)
}

fn reencode_prefix(
    header: &FrameHeader,
    records: &[crate::format::record::StoredRecord],
) -> Vec<u8> {
    let mut builder = FrameBuilder::new();
    builder.begin(header.base_offset, header.raft_term, header.raft_index);
    for record in records {
        let owned = Record {
            timestamp_ns: record.timestamp_ns,
            subject: record.subject.clone(),
            headers: record.headers.clone(),
            payload: record.payload.clone(),
        };
        builder.push(&owned, record.timestamp_ns);
    }
    builder
        .finish(header.flags & crate::format::frame::flags::ATOMIC, 0)
        .0
        .to_vec()
}

/// Records in the whole frames of a byte range that starts at a frame (or a
/// segment header).
fn count_records(bytes: &[u8], path: &Path) -> Result<u64> {
    let mut position = if bytes.starts_with(crate::format::segment_header::SEGMENT_MAGIC) {
        SEGMENT_HEADER_LENGTH
    } else {
        0
    };
    let mut records = 0u64;
    while position < bytes.len() {
        match check_frame(&bytes[position..]) {
            FrameCheck::Valid(header) => {
                records += u64::from(header.record_count);
                position += header.frame_length as usize;
            }
            FrameCheck::Defect(FrameDefect::Empty) => break,
            FrameCheck::Defect(defect) => {
                return Err(Error::corruption(path, position as u64, defect.to_string()))
            }
            FrameCheck::Unsupported(reason) => {
                return Err(Error::corruption(path, position as u64, reason))
            }
        }
    }
    Ok(records)
}
