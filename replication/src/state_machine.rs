//! openraft's state machine for a replicated stream. The log is the
//! stream, so applying an entry stores nothing: it advances the applied
//! id, follows the membership, and answers a proposal with the offsets its
//! records took (read from the stored frame's header).
//!
//! A snapshot is a [`SnapshotManifest`]: the sealed segments holding the
//! entries through the applied id. Building one writes the manifest file;
//! opening the state machine reads it back (the applied state a restart
//! starts from; openraft re-applies the committed entries after it).
//! Installing a snapshot whose entries the local log already holds, or
//! whose missing entries hold no record, adopts it; otherwise the entries
//! the transport downloaded for it ([`crate::shipping`]) are installed
//! into the log first.

use crate::error::{Error, Result};
use crate::shipping::Inbox;
use crate::snapshot::{SnapshotManifest, SNAPSHOT_FILE_NAME};
use crate::types::{
    frame_raft_index, Applied, Command, LogId, SnapshotMeta, StoredMembership, StreamRaft,
};
use futures_util::StreamExt;
use natswal::format::frame::{check_header, FrameCheck};
use natswal::io::FileSystem;
use natswal::Log;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

type StreamSnapshot = Snapshot<
    crate::types::CommittedLeaderId,
    crate::types::NodeId,
    crate::types::Node,
    SnapshotManifest,
>;

/// The state machine of one replicated stream.
pub struct StreamStateMachine {
    log: Arc<Log>,
    file_system: Arc<dyn FileSystem>,
    manifest_path: PathBuf,
    applied: Option<LogId>,
    membership: StoredMembership,
    current: Option<SnapshotManifest>,
    /// What the transport received for a snapshot being installed.
    inbox: Arc<Inbox>,
    /// The offset after the last applied record: readers of a replicated
    /// stream read below it, so they see committed records only.
    applied_offset: tokio::sync::watch::Sender<u64>,
}

impl StreamStateMachine {
    /// Opens the state machine of `log`, from its snapshot manifest if one
    /// was written.
    pub fn open(
        log: Arc<Log>,
        file_system: Arc<dyn FileSystem>,
        inbox: Arc<Inbox>,
    ) -> Result<StreamStateMachine> {
        let manifest_path = log.directory().join(SNAPSHOT_FILE_NAME);
        let current = load_manifest(&log, file_system.as_ref(), &manifest_path)?;
        let (applied, membership) = match &current {
            Some(manifest) => (manifest.last_log_id, manifest.membership.clone()),
            None => (None, StoredMembership::default()),
        };
        let applied_offset = current.as_ref().map_or(0, |manifest| manifest.next_offset);
        Ok(StreamStateMachine {
            log,
            file_system,
            manifest_path,
            applied,
            membership,
            current,
            inbox,
            applied_offset: tokio::sync::watch::Sender::new(applied_offset),
        })
    }

    /// Follows the offset after the last applied record.
    pub fn subscribe_applied_offset(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied_offset.subscribe()
    }

    fn advance_applied_offset(&self, next_offset: u64) {
        self.applied_offset.send_if_modified(|current| {
            let advanced = next_offset > *current;
            *current = (*current).max(next_offset);
            advanced
        });
    }

    fn manifest(&self) -> io::Result<SnapshotManifest> {
        let through = self
            .applied
            .as_ref()
            .map_or(0, |id| frame_raft_index(id.index));
        let next_offset =
            match crate::shipping::frame_header_at(&self.log, through).map_err(Error::into_io)? {
                Some(header) => header.next_offset(),
                // Only a state machine fed entries its log never held (the
                // storage test suite) gets here.
                None => self.log.written().next_offset,
            };
        let segments = self
            .log
            .sealed_segments()
            .into_iter()
            .filter(|segment| {
                segment.last_log_id.index != 0 && segment.last_log_id.index <= through
            })
            .collect();
        Ok(SnapshotManifest {
            last_log_id: self.applied,
            next_offset,
            membership: self.membership.clone(),
            segments,
        })
    }

    fn save(&mut self, manifest: SnapshotManifest) -> io::Result<()> {
        self.file_system
            .write_atomic(&self.manifest_path, &manifest.encode())
            .map_err(|error| Error::engine(self.log.name(), error).into_io())?;
        self.current = Some(manifest);
        Ok(())
    }

    fn snapshot_of(manifest: &SnapshotManifest) -> StreamSnapshot {
        Snapshot {
            meta: SnapshotMeta {
                last_log_id: manifest.last_log_id,
                last_membership: manifest.membership.clone(),
            },
            snapshot: manifest.clone(),
        }
    }

