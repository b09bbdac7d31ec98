//! Three nodes of one replicated stream in one process, over real TCP on
//! loopback and real files: quorum proposals get dense, unique offsets; the
//! committed logs are byte-identical on every node; a follower refuses a
//! proposal and names the leader; the leader's loss elects another that
//! continues the offsets; the old leader comes back and catches up.

use natswal::io::os::OsFileSystem;
use natswal::io::{FileSystem, WriteMode};
use natswal::log::FrameRange;
use natswal::{Keyring, Log, SegmentCache, StreamConfig};
use natswal_replication::tls::{TlsFiles, TransportSecurity};
use natswal_replication::types::{Node, NodeId};
use natswal_replication::{
    serve, Error, GroupOptions, Identity, Peers, ProposedRecord, RaftTiming, RecordBatch, Registry,
    ReplicatedStream, SnapshotSettings,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const STREAM: &str = "orders";
const WAIT: Duration = Duration::from_secs(20);

struct TestNode {
    id: NodeId,
    address: String,
    directory: tempfile::TempDir,
    registry: Arc<Registry>,
    peers: Arc<Peers>,
    peer_addresses: Vec<String>,
    config: StreamConfig,
    snapshots: SnapshotSettings,
    scrub_bytes_per_second: u64,
    stream: Option<ReplicatedStream>,
}

fn file_system() -> Arc<dyn FileSystem> {
    Arc::new(OsFileSystem::new(WriteMode::Pwrite))
}

async fn open_stream(node: &TestNode) -> ReplicatedStream {
    try_open_stream(node)
        .await
        .expect("opening the replicated stream")
}

async fn try_open_stream(node: &TestNode) -> natswal_replication::Result<ReplicatedStream> {
    let options = GroupOptions {
        node_id: node.id,
        name: STREAM,
        directory: node.directory.path(),
        config: node.config.clone(),
        keyring: Arc::new(Keyring::default()),
        cache: Arc::new(SegmentCache::new(16)),
        timing: RaftTiming::default(),
        snapshots: node.snapshots,
        scrub_bytes_per_second: node.scrub_bytes_per_second,
        peer_addresses: node.peer_addresses.clone(),
        on_scrub_restore: None,
    };
    ReplicatedStream::open(
        file_system(),
        options,
        Arc::clone(&node.peers),
        Arc::clone(&node.registry),
    )
    .await
}

async fn start_nodes(count: u64) -> Vec<TestNode> {
    start_nodes_with(count, |_| TransportSecurity::Plain).await
}

async fn start_nodes_with(
    count: u64,
    security: impl Fn(NodeId) -> TransportSecurity,
) -> Vec<TestNode> {
    start_nodes_configured(
        count,
        security,
        StreamConfig::default(),
        SnapshotSettings::default(),
    )
    .await
}

async fn start_nodes_configured(
    count: u64,
    security: impl Fn(NodeId) -> TransportSecurity,
    config: StreamConfig,
    snapshots: SnapshotSettings,
) -> Vec<TestNode> {
    let mut listeners = Vec::new();
    for _ in 1..=count {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addresses: Vec<String> = listeners
        .iter()
        .map(|listener| listener.local_addr().unwrap().to_string())
        .collect();
    let mut nodes = Vec::new();
    for (id, listener) in (1..=count).zip(listeners) {
        let registry = Arc::new(Registry::default());
        let identity = Arc::new(Identity::in_memory(id, 1000 + id));
        tokio::spawn(serve(
            listener,
            Arc::clone(&registry),
            security(id),
            Arc::clone(&identity),
        ));
        let address = addresses[(id - 1) as usize].clone();
        let mut node = TestNode {
            id,
            peer_addresses: addresses
                .iter()
                .filter(|peer| **peer != address)
                .cloned()
                .collect(),
            address,
            directory: tempfile::tempdir().unwrap(),
            registry,
            peers: Arc::new(Peers::new(security(id), identity)),
            config: config.clone(),
            snapshots,
            scrub_bytes_per_second: 0,
            stream: None,
        };
        node.stream = Some(open_stream(&node).await);
        nodes.push(node);
    }
    nodes
}

fn stream(node: &TestNode) -> &ReplicatedStream {
    node.stream.as_ref().expect("the node is running")
}

async fn await_leader(nodes: &[TestNode]) -> NodeId {
    let running: Vec<&TestNode> = nodes.iter().filter(|node| node.stream.is_some()).collect();
    let metrics = stream(running[0])
        .raft()
        .wait(Some(WAIT))
        .metrics(
            |metrics| {
                metrics
                    .current_leader
                    .is_some_and(|leader| running.iter().any(|node| node.id == leader))
            },
            "a running leader",
        )
        .await
        .expect("a leader is elected");
    let leader = metrics.current_leader.unwrap();
    // The leader has committed and applied the blank entry of its term (an
    // initializing node leads term 0 alone for a moment, then elects).
    let node = nodes.iter().find(|node| node.id == leader).unwrap();
    stream(node)
        .raft()
        .wait(Some(WAIT))
        .metrics(
            |metrics| {
                metrics.state.is_leader()
                    && metrics.current_term > 0
                    && metrics
                        .last_applied
                        .is_some_and(|applied| applied.leader_id.term == metrics.current_term)
            },
            "the leader leads",
        )
        .await
        .expect("the elected node leads");
    leader
}

fn batch(first: u64, count: u64) -> RecordBatch {
    RecordBatch {
        atomic: false,
        records: (first..first + count)
            .map(|number| ProposedRecord {
                timestamp_ns: 0,
                subject: format!("orders.{}", number % 7).into(),
                headers: Default::default(),
                payload: format!("order {number}").into(),
            })
            .collect(),
    }
}

/// Proposes `batches` batches of `per_batch` records, eight in flight;
/// returns each batch's (base, next) offsets.
async fn propose_all(
    leader: &ReplicatedStream,
    first: u64,
    batches: u64,
    per_batch: u64,
) -> Vec<(u64, u64)> {
    let mut offsets = Vec::new();
    for chunk_start in (0..batches).step_by(8) {
        let chunk_end = (chunk_start + 8).min(batches);
        let proposals = (chunk_start..chunk_end)
            .map(|number| leader.propose(batch(first + number * per_batch, per_batch)));
        for applied in futures_util::future::join_all(proposals).await {
            let applied = applied.expect("a quorum proposal");
            assert_eq!(applied.next_offset - applied.base_offset, per_batch);
            offsets.push((applied.base_offset, applied.next_offset));
        }
    }
    offsets
}

/// The index of the last entry in a node's log: after its proposals
/// returned, the leader's last entry is committed and applied (its
/// metrics may not say so yet; they are published later).
fn last_entry(stream: &ReplicatedStream) -> u64 {
    stream.log().written().last_log_id.index - 1
}

fn assert_dense(offsets: &mut [(u64, u64)], from: u64) -> u64 {
    offsets.sort_unstable();
    let mut next = from;
    for (base, end) in offsets.iter() {
        assert_eq!(*base, next, "offsets are dense and unique");
        next = *end;
    }
    next
}

/// Waits until every running node applied `index`, then checks their logs
/// hold byte-identical frames through it.
async fn assert_identical_logs(nodes: &[TestNode], index: u64) {
    let mut reference: Option<Vec<bytes::Bytes>> = None;
    for node in nodes.iter().filter(|node| node.stream.is_some()) {
        stream(node)
            .raft()
            .wait(Some(WAIT))
            .applied_index_at_least(Some(index), "applied everywhere")
            .await
            .expect("every node applies the committed entries");
        let frames: Vec<bytes::Bytes> = stream(node)
            .log()
            .read_frames(FrameRange::RaftIndex {
                start: 1,
                end: index + 2,
            })
            .expect("reading the log")
            .into_iter()
            .map(|frame| frame.bytes)
            .collect();
        assert_eq!(frames.len() as u64, index + 1);
        match &reference {
            None => reference = Some(frames),
            Some(reference) => assert!(
                reference == &frames,
                "node {} holds other bytes than node 1",
                node.id
            ),
        }
    }
}

/// Stops every running node.
async fn shutdown_all(nodes: &mut [TestNode]) {
    for node in nodes {
        if let Some(stream) = node.stream.take() {
            stream.shutdown().await.unwrap();
        }
    }
}

/// Polls `condition` every 20 ms until it holds; fails after `WAIT`.
async fn wait_for(what: &str, condition: impl Fn() -> bool) {
    let waited = tokio::time::timeout(WAIT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for {what}");
}

/// Starts `count` nodes and makes them one group.
async fn start_cluster(count: u64) -> Vec<TestNode> {
    start_cluster_of(count, count).await
}

/// Makes the nodes' first `voters` one group.
async fn initialize(nodes: &[TestNode], voters: u64) {
    let members: BTreeMap<NodeId, Node> = nodes
        .iter()
        .take(voters as usize)
        .map(|node| {
            (
                node.id,
                Node {
                    addr: node.address.clone(),
                },
            )
        })
        .collect();
    stream(&nodes[0]).initialize(members).await.unwrap();
}

/// Starts `count` nodes; the first `voters` form the group, the others
/// wait to be added.
async fn start_cluster_of(count: u64, voters: u64) -> Vec<TestNode> {
    let nodes = start_nodes(count).await;
    initialize(&nodes, voters).await;
    nodes
}

/// Waits until a node's log has saved (durably) a commit index of at least
/// `frame_index`.
async fn await_saved_commit(log: &natswal::Log, frame_index: u64) {
    let deadline = std::time::Instant::now() + WAIT;
    while log.metadata().committed.map_or(0, |id| id.index) < frame_index {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower saves its commit index"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Cuts `bytes` off the data of the node's last segment, as a disk that
/// lost writes it had acknowledged would.
fn cut_last_segment(directory: &std::path::Path, data_length: u64, bytes: u64) {
    let mut segments: Vec<_> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
        .collect();
    segments.sort();
    let last = segments.last().expect("a segment");
    let file = std::fs::OpenOptions::new().write(true).open(last).unwrap();
    file.set_len(data_length - bytes).unwrap();
    file.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_lost_committed_entries_fetches_them_before_it_votes() {
    let mut nodes = start_cluster(3).await;
    let leader_id = await_leader(&nodes).await;
    let leader = &nodes[(leader_id - 1) as usize];
    propose_all(stream(leader), 0, 40, 5).await;
    let last = last_entry(stream(leader));
    assert_identical_logs(&nodes, last).await;

    // A follower knows (durably) that everything through `last` is
    // committed, then its disk loses the tail of its log.
    let follower = nodes.iter().position(|node| node.id != leader_id).unwrap();
    let log = Arc::clone(stream(&nodes[follower]).log());
    let committed_frame_index = last + 1;
    await_saved_commit(&log, committed_frame_index).await;
    let data_length = log.segments().last().unwrap().progress().length;
    drop(log);
    nodes[follower]
        .stream
        .take()
        .unwrap()
        .shutdown()
        .await
        .unwrap();
    cut_last_segment(nodes[follower].directory.path(), data_length, 2000);

    let reopened = open_stream(&nodes[follower]).await;
    assert!(
        reopened.fetched_on_open() >= 5,
        "the follower fetched {} entries",
        reopened.fetched_on_open()
    );
    assert!(
        reopened.log().written().last_log_id.index >= committed_frame_index,
        "the follower holds every committed entry when Raft starts"
    );
    nodes[follower].stream = Some(reopened);
    assert_identical_logs(&nodes, last).await;

    // With no peer to answer, it refuses to start rather than vote.
    nodes[follower]
        .stream
        .take()
        .unwrap()
        .shutdown()
        .await
        .unwrap();
    shutdown_all(&mut nodes).await;
    for node in &nodes {
        node.registry.remove(STREAM);
    }
    cut_last_segment(nodes[follower].directory.path(), data_length, 2000);
    let error = match try_open_stream(&nodes[follower]).await {
        Ok(_) => panic!("a replica missing committed entries started"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("does not start"), "{error}");
    assert!(error.contains("no peer answered"), "{error}");
}

/// Flips one byte inside the body of `frame` where a closed node's
/// segment files store it (found by its bytes).
fn damage_frame(directory: &std::path::Path, frame: &[u8]) {
    for entry in std::fs::read_dir(directory).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|extension| extension != "log") {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let Some(position) = bytes
            .windows(frame.len())
            .position(|window| window == frame)
        else {
            continue;
        };
        bytes[position + frame.len() - 3] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        return;
    }
    panic!("the frame is in no segment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_committed_entry_is_fetched_from_a_peer_and_written_back_in_place() {
    let mut nodes = start_cluster(3).await;
    let leader_id = await_leader(&nodes).await;
    let leader = &nodes[(leader_id - 1) as usize];
    propose_all(stream(leader), 0, 40, 5).await;
    let last = last_entry(stream(leader));
    assert_identical_logs(&nodes, last).await;
    let follower = nodes.iter().position(|node| node.id != leader_id).unwrap();
    let log = Arc::clone(stream(&nodes[follower]).log());
    await_saved_commit(&log, last + 1).await;
    // Two committed record entries in the middle of the log, with entries
    // after them, lose a bit each, and so does an entry that holds no
    // records (the first leader's blank entry or the membership).
    let entry = |index: u64| {
        log.read_frames(FrameRange::RaftIndex {
            start: index,
            end: index + 1,
        })
        .unwrap()
        .remove(0)
    };
    let offsetless = (1..last)
        .find(|index| entry(*index).header.record_count == 0)
        .expect("the log begins with entries without records");
    let damaged: Vec<bytes::Bytes> = [offsetless, last / 3, last / 2]
        .into_iter()
        .map(|index| {
            let frame = entry(index);
            assert_eq!(
                frame.header.record_count > 0,
                index != offsetless,
                "entry {index}"
            );
            frame.bytes
        })
        .collect();
    drop(log);
    let stopped = nodes[follower].stream.take().unwrap();
    stopped.shutdown().await.unwrap();
    for frame in &damaged {
        damage_frame(nodes[follower].directory.path(), frame);
    }

    let reopened = open_stream(&nodes[follower]).await;
    assert_eq!(
        reopened.restored_on_open(),
        3,
        "every damaged entry was restored"
    );
    nodes[follower].stream = Some(reopened);
    // Byte-identical to the leader's log: nothing was truncated away.
    assert_identical_logs(&nodes, last).await;
    let quarantine = nodes[follower].directory.path().join("quarantine");
    assert!(
        std::fs::read_dir(&quarantine).unwrap().count() >= 3,
        "the damaged bytes are kept in quarantine"
    );

    // With no peer to supply them, a damaged replica refuses to start.
    let damaged_again = stream(&nodes[follower])
        .log()
        .read_frames(FrameRange::RaftIndex {
            start: last / 2,
            end: last / 2 + 1,
        })
        .unwrap()
        .remove(0)
        .bytes;
    shutdown_all(&mut nodes).await;
    for node in &nodes {
        node.registry.remove(STREAM);
    }
    damage_frame(nodes[follower].directory.path(), &damaged_again);
    let error = match try_open_stream(&nodes[follower]).await {
        Ok(_) => panic!("a replica with a damaged committed entry started without its peers"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("does not start"), "{error}");
    assert!(
        error.contains(&format!("Raft indexes [{}, {})", last / 2, last / 2 + 1)),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_joins_catches_up_becomes_a_voter_and_takes_the_lead() {
    let mut nodes = start_cluster_of(4, 3).await;
    let leader_id = await_leader(&nodes).await;
    let leader = &nodes[(leader_id - 1) as usize];
    let mut offsets = propose_all(stream(leader), 0, 30, 4).await;
    let next = assert_dense(&mut offsets, natswal::FIRST_OFFSET);

    // Node 4 joins as a learner (returns once it caught up), then becomes
    // a voter in place of a follower; the status shows it.
    stream(leader)
        .add_learner(4, &nodes[3].address)
        .await
        .expect("adding a learner");
    let removed = nodes
        .iter()
        .map(|node| node.id)
        .find(|id| *id != leader_id && *id != 4)
        .unwrap();
    let voters: std::collections::BTreeSet<NodeId> = [1, 2, 3, 4]
        .into_iter()
        .filter(|id| *id != removed)
        .collect();
    stream(leader)
        .change_voters(voters.clone())
        .await
        .expect("changing voters");
    let status = stream(leader).status();
    assert_eq!(status.voters, voters.iter().copied().collect::<Vec<_>>());
    assert!(status.is_leader && status.leader == Some(leader_id));
    let last = last_entry(stream(leader));
    stream(&nodes[3])
        .raft()
        .wait(Some(WAIT))
        .applied_index_at_least(Some(last), "the new voter applied everything")
        .await
        .unwrap();
    // The leader's view of node 4 is published a little later.
    stream(leader)
        .raft()
        .wait(Some(WAIT))
        .metrics(
            |metrics| {
                metrics.replication.as_ref().is_some_and(|replication| {
                    replication
                        .get(&4)
                        .is_some_and(|matched| matched.is_some_and(|id| id.index >= last))
                })
            },
            "the leader sees node 4 caught up",
        )
        .await
        .unwrap();
    let status = stream(leader).status();
    let replica = status
        .replicas
        .iter()
        .find(|replica| replica.node_id == 4)
        .expect("the leader tracks node 4");
    assert_eq!(replica.lag_entries, 0, "{status:?}");

    // The removed node is stopped, as docs/OPERATIONS.md says: it may have
    // missed the configuration that leaves it out, and a node left running
    // with the joint one calls elections (openraft 0.10 has no pre-vote) that
    // can depose a leader its peers have not yet heard from.
    let removed_node = nodes[(removed - 1) as usize].stream.take().unwrap();
    removed_node.shutdown().await.unwrap();

    // Leadership moves to the new voter, which goes on with the offsets.
    let leader = &nodes[(leader_id - 1) as usize];
    stream(leader).transfer_leader(4).await.unwrap();
    // Node 4 takes writes once the blank entry of its term is committed (a
    // quorum acked it, so its leader lease holds): until then openraft
    // refuses writes with "lease expired". (Asking node 1 who leads would
    // not do: it may not yet have heard of the term node 4 won.)
    stream(&nodes[3])
        .wait_to_lead(WAIT)
        .await
        .expect("leadership moves to node 4");
    let mut more = propose_all(stream(&nodes[3]), 500, 10, 4).await;
    assert_eq!(assert_dense(&mut more, next), next + 40);
    let last = last_entry(stream(&nodes[3]));
    assert_identical_logs(&nodes, last).await;
    shutdown_all(&mut nodes).await;
}

/// Four nodes (three voters) with 64 KiB segments and a snapshot every 20
/// entries, 5 kept behind it; a follower stopped while 400 entries are
/// written, until the leader purged what it lacks. Returns the nodes, the
/// leader's and the stopped follower's indexes, and the next offset.
async fn start_with_a_follower_behind_the_purge_point() -> (Vec<TestNode>, usize, usize, u64) {
    let config = StreamConfig {
        segment_bytes_max: 64 * 1024,
        record_bytes_max: 16 * 1024,
        frame_bytes_max: 32 * 1024,
        ..StreamConfig::default()
    };
    let snapshots = SnapshotSettings {
        entries_between: 20,
        kept_entries: 5,
    };
    let mut nodes =
        start_nodes_configured(4, |_| TransportSecurity::Plain, config, snapshots).await;
    initialize(&nodes, 3).await;
    let leader_id = await_leader(&nodes).await;
    let leader_index = (leader_id - 1) as usize;
    let mut offsets = propose_all(stream(&nodes[leader_index]), 0, 40, 4).await;
    let follower_index = (0..3).find(|index| *index != leader_index).unwrap();
    let follower_last = last_entry(stream(&nodes[follower_index]));
    let stopped = nodes[follower_index].stream.take().unwrap();
    stopped.shutdown().await.unwrap();

    offsets.extend(propose_all(stream(&nodes[leader_index]), 160, 400, 50).await);
    let next = assert_dense(&mut offsets, natswal::FIRST_OFFSET);
    assert_eq!(next, natswal::FIRST_OFFSET + 160 + 400 * 50);
    let leader = stream(&nodes[leader_index]);
    assert!(
        leader.log().sealed_segments().len() >= 4,
        "{:?}",
        leader.log().sealed_segments()
    );
    leader
        .raft()
        .wait(Some(WAIT))
        .metrics(
            |metrics| {
                metrics
                    .purged
                    .is_some_and(|purged| purged.index > follower_last + 50)
            },
            "the leader purged what the stopped follower lacks",
        )
        .await
        .expect("the leader snapshots and purges");
    (nodes, leader_index, follower_index, next)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_behind_the_purged_log_catch_up_by_receiving_sealed_segments() {
    let (mut nodes, leader_index, follower_index, next) =
        start_with_a_follower_behind_the_purge_point().await;

    // The follower comes back; node 4 joins as a new learner with an
    // empty log. Both receive the leader's segments.
    nodes[follower_index].stream = Some(open_stream(&nodes[follower_index]).await);
    let leader = stream(&nodes[leader_index]);
    leader
        .add_learner(4, &nodes[3].address)
        .await
        .expect("adding a learner");
    let last = last_entry(leader);
    assert_identical_logs(&nodes, last).await;
    for index in [follower_index, 3] {
        let shipping = stream(&nodes[index]).status().shipping;
        eprintln!("node {}: {shipping:?}", nodes[index].id);
        assert!(
            shipping.snapshots_installed >= 1 && shipping.segments_received >= 1,
            "node {} caught up without segment shipping: {shipping:?}",
            nodes[index].id
        );
    }

    // The shipped logs take the entries that follow, and a restart of the
    // shipped follower finds its log whole.
    let mut more = propose_all(stream(&nodes[leader_index]), 30_000, 16, 4).await;
    assert_eq!(assert_dense(&mut more, next), next + 64);
    let restarted = nodes[follower_index].stream.take().unwrap();
    restarted.shutdown().await.unwrap();
    nodes[follower_index].stream = Some(open_stream(&nodes[follower_index]).await);
    let last = last_entry(stream(&nodes[leader_index]));
    assert_identical_logs(&nodes, last).await;
    shutdown_all(&mut nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_never_ships_a_damaged_segment_and_the_follower_catches_up_from_the_next() {
    let (mut nodes, leader_index, follower_index, _) =
        start_with_a_follower_behind_the_purge_point().await;
    // A bit flips in a sealed segment of the leader that the follower needs.
    let sealed = stream(&nodes[leader_index]).log().sealed_segments();
    let damaged = &sealed[sealed.len() / 2];
    let mut bytes = std::fs::read(&damaged.path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x08;
    std::fs::write(&damaged.path, &bytes).unwrap();

    // The follower comes back: the leader refuses to ship that file, so
    // the follower installs nothing from it.
    nodes[follower_index].stream = Some(open_stream(&nodes[follower_index]).await);
    let follower = stream(&nodes[follower_index]);
    wait_for(
        "a refused transfer (the leader shipped its damaged segment)",
        || follower.status().shipping.transfers_failed > 0,
    )
    .await;
    assert_eq!(follower.status().shipping.snapshots_installed, 0);

    // Leadership moves to the healthy replica, whose own segments the
    // follower receives; it ends with the healthy replica's log.
    let healthy = (0..3)
        .find(|index| *index != leader_index && *index != follower_index)
        .unwrap();
    let healthy_id = nodes[healthy].id;
    stream(&nodes[leader_index])
        .transfer_leader(healthy_id)
        .await
        .unwrap();
    stream(&nodes[healthy])
        .wait_to_lead(WAIT)
        .await
        .expect("the healthy replica leads");
    let mut more = propose_all(stream(&nodes[healthy]), 40_000, 8, 4).await;
    assert_eq!(more.len(), 8);
    more.sort_unstable();
    let last = last_entry(stream(&nodes[healthy]));
    let old_leader = nodes[leader_index].stream.take().unwrap();
    old_leader.shutdown().await.unwrap();
    let learner = nodes[3].stream.take().unwrap();
    learner.shutdown().await.unwrap();
    assert_identical_logs(&nodes, last).await;
    let shipping = stream(&nodes[follower_index]).status().shipping;
    assert!(shipping.snapshots_installed >= 1, "{shipping:?}");
    shutdown_all(&mut nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrub_restores_a_segment_damaged_while_the_node_runs_from_peers() {
    let config = StreamConfig {
        segment_bytes_max: 64 * 1024,
        record_bytes_max: 16 * 1024,
        frame_bytes_max: 32 * 1024,
        ..StreamConfig::default()
    };
    let mut nodes = start_nodes_configured(
        3,
        |_| TransportSecurity::Plain,
        config,
        SnapshotSettings::default(),
    )
    .await;
    initialize(&nodes, 3).await;
    let leader_id = await_leader(&nodes).await;
    let leader = &nodes[(leader_id - 1) as usize];
    propose_all(stream(leader), 0, 200, 50).await;
    let last = last_entry(stream(leader));
    assert_identical_logs(&nodes, last).await;

    // The follower runs with a scrub; then a bit flips in place in one of
    // its sealed segments (inside a committed frame).
    let follower = nodes.iter().position(|node| node.id != leader_id).unwrap();
    let stopped = nodes[follower].stream.take().unwrap();
    stopped.shutdown().await.unwrap();
    nodes[follower].scrub_bytes_per_second = 256 << 20;
    nodes[follower].stream = Some(open_stream(&nodes[follower]).await);
    let log = Arc::clone(stream(&nodes[follower]).log());
    let sealed = log.sealed_segments();
    assert!(sealed.len() >= 3, "{sealed:?}");
    let target = &sealed[sealed.len() / 2];
    let first_frame_of_target = |log: &Log| {
        log.read_frames(FrameRange::RaftIndex {
            start: target.first_raft_index,
            end: target.first_raft_index + 1,
        })
        .unwrap()
        .remove(0)
    };
    let frame = first_frame_of_target(&log);
    drop(log);
    let bytes = std::fs::read(&target.path).unwrap();
    let position = bytes
        .windows(frame.bytes.len())
        .position(|window| window == &frame.bytes[..])
        .expect("the frame is in its segment")
        + frame.bytes.len()
        - 3;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&target.path)
            .unwrap();
        file.seek(SeekFrom::Start(position as u64)).unwrap();
        file.write_all(&[bytes[position] ^ 0x20]).unwrap();
        file.sync_all().unwrap();
    }
    let follower_stream = stream(&nodes[follower]);
    wait_for("the scrub to restore the damaged segment", || {
        follower_stream.status().scrub.restored_segments > 0
    })
    .await;
    // Found once, restored once from a peer while the node runs: the entry
    // is back byte for byte, and every sealed segment verifies.
    let status = follower_stream.status();
    assert_eq!(status.scrub.damaged_segments, 1, "{:?}", status.scrub);
    assert_eq!(status.scrub.restored_segments, 1, "{:?}", status.scrub);
    assert_eq!(status.scrub.restored_entries, 1, "{:?}", status.scrub);
    assert_eq!(status.repaired_entries, 1);
    let log = follower_stream.log();
    for segment in log.sealed_segments() {
        assert!(log.verify_sealed_segment(segment.base_offset).unwrap());
    }
    assert_eq!(first_frame_of_target(log).bytes, frame.bytes);
    assert_identical_logs(&nodes, last).await;

    // The restored segment opens cleanly: a restart finds nothing to repair.
    let restarted = nodes[follower].stream.take().unwrap();
    restarted.shutdown().await.unwrap();
    nodes[follower].stream = Some(open_stream(&nodes[follower]).await);
    assert_eq!(stream(&nodes[follower]).restored_on_open(), 0);
    assert_identical_logs(&nodes, last).await;
    shutdown_all(&mut nodes).await;
}

/// A CA and, per name, a certificate for 127.0.0.1 signed by it.
struct Certificates {
    directory: tempfile::TempDir,
}

impl Certificates {
    fn generate(names: &[&str]) -> Certificates {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let directory = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(directory.path().join("ca.pem"), ca.pem()).unwrap();
        for name in names {
            let key = KeyPair::generate().unwrap();
            let certificate = CertificateParams::new(vec!["127.0.0.1".to_string()])
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            std::fs::write(
                directory.path().join(format!("{name}.pem")),
                certificate.pem(),
            )
            .unwrap();
            std::fs::write(
                directory.path().join(format!("{name}-key.pem")),
                key.serialize_pem(),
            )
            .unwrap();
        }
        Certificates { directory }
    }

    fn security(&self, name: &str) -> TransportSecurity {
        let path = |file: String| self.directory.path().join(file);
        let (ca, cert, key) = (
            path("ca.pem".to_string()),
            path(format!("{name}.pem")),
            path(format!("{name}-key.pem")),
        );
        TransportSecurity::mutual_tls(&TlsFiles {
            ca_file: &ca,
            cert_file: &cert,
            key_file: &key,
        })
        .expect("a TLS configuration")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_talk_over_mutual_tls_and_refuse_peers_without_a_valid_certificate() {
    let certificates = Certificates::generate(&["node-1", "node-2", "node-3"]);
    let mut nodes = start_nodes_with(3, |id| certificates.security(&format!("node-{id}"))).await;
    initialize(&nodes, 3).await;
    let leader_id = await_leader(&nodes).await;
    let leader = &nodes[(leader_id - 1) as usize];
    let mut offsets = propose_all(stream(leader), 0, 10, 3).await;
    assert_dense(&mut offsets, natswal::FIRST_OFFSET);
    let last = last_entry(stream(leader));
    assert_identical_logs(&nodes, last).await;
    let refused_before = nodes[0].registry.refused_connections();

    // A node of another cluster (another CA) gets nothing.
    let foreign = Certificates::generate(&["intruder"]);
    let intruder = Peers::new(
        foreign.security("intruder"),
        Arc::new(Identity::in_memory(99, 1)),
    );
    let error = intruder
        .fetch(&nodes[0].address, STREAM, 1, 10)
        .await
        .expect_err("a peer of another CA is refused");
    assert!(error.to_string().contains("TLS handshake"), "{error}");

    // A client that trusts the CA but presents no certificate is refused
    // by the server, which counts (and logs) the refusal.
    let TransportSecurity::MutualTls { acceptor, .. } = certificates.security("node-1") else {
        unreachable!()
    };
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(certificates.directory.path().join("ca.pem")).unwrap();
    for certificate in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca) {
        let certificate: rustls_pki_types::CertificateDer = certificate.unwrap();
        roots.add(certificate).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let anonymous = Peers::new(
        TransportSecurity::MutualTls {
            acceptor,
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        },
        Arc::new(Identity::in_memory(98, 1)),
    );
    assert!(anonymous
        .fetch(&nodes[0].address, STREAM, 1, 10)
        .await
        .is_err());
    let deadline = std::time::Instant::now() + WAIT;
    while nodes[0].registry.refused_connections() < refused_before + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "both refusals are counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for node in &mut nodes {
        node.stream.take().unwrap().shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_commit_on_a_quorum_survive_the_leaders_loss_and_converge() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut nodes = start_cluster(3).await;
    let leader_id = await_leader(&nodes).await;
    let leader = &nodes[(leader_id - 1) as usize];

    let mut offsets = propose_all(stream(leader), 0, 40, 5).await;
    let next = assert_dense(&mut offsets, natswal::FIRST_OFFSET);
    assert_eq!(next, natswal::FIRST_OFFSET + 200);

    let follower = nodes.iter().find(|node| node.id != leader_id).unwrap();
    match stream(follower).propose(batch(0, 1)).await {
        Err(Error::NotLeader { leader, .. }) => assert_eq!(leader, Some(leader_id)),
        other => panic!("a follower accepted a proposal: {other:?}"),
    }

    let last = last_entry(stream(leader));
    assert_identical_logs(&nodes, last).await;

    // The leader goes away; the other two elect one and go on.
    let old = (leader_id - 1) as usize;
    nodes[old].stream.take().unwrap().shutdown().await.unwrap();
    let new_leader_id = await_leader(&nodes).await;
    assert_ne!(new_leader_id, leader_id);
    let new_leader = &nodes[(new_leader_id - 1) as usize];
    let mut more = propose_all(stream(new_leader), 1000, 20, 5).await;
    assert_eq!(assert_dense(&mut more, next), next + 100);

    // The old leader comes back from its directory and catches up.
    let reopened = open_stream(&nodes[old]).await;
    nodes[old].stream = Some(reopened);
    let new_leader = &nodes[(new_leader_id - 1) as usize];
    // A proposal larger than one frame is refused before it reaches the
    // log (a failed append would stop the leader's Raft); the group goes on.
    let frame_bytes_max = stream(new_leader).log().config().frame_bytes_max;
    let mut oversized = batch(0, 1);
    oversized.records[0].payload = vec![b'x'; frame_bytes_max as usize].into();
    let refusal = stream(new_leader).propose(oversized).await.unwrap_err();
    assert!(
        refusal.to_string().contains("more than one frame holds"),
        "{refusal}"
    );
    let mut after = propose_all(stream(new_leader), 2000, 2, 5).await;
    assert_eq!(assert_dense(&mut after, next + 100), next + 110);
    let last = last_entry(stream(new_leader));
    assert_identical_logs(&nodes, last).await;
    for node in &mut nodes {
        node.stream.take().unwrap().shutdown().await.unwrap();
    }
}
