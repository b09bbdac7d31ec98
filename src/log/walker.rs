//! The one walker over the slots and frames of a segment (FORMAT.md 2.3 and
//! 7). Recovery, verify, repair, index rebuilds and truncation all walk
//! segments through it, so they cannot disagree about what a segment holds.
//!
//! A walk only ever looks at positions it can trust: the start of the
//! segment's first slot, and from each valid slot the one its verified
//! length points to. When a slot is damaged, the walk resumes at the next
//! position where a slot verifies under the segment's salt (first the one
//! the damaged slot's own surviving length names, else a bounded search).
//! A publisher's payload cannot contain such a slot: the salt is random per
//! segment file and never leaves the node, so recovery decisions cannot be
//! forged by payloads. Slots of an older generation (bytes of an abandoned
//! tail) are never taken for frames of this one.
//!
//! Damage is then classified by what is provable: a damaged slot below the
//! durable floor (a checkpoint, a clean shutdown, a sealed segment) or
//! followed by a frame whose `durable_position` is beyond it was durable:
//! corruption, costing only the bytes up to the next valid slot. Anything
//! else is a torn tail: never synced, so nothing acknowledged at `fsync` is
//! in it.

use super::index::IndexBuilder;
use crate::error::Result;
use crate::format::frame::{check_frame, check_header, FrameCheck, FrameHeader, SlotHeader};
use crate::format::frame::{FRAME_HEADER_LENGTH, SLOT_HEADER_LENGTH};
use crate::io::File;
use bytes::Bytes;

/// Bytes of a segment, read on demand.
pub(crate) trait ByteSource {
    /// Readable length.
    fn end(&self) -> u64;
    /// `[position, position + length)`, or fewer bytes at the end.
    fn get(&mut self, position: u64, length: usize) -> Result<Bytes>;
}

/// A file read in windows with `pread`.
pub(crate) struct FileSource<'a> {
    file: &'a dyn File,
    end: u64,
    window_start: u64,
    window: Bytes,
    window_bytes: usize,
}

impl<'a> FileSource<'a> {
    pub fn new(file: &'a dyn File, end: u64, window_bytes: usize) -> FileSource<'a> {
        FileSource {
            file,
            end,
            window_start: 0,
            window: Bytes::new(),
            window_bytes,
        }
    }
}

impl ByteSource for FileSource<'_> {
    fn end(&self) -> u64 {
        self.end
    }

    fn get(&mut self, position: u64, length: usize) -> Result<Bytes> {
        let wanted_end = (position + length as u64).min(self.end);
        let read_length = ((wanted_end.max(position) - position) as usize)
            .max(self.window_bytes)
            .min(self.end.saturating_sub(position) as usize);
        read_through_window(
            &mut self.window_start,
            &mut self.window,
            position,
            wanted_end,
            || crate::io::read_up_to(self.file, position, read_length),
        )
    }
}

/// `[position, wanted_end)` from the window read ahead (`window` holds the
/// bytes from `window_start` on) when it has them; otherwise the window is
/// replaced by what `read` returns from `position` on. Short when `read`
/// is (the end of a file).
pub(crate) fn read_through_window(
    window_start: &mut u64,
    window: &mut Bytes,
    position: u64,
    wanted_end: u64,
    read: impl FnOnce() -> Result<Bytes>,
) -> Result<Bytes> {
    if position >= wanted_end {
        return Ok(Bytes::new());
    }
    let window_end = *window_start + window.len() as u64;
    if position >= *window_start && wanted_end <= window_end {
        let start = (position - *window_start) as usize;
        return Ok(window.slice(start..start + (wanted_end - position) as usize));
    }
    *window = read()?;
    *window_start = position;
    let available = (window.len() as u64).min(wanted_end - position) as usize;
    Ok(window.slice(..available))
}

/// Bytes already in memory (offline tools, tests).
pub(crate) struct MemorySource {
    pub bytes: Bytes,
}

