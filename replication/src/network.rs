//! Node-to-node transport for every Raft group of a node: one TCP
//! connection per peer address, shared by all groups, carrying
//! length-prefixed bincode frames ([`crate::codec`]). Requests are
//! pipelined: each carries an id, replies come back in any order, and
//! several groups' RPCs are in flight on one connection at once. Appended
//! frames travel as their stored bytes (a normal entry is
//! [`Command::Stored`](crate::types::Command::Stored)).
//!
//! Every call has a timeout (openraft's hard TTL for the RPC); a broken
//! connection fails the calls waiting on it and is replaced by the next
//! call. A node repairing its log before it starts Raft fetches committed
//! frames from peers here too. The server side dispatches each request to its group's Raft in a
//! task of its own, so a slow append does not hold up a vote.

use crate::codec::{decode, encode, read_frame, write_frame};
use crate::error::{Error, Result};
use crate::identity::{Hello, HelloReply, Identity};
use crate::shipping::Inbox;
use crate::snapshot::SnapshotManifest;
use crate::tls::{server_name, TransportSecurity};
use crate::types::{frame_raft_index, NodeId, Raft, SnapshotMeta, StreamRaft, Vote};
use natswal::log::FrameRange;
use natswal::{lock, Log};
use openraft::async_runtime::WatchReceiver;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::storage::Snapshot;
use openraft::RaftNetworkV2;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// How long connecting to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one fetch of committed frames may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a follower waits before it refuses a snapshot whose transfer
/// failed (the leader retries at once).
const TRANSFER_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How long a follower's snapshot waits for the appends in flight before
/// it refuses (the leader sends it again).
const APPENDS_DRAIN_MAX: Duration = Duration::from_secs(10);
/// How long a follower may take to answer a snapshot (it downloads the
/// segments it lacks first).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Serialize, Deserialize)]
enum Request {
    Append(AppendEntriesRequest<StreamRaft>),
    Vote(VoteRequest<StreamRaft>),
    PreVote(VoteRequest<StreamRaft>),
    Snapshot {
        vote: Vote,
        meta: SnapshotMeta,
        /// The manifest in its own (file) encoding.
        manifest: Vec<u8>,
    },
    TransferLeader(TransferLeaderRequest<StreamRaft>),
    /// Committed frames with frame Raft index in `[start, end)`, as
    /// stored (a node repairing its log before it starts Raft).
    Fetch {
        start: u64,
        end: u64,
    },
    /// `length` bytes at `position` of the sealed segment at `base_offset`
    /// with whole-file CRC `crc32c` (segment shipping).
    SegmentChunk {
        base_offset: u64,
        crc32c: u32,
        position: u64,
        length: u64,
    },
    /// The leader's read index (openraft index) once it confirmed its
    /// leadership with a quorum: a follower that has applied through it
    /// serves a read linearizable with the leader.
    ReadIndex,
}

#[derive(Serialize, Deserialize)]
enum Reply {
    Append(AppendEntriesResponse<StreamRaft>),
    Vote(VoteResponse<StreamRaft>),
    Snapshot(SnapshotResponse<StreamRaft>),
    TransferLeader(TransferLeaderResponse<StreamRaft>),
    /// Frames from the start of a fetch, in order; fewer than asked when
    /// the peer has committed no more or the reply reached its size bound.
    Frames(Vec<bytes::Bytes>),
    /// A read index (openraft index).
    ReadIndex(u64),
    /// Bytes of a sealed segment.
    SegmentChunk(bytes::Bytes),
    /// The peer could not serve the request (an unknown group, a Raft that
    /// stopped, a malformed message).
    Refused(String),
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    id: u64,
    group: String,
    body: T,
}

/// The Raft groups a node serves, by stream name.
#[derive(Default)]
pub struct Registry {
    groups: RwLock<HashMap<String, Served>>,
    refused_connections: AtomicU64,
}

