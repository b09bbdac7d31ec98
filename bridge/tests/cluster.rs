//! A natswal cluster as users run it: three `natswal serve` processes on
//! loopback, one nats-server, a replicated stream at `quorum` durability,
//! `natswal cluster init|status|transfer-leader`, and leaders SIGKILLed
//! under continuous publishing. Every acknowledged message must be on
//! every replica exactly once, at the offset its PubAck named, and the
//! replicas' logs must be identical.
//!
//! `NATSWAL_CLUSTER_KILLS` sets the number of leader kills (CI: 10).

mod support;

use bytes::Bytes;
use natswal::io::os::OsFileSystem;
use natswal::io::{FileSystem, WriteMode};
use natswal::{Keyring, Log, LogOptions, RecoveryMode, SegmentCache, StartPosition, StreamConfig};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

const STREAM: &str = "orders";

struct Cluster {
    nats: NatsServer,
    nodes: Vec<Natswal>,
    leader_killed_last: Option<u64>,
    /// The link from node `.0` to node `.1`, when the nodes reach each
    /// other through proxies (`start_partitionable`).
    links: BTreeMap<(u64, u64), LinkProxy>,
}

/// The replicated stream, with small segments so that tests see sealed
/// ones (and their indexes).
fn stream_section() -> String {
    stream_section_with("64KiB")
}

fn stream_section_with(segment_bytes: &str) -> String {
    format!(
        "[[streams]]\nname = \"{STREAM}\"\nsubjects = [\"orders.>\"]\nreplicas = 3\nsegment_bytes = \"{segment_bytes}\"\nmax_message_bytes = \"16KiB\"\nallow_atomic = true\n"
    )
}

/// Node `id`'s config: it listens on `ports[id - 1]`, reaches peer `p`
/// at `peer_port(p)`, and has `keys.cluster` in its `[cluster]` table and
/// segments of `keys.segment_bytes`.
fn node_config(
    id: u64,
    ports: &[u16],
    peer_port: impl Fn(u64) -> u16,
    keys: &ConfigKeys,
) -> String {
    let cluster_keys = keys.cluster;
    let mut config = format!(
        "[cluster]\nnode_id = {id}\nlisten = \"127.0.0.1:{}\"\n{cluster_keys}",
        ports[id as usize - 1]
    );
    for peer in (1..=ports.len() as u64).filter(|peer| *peer != id) {
        let port = peer_port(peer);
        config.push_str(&format!(
            "[[cluster.peers]]\nid = {peer}\naddress = \"127.0.0.1:{port}\"\n"
        ));
    }
    config.push_str(&stream_section_with(keys.segment_bytes));
    config
}

/// What a test changes in the nodes' configs.
struct ConfigKeys {
    cluster: &'static str,
    segment_bytes: &'static str,
}

const DEFAULT_KEYS: ConfigKeys = ConfigKeys {
    cluster: "",
    segment_bytes: "64KiB",
};

impl Cluster {
    fn start(root: &Path) -> Cluster {
        Cluster::start_with_keys(root, &DEFAULT_KEYS)
    }

    fn start_with_keys(root: &Path, keys: &ConfigKeys) -> Cluster {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        Cluster::start_with_links(root, &ports, BTreeMap::new(), keys)
    }

    /// Three nodes that reach each other only through a proxy per link,
    /// which the test can cut.
    async fn start_partitionable(root: &Path) -> Cluster {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut links = BTreeMap::new();
        for from in 1..=3 {
            for to in (1..=3).filter(|to| *to != from) {
                links.insert((from, to), LinkProxy::start(ports[to as usize - 1]).await);
            }
        }
        Cluster::start_with_links(root, &ports, links, &DEFAULT_KEYS)
    }

    fn start_with_links(
        root: &Path,
        ports: &[u16],
        links: BTreeMap<(u64, u64), LinkProxy>,
        keys: &ConfigKeys,
    ) -> Cluster {
        let nats = NatsServer::start();
        let nodes = (1..=3)
            .map(|id| {
                let peer_port = |peer: u64| {
                    links
                        .get(&(id, peer))
                        .map_or(ports[peer as usize - 1], |link| link.port)
                };
                Natswal::start(
                    &nats.url(),
                    &root.join(format!("node-{id}")),
                    &node_config(id, ports, peer_port, keys),
                )
            })
            .collect();
        Cluster {
            nats,
            nodes,
            leader_killed_last: None,
            links,
        }
    }

    /// Cuts every link to and from node `id` (it still reaches NATS).
    fn isolate(&self, id: u64) {
        for ((from, to), link) in &self.links {
            if *from == id || *to == id {
                link.cut();
            }
        }
    }

    fn heal(&self) {
        for link in self.links.values() {
            link.heal();
        }
    }