impl ByteSource for MemorySource {
    fn end(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn get(&mut self, position: u64, length: usize) -> Result<Bytes> {
        let start = (position as usize).min(self.bytes.len());
        let end = start.saturating_add(length).min(self.bytes.len());
        Ok(self.bytes.slice(start..end))
    }
}

/// A valid slot and its valid frame.
#[derive(Debug, Clone)]
pub(crate) struct WalkedFrame {
    pub position: u64,
    pub slot: SlotHeader,
    pub header: FrameHeader,
    /// The frame's bytes (without the slot header).
    pub bytes: Bytes,
}

impl WalkedFrame {
    pub fn end(&self) -> u64 {
        self.position + (SLOT_HEADER_LENGTH + self.header.frame_length as usize) as u64
    }
}

/// Bytes at a slot position that are not a valid slot and frame.
#[derive(Debug, Clone)]
pub(crate) struct SlotDefect {
    pub reason: String,
    /// Nothing but zeros there: nothing was written.
    pub zeros: bool,
    /// The slot header verified under the segment's salt: a frame of this
    /// segment was (at least partly) written here.
    pub slot_verified: bool,
    /// Slot plus frame bytes, known from a slot or frame header that
    /// verified: the damage ends there.
    pub length: Option<u64>,
    /// A checksummed frame header this version does not understand.
    pub unsupported: Option<String>,
    /// The frame verified, only its slot did not.
    pub intact_frame: Option<FrameHeader>,
}

pub(crate) enum Slot {
    Frame(WalkedFrame),
    Defect(SlotDefect),
}

/// Reads and checks the slot and frame at `position`.
pub(crate) fn read_slot(
    source: &mut dyn ByteSource,
    position: u64,
    salt_state: u32,
    generation_max: u32,
) -> Result<Slot> {
    let head = source.get(position, SLOT_HEADER_LENGTH + FRAME_HEADER_LENGTH)?;
    let slot = SlotHeader::decode(&head, salt_state);
    let defect = |reason: String, length: Option<u64>| SlotDefect {
        zeros: head.iter().all(|byte| *byte == 0),
        slot_verified: slot.is_some(),
        reason,
        length,
        unsupported: None,
        intact_frame: None,
    };
    if head.len() < SLOT_HEADER_LENGTH {
        return Ok(Slot::Defect(defect(
            format!("{} bytes left, less than a slot header", head.len()),
            None,
        )));
    }
    let header = match check_header(&head[SLOT_HEADER_LENGTH..]) {
        FrameCheck::Valid(header) => Some(header),
        FrameCheck::Unsupported(reason) => {
            if slot.is_some() {
                let mut unsupported = defect(reason.clone(), None);
                unsupported.unsupported = Some(reason);
                return Ok(Slot::Defect(unsupported));
            }
            None
        }
        FrameCheck::Defect(_) => None,
    };
    let slot_length =
        |slot: &SlotHeader| (SLOT_HEADER_LENGTH as u64) + u64::from(slot.frame_length);
    let (slot, header) = match (slot, header) {
        (Some(slot), Some(header)) if slot.frame_length == header.frame_length => (slot, header),
        (Some(_), Some(_)) => {
            return Ok(Slot::Defect(defect(
                "slot and frame header disagree on the frame length".to_string(),
                None,
            )))
        }
        (Some(slot), None) => {
            let reason = match check_header(&head[SLOT_HEADER_LENGTH..]) {
                FrameCheck::Defect(defect) => defect.to_string(),
                _ => "damaged frame header".to_string(),
            };
            return Ok(Slot::Defect(defect(reason, Some(slot_length(&slot)))));
        }
        (None, Some(header)) => {
            let length = SLOT_HEADER_LENGTH as u64 + u64::from(header.frame_length);
            let mut damaged = defect("slot header checksum mismatch".to_string(), Some(length));
            let frame = source.get(
                position + SLOT_HEADER_LENGTH as u64,
                header.frame_length as usize,
            )?;
            if matches!(check_frame(&frame), FrameCheck::Valid(_)) {
                damaged.intact_frame = Some(header);
            }
            return Ok(Slot::Defect(damaged));
        }
        (None, None) => {
            let reason = if head.iter().all(|byte| *byte == 0) {
                "no slot (zero bytes)".to_string()
            } else {
                "no valid slot or frame header".to_string()
            };
            return Ok(Slot::Defect(defect(reason, None)));
        }
    };
    if slot.generation > generation_max {
        return Ok(Slot::Defect(defect(
            format!(
                "slot of generation {} beyond the stream's generation {generation_max}",
                slot.generation
            ),
            Some(slot_length(&slot)),
        )));
    }
    let frame = source.get(
        position + SLOT_HEADER_LENGTH as u64,
        header.frame_length as usize,
    )?;
    match check_frame(&frame) {
        FrameCheck::Valid(_) => Ok(Slot::Frame(WalkedFrame {
            position,
            slot,
            header,
            bytes: frame,
        })),
        FrameCheck::Defect(frame_defect) => Ok(Slot::Defect(defect(
            frame_defect.to_string(),
            Some(slot_length(&slot)),
        ))),
        FrameCheck::Unsupported(reason) => {
            let mut unsupported = defect(reason.clone(), None);
            unsupported.unsupported = Some(reason);
            Ok(Slot::Defect(unsupported))
        }
    }
}

/// Where a walk starts: a slot position and what the frames before it
/// left (from a checkpoint or the segment start).
#[derive(Debug, Clone)]
pub(crate) struct WalkStart {
    pub position: u64,
    pub builder: IndexBuilder,
    /// Highest slot generation before `position`.
    pub generation: u32,
}

impl WalkStart {
    /// A walk from the first slot of the segment at `base_offset`.
    pub fn segment_start(base_offset: u64, index_interval_bytes: u64) -> WalkStart {
        WalkStart {
            position: crate::format::segment_header::SEGMENT_HEADER_LENGTH as u64,
            builder: IndexBuilder::new(base_offset, index_interval_bytes),
            generation: 0,
        }
    }
}

/// What the walker may assume.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WalkParams {
    pub salt_state: u32,
    /// The stream's current generation: no slot can be newer.
    pub generation_max: u32,
    /// Every byte below this is known durable (a checkpoint, a clean
    /// shutdown, or the whole of a sealed segment): damage the walk steps
    /// over below it is corruption.
    pub durable_floor: u64,
    /// The data reaches at least this far: a walk that stops below it
    /// (nothing valid follows) stopped at damage, not at the end.
    pub end_floor: u64,
    /// How far past a damaged slot to look for the next valid one.
    pub search_bytes: u64,
    /// Keep every frame's summary (repair rewrites from them).
    pub collect_frames: bool,
    /// A segment that is not the last ends where the next one begins: at
    /// this offset, and (for Raft entries that take no offsets) before this
    /// Raft index (0: unknown). Bytes after are not this segment's.
    pub stop_at: Option<(u64, u64)>,
    /// Which gaps in Raft indexes continue the log (see [`RaftJump`]).
    pub raft_jump: RaftJump,
}

