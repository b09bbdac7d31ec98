//! Readers: iterate a stream from an offset or a time, optionally filtered
//! by a NATS subject pattern, in offset order, across segments, while
//! appends go on. A reader reads with `pread` into its own buffers and only
//! looks at whole frames below a segment's visible length, so it never
//! sees part of a batch and never faults on a file cut by another program;
//! it verifies every slot and frame checksum and reports damage as an error
//! naming the file and position. After a truncation, a reader that had
//! read past the cut fails with [`Error::Truncated`]; one before it goes
//! on, never reading bytes of the removed suffix.

use crate::error::{Error, Result};
use crate::format::frame::{check_frame, FrameCheck, FrameHeader};
use crate::format::record::{RecordIter, StoredRecord};
use crate::format::segment_header::SEGMENT_HEADER_LENGTH;
use crate::log::segment::StorageSegment;
use crate::log::walker::{read_slot, Slot};
use crate::log::{Log, SegmentSource, StoredFrame};
use crate::subject::SubjectPattern;
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::watch;

/// Where a reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest record still stored.
    Earliest,
    /// Only records appended after the reader is created.
    Latest,
    /// The record with this offset (or the next one stored).
    Offset(u64),
    /// The first record, in offset order, whose timestamp is >= this (ns).
    Time(i64),
}

/// All records of a checked frame, without keys (offline tools):
/// compressed frames decode, encrypted ones are reported as such.
pub(crate) fn decode_frame(
    header: &FrameHeader,
    frame: &Bytes,
) -> std::result::Result<Vec<StoredRecord>, String> {
    let plain_bytes_max =
        crate::config::StreamConfig::default().plain_body_bytes_max(header.record_count);
    crate::codec::frame_records(
        header,
        frame,
        &crate::codec::Keyring::default(),
        plain_bytes_max,
    )?
    .collect()
}

/// Checks and decodes one plain (not encrypted) frame received as bytes,
/// for example from a frames-mode replay. The body may be compressed; its
/// plain length may not exceed `plain_bytes_max` (the bytes are not
/// trusted, so allocation is bounded).
pub fn decode_frame_bytes(
    bytes: &[u8],
    plain_bytes_max: usize,
) -> std::result::Result<Vec<StoredRecord>, String> {
    let header = match check_frame(bytes) {
        FrameCheck::Valid(header) => header,
        FrameCheck::Defect(defect) => return Err(defect.to_string()),
        FrameCheck::Unsupported(reason) => return Err(reason),
    };
    if header.frame_length as usize != bytes.len() {
        return Err(format!(
            "frame says {} bytes but {} were received",
            header.frame_length,
            bytes.len()
        ));
    }
    if header.body_length_plain as usize > plain_bytes_max {
        return Err(format!(
            "frame body of {} bytes exceeds the limit of {plain_bytes_max}",
            header.body_length_plain
        ));
    }
    crate::codec::frame_records(
        &header,
        &Bytes::copy_from_slice(bytes),
        &crate::codec::Keyring::default(),
        plain_bytes_max,
    )?
    .collect()
}

/// An iterator over a stream. `next` never blocks: `Ok(None)` means the
/// reader has caught up; `wait` then resolves when more may be there.
pub struct Reader {
    log: Log,
    filter: Option<SubjectPattern>,
    segment: Option<Arc<StorageSegment>>,
    /// Bytes of the current segment read ahead, from `window_start`.
    window: Bytes,
    window_start: u64,
    position: u64,
    frame_position: u64,
    records: Option<RecordIter>,
    next_offset: u64,
    skip_before_time: Option<i64>,
    visible: watch::Receiver<u64>,
    /// The offset this reader stops before (a replicated stream's applied
    /// end: only committed records are read); `None`: every visible frame.
    ceiling: Option<watch::Receiver<u64>>,
    truncations: u64,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Reader")
            .field("stream", &self.log.name())
            .field("next_offset", &self.next_offset)
            .finish()
    }
}

/// Offset the next record appended to these segments gets.
fn end_offset(segments: &[Arc<StorageSegment>]) -> u64 {
    segments
        .last()
        .map_or(crate::stream::FIRST_OFFSET, |segment| segment.next_offset())
}

