//! RecoveryManager: brings a stream directory to a consistent state on
//! open, verifies and repairs it offline, truncates a suffix durably, and
//! produces the stream as it was at a point in time.
//!
//! One analysis of a segment serves open, verify and repair, so they never
//! disagree (docs/FORMAT.md section 7):
//! - a sealed segment with a matching index (same salt, same length) is
//!   trusted without being read on open; verify reads it whole;
//! - a segment that is not the last must hold every offset up to the next
//!   segment's first: its frames were all durable before the next segment
//!   was created. If it is not cut and indexed yet (a crash interrupted its
//!   seal), open finishes the seal; anything missing is damage;
//! - the last segment is walked from its checkpoint (or its start). Damage
//!   below what is proven durable is corruption; the unprovable end is a
//!   torn tail, reported and left behind (later writes start a new
//!   generation, so its bytes are never read again).
//!
//! Corruption makes a strict open fail with the file and byte position.
//! An explicit repair moves exactly the damaged bytes to `quarantine/`
//! (with a report), records the offsets they held as a gap frame, writes
//! the segment back atomically under a new salt (so no index of the old
//! image can describe it) and then its fresh index, and leaves a stream
//! that verifies and opens. A torn tail it cuts is reported and kept in
//! quarantine. Recovery never deletes data on its own.
//!
//! Every multi-step change is crash-atomic: a truncation goes through
//! `truncate.intent` (redone by the next open), a rewritten file through
//! write-to-temporary, sync, rename, directory sync; a repair interrupted
//! anywhere is finished by running it again.

use super::index::{progress_of, IndexBuilder};
use super::segment::StorageSegment;
use super::walker::{
    walk, ByteSource, Damage, FileSource, MemorySource, RaftJump, TornTail, Walk, WalkParams,
    WalkStart,
};
use super::writer::{ActiveSegment, RECYCLE_DIRECTORY};
use crate::config::StreamConfig;
use crate::error::{Error, Result};
use crate::format::frame::{
    check_frame, encode_empty_frame, encode_plain_frame, salt_state, FrameCheck, FrameKind,
    SlotHeader, FRAME_HEADER_LENGTH, SLOT_HEADER_LENGTH,
};
use crate::format::index::{
    decode_index, decode_index_header, encode_index, IndexEntry, IndexHeader, INDEX_FLAG_SEALED,
};
use crate::format::intent::{TruncationIntent, INTENT_FILE_NAME};
use crate::format::metadata::{LogId, StreamMetadata, METADATA_FILE_NAME};
use crate::format::record::Record;
use crate::format::segment_header::{SegmentHeader, SEGMENT_HEADER_LENGTH};
use crate::format::{index_file_name, parse_segment_file_name, segment_file_name};
use crate::io::{File, FileSystem};
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where received segment files wait until they are installed.
pub const INCOMING_DIRECTORY: &str = "incoming";
/// Where repairs put damaged bytes.
pub const QUARANTINE_DIRECTORY: &str = "quarantine";

/// Whether open may change damaged data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Refuse to open on damage that is not a torn tail.
    #[default]
    Strict,
    /// Move damaged ranges to `quarantine/` and open what remains.
    Repair,
}

/// A torn tail that recovery left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncatedTail {
    pub segment: PathBuf,
    pub position: u64,
    pub reason: String,
    /// Valid but unprovable frames after the torn slot, dropped with it.
    pub frames_dropped: usize,
}

impl TruncatedTail {
    fn of(segment: &Path, torn: &crate::log::walker::TornTail) -> TruncatedTail {
        TruncatedTail {
            segment: segment.to_path_buf(),
            position: torn.position,
            reason: torn.reason.clone(),
            frames_dropped: torn.frames_dropped,
        }
    }
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

/// Offsets whose records a repair could not keep (recorded as a gap frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostOffsets {
    pub segment: PathBuf,
    pub first_offset: u64,
    pub next_offset: u64,
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
    pub lost: Vec<LostOffsets>,
    /// Damaged Raft entries without offsets (blank, membership) cut out
    /// and marked by a gap of no offsets.
    pub lost_raft_entry_marks: usize,
    pub removed_files: Vec<PathBuf>,
    /// Segments whose seal a crash interrupted, finished on open.
    pub completed_seals: Vec<PathBuf>,
    /// A truncation a crash interrupted, finished on open.
    pub completed_truncation: Option<u64>,
    /// The metadata file was rebuilt from the log (repair).
    pub rebuilt_metadata: bool,
}

/// Name of the directory of a store's streams (`<root>/streams`).
pub const STREAMS_DIRECTORY: &str = "streams";

/// Locks a stream directory opened on its own (not by a store): its own
/// lock, and, when it lies in a store's `streams` directory, that
/// directory's lock shared. A server holds its store's lock exclusively
/// and opens its streams without locks of their own (a descriptor per
/// stream would not scale to thousands), so an offline tool must take both
/// to keep out of a running server's way.
pub(crate) fn lock_stream_directory(
    file_system: &dyn FileSystem,
    directory: &Path,
) -> Result<crate::io::DirectoryLock> {
    let store = directory
        .parent()
        .filter(|parent| {
            parent
                .file_name()
                .is_some_and(|name| name == STREAMS_DIRECTORY)
        })
        .filter(|parent| file_system.exists(&parent.join("LOCK")));
    let store_lock = match store {
        Some(parent) => file_system.lock_directory_shared(parent)?,
        None => crate::io::DirectoryLock::default(),
    };
    Ok(file_system.lock_directory(directory)?.and(store_lock))
}

/// A stream directory after recovery, ready for the writer.
pub(crate) struct Recovered {
    /// The directory's lock: whoever opened the stream keeps it.
    pub lock: crate::io::DirectoryLock,
    pub segments: Vec<Arc<StorageSegment>>,
    pub active: Option<ActiveSegment>,
    pub next_offset: u64,
    pub last_log_id: LogId,
    pub timestamp_max: i64,
    pub metadata: StreamMetadata,
    pub report: RecoveryReport,
}

/// What one segment must satisfy.
#[derive(Debug, Clone, Copy)]
struct Expectation {
    /// Bytes known durable: damage below is corruption.
    durable_floor: u64,
    /// The data reaches at least this far.
    end_floor: u64,
    /// The offset its data must reach (the next segment's first, a sealed
    /// index's, a clean shutdown's; a checkpoint's at least).
    end_offset: Option<u64>,
    /// The data ends exactly at `end_offset` (false for a checkpoint: more
    /// may have been written after it).
    end_exact: bool,
    /// Stop reading here (a clean shutdown's end).
    data_end: Option<u64>,
    search: bool,
}

/// A problem recovery cannot pass over: durable data is damaged or missing.
#[derive(Debug, Clone)]
struct Problem {
    position: u64,
    reason: String,
    damage: Option<Damage>,
}

/// One segment, analyzed.
struct Analysis {
    base: u64,
    path: PathBuf,
    header: SegmentHeader,
    file_length: u64,
    /// Trusted through its sealed index, not read.
    trusted: Option<(IndexHeader, Vec<IndexEntry>)>,
    walk: Option<Walk>,
    problems: Vec<Problem>,
    torn: Option<TornTail>,
    expectation: Expectation,
    /// A checkpoint was used (the walk started at its end).
    checkpoint: Option<IndexHeader>,
    start: u64,
    /// The next segment's file, if this one is not the last.
    next_path: Option<PathBuf>,
}

fn search_bytes(config: &StreamConfig) -> u64 {
    (config.record_bytes_max.max(config.frame_bytes_max)
        + (FRAME_HEADER_LENGTH + SLOT_HEADER_LENGTH + crate::codec::TAG_LENGTH) as u64)
        .max(1 << 20)
}

