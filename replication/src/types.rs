//! The Raft type configuration of a replicated stream and the two ends of
//! a proposal: what a leader proposes ([`Command`]) and what applying it
//! answers ([`Applied`]).
//!
//! A log id is exactly the (term, index) of a frame header:
//! `leader_id_std` makes a committed leader id the term alone. openraft
//! counts entries from index 0 (the first membership entry); frame headers
//! use Raft index 0 for "no Raft entry" (a standalone stream), so a frame
//! stores `index + 1` (see [`frame_raft_index`]).

use bytes::Bytes;
use natswal::format::metadata::LogId as FrameLogId;
use natswal::Record;
use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// One replicated stream's Raft group.
    pub StreamRaft:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = openraft::impls::BasicNode,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

pub type NodeId = u64;
pub type Node = openraft::impls::BasicNode;
pub type Entry = <StreamRaft as openraft::RaftTypeConfig>::Entry;
pub type LogId = openraft::type_config::alias::LogIdOf<StreamRaft>;
pub type Vote = openraft::type_config::alias::VoteOf<StreamRaft>;
pub type CommittedLeaderId = openraft::type_config::alias::CommittedLeaderIdOf<StreamRaft>;
pub type Membership = openraft::Membership<NodeId, Node>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<StreamRaft>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<StreamRaft>;
pub type Raft = openraft::Raft<StreamRaft, crate::state_machine::StreamStateMachine>;

/// The Raft index a frame header stores for openraft's `index`.
pub fn frame_raft_index(index: u64) -> u64 {
    index + 1
}

/// openraft's log id of a frame's (term, index); `None` for index 0
/// (no entry).
pub fn log_id_of_frame(id: FrameLogId) -> Option<LogId> {
    if id.index == 0 {
        return None;
    }
    Some(LogId::new(CommittedLeaderId::new(id.term), id.index - 1))
}

/// The frame (term, index) of openraft's log id.
pub fn frame_log_id(id: &LogId) -> FrameLogId {
    FrameLogId {
        term: id.leader_id.term,
        index: frame_raft_index(id.index),
    }
}

/// What an entry of normal payload holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Records proposed on the leader; the log store encodes them into one
    /// frame when it appends the entry (the log assigns their offsets).
    Records(RecordBatch),
    /// A frame exactly as a leader stored it: what reading the log returns
    /// and what followers receive and append without re-encoding.
    Stored(Bytes),
}

/// Records proposed together: one frame, one Raft entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RecordBatch {
    /// All or nothing (an atomic batch).
    pub atomic: bool,
    pub records: Vec<ProposedRecord>,
}

/// One record of a proposal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ProposedRecord {
    pub timestamp_ns: i64,
    pub subject: Bytes,
    pub headers: Bytes,
    pub payload: Bytes,
}

impl ProposedRecord {
    /// Bytes it takes inside a plain frame body (as [`Record::encoded_length`]).
    pub fn encoded_length(&self) -> usize {
        natswal::format::record::RECORD_OVERHEAD
            + self.subject.len()
            + self.headers.len()
            + self.payload.len()
    }

    pub fn to_record(&self) -> Record {
        Record {
            timestamp_ns: self.timestamp_ns,
            subject: self.subject.clone(),
            headers: self.headers.clone(),
            payload: self.payload.clone(),
        }
    }
}

impl From<Record> for ProposedRecord {
    fn from(record: Record) -> ProposedRecord {
        ProposedRecord {
            timestamp_ns: record.timestamp_ns,
            subject: record.subject,
            headers: record.headers,
            payload: record.payload,
        }
    }
}

/// What applying an entry answers: the offsets its records took (empty for
/// entries without records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Applied {
    pub base_offset: u64,
    pub next_offset: u64,
}

impl std::fmt::Display for Command {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Records(batch) => write!(formatter, "records({})", batch.records.len()),
            Command::Stored(bytes) => write!(formatter, "stored({} bytes)", bytes.len()),
        }
    }
}