    fn cli(&self, args: &[&str]) -> (i32, String) {
        let url = self.nats.url();
        let mut full: Vec<&str> = vec!["cluster"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--nats-url", &url]);
        natswal_run(&full)
    }

    /// Every answering node's view of the stream, by node id.
    fn views(&self) -> BTreeMap<u64, Value> {
        let (code, output) = self.cli(&["status", "--json", "--wait-ms", "300"]);
        if code != 0 {
            return BTreeMap::new();
        }
        output
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter_map(|node| {
                let id = node["node_id"].as_u64()?;
                let stream = node["streams"].as_array()?.first()?.clone();
                Some((id, stream))
            })
            .collect()
    }

    /// The node that leads the stream, as its own view says.
    fn leader(&self) -> Option<u64> {
        self.views()
            .iter()
            .find(|(_, view)| view["is_leader"] == true)
            .map(|(id, _)| *id)
    }

    fn node(&mut self, id: u64) -> &mut Natswal {
        &mut self.nodes[id as usize - 1]
    }
}

/// Continuous publishing with `Nats-Msg-Id`s: each message is retried with
/// its id until a PubAck names its offset.
struct Publishers {
    acked: Arc<Mutex<BTreeMap<u64, (u64, Instant)>>>,
    stop: Arc<AtomicBool>,
    next: Arc<AtomicU64>,
    tasks: tokio::task::JoinSet<()>,
}

impl Publishers {
    fn start(client: async_nats::Client, publishers: usize) -> Publishers {
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..publishers {
            let (client, acked, stop, next) = (
                client.clone(),
                Arc::clone(&acked),
                Arc::clone(&stop),
                Arc::clone(&next),
            );
            tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let message = next.fetch_add(1, Ordering::Relaxed);
                    let offset = publish_until_acked(&client, message, &stop).await;
                    if let Some(offset) = offset {
                        acked
                            .lock()
                            .unwrap()
                            .insert(message, (offset, Instant::now()));
                    }
                }
            });
        }
        Publishers {
            acked,
            stop,
            next,
            tasks,
        }
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits for `more` acks; on a timeout, fails with every node's view
    /// and log.
    async fn wait_for_acks(&self, cluster: &Cluster, more: usize, timeout: Duration) {
        let target = self.acked_count() + more;
        let deadline = Instant::now() + timeout;
        while self.acked_count() < target {
            if Instant::now() >= deadline {
                let views = cluster.views();
                let logs: Vec<String> = cluster
                    .nodes
                    .iter()
                    .map(|node| node.output().join("\n"))
                    .collect();
                panic!(
                    "publishing did not resume: {} acks, waiting for {target}; views {views:?}; logs:\n{}",
                    self.acked_count(),
                    logs.join("\n----\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) -> BTreeMap<u64, (u64, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        let _ = self.next.load(Ordering::Relaxed);
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// Messages from this id on carry 8 KiB payloads (bulk writes).
const BULK_FIRST: u64 = 1 << 32;

fn payload_of(message: u64) -> Bytes {
    if message >= BULK_FIRST {
        let mut payload = format!("bulk {message} ").into_bytes();
        payload.resize(8192, b'a' + (message % 26) as u8);
        return Bytes::from(payload);
    }
    Bytes::from(format!(
        "order {message} {}",
        "x".repeat((message % 90) as usize)
    ))
}

/// Publishes `message` until it is acknowledged (an error reply or no
/// responder means: retry with the same `Nats-Msg-Id`); `None` if
/// publishing stopped first.
async fn publish_until_acked(
    client: &async_nats::Client,
    message: u64,
    stop: &AtomicBool,
) -> Option<u64> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("m-{message}").as_str());
    loop {
        let request = client.request_with_headers(
            format!("orders.{}", message % 5),
            headers.clone(),
            payload_of(message),
        );
        // A request that reached a killed leader gets no answer: retry
        // soon (a copy that was stored is answered as a duplicate).
        if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(1), request).await {
            if let Ok(ack) = serde_json::from_slice::<Value>(&reply.payload) {
                if let Some(offset) = ack["seq"].as_u64() {
                    return Some(offset);
                }
            }
        }
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every record of a stopped node's replicated log: offset -> (subject,
/// headers, payload).
fn read_replica(data_dir: &Path) -> BTreeMap<u64, (Bytes, Bytes, Bytes)> {
    let directory: PathBuf = data_dir.join("replicated").join(STREAM);
    let file_system: Arc<dyn FileSystem> = Arc::new(OsFileSystem::new(WriteMode::Pwrite));
    let options = LogOptions {
        name: STREAM.to_string(),
        config: StreamConfig::default(),
        recovery_mode: RecoveryMode::Strict,
        keyring: Arc::new(Keyring::default()),
        node_id: 1,
        cache: Arc::new(SegmentCache::new(8)),
        store_locked: None,
        group_sync: None,
    };
    let (log, _) =
        Log::open(file_system, &directory, options).expect("a replica's log opens strictly");
    let mut reader = natswal::Reader::new(log.clone(), StartPosition::Earliest, None).unwrap();
    let mut records = BTreeMap::new();
    while let Some(record) = reader.next().expect("every frame reads") {
        records.insert(
            record.offset,
            (record.subject, record.headers, record.payload),
        );
    }
    drop(reader);
    log.close().unwrap();
    records
}

/// The longest gap between consecutive acks from the last one before
/// `from` through `from + within`.
fn longest_pause(sorted_times: &[Instant], from: Instant, within: Duration) -> Duration {
    let first = sorted_times
        .partition_point(|at| *at <= from)
        .saturating_sub(1);
    let last = sorted_times.partition_point(|at| *at <= from + within);
    sorted_times[first..last.max(first + 1).min(sorted_times.len())]
        .windows(2)
        .map(|pair| pair[1].duration_since(pair[0]))
        .max()
        .unwrap_or_default()
}

type Records = BTreeMap<u64, (Bytes, Bytes, Bytes)>;

/// Stops the nodes at `indexes` cleanly, reads each one's log offline and
/// asserts they are identical; returns that log.
fn stop_and_compare(cluster: &mut Cluster, indexes: &[usize]) -> Records {
    for index in indexes {
        assert!(
            cluster.nodes[*index].terminate().success(),
            "a node stops cleanly"
        );
    }
    let replicas: Vec<Records> = indexes
        .iter()
        .map(|index| read_replica(&cluster.nodes[*index].data_dir))
        .collect();
    assert!(
        replicas.windows(2).all(|pair| pair[0] == pair[1]),
        "the replicas' logs are identical"
    );
    replicas.into_iter().next().unwrap()
}

/// Every acked (message, offset) holds that message's payload.
fn assert_acked_stored(records: &Records, acked: impl IntoIterator<Item = (u64, u64)>) {
    for (message, offset) in acked {
        assert_eq!(
            records.get(&offset).map(|record| &record.2),
            Some(&payload_of(message)),
            "acked message {message} at offset {offset}"
        );
    }
}

/// A node's `/metrics` value of the stream's `name`.
fn node_metric(node: &Natswal, name: &str) -> u64 {
    let (status, metrics) = node.http_get("/metrics");
    assert_eq!(status, 200, "{metrics}");
    let prefix = format!("{name}{{stream=\"{STREAM}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{metrics}"))
}

/// Every record has its `Nats-Msg-Id`, and no id is stored twice.
fn assert_each_id_once(records: &Records) {
    let mut seen_ids = std::collections::HashSet::new();
    for (subject, headers, _) in records.values() {
        assert!(subject.starts_with(b"orders."));
        let text = String::from_utf8_lossy(headers).to_string();
        let id = text
            .lines()
            .find_map(|line| line.strip_prefix("Nats-Msg-Id: "))
            .expect("every record has its id")
            .to_string();
        assert!(seen_ids.insert(id.clone()), "{id} stored twice");
    }
}

/// A count from the environment (a full run), else the CI default.
fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|count| count.parse().ok())
        .unwrap_or(default)
}

/// A random source seeded from `name` in the environment, else from the
/// clock; the seed is printed, so a failing run can be replayed.
fn seeded_random(name: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed = std::env::var(name)
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{name}={seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn kills() -> usize {
    env_count("NATSWAL_CLUSTER_KILLS", 10) as usize
}

/// Runs `natswal cluster init`, waits for a leader and connects a client:
/// the leader's id and the client.
async fn initialized(cluster: &Cluster) -> (u64, async_nats::Client) {
    let (code, output) = cluster.cli(&["init"]);
    assert_eq!(code, 0, "cluster init: {output}");
    let leader = wait_for_leader(cluster, Duration::from_secs(15)).await;
    (leader, connect(&cluster.nats.url()).await)
}

async fn wait_for_leader(cluster: &Cluster, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(leader) = cluster.leader() {
            return leader;
        }
        assert!(Instant::now() < deadline, "no leader after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every node has applied the same last entry.
async fn wait_converged(cluster: &Cluster, timeout: Duration) -> BTreeMap<u64, Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let views = cluster.views();
        let applied: Vec<&Value> = views.values().map(|view| &view["applied"]).collect();
        let last: Vec<&Value> = views.values().map(|view| &view["last_index"]).collect();
        if views.len() == 3
            && applied.windows(2).all(|pair| pair[0] == pair[1])
            && applied[0] == last[0]
            && last.windows(2).all(|pair| pair[0] == pair[1])
        {
            return views;
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = cluster
                .nodes
                .iter()
                .map(|node| node.output().join("\n"))
                .collect();
            panic!(
                "replicas did not converge: {views:?}; logs:\n{}",
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_acks_survive_leader_kills_on_every_replica() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path());
    let (code, output) = cluster.cli(&["init"]);
    assert_eq!(code, 0, "cluster init: {output}");
    assert!(output.contains("\"initialized\""), "{output}");
    let (code, again) = cluster.cli(&["init"]);
    assert_eq!(code, 0, "a second init is harmless: {again}");
    assert!(
        again.contains(STREAM) && again.contains("already_initialized"),
        "{again}"
    );
    let first_leader = wait_for_leader(&cluster, Duration::from_secs(15)).await;

    let client = connect(&cluster.nats.url()).await;
    let publishers = Publishers::start(client.clone(), 16);
    publishers
        .wait_for_acks(&cluster, 500, Duration::from_secs(30))
        .await;

    // transfer-leader moves leadership to the node asked for.
    let target = first_leader % 3 + 1;
    let (code, output) = cluster.cli(&[
        "transfer-leader",
        "--stream",
        STREAM,
        "--to",
        &target.to_string(),
    ]);
    assert_eq!(code, 0, "transfer-leader: {output}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.leader() != Some(target) {
        assert!(
            Instant::now() < deadline,
            "leadership did not move to {target}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publishers
        .wait_for_acks(&cluster, 300, Duration::from_secs(30))
        .await;

    let mut kill_times = Vec::new();
    for round in 0..kills() {
        let leader = wait_for_leader(&cluster, Duration::from_secs(15)).await;
        kill_times.push(Instant::now());
        cluster.node(leader).kill();
        cluster.leader_killed_last = Some(leader);
        publishers
            .wait_for_acks(&cluster, 300, Duration::from_secs(30))
            .await;
        cluster.node(leader).restart();
        publishers
            .wait_for_acks(&cluster, 200, Duration::from_secs(30))
            .await;
        eprintln!(
            "round {round}: killed leader {leader}, {} acked",
            publishers.acked_count()
        );
    }
    let acked = publishers.stop().await;
    // The leader changed since the messages acked just before the last
    // kill (recent enough to be in the duplicate window of 100 000 ids): a
    // retry of one is answered with its original offset, as a duplicate.
    let last_kill = *kill_times.last().expect("a kill");
    let mut before_last_kill: Vec<(u64, u64, Instant)> = acked
        .iter()
        .filter(|(_, (_, at))| *at < last_kill)
        .map(|(message, (offset, at))| (*message, *offset, *at))
        .collect();
    before_last_kill.sort_by_key(|(_, _, at)| *at);
    for (message, offset, _) in before_last_kill.iter().rev().take(20) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("m-{message}").as_str());
        let reply = client
            .request_with_headers("orders.retry", headers, payload_of(*message))
            .await
            .expect("a retry is answered");
        let ack: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(ack["seq"].as_u64(), Some(*offset), "{ack}");
        assert_eq!(ack["duplicate"], true, "{ack}");
    }
    let views = wait_converged(&cluster, Duration::from_secs(30)).await;
    // Every node but the last leader killed (restarted since) saw that
    // kill's election and its leader change.
    let last_killed = cluster.leader_killed_last;
    for id in (1..=3).filter(|id| Some(*id) != last_killed) {
        let node = cluster.node(id);
        assert!(
            node_metric(node, "natswal_raft_elections_total") >= 1,
            "node {id}"
        );
        assert!(
            node_metric(node, "natswal_raft_leader_changes_total") >= 1,
            "node {id}"
        );
    }
    let (code, table) = cluster.cli(&["status"]);
    assert_eq!(code, 0, "{table}");
    assert!(
        table.contains(STREAM) && table.contains("leader"),
        "status shows the leader: {table}"
    );

    // The longest pause between two acks after each kill, until the next
    // one (from the last ack before it).
    let mut times: Vec<Instant> = acked.values().map(|(_, at)| *at).collect();
    times.sort();
    let pauses: Vec<Duration> = kill_times
        .iter()
        .enumerate()
        .map(|(index, killed)| {
            let next = kill_times.get(index + 1).copied();
            let within = next.map_or(Duration::from_secs(10), |next| next.duration_since(*killed));
            longest_pause(&times, *killed, within)
        })
        .collect();
    let mut sorted = pauses.clone();
    sorted.sort();
    eprintln!(
        "unavailability over {} leader kills: median {:?}, max {:?}",
        sorted.len(),
        sorted.get(sorted.len() / 2),
        sorted.last()
    );
    eprintln!("unavailability per leader kill: {pauses:?}; converged: {views:?}");

    let records = &stop_and_compare(&mut cluster, &[0, 1, 2]);
    assert_each_id_once(records);
    for (message, (offset, _)) in &acked {
        let (_, headers, payload) = records
            .get(offset)
            .unwrap_or_else(|| panic!("acked message {message} at offset {offset} is missing"));
        assert_eq!(
            payload,
            &payload_of(*message),
            "offset {offset} holds message {message}"
        );
        assert!(String::from_utf8_lossy(headers).contains(&format!("m-{message}\r")));
    }
    assert!(acked.len() >= 500 + 300 * kills());
}

/// Publishes `count` new messages (ids from `first`) and returns their
/// offsets.
async fn publish_batch(client: &async_nats::Client, first: u64, count: u64) -> BTreeMap<u64, u64> {
    let stop = AtomicBool::new(false);
    let mut acked = BTreeMap::new();
    let pending: Vec<_> = (first..first + count)
        .map(|message| {
            let stop = &stop;
            async move { (message, publish_until_acked(client, message, stop).await) }
        })
        .collect();
    for (message, offset) in futures_util::future::join_all(pending).await {
        acked.insert(message, offset.expect("acked"));
    }
    acked
}

/// Replays the whole stream through any node (the API's queue group picks
/// one) and returns offset -> payload.
async fn replay_payloads(client: &async_nats::Client, linearizable: bool) -> BTreeMap<u64, Bytes> {
    let inbox = client.new_inbox();
    let mut responses = client.subscribe(inbox.clone()).await.unwrap();
    // The largest batch a request may ask for (the tests store fewer).
    let request = serde_json::json!({"batch": 65536, "linearizable": linearizable});
    client
        .publish_with_reply(
            format!("$NWAL.REPLAY.{STREAM}"),
            inbox,
            request.to_string().into(),
        )
        .await
        .unwrap();
    let mut payloads = BTreeMap::new();
    loop {
        let message = tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::StreamExt::next(&mut responses),
        )
        .await
        .expect("replay answers")
        .unwrap();
        let headers = message.headers.clone().unwrap_or_default();
        if let Some(status) = headers.get("Nwal-Status") {
            assert!(
                ["204", "100", "404"].contains(&status.as_str()),
                "replay ended with {status}: {:?}",
                headers.get("Nwal-Description")
            );
            return payloads;
        }
        let offset: u64 = headers
            .get("Nwal-Offset")
            .expect("offset header")
            .as_str()
            .parse()
            .unwrap();
        payloads.insert(offset, message.payload);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_followers_acks_nothing_and_replicas_serve_committed_reads() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path());
    let (leader, client) = initialized(&cluster).await;
    let mut acked = publish_batch(&client, 0, 300).await;
    let (status, metrics) = cluster.node(leader).http_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains(&format!("natswal_raft_is_leader{{stream=\"{STREAM}\"}} 1")),
        "{metrics}"
    );
    assert!(
        metrics.contains("natswal_raft_replica_lag_entries{stream=\"orders\",replica="),
        "{metrics}"
    );
    assert!(
        metrics.contains("natswal_raft_commit_index{stream=\"orders\"}"),
        "{metrics}"
    );

    // Any replica answers a linearizable replay with every acked record.
    for _ in 0..6 {
        let payloads = replay_payloads(&client, true).await;
        for (message, offset) in &acked {
            assert_eq!(
                payloads.get(offset),
                Some(&payload_of(*message)),
                "offset {offset}"
            );
        }
    }

    // Both followers stop: the leader still reaches NATS but no quorum.
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    for id in &followers {
        cluster.node(*id).signal(libc::SIGSTOP);
    }
    let stopped_at = Instant::now();
    // A message sent now gets an error (or no responder), never an ack.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "cut-off-probe");
    let probe = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .request_with_headers("orders.probe", headers, Bytes::from_static(b"probe"))
                .await
        }
    });
    // Once intake stopped, nobody takes messages (no responders).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let sent = client.request("orders.later", Bytes::from_static(b"later"));
        match tokio::time::timeout(Duration::from_millis(200), sent).await {
            Err(_) => {}
            Ok(Err(error)) if error.kind() == async_nats::RequestErrorKind::NoResponders => break,
            Ok(Ok(reply)) => {
                let answer: Value = serde_json::from_slice(&reply.payload).unwrap();
                assert!(answer["seq"].is_null(), "acked without a quorum: {answer}");
            }
            Ok(Err(_)) => {}
        }
        assert!(
            Instant::now() < deadline,
            "the cut-off leader kept its subscription"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "intake stopped {:?} after the followers stopped",
        stopped_at.elapsed()
    );
    match probe.await.unwrap() {
        Ok(reply) => {
            let answer: Value = serde_json::from_slice(&reply.payload).unwrap();
            assert!(
                answer["error"]["code"] == 503,
                "a cut-off leader answered {answer}"
            );
            eprintln!("the probe accepted before intake stopped got: {answer}");
        }
        Err(error) => assert!(
            matches!(
                error.kind(),
                async_nats::RequestErrorKind::NoResponders | async_nats::RequestErrorKind::TimedOut
            ),
            "{error}"
        ),
    }
    for id in &followers {
        cluster.node(*id).signal(libc::SIGCONT);
    }
    acked.extend(publish_batch(&client, 300, 300).await);
    wait_converged(&cluster, Duration::from_secs(30)).await;
    let records = stop_and_compare(&mut cluster, &[0, 1, 2]);
    assert_acked_stored(&records, acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_replaced_by_a_new_node_that_catches_up() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path());
    let (leader, client) = initialized(&cluster).await;
    let mut acked = publish_batch(&client, 0, 300).await;

    // A follower dies with its disk: its id is never used again.
    let dead = leader % 3 + 1;
    cluster.node(dead).kill();
    let config_text = std::fs::read(&cluster.node(dead).config_path).unwrap();
    std::fs::remove_dir_all(&cluster.node(dead).data_dir).unwrap();
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != dead).collect();

    // Started again under its old id with an empty directory, it would
    // have forgotten its votes and the entries it acked: the leader
    // refuses it (its incarnation is new) and it gets nothing.
    std::fs::create_dir_all(&cluster.node(dead).data_dir).unwrap();
    std::fs::write(&cluster.node(dead).config_path, &config_text).unwrap();
    cluster.node(dead).restart();
    acked.extend(publish_batch(&client, 300, 100).await);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut leader_output = String::new();
    while !leader_output.contains("comes back with incarnation") {
        assert!(
            Instant::now() < deadline,
            "the leader did not refuse the wiped node:\n{leader_output}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        leader_output.push_str(&cluster.node(leader).output().join("\n"));
    }
    assert!(leader_output.contains("new node id"), "{leader_output}");
    let views = cluster.views();
    assert!(
        views[&dead]["last_index"].is_null() && views[&dead]["voters"] == serde_json::json!([]),
        "the wiped node received nothing: {:?}",
        views[&dead]
    );
    cluster.node(dead).kill();
    let mut config = String::new();
    let new_port = free_port();
    config.push_str(&format!(
        "[cluster]\nnode_id = 4\nlisten = \"127.0.0.1:{new_port}\"\n"
    ));
    for id in &survivors {
        let address = replication_address(cluster.node(*id));
        config.push_str(&format!(
            "[[cluster.peers]]\nid = {id}\naddress = \"{address}\"\n"
        ));
    }
    config.push_str(&stream_section());
    let newcomer = Natswal::start(&cluster.nats.url(), &root.path().join("node-4"), &config);
    cluster.nodes.push(newcomer);

    let address = format!("127.0.0.1:{new_port}");
    let (code, output) = cluster.cli(&["add", "--node-id", "4", "--address", &address]);
    if code != 0 {
        let logs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|node| node.output().join("\n"))
            .collect();
        panic!("cluster add: {output}; logs:\n{}", logs.join("\n----\n"));
    }
    let (code, output) = cluster.cli(&["remove", "--node-id", &dead.to_string()]);
    assert_eq!(code, 0, "cluster remove: {output}");
    let (code, output) = cluster.cli(&["remove", "--node-id", &dead.to_string()]);
    assert_ne!(code, 0, "removing a node twice is refused: {output}");
    assert!(output.contains("not a voter"), "{output}");

    acked.extend(publish_batch(&client, 400, 300).await);
    let views = wait_converged(&cluster, Duration::from_secs(30)).await;
    let mut expected: Vec<u64> = survivors.clone();
    expected.push(4);
    for view in views.values() {
        let voters: Vec<u64> = view["voters"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        assert_eq!(voters, expected, "{view}");
    }
    let live: Vec<usize> = vec![survivors[0] as usize - 1, survivors[1] as usize - 1, 3];
    // The new node (index 3) holds the same log as the survivors.
    let records = stop_and_compare(&mut cluster, &live);
    assert_acked_stored(&records, acked);
    // The node that led the changes audited them.
    let audited = live.iter().any(|index| {
        let audit = std::fs::read_to_string(cluster.nodes[*index].data_dir.join("audit.log"))
            .unwrap_or_default();
        audit.contains("cluster_add") && audit.contains("cluster_remove")
    });
    assert!(audited, "membership changes are audited");
}

