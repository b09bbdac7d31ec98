//! Segment shipping: how a follower gets the entries of a snapshot that its
//! log lacks (it was down while the leader purged them from its Raft log,
//! or it is a new learner). It owns the follower's side of a transfer, in
//! two steps that fail differently:
//!
//! 1. [`receive`] runs in the transport's handler of the snapshot request,
//!    before openraft sees it: it downloads what is missing from the
//!    leader into the log's `incoming/` directory, each sealed segment of
//!    the manifest whose entries begin where the received ones have got to
//!    as its file (in chunks, resumed where a failed attempt stopped; its
//!    CRC is checked by the engine when it installs it), and the entries
//!    between segments as committed frames. Any failure (the leader gone,
//!    a segment retention removed) refuses the request: the leader sends
//!    the snapshot again later, and nothing in the log has changed.
//! 2. [`install`] runs in the state machine's `install_snapshot`, after
//!    openraft has cut any conflicting entries: it cuts the log after the
//!    last entry it shares with the leader for sure (the saved commit
//!    index, a lower bound of what is committed), then links in the
//!    received segments and appends the received frames, then syncs. Only
//!    disk errors can fail it, and they stop the node as any storage error.
//!
//! Invariant: what is received starts right after the saved commit index,
//! so the entries the install keeps are committed ones, identical on every
//! replica (Log Matching), and the log after it is the leader's through the
//! snapshot's last entry. A crash between the cut and the end leaves a log
//! that lacks committed entries: the next open fetches them from peers
//! before Raft starts (`group::fill_lost_entries`).

use crate::error::{Error, Result};
use crate::network::Peers;
use crate::snapshot::SnapshotManifest;
use crate::types::frame_raft_index;
use natswal::format::frame::{check_header, FrameCheck, FrameHeader};
use natswal::log::writer::now_ns;
use natswal::{Log, SealedSegment};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Bytes of a segment asked for in one request.
pub const CHUNK_BYTES: u64 = 4 * 1024 * 1024;

/// One part of what a follower received, in Raft index order.
#[derive(Debug)]
enum Piece {
    Segment {
        path: PathBuf,
        segment: SealedSegment,
    },
    Frames(Vec<bytes::Bytes>),
}

/// Everything received for one snapshot.
#[derive(Debug)]
pub struct Received {
    /// Frame Raft index of the first received entry.
    first_index: u64,
    /// Frame Raft index of the snapshot's last entry.
    through: u64,
    pieces: Vec<Piece>,
}

/// Hands what the transport received to the state machine, and counts
/// transfers for the metrics. One per group.
#[derive(Debug, Default)]
pub struct Inbox {
    received: Mutex<Option<Received>>,
    segments_received: AtomicU64,
    bytes_received: AtomicU64,
    snapshots_installed: AtomicU64,
    transfers_failed: AtomicU64,
}

/// Transfer counters of a group since it opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShippingCounters {
    pub segments_received: u64,
    pub bytes_received: u64,
    /// Snapshots installed by shipping (not those the log already held).
    pub snapshots_installed: u64,
    /// Downloads that failed (the leader unreachable, a segment it no
    /// longer has or refuses as damaged); each is retried.
    pub transfers_failed: u64,
}

impl Inbox {
    fn put(&self, received: Received) {
        *self.received.lock().unwrap_or_else(|p| p.into_inner()) = Some(received);
    }

    /// What was received for the snapshot ending at frame index `through`.
    fn take(&self, through: u64) -> Option<Received> {
        let mut slot = self.received.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some(received) if received.through == through => Some(received),
            other => {
                *slot = other;
                None
            }
        }
    }

    pub fn counters(&self) -> ShippingCounters {
        ShippingCounters {
            segments_received: self.segments_received.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            snapshots_installed: self.snapshots_installed.load(Ordering::Relaxed),
            transfers_failed: self.transfers_failed.load(Ordering::Relaxed),
        }
    }

    pub fn count_failed_transfer(&self) {
        self.transfers_failed.fetch_add(1, Ordering::Relaxed);
    }
}

fn engine(log: &Log, error: natswal::Error) -> Error {
    Error::engine(log.name(), error)
}

