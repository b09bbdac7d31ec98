//! `natswal bench wal`: the engine alone, on one disk, in one run.
//!
//! - append throughput with 4 producers that each keep many appends in
//!   flight, for 128 B / 1 KiB / 16 KiB payloads, `fsync` and `none`, mmap and
//!   pwrite backends;
//! - the disk's raw limit: sequential `write` + `fdatasync` of the same
//!   bytes with the same number of syncs as each `fsync` case, and the ratio;
//! - compression and encryption on a JSON event mix, as ratios to plain
//!   `fsync` in the same round (see `codec.rs`);
//! - append-to-durable latency percentiles at half the measured maximum;
//! - scan throughput of 10 M records of 128 B, unfiltered and filtered;
//! - anonymous memory while writing many GiB, and the time to open that
//!   stream after a clean shutdown and after a SIGKILL.

use super::{percentiles_us, rss_anon_kib};
use crate::error::BridgeError;
use bytes::Bytes;
use natswal::io::os::OsFileSystem;
use natswal::io::{FileSystem, WriteMode};
use natswal::SegmentCache;
use natswal::{
    AppendRequest, Completion, Durability, Record, StartPosition, Stream, StreamConfig,
    StreamOptions, SubjectPattern,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};

/// Options of `natswal bench wal`.
#[derive(Debug, Clone, clap::Args)]
pub struct WalBenchArgs {
    /// Directory for benchmark data (on the disk to measure); emptied after.
    #[arg(long, default_value = "bench-data")]
    pub dir: PathBuf,
    /// Seconds per throughput case.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Concurrent producers.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Appends each producer keeps in flight.
    #[arg(long, default_value_t = 8192)]
    pub in_flight: usize,
    /// Payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "128,1024,16384")]
    pub sizes: Vec<usize>,
    /// Records written and scanned by the scan case (0 skips it).
    #[arg(long, default_value_t = 10_000_000)]
    pub scan_records: u64,
    /// GiB written by the memory and open-time case (0 skips it).
    #[arg(long, default_value_t = 10)]
    pub large_gib: u64,
    /// Seconds of the half-load latency case.
    #[arg(long, default_value_t = 3.0)]
    pub latency_seconds: f64,
    /// Segment size in MiB.
    #[arg(long, default_value_t = 128)]
    pub segment_mib: u64,
    /// Offered rate of the latency case (default: half the measured maximum).
    #[arg(long)]
    pub latency_rate: Option<f64>,
    /// Only the throughput cases.
    #[arg(long)]
    pub quick: bool,
    /// Only the latency case (needs --latency-rate).
    #[arg(long)]
    pub latency_only: bool,
    /// Rounds of the compression and encryption case (each round measures
    /// every codec and its own plain peer); 0 skips it.
    #[arg(long, default_value_t = 2)]
    pub codec_rounds: usize,
    /// Only the compression and encryption case.
    #[arg(long)]
    pub codec_only: bool,
}

pub(super) fn stream_config(durability: Durability) -> StreamConfig {
    let segment_mib = SEGMENT_MIB.load(Ordering::Relaxed);
    StreamConfig {
        durability,
        segment_bytes_max: segment_mib << 20,
        ..StreamConfig::default()
    }
}

/// Segment size of every bench stream (from `--segment-mib`).
static SEGMENT_MIB: AtomicU64 = AtomicU64::new(128);

fn open_stream(directory: &Path, write_mode: WriteMode, config: StreamConfig) -> Stream {
    let options = StreamOptions {
        config,
        ..StreamOptions::default()
    };
    open_stream_with(directory, write_mode, options)
}

pub(super) fn open_stream_with(
    directory: &Path,
    write_mode: WriteMode,
    options: StreamOptions,
) -> Stream {
    let file_system: Arc<dyn FileSystem> = Arc::new(OsFileSystem::new(write_mode));
    Stream::open(
        file_system,
        directory,
        "bench",
        Arc::new(SegmentCache::new(64)),
        options,
    )
    .expect("bench stream opens")
    .0
}

/// Result of one throughput case.
#[derive(Debug, Clone, Copy)]
pub(super) struct Throughput {
    pub messages: u64,
    pub payload_bytes: u64,
    pub seconds: f64,
    pub frames: u64,
    pub syncs: u64,
    /// Frame bytes written to the log (after compression and encryption).
    pub log_bytes: u64,
}