/// A Raft entry follows the last one (index + 1), except where a purge
/// moved past the end of the log (a snapshot installed beyond it): then
/// the next entry follows the purge point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RaftJump {
    /// One jump, to the purge point's index + 1, from below it.
    ToPurgePoint(u64),
    /// Any forward jump: a whole image is all durable, so a gap in it is
    /// one its writer made, never a stale frame.
    Forward,
}

impl WalkParams {
    /// A whole image `length` bytes long that is all durable (a sealed
    /// segment, or one a repair or truncation just wrote and synced).
    pub fn whole(salt_state: u32, length: u64) -> WalkParams {
        WalkParams {
            salt_state,
            generation_max: u32::MAX,
            durable_floor: length,
            end_floor: length,
            search_bytes: 0,
            collect_frames: false,
            stop_at: None,
            raft_jump: RaftJump::Forward,
        }
    }
}

/// A damaged range that was durable: corruption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Damage {
    pub position: u64,
    /// The next valid slot, where the data goes on; `None` when nothing
    /// valid follows (the damage runs to the end of the data).
    pub resume: Option<u64>,
    pub reason: String,
    /// The next offset expected at the damage...
    pub offset: u64,
    /// ...and the base offset of the frame at `resume`: the damage lost
    /// `[offset, resume_offset)` (unknown without a resume).
    pub resume_offset: Option<u64>,
    /// The damaged slot held a frame that verified (only its slot did not):
    /// repair keeps the frame.
    pub intact_frame: Option<FrameHeader>,
}

/// The end of the active segment's data that could not be proven durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TornTail {
    pub position: u64,
    pub reason: String,
    /// Valid frames after the torn slot that go with it.
    pub frames_dropped: usize,
    /// End of the last of them (or `position`).
    pub end: u64,
}

/// A frame the walk accepted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameSummary {
    pub position: u64,
    pub slot: SlotHeader,
    pub header: FrameHeader,
}

