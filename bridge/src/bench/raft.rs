//! `natswal bench raft`: a replicated stream's quorum path in one process
//! (three nodes over TCP on loopback, real files and fsync, no NATS hop)
//! beside the same load on a one-node group in the same run, and the
//! failover time (leader stopped -> first commit from its successor).
//! The figures are the replication layer's own ceiling and costs; the
//! client-facing comparison with JetStream R3 is `bench cluster`.

use super::percentiles_us;
use crate::error::{BridgeError, Result};
use natswal::io::os::OsFileSystem;
use natswal::io::{FileSystem, WriteMode};
use natswal::{Keyring, SegmentCache, StreamConfig};
use natswal_replication::tls::TransportSecurity;
use natswal_replication::types::Node;
use natswal_replication::{
    serve, GroupOptions, Identity, Peers, ProposedRecord, RaftTiming, RecordBatch, Registry,
    ReplicatedStream,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct RaftBenchArgs {
    /// Directory for the nodes' data (emptied before and after).
    #[arg(long, default_value = "bench-data")]
    pub dir: PathBuf,
    /// Seconds of each load case.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Proposer tasks.
    #[arg(long, default_value_t = 4)]
    pub proposers: usize,
    /// Proposals each proposer keeps in flight.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// Records per proposal (one entry, one frame).
    #[arg(long, default_value_t = 16)]
    pub records_per_entry: usize,
    /// Payload sizes to measure, in bytes.
    #[arg(long, value_delimiter = ',', default_value = "128,1024")]
    pub sizes: Vec<usize>,
    /// Leader stops to time (each: stop, first commit from the successor,
    /// restart).
    #[arg(long, default_value_t = 10)]
    pub failovers: usize,
}

const STREAM: &str = "bench";

struct BenchNode {
    id: u64,
    address: String,
    directory: PathBuf,
    registry: Arc<Registry>,
    peers: Arc<Peers>,
    peer_addresses: Vec<String>,
    stream: Option<Arc<ReplicatedStream>>,
}

fn raft_error(error: natswal_replication::Error) -> BridgeError {
    BridgeError::InvalidArgument(error.to_string())
}

async fn open(node: &BenchNode) -> Result<Arc<ReplicatedStream>> {
    let file_system: Arc<dyn FileSystem> = Arc::new(OsFileSystem::new(WriteMode::Pwrite));
    let options = GroupOptions {
        node_id: node.id,
        name: STREAM,
        directory: &node.directory,
        config: StreamConfig::default(),
        keyring: Arc::new(Keyring::default()),
        cache: Arc::new(SegmentCache::new(16)),
        timing: RaftTiming::default(),
        snapshots: natswal_replication::SnapshotSettings::default(),
        scrub_bytes_per_second: 0,
        peer_addresses: node.peer_addresses.clone(),
        on_scrub_restore: None,
    };
    ReplicatedStream::open(
        file_system,
        options,
        Arc::clone(&node.peers),
        Arc::clone(&node.registry),
    )
    .await
    .map(Arc::new)
    .map_err(raft_error)
}

async fn start(root: &Path, count: u64) -> Result<Vec<BenchNode>> {
    let mut listeners = Vec::new();
    for _ in 0..count {
        listeners.push(
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|error| BridgeError::io("cannot bind a node's port", error))?,
        );
    }
    let addresses: Vec<String> = listeners
        .iter()
        .map(|listener| listener.local_addr().map(|address| address.to_string()))
        .collect::<std::io::Result<_>>()
        .map_err(|error| BridgeError::io("cannot read a node's address", error))?;
    let mut nodes = Vec::new();
    for (index, listener) in listeners.into_iter().enumerate() {
        let registry = Arc::new(Registry::default());
        let node_id = index as u64 + 1;
        // One process, fresh directories: an identity in memory suffices.
        let identity = Arc::new(Identity::in_memory(node_id, node_id));
        tokio::spawn(serve(
            listener,
            Arc::clone(&registry),
            TransportSecurity::Plain,
            Arc::clone(&identity),
        ));
        let address = addresses[index].clone();
        let directory = root.join(format!("node-{}", index + 1));
        std::fs::create_dir_all(&directory)
            .map_err(|error| BridgeError::io("cannot create a node's directory", error))?;
        let mut node = BenchNode {
            id: index as u64 + 1,
            peer_addresses: addresses
                .iter()
                .filter(|peer| **peer != address)
                .cloned()
                .collect(),
            address,
            directory,
            registry,
            peers: Arc::new(Peers::new(TransportSecurity::Plain, identity)),
            stream: None,
        };
        node.stream = Some(open(&node).await?);
        nodes.push(node);
    }
    let members: BTreeMap<u64, Node> = nodes
        .iter()
        .map(|node| {
            let addr = node.address.clone();
            (node.id, Node { addr })
        })
        .collect();
    let first = nodes[0].stream.as_ref().expect("opened above");
    first.initialize(members).await.map_err(raft_error)?;
    Ok(nodes)
}

