//! A snapshot of a replicated stream is a manifest, not a copy: the log is
//! the state, so the manifest names the sealed segments (with their CRCs)
//! that hold the entries through `last_log_id`, and how far the entries
//! beyond them (in the active segment) go. The manifest file is written
//! atomically (temp file, fsync, rename, fsync dir) and by hand:
//!
//! ```text
//! 8   magic "NWSNAP01"
//! 4   crc32c of everything after this field
//! 4   body length
//! 16  last log id: term, frame Raft index (0 = none)
//! 8   next offset: the offset after the last record through that id
//! 16  membership log id: term, frame Raft index (0 = none)
//! 4   membership length, then the membership body (crate::membership)
//! 4   segment count, then per segment:
//!     8 base offset, 8 next offset, 8 length, 4 crc32c,
//!     8 first frame Raft index, 8 last term, 8 last frame Raft index
//! ```
//! Little-endian. A damaged manifest is an error that names the file,
//! never an empty state: the node refuses to start that stream rather than
//! forget what it applied.

use crate::error::{Error, Result};
use crate::membership::{decode_membership, encode_membership};
use crate::types::{frame_log_id, log_id_of_frame, LogId, StoredMembership};
use natswal::format::metadata::LogId as FrameLogId;
use natswal::SealedSegment;
use std::path::{Path, PathBuf};

pub const SNAPSHOT_FILE_NAME: &str = "raft-snapshot";
const MAGIC: &[u8; 8] = b"NWSNAP01";
const SEGMENTS_MAX: u32 = 1 << 20;

/// What a snapshot holds: the entries through `last_log_id`, as sealed
/// segments plus the frames after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotManifest {
    pub last_log_id: Option<LogId>,
    /// The offset after the last record through `last_log_id`: a log that
    /// lacks those entries but has this next offset lacks no record.
    pub next_offset: u64,
    pub membership: StoredMembership,
    /// Sealed segments in offset order; their entries end at or before
    /// `last_log_id` and the frames after the last one are read from the
    /// leader's log.
    pub segments: Vec<SealedSegment>,
}

fn put_log_id(out: &mut Vec<u8>, id: Option<&LogId>) {
    let frame = id.map(frame_log_id).unwrap_or_default();
    out.extend_from_slice(&frame.term.to_le_bytes());
    out.extend_from_slice(&frame.index.to_le_bytes());
}

impl SnapshotManifest {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        put_log_id(&mut body, self.last_log_id.as_ref());
        body.extend_from_slice(&self.next_offset.to_le_bytes());
        put_log_id(&mut body, self.membership.log_id().as_ref());
        let membership = encode_membership(self.membership.membership());
        body.extend_from_slice(&(membership.len() as u32).to_le_bytes());
        body.extend_from_slice(&membership);
        body.extend_from_slice(&(self.segments.len() as u32).to_le_bytes());
        for segment in &self.segments {
            for value in [segment.base_offset, segment.next_offset, segment.length] {
                body.extend_from_slice(&value.to_le_bytes());
            }
            body.extend_from_slice(&segment.crc32c.to_le_bytes());
            for value in [
                segment.first_raft_index,
                segment.last_log_id.term,
                segment.last_log_id.index,
            ] {
                body.extend_from_slice(&value.to_le_bytes());
            }
        }
        let mut out = MAGIC.to_vec();
        let mut checked = (body.len() as u32).to_le_bytes().to_vec();
        checked.extend_from_slice(&body);
        out.extend_from_slice(&crc32c::crc32c(&checked).to_le_bytes());
        out.extend_from_slice(&checked);
        out
    }

    /// Decodes a manifest read from `path` (segment paths are resolved in
    /// `directory`).
    pub fn decode(bytes: &[u8], path: &Path, directory: &Path) -> Result<SnapshotManifest> {
        let damaged = |reason: String| {
            Error::Format(format!(
                "snapshot manifest {} is damaged: {reason}; the stream is not started (restore the file or re-add this node as a new learner)",
                path.display()
            ))
        };
        if bytes.len() < 16 || &bytes[..8] != MAGIC {
            return Err(damaged("no manifest magic".to_string()));
        }
        let crc = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if crc32c::crc32c(&bytes[12..]) != crc {
            return Err(damaged("checksum mismatch".to_string()));
        }
        let length = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
        let body = &bytes[16..];
        if body.len() != length {
            return Err(damaged(format!(
                "body is {} bytes, header says {length}",
                body.len()
            )));
        }
        let mut reader = ManifestReader { bytes: body };
        let last_log_id = reader.log_id().map_err(damaged)?;
        let next_offset = reader.u64().map_err(damaged)?;
        let membership_log_id = reader.log_id().map_err(damaged)?;
        let membership_length = reader.u32().map_err(damaged)? as usize;
        let membership_body = reader.take(membership_length).map_err(damaged)?;
        let membership =
            decode_membership(membership_body).map_err(|error| damaged(error.to_string()))?;
        let count = reader.u32().map_err(damaged)?;
        if count > SEGMENTS_MAX {
            return Err(damaged(format!("claims {count} segments")));
        }
        let mut segments = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let segment = reader.segment(directory).map_err(damaged)?;
            segments.push(segment);
        }
        if !reader.bytes.is_empty() {
            return Err(damaged(format!("{} trailing bytes", reader.bytes.len())));
        }
        Ok(SnapshotManifest {
            last_log_id,
            next_offset,
            membership: StoredMembership::new(membership_log_id, membership),
            segments,
        })
    }
}

