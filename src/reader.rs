//! Readers: iterate a stream from an offset or a time, optionally filtered
//! by a NATS subject pattern, in offset order, across segments, while
//! appends go on. A reader only sees whole, checksummed frames below the
//! published (visible) length, so it never sees part of a batch; it verifies
//! each frame's CRC and reports damage as an error naming file and position.

use crate::error::{Error, Result};
use crate::format::frame::{check_frame, FrameCheck, FrameHeader};
use crate::format::record::{RecordIter, StoredRecord};
use crate::format::segment_header::SEGMENT_HEADER_LENGTH;
use crate::segment::storage::StorageSegment;
use crate::stream::StreamShared;
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

/// All records of a checked frame.
pub(crate) fn decode_frame(
    header: &FrameHeader,
    frame: &Bytes,
) -> std::result::Result<Vec<StoredRecord>, String> {
    // Offline callers have no keys: compressed frames decode, encrypted
    // ones are reported as such.
    crate::codec::frame_records(
        header,
        frame,
        &crate::codec::Keyring::default(),
        crate::codec::SegmentKey::default(),
    )?
    .collect()
}

/// One frame exactly as stored: its checked header, its bytes (header
/// included) and the key of the segment it is in.
#[derive(Debug, Clone)]
pub struct StoredFrame {
    pub header: FrameHeader,
    pub bytes: Bytes,
    pub segment_key: crate::codec::SegmentKey,
}

impl StoredFrame {
    pub fn is_encrypted(&self) -> bool {
        self.header.flags & crate::format::frame::flags::ENCRYPTED != 0
    }

    pub fn is_compressed(&self) -> bool {
        self.header.flags & crate::format::frame::flags::COMPRESSION_MASK != 0
    }
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
    decode_frame(&header, &Bytes::copy_from_slice(bytes))
}

/// An iterator over a stream. `next` never blocks: `Ok(None)` means the
/// reader has caught up; `wait` then resolves when more may be there.
pub struct Reader {
    shared: Arc<StreamShared>,
    filter: Option<SubjectPattern>,
    segment: Option<Arc<StorageSegment>>,
    /// Key of the current segment, read from its header on first use.
    segment_key: Option<crate::codec::SegmentKey>,
    window: Bytes,
    position: u64,
    frame_position: u64,
    records: Option<RecordIter>,
    next_offset: u64,
    skip_before_time: Option<i64>,
    visible: watch::Receiver<u64>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Reader")
            .field("stream", &self.shared.name)
            .field("next_offset", &self.next_offset)
            .finish()
    }
}

impl Reader {
    pub(crate) fn new(
        shared: Arc<StreamShared>,
        start: StartPosition,
        filter: Option<SubjectPattern>,
    ) -> Result<Reader> {
        let visible = shared.visible.subscribe();
        let mut reader = Reader {
            shared,
            filter,
            segment: None,
            window: Bytes::new(),
            position: SEGMENT_HEADER_LENGTH as u64,
            frame_position: 0,
            records: None,
            next_offset: 0,
            skip_before_time: None,
            visible,
            segment_key: None,
        };
        let segments = reader.shared.segments_snapshot();
        match start {
            StartPosition::Earliest => {
                reader.next_offset = segments
                    .first()
                    .map_or(crate::stream::FIRST_OFFSET, |segment| segment.base_offset());
                reader.segment = segments.first().cloned();
            }
            StartPosition::Latest => {
                let next = segments
                    .last()
                    .map_or(crate::stream::FIRST_OFFSET, |segment| segment.next_offset());
                reader.seek_offset(&segments, next)?;
            }
            StartPosition::Offset(offset) => reader.seek_offset(&segments, offset)?,
            StartPosition::Time(timestamp_ns) => {
                let index = segments
                    .partition_point(|segment| segment.timestamp_max_through() < timestamp_ns);
                match segments.get(index) {
                    Some(segment) => {
                        reader.position = segment.seek_time(&reader.shared.cache, timestamp_ns)?;
                        reader.next_offset = segment.base_offset();
                        reader.segment = Some(Arc::clone(segment));
                        reader.skip_before_time = Some(timestamp_ns);
                    }
                    None => {
                        let next = segments
                            .last()
                            .map_or(crate::stream::FIRST_OFFSET, |segment| segment.next_offset());
                        reader.seek_offset(&segments, next)?;
                    }
                }
            }
        }
        Ok(reader)
    }