/// What a walk found.
#[derive(Debug, Clone)]
pub(crate) struct Walk {
    /// The accepted frames (every frame before `end`).
    pub builder: IndexBuilder,
    /// Position after the last accepted frame.
    pub end: u64,
    /// Proven damage before `end` (and possibly one at `end`).
    pub damages: Vec<Damage>,
    pub torn: Option<TornTail>,
    /// A checksummed frame this version does not understand.
    pub unsupported: Option<(u64, String)>,
    /// Highest generation among the accepted frames.
    pub generation: u32,
    pub frames: Vec<FrameSummary>,
}

struct OpenDamage {
    damage: Damage,
    /// State before the damaged slot, to roll back to if it is torn.
    builder: IndexBuilder,
    end: u64,
    generation: u32,
    frames: usize,
    slot_verified: bool,
    zeros: bool,
    /// Highest `durable_position` of a frame after the damage.
    proof: u64,
    frames_after: usize,
    last_end_after: u64,
}

/// Why a valid frame does not continue the log here, if it does not.
fn continuity_defect(
    frame: &WalkedFrame,
    builder: &IndexBuilder,
    generation: u32,
    raft_jump: RaftJump,
) -> Option<String> {
    if frame.slot.generation < generation {
        return Some(format!(
            "slot of generation {} after generation {generation}: left from an abandoned tail",
            frame.slot.generation
        ));
    }
    if frame.header.base_offset != builder.next_offset {
        return Some(format!(
            "frame with offset {} where offset {} was expected",
            frame.header.base_offset, builder.next_offset
        ));
    }
    let last_index = builder.last_log_id.index;
    let index = frame.header.raft_index;
    let jumps = match raft_jump {
        RaftJump::ToPurgePoint(purged) => purged > last_index && index == purged + 1,
        RaftJump::Forward => index > last_index,
    };
    // A repair's gap frame, or damage just stepped over, stands for the
    // entries lost there.
    let after_loss = builder.after_loss && index > last_index;
    if index != 0 && last_index != 0 && index != last_index + 1 && !jumps && !after_loss {
        return Some(format!(
            "frame with Raft index {} after Raft index {last_index}",
            frame.header.raft_index
        ));
    }
    None
}

/// Looks for the next slot after a damaged one where the log goes on: a
/// valid slot and frame of this generation or a later one, with offsets at
/// or after `offset`. Tries `known` first.
fn resynchronize(
    source: &mut dyn ByteSource,
    from: u64,
    known: Option<u64>,
    offset: u64,
    generation: u32,
    params: &WalkParams,
) -> Result<Option<WalkedFrame>> {
    let acceptable = |frame: &WalkedFrame| {
        frame.slot.generation >= generation && frame.header.base_offset >= offset
    };
    if let Some(candidate) = known {
        if candidate < source.end() {
            if let Slot::Frame(frame) =
                read_slot(source, candidate, params.salt_state, params.generation_max)?
            {
                if acceptable(&frame) {
                    return Ok(Some(frame));
                }
            }
        }
    }
    let limit = from
        .saturating_add(params.search_bytes)
        .min(source.end().saturating_sub(SLOT_HEADER_LENGTH as u64));
    let mut position = from + 1;
    while position <= limit {
        let window_end = (position + (1 << 20)).min(limit + SLOT_HEADER_LENGTH as u64);
        let window = source.get(position, (window_end - position) as usize)?;
        if window.iter().all(|byte| *byte == 0) {
            // Zeros hold no frame (a frame starts with a nonzero magic).
            if window.len() <= SLOT_HEADER_LENGTH {
                break;
            }
            position += (window.len() - SLOT_HEADER_LENGTH + 1) as u64;
            continue;
        }
        let mut index = 0usize;
        while index + SLOT_HEADER_LENGTH <= window.len() {
            if SlotHeader::decode(&window[index..], params.salt_state).is_some() {
                let candidate = position + index as u64;
                if let Slot::Frame(frame) =
                    read_slot(source, candidate, params.salt_state, params.generation_max)?
                {
                    if acceptable(&frame) {
                        return Ok(Some(frame));
                    }
                }
            }
            index += 1;
        }
        if window.len() <= SLOT_HEADER_LENGTH {
            break;
        }
        position += (window.len() - SLOT_HEADER_LENGTH + 1) as u64;
    }
    Ok(None)
}