fn io_not_found(error: &Error) -> bool {
    matches!(error, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// Segment base offsets in a directory, sorted.
pub(crate) fn segment_bases(file_system: &dyn FileSystem, directory: &Path) -> Result<Vec<u64>> {
    let mut bases: Vec<u64> = file_system
        .list(directory)?
        .iter()
        .filter_map(|name| parse_segment_file_name(name))
        .collect();
    bases.sort_unstable();
    Ok(bases)
}

/// The stream's metadata: `None` when the file does not exist; damage is
/// an error (a default would reuse nonces or forget a vote).
pub(crate) fn load_metadata(
    file_system: &dyn FileSystem,
    directory: &Path,
) -> Result<Option<StreamMetadata>> {
    let path = directory.join(METADATA_FILE_NAME);
    let bytes = match file_system.read(&path) {
        Ok(bytes) => bytes,
        Err(error) if io_not_found(&error) => return Ok(None),
        Err(error) => return Err(error),
    };
    StreamMetadata::decode(&bytes).map(Some).map_err(|reason| {
        Error::corruption(
            &path,
            0,
            format!("{reason}; the stream will not open (its nonce epoch and generation are unknown). `natswal repair` rebuilds it from the log"),
        )
    })
}

/// Index file of a segment, if it decodes and belongs to this file.
fn read_index(
    file_system: &dyn FileSystem,
    index_path: &Path,
    header: &SegmentHeader,
) -> Option<(IndexHeader, Vec<IndexEntry>)> {
    let bytes = file_system.read(index_path).ok()?;
    decode_index(&bytes)
        .ok()
        .filter(|(index, _)| index.base_offset == header.base_offset && index.salt == header.salt)
}

/// An index whose entries agree with the walked frames (what verify and
/// open call a valid index): same data, and every entry points at a frame
/// with its offset, Raft index and the timestamps before it.
fn index_matches(
    index: &IndexHeader,
    entries: &[IndexEntry],
    expected: &IndexHeader,
    frames: &[(u64, i64, u64, u64)],
) -> bool {
    let same = index.next_offset == expected.next_offset
        && index.data_length == expected.data_length
        && index.record_count == expected.record_count
        && index.first_raft_index == expected.first_raft_index
        && index.last_raft_index == expected.last_raft_index
        && index.last_raft_term == expected.last_raft_term
        && (!index.is_sealed() || index.segment_crc == expected.segment_crc);
    same && entries.iter().all(|entry| {
        frames
            .binary_search_by_key(&u64::from(entry.position), |frame| frame.0)
            .ok()
            .is_some_and(|found| {
                let (_, timestamp_max_before, relative_offset, relative_raft) = frames[found];
                timestamp_max_before == entry.timestamp_max_before
                    && relative_offset == u64::from(entry.relative_offset)
                    && relative_raft == u64::from(entry.relative_raft_index)
            })
    })
}

/// What one recovery run knows.
struct Context<'a> {
    file_system: &'a Arc<dyn FileSystem>,
    directory: &'a Path,
    config: &'a StreamConfig,
    generation_max: u32,
    /// The metadata's purge point (Raft index; 0 none).
    raft_purged: u64,
}

impl Context<'_> {
    /// Raft index of a segment's first frame (0: none, standalone, or not
    /// readable).
    fn first_raft_index(&self, base: u64) -> u64 {
        let path = self.directory.join(segment_file_name(base));
        let Ok(file) = self.file_system.open(&path, false) else {
            return 0;
        };
        let Ok(head) = crate::io::read_up_to(
            file.as_ref(),
            0,
            SEGMENT_HEADER_LENGTH + SLOT_HEADER_LENGTH + FRAME_HEADER_LENGTH,
        ) else {
            return 0;
        };
        let Ok(header) = SegmentHeader::decode(&head, &path) else {
            return 0;
        };
        if SlotHeader::decode(&head[SEGMENT_HEADER_LENGTH..], salt_state(header.salt)).is_none() {
            return 0;
        }
        match crate::format::frame::check_header(
            &head[SEGMENT_HEADER_LENGTH + SLOT_HEADER_LENGTH..],
        ) {
            FrameCheck::Valid(frame) => frame.raft_index,
            _ => 0,
        }
    }

    fn analyze(
        &self,
        base: u64,
        next_base: Option<u64>,
        clean: Option<crate::format::metadata::CleanMark>,
        trust_index: bool,
        collect: bool,
    ) -> Result<Analysis> {
        let path = self.directory.join(segment_file_name(base));
        let file = self.file_system.open(&path, false)?;
        let file_length = file.length()?;
        let head = crate::io::read_up_to(file.as_ref(), 0, SEGMENT_HEADER_LENGTH)?;
        let header = SegmentHeader::decode(&head, &path)?;
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
        let index_path = self.directory.join(index_file_name(base));
        let index = read_index(self.file_system.as_ref(), &index_path, &header);
        let is_last = next_base.is_none();
        let sealed_index = index.clone().filter(|(index, _)| index.is_sealed());
        let mut analysis = Analysis {
            base,
            path: path.clone(),
            header,
            file_length,
            trusted: None,
            walk: None,
            problems: Vec::new(),
            torn: None,
            // Not the last: every frame was durable before the next segment
            // was created, and the frames must reach its first offset.
            expectation: Expectation {
                durable_floor: u64::MAX,
                end_floor: 0,
                end_offset: next_base,
                end_exact: true,
                data_end: None,
                search: true,
            },
            checkpoint: None,
            start: SEGMENT_HEADER_LENGTH as u64,
            next_path: next_base.map(|next| self.directory.join(segment_file_name(next))),
        };
        let mut start = WalkStart::segment_start(base, self.config.index_interval_bytes);
        if let Some((sealed, entries)) = sealed_index {
            if trust_index
                && sealed.data_length == file_length
                && next_base.is_none_or(|next| next == sealed.next_offset)
            {
                analysis.trusted = Some((sealed, entries));
                return Ok(analysis);
            }
            // A sealed file held exactly its index's data, all durable.
            analysis.expectation.durable_floor = sealed.data_length;
            analysis.expectation.end_floor = sealed.data_length;
            analysis.expectation.end_offset = next_base.or(Some(sealed.next_offset));
        } else if is_last {
            // A checkpoint and a clean shutdown vouch for durable data: a
            // file shorter than that was cut by something else, which is
            // damage, not a torn write.
            let checkpoint =
                index.filter(|(index, _)| index.data_length >= SEGMENT_HEADER_LENGTH as u64);
            let clean = clean.filter(|mark| {
                mark.segment_base == base && mark.data_length >= SEGMENT_HEADER_LENGTH as u64
            });
            let mut floor = SEGMENT_HEADER_LENGTH as u64;
            if let Some((checkpoint, entries)) = checkpoint {
                floor = checkpoint.data_length;
                analysis.expectation.end_offset = Some(checkpoint.next_offset);
                analysis.expectation.end_exact = false;
                // A full walk (verify, repair) reads what the checkpoint
                // vouches for too; open trusts it.
                if !collect && checkpoint.data_length <= file_length {
                    start = WalkStart {
                        position: checkpoint.data_length,
                        builder: IndexBuilder::resume(
                            &checkpoint,
                            entries,
                            self.config.index_interval_bytes,
                        ),
                        generation: 0,
                    };
                }
                analysis.checkpoint = Some(checkpoint);
            }
            if let Some(clean) = clean {
                floor = floor.max(clean.data_length);
                analysis.expectation.end_offset = Some(clean.next_offset);
                analysis.expectation.end_exact = true;
                analysis.expectation.data_end = Some(clean.data_length);
                analysis.expectation.search = false;
                if start.position > clean.data_length {
                    start = WalkStart::segment_start(base, self.config.index_interval_bytes);
                }
            }
            analysis.expectation.durable_floor = floor;
            analysis.expectation.end_floor = floor;
        }
        analysis.start = start.position;
        let data_end = analysis
            .expectation
            .data_end
            .unwrap_or(file_length)
            .min(file_length);
        let params = WalkParams {
            salt_state: salt_state(header.salt),
            generation_max: self.generation_max,
            durable_floor: analysis.expectation.durable_floor,
            end_floor: analysis.expectation.end_floor,
            search_bytes: if analysis.expectation.search {
                search_bytes(self.config)
            } else {
                0
            },
            collect_frames: collect,
            stop_at: next_base.map(|next| (next, self.first_raft_index(next))),
            raft_jump: RaftJump::ToPurgePoint(self.raft_purged),
        };
        let walked = if collect {
            let bytes = crate::io::read_exact(file.as_ref(), 0, data_end as usize)?;
            walk(&mut MemorySource { bytes }, start, &params)?
        } else {
            let mut source = FileSource::new(file.as_ref(), data_end, 1 << 20);
            walk(&mut source, start, &params)?
        };
        self.classify(&mut analysis, walked).map(|()| analysis)
    }

    /// Turns a walk into problems (proven damage or missing data) and a
    /// torn tail.
    fn classify(&self, analysis: &mut Analysis, walked: Walk) -> Result<()> {
        if let Some((position, reason)) = &walked.unsupported {
            return Err(Error::corruption(
                &analysis.path,
                *position,
                format!("frame not understood by this version: {reason}"),
            ));
        }
        for damage in &walked.damages {
            let lost = match damage.resume_offset {
                Some(resume) if resume > damage.offset => {
                    format!(", offsets {}..{resume}", damage.offset)
                }
                _ => String::new(),
            };
            analysis.problems.push(Problem {
                position: damage.position,
                reason: format!(
                    "{} in data that was durable (bytes {}..{}{lost}): this is damage, not a torn write",
                    damage.reason,
                    damage.position,
                    damage
                        .resume
                        .map_or_else(|| "end".to_string(), |resume| resume.to_string()),
                ),
                damage: Some(damage.clone()),
            });
        }
        let reached = walked.builder.next_offset;
        if let Some(end_offset) = analysis.expectation.end_offset {
            let already = walked
                .damages
                .last()
                .is_some_and(|damage| damage.resume.is_none());
            if reached < end_offset && !already {
                let reason = match &analysis.next_path {
                    Some(next) => format!(
                        "the frames stop at byte {} at offset {reached}, but the next segment {} begins at offset {end_offset}: offsets {reached}..{end_offset} are missing (frames lost, or a segment file removed)",
                        walked.end,
                        next.display()
                    ),
                    None => format!(
                        "the frames stop at byte {} at offset {reached}, but the data was durable up to offset {end_offset}: offsets {reached}..{end_offset} are missing",
                        walked.end
                    ),
                };
                analysis.problems.push(Problem {
                    position: walked.end,
                    reason,
                    damage: None,
                });
            } else if reached > end_offset && analysis.expectation.end_exact {
                return Err(Error::corruption(
                    &analysis.path,
                    walked.end,
                    format!(
                        "the frames run to offset {reached}, past offset {end_offset} where the segment ends (the next segment's first, or its index's or clean shutdown's end)"
                    ),
                ));
            }
        }
        analysis.torn = walked.torn.clone();
        analysis.walk = Some(walked);
        Ok(())
    }
}

