//! One replicated stream on one node: its Log, the log storage and state
//! machine over it, and its openraft group, registered with the node's
//! transport. A proposal returns once its entry is committed (synced on a
//! majority) and applied here: that is the `quorum` acknowledgement.

use crate::error::{Error, Result};
use crate::log_store::StreamLogStore;
use crate::network::{GroupNetwork, Peers, Registry};
use crate::scrub::{RestoreHook, Scrub, ScrubCounters, ScrubSource};
use crate::shipping::{Inbox, ShippingCounters};
use crate::state_machine::StreamStateMachine;
use crate::types::{Applied, Command, Node, NodeId, ProposedRecord, Raft, RecordBatch, StreamRaft};
use natswal::io::FileSystem;
use natswal::log::restore::restore_raft_frames;
use natswal::log::writer::now_ns;
use natswal::{
    Keyring, Log, LogOptions, RecoveryManager, RecoveryMode, SegmentCache, StreamConfig,
};
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{Config, SnapshotPolicy};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

/// How long a stopping group's tasks may take to let go of its log.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Raft timing. The election timeout is far above this disk's fsync p99
/// (tens of ms; a vote and an append are each one fsync) so a slow sync
/// does not depose a healthy leader, and low enough that a leader's loss
/// is noticed within about a second.
#[derive(Debug, Clone, Copy)]
pub struct RaftTiming {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
        }
    }
}

impl RaftTiming {
    /// The longest a leader takes messages without hearing from a quorum:
    /// below the shortest election timeout, so a cut-off leader stops
    /// before its followers can elect another.
    pub fn quorum_contact_max(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.election_timeout_min_ms * 4 / 5)
    }
}

/// When a group builds snapshots and purges its Raft log. Purging is
/// logical (the frames stay for retention and replay), so its only effect
/// is that a follower lagging more than `kept_entries` behind the last
/// snapshot catches up by segment shipping rather than entry by entry.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotSettings {
    /// Entries applied between two snapshots (a snapshot is a manifest of
    /// sealed segments: cheap).
    pub entries_between: u64,
    /// Entries kept in the Raft log behind a snapshot.
    pub kept_entries: u64,
}

impl Default for SnapshotSettings {
    fn default() -> Self {
        SnapshotSettings {
            entries_between: 16_384,
            kept_entries: 16_384,
        }
    }
}

/// openraft's configuration for a stream's group.
pub fn raft_config(timing: RaftTiming, snapshots: SnapshotSettings) -> Result<Arc<Config>> {
    let config = Config {
        cluster_name: "natswal".to_string(),
        heartbeat_interval: timing.heartbeat_interval_ms,
        election_timeout_min: timing.election_timeout_min_ms,
        election_timeout_max: timing.election_timeout_max_ms,
        // Snapshots are manifests of sealed segments; a follower too far
        // behind receives the segments (crate::shipping).
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshots.entries_between),
        max_in_snapshot_log_to_keep: snapshots.kept_entries,
        // A follower whose log moved backwards (lost writes) must not
        // panic the leader; it is repaired instead.
        allow_log_reversion: Some(true),
        ..Config::default()
    };
    config
        .validate()
        .map(Arc::new)
        .map_err(|error| Error::Invalid(format!("Raft configuration: {error}")))
}

/// How to open a replicated stream on this node.
pub struct GroupOptions<'a> {
    pub node_id: NodeId,
    pub name: &'a str,
    pub directory: &'a Path,
    pub config: StreamConfig,
    pub keyring: Arc<Keyring>,
    pub cache: Arc<SegmentCache>,
    pub timing: RaftTiming,
    pub snapshots: SnapshotSettings,
    /// Bytes per second the background scrub re-reads sealed segments at
    /// (0: no scrub).
    pub scrub_bytes_per_second: u64,
    /// The other replicas' addresses: where a log that lost committed
    /// entries fetches them before Raft starts, and the scrub those of a
    /// damaged segment.
    pub peer_addresses: Vec<String>,
    /// Hears of each sealed segment the scrub restores (an audit).
    pub on_scrub_restore: Option<RestoreHook>,
}