/// A group as the transport serves it.
#[derive(Clone)]
struct Served {
    raft: Raft,
    log: Arc<Log>,
    directory: PathBuf,
    /// Where a follower downloads a snapshot's segments from the leader.
    peers: Arc<Peers>,
    inbox: Arc<Inbox>,
    /// Appends carrying entries hold it shared; a snapshot's download and
    /// install hold it alone, so that the log does not move under them
    /// (heartbeats pass: they only move the commit index within the
    /// prefix this log shares with the leader).
    appends: Arc<tokio::sync::RwLock<()>>,
}

impl Registry {
    /// Serves `raft` for `group`; snapshots it receives are shipped
    /// through `peers` into `inbox` (its state machine's).
    pub fn insert(
        &self,
        group: &str,
        raft: Raft,
        log: Arc<Log>,
        peers: Arc<Peers>,
        inbox: Arc<Inbox>,
    ) {
        let directory = log.directory().to_path_buf();
        let served = Served {
            raft,
            log,
            directory,
            peers,
            inbox,
            appends: Arc::default(),
        };
        self.groups
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(group.to_string(), served);
    }

    pub fn remove(&self, group: &str) {
        self.groups
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(group);
    }

    /// Peer connections refused at the TLS handshake (no valid client
    /// certificate, another CA, no handshake in time).
    pub fn refused_connections(&self) -> u64 {
        self.refused_connections.load(Ordering::Relaxed)
    }

    fn refuse(&self, peer: std::net::SocketAddr, error: &dyn std::fmt::Display) {
        self.refused_connections.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("refused a peer connection from {peer}: {error}");
    }

    fn get(&self, group: &str) -> Option<Served> {
        self.groups
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(group)
            .cloned()
    }
}

/// Accepts peers' connections and serves their requests until the
/// listener fails.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    security: TransportSecurity,
    identity: Arc<Identity>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!("accepting a peer connection failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let registry = Arc::clone(&registry);
        let security = security.clone();
        let identity = Arc::clone(&identity);
        tokio::spawn(async move {
            let (mut reader, mut writer) = match security {
                TransportSecurity::Plain => split(stream),
                TransportSecurity::MutualTls { acceptor, .. } => {
                    let accepted =
                        tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(stream)).await;
                    match accepted {
                        Ok(Ok(stream)) => split(stream),
                        Ok(Err(error)) => {
                            return registry.refuse(peer, &format!("TLS handshake failed: {error}"))
                        }
                        Err(_) => return registry.refuse(peer, &"no TLS handshake in time"),
                    }
                }
            };
            let greeted = tokio::time::timeout(
                CONNECT_TIMEOUT,
                greet_client(&mut reader, &mut writer, &identity),
            )
            .await;
            match greeted {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return registry.refuse(peer, &error),
                Err(_) => return registry.refuse(peer, &"no hello in time"),
            }
            if let Err(error) = serve_connection(reader, writer, registry).await {
                tracing::info!("peer connection from {peer} ended: {error}");
            }
        });
    }
}

/// The server's side of a connection's first exchange: the client's
/// [`Hello`], checked against the incarnations met before, then this
/// node's own (or why the client is refused).
async fn greet_client(reader: &mut Reader, writer: &mut Writer, identity: &Identity) -> Result<()> {
    let body = read_frame(reader)
        .await?
        .ok_or_else(|| Error::Invalid("the peer closed the connection before its hello".into()))?;
    let hello: Hello = decode(&body)?;
    let verdict = identity.check(hello);
    let reply = match &verdict {
        Ok(()) => HelloReply::Accepted(identity.hello()),
        Err(why) => HelloReply::Refused(why.clone()),
    };
    write_frame(writer, &encode(&reply)?).await?;
    writer.flush().await.map_err(|source| Error::Io {
        context: "answering a peer's hello".to_string(),
        source,
    })?;
    verdict.map_err(|why| Error::Invalid(format!("node {}: {why}", hello.node_id)))
}