/// The header of the stored frame with frame Raft index `index`, if the
/// log holds it (not purged away, not past its end).
pub fn frame_header_at(log: &Log, index: u64) -> Result<Option<FrameHeader>> {
    let first_stored = crate::log_store::first_stored_frame_index(log);
    if index == 0
        || first_stored == 0
        || index < first_stored
        || log.written().last_log_id.index < index
    {
        return Ok(None);
    }
    let frames = log
        .read_frames(natswal::log::FrameRange::RaftIndex {
            start: index,
            end: index + 1,
        })
        .map_err(|error| engine(log, error))?;
    Ok(frames.first().map(|frame| frame.header))
}

/// Whether the log holds the entry with frame Raft index `index` and `term`.
pub fn holds(log: &Log, index: u64, term: u64) -> Result<bool> {
    Ok(frame_header_at(log, index)?.is_some_and(|header| header.raft_term == term))
}

/// Downloads from the leader at `address` what the log lacks of the
/// snapshot `manifest` and leaves it in `inbox`. Does nothing when the log
/// already holds the snapshot's last entry. `committed` is the frame index
/// this node's Raft knows committed.
pub async fn receive(
    log: &Log,
    peers: &Peers,
    address: &str,
    manifest: &SnapshotManifest,
    inbox: &Inbox,
    committed: u64,
) -> Result<()> {
    let Some(last) = manifest.last_log_id else {
        return Ok(());
    };
    let through = frame_raft_index(last.index);
    if holds(log, through, last.leader_id.term)? {
        return Ok(());
    }
    let first_index = shared_prefix(log, committed).min(log.written().last_log_id.index) + 1;
    let mut pieces = Vec::new();
    let mut next = first_index;
    while next <= through {
        if let Some(segment) = manifest
            .segments
            .iter()
            .find(|segment| segment.first_raft_index == next)
        {
            if segment.last_log_id.index < segment.first_raft_index {
                return Err(Error::Format(format!(
                    "leader {address} sent a manifest whose segment at offset {} ends at Raft index {} before it begins ({})",
                    segment.base_offset, segment.last_log_id.index, segment.first_raft_index
                )));
            }
            let path = receive_segment(log, peers, address, segment, inbox).await?;
            next = segment.last_log_id.index + 1;
            pieces.push(Piece::Segment {
                path,
                segment: segment.clone(),
            });
            continue;
        }
        // Up to the next segment that begins later, as frames.
        let end = manifest
            .segments
            .iter()
            .map(|segment| segment.first_raft_index)
            .filter(|first| *first > next)
            .min()
            .unwrap_or(through + 1)
            .min(through + 1);
        let mut frames = Vec::new();
        while next < end {
            let fetched = peers.fetch(address, log.name(), next, end).await?;
            if fetched.is_empty() {
                return Err(Error::Raft {
                    stream: log.name().to_string(),
                    message: format!(
                        "leader {address} sent a snapshot through Raft index {through} but has no committed entry {next} to ship"
                    ),
                });
            }
            next += fetched.len() as u64;
            frames.extend(fetched);
        }
        pieces.push(Piece::Frames(frames));
    }
    tracing::info!(
        stream = %log.name(),
        "received entries {first_index} through {through} from {address} for a snapshot ({} pieces)",
        pieces.len()
    );
    inbox.put(Received {
        first_index,
        through,
        pieces,
    });
    Ok(())
}

