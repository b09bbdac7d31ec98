//! Faults on the in-memory file system: power loss while producers append
//! (under each durability level), a failed sync, and a full disk.

mod common;

use bytes::Bytes;
use common::Random;
use natswal::io::memory::MemoryFileSystem;
use natswal::io::FileSystem;
use natswal::SegmentCache;
use natswal::{
    AppendRequest, Completed, Completion, Durability, Error, Record, StartPosition, StoredRecord,
    Stream, StreamConfig, StreamOptions, FIRST_OFFSET,
};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

const DIRECTORY: &str = "/data/s";
const PRODUCERS: u64 = 4;
const PER_PRODUCER: u64 = 1500;
const IN_FLIGHT: usize = 64;

fn config(durability: Durability) -> StreamConfig {
    StreamConfig {
        durability,
        ..common::small_config()
    }
}

fn open_memory(file_system: &MemoryFileSystem, config: StreamConfig) -> natswal::Result<Stream> {
    Stream::open(
        Arc::new(file_system.clone()),
        Path::new(DIRECTORY),
        "s",
        Arc::new(SegmentCache::new(8)),
        StreamOptions {
            config,
            ..StreamOptions::default()
        },
    )
    .map(|(stream, _)| stream)
}

/// The record producer `producer` submits as its `sequence`-th append.
fn submitted(producer: u64, sequence: u64) -> Record {
    let mut record = Record::new(
        format!("crash.p{producer}.s{sequence}"),
        format!(
            "{producer}/{sequence}/{}",
            "y".repeat((sequence % 97) as usize)
        ),
    );
    if sequence % 3 == 0 {
        record.headers = Bytes::from(format!("NATS/1.0\r\nId: {producer}-{sequence}\r\n\r\n"));
    }
    record
}

/// Which submission a stored record is; panics on anything that was never
/// submitted (garbage), byte for byte.
fn identify(stored: &StoredRecord) -> (u64, u64) {
    let subject = std::str::from_utf8(&stored.subject)
        .unwrap_or_else(|_| panic!("offset {}: subject is not UTF-8", stored.offset));
    let parsed = subject
        .strip_prefix("crash.p")
        .and_then(|rest| rest.split_once(".s"))
        .and_then(|(producer, sequence)| Some((producer.parse().ok()?, sequence.parse().ok()?)));
    let Some((producer, sequence)) = parsed else {
        panic!(
            "offset {}: record never submitted: {subject}",
            stored.offset
        );
    };
    assert!(producer < PRODUCERS && sequence < PER_PRODUCER, "{subject}");
    common::assert_record(stored, &submitted(producer, sequence), stored.offset);
    (producer, sequence)
}

/// An acknowledged append: producer, sequence, offset.
type Ack = (u64, u64, u64);

/// Producers that each keep `IN_FLIGHT` appends outstanding. Every result
/// goes to `results` in each producer's submission order.
fn spawn_producers(
    stream: &Arc<Stream>,
    stop: &Arc<AtomicBool>,
    results: mpsc::UnboundedSender<(u64, u64, natswal::Result<u64>)>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..PRODUCERS)
        .map(|producer| {
            let stream = Arc::clone(stream);
            let stop = Arc::clone(stop);
            let results = results.clone();
            tokio::spawn(async move {
                let window = Arc::new(Semaphore::new(IN_FLIGHT));
                let (sender, mut receiver) = mpsc::unbounded_channel::<Completed>();
                let drain_window = Arc::clone(&window);
                let drain_results = results.clone();
                let drain = tokio::spawn(async move {
                    while let Some(completed) = receiver.recv().await {
                        drain_window.add_permits(1);
                        let result = completed.result.map(|outcome| outcome.first_offset);
                        let _ = drain_results.send((producer, completed.token, result));
                    }
                });
                for sequence in 0..PER_PRODUCER {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    window.acquire().await.unwrap().forget();
                    let request = AppendRequest {
                        records: vec![submitted(producer, sequence)],
                        ..AppendRequest::default()
                    };
                    let completion = Completion::Channel {
                        sender: sender.clone(),
                        token: sequence,
                    };
                    if let Err(error) = stream.submit(request, completion).await {
                        // Refused at the door: reported like a failed append.
                        let _ = results.send((producer, sequence, Err(error)));
                        break;
                    }
                }
                drop(sender);
                drain.await.unwrap();
            })
        })
        .collect()
}

