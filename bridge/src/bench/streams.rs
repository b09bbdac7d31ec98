//! `natswal bench streams`: what many streams cost, natswal beside
//! JetStream in the same run.
//!
//! For each stream count N: N streams (natswal's from its config, JetStream's
//! created through its API, both with file storage and default segment
//! sizes), `--messages` acknowledged messages into each, then the server
//! process's threads, open files, resident memory (anonymous and file) and
//! disk used; the time to open them after a clean shutdown; and acked
//! throughput and p99 ack latency of the busy streams under a skewed load
//! (1% of the streams get 90% of the messages) beside the same load sent to
//! one stream, in the same run. Every target is its own process: natswal
//! (behind a nats-server of its own) and nats-server with JetStream.

use super::nats::{
    connect, free_port, jetstream_store, memchr_error, nats_server_binary, spawn_self,
    start_nats_server, start_nats_server_on, ChildProcess,
};
use crate::error::{BridgeError, Result};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Options of `natswal bench streams`.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamsBenchArgs {
    /// Directory for the data of both targets (the same disk); emptied after.
    #[arg(long, default_value = "bench-data")]
    pub dir: PathBuf,
    /// The nats-server binary (default: NATS_SERVER_BIN, else .tools/bin/nats-server).
    #[arg(long)]
    pub nats_server: Option<PathBuf>,
    /// Stream counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    pub counts: Vec<usize>,
    /// Acknowledged messages stored into every stream before measuring.
    #[arg(long, default_value_t = 1)]
    pub messages: u64,
    /// Seconds of each load case (one stream, then skewed).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Publisher tasks (spread over two connections).
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Messages each publisher keeps waiting for an ack.
    #[arg(long, default_value_t = 256)]
    pub in_flight: usize,
    /// Payload bytes of every message.
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// natswal's write mode.
    #[arg(long, default_value = "pwrite")]
    pub write_mode: String,
    /// natswal's `storage.open_files_max`.
    #[arg(long, default_value_t = natswal::io::handles::OPEN_FILES_MAX_DEFAULT)]
    pub open_files_max: usize,
    /// natswal's `storage.group_sync = false`: every stream syncs alone.
    #[arg(long)]
    pub no_group_sync: bool,
    /// natswal's `storage.io_threads` (0: its default).
    #[arg(long, default_value_t = 0)]
    pub io_threads: usize,
    /// natswal's durability for every stream (`fsync` or `none`).
    #[arg(long, default_value = "fsync")]
    pub durability: String,
    /// Only natswal.
    #[arg(long)]
    pub no_jetstream: bool,
    /// Keep the data directories (to look at them, or profile an open).
    #[arg(long)]
    pub keep_data: bool,
}

/// What a server process holds.
#[derive(Debug, Clone, Copy, Default)]
struct Footprint {
    threads: u64,
    open_files: u64,
    rss_anon_kib: u64,
    rss_file_kib: u64,
    disk_bytes: u64,
}

fn footprint(pid: u32, data: &Path) -> Footprint {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let open_files = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count() as u64)
        .unwrap_or(0);
    Footprint {
        threads: super::status_value(&status, "Threads:"),
        open_files,
        rss_anon_kib: super::status_value(&status, "RssAnon:"),
        rss_file_kib: super::status_value(&status, "RssFile:"),
        disk_bytes: disk_used(data),
    }
}