/// The view of the node that says it leads.
fn leader_view(views: &BTreeMap<u64, Value>) -> Option<&Value> {
    views.values().find(|view| view["is_leader"] == true)
}

/// Polls the nodes' views every 100 ms until `done` holds (returns them),
/// or `timeout` passes (returns the last ones as the error).
async fn poll_views(
    cluster: &Cluster,
    timeout: Duration,
    done: impl Fn(&BTreeMap<u64, Value>) -> bool,
) -> Result<BTreeMap<u64, Value>, BTreeMap<u64, Value>> {
    let deadline = Instant::now() + timeout;
    loop {
        let views = cluster.views();
        if done(&views) {
            return Ok(views);
        }
        if Instant::now() >= deadline {
            return Err(views);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes `count` messages from `first`, `window` at a time.
async fn publish_windowed(
    client: &async_nats::Client,
    first: u64,
    count: u64,
    window: u64,
) -> BTreeMap<u64, u64> {
    let mut acked = BTreeMap::new();
    let mut next = first;
    while next < first + count {
        let size = window.min(first + count - next);
        acked.extend(publish_batch(client, next, size).await);
        next += size;
    }
    acked
}

/// A follower SIGKILLed while the leader takes `NATSWAL_CLUSTER_SHIP_MIB`
/// MiB (CI: 8) comes back behind the leader's purged Raft log and catches
/// up by receiving its sealed segment files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_stopped_while_the_leader_writes_catches_up_by_segment_shipping() {
    let mib = env_count("NATSWAL_CLUSTER_SHIP_MIB", 8);
    let root = tempfile::tempdir().unwrap();
    // 1 MiB segments: the follower receives about one file per MiB.
    let keys = ConfigKeys {
        cluster: "snapshot_entries = 4\nsnapshot_kept_entries = 1\n",
        segment_bytes: "1MiB",
    };
    let mut cluster = Cluster::start_with_keys(root.path(), &keys);
    let (leader, client) = initialized(&cluster).await;
    let mut acked = publish_batch(&client, 0, 200).await;
    let stopped = leader % 3 + 1;
    let stopped_last = cluster.views()[&stopped]["last_index"]
        .as_u64()
        .expect("the follower's last index");
    cluster.node(stopped).kill();

    let started = Instant::now();
    let messages = mib * 1024 * 1024 / 8192;
    // Small windows make many Raft entries: the bridge puts the messages
    // waiting together into one.
    acked.extend(publish_windowed(&client, BULK_FIRST, messages, 32).await);
    let written = started.elapsed();
    // The leader snapshots and purges in the background: the stopped node
    // comes back once its last entry is purged.
    poll_views(&cluster, Duration::from_secs(30), |views| {
        leader_view(views)
            .and_then(|view| view["purged"].as_u64())
            .is_some_and(|purged| purged > stopped_last + 4)
    })
    .await
    .unwrap_or_else(|views| panic!("the leader did not purge its log: {views:?}"));
    cluster.node(stopped).restart();
    let catching_up = Instant::now();
    let polled = poll_views(&cluster, Duration::from_secs(30 + mib / 4), |views| {
        let committed = leader_view(views).and_then(|view| view["committed"].as_u64());
        let applied = views
            .get(&stopped)
            .and_then(|view| view["applied"].as_u64());
        committed.is_some() && applied >= committed
    })
    .await;
    if let Err(views) = polled {
        panic!(
            "node {stopped} did not catch up: {views:?}\n{}",
            cluster.node(stopped).output().join("\n")
        );
    }
    let caught_up = catching_up.elapsed();
    let node = cluster.node(stopped);
    let segments = node_metric(node, "natswal_raft_segments_received_total");
    let bytes = node_metric(node, "natswal_raft_segment_bytes_received_total");
    let installed = node_metric(node, "natswal_raft_snapshots_installed_total");
    eprintln!(
        "{mib} MiB written in {written:?} while node {stopped} was down; it received {segments} segments ({bytes} bytes) and caught up in {caught_up:?}"
    );
    let logs: Vec<String> = cluster
        .nodes
        .iter()
        .flat_map(|node| node.output())
        .filter(|line| line.contains("snapshot") || line.contains("purge") || line.contains("ship"))
        .collect();
    assert!(
        installed >= 1 && segments >= 1,
        "node {stopped} caught up without segment shipping ({installed} snapshots, {segments} segments):\n{}",
        logs.join("\n")
    );
    acked.extend(publish_batch(&client, 200, 100).await);
    wait_converged(&cluster, Duration::from_secs(30)).await;
    let records = stop_and_compare(&mut cluster, &[0, 1, 2]);
    assert_eq!(records.len(), acked.len());
    assert_acked_stored(&records, acked);
}

/// `NATSWAL_CLUSTER_ALL_KILLS` sets the rounds (CI: 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_every_node_at_once_loses_nothing_acknowledged() {
    let rounds = env_count("NATSWAL_CLUSTER_ALL_KILLS", 5) as usize;
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path());
    let (_, client) = initialized(&cluster).await;
    let publishers = Publishers::start(client.clone(), 16);
    for round in 0..rounds {
        publishers
            .wait_for_acks(&cluster, 300, Duration::from_secs(30))
            .await;
        // SIGKILL all three while acks are flowing.
        for node in &mut cluster.nodes {
            node.kill();
        }
        let acked_before = publishers.acked_count();
        for node in &mut cluster.nodes {
            node.restart();
        }
        publishers
            .wait_for_acks(&cluster, 300, Duration::from_secs(30))
            .await;
        eprintln!(
            "round {round}: {acked_before} acked before the kill, {} now",
            publishers.acked_count()
        );
    }
    let acked = publishers.stop().await;
    wait_converged(&cluster, Duration::from_secs(30)).await;
    let records = stop_and_compare(&mut cluster, &[0, 1, 2]);
    assert_acked_stored(
        &records,
        acked
            .iter()
            .map(|(message, (offset, _))| (*message, *offset)),
    );
}