/// The client's side: says who this node is, then checks who answered.
async fn greet_server(
    reader: &mut Reader,
    writer: &mut Writer,
    identity: &Identity,
    address: &str,
) -> Result<()> {
    write_frame(writer, &encode(&identity.hello())?).await?;
    writer.flush().await.map_err(|source| Error::Io {
        context: format!("sending a hello to peer {address}"),
        source,
    })?;
    let body = read_frame(reader).await?.ok_or_else(|| {
        Error::Invalid(format!(
            "peer {address} closed the connection before its hello"
        ))
    })?;
    match decode::<HelloReply>(&body)? {
        HelloReply::Accepted(peer) => identity
            .check(peer)
            .map_err(|why| Error::Invalid(format!("peer {address} is refused: {why}"))),
        HelloReply::Refused(why) => Err(Error::Invalid(format!(
            "peer {address} refused this node: {why}"
        ))),
    }
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

fn split<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S) -> (Reader, Writer) {
    let (reader, writer) = tokio::io::split(stream);
    (Box::new(reader), Box::new(writer))
}

async fn serve_connection(
    mut reader: Reader,
    writer: Writer,
    registry: Arc<Registry>,
) -> Result<()> {
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    while let Some(body) = read_frame(&mut reader).await? {
        let envelope: Envelope<Request> = decode(&body)?;
        let registry = Arc::clone(&registry);
        let writer = Arc::clone(&writer);
        tokio::spawn(async move {
            let reply = dispatch(&registry, &envelope.group, envelope.body).await;
            let answer = Envelope {
                id: envelope.id,
                group: envelope.group,
                body: reply,
            };
            match encode(&answer) {
                Ok(frame) => {
                    let mut writer = writer.lock().await;
                    if let Err(error) = write_frame(&mut *writer, &frame).await {
                        tracing::info!("answering a peer failed: {error}");
                    }
                }
                Err(error) => tracing::error!("encoding a reply failed: {error}"),
            }
        });
    }
    Ok(())
}

async fn dispatch(registry: &Registry, group: &str, request: Request) -> Reply {
    let Some(Served {
        raft,
        log,
        directory,
        peers,
        inbox,
        appends,
    }) = registry.get(group)
    else {
        return Reply::Refused(format!(
            "this node serves no Raft group for stream '{group}'"
        ));
    };
    let refused =
        |error: &dyn std::fmt::Display| Reply::Refused(format!("stream '{group}': {error}"));
    match request {
        Request::Append(request) => {
            let _shared = if request.entries.is_empty() {
                None
            } else {
                Some(appends.read().await)
            };
            let started = std::time::Instant::now();
            let result = raft.append_entries(request).await;
            if started.elapsed() > APPENDS_DRAIN_MAX / 2 {
                tracing::warn!(stream = %group, elapsed_ms = started.elapsed().as_millis() as u64, "an append took long (a snapshot waits for appends in flight)");
            }
            match result {
                Ok(response) => Reply::Append(response),
                Err(error) => refused(&error),
            }
        }
        Request::Vote(request) => match raft.vote(request).await {
            Ok(response) => Reply::Vote(response),
            Err(error) => refused(&error),
        },
        Request::PreVote(request) => match raft.pre_vote(request).await {
            Ok(response) => Reply::Vote(response),
            Err(error) => refused(&error),
        },
        Request::Snapshot {
            vote,
            meta,
            manifest,
        } => {
            let path = directory.join("received snapshot manifest");
            let manifest = match SnapshotManifest::decode(&manifest, &path, &directory) {
                Ok(manifest) => manifest,
                Err(error) => return refused(&error),
            };
            // What the log lacks is downloaded before openraft installs the
            // snapshot; a failed download refuses it, and the leader sends
            // it again.
            let leader = vote.leader_id.voted_for;
            let Some(node) = meta.last_membership.get_node(&leader) else {
                return refused(&format!(
                    "the snapshot's membership does not name its leader {leader}"
                ));
            };
            let address = peers.address_of(leader, &node.addr).to_string();
            // Never an unbounded wait: a refusal is logged, and the leader
            // sends the snapshot again.
            let Ok(_alone) = tokio::time::timeout(APPENDS_DRAIN_MAX, appends.write()).await else {
                tracing::warn!(stream = %group, "a snapshot waited {} s for the appends in flight to finish; it is refused and the leader sends it again", APPENDS_DRAIN_MAX.as_secs());
                return refused(&"appends in flight did not finish in time for a snapshot");
            };
            let committed = raft
                .metrics()
                .borrow_watched()
                .local_committed
                .map_or(0, |id| frame_raft_index(id.index));
            if let Err(error) =
                crate::shipping::receive(&log, &peers, &address, &manifest, &inbox, committed).await
            {
                tracing::warn!(stream = %group, %error, "receiving a snapshot's segments failed; the leader sends it again");
                inbox.count_failed_transfer();
                // The leader sends the snapshot again as soon as this
                // answers: pace its retries (appends go on meanwhile).
                drop(_alone);
                tokio::time::sleep(TRANSFER_RETRY_PAUSE).await;
                return refused(&error);
            }
            let snapshot = Snapshot {
                meta,
                snapshot: manifest,
            };
            match raft.install_full_snapshot(vote, snapshot).await {
                Ok(response) => Reply::Snapshot(response),
                Err(error) => refused(&error),
            }
        }
        Request::TransferLeader(request) => match raft.handle_transfer_leader(request).await {
            Ok(response) => Reply::TransferLeader(response),
            Err(error) => refused(&error),
        },
        Request::Fetch { start, end } => match committed_frames(&raft, &log, start, end) {
            Ok(frames) => Reply::Frames(frames),
            Err(error) => refused(&error),
        },
        Request::SegmentChunk {
            base_offset,
            crc32c,
            position,
            length,
        } => match log.read_sealed_segment(
            base_offset,
            crc32c,
            position,
            length.min(crate::shipping::CHUNK_BYTES) as usize,
        ) {
            Ok(bytes) => Reply::SegmentChunk(bytes.into()),
            Err(error) => refused(&Error::engine(log.name(), error)),
        },
        Request::ReadIndex => match raft
            .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
            .await
        {
            Ok(read) => Reply::ReadIndex(read.log_id().index),
            Err(error) => refused(&error),
        },
    }
}