/// The recovery entry points.
pub struct RecoveryManager;

impl RecoveryManager {
    /// Brings `directory` to a consistent state and returns what the writer
    /// needs. Creates the directory if it does not exist.
    /// [`open`](Self::open) for an offline tool: the default config, no
    /// node, the stream directory's own lock.
    fn open_offline(
        file_system: &Arc<dyn FileSystem>,
        directory: &Path,
        mode: RecoveryMode,
    ) -> Result<Recovered> {
        RecoveryManager::open(
            file_system,
            directory,
            &StreamConfig::default(),
            mode,
            0,
            false,
        )
    }

    pub(crate) fn open(
        file_system: &Arc<dyn FileSystem>,
        directory: &Path,
        config: &StreamConfig,
        mode: RecoveryMode,
        node_id: u16,
        store_locked: bool,
    ) -> Result<Recovered> {
        file_system.create_directory(directory)?;
        let lock = if store_locked {
            crate::io::DirectoryLock::default()
        } else {
            lock_stream_directory(file_system.as_ref(), directory)?
        };
        let mut report = RecoveryReport::default();
        remove_leftovers(file_system.as_ref(), directory, &mut report)?;
        let metadata = match load_metadata(file_system.as_ref(), directory) {
            Ok(metadata) => metadata,
            Err(error) if mode == RecoveryMode::Repair && error.is_corruption() => {
                tracing::warn!(%error, "rebuilding the stream metadata from the log");
                report.rebuilt_metadata = true;
                Some(rebuild_metadata(file_system, directory, node_id)?)
            }
            Err(error) => return Err(error),
        };
        let bases = segment_bases(file_system.as_ref(), directory)?;
        let metadata = match metadata {
            Some(metadata) => metadata,
            None if bases.is_empty() => fresh_metadata(file_system.as_ref(), node_id),
            None if mode == RecoveryMode::Repair => {
                report.rebuilt_metadata = true;
                rebuild_metadata(file_system, directory, node_id)?
            }
            None => {
                return Err(Error::corruption(
                    directory.join(METADATA_FILE_NAME),
                    0,
                    "the metadata file is missing although the stream has segments; the stream will not open (its nonce epoch and generation are unknown). `natswal repair` rebuilds it from the log",
                ))
            }
        };
        if report.rebuilt_metadata {
            file_system.write_atomic(&directory.join(METADATA_FILE_NAME), &metadata.encode())?;
        }
        let context = Context {
            file_system,
            directory,
            config,
            generation_max: metadata.generation,
            raft_purged: metadata.last_purged.map_or(0, |purged| purged.index),
        };
        if let Some(intent) = load_intent(file_system.as_ref(), directory)? {
            redo_truncation(file_system.as_ref(), directory, &intent)?;
            report.completed_truncation = Some(intent.from_offset);
        }
        let mut metadata = metadata;
        report.clean_shutdown = metadata.clean.is_some();
        let recovered = recover_segments(&context, &mut metadata, mode, &mut report)?;
        let (segments, active, next_offset, last_log_id, timestamp_max) = recovered;
        report.segments = segments.len();
        Ok(Recovered {
            lock,
            segments,
            active,
            next_offset,
            last_log_id,
            timestamp_max,
            metadata,
            report,
        })
    }

    /// Recovers a stream directory without opening it for writing (offline
    /// repair and checks): torn tails are left behind, indexes rebuilt and,
    /// in repair mode, damaged ranges quarantined. Encrypted frames need no
    /// keys for this.
    pub fn recover(
        file_system: &Arc<dyn FileSystem>,
        directory: &Path,
        mode: RecoveryMode,
    ) -> Result<RecoveryReport> {
        Ok(RecoveryManager::open_offline(file_system, directory, mode)?.report)
    }