/// A replicated stream's log as opened, and what the open repaired.
struct OpenedLog {
    log: Log,
    /// Its damaged end was cut: entries it had synced (and so maybe
    /// acknowledged to a leader) are gone.
    lost_tail: bool,
    /// Damaged committed entries fetched from peers and written back in
    /// place.
    restored: u64,
}

/// Opens a replicated stream's log after validating all of it (every
/// frame's CRC: the log is read once per start). Damage is repaired below
/// openraft, before it runs: a damaged end is cut (its entries are fetched
/// again afterwards); damaged entries inside the log that this node knows
/// committed are fetched from a peer by Raft index and written back in
/// place, never truncated away; damage past the commit index this node
/// knows cuts the log there (the entries may differ on the leader). When
/// no peer supplies committed entries, the stream does not start, naming
/// them, rather than serve or vote with a hole; nor does it with a damaged
/// metadata file (its vote is not rebuilt).
async fn open_log(
    file_system: &Arc<dyn FileSystem>,
    directory: &Path,
    options: LogOptions,
    peers: &Peers,
    addresses: &[String],
) -> Result<OpenedLog> {
    let name = options.name.clone();
    let damaged = match RecoveryManager::verify(file_system, directory, &mut |_| {}) {
        Ok(report) => {
            if let Some(problem) = report.metadata_problem {
                return Err(Error::Invalid(format!(
                    "stream '{name}': {problem}; a replica's metadata holds its Raft vote, which cannot be rebuilt from the log (a node that forgot its vote could vote twice in one term), so this replica does not start and nothing is changed; replace it as a new node (docs/OPERATIONS.md, \"Replacing a dead node\")"
                )));
            }
            !report.problems.is_empty()
                || !report.recorded_gaps.is_empty()
                || report.lost_raft_entry_marks > 0
        }
        Err(error) => error.is_corruption(),
    };
    let error = if damaged {
        None
    } else {
        match Log::open(Arc::clone(file_system), directory, options.clone()) {
            Ok((log, _)) => {
                return Ok(OpenedLog {
                    log,
                    lost_tail: false,
                    restored: 0,
                })
            }
            Err(error) if error.is_corruption() => Some(error),
            Err(error) => return Err(Error::engine(&name, error)),
        }
    };
    let repair = LogOptions {
        recovery_mode: RecoveryMode::Repair,
        ..options.clone()
    };
    let (log, report) = Log::open(Arc::clone(file_system), directory, repair)
        .map_err(|error| Error::engine(&name, error))?;
    tracing::warn!(
        "stream '{name}': damaged log repaired before Raft starts ({}); quarantined: {:?}",
        error.map_or_else(
            || "found by validation".to_string(),
            |error| error.to_string()
        ),
        report.quarantined
    );
    // A damaged end of the log is cut like a lost tail (the entries are
    // fetched again): the gap frame the repair wrote for its records goes
    // too, so the fetched frames take those offsets.
    let mut lost_tail = false;
    let next_offset = log.written().next_offset;
    if let Some(lost) = report.lost.last() {
        if lost.next_offset == next_offset {
            log.truncate_from_offset(lost.first_offset)
                .map_err(|error| Error::engine(&name, error))?;
            lost_tail = true;
        }
    }
    let committed = log.metadata().committed.map_or(0, |id| id.index);
    let segments: Vec<_> = log
        .segments()
        .iter()
        .map(|segment| segment.path().to_path_buf())
        .collect();
    let holes = log
        .raft_holes(&segments)
        .map_err(|error| Error::engine(&name, error))?;
    let mut restorable = Vec::new();
    for hole in holes {
        match hole.missing() {
            Some(missing) if missing.end <= committed + 1 => restorable.push(hole),
            _ => {
                log.truncate_after(hole.after_index)
                    .map_err(|error| Error::engine(&name, error))?;
                lost_tail = true;
                break;
            }
        }
    }
    if restorable.is_empty() {
        return Ok(OpenedLog {
            log,
            lost_tail,
            restored: 0,
        });
    }
    log.close().map_err(|error| Error::engine(&name, error))?;
    drop(log);
    let mut restored = 0;
    for hole in &restorable {
        let missing = hole.missing().expect("a restorable hole has a size");
        let frames = fetch_committed(peers, addresses, &name, missing)
            .await
            .map_err(|error| {
                Error::Invalid(format!(
                    "{error}; this replica does not start (it would serve or vote with a hole)"
                ))
            })?;
        restore_raft_frames(file_system, directory, &options.config, hole, &frames)
            .map_err(|error| Error::engine(&name, error))?;
        restored += frames.len() as u64;
    }
    let (log, _) = Log::open(Arc::clone(file_system), directory, options)
        .map_err(|error| Error::engine(&name, error))?;
    tracing::warn!(
        "stream '{name}': {restored} damaged committed entries were fetched from peers and written back in place"
    );
    Ok(OpenedLog {
        log,
        lost_tail,
        restored,
    })
}