/// A fetch reply holds at most this many bytes of frames.
const FETCH_REPLY_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Applied (so committed) frames of `[start, end)`, as stored, up to the
/// reply's size bound.
fn committed_frames(raft: &Raft, log: &Log, start: u64, end: u64) -> Result<Vec<bytes::Bytes>> {
    let applied = raft.metrics().borrow_watched().last_applied;
    let start = start.max(1);
    let end = end.min(applied.map_or(0, |id| frame_raft_index(id.index) + 1));
    let mut frames = Vec::new();
    let mut bytes = 0;
    let mut next = start;
    while next < end && bytes < FETCH_REPLY_BYTES_MAX {
        let read = log
            .read_frames(FrameRange::RaftIndex {
                start: next,
                end: end.min(next + 256),
            })
            .map_err(|error| Error::engine(log.name(), error))?;
        for frame in read {
            bytes += frame.bytes.len();
            frames.push(frame.bytes);
            if bytes >= FETCH_REPLY_BYTES_MAX {
                break;
            }
        }
        next = start + frames.len() as u64;
    }
    Ok(frames)
}

/// One connection to a peer and the calls waiting on it.
struct Connection {
    writer: tokio::sync::Mutex<Writer>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next_id: AtomicU64,
    alive: AtomicBool,
}