impl Reader {
    pub fn new(log: Log, start: StartPosition, filter: Option<SubjectPattern>) -> Result<Reader> {
        let visible = log.subscribe_visible();
        let truncations = log.truncations();
        let mut reader = Reader {
            log,
            filter,
            segment: None,
            window: Bytes::new(),
            window_start: 0,
            position: SEGMENT_HEADER_LENGTH as u64,
            frame_position: 0,
            records: None,
            next_offset: 0,
            skip_before_time: None,
            visible,
            ceiling: None,
            truncations,
        };
        let segments = reader.log.segments();
        match start {
            StartPosition::Earliest => {
                reader.next_offset = segments
                    .first()
                    .map_or(crate::stream::FIRST_OFFSET, |segment| segment.base_offset());
                reader.set_segment(segments.first().cloned(), SEGMENT_HEADER_LENGTH as u64);
            }
            StartPosition::Latest => reader.seek_offset(&segments, end_offset(&segments))?,
            StartPosition::Offset(offset) => reader.seek_offset(&segments, offset)?,
            StartPosition::Time(timestamp_ns) => {
                let index = segments
                    .partition_point(|segment| segment.timestamp_max_through() < timestamp_ns);
                match segments.get(index) {
                    Some(segment) => {
                        let position = segment.seek_time(reader.log.cache(), timestamp_ns)?;
                        reader.next_offset = segment.base_offset();
                        reader.set_segment(Some(Arc::clone(segment)), position);
                        reader.skip_before_time = Some(timestamp_ns);
                    }
                    None => reader.seek_offset(&segments, end_offset(&segments))?,
                }
            }
        }
        Ok(reader)
    }

    /// Reads only frames whose records all lie below `ceiling`'s offset:
    /// a replicated stream passes its applied end, so a reader never sees
    /// an entry before it is committed (one that Raft may still replace).
    pub fn with_ceiling(mut self, ceiling: watch::Receiver<u64>) -> Reader {
        self.ceiling = Some(ceiling);
        self
    }

    /// Whether a frame of records is above the ceiling (not committed).
    fn above_ceiling(&mut self, header: &crate::format::frame::FrameHeader) -> bool {
        self.ceiling.as_mut().is_some_and(|ceiling| {
            header.stored_records() > 0 && header.next_offset() > *ceiling.borrow_and_update()
        })
    }

    fn set_segment(&mut self, segment: Option<Arc<StorageSegment>>, position: u64) {
        self.segment = segment;
        self.window = Bytes::new();
        self.window_start = 0;
        self.position = position;
        self.records = None;
    }

    fn seek_offset(&mut self, segments: &[Arc<StorageSegment>], offset: u64) -> Result<()> {
        let index = segments
            .partition_point(|segment| segment.base_offset() <= offset)
            .saturating_sub(1);
        self.next_offset = offset;
        match segments.get(index) {
            Some(segment) => {
                let position = segment.seek_offset(self.log.cache(), offset)?;
                self.next_offset = offset.max(segment.base_offset());
                self.set_segment(Some(Arc::clone(segment)), position);
            }
            None => self.set_segment(None, SEGMENT_HEADER_LENGTH as u64),
        }
        Ok(())
    }