/// Committed frames with Raft indexes `wanted` from the first peer that
/// has them all.
pub(crate) async fn fetch_committed(
    peers: &Peers,
    addresses: &[String],
    name: &str,
    wanted: std::ops::Range<u64>,
) -> Result<Vec<bytes::Bytes>> {
    let mut failures = Vec::new();
    for address in addresses {
        let mut frames = Vec::new();
        loop {
            let next = wanted.start + frames.len() as u64;
            if next >= wanted.end {
                return Ok(frames);
            }
            match peers.fetch(address, name, next, wanted.end).await {
                Ok(fetched) if fetched.is_empty() => {
                    failures.push(format!("{address}: has only [{}, {next})", wanted.start));
                    break;
                }
                Ok(fetched) => frames.extend(fetched),
                Err(error) => {
                    failures.push(format!("{address}: {error}"));
                    break;
                }
            }
        }
    }
    Err(Error::Invalid(format!(
        "stream '{name}': committed entries with Raft indexes [{}, {}) are damaged in this node's log and no peer supplied them ({})",
        wanted.start,
        wanted.end,
        if failures.is_empty() { "no peers".to_string() } else { failures.join("; ") }
    )))
}

/// Fetches the committed entries a log lost from peers, before Raft
/// starts: a node missing committed entries must not vote. Entries through
/// the saved commit index are required (fails, naming the gap, when no peer
/// has them); after a damaged end was cut (`lost_tail`), everything the
/// peers have committed past it is fetched too, since this node may have
/// acknowledged entries it no longer holds, and at least one peer must
/// answer. Returns how many entries were fetched.
async fn fill_lost_entries(
    log: &Log,
    peers: &Peers,
    addresses: &[String],
    lost_tail: bool,
) -> Result<u64> {
    let committed = log.metadata().committed.map_or(0, |id| id.index);
    let wanted_end = if lost_tail { u64::MAX } else { committed + 1 };
    let first_last = log.written().last_log_id.index;
    let mut last = first_last;
    let mut failures = Vec::new();
    let mut answered = false;
    for address in addresses {
        while last + 1 < wanted_end {
            // The peer's frame at `last` must be ours: past the commit
            // index our tail may be another term's, which Raft replaces.
            let start = if last > committed { last } else { last + 1 };
            let mut frames = match peers.fetch(address, log.name(), start, wanted_end).await {
                Ok(frames) => {
                    answered = true;
                    frames
                }
                Err(error) => {
                    failures.push(format!("{address}: {error}"));
                    break;
                }
            };
            if start == last && !frames.is_empty() {
                let ours = log
                    .read_frames(natswal::log::FrameRange::RaftIndex {
                        start: last,
                        end: last + 1,
                    })
                    .map_err(|error| Error::engine(log.name(), error))?;
                if ours.first().map(|frame| &frame.bytes[..]) != Some(&frames[0][..]) {
                    break;
                }
                frames.remove(0);
            }
            if frames.is_empty() {
                break;
            }
            for frame in frames {
                log.fill_stored(&frame, now_ns())
                    .map_err(|error| Error::engine(log.name(), error))?;
                last += 1;
            }
        }
    }
    if lost_tail && !answered {
        return Err(Error::Invalid(format!(
            "stream '{}': the damaged end of the log was cut (entries this node synced are gone) and no peer answered ({}); this replica does not start (it would vote without entries it may have acknowledged)",
            log.name(),
            failures.join("; ")
        )));
    }
    if last < committed {
        return Err(Error::Invalid(format!(
            "stream '{}': the log ends at Raft index {last} but entries through {committed} were committed; no peer supplied them ({}); this replica does not start (it would vote without committed entries)",
            log.name(),
            if failures.is_empty() { "none had them".to_string() } else { failures.join("; ") }
        )));
    }
    if last > first_last {
        log.sync()
            .map_err(|error| Error::engine(log.name(), error))?;
    }
    Ok(last - first_last)
}