impl Connection {
    async fn open(
        address: &str,
        security: &TransportSecurity,
        identity: &Identity,
    ) -> Result<Arc<Connection>> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| Error::Io {
                context: format!("connecting to peer {address}"),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
            })?
            .map_err(|source| Error::Io {
                context: format!("connecting to peer {address}"),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = match security {
            TransportSecurity::Plain => split(stream),
            TransportSecurity::MutualTls { connector, .. } => {
                let name = server_name(address)?;
                let handshake =
                    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, stream));
                match handshake.await {
                    Ok(Ok(stream)) => split(stream),
                    Ok(Err(source)) => {
                        return Err(Error::Io {
                            context: format!("TLS handshake with peer {address}"),
                            source,
                        })
                    }
                    Err(_) => {
                        return Err(Error::Io {
                            context: format!("TLS handshake with peer {address}"),
                            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
                        })
                    }
                }
            }
        };
        let greeted = greet_server(&mut reader, &mut writer, identity, address);
        tokio::time::timeout(CONNECT_TIMEOUT, greeted)
            .await
            .map_err(|_| Error::Io {
                context: format!("waiting for peer {address}'s hello"),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
            })??;
        let connection = Arc::new(Connection {
            writer: tokio::sync::Mutex::new(writer),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            alive: AtomicBool::new(true),
        });
        let reading = Arc::clone(&connection);
        let address = address.to_string();
        tokio::spawn(async move {
            let ended = loop {
                match read_frame(&mut reader).await {
                    Ok(Some(body)) => match decode::<Envelope<Reply>>(&body) {
                        Ok(envelope) => {
                            if let Some(waiting) = lock(&reading.pending).remove(&envelope.id) {
                                let _ = waiting.send(envelope.body);
                            }
                        }
                        Err(error) => break error.to_string(),
                    },
                    Ok(None) => break "closed by the peer".to_string(),
                    Err(error) => break error.to_string(),
                }
            };
            tracing::debug!("connection to peer {address} ended: {ended}");
            reading.alive.store(false, Ordering::Release);
            lock(&reading.pending).clear();
        });
        Ok(connection)
    }

    async fn call(&self, group: &str, request: Request, timeout: Duration) -> Result<Reply> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode(&Envelope {
            id,
            group: group.to_string(),
            body: request,
        })?;
        let (sender, receiver) = oneshot::channel();
        lock(&self.pending).insert(id, sender);
        let sent = {
            let mut writer = self.writer.lock().await;
            write_frame(&mut *writer, &frame).await
        };
        if let Err(error) = sent {
            self.alive.store(false, Ordering::Release);
            lock(&self.pending).remove(&id);
            return Err(error);
        }
        let timed_out = || Error::Io {
            context: format!("waiting {} ms for a peer's reply", timeout.as_millis()),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
        };
        match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(Error::Io {
                context: "waiting for a peer's reply".to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the connection ended",
                ),
            }),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(timed_out())
            }
        }
    }
}

/// Connections to peers, by address, shared by every group of a node.
pub struct Peers {
    connections: tokio::sync::Mutex<HashMap<String, Arc<Connection>>>,
    /// How the last attempt to reach each address failed (`None`: it
    /// succeeded): an unreachable peer is logged once per kind of failure,
    /// not at every heartbeat.
    reachable: tokio::sync::Mutex<HashMap<String, Option<String>>>,
    security: TransportSecurity,
    identity: Arc<Identity>,
    /// Where this node reaches the peers its own configuration names; they
    /// take precedence over the addresses in a group's membership, which
    /// serve only nodes added at run time (the membership holds one address
    /// per node for every replica, while the way to a peer may differ from
    /// node to node: NAT, per-node DNS names, a proxy).
    configured: HashMap<NodeId, String>,
    /// Nodes whose configured address differs from the membership's, once
    /// logged.
    differing_warned: Mutex<std::collections::HashSet<NodeId>>,
}