/// The leader once it has committed an entry of its term.
async fn leader(nodes: &[BenchNode]) -> Result<Arc<ReplicatedStream>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for stream in nodes.iter().filter_map(|node| node.stream.as_ref()) {
            if stream.status().leads {
                return Ok(Arc::clone(stream));
            }
        }
        if Instant::now() > deadline {
            return Err(BridgeError::InvalidArgument("no leader within 30 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn batch(records: usize, payload: &bytes::Bytes) -> RecordBatch {
    RecordBatch {
        atomic: false,
        records: (0..records)
            .map(|_| ProposedRecord {
                timestamp_ns: 0,
                subject: bytes::Bytes::from_static(b"bench.orders"),
                headers: bytes::Bytes::new(),
                payload: payload.clone(),
            })
            .collect(),
    }
}

struct Load {
    records_per_second: f64,
    entries_per_second: f64,
    latency_us: Vec<f64>,
}

async fn load(leader: &Arc<ReplicatedStream>, args: &RaftBenchArgs, size: usize) -> Result<Load> {
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let entries = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.proposers * args.in_flight {
        let leader = Arc::clone(leader);
        let entries = Arc::clone(&entries);
        let latencies = Arc::clone(&latencies);
        let proposal = batch(args.records_per_entry, &payload);
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < deadline {
                let sent = Instant::now();
                leader.propose(proposal.clone()).await?;
                samples.push(sent.elapsed().as_nanos() as u64);
                entries.fetch_add(1, Ordering::Relaxed);
            }
            latencies.lock().expect("not poisoned").extend(samples);
            Ok::<(), natswal_replication::Error>(())
        }));
    }
    for task in tasks {
        task.await
            .map_err(|error| BridgeError::InvalidArgument(format!("a proposer panicked: {error}")))?
            .map_err(raft_error)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let entries = entries.load(Ordering::Relaxed) as f64;
    let mut samples = std::mem::take(&mut *latencies.lock().expect("not poisoned"));
    Ok(Load {
        records_per_second: entries * args.records_per_entry as f64 / elapsed,
        entries_per_second: entries / elapsed,
        latency_us: percentiles_us(&mut samples, &[0.5, 0.99]),
    })
}

async fn stop_all(nodes: &mut [BenchNode]) -> Result<()> {
    for node in nodes {
        if let Some(stream) = node.stream.take() {
            let stream = Arc::try_unwrap(stream)
                .map_err(|_| BridgeError::InvalidArgument("a stream is still in use".into()))?;
            stream.shutdown().await.map_err(raft_error)?;
        }
        node.registry.remove(STREAM);
    }
    Ok(())
}