/// A group's state on one node (the leader's also has its replicas').
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    pub stream: String,
    pub node_id: NodeId,
    pub leader: Option<NodeId>,
    pub is_leader: bool,
    /// Leader, and an entry of its own term is applied: proposals commit.
    pub leads: bool,
    pub term: u64,
    pub last_index: Option<u64>,
    pub committed: Option<u64>,
    pub applied: Option<u64>,
    /// The last entry purged from the Raft log (logically: the frames
    /// stay); a follower behind it catches up by segment shipping.
    pub purged: Option<u64>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Each replica's last matched entry and lag (on the leader only).
    pub replicas: Vec<ReplicaStatus>,
    /// Terms this node saw begin since it opened the group: each term
    /// begins with an election (won or not).
    pub elections: u64,
    /// Times the leader this node knows changed to another node.
    pub leader_changes: u64,
    /// Committed entries this node's log had lost or damaged and fetched
    /// from peers (when it opened the group, or by the scrub since).
    pub repaired_entries: u64,
    /// Snapshot transfers this node received as a follower.
    pub shipping: ShippingCounters,
    pub scrub: ScrubCounters,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub node_id: NodeId,
    pub matched: Option<u64>,
    pub lag_entries: u64,
}

/// A replicated stream's group on this node.
pub struct ReplicatedStream {
    name: String,
    log: Arc<Log>,
    raft: Raft,
    registry: Arc<Registry>,
    peers: Arc<Peers>,
    inbox: Arc<Inbox>,
    fetched_on_open: u64,
    restored_on_open: u64,
    applied_offset: tokio::sync::watch::Receiver<u64>,
    changes: Arc<LeadershipChanges>,
    scrub: Arc<Scrub>,
    scrubbing: Option<AbortOnDrop>,
}

/// A task that ends when its owner drops this (the scrub holds the log).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Elections and leader changes as this node saw them, counted by a task
/// that watches openraft's metrics (it ends when the group stops).
#[derive(Debug, Default)]
struct LeadershipChanges {
    elections: std::sync::atomic::AtomicU64,
    leader_changes: std::sync::atomic::AtomicU64,
}

impl LeadershipChanges {
    fn watch(raft: &Raft) -> Arc<LeadershipChanges> {
        use std::sync::atomic::Ordering::Relaxed;
        let changes = Arc::new(LeadershipChanges::default());
        let counted = Arc::clone(&changes);
        let mut metrics = raft.metrics();
        let seen = |metrics: &openraft::RaftMetrics<StreamRaft>| {
            (metrics.current_term, metrics.current_leader)
        };
        let (mut term, mut leader) = seen(&metrics.borrow_watched());
        tokio::spawn(async move {
            while metrics.changed().await.is_ok() {
                let (now_term, now_leader) = seen(&metrics.borrow_watched());
                counted
                    .elections
                    .fetch_add(now_term.saturating_sub(term), Relaxed);
                term = term.max(now_term);
                if now_leader.is_some() && now_leader != leader {
                    if leader.is_some() {
                        counted.leader_changes.fetch_add(1, Relaxed);
                    }
                    leader = now_leader;
                }
            }
        });
        changes
    }
}