impl Peers {
    pub fn new(security: TransportSecurity, identity: Arc<Identity>) -> Peers {
        Peers {
            connections: tokio::sync::Mutex::new(HashMap::new()),
            reachable: tokio::sync::Mutex::new(HashMap::new()),
            security,
            identity,
            configured: HashMap::new(),
            differing_warned: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Reaches these peers at these addresses rather than the membership's.
    pub fn with_configured_addresses(
        mut self,
        addresses: impl IntoIterator<Item = (NodeId, String)>,
    ) -> Peers {
        self.configured.extend(addresses);
        self
    }

    /// The address to reach `node_id` at: this node's configured one, else
    /// the one its group's membership records.
    /// A difference between the two is logged once per node: it is
    /// deliberate (NAT, a proxy) or a mistake in the config.
    pub fn address_of<'a>(&'a self, node_id: NodeId, membership_address: &'a str) -> &'a str {
        let Some(configured) = self.configured.get(&node_id) else {
            return membership_address;
        };
        if configured != membership_address && lock(&self.differing_warned).insert(node_id) {
            tracing::warn!(
                "node {node_id}: reached at {configured} as this node's config says, not at {membership_address} as the group's membership records (logged once)"
            );
        }
        configured
    }

    /// A live connection to `address`, opened if there is none. The map is
    /// not locked while connecting: a peer that is slow to answer (a
    /// partition, a stopped process) must not hold up the others'
    /// heartbeats. Two callers may both open one; the last one kept wins.
    async fn connection(&self, address: &str) -> Result<Arc<Connection>> {
        if let Some(connection) = self.connections.lock().await.get(address) {
            if connection.alive.load(Ordering::Acquire) {
                return Ok(Arc::clone(connection));
            }
        }
        let opened = Connection::open(address, &self.security, &self.identity).await;
        let mut reachable = self.reachable.lock().await;
        let failure = opened.as_ref().err().map(ToString::to_string);
        let before = reachable.insert(address.to_string(), failure.clone());
        match (&failure, before) {
            (Some(error), before) if before.as_ref() != Some(&failure) => {
                tracing::warn!(
                    "peer {address} is unreachable: {error} (logged again when it fails otherwise or was reached)"
                );
            }
            (None, Some(Some(_))) => tracing::info!("peer {address} is reachable again"),
            _ => {}
        }
        drop(reachable);
        let connection = opened?;
        self.connections
            .lock()
            .await
            .insert(address.to_string(), Arc::clone(&connection));
        Ok(connection)
    }

    /// Committed frames `[start, end)` of `group` from the peer at
    /// `address` (fewer when it has fewer; empty when none).
    pub async fn fetch(
        &self,
        address: &str,
        group: &str,
        start: u64,
        end: u64,
    ) -> Result<Vec<bytes::Bytes>> {
        let request = Request::Fetch { start, end };
        match self.call(address, group, request, FETCH_TIMEOUT).await {
            Ok(Reply::Frames(frames)) => Ok(frames),
            Ok(Reply::Refused(message)) => Err(Error::Raft {
                stream: group.to_string(),
                message: format!("peer {address} refused a fetch: {message}"),
            }),
            Ok(_) => Err(Error::Format(format!(
                "peer {address} answered a fetch with another kind of reply"
            ))),
            Err(CallError::Unreachable(error) | CallError::Network(error)) => Err(error),
        }
    }

    /// Bytes `[position, position + length)` of the peer's sealed segment
    /// `segment` (fewer at its end).
    pub async fn segment_chunk(
        &self,
        address: &str,
        group: &str,
        segment: &natswal::SealedSegment,
        position: u64,
        length: u64,
    ) -> Result<bytes::Bytes> {
        let request = Request::SegmentChunk {
            base_offset: segment.base_offset,
            crc32c: segment.crc32c,
            position,
            length,
        };
        match self.call(address, group, request, FETCH_TIMEOUT).await {
            Ok(Reply::SegmentChunk(bytes)) => Ok(bytes),
            Ok(Reply::Refused(message)) => Err(Error::Raft {
                stream: group.to_string(),
                message: format!("peer {address} refused a segment chunk: {message}"),
            }),
            Ok(_) => Err(Error::Format(format!(
                "peer {address} answered a segment chunk with another kind of reply"
            ))),
            Err(CallError::Unreachable(error) | CallError::Network(error)) => Err(error),
        }
    }

    /// The read index of `group`'s leader at `address` (openraft index).
    pub async fn read_index(&self, address: &str, group: &str) -> Result<u64> {
        match self
            .call(address, group, Request::ReadIndex, FETCH_TIMEOUT)
            .await
        {
            Ok(Reply::ReadIndex(index)) => Ok(index),
            Ok(Reply::Refused(message)) => Err(Error::Raft {
                stream: group.to_string(),
                message: format!("peer {address} refused a read index: {message}"),
            }),
            Ok(_) => Err(Error::Format(format!(
                "peer {address} answered a read index with another kind of reply"
            ))),
            Err(CallError::Unreachable(error) | CallError::Network(error)) => Err(error),
        }
    }

    async fn call(
        &self,
        address: &str,
        group: &str,
        request: Request,
        timeout: Duration,
    ) -> std::result::Result<Reply, CallError> {
        let connection = self
            .connection(address)
            .await
            .map_err(CallError::Unreachable)?;
        connection
            .call(group, request, timeout)
            .await
            .map_err(CallError::Network)
    }
}

enum CallError {
    Unreachable(Error),
    Network(Error),
}

impl CallError {
    fn into_rpc(self) -> RPCError<StreamRaft> {
        match self {
            CallError::Unreachable(error) => RPCError::Unreachable(Unreachable::new(&error)),
            CallError::Network(error) => RPCError::Network(NetworkError::new(&error)),
        }
    }
}

fn unexpected(reply: Reply) -> RPCError<StreamRaft> {
    let message = match reply {
        Reply::Refused(message) => message,
        _ => "the peer answered with a reply of another kind".to_string(),
    };
    RPCError::Network(NetworkError::from_string(message))
}

/// openraft's network factory for one group.
#[derive(Clone)]
pub struct GroupNetwork {
    pub peers: Arc<Peers>,
    pub group: String,
}

impl RaftNetworkFactory<StreamRaft> for GroupNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &crate::types::Node) -> PeerClient {
        PeerClient {
            address: self.peers.address_of(target, &node.addr).to_string(),
            peers: Arc::clone(&self.peers),
            group: self.group.clone(),
        }
    }
}

