//! One Raft entry is one frame in the stream's segments: this module maps
//! between the two, both ways, and nothing else does.
//!
//! - blank entry      <-> blank frame (no records, no offsets);
//! - membership entry <-> opaque frame whose body is [`crate::membership`];
//! - normal entry     <-> records frame. A leader's proposal
//!   ([`Command::Records`]) is encoded into a frame by the engine when it is
//!   appended; read back, every normal entry is [`Command::Stored`], the
//!   frame's bytes exactly as on disk, which followers append verbatim.
//!
//! Invariant: the frame header's (term, index) is the entry's log id (index
//! shifted by one, see [`crate::types::frame_raft_index`]); a stored frame
//! whose header disagrees with the entry carrying it is refused.

use crate::error::{Error, Result};
use crate::membership::{decode_membership, encode_membership};
use crate::types::{log_id_of_frame, Command, Entry, LogId};
use natswal::format::frame::{FrameBuilder, FrameHeader, FrameKind, FRAME_HEADER_LENGTH};
use natswal::log::writer::{AppendMeta, Appended};
use natswal::{Log, StoredFrame};
use openraft::entry::RaftEntry;
use openraft::EntryPayload;

/// Appends one entry to the log (durable after the next sync).
pub fn append_entry(
    log: &Log,
    entry: &Entry,
    builder: &mut FrameBuilder,
    now_ns: i64,
) -> Result<Appended> {
    let term = entry.log_id.leader_id.term;
    let raft_index = crate::types::frame_raft_index(entry.log_id.index);
    let engine = |error| Error::engine(log.name(), error);
    match &entry.payload {
        EntryPayload::Blank => log
            .append_raft_entry(FrameKind::Blank, term, raft_index, &[], now_ns)
            .map_err(engine),
        EntryPayload::Membership(membership) => {
            let body = encode_membership(membership);
            log.append_raft_entry(FrameKind::Opaque, term, raft_index, &body, now_ns)
                .map_err(engine)
        }
        EntryPayload::Normal(Command::Records(batch)) => {
            if batch.records.is_empty() {
                return Err(Error::Invalid(format!(
                    "entry {} proposes no records",
                    entry.log_id
                )));
            }
            builder.begin();
            for proposed in &batch.records {
                let record = proposed.to_record();
                record.check_lengths().map_err(Error::Invalid)?;
                let timestamp_ns = if record.timestamp_ns == 0 {
                    now_ns
                } else {
                    record.timestamp_ns
                };
                builder.push(&record, timestamp_ns);
            }
            let meta = AppendMeta {
                atomic: batch.atomic,
                raft_term: term,
                raft_index,
            };
            log.append(builder, meta, now_ns).map_err(engine)
        }
        EntryPayload::Normal(Command::Stored(bytes)) => {
            let header = stored_header(bytes)?;
            if header.raft_term != term || header.raft_index != raft_index {
                return Err(Error::Invalid(format!(
                    "stored frame carries Raft id ({}, {}) but travels as entry {}",
                    header.raft_term, header.raft_index, entry.log_id
                )));
            }
            log.append_stored(bytes, now_ns).map_err(engine)
        }
    }
}

fn stored_header(bytes: &[u8]) -> Result<FrameHeader> {
    if bytes.len() < FRAME_HEADER_LENGTH {
        return Err(Error::Format(format!(
            "stored frame of {} bytes is shorter than a frame header ({FRAME_HEADER_LENGTH})",
            bytes.len()
        )));
    }
    match natswal::format::frame::check_header(bytes) {
        natswal::format::frame::FrameCheck::Valid(header) => Ok(header),
        other => Err(Error::Format(format!(
            "stored frame header is not valid: {other:?}"
        ))),
    }
}

/// The entry a stored frame holds.
pub fn entry_of_frame(stream: &str, frame: StoredFrame) -> Result<Entry> {
    let header = frame.header;
    let log_id: LogId = log_id_of_frame(natswal::format::metadata::LogId {
        term: header.raft_term,
        index: header.raft_index,
    })
    .ok_or_else(|| {
        Error::Invalid(format!(
            "stream '{stream}': frame at offset {} has no Raft index",
            header.base_offset
        ))
    })?;
    let payload = match header.kind {
        FrameKind::Blank => EntryPayload::Blank,
        FrameKind::Opaque => {
            let body = &frame.bytes[FRAME_HEADER_LENGTH..];
            let membership = decode_membership(body).map_err(|error| {
                Error::Format(format!("stream '{stream}': entry {log_id}: {error}"))
            })?;
            EntryPayload::Membership(membership)
        }
        FrameKind::Records | FrameKind::Gap => EntryPayload::Normal(Command::Stored(frame.bytes)),
    };
    Ok(Entry::new(log_id, payload))
}