/// Flips one random bit (any byte of a slot: its header, the frame header,
/// the records) in a random frame of a stopped node's replicated log;
/// returns where.
fn flip_random_bit(data_dir: &Path, random: &mut rand::rngs::StdRng) -> (String, bool) {
    use natswal::format::segment_header::SEGMENT_HEADER_LENGTH;
    use rand::Rng;
    let directory = data_dir.join("replicated").join(STREAM);
    // One flip in six lands in a segment's header instead.
    if random.random_range(0..6) == 0 {
        let segments = segment_files(&directory);
        let path = &segments[random.random_range(0..segments.len())];
        let position = random.random_range(0..SEGMENT_HEADER_LENGTH);
        let bit = random.random_range(0..8);
        let mut bytes = std::fs::read(path).unwrap();
        bytes[position] ^= 1 << bit;
        std::fs::write(path, &bytes).unwrap();
        let name = path.file_name().unwrap().to_string_lossy();
        return (format!("{name} header byte {position} bit {bit}"), true);
    }
    let spans: Vec<(PathBuf, FrameSpan)> = segment_files(&directory)
        .into_iter()
        .flat_map(|path| {
            let spans = frame_spans(&std::fs::read(&path).unwrap());
            spans.into_iter().map(move |span| (path.clone(), span))
        })
        .collect();
    assert!(!spans.is_empty(), "the replica holds frames");
    let (path, span) = &spans[random.random_range(0..spans.len())];
    let position = random.random_range(span.start..span.end);
    let bit = random.random_range(0..8);
    let mut bytes = std::fs::read(path).unwrap();
    bytes[position as usize] ^= 1 << bit;
    std::fs::write(path, &bytes).unwrap();
    let described = format!(
        "{} byte {position} bit {bit} (frame at offset {}, {} records)",
        path.file_name().unwrap().to_string_lossy(),
        span.base_offset,
        span.record_count
    );
    (described, false)
}