struct ManifestReader<'a> {
    bytes: &'a [u8],
}

impl<'a> ManifestReader<'a> {
    fn take(&mut self, count: usize) -> std::result::Result<&'a [u8], String> {
        if self.bytes.len() < count {
            return Err(format!(
                "ends early ({count} bytes needed, {} left)",
                self.bytes.len()
            ));
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(taken)
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn log_id(&mut self) -> std::result::Result<Option<LogId>, String> {
        let term = self.u64()?;
        let index = self.u64()?;
        Ok(log_id_of_frame(FrameLogId { term, index }))
    }

    fn segment(&mut self, directory: &Path) -> std::result::Result<SealedSegment, String> {
        let base_offset = self.u64()?;
        let next_offset = self.u64()?;
        let length = self.u64()?;
        let crc32c = self.u32()?;
        let first_raft_index = self.u64()?;
        let last_term = self.u64()?;
        let last_index = self.u64()?;
        Ok(SealedSegment {
            path: segment_path(directory, base_offset),
            base_offset,
            next_offset,
            length,
            crc32c,
            first_raft_index,
            last_log_id: FrameLogId {
                term: last_term,
                index: last_index,
            },
        })
    }
}

fn segment_path(directory: &Path, base_offset: u64) -> PathBuf {
    directory.join(natswal::format::segment_file_name(base_offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{CommittedLeaderId, Membership, Node};
    use std::collections::{BTreeMap, BTreeSet};

    fn sample() -> SnapshotManifest {
        let nodes: BTreeMap<u64, Node> = (1..=3)
            .map(|id| {
                let addr = format!("node-{id}:7222");
                (id, Node { addr })
            })
            .collect();
        let membership = Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes).unwrap();
        let directory = Path::new("/streams/orders");
        SnapshotManifest {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(4), 99)),
            next_offset: 1234,
            membership: StoredMembership::new(
                Some(LogId::new(CommittedLeaderId::new(2), 7)),
                membership,
            ),
            segments: (0..2)
                .map(|number| SealedSegment {
                    path: segment_path(directory, 1 + number * 600),
                    base_offset: 1 + number * 600,
                    next_offset: 601 + number * 600,
                    length: 65_000,
                    crc32c: 0xdead_beef + number as u32,
                    first_raft_index: 1 + number * 40,
                    last_log_id: FrameLogId {
                        term: 3,
                        index: 40 + number * 40,
                    },
                })
                .collect(),
        }
    }

    #[test]
    fn a_manifest_round_trips_and_any_flipped_bit_or_cut_is_named_damage() {
        let directory = Path::new("/streams/orders");
        let path = directory.join(SNAPSHOT_FILE_NAME);
        let manifest = sample();
        let encoded = manifest.encode();
        assert_eq!(
            SnapshotManifest::decode(&encoded, &path, directory).unwrap(),
            manifest
        );
        for bit in 0..encoded.len() * 8 {
            let mut damaged = encoded.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let error = SnapshotManifest::decode(&damaged, &path, directory)
                .expect_err("a flipped bit is detected")
                .to_string();
            assert!(error.contains("raft-snapshot is damaged"), "{error}");
        }
        for length in 0..encoded.len() {
            assert!(SnapshotManifest::decode(&encoded[..length], &path, directory).is_err());
        }
    }
}