impl ReplicatedStream {
    pub async fn open(
        file_system: Arc<dyn FileSystem>,
        options: GroupOptions<'_>,
        peers: Arc<Peers>,
        registry: Arc<Registry>,
    ) -> Result<ReplicatedStream> {
        let name = options.name.to_string();
        let nonce_node = u16::try_from(options.node_id).map_err(|_| {
            Error::Invalid(format!(
                "node id {} is above 65535 (frame nonces carry the node id in 16 bits)",
                options.node_id
            ))
        })?;
        let log_options = LogOptions {
            name: name.clone(),
            config: options.config,
            recovery_mode: RecoveryMode::Strict,
            keyring: options.keyring,
            node_id: nonce_node,
            cache: options.cache,
            store_locked: None,
            group_sync: None,
        };
        let opened = open_log(
            &file_system,
            options.directory,
            log_options,
            &peers,
            &options.peer_addresses,
        )
        .await?;
        let (log, lost_tail) = (Arc::new(opened.log), opened.lost_tail);
        let fetched = fill_lost_entries(&log, &peers, &options.peer_addresses, lost_tail).await?;
        if fetched > 0 {
            tracing::warn!(
                "stream '{name}': {fetched} committed entries were missing from this node's log (lost writes) and were fetched from peers before Raft started"
            );
        }
        let inbox = Arc::new(Inbox::default());
        let state_machine =
            StreamStateMachine::open(Arc::clone(&log), file_system, Arc::clone(&inbox))?;
        let applied_offset = state_machine.subscribe_applied_offset();
        let log_store = StreamLogStore::new(Arc::clone(&log));
        let network = GroupNetwork {
            peers: Arc::clone(&peers),
            group: name.clone(),
        };
        let raft = Raft::new(
            options.node_id,
            raft_config(options.timing, options.snapshots)?,
            network,
            log_store,
            state_machine,
        )
        .await
        .map_err(|error| Error::Raft {
            stream: name.clone(),
            message: error.to_string(),
        })?;
        registry.insert(
            &name,
            raft.clone(),
            Arc::clone(&log),
            Arc::clone(&peers),
            Arc::clone(&inbox),
        );
        let changes = LeadershipChanges::watch(&raft);
        let scrub = Arc::new(Scrub::default());
        let scrubbing = (options.scrub_bytes_per_second > 0).then(|| {
            let source = ScrubSource {
                peers: Arc::clone(&peers),
                addresses: options.peer_addresses.clone(),
                on_restore: options.on_scrub_restore.clone(),
            };
            AbortOnDrop(tokio::spawn(Arc::clone(&scrub).run(
                Arc::clone(&log),
                source,
                options.scrub_bytes_per_second,
            )))
        });
        Ok(ReplicatedStream {
            name,
            log,
            raft,
            registry,
            peers,
            inbox,
            fetched_on_open: fetched,
            restored_on_open: opened.restored,
            applied_offset,
            changes,
            scrub,
            scrubbing,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// A reader of committed records only (on any replica): it stops
    /// before the first record not yet applied here.
    pub fn reader(
        &self,
        start: natswal::StartPosition,
        filter: Option<natswal::SubjectPattern>,
    ) -> natswal::Result<natswal::Reader> {
        natswal::Reader::new(Log::clone(&self.log), start, filter)
            .map(|reader| reader.with_ceiling(self.applied_offset.clone()))
    }

    /// On the leader: how long ago a quorum acknowledged its heartbeats
    /// or entries (`None` elsewhere). A leader cut off from its peers sees
    /// this grow and stops taking messages before a new leader is elected.
    pub fn quorum_contact_age(&self) -> Option<std::time::Duration> {
        use openraft::Instant as _;
        self.raft
            .metrics()
            .borrow_watched()
            .last_quorum_acked
            .as_ref()
            .map(|acked| acked.elapsed())
    }

    /// Waits until this node leads the group with an entry of its term
    /// applied (proposals commit from then on).
    pub async fn wait_to_lead(&self, timeout: std::time::Duration) -> Result<()> {
        self.raft
            .wait(Some(timeout))
            .metrics(
                |metrics| {
                    metrics.state.is_leader()
                        && metrics
                            .last_applied
                            .is_some_and(|applied| applied.leader_id.term == metrics.current_term)
                },
                "leading",
            )
            .await
            .map(|_| ())
            .map_err(|error| Error::Raft {
                stream: self.name.clone(),
                message: format!("this node did not come to lead: {error}"),
            })
    }

    /// The offset after the last record applied on this node.
    pub fn applied_offset(&self) -> u64 {
        *self.applied_offset.borrow()
    }

    /// Waits until this node has applied everything the leader had
    /// committed when asked (a read after it is linearizable with the
    /// leader); fails on a node that cannot reach the leader.
    pub async fn linearizable_barrier(&self, timeout: std::time::Duration) -> Result<()> {
        let failed = |message: String| Error::Raft {
            stream: self.name.clone(),
            message,
        };
        let metrics = self.raft.metrics().borrow_watched().clone();
        let index = if metrics.state.is_leader() {
            self.raft
                .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
                .await
                .map_err(|error| failed(error.to_string()))?
                .log_id()
                .index
        } else {
            let leader = metrics.current_leader.ok_or_else(|| {
                failed("no leader is known: a linearizable read needs one".into())
            })?;
            let address = metrics
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|node| self.peers.address_of(leader, &node.addr).to_string())
                .ok_or_else(|| failed(format!("the leader {leader} has no address")))?;
            let asked = self.peers.read_index(&address, &self.name);
            tokio::time::timeout(timeout, asked)
                .await
                .map_err(|_| failed(format!("the leader {leader} gave no read index in time")))??
        };
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map(|_| ())
            .map_err(|error| failed(format!("applying through the read index {index}: {error}")))
    }

    /// On the leader: waits until every entry of its log is applied and
    /// returns the stream's next offset then. With nothing else proposing
    /// meanwhile (the intake is the only proposer of records), that is the
    /// stream as the entries before the next proposal leave it: what a
    /// publish precondition is checked against.
    pub async fn settle(&self, timeout: std::time::Duration) -> Result<u64> {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let failed = |message: String| Error::Raft {
            stream: self.name.clone(),
            message,
        };
        if !metrics.state.is_leader() {
            return Err(failed("this node does not lead the stream".into()));
        }
        let last = metrics.last_log_index;
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(last, "settle")
            .await
            .map_err(|error| failed(format!("applying the leader's log: {error}")))?;
        Ok(self.applied_offset())
    }

    /// Committed entries the log had lost and fetched from peers on open.
    pub fn fetched_on_open(&self) -> u64 {
        self.fetched_on_open
    }

    /// Damaged committed entries this node fetched from peers and wrote
    /// back in place when it opened the stream.
    pub fn restored_on_open(&self) -> u64 {
        self.restored_on_open
    }

    /// Makes `members` the group's first membership (once, on one node).
    pub async fn initialize(&self, members: BTreeMap<NodeId, Node>) -> Result<()> {
        self.raft
            .initialize(members)
            .await
            .map_err(|error| Error::Raft {
                stream: self.name.clone(),
                message: error.to_string(),
            })
    }

    /// Proposes records as one entry; returns the offsets they took once
    /// the entry is committed (synced on a majority) and applied here.
    pub async fn propose(&self, batch: RecordBatch) -> Result<Applied> {
        // A frame the log cannot store would fail openraft's append, and a
        // storage error stops the node's Raft: refuse it here instead.
        let bytes: usize = batch
            .records
            .iter()
            .map(ProposedRecord::encoded_length)
            .sum();
        let frame_bytes_max = self.log.config().frame_bytes_max;
        if bytes as u64 > frame_bytes_max {
            return Err(Error::Invalid(format!(
                "stream '{}': a proposal of {} records takes {bytes} bytes, more than one frame holds (frame_bytes_max {frame_bytes_max})",
                self.name,
                batch.records.len()
            )));
        }
        self.raft
            .client_write(Command::Records(batch))
            .await
            .map(|response| response.data)
            .map_err(|error| self.write_error(error))
    }

    fn write_error(&self, error: RaftError<StreamRaft, ClientWriteError<StreamRaft>>) -> Error {
        match error {
            RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => Error::NotLeader {
                stream: self.name.clone(),
                leader: forward.leader_id,
            },
            error => Error::Raft {
                stream: self.name.clone(),
                message: error.to_string(),
            },
        }
    }

    /// Adds `node_id` at `address` as a learner and returns once it has
    /// caught up with the log (leader only).
    pub async fn add_learner(&self, node_id: NodeId, address: &str) -> Result<()> {
        let node = Node {
            addr: address.to_string(),
        };
        self.raft
            .add_learner(node_id, node, true)
            .await
            .map(|_| ())
            .map_err(|error| self.write_error(error))
    }

    /// Makes `voters` the group's voters (joint consensus); members left
    /// out are removed, learners among `voters` promoted (leader only).
    pub async fn change_voters(&self, voters: BTreeSet<NodeId>) -> Result<()> {
        self.raft
            .change_membership(voters, false)
            .await
            .map(|_| ())
            .map_err(|error| self.write_error(error))
    }

    /// Asks the leader to hand leadership to `to` (leader only).
    pub async fn transfer_leader(&self, to: NodeId) -> Result<()> {
        self.raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|error| Error::Raft {
                stream: self.name.clone(),
                message: error.to_string(),
            })
    }

    /// The group as this node sees it: what `natswal cluster status` shows.
    pub fn status(&self) -> GroupStatus {
        use std::sync::atomic::Ordering::Relaxed;
        let metrics = self.raft.metrics().borrow_watched().clone();
        let last_index = metrics.last_log_index;
        let replicas = metrics
            .replication
            .as_ref()
            .map(|replication| {
                replication
                    .iter()
                    .map(|(node_id, matched)| {
                        let matched = matched.as_ref().map(|id| id.index);
                        let lag = match (last_index, matched) {
                            (Some(last), Some(matched)) => last.saturating_sub(matched),
                            (Some(last), None) => last + 1,
                            _ => 0,
                        };
                        ReplicaStatus {
                            node_id: *node_id,
                            matched,
                            lag_entries: lag,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let scrub = self.scrub.counters();
        GroupStatus {
            stream: self.name.clone(),
            node_id: metrics.id,
            leader: metrics.current_leader,
            is_leader: metrics.state.is_leader(),
            leads: metrics.state.is_leader()
                && metrics
                    .last_applied
                    .is_some_and(|applied| applied.leader_id.term == metrics.current_term),
            term: metrics.current_term,
            last_index,
            committed: metrics.local_committed.map(|id| id.index),
            applied: metrics.last_applied.map(|id| id.index),
            purged: metrics.purged.map(|id| id.index),
            voters: metrics.membership_config.membership().voter_ids().collect(),
            learners: metrics
                .membership_config
                .membership()
                .learner_ids()
                .collect(),
            replicas,
            elections: self.changes.elections.load(Relaxed),
            leader_changes: self.changes.leader_changes.load(Relaxed),
            repaired_entries: self.fetched_on_open + self.restored_on_open + scrub.restored_entries,
            shipping: self.inbox.counters(),
            scrub,
        }
    }

    /// Stops the group and closes its log.
    pub async fn shutdown(self) -> Result<()> {
        drop(self.scrubbing);
        self.registry.remove(&self.name);
        self.raft.shutdown().await.map_err(|error| Error::Raft {
            stream: self.name.clone(),
            message: error.to_string(),
        })?;
        drop(self.raft);
        // openraft's tasks and the syncer thread hold the log until they
        // have ended, which shutdown has asked of them.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
        let mut log = self.log;
        loop {
            match Arc::try_unwrap(log) {
                Ok(log) => {
                    return log
                        .close()
                        .map_err(|error| Error::engine(&self.name, error))
                }
                Err(shared) if tokio::time::Instant::now() < deadline => {
                    log = shared;
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                Err(_) => {
                    return Err(Error::Raft {
                        stream: self.name.clone(),
                        message: format!(
                            "the log is still in use {} s after the group stopped",
                            SHUTDOWN_WAIT.as_secs()
                        ),
                    })
                }
            }
        }
    }
}