/// Stops the leader, times the first commit of its successor, restarts it.
async fn failover(nodes: &mut [BenchNode], records: usize) -> Result<Duration> {
    let leader = leader(nodes).await?;
    let leader_id = leader.status().node_id;
    drop(leader);
    let index = nodes
        .iter()
        .position(|node| node.id == leader_id)
        .expect("a node");
    // The leader stops answering its peers at once (as if it crashed);
    // its group shuts down meanwhile, outside the measured time.
    nodes[index].registry.remove(STREAM);
    let stopped = Instant::now();
    let old = nodes[index].stream.take().expect("running");
    let old = Arc::try_unwrap(old)
        .map_err(|_| BridgeError::InvalidArgument("the leader is still in use".into()))?;
    let shutdown = tokio::spawn(old.shutdown());
    let proposal = batch(records, &bytes::Bytes::from_static(b"failover"));
    let elapsed = loop {
        let mut committed = false;
        for stream in nodes.iter().filter_map(|node| node.stream.as_ref()) {
            if stream.status().is_leader && stream.propose(proposal.clone()).await.is_ok() {
                committed = true;
                break;
            }
        }
        if committed {
            break stopped.elapsed();
        }
        if stopped.elapsed() > Duration::from_secs(30) {
            return Err(BridgeError::InvalidArgument(
                "no new leader within 30 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    shutdown
        .await
        .map_err(|error| BridgeError::InvalidArgument(format!("a shutdown panicked: {error}")))?
        .map_err(raft_error)?;
    nodes[index].stream = Some(open(&nodes[index]).await?);
    Ok(elapsed)
}

pub async fn run(args: RaftBenchArgs) -> Result<()> {
    let root = args.dir.join("raft-bench");
    let _ = std::fs::remove_dir_all(&root);
    println!("# natswal bench raft");
    println!();
    println!(
        "One process, nodes over TCP on loopback, real files and fsync (pwrite mode), no NATS hop; {} proposers x {} proposals in flight, {} records per proposal (one entry, one frame), {:.1} s per case; an ack is the entry committed (synced on a majority) and applied on the leader. Peer: the same load on a one-node group in the same run.",
        args.proposers, args.in_flight, args.records_per_entry, args.seconds
    );
    println!();
    println!("| payload | group | records/s | entries/s | p50 ms | p99 ms | vs one node |");
    println!("|---|---|---|---|---|---|---|");
    for size in &args.sizes {
        let mut figures = Vec::new();
        for replicas in [1u64, 3] {
            let directory = root.join(format!("r{replicas}-{size}"));
            let mut nodes = start(&directory, replicas).await?;
            let leader = leader(&nodes).await?;
            let measured = load(&leader, &args, *size).await?;
            drop(leader);
            stop_all(&mut nodes).await?;
            let _ = std::fs::remove_dir_all(&directory);
            figures.push((replicas, measured));
        }
        let single = figures[0].1.records_per_second;
        for (replicas, load) in &figures {
            println!(
                "| {size} B | {replicas} node{} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2}x |",
                if *replicas == 1 { "" } else { "s" },
                load.records_per_second,
                load.entries_per_second,
                load.latency_us[0] / 1000.0,
                load.latency_us[1] / 1000.0,
                load.records_per_second / single
            );
        }
    }
    if args.failovers > 0 {
        let directory = root.join("failover");
        let mut nodes = start(&directory, 3).await?;
        let mut times = Vec::new();
        for _ in 0..args.failovers {
            times.push(failover(&mut nodes, args.records_per_entry).await?);
        }
        stop_all(&mut nodes).await?;
        times.sort();
        let millis = |duration: &Duration| duration.as_secs_f64() * 1000.0;
        println!();
        println!(
            "Failover (leader stops answering its peers -> first commit from its successor; election timeout {}-{} ms, heartbeat {} ms) over {} stops: median {:.0} ms, max {:.0} ms",
            RaftTiming::default().election_timeout_min_ms,
            RaftTiming::default().election_timeout_max_ms,
            RaftTiming::default().heartbeat_interval_ms,
            times.len(),
            millis(&times[times.len() / 2]),
            millis(times.last().expect("at least one"))
        );
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