    fn seek_offset(&mut self, segments: &[Arc<StorageSegment>], offset: u64) -> Result<()> {
        let index = segments
            .partition_point(|segment| segment.base_offset() <= offset)
            .saturating_sub(1);
        self.next_offset = offset;
        if let Some(segment) = segments.get(index) {
            self.position = segment.seek_offset(&self.shared.cache, offset)?;
            self.next_offset = offset.max(segment.base_offset());
            self.segment = Some(Arc::clone(segment));
            self.segment_key = None;
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

    /// Moves to the next frame holding offsets at or after `next_offset`
    /// (and, when starting by time, a timestamp at or after the start);
    /// `None` when caught up.
    fn locate_frame(&mut self) -> Result<Option<StoredFrame>> {
        loop {
            let Some(segment) = self.segment.clone() else {
                let segments = self.shared.segments_snapshot();
                let Some(first) = segments.first() else {
                    return Ok(None);
                };
                self.seek_offset(&segments, self.next_offset.max(first.base_offset()))?;
                if self.segment.is_none() {
                    return Ok(None);
                }
                continue;
            };
            if self.position >= self.window.len() as u64 {
                self.visible.borrow_and_update();
                let sealed = segment.is_sealed();
                let visible = segment.visible_length();
                if visible > self.window.len() as u64 {
                    match segment.visible_bytes(&self.shared.cache) {
                        Ok(window) => self.window = window,
                        // Retention deleted the segment before this reader
                        // mapped it (a reader holding the map reads on): its
                        // records are gone, so go on from the oldest record
                        // still stored, as a reader starting now would.
                        Err(_) if self.is_deleted(&segment) => {
                            self.segment = None;
                            self.segment_key = None;
                            self.window = Bytes::new();
                            self.position = SEGMENT_HEADER_LENGTH as u64;
                        }
                        Err(error) => return Err(error),
                    }
                    continue;
                }
                if !sealed || (self.window.len() as u64) < segment.final_length() {
                    return Ok(None);
                }
                let segments = self.shared.segments_snapshot();
                let following = segments
                    .iter()
                    .find(|candidate| candidate.base_offset() > segment.base_offset());
                match following {
                    Some(next) => {
                        self.segment = Some(Arc::clone(next));
                        self.segment_key = None;
                        self.window = Bytes::new();
                        self.position = SEGMENT_HEADER_LENGTH as u64;
                        self.next_offset = self.next_offset.max(next.base_offset());
                        continue;
                    }
                    None => return Ok(None),
                }
            }
            let position = self.position as usize;
            let header = match check_frame(&self.window[position..]) {
                FrameCheck::Valid(header) => header,
                FrameCheck::Defect(defect) => {
                    return Err(self.damage(self.position, defect.to_string()))
                }
                FrameCheck::Unsupported(reason) => return Err(self.damage(self.position, reason)),
            };
            let frame = self
                .window
                .slice(position..position + header.frame_length as usize);
            self.frame_position = self.position;
            self.position += u64::from(header.frame_length);
            if header.next_offset() <= self.next_offset {
                continue;
            }
            if let Some(time) = self.skip_before_time {
                if header.last_timestamp_ns < time {
                    self.next_offset = header.next_offset();
                    continue;
                }
            }
            if self.segment_key.is_none() {
                let header = crate::format::segment_header::SegmentHeader::decode(
                    &self.window,
                    segment.path(),
                )?;
                self.segment_key = Some(crate::codec::SegmentKey {
                    key_id: header.key_id,
                    cipher: header.cipher,
                });
            }
            return Ok(Some(StoredFrame {
                header,
                bytes: frame,
                segment_key: self.segment_key.unwrap_or_default(),
            }));
        }
    }

    /// Loads the next frame's records; false when caught up.
    fn next_frame(&mut self) -> Result<bool> {
        let Some(frame) = self.locate_frame()? else {
            return Ok(false);
        };
        self.check_key(&frame)?;
        self.records = Some(
            crate::codec::frame_records(
                &frame.header,
                &frame.bytes,
                &self.shared.keyring,
                frame.segment_key,
            )
            .map_err(|reason| self.damage(self.frame_position, reason))?,
        );
        Ok(true)
    }

    /// Not damage: the bytes are fine, the key is missing. Say so, so
    /// nobody "repairs" (quarantines) intact data.
    fn check_key(&self, frame: &StoredFrame) -> Result<()> {
        let key_id = frame.segment_key.key_id;
        if frame.is_encrypted() && key_id != 0 && self.shared.keyring.get(key_id).is_none() {
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
    /// disk), for handing on without re-encoding: replication ships these,
    /// replay sends them after [`decrypt`](Reader::decrypt). The frame may
    /// begin before the reader's next offset (the caller skips those
    /// records); the subject filter does not apply to whole frames. `None`
    /// when caught up.
    pub fn next_stored_frame(&mut self) -> Result<Option<StoredFrame>> {
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
        let (header, bytes) = crate::codec::decrypt_frame(
            &frame.header,
            &frame.bytes,
            &self.shared.keyring,
            frame.segment_key,
        )
        .map_err(|reason| self.damage(self.frame_position, reason))?;
        Ok(StoredFrame {
            header,
            bytes,
            segment_key: crate::codec::SegmentKey::default(),
        })
    }

    /// True once retention removed `segment` from the stream (it does so
    /// before deleting the files).
    fn is_deleted(&self, segment: &Arc<StorageSegment>) -> bool {
        !self
            .shared
            .segments_snapshot()
            .iter()
            .any(|listed| Arc::ptr_eq(listed, segment))
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
        self.visible.changed().await.map_err(|_| Error::Closed {
            stream: self.shared.name.clone(),
        })
    }
}