/// Bytes the files under `path` occupy on disk (allocated blocks).
fn disk_used(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(|entry| entry.ok())
        .map(|entry| match entry.metadata() {
            Ok(metadata) if metadata.is_dir() => disk_used(&entry.path()) + metadata.blocks() * 512,
            Ok(metadata) => metadata.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// One load case: acks counted while it ran.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    seconds: f64,
    busy_acked: u64,
    /// Every message acknowledged (busy and quiet streams).
    acked: u64,
    errors: u64,
    busy_p99_us: f64,
    /// p99 ack latency of the messages to quiet streams (0 without any).
    quiet_p99_us: f64,
    /// CPU time of the storing process (natswal, or JetStream's server) per
    /// acknowledged message.
    store_cpu_us_per_message: f64,
    /// CPU time of natswal's broker per acknowledged message (0 for
    /// JetStream, whose broker is the storing process).
    broker_cpu_us_per_message: f64,
}

impl Load {
    fn busy_per_second(&self) -> f64 {
        self.busy_acked as f64 / self.seconds
    }
}

/// Which stream each message goes to: `busy_share` of them to the first
/// `busy` streams, the rest spread over the others.
#[derive(Debug, Clone, Copy)]
struct Skew {
    streams: usize,
    busy: usize,
    busy_share: f64,
}

impl Skew {
    fn pick(&self, random: &mut u64) -> (usize, bool) {
        // SplitMix64: cheap, and the same sequence for both targets.
        *random = random.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = *random;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^= mixed >> 31;
        let quiet = self.streams - self.busy;
        let unit = (mixed >> 11) as f64 / (1u64 << 53) as f64;
        if quiet == 0 || unit < self.busy_share {
            ((mixed % self.busy as u64) as usize, true)
        } else {
            (self.busy + ((mixed >> 7) % quiet as u64) as usize, false)
        }
    }
}

/// Publishers keeping `in_flight` messages each waiting for an ack, every
/// message with its own reply subject (so each ack is timed).
async fn skewed_load(
    clients: &[async_nats::Client],
    prefix: &str,
    skew: Skew,
    args: &StreamsBenchArgs,
    duration: Duration,
) -> Result<Load> {
    let payload = Bytes::from(vec![b'x'; args.payload]);
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let busy_acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let busy_latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
    let quiet_latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for publisher in 0..args.publishers {
        let client = clients[publisher % clients.len()].clone();
        let inbox = client.new_inbox();
        let mut acks = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|error| BridgeError::nats("cannot subscribe to acks", error))?;
        let window = Arc::new(tokio::sync::Semaphore::new(args.in_flight));
        let sent: Arc<Mutex<HashMap<u64, (Instant, bool)>>> = Arc::default();
        let counter = {
            let (window, sent, stop) = (Arc::clone(&window), Arc::clone(&sent), Arc::clone(&stop));
            let (acked, busy_acked, errors) = (
                Arc::clone(&acked),
                Arc::clone(&busy_acked),
                Arc::clone(&errors),
            );
            let busy_latencies = Arc::clone(&busy_latencies);
            let quiet_latencies = Arc::clone(&quiet_latencies);
            tokio::spawn(async move {
                while let Some(message) = acks.next().await {
                    window.add_permits(1);
                    let sequence = message
                        .subject
                        .rsplit('.')
                        .next()
                        .and_then(|last| last.parse::<u64>().ok());
                    let entry = sequence.and_then(|sequence| {
                        sent.lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .remove(&sequence)
                    });
                    if stop.load(Ordering::Relaxed) {
                        continue;
                    }
                    if message.status.is_some() || memchr_error(&message.payload) {
                        errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    acked.fetch_add(1, Ordering::Relaxed);
                    if let Some((at, busy)) = entry {
                        let latencies = if busy {
                            busy_acked.fetch_add(1, Ordering::Relaxed);
                            &busy_latencies
                        } else {
                            &quiet_latencies
                        };
                        latencies
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .push(at.elapsed().as_nanos() as u64);
                    }
                }
            })
        };
        let stop = Arc::clone(&stop);
        let payload = payload.clone();
        let prefix = prefix.to_string();
        let in_flight = args.in_flight;
        tasks.push(tokio::spawn(async move {
            let mut random = publisher as u64 + 1;
            let mut sequence = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_secs(10), window.acquire()).await {
                    Ok(Ok(permit)) => permit.forget(),
                    _ => break,
                }
                let (stream, busy) = skew.pick(&mut random);
                sequence += 1;
                sent.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(sequence, (Instant::now(), busy));
                let published = client
                    .publish_with_reply(
                        format!("{prefix}.{stream}.x"),
                        format!("{inbox}.{sequence}"),
                        payload.clone(),
                    )
                    .await;
                if published.is_err() {
                    break;
                }
            }
            super::nats::drain_in_flight(&client, &window, in_flight, Duration::from_secs(10))
                .await;
            counter.abort();
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    for task in tasks {
        let _ = task.await;
    }
    let mut latencies = std::mem::take(
        &mut *busy_latencies
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
    let p99 = super::percentiles_us(&mut latencies, &[0.99])[0];
    let mut quiet = std::mem::take(
        &mut *quiet_latencies
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
    let quiet_p99 = super::percentiles_us(&mut quiet, &[0.99])[0];
    Ok(Load {
        seconds,
        busy_acked: busy_acked.load(Ordering::Relaxed),
        acked: acked.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        busy_p99_us: p99,
        quiet_p99_us: quiet_p99,
        ..Load::default()
    })
}

/// Stores `messages` acknowledged messages into each of `streams` streams;
/// fails unless every one is acknowledged.
async fn fill(
    client: &async_nats::Client,
    prefix: &str,
    streams: usize,
    messages: u64,
) -> Result<f64> {
    let started = Instant::now();
    let window = Arc::new(tokio::sync::Semaphore::new(512));
    let mut pending = tokio::task::JoinSet::new();
    for round in 0..messages {
        for stream in 0..streams {
            let permit = Arc::clone(&window)
                .acquire_owned()
                .await
                .map_err(|_| BridgeError::InvalidArgument("the fill window closed".into()))?;
            let client = client.clone();
            let subject = format!("{prefix}.{stream}.fill");
            pending.spawn(async move {
                let _permit = permit;
                let payload = Bytes::from(format!("message {round} of stream {stream}"));
                match tokio::time::timeout(
                    Duration::from_secs(60),
                    client.request(subject.clone(), payload),
                )
                .await
                {
                    Ok(Ok(reply)) if !memchr_error(&reply.payload) => Ok(()),
                    Ok(Ok(reply)) => Err(format!(
                        "{subject}: {}",
                        String::from_utf8_lossy(&reply.payload)
                    )),
                    Ok(Err(error)) => Err(format!("{subject}: {error}")),
                    Err(_) => Err(format!("{subject}: no ack within 60 s")),
                }
            });
        }
    }
    while let Some(outcome) = pending.join_next().await {
        outcome
            .map_err(|error| BridgeError::InvalidArgument(format!("a publish panicked: {error}")))?
            .map_err(|error| {
                BridgeError::InvalidArgument(format!("a fill message was not stored: {error}"))
            })?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Sends SIGTERM and waits for the process to exit (a clean shutdown).
fn stop_cleanly(process: &mut ChildProcess) -> Result<()> {
    let pid = libc::pid_t::try_from(process.0.id())
        .map_err(|_| BridgeError::InvalidArgument("pid out of range".into()))?;
    // SAFETY: kill takes a pid and a signal number; it touches no memory.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    process
        .0
        .wait()
        .map_err(|error| BridgeError::io("cannot wait for a server to exit", error))?;
    Ok(())
}

/// One row of the report.
#[derive(Debug, Clone, Copy, Default)]
struct Measured {
    streams: usize,
    created_seconds: f64,
    fill_seconds: f64,
    idle: Footprint,
    after_load_threads: u64,
    reopen_seconds: f64,
    reopened: Footprint,
    single: Load,
    skewed: Load,
}

fn natswal_config(args: &StreamsBenchArgs, data: &Path, url: &str, streams: usize) -> String {
    let mut config = format!(
        "data_dir = \"{}\"\n[nats]\nservers = [\"{url}\"]\n[http]\nlisten = \"\"\n[storage]\nwrite_mode = \"{}\"\nio_threads = {}\nopen_files_max = {}\ngroup_sync = {}\n",
        data.display(),
        args.write_mode,
        args.io_threads,
        args.open_files_max,
        !args.no_group_sync
    );
    for stream in 0..streams {
        let _ = write!(
            config,
            "[[streams]]\nname = \"s{stream}\"\nsubjects = [\"ms.{stream}.>\"]\ndurability = \"{}\"\n",
            args.durability
        );
    }
    config
}

async fn measure_natswal(
    args: &StreamsBenchArgs,
    binary: &Path,
    directory: &Path,
    streams: usize,
) -> Result<Measured> {
    let (broker, url) = start_nats_server(binary, directory, "broker", "")?;
    let data = directory.join("natswal");
    let config_path = directory.join("natswal.toml");
    std::fs::write(&config_path, natswal_config(args, &data, &url, streams))
        .map_err(|error| BridgeError::io("cannot write the natswal config", error))?;
    let serve = ["serve", "--config", &config_path.display().to_string()];
    let mut measured = Measured {
        streams,
        ..Measured::default()
    };
    let started = Instant::now();
    let mut natswal = spawn_self(&serve, "natswal ready")?;
    measured.created_seconds = started.elapsed().as_secs_f64();
    let clients = vec![connect(&url).await?, connect(&url).await?];
    measured.fill_seconds = fill(&clients[0], "ms", streams, args.messages).await?;
    measured.idle = footprint(natswal.0.id(), &data);
    let charged = Charged {
        store: &natswal,
        broker: Some(&broker),
    };
    run_loads(args, &clients, "ms", streams, charged, &mut measured).await?;
    measured.after_load_threads = footprint(natswal.0.id(), &data).threads;
    stop_cleanly(&mut natswal)?;
    drop(natswal);
    let started = Instant::now();
    let natswal = spawn_self(&serve, "natswal ready")?;
    measured.reopen_seconds = started.elapsed().as_secs_f64();
    measured.reopened = footprint(natswal.0.id(), &data);
    Ok(measured)
}

/// The processes whose CPU time a load is charged: the storing one, and
/// natswal's broker when it is a process of its own.
struct Charged<'a> {
    store: &'a ChildProcess,
    broker: Option<&'a ChildProcess>,
}

impl Charged<'_> {
    fn cpu_seconds(&self) -> (f64, f64) {
        let broker = self.broker.map_or(0.0, ChildProcess::cpu_seconds);
        (self.store.cpu_seconds(), broker)
    }

    /// Runs `load` and records the CPU time it cost per acknowledged message.
    async fn charge(&self, load: impl std::future::Future<Output = Result<Load>>) -> Result<Load> {
        let (store_before, broker_before) = self.cpu_seconds();
        let mut load = load.await?;
        let (store_after, broker_after) = self.cpu_seconds();
        let per_message = |seconds: f64| seconds * 1e6 / load.acked.max(1) as f64;
        load.store_cpu_us_per_message = per_message(store_after - store_before);
        load.broker_cpu_us_per_message = per_message(broker_after - broker_before);
        Ok(load)
    }
}

async fn run_loads(
    args: &StreamsBenchArgs,
    clients: &[async_nats::Client],
    prefix: &str,
    streams: usize,
    charged: Charged<'_>,
    measured: &mut Measured,
) -> Result<()> {
    let duration = Duration::from_secs_f64(args.seconds);
    let one = Skew {
        streams: 1,
        busy: 1,
        busy_share: 1.0,
    };
    measured.single = charged
        .charge(skewed_load(clients, prefix, one, args, duration))
        .await?;
    let skew = Skew {
        streams,
        busy: (streams / 100).max(1),
        busy_share: 0.9,
    };
    measured.skewed = charged
        .charge(skewed_load(clients, prefix, skew, args, duration))
        .await?;
    Ok(())
}

async fn create_jetstream_streams(client: &async_nats::Client, streams: usize) -> Result<()> {
    let jetstream = async_nats::jetstream::new(client.clone());
    let window = Arc::new(tokio::sync::Semaphore::new(16));
    let mut pending = tokio::task::JoinSet::new();
    for stream in 0..streams {
        let permit = Arc::clone(&window)
            .acquire_owned()
            .await
            .map_err(|_| BridgeError::InvalidArgument("the create window closed".into()))?;
        let jetstream = jetstream.clone();
        pending.spawn(async move {
            let _permit = permit;
            jetstream
                .create_stream(async_nats::jetstream::stream::Config {
                    name: format!("s{stream}"),
                    subjects: vec![format!("js.{stream}.>")],
                    storage: async_nats::jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|error| format!("cannot create JetStream stream s{stream}: {error}"))
        });
    }
    while let Some(outcome) = pending.join_next().await {
        outcome
            .map_err(|error| BridgeError::InvalidArgument(format!("a create panicked: {error}")))?
            .map_err(BridgeError::InvalidArgument)?;
    }
    Ok(())
}

/// Waits until JetStream answers `$JS.API.INFO` with `streams` streams.
async fn wait_jetstream_streams(url: &str, streams: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(client) = connect(url).await {
            let info = client
                .request("$JS.API.INFO", Bytes::new())
                .await
                .ok()
                .and_then(|reply| serde_json::from_slice::<serde_json::Value>(&reply.payload).ok());
            let count = info
                .as_ref()
                .and_then(|info| info["streams"].as_u64())
                .unwrap_or(0);
            if count as usize >= streams {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(BridgeError::InvalidArgument(format!(
                "JetStream did not report {streams} streams within 600 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn measure_jetstream(
    args: &StreamsBenchArgs,
    binary: &Path,
    directory: &Path,
    streams: usize,
) -> Result<Measured> {
    let port = free_port()?;
    let store = jetstream_store(directory, "peer");
    let mut measured = Measured {
        streams,
        ..Measured::default()
    };
    let start = || start_nats_server_on(binary, directory, "peer", "", "", port);
    let (mut server, url) = start()?;
    let clients = vec![connect(&url).await?, connect(&url).await?];
    let started = Instant::now();
    create_jetstream_streams(&clients[0], streams).await?;
    measured.created_seconds = started.elapsed().as_secs_f64();
    measured.fill_seconds = fill(&clients[0], "js", streams, args.messages).await?;
    measured.idle = footprint(server.0.id(), &store);
    let charged = Charged {
        store: &server,
        broker: None,
    };
    run_loads(args, &clients, "js", streams, charged, &mut measured).await?;
    measured.after_load_threads = footprint(server.0.id(), &store).threads;
    drop(clients);
    stop_cleanly(&mut server)?;
    drop(server);
    let started = Instant::now();
    let (server, url) = start()?;
    wait_jetstream_streams(&url, streams).await?;
    measured.reopen_seconds = started.elapsed().as_secs_f64();
    measured.reopened = footprint(server.0.id(), &store);
    Ok(measured)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn print_row(target: &str, measured: &Measured) {
    let broker = if measured.single.broker_cpu_us_per_message > 0.0 {
        format!(
            "{:.2} / {:.2}",
            measured.single.broker_cpu_us_per_message, measured.skewed.broker_cpu_us_per_message
        )
    } else {
        "-".to_string()
    };
    let ratio = measured.skewed.busy_per_second() / measured.single.busy_per_second().max(1.0);
    println!(
        "| {target} | {} | {:.2} | {:.2} | {:.2} | {} / {} | {} / {} | {:.0} | {:.0} | {:.1} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} / {:.2} | {} | {} |",
        measured.streams,
        measured.created_seconds,
        measured.fill_seconds,
        measured.reopen_seconds,
        measured.idle.threads,
        measured.after_load_threads,
        measured.idle.open_files,
        measured.reopened.open_files,
        measured.idle.rss_anon_kib as f64 / 1024.0,
        measured.idle.rss_file_kib as f64 / 1024.0,
        mib(measured.idle.disk_bytes),
        measured.single.busy_per_second(),
        measured.single.busy_p99_us / 1000.0,
        measured.skewed.busy_per_second(),
        measured.skewed.busy_p99_us / 1000.0,
        measured.skewed.quiet_p99_us / 1000.0,
        ratio,
        measured.single.store_cpu_us_per_message,
        measured.skewed.store_cpu_us_per_message,
        broker,
        measured.single.errors + measured.skewed.errors,
    );
}

/// Runs the whole benchmark and prints a report.
pub async fn run(args: StreamsBenchArgs) -> Result<()> {
    let binary = nats_server_binary(args.nats_server.as_deref())?;
    let root = args.dir.join("streams-bench");
    println!("# natswal bench streams");
    println!();
    println!(
        "{} acknowledged message(s) of about 30 B stored into each stream first; loads: {} publishers x {} in flight, {:.1} s each, {} B payloads; natswal durability {}, write mode {}; JetStream file storage with its defaults (it does not fsync each message); data in {}",
        args.messages,
        args.publishers,
        args.in_flight,
        args.seconds,
        args.payload,
        args.durability,
        args.write_mode,
        root.display()
    );
    println!();
    println!("| target | streams | create s | fill s | open after clean stop s | threads idle / loaded | open files idle / reopened | RssAnon MiB | RssFile MiB | disk MiB | one stream msgs/s | one stream p99 ms | busy streams msgs/s | busy p99 ms | quiet p99 ms | busy / one stream | store CPU µs/msg one / skewed | broker CPU µs/msg one / skewed | errors |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for &streams in &args.counts {
        if streams == 0 {
            continue;
        }
        for target in ["natswal", "JetStream"] {
            if target == "JetStream" && args.no_jetstream {
                continue;
            }
            let directory = root.join(format!("{target}-{streams}"));
            let _ = std::fs::remove_dir_all(&directory);
            std::fs::create_dir_all(&directory).map_err(|error| {
                BridgeError::io(format!("cannot create {}", directory.display()), error)
            })?;
            let measured = if target == "natswal" {
                measure_natswal(&args, &binary, &directory, streams).await?
            } else {
                measure_jetstream(&args, &binary, &directory, streams).await?
            };
            print_row(target, &measured);
            if !args.keep_data {
                let _ = std::fs::remove_dir_all(&directory);
            }
        }
    }
    println!();
    println!("Busy streams are the first 1% of the streams (at least one), sent 90% of the skewed load; \"one stream\" sends the same load to one stream. Memory and open files are taken after the fill, when the streams are idle; \"reopened\" after a clean stop and a new start.");
    if !args.keep_data {
        let _ = std::fs::remove_dir_all(&root);
    }
    Ok(())
}
