//! `natswal bench cluster`: three `natswal serve` processes with a
//! replicated stream at `quorum` beside a three-node nats-server JetStream
//! cluster with an R3 file stream, the same client load through the same
//! three brokers, in one run; then natswal's failover time (leader
//! SIGKILLed -> first ack from its successor).

use super::nats::{
    acked_load, connect, free_port, nats_server_binary, spawn_self, start_nats_server_on,
    ChildProcess,
};
use super::percentiles_us;
use crate::error::{BridgeError, Result};
use bytes::Bytes;
use futures_util::StreamExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct ClusterBenchArgs {
    /// Directory for natswal's and JetStream's data (the same disk); emptied before and after.
    #[arg(long, default_value = "bench-data")]
    pub dir: PathBuf,
    /// The nats-server binary (default: NATS_SERVER_BIN, else .tools/bin/nats-server).
    #[arg(long)]
    pub nats_server: Option<PathBuf>,
    /// Seconds per load case.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Rounds: both targets once per round, in turn; the table shows medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Publisher tasks (spread over one connection per broker).
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Messages each publisher keeps waiting for an ack.
    #[arg(long, default_value_t = 1024)]
    pub in_flight: usize,
    /// Payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "128,1024")]
    pub sizes: Vec<usize>,
    /// Atomic batch sizes (messages per batch; each publisher waits for
    /// its batch's commit before the next).
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    pub atomic_sizes: Vec<u64>,
    /// natswal leader kills to time.
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
}

const NODES: usize = 3;
const NATSWAL_SUBJECTS: &str = "nwq";
const JETSTREAM_SUBJECTS: &str = "jsr3";

struct Node {
    config: PathBuf,
    process: Option<ChildProcess>,
}

fn start_brokers(binary: &Path, directory: &Path) -> Result<(Vec<ChildProcess>, Vec<String>)> {
    let client_ports: Vec<u16> = (0..NODES).map(|_| free_port()).collect::<Result<_>>()?;
    let route_ports: Vec<u16> = (0..NODES).map(|_| free_port()).collect::<Result<_>>()?;
    let routes: Vec<String> = route_ports
        .iter()
        .map(|port| format!("nats-route://127.0.0.1:{port}"))
        .collect();
    let mut servers = Vec::new();
    let mut urls = Vec::new();
    for index in 0..NODES {
        let outer = format!(
            "server_name: n{index}\ncluster {{\n name: bench\n listen: 127.0.0.1:{}\n routes: [{}]\n}}\n",
            route_ports[index],
            routes.join(", ")
        );
        let (server, url) = start_nats_server_on(
            binary,
            directory,
            &format!("n{index}"),
            "",
            &outer,
            client_ports[index],
        )?;
        servers.push(server);
        urls.push(url);
    }
    Ok((servers, urls))
}

fn write_node_configs(directory: &Path, urls: &[String]) -> Result<Vec<Node>> {
    let ports: Vec<u16> = (0..NODES).map(|_| free_port()).collect::<Result<_>>()?;
    let mut nodes = Vec::new();
    for index in 0..NODES {
        let id = index + 1;
        let mut config = format!(
            "data_dir = \"{}\"\n[nats]\nservers = [\"{}\"]\n[http]\nlisten = \"\"\n[jetstream]\nenabled = false\n\
             [cluster]\nnode_id = {id}\nlisten = \"127.0.0.1:{}\"\n",
            directory.join(format!("natswal-{id}")).display(),
            urls[index],
            ports[index]
        );
        for (peer, port) in ports.iter().enumerate() {
            if peer != index {
                config.push_str(&format!(
                    "[[cluster.peers]]\nid = {}\naddress = \"127.0.0.1:{port}\"\n",
                    peer + 1
                ));
            }
        }
        config.push_str(&format!(
            "[[streams]]\nname = \"quorum\"\nsubjects = [\"{NATSWAL_SUBJECTS}.>\"]\nreplicas = 3\nmax_message_bytes = \"4MiB\"\nallow_atomic = true\natomic_batches_max = 1000\natomic_staging_bytes = \"512MiB\"\n"
        ));
        let path = directory.join(format!("natswal-{id}.toml"));
        std::fs::write(&path, config)
            .map_err(|error| BridgeError::io("cannot write a natswal config", error))?;
        nodes.push(Node {
            config: path,
            process: None,
        });
    }
    Ok(nodes)
}