/// Three replays (whichever replica answers each) serve every acked
/// message's payload intact at its offset.
async fn assert_replays_serve(
    client: &async_nats::Client,
    acked: &BTreeMap<u64, u64>,
    context: &str,
) {
    for _ in 0..3 {
        let payloads = replay_payloads(client, false).await;
        for (message, offset) in acked {
            assert_eq!(
                payloads.get(offset),
                Some(&payload_of(*message)),
                "{context}: offset {offset}"
            );
        }
    }
}

/// `NATSWAL_CLUSTER_FLIPS` sets the rounds (CI: 5); `NATSWAL_FLIP_SEED`
/// replays a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_flips_in_committed_frames_of_a_minority_are_repaired_from_peers() {
    let rounds: u64 = env_count("NATSWAL_CLUSTER_FLIPS", 5);
    let mut random = seeded_random("NATSWAL_FLIP_SEED");
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path());
    let (_, client) = initialized(&cluster).await;
    let mut acked = BTreeMap::new();
    for round in 0..rounds {
        acked.extend(publish_batch(&client, round * 200, 200).await);
        wait_converged(&cluster, Duration::from_secs(30)).await;
        // Every entry is committed now; a follower (a minority) loses a
        // bit of one while it is down.
        let leader = wait_for_leader(&cluster, Duration::from_secs(15)).await;
        let follower = (leader + round % 2) % 3 + 1;
        cluster.node(follower).kill();
        let (flipped, in_header) = flip_random_bit(&cluster.node(follower).data_dir, &mut random);
        cluster.node(follower).restart();
        // Every flip is found before Raft starts. A damaged frame inside
        // the log is cut out and restored in place; damage to the last
        // frame looks like a torn write to the engine (nothing after it
        // proves it was synced) and is cut, and the entry fetched again,
        // since this node knows it was committed; an intact frame behind a
        // damaged slot header is kept; a damaged segment header is rebuilt.
        let startup = cluster
            .node(follower)
            .output_until("HTTP endpoints", Duration::from_secs(5));
        let found = [
            "repaired before Raft starts",
            "were missing from this node's log (lost writes) and were fetched",
        ];
        assert!(
            found.iter().any(|needle| startup.contains(needle)),
            "round {round}: the flip at {flipped} went unnoticed:\n{startup}"
        );
        let entries_lost = ["written back in place", "(lost writes)"]
            .iter()
            .any(|needle| startup.contains(needle));
        eprintln!(
            "round {round}: node {follower}, {flipped}: {}",
            if entries_lost {
                "entries restored from a peer"
            } else if in_header {
                "header rebuilt"
            } else {
                "frame kept intact"
            }
        );
        let repaired = node_metric(
            cluster.node(follower),
            "natswal_raft_repaired_entries_total",
        );
        assert_eq!(
            repaired >= 1,
            entries_lost,
            "round {round}: {repaired} entries repaired"
        );
        if entries_lost {
            let audit =
                std::fs::read_to_string(cluster.node(follower).data_dir.join("audit.log")).unwrap();
            assert!(audit.contains("replica_repair"), "the repair is audited");
        }
        let views = wait_converged(&cluster, Duration::from_secs(30)).await;
        assert_eq!(views.len(), 3, "every replica serves: {views:?}");
        assert_replays_serve(&client, &acked, &format!("round {round}")).await;
    }
    let records = stop_and_compare(&mut cluster, &[0, 1, 2]);
    assert_acked_stored(&records, acked);
}