/// Reads the whole stream and checks what any crash must leave: offsets
/// dense from `FIRST_OFFSET`, only submitted records, no duplicates, and each
/// producer's records a prefix of what it submitted (offsets follow each
/// producer's submission order). Returns the records in offset order (the
/// record at offset `FIRST_OFFSET + i` is the `i`-th).
fn check_recovered(stream: &Stream) -> Vec<(u64, u64)> {
    let mut reader = stream.reader(StartPosition::Earliest, None).unwrap();
    let mut identities = Vec::new();
    let mut seen = HashSet::new();
    let mut next_sequence = BTreeMap::<u64, u64>::new();
    for _ in 0..=PRODUCERS * PER_PRODUCER {
        let Some(stored) = reader.next().unwrap() else {
            break;
        };
        assert_eq!(
            stored.offset,
            FIRST_OFFSET + identities.len() as u64,
            "offsets are dense"
        );
        let identity = identify(&stored);
        assert!(seen.insert(identity), "duplicate record {identity:?}");
        let expected = next_sequence.entry(identity.0).or_default();
        assert_eq!(
            identity.1, *expected,
            "producer {}'s records are not a prefix of what it submitted",
            identity.0
        );
        *expected += 1;
        identities.push(identity);
    }
    assert!(
        reader.next().unwrap().is_none(),
        "more records than submitted"
    );
    identities
}

/// The recovered record at `offset` (`identities` as `check_recovered`
/// returns them), if there is one.
fn recovered_at(identities: &[(u64, u64)], offset: u64) -> Option<&(u64, u64)> {
    let index = offset.checked_sub(FIRST_OFFSET)?;
    identities.get(usize::try_from(index).ok()?)
}

