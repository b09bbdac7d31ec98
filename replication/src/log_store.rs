//! openraft's log storage over a stream's [`Log`]: the Raft log is the
//! WAL, so this module only translates. It owns no file of its own.
//!
//! - `append` writes each entry as one frame ([`crate::entry`]) and hands
//!   the flush callback to the group's [`Syncer`], which fires it only
//!   after a sync of the log covered those frames;
//! - `save_vote` returns after the vote is in the metadata file (atomic,
//!   synced), `save_committed` is saved by the syncer in the background (a
//!   stale commit index on disk is only a lower bound, never wrong);
//! - `purge` is logical: it saves the purge point and hides the entries at
//!   or below it, while the frames stay for retention to remove; purging
//!   past the last entry is allowed and the next entry follows the point;
//! - `truncate_after` cuts the log online and crash-atomically (engine).
//!
//! Reads never return a short range: the engine returns every frame asked
//! for or an error.

use crate::entry::{append_entry, entry_of_frame};
use crate::error::Error;
use crate::syncer::Syncer;
use crate::types::{
    frame_log_id, frame_raft_index, log_id_of_frame, Entry, LogId, StreamRaft, Vote,
};
use natswal::format::frame::FrameBuilder;
use natswal::format::metadata::Vote as FrameVote;
use natswal::log::writer::now_ns;
use natswal::log::FrameRange;
use natswal::Log;
use openraft::impls::leader_id_std::LeaderId;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

/// The log storage of one replicated stream.
pub struct StreamLogStore {
    log: Arc<Log>,
    syncer: Arc<Syncer>,
    builder: FrameBuilder,
}

impl StreamLogStore {
    pub fn new(log: Arc<Log>) -> StreamLogStore {
        let syncer = Arc::new(Syncer::start(Arc::clone(&log)));
        StreamLogStore {
            log,
            syncer,
            builder: FrameBuilder::new(),
        }
    }

    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }
}

/// Reads entries and the vote; cheap to clone (openraft keeps one per
/// replication stream).
#[derive(Clone)]
pub struct StreamLogReader {
    log: Arc<Log>,
}

fn engine_io(log: &Log, error: natswal::Error) -> io::Error {
    Error::engine(log.name(), error).into_io()
}

/// The last purged id and the last entry's id, in openraft's terms. The
/// last id is never below the purge point (a purge past the end moves it).
fn log_state(log: &Log) -> (Option<LogId>, Option<LogId>) {
    let purged = log.metadata().last_purged.and_then(log_id_of_frame);
    let last = log_id_of_frame(log.written().last_log_id);
    let last = match (&purged, last) {
        (Some(purged), Some(last)) if purged.index >= last.index => Some(*purged),
        (Some(purged), None) => Some(*purged),
        (_, last) => last,
    };
    (purged, last)
}

/// The frame Raft index of the log's first stored entry (0 if none).
pub(crate) fn first_stored_frame_index(log: &Log) -> u64 {
    log.segments()
        .iter()
        .map(|segment| segment.first_raft_index())
        .find(|index| *index != 0)
        .unwrap_or(0)
}

fn read_entries(log: &Log, start: u64, end: u64) -> io::Result<Vec<Entry>> {
    let (purged, last) = log_state(log);
    // A log may begin past index 0 (a follower that started from a
    // snapshot) and entries at or below the purge point are hidden.
    let first_kept = purged.map_or(0, |purged| purged.index + 1);
    let first_kept = first_kept.max(first_stored_frame_index(log).saturating_sub(1));
    let end = end.min(last.map_or(0, |last| last.index + 1));
    let start = start.max(first_kept);
    if start >= end {
        return Ok(Vec::new());
    }
    let frames = log
        .read_frames(FrameRange::RaftIndex {
            start: frame_raft_index(start),
            end: frame_raft_index(end),
        })
        .map_err(|error| engine_io(log, error))?;
    let entries = frames
        .into_iter()
        .map(|frame| entry_of_frame(log.name(), frame))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::into_io)?;
    if entries.len() as u64 != end - start {
        return Err(Error::Invalid(format!(
            "stream '{}': entries {start}..{end} asked, {} read",
            log.name(),
            entries.len()
        ))
        .into_io());
    }
    Ok(entries)
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(start) => *start,
        Bound::Excluded(start) => start.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(end) => end.saturating_add(1),
        Bound::Excluded(end) => *end,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

fn read_vote(log: &Log) -> Option<Vote> {
    log.metadata().vote.map(|vote| Vote {
        leader_id: LeaderId {
            term: vote.term,
            voted_for: vote.node_id,
        },
        committed: vote.committed,
    })
}

impl RaftLogReader<StreamRaft> for StreamLogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        read_entries(&self.log, start, end)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(read_vote(&self.log))
    }
}

impl RaftLogReader<StreamRaft> for StreamLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        read_entries(&self.log, start, end)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(read_vote(&self.log))
    }
}

impl RaftLogStorage<StreamRaft> for StreamLogStore {
    type LogReader = StreamLogReader;

    async fn get_log_state(&mut self) -> Result<LogState<StreamRaft>, io::Error> {
        let (last_purged_log_id, last_log_id) = log_state(&self.log);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        StreamLogReader {
            log: Arc::clone(&self.log),
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let vote = FrameVote {
            term: vote.leader_id.term,
            node_id: vote.leader_id.voted_for,
            committed: vote.committed,
        };
        self.log
            .save_vote(vote)
            .map_err(|error| engine_io(&self.log, error))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.syncer
            .save_committed(committed.as_ref().map(frame_log_id));
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.syncer.committed().and_then(log_id_of_frame))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<StreamRaft>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let now_ns = now_ns();
        for entry in entries {
            append_entry(&self.log, &entry, &mut self.builder, now_ns).map_err(Error::into_io)?;
        }
        self.syncer.flush(callback);
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let keep_through = last_log_id.map_or(0, |id| frame_raft_index(id.index));
        let (purged, _) = log_state(&self.log);
        if let Some(purged) = purged {
            if keep_through < frame_raft_index(purged.index) {
                return Err(Error::Invalid(format!(
                    "stream '{}': truncating after {keep_through} would cut purged entries (through {purged})",
                    self.log.name()
                ))
                .into_io());
            }
        }
        self.log
            .truncate_after(keep_through)
            .map(|_| ())
            .map_err(|error| engine_io(&self.log, error))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let (purged, _) = log_state(&self.log);
        if purged.is_some_and(|purged| purged.index >= log_id.index) {
            return Ok(());
        }
        self.log
            .save_purged(frame_log_id(&log_id))
            .map_err(|error| engine_io(&self.log, error))
    }
}