/// Publishes one message with `Nats-Msg-Id: id` and the header `pairs`
/// until a node answers other than "not stored at quorum" (503, retried
/// with the same id: a stored copy is answered as a duplicate); returns
/// the reply.
async fn publish_conditional(
    client: &async_nats::Client,
    id: &str,
    pairs: &[(&str, &str)],
) -> Value {
    let mut headers = header_map(pairs);
    headers.insert("Nats-Msg-Id", id);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "{id}: no answer in 30 s");
        let request =
            client.request_with_headers("orders.c", headers.clone(), Bytes::from(id.to_string()));
        if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(2), request).await {
            let answer: Value = serde_json::from_slice(&reply.payload).unwrap();
            if answer["error"]["code"].as_u64() != Some(503) {
                return answer;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `Nats-Expected-*` on a replicated stream is checked against the stream
/// as every entry before the message leaves it (never ignored): behind
/// messages still being committed, between racing publishers (one wins),
/// and on a new leader after the old one was killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_preconditions_hold_in_log_order_across_racing_publishers_and_failover() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path());
    let (_, client) = initialized(&cluster).await;
    let first = publish_conditional(&client, "c1", &[("Nats-Expected-Last-Sequence", "0")]).await;
    assert_eq!(first["seq"].as_u64(), Some(1), "{first}");
    let stale = publish_conditional(&client, "c2", &[("Nats-Expected-Last-Sequence", "0")]).await;
    assert_eq!(err_code(&stale), 10071, "{stale}");
    assert!(
        stale.to_string().contains("wrong last sequence: 1"),
        "{stale}"
    );
    let second = publish_conditional(&client, "c3", &[("Nats-Expected-Last-Msg-Id", "c1")]).await;
    assert_eq!(second["seq"].as_u64(), Some(2), "{second}");
    let wrong_id = publish_conditional(&client, "c4", &[("Nats-Expected-Last-Msg-Id", "c1")]).await;
    assert_eq!(err_code(&wrong_id), 10070, "{wrong_id}");
    let refused = [
        (("Nats-Expected-Stream", "other"), 10060),
        (("Nats-Expected-Last-Subject-Sequence", "1"), 10003),
        (("Nats-Required-Api-Level", "99"), 10185),
    ];
    for (pair, code) in refused {
        let answer = publish_conditional(&client, "c5", &[pair]).await;
        assert_eq!(err_code(&answer), code, "{pair:?}: {answer}");
    }
    // Racing publishers expecting the same last sequence: exactly one wins.
    let racing: Vec<_> = (0..8)
        .map(|racer| {
            let client = client.clone();
            tokio::spawn(async move {
                publish_conditional(
                    &client,
                    &format!("race-{racer}"),
                    &[("Nats-Expected-Last-Sequence", "2")],
                )
                .await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for answer in futures_util::future::join_all(racing).await {
        let answer = answer.unwrap();
        match answer["seq"].as_u64() {
            Some(offset) => winners.push(offset),
            None => assert_eq!(err_code(&answer), 10071, "{answer}"),
        }
    }
    assert_eq!(winners, [3], "one racer wins");
    // A conditional message behind 200 others still being committed is
    // checked after them: it expects the last of them.
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(format!("{inbox}.*")).await.unwrap();
    for message in 0..200u64 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("m-{message}").as_str());
        client
            .publish_with_reply_and_headers(
                format!("orders.{}", message % 5),
                format!("{inbox}.{message}"),
                headers,
                payload_of(message),
            )
            .await
            .unwrap();
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "behind");
    headers.insert("Nats-Expected-Last-Sequence", "203");
    client
        .publish_with_reply_and_headers(
            "orders.c",
            format!("{inbox}.behind"),
            headers,
            Bytes::from("behind"),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut acked = BTreeMap::new();
    let mut behind = None;
    while acked.len() < 200 || behind.is_none() {
        let reply = tokio::time::timeout(
            Duration::from_secs(30),
            futures_util::StreamExt::next(&mut replies),
        )
        .await
        .expect("every message is answered")
        .unwrap();
        let answer: Value = serde_json::from_slice(&reply.payload).unwrap();
        let name = reply.subject.rsplit('.').next().unwrap().to_string();
        let offset = answer["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: {answer}"));
        match name.parse::<u64>() {
            Ok(message) => {
                acked.insert(message, offset);
            }
            Err(_) => behind = Some(offset),
        }
    }
    assert_eq!(behind, Some(204));
    assert_eq!(acked.values().copied().max(), Some(203));
    // The leader is killed: the new one checks against the same log.
    let leader = wait_for_leader(&cluster, Duration::from_secs(15)).await;
    cluster.node(leader).kill();
    wait_for_leader_among_others(&cluster, leader).await;
    let failover = publish_conditional(
        &client,
        "after",
        &[
            ("Nats-Expected-Last-Msg-Id", "behind"),
            ("Nats-Expected-Last-Sequence", "204"),
        ],
    )
    .await;
    assert_eq!(failover["seq"].as_u64(), Some(205), "{failover}");
    let stale = publish_conditional(
        &client,
        "after-2",
        &[("Nats-Expected-Last-Msg-Id", "behind")],
    )
    .await;
    assert_eq!(err_code(&stale), 10070, "{stale}");
    cluster.node(leader).restart();
    wait_converged(&cluster, Duration::from_secs(30)).await;
    let records = stop_and_compare(&mut cluster, &[0, 1, 2]);
    assert_eq!(records.len(), 205, "only what was acked is stored");
    assert_acked_stored(&records, acked);
    assert_eq!(records[&205].2, Bytes::from("after"));
}

/// One message of atomic batch `batch` (sequence `sequence`; `commit`
/// ends it) with extra header `pairs`; returns the reply (empty: staged).
async fn batch_message(
    client: &async_nats::Client,
    batch: &str,
    sequence: u64,
    commit: bool,
    pairs: &[(&str, &str)],
) -> Bytes {
    let mut headers = header_map(pairs);
    headers.insert("Nats-Batch-Id", batch);
    headers.insert("Nats-Batch-Sequence", sequence.to_string().as_str());
    if commit {
        headers.insert("Nats-Batch-Commit", "1");
    }
    let payload = Bytes::from(format!("{batch}/{sequence}"));
    let request = client.request_with_headers("orders.b", headers, payload);
    tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("a batch message is answered")
        .expect("a node answers")
        .payload
}

/// Publishes atomic batch `batch` of `count` messages (`first_pairs` on
/// the first); returns the commit's reply.
async fn publish_atomic(
    client: &async_nats::Client,
    batch: &str,
    count: u64,
    first_pairs: &[(&str, &str)],
) -> Value {
    for sequence in 1..count {
        let pairs = if sequence == 1 { first_pairs } else { &[] };
        let staged = batch_message(client, batch, sequence, false, pairs).await;
        assert!(
            staged.is_empty(),
            "{batch}/{sequence}: {}",
            String::from_utf8_lossy(&staged)
        );
    }
    let pairs = if count == 1 { first_pairs } else { &[] };
    let commit = batch_message(client, batch, count, true, pairs).await;
    serde_json::from_slice(&commit).unwrap()
}

/// Atomic batches on a replicated stream: staged on the leader, committed
/// as one entry (one frame) and acknowledged once at quorum; refused whole
/// on a failed precondition, a duplicate id or a gap; a batch staged on a
/// leader that is killed is refused by the next one, and none of it is
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_batches_on_a_replicated_stream_commit_whole_or_not_at_all() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path());
    let (_, client) = initialized(&cluster).await;
    let first = publish_atomic(&client, "b1", 5, &[("Nats-Expected-Last-Sequence", "0")]).await;
    assert_eq!(
        (
            first["seq"].as_u64(),
            first["batch"].as_str(),
            first["count"].as_u64()
        ),
        (Some(5), Some("b1"), Some(5)),
        "{first}"
    );
    let stale = publish_atomic(&client, "b2", 3, &[("Nats-Expected-Last-Sequence", "0")]).await;
    assert_eq!(err_code(&stale), 10071, "{stale}");
    let second = publish_atomic(&client, "b3", 3, &[("Nats-Expected-Last-Sequence", "5")]).await;
    assert_eq!(second["seq"].as_u64(), Some(8), "{second}");
    // Two messages of one batch with the same id.
    batch_message(&client, "b4", 1, false, &[("Nats-Msg-Id", "same")]).await;
    let duplicate = batch_message(&client, "b4", 2, true, &[("Nats-Msg-Id", "same")]).await;
    let duplicate: Value = serde_json::from_slice(&duplicate).unwrap();
    assert_eq!(err_code(&duplicate), 10201, "{duplicate}");
    // A gap in the sequence abandons the batch.
    batch_message(&client, "b5", 1, false, &[]).await;
    let gap: Value =
        serde_json::from_slice(&batch_message(&client, "b5", 3, true, &[]).await).unwrap();
    assert_eq!(err_code(&gap), 10176, "{gap}");
    // Plain messages between batches take the next offsets.
    let plain = publish_conditional(&client, "plain", &[]).await;
    assert_eq!(plain["seq"].as_u64(), Some(9), "{plain}");
    // A batch staged on a leader that is killed: the new leader never saw
    // its first messages and refuses the commit.
    batch_message(&client, "b6", 1, false, &[]).await;
    batch_message(&client, "b6", 2, false, &[]).await;
    let leader = wait_for_leader(&cluster, Duration::from_secs(15)).await;
    cluster.node(leader).kill();
    wait_for_leader_among_others(&cluster, leader).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let orphan = loop {
        let answer: Value =
            serde_json::from_slice(&batch_message(&client, "b6", 3, true, &[]).await).unwrap();
        if answer["error"]["code"].as_u64() != Some(503) {
            break answer;
        }
        assert!(Instant::now() < deadline, "{answer}");
    };
    assert_eq!(err_code(&orphan), 10176, "{orphan}");
    let after = publish_atomic(&client, "b7", 2, &[("Nats-Expected-Last-Sequence", "9")]).await;
    assert_eq!(after["seq"].as_u64(), Some(11), "{after}");
    cluster.node(leader).restart();
    wait_converged(&cluster, Duration::from_secs(30)).await;
    let records = stop_and_compare(&mut cluster, &[0, 1, 2]);
    let payloads: Vec<String> = records
        .values()
        .map(|record| String::from_utf8_lossy(&record.2).to_string())
        .collect();
    let expected = [
        "b1/1", "b1/2", "b1/3", "b1/4", "b1/5", "b3/1", "b3/2", "b3/3", "plain", "b7/1", "b7/2",
    ];
    assert_eq!(payloads, expected);
    assert_eq!(
        records.keys().copied().collect::<Vec<_>>(),
        (1..=11).collect::<Vec<u64>>()
    );
}

/// A follower's sealed segment damaged while the node runs: the scrub finds
/// it, fetches the damaged entry from a peer and restores the segment in
/// place, audited, without a restart; every replica serves every acked
/// record intact meanwhile and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_damaged_on_a_running_follower_is_restored_by_the_scrub_and_audited() {
    let root = tempfile::tempdir().unwrap();
    let keys = ConfigKeys {
        cluster: "scrub_bytes_per_second = \"64MiB\"\n",
        segment_bytes: "64KiB",
    };
    let mut cluster = Cluster::start_with_keys(root.path(), &keys);
    let (leader, client) = initialized(&cluster).await;
    let acked = publish_batch(&client, 0, 2400).await;
    wait_converged(&cluster, Duration::from_secs(30)).await;
    let follower = leader % 3 + 1;
    let directory = cluster
        .node(follower)
        .data_dir
        .join("replicated")
        .join(STREAM);
    let segments = segment_files(&directory);
    assert!(segments.len() >= 3, "{segments:?}");
    // A bit in the middle of a frame of a sealed segment, written in place
    // (the engine maps the file: it is never truncated under it).
    let path = &segments[segments.len() / 2];
    let spans = frame_spans(&std::fs::read(path).unwrap());
    let span = spans[spans.len() / 2];
    let position = (span.start + span.end) / 2;
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, position).unwrap();
        file.write_all_at(&[byte[0] ^ 0x04], position).unwrap();
        file.sync_all().unwrap();
    }
    let node = cluster.node(follower);
    let deadline = Instant::now() + Duration::from_secs(30);
    while node_metric(node, "natswal_raft_scrub_restored_segments_total") == 0 {
        assert!(
            Instant::now() < deadline,
            "the scrub restored nothing in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(node_metric(node, "natswal_raft_scrub_damaged_segments"), 1);
    assert_eq!(node_metric(node, "natswal_raft_repaired_entries_total"), 1);
    let audit = std::fs::read_to_string(node.data_dir.join("audit.log")).unwrap();
    let restore = audit
        .lines()
        .find(|line| line.contains("replica_repair"))
        .unwrap_or_else(|| panic!("the restore is not audited:\n{audit}"));
    assert!(restore.contains("\"by\":\"scrub\""), "{restore}");
    assert_replays_serve(&client, &acked, "after the restore").await;
    let records = stop_and_compare(&mut cluster, &[0, 1, 2]);
    assert_acked_stored(&records, acked);
}

/// Flips one bit in the middle of `path`.
fn flip_middle_bit(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(path, &bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_vote_file_or_index_on_a_minority_is_refused_or_rebuilt_and_the_cluster_acks() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path());
    let (leader, client) = initialized(&cluster).await;
    // Enough to seal a 64 KiB segment (with an index).
    let mut acked = publish_batch(&client, 0, 1000).await;
    wait_converged(&cluster, Duration::from_secs(30)).await;
    let (first, second) = (leader % 3 + 1, (leader + 1) % 3 + 1);
    let stream_directory =
        |cluster: &mut Cluster, id: u64| cluster.node(id).data_dir.join("replicated").join(STREAM);

    // The vote (and commit index) file: without it the node could vote
    // twice in a term, so it refuses to start, naming the file; nothing is
    // deleted.
    cluster.node(first).kill();
    let metadata = stream_directory(&mut cluster, first).join("stream.meta");
    flip_middle_bit(&metadata);
    let damaged = std::fs::read(&metadata).unwrap();
    let refusal = cluster
        .node(first)
        .try_restart()
        .expect_err("a replica with a damaged vote file does not start");
    assert!(refusal.contains("stream.meta"), "{refusal}");
    assert_eq!(
        std::fs::read(&metadata).unwrap(),
        damaged,
        "the file is kept"
    );
    assert!(!segment_files(&stream_directory(&mut cluster, first)).is_empty());
    // The two others are a quorum: publishing goes on.
    acked.extend(publish_batch(&client, 1000, 200).await);

    // Indexes are derived data: the second follower rebuilds them from
    // its segments when the leader is the only other replica up.
    cluster.node(second).kill();
    let indexes: Vec<PathBuf> = std::fs::read_dir(stream_directory(&mut cluster, second))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "idx"))
        .collect();
    assert!(!indexes.is_empty(), "the replica has indexes");
    for index in &indexes {
        flip_middle_bit(index);
    }
    cluster.node(second).restart();
    acked.extend(publish_batch(&client, 1200, 200).await);
    let leader_index = leader as usize - 1;
    let records = stop_and_compare(&mut cluster, &[leader_index, second as usize - 1]);
    assert_acked_stored(&records, acked);
}