impl Throughput {
    pub fn messages_per_second(&self) -> f64 {
        self.messages as f64 / self.seconds
    }

    pub fn megabytes_per_second(&self) -> f64 {
        self.payload_bytes as f64 / self.seconds / 1e6
    }
}

fn subjects() -> Vec<Bytes> {
    (0..16)
        .map(|index| Bytes::from(format!("bench.orders.{index}")))
        .collect()
}

/// Producers keep `in_flight` appends each outstanding until `duration`
/// passes; returns what completed successfully.
pub(super) async fn run_producers(
    stream: Arc<Stream>,
    payloads: Arc<Vec<Bytes>>,
    args: &WalBenchArgs,
    duration: Duration,
) -> Throughput {
    assert!(!payloads.is_empty(), "at least one payload");
    let submitted_bytes = Arc::new(AtomicU64::new(0));
    let subjects = Arc::new(subjects());
    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let metrics_before = (
        stream.metrics().frames.load(Ordering::Relaxed),
        stream.metrics().syncs.load(Ordering::Relaxed),
        stream.metrics().bytes.load(Ordering::Relaxed),
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    let producers = args.producers;
    for producer in 0..producers {
        let stream = Arc::clone(&stream);
        let payloads = Arc::clone(&payloads);
        let submitted_bytes = Arc::clone(&submitted_bytes);
        let subjects = Arc::clone(&subjects);
        let stop = Arc::clone(&stop);
        let completed = Arc::clone(&completed);
        let failed = Arc::clone(&failed);
        let in_flight = args.in_flight;
        tasks.push(tokio::spawn(async move {
            let window = Arc::new(Semaphore::new(in_flight));
            let (sender, mut receiver) = mpsc::unbounded_channel::<natswal::Completed>();
            let drain_window = Arc::clone(&window);
            let drain = tokio::spawn(async move {
                let mut done = 0u64;
                let mut errors = 0u64;
                while let Some(item) = receiver.recv().await {
                    drain_window.add_permits(1);
                    match item.result {
                        Ok(_) => done += 1,
                        Err(_) => errors += 1,
                    }
                }
                (done, errors)
            });
            // Producers start far apart in the payload list, so one frame
            // does not hold the same payload from each of them (which would
            // flatter compression).
            let mut index = producer * (payloads.len() / producers).max(1) + producer;
            let mut payload_bytes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                window.acquire().await.expect("window open").forget();
                let payload = payloads[index % payloads.len()].clone();
                payload_bytes += payload.len() as u64;
                let record = Record {
                    timestamp_ns: 0,
                    subject: subjects[index % subjects.len()].clone(),
                    headers: Bytes::new(),
                    payload,
                };
                index += 1;
                let request = AppendRequest {
                    records: vec![record],
                    ..AppendRequest::default()
                };
                let completion = Completion::Channel {
                    sender: sender.clone(),
                    token: 0,
                };
                if stream.submit(request, completion).await.is_err() {
                    break;
                }
            }
            drop(sender);
            submitted_bytes.fetch_add(payload_bytes, Ordering::Relaxed);
            let (done, errors) = drain.await.expect("drain task");
            completed.fetch_add(done, Ordering::Relaxed);
            failed.fetch_add(errors, Ordering::Relaxed);
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("producer task");
    }
    let seconds = started.elapsed().as_secs_f64();
    let messages = completed.load(Ordering::Relaxed);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "appends failed during the benchmark"
    );
    // Every submitted append completed (none failed, checked above), so
    // the submitted payload bytes are the stored ones.
    Throughput {
        messages,
        payload_bytes: submitted_bytes.load(Ordering::Relaxed),
        seconds,
        frames: stream.metrics().frames.load(Ordering::Relaxed) - metrics_before.0,
        syncs: stream.metrics().syncs.load(Ordering::Relaxed) - metrics_before.1,
        log_bytes: stream.metrics().bytes.load(Ordering::Relaxed) - metrics_before.2,
    }
}

/// Sequential `write` + `fdatasync`: `total_bytes` in `syncs` equal chunks,
/// into a new file (`preallocated`: into a file `fallocate`d to the total
/// first, as natswal's segments are). MB/s.
fn raw_sequential(directory: &Path, total_bytes: u64, syncs: u64, preallocated: bool) -> f64 {
    let path = directory.join("raw-sequential.bin");
    let mut file = std::fs::File::create(&path).expect("raw file");
    if preallocated {
        natswal::io::os::OsFileSystem::new(WriteMode::Pwrite)
            .open(&path, true)
            .and_then(|handle| handle.allocate(total_bytes))
            .expect("raw file allocated");
        file.sync_all().expect("raw file allocation durable");
    }
    let syncs = syncs.max(1);
    let chunk = (total_bytes / syncs).max(1) as usize;
    let buffer = vec![0xa5u8; chunk.min(64 << 20)];
    let started = Instant::now();
    for _ in 0..syncs {
        let mut left = chunk;
        while left > 0 {
            let part = left.min(buffer.len());
            file.write_all(&buffer[..part]).expect("raw write");
            left -= part;
        }
        file.sync_data().expect("raw fdatasync");
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    (chunk as u64 * syncs) as f64 / seconds / 1e6
}

pub(super) fn fresh_directory(root: &Path, name: &str) -> PathBuf {
    let directory = root.join(name);
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).expect("bench directory");
    directory
}

/// Runs the whole WAL benchmark and prints a report.
pub async fn run(args: WalBenchArgs) -> crate::error::Result<()> {
    SEGMENT_MIB.store(args.segment_mib, Ordering::Relaxed);
    std::fs::create_dir_all(&args.dir)
        .map_err(|error| BridgeError::io(format!("cannot create {}", args.dir.display()), error))?;
    if args.latency_only {
        let rate = args.latency_rate.ok_or_else(|| {
            BridgeError::InvalidArgument("--latency-only needs --latency-rate".to_string())
        })?;
        for write_mode in [WriteMode::Pwrite, WriteMode::Mmap] {
            latency_case(&args, rate, write_mode).await;
        }
        recycling_case(&args, rate).await;
        return Ok(());
    }
    println!("# natswal bench wal");
    println!();
    if args.codec_only {
        super::codec::codec_case(&args).await;
        let _ = std::fs::remove_dir_all(&args.dir);
        return Ok(());
    }
    println!(
        "{} producers x {} appends in flight, {:.1} s per case, data in {}",
        args.producers,
        args.in_flight,
        args.seconds,
        args.dir.display()
    );
    println!();
    println!("| payload | durability | backend | msgs/s | MB/s | records/frame | syncs | raw write+fdatasync MB/s (same bytes, same syncs) | ratio to raw | raw into a preallocated file MB/s | ratio to it |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut fsync_128_default = None;
    for &size in &args.sizes {
        for durability in [Durability::Fsync, Durability::None] {
            for write_mode in [WriteMode::Mmap, WriteMode::Pwrite] {
                let directory = fresh_directory(&args.dir, "throughput");
                let stream = Arc::new(open_stream(
                    &directory,
                    write_mode,
                    stream_config(durability),
                ));
                let result = run_producers(
                    Arc::clone(&stream),
                    Arc::new(vec![Bytes::from(vec![0x5a; size])]),
                    &args,
                    Duration::from_secs_f64(args.seconds),
                )
                .await;
                close(stream).await;
                if durability == Durability::Fsync
                    && write_mode == WriteMode::default()
                    && size == 128
                {
                    fsync_128_default = Some(result.messages_per_second());
                }
                let log_megabytes_per_second = result.log_bytes as f64 / result.seconds / 1e6;
                let raw_text = if durability == Durability::Fsync {
                    let raw = raw_sequential(&directory, result.log_bytes, result.syncs, false);
                    let preallocated =
                        raw_sequential(&directory, result.log_bytes, result.syncs, true);
                    format!(
                        "{raw:.0} | {:.2} | {preallocated:.0} | {:.2}",
                        log_megabytes_per_second / raw,
                        log_megabytes_per_second / preallocated
                    )
                } else {
                    "- | - | - | -".to_string()
                };
                println!(
                    "| {size} B | {durability} | {write_mode} | {:.0} | {:.1} | {:.0} | {} | {raw_text} |",
                    result.messages_per_second(),
                    result.megabytes_per_second(),
                    result.messages as f64 / result.frames.max(1) as f64,
                    result.syncs,
                );
                let _ = std::fs::remove_dir_all(&directory);
            }
        }
    }
    println!();
    println!("Ratio to raw compares log bytes per second (payload + record and frame headers) with a plain sequential write + fdatasync loop of the same bytes and the same number of syncs, run right after the case on the same disk: into a new file (the loop the targets name), and into a file fallocated first (what natswal's preallocated segments get; the gap between the two is the file system allocating extents at every sync). The default backend is {}.", WriteMode::default());
    if args.codec_rounds > 0 {
        super::codec::codec_case(&args).await;
    }
    if args.quick {
        return Ok(());
    }
    if let Some(maximum) = fsync_128_default {
        let rate = args.latency_rate.unwrap_or(maximum / 2.0);
        for write_mode in [WriteMode::Pwrite, WriteMode::Mmap] {
            latency_case(&args, rate, write_mode).await;
        }
        recycling_case(&args, rate).await;
    }
    if args.scan_records > 0 {
        scan_case(&args).await;
    }
    if args.large_gib > 0 {
        large_case(&args).await;
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok(())
}

pub(super) async fn close(stream: Arc<Stream>) {
    tokio::task::spawn_blocking(move || stream.close().expect("bench stream closes"))
        .await
        .expect("close task");
}

/// Open-loop producers at a fixed rate for `duration`: append-to-durable
/// latency of every append, in nanoseconds.
async fn open_loop(
    stream: &Arc<Stream>,
    producers: usize,
    rate_per_second: f64,
    duration: Duration,
) -> Vec<u64> {
    let payload = Bytes::from(vec![0x5a; 128]);
    let subjects = Arc::new(subjects());
    let per_producer = rate_per_second / producers as f64;
    let mut tasks = Vec::new();
    let origin = Instant::now();
    for producer in 0..producers {
        let stream = Arc::clone(stream);
        let payload = payload.clone();
        let subjects = Arc::clone(&subjects);
        tasks.push(tokio::spawn(async move {
            let (sender, mut receiver) = mpsc::unbounded_channel::<natswal::Completed>();
            let drain = tokio::spawn(async move {
                let mut samples = Vec::new();
                while let Some(item) = receiver.recv().await {
                    item.result.expect("append succeeds");
                    samples.push(origin.elapsed().as_nanos() as u64 - item.token);
                }
                samples
            });
            let started = Instant::now();
            let mut sent = 0u64;
            // Send in small bursts every 100 µs to hold the rate.
            while started.elapsed() < duration {
                let due = (started.elapsed().as_secs_f64() * per_producer) as u64;
                while sent < due {
                    let record = Record {
                        timestamp_ns: 0,
                        subject: subjects[(sent as usize + producer) % subjects.len()].clone(),
                        headers: Bytes::new(),
                        payload: payload.clone(),
                    };
                    let completion = Completion::Channel {
                        sender: sender.clone(),
                        token: origin.elapsed().as_nanos() as u64,
                    };
                    let request = AppendRequest {
                        records: vec![record],
                        ..AppendRequest::default()
                    };
                    stream.submit(request, completion).await.expect("submit");
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
            drop(sender);
            drain.await.expect("drain")
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("latency producer"));
    }
    samples
}

/// Append-to-durable latency at a fixed offered rate on a fresh stream.
async fn latency_case(args: &WalBenchArgs, rate_per_second: f64, write_mode: WriteMode) {
    let directory = fresh_directory(&args.dir, "latency");
    let stream = Arc::new(open_stream(
        &directory,
        write_mode,
        stream_config(Durability::Fsync),
    ));
    let duration = Duration::from_secs_f64(args.latency_seconds);
    let mut samples = open_loop(&stream, args.producers, rate_per_second, duration).await;
    close(stream).await;
    let achieved = samples.len() as f64 / args.latency_seconds;
    let values = percentiles_us(&mut samples, &[0.5, 0.99, 0.999]);
    println!();
    println!("## Append-to-durable latency at half load (128 B, fsync, {write_mode})");
    println!();
    println!("| offered msgs/s | achieved msgs/s | p50 µs | p99 µs | p99.9 µs |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| {rate_per_second:.0} | {achieved:.0} | {:.0} | {:.0} | {:.0} |",
        values[0], values[1], values[2]
    );
    let _ = std::fs::remove_dir_all(&directory);
}

/// Steady writing under retention (16 MiB segments, 64 MiB kept), at the
/// half-load rate, with segment recycling on (the default) and off: every
/// new segment then allocates new extents, and every deleted one is
/// discarded by the file system (`discard` mounts do it online).
async fn recycling_case(args: &WalBenchArgs, rate_per_second: f64) {
    println!();
    println!("## Steady writing under retention: segment recycling on and off (128 B, fsync, {}, 16 MiB segments, 64 MiB retained)", WriteMode::default());
    println!();
    println!("| recycle_segments_max | offered msgs/s | achieved msgs/s | p50 µs | p99 µs | p99.9 µs | segment files created | reused |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for recycle_segments_max in [StreamConfig::default().recycle_segments_max, 0] {
        let directory = fresh_directory(&args.dir, "recycling");
        let config = StreamConfig {
            segment_bytes_max: 16 << 20,
            retention: natswal::RetentionPolicy {
                bytes_max: Some(64 << 20),
                ..natswal::RetentionPolicy::default()
            },
            maintenance_interval_ms: 100,
            recycle_segments_max,
            ..stream_config(Durability::Fsync)
        };
        let stream = Arc::new(open_stream(&directory, WriteMode::default(), config));
        // Warm up until retention deletes (and, with recycling, reuses).
        let warm_up = Duration::from_secs_f64(args.latency_seconds.max(1.0));
        open_loop(&stream, args.producers, rate_per_second, warm_up).await;
        let before = stream.log().segment_file_counts();
        let duration = Duration::from_secs_f64(args.latency_seconds * 2.0);
        let mut samples = open_loop(&stream, args.producers, rate_per_second, duration).await;
        let after = stream.log().segment_file_counts();
        close(stream).await;
        let achieved = samples.len() as f64 / duration.as_secs_f64();
        let values = percentiles_us(&mut samples, &[0.5, 0.99, 0.999]);
        println!(
            "| {recycle_segments_max} | {rate_per_second:.0} | {achieved:.0} | {:.0} | {:.0} | {:.0} | {} | {} |",
            values[0],
            values[1],
            values[2],
            after.0 - before.0,
            after.1 - before.1
        );
        let _ = std::fs::remove_dir_all(&directory);
    }
}

/// Writes `scan_records` records of 128 B, then scans them from page cache.
async fn scan_case(args: &WalBenchArgs) {
    let directory = fresh_directory(&args.dir, "scan");
    let config = StreamConfig {
        durability: Durability::None,
        ..StreamConfig::default()
    };
    let stream = Arc::new(open_stream(&directory, WriteMode::default(), config));
    let payload = Bytes::from(vec![0x5a; 128]);
    let subjects = subjects();
    let batch = 1000usize;
    let mut written = 0u64;
    while written < args.scan_records {
        let count = batch.min((args.scan_records - written) as usize);
        let records = (0..count)
            .map(|index| Record {
                timestamp_ns: 0,
                subject: subjects[(written as usize + index) % subjects.len()].clone(),
                headers: Bytes::new(),
                payload: payload.clone(),
            })
            .collect();
        let request = AppendRequest {
            records,
            ..AppendRequest::default()
        };
        stream
            .submit(request, Completion::None)
            .await
            .expect("submit");
        written += count as u64;
    }
    // Closed and dropped: the directory's lock is free for the reopen.
    close(stream).await;
    let stream = open_stream(
        &directory,
        WriteMode::default(),
        stream_config(Durability::None),
    );
    println!();
    println!(
        "## Scan of {} records of 128 B from page cache",
        args.scan_records
    );
    println!();
    println!("| filter | records matched | msgs/s scanned |");
    println!("| --- | --- | --- |");
    for filter in [
        None,
        Some("bench.orders.7"),
        Some("bench.*.1"),
        Some("bench.>"),
    ] {
        // Warm pass for page cache, then the measured pass.
        for measured in [false, true] {
            let pattern = filter.map(|text| SubjectPattern::parse(text).expect("pattern"));
            let mut reader = stream
                .reader(StartPosition::Earliest, pattern)
                .expect("reader");
            let started = Instant::now();
            let mut matched = 0u64;
            while let Some(record) = reader.next().expect("scan") {
                matched += 1;
                std::hint::black_box(&record.payload);
            }
            let seconds = started.elapsed().as_secs_f64();
            if measured {
                println!(
                    "| {} | {matched} | {:.0} |",
                    filter.unwrap_or("(none)"),
                    args.scan_records as f64 / seconds
                );
            }
        }
    }
    drop(stream);
    let _ = std::fs::remove_dir_all(&directory);
}

/// Writes `large_gib` GiB (16 KiB payloads, fsync) while sampling anonymous
/// memory, then times opening the stream after a clean shutdown.
async fn large_case(args: &WalBenchArgs) {
    let directory = fresh_directory(&args.dir, "large");
    let stream = Arc::new(open_stream(
        &directory,
        WriteMode::default(),
        stream_config(Durability::Fsync),
    ));
    let target_bytes = args.large_gib << 30;
    let payload_size = 16 * 1024;
    let rss_max = Arc::new(AtomicU64::new(rss_anon_kib()));
    let rss_before = rss_anon_kib();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let rss_max = Arc::clone(&rss_max);
        let sampling = Arc::clone(&sampling);
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                rss_max.fetch_max(rss_anon_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let started = Instant::now();
    let limited = WalBenchArgs {
        in_flight: 512,
        ..args.clone()
    };
    let mut written = 0u64;
    while written < target_bytes {
        let result = run_producers(
            Arc::clone(&stream),
            Arc::new(vec![Bytes::from(vec![0x5a; payload_size])]),
            &limited,
            Duration::from_secs(2),
        )
        .await;
        written += result.payload_bytes;
    }
    let write_seconds = started.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    close(Arc::clone(&stream)).await;
    drop(stream);
    let opened = Instant::now();
    let reopened = open_stream(
        &directory,
        WriteMode::default(),
        stream_config(Durability::Fsync),
    );
    let open_clean = opened.elapsed();
    let status = reopened.status();
    drop(reopened);
    println!();
    println!(
        "## Writing {:.1} GiB (16 KiB payloads, fsync, {})",
        written as f64 / (1u64 << 30) as f64,
        WriteMode::default()
    );
    println!();
    println!("| write MB/s | RssAnon before | RssAnon max while writing | segments | open after clean shutdown |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| {:.0} | {} MiB | {} MiB | {} | {:.1} ms |",
        written as f64 / write_seconds / 1e6,
        rss_before / 1024,
        rss_max.load(Ordering::Relaxed) / 1024,
        status.segments,
        open_clean.as_secs_f64() * 1000.0
    );
    crash_open_case(&directory).await;
    let _ = std::fs::remove_dir_all(&directory);
}

/// Appends to the large stream in a child process, SIGKILLs it, and times
/// the open that has to validate the unclean tail.
async fn crash_open_case(directory: &Path) {
    let executable = std::env::current_exe().expect("own executable");
    let mut child = std::process::Command::new(executable)
        .args(["bench", "wal-writer", "--dir"])
        .arg(directory)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("writer child starts");
    // The child prints a line once it has written for a while.
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("child stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("child reports");
    // SAFETY: kill with a valid pid and signal number touches no memory.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
    let opened = Instant::now();
    let file_system: Arc<dyn FileSystem> = Arc::new(OsFileSystem::new(WriteMode::default()));
    let (stream, report) = Stream::open(
        file_system,
        directory,
        "bench",
        Arc::new(SegmentCache::new(64)),
        StreamOptions::default(),
    )
    .expect("open after SIGKILL");
    let open_crash = opened.elapsed();
    println!();
    println!("| open after SIGKILL | bytes validated | torn tails truncated |");
    println!("| --- | --- | --- |");
    println!(
        "| {:.1} ms | {} | {} |",
        open_crash.as_secs_f64() * 1000.0,
        report.validated_bytes,
        report.truncated.len()
    );
    drop(stream);
}

/// Child of the crash case: appends 1 KiB records until killed.
pub async fn writer_child(directory: &Path) -> crate::error::Result<()> {
    let stream = Arc::new(open_stream(
        directory,
        WriteMode::default(),
        stream_config(Durability::Fsync),
    ));
    let args = WalBenchArgs {
        dir: directory.to_path_buf(),
        seconds: 1.0,
        producers: 4,
        in_flight: 1024,
        sizes: vec![1024],
        scan_records: 0,
        large_gib: 0,
        latency_seconds: 0.0,
        latency_rate: None,
        segment_mib: 128,
        quick: true,
        latency_only: false,
        codec_rounds: 0,
        codec_only: false,
    };
    let producing = tokio::spawn({
        let stream = Arc::clone(&stream);
        async move {
            let payloads = Arc::new(vec![Bytes::from(vec![0x5a; 1024])]);
            run_producers(stream, payloads, &args, Duration::from_secs(3600)).await
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("writing");
    std::io::stdout()
        .flush()
        .map_err(|error| BridgeError::io("cannot write to stdout", error))?;
    let _ = producing.await;
    Ok(())
}