/// Walks a segment from `start` to the end of its data and classifies what
/// it finds (see the module documentation).
pub(crate) fn walk(
    source: &mut dyn ByteSource,
    start: WalkStart,
    params: &WalkParams,
) -> Result<Walk> {
    let WalkStart {
        mut position,
        mut builder,
        mut generation,
    } = start;
    let mut frames: Vec<FrameSummary> = Vec::new();
    let mut open: Vec<OpenDamage> = Vec::new();
    let mut unsupported = None;
    let mut pending: Option<WalkedFrame> = None;
    loop {
        let slot = match pending.take() {
            Some(frame) => Slot::Frame(frame),
            None if position >= source.end() => break,
            None => read_slot(source, position, params.salt_state, params.generation_max)?,
        };
        if let (Some((offset, raft_index)), Slot::Frame(frame)) = (params.stop_at, &slot) {
            let header = &frame.header;
            let beyond = header.base_offset >= offset
                && (header.kind.takes_offsets()
                    || raft_index == 0
                    || header.raft_index == 0
                    || header.raft_index >= raft_index);
            if beyond {
                break;
            }
        }
        if params
            .stop_at
            .is_some_and(|(offset, _)| builder.next_offset >= offset)
            && !matches!(slot, Slot::Frame(_))
        {
            // The segment's data ended where the next segment begins.
            break;
        }
        let defect = match slot {
            Slot::Frame(frame) => {
                match continuity_defect(&frame, &builder, generation, params.raft_jump) {
                    None => {
                        builder.add(frame.position, &frame.header);
                        generation = generation.max(frame.slot.generation);
                        for damage in &mut open {
                            damage.proof = damage.proof.max(u64::from(frame.slot.durable_position));
                            damage.frames_after += 1;
                            damage.last_end_after = frame.end();
                        }
                        if params.collect_frames {
                            frames.push(FrameSummary {
                                position: frame.position,
                                slot: frame.slot,
                                header: frame.header,
                            });
                        }
                        position = frame.end();
                        continue;
                    }
                    Some(reason) => SlotDefect {
                        reason,
                        zeros: false,
                        slot_verified: false,
                        length: None,
                        unsupported: None,
                        intact_frame: None,
                    },
                }
            }
            Slot::Defect(defect) => defect,
        };
        if let Some(reason) = defect.unsupported {
            unsupported = Some((position, reason));
            break;
        }
        let known = defect.length.map(|length| position + length);
        let resumed = resynchronize(
            source,
            position,
            known,
            builder.next_offset,
            generation,
            params,
        )?;
        open.push(OpenDamage {
            damage: Damage {
                position,
                resume: resumed.as_ref().map(|frame| frame.position),
                reason: defect.reason,
                offset: builder.next_offset,
                resume_offset: resumed.as_ref().map(|frame| frame.header.base_offset),
                intact_frame: defect.intact_frame,
            },
            builder: builder.clone(),
            end: position,
            generation,
            frames: frames.len(),
            slot_verified: defect.slot_verified,
            zeros: defect.zeros,
            proof: 0,
            frames_after: 0,
            last_end_after: position,
        });
        match resumed {
            Some(frame) => {
                // The frames after a damaged slot continue the numbering of
                // the frame that resumes it.
                builder.skip_to(frame.header.base_offset);
                // The entries the damage held are lost too.
                builder.after_loss = true;
                position = frame.position;
                pending = Some(frame);
            }
            None => break,
        }
    }
    // A damage is proven durable by the floor or by a later frame that was
    // written after it had been synced. Proof only grows towards the start,
    // so the first unproven damage ends the data.
    let mut damages = Vec::new();
    let mut torn = None;
    // Without an unproven damage, the data ends where the walk stopped.
    let mut end = position;
    for candidate in open {
        let floor = if candidate.damage.resume.is_some() {
            params.durable_floor
        } else {
            params.end_floor
        };
        let proven =
            candidate.damage.position < floor || candidate.damage.position < candidate.proof;
        if proven {
            damages.push(candidate.damage);
            continue;
        }
        // Zeros after the last frame are where nothing was written yet;
        // anything else is a write the crash cut (or, in a recycled file,
        // its earlier contents).
        let data_follows =
            candidate.frames_after > 0 || candidate.slot_verified || !candidate.zeros;
        if data_follows {
            torn = Some(TornTail {
                position: candidate.damage.position,
                reason: candidate.damage.reason.clone(),
                frames_dropped: candidate.frames_after,
                end: candidate.last_end_after,
            });
        }
        builder = candidate.builder;
        end = candidate.end;
        generation = candidate.generation;
        frames.truncate(candidate.frames);
        break;
    }
    Ok(Walk {
        builder,
        end,
        damages,
        torn,
        unsupported,
        generation,
        frames,
    })
}
