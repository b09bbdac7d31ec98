//! IndexBuilder: accumulates a segment's sparse index entries and its
//! statistics (offsets, records, timestamps, Raft ids) frame by frame, for
//! the writer, the walker and index rebuilds alike.

use crate::format::frame::{FrameHeader, FrameKind};
use crate::format::index::{IndexEntry, IndexHeader};
use crate::format::metadata::LogId;

/// Published progress of a segment: what readers may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentProgress {
    /// Bytes of whole slots and frames, segment header included.
    pub length: u64,
    pub next_offset: u64,
    pub record_count: u64,
    pub first_timestamp_ns: i64,
    pub last_timestamp_ns: i64,
    /// Raft index of the segment's first frame (0: none or standalone).
    pub first_raft_index: u64,
    pub last_log_id: LogId,
}

#[derive(Debug, Clone)]
pub(crate) struct IndexBuilder {
    pub base_offset: u64,
    pub interval_bytes: u64,
    pub entries: Vec<IndexEntry>,
    pub next_offset: u64,
    pub record_count: u64,
    pub first_timestamp_ns: i64,
    pub timestamp_max: i64,
    pub first_raft_index: u64,
    pub last_log_id: LogId,
    /// Raft entries are missing here (the last frame added was a repair's
    /// gap frame, or the walk just stepped over damage): the next entry may
    /// jump forward.
    pub after_loss: bool,
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
            first_raft_index: 0,
            last_log_id: LogId::default(),
            after_loss: false,
            last_entry_position: None,
        }
    }

    /// Resumes from a checkpoint.
    pub fn resume(
        header: &IndexHeader,
        entries: Vec<IndexEntry>,
        interval_bytes: u64,
    ) -> IndexBuilder {
        let progress = progress_of(header);
        IndexBuilder {
            base_offset: header.base_offset,
            interval_bytes,
            last_entry_position: entries.last().map(|entry| u64::from(entry.position)),
            entries,
            next_offset: progress.next_offset,
            record_count: progress.record_count,
            first_timestamp_ns: progress.first_timestamp_ns,
            timestamp_max: progress.last_timestamp_ns,
            first_raft_index: progress.first_raft_index,
            last_log_id: progress.last_log_id,
            after_loss: false,
        }
    }

    /// Adds the frame whose slot starts at `position`; returns the index
    /// entry if one was made for it.
    pub fn add(&mut self, position: u64, header: &FrameHeader) -> Option<IndexEntry> {
        let due = match self.last_entry_position {
            None => true,
            Some(last) => position >= last + self.interval_bytes,
        };
        if header.raft_index != 0 && self.first_raft_index == 0 {
            self.first_raft_index = header.raft_index;
        }
        let entry = due.then(|| IndexEntry {
            relative_offset: (header.base_offset - self.base_offset) as u32,
            position: position as u32,
            timestamp_max_before: self.timestamp_max,
            relative_raft_index: header.raft_index.saturating_sub(self.first_raft_index) as u32,
        });
        if let Some(entry) = entry {
            self.entries.push(entry);
            self.last_entry_position = Some(position);
        }
        let records = header.stored_records();
        if records > 0 {
            if self.record_count == 0 {
                self.first_timestamp_ns = header.first_timestamp_ns;
            }
            self.record_count += u64::from(records);
            self.timestamp_max = self.timestamp_max.max(header.last_timestamp_ns);
        }
        if header.kind == FrameKind::Gap {
            self.after_loss = true;
        }
        if header.raft_index != 0 {
            self.after_loss = false;
            self.last_log_id = LogId {
                term: header.raft_term,
                index: header.raft_index,
            };
        }
        self.next_offset = header.next_offset();
        entry
    }

    /// Offsets up to `offset` are lost (a damage the walk stepped over).
    pub fn skip_to(&mut self, offset: u64) {
        self.next_offset = self.next_offset.max(offset);
    }

    pub fn header(&self, data_length: u64, salt: u64) -> IndexHeader {
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
            salt,
            first_raft_index: self.first_raft_index,
            last_raft_term: self.last_log_id.term,
            last_raft_index: self.last_log_id.index,
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
            first_raft_index: self.first_raft_index,
            last_log_id: self.last_log_id,
        }
    }
}

/// Progress as an index header describes it.
pub(crate) fn progress_of(index: &IndexHeader) -> SegmentProgress {
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
        first_raft_index: index.first_raft_index,
        last_log_id: LogId {
            term: index.last_raft_term,
            index: index.last_raft_index,
        },
    }
}