/// Calls to one peer for one group.
pub struct PeerClient {
    peers: Arc<Peers>,
    group: String,
    address: String,
}

impl PeerClient {
    async fn call(
        &self,
        request: Request,
        option: &RPCOption,
    ) -> std::result::Result<Reply, RPCError<StreamRaft>> {
        self.peers
            .call(&self.address, &self.group, request, option.hard_ttl())
            .await
            .map_err(CallError::into_rpc)
    }
}

impl RaftNetworkV2<StreamRaft> for PeerClient {
    type SnapshotData = SnapshotManifest;

    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<StreamRaft>,
        option: RPCOption,
    ) -> std::result::Result<AppendEntriesResponse<StreamRaft>, RPCError<StreamRaft>> {
        match self.call(Request::Append(request), &option).await? {
            Reply::Append(response) => Ok(response),
            other => Err(unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        request: VoteRequest<StreamRaft>,
        option: RPCOption,
    ) -> std::result::Result<VoteResponse<StreamRaft>, RPCError<StreamRaft>> {
        match self.call(Request::Vote(request), &option).await? {
            Reply::Vote(response) => Ok(response),
            other => Err(unexpected(other)),
        }
    }

    async fn pre_vote(
        &mut self,
        request: VoteRequest<StreamRaft>,
        option: RPCOption,
    ) -> std::result::Result<VoteResponse<StreamRaft>, RPCError<StreamRaft>> {
        match self.call(Request::PreVote(request), &option).await? {
            Reply::Vote(response) => Ok(response),
            other => Err(unexpected(other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<
            crate::types::CommittedLeaderId,
            NodeId,
            crate::types::Node,
            SnapshotManifest,
        >,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> std::result::Result<SnapshotResponse<StreamRaft>, StreamingError<StreamRaft>> {
        let request = Request::Snapshot {
            vote,
            meta: snapshot.meta,
            manifest: snapshot.snapshot.encode(),
        };
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            // The follower downloads the segments it lacks before it
            // answers: far longer than one RPC's deadline.
            reply = self.peers.call(&self.address, &self.group, request, SNAPSHOT_TIMEOUT) => reply,
        };
        match reply {
            Ok(Reply::Snapshot(response)) => Ok(response),
            Ok(other) => Err(StreamingError::Network(match unexpected(other) {
                RPCError::Network(error) => error,
                _ => NetworkError::from_string("unexpected reply"),
            })),
            Err(CallError::Unreachable(error)) => {
                Err(StreamingError::Unreachable(Unreachable::new(&error)))
            }
            Err(CallError::Network(error)) => {
                Err(StreamingError::Network(NetworkError::new(&error)))
            }
        }
    }

    async fn transfer_leader(
        &mut self,
        request: TransferLeaderRequest<StreamRaft>,
        option: RPCOption,
    ) -> std::result::Result<TransferLeaderResponse<StreamRaft>, RPCError<StreamRaft>> {
        match self.call(Request::TransferLeader(request), &option).await? {
            Reply::TransferLeader(response) => Ok(response),
            other => Err(unexpected(other)),
        }
    }
}