fn start_node(node: &mut Node) -> Result<()> {
    node.process = Some(spawn_self(
        &["serve", "--config", &node.config.display().to_string()],
        "natswal ready",
    )?);
    Ok(())
}

/// Publishes on `subject` until an ack (not an error) arrives; the time
/// it took.
async fn publish_until_acked(
    client: &async_nats::Client,
    subject: &str,
    timeout: Duration,
    give_up: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    let mut attempt = 0u64;
    while started.elapsed() < give_up {
        attempt += 1;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            format!("probe-{}-{attempt}", started.elapsed().as_nanos()).as_str(),
        );
        let request =
            client.request_with_headers(subject.to_string(), headers, Bytes::from_static(b"probe"));
        if let Ok(Ok(reply)) = tokio::time::timeout(timeout, request).await {
            if !super::nats::memchr_error(&reply.payload) {
                return Ok(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(BridgeError::InvalidArgument(format!(
        "no ack on {subject} within {give_up:?}"
    )))
}

/// Every node's status answer, gathered for 300 ms.
async fn cluster_status(client: &async_nats::Client) -> Result<Vec<serde_json::Value>> {
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|error| BridgeError::nats("cannot subscribe", error))?;
    client
        .publish_with_reply("$NWAL.CLUSTER.STATUS", inbox, Bytes::new())
        .await
        .map_err(|error| BridgeError::nats("cannot ask for status", error))?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    let mut nodes = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, answers.next()).await {
        if let Ok(node) = serde_json::from_slice(&message.payload) {
            nodes.push(node);
        }
    }
    Ok(nodes)
}

/// The leader's node id and whether all three nodes applied the same entry.
async fn leader_and_converged(client: &async_nats::Client) -> Result<(Option<u64>, bool)> {
    let nodes = cluster_status(client).await?;
    let streams: Vec<&serde_json::Value> = nodes
        .iter()
        .filter_map(|node| node["streams"].get(0))
        .collect();
    let leader = nodes
        .iter()
        .find(|node| node["streams"][0]["is_leader"] == true)
        .and_then(|node| node["node_id"].as_u64());
    let applied: Vec<&serde_json::Value> =
        streams.iter().map(|stream| &stream["applied"]).collect();
    let converged = streams.len() == NODES && applied.windows(2).all(|pair| pair[0] == pair[1]);
    Ok((leader, converged))
}

async fn create_r3_stream(client: &async_nats::Client) -> Result<()> {
    let jetstream = async_nats::jetstream::new(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let created = jetstream
            .create_stream(async_nats::jetstream::stream::Config {
                name: "R3".to_string(),
                subjects: vec![format!("{JETSTREAM_SUBJECTS}.>")],
                storage: async_nats::jetstream::stream::StorageType::File,
                num_replicas: 3,
                allow_atomic_publish: true,
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => return Ok(()),
            Err(error) if Instant::now() > deadline => {
                return Err(BridgeError::nats(
                    "cannot create the JetStream R3 stream",
                    error,
                ))
            }
            // The JetStream cluster elects its meta leader first.
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Messages one publisher sends one at a time, each after the previous ack.
const LATENCY_MESSAGES: usize = 500;

/// The ack latency of one publisher sending one message at a time: what a
/// commit round trip costs when nothing shares it.
async fn latency_cases(client: &async_nats::Client) -> Result<()> {
    println!();
    println!(
        "Ack latency, one publisher, one 128 B message at a time ({LATENCY_MESSAGES} messages):"
    );
    println!();
    println!("| target | p50 ms | p99 ms |");
    println!("| --- | ---: | ---: |");
    let payload = Bytes::from(vec![b'a'; 128]);
    for (name, subject) in [
        ("natswal quorum", format!("{NATSWAL_SUBJECTS}.latency")),
        ("JetStream R3", format!("{JETSTREAM_SUBJECTS}.latency")),
    ] {
        let mut latencies = Vec::with_capacity(LATENCY_MESSAGES);
        for _ in 0..LATENCY_MESSAGES {
            let started = Instant::now();
            let reply = tokio::time::timeout(
                Duration::from_secs(10),
                client.request(subject.clone(), payload.clone()),
            )
            .await
            .map_err(|_| BridgeError::InvalidArgument(format!("{name}: no ack in 10 s")))?
            .map_err(|error| BridgeError::nats(format!("{name}: publish"), error))?;
            if super::nats::memchr_error(&reply.payload) {
                return Err(BridgeError::InvalidArgument(format!(
                    "{name}: {}",
                    String::from_utf8_lossy(&reply.payload)
                )));
            }
            latencies.push(started.elapsed().as_nanos() as u64);
        }
        let figures = percentiles_us(&mut latencies, &[0.5, 0.99]);
        println!(
            "| {name} | {:.2} | {:.2} |",
            figures[0] / 1e3,
            figures[1] / 1e3
        );
    }
    Ok(())
}

/// Atomic batches: each publisher sends a batch (its first message and
/// its commit as requests) and waits for the commit's ack before the next.
async fn atomic_cases(args: &ClusterBenchArgs, clients: &[async_nats::Client]) -> Result<()> {
    println!();
    println!(
        "Atomic batches ({} publishers, each waiting for its batch's commit):",
        args.publishers
    );
    println!();
    println!("| payload | messages per batch | natswal quorum msgs/s | JetStream R3 msgs/s | ratio | failed batches (natswal / JetStream) |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    let duration = Duration::from_secs_f64(args.seconds);
    let natswal_subjects = format!("{NATSWAL_SUBJECTS}.atomic");
    let jetstream_subjects = format!("{JETSTREAM_SUBJECTS}.atomic");
    for size in &args.sizes {
        for batch_size in &args.atomic_sizes {
            let mut rounds = Rounds::default();
            for _ in 0..args.rounds {
                let load = |prefix| {
                    super::nats::atomic_load(
                        clients,
                        prefix,
                        *batch_size,
                        *size,
                        args.publishers,
                        duration,
                    )
                };
                let natswal = load(natswal_subjects.as_str()).await?;
                let jetstream = load(jetstream_subjects.as_str()).await?;
                rounds.push(&natswal, &jetstream);
            }
            println!("| {size} B | {batch_size} | {} |", rounds.cells());
        }
    }
    Ok(())
}

/// One case's rounds, natswal's and JetStream's in turn.
#[derive(Default)]
struct Rounds {
    ours: Vec<f64>,
    theirs: Vec<f64>,
    errors: (u64, u64),
}

impl Rounds {
    fn push(&mut self, natswal: &super::nats::Rate, jetstream: &super::nats::Rate) {
        self.ours.push(natswal.per_second());
        self.theirs.push(jetstream.per_second());
        self.errors.0 += natswal.errors;
        self.errors.1 += jetstream.errors;
    }

    /// The table cells: both medians, their ratio, both error counts.
    fn cells(&self) -> String {
        let (ours, theirs) = (median(self.ours.clone()), median(self.theirs.clone()));
        format!(
            "{ours:.0} | {theirs:.0} | {:.2}x | {} / {}",
            ours / theirs.max(1.0),
            self.errors.0,
            self.errors.1
        )
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

pub async fn run(args: ClusterBenchArgs) -> Result<()> {
    let binary = nats_server_binary(args.nats_server.as_deref())?;
    let version = Command::new(&binary)
        .arg("--version")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
        .unwrap_or_default();
    let directory = args.dir.join("cluster-bench");
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).map_err(|error| {
        BridgeError::io(format!("cannot create {}", directory.display()), error)
    })?;
    let (_brokers, urls) = start_brokers(&binary, &directory)?;
    let mut nodes = write_node_configs(&directory, &urls)?;
    for node in &mut nodes {
        start_node(node)?;
    }
    let mut clients = Vec::new();
    for url in &urls {
        clients.push(connect(url).await?);
    }
    create_r3_stream(&clients[0]).await?;
    let init = clients[0]
        .request("$NWAL.CLUSTER.INIT", Bytes::new())
        .await
        .map_err(|error| BridgeError::nats("cluster init", error))?;
    if super::nats::memchr_error(&init.payload) {
        return Err(BridgeError::InvalidArgument(format!(
            "cluster init failed: {}",
            String::from_utf8_lossy(&init.payload)
        )));
    }
    let give_up = Duration::from_secs(30);
    publish_until_acked(
        &clients[0],
        &format!("{NATSWAL_SUBJECTS}.warm"),
        Duration::from_secs(1),
        give_up,
    )
    .await?;
    publish_until_acked(
        &clients[0],
        &format!("{JETSTREAM_SUBJECTS}.warm"),
        Duration::from_secs(1),
        give_up,
    )
    .await?;

    println!("# natswal bench cluster");
    println!();
    println!(
        "{version}, 3 brokers in one cluster; natswal: 3 nodes, one stream at replicas = 3 (quorum: synced on 2 of 3 before the ack); JetStream: an R3 file stream (default sync: acks before fsync). {} publishers x {} in flight over one connection per broker; {:.1} s per case, {} rounds (medians)",
        args.publishers, args.in_flight, args.seconds, args.rounds
    );
    println!();
    println!("| payload | natswal quorum msgs/s | JetStream R3 msgs/s | ratio | errors (natswal / JetStream) |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    let duration = Duration::from_secs_f64(args.seconds);
    let load = (args.publishers, args.in_flight);
    for size in &args.sizes {
        let mut rounds = Rounds::default();
        for _ in 0..args.rounds {
            let natswal = acked_load(
                &clients,
                &format!("{NATSWAL_SUBJECTS}.{size}"),
                *size,
                load,
                duration,
            )
            .await?;
            let jetstream = acked_load(
                &clients,
                &format!("{JETSTREAM_SUBJECTS}.{size}"),
                *size,
                load,
                duration,
            )
            .await?;
            rounds.push(&natswal, &jetstream);
        }
        println!("| {size} B | {} |", rounds.cells());
    }
    latency_cases(&clients[0]).await?;
    atomic_cases(&args, &clients).await?;
    println!();
    let mut failovers = Vec::new();
    for _ in 0..args.kills {
        let deadline = Instant::now() + give_up;
        let leader = loop {
            match leader_and_converged(&clients[0]).await? {
                (Some(leader), true) => break leader,
                _ if Instant::now() > deadline => {
                    return Err(BridgeError::InvalidArgument(
                        "the cluster did not converge with a leader".to_string(),
                    ))
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let node = &mut nodes[leader as usize - 1];
        let killed = Instant::now();
        drop(node.process.take());
        // Publish through a broker the killed node did not use... any
        // broker reaches the new leader.
        publish_until_acked(
            &clients[0],
            &format!("{NATSWAL_SUBJECTS}.failover"),
            Duration::from_millis(200),
            give_up,
        )
        .await?;
        failovers.push(killed.elapsed().as_nanos() as u64);
        start_node(node)?;
    }
    if !failovers.is_empty() {
        let count = failovers.len();
        let figures = percentiles_us(&mut failovers, &[0.5, 0.99, 1.0]);
        println!(
            "natswal failover (leader SIGKILLed -> first ack from its successor, publisher retrying every 200 ms), {count} kills: median {:.2} s, p99 {:.2} s, max {:.2} s",
            figures[0] / 1e6,
            figures[1] / 1e6,
            figures[2] / 1e6
        );
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&directory);
    Ok(())
}