/// Waits until node `id` has applied what the leader had committed when
/// the wait began (while publishing goes on).
async fn wait_caught_up(cluster: &Cluster, id: u64) {
    let leader = wait_for_leader(cluster, Duration::from_secs(15)).await;
    let committed = cluster.views()[&leader]["committed"].as_u64().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let views = cluster.views();
        let applied = views.get(&id).and_then(|view| view["applied"].as_u64());
        if applied.is_some_and(|applied| applied >= committed) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {id} did not catch up with commit {committed}: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the nodes other than `cut_off` agree on a leader among
/// themselves.
async fn wait_for_leader_among_others(cluster: &Cluster, cut_off: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let views = cluster.views();
        let leaders: Vec<u64> = views
            .iter()
            .filter(|(id, _)| **id != cut_off)
            .filter_map(|(_, view)| view["leader"].as_u64())
            .collect();
        if leaders.len() == 2 && leaders[0] == leaders[1] && leaders[0] != cut_off {
            return leaders[0];
        }
        assert!(
            Instant::now() < deadline,
            "the majority elected no leader: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leader loses both links to its followers (blackholed by proxies,
/// the way a network partition drops packets) while NATS clients still
/// reach it: it commits and acks nothing more; the majority elects a
/// leader that goes on acking; after healing every replica converges on
/// one log holding every acked message once. Then a follower alone is cut
/// off and heals the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_acks_nothing_while_the_majority_goes_on_and_all_converge() {
    let root = tempfile::tempdir().unwrap();
    let cluster = Cluster::start_partitionable(root.path()).await;
    let (code, output) = cluster.cli(&["init"]);
    assert_eq!(code, 0, "cluster init: {output}");
    let old_leader = wait_for_leader(&cluster, Duration::from_secs(15)).await;
    let client = connect(&cluster.nats.url()).await;
    let publishers = Publishers::start(client.clone(), 8);
    publishers
        .wait_for_acks(&cluster, 300, Duration::from_secs(30))
        .await;

    cluster.isolate(old_leader);
    let new_leader = wait_for_leader_among_others(&cluster, old_leader).await;
    publishers
        .wait_for_acks(&cluster, 300, Duration::from_secs(30))
        .await;
    // The cut-off node's commit index stands still while the majority
    // commits: nothing it accepted in the meantime was acked.
    let commit_of =
        |id: u64| node_metric(&cluster.nodes[id as usize - 1], "natswal_raft_commit_index");
    let frozen = commit_of(old_leader);
    let majority_before = commit_of(new_leader);
    publishers
        .wait_for_acks(&cluster, 300, Duration::from_secs(30))
        .await;
    assert_eq!(
        commit_of(old_leader),
        frozen,
        "the partitioned node committed"
    );
    assert!(commit_of(new_leader) > majority_before);
    eprintln!(
        "leader {old_leader} cut off at commit {frozen}; node {new_leader} leads, commit {}",
        commit_of(new_leader)
    );
    cluster.heal();
    publishers
        .wait_for_acks(&cluster, 300, Duration::from_secs(30))
        .await;
    wait_caught_up(&cluster, old_leader).await;

    // A follower alone is cut off: the others go on; it catches up.
    let leader = wait_for_leader(&cluster, Duration::from_secs(15)).await;
    let follower = leader % 3 + 1;
    cluster.isolate(follower);
    publishers
        .wait_for_acks(&cluster, 300, Duration::from_secs(30))
        .await;
    cluster.heal();
    publishers
        .wait_for_acks(&cluster, 300, Duration::from_secs(30))
        .await;
    wait_caught_up(&cluster, follower).await;
    let acked = publishers.stop().await;
    wait_converged(&cluster, Duration::from_secs(30)).await;
    let mut cluster = cluster;
    let records = stop_and_compare(&mut cluster, &[0, 1, 2]);
    assert_each_id_once(&records);
    assert_acked_stored(
        &records,
        acked
            .iter()
            .map(|(message, (offset, _))| (*message, *offset)),
    );
}

/// Faults that leave no quorum for a while, combined (`NATSWAL_CLUSTER_FAULT_ROUNDS`
/// rounds, CI 5; `NATSWAL_FAULT_SEED` replays a run): the leader
/// partitioned away while another node is SIGKILLed, or a node paused
/// (SIGSTOP) while another is SIGKILLed, each under continuous publishing.
/// Afterwards every acked message is in the logs once, at its offset, and
/// the three logs are identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_and_pauses_combined_with_kills_lose_nothing_acked() {
    use rand::Rng;
    let rounds: u64 = env_count("NATSWAL_CLUSTER_FAULT_ROUNDS", 5);
    let mut random = seeded_random("NATSWAL_FAULT_SEED");
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_partitionable(root.path()).await;
    let (_, client) = initialized(&cluster).await;
    let publishers = Publishers::start(client.clone(), 8);
    publishers
        .wait_for_acks(&cluster, 200, Duration::from_secs(30))
        .await;
    for round in 0..rounds {
        let leader = wait_for_leader(&cluster, Duration::from_secs(15)).await;
        let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
        let killed = others[random.random_range(0..2)];
        let partition = random.random_bool(0.5);
        // The paused node is the leader or the node left running.
        let paused = if random.random_bool(0.5) {
            leader
        } else {
            others.iter().copied().find(|id| *id != killed).unwrap()
        };
        if partition {
            cluster.isolate(leader);
        } else {
            cluster.node(paused).signal(libc::SIGSTOP);
        }
        cluster.node(killed).kill();
        // No quorum now; let the survivors time out and campaign.
        tokio::time::sleep(Duration::from_millis(random.random_range(200..1500))).await;
        cluster.node(killed).restart();
        if partition {
            cluster.heal();
        } else {
            cluster.node(paused).signal(libc::SIGCONT);
        }
        publishers
            .wait_for_acks(&cluster, 200, Duration::from_secs(30))
            .await;
        let fault = match partition {
            true => format!("leader {leader} partitioned"),
            false => format!("node {paused} paused"),
        };
        eprintln!(
            "round {round}: {fault}, node {killed} killed; {} acked",
            publishers.acked_count()
        );
    }
    let acked = publishers.stop().await;
    wait_converged(&cluster, Duration::from_secs(30)).await;
    let records = stop_and_compare(&mut cluster, &[0, 1, 2]);
    assert_each_id_once(&records);
    assert_acked_stored(
        &records,
        acked
            .iter()
            .map(|(message, (offset, _))| (*message, *offset)),
    );
}

/// Node `id`'s config for a node added at run time: it reaches `peers`
/// (id, address) and listens on `port`.
fn joining_config(id: u64, port: u16, peers: &[(u64, String)]) -> String {
    let mut config = format!("[cluster]\nnode_id = {id}\nlisten = \"127.0.0.1:{port}\"\n");
    for (peer, address) in peers {
        config.push_str(&format!(
            "[[cluster.peers]]\nid = {peer}\naddress = \"{address}\"\n"
        ));
    }
    config.push_str(&stream_section());
    config
}

/// Where a node listens for replication: `listen` of its config's
/// `[cluster]` table (the `[http]` table has a `listen` too).
fn replication_address(node: &Natswal) -> String {
    let text = std::fs::read_to_string(&node.config_path).unwrap();
    text.lines()
        .skip_while(|line| *line != "[cluster]")
        .find_map(|line| line.strip_prefix("listen = "))
        .expect("a [cluster] listen address")
        .trim_matches('"')
        .to_string()
}

/// Runs `natswal cluster ARGS` off the async workers.
async fn cli_in_background(
    cluster: &Cluster,
    args: &[&str],
) -> tokio::task::JoinHandle<(i32, String)> {
    let mut full: Vec<String> = vec!["cluster".into()];
    full.extend(args.iter().map(|arg| arg.to_string()));
    full.extend(["--nats-url".to_string(), cluster.nats.url()]);
    tokio::task::spawn_blocking(move || {
        let borrowed: Vec<&str> = full.iter().map(String::as_str).collect();
        natswal_run(&borrowed)
    })
}

/// Membership changes while nodes die (`NATSWAL_CLUSTER_CHANGE_ROUNDS`
/// rounds, CI 3): each round a new node is added (a follower is SIGKILLed
/// while the learner catches up, and restarted), leadership is moved to
/// it, the old leader is SIGKILLed right after and restarted, and the
/// oldest voter is removed (leadership moved off it first) and stopped. Publishing goes
/// on throughout; at the end the three voters hold identical logs with
/// every acked message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_under_kills_keep_every_acked_message() {
    let rounds: u64 = env_count("NATSWAL_CLUSTER_CHANGE_ROUNDS", 3);
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path());
    let (_, client) = initialized(&cluster).await;
    let publishers = Publishers::start(client.clone(), 8);
    publishers
        .wait_for_acks(&cluster, 200, Duration::from_secs(30))
        .await;
    let mut voters: Vec<u64> = vec![1, 2, 3];
    for round in 0..rounds {
        let newcomer = 4 + round;
        let leaving = voters[0];
        let port = free_port();
        // Its peers are the voters that stay: a stream has a copy on every
        // node of the cluster a config describes.
        let peers: Vec<(u64, String)> = voters
            .iter()
            .filter(|id| **id != leaving)
            .map(|id| (*id, replication_address(cluster.node(*id))))
            .collect();
        let data_dir = root.path().join(format!("node-{newcomer}"));
        let config = joining_config(newcomer, port, &peers);
        cluster
            .nodes
            .push(Natswal::start(&cluster.nats.url(), &data_dir, &config));
        assert_eq!(cluster.nodes.len() as u64, newcomer);

        // Added while a follower is down.
        let leader = wait_for_leader(&cluster, Duration::from_secs(15)).await;
        let victim = *voters.iter().find(|id| **id != leader).unwrap();
        let address = format!("127.0.0.1:{port}");
        let adding = cli_in_background(
            &cluster,
            &[
                "add",
                "--node-id",
                &newcomer.to_string(),
                "--address",
                &address,
            ],
        )
        .await;
        cluster.node(victim).kill();
        let (code, output) = adding.await.unwrap();
        assert_eq!(code, 0, "round {round}: add {newcomer}: {output}");
        cluster.node(victim).restart();
        voters.push(newcomer);
        publishers
            .wait_for_acks(&cluster, 100, Duration::from_secs(30))
            .await;

        // Leadership moves to the newcomer; the old leader dies at once.
        let leader = wait_for_leader(&cluster, Duration::from_secs(15)).await;
        let (code, output) = cluster.cli(&[
            "transfer-leader",
            "--stream",
            STREAM,
            "--to",
            &newcomer.to_string(),
        ]);
        assert_eq!(code, 0, "round {round}: transfer-leader: {output}");
        cluster.node(leader).kill();
        publishers
            .wait_for_acks(&cluster, 100, Duration::from_secs(30))
            .await;
        cluster.node(leader).restart();

        // The oldest voter leaves and stops.
        let deadline = Instant::now() + Duration::from_secs(30);
        while wait_for_leader(&cluster, Duration::from_secs(15)).await == leaving {
            assert!(Instant::now() < deadline, "leadership stays on {leaving}");
            let to = newcomer.to_string();
            cluster.cli(&["transfer-leader", "--stream", STREAM, "--to", &to]);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (code, output) = cluster.cli(&["remove", "--node-id", &leaving.to_string()]);
        assert_eq!(code, 0, "round {round}: remove {leaving}: {output}");
        voters.retain(|id| *id != leaving);
        assert!(cluster.node(leaving).terminate().success());
        publishers
            .wait_for_acks(&cluster, 100, Duration::from_secs(30))
            .await;
        eprintln!(
            "round {round}: added {newcomer} (node {victim} killed meanwhile), led by it, removed {leaving}; voters {voters:?}; {} acked",
            publishers.acked_count()
        );
    }
    let acked = publishers.stop().await;
    let views = wait_converged(&cluster, Duration::from_secs(30)).await;
    for view in views.values() {
        let seen: Vec<u64> = view["voters"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        assert_eq!(seen, voters, "{view}");
    }
    let indexes: Vec<usize> = voters.iter().map(|id| *id as usize - 1).collect();
    let records = stop_and_compare(&mut cluster, &indexes);
    assert_each_id_once(&records);
    assert_acked_stored(
        &records,
        acked
            .iter()
            .map(|(message, (offset, _))| (*message, *offset)),
    );
}