async fn crash_while_appending(durability: Durability, seed: u64) {
    let mut random = Random(seed);
    let file_system = MemoryFileSystem::new();
    let stream = Arc::new(open_memory(&file_system, config(durability)).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let (results, mut receiver) = mpsc::unbounded_channel();
    let producers = spawn_producers(&stream, &stop, results);
    // The crash comes after a random number of acknowledgements, while the
    // producers still have most of their appends to go.
    let crash_after = 1 + random.below(PRODUCERS * PER_PRODUCER / 2) as usize;
    let mut acknowledged: Vec<Ack> = Vec::new();
    while acknowledged.len() < crash_after {
        let (producer, sequence, result) =
            tokio::time::timeout(Duration::from_secs(30), receiver.recv())
                .await
                .expect("appends progress")
                .expect("producers are running");
        let offset = result.unwrap_or_else(|error| panic!("append failed: {error}"));
        acknowledged.push((producer, sequence, offset));
    }
    // Everything in `acknowledged` resolved before this instant.
    let crashed = file_system.crash(seed);
    stop.store(true, Ordering::Release);
    for producer in producers {
        tokio::time::timeout(Duration::from_secs(30), producer)
            .await
            .expect("producers stop")
            .unwrap();
    }
    stream.close().unwrap();

    let recovered = open_memory(&crashed, config(durability))
        .unwrap_or_else(|error| panic!("{durability} seed {seed}: open after crash: {error}"));
    let identities = check_recovered(&recovered);
    if durability == Durability::Fsync {
        for (producer, sequence, offset) in &acknowledged {
            assert_eq!(
                recovered_at(&identities, *offset),
                Some(&(*producer, *sequence)),
                "fsync seed {seed}: acknowledged append p{producer}/s{sequence} lost from offset {offset} ({} records recovered)",
                identities.len()
            );
        }
    }
    // The recovered stream takes appends at its end.
    let outcome = recovered.append(submitted(0, 0)).await.unwrap();
    assert_eq!(outcome.first_offset, FIRST_OFFSET + identities.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_under_fsync_keeps_every_acknowledged_append() {
    for seed in 1..=12 {
        crash_while_appending(Durability::Fsync, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_under_interval_keeps_a_clean_prefix() {
    for seed in 101..=112 {
        crash_while_appending(Durability::Interval { interval_ms: 5 }, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_under_none_keeps_a_clean_prefix() {
    for seed in 201..=212 {
        crash_while_appending(Durability::None, seed).await;
    }
}

// ---------------------------------------------------------------------------
// A failed sync.

fn assert_poisoned(error: &Error) {
    assert!(
        matches!(error, Error::Poisoned { .. }),
        "expected Poisoned, got {error}"
    );
    let message = error.to_string();
    assert!(
        message.contains("read-only") && message.contains("a sync failed"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sync_poisons_the_stream_and_loses_no_acknowledged_append() {
    // Different counts make the failing sync a different one: an append's
    // group commit, a checkpoint, a sealed segment's, a new segment's header.
    for (trial, successful_syncs) in [0u64, 1, 2, 5, 17, 40, 90].into_iter().enumerate() {
        let file_system = MemoryFileSystem::new();
        let stream = Arc::new(open_memory(&file_system, config(Durability::Fsync)).unwrap());
        let warm_up = stream.append(submitted(0, 0)).await;
        let mut acknowledged: Vec<Ack> = Vec::new();
        if let Ok(outcome) = &warm_up {
            acknowledged.push((0, 0, outcome.first_offset));
        }
        file_system.fail_syncs_after(successful_syncs);
        let stop = Arc::new(AtomicBool::new(false));
        let (results, mut receiver) = mpsc::unbounded_channel();
        let producers = spawn_producers(&stream, &stop, results);
        let mut by_producer = BTreeMap::<u64, Vec<(u64, natswal::Result<u64>)>>::new();
        let mut first_failure = None;
        for producer in producers {
            tokio::time::timeout(Duration::from_secs(60), producer)
                .await
                .expect("producers finish")
                .unwrap();
        }
        while let Ok((producer, sequence, result)) = receiver.try_recv() {
            by_producer
                .entry(producer)
                .or_default()
                .push((sequence, result));
        }
        for (producer, results) in by_producer.iter_mut() {
            // Submission order: a refusal at the door is reported directly,
            // possibly before earlier completions.
            results.sort_by_key(|(sequence, _)| *sequence);
            let mut failed = false;
            for (sequence, result) in results {
                match result {
                    Ok(offset) => {
                        assert!(
                            !failed,
                            "trial {trial}: producer {producer}'s append {sequence} succeeded after an earlier one failed"
                        );
                        acknowledged.push((*producer, *sequence, *offset));
                    }
                    Err(error) => {
                        assert_poisoned(error);
                        failed = true;
                        first_failure.get_or_insert(error.to_string());
                    }
                }
            }
        }
        assert!(
            first_failure.is_some(),
            "trial {trial}: no append failed after syncs started failing"
        );
        // Syncs complete in offset order and a failed one fails everything
        // after it: the acknowledged offsets are exactly FIRST_OFFSET..
        // FIRST_OFFSET + n, so no append
        // succeeded after one that failed, across all producers.
        let mut offsets: Vec<u64> = acknowledged.iter().map(|ack| ack.2).collect();
        offsets.sort_unstable();
        assert!(
            offsets
                .iter()
                .copied()
                .eq(FIRST_OFFSET..FIRST_OFFSET + offsets.len() as u64),
            "trial {trial}: acknowledged offsets have a hole: an append succeeded after a failed one"
        );
        let status = stream.status();
        let cause = status
            .poisoned
            .clone()
            .expect("the status reports the poisoning");
        assert!(
            cause.contains("injected") || cause.contains("failed"),
            "{cause}"
        );
        // Later appends are refused at once, naming the cause.
        let error = stream.append(submitted(1, 1)).await.unwrap_err();
        assert_poisoned(&error);
        assert!(error.to_string().contains(&cause), "{error}");
        // Reads of what was durable still work.
        let (records, read_error) = common::read_until_error(&stream);
        assert!(read_error.is_none(), "{read_error:?}");
        assert!(records.len() >= acknowledged.len());
        assert_poisoned(&stream.close().unwrap_err());

        // Power loss, then a restart: every acknowledged append is there.
        let crashed = file_system.crash(trial as u64);
        let recovered = open_memory(&crashed, config(Durability::Fsync))
            .unwrap_or_else(|error| panic!("trial {trial}: open after crash: {error}"));
        let mut reader = recovered.reader(StartPosition::Earliest, None).unwrap();
        let mut identities = Vec::new();
        while let Some(stored) = reader.next().unwrap() {
            assert_eq!(stored.offset, FIRST_OFFSET + identities.len() as u64);
            identities.push(identify(&stored));
            assert!(identities.len() as u64 <= PRODUCERS * PER_PRODUCER + 1);
        }
        for (producer, sequence, offset) in &acknowledged {
            assert_eq!(
                recovered_at(&identities, *offset),
                Some(&(*producer, *sequence)),
                "trial {trial}: acknowledged append p{producer}/s{sequence} lost from offset {offset}"
            );
        }
        assert!(recovered.status().poisoned.is_none());
        let outcome = recovered.append(submitted(2, 2)).await.unwrap();
        assert_eq!(outcome.first_offset, FIRST_OFFSET + identities.len() as u64);
    }
}

/// The sync of a new segment's header fails at rotation: that append, and
/// every later one, fails with `Poisoned` like any other failed sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sync_while_creating_a_segment_poisons_the_stream() {
    let file_system = MemoryFileSystem::new();
    // No periodic checkpoints: once an append is acknowledged, no sync is
    // in progress, so the next sync is exactly the next append's.
    let config = StreamConfig {
        checkpoint_interval_bytes: 1 << 40,
        ..config(Durability::Fsync)
    };
    let segment_bytes = config.segment_bytes_max;
    let stream = open_memory(&file_system, config.clone()).unwrap();
    let mut acknowledged = Vec::new();
    let frame_bytes = |record: &Record| 96 + record.encoded_length() as u64;
    for index in 0..10_000u64 {
        let record = submitted(0, index % PER_PRODUCER);
        if stream.status().bytes + frame_bytes(&record) > segment_bytes {
            break;
        }
        let outcome = stream.append(record.clone()).await.unwrap();
        assert_eq!(outcome.first_offset, FIRST_OFFSET + index);
        acknowledged.push(record);
    }
    assert_eq!(stream.status().segments, 1);
    // The next append does not fit: it seals the segment and creates the
    // next one, whose header sync is the first to fail.
    file_system.fail_syncs_after(0);
    let error = stream
        .append(submitted(1, 0))
        .await
        .expect_err("the append whose segment could not be created fails");
    assert_poisoned(&error);
    assert!(stream.status().poisoned.is_some());
    assert_poisoned(&stream.append(submitted(1, 1)).await.unwrap_err());
    let (records, read_error) = common::read_until_error(&stream);
    assert!(read_error.is_none(), "{read_error:?}");
    common::assert_exactly(&records, &acknowledged);
    assert_poisoned(&stream.close().unwrap_err());

    let recovered = open_memory(&file_system.crash(3), config).unwrap();
    common::assert_exactly(&common::read_all(&recovered).unwrap(), &acknowledged);
    let outcome = recovered.append(submitted(2, 0)).await.unwrap();
    assert_eq!(
        outcome.first_offset,
        FIRST_OFFSET + acknowledged.len() as u64
    );
}

// ---------------------------------------------------------------------------
// A full disk.

fn used_bytes(file_system: &MemoryFileSystem) -> u64 {
    file_system
        .list(Path::new(DIRECTORY))
        .unwrap()
        .iter()
        .map(|name| {
            file_system
                .file_length(&Path::new(DIRECTORY).join(name))
                .unwrap()
        })
        .sum()
}

#[tokio::test]
async fn full_disk_fails_the_append_cleanly_and_recovers_when_space_returns() {
    let file_system = MemoryFileSystem::new();
    let config = config(Durability::Fsync);
    let segment_bytes = config.segment_bytes_max;
    let stream = open_memory(&file_system, config).unwrap();
    let mut expected = Vec::new();
    for index in 0..50 {
        let record = common::record(index);
        stream.append(record.clone()).await.unwrap();
        expected.push(record);
    }
    // Room for checkpoints and the sealed segment's index, not for a new
    // preallocated segment.
    file_system.set_space_limit(used_bytes(&file_system) + segment_bytes / 4);
    let failure = common::append_until_error(&stream, &mut expected, 5000).await;
    let error = failure.expect("the disk filled up");
    let message = error.to_string();
    assert!(matches!(error, Error::DiskFull { .. }), "{message}");
    assert!(message.contains("disk full"), "{message}");
    let next_segment = Path::new(DIRECTORY).join(natswal::format::segment_file_name(
        FIRST_OFFSET + expected.len() as u64,
    ));
    assert!(
        message.contains(&next_segment.display().to_string()),
        "the error names the segment it could not create: {message}"
    );
    assert!(
        stream.status().poisoned.is_none(),
        "a full disk does not poison"
    );
    common::assert_exactly(&common::read_all(&stream).unwrap(), &expected);
    // Still full: still refused, still not poisoned, nothing half-written.
    let again = stream.append(common::record(9999)).await.unwrap_err();
    assert!(matches!(again, Error::DiskFull { .. }), "{again}");
    assert!(stream.status().poisoned.is_none());
    assert_eq!(
        stream.status().next_offset,
        FIRST_OFFSET + expected.len() as u64
    );

    file_system.set_space_limit(u64::MAX);
    for _ in 0..20 {
        let index = expected.len() as u64;
        let record = common::record(index);
        let outcome = stream.append(record.clone()).await.unwrap();
        assert_eq!(
            outcome.first_offset,
            FIRST_OFFSET + index,
            "no offset was used by the failed appends"
        );
        expected.push(record);
    }
    common::assert_exactly(&common::read_all(&stream).unwrap(), &expected);
    stream.close().unwrap();
    // And it all survives a restart (and a crash: it was all synced).
    let reopened = open_memory(&file_system.crash(7), common::small_config()).unwrap();
    common::assert_exactly(&common::read_all(&reopened).unwrap(), &expected);
}