    /// Checks every slot and frame of every segment and every index without
    /// changing anything. `progress` is called with bytes checked so far.
    pub fn verify(
        file_system: &Arc<dyn FileSystem>,
        directory: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<VerifyReport> {
        let _lock = lock_stream_directory(file_system.as_ref(), directory)?;
        let mut report = VerifyReport::default();
        let metadata = match load_metadata(file_system.as_ref(), directory) {
            Ok(metadata) => metadata,
            Err(error) => {
                report.problems.push(error.to_string());
                report.metadata_problem = Some(error.to_string());
                None
            }
        };
        if let Ok(Some(intent)) = load_intent(file_system.as_ref(), directory) {
            report.problems.push(format!(
                "an interrupted truncation from offset {} is pending (the next open finishes it)",
                intent.from_offset
            ));
        }
        let bases = segment_bases(file_system.as_ref(), directory)?;
        if metadata.is_none() && !bases.is_empty() && report.problems.is_empty() {
            let problem = format!(
                "{}: missing although the stream has segments",
                directory.join(METADATA_FILE_NAME).display()
            );
            report.problems.push(problem.clone());
            report.metadata_problem = Some(problem);
        }
        let config = StreamConfig::default();
        let context = Context {
            file_system,
            directory,
            config: &config,
            generation_max: metadata.map_or(u32::MAX, |metadata| metadata.generation),
            raft_purged: metadata
                .and_then(|metadata| metadata.last_purged)
                .map_or(0, |purged| purged.index),
        };
        let clean = metadata.and_then(|metadata| metadata.clean);
        let mut expected_next: Option<u64> = None;
        for (position, &base) in bases.iter().enumerate() {
            let next_base = bases.get(position + 1).copied();
            let path = directory.join(segment_file_name(base));
            if let Some(expected) = expected_next {
                if base != expected {
                    report.problems.push(format!(
                        "{}: begins at offset {base}, but the previous segment ends at offset {expected}",
                        path.display()
                    ));
                }
            }
            let analysis = match context.analyze(base, next_base, clean, false, true) {
                Ok(analysis) => analysis,
                Err(error) => {
                    report.problems.push(error.to_string());
                    expected_next = None;
                    continue;
                }
            };
            for problem in &analysis.problems {
                report.problems.push(format!(
                    "{}: damage at byte {}: {}",
                    path.display(),
                    problem.position,
                    problem.reason
                ));
            }
            if let Some(torn) = &analysis.torn {
                report.torn_tail = Some(format!(
                    "{} at byte {}: {} ({} unprovable frames after it; a write cut by a crash, which holds nothing acknowledged at fsync, unless the disk damaged the very last synced frames: docs/FORMAT.md 7.6)",
                    path.display(),
                    torn.position,
                    torn.reason,
                    torn.frames_dropped
                ));
            }
            let walked = analysis.walk.as_ref().expect("verify walks every segment");
            let gaps = walked
                .frames
                .iter()
                .filter(|frame| frame.header.kind == FrameKind::Gap);
            for gap in gaps {
                match gap.header.record_count {
                    0 => report.lost_raft_entry_marks += 1,
                    _ => report
                        .recorded_gaps
                        .push((gap.header.base_offset, gap.header.next_offset())),
                }
            }
            if let Some(problem) = index_problem(
                file_system.as_ref(),
                &analysis.path,
                &analysis.header,
                walked,
                next_base.is_none(),
            ) {
                report.problems.push(problem);
            }
            report.segments += 1;
            report.records += walked.builder.record_count;
            report.bytes += walked.end;
            expected_next = Some(walked.builder.next_offset);
            progress(report.bytes);
        }
        report.next_offset = expected_next.unwrap_or(crate::stream::FIRST_OFFSET);
        Ok(report)
    }

    /// Cuts the stream so that its last record has an offset below
    /// `from_offset`, durably and crash-atomically: the truncation is
    /// written down first (`truncate.intent`) and redone by an open that
    /// finds it, so a crash at any step leaves the old log or the new one.
    /// The stream must be closed. A frame that straddles the cut is
    /// replaced by one holding the records before it, unless it is an
    /// atomic batch or encrypted (no keys offline), which goes whole.
    pub fn truncate_suffix(
        file_system: &Arc<dyn FileSystem>,
        directory: &Path,
        from_offset: u64,
    ) -> Result<TruncateReport> {
        let recovered =
            RecoveryManager::open_offline(file_system, directory, RecoveryMode::Strict)?;
        let plan = plan_cut(
            file_system,
            &recovered.segments,
            recovered.next_offset,
            Cut::SplitAt(from_offset),
        )?;
        let Some((intent, report)) = plan else {
            return Ok(TruncateReport {
                next_offset: recovered.next_offset,
                records_kept: recovered
                    .segments
                    .iter()
                    .map(|segment| segment.record_count())
                    .sum(),
                ..TruncateReport::default()
            });
        };
        execute_truncation(file_system.as_ref(), directory, recovered.metadata, &intent)?;
        Ok(report)
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
        {
            // Nothing may write the source while it is copied.
            let _source_lock = lock_stream_directory(file_system.as_ref(), source)?;
            for base in segment_bases(file_system.as_ref(), source)? {
                let name = segment_file_name(base);
                let bytes = file_system.read(&source.join(&name))?;
                file_system.write_atomic(&target.join(&name), &bytes)?;
            }
            // The copy continues the source's nonce epochs and generations:
            // written under the same key, it must never reuse a nonce.
            if let Some(metadata) = load_metadata(file_system.as_ref(), source)? {
                let copied = StreamMetadata {
                    clean: None,
                    ..metadata
                };
                file_system.write_atomic(&target.join(METADATA_FILE_NAME), &copied.encode())?;
            }
        }
        let from_offset = match point {
            PointInTime::Offset(last) => last.saturating_add(1),
            PointInTime::Time(time) => first_offset_after(file_system, target, time)?,
        };
        RecoveryManager::truncate_suffix(file_system, target, from_offset)
    }
}

/// The first offset whose record is later than `time` (whole encrypted
/// frames are judged by their newest record, having no keys offline).
fn first_offset_after(
    file_system: &Arc<dyn FileSystem>,
    directory: &Path,
    time: i64,
) -> Result<u64> {
    let recovered = RecoveryManager::open_offline(file_system, directory, RecoveryMode::Strict)?;
    for segment in &recovered.segments {
        if segment.record_count() == 0 || segment.timestamp_max_through() <= time {
            continue;
        }
        for frame in segment_frames(file_system, segment)? {
            if frame.header.stored_records() == 0 {
                continue;
            }
            match crate::reader::decode_frame(&frame.header, &frame.bytes) {
                Ok(records) => {
                    if let Some(record) = records.iter().find(|record| record.timestamp_ns > time) {
                        return Ok(record.offset);
                    }
                }
                Err(_) if frame.header.last_timestamp_ns > time => {
                    return Ok(frame.header.base_offset)
                }
                Err(_) => {}
            }
        }
    }
    Ok(recovered.next_offset)
}

/// Every frame of a segment, read whole (offline tools).
fn segment_frames(
    file_system: &Arc<dyn FileSystem>,
    segment: &Arc<StorageSegment>,
) -> Result<Vec<super::walker::WalkedFrame>> {
    let file = file_system.open(segment.path(), false)?;
    let bytes = crate::io::read_exact(file.as_ref(), 0, segment.visible_length() as usize)?;
    let mut source = MemorySource { bytes };
    let mut frames = Vec::new();
    let mut position = SEGMENT_HEADER_LENGTH as u64;
    while position < source.end() {
        match super::walker::read_slot(&mut source, position, segment.salt_state(), u32::MAX)? {
            super::walker::Slot::Frame(frame) => {
                position = frame.end();
                frames.push(frame);
            }
            super::walker::Slot::Defect(defect) => {
                return Err(Error::corruption(segment.path(), position, defect.reason))
            }
        }
    }
    Ok(frames)
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
    /// The unprovable end of the last segment (never synced): left behind
    /// by the next open.
    pub torn_tail: Option<String>,
    /// Damage or inconsistencies, each naming a file and position.
    pub problems: Vec<String>,
    /// Offset ranges `[first, next)` an earlier repair recorded lost (gap
    /// frames): not damage any more, but the record of it.
    pub recorded_gaps: Vec<(u64, u64)>,
    /// Gaps of no offsets: Raft entries without offsets (blank,
    /// membership) that an earlier repair cut out, not restored yet.
    pub lost_raft_entry_marks: usize,
    /// The metadata file is damaged, or missing beside segments (also in
    /// `problems`). A repair rebuilds it from the log, but not a Raft vote,
    /// commit index or purge point: a replica must not be repaired so.
    pub metadata_problem: Option<String>,
}

impl VerifyReport {
    pub fn is_healthy(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Metadata of a new stream: a random nonce epoch start.
fn fresh_metadata(file_system: &dyn FileSystem, node_id: u16) -> StreamMetadata {
    StreamMetadata {
        generation: 0,
        // Half the epoch space stays above it for raises.
        nonce_epoch: (file_system.entropy() as u32) >> 1,
        node_id,
        ..StreamMetadata::default()
    }
}

/// Metadata rebuilt from the log after its file was lost or damaged: a
/// generation above every slot's, a nonce epoch far above every epoch this
/// node's frames used (frames of a truncated tail may have used a little
/// more). A Raft vote, commit index and purge point are gone.
fn rebuild_metadata(
    file_system: &Arc<dyn FileSystem>,
    directory: &Path,
    node_id: u16,
) -> Result<StreamMetadata> {
    let mut generation = 0u32;
    let mut epoch = 0u32;
    for base in segment_bases(file_system.as_ref(), directory)? {
        let path = directory.join(segment_file_name(base));
        let bytes = Bytes::from(file_system.read(&path)?);
        let Some(salt) = segment_salt(file_system.as_ref(), directory, base, &bytes) else {
            continue;
        };
        let state = salt_state(salt);
        // Every slot that verifies counts, damage or not in between: a
        // generation or an epoch missed here could be used again.
        let mut position = SEGMENT_HEADER_LENGTH;
        while position + SLOT_HEADER_LENGTH <= bytes.len() {
            let Some(slot) = SlotHeader::decode(&bytes[position..], state) else {
                position += 1;
                continue;
            };
            generation = generation.max(slot.generation);
            let frame_start = position + SLOT_HEADER_LENGTH;
            if let FrameCheck::Valid(frame) = check_frame(&bytes[frame_start..]) {
                if frame.is_encrypted() && frame.nonce[..2] == node_id.to_le_bytes() {
                    epoch = epoch.max(u32::from_le_bytes(
                        frame.nonce[2..6].try_into().expect("4 bytes"),
                    ));
                }
            }
            position = frame_start + slot.frame_length as usize;
        }
    }
    let jump = 1 << 16 | (file_system.entropy() as u32 & 0xffff);
    Ok(StreamMetadata {
        generation: generation.saturating_add(1),
        nonce_epoch: epoch.checked_add(jump).ok_or_else(|| {
            Error::InvalidInput(format!(
                "the nonce epochs of {} are exhausted; copy the stream under a new key",
                directory.display()
            ))
        })?,
        node_id,
        ..StreamMetadata::default()
    })
}

/// The salt of a segment: from its header, or from its index when the
/// header is damaged.
fn segment_salt(
    file_system: &dyn FileSystem,
    directory: &Path,
    base: u64,
    bytes: &[u8],
) -> Option<u64> {
    let path = directory.join(segment_file_name(base));
    if let Ok(header) = SegmentHeader::decode(bytes, &path) {
        return Some(header.salt);
    }
    file_system
        .read(&directory.join(index_file_name(base)))
        .ok()
        .and_then(|index| decode_index_header(&index).ok())
        .map(|(index, _)| index)
        .filter(|index| index.base_offset == base)
        .map(|index| index.salt)
}

/// Deletes what no crash-free stream holds: `*.tmp` files (incomplete
/// atomic writes and segment creations), received but not installed
/// segments, and index files without their segment.
fn remove_leftovers(
    file_system: &dyn FileSystem,
    directory: &Path,
    report: &mut RecoveryReport,
) -> Result<()> {
    let names = file_system.list(directory)?;
    let mut removed = false;
    for name in &names {
        let orphan_index = name.strip_suffix(".idx").is_some_and(|digits| {
            parse_segment_file_name(&format!("{digits}.log")).is_some()
                && !names.contains(&format!("{digits}.log"))
        });
        if name.ends_with(".tmp") || orphan_index {
            let path = directory.join(name);
            file_system.remove(&path)?;
            report.removed_files.push(path);
            removed = true;
        }
    }
    let incoming = directory.join(INCOMING_DIRECTORY);
    if file_system.is_directory(&incoming) {
        for name in file_system.list(&incoming)? {
            let path = incoming.join(name);
            file_system.remove(&path)?;
            report.removed_files.push(path);
        }
        file_system.sync_directory(&incoming)?;
    }
    if removed {
        file_system.sync_directory(directory)?;
    }
    Ok(())
}

fn load_intent(file_system: &dyn FileSystem, directory: &Path) -> Result<Option<TruncationIntent>> {
    let path = directory.join(INTENT_FILE_NAME);
    let bytes = match file_system.read(&path) {
        Ok(bytes) => bytes,
        Err(error) if io_not_found(&error) => return Ok(None),
        Err(error) => return Err(error),
    };
    TruncationIntent::decode(&bytes)
        .map(Some)
        .map_err(|reason| Error::corruption(&path, 0, reason))
}

type SegmentsRecovered = (
    Vec<Arc<StorageSegment>>,
    Option<ActiveSegment>,
    u64,
    LogId,
    i64,
);

fn recover_segments(
    context: &Context<'_>,
    metadata: &mut StreamMetadata,
    mode: RecoveryMode,
    report: &mut RecoveryReport,
) -> Result<SegmentsRecovered> {
    let file_system = context.file_system;
    let directory = context.directory;
    let bases = segment_bases(file_system.as_ref(), directory)?;
    let mut segments: Vec<Arc<StorageSegment>> = Vec::with_capacity(bases.len());
    let mut active = None;
    let mut next_offset = crate::stream::FIRST_OFFSET;
    let mut last_log_id = LogId::default();
    let mut timestamp_max = i64::MIN;
    let mut repaired = std::collections::BTreeSet::new();
    let mut headers_rebuilt = std::collections::BTreeSet::new();
    let mut position = 0;
    while let Some(&base) = bases.get(position) {
        let path = directory.join(segment_file_name(base));
        if let Some(previous) = segments.last() {
            if base != previous.next_offset() {
                return Err(Error::corruption(
                    &path,
                    0,
                    format!(
                        "{} ends at offset {} but {} begins at offset {base}: the segments leave a gap",
                        previous.path().display(),
                        previous.next_offset(),
                        path.display()
                    ),
                ));
            }
        }
        let next_base = bases.get(position + 1).copied();
        let repairing = mode == RecoveryMode::Repair;
        if repairing {
            let head = file_system.read(&path)?;
            if let Err(error @ Error::Corruption { .. }) = SegmentHeader::decode(&head, &path) {
                if !headers_rebuilt.insert(base) {
                    return Err(error);
                }
                rebuild_segment_header(
                    file_system.as_ref(),
                    directory,
                    base,
                    next_base,
                    &error.to_string(),
                    report,
                )?;
                continue;
            }
        }
        let analysis = context.analyze(base, next_base, metadata.clean, !repairing, repairing)?;
        if !analysis.problems.is_empty() {
            if mode == RecoveryMode::Repair {
                if !repaired.insert(base) {
                    let problem = &analysis.problems[0];
                    return Err(Error::corruption(
                        &analysis.path,
                        problem.position,
                        format!("{} (still after a repair)", problem.reason),
                    ));
                }
                repair_segment(context, &analysis, next_base.is_none(), report)?;
                if next_base.is_none() && metadata.clean.is_some() {
                    // The repaired active segment is not what the clean
                    // shutdown left.
                    metadata.clean = None;
                    file_system
                        .write_atomic(&directory.join(METADATA_FILE_NAME), &metadata.encode())?;
                }
                // The repaired segment is analyzed again, strictly.
                continue;
            }
            let problem = &analysis.problems[0];
            return Err(Error::corruption(
                &analysis.path,
                problem.position,
                format!(
                    "{}; the stream will not open. Run `natswal repair` to move the damaged range to quarantine and record the lost offsets",
                    problem.reason
                ),
            ));
        }
        let (segment, active_segment) =
            finish_analysis(context, analysis, next_base.is_none(), report)?;
        segment.set_timestamp_max_through(timestamp_max);
        timestamp_max = timestamp_max.max(segment.timestamp_max_through());
        next_offset = segment.next_offset();
        if segment.last_log_id().index != 0 {
            last_log_id = segment.last_log_id();
        }
        segments.push(segment);
        active = active_segment;
        position += 1;
    }
    Ok((segments, active, next_offset, last_log_id, timestamp_max))
}

/// A sealed segment whose index verified: known without being read.
fn sealed_from_index(
    context: &Context<'_>,
    header: SegmentHeader,
    index: &IndexHeader,
    entries: Vec<IndexEntry>,
) -> Arc<StorageSegment> {
    let segment = StorageSegment::new(
        Arc::clone(context.file_system),
        context.directory,
        header,
        progress_of(index),
        true,
    );
    segment.mark_indexed(index.segment_crc, entries);
    Arc::new(segment)
}

/// A segment without problems as the log holds it: trusted, sealed (its
/// interrupted seal finished), or the active one.
fn finish_analysis(
    context: &Context<'_>,
    analysis: Analysis,
    is_last: bool,
    report: &mut RecoveryReport,
) -> Result<(Arc<StorageSegment>, Option<ActiveSegment>)> {
    let file_system = context.file_system;
    if let Some((index, entries)) = analysis.trusted {
        return Ok((
            sealed_from_index(context, analysis.header, &index, entries),
            None,
        ));
    }
    let walked = analysis.walk.expect("an untrusted segment is walked");
    report.validated_bytes += walked.end.saturating_sub(analysis.start);
    if let Some(torn) = &analysis.torn {
        tracing::warn!(segment = %analysis.path.display(), position = torn.position, reason = %torn.reason, frames = torn.frames_dropped, "torn tail left behind: it was never synced");
        report
            .truncated
            .push(TruncatedTail::of(&analysis.path, torn));
    }
    let index_path = context.directory.join(index_file_name(analysis.base));
    if !is_last {
        // A repair walks every segment: one whose index already matches its
        // frames keeps it.
        let index_path_ok = analysis.file_length == walked.end
            && !walked.frames.is_empty()
            && index_problem(
                file_system.as_ref(),
                &analysis.path,
                &analysis.header,
                &walked,
                false,
            )
            .is_none();
        if let Some((index, entries)) = index_path_ok
            .then(|| read_index(file_system.as_ref(), &index_path, &analysis.header))
            .flatten()
        {
            return Ok((
                sealed_from_index(context, analysis.header, &index, entries),
                None,
            ));
        }
        // A sealed segment without a valid index: its seal was interrupted
        // (or its index lost). Its frames are complete: cut and index it.
        let file = file_system.open(&analysis.path, true)?;
        if analysis.file_length != walked.end {
            file.set_length(walked.end)?;
            report.completed_seals.push(analysis.path.clone());
        }
        // Even a file already cut to its frames may have a length that was
        // never made durable (its seal's fsync failed): the index below
        // claims it is.
        file.sync_all()?;
        let bytes = crate::io::read_exact(file.as_ref(), 0, walked.end as usize)?;
        let mut index = walked.builder.header(walked.end, analysis.header.salt);
        index.flags |= INDEX_FLAG_SEALED;
        index.segment_crc = crc32c::crc32c(&bytes);
        file_system.write_atomic(&index_path, &encode_index(&index, &walked.builder.entries))?;
        report.rebuilt_indexes.push(index_path);
        let segment = StorageSegment::new(
            Arc::clone(file_system),
            context.directory,
            analysis.header,
            walked.builder.progress(walked.end),
            true,
        );
        segment.mark_indexed(index.segment_crc, walked.builder.entries);
        return Ok((Arc::new(segment), None));
    }
    if analysis.checkpoint.is_none() {
        // A sealed index on the last segment (the next segment's creation
        // did not complete, or an empty one was removed) would claim the
        // segment ends where the frames about to be appended begin: it
        // goes, durably, before anything is written. Log::open writes a
        // checkpoint in its place.
        if file_system.exists(&index_path) {
            file_system.remove(&index_path)?;
            file_system.sync_directory(context.directory)?;
        }
        report.rebuilt_indexes.push(index_path);
    }
    let file = file_system.open(&analysis.path, true)?;
    let segment = Arc::new(StorageSegment::new(
        Arc::clone(file_system),
        context.directory,
        analysis.header,
        walked.builder.progress(walked.end),
        false,
    ));
    segment.attach_active(Arc::clone(&file), walked.builder.entries.clone());
    // Only what a checkpoint or a clean shutdown vouches for is known
    // durable: the walked tail may be in the page cache only (the process
    // died, the machine did not). Log::open syncs it before building on it.
    let floor = analysis.expectation.durable_floor.min(walked.end);
    segment.reset_durable_length(floor);
    let active = ActiveSegment {
        segment: Arc::clone(&segment),
        file,
        position: walked.end,
        capacity: analysis.file_length,
        builder: walked.builder,
        first_write_ns: (segment.record_count() > 0).then_some(analysis.header.created_at_ns),
        crc: None,
    };
    Ok((segment, Some(active)))
}

/// Problem of a segment's index found by verify, if any: it is missing or
/// does not describe the walked frames. An active segment's checkpoint may
/// cover less than its data.
fn index_problem(
    file_system: &dyn FileSystem,
    segment_path: &Path,
    header: &SegmentHeader,
    walked: &Walk,
    is_last: bool,
) -> Option<String> {
    let index_path = segment_path.with_extension("idx");
    let bytes = match file_system.read(&index_path) {
        Ok(bytes) => bytes,
        Err(_) if is_last => return None,
        Err(_) => {
            return Some(format!(
                "{}: missing (the next open rebuilds it)",
                index_path.display()
            ))
        }
    };
    let (index, entries) = match decode_index(&bytes) {
        Ok(decoded) => decoded,
        Err(reason) => {
            return Some(format!(
                "{}: {reason} (the next open rebuilds it)",
                index_path.display()
            ))
        }
    };
    if index.salt != header.salt || index.base_offset != header.base_offset {
        return Some(format!(
            "{}: belongs to another segment file",
            index_path.display()
        ));
    }
    let frames: Vec<(u64, i64, u64, u64)> = {
        let mut timestamp_max = i64::MIN;
        let first_raft = walked.builder.first_raft_index;
        walked
            .frames
            .iter()
            .map(|frame| {
                let entry = (
                    frame.position,
                    timestamp_max,
                    frame.header.base_offset - header.base_offset,
                    frame.header.raft_index.saturating_sub(first_raft),
                );
                if frame.header.stored_records() > 0 {
                    timestamp_max = timestamp_max.max(frame.header.last_timestamp_ns);
                }
                entry
            })
            .collect()
    };
    let mut expected = walked.builder.header(walked.end, header.salt);
    if index.is_sealed() {
        let bytes = file_system.read(segment_path).ok()?;
        expected.segment_crc = crc32c::crc32c(&bytes[..(walked.end as usize).min(bytes.len())]);
        if !index_matches(&index, &entries, &expected, &frames) {
            return Some(format!(
                "{}: does not match its segment (the next open rebuilds it)",
                index_path.display()
            ));
        }
        return None;
    }
    if !is_last {
        return Some(format!(
            "{}: a checkpoint where a sealed index belongs",
            index_path.display()
        ));
    }
    // A checkpoint: it must describe a prefix of the frames.
    let covered: Vec<(u64, i64, u64, u64)> = frames
        .iter()
        .copied()
        .filter(|frame| frame.0 < index.data_length)
        .collect();
    let prefix_ok = index.data_length <= walked.end
        && (index.data_length == SEGMENT_HEADER_LENGTH as u64
            || covered.iter().any(|_| true)
                && frames.iter().any(|frame| frame.0 == index.data_length)
            || index.data_length == walked.end);
    let entries_ok = entries.iter().all(|entry| {
        covered
            .binary_search_by_key(&u64::from(entry.position), |frame| frame.0)
            .is_ok()
    });
    if !prefix_ok || !entries_ok {
        return Some(format!(
            "{}: the checkpoint does not describe this segment's frames",
            index_path.display()
        ));
    }
    None
}

/// Saves damaged bytes and a note about them in `quarantine/`.
fn save_quarantined(
    file_system: &dyn FileSystem,
    directory: &Path,
    segment: &Path,
    start: u64,
    end: u64,
    bytes: &[u8],
    reason: &str,
) -> Result<QuarantinedRange> {
    let quarantine = directory.join(QUARANTINE_DIRECTORY);
    file_system.create_directory(&quarantine)?;
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

/// Appends a slot holding `frame` to a segment image being rebuilt.
pub(crate) fn push_slot(image: &mut Vec<u8>, frame: &[u8], salt: u32, generation: u32) {
    let slot = SlotHeader {
        frame_length: frame.len() as u32,
        durable_position: image.len() as u32,
        generation,
    };
    image.extend_from_slice(&slot.encode(salt));
    image.extend_from_slice(frame);
}

/// Rewrites a damaged segment: every valid frame kept, each damaged range
/// saved to quarantine and replaced by a gap frame for the offsets it held
/// (or by its frame, if only its slot was damaged), then the segment
/// replaced atomically and indexed.
fn repair_segment(
    context: &Context<'_>,
    analysis: &Analysis,
    is_last: bool,
    report: &mut RecoveryReport,
) -> Result<()> {
    let file_system = context.file_system.as_ref();
    let bytes = Bytes::from(file_system.read(&analysis.path)?);
    let walked = analysis
        .walk
        .as_ref()
        .expect("a segment with problems was walked");
    // The image is written under a new salt: an index of the old image
    // (the repair may crash before it replaces it) then no longer matches
    // the segment and is ignored, never taken to describe the new frames.
    let header = SegmentHeader {
        salt: file_system.entropy(),
        ..analysis.header
    };
    let salt = salt_state(header.salt);
    // A slot the repair adds takes the generation of the slot before it, so
    // generations stay non-decreasing through the segment.
    let mut generation = 0u32;
    let data_end = analysis
        .expectation
        .data_end
        .unwrap_or(u64::MAX)
        .min(bytes.len() as u64);
    let mut image = header.encode().to_vec();
    let mut frames = walked.frames.iter().peekable();
    let mut problems: Vec<&Problem> = analysis.problems.iter().collect();
    problems.sort_by_key(|problem| problem.position);
    let mut problems = problems.into_iter().peekable();
    loop {
        let next_frame = frames.peek().map(|frame| frame.position);
        let next_problem = problems.peek().map(|problem| problem.position);
        let take_frame = match (next_frame, next_problem) {
            (None, None) => break,
            (Some(frame), Some(problem)) => frame < problem,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        if take_frame {
            let frame = frames.next().expect("peeked");
            let start = (frame.position as usize) + SLOT_HEADER_LENGTH;
            let end = start + frame.header.frame_length as usize;
            push_slot(&mut image, &bytes[start..end], salt, frame.slot.generation);
            generation = frame.slot.generation;
            continue;
        }
        let problem = problems.next().expect("peeked");
        let damage = problem.damage.as_ref();
        let end = damage
            .and_then(|damage| damage.resume)
            .unwrap_or(data_end)
            .max(problem.position);
        let first_offset = damage.map_or(walked.builder.next_offset, |damage| damage.offset);
        let next_offset = damage
            .and_then(|damage| damage.resume_offset)
            .or(analysis.expectation.end_offset)
            .or(analysis.checkpoint.map(|checkpoint| checkpoint.next_offset))
            .unwrap_or(first_offset);
        if end > problem.position {
            let saved = save_quarantined(
                file_system,
                context.directory,
                &analysis.path,
                problem.position,
                end,
                &bytes[problem.position as usize..end as usize],
                &problem.reason,
            )?;
            report.quarantined.push(saved);
        }
        if let Some(intact) = damage.and_then(|damage| damage.intact_frame) {
            if intact.base_offset == first_offset && intact.next_offset() == next_offset {
                let start = problem.position as usize + SLOT_HEADER_LENGTH;
                let frame_end = start + intact.frame_length as usize;
                push_slot(&mut image, &bytes[start..frame_end], salt, generation);
                continue;
            }
        }
        if next_offset > first_offset {
            let offsets = u32::try_from(next_offset - first_offset).map_err(|_| {
                Error::corruption(
                    &analysis.path,
                    problem.position,
                    "too many offsets lost for one gap frame",
                )
            })?;
            let gap = encode_empty_frame(FrameKind::Gap, first_offset, offsets, 0, 0);
            push_slot(&mut image, &gap, salt, generation);
            report.lost.push(LostOffsets {
                segment: analysis.path.clone(),
                first_offset,
                next_offset,
            });
        } else if end > problem.position && walked.builder.last_log_id.index != 0 {
            // A Raft entry without offsets (blank, membership) was lost: a
            // gap of no offsets marks where, so the jump in Raft indexes
            // after it is expected and a restore from a peer finds it.
            let mark = encode_empty_frame(FrameKind::Gap, first_offset, 0, 0, 0);
            push_slot(&mut image, &mark, salt, generation);
            report.lost_raft_entry_marks += 1;
        }
    }
    // A problem at or after the torn position (offsets the next segment or
    // a checkpoint proves missing) already covers the tail.
    let torn = analysis.torn.as_ref().filter(|torn| {
        analysis
            .problems
            .iter()
            .all(|problem| problem.position < torn.position)
    });
    if let Some(torn) = torn {
        // The rewrite leaves the torn tail out: it is reported as an open
        // reports it, and its bytes are kept, since a damaged last frame
        // that nothing after it proves durable looks just like a torn write
        // (FORMAT.md 7.6). The copy is bounded by the largest frame (a
        // recycled file holds an earlier use's bytes after it).
        report
            .truncated
            .push(TruncatedTail::of(&analysis.path, torn));
        let bound = torn.end.max(torn.position)
            + context.config.frame_bytes_max
            + SLOT_HEADER_LENGTH as u64;
        let tail_end = data_end.min(bound).max(torn.position);
        let tail = &bytes[torn.position as usize..tail_end as usize];
        if let Some(last) = tail.iter().rposition(|byte| *byte != 0) {
            let end = torn.position + last as u64 + 1;
            let saved = save_quarantined(
                file_system,
                context.directory,
                &analysis.path,
                torn.position,
                end,
                &tail[..=last],
                &format!("torn tail cut by a repair: {}", torn.reason),
            )?;
            report.quarantined.push(saved);
        }
    }
    write_rebuilt_segment(
        file_system,
        context.directory,
        context.config,
        &header,
        image,
        is_last,
    )?;
    tracing::warn!(segment = %analysis.path.display(), "segment repaired");
    Ok(())
}

/// Writes a rebuilt segment image, then its fresh index, each atomically.
/// The image must carry a new salt: an index of the old image, left by a
/// crash between the two writes, then no longer matches it and is ignored
/// (the next open rebuilds it), never taken to describe the new frames.
/// The whole image is durable once written: every slot's durable_position
/// is its own position.
pub(crate) fn write_rebuilt_segment(
    file_system: &dyn FileSystem,
    directory: &Path,
    config: &StreamConfig,
    header: &SegmentHeader,
    image: Vec<u8>,
    is_last: bool,
) -> Result<()> {
    let path = directory.join(segment_file_name(header.base_offset));
    file_system.write_atomic(&path, &image)?;
    let index_path = directory.join(index_file_name(header.base_offset));
    let image = Bytes::from(image);
    let length = image.len() as u64;
    let rewalked = walk_whole(image.clone(), header, config.index_interval_bytes)?;
    let mut index = rewalked.builder.header(length, header.salt);
    if !is_last {
        index.flags |= INDEX_FLAG_SEALED;
        index.segment_crc = crc32c::crc32c(&image);
    }
    file_system.write_atomic(
        &index_path,
        &encode_index(&index, &rewalked.builder.entries),
    )
}

/// Repairs a segment whose header is damaged. Its index (sealed or
/// checkpoint) keeps the salt: with it the header is rebuilt exactly and
/// the frames stay as they are (other damage is then repaired as usual).
/// Without it, frames are found by their own checksums (offsets following
/// the file name's), written back under a new header and salt; what lies
/// between them goes to quarantine and the offsets it held are recorded
/// lost. The old header is saved to quarantine either way.
fn rebuild_segment_header(
    file_system: &dyn FileSystem,
    directory: &Path,
    base: u64,
    next_base: Option<u64>,
    reason: &str,
    report: &mut RecoveryReport,
) -> Result<()> {
    let path = directory.join(segment_file_name(base));
    let bytes = file_system.read(&path)?;
    let index_path = directory.join(index_file_name(base));
    let known_salt = segment_salt(file_system, directory, base, &bytes);
    let frames = frames_by_checksum(&bytes, base);
    let key = frames
        .iter()
        .map(|(_, header)| header)
        .find(|header| header.is_encrypted())
        .map_or((0, 0), |header| (header.key_id, header.cipher));
    let saved = save_quarantined(
        file_system,
        directory,
        &path,
        0,
        SEGMENT_HEADER_LENGTH as u64,
        &bytes[..SEGMENT_HEADER_LENGTH.min(bytes.len())],
        reason,
    )?;
    report.quarantined.push(saved);
    let header = |salt| SegmentHeader {
        base_offset: base,
        created_at_ns: 0,
        key_id: key.0,
        compression: 0,
        cipher: key.1,
        salt,
    };
    if let Some(salt) = known_salt {
        let mut image = bytes.clone();
        image[..SEGMENT_HEADER_LENGTH].copy_from_slice(&header(salt).encode());
        return file_system.write_atomic(&path, &image);
    }
    let salt = file_system.entropy();
    let state = salt_state(salt);
    let mut image = header(salt).encode().to_vec();
    let mut offset = base;
    let mut position = SEGMENT_HEADER_LENGTH;
    let lost = |first: u64, next: u64, image: &mut Vec<u8>, report: &mut RecoveryReport| {
        if next > first {
            let gap = encode_empty_frame(FrameKind::Gap, first, (next - first) as u32, 0, 0);
            push_slot(image, &gap, state, 0);
            report.lost.push(LostOffsets {
                segment: path.clone(),
                first_offset: first,
                next_offset: next,
            });
        }
    };
    for (start, frame) in &frames {
        if *start > position {
            let saved = save_quarantined(
                file_system,
                directory,
                &path,
                position as u64,
                *start as u64,
                &bytes[position..*start],
                "between frames found when rebuilding a damaged segment header",
            )?;
            report.quarantined.push(saved);
        }
        lost(offset, frame.base_offset, &mut image, report);
        let frame_start = start + SLOT_HEADER_LENGTH;
        push_slot(
            &mut image,
            &bytes[frame_start..frame_start + frame.frame_length as usize],
            state,
            0,
        );
        offset = frame.next_offset();
        position = frame_start + frame.frame_length as usize;
    }
    if let Some(next) = next_base {
        let rest_nonzero = bytes[position.min(bytes.len())..]
            .iter()
            .any(|byte| *byte != 0);
        if rest_nonzero {
            let saved = save_quarantined(
                file_system,
                directory,
                &path,
                position as u64,
                bytes.len() as u64,
                &bytes[position..],
                "after the last frame found when rebuilding a damaged segment header",
            )?;
            report.quarantined.push(saved);
        }
        lost(offset.min(next), next, &mut image, report);
    }
    file_system.write_atomic(&path, &image)?;
    if file_system.exists(&index_path) {
        file_system.remove(&index_path)?;
        file_system.sync_directory(directory)?;
    }
    Ok(())
}

/// Frames of a segment image found by their own checksums (the salt being
/// unknown): from the first slot on, each where its predecessor ends, or at
/// the next position where a frame verifies with offsets at or after the
/// expected ones. Slot positions and frame headers.
fn frames_by_checksum(bytes: &[u8], base: u64) -> Vec<(usize, crate::format::frame::FrameHeader)> {
    let mut frames = Vec::new();
    let mut expected = base;
    let mut position = SEGMENT_HEADER_LENGTH;
    while position + SLOT_HEADER_LENGTH + FRAME_HEADER_LENGTH <= bytes.len() {
        let frame_start = position + SLOT_HEADER_LENGTH;
        match check_frame(&bytes[frame_start..]) {
            FrameCheck::Valid(header) if header.base_offset >= expected => {
                expected = header.next_offset();
                frames.push((position, header));
                position = frame_start + header.frame_length as usize;
            }
            _ => {
                let from = frame_start + 1;
                let found =
                    memchr::memmem::find_iter(&bytes[from..], crate::format::frame::FRAME_MAGIC)
                        .map(|found| from + found)
                        .find(|candidate| {
                            matches!(check_frame(&bytes[*candidate..]),
                            FrameCheck::Valid(header) if header.base_offset >= expected)
                        });
                match found {
                    Some(candidate) => position = candidate - SLOT_HEADER_LENGTH,
                    None => break,
                }
            }
        }
    }
    frames
}

/// Where a truncation cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// Keep the records below this offset; a frame holding records on both
    /// sides is replaced by one holding those before (offline only).
    SplitAt(u64),
    /// Keep the frames wholly below this offset; the frame holding it goes
    /// whole (online: frames are never split).
    FrameHolding(u64),
    /// Keep the entries up to this Raft index.
    AfterRaftIndex(u64),
}

/// Plans a truncation: the intent and what it will report. `None` when
/// nothing is cut.
pub(crate) fn plan_cut(
    file_system: &Arc<dyn FileSystem>,
    segments: &[Arc<StorageSegment>],
    next_offset: u64,
    cut: Cut,
) -> Result<Option<(TruncationIntent, TruncateReport)>> {
    let Some(first) = segments.first() else {
        return Ok(None);
    };
    let boundary_index = match cut {
        Cut::SplitAt(offset) | Cut::FrameHolding(offset) => {
            if offset >= next_offset {
                return Ok(None);
            }
            let offset = offset.max(first.base_offset());
            segments
                .partition_point(|segment| segment.base_offset() <= offset)
                .saturating_sub(1)
        }
        Cut::AfterRaftIndex(index) => {
            let last = segments
                .iter()
                .rev()
                .map(|segment| segment.last_log_id().index)
                .find(|last| *last != 0)
                .unwrap_or(0);
            if last <= index {
                return Ok(None);
            }
            segments
                .iter()
                .rposition(|segment| {
                    segment.first_raft_index() != 0 && segment.first_raft_index() <= index + 1
                })
                .unwrap_or(0)
        }
    };
    let boundary = &segments[boundary_index];
    let mut report = TruncateReport {
        next_offset: boundary.base_offset(),
        ..TruncateReport::default()
    };
    for segment in &segments[..boundary_index] {
        report.records_kept += segment.record_count();
    }
    for segment in &segments[boundary_index + 1..] {
        report.records_removed += segment.record_count();
        report.segments_removed += 1;
    }
    let frames = segment_frames(file_system, boundary)?;
    let mut position = SEGMENT_HEADER_LENGTH as u64;
    let mut replacement = Vec::new();
    let mut cut_at = None;
    for (index, frame) in frames.iter().enumerate() {
        let header = &frame.header;
        let before = match cut {
            Cut::SplitAt(offset) | Cut::FrameHolding(offset) => {
                if header.kind.takes_offsets() {
                    header.next_offset() <= offset
                } else {
                    header.base_offset < offset
                }
            }
            Cut::AfterRaftIndex(raft_index) => header.raft_index <= raft_index,
        };
        if !before {
            cut_at = Some(index);
            break;
        }
        report.records_kept += u64::from(header.stored_records());
        report.next_offset = header.next_offset();
        position = frame.end();
    }
    if let Some(index) = cut_at {
        let frame = &frames[index];
        let stored = u64::from(frame.header.stored_records());
        let prefix = match cut {
            Cut::SplitAt(offset)
                if frame.header.kind == FrameKind::Records
                    && !frame.header.is_atomic()
                    && offset > frame.header.base_offset =>
            {
                let kept = (offset - frame.header.base_offset).min(stored) as usize;
                crate::reader::decode_frame(&frame.header, &frame.bytes)
                    .ok()
                    .map(|records| (kept, records))
            }
            _ => None,
        };
        let gap_kept = match cut {
            Cut::SplitAt(offset) | Cut::FrameHolding(offset)
                if frame.header.kind == FrameKind::Gap && offset > frame.header.base_offset =>
            {
                Some(offset - frame.header.base_offset)
            }
            _ => None,
        };
        match (prefix, gap_kept) {
            // A gap frame (offsets a repair recorded lost) holds no record:
            // a shorter one keeps the cut exactly where it was asked for,
            // so offsets below it are never reused.
            (_, Some(kept)) => {
                let kept_offsets = u32::try_from(kept).expect("below a frame's own offset count");
                replacement = encode_empty_frame(
                    FrameKind::Gap,
                    frame.header.base_offset,
                    kept_offsets,
                    0,
                    0,
                );
                report.next_offset = frame.header.base_offset + kept;
            }
            (Some((kept, records)), None) => {
                let prefix: Vec<(Record, i64)> = records
                    .iter()
                    .take(kept)
                    .map(|record| {
                        let owned = Record {
                            timestamp_ns: record.timestamp_ns,
                            subject: record.subject.clone(),
                            headers: record.headers.clone(),
                            payload: record.payload.clone(),
                        };
                        (owned, record.timestamp_ns)
                    })
                    .collect();
                replacement = encode_plain_frame(frame.header.base_offset, &prefix, 0, 0, 0);
                report.records_kept += kept as u64;
                report.records_removed += stored - kept as u64;
                report.next_offset = frame.header.base_offset + kept as u64;
            }
            // Atomic, encrypted without keys, or online: the frame goes whole.
            (None, None) => {
                report.records_removed += stored;
                report.next_offset = frame.header.base_offset;
            }
        }
        report.records_removed += frames[index + 1..]
            .iter()
            .map(|frame| u64::from(frame.header.stored_records()))
            .sum::<u64>();
    } else if boundary_index + 1 == segments.len() {
        return Ok(None);
    }
    let intent = TruncationIntent {
        from_offset: report.next_offset,
        segment_base: boundary.base_offset(),
        position,
        replacement,
        salt: boundary.header().salt,
    };
    Ok(Some((intent, report)))
}

/// The segment a truncation left last, opened again as the active one.
pub(crate) fn reopen_tail(
    file_system: &Arc<dyn FileSystem>,
    directory: &Path,
    config: &StreamConfig,
    base: u64,
    metadata: StreamMetadata,
) -> Result<(Arc<StorageSegment>, ActiveSegment)> {
    let context = Context {
        file_system,
        directory,
        config,
        generation_max: metadata.generation,
        raft_purged: metadata.last_purged.map_or(0, |purged| purged.index),
    };
    let analysis = context.analyze(base, None, None, false, false)?;
    if let Some(problem) = analysis.problems.first() {
        return Err(Error::corruption(
            &analysis.path,
            problem.position,
            problem.reason.clone(),
        ));
    }
    let mut report = RecoveryReport::default();
    let (segment, active) = finish_analysis(&context, analysis, true, &mut report)?;
    let active = active.ok_or_else(|| {
        Error::InvalidInput(format!(
            "{} did not reopen as the active segment",
            segment.path().display()
        ))
    })?;
    Ok((segment, active))
}

/// Writes the intent, raises the generation (the replacement frame and
/// every later write belong to the new one), does the truncation and
/// removes the intent. The stream's lock is held by the caller.
pub(crate) fn execute_truncation(
    file_system: &dyn FileSystem,
    directory: &Path,
    metadata: StreamMetadata,
    intent: &TruncationIntent,
) -> Result<StreamMetadata> {
    let raised = StreamMetadata {
        generation: metadata.generation.saturating_add(1),
        nonce_epoch: metadata.nonce_epoch.saturating_add(1),
        clean: None,
        ..metadata
    };
    file_system.write_atomic(&directory.join(METADATA_FILE_NAME), &raised.encode())?;
    file_system.write_atomic(&directory.join(INTENT_FILE_NAME), &intent.encode())?;
    redo_truncation(file_system, directory, intent)?;
    Ok(raised)
}

/// Does (or finishes) the truncation an intent describes, then removes the
/// intent. Idempotent: every step can be repeated after a crash.
pub(crate) fn redo_truncation(
    file_system: &dyn FileSystem,
    directory: &Path,
    intent: &TruncationIntent,
) -> Result<()> {
    let metadata = load_metadata(file_system, directory)?.ok_or_else(|| {
        Error::corruption(
            directory.join(METADATA_FILE_NAME),
            0,
            "missing during a truncation",
        )
    })?;
    // Later segments go first, from the last: each removal is durable
    // before the next, so the log never has a hole.
    let mut bases = segment_bases(file_system, directory)?;
    bases.retain(|base| *base > intent.segment_base);
    for base in bases.iter().rev() {
        for path in [
            directory.join(index_file_name(*base)),
            directory.join(segment_file_name(*base)),
        ] {
            if file_system.exists(&path) {
                file_system.remove(&path)?;
            }
        }
        file_system.sync_directory(directory)?;
    }
    let path = directory.join(segment_file_name(intent.segment_base));
    let index_path = directory.join(index_file_name(intent.segment_base));
    if file_system.exists(&index_path) {
        file_system.remove(&index_path)?;
        file_system.sync_directory(directory)?;
    }
    let file = file_system.open(&path, true)?;
    file.set_length(intent.position)?;
    if !intent.replacement.is_empty() {
        // The salt comes from the intent: the header may have been damaged
        // since the plan, and an explicit repair rebuilds it afterwards.
        let slot = SlotHeader {
            frame_length: intent.replacement.len() as u32,
            durable_position: intent.position as u32,
            generation: metadata.generation,
        };
        file.write_vectored_at(
            intent.position,
            &[&slot.encode(salt_state(intent.salt)), &intent.replacement],
        )?;
    }
    file.sync_all()?;
    // All of the cut segment is durable now: a checkpoint says so, so that
    // damage to it is never taken for a torn write.
    checkpoint_whole(file_system, file.as_ref(), &index_path)?;
    file_system.remove(&directory.join(INTENT_FILE_NAME))?;
    file_system.sync_directory(directory)?;
    Ok(())
}

/// Writes the checkpoint of a segment whose whole file is durable (derived
/// data: a segment that does not walk cleanly gets none).
fn checkpoint_whole(
    file_system: &dyn FileSystem,
    file: &dyn File,
    index_path: &Path,
) -> Result<()> {
    let bytes = read_whole(file)?;
    // A header damaged since the truncation was planned gets no checkpoint:
    // an open finds the damage, and an explicit repair rebuilds it.
    let Ok(header) = SegmentHeader::decode(&bytes, file.path()) else {
        return Ok(());
    };
    let walked = walk_whole(
        bytes.clone(),
        &header,
        crate::config::INDEX_INTERVAL_DEFAULT,
    )?;
    if !walked.damages.is_empty() || walked.end != bytes.len() as u64 {
        return Ok(());
    }
    let index = walked.builder.header(walked.end, header.salt);
    if let Err(error) =
        file_system.write_atomic(index_path, &encode_index(&index, &walked.builder.entries))
    {
        tracing::warn!(%error, "cannot write a checkpoint after a truncation");
    }
    Ok(())
}

/// Moves a retired segment into `recycle/` for reuse (or deletes it when
/// enough are waiting), durably.
pub(crate) fn retire_segment_file(
    file_system: &dyn FileSystem,
    directory: &Path,
    segment: &StorageSegment,
    recycle_max: usize,
) -> Result<bool> {
    let recycle = directory.join(RECYCLE_DIRECTORY);
    let waiting = if file_system.is_directory(&recycle) {
        file_system.list(&recycle)?.len()
    } else {
        0
    };
    if file_system.exists(segment.index_path()) {
        file_system.remove(segment.index_path())?;
    }
    let recycled = waiting < recycle_max;
    if recycled {
        file_system.create_directory(&recycle)?;
        let name = segment
            .path()
            .file_name()
            .map(|name| name.to_os_string())
            .unwrap_or_default();
        file_system.rename(segment.path(), &recycle.join(name))?;
    } else {
        file_system.remove(segment.path())?;
    }
    file_system.sync_directory(directory)?;
    if recycled {
        file_system.sync_directory(&recycle)?;
    }
    Ok(recycled)
}

/// Walks a whole segment image from its first slot (install checks).
pub(crate) fn walk_whole(bytes: Bytes, header: &SegmentHeader, interval: u64) -> Result<Walk> {
    let length = bytes.len() as u64;
    walk_whole_source(&mut MemorySource { bytes }, length, header, interval)
}

/// Walks a whole segment file of `length` bytes (all of it durable) in
/// 1 MiB reads.
pub(crate) fn walk_whole_file(
    file: &dyn File,
    length: u64,
    header: &SegmentHeader,
    interval: u64,
) -> Result<Walk> {
    let mut source = FileSource::new(file, length, 1 << 20);
    walk_whole_source(&mut source, length, header, interval)
}

fn walk_whole_source(
    source: &mut dyn ByteSource,
    length: u64,
    header: &SegmentHeader,
    interval: u64,
) -> Result<Walk> {
    let params = WalkParams::whole(salt_state(header.salt), length);
    let start = WalkStart::segment_start(header.base_offset, interval);
    walk(source, start, &params)
}

/// Reads one whole file (a helper for recovery and tests).
pub(crate) fn read_whole(file: &dyn File) -> Result<Bytes> {
    let length = file.length()?;
    crate::io::read_exact(file, 0, length as usize)
}