    /// Whether the local log holds the entry `id` (same term).
    fn log_holds(&self, id: &LogId) -> io::Result<bool> {
        crate::shipping::holds(&self.log, frame_raft_index(id.index), id.leader_id.term)
            .map_err(Error::into_io)
    }
}

fn load_manifest(
    log: &Log,
    file_system: &dyn FileSystem,
    path: &std::path::Path,
) -> Result<Option<SnapshotManifest>> {
    if !file_system.exists(path) {
        return Ok(None);
    }
    let bytes = file_system
        .read(path)
        .map_err(|error| Error::engine(log.name(), error))?;
    SnapshotManifest::decode(&bytes, path, log.directory()).map(Some)
}

/// The offsets a stored records frame took.
fn applied_of(stream: &str, command: &Command) -> io::Result<Applied> {
    match command {
        Command::Stored(bytes) => match check_header(bytes) {
            FrameCheck::Valid(header) => Ok(Applied {
                base_offset: header.base_offset,
                next_offset: header.next_offset(),
            }),
            other => Err(Error::Format(format!(
                "stream '{stream}': an applied entry's frame header is not valid: {other:?}"
            ))
            .into_io()),
        },
        Command::Records(_) => Err(Error::Invalid(format!(
            "stream '{stream}': an entry was applied without being read from the log"
        ))
        .into_io()),
    }
}

impl RaftStateMachine<StreamRaft> for StreamStateMachine {
    type SnapshotData = SnapshotManifest;
    type SnapshotBuilder = StreamSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures_util::Stream<Item = Result<EntryResponder<StreamRaft>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let response = match &entry.payload {
                EntryPayload::Blank => Applied::default(),
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), membership.clone());
                    Applied::default()
                }
                EntryPayload::Normal(command) => {
                    let applied = applied_of(self.log.name(), command)?;
                    self.advance_applied_offset(applied.next_offset);
                    applied
                }
            };
            self.applied = Some(entry.log_id);
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        StreamSnapshotBuilder {
            manifest: self.manifest(),
            file_system: Arc::clone(&self.file_system),
            manifest_path: self.manifest_path.clone(),
            stream: self.log.name().to_string(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotManifest,
    ) -> Result<(), io::Error> {
        if let Some(last) = &meta.last_log_id {
            let written = self.log.written();
            let beyond_log = written.last_log_id.index < frame_raft_index(last.index);
            let lacks_records = written.next_offset != snapshot.next_offset;
            let shipped = || {
                crate::shipping::install(&self.log, &self.inbox, frame_raft_index(last.index))
                    .map_err(Error::into_io)
            };
            if !self.log_holds(last)? && !shipped()? && (lacks_records || !beyond_log) {
                return Err(Error::Invalid(format!(
                    "stream '{}': installing snapshot through {last} needs the entries the transport downloads from the leader, and none were received",
                    self.log.name()
                ))
                .into_io());
            }
        }
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.advance_applied_offset(snapshot.next_offset);
        let manifest = SnapshotManifest {
            last_log_id: meta.last_log_id,
            next_offset: snapshot.next_offset,
            membership: meta.last_membership.clone(),
            segments: snapshot.segments,
        };
        self.save(manifest)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<StreamSnapshot>, io::Error> {
        // A builder may have written a newer manifest since.
        self.current = load_manifest(&self.log, self.file_system.as_ref(), &self.manifest_path)
            .map_err(Error::into_io)?;
        Ok(self.current.as_ref().map(StreamStateMachine::snapshot_of))
    }
}

/// Builds a snapshot: writes the manifest taken when it was created.
pub struct StreamSnapshotBuilder {
    manifest: io::Result<SnapshotManifest>,
    file_system: Arc<dyn FileSystem>,
    manifest_path: PathBuf,
    stream: String,
}

impl RaftSnapshotBuilder<StreamRaft> for StreamSnapshotBuilder {
    type SnapshotData = SnapshotManifest;

    async fn build_snapshot(&mut self) -> Result<StreamSnapshot, io::Error> {
        let taken = std::mem::replace(
            &mut self.manifest,
            Err(
                Error::Invalid(format!("stream '{}': snapshot built twice", self.stream)).into_io(),
            ),
        );
        let manifest = taken?;
        self.file_system
            .write_atomic(&self.manifest_path, &manifest.encode())
            .map_err(|error| Error::engine(&self.stream, error).into_io())?;
        Ok(StreamStateMachine::snapshot_of(&manifest))
    }
}