/// Downloads one sealed segment file, resuming a partial one; checks its
/// CRC so that a damaged transfer starts over instead of failing the
/// install.
async fn receive_segment(
    log: &Log,
    peers: &Peers,
    address: &str,
    segment: &SealedSegment,
    inbox: &Inbox,
) -> Result<PathBuf> {
    let path = log
        .incoming_path(segment.base_offset)
        .map_err(|error| engine(log, error))?;
    let mut position = log
        .received_segment_length(segment.base_offset)
        .map_err(|error| engine(log, error))?;
    if position > segment.length {
        position = 0;
    }
    while position < segment.length {
        let length = CHUNK_BYTES.min(segment.length - position);
        let chunk = peers
            .segment_chunk(address, log.name(), segment, position, length)
            .await?;
        if chunk.is_empty() {
            return Err(Error::Raft {
                stream: log.name().to_string(),
                message: format!(
                    "leader {address} sent nothing at byte {position} of the segment at offset {}",
                    segment.base_offset
                ),
            });
        }
        inbox
            .bytes_received
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        position = log
            .receive_segment_bytes(segment.base_offset, position, &chunk)
            .map_err(|error| engine(log, error))?;
    }
    match log.check_received_segment(segment.base_offset, segment.length, segment.crc32c) {
        Ok(()) => {}
        Err(error) if error.is_corruption() => {
            // Start over next time rather than resume a damaged file.
            log.receive_segment_bytes(segment.base_offset, 0, &[])
                .map_err(|error| engine(log, error))?;
            return Err(Error::Raft {
                stream: log.name().to_string(),
                message: format!(
                    "the segment at offset {} received from {address} does not match its CRC {:#010x} ({error}); it is fetched again",
                    segment.base_offset, segment.crc32c
                ),
            });
        }
        Err(error) => return Err(engine(log, error)),
    }
    inbox.segments_received.fetch_add(1, Ordering::Relaxed);
    Ok(path)
}

/// The last frame index this log shares with the leader for sure: what is
/// committed (saved, or known to Raft) or purged (purging follows the
/// applied index).
fn shared_prefix(log: &Log, committed: u64) -> u64 {
    let metadata = log.metadata();
    committed
        .max(metadata.committed.map_or(0, |id| id.index))
        .max(metadata.last_purged.map_or(0, |id| id.index))
}

/// Makes the log the leader's through frame index `through`, from what
/// [`receive`] left in `inbox`. Returns false when nothing was received for
/// it.
pub fn install(log: &Log, inbox: &Inbox, through: u64) -> Result<bool> {
    let Some(received) = inbox.take(through) else {
        return Ok(false);
    };
    // Heartbeats may have moved the commit index (and so the purge point)
    // since the download: entries through `keep` stay, and a received
    // segment that holds `keep` replaces the entries from its first on.
    let mut cut = shared_prefix(log, 0)
        .max(received.first_index - 1)
        .min(log.written().last_log_id.index);
    let keep = cut;
    for piece in &received.pieces {
        if let Piece::Segment { segment, .. } = piece {
            if segment.first_raft_index <= keep && keep < segment.last_log_id.index {
                cut = segment.first_raft_index - 1;
            }
        }
    }
    if log.written().last_log_id.index > cut {
        log.truncate_after(cut)
            .map_err(|error| engine(log, error))?;
    }
    let segments = received
        .pieces
        .iter()
        .filter(|piece| matches!(piece, Piece::Segment { .. }))
        .count();
    tracing::info!(
        stream = %log.name(),
        "installing entries {} through {through} ({segments} segment files, the rest frames): the log is cut after {cut}",
        received.first_index,
    );
    // The last entry the log holds as the pieces go in.
    let mut last = cut;
    for piece in received.pieces {
        match piece {
            Piece::Segment { segment, .. } if segment.last_log_id.index <= last => {}
            Piece::Segment { path, segment } => {
                log.install_segment(&path, &segment)
                    .map_err(|error| engine(log, error))?;
                last = segment.last_log_id.index;
            }
            Piece::Frames(frames) => {
                for frame in frames {
                    let index = match check_header(&frame) {
                        FrameCheck::Valid(header) => header.raft_index,
                        _ => 0,
                    };
                    if index > last {
                        log.fill_stored(&frame, now_ns())
                            .map_err(|error| engine(log, error))?;
                        last = index;
                    }
                }
            }
        }
    }
    log.sync().map_err(|error| engine(log, error))?;
    let last = log.written().last_log_id.index;
    if last != through {
        return Err(Error::Invalid(format!(
            "stream '{}': after installing a snapshot through Raft index {through} the log ends at {last}",
            log.name()
        )));
    }
    inbox.snapshots_installed.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        stream = %log.name(),
        "installed a snapshot through Raft index {through} by segment shipping"
    );
    Ok(true)
}