    /// The offset this reader looks at next.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// The next matching record, or `Ok(None)` when caught up.
    // Not `Iterator::next`: `Ok(None)` only means "caught up for now"; the
    // same reader returns more records after later appends.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<StoredRecord>> {
        // Records buffered from a frame a truncation removed are not handed
        // out.
        self.follow_truncation()?;
        loop {
            if let Some(records) = &mut self.records {
                let next_offset = self.next_offset;
                let skip_before_time = self.skip_before_time;
                let filter = self.filter.as_ref();
                // While looking for the first record at or after the start
                // time, every record at or after it counts, whatever its
                // subject; afterwards only the filter decides.
                let item = records.next_if(|offset, timestamp_ns, subject| {
                    offset >= next_offset
                        && match skip_before_time {
                            Some(time) => timestamp_ns >= time,
                            None => filter.is_none_or(|pattern| pattern.matches(subject)),
                        }
                });
                match item {
                    Some(Ok(Some(record))) => {
                        self.skip_before_time = None;
                        self.next_offset = record.offset + 1;
                        if self
                            .filter
                            .as_ref()
                            .is_none_or(|pattern| pattern.matches(&record.subject))
                        {
                            return Ok(Some(record));
                        }
                    }
                    Some(Ok(None)) => {
                        self.next_offset = self.next_offset.max(records.next_offset());
                    }
                    Some(Err(reason)) => return Err(self.damage(self.frame_position, reason)),
                    None => self.records = None,
                }
                continue;
            }
            if !self.next_frame()? {
                return Ok(None);
            }
        }
    }

    /// Repositions after a truncation of the log: fails if this reader had
    /// already read past the new end.
    fn follow_truncation(&mut self) -> Result<()> {
        let truncations = self.log.truncations();
        if truncations == self.truncations {
            return Ok(());
        }
        self.truncations = truncations;
        let segments = self.log.segments();
        let end = end_offset(&segments);
        if self.next_offset > end {
            return Err(Error::Truncated {
                stream: self.log.name().to_string(),
                next_offset: end,
                reader_offset: self.next_offset,
            });
        }
        self.seek_offset(&segments, self.next_offset)
    }

    /// Moves to the next frame holding records at or after `next_offset`
    /// (and, when starting by time, a timestamp at or after the start);
    /// `None` when caught up.
    fn locate_frame(&mut self) -> Result<Option<StoredFrame>> {
        loop {
            self.follow_truncation()?;
            let Some(segment) = self.segment.clone() else {
                let segments = self.log.segments();
                let Some(first) = segments.first() else {
                    return Ok(None);
                };
                self.seek_offset(&segments, self.next_offset.max(first.base_offset()))?;
                if self.segment.is_none() {
                    return Ok(None);
                }
                continue;
            };
            self.visible.borrow_and_update();
            let sealed = segment.is_sealed();
            let visible = segment.visible_length();
            if self.position >= visible {
                if !sealed || visible < segment.final_length() {
                    return Ok(None);
                }
                let segments = self.log.segments();
                let following = segments
                    .iter()
                    .find(|candidate| candidate.base_offset() > segment.base_offset());
                match following {
                    Some(next) => {
                        self.next_offset = self.next_offset.max(next.base_offset());
                        self.set_segment(Some(Arc::clone(next)), SEGMENT_HEADER_LENGTH as u64);
                        continue;
                    }
                    None => return Ok(None),
                }
            }
            let frame = match self.read_frame(&segment, visible) {
                Ok(frame) => frame,
                // Retention or a truncation removed the segment while this
                // reader was in it: go on from what is stored now, as a
                // reader starting now would.
                Err(error @ Error::SegmentRemoved { .. }) if segment.is_removed() => {
                    if self.log.truncations() != self.truncations {
                        continue;
                    }
                    let listed = self
                        .log
                        .segments()
                        .iter()
                        .any(|listed| Arc::ptr_eq(listed, &segment));
                    if listed {
                        // A truncation failed half way (the log is poisoned
                        // until a restart finishes it): nothing to go on to.
                        return Err(error);
                    }
                    self.set_segment(None, SEGMENT_HEADER_LENGTH as u64);
                    continue;
                }
                Err(error) => return Err(error),
            };
            let header = frame.header;
            if self.above_ceiling(&header) {
                // Read again once the ceiling moved past it.
                self.position = self.frame_position;
                return Ok(None);
            }
            if header.stored_records() == 0 || header.next_offset() <= self.next_offset {
                // Gaps of a repair and Raft entries hold no records.
                self.next_offset = self.next_offset.max(header.next_offset());
                continue;
            }
            if let Some(time) = self.skip_before_time {
                if header.last_timestamp_ns < time {
                    self.next_offset = header.next_offset();
                    continue;
                }
            }
            return Ok(Some(frame));
        }
    }

    /// Reads the slot and frame at `position` of `segment`.
    fn read_frame(&mut self, segment: &Arc<StorageSegment>, visible: u64) -> Result<StoredFrame> {
        let mut source = SegmentSource::with_window(
            segment,
            self.log.cache(),
            visible,
            self.window_start,
            std::mem::take(&mut self.window),
        );
        let position = self.position;
        let read = read_slot(&mut source, position, segment.salt_state(), u32::MAX);
        (self.window_start, self.window) = source.into_window();
        match read? {
            Slot::Frame(frame) => {
                self.frame_position = position;
                self.position = frame.end();
                Ok(StoredFrame {
                    header: frame.header,
                    bytes: frame.bytes,
                })
            }
            Slot::Defect(defect) => Err(self.damage(position, defect.reason)),
        }
    }

    /// Loads the next frame's records; false when caught up.
    fn next_frame(&mut self) -> Result<bool> {
        let Some(frame) = self.locate_frame()? else {
            return Ok(false);
        };
        self.check_key(&frame)?;
        let plain_bytes_max = self
            .log
            .config()
            .plain_body_bytes_max(frame.header.record_count);
        self.records = Some(
            crate::codec::frame_records(
                &frame.header,
                &frame.bytes,
                self.log.keyring(),
                plain_bytes_max,
            )
            .map_err(|reason| self.damage(self.frame_position, reason))?,
        );
        Ok(true)
    }

    /// Not damage: the bytes are fine, the key is missing. Say so, so
    /// nobody "repairs" (quarantines) intact data.
    fn check_key(&self, frame: &StoredFrame) -> Result<()> {
        let key_id = frame.header.key_id;
        if frame.is_encrypted() && self.log.keyring().get(key_id).is_none() {
            let segment = self.segment.as_ref();
            return Err(Error::KeyUnavailable {
                path: segment
                    .map(|segment| segment.path().to_path_buf())
                    .unwrap_or_default(),
                key_id,
                resume_offset: segment
                    .map_or(frame.header.next_offset(), |segment| segment.next_offset()),
            });
        }
        Ok(())
    }

    /// The next whole frame as stored (compressed and encrypted as on
    /// disk), for handing on without re-encoding: replay sends them after
    /// [`decrypt`](Reader::decrypt). The frame may begin before the
    /// reader's next offset (the caller skips those records); the subject
    /// filter does not apply to whole frames. `None` when caught up.
    pub fn next_stored_frame(&mut self) -> Result<Option<StoredFrame>> {
        self.follow_truncation()?;
        // Records of a partly consumed frame were already handed out.
        self.records = None;
        let Some(frame) = self.locate_frame()? else {
            return Ok(None);
        };
        self.skip_before_time = None;
        self.next_offset = self.next_offset.max(frame.header.next_offset());
        Ok(Some(frame))
    }

    /// `frame` with its body decrypted (still compressed if it was), as a
    /// valid plain frame; unchanged if it was not encrypted.
    pub fn decrypt(&self, frame: StoredFrame) -> Result<StoredFrame> {
        if !frame.is_encrypted() {
            return Ok(frame);
        }
        self.check_key(&frame)?;
        let (header, bytes) =
            crate::codec::decrypt_frame(&frame.header, &frame.bytes, self.log.keyring())
                .map_err(|reason| self.damage(self.frame_position, reason))?;
        Ok(StoredFrame { header, bytes })
    }

    fn damage(&self, position: u64, reason: String) -> Error {
        let path = self
            .segment
            .as_ref()
            .map(|segment| segment.path().to_path_buf())
            .unwrap_or_default();
        Error::corruption(path, position, reason)
    }

    /// Resolves when new records may be visible. Errors when the stream
    /// closed.
    pub async fn wait(&mut self) -> Result<()> {
        let changed = match &mut self.ceiling {
            Some(ceiling) => tokio::select! {
                changed = self.visible.changed() => changed,
                changed = ceiling.changed() => changed,
            },
            None => self.visible.changed().await,
        };
        changed.map_err(|_| Error::Closed {
            stream: self.log.name().to_string(),
        })
    }
}
